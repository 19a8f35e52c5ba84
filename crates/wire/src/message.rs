//! Messages as the application sees them: whole, reassembled, text validated.

use bytes::Bytes;

use crate::close::CloseFrame;

/// A complete message or control frame received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Text),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The peer's Close frame; `None` when it carried no status code.
    Close(Option<CloseFrame>),
}

/// Text known to be valid UTF-8, sharing the received buffer without a copy.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Text(Bytes);

impl Text {
    /// Checks `bytes` and wraps them.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, Bytes> {
        if simdutf8::basic::from_utf8(&bytes).is_ok() {
            Ok(Self(bytes))
        } else {
            Err(bytes)
        }
    }

    /// Wraps bytes the caller has already validated.
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        Self(bytes)
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor validates the bytes as UTF-8 (`from_bytes`,
        // `From<String>`, `From<&'static str>`) or is only reached after the incremental
        // validator accepted the whole message (`from_validated`). Checking again here
        // would scan every message twice on the hot path.
        #[allow(unsafe_code)]
        unsafe {
            std::str::from_utf8_unchecked(&self.0)
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
