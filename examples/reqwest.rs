//! A reqwest-only application: the reqwest-middleware adapter, with the built-in OAuth 2.0
//! refresher sending its token requests with a `reqwest::Client` too (no hyper-util
//! client, no glue). Two loopback servers: a token endpoint (refresh-token grant with
//! rotation) and an API that has just revoked the client's access token. A stampede of
//! concurrent requests: those sent before the first refusal came back are refused, the token
//! is refreshed once and each of them is replayed once; those sent later wait for the new
//! token (how many of each depends on timing).
//!
//! Run with `cargo run --example reqwest --features reqwest`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher};
use tower_auth_refresh::{RefreshLayer, Token};

const GETS: usize = 200;
const POSTS: usize = 20;

/// Serves `handler` on `127.0.0.1:0` until the runtime shuts down.
async fn serve<F, Fut>(handler: F) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
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
    Ok(addr)
}

#[derive(Default)]
struct Figures {
    token_calls: AtomicUsize,
    refused: AtomicUsize,
    served: AtomicUsize,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The one access token the API accepts; none yet: the client's token was revoked.
    let valid: Arc<Mutex<Option<String>>> = Arc::default();
    let figures = Arc::new(Figures::default());

    // The token endpoint: the refresh-token grant (RFC 6749 §6) for client "app", rotating the
    // refresh token on every call; it tells the API about each new access token.
    let current_refresh = Arc::new(Mutex::new(String::from("refresh-0")));
    let idp = serve({
        let (valid, figures) = (valid.clone(), figures.clone());
        move |req: Request<Incoming>| {
            let (valid, figures, current_refresh) =
                (valid.clone(), figures.clone(), current_refresh.clone());
            async move {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let form: Vec<(String, String)> = body
                    .map(|b| form_urlencoded::parse(&b).into_owned().collect())
                    .unwrap_or_default();
                let field = |name: &str| {
                    form.iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                };
                // A token endpoint takes a moment: requests pile up behind the refresh.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut current = current_refresh.lock().unwrap();
                if field("grant_type").as_deref() != Some("refresh_token")
                    || field("refresh_token").as_deref() != Some(current.as_str())
                {
                    let mut res = Response::new(Full::new(Bytes::from_static(
                        br#"{"error":"invalid_grant"}"#,
                    )));
                    *res.status_mut() = StatusCode::BAD_REQUEST;
                    return res;
                }
                let n = figures.token_calls.fetch_add(1, Ordering::SeqCst) + 1;
                let access = format!("access-{n}");
                *current = format!("refresh-{n}");
                *valid.lock().unwrap() = Some(access.clone());
                let body = format!(
                    r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600,"refresh_token":"{}"}}"#,
                    current
                );
                let mut res = Response::new(Full::new(Bytes::from(body)));
                res.headers_mut()
                    .insert(CONTENT_TYPE, "application/json".parse().unwrap());
                res
            }
        }
    })
    .await?;

    // The API: 200 with the valid token, 401 `invalid_token` otherwise.
    let api = serve({
        let (valid, figures) = (valid.clone(), figures.clone());
        move |req: Request<Incoming>| {
            let expected = valid
                .lock()
                .unwrap()
                .as_ref()
                .map(|t| format!("Bearer {t}"));
            let ok =
                expected.is_some_and(|e| req.headers().get(AUTHORIZATION).is_some_and(|v| v == &e));
            let figures = figures.clone();
            async move {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if ok {
                    figures.served.fetch_add(1, Ordering::SeqCst);
                    Response::new(Full::new(body))
                } else {
                    figures.refused.fetch_add(1, Ordering::SeqCst);
                    let mut res = Response::new(Full::default());
                    *res.status_mut() = StatusCode::UNAUTHORIZED;
                    res.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        r#"Bearer error="invalid_token""#.parse().unwrap(),
                    );
                    res
                }
            }
        }
    })
    .await?;

    let http = reqwest::Client::builder().no_proxy().build()?;

    // The OAuth 2.0 refresher sends token requests with a plain reqwest client (not the
    // middleware client: a token request must not wait on the refresh it is part of), one
    // that never follows redirects: a token request carries the refresh token and the client
    // secret, and goes to the token endpoint only.
    let token_http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let refresher =
        OAuth2Refresher::with_reqwest(format!("http://{idp}/token").parse()?, token_http)
            .client_id("app")
            .client_secret("app-secret", ClientAuth::Basic)
            .build()?;
    // The login gave an access token (revoked since) and a refresh token: one token set.
    let layer = RefreshLayer::new(refresher.clone())
        .initial_token(Token::bearer("access-0")?.with_refresh_token("refresh-0"));
    let handle = layer.token_handle();
    let client = reqwest_middleware::ClientBuilder::new(http)
        .with(layer.reqwest_middleware())
        .build();

    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..GETS + POSTS {
        let client = client.clone();
        let url = format!("http://{api}/items/{i}");
        tasks.spawn(async move {
            let req = if i < GETS {
                client.get(url)
            } else {
                client.post(url).body(format!(r#"{{"item":{i}}}"#))
            };
            req.send().await.map(|res| res.status())
        });
    }
    let mut ok = 0;
    while let Some(joined) = tasks.join_next().await {
        if joined?? == StatusCode::OK {
            ok += 1;
        }
    }
    let elapsed = started.elapsed();

    let total = GETS + POSTS;
    println!("stampede: {GETS} GETs + {POSTS} POSTs, all at once, with a revoked token");
    println!(
        "  succeeded:            {ok}/{total} in {} ms",
        elapsed.as_millis()
    );
    println!(
        "  token endpoint calls: {}",
        figures.token_calls.load(Ordering::SeqCst)
    );
    println!(
        "  API answers:          {} x 401 (old token), {} x 200 (new token)",
        figures.refused.load(Ordering::SeqCst),
        figures.served.load(Ordering::SeqCst)
    );
    let state = handle.state();
    println!(
        "  token generation:     {} (expires in {} s)",
        state.generation(),
        state.expires_in().unwrap_or_default().as_secs()
    );
    println!(
        "  refresher's refresh token is the rotated one: {}",
        refresher
            .refresh_token()
            .is_some_and(|t| t.secret() == "refresh-1")
    );
    Ok(())
}
