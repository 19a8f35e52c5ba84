//! A room connection whose events are read as JSON, for tests that look at the wire.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_net::{connect, ClientOptions, Message, Stream, WebSocket};

/// One connection to `/room/{room}`.
#[derive(Debug)]
pub struct Room {
    pub socket: WebSocket<Stream>,
}

/// How long a test waits for an event.
const PATIENCE: Duration = Duration::from_secs(10);

impl Room {
    /// Opens `url`; its first event, the welcome, is still to be read.
    pub async fn open(url: &str) -> Self {
        let socket = connect(url, ClientOptions::default())
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
            .socket;
        Self { socket }
    }

    /// Opens `url` and reads its welcome.
    pub async fn join(url: &str) -> (Self, Value) {
        let mut room = Self::open(url).await;
        let welcome = room.next().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (room, welcome)
    }

    /// The next JSON event.
    pub async fn next(&mut self) -> Value {
        match self.message().await {
            Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
            other => panic!("expected a JSON event, got {other:?}"),
        }
    }

    /// The next message of any kind; panics when the connection closes.
    pub async fn message(&mut self) -> Message {
        tokio::time::timeout(PATIENCE, self.socket.recv())
            .await
            .expect("an event in time")
            .expect("a readable connection")
            .expect("an open connection")
    }

    /// Reads (answering pings, as any client does) for `quiet`; panics if anything
    /// comes or the connection ends meanwhile.
    pub async fn stays_quiet(&mut self, quiet: std::time::Duration) {
        if let Ok(got) = tokio::time::timeout(quiet, self.socket.recv()).await {
            panic!("expected nothing for {quiet:?}, got {got:?}");
        }
    }

    /// The next event of `kind`, skipping others (presence, typing).
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let event = self.next().await;
            if event["type"] == kind {
                return event;
            }
        }
    }

    /// The ids of the `message` events up to (and including) the one with `id`.
    pub async fn ids_upto(&mut self, id: u64) -> Vec<u64> {
        let mut ids = Vec::new();
        loop {
            let event = self.next_of("message").await;
            let got = event["id"].as_u64().expect("an id");
            ids.push(got);
            if got >= id {
                return ids;
            }
        }
    }

    pub async fn send(&mut self, event: Value) {
        self.socket.send_text(&event.to_string()).await.unwrap();
    }

    /// Sends a message with `text` and returns its id once it came back.
    pub async fn say(&mut self, text: &str) -> u64 {
        self.send(json!({"type": "message", "text": text})).await;
        loop {
            let event = self.next_of("message").await;
            if event["text"] == text {
                return event["id"].as_u64().unwrap();
            }
        }
    }

    /// Waits until the server closes; its close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(PATIENCE, self.socket.recv()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return self.socket.peer_close().map_or(1005, |frame| frame.code.0),
                Ok(Err(error)) => panic!("the connection failed instead of closing: {error}"),
                Err(_) => panic!("the server did not close in time"),
            }
        }
    }
}

/// The HTTP status a server refused a room connection to `url` with; panics when it
/// accepted, or failed otherwise.
pub async fn refused(url: &str) -> u16 {
    use switchboard_net::wire::handshake::HandshakeError;
    match connect(url, ClientOptions::default()).await {
        Ok(_) => panic!("{url} was accepted"),
        Err(switchboard_net::Error::Handshake(HandshakeError::UnexpectedStatus {
            status, ..
        })) => status,
        Err(other) => panic!("{url} failed otherwise: {other}"),
    }
}
