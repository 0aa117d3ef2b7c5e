//! DPoP (RFC 9449) end to end: real loopback hyper servers that verify every proof (signature,
//! `typ`, `htm`, `htu`, `ath`, `iat`, `jti` reuse, `nonce`, key binding), the layer with a
//! hyper-util client, and the OAuth 2.0 refresher asking for DPoP-bound tokens.

mod dpop_support;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Full;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::dpop::{
    DPOP, DPOP_NONCE, Dpop, DpopKeyError, DpopSigner, Es256Key, MAX_NONCE_LEN, NonceOutcome,
    PublicJwk,
};
use tower_auth_refresh::error::{RefreshFailed, RefreshRejected, UnauthorizedAfterRefresh};
use tower_auth_refresh::oauth2::{ErrorKind, OAuth2Error, OAuth2Refresher};
use tower_auth_refresh::{
    Backoff, BoxError, Cooldown, RefreshContext, RefreshError, RefreshEvent, RefreshLayer,
    RefreshReason, ReplayBody, RequestProof, Token, TokenRefresher, context_fn,
};

use dpop_support::{
    ApiOptions, ApiStats, Issued, NonceMode, TokenStats, TokenType, Verifier, api_server_with,
    claims_of, token_server,
};
use support::{Server, capture_logs, connection_budget, guard, http_client};

const TOKEN_NONCE: &str = "ts-nonce-1";
const API_NONCE: &str = "rs-nonce-1";

struct Setup {
    api: Server,
    _token: Server,
    token_url: String,
    api_stats: Arc<ApiStats>,
    token_stats: Arc<TokenStats>,
    issued: Arc<Issued>,
    dpop: Dpop,
}

async fn setup(mode: NonceMode, token_type: TokenType) -> Setup {
    setup_with(mode, token_type, ApiOptions::default()).await
}

/// [`setup`] with a resource server whose order of checks `api` sets.
async fn setup_with(mode: NonceMode, token_type: TokenType, api: ApiOptions) -> Setup {
    let verifier = Arc::new(Verifier::default());
    let issued = Arc::new(Issued::default());
    let (api_stats, token_stats) = (Arc::default(), Arc::default());
    let token = token_server(
        verifier.clone(),
        issued.clone(),
        Arc::clone(&token_stats),
        Some(TOKEN_NONCE),
        token_type,
    )
    .await;
    let api = api_server_with(verifier, issued.clone(), Arc::clone(&api_stats), mode, api).await;
    Setup {
        token_url: token.url("/token"),
        api,
        _token: token,
        api_stats,
        token_stats,
        issued,
        dpop: Dpop::new(Es256Key::generate()),
    }
}

type Client = tower_auth_refresh::Refresh<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        ReplayBody<Full<Bytes>>,
    >,
>;

/// The layer over a hyper-util client, refreshing through the OAuth 2.0 refresher with DPoP.
fn client(s: &Setup, initial: Token, accept_bearer: bool) -> Client {
    let refresher = OAuth2Refresher::builder(s.token_url.parse().unwrap(), http_client())
        .refresh_token("rt-1")
        .dpop(s.dpop.clone())
        .dpop_accept_bearer(accept_bearer)
        .build()
        .unwrap();
    let layer = RefreshLayer::new(refresher)
        .initial_token(initial)
        .proof(s.dpop.clone());
    ServiceBuilder::new()
        .layer(layer)
        .service(http_client::<ReplayBody<Full<Bytes>>>())
}

fn request(s: &Setup, id: usize) -> Request<Full<Bytes>> {
    Request::get(s.api.url(&format!("/api/orders/{id}?page=2")))
        .header("x-request", id.to_string())
        .body(Full::default())
        .unwrap()
}

/// A DPoP token the layer already knows has expired: it refreshes before the first send.
fn expired_token() -> Token {
    Token::with_scheme("DPoP", "at-0")
        .unwrap()
        .with_expires_at(SystemTime::now() - Duration::from_secs(60))
}

/// Sends `n` requests, at most `concurrency` at a time; returns their statuses.
async fn run(svc: &Client, s: &Setup, n: usize, concurrency: usize) -> Vec<StatusCode> {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for id in 0..n {
        let (svc, req, permits) = (svc.clone(), request(s, id), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            svc.oneshot(req).await.map(|res| res.status())
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap().expect("every request succeeds"));
    }
    statuses
}

