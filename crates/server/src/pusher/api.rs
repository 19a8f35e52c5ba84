//! The Pusher HTTP API under `/apps/{id}`, every request signed with the app's secret
//! as the reference gives it: `auth_key`, `auth_timestamp` (within 600 s of the
//! server's clock), `auth_version=1.0`, `body_md5` (of a body; a GET that signs one,
//! as the Python library does, is taken when it is the empty body's) and
//! `auth_signature`, the HMAC-SHA256 of `METHOD\nPATH\nSORTED_QUERY`. A request that
//! fails any of it gets 401 with the reason.
//!
//! - `POST /apps/{id}/events` `{"name", "data", "channels" | "channel", "socket_id"?,
//!   "info"?}` and `POST /apps/{id}/batch_events` `{"batch": [...]}` publish (answered
//!   once stored everywhere);
//! - `GET /apps/{id}/channels` (`filter_by_prefix`, `info=user_count`),
//!   `GET /apps/{id}/channels/{name}` (`info=user_count,subscription_count`),
//!   `GET /apps/{id}/channels/{name}/users`;
//! - `POST /apps/{id}/users/{user}/terminate_connections`.

use std::collections::{BTreeMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use switchboard_protocol::pusher::{self as proto, ChannelKind};
use tracing::warn;

use super::registry::terminate_notice;
use super::{draft_of, App};
use crate::serve::AppState;

/// Requests a signature stays good for, either way of the server's clock.
const TIMESTAMP_WINDOW_SECS: i64 = 600;

/// Largest request body.
const MAX_BODY: usize = 1 << 20;

/// Channels one event may go to.
const MAX_CHANNELS: usize = 100;

/// Events one batch may hold.
const MAX_BATCH: usize = 10;

/// Longest event name, in bytes.
const MAX_EVENT_NAME: usize = 200;

pub(crate) fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/apps/{id}/events", post(events))
        .route("/apps/{id}/batch_events", post(batch_events))
        .route("/apps/{id}/channels", get(channels))
        .route("/apps/{id}/channels/{name}", get(channel))
        .route("/apps/{id}/channels/{name}/users", get(users))
        .route(
            "/apps/{id}/users/{user}/terminate_connections",
            post(terminate),
        )
        .route_layer(axum::middleware::from_fn_with_state(state, signed))
}

/// A refused request: its status and the reason, as a line of text.
#[derive(Debug)]
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        metrics::counter!("switchboard_pusher_api_errors_total", "status" => self.0.as_u16().to_string())
            .increment(1);
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

fn refusal(status: StatusCode, message: &str) -> Refused {
    Refused(status, message.to_owned())
}

fn refused(status: StatusCode, message: &str) -> Response {
    refusal(status, message).into_response()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Checks the signature of every request, with the app in the path.
async fn signed(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let id = parts
        .uri
        .path()
        .strip_prefix("/apps/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let Some(app) = state.pusher_apps.by_id(id).cloned() else {
        return refused(StatusCode::NOT_FOUND, &format!("unknown app {id:?}"));
    };
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is over 1 MiB",
            )
        }
    };
    let params: Vec<(String, String)> = match Query::try_from_uri(&parts.uri) {
        Ok(Query(params)) => params,
        Err(_) => return refused(StatusCode::BAD_REQUEST, "the query string is malformed"),
    };
    if let Err(why) = check_signature(
        &app,
        parts.method.as_str(),
        parts.uri.path(),
        &params,
        &body,
    ) {
        metrics::counter!("switchboard_pusher_auth_failures_total").increment(1);
        return refused(StatusCode::UNAUTHORIZED, &why);
    }
    let mut request = Request::from_parts(parts, Body::from(body));
    request.extensions_mut().insert(app);
    let method = request
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_owned();
    metrics::counter!("switchboard_pusher_api_calls_total", "call" => method_label(&method))
        .increment(1);
    next.run(request).await
}

fn method_label(last_segment: &str) -> &'static str {
    match last_segment {
        "events" => "events",
        "batch_events" => "batch_events",
        "channels" => "channels",
        "users" => "users",
        "terminate_connections" => "terminate_connections",
        _ => "channel",
    }
}

