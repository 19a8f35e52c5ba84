//! One Centrifugo connection: `connect` first (a token, or anonymous in open mode), then
//! commands and pushes until one side closes.
//!
//! Every subscription of the connection delivers into one [`Inbox`]; publications are
//! encoded once per channel and format ([`switchboard_engine::Delivery`]). The server
//! pings every `ping_interval_secs` (an empty reply) and closes with 3012 a client whose
//! pong has not come by the next ping. A disconnect is the WebSocket close code and
//! reason, as the protocol's WebSocket transport has it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;
use switchboard_engine::{names, Draft, Ended, EngineError, Inbox, Outbound, Resume, Subscription};
use switchboard_net::bucket::TokenBucket;
use switchboard_net::wire::OpCode;
use switchboard_net::Message;
use switchboard_protocol::centrifuge::{
    self as proto, decode_commands, encode_reply, Command, Encoding, Reply,
};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::clients::{Control, Mailbox, Registration};
use super::transport::Transport;
use super::{codes, disconnect, format_of, publication, push_of, unsubscribe, VERSION};
use crate::auth::{verify, DoorClaims, TokenRefused};
use crate::metrics::Counters;
use crate::serve::AppState;

/// Commands one frame may hold.
const MAX_COMMANDS_PER_FRAME: usize = 1024;

/// Publications one subscribe reply recovers at most; beyond, it says `recovered:
/// false` (the rest is in history).
const MAX_RECOVERED: usize = 1000;

/// Publications one history call returns at most.
const MAX_HISTORY: usize = 1000;

/// Bytes of publications one reply (a subscribe's recovered ones, a history page) holds
/// at most, whatever their count: a reply is built whole before it is written.
const MAX_REPLY_BYTES: usize = 4 << 20;

/// Events written in one go before the session reads its socket again.
const MAX_DRAIN: usize = 256;

/// Connect commands refused (an expired token) before the connection is closed.
const MAX_CONNECT_REFUSALS: u32 = 3;

/// What a publication adds to a reply, roughly.
fn reply_bytes(publication: &proto::Publication) -> usize {
    64 + publication.data.len()
        + publication.info.as_ref().map_or(0, |info| {
            info.user.len() + info.client.len() + info.conn_info.len()
        })
}

/// What ends a session.
type Disconnect = (u16, &'static str);

/// A failed command: its error code (the message is the specification's).
type Failure = u32;

/// Runs a connection to its end.
pub(super) async fn run(transport: Transport, encoding: Encoding, state: AppState) {
    metrics::gauge!("switchboard_centrifuge_connections").increment(1.0);
    let mut session = Session::new(transport, encoding, state);
    let ending = session.serve().await;
    session.drop_subscriptions();
    if let Some((code, reason)) = ending {
        metrics::counter!("switchboard_centrifuge_disconnects_total", "code" => code.to_string())
            .increment(1);
        if let Err(cause) = Box::pin(session.socket.close(encoding, (code, reason))).await {
            debug!(%cause, "centrifuge close handshake");
        }
    }
    metrics::gauge!("switchboard_centrifuge_connections").decrement(1.0);
}

/// One subscription of the connection.
struct Sub {
    channel: String,
    subscription: Subscription,
    /// Whether the client asked for join and leave pushes.
    join_leave: bool,
    /// When its subscription token expires (seconds since the epoch).
    expires: Option<u64>,
}

struct Session {
    socket: Transport,
    encoding: Encoding,
    state: AppState,
    client: String,
    user: String,
    /// When the connection token expires (seconds since the epoch).
    expires: Option<u64>,
    /// The token's `info`: what others see of this connection.
    info: Option<Box<RawValue>>,
    inbox: Inbox,
    /// Subscriptions by key (what tags their events in the inbox).
    subs: HashMap<u64, Sub>,
    /// Subscription keys by channel.
    channels: HashMap<String, u64>,
    limit: TokenBucket,
    strikes: u32,
    /// Pings sent in a row without a pong since.
    unanswered_pings: u32,
    /// Connects refused so far.
    connect_refusals: u32,
    counters: Counters,
    registration: Option<Registration>,
}

/// Seconds until `exp` (seconds since the epoch), as a reply's `ttl`.
fn ttl_of(exp: u64) -> u32 {
    u32::try_from(exp.saturating_sub(now_secs())).unwrap_or(u32::MAX)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error_reply(id: u32, code: Failure) -> Reply {
    metrics::counter!("switchboard_centrifuge_errors_total", "code" => code.to_string())
        .increment(1);
    Reply {
        id,
        error: Some(proto::Error {
            code,
            message: codes::message(code).to_owned(),
            temporary: matches!(code, codes::INTERNAL | codes::TOO_MANY_REQUESTS),
        }),
        ..Reply::default()
    }
}

/// The command's name, for metrics.
fn kind(command: &Command) -> &'static str {
    if command.connect.is_some() {
        "connect"
    } else if command.subscribe.is_some() {
        "subscribe"
    } else if command.unsubscribe.is_some() {
        "unsubscribe"
    } else if command.publish.is_some() {
        "publish"
    } else if command.presence.is_some() {
        "presence"
    } else if command.presence_stats.is_some() {
        "presence_stats"
    } else if command.history.is_some() {
        "history"
    } else if command.ping.is_some() {
        "ping"
    } else if command.send.is_some() {
        "send"
    } else if command.rpc.is_some() {
        "rpc"
    } else if command.refresh.is_some() {
        "refresh"
    } else if command.sub_refresh.is_some() {
        "sub_refresh"
    } else if proto::is_pong(command) {
        "pong"
    } else {
        "unknown"
    }
}

/// Counts a connection the WebSocket layer failed (a message over the limit: 1009).
fn count_failure(cause: &switchboard_net::Error) {
    if let switchboard_net::Error::Protocol(error) = cause {
        let code = error.close_code().0.to_string();
        metrics::counter!("switchboard_centrifuge_disconnects_total", "code" => code).increment(1);
    }
}

fn count_command(kind: &'static str) {
    metrics::counter!("switchboard_centrifuge_commands_total", "command" => kind).increment(1);
}

/// A fresh client id: 32 hex digits.
fn client_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut id = String::with_capacity(32);
    for _ in 0..2 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        id.push_str(&format!("{:016x}", hasher.finish()));
    }
    id
}

