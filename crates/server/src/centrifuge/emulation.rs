//! Centrifugo's HTTP transports, for clients that cannot open a WebSocket:
//! `POST /connection/http_stream` (the body a frame of commands, `connect` first; the
//! response streams the replies, JSON one per line or Protobuf length-delimited),
//! `GET /connection/sse?cf_connect=` (the connect command in the query; the replies as
//! Server-Sent Events, JSON), and `POST /emulation`, which carries a client's later
//! commands to its session from any node: in a cluster, to the node holding the session
//! over Redis ([`switchboard_engine::Engine::post`]), so no sticky sessions are needed.
//!
//! `/emulation` answers 204 once the session has the commands, 410 when the node holds
//! no such session (it ended, or never was), 404 when no node has the address named
//! (centrifuge-js then reconnects), 400 for a body that is no emulation request, 413
//! past [`MAX_BODY`], and 503 or 504 when the node holding the session cannot be
//! reached or does not answer in time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use switchboard_protocol::centrifuge::{decode_emulation, Encoding};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, warn};

use super::session;
use super::transport::{Emulated, Framing, Transport};
use crate::room_http::foreign_origin;
use crate::serve::{AppState, ConnectionSlot};

/// The largest body a stream's opening request or an emulation request may have.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// Frames of commands waiting for a session before `/emulation` waits too.
const QUEUED_FRAMES: usize = 32;

/// How long `/emulation` waits for a session's queue to take a frame.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(5);

/// Tags of the posts nodes send each other for `/emulation`.
const POST_REQUEST: u8 = 0x01;
const POST_ANSWER: u8 = 0x02;

/// The sessions of emulated connections on this node, by session id, and the
/// emulation requests this node routed to others and waits on.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    sessions: Mutex<HashMap<String, mpsc::Sender<Bytes>>>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<u16>>>,
    next_request: AtomicU64,
}

/// A session's place in [`Sessions`]; dropping it takes the session out.
pub(crate) struct Registered {
    sessions: Arc<Sessions>,
    session: String,
}

impl Registered {
    pub(super) fn session(&self) -> &str {
        &self.session
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.sessions
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(&self.session);
    }
}

