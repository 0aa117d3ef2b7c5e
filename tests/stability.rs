//! Static stability and the bounded refresh: what the layer does while the token endpoint is
//! down (the cool-down), with a token that is still valid (keep using it), with a refresher
//! that never returns (the refresh timeout), with tokens that are dead on arrival, with
//! refresh-ahead by lifetime, with a terminal failure in the background, with an API that
//! refuses every token, and with a machine that slept through its token's expiry.
//!
//! Almost everything runs on Tokio's paused clock against an in-memory API and a scripted
//! refresher, counting what the refresher and the API saw; the OAuth 2.0 tests use the
//! loopback token server of `tests/oauth2_server` and real (short) time.

// This binary uses part of the shared loopback token server.
#[allow(dead_code)]
#[path = "oauth2_server/mod.rs"]
mod oauth2_server;
mod support;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::error::{RefreshFailed, SessionEnded, UnauthorizedAfterRefresh};
use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher, RefreshToken};
use tower_auth_refresh::{
    Backoff, BoxError, Clock, Cooldown, Refresh, RefreshAhead, RefreshContext, RefreshError,
    RefreshEvent, RefreshLayer, RefreshReason, ReplayBody, Token, TokenHandle, context_fn,
};

use oauth2_server::{Scripted, Servers, TokenConfig};
use support::{authorization, get, guard, http_client};

// ---------------------------------------------------------------------------------------------
// A scripted refresher and an in-memory API.

/// What the scripted refresher does on its next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Issues `t<n>` (n = the call number), valid for the script's lifetime, and makes the API
    /// accept it.
    Issue,
    /// A transient failure, as for a token endpoint answering 503.
    Unavailable,
    /// A transient failure with a `Retry-After`, as for a 503 or 429 that says when to come
    /// back.
    Throttled(Duration),
    /// A terminal failure (`invalid_grant`).
    Terminal,
    /// Never returns.
    Hang,
    /// Issues `dead-<n>`, already expired (`expires_in` 0), and makes the API accept it.
    DeadOnArrival,
}

/// One refresher call: when, and why.
#[derive(Debug, Clone)]
struct Call {
    at: Instant,
    reason: &'static str,
}

struct ScriptState {
    mode: Mutex<Mode>,
    lifetime: Option<Duration>,
    calls: Mutex<Vec<Call>>,
    /// With a gate, each call waits for a permit before it answers.
    gate: Option<Arc<Semaphore>>,
    /// The tokens the API accepts.
    accepted: Mutex<HashSet<String>>,
}

/// A refresher whose behaviour the test switches, and the API that goes with it.
#[derive(Clone)]
struct Script(Arc<ScriptState>);

fn reason_name(reason: &RefreshReason) -> &'static str {
    match reason {
        RefreshReason::NoToken => "no token",
        RefreshReason::Expired => "expired",
        RefreshReason::Unauthorized(_) => "unauthorized",
        RefreshReason::Forced => "forced",
        RefreshReason::Background => "background",
        _ => "other",
    }
}

impl Script {
    fn new(mode: Mode, lifetime: Option<Duration>) -> Self {
        Self(Arc::new(ScriptState {
            mode: Mutex::new(mode),
            lifetime,
            calls: Mutex::new(Vec::new()),
            gate: None,
            accepted: Mutex::new(HashSet::new()),
        }))
    }

    fn gated(mode: Mode, lifetime: Option<Duration>, gate: &Arc<Semaphore>) -> Self {
        let script = Self::new(mode, lifetime);
        let mut state = Arc::into_inner(script.0).unwrap();
        state.gate = Some(gate.clone());
        Self(Arc::new(state))
    }

    fn set(&self, mode: Mode) {
        *self.0.mode.lock().unwrap() = mode;
    }

    fn calls(&self) -> usize {
        self.0.calls.lock().unwrap().len()
    }

    fn call_log(&self) -> Vec<Call> {
        self.0.calls.lock().unwrap().clone()
    }

    /// Makes the API accept `Bearer <secret>`.
    fn accept(&self, secret: &str) {
        self.0.accepted.lock().unwrap().insert(secret.to_owned());
    }

    fn refresher(&self) -> impl tower_auth_refresh::TokenRefresher {
        let script = self.clone();
        context_fn(move |ctx: RefreshContext| {
            let script = script.clone();
            async move {
                let n = {
                    let mut calls = script.0.calls.lock().unwrap();
                    calls.push(Call {
                        at: Instant::now(),
                        reason: reason_name(ctx.reason()),
                    });
                    calls.len()
                };
                let mode = *script.0.mode.lock().unwrap();
                if let Some(gate) = &script.0.gate {
                    gate.acquire().await.unwrap().forget();
                }
                match mode {
                    Mode::Issue => {
                        let secret = format!("t{n}");
                        script.accept(&secret);
                        let token = Token::bearer(secret)?;
                        Ok(match script.0.lifetime {
                            Some(life) => token.with_expires_in(life),
                            None => token,
                        })
                    }
                    Mode::Unavailable => Err(RefreshError::transient("503 Service Unavailable")),
                    Mode::Throttled(delay) => {
                        Err(RefreshError::transient("429 Too Many Requests")
                            .with_retry_after(delay))
                    }
                    Mode::Terminal => Err(RefreshError::terminal("invalid_grant")),
                    Mode::Hang => std::future::pending().await,
                    Mode::DeadOnArrival => {
                        let secret = format!("dead-{n}");
                        script.accept(&secret);
                        Ok(Token::bearer(secret)?.with_expires_in(Duration::ZERO))
                    }
                }
            }
        })
    }
}

/// What the in-memory API saw: the `Authorization` of every request, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

type ApiRequest = Request<ReplayBody<Full<Bytes>>>;

