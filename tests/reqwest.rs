//! The reqwest-middleware adapter with a real `reqwest` client against hyper servers on
//! `127.0.0.1:0`.
//!
//! Every test is bounded by [`guard`] and talks to loopback only.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::task::JoinSet;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::error::{
    RefreshRejected, SessionEnded, UnauthorizedAfterRefresh, is_auth_failure,
};
use tower_auth_refresh::reqwest::RefreshMiddleware;
use tower_auth_refresh::{
    Backoff, NoReplay, RefreshError, RefreshLayer, ReplayBody, ReplayMethods, Token, TokenHandle,
    TokenRequest, refresh_fn,
};

use support::{
    authorization, capture_logs, counting_after, get, guard, http_client, rejecting, serve,
};

/// Distinctive secrets, so a leak is unmistakable in any output.
const STALE: &str = "stale-rq-5c2e9a71f0b4";
const FRESH: &str = "fresh-rq-83d0b6e4a21f";

/// What the fake API saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    /// The `Authorization` header, or "-".
    auth: String,
    content_type: Option<String>,
    content_length: Option<String>,
    body: Bytes,
}

/// A fake API on `127.0.0.1:0`: answers 200 (echoing the body) to `Bearer <accepted>` and
/// 401 with an RFC 6750 `invalid_token` challenge to anything else.
#[derive(Clone)]
struct Api {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Api {
    async fn start(accepted: Option<&str>) -> Self {
        let accepted = Arc::new(accepted.map(str::to_owned));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let addr = serve({
            let seen = seen.clone();
            move |req| respond(accepted.clone(), seen.clone(), req)
        })
        .await;
        Self { addr, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests carried `Bearer <secret>`.
    fn count(&self, secret: &str) -> usize {
        let want = format!("Bearer {secret}");
        self.seen().iter().filter(|s| s.auth == want).count()
    }
}

async fn respond(
    accepted: Arc<Option<String>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let header = |name| {
        parts
            .headers
            .get(name)
            .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
    };
    let auth = authorization(&parts.headers);
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        path: parts.uri.path().to_owned(),
        auth: auth.clone(),
        content_type: header(CONTENT_TYPE),
        content_length: header(CONTENT_LENGTH),
        body: body.clone(),
    });
    let ok = accepted
        .as_deref()
        .is_some_and(|t| auth == format!("Bearer {t}"));
    if ok {
        Response::new(Full::new(body))
    } else {
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)
            .body(Full::default())
            .unwrap()
    }
}

fn reqwest_client(middleware: RefreshMiddleware) -> ClientWithMiddleware {
    // `no_proxy`: loopback traffic must not be sent to a proxy configured in the environment.
    let inner = reqwest::Client::builder().no_proxy().build().unwrap();
    ClientBuilder::new(inner).with(middleware).build()
}

/// An API accepting `accepted`, and a reqwest client whose layer starts with `STALE` and
/// refreshes to `FRESH` after `delay`: the API, the refresher's call count, the layer's
/// handle and the client.
async fn stale_client(
    accepted: Option<&str>,
    delay: Duration,
) -> (Api, Arc<AtomicUsize>, TokenHandle, ClientWithMiddleware) {
    let api = Api::start(accepted).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RefreshLayer::new(counting_after(&calls, FRESH, delay))
        .initial_token(Token::bearer(STALE).unwrap());
    let client = reqwest_client(layer.reqwest_middleware());
    (api, calls, layer.token_handle(), client)
}

