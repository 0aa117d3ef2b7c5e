//! Bad input anywhere gives a clear typed error and loses nothing: token strings that cannot
//! be header values, refreshers that return invalid tokens or panic, inner services that fail
//! or are never ready, request bodies that fail, malformed challenges and origins.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::RefreshContext;
use tower_auth_refresh::error::{RefreshFailed, SessionEnded};
use tower_auth_refresh::{
    Backoff, Cooldown, InvalidOrigin, RefreshError, RefreshEvent, RefreshLayer, ReplayBody, Token,
    TokenRefresher,
};
use tower_test::mock;

use support::{InMemoryApi, PANIC_MARKER, capture_logs, run_paused, silence_deliberate_panics};

type Body = Full<Bytes>;

/// Runs `test` on a paused current-thread runtime, with a global deadline, and with TRACE
/// output captured; returns the captured output.
fn traced<F: Future<Output = ()>>(test: impl FnOnce() -> F) -> String {
    let (logs, _tracing) = capture_logs();
    run_paused(Duration::from_secs(3600), test());
    logs.text()
}

/// Drives `fut` to completion without any runtime.
fn block_on_without_runtime<T>(fut: impl Future<Output = T>) -> T {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    for _ in 0..10_000 {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
    panic!("the future never completed without a runtime");
}

fn get() -> Request<Body> {
    support::get("/")
}

/// An in-memory API that accepts only `Bearer <accepted>`, counting sends.
fn api(accepted: &'static str, sends: Arc<AtomicUsize>) -> impl InMemoryApi<String> {
    service_fn(move |req: Request<ReplayBody<Body>>| {
        sends.fetch_add(1, Ordering::SeqCst);
        let ok = req.headers().get(AUTHORIZATION).is_some_and(|v| {
            v.to_str()
                .is_ok_and(|v| v.strip_prefix("Bearer ") == Some(accepted))
        });
        let status = if ok { 200 } else { 401 };
        std::future::ready(Ok(Response::builder()
            .status(status)
            .body(String::new())
            .unwrap()))
    })
}

// ---- Token strings ----------------------------------------------------------------------

#[test]
fn token_strings_that_cannot_be_header_values_are_refused_without_echo() {
    for bad in [
        "",
        " ",
        "two words",
        "line\r\nX-Injected: 1",
        "nul\0byte",
        "tab\there",
        "del\x7f",
        "caf\u{e9}",
        "\u{1F600}",
        "trailing ",
    ] {
        let err = Token::bearer(bad).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(shown.starts_with("invalid token"), "{shown}");
        if bad.len() > 2 {
            assert!(
                !shown.contains(bad),
                "the error repeats the secret: {shown}"
            );
        }
    }
    for bad_scheme in ["", "two words", "Bea\rrer", "B\u{e9}arer", "a:b"] {
        assert!(
            Token::with_scheme(bad_scheme, "secret").is_err(),
            "{bad_scheme:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(2000)
    })]

    /// Any string: a token iff it is non-empty visible ASCII; then its header is exactly
    /// `Bearer <secret>` and sensitive, else the error never repeats it.
    #[test]
    fn any_string_is_either_a_sendable_token_or_a_typed_refusal(secret in any::<String>()) {
        let sendable = !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_graphic());
        match Token::bearer(secret.clone()) {
            Ok(token) => {
                prop_assert!(sendable);
                let expected = format!("Bearer {secret}");
                prop_assert_eq!(token.header_value().as_bytes(), expected.as_bytes());
                prop_assert!(token.header_value().is_sensitive());
                let shown = format!("{token} {token:?}");
                prop_assert!(secret.len() < 8 || !shown.contains(&secret));
            }
            Err(err) => {
                prop_assert!(!sendable);
                let shown = format!("{err} {err:?}");
                prop_assert!(secret.len() < 8 || !shown.contains(&secret));
            }
        }
    }
}

// ---- Refreshers returning bad tokens, or panicking ----------------------------------------

/// A refresher that runs `bad` for its first `bad_calls` calls, then hands out `good-<n>`.
#[derive(Clone)]
struct BadThenGood {
    calls: Arc<AtomicUsize>,
    bad_calls: usize,
    bad: fn(usize) -> Result<Token, RefreshError>,
}

