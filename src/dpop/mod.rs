//! DPoP (RFC 9449): sender-constrained tokens, proven on every send.
//!
//! A [`Dpop`] holds a signing key ([`Es256Key`] or any [`DpopSigner`]) and the latest
//! `DPoP-Nonce` of each server: per origin, a token endpoint's apart from a resource
//! server's (RFC 9449 §9). Given to the layer ([`RefreshLayer::proof`](crate::RefreshLayer::proof)),
//! it adds a `DPoP` proof header to every send that carries the token (first send and replay),
//! with `ath`, the hash of the access token; a `401` with `WWW-Authenticate: DPoP
//! error="use_dpop_nonce"` is answered by one replay with the same token and a proof carrying
//! the new nonce, never by a refresh. That replay is the request's one replay: if its proof
//! is refused again, the request fails
//! ([`UnauthorizedAfterRefresh::proof_refused`](crate::error::UnauthorizedAfterRefresh::proof_refused));
//! if its token is refused (a server that checks the proof before the token), the layer
//! refreshes for later requests and returns that 401 as it is. Given to the OAuth 2.0 refresher
//! ([`OAuth2RefresherBuilder::dpop`][builder-dpop], feature `oauth2`), it proves
//! each token request too and asks for DPoP-bound tokens (`token_type: DPoP`), sent as
//! `Authorization: DPoP <token>`.
//!
//! ```
//! use tower_auth_refresh::dpop::{Dpop, Es256Key};
//! use tower_auth_refresh::{RefreshLayer, Token, refresh_fn, RefreshError};
//!
//! let dpop = Dpop::new(Es256Key::generate());
//! let layer = RefreshLayer::new(refresh_fn(|_| async {
//!     Ok::<_, RefreshError>(Token::with_scheme("DPoP", "new-token")?)
//! }))
//! .proof(dpop.clone());
//! # let _ = layer;
//! ```
//!
//! Clone one `Dpop` for the layer and the refresher: they then share the key and the nonces.
//!
//! Put tower-http's `FollowRedirectLayer` outside the layer, so that each redirect hop gets a
//! proof of its own (inside, every hop would carry the first hop's proof, which the server
//! refuses): see [Layer order](crate#layer-order).
//!
//! Processes that share their tokens through a [token store][mod-store] must share the key
//! too ([`Es256Key::from_jwk`] or [`Es256Key::from_pkcs8_der`] from one secret): a stored
//! DPoP token is bound to the key that asked for it, and so is a public client's refresh
//! token; a replica with a key of its own would have its proofs refused, and its refreshes
//! too (an `invalid_grant` ends the session; an `invalid_dpop_proof` fails each refresh
//! transiently).
//!

#![cfg_attr(
    feature = "oauth2",
    doc = "[builder-dpop]: crate::oauth2::OAuth2RefresherBuilder::dpop"
)]
#![cfg_attr(not(feature = "oauth2"), doc = "[builder-dpop]: crate#feature-flags")]
#![cfg_attr(feature = "store", doc = "[mod-store]: crate::store")]
#![cfg_attr(not(feature = "store"), doc = "[mod-store]: crate#feature-flags")]

mod key;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use rand_core::RngCore;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use key::{DpopKeyError, DpopSigner, Es256Key, PublicJwk};

use crate::{BoxError, RequestProof};

/// The `DPoP` request header (the proof).
pub const DPOP: HeaderName = HeaderName::from_static("dpop");
/// The `DPoP-Nonce` response header.
pub const DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");
/// The longest nonce kept; a longer one is ignored as malformed.
pub const MAX_NONCE_LEN: usize = 512;
/// How many origins' nonces are kept; past that, an arbitrary one is forgotten.
const MAX_ORIGINS: usize = 256;

/// Why a proof could not be made. The request fails unsent with
/// [`ProofFailed`](crate::error::ProofFailed), whose source this is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DpopError {
    /// `htu` needs an absolute URI (scheme and authority).
    #[error("dpop: the request URI is not absolute")]
    RelativeUri,
    /// The signer failed (its message is not kept: it could name key material).
    #[error("dpop: the signer failed")]
    Sign,
}

/// What a response's `DPoP-Nonce` header did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NonceOutcome {
    /// No `DPoP-Nonce` header.
    Absent,
    /// A valid nonce, remembered for the server (origin, and token endpoint or resource
    /// server).
    Stored,
    /// A nonce that is not `1*NQCHAR` (RFC 9449 §8.1), longer than [`MAX_NONCE_LEN`], or
    /// given more than once: ignored, the origin's last good nonce kept.
    Malformed,
}

