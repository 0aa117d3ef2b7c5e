//! An HTTP/1.1 keep-alive server that answers 401 before reading the request body, and keeps
//! the connection open: the caller gets the replayed response, or the 401, never a hang.
//!
//! The first attempt's body may still be on its way out when the 401 arrives (the server is
//! not reading, so a large body stalls in the socket). The layer waits at most
//! `replay_body_wait` for it, then abandons it: the first attempt's body ends with an error,
//! so hyper closes that connection instead of queueing the replay behind the unsent bytes.
//!
//! Every case runs under a hard 10 s guard that only catches hangs; nothing here asserts a
//! duration. The last tests hold the first attempt's body in a mock, in paused time.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{RefreshLayer, ReplayBody, Token};

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use support::counting;

const STALE: &str = "stale-e401-5c2a";
const FRESH: &str = "fresh-e401-9d4b";

/// The socket buffer size asked for at both ends (the kernel may round it up).
const SOCKET_BUFFER: u32 = 4096;

/// A hyper-util client whose sockets have small send buffers.
fn client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_send_buffer_size(Some(SOCKET_BUFFER as usize));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// What the server saw.
#[derive(Default)]
struct Log {
    /// Requests refused with 401 (their bodies not read when answered).
    refused: usize,
    /// The bodies of the requests it accepted, in full.
    accepted: Vec<Bytes>,
    /// For each refused request with a `content-length`, once the test let the server look:
    /// how many body bytes the client sent on that connection before closing it, or `None`
    /// if the client sent the whole body (the connection was kept).
    abandoned_at: Vec<Option<usize>>,
}

/// The server's state, shared with the test.
#[derive(Default)]
struct Shared {
    log: Mutex<Log>,
    /// Signalled by the test once the caller has its response: the server then reads what
    /// is left on the refused connections.
    look: tokio::sync::Notify,
    looked: tokio::sync::Notify,
}

/// Finds the end of the request head in `buf`.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A raw HTTP/1.1 server on loopback. A request with the stale token is answered at once with
/// a keep-alive 401, and the connection is kept open without reading another byte (until the
/// client closes it). A request with the fresh token has its `content-length` body read in
/// full and is answered 200. Chunked bodies are decoded.
async fn server() -> (SocketAddr, Arc<Shared>) {
    serve(AfterRefusal::Stall).await
}

/// What the server does with a refused request's body once it has answered 401.
#[derive(Clone, Copy, PartialEq)]
enum AfterRefusal {
    /// Reads no more of it and keeps the connection open (until the test looks).
    Stall,
    /// Reads it to its end and discards it, keeping the connection for the next request (what
    /// RFC 9112 asks of a server that answers before the end of a body and keeps the
    /// connection; nginx and Go's `net/http` do so).
    Drain,
}

