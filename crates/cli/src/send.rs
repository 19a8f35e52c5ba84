//! `switchboard send`: join a room, send one message, wait for it to come back stored.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use switchboard_net::{connect, ClientOptions, CloseCode, CloseFrame, Message};

#[derive(Debug, Args)]
#[command(
    after_help = "Prints the message's id on success and exits 0; exits 1 with a reason \
when the room cannot be joined or the message is refused or not acknowledged in time."
)]
pub(crate) struct SendArgs {
    /// Room URL, such as ws://127.0.0.1:8080/room/lobby
    url: String,
    /// The name to send as.
    #[arg(long)]
    name: String,
    /// The message text.
    text: String,
    /// Seconds to wait for the acknowledgement.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

fn with_name(url: &str, name: &str) -> String {
    let encoded: String = name
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}name={encoded}")
}

// The id is this command's output.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(args: SendArgs) -> anyhow::Result<()> {
    let url = with_name(&args.url, &args.name);
    let mut socket = connect(&url, ClientOptions::default())
        .await
        .with_context(|| format!("joining {}", args.url))?
        .socket;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let nonce = format!("send-{}-{stamp}", std::process::id());
    let request = serde_json::json!({"type": "message", "text": args.text, "nonce": nonce});
    socket.send_text(&request.to_string()).await?;

    let acknowledged = tokio::time::timeout(Duration::from_secs(args.timeout), async {
        loop {
            let Some(message) = socket.recv().await.context("connection failed")? else {
                let why = socket
                    .peer_close()
                    .map_or_else(String::new, |f| format!(": {} {}", f.code, f.reason));
                bail!("the server closed the connection before acknowledging{why}");
            };
            let Message::Text(text) = message else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
                continue;
            };
            match event["type"].as_str() {
                Some("message") if event["nonce"] == nonce.as_str() => {
                    return event["id"]
                        .as_u64()
                        .context("acknowledgement without an id");
                }
                Some("error") => bail!("refused: {} ({})", event["message"], event["code"]),
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no acknowledgement within {} s", args.timeout))??;
    println!("{acknowledged}");
    if let Err(cause) = socket
        .close(Some(CloseFrame::new(CloseCode::NORMAL, "")))
        .await
    {
        tracing::debug!(%cause, "closing after send");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_into_the_url() {
        assert_eq!(
            with_name("ws://h/room/lobby", "bot"),
            "ws://h/room/lobby?name=bot"
        );
        assert_eq!(
            with_name("ws://h/room/lobby?since=3", "Zoë B"),
            "ws://h/room/lobby?since=3&name=Zo%C3%AB%20B"
        );
    }
}
