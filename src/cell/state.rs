//! The token cell's state as an explicit shape, and its transitions as pure functions.
//!
//! Nothing here awaits, locks or reads a clock: the caller passes `now` and holds the lock.
//! That keeps every transition unit-testable without a runtime (see the tests at the end).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::time::Instant;

use crate::backoff::{Cooldown, RefreshAhead};
use crate::events::RefreshEvent;
use crate::refresher::{RefreshError, RefreshReason};
use crate::token::{Expiry, Token};

/// The leeway never exceeds this fraction of a token's lifetime (1/`LEEWAY_DIVISOR`), so a
/// token that lives less than the leeway is still used for most of its life.
pub(crate) const LEEWAY_DIVISOR: u32 = 10;

/// How often, on the monotonic clock, the hot path also reads the wall clock to catch a
/// machine that slept through a token's expiry. Every request used to read both clocks; the
/// wall clock costs a `clock_gettime` of its own. A request in the first 50 ms after such a
/// wake-up may still carry the expired token: the server refuses it and the layer refreshes
/// and replays, as for any refused token.
pub(crate) const WALL_CHECK_EVERY: Duration = Duration::from_millis(50);

/// Where a request stands: the generation of the token it saw and how many foreground
/// refreshes had completed then. A waiter is answered by anything that happened after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) generation: u64,
    pub(crate) attempts: u64,
}

/// The session: is there a token, and may there be one?
#[derive(Debug)]
pub(crate) enum Session {
    /// No token yet (or invalidated): the next request refreshes. `stale` is the
    /// invalidated token, handed to the refresher (it may carry the refresh token).
    Empty { stale: Option<Token> },
    /// A token and its deadlines.
    Active(Held),
    /// A terminal failure or a logout: requests fail fast until a token is installed. `stale`
    /// is the token the terminal failure could not replace (a forced refresh is handed it);
    /// a logout keeps none.
    Ended {
        cause: Arc<RefreshError>,
        stale: Option<Token>,
    },
}

/// A token held by the cell, with when it was received and when it expires.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) token: Token,
    /// The lifetime the token had when it was stored (`None`: no known expiry).
    pub(crate) lifetime: Option<Duration>,
    /// The hard deadline on the monotonic clock.
    pub(crate) expires_at: Option<Instant>,
    /// The same deadline on the wall clock, to catch a machine that slept through it (the
    /// monotonic clock stops during suspend on Linux and macOS).
    pub(crate) wall_expires_at: Option<SystemTime>,
    /// The leeway's cap for this token (1/`LEEWAY_DIVISOR` of its lifetime).
    leeway_cap: Duration,
    /// When it was stored, on the monotonic clock.
    stored_at: Instant,
    /// Nanoseconds after `stored_at` before which the hot path need not read the wall clock
    /// again (see [`WALL_CHECK_EVERY`]).
    wall_quiet: AtomicU64,
}

impl Held {
    fn new(token: Token, now: Instant, wall: SystemTime) -> Self {
        let lifetime = match token.expiry() {
            None => None,
            Some(Expiry::In(life)) => Some(life),
            Some(Expiry::At(at)) => Some(at.duration_since(wall).unwrap_or(Duration::ZERO)),
        };
        // A lifetime too long to represent is treated as no expiry.
        let expires_at = lifetime.and_then(|life| now.checked_add(life));
        let lifetime = expires_at.and(lifetime);
        let wall_expires_at = lifetime.and_then(|life| wall.checked_add(life));
        Self {
            token,
            lifetime,
            expires_at,
            wall_expires_at,
            leeway_cap: lifetime.map_or(Duration::ZERO, |life| life / LEEWAY_DIVISOR),
            stored_at: now,
            wall_quiet: AtomicU64::new(0),
        }
    }

    /// Past the hard deadline, for the hot path: the monotonic clock on every call, the wall
    /// clock at most every [`WALL_CHECK_EVERY`] (of the monotonic clock).
    fn expired_now(&self, mono: Instant, clocks: &impl Reading) -> bool {
        if self.expires_at.is_some_and(|at| mono >= at) {
            return true;
        }
        let Some(wall_at) = self.wall_expires_at else {
            return false;
        };
        let since = nanos(mono.saturating_duration_since(self.stored_at));
        if since < self.wall_quiet.load(Ordering::Relaxed) {
            return false;
        }
        if clocks.wall() >= wall_at {
            return true;
        }
        let next = since.saturating_add(nanos(WALL_CHECK_EVERY));
        self.wall_quiet.store(next, Ordering::Relaxed);
        false
    }

