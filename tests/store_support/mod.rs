//! Support for the token store tests: a refresh-token-grant refresher over plain hyper-util,
//! worker processes (the test binary re-executed), a `redis-server` started per test, and
//! temporary directories.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tower::{Service, ServiceExt};
use tower_auth_refresh::store::{CasOutcome, FileStore, Record, StoreRefresher, TokenStore};
use tower_auth_refresh::{
    RefreshContext, RefreshError, RefreshLayer, ReplayBody, Token, TokenRefresher, context_fn,
};

/// `Basic base64("app:app-secret")`, what the loopback token endpoint expects.
pub(crate) const APP_BASIC: &str = "Basic YXBwOmFwcC1zZWNyZXQ=";

/// Bounds a test step: a hang fails instead of blocking the suite.
pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 30 s"))
}

// ---------------------------------------------------------------------------------------------
// The refresh-token grant, by hand.

/// Counts what the grant refresher did in this process.
#[derive(Clone, Default)]
pub(crate) struct GrantCalls(Arc<AtomicUsize>);

impl GrantCalls {
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A refresher that performs the RFC 6749 refresh-token grant against `token_url` with the
/// refresh token it finds in the context (the stored one, under a `StoreRefresher`), and
/// attaches the refresh token it gets back.
pub(crate) fn grant_refresher(token_url: String, calls: GrantCalls) -> impl TokenRefresher {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    context_fn(move |ctx: RefreshContext| {
        let client = client.clone();
        let url = token_url.clone();
        let calls = calls.clone();
        async move {
            calls.0.fetch_add(1, Ordering::SeqCst);
            let refresh = ctx
                .stale()
                .and_then(Token::refresh_token)
                .ok_or_else(|| RefreshError::terminal("no refresh token"))?
                .to_owned();
            let body: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", &refresh)
                .finish();
            let req = Request::post(url)
                .header(AUTHORIZATION, APP_BASIC)
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(body)))
                .map_err(RefreshError::terminal)?;
            let res = client.request(req).await.map_err(RefreshError::transient)?;
            let status = res.status();
            let bytes = res
                .into_body()
                .collect()
                .await
                .map_err(RefreshError::transient)?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(RefreshError::from_status(status));
            }
            let json: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|_| RefreshError::transient("bad JSON"))?;
            let access = json["access_token"]
                .as_str()
                .ok_or_else(|| RefreshError::transient("no access_token"))?;
            let mut token = Token::bearer(access)?;
            if let Some(secs) = json["expires_in"].as_u64() {
                token = token.with_expires_in(Duration::from_secs(secs));
            }
            if let Some(rt) = json["refresh_token"].as_str() {
                token = token.with_refresh_token(rt);
            }
            Ok(token)
        }
    })
}

