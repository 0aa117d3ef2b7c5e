//! When a response asks for a refresh: RFC 6750 `WWW-Authenticate` handling, HTTP 401 and
//! gRPC UNAUTHENTICATED.
//!
//! By default a response triggers a refresh when its status is 401, or when it is a
//! trailers-only gRPC response with `grpc-status: 16` (UNAUTHENTICATED), unless every `Bearer`
//! challenge, and every `DPoP` challenge that names an error, names an `error` other than
//! `invalid_token` (one Bearer challenge without an error, or one with `invalid_token`, is
//! enough to refresh; a `DPoP` challenge without an error only offers the scheme). So
//! `insufficient_scope` and `invalid_request` (RFC 6750 §3.1), and DPoP's
//! `invalid_dpop_proof` and `use_dpop_nonce` (RFC 9449 §7.1; a nonce challenge is answered by
//! a layer's [proof](crate::RefreshLayer::proof), not by a new token), alone reach the caller
//! untouched: a new token would not fix them.
//!
//! # Example
//!
//! ```
//! use http::{HeaderMap, HeaderValue, StatusCode};
//! use tower_auth_refresh::policy::{default_trigger, parse_challenges};
//!
//! let mut headers = HeaderMap::new();
//! headers.insert(
//!     "www-authenticate",
//!     HeaderValue::from_static(r#"Bearer realm="api", error="insufficient_scope""#),
//! );
//! assert!(!default_trigger(StatusCode::UNAUTHORIZED, &headers));
//! assert!(default_trigger(StatusCode::UNAUTHORIZED, &HeaderMap::new()));
//!
//! let challenges = parse_challenges(br#"Basic realm="x", Bearer error="invalid_token""#);
//! assert_eq!(challenges[1].param("error"), Some("invalid_token"));
//! ```

use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// One challenge of a `WWW-Authenticate` header (RFC 9110 §11.6.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    scheme: String,
    token68: Option<String>,
    params: Vec<(String, String)>,
}

impl Challenge {
    /// The auth scheme as sent (compare case-insensitively).
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The `token68` form of the credentials, if the challenge used it.
    pub fn token68(&self) -> Option<&str> {
        self.token68.as_deref()
    }

