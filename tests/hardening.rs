//! The promises under redirects, runtimes, shared limits and a refresh in flight, against
//! real loopback servers: each test failed before the fix it names.

mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::LOCATION;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tower::limit::ConcurrencyLimitLayer;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::error::RefreshFailed;
use tower_auth_refresh::{
    BoxError, RefreshError, RefreshLayer, ReplayBody, Token, TokenRequest, refresh_fn,
};
use tower_http::follow_redirect::FollowRedirectLayer;

use support::{ScriptedBody, authorization, guard, http_client, response, serve};

/// A server that records (method, path, Authorization, body) of every request and answers
/// 200 to `Bearer <fresh>` and 401 to anything else.
async fn recording_api(fresh: &'static str) -> (std::net::SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let addr = serve(move |req: Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            let auth = authorization(req.headers());
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            log.lock().unwrap().push(Seen {
                method,
                path,
                auth: auth.clone(),
                body,
            });
            if auth == format!("Bearer {fresh}") {
                response(StatusCode::OK, "ok")
            } else {
                response(StatusCode::UNAUTHORIZED, "no")
            }
        }
    })
    .await;
    (addr, seen)
}

#[derive(Debug, Clone)]
struct Seen {
    method: http::Method,
    path: String,
    auth: String,
    body: Bytes,
}

/// A refresher that waits for `gate` before it answers `Bearer <secret>`, counting its calls.
fn gated(
    gate: Arc<Semaphore>,
    calls: Arc<AtomicUsize>,
    secret: &'static str,
) -> impl tower_auth_refresh::TokenRefresher {
    refresh_fn(move |_| {
        let (gate, calls) = (gate.clone(), calls.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            gate.acquire().await.unwrap().forget();
            Ok::<_, RefreshError>(Token::bearer(secret)?)
        }
    })
}

