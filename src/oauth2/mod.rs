//! OAuth 2.0 refreshers: the refresh-token grant (RFC 6749 §6) and the client-credentials
//! grant (§4.4).
//!
//! [`OAuth2Refresher`] is a [`TokenRefresher`] that trades a refresh token
//! ([`OAuth2Refresher::builder`]) or the client's own credentials
//! ([`OAuth2Refresher::client_credentials`]) for a new access token at a token endpoint, over
//! any tower HTTP service (a hyper-util client, typically).
//!
//! - **Request**: `POST`, `application/x-www-form-urlencoded`, `grant_type=refresh_token`
//!   with `refresh_token` (or `grant_type=client_credentials`), an optional `scope`, RFC 8707
//!   `resource`s, an `audience`, [extra parameters](OAuth2RefresherBuilder::extra_param), and
//!   client authentication: `client_secret_basic`
//!   ([`ClientAuth::Basic`]), `client_secret_post` ([`ClientAuth::Post`]), or none (a public
//!   client, which sends its `client_id` if it has one).
//! - **Success** (§5.1): `access_token`, `token_type` (`Bearer`, any case; assumed when
//!   missing), `expires_in` (a number, or a numeric string; see
//!   [`expires_in`](self#expires_in-0-missing-or-unreadable) for 0), `refresh_token`.
//!   Other fields, `scope` included, are ignored. The body is capped
//!   ([`DEFAULT_MAX_RESPONSE_BODY`]); a success answer that is not JSON, lacks
//!   `access_token`, or is too large is a transient [`OAuth2Error`]. A 2xx answer with an
//!   `error` and no `access_token` (GitHub answers so) is an error answer, classified as
//!   below.
//! - **Rotation** (§6, RFC 9700 §4.14): a returned refresh token replaces the old one at once,
//!   then the [`on_rotation`](OAuth2RefresherBuilder::on_rotation) hook persists it, and only
//!   then is the new access token handed to the layer (the hook's documentation says what a
//!   failing hook does). No refresh token in the answer keeps the old one.
//! - **Token sets**: every access token the refresher returns carries the current refresh
//!   token ([`Token::refresh_token`]), rotated or not, and the layer keeps the two together.
//!   A refresh presents the refresh token of the token set it replaces
//!   ([`RefreshContext::stale`]) when there is one, else the refresher's own. So after a
//!   login, `handle.set_token(Token::bearer(access)?.with_refresh_token(refresh))` is the
//!   whole re-login. A refresh token this refresher saw rotated away (or forgot at a logout)
//!   is never presented again, even if a stale token set still carries it.
//! - **Errors** (§5.2): the codes of
//!   [`terminal_error_codes`](OAuth2RefresherBuilder::terminal_error_codes) (by default
//!   [`DEFAULT_TERMINAL_ERROR_CODES`]: `invalid_grant`, `invalid_client`, ...) are
//!   [terminal](RefreshError::terminal) at any status: the session ends. So is any
//!   400/401/403/422 answer, and a 404 or 405, which means there is no token endpoint at the
//!   URI ([`ErrorKind::Misconfigured`]). 5xx, 429, timeouts, connection errors and the codes of
//!   [`transient_error_codes`](OAuth2RefresherBuilder::transient_error_codes) are
//!   [transient](RefreshError::transient), and a `Retry-After` header is passed on with
//!   [`RefreshError::with_retry_after`]. With DPoP (feature `dpop`), `use_dpop_nonce` and
//!   `invalid_dpop_proof` are transient too: they refuse the proof, not the grant. The cause is an [`OAuth2Error`], which carries the
//!   `error` code and `error_description` but never a token or the raw body: the refresh
//!   token and client secret are blanked out of them (raw or percent-encoded) before they are
//!   cut to length.
//! - **Logout**: [`TokenHandle::clear`](crate::TokenHandle::clear) calls
//!   [`TokenRefresher::logout`], which makes the refresher forget its refresh token. With the
//!   refresh-token grant, a later refresh fails with a terminal
//!   [`ErrorKind::NoRefreshToken`] until a new login sets one; with the client-credentials
//!   grant, which uses no refresh token, a later refresh simply gets a new access token.
//!   The answer to a token request in flight when a refresh token is set (or forgotten) is
//!   not used: the request is made once more, at once, with the new one (or, after a logout,
//!   the refresh fails with [`ErrorKind::NoRefreshToken`]); a second replacement during that
//!   request fails with a transient [`ErrorKind::Superseded`]. Setting the very refresh
//!   token the request presents is the same session: its answer stands.
//!
//! # The client for token requests
//!
//! Give the refresher its own client, one that does **not** wear the
//! [`RefreshLayer`](crate::RefreshLayer): a token request must never wait on the refresh it is
//! part of. Token requests also carry the [`TokenRequest`](crate::TokenRequest) extension, and the layer lets
//! requests sent from inside a refresh through untouched, so sharing a client that wears the
//! layer does not recurse either; it only wastes the layer's work.
//!
//! The endpoint must be `https`, except on a loopback host (`localhost`, `127.0.0.0/8`,
//! `::1`) or with [`allow_insecure_http`](OAuth2RefresherBuilder::allow_insecure_http).
//! A hyper-util client built with `build_http()` only speaks plain HTTP: for an `https`
//! endpoint, build it with an HTTPS connector (hyper-rustls or hyper-tls).
//!
//! Token requests never follow redirects, so the refresh token and the client secret go to
//! the configured URI only: a 3xx answer is a terminal [`ErrorKind::Redirect`], and so is an
//! answer that the client fetched from a redirect target (a hyper-util client does not
//! follow redirects; for reqwest, see `ReqwestClient`, feature `reqwest`).
//!
//! # `expires_in`: 0, missing or unreadable
//!
//! RFC 6749 makes `expires_in` optional and says nothing of 0. This refresher reads
//! `expires_in: 0` (or a negative, missing or unreadable value) as **lifetime unknown**, not as
//! "already expired": the token gets no expiry ([`Token::expiry`] is `None`), is used until a
//! request is refused with a 401, and is refreshed then. Reading 0 as expired would make every
//! request refresh first, a token request per API request against such a server.
//!
//! # Rotation and cancellation
//!
//! The layer runs a refresh in a task of its own, to completion, even when every request
//! waiting for it is dropped, so the answer to a token request that went out is never lost
//! to a cancelled caller. When the layer itself stops waiting (its
//! [`refresh_timeout`](crate::RefreshOptions::refresh_timeout) runs out, or the retries'
//! total time), the refresher's exchange still runs to its end on a task of its own: the
//! answer is read, a rotated refresh token kept and the rotation hook run (for as long as
//! one token request may take), and the next refresh waits for that before it chooses a
//! refresh token. The refresher stores a rotated refresh token before anything else
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

