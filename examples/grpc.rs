//! A tonic gRPC client through the refresh layer, against a loopback gRPC server (HTTP/2) that
//! answers an expired token with UNAUTHENTICATED (`grpc-status: 16` in a trailers-only
//! response, never HTTP 401). 100 concurrent unary calls start with a stale token: one
//! refresh; the calls sent before the first refusal came back are replayed once, those sent
//! later wait for the new token (how many of each depends on timing); every call is answered.
//!
//! Messages are raw bytes (a hand-written codec, no protobuf code generation).
//!
//! ```sh
//! cargo run --example grpc
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use http::Request;
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tower::ServiceBuilder;
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

/// Messages as raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// An echo service for the server.
#[derive(Clone)]
struct Echo;

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
        std::future::ready(Ok(tonic::Response::new(req.into_inner())))
    }
}

#[tokio::main]
async fn main() -> Result<(), tower_auth_refresh::BoxError> {
    // The server: refuses any token but "fresh" before reading the call, as an interceptor.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let refused = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let (r, s) = (refused.clone(), served.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (r, s) = (r.clone(), s.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (r, s) = (r.clone(), s.clone());
                async move {
                    if req.headers().get("authorization").map(|v| v.as_bytes())
                        != Some(b"Bearer fresh")
                    {
                        r.fetch_add(1, Ordering::SeqCst);
                        return Ok::<_, Infallible>(
                            Status::unauthenticated("token expired").into_http(),
                        );
                    }
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok(tonic::server::Grpc::new(RawCodec).unary(Echo, req).await)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    // The client: tonic over hyper's HTTP/2 client, wrapped in the refresh layer.
    let refreshes = Arc::new(AtomicUsize::new(0));
    let counter = refreshes.clone();
    let layer = RefreshLayer::new(refresh_fn(move |_stale| {
        counter.fetch_add(1, Ordering::SeqCst);
        async {
            // A token endpoint would be called here.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, RefreshError>(Token::bearer("fresh")?)
        }
    }))
    .initial_token(Token::bearer("stale")?);
    let http2: Client<HttpConnector, ReplayBody<tonic::body::Body>> =
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let channel = ServiceBuilder::new().layer(layer).service(http2);
    let client = tonic::client::Grpc::with_origin(channel, format!("http://{addr}").parse()?);

    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..100u32 {
        let mut client = client.clone();
        calls.spawn(async move {
            let msg = Bytes::from(format!("message {i}: {}", "x".repeat(i as usize)));
            client
                .ready()
                .await
                .map_err(|e| Status::unknown(e.to_string()))?;
            let res = client
                .unary(
                    tonic::Request::new(msg.clone()),
                    PathAndQuery::from_static("/example.Echo/Call"),
                    RawCodec,
                )
                .await?;
            Ok::<bool, Status>(res.into_inner() == msg)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(joined) = calls.join_next().await {
        match joined? {
            Ok(true) => ok += 1,
            Ok(false) => failed += 1,
            Err(status) => {
                if failed == 0 {
                    eprintln!("first failed call: {status}");
                }
                failed += 1;
            }
        }
    }
    println!(
        "100 unary calls in {:?}: {ok} echoed byte for byte, {failed} failed; \
         {} refresh(es); server refused {} call(s) with UNAUTHENTICATED and served {}",
        started.elapsed(),
        refreshes.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
        served.load(Ordering::SeqCst),
    );
    if failed > 0 || refreshes.load(Ordering::SeqCst) != 1 {
        return Err("unexpected outcome".into());
    }
    Ok(())
}
