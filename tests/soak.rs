//! Chaos soak against real loopback servers.
//!
//! An API server and a token server on `127.0.0.1:0` (their own runtime thread), a
//! `hyper-util` client wearing the refresh layer and tower-http's TRACE-level tracing (with
//! request headers) on a current-thread runtime whose tracing output is captured. Many
//! concurrent clients send GETs, POSTs with bodies and unreplayable streaming PUTs; tokens
//! live 80-600 ms; the API answers 401 at random and revokes tokens at random; the token
//! endpoint answers 503, hangs past the refresher's timeout, resets the connection, or
//! rejects the refresh token for good (the session then ends and a login task logs in again
//! through the handle); callers drop requests at random points; a task forces refreshes.
//!
//! Checked at the end: every request completed or was cancelled by the test (nothing hung,
//! under a global deadline), each refresher call was needed and one succeeded per token
//! generation, the stored generations match the refresher's successes, no request reached the
//! API more than twice, bodies arrived intact (replays included), every failure is one of the
//! layer's typed errors, and no token text appears in the TRACE output or in any error.
//!
//! `SOAK_REQUESTS` scales the run (default 20,000); `SOAK_SEED` fixes the chaos seed.
//! Run with `--nocapture` to see the figures.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::RefreshContext;
use tower_auth_refresh::error::{
    RefreshFailed, RefreshRejected, SessionEnded, UnauthorizedAfterRefresh,
};
use tower_auth_refresh::{
    Backoff, BoxError, Cooldown, RefreshError, RefreshLayer, ReplayBody, Token, TokenHandle,
    TokenRefresher,
};
use tower_http::trace::{DefaultMakeSpan, DefaultOnRequest, DefaultOnResponse, TraceLayer};
use tracing::Level;

use support::{Rng, http_client, response, serve_fallible, trace_to};

/// Every token the token server issues contains this; it must never show up in output.
const MARKER: &str = "zz9secret";
const DEFAULT_REQUESTS: u64 = 20_000;
const CLIENTS: usize = 48;
/// How long the refresher waits for the token endpoint.
const REFRESH_TIMEOUT: Duration = Duration::from_millis(60);
/// A leeway larger than any lifetime: the layer clamps it to a tenth of the lifetime.
const LEEWAY: Duration = Duration::from_secs(30);
const AHEAD: Duration = Duration::from_millis(100);

type ReqBody = BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------------------------
// Seeded randomness, one generator per task.

/// The generator of a seed (splitmix64).
fn seeded(seed: u64) -> Rng {
    Rng::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// The servers' shared state.

struct Issued {
    issued_at: Instant,
    lifetime: Duration,
    revoked: bool,
}

#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Servers {
    tokens: Mutex<HashMap<String, Issued>>,
    /// Tokens the API answered 401 to.
    rejected: Mutex<HashSet<String>>,
    /// Sends per request id.
    sends: Mutex<HashMap<u64, u32>>,
    rng: Mutex<Option<Rng>>,
    issued: Counter,
    api_requests: Counter,
    api_ok: Counter,
    api_401_chaos: Counter,
    api_401_revoked: Counter,
    api_401_expired: Counter,
    api_401_unknown: Counter,
    api_without_token: Counter,
    body_mismatch: Counter,
    token_requests: Counter,
    token_with_authorization: Counter,
    token_ok: Counter,
    token_503: Counter,
    token_hang: Counter,
    token_reset: Counter,
    token_terminal: Counter,
    logins: Counter,
}

