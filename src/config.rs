//! The options of a layer ([`RefreshOptions`]), the per-request policy they imply, and the
//! request markers.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode, Uri};

use crate::BoxError;
use crate::backoff::{Backoff, Cooldown, RefreshAhead};
use crate::body::{DEFAULT_MAX_REPLAY_BODY, DEFAULT_REPLAY_BODY_WAIT};
use crate::clock::{Clock, TokioClock};
pub use crate::origin::InvalidOrigin;
use crate::origin::{Origin, Origins};
use crate::policy::default_trigger;

type Trigger = Arc<dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync>;
type AttachRule = Arc<dyn Fn(&RequestHead<'_>) -> bool + Send + Sync>;

/// Marks a request as a token request sent by a refresher: it passes through the layer
/// untouched (no token, no refresh, no replay), so a refresher that sends through a client
/// wearing this same layer cannot recurse.
///
/// Requests sent from inside a refresher's future are recognised even without the marker.
/// (Named `TokenRequest` because it marks the request *for* a token; it was `RefreshRequest`.)
///
/// # Example
///
/// ```
/// use tower_auth_refresh::TokenRequest;
///
/// let mut req = http::Request::post("https://idp.example/token").body(String::new()).unwrap();
/// req.extensions_mut().insert(TokenRequest);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenRequest;

/// Opts one request out of the replay: it still gets the current token (and still waits for
/// one when there is none), but a 401 is returned to the caller as it is. (It was `NoRefresh`;
/// the new name says what it turns off.)
///
/// # Example
///
/// ```
/// use tower_auth_refresh::NoReplay;
///
/// let mut req = http::Request::post("https://api.example/upload").body(String::new()).unwrap();
/// req.extensions_mut().insert(NoReplay);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoReplay;

/// A proof of possession added to each send of a request that carries the token: the hook for
/// sender-constrained tokens such as DPoP (RFC 9449).
///
/// The layer calls [`prove`](Self::prove) for the first send and again for the replay (a proof
/// is never reused), after it set `Authorization`, and shows the proof every response to a
/// proven send that may be replayed (the response to a [`NoReplay`] request may go straight
/// to the caller unseen: a `DPoP-Nonce` it carries is then not remembered). A response that asks for a new *proof* rather than a new token (DPoP's
/// `use_dpop_nonce`) is answered by one replay with the same token and a fresh proof, never a
/// refresh. A request is replayed at most once in all: for a new token or for a new proof.
///
/// # Example
///
/// ```
/// use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
/// use tower_auth_refresh::{BoxError, RefreshOptions, RequestProof};
///
/// /// Signs each request with a counter (a stand-in for a real proof).
/// #[derive(Debug, Default)]
/// struct Counter(std::sync::atomic::AtomicU64);
///
/// impl RequestProof for Counter {
///     fn prove(&self, _: &Method, _: &Uri, headers: &mut HeaderMap) -> Result<(), BoxError> {
///         let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         headers.insert("x-proof", HeaderValue::from(n));
///         Ok(())
///     }
///     fn wants_new_proof(&self, _: &Uri, _: StatusCode, _: &HeaderMap) -> bool {
///         false
///     }
/// }
/// let options = RefreshOptions::new().proof(Counter::default());
/// # let _ = options;
/// ```
pub trait RequestProof: fmt::Debug + Send + Sync + 'static {
    /// Adds the proof headers for one send; `headers` already carries the `Authorization`
    /// with the token. An error fails the request before it is sent.
    ///
    /// # Errors
    ///
    /// Whatever keeps the proof from being made (a signer that is unavailable).
    fn prove(&self, method: &Method, uri: &Uri, headers: &mut HeaderMap) -> Result<(), BoxError>;

    /// Sees the response to a proven send (to remember a server nonce, for one). `true`: the
    /// server asks for a new proof, not a new token; the request is replayed once with the
    /// same token and a fresh proof, without a refresh.
    fn wants_new_proof(&self, uri: &Uri, status: StatusCode, headers: &HeaderMap) -> bool;
}

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

