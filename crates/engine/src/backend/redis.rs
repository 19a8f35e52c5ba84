//! Several nodes sharing channels over Redis.
//!
//! Every key and Pub/Sub channel starts with a prefix `P` (`switchboard` by default):
//!
//! - `P:seq:{ch}`: the channel's last publication id (`INCR`).
//! - `P:epoch:{ch}`: the channel's epoch, made by whichever call first finds none (a
//!   Redis that lost its data therefore gives the channel a new one).
//! - `P:history:{ch}`: a stream, one entry per publication kept, with id `{id}-0` and
//!   fields `m` (the record: JSON of from, text, data, event, timestamp, nonce, and the
//!   publishing connection's client and client_info where its door has them) and `t`
//!   (when it was stored, in milliseconds, for trimming by age). Trimmed by the post
//!   script to `history_size` (`MAXLEN`) and `history_ttl_secs` (`MINID`, and the
//!   stream expires when nothing is posted for that long).
//! - `P:nonces:{ch}`: a hash from `from \n nonce` (`from` empty for the server) to the id;
//!   `P:nonce-times:{ch}`: a sorted set of the same fields by when they were taken, so
//!   the post script forgets nonces older than `nonce_ttl` a few at a time.
//! - `P:room:{ch}`: the channel's Pub/Sub channel, subscribed to by the nodes with
//!   members in the channel, while they have some. Payloads start with a kind byte:
//!   `M{id}\n{epoch}\n{record}` a stored publication, `P{join|leave}\n{user}` presence,
//!   `T{node}\n{user}\n{0|1}` typing, `B{node}\n{bytes}` binary data.
//! - `P:presence:{ch}`: a hash from user to the number of nodes it is on.
//! - `P:pinfo:{ch}`: a hash from user to what it said of itself on joining (JSON).
//! - `P:occupied`: a hash from channel to the number of nodes with members in it
//!   (with hooks on).
//! - `P:hooks`, `P:hooks:pending`, `P:hooks:leased`, `P:hooks:seq`: the hooks queue
//!   (`crate::hooks`): hooks due, leaves waiting out their delay, hooks taken.
//! - `P:notices`: notices for every node's doors (the Centrifugo server API's
//!   `subscribe`, `unsubscribe` and `disconnect`), opaque to the engine.
//! - `P:rooms`: the set of channels with someone in them.
//! - `P:nodes`: the set of nodes; `P:alive:{node}` expires unless the node's heartbeat
//!   renews it; `P:members:{node}`: the set of `channel \n user` present on the node.
//!
//! A publication is one script call: its nonce checked, its id taken, its record added
//! to the stream and published, all atomically, so every node sees a channel's
//! publications in id order, each with its epoch, and nothing is published that is not
//! stored. Presence changes are scripts too; a node that stops renewing its `alive` key
//! is reaped by the others, which publish the leaves of its users.

use std::collections::HashSet;
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

/// How a node joins a cluster.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// The start of every key and channel, so clusters can share one Redis.
    pub prefix: String,
    /// How long a node that stopped answering keeps its users in the member lists.
    pub presence_expiry: Duration,
    /// How soon a node notices that Redis stopped answering: every command waits at
    /// most two thirds of it, and both connections are probed every third of it.
    pub timeout: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "switchboard".into(),
            presence_expiry: Duration::from_secs(15),
            timeout: Duration::from_secs(3),
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
    /// Stored and published under this id.
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

/// KEYS: seq, epoch. ARGV: an epoch to give the channel if it has none.
const OPEN: &str = r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
return {tostring(redis.call('GET', KEYS[1]) or 0), epoch}
";

/// KEYS: epoch. ARGV: the epoch a node found untrustworthy, a new one. Replaces it
/// unless another node did already; returns the epoch now.
const RENEW: &str = r"
local epoch = redis.call('GET', KEYS[1])
if not epoch or epoch == ARGV[1] then
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch)
end
return epoch
";

/// KEYS: seq, epoch, history, nonces, nonce-times. ARGV: record, Pub/Sub channel, an
/// epoch to give the channel if it has none, history size (-1: all), history TTL in ms
/// (0: forever), now in ms, nonce TTL in ms, the nonce's field ('' without one).
const POST: &str = r"
local record, channel, fresh = ARGV[1], ARGV[2], ARGV[3]
local size, ttl, now, nonce_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local field = ARGV[8]
local forgotten = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. (now - nonce_ttl), 'LIMIT', 0, 64)
if #forgotten > 0 then
  redis.call('HDEL', KEYS[4], unpack(forgotten))
  redis.call('ZREM', KEYS[5], unpack(forgotten))
end
if field ~= '' then
  local known = redis.call('HGET', KEYS[4], field)
  local taken = tonumber(redis.call('ZSCORE', KEYS[5], field))
  if known and not (taken and taken < now - nonce_ttl) then return {'0', known} end
end
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = fresh
  redis.call('SET', KEYS[2], epoch)
end
local id = redis.call('INCR', KEYS[1])
if size == 0 then
  redis.call('DEL', KEYS[3])
else
  local added = redis.pcall('XADD', KEYS[3], id .. '-0', 'm', record, 't', now)
  if type(added) == 'table' and added.err then
    -- The counter fell behind the stream (its key was lost, the stream kept): go on
    -- above the stream's last entry.
    local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
    id = tonumber(string.match(top[1], '^(%d+)')) + 1
    redis.call('SET', KEYS[1], id)
    redis.call('XADD', KEYS[3], id .. '-0', 'm', record, 't', now)
  end
  if size > 0 then redis.call('XTRIM', KEYS[3], 'MAXLEN', size) end
  if ttl > 0 then
    local oldest = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 64)
    local expired = nil
    for _, entry in ipairs(oldest) do
      local fields, at = entry[2], nil
      for i = 1, #fields, 2 do
        if fields[i] == 't' then at = tonumber(fields[i + 1]) end
      end
      if at == nil or at >= now - ttl then break end
      expired = entry[1]
    end
    if expired then
      local n = string.match(expired, '^(%d+)')
      redis.call('XTRIM', KEYS[3], 'MINID', n .. '-1')
    end
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end
if field ~= '' then
  redis.call('HSET', KEYS[4], field, id)
  redis.call('ZADD', KEYS[5], now, field)
