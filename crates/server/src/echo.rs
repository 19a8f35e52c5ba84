//! `/echo`: every message comes back with its type unchanged (conformance and benchmarks).

use switchboard_net::{CloseCode, CloseFrame, WebSocket};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub(crate) async fn echo_session(mut socket: WebSocket<TcpStream>, shutdown: CancellationToken) {
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        // Replies are queued and go out together when the input runs dry. Shutdown can
        // interrupt a send too: a peer that stopped reading must not hold up the drain.
        let step = async {
            match socket.recv().await? {
                Some(message) => socket.feed(&message).await.map(|()| true),
                None => Ok(false),
            }
        };
        tokio::select! {
            biased;
            () = &mut cancelled => break,
            result = step => match result {
                Ok(true) => continue,
                Ok(false) => return,
                Err(cause) => {
                    debug!(%cause, "echo connection ended");
                    return;
                }
            },
        }
    }
    let going_away = CloseFrame::new(CloseCode::GOING_AWAY, "server shutting down");
    if let Err(cause) = socket.close(Some(going_away)).await {
        debug!(%cause, "echo close handshake at shutdown");
    }
}