/// Takes the lease of a store no process is refreshing. Retries for a moment: a child process
/// being spawned by another test of this binary holds a copy of every open descriptor (the
/// file store's lock among them) until it `exec`s.
pub(crate) async fn free_lease<S: TokenStore>(store: &S) -> tower_auth_refresh::store::Lease {
    for _ in 0..500 {
        if let Some(lease) = store.try_lease(Duration::from_secs(5)).await.unwrap() {
            return lease;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the lease stayed taken for 5 s");
}

/// Writes the first record (version 1) into `store`, as a login would.
pub(crate) async fn seed<S: TokenStore>(store: &S, token: &Token) {
    let lease = free_lease(store).await;
    let record = Record::from_token(1, token, SystemTime::now());
    let outcome = store.compare_and_set(&lease, 0, &record).await.unwrap();
    assert_eq!(outcome, CasOutcome::Written);
    store.release(lease).await.unwrap();
}

/// The token set a login hands out, already expired (as after a long pause).
pub(crate) fn expired_set(access: &str, refresh: &str) -> Token {
    Token::bearer(access)
        .unwrap()
        .with_expires_at(SystemTime::now() - Duration::from_secs(1))
        .with_refresh_token(refresh)
}

// ---------------------------------------------------------------------------------------------
// Worker processes.

/// The environment variable that turns the `worker` test into a worker.
pub(crate) const WORKER_ENV: &str = "TOWER_AUTH_REFRESH_STORE_WORKER";

/// Which store a worker uses.
#[derive(Clone, Debug)]
pub(crate) enum StoreSpec {
    File(PathBuf),
    Redis { url: String, prefix: String },
}

/// A worker process: the test binary running its `worker` test, driven line by line.
pub(crate) struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// What one `go` round of a worker gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Round {
    pub(crate) ok: usize,
    pub(crate) failed: usize,
    /// Grant calls this worker's refresher made so far.
    pub(crate) grants: usize,
}

impl Worker {
    pub(crate) fn spawn(
        store: &StoreSpec,
        api_url: &str,
        token_url: &str,
        lease_ttl: Duration,
    ) -> Self {
        let exe = std::env::current_exe().expect("current test binary");
        let mut cmd = Command::new(exe);
        cmd.args([
            "worker",
            "--exact",
            "--nocapture",
            "--ignored",
            "--test-threads=1",
        ])
        .env(WORKER_ENV, "1")
        .env("STORE_API_URL", api_url)
        .env("STORE_TOKEN_URL", token_url)
        .env("STORE_LEASE_TTL_MS", lease_ttl.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
        match store {
            StoreSpec::File(path) => {
                cmd.env("STORE_FILE", path);
            }
            StoreSpec::Redis { url, prefix } => {
                cmd.env("STORE_REDIS_URL", url)
                    .env("STORE_REDIS_PREFIX", prefix);
            }
        }
        let mut child = cmd.spawn().expect("spawn a worker process");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Asks the worker to send `n` requests at once.
    pub(crate) async fn start(&mut self, n: usize) {
        self.stdin
            .write_all(format!("go {n}\n").as_bytes())
            .await
            .expect("worker stdin");
        self.stdin.flush().await.unwrap();
    }

    /// Waits for the answer to [`start`](Self::start).
    pub(crate) async fn finish(&mut self) -> Round {
        loop {
            let line = within("a worker round", self.lines.next_line())
                .await
                .expect("worker stdout")
                .expect("the worker exited before answering");
            // The harness may print "test worker ... " on the same line first.
            if let Some(rest) = line.find("@@ ").map(|at| &line[at + 3..]) {
                let fields: HashMap<&str, usize> = rest
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k, v.parse().unwrap()))
                    .collect();
                return Round {
                    ok: fields["ok"],
                    failed: fields["failed"],
                    grants: fields["grants"],
                };
            }
        }
    }

    /// Asks the worker to log out: its handle's `clear`, then `StoreRefresher::log_out_everywhere`
    /// (a logout for every process). The round says `ok=1` if both were done.
    pub(crate) async fn log_out_everywhere(&mut self) -> Round {
        self.stdin
            .write_all(b"logout\n")
            .await
            .expect("worker stdin");
        self.stdin.flush().await.unwrap();
        self.finish().await
    }

    /// Ends the worker cleanly.
    pub(crate) async fn quit(mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        let _ = self.stdin.flush().await;
        let status = within("a worker exit", self.child.wait()).await.unwrap();
        assert!(status.success(), "worker exited with {status}");
    }

    /// SIGKILLs the worker.
    pub(crate) async fn kill(mut self) {
        self.child.kill().await.expect("kill the worker");
    }
}

/// Starts `n` requests on every worker at once and collects the rounds.
pub(crate) async fn round(workers: &mut [Worker], n: usize) -> Vec<Round> {
    for w in workers.iter_mut() {
        w.start(n).await;
    }
    let mut out = Vec::new();
    for w in workers.iter_mut() {
        out.push(w.finish().await);
    }
    out
}

/// The body of the `worker` test: when [`WORKER_ENV`] is set, serve `go N` / `quit` commands
/// on stdin with a layer whose refresher goes through the store given in the environment.
pub(crate) fn run_worker() {
    if std::env::var_os(WORKER_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
        let api_url = var("STORE_API_URL");
        let calls = GrantCalls::default();
        let grant = grant_refresher(var("STORE_TOKEN_URL"), calls.clone());
        let ttl = Duration::from_millis(var("STORE_LEASE_TTL_MS").parse().unwrap());
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build::<_, ReplayBody<Full<Bytes>>>(CappedConnector::new(WORKER_CONNECTIONS));
        if let Ok(path) = std::env::var("STORE_FILE") {
            let shared = StoreRefresher::new(grant, FileStore::new(path)).lease_ttl(ttl);
            let layer = RefreshLayer::new(shared.clone());
            let logout = log_out(layer.token_handle(), shared);
            let svc = tower::ServiceBuilder::new().layer(layer).service(client);
            serve_commands(svc, api_url, calls, logout).await;
        } else {
            #[cfg(feature = "redis")]
            {
                let store = tower_auth_refresh::store::RedisStore::open(
                    &var("STORE_REDIS_URL"),
                    &var("STORE_REDIS_PREFIX"),
                )
                .unwrap();
                let shared = StoreRefresher::new(grant, store).lease_ttl(ttl);
                let layer = RefreshLayer::new(shared.clone());
                let logout = log_out(layer.token_handle(), shared);
                let svc = tower::ServiceBuilder::new().layer(layer).service(client);
                serve_commands(svc, api_url, calls, logout).await;
            }
        }
    });
}