fn streaming_body(chunks: &[&'static str]) -> ScriptedBody {
    ScriptedBody {
        frames: chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
            .collect::<VecDeque<_>>(),
        hint: None,
        accurate_end: false,
    }
}

/// Issue "one core", item 2: a request started while a 401-triggered refresh is in flight is
/// not sent with the refused token; it waits and is sent once with the new one. A streaming
/// body of unknown size started then succeeds, sent once.
#[tokio::test]
async fn a_request_started_during_a_refresh_waits_and_is_sent_once_with_the_new_token() {
    guard(async {
        let (addr, seen) = recording_api("fresh").await;
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(gated(gate.clone(), calls.clone(), "fresh"))
            .initial_token(Token::bearer("stale").unwrap());
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<ScriptedBody>>());

        // The first request is refused and starts the refresh (held by the gate).
        let first = tokio::spawn(
            svc.clone().oneshot(
                Request::get(format!("http://{addr}/first"))
                    .body(streaming_body(&[]))
                    .unwrap(),
            ),
        );
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Now a streaming upload starts: it must not go out with the refused token.
        let upload = tokio::spawn(
            svc.clone().oneshot(
                Request::post(format!("http://{addr}/upload"))
                    .body(streaming_body(&["part-1;", "part-2;", "part-3"]))
                    .unwrap(),
            ),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            seen.lock()
                .unwrap()
                .iter()
                .filter(|s| s.path == "/upload")
                .count(),
            0,
            "nothing is sent while the refresh for the refused token runs"
        );
        gate.add_permits(1);
        assert_eq!(upload.await.unwrap().unwrap().status(), StatusCode::OK);
        // The first request's stream (of no size, empty) ended within the replay cap: it is
        // replayed once, with the new token.
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        let seen = seen.lock().unwrap();
        let firsts: Vec<_> = seen
            .iter()
            .filter(|s| s.path == "/first")
            .map(|s| s.auth.as_str())
            .collect();
        assert_eq!(firsts, ["Bearer stale", "Bearer fresh"]);
        let uploads: Vec<_> = seen.iter().filter(|s| s.path == "/upload").collect();
        assert_eq!(uploads.len(), 1, "the upload is sent exactly once");
        assert_eq!(uploads[0].method, http::Method::POST);
        assert_eq!(uploads[0].auth, "Bearer fresh");
        assert_eq!(uploads[0].body, "part-1;part-2;part-3");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// The same through the reqwest middleware.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn through_reqwest_a_request_started_during_a_refresh_waits_and_is_sent_once() {
    guard(async {
        let (addr, seen) = recording_api("fresh").await;
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(gated(gate.clone(), calls.clone(), "fresh"))
            .initial_token(Token::bearer("stale").unwrap());
        let client = reqwest_middleware::ClientBuilder::new(
            reqwest::Client::builder().no_proxy().build().unwrap(),
        )
        .with(layer.reqwest_middleware())
        .build();

        let first = tokio::spawn({
            let client = client.clone();
            async move { client.get(format!("http://{addr}/first")).send().await }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let stream = futures_util::stream::iter(
            ["part-1;", "part-2;", "part-3"]
                .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::from(c)))),
        );
        let upload = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .post(format!("http://{addr}/upload"))
                    .body(reqwest::Body::wrap(http_body_util::StreamBody::new(stream)))
                    .send()
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            seen.lock()
                .unwrap()
                .iter()
                .filter(|s| s.path == "/upload")
                .count(),
            0
        );
        gate.add_permits(1);
        assert_eq!(upload.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        let seen = seen.lock().unwrap();
        let uploads: Vec<_> = seen.iter().filter(|s| s.path == "/upload").collect();
        assert_eq!(uploads.len(), 1);
        assert_eq!(uploads[0].auth, "Bearer fresh");
        assert_eq!(uploads[0].body, "part-1;part-2;part-3");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// Two servers: `POST /orders` on the first answers 303 to the second, which refuses every
/// request with 401 (the token was rightly not sent across origins).
async fn redirect_to_a_refusing_origin()
-> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    shop_and_refusing_origin(false).await
}

/// The same, but the first server refuses any token but `Bearer fresh` with 401 (and then
/// places no order).
async fn redirect_after_a_refresh() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    shop_and_refusing_origin(true).await
}

/// The shop (refusing stale tokens when `checks_token`), the origin it redirects to, and
/// the counts of orders placed and of the other origin's refusals.
async fn shop_and_refusing_origin(
    checks_token: bool,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let refusals = Arc::new(AtomicUsize::new(0));
    let other = {
        let refusals = refusals.clone();
        serve(move |_req: Request<hyper::body::Incoming>| {
            refusals.fetch_add(1, Ordering::SeqCst);
            async { response(StatusCode::UNAUTHORIZED, "who are you?") }
        })
        .await
    };
    let orders = Arc::new(AtomicUsize::new(0));
    let shop = {
        let orders = orders.clone();
        serve(move |req: Request<hyper::body::Incoming>| {
            let orders = orders.clone();
            async move {
                if checks_token && authorization(req.headers()) != "Bearer fresh" {
                    return response(StatusCode::UNAUTHORIZED, "stale");
                }
                if req.method() == http::Method::POST {
                    orders.fetch_add(1, Ordering::SeqCst);
                }
                let mut res = response(StatusCode::SEE_OTHER, "");
                res.headers_mut()
                    .insert(LOCATION, format!("http://{other}/done").parse().unwrap());
                res
            }
        })
        .await
    };
    (shop, orders, refusals)
}

/// Places an order (a `POST` to `shop`) through the tower layer over tower-http's
/// `FollowRedirectLayer`, starting from the token `initial`: the answer, and how many times
/// the refresher was called.
async fn order_through_tower(
    shop: std::net::SocketAddr,
    initial: &str,
) -> (
    Result<http::Response<hyper::body::Incoming>, BoxError>,
    usize,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RefreshLayer::new(support::counting(&calls, "fresh"))
        .initial_token(Token::bearer(initial).unwrap());
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(FollowRedirectLayer::new())
        .service(http_client::<ReplayBody<Full<Bytes>>>());
    let res = svc
        .oneshot(
            Request::post(format!("http://{shop}/orders"))
                .body(Full::from("{\"item\": 1}"))
                .unwrap(),
        )
        .await;
    (res, calls.load(Ordering::SeqCst))
}

/// The same through the reqwest middleware and reqwest's own redirects.
#[cfg(feature = "reqwest")]
async fn order_through_reqwest(
    shop: std::net::SocketAddr,
    initial: &str,
) -> (reqwest_middleware::Result<reqwest::Response>, usize) {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RefreshLayer::new(support::counting(&calls, "fresh"))
        .initial_token(Token::bearer(initial).unwrap());
    let client = reqwest_middleware::ClientBuilder::new(
        reqwest::Client::builder().no_proxy().build().unwrap(),
    )
    .with(layer.reqwest_middleware())
    .build();
    let res = client
        .post(format!("http://{shop}/orders"))
        .body("{\"item\": 1}")
        .send()
        .await;
    (res, calls.load(Ordering::SeqCst))
}

/// A replay the server accepted (the order is placed) and answered with a redirect to an
/// origin that refuses it: the redirect target's 401 is returned as it is, as for a first
/// send, not taken for a refusal of the new token (`UnauthorizedAfterRefresh` would tell the
/// caller the order failed, and a caller that retries would place it twice).
#[tokio::test]
async fn a_replay_answered_by_a_redirect_target_is_returned_as_it_is() {
    guard(async {
        let (shop, orders, refusals) = redirect_after_a_refresh().await;
        let (res, calls) = order_through_tower(shop, "stale").await;
        let res = res.expect("the redirect target's answer, not an error");
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            orders.load(Ordering::SeqCst),
            1,
            "the replayed POST ran once"
        );
        assert_eq!(refusals.load(Ordering::SeqCst), 1);
        assert_eq!(calls, 1, "one token call");
    })
    .await;
}

/// The same with reqwest's own redirects.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn through_reqwest_a_replay_answered_by_a_redirect_target_is_returned_as_it_is() {
    guard(async {
        let (shop, orders, refusals) = redirect_after_a_refresh().await;
        let (res, calls) = order_through_reqwest(shop, "stale").await;
        let res = res.expect("the redirect target's answer, not an error");
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            orders.load(Ordering::SeqCst),
            1,
            "the replayed POST ran once"
        );
        assert_eq!(refusals.load(Ordering::SeqCst), 1);
        assert_eq!(calls, 1, "one token call");
    })
    .await;
}