impl Session {
    fn new(socket: Transport, encoding: Encoding, state: AppState) -> Self {
        let config = &state.config;
        let limit = TokenBucket::new(
            config.commands_per_sec,
            f64::from(config.commands_burst.max(1)),
            std::time::Instant::now(),
        );
        let inbox = Inbox::new(config.outbound_queue);
        Self {
            socket,
            encoding,
            client: client_id(),
            user: String::new(),
            expires: None,
            info: None,
            inbox,
            subs: HashMap::new(),
            channels: HashMap::new(),
            limit,
            strikes: 0,
            unanswered_pings: 0,
            connect_refusals: 0,
            counters: Counters::new(),
            registration: None,
            state,
        }
    }

    fn opcode(&self) -> OpCode {
        match self.encoding {
            Encoding::Json => OpCode::Text,
            Encoding::Protobuf => OpCode::Binary,
        }
    }

    fn drop_subscriptions(&mut self) {
        // Out of presence now, not when the close handshake ends.
        self.registration = None;
        let count = self.subs.len();
        self.subs.clear();
        self.channels.clear();
        metrics::gauge!("switchboard_centrifuge_subscriptions").decrement(count as f64);
    }

    /// The session to its end: `Some` when the server closes it with that code.
    async fn serve(&mut self) -> Option<Disconnect> {
        // Boxed, as are the commands and controls below: the live loop's future (which
        // every idle connection holds) keeps room only for what it awaits often.
        let mailbox = match Box::pin(self.connect()).await {
            Ok(mailbox) => mailbox,
            Err(ending) => return ending,
        };
        self.live(mailbox).await
    }

    /// Reads until a `connect` command is served. `Err(None)`: the client left.
    async fn connect(&mut self) -> Result<Mailbox, Option<Disconnect>> {
        let stale = Duration::from_secs(self.state.config.handshake_timeout_secs.max(1));
        let deadline = Instant::now() + stale;
        loop {
            let message = tokio::select! {
                () = tokio::time::sleep_until(deadline) => return Err(Some(disconnect::STALE)),
                () = self.state.shutdown.stopping() => return Err(Some(disconnect::SHUTDOWN)),
                received = self.socket.recv() => match received {
                    Ok(Some(message)) => message,
                    Ok(None) => return Err(None),
                    Err(cause) => {
                        debug!(%cause, "centrifuge connection ended before connect");
                        count_failure(&cause);
                        return Err(None);
                    }
                },
            };
            let commands = self.commands_of(message).map_err(Some)?;
            let mut commands = commands.into_iter();
            let Some(first) = commands.next() else {
                continue;
            };
            let Some(request) = first.connect else {
                // Nothing but connect comes first.
                return Err(Some(disconnect::BAD_REQUEST));
            };
            count_command("connect");
            match self.on_connect(first.id, request).await {
                Ok((reply, mailbox)) => {
                    self.write(&encode_reply(self.encoding, &reply))
                        .await
                        .map_err(|_| None)?;
                    // Whatever came after connect in the same frame.
                    for command in commands {
                        self.on_command(command).await?;
                    }
                    self.socket.flush().await.map_err(|_| None)?;
                    return Ok(mailbox);
                }
                Err(ConnectRefused::Reply(code)) => {
                    self.connect_refusals += 1;
                    if self.connect_refusals >= MAX_CONNECT_REFUSALS {
                        return Err(Some(disconnect::INVALID_TOKEN));
                    }
                    let reply = error_reply(first.id, code);
                    self.write(&encode_reply(self.encoding, &reply))
                        .await
                        .map_err(|_| None)?;
                    self.socket.flush().await.map_err(|_| None)?;
                }
                Err(ConnectRefused::Disconnect(ending)) => return Err(Some(ending)),
            }
        }
    }

