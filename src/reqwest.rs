//! A [`reqwest_middleware::Middleware`] with the same semantics as the tower layer (feature
//! `reqwest`).
//!
//! [`RefreshMiddleware`] is made from a [`RefreshLayer`] and shares its token cell: the layer,
//! every tower service it made, every middleware made from it and their
//! [`TokenHandle`]s see one token, one refresh in flight at a time and one generation counter.
//! A tower client and a reqwest client built from the same layer therefore never refresh twice
//! for the same stale token.
//!
//! # How a request goes through
//!
//! Exactly as in the tower layer (see the [crate documentation](crate)):
//!
//! 1. A request that already has an `Authorization` header, carries the
//!    [`RefreshRequest`] marker (`.with_extension(RefreshRequest)`), is for an origin outside
//!    [`RefreshLayer::allowed_origins`], or is sent from inside a refresher passes through
//!    untouched.
//! 2. After a terminal refresh failure the request fails fast with
//!    [`SessionEnded`], without a network call. With no usable token it waits for a refresh.
//! 3. `Authorization` is set (marked sensitive) and the request is sent. A request marked
//!    [`NoRefresh`] stops here: a 401 is returned as it is.
//! 4. If the response asks for a refresh (by default a 401 not excluded by RFC 6750), the
//!    request gets a token newer than the one it was sent with (the one already there, the
//!    refresh in flight, or a new refresh) and is replayed **once**. A second refusal is
//!    [`UnauthorizedAfterRefresh`].
//!
//! # Which bodies are replayed
//!
//! - Bodies that reqwest can clone (`String`, `Vec<u8>`, `Bytes`, `&'static str`, JSON and form
//!   bodies, no body): copied with [`reqwest::Request::try_clone`] before the first send.
//! - Streaming bodies of known size up to [`RefreshLayer::max_replay_body`] (for instance
//!   `reqwest::Body::wrap` around an in-memory body): kept as they stream out, as the tower
//!   layer does.
//! - Other streaming bodies are sent once. If that send is refused, the caller gets the 401
//!   response, after the refresh has run, so a retry by the caller goes out with the new
//!   token. Such a request never fails before its first send for being impossible to clone.
//!
//! # Errors
//!
//! The middleware's own failures are [`reqwest_middleware::Error::Middleware`] wrapping one of
//! the types of [`error`](crate::error): [`RefreshRejected`], [`RefreshFailed`],
//! [`SessionEnded`] or [`UnauthorizedAfterRefresh`]. Downcast to tell them apart. Errors of
//! the client and of later middleware pass through unchanged.
//!
//! ```
//! use reqwest_middleware::Error;
//! use tower_auth_refresh::error::{
//!     is_auth_failure, RefreshRejected, SessionEnded, UnauthorizedAfterRefresh,
//! };
//!
//! fn explain(err: &Error) -> &'static str {
//!     let Error::Middleware(e) = err else {
//!         return "a network error";
//!     };
//!     if e.is::<RefreshRejected>() || e.is::<SessionEnded>() {
//!         "log in again"
//!     } else if let Some(twice) = e.downcast_ref::<UnauthorizedAfterRefresh>() {
//!         let _ = twice.second().headers(); // the second `WWW-Authenticate`, for one
//!         "the new token is not enough for this resource"
//!     } else if is_auth_failure(&**e) {
//!         "another failure of the refresh layer"
//!     } else {
//!         "another middleware's error"
//!     }
//! }
//! # let _ = explain;
//! ```
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
//!
//! let layer = RefreshLayer::new(refresh_fn(|_stale| async {
//!     Ok::<_, RefreshError>(Token::bearer("fresh")?.with_expires_in(Duration::from_secs(3600)))
//! }));
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(layer.reqwest_middleware())
//!     .build();
//! // `client.get(...).send().await` now carries the token and refreshes it when needed.
//! # let _ = client;
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::Extensions;
use http::header::AUTHORIZATION;
use reqwest::{Request, Response, Url};
use reqwest_middleware::{Error, Middleware, Next};

use crate::body::{ReplayBody, ReplaySource};
use crate::cell::{self, Lookup, ObtainError};
use crate::error::{
    RefreshFailed, RefreshRejected, ResponseHead, SessionEnded, UnauthorizedAfterRefresh,
};
use crate::handle::TokenHandle;
use crate::layer::{Config, RefreshLayer, Shared};
use crate::service::{NoRefresh, RefreshRequest};

