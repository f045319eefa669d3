//! How long to wait before the next attempt: doubling from a first delay up to a ceiling, each delay drawn
//! at random from its upper half, so that devices dropped together (a node restart) do not come back
//! together.

use std::time::Duration;

/// Delays between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Default for Backoff {
    /// 500 ms doubling to 30 s.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    /// Delays from `first`, doubling after each failure, never above `max` (nor below one millisecond).
    pub fn new(first: Duration, max: Duration) -> Self {
        let first = first.max(Duration::from_millis(1));
        Backoff { first, max: max.max(first), failures: 0 }
    }

    /// The ceiling of the delay after `failures` failures in a row (the delay is drawn from its upper half).
    pub fn ceiling(&self, failures: u32) -> Duration {
        self.first.saturating_mul(1 << failures.saturating_sub(1).min(20)).min(self.max)
    }

    /// Counts a failure and returns how long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.ceiling(self.failures);
        ceiling / 2 + ceiling.mul_f64(rand::random::<f64>() / 2.0)
    }

    /// An attempt succeeded: the next failure waits the first delay again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_ceiling_with_jitter_and_reset_on_success() {
        let (first, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut backoff = Backoff::new(first, max);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let delay = backoff.failed();
            let ceiling = backoff.ceiling(backoff.failures());
            assert!(delay >= ceiling / 2 && delay <= ceiling, "{delay:?} within [{:?}, {ceiling:?}]", ceiling / 2);
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failures(), 0);
        assert!(backoff.failed() <= first);
    }

    #[test]
    fn degenerate_settings_still_wait() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(backoff.failed() >= Duration::from_micros(500));
        for _ in 0..100 {
            backoff.failed();
        }
        assert_eq!(backoff.ceiling(backoff.failures()), Duration::from_millis(1));
    }
}
