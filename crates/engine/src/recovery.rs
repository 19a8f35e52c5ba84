//! What a subscriber is replayed, and whether that is everything it missed.
//!
//! Without `since`, the newest publications (`recent_on_join`, or only the latest with
//! `recover = "latest"`). With `since` and a different `epoch`, the same newest ones and
//! `recovered: false`: the ids the subscriber holds belong to a stream that is gone. With
//! `since` in the same epoch (or no epoch given, which skips the check), whatever the
//! channel still keeps after it; the resume is complete only when that starts right
//! after `since`, since trimming by size or age can have removed what came first.

use crate::engine::{Clock, Resume};
use crate::options::{ChannelOptions, Recover};

/// The history a subscriber is sent before live events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// The newest publications, at most this many.
    Newest(usize),
    /// Every publication kept after this id (up to the join), page by page.
    After(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) replay: Replay,
    /// `None` without `since`; `Some(false)` when the resume cannot be complete;
    /// `Some(true)` until the first page read says otherwise (see [`complete`]).
    pub(crate) recovered: Option<bool>,
}

/// The replay for `resume` into a channel at `upto` in `epoch`.
pub(crate) fn plan(
    resume: &Resume,
    epoch: &str,
    upto: u64,
    options: &ChannelOptions,
    recent_on_join: usize,
) -> Plan {
    let newest = Replay::Newest(match options.recover {
        Recover::Latest => 1,
        Recover::Stream => resume.recent.unwrap_or(recent_on_join),
    });
    match resume.since {
        None => Plan {
            replay: newest,
            recovered: None,
        },
        Some(_) if resume.epoch.as_deref().is_some_and(|e| e != epoch) => Plan {
            replay: newest,
            recovered: Some(false),
        },
        // Ahead of the channel: a position in some other stream. What is new from
        // here on follows, never a silent skip.
        Some(since) if since > upto => Plan {
            replay: Replay::After(upto),
            recovered: Some(false),
        },
        Some(since) => Plan {
            replay: Replay::After(since),
            recovered: Some(true),
        },
    }
}

/// What a channel still keeps, by its options: ids above `after`, published at or
/// after `since` (when it keeps by age).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kept {
    pub(crate) after: u64,
    pub(crate) since: Option<String>,
}

/// What a channel whose last id is `upto` keeps now.
pub(crate) fn kept(upto: u64, options: &ChannelOptions, clock: &Clock) -> Kept {
    Kept {
        after: kept_after(upto, options),
        since: options.history_ttl().map(|ttl| clock.timestamp_before(ttl)),
    }
}

/// Ids up to this are beyond the channel's `history_size` when its last id is `upto`.
fn kept_after(upto: u64, options: &ChannelOptions) -> u64 {
    options
        .history_size
        .map_or(0, |size| upto.saturating_sub(size as u64))
}

/// Whether a resume after `since` (up to `upto`) whose first page holds `ids` misses
/// nothing: the page starts right after `since` and has no hole (trimming by age can
/// take one out of the middle: timestamps are not quite in id order).
pub(crate) fn complete(since: u64, upto: u64, ids: &[u64]) -> bool {
    match ids.first() {
        Some(_) => continues(since, ids),
        None => since >= upto,
    }
}

/// Whether a page of `ids` read after `after` follows it without a hole.
pub(crate) fn continues(after: u64, ids: &[u64]) -> bool {
    ids.iter()
        .zip(after + 1..)
        .all(|(id, expected)| *id == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(since: Option<u64>, epoch: Option<&str>) -> Resume {
        Resume {
            since,
            epoch: epoch.map(Into::into),
            ..Resume::default()
        }
    }

    #[test]
    fn without_since_the_newest_come_and_recovered_is_absent() {
        let stream = ChannelOptions::default();
        let latest = ChannelOptions {
            recover: Recover::Latest,
            ..ChannelOptions::default()
        };
        assert_eq!(
            plan(&resume(None, None), "e", 10, &stream, 50),
            Plan {
                replay: Replay::Newest(50),
                recovered: None
            }
        );
        assert_eq!(
            plan(&resume(None, Some("e")), "e", 10, &latest, 50).replay,
            Replay::Newest(1)
        );
    }

    #[test]
    fn another_epoch_is_never_a_silent_gap() {
        let options = ChannelOptions::default();
        assert_eq!(
            plan(&resume(Some(5), Some("old")), "new", 10, &options, 50),
            Plan {
                replay: Replay::Newest(50),
                recovered: Some(false)
            }
        );
        // No epoch given: the check is skipped (clients from before epochs).
        assert_eq!(
            plan(&resume(Some(5), None), "new", 10, &options, 50),
            Plan {
                replay: Replay::After(5),
                recovered: Some(true)
            }
        );
        // Ahead of the channel: not recovered, and nothing skipped from here on.
        assert_eq!(
            plan(&resume(Some(500), None), "e", 10, &options, 50),
            Plan {
                replay: Replay::After(10),
                recovered: Some(false)
            }
        );
    }

    #[test]
    fn a_resume_is_complete_only_from_right_after_since_and_without_a_hole() {
        assert!(complete(5, 10, &[6, 7, 8]));
        assert!(!complete(5, 10, &[8, 9]), "6 and 7 were trimmed");
        assert!(!complete(5, 10, &[6, 8]), "7 expired before 6");
        assert!(complete(10, 10, &[]), "nothing was missed");
        assert!(!complete(5, 10, &[]), "everything after 5 expired");
        assert!(continues(7, &[8, 9]));
        assert!(continues(7, &[]));
        assert!(!continues(7, &[9]));
    }

    #[test]
    fn history_size_bounds_what_is_kept() {
        let sized = |size| ChannelOptions {
            history_size: size,
            ..ChannelOptions::default()
        };
        assert_eq!(kept_after(100, &sized(None)), 0);
        assert_eq!(kept_after(100, &sized(Some(30))), 70);
        assert_eq!(kept_after(10, &sized(Some(30))), 0);
        assert_eq!(kept_after(100, &sized(Some(0))), 100);
    }
}