/// The reference's checks, in its order; the reason for the first that fails.
fn check_signature(
    app: &App,
    method: &str,
    path: &str,
    params: &[(String, String)],
    body: &[u8],
) -> Result<(), String> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    match param("auth_key") {
        Some(key) if proto::same(key, &app.config.key) => {}
        Some(_) => return Err("Unknown auth_key".into()),
        None => {
            return Err("Missing auth_key: sign the request with the app's key and secret".into())
        }
    }
    let timestamp = param("auth_timestamp")
        .and_then(|t| t.parse::<i64>().ok())
        .ok_or("Missing or malformed auth_timestamp")?;
    let now = now_secs();
    if now.abs_diff(timestamp) > TIMESTAMP_WINDOW_SECS.unsigned_abs() {
        return Err(format!(
            "Timestamp expired: Given timestamp ({timestamp}) not within {TIMESTAMP_WINDOW_SECS} seconds of server time ({now})"
        ));
    }
    if param("auth_version") != Some("1.0") {
        return Err("auth_version must be 1.0".into());
    }
    let md5 = param("body_md5");
    if !body.is_empty() || md5.is_some() {
        let expected = proto::body_md5(body);
        match md5 {
            Some(given) if given.eq_ignore_ascii_case(&expected) => {}
            Some(_) => return Err("body_md5 does not match the body's MD5".into()),
            None => return Err("Missing body_md5: a request with a body signs its MD5".into()),
        }
    }
    let string_to_sign = proto::api_string_to_sign(method, path, params);
    let expected = proto::sign(&app.config.secret, string_to_sign.as_bytes());
    match param("auth_signature") {
        Some(given) if proto::same(&given.to_ascii_lowercase(), &expected) => Ok(()),
        _ => Err(format!(
            "Invalid signature: you should have sent HmacSHA256Hex({string_to_sign:?}, your_secret_key)"
        )),
    }
}

/// One event to publish, as the API takes it.
#[derive(Debug, Deserialize)]
struct NewEvent {
    name: String,
    data: Box<RawValue>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Batch {
    batch: Vec<NewEvent>,
}

fn valid_socket_id(id: &str) -> bool {
    let Some((a, b)) = id.split_once('.') else {
        return false;
    };
    !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
}

/// What is wrong with an event, as the API answers it.
fn event_problem(state: &AppState, event: &NewEvent, channels: &[String]) -> Option<Response> {
    if event.name.is_empty() || event.name.len() > MAX_EVENT_NAME {
        return Some(refused(
            StatusCode::BAD_REQUEST,
            &format!("event names are 1-{MAX_EVENT_NAME} bytes"),
        ));
    }
    if channels.is_empty() || channels.len() > MAX_CHANNELS {
        return Some(refused(
            StatusCode::BAD_REQUEST,
            &format!("an event goes to 1-{MAX_CHANNELS} channels (channels or channel)"),
        ));
    }
    if let Some(bad) = channels.iter().find(|c| !proto::valid_channel(c)) {
        return Some(refused(
            StatusCode::BAD_REQUEST,
            &format!("invalid channel name {bad:?}: 1-164 characters of A-Z a-z 0-9 _ - = @ , . ;"),
        ));
    }
    let size = serde_json::from_str::<String>(event.data.get())
        .map_or(event.data.get().len(), |s| s.len());
    if size > state.config.max_event_bytes {
        return Some(refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "event data is at most {} bytes",
                state.config.max_event_bytes
            ),
        ));
    }
    if let Some(id) = &event.socket_id {
        if !valid_socket_id(id) {
            return Some(refused(
                StatusCode::BAD_REQUEST,
                &format!("socket_id {id:?} is not a socket id (digits.digits)"),
            ));
        }
    }
    None
}

fn channels_of(event: &NewEvent) -> Vec<String> {
    match (&event.channels, &event.channel) {
        (Some(channels), _) => channels.clone(),
        (None, Some(channel)) => vec![channel.clone()],
        (None, None) => Vec::new(),
    }
}

fn body_of<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| {
        refusal(
            StatusCode::BAD_REQUEST,
            &format!("malformed request body: {e}"),
        )
    })
}

/// Publishes `event` to its channels and waits until each is stored.
async fn publish(
    state: &AppState,
    app: &App,
    event: &NewEvent,
    channels: &[String],
) -> Result<(), Refused> {
    let mut receipts = Vec::with_capacity(channels.len());
    for channel in channels {
        let engine = app.engine_channel(channel);
        let draft = draft_of(&event.name, &event.data, event.socket_id.clone());
        match state.engine.publish(&engine, None, draft).await {
            Ok(receipt) => receipts.push(receipt),
            Err(cause) => {
                warn!(%cause, channel, "a pusher API event was not published");
                return Err(refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the event could not be published; retry",
                ));
            }
        }
    }
    for receipt in receipts {
        if let Err(cause) = receipt.settled().await {
            warn!(%cause, "a pusher API event was not stored");
            return Err(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the event could not be stored; retry",
            ));
        }
    }
    Ok(())
}

