//! The accept loop: TLS, the connection caps (in all and per IP address), the handshake
//! rate per address, the request-head limits, and graceful shutdown.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchboard_net::tls::TlsAcceptor;
use switchboard_net::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use switchboard_engine::{
    Engine, EngineConfig, MemoryStore, Namespaces, RedisConfig, RedisTopology, SqliteStore, Store,
};

use crate::config::Config;
use crate::limits::{IpSlot, PerIp, Refusal};
use crate::routes::router;
use crate::shutdown::Shutdown;
use switchboard_protocol::proxy::{
    forwarded_client, parse_proxy_header, Cidr, ForwardingHeader, ProxyError, ProxyHeader,
    V2_SIGNATURE,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
    #[error("history store: {0}")]
    Store(#[from] switchboard_engine::StoreError),
    #[error("joining the cluster: {0}")]
    Cluster(#[from] switchboard_engine::EngineError),
    #[error("namespaces: {0}")]
    Namespaces(String),
    #[error("authentication: {0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    #[error(transparent)]
    Apps(#[from] crate::pusher::AppsError),
    #[error("TLS: {0}")]
    Tls(#[from] switchboard_net::tls::TlsError),
    #[error("TLS needs both tls_cert and tls_key")]
    TlsHalf,
    #[error("redis and redis_cluster were both given: a node uses one or the other")]
    RedisTwice,
    #[error("trusted_proxies: {0}")]
    TrustedProxies(String),
    #[error(
        "proxy_protocol needs trusted_proxies: the addresses whose PROXY headers are believed"
    )]
    ProxyProtocolAlone,
}

/// What every request handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) config: Arc<Config>,
    /// Channels and their history.
    pub(crate) engine: Engine,
    /// How room connections prove who they are.
    pub(crate) auth: Arc<crate::auth::Auth>,
    /// Cancelled when the server shuts down.
    pub(crate) shutdown: Shutdown,
    /// Every connection task, so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Cancelled when the drain timeout passes: tasks still running are stopped.
    pub(crate) kill: Shutdown,
    /// The Centrifugo door's connections on this node, for its server API.
    pub(crate) centrifuge_clients: Arc<crate::centrifuge::Clients>,
    /// The Centrifugo door's emulated sessions on this node, for `/emulation`.
    pub(crate) centrifuge_sessions: Arc<crate::centrifuge::Sessions>,
    /// The Pusher door's apps.
    pub(crate) pusher_apps: Arc<crate::pusher::Apps>,
    /// The Pusher door's connections on this node.
    pub(crate) pusher_registry: Arc<crate::pusher::Registry>,
    /// What the room protocol over HTTP keeps of its posters.
    pub(crate) room_posters: Arc<crate::room_http::Posters>,
}

impl AppState {
    /// Spawns a connection task that shutdown waits for and, past the drain timeout,
    /// stops.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let kill = self.kill.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                () = task => {}
                () = kill.stopping() => {}
            }
        });
    }
}

/// Held for as long as a request (and the WebSocket or stream it becomes) is open: its
/// connection's place under the server's cap and under its address's, and for a
/// request relayed by a trusted proxy, its client's place.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSlot {
    #[allow(dead_code)]
    connection: Arc<(OwnedSemaphorePermit, Option<IpSlot>)>,
    #[allow(dead_code)]
    client: Option<Arc<IpSlot>>,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit, ip_slot: Option<IpSlot>) -> Self {
        Self {
            connection: Arc::new((permit, ip_slot)),
            client: None,
        }
    }
}

/// The client a request came from: the connection's peer, or the address a PROXY
/// header or a trusted proxy's `Forwarded`/`X-Forwarded-For` named.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddress(pub(crate) IpAddr);

/// Which peers may say who the client is, and how.
#[derive(Debug)]
struct Proxies {
    trusted: Vec<Cidr>,
    /// Trusted peers start with a PROXY protocol header.
    protocol: bool,
    /// The header trusted proxies name the client in.
    header: ForwardingHeader,
}

