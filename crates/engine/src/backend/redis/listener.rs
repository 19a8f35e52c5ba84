//! Hearing channels: a subscription connection per shard (one for a Redis Cluster,
//! whose sharded subscriptions it routes itself), subscribed to a channel's Pub/Sub
//! channel while the channel has members here, and only then. A channel catches up
//! from the stored history once its subscription is confirmed, so what was published
//! before the subscription took effect is still delivered, in order.

use std::collections::VecDeque;

use super::*;

/// One subscription connection's state, shared with the node's other tasks.
pub(super) struct Ear {
    /// The channels its connection has confirmed, and a tick each time they change.
    heard: Mutex<HashSet<Arc<str>>>,
    heard_changed: tokio::sync::watch::Sender<()>,
    /// Subscribed and caught up.
    listening: AtomicBool,
    /// Channels whose occupancy here changed, for its listener.
    watch: mpsc::UnboundedSender<Arc<str>>,
    /// The other end, until the listener takes it.
    watched: Option<mpsc::UnboundedReceiver<Arc<str>>>,
}

impl Ear {
    pub(super) fn new() -> Self {
        let (watch, watched) = mpsc::unbounded_channel();
        Self {
            heard: Mutex::new(HashSet::new()),
            heard_changed: tokio::sync::watch::channel(()).0,
            listening: AtomicBool::new(false),
            watch,
            watched: Some(watched),
        }
    }

    pub(super) fn take_watch(&mut self) -> mpsc::UnboundedReceiver<Arc<str>> {
        self.watched.take().expect("taken once")
    }

    /// `channel`'s occupancy here changed.
    pub(super) fn watch(&self, channel: &Arc<str>) {
        // The listener ends only with the engine.
        let _ = self.watch.send(channel.clone());
    }

    pub(super) fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    fn set_heard(&self, heard: HashSet<Arc<str>>) {
        self.change_heard(|now| *now = heard);
    }

    fn change_heard(&self, change: impl FnOnce(&mut HashSet<Arc<str>>)) {
        change(&mut self.heard.lock().expect("heard lock"));
        self.heard_changed.send_replace(());
    }

    fn hears(&self, channel: &str) -> bool {
        self.heard.lock().expect("heard lock").contains(channel)
    }

    /// Waits (at most `patience`) until this connection hears `channel`, so that what a
    /// presence change publishes there reaches this node's members too.
    pub(super) async fn hearing(&self, channel: &str, patience: Duration) {
        let mut changed = self.heard_changed.subscribe();
        let deadline = tokio::time::Instant::now() + patience;
        while !self.hears(channel) {
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                return;
            }
        }
    }
}

/// Runs the node's listeners: one per shard, or the cluster's.
pub(super) async fn run(
    node: Arc<Node>,
    cancel: CancellationToken,
    watch: Vec<mpsc::UnboundedReceiver<Arc<str>>>,
    pushes: Option<mpsc::UnboundedReceiver<redis::PushInfo>>,
) {
    let counting = tokio::spawn(count_subscriptions(node.clone(), cancel.clone()));
    match pushes {
        Some(pushes) => {
            let watch = watch.into_iter().next().expect("one ear");
            cluster(node, cancel, watch, pushes).await;
        }
        None => {
            let listeners = watch
                .into_iter()
                .enumerate()
                .map(|(shard, watch)| shard_listener(node.clone(), shard, cancel.clone(), watch));
            futures_util::future::join_all(listeners).await;
        }
    }
    counting.abort();
}

