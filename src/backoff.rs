//! How long to wait: between the attempts of one refresh ([`Backoff`]), after a refresh that
//! failed ([`Cooldown`]), and when to refresh ahead of expiry ([`RefreshAhead`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Exponential backoff with full jitter between the attempts of one refresh, bounded by a
/// number of attempts and a total time that includes the attempt in flight. Terminal failures
/// are never retried.
///
/// Defaults: 4 attempts in all, 200 ms base delay, 5 s maximum delay, 30 s total.
///
/// Named `Backoff` rather than "retry" because it never retries a *request*: that is
/// `tower::retry`'s job, outside the layer.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::Backoff;
///
/// let policy = Backoff::default()
///     .max_attempts(6)
///     .base_delay(Duration::from_millis(50))
///     .max_elapsed(Duration::from_secs(10));
/// # let _ = policy;
/// let no_retries = Backoff::none();
/// # let _ = no_retries;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
    max_elapsed: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

impl Backoff {
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

    /// The whole refresh, attempts in flight included, ends within this time after its first
    /// attempt started: an attempt still running then is cut off as a transient failure.
    /// Zero cuts off every attempt that is not ready at its first poll (a refresher that
    /// answers at once still succeeds; any other refresh fails), as a zero
    /// [`refresh_timeout`](crate::RefreshOptions::refresh_timeout) does: for no retries, use
    /// [`Backoff::none`] or [`max_attempts(1)`](Self::max_attempts).
    #[must_use]
    pub fn max_elapsed(mut self, total: Duration) -> Self {
        self.max_elapsed = total;
        self
    }

    /// The total time bound.
    pub(crate) fn total(&self) -> Duration {
        self.max_elapsed
    }

    /// The ceiling of the delay after `attempt` failed attempts (before jitter).
    fn ceiling(&self, attempt: u32) -> Duration {
        self.base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_delay)
    }

    /// The delay before attempt `attempt + 1`, or `None` to give up. `retry_after` (from the
    /// server) is a floor. `unit` is a number in [0, 1) (the jitter).
    pub(crate) fn delay_with(
        &self,
        attempt: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let jittered = self.ceiling(attempt).mul_f64(unit);
        let delay = retry_after.map_or(jittered, |floor| floor.max(jittered));
        (elapsed.saturating_add(delay) < self.max_elapsed).then_some(delay)
    }

    /// [`delay_with`](Self::delay_with) with a random jitter.
    pub(crate) fn delay(
        &self,
        attempt: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        self.delay_with(attempt, elapsed, retry_after, jitter())
    }
}

/// The longest pause after a failed refresh (one day), whatever a token endpoint's
/// `Retry-After` or the [`Cooldown`] asks for: `Retry-After: 99999999999999999999` is a
/// malformed answer, not a reason to never refresh again (a pause's end must also stay
/// within what the monotonic clock can represent).
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(24 * 60 * 60);

/// The pause after a failed refresh: no new refresh starts before it ends, so a token
/// endpoint that is down gets one attempt per pause instead of one per request.
///
/// During the pause requests keep using a token that is still valid (even inside the expiry
/// leeway); with no valid token they fail fast with
/// [`RefreshFailed`](crate::error::RefreshFailed), which says when the next attempt is
/// allowed; a 401 is returned to the caller, not refreshed. The pause doubles with each
/// failure in a row, from `base` up to `max`, with equal jitter (between half and all of it),
/// and a token endpoint's `Retry-After` extends it. No pause is longer than a day: a longer
/// `Retry-After` (or configured pause) counts as a day.
/// [`TokenHandle::refresh`](crate::TokenHandle::refresh) and installing a token bypass it (a
/// request that needs a token while a forced refresh runs waits for it); a success ends it;
/// [`TokenHandle::invalidate`](crate::TokenHandle::invalidate) does not. A failed background
/// refresh ([`RefreshAhead`]) pauses the next background one by the same rule, and at least
/// 1 s doubling up to 60 s, while requests keep the still-valid token. The first refresh after a pause makes a single attempt (no retries), so an
/// outage costs one token request per pause.
///
/// Default: 30 s, doubling up to 5 min (AWS SDKs pause 5 to 10 minutes; a bearer-token client
/// usually serves a person and should recover sooner).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::Cooldown;
///
/// let cooldown = Cooldown::new(Duration::from_secs(10), Duration::from_secs(120));
/// # let _ = cooldown;
/// let never = Cooldown::none(); // every request may start a refresh (not recommended)
/// # let _ = never;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    base: Duration,
    max: Duration,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self::new(Duration::from_secs(30), Duration::from_secs(300))
    }
}

