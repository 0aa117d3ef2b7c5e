//! The Redis token store: several real processes share one token set through a real
//! `redis-server` started by each test (skipped, saying so, when `redis-server` is not on PATH,
//! unless `TOWER_AUTH_REFRESH_REQUIRE_REDIS=1`).
#![cfg(feature = "redis")]

#[allow(dead_code)]
mod oauth2_server;
mod store_support;
mod support;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use tower::ServiceExt;
use tower_auth_refresh::error::RefreshFailed;
use tower_auth_refresh::store::{CasOutcome, Record, RedisStore, StoreRefresher, TokenStore};
use tower_auth_refresh::{
    Backoff, Cooldown, RefreshContext, RefreshLayer, RefreshReason, ReplayBody, Token,
    TokenRefresher,
};

use oauth2_server::{Servers, TokenConfig};
use store_support::*;

/// Not a test: the body of a worker process (see `store_support::run_worker`).
#[test]
#[ignore = "a worker process of the multi-process tests, started by them"]
fn worker() {
    run_worker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_one_refresh_per_expiry_and_restart_redis_store() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let spec = StoreSpec::Redis {
        url: redis.url(),
        prefix: "stampede".into(),
    };
    let store = RedisStore::open(&redis.url(), "stampede").unwrap();
    stampede_rounds_and_restart(spec, store, 20).await;
}

/// Real processes: a logout everywhere ends the session for every replica and a later one;
/// a new login starts a new one (twelfth session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_everywhere_ends_the_session_for_every_process_redis_store() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let spec = StoreSpec::Redis {
        url: redis.url(),
        prefix: "logout".into(),
    };
    let store = RedisStore::open(&redis.url(), "logout").unwrap();
    a_logout_everywhere_ends_the_session_for_every_process(spec, store).await;
}

/// Real processes: an `invalid_grant` for the stored refresh token costs one token call in
/// all, not one per process (review, eleventh session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_session_ends_once_for_every_process_redis_store() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let spec = StoreSpec::Redis {
        url: redis.url(),
        prefix: "refused".into(),
    };
    let store = RedisStore::open(&redis.url(), "refused").unwrap();
    a_refused_session_ends_once_for_every_process(spec, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_holder_killed_mid_refresh_redis_store() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let spec = StoreSpec::Redis {
        url: redis.url(),
        prefix: "killed".into(),
    };
    let store = RedisStore::open(&redis.url(), "killed").unwrap();
    holder_killed_mid_refresh(spec, store, Duration::from_secs(2)).await;
    // The dead holder's lease expired by its TTL; the survivor released its own.
    assert!(redis.get("killed:lease").is_none());
}

/// Redis stopped mid-run: requests with a still-valid token keep succeeding (the store is off
/// the hot path); a refresh fails as a transient `RefreshFailed` without any token call; once
/// Redis is back (empty), the next refresh succeeds from the process's own token set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_mid_run_then_back() {
    let Some(mut redis) = RedisServer::start_or_skip() else {
        return;
    };
    let servers = Servers::start(TokenConfig::default()).await;
    let (access, refresh) = servers.token.login();
    let store = RedisStore::open(&redis.url(), "down").unwrap();
    let set = Token::bearer(access)
        .unwrap()
        .with_expires_in(Duration::from_secs(3600))
        .with_refresh_token(&refresh);
    seed(&store, &set).await;

    let calls = GrantCalls::default();
    let shared = StoreRefresher::new(
        grant_refresher(servers.token_url(), calls.clone()),
        store.clone(),
    );
    // A short cool-down after the failed refresh, so the test sees the recovery soon.
    let layer = RefreshLayer::new(shared)
        .retries(
            Backoff::default()
                .max_attempts(2)
                .base_delay(Duration::from_millis(10)),
        )
        .cooldown(Cooldown::new(
            Duration::from_millis(50),
            Duration::from_millis(50),
        ));
    let client = support::http_client::<ReplayBody<Full<Bytes>>>();
    let svc = tower::ServiceBuilder::new().layer(layer).service(client);
    let send = || svc.clone().oneshot(support::get(servers.api_url()));

    // Start: the stored token is adopted, no token call.
    assert_eq!(send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(servers.token.requests(), 0);

    redis.stop();
    for _ in 0..10 {
        assert_eq!(
            send().await.unwrap().status(),
            StatusCode::OK,
            "valid token, store down"
        );
    }

    servers.token.expire_access_tokens();
    let err = send().await.unwrap_err();
    assert!(err.is::<RefreshFailed>(), "{err}");
    assert!(
        err.downcast_ref::<RefreshFailed>()
            .unwrap()
            .refresh_error()
            .is_transient()
    );
    assert_eq!(calls.get(), 0, "no token call without the store");
    assert_eq!(servers.token.requests(), 0);

    redis.start();
    // The connection manager reconnects on demand, backing off (up to 500 ms) between tries:
    // requests fail as `RefreshFailed` until it is back, then one succeeds. Bounded by 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut status = None;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(60)).await;
        match within("a request after the restart", send()).await {
            Ok(res) => {
                status = Some(res.status());
                break;
            }
            Err(err) => assert!(err.is::<RefreshFailed>(), "{err}"),
        }
    }
    assert_eq!(status, Some(StatusCode::OK), "recovered once Redis is back");
    assert_eq!(servers.token.grants(), 1);
    assert_eq!(servers.token.reuse_detected(), 0);
    let stored = store
        .load()
        .await
        .unwrap()
        .expect("the new set is stored again");
    assert_eq!(stored.version(), 1);
    assert!(stored.has_refresh_token());
}

