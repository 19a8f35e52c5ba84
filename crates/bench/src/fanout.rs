//! `switchboard bench fanout`: one room (or channel) with many subscribers and a
//! publisher at rising rates. Each published message carries its send time; every
//! subscriber records publish-to-receive latency. Per rate step: p50/p99/max latency,
//! messages delivered out of those expected, delivered messages/s; the result is the
//! highest rate whose deliveries were all made with p99 under the bound.
//!
//! Five kinds of server are understood, so peers can be measured with the same load:
//! a Switchboard room, Switchboard's Centrifugo door (subscribers connect and subscribe
//! to one channel; the publisher posts to the server API), a broadcast server (every
//! text message from any connection goes to all of them), a Pusher-protocol server
//! such as Sockudo (subscribers join a channel; the publisher posts signed HTTP requests
//! to its events API), and a Socket.IO server whose clients share one room (subscribers
//! and the publisher speak Engine.IO 4 / Socket.IO 5 over WebSocket, see
//! [`socketio`]). With `--server-pid` each step also reports the server's CPU time
//! (user and system, from /proc) per delivered message.
//!
//! Where the publisher is itself a member (a room member, a broadcast client, a
//! Socket.IO client in the room) it receives its own messages too; those are read and
//! dropped, never counted: a step expects subscribers × published deliveries.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use switchboard_net::{connect, ClientOptions, Message, Stream, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

mod socketio;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub(crate) enum Target {
    /// A Switchboard room URL (`ws://HOST/room/ROOM`).
    Switchboard,
    /// Switchboard's Centrifugo door (`ws://HOST/connection/websocket`): each subscriber
    /// connects and subscribes to `--channel`; the publisher is the server API
    /// (`POST /api/publish`).
    Centrifuge,
    /// A server that relays every text message to every connection (`ws://HOST/`).
    Broadcast,
    /// A Pusher-protocol server (`ws://HOST/app/KEY?protocol=7`, events API over HTTP).
    Pusher,
    /// A Socket.IO 4 server (`ws://HOST/socket.io/?EIO=4&transport=websocket`) that puts
    /// every client in one room and sends each `message` event a client emits to the
    /// room: subscribers and the publisher are its clients.
    #[value(name = "socketio")]
    SocketIo,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct FanoutArgs {
    /// The subscribers' URL (the publisher's too).
    pub(crate) url: String,
    /// More URLs of the same room on other nodes of a cluster: subscribers are spread
    /// over URL and these, one after another; the publisher stays on URL.
    #[arg(long, value_delimiter = ',')]
    pub(crate) also: Vec<String>,
    /// What kind of server is at the URL.
    #[arg(long, value_enum, default_value = "switchboard")]
    pub(crate) target: Target,
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub(crate) subscribers: usize,
    /// Publish rates to step through, messages per second; stops after two rates in a
    /// row that are not held.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,5,10,20,50,100,200,500,1000,2000,5000"
    )]
    pub(crate) rates: Vec<f64>,
    /// Seconds of publishing per rate.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) step_secs: f64,
    /// The p99 latency bound, in milliseconds, a rate must stay under to be held.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) p99_bound_ms: f64,
    /// Text bytes per published message (the marker included).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Publish through the server's HTTP API (a room: `POST /api/rooms/ROOM/messages`
    /// with `text`), not a WebSocket member; always so with `--target centrifuge`
    /// (`POST /api/publish` with `data: {"text": ...}`).
    #[arg(long)]
    pub(crate) api: bool,
    /// The channel Centrifugo-door subscribers subscribe to.
    #[arg(long, default_value = "bench")]
    pub(crate) channel: String,
    /// The server's process id: each step then reports the server's CPU time (user +
    /// system, /proc) per delivered message, from its first publish to its last
    /// delivery.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Seconds a step waits after its last publish for deliveries still on their way
    /// [default: 4 × the p99 bound, at least 2]; late ones count, a step not held.
    #[arg(long)]
    pub(crate) grace_secs: Option<f64>,
    /// Pusher app id, key and secret (with `--target pusher`).
    #[arg(long, default_value = "app-id")]
    pub(crate) app_id: String,
    #[arg(long, default_value = "app-key")]
    pub(crate) app_key: String,
    #[arg(long, default_value = "app-secret")]
    pub(crate) app_secret: String,
    /// Subscribers read the room as Server-Sent Events (`GET /room/ROOM`, `Accept:
    /// text/event-stream`) instead of over WebSocket (with `--target switchboard`).
    #[arg(long)]
    pub(crate) sse: bool,
    /// Run every rate given, held or not (the fixed-rate mode: the server's CPU per
    /// delivery is wanted at each step), instead of stopping after two not held.
    #[arg(long)]
    pub(crate) every_step: bool,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub(crate) json: bool,
}

