//! `/room/{channel}`: the room protocol over WebSocket (docs/PROTOCOL.md).
//!
//! The handshake checks the channel name, who the user is (`auth.rs`), whether the
//! channel admits that user, and the resume point (`since`, `epoch`); then a session
//! sends the welcome and the backlog, and relays in both directions until one side
//! closes. Publications reach the socket encoded once per channel (see
//! [`switchboard_engine::Delivery`]), several per write when they queue up.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use serde_json::value::to_raw_value;
use switchboard_engine::{
    names, Draft, Ended, EngineError, Format, Outbound, Resume, Subscription, CHANNEL_RULE,
};
use switchboard_net::bucket::TokenBucket;
use switchboard_net::wire::frame::server_frame;
use switchboard_net::wire::OpCode;
use switchboard_net::{CloseCode, CloseFrame, Message, Settled, Stream, WebSocket};
use switchboard_protocol::room::{self, parse_client_event, ClientEvent};
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

use crate::metrics::Counters;
use crate::serve::AppState;
use crate::upgrade::upgrade;

/// Close code for a connection that fell too far behind its room.
pub const SLOW_CONSUMER: CloseCode = CloseCode(4008);

/// Close code for a connection that could not be given every message in order: its
/// room's history was lost under it (a new epoch), or messages it missed could not be
/// read. It reconnects with `since` and `epoch`; the welcome says what was recovered.
pub const HISTORY_RESET: CloseCode = CloseCode(4009);

/// The room protocol's slot in each publication's encoding cache.
pub(crate) const ROOM_JSON: Format = Format(0);
/// A room message as a whole Server-Sent Event (`id:` and `data:`), for event streams.
pub(crate) const ROOM_SSE: Format = Format(4);
/// A room message as a whole WebSocket text frame, sent as it is by every session that
/// can (see `Session::feed`).
pub(crate) const ROOM_FRAME: Format = Format(5);

/// Longest `epoch` a resume may name.
pub(crate) const MAX_EPOCH: usize = 64;

pub(crate) fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}

/// The resume point a room URL asks for.
pub(crate) fn resume_of(query: &HashMap<String, String>) -> Result<Resume, &'static str> {
    let since = match query.get("since").map(|s| s.parse::<u64>()) {
        None => None,
        // Ids are stored as SQLite integers.
        Some(Ok(id)) if id <= i64::MAX as u64 => Some(id),
        Some(_) => return Err("since must be a message id (a whole number)"),
    };
    let epoch = match query.get("epoch") {
        Some(epoch) if epoch.is_empty() || epoch.len() > MAX_EPOCH => {
            return Err("epoch must be the one a welcome gave (1-64 characters)")
        }
        epoch => epoch.cloned(),
    };
    Ok(Resume {
        since,
        epoch,
        recent: None,
    })
}

/// Who may join `channel` with this request's identity (`name` or `token` in `query`,
/// or the `Authorization` header): the user, or the status and text to refuse with.
pub(crate) fn admit(
    state: &AppState,
    channel: &str,
    query: &HashMap<String, String>,
    headers: &http::HeaderMap,
) -> Result<String, (StatusCode, String)> {
    if !names::valid_channel(channel) {
        return Err((StatusCode::BAD_REQUEST, format!("{CHANNEL_RULE}\n")));
    }
    let refused = |status: StatusCode, message: String| {
        metrics::counter!("switchboard_handshake_failures_total", "reason" => "auth").increment(1);
        Err((status, format!("{message}\n")))
    };
    let name = match crate::auth::identify(&state.auth, channel, query, headers) {
        Ok(name) => name,
        Err(why) => return refused(why.status, why.message),
    };
    if !names::may_subscribe(channel, &name) {
        return refused(
            StatusCode::FORBIDDEN,
            format!("room {channel} is for other users"),
        );
    }
    if names::needs_signature(channel) {
        return refused(
            StatusCode::FORBIDDEN,
            format!(
                "room {channel} is a private or presence channel: join it through the Pusher door (/app/KEY) with the app's signature"
            ),
        );
    }
    if state.engine.options(channel).subscribe_token {
        // Its subscribers need a subscription token, which only the Centrifugo door
        // checks.
        return refused(
            StatusCode::FORBIDDEN,
            format!(
                "room {channel} takes subscription tokens: join it through /connection/websocket"
            ),
        );
    }
    Ok(name)
}