/// Every request answered 200 once; a request sent twice was refused first and its two
/// proofs had different jtis.
fn check_per_request(s: &Setup, n: usize) {
    let by_request = s.api_stats.by_request.lock().unwrap();
    assert_eq!(by_request.len(), n);
    for (id, sends) in by_request.iter() {
        assert!(sends.len() <= 2, "request {id} sent {} times", sends.len());
        assert_eq!(sends.last().unwrap().1, 200, "request {id}: {sends:?}");
        if let [(first_jti, first), (second_jti, _)] = &sends[..] {
            assert_eq!(*first, 401, "request {id}");
            assert!(second_jti.is_some(), "request {id}: the replay has a proof");
            assert_ne!(first_jti, second_jti, "request {id}: a new jti");
        }
    }
    assert!(
        s.api_stats.refused.lock().unwrap().is_empty(),
        "no proof refused: {:?}",
        s.api_stats.refused.lock().unwrap()
    );
    assert!(
        s.api_stats
            .nonces_seen
            .lock()
            .unwrap()
            .iter()
            .all(|n| n.as_deref() == Some(API_NONCE))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_one_refresh_and_one_extra_send_per_nonce_challenge() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Dpop).await;
        let svc = client(&s, expired_token(), false);
        let statuses = run(&svc, &s, 200, concurrency()).await;
        assert!(statuses.iter().all(|s| *s == StatusCode::OK));

        // One refresh: the token endpoint asked for its nonce once, then issued one token.
        assert_eq!(s.token_stats.issued.load(Ordering::SeqCst), 1);
        assert_eq!(s.token_stats.nonce_refusals.load(Ordering::SeqCst), 1);
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 2);
        assert!(s.token_stats.refused.lock().unwrap().is_empty());

        // Each nonce challenge cost exactly one extra send, never a refresh.
        let challenges = s.api_stats.nonce_challenges.load(Ordering::SeqCst);
        assert!(challenges >= 1, "the first send cannot know the nonce");
        assert_eq!(s.api_stats.token_refusals.load(Ordering::SeqCst), 0);
        assert_eq!(s.api_stats.ok.load(Ordering::SeqCst), 200);
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 200 + challenges);
        check_per_request(&s, 200);
        println!("200 requests: 1 refresh, {challenges} nonce challenges");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_server_expired_is_refreshed_once_and_replays_carry_the_nonce_of_the_401() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Dpop).await;
        // Bound to the key and valid for the layer, but expired on the server.
        s.issued.insert("at-0", Some(s.dpop.thumbprint()), true);
        let svc = client(&s, Token::with_scheme("DPoP", "at-0").unwrap(), false);
        let statuses = run(&svc, &s, 200, concurrency()).await;
        assert!(statuses.iter().all(|s| *s == StatusCode::OK));
        assert_eq!(s.token_stats.issued.load(Ordering::SeqCst), 1);
        let refusals = s.api_stats.token_refusals.load(Ordering::SeqCst);
        let challenges = s.api_stats.nonce_challenges.load(Ordering::SeqCst);
        assert!(refusals >= 1);
        assert_eq!(
            s.api_stats.sends.load(Ordering::SeqCst),
            200 + refusals + challenges
        );
        check_per_request(&s, 200);
    })
    .await;
}

#[tokio::test]
async fn a_replayed_request_carries_a_new_jti_and_the_nonce() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Dpop).await;
        s.issued.insert("at-0", Some(s.dpop.thumbprint()), false);
        let svc = client(&s, Token::with_scheme("DPoP", "at-0").unwrap(), false);
        let res = svc.oneshot(request(&s, 7)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let sends = s.api_stats.by_request.lock().unwrap()["7"].clone();
        assert_eq!(sends.len(), 2, "one nonce challenge, one replay");
        assert_eq!((sends[0].1, sends[1].1), (401, 200));
        assert_ne!(sends[0].0, sends[1].0);
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 0, "no refresh");
        assert_eq!(
            *s.api_stats.nonces_seen.lock().unwrap(),
            vec![Some(API_NONCE.to_owned())]
        );
    })
    .await;
}

/// Review item 2: a request URI with user information (`http://user:pw@host/`) gets a proof
/// whose `htu` is the target URI the server computes (scheme, host, port, path: no user
/// information, so no password inside the proof), and the nonce it was handed is kept for the
/// origin, so a request to the same host without user information sends it at once.
#[tokio::test]
async fn user_information_is_never_in_a_proof_and_shares_the_origins_nonce() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Dpop).await;
        s.issued.insert("at-0", Some(s.dpop.thumbprint()), false);
        let svc = client(&s, Token::with_scheme("DPoP", "at-0").unwrap(), false);
        let addr = s.api.addr;
        for (id, uri) in [
            (1, format!("http://user:pw-5e1c@{addr}/api/orders/1?page=2")),
            (2, format!("http://{addr}/api/orders/2")),
            (3, format!("http://USER:pw-5e1c@{addr}/api/orders/3")),
        ] {
            let req = Request::get(uri)
                .header("x-request", id.to_string())
                .body(Full::default())
                .unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "request {id}");
        }
        let proofs = s.api_stats.proofs_seen.lock().unwrap().clone();
        let htus: Vec<_> = proofs
            .iter()
            .map(|p| dpop_support::claims_of_jwt(p).unwrap()["htu"].clone())
            .collect();
        let htu = |n: u32| format!("http://{addr}/api/orders/{n}");
        // One nonce challenge for the first request; the others send the nonce at once.
        assert_eq!(htus, [htu(1), htu(1), htu(2), htu(3)]);
        assert!(proofs.iter().all(|p| {
            let claims = dpop_support::claims_of_jwt(p).unwrap().to_string();
            !claims.contains("pw-5e1c") && !claims.contains('@')
        }));
        assert_eq!(s.api_stats.nonce_challenges.load(Ordering::SeqCst), 1);
        assert!(s.api_stats.refused.lock().unwrap().is_empty());
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 0, "no refresh");
        let plain: Uri = format!("http://{addr}/").parse().unwrap();
        assert_eq!(s.dpop.nonce_for(&plain).as_deref(), Some(API_NONCE));
    })
    .await;

    // Made by hand, too: no user information in `htu`, the nonce shared, the header sensitive.
    let dpop = Dpop::new(Es256Key::generate());
    let with_user = Uri::from_static("https://u:pw-5e1c@API.example:8443/a?q=1");
    let mut nonce = HeaderMap::new();
    nonce.insert(DPOP_NONCE, HeaderValue::from_static("n-1"));
    assert_eq!(
        dpop.remember_nonce(&with_user, &nonce),
        NonceOutcome::Stored
    );
    let plain = Uri::from_static("https://api.example:8443/b");
    assert_eq!(dpop.nonce_for(&plain).as_deref(), Some("n-1"));
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_static("DPoP tok-1"));
    dpop.prove(&Method::GET, &with_user, &mut headers).unwrap();
    assert!(headers[DPOP].is_sensitive());
    let claims = claims_of(&headers).unwrap();
    assert_eq!(claims["htu"], "https://api.example:8443/a");
    assert_eq!(claims["nonce"], "n-1");
}