impl Proxies {
    fn from_config(config: &Config) -> Result<Self, Error> {
        let trusted = config
            .trusted_proxies
            .iter()
            .map(|range| range.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::TrustedProxies)?;
        if config.proxy_protocol && trusted.is_empty() {
            return Err(Error::ProxyProtocolAlone);
        }
        let header = match config.forwarded_header.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => ForwardingHeader::XForwardedFor,
            "forwarded" => ForwardingHeader::Forwarded,
            other => {
                return Err(Error::TrustedProxies(format!(
                    "forwarded_header must be \"x-forwarded-for\" or \"forwarded\", not {other:?}"
                )))
            }
        };
        Ok(Self {
            trusted,
            protocol: config.proxy_protocol,
            header,
        })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|range| range.contains(ip))
    }

    /// The client of a request that came over a connection from `peer`.
    fn client_of<B>(&self, request: &http::Request<B>, peer: IpAddr) -> IpAddr {
        let lines = request
            .headers()
            .get_all(self.header.name())
            .iter()
            .filter_map(|value| value.to_str().ok());
        forwarded_client(peer, self.header, lines, |ip| self.trusts(ip))
    }
}

/// Serves on `listener` until `shutdown` completes, then closes every WebSocket with
/// 1001 and waits up to the drain timeout for connections to finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let address = listener.local_addr()?;
    let tls = tls_acceptor(&config)?;
    let proxies = Proxies::from_config(&config)?;
    crate::metrics::install();
    let auth = Arc::new(crate::auth::Auth::from_config(&config)?);
    let pusher_apps = Arc::new(crate::pusher::Apps::from_config(&config)?);
    if pusher_apps.is_empty() {
        info!("the Pusher door is off: tokens or an API key are set and [[apps]] is not");
    } else if config.apps.is_empty() {
        // Said at start, as the other open-mode defaults are; not a warning (the soak
        // and operators read warnings as something gone wrong).
        info!(
            "open mode: the Pusher door's app is id 1, key app-key, secret app-secret; set [[apps]] in the config for your own"
        );
    }
    let hooks = crate::pusher::webhooks::wanted(&pusher_apps).then(|| {
        switchboard_engine::HookConfig::new(crate::pusher::webhooks::leave_delay(&pusher_apps))
    });
    let engine = engine(&config, hooks).await?;
    let state = AppState {
        engine,
        auth,
        config: Arc::new(config),
        shutdown: Shutdown::default(),
        tasks: TaskTracker::new(),
        kill: Shutdown::default(),
        centrifuge_clients: Arc::default(),
        centrifuge_sessions: Arc::default(),
        pusher_apps,
        pusher_registry: Arc::default(),
        room_posters: Arc::default(),
    };
    tokio::spawn(crate::pusher::apply_notices(
        state.pusher_registry.clone(),
        state.engine.notices(),
    ));
    if state.engine.records_hooks() {
        let webhooks = crate::pusher::webhooks::run(
            state.engine.clone(),
            state.pusher_apps.clone(),
            state.shutdown.clone(),
        );
        tokio::spawn(webhooks);
    }
    tokio::spawn(crate::centrifuge::apply_notices(
        state.centrifuge_clients.clone(),
        state.engine.notices(),
    ));
    tokio::spawn(crate::centrifuge::apply_posts(
        state.clone(),
        state.engine.posts(),
    ));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let acceptor = Arc::new(Acceptor::new(&state, tls, proxies));
    info!("listening on {scheme}://{address}");
    acceptor.run(listener, shutdown).await;
    drain(&state).await;
    info!("stopped");
    Ok(())
}

