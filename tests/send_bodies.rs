//! The usual request body types work behind the layer inside a `Send` future handed to
//! `tokio::spawn`, through `Refresh::request` (a compile test: it fails to build if a body
//! type cannot be used so; through `ServiceExt::oneshot` rustc rejects the boxed bodies with
//! "implementation of `Service` is not general enough", as it does for a bare hyper-util
//! client).

use bytes::Bytes;
use http::Request;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::ServiceBuilder;
use tower_auth_refresh::{BoxError, RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

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

macro_rules! spawn_with_body {
    ($body_ty:ty, $make:expr) => {{
        let svc = ServiceBuilder::new()
            .layer(layer())
            .service(client::<$body_ty>());
        let body: $body_ty = $make;
        // Closed port on loopback: the call fails fast; only that it compiles and runs matters.
        let req = Request::get("http://127.0.0.1:9/").body(body).unwrap();
        tokio::spawn(async move { svc.request(req).await.map(|res| res.status()) })
            .await
            .expect("the task ran")
            .expect_err("nothing listens on port 9");
    }};
}

#[tokio::test]
async fn common_body_types_work_inside_a_spawned_task() {
    spawn_with_body!(Full<Bytes>, Full::new(Bytes::from_static(b"x")));
    spawn_with_body!(String, String::from("x"));
    spawn_with_body!(
        BoxBody<Bytes, BoxError>,
        Full::new(Bytes::from_static(b"x")).map_err(Into::into).boxed()
    );
    spawn_with_body!(
        UnsyncBoxBody<Bytes, BoxError>,
        Full::new(Bytes::from_static(b"x"))
            .map_err(Into::into)
            .boxed_unsync()
    );
}
