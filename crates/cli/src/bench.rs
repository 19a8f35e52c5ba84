//! `switchboard bench echo`: a closed-loop echo load. Each connection sends one message
//! and waits for its echo before sending the next; the figure is messages echoed per
//! second, sampled every second after a warm-up, reported as the median and the spread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use switchboard_net::{connect, ClientOptions, Message};

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Closed-loop echo against a server's /echo.
    Echo(EchoArgs),
}

#[derive(Debug, Args)]
struct EchoArgs {
    /// ws:// URL of an echo endpoint.
    url: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 20)]
    size: usize,
    /// Send binary messages instead of text.
    #[arg(long)]
    binary: bool,
    /// Seconds of warm-up before sampling.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Number of one-second samples.
    #[arg(long, default_value_t = 10)]
    samples: usize,
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.workload {
        Workload::Echo(args) => echo(args).await,
    }
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
async fn echo(args: EchoArgs) -> anyhow::Result<()> {
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let message = if args.binary {
        Message::Binary(vec![0x5a; args.size].into())
    } else {
        Message::Text("x".repeat(args.size).into())
    };
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let connected = connect(&args.url, ClientOptions::default())
            .await
            .with_context(|| format!("connecting to {}", args.url))?;
        let mut socket = connected.socket;
        let (counter, stop, message) = (counter.clone(), stop.clone(), message.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                socket.send(&message).await?;
                match socket.recv().await? {
                    Some(_) => counter.fetch_add(1, Ordering::Relaxed),
                    None => anyhow::bail!("server closed the connection"),
                };
            }
            socket.close(None).await?;
            Ok(())
        }));
    }

    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let mut rates = Vec::with_capacity(args.samples);
    let mut last = (Instant::now(), counter.load(Ordering::Relaxed));
    for _ in 0..args.samples {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (Instant::now(), counter.load(Ordering::Relaxed));
        rates.push((now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64());
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await
            .context("load task panicked")?
            .context("load connection failed")?;
    }

    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let (low, high) = (rates[0], rates[rates.len() - 1]);
    let kind = if args.binary { "binary" } else { "text" };
    println!(
        "echo {} connections x {} B {kind}: median {:.0} msg/s (min {:.0}, max {:.0}) over {} samples",
        args.connections, args.size, median, low, high, rates.len()
    );
    Ok(())
}
