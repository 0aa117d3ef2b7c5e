//! P1, the hot path: a valid token, an in-memory inner service that answers at once.
//!
//! Three lines measured side by side in one run, for each request shape:
//!
//! - `bare`: the inner service alone;
//! - `add_authorization`: tower-http's `AddAuthorization` with a static bearer header, the
//!   floor for attaching a token at all;
//! - `refresh`: this crate's `Refresh`, with a valid initial token (no refresh happens; the
//!   refresher counts its calls and the count is checked to be zero);
//! - `add_authorization+retry` (reference): tower's `Retry` with a policy that keeps a copy of
//!   each request (`Request::clone`) and never retries, over `AddAuthorization`: the least a
//!   layer that can replay a request must do with stock tower parts.
//!
//! Request shapes: GET with an empty body, POST with a 1 KiB and a 64 KiB `Full<Bytes>` body.
//! The inner service reads the whole body (frame by frame) in all three lines, as a real
//! client would when it sends it.
//!
//! Each request is driven by hand with a no-op waker: `poll_ready`, `call`, one `poll` that
//! must be `Ready`. The request is built outside the timed section (`iter_batched`), so the
//! figure is `poll_ready` + `call` + the future + dropping the response.
//!
//! Instruction counts: with `HOT_PATH_ITERS=<n>` set, the binary runs `n` requests of one
//! line (`HOT_PATH_LINE` = `build` | `bare` | `add_authorization` | `refresh` |
//! `add_authorization+retry`) and one shape
//! (`HOT_PATH_CASE` = `get` | `post_1k` | `post_64k`) without criterion, for
//! `valgrind --tool=callgrind`. See BENCHMARKS.md.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput};
use http::header::AUTHORIZATION;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::retry::{Policy, RetryLayer};
use tower::{Layer, Service, service_fn};
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};
use tower_http::auth::AddAuthorizationLayer;

const SECRET: &str = "hot-path-token-0123456789abcdef";

/// The in-memory inner service: reads the body to its end, answers `200 ()` at once.
fn inner<B>()
-> impl Service<Request<B>, Response = Response<()>, Error = Infallible, Future: Send> + Clone
where
    B: Body + Unpin + Send + 'static,
{
    service_fn(|req: Request<B>| async move {
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            black_box(frame.is_ok());
        }
        Ok::<_, Infallible>(Response::new(()))
    })
}

/// An inner service that checks the `Authorization` header, for the setup check.
fn checking<B>(
    expected: Option<&'static str>,
) -> impl Service<Request<B>, Response = Response<()>, Error = Infallible, Future: Send> + Clone
where
    B: Body + Send + 'static,
{
    service_fn(move |req: Request<B>| {
        let got = req
            .headers()
            .get(AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(got.as_deref(), expected, "Authorization header");
        std::future::ready(Ok::<_, Infallible>(Response::new(())))
    })
}

/// A retry policy that keeps a copy of every request for a replay, and never replays.
#[derive(Clone, Copy)]
struct KeepCopy;

impl<B: Clone, Res, E> Policy<Request<B>, Res, E> for KeepCopy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<B>,
        _result: &mut Result<Res, E>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        Some(req.clone())
    }
}

/// One request, driven by hand: `poll_ready`, `call`, one `poll` that must be `Ready`.
#[inline(always)]
fn drive<S, B>(svc: &mut S, req: Request<B>) -> Response<()>
where
    S: Service<Request<B>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("the service is not ready"),
    }
    let fut = pin!(svc.call(req));
    match fut.poll(&mut cx) {
        Poll::Ready(Ok(res)) => res,
        Poll::Ready(Err(e)) => panic!("request failed: {e:?}"),
        Poll::Pending => panic!("the in-memory service did not answer at once"),
    }
}

#[derive(Clone, Copy, Debug)]
enum Case {
    Get,
    Post1k,
    Post64k,
}

impl Case {
    const ALL: [Case; 3] = [Case::Get, Case::Post1k, Case::Post64k];

    fn name(self) -> &'static str {
        match self {
            Case::Get => "get_empty",
            Case::Post1k => "post_1k",
            Case::Post64k => "post_64k",
        }
    }

    fn len(self) -> usize {
        match self {
            Case::Get => 0,
            Case::Post1k => 1024,
            Case::Post64k => 64 * 1024,
        }
    }

    /// The body bytes, shared by every request of the case (cloning `Bytes` is a refcount).
    fn payload(self) -> Bytes {
        let b = Bytes::from(vec![b'x'; self.len()]);
        // Promote the `Bytes` to its shared form now, so no request pays for that.
        drop(b.clone());
        b
    }
}

fn request(case: Case, payload: &Bytes) -> Request<Full<Bytes>> {
    match case {
        Case::Get => Request::get("/items/42")
            .body(Full::new(Bytes::new()))
            .unwrap(),
        _ => Request::post("/items")
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(payload.clone()))
            .unwrap(),
    }
}

