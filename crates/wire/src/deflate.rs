//! permessage-deflate (RFC 7692): negotiation on both sides and the per-connection
//! compressor and decompressor.
//!
//! Memory is what makes compression expensive per connection (a zlib compressor with a
//! 32 KiB window holds about 256 KiB), so both halves are created only when the first
//! message needs them, and each side's window is the smallest the negotiation allows.
//! A message shorter than `min_size` is sent uncompressed, which RFC 7692 permits per
//! message.
//!
//! zlib cannot compress raw deflate with an 8-bit window (it refuses, or silently uses 9
//! bits). When the peer limits this side to 8 bits, messages are therefore sent
//! uncompressed rather than in violation of the limit. Inflation always uses at least a
//! 9-bit window, so a peer whose zlib turned 8 into 9 is still understood.

use bytes::BytesMut;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::connection::Role;
use crate::error::ProtocolError;
use crate::handshake::Extension;

/// The extension's registered name.
pub const NAME: &str = "permessage-deflate";

/// The bytes a sync flush ends with, stripped from each message (RFC 7692 section 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// How this side wants to compress. Start from [`DeflateConfig::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeflateConfig {
    /// zlib level, 0 (store) to 9 (smallest).
    pub level: u32,
    /// Largest window this side compresses with (9-15 bits; 15 is 32 KiB).
    pub max_window_bits: u8,
    /// Compress every message on its own (less memory kept between messages, larger
    /// output). A server says `server_no_context_takeover`; a client
    /// `client_no_context_takeover`.
    pub no_context_takeover: bool,
    /// Ask the peer to compress every message on its own, so this side's decompressor
    /// keeps no history between messages.
    pub request_peer_no_context_takeover: bool,
    /// Largest window the peer may compress with (8-15 bits), when it lets us choose.
    pub peer_max_window_bits: u8,
    /// Messages shorter than this are sent uncompressed.
    pub min_size: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self {
            level: 3,
            max_window_bits: 15,
            no_context_takeover: false,
            request_peer_no_context_takeover: false,
            peer_max_window_bits: 15,
            min_size: 0,
        }
    }
}

impl DeflateConfig {
    pub fn with_level(mut self, level: u32) -> Self {
        self.level = level.min(9);
        self
    }

    pub fn with_max_window_bits(mut self, bits: u8) -> Self {
        self.max_window_bits = bits.clamp(9, 15);
        self
    }

    pub fn with_no_context_takeover(mut self, on: bool) -> Self {
        self.no_context_takeover = on;
        self
    }

    pub fn with_request_peer_no_context_takeover(mut self, on: bool) -> Self {
        self.request_peer_no_context_takeover = on;
        self
    }

    pub fn with_peer_max_window_bits(mut self, bits: u8) -> Self {
        self.peer_max_window_bits = bits.clamp(8, 15);
        self
    }

    pub fn with_min_size(mut self, bytes: usize) -> Self {
        self.min_size = bytes;
        self
    }
}

/// What both sides agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: u8,
    pub client_max_window_bits: u8,
}

