//! The pluggable source of new tokens.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::BoxError;
use crate::head::ResponseHead;
use crate::token::{InvalidToken, Token};

/// Why the layer asks for a new token.
///
/// Handed to the refresher inside a [`RefreshContext`], so a refresher can react to the
/// response that caused the refresh (a step-up challenge, a claims or nonce challenge in
/// `WWW-Authenticate`), or tell a proactive refresh from a forced one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RefreshReason {
    /// The layer has no token yet (the first request, or after an invalidate).
    NoToken,
    /// The token is expired or inside the expiry leeway.
    Expired,
    /// A response asked for a new token (by default a 401). The head keeps its status and
    /// headers, `WWW-Authenticate` challenges included; never its body.
    Unauthorized(ResponseHead),
    /// [`TokenHandle::refresh`](crate::TokenHandle::refresh) asked for it.
    Forced,
    /// A background refresh inside the refresh-ahead window; the current token is still valid.
    Background,
}

/// What a refresher is told about a refresh: the stale token and why a new one is needed.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::{context_fn, RefreshContext, RefreshError, RefreshReason, Token};
///
/// let refresher = context_fn(|ctx: RefreshContext| async move {
///     if let RefreshReason::Unauthorized(head) = ctx.reason() {
///         // Look at head.headers().get_all("www-authenticate") for a step-up challenge.
///         let _ = head.status();
///     }
///     Ok::<_, RefreshError>(Token::bearer("fresh")?)
/// });
/// # let _ = refresher;
/// ```
#[derive(Debug, Clone)]
pub struct RefreshContext {
    stale: Option<Token>,
    reason: RefreshReason,
}

impl RefreshContext {
    /// A context, for refreshers that call other refreshers (decorators) and for tests.
    pub fn new(stale: Option<Token>, reason: RefreshReason) -> Self {
        Self { stale, reason }
    }

    /// The token that was rejected or expired, `None` when the layer has none.
    pub fn stale(&self) -> Option<&Token> {
        self.stale.as_ref()
    }

    /// Takes the stale token out of the context.
    pub fn into_stale(self) -> Option<Token> {
        self.stale
    }

    /// Why the refresh was asked for.
    pub fn reason(&self) -> &RefreshReason {
        &self.reason
    }
}

/// Produces a new access token when the current one went stale (or there is none yet).
///
/// The layer never runs two calls of [`refresh`](Self::refresh) at once, however many
/// requests need a new token at the same time (one call per token generation; a transient
/// failure is retried as [`Backoff`](crate::Backoff) says, and tried again after the
/// cool-down), and runs the returned future to
/// completion even if every request waiting for it is dropped: a rotating refresh token may
/// already be spent on the server once the request is out, so the answer must not be lost.
///
/// A blanket implementation makes any `Fn(Option<Token>) -> impl Future` a refresher (it is
/// given the stale token); [`refresh_fn`] helps the compiler infer the closure's type, and
/// [`context_fn`] makes a refresher of a closure that wants the whole [`RefreshContext`].
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
/// use tower_auth_refresh::{RefreshContext, RefreshError, Token, TokenRefresher};
///
/// /// A refresher that reads the token a sidecar keeps up to date.
/// struct FromSidecar;
///
/// impl TokenRefresher for FromSidecar {
///     type Future = Ready<Result<Token, RefreshError>>;
///
///     fn refresh(&self, _ctx: RefreshContext) -> Self::Future {
///         std::future::ready(Token::bearer("from-sidecar").map_err(RefreshError::from))
///     }
/// }
/// ```
pub trait TokenRefresher: Send + Sync + 'static {
    /// The future that resolves to the new token.
    type Future: Future<Output = Result<Token, RefreshError>> + Send + 'static;

    /// Starts a refresh. The context holds the token that was rejected or expired (`None`
    /// when the layer has no token yet) and the reason for the refresh.
    fn refresh(&self, ctx: RefreshContext) -> Self::Future;

    /// Called when the session is logged out through
    /// [`TokenHandle::clear`](crate::TokenHandle::clear): a refresher that holds credentials of
    /// its own (a refresh token) forgets them, so a later forced refresh cannot silently log
    /// the old user back in. The default does nothing.
    fn logout(&self) {}
}

impl<F, Fut> TokenRefresher for F
where
    F: Fn(Option<Token>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    type Future = Fut;

    fn refresh(&self, ctx: RefreshContext) -> Fut {
        self(ctx.into_stale())
    }
}

/// A refresher made of a closure over the whole [`RefreshContext`]; see [`context_fn`].
#[derive(Clone)]
pub struct ContextFn<F>(F);

impl<F> fmt::Debug for ContextFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ContextFn")
            .field(&std::any::type_name::<F>())
            .finish()
    }
}

impl<F, Fut> TokenRefresher for ContextFn<F>
where
    F: Fn(RefreshContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    type Future = Fut;

    fn refresh(&self, ctx: RefreshContext) -> Fut {
        (self.0)(ctx)
    }
}

/// Turns an async closure over a [`RefreshContext`] into a [`TokenRefresher`], for refreshers
/// that need to know why they are asked (the 401's `WWW-Authenticate` challenge, a forced or
/// background refresh).
///
/// # Example
///
/// ```
/// use tower_auth_refresh::{context_fn, RefreshError, RefreshLayer, RefreshReason, Token};
///
/// let layer = RefreshLayer::new(context_fn(|ctx| async move {
///     let forced = matches!(ctx.reason(), RefreshReason::Forced);
///     Ok::<_, RefreshError>(Token::bearer(if forced { "forced" } else { "fresh" })?)
/// }));
/// # let _ = layer;
/// ```
pub fn context_fn<F, Fut>(f: F) -> ContextFn<F>
where
    F: Fn(RefreshContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    ContextFn(f)
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
        if self.source.is::<LoggedOut>() {
            f.write_str("logged out")
        } else if self.terminal {
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

/// The cause of a [`SessionEnded`](crate::error::SessionEnded) after a logout, not a refusal
/// of the credentials: through [`TokenHandle::clear`](crate::TokenHandle::clear), or for
/// every process sharing a token store (`store::StoreRefresher::log_out_everywhere`, feature
/// `store`).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{}", if self.everywhere {
    "logged out in the token store, for every process that shares it"
} else {
    "logged out through the token handle"
})]
pub struct LoggedOut {
    everywhere: bool,
}

impl LoggedOut {
    pub(crate) fn new() -> Self {
        Self { everywhere: false }
    }

    /// The logout recorded in a token store, found by a refresh of any process.
    #[cfg_attr(not(feature = "store"), allow(dead_code))]
    pub(crate) fn everywhere() -> Self {
        Self { everywhere: true }
    }

    /// Whether the session was logged out in a token store, for every process that shares
    /// it, rather than through this process's token handle.
    pub fn is_everywhere(&self) -> bool {
        self.everywhere
    }
}
