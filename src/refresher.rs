//! The pluggable source of new tokens.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::BoxError;
use crate::token::{InvalidToken, Token};

/// Produces a new access token when the current one went stale (or there is none yet).
///
/// The layer calls [`refresh`](Self::refresh) at most once per token generation, however
/// many requests need a new token at the same time, and runs the returned future to
/// completion even if every request waiting for it is dropped: a rotating refresh token may
/// already be spent on the server once the request is out, so the answer must not be lost.
///
/// A blanket implementation makes any `Fn(Option<Token>) -> impl Future` a refresher;
/// [`refresh_fn`] helps the compiler infer the closure's type.
///
/// # Errors
///
/// A [`RefreshError`] says whether the failure is *terminal* (the credentials are no good:
/// RFC 6749 `invalid_grant`, a token endpoint answering 401/403; the session ends) or
/// *transient* (network, 5xx, 429, "refresh already in progress"; retried with backoff).
///
/// # Example
///
/// ```
/// use std::future::Ready;
/// use tower_auth_refresh::{RefreshError, Token, TokenRefresher};
///
/// /// A refresher that reads the token a sidecar keeps up to date.
/// struct FromSidecar;
///
/// impl TokenRefresher for FromSidecar {
///     type Future = Ready<Result<Token, RefreshError>>;
///
///     fn refresh(&self, _stale: Option<Token>) -> Self::Future {
///         std::future::ready(Token::bearer("from-sidecar").map_err(RefreshError::from))
///     }
/// }
/// ```
pub trait TokenRefresher: Send + Sync + 'static {
    /// The future that resolves to the new token.
    type Future: Future<Output = Result<Token, RefreshError>> + Send + 'static;

    /// Starts a refresh. `stale` is the token that was rejected or expired, `None` when the
    /// layer has no token yet.
    fn refresh(&self, stale: Option<Token>) -> Self::Future;
}

impl<F, Fut> TokenRefresher for F
where
    F: Fn(Option<Token>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    type Future = Fut;

    fn refresh(&self, stale: Option<Token>) -> Fut {
        self(stale)
    }
}

/// Turns an async closure into a [`TokenRefresher`], pinning down the closure's argument type.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
///
/// let layer = RefreshLayer::new(refresh_fn(|_stale| async {
///     // Ask your identity provider here.
///     Ok::<_, RefreshError>(Token::bearer("fresh")?)
/// }));
/// # let _ = layer;
/// ```
pub fn refresh_fn<F, Fut>(f: F) -> F
where
    F: Fn(Option<Token>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    f
}

/// Why a refresh failed, and whether trying again can help.
///
/// Its `Display` names the kind of failure; the cause is reachable through
/// [`source`](std::error::Error::source). Refreshers must not put token text into the cause.
///
/// # Example
///
/// ```
/// use http::StatusCode;
/// use tower_auth_refresh::RefreshError;
///
/// assert!(RefreshError::from_status(StatusCode::UNAUTHORIZED).is_terminal());
/// assert!(RefreshError::from_status(StatusCode::SERVICE_UNAVAILABLE).is_transient());
/// ```
pub struct RefreshError {
    terminal: bool,
    retry_after: Option<Duration>,
    source: BoxError,
}

impl RefreshError {
    /// A failure that retrying cannot fix: the refresh token was revoked or rejected. The
    /// session ends until new credentials are installed through the
    /// [`TokenHandle`](crate::TokenHandle).
    pub fn terminal(source: impl Into<BoxError>) -> Self {
        Self {
            terminal: true,
            retry_after: None,
            source: source.into(),
        }
    }

    /// A failure that may pass: network error, 5xx, 429, "refresh already in progress".
    /// Retried with backoff before it reaches callers.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            terminal: false,
            retry_after: None,
            source: source.into(),
        }
    }

    /// Classifies a token endpoint's HTTP status: 400, 401, 403 and 422 are terminal,
    /// anything else (5xx, 429, ...) is transient.
    pub fn from_status(status: http::StatusCode) -> Self {
        let source = StatusError(status);
        match status.as_u16() {
            400 | 401 | 403 | 422 => Self::terminal(source),
            _ => Self::transient(source),
        }
    }

    /// Asks the retry loop to wait at least this long before the next attempt (a
    /// `Retry-After` header, for instance).
    #[must_use]
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// True if retrying cannot help and the session ends.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// True if a later attempt may succeed.
    pub fn is_transient(&self) -> bool {
        !self.terminal
    }

    /// The delay asked for by [`with_retry_after`](Self::with_retry_after).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Debug for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshError")
            .field("terminal", &self.terminal)
            .field("retry_after", &self.retry_after)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terminal {
            f.write_str("token refresh rejected")
        } else {
            f.write_str("token refresh failed")
        }
    }
}

impl std::error::Error for RefreshError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A token that cannot be used is a transient failure: the next attempt may get a good one.
impl From<InvalidToken> for RefreshError {
    fn from(err: InvalidToken) -> Self {
        Self::transient(err)
    }
}

/// The token endpoint answered with an unexpected HTTP status.
#[derive(Debug, Clone, Copy)]
struct StatusError(http::StatusCode);

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token endpoint answered {}", self.0)
    }
}

impl std::error::Error for StatusError {}
