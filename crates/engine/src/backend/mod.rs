//! What the engine needs from a backend, as one trait, and the two backends.
//!
//! The engine owns channels, their members on this node and every delivery to them; a
//! backend numbers and stores publications, answers history and presence, and carries
//! what other nodes must hear. [`local`] is the single node (a [`crate::store::Store`]
//! written by one thread, which hands each stored batch back for delivery); [`redis`]
//! shares channels with other nodes over Redis (each publication one script call,
//! delivered through Pub/Sub to every node with members in its channel). Neither knows
//! a door; the engine has no branch for either.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use crate::engine::{Channel, Delivery, Inner};
use crate::store::{Position, Publication, StoreError, Window};
use crate::EngineError;

pub(crate) mod local;
pub(crate) mod redis;

/// How a publication ended: stored under its id (and delivered), or a retry of a nonce
/// already stored under the id given.
#[derive(Debug, Clone)]
pub enum Outcome {
    Stored(Arc<Delivery>),
    Duplicate(u64),
}

/// A publication on its way to the backend.
pub(crate) struct Job {
    pub(crate) channel: Arc<Channel>,
    /// Its id is 0: the backend numbers it.
    pub(crate) publication: Publication,
    /// The member that published it (`None`: the server).
    pub(crate) member: Option<u64>,
    pub(crate) done: oneshot::Sender<Result<Outcome, String>>,
}

/// What a backend says when a user's connection joins a channel.
pub(crate) struct Joined {
    /// Users present on other nodes (the engine knows this node's).
    pub(crate) others: Vec<String>,
    /// What present users said of themselves, where they did.
    pub(crate) infos: Vec<(String, Box<serde_json::value::RawValue>)>,
    /// Whether the engine announces the join to this node's members itself (a cluster
    /// announces it through every node, once).
    pub(crate) announce: bool,
}

/// A node's random address (16 hex digits).
pub(crate) fn random_address() -> Arc<str> {
    use rand::{RngCore, SeedableRng};
    Arc::from(format!(
        "{:016x}",
        rand::rngs::StdRng::from_os_rng().next_u64()
    ))
}

/// The engine as a backend sees it: channels to deliver into.
#[derive(Clone, Debug)]
pub(crate) struct Sink(pub(crate) Weak<Inner>);

impl Sink {
    /// The channel named `name`, if anyone here has used it.
    pub(crate) fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.0.upgrade()?.channel_now(name)
    }

    /// Every channel in use here.
    pub(crate) fn channels(&self) -> Vec<Arc<Channel>> {
        self.0
            .upgrade()
            .map_or_else(Vec::new, |inner| inner.channels_now())
    }

    /// A notice for the doors of this node (see [`crate::Engine::notify_nodes`]).
    pub(crate) fn notice(&self, payload: Bytes) {
        if let Some(inner) = self.0.upgrade() {
            // No door listening is no error.
            let _ = inner.notices.send(payload);
        }
    }

    /// A post for the doors of this node alone (see [`crate::Engine::post`]).
    pub(crate) fn post(&self, payload: Bytes) {
        if let Some(inner) = self.0.upgrade() {
            let _ = inner.posts.send(payload);
        }
    }

    /// Whether the engine still runs.
    pub(crate) fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

