//! Behaviour of the core layer, driven step by step with `tower_test::mock`.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::{Notify, Semaphore};
use tower::{Layer, Service, ServiceExt};
use tower_auth_refresh::RefreshContext;
use tower_auth_refresh::error::{
    RefreshFailed, RefreshRejected, SessionEnded, UnauthorizedAfterRefresh,
};
use tower_auth_refresh::{
    Backoff, BoxError, NoReplay, Refresh, RefreshError, RefreshEvent, RefreshLayer, ReplayBody,
    Token, TokenRefresher, TokenRequest, refresh_fn,
};
use tower_test::mock;

use support::{get, guard, run_paused};

type Body = Full<Bytes>;
type Mock = mock::Mock<Request<ReplayBody<Body>>, Response<String>>;
type Handle = mock::Handle<Request<ReplayBody<Body>>, Response<String>>;

/// A refresher that hands out `fresh-1`, `fresh-2`, ... and counts its calls. When `gate` is
/// set, each call waits for one permit first.
#[derive(Clone, Default)]
struct Counting {
    calls: Arc<AtomicUsize>,
    gate: Option<Arc<Semaphore>>,
    lifetime: Option<Duration>,
}

impl Counting {
    fn gated() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        (
            Self {
                gate: Some(gate.clone()),
                ..Self::default()
            },
            gate,
        )
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl TokenRefresher for Counting {
    type Future = futures_util::future::BoxFuture<'static, Result<Token, RefreshError>>;

    fn refresh(&self, _ctx: RefreshContext) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let gate = self.gate.clone();
        let lifetime = self.lifetime;
        Box::pin(async move {
            if let Some(gate) = gate {
                gate.acquire().await.expect("gate open").forget();
            }
            let token = Token::bearer(format!("fresh-{n}"))?;
            Ok(match lifetime {
                Some(life) => token.with_expires_in(life),
                None => token,
            })
        })
    }
}

fn layered(layer: RefreshLayer) -> (Refresh<Mock>, Handle) {
    let (mock, handle) = mock::pair();
    (layer.layer(mock), handle)
}

fn stale_layer(refresher: Counting) -> RefreshLayer {
    RefreshLayer::new(refresher).initial_token(Token::bearer("stale").unwrap())
}

fn auth(req: &Request<ReplayBody<Body>>) -> String {
    let values: Vec<_> = req.headers().get_all(AUTHORIZATION).iter().collect();
    assert_eq!(values.len(), 1, "exactly one Authorization header");
    values[0].to_str().unwrap().to_owned()
}

fn status(code: StatusCode) -> Response<String> {
    Response::builder()
        .status(code)
        .body(String::new())
        .unwrap()
}

/// A 401 with a `WWW-Authenticate` challenge.
fn challenge(value: &'static str) -> Response<String> {
    let mut res = status(StatusCode::UNAUTHORIZED);
    res.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static(value));
    res
}

type Call = tokio::task::JoinHandle<Result<Response<String>, BoxError>>;

fn spawn_call<S, B>(svc: &S, req: Request<B>) -> Call
where
    S: Service<Request<B>, Response = Response<String>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    let svc = svc.clone();
    tokio::spawn(svc.oneshot(req))
}

/// [`spawn_call`], counting in `waiting` once the call's first poll has left it pending: it
/// then waits for a token (the inner service is always ready, so nothing else holds it up), so
/// a test can wait for requests to have reached the cell instead of sleeping.
fn spawn_waiting_call<S, B>(svc: &S, req: Request<B>, waiting: &Arc<AtomicUsize>) -> Call
where
    S: Service<Request<B>, Response = Response<String>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    let call = svc.clone().oneshot(req);
    let waiting = waiting.clone();
    tokio::spawn(async move {
        let mut call = std::pin::pin!(call);
        let mut first = true;
        std::future::poll_fn(move |cx| {
            let poll = call.as_mut().poll(cx);
            if std::mem::take(&mut first) && poll.is_pending() {
                waiting.fetch_add(1, Ordering::SeqCst);
            }
            poll
        })
        .await
    })
}

