//! `switchboard-bench` (also run as `switchboard bench`): load generators that print
//! figures. A crate of its own, so the product links nothing only the benchmarks need.
//!
//! `echo` is a closed-loop echo load: each connection sends one message and waits for its
//! echo before sending the next; the figure is messages echoed per second, sampled every
//! second after a warm-up, reported as the median and the spread. With `--rate` the same
//! loop is paced to a fixed offered rate and, given `--server-pid`, reports the server's
//! CPU time per message. `compare` runs these cells against peer servers side by side.

mod centrifuge;
mod chart;
mod compare;
mod fanout;
mod handshake;
mod progress;
mod soak;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use switchboard_net::{connect, ClientOptions, Message};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "switchboard-bench",
    version,
    about = "Load Switchboard (and peer servers) and print figures"
)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, global = true, env = "SWITCHBOARD_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    workload: Workload,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(cli.log.as_deref().unwrap_or("warn"))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("switchboard-bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.workload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchboard-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Closed-loop echo against a server's /echo.
    Echo(EchoArgs),
    /// Bytes on the wire for a realistic chat JSON stream, with and without
    /// permessage-deflate (runs the protocol engine in memory; no server needed).
    Compression(CompressionArgs),
    /// Server memory per idle connection: opens connections to /echo and reads the
    /// server's resident memory from /proc before and after.
    Idle(IdleArgs),
    /// Echo cells against Switchboard and peer servers (peers/), side by side: the
    /// server pinned to one core, the load to another; tables, JSON and charts.
    Compare(Box<compare::CompareArgs>),
    /// One room with many subscribers and a publisher at rising rates: publish-to-receive
    /// latency (p50/p99/max) and delivered messages/s per rate, and the highest rate
    /// held under a p99 bound. Also drives a broadcast server or a Pusher-protocol
    /// server (`--target`), to compare.
    Fanout(fanout::FanoutArgs),
    /// New connections per second: loops that connect and hang up.
    Handshake(handshake::HandshakeArgs),
    /// One room: senders post messages (each waits for its acknowledgements, a window at
    /// a time) while receivers read; prints stored messages/s and delivered messages/s.
    /// The server's rate limit must allow the load (`rate_limit_per_sec` in its config).
    Room(RoomArgs),
    /// Many room connections with steady traffic for a set time: the server's memory,
    /// open files and delivery latency every interval, then the drift; fails on any lost,
    /// repeated or unacknowledged message.
    Soak(soak::SoakArgs),
    /// The Centrifugo door: one connection subscribes to many channels (the time, the
    /// server's memory for it), then one publication per channel through the server
    /// API, each checked to arrive. Starts its own servers.
    CentrifugeSubs(centrifuge::SubsArgs),
    /// The Centrifugo door: server memory per idle connection and per subscription
    /// (C connections × K channels, beside C with none and C room-door connections).
    /// Starts its own servers.
    CentrifugeMemory(centrifuge::MemoryArgs),
    /// Fan-out through the Centrifugo door and the room door, fed alike through the HTTP
    /// APIs at a fixed rate, runs interleaved: the server's CPU per delivered message,
    /// the medians and their ratio. Starts its own servers.
    CentrifugeFanout(centrifuge::DoorFanoutArgs),
}

#[derive(Debug, Args)]
struct RoomArgs {
    /// Room URL, such as ws://127.0.0.1:8080/room/bench
    url: String,
    /// Connections that post.
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Connections that only read.
    #[arg(long, default_value_t = 100)]
    receivers: usize,
    /// Messages each sender posts.
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// Unacknowledged messages a sender keeps in flight.
    #[arg(long, default_value_t = 64)]
    window: usize,
}

#[derive(Debug, Args)]
struct CompressionArgs {
    /// Messages in the stream.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
}

