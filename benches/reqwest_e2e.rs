//! P2 for reqwest: a hyper server on loopback and one `reqwest_middleware` client, 64 requests
//! in flight, on a multi-threaded Tokio runtime (server and client share it).
//!
//! Lines, measured in the same run, interleaved round by round (the order rotates):
//!
//! - `static_header`: a middleware that inserts a fixed `Authorization: Bearer …` header and
//!   calls the next one, the least a token-attaching middleware does (it can neither refresh
//!   nor replay);
//! - `refresh`: this crate's `RefreshMiddleware`, with a valid token (its refresher counts its
//!   calls; the count must stay zero).
//!
//! Both sit in a `reqwest_middleware::ClientWithMiddleware` over the same kind of
//! `reqwest::Client`. Throughput is completed requests (body read) per second; the process's
//! CPU time per request is reported too, the steadier figure on a shared machine.
//!
//! Environment: `REQWEST_ROUNDS` (default 7), `REQWEST_SECS` (seconds per line and round,
//! default 1). With `REQWEST_ITERS=<n>` the binary sends `n` requests of one line
//! (`REQWEST_LINE` = `static_header` | `refresh`) and case (`REQWEST_CASE` = `get` |
//! `post_1k`) one after the other on a current-thread runtime, for callgrind.
//!
//! `REQWEST_BODY=per_task`: each of the 64 requests in flight sends a 1 KiB body of its
//! own, not one `Bytes` shared by all (a check that the count of owners the two CPUs update
//! in turn is not what the POST ratio measures; it was not).
//!
//! `REQWEST_AA=1` is the calibration run: the `refresh` line is a second static-header
//! middleware on its own client, so the ratio shows what the bench reads for two identical lines
//! (its bias and spread) on this machine and load.

mod common;

use common::Case;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Extensions, HeaderValue, StatusCode};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};

const SECRET: &str = "end-to-end-token-0123456789abcdef";
const IN_FLIGHT: usize = 64;

/// A static `Authorization` header, as a hand-written reqwest middleware adds one.
struct StaticHeader(HeaderValue);

// The signature `#[async_trait]` generates for `Middleware::handle`, written out.
impl Middleware for StaticHeader {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        mut req: reqwest::Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = reqwest_middleware::Result<reqwest::Response>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        req.headers_mut().insert(AUTHORIZATION, self.0.clone());
        Box::pin(next.run(req, extensions))
    }
}

fn client(middleware: impl Middleware) -> ClientWithMiddleware {
    let inner = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    ClientBuilder::new(inner).with(middleware).build()
}

#[derive(Default, Clone, Copy)]
struct Figures {
    rps: f64,
    cpu_us: f64,
}

