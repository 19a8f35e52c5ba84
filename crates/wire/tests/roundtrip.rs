//! Property tests: whatever is sent, split however into frames and reads, arrives whole.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use switchboard_wire::deflate::{DeflateConfig, DeflateParams};
use switchboard_wire::frame::{encode_frame, FrameHeader, MAX_HEADER_LEN};
use switchboard_wire::{Config, Connection, Message, OpCode};

#[derive(Debug, Clone)]
enum Payload {
    Text(String),
    Binary(Vec<u8>),
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        ".{0,200}".prop_map(Payload::Text),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Payload::Binary),
        // Sizes that need the 16- and 64-bit length forms.
        (126usize..70_000).prop_map(|n| Payload::Binary(vec![0xA5; n])),
    ]
}

/// A message, the points where it is cut into fragments, and pings between fragments.
fn message() -> impl Strategy<Value = (Payload, Vec<usize>, Vec<Vec<u8>>)> {
    (
        payload(),
        proptest::collection::vec(any::<usize>(), 0..4),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..126), 0..3),
    )
}

fn masked_frame(out: &mut BytesMut, opcode: OpCode, fin: bool, payload: &[u8], key: [u8; 4]) {
    let mut header = FrameHeader::new(opcode, payload.len() as u64);
    header.fin = fin;
    header.mask = Some(key);
    encode_frame(out, &header, payload);
}

/// Feeds `wire` to `conn` in reads of the given sizes (cycled) and collects what it decodes.
fn read_in_chunks(conn: &mut Connection, wire: &[u8], chunk_sizes: &[usize]) -> Vec<Message> {
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut at = 0;
    let mut sizes = chunk_sizes.iter().cycle();
    while at < wire.len() {
        let end = (at + sizes.next().unwrap()).min(wire.len());
        buf.extend_from_slice(&wire[at..end]);
        at = end;
        while let Some(m) = conn.read(&mut buf).unwrap() {
            got.push(m);
        }
    }
    got
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn fragmented_messages_survive_any_chunking(
        messages in proptest::collection::vec(message(), 1..6),
        chunk_sizes in proptest::collection::vec(1usize..5000, 1..20),
        key in any::<[u8; 4]>(),
    ) {
        let mut wire = BytesMut::new();
        let mut expected = Vec::new();
        for (payload, cuts, pings) in &messages {
            let (opcode, bytes) = match payload {
                Payload::Text(s) => (OpCode::Text, s.as_bytes().to_vec()),
                Payload::Binary(b) => (OpCode::Binary, b.clone()),
            };
            // Cut points may fall inside a UTF-8 sequence on purpose.
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            points.dedup();
            let mut start = 0;
            let mut first = true;
            let mut pings = pings.iter();
            for end in points.into_iter().chain([bytes.len()]) {
                let fin = end == bytes.len();
                let op = if first { opcode } else { OpCode::Continuation };
                masked_frame(&mut wire, op, fin, &bytes[start..end], key);
                first = false;
                start = end;
                if !fin {
                    if let Some(ping) = pings.next() {
                        masked_frame(&mut wire, OpCode::Ping, true, ping, key);
                        expected.push(Message::Ping(Bytes::from(ping.clone())));
                    }
                }
                if fin {
                    break;
                }
            }
            expected.push(match payload {
                Payload::Text(s) => Message::Text(s.clone().into()),
                Payload::Binary(b) => Message::Binary(Bytes::from(b.clone())),
            });
        }

        let mut server = Connection::server(Config::default());
        let got = read_in_chunks(&mut server, &wire, &chunk_sizes);
        prop_assert_eq!(got, expected);
        prop_assert!(!server.is_mid_message());
    }

    #[test]
    fn headers_roundtrip(
        fin: bool, rsv1: bool, rsv2: bool, rsv3: bool,
        op in prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
        len in prop_oneof![0u64..126, 126u64..=0xFFFF, 0x1_0000u64..(1 << 63)],
        mask: Option<[u8; 4]>,
    ) {
        let header = FrameHeader { fin, rsv1, rsv2, rsv3, opcode: OpCode::from_u8(op).unwrap(), mask, payload_len: len };
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = header.encode(&mut buf);
        prop_assert_eq!(FrameHeader::parse(&buf[..n]).unwrap(), Some((header, n)));
    }

    #[test]
    fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..2000)) {
        for role_is_server in [true, false] {
            let mut conn = if role_is_server {
                Connection::server(Config::default().with_max_message_size(4096))
            } else {
                Connection::client(Config::default().with_max_message_size(4096), [0; 32])
            };
            let mut buf = BytesMut::from(&input[..]);
            loop {
                match conn.read(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => {
                        prop_assert!(conn.is_failed());
                        prop_assert!(conn.has_output(), "a failed connection queues its close frame");
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn sent_messages_decode_on_the_other_side(texts in proptest::collection::vec(".{0,300}", 1..10)) {
        let mut client = Connection::client(Config::default(), [3; 32]);
        let mut server = Connection::server(Config::default());
        for t in &texts {
            client.send_text(t).unwrap();
        }
        let mut wire = client.take_output();
        for t in &texts {
            match server.read(&mut wire).unwrap() {
                Some(Message::Text(got)) => prop_assert_eq!(got.as_str(), t.as_str()),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        for t in &texts {
            server.send_text(t).unwrap();
        }
        let mut back = server.take_output();
        for t in &texts {
            match client.read(&mut back).unwrap() {
                Some(Message::Text(got)) => prop_assert_eq!(got.as_str(), t.as_str()),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }

    #[test]
    fn compressed_messages_survive_any_chunking(
        payloads in proptest::collection::vec(payload(), 1..12),
        chunk_sizes in proptest::collection::vec(1usize..3000, 1..10),
        takeover in any::<bool>(),
        level in 0u32..10,
        window in 9u8..16,
    ) {
        let params = DeflateParams {
            server_no_context_takeover: !takeover,
            client_no_context_takeover: !takeover,
            server_max_window_bits: window,
            client_max_window_bits: window,
        };
        let config = DeflateConfig::default().with_level(level);
        let mut client = Connection::client(Config::default(), [9; 32]).with_deflate(params, &config);
        let mut server = Connection::server(Config::default()).with_deflate(params, &config);
        let mut expected = Vec::new();
        for payload in &payloads {
            match payload {
                Payload::Text(s) => {
                    client.send_text(s).unwrap();
                    expected.push(Message::Text(s.clone().into()));
                }
                Payload::Binary(b) => {
                    client.send_binary(b).unwrap();
                    expected.push(Message::Binary(Bytes::from(b.clone())));
                }
            }
        }
        let wire = client.take_output();
        let got = read_in_chunks(&mut server, &wire, &chunk_sizes);
        prop_assert_eq!(got, expected);
    }
}