impl BadThenGood {
    fn new(bad_calls: usize, bad: fn(usize) -> Result<Token, RefreshError>) -> Self {
        Self {
            calls: Arc::default(),
            bad_calls,
            bad,
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl TokenRefresher for BadThenGood {
    type Future = Pin<Box<dyn Future<Output = Result<Token, RefreshError>> + Send>>;

    fn refresh(&self, _ctx: RefreshContext) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let (bad_calls, bad) = (self.bad_calls, self.bad);
        if n <= bad_calls && n % 2 == 0 {
            // Every other bad call misbehaves before it even returns its future (a panicking
            // refresher panics right here).
            let _ = bad(n);
        }
        Box::pin(async move {
            tokio::task::yield_now().await;
            if n <= bad_calls {
                return bad(n);
            }
            Ok(Token::bearer(format!("good-{n}"))?)
        })
    }
}

fn invalid_token(_: usize) -> Result<Token, RefreshError> {
    // What `?` does with a bad token from an identity provider.
    let token = Token::bearer("secret with spaces\r\n")?;
    Ok(token)
}

fn invalid_scheme(_: usize) -> Result<Token, RefreshError> {
    match Token::with_scheme("two words", "abc") {
        Ok(t) => Ok(t),
        Err(invalid) => Err(RefreshError::from(invalid)),
    }
}

fn panics(n: usize) -> Result<Token, RefreshError> {
    panic!("{PANIC_MARKER} (call {n})");
}

#[test]
fn a_refresher_returning_an_invalid_token_gives_every_waiter_a_typed_refresh_failed() {
    silence_deliberate_panics();
    for bad in [invalid_token, invalid_scheme] {
        let refresher = BadThenGood::new(1, bad);
        let layer = RefreshLayer::new(refresher.clone())
            .retries(Backoff::none())
            .cooldown(Cooldown::none());
        let handle = layer.token_handle();
        let sends = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(api("good-2", sends.clone()));
        let trace = traced(|| async {
            let mut events = handle.subscribe();
            let waiters: Vec<_> = (0..20)
                .map(|_| tokio::spawn(svc.clone().oneshot(get())))
                .collect();
            let mut shared: Option<Arc<RefreshError>> = None;
            for w in waiters {
                let err = w.await.expect("no panic").unwrap_err();
                let failed = err.downcast_ref::<RefreshFailed>().expect("typed");
                let cause = std::error::Error::source(&**failed.refresh_error()).unwrap();
                assert!(cause.is::<tower_auth_refresh::InvalidToken>(), "{cause}");
                if let Some(first) = &shared {
                    assert!(
                        Arc::ptr_eq(first, failed.refresh_error()),
                        "one shared failure"
                    );
                }
                shared = Some(failed.refresh_error().clone());
                assert!(!format!("{err} {err:?}").contains("secret with spaces"));
            }
            assert_eq!(refresher.calls(), 1, "one refresh for all 20 waiters");
            assert_eq!(
                sends.load(Ordering::SeqCst),
                0,
                "nothing sent without a token"
            );
            assert!(!handle.state().session_ended(), "a bad token is transient");
            assert_eq!(
                events.try_recv(),
                Some(Ok(RefreshEvent::RefreshFailed {
                    generation: 0,
                    terminal: false
                }))
            );
            // The next request tries again and works.
            let res = svc.clone().oneshot(get()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(refresher.calls(), 2);
        });
        assert!(trace.contains("token refresh failed"), "{trace}");
        assert!(!trace.contains("good-2"), "token text in the trace");
    }
}

#[test]
fn a_panicking_refresher_leaves_the_cell_usable_and_every_waiter_gets_an_error() {
    silence_deliberate_panics();
    // Call 1 panics inside its future, call 2 before returning one, call 3 works.
    let refresher = BadThenGood::new(2, panics);
    let layer = RefreshLayer::new(refresher.clone())
        .initial_token(Token::bearer("stale-secret").unwrap())
        .retries(Backoff::none())
        .cooldown(Cooldown::none());
    let handle = layer.token_handle();
    let sends = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api("good-3", sends.clone()));
    let trace = traced(|| async {
        for wave in 1..=2 {
            let waiters: Vec<_> = (0..20)
                .map(|_| tokio::spawn(svc.clone().oneshot(get())))
                .collect();
            let mut refused = 0;
            for w in waiters {
                let err = w
                    .await
                    .expect("the panic stays inside the layer")
                    .unwrap_err();
                let failed = err.downcast_ref::<RefreshFailed>().expect("typed");
                // A request that was refused keeps its 401 as context; the others waited for
                // the refresh instead of sending a token already refused.
                refused += usize::from(failed.unauthorized().is_some());
            }
            assert_eq!(refused, usize::from(wave == 1), "wave {wave}");
            assert_eq!(refresher.calls(), wave, "one refresh per wave");
            assert!(!handle.state().refreshing());
        }
        // The cell still works.
        let res = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(refresher.calls(), 3);
        assert_eq!(
            sends.load(Ordering::SeqCst),
            1 + 1,
            "the refused token is sent once, never again; then the fresh one"
        );

        // A forced refresh through the handle gets the panic as an error too.
        let always = BadThenGood::new(usize::MAX, panics);
        let layer = RefreshLayer::new(always.clone())
            .retries(Backoff::none())
            .cooldown(Cooldown::none());
        let forced = layer.token_handle().refresh().await.unwrap_err();
        assert!(forced.is::<RefreshFailed>(), "{forced}");
        let again = layer.token_handle().refresh().await.unwrap_err();
        assert!(again.is::<RefreshFailed>(), "{again}");
        assert_eq!(always.calls(), 2);
    });
    assert!(!trace.contains("stale-secret") && !trace.contains("good-3"));
}

#[test]
fn a_panicking_refresher_without_a_runtime_gives_an_error_not_a_hang() {
    silence_deliberate_panics();
    let refresher = BadThenGood::new(1, panics);
    let layer = RefreshLayer::new(refresher.clone())
        .retries(Backoff::none())
        .cooldown(Cooldown::none());
    let sends = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api("good-2", sends.clone()));
    // BadThenGood's futures yield through tokio, which outside a runtime wakes at once.
    let err = block_on_without_runtime(svc.clone().oneshot(get())).unwrap_err();
    assert!(err.is::<RefreshFailed>(), "{err}");
    let res = block_on_without_runtime(svc.oneshot(get())).unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(refresher.calls(), 2);
    assert_eq!(sends.load(Ordering::SeqCst), 1);
}

/// Found by the interleaving explorer ("unexpected panic inside the layer"): without a
/// runtime, a transient failure with retries enabled made the retry loop call
/// `tokio::time::sleep`, which panics without a timer; the panic was caught and reported as
/// "the token refresher panicked", hiding the refresher's own error.
#[test]
fn without_a_runtime_a_transient_failure_is_reported_as_itself() {
    let calls = Arc::new(AtomicUsize::new(0));
    let refresher = {
        let calls = calls.clone();
        move |_: Option<Token>| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err::<Token, _>(RefreshError::transient(
                "token endpoint answered 503",
            )))
        }
    };
    let layer = RefreshLayer::new(refresher).retries(Backoff::default());
    let sends = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api("never", sends));
    let err = block_on_without_runtime(svc.oneshot(get())).unwrap_err();
    let failed = err.downcast_ref::<RefreshFailed>().expect("typed");
    let cause = std::error::Error::source(&**failed.refresh_error()).unwrap();
    assert_eq!(cause.to_string(), "token endpoint answered 503");
    assert!(calls.load(Ordering::SeqCst) >= 1);
}