impl Default for DeflateParams {
    fn default() -> Self {
        Self {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }
}

/// The parameters of one offer or response, checked for RFC 7692's grammar.
#[derive(Debug, Default)]
struct Params {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: present without a value (allowed in offers only).
    client_max_window_bits: Option<Option<u8>>,
}

fn window_bits(value: &str) -> Result<u8, String> {
    // 8 to 15 written without leading zeroes.
    match value {
        "8" | "9" | "10" | "11" | "12" | "13" | "14" | "15" => Ok(value.parse().expect("digits")),
        _ => Err(format!("window bits {value:?} are not 8 to 15")),
    }
}

fn parse_params(extension: &Extension) -> Result<Params, String> {
    let mut params = Params::default();
    for (name, value) in &extension.params {
        let repeated = || format!("parameter {name} given twice");
        match (name.as_str(), value.as_deref()) {
            ("server_no_context_takeover", None) => {
                if std::mem::replace(&mut params.server_no_context_takeover, true) {
                    return Err(repeated());
                }
            }
            ("client_no_context_takeover", None) => {
                if std::mem::replace(&mut params.client_no_context_takeover, true) {
                    return Err(repeated());
                }
            }
            ("server_max_window_bits", Some(value)) => {
                if params
                    .server_max_window_bits
                    .replace(window_bits(value)?)
                    .is_some()
                {
                    return Err(repeated());
                }
            }
            ("client_max_window_bits", value) => {
                let bits = value.map(window_bits).transpose()?;
                if params.client_max_window_bits.replace(bits).is_some() {
                    return Err(repeated());
                }
            }
            (name, value) => {
                return Err(format!(
                    "parameter {name}{} is not allowed",
                    value.map_or(String::new(), |v| format!("={v}"))
                ))
            }
        }
    }
    Ok(params)
}

/// Server side: picks the first acceptable `permessage-deflate` offer (later offers are
/// fallbacks; malformed ones are declined, as RFC 7692 asks). Returns the agreed
/// parameters and the `Sec-WebSocket-Extensions` value to answer with, or `None` to go
/// without compression.
pub fn negotiate(offers: &[Extension], config: &DeflateConfig) -> Option<(DeflateParams, String)> {
    offers
        .iter()
        .filter(|offer| offer.name.eq_ignore_ascii_case(NAME))
        .find_map(|offer| {
            let offered = parse_params(offer).ok()?;
            let mut agreed = DeflateParams::default();
            let mut response = String::from(NAME);
            if offered.server_no_context_takeover || config.no_context_takeover {
                agreed.server_no_context_takeover = true;
                response.push_str("; server_no_context_takeover");
            }
            if offered.client_no_context_takeover || config.request_peer_no_context_takeover {
                agreed.client_no_context_takeover = true;
                response.push_str("; client_no_context_takeover");
            }
            let own = config.max_window_bits.clamp(9, 15);
            agreed.server_max_window_bits = match offered.server_max_window_bits {
                // The answer may not name a window the offer did not; a smaller window is
                // still ours to use, since the peer's decompressor copes with any smaller one.
                None => own,
                Some(limit) => {
                    let bits = limit.min(own);
                    response.push_str(&format!("; server_max_window_bits={bits}"));
                    bits
                }
            };
            let peer = config.peer_max_window_bits.clamp(8, 15);
            agreed.client_max_window_bits = match offered.client_max_window_bits {
                // Without the parameter the client cannot be limited.
                None => 15,
                Some(limit) => {
                    let bits = limit.unwrap_or(15).min(peer);
                    if bits < limit.unwrap_or(15) {
                        response.push_str(&format!("; client_max_window_bits={bits}"));
                    }
                    bits
                }
            };
            Some((agreed, response))
        })
}

/// Client side: the offer to send.
pub fn offer(config: &DeflateConfig) -> String {
    let mut offer = String::from(NAME);
    if config.request_peer_no_context_takeover {
        offer.push_str("; server_no_context_takeover");
    }
    if config.no_context_takeover {
        offer.push_str("; client_no_context_takeover");
    }
    if config.peer_max_window_bits < 15 {
        offer.push_str(&format!(
            "; server_max_window_bits={}",
            config.peer_max_window_bits.clamp(8, 15)
        ));
    }
    // The server may limit our window; we can compress with any.
    offer.push_str("; client_max_window_bits");
    offer
}

/// Client side: checks the server's answer to [`offer`] and returns what was agreed.
pub fn accept_response(
    response: &Extension,
    config: &DeflateConfig,
) -> Result<DeflateParams, String> {
    let answered = parse_params(response)?;
    let mut agreed = DeflateParams {
        server_no_context_takeover: answered.server_no_context_takeover,
        client_no_context_takeover: answered.client_no_context_takeover
            || config.no_context_takeover,
        ..DeflateParams::default()
    };
    if config.request_peer_no_context_takeover && !answered.server_no_context_takeover {
        return Err("the server did not accept server_no_context_takeover".into());
    }
    if let Some(bits) = answered.server_max_window_bits {
        if config.peer_max_window_bits < 15 && bits > config.peer_max_window_bits {
            return Err(format!(
                "server_max_window_bits={bits} is over the {} offered",
                config.peer_max_window_bits
            ));
        }
        agreed.server_max_window_bits = bits;
    }
    agreed.client_max_window_bits = match answered.client_max_window_bits {
        None => config.max_window_bits.clamp(9, 15),
        Some(None) => return Err("client_max_window_bits needs a value in a response".into()),
        Some(Some(bits)) => bits.min(config.max_window_bits.clamp(9, 15)),
    };
    Ok(agreed)
}

/// One connection's compression state.
///
/// Public, and hidden from the docs, only for the fuzz targets (`fuzz/fuzz_targets/inflate.rs`);
/// connections own theirs through [`crate::Connection::with_deflate`].
#[doc(hidden)]
pub struct Deflate {
    level: u32,
    min_size: usize,
    /// Our window; 8 means "do not compress" (see the module docs).
    compress_bits: u8,
    compress_reset: bool,
    compressor: Option<Compress>,
    decompress_bits: u8,
    decompress_reset: bool,
    decompressor: Option<Decompress>,
    /// Compressed bytes seen in the message being received.
    message_input: usize,
    /// The message being received ended its deflate stream (a block with BFINAL set);
    /// the rest of its input is ignored.
    stream_ended: bool,
}

impl std::fmt::Debug for Deflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflate")
            .field("level", &self.level)
            .field("compress_bits", &self.compress_bits)
            .field("compress_reset", &self.compress_reset)
            .field("compressor", &self.compressor.is_some())
            .field("decompress_bits", &self.decompress_bits)
            .field("decompress_reset", &self.decompress_reset)
            .field("decompressor", &self.decompressor.is_some())
            .finish()
    }
}