/// DPoP proofs for the layer and the OAuth 2.0 refresher; see the [module docs](self).
/// Cheap to clone: clones share the key and the nonces.
#[derive(Clone)]
pub struct Dpop {
    inner: Arc<Inner>,
}

struct Inner {
    signer: Box<dyn DpopSigner>,
    /// `base64url(header) "."`, the same for every proof.
    header: String,
    /// The latest nonce per server: `(true, origin)` for a token endpoint (proofs without an
    /// access token), `(false, origin)` for a resource server. Kept apart even on one origin
    /// (RFC 9449 §9: a nonce is for the server that issued it).
    nonces: Mutex<HashMap<(bool, String), String>>,
}

impl fmt::Debug for Dpop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origins = self.inner.nonces.lock().map(|n| n.len()).unwrap_or(0);
        f.debug_struct("Dpop")
            .field("signer", &self.inner.signer)
            .field("origins_with_nonce", &origins)
            .finish()
    }
}

impl Dpop {
    /// Proofs signed by `signer`.
    pub fn new(signer: impl DpopSigner) -> Self {
        let mut header = Map::new();
        header.insert("typ".into(), Value::String("dpop+jwt".into()));
        header.insert("alg".into(), Value::String(signer.algorithm().into()));
        header.insert("jwk".into(), signer.public_jwk().to_json());
        let mut encoded = URL_SAFE_NO_PAD.encode(Value::Object(header).to_string());
        encoded.push('.');
        Self {
            inner: Arc::new(Inner {
                signer: Box::new(signer),
                header: encoded,
                nonces: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The public key's RFC 7638 thumbprint (the `jkt` of the tokens bound to it).
    pub fn thumbprint(&self) -> String {
        self.inner.signer.public_jwk().thumbprint()
    }

    /// A proof JWT for `method` on `uri`, with `ath` when `access_token` is given and the
    /// latest nonce of the server it goes to, if any: without an access token, a token
    /// endpoint's (from the OAuth 2.0 refresher's token requests), with one, a resource
    /// server's ([`remember_nonce`](Self::remember_nonce)); the two are kept apart even on
    /// one origin (RFC 9449 §9).
    ///
    /// `htu` is `uri` in the normal form a server compares it in (RFC 9449 §4.3, RFC 3986
    /// §6.2.2 and §6.2.3): scheme and host lowercase, without the scheme's default port
    /// (`https://API.example:443/a?q` gives `https://api.example/a`), user information,
    /// query or fragment; the path as it is sent. Nonces are kept per origin in that form
    /// too: `https://api.example:443` and `https://api.example` share theirs.
    ///
    /// ```
    /// use http::{Method, Uri};
    /// use tower_auth_refresh::dpop::{Dpop, Es256Key};
    ///
    /// let dpop = Dpop::new(Es256Key::generate());
    /// let uri = Uri::from_static("https://api.example/orders?page=2");
    /// let proof = dpop.proof(&Method::GET, &uri, Some("token")).unwrap();
    /// assert_eq!(proof.split('.').count(), 3);
    /// ```
    ///
    /// # Errors
    ///
    /// [`DpopError::RelativeUri`] for a URI without scheme or authority,
    /// [`DpopError::Sign`] if the signer fails.
    pub fn proof(
        &self,
        method: &Method,
        uri: &Uri,
        access_token: Option<&str>,
    ) -> Result<String, DpopError> {
        let origin = origin(uri).ok_or(DpopError::RelativeUri)?;
        let htu = format!("{origin}{}", uri.path());
        let mut jti = [0u8; 16];
        rand_core::OsRng.fill_bytes(&mut jti);
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut claims = Map::new();
        claims.insert("jti".into(), Value::String(URL_SAFE_NO_PAD.encode(jti)));
        claims.insert("htm".into(), Value::String(method.as_str().into()));
        claims.insert("htu".into(), Value::String(htu));
        claims.insert("iat".into(), Value::from(iat));
        if let Some(token) = access_token {
            let ath = URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()));
            claims.insert("ath".into(), Value::String(ath));
        }
        // A proof without an access token is a token request: the token endpoint's nonce.
        if let Some(nonce) = self.nonce(access_token.is_none(), origin) {
            claims.insert("nonce".into(), Value::String(nonce));
        }
        let mut jwt = self.inner.header.clone();
        URL_SAFE_NO_PAD.encode_string(Value::Object(claims).to_string(), &mut jwt);
        let signature = self.inner.signer.sign(jwt.as_bytes()).map_err(|_| {
            tracing::warn!("dpop: the signer failed");
            DpopError::Sign
        })?;
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut jwt);
        Ok(jwt)
    }

    /// Remembers the `DPoP-Nonce` of a resource server's response from `uri`'s origin (the
    /// layer does this for every response it sees); a token endpoint's goes to
    /// [`remember_token_endpoint_nonce`](Self::remember_token_endpoint_nonce).
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue, Uri};
    /// use tower_auth_refresh::dpop::{DPOP_NONCE, Dpop, Es256Key, NonceOutcome};
    ///
    /// let dpop = Dpop::new(Es256Key::generate());
    /// let uri = Uri::from_static("https://api.example/");
    /// let mut headers = HeaderMap::new();
    /// headers.insert(DPOP_NONCE, HeaderValue::from_static("n-1"));
    /// assert_eq!(dpop.remember_nonce(&uri, &headers), NonceOutcome::Stored);
    /// headers.insert(DPOP_NONCE, HeaderValue::from_static("bad\"nonce"));
    /// assert_eq!(dpop.remember_nonce(&uri, &headers), NonceOutcome::Malformed);
    /// assert_eq!(dpop.nonce_for(&uri).as_deref(), Some("n-1"));
    /// ```
    pub fn remember_nonce(&self, uri: &Uri, headers: &HeaderMap) -> NonceOutcome {
        self.remember(false, uri, headers)
    }