    /// The commands of one message; a malformed one ends the session (3501).
    fn commands_of(&self, message: Message) -> Result<Vec<Command>, Disconnect> {
        let bytes: Bytes = match message {
            Message::Text(text) => text.into_bytes(),
            Message::Binary(data) => data,
            _ => return Ok(Vec::new()),
        };
        self.counters.bytes_received.increment(bytes.len() as u64);
        decode_commands(self.encoding, &bytes, MAX_COMMANDS_PER_FRAME).map_err(|malformed| {
            debug!(%malformed, "a malformed centrifuge frame");
            disconnect::BAD_REQUEST
        })
    }

    async fn on_connect(
        &mut self,
        id: u32,
        request: proto::ConnectRequest,
    ) -> Result<(Reply, Mailbox), ConnectRefused> {
        let mut server_side = Vec::new();
        let mut info = Vec::new();
        if self.state.auth.requires_tokens() || !request.token.is_empty() {
            let claims = match verify(&self.state.auth, &request.token) {
                Ok(claims) => claims,
                Err(TokenRefused::Expired) => {
                    return Err(ConnectRefused::Reply(codes::TOKEN_EXPIRED))
                }
                Err(TokenRefused::Invalid(why)) => {
                    debug!(why, "centrifuge connect with an invalid token");
                    return Err(ConnectRefused::Disconnect(disconnect::INVALID_TOKEN));
                }
            };
            let Some(user) = claims
                .user()
                .filter(|u| switchboard_engine::valid_user_name(u))
            else {
                return Err(ConnectRefused::Disconnect(disconnect::INVALID_TOKEN));
            };
            self.user = user.to_owned();
            self.expires = Some(claims.exp);
            info = claims
                .info
                .as_ref()
                .map(|i| i.get().as_bytes().to_vec())
                .unwrap_or_default();
            self.info = claims.info;
            server_side = claims.channels;
        }
        let mailbox = Mailbox::new(self.inbox.waker());
        let registration =
            self.state
                .centrifuge_clients
                .register(&self.user, &self.client, info, mailbox.clone());
        self.registration = Some(registration);
        let mut subs = HashMap::new();
        for channel in server_side {
            if subs.contains_key(&channel) {
                continue;
            }
            let resume = request.subs.get(&channel);
            let recover = resume.is_some_and(|r| r.recover);
            let wanted = proto::SubscribeRequest {
                channel: channel.clone(),
                recover,
                offset: resume.map_or(0, |r| r.offset),
                epoch: resume.map(|r| r.epoch.clone()).unwrap_or_default(),
                ..proto::SubscribeRequest::default()
            };
            match self.subscribe(&wanted, None).await {
                Ok(result) => {
                    subs.insert(channel, result);
                }
                Err(code) => {
                    warn!(
                        channel,
                        code, "a server-side subscription from a token failed"
                    );
                }
            }
        }
        let ttl = self.expires.map(ttl_of);
        let reply = Reply {
            id,
            connect: Some(proto::ConnectResult {
                client: self.client.clone(),
                version: VERSION.to_owned(),
                expires: ttl.is_some(),
                ttl: ttl.unwrap_or(0),
                subs,
                ping: u32::try_from(self.state.config.ping_interval_secs.max(1))
                    .unwrap_or(u32::MAX),
                pong: true,
                // An emulated connection's later commands name these.
                session: self.socket.session().unwrap_or_default().to_owned(),
                node: self
                    .socket
                    .session()
                    .map(|_| self.state.engine.address().to_owned())
                    .unwrap_or_default(),
            }),
            ..Reply::default()
        };
        Ok((reply, mailbox))
    }