/// The TLS acceptor of connections, and the one refusals are answered through (HTTP/1.1
/// only: a refusal is written as an HTTP/1.1 answer, whatever the client prefers).
fn tls_acceptor(config: &Config) -> Result<Option<(TlsAcceptor, TlsAcceptor)>, Error> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Ok(Some((
            TlsAcceptor::from(switchboard_net::tls::server_config(
                cert,
                key,
                config.http2,
            )?),
            TlsAcceptor::from(switchboard_net::tls::server_config(cert, key, false)?),
        ))),
        (None, None) => Ok(None),
        _ => Err(Error::TlsHalf),
    }
}

/// The channel engine the configuration asks for: over Redis, or on this node with
/// history in SQLite or in memory.
async fn engine(
    config: &Config,
    hooks: Option<switchboard_engine::HookConfig>,
) -> Result<Engine, Error> {
    let namespaces =
        Namespaces::new(config.channels.clone(), &config.namespaces).map_err(Error::Namespaces)?;
    let mut engine_config = EngineConfig::default().with_namespaces(namespaces);
    engine_config.recent_on_join = config.recent_on_join;
    engine_config.outbound_queue = config.outbound_queue;
    engine_config.nonce_ttl = Duration::from_secs(config.nonce_ttl_secs.max(1));
    engine_config.hooks = hooks;
    let topology = match (config.redis.is_empty(), config.redis_cluster.is_empty()) {
        (true, true) => None,
        (false, true) => Some(RedisTopology::Standalone(config.redis.clone())),
        (true, false) => Some(RedisTopology::Cluster(config.redis_cluster.clone())),
        (false, false) => return Err(Error::RedisTwice),
    };
    if let Some(topology) = topology {
        let said = match &topology {
            RedisTopology::Standalone(urls) => urls.join(", "),
            RedisTopology::Cluster(seeds) => format!("the Redis Cluster of {}", seeds.join(", ")),
            _ => String::new(),
        };
        let redis = RedisConfig::with_topology(topology)
            .with_prefix(config.redis_prefix.clone())
            .with_presence_expiry(Duration::from_secs(config.presence_expiry_secs.max(1)))
            .with_timeout(Duration::from_millis(config.redis_timeout_ms.max(100)))
            .with_wait_replicas(
                config.redis_wait_replicas,
                Duration::from_millis(config.redis_wait_timeout_ms.max(1)),
            );
        let engine = Engine::redis(redis, engine_config).await?;
        info!(redis = %said, "channel history and presence in Redis, shared with the other nodes");
        return Ok(engine);
    }
    let store: Arc<dyn Store> = match &config.data_dir {
        Some(dir) => {
            let store = SqliteStore::open_dir(dir)?;
            info!(path = %dir.display(), "channel history in SQLite");
            Arc::new(store)
        }
        None => {
            info!("channel history in memory (gone at exit)");
            Arc::new(MemoryStore::new())
        }
    };
    Ok(Engine::local(store, engine_config))
}

/// Takes connections in: the caps, TLS, and HTTP with its upgrades.
struct Acceptor {
    state: AppState,
    app: axum::Router,
    slots: Arc<Semaphore>,
    per_ip: Option<Arc<PerIp>>,
    tls: Option<TlsAcceptor>,
    /// Where refusals are answered (HTTP/1.1 only).
    refusal_tls: Option<TlsAcceptor>,
    refusals: Refusals,
    handshake_timeout: Duration,
    proxies: Arc<Proxies>,
}

impl Acceptor {
    fn new(state: &AppState, tls: Option<(TlsAcceptor, TlsAcceptor)>, proxies: Proxies) -> Self {
        let (tls, refusal_tls) =
            tls.map_or((None, None), |(main, refusal)| (Some(main), Some(refusal)));
        let config = &state.config;
        Self {
            state: state.clone(),
            app: router(state.clone()),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            per_ip: PerIp::new(
                config.max_connections_per_ip,
                config.handshakes_per_ip_per_sec,
                config.handshake_burst_per_ip,
            ),
            refusals: Refusals::new(refusal_tls.clone()),
            refusal_tls,
            tls,
            handshake_timeout: Duration::from_secs(config.handshake_timeout_secs.max(1)),
            proxies: Arc::new(proxies),
        }
    }

