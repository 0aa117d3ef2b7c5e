//! Systematic interleaving tests of the single-flight cell.
//!
//! loom and shuttle cannot see inside tokio and async-lock, so this file brings its own
//! seeded random-order executor: the participants of a schedule (requests to an API that
//! answers 401 to revoked tokens, forced refreshes, installs, revocations and logouts through
//! the handle) are boxed futures; each step polls one future that was woken, chosen by the
//! seed, with a waker that only sets that future's flag, and futures are dropped at random
//! points. The refresher yields, succeeds, fails transiently or terminally, returns an
//! invalid token or panics (inside its future or before returning one), as the seed says.
//! Two schedules in three run on a paused current-thread tokio runtime (the refresh is a task
//! of its own; the executor yields to the runtime at random points and lets paused time jump
//! when everything waits), the others without a runtime (the refresh runs inside the waiting
//! request, so dropping that request cancels it).
//!
//! Invariants checked on every schedule:
//! - no lost wake-up: only woken futures are polled, so a schedule in which unfinished futures
//!   are never woken again is a hang; all non-dropped futures finish within a step bound;
//! - single flight: never two refresher calls at once; one successful refresh per token;
//! - every refresher call is needed: its stale token was rejected by the API, is due, or a
//!   forced refresh asked for that generation; after a failed refresh of a token, only a new
//!   request (or a send with that token) may ask again: the failure is every waiter's answer;
//! - every waiter gets its generation's result: a typed error whose refresh failure finished
//!   after the waiter started, the same `Arc` for every waiter of one failure; `SessionEnded`
//!   only after a terminal failure or a logout, never from a refresh that an install
//!   superseded; `UnauthorizedAfterRefresh` only when tokens were revoked;
//! - no request reaches the API more than twice, and bodies arrive intact;
//! - no request is sent with a token the cell already knows is rejected: once a refresh for a
//!   401 with a token has started, no request that starts later carries that token;
//! - no panic escapes the layer, and none is raised inside it but the refresher's own;
//! - cancelling any subset never wedges the cell: afterwards `refreshing()` is false and a
//!   fresh request completes with 200.
//!
//! Failures are grouped by invariant with the first failing seed; `INTERLEAVING_SEED=<seed>`
//! replays one schedule and prints its trace, `INTERLEAVING_SCHEDULES=<n>` explores more,
//! `INTERLEAVING_VERBOSE=1` prints every failing seed. The tests at the end pin down, one by
//! one, the schedules the explorer found.

mod support;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_auth_refresh::RefreshContext;
use tower_auth_refresh::error::{
    RefreshFailed, RefreshRejected, SessionEnded, UnauthorizedAfterRefresh,
};
use tower_auth_refresh::{
    Backoff, BoxError, Cooldown, Events, RefreshError, RefreshEvent, RefreshLayer, ReplayBody,
    Token, TokenHandle, TokenRefresher,
};

use support::{
    InMemoryApi, PANIC_MARKER, Rng, authorization, get, panic_message, run_paused,
    silence_deliberate_panics_and,
};

const DEFAULT_SCHEDULES: u64 = 10_000;
const MAX_STEPS: usize = 20_000;

