//! A hostile-input matrix over raw TCP: hand-built HTTP requests and hand-built
//! WebSocket frames (masked, unless the case is about masking). Every case names the
//! exact answer it must get: an HTTP status, the close code of the server's Close frame
//! (and the hang-up after it), an `error` event whose connection stays up, a silent
//! hang-up, or a broadcast carrying the connection's real identity. After every case two
//! long-lived "canary" members of the same room still chat: one says something, both
//! receive it. The Centrifugo door has a matrix of its own (at the end): each case
//! names the reply's error code or the close code it must get, and after each one a
//! Centrifugo canary and a room canary in one channel both receive a publication. So
//! has the Pusher door: each case names the `pusher:error` codes or the close code it
//! must get (and its HTTP API the status of each bad request), and after each one a
//! Pusher canary and a room canary in one channel both receive an API event.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use switchboard_net::{connect, ClientOptions, Message, Stream, WebSocket};
use switchboard_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

mod support;
use support::Server;

/// The room every case and both canaries use.
const ROOM: &str = "hostile";
/// How long any single answer may take (generous: the machine may be busy building).
const WAIT: Duration = Duration::from_secs(10);
/// How soon a client that stalls in its request head must be dropped
/// (`handshake_timeout_secs` is 1).
const STALL_LIMIT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------
// Hand-built WebSocket frames.

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// How a frame's payload length is written.
#[derive(Debug, Clone, Copy)]
enum Length {
    /// The shortest form, as RFC 6455 asks.
    Shortest,
    /// Always the 16-bit form (non-minimal for short payloads).
    Sixteen,
    /// Always the 64-bit form.
    SixtyFour,
}

/// A frame: `first` is the FIN/RSV bits and the opcode; masked with [`MASK`] or not.
fn encode_frame(first: u8, masked: bool, length: Length, payload: &[u8]) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let n = payload.len();
    let mut out = vec![first];
    match length {
        Length::Shortest if n < 126 => out.push(mask_bit | n as u8),
        Length::Shortest | Length::Sixteen if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A masked frame with the shortest length.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(first, true, Length::Shortest, payload)
}

/// A masked, final text frame.
fn text(json: &str) -> Vec<u8> {
    frame(FIN | TEXT, json.as_bytes())
}

/// A masked Close frame with a code and a reason.
fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    frame(FIN | CLOSE, &[&code.to_be_bytes()[..], reason].concat())
}

/// Only the masked header of a frame announcing `len` bytes in the 64-bit form: the
/// payload never follows.
fn announce(first: u8, len: u64) -> Vec<u8> {
    let mut out = vec![first, 0x80 | 127];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&MASK);
    out
}

/// A chat message event.
fn say(words: &str) -> String {
    json!({"type": "message", "text": words}).to_string()
}

/// `data` as one permessage-deflate message body: raw DEFLATE, sync-flushed, with the
/// final `00 00 ff ff` taken off (RFC 7692 section 7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compressor = Compress::new(Compression::best(), false);
    let mut out = Vec::with_capacity(4096);
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(4096);
        }
        let consumed = compressor.total_in() as usize;
        compressor
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .unwrap();
        if compressor.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(
        out.ends_with(&[0, 0, 0xff, 0xff]),
        "a sync flush ends the body"
    );
    out.truncate(out.len() - 4);
    out
}

/// Inflates one compressed message from the server (its tail put back), keeping the
/// window across messages as context takeover wants.
fn inflate(inflater: &mut Decompress, body: &[u8]) -> Result<Vec<u8>, String> {
    let input = [body, &[0, 0, 0xff, 0xff]].concat();
    let mut out = Vec::with_capacity(input.len() * 4 + 1024);
    let mut at = 0;
    loop {
        let before = inflater.total_in();
        inflater
            .decompress_vec(&input[at..], &mut out, FlushDecompress::Sync)
            .map_err(|e| format!("the server's compressed frame does not inflate: {e}"))?;
        at += (inflater.total_in() - before) as usize;
        if at == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(out.capacity().max(1024));
    }
}

// ---------------------------------------------------------------------------------------
// Hand-built HTTP requests.

/// RFC 6455's sample key and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const UPGRADE: &str = "Upgrade: websocket";
const CONNECTION: &str = "Connection: Upgrade";
const VERSION: &str = "Sec-WebSocket-Version: 13";

fn key_header() -> String {
    format!("Sec-WebSocket-Key: {KEY}")
}

/// A request head: the request line, `Host`, then `headers`.
fn request(line: &str, headers: &[&str]) -> Vec<u8> {
    let mut out = format!("{line}\r\nHost: 127.0.0.1\r\n");
    for header in headers {
        out.push_str(header);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A complete upgrade request for `target`, without the headers in `omit` (matched by
/// their start), with `extra` added.
fn handshake(target: &str, omit: &[&str], extra: &[&str]) -> Vec<u8> {
    let key = key_header();
    let mut headers: Vec<&str> = [UPGRADE, CONNECTION, key.as_str(), VERSION]
        .into_iter()
        .filter(|h| !omit.iter().any(|o| h.starts_with(o)))
        .collect();
    headers.extend_from_slice(extra);
    request(&format!("GET {target} HTTP/1.1"), &headers)
}

/// The room with a valid `?name=`: the target of upgrades refused for other reasons.
fn room_target() -> String {
    format!("/room/{ROOM}?name=Refused")
}

/// The start of a TLS 1.3 ClientHello, as a client that meant `wss://` sends it.
fn tls_client_hello() -> Vec<u8> {
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
    ];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(37)));
    hello.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    hello
}

/// Bytes from a fixed xorshift sequence.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The matrix: what each case does and what it must get.

#[derive(Debug)]
enum Action {
    /// Sends these bytes as a request and reads the answer's head.
    Http(Vec<u8>),
    /// Sends these bytes, then goes quiet with the socket open.
    Stall(Vec<u8>),
    /// Sends these bytes one at a time, one every so often.
    Drip(Vec<u8>, Duration),
    /// Upgrades, sends these bytes, then resets the connection (no Close, no FIN).
    Vanish(Vec<u8>),
    /// Upgrades (to the room as a fresh user when `target` is `None`), then sends `send`:
    /// after the 101, or `pipelined` in the same write as the request.
    Ws {
        target: Option<String>,
        headers: Vec<String>,
        deflate: bool,
        pipelined: bool,
        send: Vec<u8>,
    },
}

/// A WebSocket action on the room as a fresh user.
fn ws(send: Vec<u8>) -> Action {
    Action::Ws {
        target: None,
        headers: Vec::new(),
        deflate: false,
        pipelined: false,
        send,
    }
}

/// The same, with `send` in the same write as the upgrade request.
fn ws_pipelined(send: Vec<u8>) -> Action {
    Action::Ws {
        target: None,
        headers: Vec::new(),
        deflate: false,
        pipelined: true,
        send,
    }
}

/// The same, with permessage-deflate offered (and required to be accepted).
fn ws_deflate(send: Vec<u8>) -> Action {
    Action::Ws {
        target: None,
        headers: Vec::new(),
        deflate: true,
        pipelined: false,
        send,
    }
}

/// An upgrade to the room as a fresh user with these headers in place of the standard
/// ones of the same names.
fn ws_with(headers: &[&str], send: Vec<u8>) -> Action {
    Action::Ws {
        target: None,
        headers: headers.iter().map(|h| (*h).to_owned()).collect(),
        deflate: false,
        pipelined: false,
        send,
    }
}

/// An upgrade to `target` with extra headers.
fn ws_at(target: String, headers: &[&str], send: Vec<u8>) -> Action {
    Action::Ws {
        target: Some(target),
        headers: headers.iter().map(|h| (*h).to_owned()).collect(),
        deflate: false,
        pipelined: false,
        send,
    }
}

/// Who a broadcast must come from.
#[derive(Debug)]
enum Who {
    /// The connection's own `?name=` (open mode).
    Itself,
    /// This user (the name a token gives).
    Named(&'static str),
}

#[derive(Debug)]
enum Expect {
    /// An HTTP answer with this status.
    Status(u16),
    /// An HTTP answer with this status and this header (name, exact value).
    StatusWith(u16, &'static str, &'static str),
    /// A Close frame with this code, then the server hangs up.
    Close(u16),
    /// An `error` event with this code; the connection then still chats.
    Error(&'static str),
    /// The server hangs up without a byte of answer, within this long.
    SilentHangUp(Duration),
    /// Nothing to read: the client reset the connection itself (the canaries, and the
    /// member list at the end, tell whether the server coped).
    Vanished,
    /// Accepted: the message comes back (to the sender and to the second canary) from
    /// this user, and the welcome named the same user.
    Broadcast(Who),
}

#[derive(Debug)]
struct Case {
    name: &'static str,
    action: Action,
    expect: Expect,
}

fn case(name: &'static str, action: Action, expect: Expect) -> Case {
    Case {
        name,
        action,
        expect,
    }
}

/// What a case observed.
#[derive(Debug, Clone)]
enum Outcome {
    /// An HTTP answer: status and headers (names in lower case).
    Http {
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// The server hung up after this long, having sent `answer` bytes.
    HungUp { after: Duration, answer: usize },
    /// A Close frame (`code` is `None` for an empty one); whether TCP closed after it.
    Close { code: Option<u16>, hung_up: bool },
    /// An `error` event; whether the connection then still chatted.
    Error { code: String, stayed_up: bool },
    /// The connection's own message came back.
    Broadcast {
        welcomed_as: String,
        from: String,
        text: String,
    },
    /// The client reset the connection after the upgrade.
    Vanished,
    /// Anything else, described.
    Other(String),
}

fn check(expect: &Expect, outcome: &Outcome, own_name: &str, seen: &[Value]) -> Result<(), String> {
    let matched = match (expect, outcome) {
        (Expect::Status(want), Outcome::Http { status, .. }) => status == want,
        (Expect::StatusWith(want, name, value), Outcome::Http { status, headers }) => {
            status == want
                && headers
                    .iter()
                    .any(|(n, v)| n.eq_ignore_ascii_case(name) && v == value)
        }
        (Expect::Close(want), Outcome::Close { code, hung_up }) => *code == Some(*want) && *hung_up,
        (Expect::Error(want), Outcome::Error { code, stayed_up }) => code == want && *stayed_up,
        (Expect::Vanished, Outcome::Vanished) => true,
        (Expect::SilentHangUp(within), Outcome::HungUp { after, answer }) => {
            *answer == 0 && after <= within
        }
        (
            Expect::Broadcast(who),
            Outcome::Broadcast {
                welcomed_as,
                from,
                text,
            },
        ) => {
            let want = match who {
                Who::Itself => own_name,
                Who::Named(name) => *name,
            };
            let relayed = seen
                .iter()
                .any(|m| m["text"] == text.as_str() && m["from"] == want);
            if !relayed {
                return Err(format!(
                    "the second canary did not get {text:?} from {want}: it saw {seen:?}"
                ));
            }
            welcomed_as == want && from == want
        }
        (_, Outcome::Other(why)) => return Err(format!("expected {expect:?}, got: {why}")),
        _ => false,
    };
    if matched {
        Ok(())
    } else {
        Err(format!("expected {expect:?}, got {outcome:?}"))
    }
}

// ---------------------------------------------------------------------------------------
// A raw connection.

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn outcome(&self) -> Outcome {
        Outcome::Http {
            status: self.status,
            headers: self.headers.clone(),
        }
    }
}

/// What came in on a WebSocket, control frames and binary messages aside.
enum Incoming {
    Event(Value),
    Close(Option<u16>),
    Gone(String),
}

struct Raw {
    started: Instant,
    read: OwnedReadHalf,
    /// The write half, unless a writer task holds it.
    write: Option<OwnedWriteHalf>,
    writer: Option<JoinHandle<OwnedWriteHalf>>,
    buf: Vec<u8>,
    /// Inflates the server's compressed messages once permessage-deflate is agreed.
    inflater: Option<Decompress>,
}

impl Raw {
    async fn connect(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (read, write) = stream.into_split();
        Self {
            started: Instant::now(),
            read,
            write: Some(write),
            writer: None,
            buf: Vec::new(),
            inflater: None,
        }
    }