/// A nonce challenge offered beside a `Bearer` challenge (RFC 9449 §7.2, several challenges
/// in one field) asks for a new proof; a resource server's nonce is never sent to a token
/// endpoint on the same origin, nor the other way round (RFC 9449 §9).
#[test]
fn a_combined_challenge_asks_for_a_proof_and_nonces_stay_with_their_server() {
    let dpop = Dpop::new(Es256Key::generate());
    let api = Uri::from_static("https://idp.example/userinfo");
    let token = Uri::from_static("https://idp.example/token");
    let mut challenge = HeaderMap::new();
    challenge.insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static(
            r#"Bearer realm="api", DPoP error="use_dpop_nonce", algs="ES256""#,
        ),
    );
    challenge.insert(DPOP_NONCE, HeaderValue::from_static("rs-1"));
    assert!(dpop.wants_new_proof(&api, StatusCode::UNAUTHORIZED, &challenge));
    assert_eq!(dpop.nonce_for(&api).as_deref(), Some("rs-1"));
    // A token request's proof (no access token) on the same origin carries no RS nonce.
    let mut headers = HeaderMap::new();
    headers.insert(
        DPOP,
        HeaderValue::try_from(dpop.proof(&Method::POST, &token, None).unwrap()).unwrap(),
    );
    assert!(claims_of(&headers).unwrap().get("nonce").is_none());
    // A resource request's does.
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_static("DPoP tok-1"));
    dpop.prove(&Method::GET, &api, &mut headers).unwrap();
    assert_eq!(claims_of(&headers).unwrap()["nonce"], "rs-1");
    // A refresher of one's own keeps the token endpoint's nonce through the public API, and
    // its token requests carry it (the resource requests keep theirs).
    let mut answer = HeaderMap::new();
    answer.insert(DPOP_NONCE, HeaderValue::from_static("as-1"));
    assert_eq!(
        dpop.remember_token_endpoint_nonce(&token, &answer),
        NonceOutcome::Stored
    );
    assert_eq!(
        dpop.token_endpoint_nonce_for(&token).as_deref(),
        Some("as-1")
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        DPOP,
        HeaderValue::try_from(dpop.proof(&Method::POST, &token, None).unwrap()).unwrap(),
    );
    assert_eq!(claims_of(&headers).unwrap()["nonce"], "as-1");
    assert_eq!(dpop.nonce_for(&api).as_deref(), Some("rs-1"));
}

#[tokio::test]
async fn the_nonce_of_a_success_is_used_by_the_next_request() {
    guard(async {
        let s = setup(NonceMode::NextOnSuccess, TokenType::Dpop).await;
        s.issued.insert("at-0", Some(s.dpop.thumbprint()), false);
        let mut svc = client(&s, Token::with_scheme("DPoP", "at-0").unwrap(), false);
        for id in 0..5 {
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(request(&s, id))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
        // Only the first request, which could not know a nonce, was challenged.
        assert_eq!(s.api_stats.nonce_challenges.load(Ordering::SeqCst), 1);
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 6);
        let seen = s.api_stats.nonces_seen.lock().unwrap().clone();
        let want: Vec<_> = (0..5).map(|n| Some(format!("s-{n}"))).collect();
        assert_eq!(seen, want);
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 0, "no refresh");
    })
    .await;
}

#[tokio::test]
async fn a_nonce_challenge_on_the_replay_is_a_typed_error_not_a_loop() {
    guard(async {
        let s = setup(NonceMode::AlwaysNew, TokenType::Dpop).await;
        s.issued.insert("at-0", Some(s.dpop.thumbprint()), false);
        let svc = client(&s, Token::with_scheme("DPoP", "at-0").unwrap(), false);
        let err = svc.oneshot(request(&s, 1)).await.unwrap_err();
        let twice = err
            .downcast_ref::<UnauthorizedAfterRefresh>()
            .unwrap_or_else(|| panic!("{err}"));
        // No refresh ran: the error says what did.
        assert!(twice.proof_refused());
        assert_eq!(
            err.to_string(),
            "request refused with 401 Unauthorized again after a new proof of possession"
        );
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 2);
        assert_eq!(s.api_stats.nonce_challenges.load(Ordering::SeqCst), 2);
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 0, "no refresh");
        // The replay carried the nonce of the first challenge.
        assert_eq!(
            s.dpop
                .nonce_for(&s.api.url("/").parse().unwrap())
                .as_deref(),
            Some("r-2")
        );
    })
    .await;
}