/// The most connections a worker keeps open to the API at once. Every request of a round is
/// in the layer at once (and waits for the same refresh), but at most this many are on the
/// wire: 4 workers × 250 connections would hold ~1,000 sockets in the test process, at the
/// usual limit of 1,024 open files.
pub(crate) const WORKER_CONNECTIONS: usize = 32;

/// An `HttpConnector` whose connections each hold a permit of a semaphore until they close,
/// so the client never has more than `max` open; a connect waits for a permit (meanwhile the
/// pool hands the request the first connection that becomes idle).
#[derive(Clone)]
pub(crate) struct CappedConnector {
    inner: HttpConnector,
    permits: Arc<tokio::sync::Semaphore>,
}

impl CappedConnector {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            inner: HttpConnector::new(),
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<http::Uri> for CappedConnector {
    type Response = CappedConnection;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<CappedConnection, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let (inner, permits) = (self.inner.clone(), self.permits.clone());
        Box::pin(async move {
            let permit = permits.acquire_owned().await?;
            let io = inner.oneshot(dst).await?;
            Ok(CappedConnection {
                io,
                _permit: permit,
            })
        })
    }
}

/// A connection of a [`CappedConnector`]: gives its permit back when dropped (closed).
pub(crate) struct CappedConnection {
    io: hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl hyper_util::client::legacy::connect::Connection for CappedConnection {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for CappedConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for CappedConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// A worker's logout: this process's (the handle's `clear`) and every process's
/// (`log_out_everywhere`); true if both were done.
type LogOut = Box<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Send>;

fn log_out<R: TokenRefresher, S: TokenStore>(
    handle: tower_auth_refresh::TokenHandle,
    shared: StoreRefresher<R, S>,
) -> LogOut {
    Box::new(move || {
        let (handle, shared) = (handle.clone(), shared.clone());
        Box::pin(async move {
            handle.clear();
            match shared.log_out_everywhere().await {
                Ok(()) => true,
                Err(err) => {
                    eprintln!("worker: logout failed: {err}");
                    false
                }
            }
        })
    })
}

async fn serve_commands<S>(svc: S, api_url: String, calls: GrantCalls, logout: LogOut)
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    S::Error: std::fmt::Display + Send,
    S::Future: Send,
{
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if line == "quit" {
            return;
        }
        if line == "logout" {
            let ok = usize::from(logout().await);
            println!("@@ ok={ok} failed={} grants={}", 1 - ok, calls.get());
            continue;
        }
        let Some(n) = line
            .strip_prefix("go ")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let svc = svc.clone();
            let url = api_url.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
                match svc.oneshot(req).await {
                    Ok(res) => {
                        let ok = res.status() == StatusCode::OK;
                        let _ = res.into_body().collect().await;
                        ok
                    }
                    Err(err) => {
                        eprintln!("worker: request failed: {err}");
                        false
                    }
                }
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap_or(false) {
                ok += 1;
            }
        }
        println!("@@ ok={ok} failed={} grants={}", n - ok, calls.get());
    }
}

// ---------------------------------------------------------------------------------------------
// redis-server, started per test.

