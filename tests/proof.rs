//! The proof-of-possession hook (`RequestProof`, the base of DPoP): every send that carries the
//! token gets a fresh proof, a refused proof is answered by one replay with the same token and
//! a new proof (never a refresh), and a proof that cannot be made fails the request unsent.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use tower::{Layer, ServiceExt, service_fn};
use tower_auth_refresh::error::{ProofFailed, UnauthorizedAfterRefresh};
use tower_auth_refresh::{
    BoxError, RefreshError, RefreshLayer, ReplayBody, RequestProof, Token, refresh_fn,
};

use support::guard;

/// Numbers each proof; the server wants a proof numbered at least `min`.
#[derive(Debug, Default)]
struct Numbered {
    next: AtomicU64,
    fail: bool,
}

impl RequestProof for Numbered {
    fn prove(&self, _: &Method, _: &Uri, headers: &mut HeaderMap) -> Result<(), BoxError> {
        if self.fail {
            return Err("the signer is unavailable".into());
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        headers.insert("x-proof", HeaderValue::from(n));
        Ok(())
    }

    fn wants_new_proof(&self, _: &Uri, status: StatusCode, headers: &HeaderMap) -> bool {
        status == StatusCode::UNAUTHORIZED && headers.contains_key("x-new-proof")
    }
}

type Seen = Arc<Mutex<Vec<(String, Option<u64>, String)>>>;

/// Accepts `Bearer good` with a proof numbered `min` or more; asks for a new proof otherwise.
fn api(
    seen: Seen,
    min: u64,
) -> impl tower::Service<
    Request<ReplayBody<String>>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |req: Request<ReplayBody<String>>| {
        let seen = seen.clone();
        async move {
            let auth = req.headers()[AUTHORIZATION].to_str().unwrap().to_owned();
            let proof = req
                .headers()
                .get("x-proof")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let body = String::from_utf8(
                http_body_util::BodyExt::collect(req.into_body())
                    .await
                    .unwrap()
                    .to_bytes()
                    .to_vec(),
            )
            .unwrap();
            seen.lock().unwrap().push((auth.clone(), proof, body));
            let mut res = Response::new(String::new());
            if auth != "Bearer good" {
                *res.status_mut() = StatusCode::UNAUTHORIZED;
            } else if proof.is_none_or(|p| p < min) {
                *res.status_mut() = StatusCode::UNAUTHORIZED;
                res.headers_mut()
                    .insert("x-new-proof", HeaderValue::from_static("use_dpop_nonce"));
            }
            Ok::<_, Infallible>(res)
        }
    })
}

fn layer(calls: &Arc<AtomicUsize>, proof: Numbered) -> RefreshLayer {
    let calls = calls.clone();
    RefreshLayer::new(refresh_fn(move |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, RefreshError>(Token::bearer("good")?) }
    }))
    .initial_token(Token::bearer("good").unwrap())
    .proof(proof)
}

fn post() -> Request<String> {
    Request::post("/orders")
        .body("{\"n\":1}".to_owned())
        .unwrap()
}

#[tokio::test]
async fn a_refused_proof_is_replayed_once_with_the_same_token_and_a_new_proof() {
    guard(async {
        let (seen, calls) = (Seen::default(), Arc::new(AtomicUsize::new(0)));
        let svc = layer(&calls, Numbered::default()).layer(api(seen.clone(), 1));
        let res = svc.oneshot(post()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "one extra send");
        assert_eq!(seen[0].1, Some(0));
        assert_eq!(seen[1].1, Some(1), "a new proof, never the same one");
        assert!(
            seen.iter()
                .all(|s| s.0 == "Bearer good" && s.2 == "{\"n\":1}")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0, "never a refresh");
    })
    .await;
}

#[tokio::test]
async fn a_proof_refused_again_is_a_typed_error_not_a_loop() {
    guard(async {
        let (seen, calls) = (Seen::default(), Arc::new(AtomicUsize::new(0)));
        let svc = layer(&calls, Numbered::default()).layer(api(seen.clone(), u64::MAX));
        let err = svc.oneshot(post()).await.unwrap_err();
        let twice = err
            .downcast_ref::<UnauthorizedAfterRefresh>()
            .unwrap_or_else(|| panic!("{err}"));
        assert!(twice.proof_refused(), "no refresh ran");
        assert!(
            err.to_string()
                .ends_with("again after a new proof of possession"),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn a_proof_that_cannot_be_made_fails_the_request_unsent() {
    guard(async {
        let (seen, calls) = (Seen::default(), Arc::new(AtomicUsize::new(0)));
        let proof = Numbered {
            fail: true,
            ..Numbered::default()
        };
        let svc = layer(&calls, proof).layer(api(seen.clone(), 0));
        let err = svc.oneshot(post()).await.unwrap_err();
        assert!(err.is::<ProofFailed>(), "{err}");
        assert!(seen.lock().unwrap().is_empty());
    })
    .await;
}