#[tokio::test]
async fn a_malformed_nonce_is_ignored_logged_and_never_sent() {
    let (logs, _tracing) = capture_logs();
    guard(async {
        let s = setup(NonceMode::Malformed, TokenType::Dpop).await;
        s.issued.insert("at-0", Some(s.dpop.thumbprint()), false);
        let svc = client(&s, Token::with_scheme("DPoP", "at-0").unwrap(), false);
        let err = svc.oneshot(request(&s, 1)).await.unwrap_err();
        assert!(err.is::<UnauthorizedAfterRefresh>(), "{err}");
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 2, "no loop");
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 0, "no refresh");
        assert_eq!(s.dpop.nonce_for(&s.api.url("/").parse().unwrap()), None);
    })
    .await;
    assert!(logs.text().contains("malformed DPoP-Nonce ignored"));
    assert!(!logs.text().contains("bad\\\"nonce") && !logs.text().contains("bad\"nonce"));
}

#[test]
fn malformed_nonces_are_typed_outcomes() {
    let dpop = Dpop::new(Es256Key::generate());
    let uri = Uri::from_static("https://api.example/x");
    let outcome = |values: &[&[u8]]| {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(DPOP_NONCE, HeaderValue::from_bytes(v).unwrap());
        }
        dpop.remember_nonce(&uri, &headers)
    };
    assert_eq!(outcome(&[]), NonceOutcome::Absent);
    assert_eq!(outcome(&[b"good-1"]), NonceOutcome::Stored);
    let long = vec![b'a'; MAX_NONCE_LEN + 1];
    for bad in [
        &[&long[..]][..],
        &[b"with space"],
        &[b"quote\""],
        &[b"back\\slash"],
        &[b"\xff\xfe"],
        &[b""],
        &[b"a", b"b"],
    ] {
        assert_eq!(outcome(bad), NonceOutcome::Malformed, "{bad:?}");
    }
    assert_eq!(outcome(&[&vec![b'a'; MAX_NONCE_LEN]]), NonceOutcome::Stored);
    // The good nonce is replaced only by good ones.
    assert_eq!(outcome(&[b"good-2"]), NonceOutcome::Stored);
    outcome(&[b"quote\""]);
    assert_eq!(dpop.nonce_for(&uri).as_deref(), Some("good-2"));
    let proof = dpop.proof(&Method::GET, &uri, Some("tok-1")).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(DPOP, proof.parse().unwrap());
    assert_eq!(claims_of(&headers).unwrap()["nonce"], "good-2");
    // Nonces are per origin.
    let other = Uri::from_static("https://other.example/x");
    assert_eq!(dpop.nonce_for(&other), None);
}

#[tokio::test]
async fn a_token_endpoint_asking_for_a_nonce_again_is_retried_once_and_fails_transiently() {
    guard(async {
        let verifier = Arc::new(Verifier::default());
        let stats = Arc::new(TokenStats::default());
        let issued = Arc::new(Issued::default());
        let token = token_server(verifier, issued, stats.clone(), None, TokenType::Dpop).await;
        let dpop = Dpop::new(Es256Key::generate());
        let refresher =
            OAuth2Refresher::builder(token.url("/token").parse().unwrap(), http_client())
                .refresh_token("rt-1")
                .dpop(dpop.clone())
                .build()
                .unwrap();
        let svc = ServiceBuilder::new()
            .layer(
                RefreshLayer::new(refresher)
                    .retries(Backoff::none())
                    .proof(dpop.clone()),
            )
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        let never = support::unused_loopback_addr();
        let req = Request::get(format!("http://{never}/never-sent"))
            .body(Full::default())
            .unwrap();
        let err = svc.oneshot(req).await.unwrap_err();
        assert!(
            err.is::<RefreshFailed>(),
            "transient, not the end of the session: {err}"
        );
        let oauth = OAuth2Error::find(&*err).expect("the refresher's error");
        assert_eq!(oauth.error_code(), Some("use_dpop_nonce"));
        assert_eq!(stats.calls.load(Ordering::SeqCst), 2, "one retry, no loop");
        assert_eq!(stats.nonce_refusals.load(Ordering::SeqCst), 2);
        // The retry carried the nonce of the first refusal; the second one is remembered for
        // the token endpoint (a token request's proof), not for the origin's resources.
        let endpoint: Uri = token.url("/token").parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            DPOP,
            dpop.proof(&Method::POST, &endpoint, None)
                .unwrap()
                .parse()
                .unwrap(),
        );
        assert_eq!(claims_of(&headers).unwrap()["nonce"], "t-2");
        assert_eq!(
            dpop.token_endpoint_nonce_for(&endpoint).as_deref(),
            Some("t-2")
        );
        assert_eq!(dpop.nonce_for(&endpoint), None);
    })
    .await;
}

