use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, StatusCode, Uri};
use tower_layer::Layer;

use crate::body::{DEFAULT_MAX_REPLAY_BODY, DEFAULT_REPLAY_BODY_WAIT};
use crate::cell::Cell;
use crate::clock::Clock;
use crate::handle::TokenHandle;
use crate::policy::default_trigger;
use crate::refresher::TokenRefresher;
use crate::retry::RetryPolicy;
use crate::service::Refresh;
use crate::token::Token;

type Trigger = Arc<dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync>;

/// Which requests may be replayed after a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ReplayMethods {
    /// Every method (the default): a 401 means the server refused the request before acting
    /// on it.
    #[default]
    All,
    /// Only idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE).
    Idempotent,
}

/// An origin (scheme, host, port) that may receive the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: Scheme,
    host: String,
    port: u16,
}

impl Origin {
    fn of(scheme: &Scheme, authority: &Authority) -> Option<Self> {
        let port = authority.port_u16().or_else(|| match scheme.as_str() {
            "https" | "wss" => Some(443),
            "http" | "ws" => Some(80),
            _ => None,
        })?;
        Some(Self {
            scheme: scheme.clone(),
            host: authority.host().to_ascii_lowercase(),
            port,
        })
    }

    fn of_uri(uri: &Uri) -> Option<Self> {
        Self::of(uri.scheme()?, uri.authority()?)
    }
}

/// The configuration a service reads per request.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_replay_body: usize,
    pub(crate) replay_body_wait: Duration,
    pub(crate) trigger: Option<Trigger>,
    pub(crate) replay_methods: ReplayMethods,
    pub(crate) origins: Option<Arc<[Origin]>>,
}

impl Config {
    pub(crate) fn triggers(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        match &self.trigger {
            Some(trigger) => trigger(status, headers),
            None => default_trigger(status, headers),
        }
    }

    pub(crate) fn may_replay(&self, method: &Method) -> bool {
        match self.replay_methods {
            ReplayMethods::All => true,
            ReplayMethods::Idempotent => matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            ),
        }
    }

    pub(crate) fn origin_allowed(&self, uri: &Uri) -> bool {
        match &self.origins {
            None => true,
            Some(allowed) => Origin::of_uri(uri).is_some_and(|o| allowed.contains(&o)),
        }
    }
}

/// Everything a service shares with its clones: the token cell and the configuration.
pub(crate) struct Shared {
    pub(crate) cell: Arc<Cell>,
    pub(crate) config: Config,
}

/// Attaches a refreshed bearer token to every request and replays a request once after a 401.
///
/// The layer owns the token cell: every service it produces, and every clone of those, shares
/// one token, one refresh in flight at a time and one [`TokenHandle`].
///
/// # Defaults
///
/// | option | default |
/// |---|---|
/// | [`leeway`](Self::leeway) | 30 s, at most 1/10 of the token's lifetime |
/// | [`refresh_ahead`](Self::refresh_ahead) | off |
/// | [`retry`](Self::retry) | [`RetryPolicy::default`]: 4 attempts, 200 ms base, 30 s total |
/// | [`max_replay_body`](Self::max_replay_body) | 1 MiB |
/// | [`replay_body_wait`](Self::replay_body_wait) | 1 s |
/// | [`refresh_on`](Self::refresh_on) | [`default_trigger`]: 401 unless RFC 6750 says otherwise |
/// | [`replay_methods`](Self::replay_methods) | [`ReplayMethods::All`] |
/// | [`allowed_origins`](Self::allowed_origins) | every origin |
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use http::{Request, Response};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, ReplayBody, Token};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
/// let layer = RefreshLayer::new(refresh_fn(|_stale| async {
///     Ok::<_, RefreshError>(Token::bearer("fresh")?.with_expires_in(Duration::from_secs(3600)))
/// }))
/// .leeway(Duration::from_secs(60));
///
/// let svc = ServiceBuilder::new().layer(layer).service(service_fn(
///     |req: Request<ReplayBody<String>>| async move {
///         let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
///         Ok::<_, Infallible>(Response::new(auth))
///     },
/// ));
/// let res = svc.oneshot(Request::new(String::new())).await?;
/// assert_eq!(res.body(), "Bearer fresh");
/// # Ok(())
/// # }
/// ```
pub struct RefreshLayer<R> {
    shared: Arc<Shared>,
    _refresher: PhantomData<fn() -> R>,
}

impl<R> Clone for RefreshLayer<R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _refresher: PhantomData,
        }
    }
}

impl<R> fmt::Debug for RefreshLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshLayer")
            .field("cell", &self.shared.cell)
            .field("max_replay_body", &self.shared.config.max_replay_body)
            .field("replay_methods", &self.shared.config.replay_methods)
            .finish_non_exhaustive()
    }
}

impl<R: TokenRefresher> RefreshLayer<R> {
    /// A layer that gets its tokens from `refresher`. The first request triggers the first
    /// refresh, unless a token is installed with [`initial_token`](Self::initial_token).
    pub fn new(refresher: R) -> Self {
        Self {
            shared: Arc::new(Shared {
                cell: Arc::new(Cell::new(refresher)),
                config: Config {
                    max_replay_body: DEFAULT_MAX_REPLAY_BODY,
                    replay_body_wait: DEFAULT_REPLAY_BODY_WAIT,
                    trigger: None,
                    replay_methods: ReplayMethods::All,
                    origins: None,
                },
            }),
            _refresher: PhantomData,
        }
    }
}

