//! History for a single node: the [`Store`] trait and two stores, in memory
//! ([`MemoryStore`]) and SQLite ([`SqliteStore`]).
//!
//! Stores are synchronous; the local backend calls them from its writer thread (appends
//! and trims) and from blocking tasks (reads), never on an async worker. Every channel
//! has a [`Position`]: its last id, which never goes back even when its publications
//! are trimmed, and its epoch, which a store keeps for as long as it keeps the channel's
//! history (SQLite: across restarts; memory: for the life of the process).

use rand::{RngCore, SeedableRng};

mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;
pub use switchboard_protocol::Publication;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Unavailable(&'static str),
    /// A call that failed, said as it failed (when one failure answers several calls).
    #[error("{0}")]
    Refused(String),
    #[error("creating the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
}

/// Where a channel's stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The id of its last publication (0 before the first).
    pub last_id: u64,
    /// Changes when the history can no longer be trusted to be continuous.
    pub epoch: String,
}

/// Which publications of a channel to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Ids above this.
    pub after: u64,
    /// Ids up to this.
    pub upto: u64,
    /// At most this many.
    pub limit: usize,
    /// The newest `limit` of the window rather than the oldest (oldest first either way).
    pub newest: bool,
    /// Only publications with a timestamp at or after this (RFC 3339, as stored).
    pub not_before: Option<String>,
}

/// What a channel's trimming removes: publications outside what its options keep,
/// except those whose nonce is still remembered (a retry must still find them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trim {
    /// Publications with an id up to this go.
    pub upto: u64,
    /// Publications older than this go.
    pub older_than: Option<String>,
    /// Publications with a nonce at or after this stay regardless.
    pub nonces_from: String,
}

/// Where a single node keeps history.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The channel's position; a channel seen for the first time starts at 0 with a new
    /// epoch.
    fn position(&self, channel: &str) -> Result<Position, StoreError>;
    /// Stores a batch durably, all or nothing. Publications of one channel arrive in id
    /// order, each one more than the last.
    fn append(&self, batch: &[&Publication]) -> Result<(), StoreError>;
    /// The publications of `channel` in `window`, oldest first.
    fn read(&self, channel: &str, window: &Window) -> Result<Vec<Publication>, StoreError>;
    /// The publication `from` sent to `channel` with `nonce` at or after `not_before`
    /// (`from` is `None` for the server's own publications).
    fn find_nonce(
        &self,
        channel: &str,
        from: Option<&str>,
        nonce: &str,
        not_before: &str,
    ) -> Result<Option<Publication>, StoreError>;
    /// Removes what `trim` says goes.
    fn trim(&self, channel: &str, trim: &Trim) -> Result<(), StoreError>;
}

/// A fresh epoch: 8 random hex digits.
pub fn new_epoch() -> String {
    format!("{:08x}", rand::rngs::StdRng::from_os_rng().next_u32())
}