const SECRET_ACCESS: &str = "acc-5e0c1d-SECRET";
const SECRET_REFRESH: &str = "ref-c4a8e2-SECRET";

fn valid_record(version: u64) -> Record {
    let token = Token::bearer(SECRET_ACCESS)
        .unwrap()
        .with_expires_in(Duration::from_secs(600))
        .with_refresh_token(SECRET_REFRESH);
    Record::from_token(version, &token, SystemTime::now())
}

/// A corrupt, truncated, or wrongly typed Redis value is a typed error, never a panic; the
/// fenced compare-and-set refuses to overwrite it; no secret in any error or the trace.
#[test]
fn corrupt_redis_value_is_a_typed_error_and_never_overwritten() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let (logs, _tracing) = support::capture_logs();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let full = valid_record(4).encode();
        let cases: Vec<Vec<u8>> = vec![
            full[..full.len() / 2].to_vec(),
            b"{}".to_vec(),
            b"garbage".to_vec(),
            String::from_utf8(full.clone())
                .unwrap()
                .replace("\"version\":4", &format!("\"version\":\"{SECRET_ACCESS}\""))
                .into_bytes(),
        ];
        let store = RedisStore::open(&redis.url(), "bad").unwrap();
        for bytes in cases {
            assert_eq!(
                redis.command(&[b"SET", b"bad:record", &bytes]).trim(),
                "+OK"
            );
            let err = store.load().await.unwrap_err();
            assert!(err.is_corrupt(), "{err}");

            let calls = GrantCalls::default();
            let shared = StoreRefresher::new(
                grant_refresher(
                    format!("http://{}/never", support::unused_loopback_addr()),
                    calls.clone(),
                ),
                store.clone(),
            );
            let stale = Token::bearer("stale")
                .unwrap()
                .with_refresh_token(SECRET_REFRESH);
            let refresh_err = shared
                .refresh(RefreshContext::new(Some(stale), RefreshReason::Expired))
                .await
                .unwrap_err();
            assert!(refresh_err.is_transient());
            assert_eq!(calls.get(), 0);

            let lease = store
                .try_lease(Duration::from_secs(2))
                .await
                .unwrap()
                .unwrap();
            let cas = store.compare_and_set(&lease, 0, &valid_record(1)).await;
            assert!(cas.unwrap_err().is_corrupt());
            store.release(lease).await.unwrap();
            assert_eq!(
                redis.get("bad:record").as_deref(),
                Some(&bytes[..]),
                "never overwritten"
            );

            let shown = format!("{err} {err:?} {refresh_err} {refresh_err:?}");
            for secret in [SECRET_ACCESS, SECRET_REFRESH] {
                assert!(!shown.contains(secret), "secret in {shown}");
            }
        }
        // A key of another type: corrupt for the read and for the compare-and-set, which
        // leaves it alone.
        redis.command(&[b"DEL", b"bad:record"]);
        redis.command(&[b"LPUSH", b"bad:record", b"x"]);
        assert!(store.load().await.unwrap_err().is_corrupt());
        let lease = store
            .try_lease(Duration::from_secs(2))
            .await
            .unwrap()
            .unwrap();
        let cas = store.compare_and_set(&lease, 0, &valid_record(1)).await;
        let cas_err = cas.unwrap_err();
        assert!(cas_err.is_corrupt(), "{cas_err}");
        store.release(lease).await.unwrap();
        assert_eq!(redis.command(&[b"TYPE", b"bad:record"]).trim(), "+list");
    });
    let text = logs.text();
    for secret in [SECRET_ACCESS, SECRET_REFRESH] {
        assert!(!text.contains(secret), "secret in the trace");
    }
}

