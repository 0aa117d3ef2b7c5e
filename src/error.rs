//! Error types
//!
//! The service's error type is [`BoxError`], as in tower. Failures that the
//! layer adds are the small types below; downcast to them to tell them apart. Errors of the
//! inner service pass through unchanged.
//!
//! # Example
//!
//! ```
//! use tower_auth_refresh::BoxError;
//! use tower_auth_refresh::error::{RefreshRejected, SessionEnded, UnauthorizedAfterRefresh};
//!
//! fn explain(err: &BoxError) -> &'static str {
//!     if err.is::<RefreshRejected>() || err.is::<SessionEnded>() {
//!         "log in again"
//!     } else if err.is::<UnauthorizedAfterRefresh>() {
//!         "the new token is not enough for this resource"
//!     } else {
//!         "something else"
//!     }
//! }
//! # let _ = explain;
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::BoxError;
use crate::cell::Unavailable;
pub use crate::head::{MAX_ERROR_BODY, ResponseHead};
pub use crate::refresher::LoggedOut;
use crate::refresher::RefreshError;

/// The refresher failed terminally (the refresh token was rejected: RFC 6749
/// `invalid_grant`, a token endpoint answering 401 or 403). The session has ended: later
/// requests fail with [`SessionEnded`] until new credentials are installed through the
/// [`TokenHandle`](crate::TokenHandle).
#[derive(Debug, Clone, thiserror::Error)]
#[error("token refresh rejected: the session has ended{}", after(.unauthorized.as_deref()))]
pub struct RefreshRejected {
    #[source]
    error: Arc<RefreshError>,
    unauthorized: Option<Box<ResponseHead>>,
}

/// The refresher failed transiently and its retries ran out, or an earlier refresh failed and
/// its [cool-down](crate::Cooldown) still runs (no refresh was attempted for this request).
#[derive(Debug, Clone, thiserror::Error)]
#[error("token refresh failed{}", after(.unauthorized.as_deref()))]
pub struct RefreshFailed {
    #[source]
    error: Arc<RefreshError>,
    unauthorized: Option<Box<ResponseHead>>,
    next_attempt_in: Option<Duration>,
}

fn after(head: Option<&ResponseHead>) -> String {
    head.map(|h| format!(" (after a {} response)", h.refusal()))
        .unwrap_or_default()
}

macro_rules! refresh_outcome_accessors {
    ($name:ident) => {
        impl $name {
            /// The refresher's error, shared by every request that waited on the same refresh
            /// (compare with [`Arc::ptr_eq`]).
            pub fn refresh_error(&self) -> &Arc<RefreshError> {
                &self.error
            }

            /// The 401 response that made this request ask for a refresh, if a response did
            /// (a request that found no usable token has none).
            pub fn unauthorized(&self) -> Option<&ResponseHead> {
                self.unauthorized.as_deref()
            }
        }
    };
}

refresh_outcome_accessors!(RefreshRejected);
refresh_outcome_accessors!(RefreshFailed);

impl RefreshRejected {
    pub(crate) fn new(error: Arc<RefreshError>, unauthorized: Option<ResponseHead>) -> Self {
        Self {
            error,
            unauthorized: unauthorized.map(Box::new),
        }
    }
}

impl RefreshFailed {
    pub(crate) fn new(
        error: Arc<RefreshError>,
        unauthorized: Option<ResponseHead>,
        next_attempt_in: Option<Duration>,
    ) -> Self {
        Self {
            error,
            unauthorized: unauthorized.map(Box::new),
            next_attempt_in,
        }
    }

    /// How long, from when this error was made, until a refresh may be tried again: set when
    /// the request failed fast inside the cool-down of an earlier failure.
    pub fn next_attempt_in(&self) -> Option<Duration> {
        self.next_attempt_in
    }
}

/// The request was replayed once with a refreshed token (or sent only after waiting for a
/// refresh) and was refused again; or, with a proof of possession (DPoP), replayed once with
/// a new proof after its proof was refused, and its proof was refused again
/// ([`proof_refused`](Self::proof_refused)). The layer never refreshes or replays twice for
/// one request.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "request refused with {} again after {}",
    .last.refusal(),
    if *.proof_refused { "a new proof of possession" } else { "a token refresh" }
)]
pub struct UnauthorizedAfterRefresh {
    #[source]
    first: Option<Box<ResponseHead>>,
    last: Box<ResponseHead>,
    proof_refused: bool,
}

impl UnauthorizedAfterRefresh {
    pub(crate) fn new(
        first: Option<ResponseHead>,
        last: ResponseHead,
        proof_refused: bool,
    ) -> Self {
        Self {
            first: first.map(Box::new),
            last: Box::new(last),
            proof_refused,
        }
    }

    /// Whether the replay carried the same token with a new proof of possession (the server
    /// asked for one, e.g. with a DPoP nonce) and the server refused its proof again: no
    /// token refresh ran between the two sends (the token may still come from a refresh the
    /// request waited for before its first send). `false`: refused after a token refresh.
    pub fn proof_refused(&self) -> bool {
        self.proof_refused
    }

    /// The response to the first attempt, which made the layer refresh (or, with
    /// [`proof_refused`](Self::proof_refused), ask for a new proof); `None` for a request
    /// that waited for a refresh before its only send. Also reachable through `source()`.
    pub fn first(&self) -> Option<&ResponseHead> {
        self.first.as_deref()
    }

