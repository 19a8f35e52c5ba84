//! Rooms, members, presence, typing, message ids, and the writer that stores and then
//! broadcasts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cluster::{Cluster, ClusterConfig, Incoming, PostOutcome};
use crate::event;
use crate::store::{HistoryStore, StoreError, StoredMessage};

/// Hub settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// Messages sent on join without `since`.
    pub recent_on_join: usize,
    /// Messages read from the store at a time when replaying history.
    pub replay_page: usize,
    /// Events queued per connection before it counts as a slow consumer (closed with 4008).
    pub outbound_queue: usize,
    /// Messages waiting for the writer before posters wait.
    pub write_queue: usize,
    /// Most messages stored in one commit.
    pub max_batch: usize,
    /// The limits announced in every `welcome` (enforced by whoever serves the room).
    pub limits: Option<event::Limits>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            recent_on_join: 50,
            replay_page: 500,
            outbound_queue: 4096,
            write_queue: 16 * 1024,
            max_batch: 512,
            limits: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the hub is shutting down")]
    ShuttingDown,
}

/// Work for the cluster, done in order by one task: presence changes must reach Redis
/// in the order they happened here.
enum Op {
    Join {
        room: Arc<str>,
        user: Arc<str>,
        reply: oneshot::Sender<Result<Vec<String>, StoreError>>,
    },
    Leave {
        room: Arc<str>,
        user: Arc<str>,
    },
    Typing {
        room: Arc<str>,
        user: Arc<str>,
        is_typing: bool,
    },
    Binary {
        room: Arc<str>,
        data: Bytes,
    },
    /// Tell Redis this node's presence again, all of it (after an outage).
    Resync,
    /// Leave the cluster: this node's users leave, its heartbeat key goes.
    Depart(oneshot::Sender<()>),
}

/// What a connection receives from its room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A stored message (its id, and its JSON event encoded once for every member).
    Message(u64, Bytes),
    /// Any other JSON event, encoded once for every member.
    Text(Bytes),
    /// Binary data another member sent.
    Binary(Bytes),
}

struct Member {
    user: Arc<str>,
    tx: mpsc::Sender<Outbound>,
    /// Set when the member's queue overflowed and it was dropped from the room.
    slow: Arc<AtomicBool>,
}

#[derive(Default)]
struct Shared {
    members: HashMap<u64, Member>,
    /// Connections per user: presence counts a user once.
    users: BTreeMap<Arc<str>, usize>,
    /// The id of the last message broadcast (everything up to it is stored).
    broadcast_id: u64,
}

/// Id assignment and de-duplication, held across the hand-off to the writer so ids reach
/// it in order.
struct Sequence {
    last_id: u64,
    /// Whether a nonce missing from `nonces` may still be in the store (the room had
    /// history when loaded, or stored nonces were evicted).
    store_may_know: bool,
    nonces: HashMap<(Arc<str>, String), u64>,
}

struct Room {
    name: Arc<str>,
    shared: Mutex<Shared>,
    sequence: tokio::sync::Mutex<Sequence>,
    /// In a cluster: where presence changes, typing and binary data go.
    ops: Option<mpsc::UnboundedSender<Op>>,
}

impl Room {
    fn send_to(
        &self,
        shared: &mut Shared,
        filter: impl Fn(u64, &Member) -> bool,
        item: &Outbound,
    ) -> Vec<Arc<str>> {
        let mut dropped = Vec::new();
        shared.members.retain(|&id, member| {
            if !filter(id, member) {
                return true;
            }
            match member.tx.try_send(item.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // A slow consumer: cut it off; it resumes later with `since`.
                    member.slow.store(true, Ordering::Relaxed);
                    dropped.push(member.user.clone());
                    false
                }
            }
        });
        dropped
    }

    /// Sends to the selected members; members whose queue is full are dropped (and their
    /// users leave, if it was their last connection).
    fn deliver(&self, filter: impl Fn(u64, &Member) -> bool, item: Outbound) {
        let mut shared = self.shared.lock().expect("room lock");
        self.deliver_locked(&mut shared, filter, item);
    }

    /// Broadcasts a stored message and records it as broadcast, under one lock: a member
    /// joining now either finds it in the store or receives it live, never both.
    fn broadcast_stored(&self, message: &StoredMessage) {
        let mut shared = self.shared.lock().expect("room lock");
        if message.id <= shared.broadcast_id {
            // In a cluster, already sent (read from the store to fill a gap).
            return;
        }
        metrics::counter!("switchboard_messages_delivered_total")
            .increment(shared.members.len() as u64);
        shared.broadcast_id = message.id;
        let item = Outbound::Message(message.id, event::message(message));
        self.deliver_locked(&mut shared, |_, _| true, item);
    }

    fn deliver_locked(
        &self,
        shared: &mut Shared,
        filter: impl Fn(u64, &Member) -> bool,
        item: Outbound,
    ) {
        let mut dropped = self.send_to(shared, filter, &item);
        while let Some(user) = dropped.pop() {
            if leave_user(shared, &user) {
                if self.leave_cluster(&user) {
                    continue;
                }
                let leave = Outbound::Text(event::presence("leave", &user));
                dropped.extend(self.send_to(shared, |_, m| m.user != user, &leave));
            }
        }
    }
}

