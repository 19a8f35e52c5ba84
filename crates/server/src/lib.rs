//! `switchboard-server`: the HTTP side of Switchboard and the WebSocket endpoints on it.
//!
//! [`run`] takes a bound listener (tests bind port 0), serves HTTP/1.1 with hyper and
//! axum's router, upgrades WebSocket requests into `switchboard-net` connections by
//! taking the raw stream (TCP or TLS) back from hyper, caps connections in all and per
//! IP address, limits the handshake rate per address, and on shutdown closes
//! every WebSocket with 1001 and drains within a bound. Its doors (the room protocol,
//! the HTTP API, `/echo`) sit on `switchboard-engine`'s channels; the layers and which
//! file owns what are in docs/ARCHITECTURE.md, the room protocol in docs/PROTOCOL.md.

mod api;
mod auth;
mod centrifuge;
mod config;
mod echo;
mod limits;
mod metrics;
mod pusher;
mod room;
mod room_http;
mod routes;
mod serve;
mod shutdown;
mod upgrade;
mod web;

pub use auth::AuthSetupError;
pub use config::{Config, PusherApp, Webhook};
pub use room::{HISTORY_RESET, SLOW_CONSUMER};
pub use serve::{run, Error};
