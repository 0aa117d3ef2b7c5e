//! Token lifecycle and refresh policy: expiry, refresh-ahead, retries, session end, the handle,
//! RFC 6750 gating, custom triggers, replay policy and origin scoping.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use proptest::prelude::*;
use tokio::sync::Semaphore;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::error::{RefreshRejected, SessionEnded};
use tower_auth_refresh::policy::{default_trigger, parse_challenges};
use tower_auth_refresh::{
    Backoff, BoxError, Clock, NoReplay, RefreshError, RefreshEvent, RefreshLayer, ReplayBody,
    ReplayMethods, Token, TokenRefresher, refresh_fn,
};
use tower_auth_refresh::{RefreshContext, RefreshReason};
use tower_http::follow_redirect::FollowRedirectLayer;

use support::{InMemoryApi, authorization, get, guard, http_client, rejecting, run_paused, serve};

type Body = Full<Bytes>;

/// What the fake API saw: the Authorization header of every request (or "-").
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn push(&self, req_headers: &HeaderMap) {
        self.0.lock().unwrap().push(authorization(req_headers));
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// An in-memory API that accepts only `Bearer <accepted>` and answers 401 otherwise.
fn api(seen: Seen, accepted: Arc<Mutex<String>>) -> impl InMemoryApi<String> {
    service_fn(move |req: Request<ReplayBody<Body>>| {
        seen.push(req.headers());
        let ok = req
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| *v == format!("Bearer {}", accepted.lock().unwrap()));
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        async move {
            Ok(Response::builder()
                .status(status)
                .body(String::new())
                .unwrap())
        }
    })
}

/// Counts calls; hands out `t1`, `t2`, ... with `lifetime`, and makes the API accept it.
#[derive(Clone)]
struct Issuer {
    calls: Arc<AtomicUsize>,
    accepted: Arc<Mutex<String>>,
    lifetime: Option<Duration>,
    gate: Option<Arc<Semaphore>>,
    fail: Arc<Mutex<Option<bool>>>, // Some(terminal)
}

impl Issuer {
    fn new(lifetime: Option<Duration>) -> Self {
        Self {
            calls: Arc::default(),
            accepted: Arc::new(Mutex::new(String::new())),
            lifetime,
            gate: None,
            fail: Arc::default(),
        }
    }
    /// An issuer whose calls each wait for a permit of the returned gate first.
    fn gated(lifetime: Option<Duration>, permits: usize) -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(permits));
        let issuer = Self {
            gate: Some(gate.clone()),
            ..Self::new(lifetime)
        };
        (issuer, gate)
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl TokenRefresher for Issuer {
    type Future = futures_util::future::BoxFuture<'static, Result<Token, RefreshError>>;

    fn refresh(&self, _ctx: RefreshContext) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let this = self.clone();
        Box::pin(async move {
            if let Some(gate) = &this.gate {
                gate.acquire().await.unwrap().forget();
            }
            if let Some(terminal) = *this.fail.lock().unwrap() {
                return Err(if terminal {
                    RefreshError::terminal("invalid_grant")
                } else {
                    RefreshError::transient("503")
                });
            }
            let secret = format!("t{n}");
            *this.accepted.lock().unwrap() = secret.clone();
            let token = Token::bearer(secret)?;
            Ok(match this.lifetime {
                Some(l) => token.with_expires_in(l),
                None => token,
            })
        })
    }
}

#[test]
fn short_lived_token_is_not_refreshed_on_every_request() {
    run_paused(Duration::from_secs(3600), async {
        // A 5 s token with the default 30 s leeway: the leeway is clamped to 0.5 s.
        let issuer = Issuer::new(Some(Duration::from_secs(5)));
        let seen = Seen::default();
        let svc =
            RefreshLayer::new(issuer.clone()).layer(api(seen.clone(), issuer.accepted.clone()));
        for _ in 0..1000 {
            let res = svc.clone().oneshot(get("/")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            tokio::time::advance(Duration::from_millis(5)).await;
        }
        assert_eq!(seen.count(), 1000);
        assert!(
            issuer.calls() <= 3,
            "{} refreshes for 1,000 requests over 5 s",
            issuer.calls()
        );
    });
}

#[test]
fn expired_token_is_refreshed_once_for_concurrent_requests() {
    run_paused(Duration::from_secs(3600), async {
        let (issuer, gate) = Issuer::gated(Some(Duration::from_secs(60)), 1);
        let seen = Seen::default();
        let svc =
            RefreshLayer::new(issuer.clone()).layer(api(seen.clone(), issuer.accepted.clone()));
        svc.clone().oneshot(get("/")).await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        let calls: Vec<_> = (0..100)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("/"))))
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        gate.add_permits(1);
        for c in calls {
            assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        assert_eq!(issuer.calls(), 2);
        // The first request went out with t1; each of the 100 concurrent ones waited for the
        // one refresh and went out once, with t2.
        let mut expected = vec!["Bearer t1".to_owned()];
        expected.extend(std::iter::repeat_n("Bearer t2".to_owned(), 100));
        assert_eq!(seen.all(), expected);
        assert_eq!(seen.all().iter().filter(|a| *a == "Bearer t2").count(), 100);
    });
}

#[test]
fn refresh_ahead_runs_one_background_refresh_without_delaying_requests() {
    run_paused(Duration::from_secs(3600), async {
        let (issuer, gate) = Issuer::gated(Some(Duration::from_secs(100)), 1);
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone())
            .leeway(Duration::from_secs(5))
            .refresh_ahead(Duration::from_secs(20));
        let handle = layer.token_handle();
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));
        svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(issuer.calls(), 1);

        // Inside the window: the background refresh is stuck on the gate, yet every request goes
        // out at once with the still-valid token, and only one refresh starts.
        tokio::time::advance(Duration::from_secs(85)).await;
        let accepted_t1 = issuer.accepted.clone();
        for _ in 0..50 {
            let res = svc.clone().oneshot(get("/")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            tokio::task::yield_now().await;
        }
        assert_eq!(issuer.calls(), 2);
        assert_eq!(*accepted_t1.lock().unwrap(), "t1");
        assert!(seen.all().iter().all(|a| a == "Bearer t1"));
        gate.add_permits(1);
        support::yield_until(
            "the background refresh installed t2",
            support::YIELD_BOUND,
            || handle.state().generation() >= 2,
        )
        .await;
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(seen.all().last().unwrap(), "Bearer t2");
        assert_eq!(issuer.calls(), 2);
    });
}

