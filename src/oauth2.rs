//! The OAuth 2.0 refresh-token grant refresher (RFC 6749 §6).
//!
//! [`OAuth2Refresher`] is a [`TokenRefresher`] that trades a refresh token for a new access
//! token at a token endpoint, over any tower HTTP service (a hyper-util client, typically).
//!
//! - **Request**: `POST`, `application/x-www-form-urlencoded`, `grant_type=refresh_token`,
//!   `refresh_token`, an optional `scope`, and client authentication: `client_secret_basic`
//!   ([`ClientAuth::Basic`]), `client_secret_post` ([`ClientAuth::Post`]), or none (a public
//!   client, which sends its `client_id` if it has one).
//! - **Success** (§5.1): `access_token`, `token_type` (`Bearer`, any case; assumed when
//!   missing), `expires_in` (a number, or a numeric string; when it is missing, zero or
//!   unreadable the token has no known lifetime and is refreshed on a 401), `refresh_token`.
//!   Other fields, `scope` included, are ignored. The body is capped
//!   ([`DEFAULT_MAX_RESPONSE_BODY`]); a success answer that is not JSON, lacks
//!   `access_token`, or is too large is a transient [`OAuth2Error`].
//! - **Rotation** (§6, RFC 9700 §4.14): a returned refresh token replaces the old one at once,
//!   then the [`on_rotation`](OAuth2RefresherBuilder::on_rotation) hook persists it, and only
//!   then is the new access token handed to the layer (the hook's documentation says what a
//!   failing hook does). No refresh token in the answer keeps the old one.
//! - **Errors** (§5.2): `invalid_grant`, `invalid_client`, `unauthorized_client`,
//!   `unsupported_grant_type`, `invalid_scope`, `invalid_request`, and any 400/401/403/422
//!   answer are [terminal](RefreshError::terminal): the session ends. 5xx, 429, timeouts,
//!   connection errors and the codes of
//!   [`transient_error_codes`](OAuth2RefresherBuilder::transient_error_codes) are
//!   [transient](RefreshError::transient), and a `Retry-After` header is passed on with
//!   [`RefreshError::with_retry_after`]. The cause is an [`OAuth2Error`], which carries the
//!   `error` code and `error_description` but never a token or the raw body.
//!
//! # The client for token requests
//!
//! Give the refresher its own client, one that does **not** wear the
//! [`RefreshLayer`](crate::RefreshLayer): a token request must never wait on the refresh it is
//! part of. Token requests also carry the [`RefreshRequest`] extension, and the layer lets
//! requests sent from inside a refresh through untouched, so sharing a client that wears the
//! layer does not recurse either; it only wastes the layer's work.
//!
//! The endpoint must be `https`, except on a loopback host (`localhost`, `127.0.0.0/8`,
//! `::1`) or with [`allow_insecure_http`](OAuth2RefresherBuilder::allow_insecure_http).
//! A hyper-util client built with `build_http()` only speaks plain HTTP: for an `https`
//! endpoint, build it with an HTTPS connector (hyper-rustls or hyper-tls).
//!
//! # Rotation and cancellation
//!
//! The layer runs a refresh in a task of its own, to completion, even when every request
//! waiting for it is dropped, so the answer to a token request that went out is never lost
//! to a cancelled caller. The refresher stores a rotated refresh token before anything else
//! happens with the answer (before the hook, before the access token is even checked). What
//! cannot be saved is an answer that never arrives: if the token request
//! [times out](OAuth2RefresherBuilder::timeout) or the connection breaks after the server
//! rotated, the next attempt presents the old refresh token again; servers that detect reuse
//! usually accept the previous token for a short grace period for exactly that reason.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower_auth_refresh::RefreshLayer;
//! use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher};
//!
//! # async fn save_refresh_token(_: &str) -> Result<(), std::io::Error> { Ok(()) }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let stored_refresh_token = "from-the-login";
//! // A plain client for token requests, without the refresh layer (use an HTTPS connector
//! // for an https endpoint).
//! let token_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//!
//! let endpoint = "http://127.0.0.1:8080/oauth/token".parse()?;
//! let refresher = OAuth2Refresher::builder(endpoint, token_client)
//!     .client_id("my-app")
//!     .client_secret("app-secret", ClientAuth::Basic)
//!     .refresh_token(stored_refresh_token)
//!     .timeout(Duration::from_secs(5))
//!     // Runs, and completes, before the new access token is used.
//!     .on_rotation(|new| async move { save_refresh_token(new.secret()).await })
//!     .build()?;
//!
//! let layer = RefreshLayer::new(refresher);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde_json::{Map, Value};
use tower_service::Service;