    /// Serves commands and pushes until one side closes.
    async fn live(&mut self, mailbox: Mailbox) -> Option<Disconnect> {
        let period = Duration::from_secs(self.state.config.ping_interval_secs.max(1));
        let mut pings = tokio::time::interval_at(Instant::now() + period, period);
        pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = self.state.shutdown.clone();
        let stopping = shutdown.stopping();
        tokio::pin!(stopping);
        loop {
            let step: Result<(), Option<Disconnect>> = tokio::select! {
                biased;
                () = &mut stopping => Err(Some(disconnect::SHUTDOWN)),
                // Events before the ping timer: a busy connection's timer is then not
                // polled for every event (its client hears from it anyway).
                event = self.inbox.recv() => match event {
                    Some((key, item)) => self.on_event(key, item).await,
                    // Woken: a control from the server API, or a member cut off.
                    None => Box::pin(self.on_wake(&mailbox)).await,
                },
                _ = pings.tick() => Box::pin(self.on_ping_tick()).await,
                received = self.socket.recv() => match received {
                    Ok(Some(message)) => self.on_message(message).await,
                    Ok(None) => Err(None),
                    Err(cause) => {
                        debug!(%cause, "centrifuge connection ended");
                        count_failure(&cause);
                        Err(None)
                    }
                },
            };
            if let Err(ending) = step {
                return ending;
            }
        }
    }

    async fn write(&mut self, frame: &[u8]) -> Result<(), Option<Disconnect>> {
        self.counters.bytes_sent.increment(frame.len() as u64);
        self.socket
            .feed_frame(self.opcode(), frame)
            .await
            .map_err(|cause| {
                debug!(%cause, "centrifuge connection ended while sending");
                None
            })
    }

    async fn flush(&mut self) -> Result<(), Option<Disconnect>> {
        self.socket.flush().await.map_err(|_| None)
    }

    async fn reply(&mut self, reply: &Reply) -> Result<(), Option<Disconnect>> {
        let frame = encode_reply(self.encoding, reply);
        self.write(&frame).await
    }

    async fn push(&mut self, push: proto::Push) -> Result<(), Option<Disconnect>> {
        let reply = Reply {
            push: Some(push),
            ..Reply::default()
        };
        self.reply(&reply).await
    }

    async fn on_ping_tick(&mut self) -> Result<(), Option<Disconnect>> {
        // The first unanswered tick may only mean the pong is still unread (the session
        // was busy); the second one is a client that does not answer.
        if self.unanswered_pings >= 2 {
            return Err(Some(disconnect::NO_PONG));
        }
        let now = now_secs();
        if self.expires.is_some_and(|exp| exp <= now) {
            return Err(Some(disconnect::EXPIRED));
        }
        let expired: Vec<String> = self
            .subs
            .values()
            .filter(|sub| sub.expires.is_some_and(|exp| exp <= now))
            .map(|sub| sub.channel.clone())
            .collect();
        for channel in expired {
            self.remove(&channel);
            self.push_unsubscribe(&channel, unsubscribe::EXPIRED)
                .await?;
        }
        self.unanswered_pings += 1;
        self.write(&proto::ping(self.encoding)).await?;
        self.flush().await
    }

    async fn push_unsubscribe(
        &mut self,
        channel: &str,
        (code, reason): (u32, &str),
    ) -> Result<(), Option<Disconnect>> {
        self.push(proto::Push {
            channel: channel.to_owned(),
            unsubscribe: Some(proto::Unsubscribe {
                code,
                reason: reason.to_owned(),
            }),
            ..proto::Push::default()
        })
        .await
    }

    /// A subscription was cut off: a slow connection is closed; a channel whose history
    /// changed under it is unsubscribed with 2500, and the client subscribes again and
    /// recovers from its position (or is told it could not).
    async fn on_cut_off(&mut self) -> Result<(), Option<Disconnect>> {
        let cut: Vec<(String, Ended)> = self
            .subs
            .values()
            .filter_map(|sub| Some((sub.channel.clone(), sub.subscription.ended()?)))
            .collect();
        for (channel, ended) in cut {
            if ended == Ended::Slow {
                metrics::counter!("switchboard_slow_consumer_closes_total").increment(1);
                return Err(Some(disconnect::SLOW));
            }
            self.remove(&channel);
            self.push_unsubscribe(&channel, unsubscribe::INSUFFICIENT)
                .await?;
        }
        self.flush().await
    }

    /// A channel's event, and whatever else the inbox holds, in one write.
    async fn on_event(&mut self, key: u64, item: Outbound) -> Result<(), Option<Disconnect>> {
        self.feed_event(key, &item).await?;
        for _ in 0..MAX_DRAIN {
            let Some((key, item)) = self.inbox.try_recv() else {
                break;
            };
            self.feed_event(key, &item).await?;
        }
        self.flush().await
    }

