//! The Centrifugo door's command decoders (crates/protocol/src/centrifuge.rs).
//!
//! Input: one byte choosing the encoding (even: JSON, odd: Protobuf), then a frame.
//!
//! 1. Decoding never panics and never returns more commands than asked for.
//! 2. Decoded commands, encoded again one per line (JSON) or one after another
//!    (Protobuf), decode to the same commands.
//! 3. A reply built from the frame's bytes (an error with a message, a publication
//!    push whose data is JSON) reads back as it was written.
//! 4. The frame read as a `POST /emulation` body never panics, and a request it gives,
//!    encoded again, reads back the same.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use switchboard_protocol::centrifuge::{
    decode_commands, decode_emulation, decode_replies, encode_command, encode_emulation,
    encode_reply, publication_push, Encoding, Error, Publisher, Reply,
};

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, frame)) = data.split_first() else {
        return;
    };
    let encoding = if choice % 2 == 0 {
        Encoding::Json
    } else {
        Encoding::Protobuf
    };
    if let Ok(commands) = decode_commands(encoding, frame, MAX) {
        assert!(!commands.is_empty() && commands.len() <= MAX);
        let mut again = Vec::new();
        for command in &commands {
            if encoding == Encoding::Json && !again.is_empty() {
                again.push(b'\n');
            }
            again.extend_from_slice(&encode_command(encoding, command));
        }
        let decoded = decode_commands(encoding, &again, MAX).expect("re-encoded commands decode");
        assert_eq!(decoded, commands);
    }
    let text = String::from_utf8_lossy(frame).into_owned();
    let reply = Reply {
        id: u32::from(choice),
        error: Some(Error {
            code: u32::from(choice) + 100,
            message: text.clone(),
            temporary: choice % 3 == 0,
        }),
        ..Reply::default()
    };
    let written = encode_reply(encoding, &reply);
    assert_eq!(decode_replies(encoding, &written).expect("a reply"), vec![reply]);
    let data = serde_json::to_vec(&text).expect("a string is JSON");
    let tags = HashMap::from([("event".to_owned(), text.clone())]);
    let publisher = Publisher {
        user: &text,
        client: &text,
        conn_info: &data,
    };
    let push = publication_push(encoding, &text, u64::from(choice), &data, Some(publisher), &tags);
    let replies = decode_replies(encoding, &push).expect("a push");
    let push = replies[0].push.as_ref().expect("a push");
    let publication = push.publication.as_ref().expect("a publication");
    assert_eq!(push.channel, text);
    assert_eq!(publication.data, data);
    let info = publication.info.as_ref().expect("info");
    assert_eq!((&info.user, &info.client), (&text, &text));
    assert_eq!(info.conn_info, data);
    assert_eq!(publication.tags, tags);
    if let Ok(request) = decode_emulation(encoding, frame) {
        let again = encode_emulation(encoding, &request);
        assert_eq!(decode_emulation(encoding, &again).expect("re-encoded"), request);
    }
});