/// A token endpoint's `400 invalid_dpop_proof` (a client clock off for `iat`, a
/// stale nonce) refuses the proof, not the refresh token: a transient error, no session end,
/// and a later refresh, with a new proof, gets a token.
#[tokio::test]
async fn an_invalid_dpop_proof_from_the_token_endpoint_is_transient_and_a_later_refresh_succeeds() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Dpop).await;
        s.token_stats.refuse_proofs.store(1, Ordering::SeqCst);
        let refresher = OAuth2Refresher::builder(s.token_url.parse().unwrap(), http_client())
            .refresh_token("rt-1")
            .dpop(s.dpop.clone())
            .build()
            .unwrap();
        let layer = RefreshLayer::new(refresher)
            .initial_token(expired_token())
            .retries(Backoff::none())
            .cooldown(Cooldown::none())
            .proof(s.dpop.clone());
        let handle = layer.token_handle();
        let mut events = handle.subscribe();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Full<Bytes>>>());

        let err = svc.clone().oneshot(request(&s, 1)).await.unwrap_err();
        assert!(
            err.is::<RefreshFailed>(),
            "transient, not the end of the session: {err}"
        );
        let oauth = OAuth2Error::find(&*err).expect("the refresher's error");
        assert_eq!(oauth.error_code(), Some("invalid_dpop_proof"));
        assert_eq!(oauth.status(), Some(StatusCode::BAD_REQUEST));
        assert!(!format!("{err} {err:?}").contains("rt-1"));
        assert!(!handle.state().session_ended());
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 1, "not retried");
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 0, "nothing sent");

        // The next request refreshes again, with a new proof (carrying the nonce of the
        // refusal), and gets a token.
        let res = svc.oneshot(request(&s, 2)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 2);
        assert_eq!(s.token_stats.nonce_refusals.load(Ordering::SeqCst), 0);
        assert_eq!(s.token_stats.issued.load(Ordering::SeqCst), 1);
        assert_eq!(
            *s.token_stats.refused.lock().unwrap(),
            ["iat outside the window"]
        );
        assert_eq!(s.api_stats.ok.load(Ordering::SeqCst), 1);
        assert!(!handle.state().session_ended());

        let mut seen = Vec::new();
        while let Some(event) = events.try_recv() {
            seen.push(event.unwrap());
        }
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, RefreshEvent::SessionEnded { .. })),
            "{seen:?}"
        );
        assert!(
            seen.iter().any(|e| matches!(
                e,
                RefreshEvent::RefreshFailed {
                    terminal: false,
                    ..
                }
            )),
            "{seen:?}"
        );
        assert!(
            matches!(seen.last(), Some(RefreshEvent::Refreshed { .. })),
            "{seen:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn bearer_answered_when_dpop_asked_is_refused_by_default() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Bearer).await;
        let svc = client(&s, expired_token(), false);
        let err = svc.oneshot(request(&s, 1)).await.unwrap_err();
        assert!(err.is::<RefreshRejected>(), "{err}");
        let oauth = OAuth2Error::find(&*err).expect("the refresher's error");
        assert_eq!(oauth.kind(), ErrorKind::DpopNotBound);
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 0, "nothing sent");
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn bearer_answered_when_dpop_asked_is_used_without_proof_when_accepted() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Bearer).await;
        let svc = client(&s, expired_token(), true);
        let res = svc.oneshot(request(&s, 1)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 1);
        assert_eq!(s.api_stats.ok.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn client_credentials_gets_a_dpop_token_after_one_nonce_retry() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Dpop).await;
        let refresher =
            OAuth2Refresher::client_credentials(s.token_url.parse().unwrap(), http_client())
                .client_id("cli")
                .client_secret("s3cret", tower_auth_refresh::oauth2::ClientAuth::Basic)
                .dpop(s.dpop.clone())
                .build()
                .unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(RefreshLayer::new(refresher).proof(s.dpop.clone()))
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(request(&s, 1))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            s.token_stats.calls.load(Ordering::SeqCst),
            2,
            "one nonce retry"
        );
        assert_eq!(s.token_stats.nonce_refusals.load(Ordering::SeqCst), 1);
        assert_eq!(s.token_stats.issued.load(Ordering::SeqCst), 1);
        // The API's own nonce: one challenge, one extra send.
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 2);
        assert!(s.token_stats.refused.lock().unwrap().is_empty());
    })
    .await;
}

/// A P-256 private key made by openssl, PKCS#8 DER, in hex.
const PKCS8_DER: &str = "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420\
    be69e7ee945fed83116db89b533555f1b37823e69421aa11dcc22100e2e1c885a1440342000499cfe21482c9bd\
    cf2ef8539893486fd377bc9afab2255d7057cb949705bbb859758b74ab14af519b79827ecb5717c25acada4526\
    96941ef2b454a23c49423119";

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn keys_round_trip_and_never_show_the_private_key() {
    let key = Es256Key::generate();
    let private = key.to_private_jwk();
    let json: serde_json::Value = serde_json::from_str(&private).unwrap();
    let d = json["d"].as_str().unwrap().to_owned();
    assert_eq!(d.len(), 43);

    let again = Es256Key::from_jwk(&private).unwrap();
    assert_eq!(again.public_jwk(), key.public_jwk());
    // `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` then
    // `openssl pkcs8 -topk8 -nocrypt -outform DER`; x and y from `openssl pkey -pubout`.
    let from_der = Es256Key::from_pkcs8_der(&hex(PKCS8_DER)).unwrap();
    assert_eq!(
        *from_der.public_jwk(),
        PublicJwk::Ec {
            crv: "P-256".into(),
            x: "mc_iFILJvc8u-FOYk0hv03e8mvqyJV1wV8uUlwW7uFk".into(),
            y: "dYt0qxSvUZt5gn7LVxfCWsraRSaWlB7ytFSiPElCMRk".into(),
        }
    );

    // Bad input: typed errors that never repeat the key.
    let mut mismatch = json.clone();
    mismatch["x"] = Es256Key::generate().public_jwk().to_json()["x"].clone();
    let cases = [
        (Es256Key::from_jwk("not json"), DpopKeyError::JwkNotJson),
        (
            Es256Key::from_jwk(&mismatch.to_string()),
            DpopKeyError::JwkMismatch,
        ),
        (
            Es256Key::from_jwk(&private.replace("P-256", "P-384")),
            DpopKeyError::JwkCurve,
        ),
        (
            Es256Key::from_jwk(&private.replace(&d, "AAAA")),
            DpopKeyError::JwkPrivate,
        ),
        (
            Es256Key::from_pkcs8_der(b"\x30\x03junk"),
            DpopKeyError::Pkcs8,
        ),
    ];
    for (got, want) in cases {
        let err = got.unwrap_err();
        assert_eq!(err, want);
        assert!(!format!("{err} {err:?}").contains(&d));
    }
    let dpop = Dpop::new(key.clone());
    for shown in [format!("{key:?}"), format!("{dpop:?}")] {
        assert!(!shown.contains(&d), "{shown}");
        assert!(shown.contains(&key.public_jwk().thumbprint()), "{shown}");
    }
}

