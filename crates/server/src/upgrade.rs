//! Turning an HTTP request into a WebSocket: validation with `switchboard-wire`, the 101
//! answer through hyper, then the raw TCP stream taken back from hyper so the connection
//! runs on our engine with no HTTP layer in between. Over HTTP/2 (RFC 8441) the request
//! is an extended CONNECT, the answer a 200, and the engine runs on the HTTP/2 stream.

use std::future::Future;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode, Version};
use hyper_util::rt::TokioIo;
use switchboard_net::{Stream, WebSocket};
use switchboard_wire::deflate::negotiate;
use switchboard_wire::handshake::{
    validate_extended_connect, validate_request, HandshakeError, UpgradeRequest,
};
use tracing::{debug, error, Instrument};

use crate::serve::{AppState, ClientAddress, ConnectionSlot};

/// Marks a request that opens a WebSocket over HTTP/2: an extended CONNECT whose
/// `:protocol` is `websocket` (RFC 8441). It is routed as the GET of an HTTP/1.1
/// upgrade would be, and [`upgrade`] answers it as RFC 8441 says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExtendedConnect;

/// Whether `request` is an extended CONNECT marked by [`mark_extended_connect`].
pub(crate) fn is_extended_connect<B>(request: &http::Request<B>) -> bool {
    request.extensions().get::<ExtendedConnect>().is_some()
}

/// Marks `request` when it is one; true then.
pub(crate) fn mark_extended_connect<B>(request: &mut http::Request<B>) -> bool {
    let websocket = request.method() == http::Method::CONNECT
        && request
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"));
    if websocket {
        *request.method_mut() = http::Method::GET;
        request.extensions_mut().insert(ExtendedConnect);
    }
    websocket
}

/// Set on the answer that opens a WebSocket stream.
#[derive(Debug, Clone, Copy)]
struct Opened;

/// The answer to an extended CONNECT: the WebSocket's opening, or a refusal. A route
/// that is no WebSocket (it answered with a body, as to a GET) is refused with 400:
/// a 2xx would open the stream as a tunnel to nothing.
pub(crate) fn tunnel_answer(response: Response) -> Response {
    if response.extensions().get::<Opened>().is_some() || !response.status().is_success() {
        return response;
    }
    metrics::counter!("switchboard_handshake_failures_total", "reason" => "not_websocket")
        .increment(1);
    (
        StatusCode::BAD_REQUEST,
        "this endpoint is no WebSocket: open it with a GET\n",
    )
        .into_response()
}

/// Validates `request` as a WebSocket upgrade. On success answers 101 and runs
/// `session` on the connection once hyper hands the stream over; otherwise answers with
/// the handshake error's status and a one-line explanation.
pub(crate) fn upgrade<F, Fut>(
    state: &AppState,
    request: Request,
    config: switchboard_net::Config,
    session: F,
) -> Response
where
    F: FnOnce(WebSocket<Stream>, UpgradeRequest) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    upgrade_with(state, request, config, None, session)
}