async fn run(
    client: ClientWithMiddleware,
    case: Case,
    url: Arc<str>,
    payload: Bytes,
    secs: f64,
) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let cpu_start = common::cpu_secs();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (client, stop, done, url, payload) = (
                client.clone(),
                stop.clone(),
                done.clone(),
                url.clone(),
                if per_task_body() {
                    Bytes::copy_from_slice(&payload)
                } else {
                    payload.clone()
                },
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    one(&client, case, &url, &payload).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (n, elapsed, cpu_end) = (
        done.load(Ordering::Relaxed),
        start.elapsed(),
        common::cpu_secs(),
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    Figures {
        rps: n as f64 / elapsed.as_secs_f64(),
        cpu_us: (cpu_end - cpu_start) * 1e6 / n.max(1) as f64,
    }
}

/// `REQWEST_BODY=per_task`: each of the requests in flight sends a 1 KiB body of its own
/// instead of one shared by all (whose count of owners the two CPUs then update in turn).
fn per_task_body() -> bool {
    std::env::var("REQWEST_BODY").is_ok_and(|v| v == "per_task")
}

/// Sends `n` requests one after the other.
async fn sequential(
    client: &ClientWithMiddleware,
    case: Case,
    url: &str,
    payload: &Bytes,
    n: usize,
) {
    for _ in 0..n {
        one(client, case, url, payload).await;
    }
}

/// Sends one request of `case` and reads its body.
async fn one(client: &ClientWithMiddleware, case: Case, url: &str, payload: &Bytes) {
    let req = match case {
        Case::Get => client.get(url),
        Case::Post1k => client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(payload.clone()),
    };
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.bytes().await.unwrap();
}

/// `REQWEST_ITERS` mode, for instruction counts.
fn count_mode(n: usize) {
    let (line, case, rt) = common::count_start("REQWEST");
    rt.block_on(async move {
        let (addr, payload, calls, layer) = common::count_fixture(SECRET).await;
        let url = format!("http://{addr}/items");
        let client = match line.as_str() {
            "static_header" => client(StaticHeader(
                HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap(),
            )),
            "refresh" => client(layer.reqwest_middleware()),
            other => panic!("unknown REQWEST_LINE {other}"),
        };
        sequential(&client, case, &url, &payload, 16).await;
        sequential(&client, case, &url, &payload, n).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the refresher was called");
    });
}

fn main() {
    if let Ok(n) = std::env::var("REQWEST_ITERS") {
        count_mode(n.parse().expect("REQWEST_ITERS is a number"));
        return;
    }
    let rounds: usize = common::env_or("REQWEST_ROUNDS", 7);
    let secs: f64 = common::env_or("REQWEST_SECS", 1.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let addr = common::token_server(SECRET).await;
        let url: Arc<str> = format!("http://{addr}/items").into();
        let payload = Bytes::from(vec![b'x'; 1024]);
        let (calls, layer) = common::valid_token_layer(SECRET);
        let header = HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap();
        let calibration = std::env::var("REQWEST_AA").is_ok_and(|v| v == "1");
        let second = if calibration {
            client(StaticHeader(header.clone()))
        } else {
            client(layer.reqwest_middleware())
        };
        let lines = [("static_header", client(StaticHeader(header))), ("refresh", second)];
        println!(
            "P2 reqwest: hyper server + reqwest_middleware client on loopback, {IN_FLIGHT} in flight, {rounds} rounds x {secs} s per line{}",
            if calibration { " (REQWEST_AA=1: the refresh line is a second static header)" } else { "" }
        );
        for case in [Case::Get, Case::Post1k] {
            for (_, c) in &lines {
                run(c.clone(), case, url.clone(), payload.clone(), 0.3).await;
            }
            let mut ratios = Vec::new();
            let mut cpu_ratios = Vec::new();
            let mut figures: [Vec<Figures>; 2] = Default::default();
            for round in 0..rounds {
                let mut this = [Figures::default(); 2];
                for k in 0..2 {
                    let line = (round + k) % 2;
                    let before = common::REFUSED.load(Ordering::Relaxed);
                    this[line] = run(lines[line].1.clone(), case, url.clone(), payload.clone(), secs).await;
                    assert_eq!(common::REFUSED.load(Ordering::Relaxed), before, "the server refused the token");
                }
                let [s, r] = this;
                println!(
                    "  {} round {round}: req/s static_header {:.0}, refresh {:.0}, refresh/static {:.3} | CPU us/request static_header {:.1}, refresh {:.1}, static/refresh {:.3}",
                    case.name(),
                    s.rps,
                    r.rps,
                    r.rps / s.rps,
                    s.cpu_us,
                    r.cpu_us,
                    s.cpu_us / r.cpu_us
                );
                ratios.push(r.rps / s.rps);
                cpu_ratios.push(s.cpu_us / r.cpu_us);
                figures[0].push(s);
                figures[1].push(r);
            }
            let ratio = common::median(&mut ratios);
            let cpu_ratio = common::median(&mut cpu_ratios);
            let mut rps: Vec<Vec<f64>> = figures.iter().map(|v| v.iter().map(|f| f.rps).collect()).collect();
            println!(
                "P2 reqwest {}: median req/s static_header {:.0} | refresh {:.0} | refresh/static (median of rounds) {ratio:.3} (goal >= 0.97: {}) | CPU-bound ratio static/refresh {cpu_ratio:.3} (goal >= 0.97: {})",
                case.name(),
                common::median(&mut rps[0]),
                common::median(&mut rps[1]),
                if ratio >= 0.97 { "holds" } else { "MISSED" },
                if cpu_ratio >= 0.97 { "holds" } else { "MISSED" },
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the refresher was called");
        println!("P2 reqwest refresher calls: 0");
    });
}
