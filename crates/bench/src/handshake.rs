//! `switchboard bench handshake`: new WebSocket connections per second. Each of a few
//! concurrent loops connects (TCP + upgrade), then hangs up, again and again; the figure
//! is completed handshakes per second, sampled every second after a warm-up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use switchboard_net::{connect, ClientOptions};

#[derive(Debug, Clone, Args)]
pub(crate) struct HandshakeArgs {
    /// ws:// URL to connect to, such as ws://127.0.0.1:8080/echo
    url: String,
    /// Loops connecting at the same time.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of warm-up before sampling.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// One-second samples.
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// Source addresses to spread the connections over (127.0.0.1 up to 127.0.0.N).
    #[arg(long, default_value_t = 8)]
    source_addrs: u8,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HandshakeResult {
    /// Completed handshakes per second: median, lowest and highest sample.
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) async fn handshake_load(args: &HandshakeArgs) -> anyhow::Result<HandshakeResult> {
    super::raise_fd_limit();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut options = ClientOptions::default();
    options.config = options.config.with_deflate(None);
    let mut tasks = Vec::new();
    for lane in 0..args.concurrency.max(1) {
        let (url, done, stop, spread) = (
            args.url.clone(),
            done.clone(),
            stop.clone(),
            args.source_addrs,
        );
        let mut options = options.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = lane;
            while !stop.load(Ordering::Relaxed) {
                options.local_address = super::source_address(i, spread);
                let connected = connect(&url, options.clone())
                    .await
                    .with_context(|| format!("connecting to {url}"))?;
                done.fetch_add(1, Ordering::Relaxed);
                // Hang up at once with a reset: the server sees the connection end, as
                // when a client goes away, and no TIME_WAIT is left to use up ports;
                // the close handshake is not what is measured.
                super::abort(connected.socket);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    let bar = super::progress::bar(args.samples.max(1) as u64, "samples");
    bar.set_message(format!("warming up for {} s", args.warmup));
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    bar.set_message("");
    let rates = super::Samples::take(&done, args.samples, &bar).await;
    bar.finish_and_clear();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.context("a handshake loop panicked")??;
    }
    Ok(HandshakeResult {
        median: rates.median(),
        min: rates.min(),
        max: rates.max(),
    })
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
pub(crate) async fn handshake(args: HandshakeArgs) -> anyhow::Result<()> {
    let result = handshake_load(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "handshakes with {} concurrent loops: median {:.0}/s (min {:.0}, max {:.0}) over {} samples",
            args.concurrency, result.median, result.min, result.max, args.samples
        );
    }
    Ok(())
}
