//! P4, connection reuse: a 401 stampede over a real connection pool.
//!
//! A hyper server on loopback answers `200 ok` for `Bearer fresh` and otherwise a `401` with
//! `WWW-Authenticate: Bearer error="invalid_token"` and an HTML page of `POOL_REFUSAL_BYTES`
//! (default 16 KiB) as its body. A hyper-util (legacy) client with its connection pool sits
//! under this crate's layer, which starts with a stale token and a refresher that takes
//! 20 ms. `POOL_REQUESTS` requests (default 200) start at once, each in its own task; every
//! one meets the 401, waits for the one refresh, and is replayed once.
//!
//! The server counts the connections it accepted. With a valid token from the start the
//! stampede needs at most one connection per request in flight; a 401 whose body is dropped
//! unread closes its connection, so every replay opens a new one (twice the connections);
//! a 401 whose body is read to its end hands the connection back to the pool, and the
//! replay reuses it.
//!
//! Lines per round, side by side on one runtime: `fresh` (valid token, no refresh) and
//! `stale` (the stampede). Reported: connections accepted, sends the server saw, refresher
//! calls, wall time; medians over `POOL_ROUNDS` rounds (default 5).
//!
//! Open files: each round holds up to `2 × POOL_REQUESTS` sockets (client and server ends);
//! the default stays within a limit of 1024.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{env_or, median};
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

const REFRESH_TIME: Duration = Duration::from_millis(20);

/// What the server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    sends: AtomicUsize,
}

/// The 401's body: an HTML error page of `bytes` bytes, as gateways send.
fn refusal(bytes: usize) -> Bytes {
    let head = "<html><body><h1>401 Unauthorized</h1><p>The access token expired.</p>";
    let mut page = String::with_capacity(bytes.max(head.len()) + 16);
    page.push_str(head);
    while page.len() + 14 < bytes {
        page.push_str("<!-- pad -->\n");
    }
    page.push_str("</body></html>");
    Bytes::from(page)
}

async fn server(seen: Arc<Seen>, refusal: Bytes) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            seen.connections.fetch_add(1, Ordering::SeqCst);
            stream.set_nodelay(true).unwrap();
            let seen = seen.clone();
            let refusal = refusal.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let refusal = refusal.clone();
                    seen.sends.fetch_add(1, Ordering::SeqCst);
                    let ok = req
                        .headers()
                        .get(AUTHORIZATION)
                        .is_some_and(|v| v == "Bearer fresh");
                    async move {
                        req.into_body().collect().await?;
                        let res = if ok {
                            Response::new(Full::new(Bytes::from_static(b"ok")))
                        } else {
                            Response::builder()
                                .status(StatusCode::UNAUTHORIZED)
                                .header(WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)
                                .header(CONTENT_TYPE, "text/html")
                                .body(Full::new(refusal))
                                .unwrap()
                        };
                        Ok::<_, hyper::Error>(res)
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

/// One round's figures.
struct Round {
    connections: usize,
    sends: usize,
    calls: usize,
    wall: Duration,
}

async fn round(n: usize, initial: &'static str, refusal: Bytes) -> Round {
    let seen = Arc::new(Seen::default());
    let addr = server(seen.clone(), refusal).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let layer = RefreshLayer::new(refresh_fn(move |_stale| {
        counter.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(REFRESH_TIME).await;
            Ok::<_, RefreshError>(Token::bearer("fresh")?)
        }
    }))
    .initial_token(Token::bearer(initial).unwrap());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, ReplayBody<Full<Bytes>>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(n)
        .build(connector);
    let svc = layer.layer(client);
    let uri: Arc<str> = format!("http://{addr}/items/42").into();
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            let uri = uri.clone();
            tokio::spawn(async move {
                let req = Request::get(&*uri).body(Full::new(Bytes::new())).unwrap();
                let res = svc.oneshot(req).await.expect("every request succeeds");
                let status = res.status();
                res.into_body().collect().await.expect("a body");
                status
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    Round {
        connections: seen.connections.load(Ordering::SeqCst),
        sends: seen.sends.load(Ordering::SeqCst),
        calls: calls.load(Ordering::SeqCst),
        wall: start.elapsed(),
    }
}

fn main() {
    let n: usize = env_or("POOL_REQUESTS", 200);
    let rounds: usize = env_or("POOL_ROUNDS", 5).max(1);
    let page = refusal(env_or("POOL_REFUSAL_BYTES", 16 * 1024));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut fresh = Vec::new();
    let mut stale = Vec::new();
    rt.block_on(async {
        for _ in 0..rounds {
            fresh.push(round(n, "fresh", page.clone()).await);
            stale.push(round(n, "stale", page.clone()).await);
        }
    });
    println!(
        "P4: {n} concurrent GETs over a hyper-util pool, 401 body of {} bytes, {rounds} rounds (medians)",
        page.len()
    );
    for (name, runs) in [("fresh", &fresh), ("stale", &stale)] {
        let mut conns: Vec<_> = runs.iter().map(|r| r.connections).collect();
        let mut sends: Vec<_> = runs.iter().map(|r| r.sends).collect();
        let mut calls: Vec<_> = runs.iter().map(|r| r.calls).collect();
        let mut wall: Vec<_> = runs.iter().map(|r| r.wall).collect();
        let (min, max) = (
            conns.iter().min().copied().unwrap_or(0),
            conns.iter().max().copied().unwrap_or(0),
        );
        println!(
            "  {name:>5}: connections accepted {} (range {min}..={max}, {:.2} per request), sends {}, refresher calls {}, wall {:.1} ms",
            median(&mut conns),
            median(&mut conns.clone()) as f64 / n as f64,
            median(&mut sends),
            median(&mut calls),
            median(&mut wall).as_secs_f64() * 1e3,
        );
    }
}
