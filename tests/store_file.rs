//! The file token store: several real processes share one token set through one file.
//!
//! Worker processes are this test binary re-executed (the ignored `worker` test); the token
//! server and the API run in the test process on loopback.
#![cfg(feature = "store")]

#[allow(dead_code)]
mod oauth2_server;
mod store_support;
mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::json;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_auth_refresh::error::RefreshFailed;
use tower_auth_refresh::store::{CasOutcome, FileStore, Record, StoreRefresher, TokenStore};
use tower_auth_refresh::{
    Backoff, RefreshContext, RefreshLayer, RefreshReason, ReplayBody, Token, TokenRefresher,
    context_fn,
};

use oauth2_server::{Scripted, Servers, TokenConfig};
use store_support::*;

/// Not a test: the body of a worker process (see `store_support::run_worker`).
#[test]
#[ignore = "a worker process of the multi-process tests, started by them"]
fn worker() {
    run_worker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_one_refresh_per_expiry_and_restart_file_store() {
    let dir = TempDir::new("stampede");
    let path = dir.path().join("token.json");
    stampede_rounds_and_restart(StoreSpec::File(path.clone()), FileStore::new(&path), 20).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the record is readable by its owner only"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_holder_killed_mid_refresh_file_store() {
    let dir = TempDir::new("killed");
    let path = dir.path().join("token.json");
    holder_killed_mid_refresh(
        StoreSpec::File(path.clone()),
        FileStore::new(&path),
        Duration::from_secs(2),
    )
    .await;
}

/// Real processes: an `invalid_grant` for the stored refresh token costs one token call in
/// all, not one per process (review, eleventh session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_session_ends_once_for_every_process_file_store() {
    let dir = TempDir::new("refused");
    let path = dir.path().join("token.json");
    a_refused_session_ends_once_for_every_process(
        StoreSpec::File(path.clone()),
        FileStore::new(&path),
    )
    .await;
}

/// Real processes: a logout everywhere (`StoreRefresher::log_out_everywhere`) ends the session for
/// every process, and a later one; a new login starts a new one (twelfth session: a logout
/// was this process's only, and a restart adopted the stored session again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_everywhere_ends_the_session_for_every_process_file_store() {
    let dir = TempDir::new("logout-everywhere");
    let path = dir.path().join("token.json");
    a_logout_everywhere_ends_the_session_for_every_process(
        StoreSpec::File(path.clone()),
        FileStore::new(&path),
    )
    .await;
}

fn ctx(stale: &Token) -> RefreshContext {
    RefreshContext::new(Some(stale.clone()), RefreshReason::Expired)
}

/// A grant refresher that first waits at a gate, so that the test can order two processes'
/// token calls.
fn gated(
    token_url: String,
    calls: GrantCalls,
    reached: Arc<Notify>,
    gate: Arc<Notify>,
) -> impl TokenRefresher {
    let grant = Arc::new(grant_refresher(token_url, calls));
    context_fn(move |ctx: RefreshContext| {
        let (grant, reached, gate) = (grant.clone(), reached.clone(), gate.clone());
        async move {
            reached.notify_one();
            gate.notified().await;
            grant.refresh(ctx).await
        }
    })
}

/// Two processes refresh at once without a working lease. The winner rotates; the loser's
/// token call is refused with `invalid_grant` (its refresh token was spent), and instead of
/// ending the session it finds the winner's set in the store and adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_race_invalid_grant_adopts_the_winners_set() {
    let servers = Servers::start(TokenConfig::default()).await;
    let (access, refresh) = servers.token.login();
    let dir = TempDir::new("race");
    let file = FileStore::new(dir.path().join("token.json"));
    let initial = expired_set(&access, &refresh);
    seed(&file, &initial).await;

    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let loser_calls = GrantCalls::default();
    let loser = StoreRefresher::new(
        gated(
            servers.token_url(),
            loser_calls.clone(),
            reached.clone(),
            gate.clone(),
        ),
        Partitioned(FileStore::new(file.path())),
    );
    let winner = StoreRefresher::new(
        grant_refresher(servers.token_url(), GrantCalls::default()),
        Partitioned(FileStore::new(file.path())),
    );

    // The loser has read version 1 and is about to present the same refresh token.
    let pending = tokio::spawn(loser.refresh(ctx(&initial)));
    within("the loser at its gate", reached.notified()).await;
    let won = within("the winner", winner.refresh(ctx(&initial)))
        .await
        .unwrap();
    assert_eq!(file.load().await.unwrap().unwrap().version(), 2);

    // The server refuses the spent refresh token (a server without a grace window).
    servers.token.script(Scripted::json(
        StatusCode::BAD_REQUEST,
        json!({ "error": "invalid_grant", "error_description": "refresh token already used" }),
    ));
    gate.notify_one();
    let adopted = within("the loser", pending)
        .await
        .unwrap()
        .expect("adopts, no session end");
    assert!(
        adopted.same_secret(&won),
        "the loser uses the winner's access token"
    );
    assert_eq!(adopted.refresh_token(), won.refresh_token());
    assert_eq!(loser_calls.get(), 1);
    assert_eq!(servers.token.requests(), 2);
    assert_eq!(servers.token.grants(), 1);
    assert_eq!(
        file.load().await.unwrap().unwrap().version(),
        2,
        "nothing else written"
    );

    // The adopted access token works against the API, and the next refresh (from the stored
    // refresh token) is not a reuse.
    let layer = RefreshLayer::new(loser.clone()).initial_token(adopted);
    let client = support::http_client::<ReplayBody<Full<Bytes>>>();
    let svc = tower::ServiceBuilder::new().layer(layer).service(client);
    let res = svc
        .clone()
        .oneshot(support::get(servers.api_url()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    servers.token.expire_access_tokens();
    gate.notify_one();
    let res = svc.oneshot(support::get(servers.api_url())).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(servers.token.reuse_detected(), 0);
    assert_eq!(servers.token.grants(), 2);
}

/// Two processes refresh at once without a working lease, against a server with a grace
/// window: both token calls succeed, the second write loses the compare-and-set, and the
/// loser adopts the winner's stored set so that every process follows one token set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_write_adopts_the_stored_set() {
    let servers = Servers::start(TokenConfig {
        grace: Some(Duration::from_secs(60)),
        ..TokenConfig::default()
    })
    .await;
    let (access, refresh) = servers.token.login();
    let dir = TempDir::new("lost-write");
    let file = FileStore::new(dir.path().join("token.json"));
    let initial = expired_set(&access, &refresh);
    seed(&file, &initial).await;

    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let loser = StoreRefresher::new(
        gated(
            servers.token_url(),
            GrantCalls::default(),
            reached.clone(),
            gate.clone(),
        ),
        Partitioned(FileStore::new(file.path())),
    );
    let winner = StoreRefresher::new(
        grant_refresher(servers.token_url(), GrantCalls::default()),
        Partitioned(FileStore::new(file.path())),
    );
    let pending = tokio::spawn(loser.refresh(ctx(&initial)));
    within("the loser at its gate", reached.notified()).await;
    let won = winner.refresh(ctx(&initial)).await.unwrap();
    gate.notify_one();
    let adopted = within("the loser", pending).await.unwrap().unwrap();
    assert_eq!(servers.token.grants(), 2, "both token calls went through");
    assert_eq!(servers.token.grace_uses(), 1);
    assert!(
        adopted.same_secret(&won),
        "the loser follows the stored set"
    );
    let stored = file.load().await.unwrap().unwrap();
    assert_eq!(stored.version(), 2);
    assert!(stored.same_access_token(&won));
    assert_eq!(servers.token.reuse_detected(), 0);
}

const SECRET_ACCESS: &str = "acc-7f3a9c-SECRET";
const SECRET_REFRESH: &str = "ref-91bd44-SECRET";

fn valid_record(version: u64) -> Record {
    let token = Token::bearer(SECRET_ACCESS)
        .unwrap()
        .with_expires_in(Duration::from_secs(600))
        .with_refresh_token(SECRET_REFRESH);
    Record::from_token(version, &token, SystemTime::now())
}

/// A corrupt or truncated record is a typed, transient error; it never panics, is never
/// overwritten, and no secret shows in the error, its `Debug`, or the trace.
#[test]
fn corrupt_or_truncated_record_is_a_typed_error_and_never_overwritten() {
    let (logs, _tracing) = support::capture_logs();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = TempDir::new("corrupt");
        let path = dir.path().join("token.json");
        let full = valid_record(7).encode();
        let cases: Vec<Vec<u8>> = vec![
            full[..full.len() / 2].to_vec(),
            full[..full.len() - 1].to_vec(),
            b"not json at all".to_vec(),
            Vec::new(),
            String::from_utf8(full.clone())
                .unwrap()
                .replace("\"version\":7", &format!("\"version\":\"{SECRET_ACCESS}\""))
                .into_bytes(),
            vec![0xff; 64],
        ];
        for bytes in cases {
            std::fs::write(&path, &bytes).unwrap();
            let store = FileStore::new(&path);
            let err = store.load().await.unwrap_err();
            assert!(err.is_corrupt(), "{err}");

            // Through the refresher and the layer: a transient failure, the file untouched.
            let calls = GrantCalls::default();
            let shared = StoreRefresher::new(
                grant_refresher(
                    format!("http://{}/never", support::unused_loopback_addr()),
                    calls.clone(),
                ),
                store.clone(),
            );
            let stale = Token::bearer("stale-token")
                .unwrap()
                .with_refresh_token(SECRET_REFRESH);
            let refresh_err = shared.refresh(ctx(&stale)).await.unwrap_err();
            assert!(refresh_err.is_transient());
            let layer = RefreshLayer::new(shared).retries(Backoff::none());
            let api = tower::service_fn(|_req: http::Request<ReplayBody<Full<Bytes>>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::<Bytes>::default()))
            });
            let svc = tower::ServiceBuilder::new().layer(layer).service(api);
            let err = svc
                .oneshot(support::get("http://127.0.0.1/x"))
                .await
                .unwrap_err();
            assert!(err.is::<RefreshFailed>(), "{err}");
            assert_eq!(calls.get(), 0, "no token call from a corrupt record");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "never overwritten");

            // A writer holding the lease is refused too.
            let lease = free_lease(&store).await;
            let cas = store.compare_and_set(&lease, 0, &valid_record(1)).await;
            assert!(cas.unwrap_err().is_corrupt());
            store.release(lease).await.unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "never overwritten");

            let shown = format!(
                "{err} {err:?} {refresh_err} {refresh_err:?} {:?}",
                store.load().await
            );
            for secret in [SECRET_ACCESS, SECRET_REFRESH] {
                assert!(!shown.contains(secret), "secret in {shown}");
            }
        }
    });
    let text = logs.text();
    for secret in [SECRET_ACCESS, SECRET_REFRESH] {
        assert!(!text.contains(secret), "secret in the trace");
    }
}

