//! P1, the hot path: a valid token, an in-memory inner service that answers at once.
//!
//! Lines measured side by side in one run, for each request shape:
//!
//! - `bare`: the inner service alone;
//! - `add_authorization`: tower-http's `AddAuthorization` with a static bearer header, the
//!   floor for attaching a token at all (it can neither refresh nor replay);
//! - `replay_floor`: tower's `Retry` over `AddAuthorization`, with a policy that clones every
//!   request (`Request::clone`) and replays it once on a 401: the least a layer that can
//!   replay a request must do with stock tower parts;
//! - `naive`: a hand-written refreshing layer as many applications have one: the token in a
//!   `std::sync::RwLock`, every request cloned for a replay, and every 401 refreshes (no single
//!   flight) and replays once;
//! - `kube_style`: the design of kube-client's refreshable token: a `tokio::sync::Mutex`
//!   locked on every request to read the token (and refresh it first if it expired); no replay;
//! - `mutex_wait`: the token in a `tokio::sync::RwLock`, read on every request; a 401 takes the
//!   write lock for the refresh (requests wait for the unlock), then the request is replayed
//!   once from its clone;
//! - `refresh`: this crate, with a valid initial token (no refresh happens; every refresher in
//!   this bench counts its calls and the count is checked to be zero);
//! - `refresh_expiring`: the same with a token that expires in an hour, as OAuth 2.0 tokens
//!   do: the layer then reads the clock on every request.
//!
//! The peers are small and honest versions of their documented designs, written here (none is
//! a dependency); like typical hand-written middleware, they return a boxed future.
//!
//! Request shapes: GET with an empty body, POST with a 1 KiB and a 64 KiB `Full<Bytes>` body.
//! The inner service reads the whole body (frame by frame) in every line, as a real client
//! would when it sends it.
//!
//! Each request is driven by hand with a no-op waker: `poll_ready`, `call`, one `poll` that
//! must be `Ready`. The request is built outside the timed section (`iter_batched`), so the
//! figure is `poll_ready` + `call` + the future + dropping the response.
//!
//! Interleaved timing: with `HOT_PATH_ROUNDS=<r>` set, the binary times every line of GET and
//! POST 1 KiB in turn, `r` rounds, and prints each line's median and its median ratio to the
//! replay floor within rounds (criterion times one line after the other, so a drift of a
//! shared machine during the run can fall on one line only).
//!
//! Instruction counts: with `HOT_PATH_ITERS=<n>` set, the binary runs `n` requests of one
//! line (`HOT_PATH_LINE` = `build` or a line name above) and one shape
//! (`HOT_PATH_CASE` = `get` | `post_1k` | `post_64k`) without criterion, for
//! `valgrind --tool=callgrind`. See BENCHMARKS.md.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::hint::black_box;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput};
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::retry::{Policy, RetryLayer};
use tower::{Layer, Service, ServiceBuilder, service_fn};
use tower_auth_refresh::{BoxError, RefreshError, ReplayBody, Token, refresh_fn};
use tower_http::auth::AddAuthorizationLayer;

const SECRET: &str = "hot-path-token-0123456789abcdef";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The in-memory inner service: reads the body to its end, answers `200 ()` at once.
fn inner<B>()
-> impl Service<Request<B>, Response = Response<String>, Error = Infallible, Future: Send> + Clone + Send
where
    B: Body + Unpin + Send + 'static,
{
    service_fn(|req: Request<B>| async move {
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            black_box(frame.is_ok());
        }
        Ok::<_, Infallible>(Response::new(String::new()))
    })
}