/// Which `info` attributes a request asked for.
fn attributes(info: Option<&str>) -> HashSet<String> {
    info.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A channel's attributes as `info` asks for them.
async fn channel_info(
    state: &AppState,
    app: &App,
    channel: &str,
    wanted: &HashSet<String>,
) -> Result<Map<String, Value>, Refused> {
    let engine = app.engine_channel(channel);
    let mut info = Map::new();
    if wanted.contains("user_count") {
        info.insert(
            "user_count".into(),
            user_count(state, &engine).await?.into(),
        );
    }
    if wanted.contains("subscription_count") {
        info.insert(
            "subscription_count".into(),
            state.pusher_registry.subscriptions(&engine).into(),
        );
    }
    Ok(info)
}

/// The users present in engine channel `engine`, everywhere.
async fn user_count(state: &AppState, engine: &str) -> Result<usize, Refused> {
    let users = state.engine.presence(engine).await.map_err(|_| {
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "presence is unavailable; retry",
        )
    })?;
    Ok(users.len())
}

fn app_of(request: &Request) -> std::sync::Arc<App> {
    request
        .extensions()
        .get::<std::sync::Arc<App>>()
        .cloned()
        .expect("the signature check puts the app in")
}

async fn events(State(state): State<AppState>, request: Request) -> Response {
    let app = app_of(&request);
    let Ok(body) = axum::body::to_bytes(request.into_body(), MAX_BODY).await else {
        return refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is over 1 MiB",
        );
    };
    let event: NewEvent = match body_of(&body) {
        Ok(event) => event,
        Err(refused) => return refused.into_response(),
    };
    let channels = channels_of(&event);
    if let Some(problem) = event_problem(&state, &event, &channels) {
        return problem;
    }
    if let Err(refused) = publish(&state, &app, &event, &channels).await {
        return refused.into_response();
    }
    let wanted = attributes(event.info.as_deref());
    if wanted.is_empty() {
        return Json(json!({})).into_response();
    }
    let mut infos = Map::new();
    for channel in &channels {
        match channel_info(&state, &app, channel, &wanted).await {
            Ok(info) => {
                infos.insert(channel.clone(), Value::Object(info));
            }
            Err(refused) => return refused.into_response(),
        }
    }
    Json(json!({ "channels": infos })).into_response()
}

async fn batch_events(State(state): State<AppState>, request: Request) -> Response {
    let app = app_of(&request);
    let Ok(body) = axum::body::to_bytes(request.into_body(), MAX_BODY).await else {
        return refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is over 1 MiB",
        );
    };
    let batch: Batch = match body_of(&body) {
        Ok(batch) => batch,
        Err(refused) => return refused.into_response(),
    };
    if batch.batch.len() > MAX_BATCH {
        return refused(
            StatusCode::BAD_REQUEST,
            &format!("a batch holds at most {MAX_BATCH} events"),
        );
    }
    let mut all = Vec::with_capacity(batch.batch.len());
    for event in &batch.batch {
        let channels = channels_of(event);
        if channels.len() != 1 {
            return refused(
                StatusCode::BAD_REQUEST,
                "each batch event names one channel",
            );
        }
        if let Some(problem) = event_problem(&state, event, &channels) {
            return problem;
        }
        all.push(channels);
    }
    for (event, channels) in batch.batch.iter().zip(&all) {
        if let Err(refused) = publish(&state, &app, event, channels).await {
            return refused.into_response();
        }
    }
    if batch.batch.iter().all(|e| e.info.is_none()) {
        return Json(json!({})).into_response();
    }
    let mut answers = Vec::new();
    for (event, channels) in batch.batch.iter().zip(&all) {
        let wanted = attributes(event.info.as_deref());
        match channel_info(&state, &app, &channels[0], &wanted).await {
            Ok(info) => answers.push(Value::Object(info)),
            Err(refused) => return refused.into_response(),
        }
    }
    Json(json!({ "batch": answers })).into_response()
}

#[derive(Debug, Deserialize)]
struct ChannelsQuery {
    #[serde(default)]
    filter_by_prefix: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

/// This app's occupied channels (with subscribers on any node of the cluster), by their
/// names in this protocol, with how many users each has.
async fn occupied(state: &AppState, app: &App) -> Result<BTreeMap<String, usize>, Refused> {
    let unavailable = |_| {
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "channels are unavailable; retry",
        )
    };
    let mut occupied: BTreeMap<String, usize> = BTreeMap::new();
    let with_users = state.engine.channels().await.map_err(unavailable)?;
    for (engine, users) in with_users {
        if let Some(name) = app.pusher_channel(&engine) {
            occupied.insert(name, users);
        }
    }
    let with_members = state
        .engine
        .occupied_channels()
        .await
        .map_err(unavailable)?;
    for engine in with_members {
        if let Some(name) = app.pusher_channel(&engine) {
            occupied.entry(name).or_insert(0);
        }
    }
    Ok(occupied)
}

