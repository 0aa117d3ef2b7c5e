//! Starting, joining and finishing a refresh.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::FutureExt;
use tracing::Instrument;

use super::attempt::{FlightSettings, attempt_all, has_runtime};
use super::state::{Begin, Finished, Flight, Need, Session, State, Ticket, Unavailable};
use super::{Answer, Job, TokenCell, now, policy};
use crate::config::RefreshOptions;
use crate::events::RefreshEvent;
use crate::refresher::{RefreshContext, RefreshError, RefreshReason};

fn reason_name(reason: &RefreshReason) -> &'static str {
    match reason {
        RefreshReason::NoToken => "no token",
        RefreshReason::Expired => "expired",
        RefreshReason::Unauthorized(_) => "unauthorized",
        RefreshReason::Forced => "forced",
        RefreshReason::Background => "background",
    }
}

impl TokenCell {
    /// A token newer than `ticket`: the one already there if the cell moved on (a late 401
    /// from a stale token), the result of the refresh in flight, or of a new refresh.
    ///
    /// A refresh that completed since the ticket was taken and failed is this caller's answer
    /// too, so a failure is shared by every waiter instead of being retried once per waiter.
    pub(crate) async fn fresher_than(
        self: &Arc<Self>,
        ticket: Ticket,
        need: Need,
        reason: RefreshReason,
        options: &RefreshOptions,
    ) -> Answer {
        self.wait_fresher_than(ticket, need, reason, options).await
    }

    /// [`fresher_than`](Self::fresher_than) as a future of its own, small and nameable: the
    /// decision (answer now, join, or start a refresh) is taken at once, and the future only
    /// waits. A request front end keeps it beside the request instead of boxing an `async`
    /// block (in a stampede every request holds one).
    pub(crate) fn wait_fresher_than(
        self: &Arc<Self>,
        ticket: Ticket,
        need: Need,
        reason: RefreshReason,
        options: &RefreshOptions,
    ) -> FreshWait {
        let shared = {
            let st = self.read();
            match st.begin_shared(ticket, need) {
                Some(Begin::Answer(answer)) => return FreshWait::Done(Some(answer)),
                Some(Begin::Join(job)) => Some((job, FlightKey::of(st.flight.as_ref()))),
                _ => None,
            }
        };
        // `key`: the flight this waiter joined (or started), the only one it may abandon.
        let (job, task, key) = if let Some((job, key)) = shared {
            (job, None, key)
        } else {
            let mut st = self.write();
            let (job, task) = match st.begin(ticket, need, options.clock.now()) {
                Begin::Answer(answer) => return FreshWait::Done(Some(answer)),
                Begin::Join(job) => (job, None),
                Begin::Start => self.start(&mut st, reason, options, false),
            };
            (job, task, FlightKey::of(st.flight.as_ref()))
        };
        let inline = key.is_some_and(|key| key.inline);
        if let Some(task) = task {
            task.spawn();
        }
        // One look at the current runtime (each clones and drops its handle).
        let current = tokio::runtime::Handle::try_current().ok().map(|h| h.id());
        let runs_here = job.runtime.is_some() && job.runtime == current;
        let waiting = Waiting {
            cell: self.clone(),
            job: Some(job),
            inline,
        };
        if current.is_none() || runs_here {
            // The refresh task runs on the runtime that drives this waiter, and its own
            // bound (the refresh timeout) ends it: no timer of its own (in a stampede every
            // request waits, and a timer each costs the runtime's timer wheel two updates).
            return FreshWait::Joined(waiting);
        }
        if !crate::head::timer_here() {
            // A runtime without its time driver cannot start the waiter's own timer (Tokio
            // panics at it): it waits as a waiter outside any runtime does, on the refresh's
            // own bound, kept by the runtime that has the task.
            return FreshWait::Joined(waiting);
        }
        // A waiter's own bound, beyond the refresh's: a refresh whose task sits on a runtime
        // that nobody drives any more delays its waiters but never wedges them.
        let bound = options
            .refresh_timeout
            .max(options.retries.total())
            .saturating_add(WAITER_MARGIN);
        let cell = self.clone();
        FreshWait::Bounded(Box::pin(async move {
            match tokio::time::timeout(bound, waiting).await {
                Ok(answer) => answer,
                Err(_) => {
                    // Only the flight it joined, and only if that has not called the
                    // refresher again since (its runtime is evidently driven then).
                    if let Some(key) = key {
                        cell.abandon_flight(key.id, Some(key.generation));
                    }
                    tracing::warn!(
                        bound_ms = bound.as_millis() as u64,
                        "gave up waiting for a token refresh that does not finish"
                    );
                    Err(Unavailable::Failed(Arc::new(RefreshError::transient(
                        "the token refresh did not finish in time",
                    ))))
                }
            }
        }))
    }

