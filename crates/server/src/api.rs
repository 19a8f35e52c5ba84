//! The HTTP API: how a backend pushes messages (prices, notifications, readings) into a
//! room and reads history and presence.
//!
//! - `POST /api/rooms/{room}/messages` `{"text": "...", "data": ANY, "from": "...",
//!   "event": "...", "nonce": "..."}` (`text` and/or `data`; the rest optional: without
//!   `from` it is the server's publication) stores and broadcasts, to any channel
//!   whatever its options say of clients; answers 201 with the stored message once it
//!   is durable (200 with the original for a nonce already stored).
//! - `GET /api/rooms/{room}/messages?since=ID&limit=N` answers `{"messages": [...]}`.
//! - `GET /api/rooms/{room}/members` answers `{"members": [...]}`.
//! - `GET /api/rooms` answers `{"rooms": [{"room": "...", "members": N}]}` for rooms with
//!   members now.
//!
//! With `api_key` configured every call needs `Authorization: Bearer KEY` (or
//! `X-Api-Key: KEY`); without it, 401.

use std::collections::HashMap;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use switchboard_engine::{
    valid_channel, valid_user_name, Draft, EngineError, Outcome, Publication, CHANNEL_RULE,
    USER_NAME_RULE,
};
use switchboard_protocol::{room, MAX_NONCE};
use tracing::warn;

use crate::serve::AppState;

fn problem(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// 503 for a store (in a cluster, Redis) that did not answer.
fn unavailable(cause: &EngineError) -> Response {
    warn!(%cause, "reading rooms failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "room state is unavailable; retry shortly",
    )
}

fn message_json(publication: &Publication) -> Value {
    serde_json::from_slice(&room::message(publication)).expect("events are JSON")
}

/// `{"message": ...}` with `status`.
fn message_response(status: StatusCode, publication: &Publication) -> Response {
    (status, Json(json!({"message": message_json(publication)}))).into_response()
}

/// Equal in time whatever the inputs share, so a key cannot be guessed byte by byte.
fn same_key(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The key in `X-API-Key`, or in `Authorization` after `Bearer ` or (as Centrifugo's
/// server API has it) `apikey `.
pub(crate) fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(value) = headers.get("x-api-key") {
        return Some(value.as_bytes());
    }
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"apikey "))
}

/// Whether `headers` carry the configured API key (always, when none is configured).
pub(crate) fn key_ok(state: &AppState, headers: &HeaderMap) -> bool {
    match &state.config.api_key {
        Some(expected) => {
            presented_key(headers).is_some_and(|key| same_key(key, expected.as_bytes()))
        }
        None => true,
    }
}

/// Middleware: refuses API calls without the configured key.
pub(crate) async fn require_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if !key_ok(&state, request.headers()) {
        return problem(
            StatusCode::UNAUTHORIZED,
            "an API key is required: Authorization: Bearer KEY",
        );
    }
    next.run(request).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewMessage {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
}

/// Longest event name, in characters (Pusher's limit).
const MAX_EVENT_NAME: usize = 200;

impl NewMessage {
    /// What is wrong with it, as a status and a message.
    fn problem(&self, config: &crate::Config) -> Option<(StatusCode, String)> {
        let bad = |message: String| Some((StatusCode::BAD_REQUEST, message));
        if self
            .from
            .as_deref()
            .is_some_and(|from| !valid_user_name(from))
        {
            return bad(format!("`from`: {USER_NAME_RULE}"));
        }
        if self.text.is_none() && self.data.is_none() {
            return bad("a message needs `text`, `data`, or both".into());
        }
        if self
            .text
            .as_ref()
            .is_some_and(|text| text.chars().count() > config.max_text_chars)
        {
            return Some((StatusCode::PAYLOAD_TOO_LARGE, "text is too long".into()));
        }
        if self
            .data
            .as_ref()
            .is_some_and(|data| data.get().len() > config.room_max_message)
        {
            return Some((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("data is over {} bytes", config.room_max_message),
            ));
        }
        if self.event.as_ref().is_some_and(|event| {
            event.is_empty()
                || event.chars().count() > MAX_EVENT_NAME
                || event.chars().any(char::is_control)
        }) {
            return bad(format!(
                "`event` is 1-{MAX_EVENT_NAME} characters, no control characters"
            ));
        }
        if self.nonce.as_ref().is_some_and(|n| n.len() > MAX_NONCE) {
            return bad(format!("`nonce` is at most {MAX_NONCE} bytes"));
        }
        None
    }
}

