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
/// pooling are the client's own.
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
            let req = reqwest::Request::try_from(Request::from_parts(parts, body))?;
            Ok(Response::from(client.execute(req).await?))
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
    /// let refresher = OAuth2Refresher::with_reqwest("https://idp.example/token".parse()?, http.clone())
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