impl Room {
    /// In a cluster, the leave of a user's last connection here goes to Redis (which
    /// tells every node, this one included, if it was the user's last node); true then.
    fn leave_cluster(&self, user: &Arc<str>) -> bool {
        let Some(ops) = &self.ops else { return false };
        let _ = ops.send(Op::Leave {
            room: self.name.clone(),
            user: user.clone(),
        });
        true
    }
}

/// Removes one connection of `user` from the presence count; true when it was the last.
fn leave_user(shared: &mut Shared, user: &Arc<str>) -> bool {
    match shared.users.get_mut(user) {
        Some(count) if *count > 1 => {
            *count -= 1;
            false
        }
        Some(_) => {
            shared.users.remove(user);
            true
        }
        None => false,
    }
}

struct Write {
    room: Arc<Room>,
    message: StoredMessage,
    done: Option<oneshot::Sender<Result<u64, String>>>,
}

struct Inner {
    store: Arc<dyn HistoryStore>,
    config: HubConfig,
    /// Set when rooms are shared with other nodes over Redis.
    cluster: Option<ClusterLink>,
    rooms: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    writer: Mutex<Option<mpsc::Sender<Write>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set by shutdown: a writer stuck on a failing store stops retrying.
    stopping: Arc<AtomicBool>,
    next_member: AtomicU64,
}

/// A message on its way to Redis.
struct PostJob {
    room: Arc<Room>,
    user: Arc<str>,
    /// The posting connection (`None` for the HTTP API).
    member: Option<u64>,
    message: StoredMessage,
    done: oneshot::Sender<Result<u64, String>>,
}

struct ClusterLink {
    cluster: Arc<Cluster>,
    ops: mpsc::UnboundedSender<Op>,
    posts: mpsc::Sender<PostJob>,
    /// Stops the cluster's tasks.
    cancel: CancellationToken,
    /// Set when a presence change may not have reached Redis.
    resync: AtomicBool,
}

/// The rooms of one server. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("store", &self.inner.store)
            .finish()
    }
}

/// A connection's place in a room. Dropping it leaves the room.
pub struct Membership {
    hub: Hub,
    room: Arc<Room>,
    id: u64,
    user: Arc<str>,
    /// The `welcome` event.
    pub welcome: Bytes,
    /// History still to send, before anything from `events`.
    replay: Option<Replay>,
    events: mpsc::Receiver<Outbound>,
    /// The last message broadcast when this member joined: history goes up to it, live
    /// events start after it.
    upto: u64,
    /// Whether the others were last told this member is typing.
    typing: AtomicBool,
    slow: Arc<AtomicBool>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("room", &self.room.name)
            .field("user", &self.user)
            .finish()
    }
}

/// What history a joining member is sent.
#[derive(Debug, Clone, Copy)]
enum Replay {
    /// The most recent messages, at most this many.
    Recent(usize),
    /// Every message after this id (up to the join), page by page.
    After(u64),
}

/// A message accepted for storing.
#[derive(Debug)]
pub struct Posted {
    pub id: u64,
    /// The message as it is stored (server-set sender and time).
    pub message: StoredMessage,
    /// Resolves with the message's id once it is stored (and broadcast); an error if
    /// storing failed. In a cluster `id` above is 0: Redis assigns it, and this says it.
    pub stored: oneshot::Receiver<Result<u64, String>>,
}

impl Membership {
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The next page of history to send before any live event, oldest first; an empty
    /// page once it is all sent. A resume from far back comes in pages, so it never
    /// sits in memory whole.
    pub async fn next_backlog(&mut self) -> Result<Vec<Bytes>, HubError> {
        let page = self.hub.inner.config.replay_page.max(1);
        let (name, upto) = (self.room.name.to_string(), self.upto);
        let messages = match self.replay.take() {
            None => return Ok(Vec::new()),
            Some(Replay::Recent(limit)) => {
                self.hub
                    .blocking(move |store| store.recent(&name, upto, limit))
                    .await?
            }
            Some(Replay::After(after)) if after >= upto => return Ok(Vec::new()),
            Some(Replay::After(after)) => {
                let messages = self
                    .hub
                    .blocking(move |store| store.range(&name, after, upto, page))
                    .await?;
                if let Some(last) = messages.last() {
                    self.replay = Some(Replay::After(last.id));
                }
                messages
            }
        };
        Ok(messages.iter().map(event::message).collect())
    }

