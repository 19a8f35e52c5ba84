//! Several nodes sharing rooms over Redis.
//!
//! Every key and channel starts with a prefix (`switchboard` by default):
//!
//! - `P:seq:{room}`: the room's last message id (`INCR`).
//! - `P:history:{room}`: a stream, one entry per message, with id `{message id}-0` and
//!   one field `m` holding the message's record (JSON: from, text, timestamp, nonce).
//! - `P:nonces:{room}`: a hash from `user \n nonce` to the message id.
//! - `P:room:{room}`: the room's channel. Payloads start with a kind byte:
//!   `M{id}\n{record}` a stored message, `P{join|leave}\n{user}` presence,
//!   `T{node}\n{user}\n{0|1}` typing, `B{node}\n{bytes}` binary data.
//! - `P:presence:{room}`: a hash from user to the number of nodes it is on.
//! - `P:rooms`: the set of rooms with someone in them.
//! - `P:nodes`: the set of nodes; `P:alive:{node}` expires unless the node's heartbeat
//!   renews it; `P:members:{node}`: the set of `room \n user` present on the node.
//!
//! A message is one script call: the nonce is checked, the id taken, the record added
//! to the stream and published, all atomically, so every node sees the messages of a
//! room in id order and nothing is published that is not stored. Presence changes are
//! scripts too; a node that stops renewing its `alive` key is reaped by the others,
//! which publish the leaves of its users.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

use crate::store::{HistoryStore, StoreError, StoredMessage};

/// How a node joins a cluster.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// The start of every key and channel, so clusters can share one Redis.
    pub prefix: String,
    /// How long a node that stopped answering keeps its users in the member lists.
    pub presence_expiry: Duration,
}

impl ClusterConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "switchboard".into(),
            presence_expiry: Duration::from_secs(15),
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
}

/// A message as it is kept in the history stream and published (the id is the
/// stream entry's).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    from: String,
    text: String,
    timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
}

fn record_of(message: &StoredMessage) -> String {
    serde_json::to_string(&Record {
        from: message.from.clone(),
        text: message.text.clone(),
        timestamp: message.timestamp.clone(),
        nonce: message.nonce.clone(),
    })
    .expect("records serialize")
}

fn message_of(room: &str, id: u64, record: &[u8]) -> Option<StoredMessage> {
    let record: Record = serde_json::from_slice(record).ok()?;
    Some(StoredMessage {
        room: room.to_owned(),
        id,
        from: record.from,
        text: record.text,
        timestamp: record.timestamp,
        nonce: record.nonce,
    })
}

/// What the post script did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostOutcome {
    /// Stored and published under this id.
    Stored(u64),
    /// The user already sent this nonce: stored before under this id.
    Known(u64),
}

/// What arrived on a room's channel.
#[derive(Debug)]
pub(crate) enum Incoming {
    Message(StoredMessage),
    Presence {
        joined: bool,
        user: String,
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

const POST: &str = r"
local user, nonce, record, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local field = user .. '\n' .. nonce
if nonce ~= '' then
  local known = redis.call('HGET', KEYS[3], field)
  if known then return {0, tonumber(known)} end
end
local id = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], id .. '-0', 'm', record)
if nonce ~= '' then redis.call('HSET', KEYS[3], field, id) end
redis.call('PUBLISH', channel, 'M' .. id .. '\n' .. record)
return {1, id}
";

/// Presence, atomically. ARGV: mode (join, leave, sync, reap), prefix, node, then
/// `room \n user` entries. A join or leave publishes only when the user's first node
/// joins or last node leaves. `sync` makes the node's entries exactly the ones given
/// (after an outage); `reap` removes a node whose `alive` key is gone. A join returns
/// the room's users.
const PRESENCE: &str = r"
local mode, prefix, node = ARGV[1], ARGV[2], ARGV[3]
local mine = prefix .. ':members:' .. node
local function split(entry)
  local at = string.find(entry, '\n', 1, true)
  return string.sub(entry, 1, at - 1), string.sub(entry, at + 1)
end
local function join(entry)
  if redis.call('SADD', mine, entry) == 0 then return end
  local room, user = split(entry)
  if redis.call('HINCRBY', prefix .. ':presence:' .. room, user, 1) == 1 then
    redis.call('SADD', prefix .. ':rooms', room)
    redis.call('PUBLISH', prefix .. ':room:' .. room, 'Pjoin\n' .. user)
  end