impl Servers {
    fn roll(&self, per_mille: u64) -> bool {
        self.rng
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .per_mille(per_mille)
    }
    fn below(&self, n: u64) -> u64 {
        self.rng.lock().unwrap().as_mut().unwrap().below(n)
    }
    fn issue(&self) -> (String, Duration) {
        let n = self.issued.0.fetch_add(1, Ordering::Relaxed) + 1;
        let secret = format!("{MARKER}-{n:06}-{:016x}", self.below(u64::MAX));
        let lifetime = Duration::from_millis(80 + self.below(520));
        self.tokens.lock().unwrap().insert(
            secret.clone(),
            Issued {
                issued_at: Instant::now(),
                lifetime,
                revoked: false,
            },
        );
        (secret, lifetime)
    }
    /// The earliest instant the layer may consider `secret` due for a refresh: its issue
    /// time (before the client received it) plus the lifetime minus the layer's early
    /// window (leeway or refresh-ahead, clamped as the layer clamps them).
    fn due(&self, secret: &str) -> Option<Instant> {
        let tokens = self.tokens.lock().unwrap();
        let t = tokens.get(secret)?;
        let leeway = LEEWAY.min(t.lifetime / 10);
        let early = AHEAD.min(t.lifetime / 2).max(leeway);
        Some(t.issued_at + (t.lifetime - early))
    }
}

async fn api(servers: Arc<Servers>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    servers.api_requests.add();
    let id: u64 = req.headers()["x-id"].to_str().unwrap().parse().unwrap();
    let expected: Option<(usize, u64)> = req.headers().get("x-body-fnv").map(|v| {
        let (len, sum) = v.to_str().unwrap().split_once(':').unwrap();
        (len.parse().unwrap(), sum.parse().unwrap())
    });
    let auth = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_owned());
    let Ok(body) = req.into_body().collect().await else {
        // The client went away mid-body (a cancelled request).
        return response(StatusCode::BAD_REQUEST, "incomplete body");
    };
    let body = body.to_bytes();
    *servers.sends.lock().unwrap().entry(id).or_default() += 1;
    if let Some((len, sum)) = expected {
        if body.len() != len || fnv(&body) != sum {
            servers.body_mismatch.add();
        }
    }
    let Some(secret) = auth.as_deref().and_then(|a| a.strip_prefix("Bearer ")) else {
        servers.api_without_token.add();
        return response(StatusCode::UNAUTHORIZED, "");
    };
    let verdict = {
        let mut tokens = servers.tokens.lock().unwrap();
        match tokens.get_mut(secret) {
            None => Err(&servers.api_401_unknown),
            Some(t) if t.revoked => Err(&servers.api_401_revoked),
            Some(t) if t.issued_at.elapsed() >= t.lifetime => Err(&servers.api_401_expired),
            Some(t) => {
                if servers.roll(2) {
                    t.revoked = true;
                    Err(&servers.api_401_revoked)
                } else if servers.roll(10) {
                    Err(&servers.api_401_chaos)
                } else {
                    Ok(())
                }
            }
        }
    };
    match verdict {
        Ok(()) => {
            servers.api_ok.add();
            response(StatusCode::OK, "ok")
        }
        Err(counter) => {
            counter.add();
            servers.rejected.lock().unwrap().insert(secret.to_owned());
            let mut res = response(StatusCode::UNAUTHORIZED, "");
            if servers.roll(500) {
                res.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    "Bearer realm=\"soak\", error=\"invalid_token\""
                        .parse()
                        .unwrap(),
                );
            }
            res
        }
    }
}

enum TokenAnswer {
    Answer(Response<Full<Bytes>>),
    Reset,
}