    /// [`remember_nonce`](Self::remember_nonce) for a token endpoint's answer: kept apart from
    /// the resource servers' nonces (even on the same origin), and sent with proofs without an
    /// access token (token requests). The OAuth 2.0 refresher does this itself; a refresher of
    /// your own that proves its token requests calls it with each answer.
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue, Method, Uri};
    /// use tower_auth_refresh::dpop::{DPOP_NONCE, Dpop, Es256Key, NonceOutcome};
    ///
    /// let dpop = Dpop::new(Es256Key::generate());
    /// let token = Uri::from_static("https://idp.example/token");
    /// let mut headers = HeaderMap::new();
    /// headers.insert(DPOP_NONCE, HeaderValue::from_static("as-1"));
    /// assert_eq!(dpop.remember_token_endpoint_nonce(&token, &headers), NonceOutcome::Stored);
    /// assert_eq!(dpop.token_endpoint_nonce_for(&token).as_deref(), Some("as-1"));
    /// assert_eq!(dpop.nonce_for(&token), None, "not a resource server's");
    /// ```
    pub fn remember_token_endpoint_nonce(&self, uri: &Uri, headers: &HeaderMap) -> NonceOutcome {
        self.remember(true, uri, headers)
    }

    fn remember(&self, token_endpoint: bool, uri: &Uri, headers: &HeaderMap) -> NonceOutcome {
        let mut values = headers.get_all(&DPOP_NONCE).iter();
        let Some(value) = values.next() else {
            return NonceOutcome::Absent;
        };
        let valid = values.next().is_none()
            && !value.is_empty()
            && value.len() <= MAX_NONCE_LEN
            && value.as_bytes().iter().all(|&b| is_nqchar(b));
        let Some(origin) = origin(uri).filter(|_| valid) else {
            tracing::warn!(
                len = value.len(),
                "dpop: malformed DPoP-Nonce ignored (not 1*NQCHAR, too long, or repeated)"
            );
            return NonceOutcome::Malformed;
        };
        // All NQCHAR bytes are ASCII.
        let nonce = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let key = (token_endpoint, origin);
        let mut nonces = self.inner.nonces.lock().unwrap_or_else(|e| e.into_inner());
        if nonces.len() >= MAX_ORIGINS && !nonces.contains_key(&key) {
            if let Some(evict) = nonces.keys().next().cloned() {
                nonces.remove(&evict);
            }
        }
        nonces.insert(key, nonce);
        NonceOutcome::Stored
    }

    /// The latest nonce remembered for `uri`'s origin as a resource server (by
    /// [`remember_nonce`](Self::remember_nonce)).
    pub fn nonce_for(&self, uri: &Uri) -> Option<String> {
        self.nonce(false, origin(uri)?)
    }

    /// The latest nonce remembered for `uri`'s origin as a token endpoint (by
    /// [`remember_token_endpoint_nonce`](Self::remember_token_endpoint_nonce)).
    pub fn token_endpoint_nonce_for(&self, uri: &Uri) -> Option<String> {
        self.nonce(true, origin(uri)?)
    }

    fn nonce(&self, token_endpoint: bool, origin: String) -> Option<String> {
        let nonces = self.inner.nonces.lock().unwrap_or_else(|e| e.into_inner());
        nonces.get(&(token_endpoint, origin)).cloned()
    }
}

