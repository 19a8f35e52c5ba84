//! Frame headers (RFC 6455 section 5.2): parsing from a byte slice and encoding.
//!
//! [`FrameHeader::parse`] tells "need more bytes" (`Ok(None)`) apart from "invalid"
//! (`Err`). It checks only what the header alone decides; rules that depend on the
//! connection (masking by role, fragmentation, limits) live in [`crate::Connection`].

use bytes::{BufMut, BytesMut};

use crate::error::ProtocolError;
use crate::mask::apply_mask;

/// The longest possible header: 2 bytes, an 8-byte length and a 4-byte mask.
pub const MAX_HEADER_LEN: usize = 14;

/// Frame opcodes defined by RFC 6455.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    pub fn from_u8(value: u8) -> Result<Self, ProtocolError> {
        Ok(match value {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub rsv1: bool,
    pub rsv2: bool,
    pub rsv3: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

impl FrameHeader {
    /// A final, unmasked frame header with no reserved bits.
    pub fn new(opcode: OpCode, payload_len: u64) -> Self {
        Self {
            fin: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask: None,
            payload_len,
        }
    }

    /// Parses a header from the start of `buf`. Returns the header and its length in
    /// bytes, `Ok(None)` when `buf` holds only part of it.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let opcode = OpCode::from_u8(b0 & 0x0F)?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, mut len) = match b1 & 0x7F {
            126 => {
                let Some(bytes) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
            }
            127 => {
                let Some(bytes) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                let n = u64::from_be_bytes(be);
                if n >> 63 != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                (n, 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            let Some(bytes) = buf.get(len..len + 4) else {
                return Ok(None);
            };
            len += 4;
            Some([bytes[0], bytes[1], bytes[2], bytes[3]])
        } else {
            None
        };
        let header = Self {
            fin: b0 & 0x80 != 0,
            rsv1: b0 & 0x40 != 0,
            rsv2: b0 & 0x20 != 0,
            rsv3: b0 & 0x10 != 0,
            opcode,
            mask,
            payload_len,
        };
        Ok(Some((header, len)))
    }

    /// Length of the encoded header.
    pub fn encoded_len(&self) -> usize {
        let len = match self.payload_len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        len + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Encodes the header into `out`, returning the number of bytes written. Lengths
    /// always use the shortest form.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        out[0] = (u8::from(self.fin) << 7)
            | (u8::from(self.rsv1) << 6)
            | (u8::from(self.rsv2) << 5)
            | (u8::from(self.rsv3) << 4)
            | self.opcode.as_u8();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut len = match self.payload_len {
            n @ 0..=125 => {
                out[1] = mask_bit | n as u8;
                2
            }
            n @ 126..=0xFFFF => {
                out[1] = mask_bit | 126;
                out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                4
            }
            n => {
                out[1] = mask_bit | 127;
                out[2..10].copy_from_slice(&n.to_be_bytes());
                10
            }
        };
        if let Some(key) = self.mask {
            out[len..len + 4].copy_from_slice(&key);
            len += 4;
        }
        len
    }
}

/// Appends a whole frame to `out`: the header, then the payload, masked when the header
/// carries a key.
pub fn encode_frame(out: &mut BytesMut, header: &FrameHeader, payload: &[u8]) {
    debug_assert_eq!(header.payload_len, payload.len() as u64);
    let mut head = [0u8; MAX_HEADER_LEN];
    let head_len = header.encode(&mut head);
    out.reserve(head_len + payload.len());
    out.put_slice(&head[..head_len]);
    let start = out.len();
    out.put_slice(payload);
    if let Some(key) = header.mask {
        apply_mask(&mut out[start..], key);
    }
}

/// The header of a final, unmasked frame of `len` payload bytes (what a server sends),
/// and its length: the shortest length form, written directly.
#[inline]
pub fn server_header(opcode: OpCode, len: usize) -> ([u8; MAX_HEADER_LEN], usize) {
    let mut head = [0u8; MAX_HEADER_LEN];
    head[0] = 0x80 | opcode.as_u8();
    let head_len = if len <= 125 {
        head[1] = len as u8;
        2
    } else if len <= 0xFFFF {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, head_len)
}

/// A whole final, unmasked frame (what a server sends), in a buffer of its own: made
/// once for a message many connections are sent (see [`crate::Connection::takes_frames`]).
pub fn server_frame(opcode: OpCode, payload: &[u8]) -> bytes::Bytes {
    let (head, head_len) = server_header(opcode, payload.len());
    let mut out = BytesMut::with_capacity(head_len + payload.len());
    out.extend_from_slice(&head[..head_len]);
    out.extend_from_slice(payload);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(header: FrameHeader) {
        let mut buf = [0u8; MAX_HEADER_LEN];
        let len = header.encode(&mut buf);
        assert_eq!(len, header.encoded_len());
        assert_eq!(FrameHeader::parse(&buf[..len]), Ok(Some((header, len))));
        for short in 0..len {
            assert_eq!(
                FrameHeader::parse(&buf[..short]),
                Ok(None),
                "prefix of {short}"
            );
        }
    }

    #[test]
    fn lengths_in_all_three_forms() {
        for len in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, u64::MAX >> 1] {
            roundtrip(FrameHeader::new(OpCode::Binary, len));
            let mut masked = FrameHeader::new(OpCode::Text, len);
            masked.mask = Some([1, 2, 3, 4]);
            masked.fin = false;
            masked.rsv1 = true;
            roundtrip(masked);
        }
    }

    #[test]
    fn server_headers_are_the_encoded_headers() {
        for len in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, 1 << 40] {
            for opcode in [OpCode::Text, OpCode::Binary] {
                let mut expected = [0u8; MAX_HEADER_LEN];
                let n = FrameHeader::new(opcode, len as u64).encode(&mut expected);
                let (head, head_len) = server_header(opcode, len);
                assert_eq!(&head[..head_len], &expected[..n], "{len}");
            }
        }
    }

    #[test]
    fn reserved_opcodes_and_lengths_are_invalid() {
        for op in [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                FrameHeader::parse(&[0x80 | op, 0]),
                Err(ProtocolError::ReservedOpcode(op))
            );
        }
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(FrameHeader::parse(&huge), Err(ProtocolError::InvalidLength));
    }

    #[test]
    fn known_bytes() {
        // A masked "Hello" from RFC 6455 section 5.7.
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (header, len) = FrameHeader::parse(&frame).unwrap().unwrap();
        assert_eq!(len, 6);
        assert!(header.fin);
        assert_eq!(header.opcode, OpCode::Text);
        assert_eq!(header.payload_len, 5);
        let mut payload = frame[len..].to_vec();
        apply_mask(&mut payload, header.mask.unwrap());
        assert_eq!(payload, b"Hello");

        let mut out = BytesMut::new();
        encode_frame(&mut out, &header, b"Hello");
        assert_eq!(&out[..], &frame[..]);
    }
}