impl Deflate {
    pub fn new(role: Role, params: DeflateParams, config: &DeflateConfig) -> Self {
        let (own_bits, own_reset, peer_bits, peer_reset) = match role {
            Role::Server => (
                params.server_max_window_bits,
                params.server_no_context_takeover,
                params.client_max_window_bits,
                params.client_no_context_takeover,
            ),
            Role::Client => (
                params.client_max_window_bits,
                params.client_no_context_takeover,
                params.server_max_window_bits,
                params.server_no_context_takeover,
            ),
        };
        Self {
            level: config.level.min(9),
            min_size: config.min_size,
            compress_bits: own_bits.min(config.max_window_bits.clamp(9, 15)),
            compress_reset: own_reset || config.no_context_takeover,
            compressor: None,
            decompress_bits: peer_bits.max(9),
            decompress_reset: peer_reset,
            decompressor: None,
            message_input: 0,
            stream_ended: false,
        }
    }

    /// Compresses a whole message into `out` (cleared first). Returns false when the
    /// message should go uncompressed instead.
    pub fn compress(&mut self, payload: &[u8], out: &mut BytesMut) -> bool {
        if payload.len() < self.min_size || self.compress_bits < 9 {
            return false;
        }
        out.clear();
        if payload.is_empty() {
            // RFC 7692 section 7.2.3.6: an empty message is one empty stored block, 0x00
            // once the tail is stripped. zlib would emit nothing at all after a previous
            // flush, leaving the peer's inflater inside a block.
            out.extend_from_slice(&[0x00]);
            return true;
        }
        let (level, bits) = (self.level, self.compress_bits);
        let compressor = self.compressor.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(level), false, bits)
        });
        let start_in = compressor.total_in();
        loop {
            let consumed = (compressor.total_in() - start_in) as usize;
            let len = out.len();
            let room = (payload.len() - consumed) / 2 + 64;
            out.resize(len + room, 0);
            let before = compressor.total_out();
            let result =
                compressor.compress(&payload[consumed..], &mut out[len..], FlushCompress::Sync);
            let produced = (compressor.total_out() - before) as usize;
            out.truncate(len + produced);
            if result.is_err() {
                // Compression of plain bytes cannot fail; if zlib says otherwise, start
                // afresh and send this message as it is.
                compressor.reset();
                return false;
            }
            let all_in = (compressor.total_in() - start_in) as usize == payload.len();
            if all_in && produced < room {
                break;
            }
        }
        if !out.ends_with(&TAIL) {
            // Not a flushed stream: never send it. A fresh compressor is always safe, since
            // a new stream simply does not refer back to the old one.
            compressor.reset();
            return false;
        }
        out.truncate(out.len() - TAIL.len());
        if self.compress_reset {
            compressor.reset();
        }
        true
    }

    /// Inflates one frame's payload onto `out`; `fin` ends the message. Fails with 1009
    /// as soon as `out` would pass `limit` (never allocating much past it) and with 1007
    /// on a corrupt stream.
    pub fn decompress(
        &mut self,
        input: &[u8],
        fin: bool,
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        self.message_input += input.len();
        if !self.stream_ended {
            self.inflate(input, out, limit)?;
        }
        if fin {
            // A message with no compressed bytes at all is empty; its tail alone would
            // leave the inflater inside a stored block.
            if !self.stream_ended && self.message_input > 0 {
                self.inflate(&TAIL, out, limit)?;
            }
            if self.decompress_reset || self.stream_ended {
                if let Some(decompressor) = self.decompressor.as_mut() {
                    decompressor.reset(false);
                }
            }
            self.message_input = 0;
            self.stream_ended = false;
        }
        Ok(())
    }

    fn inflate(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        let bits = self.decompress_bits;
        let decompressor = self
            .decompressor
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, bits));
        let start_in = decompressor.total_in();
        // One byte past the limit is enough to know the limit is broken.
        let cap = limit.saturating_add(1);
        loop {
            let consumed = (decompressor.total_in() - start_in) as usize;
            let len = out.len();
            let room = (input.len() - consumed)
                .saturating_mul(4)
                .clamp(4096, 256 * 1024)
                .min(cap - len.min(limit));
            out.resize(len + room, 0);
            let before = decompressor.total_out();
            let status = decompressor
                .decompress(&input[consumed..], &mut out[len..], FlushDecompress::Sync)
                .map_err(|_| ProtocolError::InvalidCompressedData);
            let produced = (decompressor.total_out() - before) as usize;
            out.truncate(len + produced);
            let status = status?;
            if out.len() > limit {
                return Err(ProtocolError::MessageTooBig {
                    size: out.len() as u64,
                    limit,
                });
            }
            let all_in = (decompressor.total_in() - start_in) as usize == input.len();
            match status {
                Status::StreamEnd => {
                    // A block with BFINAL set ends the stream (RFC 7692 section 7.2.3.3):
                    // what follows in this message, the appended tail included, is not
                    // deflate data. The next message starts a new stream.
                    self.stream_ended = true;
                    return Ok(());
                }
                _ if all_in && produced < room => return Ok(()),
                Status::BufError if produced == 0 && !all_in => {
                    return Err(ProtocolError::InvalidCompressedData)
                }
                _ => {}
            }
        }
    }

    /// Drops what can be rebuilt between messages: the compressor (a fresh one only
    /// starts without history, which every decompressor accepts) and, when the peer
    /// compresses each message on its own, the decompressor. Returns whether anything
    /// was freed.
    pub fn release(&mut self) -> bool {
        let mut freed = self.compressor.take().is_some();
        if self.decompress_reset {
            freed |= self.decompressor.take().is_some();
        }
        freed
    }

    /// Memory held now: whether a compressor and a decompressor exist.
    pub(crate) fn holds(&self) -> (bool, bool) {
        (self.compressor.is_some(), self.decompressor.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::parse_extensions;

    fn offers(header: &str) -> Vec<Extension> {
        parse_extensions(header).unwrap()
    }

    #[test]
    fn server_accepts_the_first_valid_offer() {
        let config = DeflateConfig::default();
        let (params, response) = negotiate(
            &offers("permessage-deflate; client_max_window_bits"),
            &config,
        )
        .unwrap();
        assert_eq!(params, DeflateParams::default());
        assert_eq!(response, "permessage-deflate");

        let (params, response) = negotiate(
            &offers("permessage-deflate; server_max_window_bits=08, permessage-deflate; bogus, permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_no_context_takeover"),
            &config,
        )
        .unwrap();
        assert_eq!(response, "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10");
        assert!(params.server_no_context_takeover && params.client_no_context_takeover);
        assert_eq!(params.server_max_window_bits, 10);

        assert!(negotiate(&offers("x-webkit-deflate-frame"), &config).is_none());
        assert!(negotiate(
            &offers("permessage-deflate; server_max_window_bits"),
            &config
        )
        .is_none());
        assert!(negotiate(
            &offers("permessage-deflate; client_max_window_bits=16"),
            &config
        )
        .is_none());
        assert!(negotiate(
            &offers("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            &config
        )
        .is_none());
        assert!(negotiate(
            &offers("permessage-deflate; server_no_context_takeover=1"),
            &config
        )
        .is_none());
    }

    #[test]
    fn server_limits_windows_it_is_allowed_to() {
        let config = DeflateConfig::default()
            .with_peer_max_window_bits(10)
            .with_max_window_bits(12);
        let (params, response) = negotiate(
            &offers("permessage-deflate; client_max_window_bits"),
            &config,
        )
        .unwrap();
        assert_eq!(response, "permessage-deflate; client_max_window_bits=10");
        assert_eq!(
            (params.client_max_window_bits, params.server_max_window_bits),
            (10, 12)
        );
        // Without client_max_window_bits in the offer the client cannot be limited.
        let (params, response) = negotiate(&offers("permessage-deflate"), &config).unwrap();
        assert_eq!(response, "permessage-deflate");
        assert_eq!(params.client_max_window_bits, 15);
    }

    #[test]
    fn client_checks_the_answer() {
        let config = DeflateConfig::default();
        assert_eq!(offer(&config), "permessage-deflate; client_max_window_bits");
        let ok = accept_response(
            &offers("permessage-deflate; client_max_window_bits=9")[0],
            &config,
        )
        .unwrap();
        assert_eq!(ok.client_max_window_bits, 9);
        assert!(accept_response(
            &offers("permessage-deflate; client_max_window_bits")[0],
            &config
        )
        .is_err());
        assert!(accept_response(&offers("permessage-deflate; mystery")[0], &config).is_err());
    }

    fn roundtrip(server: &mut Deflate, client: &mut Deflate, message: &[u8]) -> usize {
        let mut wire = BytesMut::new();
        assert!(server.compress(message, &mut wire));
        let size = wire.len();
        let mut out = BytesMut::new();
        client.decompress(&wire, true, &mut out, 1 << 20).unwrap();
        assert_eq!(&out[..], message);
        size
    }

    #[test]
    fn messages_roundtrip_with_and_without_context() {
        for params in [
            DeflateParams::default(),
            DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: 9,
                client_max_window_bits: 9,
            },
        ] {
            let config = DeflateConfig::default();
            let mut server = Deflate::new(Role::Server, params, &config);
            let mut client = Deflate::new(Role::Client, params, &config);
            let message = br#"{"type":"message","room":"lobby","from":"alice","text":"hello there, how are you?"}"#;
            let first = roundtrip(&mut server, &mut client, message);
            let second = roundtrip(&mut server, &mut client, message);
            if params.server_no_context_takeover {
                assert_eq!(first, second);
            } else {
                assert!(second < first / 2, "context takeover: {second} vs {first}");
            }
            let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            roundtrip(&mut server, &mut client, &big);
        }
    }

    #[test]
    fn small_messages_and_8_bit_windows_go_uncompressed() {
        let config = DeflateConfig::default().with_min_size(32);
        let mut d = Deflate::new(Role::Server, DeflateParams::default(), &config);
        assert!(!d.compress(b"tiny", &mut BytesMut::new()));
        let eight = DeflateParams {
            server_max_window_bits: 8,
            ..DeflateParams::default()
        };
        let mut d = Deflate::new(Role::Server, eight, &config);
        assert!(!d.compress(&[b'a'; 1000], &mut BytesMut::new()));
        assert_eq!(d.holds(), (false, false));
    }

    #[test]
    fn a_released_compressor_keeps_the_stream_decodable() {
        let config = DeflateConfig::default();
        let server_resets = DeflateParams {
            client_no_context_takeover: true,
            ..DeflateParams::default()
        };
        let mut server = Deflate::new(Role::Server, server_resets, &config);
        let mut client = Deflate::new(Role::Client, server_resets, &config);
        let message = b"the same sentence, sent again and again to the same peer";
        roundtrip(&mut server, &mut client, message);
        assert_eq!(server.holds(), (true, false));
        assert!(server.release());
        assert_eq!(server.holds(), (false, false));
        // The client's decompressor kept its history; the new compressor does not use it.
        roundtrip(&mut server, &mut client, message);
        roundtrip(&mut server, &mut client, message);
        // The client must keep its decompressor: the server takes over context.
        client.release();
        assert_eq!(client.holds(), (false, true));
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let config = DeflateConfig::default().with_level(9);
        let mut server = Deflate::new(Role::Server, DeflateParams::default(), &config);
        let mut wire = BytesMut::new();
        assert!(server.compress(&vec![0u8; 10 << 20], &mut wire));
        assert!(wire.len() < 20_000, "{}", wire.len());
        let mut client = Deflate::new(Role::Client, DeflateParams::default(), &config);
        let mut out = BytesMut::new();
        let error = client
            .decompress(&wire, true, &mut out, 64 * 1024)
            .unwrap_err();
        assert!(matches!(error, ProtocolError::MessageTooBig { .. }));
        assert!(
            out.capacity() < 1 << 20,
            "inflated only to about the limit: {}",
            out.capacity()
        );
    }

    #[test]
    fn empty_messages_keep_the_stream_in_step() {
        let config = DeflateConfig::default();
        let mut server = Deflate::new(Role::Server, DeflateParams::default(), &config);
        let mut client = Deflate::new(Role::Client, DeflateParams::default(), &config);
        roundtrip(&mut server, &mut client, b"hello, hello, hello");
        let mut wire = BytesMut::new();
        assert!(server.compress(b"", &mut wire));
        assert_eq!(&wire[..], &[0x00]);
        let mut out = BytesMut::new();
        client.decompress(&wire, true, &mut out, 1024).unwrap();
        assert!(out.is_empty());
        roundtrip(&mut server, &mut client, b"hello, hello, hello");
        // A peer that sends no bytes at all for an empty message is understood too.
        let mut out = BytesMut::new();
        client.decompress(&[], true, &mut out, 1024).unwrap();
        assert!(out.is_empty());
        roundtrip(&mut server, &mut client, b"and the stream still decodes");
    }

    #[test]
    fn a_final_block_ends_the_message_stream() {
        // RFC 7692 section 7.2.3.3: "Hello" in a block with BFINAL set, then padding.
        let config = DeflateConfig::default();
        let mut client = Deflate::new(Role::Client, DeflateParams::default(), &config);
        let mut out = BytesMut::new();
        client
            .decompress(
                &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00],
                true,
                &mut out,
                1024,
            )
            .unwrap();
        assert_eq!(&out[..], b"Hello");
        // The next message is a new stream.
        let mut server = Deflate::new(Role::Server, DeflateParams::default(), &config);
        roundtrip(
            &mut server,
            &mut client,
            b"next message after a final block",
        );
    }

    #[test]
    fn an_unbounded_limit_does_not_overflow() {
        let config = DeflateConfig::default();
        let mut server = Deflate::new(Role::Server, DeflateParams::default(), &config);
        let mut client = Deflate::new(Role::Client, DeflateParams::default(), &config);
        let mut wire = BytesMut::new();
        assert!(server.compress(&[7; 10_000], &mut wire));
        let mut out = BytesMut::new();
        client
            .decompress(&wire, true, &mut out, usize::MAX)
            .unwrap();
        assert_eq!(out.len(), 10_000);
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let config = DeflateConfig::default();
        let mut client = Deflate::new(Role::Client, DeflateParams::default(), &config);
        let mut out = BytesMut::new();
        assert_eq!(
            client.decompress(&[0xff, 0xff, 0xff, 0xff, 0x00], true, &mut out, 1 << 20),
            Err(ProtocolError::InvalidCompressedData)
        );
    }
}
