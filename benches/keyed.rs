//! Per-request cost of the keyed layer with 1, 100 and 10,000 keys, beside the
//! single-token `Refresh` as a reference, all with valid tokens and an in-memory inner service.
//!
//! Each request is driven by hand with a no-op waker (`poll_ready`, `call`, one `poll` that
//! must be `Ready`), cycling through the keys so that every lookup hits an existing cell.
//!
//! `keyed_new_key`: the cost of a request for a key the map has never seen while the map is
//! full, at capacity 64 and 10,000 (one eviction, one new cell and its first refresh, driven on
//! a current-thread runtime), and of the map step alone (`KeyedTokenHandle::key` for a new key).
//! Eviction is a second-chance queue, so both capacities should cost the same.
//!
//! ```sh
//! cargo bench --bench keyed
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_auth_refresh::keyed::KeyedRefreshLayer;
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, Token, refresh_fn};

type Body = Full<Bytes>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Tenant(u32);

fn inner()
-> impl Service<Request<ReplayBody<Body>>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|_req: Request<ReplayBody<Body>>| async {
        Ok::<_, Infallible>(Response::new(String::new()))
    })
}

/// One request, driven to completion without a runtime; panics if it is not immediate.
fn drive<S>(svc: &mut S, req: Request<Body>)
where
    S: Service<Request<Body>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let fut = pin!(svc.call(req));
    match fut.poll(&mut cx) {
        Poll::Ready(Ok(res)) => drop(black_box(res)),
        other => panic!("not immediate: {:?}", other.map(|r| r.map(|_| ()))),
    }
}

fn keyed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("keyed");

    let mut single = RefreshLayer::new(refresh_fn(|_| async {
        Err::<Token, _>(RefreshError::terminal(
            "no refresh expected in this benchmark",
        ))
    }))
    .initial_token(Token::bearer("single-token").unwrap())
    .layer(inner());
    group.bench_function("single_token", |b| {
        b.iter_batched(
            || {
                Request::get("https://api.test/")
                    .body(Body::default())
                    .unwrap()
            },
            |req| drive(&mut single, req),
            BatchSize::SmallInput,
        )
    });

    for keys in [1u32, 100, 10_000] {
        let layer = KeyedRefreshLayer::new(|_: Tenant, _: Option<Token>| async {
            Err::<Token, _>(RefreshError::terminal(
                "no refresh expected in this benchmark",
            ))
        })
        .capacity(keys as usize);
        let handle = layer.token_handle();
        for k in 0..keys {
            handle
                .key(&Tenant(k))
                .set_token(Token::bearer(format!("token-{k}")).unwrap());
        }
        let mut svc = layer.layer(inner());
        let mut next = 0u32;
        group.bench_function(format!("keys_{keys}"), |b| {
            b.iter_batched(
                || {
                    next = (next + 7919) % keys;
                    let mut req = Request::get("https://api.test/")
                        .body(Body::default())
                        .unwrap();
                    req.extensions_mut().insert(Tenant(next));
                    req
                },
                |req| drive(&mut svc, req),
                BatchSize::SmallInput,
            )
        });
        assert_eq!(
            handle.len(),
            keys as usize,
            "every key kept its cell: no refresh happened"
        );
    }
    group.finish();
}

fn new_key(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("keyed_new_key");
    for capacity in [64u32, 10_000] {
        let layer = KeyedRefreshLayer::new(|t: Tenant, _: Option<Token>| async move {
            Token::bearer(format!("token-{}", t.0)).map_err(RefreshError::from)
        })
        .capacity(capacity as usize);
        let handle = layer.token_handle();
        for k in 0..capacity {
            handle
                .key(&Tenant(k))
                .set_token(Token::bearer(format!("token-{k}")).unwrap());
        }
        let svc = layer.layer(inner());
        let mut next = capacity;
        group.bench_function(format!("request_capacity_{capacity}"), |b| {
            b.iter_batched(
                || {
                    next += 1;
                    let mut req = Request::get("https://api.test/")
                        .body(Body::default())
                        .unwrap();
                    req.extensions_mut().insert(Tenant(next));
                    req
                },
                |req| {
                    let res = rt.block_on(svc.clone().oneshot(req));
                    drop(black_box(res.expect("a new key gets its token")));
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_function(format!("map_only_capacity_{capacity}"), |b| {
            b.iter(|| {
                next += 1;
                drop(black_box(handle.key(&Tenant(next))));
            })
        });
        assert_eq!(
            handle.len(),
            capacity as usize,
            "every new key evicted one old key"
        );
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    keyed(&mut c);
    new_key(&mut c);
    c.final_summary();
}