/// Whether `publication` falls in `window`, ids aside.
fn in_time(publication: &Publication, not_before: Option<&str>) -> bool {
    not_before.map_or(true, |t| publication.timestamp.as_str() >= t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(channel: &str, id: u64, nonce: Option<&str>, at: &str) -> Publication {
        Publication {
            channel: channel.into(),
            id,
            from: Some("alice".into()),
            text: Some(format!("message {id}")),
            data: None,
            event: None,
            timestamp: format!("2026-11-23T10:00:{at}.000Z"),
            nonce: nonce.map(Into::into),
            client: None,
            client_info: None,
        }
    }

    fn window(after: u64, upto: u64, limit: usize, newest: bool) -> Window {
        Window {
            after,
            upto,
            limit,
            newest,
            not_before: None,
        }
    }

    fn ids(v: Vec<Publication>) -> Vec<u64> {
        v.into_iter().map(|m| m.id).collect()
    }

    fn exercise(store: &dyn Store) {
        let start = store.position("lobby").unwrap();
        assert_eq!(start.last_id, 0);
        assert_eq!(store.position("lobby").unwrap(), start, "the epoch stays");
        assert_ne!(store.position("other").unwrap().epoch, start.epoch);
        let batch: Vec<_> = (1..=10)
            .map(|id| publication("lobby", id, (id == 3).then_some("n-3"), &format!("{id:02}")))
            .collect();
        store.append(&batch.iter().collect::<Vec<_>>()).unwrap();
        store
            .append(&[&publication("other", 1, None, "00")])
            .unwrap();
        assert_eq!(store.position("lobby").unwrap().last_id, 10);
        assert_eq!(
            ids(store.read("lobby", &window(4, 8, 100, false)).unwrap()),
            [5, 6, 7, 8]
        );
        assert_eq!(
            ids(store.read("lobby", &window(4, 10, 2, false)).unwrap()),
            [5, 6]
        );
        assert_eq!(
            ids(store.read("lobby", &window(0, 9, 3, true)).unwrap()),
            [7, 8, 9]
        );
        assert_eq!(
            ids(store.read("lobby", &window(7, 9, 5, true)).unwrap()),
            [8, 9]
        );
        assert!(store
            .read("nowhere", &window(0, 9, 3, true))
            .unwrap()
            .is_empty());
        let recent = Window {
            not_before: Some("2026-11-23T10:00:06.000Z".into()),
            ..window(0, 10, 100, false)
        };
        assert_eq!(ids(store.read("lobby", &recent).unwrap()), [6, 7, 8, 9, 10]);
        let found = |nonce, not_before| {
            store
                .find_nonce("lobby", Some("alice"), nonce, not_before)
                .unwrap()
                .map(|m| m.id)
        };
        assert_eq!(found("n-3", ""), Some(3));
        assert_eq!(
            found("n-3", "2026-11-23T10:00:04.000Z"),
            None,
            "forgotten by then"
        );
        assert_eq!(
            store.find_nonce("lobby", Some("bob"), "n-3", "").unwrap(),
            None
        );
        assert_eq!(store.find_nonce("lobby", None, "n-3", "").unwrap(), None);
        assert_eq!(
            store.find_nonce("other", Some("alice"), "n-3", "").unwrap(),
            None
        );

        // Trimmed to the last 4 by size and to 00:08 on by age: 3 stays for its nonce.
        store
            .trim(
                "lobby",
                &Trim {
                    upto: 6,
                    older_than: Some("2026-11-23T10:00:08.000Z".into()),
                    nonces_from: String::new(),
                },
            )
            .unwrap();
        assert_eq!(
            ids(store.read("lobby", &window(0, 10, 100, false)).unwrap()),
            [3, 8, 9, 10]
        );
        assert_eq!(
            store.position("lobby").unwrap().last_id,
            10,
            "ids never go back"
        );
        store
            .trim(
                "lobby",
                &Trim {
                    upto: 10,
                    older_than: None,
                    nonces_from: "2026-11-23T10:00:04.000Z".into(),
                },
            )
            .unwrap();
        assert!(store
            .read("lobby", &window(0, 10, 100, false))
            .unwrap()
            .is_empty());
        assert_eq!(store.position("lobby").unwrap().last_id, 10);
        assert_eq!(
            ids(store.read("other", &window(0, 10, 100, false)).unwrap()),
            [1]
        );
    }

    #[test]
    fn memory_store() {
        exercise(&MemoryStore::new());
    }

    #[test]
    fn sqlite_store_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_dir(dir.path()).unwrap();
        exercise(&store);
        let epoch = store.position("lobby").unwrap().epoch;
        drop(store);
        let reopened = SqliteStore::open_dir(dir.path()).unwrap();
        assert_eq!(
            reopened.position("lobby").unwrap(),
            Position { last_id: 10, epoch }
        );
        // A duplicate id is refused: ids are unique per channel.
        assert!(reopened
            .append(&[&publication("other", 1, None, "00")])
            .is_err());
    }

    #[test]
    fn data_server_publications_and_their_connections_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open_dir(dir.path()).unwrap();
        let memory = MemoryStore::new();
        for store in [&sqlite as &dyn Store, &memory] {
            let published = Publication {
                from: None,
                text: None,
                data: Some(
                    serde_json::value::RawValue::from_string(r#"{"price":101.5}"#.into()).unwrap(),
                ),
                event: Some("tick".into()),
                nonce: Some("api-1".into()),
                client: Some("client-1".into()),
                client_info: Some(
                    serde_json::value::RawValue::from_string(r#"{"device":"d"}"#.into()).unwrap(),
                ),
                ..publication("prices:btc", 1, None, "00")
            };
            store.append(&[&published]).unwrap();
            let read = store.read("prices:btc", &window(0, 1, 10, false)).unwrap();
            assert_eq!(read, std::slice::from_ref(&published));
            let found = store.find_nonce("prices:btc", None, "api-1", "").unwrap();
            assert_eq!(found, Some(published));
        }
    }
}
