//! `switchboard-protocol`: the wire formats Switchboard's doors speak, with no I/O and no
//! storage in it, so every parser of them can be fuzzed on its own (docs/PROTOCOL.md).
//!
//! - [`Publication`] is one message of a channel as it is stored and sent: its id, who
//!   sent it (absent for a server publication), its `text` and/or `data` (any JSON), an
//!   optional `event` name, the server's timestamp and the sender's `nonce`.
//! - [`room`] is the room protocol, both directions: the events a client sends
//!   ([`room::ClientEvent`], parsed by [`room::parse_client_event`] with an error code for
//!   every refusal) and the events a server sends ([`room::ServerEvent`]). The server and
//!   the Rust client both use these types; neither writes the JSON by hand.
//! - [`centrifuge`] is Centrifugo's client protocol (v2), JSON and Protobuf: the commands
//!   its SDKs send and the replies and pushes they read.
//! - [`pusher`] is the Pusher Channels protocol (version 7): its messages, and the
//!   signatures of channel and user authorisation, HTTP API requests and webhooks.
//! - [`proxy`] is who a client is behind a proxy: the PROXY protocol header, the
//!   `Forwarded` and `X-Forwarded-For` headers, and the address ranges trusted to send them.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub mod centrifuge;
pub mod proxy;
pub mod pusher;
pub mod room;

/// A channel's publication, as stored and as the room protocol's `message` event carries
/// it (the channel is its `room` there).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publication {
    /// One more than the channel's previous publication's.
    pub id: u64,
    #[serde(rename = "room")]
    pub channel: String,
    /// The user who sent it; absent for a publication of the server (its HTTP API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Any JSON value, kept and sent as it was serialized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// An event name (the Pusher door's event; absent for a plain message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// RFC 3339 in UTC with milliseconds, set by the server.
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// The publishing connection's id, where its door has one (the Centrifugo door's
    /// client id). Stored, not part of the room protocol's event.
    #[serde(skip)]
    pub client: Option<String>,
    /// What the publishing connection's token said of it (`info`: any JSON), where its
    /// door keeps that. Stored, not part of the room protocol's event.
    #[serde(skip)]
    pub client_info: Option<Box<RawValue>>,
}

impl Publication {
    /// The serialized `data`, if any.
    pub fn data_json(&self) -> Option<&str> {
        self.data.as_deref().map(RawValue::get)
    }
}

impl PartialEq for Publication {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.channel == other.channel
            && self.from == other.from
            && self.text == other.text
            && self.data_json() == other.data_json()
            && self.event == other.event
            && self.timestamp == other.timestamp
            && self.nonce == other.nonce
            && self.client == other.client
            && self.client_info.as_deref().map(RawValue::get)
                == other.client_info.as_deref().map(RawValue::get)
    }
}

impl Eq for Publication {}

/// Longest accepted `nonce`, in bytes.
pub const MAX_NONCE: usize = 128;