    /// Writes `bytes` from a task of its own (after what was sent before), so a server
    /// that stops reading cannot block the test. Write errors mean the server hung up,
    /// which the reads report.
    async fn send(&mut self, bytes: Vec<u8>) {
        let mut write = match self.write.take() {
            Some(write) => write,
            None => {
                let writer = self.writer.take().expect("a writer holds the write half");
                tokio::time::timeout(WAIT, writer)
                    .await
                    .expect("the server takes what is written")
                    .expect("the writer task")
            }
        };
        self.writer = Some(tokio::spawn(async move {
            let _ = write.write_all(&bytes).await;
            write
        }));
    }

    /// Reads more: `Ok(false)` once the server hung up (a reset counts).
    async fn fill(&mut self) -> Result<bool, String> {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, self.read.read(&mut chunk)).await {
            Err(_) => Err(format!("nothing from the server for {WAIT:?}")),
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                Ok(false)
            }
            Ok(Err(e)) => Err(format!("reading: {e}")),
        }
    }

    /// The head of the server's HTTP answer; what follows it stays buffered.
    async fn head(&mut self) -> Result<Head, Outcome> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = text.split("\r\n");
                let status_line = lines.next().unwrap_or_default();
                let status = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| Outcome::Other(format!("bad status line {status_line:?}")))?;
                let headers = lines
                    .filter_map(|line| line.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                return Ok(Head { status, headers });
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Outcome::HungUp {
                        after: self.started.elapsed(),
                        answer: self.buf.len(),
                    })
                }
                Err(e) => return Err(Outcome::Other(e)),
            }
        }
    }

    /// The next frame from the server: its first byte and payload; `None` at hang-up.
    async fn frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, String> {
        loop {
            if let [first, second, ..] = self.buf[..] {
                if second & 0x80 != 0 {
                    return Err("the server masked a frame".into());
                }
                let (len, start) = match second & 0x7f {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    127 if self.buf.len() >= 10 => {
                        let mut be = [0u8; 8];
                        be.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(be) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if len != usize::MAX && self.buf.len() >= start + len {
                    let payload = self.buf[start..start + len].to_vec();
                    self.buf.drain(..start + len);
                    return Ok(Some((first, payload)));
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The next event, Close or hang-up; pings, pongs and binary relays are skipped.
    async fn next(&mut self) -> Incoming {
        loop {
            let (first, payload) = match self.frame().await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Incoming::Gone("hung up without a Close frame".into()),
                Err(e) => return Incoming::Gone(e),
            };
            match first & 0x0f {
                TEXT => {
                    let payload = match (&mut self.inflater, first & RSV1 != 0) {
                        (Some(inflater), true) => match inflate(inflater, &payload) {
                            Ok(payload) => payload,
                            Err(e) => return Incoming::Gone(e),
                        },
                        (None, true) => return Incoming::Gone("RSV1 without deflate".into()),
                        (_, false) => payload,
                    };
                    return match serde_json::from_slice(&payload) {
                        Ok(event) => Incoming::Event(event),
                        Err(e) => Incoming::Gone(format!("a text frame that is not JSON: {e}")),
                    };
                }
                CLOSE => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Incoming::Close(code);
                }
                _ => {}
            }
        }
    }

    /// Whether the server hangs up (soon) now that nothing more is expected.
    async fn hangs_up(&mut self) -> bool {
        loop {
            self.buf.clear();
            match self.fill().await {
                Ok(true) => {}
                Ok(false) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Whether the connection still chats: a message sent now comes back.
    async fn still_chats(&mut self) -> bool {
        self.send(text(&say("still up"))).await;
        loop {
            match self.next().await {
                Incoming::Event(event)
                    if event["type"] == "message" && event["text"] == "still up" =>
                {
                    return true
                }
                Incoming::Event(_) => {}
                Incoming::Close(_) | Incoming::Gone(_) => return false,
            }
        }
    }
}

async fn http(address: SocketAddr, bytes: Vec<u8>) -> Outcome {
    let mut raw = Raw::connect(address).await;
    raw.send(bytes).await;
    match raw.head().await {
        Ok(head) => head.outcome(),
        Err(outcome) => outcome,
    }
}

/// Sends `bytes` (all at once, or one every `drip`) and waits for the server to hang up.
async fn stall(address: SocketAddr, bytes: Vec<u8>, drip: Option<Duration>) -> Outcome {
    let started = Instant::now();
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // The handle keeps the write half (so no FIN goes out) until the case is over: the
    // client goes quiet, it does not leave.
    let writer = tokio::spawn(async move {
        match drip {
            None => {
                let _ = write.write_all(&bytes).await;
            }
            Some(every) => {
                for byte in bytes {
                    if write.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(every).await;
                }
            }
        }
        write
    });
    let mut answer = 0;
    let mut chunk = [0u8; 4096];
    let outcome = loop {
        match tokio::time::timeout(WAIT, read.read(&mut chunk)).await {
            Err(_) => break Outcome::Other(format!("still open after {WAIT:?}")),
            Ok(Ok(0) | Err(_)) => {
                break Outcome::HungUp {
                    after: started.elapsed(),
                    answer,
                }
            }
            Ok(Ok(n)) => answer += n,
        }
    };
    writer.abort();
    outcome
}

/// Upgrades to `target`, sends `bytes`, and resets the connection.
async fn vanish(address: SocketAddr, target: &str, bytes: Vec<u8>) -> Outcome {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(&handshake(target, &[], &[]))
        .await
        .unwrap();
    let mut head = Vec::new();
    while find(&head, b"\r\n\r\n").is_none() {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
            other => return Outcome::Other(format!("no answer to the upgrade: {other:?}")),
        }
    }
    if !head.starts_with(b"HTTP/1.1 101 ") {
        return Outcome::Other(format!("not upgraded: {}", String::from_utf8_lossy(&head)));
    }
    if stream.write_all(&bytes).await.is_err() {
        return Outcome::Other("the server hung up first".into());
    }
    // Closing with a zero linger time sends a reset (and does not block: there is
    // nothing to linger for).
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
    Outcome::Vanished
}

/// Upgrades, sends `send`, and reports the first thing that tells the outcome.
async fn chat(
    address: SocketAddr,
    target: &str,
    headers: &[String],
    deflate: bool,
    pipelined: bool,
    mut send: Vec<u8>,
) -> Outcome {
    let mut raw = Raw::connect(address).await;
    let mut extra: Vec<&str> = headers.iter().map(String::as_str).collect();
    if deflate {
        extra.push("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits");
    }
    // An extra header replaces the standard one of its name.
    let replaced: Vec<&str> = extra
        .iter()
        .filter_map(|h| h.split_once(':').map(|(name, _)| name))
        .collect();
    let mut request = handshake(target, &replaced, &extra);
    if pipelined {
        request.append(&mut send);
    }
    raw.send(request).await;
    let head = match raw.head().await {
        Ok(head) => head,
        Err(outcome) => return outcome,
    };
    if head.status != 101 {
        return head.outcome();
    }
    if head.header("sec-websocket-accept") != Some(ACCEPT) {
        return Outcome::Other(format!("101 with the wrong accept: {:?}", head.headers));
    }
    if deflate {
        match head.header("sec-websocket-extensions") {
            Some(agreed) if agreed.starts_with("permessage-deflate") => {
                raw.inflater = Some(Decompress::new(false));
            }
            other => return Outcome::Other(format!("permessage-deflate refused: {other:?}")),
        }
    }
    if !send.is_empty() {
        raw.send(send).await;
    }
    let mut welcomed_as = String::new();
    // The room's history up to here comes first; only later messages are live.
    let mut last_id = u64::MAX;
    loop {
        match raw.next().await {
            Incoming::Event(event) => match event["type"].as_str() {
                Some("welcome") => {
                    welcomed_as = event["user"].as_str().unwrap_or("").into();
                    last_id = event["lastId"].as_u64().unwrap_or(0);
                }
                Some("message") if event["id"].as_u64().is_some_and(|id| id <= last_id) => {}
                Some("error") => {
                    let code = event["code"].as_str().unwrap_or("").to_owned();
                    let stayed_up = raw.still_chats().await;
                    return Outcome::Error { code, stayed_up };
                }
                Some("message") => {
                    return Outcome::Broadcast {
                        welcomed_as,
                        from: event["from"].as_str().unwrap_or("").into(),
                        text: event["text"].as_str().unwrap_or("").into(),
                    }
                }
                // Presence and typing of others.
                _ => {}
            },
            Incoming::Close(code) => {
                let hung_up = raw.hangs_up().await;
                return Outcome::Close { code, hung_up };
            }
            Incoming::Gone(why) => return Outcome::Other(why),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The canaries: two members of the room, connected before the first case.

struct Canary {
    a: WebSocket<Stream>,
    b: WebSocket<Stream>,
    a_name: &'static str,
    said: usize,
}

async fn next_event(socket: &mut WebSocket<Stream>) -> Result<Value, String> {
    loop {
        let message = tokio::time::timeout(WAIT, socket.recv())
            .await
            .map_err(|_| format!("no event for {WAIT:?}"))?
            .map_err(|e| format!("connection failed: {e}"))?
            .ok_or("connection closed")?;
        match message {
            Message::Text(text) => {
                return serde_json::from_str(text.as_str()).map_err(|e| e.to_string())
            }
            // Binary relays from hostile members.
            _ => continue,
        }
    }
}

/// Reads until the message with `words` from `from`; returns the other messages seen.
async fn until_said(
    socket: &mut WebSocket<Stream>,
    words: &str,
    from: &str,
) -> Result<Vec<Value>, String> {
    let mut others = Vec::new();
    loop {
        let event = next_event(socket).await?;
        if event["type"] != "message" {
            continue;
        }
        if event["text"] == words {
            if event["from"] != from {
                return Err(format!("{words:?} came from {}", event["from"]));
            }
            return Ok(others);
        }
        others.push(event);
    }
}

impl Canary {
    async fn join(address: SocketAddr, a: (&'static str, String), b: &str) -> Self {
        let mut sockets = Vec::new();
        for query in [a.1.as_str(), b] {
            let url = format!("ws://{address}/room/{ROOM}?{query}");
            let mut socket = connect(&url, ClientOptions::default())
                .await
                .unwrap()
                .socket;
            assert_eq!(next_event(&mut socket).await.unwrap()["type"], "welcome");
            sockets.push(socket);
        }
        let b = sockets.pop().unwrap();
        let a_socket = sockets.pop().unwrap();
        Self {
            a: a_socket,
            b,
            a_name: a.0,
            said: 0,
        }
    }

    /// Both canaries leave with a close handshake (a shutdown would otherwise wait for
    /// the Close replies of members that are not reading).
    async fn leave(mut self) {
        for socket in [&mut self.a, &mut self.b] {
            let closed = tokio::time::timeout(WAIT, socket.close(None)).await;
            assert!(matches!(closed, Ok(Ok(_))), "a canary's close: {closed:?}");
        }
    }

    /// One canary speaks and both hear it. Returns the other messages the second one saw
    /// meanwhile (what the case broadcast).
    async fn check(&mut self, after: &str) -> Result<Vec<Value>, String> {
        self.said += 1;
        let words = format!("canary {} after {after}", self.said);
        tokio::time::timeout(WAIT, self.a.send_text(&say(&words)))
            .await
            .map_err(|_| "sending timed out".to_owned())?
            .map_err(|e| format!("sending failed: {e}"))?;
        until_said(&mut self.a, &words, self.a_name)
            .await
            .map_err(|e| format!("the speaker: {e}"))?;
        until_said(&mut self.b, &words, self.a_name)
            .await
            .map_err(|e| format!("the listener: {e}"))
    }
}

/// Runs every case, checking the canaries after each; fails naming every case whose
/// outcome was not the expected one.
async fn run_matrix(server: &Server, canary: &mut Canary, cases: Vec<Case>) {
    let address = server.address;
    let total = cases.len();
    let mut failures = Vec::new();
    for (index, case) in cases.into_iter().enumerate() {
        let own_name = format!("h{index}");
        let started = Instant::now();
        let outcome = match case.action {
            Action::Http(bytes) => http(address, bytes).await,
            Action::Stall(bytes) => stall(address, bytes, None).await,
            Action::Drip(bytes, every) => stall(address, bytes, Some(every)).await,
            Action::Vanish(bytes) => {
                vanish(address, &format!("/room/{ROOM}?name={own_name}"), bytes).await
            }
            Action::Ws {
                target,
                headers,
                deflate,
                pipelined,
                send,
            } => {
                let target = target.unwrap_or_else(|| format!("/room/{ROOM}?name={own_name}"));
                chat(address, &target, &headers, deflate, pipelined, send).await
            }
        };
        eprintln!(
            "{:>3} {:<58} {outcome:?} ({:?})",
            index,
            case.name,
            started.elapsed()
        );
        let seen = canary.check(case.name).await.unwrap_or_else(|e| {
            panic!(
                "case `{}`: the canaries stopped chatting ({e}); the case got {outcome:?}",
                case.name
            )
        });
        if let Err(why) = check(&case.expect, &outcome, &own_name, &seen) {
            failures.push(format!("case `{}`: {why}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Waits until the room's members are exactly `want` (hostile connections all gone).
async fn members_settle(address: SocketAddr, api_key: Option<&str>, want: &[&str]) {
    let auth = api_key.map(|key| format!("Authorization: Bearer {key}"));
    let headers: Vec<&str> = auth
        .iter()
        .map(String::as_str)
        .chain(["Connection: close"])
        .collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let mut raw = Raw::connect(address).await;
        raw.send(request(
            &format!("GET /api/rooms/{ROOM}/members HTTP/1.1"),
            &headers,
        ))
        .await;
        let head = raw.head().await.expect("an answer");
        assert_eq!(head.status, 200);
        while raw.fill().await.unwrap() {}
        let body: Value = serde_json::from_slice(&raw.buf).unwrap();
        let mut members: Vec<&str> = body["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        members.sort_unstable();
        if members == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members still {members:?}, not {want:?}, {WAIT:?} after the last case"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server whose handshake timeout is 1 s, with a rate limit the canaries never reach.
fn config() -> Config {
    let mut config = Config::default().with_rate_limit(1000.0, 1000);
    config.handshake_timeout_secs = 1;
    config
}

// ---------------------------------------------------------------------------------------
// The cases.

fn handshake_cases() -> Vec<Case> {
    use Expect::*;
    let target = room_target();
    let t = target.as_str();
    let key = key_header();
    let mut many_headers: Vec<String> = (0..200).map(|i| format!("X-Filler-{i}: {i}")).collect();
    many_headers.push(key.clone());
    let many: Vec<&str> = many_headers.iter().map(String::as_str).collect();
    let big_header = format!("X-Filler: {}", "a".repeat(20 * 1024));
    let huge_header = format!("X-Filler: {}", "a".repeat(500 * 1024));
    let long_path = format!("/room/{}", "a".repeat(70_000));
    let long_room = format!("/room/{}?name=Refused", "r".repeat(201));
    let long_epoch = format!("/room/{ROOM}?name=Refused&since=1&epoch={}", "e".repeat(65));
    vec![
        case(
            "missing Sec-WebSocket-Key",
            Action::Http(handshake(t, &["Sec-WebSocket-Key"], &[])),
            Status(400),
        ),
        case(
            "Sec-WebSocket-Key not base64",
            Action::Http(handshake(
                t,
                &["Sec-WebSocket-Key"],
                &["Sec-WebSocket-Key: not base64 at all!"],
            )),
            Status(400),
        ),
        case(
            "Sec-WebSocket-Key of 15 bytes",
            Action::Http(handshake(
                t,
                &["Sec-WebSocket-Key"],
                &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA"],
            )),
            Status(400),
        ),
        case(
            "Sec-WebSocket-Key twice",
            Action::Http(handshake(t, &[], &[&key])),
            Status(400),
        ),
        case(
            "Sec-WebSocket-Version 8",
            Action::Http(handshake(
                t,
                &["Sec-WebSocket-Version"],
                &["Sec-WebSocket-Version: 8"],
            )),
            StatusWith(426, "sec-websocket-version", "13"),
        ),
        case(
            "no Sec-WebSocket-Version",
            Action::Http(handshake(t, &["Sec-WebSocket-Version"], &[])),
            StatusWith(426, "sec-websocket-version", "13"),
        ),
        case(
            "POST",
            Action::Http(request(
                &format!("POST {t} HTTP/1.1"),
                &[UPGRADE, CONNECTION, &key, VERSION, "Content-Length: 0"],
            )),
            Status(405),
        ),
        case(
            "HEAD",
            Action::Http(request(
                &format!("HEAD {t} HTTP/1.1"),
                &[UPGRADE, CONNECTION, &key, VERSION],
            )),
            StatusWith(405, "allow", "GET"),
        ),
        case(
            "no Upgrade header",
            Action::Http(handshake(t, &["Upgrade"], &[])),
            StatusWith(426, "upgrade", "websocket"),
        ),
        case(
            "Upgrade: h2c",
            Action::Http(handshake(t, &["Upgrade"], &["Upgrade: h2c"])),
            Status(426),
        ),
        case(
            "no Connection header",
            Action::Http(handshake(t, &["Connection"], &[])),
            Status(400),
        ),
        case(
            "Connection: keep-alive",
            Action::Http(handshake(t, &["Connection"], &["Connection: keep-alive"])),
            Status(400),
        ),
        case(
            "HTTP/1.0",
            Action::Http(request(
                &format!("GET {t} HTTP/1.0"),
                &[UPGRADE, CONNECTION, &key, VERSION],
            )),
            Status(400),
        ),
        case(
            "200 headers",
            Action::Http(request(&format!("GET {t} HTTP/1.1"), &many)),
            Status(431),
        ),
        case(
            "a single 20 KiB header",
            Action::Http(handshake(t, &[], &[&big_header])),
            Status(431),
        ),
        case(
            "a 500 KiB header",
            Action::Http(handshake(t, &[], &[&huge_header])),
            Status(431),
        ),
        case(
            "a 70 000-byte path",
            Action::Http(handshake(&long_path, &[], &[])),
            Status(431),
        ),
        case(
            "a TLS ClientHello",
            Action::Http(tls_client_hello()),
            Status(400),
        ),
        case("random bytes", Action::Http(noise(512)), Status(400)),
        case("NUL bytes", Action::Http(vec![0; 64]), Status(400)),
        case(
            "a method that is not a token",
            Action::Http(request(
                &format!("G(T {t} HTTP/1.1"),
                &[UPGRADE, CONNECTION, &key, VERSION],
            )),
            Status(400),
        ),
        case(
            "the HTTP/2 preface",
            Action::Http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
            SilentHangUp(STALL_LIMIT),
        ),
        case(
            "unknown path",
            Action::Http(handshake("/nowhere", &[], &[])),
            Status(404),
        ),
        case(
            "room with no id",
            Action::Http(handshake("/room/?name=Refused", &[], &[])),
            Status(404),
        ),
        case(
            "room id with a space",
            Action::Http(handshake("/room/bad%20room?name=Refused", &[], &[])),
            Status(400),
        ),
        case(
            "room id of 201 characters",
            Action::Http(handshake(&long_room, &[], &[])),
            Status(400),
        ),
        case(
            "a room id with an escaped slash",
            Action::Http(handshake("/room/a%2Fb?name=Refused", &[], &[])),
            Status(400),
        ),
        case(
            "a user not named in a limited room",
            Action::Http(handshake("/room/dm:%23alice,bob?name=Refused", &[], &[])),
            Status(403),
        ),
        case(
            "a room limited to nobody",
            Action::Http(handshake("/room/notify:%23?name=Refused", &[], &[])),
            Status(403),
        ),
        case(
            "an epoch of 65 characters",
            Action::Http(handshake(&long_epoch, &[], &[])),
            Status(400),
        ),
        case(
            "an empty epoch",
            Action::Http(handshake(
                &format!("/room/{ROOM}?name=Refused&since=1&epoch="),
                &[],
                &[],
            )),
            Status(400),
        ),
        case(
            "no ?name=",
            Action::Http(handshake(&format!("/room/{ROOM}"), &[], &[])),
            Status(400),
        ),
        case(
            "a name with a control character",
            Action::Http(handshake(&format!("/room/{ROOM}?name=a%07b"), &[], &[])),
            Status(400),
        ),
        case(
            "since that is not a number",
            Action::Http(handshake(&format!("{t}&since=soon"), &[], &[])),
            Status(400),
        ),
        case(
            "since past the largest id",
            Action::Http(handshake(
                &format!("{t}&since=18446744073709551615"),
                &[],
                &[],
            )),
            Status(400),
        ),
        case(
            "malformed Sec-WebSocket-Extensions",
            Action::Http(handshake(
                t,
                &[],
                &["Sec-WebSocket-Extensions: permessage-deflate; =x"],
            )),
            Status(400),
        ),
        case(
            "half a request, then silence",
            Action::Stall(b"GET /room/hostile?name=Slow HTTP/1.1\r\nHost: 127.0".to_vec()),
            SilentHangUp(STALL_LIMIT),
        ),
        case(
            "a connection that sends nothing",
            Action::Stall(Vec::new()),
            SilentHangUp(STALL_LIMIT),
        ),
        case(
            "a request dripped a byte every 100 ms",
            Action::Drip(handshake(t, &[], &[]), Duration::from_millis(100)),
            SilentHangUp(STALL_LIMIT),
        ),
    ]
}

fn frame_cases() -> Vec<Case> {
    use Expect::*;
    let limit = Config::default().room_max_message;
    let hello = say("hello");
    let bomb = deflate(&vec![b'a'; 1 << 20]);
    assert!(bomb.len() < 4096, "the bomb is small: {} bytes", bomb.len());
    let (bomb_a, bomb_b) = bomb.split_at(bomb.len() / 2);
    vec![
        case(
            "unmasked text frame",
            ws(encode_frame(
                FIN | TEXT,
                false,
                Length::Shortest,
                hello.as_bytes(),
            )),
            Close(1002),
        ),
        case(
            "RSV1 without permessage-deflate",
            ws(frame(FIN | RSV1 | TEXT, &deflate(hello.as_bytes()))),
            Close(1002),
        ),
        case(
            "RSV2",
            ws(frame(FIN | RSV2 | TEXT, hello.as_bytes())),
            Close(1002),
        ),
        case(
            "RSV3",
            ws(frame(FIN | RSV3 | TEXT, hello.as_bytes())),
            Close(1002),
        ),
        case(
            "reserved data opcode 0x3",
            ws(frame(FIN | 0x3, b"x")),
            Close(1002),
        ),
        case(
            "reserved control opcode 0xB",
            ws(frame(FIN | 0xB, b"")),
            Close(1002),
        ),
        case(
            "ping with a 126-byte payload",
            ws(frame(FIN | PING, &[b'p'; 126])),
            Close(1002),
        ),
        case(
            "fragmented ping",
            ws([frame(PING, b"a"), frame(FIN | CONTINUATION, b"b")].concat()),
            Close(1002),
        ),
        case(
            "text that is not UTF-8",
            ws(frame(
                FIN | TEXT,
                b"{\"type\":\"message\",\"text\":\"\xff\xfe\"}",
            )),
            Close(1007),
        ),
        case(
            "text with a UTF-16 surrogate",
            ws(frame(FIN | TEXT, b"\xed\xa0\x80")),
            Close(1007),
        ),
        case(
            "text whose last fragment cuts a character",
            ws([
                frame(TEXT, "{\"text\":\"κόσ".as_bytes()),
                frame(FIN | CONTINUATION, b"\xce"),
            ]
            .concat()),
            Close(1007),
        ),
        case(
            "close reason that is not UTF-8",
            ws(close_frame(1000, b"bye \xc3\x28")),
            Close(1007),
        ),
        case("close code 999", ws(close_frame(999, b"")), Close(1002)),
        case("close code 1004", ws(close_frame(1004, b"")), Close(1002)),
        case("close code 1005", ws(close_frame(1005, b"")), Close(1002)),
        case("close code 1006", ws(close_frame(1006, b"")), Close(1002)),
        case("close code 1015", ws(close_frame(1015, b"")), Close(1002)),
        case("close code 5000", ws(close_frame(5000, b"")), Close(1002)),
        case(
            "close with a 126-byte payload",
            ws(close_frame(1000, &[b'r'; 124])),
            Close(1002),
        ),
        case(
            "close in the middle of a fragmented message is answered",
            ws([frame(TEXT, b"{\"type\":"), close_frame(1000, b"")].concat()),
            Close(1000),
        ),
        case(
            "close payload of one byte",
            ws(frame(FIN | CLOSE, &[0x03])),
            Close(1002),
        ),
        case(
            "continuation with no message started",
            ws(frame(FIN | CONTINUATION, hello.as_bytes())),
            Close(1002),
        ),
        case(
            "new text frame inside a fragmented message",
            ws([
                frame(TEXT, b"{\"type\":"),
                frame(FIN | TEXT, hello.as_bytes()),
            ]
            .concat()),
            Close(1002),
        ),
        case(
            "new binary frame inside a fragmented message",
            ws([frame(BINARY, b"a"), frame(FIN | BINARY, b"b")].concat()),
            Close(1002),
        ),
        case(
            "64-bit length with the top bit set (2^63)",
            ws(announce(FIN | BINARY, 1 << 63)),
            Close(1002),
        ),
        case(
            "64-bit length of 2^63-1",
            ws(announce(FIN | BINARY, (1 << 63) - 1)),
            Close(1009),
        ),
        case(
            "64-bit length one past the room limit",
            ws(announce(FIN | TEXT, limit as u64 + 1)),
            Close(1009),
        ),
        case(
            "text message over room_max_message in one frame",
            ws(text(&say(&"y".repeat(limit + 1024)))),
            Close(1009),
        ),
        case(
            "fragments that add up past room_max_message",
            ws([
                frame(TEXT, &vec![b'y'; limit / 2]),
                frame(CONTINUATION, &vec![b'y'; limit / 2]),
                frame(FIN | CONTINUATION, &vec![b'y'; 1024]),
            ]
            .concat()),
            Close(1009),
        ),
        case(
            "a message of exactly room_max_message bytes (not too big)",
            ws({
                let head = r#"{"type":"message","text":""#;
                let json = format!("{head}{}\"}}", "z".repeat(limit - head.len() - 2));
                assert_eq!(json.len(), limit);
                text(&json)
            }),
            Error("too_long"),
        ),
        case(
            "reset in the middle of a frame",
            Action::Vanish(frame(FIN | TEXT, say("never finished").as_bytes())[..12].to_vec()),
            Vanished,
        ),
        case(
            "reset in the middle of a fragmented message",
            Action::Vanish(frame(TEXT, b"{\"type\":\"message\",")),
            Vanished,
        ),
        case(
            "non-minimal 16-bit length (accepted)",
            ws(encode_frame(
                FIN | TEXT,
                true,
                Length::Sixteen,
                say("sixteen").as_bytes(),
            )),
            Broadcast(Who::Itself),
        ),
        case(
            "non-minimal 64-bit length (accepted)",
            ws(encode_frame(
                FIN | TEXT,
                true,
                Length::SixtyFour,
                say("sixty-four").as_bytes(),
            )),
            Broadcast(Who::Itself),
        ),
        case(
            "fragmented message with a ping between (accepted)",
            ws({
                let whole = say("in three parts");
                let (a, rest) = whole.as_bytes().split_at(5);
                let (b, c) = rest.split_at(7);
                [
                    frame(TEXT, a),
                    frame(FIN | PING, b"between"),
                    frame(CONTINUATION, b),
                    frame(FIN | CONTINUATION, c),
                ]
                .concat()
            }),
            Broadcast(Who::Itself),
        ),
        case(
            "Connection: keep-alive, Upgrade (accepted)",
            ws_with(&["Connection: keep-alive, Upgrade"], text(&say("listed"))),
            Broadcast(Who::Itself),
        ),
        case(
            "Upgrade: WebSocket in mixed case (accepted)",
            ws_with(&["Upgrade: WebSocket"], text(&say("mixed case"))),
            Broadcast(Who::Itself),
        ),
        case(
            "a message in the same write as the request (accepted)",
            ws_pipelined(text(&say("pipelined"))),
            Broadcast(Who::Itself),
        ),
        case(
            "an unmasked frame in the same write as the request",
            ws_pipelined(encode_frame(
                FIN | TEXT,
                false,
                Length::Shortest,
                hello.as_bytes(),
            )),
            Close(1002),
        ),
        case(
            "a second HTTP request after the upgrade",
            ws(request("GET /healthz HTTP/1.1", &[])),
            Close(1002),
        ),
        case(
            "close 1000 is answered",
            ws(close_frame(1000, b"bye")),
            Close(1000),
        ),
        case(
            "close 4999 is answered",
            ws(close_frame(4999, "au revoir ✓".as_bytes())),
            Close(4999),
        ),
        case(
            "empty close is answered with 1000",
            ws(frame(FIN | CLOSE, b"")),
            Close(1000),
        ),
        case(
            "compressed message (accepted)",
            ws_deflate(frame(
                FIN | RSV1 | TEXT,
                &deflate(say("squeezed").as_bytes()),
            )),
            Broadcast(Who::Itself),
        ),
        case(
            "deflate bomb: 1 MiB from a few hundred bytes",
            ws_deflate(frame(FIN | RSV1 | TEXT, &bomb)),
            Close(1009),
        ),
        case(
            "deflate bomb in two fragments",
            ws_deflate(
                [
                    frame(RSV1 | TEXT, bomb_a),
                    frame(FIN | CONTINUATION, bomb_b),
                ]
                .concat(),
            ),
            Close(1009),
        ),
        case(
            "corrupt compressed data",
            ws_deflate(frame(FIN | RSV1 | TEXT, &[0xff, 0xfe, 0xfd, 0xfc, 0xfb])),
            Close(1007),
        ),
        case(
            "compressed text that is not UTF-8",
            ws_deflate(frame(
                FIN | RSV1 | TEXT,
                &deflate(b"{\"type\":\"message\",\"text\":\"\xed\xa0\x80\"}"),
            )),
            Close(1007),
        ),
        case(
            "RSV1 on a continuation frame",
            ws_deflate(
                [
                    frame(TEXT, b"{\"type\":"),
                    frame(FIN | RSV1 | CONTINUATION, b"\"message\"}"),
                ]
                .concat(),
            ),
            Close(1002),
        ),
        case(
            "RSV1 on a ping",
            ws_deflate(frame(FIN | RSV1 | PING, b"")),
            Close(1002),
        ),
    ]
}

fn room_cases() -> Vec<Case> {
    use Expect::*;
    let event = |value: Value| ws(text(&value.to_string()));
    vec![
        case("not JSON", ws(text("{not json")), Error("bad_json")),
        case("a JSON array", ws(text("[1,2,3]")), Error("bad_json")),
        case("a JSON string", ws(text("\"message\"")), Error("bad_json")),
        case(
            "an object with no type",
            event(json!({})),
            Error("bad_event"),
        ),
        case(
            "a type that is not a string",
            event(json!({"type": 42})),
            Error("bad_event"),
        ),
        case(
            "a message with no text",
            event(json!({"type": "message"})),
            Error("bad_event"),
        ),
        case(
            "a message whose data is null and has no text",
            event(json!({"type": "message", "data": null})),
            Error("bad_event"),
        ),
        case(
            "a message whose text is null and has no data",
            event(json!({"type": "message", "text": null, "nonce": "n-1"})),
            Error("bad_event"),
        ),
        case(
            "a message whose text is a number",
            event(json!({"type": "message", "text": 17})),
            Error("bad_event"),
        ),
        case(
            "a nonce that is not a string",
            event(json!({"type": "message", "text": "x", "nonce": 5})),
            Error("bad_event"),
        ),
        case(
            "typing with a string isTyping",
            event(json!({"type": "typing", "isTyping": "yes"})),
            Error("bad_event"),
        ),
        case(
            "unknown event type",
            event(json!({"type": "dance"})),
            Error("unknown_type"),
        ),
        case(
            "a server-only event type",
            event(json!({"type": "welcome", "room": ROOM, "user": "CanaryA"})),
            Error("unknown_type"),
        ),
        case(
            "a nonce of 129 bytes",
            event(json!({"type": "message", "text": "x", "nonce": "n".repeat(129)})),
            Error("bad_event"),
        ),
        case(
            "JSON nested 10 000 deep",
            ws(text(&format!(
                "{}{}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            ))),
            Error("bad_json"),
        ),
        case(
            "text over max_text_chars",
            event(json!({"type": "message", "text": "z".repeat(5000)})),
            Error("too_long"),
        ),
        case(
            "a message claiming another sender",
            event(json!({
                "type": "message", "text": "I am the canary",
                "from": "CanaryA", "user": "CanaryA", "id": 1, "room": "elsewhere"
            })),
            Broadcast(Who::Itself),
        ),
    ]
}

#[tokio::test]
async fn hostile_input_gets_exact_answers_and_the_room_keeps_chatting() {
    let server = Server::start(config()).await;
    let mut canary = Canary::join(
        server.address,
        ("CanaryA", "name=CanaryA".into()),
        "name=CanaryB",
    )
    .await;
    let cases: Vec<Case> = [
        handshake_cases(),
        frame_cases(),
        room_cases(),
        http_fallback_cases(),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(cases.len() >= 28);
    run_matrix(&server, &mut canary, cases).await;
    members_settle(server.address, None, &["CanaryA", "CanaryB"]).await;
    canary.leave().await;
    server.stop().await;
}

/// The room protocol over HTTP (Server-Sent Events and posted events).
fn http_fallback_cases() -> Vec<Case> {
    use Expect::*;
    let stream = |extra: &str| {
        format!(
            "GET /room/{ROOM}?name=Streamer HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{extra}\r\n"
        )
        .into_bytes()
    };
    let post = |body: &[u8]| {
        let mut bytes = format!(
            "POST /room/{ROOM}/events?name=Poster HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        bytes
    };
    let huge_id = format!("Last-Event-ID: {}:1\r\n", "e".repeat(6000));
    let big = format!(r#"{{"type":"message","text":"{}"}}"#, "x".repeat(300_000));
    vec![
        case(
            "event stream with a 6,000-byte Last-Event-ID",
            Action::Http(stream(&huge_id)),
            Status(400),
        ),
        case(
            "event stream with a Last-Event-ID that is not EPOCH:ID",
            Action::Http(stream("Last-Event-ID: 12\r\n")),
            Status(400),
        ),
        case(
            "event stream with a negative Last-Event-ID",
            Action::Http(stream("Last-Event-ID: e:-1\r\n")),
            Status(400),
        ),
        case(
            "posted event that is not JSON",
            Action::Http(post(b"{not json")),
            Status(400),
        ),
        case(
            "posted event that is not UTF-8",
            Action::Http(post(b"\xff\xfe\xfd")),
            Status(400),
        ),
        case(
            "posted event of an unknown type",
            Action::Http(post(br#"{"type":"leave-everyone"}"#)),
            Status(400),
        ),
        case(
            "posted event larger than a room message",
            Action::Http(post(big.as_bytes())),
            Status(413),
        ),
        case(
            "posted event without a name",
            Action::Http(
                format!(
                    "POST /room/{ROOM}/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"
                )
                .into_bytes(),
            ),
            Status(400),
        ),
    ]
}

/// PROXY protocol headers sent to a server that expects them only from `10.0.0.0/8`
/// (the tests connect from 127.0.0.1, an untrusted address).
fn proxy_protocol_cases() -> Vec<Case> {
    use Expect::*;
    let request = handshake(&room_target(), &[], &[]);
    let with = |prefix: &[u8]| [prefix, &request].concat();
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0, 12, 203, 0, 113, 1, 127, 0, 0, 1, 0x9c, 0x40, 0, 80,
    ]);
    let mut v2_endless = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2_endless.extend_from_slice(&[0x21, 0x11, 0xff, 0xff, 1, 2, 3]);
    let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
    vec![
        case(
            "PROXY v1 header from an untrusted address",
            Action::Http(with(b"PROXY TCP4 203.0.113.1 127.0.0.1 40000 80\r\n")),
            Status(400),
        ),
        case(
            "PROXY v2 header from an untrusted address",
            Action::Http(with(&v2)),
            Status(400),
        ),
        case(
            "PROXY header with an address of the wrong family",
            Action::Http(with(b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n")),
            Status(400),
        ),
        case(
            "PROXY v1 header longer than 107 bytes",
            Action::Http(with(long.as_bytes())),
            Status(400),
        ),
        case(
            "half a PROXY header from an untrusted address, then silence (answered at once)",
            Action::Http(b"PROXY TCP4 203.0.113.1 127.0".to_vec()),
            Status(400),
        ),
        case(
            "PROXY v2 header announcing 65,535 bytes, then silence (answered at once)",
            Action::Http(v2_endless),
            Status(400),
        ),
    ]
}

/// Forwarding headers from a trusted proxy that name nobody usable: the connection is
/// served as the proxy's own.
fn forwarded_cases() -> Vec<Case> {
    use Expect::*;
    let hops = format!("X-Forwarded-For: {}", vec!["10.9.9.9"; 500].join(", "));
    let forwarded = format!(
        "Forwarded: {}",
        vec!["for=unknown;by=_hidden"; 200].join(", ")
    );
    vec![
        case(
            "X-Forwarded-For of garbage",
            ws_with(
                &["X-Forwarded-For: <script>, ;;, [::1"],
                text(&say("garbage hops")),
            ),
            Broadcast(Who::Itself),
        ),
        case(
            "X-Forwarded-For with 500 trusted hops",
            ws_with(&[&hops], text(&say("many hops"))),
            Broadcast(Who::Itself),
        ),
        case(
            "Forwarded naming 200 unknown hops",
            ws_with(&[&forwarded], text(&say("unknown hops"))),
            Broadcast(Who::Itself),
        ),
        case(
            "Forwarded with a quoted port-only value",
            ws_with(&["Forwarded: for=\":80\""], text(&say("port only"))),
            Broadcast(Who::Itself),
        ),
    ]
}

#[tokio::test]
async fn hostile_proxy_headers_get_exact_answers_and_the_room_keeps_chatting() {
    for (settings, cases) in [
        (
            json!({"trusted_proxies": ["10.0.0.0/8"], "proxy_protocol": true}),
            proxy_protocol_cases(),
        ),
        (
            json!({"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}),
            forwarded_cases(),
        ),
    ] {
        let mut config = config();
        let table: Config = serde_json::from_value(settings).unwrap();
        config.trusted_proxies = table.trusted_proxies;
        config.proxy_protocol = table.proxy_protocol;
        let server = Server::start(config).await;
        let mut canary = Canary::join(
            server.address,
            ("CanaryA", "name=CanaryA".into()),
            "name=CanaryB",
        )
        .await;
        run_matrix(&server, &mut canary, cases).await;
        members_settle(server.address, None, &["CanaryA", "CanaryB"]).await;
        canary.leave().await;
        server.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// Identity with tokens.

const SECRET: &[u8] = b"hostile-secret";
const API_KEY: &str = "hostile-api-key";
/// `{"alg":"none","typ":"JWT"}` in base64url.
const ALG_NONE: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";

fn in_an_hour() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

fn token(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A token for `name` in the hostile room.
fn ticket(name: &str) -> String {
    token(
        SECRET,
        &json!({"name": name, "rooms": [ROOM], "exp": in_an_hour()}),
    )
}

fn token_cases() -> Vec<Case> {
    use Expect::*;
    let room = format!("/room/{ROOM}");
    let with = |token: &str| format!("{room}?token={token}");
    let trent = ticket("Trent");
    let mallory_elsewhere = token(
        b"guessed-secret",
        &json!({"name": "Mallory", "rooms": [ROOM], "exp": in_an_hour()}),
    );
    let payload_of = |t: &str| t.split('.').nth(1).unwrap().to_owned();
    let [trent_header, _, trent_signature] =
        <[&str; 3]>::try_from(trent.split('.').collect::<Vec<_>>()).unwrap();
    let swapped = format!(
        "{trent_header}.{}.{trent_signature}",
        payload_of(&ticket("Mallory"))
    );
    let unsigned = format!("{ALG_NONE}.{}.", payload_of(&ticket("Mallory")));
    let bearer_bea = format!("Authorization: Bearer {}", ticket("Bea"));
    vec![
        case("no token", ws_at(room.clone(), &[], Vec::new()), Status(401)),
        case(
            "Basic credentials instead of a token",
            ws_at(room.clone(), &["Authorization: Basic dXNlcjpwYXNz"], Vec::new()),
            Status(401),
        ),
        case(
            "token signed with another secret",
            ws_at(with(&mallory_elsewhere), &[], Vec::new()),
            Status(403),
        ),
        case(
            "token whose payload was swapped under a valid signature",
            ws_at(with(&swapped), &[], Vec::new()),
            Status(403),
        ),
        case(
            "unsigned token (alg none)",
            ws_at(with(&unsigned), &[], Vec::new()),
            Status(403),
        ),
        case(
            "not a token at all",
            ws_at(with("not.a.token"), &[], Vec::new()),
            Status(403),
        ),
        case(
            "token for another room",
            ws_at(
                with(&token(
                    SECRET,
                    &json!({"name": "Mallory", "rooms": ["elsewhere"], "exp": in_an_hour()}),
                )),
                &[],
                Vec::new(),
            ),
            Status(403),
        ),
        case(
            "token allowing no room",
            ws_at(
                with(&token(
                    SECRET,
                    &json!({"name": "Mallory", "rooms": [], "exp": in_an_hour()}),
                )),
                &[],
                Vec::new(),
            ),
            Status(403),
        ),
        case(
            "expired token",
            ws_at(
                with(&token(
                    SECRET,
                    &json!({"name": "Mallory", "rooms": [ROOM], "exp": in_an_hour() - 7200}),
                )),
                &[],
                Vec::new(),
            ),
            Status(403),
        ),
        case(
            "token with no expiry",
            ws_at(
                with(&token(SECRET, &json!({"name": "Mallory", "rooms": [ROOM]}))),
                &[],
                Vec::new(),
            ),
            Status(403),
        ),
        case(
            "token naming no user",
            ws_at(
                with(&token(
                    SECRET,
                    &json!({"rooms": [ROOM], "exp": in_an_hour()}),
                )),
                &[],
                Vec::new(),
            ),
            Status(403),
        ),
        case(
            "token naming an invalid user",
            ws_at(
                with(&token(
                    SECRET,
                    &json!({"name": " padded ", "rooms": [ROOM], "exp": in_an_hour()}),
                )),
                &[],
                Vec::new(),
            ),
            Status(403),
        ),
        case(
            "Bearer header with a forged token",
            ws_at(
                room.clone(),
                &[&format!("Authorization: Bearer {mallory_elsewhere}")],
                Vec::new(),
            ),
            Status(403),
        ),
        case(
            "?name= and ?user= that differ from the token's user",
            ws_at(
                format!("{room}?name=Mallory&user=Mallory&token={trent}"),
                &[],
                text(&say("who am I")),
            ),
            Broadcast(Who::Named("Trent")),
        ),
        case(
            "token with only a subject",
            ws_at(
                with(&token(
                    SECRET,
                    &json!({"sub": "Sid", "rooms": ["*"], "exp": in_an_hour()}),
                )),
                &[],
                text(&say("by subject")),
            ),
            Broadcast(Who::Named("Sid")),
        ),
        case(
            "token in a Bearer header",
            ws_at(room.clone(), &[&bearer_bea], text(&say("by header"))),
            Broadcast(Who::Named("Bea")),
        ),
        case(
            "a message claiming another sender, with a token",
            ws_at(
                with(&trent),
                &[],
                text(
                    &json!({"type": "message", "text": "I am the canary", "from": "CanaryA", "user": "CanaryA"})
                        .to_string(),
                ),
            ),
            Broadcast(Who::Named("Trent")),
        ),
    ]
}

#[tokio::test]
async fn tokens_decide_identity_and_rooms() {
    let config = config()
        .with_jwt_secret(Some(String::from_utf8(SECRET.to_vec()).unwrap()))
        .with_api_key(Some(API_KEY.into()));
    let server = Server::start(config).await;
    let mut canary = Canary::join(
        server.address,
        ("CanaryA", format!("token={}", ticket("CanaryA"))),
        &format!("token={}", ticket("CanaryB")),
    )
    .await;
    run_matrix(&server, &mut canary, token_cases()).await;
    members_settle(server.address, Some(API_KEY), &["CanaryA", "CanaryB"]).await;
    canary.leave().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// The Centrifugo door: broken JSON and Protobuf, commands before connect, unknown fields,
// huge ids, 10,000 subscribes, bad and expired tokens. After every case a Centrifugo
// canary and a room canary in one channel both get a server API publication, with one
// id.

use switchboard_protocol::centrifuge::{
    encode_command, Command, Encoding, PublishRequest, SubscribeRequest,
};
use switchboard_test_support::centrifuge::{connect_command, Centrifuge};

/// The channel of the Centrifugo canaries.
const CF_CHANNEL: &str = "hostile-cf";
/// The id every case's last command has, whose reply the case waits for.
const LAST: u32 = 99;

#[derive(Debug)]
enum CfExpect {
    /// The reply to command [`LAST`] has this error; the connection then still answers.
    Error(u32),
    /// The reply to command [`LAST`] has no error; the connection then still answers.
    Answered,
    /// The server closes with this code.
    Close(u16),
    /// Of the subscribes sent, this many succeed and every other one gets 106.
    Subscribed(usize),
    /// The connect [`LAST`] gets this error; a valid connect then still succeeds.
    ConnectError(u32),
}

#[derive(Debug)]
struct CfCase {
    name: &'static str,
    encoding: Encoding,
    /// The connect token, or `None` to send no connect before the frames.
    token: Option<String>,
    frames: Vec<Vec<u8>>,
    expect: CfExpect,
}

fn cf(name: &'static str, encoding: Encoding, frames: Vec<Vec<u8>>, expect: CfExpect) -> CfCase {
    CfCase {
        name,
        encoding,
        token: Some(ticket("Hostile")),
        frames,
        expect,
    }
}

fn command(encoding: Encoding, command: Command) -> Vec<u8> {
    encode_command(encoding, &command).to_vec()
}

fn last(request: Command) -> Command {
    Command {
        id: LAST,
        ..request
    }
}

fn subscribe_to(channel: &str) -> Command {
    Command {
        subscribe: Some(SubscribeRequest {
            channel: channel.into(),
            ..SubscribeRequest::default()
        }),
        ..Command::default()
    }
}

fn cf_cases() -> Vec<CfCase> {
    use CfExpect::*;
    use Encoding::{Json, Protobuf};
    let json = |text: &str| text.as_bytes().to_vec();
    let mut cases = vec![
        cf("json: not JSON", Json, vec![json("{\"id\":")], Close(3501)),
        cf("json: an array", Json, vec![json("[1,2,3]")], Close(3501)),
        cf(
            "json: an id over u32",
            Json,
            vec![json(r#"{"id":4294967296,"ping":{}}"#)],
            Close(3501),
        ),
        cf(
            "json: a negative id",
            Json,
            vec![json(r#"{"id":-1,"ping":{}}"#)],
            Close(3501),
        ),
        cf(
            "json: a channel that is a number",
            Json,
            vec![json(r#"{"id":99,"subscribe":{"channel":5}}"#)],
            Close(3501),
        ),
        cf(
            "json: data nested 10 000 deep (kept raw; the rpc gets 104)",
            Json,
            vec![json(&format!(
                "{{\"id\":99,\"rpc\":{{\"data\":{}{}}}}}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            ))],
            Error(104),
        ),
        cf(
            "json: unknown fields are skipped",
            Json,
            vec![json(
                r#"{"id":99,"subscribe":{"channel":"cf-unknown","bogus":[1]},"extra":{"x":1}}"#,
            )],
            Answered,
        ),
        cf(
            "json: an unknown command",
            Json,
            vec![json(r#"{"id":99,"dance":{}}"#)],
            Error(104),
        ),
        cf(
            "json: the largest id",
            Json,
            vec![
                json(r#"{"id":4294967295,"ping":{}}"#),
                json(r#"{"id":99,"ping":{}}"#),
            ],
            Answered,
        ),
        cf(
            "json: a command without an id",
            Json,
            vec![json(r#"{"ping":{}}"#)],
            Close(3501),
        ),
        cf(
            "json: a second connect",
            Json,
            vec![json(r#"{"id":99,"connect":{}}"#)],
            Close(3501),
        ),
        cf(
            "json: an offset past u64",
            Json,
            vec![json(
                r#"{"id":99,"subscribe":{"channel":"cf-x","recover":true,"offset":18446744073709551616}}"#,
            )],
            Close(3501),
        ),
        cf(
            "json: the largest offset",
            Json,
            vec![json(
                r#"{"id":99,"subscribe":{"channel":"cf-far","recover":true,"offset":18446744073709551615,"epoch":"e"}}"#,
            )],
            Answered,
        ),
        cf(
            "json: a channel of 300 characters",
            Json,
            vec![command(Json, last(subscribe_to(&"c".repeat(300))))],
            Error(107),
        ),
        cf(
            "json: 2,000 commands in one frame",
            Json,
            vec![vec![r#"{"id":7,"ping":{}}"#; 2000].join("\n").into_bytes()],
            Close(3501),
        ),
        cf(
            "json: 10,000 subscribes",
            Json,
            (0..10)
                .map(|frame| {
                    (0..1000)
                        .map(|n| {
                            let id = frame * 1000 + n + 1;
                            format!(r#"{{"id":{id},"subscribe":{{"channel":"cf-many-{id}"}}}}"#)
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                        .into_bytes()
                })
                .collect(),
            Subscribed(8),
        ),
        cf(
            "protobuf: a length past the frame",
            Protobuf,
            vec![vec![0x05, 0x08]],
            Close(3501),
        ),
        cf(
            "protobuf: a varint that never ends",
            Protobuf,
            vec![vec![0xff; 12]],
            Close(3501),
        ),
        cf(
            "protobuf: a wrong wire type",
            Protobuf,
            vec![vec![0x02, 0x0d, 0x01]],
            Close(3501),
        ),
        cf(
            "protobuf: JSON on a Protobuf connection",
            Protobuf,
            vec![json(r#"{"id":99,"ping":{}}"#)],
            Close(3501),
        ),
        cf(
            "protobuf: unknown fields are skipped",
            Protobuf,
            vec![{
                let mut body = vec![0x08, LAST as u8, 0xf8, 0x3e, 0x01, 0x5a, 0x00];
                let mut frame = vec![body.len() as u8];
                frame.append(&mut body);
                frame
            }],
            Answered,
        ),
        cf(
            "protobuf: publication data that is not JSON",
            Protobuf,
            vec![
                command(
                    Protobuf,
                    Command {
                        id: 1,
                        ..subscribe_to("cf-bytes")
                    },
                ),
                command(
                    Protobuf,
                    last(Command {
                        publish: Some(PublishRequest {
                            channel: "cf-bytes".into(),
                            data: vec![0xff, 0x00, 0x01],
                        }),
                        ..Command::default()
                    }),
                ),
            ],
            Error(107),
        ),
    ];
    for encoding in [Json, Protobuf] {
        let connect_with = |token: String| command(encoding, connect_command(LAST, &token));
        let mut before_connect = cf(
            "a subscribe before connect",
            encoding,
            vec![command(encoding, last(subscribe_to("cf-early")))],
            Close(3501),
        );
        before_connect.token = None;
        let expired = token(SECRET, &json!({"name": "Late", "exp": 1_000_000}));
        let mut late = cf(
            "an expired token",
            encoding,
            vec![connect_with(expired)],
            ConnectError(109),
        );
        late.token = None;
        let forged = token(b"guessed", &json!({"name": "Mallory", "exp": in_an_hour()}));
        let mut forged = cf(
            "a token signed with another secret",
            encoding,
            vec![connect_with(forged)],
            Close(3500),
        );
        forged.token = None;
        let none = format!("{ALG_NONE}.{}.", "eyJuYW1lIjoiTWFsbG9yeSJ9");
        let mut unsigned = cf(
            "an alg:none token",
            encoding,
            vec![connect_with(none)],
            Close(3500),
        );
        unsigned.token = None;
        let mut missing = cf(
            "no token",
            encoding,
            vec![connect_with(String::new())],
            Close(3500),
        );
        missing.token = None;
        let mut silent = cf(
            "silence instead of connect",
            encoding,
            Vec::new(),
            Close(3502),
        );
        silent.token = None;
        cases.extend([before_connect, late, forged, unsigned, missing, silent]);
    }
    cases
}

/// Runs one case on a fresh connection; `Err` says what it got instead.
async fn run_cf_case(server: &Server, case: &CfCase) -> Result<(), String> {
    let url = server.url("/connection/websocket");
    let mut client = Centrifuge::open(&url, case.encoding).await;
    if let Some(token) = &case.token {
        client.send(&connect_command(1, token)).await;
        let reply = client.reply_to(1).await;
        if reply.connect.is_none() {
            return Err(format!("the connect was refused: {reply:?}"));
        }
    }
    for frame in &case.frames {
        client.send_raw(frame).await;
    }
    match case.expect {
        CfExpect::Close(code) => {
            let (got, reason) = client.closed().await;
            (got == code)
                .then_some(())
                .ok_or(format!("closed with {got} ({reason})"))
        }
        CfExpect::Error(want) => {
            let reply = client.reply_to(LAST).await;
            let got = reply.error.as_ref().map(|e| e.code);
            if got != Some(want) {
                return Err(format!("replied {reply:?}"));
            }
            still_answers(&mut client).await
        }
        CfExpect::ConnectError(want) => {
            let reply = client.reply_to(LAST).await;
            if reply.error.as_ref().map(|e| e.code) != Some(want) {
                return Err(format!("replied {reply:?}"));
            }
            client.send(&connect_command(2, &ticket("Hostile"))).await;
            let reply = client.reply_to(2).await;
            if reply.connect.is_none() {
                return Err(format!("a valid connect after it got {reply:?}"));
            }
            still_answers(&mut client).await
        }
        CfExpect::Answered => {
            let reply = client.reply_to(LAST).await;
            if reply.error.is_some() {
                return Err(format!("replied {reply:?}"));
            }
            still_answers(&mut client).await
        }
        CfExpect::Subscribed(want) => {
            let (mut ok, mut refused, mut other) = (0, 0, Vec::new());
            for id in 1..=10_000 {
                let reply = client.reply_to(id).await;
                match reply.error.as_ref().map(|e| e.code) {
                    None => ok += 1,
                    Some(106) => refused += 1,
                    Some(code) => other.push(code),
                }
            }
            if (ok, refused, other.is_empty()) != (want, 10_000 - want, true) {
                return Err(format!(
                    "{ok} subscribed, {refused} refused with 106, others {other:?}"
                ));
            }
            still_answers(&mut client).await
        }
    }
}

/// A ping command still gets its reply.
async fn still_answers(client: &mut Centrifuge) -> Result<(), String> {
    // An id no case uses.
    const PING: u32 = 4_000_000;
    client
        .send(&Command {
            id: PING,
            ping: Some(Default::default()),
            ..Command::default()
        })
        .await;
    let reply = client.reply_to(PING).await;
    match reply.ping {
        Some(_) => Ok(()),
        None => Err(format!("a ping got {reply:?}")),
    }
}

#[tokio::test]
async fn the_centrifugo_door_answers_hostile_input_exactly_and_keeps_delivering() {
    let mut settings = serde_json::to_value(json!({
        "jwt_secret": String::from_utf8(SECRET.to_vec()).unwrap(),
        "api_key": API_KEY,
        "handshake_timeout_secs": 1,
        "commands_per_sec": 100000.0,
        "commands_burst": 100000,
        "max_subscriptions_per_connection": 8,
    }))
    .unwrap();
    settings["rate_limit_per_sec"] = json!(1000.0);
    let config: Config = serde_json::from_value(settings).unwrap();
    let server = Server::start(config).await;
    // The canaries: one through each door, in one channel.
    let url = server.url("/connection/websocket");
    let (mut canary, _) = Centrifuge::connect(&url, Encoding::Protobuf, &ticket("CanaryCf")).await;
    let subscribed = canary.call(subscribe_to(CF_CHANNEL)).await;
    assert!(subscribed.subscribe.is_some(), "{subscribed:?}");
    let room_ticket = token(
        SECRET,
        &json!({"name": "CanaryRoom", "rooms": [CF_CHANNEL], "exp": in_an_hour()}),
    );
    let room = server.url(&format!("/room/{CF_CHANNEL}?token={room_ticket}"));
    let mut room = connect(&room, ClientOptions::default())
        .await
        .unwrap()
        .socket;
    assert_eq!(next_event(&mut room).await.unwrap()["type"], "welcome");
    let cases = cf_cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let started = Instant::now();
        let outcome = run_cf_case(&server, case).await;
        eprintln!(
            "{index:>3} {:<58} {outcome:?} ({:?})",
            case.name,
            started.elapsed()
        );
        if let Err(why) = outcome {
            failures.push(format!("case `{}` ({:?}): {why}", case.name, case.encoding));
        }
        // Both canaries get the next publication, under one id.
        let text = format!("after {index}");
        let headers = format!("X-API-Key: {API_KEY}\r\n");
        let body = json!({"channel": CF_CHANNEL, "data": {"text": text}});
        let address = server.address.to_string();
        let (status, answer) = switchboard_test_support::http::request(
            &address,
            "POST",
            "/api/publish",
            &headers,
            Some(&body),
        )
        .await
        .expect("the API answers");
        assert_eq!(status, 200, "{answer}");
        let (_, offset, data) = canary.publication().await;
        assert_eq!(
            data["text"],
            text.as_str(),
            "case `{}`: the Centrifugo canary",
            case.name
        );
        loop {
            let event = next_event(&mut room)
                .await
                .unwrap_or_else(|e| panic!("case `{}`: the room canary: {e}", case.name));
            if event["type"] == "message" && event["text"] == text.as_str() {
                assert_eq!(
                    event["id"], offset,
                    "case `{}`: one id for both doors",
                    case.name
                );
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    server.stop().await;
}

// The Centrifugo door's HTTP transports: emulation requests for sessions that are not
// the sender's or not there, of the wrong form, too large or unreadable, and opening
// requests that cannot open. After every row an emulated canary session still takes
// its posted commands and still gets the server API's publication.

use switchboard_protocol::centrifuge::{encode_emulation, EmulationRequest};
use switchboard_test_support::centrifuge::post_emulation;

#[tokio::test]
async fn emulation_requests_get_exact_refusals_and_the_session_keeps_delivering() {
    let settings = json!({
        "jwt_secret": String::from_utf8(SECRET.to_vec()).unwrap(),
        "api_key": API_KEY,
    });
    let server = Server::start(serde_json::from_value(settings).unwrap()).await;
    let address = server.address.to_string();
    let (mut canary, reply) =
        Centrifuge::connect_over_http(&address, Encoding::Json, false, &ticket("CanaryHttp")).await;
    let client_id = reply.connect.expect("connected").client;
    assert!(canary
        .call(subscribe_to(CF_CHANNEL))
        .await
        .subscribe
        .is_some());
    let (session, node) = {
        let stream = canary.http().unwrap();
        (stream.session.clone(), stream.node.clone())
    };
    let forged = command(
        Encoding::Json,
        Command {
            publish: Some(PublishRequest {
                channel: CF_CHANNEL.into(),
                data: br#"{"text":"forged"}"#.to_vec(),
            }),
            ..Command::default()
        },
    );
    let request = |encoding: Encoding, session: &str, node: &str| {
        encode_emulation(
            encoding,
            &EmulationRequest {
                node: node.to_owned(),
                session: session.to_owned(),
                data: forged.clone(),
            },
        )
        .to_vec()
    };
    let json = |text: &str| text.as_bytes().to_vec();
    use Encoding::{Json, Protobuf};
    let rows: Vec<(&str, Encoding, Vec<u8>, u16)> = vec![
        (
            "emulation for another connection's public client id",
            Json,
            request(Json, &client_id, &node),
            410,
        ),
        (
            "emulation for a session nobody has",
            Json,
            request(Json, &"a".repeat(32), &node),
            410,
        ),
        (
            "emulation for a session nobody has, Protobuf",
            Protobuf,
            request(Protobuf, &"b".repeat(32), &node),
            410,
        ),
        (
            "emulation with an empty session",
            Json,
            request(Json, "", &node),
            400,
        ),
        (
            "emulation with a 10,000-byte session",
            Json,
            request(Json, &"c".repeat(10_000), &node),
            400,
        ),
        (
            "emulation with an upper-case session",
            Json,
            request(Json, &session.to_uppercase(), &node),
            400,
        ),
        (
            "emulation with a path as the session",
            Json,
            request(Json, "../../../../etc/passwd", &node),
            400,
        ),
        (
            "emulation for a node nobody is",
            Json,
            request(Json, &session, "fedcba9876543210"),
            404,
        ),
        (
            "emulation with an empty node",
            Json,
            request(Json, &session, ""),
            400,
        ),
        (
            "emulation with a node that is no address",
            Json,
            request(Json, &session, "node\r\nx: y"),
            400,
        ),
        (
            "emulation that is not JSON",
            Json,
            json("{\"session\":"),
            400,
        ),
        ("emulation that is a JSON array", Json, json("[1,2]"), 400),
        (
            "emulation whose data is not a string",
            Json,
            json(r#"{"session":"s","node":"n","data":[1]}"#),
            400,
        ),
        (
            "emulation that is not UTF-8",
            Json,
            vec![0xff, 0xfe, 0x7b],
            400,
        ),
        (
            "emulation that is no Protobuf",
            Protobuf,
            vec![0x0a, 0xff, 0xff, 0xff],
            400,
        ),
        (
            "emulation over 64 KiB",
            Json,
            vec![b' '; 64 * 1024 + 1],
            413,
        ),
    ];
    let count = rows.len();
    let mut failures = Vec::new();
    for (index, (name, encoding, body, want)) in rows.into_iter().enumerate() {
        let (status, answer) = post_emulation(&address, encoding, &body).await;
        eprintln!("{index:>3} {name:<58} {status}");
        if status != want {
            failures.push(format!("{name}: {status} {answer:?}, want {want}"));
        }
        canary_still_delivers(&server, &mut canary, index).await;
    }
    // Opening requests that cannot open a stream.
    let opening: Vec<(&str, String, u16)> = vec![
        (
            "sse without cf_connect",
            "GET /connection/sse HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            400,
        ),
        (
            "http_stream as a GET",
            "GET /connection/http_stream HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            405,
        ),
        (
            "emulation as a GET",
            "GET /emulation HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            405,
        ),
        (
            "http_stream body over 64 KiB",
            format!(
                "POST /connection/http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
                64 * 1024 + 1,
                " ".repeat(64 * 1024 + 1)
            ),
            413,
        ),
    ];
    let count = count + opening.len();
    for (index, (name, raw, want)) in opening.into_iter().enumerate() {
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
            .await
            .expect("an answer in time")
            .unwrap();
        let status: u16 = String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0);
        eprintln!("{:>3} {name:<58} {status}", index + 100);
        if status != want {
            failures.push(format!("{name}: {status}, want {want}"));
        }
        canary_still_delivers(&server, &mut canary, index + 100).await;
    }
    assert!(
        failures.is_empty(),
        "{} of {count} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    server.stop().await;
}

/// The emulated canary answers a posted ping and gets the API's next publication, the
/// first it sees since the last one (nothing forged reached it).
async fn canary_still_delivers(server: &Server, canary: &mut Centrifuge, index: usize) {
    let reply = canary
        .call(Command {
            ping: Some(Default::default()),
            ..Command::default()
        })
        .await;
    assert!(reply.ping.is_some(), "row {index}: {reply:?}");
    let text = format!("after {index}");
    let headers = format!("X-API-Key: {API_KEY}\r\n");
    let body = json!({"channel": CF_CHANNEL, "data": {"text": text}});
    let (status, _) = switchboard_test_support::http::request(
        &server.address.to_string(),
        "POST",
        "/api/publish",
        &headers,
        Some(&body),
    )
    .await
    .expect("the API answers");
    assert_eq!(status, 200);
    let (_, _, data) = canary.publication().await;
    assert_eq!(
        data["text"],
        text.as_str(),
        "row {index}: the canary's next publication"
    );
}

// HTTP/2 on the TLS listener: WebSocket streams (extended CONNECT) with a version other
// than 13 or none, a broken extension offer, no route, a route that is no WebSocket; a
// half-open stream whose body never comes; a WebSocket stream whose peer never answers.
// A room canary on a stream of the same connection still chats after them.

use http::{Method, StatusCode};
use switchboard_test_support::h2::{certificate, H2};

const H2_VERSION: (&str, &str) = ("sec-websocket-version", "13");

#[tokio::test]
async fn http2_streams_that_break_the_rules_get_exact_refusals_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let config = serde_json::from_value(json!({
        "tls_cert": cert, "tls_key": key,
        "handshake_timeout_secs": 1, "ping_interval_secs": 1, "pong_timeout_secs": 1,
    }))
    .unwrap();
    let server = Server::start(config).await;
    let mut h2 = H2::connect(&server.address.to_string(), &cert).await;
    // The canary: a room member on a stream of the same connection, read all along
    // (it answers the server's pings).
    let mut canary = h2
        .websocket("/room/h2canary?name=canary", &[H2_VERSION], None)
        .await
        .socket
        .expect("the canary's WebSocket");
    let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok(Some(message)) = canary.recv().await {
            if let Message::Text(text) = message {
                let _ = heard.send(text.as_str().to_owned());
            }
        }
    });

    let opened = h2
        .websocket("/echo", &[("sec-websocket-version", "8")], None)
        .await;
    assert_eq!(
        opened.status,
        StatusCode::UPGRADE_REQUIRED,
        "a version other than 13"
    );
    assert_eq!(opened.headers["sec-websocket-version"], "13");
    let opened = h2.websocket("/echo", &[], None).await;
    assert_eq!(opened.status, StatusCode::UPGRADE_REQUIRED, "no version");
    let opened = h2
        .websocket(
            "/echo",
            &[
                H2_VERSION,
                ("sec-websocket-extensions", "permessage-deflate; ="),
            ],
            None,
        )
        .await;
    assert_eq!(
        opened.status,
        StatusCode::BAD_REQUEST,
        "a broken extension offer"
    );
    let opened = h2.websocket("/nowhere", &[H2_VERSION], None).await;
    assert_eq!(opened.status, StatusCode::NOT_FOUND);
    let opened = h2.websocket("/healthz", &[H2_VERSION], None).await;
    assert_eq!(
        opened.status,
        StatusCode::BAD_REQUEST,
        "a route that is no WebSocket"
    );

    // A half-open stream: a body that never comes is answered 408 in time.
    let started = std::time::Instant::now();
    let status = h2.half_open("/emulation").await.expect("an answer");
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));

    // A WebSocket stream whose peer never answers a ping (nor says anything) is
    // dropped by the server, as a TCP one is: its ping, then the stream ends.
    let (status, _, stream) = h2.connect_stream("/echo", &[H2_VERSION]).await;
    assert_eq!(status, StatusCode::OK);
    let mut quiet = stream.unwrap();
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 256];
        loop {
            match quiet.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server ended the quiet stream");
    assert_eq!(seen.first(), Some(&0x89), "a ping first: {seen:?}");
    eprintln!("the quiet stream ended after {:?}", started.elapsed());

    // A connection that chose HTTP/2 and never sends its preface is dropped once the
    // handshake timeout (1 s) passes.
    let mut tls = (*switchboard_net::tls::client_config(Some(&cert)).unwrap()).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut silent = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let started = Instant::now();
    let mut sink = Vec::new();
    let dropped = tokio::time::timeout(Duration::from_secs(8), silent.read_to_end(&mut sink)).await;
    assert!(dropped.is_ok(), "a silent HTTP/2 connection is dropped");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // And the connection still serves: the canary still chats, /healthz answers.
    let (status, _) = h2.request(Method::GET, "/healthz", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h2
        .request(
            Method::POST,
            "/api/rooms/h2canary/messages",
            r#"{"text":"still here"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    loop {
        let text = tokio::time::timeout(Duration::from_secs(10), hearing.recv())
            .await
            .expect("the canary hears in time")
            .expect("the canary is still connected");
        if text.contains("still here") {
            break;
        }
    }
    server.stop().await;
}

// The Pusher door: broken JSON, forged and misplaced signatures, client events where
// they are not taken, oversized events, floods of subscribes and client events, bad
// sign-ins, refused handshakes; and its HTTP API's bad requests. After every case a
// Pusher canary and a room canary in one channel both get an event of the HTTP API.

use switchboard_test_support::pusher::{channel_auth, signed_path, user_auth, Pusher};

/// The channel of the Pusher canaries.
const PUSHER_CHANNEL: &str = "hostile-pusher";
const PUSHER_KEY: &str = "hostile-key";
const PUSHER_SECRET: &str = "hostile-app-secret";

#[derive(Debug)]
enum PusherExpect {
    /// Before the pong of a ping sent last, exactly these `pusher:error` codes.
    Errors(Vec<Option<u16>>),
    /// The server closes with this code.
    Close(u16),
}

/// One message a case sends.
enum Out {
    Text(String),
    Binary(Vec<u8>),
}

/// What a case sends, given the connection's socket id.
type Frames = Box<dyn Fn(&str) -> Vec<Out>>;

struct PusherCase {
    name: &'static str,
    /// The WebSocket's path and query.
    path: &'static str,
    frames: Frames,
    expect: PusherExpect,
}

fn pusher_case(
    name: &'static str,
    frames: impl Fn(&str) -> Vec<Out> + 'static,
    expect: PusherExpect,
) -> PusherCase {
    PusherCase {
        name,
        path: "/app/hostile-key?protocol=7",
        frames: Box::new(frames),
        expect,
    }
}

fn ptext(value: &Value) -> Out {
    Out::Text(value.to_string())
}

fn ptext_raw(text: &str) -> Out {
    Out::Text(text.to_owned())
}

fn psubscribe(channel: &str, auth: Option<&str>, channel_data: Option<&str>) -> Out {
    let mut data = json!({"channel": channel});
    if let Some(auth) = auth {
        data["auth"] = auth.into();
    }
    if let Some(channel_data) = channel_data {
        data["channel_data"] = channel_data.into();
    }
    ptext(&json!({"event": "pusher:subscribe", "data": data}))
}

fn signed(socket: &str, channel: &str, channel_data: Option<&str>) -> Out {
    let auth = channel_auth(PUSHER_KEY, PUSHER_SECRET, socket, channel, channel_data);
    psubscribe(channel, Some(&auth), channel_data)
}

fn client_event(channel: &str, data: Value) -> Out {
    ptext(&json!({"event": "client-x", "channel": channel, "data": data}))
}

fn signin(socket: &str, user_data: &str, secret: &str) -> Out {
    let auth = user_auth(PUSHER_KEY, secret, socket, user_data);
    ptext(&json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}))
}

fn pusher_cases() -> Vec<PusherCase> {
    use PusherExpect::*;
    let none = |n: usize| Errors(vec![None; n]);
    let raw = |t: &'static str| move |_: &str| vec![ptext_raw(t)];
    let mut cases = vec![
        pusher_case("not JSON", raw("{\"event\":"), none(1)),
        pusher_case("a JSON array", raw("[1,2]"), none(1)),
        pusher_case("an event that is a number", raw(r#"{"event":5}"#), none(1)),
        pusher_case(
            "subscribe without data",
            raw(r#"{"event":"pusher:subscribe"}"#),
            none(1),
        ),
        pusher_case(
            "subscribe to a channel that is a number",
            raw(r#"{"event":"pusher:subscribe","data":{"channel":5}}"#),
            none(1),
        ),
        pusher_case(
            "a channel name with a colon",
            |_| vec![psubscribe("a:b", None, None)],
            none(1),
        ),
        pusher_case(
            "a channel name of 165 characters",
            |_| vec![psubscribe(&"a".repeat(165), None, None)],
            none(1),
        ),
        pusher_case(
            "a private channel without auth",
            |_| vec![psubscribe("private-h", None, None)],
            none(1),
        ),
        pusher_case(
            "a private channel with a forged signature",
            |socket| {
                let auth = channel_auth(PUSHER_KEY, "guessed", socket, "private-h", None);
                vec![psubscribe("private-h", Some(&auth), None)]
            },
            none(1),
        ),
        pusher_case(
            "a private channel signed for another socket",
            |_| vec![signed("1.1", "private-h", None)],
            none(1),
        ),
        pusher_case(
            "a private channel signed for another channel",
            |socket| {
                let auth = channel_auth(PUSHER_KEY, PUSHER_SECRET, socket, "private-other", None);
                vec![psubscribe("private-h", Some(&auth), None)]
            },
            none(1),
        ),
        pusher_case(
            "auth without a colon",
            |_| vec![psubscribe("private-h", Some("no-colon"), None)],
            none(1),
        ),
        pusher_case(
            "a presence channel without channel_data",
            |socket| vec![signed(socket, "presence-h", None)],
            none(1),
        ),
        pusher_case(
            "presence channel_data without a user_id (signed)",
            |socket| vec![signed(socket, "presence-h", Some(r#"{"user_info":{}}"#))],
            none(1),
        ),
        pusher_case(
            "presence channel_data that is not JSON (signed)",
            |socket| vec![signed(socket, "presence-h", Some("not json"))],
            none(1),
        ),
        pusher_case(
            "presence signed over other channel_data",
            |socket| {
                let auth = channel_auth(
                    PUSHER_KEY,
                    PUSHER_SECRET,
                    socket,
                    "presence-h",
                    Some(r#"{"user_id":"1"}"#),
                );
                vec![psubscribe(
                    "presence-h",
                    Some(&auth),
                    Some(r#"{"user_id":"admin"}"#),
                )]
            },
            none(1),
        ),
        pusher_case(
            "another user's personal channel",
            |_| vec![psubscribe("#server-to-user-admin", None, None)],
            Errors(vec![Some(4009)]),
        ),
        pusher_case(
            "a client event on a public channel",
            |_| {
                vec![
                    psubscribe("public-h", None, None),
                    client_event("public-h", json!({})),
                ]
            },
            none(1),
        ),
        pusher_case(
            "a client event on an encrypted channel",
            |socket| {
                vec![
                    signed(socket, "private-encrypted-h", None),
                    client_event("private-encrypted-h", json!({})),
                ]
            },
            none(1),
        ),
        pusher_case(
            "a client event on a channel not subscribed",
            |_| vec![client_event("private-h", json!({}))],
            none(1),
        ),
        pusher_case(
            "a client event of 11 KiB",
            |socket| {
                vec![
                    signed(socket, "private-h", None),
                    client_event("private-h", json!("x".repeat(11 * 1024))),
                ]
            },
            none(1),
        ),
        pusher_case(
            "a client event without a channel",
            raw(r#"{"event":"client-x","data":{}}"#),
            none(1),
        ),
        pusher_case(
            "a client event name of 300 bytes",
            |socket| {
                let name = format!("client-{}", "n".repeat(293));
                vec![
                    signed(socket, "private-h", None),
                    ptext(&json!({"event": name, "channel": "private-h", "data": {}})),
                ]
            },
            none(1),
        ),
        pusher_case(
            "client data nested 10 000 deep",
            |socket| {
                let nested = format!(
                    r#"{{"event":"client-x","channel":"private-h","data":{}{}}}"#,
                    "[".repeat(10_000),
                    "]".repeat(10_000)
                );
                vec![signed(socket, "private-h", None), ptext_raw(&nested)]
            },
            none(1),
        ),
        pusher_case(
            "ten client events at once (one a second allowed here)",
            |socket| {
                let mut frames = vec![signed(socket, "private-h", None)];
                frames.extend((0..10).map(|i| client_event("private-h", json!({"i": i}))));
                frames
            },
            Errors(vec![Some(4301); 9]),
        ),
        pusher_case(
            "a binary message",
            |_| vec![Out::Binary(vec![0, 1])],
            none(1),
        ),
        pusher_case(
            "an unknown pusher event is ignored",
            raw(r#"{"event":"pusher:dance","data":{}}"#),
            none(0),
        ),
        pusher_case(
            "unsubscribing from a channel never joined is ignored",
            raw(r#"{"event":"pusher:unsubscribe","data":{"channel":"never"}}"#),
            none(0),
        ),
        pusher_case(
            "subscribing twice is answered twice",
            |_| {
                vec![
                    psubscribe("twice", None, None),
                    psubscribe("twice", None, None),
                ]
            },
            none(0),
        ),
        pusher_case(
            "25 refusals in a row end the connection (4100: reconnect after a backoff)",
            |_| (0..25).map(|_| ptext_raw("[]")).collect(),
            Close(4100),
        ),
        pusher_case(
            "a flood of 1 000 subscribes: 8 taken, the rest over capacity",
            |_| {
                (0..1000)
                    .map(|i| psubscribe(&format!("flood-{i}"), None, None))
                    .collect()
            },
            Errors(vec![Some(4100); 992]),
        ),
        pusher_case(
            "a public channel named like a limited one (#admin)",
            |_| vec![psubscribe("#admin", None, None)],
            none(1),
        ),
        pusher_case(
            "a sign-in with a forged signature",
            |socket| vec![signin(socket, r#"{"id":"admin"}"#, "guessed")],
            Close(4009),
        ),
        pusher_case(
            "a sign-in whose user_data is not JSON (signed)",
            |socket| vec![signin(socket, "not json", PUSHER_SECRET)],
            Close(4009),
        ),
        pusher_case(
            "a sign-in as a user id with a comma (signed)",
            |socket| vec![signin(socket, r#"{"id":"a,b"}"#, PUSHER_SECRET)],
            Close(4009),
        ),
        pusher_case(
            "a message over the 64 KiB limit",
            |_| {
                vec![ptext_raw(&format!(
                    r#"{{"event":"x","data":"{}"}}"#,
                    "x".repeat(70 * 1024)
                ))]
            },
            Close(1009),
        ),
    ];
    for (path, code, name) in [
        ("/app/unknown-key?protocol=7", 4001, "an unknown app key"),
        ("/app/hostile-key", 4008, "no protocol version"),
        (
            "/app/hostile-key?protocol=99",
            4007,
            "an unsupported protocol version",
        ),
        (
            "/app/hostile-key?protocol=7.x",
            4006,
            "a malformed protocol version",
        ),
    ] {
        cases.push(PusherCase {
            name,
            path,
            frames: Box::new(|_| Vec::new()),
            expect: Close(code),
        });
    }
    cases
}

/// Reads until the pong of the case's last ping (the codes of the errors met), or the
/// close.
async fn pusher_outcome(
    socket: &mut WebSocket<Stream>,
) -> Result<Result<Vec<Option<u16>>, u16>, String> {
    let mut errors = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, socket.recv()).await {
            Err(_) => {
                return Err(format!(
                    "no pong and no close in time (errors so far {errors:?})"
                ))
            }
            Ok(Err(e)) => return Err(format!("the connection failed: {e}")),
            Ok(Ok(None)) => return Ok(Err(socket.peer_close().map_or(1005, |f| f.code.0))),
            Ok(Ok(Some(Message::Text(text)))) => {
                let message: Value =
                    serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
                match message["event"].as_str() {
                    Some("pusher:pong") => return Ok(Ok(errors)),
                    Some("pusher:error") => {
                        errors.push(message["data"]["code"].as_u64().map(|c| c as u16))
                    }
                    _ => {}
                }
            }
            Ok(Ok(Some(_))) => {}
        }
    }
}

async fn run_pusher_case(server: &Server, case: &PusherCase) -> Result<(), String> {
    let mut socket = connect(&server.url(case.path), ClientOptions::default())
        .await
        .map_err(|e| format!("connecting: {e}"))?
        .socket;
    let first = next_event(&mut socket).await?;
    let socket_id = if first["event"] == "pusher:connection_established" {
        let data: Value =
            serde_json::from_str(first["data"].as_str().unwrap_or("{}")).unwrap_or_default();
        data["socket_id"].as_str().unwrap_or_default().to_owned()
    } else {
        // A refused handshake: its error, then the close.
        let code = first["data"]["code"].as_u64();
        return match (&case.expect, pusher_outcome(&mut socket).await?) {
            (PusherExpect::Close(want), Err(got))
                if u64::from(*want) == code.unwrap_or(0) && *want == got =>
            {
                Ok(())
            }
            (_, got) => Err(format!("refused with {first} then {got:?}")),
        };
    };
    for out in (case.frames)(&socket_id) {
        let message = match out {
            Out::Text(text) => Message::Text(text.into()),
            Out::Binary(data) => Message::Binary(data.into()),
        };
        socket
            .send(&message)
            .await
            .map_err(|e| format!("writing: {e}"))?;
    }
    let _ = socket
        .send_text(r#"{"event":"pusher:ping","data":{}}"#)
        .await;
    let got = pusher_outcome(&mut socket).await?;
    match (&case.expect, got) {
        (PusherExpect::Errors(want), Ok(errors)) if *want == errors => Ok(()),
        (PusherExpect::Close(want), Err(code)) if *want == code => Ok(()),
        (_, got) => Err(format!("got {got:?}")),
    }
}

/// A signed request to the Pusher HTTP API: its status.
async fn pusher_api(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<&Value>,
    secret: &str,
    age: u64,
) -> u16 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let text = body.map(Value::to_string);
    let signed = signed_path(
        method,
        path,
        &[],
        text.as_deref(),
        PUSHER_KEY,
        secret,
        Some(now - age),
    );
    switchboard_test_support::http::raw(&server.address.to_string(), method, &signed, "", body)
        .await
        .map_or(0, |(status, _)| status)
}

#[tokio::test]
async fn the_pusher_door_answers_hostile_input_exactly_and_keeps_delivering() {
    let settings = json!({
        "apps": [{"id": "5", "key": PUSHER_KEY, "secret": PUSHER_SECRET}],
        "max_subscriptions_per_connection": 8,
        "client_events_per_sec": 0.001,
        "commands_per_sec": 100000.0,
        "commands_burst": 100000,
    });
    let config: Config = serde_json::from_value(settings).unwrap();
    let server = Server::start(config).await;
    let mut canary = Pusher::open(&server.url("/app/hostile-key?protocol=7")).await;
    let ok = canary.subscribe(PUSHER_CHANNEL, None, None).await;
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");
    let mut room = connect(
        &server.url(&format!("/room/{PUSHER_CHANNEL}?name=CanaryRoom")),
        ClientOptions::default(),
    )
    .await
    .unwrap()
    .socket;
    assert_eq!(next_event(&mut room).await.unwrap()["type"], "welcome");
    let cases = pusher_cases();
    assert!(cases.len() >= 35, "{} cases", cases.len());
    let mut failures = Vec::new();
    let deliver = |index: usize| json!({"name": "after", "channel": PUSHER_CHANNEL, "data": json!({"text": format!("after {index}")}).to_string()});
    for (index, case) in cases.iter().enumerate() {
        let started = Instant::now();
        let outcome = run_pusher_case(&server, case).await;
        eprintln!(
            "{index:>3} {:<58} {outcome:?} ({:?})",
            case.name,
            started.elapsed()
        );
        if let Err(why) = outcome {
            failures.push(format!("case `{}`: {why}", case.name));
        }
        let status = pusher_api(
            &server,
            "POST",
            "/apps/5/events",
            Some(&deliver(index)),
            PUSHER_SECRET,
            0,
        )
        .await;
        assert_eq!(status, 200, "case `{}`: the API", case.name);
        let text = format!("after {index}");
        let event = canary.next_of("after").await;
        let data: Value = serde_json::from_str(event["data"].as_str().unwrap()).unwrap();
        assert_eq!(
            data["text"],
            text.as_str(),
            "case `{}`: the Pusher canary",
            case.name
        );
        loop {
            let event = next_event(&mut room)
                .await
                .unwrap_or_else(|e| panic!("case `{}`: the room canary: {e}", case.name));
            if event["type"] == "message" && event["text"] == text.as_str() {
                break;
            }
        }
    }
    // The HTTP API's bad requests.
    let event = json!({"name": "e", "channel": "c", "data": "{}"});
    let http_cases: Vec<(&str, u16)> = vec![
        ("a forged signature", pusher_api(&server, "POST", "/apps/5/events", Some(&event), "guessed", 0).await),
        ("a timestamp 601 s old", pusher_api(&server, "POST", "/apps/5/events", Some(&event), PUSHER_SECRET, 601).await),
        ("another app's id", pusher_api(&server, "POST", "/apps/6/events", Some(&event), PUSHER_SECRET, 0).await),
        ("a body that is not an event", pusher_api(&server, "POST", "/apps/5/events", Some(&json!([1])), PUSHER_SECRET, 0).await),
        ("an event of 11 KiB", pusher_api(&server, "POST", "/apps/5/events", Some(&json!({"name": "e", "channel": "c", "data": "x".repeat(11 * 1024)})), PUSHER_SECRET, 0).await),
        ("101 channels", pusher_api(&server, "POST", "/apps/5/events", Some(&json!({"name": "e", "channels": (0..101).map(|i| format!("c{i}")).collect::<Vec<_>>(), "data": "{}"})), PUSHER_SECRET, 0).await),
        ("a bad socket_id", pusher_api(&server, "POST", "/apps/5/events", Some(&json!({"name": "e", "channel": "c", "data": "{}", "socket_id": "x"})), PUSHER_SECRET, 0).await),
        ("a batch of 11", pusher_api(&server, "POST", "/apps/5/batch_events", Some(&json!({"batch": (0..11).map(|_| event.clone()).collect::<Vec<_>>()})), PUSHER_SECRET, 0).await),
        ("users of a public channel", pusher_api(&server, "GET", "/apps/5/channels/c/users", None, PUSHER_SECRET, 0).await),
    ];
    let want = [401, 401, 404, 400, 413, 400, 400, 400, 400];
    for ((name, got), want) in http_cases.iter().zip(want) {
        if *got != want {
            failures.push(format!("API case `{name}`: {got}, not {want}"));
        }
    }
    // Still delivering after them.
    assert_eq!(
        pusher_api(
            &server,
            "POST",
            "/apps/5/events",
            Some(&deliver(999)),
            PUSHER_SECRET,
            0
        )
        .await,
        200
    );
    canary.next_of("after").await;
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    server.stop().await;
}
