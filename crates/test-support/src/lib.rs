//! What Switchboard's integration tests share (dev-dependency only): a `redis-server` of
//! their own on a free port ([`redis`]), plain HTTP/1.1 requests ([`http`]), and room
//! connections whose events are read as JSON ([`room`]), and Centrifugo-protocol
//! connections with replies matched to their commands ([`centrifuge`]).

pub mod centrifuge;
pub mod http;
pub mod redis;
pub mod room;
