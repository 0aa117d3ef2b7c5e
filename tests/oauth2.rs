//! The OAuth 2.0 refresh-token grant refresher against a real (loopback) token endpoint that
//! rotates refresh tokens and revokes the token family on reuse (RFC 9700), through the
//! `RefreshLayer` and a hyper-util client.

mod oauth2_server;
mod support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::error::{RefreshRejected, SessionEnded};
use tower_auth_refresh::oauth2::{
    ClientAuth, ErrorKind, OAuth2Error, OAuth2Refresher, OAuth2RefresherBuilder, RefreshToken,
};
use tower_auth_refresh::{
    Backoff, BoxError, Events, Lagged, Refresh, RefreshError, RefreshEvent, ReplayBody, Token,
    TokenHandle, TokenRefresher, TokenRequest,
};

use oauth2_server::{ClientCheck, ClientCredentials, Scripted, Servers, SharedOrigin, TokenConfig};
use support::{capture_logs, guard, http_client};

type TokenClient = Client<HttpConnector, Full<Bytes>>;
type ApiClient = Refresh<Client<HttpConnector, ReplayBody<Full<Bytes>>>>;
type Persisted = Arc<Mutex<Vec<String>>>;

/// A rotation hook that fails its first `failures` calls ("disk full"), then persists into
/// `persisted`; `calls` counts every call.
fn flaky_hook(
    failures: usize,
    persisted: &Persisted,
    calls: &Arc<AtomicUsize>,
) -> impl Fn(RefreshToken) -> Pin<Box<dyn Future<Output = Result<(), std::io::Error>> + Send>>
+ Send
+ Sync
+ 'static {
    let (p, c) = (persisted.clone(), calls.clone());
    move |new: RefreshToken| {
        let (p, c) = (p.clone(), c.clone());
        Box::pin(async move {
            if c.fetch_add(1, Ordering::SeqCst) < failures {
                return Err(std::io::Error::other("disk full"));
            }
            p.lock().unwrap().push(new.secret().to_owned());
            Ok(())
        })
    }
}

fn token_client() -> TokenClient {
    http_client()
}

fn fast_retry() -> Backoff {
    Backoff::default()
        .base_delay(Duration::from_millis(5))
        .max_delay(Duration::from_millis(50))
}

/// A confidential client (`client_secret_basic`, "app" / "app-secret") of the token endpoint
/// of `s`, without a refresh token of its own.
fn app_client(s: &Servers) -> OAuth2RefresherBuilder<TokenClient> {
    OAuth2Refresher::builder(s.token_url().parse().unwrap(), token_client())
        .client_id("app")
        .client_secret("app-secret", ClientAuth::Basic)
}

/// [`app_client`], presenting `refresh`.
fn app(s: &Servers, refresh: &str) -> OAuth2RefresherBuilder<TokenClient> {
    app_client(s).refresh_token(refresh)
}

/// `builder` with a rotation hook that appends to `persisted`.
fn persisting(
    builder: OAuth2RefresherBuilder<TokenClient>,
    persisted: &Persisted,
) -> OAuth2RefresherBuilder<TokenClient> {
    let persisted = persisted.clone();
    builder.on_rotation(move |new: RefreshToken| {
        let persisted = persisted.clone();
        async move {
            persisted.lock().unwrap().push(new.secret().to_owned());
            Ok::<_, Infallible>(())
        }
    })
}

/// [`app`], with a rotation hook that appends to `persisted`.
fn app_persisting(
    s: &Servers,
    refresh: &str,
    persisted: &Persisted,
) -> OAuth2RefresherBuilder<TokenClient> {
    persisting(app(s, refresh), persisted)
}

/// A confidential client (`client_secret_basic`) whose rotation hook appends to `persisted`.
fn refresher(s: &Servers, refresh: &str, persisted: &Persisted) -> OAuth2Refresher<TokenClient> {
    app_persisting(s, refresh, persisted).build().unwrap()
}

/// Servers started with `config` and one login: the servers, the login's refresh token, what
/// the rotation hook persisted, and a [`refresher`] presenting the refresh token.
async fn logged_in(
    config: TokenConfig,
) -> (Servers, String, Persisted, OAuth2Refresher<TokenClient>) {
    let s = Servers::start(config).await;
    let (_, rt0) = s.token.login();
    let persisted = Persisted::default();
    let refresher = refresher(&s, &rt0, &persisted);
    (s, rt0, persisted, refresher)
}

fn api_client<C>(refresher: OAuth2Refresher<C>, initial: &str) -> (ApiClient, TokenHandle)
where
    OAuth2Refresher<C>: TokenRefresher,
{
    let layer = tower_auth_refresh::RefreshLayer::new(refresher)
        .initial_token(Token::bearer(initial).unwrap())
        .retries(fast_retry());
    let handle = layer.token_handle();
    let http = http_client::<ReplayBody<Full<Bytes>>>();
    (ServiceBuilder::new().layer(layer).service(http), handle)
}

async fn get<S>(client: S, url: String) -> Result<StatusCode, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Incoming>, Error = BoxError>,
{
    let res = client.oneshot(support::get(url)).await?;
    let status = res.status();
    // Read the body so the connection goes back to the pool.
    res.into_body().collect().await?;
    Ok(status)
}

/// `n` concurrent GETs, each in its own task.
async fn burst(client: &ApiClient, url: &str, n: usize) -> Vec<Result<StatusCode, BoxError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(get(client.clone(), url.to_owned())))
        .collect();
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await.expect("request task panicked"));
    }
    results
}

/// Events received so far, without waiting.
fn drain(events: &mut Events) -> Vec<RefreshEvent> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        match events.try_recv() {
            Some(Ok(ev)) => out.push(ev),
            Some(Err(Lagged(n))) => panic!("lagged by {n} events"),
            None => break,
        }
    }
    out
}

/// How many `Refreshed` events there are in `events`.
fn refreshed(events: &[RefreshEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, RefreshEvent::Refreshed { .. }))
        .count()
}

/// How many `SessionEnded` events there are in `events`.
fn sessions_ended(events: &[RefreshEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, RefreshEvent::SessionEnded { .. }))
        .count()
}

/// The `OAuth2Error` behind a refresher error.
fn oauth2_cause(err: &RefreshError) -> &OAuth2Error {
    std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<OAuth2Error>())
        .expect("the cause is an OAuth2Error")
}

