//! The monotonic clock the layer measures token lifetimes with.

use std::fmt;
use std::time::SystemTime;

use tokio::time::Instant;

/// A monotonic clock. The default, [`TokioClock`], follows Tokio's clock, so tests that pause
/// time (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) move token expiry
/// without sleeping. A backward jump of the wall clock cannot revive a token; a forward jump
/// larger than a token's time left expires it early (see [`wall`](Clock::wall)).
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use tokio::time::Instant;
/// use tower_auth_refresh::Clock;
///
/// /// A clock that runs one hour ahead, to see how the layer copes with expiry.
/// #[derive(Debug)]
/// struct Ahead;
///
/// impl Clock for Ahead {
///     fn now(&self) -> Instant {
///         Instant::now() + std::time::Duration::from_secs(3600)
///     }
/// }
/// let clock: Arc<dyn Clock> = Arc::new(Ahead);
/// # let _ = clock;
/// ```
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;

    /// The current wall-clock time. The layer checks token deadlines against it too, so a
    /// machine that slept through a token's expiry (the monotonic clock stops during suspend
    /// on Linux and macOS) does not send it (except, possibly, in the first 50 ms after waking,
    /// before the wall clock is read again; that 401 is recovered as any other); a forward
    /// step of the wall clock larger than a token's time left expires it the same way (one
    /// refresh more than needed). Requests read it at most once per 50 ms of
    /// [`now`](Self::now). Defaults to [`SystemTime::now`].
    ///
    /// Only the hard deadline is checked on the wall clock: the expiry leeway and the
    /// refresh-ahead window are measured on [`now`](Self::now) alone. After a suspend that
    /// ended shortly before a token's expiry, the token is still sent (no refresh first, none
    /// in the background) until its deadline passes on the wall clock; then requests wait for
    /// a refresh.
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Tokio's clock ([`tokio::time::Instant::now`]), which honours paused time in tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}