/// Hold-every-promise item 1: a 401 from a redirect hop (another origin) never triggers a
/// refresh or a replay: the order is placed once.
#[tokio::test]
async fn a_refusal_from_a_redirect_target_never_replays_the_post() {
    guard(async {
        let (shop, orders, refusals) = redirect_to_a_refusing_origin().await;
        let (res, calls) = order_through_tower(shop, "valid").await;
        let res = res.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "returned as it is");
        assert_eq!(orders.load(Ordering::SeqCst), 1, "the POST ran once");
        assert_eq!(refusals.load(Ordering::SeqCst), 1);
        assert_eq!(calls, 0, "no token call");
    })
    .await;
}

/// A request that waited for its token and is refused by the very server it was sent to
/// (no redirect, although a `FollowRedirectLayer` below the layer marks every response with
/// its final URI) gets the typed error, not the refusal taken for a redirect hop's: the URI
/// it was sent to is kept for the check while it is on its way after the wait.
#[tokio::test]
async fn a_refusal_after_a_wait_through_follow_redirect_is_the_typed_error() {
    guard(async {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let seen = seen.clone();
            serve(move |req: Request<hyper::body::Incoming>| {
                seen.lock().unwrap().push(authorization(req.headers()));
                async { response(StatusCode::UNAUTHORIZED, "not you either") }
            })
            .await
        };
        let calls = Arc::new(AtomicUsize::new(0));
        // No token at first: the request waits for the refresh, then is sent once.
        let layer = RefreshLayer::new(support::counting(&calls, "fresh"));
        let svc = ServiceBuilder::new()
            .layer(layer)
            .layer(FollowRedirectLayer::new())
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        let err = svc
            .oneshot(
                Request::get(format!("http://{server}/account"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .expect_err("a refusal right after a refresh is an error");
        assert!(
            err.is::<tower_auth_refresh::error::UnauthorizedAfterRefresh>(),
            "{err}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one token call");
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["Bearer fresh".to_owned()],
            "sent once"
        );
    })
    .await;
}

/// The same with reqwest's own redirects.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn through_reqwest_a_refusal_from_a_redirect_target_never_replays_the_post() {
    guard(async {
        let (shop, orders, refusals) = redirect_to_a_refusing_origin().await;
        let (res, calls) = order_through_reqwest(shop, "valid").await;
        let res = res.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(orders.load(Ordering::SeqCst), 1, "the POST ran once");
        assert_eq!(refusals.load(Ordering::SeqCst), 1);
        assert_eq!(calls, 0, "no token call");
    })
    .await;
}

