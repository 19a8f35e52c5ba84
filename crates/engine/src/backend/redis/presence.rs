//! Presence, heartbeats, reaping and hooks: each change one script on the channel's
//! shard, with the cluster's own lists (a node's channels, the channels with users, the
//! channels with hooks) kept beside it on the control keys.
//!
//! Those lists cannot change in the channel's script (their keys are in another slot),
//! so each is written so that a crash between the two calls loses nothing: a node adds
//! a channel to its own list before its first presence script there (a node reaped
//! later is then reaped in every channel it had), and the lists of channels with users
//! and with hooks are added to after the script that made them non-empty and removed
//! from only after a script found them empty, checked once more after the removal.

use super::*;

/// What a presence script said.
pub(super) struct Presence {
    /// The channel got its first user.
    pub(super) filled: bool,
    /// The channel lost its last user.
    pub(super) emptied: bool,
    /// This node has no entries left in the channel.
    pub(super) node_empty: bool,
    /// Hooks were recorded.
    pub(super) recorded: bool,
    /// The channel got its first node with members.
    pub(super) taken: bool,
    /// The channel lost its last node with members.
    pub(super) vacated: bool,
    /// For a join: the channel's users, each followed by its info (or "").
    pub(super) present: Vec<String>,
}

impl Node {
    /// Runs the presence script on `channel` for node `id` (this node, or one being
    /// reaped), then keeps the control lists in step with what it said.
    pub(super) async fn presence_call(
        &self,
        id: &str,
        channel: &str,
        mode: &str,
        args: &[&str],
    ) -> Result<Presence, StoreError> {
        let me = *id == *self.id();
        if me && mode != "leave" && mode != "reap" {
            self.enter(channel).await?;
        }
        let mut call = self.presence.prepare_invoke();
        call.key(self.key("presence", channel))
            .key(self.key("pinfo", channel))
            .key(self.key(&format!("node:{id}"), channel))
            .key(self.key("occupancy", channel))
            .key(self.key("hooks", channel))
            .key(self.key("hooks:pending", channel))
            .key(self.key("hooks:seq", channel))
            .arg(mode)
            .arg(if self.hooks.is_some() { "1" } else { "0" })
            .arg(self.publish_command())
            .arg(self.key("room", channel))
            .arg(channel);
        for arg in args {
            call.arg(*arg);
        }
        let mut answer: Vec<String> =
            self.noted(call.invoke_async(&mut self.conn(channel)).await)?;
        if answer.len() < 6 {
            return Err(StoreError::Unavailable(
                "an unexpected answer from the presence script",
            ));
        }
        let present = answer.split_off(6);
        let presence = Presence {
            filled: answer[0] == "1",
            emptied: answer[1] == "1",
            node_empty: answer[2] == "1",
            recorded: answer[3] == "1",
            taken: answer[4] == "1",
            vacated: answer[5] == "1",
            present,
        };
        self.after_presence(id, channel, &presence).await?;
        Ok(presence)
    }

    /// Lists `channel` among this node's before its first presence there.
    async fn enter(&self, channel: &str) -> Result<(), StoreError> {
        if self.entered.lock().expect("entered lock").contains(channel) {
            return Ok(());
        }
        let key = self.control_key(&format!("node:{}", self.id()));
        let _: () = self.noted(self.control_conn().sadd(key, channel).await)?;
        self.entered
            .lock()
            .expect("entered lock")
            .insert(Arc::from(channel));
        Ok(())
    }

    /// The control lists after a presence script on `channel`.
    async fn after_presence(
        &self,
        id: &str,
        channel: &str,
        presence: &Presence,
    ) -> Result<(), StoreError> {
        let mut control = self.control_conn();
        // The channels with users, and those with members on some node.
        for (list, added, removed) in [
            ("rooms", presence.filled, presence.emptied),
            ("occupied", presence.taken, presence.vacated),
        ] {
            let list = self.control_key(list);
            if added {
                let _: () = self.noted(control.sadd(&list, channel).await)?;
            } else if removed {
                let _: () = self.noted(control.srem(&list, channel).await)?;
                // A change elsewhere may have added it just before the removal.
                self.list_if_occupied(channel).await?;
            }
        }
        if presence.recorded {
            let _: () = self.noted(control.sadd(self.control_key("hooks"), channel).await)?;
        }
        if presence.node_empty {
            let _: () = self.noted(
                control
                    .srem(self.control_key(&format!("node:{id}")), channel)
                    .await,
            )?;
            if *id == *self.id() {
                self.entered.lock().expect("entered lock").remove(channel);
            }
        }
        Ok(())
    }