/// A refusal that joins a background refresh makes it a foreground one: a transient failure
/// of its attempt is retried with backoff, as for any refusal, and the request is replayed
/// with the token of the retry (not failed after one background attempt).
#[test]
fn a_refusal_joining_a_background_refresh_gets_its_retries() {
    run_paused(Duration::from_secs(3600), async {
        let (issuer, gate) = Issuer::gated(Some(Duration::from_secs(100)), 1);
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone())
            .leeway(Duration::from_secs(5))
            .refresh_ahead(Duration::from_secs(40));
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));
        svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(issuer.calls(), 1);

        // Inside the window: a request starts the background refresh (held at the gate) and
        // goes out with t1, which the API has revoked meanwhile.
        tokio::time::advance(Duration::from_secs(70)).await;
        *issuer.accepted.lock().unwrap() = "revoked".to_owned();
        *issuer.fail.lock().unwrap() = Some(false);
        let refused = tokio::spawn(svc.clone().oneshot(get("/refused")));
        support::yield_until(
            "the request was refused and the background refresh started",
            support::YIELD_BOUND,
            || seen.count() == 2 && issuer.calls() == 2,
        )
        .await;
        for _ in 0..support::YIELD_BOUND {
            tokio::task::yield_now().await;
        }
        // The background attempt fails; its retry (after a backoff) waits at the gate.
        gate.add_permits(1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(issuer.calls(), 3, "the failed attempt was retried");
        *issuer.fail.lock().unwrap() = None;
        gate.add_permits(1);
        let res = refused.await.unwrap().expect("replayed after the retry");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(seen.all(), ["Bearer t1", "Bearer t1", "Bearer t3"]);
    });
}

#[test]
fn failed_background_refresh_keeps_the_token_and_backs_off() {
    run_paused(Duration::from_secs(3600), async {
        let issuer = Issuer::new(Some(Duration::from_secs(100)));
        let seen = Seen::default();
        // The background pause follows the cool-down (2–4 s here, jittered), at least 1 s.
        let layer = RefreshLayer::new(issuer.clone())
            .leeway(Duration::from_secs(5))
            .refresh_ahead(Duration::from_secs(40))
            .cooldown(tower_auth_refresh::Cooldown::new(
                Duration::from_secs(4),
                Duration::from_secs(4),
            ));
        let mut events = layer.token_handle().subscribe();
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));
        svc.clone().oneshot(get("/")).await.unwrap();
        *issuer.fail.lock().unwrap() = Some(false);

        tokio::time::advance(Duration::from_secs(70)).await;
        svc.clone().oneshot(get("/")).await.unwrap();
        // Bounded: at most a few events, each awaited for at most a minute of (paused) time.
        let mut failed = false;
        for _ in 0..16 {
            let event = tokio::time::timeout(Duration::from_secs(60), events.recv())
                .await
                .expect("no RefreshFailed event: the background refresh never reported");
            match event {
                Some(Ok(RefreshEvent::RefreshFailed { .. })) => {
                    failed = true;
                    break;
                }
                Some(_) => {}
                None => panic!("the event stream closed before a RefreshFailed event"),
            }
        }
        assert!(failed, "16 events and none was RefreshFailed");
        assert_eq!(issuer.calls(), 2);
        // Within the backoff: requests keep the old token and start no refresh.
        for _ in 0..20 {
            assert_eq!(
                svc.clone().oneshot(get("/")).await.unwrap().status(),
                StatusCode::OK
            );
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(issuer.calls(), 2);
        // Not before the pause ends (at least 2 s)...
        tokio::time::advance(Duration::from_millis(1500)).await;
        svc.clone().oneshot(get("/")).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(issuer.calls(), 2);
        // ...and after it, one more background attempt.
        tokio::time::advance(Duration::from_secs(3)).await;
        svc.clone().oneshot(get("/")).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(issuer.calls(), 3);
        assert!(seen.all().iter().all(|a| a == "Bearer t1"));
    });
}

/// A clock the test moves by hand.
#[derive(Debug, Clone)]
struct ManualClock(Arc<Mutex<tokio::time::Instant>>);

impl Clock for ManualClock {
    fn now(&self) -> tokio::time::Instant {
        *self.0.lock().unwrap()
    }
}

#[tokio::test]
async fn expiry_follows_the_injected_clock() {
    guard(async {
        let clock = ManualClock(Arc::new(Mutex::new(tokio::time::Instant::now())));
        let issuer = Issuer::new(Some(Duration::from_secs(3600)));
        let seen = Seen::default();
        let svc = RefreshLayer::new(issuer.clone())
            .clock(clock.clone())
            .layer(api(seen.clone(), issuer.accepted.clone()));
        svc.clone().oneshot(get("/")).await.unwrap();
        svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(issuer.calls(), 1);
        *clock.0.lock().unwrap() += Duration::from_secs(3600);
        svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(issuer.calls(), 2);
    })
    .await;
}

