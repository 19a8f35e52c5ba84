//! The task that owns the connection: connects, reconnects with backoff, resumes after
//! the last message seen, and sends queued messages until the server acknowledges them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::SeedableRng;
use switchboard_net::wire::deflate::DeflateConfig;
use switchboard_net::wire::handshake::HandshakeError;
use switchboard_net::wire::OpCode;
use switchboard_net::Stream;
use switchboard_net::{ClientOptions, CloseCode, CloseFrame, Message, WebSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::debug;

use crate::event::{Event, Incoming, Limits, State, Welcome};
use crate::options::{room_url, Options};
use crate::Error;

/// Requests from the handles to the task.
#[derive(Debug)]
pub(crate) enum Command {
    Message { nonce: String, json: String },
    Typing(bool),
    Binary(Bytes),
    Text(String),
    Close(oneshot::Sender<()>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `/room/{room}`: typed events, resume, acknowledged messages.
    Room,
    /// Any endpoint: messages in and out as they are.
    Raw,
}

/// State the handles read.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Messages not yet acknowledged (or dropped) by the task.
    pub(crate) queued: AtomicUsize,
}

/// A message waiting for the server's acknowledgement.
#[derive(Debug)]
struct Pending {
    nonce: String,
    json: String,
}

/// How a connection ended.
enum End {
    /// `close()` was called, or every handle was dropped.
    Closed,
    Lost {
        error: Error,
        /// Retrying cannot help (a 4xx answer, an invalid URL).
        permanent: bool,
        /// The server closed with a close handshake.
        clean: bool,
        /// When the connection came up (welcomed, for a room), if it did.
        since: Option<Instant>,
    },
}

impl End {
    fn lost(error: impl Into<Error>, since: Instant) -> Self {
        let error = error.into();
        Self::Lost {
            permanent: is_permanent(&error),
            error,
            clean: false,
            since: Some(since),
        }
    }

    /// A failure before the connection came up.
    fn failed(error: Error) -> Self {
        Self::Lost {
            permanent: is_permanent(&error),
            error,
            clean: false,
            since: None,
        }
    }
}

/// A connection that stayed up this long starts the backoff over when lost; one lost
/// sooner (a server that accepts, then drops) keeps it growing.
const STABLE: Duration = Duration::from_secs(10);

/// Whether reconnecting cannot help.
fn is_permanent(error: &Error) -> bool {
    match error {
        Error::Net(switchboard_net::Error::InvalidUrl { .. }) => true,
        Error::Net(switchboard_net::Error::Handshake(HandshakeError::UnexpectedStatus {
            status,
            ..
        })) => (400..500).contains(status) && !matches!(status, 408 | 429),
        _ => false,
    }
}

/// Client-side pacing under the rate limit a room announces, with a margin so bursts
/// bunched up by the network still fit the server's bucket.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn for_limits(limits: &Limits) -> Option<Self> {
        if !(limits.events_per_sec.is_finite() && limits.events_per_sec > 0.0) {
            return None;
        }
        let burst = (f64::from(limits.burst) / 2.0).floor().max(1.0);
        Some(Self {
            rate: limits.events_per_sec * 0.9,
            burst,
            tokens: burst,
            at: Instant::now(),
        })
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn ready_at(&self) -> Instant {
        // Bounded, whatever rate a server announces.
        let wait = ((1.0 - self.tokens) / self.rate).clamp(0.001, 60.0);
        self.at + Duration::from_secs_f64(wait)
    }
}

/// Binary messages a room client holds while pacing before it drops the oldest.
const RELAY_QUEUE: usize = 1024;

/// How long to wait for the server's Close after ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a refused-for-now message waits before it is sent again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

