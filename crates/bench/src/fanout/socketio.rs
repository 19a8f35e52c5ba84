//! The part of Engine.IO 4 and Socket.IO 5 the fan-out load speaks, over WebSocket only.
//!
//! Each WebSocket text message is one Engine.IO packet: a type digit (`0` open, `1`
//! close, `2` ping, `3` pong, `4` message, …) and its data. A Socket.IO packet rides in
//! an Engine.IO message: its own type digit (`0` CONNECT, `1` DISCONNECT, `2` EVENT,
//! `4` CONNECT_ERROR, …), then, for the main namespace `/`, its JSON payload directly.
//! A client session, then:
//!
//! 1. the server sends `0{"sid":…,"pingInterval":…,"pingTimeout":…}` (open);
//! 2. the client sends `40` (CONNECT to `/`), the server answers `40{"sid":…}`, or
//!    `44{…}` if it refuses;
//! 3. events both ways: `42["message","text"]`;
//! 4. every `pingInterval` the server sends `2`, and the client answers `3` within
//!    `pingTimeout`, or the server closes the session.

use std::time::Duration;

use anyhow::{bail, Context};
use switchboard_net::{Message, Stream, WebSocket};

/// Engine.IO's ping, from the server.
pub(super) const PING: &str = "2";
/// The client's answer to [`PING`].
pub(super) const PONG: &str = "3";

/// How long a client waits for the open packet and the namespace's CONNECT.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A packet the load reads, in the main namespace; the payloads are still JSON.
#[derive(Debug, PartialEq, Eq)]
enum Packet<'a> {
    /// Engine.IO's open packet and its handshake data.
    Open(&'a str),
    /// Engine.IO's close.
    Close,
    Ping,
    /// Socket.IO's CONNECT (from the server: its payload holds the session id).
    Connect(&'a str),
    /// Socket.IO's CONNECT_ERROR and its reason.
    ConnectError(&'a str),
    Disconnect,
    /// Socket.IO's EVENT: the array of the event's name and arguments.
    Event(&'a str),
    /// Anything else (pongs, acknowledgements, binary events, other namespaces).
    Other,
}

fn parse(text: &str) -> Packet<'_> {
    let Some((engine, rest)) = text.split_at_checked(1) else {
        return Packet::Other;
    };
    match engine {
        "0" => Packet::Open(rest),
        "1" => Packet::Close,
        "2" if rest.is_empty() => Packet::Ping,
        "4" => match rest.split_at_checked(1) {
            Some(("0", payload)) => Packet::Connect(payload),
            Some(("1", _)) => Packet::Disconnect,
            Some(("2", payload)) if payload.starts_with('[') => Packet::Event(payload),
            Some(("4", payload)) => Packet::ConnectError(payload),
            _ => Packet::Other,
        },
        _ => Packet::Other,
    }
}

/// An EVENT packet in the main namespace: `42["name","data"]`.
pub(super) fn event(name: &str, data: &str) -> String {
    format!("42{}", serde_json::json!([name, data]))
}

/// Whether the server ended the session (Engine.IO close, Socket.IO disconnect).
pub(super) fn is_goodbye(text: &str) -> bool {
    matches!(parse(text), Packet::Close | Packet::Disconnect)
}

/// Opens a Socket.IO session on a new WebSocket: waits for the open packet, connects to
/// the main namespace and waits until the server has accepted it. Pings that come
/// meanwhile are answered.
pub(super) async fn join(socket: &mut WebSocket<Stream>) -> anyhow::Result<()> {
    tokio::time::timeout(JOIN_TIMEOUT, async {
        let mut opened = false;
        loop {
            let text = match socket.recv().await? {
                Some(Message::Text(text)) => text,
                Some(_) => continue,
                None => bail!("the Socket.IO server closed a client before it joined"),
            };
            match parse(text.as_str()) {
                Packet::Open(handshake) if !opened => {
                    if !handshake.contains(r#""sid""#) {
                        bail!("an Engine.IO open packet without a session id: {handshake}");
                    }
                    opened = true;
                    socket.send_text("40").await?;
                }
                Packet::Ping => socket.send_text(PONG).await?,
                Packet::Connect(_) if opened => return Ok(()),
                Packet::ConnectError(reason) => {
                    bail!("the Socket.IO server refused the connection: {reason}")
                }
                Packet::Close | Packet::Disconnect => {
                    bail!("the Socket.IO server ended a session before it joined")
                }
                _ => {}
            }
        }
    })
    .await
    .context("no Socket.IO session within 30 s")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_of_a_session_are_told_apart() {
        let open = r#"{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;
        assert_eq!(parse(&format!("0{open}")), Packet::Open(open));
        assert_eq!(
            parse(r#"40{"sid":"wZX3oN0bSVIhsaknAAAI"}"#),
            Packet::Connect(r#"{"sid":"wZX3oN0bSVIhsaknAAAI"}"#)
        );
        assert_eq!(
            parse(r#"44{"message":"Not authorized"}"#),
            Packet::ConnectError(r#"{"message":"Not authorized"}"#)
        );
        assert_eq!(parse("2"), Packet::Ping);
        assert_eq!(parse("3"), Packet::Other);
        assert_eq!(parse("2probe"), Packet::Other);
        assert_eq!(
            parse(r#"42["message","hi"]"#),
            Packet::Event(r#"["message","hi"]"#)
        );
        assert_eq!(parse(r#"42/admin,["message","hi"]"#), Packet::Other);
        assert_eq!(parse(""), Packet::Other);
        assert!(is_goodbye("1"));
        assert!(is_goodbye("41"));
        assert!(!is_goodbye("40"));
    }

    #[test]
    fn an_event_carries_the_marker_as_a_json_string() {
        let text = super::super::marker(2, 987_654_321, 64);
        let packet = event("message", &text);
        assert!(packet.starts_with(r#"42["message","~T2:987654321~"#));
        let Packet::Event(array) = parse(&packet) else {
            panic!("not an event: {packet}");
        };
        let parsed: (String, String) = serde_json::from_str(array).unwrap();
        assert_eq!(parsed, ("message".to_owned(), text));
        assert_eq!(
            super::super::parse_marker(packet.as_bytes()),
            Some((2, 987_654_321))
        );
        assert_eq!(event("message", "a\"b"), r#"42["message","a\"b"]"#);
    }
}