#[tokio::test]
async fn session_end_one_call_one_event_every_waiter_typed_then_no_network_until_rearmed() {
    guard(async {
        let (issuer, gate) = Issuer::gated(None, 0);
        *issuer.fail.lock().unwrap() = Some(true);
        let seen = Seen::default();
        let layer =
            RefreshLayer::new(issuer.clone()).initial_token(Token::bearer("stale").unwrap());
        let handle = layer.token_handle();
        let mut events = handle.subscribe();
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));

        let calls: Vec<_> = (0..500)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("/"))))
            .collect();
        // Every request either reached the server (and was refused) or, once the first refusal
        // was known, waits for the refresh instead of sending the refused token.
        support::yield_until("the first refresh started", support::YIELD_BOUND, || {
            issuer.calls() >= 1
        })
        .await;
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1);
        let mut refused = 0;
        for c in calls {
            let err = c.await.unwrap().unwrap_err();
            let rejected = err.downcast_ref::<RefreshRejected>().expect("typed");
            if let Some(head) = rejected.unauthorized() {
                assert_eq!(head.status(), StatusCode::UNAUTHORIZED);
                refused += 1;
            }
        }
        let sent = seen.count();
        assert!(sent >= 1, "the first request was sent");
        assert_eq!(refused, sent, "each refused request keeps its 401");
        assert_eq!(issuer.calls(), 1);
        let mut ended = 0;
        while let Some(ev) = events.try_recv() {
            ended += usize::from(matches!(ev, Ok(RefreshEvent::SessionEnded { .. })));
        }
        assert_eq!(ended, 1);
        assert!(handle.state().session_ended());

        // Fail fast: no refresher call, no network.
        for _ in 0..100 {
            let err = svc.clone().oneshot(get("/")).await.unwrap_err();
            assert!(err.is::<SessionEnded>());
        }
        assert_eq!(seen.count(), sent);
        assert_eq!(issuer.calls(), 1);

        // Re-armed by a login.
        *issuer.accepted.lock().unwrap() = "relogin".into();
        handle.set_token(Token::bearer("relogin").unwrap());
        assert_eq!(
            svc.clone().oneshot(get("/")).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(seen.count(), sent + 1);
    })
    .await;
}

#[tokio::test]
async fn handle_installs_clears_forces_and_reports() {
    guard(async {
        let issuer = Issuer::new(Some(Duration::from_secs(600)));
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone());
        let handle = layer.token_handle();
        let mut events = handle.subscribe();
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));

        assert!(!handle.state().has_token());
        let generation = handle.set_token(Token::bearer("login").unwrap());
        assert_eq!(generation, 1);
        *issuer.accepted.lock().unwrap() = "login".into();
        assert_eq!(
            svc.clone().oneshot(get("/")).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(issuer.calls(), 0);

        // A forced refresh always calls the refresher.
        let state = handle.refresh().await.unwrap();
        assert_eq!(state.generation(), 2);
        assert_eq!(issuer.calls(), 1);
        assert!(state.expires_in().unwrap() <= Duration::from_secs(600));
        assert!(!format!("{state:?}{handle:?}").contains("t1"));

        // Two forced refreshes at once share one refresher call.
        let (a, b) = tokio::join!(handle.refresh(), handle.refresh());
        assert_eq!(a.unwrap().generation(), b.unwrap().generation());
        assert_eq!(issuer.calls(), 2);

        // Logout: fail fast until a token is installed.
        handle.clear();
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        assert!(err.is::<SessionEnded>());
        assert_eq!(issuer.calls(), 2);

        let mut kinds = Vec::new();
        while let Some(Ok(ev)) = events.try_recv() {
            kinds.push(ev);
        }
        assert_eq!(kinds[0], RefreshEvent::Installed { generation: 1 });
        assert_eq!(kinds[1], RefreshEvent::Refreshed { generation: 2 });
        assert!(matches!(kinds.last(), Some(RefreshEvent::Cleared { .. })));
    })
    .await;
}

/// An API that answers `Bearer old` only once the test adds a permit to `release` (a late
/// response), refuses the `refused` headers with 401, and accepts anything else.
fn late_api(
    seen: &Seen,
    release: &Arc<Semaphore>,
    refused: &'static [&'static str],
) -> impl InMemoryApi<String> {
    let (seen, release) = (seen.clone(), release.clone());
    service_fn(move |req: Request<ReplayBody<Body>>| {
        seen.push(req.headers());
        let auth = req.headers()[AUTHORIZATION].clone();
        let release = release.clone();
        async move {
            if auth == "Bearer old" {
                release.acquire().await.unwrap().forget();
            }
            let status = if refused.iter().any(|r| auth == *r) {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(String::new())
                    .unwrap(),
            )
        }
    })
}

#[tokio::test]
async fn late_401_for_a_token_older_than_an_installed_one_reuses_the_installed_one() {
    guard(async {
        let issuer = Issuer::new(None);
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone()).initial_token(Token::bearer("old").unwrap());
        let handle = layer.token_handle();
        // An API that holds the first response until the new token is installed.
        let release = Arc::new(Semaphore::new(0));
        let svc = layer.layer(late_api(&seen, &release, &["Bearer old"]));
        let call = tokio::spawn(svc.oneshot(get("/")));
        support::yield_until(
            "the request with the old token reached the API",
            support::YIELD_BOUND,
            || seen.count() >= 1,
        )
        .await;
        handle.set_token(Token::bearer("installed").unwrap());
        release.add_permits(1);
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(seen.all(), ["Bearer old", "Bearer installed"]);
        assert_eq!(issuer.calls(), 0);
    })
    .await;
}

/// A late 401 for a token older than an installed one that the API has since refused: the
/// refused token is not the answer. The late request waits for the refresh the refusal
/// started and is replayed with its token; the refused token is sent once only.
#[tokio::test]
async fn late_401_for_an_older_token_never_reuses_an_installed_token_since_refused() {
    guard(async {
        let (issuer, gate) = Issuer::gated(None, 0);
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone()).initial_token(Token::bearer("old").unwrap());
        let handle = layer.token_handle();
        // `old` is answered 401 once the test releases it, `installed` at once; the issuer's
        // tokens are accepted.
        let release = Arc::new(Semaphore::new(0));
        let svc = layer.layer(late_api(
            &seen,
            &release,
            &["Bearer old", "Bearer installed"],
        ));
        let late = tokio::spawn(svc.clone().oneshot(get("/a")));
        support::yield_until(
            "the request with the old token reached the API",
            support::YIELD_BOUND,
            || seen.count() >= 1,
        )
        .await;
        handle.set_token(Token::bearer("installed").unwrap());
        let refused = tokio::spawn(svc.clone().oneshot(get("/c")));
        support::yield_until(
            "the installed token was refused and a refresh started",
            support::YIELD_BOUND,
            || issuer.calls() >= 1,
        )
        .await;
        // The late 401 for `old` comes in while that refresh runs.
        release.add_permits(1);
        for _ in 0..support::YIELD_BOUND {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            seen.all()
                .iter()
                .filter(|a| *a == "Bearer installed")
                .count(),
            1,
            "the refused token is not sent again: {:?}",
            seen.all()
        );
        gate.add_permits(1);
        let late = late.await.unwrap().expect("the late request is replayed");
        assert_eq!(late.status(), StatusCode::OK);
        assert_eq!(refused.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(issuer.calls(), 1, "one refresh for both");
        assert_eq!(
            seen.all(),
            ["Bearer old", "Bearer installed", "Bearer t1", "Bearer t1"]
        );
    })
    .await;
}

