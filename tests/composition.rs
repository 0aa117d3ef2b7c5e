//! Composition with tower and tower-http layers: retry, timeout, trace, sensitive headers,
//! buffer, concurrency limit.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::buffer::BufferLayer;
use tower::limit::ConcurrencyLimitLayer;
use tower::retry::{Policy, RetryLayer};
use tower::timeout::TimeoutLayer;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::error::{RefreshRejected, is_auth_failure};
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnRequest, TraceLayer};

use support::{capture_logs, guard, rejecting, run_paused};

type Body = Full<Bytes>;

/// An API that accepts only `Bearer <accepted>`; counts what it saw.
#[derive(Clone, Default)]
struct Api {
    accepted: Arc<Mutex<String>>,
    seen: Arc<AtomicUsize>,
    /// Fail this many requests with a 503 first (a transient server error to retry).
    flaky: Arc<AtomicUsize>,
}

impl Service<Request<ReplayBody<Body>>> for Api {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody<Body>>) -> Self::Future {
        self.seen.fetch_add(1, Ordering::SeqCst);
        let status = if self.flaky.load(Ordering::SeqCst) > 0 {
            self.flaky.fetch_sub(1, Ordering::SeqCst);
            StatusCode::SERVICE_UNAVAILABLE
        } else if req
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| *v == format!("Bearer {}", self.accepted.lock().unwrap()))
        {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        std::future::ready(Ok(Response::builder()
            .status(status)
            .body(String::new())
            .unwrap()))
    }
}

fn issuing(
    api: &Api,
    calls: &Arc<AtomicUsize>,
    delay: Duration,
) -> impl tower_auth_refresh::TokenRefresher {
    let (accepted, calls) = (api.accepted.clone(), calls.clone());
    refresh_fn(move |_| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let accepted = accepted.clone();
        async move {
            tokio::time::sleep(delay).await;
            let secret = format!("fresh-{n}");
            *accepted.lock().unwrap() = secret.clone();
            Ok::<_, RefreshError>(Token::bearer(secret)?)
        }
    })
}

fn get() -> Request<Body> {
    support::get("https://api.test/")
}

/// Retries 5xx and transport errors, never the layer's auth failures.
#[derive(Clone)]
struct RetryServerErrors(usize);

impl Policy<Request<Body>, Response<String>, BoxError> for RetryServerErrors {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<Body>,
        result: &mut Result<Response<String>, BoxError>,
    ) -> Option<Self::Future> {
        let retry = match result {
            Ok(res) => res.status().is_server_error(),
            Err(err) => !is_auth_failure(&**err),
        };
        (retry && self.0 > 0).then(|| {
            self.0 -= 1;
            std::future::ready(())
        })
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}

#[tokio::test]
async fn retry_outside_picks_up_the_fresh_token_and_never_retries_auth_failures() {
    guard(async {
        let api = Api::default();
        api.flaky.store(1, Ordering::SeqCst);
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(RetryLayer::new(RetryServerErrors(3)))
            .layer(RefreshLayer::new(issuing(&api, &calls, Duration::ZERO)))
            .service(api.clone());
        // 503 (retried by the retry layer), then the token is fetched and used.
        assert_eq!(
            svc.clone().oneshot(get()).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // A terminal refresh failure is not retried.
        let tries = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(RetryLayer::new(RetryServerErrors(3)))
            .layer(RefreshLayer::new(rejecting(&tries)))
            .service(api.clone());
        let err = svc.oneshot(get()).await.unwrap_err();
        assert!(err.is::<RefreshRejected>(), "{err}");
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[test]
fn an_outer_timeout_cancels_the_request_but_not_the_refresh() {
    run_paused(Duration::from_secs(3600), async {
        let api = Api::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(issuing(&api, &calls, Duration::from_secs(2)));
        let handle = layer.token_handle();
        let svc = ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_millis(500)))
            .layer(layer)
            // Inside: each attempt (the first send and the replay) gets its own timeout.
            .layer(TimeoutLayer::new(Duration::from_secs(1)))
            .service(api.clone());
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>());
        assert!(handle.state().refreshing());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            handle.state().generation(),
            1,
            "the refresh finished on its own"
        );
        assert_eq!(svc.oneshot(get()).await.unwrap().status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(api.seen.load(Ordering::SeqCst), 1);
    });
}

#[tokio::test]
async fn trace_and_sensitive_headers_layers_never_print_the_token() {
    guard(async {
        let (logs, _tracing) = capture_logs();

        let api = Api::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(issuing(&api, &calls, Duration::ZERO))
            .initial_token(Token::bearer("stale-secret-value").unwrap());
        let svc = ServiceBuilder::new()
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(DefaultMakeSpan::new().include_headers(true))
                    .on_request(DefaultOnRequest::new()),
            )
            .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
            .layer(layer)
            // Inside the refresh layer: sees the Authorization header the layer set.
            .layer(
                TraceLayer::new_for_http().make_span_with(
                    DefaultMakeSpan::new()
                        .include_headers(true)
                        .level(tracing::Level::INFO),
                ),
            )
            .service(api.clone());
        for _ in 0..5 {
            assert_eq!(
                svc.clone().oneshot(get()).await.unwrap().status(),
                StatusCode::OK
            );
        }
        let text = logs.text();
        assert!(
            text.contains("authorization"),
            "the trace shows headers: {text}"
        );
        assert!(text.contains("Sensitive"));
        assert!(
            text.contains("token refresh succeeded"),
            "the layer's own events are captured"
        );
        assert!(
            !text.contains("stale-secret-value") && !text.contains("fresh-1"),
            "token leaked: {text}"
        );
    })
    .await;
}

/// A service that is not `Clone`: it must sit behind a `Buffer`.
struct NotClone(Api);

impl Service<Request<ReplayBody<Body>>> for NotClone {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReplayBody<Body>>) -> Self::Future {
        self.0.call(req)
    }
}

#[tokio::test]
async fn works_over_buffer_and_concurrency_limit() {
    guard(async {
        let api = Api::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(
                RefreshLayer::new(issuing(&api, &calls, Duration::from_millis(5)))
                    .initial_token(Token::bearer("stale").unwrap()),
            )
            .layer(BufferLayer::new(64))
            .layer(ConcurrencyLimitLayer::new(4))
            .service(NotClone(api.clone()));
        let all: Vec<_> = (0..100)
            .map(|_| tokio::spawn(svc.clone().oneshot(get())))
            .collect();
        for c in all {
            assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Every request is sent once with the fresh token; only those sent before the first 401
        // came back carry the stale one (the rest wait for the refresh instead).
        let seen = api.seen.load(Ordering::SeqCst);
        assert!((101..=200).contains(&seen), "{seen}");

        // Boxed and cloned services work as well.
        let boxed = tower::util::BoxCloneService::new(svc.map_err(|e: BoxError| e));
        let res = boxed.oneshot(get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    })
    .await;
}