use crate::{
    BoxError, RefreshContext, RefreshError, Token, TokenRefresher, TokenRequest as RefreshRequest,
};

/// How long a token request may take, from sending to the last byte of the answer, unless
/// [`timeout`](OAuth2RefresherBuilder::timeout) says otherwise: 10 seconds.
///
/// # Example
///
/// ```
/// assert_eq!(tower_auth_refresh::oauth2::DEFAULT_TIMEOUT.as_secs(), 10);
/// ```
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest token response body read, unless
/// [`max_response_body`](OAuth2RefresherBuilder::max_response_body) says otherwise: 64 KiB.
///
/// # Example
///
/// ```
/// assert_eq!(tower_auth_refresh::oauth2::DEFAULT_MAX_RESPONSE_BODY, 64 * 1024);
/// ```
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 64 * 1024;

/// The `error` codes treated as transient unless
/// [`transient_error_codes`](OAuth2RefresherBuilder::transient_error_codes) replaces them:
/// "a refresh is already in progress" answers, and RFC 6749's `temporarily_unavailable` and
/// `server_error`.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::oauth2::DEFAULT_TRANSIENT_ERROR_CODES;
///
/// assert!(DEFAULT_TRANSIENT_ERROR_CODES.contains(&"rotation_in_progress"));
/// assert!(!DEFAULT_TRANSIENT_ERROR_CODES.contains(&"invalid_grant"));
/// ```
pub const DEFAULT_TRANSIENT_ERROR_CODES: &[&str] = &[
    "rotation_in_progress",
    "refresh_in_progress",
    "temporarily_unavailable",
    "server_error",
];

/// RFC 6749 §5.2 codes that no retry can fix.
const TERMINAL_ERROR_CODES: &[&str] = &[
    "invalid_grant",
    "invalid_client",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_request",
];

/// A `Retry-After` longer than this is cut down to it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// An `expires_in` longer than this (a year) is cut down to it.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest `error` code and `error_description` kept, in characters.
const MAX_CODE_LEN: usize = 64;
const MAX_DESCRIPTION_LEN: usize = 256;
const REDACTED: &str = "<redacted>";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type Hook = Arc<dyn Fn(RefreshToken) -> BoxFuture<Result<(), BoxError>> + Send + Sync>;

/// A refresh token. Cloning is cheap; `Debug` never shows the secret.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::oauth2::RefreshToken;
///
/// let token = RefreshToken::new("rt-123");
/// assert_eq!(token.secret(), "rt-123");
/// assert!(!format!("{token:?}").contains("rt-123"));
/// ```
#[derive(Clone)]
pub struct RefreshToken(Arc<str>);

impl RefreshToken {
    /// Wraps a refresh token.
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::RefreshToken;
    /// let token = RefreshToken::new(String::from("rt-1"));
    /// # let _ = token;
    /// ```
    pub fn new(secret: impl Into<String>) -> Self {
        Self(Arc::from(secret.into()))
    }

    /// The refresh token itself, to persist it. The only accessor that reveals it.
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::RefreshToken;
    /// assert_eq!(RefreshToken::new("rt-1").secret(), "rt-1");
    /// ```
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken(<redacted>)")
    }
}

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
///
/// A public client has no secret: leave out
/// [`client_secret`](OAuth2RefresherBuilder::client_secret), and its `client_id` (if set) is
/// sent in the form body.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::oauth2::ClientAuth;
///
/// assert_ne!(ClientAuth::Basic, ClientAuth::Post);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// `client_secret_basic`: `Authorization: Basic base64(urlencode(id):urlencode(secret))`.
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post,
}

/// Client authentication, ready to go.
enum Auth {
    /// A public client.
    None,
    /// The ready-made `Authorization` header, marked sensitive.
    Basic(HeaderValue),
    /// The secret, for the form body.
    Post(Box<str>),
}

