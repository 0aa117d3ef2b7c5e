//! The token request: client authentication, the form, sending it and reading the answer.

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower_service::Service;

use super::error::{ErrorKind, OAuth2Error};
use super::{Inner, REDACTED, RefreshToken};
use crate::{BoxError, RefreshError, TokenRequest};

/// The grant an [`OAuth2Refresher`](super::OAuth2Refresher) uses to get access tokens.
///
/// Both share the request (client authentication, `scope`, `resource`, `audience`, extra
/// parameters), the reading of the answer, the typed errors, redaction, the https rule, the
/// body cap and the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Grant {
    /// The refresh-token grant (RFC 6749 §6), with rotation: the default of
    /// [`OAuth2Refresher::builder`](super::OAuth2Refresher::builder).
    RefreshToken,
    /// The client-credentials grant (RFC 6749 §4.4), for a confidential client acting on its
    /// own behalf: [`OAuth2Refresher::client_credentials`](super::OAuth2Refresher::client_credentials). Needs a client secret; a refresh
    /// token in the answer is ignored, and [`on_rotation`](super::OAuth2RefresherBuilder::on_rotation)
    /// is never called.
    ClientCredentials,
}

impl Grant {
    /// The `grant_type` value.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
        }
    }
}

/// Form parameters the refresher sets itself, refused by
/// [`extra_param`](super::OAuth2RefresherBuilder::extra_param).
pub(super) const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "refresh_token",
    "client_id",
    "client_secret",
    "scope",
    "resource",
    "audience",
];

pub(crate) enum Auth {
    /// A public client.
    None,
    /// The ready-made `Authorization` header, marked sensitive.
    Basic(HeaderValue),
    /// The secret, for the form body.
    Post(Box<str>),
}

impl<C> Inner<C> {
    /// The token request: a refresh-token grant presenting `refresh_token`, or (with `None`)
    /// a client-credentials grant.
    pub(crate) fn request(&self, refresh_token: Option<&RefreshToken>) -> Request<Full<Bytes>> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        match refresh_token {
            Some(refresh_token) => {
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("refresh_token", refresh_token.secret());
            }
            None => {
                form.append_pair("grant_type", "client_credentials");
            }
        }
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        for resource in &self.resources {
            form.append_pair("resource", resource);
        }
        if let Some(audience) = &self.audience {
            form.append_pair("audience", audience);
        }
        for (name, value) in &self.extra_params {
            form.append_pair(name, value);
        }
        match &self.auth {
            Auth::None | Auth::Post(_) => {
                if let Some(id) = &self.client_id {
                    form.append_pair("client_id", id);
                }
            }
            Auth::Basic(_) => {}
        }
        if let Auth::Post(secret) = &self.auth {
            form.append_pair("client_secret", secret);
        }
        let mut req = Request::new(Full::new(Bytes::from(form.finish())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.clone();
        let headers = req.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Auth::Basic(value) = &self.auth {
            headers.insert(AUTHORIZATION, value.clone());
        }
        req.extensions_mut().insert(TokenRequest);
        req
    }

    /// Takes the refresh token, the client secret and the `client_secret_basic` credentials
    /// (the base64 of `id:secret`, which decodes to the secret) out of server-supplied text,
    /// raw or percent-encoded.
    pub(crate) fn redact(&self, text: &str, presented: Option<&RefreshToken>) -> String {
        let basic = match &self.auth {
            Auth::Basic(value) => value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Basic "))
                // Without its padding, so that an echo that dropped it is caught too.
                .map(|b64| b64.trim().trim_end_matches('=')),
            Auth::None | Auth::Post(_) => None,
        };
        let secrets = [
            presented.map(RefreshToken::secret),
            self.client_secret.as_deref(),
            basic,
        ];
        redact(text, &secrets.into_iter().flatten().collect::<Vec<_>>())
    }
}

/// Replaces every occurrence of a secret in `text` with `<redacted>`: raw, form-encoded (`+`
/// for a space) or percent-encoded (either case of hex digit), or any mix of them.
pub(super) fn redact(text: &str, secrets: &[&str]) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let (mut i, mut copied) = (0, 0);
    while i < bytes.len() {
        let end = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .find_map(|s| match_encoded(bytes, i, s.as_bytes()));
        match end {
            Some(end) => {
                out.extend_from_slice(&bytes[copied..i]);
                out.extend_from_slice(REDACTED.as_bytes());
                (i, copied) = (end, end);
            }
            None => i += 1,
        }
    }
    out.extend_from_slice(&bytes[copied..]);
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a match of `secret` starting at `text[at]` ends (the longest one), each byte of the
/// secret given raw, as `%XX`, or (a space) as `+`. A `%` in the text may be either, so every
/// reading is followed.
fn match_encoded(text: &[u8], at: usize, secret: &[u8]) -> Option<usize> {
    let mut ends = vec![at];
    for &want in secret {
        let mut next = Vec::with_capacity(ends.len());
        for &i in &ends {
            let Some(&got) = text.get(i) else { continue };
            if got == want || (got == b'+' && want == b' ') {
                next.push(i + 1);
            }
            let decoded = text
                .get(i + 1..i + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            if got == b'%' && decoded == Some(want) {
                next.push(i + 3);
            }
        }
        next.sort_unstable();
        next.dedup();
        if next.is_empty() {
            return None;
        }
        ends = next;
    }
    ends.last().copied()
}

/// The answer to a token request as (status, headers, capped body), within the timeout.
pub(super) async fn send<C, ResBody>(
    inner: &Inner<C>,
    req: Request<Full<Bytes>>,
) -> Result<
    (
        http::StatusCode,
        http::HeaderMap,
        Result<Bytes, OAuth2Error>,
    ),
    RefreshError,
>
where
    C: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    let exchange = exchange(inner.client.clone(), req, inner.max_body);
    let (status, headers, body) = match tokio::time::timeout(inner.timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) if err.kind == ErrorKind::Redirect => {
            return Err(RefreshError::terminal(err));
        }
        Ok(Err(err)) => {
            tracing::debug!(kind = ?err.kind, "oauth2: token request failed");
            return Err(RefreshError::transient(err));
        }
        Err(_) => {
            tracing::debug!(
                timeout_ms = inner.timeout.as_millis() as u64,
                "oauth2: token request timed out"
            );
            return Err(RefreshError::transient(OAuth2Error::new(
                ErrorKind::Timeout,
            )));
        }
    };
    Ok((status, headers, body))
}