/// A compare-and-set against an old version never overwrites a newer valid record, and a
/// lease that is not the store's own cannot write at all.
#[tokio::test]
async fn compare_and_set_never_overwrites_a_newer_record() {
    let dir = TempDir::new("cas");
    let store = FileStore::new(dir.path().join("token.json"));
    seed(&store, &valid_record(1).to_token().unwrap()).await;
    let lease = free_lease(&store).await;
    assert!(
        store
            .try_lease(Duration::from_secs(1))
            .await
            .unwrap()
            .is_none(),
        "exclusive"
    );
    assert_eq!(
        store
            .compare_and_set(&lease, 1, &valid_record(2))
            .await
            .unwrap(),
        CasOutcome::Written
    );
    let before = std::fs::read(store.path()).unwrap();
    assert_eq!(
        store
            .compare_and_set(&lease, 1, &valid_record(2))
            .await
            .unwrap(),
        CasOutcome::VersionChanged
    );
    store.release(lease).await.unwrap();
    let foreign = tower_auth_refresh::store::Lease::new("not-a-file-lock", Duration::from_secs(1));
    assert_eq!(
        store
            .compare_and_set(&foreign, 2, &valid_record(3))
            .await
            .unwrap(),
        CasOutcome::LeaseLost
    );
    assert_eq!(std::fs::read(store.path()).unwrap(), before);
    assert_eq!(store.load().await.unwrap().unwrap().version(), 2);
    assert!(!format!("{:?}", store.load().await.unwrap()).contains(SECRET_ACCESS));
}

/// Two keyed layers (standing for two processes) share one record per key: each key's token
/// is fetched once for both, and the keys never see each other's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_layers_share_one_record_per_key() {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tower_auth_refresh::keyed::KeyedRefreshLayer;
    use tower_auth_refresh::store::KeyedStoreRefresher;

    let dir = TempDir::new("keyed");
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let refresher = {
        let calls = calls.clone();
        move |key: String, _stale: Option<Token>| {
            *calls.lock().unwrap().entry(key.clone()).or_default() += 1;
            async move {
                Ok::<_, tower_auth_refresh::RefreshError>(
                    Token::bearer(format!("{key}-token"))?
                        .with_expires_in(Duration::from_secs(3600)),
                )
            }
        }
    };
    let api = tower::service_fn(|req: http::Request<ReplayBody<Full<Bytes>>>| async move {
        let tenant = req.headers()["x-tenant"].to_str().unwrap().to_owned();
        let ok = req.headers()["authorization"] == format!("Bearer {tenant}-token").as_str();
        let mut res = http::Response::new(Full::<Bytes>::default());
        if !ok {
            *res.status_mut() = StatusCode::UNAUTHORIZED;
        }
        Ok::<_, std::convert::Infallible>(res)
    });
    let process = || {
        let dir = dir.path().to_owned();
        let shared = KeyedStoreRefresher::new(refresher.clone(), move |tenant: &String| {
            FileStore::new(dir.join(format!("{tenant}.json")))
        });
        let layer = KeyedRefreshLayer::new(shared).key_fn(|parts: &http::request::Parts| {
            Some(parts.headers.get("x-tenant")?.to_str().ok()?.to_owned())
        });
        tower::ServiceBuilder::new().layer(layer).service(api)
    };
    let (first, second) = (process(), process());
    for svc in [&first, &second] {
        for tenant in ["a", "b"] {
            let req = http::Request::get("https://api.test/x")
                .header("x-tenant", tenant)
                .body(Full::<Bytes>::default())
                .unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "tenant {tenant}");
        }
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls, HashMap::from([("a".into(), 1), ("b".into(), 1)]));
    for tenant in ["a", "b"] {
        let store = FileStore::new(dir.path().join(format!("{tenant}.json")));
        let record = store.load().await.unwrap().unwrap();
        assert_eq!(record.version(), 1);
        assert!(record.same_access_token(&Token::bearer(format!("{tenant}-token")).unwrap()));
    }
}

/// A record at the last possible version (`u64::MAX`) has no successor: it is a typed,
/// transient store error before any token call, never a panic or a wrapped version 0. So is
/// one at `u64::MAX - 1`: its successor could be written, but never read back.
#[tokio::test]
async fn a_record_at_the_last_version_is_refused_before_any_token_call() {
    for version in [u64::MAX, u64::MAX - 1] {
        let servers = Servers::start(TokenConfig::default()).await;
        let (access, refresh) = servers.token.login();
        let dir = TempDir::new("max-version");
        let path = dir.path().join("token.json");
        let bytes = format!(
            r#"{{"format":1,"version":{version},"scheme":"Bearer","access_token":"{access}","expires_at_ms":1000,"refresh_token":"{refresh}"}}"#
        );
        std::fs::write(&path, &bytes).unwrap();
        let store = FileStore::new(&path);
        let calls = GrantCalls::default();
        let shared = StoreRefresher::new(
            grant_refresher(servers.token_url(), calls.clone()),
            store.clone(),
        );
        let stale = expired_set(&access, &refresh);
        let err = within("the refresh", shared.refresh(ctx(&stale)))
            .await
            .unwrap_err();
        assert!(err.is_transient());
        let cause = std::error::Error::source(&err)
            .and_then(|e| e.downcast_ref::<tower_auth_refresh::store::StoreError>())
            .expect("a StoreError");
        assert!(cause.is_corrupt(), "{cause}");
        assert!(!format!("{err} {err:?}").contains(&refresh));
        assert_eq!(calls.get(), 0, "no token call at version {version}");
        assert_eq!(
            servers.token.requests(),
            0,
            "the token endpoint saw nothing"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), bytes, "untouched");
    }
}

/// A writer that crashed between creating its temporary file and the rename left the file
/// behind (mode 0600, with tokens in it): the next lease holder removes it, and no write
/// leaves one of its own.
#[tokio::test]
async fn a_temporary_file_left_by_a_crash_is_removed() {
    let dir = TempDir::new("leftover");
    let path = dir.path().join("token.json");
    let store = FileStore::new(&path);
    seed(&store, &valid_record(1).to_token().unwrap()).await;
    let leftover = dir.path().join(".token.json.tmp");
    std::fs::write(&leftover, valid_record(2).encode()).unwrap();

    let lease = free_lease(&store).await;
    let outcome = store
        .compare_and_set(&lease, 1, &valid_record(2))
        .await
        .unwrap();
    assert_eq!(outcome, CasOutcome::Written);
    store.release(lease).await.unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["token.json", "token.json.lock"]);
    assert_eq!(store.load().await.unwrap().unwrap().version(), 2);
}

/// The token endpoint rotated the refresh token but the store write failed: this process
/// keeps the new set, and once the store works again its next refresh presents its own new
/// refresh token (not the stored, spent one) and writes the result back. While the store is
/// down, refreshes fail transiently without a token call, and work again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_after_rotation_is_recovered_with_the_processs_own_refresh_token() {
    let servers = Servers::start(TokenConfig::default()).await;
    let (access, refresh0) = servers.token.login();
    let dir = TempDir::new("failed-write");
    let file = FileStore::new(dir.path().join("token.json"));
    let initial = expired_set(&access, &refresh0);
    seed(&file, &initial).await;
    let flaky = Flaky::new(FileStore::new(file.path()), dir.path());
    let calls = GrantCalls::default();
    let shared = StoreRefresher::new(
        grant_refresher(servers.token_url(), calls.clone()),
        flaky.clone(),
    );
    let layer = RefreshLayer::new(shared.clone())
        .initial_token(initial)
        .retries(Backoff::none())
        .cooldown(tower_auth_refresh::Cooldown::none());
    let handle = layer.token_handle();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(support::http_client::<ReplayBody<Full<Bytes>>>());
    let get = || {
        let svc = svc.clone();
        let url = servers.api_url();
        async move { within("a request", svc.oneshot(support::get(url))).await }
    };

    // The token endpoint rotates refresh0 -> refresh1; writing the new set fails.
    flaky.fail_next_writes(1);
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    assert_eq!(flaky.failed_writes(), 1);
    let refresh1 = servers.token.rotated()[0].clone();
    let stored = file.load().await.unwrap().unwrap();
    assert_eq!(stored.version(), 1, "the write failed");
    assert_eq!(
        stored.to_token().unwrap().refresh_token(),
        Some(refresh0.as_str()),
        "the store still holds the spent refresh token"
    );

    // An outage: the refresh fails (transient), no token call is made.
    flaky.set_down(true);
    servers.token.expire_access_tokens();
    let err = get().await.unwrap_err();
    assert!(err.is::<RefreshFailed>(), "{err}");
    assert_eq!(
        servers.token.requests(),
        1,
        "no token call while the store is down"
    );

    // The store is back: the next refresh presents refresh1, not the stored refresh0.
    flaky.set_down(false);
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    assert_eq!(servers.token.reuse_detected(), 0, "no invalid_grant");
    assert!(!servers.token.family_revoked(&refresh0));
    let seen = servers.token.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].field("refresh_token"), Some(refresh1.as_str()));
    let refresh2 = servers.token.rotated()[1].clone();
    let stored = file.load().await.unwrap().unwrap();
    assert_eq!(stored.version(), 2, "written back");
    assert_eq!(
        stored.to_token().unwrap().refresh_token(),
        Some(refresh2.as_str())
    );
    assert!(handle.token().is_some_and(|t| stored.same_access_token(&t)));

    // The session lives on: the next refresh (from the stored set) works too, and another
    // process follows the stored set.
    servers.token.expire_access_tokens();
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    assert_eq!(servers.token.reuse_detected(), 0);
    assert_eq!(servers.token.grants(), 3);
    assert_eq!(calls.get(), 3);
    let stored = file.load().await.unwrap().unwrap();
    assert_eq!(stored.version(), 3);
    let other = StoreRefresher::new(
        grant_refresher(servers.token_url(), GrantCalls::default()),
        FileStore::new(file.path()),
    );
    let adopted = other
        .refresh(RefreshContext::new(None, RefreshReason::NoToken))
        .await
        .unwrap();
    assert!(stored.same_access_token(&adopted));
    assert_eq!(servers.token.grants(), 3, "adopted, no token call");
}

