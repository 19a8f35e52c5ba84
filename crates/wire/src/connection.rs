//! One WebSocket connection's protocol state: frame decoding with limits, in-place
//! unmasking, reassembly, incremental UTF-8 checks, automatic pong and close replies,
//! and the close handshake.
//!
//! Input is read from a caller-owned `BytesMut`: complete payloads are split off it
//! without copying, and a frame that arrives over several reads is unmasked and checked
//! piece by piece as it comes, so invalid text fails before the frame is complete.
//! Output (replies and everything sent) collects in one buffer the caller writes out in
//! a single write, however many frames it holds.

use bytes::{Buf, BufMut, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::close::{CloseCode, CloseFrame};
use crate::config::Config;
use crate::deflate::{Deflate, DeflateConfig, DeflateParams};
use crate::error::{Error, ProtocolError};
use crate::frame::{encode_frame, server_header, FrameHeader, OpCode};
use crate::mask::apply_mask_at;
use crate::message::{Message, Text};
use crate::utf8::Utf8Validator;

/// Which end of the connection this is. Clients mask what they send; servers require
/// masked input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// A frame whose header has been read and whose payload is arriving.
#[derive(Debug)]
struct PartialFrame {
    header: FrameHeader,
    header_len: usize,
    /// Payload bytes already unmasked (and validated, for text).
    processed: usize,
    /// Validate the payload as text as it arrives (uncompressed text only; compressed
    /// text is validated as it is inflated).
    text: bool,
}

/// A fragmented message whose final frame has not arrived yet.
#[derive(Debug)]
struct PartialMessage {
    opcode: OpCode,
    compressed: bool,
    data: BytesMut,
}

enum Step {
    NeedMore,
    Consumed,
    Message(Message),
}

/// The sans-IO state of one WebSocket connection.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    config: Config,
    frame: Option<PartialFrame>,
    message: Option<PartialMessage>,
    utf8: Utf8Validator,
    out: BytesMut,
    // Boxed: a server has no masks and most connections no compression, and every
    // connection's task carries this struct.
    masks: Option<Box<StdRng>>,
    deflate: Option<Box<Deflate>>,
    /// Reused buffer for compressing outgoing messages.
    scratch: BytesMut,
    close_sent: bool,
    close_received: bool,
    failed: bool,
}

impl Connection {
    /// The server end of a connection.
    pub fn server(config: Config) -> Self {
        Self::new(Role::Server, config, None)
    }

    /// The client end. `seed` feeds the generator of masking keys; RFC 6455 wants it
    /// from a strong entropy source, which the caller (who may do I/O) provides.
    pub fn client(config: Config, seed: [u8; 32]) -> Self {
        Self::new(
            Role::Client,
            config,
            Some(Box::new(StdRng::from_seed(seed))),
        )
    }

    fn new(role: Role, config: Config, masks: Option<Box<StdRng>>) -> Self {
        Self {
            role,
            config,
            frame: None,
            message: None,
            utf8: Utf8Validator::new(),
            out: BytesMut::new(),
            masks,
            deflate: None,
            scratch: BytesMut::new(),
            close_sent: false,
            close_received: false,
            failed: false,
        }
    }

    /// Turns on permessage-deflate with the parameters the handshake agreed on.
    pub fn with_deflate(mut self, params: DeflateParams, config: &DeflateConfig) -> Self {
        self.deflate = Some(Box::new(Deflate::new(self.role, params, config)));
        self
    }

    /// Whether permessage-deflate is on, and whether its compressor and decompressor are
    /// allocated right now.
    pub fn deflate_state(&self) -> Option<(bool, bool)> {
        self.deflate.as_deref().map(Deflate::holds)
    }