/// The OAuth 2.0 refresh-token grant as a [`TokenRefresher`].
///
/// Built with [`OAuth2Refresher::builder`]; see the [module documentation](self) for the
/// protocol details. `C` is the tower HTTP service that sends token requests (see
/// [the client for token requests](self#the-client-for-token-requests)).
///
/// Clones share the current refresh token, so a clone kept outside the layer can read it
/// ([`refresh_token`](Self::refresh_token)) or replace it after a new login
/// ([`set_refresh_token`](Self::set_refresh_token)). Refreshes through clones run one at a
/// time.
///
/// `Debug` shows the endpoint and the client id, never the client secret or a token.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower_auth_refresh::oauth2::OAuth2Refresher;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// // A public client: no secret.
/// let refresher = OAuth2Refresher::builder("http://localhost:8080/token".parse()?, client)
///     .client_id("cli")
///     .refresh_token("rt-1")
///     .build()?;
/// assert_eq!(refresher.refresh_token().secret(), "rt-1");
/// assert!(!format!("{refresher:?}").contains("rt-1"));
/// # Ok(())
/// # }
/// ```
pub struct OAuth2Refresher<C> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    endpoint: Uri,
    client: C,
    client_id: Option<Box<str>>,
    auth: Auth,
    /// Kept only to blank it out of server-supplied error text.
    client_secret: Option<Box<str>>,
    scope: Option<Box<str>>,
    timeout: Duration,
    max_body: usize,
    transient_codes: Box<[Box<str>]>,
    hook: Option<Hook>,
    /// The current refresh token.
    refresh_token: Mutex<RefreshToken>,
    /// Held for a whole refresh, so that refreshes through clones never present the same
    /// refresh token twice.
    serial: async_lock::Mutex<()>,
}

impl<C> Clone for OAuth2Refresher<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for OAuth2Refresher<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        let auth = match inner.auth {
            Auth::None => "none",
            Auth::Basic(_) => "client_secret_basic",
            Auth::Post(_) => "client_secret_post",
        };
        f.debug_struct("OAuth2Refresher")
            .field("token_endpoint", &inner.endpoint)
            .field("client_id", &inner.client_id)
            .field("client_auth", &auth)
            .field("refresh_token", &REDACTED)
            .field("scope", &inner.scope)
            .field("timeout", &inner.timeout)
            .finish_non_exhaustive()
    }
}

impl<C> OAuth2Refresher<C> {
    /// Starts a refresher for `token_endpoint`, sending token requests with `client`.
    ///
    /// # Example
    ///
    /// ```
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # use hyper_util::client::legacy::Client;
    /// # use hyper_util::rt::TokioExecutor;
    /// use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    /// let refresher = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .client_id("app")
    ///     .client_secret("secret", ClientAuth::Post)
    ///     .refresh_token("rt")
    ///     .scope("read write")
    ///     .build()?;
    /// # let _ = refresher;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(token_endpoint: Uri, client: C) -> OAuth2RefresherBuilder<C> {
        OAuth2RefresherBuilder {
            endpoint: token_endpoint,
            client,
            client_id: None,
            client_secret: None,
            refresh_token: None,
            scope: None,
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_RESPONSE_BODY,
            transient_codes: DEFAULT_TRANSIENT_ERROR_CODES
                .iter()
                .map(|&c| c.into())
                .collect(),
            allow_insecure: false,
            hook: None,
        }
    }

    /// The current refresh token: the latest one the server handed out, or the one set last.
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
    /// let refresher = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .refresh_token("rt-1")
    ///     .build()?;
    /// assert_eq!(refresher.refresh_token().secret(), "rt-1");
    /// # Ok(())
    /// # }
    /// ```
    pub fn refresh_token(&self) -> RefreshToken {
        self.inner.current()
    }

    /// Replaces the refresh token, after a new login for instance (then install the new
    /// access token with [`TokenHandle::set_token`](crate::TokenHandle::set_token) to end a
    /// session-ended state). A refresh in flight that rotates the token it presented does not
    /// overwrite this one.
    ///
    /// # Example
    ///
    /// ```
    /// # use tower_auth_refresh::oauth2::{OAuth2Refresher, RefreshToken};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let refresher = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .refresh_token("old")
    ///     .build()?;
    /// refresher.set_refresh_token(RefreshToken::new("after-login"));
    /// assert_eq!(refresher.refresh_token().secret(), "after-login");
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_refresh_token(&self, token: RefreshToken) {
        *self
            .inner
            .refresh_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = token;
    }

    /// The token endpoint.
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
    /// let refresher = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .refresh_token("rt")
    ///     .build()?;
    /// assert_eq!(refresher.token_endpoint().host(), Some("idp.example"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn token_endpoint(&self) -> &Uri {
        &self.inner.endpoint
    }
}

