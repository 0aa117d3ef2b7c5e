use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use http::header::AUTHORIZATION;
use http_body::Body;
use tower_service::Service;

use crate::BoxError;
use crate::body::ReplayBody;
use crate::cell::{self, Lookup};
use crate::error::SessionEnded;
use crate::future::{ResponseFuture, Retry};
use crate::handle::TokenHandle;
use crate::layer::Shared;

/// Marks a request as a token request sent by a refresher: it passes through the layer
/// untouched (no token, no refresh, no replay), so a refresher that sends through a client
/// wearing this same layer cannot recurse.
///
/// Requests sent from inside a refresher's future are recognised even without the marker.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::RefreshRequest;
///
/// let mut req = http::Request::post("https://idp.example/token").body(String::new()).unwrap();
/// req.extensions_mut().insert(RefreshRequest);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshRequest;

/// Opts one request out of refresh and replay: it still gets the current token, but a 401
/// is returned to the caller as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoRefresh;

/// The service made by [`RefreshLayer`](crate::RefreshLayer): attaches the current token,
/// refreshes it once for all concurrent requests that need it, and replays a rejected request
/// once.
///
/// # Clone
///
/// Clones share the token cell. `call` sends with the service that `poll_ready` made ready
/// and keeps a clone for the next call, as tower requires.
pub struct Refresh<S, R> {
    inner: S,
    shared: Arc<Shared>,
    _refresher: PhantomData<fn() -> R>,
}

impl<S, R> Refresh<S, R> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            shared,
            _refresher: PhantomData,
        }
    }

    /// The handle to the shared token.
    pub fn handle(&self) -> TokenHandle {
        TokenHandle::new(self.shared.cell.clone())
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, R> Clone for Refresh<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            _refresher: PhantomData,
        }
    }
}

impl<S: fmt::Debug, R> fmt::Debug for Refresh<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refresh")
            .field("inner", &self.inner)
            .field("cell", &self.shared.cell)
            .finish_non_exhaustive()
    }
}

impl<S, R, B, ResBody> Service<Request<B>> for Refresh<S, R>
where
    S: Service<Request<ReplayBody<B>>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        dispatch(&self.shared, inner, req)
    }
}

/// Sends `req` through `inner` (already ready) with the token of `shared`'s cell.
#[inline]
pub(crate) fn dispatch<S, B, ResBody>(
    shared: &Arc<Shared>,
    mut inner: S,
    req: Request<B>,
) -> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = http::Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Send + 'static,
{
    let config = &shared.config;

    let untouched = req.headers().contains_key(AUTHORIZATION)
        || req.extensions().get::<RefreshRequest>().is_some()
        || !config.origin_allowed(req.uri())
        || cell::in_refresh();
    if untouched {
        return ResponseFuture::direct(inner.call(req.map(ReplayBody::passthrough)));
    }

    let (mut parts, body) = req.into_parts();
    match shared.cell.lookup() {
        Lookup::Ended(cause) => ResponseFuture::failed(SessionEnded::new(cause).into()),
        Lookup::Ready {
            generation,
            header,
            ahead,
            attempts,
        } => {
            if ahead {
                shared.cell.refresh_ahead();
            }
            if parts.extensions.get::<NoRefresh>().is_some() {
                parts.headers.insert(AUTHORIZATION, header);
                let req = Request::from_parts(parts, ReplayBody::passthrough(body));
                return ResponseFuture::direct(inner.call(req));
            }
            let (body, source) = ReplayBody::new(body, config.max_replay_body);
            // The head is kept without the token (the replay sets a newer one); a request
            // without headers then clones without allocating.
            let head = source.as_ref().map(|_| parts.clone());
            parts.headers.insert(AUTHORIZATION, header);
            let fut = inner.call(Request::from_parts(parts, body));
            let retry = Retry {
                svc: inner,
                shared: shared.clone(),
                head,
                body: source,
                generation,
                attempts,
            };
            ResponseFuture::first(fut, retry)
        }
        Lookup::Refresh {
            generation,
            attempts,
        } => {
            let no_refresh = parts.extensions.get::<NoRefresh>().is_some();
            let (body, source) = if no_refresh {
                (ReplayBody::passthrough(body), None)
            } else {
                ReplayBody::new(body, config.max_replay_body)
            };
            let retry = Retry {
                svc: inner,
                shared: shared.clone(),
                head: Some(parts),
                body: source,
                generation,
                attempts,
            };
            ResponseFuture::after_refresh(retry, body, no_refresh)
        }
    }
}
