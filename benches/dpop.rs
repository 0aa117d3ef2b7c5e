//! DPoP: the cost of one proof (ES256 signature, JSON and base64url encoding), and of one
//! request through the layer with and without a proof.
//!
//! Lines, in one run:
//!
//! - `proof/sign_only`: [`Es256Key::sign`](DpopSigner::sign) of a proof's signing input (the
//!   ECDSA P-256 signature alone);
//! - `proof/sign_and_encode`: [`Dpop::proof`] for a GET with `ath` and a nonce: what every
//!   proven send adds;
//! - `layer/bearer`: a GET through the layer with a valid token, no proof;
//! - `layer/dpop`: the same with a `DPoP` token and the [`Dpop`] proof.
//!
//! The inner service is in memory and answers at once (`200` with a proof, `204` without); each request is driven with a
//! no-op waker (`poll_ready`, `call`, one `poll` that must be `Ready`).
//!
//! ```text
//! cargo bench --bench dpop --features dpop
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use tower::{Layer, Service, service_fn};
use tower_auth_refresh::dpop::{DPOP, DPOP_NONCE, Dpop, DpopSigner, Es256Key};
use tower_auth_refresh::{RefreshError, RefreshLayer, ReplayBody, RequestProof, Token, refresh_fn};

const URI: &str = "https://api.example/orders/42?page=2";

fn layer(token: Token) -> RefreshLayer {
    RefreshLayer::new(refresh_fn(|_| async {
        Err::<Token, _>(RefreshError::terminal("no refresh in this bench"))
    }))
    .initial_token(token)
}

/// Sends one GET through `svc`; the inner service must answer at once.
fn send<S>(svc: &mut S, req: Request<Full<Bytes>>) -> StatusCode
where
    S: Service<Request<Full<Bytes>>, Response = Response<String>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let fut = pin!(svc.call(req));
    match fut.poll(&mut cx) {
        Poll::Ready(Ok(res)) => res.status(),
        other => panic!(
            "the in-memory service answers at once: {:?}",
            other.is_ready()
        ),
    }
}

fn benches(c: &mut Criterion) {
    let key = Es256Key::generate();
    let dpop = Dpop::new(key.clone());
    let uri: Uri = URI.parse().unwrap();
    let mut nonce = HeaderMap::new();
    nonce.insert(DPOP_NONCE, HeaderValue::from_static("bench-nonce"));
    dpop.wants_new_proof(&uri, StatusCode::OK, &nonce);

    let input = dpop.proof(&Method::GET, &uri, Some("bench-token")).unwrap();
    let input = &input[..input.rfind('.').unwrap()];
    c.bench_function("proof/sign_only", |b| {
        b.iter(|| black_box(key.sign(input.as_bytes()).unwrap()))
    });
    c.bench_function("proof/sign_and_encode", |b| {
        b.iter(|| black_box(dpop.proof(&Method::GET, &uri, Some("bench-token")).unwrap()))
    });

    let inner = service_fn(|req: Request<ReplayBody<Full<Bytes>>>| {
        // 200 with a proof, 204 without: checked once before measuring.
        let mut res = Response::new(String::new());
        if !req.headers().contains_key(DPOP) {
            *res.status_mut() = StatusCode::NO_CONTENT;
        }
        async { Ok::<_, Infallible>(res) }
    });
    let mut group = c.benchmark_group("layer");
    let mut bearer = layer(Token::bearer("bench-token").unwrap()).layer(inner);
    let mut proven = layer(Token::with_scheme("DPoP", "bench-token").unwrap())
        .proof(dpop.clone())
        .layer(inner);
    let request = || Request::get(URI).body(Full::default()).unwrap();
    assert_eq!(send(&mut bearer, request()), StatusCode::NO_CONTENT);
    assert_eq!(send(&mut proven, request()), StatusCode::OK);
    group.bench_function("bearer", |b| {
        b.iter_batched(request, |req| send(&mut bearer, req), BatchSize::SmallInput)
    });
    group.bench_function("dpop", |b| {
        b.iter_batched(request, |req| send(&mut proven, req), BatchSize::SmallInput)
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
