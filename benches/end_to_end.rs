//! P2, end to end: a hyper server on loopback and a hyper-util (legacy) client, 64 requests
//! in flight, on a multi-threaded Tokio runtime (server and client share it).
//!
//! Lines, measured in the same run, interleaved round by round (the order rotates):
//!
//! - `bare`: the client alone (no `Authorization` header);
//! - `add_authorization`: tower-http's `AddAuthorization` (static bearer) over the client;
//! - `refresh`: this crate's `Refresh` over the client, with a valid token (the refresher
//!   counts its calls; the count must stay zero).
//!
//! Each line runs for a fixed time per round; throughput is completed requests (response body
//! read to its end) per second of wall time. The process's CPU time per request (client and
//! server, from `/proc/self/stat`) is reported too: the run is CPU-bound, so on a machine
//! shared with other work, `CPU(add_authorization) / CPU(refresh)` is the steadier estimate of
//! the throughput ratio. The server checks the header and counts refusals, which must stay
//! zero for the two authorizing lines.
//!
//! Environment: `E2E_ROUNDS` (default 9), `E2E_SECS` (seconds per line and round, default 1).

mod common;

use common::Case;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_auth_refresh::ReplayBody;
use tower_http::auth::AddAuthorizationLayer;

const SECRET: &str = "end-to-end-token-0123456789abcdef";
const IN_FLIGHT: usize = 64;

fn client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(IN_FLIGHT)
        .build(connector)
}

fn request(case: Case, uri: &str, payload: &Bytes) -> Request<Full<Bytes>> {
    match case {
        Case::Get => Request::get(uri).body(Full::new(Bytes::new())).unwrap(),
        Case::Post1k => Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(payload.clone()))
            .unwrap(),
    }
}

/// How long a run lasts.
#[derive(Clone, Copy)]
enum Limit {
    Secs(f64),
    Requests(usize),
}

/// What one run measured.
#[derive(Clone, Copy, Default)]
struct Figures {
    /// Completed requests per second of wall time.
    rps: f64,
    /// CPU time of the whole process (client and server) per request, in microseconds.
    cpu_us: f64,
}

/// Runs `IN_FLIGHT` workers sending requests through `svc` until `limit`.
async fn run<S, ResBody>(svc: S, case: Case, uri: Arc<str>, payload: Bytes, limit: Limit) -> Figures
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResBody: Body + Send + Unpin + 'static,
    ResBody::Data: Send,
    ResBody::Error: std::fmt::Debug,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let max = match limit {
        Limit::Secs(_) => usize::MAX,
        Limit::Requests(n) => n,
    };
    let start = Instant::now();
    let cpu_start = common::cpu_secs();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (mut svc, stop, done, started, uri, payload) = (
                svc.clone(),
                stop.clone(),
                done.clone(),
                started.clone(),
                uri.clone(),
                payload.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) && started.fetch_add(1, Ordering::Relaxed) < max
                {
                    let res = svc
                        .ready()
                        .await
                        .map_err(Into::into)
                        .unwrap()
                        .call(request(case, &uri, &payload))
                        .await
                        .map_err(Into::into)
                        .unwrap();
                    assert_eq!(res.status(), StatusCode::OK);
                    res.into_body().collect().await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let (n, elapsed, cpu_end) = match limit {
        Limit::Secs(secs) => {
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            let counted = (
                done.load(Ordering::Relaxed),
                start.elapsed(),
                common::cpu_secs(),
            );
            stop.store(true, Ordering::Relaxed);
            for w in workers {
                w.await.unwrap();
            }
            counted
        }
        Limit::Requests(_) => {
            for w in workers {
                w.await.unwrap();
            }
            (
                done.load(Ordering::Relaxed),
                start.elapsed(),
                common::cpu_secs(),
            )
        }
    };
    Figures {
        rps: n as f64 / elapsed.as_secs_f64(),
        cpu_us: (cpu_end - cpu_start) * 1e6 / n.max(1) as f64,
    }
}

