//! The room protocol's JSON events, both directions (docs/PROTOCOL.md).
//!
//! A client sends [`ClientEvent`]s; the server reads them with [`parse_client_event`],
//! which refuses bad input with the `error` event's code (`bad_json`, `bad_event`,
//! `unknown_type`, `too_long`) and the refused message's nonce. The server sends
//! [`ServerEvent`]s, encoded with [`encode`] (or the helpers beside it); a client reads
//! them with [`ServerEvent::parse`].

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Publication, MAX_NONCE};

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientEvent {
    /// A publication: `text`, `data` (any JSON) or both, with an optional `nonce` that
    /// makes retries safe (a nonce is stored once per user and channel).
    Message {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
    /// The sender started or stopped typing.
    Typing {
        #[serde(rename = "isTyping")]
        is_typing: bool,
    },
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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Events a connection may send per second, on average.
    pub events_per_sec: f64,
    /// Events a connection may send in a burst.
    pub burst: u32,
    /// Longest message text, in characters.
    pub max_text_chars: usize,
}

/// The first event of every room connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub room: String,
    /// The name the server knows this connection by (from `?name=` or the token).
    pub user: String,
    /// The users in the room now, sorted (`[]` where the room keeps no presence).
    pub members: Vec<String>,
    /// The room's last publication id when this connection joined: history goes up to
    /// it, live events follow it.
    #[serde(rename = "lastId")]
    pub last_id: u64,
    /// The room's stream: ids continue within one epoch; a new epoch means the history
    /// before it is gone. Resume with `?since=ID&epoch=EPOCH`. (Empty from servers
    /// older than epochs.)
    #[serde(default)]
    pub epoch: String,
    /// Present when the connection asked to resume (`since`): whether every publication
    /// after it follows (`true`), or some are no longer kept or the epoch changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// A `typing` event: `user` started or stopped typing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Typing {
    pub user: String,
    #[serde(rename = "isTyping")]
    pub is_typing: bool,
}

/// A `join` or `leave` event: a user's first connection came or last one went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub user: String,
}