// Sessions: a refused refresh token, a logout and a new login through the store.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tower_auth_refresh::RefreshError;

/// A token endpoint stand-in: records every refresh token presented, answers after `delay`
/// (refuses with `invalid_grant` if `refuse`), and (like `OAuth2Refresher`) forgets its
/// refresh token at logout, after which it refuses a refresh that offers none.
#[derive(Clone)]
struct Endpoint {
    presented: Arc<Mutex<Vec<Option<String>>>>,
    logged_out: Arc<AtomicBool>,
    delay: Duration,
    refuse: bool,
    n: Arc<AtomicUsize>,
}

impl Endpoint {
    fn new(delay: Duration, refuse: bool) -> Self {
        Self {
            presented: Arc::default(),
            logged_out: Arc::default(),
            delay,
            refuse,
            n: Arc::default(),
        }
    }
    fn presented(&self) -> Vec<Option<String>> {
        self.presented.lock().unwrap().clone()
    }
}

impl TokenRefresher for Endpoint {
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Token, RefreshError>> + Send + 'static>,
    >;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let rt = ctx
                .stale()
                .and_then(Token::refresh_token)
                .map(str::to_owned);
            if rt.is_none() && this.logged_out.load(Ordering::SeqCst) {
                return Err(RefreshError::terminal("logged out: no refresh token"));
            }
            this.presented.lock().unwrap().push(rt);
            tokio::time::sleep(this.delay).await;
            if this.refuse {
                return Err(RefreshError::terminal("invalid_grant"));
            }
            let n = this.n.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Token::bearer(format!("fresh-access-{n}"))?
                .with_expires_in(Duration::from_secs(3600))
                .with_refresh_token(format!("fresh-refresh-{n}")))
        })
    }

    fn logout(&self) {
        self.logged_out.store(true, Ordering::SeqCst);
    }
}

fn valid_set(access: &str, refresh: &str) -> Token {
    Token::bearer(access)
        .unwrap()
        .with_expires_in(Duration::from_secs(3600))
        .with_refresh_token(refresh)
}

/// Two processes (two `FileStore`s on one file: two OS locks) hit the same expiry. The lease
/// holder's token call is refused with `invalid_grant` (terminal) and it records that in the
/// store; the other process, waiting for the lease, ends its session with a terminal error
/// too, without presenting the refused refresh token a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_token_is_presented_once_across_processes() {
    let dir = TempDir::new("review-terminal");
    let path = dir.path().join("token.json");
    let stale = expired_set("old-access", "old-refresh");
    seed(&FileStore::new(&path), &stale).await;

    let endpoint = Endpoint::new(Duration::from_millis(300), true);
    let a = StoreRefresher::new(endpoint.clone(), FileStore::new(&path));
    let b = StoreRefresher::new(endpoint.clone(), FileStore::new(&path));
    let ctx = || RefreshContext::new(Some(stale.clone()), RefreshReason::Expired);
    let (ra, rb) = within("both refreshes", async {
        tokio::join!(a.refresh(ctx()), async {
            // B arrives while A holds the lease.
            tokio::time::sleep(Duration::from_millis(50)).await;
            b.refresh(ctx()).await
        })
    })
    .await;
    assert!(ra.unwrap_err().is_terminal());
    assert!(rb.unwrap_err().is_terminal());
    assert_eq!(
        endpoint.presented(),
        vec![Some("old-refresh".to_owned())],
        "the refused refresh token was presented by every process in turn"
    );
}

/// `TokenHandle::clear` is a logout: `TokenRefresher::logout` is documented as what keeps "a
/// later forced refresh" from "silently log[ging] the old user back in". Through a
/// `StoreRefresher`, a forced refresh after the logout asks the wrapped refresher (which
/// forgot the session) without a token, and never adopts the stored old session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_refresh_after_logout_does_not_bring_the_old_session_back() {
    let dir = TempDir::new("review-logout");
    let path = dir.path().join("token.json");
    let old = valid_set("old-user-access", "old-user-refresh");
    seed(&FileStore::new(&path), &old).await;

    let endpoint = Endpoint::new(Duration::ZERO, false);
    let layer = RefreshLayer::new(StoreRefresher::new(endpoint.clone(), FileStore::new(&path)))
        .initial_token(old.clone());
    let handle = layer.token_handle();
    handle.clear();
    assert!(handle.token().is_none(), "logged out");
    let forced = within("the forced refresh", handle.refresh()).await;
    let back = handle.token().map(|t| t.secret().to_owned());
    assert!(
        forced.is_err() && back.is_none(),
        "after a logout, a forced refresh brought the old user's session back: {back:?}"
    );
}

/// A new login installed with `TokenHandle::set_token` (the README's way: "installs the
/// whole session"), after the previous session ended: its first refresh presents the new
/// login's refresh token, not the *stored* one of the previous session, and stores the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_login_is_refreshed_with_its_own_refresh_token() {
    let dir = TempDir::new("review-relogin");
    let path = dir.path().join("token.json");
    // The previous session, its access token expired, its refresh token revoked.
    seed(
        &FileStore::new(&path),
        &expired_set("old-user-access", "old-user-refresh"),
    )
    .await;

    let endpoint = Endpoint::new(Duration::ZERO, false);
    let layer = RefreshLayer::new(StoreRefresher::new(endpoint.clone(), FileStore::new(&path)));
    let handle = layer.token_handle();
    // The user logs in again.
    handle.set_token(valid_set("new-user-access", "new-user-refresh"));
    within("the refresh", handle.refresh()).await.unwrap();
    assert_eq!(
        endpoint.presented(),
        vec![Some("new-user-refresh".to_owned())],
        "the new login's refresh token was never presented"
    );
    let stored = FileStore::new(&path).load().await.unwrap().unwrap();
    assert!(stored.same_access_token(&handle.token().unwrap()), "stored");
}

/// The same, when the previous user's stored access token is still valid (a logout, then
/// another user logs in with `set_token`): the new user's first forced refresh presents the
/// new user's refresh token and never adopts the previous user's access token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_login_never_switches_to_the_previous_users_stored_token() {
    let dir = TempDir::new("review-switch");
    let path = dir.path().join("token.json");
    let old = valid_set("old-user-access", "old-user-refresh");
    seed(&FileStore::new(&path), &old).await;

    let endpoint = Endpoint::new(Duration::ZERO, false);
    let layer = RefreshLayer::new(StoreRefresher::new(endpoint.clone(), FileStore::new(&path)))
        .initial_token(old);
    let handle = layer.token_handle();
    handle.clear(); // user A logs out
    handle.set_token(valid_set("new-user-access", "new-user-refresh")); // user B logs in
    within("the refresh", handle.refresh()).await.unwrap();
    let now = handle.token().map(|t| t.secret().to_owned());
    assert_ne!(
        now.as_deref(),
        Some("old-user-access"),
        "user B's session was switched to user A's stored access token"
    );
    assert_eq!(
        endpoint.presented(),
        vec![Some("new-user-refresh".to_owned())]
    );
}

/// A key and the refresh token presented for it.
type Presented = (u32, Option<String>);

/// `n` file stores under `dir` (one folder each, `k0`, `k1`, …), behind [`Flaky`]: the
/// folders, and the stores.
fn keyed_flaky_stores(dir: &TempDir, n: u32) -> (Vec<std::path::PathBuf>, Vec<Flaky<FileStore>>) {
    let paths: Vec<_> = (0..n)
        .map(|k| {
            let sub = dir.path().join(format!("k{k}"));
            std::fs::create_dir_all(&sub).unwrap();
            sub
        })
        .collect();
    let stores = paths
        .iter()
        .map(|sub| Flaky::new(FileStore::new(sub.join("token.json")), sub))
        .collect();
    (paths, stores)
}

/// A keyed refresher presenting refresh tokens by key, rotating them on every call.
#[derive(Clone, Default)]
struct Tenants {
    presented: Arc<Mutex<Vec<Presented>>>,
    n: Arc<AtomicUsize>,
}

