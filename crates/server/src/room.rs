//! `/room/{room}`: a chat room over WebSocket (DESIGN.md, "The room protocol").

use std::collections::HashMap;

use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use std::time::Instant;
use switchboard_hub::event::{self, parse_client_event, ClientEvent};
use switchboard_hub::{valid_room_id, Membership, Outbound, ROOM_ID_RULE};
use switchboard_net::wire::OpCode;
use switchboard_net::{CloseCode, CloseFrame, Message, WebSocket};

use switchboard_net::Stream;
use tracing::{debug, warn};

use crate::serve::AppState;
use crate::upgrade::upgrade;

/// Close code for a connection that fell too far behind its room.
pub const SLOW_CONSUMER: CloseCode = CloseCode(4008);

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
    /// Refusals in a row.
    strikes: u32,
}

impl RateLimit {
    fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate.max(0.0),
            burst,
            tokens: burst,
            at: Instant::now(),
            strikes: 0,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}

pub(crate) async fn room(
    State(state): State<AppState>,
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    if !valid_room_id(&room) {
        return bad_request(ROOM_ID_RULE.into());
    }
    let name = match crate::auth::identify(&state.auth, &room, &query, request.headers()) {
        Ok(name) => name,
        Err(refused) => {
            metrics::counter!("switchboard_handshake_failures_total", "reason" => "auth")
                .increment(1);
            return (refused.status, format!("{}\n", refused.message)).into_response();
        }
    };
    let since = match query.get("since").map(|s| s.parse::<u64>()) {
        None => None,
        // Ids are stored as SQLite integers.
        Some(Ok(id)) if id <= i64::MAX as u64 => Some(id),
        Some(_) => return bad_request("since must be a message id (a whole number)".into()),
    };
    let config = state.config.socket_config(state.config.room_max_message);
    let session_state = state.clone();
    upgrade(&state, request, config, move |socket, _| async move {
        match session_state.hub.join(&room, &name, since).await {
            Ok(membership) => session(socket, membership, session_state).await,
            Err(cause) => {
                warn!(%cause, room, "joining a room failed");
                let mut socket = socket;
                let frame = CloseFrame::new(CloseCode::INTERNAL_ERROR, "room unavailable");
                if let Err(cause) = socket.close(Some(frame)).await {
                    debug!(%cause, "closing after a failed join");
                }
            }
        }
    })
}

/// A session's counters, looked up in the registry once rather than per event: the
/// send side runs once per member for every message in the room.
struct Counters {
    events_sent: metrics::Counter,
    bytes_sent: metrics::Counter,
    events_received: metrics::Counter,
    bytes_received: metrics::Counter,
}

impl Counters {
    fn new() -> Self {
        Self {
            events_sent: metrics::counter!("switchboard_events_sent_total"),
            bytes_sent: metrics::counter!("switchboard_bytes_sent_total"),
            events_received: metrics::counter!("switchboard_events_received_total"),
            bytes_received: metrics::counter!("switchboard_bytes_received_total"),
        }
    }
}

async fn feed(
    socket: &mut WebSocket<Stream>,
    counters: &Counters,
    item: &Outbound,
) -> Result<(), switchboard_net::Error> {
    let (Outbound::Message(_, bytes) | Outbound::Text(bytes) | Outbound::Binary(bytes)) = item;
    counters.events_sent.increment(1);
    counters.bytes_sent.increment(bytes.len() as u64);
    match item {
        Outbound::Message(_, json) | Outbound::Text(json) => {
            socket.feed_frame(OpCode::Text, json).await
        }
        Outbound::Binary(data) => socket.feed_frame(OpCode::Binary, data).await,
    }
}

