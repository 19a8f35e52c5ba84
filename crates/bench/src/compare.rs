//! `switchboard bench compare`: the echo cells against Switchboard and peer servers on
//! other engines (peers/), one after another on the same machine: each server pinned to
//! one core, the load (`switchboard bench echo`, the same client for all) to another.
//!
//! Echo runs two passes: closed-loop throughput per cell, then the server's CPU time per
//! message at a fixed offered rate below every server's maximum (half the slowest
//! one's), the figure that ranks engines when the load generator is the ceiling. The
//! instructions part counts, under callgrind, the server's user-space instructions per
//! echoed message (two counted loads on one server, the difference divided by the
//! messages between them): repeatable whatever else the machine does. Then
//! fan-out (one room or channel, rising publish rates; Switchboard, Sockudo and a
//! tokio-tungstenite broadcast server), server memory per idle connection, and new
//! connections per second.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::fanout::FanoutResult;
use super::handshake::HandshakeResult;
use super::{EchoResult, IdleResult};

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// The peer servers' binary; build it with
    /// `cargo build --release --manifest-path peers/Cargo.toml`.
    #[arg(long, default_value = "peers/target/release/switchboard-peers")]
    peers: PathBuf,
    /// The `switchboard` binary to measure [default: the one beside this binary]
    #[arg(long)]
    switchboard: Option<PathBuf>,
    /// Servers to compare, in this order: `switchboard` and the peers' engines.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "switchboard,raw,fastwebsockets,tokio-websockets,sockudo-ws,tungstenite"
    )]
    engines: Vec<String>,
    /// A short run for CI: two echo cells (1 s of warm-up, 2 samples), instructions in
    /// the first cell only, fan-out to 1,000
    /// subscribers at three rates, 1,000 idle connections, 2 handshake samples.
    #[arg(long)]
    quick: bool,
    /// Seconds of warm-up per cell.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// One-second samples per cell.
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// The core the server runs on.
    #[arg(long, default_value_t = 0)]
    server_core: usize,
    /// The core the load runs on.
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// Skip the fixed-rate CPU pass.
    #[arg(long)]
    no_cpu: bool,
    /// Parts to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "echo,instructions,fanout,idle,handshake"
    )]
    parts: Vec<Part>,
    /// Servers for the fan-out part.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "switchboard,switchboard-pusher,sockudo,tungstenite-broadcast"
    )]
    fanout_engines: Vec<String>,
    /// Subscribers per fan-out cell.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    subscribers: Vec<usize>,
    /// The p99 latency bound of the fan-out part, in milliseconds. One message to 10k
    /// loopback subscribers takes 75-200 ms to reach them all on a 2-core machine, for
    /// every server, so a tighter bound holds no rate there.
    #[arg(long, default_value_t = 250.0)]
    p99_bound_ms: f64,
    /// The Sockudo server (`cargo install sockudo --locked`); looked up on PATH and in
    /// ~/.cargo/bin.
    #[arg(long, default_value = "sockudo")]
    sockudo: PathBuf,
    /// Idle connections per idle cell (each server and the load hold one file each).
    #[arg(long, value_delimiter = ',', default_value = "10000,19000")]
    idle_connections: Vec<usize>,
    /// Seconds idle connections wait before the server's memory is read.
    #[arg(long, default_value_t = 12.0)]
    idle_wait: f64,
    /// Where compare.md, compare.json and compare.svg go.
    #[arg(long, default_value = "reports/bench")]
    out: PathBuf,
}

/// Connections × message bytes.
const CELLS: [(usize, usize); 5] = [
    (100, 20),
    (500, 1024),
    (10, 16384),
    (200, 16384),
    (500, 16384),
];
const QUICK_CELLS: [(usize, usize); 2] = [(100, 20), (200, 16384)];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Echo,
    /// The server's instructions per echoed message, counted by callgrind.
    Instructions,
    Fanout,
    Idle,
    Handshake,
}

/// The engines that are neither Switchboard nor the raw TCP ceiling.
fn is_peer(engine: &str) -> bool {
    !is_ours(engine) && engine != "raw"
}

/// Switchboard through one of its doors: `switchboard` (rooms), `switchboard-pusher`.
fn is_ours(engine: &str) -> bool {
    engine == "switchboard" || engine.starts_with("switchboard-")
}

fn cell_name((connections, size): (usize, usize)) -> String {
    if size >= 1024 && size % 1024 == 0 {
        format!("{connections} × {} KiB", size / 1024)
    } else {
        format!("{connections} × {size} B")
    }
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    settings: String,
    cells: Vec<String>,
    engines: Vec<String>,
    /// engine → cell → closed-loop result.
    throughput: BTreeMap<String, BTreeMap<String, EchoResult>>,
    /// cell → the fixed rate of the CPU pass.
    rates: BTreeMap<String, f64>,
    /// engine → cell → result at the fixed rate (with CPU per message).
    cpu: BTreeMap<String, BTreeMap<String, EchoResult>>,
    /// engine → cell → server instructions per echoed message (callgrind).
    instructions: BTreeMap<String, BTreeMap<String, f64>>,
    /// engine → subscribers → fan-out steps.
    fanout: BTreeMap<String, BTreeMap<usize, FanoutResult>>,
    fanout_engines: Vec<String>,
    /// engine → connections → idle memory.
    idle: BTreeMap<String, BTreeMap<usize, IdleResult>>,
    /// engine → new connections per second.
    handshake: BTreeMap<String, HandshakeResult>,
}

