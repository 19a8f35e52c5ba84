//! An HTTP/2 client over TLS (ALPN `h2`) for tests: plain requests on one connection,
//! and WebSockets opened as extended CONNECT streams (RFC 8441) and run by the engine's
//! client end.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchboard_net::wire::deflate::{self, DeflateConfig};
use switchboard_net::wire::handshake::parse_extensions;
use switchboard_net::wire::Connection;
use switchboard_net::{Stream, WebSocket};
use tokio::net::TcpStream;

/// A self-signed certificate for `localhost` and `127.0.0.1`, written as PEM into
/// `dir`: the certificate's path and the key's.
pub fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("a certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, made.cert.pem()).expect("written");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("written");
    (cert, key)
}

/// The body type of the requests: whole, or streamed from a channel.
type RequestBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// One HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct H2 {
    send: SendRequest<RequestBody>,
    authority: String,
}

/// What a WebSocket's opening stream was answered.
#[derive(Debug)]
pub struct Opened {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    /// The WebSocket, when the answer was 200.
    pub socket: Option<WebSocket<Stream>>,
}

impl H2 {
    /// Connects to `address` over TLS trusting `ca` (PEM), offering only `h2`; panics
    /// when the server does not choose it.
    pub async fn connect(address: &str, ca: &Path) -> Self {
        let mut tls =
            (*switchboard_net::tls::client_config(Some(ca)).expect("a TLS client config")).clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(address).await.expect("the server");
        // Small frames go at once (without it every round trip waits for a delayed ACK).
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let session = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("a TLS session");
        assert_eq!(
            session.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN chose h2"
        );
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(session))
            .await
            .expect("an HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            send,
            authority: format!("localhost:{}", address.rsplit(':').next().unwrap_or("443")),
        }
    }

    fn uri(&self, path: &str) -> String {
        format!("https://{}{path}", self.authority)
    }

    /// `method path` with `body`; the status and the body as text.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(self.uri(path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())).boxed())
            .expect("a request");
        let response = self.send.send_request(request).await.expect("an answer");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Starts `POST path` whose body never comes (the stream stays open from this
    /// side); the answer's status, if one comes.
    pub async fn half_open(&mut self, path: &str) -> Result<StatusCode, hyper::Error> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri(path))
            .body(Never.boxed())
            .expect("a request");
        let response = self.send.send_request(request).await?;
        Ok(response.status())
    }

    /// Opens an extended CONNECT stream (`:protocol = websocket`) at `path` with
    /// `headers`: the answer's status and headers, and on a 200 the stream itself.
    pub async fn connect_stream(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, Option<Stream>) {
        self.try_connect_stream(path, headers)
            .await
            .expect("an answer")
    }

    /// [`H2::connect_stream`], with the connection's failure as an error.
    pub async fn try_connect_stream(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, http::HeaderMap, Option<Stream>), hyper::Error> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(self.uri(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request
            .body(Empty::<Bytes>::new().boxed())
            .expect("a request");
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let mut response = self.send.send_request(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        if status != StatusCode::OK {
            return Ok((status, headers, None));
        }
        let upgraded = hyper::upgrade::on(&mut response).await?;
        Ok((
            status,
            headers,
            Some(Stream::tunnel(TokioIo::new(upgraded))),
        ))
    }

    /// Opens a WebSocket at `path` as an extended CONNECT stream with `headers` (for
    /// example `Sec-WebSocket-Version: 13`), offering permessage-deflate with `deflate`.
    pub async fn websocket(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        deflate: Option<&DeflateConfig>,
    ) -> Opened {
        let offer = deflate.map(deflate::offer);
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(offer) = &offer {
            all.push(("sec-websocket-extensions", offer));
        }
        let (status, headers, stream) = self.connect_stream(path, &all).await;
        let Some(stream) = stream else {
            return Opened {
                status,
                headers,
                socket: None,
            };
        };
        let mut conn = Connection::client(switchboard_net::Config::default().wire, rand_seed());
        let agreed = headers
            .get("sec-websocket-extensions")
            .and_then(|value| value.to_str().ok())
            .map(|value| parse_extensions(value).expect("extensions the server may answer"));
        if let (Some(config), Some(answers)) = (deflate, agreed) {
            if let Some(answer) = answers.first() {
                let params =
                    deflate::accept_response(answer, config).expect("an answer to the offer");
                conn = conn.with_deflate(params, config);
            }
        }
        let config = switchboard_net::Config::default();
        Opened {
            status,
            headers,
            socket: Some(WebSocket::from_upgraded(stream, conn, &[], config)),
        }
    }
}

/// A request body that never yields a byte, nor ends.
struct Never;

impl hyper::body::Body for Never {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

fn rand_seed() -> [u8; 32] {
    use rand::{RngCore, SeedableRng};
    let mut seed = [0u8; 32];
    rand::rngs::StdRng::from_os_rng().fill_bytes(&mut seed);
    seed
}