/// The status the caller of `call` got.
async fn status_of(call: Call) -> StatusCode {
    call.await.unwrap().unwrap().status()
}

/// Takes the next request that reaches the inner service and answers it with `response`.
async fn answer<B>(
    handle: &mut mock::Handle<Request<ReplayBody<B>>, Response<String>>,
    response: Response<String>,
) -> Request<ReplayBody<B>> {
    let (req, send) = handle.next_request().await.unwrap();
    send.send_response(response);
    req
}

/// Sends `req` through `svc`, answers it with `response` when it reaches the inner service,
/// checks that the caller gets that answer's status, and returns the request as sent.
async fn round_trip<S, B>(
    svc: &S,
    handle: &mut mock::Handle<Request<ReplayBody<B>>, Response<String>>,
    req: Request<B>,
    response: Response<String>,
) -> Request<ReplayBody<B>>
where
    S: Service<Request<B>, Response = Response<String>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    let code = response.status();
    let call = spawn_call(svc, req);
    let sent = answer(handle, response).await;
    assert_eq!(status_of(call).await, code);
    sent
}

/// Asserts that no request reaches the inner service within `within`.
async fn assert_nothing_sent<Req, Res>(
    handle: &mut mock::Handle<Req, Res>,
    within: Duration,
    why: &str,
) {
    assert!(
        tokio::time::timeout(within, handle.next_request())
            .await
            .is_err(),
        "{why}"
    );
}

async fn read_body(req: Request<ReplayBody<Body>>) -> (http::request::Parts, Bytes) {
    let (parts, body) = req.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn attaches_sensitive_bearer_and_leaves_callers_own_authorization_alone() {
    guard(async {
        let refresher = Counting::default();
        let (svc, mut handle) = layered(stale_layer(refresher.clone()));

        let req = round_trip(&svc, &mut handle, get("/a"), status(StatusCode::OK)).await;
        assert_eq!(auth(&req), "Bearer stale");
        assert!(req.headers()[AUTHORIZATION].is_sensitive());

        // The caller's own credentials win, and their 401 is theirs: no refresh, no replay.
        let mut own = get("/b");
        own.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwdw=="),
        );
        let req = round_trip(&svc, &mut handle, own, status(StatusCode::UNAUTHORIZED)).await;
        assert_eq!(auth(&req), "Basic dXNlcjpwdw==");
        assert_eq!(refresher.calls(), 0);

        // Found among a few other headers, and among many (the layer looks for it two ways).
        for others in [3, 12] {
            let mut own = get("/c");
            for i in 0..others {
                own.headers_mut().insert(
                    http::HeaderName::try_from(format!("x-extra-{i}")).unwrap(),
                    HeaderValue::from_static("1"),
                );
            }
            own.headers_mut().insert(
                AUTHORIZATION,
                HeaderValue::from_static("Basic dXNlcjpwdw=="),
            );
            own.headers_mut()
                .insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
            let req = round_trip(&svc, &mut handle, own, status(StatusCode::UNAUTHORIZED)).await;
            assert_eq!(auth(&req), "Basic dXNlcjpwdw==", "{others} other headers");
            assert_eq!(refresher.calls(), 0);
        }
    })
    .await;
}

#[tokio::test]
async fn first_requests_share_one_initial_refresh() {
    guard(async {
        let (refresher, gate) = Counting::gated();
        let (svc, mut handle) = layered(RefreshLayer::new(refresher.clone()));

        let waiting = Arc::new(AtomicUsize::new(0));
        let calls: Vec<_> = (0..20)
            .map(|i| spawn_waiting_call(&svc, get(format!("/{i}")), &waiting))
            .collect();
        // Every request reaches the cell before the refresh completes.
        support::yield_until(
            "all 20 requests wait for the token",
            support::YIELD_BOUND,
            || waiting.load(Ordering::SeqCst) == 20,
        )
        .await;
        assert_eq!(refresher.calls(), 1);
        gate.add_permits(1);
        for _ in 0..20 {
            let req = answer(&mut handle, status(StatusCode::OK)).await;
            assert_eq!(auth(&req), "Bearer fresh-1");
        }
        for call in calls {
            assert_eq!(status_of(call).await, StatusCode::OK);
        }
        assert_eq!(refresher.calls(), 1);
    })
    .await;
}

