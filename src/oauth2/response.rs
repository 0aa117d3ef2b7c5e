//! The token endpoint's answer: a success (§5.1) or an error (§5.2), classified.

use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value};

use super::error::{ErrorKind, OAuth2Error};
use super::{
    Inner, MAX_CODE_LEN, MAX_DESCRIPTION_LEN, MAX_LIFETIME, MAX_RETRY_AFTER, Presented,
    RefreshToken,
};
use crate::{RefreshError, Token};

/// A 2xx answer: rotate, persist, then hand out the access token.
pub(crate) async fn success<C>(
    inner: &Inner<C>,
    presented: Option<Presented<'_>>,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Token, RefreshError> {
    let malformed =
        |kind: ErrorKind| RefreshError::transient(OAuth2Error::new(kind).with_status(status));
    let json_type = headers.get(CONTENT_TYPE).is_none_or(is_json);
    let fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => fields,
        _ if !json_type => {
            tracing::debug!(
                status = status.as_u16(),
                "oauth2: token response is not JSON"
            );
            return Err(malformed(ErrorKind::ContentType));
        }
        _ => {
            tracing::debug!(
                status = status.as_u16(),
                "oauth2: token response is not a JSON object"
            );
            return Err(malformed(ErrorKind::Malformed));
        }
    };

    // The rotated refresh token first: the old one may be spent already, whatever else is
    // wrong with this answer (a wrong content type included).
    // Only the refresh-token grant uses one: another grant ignores a refresh token (RFC 6749
    // §4.4.3 says a client-credentials answer should not have one).
    let rotated = match (presented, fields.get("refresh_token")) {
        (None, _) | (_, None | Some(Value::Null)) => None,
        (Some(p), Some(Value::String(s))) if s.is_empty() || s == p.token.secret() => None,
        (Some(_), Some(Value::String(s))) => Some(RefreshToken::new(s.as_str())),
        (Some(_), Some(_)) => return Err(malformed(ErrorKind::Malformed)),
    };
    let rotated_now = rotated.is_some();
    // An error (§5.2) in a 2xx answer without an access token (GitHub answers so): the server
    // refused the refresh token. A rotated refresh token it carries is still kept (above and
    // below), but the presented one is not adopted, and nothing else is persisted.
    let refused = fields.get("error").is_some_and(|e| !e.is_null())
        && fields.get("access_token").is_none_or(Value::is_null);
    // The refresh token the hook must persist now, if any.
    let mut persist = None;
    match (presented, rotated) {
        (Some(p), Some(new)) => {
            if inner.store(p.generation, new.clone(), Some(p.token.clone())) {
                persist = Some(new);
            } else {
                tracing::debug!(
                    "oauth2: rotated refresh token discarded: a new one was set meanwhile"
                );
            }
        }
        (Some(_), None) if refused => {}
        (Some(p), None) => {
            if p.from_set {
                // The token set's refresh token works: it is the refresher's own from now on.
                inner.store(p.generation, p.token.clone(), None);
            }
            // No new refresh token: one the hook failed to persist gets another chance, so
            // that what is persisted never stays a spent token.
            persist = inner.unpersisted(p.generation);
        }
        (None, _) => {}
    }
    if let (Some(new), Some(hook)) = (persist, &inner.hook) {
        // Marked before the hook runs: a hook cut off (its future dropped) leaves it marked,
        // and the next refresh persists it again.
        inner.set_unpersisted(&new, true);
        if let Err(err) = run_hook(hook(new.clone()), inner.timeout).await {
            tracing::warn!(
                "oauth2: rotation hook failed; the new refresh token is kept in memory only"
            );
            return Err(RefreshError::transient(
                OAuth2Error::new(ErrorKind::Persist).with_source(err),
            ));
        }
        inner.set_unpersisted(&new, false);
    }
    if !json_type {
        tracing::debug!(
            status = status.as_u16(),
            "oauth2: token response is not JSON"
        );
        return Err(malformed(ErrorKind::ContentType));
    }
    if refused {
        // Classified as an error answer is: the code decides, the status (2xx) does not make
        // it terminal.
        return Err(failure(
            inner,
            presented.map(|p| p.token),
            status,
            headers,
            body,
        ));
    }

    let token_type = match fields.get("token_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.as_str()),
        Some(_) => return Err(malformed(ErrorKind::Malformed)),
    };
    // `Bearer`, or `DPoP` when DPoP was asked (`dpop` module).
    let scheme = inner.dpop.scheme(token_type, status)?;
    let access = match fields.get("access_token") {
        Some(Value::String(s)) => s.as_str(),
        None | Some(Value::Null) => return Err(malformed(ErrorKind::MissingAccessToken)),
        Some(_) => return Err(malformed(ErrorKind::Malformed)),
    };
    let mut token = Token::with_scheme(scheme, access).map_err(|e| {
        RefreshError::transient(
            OAuth2Error::new(ErrorKind::InvalidAccessToken)
                .with_status(status)
                .with_source(e),
        )
    })?;
    let lifetime = expires_in(&fields);
    if let Some(life) = lifetime {
        token = token.with_expires_in(life);
    }
    // Every token carries the current refresh token, the slot's (the rotated one or the
    // presented one): the layer keeps the two together. (An answer for a session replaced
    // meanwhile is refused by the caller, `refresh`.)
    if presented.is_some() {
        if let Some(current) = inner.current().0 {
            token = token.with_refresh_token(current.secret());
        }
    }
    tracing::debug!(
        status = status.as_u16(),
        rotated = rotated_now,
        expires_in_secs = lifetime.map(|d| d.as_secs()),
        "oauth2: access token issued"
    );
    Ok(token)
}

