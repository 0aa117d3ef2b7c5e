//! gRPC for real: a tonic client through the refresh layer, over a real HTTP/2 connection, to a
//! loopback gRPC server that refuses the stale token with UNAUTHENTICATED (as a tonic
//! interceptor does: a trailers-only response, HTTP 200 with `grpc-status: 16`, sent before
//! the request message is read).
//!
//! No protobuf code generation: messages are raw bytes (a hand-written codec); the framing,
//! the client (`tonic::client::Grpc`) and the server's request handling
//! (`tonic::server::Grpc::unary`) are tonic's, over hyper's HTTP/2.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tower::ServiceBuilder;
use tower_auth_refresh::{Refresh, RefreshLayer, ReplayBody, Token};

use support::counting;

const STALE: &str = "stale-grpc-31f7";
const FRESH: &str = "fresh-grpc-8a2e";
const CALLS: usize = 100;

/// A codec for messages that are raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
struct RawCoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCoder;
    type Decoder = RawCoder;

    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }

    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

impl Encoder for RawCoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What the server saw.
#[derive(Default)]
struct Seen {
    /// Calls refused with UNAUTHENTICATED.
    refused: usize,
    /// The message of every accepted call, by call id, as received.
    accepted: BTreeMap<u64, Vec<Bytes>>,
}

/// The echo service behind the token check: answers each message with itself.
#[derive(Clone)]
struct Echo {
    seen: Arc<Mutex<Seen>>,
}

impl tower::Service<tonic::Request<Bytes>> for Echo {
    type Response = tonic::Response<Bytes>;
    type Error = Status;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let msg = req.into_inner();
        let id = call_id(&msg);
        self.seen
            .lock()
            .unwrap()
            .accepted
            .entry(id)
            .or_default()
            .push(msg.clone());
        std::future::ready(Ok(tonic::Response::new(msg)))
    }
}

/// The call id carried in the first 8 bytes of a message.
fn call_id(msg: &[u8]) -> u64 {
    u64::from_be_bytes(msg[..8].try_into().expect("an 8-byte call id"))
}

/// The message of call `i`: its id, then `i * 37 % 2000` bytes of a pattern of its own.
fn message(i: usize) -> Bytes {
    let mut msg = (i as u64).to_be_bytes().to_vec();
    msg.extend((0..(i * 37) % 2000).map(|j| ((i * 7 + j) % 251) as u8));
    Bytes::from(msg)
}

/// A gRPC server over HTTP/2 on `127.0.0.1:0`: refuses calls without the fresh token (before
/// reading them, as an interceptor does), echoes the others with `tonic::server::Grpc`.
async fn grpc_server() -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = state.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let fresh = req
                        .headers()
                        .get(http::header::AUTHORIZATION)
                        .is_some_and(|v| v.as_bytes() == format!("Bearer {FRESH}").as_bytes());
                    if !fresh {
                        seen.lock().unwrap().refused += 1;
                        return Ok::<_, Infallible>(
                            Status::unauthenticated("token expired").into_http(),
                        );
                    }
                    let res = tonic::server::Grpc::new(RawCodec)
                        .unary(Echo { seen }, req)
                        .await;
                    Ok(res)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A tonic client for the server at `addr`, through `layer`, over a hyper-util HTTP/2 client.