/// A token installed while an older refresh runs, then refused by the API (a request sent
/// with it joins that refresh): the refresh's answer is not the refused token. The refresher
/// is called again, from the installed token set, and every waiter gets that newer token.
#[tokio::test]
async fn a_refused_installed_token_is_never_the_answer_of_a_refresh_started_before_it() {
    guard(async {
        let (issuer, gate) = Issuer::gated(None, 0);
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone());
        let handle = layer.token_handle();
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));
        // No token: the first request starts a refresh, held at the gate.
        let first = tokio::spawn(svc.clone().oneshot(get("/a")));
        support::yield_until("the refresh started", support::YIELD_BOUND, || {
            issuer.calls() == 1
        })
        .await;
        // A login installs a token the API refuses; a request sent with it joins the refresh.
        handle.set_token(Token::bearer("installed").unwrap());
        let second = tokio::spawn(svc.clone().oneshot(get("/b")));
        support::yield_until(
            "the installed token was refused",
            support::YIELD_BOUND,
            || seen.count() == 1,
        )
        .await;
        gate.add_permits(2);
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(second.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(
            issuer.calls(),
            2,
            "asked again, from the installed token set"
        );
        let mut sent = seen.all();
        sent.sort();
        assert_eq!(sent, ["Bearer installed", "Bearer t2", "Bearer t2"]);
    })
    .await;
}