async fn channels(State(state): State<AppState>, request: Request) -> Response {
    let app = app_of(&request);
    let query: ChannelsQuery = match Query::try_from_uri(request.uri()) {
        Ok(Query(query)) => query,
        Err(_) => return refused(StatusCode::BAD_REQUEST, "the query string is malformed"),
    };
    let wanted = attributes(query.info.as_deref());
    let prefix = query.filter_by_prefix.unwrap_or_default();
    if wanted.contains("user_count") && !prefix.starts_with("presence-") {
        return refused(
            StatusCode::BAD_REQUEST,
            "info=user_count is only for presence channels: filter_by_prefix=presence-",
        );
    }
    if let Some(other) = wanted.iter().find(|a| a.as_str() != "user_count") {
        return refused(
            StatusCode::BAD_REQUEST,
            &format!("unknown info attribute {other:?} (channels take user_count)"),
        );
    }
    let occupied = match occupied(&state, &app).await {
        Ok(occupied) => occupied,
        Err(refused) => return refused.into_response(),
    };
    let channels: Map<String, Value> = occupied
        .into_iter()
        .filter(|(name, _)| name.starts_with(&prefix))
        .map(|(name, users)| {
            let info = if wanted.contains("user_count") {
                json!({ "user_count": users })
            } else {
                json!({})
            };
            (name, info)
        })
        .collect();
    Json(json!({ "channels": channels })).into_response()
}

async fn channel(
    State(state): State<AppState>,
    Path((_, name)): Path<(String, String)>,
    request: Request,
) -> Response {
    let app = app_of(&request);
    if !proto::valid_channel(&name) {
        return refused(
            StatusCode::BAD_REQUEST,
            &format!("invalid channel name {name:?}"),
        );
    }
    let query: ChannelsQuery = match Query::try_from_uri(request.uri()) {
        Ok(Query(query)) => query,
        Err(_) => return refused(StatusCode::BAD_REQUEST, "the query string is malformed"),
    };
    let wanted = attributes(query.info.as_deref());
    if wanted.contains("user_count") && ChannelKind::of(&name) != ChannelKind::Presence {
        return refused(
            StatusCode::BAD_REQUEST,
            "info=user_count is only for presence channels",
        );
    }
    if let Some(other) = wanted
        .iter()
        .find(|a| !matches!(a.as_str(), "user_count" | "subscription_count"))
    {
        return refused(
            StatusCode::BAD_REQUEST,
            &format!("unknown info attribute {other:?} (user_count, subscription_count)"),
        );
    }
    let mut info = match channel_info(&state, &app, &name, &wanted).await {
        Ok(info) => info,
        Err(refused) => return refused.into_response(),
    };
    let engine = app.engine_channel(&name);
    // Presence is read once: for user_count, when asked, and for occupied.
    let users = match info.get("user_count").and_then(Value::as_u64) {
        Some(users) => users as usize,
        None => match user_count(&state, &engine).await {
            Ok(users) => users,
            Err(refused) => return refused.into_response(),
        },
    };
    let occupied = users > 0
        || state.pusher_registry.subscriptions(&engine) > 0
        || match state.engine.occupied_channels().await {
            // Subscribers on another node of the cluster.
            Ok(occupied) => occupied.binary_search(&engine).is_ok(),
            Err(_) => {
                return refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "channels are unavailable; retry",
                )
            }
        };
    info.insert("occupied".into(), occupied.into());
    Json(Value::Object(info)).into_response()
}

async fn users(
    State(state): State<AppState>,
    Path((_, name)): Path<(String, String)>,
    request: Request,
) -> Response {
    let app = app_of(&request);
    if ChannelKind::of(&name) != ChannelKind::Presence || !proto::valid_channel(&name) {
        return refused(
            StatusCode::BAD_REQUEST,
            "users are listed for presence channels only",
        );
    }
    match state.engine.presence(&app.engine_channel(&name)).await {
        Ok(users) => {
            let users: Vec<Value> = users.into_iter().map(|id| json!({ "id": id })).collect();
            Json(json!({ "users": users })).into_response()
        }
        Err(_) => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "presence is unavailable; retry",
        ),
    }
}

async fn terminate(
    State(state): State<AppState>,
    Path((_, user)): Path<(String, String)>,
    request: Request,
) -> Response {
    let app = app_of(&request);
    let notice = terminate_notice(&app.config.id, &user);
    match state.engine.notify_nodes(notice).await {
        Ok(()) => Json(json!({})).into_response(),
        Err(cause) => {
            warn!(%cause, "terminate_connections did not reach the cluster");
            refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "the other nodes could not be told; retry",
            )
        }
    }
}
