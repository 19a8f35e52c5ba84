//! The room protocol's JSON events (DESIGN.md, "The room protocol").

use bytes::Bytes;
use serde::Serialize;

use crate::StoredMessage;

/// What a client sent, once parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    Message { text: String, nonce: Option<String> },
    Typing { is_typing: bool },
}

/// Why a client event was refused; becomes an `error` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventError {
    pub code: &'static str,
    pub message: String,
    /// The refused message's `nonce`, so its sender knows which one it was.
    pub nonce: Option<String>,
}

impl EventError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            nonce: None,
        }
    }

    fn for_nonce(mut self, nonce: &Option<String>) -> Self {
        self.nonce.clone_from(nonce);
        self
    }
}

/// What a room announces in its `welcome` about the limits it enforces, so clients can
/// pace themselves instead of being refused.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Events a connection may send per second, on average.
    pub events_per_sec: f64,
    /// Events a connection may send in a burst.
    pub burst: u32,
    /// Longest message text, in characters.
    pub max_text_chars: usize,
}

/// The `nonce` of a client's message event, read on its own (for refusals of events
/// that were not parsed, such as those over the rate limit).
/// Read the way [`parse_client_event`] reads it (an object's last `nonce` key wins).
pub fn nonce_of(text: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(text).ok()? {
        serde_json::Value::Object(mut object) => match object.remove("nonce")? {
            serde_json::Value::String(nonce) if nonce.len() <= MAX_NONCE => Some(nonce),
            _ => None,
        },
        _ => None,
    }
}

/// Longest accepted `nonce`, in bytes.
pub const MAX_NONCE: usize = 128;

/// Parses a client's text frame. `timestamp` is accepted and ignored: the server sets
/// the time, as it sets the sender.
pub fn parse_client_event(text: &str, max_text: usize) -> Result<ClientEvent, EventError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| EventError::new("bad_json", format!("not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| EventError::new("bad_json", "an event is a JSON object"))?;
    let kind = object
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| EventError::new("bad_event", "an event needs a string `type`"))?;
    match kind {
        "message" => {
            let nonce = match object.get("nonce") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(n)) if n.len() <= MAX_NONCE => Some(n.clone()),
                Some(_) => {
                    return Err(EventError::new(
                        "bad_event",
                        "`nonce` must be a string of up to 128 bytes",
                    ))
                }
            };
            let text = object.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                EventError::new("bad_event", "a message needs a string `text`").for_nonce(&nonce)
            })?;
            if text.chars().count() > max_text {
                return Err(EventError::new(
                    "too_long",
                    format!("text is over {max_text} characters"),
                )
                .for_nonce(&nonce));
            }
            Ok(ClientEvent::Message {
                text: text.to_owned(),
                nonce,
            })
        }
        "typing" => {
            let is_typing = object
                .get("isTyping")
                .and_then(|t| t.as_bool())
                .ok_or_else(|| EventError::new("bad_event", "typing needs a boolean `isTyping`"))?;
            Ok(ClientEvent::Typing { is_typing })
        }
        other => Err(EventError::new(
            "unknown_type",
            format!("unknown event type {other:?}"),
        )),
    }
}

fn encode(value: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("events serialize"))
}

#[derive(Serialize)]
struct MessageEvent<'a> {
    r#type: &'static str,
    id: u64,
    room: &'a str,
    from: &'a str,
    text: &'a str,
    timestamp: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
}

pub fn message(m: &StoredMessage) -> Bytes {
    encode(&MessageEvent {
        r#type: "message",
        id: m.id,
        room: &m.room,
        from: &m.from,
        text: &m.text,
        timestamp: &m.timestamp,
        nonce: m.nonce.as_deref(),
    })
}

pub fn welcome(
    room: &str,
    user: &str,
    members: &[String],
    last_id: u64,
    limits: Option<&Limits>,
) -> Bytes {
    #[derive(Serialize)]
    struct Welcome<'a> {
        r#type: &'static str,
        room: &'a str,
        user: &'a str,
        members: &'a [String],
        #[serde(rename = "lastId")]
        last_id: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        limits: Option<&'a Limits>,
    }
    encode(&Welcome {
        r#type: "welcome",
        room,
        user,
        members,
        last_id,
        limits,
    })
}

pub fn typing(user: &str, is_typing: bool) -> Bytes {
    #[derive(Serialize)]
    struct Typing<'a> {
        r#type: &'static str,
        user: &'a str,
        #[serde(rename = "isTyping")]
        is_typing: bool,
    }
    encode(&Typing {
        r#type: "typing",
        user,
        is_typing,
    })
}

pub fn presence(kind: &'static str, user: &str) -> Bytes {
    #[derive(Serialize)]
    struct Presence<'a> {
        r#type: &'static str,
        user: &'a str,
    }
    encode(&Presence { r#type: kind, user })
}

/// An `error` event; `nonce` names the refused message when there was one.
pub fn error(code: &str, message: &str, nonce: Option<&str>) -> Bytes {
    #[derive(Serialize)]
    struct Error<'a> {
        r#type: &'static str,
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        nonce: Option<&'a str>,
    }
    encode(&Error {
        r#type: "error",
        code,
        message,
        nonce,
    })
}

