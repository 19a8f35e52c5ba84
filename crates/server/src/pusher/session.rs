//! One Pusher connection: `pusher:connection_established`, then subscriptions, client
//! events, sign-in and pings until one side closes.
//!
//! Every subscription delivers into one [`Inbox`]; each publication is encoded once per
//! channel for this door ([`super::PUSHER`]). A refused message is answered with a
//! `pusher:error` and the connection stays; what ends a connection is a `pusher:error`
//! with the code, then the WebSocket close with the same code.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;
use switchboard_engine::{
    Ended, EngineError, Hook, HookKind, Inbox, Outbound, Resume, Subscription,
};
use switchboard_net::bucket::TokenBucket;
use switchboard_net::wire::OpCode;
use switchboard_net::{CloseCode, CloseFrame, Message, Stream, WebSocket};
use switchboard_protocol::pusher::{self as proto, ChannelKind, ClientMessage};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::errors::{self, Code};
use super::registry::{Registration, Terminator};
use super::{draft_of, event_of, App, PUSHER};
use crate::metrics::Counters;
use crate::serve::AppState;

/// Events written in one go before the session reads its socket again.
const MAX_DRAIN: usize = 256;

/// Longest event name, in bytes.
const MAX_EVENT_NAME: usize = 200;

/// Tells a refused connection why (its `pusher:error`), then closes it with the code.
pub(super) async fn refuse(mut socket: WebSocket<Stream>, (code, message): Code) {
    metrics::counter!("switchboard_pusher_disconnects_total", "code" => code.to_string())
        .increment(1);
    if socket
        .send_text(bytes_str(&proto::error(Some(code), message)))
        .await
        .is_ok()
    {
        let frame = CloseFrame::new(CloseCode(code), message);
        if let Err(cause) = Box::pin(socket.close(Some(frame))).await {
            debug!(%cause, "pusher close handshake");
        }
    }
}

fn bytes_str(frame: &Bytes) -> &str {
    std::str::from_utf8(frame).expect("frames are JSON")
}

/// Runs a connection to its end.
pub(super) async fn run(socket: WebSocket<Stream>, app: Arc<App>, state: AppState) {
    metrics::gauge!("switchboard_pusher_connections").increment(1.0);
    let mut session = Session::new(socket, app, state);
    let ending = session.serve().await;
    session.drop_subscriptions();
    if let Some((code, message)) = ending {
        metrics::counter!("switchboard_pusher_disconnects_total", "code" => code.to_string())
            .increment(1);
        let _ = session.write(&proto::error(Some(code), message)).await;
        let _ = session.socket.flush().await;
        let frame = CloseFrame::new(CloseCode(code), message);
        if let Err(cause) = Box::pin(session.socket.close(Some(frame))).await {
            debug!(%cause, "pusher close handshake");
        }
    }
    metrics::gauge!("switchboard_pusher_connections").decrement(1.0);
}

/// One subscription of the connection.
struct Sub {
    /// Its name in this protocol.
    channel: String,
    kind: ChannelKind,
    /// The user it counts as (a presence member's `user_id`, or the signed-in user).
    user: String,
    subscription: Subscription,
}

/// The outcome of a step: `Err(Some(code))` ends the connection with that code;
/// `Err(None)`: the client left.
type Step = Result<(), Option<Code>>;

struct Session {
    socket: WebSocket<Stream>,
    app: Arc<App>,
    state: AppState,
    socket_id: String,
    /// The signed-in user's id, and the `user_info` of its `user_data`.
    user: Option<String>,
    user_info: Option<Box<RawValue>>,
    inbox: Inbox,
    terminator: Terminator,
    /// Subscriptions by key (what tags their events in the inbox).
    subs: HashMap<u64, Sub>,
    /// Subscription keys by this protocol's channel name.
    channels: HashMap<String, u64>,
    /// Client events.
    limit: TokenBucket,
    /// Messages of every kind (subscribes included).
    messages: TokenBucket,
    strikes: u32,
    /// Whether anything came from the client since the last ping tick.
    heard: bool,
    /// Whether the last tick sent a ping that nothing answered yet.
    pinged: bool,
    counters: Counters,
    registration: Registration,
}

