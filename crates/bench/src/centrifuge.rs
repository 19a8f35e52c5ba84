//! The Centrifugo door's benchmarks (`ws://HOST/connection/websocket`, JSON): each
//! starts fresh Switchboard servers itself (`serve --memory`, pinned to one core, the
//! limits per address off) and runs the load in this process, pinned to another core.
//!
//! - `centrifuge-subs`: one connection subscribes to N channels, one command each; the
//!   time it takes, the server's RSS growth for it, then one publication per channel
//!   through the server API, every one checked to arrive.
//! - `centrifuge-memory`: C idle connections with K subscriptions each (channels shared),
//!   beside the same C with none and C room-door connections: the server's RSS growth
//!   per connection and per subscription.
//! - `centrifuge-fanout`: S subscribers of one channel through this door and through the
//!   room door, fed alike (the HTTP APIs) at a fixed rate, runs of the two interleaved:
//!   the server's CPU time per delivered message, the medians and their ratio.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use switchboard_net::{connect, Message, Stream, WebSocket};
use switchboard_protocol::centrifuge::{
    decode_replies, encode_command, Command, ConnectRequest, Encoding, Reply, SubscribeRequest,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::compare::{thousands, Server};
use super::fanout::{self, FanoutArgs, Step, Target};

/// How long the load waits for a reply before it gives up.
const PATIENCE: Duration = Duration::from_secs(30);

/// Where the servers come from and where the load runs.
#[derive(Debug, Clone, Args)]
pub(crate) struct ServerArgs {
    /// The `switchboard` binary [default: the one beside this binary]
    #[arg(long)]
    switchboard: Option<PathBuf>,
    /// The core the server runs on (`taskset -c`).
    #[arg(long, default_value_t = 0)]
    server_core: usize,
    /// The core this process (the load) runs on.
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// The server's runtime worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

/// Starts a fresh server with `extra` config lines (beside the limits per address,
/// off: every connection comes from loopback).
async fn start_server(args: &ServerArgs, extra: &str) -> anyhow::Result<Server> {
    start_server_under(args, extra, &[]).await
}

/// [`start_server`] through `wrapper` (a program and its arguments, e.g. valgrind).
async fn start_server_under(
    args: &ServerArgs,
    extra: &str,
    wrapper: &[String],
) -> anyhow::Result<Server> {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let binary = match &args.switchboard {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("switchboard"),
    };
    let config = std::env::temp_dir().join(format!(
        "switchboard-bench-{}-{}.toml",
        std::process::id(),
        STARTED.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(
        &config,
        format!("max_connections_per_ip = 0\nhandshakes_per_ip_per_sec = 0.0\n{extra}"),
    )?;
    let mut command = tokio::process::Command::new("taskset");
    command
        .args(["-c", &args.server_core.to_string()])
        .args(wrapper)
        .arg(&binary)
        .args(["serve", "--listen", "127.0.0.1:0", "--memory"])
        .args(["--workers", &args.workers.to_string()])
        .arg("--config")
        .arg(&config);
    let server = Server::spawn(command, "switchboard").await;
    // Read at startup; not needed once it listens.
    let _ = std::fs::remove_file(&config);
    let server = server?;
    // Let it settle (its threads started, its first allocations made) before any
    // figure is read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(server)
}

/// Pins every thread of this process to `core` (threads started later inherit it).
fn pin_to_core(core: usize) -> anyhow::Result<()> {
    use rustix::thread::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(core);
    for task in std::fs::read_dir("/proc/self/task")? {
        let tid: i32 = task?
            .file_name()
            .to_string_lossy()
            .parse()
            .context("a thread id")?;
        let Some(pid) = rustix::process::Pid::from_raw(tid) else {
            continue;
        };
        // A thread may have ended since the listing.
        if let Err(error) = sched_setaffinity(Some(pid), &set) {
            if error != rustix::io::Errno::SRCH {
                return Err(error).with_context(|| format!("pinning the load to core {core}"));
            }
        }
    }
    Ok(())
}

/// `{"id":N,"connect":{}}`: anonymous on a server without a key.
pub(crate) fn connect_command(id: u32) -> Command {
    Command {
        id,
        connect: Some(ConnectRequest::default()),
        ..Command::default()
    }
}

/// `{"id":N,"subscribe":{"channel":C}}`.
pub(crate) fn subscribe_command(id: u32, channel: &str) -> Command {
    Command {
        id,
        subscribe: Some(SubscribeRequest {
            channel: channel.to_owned(),
            ..SubscribeRequest::default()
        }),
        ..Command::default()
    }
}

/// Commands as one JSON frame, one per line.
fn frame(commands: &[Command]) -> String {
    let mut text = String::new();
    for command in commands {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(
            std::str::from_utf8(&encode_command(Encoding::Json, command)).expect("JSON is text"),
        );
    }
    text
}

/// The replies of the next message; a ping (an empty reply) is answered with an empty
/// command and not returned. `None`: the server closed.
async fn next_replies(socket: &mut WebSocket<Stream>) -> anyhow::Result<Option<Vec<Reply>>> {
    let message = tokio::time::timeout(PATIENCE, socket.recv())
        .await
        .context("no reply in time")??;
    let text = match message {
        Some(Message::Text(text)) => text,
        Some(_) => return Ok(Some(Vec::new())),
        None => return Ok(None),
    };
    let mut replies = decode_replies(Encoding::Json, text.as_bytes())
        .map_err(|e| anyhow::anyhow!("a reply the protocol cannot read: {}", e.0))?;
    let pings = replies.len();
    replies.retain(|reply| reply.id != 0 || reply.push.is_some());
    for _ in replies.len()..pings {
        socket.send_text("{}").await?;
    }
    Ok(Some(replies))
}

/// A closed connection's close code and reason, for an error message.
fn closed_why(socket: &WebSocket<Stream>) -> String {
    socket.peer_close().map_or_else(
        || "no close frame".into(),
        |frame| format!("{} {}", frame.code.0, frame.reason),
    )
}

/// Sends `commands` in one frame and waits for the reply to each (pushes met on the
/// way are dropped); an error reply is an error.
pub(crate) async fn call(
    socket: &mut WebSocket<Stream>,
    commands: &[Command],
) -> anyhow::Result<Vec<Reply>> {
    socket.send_text(&frame(commands)).await?;
    let mut waiting: HashMap<u32, usize> = commands
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id, i))
        .collect();
    let mut replies: Vec<Option<Reply>> = vec![None; commands.len()];
    while !waiting.is_empty() {
        let Some(received) = next_replies(socket).await? else {
            bail!("the server closed the connection: {}", closed_why(socket));
        };
        for reply in received {
            if let Some(error) = &reply.error {
                bail!(
                    "command {} failed: {} {}",
                    reply.id,
                    error.code,
                    error.message
                );
            }
            if let Some(at) = waiting.remove(&reply.id) {
                replies[at] = Some(reply);
            }
        }
    }
    Ok(replies.into_iter().flatten().collect())
}

/// Reads an idle connection, answering the door's pings, until `stop` changes (then
/// hands it back) or the server closes it (then returns `None`).
async fn keep_idle(
    mut socket: WebSocket<Stream>,
    centrifuge: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<WebSocket<Stream>> {
    loop {
        tokio::select! {
            _ = stop.changed() => return Some(socket),
            received = socket.recv() => match received {
                Ok(Some(Message::Text(text)))
                    if centrifuge && text.as_str().trim() == "{}" =>
                {
                    if socket.send_text("{}").await.is_err() {
                        return None;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            },
        }
    }
}

/// Keep-alive HTTP/1.1 to a server's API.
struct Http {
    host: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Http {
    fn new(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// `POST path` with a JSON body; the response body (an error unless 2xx).
    async fn post(&mut self, path: &str, body: &str) -> anyhow::Result<String> {
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect(&self.host)
                    .await
                    .with_context(|| format!("connecting to the HTTP API at {}", self.host))?;
                stream.set_nodelay(true)?;
                self.buf.clear();
                stream
            }
        };
        let request = fanout::post_request(&self.host, path, body);
        stream.write_all(request.as_bytes()).await?;
        let (keep_alive, body) = fanout::read_http_response(&mut stream, &mut self.buf).await?;
        if keep_alive {
            self.stream = Some(stream);
        }
        Ok(body)
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------
// centrifuge-subs

#[derive(Debug, Args)]
pub(crate) struct SubsArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Channels the connection subscribes to (`subs-0`, `subs-1`, ...). The server is
    /// started with `max_subscriptions_per_connection` at least this, and the command
    /// rate limit lifted.
    #[arg(long, default_value_t = 1000)]
    channels: usize,
    /// Subscribe commands per WebSocket message: 1 sends each in a frame of its own
    /// (pipelined); more batches them, one per line.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Subscribe commands in flight at most (sent, not yet answered); the default sends
    /// them all before reading a reply.
    #[arg(long)]
    window: Option<usize>,
    /// Runs, each on a fresh server; the table has each and the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// HTTP connections the publications go through, in turn.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize)]
struct SubsRun {
    channels: usize,
    /// From the first subscribe sent to the last reply read.
    subscribe_ms: f64,
    /// Server RSS: before the connection, after its connect, after its subscriptions.
    rss_before_kib: u64,
    rss_connected_kib: u64,
    rss_subscribed_kib: u64,
    /// Publications received (each channel's own, exactly once) out of those expected.
    received: usize,
    expected: usize,
    /// From the first publish to the last publication received.
    publish_ms: f64,
}

impl SubsRun {
    fn subscriptions_kib(&self) -> f64 {
        self.rss_subscribed_kib as f64 - self.rss_connected_kib as f64
    }
}

pub(crate) async fn subs(args: SubsArgs) -> anyhow::Result<()> {
    pin_to_core(args.server.load_core)?;
    let mut runs = Vec::new();
    for run in 0..args.runs.max(1) {
        let server = start_server(
            &args.server,
            &format!(
                "max_subscriptions_per_connection = {}\ncommands_per_sec = 1000000000.0\n\
                 commands_burst = 1000000000\n",
                args.channels.max(128)
            ),
        )
        .await?;
        let result = subs_run(&args, &server).await;
        server.stop().await;
        let result = result?;
        eprintln!(
            "centrifuge-subs run {}: {} subscriptions in {:.1} ms, RSS +{} KiB; {}/{} publications in {:.1} ms",
            run + 1,
            result.channels,
            result.subscribe_ms,
            result.subscriptions_kib(),
            result.received,
            result.expected,
            result.publish_ms
        );
        runs.push(result);
    }
    print_subs(&args, &runs)
}

async fn subs_run(args: &SubsArgs, server: &Server) -> anyhow::Result<SubsRun> {
    let pid = server.pid()?;
    let url = format!("ws://{}/connection/websocket", server.address);
    let channels: Vec<String> = (0..args.channels).map(|i| format!("subs-{i}")).collect();
    let rss_before_kib = super::resident_kib(pid)?;
    let mut socket = connect(&url, fanout::client_options()).await?.socket;
    call(&mut socket, &[connect_command(1)]).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_connected_kib = super::resident_kib(pid)?;

    let batch = args.batch.max(1);
    let window = args.window.unwrap_or(args.channels).max(batch);
    let started = Instant::now();
    let (mut sent, mut answered) = (0, 0);
    while answered < channels.len() {
        let mut fed = false;
        while sent < channels.len() && sent - answered + batch <= window.max(batch) {
            let end = (sent + batch).min(channels.len());
            let commands: Vec<Command> = (sent..end)
                .map(|i| subscribe_command(2 + i as u32, &channels[i]))
                .collect();
            socket.feed(&Message::Text(frame(&commands).into())).await?;
            sent = end;
            fed = true;
        }
        if fed {
            socket.flush().await?;
        }
        let Some(replies) = next_replies(&mut socket).await? else {
            bail!("the server closed the connection: {}", closed_why(&socket));
        };
        for reply in replies {
            if let Some(error) = reply.error {
                bail!(
                    "subscribe {} failed: {} {}",
                    reply.id,
                    error.code,
                    error.message
                );
            }
            if reply.subscribe.is_some() {
                answered += 1;
            }
        }
    }
    let subscribe_ms = started.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_subscribed_kib = super::resident_kib(pid)?;

    // Every channel's publication, once each: data {"n": i} on channel subs-i.
    let expected = channels.len();
    let reading = tokio::spawn(async move {
        let mut seen = vec![false; expected];
        let mut received = 0;
        let mut last = Instant::now();
        while received < expected {
            let Some(replies) = next_replies(&mut socket).await? else {
                bail!("the server closed the connection: {}", closed_why(&socket));
            };
            for reply in replies {
                let Some(push) = reply.push else { continue };
                let Some(publication) = push.publication else {
                    continue;
                };
                let data: serde_json::Value = serde_json::from_slice(&publication.data)?;
                let n = data["n"].as_u64().unwrap_or(u64::MAX) as usize;
                if push.channel == format!("subs-{n}") && n < expected && !seen[n] {
                    seen[n] = true;
                    received += 1;
                    last = Instant::now();
                }
            }
        }
        super::abort(socket);
        anyhow::Ok((received, last))
    });
    let publishing = Instant::now();
    let mut publishers = JoinSet::new();
    let lanes = args.publishers.max(1);
    for lane in 0..lanes {
        let mut http = Http::new(&server.address);
        let mine: Vec<(usize, String)> = channels
            .iter()
            .enumerate()
            .skip(lane)
            .step_by(lanes)
            .map(|(i, c)| (i, c.clone()))
            .collect();
        publishers.spawn(async move {
            for (i, channel) in mine {
                let body = serde_json::json!({"channel": channel, "data": {"n": i}}).to_string();
                let answer = http.post("/api/publish", &body).await?;
                if !answer.starts_with(r#"{"result""#) {
                    bail!("publish to {channel}: {answer}");
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = publishers.join_next().await {
        done.context("a publisher panicked")??;
    }
    let (received, last) = tokio::time::timeout(PATIENCE, reading)
        .await
        .context("publications still missing after 30 s")?
        .context("the reader panicked")??;
    Ok(SubsRun {
        channels: channels.len(),
        subscribe_ms,
        rss_before_kib,
        rss_connected_kib,
        rss_subscribed_kib,
        received,
        expected,
        publish_ms: last.saturating_duration_since(publishing).as_secs_f64() * 1e3,
    })
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
fn print_subs(args: &SubsArgs, runs: &[SubsRun]) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(runs)?);
        return Ok(());
    }
    let window = args.window.unwrap_or(args.channels);
    let how = if args.batch <= 1 {
        "one command per frame, pipelined".to_owned()
    } else {
        format!("{} commands per frame", args.batch)
    };
    println!(
        "One Centrifugo connection subscribes to {} channels ({how}, up to {} in flight); \
         then one publication per channel through POST /api/publish ({} HTTP connections).",
        args.channels, window, args.publishers
    );
    println!();
    println!(
        "| run | subscribe all (ms) | server RSS: connection (KiB) | subscriptions (KiB) | per subscription (KiB) | publications received | publish → last received (ms) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (i, run) in runs.iter().enumerate() {
        println!(
            "| {} | {:.1} | {} | {:.0} | {:.2} | {}/{} | {:.1} |",
            i + 1,
            run.subscribe_ms,
            run.rss_connected_kib as i64 - run.rss_before_kib as i64,
            run.subscriptions_kib(),
            run.subscriptions_kib() / run.channels.max(1) as f64,
            run.received,
            run.expected,
            run.publish_ms
        );
    }
    let med = |f: &dyn Fn(&SubsRun) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    println!(
        "| median | {:.1} | {:.0} | {:.0} | {:.2} | {}/{} | {:.1} |",
        med(&|r| r.subscribe_ms),
        med(&|r| r.rss_connected_kib as f64 - r.rss_before_kib as f64),
        med(&|r| r.subscriptions_kib()),
        med(&|r| r.subscriptions_kib() / r.channels.max(1) as f64),
        runs.iter().map(|r| r.received).sum::<usize>(),
        runs.iter().map(|r| r.expected).sum::<usize>(),
        med(&|r| r.publish_ms),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// centrifuge-memory

#[derive(Debug, Args)]
pub(crate) struct MemoryArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Connections per row.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Subscriptions per Centrifugo connection, a row each (0: connected, none); the
    /// room door's row follows (one channel per connection).
    #[arg(long, value_delimiter = ',', default_value = "10,1,0")]
    subscriptions: Vec<usize>,
    /// Distinct channels the subscriptions share (connection i's j-th subscription is
    /// `mem-((i × K + j) mod channels)`; room connection i joins `mem-(i mod channels)`).
    #[arg(long, default_value_t = 1000)]
    channels: usize,
    /// Leave out the room door's row.
    #[arg(long)]
    no_room: bool,
    /// Seconds the connections sit idle before the server's memory is read.
    #[arg(long, default_value_t = 2.0)]
    wait: f64,
    /// Source addresses to spread the connections over (127.0.0.1 up to 127.0.0.N).
    #[arg(long, default_value_t = 1)]
    source_addrs: u8,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Door {
    /// The Centrifugo door over WebSocket.
    Centrifuge,
    /// The room door over WebSocket.
    Room,
    /// The room door over Server-Sent Events (`GET /room/bench`).
    RoomSse,
}

#[derive(Debug, Clone, Serialize)]
struct MemoryRow {
    door: Door,
    connections: usize,
    subscriptions_each: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// Seconds to open (and subscribe) every connection.
    open_secs: f64,
}

impl MemoryRow {
    fn kib_per_connection(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.connections.max(1) as f64
    }
}

pub(crate) async fn memory(args: MemoryArgs) -> anyhow::Result<()> {
    let limit = super::raise_fd_limit();
    if args.connections as u64 + 64 > limit {
        bail!(
            "{} connections need more open files than this process may have ({limit})",
            args.connections
        );
    }
    pin_to_core(args.server.load_core)?;
    let mut rows_wanted: Vec<(Door, usize)> = args
        .subscriptions
        .iter()
        .map(|&k| (Door::Centrifuge, k))
        .collect();
    if !args.no_room {
        rows_wanted.push((Door::Room, 1));
    }
    if rows_wanted
        .iter()
        .any(|&(door, k)| door == Door::Centrifuge && k > args.channels)
    {
        bail!("more subscriptions per connection than --channels");
    }
    let mut rows = Vec::new();
    for (door, k) in rows_wanted {
        let server = start_server(
            &args.server,
            &format!("max_subscriptions_per_connection = {}\n", k.max(128)),
        )
        .await?;
        let row = memory_row(&args, &server, door, k).await;
        server.stop().await;
        let row = row?;
        eprintln!(
            "centrifuge-memory {door:?} × {} with {k} subscription(s) each: {:.2} KiB per connection (opened in {:.1} s)",
            row.connections,
            row.kib_per_connection(),
            row.open_secs
        );
        rows.push(row);
    }
    print_memory(&args, &rows)
}

async fn memory_row(
    args: &MemoryArgs,
    server: &Server,
    door: Door,
    k: usize,
) -> anyhow::Result<MemoryRow> {
    let pid = server.pid()?;
    let address = server.address.clone();
    let rss_before_kib = super::resident_kib(pid)?;
    let started = Instant::now();
    let (channels, spread) = (args.channels.max(1), args.source_addrs);
    let sockets = super::open_many(args.connections, |i| {
        let address = address.clone();
        async move {
            let mut options = fanout::client_options();
            options.local_address = super::source_address(i, spread);
            match door {
                Door::Centrifuge => {
                    let url = format!("ws://{address}/connection/websocket");
                    let mut socket = connect(&url, options).await?.socket;
                    call(&mut socket, &[connect_command(1)]).await?;
                    if k > 0 {
                        // The K subscribes in one frame.
                        let commands: Vec<Command> = (0..k)
                            .map(|j| {
                                subscribe_command(
                                    2 + j as u32,
                                    &format!("mem-{}", (i * k + j) % channels),
                                )
                            })
                            .collect();
                        call(&mut socket, &commands).await?;
                    }
                    anyhow::Ok(socket)
                }
                // The memory workload holds WebSockets (its doors are the first two).
                Door::Room | Door::RoomSse => {
                    let url = format!("ws://{address}/room/mem-{}?name=u{i}", i % channels);
                    let mut socket = connect(&url, options).await?.socket;
                    fanout::wait_for(&mut socket, r#""type":"welcome""#).await?;
                    anyhow::Ok(socket)
                }
            }
        }
    })
    .await?;
    let open_secs = started.elapsed().as_secs_f64();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut idle = JoinSet::new();
    for socket in sockets {
        idle.spawn(keep_idle(socket, door == Door::Centrifuge, stopped.clone()));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.wait)).await;
    let rss_after_kib = super::resident_kib(pid)?;
    let _ = stop.send(true);
    let mut closed = 0;
    while let Some(done) = idle.join_next().await {
        match done.context("an idle connection panicked")? {
            Some(socket) => super::abort(socket),
            None => closed += 1,
        }
    }
    // A connection the server closed would leave the figure low.
    if closed > 0 {
        bail!("the server closed {closed} idle connections during the wait");
    }
    Ok(MemoryRow {
        door,
        connections: args.connections,
        subscriptions_each: if door == Door::Room { 1 } else { k },
        rss_before_kib,
        rss_after_kib,
        open_secs,
    })
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
fn print_memory(args: &MemoryArgs, rows: &[MemoryRow]) -> anyhow::Result<()> {
    let none = rows
        .iter()
        .find(|r| r.door == Door::Centrifuge && r.subscriptions_each == 0);
    let per_subscription = |row: &MemoryRow| -> Option<f64> {
        let none = none?;
        (row.door == Door::Centrifuge && row.subscriptions_each > 0).then(|| {
            (row.kib_per_connection() - none.kib_per_connection()) * 1024.0
                / row.subscriptions_each as f64
        })
    };
    if args.json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| {
                serde_json::json!({
                    "row": row,
                    "kib_per_connection": row.kib_per_connection(),
                    "bytes_per_subscription": per_subscription(row),
                })
            })
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "{} idle connections per row, each row on a fresh server; channels shared among {} \
         distinct ones; RSS read after {} s idle.",
        thousands(args.connections as f64),
        thousands(args.channels as f64),
        args.wait
    );
    println!();
    println!(
        "| door | subscriptions each | server RSS before → after (MiB) | KiB per connection | bytes per subscription (vs 0 subscriptions) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for row in rows {
        let door = match row.door {
            Door::Centrifuge => "Centrifugo (`/connection/websocket`)",
            Door::Room => "room (`/room/ROOM?name=N`)",
            Door::RoomSse => "room over SSE",
        };
        println!(
            "| {door} | {} | {:.1} → {:.1} | {:.2} | {} |",
            row.subscriptions_each,
            row.rss_before_kib as f64 / 1024.0,
            row.rss_after_kib as f64 / 1024.0,
            row.kib_per_connection(),
            per_subscription(row).map_or_else(|| "–".into(), |b| format!("{b:.0}")),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// centrifuge-fanout

#[derive(Debug, Args)]
pub(crate) struct DoorFanoutArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Subscribers of the one channel (`bench`).
    #[arg(long, default_value_t = 5000)]
    subscribers: usize,
    /// Publications per second, through the HTTP API (this door: `POST /api/publish`;
    /// rooms: `POST /api/rooms/bench/messages`); several (`20,200`): the runs of each,
    /// one rate after the other.
    #[arg(long, value_delimiter = ',', default_value = "200")]
    rates: Vec<f64>,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Runs of each door, interleaved (the first door of a round alternates), each on a
    /// fresh server.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Text bytes per publication.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds each run waits after its last publish for the deliveries still on
    /// their way (CPU is read once all arrived, or then).
    #[arg(long, default_value_t = 60.0)]
    grace_secs: f64,
    /// The door measured against the room door over WebSocket.
    #[arg(long, value_enum, default_value = "centrifuge")]
    door: Door,
    /// The bar for that door's server CPU per delivery ÷ the room door's.
    #[arg(long, default_value_t = 1.15)]
    bar: f64,
    /// Run each server under `valgrind --tool=callgrind`, its dumps in this directory,
    /// and report its user-space instructions per delivery (counted from the first
    /// publication to the last delivery; CPU times under valgrind mean nothing). Slow:
    /// use far fewer subscribers and publications.
    #[arg(long)]
    callgrind: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize)]
struct DoorRun {
    door: Door,
    rate: f64,
    round: usize,
    step: Step,
    /// The server's instructions per delivery (with `--callgrind`).
    #[serde(skip_serializing_if = "Option::is_none")]
    instructions: Option<f64>,
}

impl DoorRun {
    fn total_us(&self) -> f64 {
        self.step.server_user_us.unwrap_or(f64::NAN)
            + self.step.server_system_us.unwrap_or(f64::NAN)
    }
}

pub(crate) async fn door_fanout(args: DoorFanoutArgs) -> anyhow::Result<()> {
    let limit = super::raise_fd_limit();
    if args.subscribers as u64 + 64 > limit {
        bail!(
            "{} subscribers need more open files than this process may have ({limit})",
            args.subscribers
        );
    }
    pin_to_core(args.server.load_core)?;
    if let Some(dir) = &args.callgrind {
        std::fs::create_dir_all(dir)?;
    }
    let mut runs = Vec::new();
    let progress = super::progress::Steps::new((args.rates.len() * args.runs.max(1) * 2) as u64);
    for &rate in &args.rates {
        for round in 0..args.runs.max(1) {
            let order = if round % 2 == 0 {
                [args.door, Door::Room]
            } else {
                [Door::Room, args.door]
            };
            for door in order {
                progress.start(format!("{rate} msg/s · round {} · {door:?}", round + 1));
                let run = door_fanout_run(&args, rate, round, door).await?;
                progress.done(format!(
                    "centrifuge-fanout {rate}/s round {} {door:?}: {}/{} delivered, server CPU {:.3} µs per delivery{}",
                    round + 1,
                    run.step.delivered,
                    run.step.expected,
                    run.total_us(),
                    run.instructions
                        .map_or_else(String::new, |n| format!(", {n:.0} instructions per delivery"))
                ));
                runs.push(run);
            }
        }
    }
    progress.finish();
    print_door_fanout(&args, &runs)
}

/// One door's run on a fresh server.
async fn door_fanout_run(
    args: &DoorFanoutArgs,
    rate: f64,
    round: usize,
    door: Door,
) -> anyhow::Result<DoorRun> {
    let out_file = match &args.callgrind {
        Some(dir) => {
            let name = format!("{door:?}-{rate}-{}.out", round + 1).to_lowercase();
            let out_file = std::path::absolute(dir.join(name))?;
            for old in super::compare::callgrind_parts(&out_file)? {
                std::fs::remove_file(old)?;
            }
            Some(out_file)
        }
        None => None,
    };
    let server = match &out_file {
        Some(out_file) => {
            let wrapper = [
                "valgrind".to_owned(),
                "--tool=callgrind".to_owned(),
                format!("--callgrind-out-file={}", out_file.display()),
            ];
            start_server_under(&args.server, "", &wrapper)
                .await
                .context("starting the server under valgrind (is valgrind installed?)")?
        }
        None => start_server(&args.server, "").await?,
    };
    let run = door_fanout_load(args, rate, &server, door, out_file.as_deref()).await;
    server.stop().await;
    let (step, instructions) = run?;
    Ok(DoorRun {
        door,
        rate,
        round,
        step,
        instructions,
    })
}

async fn door_fanout_load(
    args: &DoorFanoutArgs,
    rate: f64,
    server: &Server,
    door: Door,
    callgrind: Option<&std::path::Path>,
) -> anyhow::Result<(Step, Option<f64>)> {
    let (url, target) = match door {
        Door::Centrifuge => (
            format!("ws://{}/connection/websocket", server.address),
            Target::Centrifuge,
        ),
        Door::Room | Door::RoomSse => (
            format!("ws://{}/room/bench", server.address),
            Target::Switchboard,
        ),
    };
    let load = FanoutArgs {
        url,
        also: Vec::new(),
        target,
        subscribers: args.subscribers,
        rates: vec![rate],
        step_secs: args.secs,
        p99_bound_ms: 250.0,
        size: args.size,
        app_id: String::new(),
        app_key: String::new(),
        app_secret: String::new(),
        json: false,
        every_step: false,
        sse: door == Door::RoomSse,
        api: true,
        channel: "bench".into(),
        server_pid: Some(server.pid()?),
        // Every delivery is waited for, so the CPU time is that of all of them.
        grace_secs: Some(args.grace_secs),
    };
    // Under callgrind the counters are zeroed (dumped) once the subscribers are in.
    let result = fanout::fanout_load_with(&load, || async {
        if let Some(out_file) = callgrind {
            super::compare::dump_counts(server, out_file).await?;
        }
        Ok(())
    })
    .await?;
    let step = result
        .steps
        .into_iter()
        .next()
        .context("the fan-out ran no step")?;
    let instructions = match callgrind {
        Some(out_file) => {
            let counted = super::compare::dump_counts(server, out_file).await?;
            Some(counted as f64 / step.delivered.max(1) as f64)
        }
        None => None,
    };
    Ok((step, instructions))
}

/// One door's medians at one rate.
#[derive(Debug, Clone, Copy, Serialize)]
struct DoorMedians {
    user_us: f64,
    system_us: f64,
    total_us: f64,
    busy: f64,
    p99_ms: f64,
    delivered: u64,
    expected: u64,
    instructions: Option<f64>,
}

impl DoorMedians {
    fn of(runs: &[&DoorRun]) -> Self {
        let of = |f: &dyn Fn(&DoorRun) -> f64| {
            median(&mut runs.iter().map(|r| f(r)).collect::<Vec<_>>())
        };
        Self {
            user_us: of(&|r| r.step.server_user_us.unwrap_or(f64::NAN)),
            system_us: of(&|r| r.step.server_system_us.unwrap_or(f64::NAN)),
            total_us: of(&|r| r.total_us()),
            busy: of(&|r| r.step.server_busy.unwrap_or(f64::NAN)),
            p99_ms: of(&|r| r.step.p99_ms),
            delivered: runs.iter().map(|r| r.step.delivered).sum(),
            expected: runs.iter().map(|r| r.step.expected).sum(),
            instructions: runs
                .iter()
                .all(|r| r.instructions.is_some())
                .then(|| of(&|r| r.instructions.unwrap_or(f64::NAN))),
        }
    }
}

fn door_name(door: Door) -> &'static str {
    match door {
        Door::Centrifuge => "Centrifugo",
        Door::Room => "room",
        Door::RoomSse => "room over SSE",
    }
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
fn print_door_fanout(args: &DoorFanoutArgs, runs: &[DoorRun]) -> anyhow::Result<()> {
    let medians = |rate: f64, door: Door| {
        let mine: Vec<&DoorRun> = runs
            .iter()
            .filter(|r| r.door == door && r.rate == rate)
            .collect();
        DoorMedians::of(&mine)
    };
    let summary: Vec<(f64, DoorMedians, DoorMedians)> = args
        .rates
        .iter()
        .map(|&rate| (rate, medians(rate, args.door), medians(rate, Door::Room)))
        .collect();
    if args.json {
        let rates: Vec<serde_json::Value> = summary
            .iter()
            .map(|(rate, centrifuge, room)| {
                serde_json::json!({
                    "rate": rate,
                    "centrifuge": centrifuge,
                    "room": room,
                    "ratio": centrifuge.total_us / room.total_us,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"runs": runs, "medians": rates, "bar": args.bar})
        );
        return Ok(());
    }
    let counted = args.callgrind.is_some();
    println!(
        "{} subscribers of one channel; publications through the HTTP API at a fixed rate for \
         {} s ({} B of text each); each run on a fresh server (`serve --memory --workers {}` \
         on core {}, the load on core {}); rounds alternate which door goes first{}.",
        thousands(args.subscribers as f64),
        args.secs,
        args.size,
        args.server.workers,
        args.server.server_core,
        args.server.load_core,
        if counted {
            "; the server under callgrind"
        } else {
            ""
        }
    );
    println!();
    println!(
        "| rate (msg/s) | round | door | delivered / expected | p50 ms | p99 ms | server busy (cores) | server CPU per delivery, µs (user + system = total) |{}",
        if counted { " instructions per delivery |" } else { "" }
    );
    println!(
        "|---:|---:|---|---:|---:|---:|---:|---:|{}",
        if counted { "---:|" } else { "" }
    );
    for run in runs {
        println!(
            "| {} | {} | {} | {}/{} | {:.1} | {:.1} | {:.2} | {:.3} + {:.3} = {:.3} |{}",
            run.rate,
            run.round + 1,
            door_name(run.door),
            run.step.delivered,
            run.step.expected,
            run.step.p50_ms,
            run.step.p99_ms,
            run.step.server_busy.unwrap_or(f64::NAN),
            run.step.server_user_us.unwrap_or(f64::NAN),
            run.step.server_system_us.unwrap_or(f64::NAN),
            run.total_us(),
            run.instructions
                .map_or_else(String::new, |n| format!(" {} |", thousands(n)))
        );
    }
    println!();
    println!(
        "| rate (msg/s) | door | delivered / expected (all runs) | median p99 ms | median server busy | median server CPU per delivery, µs (user + system = total) | {} ÷ room |{}",
        door_name(args.door),
        if counted { " median instructions per delivery |" } else { "" }
    );
    println!(
        "|---:|---|---:|---:|---:|---:|---:|{}",
        if counted { "---:|" } else { "" }
    );
    for (rate, centrifuge, room) in &summary {
        for (door, m) in [(args.door, centrifuge), (Door::Room, room)] {
            let ratio = if door == args.door {
                format!(
                    "{:.2}× (user {:.2}×, system {:.2}×)",
                    centrifuge.total_us / room.total_us,
                    centrifuge.user_us / room.user_us,
                    centrifuge.system_us / room.system_us
                )
            } else {
                String::new()
            };
            let instructions = match (counted, m.instructions) {
                (false, _) => String::new(),
                (true, Some(n)) if door == args.door => format!(
                    " {} ({:.2}×) |",
                    thousands(n),
                    n / room.instructions.unwrap_or(f64::NAN)
                ),
                (true, Some(n)) => format!(" {} |", thousands(n)),
                (true, None) => " – |".into(),
            };
            println!(
                "| {rate} | {} | {}/{} | {:.1} | {:.2} | {:.3} + {:.3} = {:.3} | {ratio} |{instructions}",
                door_name(door),
                m.delivered,
                m.expected,
                m.p99_ms,
                m.busy,
                m.user_us,
                m.system_us,
                m.total_us,
            );
        }
    }
    println!();
    if counted {
        // Under valgrind the CPU times are valgrind's: the instructions are the figure.
        for (rate, centrifuge, room) in &summary {
            println!(
                "{rate} msg/s: {} ÷ room, median instructions per delivery {:.2}× \
                 (CPU times under valgrind are not the bar's)",
                door_name(args.door),
                centrifuge.instructions.unwrap_or(f64::NAN) / room.instructions.unwrap_or(f64::NAN)
            );
        }
        return Ok(());
    }
    for (rate, centrifuge, room) in &summary {
        let ratio = centrifuge.total_us / room.total_us;
        println!(
            "{rate} msg/s: {} ÷ room, median server CPU per delivery {ratio:.2}×; the bar ≤ {:.2}×: {}",
            door_name(args.door),
            args.bar,
            if ratio <= args.bar { "met" } else { "not met" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_one_per_line() {
        let text = frame(&[connect_command(1), subscribe_command(2, "a")]);
        assert_eq!(
            text,
            "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"a\"}}"
        );
    }

    #[test]
    fn medians_of_even_and_odd_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
