//! The token cell shared by a layer, every service it made, their clones and the handle.
//!
//! # Invariants
//!
//! - **One refresh at a time.** The state's `flight` is the only truth for "a refresh is in
//!   flight"; it is set and cleared under the state's write lock, and a request that needs a
//!   newer token while it is set joins it (a shared future) instead of starting another.
//! - **Generation check.** Every token change (refresh, install, invalidate, clear) bumps the
//!   generation. A request asks for a token *newer than the generation it used*, so a late 401
//!   for an old token reuses the token already there.
//! - **No send with a known-rejected token.** While a refresh triggered by a refusal of
//!   generation `g` runs, requests that would carry `g` wait for it instead.
//! - **A refresh always completes.** It runs as its own task on the runtime the cell was made
//!   in (without any runtime, its waiters drive it together), bounded by the refresh timeout;
//!   its result is stored even if every waiter is gone. A waiter on another runtime than the
//!   task's also has a bound of its own (that runtime may no longer be driven); one on the
//!   task's runtime needs none.
//! - **The handle wins.** A token installed or cleared while a refresh runs is not replaced by
//!   that refresh's result, success or failure. A token invalidated while a refresh runs makes
//!   that same flight call the refresher again when its call ends (for the new generation,
//!   handed the token the first call got, if any): its waiters and the requests that join it
//!   after the invalidation get a token from a call that started after it, and there is still
//!   one refresher call at a time.
//! - **A flight is cleared only by itself.** A refresh records its outcome only while it is
//!   the flight (checked by id), and a waiter that gives up clears only the flight it joined:
//!   neither ever clears or answers for a later flight.
//! - **The hot path never awaits**: a `std` read lock held for a few pointer copies. No lock is
//!   held across an `.await`.
//! - Transitions are pure functions of [`state::State`] (unit-tested without a runtime);
//!   this module only locks, calls them, emits events and runs the job.

mod attempt;

mod flight;
pub(crate) mod state;

use std::sync::{Arc, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::broadcast;

pub(crate) use attempt::in_refresh;
#[cfg(any(feature = "store", feature = "oauth2"))]
pub(crate) use attempt::run_to_end;
use attempt::{BoxFuture, ErasedRefresher};
pub(crate) use flight::FreshWait;
pub(crate) use state::{Answer, Lookup, Need, Ticket, Unavailable};
use state::{Now, Policy, Session, State};

use crate::config::RefreshOptions;
use crate::events::RefreshEvent;
use crate::origin::Origin;
use crate::refresher::{RefreshError, TokenRefresher};
use crate::token::Token;

/// What an evicted cell leaves behind ([`TokenCell::leftover`]).
pub(crate) enum Leftover {
    /// Its ended session: the cause and the token it could not replace.
    Ended((Arc<RefreshError>, Option<Token>)),
    /// A token with a refresh token, for the rebuilt cell's first refresh.
    Token(Token),
    Nothing,
}

/// What every waiter of one refresh polls: the shared answer, and where the refresh runs.
#[derive(Clone)]
pub(crate) struct Job {
    pub(crate) answer: futures_util::future::Shared<BoxFuture<Answer>>,
    /// The runtime the refresh task runs on; `None`: no task, the waiters drive the refresh.
    pub(crate) runtime: Option<tokio::runtime::Id>,
}

/// Sees every event of a cell (the keyed layer tags them with the key).
pub(crate) type EventHook = Box<dyn Fn(RefreshEvent) + Send + Sync>;

/// A snapshot of the cell's state without the secret.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Status {
    pub(crate) generation: u64,
    pub(crate) has_token: bool,
    pub(crate) expires_in: Option<Duration>,
    pub(crate) refresh_in: Option<Duration>,
    pub(crate) session_ended: bool,
    pub(crate) refreshing: bool,
    pub(crate) cooling_for: Option<Duration>,
}

/// One token, its refresh and its events.
pub(crate) struct TokenCell {
    state: RwLock<State<Job>>,
    refresher: Box<dyn ErasedRefresher>,
    /// Created on the first subscription: most cells of a keyed layer never have one.
    events: OnceLock<broadcast::Sender<RefreshEvent>>,
    hook: Option<EventHook>,
    /// The origin the token is bound to when no allow-list is configured: the first one a
    /// request went to. Shared by every cell of a keyed layer, so that a rebuilt (evicted)
    /// cell or a new key cannot bind to another origin.
    pub(crate) origin: Arc<OnceLock<Origin>>,
    /// The runtime the cell was made in: refresh tasks run there, so a request on a runtime
    /// that stops being driven cannot strand them. Falls back to the current runtime when
    /// there was none, or once it is gone (found when a spawn there hands the task back).
    runtime: Option<tokio::runtime::Handle>,
    runtime_gone: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for TokenCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.read();
        f.debug_struct("TokenCell")
            .field("generation", &st.generation)
            .field("has_token", &matches!(st.session, Session::Active(_)))
            .field(
                "session_ended",
                &matches!(st.session, Session::Ended { .. }),
            )
            .finish_non_exhaustive()
    }
}

