//! `switchboard-client`: a Rust client for Switchboard rooms that loses nothing.
//!
//! [`connect`] joins a room and gives a [`RoomClient`] to send with and [`Events`], a
//! stream of typed [`Event`]s (welcome, message, typing, join, leave, error, and the
//! connection's [`State`]). Behind them, one task owns the connection:
//!
//! - **Reconnection** with exponential backoff and full jitter ([`Backoff`]), bounded
//!   and configurable; refusals that retrying cannot fix (a 4xx answer) end it.
//! - **Resume**: each reconnection asks for the messages after the last id seen
//!   (`?since=` and `&epoch=`), so [`Event::Message`] delivers every message exactly
//!   once, in order. When the room no longer keeps all of them, or its history was
//!   reset, the welcome's [`Resumed`] says so (`complete: false`).
//! - **Messages sent while disconnected** are queued, and every message is sent again
//!   with its original nonce until the server acknowledges it, so each is stored once.
//! - **Heartbeats**: a silent server is pinged and given up on when it does not answer,
//!   so a dead connection is noticed in seconds rather than minutes.
//! - **Pacing** under the rate limit the room announces, so messages are not refused.
//!
//! ```no_run
//! use switchboard_client::{connect, Event, Options};
//!
//! # async fn chat() -> Result<(), switchboard_client::Error> {
//! let options = Options::default().with_name("alice");
//! let (room, mut events) = connect("ws://127.0.0.1:8080/room/lobby", options).await?;
//! room.send_message("Hello!")?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Message(m) => {
//!             let from = m.from.as_deref().unwrap_or("(server)");
//!             println!("{from}: {}", m.text.as_deref().unwrap_or_default());
//!         }
//!         Event::Welcome { resumed: Some(r), .. } if !r.complete => {
//!             println!("some messages since {} are no longer kept", r.after);
//!         }
//!         Event::Typing { user, is_typing: true } => println!("{user} is typing…"),
//!         Event::State(state) => println!("[{state:?}]"),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [`connect_raw`] is the same connection without the room protocol, for other
//! endpoints: text and binary messages in and out, reconnection included (messages
//! there are sent at most once: a raw endpoint has no acknowledgements).
//!
//! ```no_run
//! use switchboard_client::{connect_raw, Event, Options};
//!
//! # async fn echo() -> Result<(), switchboard_client::Error> {
//! let (socket, mut events) = connect_raw("ws://127.0.0.1:8080/echo", Options::default()).await?;
//! socket.send_text("ping")?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Text(reply) = event {
//!         assert_eq!(reply, "ping");
//!         socket.close().await;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod backoff;
mod driver;
mod event;
mod options;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

pub use backoff::Backoff;
pub use event::{ChatMessage, Event, Limits, Resumed, ServerError, State, Welcome};
pub use options::Options;
/// TLS settings for `wss://` ([`Options::with_tls`]): `tls::client_config(Some(ca_file))`.
pub use switchboard_net::tls;

use driver::{Command, Driver, Mode, Shared};
use switchboard_protocol::room::ClientEvent;

/// Events a client keeps for the application before it stops reading the socket.
const EVENT_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connecting failed (the first connection, or why a later one was given up).
    #[error(transparent)]
    Net(#[from] switchboard_net::Error),
    /// The server did not behave like a room.
    #[error("{0}")]
    Room(String),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// `max_queued` messages already wait for their acknowledgement.
    #[error("{0} messages are already waiting to be sent")]
    QueueFull(usize),
}

/// The stream of [`Event`]s of one client, ending after [`State::Closed`].
///
/// Read it steadily: when the application falls 1024 events behind, the
/// client stops reading from the server, which in time drops the connection as a slow
/// consumer; the client then reconnects and resumes, so nothing is lost.
#[derive(Debug)]
pub struct Events {
    events: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client closed.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}

impl futures_core::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

/// What both kinds of handle share.
#[derive(Debug, Clone)]
struct Handle {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Handle {
    fn command(&self, command: Command) -> Result<(), Error> {
        self.commands.send(command).map_err(|_| Error::Closed)
    }