impl Tenants {
    /// The refresh tokens `key`'s refreshes presented, in order.
    fn presented_by(&self, key: u32) -> Vec<String> {
        let presented = self.presented.lock().unwrap();
        presented
            .iter()
            .filter(|(k, _)| *k == key)
            .filter_map(|(_, rt)| rt.clone())
            .collect()
    }
}

impl tower_auth_refresh::keyed::KeyedRefresher<u32> for Tenants {
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Token, RefreshError>> + Send + 'static>,
    >;
    fn refresh(&self, key: &u32, ctx: RefreshContext) -> Self::Future {
        let rt = ctx
            .stale()
            .and_then(Token::refresh_token)
            .map(str::to_owned);
        self.presented.lock().unwrap().push((*key, rt));
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            Ok(Token::bearer(format!("access-{n}"))?
                .with_expires_in(Duration::from_secs(3600))
                .with_refresh_token(format!("rotated-{n}")))
        })
    }
}

/// When the write of a rotated set fails, the next refresh of this process presents its own
/// new refresh token, not the stored spent one, even after the keyed layer evicted the key's
/// cell (capacity, idle timeout; `KeyedTokenHandle::remove` does the same) and the rebuilt
/// cell refreshes with no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstored_rotated_set_survives_the_eviction_of_its_keys_cell() {
    use tower_auth_refresh::keyed::KeyedRefreshLayer;
    use tower_auth_refresh::store::KeyedStoreRefresher;

    let dir = TempDir::new("review-evict");
    let stores: Vec<Flaky<FileStore>> = (0..2u32)
        .map(|k| {
            let sub = dir.path().join(format!("k{k}"));
            std::fs::create_dir_all(&sub).unwrap();
            Flaky::new(FileStore::new(sub.join("token.json")), &sub)
        })
        .collect();
    seed(&stores[0], &expired_set("access-0", "refresh-0")).await;
    seed(&stores[1], &expired_set("b-access-0", "b-refresh-0")).await;

    let tenants = Tenants::default();
    let by_key = stores.clone();
    let shared =
        KeyedStoreRefresher::new(tenants.clone(), move |k: &u32| by_key[*k as usize].clone());
    let layer = KeyedRefreshLayer::new(shared).capacity(1);
    let handle = layer.token_handle();

    // Key 0 refreshes: refresh-0 is rotated into rotated-1, whose write fails.
    stores[0].fail_next_writes(1);
    within("key 0's refresh", handle.key(&0).refresh())
        .await
        .unwrap();
    assert_eq!(stores[0].failed_writes(), 1);
    // Key 1 is used: with capacity 1, key 0's cell is evicted.
    within("key 1's refresh", handle.key(&1).refresh())
        .await
        .unwrap();
    // Key 0 again: its next refresh must present rotated-1, not the spent refresh-0.
    within("key 0's next refresh", handle.key(&0).refresh())
        .await
        .unwrap();
    let key0: Vec<_> = tenants
        .presented
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k == 0)
        .map(|(_, rt)| rt.clone())
        .collect();
    assert_eq!(
        key0,
        vec![Some("refresh-0".to_owned()), Some("rotated-1".to_owned())],
        "after the eviction, the spent stored refresh token was presented again"
    );
}

/// A process whose OAuth 2.0 client is misconfigured (a wrong client secret: the token
/// endpoint answers `invalid_client`, a terminal error) ends its own session only: the stored
/// session is not marked as ended, and a process configured right refreshes from it. (Only an
/// `invalid_grant` from the built-in refresher says the refresh token itself was refused.)
#[cfg(feature = "oauth2")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_process_does_not_end_the_stored_session_for_the_others() {
    use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Error, OAuth2Refresher};

    let servers = Servers::start(TokenConfig::default()).await;
    let (access, refresh) = servers.token.login();
    let dir = TempDir::new("misconfigured");
    let path = dir.path().join("token.json");
    let stale = expired_set(&access, &refresh);
    seed(&FileStore::new(&path), &stale).await;

    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> = support::http_client();
    let wrong = OAuth2Refresher::builder(servers.token_url().parse().unwrap(), client)
        .client_id("app")
        .client_secret("not-the-app-secret", ClientAuth::Basic)
        .build()
        .unwrap();
    let misconfigured = StoreRefresher::new(wrong, FileStore::new(&path));
    let err = within(
        "the misconfigured refresh",
        misconfigured.refresh(ctx(&stale)),
    )
    .await
    .unwrap_err();
    assert!(err.is_terminal(), "{err}");
    assert_eq!(
        OAuth2Error::find(&err).and_then(OAuth2Error::error_code),
        Some("invalid_client")
    );
    let stored = FileStore::new(&path).load().await.unwrap().unwrap();
    assert!(
        !stored.is_ended(),
        "one process's client secret does not end the session of the others"
    );

    let calls = GrantCalls::default();
    let right = StoreRefresher::new(
        grant_refresher(servers.token_url(), calls.clone()),
        FileStore::new(&path),
    );
    let token = within("a process configured right", right.refresh(ctx(&stale)))
        .await
        .expect("the stored session goes on");
    assert_ne!(token.secret(), access);
    assert_eq!((calls.get(), servers.token.grants()), (1, 1));
}

/// A login from outside (user B's token set, unknown to the store) whose write loses to
/// another process that refreshed the stored session (user A's) meanwhile keeps B's set:
/// the process does not switch to A's session, and its next refresh presents B's own
/// refresh token and stores B's session for everyone. (It adopted A's set: the process that
/// had just logged B in went on as A.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_loses_its_write_to_the_old_session_keeps_its_own_set() {
    let servers = Servers::start(TokenConfig::default()).await;
    let (access_a, refresh_a) = servers.token.login();
    let (access_b, refresh_b) = servers.token.login();
    let dir = TempDir::new("login-race");
    let file = FileStore::new(dir.path().join("token.json"));
    seed(&file, &expired_set(&access_a, &refresh_a)).await;

    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let login = StoreRefresher::new(
        gated(
            servers.token_url(),
            GrantCalls::default(),
            reached.clone(),
            gate.clone(),
        ),
        Partitioned(FileStore::new(file.path())),
    );
    let other = StoreRefresher::new(
        grant_refresher(servers.token_url(), GrantCalls::default()),
        Partitioned(FileStore::new(file.path())),
    );

    // B's refresh is under way when the other process refreshes A's session and stores it.
    let pending = tokio::spawn(login.refresh(ctx(&expired_set(&access_b, &refresh_b))));
    within("the login at its gate", reached.notified()).await;
    within(
        "the other process",
        other.refresh(ctx(&expired_set(&access_a, &refresh_a))),
    )
    .await
    .unwrap();
    assert_eq!(file.load().await.unwrap().unwrap().version(), 2);
    gate.notify_one();
    let kept = within("the login", pending).await.unwrap().unwrap();
    let b_now = servers.token.current_of(&refresh_b).unwrap();
    assert_eq!(kept.refresh_token(), Some(b_now.as_str()), "still user B");
    assert!(servers.token.issued_in_session_of(kept.secret(), &b_now));

    // The next refresh presents B's own refresh token and stores B's session.
    let again = within("the login's next refresh", login.refresh(ctx(&kept)));
    let task = tokio::spawn(again);
    within("the login at its gate again", reached.notified()).await;
    gate.notify_one();
    let next = within("the login's next refresh", task)
        .await
        .unwrap()
        .unwrap();
    let b_next = servers.token.current_of(&refresh_b).unwrap();
    assert_ne!(b_next, b_now, "B's refresh token rotated");
    assert_eq!(next.refresh_token(), Some(b_next.as_str()));
    let stored = file.load().await.unwrap().unwrap();
    assert_eq!(stored.version(), 3);
    assert!(
        stored.to_token().unwrap().same_secret(&next),
        "B's session is the stored one"
    );
    assert_eq!(servers.token.reuse_detected(), 0);
}

// The store's logouts and logins, second review (eleventh session): each failed before.

/// A login that lost its write keeps its own set even when the old session is refreshed
/// once more by the other process before the login's next refresh (its entry keyed on the
/// record that beat it was dropped, and the set it had learned as the store's was replaced:
/// user B's process adopted user A's session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_lost_its_write_stays_itself_through_more_refreshes_of_the_old_session() {
    let servers = Servers::start(TokenConfig::default()).await;
    let (access_a, refresh_a) = servers.token.login();
    let (access_b, refresh_b) = servers.token.login();
    let dir = TempDir::new("login-race-2");
    let file = FileStore::new(dir.path().join("token.json"));
    seed(&file, &expired_set(&access_a, &refresh_a)).await;

    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let login = StoreRefresher::new(
        gated(
            servers.token_url(),
            GrantCalls::default(),
            reached.clone(),
            gate.clone(),
        ),
        Partitioned(FileStore::new(file.path())),
    );
    let other = StoreRefresher::new(
        grant_refresher(servers.token_url(), GrantCalls::default()),
        Partitioned(FileStore::new(file.path())),
    );
    let pending = tokio::spawn(login.refresh(ctx(&expired_set(&access_b, &refresh_b))));
    within("the login at its gate", reached.notified()).await;
    let a1 = within(
        "the other process",
        other.refresh(ctx(&expired_set(&access_a, &refresh_a))),
    )
    .await
    .unwrap();
    gate.notify_one();
    let kept = within("the login", pending).await.unwrap().unwrap();
    within("the other process again", other.refresh(ctx(&a1)))
        .await
        .unwrap();
    assert_eq!(file.load().await.unwrap().unwrap().version(), 3);

    let task = tokio::spawn(login.refresh(ctx(&kept)));
    within("the login at its gate again", reached.notified()).await;
    gate.notify_one();
    let next = within("the login's next refresh", task)
        .await
        .unwrap()
        .unwrap();
    let b_now = servers.token.current_of(&refresh_b).unwrap();
    assert_eq!(next.refresh_token(), Some(b_now.as_str()), "still user B");
    assert!(servers.token.issued_in_session_of(next.secret(), &b_now));
    let stored = file.load().await.unwrap().unwrap();
    assert!(
        stored.to_token().unwrap().same_secret(&next),
        "B's session stored"
    );
    assert_eq!(servers.token.reuse_detected(), 0);
}

