//! The Pusher Channels protocol (version 7): the messages its client libraries send and
//! read over a WebSocket, and the signatures that authorise channels, users, HTTP API
//! requests and webhooks. Written from the protocol's public reference; no I/O here.
//!
//! Every message is a JSON object `{"event", "channel"?, "data"?}`. A client sends
//! `data` as an object for the `pusher:` events and as anything for a client event;
//! the server sends `data` as a string holding JSON (the libraries parse it), which is
//! how the service sends it.

use std::fmt::Write as _;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;

/// The protocol versions this side speaks (pusher-js says 7).
pub const PROTOCOLS: std::ops::RangeInclusive<u32> = 5..=7;

/// Longest channel name the protocol allows, in bytes.
pub const MAX_CHANNEL: usize = 164;

/// The prefix of a signed-in user's personal channel.
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";

/// What a client sent.
#[derive(Debug, Clone)]
pub enum ClientMessage {
    Subscribe {
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    Ping,
    Pong,
    Signin {
        auth: String,
        user_data: String,
    },
    /// A `client-` event for the other members of `channel`; `data` as sent.
    ClientEvent {
        event: String,
        channel: String,
        data: Box<RawValue>,
    },
    /// Another `pusher:` event, or an event name this side does not take.
    Other(String),
}

/// Why a client's message was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("not a JSON object with an event: {0}")]
    Json(String),
    #[error("{event} needs {what}")]
    Missing {
        event: &'static str,
        what: &'static str,
    },
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// The object a `pusher:` event carries, whether sent as an object or as a string of
/// JSON (both are seen from libraries).
fn data_object(data: Option<&RawValue>) -> Option<serde_json::Map<String, serde_json::Value>> {
    let data = data?;
    match serde_json::from_str::<serde_json::Value>(data.get()).ok()? {
        serde_json::Value::Object(map) => Some(map),
        serde_json::Value::String(text) => serde_json::from_str(&text).ok(),
        _ => None,
    }
}

fn string_field(map: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<String> {
    match map.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Parses one client message.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, Malformed> {
    let envelope: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| Malformed::Json(e.to_string()))?;
    let event = envelope.event.as_ref();
    match event {
        "pusher:subscribe" => {
            let data = data_object(envelope.data).ok_or(Malformed::Missing {
                event: "pusher:subscribe",
                what: "data with a channel",
            })?;
            let channel = string_field(&data, "channel").ok_or(Malformed::Missing {
                event: "pusher:subscribe",
                what: "a channel",
            })?;
            Ok(ClientMessage::Subscribe {
                channel,
                auth: string_field(&data, "auth"),
                channel_data: string_field(&data, "channel_data"),
            })
        }
        "pusher:unsubscribe" => {
            let channel = data_object(envelope.data)
                .and_then(|data| string_field(&data, "channel"))
                .ok_or(Malformed::Missing {
                    event: "pusher:unsubscribe",
                    what: "a channel",
                })?;
            Ok(ClientMessage::Unsubscribe { channel })
        }
        "pusher:ping" => Ok(ClientMessage::Ping),
        "pusher:pong" => Ok(ClientMessage::Pong),
        "pusher:signin" => {
            let data = data_object(envelope.data).ok_or(Malformed::Missing {
                event: "pusher:signin",
                what: "data with auth and user_data",
            })?;
            match (
                string_field(&data, "auth"),
                string_field(&data, "user_data"),
            ) {
                (Some(auth), Some(user_data)) => Ok(ClientMessage::Signin { auth, user_data }),
                _ => Err(Malformed::Missing {
                    event: "pusher:signin",
                    what: "auth and user_data",
                }),
            }
        }
        client if client.starts_with("client-") => {
            let channel = envelope.channel.ok_or(Malformed::Missing {
                event: "a client event",
                what: "a channel",
            })?;
            let data = match envelope.data {
                Some(data) => data.to_owned(),
                None => RawValue::from_string("null".into()).expect("null is JSON"),
            };
            Ok(ClientMessage::ClientEvent {
                event: client.to_owned(),
                channel,
                data,
            })
        }
        other => Ok(ClientMessage::Other(other.to_owned())),
    }
}

/// The kind of a channel, by its name's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    /// `private-encrypted-`: end-to-end encrypted by the clients; the server passes its
    /// events through and takes no client events.
    Encrypted,
    Presence,
    /// A signed-in user's `#server-to-user-{id}`.
    User,
}

impl ChannelKind {
    pub fn of(channel: &str) -> Self {
        if channel.starts_with("private-encrypted-") {
            Self::Encrypted
        } else if channel.starts_with("private-") {
            Self::Private
        } else if channel.starts_with("presence-") {
            Self::Presence
        } else if channel.starts_with(USER_CHANNEL_PREFIX) {
            Self::User
        } else {
            Self::Public
        }
    }