impl Cooldown {
    /// A pause of `base` after the first failure, doubling up to `max` (a `max` below
    /// `base` is taken as `base`: a fixed pause).
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
        }
    }

    /// No pause: a failed refresh is tried again by the next request.
    pub fn none() -> Self {
        Self::new(Duration::ZERO, Duration::ZERO)
    }

    /// The pause after `failures` failures in a row, `unit` in [0, 1) being the jitter.
    pub(crate) fn delay_with(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.max);
        let half = ceiling / 2;
        let pause = half.saturating_add((ceiling - half).mul_f64(unit));
        match retry_after {
            Some(floor) if !ceiling.is_zero() => pause.max(floor),
            _ => pause,
        }
        .min(MAX_PAUSE)
    }

    /// The pause after `failures` failures in a row.
    pub(crate) fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        self.delay_with(failures, retry_after, jitter())
    }

    /// The pause before the next background refresh after `failures` failed ones: this
    /// cool-down's pause, and at least 1 s doubling up to 60 s (so that no cool-down, or a
    /// short one, does not make every request in the window start one). `retry_after` (from
    /// the token endpoint) is a floor; the pause never exceeds [`MAX_PAUSE`]. It is not
    /// bounded by the token's deadline: during it requests keep the still-valid token, even
    /// inside the leeway; once it ends inside the leeway a foreground refresh takes over, and
    /// if it runs past the deadline the first request after the deadline starts one.
    pub(crate) fn background(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        self.background_with(failures, retry_after, jitter())
    }

    /// [`background`](Self::background) with the jitter `unit` in [0, 1).
    pub(crate) fn background_with(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Duration {
        Duration::from_secs(1)
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(Duration::from_secs(60))
            .max(self.delay_with(failures, None, unit))
            .max(retry_after.unwrap_or_default())
            .min(MAX_PAUSE)
    }
}

/// When to refresh in the background before a token expires, while requests keep using it.
///
/// The window is measured back from the expiry and is always capped at half the token's
/// lifetime (a token is never refreshed in the first half of its life), and never shorter
/// than the leeway.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::RefreshAhead;
///
/// let fixed = RefreshAhead::fixed(Duration::from_secs(300));
/// // AWS's table: 5 min for lifetimes up to 20 min, 15 min up to 90 min, 60 min above.
/// let by_lifetime = RefreshAhead::aws();
/// // Or any rule of the lifetime:
/// let custom = RefreshAhead::by_lifetime(|life| life / 4);
/// assert_eq!(by_lifetime.window(Duration::from_secs(3600)), Duration::from_secs(900));
/// # let _ = (fixed, custom);
/// ```
#[derive(Clone)]
pub struct RefreshAhead {
    rule: Rule,
}

#[derive(Clone)]
enum Rule {
    Fixed(Duration),
    Aws,
    Custom(Arc<dyn Fn(Duration) -> Duration + Send + Sync>),
}

impl fmt::Debug for RefreshAhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Rule::Fixed(d) => f.debug_tuple("RefreshAhead::Fixed").field(d).finish(),
            Rule::Aws => f.write_str("RefreshAhead::Aws"),
            Rule::Custom(_) => f.write_str("RefreshAhead::ByLifetime(..)"),
        }
    }
}

impl RefreshAhead {
    /// The same window for every token.
    pub fn fixed(window: Duration) -> Self {
        Self {
            rule: Rule::Fixed(window),
        }
    }

    /// The window AWS SDKs use: 5 min for lifetimes up to 20 min, 15 min up to 90 min, 60 min
    /// above (then capped at half the lifetime).
    pub fn aws() -> Self {
        Self { rule: Rule::Aws }
    }

    /// A window computed from the token's lifetime.
    pub fn by_lifetime(rule: impl Fn(Duration) -> Duration + Send + Sync + 'static) -> Self {
        Self {
            rule: Rule::Custom(Arc::new(rule)),
        }
    }

    /// The window for a token of this lifetime, before the cap at half the lifetime.
    pub fn window(&self, lifetime: Duration) -> Duration {
        const MIN: u64 = 60;
        match &self.rule {
            Rule::Fixed(window) => *window,
            Rule::Aws if lifetime <= Duration::from_secs(20 * MIN) => Duration::from_secs(5 * MIN),
            Rule::Aws if lifetime <= Duration::from_secs(90 * MIN) => Duration::from_secs(15 * MIN),
            Rule::Aws => Duration::from_secs(60 * MIN),
            Rule::Custom(rule) => rule(lifetime),
        }
    }
}

impl From<Duration> for RefreshAhead {
    fn from(window: Duration) -> Self {
        Self::fixed(window)
    }
}

