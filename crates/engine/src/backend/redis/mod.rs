//! Several nodes sharing channels over Redis: one standalone Redis, several (each
//! channel on one of them, [`topology`]), or a Redis Cluster.
//!
//! Every key and Pub/Sub channel starts with a prefix `P` (`switchboard` by default).
//! A channel's keys carry its name as their hash tag, `P:{ch}:kind` with the braces
//! literal ([`topology::key`]), so every script on a channel runs on one hash slot:
//!
//! - `P:{ch}:seq`: the channel's last publication id (`INCR`).
//! - `P:{ch}:epoch`: the channel's epoch, made by whichever call first finds none (a
//!   Redis that lost its data therefore gives the channel a new one).
//! - `P:{ch}:history`: a stream, one entry per publication kept, with id `{id}-0` and
//!   fields `m` (the record: JSON of from, text, data, event, timestamp, nonce, and the
//!   publishing connection's client and client_info where its door has them) and `t`
//!   (when it was stored, in milliseconds, for trimming by age). Trimmed by the post
//!   script to `history_size` (`MAXLEN`) and `history_ttl_secs` (`MINID`, and the
//!   stream expires when nothing is posted for that long).
//! - `P:{ch}:nonces`: a hash from `from \n nonce` (`from` empty for the server) to the
//!   id; `P:{ch}:nonce-times`: a sorted set of the same fields by when they were taken,
//!   so the post script forgets nonces older than `nonce_ttl` a few at a time.
//! - `P:{ch}:room`: the channel's Pub/Sub channel (sharded, `SPUBLISH`, in a Redis
//!   Cluster), subscribed to by the nodes with members in the channel, while they have
//!   some. Payloads start with a kind byte: `M{id}\n{epoch}\n{record}` a stored
//!   publication, `P{join|leave}\n{user}` presence, `T{node}\n{user}\n{0|1}` typing,
//!   `B{node}\n{bytes}` binary data.
//! - `P:{ch}:presence`: a hash from user to the number of nodes it is on;
//!   `P:{ch}:pinfo`: a hash from user to what it said of itself on joining (JSON);
//!   `P:{ch}:node:{node}`: the set of users a node has here (the empty user: the node
//!   has members here); `P:{ch}:occupancy`: how many nodes have members here.
//! - `P:{ch}:hooks`, `:hooks:pending`, `:hooks:leased`, `:hooks:seq`: the channel's
//!   hooks ([`crate::hooks`]): hooks due, leaves waiting out their delay, hooks taken.
//!
//! The cluster's own keys share the tag `%control`:
//!
//! - `P:{%control}:nodes`: the set of nodes; `P:{%control}:alive:{node}` expires unless
//!   the node's heartbeat renews it; `P:{%control}:node:{node}`: the channels the node
//!   has presence in (so a node that stopped is reaped channel by channel).
//! - `P:{%control}:rooms`: the channels with users in them; `P:{%control}:occupied`:
//!   the channels with members on some node (anonymous ones count);
//!   `P:{%control}:hooks`: the channels with hooks waiting.
//! - `P:{%control}:notices`: the Pub/Sub channel of notices for every node's doors (the
//!   Centrifugo server API's `subscribe`, `unsubscribe` and `disconnect`, Pusher's
//!   `terminate_connections`), opaque to the engine; `P:{%control}:to:{address}`: the
//!   Pub/Sub channel of posts for one node's doors alone (the Centrifugo door's
//!   emulation requests, routed to the node holding their session).
//! - `P:{%control}:layout`: `2` once keys of the first layout (`P:seq:{ch}` and the
//!   like, before channels had hash tags) were renamed ([`migrate`]).
//!
//! A publication is one script call: its nonce checked, its id taken, its record added
//! to the stream and published, all atomically, so every node sees a channel's
//! publications in id order, each with its epoch, and nothing is published that is not
//! stored. Presence changes are scripts on the channel too; a node that stops renewing
//! its `alive` key is reaped by the others, channel by channel, and they publish the
//! leaves of its users.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{sender_of, top_up, Backend, Job, Joined, Outcome, Sink};
use crate::engine::{timestamp, Channel, Clock, Delivery, EngineConfig, Outbound, Target};
use crate::store::{new_epoch, Position, Publication, StoreError, Window};
use crate::EngineError;

mod listener;
mod migrate;
mod presence;
mod scripts;
mod topology;

use listener::Ear;
use topology::Conn;

/// Where the cluster's Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisTopology {
    /// Standalone servers, `redis://HOST:PORT[/DB]` each: one, or several that share
    /// the channels between them (by rendezvous hashing of each channel's name).
    Standalone(Vec<String>),
    /// A Redis Cluster, reached through any of these nodes.
    Cluster(Vec<String>),
}

/// How a node joins a cluster.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    pub topology: RedisTopology,
    /// The start of every key and channel, so clusters can share one Redis.
    pub prefix: String,
    /// How long a node that stopped answering keeps its users in the member lists.
    pub presence_expiry: Duration,
    /// How soon a node notices that Redis stopped answering: every command waits at
    /// most two thirds of it, and the connections are probed every third of it.
    pub timeout: Duration,
    /// Replicas that must confirm a publication (`WAIT`) before it is published and
    /// acknowledged; 0: none.
    pub wait_replicas: usize,
    /// How long a publication waits for them before it is refused (to be sent again).
    pub wait_timeout: Duration,
}

impl RedisConfig {
    /// One standalone Redis.
    pub fn new(url: impl Into<String>) -> Self {
        Self::with_topology(RedisTopology::Standalone(vec![url.into()]))
    }

