//! P3, stampede: 10,000 concurrent requests on a stale token (the first ones are refused, the
//! rest wait for the one refresh), and a refresher that takes 50 ms. Exactly one refresh must
//! run, every request must succeed, and the wall time must stay within 50 ms + 1.5x the time
//! of the same 10,000 requests without a refresh (a valid token from the start), measured in
//! the same run.
//!
//! Setup per round: a fresh layer over an in-memory inner service that answers at once, 200
//! for `Bearer fresh` and 401 otherwise; 10,000 tasks spawned on a multi-threaded runtime,
//! each sending one GET through a clone of the service; the wall time runs from the first
//! spawn to the last response.
//!
//! Environment: `STAMPEDE_ROUNDS` (default 7), `STAMPEDE_REQUESTS` (default 10000);
//! `STAMPEDE_ONLY=fresh|stale|mutex` runs one round of one kind (`mutex`: the mutex +
//! wait-for-unlock design's stampede) on a current-thread runtime (for callgrind);
//! `STAMPEDE_PROFILE=stale|mutex|mutex_layer` runs `STAMPEDE_ROUNDS` stampedes of one kind
//! on the multi-threaded runtime and prints each one's time after the refresh returned (for
//! `perf`). Every round runs the mutex design twice: as client code that builds its request
//! after the unlock, and as a tower layer (`MutexWait`) that gets it built, as this crate does.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, ServiceExt, service_fn};
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

const REFRESH_TIME: Duration = Duration::from_millis(50);

/// What one round measured.
struct Round {
    /// From the first spawn to the last response.
    wall: Duration,
    /// Refresher calls.
    calls: usize,
    /// When the refresher returned, from the first spawn.
    refreshed: Option<Duration>,
    /// Requests the inner service saw (a request sent stale and replayed counts twice).
    sends: usize,
}

/// The in-memory API every design sends to: 200 for `Bearer fresh`, 401 otherwise, at once;
/// `sends` counts the requests it saw.
fn api<B>(
    sends: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<B>,
    Response = Response<String>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<String>, Infallible>>,
> + Clone {
    service_fn(move |req: Request<B>| {
        sends.fetch_add(1, Ordering::Relaxed);
        let ok = req
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| v == "Bearer fresh");
        let mut res = Response::new(String::new());
        *res.status_mut() = if ok {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        std::future::ready(Ok(res))
    })
}

/// Spawns `n` tasks, each sending one GET through a clone of `svc`, and waits for them all
/// (every one must get a 200): when they started, and the wall time to the last response.
async fn send_all<S>(svc: S, n: usize) -> (Instant, Duration)
where
    S: tower::Service<Request<String>, Response = Response<String>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let req = Request::get(format!("/items/{i}"))
                    .body(String::new())
                    .unwrap();
                svc.oneshot(req).await.map(|r| r.status())
            })
        })
        .collect();
    for t in tasks {
        let status = t.await.unwrap().expect("request failed");
        assert_eq!(status, StatusCode::OK);
    }
    (start, start.elapsed())
}

/// Sends `n` concurrent requests through a fresh layer starting from `initial`.
async fn round(n: usize, initial: &'static str) -> Round {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let refreshed_at = Arc::new(Mutex::new(None));
    let refreshed = refreshed_at.clone();
    let layer = RefreshLayer::new(refresh_fn(move |_stale| {
        counter.fetch_add(1, Ordering::SeqCst);
        let refreshed = refreshed.clone();
        async move {
            tokio::time::sleep(REFRESH_TIME).await;
            *refreshed.lock().unwrap() = Some(Instant::now());
            Ok::<_, RefreshError>(Token::bearer("fresh")?)
        }
    }))
    .initial_token(Token::bearer(initial).unwrap());
    let sends = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api::<ReplayBody<String>>(sends.clone()));
    let (start, wall) = send_all(svc, n).await;
    let refreshed = refreshed_at.lock().unwrap().map(|at| at - start);
    Round {
        wall,
        calls: calls.load(Ordering::SeqCst),
        refreshed,
        sends: sends.load(Ordering::SeqCst),
    }
}

