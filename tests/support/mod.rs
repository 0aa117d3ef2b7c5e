//! Support code shared by the integration tests: loopback servers, clients, tracing capture,
//! a seeded generator, the deliberate-panic hook and small request helpers.
//!
//! Every test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::any::Any;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::PanicHookInfo;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::Service;
use tower_auth_refresh::{
    Backoff, BoxError, Clock, RefreshError, RefreshLayer, ReplayBody, Token, TokenRefresher,
    refresh_fn,
};
use tracing_subscriber::fmt::MakeWriter;

/// Bounds a test body: a hang fails instead of blocking the suite.
pub(crate) async fn guard<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("test did not finish within 60 s")
}

/// A forced refresh (`TokenHandle::refresh`) on a task of its own, its outcome as text.
pub(crate) fn forced_refresh(
    handle: &tower_auth_refresh::TokenHandle,
) -> JoinHandle<Result<(), String>> {
    let handle = handle.clone();
    tokio::spawn(async move {
        handle
            .refresh()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

// ---------------------------------------------------------------------------------------------
// Requests and responses.

/// A GET with an empty body.
pub(crate) fn get<U>(uri: U) -> Request<Full<Bytes>>
where
    U: TryInto<Uri>,
    U::Error: Into<http::Error>,
{
    Request::get(uri).body(Full::default()).unwrap()
}

/// A response with `status` and `body`.
pub(crate) fn response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res
}

/// The `Authorization` header as text, or "-" without one.
pub(crate) fn authorization(headers: &HeaderMap) -> String {
    headers
        .get(AUTHORIZATION)
        .map_or_else(|| "-".to_owned(), |v| v.to_str().unwrap().to_owned())
}

/// A request as the in-memory APIs of these tests get it.
pub(crate) type ApiRequest = Request<ReplayBody<Full<Bytes>>>;

/// What the in-memory APIs of these tests are: a service the layer can wrap and clone, whose
/// futures can be spawned.
pub(crate) trait InMemoryApi<Res>:
    Service<ApiRequest, Response = Response<Res>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S, Res> InMemoryApi<Res> for S where
    S: Service<ApiRequest, Response = Response<Res>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// A request body that yields `frames` in order, with a size hint of exactly `hint` bytes (or
/// none, whatever it sends), and an `is_end_stream` that is accurate (like `Full`'s) or always
/// false (like `StreamBody`'s).
#[derive(Debug)]
pub(crate) struct ScriptedBody {
    pub(crate) frames: VecDeque<Frame<Bytes>>,
    pub(crate) hint: Option<u64>,
    pub(crate) accurate_end: bool,
}

impl http_body::Body for ScriptedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.accurate_end && self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.hint {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Refreshers.

/// A refresher that counts its calls and always returns `Bearer <secret>`.
pub(crate) fn counting(calls: &Arc<AtomicUsize>, secret: &'static str) -> impl TokenRefresher {
    let calls = calls.clone();
    refresh_fn(move |_stale: Option<Token>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, RefreshError>(Token::bearer(secret)?) }
    })
}

/// A refresher that counts its calls and always fails for good (`invalid_grant`).
pub(crate) fn rejecting(calls: &Arc<AtomicUsize>) -> impl TokenRefresher {
    let calls = calls.clone();
    refresh_fn(move |_stale: Option<Token>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Err::<Token, _>(RefreshError::terminal("invalid_grant")) }
    })
}

/// [`counting`], but each call returns after `delay`.
pub(crate) fn counting_after(
    calls: &Arc<AtomicUsize>,
    secret: &'static str,
    delay: Duration,
) -> impl TokenRefresher {
    let calls = calls.clone();
    refresh_fn(move |_stale: Option<Token>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, RefreshError>(Token::bearer(secret)?)
        }
    })
}

/// The bound the tests pass to [`yield_until`]: far more yields than any awaited condition
/// needs (they hold within ten), few enough that a regression fails in well under a second.
pub(crate) const YIELD_BOUND: usize = 100_000;

/// Yields to the runtime until `cond` holds, at most `max_iterations` times, then panics saying
/// that `what` never happened. A bare `while !cond { yield_now().await }` hangs on a regression,
/// and under paused time it also keeps the runtime busy, so the clock never auto-advances and a
/// surrounding timeout never fires.
pub(crate) async fn yield_until(what: &str, max_iterations: usize, mut cond: impl FnMut() -> bool) {
    for _ in 0..max_iterations {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        cond(),
        "never happened within {max_iterations} yields: {what}"
    );
}