// ---- Inner services that fail or are never ready ----------------------------------------

#[derive(Debug, PartialEq)]
struct Boom(&'static str);

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "boom: {}", self.0)
    }
}

impl std::error::Error for Boom {}

type Mock = mock::Mock<Request<ReplayBody<Body>>, Response<String>>;

fn counting_refresher() -> (impl TokenRefresher + Clone, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let refresher = {
        let calls = calls.clone();
        move |_: Option<Token>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(Token::bearer(format!("fresh-{n}")).map_err(RefreshError::from))
        }
    };
    (refresher, calls)
}

fn status(code: u16) -> Response<String> {
    Response::builder()
        .status(code)
        .body(String::new())
        .unwrap()
}

#[test]
fn inner_service_errors_pass_through_unchanged() {
    traced(|| async {
        let (refresher, calls) = counting_refresher();
        let (mock, mut inner) = mock::pair::<Request<ReplayBody<Body>>, Response<String>>();
        let svc = RefreshLayer::new(refresher)
            .initial_token(Token::bearer("stale").unwrap())
            .layer(mock);

        // The first attempt fails.
        let call = tokio::spawn(svc.clone().oneshot(get()));
        let (_, send) = inner.next_request().await.unwrap();
        send.send_error(Boom("first attempt"));
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.downcast_ref::<Boom>(), Some(&Boom("first attempt")));

        // The replay fails: the error is the replay's, unchanged.
        let call = tokio::spawn(svc.clone().oneshot(get()));
        let (_, send) = inner.next_request().await.unwrap();
        send.send_response(status(401));
        let (req, send) = inner.next_request().await.unwrap();
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer fresh-1");
        send.send_error(Boom("replay"));
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.downcast_ref::<Boom>(), Some(&Boom("replay")));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Readiness errors too.
        let failing = tower::service_fn(|_: Request<ReplayBody<Body>>| async {
            Ok::<Response<String>, Boom>(status(200))
        });
        let mut not_ready = RefreshLayer::new(counting_refresher().0).layer(NeverOk(failing));
        let err =
            std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut not_ready, cx))
                .await
                .unwrap_err();
        assert_eq!(err.downcast_ref::<Boom>(), Some(&Boom("not ready")));
    });
}

