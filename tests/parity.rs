//! Parity with Ktor's bearer auth, OkHttp's `Authenticator` and axios-auth-refresh: anonymous
//! requests while logged out, the attach rule, invalidate without logout, the final 401 as a
//! response, re-entrant refreshes, and where the token may go (origins, plain http).
//!
//! Network tests talk to hyper servers on `127.0.0.1:0` through a real client; the plain-http
//! tests use an in-memory service so that no request can leave the machine.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::WWW_AUTHENTICATE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::error::{
    InsecureTransport, ReentrantRefresh, RefreshRejected, SessionEnded, UnauthorizedAfterRefresh,
    is_auth_failure,
};
use tower_auth_refresh::keyed::KeyedRefreshLayer;
use tower_auth_refresh::{
    BoxError, RefreshContext, RefreshError, RefreshLayer, RefreshOptions, RefreshReason,
    ReplayBody, Token, TokenHandle, TokenRefresher, context_fn,
};

use support::{InMemoryApi, authorization, counting, get, guard, http_client, rejecting, serve};

type Body = Full<Bytes>;

// ---------------------------------------------------------------------------------------------
// A recording API on 127.0.0.1:0.

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hit {
    path: String,
    /// The `Authorization` header, or "-".
    auth: String,
}

/// Every request a server saw, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Hit>>>);

impl Log {
    fn hits(&self) -> Vec<Hit> {
        self.0.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// The `Authorization` headers of the requests for `path`, in order.
    fn auths(&self, path: &str) -> Vec<String> {
        self.hits()
            .into_iter()
            .filter(|h| h.path == path)
            .map(|h| h.auth)
            .collect()
    }
}

/// Serves `rule(path, authorization, hits so far including this one)`, recording each request.
async fn api<F>(rule: F) -> (SocketAddr, Log)
where
    F: Fn(&str, &str, usize) -> Response<Body> + Clone + Send + Sync + 'static,
{
    let log = Log::default();
    let addr = serve({
        let log = log.clone();
        move |req: Request<Incoming>| {
            let hit = Hit {
                path: req.uri().path().to_owned(),
                auth: authorization(req.headers()),
            };
            let n = {
                let mut hits = log.0.lock().unwrap();
                hits.push(hit.clone());
                hits.len()
            };
            std::future::ready(rule(&hit.path, &hit.auth, n))
        }
    })
    .await;
    (addr, log)
}

fn respond(status: StatusCode, challenge: Option<&'static str>, body: String) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    if let Some(challenge) = challenge {
        res.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    }
    res
}

const REALM: &str = r#"Bearer realm="api""#;

/// `/public` for everyone; `/protected` only for `Bearer good`, else 401 with a challenge.
fn public_and_protected(path: &str, auth: &str, _n: usize) -> Response<Body> {
    match path {
        "/public" => respond(StatusCode::OK, None, "public".into()),
        "/protected" if auth == "Bearer good" => {
            respond(StatusCode::OK, None, "protected data".into())
        }
        _ => respond(
            StatusCode::UNAUTHORIZED,
            Some(REALM),
            "login required".into(),
        ),
    }
}

/// The tower stack of these tests: the layer over a hyper-util client.
type Stack = tower_auth_refresh::Refresh<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        ReplayBody<Body>,
    >,
>;

fn stack(layer: RefreshLayer) -> Stack {
    ServiceBuilder::new()
        .layer(layer)
        .service(http_client::<ReplayBody<Body>>())
}

