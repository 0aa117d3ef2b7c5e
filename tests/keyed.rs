//! Per-key tokens: isolation between principals, per-key handles, the bounded map.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::error::{MissingKey, RefreshRejected, SessionEnded};
use tower_auth_refresh::keyed::KeyedRefreshLayer;
use tower_auth_refresh::{RefreshError, RefreshEvent, ReplayBody, Token};

use support::{InMemoryApi, authorization, guard, http_client, response, serve};

type Body = Full<Bytes>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Tenant(u32);

/// The identity provider and API state: the valid token of each tenant.
#[derive(Default)]
struct Registry {
    current: Mutex<HashMap<u32, String>>,
    refreshes: Mutex<HashMap<u32, usize>>,
    /// The stale token each refresh of a tenant was handed, in order.
    handed: Mutex<HashMap<u32, Vec<Option<String>>>>,
    mismatches: AtomicUsize,
    served: AtomicUsize,
    rejected: AtomicUsize,
}

impl Registry {
    fn issue(&self, tenant: u32, stale: Option<Token>) -> String {
        let mut refreshes = self.refreshes.lock().unwrap();
        let n = refreshes.entry(tenant).or_default();
        *n += 1;
        self.handed
            .lock()
            .unwrap()
            .entry(tenant)
            .or_default()
            .push(stale.map(|t| t.secret().to_owned()));
        let token = format!("tenant{tenant}-gen{n}");
        self.current.lock().unwrap().insert(tenant, token.clone());
        token
    }

    /// Revokes `tenant`'s token, as an expiry on the server side would.
    fn revoke(&self, tenant: u32) {
        self.current.lock().unwrap().remove(&tenant);
    }
}

/// How long a token of `tenant` lives: 50 to 290 ms.
fn lifetime(tenant: u32) -> Duration {
    Duration::from_millis(50 + u64::from(tenant % 7) * 40)
}

