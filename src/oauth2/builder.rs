//! The builder of [`OAuth2Refresher`], client authentication and endpoint checks.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Uri;
use http::header::HeaderValue;

use super::error::{ConfigError, ConfigErrorKind};
use super::grant::{Auth, Grant, RESERVED_PARAMS};
use super::{Hook, Inner, OAuth2Refresher, REDACTED, RefreshToken};
use crate::BoxError;

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
///
/// A public client has no secret: leave out
/// [`client_secret`](OAuth2RefresherBuilder::client_secret), and its `client_id` (if set) is
/// sent in the form body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// `client_secret_basic`: `Authorization: Basic base64(urlencode(id):urlencode(secret))`.
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post,
}

/// Builds an [`OAuth2Refresher`]; made by [`OAuth2Refresher::builder`] or
/// [`OAuth2Refresher::client_credentials`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # use bytes::Bytes;
/// # use http_body_util::Full;
/// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
/// # });
///
/// let refresher = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
///     .client_id("app")
///     .client_secret("secret", ClientAuth::Basic)
///     .refresh_token("rt")
///     .timeout(Duration::from_secs(3))
///     .transient_error_codes(["rotation_in_progress", "try_again"])
///     .build()?;
/// # let _ = refresher;
/// # Ok(())
/// # }
/// ```
pub struct OAuth2RefresherBuilder<C> {
    pub(super) endpoint: Uri,
    pub(super) client: C,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<(String, ClientAuth)>,
    pub(super) refresh_token: Option<RefreshToken>,
    pub(super) grant: Grant,
    pub(super) scope: Option<String>,
    pub(super) resources: Vec<String>,
    pub(super) audience: Option<String>,
    pub(super) extra_params: Vec<(String, String)>,
    pub(super) timeout: Duration,
    pub(super) max_body: usize,
    pub(super) transient_codes: Vec<Box<str>>,
    pub(super) terminal_codes: Vec<Box<str>>,
    pub(super) allow_insecure: bool,
    pub(super) hook: Option<Hook>,
    pub(super) dpop: super::dpop::DpopSettings,
}