/// A service whose readiness fails.
#[derive(Clone)]
struct NeverOk<S>(S);

impl<S: Service<R, Error = Boom>, R> Service<R> for NeverOk<S> {
    type Response = S::Response;
    type Error = Boom;
    type Future = S::Future;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Err(Boom("not ready")))
    }
    fn call(&mut self, req: R) -> S::Future {
        self.0.call(req)
    }
}

#[test]
fn an_inner_service_that_is_never_ready_is_cancelled_by_an_outer_timeout_and_the_next_request_works()
 {
    traced(|| async {
        let (refresher, calls) = counting_refresher();
        let (mock, mut inner): (Mock, _) = mock::pair();
        let svc = RefreshLayer::new(refresher)
            .initial_token(Token::bearer("stale").unwrap())
            .layer(mock);

        // Never ready: the caller's timeout cancels, nothing was sent.
        inner.allow(0);
        let timed_out =
            tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get())).await;
        assert!(timed_out.is_err());

        // Ready again: the next request goes out and works.
        inner.allow(10);
        let call = tokio::spawn(svc.clone().oneshot(get()));
        let (req, send) = inner.next_request().await.unwrap();
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer stale");
        send.send_response(status(200));
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);

        // An answer that never comes, under tower's timeout outside the layer: its own typed
        // error, and nothing refreshed.
        let with_timeout = ServiceBuilder::new()
            .timeout(Duration::from_secs(5))
            .service(svc.clone());
        let call = tokio::spawn(with_timeout.oneshot(get()));
        let (_, never_answered) = inner.next_request().await.unwrap();
        let err = call.await.unwrap().unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
        drop(never_answered);
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        // A replay that never answers: cancelled by the caller's timeout; the refreshed
        // token stays, and the next request uses it without another refresh.
        let hung = tokio::spawn(tokio::time::timeout(
            Duration::from_secs(5),
            svc.clone().oneshot(get()),
        ));
        let (_, send) = inner.next_request().await.unwrap();
        send.send_response(status(401));
        let (replay, never_answered) = inner.next_request().await.unwrap();
        assert_eq!(replay.headers()[AUTHORIZATION], "Bearer fresh-1");
        assert!(hung.await.unwrap().is_err(), "timed out");
        drop(never_answered);
        let call = tokio::spawn(svc.clone().oneshot(get()));
        let (req, send) = inner.next_request().await.unwrap();
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer fresh-1");
        send.send_response(status(200));
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn a_caller_that_times_out_while_waiting_for_the_refresh_loses_nothing() {
    traced(|| async {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let refresher = {
            let (gate, calls) = (gate.clone(), calls.clone());
            move |_: Option<Token>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                    Ok::<_, RefreshError>(Token::bearer("slow")?)
                }
            }
        };
        let layer = RefreshLayer::new(refresher);
        let handle = layer.token_handle();
        let sends = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(api("slow", sends.clone()));
        for _ in 0..5 {
            let r = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(get())).await;
            assert!(r.is_err(), "timed out while the refresh waits");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh in flight");
        gate.add_permits(1);
        support::yield_until(
            "the released refresh installed its token",
            support::YIELD_BOUND,
            || handle.state().generation() > 0,
        )
        .await;
        let res = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the refresh result was kept"
        );
        assert_eq!(sends.load(Ordering::SeqCst), 1);
    });
}

