//! `switchboard send`: join a room, send one message, wait for it to come back stored.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use switchboard_client::{Event, Options, State};

#[derive(Debug, Args)]
#[command(
    after_help = "Prints the message's id on success and exits 0; exits 1 with a reason \
when the room cannot be joined or the message is refused or not acknowledged in time. A \
connection lost on the way is reopened and the message sent again; the room stores it once."
)]
pub(crate) struct SendArgs {
    #[command(flatten)]
    room: crate::target::RoomTarget,
    /// The message text.
    text: String,
    /// Seconds to wait for the acknowledgement.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

// The id is this command's output.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(args: SendArgs) -> anyhow::Result<()> {
    let options = Options::default().with_connect_timeout(Duration::from_secs(args.timeout));
    let (room, mut events) = args.room.join(options).await?;
    let nonce = room.send_message(args.text)?;

    let acknowledged = tokio::time::timeout(Duration::from_secs(args.timeout), async {
        while let Some(event) = events.recv().await {
            match event {
                Event::Message(m) if m.nonce.as_deref() == Some(nonce.as_str()) => {
                    return Ok(m.id);
                }
                Event::Error(e) if e.nonce.as_deref() == Some(nonce.as_str()) => {
                    bail!("refused: {} ({})", e.message, e.code)
                }
                Event::State(State::Reconnecting { reason, delay, .. }) => {
                    tracing::warn!("{reason}; reconnecting in {delay:.1?}");
                }
                Event::State(State::Closed { reason, .. }) => {
                    bail!("the connection closed before the acknowledgement: {reason}")
                }
                _ => {}
            }
        }
        bail!("the connection closed before the acknowledgement")
    })
    .await
    .map_err(|_| anyhow::anyhow!("no acknowledgement within {} s", args.timeout))??;
    println!("{acknowledged}");
    // Nothing more is read: dropping the events lets the close run without waiting on us.
    drop(events);
    room.close().await;
    Ok(())
}