// ---------------------------------------------------------------------------------------------
// Runtimes.

/// A current-thread runtime with paused time.
pub(crate) fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Runs `test` on a [`paused_runtime`], failing it if it takes more than `deadline` of paused
/// time (a hang jumps there at once).
pub(crate) fn run_paused(deadline: Duration, test: impl Future<Output = ()>) {
    paused_runtime().block_on(async {
        tokio::time::timeout(deadline, test)
            .await
            .expect("global deadline: the test hung");
    });
}

// ---------------------------------------------------------------------------------------------
// Loopback servers and clients.

/// A loopback address nothing listens on: the address of a `127.0.0.1:0` listener, dropped
/// before this returns. For URLs a test must never contact; a connection to it is refused.
pub(crate) fn unused_loopback_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A server on `127.0.0.1:0` that stops accepting when dropped (see [`Server::detach`]).
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Keeps the server running until the test's runtime shuts down.
    pub(crate) fn detach(mut self) -> SocketAddr {
        self.accept = None;
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

/// Serves `handler` on `127.0.0.1:0` (HTTP/1.1, one task per connection); an `Err` from the
/// handler closes the connection unanswered.
async fn listen<F, Fut, E>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, E>> + Send + 'static,
    E: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let accept = tokio::spawn(async move {
        // Ends when the task is aborted (the server dropped).
        loop {
            let stream = accept_next(&listener).await;
            let svc = hyper::service::service_fn(handler.clone());
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server {
        addr,
        accept: Some(accept),
    }
}

/// The next connection. An error (out of file descriptors for a moment, under the usual
/// limit of 1,024 while a stampede test holds many sockets; a connection reset before it
/// was accepted) is waited out and accepting goes on: a test server that stopped accepting
/// for good would turn a passing moment into a failed test.
pub(crate) async fn accept_next(listener: &TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Serves `handler` until the returned [`Server`] is dropped.
pub(crate) async fn serve_scoped<F, Fut>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    listen(move |req| {
        let fut = handler(req);
        async move { Ok::<_, Infallible>(fut.await) }
    })
    .await
}

/// Serves `handler` until the test's runtime shuts down.
pub(crate) async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_scoped(handler).await.detach()
}

/// [`serve`] for a handler that may close the connection unanswered (by returning `Err`).
pub(crate) async fn serve_fallible<F, Fut, E>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, E>> + Send + 'static,
    E: Into<BoxError>,
{
    listen(handler).await.detach()
}

/// A plain hyper-util HTTP/1 client sending bodies of type `B`.
pub(crate) fn http_client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new()).build_http()
}

// ---------------------------------------------------------------------------------------------
// Tracing capture.

/// Log output kept in memory.
#[derive(Clone, Default)]
pub(crate) struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("log output is UTF-8")
    }
}

/// Keeps the subscriber of [`trace_to`] this thread's default until dropped.
pub(crate) struct Tracing {
    _default: tracing::subscriber::DefaultGuard,
    _second: tracing::Dispatch,
}

/// Makes a TRACE-level, plain-text fmt subscriber writing to `make_writer` this thread's
/// default subscriber.
///
/// Run the code to trace on this thread (a current-thread runtime), so that every task logs
/// to it.
pub(crate) fn trace_to<W>(make_writer: W) -> Tracing
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(make_writer)
        .finish();
    let default = tracing::subscriber::set_default(subscriber);
    // With a single registered dispatcher, tracing caches each callsite's interest from the
    // default of whichever thread hits it first: another test's thread (no subscriber) could
    // switch a callsite off for good, hiding its output here. A second live dispatcher makes
    // tracing ask every registered one; the rebuild fixes callsites registered before.
    let second = tracing::Dispatch::new(tracing_subscriber::registry());
    tracing::callsite::rebuild_interest_cache();
    Tracing {
        _default: default,
        _second: second,
    }
}

/// Captures this thread's TRACE output (see [`trace_to`]) until the guard is dropped.
pub(crate) fn capture_logs() -> (CapturedLogs, Tracing) {
    let logs = CapturedLogs::default();
    let tracing = trace_to({
        let logs = logs.clone();
        move || logs.clone()
    });
    (logs, tracing)
}