    pub fn with_topology(topology: RedisTopology) -> Self {
        Self {
            topology,
            prefix: "switchboard".into(),
            presence_expiry: Duration::from_secs(15),
            timeout: Duration::from_secs(3),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
        }
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    pub fn with_presence_expiry(mut self, expiry: Duration) -> Self {
        self.presence_expiry = expiry;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Publications wait for `replicas` to confirm them, at most `timeout`.
    pub fn with_wait_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.wait_replicas = replicas;
        self.wait_timeout = timeout;
        self
    }
}

/// A publication as it is kept in the history stream and published (its id is the
/// stream entry's, its channel the key's).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_info: Option<Box<RawValue>>,
}

fn record_of(publication: &Publication) -> String {
    serde_json::to_string(&Record {
        from: publication.from.clone(),
        text: publication.text.clone(),
        data: publication.data.clone(),
        event: publication.event.clone(),
        timestamp: publication.timestamp.clone(),
        nonce: publication.nonce.clone(),
        client: publication.client.clone(),
        client_info: publication.client_info.clone(),
    })
    .expect("records serialize")
}

fn publication_of(channel: &str, id: u64, record: &[u8]) -> Option<Publication> {
    let record: Record = serde_json::from_slice(record).ok()?;
    Some(Publication {
        id,
        channel: channel.to_owned(),
        from: record.from,
        text: record.text,
        data: record.data,
        event: record.event,
        timestamp: record.timestamp,
        nonce: record.nonce,
        client: record.client,
        client_info: record.client_info,
    })
}

/// What the post script did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Posted {
    /// Stored (and published) under this id.
    Stored(u64),
    /// The sender already sent this nonce: stored before under this id.
    Known(u64),
}

/// What arrived on a channel's Pub/Sub channel.
#[derive(Debug)]
enum Incoming {
    Publication {
        publication: Publication,
        epoch: String,
    },
    Presence {
        joined: bool,
        user: String,
        info: Option<Box<RawValue>>,
    },
    Typing {
        node: String,
        user: String,
        is_typing: bool,
    },
    Binary {
        node: String,
        data: Bytes,
    },
}

/// Presence work, done in order by one task: presence changes must reach Redis in the
/// order they happened here.
enum Op {
    Join {
        channel: Arc<str>,
        user: Arc<str>,
        /// What the member says of itself (JSON).
        info: Option<String>,
        reply: oneshot::Sender<Result<Vec<String>, StoreError>>,
    },
    Leave {
        channel: Arc<str>,
        user: Arc<str>,
    },
    /// The channel got its first member on this node, or lost its last one.
    Occupy {
        channel: Arc<str>,
        occupied: bool,
    },
    Typing {
        channel: Arc<str>,
        user: Arc<str>,
        is_typing: bool,
    },
    Binary {
        channel: Arc<str>,
        data: Bytes,
    },
    /// Tell Redis this node's presence again, all of it (after an outage).
    Resync,
    /// Leave the cluster: this node's users leave, its heartbeat key goes.
    Depart(oneshot::Sender<()>),
}

/// A standalone Redis.
struct Shard {
    url: String,
    client: redis::Client,
    conn: ConnectionManager,
}

/// What the node's Redis is.
enum Backing {
    Shards(Vec<Shard>),
    Cluster {
        /// Commands, routed by slot.
        conn: redis::cluster_async::ClusterConnection,
        /// Makes the subscription connection (RESP3, its pushes to the listener).
        subscriber: Box<redis::cluster::ClusterClient>,
    },
}

/// This node's link to the cluster, shared by its tasks.
struct Node {
    /// Its name in the cluster: a new one if it finds it was taken for stopped (its
    /// `alive` key expired while it ran), so the reaping of the old one cannot remove
    /// what it tells Redis under the new one.
    id: Mutex<Arc<str>>,
    /// Where posts for this node go (see [`Node::inbox`]): unlike `id`, fixed for the
    /// life of the process.
    address: Arc<str>,
    /// The names of [`Node::notices`] and [`Node::inbox`], made once (every message
    /// heard is compared with them).
    notices_channel: String,
    inbox_channel: String,
    prefix: String,
    expiry: Duration,
    /// How long a command waits for its answer (two thirds of the configured timeout).
    patience: Duration,
    backing: Backing,
    /// The shard of the cluster's own keys.
    control: usize,
    up: AtomicBool,
    presence: Script,
    hook_script: Script,
    /// Hooks are recorded (and how long leaves wait).
    hooks: Option<crate::hooks::HookConfig>,
    open: Script,
    renew: Script,
    confirm: Script,
    /// Replicas that confirm each publication before it is published (0: none), and
    /// how long they are waited for.
    wait_replicas: usize,
    wait_timeout: Duration,
    /// Set when a presence change may not have reached Redis.
    resync: AtomicBool,
    /// A resync is queued for the presence worker.
    resync_queued: AtomicBool,
    /// The channels this node has presence in, as Redis's `node` set should list them.
    entered: Mutex<HashSet<Arc<str>>>,
    /// One subscription connection per shard (one for a cluster).
    ears: Vec<Ear>,
    /// Per channel, publications that arrived after a gap that could not be read yet,
    /// with their epochs, in order.
    held: Mutex<HashMap<Arc<str>, Held>>,
    /// Channels just subscribed to whose catch-up has not finished: their members all
    /// joined as the subscription was made, and a hole from that moment the history no
    /// longer keeps is passed over, not a reason to cut them off.
    fresh: Mutex<HashSet<Arc<str>>>,
    sink: OnceLock<Sink>,
    ops: mpsc::UnboundedSender<Op>,
    clock: Clock,
    nonce_ttl: Duration,
    replay_page: usize,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id())
            .field("prefix", &self.prefix)
            .finish()
    }
}