impl<C> fmt::Debug for OAuth2RefresherBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2RefresherBuilder")
            .field("token_endpoint", &ShownEndpoint(&self.endpoint))
            .field("client_id", &self.client_id)
            .field(
                "client_auth",
                &self.client_secret.as_ref().map(|(_, auth)| auth),
            )
            .field("grant", &self.grant)
            .field("refresh_token", &self.refresh_token)
            .field("scope", &self.scope)
            .field("resources", &self.resources)
            .field("audience", &self.audience)
            .field(
                "extra_params",
                &self
                    .extra_params
                    .iter()
                    .map(|(name, _)| (name, REDACTED))
                    .collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<C> OAuth2RefresherBuilder<C> {
    /// The client's `client_id`. Required with a [`client_secret`](Self::client_secret); a
    /// public client sends it in the form body.
    #[must_use]
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    /// A confidential client's secret, and how to send it.
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .client_id("backend")
    ///     .client_secret("s3cr3t", ClientAuth::Basic);
    /// assert!(!format!("{builder:?}").contains("s3cr3t"));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn client_secret(mut self, secret: impl Into<String>, auth: ClientAuth) -> Self {
        self.client_secret = Some((secret.into(), auth));
        self
    }

    /// The refresh token to start with. Optional: without one, the refresher presents the
    /// refresh token of the layer's token set, installed after a login with
    /// `handle.set_token(Token::bearer(access)?.with_refresh_token(refresh))`
    /// ([`Token::with_refresh_token`](crate::Token::with_refresh_token)); with neither, a
    /// refresh fails with a terminal [`ErrorKind::NoRefreshToken`](super::ErrorKind::NoRefreshToken).
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
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .refresh_token("rt-from-login");
    /// assert!(!format!("{builder:?}").contains("rt-from-login"));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn refresh_token(mut self, token: impl Into<String>) -> Self {
        self.refresh_token = Some(RefreshToken::new(token));
        self
    }

    /// The `scope` to ask for (space-separated); left out, the server grants the scope of the
    /// original grant.
    #[must_use]
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// The grant to use ([`Grant::RefreshToken`] unless set).
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::{ClientAuth, Grant, OAuth2Refresher};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let refresher = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .grant(Grant::ClientCredentials)
    ///     .client_id("svc")
    ///     .client_secret("s3cr3t", ClientAuth::Post)
    ///     .build()?;
    /// # let _ = refresher;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn grant(mut self, grant: Grant) -> Self {
        self.grant = grant;
        self
    }

    /// Adds an RFC 8707 `resource` indicator (an absolute URI without a fragment): the API
    /// the token is for. Repeatable; each is sent, in order.
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let builder = OAuth2Refresher::client_credentials("https://idp.example/token".parse()?, client)
    ///     .resource("https://api.example/orders")
    ///     .resource("https://api.example/invoices");
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resources.push(resource.into());
        self
    }

    /// The `audience` parameter some servers use instead of `resource` (Auth0, Okta, the RFC
    /// 8693 style).
    #[must_use]
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// Adds a form parameter to every token request (a tenant, a `requested_token_use`, ...).
    /// Repeatable. The parameters the refresher sets itself (`grant_type`, `refresh_token`,
    /// `client_id`, `client_secret`, `scope`, `resource`, `audience`) are refused by
    /// [`build`](Self::build): use their own setters. `Debug` shows the names, never the
    /// values.
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
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .extra_param("tenant", "acme");
    /// assert!(!format!("{builder:?}").contains("acme"));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn extra_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_params.push((name.into(), value.into()));
        self
    }

    /// How long one token request may take, reading the answer included
    /// ([`DEFAULT_TIMEOUT`](super::DEFAULT_TIMEOUT)). A timeout is a transient failure.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The largest response body read ([`DEFAULT_MAX_RESPONSE_BODY`](super::DEFAULT_MAX_RESPONSE_BODY)); a larger one is an
    /// [`ErrorKind::BodyTooLarge`](super::ErrorKind::BodyTooLarge) error.
    #[must_use]
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The `error` codes that count as transient (retried) whatever the status, replacing
    /// [`DEFAULT_TRANSIENT_ERROR_CODES`](super::DEFAULT_TRANSIENT_ERROR_CODES). Meant for "a refresh is already in progress"
    /// answers of servers that serialize rotations.
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::{OAuth2Refresher, DEFAULT_TRANSIENT_ERROR_CODES};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .transient_error_codes(DEFAULT_TRANSIENT_ERROR_CODES.iter().copied().chain(["busy"]));
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn transient_error_codes<I>(mut self, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.transient_codes = codes
            .into_iter()
            .map(|c| c.into().into_boxed_str())
            .collect();
        self
    }

    /// Adds `error` codes to the transient ones, keeping those already there (by default
    /// [`DEFAULT_TRANSIENT_ERROR_CODES`](super::DEFAULT_TRANSIENT_ERROR_CODES)).
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
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .add_transient_error_codes(["busy", "slow_down"]);
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn add_transient_error_codes<I>(mut self, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.transient_codes
            .extend(codes.into_iter().map(|c| c.into().into_boxed_str()));
        self
    }

    /// The `error` codes that end the session whatever the HTTP status (a 409 or a 5xx
    /// included), replacing
    /// [`DEFAULT_TERMINAL_ERROR_CODES`](super::DEFAULT_TERMINAL_ERROR_CODES). A code in both
    /// lists is transient. Without a listed code, an answer is terminal on a 400, 401, 403,
    /// 404, 405 or 422, and transient otherwise.
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::{OAuth2Refresher, DEFAULT_TERMINAL_ERROR_CODES};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .terminal_error_codes(["invalid_grant", "account_locked"]);
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn terminal_error_codes<I>(mut self, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.terminal_codes = codes
            .into_iter()
            .map(|c| c.into().into_boxed_str())
            .collect();
        self
    }

    /// Adds `error` codes to the terminal ones, keeping those already there (by default
    /// [`DEFAULT_TERMINAL_ERROR_CODES`](super::DEFAULT_TERMINAL_ERROR_CODES)).
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
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .add_terminal_error_codes(["account_locked"]);
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn add_terminal_error_codes<I>(mut self, codes: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.terminal_codes
            .extend(codes.into_iter().map(|c| c.into().into_boxed_str()));
        self
    }

    /// Allows a plain `http` token endpoint on a host that is not loopback. Refresh tokens
    /// and client secrets then cross the network in clear text: for tests and private
    /// networks only.
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
    /// let endpoint = "http://idp.internal/token".parse()?;
    /// let refused = OAuth2Refresher::builder(endpoint, client)
    ///     .refresh_token("rt")
    ///     .build();
    /// assert!(refused.is_err());
    ///
    /// let endpoint = "http://idp.internal/token".parse()?;
    /// let allowed = OAuth2Refresher::builder(endpoint, client)
    ///     .refresh_token("rt")
    ///     .allow_insecure_http(true)
    ///     .build();
    /// assert!(allowed.is_ok());
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.allow_insecure = allow;
        self
    }

    /// Persists a rotated refresh token. The hook is called with every new refresh token the
    /// server returns, and the new access token is handed to requests only after the hook
    /// completes; refreshes wait for it. It runs on even when the layer stops waiting for the
    /// refresh, for as long as one token request may take ([`timeout`](Self::timeout)); a
    /// hook that has not finished by then counts as failed (below), so that a hook that never
    /// returns does not hold up every later refresh.
    ///
    /// # If the hook fails
    ///
    /// The old refresh token is spent on the server, so the refresher keeps the new one in
    /// memory and uses it from then on; but the refresh fails with a transient error of kind
    /// [`ErrorKind::Persist`](super::ErrorKind::Persist) and its access token is dropped. The layer's
    /// [`Backoff`](crate::Backoff) then tries again, presenting the kept token. If the answer
    /// rotates it, the hook is called with the newer token; if it does not (no refresh token
    /// in the answer, or the same one), the hook is called again with the kept token. Either
    /// way a refresh succeeds only once the hook has succeeded, so what the hook persisted
    /// is never left a spent token. While it keeps failing, requests fail with
    /// [`RefreshFailed`](crate::error::RefreshFailed). A refresh token set from outside
    /// meanwhile ([`set_refresh_token`](super::OAuth2Refresher::set_refresh_token), a token
    /// set installed through the handle) is the application's to persist: the hook is not
    /// called for it, nor again for the token it replaced.
    ///
    /// A call already running when the application logs out or sets another refresh token
    /// is not taken back: it finishes persisting the old session's rotated token. Persist
    /// the logout or the new token after it (for example, under the same lock as the hook).
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::OAuth2Refresher;
    /// # async fn write_to_keychain(_: &str) -> std::io::Result<()> { Ok(()) }
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .on_rotation(|new| async move { write_to_keychain(new.secret()).await });
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn on_rotation<F, Fut, E>(mut self, hook: F) -> Self
    where
        F: Fn(RefreshToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.hook = Some(Arc::new(move |token| {
            let fut = hook(token);
            Box::pin(async move { fut.await.map_err(Into::into) })
        }));
        self
    }

    /// Checks the settings and builds the refresher.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the refresh token is empty, a client-credentials grant has a refresh
    /// token or no client secret, an [`extra_param`](Self::extra_param) is one the refresher
    /// sets itself, there is a client secret without a
    /// client id, or a token endpoint that is not an absolute `https` URI (plain `http` is
    /// accepted on loopback hosts, or anywhere with
    /// [`allow_insecure_http`](Self::allow_insecure_http)).
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
    /// let endpoint = "https://idp.example/token".parse()?;
    /// let empty = OAuth2Refresher::builder(endpoint, client).refresh_token("").build();
    /// assert!(empty.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn build(self) -> Result<OAuth2Refresher<C>, ConfigError> {
        check_endpoint(&self.endpoint, self.allow_insecure)?;
        if let Some((name, _)) = self
            .extra_params
            .iter()
            .find(|(name, _)| RESERVED_PARAMS.contains(&name.as_str()))
        {
            return Err(ConfigError(ConfigErrorKind::ReservedParam(
                RESERVED_PARAMS
                    .iter()
                    .find(|r| **r == name)
                    .copied()
                    .unwrap_or_default(),
            )));
        }
        if self.grant == Grant::ClientCredentials {
            if self.refresh_token.is_some() {
                return Err(ConfigError(ConfigErrorKind::RefreshTokenWithoutGrant));
            }
            if self.client_secret.is_none() {
                return Err(ConfigError(ConfigErrorKind::MissingClientSecret));
            }
        }
        let refresh_token = match self.refresh_token {
            Some(t) if t.secret().is_empty() => {
                return Err(ConfigError(ConfigErrorKind::EmptyRefreshToken));
            }
            token => token,
        };
        let client_secret = self
            .client_secret
            .as_ref()
            .map(|(s, _)| s.clone().into_boxed_str());
        let auth = match (self.client_secret, &self.client_id) {
            (None, _) => Auth::None,
            (Some(_), None) => return Err(ConfigError(ConfigErrorKind::MissingClientId)),
            (Some((secret, ClientAuth::Basic)), Some(id)) => {
                let credentials = format!("{}:{}", urlencode(id), urlencode(&secret));
                let mut value =
                    HeaderValue::try_from(format!("Basic {}", base64(credentials.as_bytes())))
                        .expect("base64 is a valid header value");
                value.set_sensitive(true);
                Auth::Basic(value)
            }
            (Some((secret, ClientAuth::Post)), Some(_)) => Auth::Post(secret.into_boxed_str()),
        };
        Ok(OAuth2Refresher {
            inner: Arc::new(Inner {
                endpoint: self.endpoint,
                client: self.client,
                client_id: self.client_id.map(String::into_boxed_str),
                auth,
                client_secret,
                grant: self.grant,
                scope: self.scope.map(String::into_boxed_str),
                resources: self.resources.into_iter().map(Into::into).collect(),
                audience: self.audience.map(String::into_boxed_str),
                extra_params: self
                    .extra_params
                    .into_iter()
                    .map(|(name, value)| (name.into(), value.into()))
                    .collect(),
                timeout: self.timeout,
                max_body: self.max_body,
                transient_codes: self.transient_codes.into_boxed_slice(),
                terminal_codes: self.terminal_codes.into_boxed_slice(),
                hook: self.hook,
                dpop: self.dpop,
                refresh_token: Mutex::new(super::Slot {
                    token: refresh_token,
                    ..super::Slot::default()
                }),
                serial: Arc::new(async_lock::Mutex::new(())),
            }),
        })
    }
}

