//! Limits per client IP address: how many connections it holds open, and how fast it
//! opens new ones (a [`TokenBucket`]). Checked at accept, before any byte is read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_net::bucket::TokenBucket;

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The address already holds its share of open connections.
    TooManyOpen,
    /// The address opened connections faster than its rate allows.
    TooFast,
}

impl Refusal {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::TooManyOpen => "too many open connections from your address\n",
            Self::TooFast => "too many new connections from your address; slow down\n",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::TooManyOpen => "per_ip_connections",
            Self::TooFast => "per_ip_rate",
        }
    }
}

#[derive(Debug)]
struct Entry {
    open: usize,
    handshakes: TokenBucket,
}

/// Every address seen lately and what it holds.
#[derive(Debug)]
pub(crate) struct PerIp {
    max_open: usize,
    per_sec: f64,
    burst: f64,
    entries: Mutex<(HashMap<IpAddr, Entry>, Instant)>,
}

/// Held for as long as a connection is open; gives its place back on drop.
#[derive(Debug)]
pub(crate) struct IpSlot {
    limits: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut guard = self.limits.entries.lock().expect("not poisoned");
        if let Some(entry) = guard.0.get_mut(&self.ip) {
            entry.open = entry.open.saturating_sub(1);
        }
    }
}

/// How often addresses with nothing open and a full bucket are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Addresses tracked beyond which they are swept at once.
const SWEEP_AT: usize = 100_000;

/// Whom a limit applies to: an IPv4 address (IPv4-mapped IPv6 included), or an IPv6
/// client's /64 (a host is given a whole /64, so single addresses are free to it).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl PerIp {
    /// `None` when both limits are off.
    pub(crate) fn new(max_open: usize, per_sec: f64, burst: u32) -> Option<Arc<Self>> {
        let rate_on = per_sec > 0.0;
        (max_open > 0 || rate_on).then(|| {
            Arc::new(Self {
                max_open,
                per_sec: if rate_on { per_sec } else { 0.0 },
                burst: f64::from(burst.max(1)),
                entries: Mutex::new((HashMap::new(), Instant::now())),
            })
        })
    }

    /// Admits a new connection from `ip` at `now`, or says why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<IpSlot, Refusal> {
        let ip = client_key(ip);
        let mut guard = self.entries.lock().expect("not poisoned");
        let (entries, swept) = &mut *guard;
        if now.duration_since(*swept) > FORGET_AFTER || entries.len() >= SWEEP_AT {
            *swept = now;
            // An address is kept while it holds connections or its bucket is refilling.
            let rate_on = self.per_sec > 0.0;
            entries
                .retain(|_, entry| entry.open > 0 || (rate_on && !entry.handshakes.is_full(now)));
        }
        let entry = entries.entry(ip).or_insert_with(|| Entry {
            open: 0,
            handshakes: TokenBucket::new(self.per_sec, self.burst, now),
        });
        if self.max_open > 0 && entry.open >= self.max_open {
            return Err(Refusal::TooManyOpen);
        }
        if self.per_sec > 0.0 && !entry.handshakes.take(now) {
            return Err(Refusal::TooFast);
        }
        entry.open += 1;
        Ok(IpSlot {
            limits: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        let guard = self.entries.lock().expect("not poisoned");
        guard.0.get(&client_key(ip)).map_or(0, |entry| entry.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn open_connections_are_capped_per_address_and_given_back() {
        let limits = PerIp::new(2, 0.0, 0).unwrap();
        let first = limits.admit(A, now()).unwrap();
        let _second = limits.admit(A, now()).unwrap();
        assert_eq!(limits.admit(A, now()).unwrap_err(), Refusal::TooManyOpen);
        // Another address has its own share.
        let _other = limits.admit(B, now()).unwrap();
        drop(first);
        assert_eq!(limits.open(A), 1);
        assert!(limits.admit(A, now()).is_ok());
    }

    #[test]
    fn a_burst_is_allowed_then_the_rate_holds() {
        let limits = PerIp::new(0, 1.0, 3).unwrap();
        let start = now();
        for _ in 0..3 {
            drop(limits.admit(A, start).unwrap());
        }
        assert_eq!(limits.admit(A, start).unwrap_err(), Refusal::TooFast);
        assert!(limits.admit(B, start).is_ok());
        let later = start + Duration::from_millis(1100);
        assert!(limits.admit(A, later).is_ok());
        assert_eq!(limits.admit(A, later).unwrap_err(), Refusal::TooFast);
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_its_address() {
        let limits = PerIp::new(1, 0.0, 0).unwrap();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _held = limits.admit(one, now()).unwrap();
        assert_eq!(
            limits.admit(same_64, now()).unwrap_err(),
            Refusal::TooManyOpen
        );
        assert!(limits.admit(other_64, now()).is_ok());
        let _v4 = limits.admit(A, now()).unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            limits.admit(mapped, now()).unwrap_err(),
            Refusal::TooManyOpen
        );
    }

    #[test]
    fn no_limits_means_no_tracking() {
        assert!(PerIp::new(0, 0.0, 10).is_none());
    }
}