impl RequestProof for Dpop {
    /// Adds the `DPoP` header when the request carries `Authorization: DPoP <token>`, with
    /// `ath` for that token. A request with another scheme (a `Bearer` token accepted with
    /// `OAuth2RefresherBuilder::dpop_accept_bearer`) is sent without a proof: it is not bound
    /// to the key.
    fn prove(&self, method: &Method, uri: &Uri, headers: &mut HeaderMap) -> Result<(), BoxError> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("dpop"))
            .map(|(_, token)| token.trim().to_owned());
        let Some(token) = token else {
            headers.remove(&DPOP);
            return Ok(());
        };
        let proof = self.proof(method, uri, Some(&token))?;
        let mut value = HeaderValue::try_from(proof).map_err(|_| DpopError::Sign)?;
        // Like the `Authorization` header: traces print it as `Sensitive`.
        value.set_sensitive(true);
        headers.insert(DPOP, value);
        Ok(())
    }

    /// Remembers the response's `DPoP-Nonce` for its origin (see [`Dpop::remember_nonce`]),
    /// and asks for a new proof on a `401` with `WWW-Authenticate: DPoP
    /// error="use_dpop_nonce"`. A challenge whose nonce is malformed still gets its one
    /// replay (the token is not at fault, so a refresh would not help); the replay carries the
    /// origin's last good nonce, if any, and a second challenge is
    /// [`UnauthorizedAfterRefresh`](crate::error::UnauthorizedAfterRefresh).
    fn wants_new_proof(&self, uri: &Uri, status: StatusCode, headers: &HeaderMap) -> bool {
        self.remember_nonce(uri, headers);
        status == StatusCode::UNAUTHORIZED && asks_for_nonce(headers)
    }
}

/// A `WWW-Authenticate` challenge `DPoP error="use_dpop_nonce"`, alone or among others (a
/// `Bearer` challenge offered beside it, RFC 9449 §7.2).
fn asks_for_nonce(headers: &HeaderMap) -> bool {
    if !headers.contains_key(WWW_AUTHENTICATE) {
        return false;
    }
    crate::policy::challenges(headers).iter().any(|c| {
        c.scheme().eq_ignore_ascii_case("dpop") && c.param("error") == Some("use_dpop_nonce")
    })
}

/// `scheme://host[:port]` in normal form (RFC 3986 §6.2.2 and §6.2.3, which RFC 9449 §4.3
/// asks servers to apply before they compare `htu`): scheme and host lowercase, the port left
/// out when it is the scheme's default (`https://h:443` is `https://h`, as a client sends it
/// in `Host`), the port's number otherwise. The start of `htu` and the key of the nonce map,
/// so that one origin keeps one nonce however it is spelt.
/// Never the user information of the authority: it is not part of the target URI the server
/// checks `htu` against (RFC 9449 §4.3), it may hold a password, and the nonce is the host's
/// whoever the URI names as its user.
fn origin(uri: &Uri) -> Option<String> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    // `host()` has no user information and keeps the brackets of an IPv6 literal.
    let host = authority.host();
    let written = authority.as_str();
    let host_port = written.rsplit_once('@').map_or(written, |(_, h)| h);
    let port = host_port
        .get(host.len()..)
        .and_then(|p| p.strip_prefix(':'));
    let port = match port {
        // None, or an empty one (`https://h:/`, RFC 3986 §6.2.3).
        None | Some("") => None,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if Some(port) == default_port(&scheme) => None,
            Ok(port) => Some(port.to_string()),
            // Not a port number (no client connects there): kept as written.
            Err(_) => Some(text.to_owned()),
        },
    };
    let mut origin = format!("{scheme}://{host}");
    if let Some(port) = port {
        origin.push(':');
        origin.push_str(&port);
    }
    origin.make_ascii_lowercase();
    Some(origin)
}

/// The port a scheme implies when none is written.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "https" | "wss" => Some(443),
        "http" | "ws" => Some(80),
        _ => None,
    }
}

