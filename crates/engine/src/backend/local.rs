//! The single node: ids and nonces kept per channel here, history in a
//! [`Store`] written by one thread.
//!
//! The writer thread takes what is queued (up to `max_batch`), stores it in one commit,
//! then hands each publication to its channel in id order, so nothing is delivered that
//! is not stored and many publications share one commit. A failed commit is retried
//! (backing off up to 2 s) until it succeeds, so ids stay contiguous and a taken
//! publication is never dropped; publishers wait meanwhile. Only at shutdown does it
//! give up, saying what is lost.
//!
//! After each commit, and once a minute for every channel in use, the writer trims the
//! channels whose options keep less than everything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::{ready, BoxFuture};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{sender_of, top_up, Backend, Job, Joined, Outcome, Sink};
use crate::engine::{Channel, Clock, Delivery, EngineConfig, Outbound};
use crate::recovery::kept;
use crate::store::{Position, Publication, Store, StoreError, Trim, Window};
use crate::EngineError;

/// How often every channel in use is trimmed, besides after its publications.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Nonces remembered per channel beyond which those of stored publications are
/// forgotten here (the store still finds them).
const NONCES_IN_MEMORY: usize = 100_000;

/// Id assignment and de-duplication, held across the hand-off to the writer so ids reach
/// it in order.
struct Sequence {
    last_id: u64,
    /// Whether a nonce missing from `nonces` may still be in the store (the channel had
    /// history when loaded, or stored nonces were forgotten here).
    store_may_know: bool,
    /// `(sender or "", nonce)` to the publication's id and when it was taken.
    nonces: HashMap<(String, String), (u64, SystemTime)>,
}

impl Sequence {
    fn at(last_id: u64, store_may_know: bool) -> Arc<tokio::sync::Mutex<Self>> {
        Arc::new(tokio::sync::Mutex::new(Self {
            last_id,
            store_may_know,
            nonces: HashMap::new(),
        }))
    }
}

enum Work {
    Write(Write),
    /// Trim every channel in use.
    Sweep,
}

struct Write {
    channel: Arc<Channel>,
    delivery: Arc<Delivery>,
    done: oneshot::Sender<Result<Outcome, String>>,
}

/// What the writer thread needs besides its queue.
struct Writer {
    store: Arc<dyn Store>,
    max_batch: usize,
    stopping: Arc<AtomicBool>,
    sink: Arc<OnceLock<Sink>>,
    clock: Clock,
    nonce_ttl: Duration,
}

pub(crate) struct LocalBackend {
    store: Arc<dyn Store>,
    sequences: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<Sequence>>>>,
    work: Mutex<Option<mpsc::Sender<Work>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set by shutdown: a writer stuck on a failing store stops retrying.
    stopping: Arc<AtomicBool>,
    sink: Arc<OnceLock<Sink>>,
    clock: Clock,
    nonce_ttl: Duration,
    hooks: Option<crate::hooks::LocalHooks>,
    address: Arc<str>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("store", &self.store)
            .finish()
    }
}

