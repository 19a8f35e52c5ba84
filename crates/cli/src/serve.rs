//! `switchboard serve`: flags, environment and config file merged into the server config.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
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
    /// Seconds shutdown waits for connections to close [default: 10]
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT")]
    drain_timeout: Option<u64>,
}

/// The config file: `listen` beside the server's own settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    #[serde(flatten)]
    server: Option<toml::Table>,
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let mut config: switchboard_server::Config = match file.server {
        Some(table) if !table.is_empty() => table.try_into().context("in the config file")?,
        _ => switchboard_server::Config::default(),
    };
    if let Some(max) = args.max_connections {
        config = config.with_max_connections(max);
    }
    if let Some(secs) = args.drain_timeout {
        config = config.with_drain_timeout(std::time::Duration::from_secs(secs));
    }
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| ([127, 0, 0, 1], 8080).into());
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    switchboard_server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT (ctrl-c) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(cause = %error, "cannot listen for SIGTERM; ctrl-c still works");
                    if let Err(error) = interrupt.await {
                        tracing::warn!(cause = %error, "cannot listen for ctrl-c");
                        std::future::pending::<()>().await;
                    }
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
