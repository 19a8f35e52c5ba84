//! History in an SQLite database in write-ahead-log mode.
//!
//! Schema version 2 (`PRAGMA user_version`):
//!
//! - `channels (name, epoch, last_id)`: each channel's position. `last_id` is kept
//!   here, not read off the publications, so ids never go back when history is trimmed.
//! - `publications (channel, id, sender, text, data, event, timestamp, nonce, client,
//!   client_info)`: `sender` is NULL for the server's own publications, `data` the JSON
//!   as sent, `client` and `client_info` the publishing connection's id and token `info`
//!   where its door has them (NULL otherwise).
//!
//! Older databases are migrated in place at open, in one transaction: version 0 (the
//! `messages` table of the rooms-only releases) keeps its messages' ids and each room
//! becomes a channel with a new epoch, kept from then on; version 1 gains the two
//! `client` columns.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::value::RawValue;

use super::{new_epoch, Position, Publication, Store, StoreError, Trim, Window};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    last_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS publications (
    channel TEXT NOT NULL,
    id INTEGER NOT NULL,
    sender TEXT,
    text TEXT,
    data TEXT,
    event TEXT,
    timestamp TEXT NOT NULL,
    nonce TEXT,
    client TEXT,
    client_info TEXT,
    PRIMARY KEY (channel, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS publications_nonce
    ON publications (channel, sender, nonce) WHERE nonce IS NOT NULL;
";

/// Version 0's messages become version 1's publications and channels.
const MIGRATE_FROM_0: &str = "
INSERT INTO publications (channel, id, sender, text, timestamp, nonce)
    SELECT room, id, sender, text, timestamp, nonce FROM messages;
INSERT INTO channels (name, epoch, last_id)
    SELECT room, lower(hex(randomblob(4))), MAX(id) FROM messages GROUP BY room;
DROP TABLE messages;
";

/// History in SQLite.
#[derive(Debug)]
pub struct SqliteStore {
    db: Mutex<Connection>,
}

const COLUMNS: &str =
    "channel, id, sender, text, data, event, timestamp, nonce, client, client_info";

/// Version 1's publications gain the publishing connection's columns.
const MIGRATE_FROM_1: &str = "
ALTER TABLE publications ADD COLUMN client TEXT;
ALTER TABLE publications ADD COLUMN client_info TEXT;
";

impl SqliteStore {
    /// Opens (creating if needed) `dir/history.sqlite3`.
    pub fn open_dir(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        Self::open(&dir.join("history.sqlite3"))
    }

    /// Opens (creating or migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut db = Connection::open(path)?;
        // WAL: readers do not block the writer; NORMAL sync is durable across a process
        // crash (every commit reaches the OS) and fast.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = db.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version < 2 {
            let tx = db.transaction()?;
            let had_publications: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'publications')",
                [],
                |row| row.get(0),
            )?;
            if version == 1 && had_publications {
                tx.execute_batch(MIGRATE_FROM_1)?;
            }
            tx.execute_batch(SCHEMA)?;
            let old: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages')",
                [],
                |row| row.get(0),
            )?;
            if old {
                tx.execute_batch(MIGRATE_FROM_0)?;
            }
            tx.pragma_update(None, "user_version", 2)?;
            tx.commit()?;
        }
        Ok(Self { db: Mutex::new(db) })
    }

    fn query(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Publication>, StoreError> {
        let db = self.db.lock().expect("sqlite lock");
        let mut statement = db.prepare_cached(sql)?;
        let rows = statement.query_map(params, row_to_publication)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn row_to_publication(row: &rusqlite::Row<'_>) -> rusqlite::Result<Publication> {
    let data: Option<String> = row.get(4)?;
    let client_info: Option<String> = row.get(9)?;
    Ok(Publication {
        channel: row.get(0)?,
        id: row.get::<_, i64>(1)? as u64,
        from: row.get(2)?,
        text: row.get(3)?,
        // Stored from a RawValue, so valid JSON.
        data: data.and_then(|json| RawValue::from_string(json).ok()),
        event: row.get(5)?,
        timestamp: row.get(6)?,
        nonce: row.get(7)?,
        client: row.get(8)?,
        // Stored from a RawValue too.
        client_info: client_info.and_then(|json| RawValue::from_string(json).ok()),
    })
}

impl Store for SqliteStore {
    fn position(&self, channel: &str) -> Result<Position, StoreError> {
        let db = self.db.lock().expect("sqlite lock");
        let known = db
            .prepare_cached("SELECT epoch, last_id FROM channels WHERE name = ?1")?
            .query_row(params![channel], |row| {
                Ok(Position {
                    epoch: row.get(0)?,
                    last_id: row.get::<_, i64>(1)? as u64,
                })
            })
            .optional()?;
        if let Some(position) = known {
            return Ok(position);
        }
        let position = Position {
            last_id: 0,
            epoch: new_epoch(),
        };
        db.prepare_cached("INSERT INTO channels (name, epoch, last_id) VALUES (?1, ?2, 0)")?
            .execute(params![channel, position.epoch])?;
        Ok(position)
    }

    fn append(&self, batch: &[&Publication]) -> Result<(), StoreError> {
        let mut db = self.db.lock().expect("sqlite lock");
        let tx = db.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO publications (channel, id, sender, text, data, event, timestamp, nonce, client, client_info)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for m in batch {
                insert.execute(params![
                    m.channel,
                    m.id as i64,
                    m.from,
                    m.text,
                    m.data_json(),
                    m.event,
                    m.timestamp,
                    m.nonce,
                    m.client,
                    m.client_info.as_deref().map(RawValue::get)
                ])?;
            }
            // Each channel's last id, once per batch (a batch holds few channels).
            let mut advance = tx.prepare_cached(
                "INSERT INTO channels (name, epoch, last_id) VALUES (?1, lower(hex(randomblob(4))), ?2)
                 ON CONFLICT (name) DO UPDATE SET last_id = MAX(last_id, excluded.last_id)",
            )?;
            let mut last: Vec<(&str, u64)> = Vec::new();
            for m in batch {
                match last.iter_mut().find(|(channel, _)| *channel == m.channel) {
                    Some(entry) => entry.1 = entry.1.max(m.id),
                    None => last.push((&m.channel, m.id)),
                }
            }
            for (channel, id) in last {
                advance.execute(params![channel, id as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn read(&self, channel: &str, window: &Window) -> Result<Vec<Publication>, StoreError> {
        let order = if window.newest { "DESC" } else { "ASC" };
        let mut publications = self.query(
            &format!(
                "SELECT {COLUMNS} FROM publications
                 WHERE channel = ?1 AND id > ?2 AND id <= ?3 AND timestamp >= ?4
                 ORDER BY id {order} LIMIT ?5"
            ),
            params![
                channel,
                window.after.min(i64::MAX as u64) as i64,
                window.upto.min(i64::MAX as u64) as i64,
                window.not_before.as_deref().unwrap_or(""),
                window.limit.min(i64::MAX as usize) as i64
            ],
        )?;
        if window.newest {
            publications.reverse();
        }
        Ok(publications)
    }

    fn find_nonce(
        &self,
        channel: &str,
        from: Option<&str>,
        nonce: &str,
        not_before: &str,
    ) -> Result<Option<Publication>, StoreError> {
        Ok(self
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM publications
                     WHERE channel = ?1 AND sender IS ?2 AND nonce = ?3 AND timestamp >= ?4
                     ORDER BY id DESC LIMIT 1"
                ),
                params![channel, from, nonce, not_before],
            )?
            .pop())
    }

    fn trim(&self, channel: &str, trim: &Trim) -> Result<(), StoreError> {
        let db = self.db.lock().expect("sqlite lock");
        db.prepare_cached(
            "DELETE FROM publications
             WHERE channel = ?1 AND (id <= ?2 OR timestamp < ?3)
               AND (nonce IS NULL OR timestamp < ?4)",
        )?
        .execute(params![
            channel,
            trim.upto.min(i64::MAX as u64) as i64,
            trim.older_than.as_deref().unwrap_or(""),
            trim.nonces_from
        ])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema the rooms-only releases wrote, exactly.
    const VERSION_0: &str = "CREATE TABLE IF NOT EXISTS messages (
                room TEXT NOT NULL,
                id INTEGER NOT NULL,
                sender TEXT NOT NULL,
                text TEXT NOT NULL,
                timestamp TEXT NOT NULL,
                nonce TEXT,
                PRIMARY KEY (room, id)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS messages_nonce ON messages (room, sender, nonce) WHERE nonce IS NOT NULL;";

    /// Version 1's schema (the channel engine before publications kept their
    /// connection), exactly.
    const VERSION_1: &str = "
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    last_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS publications (
    channel TEXT NOT NULL,
    id INTEGER NOT NULL,
    sender TEXT,
    text TEXT,
    data TEXT,
    event TEXT,
    timestamp TEXT NOT NULL,
    nonce TEXT,
    PRIMARY KEY (channel, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS publications_nonce
    ON publications (channel, sender, nonce) WHERE nonce IS NOT NULL;
";

    #[test]
    fn a_version_1_database_gains_the_connection_columns_and_keeps_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.sqlite3");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(VERSION_1).unwrap();
            db.execute(
                "INSERT INTO channels (name, epoch, last_id) VALUES ('lobby', 'e1', 1)",
                [],
            )
            .unwrap();
            db.execute(
                "INSERT INTO publications (channel, id, sender, text, timestamp) VALUES ('lobby', 1, 'ann', 'old', '2026-12-01T10:00:00.000Z')",
                [],
            )
            .unwrap();
            db.pragma_update(None, "user_version", 1).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let all = Window {
            after: 0,
            upto: 10,
            limit: 10,
            newest: false,
            not_before: None,
        };
        let old = store.read("lobby", &all).unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(
            (old[0].text.as_deref(), old[0].client.as_deref()),
            (Some("old"), None)
        );
        assert_eq!(store.position("lobby").unwrap().epoch, "e1");
        let next = Publication {
            id: 2,
            client: Some("c-17".into()),
            client_info: Some(RawValue::from_string(r#"{"name":"Ann"}"#.into()).unwrap()),
            ..old[0].clone()
        };
        store.append(&[&next]).unwrap();
        drop(store);
        let reopened = SqliteStore::open(&path).unwrap();
        assert_eq!(
            reopened.read("lobby", &all).unwrap(),
            [old[0].clone(), next]
        );
    }

    #[test]
    fn a_database_of_the_previous_version_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.sqlite3");
        {
            let db = Connection::open(&path).unwrap();
            db.pragma_update(None, "journal_mode", "WAL").unwrap();
            db.execute_batch(VERSION_0).unwrap();
            for id in 1..=3i64 {
                db.execute(
                    "INSERT INTO messages (room, id, sender, text, timestamp, nonce) VALUES ('lobby', ?1, 'alice', ?2, '2026-11-23T10:00:00.000Z', ?3)",
                    params![id, format!("old {id}"), (id == 2).then_some("n-2")],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        let position = store.position("lobby").unwrap();
        assert_eq!(position.last_id, 3);
        let all = Window {
            after: 0,
            upto: 10,
            limit: 10,
            newest: false,
            not_before: None,
        };
        let history = store.read("lobby", &all).unwrap();
        assert_eq!(
            history
                .iter()
                .map(|m| (m.id, m.from.as_deref(), m.text.as_deref()))
                .collect::<Vec<_>>(),
            [
                (1, Some("alice"), Some("old 1")),
                (2, Some("alice"), Some("old 2")),
                (3, Some("alice"), Some("old 3"))
            ]
        );
        assert_eq!(
            store
                .find_nonce("lobby", Some("alice"), "n-2", "")
                .unwrap()
                .map(|m| m.id),
            Some(2)
        );
        // New publications continue the ids; the epoch given at migration stays.
        let next = Publication {
            id: 4,
            text: Some("new".into()),
            timestamp: "2026-11-23T10:01:00.000Z".into(),
            nonce: None,
            ..history[0].clone()
        };
        store.append(&[&next]).unwrap();
        drop(store);
        let reopened = SqliteStore::open(&path).unwrap();
        assert_eq!(
            reopened.position("lobby").unwrap(),
            Position {
                last_id: 4,
                epoch: position.epoch
            }
        );
        assert_eq!(reopened.read("lobby", &all).unwrap().len(), 4);
    }
}