end
redis.call('PUBLISH', channel, 'M' .. id .. '\n' .. epoch .. '\n' .. record)
return {'1', tostring(id)}
";

/// Presence, atomically. ARGV: mode (join, leave, sync, reap), prefix, node, hooks
/// (`1`: record them), then `channel \n user` entries. A join or leave publishes only
/// when the user's first node joins or last node leaves. An entry with no user is the
/// node's occupancy of the channel (it has members there). A join may add what the
/// member says of itself (`info`, JSON, kept in `pinfo:{ch}` while the user is present
/// and carried in the `Pjoin` message). `sync` makes the node's entries exactly the
/// ones given (after an outage); `reap` removes a node whose `alive` key is gone. A
/// join returns the channel's users, each followed by its info (or an empty string). With hooks, every first
/// join and last leave of a user or of the channel's occupancy is recorded once, here:
/// arrivals in the `hooks` list, leaves in the `hooks:pending` set (by when they
/// happened, until they are due), where an arrival of the same user or occupancy
/// cancels a leave still waiting and is itself not recorded.
const PRESENCE: &str = r"
local mode, prefix, node, hooks = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local mine = prefix .. ':members:' .. node
local function split(entry)
  local at = string.find(entry, '\n', 1, true)
  return string.sub(entry, 1, at - 1), string.sub(entry, at + 1)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function arrived(kind, leave, room, user)
  if not hooks then return end
  if redis.call('ZREM', prefix .. ':hooks:pending', leave .. '\n' .. room .. '\n' .. user) == 1 then
    return
  end
  if redis.call('LLEN', prefix .. ':hooks') >= 100000 then return end
  local hook = {kind = kind, channel = room, time_ms = now_ms()}
  if user ~= '' then hook.user = user end
  local id = redis.call('INCR', prefix .. ':hooks:seq')
  redis.call('RPUSH', prefix .. ':hooks', id .. '\n' .. cjson.encode(hook))
end
local function departed(kind, room, user)
  if not hooks then return end
  redis.call('ZADD', prefix .. ':hooks:pending', now_ms(), kind .. '\n' .. room .. '\n' .. user)
end
local function join(entry, info)
  if redis.call('SADD', mine, entry) == 0 then return end
  local room, user = split(entry)
  if user == '' then
    if redis.call('HINCRBY', prefix .. ':occupied', room, 1) == 1 then
      arrived('channel_occupied', 'channel_vacated', room, '')
    end
    return
  end
  if info ~= '' then redis.call('HSET', prefix .. ':pinfo:' .. room, user, info) end
  if redis.call('HINCRBY', prefix .. ':presence:' .. room, user, 1) == 1 then
    redis.call('SADD', prefix .. ':rooms', room)
    redis.call('PUBLISH', prefix .. ':room:' .. room, 'Pjoin\n' .. user .. '\n' .. info)
    arrived('member_added', 'member_removed', room, user)
  end
end
local function leave(entry)
  if redis.call('SREM', mine, entry) == 0 then return end
  local room, user = split(entry)
  if user == '' then
    if redis.call('HINCRBY', prefix .. ':occupied', room, -1) <= 0 then
      redis.call('HDEL', prefix .. ':occupied', room)
      departed('channel_vacated', room, '')
    end
    return
  end
  local hash = prefix .. ':presence:' .. room
  if redis.call('HINCRBY', hash, user, -1) <= 0 then
    redis.call('HDEL', hash, user)
    redis.call('HDEL', prefix .. ':pinfo:' .. room, user)
    if redis.call('HLEN', hash) == 0 then redis.call('SREM', prefix .. ':rooms', room) end
    redis.call('PUBLISH', prefix .. ':room:' .. room, 'Pleave\n' .. user)
    departed('member_removed', room, user)
  end
end
if mode == 'join' then
  join(ARGV[5], ARGV[6] or '')
  local room = split(ARGV[5])
  local present = {}
  for _, user in ipairs(redis.call('HKEYS', prefix .. ':presence:' .. room)) do
    table.insert(present, user)
    table.insert(present, redis.call('HGET', prefix .. ':pinfo:' .. room, user) or '')
  end
  return present
elseif mode == 'leave' then
  leave(ARGV[5])
elseif mode == 'sync' then
  local want = {}
  for i = 5, #ARGV do want[ARGV[i]] = true end
  for _, entry in ipairs(redis.call('SMEMBERS', mine)) do
    if not want[entry] then leave(entry) end
  end
  for i = 5, #ARGV do join(ARGV[i], '') end
elseif mode == 'reap' then
  if redis.call('EXISTS', prefix .. ':alive:' .. node) == 1 then return {} end
  for _, entry in ipairs(redis.call('SMEMBERS', mine)) do leave(entry) end
  redis.call('DEL', mine)
  redis.call('SREM', prefix .. ':nodes', node)
end
return {}
";