/// Hold-every-promise item 4: with `ConcurrencyLimit(1)` below the layer and a refresher that
/// sends its token request through the same stack, a request waiting for the refresh holds no
/// permit, so the token request gets through.
#[tokio::test]
async fn a_waiting_request_holds_no_permit_the_token_request_needs() {
    guard(async {
        let token_calls = Arc::new(AtomicUsize::new(0));
        let addr = {
            let token_calls = token_calls.clone();
            serve(move |req: Request<hyper::body::Incoming>| {
                let token_calls = token_calls.clone();
                async move {
                    if req.uri().path() == "/token" {
                        token_calls.fetch_add(1, Ordering::SeqCst);
                        return response(StatusCode::OK, "fresh");
                    }
                    let ok = authorization(req.headers()) == "Bearer fresh";
                    response(
                        if ok {
                            StatusCode::OK
                        } else {
                            StatusCode::UNAUTHORIZED
                        },
                        "",
                    )
                }
            })
            .await
        };
        // The stack below the layer: one request at a time, shared by the refresher.
        let below = ServiceBuilder::new()
            .layer(tower::buffer::BufferLayer::new(16))
            .layer(ConcurrencyLimitLayer::new(1))
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        let for_refresher = below.clone();
        let refresher = refresh_fn(move |_| {
            let mut client = for_refresher.clone();
            async move {
                let mut req = Request::post(format!("http://{addr}/token"))
                    .body(ReplayBody::default())
                    .unwrap();
                req.extensions_mut().insert(TokenRequest);
                let res = client
                    .ready()
                    .await
                    .map_err(RefreshError::transient)?
                    .call(req)
                    .await
                    .map_err(RefreshError::transient)?;
                let text = res
                    .into_body()
                    .collect()
                    .await
                    .map_err(RefreshError::transient)?;
                Ok::<_, RefreshError>(Token::bearer(
                    String::from_utf8_lossy(&text.to_bytes()).into_owned(),
                )?)
            }
        });
        let svc = ServiceBuilder::new()
            .layer(RefreshLayer::new(refresher))
            .service(below);
        // Readied first (holding the only permit), then called: it must wait for the token
        // without keeping the permit.
        let calls: Vec<_> = (0..5)
            .map(|i| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    let svc = svc.ready().await?;
                    svc.call(support::get(format!("http://{addr}/items/{i}")))
                        .await
                })
            })
            .collect();
        for c in calls {
            let res: Result<_, BoxError> = tokio::time::timeout(Duration::from_secs(10), c)
                .await
                .expect("deadlock: the waiting request kept the permit")
                .unwrap();
            assert_eq!(res.unwrap().status(), StatusCode::OK);
        }
        assert_eq!(token_calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// Hold-every-promise item 2: a refresh started by a request on a current-thread runtime that
/// then stops being driven (its caller timed out) still completes for requests on a runtime
/// that is driven: the refresh runs on the runtime the layer was made in.
#[test]
fn a_refresh_is_never_parked_on_a_runtime_nobody_drives() {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    // The refresh ends once the caller on the parked runtime has given up (not after a fixed
    // time a stalled machine could outlast).
    let gate = Arc::new(Semaphore::new(0));
    let (svc, addr) = main.block_on(async {
        let (addr, _seen) = recording_api("fresh").await;
        let counted = calls.clone();
        let gate = gate.clone();
        let layer = RefreshLayer::new(refresh_fn(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            async move {
                let _open = gate.acquire().await.unwrap();
                Ok::<_, RefreshError>(Token::bearer("fresh")?)
            }
        }));
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        (svc, addr)
    });

    // A current-thread runtime starts the refresh and is then left alone (not dropped).
    let parked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let early = parked.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(5),
            svc.clone()
                .oneshot(support::get(format!("http://{addr}/a"))),
        )
        .await
    });
    assert!(early.is_err(), "the caller on the parked runtime timed out");
    gate.add_permits(1);

    // A request on the driven runtime gets the refreshed token; the 5 s timeout is the bound.
    let res = main
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                svc.clone()
                    .oneshot(support::get(format!("http://{addr}/b"))),
            )
            .await
        })
        .expect("waited for a refresh parked on a runtime nobody drives")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh");
    drop(parked);
}

/// A layer made on a runtime that has since been dropped (a client built in a setup
/// `block_on`, or shared by several `#[tokio::test]`s) refreshes on the runtime of the request
/// that needs it, for that very request: it does not fail the first request after the
/// runtime went away.
#[test]
fn a_layer_whose_runtime_is_gone_refreshes_on_the_current_one_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let setup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let counted = calls.clone();
    let layer = setup.block_on(async move {
        RefreshLayer::new(refresh_fn(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, RefreshError>(Token::bearer("fresh")?) }
        }))
    });
    drop(setup);
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    main.block_on(async {
        let (addr, seen) = recording_api("fresh").await;
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        for path in ["a", "b"] {
            let res = tokio::time::timeout(
                Duration::from_secs(5),
                svc.clone()
                    .oneshot(support::get(format!("http://{addr}/{path}"))),
            )
            .await
            .expect("bounded")
            .expect("the first request after the layer's runtime went away succeeds");
            assert_eq!(res.status(), StatusCode::OK);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "each request sent once");
        assert!(seen.iter().all(|s| s.auth == "Bearer fresh"));
    });
}

