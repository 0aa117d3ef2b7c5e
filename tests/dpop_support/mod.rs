//! Loopback servers that verify DPoP proofs (RFC 9449 §4.3) for real: the signature against
//! the `jwk` in the proof's header (p256 `VerifyingKey`), `typ`, `alg`, `htm`, `htu`, `ath`,
//! `iat` within a window, `jti` never seen before, the server's `nonce`, and the binding of the
//! access token to the key's thumbprint. The token server requires a nonce (its first answer
//! is `400 use_dpop_nonce`); so does the resource server (`401` with `WWW-Authenticate: DPoP
//! error="use_dpop_nonce"`). The resource server checks the token before the proof unless told
//! to check the proof first ([`ApiOptions::proof_first`]).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::{EncodedPoint, FieldBytes};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower_auth_refresh::dpop::PublicJwk;

use crate::support::{Server, response, serve_scoped};

/// How far `iat` may be from the server's clock.
const IAT_WINDOW_SECS: u64 = 60;

/// What a verified proof said.
#[derive(Debug, Clone)]
pub(crate) struct Proof {
    pub(crate) jti: String,
    pub(crate) jkt: String,
    pub(crate) nonce: Option<String>,
    pub(crate) claims: Value,
}

/// Checks proofs; remembers every `jti` it accepted.
#[derive(Debug, Default)]
pub(crate) struct Verifier {
    jtis: Mutex<HashSet<String>>,
}

fn b64json(part: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| "proof part is not base64url".to_owned())?;
    serde_json::from_slice(&bytes).map_err(|_| "proof part is not JSON".to_owned())
}

fn coordinate(jwk: &Value, name: &str) -> Result<FieldBytes, String> {
    let text = jwk[name].as_str().ok_or(format!("jwk has no {name}"))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| format!("jwk {name} is not base64url"))?;
    if bytes.len() != 32 {
        return Err(format!("jwk {name} is not 32 bytes"));
    }
    let mut field = FieldBytes::default();
    field.copy_from_slice(&bytes);
    Ok(field)
}

/// The claims of the request's proof, unverified (for the record).
pub(crate) fn claims_of(headers: &HeaderMap) -> Option<Value> {
    let jwt = headers.get("dpop")?.to_str().ok()?;
    b64json(jwt.split('.').nth(1)?).ok()
}

/// The claims of a proof JWT, unverified (for the record).
pub(crate) fn claims_of_jwt(jwt: &str) -> Option<Value> {
    b64json(jwt.split('.').nth(1)?).ok()
}

/// The `jti` of the request's proof, unverified (for the record).
pub(crate) fn jti_of(headers: &HeaderMap) -> Option<String> {
    Some(claims_of(headers)?["jti"].as_str()?.to_owned())
}

