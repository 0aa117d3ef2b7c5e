//! Access tokens whose secret never prints.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;

/// An access token, with the `Authorization` header value that carries it and an optional
/// lifetime.
///
/// The secret is validated once, when the token is built, and kept as a ready-made
/// [`HeaderValue`] marked [sensitive](HeaderValue::set_sensitive), so attaching it to a request
/// is a reference-count bump. Cloning a `Token` is cheap.
///
/// `Token`'s [`Debug`](fmt::Debug) and [`Display`](fmt::Display) never show the secret:
/// `Debug` shows the scheme, the expiry and redaction markers, `Display` the scheme and a
/// redaction marker.
///
/// # Example
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tower_auth_refresh::Token;
///
/// let token = Token::bearer("s3cr3t")?.with_expires_in(Duration::from_secs(3600));
/// assert_eq!(token.scheme(), "Bearer");
/// assert_eq!(token.secret(), "s3cr3t");
/// assert!(!format!("{token:?}").contains("s3cr3t"));
/// assert!(!token.to_string().contains("s3cr3t"));
/// # Ok::<(), tower_auth_refresh::InvalidToken>(())
/// ```
#[derive(Clone)]
pub struct Token {
    inner: Arc<TokenInner>,
    expiry: Option<Expiry>,
    refresh_token: Option<Arc<str>>,
}

struct TokenInner {
    secret: Box<str>,
    scheme: Box<str>,
    header: HeaderValue,
}

/// When a token expires: a lifetime counted from receipt, or a wall-clock instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Expires this long after the layer receives it (RFC 6749's `expires_in`).
    In(Duration),
    /// Expires at this wall-clock time (a token loaded from storage, a JWT's `exp`).
    At(SystemTime),
}

impl Token {
    /// Builds a bearer token (`Authorization: Bearer <secret>`, RFC 6750).
    ///
    /// # Errors
    ///
    /// [`InvalidToken`] if the secret is empty or holds bytes that cannot appear in a header
    /// value (control characters such as `\r` or `\n`, or non-visible ASCII). The error never
    /// repeats the secret.
    pub fn bearer(secret: impl Into<String>) -> Result<Self, InvalidToken> {
        Self::with_scheme("Bearer", secret)
    }

