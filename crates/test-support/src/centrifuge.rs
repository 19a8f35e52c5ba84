//! A Centrifugo-protocol connection for tests that look at the wire: commands sent and
//! replies matched by id, pushes kept in order until asked for.

use std::collections::VecDeque;
use std::time::Duration;

use switchboard_net::{connect, ClientOptions, Message, Stream, WebSocket};
use switchboard_protocol::centrifuge::{
    decode_replies, encode_command, Command, ConnectRequest, Encoding, Push, Reply,
    PROTOBUF_SUBPROTOCOL,
};

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

/// One connection to `/connection/websocket`.
#[derive(Debug)]
pub struct Centrifuge {
    pub socket: WebSocket<Stream>,
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
            socket: connected.socket,
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

    /// Sends `frame` as one message, text for JSON and binary for Protobuf.
    pub async fn send_raw(&mut self, frame: &[u8]) {
        let message = match self.encoding {
            Encoding::Json => Message::Text(
                String::from_utf8(frame.to_vec())
                    .expect("a JSON frame is text")
                    .into(),
            ),
            Encoding::Protobuf => Message::Binary(frame.to_vec().into()),
        };
        self.socket.send(&message).await.unwrap();
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
        let message = tokio::time::timeout(PATIENCE, self.socket.recv())
            .await
            .expect("a reply in time")
            .expect("a readable connection")
            .unwrap_or_else(|| {
                panic!(
                    "the server closed: {:?}",
                    self.socket
                        .peer_close()
                        .map(|f| (f.code.0, f.reason.clone()))
                )
            });
        let bytes = match message {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(data) => data.to_vec(),
            other => panic!("expected a reply, got {other:?}"),
        };
        decode_replies(self.encoding, &bytes).expect("replies the protocol can read")
    }

    /// Waits until the server closes; its close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match tokio::time::timeout(PATIENCE, self.socket.recv()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => {
                    return self
                        .socket
                        .peer_close()
                        .map_or((1005, String::new()), |f| (f.code.0, f.reason.clone()))
                }
                Ok(Err(error)) => panic!("the connection failed instead of closing: {error}"),
                Err(_) => panic!("the server did not close in time"),
            }
        }
    }
}