    /// Past the hard deadline, on either clock.
    pub(crate) fn expired(&self, now: Instant, wall: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
            || self.wall_expires_at.is_some_and(|at| wall >= at)
    }

    /// When requests stop using the token and wait for a refresh first.
    pub(crate) fn refresh_at(&self, leeway: Duration) -> Option<Instant> {
        let at = self.expires_at?;
        Some(at - leeway.min(self.leeway_cap))
    }

    /// When a background refresh may start while the token is still used: the window is
    /// capped at half the lifetime and never shorter than the leeway.
    pub(crate) fn ahead_at(&self, ahead: &RefreshAhead, leeway: Duration) -> Option<Instant> {
        let (life, at) = (self.lifetime?, self.expires_at?);
        let leeway = leeway.min(life / LEEWAY_DIVISOR);
        Some(at - ahead.window(life).min(life / 2).max(leeway))
    }
}

/// A refresh in flight. `J` is the shared future waiters join (a unit in the unit tests).
#[derive(Debug)]
pub(crate) struct Flight<J> {
    pub(crate) job: J,
    pub(crate) background: bool,
    /// The generation the cell held when the refresher was last called: the refresh's result
    /// is discarded if the handle installed or cleared a token meanwhile, and the refresher is
    /// called again (for the new generation) if the handle invalidated the token.
    pub(crate) generation: u64,
    /// Tells this flight from later ones (it stays the same when the flight calls the
    /// refresher again after an invalidation).
    pub(crate) id: u64,
    /// No task runs it: its waiters drive it (no runtime).
    pub(crate) inline: bool,
    /// The generation at which a forced refresh joined it after the handle had installed or
    /// cleared a token: while that is still the cell's generation, this flight's answer (for
    /// an older one) is not what the forced refresh asked for.
    pub(crate) forced_at: Option<u64>,
}

/// A failed refresh in its cool-down: no new refresh starts before `until`.
#[derive(Debug, Clone)]
pub(crate) struct Cooling {
    pub(crate) until: Instant,
    pub(crate) error: Arc<RefreshError>,
    /// The time left at the reading that handed this value out, on the layer's clock (an
    /// injected clock need not agree with Tokio's, so it cannot be recomputed later).
    pub(crate) left: Duration,
}

/// The per-request settings the state needs for a decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy<'a> {
    pub(crate) leeway: Duration,
    pub(crate) ahead: Option<&'a RefreshAhead>,
}

/// The clocks' readings for one decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) mono: Instant,
    pub(crate) wall: SystemTime,
}

/// Something that reads the clocks: a reading taken already, or the clocks themselves (each
/// read only when a decision needs it).
pub(crate) trait Reading {
    fn mono(&self) -> Instant;
    fn wall(&self) -> SystemTime;
}

impl Reading for Now {
    fn mono(&self) -> Instant {
        self.mono
    }

    fn wall(&self) -> SystemTime {
        self.wall
    }
}

/// A duration in nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a request found: `H` is the token's header (borrowed from the state, or what a
/// caller made of it while the state was locked).
#[derive(Debug)]
pub(crate) enum Lookup<H = HeaderValue> {
    /// A usable token. `ahead`: a background refresh is due.
    Usable {
        ticket: Ticket,
        header: H,
        ahead: bool,
    },
    /// No usable token: wait for one newer than `ticket` before sending.
    Stale { ticket: Ticket, expired: bool },
    /// The last refresh failed and its cool-down runs, with no usable token: fail fast.
    Cooling(Cooling),
    /// The session ended: fail fast.
    Ended(Arc<RefreshError>),
}

impl<H> Lookup<H> {
    /// The same answer, with `f` applied to a usable token's header.
    #[inline(always)]
    pub(crate) fn map<T>(self, f: impl FnOnce(H) -> T) -> Lookup<T> {
        match self {
            Self::Usable {
                ticket,
                header,
                ahead,
            } => Lookup::Usable {
                ticket,
                header: f(header),
                ahead,
            },
            Self::Stale { ticket, expired } => Lookup::Stale { ticket, expired },
            Self::Cooling(c) => Lookup::Cooling(c),
            Self::Ended(e) => Lookup::Ended(e),
        }
    }
}