    /// The members of the cluster's own set `kind`.
    async fn control_list(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        self.noted(self.control_conn().smembers(self.control_key(kind)).await)
    }

    /// Lists `channel` among the channels with users if it has any, and among the
    /// occupied ones if some node has members there.
    async fn list_if_occupied(&self, channel: &str) -> Result<(), StoreError> {
        let mut conn = self.conn(channel);
        let users: usize = self.noted(conn.hlen(self.key("presence", channel)).await)?;
        let holders: Option<i64> = self.noted(conn.get(self.key("occupancy", channel)).await)?;
        let mut control = self.control_conn();
        if users > 0 {
            let _: () = self.noted(control.sadd(self.control_key("rooms"), channel).await)?;
        }
        if holders.unwrap_or(0) > 0 {
            let _: () = self.noted(control.sadd(self.control_key("occupied"), channel).await)?;
        }
        // Hooks it recorded before it could index them.
        let hooks = self.hook_count(channel).await?;
        if hooks.get(1).map(String::as_str) == Some("1") {
            let _: () = self.noted(control.sadd(self.control_key("hooks"), channel).await)?;
        }
        Ok(())
    }

    /// Channels with members on some node, sorted (each checked against its own count:
    /// the list may keep a channel whose last node stopped between its script and the
    /// list's update).
    pub(super) async fn occupied(&self) -> Result<Vec<String>, StoreError> {
        let names: Vec<String> = self.control_list("occupied").await?;
        let mut occupied = Vec::with_capacity(names.len());
        for name in names {
            let holders: Option<i64> =
                self.noted(self.conn(&name).get(self.key("occupancy", &name)).await)?;
            if holders.unwrap_or(0) > 0 {
                occupied.push(name);
            }
        }
        occupied.sort();
        Ok(occupied)
    }

    /// Makes this node's presence in Redis exactly `entries` (`(channel, user)` pairs,
    /// the empty user for the node's occupancy of a channel), channel by channel: the
    /// channels given, and those Redis lists for this node that are not.
    pub(super) async fn sync(&self, entries: &[(String, String)]) -> Result<(), StoreError> {
        let id = self.id();
        let mut wanted: HashMap<&str, Vec<&str>> = HashMap::new();
        for (channel, user) in entries {
            wanted.entry(channel).or_default().push(user);
        }
        let listed: Vec<String> = self.control_list(&format!("node:{id}")).await?;
        for channel in &listed {
            wanted.entry(channel).or_default();
        }
        for (channel, users) in wanted {
            self.presence_call(&id, channel, "sync", &users).await?;
        }
        Ok(())
    }

    /// The users in `channel`, on any node, sorted.
    pub(super) async fn members(&self, channel: &str) -> Result<Vec<String>, StoreError> {
        let mut users: Vec<String> = self.noted(
            self.conn(channel)
                .hkeys(self.key("presence", channel))
                .await,
        )?;
        users.sort();
        Ok(users)
    }

    /// Channels with users in them, on any node, with how many users each has.
    pub(super) async fn channels(&self) -> Result<Vec<(String, usize)>, StoreError> {
        let names: Vec<String> = self.control_list("rooms").await?;
        let mut channels = Vec::with_capacity(names.len());
        for name in names {
            let users: usize =
                self.noted(self.conn(&name).hlen(self.key("presence", &name)).await)?;
            if users > 0 {
                channels.push((name, users));
            }
        }
        channels.sort();
        Ok(channels)
    }

    /// Publishes `payload` on `channel`'s Pub/Sub channel.
    pub(super) async fn publish(&self, channel: &str, payload: Vec<u8>) -> Result<(), StoreError> {
        let _receivers: u64 = self.noted(
            redis::cmd(self.publish_command())
                .arg(self.key("room", channel))
                .arg(payload)
                .query_async(&mut self.conn(channel))
                .await,
        )?;
        Ok(())
    }

