//! One refresh: the refresher call with its timeout, its retries, and the runtime seam.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use crate::backoff::{Backoff, Cooldown};
use crate::clock::Clock;
use crate::refresher::{RefreshContext, RefreshError, TokenRefresher};
use crate::token::Token;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

tokio::task_local! {
    /// Set while a refresher runs, so that a request the refresher sends through a client
    /// wearing this same layer passes through instead of waiting on its own refresh.
    static IN_REFRESH: ();
}

/// True when called from inside a refresher's future.
pub(crate) fn in_refresh() -> bool {
    IN_REFRESH.try_with(|_| ()).is_ok()
}

/// Runs `fut` to its end on a task of its own (on the current Tokio runtime; inline without
/// one) and waits for it: a caller that stops waiting (its refresh timeout ran out) does not
/// cut it off. For a refresher whose work, once started, must finish: a token call that
/// rotated the refresh token, and the write of its result.
///
/// The task keeps the caller's span and, when the caller is a refresher, the mark that it is
/// one ([`in_refresh`]); a panic in it is the caller's.
#[cfg(any(feature = "store", feature = "oauth2"))]
pub(crate) async fn run_to_end<T, F>(fut: F) -> Result<T, RefreshError>
where
    F: Future<Output = Result<T, RefreshError>> + Send + 'static,
    T: Send + 'static,
{
    use tracing::Instrument;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return fut.await;
    };
    let fut = fut.in_current_span();
    let task = if in_refresh() {
        runtime.spawn(IN_REFRESH.scope((), fut))
    } else {
        runtime.spawn(fut)
    };
    match task.await {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Err(RefreshError::transient(
            "the refresh was cancelled: its runtime shut down",
        )),
    }
}

/// A refresher behind a pointer: one boxed future per refresh, never per request.
pub(crate) trait ErasedRefresher: Send + Sync + 'static {
    fn refresh(&self, ctx: RefreshContext) -> BoxFuture<Result<Token, RefreshError>>;
    fn logout(&self);
}

impl<R: TokenRefresher> ErasedRefresher for R {
    fn refresh(&self, ctx: RefreshContext) -> BoxFuture<Result<Token, RefreshError>> {
        Box::pin(TokenRefresher::refresh(self, ctx))
    }

    fn logout(&self) {
        TokenRefresher::logout(self);
    }
}

/// What one refresh needs to know, copied from the options of the request that started it.
#[derive(Clone)]
pub(crate) struct FlightSettings {
    pub(crate) retries: Backoff,
    pub(crate) cooldown: Cooldown,
    pub(crate) timeout: Duration,
    pub(crate) clock: Arc<dyn Clock>,
}

/// Whether a Tokio runtime (and so a timer) is there.
pub(crate) fn has_runtime() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

/// A refresh on a Tokio runtime without its time driver: it cannot be bounded, so it is not
/// started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoTimer;

impl std::fmt::Display for NoTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the Tokio runtime has no timer, which bounds the token refresh: build it with \
             `enable_time` or `enable_all`",
        )
    }
}

impl std::error::Error for NoTimer {}

/// Calls the refresher until it succeeds, fails terminally, or the backoff gives up. Each
/// attempt is cut off at the refresh timeout and at the backoff's total bound, whichever
/// comes first (with a runtime; without one there is no timer). `single`: whether to stop at
/// the failed attempt (a background refresh nobody waits for, and the first refresh after a
/// failed one); asked after each failure, as a caller may join a background refresh and
/// make it a foreground one meanwhile. `superseded`: whether
/// the handle installed or cleared a token since the round started; a retry is not made
/// then: its answer would be discarded, and the refresher would be asked, after a logout,
/// to refresh the session that ended.
pub(crate) async fn attempt_all(
    refresher: &dyn ErasedRefresher,
    ctx: RefreshContext,
    settings: &FlightSettings,
    single: &(dyn Fn() -> bool + Send + Sync),
    superseded: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Token, RefreshError> {
    if has_runtime() && !crate::head::timer_here() {
        return Err(RefreshError::transient(NoTimer));
    }
    let started = settings.clock.now();
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let elapsed = settings.clock.now().saturating_duration_since(started);
        let budget = settings
            .timeout
            .min(settings.retries.total().saturating_sub(elapsed));
        let err = match one_attempt(refresher, ctx.clone(), budget).await {
            Ok(token) => return Ok(token),
            Err(err) => err,
        };
        if err.is_terminal() || single() || !has_runtime() {
            // No timer outside a Tokio runtime: report the failure itself.
            return Err(err);
        }
        let elapsed = settings.clock.now().saturating_duration_since(started);
        let Some(delay) = settings.retries.delay(attempt, elapsed, err.retry_after()) else {
            return Err(err);
        };
        tracing::debug!(attempt, delay_ms = delay.as_millis() as u64, error = %err, "transient token refresh failure; retrying");
        tokio::time::sleep(delay).await;
        if superseded() {
            tracing::debug!(
                attempt,
                "a token was installed or cleared during the backoff; not retrying"
            );
            return Err(err);
        }
    }
}

/// One refresher call: panics caught, time bounded.
async fn one_attempt(
    refresher: &dyn ErasedRefresher,
    ctx: RefreshContext,
    budget: Duration,
) -> Result<Token, RefreshError> {
    // The refresher is called inside the caught future: a panic while building its future
    // is caught too.
    let call = AssertUnwindSafe(IN_REFRESH.scope((), async move { refresher.refresh(ctx).await }))
        .catch_unwind();
    let result = if has_runtime() {
        match tokio::time::timeout(budget, call).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    timeout_ms = budget.as_millis() as u64,
                    "token refresh timed out"
                );
                return Err(RefreshError::transient(RefreshTimedOut(budget)));
            }
        }
    } else {
        call.await
    };
    result.unwrap_or_else(|_| Err(RefreshError::transient("the token refresher panicked")))
}

/// A refresher call that did not finish within the refresh timeout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefreshTimedOut(Duration);

impl std::fmt::Display for RefreshTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the token refresher did not finish within {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for RefreshTimedOut {}
