//! `/echo`: every message comes back with its type unchanged (conformance and benchmarks).

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;

use switchboard_net::{CloseCode, CloseFrame, Message, Settled, Stream, WebSocket};
use tracing::debug;

use crate::shutdown::Shutdown;

/// What the session's one poll came to.
enum Wake {
    Message(Message),
    /// The socket has work to do (see [`WebSocket::settle`]).
    Socket,
    Stopping,
}

pub(crate) async fn echo_session(mut socket: WebSocket<Stream>, shutdown: Shutdown) {
    // One poll per wake-up: the socket's messages (replies are queued and go out
    // together when the input runs dry), then shutdown when there is nothing to do.
    // Shutdown interrupts a send too: a peer that stopped reading must not hold up the
    // drain.
    let mut stopping = pin!(shutdown.stopping());
    let ended = loop {
        let wake = poll_fn(|cx| match socket.poll_message(cx) {
            Poll::Ready(Some(message)) => Poll::Ready(Wake::Message(message)),
            Poll::Ready(None) => Poll::Ready(Wake::Socket),
            Poll::Pending => stopping.as_mut().poll(cx).map(|()| Wake::Stopping),
        })
        .await;
        let message = match wake {
            Wake::Message(message) => message,
            Wake::Socket => match socket.settle().await {
                Ok(Settled::Message(message)) => message,
                Ok(Settled::Done) => continue,
                Ok(Settled::Closed) => return,
                Err(cause) => break Some(cause),
            },
            Wake::Stopping => break None,
        };
        // Queuing a reply waits only when the peer has not taken a megabyte of them.
        let mut fed = pin!(socket.feed(&message));
        let fed = match poll_fn(|cx| Poll::Ready(fed.as_mut().poll(cx))).await {
            Poll::Ready(fed) => fed,
            Poll::Pending => tokio::select! {
                biased;
                fed = fed => fed,
                () = stopping.as_mut() => break None,
            },
        };
        if let Err(cause) = fed {
            break Some(cause);
        }
    };
    if let Some(cause) = ended {
        debug!(%cause, "echo connection ended");
        return;
    }
    let going_away = CloseFrame::new(CloseCode::GOING_AWAY, "server shutting down");
    if let Err(cause) = Box::pin(socket.close(Some(going_away))).await {
        debug!(%cause, "echo close handshake at shutdown");
    }
}
