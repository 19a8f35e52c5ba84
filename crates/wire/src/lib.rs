//! `switchboard-wire`: the WebSocket protocol (RFC 6455) as a sans-IO state machine.
//!
//! Nothing here touches a socket, a runtime or a clock. Bytes go in, messages and bytes
//! to send come out:
//!
//! - [`handshake`] builds and validates the HTTP/1.1 upgrade on both sides.
//! - [`frame`] encodes and decodes frame headers; [`mask`] applies the masking key.
//! - [`utf8`] validates text incrementally, so invalid text fails as soon as it arrives.
//! - [`deflate`] negotiates and runs permessage-deflate (RFC 7692).
//! - [`Connection`] ties them together: reassembly of fragmented messages, control frames
//!   interleaved, automatic pong and close replies, the close state machine and limits.
//!
//! ```
//! use bytes::BytesMut;
//! use switchboard_wire::{Config, Connection, Message};
//!
//! let mut client = Connection::client(Config::default(), [7; 32]);
//! let mut server = Connection::server(Config::default());
//! client.send_text("hello").unwrap();
//!
//! let mut wire = client.take_output();
//! match server.read(&mut wire).unwrap() {
//!     Some(Message::Text(text)) => assert_eq!(text.as_str(), "hello"),
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```

pub mod close;
mod config;
mod connection;
pub mod deflate;
mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
mod message;
pub mod utf8;

pub use close::{CloseCode, CloseFrame};
pub use config::Config;
pub use connection::{Connection, Role};
pub use error::{Error, ProtocolError};
pub use frame::{FrameHeader, OpCode};
pub use message::{Message, Text};