/// A logout is over only once a login after it succeeded: a login (an access token alone,
/// installed after the logout) whose first refresh fails transiently is still a login at
/// the next one (the logout was taken as over when the first refresh started, and the retry
/// adopted the previous user's stored token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_after_logout_stays_a_login_through_a_transient_failure() {
    let dir = TempDir::new("logout-transient");
    let path = dir.path().join("token.json");
    let old = valid_set("old-user-access", "old-user-refresh");
    seed(&FileStore::new(&path), &old).await;
    let endpoint = Endpoint::new(Duration::ZERO, false);
    let shared = StoreRefresher::new(endpoint.clone(), FileStore::new(&path))
        .lease_wait(Duration::from_millis(200));
    let layer = RefreshLayer::new(shared)
        .initial_token(old)
        .retries(Backoff::none())
        .cooldown(tower_auth_refresh::Cooldown::none());
    let handle = layer.token_handle();
    handle.clear();
    handle.set_token(Token::bearer("new-user-access").unwrap());

    // Another process holds the lease for a moment: the first refresh fails transiently.
    let lease = free_lease(&FileStore::new(&path)).await;
    let first = within("the first refresh", handle.refresh()).await;
    assert!(first.is_err(), "the lease was held");
    FileStore::new(&path).release(lease).await.unwrap();

    let _ = within("the second refresh", handle.refresh()).await;
    let now = handle.token().map(|t| t.secret().to_owned());
    assert_ne!(
        now.as_deref(),
        Some("old-user-access"),
        "user B's session was switched to user A's stored token"
    );
}

/// A store whose next `load` is slow once armed (a loaded disk, a slow round trip).
#[derive(Clone)]
struct SlowLoad<S> {
    inner: S,
    armed: Arc<AtomicBool>,
}

impl<S: TokenStore> TokenStore for SlowLoad<S> {
    async fn load(&self) -> Result<Option<Record>, tower_auth_refresh::store::StoreError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        self.inner.load().await
    }

    async fn try_lease(
        &self,
        ttl: Duration,
    ) -> Result<Option<tower_auth_refresh::store::Lease>, tower_auth_refresh::store::StoreError>
    {
        self.inner.try_lease(ttl).await
    }

    async fn compare_and_set(
        &self,
        lease: &tower_auth_refresh::store::Lease,
        expected: u64,
        record: &Record,
    ) -> Result<CasOutcome, tower_auth_refresh::store::StoreError> {
        self.inner.compare_and_set(lease, expected, record).await
    }

    async fn release(
        &self,
        lease: tower_auth_refresh::store::Lease,
    ) -> Result<(), tower_auth_refresh::store::StoreError> {
        self.inner.release(lease).await
    }

    async fn wait_change(
        &self,
        seen: u64,
        max: Duration,
    ) -> Result<(), tower_auth_refresh::store::StoreError> {
        self.inner.wait_change(seen, max).await
    }
}

/// A refresh already running when the user logs out does not end that logout: a forced
/// refresh afterwards does not bring the old session back (the refresh in flight took the
/// logout as over when it read the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_in_flight_at_logout_does_not_end_the_logout() {
    let dir = TempDir::new("logout-in-flight");
    let path = dir.path().join("token.json");
    let old = valid_set("old-user-access", "old-user-refresh");
    seed(&FileStore::new(&path), &old).await;
    let endpoint = Endpoint::new(Duration::ZERO, false);
    let armed = Arc::new(AtomicBool::new(false));
    let store = SlowLoad {
        inner: FileStore::new(&path),
        armed: armed.clone(),
    };
    let layer = RefreshLayer::new(StoreRefresher::new(endpoint.clone(), store))
        .initial_token(old)
        .retries(Backoff::none());
    let handle = layer.token_handle();

    armed.store(true, Ordering::SeqCst);
    let in_flight = tokio::spawn({
        let handle = handle.clone();
        async move { handle.refresh().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle.clear();
    let _ = within("the refresh in flight", in_flight).await;

    let forced = within("a forced refresh after the logout", handle.refresh()).await;
    let back = handle.token().map(|t| t.secret().to_owned());
    assert!(
        forced.is_err() && back.is_none(),
        "after a logout, a forced refresh brought the old session back: {back:?} (presented {:?})",
        endpoint.presented()
    );
}

/// Rotates refresh tokens and refuses a spent one with `invalid_grant`, without revoking the
/// family (RFC 6749 without reuse detection).
#[derive(Clone, Default)]
struct Rotating {
    valid: Arc<Mutex<std::collections::HashSet<String>>>,
    n: Arc<AtomicUsize>,
    presented: Arc<Mutex<Vec<String>>>,
}

impl TokenRefresher for Rotating {
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Token, RefreshError>> + Send + 'static>,
    >;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let this = self.clone();
        let rt = ctx
            .stale()
            .and_then(Token::refresh_token)
            .map(str::to_owned);
        Box::pin(async move {
            let rt = rt.ok_or_else(|| RefreshError::terminal("no refresh token"))?;
            this.presented.lock().unwrap().push(rt.clone());
            if !this.valid.lock().unwrap().remove(&rt) {
                return Err(RefreshError::terminal("invalid_grant"));
            }
            let n = this.n.fetch_add(1, Ordering::SeqCst) + 1;
            let next = format!("rt{n}");
            this.valid.lock().unwrap().insert(next.clone());
            Ok(Token::bearer(format!("at{n}"))?
                .with_expires_in(Duration::from_secs(3600))
                .with_refresh_token(next))
        })
    }
}

/// A rotated set whose write failed is the session's live one: another process presenting
/// the spent stored refresh token and being refused does not end it. (The refusal recorded
/// in the store ended it for this process too, without a token call, though its refresh
/// token was valid.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_unstored_set_outlives_another_processs_refusal_of_the_spent_token() {
    let dir = TempDir::new("ended-unstored");
    let path = dir.path().join("token.json");
    let initial = expired_set("at0", "rt0");
    let file = FileStore::new(&path);
    seed(&file, &initial).await;
    let endpoint = Rotating::default();
    endpoint.valid.lock().unwrap().insert("rt0".into());

    let flaky = Flaky::new(FileStore::new(&path), dir.path());
    let a = StoreRefresher::new(endpoint.clone(), flaky.clone());
    flaky.fail_next_writes(1);
    let a1 = within("A's refresh", a.refresh(ctx(&initial)))
        .await
        .unwrap();
    assert_eq!(a1.refresh_token(), Some("rt1"));
    assert_eq!(flaky.failed_writes(), 1);

    let b = StoreRefresher::new(endpoint.clone(), FileStore::new(&path));
    let err = within("B's refresh", b.refresh(ctx(&initial)))
        .await
        .unwrap_err();
    assert!(err.is_terminal());
    assert!(file.load().await.unwrap().unwrap().is_ended());

    let next = within("A's next refresh", a.refresh(ctx(&a1)))
        .await
        .expect("A's set is live");
    assert_eq!(next.refresh_token(), Some("rt2"));
    assert_eq!(
        *endpoint.presented.lock().unwrap(),
        ["rt0", "rt0", "rt1"],
        "A presents its own rt1"
    );
    let stored = file.load().await.unwrap().unwrap();
    assert!(!stored.is_ended(), "A's session is the stored one again");
    assert!(stored.to_token().unwrap().same_secret(&next));
}

/// A token endpoint stand-in whose first call fails transiently after `delay` (a blip);
/// later calls rotate. Records the refresh tokens presented; like `OAuth2Refresher`, it
/// forgets its refresh token at logout and then refuses a refresh that offers none.
#[derive(Clone, Default)]
struct BlipOnce {
    calls: Arc<AtomicUsize>,
    presented: Arc<Mutex<Vec<Option<String>>>>,
    logged_out: Arc<AtomicBool>,
}

impl TokenRefresher for BlipOnce {
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Token, RefreshError>> + Send + 'static>,
    >;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let rt = ctx
                .stale()
                .and_then(Token::refresh_token)
                .map(str::to_owned);
            if rt.is_none() && this.logged_out.load(Ordering::SeqCst) {
                return Err(RefreshError::terminal("logged out: no refresh token"));
            }
            this.presented.lock().unwrap().push(rt);
            let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 1 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                return Err(RefreshError::transient("a blip"));
            }
            Ok(Token::bearer(format!("fresh-access-{n}"))?
                .with_expires_in(Duration::from_secs(3600))
                .with_refresh_token(format!("fresh-refresh-{n}")))
        })
    }

    fn logout(&self) {
        self.logged_out.store(true, Ordering::SeqCst);
    }
}