    /// Frees memory that can be rebuilt, between messages: the compressor, the
    /// decompressor when the peer compresses each message on its own, and the compression
    /// buffer. Call it on idle connections. Returns whether anything was freed.
    pub fn release_memory(&mut self) -> bool {
        if self.is_mid_message() {
            return false;
        }
        let freed = self.deflate.as_deref_mut().is_some_and(Deflate::release);
        let had_scratch = self.scratch.capacity() > 0;
        self.scratch = BytesMut::new();
        // The output buffer too, once written out.
        let had_out = self.out.is_empty() && self.out.capacity() > 0;
        if had_out {
            self.out = BytesMut::new();
        }
        freed || had_scratch || had_out
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decodes the next message from `buf`, consuming what it uses. `Ok(None)` means more
    /// bytes are needed. Ping and Close frames are answered automatically (the reply is
    /// queued in the output) and still returned. After an error the connection is
    /// failed: a Close frame with the matching code is queued and nothing more is read.
    pub fn read(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, Error> {
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(whole) = self.read_whole(buf) {
            return whole;
        }
        loop {
            if self.close_received || self.failed {
                // Nothing may follow the peer's Close; nothing is read after a failure.
                buf.clear();
                return Ok(None);
            }
            match self.step(buf) {
                Ok(Step::NeedMore) => return Ok(None),
                Ok(Step::Consumed) => continue,
                Ok(Step::Message(message)) => return Ok(Some(message)),
                Err(error) => {
                    self.fail(&error);
                    return Err(error.into());
                }
            }
        }
    }

    /// The common case in one go: a whole, final, uncompressed text or binary frame of
    /// up to 64 KiB at the front of `buf`, between messages. Its header is judged by the
    /// same rules as [`Connection::check_header`]; anything else (a partial frame, a
    /// control frame, a fragment, reserved bits, a frame past a limit) is left to the
    /// general path: `None`, with nothing consumed.
    #[inline]
    fn read_whole(&mut self, buf: &mut BytesMut) -> Option<Result<Option<Message>, Error>> {
        let [b0, b1, ..] = buf[..] else {
            return None;
        };
        // FIN set, no reserved bits, text (1) or binary (2).
        if !(b0 == 0x81 || b0 == 0x82)
            || self.frame.is_some()
            || self.message.is_some()
            || self.close_received
            || self.failed
        {
            return None;
        }
        let masked = b1 & 0x80 != 0;
        // A server takes masked frames, a client unmasked ones (others: the general path).
        if masked != (self.role == Role::Server) {
            return None;
        }
        let (len, mut header_len) = match b1 & 0x7F {
            126 => {
                let bytes = buf.get(2..4)?;
                (usize::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
            }
            127 => return None,
            n => (usize::from(n), 2),
        };
        if len > self.config.max_frame_size || len > self.config.max_message_size {
            return None;
        }
        let key = if masked {
            let bytes = buf.get(header_len..header_len + 4)?;
            header_len += 4;
            Some([bytes[0], bytes[1], bytes[2], bytes[3]])
        } else {
            None
        };
        if buf.len() < header_len + len {
            return None;
        }
        let text = b0 == 0x81;
        let payload = &mut buf[header_len..header_len + len];
        let ascii = match key {
            Some(key) if text => crate::mask::unmask_ascii(payload, key),
            Some(key) => {
                crate::mask::apply_mask(payload, key);
                false
            }
            None => false,
        };
        if text && !ascii && !crate::utf8::is_valid(payload) {
            let error = ProtocolError::InvalidUtf8;
            self.fail(&error);
            return Some(Err(error.into()));
        }
        let mut data = if buf.len() == header_len + len {
            // The frame is all there is (one read, one message): the buffer itself.
            std::mem::take(buf)
        } else {
            buf.split_to(header_len + len)
        };
        data.advance(header_len);
        Some(Ok(Some(Self::complete(text, data))))
    }

    /// How many more bytes the frame in progress needs, or 0 when no frame is under way
    /// (a hint for sizing the next read).
    pub fn read_hint(&self) -> usize {
        self.frame.as_ref().map_or(0, |f| {
            (f.header.payload_len as usize).saturating_sub(f.processed)
        })
    }

    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ProtocolError> {
        let frame = match self.frame.as_mut() {
            Some(frame) => frame,
            None => {
                let Some((header, header_len)) = FrameHeader::parse(buf)? else {
                    return Ok(Step::NeedMore);
                };
                let text = self.check_header(&header)?;
                self.frame.insert(PartialFrame {
                    header,
                    header_len,
                    processed: 0,
                    text,
                })
            }
        };
        // check_header bounded payload_len by max_frame_size, a usize.
        let len = frame.header.payload_len as usize;
        let available = (buf.len() - frame.header_len).min(len);
        if available > frame.processed {
            let fresh = &mut buf[frame.header_len + frame.processed..frame.header_len + available];
            // ASCII text between code points needs no validating: seen while unmasking.
            let ascii = match frame.header.mask {
                Some(key) if frame.text && self.utf8.at_boundary() => {
                    crate::mask::unmask_ascii_at(fresh, key, frame.processed)
                }
                Some(key) => {
                    apply_mask_at(fresh, key, frame.processed);
                    false
                }
                None => false,
            };
            if frame.text && !ascii {
                self.utf8
                    .feed(fresh)
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
            }
            frame.processed = available;
        }
        if frame.processed < len {
            return Ok(Step::NeedMore);
        }
        let PartialFrame {
            header,
            header_len,
            text,
            ..
        } = self.frame.take().expect("frame in progress");
        buf.advance(header_len);
        let payload = buf.split_to(len);
        self.on_frame(header, text, payload)
    }

    /// Applies the rules a header can be judged by before its payload arrives. Returns
    /// whether the payload is text to validate.
    fn check_header(&mut self, header: &FrameHeader) -> Result<bool, ProtocolError> {
        // RSV1 marks a compressed message: allowed only with permessage-deflate, and only
        // on the first frame of a data message.
        let rsv1_allowed =
            self.deflate.is_some() && matches!(header.opcode, OpCode::Text | OpCode::Binary);
        if header.rsv2 || header.rsv3 || header.rsv1 && !rsv1_allowed {
            return Err(ProtocolError::ReservedBits);
        }
        match (self.role, header.mask.is_some()) {
            (Role::Server, false) if !self.config.accept_unmasked_frames => {
                return Err(ProtocolError::UnmaskedFrame)
            }
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        let len = header.payload_len;
        if header.opcode.is_control() {
            if !header.fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if len > 125 {
                return Err(ProtocolError::ControlTooLong(len));
            }
            return Ok(false);
        }
        if len > self.config.max_frame_size as u64 {
            return Err(ProtocolError::FrameTooBig {
                size: len,
                limit: self.config.max_frame_size,
            });
        }
        let (so_far, text, compressed) = match (header.opcode, &self.message) {
            (OpCode::Continuation, Some(message)) => (
                message.data.len() as u64,
                message.opcode == OpCode::Text,
                message.compressed,
            ),
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (_, Some(_)) => return Err(ProtocolError::ExpectedContinuation),
            (opcode, None) => {
                self.utf8.reset();
                (0, opcode == OpCode::Text, header.rsv1)
            }
        };
        if compressed {
            // The inflated size is checked while inflating.
            return Ok(false);
        }
        if so_far + len > self.config.max_message_size as u64 {
            return Err(ProtocolError::MessageTooBig {
                size: so_far + len,
                limit: self.config.max_message_size,
            });
        }
        Ok(text)
    }

    fn on_frame(
        &mut self,
        header: FrameHeader,
        text: bool,
        payload: BytesMut,
    ) -> Result<Step, ProtocolError> {
        let data = match header.opcode {
            OpCode::Ping => {
                if !self.close_sent {
                    self.write_frame(OpCode::Pong, true, &payload);
                }
                return Ok(Step::Message(Message::Ping(payload.freeze())));
            }
            OpCode::Pong => return Ok(Step::Message(Message::Pong(payload.freeze()))),
            OpCode::Close => {
                let frame = CloseFrame::parse(&payload)?;
                self.close_received = true;
                if !self.close_sent {
                    // Echo the peer's code; answer a bare Close with a normal one.
                    let code = frame.as_ref().map_or(CloseCode::NORMAL, |f| f.code);
                    self.write_close(&CloseFrame::new(code, ""));
                }
                return Ok(Step::Message(Message::Close(frame)));
            }
            _ if header.rsv1 || self.message.as_ref().is_some_and(|m| m.compressed) => {
                return self.on_compressed_frame(header, payload);
            }
            OpCode::Text | OpCode::Binary if header.fin => payload,
            OpCode::Text | OpCode::Binary => {
                self.message = Some(PartialMessage {
                    opcode: header.opcode,
                    compressed: false,
                    data: payload,
                });
                return Ok(Step::Consumed);
            }
            OpCode::Continuation => {
                let message = self.message.as_mut().expect("checked by check_header");
                message.data.extend_from_slice(&payload);
                if !header.fin {
                    return Ok(Step::Consumed);
                }
                self.message.take().expect("message in progress").data
            }
        };
        if text {
            self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        Ok(Step::Message(Self::complete(text, data)))
    }

    fn complete(text: bool, data: BytesMut) -> Message {
        let data = data.freeze();
        if text {
            Message::Text(Text::from_validated(data))
        } else {
            Message::Binary(data)
        }
    }

    /// A frame of a compressed message: inflated onto the message at once, so the
    /// inflated size limit and text validity are checked frame by frame.
    fn on_compressed_frame(
        &mut self,
        header: FrameHeader,
        payload: BytesMut,
    ) -> Result<Step, ProtocolError> {
        let (opcode, mut data) = match self.message.take() {
            Some(message) => (message.opcode, message.data),
            None => (header.opcode, BytesMut::new()),
        };
        let start = data.len();
        let deflate = self
            .deflate
            .as_mut()
            .expect("RSV1 is accepted only with deflate");
        deflate.decompress(
            &payload,
            header.fin,
            &mut data,
            self.config.max_message_size,
        )?;
        let text = opcode == OpCode::Text;
        if text {
            self.utf8
                .feed(&data[start..])
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        if !header.fin {
            self.message = Some(PartialMessage {
                opcode,
                compressed: true,
                data,
            });
            return Ok(Step::Consumed);
        }
        if text {
            self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        Ok(Step::Message(Self::complete(text, data)))
    }

    fn fail(&mut self, error: &ProtocolError) {
        self.failed = true;
        self.frame = None;
        self.message = None;
        if !self.close_sent {
            self.write_close(&CloseFrame::new(error.close_code(), error.to_string()));
        }
    }

    fn write_frame(&mut self, opcode: OpCode, fin: bool, payload: &[u8]) {
        let mut header = FrameHeader::new(opcode, payload.len() as u64);
        header.fin = fin;
        header.mask = self.masks.as_mut().map(|rng| rng.random::<[u8; 4]>());
        encode_frame(&mut self.out, &header, payload);
    }

    /// A whole data message: compressed when permessage-deflate is on and it pays.
    fn write_message(&mut self, opcode: OpCode, payload: &[u8]) {
        if let Some(deflate) = self.deflate.as_mut() {
            if deflate.compress(payload, &mut self.scratch) {
                let mut header = FrameHeader::new(opcode, self.scratch.len() as u64);
                header.rsv1 = true;
                header.mask = self.masks.as_mut().map(|rng| rng.random::<[u8; 4]>());
                encode_frame(&mut self.out, &header, &self.scratch);
                return;
            }
        }
        self.write_frame(opcode, true, payload);
    }

    fn write_close(&mut self, frame: &CloseFrame) {
        let mut payload = Vec::with_capacity(2 + frame.reason.len());
        frame.encode_payload(&mut payload);
        self.write_frame(OpCode::Close, true, &payload);
        self.close_sent = true;
    }

    /// Whether frames made once for many connections ([`crate::frame::server_frame`])
    /// go out on this one as they are: a server's, without compression. An error once
    /// this side has sent its Close.
    pub fn takes_frames(&self) -> Result<bool, Error> {
        self.check_open()?;
        Ok(self.masks.is_none() && self.deflate.is_none())
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.close_sent {
            Err(Error::Closing)
        } else {
            Ok(())
        }
    }

    /// Queues a text message as one frame.
    pub fn send_text(&mut self, text: &str) -> Result<(), Error> {
        self.send(OpCode::Text, text.as_bytes())
    }

    /// Queues a binary message as one frame.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), Error> {
        self.send(OpCode::Binary, data)
    }

    /// Queues a message of `opcode` (text, binary, ping or pong) as one frame. The caller
    /// guarantees text is UTF-8.
    pub fn send(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), Error> {
        self.check_open()?;
        if self.masks.is_none() && self.deflate.is_none() && !opcode.is_control() {
            // A server's data frame, as it is: the header straight in front of the copy.
            let (head, head_len) = server_header(opcode, payload.len());
            self.out.reserve(head_len + payload.len());
            self.out.put_slice(&head[..head_len]);
            self.out.put_slice(payload);
            return Ok(());
        }
        if opcode.is_control() {
            if payload.len() > 125 {
                return Err(Error::ControlPayloadTooLong(payload.len()));
            }
            self.write_frame(opcode, true, payload);
        } else {
            self.write_message(opcode, payload);
        }
        Ok(())
    }

    /// Queues one frame of a fragmented message: `opcode` is Text or Binary for the first
    /// frame and Continuation after it; `fin` ends the message. Fragments are never
    /// compressed.
    pub fn send_fragment(
        &mut self,
        opcode: OpCode,
        payload: &[u8],
        fin: bool,
    ) -> Result<(), Error> {
        self.check_open()?;
        self.write_frame(opcode, fin, payload);
        Ok(())
    }

    /// The frame header of a whole data message whose `len`-byte payload the caller
    /// writes itself, as it is, right after the bytes queued so far (and the header): a
    /// large payload then goes out without being copied (a vectored write). The header
    /// and its length; `None`, queuing nothing, when the payload must be transformed on
    /// the way (masked by a client, or compressed): use [`Connection::send`] then.
    pub fn header_only(
        &mut self,
        opcode: OpCode,
        len: usize,
    ) -> Result<Option<([u8; crate::frame::MAX_HEADER_LEN], usize)>, Error> {
        self.check_open()?;
        if opcode.is_control() || self.masks.is_some() || self.deflate.is_some() {
            return Ok(None);
        }
        Ok(Some(server_header(opcode, len)))
    }

    /// Starts the close handshake. Does nothing if this side already sent its Close.
    pub fn close(&mut self, frame: Option<CloseFrame>) {
        if self.close_sent {
            return;
        }
        match frame {
            Some(frame) => self.write_close(&frame),
            None => {
                self.write_frame(OpCode::Close, true, &[]);
                self.close_sent = true;
            }
        }
    }

    /// The bytes queued to send.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Takes the queued bytes out.
    pub fn take_output(&mut self) -> BytesMut {
        self.out.split()
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    pub fn close_received(&self) -> bool {
        self.close_received
    }

    /// Whether a protocol error failed the connection.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Whether nothing more will be read: the close handshake finished, the peer's Close
    /// arrived, or the connection failed. The transport may close once the output is out.
    pub fn is_done(&self) -> bool {
        self.close_received || self.failed
    }

    /// Whether a message or frame is partly received.
    pub fn is_mid_message(&self) -> bool {
        self.frame.is_some() || self.message.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn pair() -> (Connection, Connection) {
        (
            Connection::client(Config::default(), [1; 32]),
            Connection::server(Config::default()),
        )
    }

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut header = FrameHeader::new(OpCode::from_u8(opcode).unwrap(), payload.len() as u64);
        header.fin = fin;
        header.mask = Some([0xa, 0xb, 0xc, 0xd]);
        let mut out = BytesMut::new();
        encode_frame(&mut out, &header, payload);
        out.to_vec()
    }

    fn read_all(conn: &mut Connection, bytes: &[u8]) -> Result<Vec<Message>, Error> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = conn.read(&mut buf)? {
            out.push(m);
        }
        Ok(out)
    }

    fn sent_close_code(conn: &mut Connection) -> Option<u16> {
        let mut out = conn.take_output();
        let mut client = Connection::client(Config::default(), [0; 32]);
        loop {
            match client.read(&mut out) {
                Ok(Some(Message::Close(frame))) => return frame.map(|f| f.code.0),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    #[test]
    fn text_and_binary_both_ways() {
        let (mut client, mut server) = pair();
        client.send_text("héllo").unwrap();
        client.send_binary(&[0, 1, 2, 255]).unwrap();
        let messages = read_all(&mut server, &client.take_output()).unwrap();
        assert_eq!(
            messages,
            vec![
                Message::Text("héllo".into()),
                Message::Binary(vec![0, 1, 2, 255].into())
            ]
        );

        server.send_text("back").unwrap();
        let messages = read_all(&mut client, &server.take_output()).unwrap();
        assert_eq!(messages, vec![Message::Text("back".into())]);
    }

    #[test]
    fn fragments_with_a_ping_between() {
        let (_, mut server) = pair();
        let mut bytes = masked(1, false, "frag".as_bytes());
        bytes.extend(masked(9, true, b"p"));
        bytes.extend(masked(0, false, "men".as_bytes()));
        bytes.extend(masked(0, true, "ted ✓".as_bytes()));
        let messages = read_all(&mut server, &bytes).unwrap();
        assert_eq!(
            messages,
            vec![
                Message::Ping(Bytes::from_static(b"p")),
                Message::Text("fragmented ✓".into())
            ]
        );
        // The ping was answered.
        let mut client = Connection::client(Config::default(), [0; 32]);
        let replies = read_all(&mut client, &server.take_output()).unwrap();
        assert_eq!(replies, vec![Message::Pong(Bytes::from_static(b"p"))]);
    }

    #[test]
    fn byte_at_a_time_equals_all_at_once() {
        let (mut client, mut server) = pair();
        client.send_text(&"x".repeat(70_000)).unwrap();
        client.send_binary(&[7; 300]).unwrap();
        let wire = client.take_output();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            while let Some(m) = server.read(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Message::Text(t) if t.len() == 70_000));
        assert_eq!(got[1], Message::Binary(vec![7; 300].into()));
    }

    /// Every frame decoded whole (the one-go path) and a byte at a time (the general
    /// path) gives the same messages, the same error and the same reply.
    #[test]
    fn whole_frames_decode_as_pieces_do() {
        let texts: [&[u8]; 6] = [
            b"",
            b"hello",
            "a bit of ünïcode ✓".as_bytes(),
            b"bad \xff text",
            b"cut \xe2\x82",
            &[b'x'; 200],
        ];
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for text in texts {
            frames.push(masked(1, true, text));
            frames.push(masked(2, true, text));
            // Unmasked at a server, and a fragment: the general path's cases.
            let mut plain = BytesMut::new();
            let header = FrameHeader::new(OpCode::Text, text.len() as u64);
            encode_frame(&mut plain, &header, text);
            frames.push(plain.to_vec());
            frames.push(masked(1, false, text));
        }
        frames.push(masked(1, true, &[b'y'; 70_000]));
        let limited = Config::default().with_max_message_size(100);
        for config in [Config::default(), limited] {
            for wire in &frames {
                let mut whole = Connection::server(config.clone());
                let mut piecewise = Connection::server(config.clone());
                let at_once = read_all(&mut whole, wire);
                let mut buf = BytesMut::new();
                let mut by_byte = Ok(Vec::new());
                for byte in wire {
                    buf.extend_from_slice(&[*byte]);
                    match piecewise.read(&mut buf) {
                        Ok(Some(m)) => by_byte.as_mut().expect("no error yet").push(m),
                        Ok(None) => {}
                        Err(e) => {
                            by_byte = Err(e);
                            break;
                        }
                    }
                }
                assert_eq!(at_once, by_byte, "{:?}", &wire[..wire.len().min(12)]);
                assert_eq!(whole.take_output(), piecewise.take_output());
            }
        }
    }

    #[test]
    fn invalid_text_fails_before_the_frame_ends() {
        let (_, mut server) = pair();
        let frame = masked(
            1,
            true,
            b"valid start \xed\xa0\x80 then more text that never arrives",
        );
        // Only the first 25 bytes of the frame arrive.
        let mut buf = BytesMut::from(&frame[..25]);
        assert_eq!(
            server.read(&mut buf),
            Err(Error::Protocol(ProtocolError::InvalidUtf8))
        );
        assert_eq!(sent_close_code(&mut server), Some(1007));
    }

    #[test]
    fn invalid_text_fails_in_the_fragment_that_breaks_it() {
        let (_, mut server) = pair();
        let mut bytes = masked(1, false, "κόσμε".as_bytes());
        bytes.extend(masked(
            0,
            false,
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80",
        ));
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            server.read(&mut buf),
            Err(Error::Protocol(ProtocolError::InvalidUtf8))
        );
    }

    #[test]
    fn protocol_violations_and_their_codes() {
        let cases: Vec<(Vec<u8>, ProtocolError, u16)> = vec![
            (
                {
                    let mut f = masked(1, true, b"x");
                    f[0] |= 0x40;
                    f
                },
                ProtocolError::ReservedBits,
                1002,
            ),
            (
                vec![0x83, 0x80, 0, 0, 0, 0],
                ProtocolError::ReservedOpcode(3),
                1002,
            ),
            (vec![0x81, 0x01, b'x'], ProtocolError::UnmaskedFrame, 1002),
            (
                masked(9, false, b""),
                ProtocolError::FragmentedControl,
                1002,
            ),
            (
                masked(9, true, &[0; 126]),
                ProtocolError::ControlTooLong(126),
                1002,
            ),
            (
                masked(0, true, b"x"),
                ProtocolError::UnexpectedContinuation,
                1002,
            ),
            (
                {
                    let mut f = masked(1, false, b"a");
                    f.extend(masked(2, true, b"b"));
                    f
                },
                ProtocolError::ExpectedContinuation,
                1002,
            ),
            (
                masked(8, true, &[3]),
                ProtocolError::InvalidClosePayload,
                1002,
            ),
            (
                masked(8, true, &[0x03, 0xed]),
                ProtocolError::InvalidCloseCode(1005),
                1002,
            ),
            (
                masked(8, true, &[0x03, 0xe8, 0xff]),
                ProtocolError::InvalidUtf8,
                1007,
            ),
        ];
        for (bytes, error, code) in cases {
            let mut server = Connection::server(Config::default());
            assert_eq!(
                read_all(&mut server, &bytes),
                Err(Error::Protocol(error.clone())),
                "{error}"
            );
            assert!(server.is_failed());
            assert_eq!(sent_close_code(&mut server), Some(code), "{error}");
        }
    }

    #[test]
    fn limits_are_checked_from_the_header_alone() {
        let config = Config::default()
            .with_max_message_size(1000)
            .with_max_frame_size(600);
        let mut server = Connection::server(config.clone());
        // A header announcing 2^40 bytes fails at once, with none of the payload sent.
        let mut header = vec![0x82, 0xFF];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        assert!(matches!(
            read_all(&mut server, &header),
            Err(Error::Protocol(ProtocolError::FrameTooBig { .. }))
        ));
        assert_eq!(sent_close_code(&mut server), Some(1009));

        let mut server = Connection::server(config);
        let mut bytes = masked(2, false, &[0; 500]);
        bytes.extend(masked(0, false, &[0; 500]));
        bytes.extend(masked(0, true, &[0; 1]));
        assert!(matches!(
            read_all(&mut server, &bytes),
            Err(Error::Protocol(ProtocolError::MessageTooBig {
                size: 1001,
                limit: 1000
            }))
        ));
        assert_eq!(sent_close_code(&mut server), Some(1009));
    }

    #[test]
    fn close_handshake_from_either_side() {
        let (mut client, mut server) = pair();
        client.close(Some(CloseFrame::new(CloseCode::NORMAL, "bye")));
        assert_eq!(client.send_text("late"), Err(Error::Closing));
        let got = read_all(&mut server, &client.take_output()).unwrap();
        assert_eq!(
            got,
            vec![Message::Close(Some(CloseFrame::new(
                CloseCode::NORMAL,
                "bye"
            )))]
        );
        assert!(server.is_done() && server.close_sent());
        let got = read_all(&mut client, &server.take_output()).unwrap();
        assert_eq!(
            got,
            vec![Message::Close(Some(CloseFrame::new(CloseCode::NORMAL, "")))]
        );
        assert!(client.is_done());

        // A bare Close is answered with 1000; data after it is ignored.
        let mut server = Connection::server(Config::default());
        let mut bytes = masked(8, true, b"");
        bytes.extend(masked(1, true, b"ignored"));
        assert_eq!(
            read_all(&mut server, &bytes).unwrap(),
            vec![Message::Close(None)]
        );
        assert_eq!(sent_close_code(&mut server), Some(1000));
    }

    #[test]
    fn data_in_flight_after_our_close_is_still_delivered() {
        let (mut client, mut server) = pair();
        server.close(Some(CloseFrame::new(CloseCode::GOING_AWAY, "shutdown")));
        client.send_text("in flight").unwrap();
        client.close(None);
        let got = read_all(&mut server, &client.take_output()).unwrap();
        assert_eq!(
            got,
            vec![Message::Text("in flight".into()), Message::Close(None)]
        );
        // Only our own Close went out: the peer's Close answered it and needs no answer.
        let mut client = Connection::client(Config::default(), [0; 32]);
        let sent = read_all(&mut client, &server.take_output()).unwrap();
        assert_eq!(
            sent,
            vec![Message::Close(Some(CloseFrame::new(
                CloseCode::GOING_AWAY,
                "shutdown"
            )))]
        );
    }

    #[test]
    fn client_rejects_masked_frames_and_masks_its_own() {
        let (mut client, _) = pair();
        assert_eq!(
            read_all(&mut client, &masked(1, true, b"x")),
            Err(Error::Protocol(ProtocolError::MaskedFrame))
        );
        let (mut client, _) = pair();
        client.send_text("abc").unwrap();
        let out = client.take_output();
        assert_eq!(out[1] & 0x80, 0x80);
        assert_ne!(&out[6..], b"abc");
    }
    fn deflate_pair(params: DeflateParams) -> (Connection, Connection) {
        let config = DeflateConfig::default();
        (
            Connection::client(Config::default(), [5; 32]).with_deflate(params, &config),
            Connection::server(Config::default()).with_deflate(params, &config),
        )
    }

    #[test]
    fn compressed_messages_both_ways() {
        let (mut client, mut server) = deflate_pair(DeflateParams::default());
        let json = r#"{"type":"message","text":"the same words again and again and again"}"#;
        for _ in 0..3 {
            client.send_text(json).unwrap();
        }
        client.send_binary(&[9; 5000]).unwrap();
        let wire = client.take_output();
        assert!(
            wire.len() < 3 * json.len(),
            "compressed: {} bytes",
            wire.len()
        );
        assert_eq!(wire[0] & 0x40, 0x40, "RSV1 marks the first message");
        let got = read_all(&mut server, &wire).unwrap();
        assert_eq!(got.len(), 4);
        assert!(got[..3]
            .iter()
            .all(|m| matches!(m, Message::Text(t) if t.as_str() == json)));
        assert_eq!(got[3], Message::Binary(vec![9; 5000].into()));

        server.send_text(json).unwrap();
        let got = read_all(&mut client, &server.take_output()).unwrap();
        assert!(matches!(&got[..], [Message::Text(t)] if t.as_str() == json));
    }

    #[test]
    fn a_compressed_message_in_fragments_with_a_ping_between() {
        let (_, mut server) = deflate_pair(DeflateParams::default());
        let text = "fragmented and compressed ".repeat(50);
        let mut sender = Deflate::new(
            Role::Client,
            DeflateParams::default(),
            &DeflateConfig::default(),
        );
        let mut body = BytesMut::new();
        assert!(sender.compress(text.as_bytes(), &mut body));
        let (a, b) = body.split_at(body.len() / 2);
        let mut bytes = masked(1, false, a);
        bytes[0] |= 0x40;
        bytes.extend(masked(9, true, b"p"));
        bytes.extend(masked(0, true, b));
        let got = read_all(&mut server, &bytes).unwrap();
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[1], Message::Text(t) if t.as_str() == text));
    }

    #[test]
    fn rsv1_is_refused_where_it_does_not_belong() {
        // Without deflate.
        let mut server = Connection::server(Config::default());
        let mut frame = masked(1, true, b"x");
        frame[0] |= 0x40;
        assert_eq!(
            read_all(&mut server, &frame),
            Err(Error::Protocol(ProtocolError::ReservedBits))
        );
        // On a continuation frame, and on a control frame.
        for (first, second) in [
            (masked(1, false, b"a"), {
                let mut f = masked(0, true, b"b");
                f[0] |= 0x40;
                f
            }),
            (Vec::new(), {
                let mut f = masked(9, true, b"");
                f[0] |= 0x40;
                f
            }),
        ] {
            let (_, mut server) = deflate_pair(DeflateParams::default());
            let mut bytes = first;
            bytes.extend(second);
            assert_eq!(
                read_all(&mut server, &bytes),
                Err(Error::Protocol(ProtocolError::ReservedBits))
            );
        }
    }

    #[test]
    fn deflate_bomb_and_corrupt_data_fail_with_their_codes() {
        let config = DeflateConfig::default().with_level(9);
        let mut sender = Deflate::new(Role::Client, DeflateParams::default(), &config);
        let mut bomb = BytesMut::new();
        assert!(sender.compress(&vec![b'a'; 1 << 20], &mut bomb));
        assert!(bomb.len() < 5000, "{} bytes", bomb.len());
        let mut server = Connection::server(Config::default().with_max_message_size(64 * 1024))
            .with_deflate(DeflateParams::default(), &config);
        let mut frame = masked(1, true, &bomb);
        frame[0] |= 0x40;
        assert!(matches!(
            read_all(&mut server, &frame),
            Err(Error::Protocol(ProtocolError::MessageTooBig { .. }))
        ));
        assert_eq!(sent_close_code(&mut server), Some(1009));

        let (_, mut server) = deflate_pair(DeflateParams::default());
        let mut frame = masked(2, true, &[0xff, 0xfe, 0xfd, 0xfc, 0xfb]);
        frame[0] |= 0x40;
        assert_eq!(
            read_all(&mut server, &frame),
            Err(Error::Protocol(ProtocolError::InvalidCompressedData))
        );
        assert_eq!(sent_close_code(&mut server), Some(1007));
    }

    #[test]
    fn compressed_invalid_text_is_1007() {
        let mut sender = Deflate::new(
            Role::Client,
            DeflateParams::default(),
            &DeflateConfig::default(),
        );
        let mut body = BytesMut::new();
        assert!(sender.compress(
            &[b"valid text, then: ".repeat(3), vec![0xed, 0xa0, 0x80]].concat(),
            &mut body
        ));
        let (_, mut server) = deflate_pair(DeflateParams::default());
        let mut frame = masked(1, true, &body);
        frame[0] |= 0x40;
        assert_eq!(
            read_all(&mut server, &frame),
            Err(Error::Protocol(ProtocolError::InvalidUtf8))
        );
    }
}