/// Hooks, atomically, on Redis's clock (`TIME`), whatever the nodes' clocks say.
/// ARGV: mode, prefix, then:
/// - `promote`, then `name`, `delay` (ms) pairs: each delayed change still pending and
///   due (the time it happened plus its delay is past) moves to the `hooks` list, once,
///   whichever node promotes it, in the order given;
/// - `take`, lease (ms), max: leased hooks whose lease ran out go back to the front of
///   the list; then up to `max` from the front are leased for `lease` and returned;
/// - `keep`, lease (ms), ticket: a leased hook's lease is renewed;
/// - `done`, ticket: a leased hook leaves;
/// - `record`, json: a door's hook joins the list.
const HOOKS: &str = r"
local mode, prefix = ARGV[1], ARGV[2]
local list, leased = prefix .. ':hooks', prefix .. ':hooks:leased'
local pending = prefix .. ':hooks:pending'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if mode == 'promote' then
  for i = 3, #ARGV, 2 do
    local name, delay = ARGV[i], tonumber(ARGV[i + 1])
    local at = redis.call('ZSCORE', pending, name)
    if at and tonumber(at) + delay <= now then
      redis.call('ZREM', pending, name)
      local first = string.find(name, '\n', 1, true)
      local second = string.find(name, '\n', first + 1, true)
      local hook = {kind = string.sub(name, 1, first - 1),
                    channel = string.sub(name, first + 1, second - 1),
                    time_ms = tonumber(at)}
      local user = string.sub(name, second + 1)
      if user ~= '' then hook.user = user end
      local id = redis.call('INCR', prefix .. ':hooks:seq')
      redis.call('RPUSH', list, id .. '\n' .. cjson.encode(hook))
    end
  end
  return {}
elseif mode == 'take' then
  local lease, max = tonumber(ARGV[3]), tonumber(ARGV[4])
  local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now)
  for i = #expired, 1, -1 do
    redis.call('ZREM', leased, expired[i])
    redis.call('LPUSH', list, expired[i])
  end
  local taken = redis.call('LPOP', list, max)
  if not taken then return {} end
  for _, item in ipairs(taken) do redis.call('ZADD', leased, now + lease, item) end
  return taken
elseif mode == 'keep' then
  redis.call('ZADD', leased, 'XX', now + tonumber(ARGV[3]), ARGV[4])
  return {}
elseif mode == 'done' then
  redis.call('ZREM', leased, ARGV[3])
  return {}
elseif mode == 'record' then
  if redis.call('LLEN', list) >= 100000 then return 0 end
  local id = redis.call('INCR', prefix .. ':hooks:seq')
  redis.call('RPUSH', list, id .. '\n' .. ARGV[3])
  return 1
end
return {}
";

/// Channels subscribed to in one command.
const SUBSCRIBE_CHUNK: usize = 2000;

/// Times a channel is read again when catching up after a new subscription fails.
const CATCH_UP_TRIES: u32 = 10;

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

/// This node's link to the cluster, shared by its tasks.
struct Node {
    id: String,
    prefix: String,
    expiry: Duration,
    /// How long a command waits for its answer (two thirds of the configured timeout).
    patience: Duration,
    client: redis::Client,
    conn: ConnectionManager,
    up: AtomicBool,
    presence: Script,
    hook_script: Script,
    /// Hooks are recorded (and how long leaves wait).
    hooks: Option<crate::hooks::HookConfig>,
    open: Script,
    renew: Script,
    /// Set when a presence change may not have reached Redis.
    resync: AtomicBool,
    /// A resync is queued for the presence worker.
    resync_queued: AtomicBool,
    /// The subscription connection is subscribed and caught up.
    listening: AtomicBool,
    sink: OnceLock<Sink>,
    ops: mpsc::UnboundedSender<Op>,
    /// Channels whose occupancy here changed: the listener subscribes to a channel's
    /// Pub/Sub channel while it has members here, and only then.
    watch: mpsc::UnboundedSender<Arc<str>>,
    /// The channels the subscription connection has confirmed, and a tick each time
    /// they change.
    heard: Mutex<HashSet<Arc<str>>>,
    heard_changed: tokio::sync::watch::Sender<()>,
    clock: Clock,
    nonce_ttl: Duration,
    replay_page: usize,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
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

fn key(prefix: &str, kind: &str, channel: &str) -> String {
    format!("{prefix}:{kind}:{channel}")
}

fn entry(channel: &str, user: &str) -> String {
    format!("{channel}\n{user}")
}

type Entries = Vec<(String, Vec<Vec<u8>>)>;

type Queues = (
    mpsc::UnboundedReceiver<Op>,
    mpsc::Receiver<Job>,
    mpsc::UnboundedReceiver<Arc<str>>,
);

impl RedisBackend {
    /// Connects (failing at once when Redis cannot be reached).
    pub(crate) async fn connect(
        redis: &RedisConfig,
        config: &EngineConfig,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(redis.url.as_str())?;
        let patience = (redis.timeout * 2 / 3).max(Duration::from_millis(50));
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(patience))
            .set_response_timeout(Some(patience))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = client.get_connection_manager_with_config(manager).await?;
        let id = {
            use rand::{RngCore, SeedableRng};
            format!("{:016x}", rand::rngs::StdRng::from_os_rng().next_u64())
        };
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let (watch, watch_rx) = mpsc::unbounded_channel();
        let (posts, posts_rx) = mpsc::channel(config.write_queue.max(1));
        let node = Arc::new(Node {
            id,
            prefix: redis.prefix.clone(),
            expiry: redis.presence_expiry,
            patience,
            client,
            conn,
            up: AtomicBool::new(true),
            presence: Script::new(PRESENCE),
            hook_script: Script::new(HOOKS),
            hooks: config.hooks.clone(),
            open: Script::new(OPEN),
            renew: Script::new(RENEW),
            resync: AtomicBool::new(false),
            resync_queued: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            sink: OnceLock::new(),
            ops,
            watch,
            heard: Mutex::new(HashSet::new()),
            heard_changed: tokio::sync::watch::channel(()).0,
            clock: config.clock.clone(),
            nonce_ttl: config.nonce_ttl,
            replay_page: config.replay_page.max(1),
        });
        node.heartbeat().await?;
        info!(node = %node.id, "joined the cluster");
        Ok(Self {
            node,
            posts,
            cancel: CancellationToken::new(),
            queues: Mutex::new(Some((ops_rx, posts_rx, watch_rx))),
            max_batch: config.max_batch.max(1),
        })
    }
}

