//! DPoP (RFC 9449) end to end on loopback: a token server and a resource server that verify
//! every proof and require their nonce, and a client (the layer over hyper-util, refreshing
//! through the OAuth 2.0 refresher) whose token expires. Prints the requests, the nonce
//! retries and the refreshes, then exits.
//!
//! ```text
//! cargo run --example dpop --features dpop
//! ```

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::{EncodedPoint, FieldBytes};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::dpop::{Dpop, Es256Key};
use tower_auth_refresh::oauth2::OAuth2Refresher;
use tower_auth_refresh::{RefreshLayer, ReplayBody, Token};

const TOKEN_NONCE: &str = "token-server-nonce";
const API_NONCE: &str = "api-nonce";

/// What both servers share: the jtis seen, and the tokens issued (token → key thumbprint).
#[derive(Default)]
struct State {
    jtis: Mutex<HashSet<String>>,
    tokens: Mutex<HashMap<String, String>>,
    token_calls: AtomicUsize,
    nonce_retries: AtomicUsize,
    api_sends: AtomicUsize,
}

fn b64json(part: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// Verifies a proof; `Ok(thumbprint of its key)`, or the error to answer.
fn verify(
    state: &State,
    headers: &HeaderMap,
    htm: &str,
    htu: &str,
    token: Option<&str>,
    nonce: &str,
) -> Result<String, &'static str> {
    let jwt = headers
        .get("dpop")
        .and_then(|v| v.to_str().ok())
        .ok_or("invalid_dpop_proof")?;
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("invalid_dpop_proof");
    };
    let (header, claims) = (
        b64json(h).ok_or("invalid_dpop_proof")?,
        b64json(c).ok_or("invalid_dpop_proof")?,
    );
    let jwk = &header["jwk"];
    let coordinate = |name: &str| {
        let bytes = URL_SAFE_NO_PAD.decode(jwk[name].as_str()?).ok()?;
        let mut field = FieldBytes::default();
        (bytes.len() == 32).then(|| field.copy_from_slice(&bytes))?;
        Some(field)
    };
    let (x, y) = (
        coordinate("x").ok_or("invalid_dpop_proof")?,
        coordinate("y").ok_or("invalid_dpop_proof")?,
    );
    let key =
        VerifyingKey::from_encoded_point(&EncodedPoint::from_affine_coordinates(&x, &y, false))
            .map_err(|_| "invalid_dpop_proof")?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .and_then(|s| Signature::from_slice(&s).ok())
        .ok_or("invalid_dpop_proof")?;
    key.verify(format!("{h}.{c}").as_bytes(), &signature)
        .map_err(|_| "invalid_dpop_proof")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ath = token.map(|t| URL_SAFE_NO_PAD.encode(Sha256::digest(t.as_bytes())));
    let fresh = claims["iat"]
        .as_u64()
        .is_some_and(|iat| iat.abs_diff(now) <= 60);
    if header["typ"] != "dpop+jwt"
        || claims["htm"] != htm
        || claims["htu"] != htu
        || !fresh
        || claims.get("ath").and_then(Value::as_str) != ath.as_deref()
    {
        return Err("invalid_dpop_proof");
    }
    let jti = claims["jti"].as_str().ok_or("invalid_dpop_proof")?;
    if !state.jtis.lock().unwrap().insert(jti.to_owned()) {
        return Err("invalid_dpop_proof");
    }
    if claims["nonce"] != nonce {
        return Err("use_dpop_nonce");
    }
    let canonical = json!({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]});
    Ok(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.to_string().as_bytes())))
}

fn respond(status: StatusCode, nonce: &'static str, body: Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut()
        .insert("dpop-nonce", HeaderValue::from_static(nonce));
    res
}

