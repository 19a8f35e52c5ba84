//! Hooks: the changes of a channel an application's backend hears of (the Pusher door
//! sends them as webhooks): a channel occupied or vacated, a member added or removed,
//! and what a door adds of its own (a client event).
//!
//! Each change is recorded once, by the node that made it (in a cluster: the node whose
//! presence change Redis counted as the first or last, or the node that reaped a node
//! that stopped), in a queue every node takes from: in memory on a single node, in
//! Redis in a cluster, where a taken hook is leased and goes back to the queue when the
//! node that took it does not say it was sent in time, so a node's death loses none.
//! A removal or a vacancy waits `leave_delay` first; the same member or subscriber
//! back within it cancels both, so a reload does not flap.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    ChannelOccupied,
    ChannelVacated,
    MemberAdded,
    MemberRemoved,
    ClientEvent,
}

impl HookKind {
    /// Its name in a webhook.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChannelOccupied => "channel_occupied",
            Self::ChannelVacated => "channel_vacated",
            Self::MemberAdded => "member_added",
            Self::MemberRemoved => "member_removed",
            Self::ClientEvent => "client_event",
        }
    }

    /// The change a delayed one of these cancels when it comes back in time.
    fn cancels(self) -> Option<Self> {
        match self {
            Self::ChannelOccupied => Some(Self::ChannelVacated),
            Self::MemberAdded => Some(Self::MemberRemoved),
            _ => None,
        }
    }

    fn delayed(self) -> bool {
        matches!(self, Self::ChannelVacated | Self::MemberRemoved)
    }
}

/// One change of a channel.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hook {
    pub kind: HookKind,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// When it happened, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What a door adds (a client event's name, data and socket id), as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Box<RawValue>>,
}

impl Clone for Hook {
    fn clone(&self) -> Self {
        Self {
            kind: self.kind,
            channel: self.channel.clone(),
            user: self.user.clone(),
            time_ms: self.time_ms,
            detail: self.detail.clone(),
        }
    }
}

impl PartialEq for Hook {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.channel == other.channel
            && self.user == other.user
            && self.time_ms == other.time_ms
            && self.detail.as_deref().map(RawValue::get)
                == other.detail.as_deref().map(RawValue::get)
    }
}

/// A hook taken from the queue: say it was sent ([`crate::Engine::hook_sent`]) or it
/// comes back (in a cluster, once its lease runs out).
#[derive(Debug, Clone)]
pub struct Taken {
    pub hook: Hook,
    /// How the queue knows it.
    pub(crate) ticket: String,
}

/// How long a removal or a vacancy of `channel` waits.
pub type LeaveDelay = Arc<dyn Fn(&str) -> Duration + Send + Sync>;

/// Whether hooks are recorded, and how long leaves wait.
#[derive(Clone)]
pub struct HookConfig {
    pub leave_delay: LeaveDelay,
}

impl std::fmt::Debug for HookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookConfig").finish_non_exhaustive()
    }
}

impl HookConfig {
    pub fn new(leave_delay: impl Fn(&str) -> Duration + Send + Sync + 'static) -> Self {
        Self {
            leave_delay: Arc::new(leave_delay),
        }
    }
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Most hooks the queue holds: beyond, new ones are dropped (and counted), so a backend
/// that never answers does not take the memory.
pub(crate) const MAX_QUEUED: usize = 100_000;

/// The single node's queue.
#[derive(Debug)]
pub(crate) struct LocalHooks {
    config: HookConfig,
    state: Mutex<LocalState>,
}

#[derive(Debug, Default)]
struct LocalState {
    ready: VecDeque<Hook>,
    /// Delayed changes by (kind, channel, user), with when they happened.
    pending: HashMap<(HookKind, String, String), Hook>,
}

impl LocalHooks {
    pub(crate) fn new(config: HookConfig) -> Self {
        Self {
            config,
            state: Mutex::default(),
        }
    }

