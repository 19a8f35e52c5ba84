//! The room protocol's JSON events (crates/protocol/src/room.rs).
//!
//! Input: one byte for the text limit, then a client's text frame (lossily UTF-8).
//!
//! 1. Parsing never panics. An accepted event, written back as the JSON a client sends,
//!    parses to the same event; what `nonce_of` reads agrees with the parser on it; the
//!    limit is the only difference between refusing as `too_long` and accepting; a
//!    refusal has a known code and becomes an `error` event carrying its nonce.
//! 2. The same bytes, cut into strings and numbers, build every server event: each is
//!    valid JSON holding exactly what it was built from, and reads back as it was.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::borrow::Cow;

use switchboard_protocol::room::{self as event, ClientEvent, Limits, ServerEvent, Welcome};
use switchboard_protocol::{Publication, MAX_NONCE};

const CODES: [&str; 4] = ["bad_json", "bad_event", "too_long", "unknown_type"];

/// The JSON a client sends for `event`, written with the protocol's own types.
fn client_json(event: &ClientEvent) -> String {
    serde_json::to_string(event).expect("client events serialize")
}

fn parse_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(bytes)))
}

fn check_client_event(text: &str, max_text: usize) {
    if let Some(nonce) = event::nonce_of(text) {
        assert!(nonce.len() <= MAX_NONCE);
    }
    match event::parse_client_event(text, max_text) {
        Ok(parsed) => {
            if let ClientEvent::Message { text, data, nonce } = &parsed {
                assert!(text.is_some() || data.is_some());
                assert!(text.as_ref().is_none_or(|t| t.chars().count() <= max_text));
                assert!(nonce.as_ref().is_none_or(|n| n.len() <= MAX_NONCE));
            }
            // Written back and parsed again: the same event (whatever else the input
            // held, such as a spoofed `from` or duplicate keys, is gone).
            let canonical = client_json(&parsed);
            assert_eq!(
                event::parse_client_event(&canonical, max_text).as_ref(),
                Ok(&parsed)
            );
            let nonce = match &parsed {
                ClientEvent::Message { nonce, .. } => nonce.clone(),
                ClientEvent::Typing { .. } => None,
            };
            assert_eq!(event::nonce_of(&canonical), nonce, "{canonical}");
            // A larger limit accepts it too.
            assert_eq!(event::parse_client_event(text, usize::MAX), Ok(parsed));
        }
        Err(refused) => {
            assert!(CODES.contains(&refused.code), "code {:?}", refused.code);
            assert!(refused.nonce.as_ref().is_none_or(|n| n.len() <= MAX_NONCE));
            if refused.code == "too_long" {
                match event::parse_client_event(text, usize::MAX) {
                    Ok(ClientEvent::Message {
                        text: Some(body),
                        nonce,
                        ..
                    }) => {
                        assert!(body.chars().count() > max_text);
                        assert_eq!(nonce, refused.nonce);
                    }
                    other => panic!("too long only under the limit, yet {other:?}"),
                }
            } else {
                // Only the length depends on the limit.
                assert_eq!(
                    event::parse_client_event(text, usize::MAX),
                    Err(refused.clone())
                );
            }
            let sent = event::error(refused.code, &refused.message, refused.nonce.as_deref());
            let value = parse_json(&sent);
            assert_eq!(value["type"], "error");
            assert_eq!(value["code"], refused.code);
            assert_eq!(value["message"], refused.message.as_str());
            assert_eq!(
                value.get("nonce").and_then(Value::as_str),
                refused.nonce.as_deref()
            );
        }
    }
}