    /// Always calls the refresher, or joins the refresh already in flight. Ignores an ended
    /// session and a cool-down: the refresher may hold new credentials.
    pub(crate) async fn force_refresh(self: &Arc<Self>, options: &RefreshOptions) -> Answer {
        let ticket = self.ticket();
        self.fresher_than(ticket, Need::Forced, RefreshReason::Forced, options)
            .await
    }

    /// Starts one background refresh if it is due and none is in flight (refresh-ahead).
    pub(crate) fn refresh_ahead(self: &Arc<Self>, options: &RefreshOptions) {
        if !has_runtime() {
            return;
        }
        let task = {
            let mut st = self.write();
            if !st.ahead_due(now(options), policy(options)) {
                return;
            }
            self.start(&mut st, RefreshReason::Background, options, true)
                .1
        };
        if let Some(task) = task {
            task.spawn();
        }
    }

    /// Where a refresh task goes: the runtime the cell was made in (if it still runs), else
    /// the current one.
    fn spawn_target(&self) -> Option<tokio::runtime::Handle> {
        match &self.runtime {
            Some(handle) if !self.runtime_gone.load(Ordering::Relaxed) => Some(handle.clone()),
            _ => tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Clears the flight `id` (if it still calls the refresher for `generation`, when given):
    /// its task was dropped, or its waiters gave up on it. Another flight is left alone.
    fn abandon_flight(&self, id: u64, generation: Option<u64>) {
        let mut st = self.write();
        if st
            .flight
            .as_ref()
            .is_some_and(|f| f.id == id && generation.is_none_or(|g| f.generation == g))
        {
            st.flight = None;
        }
    }

    /// Builds the job of a new refresh and records it as the flight. Called under the lock.
    /// A background refresh stays one until a caller joins it (`State::begin`).
    fn start(
        self: &Arc<Self>,
        st: &mut State<Job>,
        reason: RefreshReason,
        options: &RefreshOptions,
        background: bool,
    ) -> (Job, Option<Task>) {
        let stale = match &st.session {
            Session::Active(held) => Some(held.token.clone()),
            Session::Empty { stale } | Session::Ended { stale, .. } => stale.clone(),
        };
        let settings = FlightSettings {
            retries: options.retries,
            cooldown: options.cooldown,
            timeout: options.refresh_timeout,
            clock: options.clock.clone(),
        };
        // After a failed refresh, one attempt per cool-down: retries are for blips. (A
        // background round makes one attempt while nobody waits for it; see `one_attempt`.)
        let single = st.failures > 0;
        let generation = st.generation;
        let span = tracing::debug_span!(
            "token_refresh",
            generation,
            background,
            reason = reason_name(&reason)
        );
        let ctx = RefreshContext::new(stale, reason);
        let cell = Arc::clone(self);
        let id = st.started_id();
        let work = async move {
            let started = settings.clock.now();
            let (mut generation, mut ctx, mut single) = (generation, ctx, single);
            // Whether this flight saw the token endpoint fail (see `failed` below), and
            // whether its current round is a background one.
            let (mut failing, mut in_background) = (false, background);
            let (answer, events, error) = loop {
                // A token installed (or a logout) between the decision and the start is the
                // answer: do not refresh it away (`finish` discards the outcome of a
                // superseded refresh; after an invalidation it asks for another round).
                let superseded = cell.read().generation != generation;
                let result = if superseded {
                    Err(RefreshError::transient("superseded before it started"))
                } else {
                    tracing::debug!(generation, "token refresh started");
                    // The handle installed or cleared a token since this round started: its
                    // answer is discarded, so its retries are not made. (After an invalidation
                    // they are: a token they get is the next round's stale one.)
                    let handed_since = |at: u64| {
                        let cell = Arc::clone(&cell);
                        move || cell.read().handed > at
                    };
                    let superseded = handed_since(generation);
                    // One attempt while nobody waits for a background round; retries once a
                    // caller joined it (`State::begin` makes the flight a foreground one).
                    let one_attempt = {
                        let cell = Arc::clone(&cell);
                        move || single || (in_background && unjoined(&cell, id))
                    };
                    attempt_all(&*cell.refresher, ctx, &settings, &one_attempt, &superseded).await
                };
                // A caller joined this background round: it counts as a foreground one.
                in_background = in_background && unjoined(&cell, id);
                let error = result.as_ref().err().map(ToString::to_string);
                // The refresher was called in the foreground and failed transiently: the token
                // endpoint is failing, whatever happened to the token meanwhile. (A terminal
                // answer is about the credentials, not the endpoint; a background round's one
                // attempt does not count as a failure in a row either.)
                failing |= !superseded
                    && !in_background
                    && result.as_ref().is_err_and(|e| !e.is_terminal());
                let reading = super::state::Now {
                    mono: settings.clock.now(),
                    wall: settings.clock.wall(),
                };
                // The write lock ends with this statement (a guard in the `match` would be
                // held through its arms).
                let finished = cell.write().finish(id, result, reading, &settings.cooldown);
                match finished {
                    Finished::Done(answer, events) => break (answer, events, error),
                    Finished::Again {
                        generation: now_at,
                        stale,
                        reason,
                    } => {
                        tracing::debug!(
                            generation = now_at,
                            "the token changed during the refresh and its answer is not the one \
                             waited for; refreshing again"
                        );
                        generation = now_at;
                        ctx = RefreshContext::new(stale, reason);
                        // Retries only while the token endpoint is not known to be failing:
                        // an invalidation keeps the failures in a row, and this flight's own
                        // failures count too (a single attempt, as after any failure).
                        in_background = false;
                        single = failing || cell.read().failures > 0;
                    }
                }
            };
            let elapsed_ms = settings
                .clock
                .now()
                .saturating_duration_since(started)
                .as_millis() as u64;
            match (&answer, error) {
                (Ok(fresh), _) => tracing::debug!(
                    generation = fresh.ticket.generation,
                    elapsed_ms,
                    background,
                    "token refresh succeeded"
                ),
                (Err(_), Some(error)) => {
                    tracing::warn!(elapsed_ms, background, %error, "token refresh failed")
                }
                (Err(_), None) => tracing::debug!(
                    elapsed_ms,
                    "token refresh result discarded: the token was replaced meanwhile"
                ),
            }
            for event in events.into_iter().flatten() {
                if let RefreshEvent::SessionEnded { generation } = event {
                    tracing::warn!(
                        generation,
                        "session ended: install new credentials to resume"
                    );
                }
                cell.emit(event);
            }
            answer
        }
        .instrument(span)
        .boxed();
        match self.spawn_target() {
            Some(runtime) => {
                // The refresh runs as a task of its own and survives the cancellation of every
                // waiter; the waiters only wait for its answer.
                let (tx, rx) = tokio::sync::oneshot::channel();
                let guard = TaskGuard {
                    cell: Arc::clone(self),
                    id,
                    finished: false,
                };
                let task = async move {
                    // Moved in whole (not just the field), so it lives as long as the task.
                    let mut guard = guard;
                    let answer = work.await;
                    guard.finished = true;
                    let _ = tx.send(answer);
                };
                let runtime_id = runtime.id();
                let answer = rx
                    .map(|answer| {
                        answer.unwrap_or_else(|_| {
                            Err(Unavailable::Failed(Arc::new(RefreshError::transient(
                                "the token refresh task was dropped before it finished",
                            ))))
                        })
                    })
                    .boxed()
                    .shared();
                let job = Job {
                    answer,
                    runtime: Some(runtime_id),
                };
                st.started(job.clone(), background, id, false);
                (
                    job,
                    Some(Task {
                        runtime,
                        cell: Arc::clone(self),
                        fut: Box::pin(task),
                    }),
                )
            }
            None => {
                // No runtime: the waiters drive the refresh themselves.
                let job = Job {
                    answer: work.shared(),
                    runtime: None,
                };
                st.started(job.clone(), background, id, true);
                (job, None)
            }
        }
    }
}

/// The flight a waiter joined: its id and the generation it refreshes for then.
#[derive(Clone, Copy)]
struct FlightKey {
    id: u64,
    generation: u64,
    inline: bool,
}

impl FlightKey {
    /// The key of the flight a waiter just joined or started (always there: read under the
    /// lock that joined or started it).
    fn of(flight: Option<&Flight<Job>>) -> Option<Self> {
        flight.map(|flight| Self {
            id: flight.id,
            generation: flight.generation,
            inline: flight.inline,
        })
    }
}

/// How long a waiter waits beyond the refresh's own bound before it gives up.
const WAITER_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The wait of [`TokenCell::wait_fresher_than`].
pub(crate) enum FreshWait {
    /// Answered at once (`None` once it was taken).
    Done(Option<Answer>),
    /// Joined a refresh that the runtime driving this waiter runs (or the waiters drive).
    Joined(Waiting),
    /// Joined a refresh on another runtime: bounded by a timer of its own (rare: boxed).
    Bounded(std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'static>>),
}

impl std::future::Future for FreshWait {
    type Output = Answer;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Answer> {
        // Every variant is `Unpin`.
        match self.get_mut() {
            Self::Done(answer) => {
                std::task::Poll::Ready(answer.take().expect("polled after completion"))
            }
            Self::Joined(waiting) => std::pin::Pin::new(waiting).poll(cx),
            Self::Bounded(fut) => fut.as_mut().poll(cx),
        }
    }
}

type TaskFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// A refresh task, spawned once the cell's lock is released.
pub(crate) struct Task {
    runtime: tokio::runtime::Handle,
    cell: Arc<TokenCell>,
    fut: TaskFuture,
}

impl Task {
    /// Spawns the refresh on the cell's runtime. A runtime that has shut down drops a new
    /// task at once, unpolled, and hands it back: it then runs on the current runtime (as
    /// every later refresh of the cell), so the request that started it does not fail for it.
    fn spawn(self) {
        let back = Arc::new(std::sync::Mutex::new(None));
        drop(self.runtime.spawn(HandBack {
            fut: Some(self.fut),
            polled: false,
            back: Arc::clone(&back),
        }));
        let returned = back
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(fut) = returned {
            self.cell.runtime_gone.store(true, Ordering::Relaxed);
            match tokio::runtime::Handle::try_current() {
                Ok(current) => drop(current.spawn(fut)),
                // Nowhere to run it: dropped, its guard clears the flight.
                Err(_) => drop(fut),
            }
        }
    }
}

/// A task's future that, dropped before its first poll, hands itself back instead of being
/// lost (see [`Task::spawn`]).
struct HandBack {
    fut: Option<TaskFuture>,
    polled: bool,
    back: Arc<std::sync::Mutex<Option<TaskFuture>>>,
}

impl std::future::Future for HandBack {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.polled = true;
        let fut = self.fut.as_mut().expect("polled after completion");
        std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        std::task::Poll::Ready(())
    }
}

impl Drop for HandBack {
    fn drop(&mut self) {
        if self.polled {
            return;
        }
        // Nobody takes it when the runtime shut down after the spawn: dropped with the last
        // `back`, and its guard clears the flight as before.
        let fut = self.fut.take();
        *self
            .back
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fut;
    }
}

/// Clears the flight if its task is dropped before it answers (its runtime shut down), and
/// stops sending later refreshes to that runtime.
struct TaskGuard {
    cell: Arc<TokenCell>,
    id: u64,
    finished: bool,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if !self.finished {
            // Unwinding: the task panicked, its runtime is not gone.
            if !std::thread::panicking() {
                self.cell.runtime_gone.store(true, Ordering::Relaxed);
            }
            self.cell.abandon_flight(self.id, None);
        }
    }
}

/// A waiter on a refresh: polls the shared job (its answer, or, without a runtime, the
/// refresh itself).
///
/// Without a runtime, if it is dropped as the last one driving the refresh, the refresh is
/// cancelled and the flight cleared, so that the next request starts a new one instead of
/// waiting on a refresh nobody polls.
pub(crate) struct Waiting {
    cell: Arc<TokenCell>,
    job: Option<Job>,
    inline: bool,
}

impl std::future::Future for Waiting {
    type Output = Answer;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Answer> {
        let job = self.job.as_mut().expect("polled after completion");
        let answer = std::task::ready!(std::pin::Pin::new(&mut job.answer).poll(cx));
        self.job = None;
        std::task::Poll::Ready(answer)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        if !self.inline || job.answer.peek().is_some() {
            return;
        }
        let mut st = self.cell.write();
        let ours = st
            .flight
            .as_ref()
            .is_some_and(|f| futures_util::future::Shared::ptr_eq(&f.job.answer, &job.answer));
        // The state's clone and this one: nobody else will ever poll it.
        if ours && job.answer.strong_count() == Some(2) {
            st.flight = None;
            drop(st);
            tracing::debug!("token refresh cancelled: its last driver was dropped");
        }
    }
}

/// Whether the background flight `id` still runs with nobody waiting for it: no caller joined
/// it (which makes it a foreground one), and it was not abandoned or replaced.
fn unjoined(cell: &TokenCell, id: u64) -> bool {
    cell.read()
        .flight
        .as_ref()
        .is_none_or(|f| f.id != id || f.background)
}
