//! This node's Pusher connections: how many subscribe to each channel, and the
//! signed-in users' connections (for `terminate_connections`, which reaches every node
//! as a notice). Presence and its `user_info` are the engine's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchboard_engine::InboxWaker;
use tokio::sync::broadcast;
use tracing::warn;

/// What ends a connection from outside: a flag and its inbox's waker.
#[derive(Debug, Clone)]
pub(crate) struct Terminator {
    flag: Arc<AtomicBool>,
    waker: InboxWaker,
}

impl Terminator {
    pub(crate) fn new(waker: InboxWaker) -> Self {
        Self {
            flag: Arc::default(),
            waker,
        }
    }

    /// Whether the connection was told to end.
    pub(crate) fn terminated(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn terminate(&self) {
        self.flag.store(true, Ordering::Release);
        self.waker.wake();
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Subscriptions by engine channel.
    channels: HashMap<String, usize>,
    /// Signed-in connections by app id and user id, then socket id.
    users: HashMap<(String, String), HashMap<String, Terminator>>,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

/// A notice from any node's HTTP API: end these connections.
#[derive(Debug, Serialize, Deserialize)]
struct Notice {
    pusher_terminate: Terminate,
}

#[derive(Debug, Serialize, Deserialize)]
struct Terminate {
    app: String,
    user: String,
}

/// The notice that ends `user`'s connections of `app` on every node.
pub(crate) fn terminate_notice(app: &str, user: &str) -> Bytes {
    let notice = Notice {
        pusher_terminate: Terminate {
            app: app.to_owned(),
            user: user.to_owned(),
        },
    };
    Bytes::from(serde_json::to_vec(&notice).expect("notices serialize"))
}

/// Applies the notices of every node's HTTP API to this node's connections.
pub(crate) async fn apply_notices(
    registry: Arc<Registry>,
    mut notices: broadcast::Receiver<Bytes>,
) {
    loop {
        match notices.recv().await {
            Ok(payload) => {
                // Anything else is another door's.
                if let Ok(notice) = serde_json::from_slice::<Notice>(&payload) {
                    let Terminate { app, user } = notice.pusher_terminate;
                    registry.terminate(&app, &user);
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                warn!(missed, "Pusher notices were missed: the node was too busy");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Registry {
    /// Ends `user`'s signed-in connections of `app` here; how many.
    pub(crate) fn terminate(&self, app: &str, user: &str) -> usize {
        let inner = self.inner.lock().expect("registry lock");
        let Some(connections) = inner.users.get(&(app.to_owned(), user.to_owned())) else {
            return 0;
        };
        connections.values().for_each(Terminator::terminate);
        connections.len()
    }

    /// Subscriptions to `channel` here.
    pub(crate) fn subscriptions(&self, channel: &str) -> usize {
        let inner = self.inner.lock().expect("registry lock");
        inner.channels.get(channel).copied().unwrap_or(0)
    }
}

/// A connection's entries in the [`Registry`]; dropping it takes them out.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Arc<Registry>,
    socket_id: String,
    /// Its subscriptions' engine channels.
    channels: std::collections::HashSet<String>,
    signed_in: Option<(String, String)>,
}

impl Registration {
    pub(crate) fn new(registry: Arc<Registry>, socket_id: &str) -> Self {
        Self {
            registry,
            socket_id: socket_id.to_owned(),
            channels: std::collections::HashSet::new(),
            signed_in: None,
        }
    }

    pub(crate) fn subscribed(&mut self, channel: &str) {
        if self.channels.insert(channel.to_owned()) {
            let mut inner = self.registry.inner.lock().expect("registry lock");
            *inner.channels.entry(channel.to_owned()).or_default() += 1;
        }
    }

    pub(crate) fn unsubscribed(&mut self, channel: &str) {
        if self.channels.remove(channel) {
            self.registry.forget(channel);
        }
    }

    /// Signed in as `user` of `app`: `terminator` ends the connection.
    pub(crate) fn signed_in(&mut self, app: &str, user: &str, terminator: Terminator) {
        let key = (app.to_owned(), user.to_owned());
        let mut inner = self.registry.inner.lock().expect("registry lock");
        if let Some(old) = self.signed_in.take() {
            if let Some(connections) = inner.users.get_mut(&old) {
                connections.remove(&self.socket_id);
                if connections.is_empty() {
                    inner.users.remove(&old);
                }
            }
        }
        inner
            .users
            .entry(key.clone())
            .or_default()
            .insert(self.socket_id.clone(), terminator);
        self.signed_in = Some(key);
    }
}

impl Registry {
    fn forget(&self, channel: &str) {
        let mut inner = self.inner.lock().expect("registry lock");
        if let Some(count) = inner.channels.get_mut(channel) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                inner.channels.remove(channel);
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        for channel in std::mem::take(&mut self.channels) {
            self.registry.forget(&channel);
        }
        if let Some(key) = self.signed_in.take() {
            let mut inner = self.registry.inner.lock().expect("registry lock");
            if let Some(connections) = inner.users.get_mut(&key) {
                connections.remove(&self.socket_id);
                if connections.is_empty() {
                    inner.users.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_engine::Inbox;

    #[test]
    fn counts_subscriptions_until_connections_go() {
        let registry = Arc::new(Registry::default());
        let mut one = Registration::new(registry.clone(), "1.1");
        let mut two = Registration::new(registry.clone(), "1.2");
        one.subscribed("presence-a");
        one.subscribed("presence-a");
        two.subscribed("presence-a");
        two.subscribed("b");
        assert_eq!(registry.subscriptions("presence-a"), 2);
        one.unsubscribed("presence-a");
        assert_eq!(registry.subscriptions("presence-a"), 1);
        drop(two);
        assert_eq!(registry.subscriptions("presence-a"), 0);
        assert_eq!(registry.subscriptions("b"), 0);
    }

    #[test]
    fn terminate_reaches_the_users_signed_in_connections() {
        let registry = Arc::new(Registry::default());
        let inbox = Inbox::new(4);
        let terminator = Terminator::new(inbox.waker());
        let mut one = Registration::new(registry.clone(), "1.1");
        one.signed_in("1", "ann", terminator.clone());
        assert_eq!(registry.terminate("1", "bob"), 0);
        assert_eq!(registry.terminate("2", "ann"), 0);
        assert_eq!(registry.terminate("1", "ann"), 1);
        assert!(terminator.terminated());
        drop(one);
        assert_eq!(registry.terminate("1", "ann"), 0);
    }
}
