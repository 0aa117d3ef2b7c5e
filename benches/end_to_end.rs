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
//! read to its end) per second. The server checks the header and counts refusals, which must
//! stay zero for the two authorizing lines.
//!
//! Environment: `E2E_ROUNDS` (default 5), `E2E_SECS` (seconds per line and round, default 2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};
use tower_http::auth::AddAuthorizationLayer;

const SECRET: &str = "end-to-end-token-0123456789abcdef";
const IN_FLIGHT: usize = 64;

/// Counts requests the server refused for a missing or wrong token.
static REFUSED: AtomicU64 = AtomicU64::new(0);

async fn server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let expected = format!("Bearer {SECRET}");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let expected = expected.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let ok = req.headers().get(AUTHORIZATION).is_some_and(|v| v == expected.as_str());
                    async move {
                        if !ok {
                            REFUSED.fetch_add(1, Ordering::Relaxed);
                        }
                        req.into_body().collect().await?;
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

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

#[derive(Clone, Copy)]
enum Case {
    Get,
    Post1k,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Get => "GET, empty body",
            Case::Post1k => "POST, 1 KiB body",
        }
    }
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

/// Runs `IN_FLIGHT` workers sending requests through `svc` for `secs`; returns requests/s.
async fn run<S, ResBody>(svc: S, case: Case, uri: Arc<str>, payload: Bytes, secs: f64) -> f64
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
    let start = Instant::now();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (mut svc, stop, done, uri, payload) =
                (svc.clone(), stop.clone(), done.clone(), uri.clone(), payload.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
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
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    n as f64 / elapsed
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let rounds: usize = env_or("E2E_ROUNDS", 5);
    let secs: f64 = env_or("E2E_SECS", 2.0);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let addr = server().await;
        let uri: Arc<str> = format!("http://{addr}/items").into();
        let payload = Bytes::from(vec![b'x'; 1024]);

        let calls = Arc::new(AtomicUsize::new(0));
        let refresh_calls = calls.clone();
        let layer = RefreshLayer::new(refresh_fn(move |_stale| {
            refresh_calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<Token, _>(RefreshError::terminal("no refresh in this benchmark")) }
        }))
        .initial_token(Token::bearer(SECRET).unwrap());

        let bare = client::<Full<Bytes>>();
        let add = AddAuthorizationLayer::bearer(SECRET).layer(client::<Full<Bytes>>());
        let refresh = layer.layer(client::<ReplayBody<Full<Bytes>>>());

        println!(
            "P2 end to end: hyper server + hyper-util client on loopback, {IN_FLIGHT} in flight, {} worker threads, {rounds} rounds x {secs} s per line",
            rt_workers()
        );
        for case in [Case::Get, Case::Post1k] {
            // Warm up: open the connections, fill the pools.
            run(bare.clone(), case, uri.clone(), payload.clone(), 0.3).await;
            run(add.clone(), case, uri.clone(), payload.clone(), 0.3).await;
            run(refresh.clone(), case, uri.clone(), payload.clone(), 0.3).await;

            let mut rps: [Vec<f64>; 3] = Default::default();
            let mut ratios = Vec::new();
            for round in 0..rounds {
                let mut this = [0.0; 3];
                for k in 0..3 {
                    let line = (round + k) % 3;
                    let (u, p) = (uri.clone(), payload.clone());
                    let before = REFUSED.load(Ordering::Relaxed);
                    this[line] = match line {
                        0 => run(bare.clone(), case, u, p, secs).await,
                        1 => run(add.clone(), case, u, p, secs).await,
                        _ => run(refresh.clone(), case, u, p, secs).await,
                    };
                    let refused = REFUSED.load(Ordering::Relaxed) - before;
                    if line == 0 {
                        // The bare line sends no token: the server refuses (and counts) each.
                        assert!(refused > 0);
                    } else {
                        assert_eq!(refused, 0, "the server refused the token");
                    }
                }
                println!(
                    "  {} round {round}: bare {:.0} req/s, add_authorization {:.0} req/s, refresh {:.0} req/s, refresh/add {:.3}",
                    case.name(),
                    this[0],
                    this[1],
                    this[2],
                    this[2] / this[1]
                );
                ratios.push(this[2] / this[1]);
                for (v, x) in rps.iter_mut().zip(this) {
                    v.push(x);
                }
            }
            let [b, a, r] = rps.each_mut().map(|v| median(v));
            let ratio = median(&mut ratios);
            println!(
                "P2 {}: median bare {b:.0} req/s | add_authorization {a:.0} req/s | refresh {r:.0} req/s | refresh/add (median of rounds) {ratio:.3} (goal >= 0.97: {})",
                case.name(),
                if ratio >= 0.97 { "holds" } else { "MISSED" }
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