fn policy(options: &RefreshOptions) -> Policy<'_> {
    Policy {
        leeway: options.leeway,
        ahead: options.refresh_ahead.as_ref(),
    }
}

/// The layer's clocks, read one at a time as a decision needs them.
struct Clocks<'a>(&'a RefreshOptions);

impl state::Reading for Clocks<'_> {
    fn mono(&self) -> tokio::time::Instant {
        self.0.clock.now()
    }

    fn wall(&self) -> std::time::SystemTime {
        self.0.clock.wall()
    }
}

fn now(options: &RefreshOptions) -> Now {
    Now {
        mono: options.clock.now(),
        wall: options.clock.wall(),
    }
}

impl TokenCell {
    pub(crate) fn new<R: TokenRefresher>(refresher: R, hook: Option<EventHook>) -> Self {
        Self {
            state: RwLock::new(State::new()),
            refresher: Box::new(refresher),
            events: OnceLock::new(),
            hook,
            origin: Arc::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            runtime_gone: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A new cell whose generations come after `generation` (a keyed layer's cell rebuilt
    /// for a key: its generations continue past the old cell's). 0: from 0, as any cell.
    pub(crate) fn starting_after(mut self, generation: u64) -> Self {
        if generation > 0 {
            let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
            state.generation = state.generation.max(generation.saturating_add(1));
        }
        self
    }

    /// The current generation.
    pub(crate) fn generation(&self) -> u64 {
        self.read().generation
    }

    /// This cell binds its token to `origin`, shared with other cells.
    pub(crate) fn with_origin(mut self, origin: Arc<OnceLock<Origin>>) -> Self {
        self.origin = origin;
        self
    }

    #[inline]
    fn read(&self) -> RwLockReadGuard<'_, State<Job>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State<Job>> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: RefreshEvent) {
        if let Some(hook) = &self.hook {
            hook(event);
        }
        if let Some(events) = self.events.get() {
            // No subscriber is fine.
            let _ = events.send(event);
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<RefreshEvent> {
        self.events
            .get_or_init(|| broadcast::channel(64).0)
            .subscribe()
    }

    /// The hot path: what a request should do, without awaiting anything; starts a
    /// background refresh when one is due. A usable token's header is handed to
    /// `use_header` while the cell is locked for reading (a caller that puts it straight into
    /// a request moves no copy of it around).
    #[inline(always)]
    pub(crate) fn lookup_with<T>(
        self: &Arc<Self>,
        options: &RefreshOptions,
        use_header: impl FnOnce(&HeaderValue) -> T,
    ) -> Lookup<T> {
        let found = self
            .read()
            .lookup(Clocks(options), policy(options))
            .map(use_header);
        if let Lookup::Usable { ahead: true, .. } = found {
            self.refresh_ahead(options);
        }
        found
    }

    /// The current token while it has not expired and no server refused it (inside the
    /// leeway too).
    pub(crate) fn unexpired(&self, options: &RefreshOptions) -> Option<(Ticket, HeaderValue)> {
        self.read()
            .unexpired(Clocks(options))
            .map(|(ticket, header)| (ticket, header.clone()))
    }

    /// The current ticket, for a caller about to force a refresh.
    pub(crate) fn ticket(&self) -> Ticket {
        self.read().ticket()
    }

    /// Whether a refresh runs, or a failed one's cool-down holds at `now` (on the layer's
    /// clock, the one the cool-down was set on): a keyed cell then is not evicted (a rebuilt
    /// cell would call the token endpoint again at once).
    pub(crate) fn pinned(&self, now: tokio::time::Instant) -> bool {
        let st = self.read();
        st.flight.is_some() || st.cooling.as_ref().is_some_and(|c| c.until > now)
    }

    /// A new cell whose session starts ended by `ended` (a keyed layer's cell rebuilt for a
    /// key whose last cell left ended), if given.
    pub(crate) fn starting_ended(
        mut self,
        ended: Option<(Arc<RefreshError>, Option<Token>)>,
    ) -> Self {
        if let Some((cause, stale)) = ended {
            let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
            state.session = Session::Ended { cause, stale };
        }
        self
    }

    /// What an evicted cell leaves behind, read under one lock: its ended session (the
    /// cause and the token it could not replace), or else a token that carries a refresh
    /// token (a secret): with `tokens`, the one a refresh would be handed now (in use, or
    /// dropped by an invalidation and not replaced yet); without, only a login the handle
    /// installed that no refresh replaced since (in use, or dropped by the invalidation right
    /// after the install: see `State::installed`; a login a cell was started with by
    /// [`starting_stale`](Self::starting_stale) counts too until a refresh replaces it).
    pub(crate) fn leftover(&self, tokens: bool) -> Leftover {
        let st = self.read();
        if let Session::Ended { cause, stale } = &st.session {
            return Leftover::Ended((cause.clone(), stale.clone()));
        }
        let token = if tokens {
            match &st.session {
                Session::Active(held) => Some(&held.token),
                Session::Empty { stale } => stale.as_ref(),
                Session::Ended { .. } => None,
            }
        } else {
            st.installed()
        };
        match token.filter(|t| t.refresh_token().is_some()) {
            Some(token) => Leftover::Token(token.clone()),
            None => Leftover::Nothing,
        }
    }

    /// A new cell without a token whose first refresh is handed `stale` (a keyed layer's
    /// cell rebuilt for a key whose last cell left with a token: its refresh token survives
    /// the eviction), if given; as after an invalidation, nothing else changes. `login`: the
    /// token is a login the handle installed that no refresh replaced
    /// ([`leftover`](Self::leftover)), and stays one for this cell until a
    /// refresh replaces it (as if the handle had installed it at the cell's first
    /// generation: `handed` is that generation, which changes nothing else, no refresh having
    /// started before it). Called after [`starting_after`](Self::starting_after).
    pub(crate) fn starting_stale(mut self, stale: Option<Token>, login: bool) -> Self {
        if let Some(stale) = stale {
            let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
            state.session = Session::Empty { stale: Some(stale) };
            if login {
                state.handed = state.generation;
            }
        }
        self
    }

    pub(crate) fn status(&self, options: &RefreshOptions) -> Status {
        let st = self.read();
        let now = now(options);
        let (has_token, expires_in, refresh_in) = match &st.session {
            Session::Active(held) => (
                true,
                held.expires_at
                    .map(|at| at.saturating_duration_since(now.mono)),
                held.refresh_at(options.leeway)
                    .map(|at| at.saturating_duration_since(now.mono)),
            ),
            _ => (false, None, None),
        };
        Status {
            generation: st.generation,
            has_token,
            expires_in,
            refresh_in,
            session_ended: matches!(st.session, Session::Ended { .. }),
            refreshing: st.flight.is_some(),
            cooling_for: st
                .cooling
                .as_ref()
                .map(|c| c.until.saturating_duration_since(now.mono))
                .filter(|d| !d.is_zero()),
        }
    }

    /// The current token, for code that must forward it. A secret.
    pub(crate) fn current_token(&self) -> Option<Token> {
        match &self.read().session {
            Session::Active(held) => Some(held.token.clone()),
            _ => None,
        }
    }

    /// Installs a token (after a login). Ends a session-ended state and a cool-down.
    pub(crate) fn install(&self, token: Token, options: &RefreshOptions) -> u64 {
        let generation = self.write().install(token, now(options));
        tracing::debug!(generation, "token installed");
        self.emit(RefreshEvent::Installed { generation });
        generation
    }

    /// Drops the token without ending the session: the next request refreshes. An ended
    /// session stays ended (no event: nothing changed).
    pub(crate) fn invalidate(&self) -> u64 {
        let (generation, dropped) = self.write().invalidate();
        if !dropped {
            tracing::debug!(generation, "invalidate ignored: the session has ended");
            return generation;
        }
        tracing::debug!(generation, "token invalidated");
        self.emit(RefreshEvent::Invalidated { generation });
        generation
    }

    /// Logout: requests fail fast until a token is installed; the refresher forgets its own
    /// credentials.
    pub(crate) fn clear(&self) {
        let generation = self.write().clear();
        self.refresher.logout();
        tracing::debug!(generation, "token cleared (logout)");
        self.emit(RefreshEvent::Cleared { generation });
    }
}
