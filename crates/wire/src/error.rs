//! Errors of the protocol engine. A [`ProtocolError`] is the peer's fault and maps to the
//! close code the connection is failed with; [`Error`] adds the caller's own mistakes.

use crate::close::CloseCode;

/// The peer broke RFC 6455 or a configured limit; the connection must be failed with
/// [`ProtocolError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("reserved bits set without an extension that defines them")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("control frame is fragmented")]
    FragmentedControl,
    #[error("control frame payload of {0} bytes is over 125")]
    ControlTooLong(u64),
    #[error("frame from the client is not masked")]
    UnmaskedFrame,
    #[error("frame from the server is masked")]
    MaskedFrame,
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is unfinished")]
    ExpectedContinuation,
    #[error("64-bit payload length has its most significant bit set")]
    InvalidLength,
    #[error("frame of {size} bytes is over the limit of {limit}")]
    FrameTooBig { size: u64, limit: usize },
    #[error("message of {size} bytes is over the limit of {limit}")]
    MessageTooBig { size: u64, limit: usize },
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    #[error("compressed data is corrupt")]
    InvalidCompressedData,
    #[error("close frame payload of one byte")]
    InvalidClosePayload,
    #[error("close code {0} may not be sent on the wire")]
    InvalidCloseCode(u16),
}

impl ProtocolError {
    /// The close code RFC 6455 (section 7.4.1) asks for when failing on this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::FrameTooBig { .. } | Self::MessageTooBig { .. } => CloseCode::TOO_BIG,
            Self::InvalidUtf8 | Self::InvalidCompressedData => CloseCode::INVALID_PAYLOAD,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// Everything that can go wrong in [`crate::Connection`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer violated the protocol; a Close frame with the matching code is queued.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A message was sent after this side had sent its Close frame.
    #[error("the connection is closing; no more messages may be sent")]
    Closing,
    /// A control frame payload over 125 bytes was asked for.
    #[error("control frame payload of {0} bytes is over 125")]
    ControlPayloadTooLong(usize),
}
