//! The keyed layer honours the per-token options (origins, refresh trigger, replayable methods,
//! refresh-ahead) for every key, and its bounded map never loses what must stay: a refresh in
//! flight, a logged-out key, a key whose handle is kept; it keeps its capacity whenever a cell
//! it looks at can go, and idle keys lose their second chance.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::WWW_AUTHENTICATE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_auth_refresh::error::SessionEnded;
use tower_auth_refresh::keyed::{KeyedRefresh, KeyedRefreshLayer, KeyedRefresher};
use tower_auth_refresh::{BoxError, RefreshError, ReplayBody, ReplayMethods, Token};

use support::{InMemoryApi, authorization, guard, http_client, run_paused, serve};

type Body = Full<Bytes>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Tenant(u32);

/// Refresher calls per tenant, with the most that ran at once.
#[derive(Clone, Default)]
struct Calls {
    total: Arc<Mutex<HashMap<u32, usize>>>,
    running: Arc<Mutex<HashMap<u32, usize>>>,
    most_at_once: Arc<Mutex<HashMap<u32, usize>>>,
}

impl Calls {
    /// Records the start of a call for `t`; returns its number (1-based).
    fn start(&self, t: u32) -> usize {
        let running = {
            let mut running = self.running.lock().unwrap();
            let r = running.entry(t).or_default();
            *r += 1;
            *r
        };
        let mut most = self.most_at_once.lock().unwrap();
        let m = most.entry(t).or_default();
        *m = (*m).max(running);
        let mut total = self.total.lock().unwrap();
        let n = total.entry(t).or_default();
        *n += 1;
        *n
    }

    fn end(&self, t: u32) {
        *self.running.lock().unwrap().get_mut(&t).unwrap() -= 1;
    }

    fn of(&self, t: u32) -> usize {
        self.total.lock().unwrap().get(&t).copied().unwrap_or(0)
    }

    fn most_at_once(&self, t: u32) -> usize {
        self.most_at_once
            .lock()
            .unwrap()
            .get(&t)
            .copied()
            .unwrap_or(0)
    }
}

/// A keyed refresher issuing `t<tenant>-gen<n>`, living `lifetime` if given. Calls for tenants
/// in `held` wait for a permit of `gate` first.
fn issuer(
    calls: &Calls,
    lifetime: Option<Duration>,
    gate: Option<(Arc<Semaphore>, u32)>,
) -> impl KeyedRefresher<Tenant> {
    let calls = calls.clone();
    move |tenant: Tenant, _stale: Option<Token>| {
        let calls = calls.clone();
        let gate = gate.clone();
        let n = calls.start(tenant.0);
        async move {
            if let Some((gate, held)) = gate {
                if held == tenant.0 {
                    gate.acquire().await.unwrap().forget();
                }
            }
            calls.end(tenant.0);
            let token = Token::bearer(format!("t{}-gen{n}", tenant.0))?;
            Ok::<_, RefreshError>(match lifetime {
                Some(l) => token.with_expires_in(l),
                None => token,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loopback servers.

/// What a server saw: (tenant header, method, authorization), in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, Method, String)>>>);

impl Log {
    fn auths(&self, tenant: u32) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| *t == tenant.to_string())
            .map(|(_, _, a)| a.clone())
            .collect()
    }

    fn methods(&self, tenant: u32) -> Vec<Method> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| *t == tenant.to_string())
            .map(|(_, m, _)| m.clone())
            .collect()
    }
}

/// Serves `rule(tenant, authorization)`, recording each request.
async fn api<F>(rule: F) -> (SocketAddr, Log)
where
    F: Fn(u32, &str) -> Response<Body> + Clone + Send + Sync + 'static,
{
    let log = Log::default();
    let addr = serve({
        let log = log.clone();
        move |req: Request<Incoming>| {
            let tenant = req
                .headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            let auth = authorization(req.headers());
            log.0
                .lock()
                .unwrap()
                .push((tenant.clone(), req.method().clone(), auth.clone()));
            let res = rule(tenant.parse().unwrap_or(u32::MAX), &auth);
            async move {
                // Read the request body, as a real API would, before answering.
                let _ = req.into_body().collect().await;
                res
            }
        }
    })
    .await;
    (addr, log)
}

fn status(status: StatusCode) -> Response<Body> {
    let mut res = Response::new(Body::default());
    *res.status_mut() = status;
    res
}

/// 200 for the tenant's `gen1` token (the first one issued), else 401.
fn accepts_gen1(tenant: u32, auth: &str) -> Response<Body> {
    if auth == format!("Bearer t{tenant}-gen1") {
        status(StatusCode::OK)
    } else {
        let mut res = status(StatusCode::UNAUTHORIZED);
        res.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
        );
        res
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    ReplayBody<Body>,
>;

/// The keyed layer over a hyper-util client, the key taken from the `x-tenant` header.
fn over_http<R: KeyedRefresher<Tenant>>(
    layer: KeyedRefreshLayer<Tenant, R>,
) -> KeyedRefresh<Client, Tenant, R> {
    let layer = layer.key_fn(|parts| {
        parts
            .headers
            .get("x-tenant")?
            .to_str()
            .ok()?
            .parse()
            .ok()
            .map(Tenant)
    });
    ServiceBuilder::new()
        .layer(layer)
        .service(http_client::<ReplayBody<Body>>())
}

fn tenant_request(
    method: Method,
    addr: SocketAddr,
    tenant: u32,
    body: &'static str,
) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}/r"))
        .header("x-tenant", tenant.to_string())
        .body(Body::from(body))
        .unwrap()
}