/// Keeps the `switchboard_redis_subscriptions` gauge (channels heard, every shard's).
async fn count_subscriptions(node: Arc<Node>, cancel: CancellationToken) {
    loop {
        let heard: usize = node
            .ears
            .iter()
            .map(|ear| ear.heard.lock().expect("heard lock").len())
            .sum();
        metrics::gauge!("switchboard_redis_subscriptions").set(heard as f64);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The channels with members here whose keys are on `shard`.
fn occupied_on(node: &Node, shard: Option<usize>) -> Vec<Arc<Channel>> {
    node.sink()
        .map_or_else(Vec::new, Sink::channels)
        .into_iter()
        .filter(|channel| channel.occupied())
        .filter(|channel| shard.map_or(true, |s| node.shard_of(&channel.name) == s))
        .collect()
}

/// One standalone shard's subscription connection: its occupied channels, and the
/// notices when it holds the cluster's own keys. After each reconnection every
/// occupied channel of the shard is subscribed to again and catches up.
async fn shard_listener(
    node: Arc<Node>,
    shard: usize,
    cancel: CancellationToken,
    mut watch: mpsc::UnboundedReceiver<Arc<str>>,
) {
    use futures_util::StreamExt;

    let ear = &node.ears[shard];
    let client = match &node.backing {
        Backing::Shards(shards) => shards[shard].client.clone(),
        Backing::Cluster { .. } => return,
    };
    let own: Vec<String> = if shard == node.control {
        vec![node.notices().to_owned(), node.inbox().to_owned()]
    } else {
        Vec::new()
    };
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        // What changed before now is in the occupancy read below.
        while watch.try_recv().is_ok() {}
        let occupied = occupied_on(&node, Some(shard));
        let names: Vec<Arc<str>> = occupied.iter().map(|c| c.name.clone()).collect();
        let subscribed = tokio::select! {
            () = cancel.cancelled() => return,
            subscribed = subscribe(&node, &client, &own, &names) => subscribed,
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
            info!(shard, "subscribed to Redis again");
            node.resync.store(true, Ordering::Relaxed);
            node.resync_if_needed();
        }
        ear.set_heard(names.into_iter().collect());
        node.catch_up(occupied, false).await;
        ear.listening.store(true, Ordering::Relaxed);
        first = false;
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
                    match follow(&node, ear, Subscriber::Shard(&mut pubsub), changed).await {
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
            node.heard(message.get_channel_name(), message.get_payload_bytes())
                .await;
        }
        ear.listening.store(false, Ordering::Relaxed);
        node.set_up(false);
        ear.set_heard(HashSet::new());
    }
}

/// A Redis Cluster's subscription connection: sharded subscriptions (`SSUBSCRIBE`),
/// each sent to the shard that owns its channel. The connection follows MOVED, a
/// resharding and a failover by itself and subscribes again where a channel went; each
/// time it confirms a subscription again, the channel catches up.
async fn cluster(
    node: Arc<Node>,
    cancel: CancellationToken,
    mut watch: mpsc::UnboundedReceiver<Arc<str>>,
    mut pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
) {
    let ear = &node.ears[0];
    let Backing::Cluster { subscriber, .. } = &node.backing else {
        return;
    };
    let mut backoff = Duration::from_millis(100);
    let mut conn = loop {
        let connected = async {
            let mut conn = subscriber.get_async_connection().await?;
            conn.ssubscribe(node.notices()).await?;
            conn.ssubscribe(node.inbox()).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let connected = tokio::select! {
            () = cancel.cancelled() => return,
            connected = tokio::time::timeout(node.patience, connected) => connected,
        };
        match connected {
            Ok(Ok(conn)) => break conn,
            Ok(Err(cause)) => warn!(%cause, "cannot subscribe to the Redis Cluster; retrying"),
            Err(_) => warn!("subscribing to the Redis Cluster timed out; retrying"),
        }
        node.set_up(false);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    };
    // Channels occupied before the connection was made.
    let occupied: Vec<Arc<str>> = occupied_on(&node, None)
        .iter()
        .map(|c| c.name.clone())
        .collect();
    if let Err(cause) = follow(&node, ear, Subscriber::Cluster(&mut conn), occupied).await {
        warn!(%cause, "subscribing to the channels with members here failed");
    }
    ear.listening.store(true, Ordering::Relaxed);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = watch.recv() => {
                let Some(changed) = changed else { return };
                let mut changed = vec![changed];
                while let Ok(more) = watch.try_recv() {
                    changed.push(more);
                }
                let again = changed.clone();
                if let Err(cause) = follow(&node, ear, Subscriber::Cluster(&mut conn), changed).await {
                    // A shard failing over: the same changes are tried again shortly.
                    warn!(%cause, "changing Redis Cluster subscriptions failed; trying again");
                    let node = node.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        for name in again {
                            node.ears[0].watch(&name);
                        }
                    });
                }
            }
            push = pushes.recv() => {
                let Some(push) = push else { return };
                if node.stopped() {
                    return;
                }
                node.pushed(push).await;
            }
        }
    }
}