/// A fresh socket id: two numbers joined by a dot, as the libraries check.
fn socket_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let part = || {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.finish() % 1_000_000_000
    };
    format!("{}.{}", part(), part())
}

fn count_message(kind: &'static str) {
    metrics::counter!("switchboard_pusher_messages_total", "event" => kind).increment(1);
}

fn count_error(code: Option<u16>) {
    let code = code.map_or_else(|| "none".to_owned(), |c| c.to_string());
    metrics::counter!("switchboard_pusher_errors_total", "code" => code).increment(1);
}

impl Session {
    fn new(socket: WebSocket<Stream>, app: Arc<App>, state: AppState) -> Self {
        let config = &state.config;
        let now = std::time::Instant::now();
        let limit = TokenBucket::new(
            config.client_events_per_sec,
            config.client_events_per_sec.max(1.0),
            now,
        );
        let messages = TokenBucket::new(
            config.commands_per_sec,
            f64::from(config.commands_burst.max(1)),
            now,
        );
        let inbox = Inbox::new(config.outbound_queue);
        let terminator = Terminator::new(inbox.waker());
        let socket_id = socket_id();
        let registration = Registration::new(state.pusher_registry.clone(), &socket_id);
        Self {
            socket,
            app,
            socket_id,
            user: None,
            user_info: None,
            inbox,
            terminator,
            subs: HashMap::new(),
            channels: HashMap::new(),
            limit,
            messages,
            strikes: 0,
            heard: false,
            pinged: false,
            counters: Counters::new(),
            registration,
            state,
        }
    }

    fn drop_subscriptions(&mut self) {
        let count = self.subs.len();
        self.subs.clear();
        for channel in std::mem::take(&mut self.channels).into_keys() {
            let engine = self.app.engine_channel(&channel);
            self.registration.unsubscribed(&engine);
        }
        metrics::gauge!("switchboard_pusher_subscriptions").decrement(count as f64);
    }

    async fn serve(&mut self) -> Option<Code> {
        let established =
            proto::connection_established(&self.socket_id, self.state.config.activity_timeout_secs);
        if self.write(&established).await.is_err() || self.flush().await.is_err() {
            return None;
        }
        self.live().await.err().flatten()
    }