/// The layer's own error inside a `reqwest_middleware::Error`, downcast.
fn layer_error<E: std::error::Error + Send + Sync + 'static>(
    err: &reqwest_middleware::Error,
) -> Option<&E> {
    match err {
        reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<E>(),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

/// 1,000 concurrent requests with a stale token: one refresh, every request replayed once
/// with the fresh token, and no secret in the TRACE-level logs.
///
/// Current-thread runtime: the thread-local subscriber sees every task's events.
#[tokio::test(flavor = "current_thread")]
async fn stampede_of_1000_refreshes_once_and_replays_each_request_once() {
    // 1,000 with enough open files; fewer under the usual limit (see `connection_budget`).
    let n = support::connection_budget(1000);
    let (logs, _tracing) = capture_logs();

    guard(async {
        let (api, calls, handle, client) =
            stale_client(Some(FRESH), Duration::from_millis(20)).await;

        let mut tasks = JoinSet::new();
        for i in 0..n {
            let (client, url) = (client.clone(), api.url(&format!("/items/{i}")));
            tasks.spawn(async move {
                let res = client.post(url).body(format!("item {i}")).send().await?;
                let status = res.status();
                let body = res.bytes().await?;
                Ok::<_, reqwest_middleware::Error>((i, status, body))
            });
        }
        let mut ok = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, status, body) = joined.unwrap().unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, format!("item {i}"));
            ok += 1;
        }

        assert_eq!(ok, n);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "exactly one refresh");
        // Requests sent before the first 401 came back went out stale and were replayed once;
        // the rest waited for the refresh instead of sending a token already refused.
        let stale = api.count(STALE);
        assert!((1..=n).contains(&stale), "stale sends: {stale}");
        assert_eq!(api.count(FRESH), n, "every request went out fresh once");
        assert_eq!(api.seen().len(), stale + n);
        assert_eq!(handle.state().generation(), 2);
    })
    .await;

    let text = logs.text();
    assert!(
        text.contains("tower_auth_refresh::replay")
            && text.contains("replaying request with a fresh token")
            && text.contains("token refresh succeeded"),
        "the middleware's and the cell's events were captured"
    );
    assert!(
        !text.contains(STALE) && !text.contains(FRESH),
        "a token leaked into the logs"
    );
}

/// A JSON POST refused with 401 is replayed with the same bytes and content headers.
#[tokio::test]
async fn post_json_body_is_replayed_byte_for_byte() {
    guard(async {
        let (api, calls, _, client) = stale_client(Some(FRESH), Duration::ZERO).await;

        let json = r#"{"order":{"id":42,"items":["é","\u0000",[1,2.5e3]],"note":"  spaces  "}}"#;
        let res = client
            .post(api.url("/orders"))
            .header(CONTENT_TYPE, "application/json")
            .body(json)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.bytes().await.unwrap(), json.as_bytes());

        let seen = api.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].auth, format!("Bearer {STALE}"));
        assert_eq!(seen[1].auth, format!("Bearer {FRESH}"));
        for s in &seen {
            assert_eq!(s.body, json.as_bytes());
            assert_eq!(s.content_type.as_deref(), Some("application/json"));
            assert_eq!(s.content_length, Some(json.len().to_string()));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// `max_replay_body` holds for bodies reqwest can clone too, as in the tower layer: a body
/// over the cap is sent once; refused, the caller gets the 401 after the refresh ran, and a
/// body within the cap is replayed.
#[tokio::test]
async fn an_in_memory_body_over_the_cap_is_sent_once_as_in_the_tower_layer() {
    guard(async {
        let api = Api::start(Some(FRESH)).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting_after(&calls, FRESH, Duration::ZERO))
            .initial_token(Token::bearer(STALE).unwrap())
            .max_replay_body(16);
        let client = reqwest_client(layer.reqwest_middleware());

        let big = vec![b'x'; 1024];
        let res = client
            .post(api.url("/big"))
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(api.seen().len(), 1, "sent once, never replayed");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the refresh ran");

        let small = b"sixteen bytes!!!".to_vec();
        layer
            .token_handle()
            .set_token(Token::bearer(STALE).unwrap());
        let res = client
            .post(api.url("/small"))
            .body(small.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen = api.seen();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2].body, small);
    })
    .await;
}