    /// Accepts until `shutdown` completes.
    async fn run(self: &Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors or a reset before accept: keep serving.
                        warn!(cause = %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            if let Err(error) = stream.set_nodelay(true) {
                debug!(cause = %error, %peer, "set_nodelay failed");
            }
            // The server's cap, and an untrusted peer's own limits, before a byte is read.
            let (permit, ip_slot) = match self.admit(peer.ip()) {
                Ok(parts) => parts,
                Err(why) => {
                    self.refusals.answer(&self.state, stream, peer, why);
                    continue;
                }
            };
            if !self.proxies.protocol {
                self.serve(stream, peer, ConnectionSlot::new(permit, ip_slot));
                continue;
            }
            // Who the client is comes in the connection's first bytes.
            let this = self.clone();
            self.state.spawn(async move {
                let Some((stream, client)) = this.proxy_header(stream, peer).await else {
                    return;
                };
                // A trusted proxy's client is limited as itself, now that it is known.
                let ip_slot = match (&this.per_ip, ip_slot) {
                    (Some(limits), None) if client != peer && !this.proxies.trusts(client.ip()) => {
                        match limits.admit(client.ip(), std::time::Instant::now()) {
                            Ok(slot) => Some(slot),
                            Err(why) => {
                                drop(permit);
                                this.refusals.answer(
                                    &this.state,
                                    stream,
                                    client,
                                    Refused::PerIp(why),
                                );
                                return;
                            }
                        }
                    }
                    (_, ip_slot) => ip_slot,
                };
                this.serve(stream, client, ConnectionSlot::new(permit, ip_slot));
            });
        }
    }