    async fn live(&mut self) -> Step {
        let period = Duration::from_secs(self.state.config.ping_interval_secs.max(1));
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = self.state.shutdown.clone();
        let stopping = shutdown.stopping();
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                biased;
                () = &mut stopping => return Err(Some(errors::SHUTDOWN)),
                event = self.inbox.recv() => match event {
                    Some((key, item)) => self.on_event(key, item).await?,
                    None => Box::pin(self.on_wake()).await?,
                },
                _ = ticks.tick() => self.on_tick().await?,
                received = self.socket.recv() => match received {
                    Ok(Some(message)) => Box::pin(self.on_message(message)).await?,
                    Ok(None) => return Err(None),
                    Err(cause) => {
                        debug!(%cause, "pusher connection ended");
                        if let switchboard_net::Error::Protocol(error) = &cause {
                            let code = error.close_code().0.to_string();
                            metrics::counter!("switchboard_pusher_disconnects_total", "code" => code)
                                .increment(1);
                        }
                        return Err(None);
                    }
                },
            }
        }
    }

    async fn write(&mut self, frame: &[u8]) -> Step {
        self.counters.bytes_sent.increment(frame.len() as u64);
        self.socket
            .feed_frame(OpCode::Text, frame)
            .await
            .map_err(|cause| {
                debug!(%cause, "pusher connection ended while sending");
                None
            })
    }

    async fn flush(&mut self) -> Step {
        self.socket.flush().await.map_err(|_| None)
    }

    /// Refuses one message: a `pusher:error`, the connection staying.
    async fn refuse(&mut self, code: Option<u16>, message: &str) -> Step {
        count_error(code);
        self.write(&proto::error(code, message)).await
    }

    /// Silence for a tick: a ping; for another: the client is gone.
    async fn on_tick(&mut self) -> Step {
        if self.heard {
            self.heard = false;
            self.pinged = false;
            return Ok(());
        }
        if self.pinged {
            return Err(Some(errors::NO_PONG));
        }
        self.pinged = true;
        self.write(&proto::ping()).await?;
        self.flush().await
    }

    async fn on_wake(&mut self) -> Step {
        if self.terminator.terminated() {
            return Err(Some(errors::TERMINATED));
        }
        let cut: Vec<Ended> = self
            .subs
            .values()
            .filter_map(|sub| sub.subscription.ended())
            .collect();
        if cut.contains(&Ended::Slow) {
            metrics::counter!("switchboard_slow_consumer_closes_total").increment(1);
            return Err(Some(errors::SLOW));
        }
        if cut.is_empty() {
            return Ok(());
        }
        // A channel's stream changed under it: the library subscribes again on
        // reconnecting (this protocol recovers nothing).
        Err(Some(errors::RESUBSCRIBE))
    }

    /// A channel's event, and whatever else the inbox holds, in one write.
    async fn on_event(&mut self, key: u64, item: Outbound) -> Step {
        self.feed_event(key, &item).await?;
        for _ in 0..MAX_DRAIN {
            let Some((key, item)) = self.inbox.try_recv() else {
                break;
            };
            self.feed_event(key, &item).await?;
        }
        self.flush().await
    }

    async fn feed_event(&mut self, key: u64, item: &Outbound) -> Step {
        let Some(sub) = self.subs.get(&key) else {
            return Ok(());
        };
        if !sub.subscription.wants(item) {
            return Ok(());
        }
        let frame = match item {
            Outbound::Publication { delivery, .. } => {
                // Not back to its sender (a client event), nor to the socket an HTTP
                // API call excluded.
                if delivery.publication.client.as_deref() == Some(self.socket_id.as_str()) {
                    return Ok(());
                }
                let channel = &sub.channel;
                delivery.encoded(PUSHER, |p| event_of(channel, p))
            }
            Outbound::Join(user) if sub.kind == ChannelKind::Presence => {
                if **user == *sub.user {
                    return Ok(());
                }
                let info = self
                    .state
                    .engine
                    .member_info(sub.subscription.channel(), user);
                proto::member_added(&sub.channel, user, info.as_deref())
            }
            Outbound::Leave(user) if sub.kind == ChannelKind::Presence => {
                if **user == *sub.user {
                    return Ok(());
                }
                proto::member_removed(&sub.channel, user)
            }
            // Typing, binary data and the room protocol's retries have no message here.
            _ => return Ok(()),
        };
        self.counters.events_sent.increment(1);
        self.write(&frame).await
    }

    async fn on_message(&mut self, message: Message) -> Step {
        self.heard = true;
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                count_message("binary");
                self.strike().await?;
                self.refuse(
                    None,
                    "binary messages are not part of the protocol: send JSON text",
                )
                .await?;
                return self.flush().await;
            }
            _ => return Ok(()),
        };
        self.counters.bytes_received.increment(text.len() as u64);
        self.counters.events_received.increment(1);
        if !self.messages.take(std::time::Instant::now()) {
            metrics::counter!("switchboard_rate_limited_total").increment(1);
            self.strike().await?;
            self.refuse(Some(errors::RATE_LIMITED.0), "too many messages: slow down")
                .await?;
            return self.flush().await;
        }
        match proto::parse_client_message(text.as_str()) {
            Ok(message) => self.on_client_message(message).await?,
            Err(malformed) => {
                count_message("malformed");
                self.strike().await?;
                self.refuse(None, &format!("malformed message: {malformed}"))
                    .await?;
            }
        }
        self.flush().await
    }

    /// A refusal in a row; too many end the connection.
    async fn strike(&mut self) -> Step {
        self.strikes += 1;
        if self.strikes > self.state.config.rate_limit_strikes {
            return Err(Some(errors::TOO_MANY_REFUSALS));
        }
        Ok(())
    }

    async fn on_client_message(&mut self, message: ClientMessage) -> Step {
        match message {
            ClientMessage::Ping => {
                count_message("pusher:ping");
                self.strikes = 0;
                self.write(&proto::pong()).await
            }
            ClientMessage::Pong => {
                count_message("pusher:pong");
                self.strikes = 0;
                Ok(())
            }
            ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
            } => {
                count_message("pusher:subscribe");
                Box::pin(self.on_subscribe(channel, auth, channel_data)).await
            }
            ClientMessage::Unsubscribe { channel } => {
                count_message("pusher:unsubscribe");
                self.strikes = 0;
                self.unsubscribe(&channel);
                Ok(())
            }
            ClientMessage::Signin { auth, user_data } => {
                count_message("pusher:signin");
                self.on_signin(&auth, &user_data).await
            }
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => {
                count_message("client");
                self.on_client_event(event, channel, data).await
            }
            ClientMessage::Other(_) => {
                count_message("other");
                // Unknown `pusher:` events are ignored, as the service does.
                Ok(())
            }
        }
    }

    fn unsubscribe(&mut self, channel: &str) {
        if let Some(key) = self.channels.remove(channel) {
            self.subs.remove(&key);
            let engine = self.app.engine_channel(channel);
            self.registration.unsubscribed(&engine);
            metrics::gauge!("switchboard_pusher_subscriptions").decrement(1.0);
        }
    }

    async fn on_subscribe(
        &mut self,
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    ) -> Step {
        if self.channels.contains_key(&channel) {
            // The service answers a repeated subscribe as done.
            return self
                .write(&proto::subscription_succeeded(&channel, None))
                .await;
        }
        if !proto::valid_channel(&channel) {
            self.strike().await?;
            return self
                .refuse(
                    None,
                    &format!(
                        "invalid channel name {channel:?}: 1-164 characters of A-Z a-z 0-9 _ - = @ , . ;"
                    ),
                )
                .await;
        }
        if self.subs.len() >= self.state.config.max_subscriptions_per_connection {
            // Not a strike: an app with many channels is not misbehaving, and closing
            // it would only bring it back with the same subscribes.
            return self
                .refuse(
                    Some(errors::OVER_CAPACITY.0),
                    &format!(
                        "subscription to {channel} refused: a connection holds at most {} channels",
                        self.state.config.max_subscriptions_per_connection
                    ),
                )
                .await;
        }
        let kind = ChannelKind::of(&channel);
        let engine = self.app.engine_channel(&channel);
        let options = self.state.engine.options(&engine).clone();
        let mut member = None;
        match kind {
            ChannelKind::Public if self.app.shares_rooms() && self.state.auth.requires_tokens() => {
                // The first app's channels are every door's, and this server wants a
                // token to join them: a public channel would let anyone in.
                self.strike().await?;
                return self
                    .refuse(
                        Some(errors::UNAUTHORIZED.0),
                        &format!(
                            "{channel}: this server wants tokens for its channels, so this app's public channels are off; use private- or presence- channels"
                        ),
                    )
                    .await;
            }
            ChannelKind::Public => {}
            ChannelKind::User => {
                let owner = &channel[proto::USER_CHANNEL_PREFIX.len()..];
                if self.user.as_deref() != Some(owner) {
                    self.strike().await?;
                    return self
                        .refuse(
                            Some(errors::UNAUTHORIZED.0),
                            &format!("{channel} is the channel of user {owner}: sign in as that user first"),
                        )
                        .await;
                }
            }
            ChannelKind::Private | ChannelKind::Encrypted | ChannelKind::Presence => {
                // A presence subscription signs its channel_data, or (a signed-in
                // user's, whose auth response had none) only the channel.
                let data = channel_data
                    .as_deref()
                    .filter(|_| kind == ChannelKind::Presence);
                let signed = auth.as_deref().is_some_and(|auth| {
                    proto::channel_auth_valid(
                        &self.app.config.key,
                        &self.app.config.secret,
                        &self.socket_id,
                        &channel,
                        data,
                        auth,
                    )
                });
                if !signed {
                    self.strike().await?;
                    metrics::counter!("switchboard_pusher_auth_failures_total").increment(1);
                    let what = if kind == ChannelKind::Presence {
                        "socket_id:channel_name:channel_data"
                    } else {
                        "socket_id:channel_name"
                    };
                    return self
                        .refuse(
                            None,
                            &format!(
                                "Invalid signature for {channel}: expected the HMAC SHA256 hex digest of {what}, signed with the app's secret, as KEY:SIGNATURE"
                            ),
                        )
                        .await;
                }
                if kind == ChannelKind::Presence {
                    if !options.presence {
                        self.strike().await?;
                        return self
                            .refuse(
                                None,
                                &format!("{channel}: presence is off for this channel's namespace"),
                            )
                            .await;
                    }
                    let given = match (data, &self.user) {
                        (Some(data), _) => proto::user_id_of(data, "user_id"),
                        // Signed in: the member is the user, with its user_info.
                        (None, Some(user)) => Some((user.clone(), self.user_info.clone())),
                        (None, None) => None,
                    };
                    match given {
                        Some((user, info)) if switchboard_engine::valid_user_name(&user) => {
                            member = Some((user, info));
                        }
                        _ => {
                            self.strike().await?;
                            return self
                                .refuse(
                                    None,
                                    &format!("{channel}: channel_data needs a user_id (a string or number of 1-64 characters), or the connection a sign-in"),
                                )
                                .await;
                        }
                    }
                }
            }
        }
        if options.subscribe_token {
            self.strike().await?;
            return self
                .refuse(
                    Some(errors::UNAUTHORIZED.0),
                    &format!("{channel} takes subscription tokens: join it through /connection/websocket"),
                )
                .await;
        }
        self.strikes = 0;
        // Who the subscription counts as: the presence member, or on the personal
        // channel its user; elsewhere nobody (this protocol has no presence there, and
        // a member there would be told to webhooks as one).
        let user = match (&member, kind) {
            (Some((user, _)), _) => user.clone(),
            (None, ChannelKind::User) => self.user.clone().unwrap_or_default(),
            (None, _) => String::new(),
        };
        self.registration.subscribed(&engine);
        let resume = Resume {
            since: None,
            epoch: None,
            // This protocol recovers nothing: live events only.
            recent: Some(0),
        };
        // A presence member's user_info goes with its join, to every node.
        let info = member.as_ref().and_then(|(_, info)| info.clone());
        let subscribed = self
            .state
            .engine
            .subscribe_member(&self.inbox, &engine, &user, info, resume)
            .await;
        let mut subscription = match subscribed {
            Ok(subscription) => subscription,
            Err(refused) => {
                self.registration.unsubscribed(&engine);
                let message = match refused {
                    EngineError::Forbidden(why) => format!("{channel}: {why}"),
                    other => {
                        warn!(cause = %other, channel, "a pusher subscribe failed");
                        format!("{channel}: the server could not subscribe; try again")
                    }
                };
                return self.refuse(None, &message).await;
            }
        };
        // Nothing to recover: the backlog (none was asked for) is drained.
        while let Ok(page) = subscription.next_backlog().await {
            if page.is_empty() {
                break;
            }
        }
        let succeeded = if kind == ChannelKind::Presence {
            let members: Vec<String> = subscription.members().to_vec();
            let infos: Vec<Option<Arc<RawValue>>> = members
                .iter()
                .map(|user| self.state.engine.member_info(&engine, user))
                .collect();
            let list = proto::Members {
                members: members
                    .iter()
                    .zip(&infos)
                    .map(|(user, info)| (user.as_str(), info.as_deref()))
                    .collect(),
            };
            proto::subscription_succeeded(&channel, Some(&list))
        } else {
            proto::subscription_succeeded(&channel, None)
        };
        let key = subscription.key();
        self.channels.insert(channel.clone(), key);
        self.subs.insert(
            key,
            Sub {
                channel,
                kind,
                user,
                subscription,
            },
        );
        metrics::gauge!("switchboard_pusher_subscriptions").increment(1.0);
        self.write(&succeeded).await
    }

    async fn on_signin(&mut self, auth: &str, user_data: &str) -> Step {
        let app = self.app.clone();
        let app = &app.config;
        let valid = proto::user_auth_valid(&app.key, &app.secret, &self.socket_id, user_data, auth);
        let user = proto::user_id_of(user_data, "id")
            .map(|(id, _)| id)
            .filter(|id| switchboard_engine::valid_user_name(id) && !id.contains([',', '#']));
        let Some(user) = user.filter(|_| valid) else {
            metrics::counter!("switchboard_pusher_auth_failures_total").increment(1);
            return Err(Some(errors::UNAUTHORIZED));
        };
        self.strikes = 0;
        let info = proto::user_id_of(user_data, "id").and_then(|(_, info)| info);
        if let Some(old) = self.user.take().filter(|old| *old != user) {
            // Signed in as someone else now: the old user's channel goes.
            self.unsubscribe(&format!("{}{old}", proto::USER_CHANNEL_PREFIX));
        }
        self.registration
            .signed_in(&app.id, &user, self.terminator.clone());
        self.user = Some(user);
        self.user_info = info;
        self.write(&proto::signin_success(user_data)).await
    }

    async fn on_client_event(
        &mut self,
        event: String,
        channel: String,
        data: Box<RawValue>,
    ) -> Step {
        let key = self.channels.get(&channel).copied();
        let max = self.state.config.max_event_bytes;
        let problem = match key.and_then(|key| self.subs.get(&key)) {
            None => Some(format!(
                "client event on {channel}, which this connection is not subscribed to"
            )),
            Some(sub) if sub.kind == ChannelKind::Encrypted => Some(format!(
                "{channel}: client events are not taken on encrypted channels"
            )),
            Some(sub) if !matches!(sub.kind, ChannelKind::Private | ChannelKind::Presence) => Some(
                format!("{channel}: client events are only for private and presence channels"),
            ),
            Some(sub) if !sub.subscription.options().client_publish => Some(format!(
                "{channel}: clients may not publish in this channel's namespace"
            )),
            Some(_) if event.len() > MAX_EVENT_NAME => {
                Some(format!("event names are at most {MAX_EVENT_NAME} bytes"))
            }
            Some(_) if data.get().len() > max => Some(format!(
                "client event too large: its data is at most {max} bytes"
            )),
            Some(_) => None,
        };
        if let Some(why) = problem {
            self.strike().await?;
            return self.refuse(None, &why).await;
        }
        if !self.limit.take(std::time::Instant::now()) {
            metrics::counter!("switchboard_rate_limited_total").increment(1);
            self.strike().await?;
            return self
                .refuse(Some(errors::RATE_LIMITED.0), errors::RATE_LIMITED.1)
                .await;
        }
        self.strikes = 0;
        let draft = draft_of(&event, &data, Some(self.socket_id.clone()));
        let sub = key
            .and_then(|key| self.subs.get(&key))
            .expect("checked above");
        let published = sub.subscription.publish(draft).await;
        let engine_channel = sub.subscription.channel();
        let hooked = published.is_ok()
            && self.state.engine.records_hooks()
            && super::webhooks::any_wants(
                &self.state.pusher_apps,
                engine_channel,
                HookKind::ClientEvent,
            );
        if hooked {
            let text = serde_json::from_str::<String>(data.get())
                .unwrap_or_else(|_| data.get().to_owned());
            let hook = Hook {
                kind: HookKind::ClientEvent,
                channel: engine_channel.to_owned(),
                user: (sub.kind == ChannelKind::Presence).then(|| sub.user.clone()),
                time_ms: switchboard_engine::hooks::now_ms(),
                detail: Some(super::webhooks::client_event_detail(
                    &event,
                    &text,
                    &self.socket_id,
                )),
            };
            if let Err(cause) = self.state.engine.record_hook(hook).await {
                warn!(%cause, "a client event's webhook was not recorded");
            }
        }
        match published {
            // Not waited for: the sender hears nothing back either way.
            Ok(_receipt) => Ok(()),
            Err(EngineError::Forbidden(why)) => {
                self.refuse(None, &format!("{channel}: {why}")).await
            }
            Err(cause) => {
                warn!(%cause, "a pusher client event was not published");
                self.refuse(None, "the client event was not published; try again")
                    .await
            }
        }
    }
}