async fn token_endpoint(
    state: Arc<State>,
    htu: String,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    state.token_calls.fetch_add(1, Ordering::SeqCst);
    match verify(&state, req.headers(), "POST", &htu, None, TOKEN_NONCE) {
        Ok(jkt) => {
            let n = state.tokens.lock().unwrap().len() + 1;
            let token = format!("access-{n}");
            state.tokens.lock().unwrap().insert(token.clone(), jkt);
            println!("  token server: issued a DPoP token bound to the client's key");
            respond(
                StatusCode::OK,
                TOKEN_NONCE,
                json!({"access_token": token, "token_type": "DPoP", "expires_in": 3600}),
            )
        }
        Err(error) => {
            println!("  token server: 400 {error}");
            respond(
                StatusCode::BAD_REQUEST,
                TOKEN_NONCE,
                json!({"error": error}),
            )
        }
    }
}

async fn api(state: Arc<State>, origin: String, req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.api_sends.fetch_add(1, Ordering::SeqCst);
    let htu = format!("{origin}{}", req.uri().path());
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("DPoP "))
        .map(str::to_owned);
    let bound = token
        .as_deref()
        .and_then(|t| state.tokens.lock().unwrap().get(t).cloned());
    let result = match (&token, bound) {
        (Some(token), Some(jkt)) => {
            match verify(&state, req.headers(), "GET", &htu, Some(token), API_NONCE) {
                Ok(key) if key == jkt => Ok(()),
                Ok(_) => Err("invalid_token"),
                Err(error) => Err(error),
            }
        }
        _ => Err("invalid_token"),
    };
    match result {
        Ok(()) => respond(StatusCode::OK, API_NONCE, json!({"orders": []})),
        Err(error) => {
            if error == "use_dpop_nonce" {
                state.nonce_retries.fetch_add(1, Ordering::SeqCst);
            }
            let mut res = respond(StatusCode::UNAUTHORIZED, API_NONCE, json!({}));
            res.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::try_from(format!("DPoP error=\"{error}\"")).unwrap(),
            );
            res
        }
    }
}

/// Serves `handler` on 127.0.0.1:0; returns the origin.
async fn serve<F, Fut>(handler: F) -> String
where
    F: Fn(String, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let served = origin.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (handler, origin) = (handler.clone(), served.clone());
            let svc = hyper::service::service_fn(move |req| {
                let fut = handler(origin.clone(), req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    origin
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let state = Arc::new(State::default());
    let token_origin = serve({
        let state = state.clone();
        move |origin: String, req| token_endpoint(state.clone(), format!("{origin}/token"), req)
    })
    .await;
    let api_origin = serve({
        let state = state.clone();
        move |origin, req| api(state.clone(), origin, req)
    })
    .await;
    println!("token server {token_origin}/token, API {api_origin}/orders");

    // One key and one nonce memory, shared by the refresher and the layer.
    let dpop = Dpop::new(Es256Key::generate());
    println!("client key thumbprint (jkt): {}", dpop.thumbprint());
    let refresher = OAuth2Refresher::builder(
        format!("{token_origin}/token").parse()?,
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>(),
    )
    .refresh_token("example-refresh-token")
    .dpop(dpop.clone())
    .build()?;
    // The stored access token has expired: the layer refreshes before the first send.
    let expired = Token::with_scheme("DPoP", "expired")?
        .with_expires_at(SystemTime::now() - Duration::from_secs(1));
    let client = ServiceBuilder::new()
        .layer(
            RefreshLayer::new(refresher)
                .initial_token(expired)
                .proof(dpop),
        )
        .service(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());

    for round in 1..=3 {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let req = Request::get(format!("{api_origin}/orders?page={round}"))
                .body(Full::<Bytes>::default())?;
            tasks.push(tokio::spawn(client.clone().oneshot(req)));
        }
        for task in tasks {
            let res = task.await??;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            println!("round {round}: {status} {}", String::from_utf8_lossy(&body));
        }
    }
    let refreshes = state.tokens.lock().unwrap().len();
    println!(
        "12 requests: {} sends to the API ({} nonce retries), {} token requests, {refreshes} refresh",
        state.api_sends.load(Ordering::SeqCst),
        state.nonce_retries.load(Ordering::SeqCst),
        state.token_calls.load(Ordering::SeqCst),
    );
    Ok(())
}
