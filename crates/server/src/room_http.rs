//! The room protocol over plain HTTP, for clients that cannot open a WebSocket
//! (docs/PROTOCOL.md, "Without WebSocket"): `GET /room/{room}` with
//! `Accept: text/event-stream` streams the room's events as Server-Sent Events (no
//! `event:` field, each `data` the JSON event the WebSocket door sends, each message with
//! `id: EPOCH:ID`, so an EventSource resumes with `Last-Event-ID`), and
//! `POST /room/{room}/events` takes one client event (a message or typing) with the same
//! identity.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::value::to_raw_value;
use switchboard_engine::{Draft, Ended, EngineError, Outbound, Outcome, Resume, Subscription};
use switchboard_net::bucket::TokenBucket;
use switchboard_protocol::room::{self, parse_client_event, ClientEvent};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::room::{
    admit, bad_request, frame_of, resume_of, welcome, MAX_EPOCH, ROOM_JSON, ROOM_SSE,
};
use crate::serve::{AppState, ConnectionSlot};

/// Whether a request to `/room/{room}` asks for the event stream.
pub(crate) fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("text/event-stream"))
}

/// The refusal of a request from a page whose origin `allowed_origins` does not list
/// (as the WebSocket upgrade refuses it).
pub(crate) fn foreign_origin(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let allowed = &state.config.allowed_origins;
    let origin = headers.get(header::ORIGIN)?.to_str().unwrap_or_default();
    if allowed.is_empty() || allowed.iter().any(|a| a == origin) {
        return None;
    }
    metrics::counter!("switchboard_handshake_failures_total", "reason" => "origin").increment(1);
    Some(
        (
            StatusCode::FORBIDDEN,
            format!("origin {origin} is not allowed\n"),
        )
            .into_response(),
    )
}

/// Where a stream resumes: the `Last-Event-ID` an EventSource sends when it reconnects
/// (an id this stream gave, `EPOCH:ID`), else the query's `since` and `epoch`.
fn resume_point(headers: &HeaderMap, query: &HashMap<String, String>) -> Result<Resume, String> {
    let Some(last) = headers.get("last-event-id") else {
        return resume_of(query).map_err(str::to_owned);
    };
    let refused = || {
        format!("Last-Event-ID must be an id this stream gave (EPOCH:ID, an epoch of 1-{MAX_EPOCH} characters)")
    };
    let last = last.to_str().map_err(|_| refused())?;
    if last.len() > MAX_EPOCH + 21 {
        return Err(refused());
    }
    let (epoch, id) = last.rsplit_once(':').ok_or_else(refused)?;
    let id: u64 = id.parse().map_err(|_| refused())?;
    if epoch.is_empty() || id > i64::MAX as u64 {
        return Err(refused());
    }
    Ok(Resume {
        since: Some(id),
        epoch: Some(epoch.to_owned()),
        recent: None,
    })
}

/// Answers the event stream of `channel` for `user`: joins the room (its presence lasts
/// as long as the stream), then streams the welcome, the backlog and live events.
pub(crate) async fn stream(
    state: AppState,
    channel: String,
    user: String,
    query: &HashMap<String, String>,
    request: axum::extract::Request,
) -> Response {
    if let Some(refused) = foreign_origin(&state, request.headers()) {
        return refused;
    }
    let resume = match resume_point(request.headers(), query) {
        Ok(resume) => resume,
        Err(message) => return bad_request(message),
    };
    let subscription = match state.engine.subscribe(&channel, &user, resume).await {
        Ok(subscription) => subscription,
        Err(cause) => {
            warn!(%cause, channel, "joining a room failed");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                "room unavailable; try again\n",
            )
                .into_response();
        }
    };
    let slot = request.extensions().get::<ConnectionSlot>().cloned();
    let (events, receiver) = mpsc::channel::<Bytes>(16);
    let session = EventStream {
        events,
        subscription,
        state: state.clone(),
    };
    state.spawn(async move {
        // Its places under the limits are held while the stream is open.
        let _slot = slot;
        metrics::gauge!("switchboard_connections", "transport" => "sse").increment(1.0);
        session.run().await;
        metrics::gauge!("switchboard_connections", "transport" => "sse").decrement(1.0);
    });
    metrics::counter!("switchboard_connections_total", "transport" => "sse").increment(1);
    let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((Ok::<_, Infallible>(chunk), receiver))
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx passes it on as it comes instead of buffering the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One room member over Server-Sent Events.
struct EventStream {
    events: mpsc::Sender<Bytes>,
    subscription: Subscription,
    state: AppState,
}