#[tokio::test]
async fn traces_of_a_dpop_run_show_no_private_key_no_token_and_no_proof() {
    let (logs, _tracing) = capture_logs();
    let key = Es256Key::generate();
    let d = serde_json::from_str::<serde_json::Value>(&key.to_private_jwk()).unwrap()["d"]
        .as_str()
        .unwrap()
        .to_owned();
    let proofs = guard(async {
        let mut s = setup(NonceMode::Fixed(API_NONCE), TokenType::Dpop).await;
        s.dpop = Dpop::new(key);
        let svc = client(&s, expired_token(), false);
        let statuses = run(&svc, &s, 5, 5).await;
        assert!(statuses.iter().all(|s| *s == StatusCode::OK));
        s.api_stats.by_request.lock().unwrap().len()
    })
    .await;
    assert_eq!(proofs, 5);
    let text = logs.text();
    assert!(text.contains("DPoP nonce"), "the nonce retry is traced");
    for secret in [d.as_str(), "at-1", "rt-1", "eyJ"] {
        assert!(!text.contains(secret), "{secret} in the traces");
    }
}

/// A signer that fails: the request fails unsent with a typed error.
#[derive(Debug)]
struct Broken(tower_auth_refresh::dpop::PublicJwk);

impl DpopSigner for Broken {
    fn algorithm(&self) -> &str {
        "ES256"
    }
    fn public_jwk(&self) -> &tower_auth_refresh::dpop::PublicJwk {
        &self.0
    }
    fn sign(&self, _: &[u8]) -> Result<Vec<u8>, BoxError> {
        Err("hsm offline".into())
    }
}

#[test]
fn proofs_bind_method_uri_and_token_and_fail_typed() {
    let key = Es256Key::generate();
    let dpop = Dpop::new(key.clone());
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_static("DPoP tok-1"));
    let uri = Uri::from_static("https://api.example:8443/a/b?q=1");
    dpop.prove(&Method::POST, &uri, &mut headers).unwrap();
    let claims = claims_of(&headers).unwrap();
    assert_eq!(claims["htm"], "POST");
    assert_eq!(claims["htu"], "https://api.example:8443/a/b");
    assert_eq!(claims["ath"], dpop_support::ath("tok-1"));
    assert!(claims.get("nonce").is_none());
    let verifier = Verifier::default();
    verifier
        .verify(
            &headers,
            &Method::POST,
            "https://api.example:8443/a/b",
            Some("tok-1"),
            None,
        )
        .unwrap();
    assert_eq!(
        verifier
            .verify(
                &headers,
                &Method::POST,
                "https://api.example:8443/a/b",
                Some("tok-1"),
                None
            )
            .unwrap_err(),
        "jti reused"
    );

    // A Bearer token is not bound: no proof.
    let mut bearer = HeaderMap::new();
    bearer.insert(AUTHORIZATION, HeaderValue::from_static("Bearer tok-1"));
    dpop.prove(&Method::GET, &uri, &mut bearer).unwrap();
    assert!(!bearer.contains_key(DPOP));

    // A relative URI and a failing signer are typed errors.
    let err = dpop
        .prove(&Method::GET, &Uri::from_static("/a"), &mut headers.clone())
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<tower_auth_refresh::dpop::DpopError>(),
        Some(&tower_auth_refresh::dpop::DpopError::RelativeUri)
    );
    let broken = Dpop::new(Broken(key.public_jwk().clone()));
    let err = broken.prove(&Method::GET, &uri, &mut headers).unwrap_err();
    assert_eq!(
        err.downcast_ref::<tower_auth_refresh::dpop::DpopError>(),
        Some(&tower_auth_refresh::dpop::DpopError::Sign)
    );

    // wants_new_proof: only a 401 DPoP use_dpop_nonce challenge.
    let mut res = HeaderMap::new();
    assert!(!dpop.wants_new_proof(&uri, StatusCode::UNAUTHORIZED, &res));
    res.insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("DPoP error=\"use_dpop_nonce\""),
    );
    res.insert(DPOP_NONCE, HeaderValue::from_static("n-9"));
    assert!(!dpop.wants_new_proof(&uri, StatusCode::OK, &res));
    assert!(dpop.wants_new_proof(&uri, StatusCode::UNAUTHORIZED, &res));
    assert_eq!(dpop.nonce_for(&uri).as_deref(), Some("n-9"));
}

/// How many of the 200 requests run at once: two tests of this file run them side by side, so
/// each takes half of what the open-files limit allows (all 200 when it is high, as in CI's full-size pass).
fn concurrency() -> usize {
    (connection_budget(400) / 2).max(1)
}