/// The lease is exclusive and fenced, a stale version never overwrites a newer record, and
/// keys are prefixed: two principals never see each other's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_lease_version_check_and_prefixes() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let a = RedisStore::open(&redis.url(), "tenant-a").unwrap();
    let b = RedisStore::open(&redis.url(), "tenant-b").unwrap();
    seed(&a, &valid_record(1).to_token().unwrap()).await;
    assert!(
        b.load().await.unwrap().is_none(),
        "another prefix, another record"
    );

    // A long TTL: the lease is expired on purpose below, not by the clock between steps.
    let lease = a.try_lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(
        a.try_lease(Duration::from_secs(1)).await.unwrap().is_none(),
        "exclusive"
    );
    assert!(
        b.try_lease(Duration::from_secs(1)).await.unwrap().is_some(),
        "per prefix"
    );
    assert_eq!(
        a.compare_and_set(&lease, 0, &valid_record(2))
            .await
            .unwrap(),
        CasOutcome::VersionChanged
    );
    // The lease runs out (made to expire now); another holder takes it; the old fence cannot
    // write any more.
    assert_eq!(
        redis.command(&[b"PEXPIRE", b"tenant-a:lease", b"1"]).trim(),
        ":1",
        "the first lease was still held"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while redis.get("tenant-a:lease").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease did not expire within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = a
        .try_lease(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("expired lease");
    assert_ne!(second.fence(), lease.fence());
    assert_eq!(
        a.compare_and_set(&lease, 1, &valid_record(2))
            .await
            .unwrap(),
        CasOutcome::LeaseLost
    );
    a.release(lease).await.unwrap();
    assert!(
        a.try_lease(Duration::from_secs(1)).await.unwrap().is_none(),
        "an old fence cannot release"
    );
    assert_eq!(
        a.compare_and_set(&second, 1, &valid_record(2))
            .await
            .unwrap(),
        CasOutcome::Written
    );
    a.release(second).await.unwrap();
    assert_eq!(a.load().await.unwrap().unwrap().version(), 2);

    // A scoped store shares the connection, not the record.
    let c = a.scoped("tenant-c");
    assert_eq!(c.record_key(), "tenant-c:record");
    assert!(c.load().await.unwrap().is_none());
    seed(&c, &valid_record(1).to_token().unwrap()).await;
    assert_eq!(c.load().await.unwrap().unwrap().version(), 1);
    assert_eq!(a.load().await.unwrap().unwrap().version(), 2);
    assert!(redis.get("tenant-c:record").is_some());
}

/// The layer's `refresh_timeout` runs out while a refresh holds the Redis lease in its token
/// call: the call goes on under the lease (the endpoint may have rotated the refresh token),
/// its answer is stored, and the lease is given back at once then, not after its TTL, so the
/// other replicas follow the stored answer. (Review, twelfth session: the call was dropped
/// and the lease released, and the next holder presented the possibly spent refresh token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_cut_off_by_the_layer_stores_its_answer_and_gives_the_redis_lease_back() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let store = RedisStore::open(&redis.url(), "cancelled").unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let answers = {
        let gate = gate.clone();
        tower_auth_refresh::context_fn(move |_ctx: RefreshContext| {
            let gate = gate.clone();
            async move {
                gate.notified().await;
                Ok(Token::bearer("after-the-cut")?.with_refresh_token("rotated"))
            }
        })
    };
    let shared = StoreRefresher::new(answers, store.clone())
        .lease_ttl(Duration::from_secs(600))
        .lease_wait(Duration::from_secs(1));
    let layer = RefreshLayer::new(shared)
        .refresh_timeout(Duration::from_millis(300))
        .retries(Backoff::none());
    let client = support::http_client::<ReplayBody<Full<Bytes>>>();
    let svc = tower::ServiceBuilder::new().layer(layer).service(client);
    let url = format!("http://{}/", support::unused_loopback_addr());
    let err = within("the request", svc.oneshot(support::get(url)))
        .await
        .unwrap_err();
    assert!(err.is::<RefreshFailed>(), "{err}");
    assert!(
        redis.get("cancelled:lease").is_some(),
        "the lease is held while the token call runs"
    );
    gate.notify_one();
    let mut released = false;
    for _ in 0..100 {
        if redis.get("cancelled:lease").is_none() {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        released,
        "the lease was given back once the answer was stored, not kept for its 600 s TTL"
    );
    let stored = store.load().await.unwrap().expect("the answer was stored");
    assert_eq!(stored.to_token().unwrap().refresh_token(), Some("rotated"));
    assert!(
        store
            .try_lease(Duration::from_secs(1))
            .await
            .unwrap()
            .is_some()
    );
}