/// The same round through the seeds' design instead of the layer: a `tokio::sync::RwLock`
/// around the token; a 401 takes the write lock, refreshes if the token is still the one
/// refused, and replays; requests arriving meanwhile wait on the read lock (wait-for-unlock).
async fn round_mutex_wait(n: usize, initial: &'static str) -> Round {
    let token = Arc::new(tokio::sync::RwLock::new(format!("Bearer {initial}")));
    let calls = Arc::new(AtomicUsize::new(0));
    let sends = Arc::new(AtomicUsize::new(0));
    let refreshed_at = Arc::new(Mutex::new(None));
    // The same in-memory inner service as the layer's rounds, called with a built request.
    let inner = api::<String>(sends.clone());
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (token, calls, inner) = (token.clone(), calls.clone(), inner.clone());
            let refreshed_at = refreshed_at.clone();
            tokio::spawn(async move {
                let send = |auth: String| {
                    let req = Request::get(format!("/items/{i}"))
                        .header(AUTHORIZATION, auth)
                        .body(String::new())
                        .unwrap();
                    inner.clone().oneshot(req)
                };
                let used = token.read().await.clone();
                let res = send(used.clone()).await.unwrap();
                if res.status() == StatusCode::OK {
                    return StatusCode::OK;
                }
                {
                    let mut current = token.write().await;
                    if *current == used {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(REFRESH_TIME).await;
                        *refreshed_at.lock().unwrap() = Some(Instant::now());
                        *current = "Bearer fresh".to_owned();
                    }
                }
                let fresh = token.read().await.clone();
                send(fresh).await.unwrap().status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let wall = start.elapsed();
    let refreshed = refreshed_at.lock().unwrap().map(|at| at - start);
    Round {
        wall,
        calls: calls.load(Ordering::SeqCst),
        refreshed,
        sends: sends.load(Ordering::SeqCst),
    }
}

/// The mutex + wait-for-unlock design as a tower layer, as `benches/hot_path.rs` ports it
/// (`MutexWait`): it gets each request built, as this crate's layer does. The token behind a
/// `tokio::sync::RwLock`, read on every request; a 401 takes the write lock (requests arriving
/// meanwhile wait for the unlock), refreshes unless another request already did, and replays
/// the request once from the clone taken before it was sent.
#[derive(Clone)]
struct MutexWait<S> {
    inner: S,
    token: Arc<tokio::sync::RwLock<HeaderValue>>,
    calls: Arc<AtomicUsize>,
    refreshed_at: Arc<Mutex<Option<Instant>>>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<Request<String>> for MutexWait<S>
where
    S: tower::Service<Request<String>, Response = Response<String>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<String>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<String>, Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<String>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let this = self.clone();
        Box::pin(async move {
            let used = this.token.read().await.clone();
            req.headers_mut().insert(AUTHORIZATION, used.clone());
            let mut copy = req.clone();
            let res = inner.call(req).await?;
            if res.status() != StatusCode::UNAUTHORIZED {
                return Ok(res);
            }
            let fresh = {
                let mut current = this.token.write().await;
                if *current == used {
                    this.calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(REFRESH_TIME).await;
                    *this.refreshed_at.lock().unwrap() = Some(Instant::now());
                    *current = HeaderValue::from_static("Bearer fresh");
                }
                current.clone()
            };
            copy.headers_mut().insert(AUTHORIZATION, fresh);
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            inner.call(copy).await
        })
    }
}

/// The same round through [`MutexWait`], a layer over the same inner service.
async fn round_mutex_layer(n: usize, initial: &'static str) -> Round {
    let sends = Arc::new(AtomicUsize::new(0));
    let inner = api::<String>(sends.clone());
    let svc = MutexWait {
        inner,
        token: Arc::new(tokio::sync::RwLock::new(
            HeaderValue::try_from(format!("Bearer {initial}")).unwrap(),
        )),
        calls: Arc::new(AtomicUsize::new(0)),
        refreshed_at: Arc::new(Mutex::new(None)),
    };
    let (start, wall) = send_all(svc.clone(), n).await;
    let refreshed = svc.refreshed_at.lock().unwrap().map(|at| at - start);
    Round {
        wall,
        calls: svc.calls.load(Ordering::SeqCst),
        refreshed,
        sends: sends.load(Ordering::SeqCst),
    }
}

fn main() {
    let rounds: usize = common::env_or("STAMPEDE_ROUNDS", 7);
    let n: usize = common::env_or("STAMPEDE_REQUESTS", 10_000);
    if let Ok(kind) = std::env::var("STAMPEDE_ONLY") {
        // One round of one kind (`fresh`: no refresh, `stale`: a stampede) on a current-thread
        // runtime, for instruction counts under callgrind.
        let token: &'static str = if kind == "fresh" { "fresh" } else { "stale" };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = if kind == "mutex" {
            rt.block_on(round_mutex_wait(n, token))
        } else {
            rt.block_on(round(n, token))
        };
        println!(
            "{kind}: {n} requests, {:.1} ms, {} refresher calls, {:.3} sends per request",
            ms(r.wall),
            r.calls,
            r.sends as f64 / n as f64
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Ok(kind) = std::env::var("STAMPEDE_PROFILE") {
        // `rounds` stampedes of one kind (`stale` or `mutex`) on the multi-threaded runtime,
        // for a profiler: the time after the refresh returned, per round.
        rt.block_on(async {
            for _ in 0..rounds {
                let r = if kind == "mutex" {
                    round_mutex_wait(n, "stale").await
                } else if kind == "mutex_layer" {
                    round_mutex_layer(n, "stale").await
                } else {
                    round(n, "stale").await
                };
                let drain = r.wall.saturating_sub(r.refreshed.unwrap_or_default());
                println!(
                    "{kind}: {:.1} ms, {:.1} ms after the refresh",
                    ms(r.wall),
                    ms(drain)
                );
            }
        });
        return;
    }
    rt.block_on(async {
        // Warm up the runtime's threads and allocator.
        round(n, "fresh").await;
        round(n, "stale").await;

        let (mut base, mut storm) = (Vec::new(), Vec::new());
        let mut refreshes = Vec::new();
        let mut sends = Vec::new();
        // The peer design, in the same rounds (interleaved, so that a drift of the machine's
        // speed during the run weighs on both alike).
        let mut peer = Vec::new();
        let mut peer_sends = Vec::new();
        let mut ratios = Vec::new();
        // The same design as a tower layer (it gets each request built, as this crate does).
        let (mut layer_peer, mut layer_ratios) = (Vec::new(), Vec::new());
        println!("P3 stampede: {n} concurrent requests, refresher takes {REFRESH_TIME:?}, {rounds} rounds");
        for r in 0..rounds {
            let fresh = round(n, "fresh").await;
            assert_eq!(fresh.calls, 0);
            let stale = round(n, "stale").await;
            let calls = stale.calls;
            assert_eq!(calls, 1, "exactly one refresh");
            let mutex = round_mutex_wait(n, "stale").await;
            assert_eq!(mutex.calls, 1);
            let as_layer = round_mutex_layer(n, "stale").await;
            assert_eq!(as_layer.calls, 1);
            assert!(
                as_layer.sends <= n + n / 50,
                "the layer port sends each request once (the refused ones twice)"
            );
            let (b, s) = (fresh.wall, stale.wall);
            let bound = REFRESH_TIME + b.mul_f64(1.5);
            let refreshed = stale.refreshed.unwrap_or_default();
            let per_request = stale.sends as f64 / n as f64;
            let ratio = s.as_secs_f64() / mutex.wall.as_secs_f64();
            let layer_ratio = s.as_secs_f64() / as_layer.wall.as_secs_f64();
            println!(
                "  round {r}: no refresh {:.1} ms | stampede {:.1} ms, {calls} refresh, {per_request:.3} sends per request (refresher returned at {:.1} ms, last response {:.1} ms later) | bound 50 ms + 1.5x = {:.1} ms | mutex + wait {:.1} ms, refreshed at {:.1} ms ({ratio:.2}x) | as a layer {:.1} ms, refreshed at {:.1} ms ({layer_ratio:.2}x)",
                ms(b),
                ms(s),
                ms(refreshed),
                ms(s.saturating_sub(refreshed)),
                ms(bound),
                ms(mutex.wall),
                ms(mutex.refreshed.unwrap_or_default()),
                ms(as_layer.wall),
                ms(as_layer.refreshed.unwrap_or_default())
            );
            ratios.push(ratio);
            layer_ratios.push(layer_ratio);
            layer_peer.push(as_layer.wall);
            peer.push(mutex.wall);
            peer_sends.push(format!("{:.3}", mutex.sends as f64 / n as f64));
            sends.push(per_request);
            base.push(b);
            storm.push(s);
            refreshes.push(calls);
        }
        let p = common::median(&mut peer);
        println!(
            "P3 mutex + wait-for-unlock (same run): stampede median {:.1} ms, sends per request {:?}",
            ms(p),
            peer_sends
        );
        let (b, s) = (common::median(&mut base), common::median(&mut storm));
        println!(
            "P3 this crate vs mutex + wait-for-unlock: {:.1} ms vs {:.1} ms ({:.2}x; median of the rounds' ratios {:.2}x)",
            ms(s),
            ms(p),
            s.as_secs_f64() / p.as_secs_f64(),
            common::median(&mut ratios)
        );
        let lp = common::median(&mut layer_peer);
        println!(
            "P3 this crate vs mutex + wait-for-unlock as a layer: {:.1} ms vs {:.1} ms ({:.2}x; median of the rounds' ratios {:.2}x)",
            ms(s),
            ms(lp),
            s.as_secs_f64() / lp.as_secs_f64(),
            common::median(&mut layer_ratios)
        );
        let bound = REFRESH_TIME + b.mul_f64(1.5);
        println!(
            "P3 median: no refresh {:.1} ms | stampede {:.1} ms | refresher calls per stampede {:?} | sends per request {:?} | bound {:.1} ms | stampede - 50 ms = {:.2}x no-refresh (goal <= 1.5x: {})",
            ms(b),
            ms(s),
            refreshes,
            sends.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>(),
            ms(bound),
            (s.saturating_sub(REFRESH_TIME)).as_secs_f64() / b.as_secs_f64(),
            if s <= bound { "holds" } else { "MISSED" }
        );
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
