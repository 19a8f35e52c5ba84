//! The server handshake on a raw stream, for servers without an HTTP stack of their own.

use switchboard_wire::deflate::negotiate;
use switchboard_wire::handshake::{parse_request, response_bytes, HandshakeError, RequestHead};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Config;
use crate::error::Error;
use crate::socket::WebSocket;

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Reads an upgrade request from `io`, answers it, and returns the connection with the
/// request head (for routing and identity). A bad request gets its HTTP status and a
/// one-line explanation before the error is returned.
pub async fn accept<S>(mut io: S, config: Config) -> Result<(WebSocket<S>, RequestHead), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let read_head = async {
        loop {
            match parse_request(&buf, MAX_HEAD) {
                Ok(Some(done)) => return Ok(Ok(done)),
                Ok(None) => {}
                Err(error) => return Ok(Err(error)),
            }
            let mut chunk = [0u8; 2048];
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                return Err(Error::ConnectionLost);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let parsed = tokio::time::timeout(config.handshake_timeout, read_head)
        .await
        .map_err(|_| Error::Timeout("waiting for the upgrade request"))??;
    let (head, len) = match parsed {
        Ok(done) => done,
        Err(error) => {
            reject(&mut io, &error).await;
            return Err(error.into());
        }
    };
    let upgrade = match head.validate() {
        Ok(upgrade) => upgrade,
        Err(error) => {
            reject(&mut io, &error).await;
            return Err(error.into());
        }
    };
    let deflate = config
        .deflate
        .as_ref()
        .and_then(|d| negotiate(&upgrade.extensions, d));
    let extensions = deflate.as_ref().map(|(_, header)| header.as_str());
    io.write_all(&response_bytes(&upgrade.accept, None, extensions))
        .await?;
    let params = deflate.map(|(params, _)| params);
    Ok((WebSocket::server(io, &buf[len..], config, params), head))
}

async fn reject<S: AsyncWrite + Unpin>(io: &mut S, error: &HandshakeError) {
    let body = format!("{error}\n");
    let mut response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        error.status(),
        reason(error.status()),
        body.len()
    );
    for (name, value) in error.response_headers() {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&body);
    // The client is being turned away; if it is gone already, so be it.
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}