/// Appends one SSE event: `data` (one line of JSON), with `id` when given.
fn put_event(out: &mut BytesMut, id: Option<(&str, u64)>, data: &[u8]) {
    if let Some((epoch, id)) = id {
        out.put_slice(b"id: ");
        out.put_slice(epoch.as_bytes());
        out.put_u8(b':');
        out.put_slice(id.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"data: ");
    // JSON keeps line breaks only as whitespace between tokens (inside strings they are
    // escaped), and data stored as it was sent may have some: as spaces they cannot
    // end the field.
    let start = out.len();
    out.put_slice(data);
    for byte in &mut out[start..] {
        if matches!(*byte, b'\n' | b'\r') {
            *byte = b' ';
        }
    }
    out.put_slice(b"\n\n");
}

impl EventStream {
    async fn run(mut self) {
        if !self.greet().await {
            return;
        }
        let ping_every = Duration::from_secs(self.state.config.ping_interval_secs.max(1));
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        let shutdown = self.state.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                () = shutdown.stopping() => return,
                () = self.events.closed() => return,
                item = self.subscription.recv() => {
                    let Some(item) = item else {
                        self.cut_off().await;
                        return;
                    };
                    let mut out = BytesMut::new();
                    self.put(&mut out, &item);
                    while let Some(more) = self.subscription.try_recv() {
                        self.put(&mut out, &more);
                    }
                    if !out.is_empty() && !self.push(out.freeze()).await {
                        return;
                    }
                    ping.reset();
                }
                _ = ping.tick() => {
                    // A comment: nothing for the client, traffic for every proxy between.
                    if !self.push(Bytes::from_static(b": ping\n\n")).await {
                        return;
                    }
                }
            }
        }
    }

    /// The welcome, then the backlog page by page. False when the stream is over.
    async fn greet(&mut self) -> bool {
        let welcome = welcome(&self.subscription, &self.state);
        let subscription = &mut self.subscription;
        let mut out = BytesMut::new();
        // An EventSource that loses the stream tries again after a second.
        out.put_slice(b"retry: 1000\n");
        put_event(&mut out, None, &welcome);
        loop {
            let page = match subscription.next_backlog().await {
                Ok(page) => page,
                Err(cause) => {
                    warn!(%cause, "reading room history failed");
                    let error = room::error("unavailable", "history unavailable; reconnect", None);
                    put_event(&mut out, None, &error);
                    self.push(out.freeze()).await;
                    return false;
                }
            };
            if page.is_empty() {
                break;
            }
            let epoch = subscription.epoch().to_owned();
            for publication in &page {
                put_event(
                    &mut out,
                    Some((&epoch, publication.id)),
                    &room::message(publication),
                );
            }
            if self
                .events
                .send(std::mem::take(&mut out).freeze())
                .await
                .is_err()
            {
                return false;
            }
        }
        out.is_empty() || self.events.send(out.freeze()).await.is_ok()
    }

    /// Hands `chunk` to the response body. False when the stream is over: the client
    /// left, the server is shutting down, or the client took none of it for
    /// `pong_timeout_secs` (as a WebSocket peer that stops answering is dropped).
    async fn push(&self, chunk: Bytes) -> bool {
        let patience = Duration::from_secs(self.state.config.pong_timeout_secs.max(1));
        tokio::select! {
            sent = tokio::time::timeout(patience, self.events.send(chunk)) => {
                matches!(sent, Ok(Ok(())))
            }
            () = self.state.shutdown.stopping() => false,
        }
    }

    fn put(&self, out: &mut BytesMut, item: &Outbound) {
        match item {
            // A message's event is made once for every stream of the room.
            Outbound::Publication { delivery, .. } | Outbound::Ack(delivery) => {
                let epoch = self.subscription.epoch();
                let make = |out: &mut BytesMut| {
                    let data = delivery.encoded(ROOM_JSON, room::message);
                    put_event(out, Some((epoch, delivery.publication.id)), &data);
                };
                let event = delivery.encoded(ROOM_SSE, |_| {
                    let mut event = BytesMut::new();
                    make(&mut event);
                    event.freeze()
                });
                // Made for this stream's epoch (a stream of another one, about to be
                // cut off, makes its own).
                let ours = event
                    .strip_prefix(b"id: ".as_slice())
                    .and_then(|rest| rest.strip_prefix(epoch.as_bytes()))
                    .is_some_and(|rest| rest.first() == Some(&b':'));
                if ours {
                    out.put_slice(&event);
                } else {
                    make(out);
                }
            }
            // Server-Sent Events carry text: binary relays are for WebSocket members.
            Outbound::Binary(_) => {}
            _ => put_event(out, None, &frame_of(item).1),
        }
    }

    /// The engine cut this member off: an `error` event says why, and the stream ends
    /// (the client reconnects with its last id and resumes).
    async fn cut_off(&self) {
        let (code, message) = match self.subscription.ended() {
            Some(Ended::Slow) => {
                metrics::counter!("switchboard_slow_consumer_closes_total").increment(1);
                ("too_slow", "too slow: reconnect with Last-Event-ID")
            }
            Some(Ended::Reset | Ended::Missed) => (
                "history_reset",
                "messages could not be delivered in order: reconnect with Last-Event-ID",
            ),
            None => return,
        };
        let mut out = BytesMut::new();
        put_event(&mut out, None, &room::error(code, message, None));
        self.push(out.freeze()).await;
    }
}

