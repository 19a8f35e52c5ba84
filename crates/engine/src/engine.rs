//! Channels, their members on this node, presence, typing, and every delivery.
//!
//! A [`Channel`] holds its members and, under the same lock, the id of the last
//! publication it delivered (`broadcast_id`) and its epoch. Joining reads that id under
//! the lock that registers the member: history up to it comes from the backend,
//! everything after it arrives on the member's queue, so a resume has no gap and no
//! duplicate however busy the channel is. A publication is delivered only once its
//! backend stored it, and only if its id is above `broadcast_id`, so a publication read
//! again to fill a gap is never sent twice.
//!
//! A member whose queue is full is cut off (a slow consumer: its door closes it, and it
//! resumes with `since`); so is every member when the channel's epoch changes under it
//! (a Redis that lost its data), since the ids they hold belong to the old stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::backend::{local::LocalBackend, Backend, Job, Outcome, Sink};
use crate::options::{ChannelOptions, Namespaces};
use crate::queue;
use crate::recovery::{self, Replay};
use crate::store::{Position, Publication, Store, StoreError, Window};
use crate::{names, RedisConfig};

/// Where the time comes from (tests set it).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    pub fn new(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    pub fn now(&self) -> SystemTime {
        (self.0)()
    }

    /// `now - age` as stored timestamps are written (RFC 3339, UTC, milliseconds).
    pub(crate) fn timestamp_before(&self, age: Duration) -> String {
        timestamp(
            self.now()
                .checked_sub(age)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        )
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new(SystemTime::now)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// A time as publications carry it.
pub(crate) fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Engine settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Publications sent on joining without `since` (`recover = "stream"`).
    pub recent_on_join: usize,
    /// Publications read at a time when replaying history.
    pub replay_page: usize,
    /// Events queued per member before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Publications waiting for the backend before publishers wait.
    pub write_queue: usize,
    /// Most publications stored in one commit (or one Redis pipeline).
    pub max_batch: usize,
    /// How long a nonce is remembered, whether or not its publication still is.
    pub nonce_ttl: Duration,
    /// What each channel keeps and allows.
    pub namespaces: Namespaces,
    pub clock: Clock,
    /// Record hooks (see [`crate::hooks`]); `None`: none are.
    pub hooks: Option<crate::hooks::HookConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            recent_on_join: 50,
            replay_page: 500,
            outbound_queue: 4096,
            write_queue: 16 * 1024,
            max_batch: 512,
            nonce_ttl: Duration::from_secs(86_400),
            namespaces: Namespaces::default(),
            clock: Clock::default(),
            hooks: None,
        }
    }
}

impl EngineConfig {
    pub fn with_namespaces(mut self, namespaces: Namespaces) -> Self {
        self.namespaces = namespaces;
        self
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Records hooks, removals and vacancies waiting as `hooks` says.
    pub fn with_hooks(mut self, hooks: crate::hooks::HookConfig) -> Self {
        self.hooks = Some(hooks);
        self
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The channel's options or name do not allow it.
    #[error("{0}")]
    Forbidden(&'static str),
    /// Taken, then not stored (the backend failed); safe to send again with its nonce.
    #[error("not stored: {0}")]
    NotStored(String),
    /// The history being replayed was trimmed under the replay: resume again.
    #[error("the history changed while it was replayed")]
    HistoryChanged,
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// A stored publication on its way to members, encoded at most once per wire format
/// however many members receive it.
#[derive(Debug)]
pub struct Delivery {
    pub publication: Publication,
    encoded: [OnceLock<Bytes>; FORMATS],
}

/// Notices a door may fall behind by before it misses some.
const NOTICES: usize = 1024;

/// How many wire formats a [`Delivery`] caches.
pub const FORMATS: usize = 6;

/// A door's wire format, as a slot in [`Delivery`]'s cache (`0..FORMATS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format(pub usize);

impl Delivery {
    pub fn new(publication: Publication) -> Self {
        Self {
            publication,
            encoded: Default::default(),
        }
    }

    /// The publication in `format`, encoded by the first member that asks.
    pub fn encoded(&self, format: Format, encode: impl FnOnce(&Publication) -> Bytes) -> Bytes {
        self.encoded[format.0]
            .get_or_init(|| encode(&self.publication))
            .clone()
    }
}

/// What a member receives from its channel.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A stored publication, in id order (its id beside it: members skip the ones their
    /// backlog held without touching the publication).
    Publication {
        id: u64,
        delivery: Arc<Delivery>,
    },
    /// A publication sent again to its sender: the acknowledgement of a retried nonce.
    Ack(Arc<Delivery>),
    Join(Arc<str>),
    Leave(Arc<str>),
    Typing {
        user: Arc<str>,
        is_typing: bool,
    },
    /// Binary data another member sent.
    Binary(Bytes),
    /// A publication of this member's could not be stored (the backend failed).
    Refused {
        nonce: Option<String>,
    },
}

/// Why a member was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its queue filled up: it did not keep up.
    Slow,
    /// The channel's epoch changed: its position belongs to the old stream.
    Reset,
    /// Publications it should have had could not be read (they were trimmed, or the
    /// store did not answer): it resumes, and is told what is lost.
    Missed,
}

const LIVE: u8 = 0;
const SLOW: u8 = 1;
const RESET: u8 = 2;
const MISSED: u8 = 3;

struct Member {
    user: Arc<str>,
    queue: Queue,
    ended: Arc<AtomicU8>,
}

/// Where a member's events go: a queue of its own, or its connection's [`Inbox`].
enum Queue {
    Own(queue::Sender<Outbound>),
    Shared(InboxWaker),
}

impl Queue {
    fn try_send(&self, id: u64, item: &Outbound) -> Result<(), ()> {
        let sent = match self {
            Queue::Own(tx) => tx
                .try_send(item.clone())
                .map_err(|e| e == queue::SendError::Full),
            Queue::Shared(waker) => waker
                .tx
                .try_send((id, item.clone()))
                .map_err(|e| matches!(e, mpsc::error::TrySendError::Full(_))),
        };
        match sent {
            // A closed queue's member is leaving.
            Ok(()) | Err(false) => Ok(()),
            Err(true) => Err(()),
        }
    }

    /// Tells a shared queue's connection that one of its members was cut off.
    fn cut(&self) {
        if let Queue::Shared(waker) = self {
            waker.wake();
        }
    }
}

/// The key no subscription has (member ids start at 1): a wake-up in an [`Inbox`].
const WAKE: u64 = 0;

/// One queue for the subscriptions of one connection (a door that carries many
/// channels over a socket): events arrive tagged with [`Subscription::key`], in each
/// channel's order. A connection that lets it fill up is slow: its members are cut off
/// ([`Inbox::recv`] says so, [`Subscription::ended`] says why). Its door may wake it
/// for its own reasons too ([`Inbox::waker`]).
#[derive(Debug)]
pub struct Inbox {
    waker: InboxWaker,
    rx: mpsc::Receiver<(u64, Outbound)>,
}

/// Wakes an [`Inbox`]'s reader: its next [`Inbox::recv`] returns `None`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InboxWaker {
    tx: mpsc::Sender<(u64, Outbound)>,
    woken: Arc<AtomicBool>,
}

impl InboxWaker {
    /// Wakes the reader, even when its inbox is full (it is reading then, and sees the
    /// wake-up at its next `recv`).
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        // Full: the reader has events to read first, and then sees the flag.
        let _ = self.tx.try_send((WAKE, Outbound::Refused { nonce: None }));
    }
}