async fn token_endpoint(servers: Arc<Servers>, req: Request<Incoming>) -> TokenAnswer {
    if req.uri().path() == "/login" {
        servers.logins.add();
        let (secret, life) = servers.issue();
        return TokenAnswer::Answer(response(
            StatusCode::OK,
            format!("{secret} {}", life.as_millis()),
        ));
    }
    servers.token_requests.add();
    if req.headers().contains_key(AUTHORIZATION) {
        servers.token_with_authorization.add();
    }
    let _ = req.into_body().collect().await;
    match servers.below(1000) {
        0..=119 => {
            servers.token_503.add();
            TokenAnswer::Answer(response(StatusCode::SERVICE_UNAVAILABLE, "busy"))
        }
        120..=179 => {
            servers.token_hang.add();
            tokio::time::sleep(REFRESH_TIMEOUT * 4).await;
            TokenAnswer::Answer(response(StatusCode::SERVICE_UNAVAILABLE, "too late"))
        }
        180..=259 => {
            servers.token_reset.add();
            TokenAnswer::Reset
        }
        260..=279 => {
            servers.token_terminal.add();
            TokenAnswer::Answer(response(StatusCode::BAD_REQUEST, "invalid_grant"))
        }
        _ => {
            servers.token_ok.add();
            let (secret, life) = servers.issue();
            TokenAnswer::Answer(response(
                StatusCode::OK,
                format!("{secret} {}", life.as_millis()),
            ))
        }
    }
}

#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by the test")
    }
}

impl std::error::Error for Reset {}

// ---------------------------------------------------------------------------------------------
// The refresher: POSTs the stale token to the token endpoint through the layered client
// itself (such requests pass through the layer untouched).

type Stack = BoxCloneSyncService<Request<ReqBody>, Response<Bytes>, BoxError>;

#[derive(Default)]
struct RefresherLog {
    calls: Counter,
    ok: Counter,
    timeouts: Counter,
    transport_errors: Counter,
    status_errors: Counter,
    successes_by_stale: Mutex<HashMap<String, u32>>,
    successes_without_token: Counter,
    unneeded: Mutex<Vec<String>>,
    /// Generations at which a forced refresh started.
    forced_generations: Mutex<HashSet<u64>>,
}

#[derive(Clone)]
struct Refresher {
    stack: Arc<OnceLock<Stack>>,
    handle: Arc<OnceLock<TokenHandle>>,
    token_uri: String,
    servers: Arc<Servers>,
    log: Arc<RefresherLog>,
}

fn parse_token(body: &[u8]) -> Result<Token, RefreshError> {
    let body = std::str::from_utf8(body).map_err(RefreshError::transient)?;
    let (secret, ms) = body
        .split_once(' ')
        .ok_or_else(|| RefreshError::transient("malformed token response"))?;
    let ms: u64 = ms.parse().map_err(RefreshError::transient)?;
    Ok(Token::bearer(secret)?.with_expires_in(Duration::from_millis(ms)))
}