#[derive(Debug, Args)]
struct IdleArgs {
    /// ws:// URL of an echo endpoint.
    url: String,
    /// Process id of the server, to read its memory.
    #[arg(long)]
    server_pid: u32,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Do not offer permessage-deflate.
    #[arg(long)]
    no_deflate: bool,
    /// Messages each connection echoes before going idle (a compressed connection
    /// allocates its compressor and decompressor on its first message).
    #[arg(long, default_value_t = 1)]
    messages: usize,
    /// Seconds to wait, connections open and idle, before reading the server's memory
    /// (the server frees idle compressors after `compression_idle_release_secs`).
    #[arg(long, default_value_t = 0.5)]
    wait: f64,
    /// Source addresses to spread the connections over (127.0.0.1 up to 127.0.0.N),
    /// to get past one address's ephemeral ports.
    #[arg(long, default_value_t = 1)]
    source_addrs: u8,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// What one idle run measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct IdleResult {
    pub(crate) connections: usize,
    pub(crate) rss_before_kib: u64,
    pub(crate) rss_after_kib: u64,
    /// Server RSS growth per connection, in KiB.
    pub(crate) kib_per_connection: f64,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct EchoArgs {
    /// ws:// URL of an echo endpoint (with --raw: the host:port of a TCP echo).
    url: String,
    /// Plain TCP, no WebSocket framing: for a raw TCP echo, the ceiling of the machine.
    #[arg(long)]
    raw: bool,
    /// Pace the load to this many messages per second in all (each connection still
    /// waits for its echo): the fixed offered rate at which CPU per message compares.
    #[arg(long)]
    rate: Option<f64>,
    /// Read the server's CPU time from /proc over the samples and report it per message.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
    /// Concurrent connections.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 20)]
    size: usize,
    /// Send binary messages instead of text.
    #[arg(long)]
    binary: bool,
    /// Offer permessage-deflate (off by default, to measure the engine itself).
    #[arg(long)]
    deflate: bool,
    /// Seconds of warm-up before sampling.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Number of one-second samples.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Send exactly this many messages on each connection, then close, instead of
    /// warming up and sampling: a fixed amount of work, for counting instructions.
    #[arg(long)]
    count: Option<u64>,
}

async fn run(workload: Workload) -> anyhow::Result<()> {
    match workload {
        Workload::Echo(args) => echo(args).await,
        Workload::Compression(args) => {
            compression(&args);
            Ok(())
        }
        Workload::Idle(args) => idle(args).await,
        Workload::Room(args) => room(args).await,
        Workload::Fanout(args) => fanout::fanout(args).await,
        Workload::Handshake(args) => handshake::handshake(args).await,
        Workload::Compare(args) => compare::run(*args).await,
        Workload::Soak(args) => soak::soak(args).await,
        Workload::CentrifugeSubs(args) => centrifuge::subs(args).await,
        Workload::CentrifugeMemory(args) => centrifuge::memory(args).await,
        Workload::CentrifugeFanout(args) => centrifuge::door_fanout(args).await,
    }
}

/// What one echo run measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct EchoResult {
    pub(crate) connections: usize,
    pub(crate) size: usize,
    /// Messages echoed per second: median, lowest and highest one-second sample.
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// The server's CPU time per message in microseconds, user and system (with
    /// `--server-pid`), over the sampled seconds.
    pub(crate) user_us: Option<f64>,
    pub(crate) system_us: Option<f64>,
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
async fn echo(args: EchoArgs) -> anyhow::Result<()> {
    let result = echo_load(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let kind = match (args.raw, args.binary, args.deflate) {
        (true, _, _) => "raw TCP",
        (false, true, false) => "binary",
        (false, false, false) => "text",
        (false, true, true) => "binary, deflate",
        (false, false, true) => "text, deflate",
    };
    let paced = args
        .rate
        .map_or_else(String::new, |rate| format!(" paced to {rate:.0} msg/s"));
    println!(
        "echo {} connections x {} B {kind}{paced}: median {:.0} msg/s (min {:.0}, max {:.0}) over {} samples",
        args.connections, args.size, result.median, result.min, result.max, args.samples
    );
    if let (Some(user), Some(system)) = (result.user_us, result.system_us) {
        println!(
            "server CPU per message: {:.2} µs user + {:.2} µs system = {:.2} µs",
            user,
            system,
            user + system
        );
    }
    Ok(())
}

/// The `host:port` of a `ws://host:port/path` URL (or of a bare `host:port`).
fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// A process's CPU time so far: user and system time in clock ticks (10 ms coarse), and
/// the total to the nanosecond from the scheduler's counters of every thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    user: Duration,
    system: Duration,
    total: Duration,
}

impl CpuSample {
    /// CPU time from `earlier` to `self` as (user, system): the precise total, split in
    /// the proportion of the tick counts.
    fn since(&self, earlier: &CpuSample) -> (Duration, Duration) {
        let user = self.user.saturating_sub(earlier.user).as_secs_f64();
        let system = self.system.saturating_sub(earlier.system).as_secs_f64();
        let total = self.total.saturating_sub(earlier.total);
        if user + system <= 0.0 {
            return (Duration::ZERO, total);
        }
        let share = user / (user + system);
        (total.mul_f64(share), total.mul_f64(1.0 - share))
    }
}

/// Reads a process's [`CpuSample`] from `/proc/PID/stat` and `/proc/PID/task/*/schedstat`.
pub(crate) fn process_cpu(pid: u32) -> anyhow::Result<CpuSample> {
    let (user, system) = process_ticks(pid)?;
    let mut total_ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between listing and reading.
        if let Ok(stat) = std::fs::read_to_string(path) {
            total_ns += stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(CpuSample {
        user,
        system,
        total: Duration::from_nanos(total_ns),
    })
}

/// A process's CPU time so far (user, system) in clock ticks, from `/proc/PID/stat`.
fn process_ticks(pid: u32) -> anyhow::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14 and stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .context("short /proc stat line")?
            .parse::<u64>()?)
    };
    let hz = clock_ticks() as f64;
    Ok((
        Duration::from_secs_f64(ticks(11)? as f64 / hz),
        Duration::from_secs_f64(ticks(12)? as f64 / hz),
    ))
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` once (100 on Linux in practice).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// One connection's loop: send, wait for the echo, count; paced when `every` is set.
async fn echo_connection(
    args: &EchoArgs,
    every: Option<Duration>,
    counter: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    start_after: Duration,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut next = tokio::time::Instant::now() + start_after;
    let mut pace = move || {
        let every = every?;
        let at = next;
        next = (next + every).max(tokio::time::Instant::now());
        Some(at)
    };
    // With --count, exactly that many messages; else until the samples are taken.
    let more = |sent: &mut u64| {
        *sent += 1;
        args.count
            .map_or(!stop.load(Ordering::Relaxed), |count| *sent <= count)
    };
    if args.raw {
        let mut stream = tokio::net::TcpStream::connect(host_port(&args.url))
            .await
            .with_context(|| format!("connecting to {}", args.url))?;
        stream.set_nodelay(true)?;
        let message = vec![0x5a; args.size];
        let mut reply = vec![0; args.size];
        let mut sent = 0;
        while more(&mut sent) {
            if let Some(at) = pace() {
                tokio::time::sleep_until(at).await;
            }
            stream.write_all(&message).await?;
            stream.read_exact(&mut reply).await?;
            counter.fetch_add(1, Ordering::Relaxed);
        }
        return Ok(());
    }
    let message = if args.binary {
        Message::Binary(vec![0x5a; args.size].into())
    } else {
        Message::Text("x".repeat(args.size).into())
    };
    let mut options = ClientOptions::default();
    if !args.deflate {
        options.config = options.config.with_deflate(None);
    }
    let mut socket = connect(&args.url, options)
        .await
        .with_context(|| format!("connecting to {}", args.url))?
        .socket;
    let mut sent = 0;
    while more(&mut sent) {
        if let Some(at) = pace() {
            tokio::time::sleep_until(at).await;
        }
        socket.send(&message).await?;
        match socket.recv().await? {
            Some(_) => counter.fetch_add(1, Ordering::Relaxed),
            None => anyhow::bail!("server closed the connection"),
        };
    }
    if args.count.is_some() {
        // A counted load ends at once: a slow server (under valgrind) is not kept
        // waiting on, nor waited for in, a close handshake.
        abort(socket);
    } else {
        socket.close(None).await?;
    }
    Ok(())
}

pub(crate) async fn echo_load(args: &EchoArgs) -> anyhow::Result<EchoResult> {
    let args = Arc::new(args.clone());
    let counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let every = args
        .rate
        .filter(|rate| *rate > 0.0)
        .map(|rate| Duration::from_secs_f64(args.connections as f64 / rate));
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        // Paced connections start spread over one interval, not all at once.
        let offset = every.map_or(Duration::ZERO, |every| {
            every.mul_f64(i as f64 / args.connections as f64)
        });
        let (args, counter, stop) = (args.clone(), counter.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            echo_connection(&args, every, counter, stop, offset).await
        }));
    }

    if let Some(count) = args.count {
        let started = Instant::now();
        let bar = progress::bar(count * args.connections as u64, "messages");
        progress::follow(&bar, counter.clone());
        for task in tasks {
            task.await
                .context("load task panicked")?
                .context("load connection failed")?;
        }
        let rate = (count * args.connections as u64) as f64 / started.elapsed().as_secs_f64();
        return Ok(EchoResult {
            connections: args.connections,
            size: args.size,
            median: rate,
            min: rate,
            max: rate,
            user_us: None,
            system_us: None,
        });
    }
    let bar = progress::bar(args.samples.max(1) as u64, "samples");
    bar.set_message(format!("warming up for {} s", args.warmup));
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    bar.set_message("");
    let cpu_before = args.server_pid.map(process_cpu).transpose()?;
    let rates = Samples::take(&counter, args.samples, &bar).await;
    bar.finish_and_clear();
    let cpu_after = args.server_pid.map(process_cpu).transpose()?;
    let messages = rates.total.max(1) as f64;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await
            .context("load task panicked")?
            .context("load connection failed")?;
    }

    let (user_us, system_us) = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => {
            let (user, system) = after.since(&before);
            let per_message = |d: Duration| d.as_secs_f64() * 1e6 / messages;
            (Some(per_message(user)), Some(per_message(system)))
        }
        _ => (None, None),
    };
    Ok(EchoResult {
        connections: args.connections,
        size: args.size,
        median: rates.median(),
        min: rates.min(),
        max: rates.max(),
        user_us,
        system_us,
    })
}

/// One-second samples of how fast a counter grows.
pub(crate) struct Samples {
    /// Per-second rates, lowest first.
    sorted: Vec<f64>,
    /// How much the counter grew over all the samples.
    total: u64,
}

impl Samples {
    /// Samples `counter` once a second, `samples` times (at least once), counting the
    /// samples on `bar` with the latest rate as its message.
    pub(crate) async fn take(
        counter: &AtomicU64,
        samples: usize,
        bar: &indicatif::ProgressBar,
    ) -> Self {
        let first = counter.load(Ordering::Relaxed);
        let mut last = (Instant::now(), first);
        let mut sorted = Vec::with_capacity(samples.max(1));
        for _ in 0..samples.max(1) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = (Instant::now(), counter.load(Ordering::Relaxed));
            let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
            sorted.push(rate);
            bar.inc(1);
            bar.set_message(format!("{} per second", compare::thousands(rate)));
            last = now;
        }
        sorted.sort_by(f64::total_cmp);
        Self {
            sorted,
            total: last.1 - first,
        }
    }

    pub(crate) fn median(&self) -> f64 {
        self.sorted[self.sorted.len() / 2]
    }

    pub(crate) fn min(&self) -> f64 {
        self.sorted[0]
    }

    pub(crate) fn max(&self) -> f64 {
        self.sorted[self.sorted.len() - 1]
    }
}

/// A deterministic chat stream: the room events a server sends, with varied text.
pub(crate) fn chat_stream(count: usize) -> Vec<String> {
    const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];
    const WORDS: [&str; 40] = [
        "hey",
        "hi",
        "everyone",
        "the",
        "build",
        "is",
        "green",
        "again",
        "can",
        "you",
        "review",
        "my",
        "pull",
        "request",
        "lunch",
        "at",
        "noon",
        "?",
        "sure",
        "thanks",
        "deploying",
        "now",
        "looks",
        "good",
        "to",
        "me",
        "meeting",
        "moved",
        "3pm",
        "coffee",
        "anyone",
        "fixed",
        "bug",
        "in",
        "login",
        "page",
        "ok",
        "lol",
        "great",
        "work",
    ];
    let mut seed: u64 = 0x5eed;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..count)
        .map(|i| {
            let from = USERS[(next() % USERS.len() as u64) as usize];
            let words = 2 + next() % 14;
            let text: Vec<&str> = (0..words).map(|_| WORDS[(next() % WORDS.len() as u64) as usize]).collect();
            let millis = 1_000 + i as u64 * 1_700 + next() % 1_000;
            format!(
                r#"{{"type":"message","id":{},"room":"lobby","from":"{from}","text":"{}","timestamp":"2026-11-23T10:{:02}:{:02}.{:03}Z","nonce":"c-{}"}}"#,
                i + 1,
                text.join(" "),
                (millis / 60_000) % 60,
                (millis / 1000) % 60,
                millis % 1000,
                next() % 100_000,
            )
        })
        .collect()
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
fn compression(args: &CompressionArgs) {
    use switchboard_net::wire::deflate::{DeflateConfig, DeflateParams};
    use switchboard_net::wire::{Config, Connection};

    let stream = chat_stream(args.messages);
    let payload: usize = stream.iter().map(String::len).sum();
    let wire_bytes = |conn: Option<(DeflateParams, DeflateConfig)>| {
        let mut server = Connection::server(Config::default());
        if let Some((params, config)) = conn {
            server = server.with_deflate(params, &config);
        }
        let mut total = 0;
        for message in &stream {
            server.send_text(message).expect("open connection");
            total += server.take_output().len();
        }
        total
    };
    let plain = wire_bytes(None);
    println!(
        "{} chat messages, {} bytes of JSON, average {} bytes",
        stream.len(),
        payload,
        payload / stream.len()
    );
    println!("| setting | bytes on the wire | of uncompressed | saved |");
    println!("|---|---:|---:|---:|");
    println!("| no compression | {plain} | 100.0% | 0.0% |");
    let takeover = DeflateParams::default();
    let no_takeover = DeflateParams {
        server_no_context_takeover: true,
        ..DeflateParams::default()
    };
    for (label, params, level, bits) in [
        ("deflate, context takeover, level 1", takeover, 1, 15),
        (
            "deflate, context takeover, level 3 (default)",
            takeover,
            3,
            15,
        ),
        ("deflate, context takeover, level 6", takeover, 6, 15),
        (
            "deflate, context takeover, level 3, 10-bit window",
            takeover,
            3,
            10,
        ),
        ("deflate, no context takeover, level 3", no_takeover, 3, 15),
    ] {
        let config = DeflateConfig::default()
            .with_level(level)
            .with_max_window_bits(bits);
        let bytes = wire_bytes(Some((params, config)));
        let share = 100.0 * bytes as f64 / plain as f64;
        println!(
            "| {label} | {bytes} | {share:.1}% | {:.1}% |",
            100.0 - share
        );
    }
}

pub(crate) fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// Raises this process's open-file limit to its hard limit and returns it.
pub(crate) fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return hard;
        }
    }
    limit.current.unwrap_or(1024)
}

/// Runs `open(i)` for each `i` in `0..count`, a few dozen at a time (a listen backlog
/// is finite), and returns what they opened, in the order they finished.
pub(crate) async fn open_many<T, Fut>(
    count: usize,
    open: impl Fn(usize) -> Fut,
) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut opened = Vec::with_capacity(count);
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..count {
        if opening.len() >= 64 {
            opened.push(opening.join_next().await.expect("non-empty")??);
        }
        opening.spawn(open(i));
    }
    while let Some(done) = opening.join_next().await {
        opened.push(done??);
    }
    Ok(opened)
}

/// Drops a connection with a TCP reset, so it leaves no TIME_WAIT behind (a load that
/// opens tens of thousands would otherwise use up the ephemeral ports of later runs).
pub(crate) fn abort(socket: switchboard_net::WebSocket<switchboard_net::Stream>) {
    // Without the option the drop still closes, only more slowly for the ports.
    if let Some(tcp) = socket.get_ref().tcp() {
        let _ = tcp.set_zero_linger();
    }
    drop(socket);
}

/// The source address for connection `i` of a load spread over `spread` addresses.
pub(crate) fn source_address(i: usize, spread: u8) -> Option<std::net::IpAddr> {
    (spread > 1)
        .then(|| std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(spread)) as u8).into())
}

async fn idle_load(args: &IdleArgs) -> anyhow::Result<IdleResult> {
    let limit = raise_fd_limit();
    if args.connections as u64 + 64 > limit {
        anyhow::bail!(
            "{} connections need more open files than this process may have ({limit}; the \
             hard limit is set outside, by `ulimit -Hn` or the service manager)",
            args.connections
        );
    }
    let mut options = ClientOptions::default();
    if args.no_deflate {
        options.config = options.config.with_deflate(None);
    }
    let stream = Arc::new(chat_stream(args.messages.max(1)));
    let before = resident_kib(args.server_pid)?;
    let opening = progress::bar(args.connections as u64, "connections");
    let sockets = open_many(args.connections, |i| {
        let (url, stream, messages) = (args.url.clone(), stream.clone(), args.messages);
        let mut options = options.clone();
        options.local_address = source_address(i, args.source_addrs);
        let opening = opening.clone();
        async move {
            let mut socket = connect(&url, options).await?.socket;
            for message in stream.iter().take(messages) {
                socket.send_text(message).await?;
                socket.recv().await?.context("server closed")?;
            }
            opening.inc(1);
            anyhow::Ok(socket)
        }
    })
    .await?;
    opening.finish_and_clear();
    let idle = progress::timed(Duration::from_secs_f64(args.wait));
    idle.set_message("idle, then the server's memory is read");
    tokio::time::sleep(Duration::from_secs_f64(args.wait)).await;
    idle.finish_and_clear();
    let after = resident_kib(args.server_pid)?;
    let result = IdleResult {
        connections: args.connections,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_connection: after.saturating_sub(before) as f64 / args.connections as f64,
    };
    // Hang up without waiting for every close handshake: the figure is taken.
    for socket in sockets {
        abort(socket);
    }
    Ok(result)
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let result = idle_load(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let mode = if args.no_deflate {
        "without deflate"
    } else {
        "with deflate"
    };
    println!(
        "{} connections {mode}, {} message(s) each, read after {}s idle: server RSS {} KiB -> {} KiB, {:.1} KiB per connection",
        args.connections, args.messages, args.wait, result.rss_before_kib, result.rss_after_kib, result.kib_per_connection
    );
    Ok(())
}

fn room_url(base: &str, name: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}name={name}")
}

/// Counts the chat messages a connection receives until it has seen `until` of them.
async fn count_messages(
    socket: &mut switchboard_net::WebSocket<switchboard_net::Stream>,
    until: usize,
) -> anyhow::Result<usize> {
    let mut seen = 0;
    while seen < until {
        match socket.recv().await? {
            Some(Message::Text(text)) if text.as_str().starts_with(r#"{"type":"message""#) => {
                seen += 1
            }
            Some(_) => {}
            None => anyhow::bail!("the server closed a receiver"),
        }
    }
    Ok(seen)
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
async fn room(args: RoomArgs) -> anyhow::Result<()> {
    let total = args.senders * args.messages;
    let mut options = ClientOptions::default();
    options.config = options.config.with_deflate(None);
    let mut receivers = Vec::with_capacity(args.receivers);
    for i in 0..args.receivers {
        let socket = connect(&room_url(&args.url, &format!("reader{i}")), options.clone())
            .await?
            .socket;
        receivers.push(socket);
    }
    let mut senders = Vec::with_capacity(args.senders);
    for i in 0..args.senders {
        let socket = connect(&room_url(&args.url, &format!("writer{i}")), options.clone())
            .await?
            .socket;
        senders.push(socket);
    }
    let started = Instant::now();
    let reading: Vec<_> = receivers
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                count_messages(&mut socket, total)
                    .await
                    .map(|n| (n, Instant::now()))
            })
        })
        .collect();
    let writing: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut socket)| {
            let (messages, window) = (args.messages, args.window.max(1));
            tokio::spawn(async move {
                let me = format!(r#""from":"writer{i}""#);
                let (mut sent, mut acked) = (0, 0);
                while acked < messages {
                    while sent < messages && sent - acked < window {
                        let text = format!(r#"{{"type":"message","text":"load {i} {sent} lorem ipsum dolor sit amet"}}"#);
                        socket.feed(&Message::Text(text.into())).await?;
                        sent += 1;
                    }
                    socket.flush().await?;
                    match socket.recv().await? {
                        Some(Message::Text(text)) if text.as_str().contains(&me) => acked += 1,
                        Some(_) => {}
                        None => anyhow::bail!("the server closed a sender"),
                    }
                }
                Ok::<_, anyhow::Error>((acked, Instant::now(), socket))
            })
        })
        .collect();
    let mut stored_at = started;
    let mut sockets = Vec::new();
    for task in writing {
        let (_, done, socket) = task.await.context("sender panicked")??;
        stored_at = stored_at.max(done);
        sockets.push(socket);
    }
    let mut delivered = 0;
    let mut delivered_at = started;
    for task in reading {
        let (n, done) = task.await.context("receiver panicked")??;
        delivered += n;
        delivered_at = delivered_at.max(done);
    }
    let stored_secs = (stored_at - started).as_secs_f64();
    let delivered_secs = (delivered_at - started).as_secs_f64();
    println!(
        "room: {} senders x {} messages (window {}), {} receivers",
        args.senders, args.messages, args.window, args.receivers
    );
    println!(
        "stored and acknowledged: {total} messages in {stored_secs:.2} s = {:.0} msg/s",
        total as f64 / stored_secs
    );
    println!(
        "delivered to receivers:  {delivered} messages in {delivered_secs:.2} s = {:.0} msg/s",
        delivered as f64 / delivered_secs
    );
    for mut socket in sockets {
        socket.close(None).await?;
    }
    Ok(())
}