/// An inner service that checks the `Authorization` header, for the setup check.
fn checking<B>(
    expected: Option<&'static str>,
) -> impl Service<Request<B>, Response = Response<String>, Error = Infallible, Future: Send> + Clone + Send
where
    B: Body + Send + 'static,
{
    service_fn(move |req: Request<B>| {
        let got = req
            .headers()
            .get(AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(got.as_deref(), expected, "Authorization header");
        std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
    })
}

// ---------------------------------------------------------------------------------------------
// The peers.

/// Counts refresher calls of every line: the hot path must never refresh.
static REFRESHES: AtomicUsize = AtomicUsize::new(0);

/// The peers' refresher: counts the call, returns a header.
async fn peer_refresh() -> HeaderValue {
    REFRESHES.fetch_add(1, Ordering::SeqCst);
    HeaderValue::from_static("Bearer refreshed")
}

fn bearer() -> HeaderValue {
    let mut v = HeaderValue::try_from(format!("Bearer {SECRET}")).unwrap();
    v.set_sensitive(true);
    v
}

/// The replay floor's policy: keep a clone of every request, replay it once on a 401.
#[derive(Clone, Copy)]
struct ReplayOnce {
    replayed: bool,
}

impl<B: Clone, Res, E> Policy<Request<B>, Response<Res>, E> for ReplayOnce {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<B>,
        result: &mut Result<Response<Res>, E>,
    ) -> Option<Self::Future> {
        let unauthorized = matches!(result, Ok(res) if res.status() == StatusCode::UNAUTHORIZED);
        if unauthorized && !self.replayed {
            self.replayed = true;
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        Some(req.clone())
    }
}

/// Sends `req` with a ready clone of `inner`, as tower asks (`mem::replace` in `call`).
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// `naive`: the token behind a `std` `RwLock`; every 401 refreshes (no single flight) and the
/// request is replayed once from the clone taken before sending.
#[derive(Clone)]
struct Naive<S> {
    inner: S,
    token: Arc<std::sync::RwLock<HeaderValue>>,
}

impl<S, B> Service<Request<B>> for Naive<S>
where
    S: Service<Request<B>, Response = Response<String>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Clone + Send + 'static,
{
    type Response = Response<String>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let token = self.token.clone();
        let header = token.read().unwrap().clone();
        req.headers_mut().insert(AUTHORIZATION, header);
        let mut copy = req.clone();
        Box::pin(async move {
            let res = inner.call(req).await.map_err(Into::into)?;
            if res.status() != StatusCode::UNAUTHORIZED {
                return Ok(res);
            }
            let fresh = peer_refresh().await;
            *token.write().unwrap() = fresh.clone();
            copy.headers_mut().insert(AUTHORIZATION, fresh);
            poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            inner.call(copy).await.map_err(Into::into)
        })
    }
}

/// kube-client's design: a token with an expiry behind a `tokio::sync::Mutex`, locked on every
/// request; an expired token is refreshed under the lock before sending. No replay.
struct KubeToken {
    header: HeaderValue,
    expires_at: Instant,
}

#[derive(Clone)]
struct KubeStyle<S> {
    inner: S,
    token: Arc<tokio::sync::Mutex<KubeToken>>,
}

impl<S, B> Service<Request<B>> for KubeStyle<S>
where
    S: Service<Request<B>, Response = Response<String>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<String>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let token = self.token.clone();
        Box::pin(async move {
            let header = {
                let mut token = token.lock().await;
                // kube refreshes a little ahead of the expiry.
                if Instant::now() + Duration::from_secs(10) >= token.expires_at {
                    token.header = peer_refresh().await;
                    token.expires_at = Instant::now() + Duration::from_secs(3600);
                }
                token.header.clone()
            };
            req.headers_mut().insert(AUTHORIZATION, header);
            inner.call(req).await.map_err(Into::into)
        })
    }
}

/// A mutex held during the refresh: the token behind a `tokio::sync::RwLock`, read on every
/// request; a 401 takes the write lock (requests wait for the unlock), refreshes unless
/// another request already did, and the request is replayed once from its clone.
#[derive(Clone)]
struct MutexWait<S> {
    inner: S,
    token: Arc<tokio::sync::RwLock<HeaderValue>>,
}

