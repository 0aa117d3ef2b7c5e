//! A [`reqwest::Client`] as the client for token requests (feature `reqwest`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use tower_service::Service;

use super::{OAuth2Refresher, OAuth2RefresherBuilder};

/// A [`reqwest::Client`] sending token requests, for applications that use reqwest and no
/// hyper-util: made by [`OAuth2Refresher::with_reqwest`], which is all such an application
/// needs. The [`TokenRequest`](crate::TokenRequest) marker goes along in the request's
/// extensions.
///
/// Give it a plain `reqwest::Client`, not the `reqwest_middleware` client that wears the
/// [`RefreshMiddleware`](crate::reqwest::RefreshMiddleware); TLS, proxies and connection
/// pooling are the client's own. Build it with
/// [`redirect::Policy::none()`](reqwest::redirect::Policy::none), as in the example of
/// [`OAuth2Refresher::with_reqwest`].
///
/// # Redirects
///
/// A token request is never sent again to a redirect target, whatever the client's redirect
/// policy: its form (the refresh token, a `client_secret_post` secret) goes out as a body
/// reqwest cannot replay, so a 307 or 308 is returned as it is, and the refresh fails with
/// a terminal [`ErrorKind::Redirect`](super::ErrorKind::Redirect). A client that follows
/// redirects still turns a 301, 302 or 303 into a `GET` without a body to the target (reqwest
/// drops the `Authorization` header when the host, port or scheme changes); that answer is
/// refused with the same error. With `Policy::none()` nothing at all goes to a redirect target.
#[derive(Debug, Clone)]
pub struct ReqwestClient(reqwest::Client);

impl ReqwestClient {
    /// Wraps `client`.
    pub fn new(client: reqwest::Client) -> Self {
        Self(client)
    }

    /// The wrapped client.
    pub fn get_ref(&self) -> &reqwest::Client {
        &self.0
    }
}

impl From<reqwest::Client> for ReqwestClient {
    fn from(client: reqwest::Client) -> Self {
        Self(client)
    }
}

impl Service<Request<Full<Bytes>>> for ReqwestClient {
    type Response = Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // reqwest's pool takes any number of requests.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            // A streamed body, which reqwest cannot clone: even a client whose redirect policy
            // follows redirects never re-sends the form (refresh token, client secret) to a
            // 307/308 target.
            let body = reqwest::Body::wrap(Full::new(body));
            let req = reqwest::Request::try_from(Request::from_parts(parts, body))?;
            let sent = req.url().clone();
            let res = client.execute(req).await?;
            let redirected = *res.url() != sent;
            let mut res = Response::from(res);
            if redirected {
                res.extensions_mut().insert(super::grant::FollowedRedirect);
            }
            Ok(res)
        })
    }
}

impl OAuth2Refresher<ReqwestClient> {
    /// Starts a refresher for `token_endpoint` that sends token requests with a
    /// [`reqwest::Client`]; the same as [`builder`](Self::builder) otherwise (choose the
    /// client-credentials grant with [`grant`](OAuth2RefresherBuilder::grant)).
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::RefreshLayer;
    /// use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let http = reqwest::Client::new();
    /// // Token requests never follow redirects: a client of their own, built so.
    /// let token_http = reqwest::Client::builder()
    ///     .redirect(reqwest::redirect::Policy::none())
    ///     .build()?;
    /// let refresher = OAuth2Refresher::with_reqwest("https://idp.example/token".parse()?, token_http)
    ///     .client_id("app")
    ///     .client_secret("secret", ClientAuth::Basic)
    ///     .refresh_token("from-the-login")
    ///     .build()?;
    /// let layer = RefreshLayer::new(refresher);
    /// let client = reqwest_middleware::ClientBuilder::new(http)
    ///     .with(layer.reqwest_middleware())
    ///     .build();
    /// # let _ = client;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_reqwest(
        token_endpoint: Uri,
        client: reqwest::Client,
    ) -> OAuth2RefresherBuilder<ReqwestClient> {
        Self::builder(token_endpoint, ReqwestClient(client))
    }
}
