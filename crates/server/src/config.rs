//! Server settings with their defaults. Every field can come from the config file.

use std::time::Duration;

use serde::Deserialize;
use switchboard_engine::{ChannelOptions, NamespaceTable};
use switchboard_wire::deflate::DeflateConfig;

/// Settings of [`crate::run`]; build from [`Config::default`] or deserialize from TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Open connections (HTTP and WebSocket) beyond which new ones get 503.
    pub max_connections: usize,
    /// Open connections from one IP address beyond which new ones get 429; 0: no limit.
    pub max_connections_per_ip: usize,
    /// New connections one IP address may open per second, on average (429 beyond);
    /// 0: no limit.
    pub handshakes_per_ip_per_sec: f64,
    /// New connections one IP address may open in a burst.
    pub handshake_burst_per_ip: u32,
    /// Proxies (addresses or CIDR ranges, `10.0.0.0/8`, `::1`) whose `Forwarded` or
    /// `X-Forwarded-For` header names the client: the nearest address there that is not
    /// one of them is the client for the per-address limits, logs and metrics, and a
    /// connection from one of them is counted per request once its head is read. Empty:
    /// every connection is its own client and those headers are ignored.
    pub trusted_proxies: Vec<String>,
    /// The header the trusted proxies write the client into: `x-forwarded-for` (nginx,
    /// HAProxy, most load balancers) or `forwarded` (RFC 7239). Only that one is read,
    /// since a proxy passes the other on as the client wrote it.
    pub forwarded_header: String,
    /// Connections from `trusted_proxies` start with a PROXY protocol header (version 1
    /// or 2: HAProxy, AWS NLB) that names the client; one without it is refused, and so
    /// is one from any other address that sends one.
    pub proxy_protocol: bool,
    /// Largest request head (request line and headers) in bytes; larger ones get 431.
    /// At least 8 KiB.
    pub max_header_bytes: usize,
    /// PEM file with the certificate chain (leaf first): the server then speaks TLS
    /// only (`https://`, `wss://`). Needs `tls_key`.
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM file with the private key of `tls_cert`.
    pub tls_key: Option<std::path::PathBuf>,
    /// Whether the TLS listener offers HTTP/2 (ALPN `h2`, preferred over HTTP/1.1): the
    /// page, the APIs and event streams share one connection, and WebSockets open as
    /// HTTP/2 streams (RFC 8441). Plain-text listeners speak HTTP/1.1 only.
    pub http2: bool,
    /// Streams one HTTP/2 connection may have open at once (WebSockets included).
    pub http2_max_streams: u32,
    /// Largest message `/echo` takes (16 MiB covers every Autobahn case).
    pub echo_max_message: usize,
    /// Where room history is stored (SQLite, `history.sqlite3`); `None` keeps it in memory.
    pub data_dir: Option<std::path::PathBuf>,
    /// `redis://HOST:PORT`, or a list of them: share rooms, history and presence with
    /// the other nodes on this Redis (history then lives there, not in `data_dir`); with
    /// several standalone servers, each channel lives on one of them (rendezvous
    /// hashing of its name, whatever their order).
    #[serde(deserialize_with = "one_or_many")]
    pub redis: Vec<String>,
    /// Nodes of a Redis Cluster (any reachable ones): the cluster shares the channels
    /// instead, each on the shard that owns its hash slot. Not with `redis`.
    pub redis_cluster: Vec<String>,
    /// The start of every Redis key and channel, so clusters can share one Redis.
    pub redis_prefix: String,
    /// Seconds a node that stopped answering keeps its users in member lists.
    pub presence_expiry_secs: u64,
    /// Milliseconds within which a node notices that Redis stopped answering (a silent
    /// link as much as a closed one): `/healthz` then answers 503 and messages are
    /// refused with `unavailable` until it answers again.
    pub redis_timeout_ms: u64,
    /// Replicas that must confirm a message (Redis `WAIT`) before it is published and
    /// acknowledged, so a failover cannot take back what a client was told is stored;
    /// 0: none. Unconfirmed in time: refused with `unavailable` (sent again).
    pub redis_wait_replicas: usize,
    /// Milliseconds a message waits for those replicas.
    pub redis_wait_timeout_ms: u64,
    /// Largest WebSocket message in a room (1009 beyond it).
    pub room_max_message: usize,
    /// Longest chat text, in characters (an `error` event beyond it).
    pub max_text_chars: usize,
    /// The options of every channel no namespace claims (`[channels]`).
    pub channels: ChannelOptions,
    /// `[namespaces.NS]`: options for the channels whose names start with a prefix.
    pub namespaces: NamespaceTable,
    /// Seconds a message's nonce is remembered (a retry within it is stored once),
    /// whether or not the message itself is still kept.
    pub nonce_ttl_secs: u64,
    /// Messages sent on joining a room without `since`.
    pub recent_on_join: usize,
    /// Events queued per room connection before it is closed as a slow consumer (4008).
    pub outbound_queue: usize,
    /// HS256 secret: room connections then need a JWT signed with it.
    pub jwt_secret: Option<String>,
    /// RS256 public key (PEM file): room connections then need a JWT signed by its pair.
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    /// Key the HTTP API requires (`Authorization: Bearer KEY`); `None` leaves it open.
    pub api_key: Option<String>,
    /// Origins allowed to open WebSockets (exact `Origin` values); empty allows any.
    /// Clients that send no Origin (not browsers) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Milliseconds after which an unrefreshed typing indicator is reported as stopped.
    pub typing_expiry_ms: u64,
    /// Room events a connection may send per second, on average.
    pub rate_limit_per_sec: f64,
    /// Room events a connection may send in a burst.
    pub rate_limit_burst: u32,
    /// Refused events in a row after which the connection is closed with 1008.
    pub rate_limit_strikes: u32,
    /// Seconds between the server's pings. The room door pings after this long without
    /// traffic (noticed by a timer of this period: within twice this long); the
    /// Centrifugo door sends its own ping every this many seconds and closes a client
    /// whose pong has not come by the next one.
    pub ping_interval_secs: u64,
    /// Channels one Centrifugo connection may subscribe to (error 106 beyond).
    pub max_subscriptions_per_connection: usize,
    /// Commands a Centrifugo connection may send per second, on average (error 111
    /// beyond; `rate_limit_strikes` refusals in a row disconnect it with 3013).
    pub commands_per_sec: f64,
    /// Commands a Centrifugo connection may send in a burst.
    pub commands_burst: u32,
    /// Seconds after a ping without any answer before the client is dropped.
    pub pong_timeout_secs: u64,
    /// Seconds a client has to send its complete request head.
    pub handshake_timeout_secs: u64,
    /// Seconds shutdown waits for connections to finish their close handshakes.
    pub drain_timeout_secs: u64,
    /// Seconds to wait for a client's Close reply.
    pub close_timeout_secs: u64,
    /// Accept permessage-deflate (RFC 7692) when a client offers it.
    pub compression: bool,
    /// zlib level for compressed messages, 0-9.
    pub compression_level: u32,
    /// Largest window the server compresses with, 9-15 bits (15 = 32 KiB; smaller
    /// windows hold less memory per connection).
    pub compression_window_bits: u8,
    /// Compress each message on its own (`server_no_context_takeover`): less memory kept
    /// per connection, larger messages.
    pub compression_no_context_takeover: bool,
    /// Ask clients to compress each message on their own (`client_no_context_takeover`),
    /// so the server keeps no decompression history per connection. Client messages are
    /// short; this costs little ratio and saves the decompressor's memory.
    pub compression_client_no_context_takeover: bool,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub compression_min_size: usize,
    /// Seconds without traffic after which a connection frees its compressor.
    pub compression_idle_release_secs: u64,
    /// `[[apps]]`: the Pusher door's applications. None: one open-mode app (id `1`, key
    /// `app-key`, secret `app-secret`).
    pub apps: Vec<PusherApp>,
    /// The `activity_timeout` the Pusher door announces: seconds of silence after which
    /// a client pings.
    pub activity_timeout_secs: u64,
    /// Largest event the Pusher door takes (a client event's data, or an HTTP API
    /// event's), in bytes.
    pub max_event_bytes: usize,
    /// Client events a Pusher connection may send per second, on average (4301 beyond).
    pub client_events_per_sec: f64,
}