/// A [`reqwest_middleware::Middleware`] that attaches the token of a [`RefreshLayer`],
/// refreshes it once for all concurrent requests that need it, and replays a rejected request
/// once. See the [module documentation](self) for the details.
///
/// Made by [`RefreshMiddleware::from_layer`] or [`RefreshLayer::reqwest_middleware`]. Clones
/// share the token cell.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::reqwest::RefreshMiddleware;
/// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
///
/// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
/// let layer = RefreshLayer::new(refresher)
///     .initial_token(Token::bearer("from-login")?);
/// let middleware = RefreshMiddleware::from_layer(&layer);
///
/// // Debug never shows the token.
/// assert!(!format!("{middleware:?}").contains("from-login"));
///
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(middleware)
///     .build();
/// # let _ = client;
/// # Ok::<(), tower_auth_refresh::InvalidToken>(())
/// ```
#[derive(Clone)]
pub struct RefreshMiddleware {
    shared: Arc<Shared>,
}

impl RefreshMiddleware {
    /// A middleware sharing `layer`'s token cell, handle and configuration (as it is now:
    /// options set on the layer afterwards do not reach this middleware).
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::reqwest::RefreshMiddleware;
    /// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
    ///
    /// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
    /// let layer = RefreshLayer::new(refresher);
    /// let middleware = RefreshMiddleware::from_layer(&layer);
    /// layer.handle().set_token(Token::bearer("from-login")?);
    /// assert_eq!(middleware.token_handle().state().generation(), 1);
    /// # Ok::<(), tower_auth_refresh::InvalidToken>(())
    /// ```
    pub fn from_layer<R>(layer: &RefreshLayer<R>) -> Self {
        Self {
            shared: layer.shared().clone(),
        }
    }

    /// The handle to the shared token (the same as [`RefreshLayer::handle`]).
    ///
    /// Named `token_handle` because [`Middleware::handle`] is the middleware's entry point.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
    ///
    /// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
    /// let layer = RefreshLayer::new(refresher);
    /// let middleware = layer.reqwest_middleware();
    /// middleware.token_handle().set_token(Token::bearer("from-login")?);
    /// assert!(layer.handle().state().has_token());
    /// # Ok::<(), tower_auth_refresh::InvalidToken>(())
    /// ```
    pub fn token_handle(&self) -> TokenHandle {
        TokenHandle::new(self.shared.cell.clone())
    }

    /// One request through the middleware: the reqwest counterpart of the tower `dispatch`.
    async fn send(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let shared = &self.shared;
        let config = &shared.config;

        let untouched = req.headers().contains_key(AUTHORIZATION)
            || extensions.get::<RefreshRequest>().is_some()
            || !origin_allowed(config, req.url())
            || cell::in_refresh();
        if untouched {
            return next.run(req, extensions).await;
        }

        let (generation, attempts) = match shared.cell.lookup() {
            Lookup::Ended(cause) => {
                tracing::debug!("session ended; failing the request without sending it");
                return Err(Error::middleware(SessionEnded::new(cause)));
            }
            Lookup::Ready {
                generation,
                attempts,
                header,
                ahead,
            } => {
                if ahead {
                    shared.cell.refresh_ahead();
                }
                req.headers_mut().insert(AUTHORIZATION, header);
                (generation, attempts)
            }
            Lookup::Refresh {
                generation,
                attempts,
            } => {
                tracing::debug!(generation, "no usable token; waiting for a refresh");
                let fresh = shared
                    .cell
                    .fresher_than(generation, attempts)
                    .await
                    .map_err(|e| obtain_error(e, None))?;
                req.headers_mut().insert(AUTHORIZATION, fresh.header);
                (fresh.generation, fresh.attempts)
            }
        };

        if extensions.get::<NoRefresh>().is_some() {
            return next.run(req, extensions).await;
        }

        let replay = if config.may_replay(req.method()) {
            Replay::prepare(&mut req, config.max_replay_body)
        } else {
            None
        };
        let first = next.clone().run(req, &mut *extensions).await?;
        if !config.triggers(first.status(), first.headers()) {
            return Ok(first);
        }

        // As in the tower layer: the refresh overlaps the wait for a body still being sent.
        let again = async {
            match replay {
                Some(replay) => replay.into_request(config.replay_body_wait).await,
                None => None,
            }
        };
        let (fresh, again) =
            futures_util::future::join(shared.cell.fresher_than(generation, attempts), again).await;
        let Some(mut again) = again else {
            // Not replayable: the caller gets the response, after the refresh.
            tracing::debug!(
                generation,
                status = first.status().as_u16(),
                "request cannot be replayed; refreshed for later requests"
            );
            return Ok(first);
        };
        let first_head = ResponseHead::from_reqwest(first);
        let fresh = match fresh {
            Ok(fresh) => fresh,
            Err(err) => return Err(obtain_error(err, Some(first_head))),
        };
        again.headers_mut().insert(AUTHORIZATION, fresh.header);
        tracing::debug!(
            stale_generation = generation,
            generation = fresh.generation,
            method = %again.method(),
            "replaying request with a fresh token"
        );
        let second = next.run(again, extensions).await?;
        if config.triggers(second.status(), second.headers()) {
            tracing::debug!(
                generation = fresh.generation,
                status = second.status().as_u16(),
                "request refused again after a token refresh"
            );
            return Err(Error::middleware(UnauthorizedAfterRefresh::new(
                first_head,
                ResponseHead::from_reqwest(second),
            )));
        }
        Ok(second)
    }
}