pub(crate) trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// Called once, before any other call, with what to deliver into.
    fn start(&self, sink: Sink);
    /// Where `channel`'s stream stands (and its epoch, made if it has none).
    fn open<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Position, StoreError>>;
    /// Whether a channel with no members here still receives its publications, so its
    /// position stays current (a single node). A Redis node hears only the channels it
    /// has members in: a channel without any is read afresh before it is used.
    fn follows_idle(&self) -> bool;
    /// `channel` was just made here from the position `open` gave: a backend whose
    /// publications arrive on their own (Redis) checks that none came in between.
    fn opened(&self, channel: &Arc<Channel>);
    /// Takes a publication: waits while the backend's queue is full, never for the
    /// storing itself, whose outcome goes to `job.done`. Stored publications reach the
    /// channel through [`Channel::broadcast`] in id order; a retried nonce goes back to
    /// its sender as [`crate::Outbound::Ack`].
    fn publish(&self, job: Job) -> BoxFuture<'_, Result<(), EngineError>>;
    /// Stored publications of `channel` in `window`.
    fn read<'a>(
        &'a self,
        channel: &'a str,
        window: Window,
    ) -> BoxFuture<'a, Result<Vec<Publication>, StoreError>>;
    /// Carries a notice to every node's engine, this one's included, once each.
    fn notify_nodes(&self, payload: Bytes) -> BoxFuture<'_, Result<(), StoreError>>;
    /// This node's address for [`Backend::post`]: random, fixed while the process runs.
    fn address(&self) -> &str;
    /// Carries `payload` to the engine of the node at `address` alone, as a post;
    /// false when no node there heard it.
    fn post<'a>(
        &'a self,
        address: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Removes `channel`'s publications up to `upto` (its ids and epoch stay).
    fn remove_history<'a>(
        &'a self,
        channel: &'a str,
        upto: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The publication `from` sent with `nonce`, while the nonce is remembered.
    fn find_nonce<'a>(
        &'a self,
        channel: &'a str,
        from: Option<&'a str>,
        nonce: &'a str,
    ) -> BoxFuture<'a, Result<Option<Publication>, StoreError>>;
    /// A connection of `user` joined `channel` (`first`: its first on this node),
    /// saying `info` of itself.
    fn joined<'a>(
        &'a self,
        channel: &'a Arc<Channel>,
        user: &'a Arc<str>,
        info: Option<&'a Arc<serde_json::value::RawValue>>,
        first: bool,
    ) -> BoxFuture<'a, Result<Joined, StoreError>>;
    /// The last connection of `user` on this node left; true when the engine announces
    /// the leave to this node's members itself.
    fn left(&self, channel: &Arc<str>, user: &Arc<str>) -> bool;
    /// `channel` got its first member on this node, or lost its last one.
    fn occupancy(&self, channel: &Arc<str>, occupied: bool);
    /// Records a door's hook.
    fn record_hook(&self, hook: crate::Hook) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Takes up to `max` hooks due now.
    fn take_hooks(
        &self,
        max: usize,
        lease: std::time::Duration,
    ) -> BoxFuture<'_, Result<Vec<crate::hooks::Taken>, StoreError>>;
    /// A taken hook is done with.
    fn hook_sent<'a>(
        &'a self,
        taken: &'a crate::hooks::Taken,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// A taken hook is kept for another lease.
    fn keep_hook<'a>(
        &'a self,
        taken: &'a crate::hooks::Taken,
        lease: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Hooks waiting, delayed ones included.
    fn hooks_waiting(&self) -> BoxFuture<'_, Result<usize, StoreError>>;
    /// Carries a typing indicator to the other nodes.
    fn typing(&self, channel: &Arc<str>, user: &Arc<str>, is_typing: bool);
    /// Carries binary data to the other nodes.
    fn binary(&self, channel: &Arc<str>, data: &Bytes);
    /// The users in `channel`, everywhere, sorted.
    fn members<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;
    /// Channels with users in them, everywhere, with how many each has, sorted.
    fn channels(&self) -> BoxFuture<'_, Result<Vec<(String, usize)>, StoreError>>;
    /// Channels with members (anonymous ones included) on any node, sorted.
    fn occupied(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;
    /// `None` when there is nothing to be cut off from; else whether it answers.
    fn health(&self) -> Option<bool>;
    /// Leaves the other nodes before shutting down (bounded).
    fn depart(&self) -> BoxFuture<'_, ()>;
    /// Stops taking publications and waits until those taken are settled.
    fn shutdown(&self);
}

/// Adds what is already queued on `rx` to `batch`, up to `max` in all, without waiting.
pub(crate) fn top_up<T>(batch: &mut Vec<T>, rx: &mut tokio::sync::mpsc::Receiver<T>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

/// Whom a retried publication's acknowledgement goes to: the connection that sent it
/// again, or for the HTTP API every connection of its user.
pub(crate) fn sender_of(member: Option<u64>, from: Option<&str>) -> Option<crate::engine::Target> {
    use crate::engine::Target;
    member
        .map(Target::Member)
        .or_else(|| from.map(|user| Target::User(Arc::from(user))))
}
