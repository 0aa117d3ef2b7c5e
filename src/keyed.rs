//! Per-key (multi-tenant) tokens: one token cell per principal, chosen from the request.
//!
//! A client that acts for many principals at once (tenants, child accounts, users of a bot)
//! wraps its client in a [`KeyedRefreshLayer`]. Each key has its own generation-checked,
//! single-flight cell, so concurrent 401s for tenants A and B cause one refresh each, in
//! parallel, and a slow, failing or ended session for A never touches B. A request never gets
//! another key's token.
//!
//! The key comes from a request extension of type `K` by default, or from any closure over the
//! request head ([`KeyedRefreshLayer::key_fn`]). A request without a key fails with the typed
//! [`MissingKey`] error unless a default principal is configured
//! ([`KeyedRefreshLayer::default_key`]): never guess a principal.
//!
//! The map of cells is bounded ([`KeyedRefreshLayer::capacity`], default 10,000) with idle
//! eviction ([`KeyedRefreshLayer::idle_timeout`], default 30 min); an evicted key is rebuilt on
//! its next use with a fresh refresh.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_auth_refresh::{keyed::KeyedRefreshLayer, RefreshError, ReplayBody, Token};
//!
//! #[derive(Clone, Debug, PartialEq, Eq, Hash)]
//! struct Tenant(u32);
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
//! let layer = KeyedRefreshLayer::new(|tenant: Tenant, _stale: Option<Token>| async move {
//!     Ok::<_, RefreshError>(Token::bearer(format!("token-for-{}", tenant.0))?)
//! });
//! let svc = ServiceBuilder::new().layer(layer).service(service_fn(
//!     |req: Request<ReplayBody<String>>| async move {
//!         Ok::<_, Infallible>(Response::new(req.headers()["authorization"].to_str().unwrap().to_owned()))
//!     },
//! ));
//! let mut req = Request::new(String::new());
//! req.extensions_mut().insert(Tenant(7));
//! assert_eq!(svc.oneshot(req).await?.body(), "Bearer token-for-7");
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use http_body::Body;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::BoxError;
use crate::body::{DEFAULT_MAX_REPLAY_BODY, DEFAULT_REPLAY_BODY_WAIT, ReplayBody};
use crate::cell::{Cell, Settings};
use crate::error::MissingKey;
use crate::events::RefreshEvent;
use crate::future::ResponseFuture;
use crate::handle::TokenHandle;
use crate::layer::{Config, ReplayMethods, Shared};
use crate::refresher::{RefreshContext, RefreshError, TokenRefresher};
use crate::retry::RetryPolicy;
use crate::service::dispatch;
use crate::token::Token;

/// Produces a new token for one principal.
///
/// A blanket implementation makes any `Fn(K, Option<Token>) -> impl Future` a keyed refresher.
/// Called at most once per key and token generation.
pub trait KeyedRefresher<K>: Send + Sync + 'static {
    /// The future that resolves to the new token.
    type Future: Future<Output = Result<Token, RefreshError>> + Send + 'static;

    /// Starts a refresh for `key`. `stale` is its rejected or expired token, if any.
    fn refresh(&self, key: &K, stale: Option<Token>) -> Self::Future;
}

impl<K, F, Fut> KeyedRefresher<K> for F
where
    K: Clone,
    F: Fn(K, Option<Token>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    type Future = Fut;

    fn refresh(&self, key: &K, stale: Option<Token>) -> Fut {
        self(key.clone(), stale)
    }
}

/// A keyed refresher bound to one key: the refresher of that key's cell.
struct Bound<K, R> {
    key: K,
    refresher: Arc<R>,
}

impl<K, R> TokenRefresher for Bound<K, R>
where
    K: Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    type Future = R::Future;

    fn refresh(&self, ctx: RefreshContext) -> R::Future {
        self.refresher.refresh(&self.key, ctx.into_stale())
    }
}

type KeyFn<K> = Arc<dyn Fn(&http::request::Parts) -> Option<K> + Send + Sync>;

#[derive(Clone)]
struct Template {
    settings: Settings,
    config: Config,
    capacity: usize,
    idle_timeout: Duration,
}

/// How a service picks the key of a request; fixed when the service is made, so the hot
/// path reads it without a lock.
struct Picker<K> {
    key_fn: Option<KeyFn<K>>,
    default_key: Option<K>,
}

impl<K: Clone> Clone for Picker<K> {
    fn clone(&self) -> Self {
        Self {
            key_fn: self.key_fn.clone(),
            default_key: self.default_key.clone(),
        }
    }
}

impl<K: Clone + Send + Sync + 'static> Picker<K> {
    fn pick(&self, parts: &http::request::Parts) -> Option<K> {
        match &self.key_fn {
            Some(f) => f(parts),
            None => parts.extensions.get::<K>().cloned(),
        }
        .or_else(|| self.default_key.clone())
    }
}

struct Entry {
    shared: Arc<Shared>,
    /// Nanoseconds since `Keyed::base` at the last use.
    last_used: AtomicU64,
}