    /// The next live event, in order after the backlog; `None` once this member was
    /// dropped as a slow consumer (see [`Membership::was_slow`]). A message the client
    /// already has (a `since` ahead of the room) is skipped.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            match self.events.recv().await? {
                // Sent with the history already.
                Outbound::Message(id, _) if id <= self.upto => continue,
                item => return Some(item),
            }
        }
    }

    /// Like [`Membership::recv`], without waiting.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        loop {
            match self.events.try_recv().ok()? {
                Outbound::Message(id, _) if id <= self.upto => continue,
                item => return Some(item),
            }
        }
    }

    /// Whether this member was dropped for not keeping up (the connection closes with 4008).
    pub fn was_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// Posts a message from this member; see [`Hub::post`].
    pub async fn post(
        &self,
        text: String,
        nonce: Option<String>,
    ) -> Result<Option<Posted>, HubError> {
        self.hub
            .post_to(&self.room, &self.user, Some(self.id), text, nonce)
            .await
    }

    /// Whether the others were last told this member is typing.
    pub fn is_typing(&self) -> bool {
        self.typing.load(Ordering::Relaxed)
    }

    /// Tells the other users this one is typing (or stopped). Not stored. A member that
    /// leaves while typing is reported as stopped.
    pub fn typing(&self, is_typing: bool) {
        self.typing.store(is_typing, Ordering::Relaxed);
        let item = Outbound::Text(event::typing(&self.user, is_typing));
        let user = self.user.clone();
        self.room.deliver(|_, m| m.user != user, item);
        if let Some(ops) = &self.room.ops {
            let _ = ops.send(Op::Typing {
                room: self.room.name.clone(),
                user: self.user.clone(),
                is_typing,
            });
        }
    }

    /// Relays binary data to the room's other connections as it is.
    pub fn relay_binary(&self, data: Bytes) {
        let me = self.id;
        if let Some(ops) = &self.room.ops {
            let _ = ops.send(Op::Binary {
                room: self.room.name.clone(),
                data: data.clone(),
            });
        }
        self.room.deliver(|id, _| id != me, Outbound::Binary(data));
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if self.is_typing() {
            self.typing(false);
        }
        let mut shared = self.room.shared.lock().expect("room lock");
        if shared.members.remove(&self.id).is_none() {
            // Already dropped as a slow consumer, presence included.
            return;
        }
        if leave_user(&mut shared, &self.user) && !self.room.leave_cluster(&self.user) {
            let leave = Outbound::Text(event::presence("leave", &self.user));
            self.room.deliver_locked(&mut shared, |_, _| true, leave);
        }
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Hub {
    /// A hub over `store`, with its writer thread running.
    pub fn new(store: Arc<dyn HistoryStore>, config: HubConfig) -> Self {
        Self::build(store, config, None)
    }

    /// A hub whose rooms, history and presence are shared with other nodes over Redis.
    /// Fails when Redis cannot be reached now; later outages are ridden out (see
    /// [`Hub::cluster_up`]).
    pub async fn clustered(cluster: ClusterConfig, config: HubConfig) -> Result<Self, HubError> {
        let interval = (cluster.presence_expiry / 3).max(Duration::from_millis(100));
        let (link, store) = Cluster::connect(&cluster).await?;
        let link = Arc::new(link);
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let (posts, posts_rx) = mpsc::channel(config.write_queue.max(1));
        let max_batch = config.max_batch.max(1);
        let cancel = CancellationToken::new();
        let hub = Self::build(
            Arc::new(store),
            config,
            Some(ClusterLink {
                cluster: link.clone(),
                ops,
                posts,
                cancel: cancel.clone(),
                resync: AtomicBool::new(false),
            }),
        );
        info!(node = %link.node, "joined the cluster");
        let weak = Arc::downgrade(&hub.inner);
        tokio::spawn(cluster_worker(weak.clone(), link.clone(), ops_rx));
        // Its own thread, like the writer's in a single node: delivering a message to a
        // room's members then never waits in the run queue behind those members' writes,
        // so while they are busy, messages pile up in their queues and go out several
        // to a write (measured: on one shared worker, every message went out alone and
        // 2,000 subscribers held 10 messages/s instead of hundreds).
        let (listener, listener_link, listener_cancel) =
            (weak.clone(), link.clone(), cancel.clone());
        let (poster, poster_link) = (weak.clone(), link.clone());
        std::thread::Builder::new()
            .name("switchboard-cluster".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        runtime.spawn(cluster_poster(poster, poster_link, posts_rx, max_batch));
                        runtime.block_on(cluster_listener(
                            listener,
                            listener_link,
                            listener_cancel,
                        ));
                    }
                    Err(cause) => error!(%cause, "starting the cluster listener failed"),
                }
            })
            .expect("spawning the cluster listener");
        tokio::spawn(cluster_heartbeat(weak, link, cancel, interval));
        Ok(hub)
    }

    fn build(
        store: Arc<dyn HistoryStore>,
        config: HubConfig,
        cluster: Option<ClusterLink>,
    ) -> Self {
        let stopping = Arc::new(AtomicBool::new(false));
        // A cluster stores through Redis (its poster): no writer thread then.
        let (writer, thread) = if cluster.is_none() {
            let (tx, rx) = mpsc::channel(config.write_queue.max(1));
            let writer_store = store.clone();
            let max_batch = config.max_batch.max(1);
            let writer_stopping = stopping.clone();
            let thread = std::thread::Builder::new()
                .name("switchboard-writer".into())
                .spawn(move || write_loop(writer_store, rx, max_batch, writer_stopping))
                .expect("spawning the history writer");
            (Some(tx), Some(thread))
        } else {
            (None, None)
        };
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                cluster,
                rooms: Mutex::new(HashMap::new()),
                writer: Mutex::new(writer),
                writer_thread: Mutex::new(thread),
                stopping,
                next_member: AtomicU64::new(1),
            }),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn HistoryStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, HubError> {
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || read(store.as_ref()))
            .await
            .expect("history read panicked")
            .map_err(HubError::from)
    }

    async fn room(&self, name: &str) -> Result<Arc<Room>, HubError> {
        if let Some(room) = self.inner.rooms.lock().expect("rooms lock").get(name) {
            return Ok(room.clone());
        }
        let owned = name.to_owned();
        let last_id = self.blocking(move |store| store.last_id(&owned)).await?;
        let mut rooms = self.inner.rooms.lock().expect("rooms lock");
        let room = rooms.entry(Arc::from(name)).or_insert_with(|| {
            Arc::new(Room {
                name: Arc::from(name),
                shared: Mutex::new(Shared {
                    broadcast_id: last_id,
                    ..Shared::default()
                }),
                sequence: tokio::sync::Mutex::new(Sequence {
                    last_id,
                    store_may_know: last_id > 0,
                    nonces: HashMap::new(),
                }),
                ops: self.inner.cluster.as_ref().map(|c| c.ops.clone()),
            })
        });
        Ok(room.clone())
    }

    /// Joins `room` as `user`. With `since`, the backlog is every stored message with a
    /// larger id; without, the most recent ones. Live events follow on `events`.
    pub async fn join(
        &self,
        room: &str,
        user: &str,
        since: Option<u64>,
    ) -> Result<Membership, HubError> {
        let room = self.room(room).await?;
        let user: Arc<str> = Arc::from(user);
        let (tx, events) = mpsc::channel(self.inner.config.outbound_queue.max(1));
        let slow = Arc::new(AtomicBool::new(false));
        let id = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        let (upto, mut members, first) = {
            let mut shared = room.shared.lock().expect("room lock");
            let count = shared.users.entry(user.clone()).or_insert(0);
            *count += 1;
            let first = *count == 1;
            // In a cluster the join comes back from Redis, once for all nodes.
            if first && room.ops.is_none() {
                let join = Outbound::Text(event::presence("join", &user));
                room.deliver_locked(&mut shared, |_, _| true, join);
            }
            shared.members.insert(
                id,
                Member {
                    user: user.clone(),
                    tx,
                    slow: slow.clone(),
                },
            );
            let members: Vec<String> = shared.users.keys().map(|u| u.to_string()).collect();
            (shared.broadcast_id, members, first)
        };
        if let Some(link) = &self.inner.cluster {
            let everywhere = if first {
                let (reply, answer) = oneshot::channel();
                let _ = link.ops.send(Op::Join {
                    room: room.name.clone(),
                    user: user.clone(),
                    reply,
                });
                answer
                    .await
                    .unwrap_or(Err(StoreError::Unsupported("the cluster stopped")))
            } else {
                link.cluster.members(&room.name).await
            };
            match everywhere {
                Ok(everywhere) => members.extend(everywhere),
                // Redis is away: this node's members for now; presence is told again
                // when it is back.
                Err(cause) => warn!(%cause, "room members from this node only"),
            }
            members.sort();
            members.dedup();
        }
        let replay = match since {
            // A client ahead of the room (say, history kept in memory and restarted) gets
            // what is new from here on, never a silent skip.
            Some(after) => Replay::After(after.min(upto)),
            None => Replay::Recent(self.inner.config.recent_on_join),
        };
        Ok(Membership {
            hub: self.clone(),
            welcome: event::welcome(
                &room.name,
                &user,
                &members,
                upto,
                self.inner.config.limits.as_ref(),
            ),
            replay: Some(replay),
            upto,
            typing: AtomicBool::new(false),
            room,
            id,
            user,
            events,
            slow,
        })
    }

    /// Posts a message to `room` as `user` (for the HTTP API and tools). It is stored,
    /// then broadcast to every member. A repeated `nonce` from the same user is stored
    /// once: the repeat returns `None` and, if the original is already stored, sends it
    /// again to that user's connections.
    pub async fn post(
        &self,
        room: &str,
        user: &str,
        text: String,
        nonce: Option<String>,
    ) -> Result<Option<Posted>, HubError> {
        let room = self.room(room).await?;
        self.post_to(&room, &Arc::from(user), None, text, nonce)
            .await
    }

    async fn post_to(
        &self,
        room: &Arc<Room>,
        user: &Arc<str>,
        member: Option<u64>,
        text: String,
        nonce: Option<String>,
    ) -> Result<Option<Posted>, HubError> {
        if let Some(link) = &self.inner.cluster {
            let message = StoredMessage {
                room: room.name.to_string(),
                id: 0,
                from: user.to_string(),
                text,
                timestamp: now_rfc3339(),
                nonce,
            };
            // Handed to the poster, which sends what is queued to Redis in one pipeline;
            // a connection's messages keep their order. The sender's acknowledgement is
            // the broadcast; a failure comes back to it as an `error` event.
            let (done, stored) = oneshot::channel();
            link.posts
                .send(PostJob {
                    room: room.clone(),
                    user: user.clone(),
                    member,
                    message: message.clone(),
                    done,
                })
                .await
                .map_err(|_| HubError::ShuttingDown)?;
            return Ok(Some(Posted {
                id: 0,
                message,
                stored,
            }));
        }
        let mut sequence = room.sequence.lock().await;
        if let Some(nonce) = &nonce {
            let known = sequence.nonces.get(&(user.clone(), nonce.clone())).copied();
            let stored = match known {
                Some(id) => Some(id),
                // Only history from before this process, or evicted from the map, needs
                // the store: a room's own recent nonces are all in the map.
                None if !sequence.store_may_know => None,
                None => {
                    let (name, who, n) = (room.name.to_string(), user.to_string(), nonce.clone());
                    self.blocking(move |store| store.find_nonce(&name, &who, &n))
                        .await?
                        .map(|m| m.id)
                }
            };
            if let Some(id) = stored {
                self.resend(room, user, member, id).await?;
                return Ok(None);
            }
        }
        let id = sequence.last_id + 1;
        let message = StoredMessage {
            room: room.name.to_string(),
            id,
            from: user.to_string(),
            text,
            timestamp: now_rfc3339(),
            nonce: nonce.clone(),
        };
        let (done, stored) = oneshot::channel();
        let writer = self
            .inner
            .writer
            .lock()
            .expect("writer lock")
            .clone()
            .ok_or(HubError::ShuttingDown)?;
        writer
            .send(Write {
                room: room.clone(),
                message: message.clone(),
                done: Some(done),
            })
            .await
            .map_err(|_| HubError::ShuttingDown)?;
        sequence.last_id = id;
        if let Some(nonce) = nonce {
            if sequence.nonces.len() >= 100_000 {
                // Forget stored ones only (the store still finds them); messages still on
                // their way to the store stay, or a retry now could be stored twice.
                let stored_upto = room.shared.lock().expect("room lock").broadcast_id;
                sequence.nonces.retain(|_, id| *id > stored_upto);
                sequence.store_may_know = true;
            }
            sequence.nonces.insert((user.clone(), nonce), id);
        }
        Ok(Some(Posted {
            id,
            message,
            stored,
        }))
    }

    /// A retried message that is already stored goes again to the sender's connections
    /// (its acknowledgement); one still on its way to the store reaches them when stored.
    async fn resend(
        &self,
        room: &Arc<Room>,
        user: &Arc<str>,
        member: Option<u64>,
        id: u64,
    ) -> Result<(), HubError> {
        let broadcast = room.shared.lock().expect("room lock").broadcast_id;
        if id > broadcast {
            return Ok(());
        }
        let name = room.name.to_string();
        let found = self
            .blocking(move |store| store.range(&name, id - 1, id, 1))
            .await?;
        if let Some(message) = found.first() {
            let item = Outbound::Text(event::message(message));
            let user = user.clone();
            room.deliver(
                move |mid, m| member.map_or(m.user == user, |me| mid == me),
                item,
            );
        }
        Ok(())
    }

    /// The message `user` sent to `room` with `nonce`, once stored.
    pub async fn find_nonce(
        &self,
        room: &str,
        user: &str,
        nonce: &str,
    ) -> Result<Option<StoredMessage>, HubError> {
        let (room, user, nonce) = (room.to_owned(), user.to_owned(), nonce.to_owned());
        self.blocking(move |store| store.find_nonce(&room, &user, &nonce))
            .await
    }

    /// The users in `room` now, sorted.
    pub fn members(&self, room: &str) -> Vec<String> {
        let rooms = self.inner.rooms.lock().expect("rooms lock");
        rooms.get(room).map_or_else(Vec::new, |room| {
            room.shared
                .lock()
                .expect("room lock")
                .users
                .keys()
                .map(|u| u.to_string())
                .collect()
        })
    }

    /// Rooms with members now, with how many users each has, sorted by name.
    pub fn active_rooms(&self) -> Vec<(String, usize)> {
        let rooms = self.inner.rooms.lock().expect("rooms lock");
        let mut active: Vec<(String, usize)> = rooms
            .values()
            .map(|room| {
                (
                    room.name.to_string(),
                    room.shared.lock().expect("room lock").users.len(),
                )
            })
            .filter(|(_, users)| *users > 0)
            .collect();
        active.sort();
        active
    }

    /// The users in `room`: on every node in a cluster, else here.
    pub async fn room_members(&self, room: &str) -> Result<Vec<String>, HubError> {
        match &self.inner.cluster {
            Some(link) => Ok(link.cluster.members(room).await?),
            None => Ok(self.members(room)),
        }
    }

    /// Rooms with users in them and how many each has: on every node in a cluster.
    pub async fn rooms(&self) -> Result<Vec<(String, usize)>, HubError> {
        match &self.inner.cluster {
            Some(link) => Ok(link.cluster.rooms().await?),
            None => Ok(self.active_rooms()),
        }
    }

    /// `None` without a cluster; else whether Redis answered the last exchange.
    pub fn cluster_up(&self) -> Option<bool> {
        self.inner.cluster.as_ref().map(|link| link.cluster.is_up())
    }

    /// Leaves the cluster before shutting down: this node's users leave every member
    /// list at once instead of at the presence expiry. Waits at most 3 s.
    pub async fn depart(&self) {
        let Some(link) = &self.inner.cluster else {
            return;
        };
        let (done, departed) = oneshot::channel();
        if link.ops.send(Op::Depart(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), departed).await;
        }
        link.cancel.cancel();
    }

    /// Messages of `room` after `since`, oldest first (for the HTTP API).
    pub async fn history(
        &self,
        room: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, HubError> {
        let name = room.to_owned();
        self.blocking(move |store| store.range(&name, since, u64::MAX >> 1, limit))
            .await
    }

    /// Stops taking messages and waits until everything accepted is stored.
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        if let Some(link) = &self.inner.cluster {
            link.cancel.cancel();
        }
        self.inner.writer.lock().expect("writer lock").take();
        if let Some(thread) = self.inner.writer_thread.lock().expect("writer lock").take() {
            if thread.join().is_err() {
                error!("history writer panicked");
            }
        }
    }
}

