//! A token bucket with the clock passed in: `rate` tokens a second, at most `burst`
//! saved up. One type paces everything that is paced: a room connection's events, new
//! connections per address, and a client under the limits a room announces.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`. A rate that is not a positive finite number never refills.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        Self {
            rate: if rate.is_finite() { rate.max(0.0) } else { 0.0 },
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Takes a token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token will be there (bounded to a minute, whatever the rate).
    pub fn ready_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        let wait = if self.rate > 0.0 {
            (missing / self.rate).clamp(0.001, 60.0)
        } else {
            60.0
        };
        self.at + Duration::from_secs_f64(wait)
    }

    /// Whether the bucket would be full at `now` (nothing to remember about it).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 3.0, start);
        assert!((0..3).all(|_| bucket.take(start)));
        assert!(!bucket.take(start));
        assert_eq!(bucket.ready_at(), start + Duration::from_millis(500));
        assert!(!bucket.take(start + Duration::from_millis(400)));
        assert!(bucket.take(start + Duration::from_millis(500)));
        assert!(!bucket.is_full(start + Duration::from_millis(1000)));
        assert!(bucket.is_full(start + Duration::from_millis(2000)));
        // Saved up to the burst, no more.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| bucket.take(later)));
        assert!(!bucket.take(later));
    }

    #[test]
    fn a_time_before_the_last_does_not_refill_or_panic() {
        let start = Instant::now() + Duration::from_secs(1);
        let mut bucket = TokenBucket::new(1.0, 1.0, start);
        assert!(bucket.take(start));
        assert!(!bucket.take(start - Duration::from_millis(900)));
        assert!(!bucket.take(start + Duration::from_millis(500)));
    }

    #[test]
    fn no_rate_never_refills() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(0.0, 1.0, start);
        assert!(bucket.take(start));
        assert!(!bucket.take(start + Duration::from_secs(3600)));
        assert_eq!(bucket.ready_at(), start + Duration::from_secs(3600 + 60));
    }
}