/// On a Tokio runtime without its time driver (`enable_io` only), a refresh cannot be
/// bounded: it fails at once with an error that says so (every time, not "the task was
/// dropped"), and the refresher is never called (nor left to hang unbounded).
#[test]
fn a_runtime_without_timers_gets_an_error_that_says_so() {
    let calls = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_io()
        .build()
        .unwrap();
    let counted = calls.clone();
    rt.block_on(async move {
        let layer = RefreshLayer::new(refresh_fn(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, RefreshError>(Token::bearer("fresh")?) }
        }));
        let svc = tower::Layer::layer(&layer, recording_inner(&Auths::default()));
        for _ in 0..2 {
            let err = svc
                .clone()
                .oneshot(
                    Request::get("http://127.0.0.1:9/a")
                        .body(Full::default())
                        .unwrap(),
                )
                .await
                .unwrap_err();
            let failed = err
                .downcast_ref::<RefreshFailed>()
                .expect("a RefreshFailed error");
            let mut chain = failed.to_string();
            let mut next = std::error::Error::source(failed);
            while let Some(cause) = next {
                chain += &format!(": {cause}");
                next = cause.source();
            }
            assert!(chain.contains("enable_time"), "{chain}");
        }
    });
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// What an in-memory inner service saw: each request's URI and `Authorization` ("-" without).
type Auths = Arc<Mutex<Vec<(String, String)>>>;

/// An inner service that records what it saw and answers 200.
fn recording_inner(
    seen: &Auths,
) -> impl Service<
    Request<ReplayBody<Full<Bytes>>>,
    Response = http::Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let seen = seen.clone();
    tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        seen.lock()
            .unwrap()
            .push((req.uri().to_string(), authorization(req.headers())));
        std::future::ready(Ok(response(StatusCode::OK, "ok")))
    })
}

/// Sends `uri` through `layer` over a recording inner service: what the inner service saw of
/// it (`None`: it was not sent), or the layer's error.
async fn auth_seen_for(layer: &RefreshLayer, seen: &Auths, uri: &str) -> Result<String, BoxError> {
    let before = seen.lock().unwrap().len();
    tower::Layer::layer(layer, recording_inner(seen))
        .oneshot(Request::get(uri).body(Full::default()).unwrap())
        .await?;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), before + 1, "{uri} was sent once");
    Ok(seen[before].1.clone())
}

/// A layer holding the valid token `tok-secret` (its refresher answers `r`, never needed).
fn holding_tok_secret() -> RefreshLayer {
    RefreshLayer::new(refresh_fn(|_| async {
        Ok::<_, RefreshError>(Token::bearer("r")?)
    }))
    .initial_token(Token::bearer("tok-secret").unwrap())
}

/// Sends `uri` through `layer` and expects it refused as plain HTTP (`InsecureTransport`).
async fn refused_as_insecure(layer: &RefreshLayer, seen: &Auths, uri: &str) {
    let err = auth_seen_for(layer, seen, uri).await.unwrap_err();
    assert!(
        err.is::<tower_auth_refresh::error::InsecureTransport>(),
        "{uri}: {err}"
    );
}

