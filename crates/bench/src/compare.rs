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
//! fan-out (one room or channel, rising publish rates; Switchboard, Sockudo, a
//! tokio-tungstenite broadcast server and Socket.IO), fan-out at a fixed rate every
//! server holds (the server's CPU per delivery, which ranks servers where the load's
//! one core bounds the rates held), server memory per idle connection, and new
//! connections per second.
//!
//! The Node peers (Node's `ws` echo, a Socket.IO room) are scripts in peers/node, run
//! with the `node` on PATH; `npm ci --prefix peers/node` installs their packages. Node
//! runs JavaScript on one thread, so one core is its natural pinning as well.

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
use super::{chart, progress, EchoResult, IdleResult};

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
        default_value = "switchboard,raw,fastwebsockets,tokio-websockets,sockudo-ws,tungstenite,node-ws"
    )]
    engines: Vec<String>,
    /// The Node peers' folder (`ws-echo.mjs`, `socketio-broadcast.mjs`, and their
    /// packages in node_modules: `npm ci --prefix peers/node`).
    #[arg(long, default_value = "peers/node")]
    node_peers: PathBuf,
    /// The Node.js binary for the Node peers; looked up on PATH.
    #[arg(long, default_value = "node")]
    node: PathBuf,
    /// A short run for CI: two echo cells (1 s of warm-up, 2 samples, one round), the CPU
    /// pass and instructions in the first cell only, fan-out to 1,000 subscribers at
    /// three rates, the fixed-rate fan-out to 1,000 at 10 msg/s (a warm-up and two 1 s
    /// steps, one round), 1,000 idle connections, 2 handshake samples.
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
    /// Rounds of the echo part (both passes), each on fresh servers, alternating the
    /// order of the engines; each cell reports an engine's median round (one in the
    /// quick run).
    #[arg(long, default_value_t = 3)]
    echo_rounds: usize,
    /// Parts to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "echo,instructions,fanout,fanout-cpu,idle,handshake"
    )]
    parts: Vec<Part>,
    /// Servers for the fan-out parts.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "switchboard,switchboard-pusher,switchboard-centrifuge,sockudo,tungstenite-broadcast,socketio"
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
    /// Subscribers per cell of the fixed-rate fan-out (`fanout-cpu`).
    #[arg(long, value_delimiter = ',', default_value = "5000,10000")]
    cpu_subscribers: Vec<usize>,
    /// The publish rate (messages/s) of each `--cpu-subscribers` count, in the same
    /// order (the last one for any count past them): a rate every server holds there.
    #[arg(long, value_delimiter = ',', default_value = "10,5")]
    cpu_rates: Vec<f64>,
    /// Seconds per step of the fixed-rate fan-out.
    #[arg(long, default_value_t = 3.0)]
    cpu_secs: f64,
    /// Steps counted per server in the fixed-rate fan-out, after one warm-up step.
    #[arg(long, default_value_t = 3)]
    cpu_steps: usize,
    /// Rounds of the fixed-rate fan-out, each on fresh servers, alternating the order
    /// of the engines; the median round is reported.
    #[arg(long, default_value_t = 3)]
    cpu_rounds: usize,
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
    /// Where compare.md, compare.json and the charts go (compare-echo, compare-fanout and
    /// compare-memory, each as .svg and .png; compare.svg is the echo chart as well).
    #[arg(long, default_value = "reports/bench")]
    out: PathBuf,
    /// Run nothing: draw the charts of a saved run (its compare.json) into --out.
    #[arg(long, value_name = "COMPARE_JSON")]
    charts_from: Option<PathBuf>,
    /// The bars on stderr, set by `run` once it knows its steps (not a flag).
    #[arg(skip)]
    progress: progress::Steps,
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
    /// Fan-out at a fixed publish rate: the server's CPU per delivery.
    FanoutCpu,
    Idle,
    Handshake,
}

/// The peers that are Node scripts in peers/node, and their script.
fn node_script(engine: &str) -> Option<&'static str> {
    match engine {
        "node-ws" => Some("ws-echo.mjs"),
        "socketio" => Some("socketio-broadcast.mjs"),
        _ => None,
    }
}

/// The engines that are neither Switchboard nor the raw TCP ceiling.
fn is_peer(engine: &str) -> bool {
    !is_ours(engine) && engine != "raw"
}

