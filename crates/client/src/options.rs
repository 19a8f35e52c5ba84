//! How a client connects and reconnects.

use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;

/// Settings of a client. Start from [`Options::default`] and adjust with the `with_*`
/// methods; fields may be added in later versions.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The name to join rooms as (`?name=`, for servers in open mode).
    pub name: Option<String>,
    /// A JWT sent as `Authorization: Bearer` (servers with auth take the name from it).
    pub token: Option<String>,
    /// Resume a room after this message id on the first connection instead of receiving
    /// the most recent messages. Later connections resume after the last id seen.
    pub since: Option<u64>,
    /// Reconnection delays.
    pub backoff: Backoff,
    /// Reconnect after a lost connection (`false`: the first loss closes the client).
    pub reconnect: bool,
    /// Ping the server after this long without hearing from it.
    pub ping_interval: Duration,
    /// Count the connection dead when nothing arrives this long after a ping.
    pub pong_timeout: Duration,
    /// Bound on opening a connection and receiving the room's welcome.
    pub connect_timeout: Duration,
    /// Offer permessage-deflate.
    pub compression: bool,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Messages waiting for their acknowledgement (or a connection) before
    /// `send_message` refuses more.
    pub max_queued: usize,
    /// Messages sent but not yet acknowledged on a connection.
    pub max_in_flight: usize,
    /// TLS settings for `wss://` URLs; `None` trusts the system's root certificates.
    /// Build them with `switchboard_net::tls::client_config` (a CA file of your own).
    pub tls: Option<Arc<switchboard_net::tls::ClientConfig>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: None,
            token: None,
            since: None,
            backoff: Backoff::default(),
            reconnect: true,
            ping_interval: Duration::from_secs(15),
            pong_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            compression: true,
            headers: Vec::new(),
            max_queued: 10_000,
            max_in_flight: 256,
            tls: None,
        }
    }
}

impl Options {
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn with_since(mut self, since: Option<u64>) -> Self {
        self.since = since;
        self
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    pub fn with_reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Ping after `interval` of silence; drop the connection `timeout` after the ping.
    pub fn with_heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.ping_interval = interval;
        self.pong_timeout = timeout;
        self
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn with_compression(mut self, compression: bool) -> Self {
        self.compression = compression;
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Trusts these TLS settings for `wss://` URLs.
    pub fn with_tls(mut self, tls: Arc<switchboard_net::tls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn with_max_queued(mut self, messages: usize) -> Self {
        self.max_queued = messages.max(1);
        self
    }
}

/// `url` with `name`, `since` and `epoch` set in its query (replacing values already
/// there).
pub(crate) fn room_url(
    url: &str,
    name: Option<&str>,
    since: Option<u64>,
    epoch: Option<&str>,
) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            !(key == "since" && since.is_some()
                || key == "name" && name.is_some()
                || key == "epoch" && epoch.is_some())
        })
        .map(str::to_owned)
        .collect();
    if let Some(name) = name {
        pairs.push(format!("name={}", encode(name)));
    }
    if let Some(since) = since {
        pairs.push(format!("since={since}"));
    }
    if let Some(epoch) = epoch {
        pairs.push(format!("epoch={}", encode(epoch)));
    }
    if pairs.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", pairs.join("&"))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte));
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_resume_points_go_into_the_query() {
        assert_eq!(
            room_url("ws://h/room/lobby", Some("bot"), None, None),
            "ws://h/room/lobby?name=bot"
        );
        assert_eq!(
            room_url(
                "ws://h/room/lobby?since=3&x=1",
                Some("Zoë B"),
                Some(9),
                None
            ),
            "ws://h/room/lobby?x=1&name=Zo%C3%AB%20B&since=9"
        );
        assert_eq!(
            room_url("ws://h/room/lobby?since=3", None, None, None),
            "ws://h/room/lobby?since=3"
        );
        assert_eq!(
            room_url("ws://h/room/lobby?epoch=old", None, Some(4), Some("e1")),
            "ws://h/room/lobby?since=4&epoch=e1"
        );
    }
}
