//! Arbitrary bytes, cut into arbitrary reads, into both ends of a connection, with and
//! without permessage-deflate: the decoder and the inflater must never panic, text must
//! come out valid, and any error must leave a Close frame queued.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_wire::deflate::{DeflateConfig, DeflateParams};
use switchboard_wire::{Config, Connection, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let config = Config::default().with_max_message_size(1 << 16).with_max_frame_size(1 << 15);
    let deflate = DeflateConfig::default();
    let params = DeflateParams::default();
    for mut conn in [
        Connection::server(config.clone()),
        Connection::client(config.clone(), [0; 32]),
        Connection::server(config.clone()).with_deflate(params, &deflate),
        Connection::client(config.clone(), [0; 32]).with_deflate(params, &deflate),
    ] {
        let mut buf = BytesMut::new();
        let step = usize::from(split).max(1);
        'feed: for chunk in input.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                match conn.read(&mut buf) {
                    Ok(Some(Message::Text(text))) => assert!(std::str::from_utf8(text.as_bytes()).is_ok()),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        assert!(conn.is_failed() && conn.has_output());
                        break 'feed;
                    }
                }
            }
        }
    }
});