/// [`upgrade`], answering with `subprotocol` (one the client offered).
pub(crate) fn upgrade_with<F, Fut>(
    state: &AppState,
    mut request: Request,
    config: switchboard_net::Config,
    subprotocol: Option<&'static str>,
    session: F,
) -> Response
where
    F: FnOnce(WebSocket<Stream>, UpgradeRequest) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let over_h2 = request.extensions().get::<ExtendedConnect>().is_some();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_bytes()));
    let checked = if over_h2 {
        validate_extended_connect(headers)
    } else {
        validate_request(
            request.method().as_str(),
            request.version() >= Version::HTTP_11,
            headers,
        )
    };
    let upgrade = match checked {
        Ok(upgrade) => upgrade,
        Err(error) => {
            metrics::counter!("switchboard_handshake_failures_total", "reason" => reason(&error))
                .increment(1);
            return refuse(&error);
        }
    };
    let allowed = &state.config.allowed_origins;
    if let Some(origin) = &upgrade.origin {
        if !allowed.is_empty() && !allowed.iter().any(|a| a == origin) {
            metrics::counter!("switchboard_handshake_failures_total", "reason" => "origin")
                .increment(1);
            return (
                StatusCode::FORBIDDEN,
                format!("origin {origin} is not allowed\n"),
            )
                .into_response();
        }
    }
    let deflate = config
        .deflate
        .as_ref()
        .and_then(|d| negotiate(&upgrade.extensions, d));
    let slot = request.extensions_mut().remove::<ConnectionSlot>();
    // With debug logs on, the session's logs name the client (behind a trusted proxy,
    // the one it named). Only then: a span is entered and left on every wake-up of the
    // session, which costs about as much as decoding a small frame.
    let span = match request.extensions().get::<ClientAddress>() {
        Some(ClientAddress(client)) if tracing::enabled!(tracing::Level::DEBUG) => {
            tracing::debug_span!("connection", %client)
        }
        _ => tracing::Span::none(),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let accept = (!over_h2)
        .then(|| HeaderValue::from_str(&upgrade.accept).expect("base64 is a valid header value"));
    let extensions = deflate.as_ref().map(|(_, header)| {
        HeaderValue::from_str(header).expect("extension header is built from tokens")
    });
    let params = deflate.map(|(params, _)| params);
    // The upgrade and the session are two futures: what only the upgrade needs (the
    // settings, hyper's handle, the request, the session's closure) is freed once the
    // session starts, instead of staying in the connection's task for its lifetime.
    let opening = Box::pin(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(cause) => {
                debug!(%cause, "client left before the upgrade completed");
                return None;
            }
        };
        let socket = if over_h2 {
            // The HTTP/2 stream itself: hyper keeps the connection, its flow control and
            // its other streams.
            let tunnel = Stream::tunnel(TokioIo::new(upgraded));
            WebSocket::server(tunnel, &[], config, params)
        } else {
            match upgraded.downcast::<TokioIo<Stream>>() {
                Ok(parts) => {
                    // The leftover bytes are copied: hyper's whole read buffer goes now,
                    // not when the session ends.
                    WebSocket::server(parts.io.into_inner(), &parts.read_buf, config, params)
                }
                Err(_) => {
                    error!("upgraded connection is not a server stream");
                    return None;
                }
            }
        };
        let http = if over_h2 { "2" } else { "1.1" };
        metrics::counter!("switchboard_connections_total").increment(1);
        metrics::counter!("switchboard_websocket_connections_total", "http" => http).increment(1);
        // Boxed: the session owns the socket, and a future that moved it in could keep
        // room for it twice.
        Some(Box::pin(session(socket, upgrade)))
    });
    state.spawn(
        async move {
            let _slot = slot;
            let Some(session) = opening.await else {
                return;
            };
            metrics::gauge!("switchboard_connections").increment(1.0);
            session.await;
            metrics::gauge!("switchboard_connections").decrement(1.0);
        }
        .instrument(span),
    );
    let mut response = match accept {
        Some(accept) => Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(Body::empty()),
        // RFC 8441: a 200 opens the stream, with no upgrade headers (HTTP/2 has none).
        None => Response::builder()
            .status(StatusCode::OK)
            .extension(Opened)
            .body(Body::empty()),
    }
    .expect("static response parts are valid");
    if let Some(extensions) = extensions {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_EXTENSIONS, extensions);
    }
    if let Some(subprotocol) = subprotocol {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(subprotocol),
        );
    }
    response
}

/// A short label for a handshake failure, for metrics.
fn reason(error: &HandshakeError) -> &'static str {
    match error {
        HandshakeError::MethodNotAllowed => "method",
        HandshakeError::NotAnUpgrade => "not_upgrade",
        HandshakeError::UnsupportedVersion => "version",
        HandshakeError::MissingKey | HandshakeError::InvalidKey => "key",
        HandshakeError::TooLarge => "too_large",
        _ => "malformed",
    }
}

/// The plain HTTP answer to a failed upgrade.
pub(crate) fn refuse(error: &HandshakeError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (status, format!("{error}\n")).into_response();
    for (name, value) in error.response_headers() {
        response
            .headers_mut()
            .insert(*name, HeaderValue::from_static(value));
    }
    response
}