/// Everything an error shows, through its whole source chain.
fn shown(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(err);
    for _ in 0..16 {
        let Some(e) = next else { break };
        out.push_str(&format!("{e} | {e:?} | "));
        next = e.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_401s_then_twenty_rounds_refresh_once_each_without_reuse() {
    // 1,000 with enough open files; fewer under the usual limit (see `connection_budget`).
    // Two such tests run side by side in this binary: each takes half the budget.
    let n = support::connection_budget(2000) / 2;
    guard(async {
        let (s, rt0, persisted, refresher) = logged_in(TokenConfig::default()).await;
        let (client, handle) = api_client(refresher.clone(), "expired-at-start");
        let mut events = handle.subscribe();
        let url = s.api_url();

        // 1,000 requests with the expired token, all refused together.
        s.api.gather_unauthorized(n);
        let results = burst(&client, &url, n).await;
        assert!(
            results.iter().all(|r| matches!(r, Ok(StatusCode::OK))),
            "every request succeeds after one refresh"
        );
        assert_eq!(s.api.unauthorized(), n);
        assert_eq!(s.api.ok(), n, "each request replayed exactly once");
        assert_eq!(
            s.token.requests(),
            1,
            "one token request for 1,000 concurrent 401s"
        );

        // 20 rounds of expiry, 25 concurrent requests refused together in each.
        for round in 1..=20 {
            s.token.expire_access_tokens();
            s.api.gather_unauthorized(25);
            let results = burst(&client, &url, 25).await;
            assert!(
                results.iter().all(|r| matches!(r, Ok(StatusCode::OK))),
                "round {round}"
            );
            assert_eq!(
                s.token.requests(),
                1 + round,
                "one refresh in round {round}"
            );
            assert_eq!(
                persisted.lock().unwrap().len(),
                1 + round,
                "rotation persisted in round {round}"
            );
        }

        assert_eq!(s.token.grants(), 21);
        assert_eq!(
            s.token.reuse_detected(),
            0,
            "no rotated refresh token was ever presented again"
        );
        assert_eq!(
            *persisted.lock().unwrap(),
            s.token.rotated(),
            "every new refresh token persisted, in order"
        );
        assert_eq!(
            Some(refresher.refresh_token().unwrap().secret().to_owned()),
            s.token.current_of(&rt0)
        );
        assert_eq!(s.api.unauthorized(), n + 20 * 25);
        assert_eq!(s.api.ok(), n + 20 * 25);
        assert_eq!(refreshed(&drain(&mut events)), 21);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_callers_never_cause_reuse() {
    guard(async {
        let (s, rt0, persisted, refresher) = logged_in(TokenConfig::default()).await;
        let (client, handle) = api_client(refresher.clone(), "expired-at-start");
        let mut events = handle.subscribe();
        let url = s.api_url();

        // The token endpoint rotates, then holds its answer while every caller goes away.
        s.token.hold_next(1);
        let timed: Vec<_> = (0..20)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(
                    Duration::from_millis(100),
                    get(client.clone(), url.clone()),
                ))
            })
            .collect();
        let dropped: Vec<_> = (0..20)
            .map(|_| tokio::spawn(get(client.clone(), url.clone())))
            .collect();
        s.token.held(1).await;
        for task in &dropped {
            task.abort();
        }
        for task in timed {
            assert!(
                task.await.unwrap().is_err(),
                "the caller timed out while the answer was held"
            );
        }
        for task in dropped {
            assert!(task.await.unwrap_err().is_cancelled());
        }
        assert!(persisted.lock().unwrap().is_empty());

        // The refresh runs on without its callers and keeps the rotated refresh token.
        s.token.release();
        loop {
            match events.recv().await {
                Some(Ok(RefreshEvent::Refreshed { .. })) => break,
                Some(_) => {}
                None => panic!("event stream closed"),
            }
        }
        assert_eq!(*persisted.lock().unwrap(), s.token.rotated());
        assert_eq!(
            Some(refresher.refresh_token().unwrap().secret().to_owned()),
            s.token.current_of(&rt0)
        );

        // The next expiry presents the kept token: no reuse.
        s.token.expire_access_tokens();
        assert_eq!(
            get(client.clone(), url.clone()).await.unwrap(),
            StatusCode::OK
        );
        assert_eq!(s.token.grants(), 2);
        assert_eq!(s.token.reuse_detected(), 0);
        assert_eq!(*persisted.lock().unwrap(), s.token.rotated());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_ends_the_session_once_then_a_new_login_resumes() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let unknown = "rt-never-issued-SECRET";
        let persisted = Persisted::default();
        let refresher = refresher(&s, unknown, &persisted);
        let (client, handle) = api_client(refresher.clone(), "expired-at-start");
        let mut events = handle.subscribe();
        let url = s.api_url();

        s.api.gather_unauthorized(10);
        let results = burst(&client, &url, 10).await;
        let mut shared: Option<Arc<RefreshError>> = None;
        for result in results {
            let err = result.expect_err("the refresh was rejected");
            assert!(
                !shown(&*err).contains(unknown),
                "no error shows the refresh token"
            );
            let rejected = err
                .downcast_ref::<RefreshRejected>()
                .expect("RefreshRejected");
            let cause = oauth2_cause(rejected.refresh_error());
            assert_eq!(cause.kind(), ErrorKind::ErrorResponse);
            assert_eq!(cause.status(), Some(StatusCode::BAD_REQUEST));
            assert_eq!(cause.error_code(), Some("invalid_grant"));
            assert_eq!(cause.error_description(), Some("unknown refresh token"));
            match &shared {
                None => shared = Some(rejected.refresh_error().clone()),
                Some(first) => assert!(
                    Arc::ptr_eq(first, rejected.refresh_error()),
                    "one failure shared by all"
                ),
            }
        }
        assert_eq!(s.token.requests(), 1, "a terminal failure is not retried");
        assert_eq!(
            sessions_ended(&drain(&mut events)),
            1,
            "exactly one SessionEnded event"
        );
        assert!(handle.state().session_ended());

        // Later requests fail fast, without a token request.
        let err = get(client.clone(), url.clone()).await.unwrap_err();
        assert!(err.is::<SessionEnded>());
        assert_eq!(s.token.requests(), 1);

        // A new login resumes.
        let (access, refresh) = s.token.login();
        refresher.set_refresh_token(RefreshToken::new(refresh));
        handle.set_token(Token::bearer(access).unwrap());
        assert_eq!(
            get(client.clone(), url.clone()).await.unwrap(),
            StatusCode::OK
        );
        s.token.expire_access_tokens();
        assert_eq!(
            get(client.clone(), url.clone()).await.unwrap(),
            StatusCode::OK
        );
        assert_eq!(s.token.grants(), 1);
        assert_eq!(*persisted.lock().unwrap(), s.token.rotated());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_unavailable_then_success_is_retried() {
    guard(async {
        let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
        let (client, handle) = api_client(refresher, "expired-at-start");
        let mut events = handle.subscribe();

        s.token.script(Scripted::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Some("text/plain"),
            "upstream down",
        ));
        assert_eq!(get(client, s.api_url()).await.unwrap(), StatusCode::OK);
        assert_eq!(s.token.requests(), 2, "the 503 was retried once");
        assert_eq!(s.token.grants(), 1);
        assert_eq!(s.token.reuse_detected(), 0);
        let events = drain(&mut events);
        assert!(events.iter().all(|e| !matches!(
            e,
            RefreshEvent::SessionEnded { .. } | RefreshEvent::RefreshFailed { .. }
        )));
        assert_eq!(refreshed(&events), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_in_progress_is_waited_out_and_retried() {
    guard(async {
        let (s, _, persisted, refresher) = logged_in(TokenConfig::default()).await;
        let (client, _handle) = api_client(refresher, "expired-at-start");

        s.token.script(
            Scripted::json(
                StatusCode::BAD_REQUEST,
                json!({ "error": "rotation_in_progress", "error_description": "another refresh is rotating" }),
            )
            .retry_after("0"),
        );
        assert_eq!(get(client, s.api_url()).await.unwrap(), StatusCode::OK);
        assert_eq!(s.token.requests(), 2);
        assert_eq!(s.token.grants(), 1);
        assert_eq!(s.token.reuse_detected(), 0);
        assert_eq!(*persisted.lock().unwrap(), s.token.rotated());
    })
    .await;
}

/// (status, JSON body, terminal?, expected `error` code, `Retry-After`)
type ErrorCase = (
    StatusCode,
    Option<serde_json::Value>,
    bool,
    Option<&'static str>,
    Option<&'static str>,
);

#[tokio::test]
async fn error_answers_are_classified_and_carry_code_and_description() {
    guard(async {
        let (s, rt0, _, refresher) = logged_in(TokenConfig::default()).await;
        let custom = app(&s, &rt0)
            .transient_error_codes(["busy"])
            .build()
            .unwrap();

        let err_body = |code: &str| json!({ "error": code, "error_description": "why" });
        let cases: Vec<ErrorCase> = vec![
            (StatusCode::BAD_REQUEST, Some(err_body("invalid_grant")), true, Some("invalid_grant"), None),
            (StatusCode::UNAUTHORIZED, Some(err_body("invalid_client")), true, Some("invalid_client"), None),
            (StatusCode::BAD_REQUEST, Some(err_body("unauthorized_client")), true, Some("unauthorized_client"), None),
            (StatusCode::BAD_REQUEST, Some(err_body("unsupported_grant_type")), true, Some("unsupported_grant_type"), None),
            (StatusCode::BAD_REQUEST, Some(err_body("invalid_scope")), true, Some("invalid_scope"), None),
            (StatusCode::BAD_REQUEST, Some(err_body("invalid_request")), true, Some("invalid_request"), None),
            (StatusCode::INTERNAL_SERVER_ERROR, Some(err_body("invalid_grant")), true, Some("invalid_grant"), None),
            (StatusCode::BAD_REQUEST, Some(err_body("something_new")), true, Some("something_new"), None),
            (StatusCode::FORBIDDEN, None, true, None, None),
            (StatusCode::UNPROCESSABLE_ENTITY, None, true, None, None),
            (StatusCode::INTERNAL_SERVER_ERROR, None, false, None, None),
            (StatusCode::BAD_GATEWAY, None, false, None, None),
            (StatusCode::SERVICE_UNAVAILABLE, Some(err_body("temporarily_unavailable")), false, Some("temporarily_unavailable"), Some("3")),
            (StatusCode::TOO_MANY_REQUESTS, None, false, None, Some("7")),
            (StatusCode::TOO_MANY_REQUESTS, None, false, None, Some("Thu, 01 Jan 1970 00:00:00 GMT")),
            (StatusCode::BAD_REQUEST, Some(err_body("rotation_in_progress")), false, Some("rotation_in_progress"), Some("1")),
            (StatusCode::CONFLICT, Some(err_body("refresh_in_progress")), false, Some("refresh_in_progress"), None),
        ];
        for (status, body, terminal, code, retry_after) in cases {
            let mut answer = match &body {
                Some(body) => Scripted::json(status, body.clone()),
                None => Scripted::new(status, None, ""),
            };
            if let Some(ra) = retry_after {
                answer = answer.retry_after(ra);
            }
            s.token.script(answer);
            let err = refresher.refresh(ctx()).await.expect_err("an error answer");
            assert_eq!(err.is_terminal(), terminal, "{status} {body:?}");
            let cause = oauth2_cause(&err);
            assert_eq!(cause.kind(), ErrorKind::ErrorResponse);
            assert_eq!(cause.status(), Some(status));
            assert_eq!(cause.error_code(), code);
            assert_eq!(cause.error_description(), code.map(|_| "why"));
            let expected_delay = match retry_after {
                Some("3") => Some(Duration::from_secs(3)),
                Some("7") => Some(Duration::from_secs(7)),
                Some("1") => Some(Duration::from_secs(1)),
                Some(_) => Some(Duration::ZERO),
                None => None,
            };
            assert_eq!(err.retry_after(), expected_delay, "{status} {body:?}");
            assert!(!shown(&err).contains(&rt0));
        }

        // A custom list replaces the defaults.
        s.token.script(Scripted::json(StatusCode::BAD_REQUEST, err_body("busy")));
        assert!(custom.refresh(ctx()).await.unwrap_err().is_transient());
        s.token.script(Scripted::json(StatusCode::BAD_REQUEST, err_body("rotation_in_progress")));
        assert!(custom.refresh(ctx()).await.unwrap_err().is_terminal());

        // A description that echoes the refresh token is blanked out.
        let echo = json!({ "error": "invalid_grant", "error_description": format!("token {rt0} is revoked") });
        s.token.script(Scripted::json(StatusCode::BAD_REQUEST, echo));
        let err = refresher.refresh(ctx()).await.unwrap_err();
        assert_eq!(oauth2_cause(&err).error_description(), Some("token <redacted> is revoked"));
        assert!(!shown(&err).contains(&rt0));

        assert_eq!(s.token.grants(), 0);
        assert_eq!(refresher.refresh_token().unwrap().secret(), rt0, "no answer rotated the refresh token");
    })
    .await;
}

#[tokio::test]
async fn malformed_answers_are_typed_errors() {
    guard(async {
        let (s, rt0, persisted, refresher) = logged_in(TokenConfig::default()).await;
        let marker = "SECRET-BODY-MARKER";
        let huge = format!(
            r#"{{"access_token":"{marker}","pad":"{}"}}"#,
            "x".repeat(100 * 1024)
        );
        let json = Some("application/json");
        // (status, content type, body, kind, terminal?)
        let cases: Vec<(StatusCode, Option<&'static str>, String, ErrorKind, bool)> = vec![
            (
                StatusCode::OK,
                json,
                format!("this is not JSON {marker}"),
                ErrorKind::Malformed,
                false,
            ),
            (
                StatusCode::OK,
                json,
                format!(r#"{{"token_type":"Bearer","note":"{marker}"}}"#),
                ErrorKind::MissingAccessToken,
                false,
            ),
            (
                StatusCode::OK,
                json,
                huge.clone(),
                ErrorKind::BodyTooLarge,
                false,
            ),
            // An error answer is classified by its status even when its body is too large.
            (
                StatusCode::BAD_REQUEST,
                Some("text/html"),
                huge,
                ErrorKind::ErrorResponse,
                true,
            ),
            (
                StatusCode::OK,
                Some("text/html"),
                format!(r#"{{"access_token":"{marker}","token_type":"Bearer"}}"#),
                ErrorKind::ContentType,
                false,
            ),
            (
                StatusCode::OK,
                json,
                format!(r#"["{marker}"]"#),
                ErrorKind::Malformed,
                false,
            ),
            (
                StatusCode::OK,
                json,
                r#"{"access_token":42,"token_type":"Bearer"}"#.to_owned(),
                ErrorKind::Malformed,
                false,
            ),
            (
                StatusCode::OK,
                json,
                format!(r#"{{"access_token":"two words {marker}","token_type":"Bearer"}}"#),
                ErrorKind::InvalidAccessToken,
                false,
            ),
            (
                StatusCode::OK,
                json,
                format!(r#"{{"access_token":"{marker}","token_type":"mac"}}"#),
                ErrorKind::UnsupportedTokenType,
                true,
            ),
            (
                StatusCode::OK,
                json,
                String::new(),
                ErrorKind::Malformed,
                false,
            ),
            (
                StatusCode::BAD_REQUEST,
                Some("text/html"),
                format!("<html>{marker}</html>"),
                ErrorKind::ErrorResponse,
                true,
            ),
        ];
        for (status, content_type, body, kind, terminal) in cases {
            s.token.script(Scripted::new(status, content_type, body));
            let err = refresher
                .refresh(ctx())
                .await
                .expect_err("a malformed answer");
            let cause = oauth2_cause(&err);
            assert_eq!(cause.kind(), kind, "{cause}");
            assert_eq!(err.is_terminal(), terminal, "{cause}");
            let shown = shown(&err);
            assert!(!shown.contains(marker) && !shown.contains(&rt0), "{shown}");
        }
        assert_eq!(s.token.requests(), 11);
        assert_eq!(refresher.refresh_token().unwrap().secret(), rt0);
        // The refresher still works afterwards.
        let token = refresher.refresh(ctx()).await.unwrap();
        assert!(s.token.access_valid(token.secret()));

        // A rotated refresh token is kept even from an answer with the wrong content type.
        let body =
            json!({ "access_token": "x", "token_type": "Bearer", "refresh_token": "rescued" });
        s.token.script(Scripted::new(
            StatusCode::OK,
            Some("text/plain"),
            body.to_string(),
        ));
        let err = refresher.refresh(ctx()).await.unwrap_err();
        assert_eq!(oauth2_cause(&err).kind(), ErrorKind::ContentType);
        assert_eq!(refresher.refresh_token().unwrap().secret(), "rescued");
        assert_eq!(
            persisted.lock().unwrap().last().map(String::as_str),
            Some("rescued")
        );
    })
    .await;
}

#[tokio::test]
async fn rotation_is_persisted_before_the_token_is_returned_and_a_failed_hook_keeps_the_new_token()
{
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt0) = s.token.login();
        let persisted = Persisted::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let refresher = app(&s, &rt0)
            .on_rotation(flaky_hook(1, &persisted, &calls))
            .build()
            .unwrap();

        // The hook fails: transient error, but the rotated token is kept (the old one is spent).
        let err = refresher.refresh(ctx()).await.unwrap_err();
        assert!(err.is_transient());
        assert_eq!(oauth2_cause(&err).kind(), ErrorKind::Persist);
        let rotated = s.token.rotated();
        assert_eq!(rotated.len(), 1);
        assert_eq!(refresher.refresh_token().unwrap().secret(), rotated[0]);

        // The retry presents the kept token, rotates again and persists before returning.
        let token = refresher.refresh(ctx()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let rotated = s.token.rotated();
        assert_eq!(*persisted.lock().unwrap(), vec![rotated[1].clone()]);
        assert_eq!(refresher.refresh_token().unwrap().secret(), rotated[1]);
        assert!(s.token.access_valid(token.secret()));
        assert_eq!(token.expires_in(), Some(Duration::from_secs(3600)));
        assert_eq!(s.token.reuse_detected(), 0);
        assert_eq!(
            s.token.seen()[1].field("refresh_token"),
            Some(rotated[0].as_str())
        );
    })
    .await;
}

/// After a failed hook, a later answer without a new refresh token (none, or the same one)
/// calls the hook again with the kept refresh token until it succeeds, so the persisted store
/// never keeps a spent one; once it succeeded, no more calls for that token.
#[tokio::test]
async fn a_token_the_hook_failed_to_persist_is_persisted_by_a_later_refresh_without_rotation() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt0) = s.token.login();
        let persisted = Persisted::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let refresher = app(&s, &rt0)
            .on_rotation(flaky_hook(2, &persisted, &calls))
            .build()
            .unwrap();

        // Rotation to rt1; the hook fails.
        let err = refresher.refresh(ctx()).await.unwrap_err();
        assert_eq!(oauth2_cause(&err).kind(), ErrorKind::Persist);
        let rt1 = s.token.rotated()[0].clone();
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // The retry's answer carries the same refresh token: the hook is called again with it
        // (and fails again).
        let same =
            json!({ "access_token": "atok-same", "token_type": "Bearer", "refresh_token": rt1 });
        s.token.script(Scripted::json(StatusCode::OK, same));
        let err = refresher.refresh(ctx()).await.unwrap_err();
        assert_eq!(oauth2_cause(&err).kind(), ErrorKind::Persist);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(s.token.seen()[1].field("refresh_token"), Some(rt1.as_str()));

        // The next answer carries no refresh token: the hook persists rt1 before the token is
        // returned.
        let none = json!({ "access_token": "atok-none", "token_type": "Bearer" });
        s.token.script(Scripted::json(StatusCode::OK, none.clone()));
        let token = refresher.refresh(ctx()).await.unwrap();
        assert_eq!(token.secret(), "atok-none");
        assert_eq!(token.refresh_token(), Some(rt1.as_str()));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(*persisted.lock().unwrap(), vec![rt1.clone()]);

        // Persisted: no more calls for it.
        s.token.script(Scripted::json(StatusCode::OK, none));
        refresher.refresh(ctx()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(s.token.rotated().len(), 1);
    })
    .await;
}

/// Starts a refresh presenting `rt0`, holds the server's answer while `after_login` is set
/// as the refresher's refresh token, then lets the answer go; the refresh's result.
async fn replaced_during_refresh<C>(
    s: &Servers,
    refresher: &OAuth2Refresher<C>,
    rt0: &str,
    after_login: &str,
) -> Result<Token, RefreshError>
where
    OAuth2Refresher<C>: TokenRefresher + Clone + 'static,
{
    s.token.hold_next(1);
    let pending = tokio::spawn({
        let (refresher, rt0) = (refresher.clone(), rt0.to_owned());
        async move { refresher.refresh(stale_ctx(&rt0)).await }
    });
    s.token.held(1).await;
    refresher.set_refresh_token(RefreshToken::new(after_login));
    s.token.release();
    pending.await.unwrap()
}

/// A refresh token set while a refresh is in flight wins over the rotation that refresh
/// brings back: the returned token set carries the new one, and the next refresh presents it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_set_during_a_refresh_is_carried_by_its_token_set() {
    guard(async {
        let (s, rt0, persisted, refresher) = logged_in(TokenConfig::default()).await;
        let (_, after_login) = s.token.login();
        // The server rotates rt0 and holds its answer while a new login's refresh token is
        // set. The held answer belongs to the old session: neither its rotation nor its
        // access token is used; the refresher asks again at once, presenting the new login's
        // refresh token (it used to fail with a transient `Superseded`, which a
        // single-attempt refresh counted as a failure and paused on).
        let token = replaced_during_refresh(&s, &refresher, &rt0, &after_login)
            .await
            .expect("the new session's answer");
        assert_eq!(s.token.requests(), 2);
        assert_eq!(s.token.seen()[0].field("refresh_token"), Some(rt0.as_str()));
        assert_eq!(
            s.token.seen()[1].field("refresh_token"),
            Some(after_login.as_str())
        );
        assert!(
            s.token.issued_in_session_of(token.secret(), &after_login),
            "the access token belongs to the new session"
        );
        let current = s.token.current_of(&after_login).unwrap();
        assert_ne!(current, after_login);
        assert_eq!(token.refresh_token(), Some(current.as_str()));
        assert_eq!(refresher.refresh_token().unwrap().secret(), current);
        assert_eq!(
            persisted.lock().unwrap().as_slice(),
            std::slice::from_ref(&current)
        );

        // The next refresh replaces that token set: it presents its refresh token.
        let next = tower_auth_refresh::RefreshContext::new(
            Some(token),
            tower_auth_refresh::RefreshReason::Expired,
        );
        let renewed = refresher.refresh(next).await.unwrap();
        assert_eq!(
            s.token.seen()[2].field("refresh_token"),
            Some(current.as_str())
        );
        assert!(s.token.issued_in_session_of(renewed.secret(), &after_login));
        assert_eq!(s.token.requests(), 3);
        assert_eq!(s.token.reuse_detected(), 0);
    })
    .await;
}

/// An error answer for the session a new refresh token replaced while the request was in
/// flight (an `invalid_grant` for the old refresh token) does not end the new session: the
/// refresher asks again at once with the new refresh token.
#[tokio::test]
async fn an_error_answer_for_a_replaced_refresh_token_does_not_end_the_new_session() {
    guard(async {
        let (s, rt0, _persisted, refresher) = logged_in(TokenConfig::default()).await;
        let (_, after_login) = s.token.login();
        s.token.script(Scripted::new(
            StatusCode::BAD_REQUEST,
            Some("application/json"),
            r#"{"error":"invalid_grant"}"#,
        ));
        let token = replaced_during_refresh(&s, &refresher, &rt0, &after_login)
            .await
            .expect("the refusal of the old session does not end the new one");
        assert_eq!(s.token.requests(), 2);
        assert_eq!(
            s.token.seen()[1].field("refresh_token"),
            Some(after_login.as_str())
        );
        assert!(s.token.issued_in_session_of(token.secret(), &after_login));
    })
    .await;
}

#[tokio::test]
async fn a_2xx_answer_with_an_error_and_no_access_token_is_classified_like_an_error_answer() {
    guard(async {
        let (s, rt0, persisted, refresher) = logged_in(TokenConfig::default()).await;
        let err_body =
            |code: &str| json!({ "error": code, "error_description": format!("{code} for {rt0}") });
        // (code, terminal?): the classification of an error answer, at status 200.
        for (code, terminal) in [
            ("invalid_grant", true),
            ("temporarily_unavailable", false),
            // GitHub's answer to a bad refresh token: not a known code, so transient at 200
            // (terminal_error_codes can make it terminal), but never lost.
            ("bad_refresh_token", false),
        ] {
            s.token
                .script(Scripted::json(StatusCode::OK, err_body(code)).retry_after("2"));
            let err = refresher.refresh(ctx()).await.expect_err("an error answer");
            assert_eq!(err.is_terminal(), terminal, "{code}");
            let cause = oauth2_cause(&err);
            assert_eq!(cause.kind(), ErrorKind::ErrorResponse, "{code}");
            assert_eq!(cause.status(), Some(StatusCode::OK));
            assert_eq!(cause.error_code(), Some(code));
            let expected = format!("{code} for <redacted>");
            assert_eq!(cause.error_description(), Some(expected.as_str()));
            assert!(!shown(&err).contains(&rt0));
            if !terminal {
                assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
            }
        }
        let github = app(&s, &rt0)
            .terminal_error_codes(["bad_refresh_token"])
            .build()
            .unwrap();
        s.token.script(Scripted::json(
            StatusCode::OK,
            err_body("bad_refresh_token"),
        ));
        assert!(github.refresh(ctx()).await.unwrap_err().is_terminal());

        // A refused token set's refresh token does not become the refresher's own.
        let (_, other) = s.token.login();
        s.token
            .script(Scripted::json(StatusCode::OK, err_body("invalid_grant")));
        let err = refresher.refresh(stale_ctx(&other)).await.unwrap_err();
        assert!(err.is_terminal());
        assert_eq!(
            s.token.seen()[4].field("refresh_token"),
            Some(other.as_str())
        );
        assert_eq!(refresher.refresh_token().unwrap().secret(), rt0);
        assert!(persisted.lock().unwrap().is_empty(), "nothing rotated");
        assert_eq!(s.token.grants(), 0);
    })
    .await;
}

#[tokio::test]
async fn an_echoed_basic_authorization_value_is_redacted() {
    guard(async {
        let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
        let basic = oauth2_server::APP_BASIC.strip_prefix("Basic ").unwrap();
        let percent = basic.replace('=', "%3D");
        for echo in [
            format!("bad header Authorization: Basic {basic}"),
            format!("credentials={percent}"),
            format!("unpadded {}", basic.trim_end_matches('=')),
        ] {
            let body = json!({ "error": "invalid_client", "error_description": echo });
            s.token
                .script(Scripted::json(StatusCode::UNAUTHORIZED, body));
            let err = refresher.refresh(ctx()).await.unwrap_err();
            let description = oauth2_cause(&err).error_description().unwrap().to_owned();
            assert!(description.contains("<redacted>"), "{description}");
            let shown = shown(&err);
            assert!(!shown.contains(basic.trim_end_matches('=')), "{shown}");
        }
    })
    .await;
}

#[tokio::test]
async fn no_returned_refresh_token_keeps_the_old_one_and_expires_in_may_be_a_string() {
    guard(async {
        let config = TokenConfig {
            rotate: false,
            token_type: "bearer",
            expires_in: json!("120"),
            ..TokenConfig::default()
        };
        let (s, rt0, persisted, refresher) = logged_in(config).await;
        for _ in 0..2 {
            let token = refresher.refresh(ctx()).await.unwrap();
            assert_eq!(token.expires_in(), Some(Duration::from_secs(120)));
            assert_eq!(token.scheme(), "Bearer");
            assert!(s.token.access_valid(token.secret()));
        }
        assert_eq!(refresher.refresh_token().unwrap().secret(), rt0);
        assert!(
            persisted.lock().unwrap().is_empty(),
            "no rotation, no hook call"
        );
        assert!(
            s.token
                .seen()
                .iter()
                .all(|r| r.field("refresh_token") == Some(rt0.as_str()))
        );
        assert_eq!(s.token.grants(), 2);

        let config = TokenConfig {
            token_type: "BEARER",
            expires_in: json!(90),
            ..TokenConfig::default()
        };
        let (_s, _, _, refresher) = logged_in(config).await;
        let token = refresher.refresh(ctx()).await.unwrap();
        assert_eq!(token.expires_in(), Some(Duration::from_secs(90)));
    })
    .await;
}

/// A tower service in front of the token client that counts requests carrying the
/// `TokenRequest` marker.
#[derive(Clone)]
struct MarkerCounter {
    inner: TokenClient,
    marked: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

impl Service<Request<Full<Bytes>>> for MarkerCounter {
    type Response = Response<Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = <TokenClient as Service<Request<Full<Bytes>>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        self.total.fetch_add(1, Ordering::SeqCst);
        if req.extensions().get::<TokenRequest>().is_some() {
            self.marked.fetch_add(1, Ordering::SeqCst);
        }
        Service::call(&mut self.inner, req)
    }
}

/// Servers whose token endpoint authenticates clients with `client`.
async fn servers_checking(client: ClientCheck) -> Servers {
    Servers::start(TokenConfig {
        client,
        ..TokenConfig::default()
    })
    .await
}

/// Refreshes with `refresher`, which must succeed (`accepted` says why), and returns the token
/// request the endpoint of `s` saw.
async fn first_token_request<C>(
    refresher: &OAuth2Refresher<C>,
    s: &Servers,
    accepted: &str,
) -> oauth2_server::Seen
where
    OAuth2Refresher<C>: TokenRefresher,
{
    refresher.refresh(ctx()).await.expect(accepted);
    s.token.seen().remove(0)
}

#[tokio::test]
async fn token_requests_are_well_formed_for_every_client_authentication() {
    guard(async {
        // client_secret_basic, with characters that need encoding everywhere.
        let basic = "Basic bXkrY2xpZW50OnAlNDBzcyUzQXclMjZyZCUyQiVDMyVBOQ=="; // my+client:p%40ss%3Aw%26rd%2B%C3%A9
        let s = servers_checking(ClientCheck::Basic(basic.to_owned())).await;
        let odd_refresh = "rt+1&x=y %";
        s.token.login_with(odd_refresh);
        let counter = MarkerCounter {
            inner: token_client(),
            marked: Arc::default(),
            total: Arc::default(),
        };
        let refresher = OAuth2Refresher::builder(s.token_url().parse().unwrap(), counter.clone())
            .client_id("my client")
            .client_secret("p@ss:w&rd+é", ClientAuth::Basic)
            .refresh_token(odd_refresh)
            .scope("read write&admin=1")
            .build()
            .unwrap();
        let seen = first_token_request(
            &refresher,
            &s,
            "the server accepted the client and the grant",
        )
        .await;
        assert_eq!(seen.method, http::Method::POST);
        assert_eq!(
            seen.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(seen.authorization.as_deref(), Some(basic));
        let mut fields: Vec<_> = seen
            .form
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                ("grant_type", "refresh_token"),
                ("refresh_token", odd_refresh),
                ("scope", "read write&admin=1")
            ]
        );
        assert_eq!(counter.total.load(Ordering::SeqCst), 1);
        assert_eq!(
            counter.marked.load(Ordering::SeqCst),
            1,
            "token requests carry TokenRequest"
        );

        // client_secret_post.
        let s = servers_checking(ClientCheck::Post {
            id: "app".to_owned(),
            secret: "s&=+ é".to_owned(),
        })
        .await;
        let (_, rt0) = s.token.login();
        let refresher = OAuth2Refresher::builder(s.token_url().parse().unwrap(), token_client())
            .client_id("app")
            .client_secret("s&=+ é", ClientAuth::Post)
            .refresh_token(rt0.as_str())
            .build()
            .unwrap();
        let seen = first_token_request(&refresher, &s, "client_secret_post accepted").await;
        assert_eq!(seen.authorization, None);
        assert_eq!(seen.field("client_secret"), Some("s&=+ é"));
        assert_eq!(seen.field("scope"), None);

        // A public client.
        let s = servers_checking(ClientCheck::Public {
            id: "spa".to_owned(),
        })
        .await;
        let (_, rt0) = s.token.login();
        let refresher = OAuth2Refresher::builder(s.token_url().parse().unwrap(), token_client())
            .client_id("spa")
            .refresh_token(rt0.as_str())
            .build()
            .unwrap();
        let seen = first_token_request(&refresher, &s, "public client accepted").await;
        assert_eq!(seen.authorization, None);
        assert_eq!(seen.field("client_id"), Some("spa"));
        assert_eq!(seen.field("client_secret"), None);
    })
    .await;
}

#[tokio::test]
async fn timeouts_and_connection_errors_are_transient() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt0) = s.token.login();
        s.token.hold_next(1);
        let refresher = app(&s, &rt0)
            .timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let err = refresher.refresh(ctx()).await.unwrap_err();
        assert!(err.is_transient());
        assert_eq!(oauth2_cause(&err).kind(), ErrorKind::Timeout);

        // A port nobody listens on.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let refresher = OAuth2Refresher::builder(
            format!("http://{addr}/token").parse().unwrap(),
            token_client(),
        )
        .refresh_token("rt")
        .build()
        .unwrap();
        let err = refresher.refresh(ctx()).await.unwrap_err();
        assert!(err.is_transient());
        assert_eq!(oauth2_cause(&err).kind(), ErrorKind::Transport);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_covered_by_the_grace_window_and_detected_as_reuse_without_it() {
    guard(async {
        for grace in [Some(Duration::from_secs(60)), None] {
            let s = Servers::start(TokenConfig {
                grace,
                ..TokenConfig::default()
            })
            .await;
            let (_, rt0) = s.token.login();
            let persisted = Persisted::default();
            // The first answer is held past the refresher's timeout: the server rotated, the
            // client never learns the new refresh token and presents the old one again.
            s.token.hold_next(1);
            // Long enough for the second, unheld call on a loaded machine.
            let refresher = app_persisting(&s, &rt0, &persisted)
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            let (client, handle) = api_client(refresher.clone(), "expired-at-start");
            let mut events = handle.subscribe();
            let result = get(client, s.api_url()).await;
            assert_eq!(s.token.requests(), 2);
            let current = s.token.current_of(&rt0).unwrap();
            if grace.is_some() {
                assert_eq!(result.unwrap(), StatusCode::OK);
                assert_eq!(s.token.grace_uses(), 1);
                assert_eq!(s.token.reuse_detected(), 0);
                assert_eq!(
                    refresher.refresh_token().unwrap().secret(),
                    current,
                    "the grace answer re-sent the current token"
                );
                assert_eq!(*persisted.lock().unwrap(), vec![current]);
            } else {
                let err = result.unwrap_err();
                let rejected = err
                    .downcast_ref::<RefreshRejected>()
                    .expect("RefreshRejected");
                assert_eq!(
                    oauth2_cause(rejected.refresh_error()).error_code(),
                    Some("invalid_grant")
                );
                assert_eq!(s.token.reuse_detected(), 1);
                assert!(s.token.family_revoked(&rt0));
                assert_eq!(sessions_ended(&drain(&mut events)), 1);
            }
        }
    })
    .await;
}

type SharedClient = BoxCloneSyncService<Request<Full<Bytes>>, Response<Incoming>, BoxError>;

/// A client whose inner service is set after construction: lets the refresher share the very
/// client that wears the refresh layer.
#[derive(Clone, Default)]
struct LateClient(Arc<OnceLock<SharedClient>>);

impl Service<Request<Full<Bytes>>> for LateClient {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let inner = self.0.get().expect("client set").clone();
        Box::pin(inner.oneshot(req))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_client_wearing_the_layer_does_not_recurse() {
    guard(async {
        // Token endpoint and API on one origin, so the origin check cannot be what lets the
        // token request through untouched.
        let s = SharedOrigin::start(TokenConfig {
            client: ClientCheck::Public {
                id: "cli".to_owned(),
            },
            ..TokenConfig::default()
        })
        .await;
        let (_, rt0) = s.token.login();
        let late = LateClient::default();
        let refresher =
            OAuth2Refresher::builder(s.server.url("/oauth/token").parse().unwrap(), late.clone())
                .client_id("cli")
                .refresh_token(rt0.as_str())
                .build()
                .unwrap();
        let (shared, _handle) = api_client(refresher, "expired-at-start");
        assert!(late.0.set(BoxCloneSyncService::new(shared.clone())).is_ok());

        assert_eq!(
            get(shared.clone(), s.server.url("/resource"))
                .await
                .unwrap(),
            StatusCode::OK
        );
        let seen = s.token.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].authorization, None,
            "no bearer token on the token request"
        );
        assert_eq!(s.token.grants(), 1);
        assert_eq!(s.api.unauthorized(), 1);
        assert_eq!(s.api.ok(), 1);
    })
    .await;
}

#[test]
fn configuration_is_checked_and_debug_output_is_redacted() {
    let dummy = tower::service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let build = |endpoint: &str| {
        OAuth2Refresher::builder(endpoint.parse().unwrap(), dummy)
            .refresh_token("rt-SECRET")
            .build()
    };
    for ok in [
        "https://idp.example/token",
        "http://localhost:8080/token",
        "http://127.0.0.1:9/t",
        "http://[::1]:9/t",
    ] {
        assert!(build(ok).is_ok(), "{ok}");
    }
    for bad in [
        "http://idp.example/token",
        "ftp://idp.example/token",
        "/token",
        "http://10.0.0.1/token",
    ] {
        let err = build(bad).unwrap_err();
        assert!(!err.to_string().contains("SECRET"));
    }
    assert!(
        build("http://idp.example/token")
            .unwrap_err()
            .to_string()
            .contains("https")
    );
    let insecure = OAuth2Refresher::builder("http://idp.internal/token".parse().unwrap(), dummy)
        .refresh_token("rt")
        .allow_insecure_http(true)
        .build();
    assert!(insecure.is_ok());

    let base = || OAuth2Refresher::builder("https://idp.example/token".parse().unwrap(), dummy);
    assert!(
        base().build().is_ok(),
        "a refresh token may come later, with the layer's token set"
    );
    assert!(
        base().refresh_token("").build().is_err(),
        "an empty refresh token is refused"
    );
    assert!(
        base()
            .refresh_token("rt")
            .client_secret("x", ClientAuth::Post)
            .build()
            .is_err(),
        "a secret needs a client id"
    );

    let builder = base()
        .client_id("app")
        .client_secret("client-SECRET", ClientAuth::Basic)
        .refresh_token("rt-SECRET");
    assert!(!format!("{builder:?}").contains("SECRET"));
    let refresher = builder.build().unwrap();
    let shown = format!("{refresher:?} {:?}", refresher.refresh_token().unwrap());
    assert!(!shown.contains("SECRET"), "{shown}");
    assert!(shown.contains("client_secret_basic") && shown.contains("app"));

    // User information in the endpoint (a password) is never shown, and never kept: the
    // refresher sends client credentials by its own setters, so such an endpoint is refused.
    let with_password = OAuth2Refresher::builder(
        "https://app:pw-SECRET@idp.example/token".parse().unwrap(),
        dummy,
    )
    .refresh_token("rt");
    let shown = format!("{with_password:?}");
    assert!(
        !shown.contains("SECRET") && !shown.contains("app:"),
        "{shown}"
    );
    assert!(shown.contains("idp.example/token"), "{shown}");
    let err = with_password.build().unwrap_err();
    assert!(err.to_string().contains("user information"), "{err}");
    assert!(!format!("{err} {err:?}").contains("SECRET"));
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_reaches_tracing_output() {
    let (logs, _tracing) = capture_logs();
    guard(async {
        let (s, rt0, _, refresher) = logged_in(TokenConfig::default()).await;
        let (client, _handle) = api_client(refresher.clone(), "expired-at-start");
        s.token.script(Scripted::new(StatusCode::SERVICE_UNAVAILABLE, None, format!("down {rt0}")));
        assert_eq!(get(client.clone(), s.api_url()).await.unwrap(), StatusCode::OK);
        let echo = json!({ "error": "invalid_grant", "error_description": format!("bad {}", refresher.refresh_token().unwrap().secret()) });
        s.token.script(Scripted::json(StatusCode::BAD_REQUEST, echo));
        s.token.expire_access_tokens();
        assert!(get(client, s.api_url()).await.is_err());

        // A token set through the handle, a logout, and the client-credentials grant.
        let (client, handle) = api_client(refresher.clone(), "expired-at-start");
        let (access, relogin) = s.token.login();
        handle.set_token(Token::bearer(access).unwrap().with_refresh_token(relogin.as_str()));
        s.token.expire_access_tokens();
        assert_eq!(get(client, s.api_url()).await.unwrap(), StatusCode::OK);
        refresher.logout();
        assert!(refresher.refresh(stale_ctx(&relogin)).await.is_err());
        let cc = cc_servers(ClientCheck::Basic(oauth2_server::APP_BASIC.to_owned())).await;
        let cc_refresher = cc_app(&cc).extra_param("tenant", "tenant-SECRET").build().unwrap();
        cc.token.script(Scripted::json(StatusCode::UNAUTHORIZED, json!({ "error": "invalid_client", "error_description": "app%2Dsecret" })));
        assert!(cc_refresher.refresh(ctx()).await.is_err());
        assert!(cc_refresher.refresh(ctx()).await.is_ok());

        let output = logs.text();
        assert!(output.contains("oauth2"), "the refresher logs: {output}");
        assert!(output.contains("client_credentials"), "the grant is logged: {output}");
        let mut secrets = vec![
            rt0.clone(),
            relogin.clone(),
            "app-secret".to_owned(),
            "app%2Dsecret".to_owned(),
            "YXBwOmFwcC1zZWNyZXQ".to_owned(),
            "tenant-SECRET".to_owned(),
        ];
        secrets.extend(s.token.rotated());
        for secret in &secrets {
            assert!(!output.contains(secret.as_str()), "a secret reached the logs");
        }
        assert!(!output.contains("atok-"), "an access token reached the logs");
    })
    .await;
}

/// The context of a first refresh (no token yet).
fn ctx() -> tower_auth_refresh::RefreshContext {
    tower_auth_refresh::RefreshContext::new(None, tower_auth_refresh::RefreshReason::NoToken)
}

#[tokio::test]
async fn permanent_error_codes_are_terminal_at_any_status_and_both_lists_extend() {
    guard(async {
        let (s, rt0, _, refresher) = logged_in(TokenConfig::default()).await;
        let answer = |status: StatusCode, code: &str| {
            Scripted::json(status, json!({ "error": code, "error_description": "why" }))
        };
        let statuses = [
            StatusCode::CONFLICT,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::BAD_REQUEST,
        ];
        for code in [
            "invalid_token",
            "token_expired",
            "invalid_token_state",
            "token_collision",
        ] {
            for status in statuses {
                s.token.script(answer(status, code));
                let err = refresher.refresh(ctx()).await.unwrap_err();
                assert!(err.is_terminal(), "{code} at {status} is terminal");
                assert_eq!(oauth2_cause(&err).error_code(), Some(code));
            }
        }

        // Extending keeps the defaults; replacing drops them.
        let extended = app(&s, &rt0)
            .add_terminal_error_codes(["account_locked"])
            .add_transient_error_codes(["busy"])
            .build()
            .unwrap();
        let replaced = app(&s, &rt0)
            .terminal_error_codes(["account_locked"])
            .build()
            .unwrap();
        // (refresher, status, code, terminal?)
        let cases = [
            (
                &refresher,
                StatusCode::SERVICE_UNAVAILABLE,
                "account_locked",
                false,
            ),
            (
                &extended,
                StatusCode::SERVICE_UNAVAILABLE,
                "account_locked",
                true,
            ),
            (&extended, StatusCode::CONFLICT, "token_collision", true),
            (&extended, StatusCode::BAD_REQUEST, "busy", false),
            (
                &extended,
                StatusCode::BAD_REQUEST,
                "rotation_in_progress",
                false,
            ),
            (
                &replaced,
                StatusCode::INTERNAL_SERVER_ERROR,
                "account_locked",
                true,
            ),
            (
                &replaced,
                StatusCode::INTERNAL_SERVER_ERROR,
                "invalid_grant",
                false,
            ),
            (&replaced, StatusCode::BAD_REQUEST, "invalid_grant", true),
        ];
        for (r, status, code, terminal) in cases {
            s.token.script(answer(status, code));
            let err = r.refresh(ctx()).await.unwrap_err();
            assert_eq!(err.is_terminal(), terminal, "{code} at {status}");
        }
        assert_eq!(s.token.grants(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_or_405_token_endpoint_is_a_terminal_misconfiguration_asked_once() {
    guard(async {
        for status in [StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED] {
            let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
            s.token
                .script(Scripted::new(status, Some("text/html"), "<h1>nope</h1>"));
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert!(err.is_terminal(), "{status}");
            let cause = oauth2_cause(&err);
            assert_eq!(cause.kind(), ErrorKind::Misconfigured);
            assert_eq!(cause.status(), Some(status));
            assert!(
                cause
                    .to_string()
                    .contains("no token endpoint at the configured URI"),
                "{cause}"
            );

            // Through the layer: one token request, then requests fail fast.
            s.token.script(Scripted::new(status, None, ""));
            let (client, handle) = api_client(refresher, "expired-at-start");
            let before = s.token.requests();
            for _ in 0..3 {
                assert!(get(client.clone(), s.api_url()).await.is_err());
            }
            assert_eq!(
                s.token.requests(),
                before + 1,
                "not retried on every request"
            );
            assert!(handle.state().session_ended());
        }
    })
    .await;
}

#[tokio::test]
async fn secrets_echoed_long_or_form_encoded_are_redacted_before_truncation() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        // A long refresh token with characters that form encoding changes.
        let long: String = (0..300)
            .map(|i| ['a', 'B', '7', '+', '/', '=', '-'][i % 7])
            .collect();
        s.token.login_with(&long);
        let refresher = app(&s, &long).build().unwrap();
        let form_encoded: String = form_urlencoded::byte_serialize(long.as_bytes()).collect();
        assert!(form_encoded.contains("%2B"));
        let secret_form: String =
            form_urlencoded::byte_serialize("app-secret".as_bytes()).collect();
        for echo in [
            format!("token {long} is revoked"),
            format!("refresh_token={form_encoded}&client_secret={secret_form}"),
            format!(
                "token {} is revoked",
                form_encoded.replace("%2B", "%2b").replace("%2F", "%2f")
            ),
            format!("client app-secret used {long}"),
        ] {
            let body = json!({ "error": "invalid_grant", "error_description": echo });
            s.token
                .script(Scripted::json(StatusCode::BAD_REQUEST, body));
            let err = refresher.refresh(ctx()).await.unwrap_err();
            let description = oauth2_cause(&err).error_description().unwrap().to_owned();
            assert!(description.contains("<redacted>"), "{description}");
            let shown = shown(&err);
            for window in long
                .as_bytes()
                .windows(12)
                .chain(form_encoded.as_bytes().windows(12))
            {
                let piece = std::str::from_utf8(window).unwrap();
                assert!(
                    !shown.contains(piece),
                    "a piece of the refresh token leaked: {shown}"
                );
            }
            assert!(!shown.contains("app-secret"), "{shown}");
        }
        // The description is still cut to 256 characters after redaction.
        let body = json!({ "error": "invalid_grant", "error_description": "x".repeat(1000) });
        s.token
            .script(Scripted::json(StatusCode::BAD_REQUEST, body));
        let err = refresher.refresh(ctx()).await.unwrap_err();
        assert_eq!(oauth2_cause(&err).error_description().unwrap().len(), 256);
    })
    .await;
}

#[tokio::test]
async fn logout_forgets_the_refresh_token_until_a_new_login() {
    guard(async {
        let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
        refresher.refresh(ctx()).await.unwrap();
        assert_eq!(s.token.requests(), 1);

        refresher.logout();
        assert!(refresher.refresh_token().is_none());
        for _ in 0..2 {
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert!(err.is_terminal());
            assert_eq!(oauth2_cause(&err).kind(), ErrorKind::NoRefreshToken);
        }
        assert_eq!(
            s.token.requests(),
            1,
            "no token request without a refresh token"
        );

        let (_, rt) = s.token.login();
        refresher.set_refresh_token(RefreshToken::new(rt.as_str()));
        let token = refresher.refresh(ctx()).await.unwrap();
        assert!(s.token.access_valid(token.secret()));
        assert_eq!(s.token.grants(), 2);
    })
    .await;
}

/// Needs the core to call `TokenRefresher::logout` from `TokenHandle::clear`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_clear_logs_the_oauth2_refresher_out() {
    guard(async {
        let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
        let (client, handle) = api_client(refresher.clone(), "expired-at-start");
        assert_eq!(
            get(client.clone(), s.api_url()).await.unwrap(),
            StatusCode::OK
        );
        assert_eq!(s.token.grants(), 1);

        handle.clear();
        assert!(
            refresher.refresh_token().is_none(),
            "TokenHandle::clear() made the refresher forget its refresh token"
        );
        let err = handle
            .refresh()
            .await
            .expect_err("a forced refresh after logout fails");
        let cause = OAuth2Error::find(&*err).expect("the OAuth2Error behind the failure");
        assert_eq!(cause.kind(), ErrorKind::NoRefreshToken);
        assert_eq!(s.token.grants(), 1, "the old user was not logged back in");
    })
    .await;
}

/// The context of a refresh replacing `stale`, which carries `refresh`.
fn stale_ctx(refresh: &str) -> tower_auth_refresh::RefreshContext {
    tower_auth_refresh::RefreshContext::new(
        Some(
            Token::bearer("stale-access")
                .unwrap()
                .with_refresh_token(refresh),
        ),
        tower_auth_refresh::RefreshReason::Expired,
    )
}

#[tokio::test]
async fn every_token_carries_the_current_refresh_token_rotated_or_not() {
    guard(async {
        let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
        for round in 0..2 {
            let token = refresher.refresh(ctx()).await.unwrap();
            let rotated = s.token.rotated();
            assert_eq!(token.refresh_token(), Some(rotated[round].as_str()));
        }

        let config = TokenConfig {
            rotate: false,
            ..TokenConfig::default()
        };
        let (s, rt0, _, refresher) = logged_in(config).await;
        let token = refresher.refresh(ctx()).await.unwrap();
        assert_eq!(token.refresh_token(), Some(rt0.as_str()));
        assert!(s.token.rotated().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_set_installed_with_set_token_is_a_whole_relogin() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        // No refresh token yet: the app has not logged in.
        let refresher = OAuth2Refresher::builder(s.token_url().parse().unwrap(), token_client())
            .client_id("app")
            .client_secret("app-secret", ClientAuth::Basic)
            .build()
            .unwrap();
        let (client, handle) = api_client(refresher.clone(), "expired-at-start");
        let err = get(client.clone(), s.api_url()).await.unwrap_err();
        let rejected = err
            .downcast_ref::<RefreshRejected>()
            .expect("RefreshRejected");
        assert_eq!(
            oauth2_cause(rejected.refresh_error()).kind(),
            ErrorKind::NoRefreshToken
        );
        assert_eq!(s.token.requests(), 0);

        for login in 0..2 {
            let (access, refresh) = s.token.login();
            handle.set_token(
                Token::bearer(access)
                    .unwrap()
                    .with_refresh_token(refresh.as_str()),
            );
            assert_eq!(
                get(client.clone(), s.api_url()).await.unwrap(),
                StatusCode::OK
            );
            let before = s.token.seen().len();
            for _ in 0..2 {
                s.token.expire_access_tokens();
                assert_eq!(
                    get(client.clone(), s.api_url()).await.unwrap(),
                    StatusCode::OK
                );
            }
            let seen = s.token.seen();
            assert_eq!(
                seen[before].field("refresh_token"),
                Some(refresh.as_str()),
                "login {login}: the token set's refresh token is presented"
            );
            let current = s.token.current_of(&refresh).unwrap();
            assert_eq!(
                refresher.refresh_token().unwrap().secret(),
                current,
                "login {login}: the refresher follows the rotation"
            );
        }
        assert_eq!(s.token.grants(), 4);
        assert_eq!(s.token.reuse_detected(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_stale_token_set_never_presents_a_rotated_away_refresh_token() {
    guard(async {
        let (s, rt0, _, refresher) = logged_in(TokenConfig::default()).await;
        // Two layers sharing the refresher both hold a token set with rt0.
        let first = refresher.refresh(stale_ctx(&rt0)).await.unwrap();
        let second = refresher.refresh(stale_ctx(&rt0)).await.unwrap();
        let rotated = s.token.rotated();
        let seen = s.token.seen();
        assert_eq!(seen[0].field("refresh_token"), Some(rt0.as_str()));
        assert_eq!(seen[1].field("refresh_token"), Some(rotated[0].as_str()));
        assert_eq!(first.refresh_token(), Some(rotated[0].as_str()));
        assert_eq!(second.refresh_token(), Some(rotated[1].as_str()));
        assert_eq!(s.token.reuse_detected(), 0);

        // A new login set on the refresher wins over a token set of the old session.
        let (_, relogin) = s.token.login();
        refresher.set_refresh_token(RefreshToken::new(relogin.as_str()));
        refresher.refresh(stale_ctx(&rotated[1])).await.unwrap();
        assert_eq!(
            s.token.seen()[2].field("refresh_token"),
            Some(relogin.as_str())
        );
        let rotated = s.token.rotated();

        // After a logout, a token set still carrying the forgotten token does not log back in.
        refresher.logout();
        let err = refresher.refresh(stale_ctx(&rotated[2])).await.unwrap_err();
        assert_eq!(oauth2_cause(&err).kind(), ErrorKind::NoRefreshToken);
        assert_eq!(s.token.requests(), 3);
        assert_eq!(s.token.reuse_detected(), 0);
    })
    .await;
}

#[tokio::test]
async fn expires_in_zero_means_lifetime_unknown() {
    guard(async {
        for expires_in in [json!(0), json!("0"), json!(null)] {
            let config = TokenConfig {
                expires_in,
                ..TokenConfig::default()
            };
            let (s, _, _, refresher) = logged_in(config).await;
            let token = refresher.refresh(ctx()).await.unwrap();
            assert!(s.token.access_valid(token.secret()));
            assert!(token.expiry().is_none(), "no expiry: used until a 401");
            assert_eq!(token.expires_in(), None);
        }
    })
    .await;
}

const RES_A: &str = "https://api.example/orders";
const RES_B: &str = "https://api.example/invoices";

/// Servers whose token endpoint checks `client` and allows the client-credentials grant for
/// scopes `read`/`write` and resources [`RES_A`]/[`RES_B`].
async fn cc_servers(client: ClientCheck) -> Servers {
    let s = servers_checking(client).await;
    s.token.allow_client_credentials(ClientCredentials {
        scopes: vec!["read".to_owned(), "write".to_owned()],
        resources: vec![RES_A.to_owned(), RES_B.to_owned()],
    });
    s
}

/// A client-credentials refresher for "app" / "app-secret" (`client_secret_basic`).
fn cc_app(s: &Servers) -> OAuth2RefresherBuilder<TokenClient> {
    OAuth2Refresher::client_credentials(s.token_url().parse().unwrap(), token_client())
        .client_id("app")
        .client_secret("app-secret", ClientAuth::Basic)
}

#[tokio::test]
async fn client_credentials_requests_carry_every_parameter_for_both_client_authentications() {
    guard(async {
        let s = cc_servers(ClientCheck::Basic(oauth2_server::APP_BASIC.to_owned())).await;
        let counter = MarkerCounter {
            inner: token_client(),
            marked: Arc::default(),
            total: Arc::default(),
        };
        let refresher =
            OAuth2Refresher::client_credentials(s.token_url().parse().unwrap(), counter.clone())
                .client_id("app")
                .client_secret("app-secret", ClientAuth::Basic)
                .scope("read write")
                .resource(RES_A)
                .resource(RES_B)
                .audience("orders-api")
                .extra_param("tenant", "acme & co")
                .build()
                .unwrap();
        let token = refresher.refresh(ctx()).await.unwrap();
        assert!(s.token.access_valid(token.secret()));
        assert_eq!(token.expires_in(), Some(Duration::from_secs(3600)));
        assert_eq!(token.refresh_token(), None);
        assert!(refresher.refresh_token().is_none());
        let seen = s.token.seen().remove(0);
        assert_eq!(
            seen.authorization.as_deref(),
            Some(oauth2_server::APP_BASIC)
        );
        let mut fields: Vec<_> = seen
            .form
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                ("audience", "orders-api"),
                ("grant_type", "client_credentials"),
                ("resource", RES_B),
                ("resource", RES_A),
                ("scope", "read write"),
                ("tenant", "acme & co"),
            ]
        );
        assert_eq!(seen.fields("resource"), [RES_A, RES_B], "in order");
        assert_eq!(
            counter.marked.load(Ordering::SeqCst),
            1,
            "RefreshRequest marker"
        );

        // client_secret_post; a stale token in the context changes nothing.
        let s = cc_servers(ClientCheck::Post {
            id: "svc".to_owned(),
            secret: "p&ss=+".to_owned(),
        })
        .await;
        let refresher =
            OAuth2Refresher::client_credentials(s.token_url().parse().unwrap(), token_client())
                .client_id("svc")
                .client_secret("p&ss=+", ClientAuth::Post)
                .build()
                .unwrap();
        let token = refresher
            .refresh(stale_ctx("rt-from-elsewhere"))
            .await
            .unwrap();
        assert!(s.token.access_valid(token.secret()));
        let seen = s.token.seen().remove(0);
        assert_eq!(seen.authorization, None);
        assert_eq!(seen.field("client_id"), Some("svc"));
        assert_eq!(seen.field("client_secret"), Some("p&ss=+"));
        assert_eq!(seen.field("refresh_token"), None);
        assert_eq!(s.token.client_credentials_grants(), 1);
    })
    .await;
}

#[tokio::test]
async fn client_credentials_errors_are_typed_classified_and_redacted() {
    guard(async {
        let s = cc_servers(ClientCheck::Basic(oauth2_server::APP_BASIC.to_owned())).await;
        // Refusals the server decides for itself: (refresher, code, status).
        let wrong_secret =
            OAuth2Refresher::client_credentials(s.token_url().parse().unwrap(), token_client())
                .client_id("app")
                .client_secret("wrong-secret", ClientAuth::Basic)
                .build()
                .unwrap();
        let cases = [
            (wrong_secret, "invalid_client", StatusCode::UNAUTHORIZED),
            (
                cc_app(&s).scope("read admin").build().unwrap(),
                "invalid_scope",
                StatusCode::BAD_REQUEST,
            ),
            (
                cc_app(&s)
                    .resource("https://elsewhere.example/")
                    .build()
                    .unwrap(),
                "invalid_target",
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (refresher, code, status) in cases {
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert!(err.is_terminal(), "{code}");
            let cause = oauth2_cause(&err);
            assert_eq!(
                (cause.error_code(), cause.status()),
                (Some(code), Some(status))
            );
            assert!(!shown(&err).contains("secret"), "{}", shown(&err));
        }
        let plain = Servers::start(TokenConfig::default()).await;
        let err = cc_app(&plain)
            .build()
            .unwrap()
            .refresh(ctx())
            .await
            .unwrap_err();
        assert!(err.is_terminal());
        assert_eq!(oauth2_cause(&err).error_code(), Some("unauthorized_client"));
        assert_eq!(s.token.client_credentials_grants(), 0);

        // Scripted §5.2 answers, and the secret echoed back (raw, then form-encoded).
        let refresher = cc_app(&s).build().unwrap();
        let body = |code: &str, why: &str| json!({ "error": code, "error_description": why });
        let cases = [
            (
                StatusCode::BAD_REQUEST,
                body("invalid_request", "missing x"),
                true,
                None,
            ),
            (
                StatusCode::BAD_REQUEST,
                body("unsupported_grant_type", "no"),
                true,
                None,
            ),
            (
                StatusCode::UNAUTHORIZED,
                body("invalid_client", "client app-secret unknown"),
                true,
                None,
            ),
            (
                StatusCode::BAD_REQUEST,
                body("invalid_client", "secret=app%2Dsecret"),
                true,
                None,
            ),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                body("temporarily_unavailable", "later"),
                false,
                Some("2"),
            ),
            (
                StatusCode::TOO_MANY_REQUESTS,
                body("slow_down", "later"),
                false,
                Some("9"),
            ),
        ];
        for (status, answer, terminal, retry_after) in cases {
            let mut scripted = Scripted::json(status, answer.clone());
            if let Some(ra) = retry_after {
                scripted = scripted.retry_after(ra);
            }
            s.token.script(scripted);
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert_eq!(err.is_terminal(), terminal, "{answer}");
            assert_eq!(
                err.retry_after(),
                retry_after.map(|ra| Duration::from_secs(ra.parse().unwrap()))
            );
            let shown = shown(&err);
            assert!(
                !shown.contains("app-secret") && !shown.contains("app%2Dsecret"),
                "{shown}"
            );
        }

        // Malformed answers: the same typed errors as the refresh-token grant.
        let json = Some("application/json");
        let cases = [
            (json, "not json".to_owned(), ErrorKind::Malformed),
            (
                json,
                r#"{"token_type":"Bearer"}"#.to_owned(),
                ErrorKind::MissingAccessToken,
            ),
            (
                Some("text/html"),
                r#"{"access_token":"a"}"#.to_owned(),
                ErrorKind::ContentType,
            ),
            (
                json,
                format!(r#"{{"access_token":"{}"}}"#, "x".repeat(70 * 1024)),
                ErrorKind::BodyTooLarge,
            ),
            (
                json,
                r#"{"access_token":"a","token_type":"mac"}"#.to_owned(),
                ErrorKind::UnsupportedTokenType,
            ),
        ];
        for (content_type, answer, kind) in cases {
            s.token
                .script(Scripted::new(StatusCode::OK, content_type, answer));
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert_eq!(oauth2_cause(&err).kind(), kind);
        }
        // A refresh token in a client-credentials answer is ignored.
        s.token.script(Scripted::json(
            StatusCode::OK,
            json!({ "access_token": "atok-x", "token_type": "Bearer", "refresh_token": "rt-x" }),
        ));
        let token = refresher.refresh(ctx()).await.unwrap();
        assert_eq!((token.secret(), token.refresh_token()), ("atok-x", None));
        assert!(refresher.refresh_token().is_none());
    })
    .await;
}

#[test]
fn client_credentials_configuration_is_checked() {
    let dummy = tower::service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let cc = || {
        OAuth2Refresher::client_credentials("https://idp.example/token".parse().unwrap(), dummy)
            .client_id("svc")
    };
    let no_secret = cc().build().unwrap_err();
    assert!(
        no_secret.to_string().contains("client secret"),
        "{no_secret}"
    );
    let with_refresh = cc()
        .client_secret("s", ClientAuth::Basic)
        .refresh_token("rt")
        .build()
        .unwrap_err();
    assert!(
        with_refresh.to_string().contains("refresh token"),
        "{with_refresh}"
    );
    for reserved in ["grant_type", "scope", "client_secret", "resource"] {
        let err = cc()
            .client_secret("s", ClientAuth::Basic)
            .extra_param(reserved, "x")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains(reserved), "{err}");
    }
    let http =
        OAuth2Refresher::client_credentials("http://idp.example/token".parse().unwrap(), dummy)
            .client_id("svc")
            .client_secret("s", ClientAuth::Basic)
            .build()
            .unwrap_err();
    assert!(http.to_string().contains("https"));

    let builder = cc()
        .client_secret("client-SECRET", ClientAuth::Post)
        .extra_param("tenant", "tenant-SECRET")
        .resource(RES_A);
    assert!(!format!("{builder:?}").contains("SECRET"));
    let refresher = builder.build().unwrap();
    let shown = format!("{refresher:?}");
    assert!(!shown.contains("SECRET"), "{shown}");
    assert!(
        shown.contains("ClientCredentials") && shown.contains(RES_A),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_one_token_call_for_a_thousand_request_stampede() {
    // 1,000 with enough open files; fewer under the usual limit (see `connection_budget`).
    // Two such tests run side by side in this binary: each takes half the budget.
    let n = support::connection_budget(2000) / 2;
    guard(async {
        let s = cc_servers(ClientCheck::Basic(oauth2_server::APP_BASIC.to_owned())).await;
        let refresher = cc_app(&s).scope("read").build().unwrap();
        // No initial token: the whole stampede waits for the first one.
        let layer = tower_auth_refresh::RefreshLayer::new(refresher).retries(fast_retry());
        let handle = layer.token_handle();
        let mut events = handle.subscribe();
        let client: ApiClient = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        let url = s.api_url();

        let results = burst(&client, &url, n).await;
        assert!(results.iter().all(|r| matches!(r, Ok(StatusCode::OK))));
        assert_eq!(s.token.requests(), 1, "one token call for 1,000 requests");
        assert_eq!(s.api.ok(), n);
        assert_eq!(s.api.unauthorized(), 0);

        // The token is revoked: 1,000 concurrent 401s, one more token call.
        s.token.expire_access_tokens();
        s.api.gather_unauthorized(n);
        let results = burst(&client, &url, n).await;
        assert!(results.iter().all(|r| matches!(r, Ok(StatusCode::OK))));
        assert_eq!(s.token.requests(), 2);
        assert_eq!(s.token.client_credentials_grants(), 2);
        assert_eq!(s.api.unauthorized(), n);
        assert_eq!(
            s.api.ok(),
            2 * n,
            "each refused request replayed exactly once"
        );
        assert_eq!(refreshed(&drain(&mut events)), 2);
        assert!(
            s.token
                .seen()
                .iter()
                .all(|r| r.field("grant_type") == Some("client_credentials"))
        );
    })
    .await;
}

/// A reqwest-only application: the token client and the API client are both reqwest.
#[cfg(feature = "reqwest")]
mod with_reqwest {
    use super::*;

    fn plain_reqwest() -> reqwest::Client {
        // `no_proxy`: loopback traffic must not go to a proxy configured in the environment.
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reqwest_client_sends_token_requests_for_a_reqwest_middleware_stampede() {
        guard(async {
            let s = Servers::start(TokenConfig::default()).await;
            let (_, rt0) = s.token.login();
            let persisted = Persisted::default();
            let p = persisted.clone();
            let http = plain_reqwest();
            let refresher =
                OAuth2Refresher::with_reqwest(s.token_url().parse().unwrap(), http.clone())
                    .client_id("app")
                    .client_secret("app-secret", ClientAuth::Basic)
                    .refresh_token(rt0.as_str())
                    .on_rotation(move |new: RefreshToken| {
                        let p = p.clone();
                        async move {
                            p.lock().unwrap().push(new.secret().to_owned());
                            Ok::<_, Infallible>(())
                        }
                    })
                    .build()
                    .unwrap();
            let layer = tower_auth_refresh::RefreshLayer::new(refresher.clone())
                .initial_token(Token::bearer("expired-at-start").unwrap())
                .retries(fast_retry());
            let client = reqwest_middleware::ClientBuilder::new(http)
                .with(layer.reqwest_middleware())
                .build();

            for round in 1..=2 {
                s.token.expire_access_tokens();
                s.api.gather_unauthorized(50);
                let tasks: Vec<_> = (0..50)
                    .map(|_| {
                        let (client, url) = (client.clone(), s.api_url());
                        tokio::spawn(
                            async move { client.get(url).send().await.map(|r| r.status()) },
                        )
                    })
                    .collect();
                for task in tasks {
                    assert_eq!(task.await.unwrap().unwrap(), StatusCode::OK);
                }
                assert_eq!(s.token.requests(), round, "one token request per stampede");
            }
            assert_eq!(s.api.unauthorized(), 100);
            assert_eq!(s.api.ok(), 100);
            assert_eq!(*persisted.lock().unwrap(), s.token.rotated());
            assert_eq!(s.token.reuse_detected(), 0);
            let seen = s.token.seen();
            assert_eq!(
                seen[0].authorization.as_deref(),
                Some(oauth2_server::APP_BASIC)
            );
            // The form goes out whole, with its length (not chunked), as a form.
            for seen in &seen {
                assert_eq!(
                    seen.content_type.as_deref(),
                    Some("application/x-www-form-urlencoded")
                );
                let length = seen.content_length.as_deref().expect("a Content-Length");
                assert_eq!(length.parse::<usize>().unwrap(), seen.body_len);
                assert!(seen.body_len > 0);
            }
            assert_eq!(seen[0].field("refresh_token"), Some(rt0.as_str()));
            assert_eq!(
                seen[1].field("refresh_token"),
                Some(s.token.rotated()[0].as_str())
            );
        })
        .await;
    }

    /// A token endpoint that answers with a redirect: the form (refresh token, client secret)
    /// is never sent again to the redirect target, even by a reqwest client with the default
    /// redirect policy, and the answer is a terminal `ErrorKind::Redirect` that names the
    /// redirect and no secret.
    #[tokio::test]
    async fn a_redirecting_token_endpoint_is_never_followed_and_is_a_typed_error() {
        guard(async {
            let post = ClientCheck::Post {
                id: "app".into(),
                secret: "app-secret".into(),
            };
            let s = servers_checking(post.clone()).await;
            let elsewhere = servers_checking(post).await;
            let (_, rt0) = s.token.login();
            let refresher = |http: reqwest::Client| {
                OAuth2Refresher::with_reqwest(s.token_url().parse().unwrap(), http)
                    .client_id("app")
                    .client_secret("app-secret", ClientAuth::Post)
                    .refresh_token(rt0.as_str())
                    .build()
                    .unwrap()
            };
            let check = |err: &RefreshError, status: Option<u16>| {
                let cause = oauth2_cause(err);
                assert_eq!(cause.kind(), ErrorKind::Redirect, "{cause}");
                assert_eq!(cause.status().map(|s| s.as_u16()), status, "{cause}");
                assert!(err.is_terminal(), "{cause}");
                let shown = shown(err);
                assert!(shown.contains("redirect"), "{shown}");
                assert!(
                    !shown.contains(&rt0) && !shown.contains("app-secret"),
                    "{shown}"
                );
            };

            // reqwest's default policy follows redirects: a 307/308 would re-send the form.
            let following = refresher(plain_reqwest());
            for status in [307, 308] {
                s.token.script(
                    Scripted::new(StatusCode::from_u16(status).unwrap(), None, "")
                        .location(elsewhere.token_url()),
                );
                let err = following.refresh(ctx()).await.unwrap_err();
                assert_eq!(
                    elsewhere.token.requests(),
                    0,
                    "{status}: the token request went to the redirect target"
                );
                check(&err, Some(status));
            }
            // A 301/302/303 makes such a client fetch the target with a bodiless GET: no
            // secret goes along, and the target's answer is refused.
            for status in [301, 302, 303] {
                s.token.script(
                    Scripted::new(StatusCode::from_u16(status).unwrap(), None, "")
                        .location(elsewhere.token_url()),
                );
                let err = following.refresh(ctx()).await.unwrap_err();
                check(&err, None);
            }
            for seen in elsewhere.token.seen() {
                assert_eq!(seen.method, http::Method::GET);
                assert!(seen.form.is_empty(), "{:?}", seen.form);
                assert_eq!(seen.authorization, None);
            }

            // Built as recommended (no redirects), nothing at all reaches the target.
            let none = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap();
            let before = elsewhere.token.requests();
            let strict = refresher(none);
            for status in [301, 302, 303, 307, 308] {
                s.token.script(
                    Scripted::new(StatusCode::from_u16(status).unwrap(), None, "")
                        .location(elsewhere.token_url()),
                );
                check(&strict.refresh(ctx()).await.unwrap_err(), Some(status));
            }
            // The hyper-util client never follows redirects either.
            let hyper = OAuth2Refresher::builder(s.token_url().parse().unwrap(), token_client())
                .client_id("app")
                .client_secret("app-secret", ClientAuth::Post)
                .refresh_token(rt0.as_str())
                .build()
                .unwrap();
            s.token.script(
                Scripted::new(StatusCode::TEMPORARY_REDIRECT, None, "")
                    .location(elsewhere.token_url()),
            );
            check(&hyper.refresh(ctx()).await.unwrap_err(), Some(307));
            assert_eq!(elsewhere.token.requests(), before);
            assert_eq!(elsewhere.token.grants(), 0);
            // The refresh token was never spent: the refresher still works.
            let token = strict.refresh(ctx()).await.unwrap();
            assert!(s.token.access_valid(token.secret()));
        })
        .await;
    }

    #[tokio::test]
    async fn a_reqwest_token_client_gives_the_same_typed_errors() {
        guard(async {
            let s = Servers::start(TokenConfig::default()).await;
            let (_, rt0) = s.token.login();
            let refresher =
                OAuth2Refresher::with_reqwest(s.token_url().parse().unwrap(), plain_reqwest())
                    .client_id("app")
                    .client_secret("app-secret", ClientAuth::Basic)
                    .refresh_token(rt0.as_str())
                    // Long enough for the unheld calls on a loaded machine.
                    .timeout(Duration::from_secs(2))
                    .build()
                    .unwrap();
            let echo =
                json!({ "error": "invalid_grant", "error_description": format!("bad {rt0}") });
            s.token
                .script(Scripted::json(StatusCode::BAD_REQUEST, echo));
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert!(err.is_terminal());
            assert_eq!(oauth2_cause(&err).error_code(), Some("invalid_grant"));
            assert!(!shown(&err).contains(&rt0));

            let huge = format!(r#"{{"access_token":"{}"}}"#, "x".repeat(100 * 1024));
            s.token.script(Scripted::new(
                StatusCode::OK,
                Some("application/json"),
                huge,
            ));
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert_eq!(oauth2_cause(&err).kind(), ErrorKind::BodyTooLarge);

            s.token.hold_next(1);
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert!(err.is_transient());
            assert_eq!(oauth2_cause(&err).kind(), ErrorKind::Timeout);
            s.token.release();

            // A closed port: a transport error, with reqwest's error as the source.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            let refresher = OAuth2Refresher::with_reqwest(
                format!("http://{addr}/token").parse().unwrap(),
                plain_reqwest(),
            )
            .refresh_token("rt")
            .build()
            .unwrap();
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert_eq!(oauth2_cause(&err).kind(), ErrorKind::Transport);

            // The client-credentials grant over reqwest.
            let s = cc_servers(ClientCheck::Basic(oauth2_server::APP_BASIC.to_owned())).await;
            let refresher =
                OAuth2Refresher::with_reqwest(s.token_url().parse().unwrap(), plain_reqwest())
                    .grant(tower_auth_refresh::oauth2::Grant::ClientCredentials)
                    .client_id("app")
                    .client_secret("app-secret", ClientAuth::Basic)
                    .resource(RES_A)
                    .build()
                    .unwrap();
            let token = refresher.refresh(ctx()).await.unwrap();
            assert!(s.token.access_valid(token.secret()));
            assert_eq!(s.token.seen()[0].fields("resource"), [RES_A]);
        })
        .await;
    }
}

#[tokio::test]
async fn retry_after_is_read_in_all_three_date_formats_and_capped() {
    guard(async {
        let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
        let cases = [
            ("Sunday, 06-Nov-94 08:49:37 GMT", Duration::ZERO),
            ("Sun Nov  6 08:49:37 1994", Duration::ZERO),
            ("Fri, 01 Jan 2100 00:00:00 GMT", Duration::from_secs(3600)),
            ("Fri Jan  1 00:00:00 2100", Duration::from_secs(3600)),
            ("Friday, 01-Jan-99 00:00:00 GMT", Duration::ZERO),
            ("12", Duration::from_secs(12)),
        ];
        for (value, delay) in cases {
            s.token.script(
                Scripted::new(StatusCode::SERVICE_UNAVAILABLE, None, "").retry_after(value),
            );
            let err = refresher.refresh(ctx()).await.unwrap_err();
            assert!(err.is_transient());
            assert_eq!(err.retry_after(), Some(delay), "{value}");
        }
        s.token
            .script(Scripted::new(StatusCode::SERVICE_UNAVAILABLE, None, "").retry_after("soon"));
        assert_eq!(
            refresher.refresh(ctx()).await.unwrap_err().retry_after(),
            None
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_error_find_walks_every_layer_error() {
    guard(async {
        // RefreshFailed: transient failures until the retry policy gives up.
        let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
        let layer = tower_auth_refresh::RefreshLayer::new(refresher)
            .initial_token(Token::bearer("expired-at-start").unwrap())
            .retries(fast_retry().max_attempts(2));
        let client: ApiClient = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        for _ in 0..2 {
            s.token.script(Scripted::json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": "temporarily_unavailable" }),
            ));
        }
        let err = get(client, s.api_url()).await.unwrap_err();
        assert!(
            err.is::<tower_auth_refresh::error::RefreshFailed>(),
            "{err}"
        );
        let found = OAuth2Error::find(&*err).expect("found behind RefreshFailed");
        assert_eq!(found.error_code(), Some("temporarily_unavailable"));
        assert_eq!(found.status(), Some(StatusCode::SERVICE_UNAVAILABLE));

        // RefreshRejected, then SessionEnded.
        let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
        let (client, _handle) = api_client(refresher, "expired-at-start");
        s.token.script(Scripted::json(
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_grant" }),
        ));
        let rejected = get(client.clone(), s.api_url()).await.unwrap_err();
        assert!(rejected.is::<RefreshRejected>());
        let ended = get(client, s.api_url()).await.unwrap_err();
        assert!(ended.is::<SessionEnded>());
        for err in [&rejected, &ended] {
            let found = OAuth2Error::find(&**err).expect("found");
            assert_eq!(found.error_code(), Some("invalid_grant"));
            assert_eq!(found.kind(), ErrorKind::ErrorResponse);
        }

        // A RefreshError itself, an error wrapping a layer error, and errors without one.
        let direct = {
            let (s, _, _, refresher) = logged_in(TokenConfig::default()).await;
            s.token
                .script(Scripted::new(StatusCode::NOT_FOUND, None, ""));
            refresher.refresh(ctx()).await.unwrap_err()
        };
        assert_eq!(
            OAuth2Error::find(&direct).map(OAuth2Error::kind),
            Some(ErrorKind::Misconfigured)
        );
        let wrapped = std::io::Error::other(rejected);
        assert_eq!(
            OAuth2Error::find(&wrapped).and_then(OAuth2Error::error_code),
            Some("invalid_grant")
        );
        assert!(OAuth2Error::find(&std::io::Error::other("plain")).is_none());
        assert!(OAuth2Error::find(&RefreshError::terminal("no oauth2 here")).is_none());
    })
    .await;
}

/// A refresher logged in through the layer's token set (`handle.set_token(access
/// .with_refresh_token(rt1))`, the documented re-login): it has no refresh token of its own.
fn handle_login_refresher(s: &Servers, persisted: &Persisted) -> OAuth2Refresher<TokenClient> {
    persisting(app_client(s), persisted).build().unwrap()
}

/// A handle-login refresher (no own token) whose token requests time out after 300 ms.
fn timing_out_refresher(s: &Servers, persisted: &Persisted) -> OAuth2Refresher<TokenClient> {
    persisting(app_client(s), persisted)
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

/// The refresh tokens the token endpoint saw presented, in order.
fn presented_tokens(s: &Servers) -> Vec<Option<String>> {
    s.token
        .seen()
        .iter()
        .map(|x| x.field("refresh_token").map(str::to_owned))
        .collect()
}

/// A 503 (`temporarily_unavailable`) from the token endpoint.
fn unavailable() -> Scripted {
    Scripted::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Some("application/json"),
        r#"{"error":"temporarily_unavailable"}"#,
    )
}

/// A layer over `refresher` whose token set carries `rt1` (a login through the handle), and
/// a forced refresh whose token request the server holds (answering it with `first`, if
/// given, once released): the handle and the refresh's task.
async fn held_refresh_after_a_handle_login(
    s: &Servers,
    refresher: &OAuth2Refresher<TokenClient>,
    rt1: &str,
    retries: Backoff,
    first: Option<Scripted>,
) -> (TokenHandle, tokio::task::JoinHandle<Result<(), String>>) {
    let layer = tower_auth_refresh::RefreshLayer::new(refresher.clone())
        .retries(retries)
        .initial_token(Token::bearer("stale").unwrap().with_refresh_token(rt1));
    let handle = layer.token_handle();
    if let Some(first) = first {
        s.token.script(first);
    }
    s.token.hold_next(1);
    let forced = support::forced_refresh(&handle);
    s.token.held(1).await;
    (handle, forced)
}

/// A logout while a refresh presenting the token set's refresh token is in flight: the
/// question is not asked again with the logged-out refresh token (it was, and its answer
/// was adopted and persisted), and the refresh fails with `NoRefreshToken`.
async fn logout_during_refresh(config: TokenConfig, first: Option<Scripted>) {
    let s = Servers::start(config).await;
    let (_, rt1) = s.token.login();
    let persisted = Persisted::default();
    let refresher = handle_login_refresher(&s, &persisted);
    if let Some(first) = first {
        s.token.script(first);
    }
    s.token.hold_next(1);
    let pending = tokio::spawn({
        let (r, rt1) = (refresher.clone(), rt1.clone());
        async move { r.refresh(stale_ctx(&rt1)).await }
    });
    s.token.held(1).await;
    TokenRefresher::logout(&refresher); // what TokenHandle::clear calls
    s.token.release();
    let result = pending.await.unwrap();
    let presented = presented_tokens(&s);
    assert_eq!(
        s.token.requests(),
        1,
        "after the logout the refresher presented {presented:?}; now holds {:?}, persisted {:?}, result ok={}",
        refresher.refresh_token().map(|t| t.secret().to_owned()),
        persisted.lock().unwrap(),
        result.is_ok()
    );
    assert!(refresher.refresh_token().is_none());
    assert!(persisted.lock().unwrap().is_empty());
    let err = result.expect_err("no session after the logout");
    assert!(err.is_terminal());
    assert_eq!(oauth2_cause(&err).kind(), ErrorKind::NoRefreshToken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_during_a_refresh_from_the_token_set_is_not_undone_by_the_next_question() {
    guard(logout_during_refresh(
        TokenConfig::default(),
        Some(unavailable()),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_during_a_refresh_from_the_token_set_is_not_undone_with_a_non_rotating_server() {
    guard(logout_during_refresh(
        TokenConfig {
            rotate: false,
            ..TokenConfig::default()
        },
        None,
    ))
    .await;
}

/// A new login's refresh token (`set_refresh_token`) set while a refresh presenting the
/// token set's refresh token is in flight: the question is asked again with the new one (it
/// was asked with the old session's, whose answer then replaced the new login's token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_during_a_refresh_from_the_token_set_asks_again_with_the_new_token() {
    guard(async {
        let s = Servers::start(TokenConfig {
            rotate: false,
            ..TokenConfig::default()
        })
        .await;
        let (_, rt1) = s.token.login();
        let (_, after_login) = s.token.login();
        let persisted = Persisted::default();
        let refresher = handle_login_refresher(&s, &persisted);
        let token = replaced_during_refresh(&s, &refresher, &rt1, &after_login)
            .await
            .unwrap();
        let presented = presented_tokens(&s);
        assert_eq!(
            presented[1].as_deref(),
            Some(after_login.as_str()),
            "presented {presented:?}"
        );
        assert_eq!(refresher.refresh_token().unwrap().secret(), after_login);
        assert!(s.token.issued_in_session_of(token.secret(), &after_login));
    })
    .await;
}

/// The same through the layer: `handle.clear()` (logout) while the first refresh after a
/// login through the handle runs; the logged-out refresh token is not presented again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_clear_during_a_refresh_never_presents_the_logged_out_refresh_token() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt1) = s.token.login();
        let persisted = Persisted::default();
        let refresher = handle_login_refresher(&s, &persisted);
        let (handle, forced) = held_refresh_after_a_handle_login(
            &s,
            &refresher,
            &rt1,
            Backoff::none(),
            Some(unavailable()),
        )
        .await;
        handle.clear();
        s.token.release();
        // The question asked again would be inside this same refresher call.
        let _ = forced.await.unwrap();
        assert_eq!(
            s.token.requests(),
            1,
            "after handle.clear(): presented {:?}; refresher holds {:?}; hook persisted {:?}",
            presented_tokens(&s),
            refresher.refresh_token().map(|t| t.secret().to_owned()),
            persisted.lock().unwrap()
        );
    })
    .await;
}

/// A login through the handle (a token set with rt1) whose first refresh is in flight when
/// the application also calls `set_refresh_token(rt1)`, the same token: the same session.
/// The rotating server's answer stands and its rotated token is adopted; it was discarded as
/// superseded and the question asked again presented the rotated-away rt1 (reuse detected,
/// the family revoked, the session ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_refresh_token_set_twice_during_a_login_refresh_is_one_session() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt1) = s.token.login();
        let persisted = Persisted::default();
        let refresher = handle_login_refresher(&s, &persisted);
        let result = replaced_during_refresh(&s, &refresher, &rt1, &rt1).await;
        let presented = presented_tokens(&s);
        assert!(
            result.is_ok(),
            "presented {:?} (rt1 = {rt1}); result {:?}; reuse detected {}; family revoked {}",
            presented,
            result.as_ref().err().map(|e| e.to_string()),
            s.token.reuse_detected(),
            s.token.family_revoked(&rt1)
        );
        assert_eq!(presented, [Some(rt1.clone())], "one token request");
        let rotated = refresher.refresh_token().unwrap().secret().to_owned();
        assert_ne!(rotated, rt1);
        assert_eq!(result.unwrap().refresh_token(), Some(rotated.as_str()));
        assert_eq!(*persisted.lock().unwrap(), [rotated]);
    })
    .await;
}

/// A logout and then a new login through the handle, both during the first refresh after a
/// login through the handle: the old refresh token is retired, the new session works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_then_a_login_during_a_refresh_leaves_the_new_session_healthy() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt1) = s.token.login();
        let (a2, rt2) = s.token.login();
        let persisted = Persisted::default();
        let refresher = handle_login_refresher(&s, &persisted);
        let (handle, forced) =
            held_refresh_after_a_handle_login(&s, &refresher, &rt1, Backoff::none(), None).await;
        handle.clear();
        handle.set_token(Token::bearer(a2).unwrap().with_refresh_token(rt2.clone()));
        s.token.release();
        let first = forced.await.unwrap();
        let again = handle
            .refresh()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let presented = presented_tokens(&s);
        assert!(
            again.is_ok(),
            "first {first:?}; again {again:?}; presented {presented:?}"
        );
        assert_eq!(presented.last().unwrap().as_deref(), Some(rt2.as_str()));
    })
    .await;
}

/// The login's `set_refresh_token(rt1)` lands after the rotating server's answer was stored
/// but before the refresh returned (its `on_rotation` hook is still writing): the rotated
/// token stays the refresher's own and is carried by the token set. (`set` replaced it with
/// the rotated-away rt1, and the next refresh presented rt1: reuse detected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_refresh_token_set_during_the_rotation_hook_keeps_the_rotation() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt1) = s.token.login();
        let persisted = Persisted::default();
        let entered = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let refresher = {
            let (p, e, r) = (persisted.clone(), entered.clone(), release.clone());
            app_client(&s)
                .on_rotation(move |new: RefreshToken| {
                    let (p, e, r) = (p.clone(), e.clone(), r.clone());
                    async move {
                        if p.lock().unwrap().is_empty() {
                            e.notify_one();
                            r.notified().await;
                        }
                        p.lock().unwrap().push(new.secret().to_owned());
                        Ok::<_, Infallible>(())
                    }
                })
                .build()
                .unwrap()
        };
        let pending = tokio::spawn({
            let (refresher, rt1) = (refresher.clone(), rt1.clone());
            async move { refresher.refresh(stale_ctx(&rt1)).await }
        });
        entered.notified().await;
        refresher.set_refresh_token(RefreshToken::new(rt1.clone()));
        release.notify_one();
        let first = pending.await.unwrap().expect("first refresh");
        let rotated = persisted.lock().unwrap()[0].clone();
        let own = refresher.refresh_token().unwrap().secret().to_owned();
        let carried = first.refresh_token().map(str::to_owned);
        let again = refresher
            .refresh(stale_ctx(carried.as_deref().unwrap_or_default()))
            .await;
        let presented = presented_tokens(&s);
        assert!(
            own == rotated && again.is_ok(),
            "rt1 {rt1}, rotated+persisted {rotated}; refresher's own now {own}; token set \
             carries {carried:?}; presented {presented:?}; second refresh {:?}; reuse \
             detected {}",
            again.as_ref().err().map(|e| e.to_string()),
            s.token.reuse_detected()
        );
    })
    .await;
}

/// Account switching with a server that does not rotate refresh tokens: the last refresh
/// presented A's token (kept); the application switches to B, then back to A with A's
/// still valid token. The switch back replaces B's session (it was ignored: A's token
/// looked like one the last refresh had rotated away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_back_to_a_refresh_token_that_was_not_rotated_replaces_the_other_session() {
    guard(async {
        let s = Servers::start(TokenConfig {
            rotate: false,
            ..TokenConfig::default()
        })
        .await;
        let (_, rt_a) = s.token.login();
        let (_, rt_b) = s.token.login();
        let refresher = app(&s, &rt_a).build().unwrap();
        // A's session refreshes once (the server keeps rt_a).
        refresher
            .refresh(stale_ctx(&rt_a))
            .await
            .expect("A refresh");
        // Switch to user B, then back to user A.
        refresher.set_refresh_token(RefreshToken::new(rt_b.clone()));
        refresher.set_refresh_token(RefreshToken::new(rt_a.clone()));
        let own = refresher.refresh_token().unwrap().secret().to_owned();
        let _ = refresher.refresh(stale_ctx(&rt_a)).await;
        let presented = presented_tokens(&s);
        assert!(
            own == rt_a,
            "A={rt_a} B={rt_b}: after switching back to A the refresher holds {own}; \
             presented {presented:?}"
        );
        assert_eq!(presented.last().unwrap().as_deref(), Some(rt_a.as_str()));
    })
    .await;
}

/// `handle.clear()` while the first refresh after a login through the handle is in flight,
/// and that token request then times out (no answer at all). The layer's retry, with the
/// same token set, does not present the logged-out refresh token again (it did, and the
/// refresher adopted the answer and the hook persisted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_during_a_token_request_that_times_out_is_not_undone_by_the_retry() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt1) = s.token.login();
        let persisted = Persisted::default();
        let refresher = timing_out_refresher(&s, &persisted);
        // The first answer (a 503, not a grant) is held past the refresher's timeout.
        let (handle, forced) = held_refresh_after_a_handle_login(
            &s,
            &refresher,
            &rt1,
            fast_retry(),
            Some(unavailable()),
        )
        .await;
        handle.clear(); // logout
        let first = forced.await.unwrap();
        s.token.release();
        assert_eq!(
            s.token.requests(),
            1,
            "after the logout: presented {:?}; refresher holds {:?}; hook persisted {:?}; \
             result {first:?}",
            presented_tokens(&s),
            refresher.refresh_token().map(|t| t.secret().to_owned()),
            persisted.lock().unwrap()
        );
        assert!(refresher.refresh_token().is_none());
        assert!(persisted.lock().unwrap().is_empty());
    })
    .await;
}

/// The same with a new login (`set_refresh_token(rt2)`) instead of a logout: the layer's
/// retry presents rt2 (it presented the old session's rt1, whose answer replaced rt2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_during_a_token_request_that_times_out_is_not_overwritten_by_the_retry() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt1) = s.token.login();
        let (_, rt2) = s.token.login();
        let persisted = Persisted::default();
        let refresher = timing_out_refresher(&s, &persisted);
        let (_handle, forced) = held_refresh_after_a_handle_login(
            &s,
            &refresher,
            &rt1,
            fast_retry(),
            Some(unavailable()),
        )
        .await;
        refresher.set_refresh_token(RefreshToken::new(rt2.clone())); // new login
        let first = forced.await.unwrap();
        s.token.release();
        let own = refresher.refresh_token().map(|t| t.secret().to_owned());
        assert!(
            own.as_deref()
                .is_some_and(|o| s.token.current_of(&rt2).as_deref() == Some(o)),
            "new login rt2={rt2} (old rt1={rt1}): presented {:?}; refresher holds {own:?}; \
             hook persisted {:?}; result {first:?}",
            presented_tokens(&s),
            persisted.lock().unwrap()
        );
    })
    .await;
}

/// Switching to B and back to A while a refresh presenting A is in flight, against a
/// rotating server: A's rotation is kept (the same session), and A is never presented again
/// (it was: the rotation was discarded, reuse detected, A's session revoked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_away_and_back_during_a_rotating_refresh_never_presents_the_spent_token() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt_a) = s.token.login();
        let (_, rt_b) = s.token.login();
        let persisted = Persisted::default();
        let refresher = refresher(&s, &rt_a, &persisted);
        s.token.hold_next(1);
        let pending = tokio::spawn({
            let (r, rt_a) = (refresher.clone(), rt_a.clone());
            async move { r.refresh(stale_ctx(&rt_a)).await }
        });
        s.token.held(1).await; // the server has rotated rt_a already
        refresher.set_refresh_token(RefreshToken::new(rt_b.clone()));
        refresher.set_refresh_token(RefreshToken::new(rt_a.clone()));
        s.token.release();
        let result = pending.await.unwrap();
        let seen = presented_tokens(&s);
        assert!(
            s.token.reuse_detected() == 0
                && seen
                    .iter()
                    .filter(|p| p.as_deref() == Some(rt_a.as_str()))
                    .count()
                    == 1,
            "A={rt_a} B={rt_b}: presented {seen:?}; reuse detected {}; A's family revoked {}; \
             result {:?}; refresher holds {:?}",
            s.token.reuse_detected(),
            s.token.family_revoked(&rt_a),
            result.as_ref().map(|_| ()).map_err(|e| e.to_string()),
            refresher.refresh_token().map(|t| t.secret().to_owned())
        );
    })
    .await;
}