    async fn feed_event(&mut self, key: u64, item: &Outbound) -> Result<(), Option<Disconnect>> {
        let Some(sub) = self.subs.get(&key) else {
            // Unsubscribed meanwhile.
            return Ok(());
        };
        let channel = &sub.channel;
        if !sub.subscription.wants(item) {
            return Ok(());
        }
        let encoding = self.encoding;
        let frame = match item {
            Outbound::Publication { delivery, .. } => {
                delivery.encoded(format_of(encoding), |p| push_of(encoding, p))
            }
            Outbound::Join(user) | Outbound::Leave(user) if sub.join_leave => {
                let joined = matches!(item, Outbound::Join(_));
                // A join names the connection when it is this door's, here; a leave
                // (its connection is gone) names the user.
                let connection = joined
                    .then(|| self.state.centrifuge_clients.only_connection(channel, user))
                    .flatten();
                let info = Some(proto::ClientInfo {
                    user: user.to_string(),
                    client: connection
                        .as_ref()
                        .map(|p| p.client.clone())
                        .unwrap_or_default(),
                    conn_info: connection.map(|p| p.info).unwrap_or_default(),
                    ..proto::ClientInfo::default()
                });
                let presence = proto::Presence { info };
                let push = proto::Push {
                    channel: channel.clone(),
                    join: joined.then(|| presence.clone()),
                    leave: (!joined).then_some(presence),
                    ..proto::Push::default()
                };
                encode_reply(
                    encoding,
                    &Reply {
                        push: Some(push),
                        ..Reply::default()
                    },
                )
            }
            // Typing, binary data and the room protocol's retries have no message here.
            _ => return Ok(()),
        };
        self.counters.events_sent.increment(1);
        self.write(&frame).await
    }

    async fn on_wake(&mut self, mailbox: &Mailbox) -> Result<(), Option<Disconnect>> {
        for control in mailbox.take() {
            self.on_control(control).await?;
        }
        self.on_cut_off().await
    }

