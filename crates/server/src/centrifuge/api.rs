//! Centrifugo's server API over HTTP: `POST /api/METHOD` with a JSON body, answered
//! with `{"result": ...}` or `{"error": {"code", "message"}}` (HTTP 200 either way, as
//! the specification has it; 401 without the key, 404 for an unknown method, 400 for a
//! body that is not JSON). With `api_key` configured every call needs `X-API-Key: KEY`
//! or `Authorization: apikey KEY`.
//!
//! `subscribe`, `unsubscribe` and `disconnect` reach the user's connections on every
//! node (in a cluster through Redis).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use switchboard_engine::{names, Draft, EngineError, Outcome};
use switchboard_protocol::centrifuge::{HistoryRequest, StreamPosition};
use switchboard_protocol::MAX_NONCE;
use tracing::warn;

use super::clients::{Control, Notice};
use super::codes;
use super::session::{history, presence, stats_of};
use super::{disconnect, VERSION};
use crate::api::key_ok;
use crate::serve::AppState;

/// Where the server API lives: `/api/{method}` beside the room API's `/api/rooms`.
pub(crate) fn router(state: AppState) -> Router<AppState> {
    let _ = started();
    Router::new()
        .route("/api/{method}", post(call))
        .with_state(state)
}

/// When this process started serving (for `info`'s uptime).
fn started() -> Instant {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

fn failure(code: u32) -> Value {
    metrics::counter!("switchboard_centrifuge_api_errors_total", "code" => code.to_string())
        .increment(1);
    json!({"error": {"code": code, "message": codes::message(code)}})
}

fn failure_because(code: u32, message: &str) -> Value {
    metrics::counter!("switchboard_centrifuge_api_errors_total", "code" => code.to_string())
        .increment(1);
    json!({"error": {"code": code, "message": message}})
}

async fn call(
    State(state): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !key_ok(&state, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "an API key is required: X-API-Key: KEY or Authorization: apikey KEY"})),
        )
            .into_response();
    }
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    let answer = match method.as_str() {
        "publish" => with(body, |r| publish(&state, r)).await,
        "broadcast" => with(body, |r| broadcast(&state, r)).await,
        "subscribe" => with(body, |r| subscribe(&state, r)).await,
        "unsubscribe" => with(body, |r| unsubscribe(&state, r)).await,
        "disconnect" => with(body, |r| disconnect_user(&state, r)).await,
        "presence" => with(body, |r| presence_of(&state, r, false)).await,
        "presence_stats" => with(body, |r| presence_of(&state, r, true)).await,
        "history" => with(body, |r| history_of(&state, r)).await,
        "history_remove" => with(body, |r| history_remove(&state, r)).await,
        "channels" => with(body, |r| channels(&state, r)).await,
        "info" => with(body, |r: Empty| info(&state, r)).await,
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(failure(codes::METHOD_NOT_FOUND)),
            )
                .into_response()
        }
    };
    metrics::counter!("switchboard_centrifuge_api_calls_total", "method" => method_label(&method))
        .increment(1);
    match answer {
        Ok(value) => Json(value).into_response(),
        Err(malformed) => (
            StatusCode::BAD_REQUEST,
            Json(failure_because(codes::BAD_REQUEST, &malformed)),
        )
            .into_response(),
    }
}

/// A bounded label for metrics (the method is known by now).
fn method_label(method: &str) -> &'static str {
    match method {
        "publish" => "publish",
        "broadcast" => "broadcast",
        "subscribe" => "subscribe",
        "unsubscribe" => "unsubscribe",
        "disconnect" => "disconnect",
        "presence" => "presence",
        "presence_stats" => "presence_stats",
        "history" => "history",
        "history_remove" => "history_remove",
        "channels" => "channels",
        _ => "info",
    }
}

/// Parses the body as `R` and runs `f`; `Err` when the body is not such a request.
async fn with<R, F, Fut>(body: &[u8], f: F) -> Result<Value, String>
where
    R: for<'de> Deserialize<'de>,
    F: FnOnce(R) -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let request: R = serde_json::from_slice(body).map_err(|e| format!("bad request: {e}"))?;
    Ok(f(request).await)
}

#[derive(Deserialize)]
struct Empty {}

