use std::fmt;
use std::task::{Context, Poll};

use http::Request;
use http_body::Body;
use tower_service::Service;

use crate::BoxError;
use crate::body::ReplayBody;
use crate::future::{Replayer, ResponseFuture, Template, dispatch, template_of};
use crate::handle::TokenHandle;
use crate::shared::Shared;

/// The service made by [`RefreshLayer`](crate::RefreshLayer): attaches the current token,
/// refreshes it once for all concurrent requests that need it, and replays a rejected request
/// once.
///
/// # Clone
///
/// Clones share the token cell and the options. `call` sends with the service that
/// `poll_ready` made ready, as tower requires; a replay readies a clone of the inner service
/// (for a service larger than two words, a clone of one copy the layer keeps, so that such
/// a service is not cloned for every request; [`get_mut`](Self::get_mut) renews that copy).
/// A request that must wait for a token first gives the readied service up while it waits
/// (so a concurrency limit below the layer is free for the token request) and readies a
/// clone before it is sent.
pub struct Refresh<S> {
    inner: S,
    /// The copy replays are sent through, for a service too large to clone per request (see
    /// `Replayer`); made at the first `call`, dropped by `get_mut`.
    template: Option<Template<S>>,
    shared: Shared,
}

impl<S> Refresh<S> {
    pub(crate) fn from_shared(inner: S, shared: Shared) -> Self {
        Self {
            inner,
            template: None,
            shared,
        }
    }

    /// The handle to the shared token.
    pub fn token_handle(&self) -> TokenHandle {
        TokenHandle::new(self.shared.clone())
    }

    /// Sends `req` through a clone of the inner service, readied first: the counterpart of
    /// hyper-util's inherent `Client::request`, for code that cannot name the readiness
    /// dance. Its future has no bounds of its own, so it can be awaited inside a future
    /// handed to `tokio::spawn` with any body type (going through `ServiceExt::oneshot`, rustc
    /// cannot prove that for bodies such as `BoxBody<Bytes, BoxError>`).
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http_body_util::{combinators::BoxBody, BodyExt, Full};
    /// use tower::{service_fn, Layer};
    /// use tower_auth_refresh::{refresh_fn, BoxError, RefreshError, RefreshLayer, ReplayBody, Token};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), BoxError> {
    /// let layer = RefreshLayer::new(refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) }));
    /// let svc = layer.layer(service_fn(|_req: http::Request<ReplayBody<BoxBody<Bytes, BoxError>>>| async {
    ///     Ok::<_, Infallible>(http::Response::new(String::new()))
    /// }));
    /// let body = Full::new(Bytes::from_static(b"{}")).map_err(Into::into).boxed();
    /// let req = http::Request::post("/orders").body(body)?;
    /// let res = tokio::spawn(async move { svc.request(req).await }).await??;
    /// assert_eq!(res.status(), 200);
    /// # Ok(())
    /// # }
    /// ```
    pub fn request<B, ResBody>(
        &self,
        req: Request<B>,
    ) -> ResponseFuture<S, B, S::Future, http::Response<ResBody>>
    where
        S: Service<Request<ReplayBody<B>>, Response = http::Response<ResBody>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        ResBody: Body + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let replayer = Replayer::of(&self.inner, self.template.as_ref());
        ResponseFuture::readying(self.inner.clone(), replayer, self.shared.clone(), req)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably. Replays go through the service as changed here.
    pub fn get_mut(&mut self) -> &mut S {
        self.template = None;
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Refresh<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            template: self.template.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Refresh<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refresh")
            .field("inner", &self.inner)
            .field("cell", &self.shared.cell())
            .finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Service<Request<B>> for Refresh<S>
where
    S: Service<Request<ReplayBody<B>>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, S::Future, http::Response<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The request goes through the readied service; a replay through a clone (see
        // tower-service's "Be careful when cloning inner services").
        let template = template_of(&self.inner, &mut self.template);
        dispatch(
            &self.shared,
            &mut self.inner,
            |inner| Replayer::of(inner, template),
            req,
        )
    }
}