/// An API that answers 200 to the tokens the script accepts and 401 (RFC 6750
/// `invalid_token`) to anything else.
fn api(
    script: &Script,
    seen: &Seen,
) -> impl tower::Service<
    ApiRequest,
    Response = Response<String>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let (script, seen) = (script.clone(), seen.clone());
    service_fn(move |req: ApiRequest| {
        let auth = authorization(req.headers());
        seen.0.lock().unwrap().push(auth.clone());
        let ok = auth
            .strip_prefix("Bearer ")
            .is_some_and(|t| script.0.accepted.lock().unwrap().contains(t));
        let res = if ok {
            Response::new("ok".to_owned())
        } else {
            Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", r#"Bearer error="invalid_token""#)
                .body(String::new())
                .unwrap()
        };
        async move { Ok::<_, Infallible>(res) }
    })
}

fn bearer(secret: &str) -> Token {
    Token::bearer(secret).unwrap()
}

fn expiring(secret: &str, life: Duration) -> Token {
    bearer(secret).with_expires_in(life)
}

/// The `RefreshFailed` in `err`, or a panic naming what it was instead.
fn refresh_failed(err: &BoxError) -> &RefreshFailed {
    err.downcast_ref::<RefreshFailed>()
        .unwrap_or_else(|| panic!("expected RefreshFailed, got {err:?}"))
}

/// Bounds a paused-clock test: a hang jumps to the deadline and fails (the tests move the
/// clock by up to an hour, so [`guard`]'s minute is too short for them).
async fn bounded<T>(test: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(4 * 3600), test)
        .await
        .expect("test did not finish within 4 hours of paused time")
}