    /// The auth parameters, names as sent, quoted values unescaped.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// The value of a parameter, its name compared case-insensitively.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True for the Bearer scheme, in any case.
    pub fn is_bearer(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("bearer")
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn skip_ws_and_commas(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.pos += 1;
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.pos;
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        (self.pos > start)
            .then(|| String::from_utf8_lossy(&self.input[start..self.pos]).into_owned())
    }

    /// A quoted string with backslash escapes; an unterminated one runs to the end.
    fn quoted(&mut self) -> String {
        debug_assert_eq!(self.peek(), Some(b'"'));
        self.pos += 1;
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(escaped) = self.peek() {
                        out.push(escaped);
                        self.pos += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Skips to the next comma (junk the grammar does not allow).
    fn skip_junk(&mut self) {
        while let Some(b) = self.peek() {
            if b == b',' {
                break;
            }
            if b == b'"' {
                self.quoted();
            } else {
                self.pos += 1;
            }
        }
    }

    /// Looks ahead: is there `token BWS "="` (not `==`, which ends a token68) at the cursor?
    fn at_param(&self) -> bool {
        let mut i = self.pos;
        let start = i;
        while self.input.get(i).copied().is_some_and(is_tchar) {
            i += 1;
        }
        if i == start {
            return false;
        }
        while matches!(self.input.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        self.input.get(i) == Some(&b'=') && self.input.get(i + 1) != Some(&b'=')
    }

    fn params(&mut self, challenge: &mut Challenge) {
        loop {
            self.skip_ws();
            if !self.at_param() {
                return;
            }
            let Some(name) = self.token() else { return };
            self.skip_ws();
            self.pos += 1; // '='
            self.skip_ws();
            let value = match self.peek() {
                Some(b'"') => self.quoted(),
                _ => self.token().unwrap_or_default(),
            };
            challenge.params.push((name, value));
            self.skip_ws();
            match self.peek() {
                Some(b',') => {}
                None => return,
                // Junk after the value (an unquoted value with a character a token may not
                // have, such as `scope=read:user`): skipped to the next comma.
                Some(_) => {
                    self.skip_junk();
                    if self.peek().is_none() {
                        return;
                    }
                }
            }
            // At a comma: another param of this challenge, or the next challenge.
            let save = self.pos;
            self.skip_ws_and_commas();
            if !self.at_param() {
                self.pos = save;
                return;
            }
        }
    }

    fn challenges(&mut self, out: &mut Vec<Challenge>) {
        loop {
            self.skip_ws_and_commas();
            if self.peek().is_none() {
                return;
            }
            let Some(scheme) = self.token() else {
                self.pos += 1;
                self.skip_junk();
                continue;
            };
            let mut challenge = Challenge {
                scheme,
                token68: None,
                params: Vec::new(),
            };
            self.skip_ws();
            if self.at_param() {
                self.params(&mut challenge);
            } else if self.peek().is_some_and(is_token68_char) {
                let start = self.pos;
                while self.peek().is_some_and(is_token68_char) {
                    self.pos += 1;
                }
                while self.peek() == Some(b'=') {
                    self.pos += 1;
                }
                challenge.token68 =
                    Some(String::from_utf8_lossy(&self.input[start..self.pos]).into_owned());
            }
            out.push(challenge);
            self.skip_ws();
            if !matches!(self.peek(), None | Some(b',')) {
                self.skip_junk();
            }
        }
    }
}

/// Parses one `WWW-Authenticate` field value into its challenges. Never panics: junk is
/// skipped up to the next comma.
pub fn parse_challenges(value: &[u8]) -> Vec<Challenge> {
    let mut out = Vec::new();
    Parser {
        input: value,
        pos: 0,
    }
    .challenges(&mut out);
    out
}

/// The challenges of every `WWW-Authenticate` header in `headers`, in order.
pub fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    let mut out = Vec::new();
    for value in headers.get_all(WWW_AUTHENTICATE) {
        Parser {
            input: value.as_bytes(),
            pos: 0,
        }
        .challenges(&mut out);
    }
    out
}

/// The default refresh trigger: an HTTP 401 ([`http_trigger`]) or a gRPC UNAUTHENTICATED
/// ([`grpc_trigger`]), unless every `Bearer` or `DPoP` challenge of the response names an
/// `error` other than `invalid_token` (RFC 6750 §3.1, RFC 9449 §7.1).
///
/// gRPC is in the default because a gRPC server never answers 401 for an expired token: it
/// answers HTTP 200 with `grpc-status: 16`. The two cannot be confused (a gRPC response has a
/// `content-type` of `application/grpc...`), so plain HTTP APIs are not affected.
///
/// # Example
///
/// ```
/// use http::{HeaderMap, HeaderValue, StatusCode};
/// use tower_auth_refresh::policy::default_trigger;
///
/// let mut grpc = HeaderMap::new();
/// grpc.insert("content-type", HeaderValue::from_static("application/grpc"));
/// grpc.insert("grpc-status", HeaderValue::from_static("16"));
/// assert!(default_trigger(StatusCode::OK, &grpc));
/// assert!(default_trigger(StatusCode::UNAUTHORIZED, &HeaderMap::new()));
/// assert!(!default_trigger(StatusCode::OK, &HeaderMap::new()));
/// ```
#[inline]
pub fn default_trigger(status: StatusCode, headers: &HeaderMap) -> bool {
    // Every response the layer sees comes through here: the statuses first, inline.
    match status {
        StatusCode::UNAUTHORIZED => bearer_allows_refresh(headers),
        StatusCode::OK if !headers.is_empty() => grpc_trigger(status, headers),
        _ => false,
    }
}

/// The HTTP trigger: status 401, unless every `Bearer` or `DPoP` challenge names an `error`
/// other than `invalid_token` (RFC 6750 §3.1, RFC 9449 §7.1).
pub fn http_trigger(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::UNAUTHORIZED && bearer_allows_refresh(headers)
}

/// The gRPC status code UNAUTHENTICATED.
const GRPC_UNAUTHENTICATED: &[u8] = b"16";

/// The header a trailers-only gRPC response carries its status in.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The gRPC trigger: a trailers-only gRPC response (HTTP 200, `content-type:
/// application/grpc...`) whose headers carry `grpc-status: 16` (UNAUTHENTICATED), unless every
/// Bearer challenge in its `WWW-Authenticate` names an `error` other than `invalid_token`
/// (RFC 6750 §3.1: `insufficient_scope` is not fixed by a new token).
///
/// Only the response headers are looked at: a server reports an auth failure before any
/// message, as a trailers-only response (tonic does so for a `Status` returned by a handler or
/// an interceptor). A `grpc-status` sent in the trailers after messages arrives too late to
/// replay the call, and is not a trigger.
///
/// # Example
///
/// ```
/// use http::{HeaderMap, HeaderValue, StatusCode};
/// use tower_auth_refresh::policy::grpc_trigger;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("content-type", HeaderValue::from_static("application/grpc+proto"));
/// headers.insert("grpc-status", HeaderValue::from_static("16"));
/// assert!(grpc_trigger(StatusCode::OK, &headers));
///
/// headers.insert(
///     "www-authenticate",
///     HeaderValue::from_static(r#"Bearer error="insufficient_scope""#),
/// );
/// assert!(!grpc_trigger(StatusCode::OK, &headers));
/// ```
pub fn grpc_trigger(status: StatusCode, headers: &HeaderMap) -> bool {
    // Cheapest first: this runs on every response the layer sees.
    if status != StatusCode::OK || headers.is_empty() {
        return false;
    }
    // The content type first: a standard header name is cheaper to look up than
    // `grpc-status`, and most responses are not gRPC.
    first_value(headers, &CONTENT_TYPE).is_some_and(|v| is_grpc_content_type(v.as_bytes()))
        && headers
            .get(&GRPC_STATUS)
            .is_some_and(|v| v.as_bytes().trim_ascii() == GRPC_UNAUTHENTICATED)
        && bearer_allows_refresh(headers)
}

/// The first value of `name`, as [`HeaderMap::get`]. A response the layer checks usually has
/// a few headers, and a look at each of them costs less than hashing a name (at most 8
/// values are looked at: a map with more is hashed).
#[inline]
fn first_value<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.len() > 8 {
        return headers.get(name);
    }
    headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
}

/// `application/grpc`, alone or with a `+format` or `;parameters`, in any case.
fn is_grpc_content_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';' | b'-'))
}

