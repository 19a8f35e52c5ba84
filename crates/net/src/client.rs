//! Client connections: `ws://` and `wss://` URL parsing, TLS, the upgrade request and the
//! answer's checks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchboard_wire::deflate::{self, DeflateConfig, DeflateParams};
use switchboard_wire::handshake::{
    client_key, parse_response, validate_response, Accepted, ClientRequest, HandshakeError,
};
use switchboard_wire::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::Config;
use crate::error::Error;
use crate::socket::WebSocket;
use crate::stream::Stream;

const MAX_HEAD: usize = 16 * 1024;

/// How to connect.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    pub config: Config,
    pub connect_timeout: Duration,
    pub protocols: Vec<String>,
    pub origin: Option<String>,
    /// Extra request headers, such as `Authorization`.
    pub headers: Vec<(String, String)>,
    /// The local address to connect from (any port): spreading many connections over
    /// several source addresses gets past one address's ephemeral ports.
    pub local_address: Option<IpAddr>,
    /// TLS settings for `wss://` URLs; `None` trusts the system's root certificates
    /// (see [`crate::tls::client_config`] for a CA file of your own).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            // Servers ping clients; a client pings only when asked to. A client compresses
            // each message on its own: its messages are short, so history buys little, and
            // the server need keep no decompression history for it.
            config: Config::default()
                .with_ping_interval(None)
                .with_deflate(Some(
                    DeflateConfig::default().with_no_context_takeover(true),
                )),
            connect_timeout: Duration::from_secs(10),
            protocols: Vec::new(),
            origin: None,
            headers: Vec::new(),
            local_address: None,
            tls: None,
        }
    }
}

impl ClientOptions {
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Trusts these TLS settings for `wss://` URLs.
    pub fn with_tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// An open client connection and what the server agreed to.
#[derive(Debug)]
pub struct Connected {
    pub socket: WebSocket<Stream>,
    pub accepted: Accepted,
}

struct Target {
    host: String,
    port: u16,
    path: String,
    tls: bool,
}

fn parse_url(url: &str) -> Result<Target, Error> {
    let invalid = |reason| Error::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    let (default_port, tls) = match uri.scheme_str() {
        Some("ws") => (80, false),
        Some("wss") => (443, true),
        _ => return Err(invalid("the scheme must be ws:// or wss://")),
    };
    let host = uri.host().ok_or_else(|| invalid("no host"))?.to_owned();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok(Target {
        host,
        port: uri.port_u16().unwrap_or(default_port),
        path,
        tls,
    })
}

/// Connects to a `ws://` or `wss://host[:port]/path` URL and performs the handshake.
pub async fn connect(url: &str, options: ClientOptions) -> Result<Connected, Error> {
    let target = parse_url(url)?;
    let default_port = if target.tls { 443 } else { 80 };
    let host_header = if target.port == default_port {
        target.host.clone()
    } else {
        format!("{}:{}", target.host, target.port)
    };
    let address = (
        target.host.trim_start_matches('[').trim_end_matches(']'),
        target.port,
    );
    let tcp = tokio::time::timeout(
        options.connect_timeout,
        open(address, options.local_address),
    )
    .await
    .map_err(|_| Error::Timeout("connecting"))??;
    tcp.set_nodelay(true)?;
    let mut stream = if target.tls {
        let tls = match &options.tls {
            Some(tls) => tls.clone(),
            None => crate::tls::client_config(None)?,
        };
        let name = rustls::pki_types::ServerName::try_from(address.0.to_owned()).map_err(|_| {
            Error::InvalidUrl {
                url: url.to_owned(),
                reason: "the host is not a valid TLS server name",
            }
        })?;
        let session = tokio_rustls::TlsConnector::from(tls).connect(name, tcp);
        let session = tokio::time::timeout(options.connect_timeout, session)
            .await
            .map_err(|_| Error::Timeout("the TLS handshake"))??;
        Stream::TlsClient(Box::new(session))
    } else {
        Stream::Plain(tcp)
    };

    let mut rng = StdRng::from_os_rng();
    let mut request = ClientRequest::new(host_header, target.path, client_key(rng.random()));
    request.protocols = options.protocols.clone();
    request.origin = options.origin.clone();
    request.headers = options.headers.clone();
    request.extensions = options.config.deflate.as_ref().map(deflate::offer);

    let handshake = async {
        stream.write_all(&request.to_bytes()).await?;
        // TLS may hold the bytes back until flushed.
        stream.flush().await?;
        let mut buf = Vec::with_capacity(1024);
        loop {
            if let Some((head, len)) = parse_response(&buf, MAX_HEAD)? {
                let offered: &[&str] = if request.extensions.is_some() {
                    &[deflate::NAME]
                } else {
                    &[]
                };
                let accepted = validate_response(&head, &request, offered)?;
                return Ok::<_, Error>((accepted, buf.split_off(len)));
            }
            let mut chunk = [0u8; 2048];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(HandshakeError::Malformed(
                    "connection closed during the handshake".into(),
                )
                .into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (accepted, leftover) = tokio::time::timeout(options.connect_timeout, handshake)
        .await
        .map_err(|_| Error::Timeout("waiting for the handshake answer"))??;

    let mut conn = Connection::client(options.config.wire.clone(), rng.random());
    if let Some(params) = agreed_deflate(&accepted, options.config.deflate.as_ref())? {
        let config = options.config.deflate.clone().unwrap_or_default();
        conn = conn.with_deflate(params, &config);
    }
    let socket = WebSocket::from_upgraded(stream, conn, &leftover, options.config);
    Ok(Connected { socket, accepted })
}

/// A TCP connection to `address`, from `local` when given.
async fn open(address: (&str, u16), local: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = local else {
        return TcpStream::connect(address).await;
    };
    let remote = tokio::net::lookup_host(address)
        .await?
        .find(|remote| remote.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!(
                    "{}:{} has no address of {local}'s family",
                    address.0, address.1
                ),
            )
        })?;
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(remote).await
}

/// The permessage-deflate parameters the server agreed to, checked against the offer.
fn agreed_deflate(
    accepted: &Accepted,
    config: Option<&DeflateConfig>,
) -> Result<Option<DeflateParams>, Error> {
    let mut answers = accepted
        .extensions
        .iter()
        .filter(|e| e.name.eq_ignore_ascii_case(deflate::NAME));
    let (Some(answer), Some(config)) = (answers.next(), config) else {
        return Ok(None);
    };
    if answers.next().is_some() {
        return Err(HandshakeError::UnofferedExtension("permessage-deflate twice".into()).into());
    }
    deflate::accept_response(answer, config)
        .map(Some)
        .map_err(|why| {
            HandshakeError::Malformed(format!("permessage-deflate answer: {why}")).into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("ws://127.0.0.1:9001/runCase?case=1&agent=x").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 9001, "/runCase?case=1&agent=x")
        );
        let t = parse_url("ws://example.com").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        assert!(parse_url("http://example.com/").is_err());
        let t = parse_url("wss://example.com/chat").unwrap();
        assert_eq!((t.port, t.tls, t.path.as_str()), (443, true, "/chat"));
        assert!(parse_url("not a url").is_err());
    }
}