#[tokio::test]
async fn every_request_carries_its_own_tenants_token_under_a_concurrent_mix() {
    guard(async {
        let registry = Arc::new(Registry::default());
        // The API: 200 only for the tenant's current token; records any token of another tenant.
        let addr = serve({
            let registry = registry.clone();
            move |req: Request<Incoming>| {
                let tenant: u32 = req.headers()["x-tenant"].to_str().unwrap().parse().unwrap();
                let auth = authorization(req.headers());
                let token = auth.strip_prefix("Bearer ").unwrap_or("");
                if !token.starts_with(&format!("tenant{tenant}-")) {
                    registry.mismatches.fetch_add(1, Ordering::SeqCst);
                }
                let valid = registry
                    .current
                    .lock()
                    .unwrap()
                    .get(&tenant)
                    .is_some_and(|t| t == token);
                let status = if valid {
                    registry.served.fetch_add(1, Ordering::SeqCst);
                    StatusCode::OK
                } else {
                    registry.rejected.fetch_add(1, Ordering::SeqCst);
                    StatusCode::UNAUTHORIZED
                };
                std::future::ready(response(status, ""))
            }
        })
        .await;

        let issuer = registry.clone();
        let layer = KeyedRefreshLayer::new(move |tenant: Tenant, stale: Option<Token>| {
            let issuer = issuer.clone();
            async move {
                // Some refreshes are slow, and each token lives a short time.
                tokio::time::sleep(Duration::from_millis(u64::from(tenant.0 % 5))).await;
                Ok::<_, RefreshError>(
                    Token::bearer(issuer.issue(tenant.0, stale))?
                        .with_expires_in(lifetime(tenant.0)),
                )
            }
        })
        .key_fn(|parts| {
            parts
                .headers
                .get("x-tenant")?
                .to_str()
                .ok()?
                .parse()
                .ok()
                .map(Tenant)
        });
        let client = http_client::<ReplayBody<Body>>();
        let svc = ServiceBuilder::new().layer(layer).service(client);

        // 1,000 requests over 50 tenants, in waves, with server-side revocations between.
        let mut ok = 0;
        let mut revoked = HashMap::<u32, usize>::new();
        let started = std::time::Instant::now();
        for wave in 0..4u32 {
            let calls: Vec<_> = (0..250u32)
                .map(|i| {
                    let tenant = (i * 7 + wave) % 50;
                    let req = Request::get(format!("http://{addr}/t/{tenant}"))
                        .header("x-tenant", tenant.to_string())
                        .body(Body::default())
                        .unwrap();
                    tokio::spawn(svc.clone().oneshot(req))
                })
                .collect();
            for c in calls {
                let res = c.await.unwrap().expect("request succeeds");
                assert_eq!(res.status(), StatusCode::OK);
                ok += 1;
            }
            for tenant in (wave..50).step_by(3) {
                registry.revoke(tenant);
                *revoked.entry(tenant).or_default() += 1;
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert_eq!(ok, 1000);
        assert_eq!(
            registry.mismatches.load(Ordering::SeqCst),
            0,
            "a request carried another tenant's token"
        );
        assert_eq!(registry.served.load(Ordering::SeqCst), 1000);
        let refreshes = registry.refreshes.lock().unwrap();
        assert_eq!(refreshes.len(), 50);
        // At most one refresh per token generation: each refresh of a tenant was handed the
        // token its previous refresh issued (the first none), never one a refresh had already
        // replaced.
        let handed = registry.handed.lock().unwrap();
        for (&tenant, stale) in handed.iter() {
            let chain: Vec<_> = (0..stale.len())
                .map(|i| (i > 0).then(|| format!("tenant{tenant}-gen{i}")))
                .collect();
            assert_eq!(*stale, chain, "tenant {tenant}");
        }
        // And one per generation a tenant needed, never one per request: the first, one per
        // revocation, and one per expiry (a token is used for at least 9/10 of its lifetime,
        // the leeway being a tenth of it), over however long this run took.
        let elapsed = started.elapsed();
        let total: usize = refreshes.values().sum();
        println!(
            "keyed mix: 1000 requests, 50 tenants, {total} refreshes, {} 401s replayed, {elapsed:?}",
            registry.rejected.load(Ordering::SeqCst)
        );
        for (&tenant, &n) in refreshes.iter() {
            let used = lifetime(tenant) * 9 / 10;
            let expiries = (elapsed.as_micros() / used.as_micros()) as usize;
            let bound = 1 + revoked.get(&tenant).copied().unwrap_or(0) + expiries;
            assert!(n <= bound, "tenant {tenant}: {n} refreshes, at most {bound} expected");
        }
    })
    .await;
}

fn echo() -> impl InMemoryApi<String> {
    service_fn(|req: Request<ReplayBody<Body>>| async move {
        Ok::<_, Infallible>(Response::new(authorization(req.headers())))
    })
}

fn for_tenant(t: u32) -> Request<Body> {
    let mut req = Request::get("/").body(Body::default()).unwrap();
    req.extensions_mut().insert(Tenant(t));
    req
}

#[tokio::test]
async fn a_slow_or_failing_tenant_never_delays_or_fails_another() {
    guard(async {
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(Mutex::new(HashMap::<u32, usize>::new()));
        let layer = {
            let (gate, calls) = (gate.clone(), calls.clone());
            KeyedRefreshLayer::new(move |tenant: Tenant, _| {
                *calls.lock().unwrap().entry(tenant.0).or_default() += 1;
                let gate = gate.clone();
                async move {
                    match tenant.0 {
                        // Tenant 1 is slow, then rejected.
                        1 => {
                            gate.acquire().await.unwrap().forget();
                            Err(RefreshError::terminal("invalid_grant"))
                        }
                        n => Ok(Token::bearer(format!("t{n}"))?),
                    }
                }
            })
        };
        let handle = layer.token_handle();
        let mut events = handle.subscribe();
        let svc = layer.layer(echo());

        let slow: Vec<_> = (0..20)
            .map(|_| tokio::spawn(svc.clone().oneshot(for_tenant(1))))
            .collect();
        tokio::task::yield_now().await;
        // Tenant 2 is served while tenant 1's refresh hangs.
        let res = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(for_tenant(2)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.body(), "Bearer t2");
        gate.add_permits(1);
        for s in slow {
            let err = s.await.unwrap().unwrap_err();
            assert!(err.is::<RefreshRejected>(), "{err}");
        }
        // Tenant 1's session ended; tenant 2 works on.
        assert!(
            svc.clone()
                .oneshot(for_tenant(1))
                .await
                .unwrap_err()
                .is::<SessionEnded>()
        );
        assert_eq!(
            svc.clone().oneshot(for_tenant(2)).await.unwrap().body(),
            "Bearer t2"
        );
        assert_eq!(calls.lock().unwrap()[&1], 1);
        assert_eq!(calls.lock().unwrap()[&2], 1);
        assert!(handle.key(&Tenant(1)).state().session_ended());
        assert!(!handle.key(&Tenant(2)).state().session_ended());

        let mut ended = Vec::new();
        while let Some(Ok((key, ev))) = events.try_recv() {
            if matches!(ev, RefreshEvent::SessionEnded { .. }) {
                ended.push(key);
            }
        }
        assert_eq!(ended, [Tenant(1)], "events carry their key");
    })
    .await;
}

#[tokio::test]
async fn per_key_handle_installs_and_forces_and_the_newest_token_wins() {
    guard(async {
        let n = Arc::new(AtomicUsize::new(0));
        // The stale token each refresh was handed.
        let stale = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
        let layer = {
            let (n, stale) = (n.clone(), stale.clone());
            KeyedRefreshLayer::new(move |tenant: Tenant, old: Option<Token>| {
                stale
                    .lock()
                    .unwrap()
                    .push(old.map(|t| t.secret().to_owned()));
                let i = n.fetch_add(1, Ordering::SeqCst) + 1;
                async move { Ok::<_, RefreshError>(Token::bearer(format!("t{}-r{i}", tenant.0))?) }
            })
        };
        let handle = layer.token_handle();
        let svc = layer.layer(echo());

        handle
            .key(&Tenant(3))
            .set_token(Token::bearer("t3-login").unwrap());
        assert_eq!(
            svc.clone().oneshot(for_tenant(3)).await.unwrap().body(),
            "Bearer t3-login"
        );
        // After a forced refresh the cell's newer token is used.
        let state = handle.key(&Tenant(3)).refresh().await.unwrap();
        assert_eq!(state.generation(), 2);
        assert_eq!(
            svc.clone().oneshot(for_tenant(3)).await.unwrap().body(),
            "Bearer t3-r1"
        );
        // The forced refresh was handed the installed token, and the cell now holds its result.
        assert_eq!(*stale.lock().unwrap(), [Some("t3-login".to_owned())]);
        assert_eq!(handle.key(&Tenant(3)).token().unwrap().secret(), "t3-r1");
        // Another key is untouched by all of this.
        assert_eq!(
            svc.clone().oneshot(for_tenant(4)).await.unwrap().body(),
            "Bearer t4-r2"
        );
        assert_eq!(handle.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn the_map_is_bounded_and_an_evicted_key_refreshes_anew() {
    guard(async {
        let calls = Arc::new(Mutex::new(HashMap::<u32, usize>::new()));
        let layer = {
            let calls = calls.clone();
            KeyedRefreshLayer::new(move |tenant: Tenant, _| {
                *calls.lock().unwrap().entry(tenant.0).or_default() += 1;
                async move { Ok::<_, RefreshError>(Token::bearer(format!("t{}", tenant.0))?) }
            })
            .capacity(3)
        };
        let handle = layer.token_handle();
        let svc = layer.layer(echo());
        for t in [1, 2, 3, 1, 4, 5, 1] {
            assert_eq!(
                *svc.clone().oneshot(for_tenant(t)).await.unwrap().body(),
                format!("Bearer t{t}")
            );
            assert!(handle.len() <= 3);
            // Distinct instants, so that "least recently used" is well defined.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        {
            let calls = calls.lock().unwrap();
            // 1 stayed in use (LRU keeps it); 2 and 3 were evicted for 4 and 5.
            assert_eq!(calls[&1], 1, "{calls:?}");
            assert_eq!(calls.values().sum::<usize>(), 5);
        }
        // An evicted key comes back with a fresh refresh.
        assert_eq!(
            svc.clone().oneshot(for_tenant(2)).await.unwrap().body(),
            "Bearer t2"
        );
        assert_eq!(calls.lock().unwrap()[&2], 2);
        assert!(handle.len() <= 3);
    })
    .await;
}

#[tokio::test]
async fn requests_without_a_key_fail_typed_or_use_the_default_principal() {
    guard(async {
        let refresher = |tenant: Tenant, _: Option<Token>| async move {
            Ok::<_, RefreshError>(Token::bearer(format!("t{}", tenant.0))?)
        };
        let strict = KeyedRefreshLayer::new(refresher).layer(echo());
        let err = strict
            .oneshot(Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap_err();
        assert!(err.is::<MissingKey>());

        // A request no cell would authenticate goes out untouched without a key, as through the
        // tower layer: a token request (say, a keyed refresher's, through the same stack), one
        // with its own `Authorization`, one the attach rule leaves alone. No cell is made.
        let strict = KeyedRefreshLayer::new(refresher)
            .attach_when(|head| head.uri().path() != "/public")
            .layer(echo());
        let mut token_request = Request::post("/token").body(Body::default()).unwrap();
        token_request
            .extensions_mut()
            .insert(tower_auth_refresh::TokenRequest);
        let res = strict.clone().oneshot(token_request).await.unwrap();
        assert_eq!(res.body(), "-", "no Authorization");
        let own = Request::get("/")
            .header(http::header::AUTHORIZATION, "Basic b3duOnNlY3JldA==")
            .body(Body::default())
            .unwrap();
        let res = strict.clone().oneshot(own).await.unwrap();
        assert_eq!(res.body(), "Basic b3duOnNlY3JldA==");
        let public = Request::get("/public").body(Body::default()).unwrap();
        let res = strict.clone().oneshot(public).await.unwrap();
        assert_eq!(res.body(), "-", "no Authorization");
        // Anything else still needs its key.
        let err = strict
            .oneshot(Request::get("/private").body(Body::default()).unwrap())
            .await
            .unwrap_err();
        assert!(err.is::<MissingKey>());

        // A destination no cell would send a token to goes out untouched without a key too: an
        // origin off the allow-list, or (without one) another origin than the first-seen one, once
        // that is bound. An origin not yet bound still needs the key (and binds nothing).
        let listed = KeyedRefreshLayer::new(refresher)
            .allowed_origins(["https://api.example"])
            .unwrap()
            .layer(echo());
        let cdn = Request::get("https://cdn.example/logo.png")
            .body(Body::default())
            .unwrap();
        let res = listed.clone().oneshot(cdn).await.unwrap();
        assert_eq!(res.body(), "-", "no Authorization");
        let err = listed
            .oneshot(
                Request::get("https://api.example/x")
                    .body(Body::default())
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert!(err.is::<MissingKey>());
        let first_seen = KeyedRefreshLayer::new(refresher).layer(echo());
        let unbound = Request::get("https://cdn.example/logo.png")
            .body(Body::default())
            .unwrap();
        let err = first_seen.clone().oneshot(unbound).await.unwrap_err();
        assert!(
            err.is::<MissingKey>(),
            "nothing bound yet: the key is needed"
        );
        let mut keyed = Request::get("https://api.example/x")
            .body(Body::default())
            .unwrap();
        keyed.extensions_mut().insert(Tenant(1));
        let res = first_seen.clone().oneshot(keyed).await.unwrap();
        assert_eq!(
            res.body(),
            "Bearer t1",
            "the first-seen origin is api.example"
        );
        let cdn = Request::get("https://cdn.example/logo.png")
            .body(Body::default())
            .unwrap();
        let res = first_seen.oneshot(cdn).await.unwrap();
        assert_eq!(
            res.body(),
            "-",
            "another origin than the bound one: untouched"
        );

        let lenient = KeyedRefreshLayer::new(refresher)
            .default_key(Tenant(0))
            .layer(echo());
        let res = lenient
            .oneshot(Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.body(), "Bearer t0");
    })
    .await;
}

/// Review item 3: a key's handle acts on the key's current cell on every call, also after
/// `remove` (and the requests that rebuilt the key's cell): a token installed through a handle
/// taken before `remove` is the one the next request carries, and its state is that cell's.
/// Keys whose session ended (a logout, a refused refresh token) do not keep their cells for
/// good: the map stays within its capacity, and an evicted ended key stays ended (its next
/// request fails fast without a refresh) until a token is installed for it.
#[tokio::test]
async fn ended_sessions_do_not_grow_the_map_and_stay_ended_when_evicted() {
    guard(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = {
            let calls = calls.clone();
            KeyedRefreshLayer::new(move |tenant: Tenant, _: Option<Token>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, RefreshError>(Token::bearer(format!("t{}", tenant.0))?) }
            })
            .capacity(4)
        };
        let handle = layer.token_handle();
        let svc = layer.layer(echo());
        for k in 0..1000 {
            handle.key(&Tenant(k)).clear();
        }
        assert!(
            handle.len() <= 4,
            "{} cells for a capacity of 4",
            handle.len()
        );
        // Key 0's cell was evicted long ago: still logged out, no refresher call.
        let err = svc.clone().oneshot(for_tenant(0)).await.unwrap_err();
        assert!(err.is::<SessionEnded>(), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // A login revives it.
        handle
            .key(&Tenant(0))
            .set_token(Token::bearer("t0-login").unwrap());
        assert_eq!(
            svc.clone().oneshot(for_tenant(0)).await.unwrap().body(),
            "Bearer t0-login"
        );
        // A key never seen refreshes as usual.
        assert_eq!(
            svc.oneshot(for_tenant(5000)).await.unwrap().body(),
            "Bearer t5000"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// A key in the cool-down of a failed refresh keeps its cell (and so its cool-down) when
/// other keys need the room: its next request fails fast instead of calling the token
/// endpoint again at once.
#[tokio::test]
async fn a_key_in_its_cool_down_is_not_evicted() {
    guard(async {
        let calls = Arc::new(Mutex::new(HashMap::<u32, usize>::new()));
        let layer = {
            let calls = calls.clone();
            KeyedRefreshLayer::new(move |tenant: Tenant, _: Option<Token>| {
                *calls.lock().unwrap().entry(tenant.0).or_default() += 1;
                async move {
                    if tenant.0 == 1 {
                        return Err(RefreshError::transient("503"));
                    }
                    Ok::<_, RefreshError>(Token::bearer(format!("t{}", tenant.0))?)
                }
            })
            .capacity(1)
            .retries(tower_auth_refresh::Backoff::none())
        };
        let svc = layer.layer(echo());
        assert!(svc.clone().oneshot(for_tenant(1)).await.is_err());
        // Another key needs the only place.
        assert_eq!(
            svc.clone().oneshot(for_tenant(2)).await.unwrap().body(),
            "Bearer t2"
        );
        // Key 1 is still cooling down: no second call.
        assert!(svc.clone().oneshot(for_tenant(1)).await.is_err());
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls[&1], 1, "{calls:?}");
    })
    .await;
}

/// A key's generation never goes back: a cell rebuilt after an eviction or `remove` starts
/// after every generation a cell of the layer had when it went (so events and
/// `state().generation()` per key keep increasing).
#[tokio::test]
async fn a_keys_generation_never_goes_back_when_its_cell_is_rebuilt() {
    guard(async {
        let layer = KeyedRefreshLayer::new(|tenant: Tenant, _: Option<Token>| async move {
            Ok::<_, RefreshError>(Token::bearer(format!("t{}", tenant.0))?)
        })
        .capacity(1);
        let handle = layer.token_handle();
        let svc = layer.layer(echo());
        // No handle kept between the steps: a live handle would keep the cell.
        let install = |secret: String| {
            handle
                .key(&Tenant(1))
                .set_token(Token::bearer(secret).unwrap())
        };
        let mut last = 0;
        for round in 0..3 {
            for n in 0..3 {
                let g = install(format!("one-{round}-{n}"));
                assert!(g > last, "round {round}: generation {g} after {last}");
                last = g;
            }
            // Another key's request takes the only place: key 1's cell is evicted.
            let res = svc.clone().oneshot(for_tenant(2)).await.unwrap();
            assert_eq!(res.body(), "Bearer t2");
            assert_eq!(handle.len(), 1, "key 1's cell was evicted");
            let g = handle.key(&Tenant(1)).state().generation();
            assert!(g >= last, "the rebuilt cell starts at {g}, before {last}");
        }
        let g = install("before-remove".into());
        assert!(g > last);
        last = g;
        assert!(handle.remove(&Tenant(1)));
        let g = install("after-remove".into());
        assert!(g > last, "after remove: generation {g} after {last}");
    })
    .await;
}

#[tokio::test]
async fn a_key_handle_taken_before_remove_acts_on_the_keys_new_cell() {
    guard(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = {
            let calls = calls.clone();
            KeyedRefreshLayer::new(move |tenant: Tenant, _| {
                let i = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move { Ok::<_, RefreshError>(Token::bearer(format!("t{}-r{i}", tenant.0))?) }
            })
        };
        let handle = layer.token_handle();
        let svc = layer.layer(echo());
        let send = |t: u32| {
            let svc = svc.clone();
            async move { svc.oneshot(for_tenant(t)).await.unwrap().into_body() }
        };

        let h = handle.key(&Tenant(5));
        h.set_token(Token::bearer("t5-login").unwrap());
        assert_eq!(send(5).await, "Bearer t5-login");

        // Removed, then installed through the handle taken before: no refresh, the new token.
        assert!(handle.remove(&Tenant(5)));
        h.set_token(Token::bearer("t5-after-remove").unwrap());
        assert_eq!(send(5).await, "Bearer t5-after-remove");
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        // Removed, then rebuilt by a request (a fresh refresh): the old handle sees that cell,
        // whose generations continue past the removed one's.
        let before = h.state().generation();
        assert!(handle.remove(&Tenant(5)));
        assert_eq!(send(5).await, "Bearer t5-r1");
        assert_eq!(h.token().unwrap().secret(), "t5-r1");
        assert_eq!(h.state().generation(), before + 2);
        h.set_token(Token::bearer("t5-again").unwrap());
        assert_eq!(send(5).await, "Bearer t5-again");
        h.invalidate();
        assert_eq!(send(5).await, "Bearer t5-r2");
        assert_eq!(handle.len(), 1);
    })
    .await;
}

/// Review A4: a key's `TokenHandle::subscribe` follows the cell current when it is called: it
/// ends (`None`) once that cell is evicted, while the layer lives on; the keyed handle's own
/// subscription follows every key.
#[tokio::test]
async fn a_key_subscription_ends_with_its_cell_and_the_keyed_one_goes_on() {
    guard(async {
        let layer = KeyedRefreshLayer::new(|tenant: Tenant, _: Option<Token>| async move {
            Ok::<_, RefreshError>(Token::bearer(format!("t{}", tenant.0))?)
        })
        .capacity(1);
        let handle = layer.token_handle();
        let mut keyed = handle.subscribe();
        let mut of_0 = handle.key(&Tenant(0)).subscribe();
        let svc = layer.layer(echo());
        let wait = Duration::from_secs(5);

        assert_eq!(
            svc.clone().oneshot(for_tenant(0)).await.unwrap().body(),
            "Bearer t0"
        );
        let first = tokio::time::timeout(wait, of_0.recv()).await.unwrap();
        assert!(
            matches!(first, Some(Ok(RefreshEvent::Refreshed { .. }))),
            "{first:?}"
        );
        // Tenant 1 evicts tenant 0's cell (capacity 1): the key's subscription ends.
        assert_eq!(
            svc.clone().oneshot(for_tenant(1)).await.unwrap().body(),
            "Bearer t1"
        );
        assert_eq!(handle.len(), 1);
        assert!(
            tokio::time::timeout(wait, of_0.recv())
                .await
                .unwrap()
                .is_none()
        );
        // The keyed subscription saw both keys, and sees tenant 0's new cell.
        svc.clone().oneshot(for_tenant(0)).await.unwrap();
        let mut keys = Vec::new();
        while let Some(Ok((key, ev))) = keyed.try_recv() {
            if matches!(ev, RefreshEvent::Refreshed { .. }) {
                keys.push(key.0);
            }
        }
        assert_eq!(keys, [0, 1, 0]);
    })
    .await;
}

/// Review item (this session): `KeyedStoreRefresher` passes a key's logout on to the refresher
/// it wraps, as `StoreRefresher` does for one token. It did not: a refresher that forgets a
/// key's refresh token at logout was never told, and a later refresh presented the stored
/// one again (the tenant logged back in silently).
#[tokio::test]
async fn a_keyed_store_refresher_passes_logout_on() {
    use tower_auth_refresh::RefreshContext;
    use tower_auth_refresh::keyed::KeyedRefresher;
    use tower_auth_refresh::store::{KeyedStoreRefresher, MemoryStore};

    #[derive(Clone, Default)]
    struct Tenants {
        logouts: Arc<Mutex<Vec<u32>>>,
    }
    impl KeyedRefresher<u32> for Tenants {
        type Future = std::future::Ready<Result<Token, RefreshError>>;
        fn refresh(&self, key: &u32, _ctx: RefreshContext) -> Self::Future {
            std::future::ready(Token::bearer(format!("t{key}")).map_err(Into::into))
        }
        fn logout(&self, key: &u32) {
            self.logouts.lock().unwrap().push(*key);
        }
    }

    let tenants = Tenants::default();
    let layer = KeyedRefreshLayer::new(KeyedStoreRefresher::new(tenants.clone(), |_: &u32| {
        MemoryStore::new()
    }));
    let handle = layer.token_handle();
    handle.key(&7).clear();
    handle.key(&3).clear();
    assert_eq!(*tenants.logouts.lock().unwrap(), [7, 3]);
}

/// An in-memory API that echoes the `Authorization` header and counts the requests it saw.
fn counting_echo(seen: Arc<AtomicUsize>) -> impl InMemoryApi<String> {
    service_fn(move |req: Request<ReplayBody<Body>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok::<_, Infallible>(Response::new(authorization(
            req.headers(),
        ))))
    })
}

/// A keyed refresher that refreshes a tenant only from its refresh token, as an OAuth 2
/// refresh-token grant does: tenant `t` needs a stale token carrying `rt-{t}` (or one of its
/// rotations, `rt-{t}-...`), and is refused terminally otherwise (`invalid_grant`: nothing to
/// refresh from). Records the refresh token each call was handed, per tenant, in order.
type Handed = Arc<Mutex<Vec<(u32, Option<String>)>>>;

fn refresh_token_grant(
    handed: Handed,
) -> impl Fn(Tenant, Option<Token>) -> std::future::Ready<Result<Token, RefreshError>>
+ Send
+ Sync
+ 'static {
    move |tenant: Tenant, stale: Option<Token>| {
        let rt = stale
            .as_ref()
            .and_then(|t| t.refresh_token())
            .map(str::to_owned);
        handed.lock().unwrap().push((tenant.0, rt.clone()));
        let n = tenant.0;
        std::future::ready(match rt {
            Some(rt) if rt == format!("rt-{n}") || rt.starts_with(&format!("rt-{n}-")) => {
                Token::bearer(format!("t{n}-refreshed"))
                    .map(|t| t.with_refresh_token(format!("{rt}-next")))
                    .map_err(RefreshError::from)
            }
            _ => Err(RefreshError::terminal("invalid_grant: no refresh token")),
        })
    }
}

/// Logs `tenant` in through its key handle with a token set (the crate's login pattern); the
/// key handle is dropped at once, so it does not pin the cell.
fn log_in<K: Clone + Send + 'static>(
    handle: &tower_auth_refresh::keyed::KeyedTokenHandle<K>,
    key: &K,
    access: &str,
    refresh: &str,
) {
    handle
        .key(key)
        .set_token(Token::bearer(access).unwrap().with_refresh_token(refresh));
}

/// Review (eviction of an active session): a key logged in through its handle with a token
/// set, whose cell is then evicted from a full map, lost its refresh token: the rebuilt cell
/// started empty and the refresher was handed no stale token, so a refresh-token refresher
/// could not refresh and the tenant was silently logged out. The rebuilt cell now hands the
/// refresher the evicted cell's last token, once.
#[tokio::test]
async fn an_evicted_keys_refresh_token_survives_its_eviction() {
    guard(async {
        let handed = Handed::default();
        let layer = KeyedRefreshLayer::new(refresh_token_grant(handed.clone())).capacity(1);
        let handle = layer.token_handle();
        let seen = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(counting_echo(seen.clone()));

        log_in(&handle, &Tenant(1), "t1-login", "rt-1");
        log_in(&handle, &Tenant(2), "t2-login", "rt-2");
        assert_eq!(handle.len(), 1, "key 2's login evicted key 1's cell");
        // Secrets never show in the Debug output of the layer, its service or the handle.
        let debug = format!("{layer:?} {handle:?}");
        assert!(
            !debug.contains("rt-1") && !debug.contains("t1-login"),
            "{debug}"
        );

        assert_eq!(
            svc.clone().oneshot(for_tenant(2)).await.unwrap().body(),
            "Bearer t2-login"
        );
        // Key 1's cell is rebuilt: no token, so it refreshes, from the evicted login's
        // refresh token.
        let res = svc.clone().oneshot(for_tenant(1)).await;
        let res = res.expect("key 1 refreshes from its remembered refresh token");
        assert_eq!(res.body(), "Bearer t1-refreshed");
        assert_eq!(*handed.lock().unwrap(), [(1, Some("rt-1".to_owned()))]);
        assert_eq!(seen.load(Ordering::SeqCst), 2);

        // Key 2 was evicted with its login, never used for a refresh: it refreshes from it.
        assert_eq!(
            svc.clone().oneshot(for_tenant(2)).await.unwrap().body(),
            "Bearer t2-refreshed"
        );
        // Key 1 again: its refreshed set (a rotated refresh token) was remembered in turn.
        assert_eq!(
            svc.clone().oneshot(for_tenant(1)).await.unwrap().body(),
            "Bearer t1-refreshed"
        );
        assert_eq!(
            *handed.lock().unwrap(),
            [
                (1, Some("rt-1".to_owned())),
                (2, Some("rt-2".to_owned())),
                (1, Some("rt-1-next".to_owned())),
            ]
        );
        assert_eq!(seen.load(Ordering::SeqCst), 4);

        // Handed over once: a remove forgets the key (and what was remembered for it); the
        // next cell of key 1 starts afresh, and is refused.
        log_in(&handle, &Tenant(3), "t3-login", "rt-3");
        assert!(!handle.remove(&Tenant(1)), "key 1's cell was evicted");
        let err = svc.clone().oneshot(for_tenant(1)).await.unwrap_err();
        assert!(err.is::<RefreshRejected>(), "{err}");
        assert_eq!(handed.lock().unwrap().last(), Some(&(1, None)));
        assert_eq!(seen.load(Ordering::SeqCst), 4);
    })
    .await;
}

/// What the handle does to a key after its cell was evicted with a token acts on the
/// remembered token as it would on the cell's: a login replaces it, a logout drops it for good
/// (an evicted logout stays a logout, and nothing brings the old refresh token back), an
/// invalidation keeps it for the next refresh.
#[tokio::test]
async fn the_handle_acts_on_an_evicted_keys_remembered_token_as_on_its_cell() {
    guard(async {
        let handed = Handed::default();
        let layer = KeyedRefreshLayer::new(refresh_token_grant(handed.clone())).capacity(1);
        let handle = layer.token_handle();
        let seen = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(counting_echo(seen.clone()));
        // Evicts whatever cell is in the map (key 9 needs no refresh: it is logged in).
        let evict = || log_in(&handle, &Tenant(9), "t9-login", "rt-9");

        // A login after the eviction replaces the remembered token.
        log_in(&handle, &Tenant(1), "t1-login", "rt-1");
        evict();
        log_in(&handle, &Tenant(1), "t1-relogin", "rt-1-relogin");
        evict();
        assert_eq!(
            svc.clone().oneshot(for_tenant(1)).await.unwrap().body(),
            "Bearer t1-refreshed"
        );
        assert_eq!(
            *handed.lock().unwrap(),
            [(1, Some("rt-1-relogin".to_owned()))]
        );

        // A logout after the eviction: the key stays logged out, evicted again or not, and
        // the remembered refresh token is gone for good.
        log_in(&handle, &Tenant(2), "t2-login", "rt-2");
        evict();
        handle.key(&Tenant(2)).clear();
        let err = svc.clone().oneshot(for_tenant(2)).await.unwrap_err();
        assert!(err.is::<SessionEnded>(), "{err}");
        evict();
        let err = svc.clone().oneshot(for_tenant(2)).await.unwrap_err();
        assert!(err.is::<SessionEnded>(), "{err}");
        handle.key(&Tenant(2)).invalidate();
        evict();
        // A forced refresh of the logged-out key is handed nothing (a logout keeps no token).
        let err = handle.key(&Tenant(2)).refresh().await.unwrap_err();
        assert!(err.is::<RefreshRejected>(), "{err}");
        assert_eq!(handed.lock().unwrap().last(), Some(&(2, None)));

        // An invalidation after the eviction keeps the remembered token for the refresh.
        log_in(&handle, &Tenant(3), "t3-login", "rt-3");
        evict();
        handle.key(&Tenant(3)).invalidate();
        evict();
        assert_eq!(
            svc.clone().oneshot(for_tenant(3)).await.unwrap().body(),
            "Bearer t3-refreshed"
        );
        assert_eq!(
            handed.lock().unwrap().last(),
            Some(&(3, Some("rt-3".to_owned())))
        );
        // Every request that reached the API carried a token; none of the refused ones did.
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// The tokens remembered for evicted keys are bounded (as many as the capacity, at least
/// 1,000 keys): past that, the oldest evicted key's token is forgotten, and that key behaves
/// as an evicted key always did (a fresh refresh, handed no token); later ones keep theirs.
/// (The bound was ten times the capacity, at least 10,000 whole token sets: ten times the
/// secrets of a full map, kept after their cells were evicted.)
#[tokio::test]
async fn remembered_tokens_of_evicted_keys_are_bounded_and_the_oldest_go_first() {
    guard(async {
        let handed = Handed::default();
        let layer = KeyedRefreshLayer::new(refresh_token_grant(handed.clone())).capacity(1);
        let handle = layer.token_handle();
        let seen = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(counting_echo(seen.clone()));
        // 1,000 keys remembered at most; 1,003 evicted (the last key keeps its cell).
        let keys = 1_004u32;
        for k in 0..keys {
            log_in(
                &handle,
                &Tenant(k),
                &format!("t{k}-login"),
                &format!("rt-{k}"),
            );
        }
        assert_eq!(handle.len(), 1);
        // Keys 0 to 2 were forgotten: refused, as without a refresh token. (Key 0's request
        // evicted the last key's cell, whose token is remembered in turn: key 3 is forgotten
        // too. An ended cell's eviction forgets no token.)
        for k in 0..3 {
            let err = svc.clone().oneshot(for_tenant(k)).await.unwrap_err();
            assert!(err.is::<RefreshRejected>(), "key {k}: {err}");
        }
        for k in [4, 500, keys - 2] {
            assert_eq!(
                *svc.clone().oneshot(for_tenant(k)).await.unwrap().body(),
                format!("Bearer t{k}-refreshed"),
                "key {k}"
            );
        }
        let err = svc.clone().oneshot(for_tenant(3)).await.unwrap_err();
        assert!(err.is::<RefreshRejected>(), "key 3: {err}");
        assert_eq!(
            *handed.lock().unwrap(),
            [
                (0, None),
                (1, None),
                (2, None),
                (4, Some("rt-4".to_owned())),
                (500, Some("rt-500".to_owned())),
                (keys - 2, Some(format!("rt-{}", keys - 2))),
                (3, None),
            ]
        );
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    })
    .await;
}

/// A token without a refresh token is not kept when its cell is evicted: nothing refreshes
/// from it, and it is a secret held for nothing. The rebuilt cell's refresh is handed no
/// token, as a key's first refresh is; a token set with a refresh token still is handed over.
/// (Every evicted token was kept, and handed to the rebuilt cell's refresh.)
#[tokio::test]
async fn an_evicted_token_without_a_refresh_token_is_not_kept() {
    guard(async {
        // Records the stale token each refresh was handed (its access token), per tenant.
        let handed = Handed::default();
        let refresher = {
            let handed = handed.clone();
            move |tenant: Tenant, stale: Option<Token>| {
                let stale = stale.map(|t| t.secret().to_owned());
                handed.lock().unwrap().push((tenant.0, stale));
                std::future::ready(
                    Token::bearer(format!("t{}-refreshed", tenant.0)).map_err(RefreshError::from),
                )
            }
        };
        let layer = KeyedRefreshLayer::new(refresher).capacity(1);
        let handle = layer.token_handle();
        let seen = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(counting_echo(seen.clone()));

        // Key 1: an access token alone; key 2's login evicts its cell.
        handle
            .key(&Tenant(1))
            .set_token(Token::bearer("t1-access-only").unwrap());
        log_in(&handle, &Tenant(2), "t2-login", "rt-2");
        assert_eq!(handle.len(), 1);
        assert_eq!(
            svc.clone().oneshot(for_tenant(1)).await.unwrap().body(),
            "Bearer t1-refreshed"
        );
        // Key 1's request evicted key 2's cell, whose login carries a refresh token.
        assert_eq!(
            svc.clone().oneshot(for_tenant(2)).await.unwrap().body(),
            "Bearer t2-refreshed"
        );
        assert_eq!(
            *handed.lock().unwrap(),
            [(1, None), (2, Some("t2-login".to_owned()))],
            "the evicted access token without a refresh token was kept and handed over"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// A token endpoint that rotates each tenant's refresh token at every use (RFC 9700):
/// tenant `t`'s current refresh token is `rt-{t}-{n}`, starting at `rt-{t}-0` (its login); a
/// spent one is refused (`invalid_grant`, terminal). Records every refresh token presented, per
/// tenant, in order. Clones share the endpoint.
#[derive(Clone, Default)]
struct RotatingEndpoint {
    issued: Arc<Mutex<HashMap<u32, u32>>>,
    presented: Handed,
}

impl RotatingEndpoint {
    /// The login set of tenant `t`, valid for an hour.
    fn login(t: u32) -> Token {
        Token::bearer(format!("a{t}-0"))
            .unwrap()
            .with_expires_in(Duration::from_secs(3600))
            .with_refresh_token(format!("rt-{t}-0"))
    }

    fn presented_by(&self, t: u32) -> Vec<Option<String>> {
        let presented = self.presented.lock().unwrap();
        let of_t = presented.iter().filter(|(k, _)| *k == t);
        of_t.map(|(_, rt)| rt.clone()).collect()
    }
}

impl tower_auth_refresh::keyed::KeyedRefresher<Tenant> for RotatingEndpoint {
    type Future = std::future::Ready<Result<Token, RefreshError>>;

    fn refresh(&self, key: &Tenant, ctx: tower_auth_refresh::RefreshContext) -> Self::Future {
        let t = key.0;
        let rt = ctx
            .stale()
            .and_then(Token::refresh_token)
            .map(str::to_owned);
        self.presented.lock().unwrap().push((t, rt.clone()));
        let mut issued = self.issued.lock().unwrap();
        let n = issued.entry(t).or_default();
        std::future::ready(if rt.as_deref() == Some(&format!("rt-{t}-{n}")) {
            *n += 1;
            Token::bearer(format!("a{t}-{n}"))
                .map(|a| {
                    a.with_expires_in(Duration::from_secs(3600))
                        .with_refresh_token(format!("rt-{t}-{n}"))
                })
                .map_err(RefreshError::from)
        } else {
            Err(RefreshError::terminal("invalid_grant: spent or unknown"))
        })
    }
}

/// A keyed refresher that records the refresh token of the stale token each refresh is
/// handed, per key, in order, and passes everything on to `inner` (`keeps_sessions` too).
struct RecordingStale<R> {
    inner: R,
    handed: Handed,
}

impl<R: tower_auth_refresh::keyed::KeyedRefresher<Tenant>>
    tower_auth_refresh::keyed::KeyedRefresher<Tenant> for RecordingStale<R>
{
    type Future = R::Future;

    fn refresh(&self, key: &Tenant, ctx: tower_auth_refresh::RefreshContext) -> R::Future {
        let rt = ctx
            .stale()
            .and_then(Token::refresh_token)
            .map(str::to_owned);
        self.handed.lock().unwrap().push((key.0, rt));
        self.inner.refresh(key, ctx)
    }

    fn logout(&self, key: &Tenant) {
        self.inner.logout(key);
    }

    fn keeps_sessions(&self) -> bool {
        self.inner.keeps_sessions()
    }
}

/// Review (eviction with a token store): the keyed layer handed an evicted cell's last token
/// to the rebuilt cell's refresh, also over a `KeyedStoreRefresher`. But the store holds the
/// key's session: other processes may have rotated its refresh token many times since, and
/// the store refresher takes a stale token whose refresh token it does not recognise (not one
/// it got from the store, nor one of the record's last `SUPERSEDED_KEPT` replaced ones) for a
/// new login and refreshes from it: the spent refresh token was presented (`invalid_grant`; an
/// RFC 9700 server revokes the token family, ending the session for every process). A
/// refresher that keeps the sessions itself now gets no token of an evicted key whose token
/// came from a refresh: the rebuilt cell takes the stored set over.
///
/// The evicted token here is one this process's refresh got (the login, stored at once by a
/// forced refresh), which its store refresher still recognises (it forgets one only after
/// 40,000 newer ones, for all keys), so it would follow the store even if handed it: the
/// stale tokens the refresher is handed are recorded, and the rebuilt cell's refresh must
/// get none. (This test's stand-in for a forgotten token was a login installed on both
/// processes, unseen by this one's refresher: an installed login that no refresh replaced is
/// now kept and handed over, as a store does not hold it; see
/// `an_evicted_login_is_not_replaced_by_another_users_stored_session`.)
#[tokio::test]
async fn an_evicted_key_of_a_keyed_store_refresher_takes_the_stored_session_over() {
    use tower_auth_refresh::keyed::KeyedRefresher;
    use tower_auth_refresh::store::{KeyedStoreRefresher, MemoryStore, SUPERSEDED_KEPT};
    use tower_auth_refresh::{RefreshContext, RefreshReason};

    guard(async {
        let endpoint = RotatingEndpoint::default();
        let stores: Vec<MemoryStore> = (0..3).map(|_| MemoryStore::new()).collect();
        let store_for = move |t: &Tenant| stores[t.0 as usize].clone();
        // This process (its stale tokens recorded), and another one (its own refresher: its
        // own memory) on the same store.
        let handed = Handed::default();
        let layer = KeyedRefreshLayer::new(RecordingStale {
            inner: KeyedStoreRefresher::new(endpoint.clone(), store_for.clone()),
            handed: handed.clone(),
        })
        .capacity(1);
        let other = KeyedStoreRefresher::new(endpoint.clone(), store_for);
        let handle = layer.token_handle();
        let seen = Arc::new(AtomicUsize::new(0));
        let svc = layer.layer(counting_echo(seen.clone()));

        // Tenant 1 logs in on this process, whose forced refresh stores the login at once;
        // this process uses the refreshed set.
        handle.key(&Tenant(1)).set_token(RotatingEndpoint::login(1));
        handle.key(&Tenant(1)).refresh().await.unwrap();
        assert_eq!(
            svc.clone().oneshot(for_tenant(1)).await.unwrap().body(),
            "Bearer a1-1"
        );
        // The other process adopts the stored set, then rotates it on past the record's
        // memory of replaced refresh tokens.
        let ctx = RefreshContext::new(None, RefreshReason::NoToken);
        let mut latest = other.refresh(&Tenant(1), ctx).await.unwrap();
        assert_eq!(latest.secret(), "a1-1");
        let rotations = SUPERSEDED_KEPT as u32 + 8;
        for _ in 0..rotations {
            let ctx = RefreshContext::new(Some(latest), RefreshReason::Expired);
            latest = other.refresh(&Tenant(1), ctx).await.unwrap();
        }
        assert_eq!(latest.secret(), format!("a1-{}", rotations + 1));

        // Tenant 2's login evicts tenant 1's idle cell (it held the refreshed set, `rt-1-1`
        // spent).
        log_in(&handle, &Tenant(2), "t2-login", "rt-2-0");
        assert_eq!(handle.len(), 1);
        // Tenant 1's rebuilt cell takes the stored set over: handed no token, no token call.
        let res = svc.clone().oneshot(for_tenant(1)).await;
        assert_eq!(
            *handed.lock().unwrap(),
            [(1, Some("rt-1-0".to_owned())), (1, None)],
            "the evicted token, from a refresh, was kept and handed over"
        );
        let presented = endpoint.presented_by(1);
        for spent in ["rt-1-0", "rt-1-1"] {
            assert_eq!(
                presented
                    .iter()
                    .filter(|rt| rt.as_deref() == Some(spent))
                    .count(),
                1,
                "the spent refresh token {spent} was presented again: {presented:?}"
            );
        }
        assert_eq!(presented.len(), rotations as usize + 1, "{presented:?}");
        let res = res.expect("tenant 1 goes on with the stored session");
        assert_eq!(*res.body(), format!("Bearer a1-{}", rotations + 1));
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// A token endpoint for tenant 1's users, who share no refresh token: `rt-{user}` (a login) or
/// `rt-{user}-{n}` is exchanged for `{user}-access-{n + 1}` and `rt-{user}-{n + 1}`, valid for an
/// hour; a refresh without a refresh token gets `t{tenant}-client` (no refresh token, as a
/// client-credentials grant). Records every refresh token presented, per tenant, in order.
fn users_endpoint(
    presented: Handed,
) -> impl Fn(Tenant, Option<Token>) -> std::future::Ready<Result<Token, RefreshError>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |tenant: Tenant, stale: Option<Token>| {
        let rt = stale
            .as_ref()
            .and_then(Token::refresh_token)
            .map(str::to_owned);
        presented.lock().unwrap().push((tenant.0, rt.clone()));
        let token = match rt {
            None => Token::bearer(format!("t{}-client", tenant.0)),
            Some(rt) => {
                let rest = rt
                    .strip_prefix("rt-")
                    .expect("a refresh token of this endpoint");
                let (user, n) = match rest.split_once('-') {
                    Some((user, n)) => (user.to_owned(), n.parse::<u32>().unwrap() + 1),
                    None => (rest.to_owned(), 1),
                };
                Token::bearer(format!("{user}-access-{n}")).map(|a| {
                    a.with_expires_in(Duration::from_secs(3600))
                        .with_refresh_token(format!("rt-{user}-{n}"))
                })
            }
        };
        std::future::ready(token.map_err(RefreshError::from))
    }
}

/// Review (a login evicted before its first refresh, with a token store): over a
/// `KeyedStoreRefresher` the keyed layer kept no token of an evicted cell, so a login
/// installed through the key's handle, which reaches the store only at its first refresh, was
/// lost when its cell was evicted before then: the rebuilt cell, handed no token, took over the
/// session stored for the key, another user's (user A's, stored by another process), and user
/// B's requests went out with user A's token. The layer now keeps an evicted cell's login that
/// no refresh replaced (the refresher never saw it) also for such a refresher, and hands it
/// once to the rebuilt cell's first refresh: the store refresher takes its unknown refresh
/// token for a new login, refreshes from it and stores it.
#[tokio::test]
async fn an_evicted_login_is_not_replaced_by_another_users_stored_session() {
    use tower_auth_refresh::keyed::KeyedRefresher;
    use tower_auth_refresh::store::{KeyedStoreRefresher, MemoryStore};
    use tower_auth_refresh::{RefreshContext, RefreshReason};

    guard(async {
        let presented = Handed::default();
        let endpoint = users_endpoint(presented.clone());
        let stores: Vec<MemoryStore> = (0..3).map(|_| MemoryStore::new()).collect();
        let store_for = move |t: &Tenant| stores[t.0 as usize].clone();
        // This process, and another one (its own refresher: its own memory) on the same store.
        let layer = KeyedRefreshLayer::new(KeyedStoreRefresher::new(
            endpoint.clone(),
            store_for.clone(),
        ))
        .capacity(1);
        let other = KeyedStoreRefresher::new(endpoint, store_for);
        let handle = layer.token_handle();
        // The API: records the authorization of every request, and echoes it.
        let api_saw = Arc::new(Mutex::new(Vec::<String>::new()));
        let svc = layer.layer(service_fn({
            let api_saw = api_saw.clone();
            move |req: Request<ReplayBody<Body>>| {
                let auth = authorization(req.headers());
                api_saw.lock().unwrap().push(auth.clone());
                std::future::ready(Ok::<_, Infallible>(Response::new(auth)))
            }
        }));

        // The other process stores user A's session for tenant 1 (a login: refreshed, stored).
        let user_a = Token::bearer("A-login").unwrap().with_refresh_token("rt-A");
        let ctx = RefreshContext::new(Some(user_a), RefreshReason::Expired);
        let stored_a = other.refresh(&Tenant(1), ctx).await.unwrap();
        assert_eq!(stored_a.secret(), "A-access-1");

        // This process: user B logs in for tenant 1 through the key's handle.
        let user_b = Token::bearer("B-login").unwrap().with_refresh_token("rt-B");
        handle.key(&Tenant(1)).set_token(user_b);
        // Tenant 2's request evicts tenant 1's cell before any refresh of it.
        assert_eq!(
            svc.clone().oneshot(for_tenant(2)).await.unwrap().body(),
            "Bearer t2-client"
        );
        assert_eq!(handle.len(), 1);

        // Tenant 1's rebuilt cell refreshes from user B's login, never adopts user A's set.
        let res = svc.clone().oneshot(for_tenant(1)).await.unwrap();
        assert_eq!(
            *presented.lock().unwrap(),
            [
                (1, Some("rt-A".to_owned())),
                (2, None),
                (1, Some("rt-B".to_owned())),
            ],
            "user B's login was not presented to the token endpoint; tenant 1's request went \
             out with {:?}",
            res.body()
        );
        assert_eq!(*res.body(), "Bearer B-access-1");
        let api_saw = api_saw.lock().unwrap().clone();
        assert!(
            !api_saw.iter().any(|auth| auth.contains("A-")),
            "user A's token went out for user B: {api_saw:?}"
        );
        assert_eq!(api_saw, ["Bearer t2-client", "Bearer B-access-1"]);
        // User B's login reached the store: the other process now adopts it.
        let ctx = RefreshContext::new(None, RefreshReason::NoToken);
        let adopted = other.refresh(&Tenant(1), ctx).await.unwrap();
        assert_eq!(adopted.secret(), "B-access-1");
        assert_eq!(presented.lock().unwrap().len(), 3);
    })
    .await;
}