/// Set to 1 to fail (instead of skip) the Redis tests when `redis-server` is missing.
pub(crate) const REQUIRE_REDIS_ENV: &str = "TOWER_AUTH_REFRESH_REQUIRE_REDIS";

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A `redis-server` on a free loopback port, without persistence, in a temporary directory;
/// killed when dropped.
pub(crate) struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts one, or returns `None` (after saying so) when `redis-server` is not on PATH,
    /// unless [`REQUIRE_REDIS_ENV`] is set.
    pub(crate) fn start_or_skip() -> Option<Self> {
        let Some(binary) = find_on_path("redis-server") else {
            if std::env::var(REQUIRE_REDIS_ENV).is_ok_and(|v| v == "1") {
                panic!("redis-server not found on PATH, and {REQUIRE_REDIS_ENV}=1");
            }
            // Straight to the process's stderr: libtest's capture would hide an `eprintln!`.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED: redis-server not found on PATH");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            binary,
            port,
            dir: TempDir::new("redis"),
            child: None,
        };
        server.start();
        Some(server)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)starts the server on the same port, empty.
    pub(crate) fn start(&mut self) {
        assert!(self.child.is_none());
        let child = std::process::Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        for _ in 0..200 {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "redis-server exited before answering ({status}); is port {} taken?",
                    self.port
                );
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not answer within 5 s");
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A blocking connection whose reads and writes fail after 10 s instead of hanging.
    fn connect(&self) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(("127.0.0.1", self.port))
            .unwrap_or_else(|err| panic!("connect to redis-server: {err}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Sends a raw command (RESP arrays of bulk strings) and returns the first reply line.
    pub(crate) fn command(&self, args: &[&[u8]]) -> String {
        use std::io::{BufRead, Write};
        let mut s = self.connect();
        let mut msg = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            msg.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            msg.extend_from_slice(a);
            msg.extend_from_slice(b"\r\n");
        }
        s.write_all(&msg).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s)
            .read_line(&mut line)
            .unwrap_or_else(|err| panic!("redis-server did not answer within 10 s: {err}"));
        line
    }

    /// GET as raw bytes (`None` for nil).
    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        use std::io::{BufRead, Read, Write};
        let mut s = self.connect();
        let msg = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        s.write_all(msg.as_bytes()).unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)
            .unwrap_or_else(|err| panic!("redis-server did not answer within 10 s: {err}"));
        let len: i64 = line.trim_end().strip_prefix('$').unwrap().parse().unwrap();
        if len < 0 {
            return None;
        }
        let mut buf = vec![0u8; len as usize + 2];
        r.read_exact(&mut buf)
            .unwrap_or_else(|err| panic!("redis-server did not answer within 10 s: {err}"));
        buf.truncate(len as usize);
        Some(buf)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary directories.

/// A directory under the system's temporary directory, removed when dropped.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tower-auth-refresh-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios shared by the file and Redis tests.

use crate::oauth2_server::{Servers, TokenConfig};

/// Requests per worker in the first stampede, and per worker in each later round.
pub(crate) const FIRST: usize = 250;
pub(crate) const PER_ROUND: usize = 25;

/// 4 processes × 250 concurrent requests on an expired stored token: exactly 1 token call,
/// all succeed, no reuse; then `rounds` rounds of expiry (the API drops every access token),
/// 1 token call per round; then a restarted process sends with the stored token, 0 calls.
pub(crate) async fn stampede_rounds_and_restart<S: TokenStore>(
    spec: StoreSpec,
    store: S,
    rounds: usize,
) {
    let servers = Servers::start(TokenConfig::default()).await;
    let (access, refresh) = servers.token.login();
    seed(&store, &expired_set(&access, &refresh)).await;
    let ttl = Duration::from_secs(10);
    let (api, tok) = (servers.api_url(), servers.token_url());
    let mut workers: Vec<Worker> = (0..4)
        .map(|_| Worker::spawn(&spec, &api, &tok, ttl))
        .collect();

    let first = round(&mut workers, FIRST).await;
    let ok: usize = first.iter().map(|r| r.ok).sum();
    assert_eq!(ok, 4 * FIRST, "every request succeeds: {first:?}");
    assert_eq!(
        servers.token.requests(),
        1,
        "one token call for four processes"
    );
    assert_eq!(servers.token.reuse_detected(), 0);
    assert_eq!(first.iter().map(|r| r.grants).sum::<usize>(), 1);

    for n in 1..=rounds {
        servers.token.expire_access_tokens();
        let got = round(&mut workers, PER_ROUND).await;
        assert!(
            got.iter().all(|r| r.ok == PER_ROUND),
            "round {n}: every request succeeds: {got:?}"
        );
        assert_eq!(servers.token.requests(), 1 + n, "round {n}: one token call");
        assert_eq!(got.iter().map(|r| r.grants).sum::<usize>(), 1 + n);
    }
    assert_eq!(servers.token.reuse_detected(), 0);
    assert!(!servers.token.family_revoked(&refresh));
    let stored = store.load().await.unwrap().unwrap();
    assert_eq!(stored.version(), 2 + rounds as u64, "one write per refresh");

    // A restart: the new process sends its first request with the stored access token.
    for w in workers {
        w.quit().await;
    }
    let calls = servers.token.requests();
    let refused = servers.api.unauthorized();
    let mut restarted = Worker::spawn(&spec, &api, &tok, ttl);
    restarted.start(1).await;
    let got = restarted.finish().await;
    assert_eq!((got.ok, got.grants), (1, 0));
    assert_eq!(
        servers.token.requests(),
        calls,
        "a restarted process makes 0 token calls"
    );
    assert_eq!(
        servers.api.unauthorized(),
        refused,
        "its first request is not refused"
    );
    restarted.quit().await;
}