    /// Renews this node's `alive` key. When it had expired (not at the first beat), this
    /// node was taken for stopped and may be reaped any moment: it takes a new name and
    /// tells its presence again under it.
    pub(super) async fn heartbeat(&self, first: bool) -> Result<(), StoreError> {
        let expiry = u64::try_from(self.expiry.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let id = self.id();
        // Plain commands, not a pipeline: a cluster connection follows MOVED for them.
        let mut control = self.control_conn();
        let was: Option<String> = self.noted(
            redis::cmd("SET")
                .arg(self.control_key(&format!("alive:{id}")))
                .arg(1)
                .arg("PX")
                .arg(expiry)
                .arg("GET")
                .query_async(&mut control)
                .await,
        )?;
        let _: () = self.noted(control.sadd(self.control_key("nodes"), &*id).await)?;
        if was.is_none() && !first {
            let new = new_id();
            warn!(old = %id, new = %new, "this node's heartbeat had expired (taken for stopped): it goes on under a new name");
            *self.id.lock().expect("id lock") = new;
            self.entered.lock().expect("entered lock").clear();
            self.resync.store(true, Ordering::Relaxed);
            self.resync_if_needed();
            // The new name's heartbeat, at once.
            return Box::pin(self.heartbeat(true)).await;
        }
        Ok(())
    }

    /// Removes the presence of nodes whose `alive` key expired, channel by channel;
    /// returns how many.
    pub(super) async fn reap(&self) -> Result<usize, StoreError> {
        let me = self.id();
        let nodes: Vec<String> = self.control_list("nodes").await?;
        let mut reaped = 0;
        for node in nodes.iter().filter(|n| ***n != *me) {
            let alive: bool = self.noted(
                self.control_conn()
                    .exists(self.control_key(&format!("alive:{node}")))
                    .await,
            )?;
            if alive {
                continue;
            }
            let list = self.control_key(&format!("node:{node}"));
            let channels: Vec<String> = self.noted(self.control_conn().smembers(&list).await)?;
            for channel in &channels {
                self.presence_call(node, channel, "reap", &[]).await?;
                // The stopped node may have filled the channel and stopped before
                // listing it.
                self.list_if_occupied(channel).await?;
                let _: () = self.noted(self.control_conn().srem(&list, channel).await)?;
            }
            // Channels it listed meanwhile (it may still run, silent) are reaped at the
            // next pass; the node is forgotten once none is left.
            let mut control = self.control_conn();
            let left: usize = self.noted(control.scard(&list).await)?;
            if left == 0 {
                let _: () = self.noted(control.srem(self.control_key("nodes"), node).await)?;
            }
            reaped += 1;
        }
        Ok(reaped)
    }

    /// Every channel and user with a connection on this node.
    pub(super) fn local_presence(&self) -> Vec<(String, String)> {
        let channels = self.sink().map_or_else(Vec::new, Sink::channels);
        channels
            .iter()
            .flat_map(|channel| {
                // Its occupancy here (the empty user).
                let occupied = channel.occupied().then(String::new);
                channel
                    .users()
                    .into_iter()
                    .chain(occupied)
                    .map(|user| (channel.name.to_string(), user))
            })
            .collect()
    }

    /// Runs the hooks script on `channel` with `args` (the mode first).
    pub(super) async fn hook_call(
        &self,
        channel: &str,
        args: &[&str],
    ) -> Result<Vec<String>, StoreError> {
        let mut call = self.hook_script.prepare_invoke();
        call.key(self.key("hooks", channel))
            .key(self.key("hooks:pending", channel))
            .key(self.key("hooks:leased", channel))
            .key(self.key("hooks:seq", channel));
        for arg in args {
            call.arg(*arg);
        }
        let answer: Vec<String> = self.noted(call.invoke_async(&mut self.conn(channel)).await)?;
        let mut control = self.control_conn();
        let index = self.control_key("hooks");
        if answer.get(1).map(String::as_str) == Some("1") {
            if args.first() == Some(&"record") {
                let _: () = self.noted(control.sadd(&index, channel).await)?;
            }
        } else {
            let _: () = self.noted(control.srem(&index, channel).await)?;
            // A change elsewhere may have recorded one just before the removal.
            let again: Vec<String> = self.hook_count(channel).await?;
            if again.get(1).map(String::as_str) == Some("1") {
                let _: () = self.noted(control.sadd(&index, channel).await)?;
            }
        }
        Ok(answer)
    }

    async fn hook_count(&self, channel: &str) -> Result<Vec<String>, StoreError> {
        let mut call = self.hook_script.prepare_invoke();
        call.key(self.key("hooks", channel))
            .key(self.key("hooks:pending", channel))
            .key(self.key("hooks:leased", channel))
            .key(self.key("hooks:seq", channel))
            .arg("count");
        self.noted(call.invoke_async(&mut self.conn(channel)).await)
    }

    /// Takes up to `max` hooks due now, channel by channel (each channel's leaves
    /// promoted on Redis's clock after its own delay).
    pub(super) async fn take_hooks(
        &self,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<crate::hooks::Taken>, StoreError> {
        let Some(config) = &self.hooks else {
            return Ok(Vec::new());
        };
        let mut channels: Vec<String> = self.control_list("hooks").await?;
        channels.sort();
        let lease = lease.as_millis().to_string();
        let mut taken = Vec::new();
        for channel in channels {
            if taken.len() >= max {
                break;
            }
            let delay = crate::hooks::delay_ms(config, &channel).to_string();
            let room = (max - taken.len()).max(1).to_string();
            let answer = self
                .hook_call(&channel, &["take", &delay, &lease, &room])
                .await?;
            taken.extend(answer.into_iter().skip(2).filter_map(|ticket| {
                let (_, json) = ticket.split_once('\n')?;
                let hook = serde_json::from_str(json).ok()?;
                Some(crate::hooks::Taken { hook, ticket })
            }));
        }
        Ok(taken)
    }

    /// Hooks waiting in every channel, delayed ones included.
    pub(super) async fn hooks_waiting(&self) -> Result<usize, StoreError> {
        let channels: Vec<String> = self.control_list("hooks").await?;
        let mut waiting = 0;
        for channel in channels {
            let answer = self.hook_count(&channel).await?;
            waiting += answer
                .first()
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0);
        }
        Ok(waiting)
    }
}

/// Does the presence work in order (see [`Op`]). A presence change that fails marks the
/// node for a resync, which is queued once Redis answers again.
pub(super) async fn worker(node: Arc<Node>, mut ops: mpsc::UnboundedReceiver<Op>) {
    while let Some(op) = ops.recv().await {
        let id = node.id();
        let presence = match op {
            Op::Join {
                channel,
                user,
                info,
                reply,
            } => {
                // Its join, published in the channel, is for this node's members too.
                node.ear(&channel).hearing(&channel, node.patience).await;
                let info = info.unwrap_or_default();
                let result = node
                    .presence_call(&id, &channel, "join", &[&user, &info])
                    .await
                    .map(|p| p.present);
                let failed = result.as_ref().err().map(ToString::to_string);
                // The subscriber may have gone; presence was told regardless.
                let _ = reply.send(result);
                failed.map_or(Ok(()), Err)
            }
            Op::Leave { channel, user } => node
                .presence_call(&id, &channel, "leave", &[&user])
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Op::Occupy { channel, occupied } => {
                let mode = if occupied { "join" } else { "leave" };
                node.presence_call(&id, &channel, mode, &["", ""])
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            Op::Typing {
                channel,
                user,
                is_typing,
            } => {
                let payload = format!("T{id}\n{user}\n{}", u8::from(is_typing));
                if let Err(cause) = node.publish(&channel, payload.into_bytes()).await {
                    warn!(%cause, "typing did not reach the other nodes");
                }
                Ok(())
            }
            Op::Binary { channel, data } => {
                let mut payload = format!("B{id}\n").into_bytes();
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
                // First whether this node was taken for stopped meanwhile (then it
                // tells its presence under a new name, never under one being reaped).
                if let Err(cause) = node.heartbeat(false).await {
                    warn!(%cause, "a presence resync waits for Redis");
                    node.resync.store(true, Ordering::Relaxed);
                    continue;
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
                if let Err(cause) = node.depart().await {
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

impl Node {
    /// Leaves the cluster: no presence, no heartbeat, not among the nodes.
    async fn depart(&self) -> Result<(), StoreError> {
        self.sync(&[]).await?;
        let id = self.id();
        let mut control = self.control_conn();
        let _: () = self.noted(control.del(self.control_key(&format!("alive:{id}"))).await)?;
        let _: () = self.noted(control.del(self.control_key(&format!("node:{id}"))).await)?;
        self.noted(control.srem(self.control_key("nodes"), &*id).await)
    }
}

/// Renews this node's heartbeat and reaps nodes whose heartbeat expired.
pub(super) async fn heartbeat(node: Arc<Node>, cancel: CancellationToken, interval: Duration) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if node.stopped() {
            return;
        }
        if node.heartbeat(false).await.is_ok() {
            node.resync_if_needed();
            match node.reap().await {
                Ok(0) => {}
                Ok(nodes) => info!(nodes, "removed the presence of nodes that stopped"),
                Err(cause) => warn!(%cause, "checking for stopped nodes failed"),
            }
        }
    }
}

/// Asks Redis for a `PING` every `interval` on the command connection (of each shard),
/// so a link that went silent is noticed within the timeout even when nothing else is
/// sent, and a link that answers again has the node's presence told again at once.
pub(super) async fn watchdog(node: Arc<Node>, cancel: CancellationToken, interval: Duration) {
    let shards = match &node.backing {
        Backing::Shards(shards) => shards.len(),
        Backing::Cluster { .. } => 1,
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if node.stopped() {
            return;
        }
        let mut all = true;
        for shard in 0..shards {
            let pong: redis::RedisResult<String> = redis::cmd("PING")
                .query_async(&mut node.conn_at(shard))
                .await;
            all &= node.noted(pong).is_ok();
        }
        if all {
            node.resync_if_needed();
        }
    }
}
