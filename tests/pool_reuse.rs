//! After a 401 the layer reads the refusal's body (bounded) before the replay, so an HTTP/1.1
//! client hands the connection back to its pool and the replay reuses it. Real hyper servers
//! on loopback count the connections they accept.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

use support::http_client;

/// How a server answers a request with a stale token.
#[derive(Clone, Copy)]
enum Refusal {
    /// A 401 whose body has this many bytes, sent at once.
    Sized(usize),
    /// A 401 whose (chunked) body sends one chunk and never ends.
    Endless,
}

/// What a server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    sends: AtomicUsize,
}

type ResBody = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> ResBody {
    Full::new(bytes.into()).boxed()
}

/// An API on loopback: `200 ok` for `Bearer fresh`, the refusal otherwise.
async fn api(refusal: Refusal) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counts.connections.fetch_add(1, Ordering::SeqCst);
            let counts = counts.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                counts.sends.fetch_add(1, Ordering::SeqCst);
                let fresh = req
                    .headers()
                    .get(AUTHORIZATION)
                    .is_some_and(|v| v == "Bearer fresh");
                async move {
                    req.into_body().collect().await?;
                    if fresh {
                        return Ok::<_, hyper::Error>(Response::new(full("ok")));
                    }
                    let body = match refusal {
                        Refusal::Sized(n) => full(vec![b'x'; n]),
                        Refusal::Endless => BodyExt::boxed(StreamBody::new(
                            futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(
                                b"<html>401 Unauthorized",
                            )))])
                            .chain(futures_util::stream::pending()),
                        )),
                    };
                    Ok(Response::builder()
                        .status(StatusCode::UNAUTHORIZED)
                        .header(WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)
                        .body(body)
                        .unwrap())
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A layer holding a stale token whose refresher returns `fresh`, counting its calls.
fn stale_layer() -> (RefreshLayer, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let layer = RefreshLayer::new(refresh_fn(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, RefreshError>(Token::bearer("fresh")?) }
    }))
    .initial_token(Token::bearer("stale").unwrap());
    (layer, calls)
}

/// One GET through the layer over a hyper-util client; its status and body.
async fn get_once(refusal: Refusal) -> (StatusCode, Bytes, Arc<Seen>, usize) {
    let (addr, seen) = api(refusal).await;
    let (layer, calls) = stale_layer();
    let svc = layer.layer(http_client::<ReplayBody<Full<Bytes>>>());
    let req = Request::get(format!("http://{addr}/items/1"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), svc.oneshot(req))
        .await
        .expect("answered within the guard")
        .expect("the replay succeeds");
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, body, seen, calls.load(Ordering::SeqCst))
}

#[tokio::test]
async fn after_a_refusal_the_replay_reuses_the_pooled_connection() {
    for size in [0, 100, 16 * 1024, 40 * 1024] {
        let (status, body, seen, calls) = get_once(Refusal::Sized(size)).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]), "{size}");
        assert_eq!(calls, 1);
        assert_eq!(seen.sends.load(Ordering::SeqCst), 2, "one send, one replay");
        assert_eq!(
            seen.connections.load(Ordering::SeqCst),
            1,
            "the replay of a request refused with a {size}-byte body went over the same connection"
        );
    }
}

#[tokio::test]
async fn a_refusal_body_above_the_drain_limit_is_dropped_and_the_replay_still_succeeds() {
    let (status, body, seen, calls) = get_once(Refusal::Sized(1024 * 1024)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!((calls, seen.sends.load(Ordering::SeqCst)), (1, 2));
    // A megabyte is not read to save a connection: that one closes, the replay opens another.
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refusal_body_that_never_ends_does_not_hold_the_replay_back() {
    let (status, body, seen, calls) = get_once(Refusal::Endless).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!((calls, seen.sends.load(Ordering::SeqCst)), (1, 2));
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn through_reqwest_after_a_refusal_the_replay_reuses_the_connection() {
    let (addr, seen) = api(Refusal::Sized(16 * 1024)).await;
    let (layer, calls) = stale_layer();
    let client = reqwest_middleware::ClientBuilder::new(
        reqwest::Client::builder().no_proxy().build().unwrap(),
    )
    .with(layer.reqwest_middleware())
    .build();
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        // A fragment is not sent: the response still answers this request (no redirect).
        client
            .get(format!("http://{addr}/items/1?page=2#top"))
            .send(),
    )
    .await
    .expect("answered within the guard")
    .expect("the replay succeeds");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.unwrap(), "ok");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(seen.sends.load(Ordering::SeqCst), 2);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn through_reqwest_a_refused_url_with_a_fragment_is_refreshed_and_replayed() {
    // The fragment is never sent, so the response's URL has none: that is not a redirect.
    let (addr, seen) = api(Refusal::Sized(10)).await;
    let (layer, calls) = stale_layer();
    let client = reqwest_middleware::ClientBuilder::new(
        reqwest::Client::builder().no_proxy().build().unwrap(),
    )
    .with(layer.reqwest_middleware())
    .build();
    let res = client
        .post(format!("http://{addr}/orders#summary"))
        .body("{\"id\":7}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(seen.sends.load(Ordering::SeqCst), 2);
}