pub(crate) struct RedisBackend {
    node: Arc<Node>,
    posts: mpsc::Sender<Job>,
    /// Stops the node's tasks.
    cancel: CancellationToken,
    /// The queues, until `start` hands them to the tasks.
    queues: Mutex<Option<Queues>>,
    max_batch: usize,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("node", &self.node)
            .finish()
    }
}

type Entries = Vec<(String, Vec<Vec<u8>>)>;

/// Publications waiting behind a gap, with their epochs, in order.
type Held = std::collections::VecDeque<(Publication, String)>;

struct Queues {
    ops: mpsc::UnboundedReceiver<Op>,
    posts: mpsc::Receiver<Job>,
    /// Per ear, the channels whose occupancy changed.
    watch: Vec<mpsc::UnboundedReceiver<Arc<str>>>,
    /// A cluster's pushes (its subscription connection's messages).
    pushes: Option<mpsc::UnboundedReceiver<redis::PushInfo>>,
}

fn new_id() -> Arc<str> {
    super::random_address()
}

impl RedisBackend {
    /// Connects (failing at once when Redis cannot be reached).
    pub(crate) async fn connect(
        redis: &RedisConfig,
        config: &EngineConfig,
    ) -> Result<Self, StoreError> {
        if redis.prefix.contains(['{', '}']) {
            return Err(StoreError::Unavailable(
                "the Redis prefix may not contain { or } (they make hash tags)",
            ));
        }
        let patience = (redis.timeout * 2 / 3).max(Duration::from_millis(50));
        let (backing, control, pushes, ears) = match &redis.topology {
            RedisTopology::Standalone(urls) => {
                if urls.is_empty() {
                    return Err(StoreError::Unavailable("no Redis URL given"));
                }
                let mut shards = Vec::with_capacity(urls.len());
                for url in urls {
                    let client = redis::Client::open(url.as_str())?;
                    let manager = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(patience))
                        .set_response_timeout(Some(patience))
                        .set_number_of_retries(1)
                        .set_max_delay(Duration::from_millis(500));
                    let conn = client.get_connection_manager_with_config(manager).await?;
                    shards.push(Shard {
                        url: url.clone(),
                        client,
                        conn,
                    });
                }
                let control = topology::rendezvous(urls, topology::CONTROL);
                let ears = (0..shards.len()).map(|_| Ear::new()).collect();
                (Backing::Shards(shards), control, None, ears)
            }
            RedisTopology::Cluster(seeds) => {
                if seeds.is_empty() {
                    return Err(StoreError::Unavailable("no Redis Cluster node given"));
                }
                let (push, pushes) = mpsc::unbounded_channel();
                let subscriber = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .connection_timeout(patience)
                    .response_timeout(patience)
                    .push_sender(push)
                    .build()?;
                let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .connection_timeout(patience)
                    .response_timeout(patience)
                    .build()?;
                let conn = client.get_async_connection().await?;
                (
                    Backing::Cluster {
                        conn,
                        subscriber: Box::new(subscriber),
                    },
                    0,
                    Some(pushes),
                    vec![Ear::new()],
                )
            }
        };
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let (posts, posts_rx) = mpsc::channel(config.write_queue.max(1));
        let mut watch = Vec::new();
        let ears: Vec<Ear> = ears
            .into_iter()
            .map(|mut ear: Ear| {
                watch.push(ear.take_watch());
                ear
            })
            .collect();
        let address = new_id();
        let node = Arc::new(Node {
            id: Mutex::new(new_id()),
            notices_channel: topology::control_key(&redis.prefix, "notices"),
            inbox_channel: topology::inbox_of(&redis.prefix, &address),
            address,
            prefix: redis.prefix.clone(),
            expiry: redis.presence_expiry,
            patience,
            backing,
            control,
            up: AtomicBool::new(true),
            presence: Script::new(scripts::PRESENCE),
            hook_script: Script::new(scripts::HOOKS),
            hooks: config.hooks.clone(),
            open: Script::new(scripts::OPEN),
            renew: Script::new(scripts::RENEW),
            confirm: Script::new(scripts::CONFIRM),
            wait_replicas: redis.wait_replicas,
            wait_timeout: redis.wait_timeout,
            resync: AtomicBool::new(false),
            resync_queued: AtomicBool::new(false),
            entered: Mutex::new(HashSet::new()),
            ears,
            held: Mutex::new(HashMap::new()),
            fresh: Mutex::new(HashSet::new()),
            sink: OnceLock::new(),
            ops,
            clock: config.clock.clone(),
            nonce_ttl: config.nonce_ttl,
            replay_page: config.replay_page.max(1),
        });
        if let Backing::Shards(shards) = &node.backing {
            for shard in shards {
                migrate::to_tagged_keys(&node.prefix, &mut Conn::Single(shard.conn.clone()))
                    .await?;
            }
        }
        node.heartbeat(true).await?;
        info!(node = %node.id(), "joined the cluster");
        Ok(Self {
            node,
            posts,
            cancel: CancellationToken::new(),
            queues: Mutex::new(Some(Queues {
                ops: ops_rx,
                posts: posts_rx,
                watch,
                pushes,
            })),
            max_batch: config.max_batch.max(1),
        })
    }
}
impl Backend for RedisBackend {
    fn start(&self, sink: Sink) {
        let Some(queues) = self.queues.lock().expect("queues lock").take() else {
            return;
        };
        if self.node.sink.set(sink).is_err() {
            return;
        }
        let interval = (self.node.expiry / 3).max(Duration::from_millis(100));
        tokio::spawn(presence::worker(self.node.clone(), queues.ops));
        tokio::spawn(presence::heartbeat(
            self.node.clone(),
            self.cancel.clone(),
            interval,
        ));
        let probe = (self.node.patience / 2).max(Duration::from_millis(20));
        tokio::spawn(presence::watchdog(
            self.node.clone(),
            self.cancel.clone(),
            probe,
        ));
        // Its own thread, like the writer's on a single node: delivering a publication
        // to a channel's members then never waits in the run queue behind those
        // members' writes, so while they are busy, publications pile up in their queues
        // and go out several to a write (measured: on one shared worker, every message
        // went out alone and 2,000 subscribers held 10 messages/s instead of hundreds).
        let (node, cancel, max_batch) = (self.node.clone(), self.cancel.clone(), self.max_batch);
        let (posts, watch, pushes) = (queues.posts, queues.watch, queues.pushes);
        std::thread::Builder::new()
            .name("switchboard-cluster".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        runtime.spawn(poster(node.clone(), posts, max_batch));
                        runtime.block_on(listener::run(node, cancel, watch, pushes));
                    }
                    Err(cause) => error!(%cause, "starting the cluster listener failed"),
                }
            })
            .expect("spawning the cluster listener");
    }

    fn open<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Position, StoreError>> {
        self.node.open(channel).boxed()
    }

    fn follows_idle(&self) -> bool {
        // Only channels with members here are subscribed to.
        false
    }

    fn opened(&self, _channel: &Arc<Channel>) {
        // Its first member has it subscribed to, and the subscription, once confirmed,
        // reads where the stream stands (what was published in between is filled in).
    }

    fn publish(&self, job: Job) -> BoxFuture<'_, Result<(), EngineError>> {
        // Handed to the poster, which sends what is queued to Redis in one pipeline per
        // shard; a connection's publications keep their order. The sender's
        // acknowledgement is the delivery; a failure comes back to it as
        // `Outbound::Refused`.
        async move {
            self.posts
                .send(job)
                .await
                .map_err(|_| EngineError::ShuttingDown)
        }
        .boxed()
    }

    fn read<'a>(
        &'a self,
        channel: &'a str,
        window: Window,
    ) -> BoxFuture<'a, Result<Vec<Publication>, StoreError>> {
        self.node.read(channel, window).boxed()
    }

    fn notify_nodes(&self, payload: Bytes) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            // Every node (this one too) hears it through its subscription.
            let sent: redis::RedisResult<u64> = redis::cmd(self.node.publish_command())
                .arg(self.node.notices())
                .arg(payload.as_ref())
                .query_async(&mut self.node.control_conn())
                .await;
            self.node.noted(sent).map(|_| ())
        }
        .boxed()
    }

    fn address(&self) -> &str {
        &self.node.address
    }

    fn post<'a>(
        &'a self,
        address: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move {
            let heard: redis::RedisResult<u64> = redis::cmd(self.node.publish_command())
                .arg(topology::inbox_of(&self.node.prefix, address))
                .arg(payload.as_ref())
                .query_async(&mut self.node.control_conn())
                .await;
            self.node.noted(heard).map(|heard| heard > 0)
        }
        .boxed()
    }

    fn remove_history<'a>(
        &'a self,
        channel: &'a str,
        upto: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let removed: redis::RedisResult<u64> = redis::cmd("XTRIM")
                .arg(self.node.key("history", channel))
                .arg("MINID")
                .arg(format!("{}-0", upto.saturating_add(1)))
                .query_async(&mut self.node.conn(channel))
                .await;
            self.node.noted(removed).map(|_| ())
        }
        .boxed()
    }

    fn find_nonce<'a>(
        &'a self,
        channel: &'a str,
        from: Option<&'a str>,
        nonce: &'a str,
    ) -> BoxFuture<'a, Result<Option<Publication>, StoreError>> {
        self.node.find_nonce(channel, from, nonce).boxed()
    }

    fn joined<'a>(
        &'a self,
        channel: &'a Arc<Channel>,
        user: &'a Arc<str>,
        info: Option<&'a Arc<RawValue>>,
        first: bool,
    ) -> BoxFuture<'a, Result<Joined, StoreError>> {
        async move {
            // The join itself comes back from Redis, once, through every node.
            let (others, infos) = if first {
                let (reply, answer) = oneshot::channel();
                self.node.op(Op::Join {
                    channel: channel.name.clone(),
                    user: user.clone(),
                    info: info.map(|i| i.get().to_owned()),
                    reply,
                });
                // Bounded: presence work queued behind a Redis that does not answer
                // must not hold the subscriber (its presence is told when Redis is back).
                let present = match tokio::time::timeout(4 * self.node.patience, answer).await {
                    Ok(Ok(result)) => result?,
                    Ok(Err(_)) => return Err(StoreError::Unavailable("the cluster stopped")),
                    Err(_) => return Err(StoreError::Unavailable("presence timed out")),
                };
                // Each user followed by what it said of itself (or nothing).
                let mut users = Vec::with_capacity(present.len() / 2);
                let mut infos = Vec::new();
                for pair in present.chunks(2) {
                    users.push(pair[0].clone());
                    if let Some(Ok(info)) = pair
                        .get(1)
                        .filter(|i| !i.is_empty())
                        .map(|i| RawValue::from_string(i.clone()))
                    {
                        infos.push((pair[0].clone(), info));
                    }
                }
                users.sort();
                (users, infos)
            } else {
                (self.node.members(&channel.name).await?, Vec::new())
            };
            Ok(Joined {
                others,
                infos,
                announce: false,
            })
        }
        .boxed()
    }

    fn left(&self, channel: &Arc<str>, user: &Arc<str>) -> bool {
        // Redis tells every node, this one included, if it was the user's last node.
        self.node.op(Op::Leave {
            channel: channel.clone(),
            user: user.clone(),
        });
        false
    }

    fn occupancy(&self, channel: &Arc<str>, occupied: bool) {
        self.node.ear(channel).watch(channel);
        // Counted in Redis whether or not hooks are: the cluster's list of occupied
        // channels (Pusher's `GET /channels`) comes from it.
        self.node.op(Op::Occupy {
            channel: channel.clone(),
            occupied,
        });
    }

    fn record_hook(&self, hook: crate::Hook) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let json = serde_json::to_string(&hook).expect("hooks serialize");
            let answer = self
                .node
                .hook_call(&hook.channel, &["record", &json])
                .await?;
            if answer.get(2).map(String::as_str) == Some("dropped") {
                metrics::counter!("switchboard_hooks_dropped_total").increment(1);
            }
            Ok(())
        }
        .boxed()
    }

    fn take_hooks(
        &self,
        max: usize,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<crate::hooks::Taken>, StoreError>> {
        self.node.take_hooks(max, lease).boxed()
    }

    fn hook_sent<'a>(
        &'a self,
        taken: &'a crate::hooks::Taken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.node
                .hook_call(&taken.hook.channel, &["done", &taken.ticket])
                .await
                .map(drop)
        }
        .boxed()
    }

    fn keep_hook<'a>(
        &'a self,
        taken: &'a crate::hooks::Taken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let lease = lease.as_millis().to_string();
            self.node
                .hook_call(&taken.hook.channel, &["keep", &lease, &taken.ticket])
                .await
                .map(drop)
        }
        .boxed()
    }

    fn hooks_waiting(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        self.node.hooks_waiting().boxed()
    }

    fn typing(&self, channel: &Arc<str>, user: &Arc<str>, is_typing: bool) {
        self.node.op(Op::Typing {
            channel: channel.clone(),
            user: user.clone(),
            is_typing,
        });
    }

    fn binary(&self, channel: &Arc<str>, data: &Bytes) {
        self.node.op(Op::Binary {
            channel: channel.clone(),
            data: data.clone(),
        });
    }

    fn members<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        self.node.members(channel).boxed()
    }

    fn channels(&self) -> BoxFuture<'_, Result<Vec<(String, usize)>, StoreError>> {
        self.node.channels().boxed()
    }

    fn occupied(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        self.node.occupied().boxed()
    }

    fn health(&self) -> Option<bool> {
        // Commands answer and every subscription hears: all of it, or the node cannot
        // serve.
        Some(self.node.is_up() && self.node.ears.iter().all(Ear::is_listening))
    }

    fn depart(&self) -> BoxFuture<'_, ()> {
        async move {
            let (done, departed) = oneshot::channel();
            if self.node.ops.send(Op::Depart(done)).is_ok() {
                // Bounded: presence that is not removed now expires.
                let _ = tokio::time::timeout(Duration::from_secs(3), departed).await;
            }
            self.cancel.cancel();
        }
        .boxed()
    }

    fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Node {
    fn sink(&self) -> Option<&Sink> {
        self.sink.get()
    }

    /// Whether the engine this node serves is gone.
    fn stopped(&self) -> bool {
        self.sink().map_or(true, |sink| !sink.alive())
    }

    fn op(&self, op: Op) {
        // The worker ends only when the engine does: nothing is left to tell then.
        let _ = self.ops.send(op);
    }

    fn id(&self) -> Arc<str> {
        self.id.lock().expect("id lock").clone()
    }

    /// Whether the last exchange with Redis worked.
    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records how the last exchange went; true when this changed the state.
    fn set_up(&self, up: bool) -> bool {
        let was = self.up.swap(up, Ordering::Relaxed);
        metrics::gauge!("switchboard_redis_up").set(if up { 1.0 } else { 0.0 });
        if !up {
            metrics::counter!("switchboard_redis_errors_total").increment(1);
        }
        match (was, up) {
            (true, false) => warn!("Redis does not answer; local clients stay connected"),
            (false, true) => {
                info!("Redis answers again");
                // Presence changes may have been lost meanwhile, or reaped by others.
                self.resync.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
        was != up
    }

    /// Queues a resync of this node's presence if one is due and none is queued.
    fn resync_if_needed(&self) {
        if self.resync.load(Ordering::Relaxed) && !self.resync_queued.swap(true, Ordering::AcqRel) {
            self.op(Op::Resync);
        }
    }

    fn noted<T>(&self, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        match result {
            Ok(value) => {
                self.set_up(true);
                Ok(value)
            }
            Err(cause) => {
                self.set_up(false);
                Err(cause.into())
            }
        }
    }

    /// The key of `channel` of this `kind`.
    fn key(&self, kind: &str, channel: &str) -> String {
        topology::key(&self.prefix, channel, kind)
    }

    /// The cluster's own key of this `kind`.
    fn control_key(&self, kind: &str) -> String {
        topology::control_key(&self.prefix, kind)
    }

    /// The Pub/Sub channel of notices for every node's doors.
    fn notices(&self) -> &str {
        &self.notices_channel
    }

    /// The Pub/Sub channel of posts for this node's doors alone.
    fn inbox(&self) -> &str {
        &self.inbox_channel
    }

    /// `PUBLISH`, or in a Redis Cluster `SPUBLISH` (the message then crosses only the
    /// shard that owns its channel).
    fn publish_command(&self) -> &'static str {
        match self.backing {
            Backing::Shards(_) => "PUBLISH",
            Backing::Cluster { .. } => "SPUBLISH",
        }
    }

    /// Whether publications wait for replicas.
    fn waits(&self) -> bool {
        self.wait_replicas > 0
    }

    /// Which shard holds `channel` (0 in a Redis Cluster, which routes by itself).
    fn shard_of(&self, channel: &str) -> usize {
        match &self.backing {
            Backing::Shards(shards) if shards.len() > 1 => {
                let urls: Vec<String> = shards.iter().map(|s| s.url.clone()).collect();
                topology::rendezvous(&urls, channel)
            }
            _ => 0,
        }
    }

    /// A connection to where `channel`'s keys live.
    fn conn(&self, channel: &str) -> Conn {
        self.conn_at(self.shard_of(channel))
    }

    /// A connection to where the cluster's own keys live.
    fn control_conn(&self) -> Conn {
        self.conn_at(self.control)
    }

    fn conn_at(&self, shard: usize) -> Conn {
        match &self.backing {
            Backing::Shards(shards) => Conn::Single(shards[shard].conn.clone()),
            Backing::Cluster { conn, .. } => Conn::Cluster(conn.clone()),
        }
    }

    /// The subscription connection that hears `channel`.
    fn ear(&self, channel: &str) -> &Ear {
        &self.ears[self.shard_of(channel).min(self.ears.len() - 1)]
    }

    async fn open(&self, channel: &str) -> Result<Position, StoreError> {
        let mut call = self.open.prepare_invoke();
        call.key(self.key("seq", channel))
            .key(self.key("epoch", channel))
            .key(self.key("confirmed", channel))
            .arg(new_epoch())
            .arg(if self.wait_replicas > 0 { "1" } else { "0" });
        let (last_id, epoch): (String, String) =
            self.noted(call.invoke_async(&mut self.conn(channel)).await)?;
        Ok(Position {
            last_id: last_id.parse().unwrap_or(0),
            epoch,
        })
    }

    /// A new epoch for `channel` in place of `stale` (or the one another node put there
    /// first).
    async fn renew(&self, channel: &str, stale: &str) -> Result<String, StoreError> {
        let mut call = self.renew.prepare_invoke();
        call.key(self.key("epoch", channel))
            .arg(stale)
            .arg(new_epoch());
        self.noted(call.invoke_async(&mut self.conn(channel)).await)
    }

    /// Stores and publishes `jobs` (Redis numbers them): one pipeline of one script call
    /// each per place they go to (a shard; in a Redis Cluster, a channel), all at once.
    /// Each place keeps the order of its jobs. With replicas to wait for, a place's
    /// pipeline ends with `WAIT`, and only what they confirmed is published; the rest is
    /// refused, to be sent again.
    async fn post(&self, jobs: &[Job]) -> Vec<Result<Posted, StoreError>> {
        let cluster = matches!(self.backing, Backing::Cluster { .. });
        let waiting = self.wait_replicas > 0;
        let records: Vec<String> = jobs.iter().map(|j| record_of(&j.publication)).collect();
        let mut groups: Vec<(usize, Option<&str>, Vec<usize>)> = Vec::new();
        for (at, job) in jobs.iter().enumerate() {
            let name = &*job.channel.name;
            let (shard, channel) = (self.shard_of(name), cluster.then_some(name));
            match groups.iter_mut().find(|g| g.0 == shard && g.1 == channel) {
                Some(group) => group.2.push(at),
                None => groups.push((shard, channel, vec![at])),
            }
        }
        let sent = groups.iter().map(|(shard, _, members)| {
            let mut pipe = self.pipeline(members.iter().map(|&at| (&jobs[at], &records[at])));
            if waiting {
                pipe.cmd("WAIT")
                    .arg(self.wait_replicas)
                    .arg(self.wait_timeout.as_millis() as u64);
            }
            let mut conn = self.conn_at(*shard);
            async move {
                let replies: redis::RedisResult<Vec<redis::Value>> =
                    pipe.query_async(&mut conn).await;
                replies
            }
        });
        let answers = futures_util::future::join_all(sent).await;
        let mut outcomes: Vec<Result<Posted, StoreError>> = (0..jobs.len())
            .map(|_| Err(StoreError::Unavailable("a post script did not answer")))
            .collect();
        let mut confirmations = Vec::new();
        for ((_, _, members), replies) in groups.iter().zip(answers) {
            let refused = |outcomes: &mut Vec<Result<Posted, StoreError>>, cause: String| {
                for &at in members {
                    outcomes[at] = Err(StoreError::Refused(cause.clone()));
                }
            };
            let mut replies = match replies {
                Ok(replies) => {
                    self.set_up(true);
                    replies
                }
                // A slot that moved (a failover, a resharding) answers MOVED or ASK,
                // which fails the pipeline: one plain command to the channel has the
                // connection learn where the slot is now, and the senders send again.
                Err(cause) if cluster && cause.redirect_node().is_some() => {
                    self.reroute(&jobs[members[0]].channel.name).await;
                    refused(&mut outcomes, cause.to_string());
                    continue;
                }
                Err(cause) => {
                    let cause = self.noted::<()>(Err(cause)).unwrap_err();
                    if cluster {
                        self.reroute(&jobs[members[0]].channel.name).await;
                    }
                    refused(&mut outcomes, cause.to_string());
                    continue;
                }
            };
            // A pipeline's commands answer one by one: a slot that moved (a failover,
            // a resharding) answers MOVED inside the answer, which the cluster
            // connection does not act on for a pipeline. One plain command to the
            // channel has it learn where the slot is now; the senders send again.
            if let Some(redis::Value::ServerError(error)) = replies
                .iter()
                .find(|v| matches!(v, redis::Value::ServerError(_)))
            {
                let cause = format!("{}: {}", error.code(), error.details().unwrap_or(""));
                self.reroute(&jobs[members[0]].channel.name).await;
                refused(&mut outcomes, cause);
                continue;
            }
            if waiting {
                let confirmed = replies
                    .pop()
                    .and_then(|v| <i64 as redis::FromRedisValue>::from_redis_value(v).ok())
                    .unwrap_or(0);
                if confirmed < self.wait_replicas as i64 {
                    metrics::counter!("switchboard_redis_unconfirmed_total")
                        .increment(members.len() as u64);
                    for &at in members {
                        outcomes[at] = Err(StoreError::Unavailable(
                            "its replicas did not confirm it in time",
                        ));
                    }
                    continue;
                }
            }
            for (&at, reply) in members.iter().zip(replies) {
                let reply = <Vec<String> as redis::FromRedisValue>::from_redis_value(reply)
                    .unwrap_or_default();
                outcomes[at] = posted(&reply);
                if waiting {
                    confirmations.push((at, reply.get(2).cloned()));
                }
            }
        }
        for (at, epoch) in confirmations {
            let channel = &*jobs[at].channel.name;
            let done = match (&outcomes[at], epoch) {
                (Ok(Posted::Stored(id)), Some(epoch)) => {
                    self.confirmed(channel, *id, &epoch, &records[at]).await
                }
                (Ok(Posted::Known(id)), _) => self.republish(channel, *id).await,
                _ => Ok(()),
            };
            if let Err(cause) = done {
                outcomes[at] = Err(cause);
            }
        }
        outcomes
    }

    /// Has the connection find where `channel`'s slot is now (a plain command follows
    /// MOVED and refreshes the cluster's map).
    async fn reroute(&self, channel: &str) {
        let probe: redis::RedisResult<bool> =
            self.conn(channel).exists(self.key("seq", channel)).await;
        if let Err(cause) = probe {
            warn!(%cause, channel, "finding where a channel's slot moved failed");
        }
    }

    /// A publication its replicas confirmed: the channel's confirmed position moves up
    /// to it, and it is published.
    async fn confirmed(
        &self,
        channel: &str,
        id: u64,
        epoch: &str,
        record: &str,
    ) -> Result<(), StoreError> {
        let mut call = self.confirm.prepare_invoke();
        call.key(self.key("confirmed", channel))
            .arg(id)
            .arg(self.key("room", channel))
            .arg(format!("M{id}\n{epoch}\n{record}"))
            .arg(self.publish_command());
        let _: i64 = self.noted(call.invoke_async(&mut self.conn(channel)).await)?;
        Ok(())
    }

    /// A retried publication already stored, now confirmed: published (again, maybe:
    /// its first sending may have been refused before it was; receivers drop what they
    /// have).
    async fn republish(&self, channel: &str, id: u64) -> Result<(), StoreError> {
        let key = self.key("history", channel);
        let at = format!("{id}-0");
        let entries = self.range(channel, &key, &at, &at, 1, false).await?;
        let Some(record) = entries
            .into_iter()
            .next()
            .and_then(|(_, fields)| fields.get(1).cloned())
            .and_then(|m| String::from_utf8(m).ok())
        else {
            // No longer kept: receivers read past it.
            return Ok(());
        };
        let epoch: String = self.noted(self.conn(channel).get(self.key("epoch", channel)).await)?;
        self.confirmed(channel, id, &epoch, &record).await
    }

    /// The post script's calls for `jobs` (each with its record), in order.
    fn pipeline<'a>(&self, jobs: impl Iterator<Item = (&'a Job, &'a String)>) -> redis::Pipeline {
        let now = millis(self.clock.now());
        let nonce_ttl = u64::try_from(self.nonce_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for (job, record) in jobs {
            let (channel, publication) = (&*job.channel.name, &job.publication);
            let options = &job.channel.options;
            let field = publication
                .nonce
                .as_deref()
                .map_or_else(String::new, |nonce| {
                    entry(publication.from.as_deref().unwrap_or(""), nonce)
                });
            // EVAL with the script's text rather than EVALSHA: Redis caches it by hash
            // either way, and a restarted Redis (its script cache empty) needs no reload
            // in the middle of a pipeline.
            pipe.cmd("EVAL")
                .arg(scripts::POST)
                .arg(5)
                .arg(self.key("seq", channel))
                .arg(self.key("epoch", channel))
                .arg(self.key("history", channel))
                .arg(self.key("nonces", channel))
                .arg(self.key("nonce-times", channel))
                .arg(record)
                .arg(self.key("room", channel))
                .arg(new_epoch())
                .arg(
                    options
                        .history_size
                        .map_or(-1, |size| size.min(i64::MAX as usize) as i64),
                )
                .arg(options.history_ttl_secs.saturating_mul(1000))
                .arg(now)
                .arg(nonce_ttl)
                .arg(field)
                .arg(if self.wait_replicas > 0 {
                    ""
                } else {
                    self.publish_command()
                });
        }
        pipe
    }

    async fn range(
        &self,
        channel: &str,
        key: &str,
        from: &str,
        to: &str,
        count: usize,
        reverse: bool,
    ) -> Result<Entries, StoreError> {
        let command = if reverse { "XREVRANGE" } else { "XRANGE" };
        self.noted(
            redis::cmd(command)
                .arg(key)
                .arg(from)
                .arg(to)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.conn(channel))
                .await,
        )
    }

    async fn read(&self, channel: &str, window: Window) -> Result<Vec<Publication>, StoreError> {
        if window.after >= window.upto || window.limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.key("history", channel);
        let not_before = window.not_before.as_deref();
        let kept = |p: &Publication| not_before.map_or(true, |t| p.timestamp.as_str() >= t);
        let parse = |entries: Entries| -> Vec<Publication> {
            entries
                .into_iter()
                .filter_map(|(id, fields)| {
                    let id: u64 = id.split_once('-')?.0.parse().ok()?;
                    publication_of(channel, id, fields.get(1)?)
                })
                .collect()
        };
        let (after, upto) = (window.after + 1, window.upto);
        if window.newest {
            let entries = self
                .range(
                    channel,
                    &key,
                    &upto.to_string(),
                    &after.to_string(),
                    window.limit,
                    true,
                )
                .await?;
            let mut newest: Vec<Publication> = parse(entries).into_iter().filter(kept).collect();
            newest.reverse();
            return Ok(newest);
        }
        // Entries too old to replay may not be trimmed yet: read on past them.
        let mut from = after;
        loop {
            let entries = self
                .range(
                    channel,
                    &key,
                    &from.to_string(),
                    &upto.to_string(),
                    window.limit,
                    false,
                )
                .await?;
            let full = entries.len() == window.limit;
            let page = parse(entries);
            let Some(last) = page.last().map(|p| p.id) else {
                return Ok(page);
            };
            let fresh: Vec<Publication> = page.into_iter().filter(kept).collect();
            if !fresh.is_empty() || !full || last >= upto {
                return Ok(fresh);
            }
            from = last + 1;
        }
    }

    /// The publication a nonce names while it is remembered: from the stream, or when
    /// the stream no longer keeps it, a receipt (its id, sender, nonce and time).
    async fn find_nonce(
        &self,
        channel: &str,
        from: Option<&str>,
        nonce: &str,
    ) -> Result<Option<Publication>, StoreError> {
        let field = entry(from.unwrap_or(""), nonce);
        let mut conn = self.conn(channel);
        let id: Option<u64> = self.noted(conn.hget(self.key("nonces", channel), &field).await)?;
        let at: Option<f64> =
            self.noted(conn.zscore(self.key("nonce-times", channel), &field).await)?;
        let Some(id) = id.filter(|id| *id > 0) else {
            return Ok(None);
        };
        let taken = at.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64));
        if taken.is_some_and(|t| {
            self.clock.now().duration_since(t).unwrap_or_default() >= self.nonce_ttl
        }) {
            return Ok(None);
        }
        self.publication(channel, id, from, nonce, taken)
            .await
            .map(Some)
    }

    /// Publication `id` of `channel`, or a receipt for it when no longer kept.
    async fn publication(
        &self,
        channel: &str,
        id: u64,
        from: Option<&str>,
        nonce: &str,
        taken: Option<SystemTime>,
    ) -> Result<Publication, StoreError> {
        let window = Window {
            after: id - 1,
            upto: id,
            limit: 1,
            newest: false,
            not_before: None,
        };
        Ok(self
            .read(channel, window)
            .await?
            .pop()
            .unwrap_or_else(|| Publication {
                id,
                channel: channel.to_owned(),
                from: from.map(str::to_owned),
                text: None,
                data: None,
                event: None,
                timestamp: timestamp(taken.unwrap_or_else(|| self.clock.now())),
                nonce: Some(nonce.to_owned()),
                client: None,
                client_info: None,
            }))
    }

    /// A retried publication that is already stored goes again to its sender (its
    /// acknowledgement).
    async fn acknowledge_again(&self, job: &Job, id: u64) {
        let publication = &job.publication;
        let Some(target) = sender_of(job.member, publication.from.as_deref()) else {
            return;
        };
        if id > job.channel.broadcast_id() {
            // Not delivered here yet: its delivery, on its way, is the acknowledgement
            // (sent now, it would overtake the publications before it).
            return;
        }
        let nonce = publication.nonce.as_deref().unwrap_or("");
        match self
            .publication(
                &job.channel.name,
                id,
                publication.from.as_deref(),
                nonce,
                None,
            )
            .await
        {
            Ok(original) => job
                .channel
                .send_to(&target, Outbound::Ack(Arc::new(Delivery::new(original)))),
            Err(cause) => warn!(%cause, "sending a repeated message again failed"),
        }
    }
}