#[tokio::test]
async fn late_401_for_an_older_generation_reuses_the_refreshed_token() {
    guard(async {
        let refresher = Counting::default();
        let (svc, mut handle) = layered(stale_layer(refresher.clone()));
        let mut seen = Vec::new();

        let a = spawn_call(&svc, get("/a"));
        let (req_a, send_a) = handle.next_request().await.unwrap();
        seen.push(auth(&req_a));
        let b = spawn_call(&svc, get("/b"));
        let (req_b, send_b) = handle.next_request().await.unwrap();
        seen.push(auth(&req_b));

        // A's 401 refreshes; A replays with fresh-1.
        send_a.send_response(status(StatusCode::UNAUTHORIZED));
        let replay_a = answer(&mut handle, status(StatusCode::OK)).await;
        seen.push(auth(&replay_a));
        assert_eq!(replay_a.uri(), "/a");
        assert_eq!(status_of(a).await, StatusCode::OK);

        // B's response was held back until now: a 401 for the stale generation.
        send_b.send_response(status(StatusCode::UNAUTHORIZED));
        let replay_b = answer(&mut handle, status(StatusCode::OK)).await;
        seen.push(auth(&replay_b));
        assert_eq!(replay_b.uri(), "/b");
        assert_eq!(status_of(b).await, StatusCode::OK);

        assert_eq!(
            seen,
            [
                "Bearer stale",
                "Bearer stale",
                "Bearer fresh-1",
                "Bearer fresh-1"
            ]
        );
        assert_eq!(refresher.calls(), 1);
    })
    .await;
}

#[derive(Clone, Debug, PartialEq)]
struct TraceId(u64);

#[tokio::test]
async fn replay_repeats_method_uri_version_headers_extensions_and_body() {
    guard(async {
        let cases = [
            (Method::GET, "/items?page=2", Bytes::new()),
            (
                Method::POST,
                "/orders",
                Bytes::from_static(br#"{"sku":"A-1","qty":3}"#),
            ),
            (Method::PUT, "/flags/x", Bytes::new()),
        ];
        for (method, uri, body) in cases {
            let refresher = Counting::default();
            let (svc, mut handle) = layered(stale_layer(refresher.clone()));
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri)
                .version(Version::HTTP_11)
                .header("content-type", "application/json")
                .header("x-multi", "1")
                .header("x-multi", "2")
                .header("x-bytes", &b"caf\xc3\xa9 \x80\xff"[..])
                .header("x-empty", "")
                .header(format!("x-custom-{}", 1), "v")
                .body(Full::new(body.clone()))
                .unwrap();
            let mut secret = HeaderValue::from_static("session=s3cr3t");
            secret.set_sensitive(true);
            req.headers_mut().insert(http::header::COOKIE, secret);
            req.extensions_mut().insert(TraceId(7));
            let call = spawn_call(&svc, req);

            let (first, send) = handle.next_request().await.unwrap();
            let (first, first_body) = read_body(first).await;
            send.send_response(status(StatusCode::UNAUTHORIZED));
            let (replay, send) = handle.next_request().await.unwrap();
            assert!(replay.body().is_replay());
            let (replay, replay_body) = read_body(replay).await;
            send.send_response(status(StatusCode::OK));
            assert_eq!(status_of(call).await, StatusCode::OK);

            assert_eq!(replay.method, method);
            assert_eq!(replay.uri, first.uri);
            assert_eq!(replay.version, first.version);
            assert_eq!(replay.extensions.get::<TraceId>(), Some(&TraceId(7)));
            assert_eq!(first_body, body, "{method}: first body");
            assert_eq!(replay_body, body, "{method}: replayed body, byte for byte");
            let mut expected = first.headers.clone();
            assert_eq!(
                expected
                    .insert(AUTHORIZATION, HeaderValue::from_static("Bearer fresh-1"))
                    .unwrap(),
                "Bearer stale"
            );
            assert_eq!(replay.headers, expected, "{method}: headers");
            assert_eq!(replay.headers.get_all("x-multi").iter().count(), 2);
            assert_eq!(
                replay.headers["x-bytes"].as_bytes(),
                b"caf\xc3\xa9 \x80\xff"
            );
            assert_eq!(replay.headers["x-empty"], "");
            assert_eq!(replay.headers["x-custom-1"], "v");
            assert!(
                replay.headers[http::header::COOKIE].is_sensitive(),
                "{method}: a sensitive header stays sensitive in the replay"
            );
            assert_eq!(refresher.calls(), 1);
        }
    })
    .await;
}

