//! A closure refresher that mints short-lived tokens, and the [`TokenHandle`]: token events,
//! a forced refresh, and a logout that ends the session.
//!
//! A loopback API server (127.0.0.1, an ephemeral port) accepts a token only until it
//! expires. The refresher is a plain closure that issues `tok-N`, valid for 600 ms, and tells
//! the server about it (think of an identity provider the API trusts). The example then:
//!
//! 1. sends a request with no token yet: the layer refreshes first (no 401 on the wire);
//! 2. waits for the token to expire and sends again: the layer sees the expiry on its own
//!    clock and refreshes before sending (still no 401);
//! 3. forces a refresh through the handle;
//! 4. logs out with `clear()`: the next request fails with `SessionEnded`, without a network
//!    call;
//! 5. logs back in with `set_token()`.
//!
//! Every [`RefreshEvent`](tower_auth_refresh::RefreshEvent) is printed as it is received.
//!
//! Run it with:
//!
//! ```sh
//! cargo run --example closure_refresher
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::error::SessionEnded;
use tower_auth_refresh::{
    BoxError, Events, Lagged, RefreshError, RefreshLayer, ReplayBody, Token, TokenHandle,
    refresh_fn,
};

const LIFETIME: Duration = Duration::from_millis(600);

/// Tokens the API accepts, and when each expires.
type Valid = Arc<Mutex<HashMap<String, Instant>>>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let valid: Valid = Arc::default();
    let (api, hits, refused) = api_server(valid.clone()).await?;

    // The refresher: a closure. It mints `tok-N`, registers it with the API, and says how
    // long it lives, so the layer refreshes before it expires.
    let minted = Arc::new(AtomicUsize::new(0));
    let refresher = refresh_fn({
        let (valid, minted) = (valid.clone(), minted.clone());
        move |stale: Option<Token>| {
            let n = minted.fetch_add(1, Ordering::SeqCst) + 1;
            let secret = format!("tok-{n}");
            valid
                .lock()
                .unwrap()
                .insert(secret.clone(), Instant::now() + LIFETIME);
            // `Token`'s Debug never shows the secret.
            println!("  refresher: minting token #{n} (stale token: {stale:?})");
            async move { Ok::<_, RefreshError>(Token::bearer(secret)?.with_expires_in(LIFETIME)) }
        }
    });
    let layer = RefreshLayer::new(refresher);
    let handle = layer.token_handle();
    let mut events = handle.subscribe();

    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let svc = ServiceBuilder::new().layer(layer).service(client);
    let get = || Request::get(format!("http://{api}/profile")).body(Full::new(Bytes::new()));

    println!("API server: http://{api} (tokens live {LIFETIME:?})\n");

    println!("1. first request, no token yet");
    let res = svc.clone().oneshot(get()?).await?;
    println!("  status: {}", res.status());
    show(&handle, &mut events);

    println!("\n2. wait {LIFETIME:?} for the token to expire, then send again");
    tokio::time::sleep(LIFETIME).await;
    println!("  before sending: {:?}", handle.state());
    let res = svc.clone().oneshot(get()?).await?;
    println!("  status: {}", res.status());
    show(&handle, &mut events);

    println!("\n3. force a refresh through the handle");
    let state = handle.refresh().await?;
    println!("  refreshed: generation {}", state.generation());
    show(&handle, &mut events);

    println!("\n4. log out with clear(), then send");
    handle.clear();
    let before = hits.load(Ordering::SeqCst);
    let err = svc.clone().oneshot(get()?).await.unwrap_err();
    println!("  error: {err}");
    if let Some(ended) = err.downcast_ref::<SessionEnded>() {
        // A logout, not a refused refresh: the application shows its login screen.
        println!(
            "  SessionEnded: {}",
            if ended.is_logout() {
                "logged out through the handle"
            } else {
                "the refresh was refused"
            }
        );
    }
    println!(
        "  requests that reached the API: {}",
        hits.load(Ordering::SeqCst) - before
    );
    show(&handle, &mut events);

    println!("\n5. log back in with set_token(), then send");
    let secret = "tok-from-login";
    valid
        .lock()
        .unwrap()
        .insert(secret.into(), Instant::now() + LIFETIME);
    handle.set_token(Token::bearer(secret)?.with_expires_in(LIFETIME));
    let res = svc.clone().oneshot(get()?).await?;
    println!("  status: {}", res.status());
    show(&handle, &mut events);

    println!("\nsummary");
    println!(
        "  tokens minted by the refresher: {}",
        minted.load(Ordering::SeqCst)
    );
    println!(
        "  requests that reached the API:  {}",
        hits.load(Ordering::SeqCst)
    );
    println!(
        "  401s sent by the API:           {}",
        refused.load(Ordering::SeqCst)
    );
    Ok(())
}

/// Prints the events received so far and the token state.
fn show(handle: &TokenHandle, events: &mut Events) {
    while let Some(received) = events.try_recv() {
        match received {
            Ok(event) => println!("  event: {event:?}"),
            Err(Lagged(n)) => println!("  event: ({n} missed)"),
        }
    }
    println!("  state: {:?}", handle.state());
}

/// An API that accepts a token from `valid` until it expires.
async fn api_server(
    valid: Valid,
) -> std::io::Result<(std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let (server_hits, server_refused) = (hits.clone(), refused.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (valid, hits, refused) =
                (valid.clone(), server_hits.clone(), server_refused.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                hits.fetch_add(1, Ordering::SeqCst);
                let secret = req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                let ok = secret.is_some_and(|s| {
                    valid
                        .lock()
                        .unwrap()
                        .get(s)
                        .is_some_and(|until| Instant::now() < *until)
                });
                let mut res = Response::new(Full::new(Bytes::new()));
                if !ok {
                    refused.fetch_add(1, Ordering::SeqCst);
                    *res.status_mut() = StatusCode::UNAUTHORIZED;
                }
                async move { Ok::<_, Infallible>(res) }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, hits, refused))
}