/// What the post script answered.
fn posted(reply: &[String]) -> Result<Posted, StoreError> {
    let id = reply
        .get(1)
        .and_then(|id| id.parse::<u64>().ok())
        .filter(|id| *id > 0);
    match (reply.first().map(String::as_str), id) {
        (Some("1"), Some(id)) => Ok(Posted::Stored(id)),
        (Some("0"), Some(id)) => Ok(Posted::Known(id)),
        _ => Err(StoreError::Unavailable(
            "an unexpected answer from the post script",
        )),
    }
}

/// A hash field of two parts.
fn entry(first: &str, second: &str) -> String {
    format!("{first}\n{second}")
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sends queued publications to Redis, up to `max_batch` in one pipeline, and settles
/// each: stored (its delivery comes from Redis), a repeated nonce (the original goes to
/// its sender again), or refused (its sender is told, and sends it again).
async fn poster(node: Arc<Node>, mut jobs: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    while let Some(first) = jobs.recv().await {
        batch.push(first);
        top_up(&mut batch, &mut jobs, max_batch);
        let outcomes = node.post(&batch).await;
        let stored = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(Posted::Stored(_))))
            .count();
        metrics::counter!("switchboard_messages_stored_total").increment(stored as u64);
        let refused = outcomes.iter().filter(|o| o.is_err()).count();
        if let Some(Err(cause)) = outcomes.iter().find(|o| o.is_err()) {
            warn!(%cause, refused, "storing messages in Redis failed; their senders are told");
        }
        for (job, outcome) in batch.drain(..).zip(outcomes) {
            let outcome = match outcome {
                Ok(Posted::Stored(id)) => {
                    let mut publication = job.publication;
                    publication.id = id;
                    Outcome::Stored(Arc::new(Delivery::new(publication)))
                }
                Ok(Posted::Known(id)) => {
                    node.acknowledge_again(&job, id).await;
                    Outcome::Duplicate(id)
                }
                Err(cause) => {
                    if let Some(me) = job.member {
                        let nonce = job.publication.nonce.clone();
                        job.channel
                            .send_to(&Target::Member(me), Outbound::Refused { nonce });
                    }
                    let _ = job.done.send(Err(cause.to_string()));
                    continue;
                }
            };
            // The publisher may have gone; the outcome stands regardless.
            let _ = job.done.send(Ok(outcome));
        }
    }
}