/// Where subscriptions are changed.
enum Subscriber<'a> {
    Shard(&'a mut redis::aio::PubSubSink),
    Cluster(&'a mut redis::cluster_async::ClusterConnection),
}

/// Brings the subscriptions of `changed` channels in line with their occupancy now:
/// subscribes to those with members here (each then catches up, in a task of its own),
/// leaves those without.
async fn follow(
    node: &Arc<Node>,
    ear: &Ear,
    subscriber: Subscriber<'_>,
    changed: Vec<Arc<str>>,
) -> Result<(), StoreError> {
    let sink = node.sink();
    let (mut join, mut leave) = (Vec::new(), Vec::new());
    {
        let heard = ear.heard.lock().expect("heard lock");
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
    let patience = node.patience;
    tracing::debug!(
        join = join.len(),
        leave = leave.len(),
        "following occupancy"
    );
    match subscriber {
        Subscriber::Shard(pubsub) => {
            if !leave.is_empty() {
                let keys: Vec<String> = leave.iter().map(|name| node.key("room", name)).collect();
                confirmed(patience, pubsub.unsubscribe(keys)).await?;
            }
            if !join.is_empty() {
                let keys: Vec<String> = join.iter().map(|c| node.key("room", &c.name)).collect();
                confirmed(patience, pubsub.subscribe(keys)).await?;
            }
        }
        Subscriber::Cluster(conn) => {
            // One channel to a command: each goes to the shard of its own slot.
            for name in &leave {
                confirmed(patience, conn.sunsubscribe(node.key("room", name))).await?;
            }
            for channel in &join {
                confirmed(patience, conn.ssubscribe(node.key("room", &channel.name))).await?;
            }
        }
    }
    ear.change_heard(|heard| {
        for name in &leave {
            heard.remove(name);
        }
        heard.extend(join.iter().map(|c| c.name.clone()));
    });
    for channel in join {
        let node = node.clone();
        // Its members all joined just now (it had none): what was published while the
        // subscription took effect is theirs if the history keeps it.
        node.fresh
            .lock()
            .expect("fresh lock")
            .insert(channel.name.clone());
        tokio::spawn(async move {
            let name = channel.name.clone();
            node.catch_up(vec![channel], true).await;
            node.fresh.lock().expect("fresh lock").remove(&name);
        });
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

/// A new subscription connection to one shard: the node's own Pub/Sub channels
/// (`own`: the notices and its inbox, on the shard of the cluster's keys) and
/// `channels`.
async fn subscribe(
    node: &Node,
    client: &redis::Client,
    own: &[String],
    channels: &[Arc<str>],
) -> Result<redis::aio::PubSub, StoreError> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        if !own.is_empty() {
            pubsub.subscribe(own).await?;
        }
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

/// How long publications wait behind a gap that cannot be read (a shard failing over
/// takes a few seconds) before members are cut off to resume instead.
const HOLD_LIMIT: Duration = Duration::from_secs(15);

/// Channels subscribed to in one command.
const SUBSCRIBE_CHUNK: usize = 2000;

/// Times a channel is read again when catching up after a new subscription fails.
const CATCH_UP_TRIES: u32 = 10;

impl Node {
    /// What arrived on Pub/Sub channel `name`.
    async fn heard(self: &Arc<Self>, name: &str, payload: &[u8]) {
        if name == self.notices() {
            if let Some(sink) = self.sink.get() {
                sink.notice(Bytes::copy_from_slice(payload));
            }
            return;
        }
        if name == self.inbox() {
            if let Some(sink) = self.sink.get() {
                sink.post(Bytes::copy_from_slice(payload));
            }
            return;
        }
        if let Some((channel, incoming)) = self.parse(name, payload) {
            self.on_incoming(&channel, incoming).await;
        }
    }

    /// What a Redis Cluster's subscription connection pushed.
    async fn pushed(self: &Arc<Self>, push: redis::PushInfo) {
        use redis::PushKind;
        let text = |value: Option<&redis::Value>| match value {
            Some(redis::Value::BulkString(bytes)) => Some(bytes.clone()),
            Some(redis::Value::SimpleString(text)) => Some(text.clone().into_bytes()),
            _ => None,
        };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                let (Some(name), Some(payload)) = (text(push.data.first()), text(push.data.get(1)))
                else {
                    return;
                };
                if let Ok(name) = std::str::from_utf8(&name) {
                    self.heard(name, &payload).await;
                }
            }
            PushKind::SSubscribe => {
                // Subscribed (again, after a failover or a moved slot): what was
                // published meanwhile comes from the stored history.
                let Some(name) = text(push.data.first()) else {
                    return;
                };
                let Ok(name) = std::str::from_utf8(&name) else {
                    return;
                };
                let Some((channel, "room")) = topology::channel_of(&self.prefix, name) else {
                    return;
                };
                if let Some(channel) = self.sink().and_then(|sink| sink.channel(&channel)) {
                    let node = self.clone();
                    tokio::spawn(async move { node.catch_up(vec![channel], false).await });
                }
            }
            PushKind::Disconnection => {
                warn!("a Redis Cluster subscription connection dropped; it subscribes again");
            }
            _ => {}
        }
    }

    /// Delivers, from the stored history, what `channel` has after its last delivery up
    /// to `upto`. What cannot be read (trimmed meanwhile, or Redis did not answer) cuts
    /// the channel's members off to resume, rather than leaving them a silent hole.
    /// A read that fails is said, not acted on (the caller may hold what comes after the
    /// gap and try again). `fresh`: a hole the history no longer keeps is passed over
    /// rather than cutting the members off (see [`Node::catch_up`]).
    async fn try_fill_gap(
        &self,
        channel: &Arc<Channel>,
        upto: u64,
        fresh: bool,
    ) -> Result<(), StoreError> {
        loop {
            let after = channel.broadcast_id();
            if after >= upto {
                return Ok(());
            }
            let window = Window {
                after,
                upto,
                limit: self.replay_page,
                newest: false,
                not_before: None,
            };
            let page = self.read(&channel.name, window).await?;
            let ids: Vec<u64> = page.iter().map(|p| p.id).collect();
            if ids.is_empty() || !crate::recovery::continues(after, &ids) {
                // Not kept any more: a hole nothing can fill.
                if fresh {
                    channel.pass_over(upto);
                } else {
                    channel.skip_to(upto);
                }
                return Ok(());
            }
            for publication in page {
                channel.broadcast(&Arc::new(Delivery::new(publication)));
            }
        }
    }

    /// `channels` take where their stream stands now: a new epoch
    /// resets them, else they receive what was stored after their last delivery. Just
    /// after Redis came back, the command connection may still be reconnecting: a
    /// channel that could not be read is tried again, a few times. `fresh`: channels
    /// whose members all joined as their subscription was made, which are not cut off
    /// for what the history no longer keeps from that moment.
    async fn catch_up(&self, mut channels: Vec<Arc<Channel>>, fresh: bool) {
        for attempt in 1..=CATCH_UP_TRIES {
            let mut failed = Vec::new();
            for channel in channels {
                let seen = channel.broadcast_id();
                match self.open(&channel.name).await {
                    Ok(position) => self.resume(&channel, position, seen, fresh).await,
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
    async fn resume(&self, channel: &Arc<Channel>, mut position: Position, seen: u64, fresh: bool) {
        if *position.epoch == *channel.epoch() && position.last_id < seen && self.waits() {
            // The confirmed watermark may lag what was confirmed (its own write is not
            // waited for): the ids went back only if the counter did.
            let counter: Option<u64> = self
                .conn(&channel.name)
                .get(self.key("seq", &channel.name))
                .await
                .unwrap_or(None);
            if counter.is_some_and(|counter| counter >= seen) {
                position.last_id = seen;
            }
        }
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
            if let Err(cause) = self.try_fill_gap(channel, position.last_id, fresh).await {
                warn!(%cause, channel = %channel.name, "reading missed messages failed");
                channel.skip_to(position.last_id);
            }
        }
    }

    /// Reads a payload from `channel`; `None` for channels or payloads of none.
    fn parse(&self, pubsub: &str, payload: &[u8]) -> Option<(String, Incoming)> {
        let (channel, kind) = topology::channel_of(&self.prefix, pubsub)?;
        if kind != "room" {
            return None;
        }
        let channel = channel.as_ref();
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

    /// Delivers `publication` after whatever is missing before it (read from the stored
    /// history); an error when that cannot be read now.
    async fn deliver_in_order(
        &self,
        channel: &Arc<Channel>,
        publication: &Publication,
        epoch: String,
    ) -> Result<(), StoreError> {
        let id = publication.id;
        if *channel.epoch() != *epoch {
            channel.reposition(&Position {
                last_id: id - 1,
                epoch,
            });
        }
        // Published in id order; a gap means the subscription dropped some, or a
        // publication that waits for its replicas was overtaken.
        let fresh = self
            .fresh
            .lock()
            .expect("fresh lock")
            .contains(&channel.name);
        self.try_fill_gap(channel, id - 1, fresh).await?;
        channel.broadcast(&Arc::new(Delivery::new(publication.clone())));
        Ok(())
    }

    /// Delivers what is held for `channel`, in order, once the gap before it can be
    /// read; after [`HOLD_LIMIT`] of trying, members are cut off to resume instead, and
    /// what was held is delivered after the hole.
    async fn release_held(self: Arc<Self>, channel: Arc<Channel>) {
        let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
        let mut pause = Duration::from_millis(100);
        loop {
            let next = {
                let mut held = self.held.lock().expect("held lock");
                let Some(queue) = held.get_mut(&channel.name) else {
                    return;
                };
                match queue.front().cloned() {
                    Some(next) => next,
                    None => {
                        held.remove(&channel.name);
                        return;
                    }
                }
            };
            let (publication, epoch) = next;
            match self.deliver_in_order(&channel, &publication, epoch).await {
                Ok(()) => {
                    pause = Duration::from_millis(100);
                    if let Some(queue) = self.held.lock().expect("held lock").get_mut(&channel.name)
                    {
                        queue.pop_front();
                    }
                }
                Err(cause) if tokio::time::Instant::now() >= deadline => {
                    warn!(%cause, channel = %channel.name, "missed messages stayed unreadable; members resume");
                    channel.skip_to(publication.id - 1);
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn on_incoming(self: &Arc<Self>, channel: &str, incoming: Incoming) {
        // No one here uses the channel: nothing to deliver.
        let Some(channel) = self.sink().and_then(|sink| sink.channel(channel)) else {
            return;
        };
        match incoming {
            Incoming::Publication { publication, epoch } => {
                {
                    let mut held = self.held.lock().expect("held lock");
                    if let Some(queue) = held.get_mut(&channel.name) {
                        // Behind a publication held for a gap: in order, after it.
                        queue.push_back((publication, epoch));
                        return;
                    }
                }
                if let Err(cause) = self
                    .deliver_in_order(&channel, &publication, epoch.clone())
                    .await
                {
                    // The gap before it cannot be read now (its shard may be failing
                    // over): it waits, and whatever follows it, until the gap can be
                    // read, for a while.
                    warn!(%cause, channel = %channel.name, id = publication.id, "a publication waits for missed ones to be readable");
                    self.held
                        .lock()
                        .expect("held lock")
                        .insert(channel.name.clone(), VecDeque::from([(publication, epoch)]));
                    let node = self.clone();
                    tokio::spawn(async move { node.release_held(channel).await });
                }
            }
            Incoming::Presence { joined, user, info } => {
                channel.remote_presence(joined, &user, info)
            }
            Incoming::Typing {
                node,
                user,
                is_typing,
            } if *node != *self.id() => channel.remote_typing(&user, is_typing),
            Incoming::Binary { node, data } if *node != *self.id() => channel.remote_binary(data),
            Incoming::Typing { .. } | Incoming::Binary { .. } => {}
        }
    }
}