impl Backend for RedisBackend {
    fn start(&self, sink: Sink) {
        let Some((ops, posts, watch)) = self.queues.lock().expect("queues lock").take() else {
            return;
        };
        if self.node.sink.set(sink).is_err() {
            return;
        }
        let interval = (self.node.expiry / 3).max(Duration::from_millis(100));
        tokio::spawn(presence_worker(self.node.clone(), ops));
        tokio::spawn(heartbeat(self.node.clone(), self.cancel.clone(), interval));
        let probe = (self.node.patience / 2).max(Duration::from_millis(20));
        tokio::spawn(watchdog(self.node.clone(), self.cancel.clone(), probe));
        // Its own thread, like the writer's on a single node: delivering a publication
        // to a channel's members then never waits in the run queue behind those
        // members' writes, so while they are busy, publications pile up in their queues
        // and go out several to a write (measured: on one shared worker, every message
        // went out alone and 2,000 subscribers held 10 messages/s instead of hundreds).
        let (node, cancel, max_batch) = (self.node.clone(), self.cancel.clone(), self.max_batch);
        std::thread::Builder::new()
            .name("switchboard-cluster".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        runtime.spawn(poster(node.clone(), posts, max_batch));
                        runtime.block_on(listener(node, cancel, watch));
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
        // Handed to the poster, which sends what is queued to Redis in one pipeline; a
        // connection's publications keep their order. The sender's acknowledgement is
        // the delivery; a failure comes back to it as `Outbound::Refused`.
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
            let sent: redis::RedisResult<u64> = redis::cmd("PUBLISH")
                .arg(self.node.notices())
                .arg(payload.as_ref())
                .query_async(&mut self.node.conn.clone())
                .await;
            self.node.noted(sent).map(|_| ())
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
                .query_async(&mut self.node.conn.clone())
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
                let present = match tokio::time::timeout(3 * self.node.patience, answer).await {
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
        // The listener ends only with the engine.
        let _ = self.node.watch.send(channel.clone());
        if self.node.hooks.is_some() {
            self.node.op(Op::Occupy {
                channel: channel.clone(),
                occupied,
            });
        }
    }

    fn record_hook(&self, hook: crate::Hook) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let json = serde_json::to_string(&hook).expect("hooks serialize");
            let mut call = self.node.hook_script.prepare_invoke();
            call.arg("record").arg(&self.node.prefix).arg(json);
            let recorded: i64 = self
                .node
                .noted(call.invoke_async(&mut self.node.conn.clone()).await)?;
            if recorded == 0 {
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
        async move {
            self.node.promote_hooks().await?;
            let mut call = self.node.hook_script.prepare_invoke();
            call.arg("take")
                .arg(&self.node.prefix)
                .arg(lease.as_millis() as u64)
                .arg(max.max(1));
            let items: Vec<String> = self
                .node
                .noted(call.invoke_async(&mut self.node.conn.clone()).await)?;
            Ok(items
                .into_iter()
                .filter_map(|ticket| {
                    let (_, json) = ticket.split_once('\n')?;
                    let hook = serde_json::from_str(json).ok()?;
                    Some(crate::hooks::Taken { hook, ticket })
                })
                .collect())
        }
        .boxed()
    }

    fn hook_sent<'a>(
        &'a self,
        taken: &'a crate::hooks::Taken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let mut call = self.node.hook_script.prepare_invoke();
            call.arg("done").arg(&self.node.prefix).arg(&taken.ticket);
            let _: Vec<String> = self
                .node
                .noted(call.invoke_async(&mut self.node.conn.clone()).await)?;
            Ok(())
        }
        .boxed()
    }