impl LocalBackend {
    /// Starts the writer thread.
    pub(crate) fn new(store: Arc<dyn Store>, config: &EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.write_queue.max(1));
        let stopping = Arc::new(AtomicBool::new(false));
        let sink = Arc::new(OnceLock::new());
        let writer = Writer {
            store: store.clone(),
            max_batch: config.max_batch.max(1),
            stopping: stopping.clone(),
            sink: sink.clone(),
            clock: config.clock.clone(),
            nonce_ttl: config.nonce_ttl,
        };
        let thread = std::thread::Builder::new()
            .name("switchboard-writer".into())
            .spawn(move || writer.run(rx))
            .expect("spawning the history writer");
        Self {
            store,
            sequences: Mutex::new(HashMap::new()),
            work: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stopping,
            sink,
            clock: config.clock.clone(),
            nonce_ttl: config.nonce_ttl,
            hooks: config.hooks.clone().map(crate::hooks::LocalHooks::new),
            address: super::random_address(),
        }
    }

    fn changed(&self, kind: crate::HookKind, channel: &str, user: &str) {
        if let Some(hooks) = &self.hooks {
            hooks.changed(kind, channel, user);
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(store.as_ref()))
            .await
            .expect("history read panicked")
    }

    fn nonces_from(&self) -> String {
        self.clock.timestamp_before(self.nonce_ttl)
    }

    fn sequence(&self, channel: &Channel) -> Arc<tokio::sync::Mutex<Sequence>> {
        let mut sequences = self.sequences.lock().expect("sequences lock");
        sequences
            .entry(channel.name.clone())
            .or_insert_with(|| {
                // Opened before any publication; should that ever not be so, the
                // channel's position is where numbering goes on.
                Sequence::at(channel.broadcast_id(), true)
            })
            .clone()
    }

    async fn take(&self, job: Job) -> Result<(), EngineError> {
        let Job {
            channel,
            mut publication,
            member,
            done,
        } = job;
        let sequence = self.sequence(&channel);
        let mut sequence = sequence.lock().await;
        let key = publication
            .nonce
            .as_ref()
            .map(|nonce| (publication.from.clone().unwrap_or_default(), nonce.clone()));
        if let Some(key) = &key {
            let now = self.clock.now();
            let remembered = sequence
                .nonces
                .get(key)
                .filter(|(_, at)| now.duration_since(*at).unwrap_or_default() < self.nonce_ttl)
                .map(|(id, _)| *id);
            let stored = match remembered {
                Some(id) => Some(id),
                // Only history from before this process, or forgotten here, needs the
                // store: a channel's own recent nonces are all in the map.
                None if !sequence.store_may_know => None,
                None => {
                    let (name, from, nonce) = (
                        channel.name.to_string(),
                        publication.from.clone(),
                        key.1.clone(),
                    );
                    let not_before = self.nonces_from();
                    self.blocking(move |store| {
                        store.find_nonce(&name, from.as_deref(), &nonce, &not_before)
                    })
                    .await?
                    .map(|p| p.id)
                }
            };
            if let Some(id) = stored {
                self.acknowledge_again(&channel, &publication, member, id)
                    .await?;
                // The publisher may have gone; the outcome stands regardless.
                let _ = done.send(Ok(Outcome::Duplicate(id)));
                return Ok(());
            }
        }
        let id = sequence.last_id + 1;
        publication.id = id;
        let writer = self
            .work
            .lock()
            .expect("writer lock")
            .clone()
            .ok_or(EngineError::ShuttingDown)?;
        writer
            .send(Work::Write(Write {
                channel: channel.clone(),
                delivery: Arc::new(Delivery::new(publication)),
                done,
            }))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        sequence.last_id = id;
        if let Some(key) = key {
            if sequence.nonces.len() >= NONCES_IN_MEMORY {
                // Forget stored ones only (the store still finds them); publications still
                // on their way to the store stay, or a retry now could be stored twice.
                let stored_upto = channel.broadcast_id();
                sequence.nonces.retain(|_, (id, _)| *id > stored_upto);
                sequence.store_may_know = true;
            }
            sequence.nonces.insert(key, (id, self.clock.now()));
        }
        Ok(())
    }

    /// A retried publication that is already stored goes again to its sender (its
    /// acknowledgement); one still on its way to the store reaches it when stored.
    async fn acknowledge_again(
        &self,
        channel: &Arc<Channel>,
        retry: &Publication,
        member: Option<u64>,
        id: u64,
    ) -> Result<(), StoreError> {
        let Some(target) = sender_of(member, retry.from.as_deref()) else {
            return Ok(());
        };
        if id > channel.broadcast_id() {
            return Ok(());
        }
        let (name, from, nonce) = (
            channel.name.to_string(),
            retry.from.clone(),
            retry.nonce.clone().unwrap_or_default(),
        );
        let found = self
            .blocking(move |store| store.find_nonce(&name, from.as_deref(), &nonce, ""))
            .await?;
        if let Some(original) = found {
            channel.send_to(&target, Outbound::Ack(Arc::new(Delivery::new(original))));
        }
        Ok(())
    }
}