/// Review item 1 (security): an absolute URI whose scheme the layer cannot tell an origin of
/// (`foo://host`, no port) is not a relative URI. With the default first-seen origin it never
/// gets the token, whether it comes before or after the first origin was fixed (a connector
/// such as hyper-rustls' `https_or_http` sends it as plain HTTP to that host); nor does a
/// host without a scheme (an authority-form URI). With `any_origin` it is held to the
/// plain-http rule: refused unless it is loopback or insecure http is allowed.
#[tokio::test]
async fn an_absolute_uri_with_an_unknown_scheme_never_gets_the_token_by_default() {
    let seen = Auths::default();
    let tok = || Token::bearer("tok-secret").unwrap();
    let refresher = || refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("r")?) });
    let bearer = Ok("Bearer tok-secret".to_owned());
    let bare = Ok("-".to_owned());
    let seen_for = |layer: &RefreshLayer, uri: &'static str| {
        let (layer, seen) = (layer.clone(), seen.clone());
        async move {
            auth_seen_for(&layer, &seen, uri)
                .await
                .map_err(|e| e.to_string())
        }
    };

    // The origin is fixed first by an https request, then by a relative one and an https one.
    let after_https = RefreshLayer::new(refresher()).initial_token(tok());
    assert_eq!(
        seen_for(&after_https, "https://api.example/a").await,
        bearer
    );
    let before_any = RefreshLayer::new(refresher()).initial_token(tok());
    assert_eq!(seen_for(&before_any, "/relative").await, bearer);
    for layer in [&after_https, &before_any] {
        for uri in [
            "foo://evil.example/x",
            "foo://api.example/x",
            "foo://user:pw@evil.example/x",
            "evil.example:443",
            "evil.example",
        ] {
            assert_eq!(seen_for(layer, uri).await, bare, "{uri}");
        }
    }
    assert_eq!(seen_for(&before_any, "https://api.example/b").await, bearer);
    for layer in [&after_https, &before_any] {
        assert_eq!(seen_for(layer, "https://api.example/c").await, bearer);
        assert_eq!(seen_for(layer, "https://evil.example/c").await, bare);
        assert_eq!(seen_for(layer, "/relative").await, bearer);
    }

    // An allow-list: never.
    let listed = RefreshLayer::new(refresher())
        .initial_token(tok())
        .allowed_origins(["https://api.example"])
        .unwrap();
    for uri in ["foo://api.example/x", "api.example:443"] {
        assert_eq!(seen_for(&listed, uri).await, bare, "{uri}");
    }

    // any_origin: the plain-http rule holds (nothing is sent), loopback and the opt-in aside.
    let any = RefreshLayer::new(refresher())
        .initial_token(tok())
        .any_origin();
    let sent = seen.lock().unwrap().len();
    for uri in ["foo://evil.example/x", "evil.example:443"] {
        let err = auth_seen_for(&any, &seen, uri).await.unwrap_err();
        assert!(
            err.is::<tower_auth_refresh::error::InsecureTransport>(),
            "{uri}: {err}"
        );
    }
    assert_eq!(seen.lock().unwrap().len(), sent, "nothing was sent");
    assert_eq!(seen_for(&any, "foo://localhost/x").await, bearer);
    let insecure = any.clone().allow_insecure_http(true);
    assert_eq!(seen_for(&insecure, "foo://evil.example/x").await, bearer);
}

/// The same through the reqwest middleware, which judges the URL's text: the request after
/// the middleware carries no token.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn through_reqwest_an_unknown_scheme_never_gets_the_token_by_default() {
    /// Records the `Authorization` of each request and answers 200 without sending it.
    struct Record(Arc<Mutex<Vec<String>>>);

    // `async_trait`'s expansion, written out (the crate is not a dependency of the tests).
    impl reqwest_middleware::Middleware for Record {
        fn handle<'s, 'e, 'n, 'f>(
            &'s self,
            req: reqwest::Request,
            _: &'e mut http::Extensions,
            _: reqwest_middleware::Next<'n>,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = reqwest_middleware::Result<reqwest::Response>>
                    + Send
                    + 'f,
            >,
        >
        where
            's: 'f,
            'e: 'f,
            'n: 'f,
            Self: 'f,
        {
            self.0.lock().unwrap().push(authorization(req.headers()));
            Box::pin(std::future::ready(Ok(http::Response::new("ok").into())))
        }
    }

    guard(async {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let layer = RefreshLayer::new(refresh_fn(|_| async {
            Ok::<_, RefreshError>(Token::bearer("r")?)
        }))
        .initial_token(Token::bearer("tok-secret").unwrap());
        let client = reqwest_middleware::ClientBuilder::new(
            reqwest::Client::builder().no_proxy().build().unwrap(),
        )
        .with(layer.reqwest_middleware())
        .with(Record(seen.clone()))
        .build();
        for url in [
            "https://api.example/a",
            "foo://evil.example/x",
            "foo://api.example/x",
            "https://api.example/b",
        ] {
            let res = client.get(url).send().await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{url}");
        }
        assert_eq!(
            *seen.lock().unwrap(),
            ["Bearer tok-secret", "-", "-", "Bearer tok-secret"]
        );
    })
    .await;
}

/// Counts its drops: the owner of a request body's bytes.
struct Tracked(Vec<u8>, Arc<AtomicUsize>);

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

