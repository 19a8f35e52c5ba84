//! `switchboard-net`: runs the `switchboard-wire` state machine over tokio sockets.
//!
//! - [`WebSocket`] drives one connection over any `AsyncRead + AsyncWrite`: reads into
//!   one reused buffer, hands payloads out without copying, collects every outgoing frame
//!   in one buffer written with a single syscall when the reader runs dry ("corking"),
//!   answers pings, pings quiet peers and drops dead ones, and runs the close handshake
//!   with a timeout.
//! - [`accept`] performs the server handshake on a raw stream; servers that parse HTTP
//!   themselves use [`WebSocket::from_upgraded`].
//! - [`connect`] opens a client connection to a `ws://` or `wss://` URL; [`Stream`] is
//!   the TCP or TLS stream under it, and [`tls`] builds the TLS settings.
//! - [`bucket`] paces: the token bucket of every rate limit, server and client.

pub mod bucket;
mod client;
mod config;
mod error;
mod server;
mod socket;
mod stream;
pub mod tls;

pub use client::{connect, ClientOptions, Connected};
pub use config::Config;
pub use error::Error;
pub use server::accept;
pub use socket::{Settled, WebSocket};
pub use stream::Stream;
pub use switchboard_wire as wire;
pub use switchboard_wire::{CloseCode, CloseFrame, Message, Text};