mod builder;
mod dpop;
mod error;
mod grant;
#[cfg(feature = "reqwest")]
mod reqwest_client;
mod response;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::Full;
use tower_service::Service;

use crate::{BoxError, RefreshContext, RefreshError, Token, TokenRefresher};

pub use builder::{ClientAuth, OAuth2RefresherBuilder};
pub use error::{ConfigError, ErrorKind, OAuth2Error};
pub use grant::Grant;
#[cfg(feature = "reqwest")]
pub use reqwest_client::ReqwestClient;

use grant::{Auth, send};
use response::{failure, success};

/// How long a token request may take, from sending to the last byte of the answer, unless
/// [`timeout`](OAuth2RefresherBuilder::timeout) says otherwise: 10 seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest token response body read, unless
/// [`max_response_body`](OAuth2RefresherBuilder::max_response_body) says otherwise: 64 KiB.
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

/// The `error` codes that end the session whatever the HTTP status, unless
/// [`terminal_error_codes`](OAuth2RefresherBuilder::terminal_error_codes) replaces them: the
/// RFC 6749 §5.2 codes, RFC 8707's `invalid_target`, and the permanent token errors some
/// servers answer with a 409 or a 5xx (`invalid_token`, `token_expired`,
/// `invalid_token_state`, `token_collision`).
///
/// # Example
///
/// ```
/// use tower_auth_refresh::oauth2::DEFAULT_TERMINAL_ERROR_CODES;
///
/// assert!(DEFAULT_TERMINAL_ERROR_CODES.contains(&"invalid_grant"));
/// assert!(DEFAULT_TERMINAL_ERROR_CODES.contains(&"token_collision"));
/// ```
pub const DEFAULT_TERMINAL_ERROR_CODES: &[&str] = &[
    "invalid_grant",
    "invalid_client",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_request",
    "invalid_target",
    "invalid_token",
    "token_expired",
    "invalid_token_state",
    "token_collision",
];