/// The answer to a refresh whose session was replaced while it was in flight.
pub(super) fn superseded(status: StatusCode) -> RefreshError {
    tracing::debug!(
        status = status.as_u16(),
        "oauth2: a refresh token was set while the token request was in flight; its answer is \
         not used"
    );
    RefreshError::transient(OAuth2Error::new(ErrorKind::Superseded).with_status(status))
}

/// An error answer (non-2xx, or a 2xx carrying an `error` and no access token): classify it.
pub(crate) fn failure<C>(
    inner: &Inner<C>,
    presented: Option<&RefreshToken>,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> RefreshError {
    if status.is_redirection() {
        // Never followed (the form carries the refresh token and the client secret); the
        // target is not even named in the error.
        tracing::debug!(
            status = status.as_u16(),
            "oauth2: token endpoint answered with a redirect; not followed"
        );
        return RefreshError::terminal(OAuth2Error::new(ErrorKind::Redirect).with_status(status));
    }
    let (code, description) = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => error_fields(&fields, |s| inner.redact(s, presented)),
        _ => (None, None),
    };
    let transient_code = code
        .as_deref()
        .is_some_and(|c| inner.is_transient_code(c) || inner.dpop.is_transient_code(c));
    // No token endpoint at this URI (or not for POST): a configuration error, not a refusal.
    let misconfigured = !transient_code && matches!(status.as_u16(), 404 | 405);
    let terminal = !transient_code
        && (misconfigured
            || code.as_deref().is_some_and(|c| inner.is_terminal_code(c))
            || matches!(status.as_u16(), 400 | 401 | 403 | 422));
    tracing::debug!(
        status = status.as_u16(),
        error = code.as_deref(),
        terminal,
        misconfigured,
        "oauth2: token endpoint refused the request"
    );
    let kind = if misconfigured {
        ErrorKind::Misconfigured
    } else {
        ErrorKind::ErrorResponse
    };
    let mut err = OAuth2Error::new(kind).with_status(status);
    err.code = code.map(String::into_boxed_str);
    err.description = description.map(String::into_boxed_str);
    if terminal {
        return RefreshError::terminal(err);
    }
    match retry_after(headers) {
        Some(delay) => RefreshError::transient(err).with_retry_after(delay),
        None => RefreshError::transient(err),
    }
}

