//! Server settings with their defaults. Every field can come from the config file.

use std::time::Duration;

use serde::Deserialize;

/// Settings of [`crate::run`]; build from [`Config::default`] or deserialize from TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Open connections (HTTP and WebSocket) beyond which new ones get 503.
    pub max_connections: usize,
    /// Largest message `/echo` takes (16 MiB covers every Autobahn case).
    pub echo_max_message: usize,
    /// Seconds of silence after which the server pings a client.
    pub ping_interval_secs: u64,
    /// Seconds after a ping without any answer before the client is dropped.
    pub pong_timeout_secs: u64,
    /// Seconds a client has to send its complete request head.
    pub handshake_timeout_secs: u64,
    /// Seconds shutdown waits for connections to finish their close handshakes.
    pub drain_timeout_secs: u64,
    /// Seconds to wait for a client's Close reply.
    pub close_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            echo_max_message: 16 << 20,
            ping_interval_secs: 30,
            pong_timeout_secs: 60,
            handshake_timeout_secs: 10,
            drain_timeout_secs: 10,
            close_timeout_secs: 5,
        }
    }
}

impl Config {
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout_secs = timeout.as_secs().max(1);
        self
    }

    pub(crate) fn socket_config(&self, max_message: usize) -> switchboard_net::Config {
        let wire = switchboard_net::wire::Config::default()
            .with_max_message_size(max_message)
            .with_max_frame_size(max_message);
        switchboard_net::Config::default()
            .with_wire(wire)
            .with_ping_interval(Some(Duration::from_secs(self.ping_interval_secs.max(1))))
            .with_pong_timeout(Duration::from_secs(self.pong_timeout_secs.max(1)))
            .with_close_timeout(Duration::from_secs(self.close_timeout_secs.max(1)))
    }
}