/// The map of cells shared by a keyed layer, its services and handles.
struct Keyed<K, R> {
    refresher: Arc<R>,
    cells: RwLock<HashMap<K, Entry>>,
    template: RwLock<Template>,
    base: Instant,
    events: broadcast::Sender<(K, RefreshEvent)>,
}

impl<K, R> Keyed<K, R>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    fn tick(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64
    }

    fn template(&self) -> Template {
        self.template
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The cell of `key`, created (and the map trimmed) if needed. The common case, an
    /// existing key, takes a read lock and stores one relaxed atomic.
    fn shared(&self, key: &K) -> Arc<Shared> {
        let now = self.tick();
        {
            let cells = self.cells.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = cells.get(key) {
                entry.last_used.store(now, Ordering::Relaxed);
                return entry.shared.clone();
            }
        }
        let template = self.template();
        let mut cells = self.cells.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = cells.get(key) {
            entry.last_used.store(now, Ordering::Relaxed);
            return entry.shared.clone();
        }
        if cells.len() >= template.capacity {
            let idle = template.idle_timeout.as_nanos() as u64;
            let before = cells.len();
            cells.retain(|_, e| now.saturating_sub(e.last_used.load(Ordering::Relaxed)) < idle);
            if cells.len() >= template.capacity {
                let oldest = cells
                    .iter()
                    .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    cells.remove(&oldest);
                }
            }
            tracing::debug!(evicted = before - cells.len(), "token cells evicted");
        }
        let events = self.events.clone();
        let tagged = key.clone();
        let cell = Cell::with_settings(
            Bound {
                key: key.clone(),
                refresher: self.refresher.clone(),
            },
            template.settings.clone(),
            Some(Box::new(move |ev| {
                let _ = events.send((tagged.clone(), ev));
            })),
        );
        let shared = Arc::new(Shared {
            cell: Arc::new(cell),
            config: template.config.clone(),
        });
        cells.insert(
            key.clone(),
            Entry {
                shared: shared.clone(),
                last_used: AtomicU64::new(now),
            },
        );
        shared
    }
}

/// The object-safe part of [`Keyed`] a handle needs.
trait Cells<K>: Send + Sync {
    fn cell(&self, key: &K) -> Arc<Cell>;
    fn remove(&self, key: &K) -> bool;
    fn len(&self) -> usize;
    fn subscribe(&self) -> broadcast::Receiver<(K, RefreshEvent)>;
}

impl<K, R> Cells<K> for Keyed<K, R>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    fn cell(&self, key: &K) -> Arc<Cell> {
        self.shared(key).cell.clone()
    }

    fn remove(&self, key: &K) -> bool {
        self.cells
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
            .is_some()
    }

    fn len(&self) -> usize {
        self.cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn subscribe(&self) -> broadcast::Receiver<(K, RefreshEvent)> {
        self.events.subscribe()
    }
}

/// Like [`RefreshLayer`](crate::RefreshLayer), with one token per key.
///
/// # Defaults
///
/// The per-key options and their defaults are those of
/// [`RefreshLayer`](crate::RefreshLayer); besides them: key from a request extension of
/// type `K`, no default key (requests without one fail with
/// [`MissingKey`]), capacity 10,000 cells, idle timeout 30 minutes.
/// Options apply to cells created after they are set: configure before the first request.
pub struct KeyedRefreshLayer<K, R> {
    keyed: Arc<Keyed<K, R>>,
    picker: Arc<Picker<K>>,
}

impl<K, R> Clone for KeyedRefreshLayer<K, R> {
    fn clone(&self) -> Self {
        Self {
            keyed: self.keyed.clone(),
            picker: self.picker.clone(),
        }
    }
}

impl<K, R> fmt::Debug for KeyedRefreshLayer<K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cells = self
            .keyed
            .cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("KeyedRefreshLayer")
            .field("cells", &cells)
            .finish_non_exhaustive()
    }
}