/// A `Retry-After` longer than this is cut down to it.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// An `expires_in` longer than this (a year) is cut down to it.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest `error` code and `error_description` kept, in characters.
pub(crate) const MAX_CODE_LEN: usize = 64;
pub(crate) const MAX_DESCRIPTION_LEN: usize = 256;
pub(crate) const REDACTED: &str = "<redacted>";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub(crate) type Hook = Arc<dyn Fn(RefreshToken) -> BoxFuture<Result<(), BoxError>> + Send + Sync>;

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
    pub fn new(secret: impl Into<String>) -> Self {
        Self(Arc::from(secret.into()))
    }

    /// The refresh token itself, to persist it. The only accessor that reveals it.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken(<redacted>)")
    }
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
/// assert_eq!(refresher.refresh_token().unwrap().secret(), "rt-1");
/// assert!(!format!("{refresher:?}").contains("rt-1"));
/// # Ok(())
/// # }
/// ```
pub struct OAuth2Refresher<C> {
    pub(super) inner: Arc<Inner<C>>,
}

pub(super) struct Inner<C> {
    pub(super) endpoint: Uri,
    pub(super) client: C,
    pub(super) client_id: Option<Box<str>>,
    pub(super) auth: Auth,
    /// Kept only to blank it out of server-supplied error text.
    pub(super) client_secret: Option<Box<str>>,
    pub(super) grant: Grant,
    pub(super) scope: Option<Box<str>>,
    pub(super) resources: Box<[Box<str>]>,
    pub(super) audience: Option<Box<str>>,
    pub(super) extra_params: Box<[(Box<str>, Box<str>)]>,
    pub(super) timeout: Duration,
    pub(super) max_body: usize,
    pub(super) transient_codes: Box<[Box<str>]>,
    pub(super) terminal_codes: Box<[Box<str>]>,
    pub(super) hook: Option<Hook>,
    pub(super) dpop: dpop::DpopSettings,
    /// The current refresh token.
    pub(super) refresh_token: Mutex<Slot>,
    /// Held for a whole refresh, so that refreshes through clones never present the same
    /// refresh token twice. Taken before the exchange goes to a task of its own (see
    /// `TokenRefresher::refresh`).
    pub(super) serial: Arc<async_lock::Mutex<()>>,
}

/// The refresher's own refresh token, and a count of the times it was set from outside (a
/// new login, a logout), so that a refresh in flight never overwrites a newer setting.
/// It also remembers the last refresh tokens this refresher saw rotated away (or forgot at a
/// logout), so that a stale token set handed back by the layer never presents one of them
/// again.
#[derive(Default)]
pub(super) struct Slot {
    pub(super) token: Option<RefreshToken>,
    pub(super) generation: u64,
    pub(super) spent: std::collections::VecDeque<RefreshToken>,
    /// A rotated refresh token the [`on_rotation`](OAuth2RefresherBuilder::on_rotation) hook
    /// failed to persist; the hook gets it again until it succeeds (or the token changes).
    pub(super) unpersisted: Option<RefreshToken>,
    /// The refresh token the last refresh presented (refreshes take turns): setting this
    /// very token from outside during that refresh is the same session, not a new one.
    pub(super) presenting: Option<RefreshToken>,
    /// The last rotation this refresher stored, `(presented, rotated)`, until a token is
    /// set from outside: setting the rotated-away token again while the rotated one is held
    /// keeps the rotated one.
    pub(super) rotated: Option<(RefreshToken, RefreshToken)>,
}

/// The refresh token a refresh-token grant request presented.
#[derive(Clone, Copy)]
pub(super) struct Presented<'a> {
    pub(super) token: &'a RefreshToken,
    /// The generation of the refresher's slot when it was chosen.
    pub(super) generation: u64,
    /// Whether it came from the layer's token set rather than the refresher's own.
    pub(super) from_set: bool,
}

/// How many spent refresh tokens a refresher remembers.
const SPENT_KEPT: usize = 16;

impl Slot {
    fn spend(&mut self, token: RefreshToken) {
        if self.spent.len() == SPENT_KEPT {
            self.spent.pop_front();
        }
        self.spent.push_back(token);
    }