/// A token newer than the one a request used.
#[derive(Debug, Clone)]
pub(crate) struct Fresh {
    pub(crate) ticket: Ticket,
    pub(crate) header: HeaderValue,
}

/// Why no fresh token could be had.
#[derive(Debug, Clone)]
pub(crate) enum Unavailable {
    /// The refresh this caller waited on failed terminally.
    Rejected(Arc<RefreshError>),
    /// The refresh this caller waited on failed transiently, retries exhausted.
    Failed(Arc<RefreshError>),
    /// An earlier refresh failed and its cool-down runs: no refresh was attempted.
    Cooling(Cooling),
    /// An earlier refresh failed terminally, or the session was logged out.
    Ended(Arc<RefreshError>),
}

/// The answer a refresh gives its waiters.
pub(crate) type Answer = Result<Fresh, Unavailable>;

/// What a request that needs a newer token must do.
#[derive(Debug)]
pub(crate) enum Begin<J> {
    /// Already answered: something happened since the ticket was taken.
    Answer(Answer),
    /// Wait for the refresh in flight.
    Join(J),
    /// Start a refresh: build the job and hand it to [`State::started`].
    Start,
}

/// Why a caller needs a newer token, as far as the state is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// No usable token before sending.
    BeforeSend,
    /// A server refused the token of the ticket's generation.
    Refused,
    /// The handle forces a refresh: ignores the cool-down and an ended session.
    Forced,
}

/// The events a transition emits, in order.
pub(crate) type Emitted = [Option<RefreshEvent>; 2];

/// What [`State::finish`] made of a refresher's outcome.
#[derive(Debug)]
pub(crate) enum Finished {
    /// The refresh is over: the answer for its waiters, and the events to emit.
    Done(Answer, Emitted),
    /// The token was invalidated while the refresh ran: the same flight (its waiters, and
    /// the requests that join it meanwhile) calls the refresher again, for `generation`,
    /// handed `stale`.
    Again {
        generation: u64,
        stale: Option<Token>,
        reason: RefreshReason,
    },
}

/// `now + pause`, never panicking: [`Cooldown`] caps a pause at a day already, and an instant
/// the clock cannot represent (a clock near its end) ends the pause at `now`.
fn after(now: Instant, pause: Duration) -> Instant {
    now.checked_add(pause).unwrap_or(now)
}

/// The whole state of a token cell.
#[derive(Debug)]
pub(crate) struct State<J> {
    pub(crate) session: Session,
    pub(crate) flight: Option<Flight<J>>,
    /// Bumped by every token change: refresh, install, invalidate, clear.
    pub(crate) generation: u64,
    /// Completed foreground refreshes, successful or not.
    pub(crate) attempts: u64,
    /// The failure of the last completed foreground refresh, if it failed.
    pub(crate) last_failure: Option<Arc<RefreshError>>,
    /// The cool-down after a failed foreground refresh.
    pub(crate) cooling: Option<Cooling>,
    /// Failed foreground refreshes in a row (the cool-down grows with them).
    pub(crate) failures: u32,
    /// The generation a server refused (a 401 for the current token): no request is sent
    /// with it again. Cleared by any token change.
    pub(crate) rejected: Option<u64>,
    /// Flights started so far (flight ids).
    pub(crate) flights: u64,
    /// Failed background refreshes in a row, and when the next may start.
    pub(crate) ahead_failures: u32,
    pub(crate) ahead_not_before: Option<Instant>,
    /// The generation the handle last installed or cleared a token at (0: never).
    pub(crate) handed: u64,
}

impl<J: Clone> Default for State<J> {
    fn default() -> Self {
        Self::new()
    }
}

impl<J: Clone> State<J> {
    pub(crate) fn new() -> Self {
        Self {
            session: Session::Empty { stale: None },
            flight: None,
            generation: 0,
            attempts: 0,
            last_failure: None,
            cooling: None,
            failures: 0,
            rejected: None,
            flights: 0,
            ahead_failures: 0,
            ahead_not_before: None,
            handed: 0,
        }
    }