/// base64url(SHA-256(token)).
pub(crate) fn ath(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

impl Verifier {
    /// Verifies the request's single `DPoP` proof for `method` `htu`, with `ath` for
    /// `token` (none when `token` is `None`) and `nonce` when one is required.
    pub(crate) fn verify(
        &self,
        headers: &HeaderMap,
        method: &Method,
        htu: &str,
        token: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<Proof, String> {
        let mut proofs = headers.get_all("dpop").iter();
        let jwt = proofs.next().ok_or("no DPoP proof")?;
        if proofs.next().is_some() {
            return Err("more than one DPoP proof".into());
        }
        let jwt = jwt.to_str().map_err(|_| "proof is not ASCII")?;
        let parts: Vec<&str> = jwt.split('.').collect();
        let [header_b64, claims_b64, signature_b64] = parts[..] else {
            return Err("proof is not a compact JWS".into());
        };
        let header = b64json(header_b64)?;
        if header["typ"] != "dpop+jwt" {
            return Err("typ is not dpop+jwt".into());
        }
        if header["alg"] != "ES256" {
            return Err("alg is not ES256".into());
        }
        let jwk = &header["jwk"];
        if jwk["kty"] != "EC" || jwk["crv"] != "P-256" || jwk.get("d").is_some() {
            return Err("jwk is not a public EC P-256 key".into());
        }
        let (x, y) = (coordinate(jwk, "x")?, coordinate(jwk, "y")?);
        let point = EncodedPoint::from_affine_coordinates(&x, &y, false);
        let key = VerifyingKey::from_encoded_point(&point).map_err(|_| "jwk is not on P-256")?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| "signature is not base64url")?;
        let signature = Signature::from_slice(&signature).map_err(|_| "signature is not r||s")?;
        let signing_input = format!("{header_b64}.{claims_b64}");
        key.verify(signing_input.as_bytes(), &signature)
            .map_err(|_| "bad signature")?;

        let claims = b64json(claims_b64)?;
        if claims["htm"] != method.as_str() {
            return Err(format!("htm {} is not {method}", claims["htm"]));
        }
        if claims["htu"] != htu {
            return Err(format!("htu {} is not {htu}", claims["htu"]));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let iat = claims["iat"].as_u64().ok_or("no iat")?;
        if iat.abs_diff(now) > IAT_WINDOW_SECS {
            return Err("iat outside the window".into());
        }
        match (token, claims.get("ath")) {
            (None, None) => {}
            (Some(token), Some(Value::String(got))) if *got == ath(token) => {}
            (None, Some(_)) => return Err("ath in a token request".into()),
            _ => return Err("ath does not match the access token".into()),
        }
        // Every signed proof spends its jti, even one refused for want of the nonce.
        let jti = claims["jti"].as_str().ok_or("no jti")?.to_owned();
        if jti.len() < 16 {
            return Err("jti too short".into());
        }
        if !self.jtis.lock().unwrap().insert(jti.clone()) {
            return Err("jti reused".into());
        }
        let got_nonce = claims.get("nonce").and_then(Value::as_str);
        if let Some(want) = nonce {
            if got_nonce != Some(want) {
                return Err("use_dpop_nonce".into());
            }
        }
        let jkt = PublicJwk::Ec {
            crv: "P-256".into(),
            x: jwk["x"].as_str().unwrap().into(),
            y: jwk["y"].as_str().unwrap().into(),
        }
        .thumbprint();
        Ok(Proof {
            jti,
            jkt,
            nonce: got_nonce.map(str::to_owned),
            claims,
        })
    }
}

/// The access tokens the token server issued, with the key thumbprint each is bound to
/// (`None`: a Bearer token) and whether it has expired.
#[derive(Debug, Default)]
pub(crate) struct Issued {
    tokens: Mutex<HashMap<String, (Option<String>, bool)>>,
}

impl Issued {
    pub(crate) fn insert(&self, token: &str, jkt: Option<String>, expired: bool) {
        self.tokens
            .lock()
            .unwrap()
            .insert(token.to_owned(), (jkt, expired));
    }

    fn get(&self, token: &str) -> Option<(Option<String>, bool)> {
        self.tokens.lock().unwrap().get(token).cloned()
    }
}

/// How the token server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenType {
    /// `token_type: DPoP`, bound to the proof's key.
    Dpop,
    /// `token_type: Bearer`, not bound, even though a proof came.
    Bearer,
}

/// Token server counts.
#[derive(Debug, Default)]
pub(crate) struct TokenStats {
    /// Token requests received.
    pub(crate) calls: AtomicUsize,
    /// `use_dpop_nonce` refusals sent.
    pub(crate) nonce_refusals: AtomicUsize,
    /// Access tokens issued.
    pub(crate) issued: AtomicUsize,
    /// Proofs refused for another reason (with the reasons).
    pub(crate) refused: Mutex<Vec<String>>,
    /// How many of the next token requests to refuse with `400 invalid_dpop_proof` before
    /// looking at their proof, as a server does that finds the client's clock (`iat`) off.
    pub(crate) refuse_proofs: AtomicUsize,
}

/// A token endpoint at `/token` (refresh-token and client-credentials grants) that requires
/// a DPoP proof with its nonce `nonce` (`None`: a new nonce in every answer, none ever
/// accepted), and issues `at-1`, `at-2`, ...
pub(crate) async fn token_server(
    verifier: Arc<Verifier>,
    issued: Arc<Issued>,
    stats: Arc<TokenStats>,
    nonce: Option<&'static str>,
    token_type: TokenType,
) -> Server {
    let addr = Arc::new(Mutex::new(String::new()));
    let rotation = Arc::new(AtomicUsize::new(0));
    let server = serve_scoped({
        let addr = addr.clone();
        move |req: Request<Incoming>| {
            let (verifier, issued, stats, addr, rotation) = (
                verifier.clone(),
                issued.clone(),
                stats.clone(),
                addr.clone(),
                rotation.clone(),
            );
            async move {
                stats.calls.fetch_add(1, Ordering::SeqCst);
                let (want, give) = match nonce {
                    Some(n) => (n.to_owned(), HeaderValue::from_static(n)),
                    None => {
                        let n = rotation.fetch_add(1, Ordering::SeqCst) + 1;
                        let give = HeaderValue::try_from(format!("t-{n}")).unwrap();
                        ("never".to_owned(), give)
                    }
                };
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let form: HashMap<String, String> =
                    form_urlencoded::parse(&body).into_owned().collect();
                let htu = format!("http://{}/token", addr.lock().unwrap());
                let json = |status, value: Value| {
                    let mut res = response(status, value.to_string());
                    res.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    res.headers_mut().insert("dpop-nonce", give.clone());
                    res
                };
                let grant = form.get("grant_type").map(String::as_str);
                if !matches!(grant, Some("refresh_token" | "client_credentials")) {
                    return json(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "unsupported_grant_type"}),
                    );
                }
                let refuse =
                    stats
                        .refuse_proofs
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                if refuse.is_ok() {
                    let reason = "iat outside the window".to_owned();
                    stats.refused.lock().unwrap().push(reason.clone());
                    return json(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "invalid_dpop_proof", "error_description": reason}),
                    );
                }
                let proof =
                    match verifier.verify(&parts.headers, &parts.method, &htu, None, Some(&want)) {
                        Ok(proof) => proof,
                        Err(reason) if reason == "use_dpop_nonce" => {
                            stats.nonce_refusals.fetch_add(1, Ordering::SeqCst);
                            return json(
                                StatusCode::BAD_REQUEST,
                                json!({"error": "use_dpop_nonce",
                                       "error_description": "send the nonce"}),
                            );
                        }
                        Err(reason) => {
                            stats.refused.lock().unwrap().push(reason.clone());
                            return json(
                                StatusCode::BAD_REQUEST,
                                json!({"error": "invalid_dpop_proof", "error_description": reason}),
                            );
                        }
                    };
                let n = stats.issued.fetch_add(1, Ordering::SeqCst) + 1;
                let access = format!("at-{n}");
                let (bound, kind) = match token_type {
                    TokenType::Dpop => (Some(proof.jkt), "DPoP"),
                    TokenType::Bearer => (None, "Bearer"),
                };
                issued.insert(&access, bound, false);
                json(
                    StatusCode::OK,
                    json!({"access_token": access, "token_type": kind, "expires_in": 3600}),
                )
            }
        }
    })
    .await;
    *addr.lock().unwrap() = server.addr.to_string();
    server
}