#[tokio::test]
async fn custom_trigger_and_replay_policy() {
    guard(async {
        // An API that signals expiry with 403 + x-token-expired.
        let issuer = Issuer::new(None);
        let seen = Seen::default();
        let inner = {
            let (seen, accepted) = (seen.clone(), issuer.accepted.clone());
            service_fn(move |req: Request<ReplayBody<Body>>| {
                seen.push(req.headers());
                let ok =
                    req.headers()[AUTHORIZATION] == format!("Bearer {}", accepted.lock().unwrap());
                let res = if ok {
                    Response::new(String::new())
                } else {
                    Response::builder()
                        .status(403)
                        .header("x-token-expired", "1")
                        .body(String::new())
                        .unwrap()
                };
                async move { Ok::<_, Infallible>(res) }
            })
        };
        let layer = RefreshLayer::new(issuer.clone())
            .initial_token(Token::bearer("stale").unwrap())
            .refresh_on(|status, headers| {
                default_trigger(status, headers)
                    || (status == StatusCode::FORBIDDEN && headers.contains_key("x-token-expired"))
            })
            .replay_methods(ReplayMethods::Idempotent);
        let svc = layer.layer(inner);
        assert_eq!(
            svc.clone().oneshot(get("/")).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(seen.all(), ["Bearer stale", "Bearer t1"]);

        // POST is not idempotent: its 403 is returned, the refresh still happens.
        *issuer.accepted.lock().unwrap() = "rotated-elsewhere".into();
        let post = Request::post("/").body(Body::from("x")).unwrap();
        assert_eq!(
            svc.clone().oneshot(post).await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(issuer.calls(), 2);
        assert_eq!(seen.count(), 3);

        // A request opted out of refresh gets its 403.
        *issuer.accepted.lock().unwrap() = "rotated-again".into();
        let mut opted = get("/");
        opted.extensions_mut().insert(NoReplay);
        assert_eq!(
            svc.clone().oneshot(opted).await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(issuer.calls(), 2);
    })
    .await;
}

#[tokio::test]
async fn rfc6750_errors_other_than_invalid_token_are_returned_untouched() {
    guard(async {
        for (challenge, refreshes) in [
            (r#"Bearer error="insufficient_scope", scope="admin""#, 0),
            ("Bearer error=invalid_request", 0),
            (r#"Basic realm="x", bearer error="invalid_token""#, 1),
            (r#"Bearer realm="api""#, 1),
        ] {
            let issuer = Issuer::new(None);
            let inner = service_fn(move |req: Request<ReplayBody<Body>>| {
                let fresh = req.headers()[AUTHORIZATION] == "Bearer t1";
                let res = if fresh {
                    Response::new(String::new())
                } else {
                    Response::builder()
                        .status(401)
                        .header(WWW_AUTHENTICATE, challenge)
                        .body(String::new())
                        .unwrap()
                };
                async move { Ok::<_, Infallible>(res) }
            });
            let svc = RefreshLayer::new(issuer.clone())
                .initial_token(Token::bearer("stale").unwrap())
                .layer(inner);
            let res = svc.oneshot(get("/")).await.unwrap();
            assert_eq!(issuer.calls(), refreshes, "{challenge}");
            let expected = if refreshes == 0 {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            };
            assert_eq!(res.status(), expected, "{challenge}");
        }
    })
    .await;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn www_authenticate_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_challenges(&bytes);
        if let Ok(value) = HeaderValue::from_bytes(&bytes) {
            let mut headers = HeaderMap::new();
            headers.insert(WWW_AUTHENTICATE, value);
            let _ = default_trigger(StatusCode::UNAUTHORIZED, &headers);
        }
    }

    #[test]
    fn www_authenticate_parser_round_trips_params(
        scheme in "[A-Za-z][A-Za-z0-9]{0,8}",
        params in proptest::collection::vec(("[a-z_]{1,8}", "[ -~]{0,16}"), 1..4),
    ) {
        let rendered: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        let header = format!("{scheme} {}, Other realm=\"x\"", rendered.join(", "));
        let parsed = parse_challenges(header.as_bytes());
        prop_assert_eq!(parsed.len(), 2);
        prop_assert_eq!(parsed[0].scheme(), scheme.as_str());
        let got: Vec<(String, String)> = parsed[0].params().to_vec();
        prop_assert_eq!(got, params);
    }
}

// ---- Origin scoping, against real loopback servers ----

/// A loopback server that records the Authorization header of each request and answers with
/// `respond(path)`.
async fn recording_server(
    seen: Seen,
    respond: impl Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> SocketAddr {
    let respond = Arc::new(respond);
    serve(move |req: Request<Incoming>| {
        seen.push(req.headers());
        std::future::ready(respond(req.uri().path()))
    })
    .await
}

#[tokio::test]
async fn token_goes_only_to_allowed_origins_and_never_follows_a_cross_origin_redirect() {
    guard(async {
        let other_seen = Seen::default();
        let other = recording_server(other_seen.clone(), |_| {
            Response::builder()
                .status(401)
                .body(Full::default())
                .unwrap()
        })
        .await;
        let api_seen = Seen::default();
        let api = recording_server(api_seen.clone(), move |path| match path {
            "/redirect" => Response::builder()
                .status(302)
                .header(LOCATION, format!("http://{other}/landing"))
                .body(Full::default())
                .unwrap(),
            _ => Response::new(Full::default()),
        })
        .await;
        let refresher =
            refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("secret-token")?) });
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = {
            let calls = calls.clone();
            refresh_fn(move |stale| {
                calls.fetch_add(1, Ordering::SeqCst);
                refresher.refresh(RefreshContext::new(stale, RefreshReason::NoToken))
            })
        };

        // Allowed origins: a request to another origin gets no token and its 401 triggers nothing.
        let layer = RefreshLayer::new(counted)
            .allowed_origins([format!("http://{api}")])
            .unwrap();
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(http_client::<ReplayBody<Body>>());
        let res = svc
            .clone()
            .oneshot(get(format!("http://{api}/a")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let res = svc
            .clone()
            .oneshot(get(format!("http://{other}/b")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Recommended order: this layer outside the redirect layer. The token is attached once;
        // tower-http's standard policy drops it on the cross-origin hop.
        let outside = ServiceBuilder::new()
            .layer(RefreshLayer::new(refresh_fn(|_| async {
                Ok::<_, RefreshError>(Token::bearer("secret-token")?)
            })))
            .layer(FollowRedirectLayer::new())
            .service(http_client::<ReplayBody<Body>>());
        let _ = outside.oneshot(get(format!("http://{api}/redirect"))).await;

        // Redirect layer outside: every hop passes through this layer, so allowed origins are
        // what keeps the token at home.
        let redirect_outside = ServiceBuilder::new()
            .layer(FollowRedirectLayer::new())
            .layer(layer)
            .service(http_client::<ReplayBody<Body>>());
        let res = redirect_outside
            .oneshot(get(format!("http://{api}/redirect")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

        let leaked: Vec<_> = other_seen.all().into_iter().filter(|a| a != "-").collect();
        assert!(
            leaked.is_empty(),
            "the other origin saw credentials: {leaked:?}"
        );
        assert!(other_seen.count() >= 3);
        assert!(api_seen.all().iter().all(|a| a == "Bearer secret-token"));
    })
    .await;
}

#[tokio::test]
async fn transient_failure_waits_out_retry_after_then_succeeds() {
    guard(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let refresher = {
            let calls = calls.clone();
            refresh_fn(move |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        return Err(RefreshError::transient("rotation_in_progress")
                            .with_retry_after(Duration::from_millis(30)));
                    }
                    Ok(Token::bearer("ok")?)
                }
            })
        };
        let started = tokio::time::Instant::now();
        let layer = RefreshLayer::new(refresher)
            .retries(Backoff::default().base_delay(Duration::from_millis(1)));
        let handle = layer.token_handle();
        handle
            .refresh()
            .await
            .map_err(|e: BoxError| e.to_string())
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(30),
            "Retry-After is a floor"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Terminal failures are not retried.
        let terminal_calls = Arc::new(AtomicUsize::new(0));
        let err = RefreshLayer::new(rejecting(&terminal_calls))
            .token_handle()
            .refresh()
            .await
            .unwrap_err();
        assert!(err.is::<RefreshRejected>());
        assert_eq!(terminal_calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn an_absurd_lifetime_is_treated_as_no_expiry() {
    guard(async {
        let refresher = refresh_fn(|_| async {
            Ok::<_, RefreshError>(Token::bearer("forever")?.with_expires_in(Duration::MAX))
        });
        let layer = RefreshLayer::new(refresher);
        let handle = layer.token_handle();
        let state = handle.refresh().await.unwrap();
        assert_eq!(state.expires_in(), None);
        let svc = layer.layer(service_fn(|req: Request<ReplayBody<Body>>| async move {
            Ok::<_, Infallible>(Response::new(
                req.headers()[AUTHORIZATION].to_str().unwrap().to_owned(),
            ))
        }));
        assert_eq!(
            svc.oneshot(get("/")).await.unwrap().body(),
            "Bearer forever"
        );
    })
    .await;
}

/// Polls `fut` once, so that what it does before its first wait (its decision to start or
/// join a refresh) has happened when this returns.
async fn poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *fut).poll(cx))).await
}

#[tokio::test]
async fn invalidate_during_a_refresh_gives_later_requests_a_token_from_a_refresh_after_it() {
    guard(async {
        let (issuer, gate) = Issuer::gated(None, 0);
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone()).initial_token(Token::bearer("t0").unwrap());
        let handle = layer.token_handle();
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));

        // A refresh runs: refresher call 1, held at the gate.
        let forced = tokio::spawn({
            let handle = handle.clone();
            async move { handle.refresh().await.map_err(|e| e.to_string()) }
        });
        for _ in 0..10_000 {
            if issuer.calls() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(issuer.calls(), 1);

        // The token is invalidated while it runs; a request after that waits for a token.
        handle.invalidate();
        let mut request = Box::pin(svc.clone().oneshot(get("/")));
        assert!(poll_once(&mut request).await.is_pending());
        assert!(handle.state().refreshing());

        gate.add_permits(2);
        let res = request
            .await
            .expect("a request after invalidate gets a token through the refresher");
        assert_eq!(res.status(), StatusCode::OK);
        // One more refresher call, started after the invalidation (one at a time: the gate
        // held call 1 until then); the request went out once, with its token.
        assert_eq!(issuer.calls(), 2);
        assert_eq!(seen.all(), ["Bearer t2"]);
        // The forced refresh that was waiting gets that token too.
        let state = forced.await.unwrap().unwrap();
        assert!(state.has_token());
        assert_eq!(handle.token().unwrap().secret(), "t2");
        assert_eq!(issuer.calls(), 2);
    })
    .await;
}

#[test]
fn a_waiter_that_gives_up_abandons_only_the_refresh_it_joined() {
    use tower_auth_refresh::error::RefreshFailed;
    // The cell's runtime: the refresh tasks go there, and it is not driven while requests
    // wait on another runtime, so their own bound (refresh timeout + 5 s) ends their wait.
    let cells = support::paused_runtime();
    let issuer = Issuer::new(None);
    let layer = {
        let _cells = cells.enter();
        RefreshLayer::new(issuer.clone())
            .refresh_timeout(Duration::from_millis(100))
            .retries(Backoff::none().max_elapsed(Duration::from_millis(100)))
    };
    let handle = layer.token_handle();
    let refresh = || {
        let handle = handle.clone();
        Box::pin(async move { handle.refresh().await.map(|state| state.generation()) })
    };
    let requests = support::paused_runtime();
    // Each `block_on` is bounded by `guard`'s minute of (paused) time, far more than the few
    // seconds these waits move the clock.
    let (mut second, mut third) = requests.block_on(guard(async {
        // W0 starts refresh A; W1 joins it one second later.
        let mut w0 = refresh();
        assert!(poll_once(&mut w0).await.is_pending());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let w1 = tokio::spawn(refresh());
        // W0 gives up on A and abandons it; W2 starts refresh B.
        assert!(w0.await.unwrap_err().is::<RefreshFailed>());
        let mut w2 = refresh();
        assert!(poll_once(&mut w2).await.is_pending());
        assert!(handle.state().refreshing());
        // W1 gives up on A a second later: B is not its to abandon.
        assert!(w1.await.unwrap().unwrap_err().is::<RefreshFailed>());
        assert!(
            handle.state().refreshing(),
            "a waiter abandoned a refresh it never joined"
        );
        // W3 joins B instead of starting a refresh beside it.
        let mut w3 = refresh();
        assert!(poll_once(&mut w3).await.is_pending());
        (w2, w3)
    }));
    // The cell's runtime runs its refresh tasks now (A's call first, then B's) until idle.
    cells.block_on(async { tokio::time::sleep(Duration::from_secs(1)).await });
    assert_eq!(issuer.calls(), 2);
    let (second, third) = requests.block_on(guard(async {
        (second.as_mut().await, third.as_mut().await)
    }));
    // A was abandoned: its late result is not recorded over B's, which answers B's waiters.
    assert_eq!(second.unwrap(), 1);
    assert_eq!(third.unwrap(), 1);
    assert_eq!(handle.token().unwrap().secret(), "t2");
    assert_eq!(issuer.calls(), 2);
}

#[test]
fn a_request_that_joined_a_failed_background_refresh_keeps_the_valid_token() {
    run_paused(Duration::from_secs(3600), async {
        let (issuer, gate) = Issuer::gated(Some(Duration::from_secs(100)), 1);
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone())
            .leeway(Duration::from_secs(5))
            .refresh_ahead(Duration::from_secs(20));
        let handle = layer.token_handle();
        let mut events = handle.subscribe();
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));
        svc.clone().oneshot(get("/")).await.unwrap();
        // Inside the window: a background refresh starts and is held at the gate.
        tokio::time::advance(Duration::from_secs(85)).await;
        svc.clone().oneshot(get("/")).await.unwrap();
        support::yield_until(
            "the background refresh started",
            support::YIELD_BOUND,
            || issuer.calls() == 2,
        )
        .await;
        // Inside the leeway (t1 valid for 4 s more): a request waits for that refresh.
        tokio::time::advance(Duration::from_secs(11)).await;
        *issuer.fail.lock().unwrap() = Some(false);
        let mut request = Box::pin(svc.clone().oneshot(get("/")));
        assert!(poll_once(&mut request).await.is_pending());
        // The background refresh fails: the request goes out with the still-valid token.
        gate.add_permits(1);
        let res = request
            .await
            .expect("a failed background refresh fails no request while the token is valid");
        assert_eq!(res.status(), StatusCode::OK);
        // So does a later request, and no refresh starts for either of them.
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(issuer.calls(), 2);
        assert!(seen.all().iter().all(|a| a == "Bearer t1"));
        let mut failed = 0;
        while let Some(event) = events.try_recv() {
            failed += usize::from(matches!(event, Ok(RefreshEvent::RefreshFailed { .. })));
        }
        assert_eq!(failed, 1);
    });
}