/// The head of a request, as seen by an [attach rule](RefreshOptions::attach_when).
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
}

impl<'a> RequestHead<'a> {
    pub(crate) fn new(method: &'a Method, uri: &'a Uri, headers: &'a HeaderMap) -> Self {
        Self {
            method,
            uri,
            headers,
        }
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }
}

/// Every per-token option of [`RefreshLayer`](crate::RefreshLayer) and
/// [`KeyedRefreshLayer`](crate::keyed::KeyedRefreshLayer), as one plain value.
///
/// # Options and clones
///
/// One rule: **options are a value; the token is shared.** A layer keeps its options by
/// value; a setter on a layer (or on a clone of it) changes that layer value only, never a
/// clone made before, never a service already made. Every clone shares the *token* (one
/// cell: one refresh in flight, one generation, one handle), whatever its options. The
/// setters on the layers are shorthands for the ones here.
///
/// # Defaults
///
/// | option | default |
/// |---|---|
/// | [`leeway`](Self::leeway) | 30 s, at most 1/10 of the token's lifetime |
/// | [`refresh_ahead`](Self::refresh_ahead) | off |
/// | [`retries`](Self::retries) | [`Backoff::default`]: 4 attempts, 200 ms base, 30 s total |
/// | [`cooldown`](Self::cooldown) | [`Cooldown::default`]: 30 s doubling to 5 min, jittered |
/// | [`refresh_timeout`](Self::refresh_timeout) | 30 s per refresher call |
/// | [`clock`](Self::clock) | [`TokioClock`] |
/// | [`max_replay_body`](Self::max_replay_body) | 1 MiB |
/// | [`replay_body_wait`](Self::replay_body_wait) | 1 s |
/// | [`refresh_on`](Self::refresh_on) | [`default_trigger`]: 401 unless RFC 6750 says otherwise |
/// | [`replay_methods`](Self::replay_methods) | [`ReplayMethods::All`] |
/// | origins | the origin of the first request ([`allowed_origins`](Self::allowed_origins), [`any_origin`](Self::any_origin)) |
/// | [`allow_insecure_http`](Self::allow_insecure_http) | off: `http://` only to loopback |
/// | [`attach_when`](Self::attach_when) | every request |
/// | [`anonymous_when_logged_out`](Self::anonymous_when_logged_out) | off |
/// | [`unauthorized_as_response`](Self::unauthorized_as_response) | off: an error |
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, RefreshOptions, Token};
///
/// let options = RefreshOptions::new()
///     .leeway(Duration::from_secs(60))
///     .refresh_timeout(Duration::from_secs(10))
///     .allowed_origins(["https://api.example.com"])?;
/// let layer = RefreshLayer::with_options(
///     refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) }),
///     options,
/// );
/// # let _ = layer;
/// # Ok::<(), tower_auth_refresh::InvalidOrigin>(())
/// ```
#[derive(Clone)]
pub struct RefreshOptions {
    pub(crate) leeway: Duration,
    pub(crate) refresh_ahead: Option<RefreshAhead>,
    pub(crate) retries: Backoff,
    pub(crate) cooldown: Cooldown,
    pub(crate) refresh_timeout: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) max_replay_body: usize,
    pub(crate) replay_body_wait: Duration,
    pub(crate) trigger: Option<Trigger>,
    pub(crate) replay_methods: ReplayMethods,
    pub(crate) origins: Origins,
    pub(crate) allow_insecure_http: bool,
    pub(crate) attach_when: Option<AttachRule>,
    pub(crate) anonymous: bool,
    pub(crate) unauthorized_as_response: bool,
    pub(crate) proof: Option<Arc<dyn RequestProof>>,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        Self {
            leeway: Duration::from_secs(30),
            refresh_ahead: None,
            retries: Backoff::default(),
            cooldown: Cooldown::default(),
            refresh_timeout: Duration::from_secs(30),
            clock: Arc::new(TokioClock),
            max_replay_body: DEFAULT_MAX_REPLAY_BODY,
            replay_body_wait: DEFAULT_REPLAY_BODY_WAIT,
            trigger: None,
            replay_methods: ReplayMethods::All,
            origins: Origins::FirstSeen,
            allow_insecure_http: false,
            attach_when: None,
            anonymous: false,
            unauthorized_as_response: false,
            proof: None,
        }
    }
}