/// The refresh line's layer: a valid token, a refresher that counts its calls.
fn refresh_layer(calls: &Arc<AtomicUsize>) -> RefreshLayer {
    let calls = calls.clone();
    RefreshLayer::new(refresh_fn(move |_stale| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Err::<Token, _>(RefreshError::terminal("the hot path must not refresh")) }
    }))
    .initial_token(Token::bearer(SECRET).unwrap())
}

/// The reference line: keep a copy of the request (tower `Retry`), attach the token.
fn retry_stack()
-> impl Service<Request<Full<Bytes>>, Response = Response<()>, Error: std::fmt::Debug> {
    RetryLayer::new(KeepCopy)
        .layer(AddAuthorizationLayer::bearer(SECRET).layer(inner::<Full<Bytes>>()))
}

/// Checks that every line sends what it should, and that `Refresh` does not refresh.
fn setup_check(calls: &Arc<AtomicUsize>) {
    let expected: &'static str = Box::leak(format!("Bearer {SECRET}").into_boxed_str());
    for case in Case::ALL {
        let payload = case.payload();
        drive(&mut checking(None), request(case, &payload));
        drive(
            &mut AddAuthorizationLayer::bearer(SECRET).layer(checking(Some(expected))),
            request(case, &payload),
        );
        drive(
            &mut RetryLayer::new(KeepCopy)
                .layer(AddAuthorizationLayer::bearer(SECRET).layer(checking(Some(expected)))),
            request(case, &payload),
        );
        drive(
            &mut refresh_layer(calls).layer(checking::<ReplayBody<Full<Bytes>>>(Some(expected))),
            request(case, &payload),
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the hot path called the refresher"
    );
}

fn bench(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let _enter = rt.enter();
    let calls = Arc::new(AtomicUsize::new(0));
    setup_check(&calls);

    for case in Case::ALL {
        let payload = case.payload();
        let mut group = c.benchmark_group(format!("p1/{}", case.name()));
        group.throughput(Throughput::Elements(1));

        let mut bare = inner::<Full<Bytes>>();
        let mut add = AddAuthorizationLayer::bearer(SECRET).layer(inner::<Full<Bytes>>());
        let mut refresh = refresh_layer(&calls).layer(inner::<ReplayBody<Full<Bytes>>>());
        let mut retry = retry_stack();

        group.bench_function("bare", |b| {
            b.iter_batched(
                || request(case, &payload),
                |req| drive(&mut bare, req),
                BatchSize::SmallInput,
            )
        });
        group.bench_function("add_authorization", |b| {
            b.iter_batched(
                || request(case, &payload),
                |req| drive(&mut add, req),
                BatchSize::SmallInput,
            )
        });
        group.bench_function("refresh", |b| {
            b.iter_batched(
                || request(case, &payload),
                |req| drive(&mut refresh, req),
                BatchSize::SmallInput,
            )
        });
        group.bench_function("add_authorization+retry", |b| {
            b.iter_batched(
                || request(case, &payload),
                |req| drive(&mut retry, req),
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the hot path called the refresher"
    );
}

/// `HOT_PATH_ITERS` mode: `n` requests of one line and one case, for callgrind.
fn count_mode(iters: u64) {
    let line = std::env::var("HOT_PATH_LINE").unwrap_or_else(|_| "refresh".into());
    let case = match std::env::var("HOT_PATH_CASE").as_deref().unwrap_or("get") {
        "get" => Case::Get,
        "post_1k" => Case::Post1k,
        "post_64k" => Case::Post64k,
        other => panic!("unknown HOT_PATH_CASE {other}"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let calls = Arc::new(AtomicUsize::new(0));
    setup_check(&calls);
    let payload = case.payload();
    match line.as_str() {
        "build" => {
            for _ in 0..iters {
                black_box(request(case, &payload));
            }
        }
        "bare" => {
            let mut svc = inner::<Full<Bytes>>();
            for _ in 0..iters {
                black_box(drive(&mut svc, request(case, &payload)));
            }
        }
        "add_authorization" => {
            let mut svc = AddAuthorizationLayer::bearer(SECRET).layer(inner::<Full<Bytes>>());
            for _ in 0..iters {
                black_box(drive(&mut svc, request(case, &payload)));
            }
        }
        "refresh" => {
            let mut svc = refresh_layer(&calls).layer(inner::<ReplayBody<Full<Bytes>>>());
            for _ in 0..iters {
                black_box(drive(&mut svc, request(case, &payload)));
            }
        }
        "add_authorization+retry" => {
            let mut svc = retry_stack();
            for _ in 0..iters {
                black_box(drive(&mut svc, request(case, &payload)));
            }
        }
        other => panic!("unknown HOT_PATH_LINE {other}"),
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the hot path called the refresher"
    );
}

fn main() {
    if let Ok(iters) = std::env::var("HOT_PATH_ITERS") {
        count_mode(iters.parse().expect("HOT_PATH_ITERS is a number"));
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench(&mut c, &rt);
    c.final_summary();
}