    /// The token the handle installed (a login) if no refresh replaced it since: the token
    /// in use at the generation of its install (`handed`), or the one the invalidation right
    /// after the install dropped (`handed` one generation back; a cell started with a login
    /// handed over sets `handed` to its first generation: see `TokenCell::starting_stale`).
    /// In the second case it may instead be the token a refresh of the login got while the
    /// invalidation came (handed on as the stale one, see [`finish`](Self::finish)): one the
    /// refresher got from the login. A second invalidation in a row is not told from a
    /// refresh and an invalidation: `None` then.
    pub(crate) fn installed(&self) -> Option<&Token> {
        // `handed` 0: nothing was ever installed (an install stores at generation 1 or later).
        if self.handed == 0 {
            return None;
        }
        match &self.session {
            Session::Active(held) if self.handed == self.generation => Some(&held.token),
            Session::Empty { stale: Some(token) }
                if self.generation.saturating_sub(self.handed) <= 1 =>
            {
                Some(token)
            }
            _ => None,
        }
    }

    pub(crate) fn ticket(&self) -> Ticket {
        Ticket {
            generation: self.generation,
            attempts: self.attempts,
        }
    }

    fn cooling_at(&self, now: Instant) -> Option<Cooling> {
        self.cooling
            .as_ref()
            .filter(|c| now < c.until)
            .map(|c| Cooling {
                left: c.until - now,
                ..c.clone()
            })
    }

    /// The hot path's decision.
    ///
    /// The clocks are read only when the answer depends on them (a token with an expiry, a
    /// cool-down): a token without an expiry costs no clock reading.
    #[inline(always)]
    pub(crate) fn lookup(&self, now: impl Reading, policy: Policy<'_>) -> Lookup<&HeaderValue> {
        let ticket = self.ticket();
        let cooling_at = |now: &dyn Reading| match self.cooling {
            Some(_) => self.cooling_at(now.mono()),
            None => None,
        };
        let held = match &self.session {
            Session::Ended { cause: err, .. } => return Lookup::Ended(err.clone()),
            Session::Empty { .. } => {
                // A refresh running during a cool-down (a forced one) is joined, not failed.
                return match cooling_at(&now) {
                    Some(c) if self.flight.is_none() => Lookup::Cooling(c),
                    _ => Lookup::Stale {
                        ticket,
                        expired: false,
                    },
                };
            }
            Session::Active(held) => held,
        };
        if self.rejected == Some(self.generation) {
            // A server refused this very token: never send it again. Wait for the refresh
            // (running, or to start), or fail fast while a failed one cools down.
            return match cooling_at(&now) {
                Some(c) if self.flight.is_none() => Lookup::Cooling(c),
                _ => Lookup::Stale {
                    ticket,
                    expired: true,
                },
            };
        }
        if held.expires_at.is_none() {
            return Lookup::Usable {
                ticket,
                header: held.token.header_value(),
                ahead: false,
            };
        }
        let mono = now.mono();
        let cooling = self.cooling_at(mono);
        if held.expired_now(mono, &now) {
            return match cooling {
                Some(c) if self.flight.is_none() => Lookup::Cooling(c),
                _ => Lookup::Stale {
                    ticket,
                    expired: true,
                },
            };
        }
        if cooling.is_none()
            && held.refresh_at(policy.leeway).is_some_and(|at| mono >= at)
            && self.ahead_not_before.is_none_or(|t| mono >= t)
        {
            // Inside the leeway: wait for a refresh, unless a background refresh just failed
            // (its requests, and those after it during its pause, keep the still-valid
            // token, as during a foreground failure's cool-down).
            return Lookup::Stale {
                ticket,
                expired: true,
            };
        }
        let ahead = cooling.is_none()
            && self.flight.is_none()
            && self.ahead_not_before.is_none_or(|t| mono >= t)
            && policy.ahead.is_some_and(|rule| {
                held.ahead_at(rule, policy.leeway)
                    .is_some_and(|at| mono >= at)
            });
        Lookup::Usable {
            ticket,
            header: held.token.header_value(),
            ahead,
        }
    }

    /// The current token while it has not expired (inside the leeway too) and no server
    /// refused it: what a request sends after a refresh inside the leeway failed.
    pub(crate) fn unexpired(&self, now: impl Reading) -> Option<(Ticket, &HeaderValue)> {
        let Session::Active(held) = &self.session else {
            return None;
        };
        if self.rejected == Some(self.generation) || held.expired_now(now.mono(), &now) {
            return None;
        }
        Some((self.ticket(), held.token.header_value()))
    }