async fn serve(after_refusal: AfterRefusal) -> (SocketAddr, Arc<Shared>) {
    // Small socket buffers (both ends, see `client`): a body the server does not read stalls
    // in the sender, as it does over a real network, instead of vanishing into loopback's
    // large kernel buffers.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener: TcpListener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = Arc::new(Shared::default());
    let state = shared.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let shared = state.clone();
            tokio::spawn(async move {
                let log = &shared.log;
                let mut buf = Vec::new();
                loop {
                    // One request head.
                    let end = loop {
                        if let Some(end) = head_end(&buf) {
                            break end;
                        }
                        let mut chunk = [0u8; 8192];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end);
                    let fresh = head
                        .contains(&format!("authorization: bearer {FRESH}").to_ascii_lowercase());
                    let content_length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse::<usize>().unwrap());
                    if !fresh && after_refusal == AfterRefusal::Drain {
                        log.lock().unwrap().refused += 1;
                        if stream
                            .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if let Some(len) = content_length {
                            while buf.len() < len {
                                let mut chunk = [0u8; 65536];
                                match stream.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                            }
                            buf.drain(..len);
                        } else if read_chunked(&mut stream, &mut buf).await.is_none() {
                            return;
                        }
                        continue;
                    }
                    if !fresh {
                        let look = shared.look.notified();
                        log.lock().unwrap().refused += 1;
                        let _ = stream
                            .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        // Keep the connection open and read nothing more, until the test has
                        // its response. Then see what the client did with the unread body:
                        // sent it all (and kept the connection), or closed the connection
                        // before the end.
                        look.await;
                        if let Some(len) = content_length {
                            let mut got = buf.len();
                            let mut chunk = vec![0u8; 65536];
                            let verdict = loop {
                                if got >= len {
                                    break None;
                                }
                                match stream.read(&mut chunk).await {
                                    Ok(0) | Err(_) => break Some(got),
                                    Ok(n) => got += n,
                                }
                            };
                            log.lock().unwrap().abandoned_at.push(verdict);
                        }
                        shared.looked.notify_one();
                        return;
                    }
                    let body = if let Some(len) = content_length {
                        while buf.len() < len {
                            let mut chunk = [0u8; 65536];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..len).collect::<Vec<u8>>()
                    } else {
                        assert!(head.contains("transfer-encoding: chunked"), "{head}");
                        match read_chunked(&mut stream, &mut buf).await {
                            Some(body) => body,
                            None => return,
                        }
                    };
                    log.lock().unwrap().accepted.push(Bytes::from(body));
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, shared)
}

/// Reads a chunked body (no trailers) from `buf` and then `stream`.
async fn read_chunked(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        // The chunk, and its CRLF (for the last chunk: the final CRLF).
        let need = line_end + 2 + size + 2;
        while buf.len() < need {
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..need);
        if size == 0 {
            return Some(body);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// `Full<Bytes>`: one frame, exact size.
    OneFrame,
    /// 8 KiB frames, no size hint (sent chunked).
    Chunked,
}

fn body(payload: &Bytes, shape: Shape) -> BoxBody<Bytes, Infallible> {
    match shape {
        Shape::OneFrame => Full::new(payload.clone()).boxed(),
        Shape::Chunked => {
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = payload
                .chunks(8 * 1024)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            StreamBody::new(futures_util::stream::iter(frames)).boxed()
        }
    }
}

/// Sends a POST of `size` bytes with the stale token; returns the final status and what the
/// server saw.
async fn early_401(size: usize, shape: Shape) -> (StatusCode, Log) {
    let (addr, shared) = server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RefreshLayer::new(counting(&calls, FRESH))
        .initial_token(Token::bearer(STALE).unwrap())
        .replay_body_wait(Duration::from_millis(500));
    let client = client::<ReplayBody<BoxBody<Bytes, Infallible>>>();
    let svc = ServiceBuilder::new().layer(layer).service(client);
    let payload: Bytes = (0..size).map(|i| (i % 251) as u8).collect();
    let req = Request::post(format!("http://{addr}/upload"))
        .body(body(&payload, shape))
        .unwrap();

    let res = tokio::time::timeout(Duration::from_secs(10), svc.oneshot(req))
        .await
        .unwrap_or_else(|_| panic!("{size} bytes, {shape:?}: the caller hung"))
        .unwrap_or_else(|e| panic!("{size} bytes, {shape:?}: {e}"));
    let status = res.status();
    let _: Result<_, _> = res.into_body().collect().await.map(|b| b.to_bytes());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh");
    let log = looked_at(
        &shared,
        &payload,
        status,
        &format!("{size} bytes, {shape:?}"),
    )
    .await;
    (status, log)
}

/// Lets the server look at the refused connection, and checks what it saw against the
/// caller's `status`: a 200 was the replay of the whole `payload`, once; a 401 was never
/// replayed.
async fn looked_at(shared: &Shared, payload: &Bytes, status: StatusCode, case: &str) -> Log {
    // Let the server look at the refused connection.
    let looked = shared.looked.notified();
    shared.look.notify_one();
    tokio::time::timeout(Duration::from_secs(10), looked)
        .await
        .expect("the server looked at the refused connection");
    checked(shared, payload, status, case)
}

/// Checks what the server saw against the caller's `status`: a 200 was the replay of the
/// whole `payload`, once; a 401 was never replayed.
fn checked(shared: &Shared, payload: &Bytes, status: StatusCode, case: &str) -> Log {
    let size = payload.len();

    let log = std::mem::take(&mut *shared.log.lock().unwrap());
    assert_eq!(log.refused, 1, "{case}: one refusal");
    match status {
        StatusCode::OK => {
            assert_eq!(log.accepted.len(), 1, "{case}: replayed once");
            assert!(
                log.accepted[0] == *payload,
                "{case}: the replayed body differs ({} of {size} bytes)",
                log.accepted[0].len()
            );
        }
        StatusCode::UNAUTHORIZED => {
            assert!(log.accepted.is_empty(), "{case}");
        }
        other => panic!("{case}: unexpected {other}"),
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_401_16k_one_frame_is_replayed_without_hanging() {
    let (status, _) = early_401(16 * 1024, Shape::OneFrame).await;
    assert_eq!(status, StatusCode::OK);
}

/// The server stops reading a 900 KiB body: the replay (on another connection) gets the whole
/// body, and the first attempt's unsent rest is abandoned: the client closes that connection
/// before the end of the body instead of sending it all and keeping the connection for reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_401_900k_one_frame_is_replayed_and_the_first_send_abandoned() {
    let size = 900 * 1024;
    let (status, log) = early_401(size, Shape::OneFrame).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log.abandoned_at.len(), 1);
    let sent = log.abandoned_at[0].expect("the first send was abandoned, not completed");
    assert!(sent < size, "{sent} of {size} bytes sent before the close");
}

/// A chunked body small enough to be captured is replayed byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_401_16k_chunked_is_replayed_without_hanging() {
    let (status, _) = early_401(16 * 1024, Shape::Chunked).await;
    assert_eq!(status, StatusCode::OK);
}

/// A chunked body the server stops reading never finishes its first send: after
/// `replay_body_wait` the caller gets the 401 (no replay without the whole body), not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_401_900k_chunked_gives_the_401_without_hanging() {
    let (status, _) = early_401(900 * 1024, Shape::Chunked).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// The reference: plain hyper, no layer, gets the 401 of such a server (no hang either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_hyper_gets_the_early_401() {
    let (addr, shared) = server().await;
    let client = client::<Full<Bytes>>();
    let payload = Bytes::from(vec![7u8; 900 * 1024]);
    let req = Request::post(format!("http://{addr}/upload"))
        .header(AUTHORIZATION, format!("Bearer {STALE}"))
        .body(Full::new(payload))
        .unwrap();
    let res: hyper::Response<Incoming> =
        tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .expect("plain hyper hung")
            .expect("plain hyper failed");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(shared.log.lock().unwrap().refused, 1);
}