/// The writer thread: takes what is queued (up to `max_batch`), stores it in one commit,
/// then broadcasts each message in id order. A failed commit is retried (backing off up
/// to 2 s) until it succeeds, so ids stay contiguous and an accepted message is never
/// dropped; posters wait meanwhile. Only at shutdown does it give up, saying what is lost.
fn write_loop(
    store: Arc<dyn HistoryStore>,
    mut rx: mpsc::Receiver<Write>,
    max_batch: usize,
    stopping: Arc<AtomicBool>,
) {
    let mut batch: Vec<Write> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        top_up(&mut batch, &mut rx, max_batch);
        let messages: Vec<StoredMessage> = batch.iter().map(|w| w.message.clone()).collect();
        let mut backoff = Duration::from_millis(10);
        let result = loop {
            let started = std::time::Instant::now();
            let result = store.append(&messages);
            metrics::histogram!("switchboard_history_write_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => break Ok(()),
                Err(cause) if stopping.load(Ordering::Relaxed) => break Err(cause),
                Err(cause) => {
                    metrics::counter!("switchboard_history_write_failures_total").increment(1);
                    warn!(%cause, messages = messages.len(), retry_in = ?backoff, "storing messages failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        match &result {
            Ok(()) => metrics::counter!("switchboard_messages_stored_total")
                .increment(messages.len() as u64),
            Err(cause) => {
                error!(%cause, lost = messages.len(), "shutting down with messages that could not be stored")
            }
        }
        for mut write in batch.drain(..) {
            if result.is_ok() {
                write.room.broadcast_stored(&write.message);
            }
            if let Some(done) = write.done.take() {
                // The poster may have gone; the outcome stands regardless.
                let id = write.message.id;
                let _ = done.send(result.as_ref().map(|_| id).map_err(|e| e.to_string()));
            }
        }
    }
}

/// Adds what is already queued on `rx` to `batch`, up to `max` in all, without waiting.
fn top_up<T>(batch: &mut Vec<T>, rx: &mut mpsc::Receiver<T>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

/// Does the cluster's work in order (see [`Op`]). A presence change that fails marks
/// the node for a resync, which the heartbeat asks for once Redis answers again.
async fn cluster_worker(
    inner: Weak<Inner>,
    cluster: Arc<Cluster>,
    mut ops: mpsc::UnboundedReceiver<Op>,
) {
    while let Some(op) = ops.recv().await {
        let presence = match op {
            Op::Join { room, user, reply } => {
                let result = cluster.join(&room, &user).await;
                let failed = result.as_ref().err().map(ToString::to_string);
                let _ = reply.send(result);
                failed.map_or(Ok(()), Err)
            }
            Op::Leave { room, user } => {
                cluster.leave(&room, &user).await.map_err(|e| e.to_string())
            }
            Op::Typing {
                room,
                user,
                is_typing,
            } => {
                if let Err(cause) = cluster.typing(&room, &user, is_typing).await {
                    warn!(%cause, "typing did not reach the other nodes");
                }
                Ok(())
            }
            Op::Binary { room, data } => {
                if let Err(cause) = cluster.binary(&room, &data).await {
                    warn!(%cause, "binary data did not reach the other nodes");
                }
                Ok(())
            }
            Op::Resync => {
                let Some(inner) = inner.upgrade() else { return };
                let entries = local_presence(&inner);
                match cluster.sync(&entries).await {
                    Ok(()) => {
                        if let Some(link) = &inner.cluster {
                            link.resync.store(false, Ordering::Relaxed);
                        }
                        info!(
                            entries = entries.len(),
                            "presence told to the cluster again"
                        );
                        Ok(())
                    }
                    Err(cause) => Err(cause.to_string()),
                }
            }
            Op::Depart(done) => {
                if let Err(cause) = cluster.sync(&[]).await {
                    warn!(%cause, "leaving the cluster: presence not removed (it expires)");
                }
                let _ = done.send(());
                return;
            }
        };
        if let Err(cause) = presence {
            warn!(%cause, "a presence change did not reach Redis; it is sent again when Redis answers");
            if let Some(link) = inner.upgrade().as_ref().and_then(|i| i.cluster.as_ref()) {
                link.resync.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Inner {
    /// The rooms now, taken out of the lock.
    fn rooms_now(&self) -> Vec<Arc<Room>> {
        let rooms = self.rooms.lock().expect("rooms lock");
        rooms.values().cloned().collect()
    }
}

/// Every room and user with a connection on this node.
fn local_presence(inner: &Inner) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    for room in inner.rooms_now() {
        let shared = room.shared.lock().expect("room lock");
        for user in shared.users.keys() {
            entries.push((room.name.to_string(), user.to_string()));
        }
    }
    entries
}

/// Renews this node's heartbeat, reaps nodes whose heartbeat expired, and asks for a
/// resync once Redis answers after an outage.
async fn cluster_heartbeat(
    inner: Weak<Inner>,
    cluster: Arc<Cluster>,
    cancel: CancellationToken,
    interval: Duration,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let Some(link) = &inner.cluster else { return };
        let was_up = cluster.is_up();
        match cluster.heartbeat().await {
            Ok(()) => {
                if !was_up {
                    info!("Redis answers again");
                    link.resync.store(true, Ordering::Relaxed);
                }
                if link.resync.load(Ordering::Relaxed) {
                    let _ = link.ops.send(Op::Resync);
                }
                match cluster.reap().await {
                    Ok(0) => {}
                    Ok(nodes) => info!(nodes, "removed the presence of nodes that stopped"),
                    Err(cause) => warn!(%cause, "checking for stopped nodes failed"),
                }
            }
            Err(cause) if was_up => {
                warn!(%cause, "Redis does not answer; local clients stay connected")
            }
            Err(_) => {}
        }
    }
}

/// Receives every room's channel and hands what arrives to this node's members. After
/// each (re)subscription, rooms catch up from the stored history, so a message
/// published while the subscription was down is still delivered, in order.
async fn cluster_listener(inner: Weak<Inner>, cluster: Arc<Cluster>, cancel: CancellationToken) {
    use futures_util::StreamExt;

    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let subscribed = tokio::select! {
            () = cancel.cancelled() => return,
            subscribed = subscribe(&cluster) => subscribed,
        };
        let pubsub = match subscribed {
            Ok(pubsub) => pubsub,
            Err(cause) => {
                if cluster.set_up(false) {
                    warn!(%cause, "cannot subscribe to Redis; retrying");
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        {
            let Some(inner) = inner.upgrade() else { return };
            if !first {
                info!("subscribed to Redis again");
                if let Some(link) = &inner.cluster {
                    link.resync.store(true, Ordering::Relaxed);
                }
            }
            catch_up(&Hub { inner }).await;
        }
        first = false;
        let mut messages = pubsub.into_on_message();
        loop {
            let message = tokio::select! {
                () = cancel.cancelled() => return,
                message = messages.next() => message,
            };
            let Some(message) = message else { break };
            let Some(inner) = inner.upgrade() else { return };
            let Some((room, incoming)) =
                cluster.parse(message.get_channel_name(), message.get_payload_bytes())
            else {
                continue;
            };
            let hub = Hub { inner };
            hub.on_cluster_event(&cluster, &room, incoming).await;
        }
        cluster.set_up(false);
        warn!("lost the Redis subscription; subscribing again");
    }
}

async fn subscribe(cluster: &Cluster) -> Result<redis::aio::PubSub, StoreError> {
    let connect = async {
        let mut pubsub = cluster.client().get_async_pubsub().await?;
        pubsub.psubscribe(cluster.channels()).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Unsupported("subscribing to Redis timed out")),
    }
}

/// Rooms with members here receive what was stored after their last broadcast.
async fn catch_up(hub: &Hub) {
    for room in hub.inner.rooms_now() {
        let name = room.name.to_string();
        match hub.blocking(move |store| store.last_id(&name)).await {
            Ok(last) => hub.fill_gap(&room, last).await,
            Err(cause) => {
                warn!(%cause, room = %room.name, "catching up after the subscription failed")
            }
        }
    }
}

impl Hub {
    async fn on_cluster_event(&self, cluster: &Cluster, room: &str, incoming: Incoming) {
        let Some(room) = self
            .inner
            .rooms
            .lock()
            .expect("rooms lock")
            .get(room)
            .cloned()
        else {
            // No one here has joined it: nothing to deliver.
            return;
        };
        match incoming {
            Incoming::Message(message) => {
                // Published in id order; a gap means the subscription dropped messages.
                self.fill_gap(&room, message.id - 1).await;
                room.broadcast_stored(&message);
            }
            Incoming::Presence { joined, user } => {
                let kind = if joined { "join" } else { "leave" };
                let item = Outbound::Text(event::presence(kind, &user));
                room.deliver(|_, m| *m.user != *user, item);
            }
            Incoming::Typing {
                node,
                user,
                is_typing,
            } if node != cluster.node => {
                let item = Outbound::Text(event::typing(&user, is_typing));
                room.deliver(|_, m| *m.user != *user, item);
            }
            Incoming::Binary { node, data } if node != cluster.node => {
                room.deliver(|_, _| true, Outbound::Binary(data));
            }
            Incoming::Typing { .. } | Incoming::Binary { .. } => {}
        }
    }

    /// Broadcasts, from the store, what `room` has after its last broadcast up to `upto`.
    async fn fill_gap(&self, room: &Arc<Room>, upto: u64) {
        loop {
            let after = room.shared.lock().expect("room lock").broadcast_id;
            if after >= upto {
                return;
            }
            let name = room.name.to_string();
            let page = self.inner.config.replay_page.max(1);
            match self
                .blocking(move |store| store.range(&name, after, upto, page))
                .await
            {
                Ok(messages) if !messages.is_empty() => {
                    for message in &messages {
                        room.broadcast_stored(message);
                    }
                }
                Ok(_) => {
                    warn!(room = %room.name, after, upto, "messages missing from the stored history");
                    return;
                }
                Err(cause) => {
                    warn!(%cause, room = %room.name, "reading missed messages failed");
                    return;
                }
            }
        }
    }
}

/// Sends queued messages to Redis, up to `max_batch` in one pipeline, and settles each:
/// stored (the broadcast comes from Redis), a repeated nonce (the original goes to the
/// sender again), or refused (the sender gets an `unavailable` error event).
async fn cluster_poster(
    inner: Weak<Inner>,
    cluster: Arc<Cluster>,
    mut jobs: mpsc::Receiver<PostJob>,
    max_batch: usize,
) {
    let mut batch: Vec<PostJob> = Vec::with_capacity(max_batch);
    while let Some(first) = jobs.recv().await {
        batch.push(first);
        top_up(&mut batch, &mut jobs, max_batch);
        let messages: Vec<StoredMessage> = batch.iter().map(|j| j.message.clone()).collect();
        let result = cluster.post(&messages).await;
        let Some(inner) = inner.upgrade() else { return };
        let hub = Hub { inner };
        match result {
            Ok(outcomes) => {
                metrics::counter!("switchboard_messages_stored_total")
                    .increment(outcomes.len() as u64);
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    let id = match outcome {
                        PostOutcome::Stored(id) => id,
                        PostOutcome::Known(id) => {
                            if let Err(cause) =
                                hub.resend(&job.room, &job.user, job.member, id).await
                            {
                                warn!(%cause, "sending a repeated message again failed");
                            }
                            id
                        }
                    };
                    let _ = job.done.send(Ok(id));
                }
            }
            Err(cause) => {
                warn!(%cause, refused = batch.len(), "storing messages in Redis failed; their senders are told");
                for job in batch.drain(..) {
                    if let Some(me) = job.member {
                        let error = event::unavailable(job.message.nonce.as_deref());
                        job.room.deliver(|id, _| id == me, Outbound::Text(error));
                    }
                    let _ = job.done.send(Err(cause.to_string()));
                }
            }
        }
    }
}