    /// What a waiter for a token newer than `ticket` gets without a refresh, if anything.
    ///
    /// Never a token a server refused: a late 401 for an older token, coming in after the
    /// current one was refused, waits for the refresh that refusal started (or starts one).
    pub(crate) fn answer_since(&self, ticket: Ticket) -> Option<Answer> {
        if self.generation > ticket.generation {
            match &self.session {
                Session::Active(_) if self.rejected == Some(self.generation) => {}
                Session::Active(held) => {
                    return Some(Ok(Fresh {
                        ticket: self.ticket(),
                        header: held.token.header_value().clone(),
                    }));
                }
                Session::Ended { cause: err, .. } => {
                    return Some(Err(Unavailable::Ended(err.clone())));
                }
                Session::Empty { .. } => {}
            }
        }
        if self.attempts > ticket.attempts {
            if let Some(err) = &self.last_failure {
                return Some(Err(if err.is_terminal() {
                    Unavailable::Rejected(err.clone())
                } else {
                    Unavailable::Failed(err.clone())
                }));
            }
        }
        match &self.session {
            Session::Ended { cause: err, .. } => Some(Err(Unavailable::Ended(err.clone()))),
            _ => None,
        }
    }

    /// [`begin`](Self::begin) when it changes nothing (an answer, or a flight to join),
    /// under a read lock: the waiters of a stampede do not queue for the write lock. `None`:
    /// call `begin`.
    pub(crate) fn begin_shared(&self, ticket: Ticket, need: Need) -> Option<Begin<J>> {
        if need == Need::Forced {
            return None;
        }
        if let Some(answer) = self.answer_since(ticket) {
            return Some(Begin::Answer(answer));
        }
        if need == Need::Refused
            && ticket.generation == self.generation
            && self.rejected != Some(ticket.generation)
        {
            return None;
        }
        match &self.flight {
            // A refusal joining a background refresh makes it a foreground one (`begin`,
            // under the write lock).
            Some(f) if f.background && need == Need::Refused => None,
            Some(f) => Some(Begin::Join(f.job.clone())),
            None => None,
        }
    }

    /// A caller at `ticket` needs a newer token: answer, join the flight, or start one.
    pub(crate) fn begin(&mut self, ticket: Ticket, need: Need, now: Instant) -> Begin<J> {
        if need != Need::Forced {
            if let Some(answer) = self.answer_since(ticket) {
                return Begin::Answer(answer);
            }
        }
        if need == Need::Refused && ticket.generation == self.generation {
            self.rejected = Some(ticket.generation);
        }
        if let Some(flight) = &mut self.flight {
            if need == Need::Forced && flight.generation != self.generation {
                flight.forced_at = Some(self.generation);
            }
            // A caller with nothing to fall back on (a refused token, a forced refresh) waits
            // for a background refresh: from now on it is a foreground one, its transient
            // failures retried with backoff and its outcome booked as a foreground refresh's
            // (attempts, cool-down). A request inside the leeway keeps the background
            // refresh's one attempt: after it fails, the still-valid token goes out.
            if need != Need::BeforeSend {
                flight.background = false;
            }
            return Begin::Join(flight.job.clone());
        }
        if need != Need::Forced {
            if let Some(c) = self.cooling_at(now) {
                return Begin::Answer(Err(Unavailable::Cooling(c)));
            }
        }
        Begin::Start
    }

    /// The id of the next flight.
    pub(crate) fn started_id(&mut self) -> u64 {
        self.flights += 1;
        self.flights
    }

    /// Records the start of a refresh.
    pub(crate) fn started(&mut self, job: J, background: bool, id: u64, inline: bool) {
        self.flight = Some(Flight {
            job,
            background,
            generation: self.generation,
            id,
            inline,
            forced_at: None,
        });
    }

    /// Whether a background refresh may start now.
    pub(crate) fn ahead_due(&self, now: Now, policy: Policy<'_>) -> bool {
        matches!(self.lookup(now, policy), Lookup::Usable { ahead: true, .. })
    }

    /// Stores a token: a new generation, every failure forgotten.
    pub(crate) fn store(&mut self, token: Token, now: Now) {
        self.generation += 1;
        self.rejected = None;
        self.session = Session::Active(Held::new(token, now.mono, now.wall));
        self.last_failure = None;
        self.cooling = None;
        self.failures = 0;
        self.ahead_failures = 0;
        self.ahead_not_before = None;
    }