/// A TCP proxy to `redis-server` that can stall: [`stall`](Self::stall) makes every connection
/// open at that moment stop forwarding in both directions without closing (a half-open
/// connection, as after a host crash or a NAT idle drop), while new connections are still
/// accepted and forwarded. Its tasks end when it is dropped.
struct StallingProxy {
    addr: std::net::SocketAddr,
    epoch: tokio::sync::watch::Sender<u64>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl StallingProxy {
    /// A proxy in front of `redis`.
    async fn before(redis: &RedisServer) -> Self {
        let upstream: std::net::SocketAddr = redis
            .url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        Self::start(upstream).await
    }

    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (epoch, mut rx) = tokio::sync::watch::channel(0u64);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    conn = listener.accept() => {
                        if let Ok((client, _)) = conn {
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::spawn(Self::pipe(client, upstream, rx.clone()));
                        }
                    }
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            addr,
            epoch,
            accepted,
        }
    }

    async fn pipe(
        client: tokio::net::TcpStream,
        upstream: std::net::SocketAddr,
        mut epoch: tokio::sync::watch::Receiver<u64>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let born = *epoch.borrow_and_update();
        let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let (mut up, mut down) = ([0u8; 4096], [0u8; 4096]);
        loop {
            tokio::select! {
                // The stall first: bytes that arrive with it are not forwarded.
                biased;
                stalled = async { epoch.wait_for(|e| *e != born).await.is_ok() } => {
                    if stalled {
                        // Half-open: keep both sockets, forward nothing, until the proxy is
                        // dropped.
                        while epoch.changed().await.is_ok() {}
                    }
                    return;
                }
                n = cr.read(&mut up) => match n {
                    Ok(n) if n > 0 => {
                        if sw.write_all(&up[..n]).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                },
                n = sr.read(&mut down) => match n {
                    Ok(n) if n > 0 => {
                        if cw.write_all(&down[..n]).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                },
            }
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Every connection open now goes silent; later ones are forwarded.
    fn stall(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn record_with_access(version: u64, access: &str) -> Record {
    let token = Token::bearer(access)
        .unwrap()
        .with_expires_in(Duration::from_secs(600))
        .with_refresh_token(SECRET_REFRESH);
    Record::from_token(version, &token, SystemTime::now())
}

/// The connection to Redis goes half-open (the peer vanishes without a reset): the operation
/// on it times out (a transient error), and the store then moves to a new connection, so a
/// later operation reads the current record, writes, and is woken by a publication again,
/// instead of timing out until the kernel gives the dead socket up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connection_is_replaced_after_a_timeout() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let proxy = StallingProxy::before(&redis).await;
    let set = |version: u64, access: &str| {
        let bytes = record_with_access(version, access).encode();
        assert_eq!(
            redis.command(&[b"SET", b"halfopen:record", &bytes]).trim(),
            "+OK"
        );
    };
    set(7, "acc-v7");
    let store = RedisStore::open(&proxy.url(), "halfopen").unwrap();
    let first = within("a load", store.load()).await.unwrap().unwrap();
    assert_eq!(first.version(), 7);
    // Subscribed on the first connection.
    within(
        "a short wait",
        store.wait_change(7, Duration::from_millis(50)),
    )
    .await
    .unwrap();
    assert_eq!(proxy.accepted(), 1);

    proxy.stall();
    set(8, "acc-v8");
    let err = within("a load on the stalled connection", store.load())
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(SECRET_REFRESH), "secret in {shown}");

    // Recovers at all: within a few tries and 10 s, not after the kernel's ~15 min.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut loaded = None;
    for _ in 0..20 {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        match within("a load after the stall", store.load()).await {
            Ok(record) => {
                loaded = record;
                break;
            }
            Err(err) => {
                assert!(err.is_unavailable(), "{err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let loaded = loaded.expect("a load succeeds on a new connection within 10 s");
    assert_eq!(loaded.version(), 8, "the current record, read from Redis");
    assert!(loaded.same_access_token(&Token::bearer("acc-v8").unwrap()));
    assert!(proxy.accepted() >= 2, "a new connection was opened");

    // Writes and the change notification work on the new connection too: the store
    // subscribes again there.
    let lease = within("a lease", store.try_lease(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("a free lease");
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_change(8, Duration::from_secs(600)).await })
    };
    // Lets the waiter subscribe first; either order ends the wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let written = within(
        "a compare-and-set",
        store.compare_and_set(&lease, 8, &record_with_access(9, "acc-v9")),
    )
    .await
    .unwrap();
    assert_eq!(written, CasOutcome::Written);
    within("a release", store.release(lease)).await.unwrap();
    within("the waiter, woken by the publication", waiter)
        .await
        .unwrap()
        .unwrap();
    let stored = Record::decode(&redis.get("halfopen:record").unwrap()).unwrap();
    assert_eq!(stored.version(), 9);
}

/// Polls `PUBSUB CHANNELS *:changed` until it counts `n` channels (at most 2 s).
async fn subscribed_channels(redis: &RedisServer, n: usize) -> String {
    let want = format!("*{n}\r\n");
    let mut seen = String::new();
    for _ in 0..100 {
        seen = redis.command(&[b"PUBSUB", b"CHANNELS", b"*:changed"]);
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// A store subscribes to its key's channel while it waits, and the last wait to leave
/// unsubscribes: a keyed layer that waited on many keys keeps no subscription per key it ever
/// waited for, and a message wakes the waits of its own key. (Review, twelfth session: every
/// key's channel stayed subscribed for the life of the connection, in Redis and in the
/// connection manager's resubscription list.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_on_many_keys_leave_no_subscription_behind() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let base = RedisStore::open(&redis.url(), "base").unwrap();
    for k in 0..20 {
        let store = base.scoped(&format!("key{k}"));
        within(
            "a short wait",
            store.wait_change(0, Duration::from_millis(30)),
        )
        .await
        .unwrap();
    }
    assert_eq!(subscribed_channels(&redis, 0).await, "*0\r\n");

    // A long wait is subscribed, not woken by another key's write, and woken by its own.
    let store = base.scoped("key-long");
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_change(0, Duration::from_secs(600)).await })
    };
    assert_eq!(subscribed_channels(&redis, 1).await, "*1\r\n");
    let other = base.scoped("key-other");
    let lease = within("a lease", other.try_lease(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("a free lease");
    let written = within(
        "a write of another key",
        other.compare_and_set(&lease, 0, &record_with_access(1, "acc-other")),
    )
    .await
    .unwrap();
    assert_eq!(written, CasOutcome::Written);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "woken by another key's write");
    let lease = within("a lease", store.try_lease(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("a free lease");
    let written = within(
        "a write",
        store.compare_and_set(&lease, 0, &record_with_access(1, "acc-v1")),
    )
    .await
    .unwrap();
    assert_eq!(written, CasOutcome::Written);
    within("the waiter, woken by its key's message", waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(subscribed_channels(&redis, 0).await, "*0\r\n");
}

/// The connection goes half-open while waits on several keys need to subscribe: each wait
/// ends within its own bound (as one that saw nothing; its caller looks again), instead of
/// queueing behind the others' subscriptions on the dead connection, 2 s each. (Review,
/// twelfth session.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_on_a_stalled_connection_end_within_their_bound() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let proxy = StallingProxy::before(&redis).await;
    let base = RedisStore::open(&proxy.url(), "stalled").unwrap();
    within("a load", base.load()).await.unwrap();
    proxy.stall();
    let waits: Vec<_> = (0..5)
        .map(|k| {
            let store = base.scoped(&format!("stalled-{k}"));
            tokio::spawn(async move { store.wait_change(0, Duration::from_millis(300)).await })
        })
        .collect();
    // Five subscriptions one after another on the dead connection take 10 s (2 s each); the
    // bound leaves room for a busy machine.
    let all = tokio::time::timeout(Duration::from_secs(5), async {
        for w in waits {
            let _ = w.await.unwrap();
        }
    })
    .await;
    assert!(all.is_ok(), "a wait outlived its bound behind the others");
}

/// A wait whose key is subscribed already reads the record after subscribing: on a stalled
/// connection that read counts against the wait's bound too (it took the 2 s response
/// timeout, and ended in an error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_whose_read_stalls_ends_within_its_bound() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let proxy = StallingProxy::before(&redis).await;
    let store = RedisStore::open(&proxy.url(), "stalled-read").unwrap();
    // A long wait keeps the key's channel subscribed (answered).
    let long = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_change(0, Duration::from_secs(10)).await })
    };
    assert_eq!(subscribed_channels(&redis, 1).await, "*1\r\n");
    proxy.stall();
    // An unbounded read takes the 2 s response timeout.
    let short = tokio::time::timeout(
        Duration::from_millis(1_800),
        store.wait_change(0, Duration::from_millis(300)),
    )
    .await;
    assert!(
        matches!(short, Ok(Ok(()))),
        "the read outlived the wait's bound: {short:?}"
    );
    long.abort();
}

/// A Redis user without permission for the store's channels (an ACL user created without
/// `&<prefix>:*`: Redis 7's default): its compare-and-set writes the record and says so (the
/// script's `PUBLISH` is refused, not the write), its lease is given back, and a wait for
/// another process's write ends when the record changes (by polling), not in an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_channel_permissions_writes_and_waits_by_polling() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let created = redis.command(&[
        b"ACL",
        b"SETUSER",
        b"app",
        b"on",
        b">app-pw-7c1e",
        b"~acl:*",
        b"resetchannels",
        b"+@all",
    ]);
    assert_eq!(created.trim(), "+OK");
    let url = redis
        .url()
        .replacen("redis://", "redis://app:app-pw-7c1e@", 1);
    let writer = RedisStore::open(&url, "acl").unwrap();
    let waiter = RedisStore::open(&url, "acl").unwrap();

    let lease = writer
        .try_lease(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let written = writer.compare_and_set(&lease, 0, &valid_record(1)).await;
    assert_eq!(written.unwrap(), CasOutcome::Written);
    assert!(redis.get("acl:record").is_some());
    writer.release(lease).await.unwrap();
    assert!(redis.get("acl:lease").is_none(), "the lease was given back");

    // Nothing new: the wait ends at its bound (not before: it waited), without an error.
    let started = tokio::time::Instant::now();
    within(
        "a wait with nothing new",
        waiter.wait_change(1, Duration::from_millis(300)),
    )
    .await
    .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the wait waited"
    );
    // Another process writes version 2 while a long wait runs: the wait ends.
    let wait = tokio::spawn(async move { waiter.wait_change(1, Duration::from_secs(60)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!wait.is_finished(), "the wait ended with nothing new");
    let lease = writer
        .try_lease(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        writer
            .compare_and_set(&lease, 1, &valid_record(2))
            .await
            .unwrap(),
        CasOutcome::Written
    );
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the wait saw the new version")
        .unwrap()
        .unwrap();
}