/// RFC 9449 §8.1: `NQCHAR = %x21 / %x23-5B / %x5D-7E`.
fn is_nqchar(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqchar() {
        assert!(is_nqchar(b'a') && is_nqchar(b'!') && is_nqchar(b'~'));
        assert!(!is_nqchar(b'"') && !is_nqchar(b'\\') && !is_nqchar(b' '));
    }

    #[test]
    fn nonces_are_kept_for_a_bounded_number_of_origins() {
        let dpop = Dpop::new(Es256Key::generate());
        let mut headers = HeaderMap::new();
        headers.insert(DPOP_NONCE, HeaderValue::from_static("n"));
        for port in 0..(MAX_ORIGINS as u16 + 50) {
            let uri: Uri = format!("https://api.example:{port}/").parse().unwrap();
            assert_eq!(dpop.remember_nonce(&uri, &headers), NonceOutcome::Stored);
            assert_eq!(dpop.nonce_for(&uri).as_deref(), Some("n"));
        }
        assert_eq!(dpop.inner.nonces.lock().unwrap().len(), MAX_ORIGINS);
        // Same origin, whatever the case of the host or the path.
        let upper = Uri::from_static("https://API.example:1/x?y");
        headers.insert(DPOP_NONCE, HeaderValue::from_static("m"));
        dpop.remember_nonce(&upper, &headers);
        let lower = Uri::from_static("https://api.example:1/other");
        assert_eq!(dpop.nonce_for(&lower).as_deref(), Some("m"));
    }

    /// The claims of a proof JWT.
    fn claims(jwt: &str) -> Value {
        let part = jwt.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    fn htu(uri: &'static str) -> Value {
        let dpop = Dpop::new(Es256Key::generate());
        let proof = dpop.proof(&Method::GET, &Uri::from_static(uri), Some("t"));
        claims(&proof.unwrap())["htu"].clone()
    }

    /// `htu` is the normal form of the target URI (RFC 9449 §4.3, RFC 3986
    /// §6.2.2 and §6.2.3): scheme and host lowercase, no default port, no user information,
    /// query or fragment; the path as sent.
    #[test]
    fn htu_is_the_normal_form_of_the_target_uri() {
        for (uri, want) in [
            ("https://API.example:443/a?q#f", "https://api.example/a"),
            ("HTTPS://Api.Example:443/A/b?q=1", "https://api.example/A/b"),
            ("https://api.example/a", "https://api.example/a"),
            ("http://h:80/", "http://h/"),
            ("http://H:80", "http://h/"),
            ("https://h:0443/x", "https://h/x"),
            ("https://h:/x", "https://h/x"),
            ("https://u:pw@h:443/x", "https://h/x"),
            // Another port stays, and a port is the default of its own scheme only.
            ("https://api.example:8443/a", "https://api.example:8443/a"),
            ("http://h:443/", "http://h:443/"),
            ("https://h:80/", "https://h:80/"),
            ("https://[::1]:443/x", "https://[::1]/x"),
            ("https://[::1]:8443/x", "https://[::1]:8443/x"),
            ("http://[::1]:80/x", "http://[::1]/x"),
            ("https://[FE80::1]:443/x", "https://[fe80::1]/x"),
        ] {
            assert_eq!(htu(uri), want, "{uri}");
        }
    }

    /// The nonce of `https://h:443` is the nonce of `https://h` (one origin), for
    /// a resource server and for a token endpoint alike.
    #[test]
    fn nonces_are_keyed_by_the_normal_origin() {
        let dpop = Dpop::new(Es256Key::generate());
        let mut headers = HeaderMap::new();
        headers.insert(DPOP_NONCE, HeaderValue::from_static("n-443"));
        let explicit = Uri::from_static("https://API.example:443/a");
        let plain = Uri::from_static("https://api.example/b");
        assert_eq!(
            dpop.remember_nonce(&explicit, &headers),
            NonceOutcome::Stored
        );
        assert_eq!(dpop.nonce_for(&plain).as_deref(), Some("n-443"));
        let proof = dpop.proof(&Method::GET, &plain, Some("t")).unwrap();
        assert_eq!(claims(&proof)["nonce"], "n-443");
        // And the other way round, for a token endpoint on plain HTTP.
        headers.insert(DPOP_NONCE, HeaderValue::from_static("n-80"));
        let token = Uri::from_static("http://idp.example/token");
        let token_80 = Uri::from_static("http://idp.example:80/token");
        dpop.remember_token_endpoint_nonce(&token, &headers);
        assert_eq!(
            dpop.token_endpoint_nonce_for(&token_80).as_deref(),
            Some("n-80")
        );
        let proof = dpop.proof(&Method::POST, &token_80, None).unwrap();
        assert_eq!(claims(&proof)["nonce"], "n-80");
        // One origin, one entry; another port is another origin.
        assert_eq!(dpop.inner.nonces.lock().unwrap().len(), 2);
        let other = Uri::from_static("https://api.example:8443/b");
        assert_eq!(dpop.nonce_for(&other), None);
    }

    #[test]
    fn challenge() {
        let mut h = HeaderMap::new();
        h.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("DPoP error=\"use_dpop_nonce\""),
        );
        assert!(asks_for_nonce(&h));
        h.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("DPoP error=\"invalid_token\""),
        );
        assert!(!asks_for_nonce(&h));
    }
}