impl Inbox {
    /// An inbox holding up to `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            waker: InboxWaker {
                tx,
                woken: Arc::new(AtomicBool::new(false)),
            },
            rx,
        }
    }

    /// What wakes this inbox's reader.
    pub fn waker(&self) -> InboxWaker {
        self.waker.clone()
    }

    /// The next event and the key of the subscription it is for; `None` when a member
    /// was cut off (see [`Subscription::ended`]) or a [`InboxWaker`] woke it since the
    /// last `None`.
    pub async fn recv(&mut self) -> Option<(u64, Outbound)> {
        if self.waker.woken.swap(false, Ordering::AcqRel) {
            return None;
        }
        match self.rx.recv().await.expect("the inbox holds a sender") {
            (WAKE, _) => {
                self.waker.woken.store(false, Ordering::Release);
                None
            }
            event => Some(event),
        }
    }

    /// The next event already queued, without waiting; `None` also when a wake-up is
    /// next (the next [`Inbox::recv`] returns it).
    pub fn try_recv(&mut self) -> Option<(u64, Outbound)> {
        if self.waker.woken.load(Ordering::Acquire) {
            return None;
        }
        match self.rx.try_recv().ok()? {
            (WAKE, _) => {
                self.waker.woken.store(true, Ordering::Release);
                None
            }
            event => Some(event),
        }
    }
}

struct State {
    members: HashMap<u64, Member>,
    /// Connections per user (when the channel keeps presence): a user counts once.
    users: BTreeMap<Arc<str>, usize>,
    /// What members said of themselves on joining (a Pusher presence member's
    /// `user_info`), for the users present here or on other nodes.
    infos: HashMap<Arc<str>, Arc<RawValue>>,
    /// The id of the last publication delivered (everything up to it is stored).
    broadcast_id: u64,
    epoch: Arc<str>,
}

/// Whom a delivery is for.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Member(u64),
    User(Arc<str>),
}

/// One channel as this node knows it.
pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    pub(crate) options: Arc<ChannelOptions>,
    backend: Arc<dyn Backend>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("name", &self.name).finish()
    }
}

