//! The single-flight, generation-checked token cell shared by the layer, every service clone
//! and the handle.
//!
//! The hot path ([`Cell::lookup`]) takes a `std` read lock for a few pointer copies and never
//! awaits. The refresh path goes through an `async_lock::Mutex` gate: whoever holds the gate
//! is the only refresh in flight. The refresh itself runs in a task of its own that owns the
//! gate's guard, so it completes and stores its result even if every request waiting on it is
//! dropped.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_lock::{Mutex as AsyncMutex, MutexGuardArc};
use futures_util::FutureExt;
use http::HeaderValue;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use crate::clock::{Clock, TokioClock};
use crate::events::RefreshEvent;
use crate::refresher::{RefreshContext, RefreshError, RefreshReason, TokenRefresher};
use crate::retry::RetryPolicy;
use crate::token::Token;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

tokio::task_local! {
    /// Set while a refresher runs, so that a request the refresher sends through a client
    /// wearing this same layer passes through instead of waiting on its own refresh.
    static IN_REFRESH: ();
}

/// True when called from inside a refresher's future.
pub(crate) fn in_refresh() -> bool {
    IN_REFRESH.try_with(|_| ()).is_ok()
}

trait ErasedRefresher: Send + Sync + 'static {
    fn refresh(&self, ctx: RefreshContext) -> BoxFuture<Result<Token, RefreshError>>;
}

impl<R: TokenRefresher> ErasedRefresher for R {
    fn refresh(&self, ctx: RefreshContext) -> BoxFuture<Result<Token, RefreshError>> {
        Box::pin(TokenRefresher::refresh(self, ctx))
    }
}

/// Settings the cell reads when it stores a token or runs a refresh.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) leeway: Duration,
    pub(crate) refresh_ahead: Option<Duration>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) retry: RetryPolicy,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            leeway: Duration::from_secs(30),
            refresh_ahead: None,
            clock: Arc::new(TokioClock),
            retry: RetryPolicy::default(),
        }
    }
}

/// The leeway never exceeds this fraction of a token's lifetime (1/`LEEWAY_DIVISOR`), so a
/// token that lives less than the leeway is still used for most of its life.
pub(crate) const LEEWAY_DIVISOR: u32 = 10;
/// The refresh-ahead window never exceeds half of a token's lifetime.
const AHEAD_DIVISOR: u32 = 2;

struct State {
    settings: Settings,
    /// Bumped by every token change: refresh, install, clear.
    generation: u64,
    token: Option<Token>,
    /// When the token expires.
    expires_at: Option<Instant>,
    /// When the token must be refreshed before a request is sent.
    refresh_at: Option<Instant>,
    /// When a background refresh may start while the token is still used.
    ahead_at: Option<Instant>,
    /// Completed foreground refresh attempts, successful or not.
    attempts: u64,
    last_failure: Option<Arc<RefreshError>>,
    /// Set by a terminal failure (or a logout); requests fail fast until an install.
    ended: Option<Arc<RefreshError>>,
    /// Bumped by installs and clears through the handle; a refresh that started before one
    /// does not overwrite it.
    epoch: u64,
    ahead_failures: u32,
    refreshing: bool,
}

impl State {
    /// What the handle set: the answer for a refresh it superseded.
    fn current(&self) -> Result<Fresh, ObtainError> {
        match (&self.token, &self.ended) {
            (_, Some(err)) => Err(ObtainError::Ended(err.clone())),
            (Some(token), None) => Ok(Fresh {
                generation: self.generation,
                attempts: self.attempts,
                header: token.header_value().clone(),
            }),
            (None, None) => Err(ObtainError::Failed(Arc::new(RefreshError::transient(
                "the token was cleared during the refresh",
            )))),
        }
    }

    fn store(&mut self, token: Token) {
        let now = self.settings.clock.now();
        self.generation += 1;
        self.refresh_at = None;
        self.ahead_at = None;
        self.expires_at = None;
        // A lifetime too long to represent is treated as no expiry.
        if let Some(life) = token
            .expires_in()
            .filter(|life| now.checked_add(*life).is_some())
        {
            self.expires_at = Some(now + life);
            let leeway = self.settings.leeway.min(life / LEEWAY_DIVISOR);
            self.refresh_at = Some(now + (life - leeway));
            if let Some(ahead) = self.settings.refresh_ahead {
                let ahead = ahead.min(life / AHEAD_DIVISOR).max(leeway);
                self.ahead_at = Some(now + (life - ahead));
            }
        }
        self.token = Some(token);
        self.last_failure = None;
        self.ended = None;
        self.ahead_failures = 0;
    }
}

