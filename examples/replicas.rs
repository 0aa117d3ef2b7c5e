//! Several processes share one login through Redis: one token call per expiry for all of
//! them, and no refresh token is ever presented twice.
//!
//! Starts a loopback token endpoint (rotating refresh tokens, RFC 9700 reuse detection that
//! revokes the whole family), an API, a `redis-server` on a free loopback port, and 4 worker
//! processes (this binary again, with `--worker`). Each round, every worker sends 100
//! concurrent requests; between rounds the API forgets every access token, so all 400
//! requests are refused together and every worker needs a new token.
//!
//! ```sh
//! cargo run --example replicas --features redis
//! ```
//!
//! Needs `redis-server` on PATH (Debian: `apt-get install redis-server`).

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::store::{RedisStore, StoreRefresher};
use tower_auth_refresh::{
    RefreshContext, RefreshError, RefreshLayer, ReplayBody, Token, context_fn,
};

const WORKERS: usize = 4;
const REQUESTS: usize = 100;
const ROUNDS: usize = 4;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        return worker(&args[2], &args[3], &args[4]).await;
    }

    let Some(redis_server) = find_on_path("redis-server") else {
        println!(
            "This example needs redis-server on PATH (Debian: apt-get install redis-server); \
             it was not found, so nothing ran."
        );
        return Ok(());
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir();
    let mut redis = tokio::process::Command::new(redis_server)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let redis_url = format!("redis://127.0.0.1:{port}/");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The identity provider: one login, whose refresh token the workers find in the store.
    let idp = Arc::new(Mutex::new(Idp::default()));
    let (access, refresh) = idp.lock().unwrap().login();
    let base = serve(idp.clone()).await?;
    let store = RedisStore::open(&redis_url, "replicas-example")?;
    seed(&store, &access, &refresh).await?;
    println!("token server and API on {base}, Redis on {redis_url}");

    let exe = std::env::current_exe()?;
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let mut child = tokio::process::Command::new(&exe)
            .args(["--worker", &base, &redis_url, "replicas-example"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        workers.push((child, stdin, lines));
    }

    for round in 1..=ROUNDS {
        if round > 1 {
            idp.lock().unwrap().access.clear(); // every access token expires at once
        }
        for (_, stdin, _) in &mut workers {
            stdin
                .write_all(format!("go {REQUESTS}\n").as_bytes())
                .await?;
        }
        let mut ok = 0;
        for (_, _, lines) in &mut workers {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await??
                .ok_or("a worker exited")?;
            ok += line.trim().parse::<usize>()?;
        }
        let idp = idp.lock().unwrap();
        println!(
            "round {round}: {ok}/{} requests succeeded; token calls so far: {}; reuse detected: {}",
            WORKERS * REQUESTS,
            idp.token_calls,
            idp.reuse_detected
        );
    }
    for (mut child, stdin, _) in workers {
        drop(stdin); // the worker ends at the end of its input
        child.wait().await?;
    }
    redis.kill().await?;
    let idp = idp.lock().unwrap();
    println!(
        "{WORKERS} processes, {ROUNDS} expiries: {} token calls (one per expiry), {} reuse detected",
        idp.token_calls, idp.reuse_detected
    );
    Ok(())
}

/// A worker: a layer whose refresher goes through the Redis store; answers `go N` with the
/// number of the N concurrent requests that succeeded.
async fn worker(
    base: &str,
    redis_url: &str,
    prefix: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let token_url = format!("{base}/token");
    let token_client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let grant = context_fn(move |ctx: RefreshContext| {
        let (client, url) = (token_client.clone(), token_url.clone());
        async move {
            let refresh = ctx
                .stale()
                .and_then(Token::refresh_token)
                .ok_or_else(|| RefreshError::terminal("no refresh token"))?;
            // Form-encoded: a refresh token may hold `+`, `/`, `=` or `&`.
            let body = form_urlencoded::Serializer::new(String::new())
                .append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", refresh)
                .finish();
            let req = Request::post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(body)))
                .map_err(RefreshError::terminal)?;
            let res = client.request(req).await.map_err(RefreshError::transient)?;
            let status = res.status();
            let bytes = res
                .into_body()
                .collect()
                .await
                .map_err(RefreshError::transient)?;
            if status != StatusCode::OK {
                return Err(RefreshError::from_status(status));
            }
            let json: serde_json::Value = serde_json::from_slice(&bytes.to_bytes())
                .map_err(|_| RefreshError::transient("not JSON"))?;
            let access = json["access_token"].as_str().unwrap_or_default();
            let rotated = json["refresh_token"].as_str().unwrap_or_default();
            Ok(Token::bearer(access)?
                .with_expires_in(Duration::from_secs(3600))
                .with_refresh_token(rotated))
        }
    });
    let store = RedisStore::open(redis_url, prefix)?;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let api = ServiceBuilder::new()
        .layer(RefreshLayer::new(StoreRefresher::new(grant, store)))
        .service(client);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let Some(n) = line
            .strip_prefix("go ")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let req = Request::get(format!("{base}/api")).body(Full::default());
                let api = api.clone();
                tokio::spawn(async move {
                    matches!(api.oneshot(req.ok()?).await, Ok(res) if res.status() == StatusCode::OK)
                        .then_some(())
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            if matches!(t.await, Ok(Some(()))) {
                ok += 1;
            }
        }
        println!("{ok}");
    }
    Ok(())
}