/// A body the layer could never replay is not kept: a request that waited for its token (a
/// refusal after a wait is final). The inner service reads the body and lets go of it; the
/// bytes are then gone, not held by a capture until the response.
#[tokio::test]
async fn a_body_that_can_never_be_replayed_is_not_kept() {
    let freed_by_inner = Arc::new(Mutex::new(Vec::new()));
    let inner = {
        let freed_by_inner = freed_by_inner.clone();
        tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
            let freed_by_inner = freed_by_inner.clone();
            async move {
                let (parts, body) = req.into_parts();
                let freed = parts.extensions.get::<Arc<AtomicUsize>>().unwrap().clone();
                let bytes = body.collect().await.unwrap().to_bytes();
                assert_eq!(&bytes[..], b"order 1");
                drop(bytes);
                freed_by_inner
                    .lock()
                    .unwrap()
                    .push(freed.load(Ordering::SeqCst));
                Ok::<_, BoxError>(response(StatusCode::OK, "ok"))
            }
        })
    };
    let post = || {
        let freed = Arc::new(AtomicUsize::new(0));
        let body = Bytes::from_owner(Tracked(b"order 1".to_vec(), freed.clone()));
        let mut req = Request::post("http://127.0.0.1:9/orders")
            .body(Full::new(body))
            .unwrap();
        req.extensions_mut().insert(freed);
        req
    };
    // No token yet: the request waits for the refresh.
    let waits = RefreshLayer::new(refresh_fn(|_| async {
        Ok::<_, RefreshError>(Token::bearer("fresh")?)
    }));
    let res = tower::Layer::layer(&waits, inner)
        .oneshot(post())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        *freed_by_inner.lock().unwrap(),
        vec![1],
        "the bytes were freed once the inner service let go of them"
    );
}

/// Review item (this session): a first request refused as plain HTTP to a host that is not
/// loopback does not fix the first-seen origin (the token never went there). It had: every
/// later `https://` request to the same host went out without the token, its 401 returned
/// as it was, for the life of the process. Now the secure origin binds, and only it.
#[tokio::test]
async fn a_request_refused_as_plain_http_does_not_fix_the_origin() {
    let seen = Auths::default();
    let layer = holding_tok_secret();
    refused_as_insecure(&layer, &seen, "http://api.example/health").await;
    assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
    assert_eq!(
        auth_seen_for(&layer, &seen, "https://api.example/a")
            .await
            .unwrap(),
        "Bearer tok-secret"
    );
    // The https origin is the bound one now: another host goes out untouched, and plain
    // http to the same host is refused again, as the first time.
    assert_eq!(
        auth_seen_for(&layer, &seen, "https://other.example/a")
            .await
            .unwrap(),
        "-"
    );
    refused_as_insecure(&layer, &seen, "http://api.example/b").await;
}

/// Review item (tenth session): after a first request refused as plain HTTP, a secure request
/// to **another** host does not become the first-seen origin: the token was meant for the
/// refused request's host. It did (nothing was bound), and the token went to that other host.
#[tokio::test]
async fn after_a_request_refused_as_plain_http_another_host_never_gets_the_token() {
    let seen = Auths::default();
    let layer = holding_tok_secret();
    refused_as_insecure(&layer, &seen, "http://api.example:8080/health").await;
    // Another host, and the same host on the default https port (another origin than
    // `https://api.example:8080`): untouched.
    for other in ["https://third-party.example/a", "https://api.example/a"] {
        assert_eq!(
            auth_seen_for(&layer, &seen, other).await.unwrap(),
            "-",
            "{other}"
        );
    }
    assert_eq!(
        auth_seen_for(&layer, &seen, "https://API.example:8080/b")
            .await
            .unwrap(),
        "Bearer tok-secret"
    );
}