pub(crate) struct Driver {
    url: String,
    options: Options,
    mode: Mode,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Every handle is gone: close once the queue is acknowledged.
    handles_gone: bool,
    /// A close was asked for (or every handle dropped): the deadline for the messages
    /// already sent to be acknowledged before the Close goes out regardless.
    closing: Option<Instant>,
    events: mpsc::Sender<Event>,
    shared: Arc<Shared>,
    rng: StdRng,
    /// The last message id delivered (rooms): the resume point.
    last_id: Option<u64>,
    /// The room's last id when first joined, the resume point until a message arrives.
    joined_at: Option<u64>,
    /// The name the server knows us by; our own messages acknowledge pending ones.
    user: Option<String>,
    /// Messages not yet acknowledged, in the order they were sent.
    pending: VecDeque<Pending>,
    /// How many of `pending` (from the front) went out on this connection.
    in_flight: usize,
    bucket: Option<Bucket>,
    /// A refused-for-now message holds the queue until then.
    paused_until: Option<Instant>,
    /// When the queue waits for the bucket or the pause.
    blocked_until: Option<Instant>,
    /// Raw messages waiting for a connection.
    outbox: VecDeque<Message>,
    /// Binary data to relay in a room, paced with the messages.
    relay: VecDeque<Bytes>,
    /// Callers of `close()` waiting for the end.
    closers: Vec<oneshot::Sender<()>>,
}