impl Backend for LocalBackend {
    fn start(&self, sink: Sink) {
        if self.sink.set(sink.clone()).is_err() {
            return;
        }
        // Weak: the writer ends when shutdown drops the last sender.
        let Some(work) = self
            .work
            .lock()
            .expect("writer lock")
            .as_ref()
            .map(mpsc::Sender::downgrade)
        else {
            return;
        };
        // Without a runtime (a synchronous caller), channels are trimmed only after
        // their publications.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                every.tick().await;
                loop {
                    every.tick().await;
                    let Some(work) = work.upgrade().filter(|_| sink.alive()) else {
                        return;
                    };
                    if work.send(Work::Sweep).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    fn open<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Position, StoreError>> {
        async move {
            let name = channel.to_owned();
            let position = self.blocking(move |store| store.position(&name)).await?;
            let mut sequences = self.sequences.lock().expect("sequences lock");
            sequences
                .entry(Arc::from(channel))
                .or_insert_with(|| Sequence::at(position.last_id, position.last_id > 0));
            Ok(position)
        }
        .boxed()
    }

    fn follows_idle(&self) -> bool {
        // Every stored batch comes back to the engine, whoever is in the channel.
        true
    }

    fn opened(&self, _channel: &Arc<Channel>) {
        // Publications are numbered here: none can arrive before the channel exists.
    }

    fn publish(&self, job: Job) -> BoxFuture<'_, Result<(), EngineError>> {
        self.take(job).boxed()
    }

    fn read<'a>(
        &'a self,
        channel: &'a str,
        window: Window,
    ) -> BoxFuture<'a, Result<Vec<Publication>, StoreError>> {
        let name = channel.to_owned();
        self.blocking(move |store| store.read(&name, &window))
            .boxed()
    }

    fn notify_nodes(&self, payload: Bytes) -> BoxFuture<'_, Result<(), StoreError>> {
        // This node is every node.
        if let Some(sink) = self.sink.get() {
            sink.notice(payload);
        }
        std::future::ready(Ok(())).boxed()
    }

    fn address(&self) -> &str {
        &self.address
    }

    fn post<'a>(
        &'a self,
        address: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let here = address == &*self.address;
        if here {
            if let Some(sink) = self.sink.get() {
                sink.post(payload);
            }
        }
        std::future::ready(Ok(here)).boxed()
    }

    fn remove_history<'a>(
        &'a self,
        channel: &'a str,
        upto: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let name = channel.to_owned();
        // Everything up to `upto` goes, nonces or not: a later retry is stored anew.
        let trim = Trim {
            upto,
            older_than: None,
            nonces_from: "~".into(),
        };
        self.blocking(move |store| store.trim(&name, &trim)).boxed()
    }

    fn find_nonce<'a>(
        &'a self,
        channel: &'a str,
        from: Option<&'a str>,
        nonce: &'a str,
    ) -> BoxFuture<'a, Result<Option<Publication>, StoreError>> {
        let (name, from, nonce) = (
            channel.to_owned(),
            from.map(str::to_owned),
            nonce.to_owned(),
        );
        let not_before = self.nonces_from();
        self.blocking(move |store| store.find_nonce(&name, from.as_deref(), &nonce, &not_before))
            .boxed()
    }

    fn joined<'a>(
        &'a self,
        channel: &'a Arc<Channel>,
        user: &'a Arc<str>,
        _info: Option<&'a Arc<serde_json::value::RawValue>>,
        first: bool,
    ) -> BoxFuture<'a, Result<Joined, StoreError>> {
        if first {
            self.changed(crate::HookKind::MemberAdded, &channel.name, user);
        }
        // This node's members are everyone.
        ready(Ok(Joined {
            others: Vec::new(),
            infos: Vec::new(),
            announce: true,
        }))
        .boxed()
    }

    fn left(&self, channel: &Arc<str>, user: &Arc<str>) -> bool {
        self.changed(crate::HookKind::MemberRemoved, channel, user);
        true
    }

    fn occupancy(&self, channel: &Arc<str>, occupied: bool) {
        let kind = if occupied {
            crate::HookKind::ChannelOccupied
        } else {
            crate::HookKind::ChannelVacated
        };
        self.changed(kind, channel, "");
    }

    fn record_hook(&self, hook: crate::Hook) -> BoxFuture<'_, Result<(), StoreError>> {
        if let Some(hooks) = &self.hooks {
            hooks.record(hook);
        }
        ready(Ok(())).boxed()
    }

    fn take_hooks(
        &self,
        max: usize,
        _lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<crate::hooks::Taken>, StoreError>> {
        let taken = self.hooks.as_ref().map_or_else(Vec::new, |h| h.take(max));
        ready(Ok(taken)).boxed()
    }

    fn hook_sent<'a>(
        &'a self,
        _taken: &'a crate::hooks::Taken,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Taken is gone here: this process is the only one sending.
        ready(Ok(())).boxed()
    }

    fn keep_hook<'a>(
        &'a self,
        _taken: &'a crate::hooks::Taken,
        _lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        ready(Ok(())).boxed()
    }

    fn hooks_waiting(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        ready(Ok(self.hooks.as_ref().map_or(0, |h| h.waiting()))).boxed()
    }

    fn typing(&self, _channel: &Arc<str>, _user: &Arc<str>, _is_typing: bool) {}

    fn binary(&self, _channel: &Arc<str>, _data: &Bytes) {}

    fn members<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        let users = self
            .sink
            .get()
            .and_then(|sink| sink.channel(channel))
            .map_or_else(Vec::new, |channel| channel.users());
        ready(Ok(users)).boxed()
    }

    fn channels(&self) -> BoxFuture<'_, Result<Vec<(String, usize)>, StoreError>> {
        let channels = self.sink.get().map_or_else(Vec::new, Sink::channels);
        let mut active: Vec<(String, usize)> = channels
            .iter()
            .map(|channel| (channel.name.to_string(), channel.users().len()))
            .filter(|(_, users)| *users > 0)
            .collect();
        active.sort();
        ready(Ok(active)).boxed()
    }

    fn occupied(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        let channels = self.sink.get().map_or_else(Vec::new, Sink::channels);
        let mut occupied: Vec<String> = channels
            .iter()
            .filter(|channel| channel.occupied())
            .map(|channel| channel.name.to_string())
            .collect();
        occupied.sort();
        ready(Ok(occupied)).boxed()
    }

    fn health(&self) -> Option<bool> {
        None
    }

    fn depart(&self) -> BoxFuture<'_, ()> {
        ready(()).boxed()
    }

    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.work.lock().expect("writer lock").take();
        if let Some(thread) = self.thread.lock().expect("writer lock").take() {
            if thread.join().is_err() {
                error!("history writer panicked");
            }
        }
    }
}