// ---- Bodies, challenges, origins ------------------------------------------------------------

/// A body of announced size that fails after its first chunk.
struct FailsMidway(u8);

impl HttpBody for FailsMidway {
    type Data = Bytes;
    type Error = Boom;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Boom>>> {
        self.0 += 1;
        Poll::Ready(Some(match self.0 {
            1 => Ok(Frame::data(Bytes::from_static(b"first"))),
            _ => Err(Boom("body")),
        }))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(10)
    }
}

#[test]
fn a_request_body_that_fails_midway_loses_nothing() {
    traced(|| async {
        for answer_401 in [true, false] {
            let (refresher, calls) = counting_refresher();
            let sends = Arc::new(AtomicUsize::new(0));
            let inner = {
                let sends = sends.clone();
                service_fn(move |req: Request<ReplayBody<FailsMidway>>| {
                    sends.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let err = req.into_body().collect().await.unwrap_err();
                        assert_eq!(err, Boom("body"));
                        if answer_401 {
                            Ok(status(401))
                        } else {
                            Err(err)
                        }
                    }
                })
            };
            let svc = RefreshLayer::new(refresher)
                .initial_token(Token::bearer("stale").unwrap())
                .layer(inner);
            let result = svc
                .oneshot(Request::post("/").body(FailsMidway(0)).unwrap())
                .await;
            if answer_401 {
                // Not replayable (the copy is incomplete): the caller gets the 401 itself,
                // after the refresh ran for later requests.
                assert_eq!(result.unwrap().status(), StatusCode::UNAUTHORIZED);
                assert_eq!(calls.load(Ordering::SeqCst), 1);
            } else {
                let err = result.unwrap_err();
                assert_eq!(err.downcast_ref::<Boom>(), Some(&Boom("body")));
                assert_eq!(calls.load(Ordering::SeqCst), 0);
            }
            assert_eq!(sends.load(Ordering::SeqCst), 1, "never replayed");
        }
    });
}

#[test]
fn malformed_www_authenticate_on_a_401_neither_panics_nor_loops() {
    traced(|| async {
        for raw in [
            &b"\xff\xfe\xfd"[..],
            b"Bearer error=\"unterminated",
            b"Bearer ,,,,=,=\"",
            b"=",
            b"Bearer error=invalid_token error=insufficient_scope",
            b"\"\\\"",
        ] {
            let (refresher, calls) = counting_refresher();
            let sends = Arc::new(AtomicUsize::new(0));
            let inner = {
                let sends = sends.clone();
                let value = HeaderValue::from_bytes(raw).unwrap();
                service_fn(move |_: Request<ReplayBody<Body>>| {
                    sends.fetch_add(1, Ordering::SeqCst);
                    let mut res = status(401);
                    res.headers_mut().insert(WWW_AUTHENTICATE, value.clone());
                    std::future::ready(Ok::<_, Infallible>(res))
                })
            };
            let svc = RefreshLayer::new(refresher)
                .initial_token(Token::bearer("stale").unwrap())
                .layer(inner);
            match svc.oneshot(get()).await {
                Ok(res) => assert_eq!(res.status(), StatusCode::UNAUTHORIZED),
                Err(err) => assert!(
                    err.is::<tower_auth_refresh::error::UnauthorizedAfterRefresh>(),
                    "{err}"
                ),
            }
            assert!(sends.load(Ordering::SeqCst) <= 2, "{raw:?}");
            assert!(calls.load(Ordering::SeqCst) <= 1, "{raw:?}");
        }
    });
}