impl Driver {
    pub(crate) fn new(
        url: String,
        options: Options,
        mode: Mode,
        commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::Sender<Event>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            url,
            mode,
            commands,
            handles_gone: false,
            closing: None,
            events,
            shared,
            rng: StdRng::from_os_rng(),
            last_id: None,
            joined_at: None,
            user: None,
            pending: VecDeque::new(),
            in_flight: 0,
            bucket: None,
            paused_until: None,
            blocked_until: None,
            outbox: VecDeque::new(),
            relay: VecDeque::new(),
            closers: Vec::new(),
            options,
        }
    }

    /// Runs until closed. `first` learns whether the first connection came up; if it
    /// did not, the task ends there (the caller gets the error instead of retries).
    pub(crate) async fn run(mut self, first: oneshot::Sender<Result<(), Error>>) {
        let mut first = Some(first);
        let mut attempt: u32 = 0;
        loop {
            self.emit(Event::State(State::Connecting { attempt })).await;
            let (error, permanent, clean) = match self.session(&mut first).await {
                End::Closed => return self.finish("closed".into(), false).await,
                End::Lost {
                    error,
                    permanent,
                    clean,
                    since,
                } => {
                    if since.is_some_and(|up| up.elapsed() >= STABLE) {
                        attempt = 0;
                    }
                    (error, permanent, clean)
                }
            };
            if self.closing.is_some() {
                // Closing anyway: what was not acknowledged by now will not be.
                return self.finish("closed".into(), false).await;
            }
            if let Some(first) = first.take() {
                // The caller of `connect` gets the reason; nobody holds a handle yet.
                let _ = first.send(Err(error));
                return;
            }
            attempt += 1;
            let reason = error.to_string();
            if permanent || !self.options.reconnect || !self.options.backoff.allows(attempt) {
                return self.finish(reason, !clean || permanent).await;
            }
            let delay = self.options.backoff.delay(attempt, &mut self.rng);
            debug!(attempt, ?delay, %reason, "connection lost; reconnecting");
            self.emit(Event::State(State::Reconnecting {
                attempt,
                delay,
                reason,
            }))
            .await;
            if let Some(End::Closed) = self.wait(delay).await {
                return self.finish("closed".into(), false).await;
            }
        }
    }

    async fn finish(mut self, reason: String, failed: bool) {
        // Sends from here on fail instead of vanishing into a queue nobody reads.
        self.commands.close();
        self.shared.queued.store(0, Ordering::Relaxed);
        // Callers of `close()` are answered first: they may not be reading events.
        for closer in self.closers.drain(..) {
            let _ = closer.send(());
        }
        let _ = self
            .events
            .try_send(Event::State(State::Closed { reason, failed }));
    }

    /// Delivers an event; waits while the application's queue is full (the server then
    /// holds the rest, and closes a connection that falls too far behind, to be resumed).
    /// While closing, it waits no longer than the close deadline: a caller of `close()`
    /// may not be reading.
    async fn emit(&mut self, event: Event) {
        // Nobody listening is not an error: the handles may still send.
        match self.closing {
            None => {
                let _ = self.events.send(event).await;
            }
            Some(deadline) => {
                let deadline = deadline.max(Instant::now()) + CLOSE_TIMEOUT;
                let _ = timeout(deadline - Instant::now(), self.events.send(event)).await;
            }
        }
    }

    /// Sleeps between attempts, queuing what is sent meanwhile.
    async fn wait(&mut self, delay: Duration) -> Option<End> {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                () = sleep_until(until) => return None,
                command = self.commands.recv(), if !self.handles_gone => {
                    if let Some(end) = self.offline(command) {
                        return Some(end);
                    }
                }
            }
        }
    }

    /// A command while there is no connection.
    fn offline(&mut self, command: Option<Command>) -> Option<End> {
        match command {
            None => {
                self.handles_gone = true;
                Some(End::Closed)
            }
            Some(Command::Close(reply)) => {
                self.closers.push(reply);
                Some(End::Closed)
            }
            Some(Command::Message { nonce, json }) => {
                self.pending.push_back(Pending { nonce, json });
                None
            }
            Some(Command::Text(text)) => {
                self.outbox.push_back(Message::Text(text.into()));
                None
            }
            Some(Command::Binary(data)) if self.mode == Mode::Raw => {
                self.outbox.push_back(Message::Binary(data));
                None
            }
            // Typing and relayed binary data are of the moment: not kept for later.
            Some(Command::Binary(_) | Command::Typing(_)) => None,
        }
    }

    fn client_options(&self) -> ClientOptions {
        let mut options = ClientOptions::default();
        let deflate = self
            .options
            .compression
            .then(|| DeflateConfig::default().with_no_context_takeover(true));
        options.config = options
            .config
            .with_deflate(deflate)
            .with_ping_interval(Some(self.options.ping_interval))
            .with_pong_timeout(self.options.pong_timeout);
        options.connect_timeout = self.options.connect_timeout;
        options.headers = self.options.headers.clone();
        options.tls = self.options.tls.clone();
        if let Some(token) = &self.options.token {
            options
                .headers
                .push(("Authorization".into(), format!("Bearer {token}")));
        }
        options
    }

    fn connect_url(&self) -> String {
        match self.mode {
            Mode::Raw => self.url.clone(),
            Mode::Room => {
                let since = self.last_id.or(self.joined_at).or(self.options.since);
                room_url(&self.url, self.options.name.as_deref(), since)
            }
        }
    }

    /// One connection, from opening it to losing it.
    async fn session(&mut self, first: &mut Option<oneshot::Sender<Result<(), Error>>>) -> End {
        let url = self.connect_url();
        let connecting = switchboard_net::connect(&url, self.client_options());
        tokio::pin!(connecting);
        let mut socket = loop {
            tokio::select! {
                connected = &mut connecting => match connected {
                    Ok(connected) => break connected.socket,
                    Err(error) => return End::failed(Error::Net(error)),
                },
                command = self.commands.recv(), if !self.handles_gone => {
                    if let Some(end) = self.offline(command) {
                        return end;
                    }
                }
            }
        };
        if self.mode == Mode::Room {
            if let Err(error) = self.welcome(&mut socket).await {
                return End::failed(error);
            }
        }
        let up = Instant::now();
        self.emit(Event::State(State::Connected)).await;
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        // Everything unacknowledged goes again, in order: the server stores a nonce it
        // already has only once, and acknowledges it again. Relayed data of the moment
        // that did not go out before the loss is stale now.
        self.in_flight = 0;
        self.relay.clear();
        while let Some(message) = self.outbox.pop_front() {
            if let Err(error) = socket.feed(&message).await {
                return End::lost(error, up);
            }
        }
        // Once our Close went out: when to stop waiting for the server's.
        let mut close_sent: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if close_sent.is_none() {
                if let Err(error) = self.pump(&mut socket).await {
                    return End::lost(error, up);
                }
                if self
                    .closing
                    .is_some_and(|deadline| self.pending.is_empty() || now >= deadline)
                {
                    // Messages still in flight from the server keep arriving until its Close.
                    let frame = CloseFrame::new(CloseCode::NORMAL, "");
                    if let Err(cause) = socket.start_close(Some(frame)).await {
                        debug!(%cause, "starting the close handshake");
                        return End::Closed;
                    }
                    close_sent = Some(now + CLOSE_TIMEOUT);
                }
            } else if close_sent.is_some_and(|deadline| now >= deadline) {
                return End::Closed;
            }
            let wake = match close_sent {
                // Only the server's Close (or the end of waiting for it) matters now.
                Some(deadline) => Some(deadline),
                None => [self.blocked_until, self.closing]
                    .into_iter()
                    .flatten()
                    .min(),
            };
            tokio::select! {
                biased;
                command = self.commands.recv(), if !self.handles_gone && close_sent.is_none() => match command {
                    None => {
                        self.handles_gone = true;
                        self.start_closing();
                    }
                    Some(Command::Close(reply)) => {
                        self.closers.push(reply);
                        self.start_closing();
                    }
                    Some(Command::Message { nonce, json }) => self.pending.push_back(Pending { nonce, json }),
                    Some(Command::Typing(is_typing)) => {
                        if self.bucket.as_mut().map_or(true, |b| b.take(Instant::now())) {
                            let json = format!(r#"{{"type":"typing","isTyping":{is_typing}}}"#);
                            if let Err(error) = socket.feed_frame(OpCode::Text, json.as_bytes()).await {
                                return End::lost(error, up);
                            }
                        }
                    }
                    Some(Command::Binary(data)) if self.mode == Mode::Room => {
                        if self.relay.len() >= RELAY_QUEUE {
                            debug!("relay queue full: dropping the oldest binary message");
                            self.relay.pop_front();
                        }
                        self.relay.push_back(data);
                    }
                    Some(Command::Binary(data)) => {
                        if let Err(error) = socket.feed_frame(OpCode::Binary, &data).await {
                            return End::lost(error, up);
                        }
                    }
                    Some(Command::Text(text)) => {
                        if let Err(error) = socket.feed_frame(OpCode::Text, text.as_bytes()).await {
                            return End::lost(error, up);
                        }
                    }
                },
                received = socket.recv() => match received {
                    Ok(Some(Message::Text(text))) => match self.mode {
                        Mode::Room => self.on_room_event(text.as_str()).await,
                        Mode::Raw => self.emit(Event::Text(text.as_str().to_owned())).await,
                    },
                    Ok(Some(Message::Binary(data))) => self.emit(Event::Binary(data)).await,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) if close_sent.is_some() => return End::Closed,
                    Ok(None) => {
                        let reason = socket.peer_close().map_or_else(
                            || "the server closed the connection".to_owned(),
                            |f| format!("the server closed the connection: {} {}", f.code, f.reason),
                        );
                        return End::Lost { error: Error::Room(reason), permanent: false, clean: true, since: Some(up) };
                    }
                    Err(error) => return End::lost(error, up),
                },
                () = async { sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {}
            }
        }
    }

    /// Waits for the room's welcome (bounded) and takes its news.
    async fn welcome(&mut self, socket: &mut WebSocket<Stream>) -> Result<(), Error> {
        let first = match timeout(self.options.connect_timeout, socket.recv()).await {
            Err(_) => return Err(Error::Room("no welcome from the room in time".into())),
            Ok(Err(error)) => return Err(error.into()),
            Ok(Ok(None)) => {
                let why = socket
                    .peer_close()
                    .map_or_else(String::new, |f| format!(": {} {}", f.code, f.reason));
                return Err(Error::Room(format!(
                    "the server closed the connection before the welcome{why}"
                )));
            }
            Ok(Ok(Some(message))) => message,
        };
        let welcome = match &first {
            Message::Text(text) => serde_json::from_str::<Incoming>(text.as_str()).ok(),
            _ => None,
        };
        let Some(Incoming::Welcome(mut welcome)) = welcome else {
            return Err(Error::Room(
                "the server did not start with a welcome: is this a room URL?".into(),
            ));
        };
        self.on_welcome(&mut welcome);
        self.emit(Event::Welcome(welcome)).await;
        Ok(())
    }

    fn on_welcome(&mut self, welcome: &mut Welcome) {
        welcome.resumed_after = self.last_id.or(self.joined_at);
        if let Some(seen) = self.last_id {
            if welcome.last_id < seen {
                // The room's history was reset (a server keeping it in memory restarted):
                // its ids start again, and must not be taken for ones already seen.
                debug!(seen, now = welcome.last_id, "room history restarted");
                self.last_id = Some(welcome.last_id);
                welcome.resumed_after = Some(welcome.last_id);
            }
        }
        if self.joined_at.is_none() && self.options.since.is_none() {
            self.joined_at = Some(welcome.last_id);
        }
        self.user = Some(welcome.user.clone());
        self.bucket = welcome.limits.as_ref().and_then(Bucket::for_limits);
        self.paused_until = None;
    }

    async fn on_room_event(&mut self, text: &str) {
        let event = match serde_json::from_str::<Incoming>(text) {
            Ok(Incoming::Message(message)) => {
                if let Some(nonce) = &message.nonce {
                    if self.user.as_deref() == Some(message.from.as_str()) {
                        self.acknowledge(nonce);
                    }
                }
                if self.last_id.is_some_and(|seen| message.id <= seen) {
                    // Replayed after a reconnection, or acknowledged again: seen already.
                    return;
                }
                self.last_id = Some(message.id);
                Event::Message(message)
            }
            Ok(Incoming::Error(error)) => {
                let queued = error
                    .nonce
                    .as_ref()
                    .and_then(|n| self.pending.iter().position(|p| &p.nonce == n));
                if let Some(index) = queued {
                    if matches!(error.code.as_str(), "rate_limited" | "unavailable") {
                        // Refused for now: it and what followed it go again shortly.
                        debug!(code = error.code, "message refused for now; retrying");
                        self.in_flight = self.in_flight.min(index);
                        self.paused_until = Some(Instant::now() + RETRY_PAUSE);
                        return;
                    }
                    self.remove(index);
                }
                Event::Error(error)
            }
            Ok(Incoming::Typing { user, is_typing }) => Event::Typing { user, is_typing },
            Ok(Incoming::Join { user }) => Event::Join { user },
            Ok(Incoming::Leave { user }) => Event::Leave { user },
            Ok(Incoming::Welcome(_)) => return,
            Err(_) => Event::Unknown(text.to_owned()),
        };
        self.emit(event).await;
    }

    fn acknowledge(&mut self, nonce: &str) {
        if let Some(index) = self.pending.iter().position(|p| p.nonce == nonce) {
            self.remove(index);
        }
    }

    fn remove(&mut self, index: usize) {
        self.pending.remove(index);
        if index < self.in_flight {
            self.in_flight -= 1;
        }
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
    }

    fn start_closing(&mut self) {
        // Messages already sent get their acknowledgement first, within bounds.
        self.closing
            .get_or_insert(Instant::now() + self.options.connect_timeout);
    }

    /// Sends relayed data and queued messages, as many as the window and the room's
    /// pace allow (the server counts both against its rate limit).
    async fn pump(&mut self, socket: &mut WebSocket<Stream>) -> Result<(), Error> {
        self.blocked_until = None;
        let now = Instant::now();
        while let Some(data) = self.relay.front() {
            if let Some(bucket) = self.bucket.as_mut() {
                if !bucket.take(now) {
                    self.blocked_until = Some(bucket.ready_at());
                    socket.flush().await?;
                    return Ok(());
                }
            }
            socket.feed_frame(OpCode::Binary, data).await?;
            self.relay.pop_front();
        }
        match self.paused_until {
            Some(until) if now < until => self.blocked_until = Some(until),
            _ => {
                self.paused_until = None;
                while self.in_flight < self.pending.len()
                    && self.in_flight < self.options.max_in_flight.max(1)
                {
                    if let Some(bucket) = self.bucket.as_mut() {
                        if !bucket.take(now) {
                            self.blocked_until = Some(bucket.ready_at());
                            break;
                        }
                    }
                    let json = &self.pending[self.in_flight].json;
                    socket.feed_frame(OpCode::Text, json.as_bytes()).await?;
                    self.in_flight += 1;
                }
            }
        }
        socket.flush().await?;
        Ok(())
    }
}