/// A fresh session id: 32 hex digits from the operating system's generator. Unlike
/// the client id (which presence shows everyone), it is known to its client alone,
/// and naming it is what lets an emulation request in.
fn session_id() -> String {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::from_os_rng();
    format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

/// Whether `text` is `digits` lower-case hex digits.
fn is_hex(text: &str, digits: usize) -> bool {
    text.len() == digits && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_session_id(text: &str) -> bool {
    is_hex(text, 32)
}

fn is_address(text: &str) -> bool {
    is_hex(text, 16)
}

impl Sessions {
    fn register(self: &Arc<Self>, commands: mpsc::Sender<Bytes>) -> Registered {
        let session = session_id();
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(session.clone(), commands);
        Registered {
            sessions: self.clone(),
            session,
        }
    }

    /// Hands a frame of commands to a session here: the status `/emulation` answers.
    async fn deliver(&self, session: &str, frame: Bytes) -> StatusCode {
        let queue = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(session)
            .cloned();
        let Some(queue) = queue else {
            metrics::counter!("switchboard_centrifuge_emulation_total", "outcome" => "no_session")
                .increment(1);
            return StatusCode::GONE;
        };
        match tokio::time::timeout(DELIVERY_PATIENCE, queue.send(frame)).await {
            Ok(Ok(())) => {
                metrics::counter!("switchboard_centrifuge_emulation_total", "outcome" => "delivered")
                    .increment(1);
                StatusCode::NO_CONTENT
            }
            Ok(Err(_)) => StatusCode::GONE,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Serves the emulation requests other nodes route here, and their answers to the
/// ones this node routed, until the drain is over (sessions draining still take
/// commands, and requests this node routed still get their answers).
pub(crate) async fn apply_posts(state: AppState, mut posts: broadcast::Receiver<Bytes>) {
    let kill = state.kill.clone();
    let tasks = state.tasks.clone();
    loop {
        let received = tokio::select! {
            () = kill.stopping() => return,
            // Closed and empty: the drain is over.
            () = tasks.wait() => return,
            received = posts.recv() => received,
        };
        let payload = match received {
            Ok(payload) => payload,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                warn!(missed, "posts to this node were missed: it was too busy");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        match payload.first() {
            Some(&POST_REQUEST) => {
                let Some((id, from, session, frame)) = parse_request(&payload) else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let status = state.centrifuge_sessions.deliver(&session, frame).await;
                    let mut answer = BytesMut::with_capacity(11);
                    answer.put_u8(POST_ANSWER);
                    answer.put_u64(id);
                    answer.put_u16(status.as_u16());
                    if let Err(cause) = state.engine.post(&from, answer.freeze()).await {
                        debug!(%cause, "answering a routed emulation request failed");
                    }
                });
            }
            Some(&POST_ANSWER) if payload.len() == 11 => {
                let id = u64::from_be_bytes(payload[1..9].try_into().expect("8 bytes"));
                let status = u16::from_be_bytes([payload[9], payload[10]]);
                let waiting = state
                    .centrifuge_sessions
                    .waiting
                    .lock()
                    .expect("waiting lock")
                    .remove(&id);
                if let Some(waiting) = waiting {
                    let _ = waiting.send(status);
                }
            }
            // Another door's notice.
            _ => {}
        }
    }
}

/// A routed request: tag, id, the sender's address and the session (each after its
/// length byte), then the frame.
fn encode_request(id: u64, from: &str, session: &str, frame: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(11 + from.len() + session.len() + frame.len());
    out.put_u8(POST_REQUEST);
    out.put_u64(id);
    for text in [from, session] {
        out.put_u8(u8::try_from(text.len()).expect("addresses and sessions are short"));
        out.put_slice(text.as_bytes());
    }
    out.put_slice(frame);
    out.freeze()
}

fn parse_request(payload: &Bytes) -> Option<(u64, String, String, Bytes)> {
    let id = u64::from_be_bytes(payload.get(1..9)?.try_into().ok()?);
    let mut at = 9;
    let mut texts = Vec::with_capacity(2);
    for _ in 0..2 {
        let length = usize::from(*payload.get(at)?);
        let text = std::str::from_utf8(payload.get(at + 1..at + 1 + length)?).ok()?;
        texts.push(text.to_owned());
        at += 1 + length;
    }
    let session = texts.pop()?;
    let from = texts.pop()?;
    Some((id, from, session, payload.slice(at..)))
}

/// A status with a line saying it, as `/emulation` answers.
fn answer(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

/// The answer to a browser's preflight request.
fn preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("300"),
    );
    response
}

fn encoding_of(headers: &HeaderMap) -> Encoding {
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/octet-stream"));
    if protobuf {
        Encoding::Protobuf
    } else {
        Encoding::Json
    }
}

/// A request's body, up to [`MAX_BODY`], within `handshake_timeout_secs` (a body that
/// does not come, over HTTP/1.1 or on a half-open HTTP/2 stream, is answered 408).
async fn body_of(state: &AppState, request: Request) -> Result<Bytes, Response> {
    let patience = Duration::from_secs(state.config.handshake_timeout_secs.max(1));
    let read = tokio::time::timeout(
        patience,
        axum::body::to_bytes(request.into_body(), MAX_BODY),
    );
    let Ok(read) = read.await else {
        return Err(answer(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not come in time\n",
        ));
    };
    read.map_err(|cause| {
        let too_large = std::error::Error::source(&cause)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            answer(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 64 KiB\n")
        } else {
            answer(StatusCode::BAD_REQUEST, "the body could not be read\n")
        }
    })
}

/// `POST /emulation`: a frame of commands for a session on any node.
pub(crate) async fn emulation(State(state): State<AppState>, request: Request) -> Response {
    if request.method() == Method::OPTIONS {
        return preflight();
    }
    if let Some(refused) = foreign_origin(&state, request.headers()) {
        return refused;
    }
    let encoding = encoding_of(request.headers());
    let body = match body_of(&state, request).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let request = match decode_emulation(encoding, &body) {
        Ok(request) => request,
        Err(malformed) => {
            debug!(%malformed, "a malformed emulation request");
            return answer(StatusCode::BAD_REQUEST, "not an emulation request\n");
        }
    };
    if !is_session_id(&request.session) {
        return answer(
            StatusCode::BAD_REQUEST,
            "session must be the one the connect reply gave\n",
        );
    }
    if !is_address(&request.node) {
        return answer(
            StatusCode::BAD_REQUEST,
            "node must be the one the connect reply gave\n",
        );
    }
    let frame = Bytes::from(request.data);
    if request.node == state.engine.address() {
        return delivered(
            state
                .centrifuge_sessions
                .deliver(&request.session, frame)
                .await,
        );
    }
    route(&state, &request.node, &request.session, &frame).await
}

fn delivered(status: StatusCode) -> Response {
    match status {
        StatusCode::NO_CONTENT => status.into_response(),
        StatusCode::GONE => answer(status, "no such session on that node\n"),
        _ => answer(status, "the session did not take the commands in time\n"),
    }
}

/// Takes a routed request out of those waiting for an answer when dropped.
struct Forget<'a> {
    sessions: &'a Sessions,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.sessions
            .waiting
            .lock()
            .expect("waiting lock")
            .remove(&self.id);
    }
}

/// Carries an emulation request to the node at `node` and answers what it answered.
async fn route(state: &AppState, node: &str, session: &str, frame: &[u8]) -> Response {
    let sessions = &state.centrifuge_sessions;
    let id = sessions.next_request.fetch_add(1, Ordering::Relaxed);
    let (tell, told) = oneshot::channel();
    sessions
        .waiting
        .lock()
        .expect("waiting lock")
        .insert(id, tell);
    // Forgotten however this ends, a request dropped midway included.
    let _forget = Forget { sessions, id };
    let payload = encode_request(id, state.engine.address(), session, frame);
    match state.engine.post(node, payload).await {
        Ok(true) => {}
        Ok(false) => {
            metrics::counter!("switchboard_centrifuge_emulation_total", "outcome" => "no_node")
                .increment(1);
            return answer(StatusCode::NOT_FOUND, "no node has that address\n");
        }
        Err(cause) => {
            warn!(%cause, "routing an emulation request failed");
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the node of the session cannot be reached now\n",
            );
        }
    }
    metrics::counter!("switchboard_centrifuge_emulation_total", "outcome" => "routed").increment(1);
    let patience = DELIVERY_PATIENCE + Duration::from_millis(state.config.redis_timeout_ms);
    match tokio::time::timeout(patience, told).await {
        Ok(Ok(status)) => {
            delivered(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY))
        }
        _ => answer(
            StatusCode::GATEWAY_TIMEOUT,
            "the node of the session did not answer in time\n",
        ),
    }
}

