//! The README's demo: 100 concurrent requests on an expired token, one refresh, every request
//! answered.
//!
//! It starts two servers on 127.0.0.1, on ports the OS picks:
//!
//! - an **API server** that accepts only the access token the token server issued last, and
//!   answers `401` with `WWW-Authenticate: Bearer error="invalid_token"` to anything else;
//! - a **token server**: `POST /token` issues a new access token (and the old ones stop
//!   working).
//!
//! The client is a `hyper-util` client behind [`RefreshLayer`]. Its refresher is a closure that
//! POSTs to the token server with a plain `hyper-util` client. The layer starts with a token
//! the API server has already expired, then 100 requests are fired at once: those sent before
//! the first refusal comes back are refused, the layer refreshes **once** and replays each of
//! them **once** with the new token; those that come later wait for it instead of sending the
//! refused token (how many of each depends on timing).
//!
//! Run it with:
//!
//! ```sh
//! cargo run --example demo
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::{BoxError, RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

const REQUESTS: usize = 100;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // --- The servers -------------------------------------------------------------------------
    // The one access token the API accepts right now; the client's token is not it.
    let current = Arc::new(Mutex::new(String::from("access-1")));
    let issued = Arc::new(AtomicUsize::new(1));
    let api_401s = Arc::new(AtomicUsize::new(0));
    let api_200s = Arc::new(AtomicUsize::new(0));

    let api = serve({
        let (current, api_401s, api_200s) = (current.clone(), api_401s.clone(), api_200s.clone());
        move |req: Request<Incoming>| {
            let expected = format!("Bearer {}", current.lock().unwrap());
            let ok = req
                .headers()
                .get(AUTHORIZATION)
                .is_some_and(|v| v == expected.as_str());
            let (api_401s, api_200s) = (api_401s.clone(), api_200s.clone());
            async move {
                if ok {
                    api_200s.fetch_add(1, Ordering::SeqCst);
                    Response::new(Full::new(Bytes::from(format!(
                        "hello from {}",
                        req.uri().path()
                    ))))
                } else {
                    api_401s.fetch_add(1, Ordering::SeqCst);
                    let mut res = Response::new(Full::new(Bytes::new()));
                    *res.status_mut() = StatusCode::UNAUTHORIZED;
                    res.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static(r#"Bearer realm="demo", error="invalid_token""#),
                    );
                    res
                }
            }
        }
    })
    .await;

    let token_server = serve({
        let (current, issued) = (current.clone(), issued.clone());
        move |req: Request<Incoming>| {
            let (current, issued) = (current.clone(), issued.clone());
            async move {
                if req.method() != http::Method::POST || req.uri().path() != "/token" {
                    let mut res = Response::new(Full::new(Bytes::new()));
                    *res.status_mut() = StatusCode::NOT_FOUND;
                    return res;
                }
                // Pretend the identity provider takes a moment, so the 401s pile up.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                let token = format!("access-{n}");
                *current.lock().unwrap() = token.clone();
                Response::new(Full::new(Bytes::from(token)))
            }
        }
    })
    .await;

    // --- The client --------------------------------------------------------------------------
    // The refresher: a closure that POSTs to the token server with a plain hyper-util client.
    let refreshes = Arc::new(AtomicUsize::new(0));
    let token_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let refresher = refresh_fn({
        let refreshes = refreshes.clone();
        move |_stale: Option<Token>| {
            refreshes.fetch_add(1, Ordering::SeqCst);
            let token_client = token_client.clone();
            async move {
                let req = Request::post(format!("http://{token_server}/token"))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from_static(b"grant_type=refresh_token")))
                    .expect("a valid request");
                // Network errors are worth retrying; `RefreshError::from_status` below says
                // which statuses are (a 400, 401, 403 or 422 is final; a 429 or 5xx is not).
                let res = token_client
                    .request(req)
                    .await
                    .map_err(RefreshError::transient)?;
                if !res.status().is_success() {
                    return Err(RefreshError::from_status(res.status()));
                }
                let body = res
                    .into_body()
                    .collect()
                    .await
                    .map_err(RefreshError::transient)?;
                let secret =
                    String::from_utf8(body.to_bytes().to_vec()).map_err(RefreshError::transient)?;
                Ok(Token::bearer(secret)?.with_expires_in(Duration::from_secs(3600)))
            }
        }
    });

    // The layer starts with a token the API server has already expired.
    let layer = RefreshLayer::new(refresher).initial_token(Token::bearer("access-0")?);
    let handle = layer.token_handle();

    // Count what the layer sends: first attempts and replays.
    let sent_by_layer = Arc::new(AtomicUsize::new(0));
    let replays = Arc::new(AtomicUsize::new(0));
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .map_request({
            let (sent_by_layer, replays) = (sent_by_layer.clone(), replays.clone());
            move |req: Request<ReplayBody<Full<Bytes>>>| {
                sent_by_layer.fetch_add(1, Ordering::SeqCst);
                if req.body().is_replay() {
                    replays.fetch_add(1, Ordering::SeqCst);
                }
                req
            }
        })
        .service(client);

    // --- 100 concurrent requests -------------------------------------------------------------
    println!("API server:   http://{api} (accepts only the token issued last)");
    println!("token server: http://{token_server}/token");
    println!("firing {REQUESTS} concurrent requests with an expired token...\n");

    let mut tasks = JoinSet::new();
    for i in 0..REQUESTS {
        let svc = svc.clone();
        tasks.spawn(async move {
            let req = Request::post(format!("http://{api}/orders/{i}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!(r#"{{"order":{i}}}"#))))?;
            let res = svc.oneshot(req).await?;
            let ok = res.status().is_success();
            res.into_body().collect().await?;
            Ok::<_, BoxError>(ok)
        });
    }
    let mut succeeded = 0;
    let mut failed = 0;
    while let Some(outcome) = tasks.join_next().await {
        match outcome? {
            Ok(true) => succeeded += 1,
            Ok(false) => failed += 1,
            Err(err) => {
                // The layer's failures are typed (`tower_auth_refresh::error`): say which.
                if failed == 0 {
                    eprintln!("first failure: {err}");
                }
                failed += 1;
            }
        }
    }

    let refreshes = refreshes.load(Ordering::SeqCst);
    println!("requests sent:              {REQUESTS}");
    println!("succeeded:                  {succeeded}");
    println!("failed:                     {failed}");
    println!(
        "401s seen by the API:       {}",
        api_401s.load(Ordering::SeqCst)
    );
    println!(
        "200s sent by the API:       {}",
        api_200s.load(Ordering::SeqCst)
    );
    println!(
        "sent by the layer:          {} ({REQUESTS} first attempts + replays)",
        sent_by_layer.load(Ordering::SeqCst)
    );
    println!(
        "replays:                    {}",
        replays.load(Ordering::SeqCst)
    );
    println!("refreshes made:             {refreshes}");
    println!(
        "token generation:           {} (1 initial token + {refreshes} refresh)",
        handle.state().generation()
    );

    assert_eq!(succeeded, REQUESTS, "every request succeeds");
    assert_eq!(refreshes, 1, "one refresh for all 100 401s");
    Ok(())
}

/// Serves `handler` on 127.0.0.1, an ephemeral port, one task per connection.
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a bound address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}