impl<S, B> Service<Request<B>> for MutexWait<S>
where
    S: Service<Request<B>, Response = Response<String>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Clone + Send + Sync + 'static,
{
    type Response = Response<String>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<String>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let token = self.token.clone();
        Box::pin(async move {
            let used = token.read().await.clone();
            req.headers_mut().insert(AUTHORIZATION, used.clone());
            let mut copy = req.clone();
            let res = inner.call(req).await.map_err(Into::into)?;
            if res.status() != StatusCode::UNAUTHORIZED {
                return Ok(res);
            }
            let fresh = {
                let mut current = token.write().await;
                if *current == used {
                    *current = peer_refresh().await;
                }
                current.clone()
            };
            copy.headers_mut().insert(AUTHORIZATION, fresh);
            poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            inner.call(copy).await.map_err(Into::into)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The lines.

/// One request, driven by hand: `poll_ready`, `call`, one `poll` that must be `Ready`.
#[inline(always)]
fn drive<S, B>(svc: &mut S, req: Request<B>) -> Response<String>
where
    S: Service<Request<B>, Response = Response<String>>,
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

/// The lines, in the order of the tables.
const LINES: [&str; 8] = [
    "bare",
    "add_authorization",
    "replay_floor",
    "naive",
    "kube_style",
    "mutex_wait",
    "refresh",
    "refresh_expiring",
];

/// A line's service over `inner`, type-erased only by `impl Trait` (no boxing on the path):
/// one closure per line, called by [`with_line`]. `inner` is written once and typed per line
/// (this crate's lines wrap the body in `ReplayBody`).
macro_rules! with_line {
    ($line:expr, $inner:expr, |$svc:ident| $body:expr) => {
        match $line {
            "bare" => {
                let mut $svc = $inner;
                $body
            }
            "add_authorization" => {
                let mut $svc = AddAuthorizationLayer::bearer(SECRET).layer($inner);
                $body
            }
            "replay_floor" => {
                let mut $svc = ServiceBuilder::new()
                    .layer(RetryLayer::new(ReplayOnce { replayed: false }))
                    .layer(AddAuthorizationLayer::bearer(SECRET))
                    .service($inner);
                $body
            }
            "naive" => {
                let mut $svc = Naive {
                    inner: $inner,
                    token: Arc::new(std::sync::RwLock::new(bearer())),
                };
                $body
            }
            "kube_style" => {
                let mut $svc = KubeStyle {
                    inner: $inner,
                    token: Arc::new(tokio::sync::Mutex::new(KubeToken {
                        header: bearer(),
                        expires_at: Instant::now() + Duration::from_secs(3600),
                    })),
                };
                $body
            }
            "mutex_wait" => {
                let mut $svc = MutexWait {
                    inner: $inner,
                    token: Arc::new(tokio::sync::RwLock::new(bearer())),
                };
                $body
            }
            "refresh" | "refresh_expiring" => {
                let mut $svc = refresh_svc($inner, $line);
                $body
            }
            other => panic!("unknown line {other}"),
        }
    };
}

/// This crate's line: a valid token, a refresher that only counts its calls. Built with
/// `ServiceBuilder` and inference only, so renaming the layer's types does not touch it.
fn refresh_svc<S>(
    inner: S,
    line: &str,
) -> impl Service<Request<Full<Bytes>>, Response = Response<String>, Error = BoxError>
where
    S: Service<Request<ReplayBody<Full<Bytes>>>, Response = Response<String>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    ServiceBuilder::new()
        .layer(
            tower_auth_refresh::RefreshLayer::new(refresh_fn(|_stale| {
                REFRESHES.fetch_add(1, Ordering::SeqCst);
                async { Err::<Token, _>(RefreshError::terminal("the hot path must not refresh")) }
            }))
            .initial_token(match line {
                "refresh_expiring" => Token::bearer(SECRET)
                    .unwrap()
                    .with_expires_in(Duration::from_secs(3600)),
                _ => Token::bearer(SECRET).unwrap(),
            }),
        )
        .service(inner)
}

fn assert_no_refresh() {
    assert_eq!(
        REFRESHES.load(Ordering::SeqCst),
        0,
        "the hot path called a refresher"
    );
}

/// Checks that every line sends what it should, and that no line refreshes.
fn setup_check() {
    let expected: &'static str = Box::leak(format!("Bearer {SECRET}").into_boxed_str());
    for case in Case::ALL {
        let payload = case.payload();
        for line in LINES {
            let want = (line != "bare").then_some(expected);
            with_line!(line, checking(want), |svc| {
                drive(&mut svc, request(case, &payload));
            });
        }
    }
    assert_no_refresh();
}

fn bench(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let _enter = rt.enter();
    setup_check();

    for case in Case::ALL {
        let payload = case.payload();
        let mut group = c.benchmark_group(format!("p1/{}", case.name()));
        group.throughput(Throughput::Elements(1));
        for line in LINES {
            with_line!(line, inner(), |svc| {
                group.bench_function(line, |b| {
                    b.iter_batched(
                        || request(case, &payload),
                        |req| drive(&mut svc, req),
                        BatchSize::SmallInput,
                    )
                });
            });
        }
        group.finish();
    }
    assert_no_refresh();
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
    in_checked_runtime(|| count_line(&line, case, iters));
}

/// Runs `f` inside a current-thread runtime, after the setup check.
fn in_checked_runtime(f: impl FnOnce()) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    setup_check();
    f();
    assert_no_refresh();
}

fn count_line(line: &str, case: Case, iters: u64) {
    let payload = case.payload();
    match line {
        "build" => {
            for _ in 0..iters {
                black_box(request(case, &payload));
            }
        }
        other => with_line!(other, inner(), |svc| {
            for _ in 0..iters {
                black_box(drive(&mut svc, request(case, &payload)));
            }
        }),
    }
}

/// Requests per timed batch in the rounds mode, and batches per line and round.
const BATCH: usize = 1000;
const BATCHES: usize = 40;

/// Nanoseconds per request of `svc` for `case`: `BATCHES` batches of `BATCH` requests, each
/// batch built before its clock starts (as criterion's `iter_batched` does), one batch of
/// warm-up first.
fn time_line<S>(svc: &mut S, case: Case, payload: &Bytes) -> f64
where
    S: Service<Request<Full<Bytes>>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    let mut timed = Duration::ZERO;
    for batch in 0..=BATCHES {
        let requests: Vec<_> = (0..BATCH).map(|_| request(case, payload)).collect();
        let start = Instant::now();
        for req in requests {
            black_box(drive(svc, req));
        }
        if batch > 0 {
            timed += start.elapsed();
        }
    }
    timed.as_nanos() as f64 / (BATCH * BATCHES) as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `HOT_PATH_ROUNDS` mode: every line of a case timed in turn, round after round, so that a
/// drift of a shared machine falls on every line alike; each line's figure is the median of
/// its rounds, and its ratio to the replay floor is the median of the ratios within rounds.
fn rounds_mode(rounds: usize) {
    in_checked_runtime(|| time_rounds(rounds));
}

fn time_rounds(rounds: usize) {
    let floor = LINES.iter().position(|l| *l == "replay_floor").unwrap();
    for case in [Case::Get, Case::Post1k] {
        let payload = case.payload();
        let mut ns: Vec<Vec<f64>> = vec![Vec::new(); LINES.len()];
        for _ in 0..rounds {
            for (i, line) in LINES.iter().enumerate() {
                let t = with_line!(*line, inner(), |svc| time_line(&mut svc, case, &payload));
                ns[i].push(t);
            }
        }
        println!(
            "P1 {} ({rounds} rounds of {} requests per line, lines interleaved):",
            case.name(),
            BATCH * BATCHES
        );
        for (i, line) in LINES.iter().enumerate() {
            let mut ratios: Vec<f64> = (0..rounds).map(|r| ns[i][r] / ns[floor][r]).collect();
            let mut own = ns[i].clone();
            println!(
                "  {line:<18} {:>7.1} ns (median; min {:>6.1})  {:.3}x the replay floor (median of the rounds' ratios)",
                median(&mut own),
                own[0],
                median(&mut ratios)
            );
        }
    }
}

fn main() {
    if let Ok(iters) = std::env::var("HOT_PATH_ITERS") {
        count_mode(iters.parse().expect("HOT_PATH_ITERS is a number"));
        return;
    }
    if let Ok(rounds) = std::env::var("HOT_PATH_ROUNDS") {
        rounds_mode(rounds.parse().expect("HOT_PATH_ROUNDS is a number"));
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