    async fn close(&self) {
        let (reply, closed) = oneshot::channel();
        if self.commands.send(Command::Close(reply)).is_ok() {
            // An error means the task already ended: closed either way.
            let _ = closed.await;
        }
    }
}

async fn start(url: &str, options: Options, mode: Mode) -> Result<(Handle, Events), Error> {
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
    let shared = Arc::new(Shared::default());
    let driver = Driver::new(
        url.to_owned(),
        options,
        mode,
        command_rx,
        event_tx,
        shared.clone(),
    );
    let (first, connected) = oneshot::channel();
    tokio::spawn(driver.run(first));
    connected.await.map_err(|_| Error::Closed)??;
    Ok((Handle { commands, shared }, Events { events }))
}

/// Joins the room at `url` (`ws://HOST/room/ROOM`), waiting for the first connection
/// and the room's welcome. Fails if that first connection fails; once joined, the client
/// reconnects by itself.
pub async fn connect(url: &str, options: Options) -> Result<(RoomClient, Events), Error> {
    let max_queued = options.max_queued;
    let (handle, events) = start(url, options, Mode::Room).await?;
    let prefix = format!("{:016x}", StdRng::from_os_rng().random::<u64>());
    let client = RoomClient {
        handle,
        nonces: Arc::new(Nonces {
            prefix,
            next: AtomicU64::new(1),
        }),
        max_queued,
    };
    Ok((client, events))
}

/// Connects to any WebSocket endpoint without the room protocol.
pub async fn connect_raw(url: &str, options: Options) -> Result<(RawClient, Events), Error> {
    let (handle, events) = start(url, options, Mode::Raw).await?;
    Ok((RawClient { handle }, events))
}

#[derive(Debug)]
struct Nonces {
    prefix: String,
    next: AtomicU64,
}

/// Sends to a room. Cheap to clone; every clone drives the same connection, which
/// closes (after the queue is acknowledged) when the last one is dropped.
#[derive(Debug, Clone)]
pub struct RoomClient {
    handle: Handle,
    nonces: Arc<Nonces>,
    max_queued: usize,
}

impl RoomClient {
    /// Queues a chat message and returns its nonce. It is sent now if connected, else
    /// after the reconnection, and again after every reconnection until the server
    /// acknowledges it: it then arrives as an [`Event::Message`] with this nonce. A
    /// refusal that retrying cannot fix arrives as an [`Event::Error`] with this nonce.
    pub fn send_message(&self, text: impl Into<String>) -> Result<String, Error> {
        self.publish(Some(text.into()), None)
    }

    /// Queues a message carrying `data` (any JSON), like [`RoomClient::send_message`].
    pub fn send_data(&self, data: serde_json::Value) -> Result<String, Error> {
        self.publish(None, Some(data))
    }

    /// Queues a message with `text`, `data` or both, like [`RoomClient::send_message`].
    pub fn publish(
        &self,
        text: Option<String>,
        data: Option<serde_json::Value>,
    ) -> Result<String, Error> {
        let queued = self.handle.shared.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= self.max_queued {
            self.handle.shared.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::QueueFull(queued));
        }
        let n = self.nonces.next.fetch_add(1, Ordering::Relaxed);
        let nonce = format!("{}-{n}", self.nonces.prefix);
        let event = ClientEvent::Message {
            text,
            data,
            nonce: Some(nonce.clone()),
        };
        let sent = self.handle.command(Command::Message {
            nonce: nonce.clone(),
            json: serde_json::to_string(&event).expect("events serialize"),
        });
        if sent.is_err() {
            self.handle.shared.queued.fetch_sub(1, Ordering::Relaxed);
        }
        sent.map(|()| nonce)
    }

    /// Tells the others this user started or stopped typing. Not queued while
    /// disconnected: it is news of the moment.
    pub fn set_typing(&self, is_typing: bool) -> Result<(), Error> {
        self.handle.command(Command::Typing(is_typing))
    }

    /// Relays binary data to the other members: not stored, not kept while disconnected,
    /// paced with the messages under the room's rate limit (beyond 1024 waiting, the
    /// oldest is dropped).
    pub fn send_binary(&self, data: impl Into<Bytes>) -> Result<(), Error> {
        self.handle.command(Command::Binary(data.into()))
    }

    /// Messages sent but not yet acknowledged by the server.
    pub fn queued(&self) -> usize {
        self.handle.shared.queued.load(Ordering::Relaxed)
    }

    /// Closes with 1000 once the messages already sent are acknowledged (bounded by the
    /// connect timeout), and waits until the client has closed. Messages still
    /// unacknowledged then (or queued while disconnected) are not sent: check
    /// [`RoomClient::queued`] first when that matters. Events that arrive meanwhile are
    /// delivered while there is room in the queue.
    pub async fn close(&self) {
        self.handle.close().await;
    }
}

/// Sends on a raw connection ([`connect_raw`]).
#[derive(Debug, Clone)]
pub struct RawClient {
    handle: Handle,
}

impl RawClient {
    /// Sends a text message (now, or after the reconnection when disconnected).
    pub fn send_text(&self, text: impl Into<String>) -> Result<(), Error> {
        self.handle.command(Command::Text(text.into()))
    }

    /// Sends a binary message (now, or after the reconnection when disconnected).
    pub fn send_binary(&self, data: impl Into<Bytes>) -> Result<(), Error> {
        self.handle.command(Command::Binary(data.into()))
    }

    /// Closes with 1000 and waits until the client has closed.
    pub async fn close(&self) {
        self.handle.close().await;
    }
}