/// The proof of a token request is a signed secret like the layer's: marked sensitive (kept out
/// of logs and HTTP/2 header tables). Seen by the client the refresher sends through.
#[tokio::test]
async fn a_token_requests_proof_is_marked_sensitive() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let client = {
        let seen = seen.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let seen = seen.clone();
            async move {
                *seen.lock().unwrap() = req.headers().get(DPOP).map(HeaderValue::is_sensitive);
                let body = r#"{"access_token":"at-1","token_type":"DPoP","expires_in":60}"#;
                let res = http::Response::builder()
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(res)
            }
        })
    };
    let refresher = OAuth2Refresher::builder("https://idp.example/token".parse().unwrap(), client)
        .refresh_token("rt-1")
        .dpop(Dpop::new(Es256Key::generate()))
        .build()
        .unwrap();
    let handle = RefreshLayer::new(refresher).token_handle();
    handle.refresh().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(true));
}

/// The reqwest middleware as the tower layer: a `POST` under `ReplayMethods::Idempotent` is
/// never replayed for a new token, but a nonce challenge costs one replay with the same token
/// and a new proof (the method does not matter: nothing was done with the refused proof).
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn through_reqwest_a_post_under_idempotent_replays_gets_its_nonce_replay() {
    guard(async {
        let s = setup(NonceMode::Fixed(API_NONCE), TokenType::Dpop).await;
        s.issued.insert("at-0", Some(s.dpop.thumbprint()), false);
        let refresher = OAuth2Refresher::builder(s.token_url.parse().unwrap(), http_client())
            .refresh_token("rt-1")
            .dpop(s.dpop.clone())
            .build()
            .unwrap();
        let layer = RefreshLayer::new(refresher)
            .initial_token(Token::with_scheme("DPoP", "at-0").unwrap())
            .proof(s.dpop.clone())
            .replay_methods(tower_auth_refresh::ReplayMethods::Idempotent);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let client = reqwest_middleware::ClientBuilder::new(http)
            .with(layer.reqwest_middleware())
            .build();
        let res = client
            .post(s.api.url("/api/orders/7"))
            .header("x-request", "7")
            .body("an order")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let sends = s.api_stats.by_request.lock().unwrap()["7"].clone();
        assert_eq!(sends.len(), 2, "one nonce challenge, one replay: {sends:?}");
        assert_eq!((sends[0].1, sends[1].1), (401, 200));
        assert_ne!(sends[0].0, sends[1].0, "a new proof (jti) for the replay");
        assert_eq!(s.token_stats.calls.load(Ordering::SeqCst), 0, "no refresh");
    })
    .await;
}

/// A server that checks the proof (its nonce) before the token, as RFC 9449 allows, and a
/// token the layer holds as valid (no expiry) that the server revoked (it never issued
/// `at-0`); no nonce known yet.
async fn proof_first_setup() -> Setup {
    let api = ApiOptions { proof_first: true };
    setup_with(NonceMode::Fixed(API_NONCE), TokenType::Dpop, api).await
}

/// The layer holding the revoked `at-0`, refreshing through the OAuth 2.0 refresher with
/// DPoP, wrapped to count its calls and to check each is for a refused token.
fn counted_layer(s: &Setup) -> (RefreshLayer, Arc<AtomicUsize>) {
    let refresher = OAuth2Refresher::builder(s.token_url.parse().unwrap(), http_client())
        .refresh_token("rt-1")
        .dpop(s.dpop.clone())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = {
        let calls = calls.clone();
        context_fn(move |ctx: RefreshContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            assert!(
                matches!(ctx.reason(), RefreshReason::Unauthorized(_)),
                "a refresh for the refused token: {:?}",
                ctx.reason()
            );
            refresher.refresh(ctx)
        })
    };
    let layer = RefreshLayer::new(counted)
        .initial_token(Token::with_scheme("DPoP", "at-0").unwrap())
        .proof(s.dpop.clone());
    (layer, calls)
}

/// The statuses the API server answered request `id` with, in order.
fn statuses_of(s: &Setup, id: &str) -> Vec<u16> {
    let by_request = s.api_stats.by_request.lock().unwrap();
    by_request
        .get(id)
        .map(|sends| sends.iter().map(|(_, status)| *status).collect())
        .unwrap_or_default()
}

/// The `WWW-Authenticate` of a response, as text.
fn challenge_of(headers: &HeaderMap) -> &str {
    headers
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Request 1 was answered with its own 401 (`invalid_token`) after its first send and one
/// nonce replay, never a third send, and the refusal was refreshed for once, for later
/// requests.
fn refused_on_its_nonce_replay(
    s: &Setup,
    status: StatusCode,
    headers: &HeaderMap,
    calls: &AtomicUsize,
) {
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge_of(headers).contains("invalid_token"));
    assert_eq!(
        statuses_of(s, "1"),
        [401, 401],
        "the first send and one nonce replay, never a third"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one refresh, for later requests"
    );
}