    async fn on_control(&mut self, control: Control) -> Result<(), Option<Disconnect>> {
        match control {
            Control::Subscribe(channel) => {
                if self.channels.contains_key(&channel) {
                    return Ok(());
                }
                let request = proto::SubscribeRequest {
                    channel: channel.clone(),
                    ..proto::SubscribeRequest::default()
                };
                if let Ok(result) = self.subscribe(&request, None).await {
                    let push = proto::Push {
                        channel,
                        subscribe: Some(proto::Subscribe {
                            recoverable: result.recoverable,
                            epoch: result.epoch,
                            offset: result.offset,
                            positioned: result.positioned,
                        }),
                        ..proto::Push::default()
                    };
                    self.push(push).await?;
                }
            }
            Control::Unsubscribe(channel) => {
                if self.remove(&channel) {
                    self.push_unsubscribe(&channel, unsubscribe::SERVER).await?;
                }
            }
            Control::Disconnect(code, reason) => {
                self.flush().await?;
                let closing = self.socket.close(self.encoding, (code, &reason));
                if let Err(cause) = Box::pin(closing).await {
                    debug!(%cause, "centrifuge close handshake");
                }
                return Err(None);
            }
        }
        self.flush().await
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Option<Disconnect>> {
        let commands = self.commands_of(message).map_err(Some)?;
        for command in commands {
            Box::pin(self.on_command(command)).await?;
        }
        self.flush().await
    }

    /// One command after connect.
    async fn on_command(&mut self, command: Command) -> Result<(), Option<Disconnect>> {
        let kind = kind(&command);
        count_command(kind);
        self.counters.events_received.increment(1);
        if kind == "pong" {
            self.unanswered_pings = 0;
            return Ok(());
        }
        if !self.limit.take(std::time::Instant::now()) {
            metrics::counter!("switchboard_rate_limited_total").increment(1);
            self.strikes += 1;
            if self.strikes > self.state.config.rate_limit_strikes {
                return Err(Some(disconnect::TOO_MANY_REQUESTS));
            }
            if command.id != 0 {
                return self
                    .reply(&error_reply(command.id, codes::TOO_MANY_REQUESTS))
                    .await;
            }
            return Ok(());
        }
        self.strikes = 0;
        let id = command.id;
        if id == 0 {
            // Only `send` goes without an id; it asks for nothing and is not answered.
            if command.send.is_some() {
                return Ok(());
            }
            return Err(Some(disconnect::BAD_REQUEST));
        }
        let result = if command.connect.is_some() {
            return Err(Some(disconnect::BAD_REQUEST));
        } else if let Some(request) = command.subscribe {
            self.on_subscribe(request).await.map(|result| Reply {
                subscribe: Some(result),
                ..Reply::default()
            })
        } else if let Some(request) = command.unsubscribe {
            self.remove(&request.channel);
            Ok(Reply {
                unsubscribe: Some(proto::Empty {}),
                ..Reply::default()
            })
        } else if let Some(request) = command.publish {
            self.on_publish(request).await.map(|()| Reply {
                publish: Some(proto::Empty {}),
                ..Reply::default()
            })
        } else if let Some(request) = command.presence {
            self.on_presence(&request.channel)
                .await
                .map(|result| Reply {
                    presence: Some(result),
                    ..Reply::default()
                })
        } else if let Some(request) = command.presence_stats {
            self.on_presence(&request.channel)
                .await
                .map(|result| Reply {
                    presence_stats: Some(stats_of(&result)),
                    ..Reply::default()
                })
        } else if let Some(request) = command.history {
            self.on_history(request).await.map(|result| Reply {
                history: Some(result),
                ..Reply::default()
            })
        } else if command.ping.is_some() {
            Ok(Reply {
                ping: Some(proto::Empty {}),
                ..Reply::default()
            })
        } else if command.rpc.is_some() {
            Err(codes::METHOD_NOT_FOUND)
        } else if let Some(request) = command.refresh {
            self.on_refresh(&request.token).map(|result| Reply {
                refresh: Some(result),
                ..Reply::default()
            })
        } else if let Some(request) = command.sub_refresh {
            self.on_sub_refresh(request).map(|result| Reply {
                sub_refresh: Some(result),
                ..Reply::default()
            })
        } else if command.send.is_some() {
            return Ok(());
        } else {
            Err(codes::METHOD_NOT_FOUND)
        };
        let reply = match result {
            Ok(reply) => Reply { id, ..reply },
            Err(code) => error_reply(id, code),
        };
        self.reply(&reply).await
    }

    /// The subscription to `channel`, if any.
    fn sub(&self, channel: &str) -> Option<&Sub> {
        self.subs.get(self.channels.get(channel)?)
    }

    /// Removes a subscription; false when there was none.
    fn remove(&mut self, channel: &str) -> bool {
        let Some(key) = self.channels.remove(channel) else {
            return false;
        };
        self.subs.remove(&key);
        if let Some(registration) = &mut self.registration {
            registration.left(channel);
        }
        metrics::gauge!("switchboard_centrifuge_subscriptions").decrement(1.0);
        true
    }

    async fn on_subscribe(
        &mut self,
        request: proto::SubscribeRequest,
    ) -> Result<proto::SubscribeResult, Failure> {
        if self.channels.contains_key(&request.channel) {
            return Err(codes::ALREADY_SUBSCRIBED);
        }
        if self.subs.len() >= self.state.config.max_subscriptions_per_connection {
            return Err(codes::LIMIT_EXCEEDED);
        }
        if !names::valid_channel(&request.channel) {
            return Err(codes::BAD_REQUEST);
        }
        if names::needs_signature(&request.channel) {
            // Only the Pusher door checks their signatures.
            return Err(codes::PERMISSION_DENIED);
        }
        let options = self.state.engine.options(&request.channel);
        let mut expires = None;
        if options.subscribe_token {
            let claims = self.subscription_claims(&request.channel, &request.token)?;
            expires = Some(claims.exp);
        }
        let token = request.token.clone();
        let mut result = self.subscribe(&request, expires).await?;
        if !token.is_empty() {
            if let Some(exp) = expires {
                result.expires = true;
                result.ttl = ttl_of(exp);
            }
        }
        Ok(result)
    }

    /// The claims of a subscription token for `channel`, checked.
    fn subscription_claims(&self, channel: &str, token: &str) -> Result<DoorClaims, Failure> {
        if token.is_empty() {
            return Err(codes::PERMISSION_DENIED);
        }
        match verify(&self.state.auth, token) {
            Ok(claims)
                if claims.channel.as_deref() == Some(channel)
                    && claims.user().unwrap_or("") == self.user =>
            {
                Ok(claims)
            }
            Ok(_) => Err(codes::PERMISSION_DENIED),
            Err(TokenRefused::Expired) => Err(codes::TOKEN_EXPIRED),
            Err(TokenRefused::Invalid(_)) => Err(codes::PERMISSION_DENIED),
        }
    }

    /// Subscribes (the checks of a client's request done) and builds the result, with
    /// the publications a recovering client missed.
    async fn subscribe(
        &mut self,
        request: &proto::SubscribeRequest,
        expires: Option<u64>,
    ) -> Result<proto::SubscribeResult, Failure> {
        let channel = request.channel.as_str();
        if !names::valid_channel(channel) {
            return Err(codes::BAD_REQUEST);
        }
        if !names::may_subscribe(channel, &self.user) {
            return Err(codes::PERMISSION_DENIED);
        }
        let resume = Resume {
            since: request.recover.then_some(request.offset),
            epoch: (request.recover && !request.epoch.is_empty()).then(|| request.epoch.clone()),
            // A plain subscribe starts from now; a namespace with `recover = "latest"`
            // still sends its latest publication.
            recent: Some(0),
        };
        // In presence before the engine announces the join, so the join can name the
        // connection.
        if let Some(registration) = &mut self.registration {
            registration.joined(channel);
        }
        let subscribed = self
            .state
            .engine
            .subscribe_in(&self.inbox, channel, &self.user, resume)
            .await;
        let mut subscription = match subscribed {
            Ok(subscription) => subscription,
            Err(refused) => {
                if let Some(registration) = &mut self.registration {
                    registration.left(channel);
                }
                if let EngineError::Forbidden(_) = refused {
                    return Err(codes::PERMISSION_DENIED);
                }
                warn!(cause = %refused, channel, "a centrifuge subscribe failed");
                return Err(codes::INTERNAL);
            }
        };
        let mut publications = Vec::new();
        let mut bytes = 0;
        let mut complete = true;
        'pages: loop {
            match subscription.next_backlog().await {
                Ok(page) if page.is_empty() => break,
                Ok(page) => {
                    for stored in &page {
                        let recovered = publication(stored);
                        bytes += reply_bytes(&recovered);
                        if publications.len() == MAX_RECOVERED || bytes > MAX_REPLY_BYTES {
                            // More was missed than one reply holds.
                            complete = false;
                            break 'pages;
                        }
                        publications.push(recovered);
                    }
                }
                Err(cause) => {
                    warn!(%cause, channel, "reading history for a subscribe failed");
                    if let Some(registration) = &mut self.registration {
                        registration.left(channel);
                    }
                    return Err(codes::INTERNAL);
                }
            }
        }
        let keeps_history = subscription.options().history_size != Some(0);
        let result = proto::SubscribeResult {
            recoverable: keeps_history,
            positioned: keeps_history,
            epoch: subscription.epoch().to_owned(),
            offset: subscription.last_id(),
            recovered: request.recover && complete && subscription.recovered() == Some(true),
            was_recovering: request.recover,
            publications,
            ..proto::SubscribeResult::default()
        };
        let key = subscription.key();
        self.channels.insert(channel.to_owned(), key);
        self.subs.insert(
            key,
            Sub {
                channel: channel.to_owned(),
                subscription,
                join_leave: request.join_leave,
                expires,
            },
        );
        metrics::gauge!("switchboard_centrifuge_subscriptions").increment(1.0);
        Ok(result)
    }