// ---------------------------------------------------------------------------------------------
// A first attempt that never lets go of its body (in memory, paused time).

type HeldBody = BoxBody<Bytes, Infallible>;

/// Sends a POST with `body` through the layer (stale token) to a mock that keeps the first
/// request, body included, and answers it 401. Returns the caller's status and whether a
/// replay reached the mock (answered 200).
async fn held_first_attempt(body: HeldBody) -> (StatusCode, bool) {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RefreshLayer::new(counting(&calls, FRESH))
        .initial_token(Token::bearer(STALE).unwrap())
        .replay_body_wait(Duration::from_millis(500));
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<ReplayBody<HeldBody>>, http::Response<Full<Bytes>>>();
    let svc = ServiceBuilder::new().layer(layer).service(mock);
    let call = tokio::spawn(svc.oneshot(Request::post("/orders").body(body).unwrap()));
    let (first, send) = handle.next_request().await.unwrap();
    let mut res = http::Response::new(Full::default());
    *res.status_mut() = StatusCode::UNAUTHORIZED;
    send.send_response(res);
    // The first request (and its body) stays alive here until the end.
    let replayed = match tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await {
        Ok(Some((replay, send))) => {
            assert!(replay.body().is_replay());
            send.send_response(http::Response::new(Full::default()));
            true
        }
        _ => false,
    };
    let status = call.await.unwrap().unwrap().status();
    drop(first);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh");
    (status, replayed)
}

/// A body that is one chunk in memory is its own replay: the replay does not wait for the
/// first attempt to let go of it.
#[tokio::test(start_paused = true)]
async fn an_in_memory_body_held_by_the_first_attempt_is_replayed_at_once() {
    let (status, replayed) = held_first_attempt_full().await;
    assert_eq!(status, StatusCode::OK);
    assert!(replayed);
}

async fn held_first_attempt_full() -> (StatusCode, bool) {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RefreshLayer::new(counting(&calls, FRESH))
        .initial_token(Token::bearer(STALE).unwrap())
        .replay_body_wait(Duration::from_millis(500));
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<ReplayBody<Full<Bytes>>>, http::Response<Full<Bytes>>>();
    let svc = ServiceBuilder::new().layer(layer).service(mock);
    let body = Full::new(Bytes::from_static(b"held"));
    let call = tokio::spawn(svc.oneshot(Request::post("/orders").body(body).unwrap()));
    let (first, send) = handle.next_request().await.unwrap();
    let mut res = http::Response::new(Full::default());
    *res.status_mut() = StatusCode::UNAUTHORIZED;
    send.send_response(res);
    let (replay, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("replayed without waiting for the first attempt")
        .unwrap();
    assert!(replay.body().is_replay());
    let body = replay.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"held");
    send.send_response(http::Response::new(Full::default()));
    let status = call.await.unwrap().unwrap().status();
    drop(first);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh");
    (status, true)
}

