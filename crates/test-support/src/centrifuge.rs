//! A Centrifugo-protocol connection for tests that look at the wire: commands sent and
//! replies matched by id, pushes kept in order until asked for. It goes over a
//! WebSocket, or over an HTTP transport (`http_stream`, `sse`) with its commands posted
//! to `/emulation`.

use std::collections::VecDeque;
use std::time::Duration;

use switchboard_net::{connect, ClientOptions, Message, Stream, WebSocket};
use switchboard_protocol::centrifuge::{
    decode_replies, encode_command, encode_emulation, Command, ConnectRequest, EmulationRequest,
    Encoding, Push, Reply, PROTOBUF_SUBPROTOCOL,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for a reply or a push.
const PATIENCE: Duration = Duration::from_secs(10);

/// A `connect` command with `id` (0: for [`Centrifuge::call`] to number) and `token`
/// (empty: anonymous).
pub fn connect_command(id: u32, token: &str) -> Command {
    Command {
        id,
        connect: Some(ConnectRequest {
            token: token.to_owned(),
            ..ConnectRequest::default()
        }),
        ..Command::default()
    }
}

/// An HTTP transport's response, read as it streams (the request went as HTTP/1.0,
/// so the body is the stream itself, up to the close).
#[derive(Debug)]
pub struct HttpStream {
    stream: TcpStream,
    buffer: Vec<u8>,
    sse: bool,
    /// The server's address, where commands are posted.
    pub address: String,
    /// The answer's head (and for a refusal, its body).
    pub head: String,
    /// What the connect reply named, once read.
    pub session: String,
    pub node: String,
}

#[derive(Debug)]
enum Link {
    WebSocket(Box<WebSocket<Stream>>),
    Http(HttpStream),
}

/// Posts `body` to `/emulation` at `address` (Protobuf as `application/octet-stream`);
/// the status and the body.
pub async fn post_emulation(address: &str, encoding: Encoding, body: &[u8]) -> (u16, String) {
    let content_type = match encoding {
        Encoding::Json => "application/json",
        Encoding::Protobuf => "application/octet-stream",
    };
    let mut stream = TcpStream::connect(address).await.expect("the server");
    let head = format!(
        "POST /emulation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("sent");
    stream.write_all(body).await.expect("sent");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

impl HttpStream {
    /// Opens `/connection/http_stream` (`sse`: false) or `/connection/sse` at `address`
    /// with `first` (a frame of commands) as the opening request's body or its
    /// `cf_connect`; the status is in the head.
    pub async fn open(address: &str, encoding: Encoding, sse: bool, first: &[u8]) -> (Self, u16) {
        let mut stream = TcpStream::connect(address).await.expect("the server");
        if sse {
            let connect: String = first
                .iter()
                .map(|&b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        char::from(b).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            let request = format!(
                "GET /connection/sse?cf_connect={connect} HTTP/1.0\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.expect("sent");
        } else {
            let content_type = match encoding {
                Encoding::Json => "application/json",
                Encoding::Protobuf => "application/octet-stream",
            };
            let request = format!(
                "POST /connection/http_stream HTTP/1.0\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                first.len()
            );
            stream.write_all(request.as_bytes()).await.expect("sent");
            stream.write_all(first).await.expect("sent");
        }
        let (status, head, buffer) = crate::sse::read_head(&mut stream).await;
        let stream = Self {
            stream,
            buffer,
            sse,
            address: address.to_owned(),
            head,
            session: String::new(),
            node: String::new(),
        };
        (stream, status)
    }

    /// The frame of the next message on the stream; `None` once it ended.
    async fn next_frame(&mut self, encoding: Encoding) -> Option<Vec<u8>> {
        loop {
            if let Some(frame) = self.take_frame(encoding) {
                return Some(frame);
            }
            let mut chunk = [0u8; 8192];
            let read = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
                .await
                .expect("a reply in time")
                .ok()?;
            if read == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    fn take_frame(&mut self, encoding: Encoding) -> Option<Vec<u8>> {
        if self.sse {
            let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block).into_owned();
            let data: Vec<&str> = block
                .lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .collect();
            return Some(data.join("\n").into_bytes());
        }
        match encoding {
            Encoding::Json => {
                let end = self.buffer.iter().position(|&b| b == b'\n')?;
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                Some(line)
            }
            Encoding::Protobuf => {
                let mut rest = &self.buffer[..];
                let length = prost_varint(&mut rest)?;
                let header = self.buffer.len() - rest.len();
                if rest.len() < length {
                    return None;
                }
                Some(self.buffer.drain(..header + length).collect())
            }
        }
    }

    /// Posts `frame` (commands in `encoding`) for this stream's session.
    pub async fn post(&self, encoding: Encoding, frame: &[u8]) -> (u16, String) {
        let request = EmulationRequest {
            node: self.node.clone(),
            session: self.session.clone(),
            data: frame.to_vec(),
        };
        post_emulation(
            &self.address,
            encoding,
            &encode_emulation(encoding, &request),
        )
        .await
    }
}

/// A varint at the front of `bytes` (advancing past it); `None` while incomplete.
fn prost_varint(bytes: &mut &[u8]) -> Option<usize> {
    let mut value = 0usize;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

/// One connection to `/connection/websocket`, or over an HTTP transport.
#[derive(Debug)]
pub struct Centrifuge {
    link: Link,
    pub encoding: Encoding,
    next_id: u32,
    pushes: VecDeque<Push>,
    /// Replies read while waiting for another one.
    replies: Vec<Reply>,
    /// Empty replies (pings) seen so far.
    pub pings: usize,
}

impl Centrifuge {
    /// Opens the WebSocket (Protobuf through its subprotocol); nothing is sent yet.
    pub async fn open(url: &str, encoding: Encoding) -> Self {
        let mut options = ClientOptions::default();
        if encoding == Encoding::Protobuf {
            options.protocols = vec![PROTOBUF_SUBPROTOCOL.to_owned()];
        }
        let connected = connect(url, options)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        Self {
            link: Link::WebSocket(Box::new(connected.socket)),
            encoding,
            next_id: 0,
            pushes: VecDeque::new(),
            replies: Vec::new(),
            pings: 0,
        }
    }

    /// Opens and connects with `token` (empty: anonymous); the connect reply.
    pub async fn connect(url: &str, encoding: Encoding, token: &str) -> (Self, Reply) {
        let mut client = Self::open(url, encoding).await;
        let reply = client.call(connect_command(0, token)).await;
        (client, reply)
    }

    /// Connects over `/connection/http_stream` (`sse`: false) or `/connection/sse` at
    /// `address` with `token`; the connect reply (with its session and node kept for
    /// the commands posted after).
    pub async fn connect_over_http(
        address: &str,
        encoding: Encoding,
        sse: bool,
        token: &str,
    ) -> (Self, Reply) {
        let first = encode_command(encoding, &connect_command(1, token));
        let (stream, status) = HttpStream::open(address, encoding, sse, &first).await;
        assert_eq!(status, 200, "{}", stream.head);
        let mut client = Self::from_http(stream, encoding);
        client.next_id = 1;
        let reply = client.reply_to(1).await;
        if let (Link::Http(stream), Some(result)) = (&mut client.link, &reply.connect) {
            stream.session.clone_from(&result.session);
            stream.node.clone_from(&result.node);
        }
        (client, reply)
    }

    /// A connection over an HTTP transport's stream, opened already.
    pub fn from_http(stream: HttpStream, encoding: Encoding) -> Self {
        Self {
            link: Link::Http(stream),
            encoding,
            next_id: 0,
            pushes: VecDeque::new(),
            replies: Vec::new(),
            pings: 0,
        }
    }

    /// The HTTP transport's stream, on an emulated connection.
    pub fn http(&self) -> Option<&HttpStream> {
        match &self.link {
            Link::Http(stream) => Some(stream),
            Link::WebSocket(_) => None,
        }
    }

    /// Sends `command` with the next id and waits for its reply.
    pub async fn call(&mut self, mut command: Command) -> Reply {
        self.next_id += 1;
        command.id = self.next_id;
        self.send(&command).await;
        self.reply_to(self.next_id).await
    }

    /// Sends `command` as it is (its id untouched).
    pub async fn send(&mut self, command: &Command) {
        let frame = encode_command(self.encoding, command);
        self.send_raw(&frame).await;
    }

    /// Sends `frame` as one message, text for JSON and binary for Protobuf (on an HTTP
    /// transport, one emulation request that must be answered 204).
    pub async fn send_raw(&mut self, frame: &[u8]) {
        let socket = match &mut self.link {
            Link::WebSocket(socket) => socket,
            Link::Http(stream) => {
                let (status, body) = stream.post(self.encoding, frame).await;
                assert_eq!(status, 204, "emulation: {body}");
                return;
            }
        };
        let message = match self.encoding {
            Encoding::Json => Message::Text(
                String::from_utf8(frame.to_vec())
                    .expect("a JSON frame is text")
                    .into(),
            ),
            Encoding::Protobuf => Message::Binary(frame.to_vec().into()),
        };
        socket.send(&message).await.unwrap();
    }

    /// The reply with `id`; pushes and other replies met on the way are kept.
    pub async fn reply_to(&mut self, id: u32) -> Reply {
        if let Some(at) = self.replies.iter().position(|r| r.id == id) {
            return self.replies.remove(at);
        }
        loop {
            for reply in self.read().await {
                if reply.id == id {
                    return reply;
                }
                self.keep(reply);
            }
        }
    }

    fn keep(&mut self, reply: Reply) {
        match reply.push {
            Some(push) => self.pushes.push_back(push),
            None if reply.id == 0 => self.pings += 1,
            None => self.replies.push(reply),
        }
    }

    /// The next push.
    pub async fn push(&mut self) -> Push {
        loop {
            if let Some(push) = self.pushes.pop_front() {
                return push;
            }
            for reply in self.read().await {
                self.keep(reply);
            }
        }
    }

    /// The next push of a publication: its channel, offset and data.
    pub async fn publication(&mut self) -> (String, u64, serde_json::Value) {
        loop {
            let push = self.push().await;
            if let Some(publication) = push.publication {
                let data = serde_json::from_slice(&publication.data).expect("JSON data");
                return (push.channel, publication.offset, data);
            }
        }
    }

    /// The replies of the next message.
    async fn read(&mut self) -> Vec<Reply> {
        let socket = match &mut self.link {
            Link::WebSocket(socket) => socket,
            Link::Http(stream) => {
                let frame = stream
                    .next_frame(self.encoding)
                    .await
                    .expect("the stream ended before a reply");
                return decode_replies(self.encoding, &frame)
                    .expect("replies the protocol can read");
            }
        };
        let message = tokio::time::timeout(PATIENCE, socket.recv())
            .await
            .expect("a reply in time")
            .expect("a readable connection")
            .unwrap_or_else(|| {
                panic!(
                    "the server closed: {:?}",
                    socket.peer_close().map(|f| (f.code.0, f.reason.clone()))
                )
            });
        let bytes = match message {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(data) => data.to_vec(),
            other => panic!("expected a reply, got {other:?}"),
        };
        decode_replies(self.encoding, &bytes).expect("replies the protocol can read")
    }

    /// Waits until the server closes; its close code and reason (on an HTTP transport,
    /// those of the `disconnect` push before the stream ends).
    pub async fn closed(&mut self) -> (u16, String) {
        let socket = match &mut self.link {
            Link::WebSocket(socket) => socket,
            Link::Http(stream) => {
                let mut disconnect = None;
                while let Some(frame) = stream.next_frame(self.encoding).await {
                    for reply in decode_replies(self.encoding, &frame).expect("replies") {
                        if reply.id == 0 && reply.push.is_none() {
                            self.pings += 1;
                        }
                        if let Some(d) = reply.push.and_then(|p| p.disconnect) {
                            disconnect = Some((u16::try_from(d.code).unwrap_or(0), d.reason));
                        }
                    }
                }
                return disconnect.expect("a disconnect push before the stream ended");
            }
        };
        loop {
            match tokio::time::timeout(PATIENCE, socket.recv()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => {
                    return socket
                        .peer_close()
                        .map_or((1005, String::new()), |f| (f.code.0, f.reason.clone()))
                }
                Ok(Err(error)) => panic!("the connection failed instead of closing: {error}"),
                Err(_) => panic!("the server did not close in time"),
            }
        }
    }
}