    fn is_spent(&self, secret: &str) -> bool {
        self.spent.iter().any(|t| t.secret() == secret)
    }
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
            .field("token_endpoint", &builder::ShownEndpoint(&inner.endpoint))
            .field("client_id", &inner.client_id)
            .field("client_auth", &auth)
            .field("grant", &inner.grant)
            .field("refresh_token", &REDACTED)
            .field("scope", &inner.scope)
            .field("resources", &inner.resources)
            .field("audience", &inner.audience)
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
            grant: Grant::RefreshToken,
            scope: None,
            resources: Vec::new(),
            audience: None,
            extra_params: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_RESPONSE_BODY,
            transient_codes: DEFAULT_TRANSIENT_ERROR_CODES
                .iter()
                .map(|&c| c.into())
                .collect(),
            terminal_codes: DEFAULT_TERMINAL_ERROR_CODES
                .iter()
                .map(|&c| c.into())
                .collect(),
            allow_insecure: false,
            hook: None,
            dpop: dpop::DpopSettings::default(),
        }
    }
    /// Starts a refresher for the client-credentials grant (RFC 6749 §4.4): a confidential
    /// client trades its own credentials for an access token, with no user and no refresh
    /// token. The same as [`builder`](Self::builder) then
    /// [`grant(Grant::ClientCredentials)`](OAuth2RefresherBuilder::grant).
    ///
    /// # Example
    ///
    /// ```
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # use hyper_util::client::legacy::Client;
    /// # use hyper_util::rt::TokioExecutor;
    /// use tower_auth_refresh::RefreshLayer;
    /// use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    /// let endpoint = "https://idp.example/oauth/token".parse()?;
    /// let refresher = OAuth2Refresher::client_credentials(endpoint, client)
    ///     .client_id("billing-service")
    ///     .client_secret("s3cr3t", ClientAuth::Basic)
    ///     .scope("invoices:read")
    ///     .resource("https://api.example/invoices")
    ///     .build()?;
    /// // No initial token: the first requests wait for one token request.
    /// let layer = RefreshLayer::new(refresher);
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn client_credentials(token_endpoint: Uri, client: C) -> OAuth2RefresherBuilder<C> {
        Self::builder(token_endpoint, client).grant(Grant::ClientCredentials)
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
    /// assert_eq!(refresher.refresh_token().unwrap().secret(), "rt-1");
    /// # Ok(())
    /// # }
    /// ```
    pub fn refresh_token(&self) -> Option<RefreshToken> {
        self.inner.current().0
    }

    /// Replaces the refresh token, after a new login for instance (then install the new
    /// access token with [`TokenHandle::set_token`](crate::TokenHandle::set_token) to end a
    /// session-ended state). A refresh in flight that rotates the token it presented does not
    /// overwrite this one (the token set it returns carries this one), and the replaced token
    /// is never presented again, even if the layer's token set still carries it. Installing a token set with
    /// [`Token::with_refresh_token`] through the handle does both steps at once.
    ///
    /// Setting the very token this refresher's last refresh presented is the same session:
    /// a refresh in flight keeps its answer, and if it already rotated that token away, the
    /// rotated one stays (presenting the spent one would look like reuse to the server).
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
    /// assert_eq!(refresher.refresh_token().unwrap().secret(), "after-login");
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_refresh_token(&self, token: RefreshToken) {
        self.inner.set(Some(token));
    }

    /// The token endpoint.
    pub fn token_endpoint(&self) -> &Uri {
        &self.inner.endpoint
    }
}

impl<C> Inner<C> {
    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.refresh_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The current refresh token and the generation of the slot.
    pub(super) fn current(&self) -> (Option<RefreshToken>, u64) {
        let slot = self.slot();
        (slot.token.clone(), slot.generation)
    }

    /// The refresh token to present: the one of the layer's token set (`offered`) unless this
    /// refresher saw it spent, else its own. Also returns the slot's generation, and whether
    /// the token came from the token set and differs from the refresher's own.
    fn choose(&self, offered: Option<&str>) -> (Option<RefreshToken>, u64, bool) {
        let mut slot = self.slot();
        let own = slot.token.clone();
        match offered {
            Some(s)
                if !s.is_empty()
                    && !slot.is_spent(s)
                    && own.as_ref().is_none_or(|o| o.secret() != s) =>
            {
                let token = RefreshToken::new(s);
                slot.presenting = Some(token.clone());
                (Some(token), slot.generation, true)
            }
            _ => {
                slot.presenting = own.clone();
                (own, slot.generation, false)
            }
        }
    }