/// An `error` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEvent {
    pub code: String,
    pub message: String,
    /// The refused message's nonce, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// What a server sends. Borrowed to encode, owned once parsed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerEvent<'a> {
    Welcome(Cow<'a, Welcome>),
    Message(Cow<'a, Publication>),
    Typing(Cow<'a, Typing>),
    Join(Cow<'a, Presence>),
    Leave(Cow<'a, Presence>),
    Error(Cow<'a, ErrorEvent>),
}

/// The `type` of an event, read first.
#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

impl ServerEvent<'static> {
    /// Reads a server event. `Ok(None)` for an event of a type this version does not
    /// know (a newer server's); an error for text that is not one.
    pub fn parse(text: &str) -> Result<Option<Self>, serde_json::Error> {
        // In two steps: a `data` kept as raw JSON cannot be read through serde's
        // buffering of internally tagged enums.
        let kind: Kind<'_> = serde_json::from_str(text)?;
        Ok(Some(match &*kind.kind {
            "welcome" => Self::Welcome(Cow::Owned(serde_json::from_str(text)?)),
            "message" => Self::Message(Cow::Owned(serde_json::from_str(text)?)),
            "typing" => Self::Typing(Cow::Owned(serde_json::from_str(text)?)),
            "join" => Self::Join(Cow::Owned(serde_json::from_str(text)?)),
            "leave" => Self::Leave(Cow::Owned(serde_json::from_str(text)?)),
            "error" => Self::Error(Cow::Owned(serde_json::from_str(text)?)),
            _ => return Ok(None),
        }))
    }
}

/// The JSON of a server event.
pub fn encode(event: &ServerEvent<'_>) -> Bytes {
    Bytes::from(serde_json::to_vec(event).expect("events serialize"))
}

/// The `message` event of a publication.
pub fn message(publication: &Publication) -> Bytes {
    encode(&ServerEvent::Message(Cow::Borrowed(publication)))
}

pub fn welcome(welcome: &Welcome) -> Bytes {
    encode(&ServerEvent::Welcome(Cow::Borrowed(welcome)))
}

pub fn typing(user: &str, is_typing: bool) -> Bytes {
    encode(&ServerEvent::Typing(Cow::Owned(Typing {
        user: user.to_owned(),
        is_typing,
    })))
}

/// A `join` (`joined`) or `leave` event.
pub fn presence(joined: bool, user: &str) -> Bytes {
    let presence = Cow::Owned(Presence {
        user: user.to_owned(),
    });
    encode(&if joined {
        ServerEvent::Join(presence)
    } else {
        ServerEvent::Leave(presence)
    })
}

/// An `error` event; `nonce` names the refused message when there was one.
pub fn error(code: &str, message: &str, nonce: Option<&str>) -> Bytes {
    encode(&ServerEvent::Error(Cow::Owned(ErrorEvent {
        code: code.to_owned(),
        message: message.to_owned(),
        nonce: nonce.map(str::to_owned),
    })))
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

/// The `nonce` of a client's message event, read on its own (for refusals of events
/// that were not parsed, such as those over the rate limit).
/// Read the way [`parse_client_event`] reads it (an object's last `nonce` key wins).
pub fn nonce_of(text: &str) -> Option<String> {
    match serde_json::from_str::<Value>(text).ok()? {
        Value::Object(object) => valid_nonce(object.get("nonce")).ok().flatten(),
        _ => None,
    }
}

/// A `nonce` as a message may carry it: absent, null, or a string of up to
/// [`MAX_NONCE`] bytes.
fn valid_nonce(nonce: Option<&Value>) -> Result<Option<String>, ()> {
    match nonce {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(nonce)) if nonce.len() <= MAX_NONCE => Ok(Some(nonce.clone())),
        Some(_) => Err(()),
    }
}

/// Parses a client's text frame. `timestamp` and `from` are accepted and ignored: the
/// server sets the time and the sender.
pub fn parse_client_event(text: &str, max_text: usize) -> Result<ClientEvent, EventError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| EventError::new("bad_json", format!("not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(EventError::new("bad_json", "an event is a JSON object"));
    };
    let kind = object
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| EventError::new("bad_event", "an event needs a string `type`"))?;
    if !matches!(kind, "message" | "typing") {
        return Err(EventError::new(
            "unknown_type",
            format!("unknown event type {kind:?}"),
        ));
    }
    let is_message = kind == "message";
    let nonce = if is_message {
        valid_nonce(object.get("nonce")).map_err(|()| {
            EventError::new(
                "bad_event",
                format!("`nonce` must be a string of up to {MAX_NONCE} bytes"),
            )
        })?
    } else {
        None
    };
    let event: ClientEvent = serde_json::from_value(Value::Object(object))
        .map_err(|e| EventError::new("bad_event", e.to_string()).for_nonce(&nonce))?;
    if let ClientEvent::Message { text, data, .. } = &event {
        match text {
            None if data.is_none() => {
                return Err(EventError::new(
                    "bad_event",
                    "a message needs a string `text`, a `data` value, or both",
                )
                .for_nonce(&nonce))
            }
            Some(text) if text.chars().count() > max_text => {
                return Err(EventError::new(
                    "too_long",
                    format!("text is over {max_text} characters"),
                )
                .for_nonce(&nonce))
            }
            _ => {}
        }
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message_event(text: &str, nonce: Option<&str>) -> ClientEvent {
        ClientEvent::Message {
            text: Some(text.into()),
            data: None,
            nonce: nonce.map(Into::into),
        }
    }

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
            Ok(message_event("Hello!", Some("c-17")))
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
            parse_client_event(r#"{"type":"typing"}"#, 100)
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
        let refused = parse_client_event(r#"{"type":"message","text":5,"nonce":"n-2"}"#, 3);
        assert_eq!(
            refused.map_err(|e| (e.code, e.nonce)),
            Err(("bad_event", Some("n-2".into())))
        );
        assert_eq!(
            nonce_of(r#"{"type":"message","text":"x","nonce":"n-2"}"#).as_deref(),
            Some("n-2")
        );
        assert_eq!(nonce_of(r#"{"type":"typing","isTyping":true}"#), None);
        assert_eq!(nonce_of("not json"), None);
        // A spoofed sender is not part of what is parsed.
        assert_eq!(
            parse_client_event(r#"{"type":"message","text":"hi","from":"Mallory"}"#, 100),
            Ok(message_event("hi", None))
        );
    }

    #[test]
    fn data_messages_carry_any_json() {
        assert_eq!(
            parse_client_event(
                r#"{"type":"message","data":{"price":101.5},"nonce":"c-18"}"#,
                100
            ),
            Ok(ClientEvent::Message {
                text: None,
                data: Some(json!({"price": 101.5})),
                nonce: Some("c-18".into())
            })
        );
        assert_eq!(
            parse_client_event(r#"{"type":"message","text":"both","data":[1,"two"]}"#, 100),
            Ok(ClientEvent::Message {
                text: Some("both".into()),
                data: Some(json!([1, "two"])),
                nonce: None
            })
        );
        // What a client writes with these types is what the server reads.
        let sent = ClientEvent::Message {
            text: None,
            data: Some(json!({"x": [true, null]})),
            nonce: Some("n".into()),
        };
        let text = serde_json::to_string(&sent).unwrap();
        assert_eq!(
            text,
            r#"{"type":"message","data":{"x":[true,null]},"nonce":"n"}"#
        );
        assert_eq!(parse_client_event(&text, 10), Ok(sent));
        // A number is read exactly: written back and read again, it is the same number
        // (found by the room_event fuzz target; serde_json's fast float parsing was off
        // in the last place for this one).
        let big = format!(
            r#"{{"type":"message","data":{{"price":1{}.5}}}}"#,
            "6".repeat(66)
        );
        let parsed = parse_client_event(&big, 10).unwrap();
        let again = serde_json::to_string(&parsed).unwrap();
        assert_eq!(parse_client_event(&again, 10), Ok(parsed));
        assert_eq!(
            serde_json::to_string(&ClientEvent::Typing { is_typing: false }).unwrap(),
            r#"{"type":"typing","isTyping":false}"#
        );
    }

    fn publication() -> Publication {
        Publication {
            channel: "lobby".into(),
            id: 42,
            from: Some("Alice".into()),
            text: Some("Hi there!".into()),
            data: None,
            event: None,
            timestamp: "2026-11-23T10:00:00.123Z".into(),
            nonce: Some("c-17".into()),
            client: None,
            client_info: None,
        }
    }

    #[test]
    fn server_events() {
        let m = publication();
        assert_eq!(
            &message(&m)[..],
            br#"{"type":"message","id":42,"room":"lobby","from":"Alice","text":"Hi there!","timestamp":"2026-11-23T10:00:00.123Z","nonce":"c-17"}"#
        );
        let data = Publication {
            from: None,
            text: None,
            nonce: None,
            data: Some(serde_json::value::to_raw_value(&json!({"price": 101.5})).unwrap()),
            ..m.clone()
        };
        assert_eq!(
            &message(&data)[..],
            br#"{"type":"message","id":42,"room":"lobby","data":{"price":101.5},"timestamp":"2026-11-23T10:00:00.123Z"}"#
        );
        let mut greeting = Welcome {
            room: "lobby".into(),
            user: "Alice".into(),
            members: vec!["Alice".into(), "Bob".into()],
            last_id: 41,
            epoch: "e1".into(),
            recovered: None,
            limits: None,
        };
        assert_eq!(
            &welcome(&greeting)[..],
            br#"{"type":"welcome","room":"lobby","user":"Alice","members":["Alice","Bob"],"lastId":41,"epoch":"e1"}"#
        );
        greeting.recovered = Some(true);
        greeting.limits = Some(Limits {
            events_per_sec: 20.0,
            burst: 40,
            max_text_chars: 4096,
        });
        assert_eq!(
            &welcome(&greeting)[..],
            br#"{"type":"welcome","room":"lobby","user":"Alice","members":["Alice","Bob"],"lastId":41,"epoch":"e1","recovered":true,"limits":{"eventsPerSec":20.0,"burst":40,"maxTextChars":4096}}"#
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
            &presence(true, "Bob")[..],
            br#"{"type":"join","user":"Bob"}"#
        );
        assert_eq!(
            &presence(false, "Bob")[..],
            br#"{"type":"leave","user":"Bob"}"#
        );
    }

    #[test]
    fn server_events_parse_back() {
        let m = Publication {
            data: Some(serde_json::value::to_raw_value(&json!({"deep": [1, {"a": "b"}]})).unwrap()),
            ..publication()
        };
        let greeting = Welcome {
            room: "lobby".into(),
            user: "Alice".into(),
            members: vec![],
            last_id: 7,
            epoch: "e".into(),
            recovered: Some(false),
            limits: None,
        };
        for (bytes, expected) in [
            (message(&m), ServerEvent::Message(Cow::Owned(m.clone()))),
            (
                welcome(&greeting),
                ServerEvent::Welcome(Cow::Owned(greeting.clone())),
            ),
            (
                typing("Bob", false),
                ServerEvent::Typing(Cow::Owned(Typing {
                    user: "Bob".into(),
                    is_typing: false,
                })),
            ),
            (
                presence(false, "Bob"),
                ServerEvent::Leave(Cow::Owned(Presence { user: "Bob".into() })),
            ),
            (
                error("forbidden", "no", None),
                ServerEvent::Error(Cow::Owned(ErrorEvent {
                    code: "forbidden".into(),
                    message: "no".into(),
                    nonce: None,
                })),
            ),
        ] {
            let text = std::str::from_utf8(&bytes).unwrap();
            assert_eq!(ServerEvent::parse(text).unwrap(), Some(expected), "{text}");
        }
        // A welcome from a server older than epochs still reads.
        let old = r#"{"type":"welcome","room":"r","user":"u","members":[],"lastId":3}"#;
        let Some(ServerEvent::Welcome(old)) = ServerEvent::parse(old).unwrap() else {
            panic!("not a welcome")
        };
        assert_eq!(
            (old.last_id, old.epoch.as_str(), old.recovered),
            (3, "", None)
        );
        assert_eq!(ServerEvent::parse(r#"{"type":"dance"}"#).unwrap(), None);
        assert!(ServerEvent::parse(r#"{"type":"message"}"#).is_err());
    }
}