/// How the resource server treats nonces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NonceMode {
    /// One fixed nonce, sent in every response and required in every proof.
    Fixed(&'static str),
    /// A new nonce in every response, none ever accepted (so a replay is challenged again).
    AlwaysNew,
    /// A nonce that changes with every success: each 200 hands out the next one, which the
    /// next proof must carry (every other answer repeats the current one).
    NextOnSuccess,
    /// A malformed `DPoP-Nonce` (`"` is not an NQCHAR) with every challenge.
    Malformed,
}

/// The sends of one request: the jti of each proof and the status it was answered.
pub(crate) type Sends = Vec<(Option<String>, u16)>;

/// Resource server counts.
#[derive(Debug, Default)]
pub(crate) struct ApiStats {
    /// Requests received.
    pub(crate) sends: AtomicUsize,
    /// `use_dpop_nonce` challenges sent.
    pub(crate) nonce_challenges: AtomicUsize,
    /// `invalid_token` refusals (expired or unknown token) sent.
    pub(crate) token_refusals: AtomicUsize,
    /// Requests answered 200.
    pub(crate) ok: AtomicUsize,
    /// Per `x-request` id: the jtis of its proofs, in order, and the statuses it was answered.
    pub(crate) by_request: Mutex<HashMap<String, Sends>>,
    /// Proofs refused for another reason.
    pub(crate) refused: Mutex<Vec<String>>,
    /// The nonces the proofs carried.
    pub(crate) nonces_seen: Mutex<Vec<Option<String>>>,
    /// Every `DPoP` header received, as sent, in order.
    pub(crate) proofs_seen: Mutex<Vec<String>>,
}