    async fn on_publish(&mut self, request: proto::PublishRequest) -> Result<(), Failure> {
        let Some(sub) = self.sub(&request.channel) else {
            return Err(codes::PERMISSION_DENIED);
        };
        let Ok(text) = std::str::from_utf8(&request.data) else {
            return Err(codes::BAD_REQUEST);
        };
        let Ok(data) = RawValue::from_string(text.to_owned()) else {
            return Err(codes::BAD_REQUEST);
        };
        // A message with a string `text` is a chat message to the room protocol too.
        let text = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(data.get())
            .ok()
            .and_then(|object| match object.get("text") {
                Some(serde_json::Value::String(text)) => Some(text.clone()),
                _ => None,
            });
        let draft = Draft {
            text,
            data: Some(data),
            event: None,
            nonce: None,
            client: Some(self.client.clone()),
            client_info: self.info.clone(),
        };
        let receipt = match sub.subscription.publish(draft).await {
            Ok(receipt) => receipt,
            Err(EngineError::Forbidden(_)) => return Err(codes::PERMISSION_DENIED),
            Err(cause) => {
                warn!(%cause, "a centrifuge publish failed");
                return Err(codes::INTERNAL);
            }
        };
        match receipt.settled().await {
            Ok(_) => Ok(()),
            Err(cause) => {
                warn!(%cause, "a centrifuge publish was not stored");
                Err(codes::INTERNAL)
            }
        }
    }

    async fn on_presence(&mut self, channel: &str) -> Result<proto::PresenceResult, Failure> {
        if !self.channels.contains_key(channel) {
            return Err(codes::PERMISSION_DENIED);
        }
        presence(&self.state, channel).await
    }

    async fn on_history(
        &mut self,
        request: proto::HistoryRequest,
    ) -> Result<proto::HistoryResult, Failure> {
        if !self.channels.contains_key(&request.channel) {
            return Err(codes::PERMISSION_DENIED);
        }
        history(&self.state.engine, &request).await
    }

    fn on_refresh(&mut self, token: &str) -> Result<proto::RefreshResult, Failure> {
        let claims = match verify(&self.state.auth, token) {
            Ok(claims) => claims,
            Err(TokenRefused::Expired) => return Err(codes::TOKEN_EXPIRED),
            Err(TokenRefused::Invalid(_)) => return Err(codes::UNAUTHORIZED),
        };
        if claims.user().unwrap_or("") != self.user {
            return Err(codes::UNAUTHORIZED);
        }
        self.expires = Some(claims.exp);
        Ok(proto::RefreshResult {
            client: self.client.clone(),
            version: VERSION.to_owned(),
            expires: true,
            ttl: ttl_of(claims.exp),
        })
    }