/// The lease holder is SIGKILLed while its token call is in flight (the server has already
/// rotated): another process completes the next refresh once the lease is gone, presenting the
/// stored refresh token inside the server's grace window: no family revocation.
pub(crate) async fn holder_killed_mid_refresh<S: TokenStore>(
    spec: StoreSpec,
    store: S,
    ttl: Duration,
) {
    let servers = Servers::start(TokenConfig {
        grace: Some(Duration::from_secs(60)),
        ..TokenConfig::default()
    })
    .await;
    let (access, refresh) = servers.token.login();
    seed(&store, &expired_set(&access, &refresh)).await;
    let (api, tok) = (servers.api_url(), servers.token_url());

    servers.token.hold_next(1);
    let mut holder = Worker::spawn(&spec, &api, &tok, ttl);
    holder.start(1).await;
    within("the holder's token call", servers.token.held(1)).await;
    holder.kill().await;
    servers.token.release();
    assert_eq!(
        servers.token.grants(),
        1,
        "the dead holder's call rotated the refresh token"
    );

    let mut next = Worker::spawn(&spec, &api, &tok, ttl);
    next.start(10).await;
    let got = next.finish().await;
    assert_eq!((got.ok, got.grants), (10, 1), "{got:?}");
    assert_eq!(servers.token.grants(), 2);
    assert_eq!(
        servers.token.grace_uses(),
        1,
        "the stored refresh token was presented again"
    );
    assert_eq!(servers.token.reuse_detected(), 0);
    assert!(
        !servers.token.family_revoked(&refresh),
        "0 family revocations"
    );
    let stored = store.load().await.unwrap().unwrap();
    assert_eq!(stored.version(), 2);
    next.quit().await;
}

/// A process started now, without a token of its own, sends one request: it fails (the
/// stored session ended), and its refresher made no token request. The worker, still running.
async fn a_later_process_fails_without_a_token_call(
    spec: &StoreSpec,
    servers: &Servers,
    ttl: Duration,
) -> Worker {
    let mut later = Worker::spawn(spec, &servers.api_url(), &servers.token_url(), ttl);
    later.start(1).await;
    let got = later.finish().await;
    assert_eq!((got.ok, got.failed, got.grants), (0, 1, 0), "{got:?}");
    later
}

/// Three processes need a token at once and the stored refresh token is refused
/// (`invalid_grant`): one token call ends the session for all of them (the lease holder
/// records the refusal in the store; the others fail with a terminal error without
/// presenting the refused token again), and so does a process started afterwards.
pub(crate) async fn a_refused_session_ends_once_for_every_process<S: TokenStore>(
    spec: StoreSpec,
    store: S,
) {
    let servers = Servers::start(TokenConfig::default()).await;
    let (access, _) = servers.token.login();
    // A refresh token the server does not know: refused with `invalid_grant`.
    seed(&store, &expired_set(&access, "refresh-never-issued-0b9e")).await;
    let (api, tok) = (servers.api_url(), servers.token_url());
    let ttl = Duration::from_secs(10);

    // The lease holder's answer is held until every process has asked for a token.
    servers.token.hold_next(1);
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| Worker::spawn(&spec, &api, &tok, ttl))
        .collect();
    for w in workers.iter_mut() {
        w.start(2).await;
    }
    within("the holder's token call", servers.token.held(1)).await;
    // The others reach the lease wait meanwhile (if one is later, it finds the refusal in
    // the store instead: the count below holds either way).
    tokio::time::sleep(Duration::from_millis(300)).await;
    servers.token.release();
    let mut rounds = Vec::new();
    for w in workers.iter_mut() {
        rounds.push(w.finish().await);
    }
    assert!(
        rounds.iter().all(|r| r.ok == 0 && r.failed == 2),
        "every request fails (the session ended): {rounds:?}"
    );
    assert_eq!(
        servers.token.requests(),
        1,
        "the refused refresh token is presented once, by one process"
    );
    let stored = store.load().await.unwrap().unwrap();
    assert!(stored.is_ended(), "the refusal is in the store");

    let later = a_later_process_fails_without_a_token_call(&spec, &servers, ttl).await;
    assert_eq!(
        servers.token.requests(),
        1,
        "a later process makes no token call"
    );
    later.quit().await;
    for w in workers {
        w.quit().await;
    }
}

