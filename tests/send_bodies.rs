//! The usual request body types work behind the layer inside a `Send` future handed to
//! `tokio::spawn`, through `Refresh::request` (a compile test: it fails to build if a body
//! type cannot be used so; through `ServiceExt::oneshot` rustc rejects the boxed bodies with
//! "implementation of `Service` is not general enough", as it does for a bare hyper-util
//! client).

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_auth_refresh::{BoxError, RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

use support::guard;

fn layer() -> RefreshLayer {
    RefreshLayer::new(refresh_fn(|_| async {
        Ok::<_, RefreshError>(Token::bearer("t")?)
    }))
    .initial_token(Token::bearer("t").unwrap())
}

fn client<B>() -> Client<HttpConnector, ReplayBody<B>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// A loopback listener on port 0 that accepts each connection and closes it at once, so every
/// request sent to it fails with a transport error. It stops after 64 connections (then its
/// port refuses them, which fails the same way).
async fn closing_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..64 {
            match listener.accept().await {
                Ok((stream, _)) => drop(stream),
                Err(_) => break,
            }
        }
    });
    addr
}

macro_rules! spawn_with_body {
    ($addr:expr, $body_ty:ty, $make:expr) => {{
        let svc = ServiceBuilder::new()
            .layer(layer())
            .service(client::<$body_ty>());
        let body: $body_ty = $make;
        // The server closes every connection: the call fails fast; only that it compiles and
        // runs matters.
        let req = Request::get(format!("http://{}/", $addr))
            .body(body)
            .unwrap();
        tokio::spawn(async move { svc.request(req).await.map(|res| res.status()) })
            .await
            .expect("the task ran")
            .expect_err("the server closes the connection without answering");
    }};
}

#[tokio::test]
async fn common_body_types_work_inside_a_spawned_task() {
    guard(async {
        let addr = closing_listener().await;
        spawn_with_body!(addr, Full<Bytes>, Full::new(Bytes::from_static(b"x")));
        spawn_with_body!(addr, String, String::from("x"));
        spawn_with_body!(
            addr,
            BoxBody<Bytes, BoxError>,
            Full::new(Bytes::from_static(b"x")).map_err(Into::into).boxed()
        );
        spawn_with_body!(
            addr,
            UnsyncBoxBody<Bytes, BoxError>,
            Full::new(Bytes::from_static(b"x"))
                .map_err(Into::into)
                .boxed_unsync()
        );
    })
    .await;
}
