//! DPoP at the token endpoint (RFC 9449 §5): a proof with each token request, DPoP-bound
//! tokens, and one retry on a `use_dpop_nonce` refusal. Without the `dpop` feature this is
//! the plain `Bearer` behaviour.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::Full;

use super::MAX_CODE_LEN;
#[cfg(feature = "dpop")]
use super::OAuth2RefresherBuilder;
use super::error::{ErrorKind, OAuth2Error};
use super::response::sanitize;
use crate::RefreshError;

/// The refresher's DPoP settings (none without the `dpop` feature).
#[derive(Clone, Default)]
pub(crate) struct DpopSettings {
    #[cfg(feature = "dpop")]
    dpop: Option<crate::dpop::Dpop>,
    #[cfg(feature = "dpop")]
    accept_bearer: bool,
}

impl DpopSettings {
    /// Adds the `DPoP` proof header to a token request (htm POST, htu the endpoint, no `ath`).
    pub(super) fn prove(&self, req: &mut Request<Full<Bytes>>) -> Result<(), RefreshError> {
        #[cfg(feature = "dpop")]
        if let Some(dpop) = &self.dpop {
            let mut proof = dpop
                .proof(req.method(), req.uri(), None)
                .ok()
                .and_then(|p| http::HeaderValue::try_from(p).ok())
                .ok_or_else(|| RefreshError::transient(OAuth2Error::new(ErrorKind::DpopProof)))?;
            // A signed proof: kept out of logs and HTTP/2 header tables, as the layer's are.
            proof.set_sensitive(true);
            req.headers_mut().insert(crate::dpop::DPOP, proof);
        }
        #[cfg(not(feature = "dpop"))]
        let _ = req;
        Ok(())
    }

    /// Remembers the token endpoint's nonce from any answer; `true` for a `use_dpop_nonce`
    /// refusal with a valid nonce (worth one retry).
    pub(super) fn observe(
        &self,
        endpoint: &Uri,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> bool {
        #[cfg(feature = "dpop")]
        if let Some(dpop) = &self.dpop {
            let stored = dpop.remember_token_endpoint_nonce(endpoint, headers);
            let asks = matches!(status.as_u16(), 400 | 401)
                && matches!(
                    serde_json::from_slice::<serde_json::Value>(body),
                    Ok(serde_json::Value::Object(fields))
                        if fields.get("error").and_then(|e| e.as_str()) == Some("use_dpop_nonce")
                );
            if asks && stored != crate::dpop::NonceOutcome::Stored {
                tracing::warn!(
                    ?stored,
                    "oauth2: use_dpop_nonce without a usable DPoP-Nonce; not retried"
                );
            }
            return asks && stored == crate::dpop::NonceOutcome::Stored;
        }
        let _ = (endpoint, status, headers, body);
        false
    }

    /// With DPoP, the codes that refuse the proof rather than the grant (RFC 9449 §5, §8) are
    /// transient: `use_dpop_nonce` (still, after the one retry) and `invalid_dpop_proof` (a
    /// client clock off for `iat`, a stale nonce, a server that lost its replay cache). The
    /// refresh token is fine, so the session must not end; the layer's backoff and
    /// cool-down try again later, with a new proof.
    pub(super) fn is_transient_code(&self, code: &str) -> bool {
        #[cfg(feature = "dpop")]
        if self.dpop.is_some() {
            return matches!(code, "use_dpop_nonce" | "invalid_dpop_proof");
        }
        let _ = code;
        false
    }

    /// The `Authorization` scheme for a token of `token_type`.
    pub(super) fn scheme(
        &self,
        token_type: Option<&str>,
        status: StatusCode,
    ) -> Result<&'static str, RefreshError> {
        let unsupported = |t: &str| {
            RefreshError::terminal(
                OAuth2Error::new(ErrorKind::UnsupportedTokenType)
                    .with_status(status)
                    .with_code(sanitize(t, MAX_CODE_LEN)),
            )
        };
        let bearer = token_type.is_none_or(|t| t.eq_ignore_ascii_case("bearer"));
        #[cfg(feature = "dpop")]
        if self.dpop.is_some() {
            return match token_type {
                Some(t) if t.eq_ignore_ascii_case("dpop") => Ok("DPoP"),
                Some(t) if !bearer => Err(unsupported(t)),
                _ if self.accept_bearer => {
                    tracing::debug!("oauth2: DPoP asked, Bearer token accepted");
                    Ok("Bearer")
                }
                _ => {
                    tracing::warn!("oauth2: DPoP asked, but the token endpoint answered Bearer");
                    Err(RefreshError::terminal(
                        OAuth2Error::new(ErrorKind::DpopNotBound).with_status(status),
                    ))
                }
            };
        }
        match token_type {
            Some(t) if !bearer => Err(unsupported(t)),
            _ => Ok("Bearer"),
        }
    }
}

#[cfg(feature = "dpop")]
#[cfg_attr(docsrs, doc(cfg(feature = "dpop")))]
impl<C> OAuth2RefresherBuilder<C> {
    /// Asks for DPoP-bound tokens (RFC 9449 §5): each token request carries a proof signed by
    /// `dpop` (`htm` POST, `htu` the token endpoint, no `ath`), a `token_type: DPoP` answer
    /// becomes a `Token::with_scheme("DPoP", ..)`, and a `400 {"error":"use_dpop_nonce"}`
    /// with a `DPoP-Nonce` is retried once with that nonce. Give a clone of the same
    /// [`Dpop`](crate::dpop::Dpop) to the layer ([`RefreshLayer::proof`](crate::RefreshLayer::proof)).
    ///
    /// A `use_dpop_nonce` refusal of the retry too is a transient error (the layer's
    /// [`Backoff`](crate::Backoff) decides when to try again); the session does not end. So
    /// is an `invalid_dpop_proof` refusal (at any status): it refuses the proof (a clock off
    /// for `iat`, a stale nonce), not the refresh token, and the next attempt (the layer's
    /// `Backoff`, or a later refresh) sends a new proof. (A server that refuses every proof of
    /// this key then fails each refresh transiently, spaced by the layer's
    /// [`Cooldown`](crate::Cooldown), instead of ending the session.)
    ///
    /// A token endpoint that answers `token_type: Bearer` (or none) is refused with a
    /// terminal [`ErrorKind::DpopNotBound`], unless
    /// [`dpop_accept_bearer`](Self::dpop_accept_bearer) is set.
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::OAuth2Refresher;
    /// use tower_auth_refresh::dpop::{Dpop, Es256Key};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let dpop = Dpop::new(Es256Key::generate());
    /// let refresher = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .refresh_token("rt")
    ///     .dpop(dpop.clone())
    ///     .build()?;
    /// # let _ = refresher;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn dpop(mut self, dpop: crate::dpop::Dpop) -> Self {
        self.dpop.dpop = Some(dpop);
        self
    }

    /// With [`dpop`](Self::dpop): whether a `Bearer` answer is accepted (sent as
    /// `Authorization: Bearer`, without a proof). Default `false`: refused with a terminal
    /// [`ErrorKind::DpopNotBound`], since the server did not bind the token to the key.
    #[must_use]
    pub fn dpop_accept_bearer(mut self, accept: bool) -> Self {
        self.dpop.accept_bearer = accept;
        self
    }
}
