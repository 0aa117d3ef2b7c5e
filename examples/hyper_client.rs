//! A `hyper-util` client behind the refresh layer, with `tower-http` tracing: one request goes
//! out with an expired token, is refused with `401`, and is replayed once with a new token.
//!
//! The stack, from the caller inwards:
//!
//! 1. `TraceLayer` (tower-http): one span per call, as the application sees it. The 401 and the
//!    replay happen inside it, so it logs one request and one `200`.
//! 2. [`RefreshLayer`]: attaches the token, refreshes on `401`, replays once.
//! 3. `SetSensitiveRequestHeadersLayer` (tower-http) for `Authorization`. The layer already
//!    marks the header it sets as sensitive; this keeps any other `Authorization` value the
//!    stack sees redacted too.
//! 4. A second `TraceLayer`, with request headers in its span: one span per attempt on the
//!    wire, where `authorization` shows as `Sensitive`, never as the token.
//! 5. The `hyper-util` legacy client.
//!
//! It starts its own API server on 127.0.0.1 (an ephemeral port). Run it with:
//!
//! ```sh
//! cargo run --example hyper_client
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{BoxError, RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnRequest, DefaultOnResponse, TraceLayer};
use tracing::Level;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            // INFO: the layer's DEBUG lines (refresh, replay) stay out; the summary below says
            // what happened.
            .with_max_level(Level::INFO)
            .finish(),
    )?;

    // An API server that accepts only "Bearer new-token".
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_hits = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let hits = server_hits.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                hits.fetch_add(1, Ordering::SeqCst);
                let ok = req
                    .headers()
                    .get(AUTHORIZATION)
                    .is_some_and(|v| v == "Bearer new-token");
                async move {
                    let mut res = Response::new(Full::new(Bytes::new()));
                    if ok {
                        *res.body_mut() = Full::new(Bytes::from_static(br#"{"user":"demo"}"#));
                    } else {
                        *res.status_mut() = StatusCode::UNAUTHORIZED;
                        res.headers_mut().insert(
                            WWW_AUTHENTICATE,
                            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                        );
                    }
                    Ok::<_, Infallible>(res)
                }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    // A refresher that hands out the new token (ask your identity provider here).
    let refresher = refresh_fn(|_stale: Option<Token>| async {
        Ok::<_, RefreshError>(Token::bearer("new-token")?)
    });
    let layer = RefreshLayer::new(refresher).initial_token(Token::bearer("expired-token")?);

    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    // tower-http traces at DEBUG by default; at INFO here, so that its lines show next to the
    // summary while the layer's own DEBUG lines stay out.
    let on_request = DefaultOnRequest::new().level(Level::INFO);
    let on_response = DefaultOnResponse::new().level(Level::INFO);
    let svc = ServiceBuilder::new()
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_request(on_request.clone())
                .on_response(on_response.clone()),
        )
        .layer(layer)
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(
                    DefaultMakeSpan::new()
                        .level(Level::INFO)
                        .include_headers(true),
                )
                .on_request(on_request)
                .on_response(on_response),
        )
        .service(client);

    let req = Request::get(format!("http://{addr}/me")).body(Full::new(Bytes::new()))?;
    let res = svc.oneshot(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();

    println!();
    println!("status:                    {status}");
    println!(
        "body:                      {}",
        String::from_utf8_lossy(&body)
    );
    println!(
        "requests seen by the API:  {} (the 401 and the replay)",
        hits.load(Ordering::SeqCst)
    );
    Ok(())
}