/// Review item (this session): on a Tokio runtime without its time driver, the bounded reads
/// of a refusal's body (drained before a replay; its first bytes kept in the error after a
/// second refusal) read what has arrived instead of starting a timer. They started one, and
/// Tokio panics at a timer without its driver: a late 401 answered by a token installed
/// meanwhile (no refresh, so no timer needed otherwise) panicked the caller's task.
#[test]
fn a_runtime_without_timers_replays_and_refuses_without_a_panic() {
    let outcome = std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            let layer = RefreshLayer::new(refresh_fn(|_| async {
                Ok::<_, RefreshError>(Token::bearer("from-refresher")?)
            }))
            .initial_token(Token::bearer("old").unwrap());
            let handle = layer.token_handle();
            // The API installs a newer token (as a login elsewhere would) and refuses the old
            // one; on `/b` it refuses every token, installing one more first.
            let api = tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
                let handle = handle.clone();
                async move {
                    let auth = authorization(req.headers());
                    let status = match (req.uri().path(), auth.as_str()) {
                        ("/a", "Bearer old") => {
                            handle.set_token(Token::bearer("new").unwrap());
                            StatusCode::UNAUTHORIZED
                        }
                        ("/a", _) => StatusCode::OK,
                        (_, "Bearer new") => {
                            handle.set_token(Token::bearer("newer").unwrap());
                            StatusCode::UNAUTHORIZED
                        }
                        _ => StatusCode::UNAUTHORIZED,
                    };
                    Ok::<_, std::convert::Infallible>(response(status, "denied"))
                }
            });
            let svc = tower::Layer::layer(&layer, api);
            let replayed = svc
                .clone()
                .oneshot(Request::get("/a").body(Full::default()).unwrap())
                .await
                .map(|res| res.status());
            let refused = svc
                .oneshot(Request::get("/b").body(Full::default()).unwrap())
                .await
                .map(|res| res.status())
                .map_err(|e| {
                    e.downcast_ref::<tower_auth_refresh::error::UnauthorizedAfterRefresh>()
                        .map(|e| e.last().body().clone())
                });
            (replayed.map_err(|e| e.to_string()), refused)
        })
    })
    .join();
    let (replayed, refused) = outcome.expect("no panic");
    assert_eq!(replayed, Ok(StatusCode::OK));
    assert_eq!(refused, Err(Some(Bytes::from_static(b"denied"))));
}

/// Review item (tenth session): a request polled on a runtime without its time driver, for a
/// layer whose refresh runs on another runtime (with timers), waits for that refresh. Its own
/// bound for the wait was a Tokio timer, and the caller's task panicked at it.
#[test]
fn a_waiter_on_a_runtime_without_timers_joins_a_refresh_running_elsewhere() {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    // The layer, and so its refresh task, belongs to `main`, which keeps being driven.
    let layer = main.block_on({
        let calls = calls.clone();
        async move {
            RefreshLayer::new(refresh_fn(move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, RefreshError>(Token::bearer("fresh")?)
                }
            }))
        }
    });
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let no_timer = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let seen = no_timer.block_on(async move {
            let api = tower::service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
                Ok::<_, std::convert::Infallible>(response(
                    StatusCode::OK,
                    authorization(req.headers()),
                ))
            });
            let res = tower::Layer::layer(&layer, api)
                .oneshot(Request::get("/").body(Full::default()).unwrap())
                .await
                .map_err(|e| e.to_string())?;
            let body = res.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, String>(String::from_utf8(body.to_vec()).unwrap())
        });
        let _ = done.send(seen);
    });
    // A panic drops the sender (a disconnect); a hang runs into the bound.
    let seen = outcome
        .recv_timeout(Duration::from_secs(10))
        .expect("the request on the runtime without timers panicked or hung");
    assert_eq!(seen, Ok("Bearer fresh".to_owned()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Review item (tenth session): a first request with a non-TLS scheme other than http/ws (an
/// explicit port makes `h2c://host:port` judgeable) is refused as insecure and binds its own
/// origin: the next secure request to another host does not become the first-seen origin
/// (it did, and got the token).
#[tokio::test]
async fn a_refused_request_of_another_plain_scheme_keeps_the_token_from_other_hosts() {
    let seen = Auths::default();
    let layer = holding_tok_secret();
    refused_as_insecure(&layer, &seen, "h2c://api.example:8080/health").await;
    assert_eq!(
        auth_seen_for(&layer, &seen, "https://third-party.example/a")
            .await
            .unwrap(),
        "-"
    );
}

/// Review item (tenth session): clones share the cell (and the first-seen origin), not the
/// options. A strict clone's refused `http://internal.example` binds
/// `https://internal.example` in its place; the clone that allows plain HTTP still sends the
/// token to `http://internal.example` (it went out untouched), and the strict one refuses it
/// again.
#[tokio::test]
async fn a_strict_clones_refusal_does_not_starve_the_clone_that_allows_http() {
    let seen = Auths::default();
    let strict = holding_tok_secret();
    let lax = strict.clone().allow_insecure_http(true);
    refused_as_insecure(&strict, &seen, "http://internal.example/a").await;
    assert_eq!(
        auth_seen_for(&lax, &seen, "http://internal.example/b")
            .await
            .unwrap(),
        "Bearer tok-secret"
    );
    refused_as_insecure(&strict, &seen, "http://internal.example/c").await;
}