    /// Reads a PROXY protocol header off a connection from `peer` (within the handshake
    /// timeout): the client it names, or the peer itself when an untrusted peer sends
    /// none. A trusted peer without one, an untrusted peer with one and a malformed
    /// header are answered 400 and `None` is returned.
    async fn proxy_header(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TcpStream, SocketAddr)> {
        let trusted = self.proxies.trusts(peer.ip());
        let read = tokio::time::timeout(
            self.handshake_timeout,
            read_proxy_header(&mut stream, trusted),
        )
        .await;
        let refusal = match read {
            Err(_) | Ok(Err(ProxyRead::Gone)) => {
                debug!(%peer, "connection closed or timed out before its first bytes");
                return None;
            }
            Ok(Ok(Some(ProxyHeader::Proxied { source, .. }))) if trusted => {
                return Some((stream, source))
            }
            Ok(Ok(Some(ProxyHeader::Unknown))) if trusted => return Some((stream, peer)),
            Ok(Ok(None)) if !trusted => return Some((stream, peer)),
            Ok(Ok(None)) => {
                "a connection from a trusted proxy must start with a PROXY protocol header\n"
                    .to_owned()
            }
            Ok(Ok(Some(_))) => {
                "a PROXY protocol header from an address that is not a trusted proxy\n".to_owned()
            }
            Ok(Err(ProxyRead::Malformed(error))) => format!("{error}\n"),
        };
        metrics::counter!("switchboard_connections_refused_total", "reason" => "proxy_header")
            .increment(1);
        debug!(%peer, reason = refusal.trim_end(), "connection refused");
        let tls = self.refusal_tls.as_ref();
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, async move {
            if let Some(stream) = secure(stream, peer, tls, ANSWER_TIMEOUT).await {
                refuse(stream, "400 Bad Request", &refusal).await;
            }
        })
        .await;
        None
    }

    /// A place under the server's cap and under the address's limits, or why not. A
    /// trusted proxy is not limited as one client: each request it relays is admitted
    /// for the client it names once the request's head is read.
    fn admit(&self, ip: IpAddr) -> Result<(OwnedSemaphorePermit, Option<IpSlot>), Refused> {
        let ip_slot = self
            .per_ip
            .as_ref()
            .filter(|_| !self.proxies.trusts(ip))
            .map(|limits| limits.admit(ip, std::time::Instant::now()))
            .transpose()
            .map_err(Refused::PerIp)?;
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Capacity)?;
        Ok((permit, ip_slot))
    }

    /// Serves one admitted connection: TLS, then HTTP/1.1 with upgrades (or HTTP/2 where
    /// ALPN chose it, WebSockets as extended CONNECT streams), until it ends or shutdown
    /// closes it gracefully.
    fn serve(&self, stream: TcpStream, peer: SocketAddr, slot: ConnectionSlot) {
        let app = self.app.clone();
        let state = self.state.clone();
        let tls = self.tls.clone();
        let handshake_timeout = self.handshake_timeout;
        let proxies = self.proxies.clone();
        let per_ip = self.per_ip.clone();
        self.state.spawn(async move {
            // One budget for the TLS handshake and the request head together.
            let accepted = tokio::time::Instant::now();
            let Some(stream) = secure(stream, peer, tls.as_ref(), handshake_timeout).await else {
                return;
            };
            let head_timeout = handshake_timeout
                .saturating_sub(accepted.elapsed())
                .max(Duration::from_millis(100));
            let relayed = proxies.trusts(peer.ip());
            // Set by the first request: an HTTP/2 client that sends none within the
            // handshake timeout is dropped (hyper's HTTP/2 has no head timeout).
            let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let first_request = requested.clone();
            let h2 = matches!(
                &stream,
                Stream::TlsServer(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2")
            );
            let service = hyper::service::service_fn(
                move |mut request: http::Request<hyper::body::Incoming>| {
                    requested.store(true, std::sync::atomic::Ordering::Relaxed);
                    let tunnel = crate::upgrade::mark_extended_connect(&mut request);
                    let mut slot = slot.clone();
                    let client = if relayed {
                        proxies.client_of(&request, peer.ip())
                    } else {
                        peer.ip()
                    };
                    // A request relayed by a trusted proxy, or a stream of an HTTP/2
                    // connection (which carries many), is admitted on its own: it holds
                    // a place of its client's while it runs.
                    let admitted = match (&per_ip, relayed || h2) {
                        (Some(limits), true) => limits
                            .admit(client, std::time::Instant::now())
                            .map(|client| slot.client = Some(Arc::new(client))),
                        _ => Ok(()),
                    };
                    request.extensions_mut().insert(slot);
                    request.extensions_mut().insert(ClientAddress(client));
                    let app = app.clone();
                    async move {
                        if let Err(refusal) = admitted {
                            metrics::counter!(
                                "switchboard_connections_refused_total",
                                "reason" => refusal.label()
                            )
                            .increment(1);
                            debug!(%client, reason = refusal.label(), "request refused");
                            return Ok(refused_request(refusal));
                        }
                        let response = app.oneshot(request).await;
                        match response {
                            Ok(response) if tunnel => Ok(crate::upgrade::tunnel_answer(response)),
                            other => other,
                        }
                    }
                },
            );
            let config = &state.config;
            if h2 {
                metrics::counter!("switchboard_http_connections_total", "version" => "2")
                    .increment(1);
                let ping = Duration::from_secs(config.ping_interval_secs.max(1));
                let connection = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .enable_connect_protocol()
                    .max_concurrent_streams(config.http2_max_streams.max(1))
                    .max_header_list_size(
                        u32::try_from(config.max_header_bytes.max(8192)).unwrap_or(u32::MAX),
                    )
                    // Fixed windows, not adaptive ones: h2 closes a connection whose
                    // small DATA frames (a WebSocket sending 64-byte frames) outrun a
                    // budget of half the connection window, and an adaptive window
                    // starts at 64 KiB. 1 MiB a stream, 4 MiB a connection.
                    .initial_stream_window_size(1 << 20)
                    .initial_connection_window_size(4 << 20)
                    // HTTP/2 pings keep a quiet connection alive through proxies, and
                    // find a peer that went away.
                    .keep_alive_interval(ping)
                    .keep_alive_timeout(Duration::from_secs(config.pong_timeout_secs.max(1)))
                    .serve_connection(TokioIo::new(stream), service);
                let served = drive(connection, |c| c.graceful_shutdown(), &state, peer);
                tokio::pin!(served);
                tokio::select! {
                    () = &mut served => {}
                    () = tokio::time::sleep(head_timeout) => {
                        if first_request.load(std::sync::atomic::Ordering::Relaxed) {
                            served.await;
                        } else {
                            metrics::counter!("switchboard_handshake_failures_total", "reason" => "timeout")
                                .increment(1);
                            debug!(%peer, "an HTTP/2 connection sent no request in time");
                        }
                    }
                }
            } else {
                metrics::counter!("switchboard_http_connections_total", "version" => "1.1")
                    .increment(1);
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(head_timeout)
                    // A head that does not fit is answered with 431 (as are more than 100
                    // header lines).
                    .max_buf_size(config.max_header_bytes.max(8192))
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                drive(connection, |c| c.graceful_shutdown(), &state, peer).await;
            }
        });
    }
}

