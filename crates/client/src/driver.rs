//! The task that owns the connection: connects, reconnects with backoff, resumes after
//! the last message seen, and sends queued messages until the server acknowledges them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::SeedableRng;
use switchboard_net::bucket::TokenBucket;
use switchboard_net::wire::deflate::DeflateConfig;
use switchboard_net::wire::handshake::HandshakeError;
use switchboard_net::wire::OpCode;
use switchboard_net::Stream;
use switchboard_net::{ClientOptions, CloseCode, CloseFrame, Message, WebSocket};
use switchboard_protocol::room::{ClientEvent, ServerEvent};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::debug;

use crate::event::{Event, Limits, Resumed, State, Welcome};
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
fn pacing(limits: &Limits) -> Option<TokenBucket> {
    if !(limits.events_per_sec.is_finite() && limits.events_per_sec > 0.0) {
        return None;
    }
    let burst = (f64::from(limits.burst) / 2.0).floor().max(1.0);
    Some(TokenBucket::new(
        limits.events_per_sec * 0.9,
        burst,
        Instant::now().into_std(),
    ))
}

/// Takes a token from `bucket` (unpaced without one).
fn paced(bucket: &mut Option<TokenBucket>, now: Instant) -> bool {
    bucket.as_mut().map_or(true, |b| b.take(now.into_std()))
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
    /// The epoch of the room's stream the resume point belongs to.
    epoch: Option<String>,
    /// The name the server knows us by; our own messages acknowledge pending ones.
    user: Option<String>,
    /// Messages not yet acknowledged, in the order they were sent.
    pending: VecDeque<Pending>,
    /// How many of `pending` (from the front) went out on this connection.
    in_flight: usize,
    bucket: Option<TokenBucket>,
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
            epoch: None,
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
                room_url(
                    &self.url,
                    self.options.name.as_deref(),
                    since,
                    self.epoch.as_deref(),
                )
            }
        }
    }

    /// One connection, from opening it to losing it.
    async fn session(&mut self, first: &mut Option<oneshot::Sender<Result<(), Error>>>) -> End {
        let mut socket = match self.open().await {
            Ok(socket) => socket,
            Err(end) => return end,
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
        if let Err(error) = self.send_again(&mut socket).await {
            return End::lost(error, up);
        }
        self.live(&mut socket, up).await
    }

    /// Connects, queuing what is sent meanwhile.
    async fn open(&mut self) -> Result<WebSocket<Stream>, End> {
        let url = self.connect_url();
        let connecting = switchboard_net::connect(&url, self.client_options());
        tokio::pin!(connecting);
        loop {
            tokio::select! {
                connected = &mut connecting => return match connected {
                    Ok(connected) => Ok(connected.socket),
                    Err(error) => Err(End::failed(Error::Net(error))),
                },
                command = self.commands.recv(), if !self.handles_gone => {
                    if let Some(end) = self.offline(command) {
                        return Err(end);
                    }
                }
            }
        }
    }

    /// Everything unacknowledged goes again, in order: the server stores a nonce it
    /// already has only once, and acknowledges it again. Relayed data of the moment
    /// that did not go out before the loss is stale now.
    async fn send_again(
        &mut self,
        socket: &mut WebSocket<Stream>,
    ) -> Result<(), switchboard_net::Error> {
        self.in_flight = 0;
        self.relay.clear();
        while let Some(message) = self.outbox.pop_front() {
            socket.feed(&message).await?;
        }
        Ok(())
    }

    /// Relays both ways until the connection ends.
    async fn live(&mut self, socket: &mut WebSocket<Stream>, up: Instant) -> End {
        // Once our Close went out: when to stop waiting for the server's.
        let mut close_sent: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if close_sent.is_none() {
                if let Err(error) = self.pump(socket).await {
                    return End::lost(error, up);
                }
                match self.close_if_done(socket, now).await {
                    Ok(sent) => close_sent = sent,
                    Err(end) => return end,
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
                command = self.commands.recv(), if !self.handles_gone && close_sent.is_none() => {
                    if let Err(error) = self.on_command(socket, command).await {
                        return End::lost(error, up);
                    }
                }
                received = socket.recv() => {
                    if let Some(end) = self.on_received(socket, received, close_sent.is_some(), up).await {
                        return end;
                    }
                }
                () = async { sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {}
            }
        }
    }

    /// Starts the close handshake once closing was asked for and the messages sent are
    /// acknowledged (or their time is up); the deadline for the server's Close then.
    async fn close_if_done(
        &mut self,
        socket: &mut WebSocket<Stream>,
        now: Instant,
    ) -> Result<Option<Instant>, End> {
        let done = self
            .closing
            .is_some_and(|deadline| self.pending.is_empty() || now >= deadline);
        if !done {
            return Ok(None);
        }
        // Messages still in flight from the server keep arriving until its Close.
        let frame = CloseFrame::new(CloseCode::NORMAL, "");
        if let Err(cause) = socket.start_close(Some(frame)).await {
            debug!(%cause, "starting the close handshake");
            return Err(End::Closed);
        }
        Ok(Some(now + CLOSE_TIMEOUT))
    }

    /// A command while connected.
    async fn on_command(
        &mut self,
        socket: &mut WebSocket<Stream>,
        command: Option<Command>,
    ) -> Result<(), switchboard_net::Error> {
        match command {
            None => {
                self.handles_gone = true;
                self.start_closing();
            }
            Some(Command::Close(reply)) => {
                self.closers.push(reply);
                self.start_closing();
            }
            Some(Command::Message { nonce, json }) => {
                self.pending.push_back(Pending { nonce, json })
            }
            Some(Command::Typing(is_typing)) => {
                if paced(&mut self.bucket, Instant::now()) {
                    let json = serde_json::to_string(&ClientEvent::Typing { is_typing })
                        .expect("events serialize");
                    socket.feed_frame(OpCode::Text, json.as_bytes()).await?;
                }
            }
            Some(Command::Binary(data)) if self.mode == Mode::Room => {
                if self.relay.len() >= RELAY_QUEUE {
                    debug!("relay queue full: dropping the oldest binary message");
                    self.relay.pop_front();
                }
                self.relay.push_back(data);
            }
            Some(Command::Binary(data)) => socket.feed_frame(OpCode::Binary, &data).await?,
            Some(Command::Text(text)) => socket.feed_frame(OpCode::Text, text.as_bytes()).await?,
        }
        Ok(())
    }

    /// What the server sent; `Some` when the connection ended.
    async fn on_received(
        &mut self,
        socket: &WebSocket<Stream>,
        received: Result<Option<Message>, switchboard_net::Error>,
        closing: bool,
        up: Instant,
    ) -> Option<End> {
        match received {
            Ok(Some(Message::Text(text))) => match self.mode {
                Mode::Room => self.on_room_event(text.as_str()).await,
                Mode::Raw => self.emit(Event::Text(text.as_str().to_owned())).await,
            },
            Ok(Some(Message::Binary(data))) => self.emit(Event::Binary(data)).await,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) if closing => return Some(End::Closed),
            Ok(None) => {
                let reason = socket.peer_close().map_or_else(
                    || "the server closed the connection".to_owned(),
                    |f| format!("the server closed the connection: {} {}", f.code, f.reason),
                );
                return Some(End::Lost {
                    error: Error::Room(reason),
                    permanent: false,
                    clean: true,
                    since: Some(up),
                });
            }
            Err(error) => return Some(End::lost(error, up)),
        }
        None
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
            Message::Text(text) => ServerEvent::parse(text.as_str()).ok().flatten(),
            _ => None,
        };
        let Some(ServerEvent::Welcome(welcome)) = welcome else {
            return Err(Error::Room(
                "the server did not start with a welcome: is this a room URL?".into(),
            ));
        };
        let welcome = welcome.into_owned();
        let resumed = self.on_welcome(&welcome);
        self.emit(Event::Welcome { welcome, resumed }).await;
        Ok(())
    }

    /// Takes the welcome's news; where the connection resumed, if it did.
    fn on_welcome(&mut self, welcome: &Welcome) -> Option<Resumed> {
        let resumed_after = self.last_id.or(self.joined_at).or(self.options.since);
        let other_epoch = !welcome.epoch.is_empty()
            && self
                .epoch
                .as_ref()
                .is_some_and(|epoch| *epoch != welcome.epoch);
        // A server from before epochs whose history was reset (kept in memory and
        // restarted) shows it by ids that went back.
        let went_back = self.last_id.is_some_and(|seen| welcome.last_id < seen);
        if other_epoch || went_back {
            // The room's history was reset: its ids start again, and the newest of the
            // new history follow; none of them must be taken for ones already seen.
            debug!(seen = ?self.last_id, now = welcome.last_id, "room history restarted");
            self.last_id = None;
            self.joined_at = Some(welcome.last_id);
        }
        if !welcome.epoch.is_empty() {
            self.epoch = Some(welcome.epoch.clone());
        }
        if self.joined_at.is_none() && self.options.since.is_none() {
            self.joined_at = Some(welcome.last_id);
        }
        self.user = Some(welcome.user.clone());
        self.bucket = welcome.limits.as_ref().and_then(pacing);
        self.paused_until = None;
        resumed_after.map(|after| Resumed {
            after,
            complete: welcome.recovered != Some(false) && !other_epoch && !went_back,
        })
    }

    async fn on_room_event(&mut self, text: &str) {
        let event = match ServerEvent::parse(text) {
            Ok(Some(ServerEvent::Message(message))) => {
                let message = message.into_owned();
                if let (Some(nonce), Some(from)) = (&message.nonce, &message.from) {
                    if self.user.as_deref() == Some(from.as_str()) {
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
            Ok(Some(ServerEvent::Error(error))) => {
                let error = error.into_owned();
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
            Ok(Some(ServerEvent::Typing(typing))) => Event::Typing {
                user: typing.user.clone(),
                is_typing: typing.is_typing,
            },
            Ok(Some(ServerEvent::Join(presence))) => Event::Join {
                user: presence.user.clone(),
            },
            Ok(Some(ServerEvent::Leave(presence))) => Event::Leave {
                user: presence.user.clone(),
            },
            Ok(Some(ServerEvent::Welcome(_))) => return,
            Ok(None) | Err(_) => Event::Unknown(text.to_owned()),
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
            if !paced(&mut self.bucket, now) {
                self.blocked_until = self
                    .bucket
                    .as_ref()
                    .map(|b| Instant::from_std(b.ready_at()));
                socket.flush().await?;
                return Ok(());
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
                    if !paced(&mut self.bucket, now) {
                        self.blocked_until = self
                            .bucket
                            .as_ref()
                            .map(|b| Instant::from_std(b.ready_at()));
                        break;
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
