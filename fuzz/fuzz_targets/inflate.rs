//! permessage-deflate's inflater, on its own, with every window size and context-takeover
//! setting and a message-size limit.
//!
//! Input: a 7-byte header, then frames, each a big-endian u16 whose top bit is FIN and
//! whose other 15 bits are the payload length (cut short at the end of the input).
//!
//! 1. The frames, as they are, go to the inflater: it must never panic, a message it
//!    accepts is never over the limit, an error is 1009 or 1007 and leaves the buffer at
//!    most one byte over the limit (and its allocation near it).
//! 2. Each frame's payload, as plain data (repeated, to reach past windows and limits), is
//!    compressed by the peer's half and inflated (in fragments) by this side's: it comes
//!    back as it was, or fails with 1009 exactly when it is over the limit.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_wire::deflate::{Deflate, DeflateConfig, DeflateParams};
use switchboard_wire::{ProtocolError, Role};

const HEADER: usize = 7;

struct Setup {
    role: Role,
    params: DeflateParams,
    config: DeflateConfig,
    release_between: bool,
    repeat: usize,
    limit: usize,
    fragment: usize,
}

impl Setup {
    fn parse(header: &[u8; HEADER]) -> Self {
        let [flags, windows, level, min_size, limit_hi, limit_lo, fragment] = *header;
        let bit = |n: u8| flags & (1 << n) != 0;
        let params = DeflateParams {
            server_no_context_takeover: bit(1),
            client_no_context_takeover: bit(2),
            server_max_window_bits: 8 + (windows & 7),
            client_max_window_bits: 8 + ((windows >> 4) & 7),
        };
        let config = DeflateConfig::default()
            .with_level(u32::from(level & 0x0f) % 10)
            .with_max_window_bits(9 + (fragment >> 5))
            .with_no_context_takeover(bit(4))
            .with_min_size(usize::from(min_size));
        let limit = match u16::from_be_bytes([limit_hi, limit_lo]) {
            u16::MAX => usize::MAX,
            n => usize::from(n),
        };
        Self {
            role: if bit(0) { Role::Client } else { Role::Server },
            params,
            config,
            release_between: bit(3),
            repeat: usize::from(level >> 4) + 1,
            limit,
            fragment: usize::from(fragment & 0x1f),
        }
    }

    fn peer(&self) -> Role {
        match self.role {
            Role::Server => Role::Client,
            Role::Client => Role::Server,
        }
    }

    /// The window the peer compresses with: 8 bits means it sends everything plain.
    fn peer_bits(&self) -> u8 {
        let own = match self.peer() {
            Role::Server => self.params.server_max_window_bits,
            Role::Client => self.params.client_max_window_bits,
        };
        own.min(self.config.max_window_bits)
    }
}

fn frames(mut data: &[u8]) -> Vec<(&[u8], bool)> {
    let mut frames = Vec::new();
    while let [hi, lo, rest @ ..] = data {
        let word = u16::from_be_bytes([*hi, *lo]);
        let len = usize::from(word & 0x7fff).min(rest.len());
        frames.push((&rest[..len], word & 0x8000 != 0));
        data = &rest[len..];
    }
    frames
}

fn check_buffer(out: &BytesMut, limit: usize) {
    assert!(
        out.len() <= limit.saturating_add(1),
        "{} over {limit}",
        out.len()
    );
    if limit < 1 << 20 {
        assert!(
            out.capacity() <= 2 * (limit + 1) + 64,
            "allocated {} for a limit of {limit}",
            out.capacity()
        );
    }
}

fn raw(setup: &Setup, frames: &[(&[u8], bool)]) {
    let mut inflater = Deflate::new(setup.role, setup.params, &setup.config);
    let mut out = BytesMut::new();
    for &(payload, fin) in frames {
        match inflater.decompress(payload, fin, &mut out, setup.limit) {
            Ok(()) => {
                assert!(
                    out.len() <= setup.limit,
                    "{} over {}",
                    out.len(),
                    setup.limit
                );
                check_buffer(&out, setup.limit);
                if fin {
                    out = BytesMut::new();
                    if setup.release_between {
                        inflater.release();
                    }
                }
            }
            Err(error) => {
                match error {
                    ProtocolError::MessageTooBig { size, limit } => {
                        assert_eq!(limit, setup.limit);
                        assert!(size > limit as u64 && size == out.len() as u64);
                    }
                    ProtocolError::InvalidCompressedData => {}
                    other => panic!("unexpected error {other:?}"),
                }
                check_buffer(&out, setup.limit);
                // The connection is failed: nothing more is read.
                return;
            }
        }
    }
}

fn roundtrip(setup: &Setup, frames: &[(&[u8], bool)]) {
    let mut deflater = Deflate::new(setup.peer(), setup.params, &setup.config);
    let mut inflater = Deflate::new(setup.role, setup.params, &setup.config);
    let mut wire = BytesMut::new();
    for &(payload, _) in frames {
        let message = payload.repeat(setup.repeat);
        if !deflater.compress(&message, &mut wire) {
            // Sent plain: allowed only for short messages and an 8-bit window.
            assert!(
                message.len() < setup.config.min_size || setup.peer_bits() < 9,
                "{} bytes not compressed with a {}-bit window",
                message.len(),
                setup.peer_bits()
            );
            continue;
        }
        let step = if setup.fragment == 0 {
            wire.len().max(1)
        } else {
            setup.fragment
        };
        let mut pieces: Vec<&[u8]> = wire.chunks(step).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        let last = pieces.len() - 1;
        let mut out = BytesMut::new();
        let mut result = Ok(());
        for (i, piece) in pieces.into_iter().enumerate() {
            result = inflater.decompress(piece, i == last, &mut out, setup.limit);
            if result.is_err() {
                break;
            }
        }
        if message.len() <= setup.limit {
            assert_eq!(
                result,
                Ok(()),
                "{} bytes, limit {}",
                message.len(),
                setup.limit
            );
            assert!(
                out[..] == message[..],
                "{} bytes came back as {}",
                message.len(),
                out.len()
            );
        } else {
            assert!(
                matches!(result, Err(ProtocolError::MessageTooBig { .. })),
                "{} bytes over a limit of {}: {result:?}",
                message.len(),
                setup.limit
            );
            check_buffer(&out, setup.limit);
            return;
        }
        if setup.release_between {
            deflater.release();
            inflater.release();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<HEADER>() else {
        return;
    };
    let setup = Setup::parse(header);
    let frames = frames(rest);
    raw(&setup, &frames);
    roundtrip(&setup, &frames);
});