    /// What the handle set, as the answer for a refresh it superseded.
    fn current(&self) -> Answer {
        match &self.session {
            Session::Active(held) => Ok(Fresh {
                ticket: self.ticket(),
                header: held.token.header_value().clone(),
            }),
            Session::Ended { cause: err, .. } => Err(Unavailable::Ended(err.clone())),
            Session::Empty { .. } => Err(Unavailable::Failed(Arc::new(RefreshError::transient(
                "the token refresh was abandoned before it finished",
            )))),
        }
    }

    /// Records the outcome of refresh `id`: the bookkeeping of a finished refresh. Returns
    /// the answer for its waiters and the events to emit, or, if the token was invalidated
    /// while it ran, that the same flight refreshes again.
    ///
    /// A refresh that is no longer the flight (its waiters gave up on it, and another may
    /// have started since) records nothing and leaves the flight alone.
    pub(crate) fn finish(
        &mut self,
        id: u64,
        result: Result<Token, RefreshError>,
        now: Now,
        cooldown: &Cooldown,
    ) -> Finished {
        let Some(flight) = self.flight.as_mut().filter(|f| f.id == id) else {
            return Finished::Done(self.current(), [None, None]);
        };
        if self.generation != flight.generation {
            if let Session::Empty { stale } = &mut self.session {
                // Invalidated while this refresh ran: a token it got predates the
                // invalidation, so the flight asks again for the new generation (still one
                // refresher call at a time). A token it got is handed on as the stale one:
                // with refresh-token rotation, it carries the only refresh token still valid.
                // Unless the handle installed a token since this call started (a login, then
                // the invalidation): the installed token is the stale one then, and this
                // call's result, from the chain before the login, is dropped.
                if let Ok(token) = result {
                    if self.handed <= flight.generation {
                        *stale = Some(token);
                    }
                }
                flight.generation = self.generation;
                flight.background = false;
                return Finished::Again {
                    generation: self.generation,
                    stale: stale.clone(),
                    reason: RefreshReason::NoToken,
                };
            }
            // The handle installed a token that was refused since (a request sent with it
            // joined this flight), or a forced refresh joined after the handle acted and
            // nothing newer came since: the token this refresh got is dropped (it comes from
            // the chain before the handle), and the flight asks again from what the handle
            // set, for its waiters.
            let refused = self.rejected == Some(self.generation);
            if refused || flight.forced_at == Some(self.generation) {
                flight.generation = self.generation;
                flight.background = false;
                flight.forced_at = None;
                let stale = match &self.session {
                    Session::Active(held) => Some(held.token.clone()),
                    Session::Empty { stale } | Session::Ended { stale, .. } => stale.clone(),
                };
                return Finished::Again {
                    generation: self.generation,
                    stale,
                    reason: if refused {
                        RefreshReason::Expired
                    } else {
                        RefreshReason::Forced
                    },
                };
            }
            // The handle installed or cleared a token while this refresh ran: what the handle
            // set wins, whether the refresh succeeded or failed (a failure of a superseded
            // refresh must not end the new session).
            let background = flight.background;
            self.flight = None;
            if !background {
                self.attempts += 1;
                self.last_failure = None;
            }
            return Finished::Done(self.current(), [None, None]);
        }
        let background = flight.background;
        self.flight = None;
        let (answer, events) = self.record(result, background, now, cooldown);
        Finished::Done(answer, events)
    }