thread_local! {
    /// Set while this thread explores schedules: panics are recorded instead of printed.
    static EXPLORING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Panics other than the deliberate ones, raised (and maybe caught) while exploring.
    static UNEXPECTED_PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// While this thread explores schedules, records a panic other than the deliberate ones (even
/// one the layer catches) instead of printing it, so a schedule can report it.
fn record_while_exploring(info: &PanicHookInfo<'_>, message: &str) -> bool {
    if !EXPLORING.with(std::cell::Cell::get) {
        return false;
    }
    let at = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    UNEXPECTED_PANICS.with(|p| p.borrow_mut().push(format!("{message} at {at}")));
    true
}

/// The generator of a seed (splitmix64): the whole schedule follows from the seed.
fn seeded(seed: u64) -> Rng {
    Rng::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
}

// ---------------------------------------------------------------------------------------------
// The world the participants share: the API's valid tokens and the refresher's bookkeeping.

#[derive(Default)]
struct World {
    /// Tokens the API accepts.
    valid: HashSet<String>,
    /// The most recently issued or installed token.
    latest: Option<String>,
    issued: u64,
    /// Refresher calls in flight (must never exceed 1).
    in_flight: usize,
    calls: usize,
    /// Refresher calls that have finished, in order.
    completions: usize,
    completion_of_call: HashMap<usize, usize>,
    /// Successful refresher calls per stale token: one refresh per generation.
    successes_by_stale: HashMap<String, usize>,
    successes_without_token: usize,
    successes: usize,
    failures: usize,
    terminal_failures: usize,
    panics: usize,
    /// Completion index of each refresher panic.
    panic_completions: Vec<usize>,
    revokes: usize,
    clears: usize,
    installs: usize,
    /// Sends per request id, as the API saw them.
    sends: HashMap<u64, usize>,
    violations: Vec<String>,
    plan: Option<Rng>,
    /// Whether refreshed tokens get a lifetime (only on the paused runtime).
    lifetimes: bool,
    /// The layer's leeway and refresh-ahead window, to know when a token is due.
    leeway: Duration,
    ahead: Option<Duration>,
    /// When each token with a lifetime becomes due for a refresh (ahead or not).
    due_at: HashMap<String, tokio::time::Instant>,
    /// Tokens the API answered 401 to.
    rejected: HashSet<String>,
    /// Generations a forced refresh started at.
    forced_generations: HashSet<u64>,
    /// Stale tokens whose refresh was justified when first asked for.
    justified: HashSet<String>,
    handle: Option<TokenHandle>,
    /// What happened, in order (printed for a replayed seed); indexes order the events.
    trace: Vec<String>,
    /// The trace index of each refresher call's start and end.
    call_span: HashMap<usize, (usize, usize)>,
    /// The trace index of each install through the handle.
    install_events: Vec<usize>,
    /// The trace index of each request start and forced refresh start: a new demand for a
    /// token (so is a send of the token after the failure: that request's view of the cell
    /// includes the failure).
    demand_events: Vec<usize>,
    /// Trace indexes at which the API received each token.
    sends_of: HashMap<String, Vec<usize>>,
    /// The layer's events, read at each refresher call.
    events: Option<Events>,
    /// The stale token and trace index of the last refresher call that ended.
    last_end: Option<(String, usize)>,
    /// For each stale token, the trace index where the last failed refresh of it ended.
    failed_runs: HashMap<String, usize>,
    /// After the explored schedule: the refresher always succeeds.
    final_phase: bool,
    /// The trace index at which each request started.
    start_of: HashMap<u64, usize>,
    /// The token of each request's first send, and whether the API accepted it.
    first_send: HashMap<u64, (String, bool)>,
    /// Tokens the cell is known to have seen refused: a refresh for a 401 with it started (or
    /// a request refused with it was replayed with a newer one). The trace index of that.
    known_rejected: HashMap<String, usize>,
    /// The layer runs with a refresh cool-down (1 s doubling to 2 s).
    cooling: bool,
}

type Shared = Arc<Mutex<World>>;

fn lock(world: &Shared) -> MutexGuard<'_, World> {
    world
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl World {
    fn issue(&mut self, lifetime: Option<Duration>) -> Token {
        self.issued += 1;
        let secret = format!("tok-{}", self.issued);
        self.valid.insert(secret.clone());
        self.latest = Some(secret.clone());
        let token = Token::bearer(secret.clone()).unwrap();
        let now = tokio::time::Instant::now();
        self.trace.push(format!(
            "issued {secret} with lifetime {lifetime:?} at {now:?}"
        ));
        match lifetime {
            Some(life) => {
                // The cell's arithmetic: leeway at most a tenth of the lifetime, the ahead
                // window at most half of it and at least the leeway.
                let leeway = self.leeway.min(life / 10);
                let early = self
                    .ahead
                    .map_or(leeway, |ahead| ahead.min(life / 2).max(leeway));
                self.due_at
                    .insert(secret, tokio::time::Instant::now() + (life - early));
                token.with_expires_in(life)
            }
            None => token,
        }
    }

    /// A refresh of `stale` is needed only if the API rejected it, it is due, the layer has
    /// no token, or a forced refresh asked for this generation.
    fn needed(&mut self, stale: Option<&str>, generation: u64) -> bool {
        let Some(stale) = stale else {
            return true;
        };
        let now = tokio::time::Instant::now();
        let needed = self.justified.contains(stale)
            || self.rejected.contains(stale)
            || self.due_at.get(stale).is_some_and(|due| now >= *due)
            || self.forced_generations.contains(&generation);
        if needed {
            self.justified.insert(stale.to_owned());
        }
        needed
    }

    fn lifetime(&mut self, rng: &mut Rng) -> Option<Duration> {
        if !self.lifetimes {
            return None;
        }
        [
            None,
            Some(Duration::from_secs(3)),
            Some(Duration::from_secs(20)),
        ][rng.index(3)]
    }
}

/// The failure a refresher call produced; the call id lets a waiter's error be traced back
/// to the call that caused it.
#[derive(Debug)]
struct Fail {
    call: usize,
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refresher call {} failed", self.call)
    }
}

impl std::error::Error for Fail {}

#[derive(Clone, Copy, Debug)]
enum Plan {
    Succeed,
    Transient,
    Terminal,
    InvalidToken,
    PanicInFuture,
    PanicBeforeFuture,
}

/// Decrements the in-flight count however the refresher's future ends (completed, dropped).
struct InFlight(Shared);

impl InFlight {
    fn enter(world: &Shared, call: usize) -> Self {
        let mut w = lock(world);
        w.in_flight += 1;
        if w.in_flight > 1 {
            w.violations.push(format!(
                "single-flight: refresher call {call} started while another was in flight"
            ));
        }
        Self(world.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.0).in_flight -= 1;
    }
}

#[derive(Clone)]
struct Refresher(Shared);