fn grpc_client(
    layer: RefreshLayer,
    addr: SocketAddr,
) -> tonic::client::Grpc<Refresh<Client<HttpConnector, ReplayBody<tonic::body::Body>>>> {
    let http2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let channel = ServiceBuilder::new().layer(layer).service(http2);
    let origin: Uri = format!("http://{addr}").parse().unwrap();
    tonic::client::Grpc::with_origin(channel, origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_unary_calls_refresh_once_and_replay_each_message_byte_for_byte() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (addr, seen) = grpc_server().await;
        let refreshes = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting(&refreshes, FRESH))
            .initial_token(Token::bearer(STALE).unwrap());
        let client = grpc_client(layer, addr);

        let mut calls = tokio::task::JoinSet::new();
        for i in 0..CALLS {
            let mut client = client.clone();
            calls.spawn(async move {
                client.ready().await.expect("ready");
                let res = client
                    .unary(
                        tonic::Request::new(message(i)),
                        PathAndQuery::from_static("/test.Echo/Call"),
                        RawCodec,
                    )
                    .await;
                (i, res)
            });
        }
        while let Some(joined) = calls.join_next().await {
            let (i, res) = joined.unwrap();
            let res = res.unwrap_or_else(|status| panic!("call {i}: {status:?}"));
            assert!(res.into_inner() == message(i), "call {i}: the echo differs");
        }

        assert_eq!(refreshes.load(Ordering::SeqCst), 1, "one refresh for all");
        let seen = seen.lock().unwrap();
        assert!(
            seen.refused >= 1 && seen.refused <= CALLS,
            "{}",
            seen.refused
        );
        assert_eq!(seen.accepted.len(), CALLS, "every call accepted");
        for (id, msgs) in &seen.accepted {
            assert_eq!(msgs.len(), 1, "call {id} accepted once");
            assert!(
                msgs[0] == message(*id as usize),
                "call {id}: the replayed message differs"
            );
        }
    })
    .await
    .expect("no hang");
}

/// UNAUTHENTICATED with an `insufficient_scope` Bearer challenge is not fixed by a new token:
/// no refresh, no replay, the caller gets the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_for_insufficient_scope_is_returned_as_is() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let count = count.clone();
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let mut res: Response<tonic::body::Body> =
                        Status::unauthenticated("scope").into_http();
                    res.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static(r#"Bearer error="insufficient_scope""#),
                    );
                    std::future::ready(Ok::<_, Infallible>(res))
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let refreshes = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting(&refreshes, FRESH))
            .initial_token(Token::bearer(STALE).unwrap());
        let mut client = grpc_client(layer, addr);
        client.ready().await.unwrap();
        let status = client
            .unary::<Bytes, Bytes, _>(
                tonic::Request::new(message(1)),
                PathAndQuery::from_static("/test.Echo/Call"),
                RawCodec,
            )
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(refreshes.load(Ordering::SeqCst), 0, "no refresh");
        assert_eq!(served.load(Ordering::SeqCst), 1, "no replay");
    })
    .await
    .expect("no hang");
}

/// A call refused again after the refresh (the server refuses the new token too). By
/// default tonic reports the layer's error as `Code::Unknown` (it maps only its own kinds of
/// errors), with a message that names the gRPC refusal, and the typed
/// `UnauthorizedAfterRefresh` as the status's source. With `unauthorized_as_response(true)`
/// the server's own `UNAUTHENTICATED` reaches the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_refused_again_after_the_refresh_as_tonic_reports_it() {
    use tower_auth_refresh::error::UnauthorizedAfterRefresh;

    tokio::time::timeout(Duration::from_secs(30), async {
        let (addr, seen) = grpc_server().await;
        for as_response in [false, true] {
            let refreshes = Arc::new(AtomicUsize::new(0));
            // The refresher's token is refused as well.
            let layer = RefreshLayer::new(counting(&refreshes, "refused-too-5d1c"))
                .initial_token(Token::bearer(STALE).unwrap())
                .unauthorized_as_response(as_response);
            let mut client = grpc_client(layer, addr);
            client.ready().await.unwrap();
            let refused_before = seen.lock().unwrap().refused;
            let status = client
                .unary::<Bytes, Bytes, _>(
                    tonic::Request::new(message(1)),
                    PathAndQuery::from_static("/test.Echo/Call"),
                    RawCodec,
                )
                .await
                .expect_err("refused");
            assert_eq!(refreshes.load(Ordering::SeqCst), 1, "one refresh");
            assert_eq!(
                seen.lock().unwrap().refused - refused_before,
                2,
                "sent, then replayed once"
            );
            if as_response {
                assert_eq!(status.code(), Code::Unauthenticated);
                assert_eq!(status.message(), "token expired");
            } else {
                assert_eq!(status.code(), Code::Unknown);
                assert!(
                    status
                        .message()
                        .contains("gRPC status 16 (UNAUTHENTICATED)"),
                    "{}",
                    status.message()
                );
                let source = std::error::Error::source(&status).expect("the layer's error");
                assert!(
                    source.downcast_ref::<UnauthorizedAfterRefresh>().is_some(),
                    "{source:?}"
                );
            }
        }
    })
    .await
    .expect("no hang");
}