/// Real processes: one logs the session out for all (`log_out_everywhere`). The stored record then
/// holds no token; the other processes, their access tokens refused, fail without a token
/// call; a process started later finds no session to adopt; and a new login stored over
/// the logout starts a session that a new process follows.
pub(crate) async fn a_logout_everywhere_ends_the_session_for_every_process<
    S: TokenStore + Clone,
>(
    spec: StoreSpec,
    store: S,
) {
    let servers = Servers::start(TokenConfig::default()).await;
    let (access, refresh) = servers.token.login();
    seed(&store, &expired_set(&access, &refresh)).await;
    let (api, tok) = (servers.api_url(), servers.token_url());
    let ttl = Duration::from_secs(10);
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| Worker::spawn(&spec, &api, &tok, ttl))
        .collect();
    let rounds = round(&mut workers, 2).await;
    assert!(rounds.iter().all(|r| r.ok == 2), "{rounds:?}");
    let calls = servers.token.requests();
    assert_eq!(calls, 1, "one refresh for the three processes");

    let out = workers[0].log_out_everywhere().await;
    assert_eq!(out.ok, 1, "the logout was written");
    let stored = store.load().await.unwrap().expect("a record");
    assert!(stored.is_logged_out() && stored.is_ended());
    assert!(stored.to_token().unwrap_err().is_logged_out());
    let wire: serde_json::Value = serde_json::from_slice(&stored.encode()).unwrap();
    assert_eq!(wire["access_token"], "", "no access token is kept");
    assert!(wire["refresh_token"].is_null(), "no refresh token is kept");

    // The access tokens the processes hold are refused from now on: they refresh.
    servers.token.expire_access_tokens();
    let rounds = round(&mut workers, 2).await;
    assert!(
        rounds.iter().all(|r| r.ok == 0 && r.failed == 2),
        "every request fails: {rounds:?}"
    );
    assert_eq!(
        servers.token.requests(),
        calls,
        "no token call after the logout"
    );

    let later = a_later_process_fails_without_a_token_call(&spec, &servers, ttl).await;
    assert_eq!(
        servers.token.requests(),
        calls,
        "a later process adopts nothing"
    );

    // A new login, stored over the logout (another user, logged in elsewhere).
    let (access, refresh) = servers.token.login();
    let login = StoreRefresher::new(
        grant_refresher(servers.token_url(), GrantCalls::default()),
        store.clone(),
    );
    let stale = expired_set(&access, &refresh);
    let ctx = RefreshContext::new(Some(stale), tower_auth_refresh::RefreshReason::Expired);
    within("the new login", login.refresh(ctx))
        .await
        .expect("a new login replaces the logout");
    assert!(!store.load().await.unwrap().unwrap().is_ended());
    let mut next = Worker::spawn(&spec, &api, &tok, ttl);
    next.start(2).await;
    let got = next.finish().await;
    assert_eq!(
        (got.ok, got.grants),
        (2, 0),
        "a new process follows the new login: {got:?}"
    );

    next.quit().await;
    later.quit().await;
    for w in workers {
        w.quit().await;
    }
}

/// A store whose lease is partitioned away: every process believes it holds it. Writes still
/// go through the real store's compare-and-set (the version check), so a lost write is seen.
pub(crate) struct Partitioned<S>(pub(crate) S);

impl<S: TokenStore> TokenStore for Partitioned<S> {
    async fn load(&self) -> Result<Option<Record>, tower_auth_refresh::store::StoreError> {
        self.0.load().await
    }

    async fn try_lease(
        &self,
        ttl: Duration,
    ) -> Result<Option<tower_auth_refresh::store::Lease>, tower_auth_refresh::store::StoreError>
    {
        Ok(Some(tower_auth_refresh::store::Lease::new(
            "partitioned",
            ttl,
        )))
    }

