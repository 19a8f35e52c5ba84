//! What a client receives: typed room events and connection state changes.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

/// One thing that happened, in the order it happened.
///
/// A room connection yields every variant but [`Event::Text`]; a raw connection
/// ([`crate::connect_raw`]) yields only [`Event::State`], [`Event::Text`] and
/// [`Event::Binary`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The connection went up, down, or away for good.
    State(State),
    /// The room greeted this connection (after every connect and reconnect).
    Welcome(Welcome),
    /// A chat message, each exactly once and in id order, across reconnections. A
    /// message this client sent arrives here too once the server stored it.
    Message(ChatMessage),
    /// Another member started or stopped typing.
    Typing { user: String, is_typing: bool },
    /// A user joined the room (their first connection).
    Join { user: String },
    /// A user left the room (their last connection).
    Leave { user: String },
    /// The server refused something. With a `nonce`, the message sent with it was
    /// dropped for good (retryable refusals are retried, not reported).
    Error(ServerError),
    /// Binary data another member relayed, or a binary message on a raw connection.
    Binary(Bytes),
    /// A text message on a raw connection.
    Text(String),
    /// A room event of a type this version does not know, as received.
    Unknown(String),
}

/// The connection's state.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum State {
    /// Opening connection attempt `attempt` (0 for the first, then 1, 2, … after a loss).
    Connecting { attempt: u32 },
    /// Connected; on a room, the welcome and any missed messages are being delivered.
    Connected,
    /// The connection was lost; attempt `attempt` starts after `delay`.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
    /// Closed for good: by [`crate::RoomClient::close`], by the server when reconnection
    /// is off, or after a refusal that retrying cannot fix (`failed`).
    Closed { reason: String, failed: bool },
}

/// The `welcome` event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct Welcome {
    pub room: String,
    /// The name the server knows this client by (from `?name=` or the token).
    pub user: String,
    pub members: Vec<String>,
    /// The room's last stored message id when this connection joined.
    #[serde(rename = "lastId")]
    pub last_id: u64,
    /// The limits the server enforces, when it announces them.
    #[serde(default)]
    pub limits: Option<Limits>,
    /// On a reconnection: the last message id seen before it. The messages after it
    /// up to `last_id` follow, so `last_id - resumed_after` were missed while away.
    #[serde(skip)]
    pub resumed_after: Option<u64>,
}

/// Limits a room announces in its welcome.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Limits {
    pub events_per_sec: f64,
    pub burst: u32,
    pub max_text_chars: usize,
}

/// A stored chat message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ChatMessage {
    pub id: u64,
    pub room: String,
    pub from: String,
    pub text: String,
    /// When the server stored it (RFC 3339, UTC).
    pub timestamp: String,
    #[serde(default)]
    pub nonce: Option<String>,
}

/// An `error` event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ServerError {
    pub code: String,
    pub message: String,
    /// The refused message's nonce (as returned by `send_message`), when there was one.
    #[serde(default)]
    pub nonce: Option<String>,
}

/// A room event as it arrives.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum Incoming {
    Welcome(Welcome),
    Message(ChatMessage),
    Typing {
        user: String,
        #[serde(rename = "isTyping")]
        is_typing: bool,
    },
    Join {
        user: String,
    },
    Leave {
        user: String,
    },
    Error(ServerError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_events_parse() {
        let welcome: Incoming = serde_json::from_str(
            r#"{"type":"welcome","room":"lobby","user":"Alice","members":["Alice","Bob"],"lastId":41,"limits":{"eventsPerSec":20.0,"burst":40,"maxTextChars":4096}}"#,
        )
        .unwrap();
        let Incoming::Welcome(welcome) = welcome else {
            panic!("{welcome:?}")
        };
        assert_eq!((welcome.user.as_str(), welcome.last_id), ("Alice", 41));
        assert_eq!(welcome.limits.unwrap().burst, 40);
        let message: Incoming = serde_json::from_str(
            r#"{"type":"message","id":42,"room":"lobby","from":"Alice","text":"Hi there!","timestamp":"2026-11-23T10:00:00.123Z","nonce":"c-17"}"#,
        )
        .unwrap();
        assert!(
            matches!(message, Incoming::Message(m) if m.id == 42 && m.nonce.as_deref() == Some("c-17"))
        );
        let typing: Incoming =
            serde_json::from_str(r#"{"type":"typing","user":"Bob","isTyping":true}"#).unwrap();
        assert!(matches!(
            typing,
            Incoming::Typing {
                is_typing: true,
                ..
            }
        ));
        assert!(serde_json::from_str::<Incoming>(r#"{"type":"dance"}"#).is_err());
    }
}