/// Runs `connection` (of either HTTP version) to its end; shutdown ends it with
/// `graceful`.
async fn drive<C>(
    connection: C,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
    state: &AppState,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(cause = %error, %peer, "http connection ended with an error");
            }
        }
        () = state.shutdown.stopping() => {
            graceful(connection.as_mut());
            if let Err(error) = connection.await {
                debug!(cause = %error, %peer, "http connection ended during shutdown");
            }
        }
    }
}

/// Closes every connection (WebSockets with 1001), waits up to the drain timeout, then
/// leaves the cluster and stores everything taken before returning.
async fn drain(state: &AppState) {
    info!("shutting down: closing connections");
    state.shutdown.start();
    state.tasks.close();
    let drain = Duration::from_secs(state.config.drain_timeout_secs.max(1));
    if tokio::time::timeout(drain, state.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = state.tasks.len(),
            "drain timeout passed; dropping the remaining connections"
        );
        state.kill.start();
        // Each task stops at its next poll.
        if tokio::time::timeout(Duration::from_secs(1), state.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = state.tasks.len(),
                "connections still running after being stopped"
            );
        }
    }
    // This node's users leave the cluster's member lists now, not at the expiry.
    state.engine.depart().await;
    // Everything accepted is stored before the process goes.
    let engine = state.engine.clone();
    if let Err(cause) = tokio::task::spawn_blocking(move || engine.shutdown()).await {
        warn!(%cause, "flushing channel history failed");
    }
}

/// The stream to speak HTTP on: the TCP stream itself, or a TLS session over it once
/// the client's TLS handshake completes (within the handshake timeout).
async fn secure(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<&TlsAcceptor>,
    timeout: Duration,
) -> Option<Stream> {
    let Some(acceptor) = tls else {
        return Some(Stream::Plain(tcp));
    };
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(session)) => Some(Stream::TlsServer(Box::new(session))),
        Ok(Err(cause)) => {
            metrics::counter!("switchboard_handshake_failures_total", "reason" => "tls")
                .increment(1);
            debug!(%cause, %peer, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!("switchboard_handshake_failures_total", "reason" => "timeout")
                .increment(1);
            debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy)]
enum Refused {
    PerIp(Refusal),
    Capacity,
}

/// Answers connections that are not admitted, a bounded number at a time: beyond that,
/// or for a client over its handshake rate on a TLS port (whose answer would cost a TLS
/// handshake), the connection is closed unanswered.
struct Refusals {
    answering: Arc<Semaphore>,
    tls: Option<TlsAcceptor>,
}

