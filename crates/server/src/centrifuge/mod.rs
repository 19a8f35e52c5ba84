//! The Centrifugo door: Centrifugo's client protocol (v2) at `/connection/websocket`,
//! JSON or Protobuf (subprotocol `centrifuge-protobuf`), and its server API under
//! `/api` (docs/PROTOCOL.md). Many channels share one connection; every channel is the
//! engine's, so a publication made through any door reaches every door's subscribers
//! in one sequence (its id is this door's `offset`).
//!
//! - `session.rs`: one connection, from `connect` to its close.
//! - `transport.rs`: what a session talks over: a WebSocket, or an emulated
//!   connection (an HTTP stream or SSE one way, `POST /emulation` the other).
//! - `emulation.rs`: the HTTP transports and `/emulation`, routed across a cluster.
//! - `api.rs`: the server API.
//! - `clients.rs`: this node's connections by user, for the server API.

mod api;
mod clients;
mod emulation;
mod session;
mod transport;

use std::borrow::Cow;
use std::collections::HashMap;

use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use switchboard_engine::{Format, Publication};
use switchboard_protocol::centrifuge::{self as proto, Encoding, PROTOBUF_SUBPROTOCOL};

pub(crate) use api::router;
pub(crate) use clients::{apply_notices, Clients};
pub(crate) use emulation::{apply_posts, emulation, http_stream, sse, Sessions};

use crate::serve::AppState;
use crate::upgrade::upgrade_with;

/// This door's slots in each publication's encoding cache.
const JSON: Format = Format(1);
const PROTOBUF: Format = Format(2);

/// The server's name and version in connect replies.
const VERSION: &str = concat!("switchboard ", env!("CARGO_PKG_VERSION"));

/// `GET /connection/websocket`.
pub(crate) async fn websocket(State(state): State<AppState>, request: Request) -> Response {
    let protobuf = request
        .headers()
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|offered| offered.trim() == PROTOBUF_SUBPROTOCOL);
    let (encoding, subprotocol) = if protobuf {
        (Encoding::Protobuf, Some(PROTOBUF_SUBPROTOCOL))
    } else {
        (Encoding::Json, None)
    };
    // The door pings in its own protocol, on time (the SDKs count on it).
    let config = state
        .config
        .socket_config(state.config.room_max_message)
        .with_ping_interval(None);
    let session_state = state.clone();
    upgrade_with(&state, request, config, subprotocol, move |socket, _| {
        session::run(
            transport::Transport::WebSocket(socket),
            encoding,
            session_state,
        )
    })
}

/// A publication's `data` here: its data, or `{"text": TEXT}` for a text-only message.
fn data_of(publication: &Publication) -> Cow<'_, [u8]> {
    match (&publication.data, &publication.text) {
        (Some(data), _) => Cow::Borrowed(data.get().as_bytes()),
        (None, Some(text)) => Cow::Owned(
            serde_json::to_vec(&serde_json::json!({ "text": text })).expect("JSON serializes"),
        ),
        (None, None) => Cow::Borrowed(b"null"),
    }
}

/// A publication's tags here: its event name, if it has one, as `event`.
fn tags_of(publication: &Publication) -> HashMap<String, String> {
    publication
        .event
        .iter()
        .map(|event| ("event".to_owned(), event.clone()))
        .collect()
}

/// Who published it: its user, and the connection where its door kept one.
fn publisher_of(publication: &Publication) -> Option<proto::Publisher<'_>> {
    publication.from.as_deref().map(|user| proto::Publisher {
        user,
        client: publication.client.as_deref().unwrap_or(""),
        conn_info: publication
            .client_info
            .as_deref()
            .map_or(&[][..], |info| info.get().as_bytes()),
    })
}

/// A publication as this protocol's message (in replies: subscribe, history).
fn publication(publication: &Publication) -> proto::Publication {
    proto::Publication {
        data: data_of(publication).into_owned(),
        info: publisher_of(publication).map(|p| proto::ClientInfo {
            user: p.user.to_owned(),
            client: p.client.to_owned(),
            conn_info: p.conn_info.to_vec(),
            ..proto::ClientInfo::default()
        }),
        offset: publication.id,
        tags: tags_of(publication),
    }
}

/// A publication's `pub` push, as a frame.
fn push_of(encoding: Encoding, publication: &Publication) -> Bytes {
    proto::publication_push(
        encoding,
        &publication.channel,
        publication.id,
        &data_of(publication),
        publisher_of(publication),
        &tags_of(publication),
    )
}

/// The slot of `encoding` in the encoding cache.
fn format_of(encoding: Encoding) -> Format {
    match encoding {
        Encoding::Json => JSON,
        Encoding::Protobuf => PROTOBUF,
    }
}

/// The error codes of the protocol this door answers with.
pub(crate) mod codes {
    pub(crate) const INTERNAL: u32 = 100;
    pub(crate) const UNAUTHORIZED: u32 = 101;
    pub(crate) const PERMISSION_DENIED: u32 = 103;
    pub(crate) const METHOD_NOT_FOUND: u32 = 104;
    pub(crate) const ALREADY_SUBSCRIBED: u32 = 105;
    pub(crate) const LIMIT_EXCEEDED: u32 = 106;
    pub(crate) const BAD_REQUEST: u32 = 107;
    pub(crate) const NOT_AVAILABLE: u32 = 108;
    pub(crate) const TOKEN_EXPIRED: u32 = 109;
    pub(crate) const TOO_MANY_REQUESTS: u32 = 111;
    pub(crate) const UNRECOVERABLE_POSITION: u32 = 112;

    /// The message the specification gives each code.
    pub(crate) fn message(code: u32) -> &'static str {
        match code {
            INTERNAL => "internal server error",
            UNAUTHORIZED => "unauthorized",
            PERMISSION_DENIED => "permission denied",
            METHOD_NOT_FOUND => "method not found",
            ALREADY_SUBSCRIBED => "already subscribed",
            LIMIT_EXCEEDED => "limit exceeded",
            BAD_REQUEST => "bad request",
            NOT_AVAILABLE => "not available",
            TOKEN_EXPIRED => "token expired",
            TOO_MANY_REQUESTS => "too many requests",
            UNRECOVERABLE_POSITION => "unrecoverable position",
            _ => "error",
        }
    }
}

/// Disconnect codes (the WebSocket close code and reason).
pub(crate) mod disconnect {
    pub(crate) const SHUTDOWN: (u16, &str) = (3001, "shutdown");
    pub(crate) const EXPIRED: (u16, &str) = (3005, "connection expired");
    pub(crate) const SLOW: (u16, &str) = (3008, "slow");
    pub(crate) const NO_PONG: (u16, &str) = (3012, "no pong");
    pub(crate) const TOO_MANY_REQUESTS: (u16, &str) = (3013, "too many requests");
    pub(crate) const INVALID_TOKEN: (u16, &str) = (3500, "invalid token");
    pub(crate) const BAD_REQUEST: (u16, &str) = (3501, "bad request");
    pub(crate) const STALE: (u16, &str) = (3502, "stale");
    pub(crate) const FORCE_NO_RECONNECT: (u16, &str) = (3503, "force disconnect");
}

/// Unsubscribe codes (in an `unsubscribe` push).
pub(crate) mod unsubscribe {
    pub(crate) const SERVER: (u32, &str) = (2000, "server unsubscribe");
    pub(crate) const INSUFFICIENT: (u32, &str) = (2500, "insufficient state");
    pub(crate) const EXPIRED: (u32, &str) = (2501, "subscription expired");
}
