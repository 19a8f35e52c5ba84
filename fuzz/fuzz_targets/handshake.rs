//! Arbitrary bytes as an upgrade request, an upgrade response and an extensions header:
//! parsing and validation must never panic, and an accepted request must be consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_wire::handshake::{
    accept_key, parse_extensions, parse_request, parse_response, validate_response, ClientRequest,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, len))) = parse_request(data, 16 * 1024) {
        assert!(len <= data.len());
        if let Ok(upgrade) = head.validate() {
            let key = head
                .headers()
                .find(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-key"))
                .map(|(_, v)| v.trim_ascii())
                .expect("an accepted request has a key");
            assert_eq!(upgrade.accept, accept_key(key));
        } else {
            // Every refusal maps to a real HTTP status.
            assert!(head.validate().unwrap_err().status() >= 400);
        }
    }
    if let Ok(Some((head, _))) = parse_response(data, 16 * 1024) {
        let request = ClientRequest::new("h", "/", "dGhlIHNhbXBsZSBub25jZQ==".to_owned());
        let _ = validate_response(&head, &request, &["permessage-deflate"]);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(extensions) = parse_extensions(text) {
            assert!(!extensions.is_empty());
            assert!(extensions.iter().all(|e| !e.name.is_empty()));
        }
    }
});