/// A streaming body of known size (in memory, but not cloneable by reqwest) is captured as
/// it streams out and replayed, as the tower layer does.
#[tokio::test]
async fn streaming_body_of_known_size_is_captured_and_replayed() {
    guard(async {
        let (api, calls, _, client) = stale_client(Some(FRESH), Duration::ZERO).await;

        let payload = "x".repeat(64 * 1024);
        let body = reqwest::Body::wrap(Full::new(Bytes::from(payload.clone())));
        assert!(body.as_bytes().is_none(), "a streaming body");
        let res = client
            .put(api.url("/blob"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);

        let seen = api.seen();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|s| s.body == payload.as_bytes()));
        assert_eq!(seen[1].auth, format!("Bearer {FRESH}"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// A streaming body of unknown size cannot be cloned, but a small one is captured while it
/// streams (up to the cap) and replayed byte for byte; no "request not cloneable" failure up
/// front.
#[tokio::test]
async fn small_stream_of_unknown_size_is_captured_and_replayed_byte_for_byte() {
    guard(async {
        let (api, calls, handle, client) = stale_client(Some(FRESH), Duration::ZERO).await;

        let chunks = ["chunk-1;", "chunk-2;", "chunk-3"]
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from_static(c.as_bytes()))));
        let body = reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(chunks)));
        let req = client.post(api.url("/upload")).body(body);
        assert!(req.try_clone().is_none(), "the request is not cloneable");

        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);

        let seen = api.seen();
        assert_eq!(seen.len(), 2, "sent stale, then replayed once");
        assert_eq!(seen[0].auth, format!("Bearer {STALE}"));
        assert_eq!(seen[1].auth, format!("Bearer {FRESH}"));
        assert_eq!(seen[0].body, "chunk-1;chunk-2;chunk-3");
        assert_eq!(seen[1].body, "chunk-1;chunk-2;chunk-3");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(handle.state().generation(), 2);

        // A later request goes out with the new token.
        let res = client.get(api.url("/after")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(api.seen()[2].auth, format!("Bearer {FRESH}"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// A replay refused again is the typed `UnauthorizedAfterRefresh`, with both response heads.
#[tokio::test]
async fn second_401_is_unauthorized_after_refresh() {
    guard(async {
        // Accepts no token at all.
        let (api, calls, _, client) = stale_client(None, Duration::ZERO).await;

        let err = client
            .get(api.url("/secret"))
            .send()
            .await
            .expect_err("refused twice");
        assert!(err.is_middleware());
        let typed = layer_error::<UnauthorizedAfterRefresh>(&err).expect("typed error");
        assert_eq!(
            typed.first().expect("the first 401").status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(typed.last().status(), StatusCode::UNAUTHORIZED);
        assert!(typed.last().headers().contains_key(WWW_AUTHENTICATE));
        let reqwest_middleware::Error::Middleware(inner) = &err else {
            unreachable!()
        };
        assert!(is_auth_failure(&**inner));
        assert!(!format!("{err:?}").contains(FRESH));

        let seen = api.seen();
        assert_eq!(seen.len(), 2, "replayed exactly once");
        assert_eq!(seen[1].auth, format!("Bearer {FRESH}"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// A terminal refresh failure reaches the request as `RefreshRejected` (with the 401 that
/// caused it); later requests fail fast with `SessionEnded`, without a network call, until a
/// new token is installed.
#[tokio::test]
async fn terminal_failure_is_rejected_then_session_ended_without_network_calls() {
    guard(async {
        let api = Api::start(Some(FRESH)).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(rejecting(&calls))
            .initial_token(Token::bearer(STALE).unwrap())
            .retries(Backoff::none());
        let middleware = layer.reqwest_middleware();
        let handle = middleware.token_handle();
        let client = reqwest_client(middleware);

        let err = client.get(api.url("/a")).send().await.unwrap_err();
        let rejected = layer_error::<RefreshRejected>(&err).expect("RefreshRejected");
        assert_eq!(
            rejected.unauthorized().map(|h| h.status()),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert!(rejected.refresh_error().is_terminal());
        assert_eq!(api.seen().len(), 1);
        assert!(handle.state().session_ended());

        for _ in 0..5 {
            let err = client.get(api.url("/b")).send().await.unwrap_err();
            let ended = layer_error::<SessionEnded>(&err).expect("SessionEnded");
            assert!(ended.cause().is_terminal());
        }
        assert_eq!(
            api.seen().len(),
            1,
            "no network call after the session ended"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no refresh after the session ended"
        );

        // A login resumes the session.
        handle.set_token(Token::bearer(FRESH).unwrap());
        let res = client.get(api.url("/c")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    })
    .await;
}

/// A tower client and a reqwest client built from one layer share the token: one refresh,
/// started by whichever saw the 401 first, serves both.
#[tokio::test]
async fn reqwest_middleware_and_tower_service_share_one_token() {
    guard(async {
        let api = Api::start(Some(FRESH)).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting_after(&calls, FRESH, Duration::from_millis(50)))
            .initial_token(Token::bearer(STALE).unwrap());
        let reqwest_client = reqwest_client(RefreshMiddleware::from_layer(&layer));
        let tower_client = ServiceBuilder::new()
            .layer(layer.clone())
            .service(http_client::<ReplayBody<Full<Bytes>>>());

        let via_reqwest = reqwest_client.get(api.url("/reqwest")).send();
        let via_tower = tower_client.clone().oneshot(get(api.url("/tower")));
        let (a, b) = tokio::join!(via_reqwest, via_tower);
        assert_eq!(a.unwrap().status(), StatusCode::OK);
        assert_eq!(b.unwrap().status(), StatusCode::OK);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one refresh for both clients"
        );
        assert_eq!(api.count(STALE), 2);
        assert_eq!(api.count(FRESH), 2);

        // Afterwards both send the fresh token straight away.
        let a = reqwest_client
            .get(api.url("/reqwest"))
            .send()
            .await
            .unwrap();
        let b = tower_client.oneshot(get(api.url("/tower"))).await.unwrap();
        assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
        assert_eq!(api.count(FRESH), 4);
        assert_eq!(api.count(STALE), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(layer.token_handle().state().generation(), 2);
    })
    .await;
}

/// Requests that must not be touched pass through; `NoReplay` keeps the token but returns
/// the 401; `ReplayMethods::Idempotent` returns a POST's 401 after refreshing; a layer with no
/// token refreshes before the first send.
#[tokio::test]
async fn markers_origins_and_replay_policy_are_honoured() {
    guard(async {
        let api = Api::start(Some(FRESH)).await;
        let other = Api::start(Some(FRESH)).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting_after(&calls, FRESH, Duration::ZERO))
            .initial_token(Token::bearer(STALE).unwrap())
            .replay_methods(ReplayMethods::Idempotent)
            .allowed_origins([api.url("")])
            .unwrap();
        let client = reqwest_client(layer.reqwest_middleware());

        // Another origin: no token, no refresh.
        let res = client.get(other.url("/x")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(other.seen()[0].auth, "-");

        // The caller's own Authorization header is left alone.
        let res = client
            .get(api.url("/own"))
            .header(AUTHORIZATION, "Basic dTpw")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        // A refresher's own request: no token.
        let res = client
            .get(api.url("/token"))
            .with_extension(TokenRequest)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        // NoReplay: the token is attached, the 401 comes back, nothing is refreshed.
        let res = client
            .get(api.url("/no-refresh"))
            .with_extension(NoReplay)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let auths: Vec<_> = api.seen().into_iter().map(|s| s.auth).collect();
        assert_eq!(
            auths,
            [
                "Basic dTpw".to_owned(),
                "-".to_owned(),
                format!("Bearer {STALE}")
            ]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        // Idempotent only: a POST's 401 is returned, after the refresh.
        let res = client
            .post(api.url("/orders"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(api.seen().len(), 4);
        // ...and the next one goes out fresh.
        let res = client.get(api.url("/next")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(api.seen()[4].auth, format!("Bearer {FRESH}"));

        // No token at all: the first request waits for a refresh, then goes out once.
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting_after(&calls, FRESH, Duration::ZERO));
        let client = reqwest_client(layer.reqwest_middleware());
        let res = client.get(api.url("/first")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(api.seen().last().unwrap().auth, format!("Bearer {FRESH}"));
        assert_eq!(api.seen().len(), 6);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// A refresher that sends its token request through the very client wearing the middleware
/// is not intercepted (no deadlock, no token on the token request).
#[tokio::test]
async fn refresher_sending_through_the_same_client_passes_through() {
    guard(async {
        let api = Api::start(Some(FRESH)).await;
        let slot: Arc<Mutex<Option<(ClientWithMiddleware, String)>>> = Arc::default();
        let refresher = refresh_fn({
            let slot = slot.clone();
            move |_stale: Option<Token>| {
                let (client, url) = slot.lock().unwrap().clone().expect("client installed");
                async move {
                    let res = client
                        .post(url)
                        .send()
                        .await
                        .map_err(RefreshError::transient)?;
                    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
                    Ok::<_, RefreshError>(Token::bearer(FRESH)?)
                }
            }
        });
        let layer = RefreshLayer::new(refresher).initial_token(Token::bearer(STALE).unwrap());
        let client = reqwest_client(layer.reqwest_middleware());
        *slot.lock().unwrap() = Some((client.clone(), api.url("/oauth/token")));

        let res = client.get(api.url("/data")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen: Vec<_> = api.seen().into_iter().map(|s| (s.path, s.auth)).collect();
        assert_eq!(
            seen,
            [
                ("/data".to_owned(), format!("Bearer {STALE}")),
                ("/oauth/token".to_owned(), "-".to_owned()),
                ("/data".to_owned(), format!("Bearer {FRESH}")),
            ]
        );
    })
    .await;
}

#[test]
fn debug_of_the_middleware_shows_no_token() {
    let layer = RefreshLayer::new(refresh_fn(|_| async {
        Ok::<_, RefreshError>(Token::bearer(FRESH)?)
    }))
    .initial_token(Token::bearer(STALE).unwrap());
    let middleware = layer.reqwest_middleware();
    let printed = format!(
        "{middleware:?} {middleware:#?} {:?}",
        middleware.token_handle()
    );
    assert!(printed.contains("RefreshMiddleware"));
    assert!(!printed.contains(STALE) && !printed.contains(FRESH));
    assert!(!printed.contains("stale-rq") && !printed.contains("fresh-rq"));
}

/// The origin check reads the URL's text first and falls back to comparing host and port:
/// an allowed origin written in capitals, or with its default port, still gets the token;
/// another port of the same host and the first-seen rule's other origins do not.
#[tokio::test]
async fn origins_match_however_they_are_written_and_nothing_else_does() {
    guard(async {
        let api = Api::start(Some(FRESH)).await;
        let other_port = Api::start(Some(FRESH)).await;
        let port = api.addr.port();
        let layer = RefreshLayer::new(counting_after(&Arc::default(), FRESH, Duration::ZERO))
            .initial_token(Token::bearer(FRESH).unwrap())
            .allowed_origins([format!("HTTP://LOCALHOST:{port}")])
            .unwrap();
        let client = reqwest_client(layer.reqwest_middleware());
        let res = client
            .get(format!("http://localhost:{port}/a"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(api.seen()[0].auth, format!("Bearer {FRESH}"));
        let res = client
            .get(format!("http://localhost:{}/b", other_port.addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(other_port.seen()[0].auth, "-");

        // First seen: `127.0.0.1:port` binds the token; `localhost:port` is another origin.
        let layer = RefreshLayer::new(counting_after(&Arc::default(), FRESH, Duration::ZERO))
            .initial_token(Token::bearer(FRESH).unwrap());
        let client = reqwest_client(layer.reqwest_middleware());
        let res = client.get(api.url("/c")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let res = client
            .get(format!("http://localhost:{port}/d"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let auths: Vec<_> = api.seen().into_iter().map(|s| s.auth).collect();
        assert_eq!(auths[1..], [format!("Bearer {FRESH}"), "-".to_owned()]);
    })
    .await;
}

/// What the API of [`the_replay_is_the_request_as_reqwest_sent_it`] saw of one request.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    method: http::Method,
    version: http::Version,
    uri: String,
    auth: String,
    trace: Option<String>,
    /// Every header but `Authorization`, in the order they came.
    headers: Vec<(String, Vec<u8>)>,
    body: Bytes,
}

/// What a middleware below the refresh middleware saw of one request: its URL (fragment and
/// all) and each header but `Authorization`, with whether it is marked sensitive.
#[derive(Debug, Clone, PartialEq)]
struct Below {
    url: String,
    headers: Vec<(String, Vec<u8>, bool)>,
    timeout: Option<Duration>,
}

/// Records [`Below`] for every request it passes on.
struct Recorder(Arc<Mutex<Vec<Below>>>);

// The signature `#[async_trait]` generates for `Middleware::handle`, written out.
impl reqwest_middleware::Middleware for Recorder {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        req: reqwest::Request,
        extensions: &'life1 mut http::Extensions,
        next: reqwest_middleware::Next<'life2>,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = reqwest_middleware::Result<reqwest::Response>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.0.lock().unwrap().push(Below {
            url: req.url().to_string(),
            headers: req
                .headers()
                .iter()
                .filter(|(name, _)| *name != AUTHORIZATION)
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
                .collect(),
            timeout: req.timeout().copied(),
        });
        next.run(req, extensions)
    }
}

/// The replay is the request as reqwest sent it the first time (the middleware copies it
/// field by field, not with `Request::try_clone`): method, URL with its query, headers (every
/// value of a name, in order, any bytes, sensitive ones still marked so for a middleware
/// below), HTTP version and body, with only the token changed; and the request's own timeout
/// holds for the replay too (a replay without it would wait for the slow answer and succeed).
#[tokio::test]
async fn the_replay_is_the_request_as_reqwest_sent_it() {
    guard(async {
        let seen = Arc::new(Mutex::new(Vec::<Sent>::new()));
        let addr = serve({
            let seen = seen.clone();
            move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap();
                    let auth = authorization(&parts.headers);
                    seen.lock().unwrap().push(Sent {
                        method: parts.method.clone(),
                        version: parts.version,
                        uri: parts.uri.to_string(),
                        auth: auth.clone(),
                        trace: parts
                            .headers
                            .get("x-trace")
                            .map(|v| v.to_str().unwrap().to_owned()),
                        headers: parts
                            .headers
                            .iter()
                            .filter(|(name, _)| *name != AUTHORIZATION)
                            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                            .collect(),
                        body,
                    });
                    if auth != format!("Bearer {FRESH}") {
                        return Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .header(WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)
                            .body(Full::default())
                            .unwrap();
                    }
                    if parts.uri.path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Response::new(Full::new(Bytes::from_static(b"done")))
                }
            }
        })
        .await;
        let below = Arc::new(Mutex::new(Vec::<Below>::new()));
        let stale_client = || {
            let layer = RefreshLayer::new(counting_after(&Arc::default(), FRESH, Duration::ZERO))
                .initial_token(Token::bearer(STALE).unwrap());
            let inner = reqwest::Client::builder().no_proxy().build().unwrap();
            ClientBuilder::new(inner)
                .with(layer.reqwest_middleware())
                .with(Recorder(below.clone()))
                .build()
        };

        let mut key = http::HeaderValue::from_static("key-5e1f");
        key.set_sensitive(true);
        let res = stale_client()
            .put(format!("http://{addr}/items/7?tag=a%20b&n=1#part-2"))
            .version(http::Version::HTTP_10)
            .header("x-trace", "trace-1")
            .header("x-multi", "one")
            .header("X-Api-Key", key)
            .header("x-multi", "two")
            .header(
                "x-bytes",
                http::HeaderValue::from_bytes(b"caf\xc3\xa9 \x80").unwrap(),
            )
            .header("x-empty", "")
            .body(Bytes::from_static(b"\x00payload\xff"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.bytes().await.unwrap(), "done");
        let sent = std::mem::take(&mut *seen.lock().unwrap());
        assert_eq!(sent.len(), 2);
        let first = Sent {
            method: http::Method::PUT,
            version: http::Version::HTTP_10,
            uri: "/items/7?tag=a%20b&n=1".to_owned(),
            auth: format!("Bearer {STALE}"),
            trace: Some("trace-1".to_owned()),
            headers: sent[0].headers.clone(),
            body: Bytes::from_static(b"\x00payload\xff"),
        };
        assert_eq!(sent[0], first);
        // Every header the caller set arrived, every value of a name in order, bytes as set.
        let own: Vec<_> = first
            .headers
            .iter()
            .filter(|(name, _)| name.starts_with("x-"))
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        assert_eq!(
            own,
            [
                ("x-trace", &b"trace-1"[..]),
                ("x-multi", b"one"),
                ("x-multi", b"two"),
                ("x-api-key", b"key-5e1f"),
                ("x-bytes", b"caf\xc3\xa9 \x80"),
                ("x-empty", b""),
            ]
        );
        // Below the middleware, the replay is the first request again: the URL with its
        // fragment (never sent), each header with its sensitivity, the timeout (none).
        let below_seen = std::mem::take(&mut *below.lock().unwrap());
        assert_eq!(below_seen.len(), 2);
        assert_eq!(
            below_seen[0].url,
            format!("http://{addr}/items/7?tag=a%20b&n=1#part-2")
        );
        assert!(
            below_seen[0]
                .headers
                .iter()
                .any(|(name, _, sensitive)| name == "x-api-key" && *sensitive)
        );
        assert_eq!(below_seen[1], below_seen[0]);
        let replay = Sent {
            auth: format!("Bearer {FRESH}"),
            ..first
        };
        assert_eq!(sent[1], replay);

        // The request's timeout (2 s) holds for the replay, answered after 30 s.
        let err = stale_client()
            .get(format!("http://{addr}/slow"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        let auths: Vec<_> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.auth.clone())
            .collect();
        assert_eq!(
            auths,
            [format!("Bearer {STALE}"), format!("Bearer {FRESH}")]
        );
        let timeouts: Vec<_> = below.lock().unwrap().iter().map(|b| b.timeout).collect();
        assert_eq!(timeouts, [Some(Duration::from_secs(2)); 2]);
    })
    .await;
}

/// Review item (eleventh session), as in the tower layer
/// (`tests/lifecycle.rs::a_held_token_refused_after_a_failed_leeway_refresh_is_never_sent_again`):
/// the token the layer holds, sent after a failed refresh inside the leeway and refused, is a
/// first refusal of it: recorded (never sent again) and answered with the 401 during the
/// cool-down. It failed with `UnauthorizedAfterRefresh`, and the next request sent it again.
#[tokio::test]
async fn a_held_token_refused_after_a_failed_leeway_refresh_is_never_sent_again() {
    guard(async {
        const HELD: &str = "held-leeway-rq-8b2e07";
        let seen = Arc::new(Mutex::new(Vec::new()));
        let addr = serve({
            let seen = seen.clone();
            move |req: Request<Incoming>| {
                seen.lock().unwrap().push(authorization(req.headers()));
                std::future::ready(
                    Response::builder()
                        .status(StatusCode::UNAUTHORIZED)
                        .header(WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            }
        })
        .await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = support::in_leeway_with_the_endpoint_down(HELD, &calls);
        let client = reqwest_client(layer.reqwest_middleware());
        let url = format!("http://{addr}/r");

        let first = client.get(&url).send().await;
        assert_eq!(
            first.expect("the refusal itself, not an error").status(),
            StatusCode::UNAUTHORIZED
        );
        let err = client
            .get(&url)
            .send()
            .await
            .expect_err("the refused token is not sent again");
        let failed = layer_error::<tower_auth_refresh::error::RefreshFailed>(&err)
            .expect("the cool-down of the failed refresh");
        assert!(failed.next_attempt_in().is_some(), "{err}");
        assert_eq!(
            *seen.lock().unwrap(),
            [format!("Bearer {HELD}")],
            "one send in all"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh attempt");
    })
    .await;
}

/// As in the tower layer
/// (`tests/lifecycle.rs::a_held_token_refused_after_a_failed_leeway_refresh_is_replayed_once_refreshed`):
/// without a cool-down and with the token endpoint back, the refused held token is refreshed
/// and the POST replayed once with the new token, its body byte for byte.
#[tokio::test]
async fn a_held_token_refused_after_a_failed_leeway_refresh_is_replayed_once_refreshed() {
    guard(async {
        const HELD: &str = "held-leeway-rq-1f6b90";
        let seen = Arc::new(Mutex::new(Vec::new()));
        let addr = serve({
            let seen = seen.clone();
            move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let auth = authorization(req.headers());
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let ok = auth == format!("Bearer {FRESH}");
                    seen.lock().unwrap().push((auth, body));
                    let status = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::UNAUTHORIZED
                    };
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                }
            }
        })
        .await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = support::in_leeway_then(HELD, &calls, Some(FRESH))
            .cooldown(tower_auth_refresh::Cooldown::none());
        let client = reqwest_client(layer.reqwest_middleware());
        let payload = Bytes::from_static(b"{\"order\":42}");

        let res = client
            .post(format!("http://{addr}/orders"))
            .body(payload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                (format!("Bearer {HELD}"), payload.clone()),
                (format!("Bearer {FRESH}"), payload),
            ],
            "sent with the held token, then replayed once with the new one"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    })
    .await;
}