    /// Sets (or, with `None`, forgets) the refresh token from outside a refresh.
    fn set(&self, token: Option<RefreshToken>) {
        let mut slot = self.slot();
        if let (Some(new), Some((from, to)), Some(own)) = (&token, &slot.rotated, &slot.token) {
            if new.secret() == from.secret() && own.secret() == to.secret() {
                // The token this refresher's last refresh rotated away, while the token it
                // rotated into is held (its hook may still be persisting it): the same
                // session, moved on; the rotated token stays.
                tracing::debug!(
                    "oauth2: a refresh token already rotated away was set; kept the rotated one"
                );
                return;
            }
        }
        if let Some(old) = slot.token.take() {
            if token
                .as_ref()
                .is_none_or(|new| new.secret() != old.secret())
            {
                // Logged out or replaced: a token set still holding the old one must not
                // log the old user back in.
                slot.spend(old);
            }
        }
        // The very token a refresh presents (a login that set it through the handle, then
        // here): the same session, whose answer that refresh may keep. Otherwise a refresh in
        // flight belongs to a replaced session.
        let same_session = match (&token, &slot.presenting) {
            (Some(new), Some(presenting)) => new.secret() == presenting.secret(),
            _ => false,
        };
        if !same_session {
            slot.generation += 1;
            // Another session: the token the last refresh presented (the layer's token set's,
            // perhaps, not the refresher's own) belongs to the old one, whatever becomes of
            // that refresh: an answer that never came, a retry with the same token set.
            if let Some(old) = slot.presenting.take() {
                if token
                    .as_ref()
                    .is_none_or(|new| new.secret() != old.secret())
                {
                    slot.spend(old);
                }
            }
        }
        slot.token = token;
        slot.rotated = None;
        // A token set from outside is the application's own to persist.
        slot.unpersisted = None;
    }

    /// Stores `current` (a rotated token, or the token set's token that the server accepted)
    /// unless the token was set from outside since `generation` was read (a new login or a
    /// logout wins over a refresh that was in flight) to another token than `spent`;
    /// remembers `spent`, the token that was rotated away, in any case. Returns whether it
    /// stored `current`.
    pub(super) fn store(
        &self,
        generation: u64,
        current: RefreshToken,
        spent: Option<RefreshToken>,
    ) -> bool {
        let mut slot = self.slot();
        // Also when the token set from outside since is the very one this answer rotated
        // away (an account switch and back during the request): the same session, which
        // moves on to `current` (the spent token must never be presented again).
        let same_session = spent.as_ref().is_some_and(|spent| {
            slot.token
                .as_ref()
                .is_some_and(|own| own.secret() == spent.secret())
        });
        let stored = slot.generation == generation || same_session;
        if let Some(spent) = spent {
            if stored {
                slot.rotated = Some((spent.clone(), current.clone()));
            }
            slot.spend(spent);
        }
        if stored {
            slot.token = Some(current);
        }
        stored
    }

    /// The refresher's own refresh token if the hook failed to persist it and nothing was set
    /// from outside since `generation` was read.
    pub(super) fn unpersisted(&self, generation: u64) -> Option<RefreshToken> {
        let slot = self.slot();
        match (&slot.token, &slot.unpersisted) {
            (Some(own), Some(u)) if slot.generation == generation && own.secret() == u.secret() => {
                Some(own.clone())
            }
            _ => None,
        }
    }

    /// Records whether the hook failed (`true`) or managed (`false`) to persist `token`, if it
    /// is still the refresher's own.
    pub(super) fn set_unpersisted(&self, token: &RefreshToken, failed: bool) {
        let mut slot = self.slot();
        if slot
            .token
            .as_ref()
            .is_some_and(|own| own.secret() == token.secret())
        {
            slot.unpersisted = failed.then(|| token.clone());
        }
    }

    pub(super) fn is_transient_code(&self, code: &str) -> bool {
        self.transient_codes.iter().any(|c| &**c == code)
    }

