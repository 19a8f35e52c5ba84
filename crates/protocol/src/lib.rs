//! `switchboard-protocol`: the room protocol's JSON (DESIGN.md, "The room protocol"),
//! with no I/O and no storage in it, so every parser of it can be fuzzed on its own.
//!
//! - [`event`] parses what clients send and writes what servers send.
//! - [`StoredMessage`] is a room message as it is kept and sent.

pub mod event;

/// A stored room message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub room: String,
    pub id: u64,
    pub from: String,
    pub text: String,
    /// RFC 3339 with milliseconds, set by the server.
    pub timestamp: String,
    pub nonce: Option<String>,
}
