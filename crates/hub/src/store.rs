//! Message history: a trait and two stores, in memory and SQLite (WAL).
//!
//! Stores are synchronous; the hub calls them from its writer thread (appends) and from
//! blocking tasks (reads), never on an async worker.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

pub use switchboard_protocol::StoredMessage;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("creating the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
}

/// Where history lives.
pub trait HistoryStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a batch durably, all or nothing. Messages of one room arrive in id order.
    fn append(&self, batch: &[StoredMessage]) -> Result<(), StoreError>;
    /// Messages of `room` with `after < id <= upto`, oldest first, at most `limit`.
    fn range(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;
    /// The newest `limit` messages of `room` with `id <= upto`, oldest first.
    fn recent(&self, room: &str, upto: u64, limit: usize)
        -> Result<Vec<StoredMessage>, StoreError>;
    /// The largest id stored for `room` (0 when empty).
    fn last_id(&self, room: &str) -> Result<u64, StoreError>;
    /// The message `user` sent to `room` with `nonce`, if any.
    fn find_nonce(
        &self,
        room: &str,
        user: &str,
        nonce: &str,
    ) -> Result<Option<StoredMessage>, StoreError>;
}

/// History in memory: fast, gone at exit.
#[derive(Debug, Default)]
pub struct MemoryStore {
    rooms: Mutex<HashMap<String, Vec<StoredMessage>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl HistoryStore for MemoryStore {
    fn append(&self, batch: &[StoredMessage]) -> Result<(), StoreError> {
        let mut rooms = self.rooms.lock().expect("memory store lock");
        for message in batch {
            rooms
                .entry(message.room.clone())
                .or_default()
                .push(message.clone());
        }
        Ok(())
    }

    fn range(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rooms = self.rooms.lock().expect("memory store lock");
        let Some(messages) = rooms.get(room) else {
            return Ok(Vec::new());
        };
        let start = messages.partition_point(|m| m.id <= after);
        Ok(messages[start..]
            .iter()
            .take_while(|m| m.id <= upto)
            .take(limit)
            .cloned()
            .collect())
    }

    fn recent(
        &self,
        room: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rooms = self.rooms.lock().expect("memory store lock");
        let Some(messages) = rooms.get(room) else {
            return Ok(Vec::new());
        };
        let end = messages.partition_point(|m| m.id <= upto);
        Ok(messages[end.saturating_sub(limit)..end].to_vec())
    }

    fn last_id(&self, room: &str) -> Result<u64, StoreError> {
        let rooms = self.rooms.lock().expect("memory store lock");
        Ok(rooms.get(room).and_then(|m| m.last()).map_or(0, |m| m.id))
    }

    fn find_nonce(
        &self,
        room: &str,
        user: &str,
        nonce: &str,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let rooms = self.rooms.lock().expect("memory store lock");
        Ok(rooms.get(room).and_then(|messages| {
            messages
                .iter()
                .rev()
                .find(|m| m.from == user && m.nonce.as_deref() == Some(nonce))
                .cloned()
        }))
    }
}

/// History in an SQLite database in write-ahead-log mode.
#[derive(Debug)]
pub struct SqliteStore {
    db: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/history.sqlite3`.
    pub fn open_dir(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        Self::open(&dir.join("history.sqlite3"))
    }

    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        // WAL: readers do not block the writer; NORMAL sync is durable across a process
        // crash (every commit reaches the OS) and fast.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS messages (
                room TEXT NOT NULL,
                id INTEGER NOT NULL,
                sender TEXT NOT NULL,
                text TEXT NOT NULL,
                timestamp TEXT NOT NULL,
                nonce TEXT,
                PRIMARY KEY (room, id)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS messages_nonce ON messages (room, sender, nonce) WHERE nonce IS NOT NULL;",
        )?;
        Ok(Self { db: Mutex::new(db) })
    }

    fn query(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let db = self.db.lock().expect("sqlite lock");
        let mut statement = db.prepare_cached(sql)?;
        let rows = statement.query_map(params, row_to_message)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn row_to_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        room: row.get(0)?,
        id: row.get::<_, i64>(1)? as u64,
        from: row.get(2)?,
        text: row.get(3)?,
        timestamp: row.get(4)?,
        nonce: row.get(5)?,
    })
}

const COLUMNS: &str = "room, id, sender, text, timestamp, nonce";

impl HistoryStore for SqliteStore {
    fn append(&self, batch: &[StoredMessage]) -> Result<(), StoreError> {
        let mut db = self.db.lock().expect("sqlite lock");
        let tx = db.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (room, id, sender, text, timestamp, nonce) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for m in batch {
                insert.execute(params![
                    m.room,
                    m.id as i64,
                    m.from,
                    m.text,
                    m.timestamp,
                    m.nonce
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn range(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.query(
            &format!("SELECT {COLUMNS} FROM messages WHERE room = ?1 AND id > ?2 AND id <= ?3 ORDER BY id LIMIT ?4"),
            params![room, after as i64, upto as i64, limit as i64],
        )
    }

    fn recent(
        &self,
        room: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut messages = self.query(
            &format!("SELECT {COLUMNS} FROM messages WHERE room = ?1 AND id <= ?2 ORDER BY id DESC LIMIT ?3"),
            params![room, upto as i64, limit as i64],
        )?;
        messages.reverse();
        Ok(messages)
    }

    fn last_id(&self, room: &str) -> Result<u64, StoreError> {
        let db = self.db.lock().expect("sqlite lock");
        let id: Option<i64> = db.query_row(
            "SELECT MAX(id) FROM messages WHERE room = ?1",
            params![room],
            |row| row.get(0),
        )?;
        Ok(id.unwrap_or(0) as u64)
    }

    fn find_nonce(
        &self,
        room: &str,
        user: &str,
        nonce: &str,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let db = self.db.lock().expect("sqlite lock");
        let mut statement = db.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM messages WHERE room = ?1 AND sender = ?2 AND nonce = ?3 LIMIT 1"
        ))?;
        Ok(statement
            .query_row(params![room, user, nonce], row_to_message)
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(room: &str, id: u64, nonce: Option<&str>) -> StoredMessage {
        StoredMessage {
            room: room.into(),
            id,
            from: "alice".into(),
            text: format!("message {id}"),
            timestamp: "2026-11-23T10:00:00.000Z".into(),
            nonce: nonce.map(Into::into),
        }
    }

    fn exercise(store: &dyn HistoryStore) {
        assert_eq!(store.last_id("lobby").unwrap(), 0);
        let batch: Vec<_> = (1..=10)
            .map(|id| message("lobby", id, (id == 3).then_some("n-3")))
            .collect();
        store.append(&batch).unwrap();
        store.append(&[message("other", 1, None)]).unwrap();
        assert_eq!(store.last_id("lobby").unwrap(), 10);
        let ids = |v: Vec<StoredMessage>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(ids(store.range("lobby", 4, 8, 100).unwrap()), [5, 6, 7, 8]);
        assert_eq!(ids(store.range("lobby", 4, 10, 2).unwrap()), [5, 6]);
        assert_eq!(ids(store.recent("lobby", 9, 3).unwrap()), [7, 8, 9]);
        assert_eq!(
            ids(store.recent("nowhere", 9, 3).unwrap()),
            Vec::<u64>::new()
        );
        assert_eq!(
            store
                .find_nonce("lobby", "alice", "n-3")
                .unwrap()
                .map(|m| m.id),
            Some(3)
        );
        assert_eq!(store.find_nonce("lobby", "bob", "n-3").unwrap(), None);
        assert_eq!(store.find_nonce("other", "alice", "n-3").unwrap(), None);
    }

    #[test]
    fn memory_store() {
        exercise(&MemoryStore::new());
    }

    #[test]
    fn sqlite_store_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&SqliteStore::open_dir(dir.path()).unwrap());
        let reopened = SqliteStore::open_dir(dir.path()).unwrap();
        assert_eq!(reopened.last_id("lobby").unwrap(), 10);
        // A duplicate id is refused: ids are unique per room.
        assert!(reopened.append(&[message("lobby", 10, None)]).is_err());
    }
}