async fn send<R: KeyedRefresher<Tenant>>(
    svc: &KeyedRefresh<Client, Tenant, R>,
    req: Request<Body>,
) -> Result<StatusCode, BoxError> {
    Ok(svc.clone().oneshot(req).await?.status())
}

#[tokio::test]
async fn keyed_layer_sends_tokens_only_to_allowed_origins() {
    guard(async {
        let (allowed, allowed_log) = api(accepts_gen1).await;
        let (other, other_log) = api(accepts_gen1).await;
        let calls = Calls::default();
        let layer = KeyedRefreshLayer::new(issuer(&calls, None, None))
            .allowed_origins([format!("http://{allowed}")])
            .unwrap();
        let svc = over_http(layer);

        for tenant in [1, 2] {
            // The other origin first: it must not become "the first origin seen".
            let res = send(&svc, tenant_request(Method::GET, other, tenant, "")).await;
            assert_eq!(res.unwrap(), StatusCode::UNAUTHORIZED, "returned as it is");
            let res = send(&svc, tenant_request(Method::GET, allowed, tenant, "")).await;
            assert_eq!(res.unwrap(), StatusCode::OK);
            assert_eq!(
                allowed_log.auths(tenant),
                [format!("Bearer t{tenant}-gen1")]
            );
            assert_eq!(other_log.auths(tenant), ["-"], "no token, no replay");
            assert_eq!(calls.of(tenant), 1, "the foreign 401 triggered no refresh");
        }
    })
    .await;
}