impl Channel {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("channel lock")
    }

    pub(crate) fn broadcast_id(&self) -> u64 {
        self.state().broadcast_id
    }

    pub(crate) fn epoch(&self) -> Arc<str> {
        self.state().epoch.clone()
    }

    /// Whether it has members here.
    pub(crate) fn occupied(&self) -> bool {
        !self.state().members.is_empty()
    }

    /// The users with a connection here.
    pub(crate) fn users(&self) -> Vec<String> {
        self.state().users.keys().map(|u| u.to_string()).collect()
    }

    /// Takes `position` as where a channel with no members here stands (a node that
    /// stops hearing a channel when its last member leaves reads it again before the
    /// next use): nobody is cut off, and what members said of themselves is forgotten
    /// (a joiner reads it afresh).
    pub(crate) fn refresh_idle(&self, position: &Position) {
        let mut state = self.state();
        if !state.members.is_empty() {
            return;
        }
        if *state.epoch == *position.epoch {
            // A publication heard meanwhile may be newer than what was read.
            state.broadcast_id = state.broadcast_id.max(position.last_id);
        } else {
            state.epoch = Arc::from(position.epoch.as_str());
            state.broadcast_id = position.last_id;
        }
        state.infos.clear();
    }

    /// Delivers a stored publication and records it as delivered, under one lock: a
    /// member joining now either reads it from the store or receives it, never both.
    pub(crate) fn broadcast(&self, delivery: &Arc<Delivery>) {
        let mut state = self.state();
        if delivery.publication.id <= state.broadcast_id {
            // Delivered already (read again to fill a gap).
            return;
        }
        metrics::counter!("switchboard_messages_delivered_total")
            .increment(state.members.len() as u64);
        state.broadcast_id = delivery.publication.id;
        self.deliver_locked(
            &mut state,
            |_, _| true,
            Outbound::Publication {
                id: delivery.publication.id,
                delivery: delivery.clone(),
            },
        );
    }

    /// Takes the stream position the backend reports. When its epoch is not the one
    /// this channel had, the history its members hold is gone: every member is cut off
    /// (to resume, told it was not recovered) and delivery continues from `position`.
    /// True when that happened.
    pub(crate) fn reposition(&self, position: &Position) -> bool {
        let mut state = self.state();
        if *state.epoch == *position.epoch {
            return false;
        }
        warn!(channel = %self.name, old = %state.epoch, new = %position.epoch, "the channel's history was lost: a new epoch");
        state.epoch = Arc::from(position.epoch.as_str());
        state.broadcast_id = position.last_id;
        self.cut_all(&mut state, RESET);
        true
    }

    /// Delivery cannot go on from `broadcast_id` without a hole (missed publications
    /// could not be read): every member is cut off, to resume and be told what is lost,
    /// and delivery continues from `upto`.
    pub(crate) fn skip_to(&self, upto: u64) {
        let mut state = self.state();
        warn!(channel = %self.name, from = state.broadcast_id, upto, "missed messages could not be read; members resume");
        state.broadcast_id = state.broadcast_id.max(upto);
        self.cut_all(&mut state, MISSED);
    }

    /// Delivery goes on from `upto` without what came before it, which its members
    /// never had a claim to: they joined as the node started hearing the channel, and
    /// what was published in that moment is not kept (a channel with little or no
    /// history).
    pub(crate) fn pass_over(&self, upto: u64) {
        let mut state = self.state();
        state.broadcast_id = state.broadcast_id.max(upto);
    }

    /// Cuts every member off for `reason`.
    fn cut_all(&self, state: &mut State, reason: u8) {
        let occupied = !state.members.is_empty();
        for (_, member) in state.members.drain() {
            member.ended.store(reason, Ordering::Relaxed);
            member.queue.cut();
        }
        let users = std::mem::take(&mut state.users);
        for user in users.keys() {
            // Nobody is left here to be told.
            if self.backend.left(&self.name, user) {
                state.infos.remove(user);
            }
        }
        if occupied {
            self.backend.occupancy(&self.name, false);
        }
    }

    /// Sends `item` to `target`.
    pub(crate) fn send_to(&self, target: &Target, item: Outbound) {
        self.deliver(
            |id, member| match target {
                Target::Member(me) => id == *me,
                Target::User(user) => member.user == *user,
            },
            item,
        );
    }

    /// A join or leave another node announced (a join with what the member said of
    /// itself).
    pub(crate) fn remote_presence(&self, joined: bool, user: &str, info: Option<Box<RawValue>>) {
        let user: Arc<str> = Arc::from(user);
        {
            let mut state = self.state();
            match info {
                Some(info) if joined => {
                    state.infos.insert(user.clone(), Arc::from(info));
                }
                _ if !joined => {
                    state.infos.remove(&user);
                }
                _ => {}
            }
        }
        if !(self.options.presence && self.options.join_leave) {
            return;
        }
        let item = if joined {
            Outbound::Join(user.clone())
        } else {
            Outbound::Leave(user.clone())
        };
        self.deliver(|_, m| m.user != user, item);
    }

    /// Typing another node relayed.
    pub(crate) fn remote_typing(&self, user: &str, is_typing: bool) {
        let user: Arc<str> = Arc::from(user);
        let item = Outbound::Typing {
            user: user.clone(),
            is_typing,
        };
        self.deliver(|_, m| m.user != user, item);
    }

    /// Binary data another node relayed.
    pub(crate) fn remote_binary(&self, data: Bytes) {
        self.deliver(|_, _| true, Outbound::Binary(data));
    }

    fn deliver(&self, filter: impl Fn(u64, &Member) -> bool, item: Outbound) {
        let mut state = self.state();
        self.deliver_locked(&mut state, filter, item);
    }

    /// Sends to the selected members; members whose queue is full are cut off (and
    /// their users leave, if it was their last connection).
    fn deliver_locked(
        &self,
        state: &mut State,
        filter: impl Fn(u64, &Member) -> bool,
        item: Outbound,
    ) {
        let mut dropped = send_to(state, filter, &item);
        let cut = !dropped.is_empty();
        while let Some(user) = dropped.pop() {
            if self.leave(state, &user) {
                let leave = Outbound::Leave(user.clone());
                dropped.extend(send_to(state, |_, m| m.user != user, &leave));
            }
        }
        if cut && state.members.is_empty() {
            self.backend.occupancy(&self.name, false);
        }
    }

    /// One connection of `user` left; true when its leave is to be announced here.
    fn leave(&self, state: &mut State, user: &Arc<str>) -> bool {
        let announce =
            self.options.presence && leave_user(state, user) && self.backend.left(&self.name, user);
        if announce {
            // Gone everywhere (a cluster says so with its leave, to every node).
            state.infos.remove(user);
        }
        announce && self.options.join_leave
    }
}

fn send_to(
    state: &mut State,
    filter: impl Fn(u64, &Member) -> bool,
    item: &Outbound,
) -> Vec<Arc<str>> {
    let mut dropped = Vec::new();
    state.members.retain(|&id, member| {
        if !filter(id, member) {
            return true;
        }
        match member.queue.try_send(id, item) {
            Ok(()) => true,
            Err(()) => {
                // A slow consumer: cut it off; it resumes later with `since`.
                member.ended.store(SLOW, Ordering::Relaxed);
                member.queue.cut();
                dropped.push(member.user.clone());
                false
            }
        }
    });
    dropped
}

