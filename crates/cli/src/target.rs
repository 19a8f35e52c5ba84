//! The room a command joins, and as whom: what `chat` and `send` share.

use anyhow::{bail, Context};
use clap::Args;
use switchboard_client::{connect, Events, Options, RoomClient};

#[derive(Debug, Args)]
pub(crate) struct RoomTarget {
    /// Room URL, such as ws://127.0.0.1:8080/room/lobby (or wss:// for TLS)
    url: String,
    #[command(flatten)]
    ca: crate::tls::CaArg,
    /// The name to join as (in open mode; with --token the name comes from the token).
    #[arg(long)]
    name: Option<String>,
    /// JWT for servers with auth (sent as `Authorization: Bearer`).
    #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl RoomTarget {
    /// Joins the room with `options` and this target's name, token and CA.
    pub(crate) async fn join(&self, options: Options) -> anyhow::Result<(RoomClient, Events)> {
        if self.name.is_none() && self.token.is_none() {
            bail!("give --name (or --token on a server with auth)");
        }
        let mut options = options;
        if let Some(name) = &self.name {
            options = options.with_name(name);
        }
        if let Some(token) = &self.token {
            options = options.with_token(token);
        }
        let options = self.ca.apply(options)?;
        connect(&self.url, options)
            .await
            .with_context(|| format!("joining {}", self.url))
    }
}
