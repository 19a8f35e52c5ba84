//! What a client receives: the room protocol's events (the types of
//! `switchboard-protocol`, shared with the server) and connection state changes.

use std::time::Duration;

use bytes::Bytes;

pub use switchboard_protocol::room::{ErrorEvent as ServerError, Limits, Welcome};
/// A room's message: `text`, `data` (any JSON) or both, its sender (`None` for the
/// server's own publications), an optional event name, its id and time.
pub use switchboard_protocol::Publication as ChatMessage;

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
    /// The room greeted this connection (after every connect and reconnect). On a
    /// reconnection, `resumed` says where it resumed and whether it missed nothing.
    Welcome {
        welcome: Welcome,
        resumed: Option<Resumed>,
    },
    /// A message, each exactly once and in id order within the room's epoch, across
    /// reconnections. A message this client sent arrives here too once the server
    /// stored it.
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

/// Where a reconnection resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// The last message id seen before the connection was lost. The messages after it,
    /// up to the welcome's `last_id`, follow.
    pub after: u64,
    /// `false` when the room could not give every message missed since: some were no
    /// longer kept (its history size or age), or its history was reset (a new epoch:
    /// the messages that follow are the newest of the new history, their ids start
    /// over). Never a silent gap.
    pub complete: bool,
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
