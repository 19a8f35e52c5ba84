//! The HTTP API: how a backend pushes messages (prices, notifications, readings) into a
//! room and reads history and presence.
//!
//! - `POST /api/rooms/{room}/messages` `{"from": "...", "text": "...", "nonce": "..."}`
//!   stores and broadcasts; answers 201 with the stored message once it is durable.
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
use serde_json::{json, Value};
use switchboard_hub::{
    event, valid_room_id, valid_user_name, StoredMessage, ROOM_ID_RULE, USER_NAME_RULE,
};
use tracing::warn;

use crate::serve::AppState;

fn problem(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// 503 for a store (in a cluster, Redis) that did not answer.
fn unavailable(cause: &switchboard_hub::HubError) -> Response {
    warn!(%cause, "reading rooms failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "room state is unavailable; retry shortly",
    )
}

fn message_json(message: &StoredMessage) -> Value {
    serde_json::from_slice(&event::message(message)).expect("events are JSON")
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

fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(value) = headers.get("x-api-key") {
        return Some(value.as_bytes());
    }
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    value.strip_prefix(b"Bearer ")
}

/// Middleware: refuses API calls without the configured key.
pub(crate) async fn require_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.config.api_key {
        let ok =
            presented_key(request.headers()).is_some_and(|key| same_key(key, expected.as_bytes()));
        if !ok {
            return problem(
                StatusCode::UNAUTHORIZED,
                "an API key is required: Authorization: Bearer KEY",
            );
        }
    }
    next.run(request).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewMessage {
    from: String,
    text: String,
    #[serde(default)]
    nonce: Option<String>,
}

pub(crate) async fn post_message(
    State(state): State<AppState>,
    Path(room): Path<String>,
    body: Result<Json<NewMessage>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !valid_room_id(&room) {
        return problem(StatusCode::BAD_REQUEST, ROOM_ID_RULE);
    }
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => return problem(StatusCode::BAD_REQUEST, &rejection.body_text()),
    };
    if !valid_user_name(&new.from) {
        return problem(
            StatusCode::BAD_REQUEST,
            &format!("`from`: {USER_NAME_RULE}"),
        );
    }
    if new.text.chars().count() > state.config.max_text_chars {
        return problem(StatusCode::PAYLOAD_TOO_LARGE, "text is too long");
    }
    if new.nonce.as_ref().is_some_and(|n| n.len() > 128) {
        return problem(StatusCode::BAD_REQUEST, "`nonce` is at most 128 bytes");
    }
    match state
        .hub
        .post(&room, &new.from, new.text, new.nonce.clone())
        .await
    {
        Ok(Some(mut posted)) => match posted.stored.await {
            Ok(Ok(id)) => {
                posted.message.id = id;
                (
                    StatusCode::CREATED,
                    Json(json!({"message": message_json(&posted.message)})),
                )
                    .into_response()
            }
            Ok(Err(cause)) => {
                warn!(%cause, room, "storing an API message failed");
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the message could not be stored; retry with the same nonce",
                )
            }
            Err(_) => problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ),
        },
        // A retry of a stored nonce: answer with the stored message, stored once.
        Ok(None) => {
            let nonce = new.nonce.unwrap_or_default();
            match state.hub.find_nonce(&room, &new.from, &nonce).await {
                Ok(Some(message)) => (
                    StatusCode::OK,
                    Json(json!({"message": message_json(&message)})),
                )
                    .into_response(),
                _ => problem(
                    StatusCode::CONFLICT,
                    "a message with this nonce is still being stored; retry",
                ),
            }
        }
        Err(cause) => {
            warn!(%cause, room, "posting an API message failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the message could not be stored; retry with the same nonce",
            )
        }
    }
}

pub(crate) async fn get_messages(
    State(state): State<AppState>,
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !valid_room_id(&room) {
        return problem(StatusCode::BAD_REQUEST, ROOM_ID_RULE);
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
    match state.hub.history(&room, since, limit).await {
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
    if !valid_room_id(&room) {
        return problem(StatusCode::BAD_REQUEST, ROOM_ID_RULE);
    }
    match state.hub.room_members(&room).await {
        Ok(members) => Json(json!({"members": members})).into_response(),
        Err(cause) => unavailable(&cause),
    }
}

pub(crate) async fn get_rooms(State(state): State<AppState>) -> Response {
    match state.hub.rooms().await {
        Ok(rooms) => {
            let rooms: Vec<Value> = rooms
                .into_iter()
                .map(|(room, members)| json!({"room": room, "members": members}))
                .collect();
            Json(json!({"rooms": rooms})).into_response()
        }
        Err(cause) => unavailable(&cause),
    }
}