impl<K, R> KeyedRefreshLayer<K, R>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    /// A keyed layer whose tokens come from `refresher`.
    pub fn new(refresher: R) -> Self {
        let (events, _) = broadcast::channel(256);
        Self {
            keyed: Arc::new(Keyed {
                refresher: Arc::new(refresher),
                cells: RwLock::new(HashMap::new()),
                template: RwLock::new(Template {
                    settings: Settings::default(),
                    config: Config {
                        max_replay_body: DEFAULT_MAX_REPLAY_BODY,
                        replay_body_wait: DEFAULT_REPLAY_BODY_WAIT,
                        trigger: None,
                        replay_methods: ReplayMethods::All,
                        origins: None,
                    },
                    capacity: 10_000,
                    idle_timeout: Duration::from_secs(30 * 60),
                }),
                base: Instant::now(),
                events,
            }),
            picker: Arc::new(Picker {
                key_fn: None,
                default_key: None,
            }),
        }
    }

    fn edit(self, f: impl FnOnce(&mut Template)) -> Self {
        f(&mut self
            .keyed
            .template
            .write()
            .unwrap_or_else(PoisonError::into_inner));
        self
    }

    /// Picks the key with a closure over the request head instead of the `K` extension.
    #[must_use]
    pub fn key_fn<F>(self, f: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<K> + Send + Sync + 'static,
    {
        let mut this = self;
        Arc::make_mut(&mut this.picker).key_fn = Some(Arc::new(f));
        this
    }

    /// Sends requests without a key as this principal instead of failing them.
    #[must_use]
    pub fn default_key(self, key: K) -> Self {
        let mut this = self;
        Arc::make_mut(&mut this.picker).default_key = Some(key);
        this
    }

    /// At most this many cells (at least 1). When full, idle cells go first, then the least
    /// recently used one.
    #[must_use]
    pub fn capacity(self, cells: usize) -> Self {
        self.edit(|t| t.capacity = cells.max(1))
    }

    /// A cell unused for this long is evicted when room is needed.
    #[must_use]
    pub fn idle_timeout(self, idle: Duration) -> Self {
        self.edit(|t| t.idle_timeout = idle)
    }

    /// The expiry leeway of each key's token (see [`RefreshLayer::leeway`](crate::RefreshLayer::leeway)).
    #[must_use]
    pub fn leeway(self, leeway: Duration) -> Self {
        self.edit(|t| t.settings.leeway = leeway)
    }

    /// The retry policy of each key's refreshes.
    #[must_use]
    pub fn retry(self, policy: RetryPolicy) -> Self {
        self.edit(|t| t.settings.retry = policy)
    }

    /// The largest body kept for a replay (default 1 MiB).
    #[must_use]
    pub fn max_replay_body(self, bytes: usize) -> Self {
        self.edit(|t| t.config.max_replay_body = bytes)
    }

    /// The handle to every key's token.
    pub fn handle(&self) -> KeyedTokenHandle<K> {
        KeyedTokenHandle {
            cells: self.keyed.clone(),
        }
    }
}

impl<S, K, R> Layer<S> for KeyedRefreshLayer<K, R> {
    type Service = KeyedRefresh<S, K, R>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRefresh {
            inner,
            keyed: self.keyed.clone(),
            picker: self.picker.clone(),
        }
    }
}

/// The service made by [`KeyedRefreshLayer`].
pub struct KeyedRefresh<S, K, R> {
    inner: S,
    keyed: Arc<Keyed<K, R>>,
    picker: Arc<Picker<K>>,
}

impl<S: Clone, K, R> Clone for KeyedRefresh<S, K, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            keyed: self.keyed.clone(),
            picker: self.picker.clone(),
        }
    }
}

impl<S: fmt::Debug, K, R> fmt::Debug for KeyedRefresh<S, K, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRefresh")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, K, R> KeyedRefresh<S, K, R>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    /// The handle to every key's token.
    pub fn handle(&self) -> KeyedTokenHandle<K> {
        KeyedTokenHandle {
            cells: self.keyed.clone(),
        }
    }
}

impl<S, K, R, B, ResBody> Service<Request<B>> for KeyedRefresh<S, K, R>
where
    S: Service<Request<ReplayBody<B>>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Send + 'static,
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    type Response = http::Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        let Some(key) = self.picker.pick(&parts) else {
            return ResponseFuture::failed(MissingKey::new().into());
        };
        let shared = self.keyed.shared(&key);
        dispatch(&shared, inner, Request::from_parts(parts, body))
    }
}

/// A handle to every key's token: a [`TokenHandle`] per key, events tagged with their key.
#[derive(Clone)]
pub struct KeyedTokenHandle<K> {
    cells: Arc<dyn Cells<K>>,
}

impl<K> fmt::Debug for KeyedTokenHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedTokenHandle")
            .field("cells", &self.cells.len())
            .finish()
    }
}

impl<K: Clone + Send + 'static> KeyedTokenHandle<K> {
    /// The handle of `key`'s token (its cell is created if needed): install, clear, force a
    /// refresh, read the state.
    pub fn key(&self, key: &K) -> TokenHandle {
        TokenHandle::new(self.cells.cell(key))
    }

    /// Forgets `key`'s cell; its next request starts with a fresh refresh.
    pub fn remove(&self, key: &K) -> bool {
        self.cells.remove(key)
    }

    /// How many keys have a cell.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// True if no key has a cell.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribes to every key's events, each tagged with its key.
    pub fn subscribe(&self) -> KeyedEvents<K> {
        KeyedEvents {
            rx: self.cells.subscribe(),
            _key: PhantomData,
        }
    }
}

/// A stream of `(key, event)` pairs from a [`KeyedTokenHandle`].
pub struct KeyedEvents<K> {
    rx: broadcast::Receiver<(K, RefreshEvent)>,
    _key: PhantomData<K>,
}

impl<K> fmt::Debug for KeyedEvents<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedEvents").finish_non_exhaustive()
    }
}

impl<K: Clone> KeyedEvents<K> {
    /// Waits for the next event; `Err(n)` if `n` events were missed. `None` once every
    /// layer, service and handle is gone.
    pub async fn recv(&mut self) -> Option<Result<(K, RefreshEvent), u64>> {
        match self.rx.recv().await {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Result<(K, RefreshEvent), u64>> {
        match self.rx.try_recv() {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(n)),
            Err(_) => None,
        }
    }
}