impl<C> Inner<C> {
    fn current(&self) -> RefreshToken {
        self.refresh_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces `presented` with `rotated`, unless someone set another token meanwhile.
    /// Returns whether it did.
    fn store_rotated(&self, presented: &RefreshToken, rotated: RefreshToken) -> bool {
        let mut current = self
            .refresh_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if Arc::ptr_eq(&current.0, &presented.0) {
            *current = rotated;
            true
        } else {
            false
        }
    }

    fn request(&self, refresh_token: &RefreshToken) -> Request<Full<Bytes>> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "refresh_token");
        form.append_pair("refresh_token", refresh_token.secret());
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        match &self.auth {
            Auth::None | Auth::Post(_) => {
                if let Some(id) = &self.client_id {
                    form.append_pair("client_id", id);
                }
            }
            Auth::Basic(_) => {}
        }
        if let Auth::Post(secret) = &self.auth {
            form.append_pair("client_secret", secret);
        }
        let mut req = Request::new(Full::new(Bytes::from(form.finish())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.clone();
        let headers = req.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Auth::Basic(value) = &self.auth {
            headers.insert(AUTHORIZATION, value.clone());
        }
        req.extensions_mut().insert(RefreshRequest);
        req
    }

    /// Takes secrets out of server-supplied text.
    fn redact(&self, text: String, presented: &RefreshToken) -> String {
        let mut text = text;
        let secrets = [Some(presented.secret()), self.client_secret.as_deref()];
        for secret in secrets.into_iter().flatten() {
            if !secret.is_empty() && text.contains(secret) {
                text = text.replace(secret, REDACTED);
            }
        }
        text
    }

    fn is_transient_code(&self, code: &str) -> bool {
        self.transient_codes.iter().any(|c| &**c == code)
    }
}

impl<C, ResBody> TokenRefresher for OAuth2Refresher<C>
where
    C: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Future = BoxFuture<Result<Token, RefreshError>>;

    fn refresh(&self, _ctx: RefreshContext) -> Self::Future {
        Box::pin(refresh(Arc::clone(&self.inner)))
    }
}

async fn refresh<C, ResBody>(inner: Arc<Inner<C>>) -> Result<Token, RefreshError>
where
    C: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    let _serial = inner.serial.lock().await;
    let presented = inner.current();
    let req = inner.request(&presented);
    tracing::debug!(
        host = inner.endpoint.host().unwrap_or_default(),
        "oauth2: sending refresh-token grant request"
    );
    let exchange = exchange(inner.client.clone(), req, inner.max_body);
    let (status, headers, body) = match tokio::time::timeout(inner.timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => {
            tracing::debug!(kind = ?err.kind, "oauth2: token request failed");
            return Err(RefreshError::transient(err));
        }
        Err(_) => {
            tracing::debug!(
                timeout_ms = inner.timeout.as_millis() as u64,
                "oauth2: token request timed out"
            );
            return Err(RefreshError::transient(OAuth2Error::new(
                ErrorKind::Timeout,
            )));
        }
    };
    match body {
        Ok(body) if status.is_success() => {
            success(&inner, &presented, status, &headers, &body).await
        }
        Err(err) if status.is_success() => {
            tracing::debug!(kind = ?err.kind, "oauth2: reading the token response failed");
            Err(RefreshError::transient(err))
        }
        // An error answer is classified by its status even if its body cannot be read.
        body => Err(failure(
            &inner,
            &presented,
            status,
            &headers,
            body.as_deref().unwrap_or_default(),
        )),
    }
}

/// Sends the request and reads the whole answer, up to `max_body` bytes.
async fn exchange<C, ResBody>(
    mut client: C,
    req: Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(StatusCode, HeaderMap, Result<Bytes, OAuth2Error>), OAuth2Error>
where
    C: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
    C::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    let transport = |e: C::Error| OAuth2Error::new(ErrorKind::Transport).with_source(e.into());
    std::future::poll_fn(|cx| client.poll_ready(cx))
        .await
        .map_err(transport)?;
    let res = client.call(req).await.map_err(transport)?;
    let (parts, body) = res.into_parts();
    let too_large = || {
        OAuth2Error::new(ErrorKind::BodyTooLarge)
            .with_status(parts.status)
            .with_limit(max_body)
    };
    let body = if body.size_hint().lower() > max_body as u64 {
        Err(too_large())
    } else {
        match Limited::new(body, max_body).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) if err.is::<LengthLimitError>() => Err(too_large()),
            Err(err) => Err(OAuth2Error::new(ErrorKind::Body)
                .with_status(parts.status)
                .with_source(err)),
        }
    };
    Ok((parts.status, parts.headers, body))
}

