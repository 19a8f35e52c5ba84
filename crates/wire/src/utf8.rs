//! Incremental UTF-8 validation for text that arrives in pieces.
//!
//! A text message may be split over frames, and a frame over reads, at any byte, even
//! inside a code point. [`Utf8Validator`] keeps at most three bytes of an unfinished code
//! point between pieces and rejects a piece as soon as it cannot be the start of valid
//! text, without waiting for the rest of the message.

/// Whether `bytes` are valid UTF-8 on their own (a whole message): short ASCII, the
/// usual case, with a word-at-a-time check, the rest with the vectorized validator.
#[inline]
pub fn is_valid(bytes: &[u8]) -> bool {
    (bytes.len() <= 64 && is_short_ascii(bytes)) || simdutf8::basic::from_utf8(bytes).is_ok()
}

/// ASCII, eight bytes at a time (no early exit: the slices are short).
#[inline]
fn is_short_ascii(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    let mut seen = 0u64;
    for word in &mut words {
        seen |= u64::from_ne_bytes(word.try_into().expect("8 bytes"));
    }
    let mut tail = 0u8;
    for &byte in words.remainder() {
        tail |= byte;
    }
    seen & 0x8080_8080_8080_8080 == 0 && tail & 0x80 == 0
}

/// The text seen so far cannot be completed into valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Validates a byte stream piece by piece.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

/// Length of the sequence a (valid) lead byte starts.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

impl Utf8Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece of the stream.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let need = sequence_len(self.pending[0]);
            let take = (need - have).min(input.len());
            self.pending[have..have + take].copy_from_slice(&input[..take]);
            let have = have + take;
            input = &input[take..];
            match simdutf8::compat::from_utf8(&self.pending[..have]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still a valid prefix: the piece ended inside the code point.
                    self.pending_len = have as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        // Short ASCII pieces (most chat messages, JSON) skip the validator's setup:
        // a word-at-a-time check and done.
        if is_valid(input) {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &input[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Whether the text so far ended on a code point boundary (then an ASCII piece is
    /// valid as it is, and leaves it so).
    pub fn at_boundary(&self) -> bool {
        self.pending_len == 0
    }

    /// Ends the stream: fails if it stopped inside a code point. Resets for reuse.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let complete = self.pending_len == 0;
        self.pending_len = 0;
        if complete {
            Ok(())
        } else {
            Err(InvalidUtf8)
        }
    }

    pub fn reset(&mut self) {
        self.pending_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_everywhere(bytes: &[u8]) -> bool {
        let whole = std::str::from_utf8(bytes).is_ok();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut v = Utf8Validator::new();
                let ok = v.feed(&bytes[..a]).is_ok()
                    && v.feed(&bytes[a..b]).is_ok()
                    && v.feed(&bytes[b..]).is_ok()
                    && v.finish().is_ok();
                assert_eq!(ok, whole, "{bytes:x?} split at {a},{b}");
            }
        }
        whole
    }

    #[test]
    fn agrees_with_std_at_every_split() {
        assert!(split_everywhere("κόσμε".as_bytes()));
        assert!(split_everywhere("a€𝄞z".as_bytes()));
        assert!(split_everywhere(b""));
        assert!(!split_everywhere(
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"
        ));
        assert!(!split_everywhere(b"\xf4\x90\x80\x80"));
        assert!(!split_everywhere(b"ab\xc0\xaf"));
        assert!(!split_everywhere(b"\xe2\x82"));
    }

    #[test]
    fn whole_messages_agree_with_std() {
        for len in 0..80 {
            let ascii = vec![b'a'; len];
            assert!(is_valid(&ascii));
            for at in 0..len {
                let mut bytes = ascii.clone();
                bytes[at] = 0x80;
                assert!(!is_valid(&bytes), "0x80 at {at} of {len}");
                bytes[at] = 0xC3;
                let alone = std::str::from_utf8(&bytes).is_ok();
                assert_eq!(is_valid(&bytes), alone);
                if at + 1 < len {
                    bytes[at + 1] = 0xA9;
                    assert!(is_valid(&bytes), "é at {at} of {len}");
                }
            }
        }
    }

    #[test]
    fn fails_fast_before_the_end() {
        let mut v = Utf8Validator::new();
        assert!(v.feed("κόσμε".as_bytes()).is_ok());
        // 0xED 0xA0 starts a surrogate: invalid however the stream continues.
        assert_eq!(v.feed(b"\xed\xa0"), Err(InvalidUtf8));
        let mut v = Utf8Validator::new();
        assert!(v.feed(b"\xf0").is_ok());
        assert_eq!(v.feed(b"\x20"), Err(InvalidUtf8));
    }
}
