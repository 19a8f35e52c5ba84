//! `--ca FILE` for the commands that connect: which certificate authority `wss://` trusts.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use switchboard_net::tls::{client_config, ClientConfig};

#[derive(Debug, Args)]
pub(crate) struct CaArg {
    /// PEM file with the certificate authority (or self-signed certificate) to trust for
    /// wss:// instead of the system's root certificates.
    #[arg(long, value_name = "FILE", env = "SWITCHBOARD_CA")]
    ca: Option<PathBuf>,
}

impl CaArg {
    /// `options` trusting `--ca` when given (the system's roots otherwise).
    pub(crate) fn apply(
        &self,
        options: switchboard_client::Options,
    ) -> anyhow::Result<switchboard_client::Options> {
        Ok(match self.tls()? {
            Some(tls) => options.with_tls(tls),
            None => options,
        })
    }

    /// The TLS settings to use, or `None` for the system's roots.
    pub(crate) fn tls(&self) -> anyhow::Result<Option<Arc<ClientConfig>>> {
        self.ca
            .as_deref()
            .map(|path| {
                client_config(Some(path)).with_context(|| format!("--ca {}", path.display()))
            })
            .transpose()
    }
}