impl<R> RefreshLayer<R> {
    /// The cell and configuration, for adapters that share them (the reqwest middleware).
    #[cfg(feature = "reqwest")]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn config_mut(&mut self) -> &mut Config {
        if Arc::get_mut(&mut self.shared).is_none() {
            // Cloned layer: detach the configuration, keep sharing the cell.
            self.shared = Arc::new(Shared {
                cell: self.shared.cell.clone(),
                config: self.shared.config.clone(),
            });
        }
        &mut Arc::get_mut(&mut self.shared)
            .expect("just detached")
            .config
    }

    /// The handle to the shared token: install, clear, force a refresh, read the state,
    /// subscribe to events. Every handle and service of this layer shares one cell.
    pub fn handle(&self) -> TokenHandle {
        TokenHandle::new(self.shared.cell.clone())
    }

    /// Starts with `token`, so the first requests need no refresh.
    #[must_use]
    pub fn initial_token(self, token: Token) -> Self {
        self.shared.cell.install(token);
        self
    }

    /// How long before its expiry a token is refreshed before sending (default 30 s). Clamped
    /// to a tenth of the token's lifetime, so a short-lived token is not refreshed on every
    /// request.
    #[must_use]
    pub fn leeway(self, leeway: Duration) -> Self {
        self.shared.cell.update_settings(|s| s.leeway = leeway);
        self
    }

    /// Turns on refresh-ahead: within `window` of expiry (clamped to half the token's
    /// lifetime), one background refresh starts while requests keep using the still-valid
    /// token. A failed background refresh keeps the old token and backs off. Off by default.
    #[must_use]
    pub fn refresh_ahead(self, window: Duration) -> Self {
        self.shared
            .cell
            .update_settings(|s| s.refresh_ahead = Some(window));
        self
    }

    /// How transient refresh failures are retried (default [`RetryPolicy::default`]).
    #[must_use]
    pub fn retry(self, policy: RetryPolicy) -> Self {
        self.shared.cell.update_settings(|s| s.retry = policy);
        self
    }

    /// The monotonic clock for token lifetimes (default [`TokioClock`](crate::TokioClock)).
    #[must_use]
    pub fn clock(self, clock: impl Clock) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(clock);
        self.shared.cell.update_settings(|s| s.clock = clock);
        self
    }

    /// The largest body kept for a replay, in bytes (default 1 MiB). Bodies of unknown size or
    /// larger pass through untouched and are not replayed.
    #[must_use]
    pub fn max_replay_body(mut self, bytes: usize) -> Self {
        self.config_mut().max_replay_body = bytes;
        self
    }

    /// How long a 401 that arrives while the first attempt is still sending its body waits for
    /// the send to finish or be dropped (default 1 s). A server may refuse a request before
    /// reading its body; the replay needs the whole body, captured or handed over. After the
    /// wait, the 401 goes back to the caller unreplayed. Zero never waits.
    #[must_use]
    pub fn replay_body_wait(mut self, wait: Duration) -> Self {
        self.config_mut().replay_body_wait = wait;
        self
    }

    /// Which responses trigger a refresh and a replay, for APIs that signal an expired token
    /// differently (a 403, a custom header). Default: [`default_trigger`].
    ///
    /// # Example
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_auth_refresh::{policy::default_trigger, refresh_fn, RefreshError, RefreshLayer, Token};
    ///
    /// let layer = RefreshLayer::new(refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) }))
    ///     .refresh_on(|status, headers| {
    ///         default_trigger(status, headers)
    ///             || (status == StatusCode::FORBIDDEN && headers.contains_key("x-token-expired"))
    ///     });
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn refresh_on<F>(mut self, trigger: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> bool + Send + Sync + 'static,
    {
        self.config_mut().trigger = Some(Arc::new(trigger));
        self
    }

    /// Which methods may be replayed (default [`ReplayMethods::All`]).
    #[must_use]
    pub fn replay_methods(mut self, methods: ReplayMethods) -> Self {
        self.config_mut().replay_methods = methods;
        self
    }

    /// Attaches the token only to requests for these origins (`scheme://host[:port]`); other
    /// requests get no token and never trigger a refresh. Default: every origin.
    ///
    /// # Errors
    ///
    /// [`InvalidOrigin`] for a string without a scheme and host.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
    ///
    /// let layer = RefreshLayer::new(refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) }))
    ///     .allowed_origins(["https://api.example.com"])?;
    /// # let _ = layer;
    /// # Ok::<(), tower_auth_refresh::InvalidOrigin>(())
    /// ```
    pub fn allowed_origins<I, O>(mut self, origins: I) -> Result<Self, InvalidOrigin>
    where
        I: IntoIterator<Item = O>,
        O: AsRef<str>,
    {
        let parsed = origins
            .into_iter()
            .map(|o| {
                o.as_ref()
                    .parse::<Uri>()
                    .ok()
                    .as_ref()
                    .and_then(Origin::of_uri)
                    .ok_or(InvalidOrigin)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.config_mut().origins = Some(parsed.into());
        Ok(self)
    }
}

impl<S, R> Layer<S> for RefreshLayer<R> {
    type Service = Refresh<S, R>;

    fn layer(&self, inner: S) -> Refresh<S, R> {
        Refresh::from_shared(inner, self.shared.clone())
    }
}

/// An allowed origin that is not `scheme://host[:port]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidOrigin;

impl fmt::Display for InvalidOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid origin: expected scheme://host[:port]")
    }
}

impl std::error::Error for InvalidOrigin {}