#[tokio::test]
async fn a_401_to_the_replay_is_a_typed_error_and_never_a_loop() {
    guard(async {
        let refresher = Counting::default();
        let (svc, mut handle) = layered(stale_layer(refresher.clone()));
        let call = spawn_call(&svc, get("/a"));

        answer(
            &mut handle,
            challenge(r#"Bearer realm="api", error="invalid_token""#),
        )
        .await;
        let replay = answer(&mut handle, status(StatusCode::UNAUTHORIZED)).await;
        assert_eq!(auth(&replay), "Bearer fresh-1");

        let err = call.await.unwrap().unwrap_err();
        let err = err
            .downcast_ref::<UnauthorizedAfterRefresh>()
            .expect("typed error");
        assert_eq!(
            err.first().expect("the first 401").status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            err.first().expect("the first 401").headers()[WWW_AUTHENTICATE],
            r#"Bearer realm="api", error="invalid_token""#
        );
        assert_eq!(err.last().status(), StatusCode::UNAUTHORIZED);
        assert_nothing_sent(&mut handle, Duration::from_millis(50), "exactly two sends").await;
        assert_eq!(refresher.calls(), 1);
    })
    .await;
}

#[tokio::test]
async fn terminal_failure_reaches_every_waiter_as_one_shared_error_then_fails_fast() {
    guard(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let refresher = {
            let (calls, gate) = (calls.clone(), gate.clone());
            refresh_fn(move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    Err(RefreshError::terminal("invalid_grant"))
                }
            })
        };
        let layer = RefreshLayer::new(refresher);
        let token = layer.token_handle();
        let mut events = token.subscribe();
        let (svc, mut handle) = layered(layer);

        let waiting = Arc::new(AtomicUsize::new(0));
        let waiters: Vec<_> = (0..50)
            .map(|i| spawn_waiting_call(&svc, get(format!("/{i}")), &waiting))
            .collect();
        // Every waiter joins the one refresh before it fails.
        support::yield_until(
            "all 50 requests wait for the refresh",
            support::YIELD_BOUND,
            || waiting.load(Ordering::SeqCst) == 50,
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        gate.notify_one();
        let mut shared = None;
        for w in waiters {
            let err = w.await.unwrap().unwrap_err();
            let err = err
                .downcast_ref::<RefreshRejected>()
                .expect("RefreshRejected");
            assert!(err.refresh_error().is_terminal());
            let arc = err.refresh_error().clone();
            if let Some(first) = &shared {
                assert!(Arc::ptr_eq(first, &arc), "every waiter gets the same Arc");
            }
            shared = Some(arc);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Later requests fail fast: no refresher call, nothing sent.
        let err = svc.clone().oneshot(get("/later")).await.unwrap_err();
        assert!(err.is::<SessionEnded>());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_nothing_sent(&mut handle, Duration::from_millis(20), "nothing sent").await;

        let mut ended = 0;
        while let Some(ev) = events.try_recv() {
            if ev == Ok(RefreshEvent::SessionEnded { generation: 0 }) {
                ended += 1;
            }
        }
        assert_eq!(ended, 1, "one session-ended event");

        // A login re-arms the layer.
        token.set_token(Token::bearer("after-login").unwrap());
        let req = round_trip(&svc, &mut handle, get("/again"), status(StatusCode::OK)).await;
        assert_eq!(auth(&req), "Bearer after-login");
    })
    .await;
}

