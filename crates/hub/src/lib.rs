//! `switchboard-hub`: the chat domain, with no sockets in it.
//!
//! - [`Hub`] owns the rooms. A room hands out per-room message ids that increase by one,
//!   keeps its members and their presence (a user counts once however many connections
//!   it has), relays typing indicators and binary data to the others, and broadcasts
//!   every message to every member once it is stored.
//! - [`store`] holds the history: in memory or in SQLite. One writer thread stores
//!   messages in batches (many messages share one commit) and broadcasts each batch in
//!   id order after its commit, so nothing is sent that is not stored.
//! - With a [`ClusterConfig`], several nodes share rooms over Redis: ids, history,
//!   nonces and presence live there, and each message is one script call that stores
//!   and publishes it (see `cluster.rs` for the keys).
//! - [`event`] is the JSON wire contract of rooms (DESIGN.md, "The room protocol"), from
//!   `switchboard-protocol`.
//!
//! Joining with `since` registers the member and reads "the last broadcast id" under one
//! lock: the history up to that id comes from the store, everything after it arrives on
//! the member's queue, so a resume has no gap and no duplicate however busy the room is.

mod cluster;
mod hub;
pub mod store;

pub use cluster::{ClusterConfig, RedisStore};
pub use hub::{Hub, HubConfig, HubError, Membership, Outbound, Posted};
pub use store::{HistoryStore, MemoryStore, SqliteStore, StoreError, StoredMessage};
pub use switchboard_protocol::event;

/// The rule [`valid_room_id`] checks, in words, for error messages.
pub const ROOM_ID_RULE: &str = "room ids are 1-128 characters of A-Z a-z 0-9 . _ : -";

/// The rule [`valid_user_name`] checks, in words, for error messages.
pub const USER_NAME_RULE: &str =
    "user names are 1-64 characters, no control characters or surrounding spaces";

/// Whether `room` is a valid room id: 1-128 characters of `[A-Za-z0-9._:-]`.
pub fn valid_room_id(room: &str) -> bool {
    (1..=128).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b))
}

/// Whether `name` is a valid user name: 1-64 characters, no control characters.
pub fn valid_user_name(name: &str) -> bool {
    let chars = name.chars().count();
    (1..=64).contains(&chars) && !name.chars().any(char::is_control) && name.trim() == name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names() {
        assert!(valid_room_id("lobby"));
        assert!(valid_room_id("team-a.b:c_1"));
        assert!(!valid_room_id(""));
        assert!(!valid_room_id(&"a".repeat(129)));
        assert!(!valid_room_id("a b"));
        assert!(!valid_room_id("a/b"));
        assert!(valid_user_name("Alice"));
        assert!(valid_user_name("Zoë ☕"));
        assert!(!valid_user_name(""));
        assert!(!valid_user_name(" padded"));
        assert!(!valid_user_name("new\nline"));
    }
}