end
local function leave(entry)
  if redis.call('SREM', mine, entry) == 0 then return end
  local room, user = split(entry)
  local hash = prefix .. ':presence:' .. room
  if redis.call('HINCRBY', hash, user, -1) <= 0 then
    redis.call('HDEL', hash, user)
    if redis.call('HLEN', hash) == 0 then redis.call('SREM', prefix .. ':rooms', room) end
    redis.call('PUBLISH', prefix .. ':room:' .. room, 'Pleave\n' .. user)
  end
end
if mode == 'join' then
  join(ARGV[4])
  local room = split(ARGV[4])
  return redis.call('HKEYS', prefix .. ':presence:' .. room)
elseif mode == 'leave' then
  leave(ARGV[4])
elseif mode == 'sync' then
  local want = {}
  for i = 4, #ARGV do want[ARGV[i]] = true end
  for _, entry in ipairs(redis.call('SMEMBERS', mine)) do
    if not want[entry] then leave(entry) end
  end
  for i = 4, #ARGV do join(ARGV[i]) end
elseif mode == 'reap' then
  if redis.call('EXISTS', prefix .. ':alive:' .. node) == 1 then return {} end
  for _, entry in ipairs(redis.call('SMEMBERS', mine)) do leave(entry) end
  redis.call('DEL', mine)
  redis.call('SREM', prefix .. ':nodes', node)
end
return {}
";