    /// A change of presence or occupancy (`user` empty for occupancy).
    pub(crate) fn changed(&self, kind: HookKind, channel: &str, user: &str) {
        let hook = Hook {
            kind,
            channel: channel.to_owned(),
            user: (!user.is_empty()).then(|| user.to_owned()),
            time_ms: now_ms(),
            detail: None,
        };
        let mut state = self.state.lock().expect("hooks lock");
        if let Some(cancelled) = kind.cancels() {
            let key = (cancelled, channel.to_owned(), user.to_owned());
            if state.pending.remove(&key).is_some() {
                // Back within the delay: neither is told.
                return;
            }
        }
        if kind.delayed() {
            state
                .pending
                .insert((kind, channel.to_owned(), user.to_owned()), hook);
            return;
        }
        push(&mut state.ready, hook);
    }

    pub(crate) fn record(&self, hook: Hook) {
        push(&mut self.state.lock().expect("hooks lock").ready, hook);
    }

    /// Up to `max` hooks due now, oldest first.
    pub(crate) fn take(&self, max: usize) -> Vec<Taken> {
        let now = now_ms();
        let mut state = self.state.lock().expect("hooks lock");
        let due: Vec<(HookKind, String, String)> = state
            .pending
            .iter()
            .filter(|(_, hook)| hook.time_ms + delay_ms(&self.config, &hook.channel) <= now)
            .map(|(key, _)| key.clone())
            .collect();
        let mut promoted: Vec<Hook> = due
            .into_iter()
            .filter_map(|key| state.pending.remove(&key))
            .collect();
        // A vacancy after the removals of the same moment.
        promoted.sort_by_key(|h| (h.time_ms, h.kind == HookKind::ChannelVacated));
        for hook in promoted {
            push(&mut state.ready, hook);
        }
        let count = state.ready.len().min(max);
        state
            .ready
            .drain(..count)
            .map(|hook| Taken {
                hook,
                ticket: String::new(),
            })
            .collect()
    }

    /// Hooks waiting, delayed ones included.
    pub(crate) fn waiting(&self) -> usize {
        let state = self.state.lock().expect("hooks lock");
        state.ready.len() + state.pending.len()
    }
}

fn push(ready: &mut VecDeque<Hook>, hook: Hook) {
    if ready.len() >= MAX_QUEUED {
        metrics::counter!("switchboard_hooks_dropped_total").increment(1);
        return;
    }
    ready.push_back(hook);
}

pub(crate) fn delay_ms(config: &HookConfig, channel: &str) -> u64 {
    (config.leave_delay)(channel).as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(taken: &[Taken]) -> Vec<(HookKind, Option<&str>)> {
        taken
            .iter()
            .map(|t| (t.hook.kind, t.hook.user.as_deref()))
            .collect()
    }

    #[test]
    fn leaves_wait_and_a_return_in_time_cancels_both() {
        let hooks = LocalHooks::new(HookConfig::new(|channel| {
            if channel == "slow" {
                Duration::from_secs(3600)
            } else {
                Duration::ZERO
            }
        }));
        hooks.changed(HookKind::ChannelOccupied, "slow", "");
        hooks.changed(HookKind::MemberAdded, "slow", "ann");
        hooks.changed(HookKind::MemberRemoved, "slow", "ann");
        assert_eq!(
            kinds(&hooks.take(10)),
            [
                (HookKind::ChannelOccupied, None),
                (HookKind::MemberAdded, Some("ann"))
            ]
        );
        assert_eq!(hooks.waiting(), 1, "the removal waits");
        hooks.changed(HookKind::MemberAdded, "slow", "ann");
        assert_eq!(hooks.waiting(), 0, "back in time: neither is told");
        assert!(hooks.take(10).is_empty());
        // No delay here: the removal is due at once.
        hooks.changed(HookKind::MemberRemoved, "fast", "bob");
        hooks.changed(HookKind::ChannelVacated, "fast", "");
        assert_eq!(
            kinds(&hooks.take(1)),
            [(HookKind::MemberRemoved, Some("bob"))]
        );
        assert_eq!(kinds(&hooks.take(10)), [(HookKind::ChannelVacated, None)]);
    }
}
