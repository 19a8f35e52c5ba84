//! The Centrifugo door's connections on this node: by user, for what the server API's
//! `subscribe`, `unsubscribe` and `disconnect` reach, and by channel, for presence by
//! connection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchboard_engine::InboxWaker;
use tokio::sync::broadcast;
use tracing::warn;

/// What the server API asks of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Control {
    /// Subscribe it to this channel (a server-side subscription).
    Subscribe(String),
    /// Unsubscribe it from this channel.
    Unsubscribe(String),
    /// Close it with this code and reason.
    Disconnect(u16, String),
}

/// A control for a user's connections wherever they are: the engine carries it to
/// every node ([`switchboard_engine::Engine::notify_nodes`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Notice {
    pub(crate) user: String,
    /// Only this connection of the user's, when given.
    pub(crate) client: Option<String>,
    pub(crate) control: Control,
}

impl Notice {
    pub(crate) fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("notices serialize"))
    }
}

/// Applies the notices any node sends to this node's connections, until the engine
/// goes.
pub(crate) async fn apply_notices(clients: Arc<Clients>, mut notices: broadcast::Receiver<Bytes>) {
    loop {
        match notices.recv().await {
            Ok(payload) => {
                // Anything else is another door's, or another version's.
                if let Ok(notice) = serde_json::from_slice::<Notice>(&payload) {
                    clients.send(&notice.user, notice.client.as_deref(), &notice.control);
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                warn!(
                    missed,
                    "server API notices were missed: the node was too busy"
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Controls waiting for a connection, which its inbox's waker tells of.
#[derive(Debug, Clone)]
pub(crate) struct Mailbox {
    controls: Arc<Mutex<Vec<Control>>>,
    waker: InboxWaker,
}

impl Mailbox {
    pub(crate) fn new(waker: InboxWaker) -> Self {
        Self {
            controls: Arc::default(),
            waker,
        }
    }

    fn post(&self, control: &Control) {
        self.controls
            .lock()
            .expect("mailbox lock")
            .push(control.clone());
        self.waker.wake();
    }

    /// The controls posted since the last call, oldest first.
    pub(crate) fn take(&self) -> Vec<Control> {
        std::mem::take(&mut *self.controls.lock().expect("mailbox lock"))
    }
}

type Senders = HashMap<String, Mailbox>;

/// A connection as presence lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Present {
    pub(crate) client: String,
    pub(crate) user: String,
    /// The `info` of its token (JSON), or empty.
    pub(crate) info: Vec<u8>,
}

/// Connections by user, then by client id; subscribers by channel.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    users: Mutex<HashMap<String, Senders>>,
    /// Subscribers by channel, then by user.
    channels: Mutex<HashMap<String, HashMap<String, Vec<Present>>>>,
}

/// A connection's place in [`Clients`]; dropping it takes the connection out.
#[derive(Debug)]
pub(crate) struct Registration {
    clients: Arc<Clients>,
    user: String,
    client: String,
    info: Vec<u8>,
    channels: HashSet<String>,
}

impl Clients {
    /// Adds a connection; its controls arrive in `mailbox`.
    pub(crate) fn register(
        self: &Arc<Self>,
        user: &str,
        client: &str,
        info: Vec<u8>,
        mailbox: Mailbox,
    ) -> Registration {
        self.users
            .lock()
            .expect("clients lock")
            .entry(user.to_owned())
            .or_default()
            .insert(client.to_owned(), mailbox);
        Registration {
            clients: self.clone(),
            user: user.to_owned(),
            client: client.to_owned(),
            info,
            channels: HashSet::new(),
        }
    }

    /// Sends `control` to `user`'s connections here (only `client`, when given); how
    /// many it reached.
    pub(crate) fn send(&self, user: &str, client: Option<&str>, control: &Control) -> usize {
        let users = self.users.lock().expect("clients lock");
        let Some(senders) = users.get(user) else {
            return 0;
        };
        senders
            .iter()
            .filter(|(id, _)| client.map_or(true, |c| c == id.as_str()))
            .inspect(|(_, mailbox)| mailbox.post(control))
            .count()
    }
}

impl Clients {
    /// Connections, distinct users and subscriptions here.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let users = self.users.lock().expect("clients lock");
        let named = users.keys().filter(|u| !u.is_empty()).count();
        let subscriptions = self
            .channels
            .lock()
            .expect("clients lock")
            .values()
            .flat_map(HashMap::values)
            .map(Vec::len)
            .sum();
        (users.values().map(HashMap::len).sum(), named, subscriptions)
    }

    /// The connections here subscribed to `channel`.
    pub(crate) fn present(&self, channel: &str) -> Vec<Present> {
        let channels = self.channels.lock().expect("clients lock");
        channels
            .get(channel)
            .map(|users| users.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// `user`'s connection here in `channel`, when it has exactly one.
    pub(crate) fn only_connection(&self, channel: &str, user: &str) -> Option<Present> {
        let channels = self.channels.lock().expect("clients lock");
        match channels.get(channel)?.get(user)?.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        }
    }

    /// This node's name in `info`: the host's, with the process id.
    pub(crate) fn node(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "switchboard".into());
        format!("{host}-{}", std::process::id())
    }
}

impl Registration {
    /// The connection subscribed to `channel`.
    pub(crate) fn joined(&mut self, channel: &str) {
        if !self.channels.insert(channel.to_owned()) {
            return;
        }
        let present = Present {
            client: self.client.clone(),
            user: self.user.clone(),
            info: self.info.clone(),
        };
        let mut channels = self.clients.channels.lock().expect("clients lock");
        channels
            .entry(channel.to_owned())
            .or_default()
            .entry(self.user.clone())
            .or_default()
            .push(present);
    }

    /// The connection left `channel`.
    pub(crate) fn left(&mut self, channel: &str) {
        if self.channels.remove(channel) {
            self.clients.forget(channel, &self.user, &self.client);
        }
    }
}

impl Clients {
    fn forget(&self, channel: &str, user: &str, client: &str) {
        let mut channels = self.channels.lock().expect("clients lock");
        let Some(users) = channels.get_mut(channel) else {
            return;
        };
        if let Some(present) = users.get_mut(user) {
            present.retain(|p| p.client != client);
            if present.is_empty() {
                users.remove(user);
            }
        }
        if users.is_empty() {
            channels.remove(channel);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        for channel in std::mem::take(&mut self.channels) {
            self.clients.forget(&channel, &self.user, &self.client);
        }
        let mut users = self.clients.users.lock().expect("clients lock");
        if let Some(senders) = users.get_mut(&self.user) {
            senders.remove(&self.client);
            if senders.is_empty() {
                users.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_engine::Inbox;

    #[test]
    fn controls_reach_the_users_connections_until_they_leave() {
        let clients = Arc::new(Clients::default());
        let (inbox1, inbox2) = (Inbox::new(4), Inbox::new(4));
        let (box1, box2) = (Mailbox::new(inbox1.waker()), Mailbox::new(inbox2.waker()));
        let one = clients.register("ann", "c1", Vec::new(), box1.clone());
        let _two = clients.register("ann", "c2", Vec::new(), box2.clone());
        let stop = Control::Disconnect(3503, "bye".into());
        assert_eq!(clients.send("ann", None, &stop), 2);
        assert_eq!(clients.send("ann", Some("c2"), &stop), 1);
        assert_eq!(clients.send("bob", None, &stop), 0);
        assert_eq!(box1.take(), std::slice::from_ref(&stop));
        assert_eq!(box2.take(), [stop.clone(), stop.clone()]);
        assert!(box2.take().is_empty());
        drop(one);
        assert_eq!(clients.send("ann", None, &stop), 1);
    }

    #[test]
    fn presence_lists_each_connection_until_it_leaves() {
        let clients = Arc::new(Clients::default());
        let inbox = Inbox::new(4);
        let mailbox = || Mailbox::new(inbox.waker());
        let mut one = clients.register("ann", "c1", b"{\"d\":1}".to_vec(), mailbox());
        let mut two = clients.register("ann", "c2", Vec::new(), mailbox());
        one.joined("x");
        one.joined("x");
        two.joined("x");
        two.joined("y");
        let clients_of = |channel| -> Vec<String> {
            clients
                .present(channel)
                .into_iter()
                .map(|p| p.client)
                .collect()
        };
        assert_eq!(clients_of("x"), ["c1", "c2"]);
        assert_eq!(clients.only_connection("x", "ann"), None, "two of ann's");
        assert_eq!(clients.only_connection("y", "ann").unwrap().client, "c2");
        assert_eq!(clients.counts(), (2, 1, 3));
        one.left("x");
        assert_eq!(clients_of("x"), ["c2"]);
        two.left("x");
        one.joined("x");
        assert_eq!(
            clients.only_connection("x", "ann").unwrap().info,
            b"{\"d\":1}"
        );
        drop(two);
        assert_eq!(
            (clients_of("x"), clients_of("y")),
            (vec!["c1".to_owned()], vec![])
        );
        assert_eq!(clients.counts(), (1, 1, 1));
        drop(one);
        assert_eq!(clients.counts(), (0, 0, 0));
    }
}