/// Lets spawned tasks (a background refresh) run, without moving the clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Every event received so far.
fn drain(events: &mut tower_auth_refresh::Events) -> Vec<RefreshEvent> {
    std::iter::from_fn(|| events.try_recv())
        .map(|e| e.expect("no event missed"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Load: requests arriving at a steady rate on the paused clock.

const TICK: Duration = Duration::from_millis(100);
/// 100 requests per second: 10 every 100 ms.
const PER_TICK: usize = 10;

/// How one request ended.
#[derive(Debug, Clone)]
enum Outcome {
    Ok,
    Failed { next_attempt_in: Option<Duration> },
    Other(String),
}

#[derive(Debug, Clone)]
struct Answered {
    /// When the request arrived, from the test's origin.
    arrived: Duration,
    /// How long it took to be answered (paused time).
    latency: Duration,
    outcome: Outcome,
}

/// Sends [`PER_TICK`] requests (each in its own task) every [`TICK`] for `span`, from now, and
/// returns how each was answered once all are (arrival times are measured from `origin`).
async fn drive<S>(svc: &Refresh<S>, origin: Instant, span: Duration) -> Vec<Answered>
where
    Refresh<S>: tower::Service<
            Request<Full<Bytes>>,
            Response = Response<String>,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send
        + 'static,
{
    let answered = Arc::new(Mutex::new(Vec::new()));
    let pending = Arc::new(AtomicUsize::new(0));
    let ticks = (span.as_millis() / TICK.as_millis()) as usize;
    for _ in 0..ticks {
        let arrived = Instant::now();
        for _ in 0..PER_TICK {
            let (svc, answered, pending) = (svc.clone(), answered.clone(), pending.clone());
            pending.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let outcome = match svc.oneshot(get("/")).await {
                    Ok(res) if res.status() == StatusCode::OK => Outcome::Ok,
                    Ok(res) => Outcome::Other(format!("status {}", res.status())),
                    Err(err) => match err.downcast_ref::<RefreshFailed>() {
                        Some(f) => Outcome::Failed {
                            next_attempt_in: f.next_attempt_in(),
                        },
                        None => Outcome::Other(err.to_string()),
                    },
                };
                answered.lock().unwrap().push(Answered {
                    arrived: arrived - origin,
                    latency: Instant::now() - arrived,
                    outcome,
                });
                pending.fetch_sub(1, Ordering::SeqCst);
            });
        }
        tokio::task::yield_now().await;
        tokio::time::advance(TICK).await;
    }
    // Bounded: the slowest possible request is one flight (30 s of backoff) behind.
    for _ in 0..600 {
        if pending.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::advance(TICK).await;
        settle().await;
    }
    assert_eq!(
        pending.load(Ordering::SeqCst),
        0,
        "requests left unanswered"
    );
    let mut answered = std::mem::take(&mut *answered.lock().unwrap());
    answered.sort_by_key(|a| a.arrived);
    answered
}

/// The cool-down's ceiling after `failures` failures in a row, for `Cooldown::default()`
/// (30 s doubling to 5 min; the pause is jittered between half and all of it).
fn default_ceiling(failures: u32) -> Duration {
    (Duration::from_secs(30) * (1 << (failures - 1).min(10))).min(Duration::from_secs(300))
}

/// Checks that the refresher calls at `calls` (the first flight's, then one per later flight)
/// are spaced by the default cool-down, and prints the figures.
fn check_one_call_per_cooldown(label: &str, calls: &[Call], outage: Duration, origin: Instant) {
    assert!(!calls.is_empty(), "{label}: the refresher was never called");
    let first = calls[0].at;
    // The first flight: its `Backoff` retries (default: 4 attempts, at most 5 s apart; the
    // shortest cool-down is 15 s).
    let mut first_flight = vec![&calls[0]];
    for pair in calls.windows(2) {
        if pair[1].at - pair[0].at > Duration::from_secs(5) {
            break;
        }
        first_flight.push(&pair[1]);
    }
    assert!(
        (1..=4).contains(&first_flight.len()),
        "{label}: the first flight made {} calls",
        first_flight.len()
    );
    let later = &calls[first_flight.len()..];
    println!(
        "{label}: {} refresher calls in {} s of outage at 100 requests/s: first flight {} calls \
         (backoff retries, {} ms); then one call per cool-down:",
        calls.len(),
        outage.as_secs(),
        first_flight.len(),
        (first_flight.last().unwrap().at - first).as_millis()
    );
    let mut previous = first_flight.last().unwrap().at;
    for (i, call) in later.iter().enumerate() {
        let failures = i as u32 + 1;
        let ceiling = default_ceiling(failures);
        let gap = call.at - previous;
        println!(
            "  cool-down {failures}: {:>3} s long (ceiling {:>3} s), 1 call, at t = {:>3} s",
            gap.as_secs_f64().round(),
            ceiling.as_secs(),
            (call.at - origin).as_secs()
        );
        // No call inside a cool-down (at least half its ceiling), and the next one starts as
        // soon as it ends (within one tick of arrivals).
        assert!(
            gap >= ceiling / 2 && gap <= ceiling + TICK,
            "{label}: call {} came {gap:?} after the previous one (cool-down ceiling {ceiling:?})",
            i + 1
        );
        previous = call.at;
    }
}

/// A1. The token endpoint is down for 10 minutes while requests arrive at 100 per second with
/// an expired token: the first flight retries (backoff), then each flight is a single call,
/// one per cool-down; every request fails fast with `RefreshFailed`; the first attempt after
/// the outage recovers.
#[tokio::test(start_paused = true)]
async fn an_outage_costs_one_token_call_per_cooldown_and_recovers_on_the_first_attempt() {
    bounded(async {
        let script = Script::new(Mode::Unavailable, Some(Duration::from_secs(3600)));
        let seen = Seen::default();
        let layer =
            RefreshLayer::new(script.refresher()).initial_token(expiring("old", Duration::ZERO));
        let svc = layer.layer(api(&script, &seen));
        let origin = Instant::now();
        let outage = Duration::from_secs(600);

        let during = drive(&svc, origin, outage).await;
        assert_eq!(during.len(), 60_000);
        let calls = script.call_log();
        check_one_call_per_cooldown("outage, expired token", &calls, outage, origin);
        assert!(calls.iter().all(|c| c.reason == "expired"));
        // Nothing reached the API: the expired token is never sent.
        assert_eq!(seen.count(), 0);
        let mut fast = 0;
        for a in &during {
            let next_attempt_in = match &a.outcome {
                Outcome::Failed { next_attempt_in } => *next_attempt_in,
                Outcome::Other(why) => panic!("request at {:?} failed: {why}", a.arrived),
                Outcome::Ok => panic!("request at {:?} succeeded during the outage", a.arrived),
            };
            // Bounded: the first flight's waiters wait for its backoff (under 2 s); everyone
            // else is answered at once.
            let bound = if a.arrived < Duration::from_secs(2) {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(1)
            };
            assert!(a.latency <= bound, "{a:?}");
            if let Some(left) = next_attempt_in {
                // Failed fast inside a cool-down, and says when the next attempt is allowed.
                assert!(left <= Duration::from_secs(300), "{a:?}");
                fast += 1;
            }
        }
        println!(
            "  {fast} of {} requests failed fast with next_attempt_in; the rest waited on a flight",
            during.len()
        );
        assert!(fast >= during.len() - 100 * PER_TICK, "{fast}");

        // The endpoint is back: the first attempt after the current cool-down succeeds.
        script.set(Mode::Issue);
        let calls_before = script.calls();
        let mut after = Vec::new();
        for _ in 0..400 {
            let chunk = drive(&svc, origin, Duration::from_secs(1)).await;
            let recovered = chunk.iter().any(|a| matches!(a.outcome, Outcome::Ok));
            after.extend(chunk);
            if recovered {
                break;
            }
        }
        assert_eq!(script.calls(), calls_before + 1, "one attempt recovers");
        let first_ok = after
            .iter()
            .position(|a| matches!(a.outcome, Outcome::Ok))
            .expect("recovered within the longest cool-down");
        assert!(after[..first_ok].iter().all(|a| matches!(
            a.outcome,
            Outcome::Failed {
                next_attempt_in: Some(_)
            }
        )));
        let more = drive(&svc, origin, Duration::from_secs(1)).await;
        assert!(
            after[first_ok..]
                .iter()
                .chain(&more)
                .all(|a| matches!(a.outcome, Outcome::Ok))
        );
        assert_eq!(script.calls(), calls_before + 1);
        let token = format!("Bearer t{}", calls_before + 1);
        assert!(seen.all().iter().all(|a| *a == token));
        println!(
            "  recovered {} s after the outage ended, with 1 call",
            after[first_ok].arrived.as_secs() - outage.as_secs()
        );
    })
    .await;
}

/// A2. The same outage with a token valid for another 5 minutes: not one request fails while
/// it is valid (inside the leeway the failed refreshes keep it in use); after it expires,
/// requests fail fast and the expired token is never sent.
#[tokio::test(start_paused = true)]
async fn during_an_outage_a_token_that_is_still_valid_serves_every_request_until_it_expires() {
    bounded(async {
        let script = Script::new(Mode::Unavailable, Some(Duration::from_secs(3600)));
        script.accept("current");
        let seen = Seen::default();
        let life = Duration::from_secs(300);
        let layer = RefreshLayer::new(script.refresher()).initial_token(expiring("current", life));
        let svc = layer.layer(api(&script, &seen));
        let origin = Instant::now();
        let outage = Duration::from_secs(600);

        let answered = drive(&svc, origin, outage).await;
        let (valid, expired): (Vec<_>, Vec<_>) = answered.iter().partition(|a| a.arrived < life);
        assert_eq!(valid.len(), 30_000);
        let failed_while_valid = valid
            .iter()
            .filter(|a| !matches!(a.outcome, Outcome::Ok))
            .count();
        println!(
            "outage, valid token: {failed_while_valid} of {} requests failed while the token was valid",
            valid.len()
        );
        assert_eq!(failed_while_valid, 0);
        assert!(
            expired
                .iter()
                .all(|a| matches!(a.outcome, Outcome::Failed { .. }) && a.latency <= Duration::from_secs(2)),
            "after expiry every request fails fast"
        );
        // The API saw the valid token on every request before expiry, and nothing after.
        assert_eq!(seen.count(), valid.len());
        assert!(seen.all().iter().all(|a| a == "Bearer current"));
        // The refreshes start inside the leeway (30 s before expiry), one per cool-down.
        let calls = script.call_log();
        assert_eq!(calls[0].at - origin, life - Duration::from_secs(30));
        check_one_call_per_cooldown("outage, valid token", &calls, outage, origin);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A3. What bypasses the cool-down, what it does to a 401, and who shares it.

#[tokio::test(start_paused = true)]
async fn the_handles_refresh_and_set_token_bypass_the_cooldown() {
    bounded(async {
        let script = Script::new(Mode::Unavailable, None);
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher()).retries(Backoff::none());
        let handle = layer.token_handle();
        let svc = layer.layer(api(&script, &seen));

        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        assert_eq!(refresh_failed(&err).next_attempt_in(), None);
        assert_eq!(script.calls(), 1);
        let cooling = handle.state().cooling_for().expect("a cool-down runs");
        assert!(cooling >= Duration::from_secs(15) && cooling <= Duration::from_secs(30));
        // A request inside it fails fast, without a call.
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        assert!(refresh_failed(&err).next_attempt_in().is_some());
        assert_eq!(script.calls(), 1);

        // The handle's refresh calls the refresher anyway: a failure is reported...
        let err = handle.refresh().await.unwrap_err();
        refresh_failed(&err);
        assert_eq!(script.calls(), 2);
        // ...and a success ends the cool-down.
        script.set(Mode::Issue);
        let state = handle.refresh().await.unwrap();
        assert_eq!(script.calls(), 3);
        assert_eq!(state.cooling_for(), None);
        assert!(state.has_token());
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(seen.all(), ["Bearer t3"]);

        // Installing a token ends a cool-down too.
        script.set(Mode::Unavailable);
        handle.invalidate();
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        refresh_failed(&err);
        assert_eq!(script.calls(), 4);
        assert!(handle.state().cooling_for().is_some());
        script.accept("installed");
        handle.set_token(bearer("installed"));
        assert_eq!(handle.state().cooling_for(), None);
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(seen.all(), ["Bearer t3", "Bearer installed"]);
        assert_eq!(script.calls(), 4);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_401_during_the_cooldown_is_returned_to_the_caller_unrefreshed_and_unreplayed() {
    bounded(async {
        let script = Script::new(Mode::Unavailable, None);
        let seen = Seen::default();
        // The API does not accept "valid" (it was revoked, say).
        let layer = RefreshLayer::new(script.refresher())
            .retries(Backoff::none())
            .initial_token(bearer("valid"));
        let handle = layer.token_handle();
        let svc = layer.layer(api(&script, &seen));
        // A failed (forced) refresh starts a cool-down; the token stays.
        handle.refresh().await.unwrap_err();
        assert_eq!(script.calls(), 1);
        assert!(handle.state().cooling_for().is_some());
        assert!(handle.state().has_token());

        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(seen.all(), ["Bearer valid"], "sent once, not replayed");
        assert_eq!(script.calls(), 1, "not refreshed");
        // The token is now known to be refused: the next request is not sent with it, it fails
        // fast until the cool-down ends.
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        assert!(refresh_failed(&err).next_attempt_in().is_some());
        assert_eq!(seen.count(), 1);
        assert_eq!(script.calls(), 1);
        // After the cool-down, a request refreshes (and the endpoint is back).
        script.set(Mode::Issue);
        tokio::time::advance(Duration::from_secs(31)).await;
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(script.calls(), 2);
        assert_eq!(seen.all(), ["Bearer valid", "Bearer t2"]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn one_failure_is_one_cooldown_shared_by_every_clone_of_the_layer() {
    bounded(async {
        let script = Script::new(Mode::Unavailable, None);
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher()).retries(Backoff::none());
        // A clone with other options shares the token, and so its cool-down.
        let other = layer
            .clone()
            .max_replay_body(16)
            .leeway(Duration::from_secs(1));
        let a = layer.layer(api(&script, &seen));
        let b = other.layer(api(&script, &seen));
        let b2 = b.clone();

        let err = a.clone().oneshot(get("/")).await.unwrap_err();
        assert_eq!(refresh_failed(&err).next_attempt_in(), None);
        assert_eq!(script.calls(), 1);
        for svc in [b, b2] {
            let err = svc.oneshot(get("/")).await.unwrap_err();
            assert!(refresh_failed(&err).next_attempt_in().is_some());
        }
        assert_eq!(script.calls(), 1);
        assert!(other.token_handle().state().cooling_for().is_some());
        assert_eq!(seen.count(), 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A4. Retry-After from the real token endpoint.

type TokenClient = Client<HttpConnector, Full<Bytes>>;
type ApiClient = Refresh<Client<HttpConnector, ReplayBody<Full<Bytes>>>>;

fn oauth2_app(
    s: &Servers,
    refresh: &str,
) -> tower_auth_refresh::oauth2::OAuth2RefresherBuilder<TokenClient> {
    OAuth2Refresher::builder(s.token_url().parse().unwrap(), http_client())
        .client_id("app")
        .client_secret("app-secret", ClientAuth::Basic)
        .refresh_token(refresh)
}

fn oauth2_client(layer: RefreshLayer) -> (ApiClient, TokenHandle) {
    let handle = layer.token_handle();
    let client = ServiceBuilder::new()
        .layer(layer)
        .service(http_client::<ReplayBody<Full<Bytes>>>());
    (client, handle)
}

async fn status_of(client: &ApiClient, url: &str) -> Result<StatusCode, BoxError> {
    let res = client.clone().oneshot(get(url)).await?;
    let status = res.status();
    res.into_body().collect().await?;
    Ok(status)
}

#[tokio::test]
async fn a_token_endpoints_retry_after_extends_the_cooldown() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt0) = s.token.login();
        s.token
            .script(Scripted::new(StatusCode::SERVICE_UNAVAILABLE, None, "").retry_after("120"));
        let refresher = oauth2_app(&s, &rt0).build().unwrap();
        // A short base cool-down: only the Retry-After can make it two minutes.
        let layer = RefreshLayer::new(refresher)
            .retries(Backoff::none())
            .cooldown(Cooldown::new(
                Duration::from_millis(50),
                Duration::from_millis(100),
            ));
        let (client, handle) = oauth2_client(layer);
        let url = s.api_url();

        let err = status_of(&client, &url).await.unwrap_err();
        refresh_failed(&err);
        assert_eq!(s.token.requests(), 1);
        let cooling = handle.state().cooling_for().expect("a cool-down runs");
        assert!(
            cooling > Duration::from_secs(110) && cooling <= Duration::from_secs(120),
            "{cooling:?}"
        );
        // Requests fail fast, without a token request.
        let err = status_of(&client, &url).await.unwrap_err();
        let left = refresh_failed(&err).next_attempt_in().unwrap();
        assert!(left > Duration::from_secs(110), "{left:?}");
        assert_eq!(s.token.requests(), 1);
        assert_eq!(s.api.ok() + s.api.unauthorized(), 0);
        // The handle may still refresh: the endpoint is back.
        handle.refresh().await.unwrap();
        assert_eq!(s.token.requests(), 2);
        assert_eq!(status_of(&client, &url).await.unwrap(), StatusCode::OK);
        assert_eq!(s.api.ok(), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// B. Inside the leeway.

#[tokio::test(start_paused = true)]
async fn inside_the_leeway_a_failed_refresh_keeps_sending_the_current_token_until_it_expires() {
    bounded(async {
        let script = Script::new(Mode::Unavailable, None);
        script.accept("current");
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher())
            .leeway(Duration::from_secs(60))
            .retries(Backoff::none())
            .initial_token(expiring("current", Duration::from_secs(600)));
        let handle = layer.token_handle();
        let svc = layer.layer(api(&script, &seen));
        // 50 s before expiry, inside the 60 s leeway.
        tokio::time::advance(Duration::from_secs(550)).await;
        assert_eq!(handle.state().refresh_in(), Some(Duration::ZERO));

        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(script.calls(), 1, "it tried to refresh first");
        assert_eq!(script.call_log()[0].reason, "expired");
        assert_eq!(seen.all(), ["Bearer current"]);
        // During the cool-down the token keeps going out, without another refresh.
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(script.calls(), 1);
        assert_eq!(seen.count(), 2);

        // Past its expiry it is never sent.
        tokio::time::advance(Duration::from_secs(51)).await;
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        refresh_failed(&err);
        assert_eq!(seen.count(), 2);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// C. Tokens that are dead on arrival.

#[tokio::test(start_paused = true)]
async fn an_expired_token_from_the_refresher_never_replaces_a_valid_one() {
    bounded(async {
        let script = Script::new(Mode::DeadOnArrival, None);
        script.accept("valid");
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher())
            .initial_token(expiring("valid", Duration::from_secs(600)));
        let handle = layer.token_handle();
        let mut events = handle.subscribe();
        let svc = layer.layer(api(&script, &seen));
        let generation = handle.state().generation();
        // Inside the 30 s leeway: the request refreshes first, gets a dead token.
        tokio::time::advance(Duration::from_secs(580)).await;

        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            script.calls(),
            1,
            "a dead token is not retried by the backoff"
        );
        assert_eq!(seen.all(), ["Bearer valid"]);
        assert_eq!(handle.state().generation(), generation);
        assert_eq!(
            drain(&mut events),
            [RefreshEvent::RefreshFailed {
                generation,
                terminal: false
            }]
        );
        // A failed transient refresh: a cool-down, and the valid token serves requests meanwhile.
        assert!(handle.state().cooling_for().is_some());
        for _ in 0..5 {
            let res = svc.clone().oneshot(get("/")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
        assert_eq!(script.calls(), 1);
        assert!(seen.all().iter().all(|a| a == "Bearer valid"));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn with_no_valid_token_an_expired_token_serves_the_waiters_of_its_refresh_once() {
    bounded(async {
        let script = Script::new(Mode::DeadOnArrival, None);
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher());
        let handle = layer.token_handle();
        let svc = layer.layer(api(&script, &seen));

        // Five requests wait on one refresh and all go out with its (dead) token.
        let tasks: Vec<_> = (0..5)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("/"))))
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        assert_eq!(script.calls(), 1);
        assert_eq!(seen.all(), vec!["Bearer dead-1"; 5]);
        // What happens next: the token is expired the moment it is stored, so it is never sent
        // again; the next request refreshes first. A refresher that only hands out dead tokens
        // costs one call per request (concurrent requests share it) and no cool-down starts,
        // since nothing failed.
        assert_eq!(handle.state().expires_in(), Some(Duration::ZERO));
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(script.calls(), 2);
        assert_eq!(seen.all().last().unwrap(), "Bearer dead-2");
        assert_eq!(handle.state().cooling_for(), None);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// D. Refresh-ahead by lifetime.

/// A token of `life` under `rule` (default leeway): no background refresh one second before
/// `due`, exactly one from `due` on while it runs, and the new token afterwards.
async fn refresh_ahead_case(rule: RefreshAhead, life: Duration, due: Duration) {
    let gate = Arc::new(Semaphore::new(0));
    let script = Script::gated(Mode::Issue, Some(life), &gate);
    script.accept("t0");
    let seen = Seen::default();
    let layer = RefreshLayer::new(script.refresher())
        .refresh_ahead(rule.clone())
        .initial_token(expiring("t0", life));
    let handle = layer.token_handle();
    let svc = layer.layer(api(&script, &seen));
    let label = format!("{rule:?}, lifetime {life:?}");

    for at in [Duration::ZERO, due / 2, due - Duration::from_secs(1)] {
        tokio::time::advance(at - (life - handle.state().expires_in().unwrap())).await;
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        settle().await;
        assert_eq!(script.calls(), 0, "{label}: too early at {at:?}");
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    // Due: requests go out at once with the current token; one background refresh starts
    // and, while it runs, no second one.
    for _ in 0..20 {
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        settle().await;
    }
    let calls = script.call_log();
    assert_eq!(calls.len(), 1, "{label}");
    assert_eq!(calls[0].reason, "background");
    assert!(handle.state().refreshing());
    assert!(seen.all().iter().all(|a| a == "Bearer t0"), "{label}");
    gate.add_permits(1);
    settle().await;
    assert!(!handle.state().refreshing());
    let res = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    settle().await;
    assert_eq!(seen.all().last().unwrap(), "Bearer t1", "{label}");
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_by_lifetime_starts_one_background_refresh_at_the_computed_moment() {
    bounded(async {
        let min = |m: u64| Duration::from_secs(60 * m);
        // AWS's table: a 15-min token gets a 5-min window (not yet at 10 min left; at 5 min left).
        refresh_ahead_case(RefreshAhead::aws(), min(15), min(10)).await;
        // A 1-hour token gets 15 minutes.
        refresh_ahead_case(RefreshAhead::aws(), min(60), min(45)).await;
        // A 6-min token: 5 minutes, capped at half the lifetime (3 min).
        refresh_ahead_case(RefreshAhead::aws(), min(6), min(3)).await;
        // A rule of the lifetime: three quarters of 400 s is 300 s, capped at 200 s.
        refresh_ahead_case(
            RefreshAhead::by_lifetime(|life| life * 3 / 4),
            Duration::from_secs(400),
            Duration::from_secs(200),
        )
        .await;
        // A tenth of 1000 s: 100 s before expiry.
        refresh_ahead_case(
            RefreshAhead::by_lifetime(|life| life / 10),
            Duration::from_secs(1000),
            Duration::from_secs(900),
        )
        .await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// E. The bounded refresh.

#[tokio::test(start_paused = true)]
async fn a_refresher_that_never_returns_fails_every_waiter_within_the_refresh_timeout() {
    bounded(async {
        let script = Script::new(Mode::Hang, None);
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher());
        let handle = layer.token_handle();
        let svc = layer.layer(api(&script, &seen));
        let start = Instant::now();

        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    let result = svc.oneshot(get("/")).await;
                    (result, Instant::now())
                })
            })
            .collect();
        for task in tasks {
            let (result, done) = task.await.unwrap();
            let err = result.unwrap_err();
            let failed = refresh_failed(&err);
            let cause = std::error::Error::source(&**failed.refresh_error())
                .unwrap()
                .to_string();
            assert!(cause.contains("did not finish within 30000 ms"), "{cause}");
            assert!(
                done - start <= Duration::from_secs(30),
                "{:?}",
                done - start
            );
        }
        assert_eq!(
            script.calls(),
            1,
            "the timeout used the whole backoff budget"
        );
        assert_eq!(seen.count(), 0);
        assert!(!handle.state().refreshing());

        // The layer is not wedged: a token installed by hand, refused by the API, is refreshed
        // (the refresher works again) and the request replayed.
        script.set(Mode::Issue);
        handle.set_token(bearer("installed"));
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(seen.all(), ["Bearer installed", "Bearer t2"]);
        assert_eq!(script.calls(), 2);
        let generation = handle.state().generation();
        let state = handle.refresh().await.unwrap();
        assert_eq!(state.generation(), generation + 1);
        assert_eq!(script.calls(), 3);
    })
    .await;
}

#[tokio::test]
async fn an_oauth2_rotation_hook_that_never_returns_is_cut_off_and_the_session_goes_on() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt0) = s.token.login();
        let stuck = Arc::new(AtomicBool::new(true));
        let hung = Arc::new(AtomicUsize::new(0));
        let persisted = Arc::new(Mutex::new(Vec::new()));
        let refresher = {
            let (stuck, hung, persisted) = (stuck.clone(), hung.clone(), persisted.clone());
            oauth2_app(&s, &rt0)
                // The bound of each token request, and of the hook: shorter than the layer's
                // refresh timeout, so the refresh ends with the hook's own failure.
                .timeout(Duration::from_millis(1_000))
                .on_rotation(move |new: RefreshToken| {
                    let (stuck, hung, persisted) = (stuck.clone(), hung.clone(), persisted.clone());
                    async move {
                        if stuck.load(Ordering::SeqCst) {
                            hung.fetch_add(1, Ordering::SeqCst);
                            std::future::pending::<()>().await;
                        }
                        persisted.lock().unwrap().push(new.secret().to_owned());
                        Ok::<_, Infallible>(())
                    }
                })
                .build()
                .unwrap()
        };
        let layer = RefreshLayer::new(refresher)
            .retries(Backoff::none())
            // Long enough for the loopback token request on a loaded machine; the hook is
            // what must be cut off.
            .refresh_timeout(Duration::from_secs(2));
        let (client, handle) = oauth2_client(layer);
        let url = s.api_url();

        // Three requests wait on the refresh whose hook hangs: all fail, bounded by the
        // refresher's bound of the hook (it runs on when the layer stops waiting, but not
        // for ever: it would hold up every later refresh).
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { status_of(&client, &url).await })
            })
            .collect();
        for task in tasks {
            let err = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("bounded by the refresh timeout")
                .unwrap()
                .unwrap_err();
            // The whole chain of causes, as text.
            let mut cause = String::new();
            let mut next = std::error::Error::source(&**refresh_failed(&err).refresh_error());
            while let Some(e) = next {
                cause.push_str(&format!("{e}; "));
                next = e.source();
            }
            assert!(
                cause.contains("persisting the rotated refresh token failed")
                    && cause.contains("the rotation hook did not finish within 1000 ms"),
                "{cause}"
            );
        }
        assert_eq!(
            hung.load(Ordering::SeqCst),
            1,
            "the hook was called, and hung"
        );
        assert_eq!(
            s.token.grants(),
            1,
            "one token request, rotated on the server"
        );
        assert!(persisted.lock().unwrap().is_empty());
        assert!(!handle.state().refreshing());

        // A token installed by hand, refused by the API: refreshed with the rotated refresh
        // token (kept before the hook ran), the hook works now, the request is replayed.
        stuck.store(false, Ordering::SeqCst);
        handle.set_token(bearer("installed-by-hand"));
        assert_eq!(status_of(&client, &url).await.unwrap(), StatusCode::OK);
        assert_eq!(s.api.unauthorized(), 1);
        assert_eq!(s.api.ok(), 1);
        assert_eq!(s.token.grants(), 2);
        assert_eq!(s.token.reuse_detected(), 0);
        handle.refresh().await.unwrap();
        assert_eq!(s.token.grants(), 3);
        assert_eq!(*persisted.lock().unwrap(), s.token.rotated()[1..]);
        assert_eq!(status_of(&client, &url).await.unwrap(), StatusCode::OK);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// F. A terminal failure in the background.

#[tokio::test(start_paused = true)]
async fn a_terminal_failure_of_a_background_refresh_ends_the_session_once() {
    bounded(async {
        let script = Script::new(Mode::Terminal, None);
        script.accept("t0");
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher())
            .leeway(Duration::from_secs(5))
            .refresh_ahead(Duration::from_secs(40))
            .initial_token(expiring("t0", Duration::from_secs(100)));
        let handle = layer.token_handle();
        let mut events = handle.subscribe();
        let svc = layer.layer(api(&script, &seen));
        let generation = handle.state().generation();

        tokio::time::advance(Duration::from_secs(70)).await;
        // Inside the window: the request goes out with the valid token, the refresh runs behind.
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        settle().await;
        assert_eq!(script.calls(), 1);
        assert_eq!(script.call_log()[0].reason, "background");
        assert_eq!(
            drain(&mut events),
            [
                RefreshEvent::RefreshFailed {
                    generation,
                    terminal: true
                },
                RefreshEvent::SessionEnded { generation }
            ]
        );
        assert!(handle.state().session_ended());
        // Later requests fail fast: no refresher call, nothing sent.
        for _ in 0..5 {
            let err = svc.clone().oneshot(get("/")).await.unwrap_err();
            assert!(err.is::<SessionEnded>(), "{err:?}");
        }
        settle().await;
        assert_eq!(script.calls(), 1);
        assert_eq!(seen.count(), 1);
        assert!(drain(&mut events).is_empty());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// G. An API that refuses every token.

#[tokio::test(start_paused = true)]
async fn an_always_401_api_costs_one_token_call_per_request_that_waited_for_its_token() {
    bounded(async {
        let script = Script::new(Mode::Issue, None);
        let seen = Seen::default();
        // The API accepts nothing.
        let refuse_all = service_fn({
            let seen = seen.clone();
            move |req: ApiRequest| {
                seen.0.lock().unwrap().push(authorization(req.headers()));
                async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .body(String::new())
                            .unwrap(),
                    )
                }
            }
        });
        let svc = RefreshLayer::new(script.refresher()).layer(refuse_all);

        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        let twice = err
            .downcast_ref::<UnauthorizedAfterRefresh>()
            .unwrap_or_else(|| panic!("{err:?}"));
        assert!(twice.first().is_none(), "it waited for its token");
        assert_eq!(twice.last().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(script.calls(), 1);
        assert_eq!(seen.all(), ["Bearer t1"]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_always_401_api_costs_one_refresh_and_one_replay_for_a_request_sent_with_a_token() {
    bounded(async {
        let script = Script::new(Mode::Issue, None);
        let seen = Seen::default();
        let refuse_all = service_fn({
            let seen = seen.clone();
            move |req: ApiRequest| {
                seen.0.lock().unwrap().push(authorization(req.headers()));
                async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .body(String::new())
                            .unwrap(),
                    )
                }
            }
        });
        let svc = RefreshLayer::new(script.refresher())
            .initial_token(bearer("t0"))
            .layer(refuse_all);

        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        let twice = err
            .downcast_ref::<UnauthorizedAfterRefresh>()
            .unwrap_or_else(|| panic!("{err:?}"));
        assert_eq!(
            twice.first().map(|h| h.status()),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(twice.last().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(script.calls(), 1);
        assert_eq!(script.call_log()[0].reason, "unauthorized");
        assert_eq!(seen.all(), ["Bearer t0", "Bearer t1"]);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// H. Suspend.

/// A clock whose monotonic and wall readings the test moves separately, as a machine that
/// slept does: the monotonic clock stood still, the wall clock did not.
#[derive(Debug, Clone)]
struct SuspendClock {
    mono: Instant,
    wall: SystemTime,
    offsets: Arc<Mutex<(Duration, Duration)>>,
    /// How many times the layer read the wall clock.
    wall_reads: Arc<AtomicUsize>,
}

impl SuspendClock {
    fn new() -> Self {
        Self {
            mono: Instant::now(),
            wall: SystemTime::now(),
            offsets: Arc::default(),
            wall_reads: Arc::default(),
        }
    }

    fn advance(&self, mono: Duration, wall: Duration) {
        let mut offsets = self.offsets.lock().unwrap();
        offsets.0 += mono;
        offsets.1 += wall;
    }
}

impl Clock for SuspendClock {
    fn now(&self) -> Instant {
        self.mono + self.offsets.lock().unwrap().0
    }

    fn wall(&self) -> SystemTime {
        self.wall_reads.fetch_add(1, Ordering::SeqCst);
        self.wall + self.offsets.lock().unwrap().1
    }
}

/// A token endpoint issuing ten-minute tokens with `t0` accepted, and a clock the test moves.
fn suspend_setup() -> (Script, Seen, SuspendClock) {
    let script = Script::new(Mode::Issue, Some(Duration::from_secs(600)));
    script.accept("t0");
    (script, Seen::default(), SuspendClock::new())
}

/// The wall clock costs a clock read of its own: requests with a token that has an expiry
/// read it at most once per 50 ms of the monotonic clock, and the next read still catches a
/// machine that slept through the expiry.
#[tokio::test]
async fn the_wall_clock_is_read_once_per_50_ms_and_still_catches_a_suspend() {
    guard(async {
        let (script, seen, clock) = suspend_setup();
        let layer = RefreshLayer::new(script.refresher()).clock(clock.clone());
        let svc = layer
            .initial_token(expiring("t0", Duration::from_secs(600)))
            .layer(api(&script, &seen));

        let before = clock.wall_reads.load(Ordering::SeqCst);
        for _ in 0..100 {
            let res = svc.clone().oneshot(get("/")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
        let reads = clock.wall_reads.load(Ordering::SeqCst) - before;
        assert_eq!(
            reads, 1,
            "100 requests within 50 ms read the wall clock {reads} times"
        );

        // An hour of sleep, then 50 ms of the monotonic clock: the next request checks.
        clock.advance(Duration::from_millis(50), Duration::from_secs(3600));
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(script.calls(), 1);
        assert_eq!(script.call_log()[0].reason, "expired");
        assert_eq!(seen.all().last().map(String::as_str), Some("Bearer t1"));
        assert_eq!(
            seen.all().len(),
            101,
            "no request went out with the expired token"
        );
    })
    .await;
}

#[tokio::test]
async fn after_a_suspend_past_the_expiry_the_token_is_refreshed_before_it_is_sent() {
    guard(async {
        let (script, seen, clock) = suspend_setup();
        let layer = RefreshLayer::new(script.refresher()).clock(clock.clone());
        let svc = layer
            .initial_token(expiring("t0", Duration::from_secs(600)))
            .layer(api(&script, &seen));

        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // An hour of sleep: one second on the monotonic clock.
        clock.advance(Duration::from_secs(1), Duration::from_secs(3600));
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(script.calls(), 1);
        assert_eq!(script.call_log()[0].reason, "expired");
        assert_eq!(seen.all(), ["Bearer t0", "Bearer t1"]);
    })
    .await;
}

/// A clock an hour ahead of Tokio's (as in the `Clock` example): the cool-down is measured on
/// it, and so is the `next_attempt_in` a request is told.
#[derive(Debug, Clone, Copy)]
struct HourAhead;

impl Clock for HourAhead {
    fn now(&self) -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }
}

#[tokio::test(start_paused = true)]
async fn next_attempt_in_is_measured_on_the_injected_clock() {
    bounded(async {
        let script = Script::new(Mode::Unavailable, None);
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher())
            .retries(Backoff::none())
            .clock(HourAhead);
        let handle = layer.token_handle();
        let svc = layer.layer(api(&script, &seen));
        svc.clone().oneshot(get("/")).await.unwrap_err();
        let cooling = handle.state().cooling_for().expect("a cool-down runs");
        assert!(cooling <= Duration::from_secs(30), "{cooling:?}");
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        let left = refresh_failed(&err).next_attempt_in().unwrap();
        assert_eq!(left, cooling, "the error and the handle agree");
        assert_eq!(script.calls(), 1);
    })
    .await;
}

/// A background refresh that a token endpoint answers with `Retry-After`: the next background
/// attempt waits that long, not the short background backoff (1 s, 2 s, 4 s, ...); the
/// requests keep the valid token meanwhile.
#[tokio::test(start_paused = true)]
async fn a_retry_after_spaces_the_background_refreshes_too() {
    bounded(async {
        let script = Script::new(Mode::Throttled(Duration::from_secs(60)), None);
        script.accept("t0");
        let seen = Seen::default();
        let layer = RefreshLayer::new(script.refresher())
            .refresh_ahead(Duration::from_secs(120))
            .initial_token(expiring("t0", Duration::from_secs(300)));
        let svc = layer.layer(api(&script, &seen));
        let origin = Instant::now();
        // From the start of the window (180 s) to the leeway (270 s), a request a second.
        tokio::time::advance(Duration::from_secs(180)).await;
        for _ in 180..270 {
            let res = svc.clone().oneshot(get("/")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            settle().await;
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let at: Vec<_> = script
            .call_log()
            .iter()
            .map(|c| (c.at - origin).as_secs())
            .collect();
        assert!(script.call_log().iter().all(|c| c.reason == "background"));
        assert_eq!(at, [180, 240], "background refreshes at {at:?} s");
        assert!(seen.all().iter().all(|a| a == "Bearer t0"));
    })
    .await;
}