/// `E2E_ITERS` mode: `n` requests of one line (`E2E_LINE`) and case (`E2E_CASE`) on a
/// current-thread runtime, after a warm-up that opens the connections; for callgrind.
fn count_mode(n: usize) {
    let (line, case, rt) = common::count_start("E2E");
    rt.block_on(async move {
        let (addr, payload, calls, layer) = common::count_fixture(SECRET).await;
        let uri: Arc<str> = format!("http://{addr}/items").into();
        let warm = Limit::Requests(4 * IN_FLIGHT);
        let (u, p) = (uri.clone(), payload.clone());
        match line.as_str() {
            "bare" => {
                let svc = client::<Full<Bytes>>();
                run(svc.clone(), case, u.clone(), p.clone(), warm).await;
                run(svc, case, u, p, Limit::Requests(n)).await;
            }
            "add_authorization" => {
                let svc = AddAuthorizationLayer::bearer(SECRET).layer(client::<Full<Bytes>>());
                run(svc.clone(), case, u.clone(), p.clone(), warm).await;
                run(svc, case, u, p, Limit::Requests(n)).await;
            }
            "refresh" => {
                let svc = layer.layer(client::<ReplayBody<Full<Bytes>>>());
                run(svc.clone(), case, u.clone(), p.clone(), warm).await;
                run(svc, case, u, p, Limit::Requests(n)).await;
            }
            other => panic!("unknown E2E_LINE {other}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the refresher was called");
    });
}

fn main() {
    if let Ok(n) = std::env::var("E2E_ITERS") {
        count_mode(n.parse().expect("E2E_ITERS is a number"));
        return;
    }
    let rounds: usize = common::env_or("E2E_ROUNDS", 9);
    let secs: f64 = common::env_or("E2E_SECS", 1.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let addr = common::token_server(SECRET).await;
        let uri: Arc<str> = format!("http://{addr}/items").into();
        let payload = Bytes::from(vec![b'x'; 1024]);

        let (calls, layer) = common::valid_token_layer(SECRET);

        let bare = client::<Full<Bytes>>();
        let add = AddAuthorizationLayer::bearer(SECRET).layer(client::<Full<Bytes>>());
        let refresh = layer.layer(client::<ReplayBody<Full<Bytes>>>());

        println!(
            "P2 end to end: hyper server + hyper-util client on loopback, {IN_FLIGHT} in flight, {} worker threads, {rounds} rounds x {secs} s per line",
            rt_workers()
        );
        for case in [Case::Get, Case::Post1k] {
            // Warm up: open the connections, fill the pools.
            run(bare.clone(), case, uri.clone(), payload.clone(), Limit::Secs(0.3)).await;
            run(add.clone(), case, uri.clone(), payload.clone(), Limit::Secs(0.3)).await;
            run(refresh.clone(), case, uri.clone(), payload.clone(), Limit::Secs(0.3)).await;

            let mut rps: [Vec<f64>; 3] = Default::default();
            let mut cpu: [Vec<f64>; 3] = Default::default();
            let mut ratios = Vec::new();
            let mut cpu_ratios = Vec::new();
            for round in 0..rounds {
                let mut this = [Figures::default(); 3];
                for k in 0..3 {
                    let line = (round + k) % 3;
                    let (u, p) = (uri.clone(), payload.clone());
                    let before = common::REFUSED.load(Ordering::Relaxed);
                    this[line] = match line {
                        0 => run(bare.clone(), case, u, p, Limit::Secs(secs)).await,
                        1 => run(add.clone(), case, u, p, Limit::Secs(secs)).await,
                        _ => run(refresh.clone(), case, u, p, Limit::Secs(secs)).await,
                    };
                    let refused = common::REFUSED.load(Ordering::Relaxed) - before;
                    if line == 0 {
                        // The bare line sends no token: the server refuses (and counts) each.
                        assert!(refused > 0);
                    } else {
                        assert_eq!(refused, 0, "the server refused the token");
                    }
                }
                let [tb, ta, tr] = this;
                println!(
                    "  {} round {round}: req/s bare {:.0}, add_authorization {:.0}, refresh {:.0}, refresh/add {:.3} | CPU us/request bare {:.1}, add_authorization {:.1}, refresh {:.1}, add/refresh {:.3}",
                    case.name(),
                    tb.rps,
                    ta.rps,
                    tr.rps,
                    tr.rps / ta.rps,
                    tb.cpu_us,
                    ta.cpu_us,
                    tr.cpu_us,
                    ta.cpu_us / tr.cpu_us
                );
                ratios.push(tr.rps / ta.rps);
                cpu_ratios.push(ta.cpu_us / tr.cpu_us);
                for (k, x) in this.iter().enumerate() {
                    rps[k].push(x.rps);
                    cpu[k].push(x.cpu_us);
                }
            }
            let [b, a, r] = rps.each_mut().map(|v| common::median(v));
            let [cb, ca, cr] = cpu.each_mut().map(|v| common::median(v));
            let ratio = common::median(&mut ratios);
            let cpu_ratio = common::median(&mut cpu_ratios);
            println!(
                "P2 {}: median req/s bare {b:.0} | add_authorization {a:.0} | refresh {r:.0} | refresh/add (median of rounds) {ratio:.3} (goal >= 0.98: {})",
                case.name(),
                if ratio >= 0.98 { "holds" } else { "MISSED" }
            );
            println!(
                "P2 {}: median CPU us/request bare {cb:.1} | add_authorization {ca:.1} | refresh {cr:.1} | CPU-bound throughput ratio add/refresh (median of rounds) {cpu_ratio:.3} (goal >= 0.98: {})",
                case.name(),
                if cpu_ratio >= 0.98 { "holds" } else { "MISSED" }
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the refresher was called");
        println!("P2 refresher calls: 0");
    });
}

fn rt_workers() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