/// `POST /connection/http_stream`.
pub(crate) async fn http_stream(State(state): State<AppState>, request: Request) -> Response {
    if request.method() == Method::OPTIONS {
        return preflight();
    }
    if let Some(refused) = foreign_origin(&state, request.headers()) {
        return refused;
    }
    let encoding = encoding_of(request.headers());
    let slot = request.extensions().get::<ConnectionSlot>().cloned();
    let first = match body_of(&state, request).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let framing = match encoding {
        Encoding::Json => Framing::Lines,
        Encoding::Protobuf => Framing::Delimited,
    };
    let content_type = match encoding {
        Encoding::Json => "application/json",
        Encoding::Protobuf => "application/octet-stream",
    };
    open(state, slot, encoding, framing, first, content_type, None)
}

/// `GET /connection/sse?cf_connect=CONNECT` (or the connect command as a POST body).
pub(crate) async fn sse(State(state): State<AppState>, request: Request) -> Response {
    if let Some(refused) = foreign_origin(&state, request.headers()) {
        return refused;
    }
    if crate::upgrade::is_extended_connect(&request) {
        // A WebSocket stream asked for here: refused before anything connects.
        return answer(StatusCode::BAD_REQUEST, "this endpoint is no WebSocket\n");
    }
    let slot = request.extensions().get::<ConnectionSlot>().cloned();
    let first = if request.method() == Method::POST {
        match body_of(&state, request).await {
            Ok(body) => body,
            Err(refused) => return refused,
        }
    } else {
        let connect = axum::extract::Query::<HashMap<String, String>>::try_from_uri(request.uri())
            .ok()
            .and_then(|mut query| query.0.remove("cf_connect"));
        match connect {
            Some(connect) if connect.len() <= MAX_BODY => Bytes::from(connect),
            Some(_) => return answer(StatusCode::PAYLOAD_TOO_LARGE, "cf_connect is over 64 KiB\n"),
            None => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    "cf_connect must hold the connect command\n",
                )
            }
        }
    };
    // An empty line first: some clients see the stream open only once bytes come.
    let greeting = Bytes::from_static(b"\r\n");
    open(
        state,
        slot,
        Encoding::Json,
        Framing::Events,
        first,
        "text/event-stream; charset=utf-8",
        Some(greeting),
    )
}