// ---------------------------------------------------------------------------------------------
// A small seeded generator (splitmix64).

#[derive(Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Starts from `state` as given: each test mixes its seed its own way.
    pub(crate) fn from_state(state: u64) -> Self {
        Self(state)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `num` / `den`.
    pub(crate) fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// True with probability `per_mille` / 1000.
    pub(crate) fn per_mille(&mut self, per_mille: u64) -> bool {
        self.chance(per_mille, 1000)
    }
}

// ---------------------------------------------------------------------------------------------
// Deliberate panics.

/// In the message of every panic a test refresher raises on purpose.
pub(crate) const PANIC_MARKER: &str = "deliberate refresher panic";

/// The message of a panic payload (pass `&*boxed` for a `Box<dyn Any + Send>`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Installs, once per test binary, a panic hook that keeps the deliberate panics (see
/// [`PANIC_MARKER`]) out of the test output.
pub(crate) fn silence_deliberate_panics() {
    silence_deliberate_panics_and(|_, _| false);
}

/// [`silence_deliberate_panics`], and any other panic is offered to `handled` (with its
/// message) first: it reaches the previous hook unless `handled` returns true.
pub(crate) fn silence_deliberate_panics_and(handled: fn(&PanicHookInfo<'_>, &str) -> bool) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = panic_message(info.payload());
            if message.contains(PANIC_MARKER) || handled(info, &message) {
                return;
            }
            previous(info);
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// Open files.

/// Raises this process's soft open-files limit as far as the hard limit allows, and returns
/// how many concurrent loopback connections fit in it (each costs a descriptor on the client
/// side and one on the server side, plus headroom for the other tests of the binary running
/// at the same time), at most `wanted`. Tests that open many connections size themselves with
/// it, so the README's test command passes with the usual limit (1024, soft and hard: CI runs
/// it so; macOS 256); with a higher hard limit they run at full size.
pub(crate) fn connection_budget(wanted: usize) -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(256);
    let budget = (limit.saturating_sub(256) / 3) as usize;
    if budget < wanted {
        println!(
            "open-files limit {limit}: running {budget} concurrent connections instead of {wanted}"
        );
    }
    budget.clamp(16, wanted)
}

/// A clock ahead of Tokio's (and of the wall clock) by an offset the test moves: a token's
/// lifetime passes without waiting, while every timer and socket runs in real time.
#[derive(Debug, Clone, Default)]
pub(crate) struct AheadClock(Arc<Mutex<Duration>>);

impl AheadClock {
    pub(crate) fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for AheadClock {
    fn now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + *self.0.lock().unwrap()
    }

    fn wall(&self) -> std::time::SystemTime {
        std::time::SystemTime::now() + *self.0.lock().unwrap()
    }
}

/// A layer whose token (`secret`, 100 s lifetime, so a leeway of 10 s) is inside its leeway,
/// and whose token endpoint is down: every refresh fails transiently, one attempt each (the
/// default cool-down follows). `calls` counts the refresher's calls.
pub(crate) fn in_leeway_with_the_endpoint_down(
    secret: &'static str,
    calls: &Arc<AtomicUsize>,
) -> RefreshLayer {
    in_leeway_then(secret, calls, None)
}

/// [`in_leeway_with_the_endpoint_down`], except that the refresher's second and later calls
/// return `then`, if given (the endpoint is back).
pub(crate) fn in_leeway_then(
    secret: &'static str,
    calls: &Arc<AtomicUsize>,
    then: Option<&'static str>,
) -> RefreshLayer {
    let clock = AheadClock::default();
    let calls = calls.clone();
    let layer = RefreshLayer::new(refresh_fn(move |_stale: Option<Token>| {
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            match then {
                Some(fresh) if !first => Ok(Token::bearer(fresh)?),
                _ => Err(RefreshError::transient("token endpoint down")),
            }
        }
    }))
    .clock(clock.clone())
    .retries(Backoff::none())
    .initial_token(
        Token::bearer(secret)
            .unwrap()
            .with_expires_in(Duration::from_secs(100)),
    );
    // 95 s into its 100 s: inside the leeway, not expired.
    clock.advance(Duration::from_secs(95));
    layer
}