/// Without an allow-list, the token goes only to the first origin the *layer* saw: not to
/// a second origin for another key, and not after the key's cell was evicted and rebuilt.
#[tokio::test]
async fn keyed_default_origin_is_the_first_origin_the_layer_saw_even_after_eviction() {
    guard(async {
        let (first, first_log) = api(accepts_gen1).await;
        let (second, second_log) = api(accepts_gen1).await;
        let calls = Calls::default();
        let svc = over_http(KeyedRefreshLayer::new(issuer(&calls, None, None)).capacity(1));

        let res = send(&svc, tenant_request(Method::GET, first, 1, "")).await;
        assert_eq!(res.unwrap(), StatusCode::OK);
        // Another key, another origin: no token.
        let res = send(&svc, tenant_request(Method::GET, second, 2, "")).await;
        assert_eq!(res.unwrap(), StatusCode::UNAUTHORIZED);
        assert_eq!(second_log.auths(2), ["-"]);
        // Tenant 2 on the first origin evicts tenant 1 (capacity 1); tenant 1's rebuilt cell
        // still may not send its token anywhere else.
        let res = send(&svc, tenant_request(Method::GET, first, 2, "")).await;
        assert_eq!(res.unwrap(), StatusCode::OK);
        let res = send(&svc, tenant_request(Method::GET, second, 1, "")).await;
        assert_eq!(res.unwrap(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            second_log.auths(1),
            ["-"],
            "a token leaked after an eviction"
        );
        assert_eq!(first_log.auths(1), ["Bearer t1-gen1"]);
        assert_eq!(first_log.auths(2), ["Bearer t2-gen1"]);
    })
    .await;
}

#[tokio::test]
async fn keyed_layer_refreshes_on_a_custom_trigger() {
    guard(async {
        // This API says "expired" with a 403 and a header; `/r` of tenant 9 is a plain 403.
        let (addr, log) = api(|tenant, auth: &str| {
            if tenant != 9 && auth == format!("Bearer t{tenant}-gen1") {
                return status(StatusCode::OK);
            }
            let mut res = status(StatusCode::FORBIDDEN);
            if tenant != 9 {
                res.headers_mut()
                    .insert("x-token-expired", HeaderValue::from_static("1"));
            }
            res
        })
        .await;
        let calls = Calls::default();
        let layer =
            KeyedRefreshLayer::new(issuer(&calls, None, None)).refresh_on(|status, headers| {
                status == StatusCode::FORBIDDEN && headers.contains_key("x-token-expired")
            });
        let handle = layer.token_handle();
        for tenant in [1, 2, 9] {
            handle
                .key(&Tenant(tenant))
                .set_token(Token::bearer(format!("old-{tenant}")).unwrap());
        }
        let svc = over_http(layer);

        for tenant in [1, 2] {
            let res = send(&svc, tenant_request(Method::GET, addr, tenant, "")).await;
            assert_eq!(res.unwrap(), StatusCode::OK);
            assert_eq!(
                log.auths(tenant),
                [
                    format!("Bearer old-{tenant}"),
                    format!("Bearer t{tenant}-gen1")
                ],
                "refreshed once and replayed once"
            );
            assert_eq!(calls.of(tenant), 1);
        }
        // A 403 without the header is an answer, not a trigger.
        let res = send(&svc, tenant_request(Method::GET, addr, 9, "")).await;
        assert_eq!(res.unwrap(), StatusCode::FORBIDDEN);
        assert_eq!(log.auths(9), ["Bearer old-9"]);
        assert_eq!(calls.of(9), 0);

        // Without the custom trigger, the same 403 goes back to the caller.
        let calls = Calls::default();
        let plain = KeyedRefreshLayer::new(issuer(&calls, None, None));
        plain
            .token_handle()
            .key(&Tenant(3))
            .set_token(Token::bearer("old-3").unwrap());
        let svc = over_http(plain);
        let res = send(&svc, tenant_request(Method::GET, addr, 3, "")).await;
        assert_eq!(res.unwrap(), StatusCode::FORBIDDEN);
        assert_eq!(log.auths(3), ["Bearer old-3"]);
        assert_eq!(calls.of(3), 0);
    })
    .await;
}

#[tokio::test]
async fn keyed_layer_replays_only_idempotent_methods_when_asked() {
    guard(async {
        let (addr, log) = api(accepts_gen1).await;
        let calls = Calls::default();
        let layer = KeyedRefreshLayer::new(issuer(&calls, None, None))
            .replay_methods(ReplayMethods::Idempotent);
        let handle = layer.token_handle();
        for tenant in [1, 2] {
            handle
                .key(&Tenant(tenant))
                .set_token(Token::bearer("stale").unwrap());
        }
        let svc = over_http(layer);

        // A POST's 401 is returned, not replayed (the refresh still runs, for later requests).
        let res = send(&svc, tenant_request(Method::POST, addr, 1, "order #1")).await;
        assert_eq!(res.unwrap(), StatusCode::UNAUTHORIZED);
        assert_eq!(log.auths(1), ["Bearer stale"]);
        assert_eq!(calls.of(1), 1);
        let res = send(&svc, tenant_request(Method::POST, addr, 1, "order #1")).await;
        assert_eq!(
            res.unwrap(),
            StatusCode::OK,
            "the caller's retry has the new token"
        );
        assert_eq!(log.auths(1), ["Bearer stale", "Bearer t1-gen1"]);
        assert_eq!(log.methods(1), [Method::POST, Method::POST]);

        // A GET is replayed.
        let res = send(&svc, tenant_request(Method::GET, addr, 2, "")).await;
        assert_eq!(res.unwrap(), StatusCode::OK);
        assert_eq!(log.auths(2), ["Bearer stale", "Bearer t2-gen1"]);
        assert_eq!(log.methods(2), [Method::GET, Method::GET]);
        assert_eq!(calls.of(2), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// In-memory: refresh-ahead on a paused clock, and the bounded map.

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

/// The `Authorization` the in-memory API saw for one request of `tenant`.
async fn auth_of<S>(svc: &S, tenant: u32) -> Result<String, BoxError>
where
    S: tower::Service<Request<Body>, Response = Response<String>, Error = BoxError> + Clone,
{
    Ok(svc.clone().oneshot(for_tenant(tenant)).await?.into_body())
}

#[test]
fn keyed_refresh_ahead_starts_one_background_refresh_per_key() {
    run_paused(Duration::from_secs(3600), async {
        let calls = Calls::default();
        let lifetime = Duration::from_secs(600);
        // Each refresh takes a second (of paused time), so requests inside the window overlap it.
        let slow = {
            let calls = calls.clone();
            move |tenant: Tenant, _stale: Option<Token>| {
                let calls = calls.clone();
                let n = calls.start(tenant.0);
                async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    calls.end(tenant.0);
                    Ok::<_, RefreshError>(
                        Token::bearer(format!("t{}-gen{n}", tenant.0))?.with_expires_in(lifetime),
                    )
                }
            }
        };
        let layer = KeyedRefreshLayer::new(slow).refresh_ahead(Duration::from_secs(120));
        let svc = layer.layer(echo());

        for t in 1..=3 {
            assert_eq!(auth_of(&svc, t).await.unwrap(), format!("Bearer t{t}-gen1"));
        }
        // 100 s before expiry: inside the 120 s window, outside the 30 s leeway.
        tokio::time::advance(Duration::from_secs(500)).await;
        for _ in 0..5 {
            for t in 1..=3 {
                // The still-valid token goes out at once while the refresh runs.
                assert_eq!(auth_of(&svc, t).await.unwrap(), format!("Bearer t{t}-gen1"));
            }
            // Let the background refreshes (tasks of their own) start and sleep.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        for t in 1..=3 {
            assert_eq!(calls.of(t), 2, "one background refresh for tenant {t}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for t in 1..=3 {
            assert_eq!(auth_of(&svc, t).await.unwrap(), format!("Bearer t{t}-gen2"));
            assert_eq!(calls.of(t), 2);
        }
    });
}

#[tokio::test]
async fn a_key_whose_refresh_is_in_flight_is_not_evicted() {
    guard(async {
        let calls = Calls::default();
        let gate = Arc::new(Semaphore::new(0));
        let layer =
            KeyedRefreshLayer::new(issuer(&calls, None, Some((gate.clone(), 0)))).capacity(2);
        let svc = layer.layer(echo());

        // Tenant 0's refresh hangs; its only request is dropped: the refresh goes on alone.
        let first = tokio::spawn({
            let svc = svc.clone();
            async move { auth_of(&svc, 0).await }
        });
        for _ in 0..10_000 {
            if calls.of(0) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(calls.of(0), 1);
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());

        // Many other keys go through the full map.
        for t in 1..=20 {
            assert_eq!(auth_of(&svc, t).await.unwrap(), format!("Bearer t{t}-gen1"));
        }

        // Tenant 0 joins the refresh still in flight: no second concurrent refresh.
        let second = tokio::spawn({
            let svc = svc.clone();
            async move { auth_of(&svc, 0).await }
        });
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            calls.of(0),
            1,
            "tenant 0's cell was rebuilt while refreshing"
        );
        gate.add_permits(2);
        assert_eq!(second.await.unwrap().unwrap(), "Bearer t0-gen1");
        assert_eq!(calls.of(0), 1);
        assert_eq!(calls.most_at_once(0), 1);
    })
    .await;
}

#[tokio::test]
async fn a_logged_out_key_stays_ended_after_many_other_keys() {
    guard(async {
        let calls = Calls::default();
        let layer = KeyedRefreshLayer::new(issuer(&calls, None, None)).capacity(2);
        let handle = layer.token_handle();
        let svc = layer.layer(echo());

        assert_eq!(auth_of(&svc, 0).await.unwrap(), "Bearer t0-gen1");
        handle.key(&Tenant(0)).clear();
        for t in 1..=50 {
            auth_of(&svc, t).await.unwrap();
        }
        assert!(handle.len() <= 3, "the map stays bounded: {}", handle.len());
        for _ in 0..3 {
            let err = auth_of(&svc, 0).await.unwrap_err();
            assert!(err.is::<SessionEnded>(), "{err}");
        }
        assert_eq!(calls.of(0), 1, "never refreshed after the logout");
        assert!(handle.key(&Tenant(0)).state().session_ended());
    })
    .await;
}

#[tokio::test]
async fn a_kept_handle_acts_on_the_keys_current_cell() {
    guard(async {
        let calls = Calls::default();
        let layer = KeyedRefreshLayer::new(issuer(&calls, None, None)).capacity(2);
        let handle = layer.token_handle();
        let svc = layer.layer(echo());

        let kept = handle.key(&Tenant(0));
        assert_eq!(auth_of(&svc, 0).await.unwrap(), "Bearer t0-gen1");
        for t in 1..=50 {
            auth_of(&svc, t).await.unwrap();
        }
        kept.set_token(Token::bearer("installed-0").unwrap());
        assert_eq!(auth_of(&svc, 0).await.unwrap(), "Bearer installed-0");
        assert_eq!(calls.of(0), 1);
        // The kept handle pinned tenant 0's cell through the 50 other keys: the installed
        // token is that cell's second generation (a rebuilt cell would be at its first).
        assert_eq!(kept.state().generation(), 2);
        assert!(handle.len() <= 3, "the map stays bounded: {}", handle.len());
    })
    .await;
}

/// Review A1: when every queued cell was used again since it was queued, each got its second
/// chance and the walk ended without evicting: the map grew past its capacity although no cell
/// was busy. The least recently used one goes now.
#[test]
fn a_full_map_evicts_even_when_every_cell_was_used_again() {
    run_paused(Duration::from_secs(3600), async {
        let calls = Calls::default();
        let layer = KeyedRefreshLayer::new(issuer(&calls, None, None)).capacity(2);
        let handle = layer.token_handle();
        let svc = layer.layer(echo());
        auth_of(&svc, 0).await.unwrap();
        auth_of(&svc, 1).await.unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        auth_of(&svc, 0).await.unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        auth_of(&svc, 1).await.unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(auth_of(&svc, 2).await.unwrap(), "Bearer t2-gen1");
        assert_eq!(handle.len(), 2, "the map kept its capacity");
        tokio::time::advance(Duration::from_millis(10)).await;
        // Tenant 1, used last, was kept; tenant 0, the least recently used, was evicted.
        assert_eq!(auth_of(&svc, 1).await.unwrap(), "Bearer t1-gen1");
        assert_eq!(auth_of(&svc, 0).await.unwrap(), "Bearer t0-gen2");
        assert_eq!((calls.of(0), calls.of(1), calls.of(2)), (2, 1, 1));
        assert_eq!(handle.len(), 2);
    });
}

/// A cell idle for the idle timeout loses its second chance: the stale cell goes instead of a
/// fresh one.
#[test]
fn an_idle_key_loses_its_second_chance() {
    run_paused(Duration::from_secs(3600), async {
        /// Tenant 0 fills half a map of two and is used once more soon after, then idles past a
        /// minute; then tenant 1 arrives (not used again since), then tenant 2 needs room. Then
        /// tenant `kept`, then tenant `evicted` sends a request; returns the refresher calls of
        /// each (1 if its cell was kept).
        async fn scenario(
            idle_timeout: Option<Duration>,
            kept: u32,
            evicted: u32,
        ) -> (usize, usize) {
            let calls = Calls::default();
            let mut layer = KeyedRefreshLayer::new(issuer(&calls, None, None)).capacity(2);
            if let Some(idle) = idle_timeout {
                layer = layer.idle_timeout(idle);
            }
            let handle = layer.token_handle();
            let svc = layer.layer(echo());
            auth_of(&svc, 0).await.unwrap();
            tokio::time::advance(Duration::from_millis(10)).await;
            auth_of(&svc, 0).await.unwrap();
            tokio::time::advance(Duration::from_secs(61)).await;
            auth_of(&svc, 1).await.unwrap();
            auth_of(&svc, 2).await.unwrap();
            assert_eq!(handle.len(), 2, "one cell was evicted for tenant 2");
            // A request for a kept key creates no cell, so it evicts nothing.
            auth_of(&svc, kept).await.unwrap();
            auth_of(&svc, evicted).await.unwrap();
            assert_eq!(handle.len(), 2);
            (calls.of(kept), calls.of(evicted))
        }

        // Idle for more than the 60 s timeout: tenant 0 is evicted, the fresh tenant 1 is kept.
        assert_eq!(scenario(Some(Duration::from_secs(60)), 1, 0).await, (1, 2));
        // With the default 30 minutes, tenant 0 (used after it was queued) keeps its second
        // chance, and tenant 1, not used since it was queued, goes.
        assert_eq!(scenario(None, 0, 1).await, (1, 2));
    });
}

/// Review A3: a map grown past its capacity while every cell it looked at was pinned (here by
/// live handles) shrinks back once they can be evicted: each new key then evicts up to two.
#[tokio::test]
async fn a_map_grown_past_its_capacity_by_pinned_cells_shrinks_back() {
    guard(async {
        let calls = Calls::default();
        let layer = KeyedRefreshLayer::new(issuer(&calls, None, None)).capacity(2);
        let handle = layer.token_handle();
        let svc = layer.layer(echo());
        let held: Vec<_> = (0..5).map(|t| handle.key(&Tenant(t))).collect();
        assert_eq!(handle.len(), 5, "every cell is held: none can go");
        drop(held);
        for t in 10..13 {
            assert_eq!(auth_of(&svc, t).await.unwrap(), format!("Bearer t{t}-gen1"));
        }
        assert_eq!(handle.len(), 2);
    })
    .await;
}

/// A layer clock frozen at the instant it was made.
#[derive(Debug)]
struct Frozen(tokio::time::Instant);

impl tower_auth_refresh::Clock for Frozen {
    fn now(&self) -> tokio::time::Instant {
        self.0
    }
}

/// Review item (this session): a key cooling down after a failed refresh is not evicted while
/// its cool-down holds on the layer's clock, the clock it was set on. Eviction read Tokio's
/// clock instead: with a layer clock behind Tokio's, a key still cooling down was evicted
/// and its rebuilt cell called the token endpoint again at once.
#[test]
fn a_key_cooling_down_on_the_layers_clock_is_not_evicted() {
    run_paused(Duration::from_secs(3600), async {
        let calls = Calls::default();
        let refresher = {
            let calls = calls.clone();
            move |tenant: Tenant, _stale: Option<Token>| {
                calls.start(tenant.0);
                calls.end(tenant.0);
                async move {
                    if tenant.0 == 1 {
                        return Err(RefreshError::transient(std::io::Error::other("down")));
                    }
                    Ok(Token::bearer(format!("t{}", tenant.0))?)
                }
            }
        };
        let layer = KeyedRefreshLayer::new(refresher)
            .capacity(1)
            .retries(tower_auth_refresh::Backoff::none())
            .cooldown(tower_auth_refresh::Cooldown::new(
                Duration::from_secs(30),
                Duration::from_secs(30),
            ))
            .clock(Frozen(tokio::time::Instant::now()));
        let handle = layer.token_handle();
        let svc = layer.layer(echo());
        assert!(auth_of(&svc, 1).await.is_err(), "tenant 1's refresh fails");
        assert_eq!(calls.of(1), 1);
        // Tokio's clock moves past the cool-down; the layer's does not.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(auth_of(&svc, 2).await.unwrap(), "Bearer t2");
        assert_eq!(handle.len(), 2, "tenant 1, cooling down, was kept");
        assert!(auth_of(&svc, 1).await.is_err(), "still cooling down");
        assert_eq!(calls.of(1), 1, "no second token call during the cool-down");
    });
}