/// Removes one connection of `user` from the presence count; true when it was the last.
fn leave_user(state: &mut State, user: &Arc<str>) -> bool {
    match state.users.get_mut(user) {
        Some(count) if *count > 1 => {
            *count -= 1;
            false
        }
        Some(_) => {
            state.users.remove(user);
            true
        }
        None => false,
    }
}

pub(crate) struct Inner {
    pub(crate) config: EngineConfig,
    /// Notices for this node's doors, from any node.
    pub(crate) notices: tokio::sync::broadcast::Sender<Bytes>,
    /// Posts to this node's doors alone ([`Engine::post`]), apart from the notices so a
    /// flood of them cannot crowd a server API's notice out.
    pub(crate) posts: tokio::sync::broadcast::Sender<Bytes>,
    backend: Arc<dyn Backend>,
    channels: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
    next_member: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("backend", &self.backend)
            .finish()
    }
}

impl Inner {
    pub(crate) fn channel_now(&self, name: &str) -> Option<Arc<Channel>> {
        self.channels
            .lock()
            .expect("channels lock")
            .get(name)
            .cloned()
    }

    pub(crate) fn channels_now(&self) -> Vec<Arc<Channel>> {
        let channels = self.channels.lock().expect("channels lock");
        channels.values().cloned().collect()
    }
}

/// The channels of one server. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Where a subscriber asks to resume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// The last publication id it has.
    pub since: Option<u64>,
    /// The epoch that id belongs to; `None` skips the epoch check.
    pub epoch: Option<String>,
    /// How many of the newest publications a subscriber without a usable `since` is
    /// sent (`recover = "stream"`); `None`: the engine's `recent_on_join`.
    pub recent: Option<usize>,
}

/// What a publisher sends: `text` and/or `data`, an optional event name and nonce.
#[derive(Debug, Default)]
pub struct Draft {
    pub text: Option<String>,
    pub data: Option<Box<RawValue>>,
    pub event: Option<String>,
    pub nonce: Option<String>,
    /// The publishing connection's id and token `info`, stored with the publication
    /// for doors that show them (see [`Publication::client`]).
    pub client: Option<String>,
    pub client_info: Option<Box<RawValue>>,
}

/// Settles once the backend stored the publication (or found its nonce stored).
#[derive(Debug)]
pub struct Receipt(oneshot::Receiver<Result<Outcome, String>>);

impl Receipt {
    pub async fn settled(self) -> Result<Outcome, EngineError> {
        match self.0.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(cause)) => Err(EngineError::NotStored(cause)),
            Err(_) => Err(EngineError::ShuttingDown),
        }
    }
}

impl Engine {
    /// A single node: history in `store`, written by a thread of its own.
    pub fn local(store: Arc<dyn Store>, config: EngineConfig) -> Self {
        let backend = Arc::new(LocalBackend::new(store, &config));
        Self::with_backend(backend, config)
    }

    /// A node of a cluster whose channels, history and presence are shared over Redis.
    /// Fails when Redis cannot be reached now; later outages are ridden out (see
    /// [`Engine::health`]).
    pub async fn redis(redis: RedisConfig, config: EngineConfig) -> Result<Self, EngineError> {
        let backend = crate::backend::redis::RedisBackend::connect(&redis, &config).await?;
        Ok(Self::with_backend(Arc::new(backend), config))
    }