/// How the resource server orders its checks, beyond its [`NonceMode`]. The default is the
/// order every existing test runs with: the token first.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ApiOptions {
    /// Check a DPoP-scheme request's proof (its nonce included) before the token, as RFC 9449
    /// allows: a revoked or expired token sent without the nonce is answered with a
    /// `use_dpop_nonce` challenge first, and `invalid_token` only once the proof is right.
    pub(crate) proof_first: bool,
}

/// A resource server at `/api/...` that accepts the issued, unexpired tokens, with a proof
/// by the key they are bound to (or, for a Bearer token, no proof at all).
pub(crate) async fn api_server(
    verifier: Arc<Verifier>,
    issued: Arc<Issued>,
    stats: Arc<ApiStats>,
    mode: NonceMode,
) -> Server {
    api_server_with(verifier, issued, stats, mode, ApiOptions::default()).await
}

/// [`api_server`] with the order of its checks set by `options`.
pub(crate) async fn api_server_with(
    verifier: Arc<Verifier>,
    issued: Arc<Issued>,
    stats: Arc<ApiStats>,
    mode: NonceMode,
    options: ApiOptions,
) -> Server {
    let addr = Arc::new(Mutex::new(String::new()));
    let rotation = Arc::new(AtomicUsize::new(0));
    let server = serve_scoped({
        let addr = addr.clone();
        move |req: Request<Incoming>| {
            let (verifier, issued, stats, addr, rotation) = (
                verifier.clone(),
                issued.clone(),
                stats.clone(),
                addr.clone(),
                rotation.clone(),
            );
            async move {
                stats.sends.fetch_add(1, Ordering::SeqCst);
                let (parts, _body) = req.into_parts();
                let id = parts
                    .headers
                    .get("x-request")
                    .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned());
                let htu = format!("http://{}{}", addr.lock().unwrap(), parts.uri.path());
                // The nonce the proof must carry, and the one this response hands out.
                let (want, give) = match mode {
                    NonceMode::Fixed(n) => (n.to_owned(), HeaderValue::from_static(n)),
                    NonceMode::AlwaysNew => {
                        let n = rotation.fetch_add(1, Ordering::SeqCst);
                        (
                            "never".to_owned(),
                            HeaderValue::try_from(format!("r-{}", n + 1)).unwrap(),
                        )
                    }
                    NonceMode::Malformed => {
                        ("never".to_owned(), HeaderValue::from_static("bad\"nonce"))
                    }
                    NonceMode::NextOnSuccess => {
                        let n = rotation.load(Ordering::SeqCst);
                        let current = format!("s-{n}");
                        (current.clone(), HeaderValue::try_from(current).unwrap())
                    }
                };
                let jti = jti_of(&parts.headers);
                for proof in parts.headers.get_all("dpop") {
                    let proof = String::from_utf8_lossy(proof.as_bytes()).into_owned();
                    stats.proofs_seen.lock().unwrap().push(proof);
                }
                let answer = |status: StatusCode, challenge: Option<&str>| {
                    stats
                        .by_request
                        .lock()
                        .unwrap()
                        .entry(id.clone())
                        .or_default()
                        .push((jti.clone(), status.as_u16()));
                    let mut res = response(status, if status.is_success() { "ok" } else { "" });
                    res.headers_mut().insert("dpop-nonce", give.clone());
                    if let Some(error) = challenge {
                        res.headers_mut().insert(
                            WWW_AUTHENTICATE,
                            HeaderValue::try_from(format!(
                                "DPoP error=\"{error}\", algs=\"ES256\""
                            ))
                            .unwrap(),
                        );
                    }
                    res
                };
                let auth = parts
                    .headers
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_once(' '))
                    .map(|(s, t)| (s.to_owned(), t.to_owned()));
                let Some((scheme, token)) = auth else {
                    return answer(StatusCode::UNAUTHORIZED, Some("invalid_token"));
                };
                // The proof first (`ApiOptions::proof_first`): verified once, here, for
                // whatever token it came with; the token is looked at only after it passed.
                let mut checked = None;
                if options.proof_first && scheme == "DPoP" {
                    match verifier.verify(
                        &parts.headers,
                        &parts.method,
                        &htu,
                        Some(&token),
                        Some(&want),
                    ) {
                        Ok(proof) => checked = Some(proof),
                        Err(reason) if reason == "use_dpop_nonce" => {
                            stats.nonce_challenges.fetch_add(1, Ordering::SeqCst);
                            return answer(StatusCode::UNAUTHORIZED, Some("use_dpop_nonce"));
                        }
                        Err(reason) => {
                            stats.refused.lock().unwrap().push(reason);
                            return answer(StatusCode::UNAUTHORIZED, Some("invalid_dpop_proof"));
                        }
                    }
                }
                let known = issued.get(&token);
                let Some((bound, expired)) = known else {
                    stats.token_refusals.fetch_add(1, Ordering::SeqCst);
                    return answer(StatusCode::UNAUTHORIZED, Some("invalid_token"));
                };
                let Some(jkt) = bound else {
                    // A Bearer token: no proof expected.
                    if scheme != "Bearer" || parts.headers.contains_key("dpop") || expired {
                        stats.token_refusals.fetch_add(1, Ordering::SeqCst);
                        return answer(StatusCode::UNAUTHORIZED, Some("invalid_token"));
                    }
                    stats.ok.fetch_add(1, Ordering::SeqCst);
                    return answer(StatusCode::OK, None);
                };
                if scheme != "DPoP" {
                    stats
                        .refused
                        .lock()
                        .unwrap()
                        .push(format!("scheme {scheme}"));
                    return answer(StatusCode::UNAUTHORIZED, Some("invalid_token"));
                }
                // The token first (unless the proof was checked already): an expired token is
                // refused whatever the proof says.
                if expired {
                    stats.token_refusals.fetch_add(1, Ordering::SeqCst);
                    return answer(StatusCode::UNAUTHORIZED, Some("invalid_token"));
                }
                let result = match checked {
                    Some(proof) => Ok(proof),
                    None => verifier.verify(
                        &parts.headers,
                        &parts.method,
                        &htu,
                        Some(&token),
                        Some(&want),
                    ),
                };
                match result {
                    Ok(proof) if proof.jkt == jkt => {
                        stats.nonces_seen.lock().unwrap().push(proof.nonce.clone());
                        stats.ok.fetch_add(1, Ordering::SeqCst);
                        let mut res = answer(StatusCode::OK, None);
                        if mode == NonceMode::NextOnSuccess {
                            let n = rotation.fetch_add(1, Ordering::SeqCst) + 1;
                            let next = HeaderValue::try_from(format!("s-{n}")).unwrap();
                            res.headers_mut().insert("dpop-nonce", next);
                        }
                        res
                    }
                    Ok(_) => {
                        stats.refused.lock().unwrap().push("wrong key".into());
                        answer(StatusCode::UNAUTHORIZED, Some("invalid_token"))
                    }
                    Err(reason) if reason == "use_dpop_nonce" => {
                        stats.nonce_challenges.fetch_add(1, Ordering::SeqCst);
                        answer(StatusCode::UNAUTHORIZED, Some("use_dpop_nonce"))
                    }
                    Err(reason) => {
                        stats.refused.lock().unwrap().push(reason);
                        answer(StatusCode::UNAUTHORIZED, Some("invalid_dpop_proof"))
                    }
                }
            }
        }
    })
    .await;
    *addr.lock().unwrap() = server.addr.to_string();
    server
}