/// False when every `Bearer` or `DPoP` challenge names an `error` other than
/// `invalid_token` (RFC 6750 §3.1; RFC 9449 §7.1 uses the same errors, and adds
/// `invalid_dpop_proof` and `use_dpop_nonce`, which a new token would not answer either).
fn bearer_allows_refresh(headers: &HeaderMap) -> bool {
    if !headers.contains_key(WWW_AUTHENTICATE) {
        return true;
    }
    let all = challenges(headers);
    // A `DPoP` challenge without an error only offers the scheme (RFC 9449 §7.2, beside a
    // Bearer one): it counts when it names an error.
    let mut bearer = all
        .iter()
        .filter(|c| {
            c.is_bearer() || (c.scheme().eq_ignore_ascii_case("dpop") && c.param("error").is_some())
        })
        .peekable();
    if bearer.peek().is_none() {
        return true;
    }
    bearer.any(|c| c.param("error").is_none_or(|e| e == "invalid_token"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(values: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append(WWW_AUTHENTICATE, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    /// A param after a value with junk in it (`read:user` is not a token) stays with its
    /// challenge: an `insufficient_scope` after it is seen, and no refresh is triggered.
    #[test]
    fn params_after_a_malformed_value_stay_with_their_challenge() {
        for (raw, schemes) in [
            (
                r#"Bearer scope=read:user, error="insufficient_scope""#,
                &["Bearer"][..],
            ),
            (
                r#"Bearer realm=My API, error="insufficient_scope", Basic realm="x""#,
                &["Bearer", "Basic"][..],
            ),
        ] {
            let c = parse_challenges(raw.as_bytes());
            let got: Vec<&str> = c.iter().map(|c| c.scheme.as_str()).collect();
            assert_eq!(got, schemes, "{raw}");
            assert_eq!(c[0].param("error"), Some("insufficient_scope"), "{raw}");
            assert!(
                !default_trigger(StatusCode::UNAUTHORIZED, &h(&[raw])),
                "{raw}"
            );
        }
    }

    /// DPoP challenges follow the same rule (RFC 9449 §7.1): a proof or scope problem is not
    /// answered by a new token.
    #[test]
    fn dpop_challenges_refresh_only_for_invalid_token() {
        let s = StatusCode::UNAUTHORIZED;
        assert!(default_trigger(s, &h(&[r#"DPoP algs="ES256""#])));
        assert!(default_trigger(
            s,
            &h(&[r#"DPoP error="invalid_token", algs="ES256""#])
        ));
        for error in ["invalid_dpop_proof", "use_dpop_nonce", "insufficient_scope"] {
            let challenge = format!(r#"DPoP error="{error}", algs="ES256""#);
            assert!(!default_trigger(s, &h(&[&challenge])), "{error}");
            assert!(!http_trigger(s, &h(&[&challenge])), "{error}");
        }
        // Beside a Bearer challenge without an error: that one asks for a token.
        assert!(default_trigger(
            s,
            &h(&[r#"Bearer realm="api", DPoP error="use_dpop_nonce""#])
        ));
        // A DPoP challenge without an error beside a Bearer one only offers the scheme: the
        // Bearer challenge's error decides.
        assert!(!default_trigger(
            s,
            &h(&[r#"Bearer error="insufficient_scope", DPoP algs="ES256""#])
        ));
    }

    #[test]
    fn rfc6750_errors() {
        let s = StatusCode::UNAUTHORIZED;
        assert!(default_trigger(s, &h(&[])));
        assert!(default_trigger(s, &h(&["Bearer"])));
        assert!(default_trigger(s, &h(&[r#"Bearer realm="example""#])));
        assert!(default_trigger(
            s,
            &h(&[r#"bEaReR error="invalid_token", error_description="expired""#])
        ));
        assert!(!default_trigger(
            s,
            &h(&[r#"Bearer error="insufficient_scope", scope="a b""#])
        ));
        assert!(!default_trigger(s, &h(&["Bearer error=invalid_request"])));
        assert!(default_trigger(s, &h(&[r#"Basic realm="x""#])));
        assert!(!default_trigger(StatusCode::FORBIDDEN, &h(&[])));
        // Several headers, several challenges.
        assert!(!default_trigger(
            s,
            &h(&[r#"Basic realm="a", Bearer error="insufficient_scope""#])
        ));
        assert!(default_trigger(
            s,
            &h(&["Basic realm=a", r#"Bearer error="invalid_token""#])
        ));
    }

    fn grpc(status: &str, content_type: &str, challenges: &[&str]) -> HeaderMap {
        let mut m = h(challenges);
        m.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        m.insert("grpc-status", HeaderValue::from_str(status).unwrap());
        m
    }

    #[test]
    fn grpc_unauthenticated_triggers_a_refresh() {
        let ok = StatusCode::OK;
        for content_type in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "application/grpc; charset=utf-8",
            "Application/GRPC",
            "application/grpc-web+proto",
        ] {
            assert!(
                grpc_trigger(ok, &grpc("16", content_type, &[])),
                "{content_type}"
            );
            assert!(
                default_trigger(ok, &grpc("16", content_type, &[])),
                "{content_type}"
            );
        }
        assert!(grpc_trigger(ok, &grpc(" 16 ", "application/grpc", &[])));
        // The www-authenticate of a gRPC response: RFC 6750 gating as for a 401.
        assert!(grpc_trigger(
            ok,
            &grpc(
                "16",
                "application/grpc",
                &[r#"Bearer error="invalid_token""#]
            )
        ));
        assert!(grpc_trigger(
            ok,
            &grpc("16", "application/grpc", &[r#"Bearer realm="api""#])
        ));
        assert!(!grpc_trigger(
            ok,
            &grpc(
                "16",
                "application/grpc",
                &[r#"Bearer error="insufficient_scope""#]
            )
        ));
        assert!(!default_trigger(
            ok,
            &grpc("16", "application/grpc", &["Bearer error=invalid_request"])
        ));
    }

    #[test]
    fn the_content_type_is_found_among_few_and_many_headers_and_the_first_value_counts() {
        let ok = StatusCode::OK;
        for others in [0, 3, 12] {
            let mut m = grpc("16", "application/grpc", &[]);
            for i in 0..others {
                m.insert(
                    HeaderName::try_from(format!("x-other-{i}")).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            assert!(grpc_trigger(ok, &m), "{others} other headers");
            // As `HeaderMap::get`: the first value of a repeated name is the one read.
            m.append(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            assert!(grpc_trigger(ok, &m), "{others} other headers, two types");
            let mut plain = m.clone();
            plain.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            plain.append(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            assert!(
                !grpc_trigger(ok, &plain),
                "{others} other headers, plain first"
            );
        }
    }

    #[test]
    fn other_grpc_statuses_and_non_grpc_responses_do_not_trigger() {
        let ok = StatusCode::OK;
        // PERMISSION_DENIED (7), OK (0), UNAVAILABLE (14), junk.
        for status in ["7", "0", "14", "160", "1", "", "sixteen"] {
            assert!(
                !default_trigger(ok, &grpc(status, "application/grpc", &[])),
                "{status}"
            );
        }
        // Not a gRPC response: a grpc-status header alone is not a trigger.
        for content_type in [
            "application/json",
            "text/plain",
            "application/grpcx",
            "grpc",
        ] {
            assert!(
                !grpc_trigger(ok, &grpc("16", content_type, &[])),
                "{content_type}"
            );
        }
        let mut no_type = HeaderMap::new();
        no_type.insert("grpc-status", HeaderValue::from_static("16"));
        assert!(!grpc_trigger(ok, &no_type));
        // Trailers-only responses are HTTP 200; a gRPC proxy's HTTP error is not this trigger.
        assert!(!grpc_trigger(
            StatusCode::SERVICE_UNAVAILABLE,
            &grpc("16", "application/grpc", &[])
        ));
        // A plain 401 still triggers through the HTTP trigger, gRPC headers or not.
        assert!(default_trigger(
            StatusCode::UNAUTHORIZED,
            &grpc("0", "application/grpc", &[])
        ));
        assert!(!http_trigger(ok, &grpc("16", "application/grpc", &[])));
    }

    #[test]
    fn parses_several_challenges_and_escapes() {
        let c = parse_challenges(
            br#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple", Token abc123==, Bearer"#,
        );
        let schemes: Vec<_> = c.iter().map(Challenge::scheme).collect();
        assert_eq!(schemes, ["Newauth", "Basic", "Token", "Bearer"]);
        assert_eq!(c[0].param("TITLE"), Some(r#"Login to "apps""#));
        assert_eq!(c[0].param("type"), Some("1"));
        assert_eq!(c[2].token68(), Some("abc123=="));
    }

    #[test]
    fn junk_never_panics() {
        for junk in [
            &b""[..],
            b",,,",
            b"=",
            b"Bearer ===",
            b"Bearer error=\"unterminated",
            b"Bearer error=\"x\\",
            b"\xff\xfe Bearer error=invalid_token",
            b"Bearer , , error=\"invalid_token\"",
            b"@@@ Bearer error=1 junk junk, Basic",
        ] {
            let _ = parse_challenges(junk);
        }
    }
}