/// A logout while a refresh fails transiently (third review, eleventh session): the layer
/// retried by calling the refresher again with the same stale token; the retry, called after the logout, reads the
/// new logout count, follows the stored session (its stale token is the store's), succeeds,
/// and ends the logout, although it belongs to the flight that was running at the logout.
/// A forced refresh then adopts the old user's stored session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_refresh_in_flight_at_logout_does_not_end_the_logout() {
    let dir = TempDir::new("logout-retry");
    let path = dir.path().join("token.json");
    let old = valid_set("old-user-access", "old-user-refresh");
    seed(&FileStore::new(&path), &old).await;
    let endpoint = BlipOnce::default();
    let layer = RefreshLayer::new(StoreRefresher::new(endpoint.clone(), FileStore::new(&path)))
        .initial_token(old)
        .retries(
            Backoff::default()
                .base_delay(Duration::from_millis(10))
                .max_delay(Duration::from_millis(10)),
        );
    let handle = layer.token_handle();

    let in_flight = tokio::spawn({
        let handle = handle.clone();
        async move { handle.refresh().await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    handle.clear();
    let _ = within("the refresh in flight", in_flight).await;
    // Let the flight's retry run to its end (its answer is discarded by the layer).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        handle.token().is_none(),
        "the layer discarded the flight's answer"
    );

    let forced = within("a forced refresh after the logout", handle.refresh()).await;
    let back = handle.token().map(|t| t.secret().to_owned());
    let stored = FileStore::new(&path)
        .load()
        .await
        .unwrap()
        .map(|r| r.version());
    let presented = endpoint.presented.lock().unwrap().clone();
    assert!(
        forced.is_err() && back.is_none(),
        "after a logout, a forced refresh brought the old session back: {back:?} (presented {presented:?}, stored {stored:?})",
    );
}

/// A refresher that presents its stale token's refresh token, waits at a gate if given one,
/// then refuses it (`refuse`) or rotates to `<prefix>-access-n` / `<prefix>-refresh-n`.
#[derive(Clone)]
struct Gated {
    prefix: &'static str,
    refuse: bool,
    gate: Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>,
    n: Arc<AtomicUsize>,
    presented: Arc<Mutex<Vec<Option<String>>>>,
}

impl Gated {
    fn new(prefix: &'static str, refuse: bool) -> Self {
        Self {
            prefix,
            refuse,
            gate: None,
            n: Arc::default(),
            presented: Arc::default(),
        }
    }
}

impl TokenRefresher for Gated {
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Token, RefreshError>> + Send + 'static>,
    >;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let rt = ctx
                .stale()
                .and_then(Token::refresh_token)
                .map(str::to_owned);
            this.presented.lock().unwrap().push(rt);
            if let Some((reached, gate)) = &this.gate {
                reached.notify_one();
                gate.notified().await;
            }
            if this.refuse {
                return Err(RefreshError::terminal("invalid_grant"));
            }
            let n = this.n.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Token::bearer(format!("{}-access-{n}", this.prefix))?
                .with_expires_in(Duration::from_secs(3600))
                .with_refresh_token(format!("{}-refresh-{n}", this.prefix)))
        })
    }
}

/// A login (user B, from outside the stored session) whose own refresh token is refused
/// (third review, eleventh session),
/// while another process refreshed user A's stored session during the token call (the lease
/// was not exclusive: a restarted or partitioned store): the refused login is handed user
/// A's token (the terminal branch adopts a newer stored record without asking whether this
/// refresh was a login).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_never_handed_the_previous_users_session() {
    let dir = TempDir::new("refused-login");
    let path = dir.path().join("token.json");
    let file = FileStore::new(&path);
    seed(&file, &expired_set("a-access-0", "a-refresh-0")).await;

    let (reached, gate) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let mut refused = Gated::new("b", true);
    refused.gate = Some((reached.clone(), gate.clone()));
    let login = StoreRefresher::new(refused, Partitioned(FileStore::new(&path)));
    let other = StoreRefresher::new(Gated::new("a", false), Partitioned(FileStore::new(&path)));

    let pending = tokio::spawn(login.refresh(ctx(&expired_set("b-access-0", "b-refresh-0"))));
    within("the login at its gate", reached.notified()).await;
    let a1 = within(
        "the other process",
        other.refresh(ctx(&expired_set("a-access-0", "a-refresh-0"))),
    )
    .await
    .unwrap();
    assert_eq!(a1.secret(), "a-access-1");
    gate.notify_one();
    let outcome = within("the refused login", pending).await.unwrap();
    assert!(
        outcome.is_err(),
        "user B's refused login was handed user A's session: {:?}",
        outcome.map(|t| t.secret().to_owned())
    );
}

/// Fourth review (eleventh session). Process A rotates key 0's rt0 into rt1 and fails to
/// store it; process B presents the
/// spent rt0, is refused and records the refusal; A's keyed layer evicts key 0's cell. The
/// rebuilt cell refreshes with no token: it must find A's live unstored set (rt1) as each
/// of the two fixes promises alone, not end the session (it ended it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstored_set_survives_eviction_and_another_processs_refusal_together() {
    use tower_auth_refresh::keyed::KeyedRefreshLayer;
    use tower_auth_refresh::store::KeyedStoreRefresher;

    let dir = TempDir::new("review4-evict-refused");
    let (paths, stores) = keyed_flaky_stores(&dir, 2);
    let initial = expired_set("at0", "rt0");
    seed(&stores[0], &initial).await;
    seed(&stores[1], &expired_set("b-at0", "b-rt0")).await;
    let endpoint = Rotating::default();
    endpoint.valid.lock().unwrap().insert("rt0".into());
    endpoint.valid.lock().unwrap().insert("b-rt0".into());

    let keyed = {
        let endpoint = endpoint.clone();
        move |_k: u32, stale: Option<Token>| {
            endpoint.refresh(RefreshContext::new(stale, RefreshReason::Expired))
        }
    };
    let by_key = stores.clone();
    let shared = KeyedStoreRefresher::new(keyed, move |k: &u32| by_key[*k as usize].clone());
    let layer = KeyedRefreshLayer::new(shared).capacity(1);
    let handle = layer.token_handle();

    // A: key 0 refreshes rt0 -> rt1; the write fails.
    stores[0].fail_next_writes(1);
    within("A's key 0 refresh", handle.key(&0).refresh())
        .await
        .unwrap();
    assert_eq!(stores[0].failed_writes(), 1);

    // B: presents the stored (spent) rt0, is refused, records the refusal.
    let b = StoreRefresher::new(
        endpoint.clone(),
        FileStore::new(paths[0].join("token.json")),
    );
    let err = within(
        "B's refresh",
        b.refresh(RefreshContext::new(
            Some(initial.clone()),
            RefreshReason::Expired,
        )),
    )
    .await
    .unwrap_err();
    assert!(err.is_terminal());
    assert!(
        FileStore::new(paths[0].join("token.json"))
            .load()
            .await
            .unwrap()
            .unwrap()
            .is_ended()
    );

    // A: key 1 is used; with capacity 1 key 0's cell is evicted.
    within("A's key 1 refresh", handle.key(&1).refresh())
        .await
        .unwrap();

    // A: key 0 again. Its live set rt1 must be presented.
    let again = within("A's key 0 refresh after eviction", handle.key(&0).refresh()).await;
    let presented = endpoint.presented.lock().unwrap().clone();
    assert!(
        again.is_ok(),
        "A's live unstored set was lost: {:?}; presented {presented:?}",
        again.err().map(|e| e.to_string())
    );
    assert_eq!(
        presented.iter().filter(|rt| *rt == "rt1").count(),
        1,
        "{presented:?}"
    );
}

/// The start of the keyed eviction tests below: user B logs in on key 0 of a
/// `KeyedStoreRefresher` (its token calls gated); its write loses to another process that
/// refreshes user A's stored session meanwhile, and that process refreshes A once more.
struct KeyedLoginRace {
    servers: Servers,
    refresh_a: String,
    refresh_b: String,
    /// The login's set, kept after its write lost (not stored).
    kept: Token,
    /// A permit lets the login's next token call through.
    gate: Arc<Notify>,
    _dir: TempDir,
}

async fn keyed_login_lost_its_write(
    tag: &str,
) -> (
    KeyedLoginRace,
    impl tower_auth_refresh::keyed::KeyedRefresher<u32>,
) {
    use tower_auth_refresh::keyed::KeyedRefresher;
    use tower_auth_refresh::store::KeyedStoreRefresher;

    let servers = Servers::start(TokenConfig::default()).await;
    let (access_a, refresh_a) = servers.token.login();
    let (access_b, refresh_b) = servers.token.login();
    let dir = TempDir::new(tag);
    let path = dir.path().join("token.json");
    seed(&FileStore::new(&path), &expired_set(&access_a, &refresh_a)).await;
    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let g = Arc::new(gated(
        servers.token_url(),
        GrantCalls::default(),
        reached.clone(),
        gate.clone(),
    ));
    let keyed = move |_k: u32, stale: Option<Token>| {
        g.refresh(RefreshContext::new(stale, RefreshReason::Expired))
    };
    let store_path = path.clone();
    let login = Arc::new(KeyedStoreRefresher::new(keyed, move |_k: &u32| {
        Partitioned(FileStore::new(&store_path))
    }));
    let other = StoreRefresher::new(
        grant_refresher(servers.token_url(), GrantCalls::default()),
        Partitioned(FileStore::new(&path)),
    );
    let pending = tokio::spawn({
        let login = login.clone();
        let stale = expired_set(&access_b, &refresh_b);
        async move {
            login
                .refresh(&0, RefreshContext::new(Some(stale), RefreshReason::Expired))
                .await
        }
    });
    within("the login at its gate", reached.notified()).await;
    let a1 = within(
        "the other process",
        other.refresh(ctx(&expired_set(&access_a, &refresh_a))),
    )
    .await
    .unwrap();
    gate.notify_one();
    let kept = within("the login", pending).await.unwrap().unwrap();
    within("the other process again", other.refresh(ctx(&a1)))
        .await
        .unwrap();
    let race = KeyedLoginRace {
        servers,
        refresh_a,
        refresh_b,
        kept,
        gate,
        _dir: dir,
    };
    (
        race,
        Arc::into_inner(login).expect("the login's task is over"),
    )
}