#[test]
fn invalid_allowed_origins_are_refused_and_odd_request_uris_get_no_token() {
    let (refresher, _) = counting_refresher();
    for bad in [
        "api.example.com",
        "",
        "/relative",
        "http://",
        "mailto:a@b",
        "://x",
        "https://api.example.com/v1/prefix",
        "https://user:pw@api.example.com",
        "https://api.example.com/?q=1",
    ] {
        let r = RefreshLayer::new(refresher.clone()).allowed_origins([bad]);
        let err: InvalidOrigin = r.expect_err(bad);
        assert!(!err.to_string().contains("pw"), "{err}");
    }
    traced(|| async {
        let (refresher, calls) = counting_refresher();
        let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let inner = {
            let seen = seen.clone();
            service_fn(move |req: Request<ReplayBody<Body>>| {
                seen.lock().unwrap().push(
                    req.headers()
                        .get(AUTHORIZATION)
                        .map(|v| v.to_str().unwrap().to_owned()),
                );
                std::future::ready(Ok::<_, Infallible>(status(401)))
            })
        };
        let svc = RefreshLayer::new(refresher)
            .initial_token(Token::bearer("secret").unwrap())
            .allowed_origins(["https://api.example.com"])
            .unwrap()
            .layer(inner);
        for uri in [
            "/relative",
            "https://api.example.com.evil.test/",
            "http://api.example.com/",
        ] {
            let res = svc
                .clone()
                .oneshot(Request::get(uri).body(Body::default()).unwrap())
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{uri}");
        }
        assert_eq!(*seen.lock().unwrap(), [None, None, None]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn after_a_session_ends_through_a_bad_refresh_token_a_login_resumes() {
    // A terminal failure reads as a typed error and ends the session until a login.
    let trace = traced(|| async {
        let refresher = |_: Option<Token>| {
            std::future::ready(Err::<Token, _>(RefreshError::from_status(
                StatusCode::BAD_REQUEST,
            )))
        };
        let layer = RefreshLayer::new(refresher).initial_token(Token::bearer("old").unwrap());
        let handle = layer.token_handle();
        let sends = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(api("login-secret", sends.clone()));
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        assert!(
            err.is::<tower_auth_refresh::error::RefreshRejected>(),
            "{err}"
        );
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        assert!(err.is::<SessionEnded>(), "{err}");
        assert_eq!(sends.load(Ordering::SeqCst), 1);
        handle.set_token(Token::bearer("login-secret").unwrap());
        let res = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    });
    assert!(trace.contains("session ended"), "{trace}");
    assert!(!trace.contains("login-secret"));
}

// ---- Absurd Retry-After -------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_absurd_retry_after_is_a_typed_failure_and_the_cool_down_still_applies() {
    // What `retry_after` makes of a Retry-After too large for a u64 of seconds.
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::RETRY_AFTER,
        HeaderValue::from_static("99999999999999999999"),
    );
    let huge = tower_auth_refresh::retry_after(&headers).unwrap();
    assert_eq!(huge, Duration::from_secs(u64::MAX));
    let calls = Arc::new(AtomicUsize::new(0));
    let refresher = {
        let calls = calls.clone();
        tower_auth_refresh::refresh_fn(move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Err::<Token, _>(RefreshError::transient("slow down").with_retry_after(huge)) }
        })
    };
    let sends = Arc::new(AtomicUsize::new(0));
    let svc = RefreshLayer::new(refresher).layer(api("never", sends.clone()));
    for _ in 0..3 {
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        let failed = err
            .downcast_ref::<RefreshFailed>()
            .expect("a typed RefreshFailed");
        assert!(
            !failed.to_string().contains("dropped"),
            "the refresh task died: {failed}"
        );
    }
    // One refresher call: the later requests fail fast during the cool-down.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(sends.load(Ordering::SeqCst), 0);
}