/// A 2xx answer: rotate, persist, then hand out the access token.
async fn success<C>(
    inner: &Inner<C>,
    presented: &RefreshToken,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Token, RefreshError> {
    let malformed =
        |kind: ErrorKind| RefreshError::transient(OAuth2Error::new(kind).with_status(status));
    let json_type = headers.get(CONTENT_TYPE).is_none_or(is_json);
    let fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => fields,
        _ if !json_type => {
            tracing::debug!(
                status = status.as_u16(),
                "oauth2: token response is not JSON"
            );
            return Err(malformed(ErrorKind::ContentType));
        }
        _ => {
            tracing::debug!(
                status = status.as_u16(),
                "oauth2: token response is not a JSON object"
            );
            return Err(malformed(ErrorKind::Malformed));
        }
    };

    // The rotated refresh token first: the old one may be spent already, whatever else is
    // wrong with this answer (a wrong content type included).
    let rotated = match fields.get("refresh_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() || s == presented.secret() => None,
        Some(Value::String(s)) => Some(RefreshToken::new(s.as_str())),
        Some(_) => return Err(malformed(ErrorKind::Malformed)),
    };
    let rotated_now = rotated.is_some();
    if let Some(new) = rotated {
        if inner.store_rotated(presented, new.clone()) {
            if let Some(hook) = &inner.hook {
                if let Err(err) = hook(new).await {
                    tracing::warn!(
                        "oauth2: rotation hook failed; the new refresh token is kept in memory only"
                    );
                    return Err(RefreshError::transient(
                        OAuth2Error::new(ErrorKind::Persist).with_source(err),
                    ));
                }
            }
        } else {
            tracing::debug!("oauth2: rotated refresh token discarded: a new one was set meanwhile");
        }
    }
    if !json_type {
        tracing::debug!(
            status = status.as_u16(),
            "oauth2: token response is not JSON"
        );
        return Err(malformed(ErrorKind::ContentType));
    }

    match fields.get("token_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(t)) => {
            return Err(RefreshError::terminal(
                OAuth2Error::new(ErrorKind::UnsupportedTokenType)
                    .with_status(status)
                    .with_code(sanitize(t, MAX_CODE_LEN)),
            ));
        }
        Some(_) => return Err(malformed(ErrorKind::Malformed)),
    }
    let access = match fields.get("access_token") {
        Some(Value::String(s)) => s.as_str(),
        None | Some(Value::Null) => return Err(malformed(ErrorKind::MissingAccessToken)),
        Some(_) => return Err(malformed(ErrorKind::Malformed)),
    };
    let mut token = Token::bearer(access).map_err(|e| {
        RefreshError::transient(
            OAuth2Error::new(ErrorKind::InvalidAccessToken)
                .with_status(status)
                .with_source(e),
        )
    })?;
    let lifetime = expires_in(&fields);
    if let Some(life) = lifetime {
        token = token.with_expires_in(life);
    }
    tracing::debug!(
        status = status.as_u16(),
        rotated = rotated_now,
        expires_in_secs = lifetime.map(|d| d.as_secs()),
        "oauth2: access token issued"
    );
    Ok(token)
}

/// A non-2xx answer: classify it.
fn failure<C>(
    inner: &Inner<C>,
    presented: &RefreshToken,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> RefreshError {
    let (code, description) = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => error_fields(&fields),
        _ => (None, None),
    };
    let description = description.map(|d| inner.redact(d, presented));
    let terminal = match code.as_deref() {
        Some(c) if inner.is_transient_code(c) => false,
        Some(c) if TERMINAL_ERROR_CODES.contains(&c) => true,
        _ => matches!(status.as_u16(), 400 | 401 | 403 | 422),
    };
    tracing::debug!(
        status = status.as_u16(),
        error = code.as_deref(),
        terminal,
        "oauth2: token endpoint refused the refresh"
    );
    let mut err = OAuth2Error::new(ErrorKind::ErrorResponse).with_status(status);
    err.code = code.map(String::into_boxed_str);
    err.description = description.map(String::into_boxed_str);
    if terminal {
        return RefreshError::terminal(err);
    }
    match retry_after(headers) {
        Some(delay) => RefreshError::transient(err).with_retry_after(delay),
        None => RefreshError::transient(err),
    }
}

fn error_fields(fields: &Map<String, Value>) -> (Option<String>, Option<String>) {
    let text = |name: &str, max: usize| match fields.get(name) {
        Some(Value::String(s)) => Some(sanitize(s, max)).filter(|s| !s.is_empty()),
        _ => None,
    };
    (
        text("error", MAX_CODE_LEN),
        text("error_description", MAX_DESCRIPTION_LEN),
    )
}

/// Keeps RFC 6749's `error`/`error_description` characters (printable ASCII but `"` and `\`),
/// at most `max` of them.
fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .filter(|&c| matches!(c, ' '..='~') && c != '"' && c != '\\')
        .take(max)
        .collect()
}

fn is_json(value: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or_default().trim();
    mime.eq_ignore_ascii_case("application/json")
        || (mime.len() > 5
            && mime
                .get(mime.len() - 5..)
                .is_some_and(|s| s.eq_ignore_ascii_case("+json")))
}

