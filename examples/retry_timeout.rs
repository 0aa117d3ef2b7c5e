//! `RefreshLayer` composed with `tower::retry` and `tower::timeout`, in the recommended order.
//!
//! ```text
//! Retry (5xx and transport errors; never auth failures)
//!   Timeout (each try of the call: the send, a refresh and the replay; 2 s)
//!     RefreshLayer
//!       Timeout (each attempt, 1 s)
//!         hyper-util client
//! ```
//!
//! Starts a loopback API that answers the first request with 503 and then only accepts the
//! current token, and a slow token issuer (300 ms). Run it with:
//!
//! ```sh
//! cargo run --example retry_timeout
//! ```

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::retry::{Policy, RetryLayer};
use tower::timeout::TimeoutLayer;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_auth_refresh::error::is_auth_failure;
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

type Body = Full<Bytes>;

/// Retries server errors and transport errors, at most `self.0` more times; never the layer's
/// authentication failures, which a retry cannot fix.
#[derive(Clone)]
struct RetryServerErrors(usize);

impl<Res> Policy<Request<Body>, Response<Res>, BoxError> for RetryServerErrors {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut Request<Body>,
        result: &mut Result<Response<Res>, BoxError>,
    ) -> Option<Self::Future> {
        let retryable = match result {
            Ok(res) => res.status().is_server_error(),
            Err(err) => !is_auth_failure(&**err),
        };
        if !retryable || self.0 == 0 {
            return None;
        }
        self.0 -= 1;
        Some(tokio::time::sleep(Duration::from_millis(50)))
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let current = Arc::new(Mutex::new(String::from("nobody-has-this")));
    let hits = Arc::new(AtomicUsize::new(0));

    // The API: 503 once, then 200 for the current token, 401 otherwise.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (api_current, api_hits) = (current.clone(), hits.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (current, hits) = (api_current.clone(), api_hits.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    let expected = format!("Bearer {}", current.lock().unwrap());
                    let status = if n == 0 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else if req
                        .headers()
                        .get("authorization")
                        .is_some_and(|v| *v == expected)
                    {
                        StatusCode::OK
                    } else {
                        StatusCode::UNAUTHORIZED
                    };
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Body::default())
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    // A slow token issuer.
    let refreshes = Arc::new(AtomicUsize::new(0));
    let refresher = {
        let (current, refreshes) = (current.clone(), refreshes.clone());
        refresh_fn(move |_stale| {
            let n = refreshes.fetch_add(1, Ordering::SeqCst) + 1;
            let current = current.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let secret = format!("access-{n}");
                *current.lock().unwrap() = secret.clone();
                Ok::<_, RefreshError>(Token::bearer(secret)?)
            }
        })
    };

    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Body>>();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryServerErrors(2)))
        .layer(TimeoutLayer::new(Duration::from_secs(2)))
        .layer(RefreshLayer::new(refresher).initial_token(Token::bearer("expired")?))
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(client);

    let mut ok = 0;
    for i in 0..5 {
        let req = Request::get(format!("http://{addr}/items/{i}")).body(Body::default())?;
        let res = svc.clone().oneshot(req).await?;
        println!("request {i}: {}", res.status());
        ok += usize::from(res.status() == StatusCode::OK);
    }
    println!(
        "sent 5, succeeded {ok}, API saw {} requests (one 503 retried, one 401 replayed), refreshes {}",
        hits.load(Ordering::SeqCst),
        refreshes.load(Ordering::SeqCst)
    );
    assert_eq!(ok, 5);
    Ok(())
}