impl Writer {
    fn run(self, mut rx: mpsc::Receiver<Work>) {
        let mut batch: Vec<Work> = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            top_up(&mut batch, &mut rx, self.max_batch);
            let mut writes = Vec::with_capacity(batch.len());
            let mut sweep = false;
            for work in batch.drain(..) {
                match work {
                    Work::Write(write) => writes.push(write),
                    Work::Sweep => sweep = true,
                }
            }
            if !writes.is_empty() {
                self.store_batch(writes);
            }
            if sweep {
                let channels = self.sink.get().map_or_else(Vec::new, Sink::channels);
                self.trim(channels.iter());
            }
        }
    }

    fn store_batch(&self, writes: Vec<Write>) {
        let publications: Vec<&Publication> =
            writes.iter().map(|w| &w.delivery.publication).collect();
        let mut backoff = Duration::from_millis(10);
        let result = loop {
            let started = std::time::Instant::now();
            let result = self.store.append(&publications);
            metrics::histogram!("switchboard_history_write_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => break Ok(()),
                Err(cause) if self.stopping.load(Ordering::Relaxed) => break Err(cause),
                Err(cause) => {
                    metrics::counter!("switchboard_history_write_failures_total").increment(1);
                    warn!(%cause, messages = publications.len(), retry_in = ?backoff, "storing messages failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        match &result {
            Ok(()) => metrics::counter!("switchboard_messages_stored_total")
                .increment(publications.len() as u64),
            Err(cause) => {
                error!(%cause, lost = publications.len(), "shutting down with messages that could not be stored")
            }
        }
        let mut trimmed: Vec<&Arc<Channel>> = Vec::new();
        for write in &writes {
            if result.is_ok() {
                write.channel.broadcast(&write.delivery);
                if write.channel.options.trims()
                    && !trimmed.iter().any(|c| Arc::ptr_eq(c, &write.channel))
                {
                    trimmed.push(&write.channel);
                }
            }
        }
        self.trim(trimmed.into_iter());
        for write in writes {
            let outcome = match &result {
                Ok(()) => Ok(Outcome::Stored(write.delivery)),
                Err(cause) => Err(cause.to_string()),
            };
            // The publisher may have gone; the outcome stands regardless.
            let _ = write.done.send(outcome);
        }
    }

    /// Removes from each of `channels` what its options no longer keep.
    fn trim<'a>(&self, channels: impl Iterator<Item = &'a Arc<Channel>>) {
        let nonces_from = self.clock.timestamp_before(self.nonce_ttl);
        for channel in channels.filter(|c| c.options.trims()) {
            let kept = kept(channel.broadcast_id(), &channel.options, &self.clock);
            let trim = Trim {
                upto: kept.after,
                older_than: kept.since,
                nonces_from: nonces_from.clone(),
            };
            if let Err(cause) = self.store.trim(&channel.name, &trim) {
                warn!(%cause, channel = %channel.name, "trimming history failed; it is trimmed again later");
            }
        }
    }
}