    fn keep_hook<'a>(
        &'a self,
        taken: &'a crate::hooks::Taken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let mut call = self.node.hook_script.prepare_invoke();
            call.arg("keep")
                .arg(&self.node.prefix)
                .arg(lease.as_millis() as u64)
                .arg(&taken.ticket);
            let _: Vec<String> = self
                .node
                .noted(call.invoke_async(&mut self.node.conn.clone()).await)?;
            Ok(())
        }
        .boxed()
    }

    fn hooks_waiting(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        async move {
            let mut conn = self.node.conn.clone();
            let ready: usize = self
                .node
                .noted(conn.llen(format!("{}:hooks", self.node.prefix)).await)?;
            let pending: usize = self.node.noted(
                conn.zcard(format!("{}:hooks:pending", self.node.prefix))
                    .await,
            )?;
            Ok(ready + pending)
        }
        .boxed()
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

    fn health(&self) -> Option<bool> {
        // Commands answer and the subscription hears: both, or the node cannot serve.
        Some(self.node.is_up() && self.node.listening.load(Ordering::Relaxed))
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

    /// The channels the subscription connection now hears.
    fn set_heard(&self, heard: HashSet<Arc<str>>) {
        self.change_heard(|now| *now = heard);
    }

    fn change_heard(&self, change: impl FnOnce(&mut HashSet<Arc<str>>)) {
        let count = {
            let mut heard = self.heard.lock().expect("heard lock");
            change(&mut heard);
            heard.len()
        };
        metrics::gauge!("switchboard_redis_subscriptions").set(count as f64);
        self.heard_changed.send_replace(());
    }

    /// Waits (bounded) until this node hears `channel`, so that what a presence change
    /// publishes there reaches this node's members too.
    async fn hearing(&self, channel: &Arc<str>) {
        let mut changed = self.heard_changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.patience;
        while !self.heard.lock().expect("heard lock").contains(channel) {
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                return;
            }
        }
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

    fn key(&self, kind: &str, channel: &str) -> String {
        key(&self.prefix, kind, channel)
    }

    /// The Pub/Sub channel of notices for every node's doors.
    fn notices(&self) -> String {
        format!("{}:notices", self.prefix)
    }

    async fn open(&self, channel: &str) -> Result<Position, StoreError> {
        let mut call = self.open.prepare_invoke();
        call.key(self.key("seq", channel))
            .key(self.key("epoch", channel))
            .arg(new_epoch());
        let (last_id, epoch): (String, String) =
            self.noted(call.invoke_async(&mut self.conn.clone()).await)?;
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
        self.noted(call.invoke_async(&mut self.conn.clone()).await)
    }

    /// Stores and publishes `jobs` in order (Redis numbers them), in one round trip: a
    /// pipeline of one script call each.
    async fn post(&self, jobs: &[Job]) -> Result<Vec<Posted>, StoreError> {
        let now = millis(self.clock.now());
        let nonce_ttl = u64::try_from(self.nonce_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for job in jobs {
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
                .arg(POST)
                .arg(5)
                .arg(self.key("seq", channel))
                .arg(self.key("epoch", channel))
                .arg(self.key("history", channel))
                .arg(self.key("nonces", channel))
                .arg(self.key("nonce-times", channel))
                .arg(record_of(publication))
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
                .arg(field);
        }
        let replies: Vec<Vec<String>> =
            self.noted(pipe.query_async(&mut self.conn.clone()).await)?;
        replies
            .into_iter()
            .map(|reply| {
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
            })
            .collect()
    }

    async fn range(
        &self,
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
                .query_async(&mut self.conn.clone())
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
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.hget(self.key("nonces", channel), &field)
            .zscore(self.key("nonce-times", channel), &field);
        let (id, at): (Option<u64>, Option<f64>) = self.noted(pipe.query_async(&mut conn).await)?;
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

    async fn presence_call(
        &self,
        mode: &str,
        entries: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut call = self.presence.prepare_invoke();
        call.arg(mode)
            .arg(&self.prefix)
            .arg(&self.id)
            .arg(if self.hooks.is_some() { "1" } else { "0" });
        for entry in entries {
            call.arg(entry);
        }
        self.noted(call.invoke_async(&mut self.conn.clone()).await)
    }

    /// Moves the delayed changes that are due to the hooks list (Redis decides which
    /// are due, on its clock; a node only says how long each one's channel waits).
    async fn promote_hooks(&self) -> Result<(), StoreError> {
        let Some(config) = &self.hooks else {
            return Ok(());
        };
        let mut pending: Vec<(String, u64)> = self.noted(
            self.conn
                .clone()
                .zrangebyscore_withscores(format!("{}:hooks:pending", self.prefix), "-inf", "+inf")
                .await,
        )?;
        if pending.is_empty() {
            return Ok(());
        }
        // Oldest first; a vacancy after the removals of the same moment.
        pending.sort_by_key(|(name, at)| (*at, name.starts_with("channel_vacated")));
        let mut call = self.hook_script.prepare_invoke();
        call.arg("promote").arg(&self.prefix);
        for (name, _) in &pending {
            let Some(hook) = crate::hooks::parse_pending(name, 0) else {
                continue;
            };
            call.arg(name)
                .arg(crate::hooks::delay_ms(config, &hook.channel));
        }
        let _: Vec<String> = self.noted(call.invoke_async(&mut self.conn.clone()).await)?;
        Ok(())
    }

    /// Makes this node's presence exactly `entries` (`(channel, user)` pairs).
    async fn sync(&self, entries: &[(String, String)]) -> Result<(), StoreError> {
        let entries: Vec<String> = entries.iter().map(|(c, u)| entry(c, u)).collect();
        self.presence_call("sync", &entries).await.map(drop)
    }

    /// The users in `channel`, on any node, sorted.
    async fn members(&self, channel: &str) -> Result<Vec<String>, StoreError> {
        let mut users: Vec<String> =
            self.noted(self.conn.clone().hkeys(self.key("presence", channel)).await)?;
        users.sort();
        Ok(users)
    }

    /// Channels with users in them, on any node, with how many users each has.
    async fn channels(&self) -> Result<Vec<(String, usize)>, StoreError> {
        let mut conn = self.conn.clone();
        let names: Vec<String> =
            self.noted(conn.smembers(format!("{}:rooms", self.prefix)).await)?;
        let mut channels = Vec::with_capacity(names.len());
        for name in names {
            let users: usize = self.noted(conn.hlen(self.key("presence", &name)).await)?;
            if users > 0 {
                channels.push((name, users));
            }
        }
        channels.sort();
        Ok(channels)
    }

    async fn publish(&self, channel: &str, payload: Vec<u8>) -> Result<(), StoreError> {
        let _receivers: u64 = self.noted(
            self.conn
                .clone()
                .publish(self.key("room", channel), payload)
                .await,
        )?;
        Ok(())
    }

    /// Renews this node's `alive` key.
    async fn heartbeat(&self) -> Result<(), StoreError> {
        let expiry = u64::try_from(self.expiry.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(format!("{}:alive:{}", self.prefix, self.id))
            .arg(1)
            .arg("PX")
            .arg(expiry)
            .ignore()
            .sadd(format!("{}:nodes", self.prefix), &self.id)
            .ignore();
        self.noted(pipe.query_async::<()>(&mut self.conn.clone()).await)
    }

    /// Removes the presence of nodes whose `alive` key expired; returns how many.
    async fn reap(&self) -> Result<usize, StoreError> {
        let nodes: Vec<String> = self.noted(
            self.conn
                .clone()
                .smembers(format!("{}:nodes", self.prefix))
                .await,
        )?;
        let mut reaped = 0;
        for node in nodes.iter().filter(|n| **n != self.id) {
            let alive: bool = self.noted(
                self.conn
                    .clone()
                    .exists(format!("{}:alive:{node}", self.prefix))
                    .await,
            )?;
            if !alive {
                let mut call = self.presence.prepare_invoke();
                call.arg("reap")
                    .arg(&self.prefix)
                    .arg(node)
                    .arg(if self.hooks.is_some() { "1" } else { "0" });
                let _: Vec<String> = self.noted(call.invoke_async(&mut self.conn.clone()).await)?;
                reaped += 1;
            }
        }
        Ok(reaped)
    }

    /// Every channel and user with a connection on this node.
    fn local_presence(&self) -> Vec<(String, String)> {
        let channels = self.sink().map_or_else(Vec::new, Sink::channels);
        let hooks = self.hooks.is_some();
        channels
            .iter()
            .flat_map(|channel| {
                // Its occupancy here, when hooks count it.
                let occupied = (hooks && channel.occupied()).then(String::new);
                channel
                    .users()
                    .into_iter()
                    .chain(occupied)
                    .map(|user| (channel.name.to_string(), user))
            })
            .collect()
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

    /// Delivers, from the stored history, what `channel` has after its last delivery up
    /// to `upto`. What cannot be read (trimmed meanwhile, or Redis did not answer) cuts
    /// the channel's members off to resume, rather than leaving them a silent hole.
    async fn fill_gap(&self, channel: &Arc<Channel>, upto: u64) {
        loop {
            let after = channel.broadcast_id();
            if after >= upto {
                return;
            }
            let window = Window {
                after,
                upto,
                limit: self.replay_page,
                newest: false,
                not_before: None,
            };
            let page = match self.read(&channel.name, window).await {
                Ok(page) => page,
                Err(cause) => {
                    warn!(%cause, channel = %channel.name, "reading missed messages failed");
                    channel.skip_to(upto);
                    return;
                }
            };
            let ids: Vec<u64> = page.iter().map(|p| p.id).collect();
            if ids.is_empty() || !crate::recovery::continues(after, &ids) {
                channel.skip_to(upto);
                return;
            }
            for publication in page {
                channel.broadcast(&Arc::new(Delivery::new(publication)));
            }
        }
    }

    /// `channels` take where their stream stands now: a new epoch
    /// resets them, else they receive what was stored after their last delivery. Just
    /// after Redis came back, the command connection may still be reconnecting: a
    /// channel that could not be read is tried again, a few times.
    async fn catch_up(&self, mut channels: Vec<Arc<Channel>>) {
        for attempt in 1..=CATCH_UP_TRIES {
            let mut failed = Vec::new();
            for channel in channels {
                let seen = channel.broadcast_id();
                match self.open(&channel.name).await {
                    Ok(position) => self.resume(&channel, position, seen).await,
                    Err(cause) if attempt == CATCH_UP_TRIES => {
                        warn!(%cause, channel = %channel.name, "catching up after the subscription failed")
                    }
                    Err(_) => failed.push(channel),
                }
            }
            if failed.is_empty() {
                return;
            }
            channels = failed;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Takes where `channel`'s stream stands after an outage. Ids that went back under
    /// the same epoch (a Redis restarted from data older than what it had said) mean the
    /// history is not what members were told: the epoch is renewed, for every node.
    /// `seen` is the channel's last delivered id from before `position` was read:
    /// publications delivered while it was read are newer than it, not a sign that the
    /// ids went back.
    async fn resume(&self, channel: &Arc<Channel>, mut position: Position, seen: u64) {
        if *position.epoch == *channel.epoch() && position.last_id < seen {
            match self.renew(&channel.name, &position.epoch).await {
                Ok(epoch) => position.epoch = epoch,
                Err(cause) => {
                    warn!(%cause, channel = %channel.name, "renewing the epoch of a channel whose ids went back failed");
                    return;
                }
            }
        }
        if !channel.reposition(&position) {
            self.fill_gap(channel, position.last_id).await;
        }
    }

    /// Reads a payload from `channel`; `None` for channels or payloads of none.
    fn parse(&self, pubsub: &str, payload: &[u8]) -> Option<(String, Incoming)> {
        let channel = pubsub.strip_prefix(&self.prefix)?.strip_prefix(":room:")?;
        let (&kind, rest) = payload.split_first()?;
        let split = |bytes: &[u8]| {
            let at = bytes.iter().position(|b| *b == b'\n')?;
            Some((bytes[..at].to_vec(), bytes[at + 1..].to_vec()))
        };
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).ok();
        let incoming = match kind {
            b'M' => {
                let (id, rest) = split(rest)?;
                let (epoch, record) = split(&rest)?;
                let id: u64 = text(id)?.parse().ok().filter(|id| *id > 0)?;
                Incoming::Publication {
                    publication: publication_of(channel, id, &record)?,
                    epoch: text(epoch)?,
                }
            }
            b'P' => {
                let (action, rest) = split(rest)?;
                // `user`, or `user \n info` (a join saying something of itself).
                let (user, info) = match split(&rest) {
                    Some((user, info)) => (user, info),
                    None => (rest, Vec::new()),
                };
                let info = text(info).and_then(|info| RawValue::from_string(info).ok());
                Incoming::Presence {
                    joined: action == b"join",
                    user: text(user)?,
                    info,
                }
            }
            b'T' => {
                let (node, rest) = split(rest)?;
                let (user, flag) = split(&rest)?;
                Incoming::Typing {
                    node: text(node)?,
                    user: text(user)?,
                    is_typing: flag == b"1",
                }
            }
            b'B' => {
                let (node, data) = split(rest)?;
                Incoming::Binary {
                    node: text(node)?,
                    data: Bytes::from(data),
                }
            }
            _ => return None,
        };
        Some((channel.to_owned(), incoming))
    }

    async fn on_incoming(&self, channel: &str, incoming: Incoming) {
        // No one here uses the channel: nothing to deliver.
        let Some(channel) = self.sink().and_then(|sink| sink.channel(channel)) else {
            return;
        };
        match incoming {
            Incoming::Publication { publication, epoch } => {
                let id = publication.id;
                if *channel.epoch() != *epoch {
                    channel.reposition(&Position {
                        last_id: id - 1,
                        epoch,
                    });
                }
                // Published in id order; a gap means the subscription dropped some.
                self.fill_gap(&channel, id - 1).await;
                channel.broadcast(&Arc::new(Delivery::new(publication)));
            }
            Incoming::Presence { joined, user, info } => {
                channel.remote_presence(joined, &user, info)
            }
            Incoming::Typing {
                node,
                user,
                is_typing,
            } if node != self.id => channel.remote_typing(&user, is_typing),
            Incoming::Binary { node, data } if node != self.id => channel.remote_binary(data),
            Incoming::Typing { .. } | Incoming::Binary { .. } => {}
        }
    }
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Does the presence work in order (see [`Op`]). A presence change that fails marks the
/// node for a resync, which the heartbeat asks for once Redis answers again.
async fn presence_worker(node: Arc<Node>, mut ops: mpsc::UnboundedReceiver<Op>) {
    while let Some(op) = ops.recv().await {
        let presence = match op {
            Op::Join {
                channel,
                user,
                info,
                reply,
            } => {
                // Its join, published in the channel, is for this node's members too.
                node.hearing(&channel).await;
                let entries = [entry(&channel, &user), info.unwrap_or_default()];
                let result = node.presence_call("join", &entries).await;
                let failed = result.as_ref().err().map(ToString::to_string);
                // The subscriber may have gone; presence was told regardless.
                let _ = reply.send(result);
                failed.map_or(Ok(()), Err)
            }
            Op::Leave { channel, user } => node
                .presence_call("leave", &[entry(&channel, &user)])
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Op::Occupy { channel, occupied } => {
                let mode = if occupied { "join" } else { "leave" };
                node.presence_call(mode, &[entry(&channel, "")])
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            Op::Typing {
                channel,
                user,
                is_typing,
            } => {
                let payload = format!("T{}\n{user}\n{}", node.id, u8::from(is_typing));
                if let Err(cause) = node.publish(&channel, payload.into_bytes()).await {
                    warn!(%cause, "typing did not reach the other nodes");
                }
                Ok(())
            }
            Op::Binary { channel, data } => {
                let mut payload = format!("B{}\n", node.id).into_bytes();
                payload.extend_from_slice(&data);
                if let Err(cause) = node.publish(&channel, payload).await {
                    warn!(%cause, "binary data did not reach the other nodes");
                }
                Ok(())
            }
            Op::Resync => {
                node.resync_queued.store(false, Ordering::Release);
                if node.stopped() {
                    return;
                }
                let entries = node.local_presence();
                match node.sync(&entries).await {
                    Ok(()) => {
                        node.resync.store(false, Ordering::Relaxed);
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
                if let Err(cause) = node.sync(&[]).await {
                    warn!(%cause, "leaving the cluster: presence not removed (it expires)");
                }
                // Whoever asked may have stopped waiting.
                let _ = done.send(());
                return;
            }
        };
        if let Err(cause) = presence {
            warn!(%cause, "a presence change did not reach Redis; it is sent again when Redis answers");
            node.resync.store(true, Ordering::Relaxed);
        }
    }
}

/// Renews this node's heartbeat and reaps nodes whose heartbeat expired.
async fn heartbeat(node: Arc<Node>, cancel: CancellationToken, interval: Duration) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if node.stopped() {
            return;
        }
        if node.heartbeat().await.is_ok() {
            node.resync_if_needed();
            match node.reap().await {
                Ok(0) => {}
                Ok(nodes) => info!(nodes, "removed the presence of nodes that stopped"),
                Err(cause) => warn!(%cause, "checking for stopped nodes failed"),
            }
        }
    }
}

/// Asks Redis for a `PING` every `interval` on the command connection, so a link that
/// went silent is noticed within the timeout even when nothing else is sent, and a
/// link that answers again has the node's presence told again at once.
async fn watchdog(node: Arc<Node>, cancel: CancellationToken, interval: Duration) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if node.stopped() {
            return;
        }
        let pong: redis::RedisResult<String> =
            redis::cmd("PING").query_async(&mut node.conn.clone()).await;
        if node.noted(pong).is_ok() {
            node.resync_if_needed();
        }
    }
}

/// Receives the Pub/Sub channels of the channels with members here, and this node's
/// notices, and hands what arrives to this node's members. A channel is subscribed to
/// when it gets its first member here and left when it loses its last one; once a
/// subscription is confirmed, the channel catches up from the stored history, so what
/// was published before it took effect is still delivered, in order. After each
/// reconnection every occupied channel is subscribed to again and catches up.
async fn listener(
    node: Arc<Node>,
    cancel: CancellationToken,
    mut watch: mpsc::UnboundedReceiver<Arc<str>>,
) {
    use futures_util::StreamExt;

    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        // What changed before now is in the occupancy read below.
        while watch.try_recv().is_ok() {}
        let occupied: Vec<Arc<Channel>> = node
            .sink()
            .map_or_else(Vec::new, Sink::channels)
            .into_iter()
            .filter(|channel| channel.occupied())
            .collect();
        let names: Vec<Arc<str>> = occupied.iter().map(|c| c.name.clone()).collect();
        let subscribed = tokio::select! {
            () = cancel.cancelled() => return,
            subscribed = subscribe(&node, &names) => subscribed,
        };
        let (mut pubsub, mut messages) = match subscribed {
            Ok(pubsub) => pubsub.split(),
            Err(cause) => {
                if node.set_up(false) {
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
        if node.stopped() {
            return;
        }
        if !first {
            info!("subscribed to Redis again");
            node.resync.store(true, Ordering::Relaxed);
            node.resync_if_needed();
        }
        node.set_heard(names.into_iter().collect());
        node.catch_up(occupied).await;
        node.listening.store(true, Ordering::Relaxed);
        first = false;
        let notices = node.notices();
        // A subscription connection gets no answers to wait for: it is asked for a
        // `PING` every third of the timeout, so silence is noticed as soon as on the
        // command connection.
        let mut probe = tokio::time::interval((node.patience / 2).max(Duration::from_millis(20)));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                () = cancel.cancelled() => return,
                _ = probe.tick() => {
                    match confirmed(node.patience, pubsub.ping::<redis::Value>()).await {
                        Ok(_) => continue,
                        Err(cause) => {
                            warn!(%cause, "the Redis subscription went silent; subscribing again");
                            break;
                        }
                    }
                }
                changed = watch.recv() => {
                    let Some(changed) = changed else { return };
                    let mut changed = vec![changed];
                    while let Ok(more) = watch.try_recv() {
                        changed.push(more);
                    }
                    match follow(&node, &mut pubsub, changed).await {
                        Ok(()) => continue,
                        Err(cause) => {
                            warn!(%cause, "changing Redis subscriptions failed; subscribing again");
                            break;
                        }
                    }
                }
                message = messages.next() => message,
            };
            let Some(message) = message else {
                warn!("lost the Redis subscription; subscribing again");
                break;
            };
            if node.stopped() {
                return;
            }
            if message.get_channel_name() == notices {
                if let Some(sink) = node.sink.get() {
                    sink.notice(Bytes::copy_from_slice(message.get_payload_bytes()));
                }
                continue;
            }
            if let Some((channel, incoming)) =
                node.parse(message.get_channel_name(), message.get_payload_bytes())
            {
                node.on_incoming(&channel, incoming).await;
            }
        }
        node.listening.store(false, Ordering::Relaxed);
        node.set_up(false);
        node.set_heard(HashSet::new());
    }
}

/// Brings the subscriptions of `changed` channels in line with their occupancy now:
/// subscribes to those with members here (each then catches up, in a task of its own),
/// leaves those without.
async fn follow(
    node: &Arc<Node>,
    pubsub: &mut redis::aio::PubSubSink,
    changed: Vec<Arc<str>>,
) -> Result<(), StoreError> {
    let sink = node.sink();
    let (mut join, mut leave) = (Vec::new(), Vec::new());
    {
        let heard = node.heard.lock().expect("heard lock");
        let mut seen = HashSet::new();
        for name in changed {
            if !seen.insert(name.clone()) {
                continue;
            }
            let channel = sink.and_then(|sink| sink.channel(&name));
            match channel.filter(|channel| channel.occupied()) {
                Some(channel) if !heard.contains(&name) => join.push(channel),
                None if heard.contains(&name) => leave.push(name),
                _ => {}
            }
        }
    }
    if !leave.is_empty() {
        let keys: Vec<String> = leave.iter().map(|name| node.key("room", name)).collect();
        confirmed(node.patience, pubsub.unsubscribe(keys)).await?;
        node.change_heard(|heard| {
            for name in &leave {
                heard.remove(name);
            }
        });
    }
    if !join.is_empty() {
        let keys: Vec<String> = join.iter().map(|c| node.key("room", &c.name)).collect();
        confirmed(node.patience, pubsub.subscribe(keys)).await?;
        node.change_heard(|heard| heard.extend(join.iter().map(|c| c.name.clone())));
        for channel in join {
            let node = node.clone();
            tokio::spawn(async move { node.catch_up(vec![channel]).await });
        }
    }
    Ok(())
}

/// What the subscription connection answered, within `patience`.
async fn confirmed<T>(
    patience: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(patience, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Unavailable(
            "the Redis subscription connection did not answer",
        )),
    }
}

async fn subscribe(node: &Node, channels: &[Arc<str>]) -> Result<redis::aio::PubSub, StoreError> {
    let connect = async {
        let mut pubsub = node.client.get_async_pubsub().await?;
        pubsub.subscribe(node.notices()).await?;
        // A few thousand to a command, however many channels there are.
        for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|name| node.key("room", name)).collect();
            pubsub.subscribe(keys).await?;
        }
        Ok::<_, redis::RedisError>(pubsub)
    };
    let commands = 1 + channels.len().div_ceil(SUBSCRIBE_CHUNK);
    let bound = node.patience * u32::try_from(commands).unwrap_or(u32::MAX);
    match tokio::time::timeout(bound, connect).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Unavailable("subscribing to Redis timed out")),
    }
}

/// Sends queued publications to Redis, up to `max_batch` in one pipeline, and settles
/// each: stored (its delivery comes from Redis), a repeated nonce (the original goes to
/// its sender again), or refused (its sender is told, and sends it again).
async fn poster(node: Arc<Node>, mut jobs: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    while let Some(first) = jobs.recv().await {
        batch.push(first);
        top_up(&mut batch, &mut jobs, max_batch);
        match node.post(&batch).await {
            Ok(outcomes) => {
                let stored = outcomes
                    .iter()
                    .filter(|o| matches!(o, Posted::Stored(_)))
                    .count();
                metrics::counter!("switchboard_messages_stored_total").increment(stored as u64);
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    let outcome = match outcome {
                        Posted::Stored(id) => {
                            let mut publication = job.publication;
                            publication.id = id;
                            Outcome::Stored(Arc::new(Delivery::new(publication)))
                        }
                        Posted::Known(id) => {
                            node.acknowledge_again(&job, id).await;
                            Outcome::Duplicate(id)
                        }
                    };
                    // The publisher may have gone; the outcome stands regardless.
                    let _ = job.done.send(Ok(outcome));
                }
            }
            Err(cause) => {
                warn!(%cause, refused = batch.len(), "storing messages in Redis failed; their senders are told");
                for job in batch.drain(..) {
                    if let Some(me) = job.member {
                        let nonce = job.publication.nonce.clone();
                        job.channel
                            .send_to(&Target::Member(me), Outbound::Refused { nonce });
                    }
                    let _ = job.done.send(Err(cause.to_string()));
                }
            }
        }
    }
}