/// Starts an emulated session and answers its stream.
fn open(
    state: AppState,
    slot: Option<ConnectionSlot>,
    encoding: Encoding,
    framing: Framing,
    first: Bytes,
    content_type: &'static str,
    greeting: Option<Bytes>,
) -> Response {
    let (commands_in, commands) = mpsc::channel(QUEUED_FRAMES);
    let (body, chunks) = mpsc::channel::<Bytes>(16);
    if let Some(greeting) = greeting {
        body.try_send(greeting).expect("a fresh channel has room");
    }
    let registered = state.centrifuge_sessions.register(commands_in);
    let transport = Transport::Emulated(Box::new(Emulated {
        framing,
        first: Some(first),
        commands,
        body,
        out: BytesMut::new(),
        patience: Duration::from_secs(state.config.pong_timeout_secs.max(1)),
        registered,
    }));
    let transport_name = framing.name();
    metrics::counter!("switchboard_connections_total", "transport" => transport_name).increment(1);
    let session_state = state.clone();
    state.spawn(async move {
        // Its places under the limits are held while the stream is open.
        let _slot = slot;
        metrics::gauge!("switchboard_connections", "transport" => transport_name).increment(1.0);
        session::run(transport, encoding, session_state).await;
        metrics::gauge!("switchboard_connections", "transport" => transport_name).decrement(1.0);
    });
    let stream = futures_util::stream::unfold(chunks, |mut chunks| async move {
        let chunk = chunks.recv().await?;
        Some((Ok::<_, Infallible>(chunk), chunks))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache, no-store, must-revalidate, max-age=0"),
    );
    // nginx passes it on as it comes instead of buffering the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_requests_read_back_as_written() {
        let payload = encode_request(7, "00000000000000ab", "f".repeat(32).as_str(), b"{}\n{}");
        let (id, from, session, frame) = parse_request(&payload).unwrap();
        assert_eq!(
            (id, &from[..], &session[..]),
            (7, "00000000000000ab", &*"f".repeat(32))
        );
        assert_eq!(&frame[..], b"{}\n{}");
        for cut in 0..11 {
            assert!(parse_request(&payload.slice(..cut)).is_none(), "{cut}");
        }
    }

    #[test]
    fn session_ids_are_fresh_and_of_their_form() {
        let (a, b) = (session_id(), session_id());
        assert!(is_session_id(&a) && is_session_id(&b));
        assert_ne!(a, b);
        assert!(!is_session_id("0123") && !is_session_id(&"G".repeat(32)));
        assert!(is_address("0123456789abcdef") && !is_address("0123456789abcdeF"));
    }
}