impl TokenRefresher for Refresher {
    type Future = futures_util::future::BoxFuture<'static, Result<Token, RefreshError>>;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let stale = ctx.into_stale();
        let this = self.clone();
        Box::pin(async move {
            let log = &this.log;
            log.calls.add();
            let generation = this.handle.get().map_or(0, |h| h.state().generation());
            let stale = stale.map(|t| t.secret().to_owned());
            if let Some(s) = &stale {
                let needed = this.servers.rejected.lock().unwrap().contains(s)
                    || this.servers.due(s).is_some_and(|due| Instant::now() >= due)
                    || log.forced_generations.lock().unwrap().contains(&generation);
                if !needed {
                    log.unneeded.lock().unwrap().push(format!(
                        "generation {generation}: neither rejected, nor due, nor forced"
                    ));
                }
            }
            let body = stale.clone().unwrap_or_else(|| "none".into());
            let req = Request::post(this.token_uri.as_str())
                .body(Full::new(Bytes::from(body)).boxed())
                .unwrap();
            let stack = this.stack.get().expect("stack").clone();
            let res = match tokio::time::timeout(REFRESH_TIMEOUT, stack.oneshot(req)).await {
                Err(_) => {
                    log.timeouts.add();
                    return Err(RefreshError::transient("token endpoint timed out"));
                }
                Ok(Err(e)) => {
                    log.transport_errors.add();
                    return Err(RefreshError::transient(e));
                }
                Ok(Ok(res)) => res,
            };
            if !res.status().is_success() {
                log.status_errors.add();
                return Err(RefreshError::from_status(res.status()));
            }
            let token = parse_token(res.body())?;
            log.ok.add();
            match stale {
                Some(s) => *log.successes_by_stale.lock().unwrap().entry(s).or_default() += 1,
                None => log.successes_without_token.add(),
            }
            Ok(token)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Captured TRACE output, scanned as it is written.

#[derive(Clone, Default)]
struct Trace(Arc<Mutex<TraceStats>>);

#[derive(Default)]
struct TraceStats {
    bytes: u64,
    lines: u64,
    leaks: Vec<String>,
    refresh_lines: u64,
    sensitive_header_lines: u64,
}

impl std::io::Write for Trace {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut st = self.0.lock().unwrap();
        st.bytes += buf.len() as u64;
        for line in text.lines() {
            st.lines += 1;
            if line.contains(MARKER) && st.leaks.len() < 5 {
                st.leaks.push(line.to_owned());
            }
            if line.contains("token refresh") {
                st.refresh_lines += 1;
            }
            if line.contains("\"authorization\": Sensitive") {
                st.sensitive_header_lines += 1;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The clients.

#[derive(Default)]
struct Outcomes {
    started: Counter,
    ok: Counter,
    /// A 401 handed back to the caller: its body could not be replayed.
    unreplayable_401: Counter,
    replayable_401: Counter,
    cooling_401: Counter,
    /// Replayable requests whose 401 came back when the layer was no longer cooling down:
    /// (sent, answered), judged against the failed refreshes once the run is over.
    late_401s: Mutex<Vec<(Instant, Instant)>>,
    other_status: Counter,
    refresh_failed: Counter,
    refresh_rejected: Counter,
    session_ended: Counter,
    unauthorized_after_refresh: Counter,
    untyped: Mutex<Vec<String>>,
    cancelled: Counter,
    stuck: Counter,
    leaked_in_errors: Counter,
    /// Ids of requests that completed with 200.
    ok_ids: Mutex<Vec<u64>>,
    forced_ok: Counter,
    forced_err: Counter,
}

impl Outcomes {
    fn classify(&self, id: u64, replayable: bool, result: Result<Response<Bytes>, BoxError>) {
        match result {
            Ok(res) if res.status() == StatusCode::OK => {
                self.ok.add();
                self.ok_ids.lock().unwrap().push(id);
            }
            Ok(res) if res.status() == StatusCode::UNAUTHORIZED && replayable => {
                self.replayable_401.add()
            }
            Ok(res) if res.status() == StatusCode::UNAUTHORIZED => self.unreplayable_401.add(),
            Ok(_) => self.other_status.add(),
            Err(err) => {
                if format!("{err} {err:?}").contains(MARKER) {
                    self.leaked_in_errors.add();
                }
                if err.is::<RefreshFailed>() {
                    self.refresh_failed.add();
                } else if err.is::<RefreshRejected>() {
                    self.refresh_rejected.add();
                } else if err.is::<SessionEnded>() {
                    self.session_ended.add();
                } else if err.is::<UnauthorizedAfterRefresh>() {
                    self.unauthorized_after_refresh.add();
                } else {
                    let mut untyped = self.untyped.lock().unwrap();
                    if untyped.len() < 5 {
                        untyped.push(format!("{err:?}"));
                    } else {
                        untyped.push(String::new());
                    }
                }
            }
        }
    }
}

fn request(id: u64, api: SocketAddr, rng: &mut Rng) -> (Request<ReqBody>, bool) {
    let uri = format!("http://{api}/items/{id}");
    let builder = Request::builder().uri(uri).header("x-id", id.to_string());
    match rng.below(100) {
        0..=2 => {
            // A streaming upload of unknown size: passed through, never replayed.
            let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..3)
                .map(|i| Ok(Frame::data(Bytes::from(format!("chunk-{id}-{i};")))))
                .collect();
            let sent: Vec<u8> = (0..3)
                .flat_map(|i| format!("chunk-{id}-{i};").into_bytes())
                .collect();
            let req = builder
                .method(Method::PUT)
                .header("x-body-fnv", format!("{}:{}", sent.len(), fnv(&sent)))
                .body(StreamBody::new(stream::iter(chunks)).boxed())
                .unwrap();
            (req, false)
        }
        3..=49 => {
            let len = rng.below(4096) as usize;
            let body: Vec<u8> = (0..len).map(|i| (id as usize + i * 31) as u8).collect();
            let req = builder
                .method(Method::POST)
                .header("x-body-fnv", format!("{}:{}", body.len(), fnv(&body)))
                .body(Full::new(Bytes::from(body)).boxed())
                .unwrap();
            (req, true)
        }
        _ => (builder.body(Full::new(Bytes::new()).boxed()).unwrap(), true),
    }
}

struct Figures {
    elapsed: Duration,
    final_generation: u64,
}

#[test]
fn chaos_soak_against_loopback_servers() {
    let total: u64 = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_REQUESTS);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let deadline = Duration::from_secs(120).max(Duration::from_millis(total * 2));

    // The servers run on their own runtime thread.
    let servers = Arc::new(Servers {
        rng: Mutex::new(Some(seeded(seed ^ 0xA5A5))),
        ..Servers::default()
    });
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (api_addr, token_addr) = server_rt.block_on(async {
        let s = servers.clone();
        let api_addr = serve_fallible(move |req| {
            let s = s.clone();
            async move { Ok::<_, Reset>(api(s, req).await) }
        })
        .await;
        let s = servers.clone();
        let token_addr = serve_fallible(move |req| {
            let s = s.clone();
            async move {
                match token_endpoint(s, req).await {
                    TokenAnswer::Answer(res) => Ok(res),
                    TokenAnswer::Reset => Err(Reset),
                }
            }
        })
        .await;
        (api_addr, token_addr)
    });

    let trace = Trace::default();
    let log = Arc::new(RefresherLog::default());
    let outcomes = Arc::new(Outcomes::default());

    let figures = {
        let _tracing = trace_to({
            let trace = trace.clone();
            move || trace.clone()
        });
        let client_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        client_rt.block_on(async {
            tokio::time::timeout(
                deadline,
                run_clients(total, seed, api_addr, token_addr, &servers, &log, &outcomes),
            )
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "global deadline of {deadline:?}: {} requests started, {} done — a request \
                     or the layer hung",
                    outcomes.started.get(),
                    outcomes.ok.get()
                )
            })
        })
    };
    drop(server_rt);

    // ---- The figures --------------------------------------------------------------------
    let o = &outcomes;
    let untyped = o.untyped.lock().unwrap().clone();
    let completed = o.ok.get()
        + o.unreplayable_401.get()
        + o.replayable_401.get()
        + o.cooling_401.get()
        + o.other_status.get()
        + o.refresh_failed.get()
        + o.refresh_rejected.get()
        + o.session_ended.get()
        + o.unauthorized_after_refresh.get()
        + untyped.len() as u64;
    let sends = servers.sends.lock().unwrap().clone();
    let replays = sends.values().filter(|&&n| n == 2).count();
    let max_sends = sends.values().copied().max().unwrap_or(0);
    let successes = log.ok.get();
    let by_stale = log.successes_by_stale.lock().unwrap().clone();
    let twice: Vec<_> = by_stale.iter().filter(|(_, n)| **n > 1).collect();
    let logins = servers.logins.get();
    // Generations: one per stored refresh and one per login.
    let stored_refreshes = figures.final_generation - logins;
    let unneeded = log.unneeded.lock().unwrap().clone();
    let trace = trace.0.lock().unwrap();
    let mut errors = BTreeMap::new();
    errors.insert("RefreshFailed", o.refresh_failed.get());
    errors.insert("RefreshRejected", o.refresh_rejected.get());
    errors.insert("SessionEnded", o.session_ended.get());
    errors.insert(
        "UnauthorizedAfterRefresh",
        o.unauthorized_after_refresh.get(),
    );
    errors.insert("untyped", untyped.len() as u64);

    println!(
        "soak: seed {seed}, {total} requests, {CLIENTS} clients, {:.1?}",
        figures.elapsed
    );
    println!(
        "  requests: {} started, {} completed ({} ok, {} unreplayable 401 returned, {} \
         replayable 401 returned, {} 401 returned in a cool-down, {} other status), {} \
         cancelled by the test, {} stuck",
        o.started.get(),
        completed,
        o.ok.get(),
        o.unreplayable_401.get(),
        o.replayable_401.get(),
        o.cooling_401.get(),
        o.other_status.get(),
        o.cancelled.get(),
        o.stuck.get()
    );
    println!("  errors by type: {errors:?}");
    println!(
        "  API: {} sends, {} replays (requests sent twice), max sends per request {}, 401s: {} \
         chaos, {} revoked, {} expired, {} unknown token; {} without a token, {} body mismatches",
        servers.api_requests.get(),
        replays,
        max_sends,
        servers.api_401_chaos.get(),
        servers.api_401_revoked.get(),
        servers.api_401_expired.get(),
        servers.api_401_unknown.get(),
        servers.api_without_token.get(),
        servers.body_mismatch.get(),
    );
    println!(
        "  refresher: {} calls ({} tokens, {} timeouts, {} transport errors, {} error statuses); \
         token endpoint: {} ok, {} 503, {} hung, {} reset, {} invalid_grant, {} with an \
         Authorization header",
        log.calls.get(),
        successes,
        log.timeouts.get(),
        log.transport_errors.get(),
        log.status_errors.get(),
        servers.token_ok.get(),
        servers.token_503.get(),
        servers.token_hang.get(),
        servers.token_reset.get(),
        servers.token_terminal.get(),
        servers.token_with_authorization.get(),
    );
    println!(
        "  generations: {} final = {} stored refreshes + {} logins; {} forced refreshes ({} ok, \
         {} failed); {} unneeded refresher calls",
        figures.final_generation,
        stored_refreshes,
        logins,
        o.forced_ok.get() + o.forced_err.get(),
        o.forced_ok.get(),
        o.forced_err.get(),
        unneeded.len()
    );
    println!(
        "  trace: {} lines ({} bytes), {} about token refreshes, {} with a redacted \
         Authorization header, {} leaking token text",
        trace.lines,
        trace.bytes,
        trace.refresh_lines,
        trace.sensitive_header_lines,
        trace.leaks.len()
    );

    // ---- The invariants -----------------------------------------------------------------
    assert_eq!(o.started.get(), total);
    assert_eq!(o.stuck.get(), 0, "requests that never completed");
    assert_eq!(
        completed + o.cancelled.get(),
        o.started.get(),
        "every request completed or was cancelled by the test"
    );
    assert!(untyped.is_empty(), "untyped errors: {untyped:?}");
    assert_eq!(o.other_status.get(), 0);
    assert_eq!(
        o.replayable_401.get(),
        0,
        "a replayable request got its 401 back"
    );
    assert!(
        max_sends <= 2,
        "a request reached the API {max_sends} times"
    );
    let ok_ids = o.ok_ids.lock().unwrap();
    assert!(o.ok.get() > 0, "no request succeeded");
    assert!(replays > 0, "no request was replayed");
    assert!(
        ok_ids.iter().all(|id| sends.contains_key(id)),
        "a request completed ok without reaching the API"
    );
    assert_eq!(
        servers.body_mismatch.get(),
        0,
        "bodies arrive intact, replays included"
    );
    assert_eq!(servers.api_without_token.get(), 0);
    assert_eq!(
        servers.token_with_authorization.get(),
        0,
        "the refresher's own requests pass through untouched"
    );
    assert!(twice.is_empty(), "refreshed twice: {twice:?}");
    assert!(
        log.successes_without_token.get() <= 1,
        "only the first refresh has no stale token"
    );
    assert!(
        unneeded.is_empty(),
        "unneeded refresher calls: {unneeded:?}"
    );
    assert!(
        stored_refreshes <= successes && successes <= stored_refreshes + logins,
        "refresher successes ({successes}) vs generations ({stored_refreshes} refreshes stored, \
         {logins} logins that may supersede one in flight)"
    );
    assert!(
        trace.leaks.is_empty(),
        "token text in the TRACE output: {:?}",
        trace.leaks
    );
    assert_eq!(o.leaked_in_errors.get(), 0, "token text in an error");
    assert!(
        trace.refresh_lines > 0 && trace.sensitive_header_lines > 0,
        "TRACE was captured"
    );
}

#[allow(clippy::too_many_arguments)]
async fn run_clients(
    total: u64,
    seed: u64,
    api_addr: SocketAddr,
    token_addr: SocketAddr,
    servers: &Arc<Servers>,
    log: &Arc<RefresherLog>,
    outcomes: &Arc<Outcomes>,
) -> Figures {
    let started = Instant::now();
    let stack_slot = Arc::new(OnceLock::new());
    let handle_slot = Arc::new(OnceLock::new());
    let refresher = Refresher {
        stack: stack_slot.clone(),
        handle: handle_slot.clone(),
        token_uri: format!("http://{token_addr}/token"),
        servers: servers.clone(),
        log: log.clone(),
    };
    let layer = RefreshLayer::new(refresher)
        .leeway(LEEWAY)
        .refresh_ahead(AHEAD)
        .retries(
            Backoff::default()
                .max_attempts(2)
                .base_delay(Duration::from_millis(5))
                .max_delay(Duration::from_millis(40))
                .max_elapsed(Duration::from_secs(2)),
        )
        // The cool-down is on, scaled to tokens that live 80-600 ms (the default 30 s would
        // turn a first failed refresh into a run of fast failures).
        .cooldown(Cooldown::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ));
    let handle = layer.token_handle();
    let _ = handle_slot.set(handle.clone());
    let client: Client<HttpConnector, ReplayBody<ReqBody>> = http_client();
    let stack = ServiceBuilder::new()
        .layer(layer)
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(
                    DefaultMakeSpan::new()
                        .level(Level::TRACE)
                        .include_headers(true),
                )
                .on_request(DefaultOnRequest::new().level(Level::TRACE))
                .on_response(DefaultOnResponse::new().level(Level::TRACE)),
        )
        .service(client)
        .and_then(|res: Response<_>| async move {
            let (parts, body) = res.into_parts();
            let bytes = BodyExt::collect(body)
                .await
                .map_err(BoxError::from)?
                .to_bytes();
            Ok::<_, BoxError>(Response::from_parts(parts, bytes))
        });
    let stack: Stack = BoxCloneSyncService::new(stack);
    let _ = stack_slot.set(stack.clone());

    let done = Arc::new(AtomicBool::new(false));
    // Logs in again through the handle whenever a terminal failure ended the session.
    let login = {
        let (handle, done) = (handle.clone(), done.clone());
        let plain: Client<HttpConnector, Full<Bytes>> = http_client();
        let uri = format!("http://{token_addr}/login");
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if handle.state().session_ended() {
                    let req = Request::post(uri.as_str()).body(Full::default()).unwrap();
                    if let Ok(res) = plain.request(req).await {
                        let body = res.into_body().collect().await.unwrap().to_bytes();
                        handle.set_token(parse_token(&body).expect("login token"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Forces a refresh now and then.
    let forcer = {
        let (handle, done, outcomes, log) =
            (handle.clone(), done.clone(), outcomes.clone(), log.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                if handle.state().session_ended() {
                    continue;
                }
                let generation = handle.state().generation();
                log.forced_generations.lock().unwrap().insert(generation);
                match handle.refresh().await {
                    Ok(_) => outcomes.forced_ok.add(),
                    Err(_) => outcomes.forced_err.add(),
                }
            }
        })
    };

    // When refreshes failed (each starts a cool-down): heard from the layer's events.
    let failed_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let lagged = Arc::new(AtomicBool::new(false));
    let listener = {
        let (mut events, failed_at, lagged) =
            (handle.subscribe(), failed_at.clone(), lagged.clone());
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    Ok(tower_auth_refresh::RefreshEvent::RefreshFailed { .. }) => {
                        failed_at.lock().unwrap().push(Instant::now());
                    }
                    Ok(_) => {}
                    Err(_) => lagged.store(true, Ordering::Relaxed),
                }
            }
        })
    };

    let next = Arc::new(AtomicU64::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (stack, next, outcomes) = (stack.clone(), next.clone(), outcomes.clone());
        let handle = handle.clone();
        let mut rng = seeded(seed ^ (c as u64 + 1).wrapping_mul(0x1234_5678_9ABC_DEF1));
        clients.spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= total {
                    return;
                }
                outcomes.started.add();
                let (req, replayable) = request(id, api_addr, &mut rng);
                let sent_at = Instant::now();
                let call = stack.clone().oneshot(req);
                // Cancellation at random points: a drop after the first poll, or a timeout
                // that fires somewhere along the way. The rest get a generous bound, and
                // hitting it counts as stuck.
                let (limit, by_test) = match rng.below(1000) {
                    0..=9 => (Duration::ZERO, true),
                    10..=39 => (Duration::from_micros(rng.below(20_000)), true),
                    _ => (Duration::from_secs(20), false),
                };
                match tokio::time::timeout(limit, call).await {
                    Ok(Err(err)) if err.is::<SessionEnded>() => {
                        outcomes.classify(id, replayable, Err(err));
                        // Like an application, pause while the user logs in again rather
                        // than spin on fail-fast errors.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Ok(Ok(res)) if res.status() == StatusCode::UNAUTHORIZED && replayable => {
                        if handle.state().cooling_for().is_some() {
                            // A 401 during the cool-down of a failed refresh is returned, by
                            // design.
                            outcomes.cooling_401.add();
                        } else {
                            // The cool-down may be over by now: judged at the end against the
                            // failed refreshes.
                            outcomes
                                .late_401s
                                .lock()
                                .unwrap()
                                .push((sent_at, Instant::now()));
                        }
                    }
                    Ok(result) => outcomes.classify(id, replayable, result),
                    Err(_) if by_test => outcomes.cancelled.add(),
                    Err(_) => outcomes.stuck.add(),
                }
            }
        });
    }
    while let Some(joined) = clients.join_next().await {
        joined.expect("a client task panicked");
    }
    // A replayable 401 that came back after the cool-down was over is excused only if a
    // refresh failed shortly before it was sent (a cool-down lasts at most 200 ms) or while it
    // was out (the event is heard a little after the failure: 1 s of slack).
    // The listener runs on this runtime: a few turns let it hear the last events.
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    listener.abort();
    {
        let failed_at = failed_at.lock().unwrap();
        let lagged = lagged.load(Ordering::Relaxed);
        for (sent, answered) in outcomes.late_401s.lock().unwrap().drain(..) {
            let from = sent.checked_sub(Duration::from_millis(250)).unwrap_or(sent);
            let to = answered + Duration::from_secs(1);
            if lagged || failed_at.iter().any(|t| (from..=to).contains(t)) {
                outcomes.cooling_401.add();
            } else {
                outcomes.replayable_401.add();
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    login.await.unwrap();
    forcer.await.unwrap();
    // Let a refresh whose waiters were all cancelled finish before reading the generation.
    for _ in 0..200 {
        if !handle.state().refreshing() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Figures {
        elapsed: started.elapsed(),
        final_generation: handle.state().generation(),
    }
}
