//! What Switchboard's integration tests share (dev-dependency only): a `redis-server` of
//! their own on a free port ([`redis`]), plain HTTP/1.1 requests ([`http`]), and room
//! connections whose events are read as JSON ([`room`]), Centrifugo-protocol
//! connections with replies matched to their commands ([`centrifuge`]), and Pusher-protocol
//! connections with HTTP API requests signed as its libraries sign them ([`pusher`]), a webhook receiver ([`webhook`]), Server-Sent Events streams ([`sse`]), a TCP relay that adds latency, goes silent or cuts its links ([`relay`]), and an HTTP/2 client over TLS that opens WebSockets as RFC 8441 streams ([`h2`]).

pub mod centrifuge;
pub mod h2;
pub mod http;
pub mod pusher;
pub mod redis;
pub mod relay;
pub mod room;
pub mod sse;
pub mod webhook;