/// Refusals being answered at once, at most.
const MAX_ANSWERING: usize = 256;
/// Bound on answering one refusal (its TLS handshake, the answer, the client's close).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals")
            .field("answering", &self.answering)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Refusals {
    fn new(tls: Option<TlsAcceptor>) -> Self {
        Self {
            answering: Arc::new(Semaphore::new(MAX_ANSWERING)),
            tls,
        }
    }

    fn answer(&self, state: &AppState, stream: TcpStream, peer: SocketAddr, why: Refused) {
        let (label, status, body) = match why {
            Refused::PerIp(refusal) => {
                (refusal.label(), "429 Too Many Requests", refusal.message())
            }
            Refused::Capacity => (
                "capacity",
                "503 Service Unavailable",
                "server is at its connection limit; try again later\n",
            ),
        };
        metrics::counter!("switchboard_connections_refused_total", "reason" => label).increment(1);
        debug!(%peer, reason = label, "connection refused");
        if matches!(why, Refused::PerIp(Refusal::TooFast)) && self.tls.is_some() {
            return;
        }
        let Ok(permit) = self.answering.clone().try_acquire_owned() else {
            return;
        };
        let tls = self.tls.clone();
        state.spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
                if let Some(stream) = secure(stream, peer, tls.as_ref(), ANSWER_TIMEOUT).await {
                    refuse(stream, status, body).await;
                }
            })
            .await;
        });
    }
}

/// Answers a connection that is not admitted and closes it. What the client sent is
/// read and dropped until it closes too: closing with its request unread would reset
/// the connection, and the client could miss the answer.
async fn refuse(mut stream: impl AsyncRead + AsyncWrite + Unpin, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A refused client that already left needs no answer.
    if stream.write_all(response.as_bytes()).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// The answer to a request a trusted proxy relayed for a client over its limits.
fn refused_request(refusal: Refusal) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        http::StatusCode::TOO_MANY_REQUESTS,
        [(http::header::RETRY_AFTER, "1")],
        refusal.message(),
    )
        .into_response()
}

/// Why no PROXY header could be read.
#[derive(Debug)]
enum ProxyRead {
    /// The connection closed first.
    Gone,
    Malformed(ProxyError),
}

/// The PROXY header at the start of `stream`, consumed (`None`, and nothing consumed,
/// when the connection starts otherwise). The bytes are peeked until the header is
/// whole, so what follows it stays in the socket for TLS or HTTP.
/// From an untrusted peer, bytes that begin one are answered at once (as a header,
/// unread): nothing is held for them.
async fn read_proxy_header(
    stream: &mut TcpStream,
    trusted: bool,
) -> Result<Option<ProxyHeader>, ProxyRead> {
    let mut buffer = vec![0u8; 256];
    let mut seen = 0;
    loop {
        let peeked = stream
            .peek(&mut buffer)
            .await
            .map_err(|_| ProxyRead::Gone)?;
        if peeked == 0 {
            return Err(ProxyRead::Gone);
        }
        let bytes = &buffer[..peeked];
        if !trusted && (bytes.starts_with(b"PROXY ") || bytes.starts_with(&V2_SIGNATURE)) {
            return Ok(Some(ProxyHeader::Unknown));
        }
        match parse_proxy_header(&buffer[..peeked]) {
            Ok((header, taken)) => {
                let mut header_bytes = vec![0u8; taken];
                stream
                    .read_exact(&mut header_bytes)
                    .await
                    .map_err(|_| ProxyRead::Gone)?;
                return Ok(Some(header));
            }
            Err(ProxyError::Absent) => return Ok(None),
            Err(ProxyError::Incomplete(needed)) => {
                if needed > buffer.len() {
                    buffer.resize(needed, 0);
                } else if peeked == seen {
                    // Nothing new since the last look: wait a little for the rest.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen = peeked;
            }
            Err(error) => return Err(ProxyRead::Malformed(error)),
        }
    }
}
