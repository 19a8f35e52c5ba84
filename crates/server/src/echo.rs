//! `/echo`: every message comes back with its type unchanged (conformance and benchmarks).

use switchboard_net::{CloseCode, CloseFrame, WebSocket};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub(crate) async fn echo_session(mut socket: WebSocket<TcpStream>, shutdown: CancellationToken) {
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            biased;
            () = &mut cancelled => {
                let going_away = CloseFrame::new(CloseCode::GOING_AWAY, "server shutting down");
                if let Err(cause) = socket.close(Some(going_away)).await {
                    debug!(%cause, "echo close handshake at shutdown");
                }
                return;
            }
            received = socket.recv() => match received {
                // Replies are queued and go out together when the input runs dry.
                Ok(Some(message)) => {
                    if let Err(cause) = socket.feed(&message).await {
                        debug!(%cause, "echo connection ended while sending");
                        return;
                    }
                }
                Ok(None) => return,
                Err(cause) => {
                    debug!(%cause, "echo connection ended");
                    return;
                }
            },
        }
    }
}