pub(crate) async fn room(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let name = match admit(&state, &channel, &query, request.headers()) {
        Ok(name) => name,
        Err(refusal) => return refusal.into_response(),
    };
    if crate::room_http::wants_event_stream(request.headers())
        && !crate::upgrade::is_extended_connect(&request)
    {
        return crate::room_http::stream(state, channel, name, &query, request).await;
    }
    let resume = match resume_of(&query) {
        Ok(resume) => resume,
        Err(message) => return bad_request(message.into()),
    };
    let config = state.config.socket_config(state.config.room_max_message);
    let session_state = state.clone();
    upgrade(&state, request, config, move |mut socket, _| async move {
        match session_state
            .engine
            .subscribe(&channel, &name, resume)
            .await
        {
            Ok(subscription) => {
                Session::new(socket, subscription, session_state)
                    .run()
                    .await
            }
            Err(cause) => {
                warn!(%cause, channel, "joining a room failed");
                let frame = CloseFrame::new(CloseCode::INTERNAL_ERROR, "room unavailable");
                if let Err(cause) = socket.close(Some(frame)).await {
                    debug!(%cause, "closing after a failed join");
                }
            }
        }
    })
}

/// The `welcome` event for a member that just joined, whatever carries it.
pub(crate) fn welcome(subscription: &Subscription, state: &AppState) -> Bytes {
    room::welcome(&room::Welcome {
        room: subscription.channel().to_owned(),
        user: subscription.user().to_owned(),
        members: subscription.members().to_vec(),
        last_id: subscription.last_id(),
        epoch: subscription.epoch().to_owned(),
        recovered: subscription.recovered(),
        limits: Some(state.config.limits()),
    })
}