/// `a_login_that_lost_its_write_stays_itself_through_more_refreshes_of_the_old_session`
/// through a `KeyedStoreRefresher`, with the key's cell evicted (capacity, idle timeout,
/// `KeyedTokenHandle::remove`) before the login's next refresh: the rebuilt cell asks with no
/// token, and got the replaced session (user A's) instead of the login's own set (user B's;
/// fourth review, eleventh session).
#[cfg(feature = "oauth2")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_login_that_lost_its_write_stays_itself_after_its_cell_is_evicted() {
    use tower_auth_refresh::keyed::KeyedRefresher;

    let (race, login) = keyed_login_lost_its_write("review4-login-evict").await;
    let servers = &race.servers;
    // Key 0's cell is evicted; the rebuilt cell refreshes with no token.
    race.gate.notify_one(); // a permit: a token call, if any, goes through at once
    let next = within(
        "key 0's refresh after the eviction",
        login.refresh(&0, RefreshContext::new(None, RefreshReason::NoToken)),
    )
    .await
    .unwrap();
    let b_now = servers.token.current_of(&race.refresh_b).unwrap();
    let a_now = servers.token.current_of(&race.refresh_a).unwrap();
    assert!(!servers.token.issued_in_session_of(next.secret(), &a_now));
    assert!(
        servers.token.issued_in_session_of(next.secret(), &b_now),
        "key 0 was switched back to user A's session (refresh token {:?}, user B's is {b_now})",
        next.refresh_token()
    );
}

/// Fifth review (eleventh session): a keyed login that lost its write, then stored its set,
/// then had its cell evicted: the rebuilt cell adopts the stored set. (The old entry of the
/// lost write still matched, and the rebuilt cell presented the login's spent refresh token:
/// reuse detected, the session recorded as ended for every process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_keyed_cell_never_presents_its_stored_logins_spent_refresh_token() {
    use tower_auth_refresh::keyed::KeyedRefresher;

    let (race, login) = keyed_login_lost_its_write("login-stored-evict").await;
    let servers = &race.servers;
    // Key 0 refreshes its login and stores it.
    race.gate.notify_one();
    let stored = within(
        "key 0 stores its login",
        login.refresh(
            &0,
            RefreshContext::new(Some(race.kept.clone()), RefreshReason::Expired),
        ),
    )
    .await
    .unwrap();
    // Evicted: the rebuilt cell refreshes with no token.
    race.gate.notify_one();
    let next = within(
        "key 0 after the eviction",
        login.refresh(&0, RefreshContext::new(None, RefreshReason::NoToken)),
    )
    .await;
    assert_eq!(
        servers.token.reuse_detected(),
        0,
        "the rotated refresh token was presented"
    );
    let next = next.expect("the stored live session goes on");
    assert_eq!(next.secret(), stored.secret(), "the stored set is adopted");
}

/// Fifth review (eleventh session): a keyed login that lost its write, then a logout, then
/// another user's login stored: an evicted cell resumes neither the logged-out login nor
/// replaces the new one in the store (it resumed user B and wrote B over user C).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_keyed_cell_never_resumes_a_login_from_before_a_logout() {
    use tower_auth_refresh::keyed::KeyedRefresher;

    let (race, login) = keyed_login_lost_its_write("logout-evict").await;
    let servers = &race.servers;
    let (access_c, refresh_c) = servers.token.login();
    // Key 0 logs out, then user C logs in on it and is stored.
    login.logout(&0);
    race.gate.notify_one();
    within(
        "C's login",
        login.refresh(
            &0,
            RefreshContext::new(
                Some(expired_set(&access_c, &refresh_c)),
                RefreshReason::Expired,
            ),
        ),
    )
    .await
    .unwrap();
    // Evicted: the rebuilt cell refreshes with no token.
    race.gate.notify_one();
    let next = within(
        "key 0 after the eviction",
        login.refresh(&0, RefreshContext::new(None, RefreshReason::NoToken)),
    )
    .await
    .unwrap();
    let b_now = servers.token.current_of(&race.refresh_b).unwrap();
    let c_now = servers.token.current_of(&refresh_c).unwrap();
    assert!(
        !servers.token.issued_in_session_of(next.secret(), &b_now),
        "key 0 was switched back to B, logged out before C's login"
    );
    assert!(servers.token.issued_in_session_of(next.secret(), &c_now));
}

/// A token endpoint that rotates the refresh token as soon as it gets the request and answers
/// `delay` later: the rotation is done on the server before the client hears of it.
#[derive(Clone)]
struct SlowAnswer {
    endpoint: Rotating,
    delay: Duration,
}

impl TokenRefresher for SlowAnswer {
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Token, RefreshError>> + Send + 'static>,
    >;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let rotated = self.endpoint.refresh(ctx);
        let delay = self.delay;
        Box::pin(async move {
            let answer = rotated.await;
            tokio::time::sleep(delay).await;
            answer
        })
    }
}

/// A refresh the layer's `refresh_timeout` cuts off after the token endpoint rotated the
/// refresh token still stores the rotated set: the retry adopts it instead of presenting the
/// spent refresh token (which the endpoint refuses, ending the session for every process).
/// (Review, twelfth session: the set was lost with the dropped call, and the retry presented
/// `rt0` again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_cut_off_by_its_timeout_still_stores_the_rotated_set() {
    let dir = TempDir::new("cut-off");
    let path = dir.path().join("token.json");
    let initial = expired_set("at0", "rt0");
    seed(&FileStore::new(&path), &initial).await;
    let endpoint = Rotating::default();
    endpoint.valid.lock().unwrap().insert("rt0".into());
    let slow = SlowAnswer {
        endpoint: endpoint.clone(),
        delay: Duration::from_millis(600),
    };
    let layer = RefreshLayer::new(StoreRefresher::new(slow, FileStore::new(&path)))
        .initial_token(initial)
        .refresh_timeout(Duration::from_millis(200))
        .retries(
            Backoff::default()
                .base_delay(Duration::from_millis(10))
                .max_delay(Duration::from_millis(10))
                .max_elapsed(Duration::from_secs(5)),
        );
    let handle = layer.token_handle();
    let refreshed = within("the refresh", handle.refresh()).await;
    let presented = endpoint.presented.lock().unwrap().clone();
    assert_eq!(
        presented,
        ["rt0"],
        "the spent refresh token was presented again"
    );
    assert!(refreshed.is_ok(), "the session ended: {refreshed:?}");
    assert_eq!(
        handle.token().map(|t| t.secret().to_owned()).as_deref(),
        Some("at1")
    );
    let stored = FileStore::new(&path).load().await.unwrap().unwrap();
    assert!(!stored.is_ended());
    let stored = stored.to_token().unwrap();
    assert_eq!(stored.refresh_token(), Some("rt1"));
}

/// A stored session without a refresh token (a login by a refresher that gets none: client
/// credentials, an API key) is refreshed as it is: a process that followed the session before
/// that login never grafts its own, superseded refresh token onto it. (Review, twelfth
/// session: it presented its spent refresh token with the new login's access token, and the
/// refusal was recorded as the new login's, ending it for every process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_login_without_a_refresh_token_never_gets_a_spent_one_grafted_on() {
    let dir = TempDir::new("no-graft");
    let path = dir.path().join("token.json");
    let initial = expired_set("at0", "rt0");
    seed(&FileStore::new(&path), &initial).await;
    let endpoint = Rotating::default();
    endpoint.valid.lock().unwrap().insert("rt0".into());
    let logins = Arc::new(AtomicUsize::new(0));
    // Rotates a set with a refresh token; logs in again (a new short-lived access token, no
    // refresh token) for a set without one, as a client-credentials refresher does.
    let refresher = {
        let (endpoint, logins) = (endpoint.clone(), logins.clone());
        context_fn(move |ctx: RefreshContext| {
            let rotating = ctx
                .stale()
                .and_then(Token::refresh_token)
                .is_some()
                .then(|| endpoint.refresh(ctx));
            let n = logins.clone();
            async move {
                match rotating {
                    Some(rotating) => rotating.await,
                    None => {
                        let n = n.fetch_add(1, Ordering::SeqCst) + 1;
                        Ok(Token::bearer(format!("login-{n}"))?
                            .with_expires_in(Duration::from_secs(3)))
                    }
                }
            }
        })
    };
    let process = || StoreRefresher::new(refresher.clone(), FileStore::new(&path));
    let (p, z, q) = (process(), process(), process());
    let t1 = within("P's refresh", p.refresh(ctx(&initial)))
        .await
        .unwrap();
    assert_eq!(t1.refresh_token(), Some("rt1"));
    let t2 = within("Z's refresh", z.refresh(ctx(&t1))).await.unwrap();
    assert_eq!(t2.refresh_token(), Some("rt2"));
    // Q logs out and logs in anew, without a refresh token.
    q.logout();
    let forced = RefreshContext::new(None, RefreshReason::Forced);
    let login = within("Q's login", q.refresh(forced)).await.unwrap();
    assert_eq!(login.secret(), "login-1");
    assert_eq!(login.refresh_token(), None);

    // P still holds rt1's set; the stored login expires within P's margin: P refreshes it.
    let followed = within("P's refresh of the login", p.refresh(ctx(&t1))).await;
    let presented = endpoint.presented.lock().unwrap().clone();
    assert_eq!(
        presented,
        ["rt0", "rt1"],
        "a spent refresh token was presented again"
    );
    let stored = FileStore::new(&path).load().await.unwrap().unwrap();
    assert!(!stored.is_ended(), "the new login's session was ended");
    let followed = followed.expect("P follows the new login");
    assert_eq!(followed.secret(), "login-2");
    assert_eq!(followed.refresh_token(), None);
}

