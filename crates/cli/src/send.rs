//! `switchboard send`: join a room, send one message, wait for it to come back stored.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use switchboard_client::{connect, Event, Options, State};

#[derive(Debug, Args)]
#[command(
    after_help = "Prints the message's id on success and exits 0; exits 1 with a reason \
when the room cannot be joined or the message is refused or not acknowledged in time. A \
connection lost on the way is reopened and the message sent again; the room stores it once."
)]
pub(crate) struct SendArgs {
    /// Room URL, such as ws://127.0.0.1:8080/room/lobby (or wss:// for TLS)
    url: String,
    #[command(flatten)]
    ca: crate::tls::CaArg,
    /// The name to send as (in open mode; with --token the name comes from the token).
    #[arg(long)]
    name: Option<String>,
    /// JWT for servers with auth (sent as `Authorization: Bearer`).
    #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The message text.
    text: String,
    /// Seconds to wait for the acknowledgement.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

// The id is this command's output.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(args: SendArgs) -> anyhow::Result<()> {
    if args.name.is_none() && args.token.is_none() {
        bail!("give --name (or --token on a server with auth)");
    }
    let mut options = Options::default().with_connect_timeout(Duration::from_secs(args.timeout));
    if let Some(name) = &args.name {
        options = options.with_name(name);
    }
    if let Some(token) = &args.token {
        options = options.with_token(token);
    }
    let options = args.ca.apply(options)?;
    let (room, mut events) = connect(&args.url, options)
        .await
        .with_context(|| format!("joining {}", args.url))?;
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
