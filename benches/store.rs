//! The shared token store (several processes and replicas).
//!
//! 1. `store_hot_path`: GET requests with a valid token through a layer whose refresher is a
//!    `StoreRefresher` over the in-memory store vs over the Redis store. The store is only on
//!    the refresh path, so the two lines should be the same (goal: within 1.05×).
//! 2. The stampede (printed, not criterion): `STORE_LAYERS` layers (4; each with its own Redis
//!    connection, standing for a process) × `STORE_REQUESTS` (250) concurrent requests on a
//!    token the API refuses, one refresh (a refresher that sleeps `STORE_REFRESH_MS`, 10 ms,
//!    like a token endpoint), everyone else adopts the stored token. Its wall time is compared
//!    with the same requests with a valid token, plus the refresh latency, plus 3 Redis round
//!    trips (load, lease, compare-and-set: what the lease holder adds). `STORE_ROUNDS` (9)
//!    rounds, medians.
//!
//! Needs `redis-server` on PATH (started here on a free loopback port, without persistence).

use std::convert::Infallible;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::store::{MemoryStore, Record, RedisStore, StoreRefresher, TokenStore};
use tower_auth_refresh::{
    RefreshContext, RefreshError, RefreshLayer, ReplayBody, Token, context_fn, refresh_fn,
};

mod common;
use common::{env_or, median};

const SECRET: &str = "store-bench-token-0123456789abcdef";

struct Redis(Child, u16);

impl Redis {
    fn start() -> Option<Self> {
        let path = std::env::var_os("PATH")?;
        let binary: PathBuf = std::env::split_paths(&path)
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = std::env::temp_dir();
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self(child, port));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.1)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get() -> Request<Full<Bytes>> {
    Request::get("https://api.test/x")
        .body(Full::default())
        .unwrap()
}

/// An in-memory API that accepts only the token `accepted` holds.
fn api(
    accepted: Arc<std::sync::RwLock<String>>,
) -> impl Service<
    Request<ReplayBody<Full<Bytes>>>,
    Response = Response<String>,
    Error = Infallible,
    Future: Send,
> + Clone {
    service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        let ok = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| *accepted.read().unwrap() == t);
        let mut res = Response::new(String::new());
        if !ok {
            *res.status_mut() = StatusCode::UNAUTHORIZED;
        }
        std::future::ready(Ok::<_, Infallible>(res))
    })
}

async fn seed<S: TokenStore>(store: &S, version: u64, secret: &str) {
    let lease = loop {
        if let Some(lease) = store.try_lease(Duration::from_secs(5)).await.unwrap() {
            break lease;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let token = Token::bearer(secret)
        .unwrap()
        .with_expires_in(Duration::from_secs(3600))
        .with_refresh_token("bench-refresh");
    let expected = store.load().await.unwrap().map_or(0, |r| r.version());
    let record = Record::from_token(version.max(expected + 1), &token, SystemTime::now());
    store
        .compare_and_set(&lease, expected, &record)
        .await
        .unwrap();
    store.release(lease).await.unwrap();
}

fn hot_path(c: &mut Criterion, rt: &tokio::runtime::Runtime, redis: &Redis) {
    let accepted = Arc::new(std::sync::RwLock::new(SECRET.to_owned()));
    let calls = Arc::new(AtomicUsize::new(0));
    let never = {
        let calls = calls.clone();
        refresh_fn(move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<Token, _>(RefreshError::terminal("no refresh in this benchmark")) }
        })
    };
    let memory = MemoryStore::new();
    let redis_store = rt.block_on(async {
        let store = RedisStore::open(&redis.url(), "bench-hot").unwrap();
        seed(&store, 1, SECRET).await;
        seed(&memory, 1, SECRET).await;
        store
    });
    let never = Arc::new(never);
    let refresher = |n: Arc<_>| {
        context_fn(move |ctx: RefreshContext| {
            let n: Arc<_> = Arc::clone(&n);
            async move { tower_auth_refresh::TokenRefresher::refresh(&*n, ctx).await }
        })
    };
    // Both layers adopt the stored token on their first request, then never touch the store.
    let mem_svc = ServiceBuilder::new()
        .layer(RefreshLayer::new(StoreRefresher::new(
            refresher(never.clone()),
            memory,
        )))
        .service(api(accepted.clone()));
    let redis_svc = ServiceBuilder::new()
        .layer(RefreshLayer::new(StoreRefresher::new(
            refresher(never.clone()),
            redis_store,
        )))
        .service(api(accepted));
    rt.block_on(async {
        let a = mem_svc.clone().oneshot(get()).await.unwrap();
        let b = redis_svc.clone().oneshot(get()).await.unwrap();
        assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    });
    let mut group = c.benchmark_group("store_hot_path");
    group.bench_function("memory_store", |b| {
        b.to_async(rt)
            .iter(|| black_box(mem_svc.clone().oneshot(get())))
    });
    group.bench_function("redis_store", |b| {
        b.to_async(rt)
            .iter(|| black_box(redis_svc.clone().oneshot(get())))
    });
    group.finish();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "no refresh skewed the figures"
    );
}