pub(super) fn check_endpoint(endpoint: &Uri, allow_insecure: bool) -> Result<(), ConfigError> {
    let Some(host) = endpoint.host() else {
        return Err(ConfigError(ConfigErrorKind::NotAbsolute));
    };
    // `user:password@`: never sent by the token clients (credentials go by the refresher's
    // own setters), and a password kept in the endpoint would show in transport errors.
    if endpoint
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err(ConfigError(ConfigErrorKind::UserInfo));
    }
    match endpoint.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => Ok(()),
        Some(s) if s.eq_ignore_ascii_case("http") => {
            if allow_insecure || is_loopback(host) {
                Ok(())
            } else {
                Err(ConfigError(ConfigErrorKind::Insecure))
            }
        }
        Some(_) => Err(ConfigError(ConfigErrorKind::Scheme)),
        None => Err(ConfigError(ConfigErrorKind::NotAbsolute)),
    }
}

/// A token endpoint as `Debug` shows it: without user information (it may hold a password;
/// [`check_endpoint`] refuses it, but a builder is shown before it is checked).
pub(super) struct ShownEndpoint<'a>(pub(super) &'a Uri);

impl fmt::Debug for ShownEndpoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri = self.0;
        let Some(authority) = uri.authority() else {
            return write!(f, "{uri:?}");
        };
        let host = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, host)| host);
        let scheme = uri.scheme_str().unwrap_or_default();
        let rest = uri.path_and_query().map_or("", |p| p.as_str());
        write!(f, "\"{scheme}://{host}{rest}\"")
    }
}

pub(super) fn is_loopback(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Standard base64 with padding (RFC 4648 §4), for `client_secret_basic`.
pub(super) fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(super) fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64(input.as_bytes()), expected);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]", "LOCALHOST"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["example.com", "10.0.0.1", "[::2]", "localhost.example.com"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
