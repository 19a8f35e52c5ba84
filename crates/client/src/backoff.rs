//! Reconnection delays: exponential growth, capped, with full jitter.

use std::time::Duration;

use rand::Rng;

/// How long to wait before each reconnection attempt.
///
/// Attempt `n` (from 1) waits a random time between zero and
/// `min(max, initial × multiplierⁿ⁻¹)` ("full jitter"): the ceiling grows until it reaches
/// `max`, and clients that lost the same server spread their returns over the whole
/// window instead of arriving together.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Backoff {
    /// Ceiling of the first attempt's delay.
    pub initial: Duration,
    /// Largest delay, however many attempts failed.
    pub max: Duration,
    /// Growth of the ceiling per failed attempt.
    pub multiplier: f64,
    /// Give up after this many failed attempts in a row; `None` retries forever.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            max_attempts: None,
        }
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            ..Self::default()
        }
    }

    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }

    pub fn with_max_attempts(mut self, attempts: Option<u32>) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The largest delay attempt `attempt` (from 1) may wait.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64);
        let factor = self.multiplier.max(1.0).powi(exponent as i32);
        let ceiling = self.initial.as_secs_f64() * factor;
        if ceiling.is_finite() && ceiling < self.max.as_secs_f64() {
            Duration::from_secs_f64(ceiling)
        } else {
            self.max
        }
    }

    /// A delay for attempt `attempt` (from 1): uniform between zero and its ceiling.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        Duration::from_secs_f64(rng.random_range(0.0..=ceiling.as_secs_f64()))
    }

    /// Whether reconnection attempt `attempt` (from 1) may be made.
    pub fn allows(&self, attempt: u32) -> bool {
        self.max_attempts.map_or(true, |max| attempt <= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn ceilings_grow_then_stay_at_the_cap() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings: Vec<u128> = (1..=8).map(|a| backoff.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        // Huge attempt counts neither overflow nor pass the cap.
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn delays_are_jittered_under_a_growing_capped_ceiling() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut rng = StdRng::seed_from_u64(7);
        let mut medians = Vec::new();
        for attempt in 1..=10 {
            let ceiling = backoff.ceiling(attempt);
            let mut delays: Vec<Duration> =
                (0..200).map(|_| backoff.delay(attempt, &mut rng)).collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            delays.sort();
            // Jitter: the delays of one attempt spread over its window, not one value.
            assert!(
                delays[0] < ceiling / 4,
                "attempt {attempt}: {:?}",
                delays[0]
            );
            assert!(
                delays[199] > ceiling * 3 / 4,
                "attempt {attempt}: {:?}",
                delays[199]
            );
            medians.push(delays[100]);
        }
        // The typical delay grows with the attempts, then levels off at the cap.
        assert!(
            medians[0] < medians[2] && medians[2] < medians[4],
            "{medians:?}"
        );
        assert!(medians[9] <= Duration::from_secs(2));
        assert!(medians[9] > Duration::from_millis(600), "{medians:?}");
    }

    #[test]
    fn attempts_are_bounded_when_asked() {
        let backoff = Backoff::default().with_max_attempts(Some(3));
        assert!(backoff.allows(3));
        assert!(!backoff.allows(4));
        assert!(Backoff::default().allows(u32::MAX - 1));
    }
}
