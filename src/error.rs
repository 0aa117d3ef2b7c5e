//! Error types
//!
//! The service's error type is [`BoxError`](crate::BoxError), as in tower. Failures that the
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

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, StatusCode, Version};

use crate::refresher::RefreshError;

/// The status line and headers of a response, kept as context for an error.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

impl ResponseHead {
    pub(crate) fn from_parts(parts: &http::response::Parts) -> Self {
        Self {
            status: parts.status,
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    /// The response's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The response's headers (for instance `WWW-Authenticate`).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

macro_rules! refresh_outcome_error {
    ($(#[$doc:meta])* $name:ident, $msg:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name {
            error: Arc<RefreshError>,
            unauthorized: Option<Box<ResponseHead>>,
        }

        impl $name {
            pub(crate) fn new(error: Arc<RefreshError>, unauthorized: Option<ResponseHead>) -> Self {
                Self { error, unauthorized: unauthorized.map(Box::new) }
            }

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

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($msg)?;
                if let Some(head) = &self.unauthorized {
                    write!(f, " (after a {} response)", head.status)?;
                }
                Ok(())
            }
        }

        impl std::error::Error for $name {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&*self.error)
            }
        }
    };
}

refresh_outcome_error!(
    /// The refresher failed terminally (the refresh token was rejected: RFC 6749
    /// `invalid_grant`, a token endpoint answering 401 or 403). The session has ended: later
    /// requests fail with [`SessionEnded`] until new credentials are installed through the
    /// [`TokenHandle`](crate::TokenHandle).
    RefreshRejected,
    "token refresh rejected: the session has ended"
);

refresh_outcome_error!(
    /// The refresher failed transiently and the retries ran out. The next request tries
    /// again.
    RefreshFailed,
    "token refresh failed"
);

impl RefreshRejected {
    /// Always true; lets code that holds a `&dyn Error` ask without downcasting twice.
    pub fn is_terminal(&self) -> bool {
        true
    }
}

impl RefreshFailed {
    /// Always true: a later attempt may succeed.
    pub fn is_transient(&self) -> bool {
        true
    }
}

/// The request was replayed once with a refreshed token and was refused again. The layer
/// never replays twice.
#[derive(Debug, Clone)]
pub struct UnauthorizedAfterRefresh {
    first: Box<ResponseHead>,
    second: Box<ResponseHead>,
}

impl UnauthorizedAfterRefresh {
    pub(crate) fn new(first: ResponseHead, second: ResponseHead) -> Self {
        Self {
            first: Box::new(first),
            second: Box::new(second),
        }
    }

    /// The response to the first attempt, which made the layer refresh.
    pub fn first(&self) -> &ResponseHead {
        &self.first
    }

    /// The response to the replay, with the refreshed token.
    pub fn second(&self) -> &ResponseHead {
        &self.second
    }
}

impl fmt::Display for UnauthorizedAfterRefresh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request refused with {} again after a token refresh (first response: {})",
            self.second.status, self.first.status
        )
    }
}

impl std::error::Error for UnauthorizedAfterRefresh {}

/// An earlier refresh failed terminally, so the layer fails requests locally, without calling
/// the refresher or the network, until new credentials are installed through the
/// [`TokenHandle`](crate::TokenHandle).
#[derive(Debug, Clone)]
pub struct SessionEnded {
    cause: Arc<RefreshError>,
}

impl SessionEnded {
    pub(crate) fn new(cause: Arc<RefreshError>) -> Self {
        Self { cause }
    }

    /// The terminal refresh error that ended the session.
    pub fn cause(&self) -> &Arc<RefreshError> {
        &self.cause
    }
}

impl fmt::Display for SessionEnded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("session ended: install new credentials to send authenticated requests")
    }
}

impl std::error::Error for SessionEnded {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
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
    err.is::<RefreshRejected>() || err.is::<SessionEnded>() || err.is::<UnauthorizedAfterRefresh>()
}

/// A request for a [keyed layer](crate::keyed) carried no key and no default key is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingKey(());

impl MissingKey {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request has no principal key for the keyed token layer")
    }
}

impl std::error::Error for MissingKey {}
