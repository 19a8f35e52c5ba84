//! History in memory: fast, gone at exit (and with it every epoch).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::{in_time, new_epoch, Position, Publication, Store, StoreError, Trim, Window};

#[derive(Debug)]
struct Log {
    position: Position,
    publications: VecDeque<Publication>,
}

impl Log {
    fn new() -> Self {
        Self {
            position: Position {
                last_id: 0,
                epoch: new_epoch(),
            },
            publications: VecDeque::new(),
        }
    }
}

/// History in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    channels: Mutex<HashMap<String, Log>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, run: impl FnOnce(&mut HashMap<String, Log>) -> T) -> T {
        run(&mut self.channels.lock().expect("memory store lock"))
    }
}

impl Store for MemoryStore {
    fn position(&self, channel: &str) -> Result<Position, StoreError> {
        Ok(self.with(|channels| {
            channels
                .entry(channel.to_owned())
                .or_insert_with(Log::new)
                .position
                .clone()
        }))
    }

    fn append(&self, batch: &[&Publication]) -> Result<(), StoreError> {
        self.with(|channels| {
            for publication in batch {
                let log = channels
                    .entry(publication.channel.clone())
                    .or_insert_with(Log::new);
                log.position.last_id = log.position.last_id.max(publication.id);
                log.publications.push_back((*publication).clone());
            }
        });
        Ok(())
    }

    fn read(&self, channel: &str, window: &Window) -> Result<Vec<Publication>, StoreError> {
        Ok(self.with(|channels| {
            let Some(log) = channels.get(channel) else {
                return Vec::new();
            };
            let all = &log.publications;
            let start = all.partition_point(|m| m.id <= window.after);
            let end = all.partition_point(|m| m.id <= window.upto).max(start);
            let kept = all
                .range(start..end)
                .filter(|m| in_time(m, window.not_before.as_deref()));
            if window.newest {
                let mut newest: Vec<Publication> = kept.rev().take(window.limit).cloned().collect();
                newest.reverse();
                newest
            } else {
                kept.take(window.limit).cloned().collect()
            }
        }))
    }

    fn find_nonce(
        &self,
        channel: &str,
        from: Option<&str>,
        nonce: &str,
        not_before: &str,
    ) -> Result<Option<Publication>, StoreError> {
        Ok(self.with(|channels| {
            channels.get(channel).and_then(|log| {
                log.publications
                    .iter()
                    .rev()
                    .find(|m| {
                        m.from.as_deref() == from
                            && m.nonce.as_deref() == Some(nonce)
                            && m.timestamp.as_str() >= not_before
                    })
                    .cloned()
            })
        }))
    }

    fn trim(&self, channel: &str, trim: &Trim) -> Result<(), StoreError> {
        self.with(|channels| {
            if let Some(log) = channels.get_mut(channel) {
                log.publications.retain(|m| {
                    let outside = m.id <= trim.upto || !in_time(m, trim.older_than.as_deref());
                    let remembered = m.nonce.is_some() && m.timestamp >= trim.nonces_from;
                    !outside || remembered
                });
            }
        });
        Ok(())
    }
}