/// `expires_in` as a number or a numeric string; absent, zero or unreadable means unknown.
fn expires_in(fields: &Map<String, Value>) -> Option<Duration> {
    let secs = match fields.get("expires_in")? {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f.min(u64::MAX as f64) as u64)
        }),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }?;
    (secs > 0).then(|| Duration::from_secs(secs).min(MAX_LIFETIME))
}

/// `Retry-After`: delay-seconds or an IMF-fixdate, capped at an hour.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = parse_http_date(value)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        Duration::from_secs(at.saturating_sub(now))
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Seconds since the Unix epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(s: &str) -> Option<u64> {
    let mut parts = s.split_ascii_whitespace();
    let _weekday = parts.next()?.strip_suffix(',')?;
    let day: u64 = parts.next()?.parse().ok()?;
    let month = parts.next()?;
    let year: u64 = parts.next()?.parse().ok()?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || parts.next().is_some() {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let mut hms = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some()
        || !(1..=31).contains(&day)
        || year < 1970
        || h > 23
        || m > 59
        || sec > 60
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), for years from 1970.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// Standard base64 with padding (RFC 4648 §4), for `client_secret_basic`.
fn base64(input: &[u8]) -> String {
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

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Builds an [`OAuth2Refresher`]; made by [`OAuth2Refresher::builder`].
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
    endpoint: Uri,
    client: C,
    client_id: Option<String>,
    client_secret: Option<(String, ClientAuth)>,
    refresh_token: Option<RefreshToken>,
    scope: Option<String>,
    timeout: Duration,
    max_body: usize,
    transient_codes: Vec<Box<str>>,
    allow_insecure: bool,
    hook: Option<Hook>,
}

impl<C> fmt::Debug for OAuth2RefresherBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2RefresherBuilder")
            .field("token_endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field(
                "client_auth",
                &self.client_secret.as_ref().map(|(_, auth)| auth),
            )
            .field("refresh_token", &self.refresh_token)
            .field("scope", &self.scope)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<C> OAuth2RefresherBuilder<C> {
    /// The client's `client_id`. Required with a [`client_secret`](Self::client_secret); a
    /// public client sends it in the form body.
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
    ///     .client_id("mobile-app");
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
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

    /// The refresh token to start with (required).
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
    ///     .scope("orders:read orders:write");
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// How long one token request may take, reading the answer included
    /// ([`DEFAULT_TIMEOUT`]). A timeout is a transient failure.
    ///
    /// # Example
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_auth_refresh::oauth2::OAuth2Refresher;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # let client = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let builder = OAuth2Refresher::builder("https://idp.example/token".parse()?, client)
    ///     .timeout(Duration::from_secs(2));
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The largest response body read ([`DEFAULT_MAX_RESPONSE_BODY`]); a larger one is an
    /// [`ErrorKind::BodyTooLarge`] error.
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
    ///     .max_response_body(16 * 1024);
    /// # let _ = builder;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The `error` codes that count as transient (retried) whatever the status, replacing
    /// [`DEFAULT_TRANSIENT_ERROR_CODES`]. Meant for "a refresh is already in progress"
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
    /// completes; refreshes wait for it (it has no timeout of its own).
    ///
    /// # If the hook fails
    ///
    /// The old refresh token is spent on the server, so the refresher keeps the new one in
    /// memory and uses it from then on; but the refresh fails with a transient error of kind
    /// [`ErrorKind::Persist`] and its access token is dropped. The layer's
    /// [`Backoff`](crate::Backoff) then tries again: the retry rotates once more and
    /// calls the hook with the newer token, so the store catches up as soon as the hook
    /// succeeds. While it keeps failing, requests fail with
    /// [`RefreshFailed`](crate::error::RefreshFailed).
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
    /// [`ConfigError`] if there is no (or an empty) refresh token, a client secret without a
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
    /// let missing = OAuth2Refresher::builder(endpoint, client).build();
    /// assert!(missing.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn build(self) -> Result<OAuth2Refresher<C>, ConfigError> {
        check_endpoint(&self.endpoint, self.allow_insecure)?;
        let refresh_token = match self.refresh_token {
            Some(t) if !t.secret().is_empty() => t,
            Some(_) => return Err(ConfigError(ConfigErrorKind::EmptyRefreshToken)),
            None => return Err(ConfigError(ConfigErrorKind::MissingRefreshToken)),
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
                scope: self.scope.map(String::into_boxed_str),
                timeout: self.timeout,
                max_body: self.max_body,
                transient_codes: self.transient_codes.into_boxed_slice(),
                hook: self.hook,
                refresh_token: Mutex::new(refresh_token),
                serial: async_lock::Mutex::new(()),
            }),
        })
    }
}