/// The `error` and `error_description` of an error answer: secrets taken out first (`redact`),
/// then cut to RFC 6749's characters and to length, so that no part of a long secret survives.
pub(super) fn error_fields(
    fields: &Map<String, Value>,
    redact: impl Fn(&str) -> String,
) -> (Option<String>, Option<String>) {
    let text = |name: &str, max: usize| match fields.get(name) {
        Some(Value::String(s)) => Some(sanitize(&redact(s), max)).filter(|s| !s.is_empty()),
        _ => None,
    };
    (
        text("error", MAX_CODE_LEN),
        text("error_description", MAX_DESCRIPTION_LEN),
    )
}

/// Keeps RFC 6749's `error`/`error_description` characters (printable ASCII but `"` and `\`),
/// at most `max` of them.
pub(super) fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .filter(|&c| matches!(c, ' '..='~') && c != '"' && c != '\\')
        .take(max)
        .collect()
}

pub(super) fn is_json(value: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or_default().trim();
    mime.eq_ignore_ascii_case("application/json")
        || (mime.len() > 5
            && mime
                .get(mime.len() - 5..)
                .is_some_and(|s| s.eq_ignore_ascii_case("+json")))
}

/// `expires_in` as a number or a numeric string; absent, zero or unreadable means unknown.
pub(super) fn expires_in(fields: &Map<String, Value>) -> Option<Duration> {
    let secs = match fields.get("expires_in")? {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f.min(u64::MAX as f64) as u64)
        }),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }?;
    (secs > 0).then(|| Duration::from_secs(secs).min(MAX_LIFETIME))
}

/// `Retry-After` ([`crate::retry_after`]: delay-seconds or an HTTP-date in any of the three
/// formats), capped at an hour.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    crate::retry_after(headers).map(|delay| delay.min(MAX_RETRY_AFTER))
}

/// Runs the rotation hook, for as long as one token request may take (the refresher's
/// `timeout`): the exchange runs to its end without its caller (see
/// `TokenRefresher::refresh`), and a hook that never returns must not hold up every later
/// refresh. A hook cut off counts as failed: its token stays marked as not persisted, and
/// the next refresh calls the hook again.
async fn run_hook(
    hook: impl std::future::Future<Output = Result<(), crate::BoxError>>,
    bound: std::time::Duration,
) -> Result<(), crate::BoxError> {
    // (The token request before it has already used a timer: the runtime has one.)
    match tokio::time::timeout(bound, hook).await {
        Ok(done) => done,
        Err(_) => Err(format!(
            "the rotation hook did not finish within {} ms",
            bound.as_millis()
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http::header::RETRY_AFTER;

    #[test]
    fn retry_after_is_capped() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("99999999999999999"));
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("later"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
        ] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in ["text/html", "text/plain", "application/jsonx", "+json"] {
            assert!(!is_json(&HeaderValue::from_static(bad)), "{bad}");
        }
    }

    #[test]
    fn expires_in_forms() {
        let parse = |json: &str| {
            let Value::Object(fields) = serde_json::from_str(json).unwrap() else {
                panic!()
            };
            expires_in(&fields)
        };
        assert_eq!(
            parse(r#"{"expires_in": 3600}"#),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse(r#"{"expires_in": "3600"}"#),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse(r#"{"expires_in": 59.9}"#),
            Some(Duration::from_secs(59))
        );
        assert_eq!(parse(r#"{"expires_in": 0}"#), None);
        assert_eq!(parse(r#"{"expires_in": -5}"#), None);
        assert_eq!(parse(r#"{"expires_in": "soon"}"#), None);
        assert_eq!(parse(r#"{"expires_in": 1e300}"#), Some(MAX_LIFETIME));
        assert_eq!(parse(r#"{}"#), None);
    }

    #[test]
    fn sanitize_keeps_rfc6749_characters() {
        assert_eq!(sanitize("invalid_grant", 64), "invalid_grant");
        assert_eq!(sanitize("a\"b\\c\nd\u{e9}", 64), "abcd");
        assert_eq!(sanitize(&"x".repeat(100), 64).len(), 64);
    }
}