    pub(super) fn is_terminal_code(&self, code: &str) -> bool {
        self.terminal_codes.iter().any(|c| &**c == code)
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

    /// A token request answered for a session that a new refresh token replaced while it
    /// was in flight (a login, a logout) is made once more at once, with the refresh token
    /// there now: the caller gets the new session's answer, not a transient failure (which
    /// a single-attempt refresh after a cool-down would have counted as another failure).
    ///
    /// The exchange runs to its end on a task of its own (on the current Tokio runtime):
    /// when the layer stops waiting for it (its refresh timeout, or no request waits any
    /// more), an answer still on its way is read, a rotated refresh token kept, and the
    /// rotation hook run, so that the next refresh presents the new refresh token and what
    /// the hook persisted is never left a spent one. The next refresh waits for it to end. A
    /// refresh the layer stops waiting for while it still waits for an earlier one to end
    /// sends nothing. The refresher's own [`timeout`](OAuth2RefresherBuilder::timeout) bounds
    /// each token request, and the hook too.
    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            // Waited for here, where giving up costs nothing: only an exchange that holds it
            // runs on without its caller.
            let serial = inner.serial.lock_arc().await;
            crate::cell::run_to_end(async move {
                let _serial = serial;
                match refresh(Arc::clone(&inner), ctx.clone()).await {
                    Err(err) if is_superseded(&err) => refresh(inner, ctx).await,
                    answer => answer,
                }
            })
            .await
        })
    }

    /// Forgets the refresh token, so that no later refresh can log the old user back in.
    ///
    /// With the refresh-token grant, a refresh without a refresh token fails with a terminal
    /// [`ErrorKind::NoRefreshToken`] until a new login sets one
    /// ([`set_refresh_token`](OAuth2Refresher::set_refresh_token)). With the
    /// client-credentials grant there is no refresh token and no user session to end: the
    /// next refresh simply gets a new access token with the client's credentials.
    fn logout(&self) {
        self.inner.set(None);
        tracing::debug!("oauth2: logout: the refresh token is forgotten");
    }
}

/// Whether `err` is a [`ErrorKind::Superseded`] answer.
fn is_superseded(err: &RefreshError) -> bool {
    std::error::Error::source(err)
        .and_then(|cause| cause.downcast_ref::<OAuth2Error>())
        .is_some_and(|cause| cause.kind() == ErrorKind::Superseded)
}

async fn refresh<C, ResBody>(
    inner: Arc<Inner<C>>,
    ctx: RefreshContext,
) -> Result<Token, RefreshError>
where
    C: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + Sync + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    // The caller holds `inner.serial` (see `TokenRefresher::refresh`).
    // Chosen under the lock: a refresh that waited for another one sees its rotation.
    let chosen = match inner.grant {
        Grant::RefreshToken => {
            let offered = ctx.stale().and_then(Token::refresh_token);
            let (chosen, generation, from_set) = inner.choose(offered);
            let Some(token) = chosen else {
                tracing::debug!("oauth2: no refresh token to present");
                return Err(RefreshError::terminal(OAuth2Error::new(
                    ErrorKind::NoRefreshToken,
                )));
            };
            Some((token, generation, from_set))
        }
        Grant::ClientCredentials => None,
    };
    let presented = chosen
        .as_ref()
        .map(|(token, generation, from_set)| Presented {
            token,
            generation: *generation,
            from_set: *from_set,
        });
    let mut req = inner.request(presented.map(|p| p.token));
    inner.dpop.prove(&mut req)?;
    tracing::debug!(
        host = inner.endpoint.host().unwrap_or_default(),
        grant = inner.grant.as_str(),
        "oauth2: sending token request"
    );
    let (mut status, mut headers, mut body) = send(&inner, req).await?;
    // DPoP: every answer's nonce is remembered; a `use_dpop_nonce` refusal is retried once.
    let observe = |status, headers: &_, body: &Result<Bytes, _>| {
        let body = body.as_deref().unwrap_or_default();
        inner.dpop.observe(&inner.endpoint, status, headers, body)
    };
    if observe(status, &headers, &body) {
        tracing::debug!("oauth2: token endpoint asked for a DPoP nonce; retrying once");
        let mut retry = inner.request(presented.map(|p| p.token));
        inner.dpop.prove(&mut retry)?;
        (status, headers, body) = send(&inner, retry).await?;
        // A second refusal is not retried (a transient error, below).
        observe(status, &headers, &body);
    }
    let answer = match body {
        Ok(body) if status.is_success() => {
            success(&inner, presented, status, &headers, &body).await
        }
        Err(err) if status.is_success() => {
            tracing::debug!(kind = ?err.kind, "oauth2: reading the token response failed");
            Err(RefreshError::transient(err))
        }
        // An error answer is classified by its status even if its body cannot be read.
        body => Err(failure(
            &inner,
            presented.map(|p| p.token),
            status,
            &headers,
            body.as_deref().unwrap_or_default(),
        )),
    };
    // An answer for a session that a new refresh token replaced while it was in flight (a
    // login, a logout) is not used, whatever it says: neither its access token nor a refusal
    // (an `invalid_grant` for the old refresh token must not end the new session). The retry
    // presents the new refresh token. (Its rotation, if any, was recorded by `success`.)
    // (`set` retired the refresh token presented here: the question asked again, and any
    // retry with this context, cannot offer it.)
    if presented.is_some_and(|p| inner.current().1 != p.generation) {
        return Err(response::superseded(status));
    }
    answer
}