async fn session(mut socket: WebSocket<Stream>, mut membership: Membership, state: AppState) {
    // The welcome, then history page by page; live events wait in the member's queue.
    // A failed history read (the store, or in a cluster Redis, away) closes with 1011:
    // the client reconnects with `since` and misses nothing.
    let mut history_failed = None;
    let result: Result<(), switchboard_net::Error> = async {
        socket.feed_frame(OpCode::Text, &membership.welcome).await?;
        loop {
            let page = match membership.next_backlog().await {
                Ok(page) => page,
                Err(cause) => {
                    history_failed = Some(cause);
                    break;
                }
            };
            if page.is_empty() {
                break;
            }
            for message in &page {
                socket.feed_frame(OpCode::Text, message).await?;
            }
            socket.flush().await?;
        }
        socket.flush().await
    }
    .await;
    if let Err(cause) = result {
        debug!(%cause, "room connection ended during the welcome");
        return;
    }
    if let Some(cause) = history_failed {
        warn!(%cause, "reading room history failed");
        let frame = CloseFrame::new(CloseCode::INTERNAL_ERROR, "history unavailable; reconnect");
        if let Err(cause) = Box::pin(socket.close(Some(frame))).await {
            debug!(%cause, "closing after a failed history read");
        }
        return;
    }
    let counters = Counters::new();
    let cancelled = state.shutdown.stopping();
    tokio::pin!(cancelled);
    let mut limit = RateLimit::new(
        state.config.rate_limit_per_sec,
        state.config.rate_limit_burst,
    );
    // When an unrefreshed typing indicator expires.
    let mut typing_until: Option<tokio::time::Instant> = None;
    let typing_expiry = std::time::Duration::from_millis(state.config.typing_expiry_ms.max(1));
    let close = loop {
        tokio::select! {
            biased;
            () = async { tokio::time::sleep_until(typing_until.expect("guarded")).await }, if typing_until.is_some() => {
                membership.typing(false);
                typing_until = None;
            }
            () = &mut cancelled => break Some(CloseFrame::new(CloseCode::GOING_AWAY, "server shutting down")),
            item = membership.recv() => {
                let Some(item) = item else {
                    metrics::counter!("switchboard_slow_consumer_closes_total").increment(1);
                    break Some(CloseFrame::new(SLOW_CONSUMER, "too slow: reconnect with ?since="));
                };
                let mut sent = feed(&mut socket, &counters, &item).await;
                while let (Ok(()), Some(more)) = (&sent, membership.try_recv()) {
                    sent = feed(&mut socket, &counters, &more).await;
                }
                if let Err(cause) = sent.and(socket.flush().await) {
                    debug!(%cause, "room connection ended while sending");
                    return;
                }
            }
            received = socket.recv() => match received {
                Ok(Some(message @ (Message::Text(_) | Message::Binary(_)))) if !limit.allow() => {
                    metrics::counter!("switchboard_rate_limited_total").increment(1);
                    if limit.strikes > state.config.rate_limit_strikes {
                        break Some(CloseFrame::new(CloseCode::POLICY, "rate limit exceeded again and again"));
                    }
                    // A refused message is named, so its sender can send it again later.
                    let nonce = match &message {
                        Message::Text(text) => event::nonce_of(text.as_str()),
                        _ => None,
                    };
                    let error = event::error("rate_limited", "too many events; slow down", nonce.as_deref());
                    if let Err(cause) = socket.feed_frame(OpCode::Text, &error).await {
                        debug!(%cause, "room connection ended while refusing");
                        return;
                    }
                }
                Ok(Some(Message::Text(text))) => {
                    counters.events_received.increment(1);
                    counters.bytes_received.increment(text.len() as u64);
                    match on_text(&mut socket, &membership, &state, text.as_str()).await {
                        // Each "typing" restarts the expiry; "stopped" ends it.
                        Ok(Some(true)) => typing_until = Some(tokio::time::Instant::now() + typing_expiry),
                        Ok(Some(false)) => typing_until = None,
                        Ok(None) => {}
                        Err(cause) => {
                            debug!(%cause, "room connection ended while answering");
                            return;
                        }
                    }
                }
                Ok(Some(Message::Binary(data))) => {
                    counters.bytes_received.increment(data.len() as u64);
                    membership.relay_binary(data);
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(cause) => {
                    debug!(%cause, "room connection ended");
                    return;
                }
            },
        }
    };
    if let Some(frame) = close {
        if let Err(cause) = Box::pin(socket.close(Some(frame))).await {
            debug!(%cause, "room close handshake");
        }
    }
}

async fn on_text(
    socket: &mut WebSocket<Stream>,
    membership: &Membership,
    state: &AppState,
    text: &str,
) -> Result<Option<bool>, switchboard_net::Error> {
    match parse_client_event(text, state.config.max_text_chars) {
        Ok(ClientEvent::Message { text, nonce }) => {
            // The sender's acknowledgement is the broadcast of its own message.
            let named = nonce.clone();
            if let Err(cause) = membership.post(text, nonce).await {
                warn!(%cause, "posting a message failed");
                socket
                    .feed_frame(OpCode::Text, &event::unavailable(named.as_deref()))
                    .await?;
            }
            Ok(None)
        }
        Ok(ClientEvent::Typing { is_typing }) => {
            membership.typing(is_typing);
            Ok(Some(is_typing))
        }
        Err(refused) => {
            let error = event::error(refused.code, &refused.message, refused.nonce.as_deref());
            socket.feed_frame(OpCode::Text, &error).await.map(|()| None)
        }
    }
}