impl fmt::Debug for RefreshOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshOptions")
            .field("leeway", &self.leeway)
            .field("refresh_ahead", &self.refresh_ahead)
            .field("retries", &self.retries)
            .field("cooldown", &self.cooldown)
            .field("refresh_timeout", &self.refresh_timeout)
            .field("clock", &self.clock)
            .field("max_replay_body", &self.max_replay_body)
            .field("replay_body_wait", &self.replay_body_wait)
            .field("custom_trigger", &self.trigger.is_some())
            .field("replay_methods", &self.replay_methods)
            .field("origins", &self.origins)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .field("attach_rule", &self.attach_when.is_some())
            .field("anonymous_when_logged_out", &self.anonymous)
            .field("unauthorized_as_response", &self.unauthorized_as_response)
            .field("proof", &self.proof.is_some())
            .finish()
    }
}

impl RefreshOptions {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// How long before its expiry a token is refreshed before sending (default 30 s). Clamped
    /// to a tenth of the token's lifetime, so a short-lived token is not refreshed on every
    /// request. If that refresh fails, the token is still sent until it actually expires.
    #[must_use]
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Turns on refresh-ahead: inside the window before expiry, one background refresh starts
    /// while requests keep using the still-valid token. A fixed window is given as a
    /// `Duration`; [`RefreshAhead::aws`] and [`RefreshAhead::by_lifetime`] pick it from the
    /// token's lifetime. The window is capped at half the lifetime. A failed background
    /// refresh keeps the token and backs off; a terminal one ends the session at once. Off by
    /// default.
    #[must_use]
    pub fn refresh_ahead(mut self, window: impl Into<RefreshAhead>) -> Self {
        self.refresh_ahead = Some(window.into());
        self
    }

    /// How the attempts of one refresh are spaced after transient failures (default
    /// [`Backoff::default`]). (It was `retry(RetryPolicy)`.)
    #[must_use]
    pub fn retries(mut self, backoff: Backoff) -> Self {
        self.retries = backoff;
        self
    }