/// The `error` event for a message that could not be stored: its sender should send it
/// again (with the same `nonce`, it is stored once).
pub fn unavailable(nonce: Option<&str>) -> Bytes {
    error(
        "unavailable",
        "the message could not be stored; send it again",
        nonce,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_of_reads_the_nonce_as_the_parser_does() {
        for text in [
            r#"{"type":"message","text":"x","nonce":"a","nonce":"b"}"#,
            r#"{"type":"message","text":"x","nonce":"c-1"}"#,
            r#"{"type":"message","text":"x"}"#,
        ] {
            let parsed = match parse_client_event(text, 100) {
                Ok(ClientEvent::Message { nonce, .. }) => nonce,
                other => panic!("{text}: {other:?}"),
            };
            assert_eq!(nonce_of(text), parsed, "{text}");
        }
        assert_eq!(nonce_of(r#"["n-1"]"#), None);
        assert_eq!(nonce_of(r#"{"nonce":7}"#), None);
        assert_eq!(
            nonce_of(&format!(r#"{{"nonce":"{}"}}"#, "n".repeat(129))),
            None
        );
    }

    #[test]
    fn client_events() {
        assert_eq!(
            parse_client_event(
                r#"{"type":"message","text":"Hello!","timestamp":"2026-11-23T10:00:00Z","nonce":"c-17"}"#,
                100
            ),
            Ok(ClientEvent::Message {
                text: "Hello!".into(),
                nonce: Some("c-17".into())
            })
        );
        assert_eq!(
            parse_client_event(r#"{"type":"typing","isTyping":true}"#, 100),
            Ok(ClientEvent::Typing { is_typing: true })
        );
        assert_eq!(
            parse_client_event("{nope", 100).unwrap_err().code,
            "bad_json"
        );
        assert_eq!(parse_client_event("[1]", 100).unwrap_err().code, "bad_json");
        assert_eq!(
            parse_client_event(r#"{"type":"dance"}"#, 100)
                .unwrap_err()
                .code,
            "unknown_type"
        );
        assert_eq!(
            parse_client_event(r#"{"type":"message"}"#, 100)
                .unwrap_err()
                .code,
            "bad_event"
        );
        assert_eq!(
            parse_client_event(r#"{"type":"message","text":"toolong"}"#, 3)
                .unwrap_err()
                .code,
            "too_long"
        );
        // A refused message names its nonce, so the sender knows which one it was.
        let refused = parse_client_event(r#"{"type":"message","text":"toolong","nonce":"n-1"}"#, 3);
        assert_eq!(refused.unwrap_err().nonce.as_deref(), Some("n-1"));
        assert_eq!(
            nonce_of(r#"{"type":"message","text":"x","nonce":"n-2"}"#).as_deref(),
            Some("n-2")
        );
        assert_eq!(nonce_of(r#"{"type":"typing","isTyping":true}"#), None);
        assert_eq!(nonce_of("not json"), None);
        // A spoofed sender is not part of what is parsed.
        assert_eq!(
            parse_client_event(r#"{"type":"message","text":"hi","from":"Mallory"}"#, 100),
            Ok(ClientEvent::Message {
                text: "hi".into(),
                nonce: None
            })
        );
    }

    #[test]
    fn server_events() {
        let m = StoredMessage {
            room: "lobby".into(),
            id: 42,
            from: "Alice".into(),
            text: "Hi there!".into(),
            timestamp: "2026-11-23T10:00:00.123Z".into(),
            nonce: Some("c-17".into()),
        };
        assert_eq!(
            &message(&m)[..],
            br#"{"type":"message","id":42,"room":"lobby","from":"Alice","text":"Hi there!","timestamp":"2026-11-23T10:00:00.123Z","nonce":"c-17"}"#
        );
        assert_eq!(
            &welcome("lobby", "Alice", &["Alice".into(), "Bob".into()], 41, None)[..],
            br#"{"type":"welcome","room":"lobby","user":"Alice","members":["Alice","Bob"],"lastId":41}"#
        );
        let limits = Limits {
            events_per_sec: 20.0,
            burst: 40,
            max_text_chars: 4096,
        };
        assert_eq!(
            &welcome("lobby", "Alice", &[], 0, Some(&limits))[..],
            br#"{"type":"welcome","room":"lobby","user":"Alice","members":[],"lastId":0,"limits":{"eventsPerSec":20.0,"burst":40,"maxTextChars":4096}}"#
        );
        assert_eq!(
            &error("rate_limited", "slow down", Some("c-1"))[..],
            br#"{"type":"error","code":"rate_limited","message":"slow down","nonce":"c-1"}"#
        );
        assert_eq!(
            &typing("Bob", true)[..],
            br#"{"type":"typing","user":"Bob","isTyping":true}"#
        );
        assert_eq!(
            &presence("join", "Bob")[..],
            br#"{"type":"join","user":"Bob"}"#
        );
    }
}
