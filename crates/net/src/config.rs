//! Connection settings of the driver, each bounded, each with a default.

use std::time::Duration;

use switchboard_wire::deflate::DeflateConfig;

/// Settings of a [`crate::WebSocket`]. Start from [`Config::default`] and adjust with the
/// `with_*` methods; fields may be added in later versions.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Protocol limits (frame and message sizes).
    pub wire: switchboard_wire::Config,
    /// permessage-deflate: offered (client) or accepted (server) when set.
    pub deflate: Option<DeflateConfig>,
    /// Send a ping after this long without hearing from the peer; `None` never pings.
    /// Silence is noticed by a timer of this period, so the ping goes out between one
    /// and two periods after the last byte arrived.
    pub ping_interval: Option<Duration>,
    /// Drop the connection when nothing arrives this long after a ping.
    pub pong_timeout: Duration,
    /// Free compression memory that can be rebuilt after this long without traffic;
    /// `None` keeps it.
    pub idle_release: Option<Duration>,
    /// Give up on a peer that takes none of our bytes for this long.
    pub write_timeout: Duration,
    /// How long a server waits for a complete upgrade request ([`crate::accept`]).
    pub handshake_timeout: Duration,
    /// How long to wait for the peer's Close (and, on a client, the server's TCP close).
    pub close_timeout: Duration,
    /// Bytes requested from the socket per read (the buffer grows for larger frames).
    pub read_buffer_size: usize,
    /// Outgoing bytes queued before `feed` waits for the socket to take them.
    pub max_write_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            wire: switchboard_wire::Config::default(),
            deflate: Some(DeflateConfig::default()),
            ping_interval: Some(Duration::from_secs(30)),
            pong_timeout: Duration::from_secs(60),
            idle_release: Some(Duration::from_secs(10)),
            write_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            read_buffer_size: 8 * 1024,
            max_write_buffer: 1 << 20,
        }
    }
}

impl Config {
    pub fn with_wire(mut self, wire: switchboard_wire::Config) -> Self {
        self.wire = wire;
        self
    }

    pub fn with_deflate(mut self, deflate: Option<DeflateConfig>) -> Self {
        self.deflate = deflate;
        self
    }

    pub fn with_ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.ping_interval = interval;
        self
    }

    pub fn with_pong_timeout(mut self, timeout: Duration) -> Self {
        self.pong_timeout = timeout;
        self
    }

    pub fn with_idle_release(mut self, after: Option<Duration>) -> Self {
        self.idle_release = after;
        self
    }

    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    pub fn with_close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    pub fn with_max_write_buffer(mut self, bytes: usize) -> Self {
        self.max_write_buffer = bytes;
        self
    }
}
