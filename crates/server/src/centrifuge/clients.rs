//! The Centrifugo door's connections on this node, by user: what the server API's
//! `subscribe`, `unsubscribe` and `disconnect` reach.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// What the server API asks of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    /// Subscribe it to this channel (a server-side subscription).
    Subscribe(String),
    /// Unsubscribe it from this channel.
    Unsubscribe(String),
    /// Close it with this code and reason.
    Disconnect(u16, String),
}

type Senders = HashMap<String, mpsc::UnboundedSender<Control>>;

/// Connections by user, then by client id.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    users: Mutex<HashMap<String, Senders>>,
}

/// A connection's place in [`Clients`]; dropping it takes the connection out.
#[derive(Debug)]
pub(crate) struct Registration {
    clients: Arc<Clients>,
    user: String,
    client: String,
}

impl Clients {
    /// Adds a connection; its controls arrive on the receiver.
    pub(crate) fn register(
        self: &Arc<Self>,
        user: &str,
        client: &str,
    ) -> (Registration, mpsc::UnboundedReceiver<Control>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.users
            .lock()
            .expect("clients lock")
            .entry(user.to_owned())
            .or_default()
            .insert(client.to_owned(), tx);
        let registration = Registration {
            clients: self.clone(),
            user: user.to_owned(),
            client: client.to_owned(),
        };
        (registration, rx)
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
            .filter(|(_, tx)| tx.send(control.clone()).is_ok())
            .count()
    }
}

impl Clients {
    /// Connections and distinct users here.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let users = self.users.lock().expect("clients lock");
        let named = users.keys().filter(|u| !u.is_empty()).count();
        (users.values().map(HashMap::len).sum(), named)
    }

    /// This node's name in `info`: the host's, with the process id.
    pub(crate) fn node(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "switchboard".into());
        format!("{host}-{}", std::process::id())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
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

    #[test]
    fn controls_reach_the_users_connections_until_they_leave() {
        let clients = Arc::new(Clients::default());
        let (one, mut rx1) = clients.register("ann", "c1");
        let (_two, mut rx2) = clients.register("ann", "c2");
        let stop = Control::Disconnect(3503, "bye".into());
        assert_eq!(clients.send("ann", None, &stop), 2);
        assert_eq!(clients.send("ann", Some("c2"), &stop), 1);
        assert_eq!(clients.send("bob", None, &stop), 0);
        assert_eq!(rx1.try_recv().unwrap(), stop);
        assert_eq!(
            (rx2.try_recv().unwrap(), rx2.try_recv().unwrap()),
            (stop.clone(), stop.clone())
        );
        drop(one);
        assert_eq!(clients.send("ann", None, &stop), 1);
    }
}