/// A connection's events per second, and how often in a row it went over.
struct RateLimit {
    bucket: TokenBucket,
    /// Refusals in a row.
    strikes: u32,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        if self.bucket.take(now.into_std()) {
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

/// An event in the room protocol.
pub(crate) fn frame_of(item: &Outbound) -> (OpCode, Bytes) {
    let text = match item {
        Outbound::Publication { delivery, .. } | Outbound::Ack(delivery) => {
            delivery.encoded(ROOM_JSON, room::message)
        }
        Outbound::Join(user) => room::presence(true, user),
        Outbound::Leave(user) => room::presence(false, user),
        Outbound::Typing { user, is_typing } => room::typing(user, *is_typing),
        Outbound::Refused { nonce } => room::unavailable(nonce.as_deref()),
        Outbound::Binary(data) => return (OpCode::Binary, data.clone()),
    };
    (OpCode::Text, text)
}

/// What woke the live loop.
enum Live {
    TypingExpired,
    Shutdown,
    Item(Outbound),
    /// The engine cut this member off.
    CutOff,
    Message(Message),
    /// The socket has work to do (see [`WebSocket::settle`]).
    Socket,
}

/// What the live loop does after an event.
enum Step {
    Continue,
    /// Close with this frame.
    Close(CloseFrame),
    /// The connection is gone.
    End,
}

struct Session {
    socket: WebSocket<Stream>,
    subscription: Subscription,
    state: AppState,
    counters: Counters,
    limit: RateLimit,
    /// When an unrefreshed typing indicator expires.
    typing_until: Option<Instant>,
}

impl Session {
    fn new(socket: WebSocket<Stream>, subscription: Subscription, state: AppState) -> Self {
        let limit = RateLimit {
            bucket: TokenBucket::new(
                state.config.rate_limit_per_sec,
                f64::from(state.config.rate_limit_burst),
                std::time::Instant::now(),
            ),
            strikes: 0,
        };
        Self {
            socket,
            subscription,
            state,
            counters: Counters::new(),
            limit,
            typing_until: None,
        }
    }

    async fn run(mut self) {
        if !self.greet().await {
            return;
        }
        match self.live().await {
            Step::Close(frame) => {
                if let Err(cause) = Box::pin(self.socket.close(Some(frame))).await {
                    debug!(%cause, "room close handshake");
                }
            }
            Step::Continue | Step::End => {}
        }
    }

    /// The welcome, then history page by page; live events wait in the member's queue.
    /// A failed history read (the store, or in a cluster Redis, away) closes with 1011:
    /// the client reconnects with `since` and misses nothing. False when the session
    /// is over.
    async fn greet(&mut self) -> bool {
        let welcome = welcome(&self.subscription, &self.state);
        let subscription = &mut self.subscription;
        let mut history_failed = None;
        let result: Result<(), switchboard_net::Error> = async {
            self.socket.feed_frame(OpCode::Text, &welcome).await?;
            loop {
                let page = match subscription.next_backlog().await {
                    Ok(page) => page,
                    Err(cause) => {
                        history_failed = Some(cause);
                        break;
                    }
                };
                if page.is_empty() {
                    break;
                }
                for publication in &page {
                    self.socket
                        .feed_frame(OpCode::Text, &room::message(publication))
                        .await?;
                }
                self.socket.flush().await?;
            }
            self.socket.flush().await
        }
        .await;
        if let Err(cause) = result {
            debug!(%cause, "room connection ended during the welcome");
            return false;
        }
        if let Some(cause) = history_failed {
            warn!(%cause, "reading room history failed");
            let frame =
                CloseFrame::new(CloseCode::INTERNAL_ERROR, "history unavailable; reconnect");
            if let Err(cause) = Box::pin(self.socket.close(Some(frame))).await {
                debug!(%cause, "closing after a failed history read");
            }
            return false;
        }
        true
    }

    /// Relays both ways until one side closes. One poll waits on everything (the typing
    /// expiry, shutdown, the member's queue, the socket), in that order.
    async fn live(&mut self) -> Step {
        let shutdown = self.state.shutdown.clone();
        let cancelled = shutdown.stopping();
        tokio::pin!(cancelled);
        // The typing expiry's timer, made when first needed.
        let mut typing_timer: Option<Pin<Box<Sleep>>> = None;
        loop {
            let event = std::future::poll_fn(|cx| {
                if let Some(until) = self.typing_until {
                    let timer = typing_timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                    if timer.deadline() != until {
                        timer.as_mut().reset(until);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Live::TypingExpired);
                    }
                }
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Live::Shutdown);
                }
                if let Poll::Ready(item) = self.subscription.poll_recv(cx) {
                    return Poll::Ready(item.map_or(Live::CutOff, Live::Item));
                }
                self.socket
                    .poll_message(cx)
                    .map(|message| message.map_or(Live::Socket, Live::Message))
            })
            .await;
            let step = match event {
                Live::TypingExpired => {
                    self.typing_until = None;
                    // Allowed when it started.
                    let _ = self.subscription.typing(false);
                    Step::Continue
                }
                Live::Shutdown => Step::Close(CloseFrame::new(
                    CloseCode::GOING_AWAY,
                    "server shutting down",
                )),
                Live::Item(item) => self.send(item).await,
                Live::CutOff => self.cut_off(),
                Live::Message(message) => self.on_message(message).await,
                Live::Socket => match self.socket.settle().await {
                    Ok(Settled::Message(message)) => self.on_message(message).await,
                    Ok(Settled::Done) => Step::Continue,
                    Ok(Settled::Closed) => Step::End,
                    Err(cause) => {
                        debug!(%cause, "room connection ended");
                        Step::End
                    }
                },
            };
            match step {
                Step::Continue => {}
                other => return other,
            }
        }
    }

    /// Sends `item` and whatever else is already queued, in one write.
    async fn send(&mut self, item: Outbound) -> Step {
        let mut sent = self.feed(&item).await;
        while let (Ok(()), Some(more)) = (&sent, self.subscription.try_recv()) {
            sent = self.feed(&more).await;
        }
        match sent.and(self.socket.flush().await) {
            Ok(()) => Step::Continue,
            Err(cause) => {
                debug!(%cause, "room connection ended while sending");
                Step::End
            }
        }
    }

    async fn feed(&mut self, item: &Outbound) -> Result<(), switchboard_net::Error> {
        let (opcode, bytes) = frame_of(item);
        self.counters.events_sent.increment(1);
        self.counters.bytes_sent.increment(bytes.len() as u64);
        if let Outbound::Publication { delivery, .. } | Outbound::Ack(delivery) = item {
            // The frame is made once per message for every member: one contiguous
            // buffer each socket writes from, with nothing copied per member.
            let frame = delivery.encoded(ROOM_FRAME, |_| server_frame(OpCode::Text, &bytes));
            if self.socket.feed_encoded(&frame).await? {
                return Ok(());
            }
        }
        self.socket.feed_frame(opcode, &bytes).await
    }

    /// The engine cut this member off: it reconnects and resumes.
    fn cut_off(&self) -> Step {
        Step::Close(match self.subscription.ended() {
            Some(Ended::Slow) => {
                metrics::counter!("switchboard_slow_consumer_closes_total").increment(1);
                CloseFrame::new(SLOW_CONSUMER, "too slow: reconnect with ?since=")
            }
            Some(Ended::Reset) => CloseFrame::new(
                HISTORY_RESET,
                "the room's history was reset: reconnect with ?since=&epoch=",
            ),
            Some(Ended::Missed) => CloseFrame::new(
                HISTORY_RESET,
                "messages could not be delivered in order: reconnect with ?since=&epoch=",
            ),
            None => CloseFrame::new(CloseCode::GOING_AWAY, "server shutting down"),
        })
    }

    async fn on_message(&mut self, message: Message) -> Step {
        let (text, binary) = match message {
            Message::Text(text) => (Some(text), None),
            Message::Binary(data) => (None, Some(data)),
            _ => return Step::Continue,
        };
        if !self.limit.allow(Instant::now()) {
            metrics::counter!("switchboard_rate_limited_total").increment(1);
            if self.limit.strikes > self.state.config.rate_limit_strikes {
                return Step::Close(CloseFrame::new(
                    CloseCode::POLICY,
                    "rate limit exceeded again and again",
                ));
            }
            // A refused message is named, so its sender can send it again later.
            let nonce = text.as_ref().and_then(|text| room::nonce_of(text.as_str()));
            let error = room::error(
                "rate_limited",
                "too many events; slow down",
                nonce.as_deref(),
            );
            return self.answer(&error).await;
        }
        if let Some(data) = binary {
            self.counters.bytes_received.increment(data.len() as u64);
            return match self.subscription.relay_binary(data) {
                Ok(()) => Step::Continue,
                Err(refused) => self.refuse(&refused, None).await,
            };
        }
        let text = text.expect("text or binary");
        self.counters.events_received.increment(1);
        self.counters.bytes_received.increment(text.len() as u64);
        match parse_client_event(text.as_str(), self.state.config.max_text_chars) {
            Ok(ClientEvent::Message { text, data, nonce }) => self.publish(text, data, nonce).await,
            Ok(ClientEvent::Typing { is_typing }) => match self.subscription.typing(is_typing) {
                Ok(()) => {
                    // Each "typing" restarts the expiry; "stopped" ends it.
                    let expiry = Duration::from_millis(self.state.config.typing_expiry_ms.max(1));
                    self.typing_until = is_typing.then(|| Instant::now() + expiry);
                    Step::Continue
                }
                Err(refused) => self.refuse(&refused, None).await,
            },
            Err(refused) => {
                let error = room::error(refused.code, &refused.message, refused.nonce.as_deref());
                self.answer(&error).await
            }
        }
    }

    async fn publish(
        &mut self,
        text: Option<String>,
        data: Option<serde_json::Value>,
        nonce: Option<String>,
    ) -> Step {
        let data = match data.as_ref().map(to_raw_value).transpose() {
            Ok(data) => data,
            Err(cause) => {
                let error = room::error("bad_event", &cause.to_string(), nonce.as_deref());
                return self.answer(&error).await;
            }
        };
        let named = nonce.clone();
        let draft = Draft {
            text,
            data,
            event: None,
            nonce,
            client: None,
            client_info: None,
        };
        // The sender's acknowledgement is the delivery of its own message.
        match self.subscription.publish(draft).await {
            Ok(_receipt) => Step::Continue,
            Err(refused) => self.refuse(&refused, named.as_deref()).await,
        }
    }

    /// The `error` event for what the engine refused: `forbidden` by the channel's
    /// options, else `unavailable` (to be sent again).
    async fn refuse(&mut self, refused: &EngineError, nonce: Option<&str>) -> Step {
        let error = match refused {
            EngineError::Forbidden(why) => room::error("forbidden", why, nonce),
            other => {
                warn!(cause = %other, "posting a message failed");
                room::unavailable(nonce)
            }
        };
        self.answer(&error).await
    }

    async fn answer(&mut self, event: &Bytes) -> Step {
        match self.socket.feed_frame(OpCode::Text, event).await {
            Ok(()) => Step::Continue,
            Err(cause) => {
                debug!(%cause, "room connection ended while answering");
                Step::End
            }
        }
    }
}