impl<R> RefreshLayer<R> {
    /// A [`reqwest_middleware::Middleware`] sharing this layer's token cell and handle (same
    /// as [`RefreshMiddleware::from_layer`]).
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
    ///
    /// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
    /// let layer = RefreshLayer::new(refresher);
    /// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
    ///     .with(layer.reqwest_middleware())
    ///     .build();
    /// # let _ = client;
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
    pub fn reqwest_middleware(&self) -> RefreshMiddleware {
        RefreshMiddleware::from_layer(self)
    }
}

impl fmt::Debug for RefreshMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshMiddleware")
            .field("cell", &self.shared.cell)
            .field("max_replay_body", &self.shared.config.max_replay_body)
            .field("replay_methods", &self.shared.config.replay_methods)
            .finish_non_exhaustive()
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// Written out instead of `#[async_trait]`, which this crate does not depend on; the signature
// is the one `async_trait` generates for `Middleware::handle`.
impl Middleware for RefreshMiddleware {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        req: Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> BoxFuture<'async_trait, reqwest_middleware::Result<Response>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.send(req, extensions, next))
    }
}

/// What a request keeps to replay itself once.
enum Replay {
    /// A full copy made before the first send (the body is in memory).
    Copy(Request),
    /// The request without its body, and the body captured as it streams out.
    Captured {
        head: Request,
        body: ReplaySource<reqwest::Body>,
    },
}

impl Replay {
    /// Prepares the replay of `req` before its first send, or `None` when its body cannot be
    /// replayed (a stream of unknown size or larger than `cap`).
    fn prepare(req: &mut Request, cap: usize) -> Option<Self> {
        if let Some(copy) = req.try_clone() {
            return Some(Self::Copy(copy));
        }
        // Only a streaming body makes `try_clone` fail.
        let body = req.body_mut().take()?;
        let small = http_body::Body::size_hint(&body)
            .exact()
            .is_some_and(|n| n <= cap as u64);
        if !small {
            *req.body_mut() = Some(body);
            return None;
        }
        // Without its body the request clones, private settings (timeout) included.
        let head = req.try_clone();
        let (body, source) = ReplayBody::new(body, cap);
        *req.body_mut() = Some(reqwest::Body::wrap(body));
        Some(Self::Captured {
            head: head?,
            body: source?,
        })
    }

    /// The request to replay, if its body is complete (waiting up to `patience` for the
    /// first send to let go of it).
    async fn into_request(self, patience: Duration) -> Option<Request> {
        match self {
            Self::Copy(req) => Some(req),
            Self::Captured { mut head, body } => {
                body.settle(patience).await;
                *head.body_mut() = Some(reqwest::Body::wrap(body.take()?));
                Some(head)
            }
        }
    }
}

/// Whether the token may go to `url`'s origin.
fn origin_allowed(config: &Config, url: &Url) -> bool {
    if config.origins.is_none() {
        return true;
    }
    let Some(host) = url.host_str() else {
        return false;
    };
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    http::Uri::builder()
        .scheme(url.scheme())
        .authority(authority)
        .path_and_query("/")
        .build()
        .is_ok_and(|uri| config.origin_allowed(&uri))
}

/// The typed error for a refresh that gave no token, as the tower layer's `obtain_error`.
fn obtain_error(err: ObtainError, unauthorized: Option<ResponseHead>) -> Error {
    match err {
        ObtainError::Rejected(e) => Error::middleware(RefreshRejected::new(e, unauthorized)),
        ObtainError::Failed(e) => Error::middleware(RefreshFailed::new(e, unauthorized)),
        ObtainError::Ended(e) => Error::middleware(SessionEnded::new(e)),
    }
}

impl ResponseHead {
    /// The head of a reqwest response (its body is dropped).
    pub(crate) fn from_reqwest(res: Response) -> Self {
        let (parts, _body) = http::Response::from(res).into_parts();
        Self::from_parts(&parts)
    }
}