    fn on_sub_refresh(
        &mut self,
        request: proto::SubRefreshRequest,
    ) -> Result<proto::SubRefreshResult, Failure> {
        if !self.channels.contains_key(&request.channel) {
            return Err(codes::PERMISSION_DENIED);
        }
        let claims = self.subscription_claims(&request.channel, &request.token)?;
        if let Some(key) = self.channels.get(&request.channel) {
            if let Some(sub) = self.subs.get_mut(key) {
                sub.expires = Some(claims.exp);
            }
        }
        Ok(proto::SubRefreshResult {
            expires: true,
            ttl: ttl_of(claims.exp),
        })
    }
}

/// Why a connect was not taken.
enum ConnectRefused {
    /// Answered with this error; the client may connect again.
    Reply(Failure),
    Disconnect(Disconnect),
}

/// A channel's presence as this protocol lists it, by connection: this door's
/// connections here with their client ids and `info`; every other user in the channel
/// (on another door, or another node) as one entry whose client id is the user name.
pub(super) async fn presence(
    state: &AppState,
    channel: &str,
) -> Result<proto::PresenceResult, Failure> {
    if !names::valid_channel(channel) {
        return Err(codes::BAD_REQUEST);
    }
    if !state.engine.options(channel).presence {
        return Err(codes::NOT_AVAILABLE);
    }
    let users = state
        .engine
        .presence(channel)
        .await
        .map_err(|_| codes::INTERNAL)?;
    let here = state.centrifuge_clients.present(channel);
    let mut presence: HashMap<String, proto::ClientInfo> = here
        .iter()
        .map(|p| {
            let info = proto::ClientInfo {
                user: p.user.clone(),
                client: p.client.clone(),
                conn_info: p.info.clone(),
                ..proto::ClientInfo::default()
            };
            (p.client.clone(), info)
        })
        .collect();
    let users_here: std::collections::HashSet<&str> =
        here.iter().map(|p| p.user.as_str()).collect();
    for user in users {
        if !users_here.contains(user.as_str()) {
            let info = proto::ClientInfo {
                user: user.clone(),
                client: user.clone(),
                ..proto::ClientInfo::default()
            };
            presence.insert(user, info);
        }
    }
    Ok(proto::PresenceResult { presence })
}

/// Connections and distinct users of a presence list.
pub(super) fn stats_of(presence: &proto::PresenceResult) -> proto::PresenceStatsResult {
    let users: std::collections::HashSet<&str> = presence
        .presence
        .values()
        .map(|i| i.user.as_str())
        .collect();
    proto::PresenceStatsResult {
        num_clients: presence.presence.len() as u32,
        num_users: users.len() as u32,
    }
}

/// A history request, for the client protocol and the server API alike.
pub(super) async fn history(
    engine: &switchboard_engine::Engine,
    request: &proto::HistoryRequest,
) -> Result<proto::HistoryResult, Failure> {
    let channel = request.channel.as_str();
    if !names::valid_channel(channel) {
        return Err(codes::BAD_REQUEST);
    }
    let position = engine
        .position(channel)
        .await
        .map_err(|_| codes::INTERNAL)?;
    let limit = match request.limit {
        0 => 0,
        n if n < 0 => MAX_HISTORY,
        n => (n as usize).min(MAX_HISTORY),
    };
    if let Some(since) = &request.since {
        if !since.epoch.is_empty() && since.epoch != position.epoch {
            return Err(codes::UNRECOVERABLE_POSITION);
        }
    }
    let mut publications = if limit == 0 {
        Vec::new()
    } else if request.reverse {
        let before = request.since.as_ref().map(|s| s.offset);
        let mut newest = engine
            .history_newest(channel, before, limit)
            .await
            .map_err(|_| codes::INTERNAL)?;
        newest.reverse();
        newest
    } else {
        let since = request.since.as_ref().map_or(0, |s| s.offset);
        engine
            .history(channel, since, limit)
            .await
            .map_err(|_| codes::INTERNAL)?
    };
    let newest = publications.iter().map(|p| p.id).max().unwrap_or(0);
    let mut bytes = 0;
    let publications = publications
        .drain(..)
        .map(|p| publication(&p))
        .take_while(|p| {
            bytes += reply_bytes(p);
            bytes <= MAX_REPLY_BYTES
        })
        .collect();
    Ok(proto::HistoryResult {
        publications,
        epoch: position.epoch,
        // What was read may be newer than the position read before it.
        offset: position.last_id.max(newest),
    })
}