/// Sends the request and reads the whole answer, up to `max_body` bytes.
pub(crate) async fn exchange<C, ResBody>(
    mut client: C,
    req: Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(StatusCode, HeaderMap, Result<Bytes, OAuth2Error>), OAuth2Error>
where
    C: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
    C::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    let transport = |e: C::Error| OAuth2Error::new(ErrorKind::Transport).with_source(e.into());
    std::future::poll_fn(|cx| client.poll_ready(cx))
        .await
        .map_err(transport)?;
    let sent = req.uri().clone();
    let res = client.call(req).await.map_err(transport)?;
    if followed_redirect(&res, &sent) {
        // Whatever the redirect target answered, it is not the token endpoint's answer.
        tracing::debug!("oauth2: the token client followed a redirect; its answer is refused");
        return Err(OAuth2Error::new(ErrorKind::Redirect));
    }
    let (parts, body) = res.into_parts();
    let too_large = || {
        OAuth2Error::new(ErrorKind::BodyTooLarge)
            .with_status(parts.status)
            .with_limit(max_body)
    };
    let body = if body.size_hint().lower() > max_body as u64 {
        Err(too_large())
    } else {
        match Limited::new(body, max_body).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) if err.is::<LengthLimitError>() => Err(too_large()),
            Err(err) => Err(OAuth2Error::new(ErrorKind::Body)
                .with_status(parts.status)
                .with_source(err)),
        }
    };
    Ok((parts.status, parts.headers, body))
}

/// Put in a response's extensions by a client for token requests that followed a redirect
/// (the reqwest client does, when the answer's URL is not the one it was sent to).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FollowedRedirect;

/// Whether `res` came from a redirect target rather than from `sent`: marked so by the client,
/// or (feature `follow-redirect`) from another URI per tower-http's `FollowRedirect`.
fn followed_redirect<B>(res: &Response<B>, sent: &http::Uri) -> bool {
    let marked = res.extensions().get::<FollowedRedirect>().is_some();
    #[cfg(feature = "follow-redirect")]
    let marked = marked
        || res
            .extensions()
            .get::<tower_http::follow_redirect::RequestUri>()
            .is_some_and(|hop| hop.0 != *sent);
    #[cfg(not(feature = "follow-redirect"))]
    let _ = sent;
    marked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_finds_raw_and_encoded_secrets() {
        let secret = "rt+1/x y%";
        for echo in [
            "rt+1/x y%",
            "rt%2B1%2Fx+y%25",
            "rt%2b1%2fx%20y%25",
            "rt%2B1/x y%",
        ] {
            assert_eq!(
                redact(&format!("bad {echo}!"), &[secret]),
                "bad <redacted>!",
                "{echo}"
            );
        }
        assert_eq!(redact("rt+1/x", &[secret]), "rt+1/x");
        assert_eq!(redact("a é b", &["é"]), "a <redacted> b");
        assert_eq!(redact("a %C3%A9 b", &["é"]), "a <redacted> b");
        assert_eq!(redact("nothing %zz %", &["", "s"]), "nothing %zz %");
        assert_eq!(redact("%+5", &["\u{5}"]), "%+5");
        assert_eq!(redact("s1 s2", &["s1", "s2"]), "<redacted> <redacted>");
    }
}