/// One application of the Pusher door (`[[apps]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PusherApp {
    /// A numeric string, as the libraries expect.
    pub id: String,
    pub key: String,
    pub secret: String,
    /// Where this app's webhooks go.
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
    /// Milliseconds `member_removed` and `channel_vacated` wait; a user or subscriber
    /// back within it causes neither.
    #[serde(default = "default_leave_delay")]
    pub webhook_leave_delay_ms: u64,
}

fn default_leave_delay() -> u64 {
    3000
}

impl PusherApp {
    pub fn new(id: &str, key: &str, secret: &str) -> Self {
        Self {
            id: id.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
            webhooks: Vec::new(),
            webhook_leave_delay_ms: default_leave_delay(),
        }
    }
}

/// A webhook endpoint of an app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Webhook {
    pub url: String,
    /// The events it gets (`channel_occupied`, `channel_vacated`, `member_added`,
    /// `member_removed`, `client_event`); none given: all of them.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 1000,
            handshakes_per_ip_per_sec: 100.0,
            handshake_burst_per_ip: 200,
            max_header_bytes: 16 * 1024,
            tls_cert: None,
            tls_key: None,
            http2: true,
            http2_max_streams: 100,
            echo_max_message: 16 << 20,
            data_dir: None,
            redis: Vec::new(),
            redis_cluster: Vec::new(),
            redis_prefix: "switchboard".into(),
            presence_expiry_secs: 15,
            redis_timeout_ms: 3000,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 1000,
            room_max_message: 64 * 1024,
            max_text_chars: 4096,
            channels: ChannelOptions::default(),
            namespaces: NamespaceTable::default(),
            nonce_ttl_secs: 86_400,
            recent_on_join: 50,
            outbound_queue: 4096,
            jwt_secret: None,
            jwt_public_key_file: None,
            api_key: None,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            forwarded_header: "x-forwarded-for".to_owned(),
            proxy_protocol: false,
            typing_expiry_ms: 5000,
            rate_limit_per_sec: 20.0,
            rate_limit_burst: 40,
            rate_limit_strikes: 20,
            ping_interval_secs: 25,
            max_subscriptions_per_connection: 128,
            commands_per_sec: 100.0,
            commands_burst: 200,
            pong_timeout_secs: 60,
            handshake_timeout_secs: 10,
            drain_timeout_secs: 10,
            close_timeout_secs: 5,
            compression: true,
            compression_level: 3,
            compression_window_bits: 15,
            compression_no_context_takeover: false,
            compression_client_no_context_takeover: true,
            compression_min_size: 0,
            compression_idle_release_secs: 10,
            apps: Vec::new(),
            activity_timeout_secs: 30,
            max_event_bytes: 10 * 1024,
            client_events_per_sec: 10.0,
        }
    }
}

