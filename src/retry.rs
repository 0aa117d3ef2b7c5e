//! How transient refresh failures are retried.

use std::time::Duration;

/// Exponential backoff with full jitter for transient refresh failures, bounded by a number
/// of attempts and a total time. Terminal failures are never retried.
///
/// Defaults: 4 attempts in all, 200 ms base delay, 5 s maximum delay, 30 s total.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .max_attempts(6)
///     .base_delay(Duration::from_millis(50))
///     .max_elapsed(Duration::from_secs(10));
/// # let _ = policy;
/// let no_retries = RetryPolicy::none();
/// # let _ = no_retries;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
    max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Attempts in all, the first included (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The delay ceiling of the first retry; it doubles with every retry.
    #[must_use]
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// The largest delay between two attempts.
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// No retry starts after this much time since the first attempt.
    #[must_use]
    pub fn max_elapsed(mut self, total: Duration) -> Self {
        self.max_elapsed = total;
        self
    }

    /// The delay before attempt `attempt + 1`, or `None` to give up. `retry_after` (from the
    /// server) is a floor.
    pub(crate) fn delay(
        &self,
        attempt: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << (attempt - 1).min(20))
            .min(self.max_delay);
        let jittered = ceiling.mul_f64(jitter());
        let delay = retry_after.map_or(jittered, |floor| floor.max(jittered));
        (elapsed.saturating_add(delay) <= self.max_elapsed).then_some(delay)
    }

    /// The pause before the next background (refresh-ahead) attempt after `failures` failures.
    pub(crate) fn background_backoff(&self, failures: u32) -> Duration {
        let base = self.base_delay.max(Duration::from_secs(1));
        base.saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(Duration::from_secs(60))
    }
}

/// A number in [0, 1) from a per-thread xorshift generator; good enough for jitter.
fn jitter() -> f64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, RandomState};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u64) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_stop() {
        let p = RetryPolicy::default();
        for attempt in 1..4 {
            let d = p.delay(attempt, Duration::ZERO, None).unwrap();
            assert!(d <= Duration::from_millis(200) * (1 << (attempt - 1)));
        }
        assert!(p.delay(4, Duration::ZERO, None).is_none());
        assert!(p.delay(1, Duration::from_secs(31), None).is_none());
        let floor = Duration::from_secs(2);
        assert!(p.delay(1, Duration::ZERO, Some(floor)).unwrap() >= floor);
        assert!(RetryPolicy::none().delay(1, Duration::ZERO, None).is_none());
    }
}