/// A layer whose refresher calls are cut off after `timeout`, one attempt each.
fn impatient_client(
    refresher: OAuth2Refresher<TokenClient>,
    timeout: Duration,
) -> (ApiClient, TokenHandle) {
    let layer = tower_auth_refresh::RefreshLayer::new(refresher)
        .initial_token(Token::bearer("expired-at-start").unwrap())
        .refresh_timeout(timeout)
        .retries(Backoff::none());
    let handle = layer.token_handle();
    let http = http_client::<ReplayBody<Full<Bytes>>>();
    (ServiceBuilder::new().layer(layer).service(http), handle)
}

/// Waits (10 s at most) until the rotation hook has persisted something.
async fn persisted_once(persisted: &Persisted) {
    for _ in 0..2_000 {
        if !persisted.lock().unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the rotated refresh token was never persisted");
}

/// A rotation hook that persists into `persisted` (counting its calls in `calls`), its first
/// call held until the test calls [`release`](Self::release): a slow secret store, slower
/// than the layer waits (a semaphore, not a sleep: no race with the layer's timers).
struct HeldHook {
    persisted: Persisted,
    calls: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl HeldHook {
    /// A refresher from `rt0` at `s`'s token endpoint, with a new held hook.
    fn refresher(s: &Servers, rt0: &str) -> (Self, OAuth2Refresher<TokenClient>) {
        let hook = Self {
            persisted: Persisted::default(),
            calls: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let (persisted, calls, gate) = (
            hook.persisted.clone(),
            hook.calls.clone(),
            hook.gate.clone(),
        );
        let refresher = app(s, rt0)
            .on_rotation(move |new: RefreshToken| {
                let (persisted, gate) = (persisted.clone(), gate.clone());
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        gate.acquire().await.unwrap().forget();
                    }
                    persisted.lock().unwrap().push(new.secret().to_owned());
                    Ok::<_, Infallible>(())
                }
            })
            .build()
            .unwrap();
        (hook, refresher)
    }

    /// Lets the first call write.
    fn release(&self) {
        self.gate.add_permits(1);
    }
}

/// The rotation the layer gave up on was kept and persisted without another refresh: the
/// hook persisted every rotated refresh token, and the refresher holds the current one.
async fn kept_and_persisted(
    s: &Servers,
    rt0: &str,
    refresher: &OAuth2Refresher<TokenClient>,
    persisted: &Persisted,
) {
    persisted_once(persisted).await;
    assert_eq!(*persisted.lock().unwrap(), s.token.rotated());
    assert_eq!(
        Some(refresher.refresh_token().unwrap().secret().to_owned()),
        s.token.current_of(rt0)
    );
}

/// The next refresh (forced: the failed one's cool-down holds) presents the kept refresh
/// token: the request succeeds, a second grant, no reuse, and the new rotation persisted.
async fn next_refresh_presents_it(
    client: ApiClient,
    handle: &TokenHandle,
    s: &Servers,
    persisted: &Persisted,
) {
    handle.refresh().await.unwrap();
    assert_eq!(get(client, s.api_url()).await.unwrap(), StatusCode::OK);
    assert_eq!(s.token.grants(), 2);
    assert_eq!(s.token.reuse_detected(), 0);
    assert_eq!(*persisted.lock().unwrap(), s.token.rotated());
}

/// The layer stops waiting for a refresh (its refresh timeout ran out) while the token
/// endpoint, which has rotated the refresh token, still holds its answer: the exchange runs
/// on without the layer, so the rotated refresh token is kept and persisted at once, and the
/// next refresh presents it (no reuse, which would end the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_the_layer_stops_waiting_for_still_keeps_and_persists_its_rotation() {
    guard(async {
        let (s, rt0, persisted, refresher) = logged_in(TokenConfig::default()).await;
        let (client, handle) = impatient_client(refresher.clone(), Duration::from_millis(300));
        s.token.hold_next(1);
        let first = get(client.clone(), s.api_url()).await;
        assert!(
            first.is_err(),
            "the layer stopped waiting for the held answer"
        );
        s.token.held(1).await;
        assert!(persisted.lock().unwrap().is_empty());

        // The answer arrives after the layer gave up: kept and persisted without another
        // refresh.
        s.token.release();
        kept_and_persisted(&s, &rt0, &refresher, &persisted).await;
        next_refresh_presents_it(client, &handle, &s, &persisted).await;
    })
    .await;
}