/// What the HTTP side of the room protocol keeps between requests: each poster's
/// event rate, and when each poster's typing indicator expires.
#[derive(Debug, Default)]
pub(crate) struct Posters {
    rates: Mutex<HashMap<(String, String), TokenBucket>>,
    typing: Mutex<HashMap<(String, String), Instant>>,
}

/// Posters tracked beyond which those with a full bucket are forgotten.
const SWEEP_AT: usize = 10_000;

impl Posters {
    fn allow(&self, state: &AppState, key: &(String, String)) -> bool {
        let now = std::time::Instant::now();
        let mut rates = self.rates.lock().expect("rates lock");
        if rates.len() >= SWEEP_AT {
            rates.retain(|_, bucket| !bucket.is_full(now));
        }
        rates
            .entry(key.clone())
            .or_insert_with(|| {
                TokenBucket::new(
                    state.config.rate_limit_per_sec,
                    f64::from(state.config.rate_limit_burst),
                    now,
                )
            })
            .take(now)
    }
}

/// The answer to a refused event: the `error` event's JSON.
fn refusal(status: StatusCode, code: &str, message: &str, nonce: Option<&str>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        room::error(code, message, nonce),
    )
        .into_response()
}

/// `POST /room/{room}/events`: one room-protocol client event, from the user the
/// request's identity names. A message answers 202 with the stored message event (the
/// same for a retried nonce, stored once), typing 202 with no body; a refusal answers
/// the `error` event with a 4xx status (503 for `unavailable`: send it again).
pub(crate) async fn post_event(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = foreign_origin(&state, &headers) {
        return refused;
    }
    let user = match admit(&state, &channel, &query, &headers) {
        Ok(user) => user,
        Err(refused) => return refused.into_response(),
    };
    if body.len() > state.config.room_max_message {
        return refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_long",
            "the event is larger than the room takes",
            None,
        );
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "the body is not UTF-8",
            None,
        );
    };
    let key = (channel.clone(), user.clone());
    if !state.room_posters.allow(&state, &key) {
        metrics::counter!("switchboard_rate_limited_total").increment(1);
        let nonce = room::nonce_of(text);
        let mut response = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many events; slow down",
            nonce.as_deref(),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    match parse_client_event(text, state.config.max_text_chars) {
        Ok(ClientEvent::Message { text, data, nonce }) => {
            publish(&state, &channel, &user, text, data, nonce).await
        }
        Ok(ClientEvent::Typing { is_typing }) => typing(&state, key, is_typing).await,
        Err(refused) => {
            let status = if refused.code == "too_long" {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            refusal(
                status,
                refused.code,
                &refused.message,
                refused.nonce.as_deref(),
            )
        }
    }
}

async fn publish(
    state: &AppState,
    channel: &str,
    user: &str,
    text: Option<String>,
    data: Option<serde_json::Value>,
    nonce: Option<String>,
) -> Response {
    let nonce_ref = nonce.clone();
    let nonce_ref = nonce_ref.as_deref();
    if !state.engine.options(channel).client_publish {
        return refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            "clients may not publish in this channel",
            nonce_ref,
        );
    }
    let data = match data.as_ref().map(to_raw_value).transpose() {
        Ok(data) => data,
        Err(cause) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_event",
                &cause.to_string(),
                nonce_ref,
            )
        }
    };
    let draft = Draft {
        text,
        data,
        event: None,
        nonce: nonce.clone(),
        client: None,
        client_info: None,
    };
    let unavailable = |cause: &EngineError| {
        warn!(cause = %cause, "posting a message failed");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            room::unavailable(nonce_ref),
        )
            .into_response()
    };
    let settled = match state.engine.publish(channel, Some(user), draft).await {
        Ok(receipt) => receipt.settled().await,
        Err(cause) => return unavailable(&cause),
    };
    let stored = match settled {
        Ok(Outcome::Stored(delivery)) => delivery.publication.clone(),
        Ok(Outcome::Duplicate(_)) => {
            let nonce = nonce.unwrap_or_default();
            match state.engine.find_nonce(channel, Some(user), &nonce).await {
                Ok(Some(original)) => original,
                Ok(None) => {
                    return unavailable(&EngineError::NotStored("still being stored".into()))
                }
                Err(cause) => return unavailable(&cause),
            }
        }
        Err(cause) => return unavailable(&cause),
    };
    (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        room::message(&stored),
    )
        .into_response()
}