#[tokio::test]
async fn refresh_runs_to_completion_when_every_waiter_is_dropped() {
    guard(async {
        let (refresher, gate) = Counting::gated();
        let layer = stale_layer(refresher.clone());
        let token = layer.token_handle();
        let mut events = token.subscribe();
        let (svc, mut handle) = layered(layer);

        let callers: Vec<_> = (0..5)
            .map(|i| spawn_call(&svc, get(format!("/{i}"))))
            .collect();
        for _ in 0..5 {
            answer(&mut handle, status(StatusCode::UNAUTHORIZED)).await;
        }
        // Wait until the refresh is in flight, then cancel every caller.
        support::yield_until("the refresh started", support::YIELD_BOUND, || {
            refresher.calls() > 0
        })
        .await;
        for c in &callers {
            c.abort();
        }
        for c in callers {
            assert!(c.await.unwrap_err().is_cancelled());
        }
        gate.add_permits(1);
        assert_eq!(
            events.recv().await,
            Some(Ok(RefreshEvent::Refreshed { generation: 2 }))
        );

        // The stored token is used, no second refresh.
        let req = round_trip(&svc, &mut handle, get("/next"), status(StatusCode::OK)).await;
        assert_eq!(auth(&req), "Bearer fresh-1");
        assert_eq!(refresher.calls(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_waiter_finishes_the_job_when_the_request_that_started_the_refresh_is_dropped() {
    guard(async {
        let (refresher, gate) = Counting::gated();
        let (svc, mut handle) = layered(RefreshLayer::new(refresher.clone()));
        let driver = spawn_call(&svc, get("/driver"));
        support::yield_until(
            "the driver started the refresh",
            support::YIELD_BOUND,
            || refresher.calls() > 0,
        )
        .await;
        let waiting = Arc::new(AtomicUsize::new(0));
        let waiter = spawn_waiting_call(&svc, get("/waiter"), &waiting);
        // The waiter has joined the refresh before its driver goes.
        support::yield_until(
            "the waiter joined the refresh",
            support::YIELD_BOUND,
            || waiting.load(Ordering::SeqCst) == 1,
        )
        .await;
        assert_eq!(refresher.calls(), 1);
        driver.abort();
        gate.add_permits(1);
        let req = answer(&mut handle, status(StatusCode::OK)).await;
        assert_eq!(req.uri(), "/waiter");
        assert_eq!(auth(&req), "Bearer fresh-1");
        assert_eq!(status_of(waiter).await, StatusCode::OK);
        assert_eq!(refresher.calls(), 1);
    })
    .await;
}

#[tokio::test]
async fn refresh_requests_and_opted_out_requests_are_not_refreshed() {
    guard(async {
        let refresher = Counting::default();
        let (svc, mut handle) = layered(stale_layer(refresher.clone()));

        let mut marked = get("/token");
        marked.extensions_mut().insert(TokenRequest);
        let req = round_trip(&svc, &mut handle, marked, status(StatusCode::UNAUTHORIZED)).await;
        assert!(
            req.headers().get(AUTHORIZATION).is_none(),
            "refresh requests get no token"
        );

        let mut opted_out = get("/no-refresh");
        opted_out.extensions_mut().insert(NoReplay);
        let req = round_trip(
            &svc,
            &mut handle,
            opted_out,
            status(StatusCode::UNAUTHORIZED),
        )
        .await;
        assert_eq!(auth(&req), "Bearer stale");
        assert_eq!(refresher.calls(), 0);
    })
    .await;
}

#[tokio::test]
async fn rfc6750_insufficient_scope_is_returned_untouched() {
    guard(async {
        let refresher = Counting::default();
        let (svc, mut handle) = layered(stale_layer(refresher.clone()));
        // The caller gets the 401 itself.
        round_trip(
            &svc,
            &mut handle,
            get("/admin"),
            challenge(r#"Bearer error="insufficient_scope", scope="admin""#),
        )
        .await;
        assert_eq!(refresher.calls(), 0);
    })
    .await;
}

#[tokio::test]
async fn streaming_body_is_not_replayed_but_the_refresh_still_happens() {
    guard(async {
        let refresher = Counting::default();
        let layer = stale_layer(refresher.clone());
        let (mock, mut handle) =
            mock::pair::<Request<ReplayBody<StreamBody<_>>>, Response<String>>();
        let svc = layer.layer(mock);
        let chunks = vec![Ok::<_, Infallible>(http_body::Frame::data(
            Bytes::from_static(b"chunk"),
        ))];
        let req = Request::post("/upload")
            .body(StreamBody::new(stream::iter(chunks)))
            .unwrap();
        let call = spawn_call(&svc, req);
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.body().buffered_bytes(), 0);
        send.send_response(status(StatusCode::UNAUTHORIZED));
        // The caller gets the 401 after the refresh ran.
        assert_eq!(status_of(call).await, StatusCode::UNAUTHORIZED);
        assert_eq!(refresher.calls(), 1);
        assert_nothing_sent(&mut handle, Duration::from_millis(20), "not replayed").await;

        let empty = StreamBody::new(stream::iter(Vec::new()));
        let next = Request::get("/next").body(empty).unwrap();
        let req = round_trip(&svc, &mut handle, next, status(StatusCode::OK)).await;
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer fresh-1");
    })
    .await;
}

#[derive(Debug)]
struct InnerBoom;
impl std::fmt::Display for InnerBoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("inner boom")
    }
}
impl std::error::Error for InnerBoom {}

#[tokio::test]
async fn inner_errors_and_readiness_pass_through() {
    guard(async {
        let (mut svc, mut handle) = layered(stale_layer(Counting::default()));
        handle.allow(0);
        let mut ready = tokio_test::task::spawn(());
        ready.enter(|cx, _| assert!(svc.poll_ready(cx).is_pending()));
        handle.allow(1);
        assert!(ready.is_woken());
        ready.enter(|cx, _| assert!(svc.poll_ready(cx).is_ready()));
        let call = tokio::spawn(svc.call(get("/x")));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(InnerBoom);
        let err = call.await.unwrap().unwrap_err();
        assert!(err.is::<InnerBoom>(), "unchanged: {err}");
    })
    .await;
}

#[test]
fn transient_failures_are_retried_then_reported() {
    run_paused(Duration::from_secs(3600), async {
        let calls = Arc::new(AtomicUsize::new(0));
        let refresher = {
            let calls = calls.clone();
            refresh_fn(move |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    match n {
                        1 | 2 => Err(RefreshError::from_status(StatusCode::SERVICE_UNAVAILABLE)),
                        _ => Ok(Token::bearer(format!("fresh-{n}"))?),
                    }
                }
            })
        };
        let (svc, mut handle) = layered(RefreshLayer::new(refresher).retries(Backoff::default()));
        let req = round_trip(&svc, &mut handle, get("/a"), status(StatusCode::OK)).await;
        assert_eq!(auth(&req), "Bearer fresh-3");
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        // Always failing: the attempts run out, the typed transient error, the session goes on.
        let always = refresh_fn(|_| async { Err::<Token, _>(RefreshError::transient("503")) });
        let (svc, _handle) =
            layered(RefreshLayer::new(always).retries(Backoff::default().max_attempts(3)));
        let err = svc.clone().oneshot(get("/b")).await.unwrap_err();
        let failed = err.downcast_ref::<RefreshFailed>().expect("RefreshFailed");
        assert!(failed.refresh_error().is_transient());
        let err = svc.oneshot(get("/c")).await.unwrap_err();
        assert!(
            err.is::<RefreshFailed>(),
            "a transient failure does not end the session"
        );
    });
}

#[test]
fn token_inside_the_leeway_is_refreshed_before_sending() {
    run_paused(Duration::from_secs(3600), async {
        let refresher = Counting {
            lifetime: Some(Duration::from_secs(600)),
            ..Counting::default()
        };
        let (svc, mut handle) =
            layered(RefreshLayer::new(refresher.clone()).leeway(Duration::from_secs(30)));
        for expected in ["Bearer fresh-1", "Bearer fresh-1", "Bearer fresh-2"] {
            let req = round_trip(&svc, &mut handle, get("/"), status(StatusCode::OK)).await;
            assert_eq!(auth(&req), expected);
            // 600 s lifetime, 30 s leeway: the third request (at 570 s) refreshes first.
            tokio::time::advance(Duration::from_secs(285)).await;
        }
        assert_eq!(refresher.calls(), 2);
    });
}

/// A 401 that arrives while the first attempt still holds an unsent body: the replay waits for
/// the body to be let go of (here: dropped unread), then sends all of it.
#[test]
fn a_401_before_the_body_was_sent_waits_for_it_then_replays_it_whole() {
    run_paused(Duration::from_secs(3600), async {
        let refresher = Counting::default();
        let (svc, mut handle) = layered(stale_layer(refresher.clone()));
        let payload = Bytes::from_static(b"{\"order\":42,\"lines\":[1,2,3]}");
        let call = spawn_call(
            &svc,
            Request::post("/orders")
                .body(Full::new(payload.clone()))
                .unwrap(),
        );
        let (first, send) = handle.next_request().await.unwrap();
        // Refused before a byte of the body was read; the client lets go of it a little later.
        send.send_response(status(StatusCode::UNAUTHORIZED));
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(first);
        let (replay, send) = handle.next_request().await.unwrap();
        assert_eq!(auth(&replay), "Bearer fresh-1");
        let (_, body) = read_body(replay).await;
        assert_eq!(body, payload, "the whole body, byte for byte");
        send.send_response(status(StatusCode::OK));
        assert_eq!(status_of(call).await, StatusCode::OK);
        assert_eq!(refresher.calls(), 1);
    });
}

/// An inner service larger than two words, which the layer does not clone per request: a
/// replay goes through a shared copy of it. It answers 401 unless the request carries the
/// token in `accept`, and records the tag it had and the token of every request it saw.
#[derive(Clone)]
struct Tagged {
    tag: String,
    accept: Arc<std::sync::Mutex<String>>,
    seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Service<Request<ReplayBody<Body>>> for Tagged {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody<Body>>) -> Self::Future {
        let token = auth(&req);
        self.seen
            .lock()
            .unwrap()
            .push((self.tag.clone(), token.clone()));
        let ok = token == *self.accept.lock().unwrap();
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        std::future::ready(Ok(status(code)))
    }
}

#[tokio::test]
async fn a_replay_goes_through_the_inner_service_as_get_mut_left_it() {
    guard(async {
        let refresher = Counting::default();
        let accept = Arc::new(std::sync::Mutex::new("Bearer fresh-1".to_owned()));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inner = Tagged {
            tag: "a".into(),
            accept: accept.clone(),
            seen: seen.clone(),
        };
        assert!(std::mem::size_of::<Tagged>() > 2 * std::mem::size_of::<usize>());
        let mut svc = stale_layer(refresher.clone()).layer(inner);

        let res = svc.ready().await.unwrap().call(get("/one")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // The service changes; the next refusal's replay goes through the changed one.
        svc.get_mut().tag = "b".into();
        *accept.lock().unwrap() = "Bearer fresh-2".to_owned();
        let res = svc.ready().await.unwrap().call(get("/two")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);

        let seen = seen.lock().unwrap().clone();
        let seen: Vec<(&str, &str)> = seen.iter().map(|(t, a)| (t.as_str(), a.as_str())).collect();
        assert_eq!(
            seen,
            [
                ("a", "Bearer stale"),
                ("a", "Bearer fresh-1"),
                ("b", "Bearer fresh-1"),
                ("b", "Bearer fresh-2"),
            ]
        );
        assert_eq!(refresher.calls(), 2);
    })
    .await;
}