fn check_server_events(u: &mut Unstructured<'_>) -> Result<()> {
    let data: Option<i64> = u.arbitrary()?;
    let stored = Publication {
        channel: u.arbitrary()?,
        id: u.arbitrary()?,
        from: u.arbitrary()?,
        text: u.arbitrary()?,
        data: data.map(|n| serde_json::value::to_raw_value(&json!({"n": n})).expect("raw")),
        event: u.arbitrary()?,
        timestamp: u.arbitrary()?,
        nonce: u.arbitrary()?,
        client: None,
        client_info: None,
    };
    let sent = event::message(&stored);
    let value = parse_json(&sent);
    let mut expected = json!({
        "type": "message", "id": stored.id, "room": stored.channel, "timestamp": stored.timestamp,
    });
    for (key, field) in [
        ("from", &stored.from),
        ("text", &stored.text),
        ("event", &stored.event),
        ("nonce", &stored.nonce),
    ] {
        if let Some(field) = field {
            expected[key] = json!(field);
        }
    }
    if let Some(n) = data {
        expected["data"] = json!({"n": n});
    }
    assert_eq!(value, expected);
    // A client reads back exactly what was sent.
    let text = std::str::from_utf8(&sent).expect("JSON is UTF-8");
    assert_eq!(
        ServerEvent::parse(text).expect("a server event"),
        Some(ServerEvent::Message(Cow::Owned(stored.clone())))
    );
    // What a client would send with that text and nonce comes back as it was (when the
    // nonce is short enough to be accepted and there is something to publish).
    let sent = ClientEvent::Message {
        text: stored.text.clone(),
        data: data.map(|n| json!({"n": n})),
        nonce: stored.nonce.clone(),
    };
    let parsed = event::parse_client_event(&client_json(&sent), usize::MAX);
    if stored.text.is_none() && data.is_none() {
        assert_eq!(parsed.map_err(|e| e.code), Err("bad_event"));
    } else if stored.nonce.as_ref().is_none_or(|n| n.len() <= MAX_NONCE) {
        assert_eq!(parsed, Ok(sent));
    } else {
        assert_eq!(parsed.map_err(|e| e.code), Err("bad_event"));
    }

    let user: String = u.arbitrary()?;
    let members: Vec<String> = u.arbitrary()?;
    let last_id: u64 = u.arbitrary()?;
    let epoch: String = u.arbitrary()?;
    let recovered: Option<bool> = u.arbitrary()?;
    let limits = if u.arbitrary()? {
        Some(Limits {
            events_per_sec: u.arbitrary()?,
            burst: u.arbitrary()?,
            max_text_chars: u.arbitrary()?,
        })
    } else {
        None
    };
    let welcome = event::welcome(&Welcome {
        room: stored.channel.clone(),
        user: user.clone(),
        members: members.clone(),
        last_id,
        epoch: epoch.clone(),
        recovered,
        limits,
    });
    let value = parse_json(&welcome);
    assert_eq!(value["type"], "welcome");
    assert_eq!(value["room"], stored.channel.as_str());
    assert_eq!(value["user"], user.as_str());
    assert_eq!(value["members"], json!(members));
    assert_eq!(value["lastId"], last_id);
    assert_eq!(value["epoch"], epoch.as_str());
    assert_eq!(value.get("recovered").and_then(Value::as_bool), recovered);
    match limits {
        None => assert!(value.get("limits").is_none()),
        Some(limits) => {
            let sent = &value["limits"];
            assert_eq!(sent["burst"], limits.burst);
            assert_eq!(sent["maxTextChars"], limits.max_text_chars);
            // The number as written, read with the standard library's exact parser
            // (serde_json's default float parsing may be off by a few units in the last
            // place). JSON has no NaN or infinity: they are written as null.
            let welcome = std::str::from_utf8(&welcome).expect("JSON is UTF-8");
            let (_, after) = welcome
                .rsplit_once(r#""limits":{"eventsPerSec":"#)
                .expect("limits");
            let written = &after[..after.find(',').expect("more limits")];
            if limits.events_per_sec.is_finite() {
                assert_eq!(
                    written.parse::<f64>(),
                    Ok(limits.events_per_sec),
                    "{written}"
                );
            } else {
                assert_eq!(written, "null");
            }
        }
    }

    let is_typing: bool = u.arbitrary()?;
    assert_eq!(
        parse_json(&event::typing(&user, is_typing)),
        json!({"type": "typing", "user": user, "isTyping": is_typing})
    );
    for (joined, kind) in [(true, "join"), (false, "leave")] {
        assert_eq!(
            parse_json(&event::presence(joined, &user)),
            json!({"type": kind, "user": user})
        );
    }

    let code: String = u.arbitrary()?;
    let message: String = u.arbitrary()?;
    let value = parse_json(&event::error(&code, &message, stored.nonce.as_deref()));
    assert_eq!(value["type"], "error");
    assert_eq!(value["code"], code.as_str());
    assert_eq!(value["message"], message.as_str());
    assert_eq!(
        value.get("nonce").and_then(Value::as_str),
        stored.nonce.as_deref()
    );
    let value = parse_json(&event::unavailable(stored.nonce.as_deref()));
    assert_eq!(value["code"], "unavailable");
    assert_eq!(
        value.get("nonce").and_then(Value::as_str),
        stored.nonce.as_deref()
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let max_text = match limit {
        u8::MAX => usize::MAX,
        n => usize::from(n),
    };
    check_client_event(&String::from_utf8_lossy(rest), max_text);
    let _ = check_server_events(&mut Unstructured::new(rest));
});