/// Sends a GET for `url` and reads the whole response.
async fn fetch(svc: &Stack, url: String) -> Result<(StatusCode, http::HeaderMap, Bytes), BoxError> {
    let res = svc.clone().oneshot(get(url)).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

// ---------------------------------------------------------------------------------------------
// 1. Anonymous while logged out (Ktor: no tokens loaded; axios: no interceptor credentials).

#[tokio::test]
async fn anonymous_after_a_terminal_refresh_failure_sends_requests_untouched() {
    guard(async {
        let (addr, log) = api(public_and_protected).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(rejecting(&calls)).anonymous_when_logged_out(true);
        let handle = layer.token_handle();
        let svc = stack(layer);

        // The first request asks for a token; the refresher fails for good; it goes out bare.
        let (status, _, body) = fetch(&svc, url(addr, "/public")).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"public"[..]));
        assert!(handle.state().session_ended());

        // The protected route answers for itself: its 401 is the caller's response.
        let (status, headers, body) = fetch(&svc, url(addr, "/protected")).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[WWW_AUTHENTICATE], REALM);
        assert_eq!(&body[..], b"login required");
        let (status, _, _) = fetch(&svc, url(addr, "/public")).await.unwrap();
        assert_eq!(status, StatusCode::OK);

        // One refresher call (the failed one), one server hit per request, none authenticated.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(log.len(), 3, "nothing was replayed");
        assert!(log.hits().iter().all(|h| h.auth == "-"), "{:?}", log.hits());

        // Installing a token switches authentication back on.
        handle.set_token(Token::bearer("good").unwrap());
        let (status, _, body) = fetch(&svc, url(addr, "/protected")).await.unwrap();
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"protected data"[..])
        );
        assert_eq!(log.auths("/protected"), ["-", "Bearer good"]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn anonymous_after_logout_sends_requests_untouched_until_a_token_is_set() {
    guard(async {
        let (addr, log) = api(public_and_protected).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting(&calls, "good"))
            .initial_token(Token::bearer("good").unwrap())
            .anonymous_when_logged_out(true);
        let handle = layer.token_handle();
        let svc = stack(layer);

        let (status, _, _) = fetch(&svc, url(addr, "/protected")).await.unwrap();
        assert_eq!(status, StatusCode::OK);

        handle.clear();
        let (status, _, _) = fetch(&svc, url(addr, "/public")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let (status, _, body) = fetch(&svc, url(addr, "/protected")).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(&body[..], b"login required");
        assert_eq!(calls.load(Ordering::SeqCst), 0, "never refreshed");
        assert_eq!(
            log.hits(),
            [
                Hit {
                    path: "/protected".into(),
                    auth: "Bearer good".into()
                },
                Hit {
                    path: "/public".into(),
                    auth: "-".into()
                },
                Hit {
                    path: "/protected".into(),
                    auth: "-".into()
                },
            ],
            "no replay, no token after the logout"
        );

        handle.set_token(Token::bearer("good").unwrap());
        let (status, _, _) = fetch(&svc, url(addr, "/protected")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(log.auths("/protected").last().unwrap(), "Bearer good");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    })
    .await;
}

/// A request refused with a token whose refresh then fails terminally gets that refusal as
/// its response in anonymous mode (the session ended under it); later requests go out bare.
#[tokio::test]
async fn anonymous_mode_returns_the_401_whose_refresh_ended_the_session() {
    guard(async {
        let (addr, log) = api(public_and_protected).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(rejecting(&calls))
            .initial_token(Token::bearer("revoked-token").unwrap())
            .anonymous_when_logged_out(true);
        let handle = layer.token_handle();
        let svc = stack(layer);

        let (status, headers, body) = fetch(&svc, url(addr, "/protected")).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[WWW_AUTHENTICATE], REALM);
        assert_eq!(&body[..], b"login required");
        assert!(handle.state().session_ended());
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let (status, _, _) = fetch(&svc, url(addr, "/protected")).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = fetch(&svc, url(addr, "/public")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(log.auths("/protected"), ["Bearer revoked-token", "-"]);
        assert_eq!(log.auths("/public"), ["-"]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn without_anonymous_mode_a_logged_out_session_fails_and_sends_nothing() {
    guard(async {
        let (addr, log) = api(public_and_protected).await;

        // The refresher fails terminally: RefreshRejected, then SessionEnded, nothing sent.
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = stack(RefreshLayer::new(rejecting(&calls)));
        let err = fetch(&svc, url(addr, "/public")).await.unwrap_err();
        assert!(err.is::<RefreshRejected>(), "{err}");
        for path in ["/public", "/protected"] {
            let err = fetch(&svc, url(addr, path)).await.unwrap_err();
            assert!(err.is::<SessionEnded>(), "{err}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(log.len(), 0, "nothing was sent");

        // A logout: SessionEnded at once, without the refresher or the network.
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting(&calls, "good"))
            .initial_token(Token::bearer("good").unwrap());
        let handle = layer.token_handle();
        let svc = stack(layer);
        fetch(&svc, url(addr, "/protected")).await.unwrap();
        handle.clear();
        for path in ["/public", "/protected"] {
            let err = fetch(&svc, url(addr, path)).await.unwrap_err();
            assert!(err.is::<SessionEnded>(), "{err}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(log.len(), 1, "only the request before the logout was sent");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. The attach rule (Ktor's `sendWithoutRequest`, axios' `skipAuthRefresh` per request).

#[tokio::test]
async fn attach_rule_keeps_the_token_off_excluded_paths_of_the_same_origin() {
    guard(async {
        // `/basic` wants Basic credentials and refuses everything else with 401.
        let (addr, log) = api(|path: &str, auth: &str, _| match path {
            "/basic" => respond(
                StatusCode::UNAUTHORIZED,
                Some(r#"Basic realm="legacy""#),
                String::new(),
            ),
            _ if auth == "Bearer tok" => respond(StatusCode::OK, None, String::new()),
            _ => respond(StatusCode::UNAUTHORIZED, Some(REALM), String::new()),
        })
        .await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting(&calls, "tok"))
            .initial_token(Token::bearer("tok").unwrap())
            .attach_when(|req| req.uri().path() != "/basic");
        let svc = stack(layer);

        for path in ["/basic", "/api", "/basic", "/basic/child"] {
            let expected = if path == "/basic" {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            };
            let (status, _, _) = fetch(&svc, url(addr, path)).await.unwrap();
            assert_eq!(status, expected, "{path}");
        }
        assert_eq!(log.auths("/basic"), ["-", "-"]);
        assert_eq!(log.auths("/api"), ["Bearer tok"]);
        assert_eq!(log.auths("/basic/child"), ["Bearer tok"]);
        // The 401s of the excluded path triggered no refresh and no replay.
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(log.len(), 4);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Invalidate without logging out (Ktor's `clearToken`).

/// What a [`Rotating`] refresher was told, per call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Asked {
    stale: Option<String>,
    stale_refresh_token: Option<String>,
    reason: &'static str,
}

#[derive(Default)]
struct RotatingState {
    calls: AtomicUsize,
    logouts: AtomicUsize,
    asked: Mutex<Vec<Asked>>,
    /// Each call waits for one permit when set.
    gate: OnceLock<Arc<tokio::sync::Semaphore>>,
}

/// A refresher issuing `access-N` with the refresh token `rt-N`, recording its context.
#[derive(Clone, Default)]
struct Rotating(Arc<RotatingState>);

fn reason_name(reason: &RefreshReason) -> &'static str {
    match reason {
        RefreshReason::NoToken => "NoToken",
        RefreshReason::Expired => "Expired",
        RefreshReason::Unauthorized(_) => "Unauthorized",
        RefreshReason::Forced => "Forced",
        RefreshReason::Background => "Background",
        _ => "other",
    }
}

impl TokenRefresher for Rotating {
    type Future = Pin<Box<dyn Future<Output = Result<Token, RefreshError>> + Send>>;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let n = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.asked.lock().unwrap().push(Asked {
            stale: ctx.stale().map(|t| t.secret().to_owned()),
            stale_refresh_token: ctx
                .stale()
                .and_then(|t| t.refresh_token().map(str::to_owned)),
            reason: reason_name(ctx.reason()),
        });
        let gate = self.0.gate.get().cloned();
        Box::pin(async move {
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            Ok(Token::bearer(format!("access-{n}"))?.with_refresh_token(format!("rt-{n}")))
        })
    }

    fn logout(&self) {
        self.0.logouts.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn invalidate_refreshes_with_the_dropped_token_set_and_concurrent_requests_share_it() {
    guard(async {
        let (addr, log) =
            api(|_: &str, _: &str, _| respond(StatusCode::OK, None, String::new())).await;
        let refresher = Rotating::default();
        let state = refresher.0.clone();
        let layer = RefreshLayer::new(refresher).initial_token(
            Token::bearer("access-0")
                .unwrap()
                .with_refresh_token("rt-0"),
        );
        let handle = layer.token_handle();
        let svc = stack(layer);

        fetch(&svc, url(addr, "/a")).await.unwrap();
        assert_eq!(log.auths("/a"), ["Bearer access-0"]);

        // Invalidate: not a logout; the next request gets a new token through the refresher.
        handle.invalidate();
        assert!(!handle.state().has_token());
        assert!(!handle.state().session_ended());
        fetch(&svc, url(addr, "/b")).await.unwrap();
        assert_eq!(log.auths("/b"), ["Bearer access-1"]);
        assert_eq!(
            state.asked.lock().unwrap()[0],
            Asked {
                stale: Some("access-0".into()),
                stale_refresh_token: Some("rt-0".into()),
                reason: "NoToken",
            },
            "the refresher gets the invalidated token set"
        );

        // 50 concurrent requests after an invalidate: one refresh. The refresh is held until
        // it has started, so the requests pile up behind it.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        state.gate.set(gate.clone()).ok().unwrap();
        handle.invalidate();
        let requests: Vec<_> = (0..50)
            .map(|_| tokio::spawn(fetch_owned(svc.clone(), url(addr, "/c"))))
            .collect();
        for _ in 0..10_000 {
            if state.calls.load(Ordering::SeqCst) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(state.calls.load(Ordering::SeqCst), 2, "the refresh started");
        gate.add_permits(50);
        for r in requests {
            assert_eq!(r.await.unwrap().unwrap(), StatusCode::OK);
        }
        assert_eq!(
            state.calls.load(Ordering::SeqCst),
            2,
            "one refresh for 50 requests"
        );
        let c = log.auths("/c");
        assert_eq!(c.len(), 50, "no replays");
        assert!(c.iter().all(|a| a == "Bearer access-2"), "{c:?}");
        assert_eq!(
            state.asked.lock().unwrap()[1],
            Asked {
                stale: Some("access-1".into()),
                stale_refresh_token: Some("rt-1".into()),
                reason: "NoToken",
            }
        );
        assert_eq!(
            state.logouts.load(Ordering::SeqCst),
            0,
            "invalidate is not a logout"
        );

        // `clear` still logs out.
        handle.clear();
        assert_eq!(state.logouts.load(Ordering::SeqCst), 1);
        let before = log.len();
        let err = fetch(&svc, url(addr, "/d")).await.unwrap_err();
        assert!(err.is::<SessionEnded>(), "{err}");
        assert_eq!(log.len(), before);
        assert_eq!(state.calls.load(Ordering::SeqCst), 2);
    })
    .await;
}

async fn fetch_owned(svc: Stack, url: String) -> Result<StatusCode, BoxError> {
    Ok(svc.oneshot(get(url)).await?.status())
}

// ---------------------------------------------------------------------------------------------
// 4. The last 401 as a response (OkHttp, Ktor and axios return it).

const INVALID: &str = r#"Bearer realm="api", error="invalid_token""#;

/// Refuses every request with 401, `INVALID` and the body `denied #N`.
fn always_refuse(_: &str, _: &str, n: usize) -> Response<Body> {
    respond(
        StatusCode::UNAUTHORIZED,
        Some(INVALID),
        format!("denied #{n}"),
    )
}

#[tokio::test]
async fn the_final_401_is_the_response_after_one_refresh_and_one_replay() {
    guard(async {
        let (addr, log) = api(always_refuse).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting(&calls, "fresh"))
            .initial_token(Token::bearer("stale").unwrap())
            .unauthorized_as_response(true);
        let svc = stack(layer);

        let (status, headers, body) = fetch(&svc, url(addr, "/r")).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[WWW_AUTHENTICATE], INVALID);
        assert_eq!(&body[..], b"denied #2", "the replay's own response");
        assert_eq!(log.auths("/r"), ["Bearer stale", "Bearer fresh"]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // A request that waited for a refresh before its first send gets its refusal too,
        // without a second refresh.
        let calls = Arc::new(AtomicUsize::new(0));
        let svc =
            stack(RefreshLayer::new(counting(&calls, "fresh")).unauthorized_as_response(true));
        let (status, _, body) = fetch(&svc, url(addr, "/w")).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(&body[..], b"denied #3");
        assert_eq!(log.auths("/w"), ["Bearer fresh"]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn without_the_option_the_final_401_is_unauthorized_after_refresh() {
    guard(async {
        let (addr, log) = api(always_refuse).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RefreshLayer::new(counting(&calls, "fresh-91c2e"))
            .initial_token(Token::bearer("stale-5d0a1").unwrap());
        let svc = stack(layer);

        let err = fetch(&svc, url(addr, "/r")).await.unwrap_err();
        assert!(is_auth_failure(&*err));
        let err = err
            .downcast_ref::<UnauthorizedAfterRefresh>()
            .expect("typed");
        assert_eq!(err.last().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(err.last().headers()[WWW_AUTHENTICATE], INVALID);
        // The final refusal's body is kept (bounded): the server's own explanation.
        assert!(
            err.last().body().starts_with(b"denied #"),
            "{:?}",
            err.last().body()
        );
        let first = err.first().expect("the first attempt was refused");
        assert_eq!(first.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(first.headers()[WWW_AUTHENTICATE], INVALID);
        assert_eq!(
            log.auths("/r"),
            ["Bearer stale-5d0a1", "Bearer fresh-91c2e"]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(
                !text.contains("stale-5d0a1") && !text.contains("fresh-91c2e"),
                "{text}"
            );
        }

        // Refused right after waiting for a refresh: no first response.
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = stack(RefreshLayer::new(counting(&calls, "fresh-91c2e")));
        let err = fetch(&svc, url(addr, "/w")).await.unwrap_err();
        let err = err
            .downcast_ref::<UnauthorizedAfterRefresh>()
            .expect("typed");
        assert!(err.first().is_none());
        assert_eq!(err.last().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(log.auths("/w"), ["Bearer fresh-91c2e"]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[cfg(feature = "reqwest")]
mod reqwest_final_401 {
    use super::*;
    use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

    fn client(layer: &RefreshLayer) -> ClientWithMiddleware {
        // `no_proxy`: loopback traffic must not go to a proxy configured in the environment.
        let inner = reqwest::Client::builder().no_proxy().build().unwrap();
        ClientBuilder::new(inner)
            .with(layer.reqwest_middleware())
            .build()
    }

    #[tokio::test]
    async fn the_final_401_is_the_response_with_the_reqwest_middleware() {
        guard(async {
            let (addr, log) = api(always_refuse).await;
            let calls = Arc::new(AtomicUsize::new(0));
            let layer = RefreshLayer::new(counting(&calls, "fresh"))
                .initial_token(Token::bearer("stale").unwrap())
                .unauthorized_as_response(true);
            let res = client(&layer).get(url(addr, "/r")).send().await.unwrap();
            assert_eq!(res.status(), reqwest::StatusCode::UNAUTHORIZED);
            assert_eq!(res.headers()["www-authenticate"], INVALID);
            assert_eq!(res.text().await.unwrap(), "denied #2");
            assert_eq!(log.auths("/r"), ["Bearer stale", "Bearer fresh"]);
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn without_the_option_the_reqwest_middleware_fails_with_unauthorized_after_refresh() {
        guard(async {
            let (addr, log) = api(always_refuse).await;
            let calls = Arc::new(AtomicUsize::new(0));
            let layer = RefreshLayer::new(counting(&calls, "fresh"))
                .initial_token(Token::bearer("stale").unwrap());
            let err = client(&layer)
                .get(url(addr, "/r"))
                .send()
                .await
                .unwrap_err();
            let reqwest_middleware::Error::Middleware(err) = err else {
                panic!("not the layer's error: {err}");
            };
            let err = err
                .downcast_ref::<UnauthorizedAfterRefresh>()
                .expect("typed");
            assert_eq!(err.last().status(), StatusCode::UNAUTHORIZED);
            assert_eq!(err.last().headers()[WWW_AUTHENTICATE], INVALID);
            assert_eq!(
                err.first().map(|f| f.status()),
                Some(StatusCode::UNAUTHORIZED)
            );
            assert_eq!(log.auths("/r"), ["Bearer stale", "Bearer fresh"]);
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Re-entrancy.

fn echo(hits: &Arc<AtomicUsize>) -> impl InMemoryApi<String> {
    let hits = hits.clone();
    service_fn(move |req: Request<ReplayBody<Body>>| {
        hits.fetch_add(1, Ordering::SeqCst);
        let auth = authorization(req.headers());
        async move { Ok::<_, Infallible>(Response::new(auth)) }
    })
}

#[tokio::test]
async fn refresh_from_inside_the_refresher_fails_at_once_with_reentrant_refresh() {
    let slot = Arc::new(OnceLock::<TokenHandle>::new());
    let nested = Arc::new(Mutex::new(Vec::<Result<u64, String>>::new()));
    let refresher = context_fn({
        let (slot, nested) = (slot.clone(), nested.clone());
        move |_ctx: RefreshContext| {
            let (slot, nested) = (slot.clone(), nested.clone());
            async move {
                let handle = slot.get().expect("handle installed").clone();
                let outcome = match handle.refresh().await {
                    Ok(state) => Ok(state.generation()),
                    Err(e) if e.is::<ReentrantRefresh>() => Err(e.to_string()),
                    Err(e) => Err(format!("unexpected error: {e}")),
                };
                nested.lock().unwrap().push(outcome);
                Ok::<_, RefreshError>(Token::bearer("fresh-token")?)
            }
        }
    });
    let layer = RefreshLayer::new(refresher);
    let handle = layer.token_handle();
    slot.set(handle.clone()).unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer_on(echo(&hits));

    // From a forced refresh...
    let state = tokio::time::timeout(Duration::from_secs(5), handle.refresh())
        .await
        .expect("no hang")
        .expect("the outer refresh succeeds");
    assert_eq!(state.generation(), 1);
    // ...and from a refresh a request started.
    handle.invalidate();
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        svc.oneshot(Request::get("/").body(Body::default()).unwrap()),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(res.body(), "Bearer fresh-token");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let nested = nested.lock().unwrap().clone();
    assert_eq!(nested.len(), 2);
    for outcome in nested {
        let message = outcome.expect_err("a nested refresh must fail");
        assert!(message.contains("inside the token refresher"), "{message}");
        assert!(!message.contains("fresh-token"));
    }
}

/// `layer.layer(svc)`, named so the call site reads well next to `stack`.
trait LayerOn {
    fn layer_on<S>(&self, inner: S) -> tower_auth_refresh::Refresh<S>;
}

impl LayerOn for RefreshLayer {
    fn layer_on<S>(&self, inner: S) -> tower_auth_refresh::Refresh<S> {
        tower::Layer::layer(self, inner)
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Where the token goes: origins and plain http.

/// 200 for `Bearer tok`, else 401 with a challenge.
fn accepts_tok(_: &str, auth: &str, _: usize) -> Response<Body> {
    if auth == "Bearer tok" {
        respond(StatusCode::OK, None, String::new())
    } else {
        respond(StatusCode::UNAUTHORIZED, Some(REALM), String::new())
    }
}

#[tokio::test]
async fn by_default_the_token_goes_only_to_the_first_origin() {
    guard(async {
        let (a, log_a) = api(accepts_tok).await;
        let (b, log_b) = api(accepts_tok).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let layer =
            RefreshLayer::new(counting(&calls, "tok")).initial_token(Token::bearer("tok").unwrap());
        let svc = stack(layer);

        let (status, _, _) = fetch(&svc, url(a, "/one")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        // Another port is another origin: no token, and its 401 is just a response.
        let (status, _, _) = fetch(&svc, url(b, "/two")).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = fetch(&svc, url(a, "/three")).await.unwrap();
        assert_eq!(status, StatusCode::OK);

        assert_eq!(log_a.auths("/one"), ["Bearer tok"]);
        assert_eq!(log_a.auths("/three"), ["Bearer tok"]);
        assert_eq!(log_b.auths("/two"), ["-"], "no token and no replay");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "the foreign 401 triggered nothing"
        );
    })
    .await;
}

#[tokio::test]
async fn any_origin_and_an_explicit_list_decide_where_the_token_goes() {
    guard(async {
        let (a, log_a) = api(accepts_tok).await;
        let (b, log_b) = api(accepts_tok).await;
        let (c, log_c) = api(accepts_tok).await;
        let calls = Arc::new(AtomicUsize::new(0));

        // any_origin: every destination gets the token.
        let svc = stack(
            RefreshLayer::new(counting(&calls, "tok"))
                .initial_token(Token::bearer("tok").unwrap())
                .any_origin(),
        );
        for addr in [a, b] {
            let (status, _, _) = fetch(&svc, url(addr, "/any")).await.unwrap();
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(log_a.auths("/any"), ["Bearer tok"]);
        assert_eq!(log_b.auths("/any"), ["Bearer tok"]);

        // An explicit list: only its origins, whichever comes first.
        let svc = stack(
            RefreshLayer::new(counting(&calls, "tok"))
                .initial_token(Token::bearer("tok").unwrap())
                .allowed_origins([format!("http://{a}"), format!("http://{b}/")])
                .unwrap(),
        );
        for addr in [c, a, b] {
            fetch(&svc, url(addr, "/list")).await.unwrap();
        }
        assert_eq!(log_c.auths("/list"), ["-"]);
        assert_eq!(log_a.auths("/list"), ["Bearer tok"]);
        assert_eq!(log_b.auths("/list"), ["Bearer tok"]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    })
    .await;
}

/// An in-memory request for `uri`: nothing here can reach a network.
fn memory_get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::default()).unwrap()
}

#[tokio::test]
async fn plain_http_to_a_host_that_is_not_loopback_fails_before_anything_is_sent() {
    let hits = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));

    // With a token, and without one (no refresh is started either), and even with any_origin.
    for layer in [
        RefreshLayer::new(counting(&calls, "tok-secret"))
            .initial_token(Token::bearer("tok-secret").unwrap()),
        RefreshLayer::new(counting(&calls, "tok-secret")),
        RefreshLayer::new(counting(&calls, "tok-secret"))
            .initial_token(Token::bearer("tok-secret").unwrap())
            .any_origin(),
    ] {
        let err = layer
            .layer_on(echo(&hits))
            .oneshot(memory_get("http://api.example.com/v1"))
            .await
            .unwrap_err();
        assert!(err.is::<InsecureTransport>(), "{err}");
        assert!(is_auth_failure(&*err));
        assert!(!err.to_string().contains("tok-secret"));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing was sent");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing was refreshed");

    // Opting in.
    let res = RefreshLayer::new(counting(&calls, "tok"))
        .initial_token(Token::bearer("tok").unwrap())
        .allow_insecure_http(true)
        .layer_on(echo(&hits))
        .oneshot(memory_get("http://api.example.com/v1"))
        .await
        .unwrap();
    assert_eq!(res.body(), "Bearer tok");

    // Loopback and https are allowed by default.
    for uri in [
        "http://127.0.0.1/",
        "http://127.0.0.1:8080/x",
        "http://localhost/",
        "http://localhost:3000/",
        "http://[::1]/",
        "http://[::1]:9000/y",
        "https://api.example.com/",
    ] {
        let res = RefreshLayer::new(counting(&calls, "tok"))
            .initial_token(Token::bearer("tok").unwrap())
            .layer_on(echo(&hits))
            .oneshot(memory_get(uri))
            .await
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert_eq!(res.body(), "Bearer tok", "{uri}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 8);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn allowed_origins_must_be_exactly_origins_and_errors_never_repeat_them() {
    let bad = [
        ("https://host/v1/prefix", "v1/prefix"),
        ("https://user:pw@host", "pw"),
        ("https://user:hunter2@host:8443", "hunter2"),
        ("https://host/?q=secret-query", "secret-query"),
        ("https://host?q=1", "q=1"),
        ("host-without-scheme", "host-without-scheme"),
    ];
    let refresher =
        || tower_auth_refresh::refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
    for (origin, secret_part) in bad {
        let errors = [
            RefreshOptions::new().allowed_origins([origin]).unwrap_err(),
            RefreshLayer::new(refresher())
                .allowed_origins([origin])
                .unwrap_err(),
            KeyedRefreshLayer::new(|_: u8, _: Option<Token>| async {
                Ok::<_, RefreshError>(Token::bearer("t")?)
            })
            .allowed_origins(["https://fine.example", origin])
            .unwrap_err(),
        ];
        for err in errors {
            let (display, debug) = (err.to_string(), format!("{err:?}"));
            assert!(display.starts_with("invalid origin"), "{display}");
            for text in [&display, &debug] {
                assert!(!text.contains(secret_part), "{origin}: {text}");
                assert!(!text.contains("pw"), "{origin}: {text}");
            }
        }
    }
    // Exactly an origin, with or without a trailing slash or port, is fine.
    for ok in [
        "https://host",
        "https://host/",
        "https://host:8443",
        "http://127.0.0.1:1",
    ] {
        RefreshOptions::new()
            .allowed_origins([ok])
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}