    async fn compare_and_set(
        &self,
        _lease: &tower_auth_refresh::store::Lease,
        expected: u64,
        record: &Record,
    ) -> Result<CasOutcome, tower_auth_refresh::store::StoreError> {
        // Bounded: the real lease is only held for one write at a time, never for long.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let real = loop {
            if let Some(lease) = self.0.try_lease(Duration::from_secs(5)).await? {
                break lease;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Partitioned::compare_and_set: the real store's lease stayed taken for 20 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let outcome = self.0.compare_and_set(&real, expected, record).await;
        self.0.release(real).await?;
        outcome
    }

    async fn release(
        &self,
        _lease: tower_auth_refresh::store::Lease,
    ) -> Result<(), tower_auth_refresh::store::StoreError> {
        Ok(())
    }

    async fn wait_change(
        &self,
        seen: u64,
        max: Duration,
    ) -> Result<(), tower_auth_refresh::store::StoreError> {
        self.0.wait_change(seen, max).await
    }
}

/// A store that can be made to fail: every operation while it is [down](Self::set_down) (an
/// outage), or the next `n` writes ([`fail_next_writes`](Self::fail_next_writes)). The errors
/// are real `StoreError`s: those of a file store whose directory is a regular file.
#[derive(Clone)]
pub(crate) struct Flaky<S> {
    inner: Arc<S>,
    broken: FileStore,
    down: Arc<std::sync::atomic::AtomicBool>,
    failing_writes: Arc<AtomicUsize>,
    failed_writes: Arc<AtomicUsize>,
}

impl<S: TokenStore> Flaky<S> {
    /// Wraps `inner`; `scratch` is a directory where the broken path is made.
    pub(crate) fn new(inner: S, scratch: &Path) -> Self {
        let not_a_dir = scratch.join("not-a-directory");
        std::fs::write(&not_a_dir, b"").unwrap();
        Self {
            inner: Arc::new(inner),
            broken: FileStore::new(not_a_dir.join("token.json")),
            down: Arc::default(),
            failing_writes: Arc::default(),
            failed_writes: Arc::default(),
        }
    }

    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub(crate) fn fail_next_writes(&self, n: usize) {
        self.failing_writes.store(n, Ordering::SeqCst);
    }

    /// Writes refused so far (outage or armed).
    pub(crate) fn failed_writes(&self) -> usize {
        self.failed_writes.load(Ordering::SeqCst)
    }

    async fn outage(&self) -> Result<(), tower_auth_refresh::store::StoreError> {
        if !self.down.load(Ordering::SeqCst) {
            return Ok(());
        }
        let err = self
            .broken
            .load()
            .await
            .expect_err("a path under a regular file cannot be read");
        assert!(err.is_unavailable(), "{err}");
        Err(err)
    }
}

impl<S: TokenStore> TokenStore for Flaky<S> {
    async fn load(&self) -> Result<Option<Record>, tower_auth_refresh::store::StoreError> {
        self.outage().await?;
        self.inner.load().await
    }

    async fn try_lease(
        &self,
        ttl: Duration,
    ) -> Result<Option<tower_auth_refresh::store::Lease>, tower_auth_refresh::store::StoreError>
    {
        self.outage().await?;
        self.inner.try_lease(ttl).await
    }

    async fn compare_and_set(
        &self,
        lease: &tower_auth_refresh::store::Lease,
        expected: u64,
        record: &Record,
    ) -> Result<CasOutcome, tower_auth_refresh::store::StoreError> {
        let armed = self
            .failing_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if armed || self.down.load(Ordering::SeqCst) {
            self.failed_writes.fetch_add(1, Ordering::SeqCst);
            let err = self.broken.load().await.expect_err("unreadable");
            return Err(err);
        }
        self.inner.compare_and_set(lease, expected, record).await
    }

    async fn release(
        &self,
        lease: tower_auth_refresh::store::Lease,
    ) -> Result<(), tower_auth_refresh::store::StoreError> {
        self.inner.release(lease).await
    }

    async fn wait_change(
        &self,
        seen: u64,
        max: Duration,
    ) -> Result<(), tower_auth_refresh::store::StoreError> {
        self.outage().await?;
        self.inner.wait_change(seen, max).await
    }
}