pub(crate) async fn post_message(
    State(state): State<AppState>,
    Path(room): Path<String>,
    body: Result<Json<NewMessage>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !valid_channel(&room) {
        return problem(StatusCode::BAD_REQUEST, CHANNEL_RULE);
    }
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => return problem(StatusCode::BAD_REQUEST, &rejection.body_text()),
    };
    if let Some((status, message)) = new.problem(&state.config) {
        return problem(status, &message);
    }
    let not_stored = |cause: &EngineError| {
        warn!(%cause, room, "storing an API message failed");
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the message could not be stored; retry with the same nonce",
        )
    };
    let draft = Draft {
        text: new.text,
        data: new.data,
        event: new.event,
        nonce: new.nonce.clone(),
        client: None,
        client_info: None,
    };
    let receipt = match state
        .engine
        .publish(&room, new.from.as_deref(), draft)
        .await
    {
        Ok(receipt) => receipt,
        Err(cause) => return not_stored(&cause),
    };
    match receipt.settled().await {
        Ok(Outcome::Stored(delivery)) => {
            message_response(StatusCode::CREATED, &delivery.publication)
        }
        // A retry of a stored nonce: answer with the stored message, stored once.
        Ok(Outcome::Duplicate(_)) => {
            let nonce = new.nonce.unwrap_or_default();
            match state
                .engine
                .find_nonce(&room, new.from.as_deref(), &nonce)
                .await
            {
                Ok(Some(original)) => message_response(StatusCode::OK, &original),
                _ => problem(
                    StatusCode::CONFLICT,
                    "a message with this nonce is still being stored; retry",
                ),
            }
        }
        Err(EngineError::ShuttingDown) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ),
        Err(cause) => not_stored(&cause),
    }
}

pub(crate) async fn get_messages(
    State(state): State<AppState>,
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !valid_channel(&room) {
        return problem(StatusCode::BAD_REQUEST, CHANNEL_RULE);
    }
    let number = |key: &str, default: u64| match query.get(key) {
        None => Ok(default),
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| format!("{key} must be a whole number")),
    };
    let (since, limit) = match (number("since", 0), number("limit", 100)) {
        (Ok(since), Ok(limit)) => (since, limit.clamp(1, 1000) as usize),
        (Err(e), _) | (_, Err(e)) => return problem(StatusCode::BAD_REQUEST, &e),
    };
    match state.engine.history(&room, since, limit).await {
        Ok(messages) => {
            Json(json!({"messages": messages.iter().map(message_json).collect::<Vec<_>>()}))
                .into_response()
        }
        Err(cause) => {
            warn!(%cause, room, "reading history failed");
            problem(StatusCode::SERVICE_UNAVAILABLE, "history is unavailable")
        }
    }
}

pub(crate) async fn get_members(
    State(state): State<AppState>,
    Path(room): Path<String>,
) -> Response {
    if !valid_channel(&room) {
        return problem(StatusCode::BAD_REQUEST, CHANNEL_RULE);
    }
    match state.engine.presence(&room).await {
        Ok(members) => Json(json!({"members": members})).into_response(),
        Err(cause) => unavailable(&cause),
    }
}

pub(crate) async fn get_rooms(State(state): State<AppState>) -> Response {
    match state.engine.channels().await {
        Ok(rooms) => {
            let rooms: Vec<Value> = rooms
                .into_iter()
                // Other Pusher apps' channels (`{id}~name`) are not rooms.
                .filter(|(room, _)| valid_channel(room))
                .map(|(room, members)| json!({"room": room, "members": members}))
                .collect();
            Json(json!({"rooms": rooms})).into_response()
        }
        Err(cause) => unavailable(&cause),
    }
}