#[tokio::test]
async fn invalidate_leaves_an_ended_session_ended() {
    guard(async {
        use tower_auth_refresh::error::RefreshRejected;
        let issuer = Issuer::new(None);
        *issuer.fail.lock().unwrap() = Some(true);
        let seen = Seen::default();
        let layer = RefreshLayer::new(issuer.clone());
        let handle = layer.token_handle();
        let svc = layer.layer(api(seen.clone(), issuer.accepted.clone()));
        // A terminal failure ends the session.
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        assert!(err.is::<RefreshRejected>());
        assert_eq!(issuer.calls(), 1);
        // Invalidating does not revive it: the revoked credentials are not tried again.
        handle.invalidate();
        assert!(handle.state().session_ended());
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        assert!(err.is::<SessionEnded>());
        assert_eq!(issuer.calls(), 1);
        // Nor after a logout.
        handle.set_token(Token::bearer("login").unwrap());
        handle.clear();
        handle.invalidate();
        let err = svc.clone().oneshot(get("/")).await.unwrap_err();
        assert!(err.is::<SessionEnded>());
        assert_eq!(issuer.calls(), 1);
        assert_eq!(seen.count(), 0);
    })
    .await;
}

/// Review item (this session): with no cool-down (`Cooldown::none()`), a refresh inside the
/// leeway that fails still lets the request go out with the token it had, valid for a few
/// more seconds ("the token is still sent until it actually expires"). Without a cool-down
/// to hold it, the request failed with `RefreshFailed`. Each such request may try a refresh
/// (no pause), and past the deadline the token is never sent.
#[test]
fn without_a_cool_down_a_failed_refresh_in_the_leeway_still_sends_the_valid_token() {
    run_paused(Duration::from_secs(3600), async {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let refresher = refresh_fn(move |_| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Ok(Token::bearer("t1")?.with_expires_in(Duration::from_secs(100)))
                } else {
                    Err(RefreshError::transient(std::io::Error::other("503")))
                }
            }
        });
        let layer = RefreshLayer::new(refresher)
            .retries(Backoff::none())
            .cooldown(tower_auth_refresh::Cooldown::none());
        let svc = layer.layer(service_fn(
            |req: Request<ReplayBody<Full<Bytes>>>| async move {
                Ok::<_, Infallible>(Response::new(authorization(req.headers())))
            },
        ));
        let auth = |svc: &tower_auth_refresh::Refresh<_>| svc.clone().oneshot(get("/"));
        assert_eq!(auth(&svc).await.unwrap().into_body(), "Bearer t1");
        tokio::time::advance(Duration::from_secs(95)).await;
        for _ in 0..3 {
            assert_eq!(auth(&svc).await.unwrap().into_body(), "Bearer t1");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "one refresh per request, no pause"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(auth(&svc).await.is_err(), "expired: never sent");
    });
}