impl TokenRefresher for Refresher {
    type Future = Pin<Box<dyn Future<Output = Result<Token, RefreshError>> + Send>>;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let refused = matches!(
            ctx.reason(),
            tower_auth_refresh::RefreshReason::Unauthorized(_)
        );
        let stale = ctx.into_stale();
        let world = self.0.clone();
        let handle = lock(&world).handle.clone().expect("handle");
        let generation = handle.state().generation();
        let (call, plan, yields) = {
            let mut w = lock(&world);
            w.calls += 1;
            let call = w.calls;
            let secret = stale.as_ref().map(|t| t.secret().to_owned());
            let stale_secret = secret.clone();
            // Which refresh runs failed since the last call (a run ends with its last call).
            while let Some(received) = w.events.as_mut().and_then(Events::try_recv) {
                w.trace.push(format!("event: {received:?}"));
                if let Ok(RefreshEvent::RefreshFailed { .. }) = received {
                    if let Some((stale, at)) = w.last_end.clone() {
                        w.failed_runs.insert(stale, at);
                    }
                }
            }
            w.trace.push(format!(
                "refresher call {call}: stale {secret:?}, generation {generation}"
            ));
            let started = w.trace.len();
            w.call_span.insert(call, (started, started));
            if let (true, Some(s)) = (refused, secret.clone()) {
                // From here the cell knows this token was refused.
                w.known_rejected.entry(s).or_insert(started);
            }
            // A failure is every waiter's answer: after a run for this token failed, only a
            // new request or forced refresh may ask the refresher again.
            let key = secret.clone().unwrap_or_default();
            if let (None, Some(&failed)) = (w.ahead, w.failed_runs.get(&key)) {
                let after = |d: &usize| failed < *d && *d < started;
                let sent_since = w.sends_of.get(&key).is_some_and(|s| s.iter().any(after));
                if !sent_since && !w.demand_events.iter().any(after) {
                    w.violations.push(format!(
                        "failure not shared: refresher call {call} refreshed {secret:?} again \
                         after a failed refresh of it, with no new request or send since"
                    ));
                }
            }
            if !w.needed(secret.as_deref(), generation) {
                w.violations.push(format!(
                    "unneeded refresh: call {call} refreshed {secret:?} (generation \
                     {generation}), which the API never rejected, was not due, and no forced \
                     refresh asked for"
                ));
            }
            let mut rng = w.plan.take().expect("plan");
            let plan = if w.final_phase {
                Plan::Succeed
            } else {
                match rng.below(100) {
                    0..=59 => Plan::Succeed,
                    60..=74 => Plan::Transient,
                    75..=81 => Plan::Terminal,
                    82..=89 => Plan::InvalidToken,
                    90..=94 => Plan::PanicInFuture,
                    _ => Plan::PanicBeforeFuture,
                }
            };
            let yields = rng.below(4);
            w.plan = Some(rng);
            if let Plan::PanicBeforeFuture = plan {
                w.completions += 1;
                let done = w.completions;
                w.completion_of_call.insert(call, done);
                w.panics += 1;
                w.panic_completions.push(done);
                let ended = w.trace.len();
                w.last_end = Some((stale_secret.unwrap_or_default(), ended));
                drop(w);
                panic!("{PANIC_MARKER} (before the future, call {call})");
            }
            (call, plan, yields)
        };
        let stale = stale.map(|t| t.secret().to_owned());
        Box::pin(async move {
            let _in_flight = InFlight::enter(&world, call);
            yield_times(yields).await;
            let mut w = lock(&world);
            w.completions += 1;
            let done = w.completions;
            w.completion_of_call.insert(call, done);
            w.trace
                .push(format!("refresher call {call} ends: {plan:?}"));
            let ended = w.trace.len();
            w.call_span.entry(call).or_default().1 = ended;
            w.last_end = Some((stale.clone().unwrap_or_default(), ended));
            match plan {
                Plan::Succeed => {
                    w.successes += 1;
                    match &stale {
                        Some(s) => {
                            let n = {
                                let n = w.successes_by_stale.entry(s.clone()).or_default();
                                *n += 1;
                                *n
                            };
                            if n > 1 {
                                w.violations.push(format!(
                                    "one refresh per generation: token {s} was refreshed {n} times"
                                ));
                            }
                        }
                        None => w.successes_without_token += 1,
                    }
                    let mut rng = w.plan.take().expect("plan");
                    let lifetime = w.lifetime(&mut rng);
                    w.plan = Some(rng);
                    Ok(w.issue(lifetime))
                }
                Plan::Transient => {
                    w.failures += 1;
                    Err(RefreshError::transient(Fail { call })
                        .with_retry_after(Duration::from_millis(100)))
                }
                Plan::Terminal => {
                    w.failures += 1;
                    w.terminal_failures += 1;
                    Err(RefreshError::terminal(Fail { call }))
                }
                Plan::InvalidToken => {
                    w.failures += 1;
                    let invalid = Token::bearer("not a token\r\n").unwrap_err();
                    Err(RefreshError::from(invalid))
                }
                Plan::PanicInFuture | Plan::PanicBeforeFuture => {
                    w.panics += 1;
                    w.panic_completions.push(done);
                    drop(w);
                    panic!("{PANIC_MARKER} (in the future, call {call})");
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Yield points that work with or without a runtime.

struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

async fn yield_times(n: u64) {
    for _ in 0..n {
        YieldNow(false).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The API: accepts the valid tokens, counts sends per request id, yields as the seed says.

type Body = Full<Bytes>;

fn api(world: Shared, server_rng: Arc<Mutex<Rng>>) -> impl InMemoryApi<String> {
    service_fn(move |req: Request<ReplayBody<Body>>| {
        let world = world.clone();
        let yields = server_rng.lock().unwrap().below(3);
        async move {
            let id: u64 = req.headers()["x-id"].to_str().unwrap().parse().unwrap();
            let auth = req
                .headers()
                .get(AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_owned());
            let (_, body) = req.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            yield_times(yields).await;
            let mut w = lock(&world);
            *w.sends.entry(id).or_default() += 1;
            let expected = format!("payload-{id}");
            if !bytes.is_empty() && bytes != expected.as_bytes() {
                w.violations
                    .push(format!("body of request {id} arrived as {bytes:?}"));
            }
            let secret = auth.as_deref().and_then(|a| a.strip_prefix("Bearer "));
            let ok = secret.is_some_and(|s| w.valid.contains(s));
            w.trace
                .push(format!("API: request {id} with {secret:?}: ok {ok}"));
            if let Some(s) = secret {
                // A send with a token: the request knew the cell's state up to now.
                let at = w.trace.len();
                w.sends_of.entry(s.to_owned()).or_default().push(at);
                match w.first_send.get(&id).cloned() {
                    None => {
                        // No request sends a token the cell already knew was refused: one
                        // that started after the replay with a newer token never carries it.
                        let started = w.start_of.get(&id).copied();
                        if let (Some(known), Some(started)) =
                            (w.known_rejected.get(s).copied(), started)
                        {
                            if started > known {
                                w.violations.push(format!(
                                    "sent with a token known to be rejected: request {id} started after a refresh for a 401 with {s} began"
                                ));
                            }
                        }
                        w.first_send.insert(id, (s.to_owned(), ok));
                    }
                    Some((first, false)) if first != s => {
                        w.known_rejected.entry(first).or_insert(at);
                    }
                    Some(_) => {}
                }
            }
            if let (false, Some(s)) = (ok, secret) {
                w.rejected.insert(s.to_owned());
            }
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            Ok(Response::builder()
                .status(status)
                .body(String::new())
                .unwrap())
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The executor.

#[derive(Default)]
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

struct Slot {
    name: String,
    fut: Option<LocalFuture>,
    flag: Arc<Flag>,
    waker: Waker,
    cancellable: bool,
    cancelled: bool,
}

impl Slot {
    fn new(name: String, fut: impl Future<Output = ()> + 'static, cancellable: bool) -> Self {
        let flag = Arc::new(Flag(AtomicBool::new(true)));
        Self {
            name,
            fut: Some(Box::pin(fut)),
            waker: Waker::from(flag.clone()),
            flag,
            cancellable,
            cancelled: false,
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Tally {
    schedules: u64,
    with_runtime: u64,
    steps: u64,
    polls: u64,
    drops: u64,
    runtime_yields: u64,
    refresher_calls: u64,
    refreshes: u64,
    failures: u64,
    panics: u64,
    installs: u64,
    revokes: u64,
    clears: u64,
    requests: u64,
    ok: u64,
    errors: u64,
    forced: u64,
}

/// Polls woken futures in the seed's order until all are done or dropped. `Err` on a hang
/// (unfinished futures, none woken, nothing left for the runtime to do) or the step bound.
async fn drive(
    slots: &mut [Slot],
    rng: &mut Rng,
    runtime: bool,
    drop_per_mille: u64,
    tally: &mut Tally,
) -> Result<(), String> {
    let mut idle_rounds = 0;
    for _ in 0..MAX_STEPS {
        tally.steps += 1;
        let unfinished: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].fut.is_some())
            .collect();
        if unfinished.is_empty() {
            return Ok(());
        }
        if drop_per_mille > 0 && rng.below(1000) < drop_per_mille {
            let cancellable: Vec<usize> = unfinished
                .iter()
                .copied()
                .filter(|&i| slots[i].cancellable)
                .collect();
            if !cancellable.is_empty() {
                let victim = cancellable[rng.index(cancellable.len())];
                slots[victim].fut = None;
                slots[victim].cancelled = true;
                tally.drops += 1;
                continue;
            }
        }
        let woken: Vec<usize> = unfinished
            .iter()
            .copied()
            .filter(|&i| slots[i].flag.0.load(Ordering::SeqCst))
            .collect();
        if runtime && (woken.is_empty() || rng.chance(1, 4)) {
            // Let the runtime run the refresh task (and fire timers when everything waits).
            tally.runtime_yields += 1;
            if woken.is_empty() {
                idle_rounds += 1;
                if idle_rounds > 2 {
                    // Everything waits: let paused time jump to the next timer.
                    tokio::time::sleep(Duration::from_millis(1 + rng.below(500))).await;
                } else {
                    tokio::task::yield_now().await;
                }
                if idle_rounds > 200 {
                    break;
                }
            } else {
                tokio::task::yield_now().await;
            }
            continue;
        }
        if woken.is_empty() {
            break;
        }
        idle_rounds = 0;
        let i = woken[rng.index(woken.len())];
        let slot = &mut slots[i];
        slot.flag.0.store(false, Ordering::SeqCst);
        let mut cx = Context::from_waker(&slot.waker);
        tally.polls += 1;
        if slot
            .fut
            .as_mut()
            .expect("unfinished")
            .as_mut()
            .poll(&mut cx)
            .is_ready()
        {
            slot.fut = None;
        }
    }
    let stuck: Vec<&str> = slots
        .iter()
        .filter(|s| s.fut.is_some())
        .map(|s| s.name.as_str())
        .collect();
    Err(format!(
        "hang: no lost wake-up allowed, yet these never completed: {stuck:?}"
    ))
}

// ---------------------------------------------------------------------------------------------
// One schedule.

enum Record {
    Request {
        id: u64,
        start: usize,
        result: Result<StatusCode, BoxError>,
    },
    Force {
        start: usize,
        result: Result<(), BoxError>,
    },
}

fn get_or_post(id: u64, post: bool) -> Request<Body> {
    let builder = Request::builder()
        .uri(format!("/item/{id}"))
        .header("x-id", id.to_string());
    if post {
        builder
            .method("POST")
            .body(Full::from(format!("payload-{id}")))
            .unwrap()
    } else {
        builder.body(Full::default()).unwrap()
    }
}

/// The id of the refresher call behind a failure, if it was one of the refresher's own.
fn failed_call(err: &RefreshError) -> Option<usize> {
    std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<Fail>())
        .map(|f| f.call)
}

/// Checks an error a participant got; `start` is the number of finished refresher calls when
/// it started.
fn check_error(err: &BoxError, start: usize, w: &World, who: &str) -> Result<(), String> {
    if let Some(e) = err.downcast_ref::<RefreshFailed>() {
        if e.next_attempt_in().is_some() {
            // Failed fast inside the cool-down of an earlier failure: that failure is the
            // answer, by design.
            return if w.cooling {
                Ok(())
            } else {
                Err(format!(
                    "{who} failed fast in a cool-down the layer does not have"
                ))
            };
        }
    }
    let refresh_error = if let Some(e) = err.downcast_ref::<RefreshFailed>() {
        Some(e.refresh_error())
    } else if let Some(e) = err.downcast_ref::<RefreshRejected>() {
        if !e.refresh_error().is_terminal() {
            return Err(format!(
                "typed errors: {who} got a non-terminal RefreshRejected"
            ));
        }
        Some(e.refresh_error())
    } else if let Some(e) = err.downcast_ref::<SessionEnded>() {
        if w.terminal_failures + w.clears == 0 {
            return Err(format!(
                "typed errors: {who} got SessionEnded with no terminal failure or logout"
            ));
        }
        if !e.cause().is_terminal() {
            return Err(format!(
                "typed errors: {who}'s SessionEnded has a transient cause"
            ));
        }
        if let Some(call) = failed_call(e.cause()) {
            let (started, ended) = w.call_span.get(&call).copied().unwrap_or_default();
            if w.install_events.iter().any(|&i| started < i && i < ended) {
                return Err(format!(
                    "install lost: {who} got SessionEnded from refresher call {call}, which \
                     was already running when a token was installed through the handle"
                ));
            }
        }
        None
    } else if err.is::<UnauthorizedAfterRefresh>() {
        if w.revokes == 0 {
            return Err(format!(
                "typed errors: {who} got UnauthorizedAfterRefresh with no token revoked"
            ));
        }
        None
    } else {
        return Err(format!("typed errors: {who} got an untyped error: {err}"));
    };
    if let Some(e) = refresh_error {
        let cause = std::error::Error::source(&**e).map(ToString::to_string);
        if cause.as_deref() == Some("the token refresher panicked")
            && !w.panic_completions.iter().any(|&done| done > start)
        {
            // Either the layer itself panicked (see the unexpected panics), or this is the
            // answer of a refresh that failed before the caller started.
            let kind = if UNEXPECTED_PANICS.with(|p| p.borrow().is_empty()) {
                "stale failure"
            } else {
                "misreported failure"
            };
            return Err(format!(
                "{kind}: {who} was told the refresher panicked, but no refresher call panicked \
                 after it started"
            ));
        }
        if let Some(call) = failed_call(e) {
            let done = w.completion_of_call.get(&call).copied().unwrap_or(0);
            if done <= start {
                return Err(format!(
                    "stale failure: {who} got the failure of refresher call {call}, which \
                     finished before it started (finished #{done}, start after #{start})"
                ));
            }
        }
    }
    Ok(())
}

async fn schedule(seed: u64, runtime: bool, tally: &mut Tally) -> Result<(), String> {
    let mut rng = seeded(seed);
    let ahead = (runtime && rng.chance(1, 3)).then_some(Duration::from_secs(5));
    // A third of the runtime schedules run with a cool-down after failed refreshes.
    let cooling = runtime && rng.chance(1, 3);
    let world: Shared = Arc::new(Mutex::new(World {
        plan: Some(seeded(rng.next())),
        lifetimes: runtime,
        leeway: Duration::from_secs(1),
        ahead,
        cooling,
        ..World::default()
    }));
    let server_rng = Arc::new(Mutex::new(seeded(rng.next())));

    let retry = if rng.chance(1, 2) {
        Backoff::none()
    } else {
        Backoff::default()
            .max_attempts(3)
            .base_delay(Duration::ZERO)
            .max_elapsed(Duration::from_secs(60))
    };
    let mut layer = RefreshLayer::new(Refresher(world.clone()))
        .retries(retry)
        .cooldown(if cooling {
            Cooldown::new(Duration::from_secs(1), Duration::from_secs(2))
        } else {
            Cooldown::none()
        })
        .leeway(Duration::from_secs(1));
    if let Some(window) = ahead {
        layer = layer.refresh_ahead(window);
    }
    if rng.chance(3, 4) {
        let token = {
            let mut w = lock(&world);
            let life = w.lifetime(&mut rng);
            w.issue(life)
        };
        layer = layer.initial_token(token);
    }
    let handle: TokenHandle = layer.token_handle();
    {
        let mut w = lock(&world);
        w.handle = Some(handle.clone());
        w.events = Some(handle.subscribe());
    }
    // The world holds a handle to the cell that holds the refresher that holds the world:
    // break the cycle however the schedule ends.
    struct BreakCycle(Shared);
    impl Drop for BreakCycle {
        fn drop(&mut self) {
            lock(&self.0).handle = None;
        }
    }
    let _break_cycle = BreakCycle(world.clone());
    let svc = layer.layer(api(world.clone(), server_rng));

    let log: Rc<RefCell<Vec<Record>>> = Rc::default();
    let mut slots = Vec::new();
    let requests = 2 + rng.below(5);
    for id in 0..requests {
        let delay = rng.below(6);
        let req = get_or_post(id, rng.chance(1, 2));
        let (svc, world, log) = (svc.clone(), world.clone(), log.clone());
        slots.push(Slot::new(
            format!("request {id}"),
            async move {
                yield_times(delay).await;
                let start = {
                    let mut w = lock(&world);
                    let now = tokio::time::Instant::now();
                    w.trace.push(format!("request {id} starts at {now:?}"));
                    let at = w.trace.len();
                    w.demand_events.push(at);
                    w.start_of.insert(id, at);
                    w.completions
                };
                let result = svc.oneshot(req).await.map(|r| r.status());
                log.borrow_mut().push(Record::Request { id, start, result });
            },
            true,
        ));
    }
    for n in 0..rng.below(3) {
        let delay = rng.below(8);
        let (handle, world, log) = (handle.clone(), world.clone(), log.clone());
        slots.push(Slot::new(
            format!("forced refresh {n}"),
            async move {
                yield_times(delay).await;
                let start = {
                    let mut w = lock(&world);
                    let generation = handle.state().generation();
                    w.trace
                        .push(format!("forced refresh {n} at generation {generation}"));
                    let at = w.trace.len();
                    w.demand_events.push(at);
                    w.forced_generations.insert(generation);
                    w.completions
                };
                let result = handle.refresh().await.map(|_| ());
                log.borrow_mut().push(Record::Force { start, result });
            },
            true,
        ));
    }
    for n in 0..rng.below(3) {
        let delay = rng.below(10);
        let life_seed = rng.next();
        let (handle, world) = (handle.clone(), world.clone());
        slots.push(Slot::new(
            format!("install {n}"),
            async move {
                yield_times(delay).await;
                let token = {
                    let mut w = lock(&world);
                    let life = w.lifetime(&mut seeded(life_seed));
                    w.installs += 1;
                    w.trace.push(format!("install {n}"));
                    let at = w.trace.len();
                    w.install_events.push(at);
                    w.issue(life)
                };
                handle.set_token(token);
            },
            true,
        ));
    }
    for n in 0..rng.below(3) {
        let delay = rng.below(10);
        let world = world.clone();
        slots.push(Slot::new(
            format!("revoke {n}"),
            async move {
                yield_times(delay).await;
                let mut w = lock(&world);
                if let Some(latest) = w.latest.clone() {
                    w.trace.push(format!("revoke {latest}"));
                    w.valid.remove(&latest);
                    w.revokes += 1;
                }
            },
            true,
        ));
    }
    if rng.chance(1, 6) {
        let delay = rng.below(10);
        let (handle, world) = (handle.clone(), world.clone());
        slots.push(Slot::new(
            "logout".into(),
            async move {
                yield_times(delay).await;
                let mut w = lock(&world);
                w.clears += 1;
                w.trace.push("logout".into());
                drop(w);
                handle.clear();
            },
            true,
        ));
    }
    let drop_per_mille = [0, 0, 10, 30, 80][rng.index(5)];
    drive(&mut slots, &mut rng, runtime, drop_per_mille, tally).await?;
    drop(slots);

    // Let a refresh whose waiters were all dropped finish (it runs on as a task).
    if runtime {
        for _ in 0..1000 {
            if !handle.state().refreshing() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let mut problems = Vec::new();
    {
        let w = lock(&world);
        problems.extend(w.violations.iter().cloned());
        if handle.state().refreshing() {
            problems
                .push("refreshing flag stuck: no refresh runs, yet the state says one does".into());
        }
        for (id, sends) in &w.sends {
            if *sends > 2 {
                problems.push(format!(
                    "at most two sends: request {id} reached the API {sends} times"
                ));
            }
        }
        if w.successes_without_token > 1 + w.clears {
            problems.push(format!(
                "one refresh per generation: {} successful refreshes without a token",
                w.successes_without_token
            ));
        }
        // Every waiter of one failed refresh got that refresh's error, the same Arc.
        let mut by_call: HashMap<usize, Arc<RefreshError>> = HashMap::new();
        for record in log.borrow().iter() {
            let (who, start, err) = match record {
                Record::Request { id, start, result } => {
                    tally.requests += 1;
                    match result {
                        Ok(StatusCode::OK) => {
                            tally.ok += 1;
                            continue;
                        }
                        Ok(StatusCode::UNAUTHORIZED) if w.cooling => {
                            // A 401 during a cool-down is returned, not refreshed.
                            continue;
                        }
                        Ok(status) => {
                            problems.push(format!(
                                "request {id} got a {status} back although its body replays"
                            ));
                            continue;
                        }
                        Err(err) => {
                            tally.errors += 1;
                            (format!("request {id}"), *start, err)
                        }
                    }
                }
                Record::Force { start, result } => {
                    tally.forced += 1;
                    match result {
                        Ok(()) => continue,
                        Err(err) => ("a forced refresh".to_owned(), *start, err),
                    }
                }
            };
            if let Err(p) = check_error(err, start, &w, &who) {
                problems.push(p);
            }
            let shared = err
                .downcast_ref::<RefreshFailed>()
                .map(|e| e.refresh_error())
                .or_else(|| {
                    err.downcast_ref::<RefreshRejected>()
                        .map(|e| e.refresh_error())
                });
            if let Some(e) = shared {
                if let Some(call) = failed_call(e) {
                    let first = by_call.entry(call).or_insert_with(|| e.clone());
                    if !Arc::ptr_eq(first, e) {
                        problems.push(format!(
                            "shared result: waiters of refresher call {call} got different errors"
                        ));
                    }
                }
            }
        }
        tally.refresher_calls += w.calls as u64;
        tally.refreshes += w.successes as u64;
        tally.failures += w.failures as u64;
        tally.panics += w.panics as u64;
        tally.installs += w.installs as u64;
        tally.revokes += w.revokes as u64;
        tally.clears += w.clears as u64;
    }

    // Whatever was cancelled, the cell is not wedged: a fresh request completes.
    lock(&world).final_phase = true;
    if handle.state().session_ended() {
        let token = lock(&world).issue(None);
        handle.set_token(token);
    }
    let outcome: Rc<RefCell<Option<Result<StatusCode, BoxError>>>> = Rc::default();
    let mut last = vec![{
        let (svc, outcome, world) = (svc.clone(), outcome.clone(), world.clone());
        Slot::new(
            "fresh request after the schedule".into(),
            async move {
                if lock(&world).cooling {
                    // Let a cool-down from the schedule run out (paused time jumps).
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                {
                    let mut w = lock(&world);
                    w.trace
                        .push("fresh request after the schedule starts".into());
                    let at = w.trace.len();
                    w.demand_events.push(at);
                    w.start_of.insert(1000, at);
                }
                let result = svc.oneshot(get_or_post(1000, true)).await;
                *outcome.borrow_mut() = Some(result.map(|r| r.status()));
            },
            false,
        )
    }];
    if let Err(hang) = drive(&mut last, &mut rng, runtime, 0, tally).await {
        problems.push(format!("wedged: {hang}"));
    }
    match outcome.borrow_mut().take() {
        Some(Ok(StatusCode::OK)) | None => {}
        Some(other) => problems.push(format!(
            "wedged: a fresh request after the schedule got {other:?}"
        )),
    }
    if std::env::var_os("INTERLEAVING_SEED").is_some() {
        println!("trace of seed {seed}:");
        for line in &lock(&world).trace {
            println!("  {line}");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n  "))
    }
}

/// Runs `fut` without any runtime. The schedule only awaits the runtime when it has one, so
/// it must finish in one poll.
fn block_on_without_runtime<T>(fut: impl Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(Flag::default()));
    let mut cx = Context::from_waker(&waker);
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a schedule without a runtime waited on something"),
    }
}

fn run_seed(seed: u64, tally: &mut Tally) -> Result<(), String> {
    UNEXPECTED_PANICS.with(|p| p.borrow_mut().clear());
    // Two schedules in three run on the runtime.
    let runtime = seed % 3 != 2;
    tally.schedules += 1;
    tally.with_runtime += u64::from(runtime);
    let mut local = *tally;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        if runtime {
            support::paused_runtime().block_on(async {
                tokio::time::timeout(Duration::from_secs(3600), schedule(seed, true, &mut local))
                    .await
                    .unwrap_or_else(|_| Err("global deadline: the schedule never ended".into()))
            })
        } else {
            block_on_without_runtime(schedule(seed, false, &mut local))
        }
    }));
    *tally = local;
    let mut problems: Vec<String> = UNEXPECTED_PANICS
        .with(|p| std::mem::take(&mut *p.borrow_mut()))
        .into_iter()
        .map(|p| format!("unexpected panic inside the layer: {p}"))
        .collect();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(p)) => problems.push(p),
        Err(panic) => {
            let msg = panic_message(&*panic);
            problems.push(format!("panic escaped the layer: {msg}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n  "))
    }
}

#[test]
fn explore_schedules_of_401s_cancellations_installs_and_refresher_failures() {
    silence_deliberate_panics_and(record_while_exploring);
    EXPLORING.with(|e| e.set(true));
    let seeds: Vec<u64> = match std::env::var("INTERLEAVING_SEED") {
        Ok(seed) => vec![seed.parse().expect("INTERLEAVING_SEED is a number")],
        Err(_) => {
            let n = std::env::var("INTERLEAVING_SCHEDULES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(DEFAULT_SCHEDULES);
            (0..n).collect()
        }
    };
    let verbose = std::env::var_os("INTERLEAVING_VERBOSE").is_some();
    let mut tally = Tally::default();
    // Failure kind -> (schedules, first seed, first message).
    let mut failures: BTreeMap<String, (u64, u64, String)> = BTreeMap::new();
    for &seed in &seeds {
        if let Err(problems) = run_seed(seed, &mut tally) {
            if verbose {
                println!("INTERLEAVING_SEED={seed}:\n  {problems}");
            }
            let mut kinds = HashSet::new();
            for p in problems.split("\n  ") {
                let kind = p.split(':').next().unwrap_or(p).to_owned();
                if kinds.insert(kind.clone()) {
                    let entry = failures.entry(kind).or_insert((0, seed, p.to_owned()));
                    entry.0 += 1;
                }
            }
        }
    }
    EXPLORING.with(|e| e.set(false));
    let t = tally;
    println!(
        "interleavings: {} schedules ({} on a paused runtime, {} without), {} steps, {} polls, \
         {} futures dropped, {} runtime yields; {} requests completed ({} ok, {} typed \
         errors), {} forced refreshes completed, {} refresher calls ({} refreshes, {} failures, {} panics), {} installs, {} revocations, {} logouts",
        t.schedules,
        t.with_runtime,
        t.schedules - t.with_runtime,
        t.steps,
        t.polls,
        t.drops,
        t.runtime_yields,
        t.requests,
        t.ok,
        t.errors,
        t.forced,
        t.refresher_calls,
        t.refreshes,
        t.failures,
        t.panics,
        t.installs,
        t.revokes,
        t.clears,
    );
    if !failures.is_empty() {
        let report: Vec<String> = failures
            .iter()
            .map(|(kind, (n, seed, msg))| {
                format!("- {kind}: {n} schedule(s); first INTERLEAVING_SEED={seed}\n    {msg}")
            })
            .collect();
        panic!(
            "{} of the invariants failed:\n{}",
            failures.len(),
            report.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The schedules the explorer found, pinned down one by one.

/// A refresher whose calls are scripted: each call takes the next outcome; `None` waits
/// forever. Counts its calls.
#[derive(Clone, Default)]
struct Scripted {
    calls: Arc<Mutex<usize>>,
    script: Arc<Mutex<Vec<Step>>>,
}

#[derive(Clone)]
enum Step {
    Token(&'static str),
    Transient,
    Terminal,
    Forever,
    /// Waits for a permit, then returns the inner outcome.
    Gated(Arc<tokio::sync::Semaphore>, Box<Step>),
}

impl Scripted {
    fn new(script: Vec<Step>) -> Self {
        Self {
            calls: Arc::default(),
            script: Arc::new(Mutex::new(script)),
        }
    }
    fn calls(&self) -> usize {
        *self.calls.lock().unwrap()
    }
}

fn scripted_outcome(
    step: Step,
) -> Pin<Box<dyn Future<Output = Result<Token, RefreshError>> + Send>> {
    Box::pin(async move {
        match step {
            Step::Token(s) => Ok(Token::bearer(s)?),
            Step::Transient => Err(RefreshError::transient("503 from the token endpoint")),
            Step::Terminal => Err(RefreshError::terminal("invalid_grant")),
            Step::Forever => std::future::pending().await,
            Step::Gated(gate, then) => {
                gate.acquire().await.unwrap().forget();
                scripted_outcome(*then).await
            }
        }
    })
}

impl TokenRefresher for Scripted {
    type Future = Pin<Box<dyn Future<Output = Result<Token, RefreshError>> + Send>>;

    fn refresh(&self, _ctx: RefreshContext) -> Self::Future {
        *self.calls.lock().unwrap() += 1;
        let step = {
            let mut script = self.script.lock().unwrap();
            if script.is_empty() {
                Step::Token("spare")
            } else {
                script.remove(0)
            }
        };
        scripted_outcome(step)
    }
}

/// An API that accepts only `Bearer <accepted>` and records the Authorization of each send.
fn gatekeeper(accepted: &'static str, seen: Arc<Mutex<Vec<String>>>) -> impl InMemoryApi<String> {
    service_fn(move |req: Request<ReplayBody<Body>>| {
        let auth = authorization(req.headers());
        let ok = auth == format!("Bearer {accepted}");
        seen.lock().unwrap().push(auth);
        let status = if ok { 200 } else { 401 };
        std::future::ready(Ok(Response::builder()
            .status(status)
            .body(String::new())
            .unwrap()))
    })
}

/// Explorer: "refreshing flag stuck" (seed 11). Without a runtime the refresh runs inside
/// the request; dropping the request mid-refresh must not leave the cell saying a refresh
/// runs, which also disables refresh-ahead for good.
#[test]
fn dropping_a_request_that_runs_the_refresh_inline_resets_the_refreshing_flag() {
    let refresher = Scripted::new(vec![Step::Forever, Step::Token("ahead")]);
    let layer = RefreshLayer::new(refresher.clone()).refresh_ahead(Duration::from_secs(60));
    let handle = layer.token_handle();
    let seen = Arc::default();
    let svc = layer.layer(gatekeeper("login", seen));

    // No runtime: the request drives the refresh itself, then is dropped.
    {
        let mut fut = std::pin::pin!(svc.clone().oneshot(get("/")));
        let waker = Waker::from(Arc::new(Flag::default()));
        assert!(
            fut.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert!(handle.state().refreshing());
    }
    assert!(
        !handle.state().refreshing(),
        "no refresh runs once its only driver is dropped"
    );

    // The consequence on a runtime: refresh-ahead never starts again.
    run_paused(Duration::from_secs(600), async {
        handle.set_token(
            Token::bearer("login")
                .unwrap()
                .with_expires_in(Duration::from_secs(100)),
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(refresher.calls(), 2, "the refresh-ahead ran");
    });
}

/// Explorer: "stale failure" (seed 637). A refresh fails; later a refresh is in flight with
/// another request waiting on it; the user logs out; the refresh's result is discarded. The
/// waiter must get `SessionEnded`, not the failure from before it started.
#[test]
fn a_logout_during_a_refresh_gives_waiters_session_ended_not_an_older_failure() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let refresher = Scripted::new(vec![
        Step::Transient,
        Step::Gated(gate.clone(), Box::new(Step::Token("fresh"))),
    ]);
    let layer = RefreshLayer::new(refresher.clone())
        .retries(Backoff::none())
        .cooldown(Cooldown::none());
    let handle = layer.token_handle();
    let seen = Arc::default();
    let svc = layer.layer(gatekeeper("fresh", seen));
    run_paused(Duration::from_secs(600), async {
        let first = svc.clone().oneshot(get("/")).await.unwrap_err();
        assert!(first.is::<RefreshFailed>(), "{first}");

        let driver = tokio::spawn(svc.clone().oneshot(get("/")));
        support::yield_until("the second refresh started", support::YIELD_BOUND, || {
            refresher.calls() >= 2
        })
        .await;
        let waiter = tokio::spawn(svc.clone().oneshot(get("/")));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        handle.clear();
        gate.add_permits(1);
        let driver = driver.await.unwrap().unwrap_err();
        assert!(driver.is::<SessionEnded>(), "{driver}");
        let waiter = waiter.await.unwrap().unwrap_err();
        assert!(
            waiter.is::<SessionEnded>(),
            "the waiter got the failure from before it started: {waiter:?}"
        );
    });
}

/// Explorer: "install lost" (seed 395). A refresh that is doomed (the old refresh token was
/// revoked) is running when the user logs in through the handle. Its terminal failure must
/// not end the new session.
#[test]
fn a_login_during_a_doomed_refresh_is_not_ended_by_its_failure() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let refresher = Scripted::new(vec![Step::Gated(gate.clone(), Box::new(Step::Terminal))]);
    let layer = RefreshLayer::new(refresher.clone())
        .initial_token(Token::bearer("expired").unwrap())
        .retries(Backoff::none());
    let handle = layer.token_handle();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let svc = layer.layer(gatekeeper("after-login", seen.clone()));
    run_paused(Duration::from_secs(600), async {
        let before = tokio::spawn(svc.clone().oneshot(get("/")));
        support::yield_until("the doomed refresh started", support::YIELD_BOUND, || {
            refresher.calls() >= 1
        })
        .await;
        handle.set_token(Token::bearer("after-login").unwrap());
        gate.add_permits(1);
        let _ = before.await.unwrap();
        assert!(
            !handle.state().session_ended(),
            "the login was ended by a refresh that started before it"
        );
        let after = svc.clone().oneshot(get("/")).await;
        assert_eq!(after.map(|r| r.status()).ok(), Some(StatusCode::OK));
        assert_eq!(seen.lock().unwrap().last().unwrap(), "Bearer after-login");
    });
}

/// Explorer: "unneeded refresh" (seed 16). A refresh is decided (under the gate) and
/// spawned; before its task first runs, a token is installed through the handle. The task
/// must not refresh the installed token away: nobody rejected it.
#[test]
fn a_token_installed_before_the_refresh_task_starts_is_not_refreshed_away() {
    let refresher = Scripted::new(vec![Step::Token("refreshed")]);
    let layer =
        RefreshLayer::new(refresher.clone()).initial_token(Token::bearer("revoked").unwrap());
    let handle = layer.token_handle();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let svc = layer.layer(gatekeeper("installed", seen.clone()));
    run_paused(Duration::from_secs(600), async {
        // One poll: sent with the revoked token, 401, refresh decided and spawned.
        let mut call = tokio_test::task::spawn(svc.clone().oneshot(get("/")));
        assert!(call.poll().is_pending());
        assert_eq!(refresher.calls(), 0, "the refresh task has not run yet");
        let generation = handle.set_token(Token::bearer("installed").unwrap());
        let res = call.await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            *seen.lock().unwrap(),
            ["Bearer revoked", "Bearer installed"]
        );
        assert_eq!(
            refresher.calls(),
            0,
            "the installed token was not refreshed"
        );
        assert_eq!(handle.state().generation(), generation);
    });
}