/// Switchboard through one of its doors: `switchboard` (rooms), `switchboard-pusher`,
/// `switchboard-centrifuge`.
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
    /// engine → cell → closed-loop result: the median round by messages/s.
    throughput: BTreeMap<String, BTreeMap<String, EchoResult>>,
    /// engine → cell → every closed-loop round, in the order they ran.
    throughput_rounds: BTreeMap<String, BTreeMap<String, Vec<EchoResult>>>,
    /// cell → the fixed rate of the CPU pass.
    rates: BTreeMap<String, f64>,
    /// engine → cell → result at the fixed rate (with CPU per message): the median
    /// round by CPU per message.
    cpu: BTreeMap<String, BTreeMap<String, EchoResult>>,
    /// engine → cell → every round at the fixed rate, in the order they ran.
    cpu_rounds: BTreeMap<String, BTreeMap<String, Vec<EchoResult>>>,
    /// engine → cell → server instructions per echoed message (callgrind).
    instructions: BTreeMap<String, BTreeMap<String, f64>>,
    /// engine → subscribers → fan-out steps.
    fanout: BTreeMap<String, BTreeMap<usize, FanoutResult>>,
    fanout_engines: Vec<String>,
    /// The fixed-rate fan-out, per subscriber count: every round and step.
    fanout_cpu: Vec<FanoutCpuCell>,
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
        if let Some(script) = node_script(engine) {
            command
                .arg(node_binary(args)?)
                .arg(args.node_peers.join(script))
                .args(["--listen", "127.0.0.1:0"]);
        } else if is_ours(engine) {
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
        let binary = find_program(&args.sockudo).with_context(|| {
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
    let step = match pace {
        Pace::Count(count) => progress::spinner(format!("{count} messages per connection")),
        Pace::Closed | Pace::Rate(_) => {
            progress::timed(Duration::from_secs(warmup + samples as u64))
        }
    };
    let output = progress::output(&mut command, &step).await?;
    step.finish_and_clear();
    if !output.status.success() {
        bail!(
            "{engine} {}: {}",
            cell_name(cell),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The Node.js binary, and a word on what to do when it or the Node peers' packages
/// are missing.
fn node_binary(args: &CompareArgs) -> anyhow::Result<PathBuf> {
    let node = find_program(&args.node).with_context(|| {
        format!(
            "no Node.js at {} for the Node peers (install Node.js and npm, then run `npm ci \
             --prefix {}`; or leave node-ws and socketio out with --engines and \
             --fanout-engines)",
            args.node.display(),
            args.node_peers.display()
        )
    })?;
    let modules = args.node_peers.join("node_modules");
    if !modules.is_dir() {
        bail!(
            "the Node peers' packages are not installed (no {}): run `npm ci --prefix {}` \
             (scripts/bench.sh does), or leave node-ws and socketio out with --engines and \
             --fanout-engines",
            modules.display(),
            args.node_peers.display()
        );
    }
    Ok(node)
}

/// A program: the path given, else on PATH, else in ~/.cargo/bin (where `cargo
/// install` puts Sockudo).
fn find_program(given: &std::path::Path) -> Option<PathBuf> {
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
    let mut command = Command::new("taskset");
    command
        .args(["-c", &args.load_core.to_string()])
        .arg(std::env::current_exe()?)
        .args(bench_args)
        .arg("--json");
    // The load's lines on stderr (a fan-out's rate steps) show under the step's bar.
    let step = progress::spinner("starting");
    let output = progress::output(&mut command, &step).await?;
    step.finish_and_clear();
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
        "switchboard-centrifuge" => (format!("ws://{address}/connection/websocket"), "centrifuge"),
        "socketio" => (
            format!("ws://{address}/socket.io/?EIO=4&transport=websocket"),
            "socketio",
        ),
        _ => (format!("ws://{address}/"), "broadcast"),
    }
}

/// The `fanout` load's arguments for `engine` at `server`: the same publisher for an
/// engine in every fan-out part (a room member for Switchboard's rooms, a client of the
/// broadcast and Socket.IO servers, the events API of a Pusher-protocol server).
fn fanout_bench_args(
    args: &CompareArgs,
    engine: &str,
    server: &Server,
    subscribers: usize,
    rates: &str,
    step_secs: &str,
) -> Vec<String> {
    let (url, target) = fanout_target(engine, &server.address);
    [
        "fanout",
        &url,
        "--target",
        target,
        "--subscribers",
        &subscribers.to_string(),
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
    .to_vec()
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
            args.progress
                .start(format!("fan-out · {count} subscribers · {engine}"));
            let result: FanoutResult = on_fresh_server(args, engine, &what, |server| {
                Ok(fanout_bench_args(
                    args, engine, server, count, rates, step_secs,
                ))
            })
            .await?;
            let best = result.best_held();
            args.progress.done(format!(
                "fan-out {engine:>22} {count:>6} subscribers: {} delivered msg/s held (publish {} msg/s)",
                best.map_or_else(|| "none".into(), |b| thousands(b.delivered_per_sec)),
                best.map_or_else(|| "–".into(), |b| b.rate.to_string()),
            ));
            report
                .fanout
                .entry(engine.clone())
                .or_default()
                .insert(count, result);
        }
    }
    Ok(())
}

/// One fresh server's run in the fixed-rate fan-out: a warm-up step, then the counted
/// steps, summed.
#[derive(Debug, Clone, Serialize)]
struct FanoutCpuRound {
    /// 0, 1, 2, …: odd rounds run the engines in the reverse order.
    round: usize,
    /// The server's CPU time per delivery over the counted steps, µs: the total from
    /// /proc/PID/task/*/schedstat, split as /proc/PID/stat's ticks are.
    user_us: f64,
    system_us: f64,
    /// The server's CPU time over the counted steps' wall time (1.0: one core).
    busy: f64,
    /// The median of the counted steps' p50s and of their p99s (every step's is in
    /// `steps`).
    p50_ms: f64,
    p99_ms: f64,
    delivered: u64,
    expected: u64,
    /// Every step asked for ran and made all its deliveries, the server closed no
    /// subscriber, and `p99_ms` is under the bound.
    held: bool,
    /// Every step, the warm-up first.
    steps: Vec<super::fanout::Step>,
}

impl FanoutCpuRound {
    fn total_us(&self) -> f64 {
        self.user_us + self.system_us
    }

    /// Sums the counted steps of one run (all but the first, the warm-up), of the
    /// `steps` asked for.
    fn of(round: usize, result: FanoutResult, steps: usize) -> anyhow::Result<Self> {
        let counted = result.steps.get(1..).unwrap_or_default();
        if counted.is_empty() {
            bail!(
                "the load stopped after {} step(s): no step was counted",
                result.steps.len()
            );
        }
        let delivered: u64 = counted.iter().map(|s| s.delivered).sum();
        let cpu = |of: fn(&super::fanout::Step) -> Option<f64>| -> anyhow::Result<f64> {
            let mut micros = 0.0;
            for step in counted {
                micros += of(step).context("a step without the server's CPU time")?
                    * step.delivered as f64;
            }
            Ok(micros / delivered.max(1) as f64)
        };
        let busy = counted
            .iter()
            .map(|s| s.server_busy.unwrap_or(f64::NAN))
            .sum::<f64>()
            / counted.len() as f64;
        let median = |of: fn(&super::fanout::Step) -> f64| {
            let mut values: Vec<f64> = counted.iter().map(of).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let p99_ms = median(|s| s.p99_ms);
        let expected = counted.iter().map(|s| s.expected).sum();
        Ok(Self {
            round,
            user_us: cpu(|s| s.server_user_us)?,
            system_us: cpu(|s| s.server_system_us)?,
            busy,
            p50_ms: median(|s| s.p50_ms),
            p99_ms,
            delivered,
            expected,
            held: counted.len() == steps
                && delivered >= expected
                && counted.iter().all(|s| s.closed == 0)
                && p99_ms <= result.p99_bound_ms,
            steps: result.steps,
        })
    }
}

/// The fixed-rate fan-out at one subscriber count.
#[derive(Debug, Serialize)]
struct FanoutCpuCell {
    subscribers: usize,
    /// Messages published per second.
    rate: f64,
    step_secs: f64,
    /// The p99 a round must stay under to be held.
    p99_bound_ms: f64,
    /// engine → its rounds, in the order they ran.
    rounds: BTreeMap<String, Vec<FanoutCpuRound>>,
}

impl FanoutCpuCell {
    /// The engine's median round by total CPU per delivery (the lower middle one of an
    /// even count).
    fn median(&self, engine: &str) -> Option<&FanoutCpuRound> {
        let mut rounds: Vec<&FanoutCpuRound> = self.rounds.get(engine)?.iter().collect();
        rounds.sort_by(|a, b| a.total_us().total_cmp(&b.total_us()));
        rounds.get(rounds.len().saturating_sub(1) / 2).copied()
    }
}

/// The fixed-rate fan-out: per subscriber count, rounds of fresh servers, each engine
/// in turn (reversed every other round), N subscribers and the publisher at the
/// count's rate; the server's CPU per delivery over the counted steps.
async fn run_fanout_cpu(args: &CompareArgs, report: &mut Report) -> anyhow::Result<()> {
    let (counts, rates, secs, steps, rounds) = if args.quick {
        (vec![1000], vec![10.0], 1.0, 2, 1)
    } else {
        (
            args.cpu_subscribers.clone(),
            args.cpu_rates.clone(),
            args.cpu_secs,
            args.cpu_steps.max(1),
            args.cpu_rounds.max(1),
        )
    };
    let engines = report.fanout_engines.clone();
    for (i, &count) in counts.iter().enumerate() {
        let rate = *rates
            .get(i)
            .or(rates.last())
            .context("--cpu-rates is empty")?;
        // The warm-up step and the counted ones, all at the same rate.
        let step_rates = vec![rate.to_string(); 1 + steps].join(",");
        let mut cell = FanoutCpuCell {
            subscribers: count,
            rate,
            step_secs: secs,
            p99_bound_ms: args.p99_bound_ms,
            rounds: BTreeMap::new(),
        };
        for round in 0..rounds {
            let order: Vec<&String> = if round % 2 == 0 {
                engines.iter().collect()
            } else {
                engines.iter().rev().collect()
            };
            for engine in order {
                let what = format!("{engine} fan-out to {count} at {rate} msg/s");
                args.progress.start(format!(
                    "fan-out at a fixed rate · round {}/{rounds} · {count} × {rate} msg/s · {engine}",
                    round + 1
                ));
                let result: FanoutResult = on_fresh_server(args, engine, &what, |server| {
                    let mut bench_args = fanout_bench_args(
                        args,
                        engine,
                        server,
                        count,
                        &step_rates,
                        &secs.to_string(),
                    );
                    bench_args.extend([
                        "--every-step".into(),
                        "--server-pid".into(),
                        server.pid()?.to_string(),
                    ]);
                    Ok(bench_args)
                })
                .await?;
                let result = FanoutCpuRound::of(round, result, steps).context(what)?;
                args.progress.done(format!(
                    "fan-out at a fixed rate, round {}/{rounds}: {engine:>22} {count:>6} subscribers × {rate} msg/s: \
                     {:.2} + {:.2} = {:.2} µs per delivery, busy {:.2}, p99 {:.1} ms, {}/{} delivered{}",
                    round + 1,
                    result.user_us,
                    result.system_us,
                    result.total_us(),
                    result.busy,
                    result.p99_ms,
                    result.delivered,
                    result.expected,
                    if result.held { "" } else { " (not held)" },
                ));
                cell.rounds.entry(engine.clone()).or_default().push(result);
            }
        }
        report.fanout_cpu.push(cell);
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
            args.progress
                .start(format!("idle · {count} connections · {engine}"));
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
            args.progress.done(format!(
                "idle {engine:>16} {count:>6} connections: {:.2} KiB each",
                result.kib_per_connection
            ));
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
        args.progress.start(format!("handshakes · {engine}"));
        let result: HandshakeResult = on_fresh_server(args, engine, &what, |server| {
            Ok(vec![
                "handshake".into(),
                echo_url(engine, &server.address),
                "--samples".into(),
                samples.into(),
            ])
        })
        .await?;
        args.progress.done(format!(
            "handshakes {engine:>16}: {} new connections/s",
            thousands(result.median)
        ));
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
pub(crate) async fn run(mut args: CompareArgs) -> anyhow::Result<()> {
    if let Some(saved) = &args.charts_from {
        let json = std::fs::read(saved).with_context(|| format!("reading {}", saved.display()))?;
        let run: chart::Run = serde_json::from_slice(&json)
            .with_context(|| format!("reading {}", saved.display()))?;
        let written = chart::write(&run, &args.out)?;
        progress::line(format!(
            "wrote {} to {}",
            file_names(&written),
            args.out.display()
        ));
        return Ok(());
    }
    let cells: Vec<(usize, usize)> = if args.quick {
        QUICK_CELLS.to_vec()
    } else {
        CELLS.to_vec()
    };
    let echo_parts = [Part::Echo, Part::Instructions, Part::Idle, Part::Handshake];
    let fanout_parts = [Part::Fanout, Part::FanoutCpu];
    let runs = |parts: &[Part]| parts.iter().any(|p| args.parts.contains(p));
    let mut node_engines = args
        .engines
        .iter()
        .filter(|_| runs(&echo_parts))
        .chain(args.fanout_engines.iter().filter(|_| runs(&fanout_parts)));
    if node_engines.any(|e| node_script(e).is_some()) {
        node_binary(&args)?;
    }
    let rust_peers = args
        .engines
        .iter()
        .filter(|e| node_script(e).is_none())
        .any(|e| !is_ours(e));
    if rust_peers && !args.peers.exists() {
        bail!(
            "no peer servers at {}: build them with `cargo build --release --manifest-path \
             peers/Cargo.toml`, or pass --peers",
            args.peers.display()
        );
    }
    let mut report = Report {
        machine: machine(),
        settings: format!(
            "server on core {} (1 worker), load on core {}; {} s warm-up, {} one-second samples per cell; \
             echo: the median of {} round(s), alternating the engines' order",
            args.server_core,
            args.load_core,
            if args.quick { 1 } else { args.warmup },
            if args.quick { 2 } else { args.samples },
            echo_rounds(&args),
        ),
        cells: cells.iter().map(|c| cell_name(*c)).collect(),
        engines: args.engines.clone(),
        throughput: BTreeMap::new(),
        throughput_rounds: BTreeMap::new(),
        rates: BTreeMap::new(),
        cpu: BTreeMap::new(),
        cpu_rounds: BTreeMap::new(),
        instructions: BTreeMap::new(),
        fanout: BTreeMap::new(),
        fanout_engines: if runs(&fanout_parts) {
            fanout_engines(&args)?
        } else {
            Vec::new()
        },
        fanout_cpu: Vec::new(),
        idle: BTreeMap::new(),
        handshake: BTreeMap::new(),
    };
    args.progress = progress::Steps::new(planned_steps(
        &args,
        cells.len(),
        report.fanout_engines.len(),
    ));
    if args.parts.contains(&Part::Echo) {
        run_echo(&args, &cells, &mut report).await?;
    }
    if args.parts.contains(&Part::Instructions) {
        run_instructions(&args, &cells, &mut report).await?;
    }
    if args.parts.contains(&Part::Fanout) {
        run_fanout(&args, &mut report).await?;
    }
    if args.parts.contains(&Part::FanoutCpu) {
        run_fanout_cpu(&args, &mut report).await?;
    }
    if args.parts.contains(&Part::Idle) {
        run_idle(&args, &mut report).await?;
    }
    if args.parts.contains(&Part::Handshake) {
        run_handshake(&args, &mut report).await?;
    }

    args.progress.finish();

    let table = markdown(&report);
    println!("{table}");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    std::fs::write(
        args.out.join("compare.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    // The figures are on disk before the charts are drawn: a chart that fails (no font,
    // say) fails the run without losing them.
    std::fs::write(args.out.join("compare.md"), &table)?;
    let charts = chart::write(&chart::Run::of(&report)?, &args.out)?;
    std::fs::write(
        args.out.join("compare.md"),
        format!("{table}{}", chart_links(&charts)),
    )?;
    progress::line(format!(
        "wrote compare.md, compare.json{}{} to {}",
        if charts.is_empty() { "" } else { ", " },
        file_names(&charts),
        args.out.display()
    ));
    Ok(())
}

/// The steps `run` counts on its bar, one for each line a part prints: per engine and
/// cell (echo and its CPU pass, instructions), per engine and count (fan-out, idle), per
/// engine, count and round (the fixed-rate fan-out), per engine (handshakes).
fn planned_steps(args: &CompareArgs, cells: usize, fanout_engines: usize) -> u64 {
    let engines = args.engines.len();
    let served = args.engines.iter().filter(|e| *e != "raw").count();
    let compiled = args
        .engines
        .iter()
        .filter(|e| node_script(e).is_none())
        .count();
    let counts = |counts: usize| if args.quick { 1 } else { counts };
    let steps = |part: &Part| match part {
        Part::Echo => engines * (cells + cpu_cells(args, cells)) * echo_rounds(args),
        Part::Instructions => compiled * if args.quick { 1 } else { cells },
        Part::Fanout => fanout_engines * counts(args.subscribers.len()),
        Part::FanoutCpu => {
            fanout_engines * counts(args.cpu_subscribers.len() * args.cpu_rounds.max(1))
        }
        Part::Idle => served * counts(args.idle_connections.len()),
        Part::Handshake => served,
    };
    <Part as clap::ValueEnum>::value_variants()
        .iter()
        .filter(|part| args.parts.contains(part))
        .map(steps)
        .sum::<usize>() as u64
}

/// `a.svg, a.png, b.svg`: the files' names.
fn file_names(files: &[PathBuf]) -> String {
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.file_name())
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    names.join(", ")
}

/// compare.md's pictures: the SVG charts, which sit beside it.
fn chart_links(charts: &[PathBuf]) -> String {
    let mut out = String::new();
    for (stem, what) in [
        ("compare-echo", "Echo throughput and server CPU"),
        ("compare-fanout", "Fan-out and server CPU per delivery"),
        ("compare-memory", "Server memory per idle connection"),
    ] {
        let svg = format!("{stem}.svg");
        let drawn = |c: &PathBuf| c.file_name().is_some_and(|f| *f == *svg);
        if charts.iter().any(drawn) {
            let _ = write!(out, "\n![{what}]({svg})\n");
        }
    }
    out
}

/// The fan-out servers to run: as asked, except that the quick run leaves out a Sockudo
/// that is not installed (saying so); a full run needs it.
fn fanout_engines(args: &CompareArgs) -> anyhow::Result<Vec<String>> {
    let mut engines = args.fanout_engines.clone();
    if engines.iter().any(|e| e == "sockudo") && find_program(&args.sockudo).is_none() {
        if !args.quick {
            bail!(
                "no Sockudo server at {} for the fan-out part (install it with `cargo install \
                 sockudo --locked`, or leave it out with --fanout-engines)",
                args.sockudo.display()
            );
        }
        progress::line("Sockudo is not installed: the quick run leaves it out of fan-out");
        engines.retain(|e| e != "sockudo");
    }
    Ok(engines)
}

/// The cells of the echo part's CPU pass: none with `--no-cpu`, the first only in the
/// quick run (which must stay short), else every one.
fn cpu_cells(args: &CompareArgs, cells: usize) -> usize {
    match (args.no_cpu, args.quick) {
        (true, _) => 0,
        (false, true) => cells.min(1),
        (false, false) => cells,
    }
}

/// Rounds of the echo part: one in the quick run.
fn echo_rounds(args: &CompareArgs) -> usize {
    if args.quick {
        1
    } else {
        args.echo_rounds.max(1)
    }
}

/// The engines in round `round`'s order: as given, reversed in odd rounds, so that no
/// engine always runs first or last (a machine warming up, or busy with something
/// else for a while, then weighs on each engine alike).
fn in_round_order(engines: &[String], round: usize) -> Vec<&String> {
    let mut order: Vec<&String> = engines.iter().collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Every engine's median round in each cell, by `key` (the lower middle one of an even
/// count).
fn median_rounds(
    rounds: &BTreeMap<String, BTreeMap<String, Vec<EchoResult>>>,
    key: impl Fn(&EchoResult) -> f64,
) -> BTreeMap<String, BTreeMap<String, EchoResult>> {
    rounds
        .iter()
        .map(|(engine, cells)| {
            let medians = cells
                .iter()
                .filter_map(|(cell, results)| {
                    let mut sorted: Vec<&EchoResult> = results.iter().collect();
                    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
                    let middle = sorted.get(sorted.len().saturating_sub(1) / 2)?;
                    Some((cell.clone(), (*middle).clone()))
                })
                .collect();
            (engine.clone(), medians)
        })
        .collect()
}

/// Adds one round's result of `engine` in `cell` to `rounds`.
fn add_round(
    rounds: &mut BTreeMap<String, BTreeMap<String, Vec<EchoResult>>>,
    engine: &str,
    cell: (usize, usize),
    result: EchoResult,
) {
    rounds
        .entry(engine.to_owned())
        .or_default()
        .entry(cell_name(cell))
        .or_default()
        .push(result);
}

async fn run_echo(
    args: &CompareArgs,
    cells: &[(usize, usize)],
    report: &mut Report,
) -> anyhow::Result<()> {
    let rounds = echo_rounds(args);
    let cpu = &cells[..cpu_cells(args, cells.len())];
    let steps = args.engines.len() * (cells.len() + cpu.len()) * rounds;
    let mut step = 0;
    for round in 0..rounds {
        for engine in in_round_order(&args.engines, round) {
            let server = Server::start(args, engine).await?;
            for &cell in cells {
                step += 1;
                args.progress.start(format!(
                    "echo · round {}/{rounds} · {} · {engine}",
                    round + 1,
                    cell_name(cell)
                ));
                let result = load(args, engine, &server, cell, Pace::Closed).await?;
                args.progress.done(format!(
                    "[{step}/{steps}] round {}/{rounds} {engine:>16} {:>12}: {:>9} msg/s",
                    round + 1,
                    cell_name(cell),
                    thousands(result.median)
                ));
                add_round(&mut report.throughput_rounds, engine, cell, result);
            }
            server.stop().await;
        }
    }
    report.throughput = median_rounds(&report.throughput_rounds, |r| r.median);
    if args.no_cpu {
        return Ok(());
    }
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
    for round in 0..rounds {
        for engine in in_round_order(&args.engines, round) {
            let server = Server::start(args, engine).await?;
            for &cell in cpu {
                step += 1;
                let rate = report.rates[&cell_name(cell)];
                args.progress.start(format!(
                    "echo CPU at {} msg/s · round {}/{rounds} · {} · {engine}",
                    thousands(rate),
                    round + 1,
                    cell_name(cell)
                ));
                let result = load(args, engine, &server, cell, Pace::Rate(rate)).await?;
                args.progress.done(format!(
                    "[{step}/{steps}] round {}/{rounds} {engine:>16} {:>12} at {:>7} msg/s: {:.2} µs user + {:.2} µs system",
                    round + 1,
                    cell_name(cell),
                    thousands(rate),
                    result.user_us.unwrap_or(f64::NAN),
                    result.system_us.unwrap_or(f64::NAN),
                ));
                add_round(&mut report.cpu_rounds, engine, cell, result);
            }
            server.stop().await;
        }
    }
    report.cpu = median_rounds(&report.cpu_rounds, |r| {
        r.user_us.unwrap_or(f64::INFINITY) + r.system_us.unwrap_or(0.0)
    });
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
    // Callgrind counts a JIT's instructions as it runs them under its own translation,
    // including compiling them: not a figure to set beside compiled engines.
    for engine in args.engines.iter().filter(|e| node_script(e).is_some()) {
        progress::line(format!(
            "instructions: {engine} runs JavaScript on a JIT; not counted"
        ));
    }
    for engine in args.engines.iter().filter(|e| node_script(e).is_none()) {
        for &cell in cells {
            let name = format!("{engine}-{}x{}", cell.0, cell.1);
            args.progress.start(format!(
                "instructions under callgrind · {} · {engine}",
                cell_name(cell)
            ));
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
            args.progress.done(format!(
                "instructions {engine:>16} {:>12}: {} per message",
                cell_name(cell),
                thousands(per_message)
            ));
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
    if !report.fanout_cpu.is_empty() {
        fanout_cpu_table(report, &mut out);
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
        "### Echo throughput (messages/s, closed loop: each engine's median round, a round's \
         figure the median of its samples)\n"
    );
    let header: Vec<&str> = report.engines.iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "| cell | {} | Switchboard ÷ best peer | Switchboard ÷ raw TCP | every engine within 5 % of raw TCP |",
        header.join(" | ")
    );
    let _ = writeln!(out, "|---|{}---|---|---|", "---:|".repeat(header.len()));
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
            " {}{best_name} | {} | {} |",
            ratio(best.map(|b| b.1)),
            ratio(raw),
            match load_bound(report, cell) {
                Some(true) => "yes: rank by CPU per message",
                Some(false) => "no",
                None => "–",
            }
        );
        out.push_str(&row);
    }
    if report
        .throughput_rounds
        .values()
        .flat_map(|c| c.values())
        .any(|r| r.len() > 1)
    {
        let _ = writeln!(out, "\nEvery round (messages/s, in the order run):\n");
        for cell in &report.cells {
            let mut line = format!("- {cell}:");
            for engine in &report.engines {
                let Some(rounds) = report
                    .throughput_rounds
                    .get(engine)
                    .and_then(|c| c.get(cell))
                else {
                    continue;
                };
                let figures: Vec<String> = rounds.iter().map(|r| thousands(r.median)).collect();
                let _ = write!(line, " {engine} {};", figures.join(" / "));
            }
            line.pop();
            let _ = writeln!(out, "{line}");
        }
    }
}

/// Whether every engine's throughput in `cell` is within 5 % of raw TCP's: the load
/// generator is then the ceiling, and CPU per message at a fixed rate ranks the
/// engines instead (None without a raw TCP figure).
fn load_bound(report: &Report, cell: &str) -> Option<bool> {
    let raw = report.throughput.get("raw")?.get(cell)?.median;
    Some(
        report
            .throughput
            .iter()
            .filter(|(engine, _)| *engine != "raw")
            .filter_map(|(_, cells)| cells.get(cell))
            .all(|r| r.median >= 0.95 * raw),
    )
}

fn cpu_table(report: &Report, out: &mut String) {
    let header: Vec<&str> = report.engines.iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "\n### Server CPU per message at a fixed rate (µs: user + system; each engine's median round by the total)\n"
    );
    let _ = writeln!(
        out,
        "| cell | rate | {} | Switchboard total ÷ best peer's | Switchboard user ÷ best peer's | Switchboard total ÷ raw TCP |",
        header.join(" | ")
    );
    let _ = writeln!(
        out,
        "|---|---:|{}---|---|---|",
        "---:|".repeat(header.len())
    );
    // The quick run's CPU pass has the first cell only.
    let measured = |cell: &String| report.cpu.values().any(|cells| cells.contains_key(cell));
    for cell in report.cells.iter().filter(|c| measured(c)) {
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
        let best_total = best_peer(&report.cpu, cell, |a, b| total(a) < total(b));
        let total_best = match (ours, best_total) {
            (Some(o), Some((name, b))) if total(b) > 0.0 => {
                format!("{:.2}× ({name})", total(o) / total(b))
            }
            _ => "–".into(),
        };
        let total_ratio = match (ours, raw) {
            (Some(o), Some(r)) if total(r) > 0.0 => format!("{:.2}×", total(o) / total(r)),
            _ => "–".into(),
        };
        let _ = writeln!(row, " {total_best} | {user_ratio} | {total_ratio} |");
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

fn fanout_cpu_table(report: &Report, out: &mut String) {
    let _ = writeln!(
        out,
        "\n### Fan-out at a fixed rate: server CPU per delivery (µs: user + system = total)\n"
    );
    let engines = &report.fanout_engines;
    let ours: Vec<&String> = engines.iter().filter(|e| is_ours(e)).collect();
    let ratio_headers: String = ours
        .iter()
        .map(|o| format!(" {o} ÷ this: total (user) |"))
        .collect();
    let _ = writeln!(
        out,
        "| subscribers × publish rate | engine | server CPU per delivery |{ratio_headers} server busy | p50 / p99 ms | delivered / expected |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|{}---:|---:|---:|",
        "---:|".repeat(ours.len())
    );
    let mut rounds = 0;
    for cell in &report.fanout_cpu {
        let label = format!(
            "{} × {} msg/s ({} deliveries/s)",
            thousands(cell.subscribers as f64),
            cell.rate,
            thousands(cell.subscribers as f64 * cell.rate)
        );
        for engine in engines {
            let Some(median) = cell.median(engine) else {
                continue;
            };
            rounds = rounds.max(cell.rounds[engine].len());
            let mut row = format!(
                "| {label} | {engine} | {:.2} + {:.2} = **{:.2}** |",
                median.user_us,
                median.system_us,
                median.total_us()
            );
            for o in &ours {
                let ratio = match cell.median(o) {
                    Some(_) if o == &engine => "–".into(),
                    Some(ours) if median.total_us() > 0.0 && median.user_us > 0.0 => format!(
                        "{:.2}× ({:.2}×)",
                        ours.total_us() / median.total_us(),
                        ours.user_us / median.user_us
                    ),
                    _ => "–".into(),
                };
                let _ = write!(row, " {ratio} |");
            }
            let _ = writeln!(
                row,
                " {:.2} | {:.1} / {:.1} | {}/{}{} |",
                median.busy,
                median.p50_ms,
                median.p99_ms,
                thousands(median.delivered as f64),
                thousands(median.expected as f64),
                if median.held { "" } else { " (not held)" }
            );
            out.push_str(&row);
        }
    }
    let (secs, steps) = report.fanout_cpu.first().map_or((0.0, 0), |c| {
        let steps = c.rounds.values().flatten().map(|r| r.steps.len()).max();
        (c.step_secs, steps.unwrap_or(1).saturating_sub(1))
    });
    let _ = writeln!(
        out,
        "\nEach figure: the median of {rounds} round(s) by total CPU per delivery (a fresh \
         server each, the engines' order reversed every other round), over {steps} steps of {secs} s \
         after a warm-up step; CPU from /proc/PID/task/*/schedstat, split into user and system \
         as /proc/PID/stat's ticks are; p50 and p99 are the medians of the steps'. Not held: a \
         delivery missing, a subscriber closed, or p99 over {} ms. Every round and step is in \
         compare.json.",
        report
            .fanout_cpu
            .first()
            .map_or(f64::NAN, |c| c.p99_bound_ms)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::Step;

    fn step(delivered: u64, user_us: f64, system_us: f64, p99_ms: f64) -> Step {
        Step {
            rate: 10.0,
            published: 10,
            expected: delivered,
            delivered,
            delivered_per_sec: 0.0,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            max_ms: p99_ms,
            closed: 0,
            held: true,
            server_user_us: Some(user_us),
            server_system_us: Some(system_us),
            server_busy: Some(0.5),
        }
    }

    #[test]
    fn a_fixed_rate_round_sums_its_steps_after_the_warm_up() {
        let result = FanoutResult {
            subscribers: 100,
            p99_bound_ms: 250.0,
            steps: vec![
                step(1000, 50.0, 50.0, 900.0),
                step(1000, 2.0, 8.0, 20.0),
                step(3000, 4.0, 6.0, 30.0),
            ],
        };
        let round = FanoutCpuRound::of(1, result.clone(), 2).unwrap();
        assert_eq!(round.user_us, 3.5);
        assert_eq!(round.system_us, 6.5);
        assert_eq!(round.p99_ms, 30.0);
        assert_eq!((round.delivered, round.expected), (4000, 4000));
        assert!(round.held);
        assert_eq!(round.steps.len(), 3);
        // The load stopped before the steps asked for: not held.
        assert!(!FanoutCpuRound::of(1, result, 3).unwrap().held);
        let warm_up_only = FanoutResult {
            subscribers: 100,
            p99_bound_ms: 250.0,
            steps: vec![step(1000, 1.0, 1.0, 1.0)],
        };
        assert!(FanoutCpuRound::of(0, warm_up_only, 2).is_err());
    }
}