    /// The pause after a failed refresh (default [`Cooldown::default`]).
    #[must_use]
    pub fn cooldown(mut self, cooldown: Cooldown) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// The most one refresher call may take (default 30 s). A call that takes longer is cut
    /// off as a transient failure, so a refresher that never returns cannot wedge the layer.
    /// (Needs a Tokio runtime with a timer; without a runtime there is no bound.) With a
    /// `store::StoreRefresher` or the OAuth 2.0 refresher the layer only stops waiting: the
    /// token call, once made, runs to its end (under the store's lease, see its "Time
    /// limits"; the OAuth 2.0 refresher's persistence hook included, bounded by that
    /// refresher's own `timeout`) and keeps its answer for the next refresh. Zero cuts off
    /// every call that is not ready at its first poll: every refresh then fails.
    #[must_use]
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.refresh_timeout = timeout;
        self
    }

    /// The clock for token lifetimes (default [`TokioClock`]). A token's lifetime is placed
    /// on the clock when the token is installed: on a layer, set the clock before
    /// [`initial_token`](crate::RefreshLayer::initial_token).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The largest body kept for a replay, in bytes (default 1 MiB). Larger bodies pass
    /// through untouched and are not replayed.
    #[must_use]
    pub fn max_replay_body(mut self, bytes: usize) -> Self {
        self.max_replay_body = bytes;
        self
    }

    /// How long a 401 that arrives while the first attempt is still sending its body waits for
    /// the send to finish or be dropped (default 1 s). After the wait, the 401 goes back to the
    /// caller unreplayed. Zero never waits.
    #[must_use]
    pub fn replay_body_wait(mut self, wait: Duration) -> Self {
        self.replay_body_wait = wait;
        self
    }

    /// Which responses trigger a refresh and a replay, for APIs that signal an expired token
    /// differently (a 403, a custom header). Default: [`default_trigger`].
    ///
    /// # Example
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_auth_refresh::{policy::default_trigger, RefreshOptions};
    ///
    /// let options = RefreshOptions::new().refresh_on(|status, headers| {
    ///     default_trigger(status, headers)
    ///         || (status == StatusCode::FORBIDDEN && headers.contains_key("x-token-expired"))
    /// });
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn refresh_on<F>(mut self, trigger: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> bool + Send + Sync + 'static,
    {
        self.trigger = Some(Arc::new(trigger));
        self
    }

    /// Which methods may be replayed (default [`ReplayMethods::All`]).
    #[must_use]
    pub fn replay_methods(mut self, methods: ReplayMethods) -> Self {
        self.replay_methods = methods;
        self
    }

    /// Attaches the token only to requests for these origins (`scheme://host[:port]`); other
    /// requests pass through without a token and never trigger a refresh. Default: the origin
    /// of the first request with an absolute URI (a first request refused as plain `http://`
    /// fixes its host's `https://` origin, the default port becoming 443: a later secure
    /// request to that host gets the token, another host never does; a clone that allows
    /// plain HTTP still sends it to the refused origin).
    /// Requests with a relative URI (an inner
    /// service that adds the origin itself, such as a gRPC channel) get the token by default
    /// and with [`any_origin`](Self::any_origin), never with an allow-list. An absolute URI
    /// whose origin cannot be told (a scheme other than `http`, `https`, `ws` and `wss`
    /// without a port, such as `foo://host/`, or a bare `host:port`) never gets the token by
    /// default or with an allow-list: the connector decides how it travels.
    ///
    /// # Errors
    ///
    /// [`InvalidOrigin`] for a string that is not exactly an origin: no scheme or host, user
    /// information, a path or a query.
    #[allow(clippy::result_large_err)]
    pub fn allowed_origins<I, O>(mut self, origins: I) -> Result<Self, InvalidOrigin>
    where
        I: IntoIterator<Item = O>,
        O: AsRef<str>,
    {
        let parsed = origins
            .into_iter()
            .map(|o| Origin::parse(o.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        self.origins = Origins::List(parsed.into());
        Ok(self)
    }

    /// Sends the token to every origin, redirect targets included. Only for clients whose
    /// every destination is trusted; prefer [`allowed_origins`](Self::allowed_origins).
    /// The plain-http rule still holds: a token goes over `http://` (or a scheme that cannot be
    /// shown to be TLS, such as `foo://host/`) only to loopback, unless
    /// [`allow_insecure_http`](Self::allow_insecure_http).
    #[must_use]
    pub fn any_origin(mut self) -> Self {
        self.origins = Origins::Any;
        self
    }

    /// Allows the token over plain `http://` to hosts that are not loopback. Off by default:
    /// such a request fails with [`InsecureTransport`](crate::error::InsecureTransport)
    /// before anything is sent (`localhost`, `127.0.0.0/8` and `::1` are always allowed).
    ///
    /// The layer judges the URL, not the route: a client that sends plain `http://` through
    /// a proxy (reqwest reads `HTTP_PROXY` from the environment, and does not leave
    /// `localhost` out unless `NO_PROXY` says so) carries a loopback URL's token in cleartext
    /// to the proxy. For loopback, build the client with `no_proxy()` or set
    /// `NO_PROXY=localhost,127.0.0.1,::1`.
    #[must_use]
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.allow_insecure_http = allow;
        self
    }

    /// A rule over the request head: requests it rejects pass through untouched (no token,
    /// no refresh, no replay). Checked together with the allowed origins. Like Ktor's
    /// `sendWithoutRequest`.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::RefreshOptions;
    ///
    /// // `/public/...` never gets the token.
    /// let options = RefreshOptions::new()
    ///     .attach_when(|req| !req.uri().path().starts_with("/public/"));
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn attach_when<F>(mut self, rule: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> bool + Send + Sync + 'static,
    {
        self.attach_when = Some(Arc::new(rule));
        self
    }

    /// While no token can be had (the session ended: logged out, or the refresher failed
    /// terminally), send requests untouched instead of failing them: public endpoints keep
    /// working, protected ones answer for themselves. They are never refreshed or replayed.
    /// A request refused with a token whose refresh then ends the session gets that refusal
    /// as its response. Installing a token turns authentication back on. Off by default.
    #[must_use]
    pub fn anonymous_when_logged_out(mut self, anonymous: bool) -> Self {
        self.anonymous = anonymous;
        self
    }

    /// When the replay is refused again (or a request sent after a refresh is refused), give
    /// the caller that final refusal itself (the 401, or a gRPC `UNAUTHENTICATED` response,
    /// which a tonic client then reports as `Code::Unauthenticated`) instead of
    /// [`UnauthorizedAfterRefresh`](crate::error::UnauthorizedAfterRefresh), as OkHttp, Ktor
    /// and axios do. Off by default.
    #[must_use]
    pub fn unauthorized_as_response(mut self, enabled: bool) -> Self {
        self.unauthorized_as_response = enabled;
        self
    }

    /// Adds a proof of possession to every send that carries the token (DPoP, RFC 9449): see
    /// [`RequestProof`]. Off by default.
    ///
    /// With a proof, tower-http's `FollowRedirectLayer` goes *outside* the layer (see
    /// [Layer order](crate#layer-order)). Inside, it would send every redirect hop with the
    /// first hop's `DPoP` header (its credential filter takes out only `Authorization`,
    /// `Cookie` and `Proxy-Authorization`): a proof for the first hop's method and URI, with a
    /// `jti` already used, which the server refuses. Outside, each hop passes through the layer:
    /// it gets the token, and a proof of its own, only if its origin is allowed (by default the
    /// first origin the layer saw; see [`allowed_origins`](Self::allowed_origins)).
    #[must_use]
    pub fn proof(mut self, proof: impl RequestProof) -> Self {
        self.proof = Some(Arc::new(proof));
        self
    }

    // ===== the per-request policy =====

    #[inline]
    pub(crate) fn triggers(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        match &self.trigger {
            Some(trigger) => trigger(status, headers),
            None => default_trigger(status, headers),
        }
    }

    /// Whether the attach rule leaves this request alone (no rule: it never does).
    #[inline]
    pub(crate) fn rule_skips(&self, head: &RequestHead<'_>) -> bool {
        self.attach_when.as_ref().is_some_and(|rule| !rule(head))
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
}

/// The option setters of [`RefreshOptions`], repeated on a layer type as shorthands. The type
/// provides `fn map_options(self, f: impl FnOnce(RefreshOptions) -> RefreshOptions) -> Self`.
macro_rules! option_setters {
    () => {
        /// See [`RefreshOptions::leeway`](crate::RefreshOptions::leeway).
        #[must_use]
        pub fn leeway(self, leeway: std::time::Duration) -> Self {
            self.map_options(|o| o.leeway(leeway))
        }

        /// See [`RefreshOptions::refresh_ahead`](crate::RefreshOptions::refresh_ahead).
        #[must_use]
        pub fn refresh_ahead(self, window: impl Into<crate::RefreshAhead>) -> Self {
            let window = window.into();
            self.map_options(|o| o.refresh_ahead(window))
        }

        /// See [`RefreshOptions::retries`](crate::RefreshOptions::retries).
        #[must_use]
        pub fn retries(self, backoff: crate::Backoff) -> Self {
            self.map_options(|o| o.retries(backoff))
        }

        /// See [`RefreshOptions::cooldown`](crate::RefreshOptions::cooldown).
        #[must_use]
        pub fn cooldown(self, cooldown: crate::Cooldown) -> Self {
            self.map_options(|o| o.cooldown(cooldown))
        }

        /// See [`RefreshOptions::refresh_timeout`](crate::RefreshOptions::refresh_timeout).
        #[must_use]
        pub fn refresh_timeout(self, timeout: std::time::Duration) -> Self {
            self.map_options(|o| o.refresh_timeout(timeout))
        }

        /// See [`RefreshOptions::clock`](crate::RefreshOptions::clock).
        #[must_use]
        pub fn clock(self, clock: impl crate::Clock) -> Self {
            self.map_options(|o| o.clock(clock))
        }

        /// See [`RefreshOptions::max_replay_body`](crate::RefreshOptions::max_replay_body).
        #[must_use]
        pub fn max_replay_body(self, bytes: usize) -> Self {
            self.map_options(|o| o.max_replay_body(bytes))
        }

        /// See [`RefreshOptions::replay_body_wait`](crate::RefreshOptions::replay_body_wait).
        #[must_use]
        pub fn replay_body_wait(self, wait: std::time::Duration) -> Self {
            self.map_options(|o| o.replay_body_wait(wait))
        }

        /// See [`RefreshOptions::refresh_on`](crate::RefreshOptions::refresh_on).
        #[must_use]
        pub fn refresh_on<F>(self, trigger: F) -> Self
        where
            F: Fn(http::StatusCode, &http::HeaderMap) -> bool + Send + Sync + 'static,
        {
            self.map_options(|o| o.refresh_on(trigger))
        }

        /// See [`RefreshOptions::replay_methods`](crate::RefreshOptions::replay_methods).
        #[must_use]
        pub fn replay_methods(self, methods: crate::ReplayMethods) -> Self {
            self.map_options(|o| o.replay_methods(methods))
        }

        /// See [`RefreshOptions::allowed_origins`](crate::RefreshOptions::allowed_origins).
        ///
        /// # Errors
        ///
        /// [`InvalidOrigin`](crate::InvalidOrigin) for a value that is not exactly an origin.
        pub fn allowed_origins<I, O>(self, origins: I) -> Result<Self, crate::InvalidOrigin>
        where
            I: IntoIterator<Item = O>,
            O: AsRef<str>,
        {
            let options = crate::RefreshOptions::new().allowed_origins(origins)?;
            Ok(self.map_options(|o| crate::config::with_origins_of(o, &options)))
        }

        /// See [`RefreshOptions::any_origin`](crate::RefreshOptions::any_origin).
        #[must_use]
        pub fn any_origin(self) -> Self {
            self.map_options(|o| o.any_origin())
        }

        /// See [`RefreshOptions::allow_insecure_http`](crate::RefreshOptions::allow_insecure_http).
        #[must_use]
        pub fn allow_insecure_http(self, allow: bool) -> Self {
            self.map_options(|o| o.allow_insecure_http(allow))
        }

        /// See [`RefreshOptions::attach_when`](crate::RefreshOptions::attach_when).
        #[must_use]
        pub fn attach_when<F>(self, rule: F) -> Self
        where
            F: Fn(&crate::RequestHead<'_>) -> bool + Send + Sync + 'static,
        {
            self.map_options(|o| o.attach_when(rule))
        }

        /// See [`RefreshOptions::anonymous_when_logged_out`](crate::RefreshOptions::anonymous_when_logged_out).
        #[must_use]
        pub fn anonymous_when_logged_out(self, anonymous: bool) -> Self {
            self.map_options(|o| o.anonymous_when_logged_out(anonymous))
        }

        /// See [`RefreshOptions::proof`](crate::RefreshOptions::proof).
        #[must_use]
        pub fn proof(self, proof: impl crate::RequestProof) -> Self {
            self.map_options(|o| o.proof(proof))
        }

        /// See [`RefreshOptions::unauthorized_as_response`](crate::RefreshOptions::unauthorized_as_response).
        #[must_use]
        pub fn unauthorized_as_response(self, enabled: bool) -> Self {
            self.map_options(|o| o.unauthorized_as_response(enabled))
        }
    };
}
pub(crate) use option_setters;

/// `options` with the origin policy of `from`.
pub(crate) fn with_origins_of(
    mut options: RefreshOptions,
    from: &RefreshOptions,
) -> RefreshOptions {
    options.origins = from.origins.clone();
    options
}