/// A logout everywhere reaches a layer of another process as a logout: its refresh fails
/// with a terminal error whose source is `LoggedOut` (`is_everywhere`), without a token call,
/// and its requests then fail locally with a `SessionEnded` that `is_logout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_everywhere_reaches_another_layer_as_a_logout() {
    let dir = TempDir::new("logout-layer");
    let path = dir.path().join("token.json");
    let initial = expired_set("at0", "rt0");
    seed(&FileStore::new(&path), &initial).await;
    let endpoint = Rotating::default();
    endpoint.valid.lock().unwrap().insert("rt0".into());
    let elsewhere = StoreRefresher::new(endpoint.clone(), FileStore::new(&path));
    let layer = RefreshLayer::new(StoreRefresher::new(endpoint.clone(), FileStore::new(&path)))
        .initial_token(initial);
    let handle = layer.token_handle();
    within("the first refresh", handle.refresh()).await.unwrap();
    assert_eq!(handle.token().unwrap().secret(), "at1");

    within("the logout", elsewhere.log_out_everywhere())
        .await
        .unwrap();
    // Logged out already: nothing to do.
    within("the logout again", elsewhere.log_out_everywhere())
        .await
        .unwrap();
    let err = within("a refresh after it", handle.refresh())
        .await
        .unwrap_err();
    let logged_out =
        std::iter::successors(Some(&*err as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .find_map(|e| e.downcast_ref::<tower_auth_refresh::error::LoggedOut>())
        .unwrap_or_else(|| panic!("no LoggedOut in {err:?}"));
    assert!(logged_out.is_everywhere());
    assert_eq!(
        *endpoint.presented.lock().unwrap(),
        ["rt0"],
        "no token call"
    );
    assert!(
        !format!("{err} {err:?}").contains("at1") && !format!("{err:?}").contains("rt1"),
        "no secret in the error"
    );

    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(
            |_req: http::Request<ReplayBody<String>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
            },
        ));
    let req = http::Request::get("http://127.0.0.1/")
        .body(String::new())
        .unwrap();
    let err = within("a request", svc.oneshot(req)).await.unwrap_err();
    let ended = err
        .downcast_ref::<tower_auth_refresh::error::SessionEnded>()
        .unwrap_or_else(|| panic!("not SessionEnded: {err:?}"));
    assert!(ended.is_logout());
}

/// A keyed logout everywhere (`KeyedStoreRefresher::log_out_everywhere`) ends that key's stored
/// session only: its next refresh fails as logged out without a token call, the other key's
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_logout_everywhere_ends_that_keys_session_only() {
    use tower_auth_refresh::keyed::KeyedRefreshLayer;
    use tower_auth_refresh::store::KeyedStoreRefresher;

    let dir = TempDir::new("keyed-logout");
    let path = |k: u32| dir.path().join(format!("k{k}.json"));
    seed(
        &FileStore::new(path(0)),
        &expired_set("access-0", "refresh-0"),
    )
    .await;
    seed(
        &FileStore::new(path(1)),
        &expired_set("b-access-0", "b-refresh-0"),
    )
    .await;
    let tenants = Tenants::default();
    let root = dir.path().to_owned();
    let shared = KeyedStoreRefresher::new(tenants.clone(), move |k: &u32| {
        FileStore::new(root.join(format!("k{k}.json")))
    });
    let layer = KeyedRefreshLayer::new(shared.clone());
    let handle = layer.token_handle();
    for key in [0, 1] {
        within("a refresh", handle.key(&key).refresh())
            .await
            .unwrap();
    }
    within("key 0's logout", shared.log_out_everywhere(&0))
        .await
        .unwrap();
    assert!(
        FileStore::new(path(0))
            .load()
            .await
            .unwrap()
            .unwrap()
            .is_logged_out()
    );
    assert!(
        !FileStore::new(path(1))
            .load()
            .await
            .unwrap()
            .unwrap()
            .is_ended()
    );

    let err = within("key 0's refresh", handle.key(&0).refresh())
        .await
        .unwrap_err();
    let logged_out =
        std::iter::successors(Some(&*err as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .find_map(|e| e.downcast_ref::<tower_auth_refresh::error::LoggedOut>());
    assert!(logged_out.is_some_and(|l| l.is_everywhere()), "{err:?}");
    within("key 1's refresh", handle.key(&1).refresh())
        .await
        .unwrap();
    let presented: Vec<u32> = tenants
        .presented
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(presented, [0, 1, 1], "no token call for the logged-out key");
}

/// A logout everywhere with no record stored (the store lost it) is recorded all the same: a
/// process whose session went through the store ends too, instead of storing it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_everywhere_without_a_record_still_ends_the_stored_session() {
    let dir = TempDir::new("logout-no-record");
    let path = dir.path().join("token.json");
    let initial = expired_set("at0", "rt0");
    seed(&FileStore::new(&path), &initial).await;
    let endpoint = Rotating::default();
    endpoint.valid.lock().unwrap().insert("rt0".into());
    let b = StoreRefresher::new(endpoint.clone(), FileStore::new(&path));
    let t1 = within("B's refresh", b.refresh(ctx(&initial)))
        .await
        .unwrap();
    std::fs::remove_file(&path).unwrap();

    let a = StoreRefresher::new(endpoint.clone(), FileStore::new(&path));
    within("A's logout", a.log_out_everywhere()).await.unwrap();
    let err = within("B's refresh after it", b.refresh(ctx(&t1)))
        .await
        .unwrap_err();
    assert!(err.is_terminal(), "{err:?}");
    assert_eq!(
        *endpoint.presented.lock().unwrap(),
        ["rt0"],
        "B stored its session again"
    );
    assert!(
        FileStore::new(&path)
            .load()
            .await
            .unwrap()
            .unwrap()
            .is_logged_out()
    );
}

/// A keyed refresher whose keys' stores all lost their records keeps each key's unstored set
/// apart: a key that still holds the set it refreshed from resumes its own kept set, never
/// another key's. (Review, twelfth session: kept sets without a record replaced each other
/// across keys, and one key's spent refresh token led to another key's kept set.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_sets_without_a_record_stay_apart_across_keys() {
    use tower_auth_refresh::keyed::KeyedRefresher;
    use tower_auth_refresh::store::KeyedStoreRefresher;

    let dir = TempDir::new("keyed-no-record");
    let (paths, stores) = keyed_flaky_stores(&dir, 2);
    seed(&stores[0], &expired_set("a0", "ra0")).await;
    seed(&stores[1], &expired_set("b0", "rb0")).await;
    let tenants = Tenants::default();
    let by_key = stores.clone();
    let shared =
        KeyedStoreRefresher::new(tenants.clone(), move |k: &u32| by_key[*k as usize].clone());
    // Each key refreshes through its store; then both stores lose their records.
    let mut held = Vec::new();
    for (key, stale) in [
        (0u32, expired_set("a0", "ra0")),
        (1, expired_set("b0", "rb0")),
    ] {
        held.push(
            within("a refresh", shared.refresh(&key, ctx(&stale)))
                .await
                .unwrap(),
        );
    }
    for sub in &paths {
        std::fs::remove_file(sub.join("token.json")).unwrap();
    }
    // Each refreshes again, and its write fails: a kept set without a record, per key.
    for key in [0u32, 1] {
        stores[key as usize].fail_next_writes(1);
        within("a refresh", shared.refresh(&key, ctx(&held[key as usize])))
            .await
            .unwrap();
        assert_eq!(stores[key as usize].failed_writes(), 1);
    }
    // Key 0's layer never got its kept set (cut off): it refreshes with the one it held.
    within("key 0 again", shared.refresh(&0, ctx(&held[0])))
        .await
        .unwrap();
    let key0 = tenants.presented_by(0);
    assert_eq!(
        key0,
        ["ra0", "rotated-1", "rotated-3"],
        "key 0 presented another key's refresh token, or its own spent one"
    );
    // Key 0's set was stored: key 1's kept set is still there for key 1's layer, which never
    // got it either.
    within("key 1 again", shared.refresh(&1, ctx(&held[1])))
        .await
        .unwrap();
    let key1 = tenants.presented_by(1);
    assert_eq!(
        key1,
        ["rb0", "rotated-2", "rotated-4"],
        "key 1 presented its own spent refresh token: its kept set went with key 0's"
    );
}

/// Two records in one directory whose names are not UTF-8 (and would read the same once made
/// text) each write through a temporary file of their own: many writes of both at once leave
/// each record with its own session, and none fails.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_whose_names_are_not_utf8_never_share_a_temporary_file() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let dir = TempDir::new("non-utf8");
    let writes = |name: &'static [u8], access: &'static str| {
        let store = FileStore::new(dir.path().join(OsStr::from_bytes(name)));
        tokio::spawn(async move {
            let lease = store
                .try_lease(Duration::from_secs(60))
                .await
                .unwrap()
                .unwrap();
            for version in 1..=300u64 {
                let token = Token::bearer(access).unwrap();
                let record = Record::from_token(version, &token, SystemTime::now());
                let written = store.compare_and_set(&lease, version - 1, &record).await;
                assert_eq!(
                    written.unwrap_or_else(|e| panic!("{access}, version {version}: {e}")),
                    CasOutcome::Written,
                    "{access}, version {version}"
                );
            }
            store.release(lease).await.unwrap();
            let stored = store.load().await.unwrap().unwrap();
            assert_eq!(stored.version(), 300);
            assert_eq!(stored.to_token().unwrap().secret(), access);
        })
    };
    let a = writes(b"t\xff", "access-of-a");
    let b = writes(b"t\xfe", "access-of-b");
    a.await.unwrap();
    b.await.unwrap();
}
