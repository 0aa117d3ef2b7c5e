//! The errors of the OAuth 2.0 refresher.

use std::fmt;

use http::StatusCode;

use crate::BoxError;

/// Why [`OAuth2RefresherBuilder::build`](super::OAuth2RefresherBuilder::build) refused the settings. The message names the
/// problem; it never repeats a secret.
///
/// # Example
///
/// ```
/// # use tower_auth_refresh::oauth2::OAuth2Refresher;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # use bytes::Bytes;
/// # use http_body_util::Full;
/// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
/// # });
/// let err = OAuth2Refresher::builder("http://idp.example/token".parse()?, client)
///     .refresh_token("rt")
///     .build()
///     .unwrap_err();
/// assert!(err.to_string().contains("https"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub(super) ConfigErrorKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConfigErrorKind {
    EmptyRefreshToken,
    MissingClientSecret,
    RefreshTokenWithoutGrant,
    ReservedParam(&'static str),
    MissingClientId,
    NotAbsolute,
    Scheme,
    Insecure,
    UserInfo,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            ConfigErrorKind::EmptyRefreshToken => "oauth2 refresher: the refresh token is empty",
            ConfigErrorKind::MissingClientId => {
                "oauth2 refresher: a client secret needs a client id"
            }
            ConfigErrorKind::MissingClientSecret => {
                "oauth2 refresher: the client-credentials grant needs a client secret"
            }
            ConfigErrorKind::RefreshTokenWithoutGrant => {
                "oauth2 refresher: the client-credentials grant uses no refresh token"
            }
            ConfigErrorKind::ReservedParam(name) => {
                return write!(
                    f,
                    "oauth2 refresher: extra_param {name:?} is set by the refresher; use its own \
                     setter"
                );
            }
            ConfigErrorKind::NotAbsolute => {
                "oauth2 refresher: the token endpoint must be an absolute URI"
            }
            ConfigErrorKind::Scheme => {
                "oauth2 refresher: the token endpoint must use https (or http on loopback)"
            }
            ConfigErrorKind::UserInfo => {
                "oauth2 refresher: the token endpoint must not carry user information (set \
                 client credentials with client_id and client_secret)"
            }
            ConfigErrorKind::Insecure => {
                "oauth2 refresher: the token endpoint must use https (http only on loopback or \
                 with allow_insecure_http)"
            }
        })
    }
}

impl std::error::Error for ConfigError {}

/// What went wrong with a token request: the cause ([`source`](std::error::Error::source))
/// of the [`RefreshError`](crate::RefreshError) an [`OAuth2Refresher`](super::OAuth2Refresher) returns.
///
/// It carries the HTTP status, the RFC 6749 §5.2 `error` code and `error_description` (cut
/// to printable ASCII, 64 and 256 characters, with the refresh token and client secret
/// blanked out should a server echo them), never the raw body or a token.
///
/// [`OAuth2Error::find`] digs it out of any error of the layer.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::oauth2::OAuth2Error;
/// use tower_auth_refresh::BoxError;
///
/// /// The OAuth 2.0 error code behind a request's failure, if any.
/// fn oauth2_code(err: &BoxError) -> Option<&str> {
///     OAuth2Error::find(&**err)?.error_code()
/// }
/// # let _ = oauth2_code;
/// ```
pub struct OAuth2Error {
    pub(super) kind: ErrorKind,
    pub(super) status: Option<StatusCode>,
    pub(super) code: Option<Box<str>>,
    pub(super) description: Option<Box<str>>,
    pub(super) limit: Option<usize>,
    pub(super) source: Option<BoxError>,
}