/// One rate step's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Step {
    pub(crate) rate: f64,
    pub(crate) published: u64,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    /// Delivered messages per second, from the first publish to the last delivery.
    pub(crate) delivered_per_sec: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// Subscribers the server had closed by the end of the step.
    pub(crate) closed: usize,
    pub(crate) held: bool,
    /// The server's CPU time per delivered message, µs (with `--server-pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) server_user_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) server_system_us: Option<f64>,
    /// The server's CPU time over the step's wall time (1.0: one core busy throughout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) server_busy: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FanoutResult {
    pub(crate) subscribers: usize,
    pub(crate) p99_bound_ms: f64,
    pub(crate) steps: Vec<Step>,
}

impl FanoutResult {
    /// The highest step held: all deliveries made, p99 under the bound.
    pub(crate) fn best_held(&self) -> Option<&Step> {
        self.steps
            .iter()
            .filter(|s| s.held)
            .max_by(|a, b| a.delivered_per_sec.total_cmp(&b.delivered_per_sec))
    }
}

/// Latency buckets: bucket `i > 0` holds latencies up to `GROWTH^i` µs (4 % apart).
const GROWTH: f64 = 1.04;
const BUCKETS: usize = 480;

/// A lock-free latency histogram, one per rate step, shared by every subscriber.
pub(super) struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    max_ns: AtomicU64,
    /// Nanoseconds after the epoch of the last delivery.
    last_ns: AtomicU64,
}

impl Histogram {
    pub(super) fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
        }
    }

    pub(super) fn record(&self, latency_ns: u64, now_ns: u64) {
        let us = latency_ns as f64 / 1000.0;
        let bucket = if us <= 1.0 {
            0
        } else {
            ((us.ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
        };
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_ns.fetch_max(latency_ns, Ordering::Relaxed);
        self.last_ns.fetch_max(now_ns, Ordering::Relaxed);
    }

    /// Latencies recorded, and the largest in milliseconds.
    pub(super) fn count_and_max_ms(&self) -> (u64, f64) {
        let max = self.max_ns.load(Ordering::Relaxed) as f64 / 1e6;
        (self.count.load(Ordering::Relaxed), max)
    }

    /// The latency at quantile `q` in milliseconds (the upper edge of its bucket).
    pub(super) fn quantile_ms(&self, q: f64) -> f64 {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 {
            return f64::NAN;
        }
        let rank = ((count as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                return GROWTH.powi(i as i32) / 1000.0;
            }
        }
        f64::NAN
    }
}

/// Where the load keeps its clock and its figures.
struct Shared {
    epoch: Instant,
    steps: Vec<Histogram>,
    /// Subscribers whose connection ended during the load (a server closing a
    /// subscriber that fell behind, say): a step during which any did is not held.
    closed: AtomicUsize,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Records a message if it carries a marker `~T{step}:{ns}~` from this run.
    fn observe(&self, payload: &[u8]) {
        let Some((step, sent_ns)) = parse_marker(payload) else {
            return;
        };
        if let Some(histogram) = self.steps.get(step) {
            let now = self.now_ns();
            histogram.record(now.saturating_sub(sent_ns), now);
        }
    }
}

pub(super) fn marker(step: usize, sent_ns: u64, size: usize) -> String {
    let mut text = format!("~T{step}:{sent_ns}~");
    while text.len() < size {
        text.push('x');
    }
    text
}

pub(super) fn parse_marker(payload: &[u8]) -> Option<(usize, u64)> {
    let at = payload.windows(2).position(|w| w == b"~T")? + 2;
    let rest = &payload[at..];
    let end = rest.iter().position(|&b| b == b'~')?;
    let field = std::str::from_utf8(&rest[..end]).ok()?;
    let (step, ns) = field.split_once(':')?;
    Some((step.parse().ok()?, ns.parse().ok()?))
}

pub(super) fn client_options() -> ClientOptions {
    let mut options = ClientOptions::default();
    options.config = options.config.with_deflate(None);
    options.connect_timeout = Duration::from_secs(30);
    options
}

fn with_query(url: &str, pair: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{pair}")
}

/// A subscriber's connection (moved once, into its task: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Subscriber {
    WebSocket(WebSocket<Stream>),
    /// A room's event stream: the request went as HTTP/1.0, so the rest of the
    /// connection is the stream; what was read past the head so far.
    EventStream(TcpStream, Vec<u8>),
}