impl Config {
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// Limits per IP address: open connections, and new connections per second with
    /// their burst (0 turns a limit off).
    pub fn with_per_ip_limits(mut self, connections: usize, per_sec: f64, burst: u32) -> Self {
        self.max_connections_per_ip = connections;
        self.handshakes_per_ip_per_sec = per_sec;
        self.handshake_burst_per_ip = burst;
        self
    }

    /// Serves TLS with the certificate chain and key in these PEM files.
    pub fn with_tls(mut self, cert: std::path::PathBuf, key: std::path::PathBuf) -> Self {
        self.tls_cert = Some(cert);
        self.tls_key = Some(key);
        self
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout_secs = timeout.as_secs().max(1);
        self
    }

    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout_secs = timeout.as_secs().max(1);
        self
    }

    /// Stores room history in SQLite under `dir` (`None`: in memory).
    pub fn with_redis(mut self, url: Option<String>) -> Self {
        self.redis = url.into_iter().collect();
        self
    }

    /// Shares channels over these standalone Redis servers.
    pub fn with_redis_shards(mut self, urls: Vec<String>) -> Self {
        self.redis = urls;
        self
    }

    /// Shares channels over the Redis Cluster these nodes belong to.
    pub fn with_redis_cluster(mut self, seeds: Vec<String>) -> Self {
        self.redis_cluster = seeds;
        self
    }

    pub fn with_data_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.data_dir = dir;
        self
    }

    pub fn with_outbound_queue(mut self, events: usize) -> Self {
        self.outbound_queue = events;
        self
    }

    pub fn with_jwt_secret(mut self, secret: Option<String>) -> Self {
        self.jwt_secret = secret;
        self
    }

    pub fn with_jwt_public_key_file(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.jwt_public_key_file = path;
        self
    }

    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }

    pub fn with_allowed_origins(mut self, origins: Vec<String>) -> Self {
        self.allowed_origins = origins;
        self
    }

    /// The options of channels outside every namespace, and the namespaces.
    pub fn with_channels(mut self, channels: ChannelOptions, namespaces: NamespaceTable) -> Self {
        self.channels = channels;
        self.namespaces = namespaces;
        self
    }

    pub fn with_rate_limit(mut self, per_sec: f64, burst: u32) -> Self {
        self.rate_limit_per_sec = per_sec;
        self.rate_limit_burst = burst;
        self
    }

    /// The Pusher door's applications (none: the open-mode app).
    pub fn with_apps(mut self, apps: Vec<PusherApp>) -> Self {
        self.apps = apps;
        self
    }

    pub fn with_compression(mut self, on: bool) -> Self {
        self.compression = on;
        self
    }

    /// The limits rooms announce in their welcome.
    pub(crate) fn limits(&self) -> switchboard_protocol::room::Limits {
        switchboard_protocol::room::Limits {
            events_per_sec: self.rate_limit_per_sec,
            burst: self.rate_limit_burst,
            max_text_chars: self.max_text_chars,
        }
    }

    fn deflate(&self) -> Option<DeflateConfig> {
        self.compression.then(|| {
            DeflateConfig::default()
                .with_level(self.compression_level)
                .with_max_window_bits(self.compression_window_bits)
                .with_no_context_takeover(self.compression_no_context_takeover)
                .with_request_peer_no_context_takeover(self.compression_client_no_context_takeover)
                .with_min_size(self.compression_min_size)
        })
    }

    pub(crate) fn socket_config(&self, max_message: usize) -> switchboard_net::Config {
        let wire = switchboard_net::wire::Config::default()
            .with_max_message_size(max_message)
            .with_max_frame_size(max_message);
        switchboard_net::Config::default()
            .with_wire(wire)
            .with_deflate(self.deflate())
            .with_idle_release(Some(Duration::from_secs(
                self.compression_idle_release_secs.max(1),
            )))
            .with_ping_interval(Some(Duration::from_secs(self.ping_interval_secs.max(1))))
            .with_pong_timeout(Duration::from_secs(self.pong_timeout_secs.max(1)))
            .with_close_timeout(Duration::from_secs(self.close_timeout_secs.max(1)))
    }
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match serde::Deserialize::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}