/// The kinds of [`OAuth2Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The token endpoint answered with an error status (RFC 6749 §5.2), or with a 2xx
    /// status, an `error` and no `access_token`; see [`OAuth2Error::error_code`]. Terminal or
    /// transient depending on the code and status.
    ErrorResponse,
    /// The token request timed out. Transient.
    Timeout,
    /// The HTTP client failed (connection refused, reset, ...). Transient.
    Transport,
    /// Reading the response body failed. Transient.
    Body,
    /// The response body is larger than the cap. Transient.
    BodyTooLarge,
    /// A success response whose content type is not JSON. Transient.
    ContentType,
    /// A success response that is not a JSON object, or has fields of the wrong type.
    /// Transient.
    Malformed,
    /// A success response without `access_token` (and without an `error`: one with an
    /// `error` is an [`ErrorKind::ErrorResponse`]). Transient.
    MissingAccessToken,
    /// An `access_token` that cannot be sent in an `Authorization` header. Transient.
    InvalidAccessToken,
    /// A `token_type` other than `Bearer`; see [`OAuth2Error::error_code`] for the type.
    /// Terminal: this client cannot use such tokens.
    UnsupportedTokenType,
    /// The token endpoint answered 404 Not Found or 405 Method Not Allowed: there is no token
    /// endpoint at the configured URI. Terminal: a configuration error, which retrying on every
    /// request would not fix.
    Misconfigured,
    /// The token endpoint answered with a redirect (a 3xx status), or the client for token
    /// requests followed one (then [`OAuth2Error::status`] is `None`). Token requests never
    /// follow redirects: the refresh token and the client secret go to the configured URI
    /// only, never to a redirect target. Terminal: the configured URI is not the token
    /// endpoint's (configure the final one), which retrying would not fix.
    Redirect,
    /// There is no refresh token to present (refresh-token grant only): none was given, or a
    /// [logout](crate::TokenHandle::clear) forgot it. Terminal, until a new login sets one.
    NoRefreshToken,
    /// The [`on_rotation`](super::OAuth2RefresherBuilder::on_rotation) hook failed. Transient.
    Persist,
    /// DPoP was asked for (`OAuth2RefresherBuilder::dpop`, feature `dpop`) but the token
    /// endpoint answered a `Bearer` token (or no `token_type`): a token not bound to the key.
    /// Terminal, unless `OAuth2RefresherBuilder::dpop_accept_bearer` accepts such tokens.
    #[cfg_attr(
        feature = "dpop",
        doc = "\n\nSee [`dpop`](super::OAuth2RefresherBuilder::dpop) and \
               [`dpop_accept_bearer`](super::OAuth2RefresherBuilder::dpop_accept_bearer)."
    )]
    DpopNotBound,
    /// The DPoP proof for the token request could not be made (the signer failed). Transient.
    DpopProof,
    /// A refresh token was set from outside
    /// ([`set_refresh_token`](super::OAuth2Refresher::set_refresh_token), a logout) while the
    /// token request was in flight: its answer belongs to the old session and is not used.
    /// Transient: the retry presents the new refresh token.
    Superseded,
}

impl OAuth2Error {
    pub(super) fn new(kind: ErrorKind) -> Self {
        Self {
            kind,
            status: None,
            code: None,
            description: None,
            limit: None,
            source: None,
        }
    }

    pub(super) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub(super) fn with_code(mut self, code: String) -> Self {
        self.code = Some(code.into_boxed_str());
        self
    }

    pub(super) fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    pub(super) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The `OAuth2Error` behind `err`: `err` itself, or the first one down its
    /// [`source`](std::error::Error::source) chain. Works on the layer's errors
    /// ([`RefreshRejected`](crate::error::RefreshRejected),
    /// [`RefreshFailed`](crate::error::RefreshFailed),
    /// [`SessionEnded`](crate::error::SessionEnded), whose source is the
    /// [`RefreshError`](crate::RefreshError)), on a `RefreshError`, and on errors that wrap
    /// them (a `reqwest_middleware::Error`, an `io::Error`, ...) as long as each passes its
    /// cause on as its `source`. Looks at most 32 errors deep.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::oauth2::{ErrorKind, OAuth2Error};
    /// use tower_auth_refresh::BoxError;
    ///
    /// /// Whether a failed request needs the user to log in again.
    /// fn needs_login(err: &BoxError) -> bool {
    ///     OAuth2Error::find(&**err).is_some_and(|e| {
    ///         e.error_code() == Some("invalid_grant") || e.kind() == ErrorKind::NoRefreshToken
    ///     })
    /// }
    /// # let _ = needs_login;
    /// ```
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a OAuth2Error> {
        let mut next = Some(err);
        for _ in 0..32 {
            let err = next?;
            if let Some(found) = err.downcast_ref::<OAuth2Error>() {
                return Some(found);
            }
            next = err.source();
        }
        None
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The token endpoint's HTTP status, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        self.status
    }