    /// Whether subscribing takes a signature.
    pub fn is_authorised(self) -> bool {
        matches!(self, Self::Private | Self::Encrypted | Self::Presence)
    }
}

/// Whether `channel` is a channel name the protocol allows: 1-164 characters of
/// `A-Z a-z 0-9 _ - = @ , . ;` (and a personal channel's `#`).
pub fn valid_channel(channel: &str) -> bool {
    let name = channel.strip_prefix('#').unwrap_or(channel);
    (1..=MAX_CHANNEL).contains(&channel.len())
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
}

/// Hex of HMAC-SHA256 of `message` with `secret`.
pub fn sign(secret: &str, message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(message);
    hex(&mac.finalize().into_bytes())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Hex of the MD5 of `body` (the HTTP API's `body_md5`).
pub fn body_md5(body: &[u8]) -> String {
    use md5::Digest;
    hex(&md5::Md5::digest(body))
}

/// Compares two strings in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Whether `auth` (`KEY:SIGNATURE`) authorises `socket_id` on `channel`: the signature
/// of `SOCKET_ID:CHANNEL` (presence: `:CHANNEL_DATA` after it) with the app's secret.
pub fn channel_auth_valid(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let Some((auth_key, signature)) = auth.split_once(':') else {
        return false;
    };
    let mut message = format!("{socket_id}:{channel}");
    if let Some(data) = channel_data {
        message.push(':');
        message.push_str(data);
    }
    same(auth_key, key) & same(signature, &sign(secret, message.as_bytes()))
}

/// Whether `auth` authorises `socket_id` as the user of `user_data`: the signature of
/// `SOCKET_ID::user::USER_DATA`.
pub fn user_auth_valid(
    key: &str,
    secret: &str,
    socket_id: &str,
    user_data: &str,
    auth: &str,
) -> bool {
    let Some((auth_key, signature)) = auth.split_once(':') else {
        return false;
    };
    let message = format!("{socket_id}::user::{user_data}");
    same(auth_key, key) & same(signature, &sign(secret, message.as_bytes()))
}

/// What the HTTP API signs: `METHOD\nPATH\nQUERY`, the query's parameters but
/// `auth_signature` with lower-cased keys, sorted by key, as `k=v` joined by `&`
/// (values as they were decoded).
pub fn api_string_to_sign(method: &str, path: &str, params: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, &str)> = params
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{method}\n{path}\n{}", query.join("&"))
}

/// A user's id from its `user_data` or `channel_data` (`user_id` or, for sign-in,
/// `id`): a string, or a number taken as its decimal string.
pub fn user_id_of(data: &str, field: &str) -> Option<(String, Option<Box<RawValue>>)> {
    #[derive(Deserialize)]
    struct Member {
        #[serde(default)]
        user_id: Option<serde_json::Value>,
        #[serde(default)]
        id: Option<serde_json::Value>,
        #[serde(default)]
        user_info: Option<Box<RawValue>>,
    }
    let member: Member = serde_json::from_str(data).ok()?;
    let id = if field == "id" {
        member.id
    } else {
        member.user_id
    };
    let id = match id? {
        serde_json::Value::String(s) if !s.is_empty() => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Some((id, member.user_info))
}

fn frame(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("JSON serializes"))
}

fn json_string(data: &serde_json::Value) -> String {
    serde_json::to_string(data).expect("JSON serializes")
}

/// `pusher:connection_established`.
pub fn connection_established(socket_id: &str, activity_timeout: u64) -> Bytes {
    let data = serde_json::json!({ "socket_id": socket_id, "activity_timeout": activity_timeout });
    frame(&serde_json::json!({
        "event": "pusher:connection_established",
        "data": json_string(&data),
    }))
}

/// `pusher:error`: a code (none for a refusal the service sends without one) and a
/// message.
pub fn error(code: Option<u16>, message: &str) -> Bytes {
    frame(&serde_json::json!({
        "event": "pusher:error",
        "data": { "code": code, "message": message },
    }))
}

pub fn ping() -> Bytes {
    Bytes::from_static(br#"{"event":"pusher:ping","data":"{}"}"#)
}

pub fn pong() -> Bytes {
    Bytes::from_static(br#"{"event":"pusher:pong","data":"{}"}"#)
}

/// A presence channel's members: ids in order, and each one's `user_info`.
#[derive(Debug, Clone, Default)]
pub struct Members<'a> {
    pub members: Vec<(&'a str, Option<&'a RawValue>)>,
}

/// `pusher_internal:subscription_succeeded`, with the member list on a presence channel.
pub fn subscription_succeeded(channel: &str, members: Option<&Members<'_>>) -> Bytes {
    let data = match members {
        None => "{}".to_owned(),
        Some(members) => {
            let ids: Vec<&str> = members.members.iter().map(|(id, _)| *id).collect();
            let hash: serde_json::Map<String, serde_json::Value> = members
                .members
                .iter()
                .map(|(id, info)| {
                    let info = info
                        .and_then(|raw| serde_json::from_str(raw.get()).ok())
                        .unwrap_or(serde_json::Value::Null);
                    ((*id).to_owned(), info)
                })
                .collect();
            json_string(&serde_json::json!({
                "presence": { "ids": ids, "hash": hash, "count": ids.len() }
            }))
        }
    };
    frame(&serde_json::json!({
        "event": "pusher_internal:subscription_succeeded",
        "channel": channel,
        "data": data,
    }))
}

/// `pusher_internal:member_added`.
pub fn member_added(channel: &str, user_id: &str, user_info: Option<&RawValue>) -> Bytes {
    let info = user_info
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or(serde_json::Value::Null);
    let data = serde_json::json!({ "user_id": user_id, "user_info": info });
    frame(&serde_json::json!({
        "event": "pusher_internal:member_added",
        "channel": channel,
        "data": json_string(&data),
    }))
}

/// `pusher_internal:member_removed`.
pub fn member_removed(channel: &str, user_id: &str) -> Bytes {
    let data = serde_json::json!({ "user_id": user_id });
    frame(&serde_json::json!({
        "event": "pusher_internal:member_removed",
        "channel": channel,
        "data": json_string(&data),
    }))
}

/// `pusher:signin_success`.
pub fn signin_success(user_data: &str) -> Bytes {
    frame(&serde_json::json!({
        "event": "pusher:signin_success",
        "data": { "user_data": user_data },
    }))
}

/// An event on `channel`. `data` is JSON: a JSON string is sent as that string (data
/// published as text), anything else as the string of its JSON text, as the service
/// sends data. `user_id` names the sender of a client event on a presence channel.
pub fn event(event: &str, channel: &str, data: &RawValue, user_id: Option<&str>) -> Bytes {
    let data = match serde_json::from_str::<String>(data.get()) {
        Ok(text) => text,
        Err(_) => data.get().to_owned(),
    };
    let mut message = serde_json::json!({
        "event": event,
        "channel": channel,
        "data": data,
    });
    if let Some(user) = user_id {
        message["user_id"] = serde_json::Value::String(user.to_owned());
    }
    frame(&message)
}

/// The JSON this side stores for an event's `data` as the HTTP API or a library sent
/// it: a string holding JSON is that JSON (so the other doors see the object); any
/// other string stays a string; anything else is kept as it is.
pub fn stored_data(data: &RawValue) -> Box<RawValue> {
    if let Ok(text) = serde_json::from_str::<String>(data.get()) {
        if let Ok(json) = serde_json::from_str::<&RawValue>(&text) {
            return json.to_owned();
        }
    }
    data.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn parses_what_the_libraries_send() {
        let subscribe = r#"{"event":"pusher:subscribe","data":{"auth":"k:s","channel_data":"{\"user_id\":\"1\"}","channel":"presence-a"}}"#;
        assert!(matches!(
            parse_client_message(subscribe).unwrap(),
            ClientMessage::Subscribe { channel, auth: Some(auth), channel_data: Some(data) }
                if channel == "presence-a" && auth == "k:s" && data == r#"{"user_id":"1"}"#
        ));
        let as_string = r#"{"event":"pusher:subscribe","data":"{\"channel\":\"x\"}"}"#;
        assert!(matches!(
            parse_client_message(as_string).unwrap(),
            ClientMessage::Subscribe { channel, auth: None, .. } if channel == "x"
        ));
        assert!(matches!(
            parse_client_message(r#"{"event":"pusher:ping","data":{}}"#).unwrap(),
            ClientMessage::Ping
        ));
        let client = r#"{"event":"client-typing","channel":"private-a","data":{"x":1}}"#;
        match parse_client_message(client).unwrap() {
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => {
                assert_eq!(
                    (event.as_str(), channel.as_str(), data.get()),
                    ("client-typing", "private-a", r#"{"x":1}"#)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_client_message("[]").is_err());
        assert!(parse_client_message(r#"{"event":"pusher:subscribe"}"#).is_err());
        assert!(
            parse_client_message(r#"{"event":"pusher:subscribe","data":{"channel":5}}"#).is_err()
        );
        assert!(parse_client_message(r#"{"event":"client-x","data":1}"#).is_err());
        assert!(matches!(
            parse_client_message(r#"{"event":"other"}"#).unwrap(),
            ClientMessage::Other(event) if event == "other"
        ));
    }

    #[test]
    fn signatures_match_the_reference_examples() {
        // The protocol reference's worked example of a private channel.
        let secret = "7ad3773142a6692b25b8";
        let auth = format!(
            "278d425bdf160c739803:{}",
            sign(secret, b"1234.1234:private-foobar")
        );
        assert_eq!(
            auth,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let valid = |key: &str, socket: &str, auth: &str| {
            channel_auth_valid(key, secret, socket, "private-foobar", None, auth)
        };
        assert!(valid("278d425bdf160c739803", "1234.1234", &auth));
        assert!(!valid("278d425bdf160c739803", "1234.1235", &auth));
        assert!(!valid("other", "1234.1234", &auth));
        assert!(!valid("278d425bdf160c739803", "1234.1234", "nocolon"));
        // The HTTP API reference's example.
        let params: Vec<(String, String)> = [
            ("auth_key", "278d425bdf160c739803"),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(
            body_md5(body.as_bytes()),
            "ec365a775a4cd0599faeb73354201b6f"
        );
        let signed = api_string_to_sign("POST", "/apps/3/events", &params);
        assert_eq!(
            sign(secret, signed.as_bytes()),
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn server_messages_carry_data_as_a_string_of_json() {
        let sent = event("ev", "c", &raw(r#"{"a":1}"#), None);
        let value: serde_json::Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(value["data"], r#"{"a":1}"#);
        let text = event("ev", "c", &raw(r#""plain""#), Some("7"));
        let value: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(
            (value["data"].as_str(), value["user_id"].as_str()),
            (Some("plain"), Some("7"))
        );
        assert_eq!(stored_data(&raw(r#""{\"a\":1}""#)).get(), r#"{"a":1}"#);
        assert_eq!(stored_data(&raw(r#""hello""#)).get(), r#""hello""#);
        assert_eq!(stored_data(&raw(r#"{"b":2}"#)).get(), r#"{"b":2}"#);
        let info = raw(r#"{"name":"Ann"}"#);
        let members = Members {
            members: vec![("1", Some(&info)), ("2", None)],
        };
        let ok: serde_json::Value =
            serde_json::from_slice(&subscription_succeeded("presence-a", Some(&members))).unwrap();
        let data: serde_json::Value = serde_json::from_str(ok["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["presence"]["count"], 2);
        assert_eq!(data["presence"]["hash"]["1"]["name"], "Ann");
        assert_eq!(data["presence"]["ids"], serde_json::json!(["1", "2"]));
    }

    #[test]
    fn channel_names_and_kinds() {
        assert!(valid_channel("private-a_b-c=d@e,f.g;h"));
        assert!(valid_channel("#server-to-user-42"));
        assert!(!valid_channel("a:b"));
        assert!(!valid_channel(""));
        assert!(!valid_channel("#"));
        assert!(!valid_channel(&"a".repeat(165)));
        assert_eq!(
            ChannelKind::of("private-encrypted-x"),
            ChannelKind::Encrypted
        );
        assert_eq!(ChannelKind::of("presence-x"), ChannelKind::Presence);
        assert_eq!(ChannelKind::of("#server-to-user-1"), ChannelKind::User);
        assert_eq!(ChannelKind::of("x"), ChannelKind::Public);
        assert_eq!(
            user_id_of(r#"{"user_id":5,"user_info":{"a":1}}"#, "user_id")
                .unwrap()
                .0,
            "5"
        );
        assert_eq!(user_id_of(r#"{"id":"u"}"#, "id").unwrap().0, "u");
        assert!(user_id_of(r#"{"user_id":""}"#, "user_id").is_none());
        assert!(user_id_of(r#"{"user_id":[1]}"#, "user_id").is_none());
    }
}
