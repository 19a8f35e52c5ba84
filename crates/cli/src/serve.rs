//! `switchboard serve`: flags, environment and config file merged into the server config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    listen: Option<SocketAddr>,
    /// TOML config file; flags and SWITCHBOARD_* variables override what it says.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Connections beyond which new ones are refused with 503 [default: 100000]
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Directory for room history (SQLite) [default: ./switchboard-data]
    #[arg(long, env = "SWITCHBOARD_DATA_DIR", conflicts_with = "memory")]
    data_dir: Option<PathBuf>,
    /// Keep room history in memory only (lost at exit).
    #[arg(long, env = "SWITCHBOARD_MEMORY")]
    memory: bool,
    /// Join a cluster over this Redis (redis://HOST:PORT): rooms, history and presence
    /// are shared with every node on it. Given several times (or comma-separated),
    /// standalone servers that share the channels between them.
    #[arg(long, env = "SWITCHBOARD_REDIS", value_delimiter = ',')]
    redis: Vec<String>,
    /// Join a cluster over this Redis Cluster (any of its nodes, comma-separated, as
    /// seeds): each channel on the shard that owns its hash slot.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_CLUSTER",
        value_delimiter = ',',
        conflicts_with = "redis"
    )]
    redis_cluster: Vec<String>,
    /// Require a JWT signed with this HS256 secret to join rooms.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Require a JWT signed with the RS256 key whose public half is in this PEM file.
    #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<PathBuf>,
    /// Require this key on the HTTP API (Authorization: Bearer KEY).
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// PEM certificate chain: serve TLS only (https://, wss://); needs --tls-key.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Open connections one IP address may hold; 0: no limit [default: 1000]
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// New connections one IP address may open per second (bursts of twice this);
    /// 0: no limit [default: 100]
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_RATE_PER_IP")]
    handshake_rate_per_ip: Option<f64>,
    /// A proxy (address or CIDR range) whose X-Forwarded-For or Forwarded header names
    /// the client; given several times or comma-separated.
    #[arg(long, env = "SWITCHBOARD_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxy: Vec<String>,
    /// Connections from the trusted proxies start with a PROXY protocol header
    /// (HAProxy, AWS NLB) naming the client.
    #[arg(long, env = "SWITCHBOARD_PROXY_PROTOCOL")]
    proxy_protocol: bool,
    /// Runtime worker threads [default: one per core]
    #[arg(long, env = "SWITCHBOARD_WORKERS")]
    pub(crate) workers: Option<usize>,
    /// Seconds shutdown waits for connections to close [default: 10]
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT")]
    drain_timeout: Option<u64>,
}

/// Reads the config file: `listen` beside the server's own settings, every key checked.
fn read_config_file(
    path: Option<&Path>,
) -> anyhow::Result<(switchboard_server::Config, Option<SocketAddr>, bool)> {
    let Some(path) = path else {
        return Ok((switchboard_server::Config::default(), None, false));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_config(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_config(
    text: &str,
) -> anyhow::Result<(switchboard_server::Config, Option<SocketAddr>, bool)> {
    let mut table = text.parse::<toml::Table>()?;
    let memory = match table.remove("memory") {
        None => false,
        Some(value) => value.as_bool().context("`memory` must be true or false")?,
    };
    let listen = match table.remove("listen") {
        None => None,
        Some(value) => Some(
            value
                .as_str()
                .and_then(|s| s.parse::<SocketAddr>().ok())
                .context("`listen` must be an address such as \"127.0.0.1:8080\"")?,
        ),
    };
    Ok((table.try_into()?, listen, memory))
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (mut config, file_listen, file_memory) = read_config_file(args.config.as_deref())?;
    // History: a flag or variable beats the file, which beats the default directory.
    let file_has_data_dir = config.data_dir.is_some();
    if args.memory {
        config = config.with_data_dir(None);
    } else if let Some(dir) = args.data_dir {
        config = config.with_data_dir(Some(dir));
    } else if !file_has_data_dir && !file_memory {
        config = config.with_data_dir(Some(PathBuf::from("./switchboard-data")));
    }
    if !args.redis.is_empty() {
        config = config.with_redis_shards(args.redis);
    }
    if !args.redis_cluster.is_empty() {
        config = config.with_redis_cluster(args.redis_cluster);
    }
    if let Some(secret) = args.jwt_secret {
        config = config.with_jwt_secret(Some(secret));
    }
    if let Some(path) = args.jwt_public_key {
        config = config.with_jwt_public_key_file(Some(path));
    }
    if let Some(key) = args.api_key {
        config = config.with_api_key(Some(key));
    }
    if let Some(max) = args.max_connections {
        config = config.with_max_connections(max);
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config = config.with_tls(cert, key);
    }
    if let Some(max) = args.max_connections_per_ip {
        config.max_connections_per_ip = max;
    }
    if let Some(rate) = args.handshake_rate_per_ip {
        config.handshakes_per_ip_per_sec = rate;
        config.handshake_burst_per_ip = (rate * 2.0).ceil() as u32;
    }
    if !args.trusted_proxy.is_empty() {
        config.trusted_proxies = args.trusted_proxy;
    }
    if args.proxy_protocol {
        config.proxy_protocol = true;
    }
    if let Some(secs) = args.drain_timeout {
        config = config.with_drain_timeout(std::time::Duration::from_secs(secs));
    }
    let listen = args
        .listen
        .or(file_listen)
        .unwrap_or_else(|| ([127, 0, 0, 1], 8080).into());
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    switchboard_server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT (ctrl-c) or SIGTERM. The handlers are in place when this returns,
/// before the server says it listens: a signal that comes right after is a clean stop.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = signal(SignalKind::interrupt()).and_then(|interrupt| {
            signal(SignalKind::terminate()).map(|terminate| (interrupt, terminate))
        });
        async move {
            match signals {
                Ok((mut interrupt, mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                Err(error) => {
                    tracing::warn!(cause = %error, "cannot listen for signals; ctrl-c only");
                    if tokio::signal::ctrl_c().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_keys() {
        let (config, listen, memory) = parse_config(
            "listen = \"0.0.0.0:9000\"\nmax_connections = 5\ncompression = false\nmemory = true\n",
        )
        .unwrap();
        assert!(memory);
        assert_eq!(listen, Some("0.0.0.0:9000".parse().unwrap()));
        assert_eq!(config.max_connections, 5);
        assert!(!config.compression);
        let (config, listen, _) = parse_config("").unwrap();
        assert_eq!((listen, config.max_connections), (None, 100_000));
        assert!(parse_config("bogus = 1").is_err());
        assert!(parse_config("listen = 8080").is_err());
        assert!(parse_config("max_connections = \"many\"").is_err());
    }

    #[test]
    fn the_readmes_config_examples_are_valid_config_files() {
        let readme = include_str!("../../../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|rest| rest.split("```").next().unwrap())
            .collect();
        assert!(blocks.len() >= 4, "{} blocks", blocks.len());
        let mut apps = 0;
        for block in blocks {
            match parse_config(block) {
                Ok((config, _, _)) => {
                    apps += config.apps.iter().map(|a| a.webhooks.len()).sum::<usize>()
                }
                Err(error) => panic!("README config example does not parse: {error:#}\n{block}"),
            }
        }
        assert_eq!(apps, 2, "the [[apps]] example's two webhooks");
    }
}