/// A token endpoint with rotating refresh tokens and reuse detection, and an API.
#[derive(Default)]
struct Idp {
    next: u64,
    current_refresh: String,
    spent: HashSet<String>,
    access: HashSet<String>,
    revoked: bool,
    token_calls: usize,
    reuse_detected: usize,
}

impl Idp {
    fn mint(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{}", self.next)
    }

    fn login(&mut self) -> (String, String) {
        let access = self.mint("access");
        self.access.insert(access.clone());
        self.current_refresh = self.mint("refresh");
        (access, self.current_refresh.clone())
    }

    fn grant(&mut self, form: &[u8]) -> (StatusCode, String) {
        self.token_calls += 1;
        let presented = form_urlencoded::parse(form)
            .find(|(k, _)| k == "refresh_token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        if self.revoked {
            return (
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid_grant"}"#.into(),
            );
        }
        if self.spent.contains(&presented) {
            // RFC 9700 §4.14.2: a spent refresh token came back; revoke the family.
            self.reuse_detected += 1;
            self.revoked = true;
            self.access.clear();
            return (
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid_grant"}"#.into(),
            );
        }
        if presented != self.current_refresh {
            return (
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid_grant"}"#.into(),
            );
        }
        self.spent.insert(presented);
        let (access, refresh) = self.login();
        let body = serde_json::json!({
            "access_token": access, "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": refresh,
        });
        (StatusCode::OK, body.to_string())
    }
}

async fn serve(idp: Arc<Mutex<Idp>>) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let idp = idp.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let idp = idp.clone();
                async move {
                    let (status, body) = if req.uri().path() == "/token" {
                        let form = req.into_body().collect().await.map(|b| b.to_bytes());
                        idp.lock().unwrap().grant(&form.unwrap_or_default())
                    } else {
                        let token = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .unwrap_or_default();
                        if idp.lock().unwrap().access.contains(token) {
                            (StatusCode::OK, "ok".into())
                        } else {
                            (StatusCode::UNAUTHORIZED, String::new())
                        }
                    };
                    let mut res = Response::new(Full::new(Bytes::from(body)));
                    *res.status_mut() = status;
                    Ok::<_, Infallible>(res)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(base)
}

/// Stores the login's token set (expired, so the first requests refresh it).
async fn seed(
    store: &RedisStore,
    access: &str,
    refresh: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use tower_auth_refresh::store::{Record, TokenStore};
    let set = Token::bearer(access)?
        .with_expires_at(std::time::SystemTime::now() - Duration::from_secs(1))
        .with_refresh_token(refresh);
    let lease = store
        .try_lease(Duration::from_secs(5))
        .await?
        .ok_or("the lease is taken")?;
    let record = Record::from_token(1, &set, std::time::SystemTime::now());
    store.compare_and_set(&lease, 0, &record).await?;
    store.release(lease).await?;
    Ok(())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