/// A captured (not in-memory) body the first attempt never lets go of: after
/// `replay_body_wait` the caller gets the 401, and nothing is sent twice.
#[tokio::test(start_paused = true)]
async fn a_captured_body_held_past_the_wait_is_not_replayed() {
    let body = Full::new(Bytes::from_static(b"held")).boxed();
    let (status, replayed) = held_first_attempt(body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!replayed, "sent once");
}

// ---------------------------------------------------------------------------------------------
// The same server, through the reqwest middleware (reqwest's own sockets: default buffers).

#[cfg(feature = "reqwest")]
mod through_reqwest {
    use super::*;

    /// How the body is handed to reqwest.
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        /// `reqwest::Body::from(Bytes)`: in memory, shared with the replay.
        InMemory,
        /// `Full<Bytes>` wrapped: a stream of known size (sent with `content-length`).
        KnownSize,
        /// 8 KiB frames with no size hint (sent chunked).
        Chunked,
    }

    /// Sends a POST of `size` bytes with the stale token through a reqwest client with the
    /// middleware (replaying bodies up to `cap` bytes) to a server that answers 401 early and
    /// then does `after` with the body; returns the final status and what the server saw.
    async fn early_401(
        size: usize,
        kind: Kind,
        cap: usize,
        after: AfterRefusal,
    ) -> (StatusCode, Log) {
        let (addr, shared) = serve(after).await;
        let calls = Arc::new(AtomicUsize::new(0));
        // A server that reads the rest lets the first send end: a long wait, which ends as
        // soon as it does. One that stalls: a short one, to keep the test quick.
        let wait = match after {
            AfterRefusal::Drain => Duration::from_secs(8),
            AfterRefusal::Stall => Duration::from_millis(500),
        };
        let layer = RefreshLayer::new(counting(&calls, FRESH))
            .initial_token(Token::bearer(STALE).unwrap())
            .max_replay_body(cap)
            .replay_body_wait(wait);
        let inner = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .unwrap();
        let client = reqwest_middleware::ClientBuilder::new(inner)
            .with(layer.reqwest_middleware())
            .build();
        let payload: Bytes = (0..size).map(|i| (i % 251) as u8).collect();
        let body = match kind {
            Kind::InMemory => reqwest::Body::from(payload.clone()),
            Kind::KnownSize => reqwest::Body::wrap(Full::new(payload.clone())),
            Kind::Chunked => reqwest::Body::wrap(body(&payload, Shape::Chunked)),
        };
        let case = format!("reqwest, {size} bytes, {kind:?}");
        let sent = client
            .post(format!("http://{addr}/upload"))
            .body(body)
            .send();
        let res = tokio::time::timeout(Duration::from_secs(30), sent)
            .await
            .unwrap_or_else(|_| panic!("{case}: the caller hung"))
            .unwrap_or_else(|e| panic!("{case}: {e:?}"));
        let status = res.status();
        tokio::time::timeout(Duration::from_secs(10), res.bytes())
            .await
            .unwrap_or_else(|_| panic!("{case}: the response body hung"))
            .unwrap_or_else(|e| panic!("{case}: {e:?}"));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{case}: one refresh");
        let log = match after {
            AfterRefusal::Stall => looked_at(&shared, &payload, status, &case).await,
            AfterRefusal::Drain => checked(&shared, &payload, status, &case),
        };
        (status, log)
    }

    const MIB: usize = 1024 * 1024;

    /// A server that answers 401 before the end of the body and then reads the rest: every
    /// kind of body is replayed whole, once, with the new token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_refused_before_its_end_is_replayed_whole() {
        for (size, kind) in [
            (900 * 1024, Kind::InMemory),
            (900 * 1024, Kind::KnownSize),
            (16 * 1024, Kind::Chunked),
            (900 * 1024, Kind::Chunked),
        ] {
            let (status, _) = early_401(size, kind, MIB, AfterRefusal::Drain).await;
            assert_eq!(status, StatusCode::OK, "{size} bytes, {kind:?}");
        }
    }

    /// A chunked body larger than the socket buffers hold, under the cap, that the server
    /// stops reading: its first send never ends, so after `replay_body_wait` the caller gets
    /// the 401 (no replay without the whole body), not a hang.
    ///
    /// (Smaller bodies to such a server are not tested here: reqwest's sockets take them
    /// whole, the connection goes back to reqwest's pool as idle, and the next request on it,
    /// the replay or any other, waits behind bytes the server never reads: plain reqwest's
    /// next request to that server hangs the same way.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunked_body_the_server_stops_reading_gives_the_401_without_hanging() {
        // Six times Linux's default largest send buffer (`net.ipv4.tcp_wmem`, 4 MiB).
        let (status, _) = early_401(24 * MIB, Kind::Chunked, 32 * MIB, AfterRefusal::Stall).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}