/// Tells the room; an indicator not refreshed within `typing_expiry_ms` is reported as
/// stopped, as for a WebSocket member.
async fn typing(state: &AppState, key: (String, String), is_typing: bool) -> Response {
    if let Err(refused) = state.engine.typing(&key.0, &key.1, is_typing).await {
        return match refused {
            EngineError::Forbidden(why) => refusal(StatusCode::FORBIDDEN, "forbidden", why, None),
            other => {
                debug!(cause = %other, "typing did not reach the room");
                refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the room is unavailable; try again",
                    None,
                )
            }
        };
    }
    let posters = state.room_posters.clone();
    if !is_typing {
        posters.typing.lock().expect("typing lock").remove(&key);
        return StatusCode::ACCEPTED.into_response();
    }
    let expiry = Duration::from_millis(state.config.typing_expiry_ms.max(1));
    let until = Instant::now() + expiry;
    posters
        .typing
        .lock()
        .expect("typing lock")
        .insert(key.clone(), until);
    let engine = state.engine.clone();
    state.spawn(async move {
        tokio::time::sleep_until(until).await;
        let expired = {
            let mut typing = posters.typing.lock().expect("typing lock");
            let expired = typing.get(&key).is_some_and(|at| *at <= Instant::now());
            if expired {
                typing.remove(&key);
            }
            expired
        };
        if expired {
            let _ = engine.typing(&key.0, &key.1, false).await;
        }
    });
    StatusCode::ACCEPTED.into_response()
}