/// Resets `refreshing` if a refresh future is dropped before it finishes.
struct Running<'a>(Option<&'a Cell>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(cell) = self.0 {
            cell.write().refreshing = false;
        }
    }
}

/// What the hot path found.
pub(crate) enum Lookup {
    /// A usable token. `ahead` asks the caller to start a background refresh.
    Ready {
        generation: u64,
        attempts: u64,
        header: HeaderValue,
        ahead: bool,
    },
    /// No usable token: the request must wait for a refresh.
    Refresh { generation: u64, attempts: u64 },
    /// The session ended; fail fast.
    Ended(Arc<RefreshError>),
}

/// A token newer than the one a request used.
#[derive(Clone)]
pub(crate) struct Fresh {
    pub(crate) generation: u64,
    pub(crate) attempts: u64,
    pub(crate) header: HeaderValue,
}

/// Why no fresh token could be had.
#[derive(Clone)]
pub(crate) enum ObtainError {
    /// The refresh this caller waited on failed terminally.
    Rejected(Arc<RefreshError>),
    /// The refresh this caller waited on failed transiently, retries exhausted.
    Failed(Arc<RefreshError>),
    /// An earlier refresh failed terminally.
    Ended(Arc<RefreshError>),
}

/// A snapshot of the cell's state without the secret.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Status {
    pub(crate) generation: u64,
    pub(crate) has_token: bool,
    pub(crate) expires_in: Option<Duration>,
    pub(crate) refresh_in: Option<Duration>,
    pub(crate) session_ended: bool,
    pub(crate) refreshing: bool,
}

/// The held gate. Releasing it wakes every request waiting on the cell.
struct GateGuard {
    guard: Option<MutexGuardArc<()>>,
    released: Arc<Notify>,
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        // Unlock first: a woken waiter must find the gate free.
        drop(self.guard.take());
        self.released.notify_waiters();
    }
}

/// Sees every event of a cell.
pub(crate) type EventHook = Box<dyn Fn(RefreshEvent) + Send + Sync>;

pub(crate) struct Cell {
    hook: Option<EventHook>,
    state: RwLock<State>,
    gate: Arc<AsyncMutex<()>>,
    /// Signalled each time the gate is released, to wake every request waiting for the
    /// refresh in flight at once.
    released: Arc<Notify>,
    refresher: Box<dyn ErasedRefresher>,
    events: broadcast::Sender<RefreshEvent>,
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.read();
        f.debug_struct("Cell")
            .field("generation", &st.generation)
            .field("has_token", &st.token.is_some())
            .field("session_ended", &st.ended.is_some())
            .finish_non_exhaustive()
    }
}

impl Cell {
    pub(crate) fn new<R: TokenRefresher>(refresher: R) -> Self {
        Self::with_settings(refresher, Settings::default(), None)
    }