/// This node's link to the cluster.
pub(crate) struct Cluster {
    pub(crate) node: String,
    prefix: String,
    expiry: Duration,
    client: redis::Client,
    conn: ConnectionManager,
    up: AtomicBool,
    presence: Script,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Redis commands wait at most this long for an answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Cluster {
    /// Connects (failing at once when Redis cannot be reached) and returns the link and
    /// a history store reading from the same Redis.
    pub(crate) async fn connect(config: &ClusterConfig) -> Result<(Self, RedisStore), StoreError> {
        let client = redis::Client::open(config.url.as_str())?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = client.get_connection_manager_with_config(manager).await?;
        let node = {
            use rand::{RngCore, SeedableRng};
            format!("{:016x}", rand::rngs::StdRng::from_os_rng().next_u64())
        };
        let store = RedisStore {
            client: client.clone(),
            prefix: config.prefix.clone(),
            conn: Mutex::new(None),
        };
        let cluster = Self {
            node,
            prefix: config.prefix.clone(),
            expiry: config.presence_expiry,
            client,
            conn,
            up: AtomicBool::new(true),
            presence: Script::new(PRESENCE),
        };
        cluster.heartbeat().await?;
        Ok((cluster, store))
    }

    /// Whether the last exchange with Redis worked.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records how the last exchange went; true when this changed the state.
    pub(crate) fn set_up(&self, up: bool) -> bool {
        let was = self.up.swap(up, Ordering::Relaxed);
        metrics::gauge!("switchboard_redis_up").set(if up { 1.0 } else { 0.0 });
        if !up {
            metrics::counter!("switchboard_redis_errors_total").increment(1);
        }
        was != up
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

    fn channel(&self, room: &str) -> String {
        format!("{}:room:{room}", self.prefix)
    }

    /// The pattern every room channel matches.
    pub(crate) fn channels(&self) -> String {
        format!("{}:room:*", self.prefix)
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Stores and publishes `messages` in order (their ids are ignored: Redis assigns
    /// the next ones), in one round trip: a pipeline of one script call each.
    pub(crate) async fn post(
        &self,
        messages: &[StoredMessage],
    ) -> Result<Vec<PostOutcome>, StoreError> {
        let mut pipe = redis::pipe();
        for message in messages {
            let room = &message.room;
            // EVAL with the script's text rather than EVALSHA: Redis caches it by hash
            // either way, and a restarted Redis (its script cache empty) needs no reload
            // in the middle of a pipeline.
            pipe.cmd("EVAL")
                .arg(POST)
                .arg(3)
                .arg(format!("{}:seq:{room}", self.prefix))
                .arg(format!("{}:history:{room}", self.prefix))
                .arg(format!("{}:nonces:{room}", self.prefix))
                .arg(&message.from)
                .arg(message.nonce.as_deref().unwrap_or(""))
                .arg(record_of(message))
                .arg(self.channel(room));
        }
        let replies: Vec<(u8, u64)> = self.noted(pipe.query_async(&mut self.conn.clone()).await)?;
        Ok(replies
            .into_iter()
            .map(|(stored, id)| {
                if stored == 1 {
                    PostOutcome::Stored(id)
                } else {
                    PostOutcome::Known(id)
                }
            })
            .collect())
    }

    async fn presence_call(
        &self,
        mode: &str,
        entries: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut call = self.presence.prepare_invoke();
        call.arg(mode).arg(&self.prefix).arg(&self.node);
        for entry in entries {
            call.arg(entry);
        }
        self.noted(call.invoke_async(&mut self.conn.clone()).await)
    }

    /// `user` is in `room` on this node; returns the room's users, cluster-wide.
    pub(crate) async fn join(&self, room: &str, user: &str) -> Result<Vec<String>, StoreError> {
        let mut users = self.presence_call("join", &[entry(room, user)]).await?;
        users.sort();
        Ok(users)
    }

    /// `user` left `room` on this node.
    pub(crate) async fn leave(&self, room: &str, user: &str) -> Result<(), StoreError> {
        self.presence_call("leave", &[entry(room, user)])
            .await
            .map(drop)
    }

    /// Makes this node's presence exactly `entries` (`(room, user)` pairs).
    pub(crate) async fn sync(&self, entries: &[(String, String)]) -> Result<(), StoreError> {
        let entries: Vec<String> = entries.iter().map(|(r, u)| entry(r, u)).collect();
        self.presence_call("sync", &entries).await.map(drop)
    }

    /// The users in `room`, on any node, sorted.
    pub(crate) async fn members(&self, room: &str) -> Result<Vec<String>, StoreError> {
        let mut users: Vec<String> = self.noted(
            self.conn
                .clone()
                .hkeys(format!("{}:presence:{room}", self.prefix))
                .await,
        )?;
        users.sort();
        Ok(users)
    }

    /// Rooms with users in them, on any node, with how many users each has.
    pub(crate) async fn rooms(&self) -> Result<Vec<(String, usize)>, StoreError> {
        let mut conn = self.conn.clone();
        let names: Vec<String> =
            self.noted(conn.smembers(format!("{}:rooms", self.prefix)).await)?;
        let mut rooms = Vec::with_capacity(names.len());
        for name in names {
            let users: usize =
                self.noted(conn.hlen(format!("{}:presence:{name}", self.prefix)).await)?;
            if users > 0 {
                rooms.push((name, users));
            }
        }
        rooms.sort();
        Ok(rooms)
    }

    /// Tells the other nodes that `user` is typing (or stopped) in `room`.
    pub(crate) async fn typing(
        &self,
        room: &str,
        user: &str,
        is_typing: bool,
    ) -> Result<(), StoreError> {
        let payload = format!("T{}\n{user}\n{}", self.node, u8::from(is_typing));
        self.publish(room, payload.into_bytes()).await
    }

    /// Relays binary data to `room`'s connections on the other nodes.
    pub(crate) async fn binary(&self, room: &str, data: &[u8]) -> Result<(), StoreError> {
        let mut payload = format!("B{}\n", self.node).into_bytes();
        payload.extend_from_slice(data);
        self.publish(room, payload).await
    }

    async fn publish(&self, room: &str, payload: Vec<u8>) -> Result<(), StoreError> {
        let _receivers: u64 =
            self.noted(self.conn.clone().publish(self.channel(room), payload).await)?;
        Ok(())
    }

    /// Renews this node's `alive` key.
    pub(crate) async fn heartbeat(&self) -> Result<(), StoreError> {
        let expiry = u64::try_from(self.expiry.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(format!("{}:alive:{}", self.prefix, self.node))
            .arg(1)
            .arg("PX")
            .arg(expiry)
            .ignore()
            .sadd(format!("{}:nodes", self.prefix), &self.node)
            .ignore();
        self.noted(pipe.query_async::<()>(&mut self.conn.clone()).await)
    }

    /// Removes the presence of nodes whose `alive` key expired; returns how many.
    pub(crate) async fn reap(&self) -> Result<usize, StoreError> {
        let nodes: Vec<String> = self.noted(
            self.conn
                .clone()
                .smembers(format!("{}:nodes", self.prefix))
                .await,
        )?;
        let mut reaped = 0;
        for node in nodes.iter().filter(|n| **n != self.node) {
            let alive: bool = self.noted(
                self.conn
                    .clone()
                    .exists(format!("{}:alive:{node}", self.prefix))
                    .await,
            )?;
            if !alive {
                let mut call = self.presence.prepare_invoke();
                call.arg("reap").arg(&self.prefix).arg(node);
                let _: Vec<String> = self.noted(call.invoke_async(&mut self.conn.clone()).await)?;
                reaped += 1;
            }
        }
        Ok(reaped)
    }

    /// Reads a payload from `channel`; `None` for channels or payloads of no room.
    pub(crate) fn parse(&self, channel: &str, payload: &[u8]) -> Option<(String, Incoming)> {
        let room = channel.strip_prefix(&self.prefix)?.strip_prefix(":room:")?;
        let (&kind, rest) = payload.split_first()?;
        let split = |bytes: &[u8]| {
            let at = bytes.iter().position(|b| *b == b'\n')?;
            Some((bytes[..at].to_vec(), bytes[at + 1..].to_vec()))
        };
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).ok();
        let incoming = match kind {
            b'M' => {
                let (id, record) = split(rest)?;
                let id: u64 = text(id)?.parse().ok()?;
                Incoming::Message(message_of(room, id, &record)?)
            }
            b'P' => {
                let (action, user) = split(rest)?;
                Incoming::Presence {
                    joined: action == b"join",
                    user: text(user)?,
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
        Some((room.to_owned(), incoming))
    }
}

fn entry(room: &str, user: &str) -> String {
    format!("{room}\n{user}")
}

/// History in Redis, read by the nodes of a cluster (messages are added by the post
/// script, never through [`HistoryStore::append`]).
pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    /// One blocking connection, opened again after an error.
    conn: Mutex<Option<redis::Connection>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

type Entries = Vec<(String, Vec<Vec<u8>>)>;

impl RedisStore {
    fn with<T>(
        &self,
        run: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.lock().expect("redis store lock");
        if slot.is_none() {
            let conn = self.client.get_connection_with_timeout(RESPONSE_TIMEOUT)?;
            conn.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
            conn.set_write_timeout(Some(RESPONSE_TIMEOUT))?;
            *slot = Some(conn);
        }
        let result = run(slot.as_mut().expect("connected"));
        if result.is_err() {
            // Open a fresh connection next time: this one may be mid-reply or broken.
            *slot = None;
        }
        Ok(result?)
    }

    fn parse(room: &str, entries: Entries) -> Vec<StoredMessage> {
        entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let id: u64 = id.split_once('-')?.0.parse().ok()?;
                let record = fields.get(1)?;
                message_of(room, id, record)
            })
            .collect()
    }
}

impl HistoryStore for RedisStore {
    fn append(&self, _batch: &[StoredMessage]) -> Result<(), StoreError> {
        Err(StoreError::Unsupported(
            "a cluster stores messages through its post script",
        ))
    }

    fn range(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let key = format!("{}:history:{room}", self.prefix);
        let entries: Entries = self.with(|conn| {
            redis::cmd("XRANGE")
                .arg(&key)
                .arg(after + 1)
                .arg(upto)
                .arg("COUNT")
                .arg(limit)
                .query(conn)
        })?;
        Ok(Self::parse(room, entries))
    }

    fn recent(
        &self,
        room: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if upto == 0 || limit == 0 {
            return Ok(Vec::new());
        }
        let key = format!("{}:history:{room}", self.prefix);
        let entries: Entries = self.with(|conn| {
            redis::cmd("XREVRANGE")
                .arg(&key)
                .arg(upto)
                .arg("-")
                .arg("COUNT")
                .arg(limit)
                .query(conn)
        })?;
        let mut messages = Self::parse(room, entries);
        messages.reverse();
        Ok(messages)
    }

    fn last_id(&self, room: &str) -> Result<u64, StoreError> {
        let key = format!("{}:seq:{room}", self.prefix);
        let id: Option<u64> = self.with(|conn| redis::cmd("GET").arg(&key).query(conn))?;
        Ok(id.unwrap_or(0))
    }

    fn find_nonce(
        &self,
        room: &str,
        user: &str,
        nonce: &str,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let key = format!("{}:nonces:{room}", self.prefix);
        let field = format!("{user}\n{nonce}");
        let id: Option<u64> =
            self.with(|conn| redis::cmd("HGET").arg(&key).arg(&field).query(conn))?;
        match id {
            Some(id) => Ok(self.range(room, id - 1, id, 1)?.pop()),
            None => Ok(None),
        }
    }
}