/// Request 2, after [`refused_on_its_nonce_replay`], went out once (the nonce known, the
/// token fresh), with no other refresh.
fn sent_once_with_the_new_token(s: &Setup, status: StatusCode, calls: &AtomicUsize) {
    assert_eq!(status, StatusCode::OK);
    assert_eq!(statuses_of(s, "2"), [200]);
    assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), 3);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Review: the first send is challenged for the nonce (`NewProof`), and the replay (same
/// token, new proof with the nonce) is refused for its token. No refresh ran, so this is no
/// `UnauthorizedAfterRefresh`: the refusal is recorded and refreshed for (once) as a first
/// refusal that cannot be replayed, the caller gets the 401 as it is, the request is never
/// sent a third time, and the next request goes out once with the new token and the nonce.
#[tokio::test]
async fn a_token_refused_on_the_nonce_replay_is_refreshed_for_later_and_the_401_returned() {
    guard(async {
        let s = proof_first_setup().await;
        let (layer, calls) = counted_layer(&s);
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        let res = match svc.clone().oneshot(request(&s, 1)).await {
            Ok(res) => res,
            Err(err) => panic!("the caller gets the 401 response, not an error: {err}"),
        };
        refused_on_its_nonce_replay(&s, res.status(), res.headers(), &calls);
        assert_eq!(s.api_stats.nonce_challenges.load(Ordering::SeqCst), 1);
        assert_eq!(s.api_stats.token_refusals.load(Ordering::SeqCst), 1);
        assert_eq!(s.token_stats.issued.load(Ordering::SeqCst), 1);

        // The nonce is known and the token fresh: one send.
        let res = svc.oneshot(request(&s, 2)).await.unwrap();
        sent_once_with_the_new_token(&s, res.status(), &calls);
        assert!(s.api_stats.refused.lock().unwrap().is_empty());
    })
    .await;
}

/// The same, twenty requests at once: one refresher call for all of them (it goes through the
/// token cell), each request sent at most twice, none failing; a request refused on its nonce
/// replay gets its 401, one refused on its first send (the nonce known by then) is replayed
/// with the new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_requests_refused_on_their_nonce_replays_cause_one_refresh() {
    guard(async {
        const N: usize = 20;
        let s = proof_first_setup().await;
        let (layer, calls) = counted_layer(&s);
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        let start = Arc::new(tokio::sync::Barrier::new(N));
        let mut tasks = Vec::new();
        for id in 0..N {
            let (svc, req, start) = (svc.clone(), request(&s, id), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                svc.oneshot(req).await.map(|res| res.status())
            }));
        }
        let mut refused = 0;
        for (id, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(StatusCode::OK) => {}
                Ok(StatusCode::UNAUTHORIZED) => refused += 1,
                Ok(status) => panic!("request {id}: {status}"),
                Err(err) => panic!("request {id} failed: {err}"),
            }
        }
        // The first send of all could not carry the nonce: at least that request was refused
        // on its nonce replay.
        assert!(refused >= 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresher call");
        assert_eq!(s.token_stats.issued.load(Ordering::SeqCst), 1);
        let mut total = 0;
        for id in 0..N {
            let statuses = statuses_of(&s, &id.to_string());
            assert!(
                (1..=2).contains(&statuses.len()),
                "request {id} sent {} times: {statuses:?}",
                statuses.len()
            );
            total += statuses.len();
        }
        assert_eq!(s.api_stats.sends.load(Ordering::SeqCst), total);
        assert!(s.api_stats.refused.lock().unwrap().is_empty());

        let res = svc.oneshot(request(&s, N)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(statuses_of(&s, &N.to_string()), [200]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// Unchanged: a request that waited for a refresh and whose nonce replay is refused for its
/// token was refused after a refresh, which did run: `UnauthorizedAfterRefresh`, two sends,
/// no second refresh.
#[tokio::test]
async fn a_refreshed_token_refused_on_the_nonce_replay_is_unauthorized_after_refresh() {
    guard(async {
        let s = proof_first_setup().await;
        let calls = Arc::new(AtomicUsize::new(0));
        let refresher = {
            let calls = calls.clone();
            // A token the server never issued.
            tower_auth_refresh::refresh_fn(move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, RefreshError>(Token::with_scheme("DPoP", "at-unknown")?) }
            })
        };
        let layer = RefreshLayer::new(refresher).proof(s.dpop.clone());
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(http_client::<ReplayBody<Full<Bytes>>>());
        let err = svc.oneshot(request(&s, 1)).await.unwrap_err();
        let twice = err
            .downcast_ref::<UnauthorizedAfterRefresh>()
            .unwrap_or_else(|| panic!("{err}"));
        assert!(challenge_of(twice.last().headers()).contains("invalid_token"));
        assert!(!twice.proof_refused());
        assert!(
            err.to_string().ends_with("again after a token refresh"),
            "{err}"
        );
        assert_eq!(statuses_of(&s, "1"), [401, 401]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// The reqwest middleware as the tower layer: a token refused on the nonce replay is refreshed
/// for later requests (once) and its 401 returned, with no third send.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn through_reqwest_a_token_refused_on_the_nonce_replay_is_refreshed_and_the_401_returned() {
    guard(async {
        let s = proof_first_setup().await;
        let (layer, calls) = counted_layer(&s);
        // No redirects below the middleware with a proof (the module documentation).
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let client = reqwest_middleware::ClientBuilder::new(http)
            .with(layer.reqwest_middleware())
            .build();
        let send = |id: &'static str| {
            client
                .get(s.api.url(&format!("/api/orders/{id}?page=2")))
                .header("x-request", id)
                .send()
        };
        let res = match send("1").await {
            Ok(res) => res,
            Err(err) => panic!("the caller gets the 401 response, not an error: {err}"),
        };
        refused_on_its_nonce_replay(&s, res.status(), res.headers(), &calls);

        let res = send("2").await.unwrap();
        sent_once_with_the_new_token(&s, res.status(), &calls);
    })
    .await;
}
