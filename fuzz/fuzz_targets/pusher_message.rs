//! The Pusher door's message decoder and encoders (crates/protocol/src/pusher.rs).
//!
//! 1. Parsing a client message never panics; a client event keeps its data as JSON.
//! 2. An event written with any data reads back as that data: a JSON string as the
//!    string, anything else as its JSON text; and data stored from what a library sent
//!    is JSON.
//! 3. A channel signature made for the input's socket id and channel validates, and
//!    validates for no other channel; a garbled one never does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use switchboard_protocol::pusher::{
    channel_auth_valid, error, event, parse_client_message, sign, stored_data, ClientMessage,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    if let Ok(ClientMessage::ClientEvent { data, event: name, channel }) = parse_client_message(&text) {
        assert!(serde_json::from_str::<serde_json::Value>(data.get()).is_ok());
        let stored = stored_data(&data);
        assert!(serde_json::from_str::<&RawValue>(stored.get()).is_ok());
        let frame = event(&name, &channel, &stored, Some(&channel));
        let read: serde_json::Value = serde_json::from_slice(&frame).expect("an event is JSON");
        assert_eq!(read["event"].as_str(), Some(name.as_str()));
        let sent = read["data"].as_str().expect("data is a string");
        match serde_json::from_str::<String>(stored.get()) {
            Ok(string) => assert_eq!(sent, string),
            Err(_) => assert_eq!(sent, stored.get()),
        }
    }
    // Any text as data, and as an error's message.
    let as_json = serde_json::to_string(&text).expect("a string is JSON");
    let raw = RawValue::from_string(as_json).expect("JSON");
    let frame = event("e", "c", &stored_data(&raw), None);
    let read: serde_json::Value = serde_json::from_slice(&frame).expect("JSON");
    assert!(read["data"].is_string());
    let refusal: serde_json::Value = serde_json::from_slice(&error(None, &text)).expect("JSON");
    assert_eq!(refusal["data"]["message"].as_str(), Some(text.as_str()));

    let middle = (0..=text.len() / 2)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let (socket, channel) = text.split_at(middle);
    let auth = format!("key:{}", sign("secret", format!("{socket}:{channel}").as_bytes()));
    assert!(channel_auth_valid("key", "secret", socket, channel, None, &auth));
    let other = format!("{channel}x");
    assert!(!channel_auth_valid("key", "secret", socket, &other, None, &auth));
    assert!(!channel_auth_valid("key", "secret", socket, channel, None, &text));
});