/// Opens a room's event stream at `base` (`ws://HOST/room/ROOM`) and reads up to its
/// welcome.
async fn subscribe_sse(base: &str) -> anyhow::Result<Subscriber> {
    let host = super::host_port(base);
    let path = &base[base.find(host).map_or(0, |at| at + host.len())..];
    let path = with_query(path, "name=viewer");
    let mut stream = TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting a subscriber to {host}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buffer.windows(9).any(|w| w == br#""welcome""#) {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            bail!(
                "the server closed an event stream before its welcome: {}",
                String::from_utf8_lossy(&buffer)
            );
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    if !buffer.starts_with(b"HTTP/1.1 200") && !buffer.starts_with(b"HTTP/1.0 200") {
        bail!(
            "the event stream was refused: {}",
            String::from_utf8_lossy(&buffer)
        );
    }
    let end = buffer
        .windows(2)
        .rposition(|w| w == b"\n\n")
        .map_or(0, |at| at + 2);
    buffer.drain(..end);
    Ok(Subscriber::EventStream(stream, buffer))
}

/// Opens a subscriber and waits until it is part of the room or channel.
async fn subscribe(args: &FanoutArgs, i: usize) -> anyhow::Result<Subscriber> {
    let base = match i % (1 + args.also.len()) {
        0 => &args.url,
        n => &args.also[n - 1],
    };
    if args.sse {
        if args.target != Target::Switchboard {
            bail!("--sse reads a Switchboard room (--target switchboard)");
        }
        return subscribe_sse(base).await;
    }
    let url = match args.target {
        // One user for every subscriber (a dashboard's viewers under one account), so
        // setting up 10k subscribers does not add 10k² join events and welcome lists:
        // the peers have no presence, and the figure compared is the fan-out itself.
        Target::Switchboard => with_query(base, "name=viewer"),
        Target::Centrifuge | Target::Broadcast | Target::Pusher | Target::SocketIo => base.clone(),
    };
    let mut socket = connect(&url, client_options())
        .await
        .with_context(|| format!("connecting a subscriber to {url}"))?
        .socket;
    let ready: &str = match args.target {
        Target::Switchboard => r#""type":"welcome""#,
        Target::Centrifuge => {
            // Anonymous (a server without a key): in no presence, as the room door's
            // subscribers are one user.
            super::centrifuge::call(&mut socket, &[super::centrifuge::connect_command(1)]).await?;
            super::centrifuge::call(
                &mut socket,
                &[super::centrifuge::subscribe_command(2, &args.channel)],
            )
            .await?;
            return Ok(Subscriber::WebSocket(socket));
        }
        Target::Broadcast => return Ok(Subscriber::WebSocket(socket)),
        Target::SocketIo => {
            socketio::join(&mut socket).await?;
            return Ok(Subscriber::WebSocket(socket));
        }
        Target::Pusher => "pusher:connection_established",
    };
    wait_for(&mut socket, ready).await?;
    if args.target == Target::Pusher {
        socket
            .send_text(r#"{"event":"pusher:subscribe","data":{"channel":"bench"}}"#)
            .await?;
        wait_for(&mut socket, "pusher_internal:subscription_succeeded").await?;
    }
    Ok(Subscriber::WebSocket(socket))
}

pub(super) async fn wait_for(socket: &mut WebSocket<Stream>, needle: &str) -> anyhow::Result<()> {
    loop {
        match socket.recv().await? {
            Some(Message::Text(text)) if text.as_str().contains(needle) => return Ok(()),
            Some(_) => {}
            None => bail!("the server closed a subscriber before it was ready"),
        }
    }
}

async fn subscriber(subscriber: Subscriber, shared: Arc<Shared>, target: Target) {
    let mut socket = match subscriber {
        Subscriber::WebSocket(socket) => socket,
        Subscriber::EventStream(stream, buffer) => {
            return event_stream_subscriber(stream, buffer, shared).await;
        }
    };
    loop {
        match socket.recv().await {
            // The Centrifugo door's ping (an empty reply), answered with an empty command.
            Ok(Some(Message::Text(text)))
                if target == Target::Centrifuge && text.as_str().trim() == "{}" =>
            {
                if socket.send_text("{}").await.is_err() {
                    break;
                }
            }
            // Engine.IO's ping: unanswered, the server drops the client after its ping
            // interval and timeout (25 + 20 s by default).
            Ok(Some(Message::Text(text)))
                if target == Target::SocketIo && text.as_str() == socketio::PING =>
            {
                if socket.send_text(socketio::PONG).await.is_err() {
                    break;
                }
            }
            // Socket.IO's disconnect or Engine.IO's close: the server let the client go.
            Ok(Some(Message::Text(text)))
                if target == Target::SocketIo && socketio::is_goodbye(text.as_str()) =>
            {
                break;
            }
            Ok(Some(Message::Text(text))) => shared.observe(text.as_bytes()),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    shared.closed.fetch_add(1, Ordering::Relaxed);
}

/// Reads a room's event stream: each event (up to its blank line) is one message.
async fn event_stream_subscriber(mut stream: TcpStream, mut buffer: Vec<u8>, shared: Arc<Shared>) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut start = 0;
        while let Some(end) = buffer[start..].windows(2).position(|w| w == b"\n\n") {
            shared.observe(&buffer[start..start + end]);
            start += end + 2;
        }
        buffer.drain(..start);
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
    shared.closed.fetch_add(1, Ordering::Relaxed);
}

/// Publishes to the room or channel.
enum Publisher {
    /// A WebSocket connection (Switchboard room, broadcast server, Socket.IO); what it
    /// receives is read and dropped by a task of its own (Socket.IO's pings answered).
    Socket(tokio::sync::mpsc::Sender<String>),
    /// Keep-alive HTTP connections to an HTTP API (a Pusher events API, Switchboard's
    /// room API or server API), taken in turn; each is sent whole requests.
    Http(Vec<tokio::sync::mpsc::Sender<String>>, usize),
}

/// The room of a room URL (`ws://HOST/room/ROOM?...`).
fn room_of(url: &str) -> anyhow::Result<&str> {
    let path = url.split_once("/room/").map(|(_, rest)| rest);
    path.map(|rest| rest.split(['?', '/']).next().unwrap_or(rest))
        .filter(|room| !room.is_empty())
        .with_context(|| format!("{url} is not a room URL (ws://HOST/room/ROOM)"))
}

/// A `POST PATH` with a JSON body.
pub(super) fn post_request(host: &str, path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

impl Publisher {
    async fn open(args: &FanoutArgs) -> anyhow::Result<(Self, JoinSet<anyhow::Result<()>>)> {
        let mut tasks = JoinSet::new();
        let api = args.api || args.target == Target::Centrifuge;
        if api && matches!(args.target, Target::Broadcast | Target::SocketIo) {
            bail!("a broadcast or Socket.IO server has no HTTP API to publish through");
        }
        if api && args.target == Target::Switchboard {
            room_of(&args.url)?;
        }
        match args.target {
            Target::Switchboard | Target::Broadcast | Target::SocketIo if !api => {
                let url = match args.target {
                    Target::Switchboard => with_query(&args.url, "name=publisher"),
                    _ => args.url.clone(),
                };
                let mut socket = connect(&url, client_options())
                    .await
                    .with_context(|| format!("connecting the publisher to {url}"))?
                    .socket;
                let socket_io = args.target == Target::SocketIo;
                if socket_io {
                    socketio::join(&mut socket).await?;
                }
                let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
                tasks.spawn(async move {
                    loop {
                        tokio::select! {
                            text = rx.recv() => match text {
                                Some(text) => {
                                    socket.feed(&Message::Text(text.into())).await?;
                                    while let Ok(more) = rx.try_recv() {
                                        socket.feed(&Message::Text(more.into())).await?;
                                    }
                                    socket.flush().await?;
                                }
                                None => {
                                    socket.close(None).await?;
                                    return Ok(());
                                }
                            },
                            received = socket.recv() => match received? {
                                Some(Message::Text(text))
                                    if socket_io && text.as_str() == socketio::PING =>
                                {
                                    socket.send_text(socketio::PONG).await?;
                                }
                                Some(_) => {}
                                None => bail!("the server closed the publisher"),
                            },
                        }
                    }
                });
                Ok((Self::Socket(tx), tasks))
            }
            _ => {
                let address = super::host_port(&args.url).to_owned();
                let mut senders = Vec::new();
                for _ in 0..4 {
                    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
                    let host = address.clone();
                    tasks.spawn(async move {
                        let mut buf = Vec::with_capacity(4096);
                        // Kept alive while the server allows (Sockudo answers each
                        // request with `Connection: close`).
                        let mut open: Option<TcpStream> = None;
                        while let Some(request) = rx.recv().await {
                            let mut stream = match open.take() {
                                Some(stream) => stream,
                                None => {
                                    let stream =
                                        TcpStream::connect(&host).await.with_context(|| {
                                            format!("connecting to the HTTP API at {host}")
                                        })?;
                                    stream.set_nodelay(true)?;
                                    buf.clear();
                                    stream
                                }
                            };
                            stream.write_all(request.as_bytes()).await?;
                            let (keep_alive, body) =
                                read_http_response(&mut stream, &mut buf).await?;
                            // The Centrifugo server API answers a failure with 200.
                            if body.starts_with(r#"{"error""#) {
                                bail!("the server API refused a publication: {body}");
                            }
                            if keep_alive {
                                open = Some(stream);
                            }
                        }
                        Ok(())
                    });
                    senders.push(tx);
                }
                Ok((Self::Http(senders, 0), tasks))
            }
        }
    }

    async fn publish(&mut self, args: &FanoutArgs, text: String) -> anyhow::Result<()> {
        let sent = match self {
            Self::Socket(tx) => {
                let frame = match args.target {
                    Target::Switchboard => {
                        serde_json::json!({"type": "message", "text": text}).to_string()
                    }
                    Target::SocketIo => socketio::event("message", &text),
                    _ => text,
                };
                tx.send(frame).await
            }
            Self::Http(senders, next) => {
                let host = super::host_port(&args.url);
                let request = match args.target {
                    Target::Pusher => {
                        pusher_request(host, &args.app_id, &args.app_key, &args.app_secret, &text)
                    }
                    Target::Centrifuge => post_request(
                        host,
                        "/api/publish",
                        &serde_json::json!({"channel": args.channel, "data": {"text": text}})
                            .to_string(),
                    ),
                    Target::Switchboard | Target::Broadcast | Target::SocketIo => post_request(
                        host,
                        &format!("/api/rooms/{}/messages", room_of(&args.url)?),
                        &serde_json::json!({"text": text}).to_string(),
                    ),
                };
                *next = (*next + 1) % senders.len();
                senders[*next].send(request).await
            }
        };
        sent.map_err(|_| anyhow::anyhow!("the publisher's connection ended"))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// A signed `POST /apps/{id}/events` (the Pusher HTTP API's query authentication).
fn pusher_request(host: &str, app_id: &str, key: &str, secret: &str, data: &str) -> String {
    use hmac::{Hmac, Mac};
    use md5::{Digest, Md5};

    let body =
        serde_json::json!({"name": "bench", "channels": ["bench"], "data": data}).to_string();
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = format!("/apps/{app_id}/events");
    let query = format!(
        "auth_key={key}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={}",
        hex(&Md5::digest(body.as_bytes()))
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key size");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    format!(
        "POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; an error unless 2xx.
/// Whether the connection may carry another request, and the body.
pub(super) async fn read_http_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> anyhow::Result<(bool, String)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let status_ok = head.split(' ').nth(1).is_some_and(|s| s.starts_with('2'));
                if !status_ok {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                    bail!(
                        "the HTTP API answered {}: {body}",
                        head.lines().next().unwrap_or("")
                    );
                }
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
                buf.drain(..end + 4 + length);
                return Ok((!head.contains("connection: close"), body));
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the HTTP API closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Opens the subscribers, steps through the rates, and returns the figures. Progress
/// goes to stderr.
pub(crate) async fn fanout_load(args: &FanoutArgs) -> anyhow::Result<FanoutResult> {
    fanout_load_with(args, || async { Ok(()) }).await
}

/// [`fanout_load`], running `ready` once the subscribers and the publisher are open,
/// before the first publication (to zero a profiler's counters, say).
pub(crate) async fn fanout_load_with<F, Fut>(
    args: &FanoutArgs,
    ready: F,
) -> anyhow::Result<FanoutResult>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        steps: args.rates.iter().map(|_| Histogram::new()).collect(),
        closed: AtomicUsize::new(0),
    });
    let shared_args = Arc::new(args.clone());
    // Each subscriber reads from the moment it is in, not once all are: a server that
    // pings (Socket.IO drops a client whose pong is 45 s late) gets its answers while
    // the rest connect.
    let opening = super::progress::bar(args.subscribers as u64, "subscribers");
    let subscribers = super::open_many(args.subscribers, |i| {
        let (args, shared, opening) = (shared_args.clone(), shared.clone(), opening.clone());
        async move {
            let socket = subscribe(&args, i).await?;
            opening.inc(1);
            Ok(tokio::spawn(subscriber(socket, shared, args.target)).abort_handle())
        }
    })
    .await?;
    opening.finish_and_clear();
    super::progress::line(format!("fanout: {} subscribers ready", args.subscribers));
    let (mut publisher, mut publishing) = Publisher::open(args).await?;
    ready().await?;

    let mut steps = Vec::new();
    let bound = args.p99_bound_ms;
    let climbing = super::progress::bar(args.rates.len() as u64, "rates");
    for (index, &rate) in args.rates.iter().enumerate() {
        climbing.set_message(format!("publishing {rate} msg/s for {} s", args.step_secs));
        let histogram = &shared.steps[index];
        let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let count = (rate * args.step_secs).round().max(1.0) as u64;
        let cpu_before = args.server_pid.map(super::process_cpu).transpose()?;
        let started_ns = shared.now_ns();
        let started = tokio::time::Instant::now();
        for i in 0..count {
            tokio::time::sleep_until(started + every.mul_f64(i as f64)).await;
            let text = marker(index, shared.now_ns(), args.size);
            publisher.publish(args, text).await?;
        }
        let expected = count * args.subscribers as u64;
        // Late deliveries still count; past a grace period the step is not held.
        let grace = Duration::from_secs_f64(
            args.grace_secs
                .unwrap_or((bound / 1000.0 * 4.0).max(2.0))
                .max(0.0),
        );
        let deadline = tokio::time::Instant::now() + grace;
        while histogram.count.load(Ordering::Relaxed) < expected
            && tokio::time::Instant::now() < deadline
            && shared.closed.load(Ordering::Relaxed) == 0
        {
            if let Some(done) = publishing.try_join_next() {
                return Err(match done {
                    Ok(Ok(())) => anyhow::anyhow!("the publisher stopped during the load"),
                    Ok(Err(cause)) => cause.context("the publisher failed"),
                    Err(panic) => anyhow::anyhow!("the publisher panicked: {panic}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cpu_after = args.server_pid.map(super::process_cpu).transpose()?;
        let wall = started.elapsed().as_secs_f64();
        let closed = shared.closed.load(Ordering::Relaxed);
        let delivered = histogram.count.load(Ordering::Relaxed);
        let per_delivery = |d: Duration| d.as_secs_f64() * 1e6 / delivered.max(1) as f64;
        let cpu = cpu_before
            .zip(cpu_after)
            .map(|(before, after)| after.since(&before));
        let span_ns = histogram
            .last_ns
            .load(Ordering::Relaxed)
            .saturating_sub(started_ns);
        let step = Step {
            rate,
            published: count,
            expected,
            delivered,
            delivered_per_sec: delivered as f64 / (span_ns.max(1) as f64 / 1e9),
            p50_ms: histogram.quantile_ms(0.50),
            p99_ms: histogram.quantile_ms(0.99),
            max_ms: histogram.max_ns.load(Ordering::Relaxed) as f64 / 1e6,
            closed,
            held: false,
            server_user_us: cpu.map(|(user, _)| per_delivery(user)),
            server_system_us: cpu.map(|(_, system)| per_delivery(system)),
            server_busy: cpu.map(|(user, system)| (user + system).as_secs_f64() / wall),
        };
        let held = delivered >= expected && step.p99_ms <= bound && closed == 0;
        let step = Step { held, ..step };
        climbing.inc(1);
        super::progress::line(format!(
            "fanout {} subs @ {:>6} msg/s: delivered {}/{} ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{}{}",
            args.subscribers,
            rate,
            step.delivered,
            step.expected,
            step.delivered_per_sec,
            step.p50_ms,
            step.p99_ms,
            step.max_ms,
            match (step.server_user_us, step.server_system_us) {
                (Some(user), Some(system)) => format!(
                    ", server CPU {user:.3} + {system:.3} µs per delivery"
                ),
                _ => String::new(),
            },
            match (held, closed) {
                (true, _) => String::new(),
                (false, 0) => "  (not held)".into(),
                (false, n) => format!("  (not held: {n} subscribers closed by the server)"),
            }
        ));
        steps.push(step);
        // One miss can be the machine's noise (a shared 2-core box); two in a row end
        // the climb.
        let missed_twice = steps.len() >= 2 && steps.iter().rev().take(2).all(|s| !s.held);
        if (missed_twice && !args.every_step) || closed > 0 {
            break;
        }
        // Let queues drain before the next rate.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(publisher);
    for subscriber in subscribers {
        subscriber.abort();
    }
    publishing.abort_all();
    Ok(FanoutResult {
        subscribers: args.subscribers,
        p99_bound_ms: bound,
        steps,
    })
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
pub(crate) async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    let result = fanout_load(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let cpu = args.server_pid.is_some();
    println!(
        "| rate (msg/s) | delivered | delivered msg/s | p50 ms | p99 ms | max ms | held (p99 ≤ {} ms) |{}",
        args.p99_bound_ms,
        if cpu { " server CPU per delivery (µs, user + system) |" } else { "" }
    );
    println!(
        "|---:|---:|---:|---:|---:|---:|---|{}",
        if cpu { "---:|" } else { "" }
    );
    for s in &result.steps {
        let cpu = match (s.server_user_us, s.server_system_us) {
            (Some(user), Some(system)) => format!(" {user:.3} + {system:.3} |"),
            _ => String::new(),
        };
        println!(
            "| {} | {}/{} | {:.0} | {:.2} | {:.2} | {:.2} | {} |{cpu}",
            s.rate,
            s.delivered,
            s.expected,
            s.delivered_per_sec,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            if s.held { "yes" } else { "no" }
        );
    }
    match result.best_held() {
        Some(best) => println!(
            "highest rate held: {} msg/s to {} subscribers = {:.0} delivered msg/s",
            best.rate, result.subscribers, best.delivered_per_sec
        ),
        None => println!("no rate was held"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_inside_json() {
        let text = marker(3, 123_456_789, 40);
        assert_eq!(text.len(), 40);
        let json = serde_json::json!({"type": "message", "text": text}).to_string();
        assert_eq!(parse_marker(json.as_bytes()), Some((3, 123_456_789)));
        assert_eq!(parse_marker(b"{\"type\":\"welcome\"}"), None);
        let push = serde_json::json!({"push": {"channel": "bench", "pub": {"data": {"text": text}, "offset": 7}}});
        assert_eq!(
            parse_marker(push.to_string().as_bytes()),
            Some((3, 123_456_789))
        );
    }

    #[test]
    fn api_requests_name_the_room() {
        assert_eq!(
            room_of("ws://127.0.0.1:1/room/bench?name=x").unwrap(),
            "bench"
        );
        assert_eq!(room_of("ws://127.0.0.1:1/room/lobby").unwrap(), "lobby");
        assert!(room_of("ws://127.0.0.1:1/connection/websocket").is_err());
        let request = post_request("h:1", "/api/publish", "{}");
        assert!(request.starts_with("POST /api/publish HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(request.ends_with("Content-Length: 2\r\n\r\n{}"));
    }

    #[test]
    fn quantiles_come_from_the_recorded_latencies() {
        let histogram = Histogram::new();
        for ms in 1..=100u64 {
            histogram.record(ms * 1_000_000, 0);
        }
        let p50 = histogram.quantile_ms(0.5);
        let p99 = histogram.quantile_ms(0.99);
        assert!((50.0..=52.0 * GROWTH).contains(&p50), "p50 {p50}");
        assert!((99.0..=99.0 * GROWTH).contains(&p99), "p99 {p99}");
        assert_eq!(histogram.max_ns.load(Ordering::Relaxed), 100_000_000);
    }
}