/// A server under test, pinned to its core.
pub(crate) struct Server {
    child: Child,
    pub(crate) address: String,
}

impl Server {
    async fn start(args: &CompareArgs, engine: &str) -> anyhow::Result<Self> {
        Self::start_under(args, engine, &[]).await
    }

    /// Starts the server through `wrapper` (a program and its arguments, e.g. valgrind).
    async fn start_under(
        args: &CompareArgs,
        engine: &str,
        wrapper: &[String],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new("taskset");
        command.args(["-c", &args.server_core.to_string()]);
        command.args(wrapper);
        if engine == "sockudo" {
            return Self::start_sockudo(args, command).await;
        }
        if is_ours(engine) {
            let me = switchboard_binary(args)?;
            // Rooms limit each connection's rate; the fan-out publisher needs more. Every
            // load comes from loopback, so the limits per address are off (the peers
            // have none).
            let config = args.out.join("switchboard-bench.toml");
            std::fs::create_dir_all(&args.out)?;
            std::fs::write(
                &config,
                "rate_limit_per_sec = 1000000000.0\nrate_limit_burst = 1000000000\n\
                 max_connections_per_ip = 0\nhandshakes_per_ip_per_sec = 0.0\n",
            )?;
            command.arg(me).args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--memory",
                "--workers",
                "1",
            ]);
            command.arg("--config").arg(config);
        } else {
            command
                .arg(&args.peers)
                .args([engine, "--listen", "127.0.0.1:0", "--workers", "1"]);
        }
        Self::spawn(command, engine).await
    }

    /// Starts `command`, a server that says `listening on ADDRESS` on stderr, and waits
    /// until it does.
    pub(crate) async fn spawn(mut command: Command, engine: &str) -> anyhow::Result<Self> {
        let mut child = command
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {engine} server (is taskset installed?)"))?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        // Under valgrind a server takes some seconds to start.
        let address = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some((_, rest)) = line.split_once("listening on ") {
                    let rest = rest.trim();
                    return Ok(rest.strip_prefix("http://").unwrap_or(rest).to_owned());
                }
            }
            bail!("the {engine} server exited before listening")
        })
        .await
        .with_context(|| format!("the {engine} server did not start"))??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, address })
    }

    /// Sockudo, as configured for a benchmark: memory drivers, one app, no metrics. It
    /// is ready once its port accepts connections.
    async fn start_sockudo(args: &CompareArgs, mut command: Command) -> anyhow::Result<Self> {
        let binary = sockudo_binary(&args.sockudo).with_context(|| {
            format!(
                "no Sockudo server at {} (install it with `cargo install sockudo --locked`, \
                 or leave it out with --fanout-engines)",
                args.sockudo.display()
            )
        })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        command
            .arg(binary)
            .envs([
                ("HOST", "127.0.0.1"),
                ("PORT", &port.to_string()),
                ("QUEUE_DRIVER", "memory"),
                ("ADAPTER_DRIVER", "local"),
                ("CACHE_DRIVER", "memory"),
                ("APP_MANAGER_DRIVER", "memory"),
                ("METRICS_ENABLED", "false"),
                ("SOCKUDO_DEFAULT_APP_ID", "app-id"),
                ("SOCKUDO_DEFAULT_APP_KEY", "app-key"),
                ("SOCKUDO_DEFAULT_APP_SECRET", "app-secret"),
                ("RATE_LIMITER_ENABLED", "false"),
                ("SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS", "1000000"),
                (
                    "SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND",
                    "1000000",
                ),
                ("RUST_LOG", "error"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = command.spawn().context("starting Sockudo")?;
        let address = format!("127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                return Ok(Self { child, address });
            }
            if let Some(status) = child.try_wait()? {
                bail!("Sockudo exited before listening: {status}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("Sockudo did not listen on {address} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the server exited")
    }

    pub(crate) async fn stop(mut self) {
        // The numbers are taken; how it exits does not matter.
        let _ = self.child.kill().await;
    }
}

/// How an echo load is driven.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Closed loop, as fast as the server answers; warm-up and samples.
    Closed,
    /// At a fixed offered rate in all, reading the server's CPU time.
    Rate(f64),
    /// Exactly this many messages per connection, then done.
    Count(u64),
}

/// The server binary measured: `--switchboard`, else `switchboard` beside this one.
fn switchboard_binary(args: &CompareArgs) -> anyhow::Result<PathBuf> {
    match &args.switchboard {
        Some(path) => Ok(path.clone()),
        None => Ok(std::env::current_exe()?.with_file_name("switchboard")),
    }
}

/// Runs one cell's load (`switchboard-bench echo --json`) pinned to the load core.
async fn load(
    args: &CompareArgs,
    engine: &str,
    server: &Server,
    cell: (usize, usize),
    pace: Pace,
) -> anyhow::Result<EchoResult> {
    let (warmup, samples) = if args.quick {
        (1, 2)
    } else {
        (args.warmup, args.samples)
    };
    let me = std::env::current_exe()?;
    let mut command = Command::new("taskset");
    command
        .args(["-c", &args.load_core.to_string()])
        .arg(me)
        .args(["echo", &format!("ws://{}/echo", server.address)])
        .args(["--connections", &cell.0.to_string()])
        .args(["--size", &cell.1.to_string()])
        .args(["--warmup", &warmup.to_string()])
        .args(["--samples", &samples.to_string()])
        .arg("--json");
    if engine == "raw" {
        command.arg("--raw");
    }
    match pace {
        Pace::Closed => {}
        Pace::Rate(rate) => {
            command
                .args(["--rate", &format!("{rate:.0}")])
                .args(["--server-pid", &server.pid()?.to_string()]);
        }
        Pace::Count(count) => {
            command.args(["--count", &count.to_string()]);
        }
    }
    let output = command.output().await?;
    if !output.status.success() {
        bail!(
            "{engine} {}: {}",
            cell_name(cell),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The Sockudo binary: the path given, else on PATH, else in ~/.cargo/bin.
fn sockudo_binary(given: &std::path::Path) -> Option<PathBuf> {
    if given.components().count() > 1 {
        return given.exists().then(|| given.to_owned());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>());
    let cargo_bin = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin"));
    on_path
        .chain(cargo_bin)
        .map(|dir| dir.join(given))
        .find(|candidate| candidate.is_file())
}

/// Starts `engine` afresh, runs `switchboard-bench ARGS --json` against it pinned to
/// the load core (the arguments made from the running server), stops the server and
/// parses the load's answer.
async fn on_fresh_server<T: serde::de::DeserializeOwned>(
    args: &CompareArgs,
    engine: &str,
    what: &str,
    bench_args: impl FnOnce(&Server) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<T> {
    let server = Server::start(args, engine).await?;
    let result = match bench_args(&server) {
        Ok(bench_args) => load_json(args, what, &bench_args).await,
        Err(failed) => Err(failed),
    };
    server.stop().await;
    result
}

/// Runs `switchboard-bench ARGS --json` pinned to the load core and parses its answer.
async fn load_json<T: serde::de::DeserializeOwned>(
    args: &CompareArgs,
    what: &str,
    bench_args: &[String],
) -> anyhow::Result<T> {
    let output = Command::new("taskset")
        .args(["-c", &args.load_core.to_string()])
        .arg(std::env::current_exe()?)
        .args(bench_args)
        .arg("--json")
        .stderr(Stdio::piped())
        .output()
        .await?;
    if !output.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("{what}: reading its figures"))
}

/// Where each fan-out engine is subscribed to, and how it is spoken to.
fn fanout_target(engine: &str, address: &str) -> (String, &'static str) {
    match engine {
        "switchboard" => (format!("ws://{address}/room/bench"), "switchboard"),
        // The Pusher door's open-mode app has the same key (and id 1).
        "sockudo" | "switchboard-pusher" => {
            (format!("ws://{address}/app/app-key?protocol=7"), "pusher")
        }
        _ => (format!("ws://{address}/"), "broadcast"),
    }
}

fn echo_url(engine: &str, address: &str) -> String {
    match engine {
        "switchboard" => format!("ws://{address}/echo"),
        _ => format!("ws://{address}/"),
    }
}

async fn run_fanout(args: &CompareArgs, report: &mut Report) -> anyhow::Result<()> {
    let subscribers: Vec<usize> = if args.quick {
        vec![1000]
    } else {
        args.subscribers.clone()
    };
    let rates = if args.quick {
        "10,100,1000"
    } else {
        "1,2,5,10,20,50,100,200,500,1000,2000,5000"
    };
    let step_secs = if args.quick { "1" } else { "3" };
    for engine in &report.fanout_engines.clone() {
        for &count in &subscribers {
            let what = format!("{engine} fan-out to {count}");
            let result: FanoutResult = on_fresh_server(args, engine, &what, |server| {
                let (url, target) = fanout_target(engine, &server.address);
                Ok([
                    "fanout",
                    &url,
                    "--target",
                    target,
                    "--subscribers",
                    &count.to_string(),
                    "--rates",
                    rates,
                    "--step-secs",
                    step_secs,
                    "--p99-bound-ms",
                    &args.p99_bound_ms.to_string(),
                    // The Pusher door's open-mode app is id 1.
                    "--app-id",
                    if engine == "switchboard-pusher" {
                        "1"
                    } else {
                        "app-id"
                    },
                ]
                .map(String::from)
                .to_vec())
            })
            .await?;
            let best = result.best_held();
            eprintln!(
                "fan-out {engine:>22} {count:>6} subscribers: {} delivered msg/s held (publish {} msg/s)",
                best.map_or_else(|| "none".into(), |b| thousands(b.delivered_per_sec)),
                best.map_or_else(|| "–".into(), |b| b.rate.to_string()),
            );
            report
                .fanout
                .entry(engine.clone())
                .or_default()
                .insert(count, result);
        }
    }
    Ok(())
}

async fn run_idle(args: &CompareArgs, report: &mut Report) -> anyhow::Result<()> {
    let counts: Vec<usize> = if args.quick {
        vec![1000]
    } else {
        args.idle_connections.clone()
    };
    let wait = if args.quick { 1.0 } else { args.idle_wait };
    for engine in args.engines.iter().filter(|e| *e != "raw") {
        for &count in &counts {
            let what = format!("{engine} idle {count}");
            let result: IdleResult = on_fresh_server(args, engine, &what, |server| {
                Ok(vec![
                    "idle".into(),
                    echo_url(engine, &server.address),
                    "--server-pid".into(),
                    server.pid()?.to_string(),
                    "--connections".into(),
                    count.to_string(),
                    "--no-deflate".into(),
                    "--wait".into(),
                    wait.to_string(),
                    "--source-addrs".into(),
                    "8".into(),
                ])
            })
            .await?;
            eprintln!(
                "idle {engine:>16} {count:>6} connections: {:.2} KiB each",
                result.kib_per_connection
            );
            report
                .idle
                .entry(engine.clone())
                .or_default()
                .insert(count, result);
        }
    }
    Ok(())
}

async fn run_handshake(args: &CompareArgs, report: &mut Report) -> anyhow::Result<()> {
    let samples = if args.quick { "2" } else { "5" };
    for engine in args.engines.iter().filter(|e| *e != "raw") {
        let what = format!("{engine} handshakes");
        let result: HandshakeResult = on_fresh_server(args, engine, &what, |server| {
            Ok(vec![
                "handshake".into(),
                echo_url(engine, &server.address),
                "--samples".into(),
                samples.into(),
            ])
        })
        .await?;
        eprintln!(
            "handshakes {engine:>16}: {} new connections/s",
            thousands(result.median)
        );
        report.handshake.insert(engine.clone(), result);
    }
    Ok(())
}

pub(crate) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// Progress on stderr, the table on stdout: this command's output.
#[allow(clippy::print_stdout)]
pub(crate) async fn run(args: CompareArgs) -> anyhow::Result<()> {
    let cells: Vec<(usize, usize)> = if args.quick {
        QUICK_CELLS.to_vec()
    } else {
        CELLS.to_vec()
    };
    if args.engines.iter().any(|e| !is_ours(e)) && !args.peers.exists() {
        bail!(
            "no peer servers at {}: build them with `cargo build --release --manifest-path \
             peers/Cargo.toml`, or pass --peers",
            args.peers.display()
        );
    }
    let mut report = Report {
        machine: machine(),
        settings: format!(
            "server on core {} (1 worker), load on core {}; {} s warm-up, {} one-second samples per cell",
            args.server_core,
            args.load_core,
            if args.quick { 1 } else { args.warmup },
            if args.quick { 2 } else { args.samples },
        ),
        cells: cells.iter().map(|c| cell_name(*c)).collect(),
        engines: args.engines.clone(),
        throughput: BTreeMap::new(),
        rates: BTreeMap::new(),
        cpu: BTreeMap::new(),
        instructions: BTreeMap::new(),
        fanout: BTreeMap::new(),
        fanout_engines: if args.parts.contains(&Part::Fanout) {
            fanout_engines(&args)?
        } else {
            Vec::new()
        },
        idle: BTreeMap::new(),
        handshake: BTreeMap::new(),
    };
    if args.parts.contains(&Part::Echo) {
        run_echo(&args, &cells, &mut report).await?;
    }
    if args.parts.contains(&Part::Instructions) {
        run_instructions(&args, &cells, &mut report).await?;
    }
    if args.parts.contains(&Part::Fanout) {
        run_fanout(&args, &mut report).await?;
    }
    if args.parts.contains(&Part::Idle) {
        run_idle(&args, &mut report).await?;
    }
    if args.parts.contains(&Part::Handshake) {
        run_handshake(&args, &mut report).await?;
    }

    let table = markdown(&report);
    println!("{table}");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(args.out.join("compare.md"), &table)?;
    std::fs::write(
        args.out.join("compare.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("compare.svg"), chart(&report))?;
    eprintln!(
        "wrote compare.md, compare.json and compare.svg to {}",
        args.out.display()
    );
    Ok(())
}

/// The fan-out servers to run: as asked, except that the quick run leaves out a Sockudo
/// that is not installed (saying so); a full run needs it.
fn fanout_engines(args: &CompareArgs) -> anyhow::Result<Vec<String>> {
    let mut engines = args.fanout_engines.clone();
    if engines.iter().any(|e| e == "sockudo") && sockudo_binary(&args.sockudo).is_none() {
        if !args.quick {
            bail!(
                "no Sockudo server at {} for the fan-out part (install it with `cargo install \
                 sockudo --locked`, or leave it out with --fanout-engines)",
                args.sockudo.display()
            );
        }
        eprintln!("Sockudo is not installed: the quick run leaves it out of fan-out");
        engines.retain(|e| e != "sockudo");
    }
    Ok(engines)
}

async fn run_echo(
    args: &CompareArgs,
    cells: &[(usize, usize)],
    report: &mut Report,
) -> anyhow::Result<()> {
    let steps = args.engines.len() * cells.len() * if args.no_cpu { 1 } else { 2 };
    let mut step = 0;
    for engine in &args.engines {
        let server = Server::start(args, engine).await?;
        for &cell in cells {
            step += 1;
            let result = load(args, engine, &server, cell, Pace::Closed).await?;
            eprintln!(
                "[{step}/{steps}] {engine:>16} {:>12}: {:>9} msg/s",
                cell_name(cell),
                thousands(result.median)
            );
            report
                .throughput
                .entry(engine.clone())
                .or_default()
                .insert(cell_name(cell), result);
        }
        server.stop().await;
    }
    if !args.no_cpu {
        for &cell in cells {
            let slowest = report
                .throughput
                .values()
                .filter_map(|cells| cells.get(&cell_name(cell)))
                .map(|r| r.median)
                .fold(f64::INFINITY, f64::min);
            report
                .rates
                .insert(cell_name(cell), (slowest / 2.0).round().max(1.0));
        }
        for engine in &args.engines {
            let server = Server::start(args, engine).await?;
            for &cell in cells {
                step += 1;
                let rate = report.rates[&cell_name(cell)];
                let result = load(args, engine, &server, cell, Pace::Rate(rate)).await?;
                eprintln!(
                    "[{step}/{steps}] {engine:>16} {:>12} at {:>7} msg/s: {:.2} µs user + {:.2} µs system",
                    cell_name(cell),
                    thousands(rate),
                    result.user_us.unwrap_or(f64::NAN),
                    result.system_us.unwrap_or(f64::NAN),
                );
                report
                    .cpu
                    .entry(engine.clone())
                    .or_default()
                    .insert(cell_name(cell), result);
            }
            server.stop().await;
        }
    }
    Ok(())
}

/// Messages per connection in the two counted loads of a cell: the difference between
/// them is the work per message, with connecting and closing cancelled out. The longer
/// load sends about 2,000 more messages in all (callgrind runs a server some 50 times
/// slower; the counts repeat to a fraction of a percent).
fn counted_loads(connections: usize) -> (u64, u64) {
    let extra = 2000_u64.div_ceil(connections as u64).max(4);
    (2, 2 + extra)
}

async fn run_instructions(
    args: &CompareArgs,
    cells: &[(usize, usize)],
    report: &mut Report,
) -> anyhow::Result<()> {
    // The quick run counts the smallest cell only: callgrind is slow.
    let cells = if args.quick { &cells[..1] } else { cells };
    let dir = std::path::absolute(args.out.join("callgrind"))?;
    std::fs::create_dir_all(&dir)?;
    for engine in &args.engines {
        for &cell in cells {
            let name = format!("{engine}-{}x{}", cell.0, cell.1);
            let out_file = dir.join(format!("{name}.out"));
            for old in callgrind_parts(&out_file)? {
                std::fs::remove_file(old)?;
            }
            let wrapper = [
                "valgrind".to_owned(),
                "--tool=callgrind".to_owned(),
                format!("--callgrind-out-file={}", out_file.display()),
            ];
            let server = Server::start_under(args, engine, &wrapper)
                .await
                .context("starting the server under valgrind (is valgrind installed?)")?;
            let counted = async {
                let (short, long) = counted_loads(cell.0);
                // A first load warms the server up; its dump holds the start as well.
                load(args, engine, &server, cell, Pace::Count(short)).await?;
                dump_counts(&server, &out_file).await?;
                load(args, engine, &server, cell, Pace::Count(short)).await?;
                let base = dump_counts(&server, &out_file).await?;
                load(args, engine, &server, cell, Pace::Count(long)).await?;
                let more = dump_counts(&server, &out_file).await?;
                let messages = (long - short) * cell.0 as u64;
                // Signed: for raw TCP the count is near zero and may come out below it
                // (how the kernel splits 16 KiB into reads varies).
                anyhow::Ok((more as f64 - base as f64) / messages as f64)
            }
            .await;
            server.stop().await;
            let per_message = counted.with_context(|| format!("{engine} {}", cell_name(cell)))?;
            eprintln!(
                "instructions {engine:>16} {:>12}: {} per message",
                cell_name(cell),
                thousands(per_message)
            );
            report
                .instructions
                .entry(engine.clone())
                .or_default()
                .insert(cell_name(cell), per_message);
        }
    }
    Ok(())
}

/// The dump files callgrind has written for `out_file` (`OUT.1`, `OUT.2`, …).
pub(crate) fn callgrind_parts(out_file: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = out_file.parent().context("no directory")?;
    let stem = out_file
        .file_name()
        .context("no file name")?
        .to_string_lossy()
        .into_owned();
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
        if file.is_some_and(|f| f.starts_with(&stem)) {
            parts.push(path);
        }
    }
    Ok(parts)
}

/// Asks callgrind to dump its counters (which it then zeroes) and returns the
/// instructions counted since the previous dump.
pub(crate) async fn dump_counts(
    server: &Server,
    out_file: &std::path::Path,
) -> anyhow::Result<u64> {
    let before = callgrind_parts(out_file)?;
    let status = Command::new("callgrind_control")
        .arg("--dump")
        .arg(server.pid()?.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running callgrind_control")?;
    if !status.success() {
        bail!("callgrind_control --dump failed: {status}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let new: Vec<PathBuf> = callgrind_parts(out_file)?
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        if let [part] = new.as_slice() {
            if let Some(total) = callgrind_total(&std::fs::read_to_string(part)?) {
                return Ok(total);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("callgrind wrote no new dump for {}", out_file.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The instruction total of a finished callgrind dump (its `totals:` or `summary:` line).
fn callgrind_total(dump: &str) -> Option<u64> {
    dump.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The machine, in a line: CPU model and count, kernel.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned());
    format!("{model}, {cpus} CPUs, Linux {kernel}")
}

/// The best peer's value in a cell (peers only: not Switchboard, not raw TCP).
fn best_peer<'a>(
    results: &'a BTreeMap<String, BTreeMap<String, EchoResult>>,
    cell: &str,
    better: impl Fn(&EchoResult, &EchoResult) -> bool,
) -> Option<(&'a str, &'a EchoResult)> {
    results
        .iter()
        .filter(|(engine, _)| is_peer(engine))
        .filter_map(|(engine, cells)| cells.get(cell).map(|r| (engine.as_str(), r)))
        .reduce(|a, b| if better(b.1, a.1) { b } else { a })
}

fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Machine: {}. {}.\n", report.machine, report.settings);
    if !report.throughput.is_empty() {
        echo_table(report, &mut out);
    }
    if !report.cpu.is_empty() {
        cpu_table(report, &mut out);
    }
    if !report.instructions.is_empty() {
        instructions_table(report, &mut out);
    }
    if !report.fanout.is_empty() {
        fanout_table(report, &mut out);
    }
    if !report.idle.is_empty() {
        idle_table(report, &mut out);
    }
    if !report.handshake.is_empty() {
        handshake_table(report, &mut out);
    }
    out
}

fn echo_table(report: &Report, out: &mut String) {
    let _ = writeln!(
        out,
        "### Echo throughput (messages/s, median of the samples; closed loop)\n"
    );
    let header: Vec<&str> = report.engines.iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "| cell | {} | Switchboard ÷ best peer | Switchboard ÷ raw TCP |",
        header.join(" | ")
    );
    let _ = writeln!(out, "|---|{}---|---|", "---:|".repeat(header.len()));
    for cell in &report.cells {
        let mut row = format!("| {cell} |");
        for engine in &report.engines {
            let value = report
                .throughput
                .get(engine)
                .and_then(|c| c.get(cell))
                .map_or_else(|| "–".into(), |r| thousands(r.median));
            let _ = write!(row, " {value} |");
        }
        let ours = report
            .throughput
            .get("switchboard")
            .and_then(|c| c.get(cell));
        let best = best_peer(&report.throughput, cell, |a, b| a.median > b.median);
        let raw = report.throughput.get("raw").and_then(|c| c.get(cell));
        let ratio = |other: Option<&EchoResult>| match (ours, other) {
            (Some(o), Some(b)) if b.median > 0.0 => format!("{:.2}×", o.median / b.median),
            _ => "–".into(),
        };
        let best_name = best.map_or(String::new(), |(name, _)| format!(" ({name})"));
        let _ = writeln!(
            row,
            " {}{best_name} | {} |",
            ratio(best.map(|b| b.1)),
            ratio(raw)
        );
        out.push_str(&row);
    }
}

fn cpu_table(report: &Report, out: &mut String) {
    let header: Vec<&str> = report.engines.iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "\n### Server CPU per message at a fixed rate (µs: user + system)\n"
    );
    let _ = writeln!(
        out,
        "| cell | rate | {} | Switchboard user ÷ best peer's | Switchboard total ÷ raw TCP |",
        header.join(" | ")
    );
    let _ = writeln!(out, "|---|---:|{}---|---|", "---:|".repeat(header.len()));
    for cell in &report.cells {
        let rate = report.rates.get(cell).copied().unwrap_or_default();
        let mut row = format!("| {cell} | {} |", thousands(rate));
        for engine in &report.engines {
            let value = report
                .cpu
                .get(engine)
                .and_then(|c| c.get(cell))
                .map_or_else(
                    || "–".into(),
                    |r| {
                        format!(
                            "{:.2} + {:.2}",
                            r.user_us.unwrap_or(f64::NAN),
                            r.system_us.unwrap_or(f64::NAN)
                        )
                    },
                );
            let _ = write!(row, " {value} |");
        }
        let user = |r: &EchoResult| r.user_us.unwrap_or(f64::INFINITY);
        let total = |r: &EchoResult| r.user_us.unwrap_or(0.0) + r.system_us.unwrap_or(0.0);
        let ours = report.cpu.get("switchboard").and_then(|c| c.get(cell));
        let best = best_peer(&report.cpu, cell, |a, b| user(a) < user(b));
        let raw = report.cpu.get("raw").and_then(|c| c.get(cell));
        let user_ratio = match (ours, best) {
            (Some(o), Some((name, b))) if user(b) > 0.0 => {
                format!("{:.2}× ({name})", user(o) / user(b))
            }
            _ => "–".into(),
        };
        let total_ratio = match (ours, raw) {
            (Some(o), Some(r)) if total(r) > 0.0 => format!("{:.2}×", total(o) / total(r)),
            _ => "–".into(),
        };
        let _ = writeln!(row, " {user_ratio} | {total_ratio} |");
        out.push_str(&row);
    }
}

fn instructions_table(report: &Report, out: &mut String) {
    let engines: Vec<&String> = report
        .engines
        .iter()
        .filter(|e| report.instructions.contains_key(*e))
        .collect();
    let _ = writeln!(
        out,
        "\n### Server instructions per echoed message (callgrind; user space only)\n"
    );
    let names: Vec<&str> = engines.iter().map(|e| e.as_str()).collect();
    let _ = writeln!(
        out,
        "| cell | {} | Switchboard ÷ best peer | Switchboard ÷ raw TCP |",
        names.join(" | ")
    );
    let _ = writeln!(out, "|---|{}---|---|", "---:|".repeat(names.len()));
    for cell in &report.cells {
        let of = |engine: &str| report.instructions.get(engine).and_then(|c| c.get(cell));
        if engines.iter().all(|e| of(e).is_none()) {
            continue;
        }
        let mut row = format!("| {cell} |");
        for engine in &engines {
            let value = of(engine).map_or_else(|| "–".into(), |n| thousands(*n));
            let _ = write!(row, " {value} |");
        }
        let ours = of("switchboard");
        let best = engines
            .iter()
            .filter(|e| is_peer(e))
            .filter_map(|e| of(e).map(|n| (e.as_str(), *n)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let vs_best = match (ours, best) {
            (Some(o), Some((name, b))) if b > 0.0 => format!("{:.2}× ({name})", o / b),
            _ => "–".into(),
        };
        let vs_raw = match (ours, of("raw")) {
            (Some(o), Some(r)) if *r > 0.0 => format!("{:.2}×", o / r),
            _ => "–".into(),
        };
        let _ = writeln!(row, " {vs_best} | {vs_raw} |");
        out.push_str(&row);
    }
}

fn fanout_table(report: &Report, out: &mut String) {
    let _ = writeln!(
        out,
        "\n### Fan-out: delivered messages/s at the highest publish rate held (all delivered, p99 under the bound)\n"
    );
    let engines = &report.fanout_engines;
    let counts: std::collections::BTreeSet<usize> = report
        .fanout
        .values()
        .flat_map(|by_count| by_count.keys().copied())
        .collect();
    let ours: Vec<&String> = engines.iter().filter(|e| is_ours(e)).collect();
    let others: Vec<&String> = engines.iter().filter(|e| !is_ours(e)).collect();
    let pairs: Vec<(&String, &String)> = ours
        .iter()
        .flat_map(|o| others.iter().map(move |p| (*o, *p)))
        .collect();
    let ratios: Vec<String> = pairs.iter().map(|(o, p)| format!("{o} ÷ {p}")).collect();
    let _ = writeln!(
        out,
        "| subscribers | {} | {} |",
        engines.join(" | "),
        ratios.join(" | ")
    );
    let _ = writeln!(
        out,
        "|---:|{}{}",
        "---:|".repeat(engines.len()),
        "---|".repeat(pairs.len())
    );
    let held = |engine: &str, count: usize| {
        report
            .fanout
            .get(engine)
            .and_then(|c| c.get(&count))
            .and_then(FanoutResult::best_held)
    };
    for count in counts {
        let mut row = format!("| {} |", thousands(count as f64));
        for engine in engines {
            let cell = held(engine, count).map_or_else(
                || "none held".into(),
                |s| {
                    format!(
                        "{} ({} msg/s published, p99 {:.1} ms)",
                        thousands(s.delivered_per_sec),
                        s.rate,
                        s.p99_ms
                    )
                },
            );
            let _ = write!(row, " {cell} |");
        }
        for (ours, other) in &pairs {
            let ratio = match (held(ours, count), held(other, count)) {
                (Some(o), Some(p)) if p.delivered_per_sec > 0.0 => {
                    format!("{:.2}×", o.delivered_per_sec / p.delivered_per_sec)
                }
                (Some(_), None) => "∞ (peer held none)".into(),
                _ => "–".into(),
            };
            let _ = write!(row, " {ratio} |");
        }
        let _ = writeln!(out, "{row}");
    }
    let Some(any) = report.fanout.values().flat_map(|c| c.values()).next() else {
        return;
    };
    let rates: Vec<String> = any.steps.iter().map(|s| s.rate.to_string()).collect();
    let _ = writeln!(
        out,
        "\nPublish rates step up ({}, … messages/s) until two in a row are not held; p99 bound {} ms. Every step is in compare.json.",
        rates.join(", "),
        any.p99_bound_ms
    );
}

fn idle_table(report: &Report, out: &mut String) {
    let _ = writeln!(
        out,
        "\n### Server memory per idle connection (KiB of RSS growth per connection)\n"
    );
    let engines: Vec<&String> = report
        .engines
        .iter()
        .filter(|e| report.idle.contains_key(*e))
        .collect();
    let counts: std::collections::BTreeSet<usize> = report
        .idle
        .values()
        .flat_map(|by_count| by_count.keys().copied())
        .collect();
    let names: Vec<&str> = engines.iter().map(|e| e.as_str()).collect();
    let _ = writeln!(out, "| connections | {} |", names.join(" | "));
    let _ = writeln!(out, "|---:|{}", "---:|".repeat(engines.len()));
    for count in counts {
        let mut row = format!("| {} |", thousands(count as f64));
        for engine in &engines {
            let cell = report
                .idle
                .get(*engine)
                .and_then(|c| c.get(&count))
                .map_or_else(|| "–".into(), |r| format!("{:.2}", r.kib_per_connection));
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(out, "{row}");
    }
}

fn handshake_table(report: &Report, out: &mut String) {
    let _ = writeln!(
        out,
        "\n### New connections per second (TCP connect + upgrade, then hang up; median)\n"
    );
    let engines: Vec<&String> = report
        .engines
        .iter()
        .filter(|e| report.handshake.contains_key(*e))
        .collect();
    let names: Vec<&str> = engines.iter().map(|e| e.as_str()).collect();
    let _ = writeln!(out, "| {} |", names.join(" | "));
    let _ = writeln!(out, "|{}", "---:|".repeat(engines.len()));
    let cells: Vec<String> = engines
        .iter()
        .map(|e| thousands(report.handshake[*e].median))
        .collect();
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}

/// Grouped bars: per cell, each engine's throughput relative to the best in that cell.
fn chart(report: &Report) -> String {
    const COLORS: [&str; 8] = [
        "#3355ff", "#9aa3b5", "#e4572e", "#17bebb", "#ffc914", "#76b041", "#a05195", "#555",
    ];
    let (bar, gap, left, top, height) = (14.0, 26.0, 60.0, 40.0, 220.0);
    let group = bar * report.engines.len() as f64 + gap;
    let width = left + group * report.cells.len() as f64 + 20.0;
    let legend_y = top + height + 50.0;
    let total_height = legend_y + 20.0 * report.engines.len().div_ceil(3) as f64 + 10.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{total_height:.0}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="13" font-weight="bold">Echo throughput, relative to the best server in each cell</text>
"#
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = top + height * (1.0 - tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
            width - 10.0,
            left - 6.0,
            y + 4.0,
            tick * 100.0
        );
    }
    for (c, cell) in report.cells.iter().enumerate() {
        let best = report
            .throughput
            .values()
            .filter_map(|cells| cells.get(cell))
            .map(|r| r.median)
            .fold(0.0, f64::max);
        let x0 = left + gap / 2.0 + group * c as f64;
        for (e, engine) in report.engines.iter().enumerate() {
            let Some(result) = report.throughput.get(engine).and_then(|r| r.get(cell)) else {
                continue;
            };
            let share = if best > 0.0 {
                result.median / best
            } else {
                0.0
            };
            let h = height * share;
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{engine} {cell}: {} msg/s</title></rect>"#,
                x0 + bar * e as f64,
                top + height - h,
                bar - 2.0,
                COLORS[e % COLORS.len()],
                thousands(result.median)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{cell}</text>"#,
            x0 + bar * report.engines.len() as f64 / 2.0,
            top + height + 18.0
        );
    }
    for (e, engine) in report.engines.iter().enumerate() {
        let x = left + 170.0 * (e % 3) as f64;
        let y = legend_y + 20.0 * (e / 3) as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{engine}</text>"#,
            y - 10.0,
            COLORS[e % COLORS.len()],
            x + 18.0,
            y
        );
    }
    svg.push_str("</svg>\n");
    svg
}
