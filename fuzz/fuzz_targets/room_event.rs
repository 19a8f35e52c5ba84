//! The room protocol's JSON events (crates/protocol/src/event.rs).
//!
//! Input: one byte for the text limit, then a client's text frame (lossily UTF-8).
//!
//! 1. Parsing never panics. An accepted event, written back as the JSON a client sends,
//!    parses to the same event; what `nonce_of` reads agrees with the parser on it; the
//!    limit is the only difference between refusing as `too_long` and accepting; a
//!    refusal has a known code and becomes an `error` event carrying its nonce.
//! 2. The same bytes, cut into strings and numbers, build every server event: each is
//!    valid JSON holding exactly what it was built from.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use switchboard_protocol::event::{self, ClientEvent, Limits, MAX_NONCE};
use switchboard_protocol::StoredMessage;

const CODES: [&str; 4] = ["bad_json", "bad_event", "too_long", "unknown_type"];

/// The JSON a client sends for `event`, as DESIGN.md shows it.
fn client_json(event: &ClientEvent) -> String {
    match event {
        ClientEvent::Message {
            text,
            nonce: Some(nonce),
        } => json!({"type": "message", "text": text, "nonce": nonce}).to_string(),
        ClientEvent::Message { text, nonce: None } => {
            json!({"type": "message", "text": text}).to_string()
        }
        ClientEvent::Typing { is_typing } => {
            json!({"type": "typing", "isTyping": is_typing}).to_string()
        }
    }
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
            if let ClientEvent::Message { text: body, nonce } = &parsed {
                assert!(body.chars().count() <= max_text);
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
                    Ok(ClientEvent::Message { text: body, nonce }) => {
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
    let stored = StoredMessage {
        room: u.arbitrary()?,
        id: u.arbitrary()?,
        from: u.arbitrary()?,
        text: u.arbitrary()?,
        timestamp: u.arbitrary()?,
        nonce: u.arbitrary()?,
    };
    let value = parse_json(&event::message(&stored));
    assert_eq!(
        value,
        match &stored.nonce {
            Some(nonce) => json!({
                "type": "message", "id": stored.id, "room": stored.room, "from": stored.from,
                "text": stored.text, "timestamp": stored.timestamp, "nonce": nonce,
            }),
            None => json!({
                "type": "message", "id": stored.id, "room": stored.room, "from": stored.from,
                "text": stored.text, "timestamp": stored.timestamp,
            }),
        }
    );
    // What a client would send with that text and nonce comes back as it was (when the
    // nonce is short enough to be accepted).
    let sent = ClientEvent::Message {
        text: stored.text.clone(),
        nonce: stored.nonce.clone(),
    };
    let parsed = event::parse_client_event(&client_json(&sent), usize::MAX);
    if stored.nonce.as_ref().is_none_or(|n| n.len() <= MAX_NONCE) {
        assert_eq!(parsed, Ok(sent));
    } else {
        assert_eq!(parsed.map_err(|e| e.code), Err("bad_event"));
    }

    let user: String = u.arbitrary()?;
    let members: Vec<String> = u.arbitrary()?;
    let last_id: u64 = u.arbitrary()?;
    let limits = if u.arbitrary()? {
        Some(Limits {
            events_per_sec: u.arbitrary()?,
            burst: u.arbitrary()?,
            max_text_chars: u.arbitrary()?,
        })
    } else {
        None
    };
    let welcome = event::welcome(&stored.room, &user, &members, last_id, limits.as_ref());
    let value = parse_json(&welcome);
    assert_eq!(value["type"], "welcome");
    assert_eq!(value["room"], stored.room.as_str());
    assert_eq!(value["user"], user.as_str());
    assert_eq!(value["members"], json!(members));
    assert_eq!(value["lastId"], last_id);
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
    for kind in ["join", "leave"] {
        assert_eq!(
            parse_json(&event::presence(kind, &user)),
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
