//! `/echo`: every message comes back with its type unchanged (conformance and benchmarks).

use switchboard_net::Stream;
use switchboard_net::{CloseCode, CloseFrame, WebSocket};
use tracing::debug;

use crate::shutdown::Shutdown;

pub(crate) async fn echo_session(mut socket: WebSocket<Stream>, shutdown: Shutdown) {
    // Replies are queued and go out together when the input runs dry. One loop future
    // for the whole session (not one per message), raced against shutdown, which can
    // interrupt a send too: a peer that stopped reading must not hold up the drain.
    let echo = async {
        while let Some(message) = socket.recv().await? {
            socket.feed(&message).await?;
        }
        Ok::<_, switchboard_net::Error>(())
    };
    tokio::select! {
        biased;
        result = echo => {
            if let Err(cause) = result {
                debug!(%cause, "echo connection ended");
            }
            return;
        }
        () = shutdown.stopping() => {}
    }
    let going_away = CloseFrame::new(CloseCode::GOING_AWAY, "server shutting down");
    if let Err(cause) = Box::pin(socket.close(Some(going_away))).await {
        debug!(%cause, "echo close handshake at shutdown");
    }
}