/// Review item (tenth session): an invalidation while a refresh runs during an outage makes
/// that flight ask again; the second call used the whole retry budget again (4 calls instead
/// of 1), although `invalidate` keeps the failures in a row and the first call had failed.
#[tokio::test]
async fn invalidating_during_a_refresh_in_an_outage_does_not_buy_the_retry_budget_again() {
    guard(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        // Every call a 503; call 4 (the one after the cool-down) held.
        let refresher = scripted(calls.clone(), 4, gate.clone(), vec![Some(false); 16]);
        let layer = RefreshLayer::new(refresher)
            .retries(quick_retries())
            .cooldown(tower_auth_refresh::Cooldown::new(
                Duration::from_millis(200),
                Duration::from_millis(200),
            ));
        let handle = layer.token_handle();
        let svc = layer.layer(ok_api());
        // The outage: the first refresh uses its retry budget (4 calls), a cool-down starts.
        assert!(svc.clone().oneshot(get("/")).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        tokio::time::sleep(Duration::from_millis(250)).await;
        // After the cool-down: a single attempt (call 5), held while the app invalidates.
        let request = tokio::spawn({
            let svc = svc.clone();
            async move { svc.oneshot(get("/")).await.is_err() }
        });
        while calls.load(Ordering::SeqCst) < 5 {
            tokio::task::yield_now().await;
        }
        handle.invalidate();
        gate.add_permits(100);
        assert!(request.await.unwrap());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            6,
            "the refresh after the invalidation makes a single attempt"
        );
    })
    .await;
}

/// The other half of the above: the first refresh of an outage (no failures before it, the
/// whole retry budget) is invalidated while it runs; the call after it makes a single attempt
/// (5 calls), not the whole budget again (8).
#[tokio::test]
async fn invalidating_the_first_refresh_of_an_outage_does_not_buy_the_retry_budget_again() {
    guard(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        // Every call a 503; the first held.
        let refresher = scripted(calls.clone(), 0, gate.clone(), vec![Some(false); 16]);
        let layer = RefreshLayer::new(refresher).retries(quick_retries());
        let handle = layer.token_handle();
        let svc = layer.layer(ok_api());
        let request = tokio::spawn({
            let svc = svc.clone();
            async move { svc.oneshot(get("/")).await.is_err() }
        });
        while calls.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        handle.invalidate();
        gate.add_permits(1);
        assert!(request.await.unwrap());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "the whole budget once, then a single attempt"
        );
    })
    .await;
}

/// Backoff of four attempts, 1–2 ms apart.
fn quick_retries() -> Backoff {
    Backoff::default()
        .max_attempts(4)
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(2))
}

/// An API that answers 200 to every request.
fn ok_api() -> impl InMemoryApi<String> {
    service_fn(|_req: Request<ReplayBody<Body>>| async move {
        Ok::<_, Infallible>(Response::new(String::new()))
    })
}

/// Call `n` (from 0) waits on `gate` if `n == hold`, then answers `script[n]`: `None` a token
/// (100 s), `Some(true)` a terminal error, `Some(false)` a transient one; past the script, a
/// token.
fn scripted(
    calls: Arc<AtomicUsize>,
    hold: usize,
    gate: Arc<Semaphore>,
    script: Vec<Option<bool>>,
) -> impl TokenRefresher {
    refresh_fn(move |_| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let gate = gate.clone();
        let answer = script.get(n).copied().unwrap_or(None);
        async move {
            if n == hold {
                gate.acquire().await.unwrap().forget();
            }
            match answer {
                None => {
                    Ok(Token::bearer(format!("t{n}"))?.with_expires_in(Duration::from_secs(100)))
                }
                Some(true) => Err(RefreshError::terminal("invalid_grant")),
                Some(false) => Err(RefreshError::transient("503")),
            }
        }
    })
}