    /// A cell with the given settings; `hook` sees every event (the keyed layer tags them).
    pub(crate) fn with_settings<R: TokenRefresher>(
        refresher: R,
        settings: Settings,
        hook: Option<EventHook>,
    ) -> Self {
        let (events, _) = broadcast::channel(64);
        Self {
            hook,
            state: RwLock::new(State {
                settings,
                generation: 0,
                token: None,
                expires_at: None,
                refresh_at: None,
                ahead_at: None,
                attempts: 0,
                last_failure: None,
                ended: None,
                epoch: 0,
                ahead_failures: 0,
                refreshing: false,
            }),
            gate: Arc::new(AsyncMutex::new(())),
            released: Arc::new(Notify::new()),
            refresher: Box::new(refresher),
            events,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn update_settings(&self, f: impl FnOnce(&mut Settings)) {
        f(&mut self.write().settings);
    }

    fn emit(&self, event: RefreshEvent) {
        if let Some(hook) = &self.hook {
            hook(event);
        }
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<RefreshEvent> {
        self.events.subscribe()
    }

    /// The hot path: the current token, without awaiting anything.
    pub(crate) fn lookup(&self) -> Lookup {
        let st = self.read();
        if let Some(err) = &st.ended {
            return Lookup::Ended(err.clone());
        }
        let Some(token) = &st.token else {
            return Lookup::Refresh {
                generation: st.generation,
                attempts: st.attempts,
            };
        };
        let mut ahead = false;
        if st.refresh_at.is_some() {
            let now = st.settings.clock.now();
            if st.refresh_at.is_some_and(|at| now >= at) {
                return Lookup::Refresh {
                    generation: st.generation,
                    attempts: st.attempts,
                };
            }
            ahead = !st.refreshing && st.ahead_at.is_some_and(|at| now >= at);
        }
        Lookup::Ready {
            generation: st.generation,
            attempts: st.attempts,
            header: token.header_value().clone(),
            ahead,
        }
    }

    /// The current generation and attempt counter, for callers about to wait on a refresh.
    pub(crate) fn position(&self) -> (u64, u64) {
        let st = self.read();
        (st.generation, st.attempts)
    }

    pub(crate) fn status(&self) -> Status {
        let st = self.read();
        let now = st.settings.clock.now();
        Status {
            generation: st.generation,
            has_token: st.token.is_some(),
            expires_in: st.expires_at.map(|at| at.saturating_duration_since(now)),
            refresh_in: st.refresh_at.map(|at| at.saturating_duration_since(now)),
            session_ended: st.ended.is_some(),
            refreshing: st.refreshing,
        }
    }

    /// What a waiter for a token newer than `generation` gets without refreshing, if anything.
    fn settled(&self, generation: u64, attempts: u64) -> Option<Result<Fresh, ObtainError>> {
        let st = self.read();
        if st.generation > generation {
            if let Some(token) = &st.token {
                return Some(Ok(Fresh {
                    generation: st.generation,
                    attempts: st.attempts,
                    header: token.header_value().clone(),
                }));
            }
        }
        if st.attempts > attempts {
            if let Some(err) = &st.last_failure {
                return Some(Err(if err.is_terminal() {
                    ObtainError::Rejected(err.clone())
                } else {
                    ObtainError::Failed(err.clone())
                }));
            }
        }
        st.ended
            .as_ref()
            .map(|err| Err(ObtainError::Ended(err.clone())))
    }

    /// A token newer than `generation`: the one already there if the cell moved on (a late
    /// 401 from a stale token), the result of the refresh in flight, or a new refresh.
    ///
    /// `attempts` is the attempt counter the caller saw with `generation`: a refresh attempt
    /// that completed since then and failed is this caller's answer too, so a failure is
    /// shared by every waiter instead of being retried once per waiter.
    pub(crate) async fn fresher_than(
        self: &Arc<Self>,
        generation: u64,
        attempts: u64,
    ) -> Result<Fresh, ObtainError> {
        loop {
            // Registered before the checks, so a release between them is not missed.
            let mut released = std::pin::pin!(self.released.notified());
            released.as_mut().enable();
            if let Some(done) = self.settled(generation, attempts) {
                return done;
            }
            if let Some(guard) = self.try_lock_gate() {
                if let Some(done) = self.settled(generation, attempts) {
                    return done;
                }
                // Boxed: only the one request that starts the refresh needs this state, and
                // the future of every request waiting in a stampede is sized for it.
                return Box::pin(self.drive(guard, false)).await;
            }
            // A refresh is in flight: wait for it with every other waiter. Queueing on the
            // gate instead would let a stampede's waiters through one at a time.
            released.await;
        }
    }

    /// Takes the gate, waiting for the holder.
    async fn lock_gate(&self) -> GateGuard {
        GateGuard {
            guard: Some(self.gate.lock_arc().await),
            released: self.released.clone(),
        }
    }

    /// Takes the gate if it is free.
    fn try_lock_gate(&self) -> Option<GateGuard> {
        let guard = self.gate.try_lock_arc()?;
        Some(GateGuard {
            guard: Some(guard),
            released: self.released.clone(),
        })
    }

    /// Always calls the refresher, or joins the refresh already in flight. Ignores an ended
    /// session: the refresher may hold new credentials.
    pub(crate) async fn force_refresh(self: &Arc<Self>) -> Result<Fresh, ObtainError> {
        let (generation, attempts) = self.position();
        let guard = self.lock_gate().await;
        {
            let st = self.read();
            if st.generation > generation || st.attempts > attempts {
                drop(st);
                // A refresh ran while we waited for the gate: that is the one we joined.
                if let Some(done) = self.settled(generation, attempts) {
                    return done;
                }
            }
        }
        self.drive(guard, true).await
    }

    /// Runs one refresh as its own task, holding the gate, and waits for its result.
    async fn drive(self: &Arc<Self>, guard: GateGuard, force: bool) -> Result<Fresh, ObtainError> {
        let (tx, rx) = oneshot::channel();
        // Decided now, under the gate: a token installed before the task starts wins.
        let decided = self.read().epoch;
        let task = Arc::clone(self).run(guard, false, force, Some(tx), decided);
        match tokio::runtime::Handle::try_current() {
            // A task of its own: the refresh survives the cancellation of every waiter.
            Ok(handle) => drop(handle.spawn(task)),
            // No Tokio runtime: drive it here (cancelling this caller cancels the refresh).
            Err(_) => task.await,
        }
        match rx.await {
            Ok(outcome) => outcome,
            // The task was dropped without an answer (runtime shutting down).
            Err(_) => Err(ObtainError::Failed(Arc::new(RefreshError::transient(
                "the refresh task was cancelled",
            )))),
        }
    }

    /// Starts one background refresh if none is in flight (refresh-ahead).
    pub(crate) fn refresh_ahead(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(guard) = self.try_lock_gate() else {
            return;
        };
        let decided = {
            let st = self.read();
            let due = st.ended.is_none()
                && st.token.is_some()
                && st.ahead_at.is_some_and(|at| st.settings.clock.now() >= at);
            if !due {
                return;
            }
            st.epoch
        };
        drop(handle.spawn(Arc::clone(self).run(guard, true, false, None, decided)));
    }

    async fn run(
        self: Arc<Self>,
        guard: GateGuard,
        background: bool,
        force: bool,
        reply: Option<oneshot::Sender<Result<Fresh, ObtainError>>>,
        decided: u64,
    ) {
        let (stale, epoch, generation, settings) = {
            let mut st = self.write();
            if st.epoch != decided {
                // The handle installed or cleared a token after this refresh was decided and
                // before it started: that token is the answer; do not refresh it away.
                let outcome = st.current();
                drop(st);
                drop(guard);
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
                return;
            }
            st.refreshing = true;
            (
                st.token.clone(),
                st.epoch,
                st.generation,
                st.settings.clone(),
            )
        };
        // Without a runtime the refresh runs inside a request, and dropping that request
        // drops this future: reset `refreshing` then too (the gate is still held).
        let mut running = Running(Some(&self));
        let started = settings.clock.now();
        let span = tracing::debug_span!("token_refresh", generation, background, force);
        let outcome = async {
            tracing::debug!("token refresh started");
            let result = AssertUnwindSafe(self.attempt_all(stale, &settings, background))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(RefreshError::transient("the token refresher panicked")));
            let elapsed = settings.clock.now().saturating_duration_since(started);
            running.0 = None;
            self.finish(result, epoch, background, elapsed)
        }
        .instrument(span)
        .await;
        drop(guard);
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }

    /// Calls the refresher, retrying transient failures as the policy says.
    async fn attempt_all(
        &self,
        stale: Option<Token>,
        settings: &Settings,
        background: bool,
    ) -> Result<Token, RefreshError> {
        let started = settings.clock.now();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let reason = match (&stale, background) {
                (_, true) => RefreshReason::Background,
                (None, false) => RefreshReason::NoToken,
                (Some(_), false) => RefreshReason::Expired,
            };
            let ctx = RefreshContext::new(stale.clone(), reason);
            let result = IN_REFRESH.scope((), self.refresher.refresh(ctx)).await;
            let err = match result {
                Ok(token) => return Ok(token),
                Err(err) => err,
            };
            if err.is_terminal() || background {
                return Err(err);
            }
            let elapsed = settings.clock.now().saturating_duration_since(started);
            let Some(delay) = settings.retry.delay(attempt, elapsed, err.retry_after()) else {
                return Err(err);
            };
            if tokio::runtime::Handle::try_current().is_err() {
                // No timer outside a Tokio runtime: report the failure itself.
                return Err(err);
            }
            tracing::debug!(attempt, delay_ms = delay.as_millis() as u64, error = %err, "transient token refresh failure; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    fn finish(
        &self,
        result: Result<Token, RefreshError>,
        epoch: u64,
        background: bool,
        elapsed: Duration,
    ) -> Result<Fresh, ObtainError> {
        let elapsed_ms = elapsed.as_millis() as u64;
        let mut st = self.write();
        st.refreshing = false;
        if st.epoch != epoch {
            // A token was installed or cleared through the handle while this refresh ran:
            // what the handle set wins, whether the refresh succeeded or failed (a failure of
            // the superseded refresh must not end the new session).
            tracing::debug!(
                elapsed_ms,
                "token refresh result discarded: the token was replaced meanwhile"
            );
            if background {
                return Err(ObtainError::Failed(Arc::new(RefreshError::transient(
                    "the token was replaced during the refresh",
                ))));
            }
            st.attempts += 1;
            st.last_failure = None;
            return st.current();
        }
        match result {
            Ok(token) => {
                st.attempts += 1;
                st.store(token);
                let generation = st.generation;
                let attempts = st.attempts;
                let header = st.token.as_ref().map(|t| t.header_value().clone());
                drop(st);
                tracing::debug!(
                    generation,
                    elapsed_ms,
                    background,
                    "token refresh succeeded"
                );
                self.emit(RefreshEvent::Refreshed { generation });
                Ok(Fresh {
                    generation,
                    attempts,
                    header: header.expect("token was just stored"),
                })
            }
            Err(err) if background => {
                st.ahead_failures = st.ahead_failures.saturating_add(1);
                let backoff = st.settings.retry.background_backoff(st.ahead_failures);
                let now = st.settings.clock.now();
                let next = now + backoff;
                // Try again after the backoff, but never past the hard deadline.
                st.ahead_at = Some(match st.refresh_at {
                    Some(hard) => next.min(hard),
                    None => next,
                });
                let generation = st.generation;
                drop(st);
                tracing::warn!(generation, elapsed_ms, error = %err, backoff_ms = backoff.as_millis() as u64, "background token refresh failed; keeping the current token");
                self.emit(RefreshEvent::RefreshFailed {
                    generation,
                    terminal: err.is_terminal(),
                });
                Err(ObtainError::Failed(Arc::new(err)))
            }
            Err(err) => {
                let err = Arc::new(err);
                st.attempts += 1;
                st.last_failure = Some(err.clone());
                let generation = st.generation;
                let terminal = err.is_terminal();
                let newly_ended = terminal && st.ended.is_none();
                if terminal {
                    st.ended = Some(err.clone());
                }
                drop(st);
                tracing::warn!(generation, elapsed_ms, terminal, error = %err, "token refresh failed");
                self.emit(RefreshEvent::RefreshFailed {
                    generation,
                    terminal,
                });
                if newly_ended {
                    tracing::warn!(
                        generation,
                        "session ended: install new credentials to resume"
                    );
                    self.emit(RefreshEvent::SessionEnded { generation });
                }
                Err(if terminal {
                    ObtainError::Rejected(err)
                } else {
                    ObtainError::Failed(err)
                })
            }
        }
    }

    /// Installs a token (after a login). Ends a session-ended state.
    pub(crate) fn install(&self, token: Token) -> u64 {
        let mut st = self.write();
        st.epoch += 1;
        st.store(token);
        let generation = st.generation;
        drop(st);
        tracing::debug!(generation, "token installed");
        self.emit(RefreshEvent::Installed { generation });
        generation
    }

    /// Drops the token (logout): requests fail fast with a session-ended error until a token
    /// is installed.
    pub(crate) fn clear(&self) {
        let mut st = self.write();
        st.epoch += 1;
        st.generation += 1;
        st.token = None;
        st.expires_at = None;
        st.refresh_at = None;
        st.ahead_at = None;
        st.last_failure = None;
        st.ended = Some(Arc::new(RefreshError::terminal(
            "logged out through the token handle",
        )));
        let generation = st.generation;
        drop(st);
        tracing::debug!(generation, "token cleared");
        self.emit(RefreshEvent::Cleared { generation });
    }
}
