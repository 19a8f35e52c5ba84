//! `switchboard connect`: a line-oriented WebSocket client for scripts and conformance.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use switchboard_net::{connect, ClientOptions, CloseCode, CloseFrame, Message};
use tokio::io::{AsyncBufReadExt, BufReader};

const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Args)]
#[command(
    after_help = "Output: each text message is printed as one line, with any newline in it \
written as the two characters \\n. A binary message is printed as `[binary N bytes] HEX`, its \
bytes in lowercase hexadecimal.\n\nExit status: 0 after a clean close; 1 with a one-line reason \
when the connection is refused, the server does not answer 101, or the connection fails."
)]
pub(crate) struct ConnectArgs {
    /// ws:// URL to connect to.
    url: String,
    /// Send every received message back with its type unchanged instead of reading stdin.
    #[arg(long)]
    echo: bool,
    /// Do not offer permessage-deflate compression (offered by default).
    #[arg(long)]
    no_deflate: bool,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
}

pub(crate) async fn run(args: ConnectArgs) -> anyhow::Result<()> {
    let mut options = ClientOptions::default();
    if args.no_deflate {
        options.config = options.config.with_deflate(None);
    }
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("header {header:?} is not `Name: value`"))?;
        options = options.with_header(name.trim(), value.trim());
    }
    let connected = connect(&args.url, options)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let mut socket = connected.socket;
    if args.echo {
        loop {
            match socket.recv().await {
                Ok(Some(message)) => socket.feed(&message).await?,
                Ok(None) => return Ok(()),
                // The server is told why (the close frame went out); the run is over.
                Err(error) => return Err(error).context("connection failed"),
            }
        }
    }

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = std::io::stdout().lock();
    // After stdin ends, replies still in flight are printed until the server's Close.
    let mut closing = None;
    loop {
        tokio::select! {
            line = lines.next_line(), if closing.is_none() => match line.context("reading stdin")? {
                Some(line) => socket.send_text(&line).await?,
                None => {
                    socket.start_close(Some(CloseFrame::new(CloseCode::NORMAL, ""))).await?;
                    closing = Some(Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
                }
            },
            () = async { closing.as_mut().expect("guarded").await }, if closing.is_some() => {
                anyhow::bail!("the server did not answer the close frame within {CLOSE_TIMEOUT:?}");
            }
            received = socket.recv() => match received.context("connection failed")? {
                Some(message) => print_message(&mut stdout, &message)?,
                None => {
                    let why = socket
                        .peer_close()
                        .map_or_else(|| "without a code".to_owned(), |f| format!("with {} {}", f.code, f.reason));
                    tracing::info!("server closed the connection {why}");
                    return Ok(());
                }
            },
        }
    }
}

fn print_message(out: &mut impl Write, message: &Message) -> anyhow::Result<()> {
    match message {
        Message::Text(text) => writeln!(out, "{}", text.replace('\n', "\\n"))?,
        Message::Binary(data) => {
            write!(out, "[binary {} bytes] ", data.len())?;
            for byte in data.iter() {
                write!(out, "{byte:02x}")?;
            }
            writeln!(out)?;
        }
        _ => {}
    }
    out.flush()?;
    Ok(())
}