/// A failed background refresh (its one attempt) does not make the foreground call asked
/// again after an invalidation a single attempt: that call retries past a second 503, as a
/// foreground refresh after a background failure does.
#[test]
fn a_failed_background_refresh_then_an_invalidation_keeps_the_retry_budget() {
    run_paused(Duration::from_secs(3600), async {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        // 0: the first token; 1: the background refresh, held, 503; 2: 503; 3: a token.
        let refresher = scripted(
            calls.clone(),
            1,
            gate.clone(),
            vec![None, Some(false), Some(false), None],
        );
        let layer = RefreshLayer::new(refresher)
            .leeway(Duration::from_secs(5))
            .refresh_ahead(Duration::from_secs(20));
        let handle = layer.token_handle();
        let svc = layer.layer(ok_api());
        svc.clone().oneshot(get("/")).await.unwrap();
        tokio::time::advance(Duration::from_secs(85)).await;
        svc.clone().oneshot(get("/")).await.unwrap();
        support::yield_until(
            "the background refresh started",
            support::YIELD_BOUND,
            || calls.load(Ordering::SeqCst) == 2,
        )
        .await;
        handle.invalidate();
        let request = tokio::spawn(svc.clone().oneshot(get("/")));
        tokio::task::yield_now().await;
        gate.add_permits(1);
        let res = request.await.unwrap();
        assert!(
            res.is_ok(),
            "failed after {} calls: {:?}",
            calls.load(Ordering::SeqCst),
            res.err().map(|e| e.to_string())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    });
}

/// A terminal answer for the old session says nothing about the token endpoint: after a
/// login (`set_token`) a forced refresh joins the flight and asks again with the whole retry
/// budget, past a 503.
#[tokio::test]
async fn a_terminal_answer_for_the_old_session_does_not_make_the_login_round_single() {
    guard(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        // 0: held, then invalid_grant (the old session); 1: 503; 2: a token.
        let refresher = scripted(
            calls.clone(),
            0,
            gate.clone(),
            vec![Some(true), Some(false), None],
        );
        let layer = RefreshLayer::new(refresher)
            .retries(quick_retries())
            .initial_token(Token::bearer("old").unwrap());
        let handle = layer.token_handle();
        let first = support::forced_refresh(&handle);
        while calls.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        handle.set_token(Token::bearer("login").unwrap());
        let forced = support::forced_refresh(&handle);
        tokio::task::yield_now().await;
        gate.add_permits(1);
        let res = forced.await.unwrap();
        let _ = first.await;
        assert!(
            res.is_ok(),
            "after {} calls: {res:?}",
            calls.load(Ordering::SeqCst)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    })
    .await;
}

/// Review item (eleventh session): inside the leeway, with the token endpoint down, a request
/// waits for a refresh that fails and goes out with the token the layer holds, still valid.
/// When the server refuses that token, the refusal is a first refusal of it: recorded, so no
/// later request sends it again, and answered as any refusal during the cool-down (the 401
/// itself). It was taken for a refusal right after a refresh: the request failed with
/// `UnauthorizedAfterRefresh` (no refresh had succeeded), nothing was recorded, and the next
/// request sent the refused token again.
#[tokio::test]
async fn a_held_token_refused_after_a_failed_leeway_refresh_is_never_sent_again() {
    guard(async {
        const HELD: &str = "held-leeway-4d1f9c";
        let seen = Seen::default();
        let addr = recording_server(seen.clone(), |_| {
            Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)
                .body(Full::default())
                .unwrap()
        })
        .await;
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(support::in_leeway_with_the_endpoint_down(HELD, &calls))
            .service(http_client::<ReplayBody<Body>>());
        let url = format!("http://{addr}/r");

        let first = svc.clone().oneshot(get(url.as_str())).await;
        assert_eq!(
            first.expect("the refusal itself, not an error").status(),
            StatusCode::UNAUTHORIZED
        );
        let second = svc.clone().oneshot(get(url.as_str())).await;
        let err = second.expect_err("the refused token is not sent again");
        let failed = err
            .downcast_ref::<tower_auth_refresh::error::RefreshFailed>()
            .expect("the cool-down of the failed refresh");
        assert!(failed.next_attempt_in().is_some(), "{err}");
        assert_eq!(seen.all(), [format!("Bearer {HELD}")], "one send in all");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh attempt");
    })
    .await;
}

/// The same without a cool-down, and the token endpoint back by the time the server refuses
/// the held token: the refusal starts a refresh as any first refusal does, and the request
/// (a POST) is replayed once with the new token, its body byte for byte. (The explorer of
/// `tests/interleavings.rs` checks this too: a replayable request gets no 401 back outside a
/// cool-down.)
#[tokio::test]
async fn a_held_token_refused_after_a_failed_leeway_refresh_is_replayed_once_refreshed() {
    guard(async {
        const HELD: &str = "held-leeway-5e0a31";
        const FRESH: &str = "fresh-leeway-b7c2d4";
        let seen = Arc::new(Mutex::new(Vec::new()));
        let addr = serve({
            let seen = seen.clone();
            move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let auth = authorization(req.headers());
                    let body = http_body_util::BodyExt::collect(req.into_body())
                        .await
                        .unwrap()
                        .to_bytes();
                    let ok = auth == format!("Bearer {FRESH}");
                    seen.lock().unwrap().push((auth, body));
                    let status = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::UNAUTHORIZED
                    };
                    Response::builder()
                        .status(status)
                        .body(Full::default())
                        .unwrap()
                }
            }
        })
        .await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = support::in_leeway_then(HELD, &calls, Some(FRESH))
            .cooldown(tower_auth_refresh::Cooldown::none());
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Body>>());
        let payload = Bytes::from_static(b"{\"order\":42}");
        let req = Request::post(format!("http://{addr}/orders"))
            .body(Full::new(payload.clone()))
            .unwrap();

        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                (format!("Bearer {HELD}"), payload.clone()),
                (format!("Bearer {FRESH}"), payload),
            ],
            "sent with the held token, then replayed once with the new one"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the failed refresh, then the one after the refusal"
        );
    })
    .await;
}

/// Third review (eleventh session): a logout while a refresh waits out its backoff after a
/// transient failure ends that refresh's retries: the refresher is not asked again, after the
/// logout, to refresh the session that ended (its answer would be discarded anyway; a shared
/// token store took that retry for a login and ended the logout).
#[tokio::test]
async fn a_logout_during_the_backoff_stops_the_retries() {
    guard(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let layer = RefreshLayer::new(refresh_fn(move |_stale| {
            counted.fetch_add(1, Ordering::SeqCst);
            // `Retry-After` is the backoff's floor: the retry waits at least 300 ms.
            async {
                Err::<Token, _>(
                    RefreshError::transient("a blip").with_retry_after(Duration::from_millis(300)),
                )
            }
        }))
        .initial_token(Token::bearer("old-session").unwrap());
        let handle = layer.token_handle();
        let forced = tokio::spawn({
            let handle = handle.clone();
            async move { handle.refresh().await }
        });
        // The first attempt fails at once; the retry would come 300 ms later.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        handle.clear();
        let _ = forced.await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no retry for the session that ended"
        );
        assert!(handle.token().is_none());
    })
    .await;
}