/// The layer stops waiting for a refresh while its rotation hook is still writing the new
/// refresh token: the hook runs to its end, so what it persisted is the current refresh
/// token, not the spent one, without another refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_hook_the_layer_stops_waiting_for_runs_to_its_end() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt0) = s.token.login();
        let (hook, refresher) = HeldHook::refresher(&s, &rt0);
        let (client, handle) = impatient_client(refresher.clone(), Duration::from_millis(200));
        let first = get(client.clone(), s.api_url()).await;
        assert!(first.is_err(), "the layer stopped waiting for the hook");
        assert_eq!(s.token.grants(), 1);
        hook.release();
        kept_and_persisted(&s, &rt0, &refresher, &hook.persisted).await;
        next_refresh_presents_it(client, &handle, &s, &hook.persisted).await;
    })
    .await;
}

/// A rotation hook cut off mid-write (the runtime running the refresh shut down) leaves the
/// new refresh token marked as not persisted: the next refresh, on another runtime, persists
/// it, although its answer rotates nothing.
#[test]
fn a_rotation_hook_cut_off_by_a_runtime_shutdown_runs_again_on_the_next_refresh() {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let s = main.block_on(Servers::start(TokenConfig::default()));
    let (_, rt0) = s.token.login();
    let persisted = Persisted::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let (p, c, st) = (persisted.clone(), calls.clone(), started.clone());
    let refresher = app(&s, &rt0)
        .on_rotation(move |new: RefreshToken| {
            let (p, st) = (p.clone(), st.clone());
            let first = c.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    // Never finishes: its runtime goes away under it.
                    st.notify_one();
                    std::future::pending::<()>().await;
                }
                p.lock().unwrap().push(new.secret().to_owned());
                Ok::<_, Infallible>(())
            }
        })
        .build()
        .unwrap();

    let doomed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = refresher.clone();
    doomed.spawn(async move { first.refresh(ctx()).await });
    doomed.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), started.notified())
            .await
            .expect("the hook was called")
    });
    doomed.shutdown_background();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(persisted.lock().unwrap().is_empty());
    let rt1 = s.token.rotated()[0].clone();

    main.block_on(guard(async {
        let none = json!({ "access_token": "atok-none", "token_type": "Bearer" });
        s.token.script(Scripted::json(StatusCode::OK, none));
        let token = refresher.refresh(ctx()).await.unwrap();
        assert_eq!(token.refresh_token(), Some(rt1.as_str()));
        assert_eq!(s.token.seen()[1].field("refresh_token"), Some(rt1.as_str()));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(*persisted.lock().unwrap(), vec![rt1.clone()]);
    }));
}

/// Refreshes the layer stops waiting for while an earlier exchange still runs (its rotation
/// hook is slow) send nothing: they never queue up behind it to run later, each rotating the
/// refresh token again for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_given_up_while_an_earlier_one_runs_send_nothing_later() {
    guard(async {
        let s = Servers::start(TokenConfig::default()).await;
        let (_, rt0) = s.token.login();
        let (hook, refresher) = HeldHook::refresher(&s, &rt0);
        let (client, handle) = impatient_client(refresher, Duration::from_millis(150));
        assert!(get(client.clone(), s.api_url()).await.is_err());
        // Forced refreshes while the first exchange's hook writes: each is given up.
        for _ in 0..5 {
            assert!(handle.refresh().await.is_err());
        }
        hook.release();
        persisted_once(&hook.persisted).await;
        // Long enough for queued exchanges, had there been any, to run.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(s.token.grants(), 1, "only the first exchange was sent");
        assert_eq!(hook.calls.load(Ordering::SeqCst), 1);
        next_refresh_presents_it(client, &handle, &s, &hook.persisted).await;
    })
    .await;
}