fn stampede(rt: &tokio::runtime::Runtime, redis: &Redis) {
    let layers: usize = env_or("STORE_LAYERS", 4);
    let requests: usize = env_or("STORE_REQUESTS", 250);
    let rounds: usize = env_or("STORE_ROUNDS", 9);
    let latency = Duration::from_millis(env_or("STORE_REFRESH_MS", 10));
    rt.block_on(async {
        let accepted = Arc::new(std::sync::RwLock::new("t0".to_owned()));
        let stores: Vec<RedisStore> = (0..layers)
            .map(|_| RedisStore::open(&redis.url(), "bench-stampede").unwrap())
            .collect();
        for s in &stores {
            s.load().await.unwrap(); // connect
        }
        seed(&stores[0], 1, "t0").await;
        let calls = Arc::new(AtomicUsize::new(0));
        let (mut stampedes, mut plain, mut rtts) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            let next = format!("t{round}");
            let refresher = {
                let (calls, accepted, next) = (calls.clone(), accepted.clone(), next.clone());
                context_fn(move |_ctx: RefreshContext| {
                    let (calls, accepted, next) = (calls.clone(), accepted.clone(), next.clone());
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(latency).await;
                        *accepted.write().unwrap() = next.clone();
                        Ok::<_, RefreshError>(
                            Token::bearer(next)?
                                .with_expires_in(Duration::from_secs(3600))
                                .with_refresh_token("bench-refresh"),
                        )
                    }
                })
            };
            let refresher = Arc::new(refresher);
            let old = format!("t{}", round - 1);
            let svcs: Vec<_> =
                stores
                    .iter()
                    .map(|s| {
                        let r = refresher.clone();
                        let shared = StoreRefresher::new(
                            context_fn(move |ctx: RefreshContext| {
                                let r = r.clone();
                                async move {
                                    tower_auth_refresh::TokenRefresher::refresh(&*r, ctx).await
                                }
                            }),
                            s.clone(),
                        );
                        ServiceBuilder::new()
                            .layer(
                                RefreshLayer::new(shared)
                                    .initial_token(Token::bearer(&*old).unwrap()),
                            )
                            .service(api(accepted.clone()))
                    })
                    .collect();
            // The API refuses the layers' token from now on: every request needs the new one.
            *accepted.write().unwrap() = next.clone();
            let before = calls.load(Ordering::SeqCst);
            stampedes.push(run(&svcs, requests).await);
            assert_eq!(
                calls.load(Ordering::SeqCst),
                before + 1,
                "one refresh per stampede"
            );
            plain.push(run(&svcs, requests).await);
            let started = Instant::now();
            for _ in 0..3 {
                black_box(stores[0].load().await.unwrap());
            }
            rtts.push(started.elapsed());
        }
        let (s, p, r) = (
            median(&mut stampedes),
            median(&mut plain),
            median(&mut rtts),
        );
        let budget = p + latency + r;
        println!(
            "store stampede: {layers} layers x {requests} requests, {rounds} rounds (medians)\n  \
             stampede wall time            {:>8.2} ms\n  \
             same requests, valid token    {:>8.2} ms\n  \
             refresh latency               {:>8.2} ms\n  \
             3 Redis round trips           {:>8.2} ms\n  \
             stampede / (plain + refresh + 3 RTT) = {:.2}",
            s.as_secs_f64() * 1e3,
            p.as_secs_f64() * 1e3,
            latency.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3,
            s.as_secs_f64() / budget.as_secs_f64(),
        );
    });
}

/// Sends `requests` concurrent GETs through each service; the wall time until all succeeded.
async fn run<S>(svcs: &[S], requests: usize) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<String>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for svc in svcs {
        for _ in 0..requests {
            tasks.push(tokio::spawn(svc.clone().oneshot(get())));
        }
    }
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    started.elapsed()
}

fn main() {
    let Some(redis) = Redis::start() else {
        println!("SKIPPED: redis-server not found on PATH (or it did not start)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut c = Criterion::default().configure_from_args();
    if std::env::var_os("STORE_ONLY").is_none_or(|v| v == "hot_path") {
        hot_path(&mut c, &rt, &redis);
    }
    if std::env::var_os("STORE_ONLY").is_none_or(|v| v == "stampede") {
        stampede(&rt, &redis);
    }
    c.final_summary();
}
