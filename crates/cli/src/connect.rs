//! `switchboard connect`: a line-oriented WebSocket client for scripts and conformance.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use switchboard_client::{connect_raw, Event, Options, State};
use switchboard_net::{connect, ClientOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, Args)]
#[command(
    after_help = "Output: each text message is printed as one line, with any newline in it \
written as the two characters \\n. A binary message is printed as `[binary N bytes] HEX`, its \
bytes in lowercase hexadecimal.\n\nExit status: 0 after a clean close; 1 with a one-line reason \
when the connection is refused, the server does not answer 101, or the connection fails."
)]
pub(crate) struct ConnectArgs {
    /// ws:// or wss:// URL to connect to.
    url: String,
    #[command(flatten)]
    ca: crate::tls::CaArg,
    /// Send every received message back with its type unchanged instead of reading stdin.
    #[arg(long)]
    echo: bool,
    /// Reconnect (with backoff) when the connection is lost, instead of exiting.
    #[arg(long, conflicts_with = "echo")]
    reconnect: bool,
    /// Do not offer permessage-deflate compression (offered by default).
    #[arg(long)]
    no_deflate: bool,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
}

fn headers(args: &ConnectArgs) -> anyhow::Result<Vec<(String, String)>> {
    args.headers
        .iter()
        .map(|header| {
            let (name, value) = header
                .split_once(':')
                .with_context(|| format!("header {header:?} is not `Name: value`"))?;
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

pub(crate) async fn run(args: ConnectArgs) -> anyhow::Result<()> {
    if args.echo {
        return echo(&args).await;
    }
    let mut options = Options::default()
        .with_compression(!args.no_deflate)
        .with_reconnect(args.reconnect);
    options = args.ca.apply(options)?;
    for (name, value) in headers(&args)? {
        options = options.with_header(name, value);
    }
    let (client, mut events) = connect_raw(&args.url, options)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = std::io::stdout().lock();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line.context("reading stdin")? {
                Some(line) => client.send_text(line)?,
                None => {
                    // Replies still in flight are printed until the server's Close.
                    stdin_open = false;
                    let closing = client.clone();
                    tokio::spawn(async move { closing.close().await });
                }
            },
            event = events.recv() => match event {
                Some(Event::Text(text)) => {
                    writeln!(stdout, "{}", text.replace('\n', "\\n"))?;
                    stdout.flush()?;
                }
                Some(Event::Binary(data)) => {
                    write!(stdout, "[binary {} bytes] ", data.len())?;
                    for byte in data.iter() {
                        write!(stdout, "{byte:02x}")?;
                    }
                    writeln!(stdout)?;
                    stdout.flush()?;
                }
                Some(Event::State(State::Reconnecting { reason, delay, .. })) => {
                    tracing::warn!("{reason}; reconnecting in {delay:.1?}");
                }
                Some(Event::State(State::Closed { reason, failed })) => {
                    if failed {
                        anyhow::bail!("connection failed: {reason}");
                    }
                    tracing::info!("{reason}");
                    return Ok(());
                }
                Some(_) => {}
                None => return Ok(()),
            },
        }
    }
}

/// `--echo`: every message goes back as it came, before the next one is read. This is
/// the conformance suite's probe of the protocol engine, so it runs on the engine
/// directly: no queue between receiving and answering, no reconnection.
async fn echo(args: &ConnectArgs) -> anyhow::Result<()> {
    let mut options = ClientOptions::default();
    if let Some(tls) = args.ca.tls()? {
        options = options.with_tls(tls);
    }
    if args.no_deflate {
        options.config = options.config.with_deflate(None);
    }
    for (name, value) in headers(args)? {
        options = options.with_header(name, value);
    }
    let mut socket = connect(&args.url, options)
        .await
        .with_context(|| format!("connecting to {}", args.url))?
        .socket;
    loop {
        match socket.recv().await {
            Ok(Some(message)) => socket.feed(&message).await?,
            Ok(None) => return Ok(()),
            // The server is told why (the close frame went out); the run is over.
            Err(error) => return Err(error).context("connection failed"),
        }
    }
}