    /// The §5.2 `error` code (`invalid_grant`, ...) of an [`ErrorKind::ErrorResponse`], or
    /// the refused `token_type` of an [`ErrorKind::UnsupportedTokenType`].
    pub fn error_code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The §5.2 `error_description`, if the server sent one.
    pub fn error_description(&self) -> Option<&str> {
        self.description.as_deref()
    }
}

impl fmt::Debug for OAuth2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Error")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("error", &self.code)
            .field("error_description", &self.description)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for OAuth2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::ErrorResponse => {
                match self.status {
                    Some(status) => write!(f, "token endpoint answered {status}")?,
                    None => f.write_str("token endpoint refused the refresh")?,
                }
                if let Some(code) = &self.code {
                    write!(f, ": {code}")?;
                }
                if let Some(description) = &self.description {
                    write!(f, " ({description})")?;
                }
                Ok(())
            }
            ErrorKind::Misconfigured => {
                match self.status {
                    Some(status) => write!(f, "token endpoint answered {status}")?,
                    None => f.write_str("token endpoint refused the request")?,
                }
                f.write_str(
                    ": there is no token endpoint at the configured URI (a configuration error)",
                )?;
                if let Some(code) = &self.code {
                    write!(f, ": {code}")?;
                }
                Ok(())
            }
            ErrorKind::Redirect => match self.status {
                Some(status) => write!(
                    f,
                    "token endpoint answered {status}, a redirect; token requests never follow \
                     redirects (configure the token endpoint's final URI)"
                ),
                None => f.write_str(
                    "the client for token requests followed a redirect from the token endpoint; \
                     the answer was refused (build the client without redirects, and configure \
                     the token endpoint's final URI)",
                ),
            },
            ErrorKind::NoRefreshToken => f.write_str(
                "no refresh token to present (none was given, or a logout forgot it): log in again",
            ),
            ErrorKind::Timeout => f.write_str("token request timed out"),
            ErrorKind::Transport => f.write_str("token request failed"),
            ErrorKind::Body => f.write_str("reading the token response failed"),
            ErrorKind::BodyTooLarge => match self.limit {
                Some(limit) => write!(f, "token response body is larger than {limit} bytes"),
                None => f.write_str("token response body is too large"),
            },
            ErrorKind::ContentType => f.write_str("token response is not JSON"),
            ErrorKind::Malformed => {
                f.write_str("token response is not a valid RFC 6749 token response")
            }
            ErrorKind::MissingAccessToken => f.write_str("token response has no access_token"),
            ErrorKind::InvalidAccessToken => {
                f.write_str("token response's access_token cannot be used")
            }
            ErrorKind::UnsupportedTokenType => match &self.code {
                Some(t) => write!(f, "token response has unsupported token_type {t:?}"),
                None => f.write_str("token response has an unsupported token_type"),
            },
            ErrorKind::Persist => f.write_str("persisting the rotated refresh token failed"),
            ErrorKind::DpopNotBound => {
                f.write_str("token endpoint answered a Bearer token although DPoP was asked")
            }
            ErrorKind::DpopProof => f.write_str("the DPoP proof for the token request failed"),
            ErrorKind::Superseded => f.write_str(
                "a new refresh token was set while the token request was in flight; its answer \
                 belongs to the old session and was not used",
            ),
        }
    }
}

impl std::error::Error for OAuth2Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