fn check_endpoint(endpoint: &Uri, allow_insecure: bool) -> Result<(), ConfigError> {
    let Some(host) = endpoint.host() else {
        return Err(ConfigError(ConfigErrorKind::NotAbsolute));
    };
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

fn is_loopback(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Why [`OAuth2RefresherBuilder::build`] refused the settings. The message names the
/// problem; it never repeats a secret.
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
/// let err = OAuth2Refresher::builder("http://idp.example/token".parse()?, client)
///     .refresh_token("rt")
///     .build()
///     .unwrap_err();
/// assert!(err.to_string().contains("https"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(ConfigErrorKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigErrorKind {
    MissingRefreshToken,
    EmptyRefreshToken,
    MissingClientId,
    NotAbsolute,
    Scheme,
    Insecure,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            ConfigErrorKind::MissingRefreshToken => "oauth2 refresher: no refresh token was given",
            ConfigErrorKind::EmptyRefreshToken => "oauth2 refresher: the refresh token is empty",
            ConfigErrorKind::MissingClientId => {
                "oauth2 refresher: a client secret needs a client id"
            }
            ConfigErrorKind::NotAbsolute => {
                "oauth2 refresher: the token endpoint must be an absolute URI"
            }
            ConfigErrorKind::Scheme => {
                "oauth2 refresher: the token endpoint must use https (or http on loopback)"
            }
            ConfigErrorKind::Insecure => {
                "oauth2 refresher: the token endpoint must use https (http only on loopback or \
                 with allow_insecure_http)"
            }
        })
    }
}

impl std::error::Error for ConfigError {}

/// What went wrong with a token request: the cause ([`source`](std::error::Error::source))
/// of the [`RefreshError`] an [`OAuth2Refresher`] returns.
///
/// It carries the HTTP status, the RFC 6749 §5.2 `error` code and `error_description` (cut
/// to printable ASCII, 64 and 256 characters, with the refresh token and client secret
/// blanked out should a server echo them), never the raw body or a token.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::error::RefreshRejected;
/// use tower_auth_refresh::oauth2::OAuth2Error;
/// use tower_auth_refresh::BoxError;
///
/// /// The OAuth 2.0 error code behind a request's failure, if any.
/// fn oauth2_code(err: &BoxError) -> Option<String> {
///     let rejected = err.downcast_ref::<RefreshRejected>()?;
///     let cause = std::error::Error::source(&**rejected.refresh_error())?;
///     let oauth2 = cause.downcast_ref::<OAuth2Error>()?;
///     oauth2.error_code().map(str::to_owned)
/// }
/// # let _ = oauth2_code;
/// ```
pub struct OAuth2Error {
    kind: ErrorKind,
    status: Option<StatusCode>,
    code: Option<Box<str>>,
    description: Option<Box<str>>,
    limit: Option<usize>,
    source: Option<BoxError>,
}

/// The kinds of [`OAuth2Error`].
///
/// # Example
///
/// ```
/// use tower_auth_refresh::oauth2::ErrorKind;
///
/// assert_ne!(ErrorKind::Timeout, ErrorKind::Transport);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The token endpoint answered with an error status (RFC 6749 §5.2); see
    /// [`OAuth2Error::error_code`]. Terminal or transient depending on the code and status.
    ErrorResponse,
    /// The token request timed out. Transient.
    Timeout,
    /// The HTTP client failed (connection refused, reset, ...). Transient.
    Transport,
    /// Reading the response body failed. Transient.
    Body,
    /// The response body is larger than the cap. Transient.
    BodyTooLarge,
    /// A success response whose content type is not JSON. Transient.
    ContentType,
    /// A success response that is not a JSON object, or has fields of the wrong type.
    /// Transient.
    Malformed,
    /// A success response without `access_token`. Transient.
    MissingAccessToken,
    /// An `access_token` that cannot be sent in an `Authorization` header. Transient.
    InvalidAccessToken,
    /// A `token_type` other than `Bearer`; see [`OAuth2Error::error_code`] for the type.
    /// Terminal: this client cannot use such tokens.
    UnsupportedTokenType,
    /// The [`on_rotation`](OAuth2RefresherBuilder::on_rotation) hook failed. Transient.
    Persist,
}

impl OAuth2Error {
    fn new(kind: ErrorKind) -> Self {
        Self {
            kind,
            status: None,
            code: None,
            description: None,
            limit: None,
            source: None,
        }
    }

    fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    fn with_code(mut self, code: String) -> Self {
        self.code = Some(code.into_boxed_str());
        self
    }

    fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::oauth2::{ErrorKind, OAuth2Error};
    ///
    /// let f = |e: &OAuth2Error| e.kind() == ErrorKind::Timeout;
    /// # let _ = f;
    /// ```
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The token endpoint's HTTP status, if it answered.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::oauth2::{ErrorKind, OAuth2Error};
    ///
    /// # let _ = ErrorKind::Timeout;
    /// let f = |e: &OAuth2Error| e.status().is_some_and(|s| s.is_server_error());
    /// # let _ = f;
    /// ```
    pub fn status(&self) -> Option<StatusCode> {
        self.status
    }

    /// The §5.2 `error` code (`invalid_grant`, ...) of an [`ErrorKind::ErrorResponse`], or
    /// the refused `token_type` of an [`ErrorKind::UnsupportedTokenType`].
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::oauth2::{ErrorKind, OAuth2Error};
    ///
    /// # let _ = ErrorKind::Timeout;
    /// let f = |e: &OAuth2Error| e.error_code() == Some("invalid_grant");
    /// # let _ = f;
    /// ```
    pub fn error_code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The §5.2 `error_description`, if the server sent one.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::oauth2::{ErrorKind, OAuth2Error};
    ///
    /// # let _ = ErrorKind::Timeout;
    /// let f = |e: &OAuth2Error| e.error_description().unwrap_or("no description").to_owned();
    /// # let _ = f;
    /// ```
    pub fn error_description(&self) -> Option<&str> {
        self.description.as_deref()
    }
}

impl fmt::Debug for OAuth2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Error")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("error", &self.code)
            .field("error_description", &self.description)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for OAuth2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::ErrorResponse => {
                match self.status {
                    Some(status) => write!(f, "token endpoint answered {status}")?,
                    None => f.write_str("token endpoint refused the refresh")?,
                }
                if let Some(code) = &self.code {
                    write!(f, ": {code}")?;
                }
                if let Some(description) = &self.description {
                    write!(f, " ({description})")?;
                }
                Ok(())
            }
            ErrorKind::Timeout => f.write_str("token request timed out"),
            ErrorKind::Transport => f.write_str("token request failed"),
            ErrorKind::Body => f.write_str("reading the token response failed"),
            ErrorKind::BodyTooLarge => match self.limit {
                Some(limit) => write!(f, "token response body is larger than {limit} bytes"),
                None => f.write_str("token response body is too large"),
            },
            ErrorKind::ContentType => f.write_str("token response is not JSON"),
            ErrorKind::Malformed => {
                f.write_str("token response is not a valid RFC 6749 token response")
            }
            ErrorKind::MissingAccessToken => f.write_str("token response has no access_token"),
            ErrorKind::InvalidAccessToken => {
                f.write_str("token response's access_token cannot be used")
            }
            ErrorKind::UnsupportedTokenType => match &self.code {
                Some(t) => write!(f, "token response has unsupported token_type {t:?}"),
                None => f.write_str("token response has an unsupported token_type"),
            },
            ErrorKind::Persist => f.write_str("persisting the rotated refresh token failed"),
        }
    }
}

impl std::error::Error for OAuth2Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
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
    fn http_dates_parse() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(951_825_600)
        );
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(parse_http_date("soon"), None);
    }

    #[test]
    fn retry_after_is_capped() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("99999999999999999"));
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("later"));
        assert_eq!(retry_after(&headers), None);
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

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
        ] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in ["text/html", "text/plain", "application/jsonx", "+json"] {
            assert!(!is_json(&HeaderValue::from_static(bad)), "{bad}");
        }
    }

    #[test]
    fn expires_in_forms() {
        let parse = |json: &str| {
            let Value::Object(fields) = serde_json::from_str(json).unwrap() else {
                panic!()
            };
            expires_in(&fields)
        };
        assert_eq!(
            parse(r#"{"expires_in": 3600}"#),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse(r#"{"expires_in": "3600"}"#),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse(r#"{"expires_in": 59.9}"#),
            Some(Duration::from_secs(59))
        );
        assert_eq!(parse(r#"{"expires_in": 0}"#), None);
        assert_eq!(parse(r#"{"expires_in": -5}"#), None);
        assert_eq!(parse(r#"{"expires_in": "soon"}"#), None);
        assert_eq!(parse(r#"{"expires_in": 1e300}"#), Some(MAX_LIFETIME));
        assert_eq!(parse(r#"{}"#), None);
    }

    #[test]
    fn sanitize_keeps_rfc6749_characters() {
        assert_eq!(sanitize("invalid_grant", 64), "invalid_grant");
        assert_eq!(sanitize("a\"b\\c\nd\u{e9}", 64), "abcd");
        assert_eq!(sanitize(&"x".repeat(100), 64).len(), 64);
    }
}