    /// The final refusal (of the refreshed token, or with
    /// [`proof_refused`](Self::proof_refused) of the new proof), with the first bytes of its
    /// body ([`ResponseHead::body`], at most [`MAX_ERROR_BODY`]).
    pub fn last(&self) -> &ResponseHead {
        &self.last
    }
}

/// An earlier refresh failed terminally, or the session was logged out, so the layer fails
/// requests locally, without calling the refresher or the network, until new credentials are
/// installed through the [`TokenHandle`](crate::TokenHandle).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: install new credentials to send authenticated requests", if self.is_logout() { "logged out" } else { "session ended" })]
pub struct SessionEnded {
    #[source]
    cause: Arc<RefreshError>,
}

impl SessionEnded {
    pub(crate) fn new(cause: Arc<RefreshError>) -> Self {
        Self { cause }
    }

    /// The terminal refresh error that ended the session (for a logout, one whose source is
    /// [`LoggedOut`]).
    pub fn cause(&self) -> &Arc<RefreshError> {
        &self.cause
    }

    /// Whether the session ended by a logout (through the handle, or for every process
    /// sharing a token store: [`LoggedOut::is_everywhere`]), not by a refused refresh.
    pub fn is_logout(&self) -> bool {
        std::error::Error::source(&*self.cause).is_some_and(|s| s.is::<LoggedOut>())
    }
}

/// The request would carry the token over plain `http://` (or a scheme that cannot be shown
/// to be TLS, with [`any_origin`](crate::RefreshOptions::any_origin)) to a host that is not
/// loopback. Nothing was sent. Use `https://`, or opt in with
/// [`RefreshOptions::allow_insecure_http`](crate::RefreshOptions::allow_insecure_http).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "refusing to send a token over plain http (or a scheme not known to be TLS) to a host that is not loopback"
)]
pub struct InsecureTransport(());

/// [`TokenHandle::refresh`](crate::TokenHandle::refresh) was called from inside the
/// refresher: it would wait for itself forever.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("TokenHandle::refresh was called from inside the token refresher")]
pub struct ReentrantRefresh(());

impl ReentrantRefresh {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

/// Tells whether an error from the layer is one of its own authentication failures, which
/// retrying the same request cannot fix.
///
/// Use it in a `tower::retry` policy so that retries never repeat a terminal auth failure.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::BoxError;
/// use tower_auth_refresh::error::is_auth_failure;
///
/// let err: BoxError = "connection reset".into();
/// assert!(!is_auth_failure(&*err));
/// ```
pub fn is_auth_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    err.is::<RefreshRejected>()
        || err.is::<SessionEnded>()
        || err.is::<UnauthorizedAfterRefresh>()
        || err.is::<InsecureTransport>()
}

/// A request for a [keyed layer](crate::keyed) carried no key and no default key is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request has no principal key for the keyed token layer")]
pub struct MissingKey(());

impl MissingKey {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

/// The [`RequestProof`](crate::RequestProof) could not prove a send; nothing was sent.
#[derive(Debug, thiserror::Error)]
#[error("could not make the proof of possession for the request")]
pub struct ProofFailed {
    #[source]
    source: BoxError,
}

/// Every way the request protocol fails, before it becomes the front end's error type.
#[derive(Debug)]
pub(crate) enum Failure {
    Proof(BoxError),
    /// No token could be had; the 401 that asked for one, if any.
    Unavailable(Unavailable, Option<ResponseHead>),
    Insecure,
    Twice(UnauthorizedAfterRefresh),
    Reentrant,
}

impl Failure {
    /// The error as one of the public types, boxed (the tower front end).
    pub(crate) fn into_box(self) -> BoxError {
        match self {
            Self::Unavailable(Unavailable::Rejected(e), head) => {
                RefreshRejected::new(e, head).into()
            }
            Self::Unavailable(Unavailable::Failed(e), head) => {
                RefreshFailed::new(e, head, None).into()
            }
            Self::Unavailable(Unavailable::Cooling(c), head) => {
                let left = c.left;
                RefreshFailed::new(c.error, head, Some(left)).into()
            }
            Self::Unavailable(Unavailable::Ended(e), _) => SessionEnded::new(e).into(),
            Self::Insecure => InsecureTransport(()).into(),
            Self::Twice(e) => e.into(),
            Self::Reentrant => ReentrantRefresh::new().into(),
            Self::Proof(source) => ProofFailed { source }.into(),
        }
    }

    /// The error for the reqwest middleware: the same public types, wrapped.
    #[cfg(feature = "reqwest")]
    pub(crate) fn into_reqwest(self) -> reqwest_middleware::Error {
        use reqwest_middleware::Error;
        match self {
            Self::Unavailable(Unavailable::Rejected(e), head) => {
                Error::middleware(RefreshRejected::new(e, head))
            }
            Self::Unavailable(Unavailable::Failed(e), head) => {
                Error::middleware(RefreshFailed::new(e, head, None))
            }
            Self::Unavailable(Unavailable::Cooling(c), head) => {
                let left = c.left;
                Error::middleware(RefreshFailed::new(c.error, head, Some(left)))
            }
            Self::Unavailable(Unavailable::Ended(e), _) => Error::middleware(SessionEnded::new(e)),
            Self::Insecure => Error::middleware(InsecureTransport(())),
            Self::Twice(e) => Error::middleware(e),
            Self::Reentrant => Error::middleware(ReentrantRefresh::new()),
            Self::Proof(source) => Error::middleware(ProofFailed { source }),
        }
    }
}