    /// The bookkeeping of a refresh that finished for the generation it started at.
    fn record(
        &mut self,
        result: Result<Token, RefreshError>,
        background: bool,
        now: Now,
        cooldown: &Cooldown,
    ) -> (Answer, Emitted) {
        let result = result.and_then(|token| self.accept(token, now));
        match result {
            Ok(token) => {
                if !background {
                    self.attempts += 1;
                }
                self.store(token, now);
                let generation = self.generation;
                (
                    self.current(),
                    [Some(RefreshEvent::Refreshed { generation }), None],
                )
            }
            Err(err) if err.is_terminal() => {
                // Terminal, in the foreground or the background: the session ends at once and
                // nothing retries with the revoked credentials.
                let err = Arc::new(err);
                self.attempts += 1;
                self.last_failure = Some(err.clone());
                // A forced refresh of a session that had ended already (it may resume one):
                // its failure ends nothing new, and `SessionEnded` is sent once per end.
                let already_ended = matches!(self.session, Session::Ended { .. });
                let stale =
                    match std::mem::replace(&mut self.session, Session::Empty { stale: None }) {
                        Session::Active(held) => Some(held.token),
                        Session::Empty { stale } | Session::Ended { stale, .. } => stale,
                    };
                self.session = Session::Ended {
                    cause: err.clone(),
                    stale,
                };
                self.cooling = None;
                let generation = self.generation;
                (
                    Err(Unavailable::Rejected(err)),
                    [
                        Some(RefreshEvent::RefreshFailed {
                            generation,
                            terminal: true,
                        }),
                        (!already_ended).then_some(RefreshEvent::SessionEnded { generation }),
                    ],
                )
            }
            Err(err) if background => {
                // A token endpoint's `Retry-After` is a floor here too, as for the cool-down.
                let retry_after = err.retry_after();
                let err = Arc::new(err);
                self.ahead_failures = self.ahead_failures.saturating_add(1);
                let pause = cooldown.background(self.ahead_failures, retry_after);
                self.ahead_not_before = Some(after(now.mono, pause));
                let generation = self.generation;
                (
                    Err(Unavailable::Failed(err)),
                    [
                        Some(RefreshEvent::RefreshFailed {
                            generation,
                            terminal: false,
                        }),
                        None,
                    ],
                )
            }
            Err(err) => {
                let retry_after = err.retry_after();
                let err = Arc::new(err);
                self.attempts += 1;
                self.failures = self.failures.saturating_add(1);
                self.last_failure = Some(err.clone());
                let pause = cooldown.delay(self.failures, retry_after);
                self.cooling = (!pause.is_zero()).then(|| Cooling {
                    until: after(now.mono, pause),
                    error: err.clone(),
                    left: pause,
                });
                let generation = self.generation;
                (
                    Err(Unavailable::Failed(err)),
                    [
                        Some(RefreshEvent::RefreshFailed {
                            generation,
                            terminal: false,
                        }),
                        None,
                    ],
                )
            }
        }
    }

    /// A refresher's token, unless it is already expired while the cell holds a valid one
    /// (then it is a transient failure: the valid token stays).
    fn accept(&self, token: Token, now: Now) -> Result<Token, RefreshError> {
        let dead_on_arrival = match token.expiry() {
            Some(Expiry::In(life)) => life.is_zero(),
            Some(Expiry::At(at)) => at <= now.wall,
            None => false,
        };
        let holding_valid =
            matches!(&self.session, Session::Active(held) if !held.expired(now.mono, now.wall));
        if dead_on_arrival && holding_valid {
            return Err(RefreshError::transient(
                "the refresher returned an already expired token; keeping the current one",
            ));
        }
        Ok(token)
    }

    /// Installs a token through the handle (a login).
    pub(crate) fn install(&mut self, token: Token, now: Now) -> u64 {
        self.store(token, now);
        self.handed = self.generation;
        self.generation
    }

    /// Drops the token without ending the session: the next request refreshes. A refresh in
    /// flight calls the refresher again when it finishes (see [`finish`](Self::finish)).
    ///
    /// An ended session (a terminal failure, a logout) stays ended and nothing changes: only
    /// an install or a forced refresh resumes it. Returns the generation, and whether the
    /// token was dropped.
    pub(crate) fn invalidate(&mut self) -> (u64, bool) {
        if matches!(self.session, Session::Ended { .. }) {
            return (self.generation, false);
        }
        self.generation += 1;
        self.rejected = None;
        let stale = match std::mem::replace(&mut self.session, Session::Empty { stale: None }) {
            Session::Active(held) => Some(held.token),
            Session::Empty { stale } | Session::Ended { stale, .. } => stale,
        };
        self.session = Session::Empty { stale };
        // The cool-down and the failures in a row stay: dropping a token says nothing about
        // the token endpoint (only a new token, a success or a forced refresh ends a pause).
        self.last_failure = None;
        (self.generation, true)
    }

    /// Logs out: requests fail fast until a token is installed.
    pub(crate) fn clear(&mut self) -> u64 {
        self.generation += 1;
        self.rejected = None;
        self.session = Session::Ended {
            cause: Arc::new(RefreshError::terminal(crate::refresher::LoggedOut::new())),
            stale: None,
        };
        self.last_failure = None;
        self.cooling = None;
        self.failures = 0;
        self.handed = self.generation;
        self.generation
    }
}

#[cfg(test)]
mod tests;