    fn with_backend(backend: Arc<dyn Backend>, config: EngineConfig) -> Self {
        let inner = Arc::new(Inner {
            config,
            notices: tokio::sync::broadcast::channel(NOTICES).0,
            posts: tokio::sync::broadcast::channel(NOTICES).0,
            backend: backend.clone(),
            channels: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(1),
        });
        backend.start(Sink(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// The options of `channel`'s namespace.
    pub fn options(&self, channel: &str) -> &Arc<ChannelOptions> {
        self.inner.config.namespaces.options(channel)
    }

    async fn channel(&self, name: &str) -> Result<Arc<Channel>, EngineError> {
        if let Some(channel) = self.inner.channel_now(name) {
            if self.inner.backend.follows_idle() || channel.occupied() {
                return Ok(channel);
            }
            // Nobody here: this node has not heard the channel since its last member
            // left, so where it stands is read again.
            let position = self.inner.backend.open(name).await?;
            channel.refresh_idle(&position);
            return Ok(channel);
        }
        let position = self.inner.backend.open(name).await?;
        let mut made = false;
        let channel = {
            let mut channels = self.inner.channels.lock().expect("channels lock");
            let channel = channels.entry(Arc::from(name)).or_insert_with(|| {
                made = true;
                Arc::new(Channel {
                    name: Arc::from(name),
                    options: self.options(name).clone(),
                    backend: self.inner.backend.clone(),
                    state: Mutex::new(State {
                        members: HashMap::new(),
                        users: BTreeMap::new(),
                        infos: HashMap::new(),
                        broadcast_id: position.last_id,
                        epoch: Arc::from(position.epoch.as_str()),
                    }),
                })
            });
            channel.clone()
        };
        if made {
            self.inner.backend.opened(&channel);
        }
        Ok(channel)
    }

    /// Subscribes `user` to `channel`. The backlog (see [`Subscription::next_backlog`])
    /// is what `resume` asks for and the channel still keeps; live events follow it.
    pub async fn subscribe(
        &self,
        channel: &str,
        user: &str,
        resume: Resume,
    ) -> Result<Subscription, EngineError> {
        let (tx, events) = queue::channel(self.inner.config.outbound_queue.max(1));
        self.join(channel, user, resume, Queue::Own(tx), Some(events))
            .await
    }

    /// Like [`Engine::subscribe`], with live events going to `inbox` (tagged with the
    /// subscription's [`Subscription::key`]) instead of [`Subscription::recv`].
    pub async fn subscribe_in(
        &self,
        inbox: &Inbox,
        channel: &str,
        user: &str,
        resume: Resume,
    ) -> Result<Subscription, EngineError> {
        self.join(channel, user, resume, Queue::Shared(inbox.waker()), None)
            .await
    }

    /// Like [`Engine::subscribe_in`], for a member that says something of itself
    /// (`info`, any JSON: a Pusher presence member's `user_info`), which every node's
    /// [`Engine::member_info`] then gives while the user is present.
    pub async fn subscribe_member(
        &self,
        inbox: &Inbox,
        channel: &str,
        user: &str,
        info: Option<Box<RawValue>>,
        resume: Resume,
    ) -> Result<Subscription, EngineError> {
        let info = info.map(Arc::from);
        self.join_with(
            channel,
            user,
            info,
            resume,
            Queue::Shared(inbox.waker()),
            None,
        )
        .await
    }

    /// What `user`, present in `channel`, said of itself on joining, where this node
    /// knows it (it has members in the channel).
    pub fn member_info(&self, channel: &str, user: &str) -> Option<Arc<RawValue>> {
        self.inner
            .channel_now(channel)?
            .state()
            .infos
            .get(user)
            .cloned()
    }

    /// A new member. An anonymous one (user `""`) counts in no presence.
    async fn join(
        &self,
        channel: &str,
        user: &str,
        resume: Resume,
        queue: Queue,
        events: Option<queue::Receiver<Outbound>>,
    ) -> Result<Subscription, EngineError> {
        self.join_with(channel, user, None, resume, queue, events)
            .await
    }

    async fn join_with(
        &self,
        channel: &str,
        user: &str,
        info: Option<Arc<RawValue>>,
        resume: Resume,
        queue: Queue,
        events: Option<queue::Receiver<Outbound>>,
    ) -> Result<Subscription, EngineError> {
        if !names::may_subscribe(channel, user) {
            return Err(EngineError::Forbidden("the channel is for other users"));
        }
        let channel = self.channel(channel).await?;
        let options = channel.options.clone();
        let counted = options.presence && !user.is_empty();
        let user: Arc<str> = Arc::from(user);
        let ended = Arc::new(AtomicU8::new(LIVE));
        let id = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        let (upto, epoch, mut members, first) = {
            let mut state = channel.state();
            if state.members.is_empty() {
                channel.backend.occupancy(&channel.name, true);
            }
            let first = counted && {
                let count = state.users.entry(user.clone()).or_insert(0);
                *count += 1;
                *count == 1
            };
            if let (true, Some(info)) = (counted, &info) {
                // The latest connection's word is the member's.
                state.infos.insert(user.clone(), info.clone());
            }
            state.members.insert(
                id,
                Member {
                    user: user.clone(),
                    queue,
                    ended: ended.clone(),
                },
            );
            let members: Vec<String> = if options.presence {
                state.users.keys().map(|u| u.to_string()).collect()
            } else {
                Vec::new()
            };
            (state.broadcast_id, state.epoch.clone(), members, first)
        };
        let plan = recovery::plan(
            &resume,
            &epoch,
            upto,
            &options,
            self.inner.config.recent_on_join,
        );
        let mut subscription = Subscription {
            engine: self.clone(),
            channel: channel.clone(),
            id,
            user: user.clone(),
            members: Vec::new(),
            last_id: upto,
            epoch,
            recovered: plan.recovered,
            backlog: Backlog {
                replay: Some(plan.replay),
                ready: None,
                kept: recovery::kept(upto, &options, &self.inner.config.clock),
                read_before: false,
            },
            events,
            typing: AtomicBool::new(false),
            ended,
        };
        if counted {
            match self
                .inner
                .backend
                .joined(&channel, &user, info.as_ref(), first)
                .await
            {
                Ok(joined) => {
                    if !joined.infos.is_empty() {
                        let mut state = channel.state();
                        for (other, said) in joined.infos {
                            if *other != *user {
                                state
                                    .infos
                                    .insert(Arc::from(other.as_str()), Arc::from(said));
                            }
                        }
                    }
                    members.extend(joined.others);
                    members.sort();
                    members.dedup();
                    if joined.announce && first && options.join_leave {
                        channel.deliver(|mid, _| mid != id, Outbound::Join(user.clone()));
                    }
                }
                // A cluster whose Redis is away: this node's members for now; presence
                // is told again when it is back.
                Err(cause) => warn!(%cause, "channel members from this node only"),
            }
        }
        subscription.members = members;
        let first_page = subscription.read_page().await?;
        if let (Some(true), Replay::After(since)) = (plan.recovered, plan.replay) {
            let ids: Vec<u64> = first_page.iter().map(|p| p.id).collect();
            subscription.recovered = Some(recovery::complete(since, upto, &ids));
        }
        subscription.backlog.ready = Some(first_page);
        Ok(subscription)
    }

    /// Publishes to `channel` as the server (for the HTTP API and tools), whatever the
    /// channel's options say of clients; `from` names a user when given. A repeated
    /// `nonce` from the same sender is stored once.
    pub async fn publish(
        &self,
        channel: &str,
        from: Option<&str>,
        draft: Draft,
    ) -> Result<Receipt, EngineError> {
        let channel = self.channel(channel).await?;
        self.submit(&channel, from.map(Arc::from), None, draft)
            .await
    }

    /// Tells `channel`'s members, here and on the other nodes, that `user` is typing (or
    /// stopped), for a client that has no member here to send it through (one that
    /// posts its events over HTTP). Not stored. The caller stops it when it expires.
    pub async fn typing(
        &self,
        channel: &str,
        user: &str,
        is_typing: bool,
    ) -> Result<(), EngineError> {
        if !self.options(channel).typing {
            return Err(EngineError::Forbidden(
                "typing indicators are off in this channel",
            ));
        }
        let channel = self.channel(channel).await?;
        let user: Arc<str> = Arc::from(user);
        let item = Outbound::Typing {
            user: user.clone(),
            is_typing,
        };
        channel.deliver(|_, m| m.user != user, item);
        channel.backend.typing(&channel.name, &user, is_typing);
        Ok(())
    }

    async fn submit(
        &self,
        channel: &Arc<Channel>,
        from: Option<Arc<str>>,
        member: Option<u64>,
        draft: Draft,
    ) -> Result<Receipt, EngineError> {
        let publication = Publication {
            id: 0,
            channel: channel.name.to_string(),
            from: from.map(|f| f.to_string()),
            text: draft.text,
            data: draft.data,
            event: draft.event,
            timestamp: timestamp(self.inner.config.clock.now()),
            nonce: draft.nonce,
            client: draft.client,
            client_info: draft.client_info,
        };
        let (done, settled) = oneshot::channel();
        self.inner
            .backend
            .publish(Job {
                channel: channel.clone(),
                publication,
                member,
                done,
            })
            .await?;
        Ok(Receipt(settled))
    }

    /// The publication `from` sent to `channel` with `nonce`, while it is remembered.
    pub async fn find_nonce(
        &self,
        channel: &str,
        from: Option<&str>,
        nonce: &str,
    ) -> Result<Option<Publication>, EngineError> {
        Ok(self.inner.backend.find_nonce(channel, from, nonce).await?)
    }

    /// Publications of `channel` after `since` that it still keeps, oldest first.
    pub async fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<Publication>, EngineError> {
        let channel = self.channel(channel).await?;
        let upto = channel.broadcast_id();
        let kept = recovery::kept(upto, &channel.options, &self.inner.config.clock);
        let window = Window {
            after: since.max(kept.after),
            upto,
            limit,
            newest: false,
            not_before: kept.since,
        };
        Ok(self.inner.backend.read(&channel.name, window).await?)
    }

    /// The newest publications of `channel` that it still keeps, up to `limit`, below
    /// `before` when given; oldest first.
    pub async fn history_newest(
        &self,
        channel: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Publication>, EngineError> {
        let channel = self.channel(channel).await?;
        let last = channel.broadcast_id();
        let kept = recovery::kept(last, &channel.options, &self.inner.config.clock);
        let window = Window {
            after: kept.after,
            upto: before.map_or(last, |b| b.saturating_sub(1).min(last)),
            limit,
            newest: true,
            not_before: kept.since,
        };
        Ok(self.inner.backend.read(&channel.name, window).await?)
    }

    /// Sends `payload` to every node's doors (through [`Engine::notices`]), this one's
    /// included, once each: how a server API call reaches a connection on another node.
    pub async fn notify_nodes(&self, payload: Bytes) -> Result<(), EngineError> {
        Ok(self.inner.backend.notify_nodes(payload).await?)
    }

    /// This node's address, fixed while the process runs: where [`Engine::post`] on any
    /// node of the cluster reaches this one.
    pub fn address(&self) -> &str {
        self.inner.backend.address()
    }

    /// Sends `payload` to the doors of the node at `address` alone (through its
    /// [`Engine::posts`]); false when no node there heard it (it stopped, or never
    /// was).
    pub async fn post(&self, address: &str, payload: Bytes) -> Result<bool, EngineError> {
        Ok(self.inner.backend.post(address, payload).await?)
    }

    /// The notices any node sent from now on.
    pub fn notices(&self) -> tokio::sync::broadcast::Receiver<Bytes> {
        self.inner.notices.subscribe()
    }

    /// The posts any node sends to this one from now on ([`Engine::post`]).
    pub fn posts(&self) -> tokio::sync::broadcast::Receiver<Bytes> {
        self.inner.posts.subscribe()
    }

    /// Where `channel`'s stream stands: its last publication id and its epoch.
    pub async fn position(&self, channel: &str) -> Result<Position, EngineError> {
        let channel = self.channel(channel).await?;
        let state = channel.state();
        Ok(Position {
            last_id: state.broadcast_id,
            epoch: state.epoch.to_string(),
        })
    }

    /// Removes every publication `channel` keeps; its ids go on where they were, under
    /// the same epoch (a resume from before finds the hole and is told so).
    pub async fn remove_history(&self, channel: &str) -> Result<(), EngineError> {
        let channel = self.channel(channel).await?;
        let upto = channel.broadcast_id();
        Ok(self
            .inner
            .backend
            .remove_history(&channel.name, upto)
            .await?)
    }

    /// Records a hook of a door's own (a client event), when hooks are recorded.
    pub async fn record_hook(&self, hook: crate::Hook) -> Result<(), EngineError> {
        if self.inner.config.hooks.is_none() {
            return Ok(());
        }
        Ok(self.inner.backend.record_hook(hook).await?)
    }

    /// Whether hooks are recorded.
    pub fn records_hooks(&self) -> bool {
        self.inner.config.hooks.is_some()
    }

    /// Up to `max` hooks due now, oldest first, each taken until [`Engine::hook_sent`]
    /// (in a cluster, for a lease of `lease`: one not sent by then goes back to the queue).
    pub async fn take_hooks(
        &self,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<crate::hooks::Taken>, EngineError> {
        Ok(self.inner.backend.take_hooks(max, lease).await?)
    }

    /// A taken hook was sent (or given up on): it leaves the queue.
    pub async fn hook_sent(&self, taken: &crate::hooks::Taken) -> Result<(), EngineError> {
        Ok(self.inner.backend.hook_sent(taken).await?)
    }

    /// Keeps a taken hook for another `lease` (while its sending is retried).
    pub async fn keep_hook(
        &self,
        taken: &crate::hooks::Taken,
        lease: Duration,
    ) -> Result<(), EngineError> {
        Ok(self.inner.backend.keep_hook(taken, lease).await?)
    }

    /// Hooks waiting to be taken, delayed ones included.
    pub async fn hooks_waiting(&self) -> Result<usize, EngineError> {
        Ok(self.inner.backend.hooks_waiting().await?)
    }

    /// The users in `channel` now, sorted (on every node of a cluster); none where the
    /// channel keeps no presence.
    pub async fn presence(&self, channel: &str) -> Result<Vec<String>, EngineError> {
        if !self.options(channel).presence {
            return Ok(Vec::new());
        }
        Ok(self.inner.backend.members(channel).await?)
    }

    /// Channels with users in them and how many each has (on every node of a cluster).
    pub async fn channels(&self) -> Result<Vec<(String, usize)>, EngineError> {
        Ok(self.inner.backend.channels().await?)
    }

    /// Channels with members, anonymous ones included, on any node of a cluster, sorted.
    pub async fn occupied_channels(&self) -> Result<Vec<String>, EngineError> {
        Ok(self.inner.backend.occupied().await?)
    }

    /// Channels with users on this node now.
    pub fn local_channels(&self) -> usize {
        self.inner
            .channels_now()
            .iter()
            .filter(|channel| !channel.state().users.is_empty())
            .count()
    }

    /// `None` on a single node; in a cluster, whether Redis answered the last exchange.
    pub fn health(&self) -> Option<bool> {
        self.inner.backend.health()
    }

    /// Leaves the cluster before shutting down: this node's users leave every member
    /// list at once instead of at the presence expiry (bounded).
    pub async fn depart(&self) {
        self.inner.backend.depart().await;
    }

    /// Stops taking publications and waits until everything taken is settled.
    pub fn shutdown(&self) {
        self.inner.backend.shutdown();
    }
}

/// History still to send to a new subscriber.
struct Backlog {
    replay: Option<Replay>,
    /// The first page, read when subscribing (it decides `recovered`).
    ready: Option<Vec<Publication>>,
    /// What the channel kept when this member joined.
    kept: recovery::Kept,
    /// Whether a page was read already.
    read_before: bool,
}

/// A connection's place in a channel. Dropping it leaves the channel.
pub struct Subscription {
    engine: Engine,
    channel: Arc<Channel>,
    id: u64,
    user: Arc<str>,
    members: Vec<String>,
    last_id: u64,
    epoch: Arc<str>,
    recovered: Option<bool>,
    backlog: Backlog,
    /// `None` in an [`Inbox`].
    events: Option<queue::Receiver<Outbound>>,
    /// Whether the others were last told this member is typing.
    typing: AtomicBool,
    ended: Arc<AtomicU8>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel.name)
            .field("user", &self.user)
            .finish()
    }
}

impl Subscription {
    /// What tags this subscription's events in an [`Inbox`].
    pub fn key(&self) -> u64 {
        self.id
    }

    /// Whether an event from an [`Inbox`] is to be sent: publications its backlog held
    /// are not.
    pub fn wants(&self, item: &Outbound) -> bool {
        !matches!(item, Outbound::Publication { id, .. } if *id <= self.last_id)
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn channel(&self) -> &str {
        &self.channel.name
    }

    pub fn options(&self) -> &ChannelOptions {
        &self.channel.options
    }

    /// The users in the channel when this member joined, sorted (empty where the
    /// channel keeps no presence).
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// The channel's last publication id when this member joined: the backlog goes up
    /// to it, live publications follow it.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// With `since`: whether the backlog holds every publication after it.
    pub fn recovered(&self) -> Option<bool> {
        self.recovered
    }

    async fn read_page(&mut self) -> Result<Vec<Publication>, EngineError> {
        let page = self.engine.inner.config.replay_page.max(1);
        let (upto, kept_after) = (self.last_id, self.backlog.kept.after);
        let window = match self.backlog.replay.take() {
            None => return Ok(Vec::new()),
            Some(Replay::Newest(limit)) => Window {
                after: kept_after,
                upto,
                limit,
                newest: true,
                not_before: self.backlog.kept.since.clone(),
            },
            Some(Replay::After(after)) if after.max(kept_after) >= upto => return Ok(Vec::new()),
            Some(Replay::After(after)) => Window {
                after: after.max(kept_after),
                upto,
                limit: page,
                newest: false,
                not_before: self.backlog.kept.since.clone(),
            },
        };
        let (after, continued) = (window.after, self.backlog.read_before);
        let paged = !window.newest;
        let publications = self
            .engine
            .inner
            .backend
            .read(&self.channel.name, window)
            .await?;
        self.backlog.read_before = true;
        if paged {
            let ids: Vec<u64> = publications.iter().map(|p| p.id).collect();
            // After the first page (which `recovered` speaks for), what was promised
            // must follow without a hole: history trimmed meanwhile ends the replay,
            // and the subscriber resumes again.
            if continued && !recovery::continues(after, &ids) {
                return Err(EngineError::HistoryChanged);
            }
            if let Some(last) = publications.last() {
                self.backlog.replay = Some(Replay::After(last.id));
            }
        }
        Ok(publications)
    }

    /// The next page of history to send before any live event, oldest first; an empty
    /// page once it is all sent. A resume from far back comes in pages, so it never
    /// sits in memory whole.
    pub async fn next_backlog(&mut self) -> Result<Vec<Publication>, EngineError> {
        match self.backlog.ready.take() {
            Some(page) if !page.is_empty() => Ok(page),
            Some(_) => Ok(Vec::new()),
            None => self.read_page().await,
        }
    }

    /// The next live event, in order after the backlog; `None` once this member was cut
    /// off (see [`Subscription::ended`]). A publication the backlog held is skipped.
    /// Always `None` for a subscription in an [`Inbox`].
    pub async fn recv(&mut self) -> Option<Outbound> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Subscription::recv`] as a poll: `Pending` (and the task woken later) while no
    /// event is queued.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Outbound>> {
        let Some(events) = self.events.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        loop {
            match std::task::ready!(events.poll_recv(cx)) {
                Some(Outbound::Publication { id, .. }) if id <= self.last_id => continue,
                item => return std::task::Poll::Ready(item),
            }
        }
    }

    /// Like [`Subscription::recv`], without waiting.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let events = self.events.as_mut()?;
        loop {
            match events.try_recv()? {
                Outbound::Publication { id, .. } if id <= self.last_id => continue,
                item => return Some(item),
            }
        }
    }

    /// Why this member was cut off, once it was.
    pub fn ended(&self) -> Option<Ended> {
        match self.ended.load(Ordering::Relaxed) {
            SLOW => Some(Ended::Slow),
            RESET => Some(Ended::Reset),
            MISSED => Some(Ended::Missed),
            _ => None,
        }
    }

    /// Publishes as this member (its user is the sender), if the channel takes client
    /// publications. The sender's acknowledgement is the publication's delivery.
    pub async fn publish(&self, draft: Draft) -> Result<Receipt, EngineError> {
        if !self.channel.options.client_publish {
            return Err(EngineError::Forbidden(
                "clients may not publish in this channel",
            ));
        }
        let from = (!self.user.is_empty()).then(|| self.user.clone());
        self.engine
            .submit(&self.channel, from, Some(self.id), draft)
            .await
    }

    /// Whether the others were last told this member is typing.
    pub fn is_typing(&self) -> bool {
        self.typing.load(Ordering::Relaxed)
    }

    /// Tells the other users this one is typing (or stopped). Not stored. A member that
    /// leaves while typing is reported as stopped.
    pub fn typing(&self, is_typing: bool) -> Result<(), EngineError> {
        if !self.channel.options.typing {
            return Err(EngineError::Forbidden(
                "typing indicators are off in this channel",
            ));
        }
        self.typing.store(is_typing, Ordering::Relaxed);
        let user = self.user.clone();
        let item = Outbound::Typing {
            user: user.clone(),
            is_typing,
        };
        self.channel.deliver(|_, m| m.user != user, item);
        self.channel
            .backend
            .typing(&self.channel.name, &self.user, is_typing);
        Ok(())
    }

    /// Relays binary data to the channel's other connections as it is.
    pub fn relay_binary(&self, data: Bytes) -> Result<(), EngineError> {
        if !self.channel.options.client_publish {
            return Err(EngineError::Forbidden(
                "clients may not publish in this channel",
            ));
        }
        let me = self.id;
        self.channel.backend.binary(&self.channel.name, &data);
        self.channel
            .deliver(|id, _| id != me, Outbound::Binary(data));
        Ok(())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.is_typing() {
            // Typing was allowed when it started.
            let _ = self.typing(false);
        }
        let channel = &self.channel;
        let mut state = channel.state();
        if state.members.remove(&self.id).is_none() {
            // Already cut off, presence included.
            return;
        }
        if channel.leave(&mut state, &self.user) {
            let leave = Outbound::Leave(self.user.clone());
            channel.deliver_locked(&mut state, |_, _| true, leave);
        }
        if state.members.is_empty() {
            channel.backend.occupancy(&channel.name, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn a_new_epoch_cuts_every_member_off_and_resumes_say_so() {
        let engine = Engine::local(Arc::new(MemoryStore::new()), EngineConfig::default());
        let mut member = engine.subscribe("c", "a", Resume::default()).await.unwrap();
        let old = member.epoch().to_owned();
        let channel = engine.inner.channel_now("c").unwrap();
        let same = Position {
            last_id: 0,
            epoch: old.clone(),
        };
        assert!(!channel.reposition(&same));
        assert!(member.ended().is_none());
        let lost = Position {
            last_id: 7,
            epoch: "other".into(),
        };
        assert!(channel.reposition(&lost));
        assert_eq!(member.ended(), Some(Ended::Reset));
        assert!(member.recv().await.is_none());
        assert!(engine.presence("c").await.unwrap().is_empty());
        let resume = Resume {
            since: Some(3),
            epoch: Some(old),
            ..Resume::default()
        };
        let back = engine.subscribe("c", "a", resume).await.unwrap();
        assert_eq!((back.epoch(), back.last_id()), ("other", 7));
        assert_eq!(back.recovered(), Some(false));
        assert_eq!(back.members(), ["a"]);
    }
}
