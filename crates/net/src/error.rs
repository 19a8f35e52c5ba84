//! Errors of the driver.

use switchboard_wire::handshake::HandshakeError;
use switchboard_wire::ProtocolError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol; the connection was failed with the matching code.
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
    #[error("handshake failed: {0}")]
    Handshake(HandshakeError),
    /// The peer went away without a Close frame (close code 1006).
    #[error("connection closed without a close frame")]
    ConnectionLost,
    /// Nothing arrived for the ping interval plus the pong timeout.
    #[error("peer did not answer a ping in time")]
    PingTimeout,
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// A message was sent after the close handshake started.
    #[error("the connection is closing")]
    Closing,
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("invalid URL {url}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
}

// Written out rather than derived so the inner error is not also reported as a source:
// error chains would print its message twice.
impl From<ProtocolError> for Error {
    fn from(error: ProtocolError) -> Self {
        Self::Protocol(error)
    }
}

impl From<HandshakeError> for Error {
    fn from(error: HandshakeError) -> Self {
        Self::Handshake(error)
    }
}

impl From<switchboard_wire::Error> for Error {
    fn from(error: switchboard_wire::Error) -> Self {
        match error {
            switchboard_wire::Error::Protocol(p) => Self::Protocol(p),
            switchboard_wire::Error::Closing => Self::Closing,
            other => Self::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, other)),
        }
    }
}