    /// Builds a token for another `Authorization` scheme, such as `DPoP` or `MAC`.
    ///
    /// # Errors
    ///
    /// [`InvalidToken`] if the scheme is not an HTTP token (letters, digits and `!#$%&'*+-.^_`|~`),
    /// or the secret is empty or cannot appear in a header value.
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::Token;
    /// let token = Token::with_scheme("DPoP", "abc")?;
    /// assert_eq!(token.scheme(), "DPoP");
    /// assert!(Token::with_scheme("two words", "abc").is_err());
    /// # Ok::<(), tower_auth_refresh::InvalidToken>(())
    /// ```
    pub fn with_scheme(scheme: &str, secret: impl Into<String>) -> Result<Self, InvalidToken> {
        let secret = secret.into();
        if scheme.is_empty() || !scheme.bytes().all(is_tchar) {
            return Err(InvalidToken(InvalidKind::Scheme));
        }
        if secret.is_empty() {
            return Err(InvalidToken(InvalidKind::Empty));
        }
        // Visible ASCII only: RFC 6750's b64token is narrower still, but servers hand out
        // opaque tokens in the wild that use other visible characters, so only what cannot
        // be sent safely in a header is refused. Spaces would split the credentials.
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken(InvalidKind::Secret));
        }
        let mut value = String::with_capacity(scheme.len() + 1 + secret.len());
        value.push_str(scheme);
        value.push(' ');
        value.push_str(&secret);
        let mut header =
            HeaderValue::from_str(&value).map_err(|_| InvalidToken(InvalidKind::Secret))?;
        header.set_sensitive(true);
        Ok(Self {
            inner: Arc::new(TokenInner {
                secret: secret.into_boxed_str(),
                scheme: scheme.into(),
                header,
            }),
            expiry: None,
            refresh_token: None,
        })
    }

    /// Sets how long the token lives, counted from when the layer receives it
    /// (RFC 6749's `expires_in`).
    ///
    /// The layer measures the lifetime on its own monotonic clock, so a backward jump of the
    /// wall clock cannot revive a token. It also checks the deadline on the wall clock, to
    /// catch a machine that slept through it: a forward jump larger than the time left
    /// expires the token early (one refresh more than needed).
    ///
    /// `Duration::ZERO` means "already expired": the layer refreshes before sending it (a
    /// token endpoint's `expires_in: 0` is read as "lifetime unknown" by the OAuth 2.0
    /// refresher instead, see its documentation). A token without any expiry is used until a
    /// server refuses it.
    #[must_use]
    pub fn with_expires_in(mut self, lifetime: Duration) -> Self {
        self.expiry = Some(Expiry::In(lifetime));
        self
    }

    /// Sets the wall-clock time at which the token expires, for a token whose deadline is
    /// absolute: loaded from a [store](crate), restored after a restart, or read from a JWT's
    /// `exp`. A time in the past means "already expired".
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tower_auth_refresh::{Expiry, Token};
    ///
    /// let at = SystemTime::now() + Duration::from_secs(600);
    /// let token = Token::bearer("s3cr3t")?.with_expires_at(at);
    /// assert_eq!(token.expiry(), Some(Expiry::At(at)));
    /// # Ok::<(), tower_auth_refresh::InvalidToken>(())
    /// ```
    #[must_use]
    pub fn with_expires_at(mut self, at: SystemTime) -> Self {
        self.expiry = Some(Expiry::At(at));
        self
    }

    /// The expiry set by [`with_expires_in`](Self::with_expires_in) or
    /// [`with_expires_at`](Self::with_expires_at), if any.
    pub fn expiry(&self) -> Option<Expiry> {
        self.expiry
    }

    /// The lifetime given by [`with_expires_in`](Self::with_expires_in), or the time left
    /// until the instant given by [`with_expires_at`](Self::with_expires_at) (zero once past).
    pub fn expires_in(&self) -> Option<Duration> {
        match self.expiry? {
            Expiry::In(life) => Some(life),
            Expiry::At(at) => Some(
                at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            ),
        }
    }

    /// Attaches the refresh token that belongs with this access token (a token set), for
    /// refreshers that use one, such as the OAuth 2.0 refresher. The layer keeps it with the
    /// access token: installing a set through the handle installs both, a logout forgets both.
    /// It never prints and is never sent to the API.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::Token;
    ///
    /// let set = Token::bearer("access")?.with_refresh_token("refresh-secret");
    /// assert_eq!(set.refresh_token(), Some("refresh-secret"));
    /// assert!(!format!("{set:?}").contains("refresh-secret"));
    /// # Ok::<(), tower_auth_refresh::InvalidToken>(())
    /// ```
    #[must_use]
    pub fn with_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        let refresh_token: String = refresh_token.into();
        self.refresh_token = (!refresh_token.is_empty()).then(|| refresh_token.into());
        self
    }

    /// The refresh token attached with [`with_refresh_token`](Self::with_refresh_token). A
    /// secret, like [`secret`](Self::secret).
    pub fn refresh_token(&self) -> Option<&str> {
        self.refresh_token.as_deref()
    }

    /// The `Authorization` scheme, `Bearer` unless built with [`with_scheme`](Self::with_scheme).
    pub fn scheme(&self) -> &str {
        &self.inner.scheme
    }

    /// The secret itself. Handle with care: with [`header_value`](Self::header_value) (which
    /// carries it, marked sensitive) and [`refresh_token`](Self::refresh_token) (a secret of its
    /// own), the only accessors that reveal a secret.
    pub fn secret(&self) -> &str {
        &self.inner.secret
    }

    /// The `Authorization` header value (`<scheme> <secret>`), marked sensitive.
    pub fn header_value(&self) -> &HeaderValue {
        &self.inner.header
    }

    /// True when both tokens carry the same secret and scheme.
    pub fn same_secret(&self, other: &Token) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) || self.inner.header == other.inner.header
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("scheme", &self.scheme())
            .field("secret", &"<redacted>")
            .field("expiry", &self.expiry)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} <redacted>", self.scheme())
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A token string that cannot be used: empty, or not sendable in an `Authorization` header.
///
/// The message says what is wrong without repeating the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidToken(InvalidKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InvalidKind {
    Empty,
    Secret,
    Scheme,
}

impl fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            InvalidKind::Empty => "invalid token: the secret is empty",
            InvalidKind::Secret => {
                "invalid token: the secret holds characters that cannot appear in an Authorization header"
            }
            InvalidKind::Scheme => "invalid token: the scheme is not an HTTP token",
        })
    }
}

impl std::error::Error for InvalidToken {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_sensitive_and_well_formed() {
        let t = Token::bearer("abc.def-ghi").unwrap();
        assert!(t.header_value().is_sensitive());
        assert_eq!(t.header_value(), "Bearer abc.def-ghi");
    }

    #[test]
    fn invalid_secrets_are_refused_without_echo() {
        for bad in ["", "a b", "line\r\nInjected: 1", "tab\t", "é"] {
            let err = Token::bearer(bad).unwrap_err();
            let shown = format!("{err} {err:?}");
            if !bad.is_empty() {
                assert!(!shown.contains(bad), "{shown}");
            }
        }
    }

    #[test]
    fn debug_and_display_redact() {
        let t = Token::bearer("topsecret").unwrap();
        assert!(!format!("{t:?}{t}{t:#?}").contains("topsecret"));
    }
}