#[derive(Deserialize)]
struct PublishRequest {
    channel: String,
    data: Box<RawValue>,
    #[serde(default)]
    tags: HashMap<String, String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct BroadcastRequest {
    channels: Vec<String>,
    data: Box<RawValue>,
    #[serde(default)]
    tags: HashMap<String, String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// The result of one publication: `{offset, epoch}`, or an error.
async fn publish_one(
    state: &AppState,
    channel: &str,
    data: Box<RawValue>,
    tags: &HashMap<String, String>,
    idempotency_key: Option<String>,
) -> Value {
    if !names::valid_channel(channel) {
        return failure(codes::BAD_REQUEST);
    }
    let limit = state.config.room_max_message;
    if data.get().len() > limit {
        return failure_because(
            codes::BAD_REQUEST,
            &format!("data over room_max_message ({limit} bytes)"),
        );
    }
    if tags.keys().any(|key| key != "event") {
        return failure_because(
            codes::BAD_REQUEST,
            "only the tag `event` is kept (it is the publication's event name)",
        );
    }
    if idempotency_key
        .as_ref()
        .is_some_and(|key| key.is_empty() || key.len() > MAX_NONCE)
    {
        return failure_because(
            codes::BAD_REQUEST,
            &format!("idempotency_key must be 1-{MAX_NONCE} bytes"),
        );
    }
    let text = serde_json::from_str::<serde_json::Map<String, Value>>(data.get())
        .ok()
        .and_then(|object| match object.get("text") {
            Some(Value::String(text)) => Some(text.clone()),
            _ => None,
        });
    let draft = Draft {
        text,
        data: Some(data),
        event: tags.get("event").cloned(),
        nonce: idempotency_key,
        client: None,
        client_info: None,
    };
    let stored = match state.engine.publish(channel, None, draft).await {
        Ok(receipt) => receipt.settled().await,
        Err(cause) => Err(cause),
    };
    let offset = match stored {
        Ok(Outcome::Stored(delivery)) => delivery.publication.id,
        Ok(Outcome::Duplicate(id)) => id,
        Err(EngineError::Forbidden(_)) => return failure(codes::PERMISSION_DENIED),
        Err(cause) => {
            warn!(%cause, channel, "a server API publish failed");
            return failure(codes::INTERNAL);
        }
    };
    match state.engine.position(channel).await {
        Ok(position) => json!({"result": {"offset": offset, "epoch": position.epoch}}),
        Err(_) => json!({"result": {"offset": offset}}),
    }
}

async fn publish(state: &AppState, request: PublishRequest) -> Value {
    publish_one(
        state,
        &request.channel,
        request.data,
        &request.tags,
        request.idempotency_key,
    )
    .await
}

async fn broadcast(state: &AppState, request: BroadcastRequest) -> Value {
    let mut responses = Vec::with_capacity(request.channels.len());
    for channel in &request.channels {
        // One key per channel: the same key stores once in each.
        let response = publish_one(
            state,
            channel,
            request.data.clone(),
            &request.tags,
            request.idempotency_key.clone(),
        )
        .await;
        responses.push(response);
    }
    json!({"result": {"responses": responses}})
}

#[derive(Deserialize)]
struct UserChannel {
    user: String,
    channel: String,
    #[serde(default)]
    client: Option<String>,
}

async fn subscribe(state: &AppState, request: UserChannel) -> Value {
    if !names::valid_channel(&request.channel) {
        return failure(codes::BAD_REQUEST);
    }
    notify(
        state,
        request.user,
        request.client,
        Control::Subscribe(request.channel),
    )
    .await
}

async fn unsubscribe(state: &AppState, request: UserChannel) -> Value {
    notify(
        state,
        request.user,
        request.client,
        Control::Unsubscribe(request.channel),
    )
    .await
}

#[derive(Deserialize)]
struct DisconnectAdvice {
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
struct DisconnectRequest {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    disconnect: Option<DisconnectAdvice>,
}

async fn disconnect_user(state: &AppState, request: DisconnectRequest) -> Value {
    let (code, reason) = match request.disconnect {
        Some(advice) if (3000..5000).contains(&advice.code) => (advice.code, advice.reason),
        Some(_) => return failure_because(codes::BAD_REQUEST, "disconnect codes are 3000-4999"),
        None => (
            disconnect::FORCE_NO_RECONNECT.0,
            disconnect::FORCE_NO_RECONNECT.1.to_owned(),
        ),
    };
    notify(
        state,
        request.user,
        request.client,
        Control::Disconnect(code, reason),
    )
    .await
}

/// `{}` for what was done; error 100 (logged as `failed`) for what the engine could not
/// do.
fn done(result: Result<(), EngineError>, failed: &str) -> Value {
    match result {
        Ok(()) => json!({"result": {}}),
        Err(cause) => {
            warn!(%cause, "{failed}");
            failure(codes::INTERNAL)
        }
    }
}

/// Sends `control` to `user`'s connections on every node.
async fn notify(state: &AppState, user: String, client: Option<String>, control: Control) -> Value {
    let notice = Notice {
        user,
        client,
        control,
    };
    done(
        state.engine.notify_nodes(notice.to_bytes()).await,
        "a server API notice could not be sent",
    )
}

#[derive(Deserialize)]
struct ChannelRequest {
    channel: String,
}

async fn presence_of(state: &AppState, request: ChannelRequest, stats: bool) -> Value {
    match presence(state, &request.channel).await {
        Ok(result) if stats => {
            json!({"result": serde_json::to_value(stats_of(&result)).expect("stats serialize")})
        }
        Ok(result) => json!({"result": serde_json::to_value(result).expect("presence serializes")}),
        Err(code) => failure(code),
    }
}

#[derive(Deserialize)]
struct HistoryCall {
    channel: String,
    #[serde(default)]
    limit: i32,
    #[serde(default)]
    since: Option<StreamPosition>,
    #[serde(default)]
    reverse: bool,
}

async fn history_of(state: &AppState, request: HistoryCall) -> Value {
    let request = HistoryRequest {
        channel: request.channel,
        limit: request.limit,
        since: request.since,
        reverse: request.reverse,
    };
    match history(&state.engine, &request).await {
        Ok(result) => {
            let mut value = serde_json::to_value(result).expect("history serializes");
            // Always a list, empty or not.
            if value.get("publications").is_none() {
                value["publications"] = json!([]);
            }
            json!({"result": value})
        }
        Err(code) => failure(code),
    }
}

async fn history_remove(state: &AppState, request: ChannelRequest) -> Value {
    if !names::valid_channel(&request.channel) {
        return failure(codes::BAD_REQUEST);
    }
    done(
        state.engine.remove_history(&request.channel).await,
        "removing history failed",
    )
}

#[derive(Deserialize)]
struct ChannelsRequest {
    #[serde(default)]
    pattern: String,
}

/// Whether `name` matches a glob with `*` (any run) and `?` (one character).
fn matches(pattern: &str, name: &str) -> bool {
    let (pattern, name): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), name.chars().collect());
    let (mut p, mut n, mut star, mut mark) = (0, 0, None, 0);
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some(p);
            mark = n;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            n = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

async fn channels(state: &AppState, request: ChannelsRequest) -> Value {
    let listed = match state.engine.channels().await {
        Ok(listed) => listed,
        Err(_) => return failure(codes::INTERNAL),
    };
    let channels: serde_json::Map<String, Value> = listed
        .into_iter()
        // Other Pusher apps' channels (`{id}~name`) are not this door's.
        .filter(|(name, _)| switchboard_engine::valid_channel(name))
        .filter(|(name, _)| request.pattern.is_empty() || matches(&request.pattern, name))
        .map(|(name, users)| (name, json!({"num_clients": users})))
        .collect();
    json!({"result": {"channels": channels}})
}

async fn info(state: &AppState, _request: Empty) -> Value {
    let (clients, users, subscriptions) = state.centrifuge_clients.counts();
    json!({"result": {"nodes": [{
        "uid": state.centrifuge_clients.node(),
        "name": state.centrifuge_clients.node(),
        "version": VERSION,
        "num_clients": clients,
        "num_users": users,
        "num_channels": state.engine.local_channels(),
        "num_subs": subscriptions,
        "uptime": started().elapsed().as_secs(),
    }]}})
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn channel_patterns_are_globs() {
        assert!(matches("news:*", "news:sport"));
        assert!(matches("*", "anything"));
        assert!(matches("a?c", "abc"));
        assert!(matches("*:b*", "x:y:bz"));
        assert!(!matches("news:*", "chat:1"));
        assert!(!matches("a?c", "ac"));
    }
}
