//! Limits and switches of one connection, all bounded, all with defaults.

/// Settings of a [`crate::Connection`]. Build with [`Config::default`] and the `with_*`
/// methods; fields may be added in later versions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Largest payload of a single frame; a larger one fails the connection with 1009
    /// before any of it is buffered.
    pub max_frame_size: usize,
    /// Largest reassembled message; a larger one fails the connection with 1009.
    pub max_message_size: usize,
    /// Accept unmasked frames from a client (a server that is lenient on purpose).
    pub accept_unmasked_frames: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_frame_size: 16 << 20,
            max_message_size: 16 << 20,
            accept_unmasked_frames: false,
        }
    }
}

impl Config {
    pub fn with_max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    pub fn with_accept_unmasked_frames(mut self, accept: bool) -> Self {
        self.accept_unmasked_frames = accept;
        self
    }
}
