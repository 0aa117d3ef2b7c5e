//! P5, growth: per-request cost from 1 to 10,000 concurrent requests on the multi-threaded
//! runtime, for the bare service, tower-http's `AddAuthorization` and `Refresh` (valid token),
//! measured side by side in one run.
//!
//! `c` tasks each send `TOTAL / c` GET requests one after the other through their own clone
//! of the service; the per-request cost is the wall time divided by `TOTAL`. The in-memory
//! inner service yields to the scheduler once before it answers, so up to `c` requests are
//! really in flight at once.
//!
//! Environment: `GROWTH_ROUNDS` (default 5; the median is reported), `GROWTH_TOTAL`
//! (requests per point, default 100000).

mod common;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Request, Response};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_auth_refresh::ReplayBody;
use tower_http::auth::AddAuthorizationLayer;

const SECRET: &str = "growth-token-0123456789abcdef";
const CONCURRENCY: [usize; 5] = [1, 10, 100, 1_000, 10_000];

fn inner<B: Send + 'static>()
-> impl Service<Request<B>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|req: Request<B>| async move {
        tokio::task::yield_now().await;
        drop(req);
        Ok::<_, Infallible>(Response::new(String::new()))
    })
}

/// `c` tasks, `total / c` requests each; returns the wall time per request.
async fn point<S>(svc: S, c: usize, total: usize) -> Duration
where
    S: Service<Request<String>, Response = Response<String>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let per_task = total / c;
    let start = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let req = Request::get("/items/42").body(String::new()).unwrap();
                    let res = svc.ready().await.unwrap().call(req).await.unwrap();
                    drop(res);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed() / (per_task * c) as u32
}

fn main() {
    let rounds: usize = common::env_or("GROWTH_ROUNDS", 5);
    let total: usize = common::env_or("GROWTH_TOTAL", 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (calls, layer) = common::valid_token_layer(SECRET);
        let bare = inner::<String>();
        let add = AddAuthorizationLayer::bearer(SECRET).layer(inner::<String>());
        let refresh = layer.layer(inner::<ReplayBody<String>>());

        // Warm up.
        point(bare.clone(), 100, total / 10).await;
        point(add.clone(), 100, total / 10).await;
        point(refresh.clone(), 100, total / 10).await;

        println!(
            "P5 growth: {total} GET requests per point, multi-threaded runtime ({} workers), median of {rounds} rounds, ns per request",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        println!(
            "| concurrent | bare | add_authorization | refresh | refresh - bare | add_authorization - bare | refresh / add_authorization |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        let mut curve = Vec::new();
        for c in CONCURRENCY {
            let mut lines: [Vec<Duration>; 3] = Default::default();
            let mut ratios = Vec::new();
            for round in 0..rounds {
                let mut this = [Duration::ZERO; 3];
                for k in 0..3 {
                    let line = (round + k) % 3;
                    this[line] = match line {
                        0 => point(bare.clone(), c, total).await,
                        1 => point(add.clone(), c, total).await,
                        _ => point(refresh.clone(), c, total).await,
                    };
                }
                ratios.push(this[2].as_secs_f64() / this[1].as_secs_f64());
                for (v, x) in lines.iter_mut().zip(this) {
                    v.push(x);
                }
            }
            let [b, a, r] = lines.each_mut().map(|v| common::median(v));
            ratios.sort_by(f64::total_cmp);
            let ratio = ratios[ratios.len() / 2];
            let (b, a, r) = (b.as_nanos() as i64, a.as_nanos() as i64, r.as_nanos() as i64);
            println!("| {c} | {b} | {a} | {r} | {} | {} | {ratio:.2} |", r - b, a - b);
            curve.push((r, r - b, a - b));
        }
        let spread = |f: fn(&(i64, i64, i64)) -> i64| {
            let max = curve.iter().map(f).max().unwrap() as f64;
            let min = curve.iter().map(f).min().unwrap().max(1) as f64;
            max / min
        };
        println!(
            "P5 max/min over 1..10000 concurrent: refresh per-request {:.2}, refresh's added cost over bare {:.2}, add_authorization's added cost over bare {:.2}",
            spread(|p| p.0),
            spread(|p| p.1),
            spread(|p| p.2)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the refresher was called");
    });
}