/// A number in [0, 1) from a per-thread xorshift generator; good enough for jitter.
pub(crate) fn jitter() -> f64 {
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
        let p = Backoff::default();
        for attempt in 1..4 {
            let d = p.delay(attempt, Duration::ZERO, None).unwrap();
            assert!(d <= Duration::from_millis(200) * (1 << (attempt - 1)));
        }
        assert!(p.delay(4, Duration::ZERO, None).is_none());
        assert!(p.delay(1, Duration::from_secs(31), None).is_none());
        let floor = Duration::from_secs(2);
        assert!(p.delay(1, Duration::ZERO, Some(floor)).unwrap() >= floor);
        assert!(Backoff::none().delay(1, Duration::ZERO, None).is_none());
    }

    /// Fails if the jitter is gone (every delay equal) or a delay exceeds its ceiling.
    #[test]
    fn retry_delays_are_jittered_and_never_above_the_ceiling() {
        let p = Backoff::default()
            .max_attempts(30)
            .max_delay(Duration::from_secs(5))
            .max_elapsed(Duration::from_secs(3600));
        for attempt in 1..20 {
            let ceiling = p.ceiling(attempt);
            let delays: Vec<_> = (0..200)
                .map(|_| p.delay(attempt, Duration::ZERO, None).unwrap())
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            assert!(ceiling <= Duration::from_secs(5));
            let distinct: std::collections::HashSet<_> = delays.iter().collect();
            assert!(distinct.len() > 100, "attempt {attempt}: jitter missing");
        }
        // The extremes of the jitter map onto [0, ceiling).
        assert_eq!(
            p.delay_with(3, Duration::ZERO, None, 0.0),
            Some(Duration::ZERO)
        );
        assert!(p.delay_with(3, Duration::ZERO, None, 0.999_999).unwrap() < p.ceiling(3));
    }

    #[test]
    fn cooldown_is_jittered_between_half_and_all_of_its_ceiling_and_honours_retry_after() {
        let c = Cooldown::new(Duration::from_secs(30), Duration::from_secs(300));
        for failures in 1..12 {
            let ceiling = Duration::from_secs(30 * (1 << (failures - 1).min(20)))
                .min(Duration::from_secs(300));
            let pauses: Vec<_> = (0..200).map(|_| c.delay(failures, None)).collect();
            assert!(pauses.iter().all(|p| *p >= ceiling / 2 && *p <= ceiling));
            let distinct: std::collections::HashSet<_> = pauses.iter().collect();
            assert!(distinct.len() > 100, "jitter missing");
        }
        assert!(c.delay(1, Some(Duration::from_secs(900))) >= Duration::from_secs(900));
        // An absurd Retry-After, or an absurd configuration, is capped.
        assert_eq!(c.delay(1, Some(Duration::MAX)), MAX_PAUSE);
        assert_eq!(c.background(1, Some(Duration::MAX)), MAX_PAUSE);
        assert!(Cooldown::new(Duration::MAX, Duration::MAX).delay(3, None) <= MAX_PAUSE);
        assert_eq!(
            Cooldown::none().delay(5, Some(Duration::from_secs(9))),
            Duration::ZERO
        );
    }

    /// Review item (this session): a failed background refresh pauses the next one by the
    /// configured cool-down too. It paused 1 s doubling up to 60 s whatever the cool-down, so
    /// an outage inside a long refresh-ahead window cost a token request a minute even with a
    /// ten-minute cool-down.
    #[test]
    fn a_background_pause_is_the_cool_down_and_at_least_the_short_schedule() {
        let long = Cooldown::new(Duration::from_secs(600), Duration::from_secs(600));
        for failures in 1..10 {
            let pause = long.background_with(failures, None, 0.0);
            assert_eq!(pause, Duration::from_secs(300), "failures {failures}");
            assert!(long.background(failures, None) >= Duration::from_secs(300));
        }
        // No cool-down, or a short one: the short schedule is the floor.
        let none = Cooldown::none();
        assert_eq!(none.background_with(1, None, 0.5), Duration::from_secs(1));
        assert_eq!(none.background_with(3, None, 0.5), Duration::from_secs(4));
        assert_eq!(none.background_with(9, None, 0.5), Duration::from_secs(60));
        // Retry-After stays a floor.
        assert_eq!(
            none.background_with(1, Some(Duration::from_secs(90)), 0.5),
            Duration::from_secs(90)
        );
    }

    #[test]
    fn refresh_ahead_windows_follow_the_lifetime() {
        let aws = RefreshAhead::aws();
        assert_eq!(
            aws.window(Duration::from_secs(15 * 60)),
            Duration::from_secs(300)
        );
        assert_eq!(
            aws.window(Duration::from_secs(60 * 60)),
            Duration::from_secs(900)
        );
        assert_eq!(
            aws.window(Duration::from_secs(12 * 3600)),
            Duration::from_secs(3600)
        );
        let quarter = RefreshAhead::by_lifetime(|life| life / 4);
        assert_eq!(
            quarter.window(Duration::from_secs(400)),
            Duration::from_secs(100)
        );
    }
}
