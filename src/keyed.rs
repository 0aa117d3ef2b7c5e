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
//! Every per-token option of [`RefreshLayer`](crate::RefreshLayer) applies to each key
//! ([`KeyedRefreshLayer::with_options`], or the same setters on the layer), with the same rule:
//! options are a value, the tokens are shared by every clone.
//!
//! The map of cells is bounded ([`KeyedRefreshLayer::capacity`], default 10,000) with idle
//! eviction ([`KeyedRefreshLayer::idle_timeout`], default 30 min). Eviction is a second-chance
//! queue, not a scan of the map: a new key on a full map walks the queue from the cell queued
//! longest ago and evicts the first one that is idle or was not used since it was queued; a
//! cell used since is queued again, its second chance spent. If every cell the walk looked at
//! had a second chance, the least recently used of them goes. So the choice approximates
//! least recently used; it is not exact (a cell made and not used again goes before an older
//! one used twice, unless that one is idle).
//!
//! A cell is pinned, never evicted, while a refresh for it runs or the cool-down of a failed
//! one may hold, or while a [`TokenHandle`] or a request holds it. Otherwise what an evicted
//! cell held is remembered apart, for the cell rebuilt for its key:
//!
//! - a cell whose session ended (a logout, a refused refresh token): the ended session. A
//!   cell rebuilt for the key starts ended, so the key stays logged out until a token is
//!   installed for it;
//! - a cell with a token that carries a refresh token (the one in use, or one an invalidation
//!   dropped and nothing replaced yet): that token. A cell rebuilt for the key starts without
//!   a token, and its first refresh is handed it as the stale token
//!   ([`RefreshContext::stale`], the `Option<Token>` of a closure refresher), as after
//!   [`TokenHandle::invalidate`]: a token set installed at login (with
//!   [`Token::with_refresh_token`]) keeps its refresh token across evictions. The token is
//!   handed over once: it is taken when the cell is rebuilt (by a request or by a handle
//!   call), so a login or a logout through the key's handle after the eviction replaces it as
//!   it would the token of a cell never evicted. A token without a refresh token is not kept
//!   (nothing refreshes from it: the rebuilt cell's refresh is handed no token, as a key's
//!   first one is). When the refresher keeps the sessions itself
//!   ([`KeyedRefresher::keeps_sessions`]: a token store), a token a refresh got is not kept
//!   either (the rebuilt cell's refresh, handed no token, takes the stored session over);
//!   only a login installed through the key's handle ([`TokenHandle::set_token`]) that no
//!   refresh replaced yet is, in use or dropped by the invalidation right after it: the
//!   refresher has not seen it, so the rebuilt cell's refresh is handed it as above, and a
//!   store refresher stores it as a new login (never takes another session over for it,
//!   another user's). It stays such a login in the rebuilt cell until a refresh replaces it.
//!
//! The ended sessions are remembered for at most ten times the capacity keys (at least
//! 10,000); the tokens for at most as many keys as the capacity (at least 1,000), so that the
//! token sets kept for evicted keys are at most about as many as those the cells hold; each
//! the oldest forgotten first. A key whose remembered token was forgotten refreshes as a key never
//! seen (handed no token), one whose ended session was forgotten too. A kept token is a secret
//! held in memory after its cell was evicted, also by the idle timeout: it goes when it is
//! handed over, replaced or forgotten, or when the key is removed
//! ([`KeyedTokenHandle::remove`]).
//!
//! A walk looks at no more than 64 cells, so a new key costs amortised O(1) (the leftover
//! queue slots of removed keys are dropped on the way, each once) however many cells are
//! pinned. If all the cells it looked at are pinned, the map grows past its capacity for now;
//! each later new key then evicts up to two cells, until the map is back within its capacity.
//! An evicted key is rebuilt on its next use with a refresh handed its last token, if kept (an
//! ended one stays ended), a removed key with a fresh refresh in any case (nothing of it is
//! remembered); a key's handle acts on the key's current cell on every call, whichever cell
//! that is.
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

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use http_body::Body;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::BoxError;
use crate::body::ReplayBody;
use crate::cell::{Leftover, TokenCell};
use crate::clock::Clock;
use crate::config::{RefreshOptions, option_setters};
use crate::error::MissingKey;
use crate::events::{Lagged, RefreshEvent};
use crate::future::{Replayer, ResponseFuture, Template, dispatch, template_of};
use crate::handle::{ResolveCell, TokenHandle};
use crate::origin::Origin;
use crate::refresher::{RefreshContext, RefreshError, TokenRefresher};
use crate::shared::Shared;
use crate::token::Token;

/// Produces a new token for one principal.
///
/// A blanket implementation makes any `Fn(K, Option<Token>) -> impl Future` a keyed refresher.
/// Never called twice at once for one key (single flight per key, retried as
/// [`Backoff`](crate::Backoff) says), except across [`KeyedTokenHandle::remove`] (see there).
pub trait KeyedRefresher<K>: Send + Sync + 'static {
    /// The future that resolves to the new token.
    type Future: Future<Output = Result<Token, RefreshError>> + Send + 'static;

    /// Starts a refresh for `key`. The context holds its rejected or expired token, if any
    /// (for a cell rebuilt after an eviction, the token the evicted cell held: see the
    /// [module docs](self)), and why the refresh is needed.
    fn refresh(&self, key: &K, ctx: RefreshContext) -> Self::Future;

    /// Called when `key` is logged out through its handle; see
    /// [`TokenRefresher::logout`]. The default does nothing.
    fn logout(&self, key: &K) {
        let _ = key;
    }

    /// Whether this refresher keeps every key's session itself, as a token store does
    /// (`KeyedStoreRefresher`, with the `store` feature, returns true). The default, false:
    /// the layer keeps the last token (one with a refresh token) of an evicted key's cell and
    /// hands it to the first refresh of the cell rebuilt for the key (see the
    /// [module docs](self)).
    ///
    /// A refresher that returns true: the layer then keeps no token of an evicted key that a
    /// refresh got; its rebuilt cell's refresh is handed none, and takes the stored session
    /// over (the store is the session's truth: a token kept since the eviction may carry a
    /// refresh token other processes rotated away meanwhile). Only a login installed through
    /// the key's handle ([`TokenHandle::set_token`], with a refresh token) that no refresh
    /// replaced yet is kept, in use or dropped by the invalidation right after it: this
    /// refresher has not seen it (a store does not hold it yet), so the rebuilt cell's first
    /// refresh is handed it, as the cell's own would have been; take it for a new login
    /// (never replace it by the stored session, which may be another user's). An ended
    /// session is remembered in either case. Asked once, when the layer is made.
    fn keeps_sessions(&self) -> bool {
        false
    }
}

impl<K, F, Fut> KeyedRefresher<K> for F
where
    K: Clone,
    F: Fn(K, Option<Token>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, RefreshError>> + Send + 'static,
{
    type Future = Fut;

    fn refresh(&self, key: &K, ctx: RefreshContext) -> Fut {
        self(key.clone(), ctx.into_stale())
    }
}

/// A keyed refresher bound to one key: the refresher of that key's cell.
pub(crate) struct Bound<K, R> {
    pub(crate) key: K,
    pub(crate) refresher: Arc<R>,
}

impl<K, R> TokenRefresher for Bound<K, R>
where
    K: Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    type Future = R::Future;

    fn refresh(&self, ctx: RefreshContext) -> R::Future {
        self.refresher.refresh(&self.key, ctx)
    }

    fn logout(&self) {
        self.refresher.logout(&self.key);
    }
}

type KeyFn<K> = Arc<dyn Fn(&http::request::Parts) -> Option<K> + Send + Sync>;

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

/// The most cells one eviction walk looks at (pinned or given a second chance); leftover
/// queue slots of removed keys are dropped on the way without counting.
const WALK: usize = 64;

struct Entry {
    cell: Arc<TokenCell>,
    /// Milliseconds since `Keyed::base` at the last use.
    last_used: AtomicU64,
    /// Milliseconds since `Keyed::base` when the key was (re)queued for eviction.
    queued_at: u64,
    /// Tells this entry's queue slot from slots left by an earlier cell of the same key.
    stamp: u64,
}

/// A place in the eviction queue: a key, and the stamp of the entry it was queued for. A slot
/// whose key has no entry with that stamp (the key was removed, or evicted out of turn, and
/// maybe made again) is stale: dropped when met, or by a compaction.
struct Slot<K> {
    key: K,
    stamp: u64,
}

/// The cells and the eviction queue: one live slot per cell, oldest queued first, and stale
/// slots, never more than the live ones plus a few.
struct Cells<K> {
    map: HashMap<K, Entry>,
    order: VecDeque<Slot<K>>,
    stamps: u64,
    /// The highest generation any cell had when it left the map: a new cell starts after it,
    /// so a key's generation never goes back when its cell is rebuilt.
    high_water: u64,
    /// Keys whose cell left the map with its session ended (a logout, a refused refresh
    /// token), and why: a cell rebuilt for one starts ended, so an evicted logout stays a
    /// logout. At most `ended_cap` ([`ended_kept_for`]), the oldest forgotten first.
    ended: Kept<K, Ended>,
    ended_cap: usize,
    /// Keys whose cell left the map with a token carrying a refresh token (the one in use, or
    /// one an invalidation dropped and nothing replaced yet), and that token: a cell rebuilt
    /// for one hands it to its first refresh as the stale token, so a login's refresh token
    /// survives an eviction. Handed over once (taken when the cell is rebuilt). At most
    /// `tokens_cap` ([`tokens_kept_for`]), the oldest forgotten first. If `keep_tokens` is
    /// false (the refresher keeps the sessions itself: [`KeyedRefresher::keeps_sessions`]),
    /// only logins the handle installed that no refresh replaced (the refresher never saw
    /// them: `TokenCell::leftover`).
    /// Secrets: `Cells` has no `Debug`.
    tokens: Kept<K, Token>,
    tokens_cap: usize,
    keep_tokens: bool,
}

/// How many ended sessions of evicted keys are remembered for a map of `capacity` cells: ten
/// times as many, at least 10,000 (an entry is a key, an error and at most a token).
fn ended_kept_for(capacity: usize) -> usize {
    capacity.saturating_mul(10).max(10_000)
}

/// How many tokens of evicted keys are remembered for a map of `capacity` cells: as many, at
/// least 1,000. An entry is a key and a whole token set (the access token, often a JWT of a
/// kilobyte or two, held twice: as a secret and as a header value; and the refresh token), as
/// large as what a cell holds: the kept tokens add at most about as much secret-holding memory
/// as a full map's cells, and never more than 1,000 sets below a capacity of 1,000.
fn tokens_kept_for(capacity: usize) -> usize {
    capacity.max(1_000)
}

/// The cause of an ended session, and the token it could not replace.
type Ended = (Arc<crate::RefreshError>, Option<crate::Token>);

/// What is kept of keys whose cell left the map, one value per key (a newer one replaces the
/// older), the oldest forgotten first past a bound.
struct Kept<K, V> {
    map: HashMap<K, (V, u64)>,
    /// Oldest first; a slot whose stamp is not its key's current one is stale (the key was
    /// taken, or kept again since), dropped when met or by a compaction.
    order: VecDeque<(K, u64)>,
    stamps: u64,
}

impl<K: Clone + Eq + Hash, V> Kept<K, V> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            stamps: 0,
        }
    }

    /// Keeps `value` for `key`, then forgets the oldest kept keys past `cap`. Returns how
    /// many it forgot.
    fn keep(&mut self, key: K, value: V, cap: usize) -> usize {
        self.stamps += 1;
        let stamp = self.stamps;
        self.map.insert(key.clone(), (value, stamp));
        self.order.push_back((key, stamp));
        let mut forgot = 0;
        while self.map.len() > cap {
            let Some((old, stamp)) = self.order.pop_front() else {
                break;
            };
            // A slot left by an earlier entry of the same key is stale.
            if self.map.get(&old).is_some_and(|(_, s)| *s == stamp) {
                self.map.remove(&old);
                forgot += 1;
            }
        }
        if self.order.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|(_, live)| live == s));
        }
        forgot
    }

    /// Takes what is kept for `key` (its slot goes stale).
    fn take(&mut self, key: &K) -> Option<V> {
        // Usually empty: no hashing then (every new cell asks).
        if self.map.is_empty() {
            return None;
        }
        self.map.remove(key).map(|(value, _)| value)
    }
}

impl<K: Clone + Eq + Hash> Cells<K> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            stamps: 0,
            high_water: 0,
            ended: Kept::new(),
            ended_cap: usize::MAX,
            tokens: Kept::new(),
            tokens_cap: usize::MAX,
            keep_tokens: true,
        }
    }

    /// Takes `key`'s cell out of the map (its queue slot goes stale), keeping its generation
    /// in the high-water mark.
    fn take_out(&mut self, key: &K) -> Option<Arc<TokenCell>> {
        let entry = self.map.remove(key)?;
        self.high_water = self.high_water.max(entry.cell.generation());
        Some(entry.cell)
    }

    /// Evicts `key`'s cell: takes it out, keeping its ended session if it ended, or else its
    /// last token if it carries a refresh token, for the cell rebuilt for the key. If tokens
    /// are not kept (the refresher keeps the sessions), only a login the handle installed
    /// that no refresh replaced is: the refresher has not seen it (a store does not hold it).
    fn evict(&mut self, key: &K) -> bool {
        let Some(cell) = self.take_out(key) else {
            return false;
        };
        // One look under the cell's lock; a token without a refresh token is not needed to
        // refresh, and not kept.
        match cell.leftover(self.keep_tokens) {
            Leftover::Ended(ended) => {
                if self.ended.keep(key.clone(), ended, self.ended_cap) > 0 {
                    tracing::debug!("forgot the oldest ended session of an evicted key");
                }
            }
            Leftover::Token(token) => {
                if self.tokens.keep(key.clone(), token, self.tokens_cap) > 0 {
                    tracing::debug!("forgot the oldest token of an evicted key");
                }
            }
            Leftover::Nothing => {}
        }
        true
    }

    /// What a cell rebuilt for `key` starts with, taken (handed over once): the ended session
    /// its last cell left with, or else the token it left with, if any.
    fn take_kept(&mut self, key: &K) -> (Option<Ended>, Option<Token>) {
        // Both are taken: a key has at most one, but none may outlive the rebuild.
        let ended = self.ended.take(key);
        let token = self.tokens.take(key);
        match ended {
            Some(ended) => (Some(ended), None),
            None => (None, token),
        }
    }

    /// Adds `key`'s cell, used and queued at `now`.
    fn insert(&mut self, key: K, cell: Arc<TokenCell>, now: u64) {
        self.stamps += 1;
        let stamp = self.stamps;
        self.map.insert(
            key.clone(),
            Entry {
                cell,
                last_used: AtomicU64::new(now),
                queued_at: now,
                stamp,
            },
        );
        self.order.push_back(Slot { key, stamp });
        self.compact();
    }

    /// Forgets `key`'s cell; its queue slot goes stale.
    fn remove(&mut self, key: &K) -> bool {
        // Nothing of it is kept: a later cell for the key starts afresh.
        let removed = self.take_out(key).is_some();
        self.take_kept(key);
        self.compact();
        removed
    }

    /// Drops the stale slots once they outnumber the live ones by 16: amortised O(1) per
    /// removal, which made each of them.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            self.order
                .retain(|slot| map.get(&slot.key).is_some_and(|e| e.stamp == slot.stamp));
        }
    }
}

/// The map's bounds; shared by every clone of the layer.
#[derive(Debug, Clone, Copy)]
struct Limits {
    capacity: usize,
    idle_ms: u64,
}

/// The map of cells shared by a keyed layer, its services and handles.
struct Keyed<K, R> {
    refresher: Arc<R>,
    cells: RwLock<Cells<K>>,
    limits: RwLock<Limits>,
    base: Instant,
    events: broadcast::Sender<(K, RefreshEvent)>,
    /// The first origin any key's request went to (without an allow-list), for every cell.
    origin: Arc<OnceLock<Origin>>,
}

impl<K, R> Keyed<K, R>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    /// Milliseconds since the map was made (Tokio's clock: paused time moves it).
    fn tick(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64
    }

    /// The cell of `key`, created (and one cell evicted if the map is full) if needed. The
    /// common case, an existing key, takes a read lock and stores one relaxed atomic.
    /// `clock` is the asking layer's: a cool-down is read on the clock it was set on.
    fn cell(&self, key: &K, clock: &dyn Clock) -> Arc<TokenCell> {
        let now = self.tick();
        {
            let cells = self.cells.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = cells.map.get(key) {
                entry.last_used.store(now, Ordering::Relaxed);
                return entry.cell.clone();
            }
        }
        let limits = *self.limits.read().unwrap_or_else(PoisonError::into_inner);
        let mut cells = self.cells.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = cells.map.get(key) {
            entry.last_used.store(now, Ordering::Relaxed);
            return entry.cell.clone();
        }
        cells.ended_cap = ended_kept_for(limits.capacity);
        cells.tokens_cap = tokens_kept_for(limits.capacity);
        // One eviction makes room; a second one shrinks a map grown past its capacity while
        // the cells a walk looked at were all pinned.
        for _ in 0..2 {
            if cells.map.len() < limits.capacity {
                break;
            }
            if !evict_one(&mut cells, now, limits.idle_ms, clock.now()) {
                tracing::debug!(
                    cells = cells.map.len(),
                    "every token cell the eviction walk looked at is in use; growing past the capacity"
                );
                break;
            }
        }
        let events = self.events.clone();
        let tagged = key.clone();
        let (ended, stale) = cells.take_kept(key);
        let cell = Arc::new(
            TokenCell::new(
                Bound {
                    key: key.clone(),
                    refresher: self.refresher.clone(),
                },
                Some(Box::new(move |ev| {
                    let _ = events.send((tagged.clone(), ev));
                })),
            )
            .with_origin(self.origin.clone())
            .starting_after(cells.high_water)
            // Without `keep_tokens`, only a login is kept (`evict`): it stays one.
            .starting_stale(stale, !cells.keep_tokens)
            .starting_ended(ended),
        );
        cells.insert(key.clone(), cell.clone(), now);
        cell
    }

    fn remove(&self, key: &K) -> bool {
        let mut cells = self.cells.write().unwrap_or_else(PoisonError::into_inner);
        cells.remove(key)
    }

    fn len(&self) -> usize {
        self.cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }
}

/// Evicts one cell, walking the queue from its head: the first cell that is idle, or not used
/// since it was queued, goes; a cell used since is queued again with its second chance spent;
/// a pinned cell (a refresh running or cooling down, a live handle or request) is queued
/// again as it is. If every unpinned cell walked had a second chance, the least recently used
/// of them goes. The walk looks at most at [`WALK`] cells (each at most once); stale slots are
/// dropped on the way. Returns false if every cell it looked at was pinned.
///
/// `cooling_now` is the current instant on the layer's clock, which a cool-down is set on.
fn evict_one<K: Clone + Eq + Hash>(
    cells: &mut Cells<K>,
    now: u64,
    idle_ms: u64,
    cooling_now: Instant,
) -> bool {
    let mut budget = WALK.min(cells.map.len());
    // The least recently used cell given a second chance by this walk, and its last use.
    let mut lru: Option<(u64, K)> = None;
    while budget > 0 {
        let Some(slot) = cells.order.pop_front() else {
            break;
        };
        let Some(entry) = cells
            .map
            .get_mut(&slot.key)
            .filter(|entry| entry.stamp == slot.stamp)
        else {
            continue; // stale: removed, or evicted out of turn
        };
        budget -= 1;
        // The map holds one reference; any other is a handle or a request in flight. An ended
        // session or a token is not pinned: it is kept apart when the cell goes (`evict`).
        let pinned = Arc::strong_count(&entry.cell) > 1 || entry.cell.pinned(cooling_now);
        // No use can be recorded meanwhile: this runs under the write lock.
        let last = entry.last_used.load(Ordering::Relaxed);
        let idle = now.saturating_sub(last) >= idle_ms;
        if !pinned {
            if idle || last <= entry.queued_at {
                cells.evict(&slot.key);
                tracing::trace!(idle, "token cell evicted");
                return true;
            }
            // The second chance, spent: a later walk evicts it unless it is used again.
            entry.queued_at = now.max(last);
            if lru.as_ref().is_none_or(|(oldest, _)| last < *oldest) {
                lru = Some((last, slot.key.clone()));
            }
        }
        cells.order.push_back(slot);
    }
    let Some((_, key)) = lru else {
        return false;
    };
    // Its slot, queued again above, goes stale.
    cells.evict(&key);
    tracing::trace!("token cell evicted, the least recently used");
    true
}

/// Like [`RefreshLayer`](crate::RefreshLayer), with one token per key.
///
/// # Defaults
///
/// The per-key options and their defaults are those of [`RefreshOptions`]; besides them: key
/// from a request extension of type `K`, no default key (requests without one fail with
/// [`MissingKey`]), capacity 10,000 cells, idle timeout 30 minutes. The capacity and idle
/// timeout belong to the map of cells, which every clone shares.
pub struct KeyedRefreshLayer<K, R> {
    keyed: Arc<Keyed<K, R>>,
    options: Arc<RefreshOptions>,
    picker: Arc<Picker<K>>,
}

impl<K, R> Clone for KeyedRefreshLayer<K, R> {
    fn clone(&self) -> Self {
        Self {
            keyed: self.keyed.clone(),
            options: self.options.clone(),
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
            .map
            .len();
        f.debug_struct("KeyedRefreshLayer")
            .field("cells", &cells)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<K, R> KeyedRefreshLayer<K, R>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    /// A keyed layer whose tokens come from `refresher`, with the default options.
    pub fn new(refresher: R) -> Self {
        Self::with_options(refresher, RefreshOptions::default())
    }

    /// A keyed layer with the given per-key options.
    pub fn with_options(refresher: R, options: RefreshOptions) -> Self {
        let (events, _) = broadcast::channel(256);
        // Asked once, here: never under the map's lock, and one answer for the layer's life.
        let mut cells = Cells::new();
        cells.keep_tokens = !refresher.keeps_sessions();
        Self {
            keyed: Arc::new(Keyed {
                refresher: Arc::new(refresher),
                cells: RwLock::new(cells),
                limits: RwLock::new(Limits {
                    capacity: 10_000,
                    idle_ms: 30 * 60 * 1000,
                }),
                base: Instant::now(),
                events,
                origin: Arc::default(),
            }),
            options: Arc::new(options),
            picker: Arc::new(Picker {
                key_fn: None,
                default_key: None,
            }),
        }
    }

    fn map_options(mut self, f: impl FnOnce(RefreshOptions) -> RefreshOptions) -> Self {
        let options = Arc::make_mut(&mut self.options);
        *options = f(std::mem::take(options));
        self
    }

    option_setters!();

    fn limits(self, f: impl FnOnce(&mut Limits)) -> Self {
        f(&mut self
            .keyed
            .limits
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

    /// At most this many cells (at least 1), unless the up to 64 cells an eviction walk looks
    /// at are all pinned (see the module docs; a map of at most 64 cells grows past this only
    /// when every cell is pinned). When full, a new key evicts the first cell in queue order
    /// that is idle or was not used since it was queued, or else the least recently used of
    /// the cells the walk looked at.
    #[must_use]
    pub fn capacity(self, cells: usize) -> Self {
        self.limits(|l| l.capacity = cells.max(1))
    }

    /// A cell unused for this long loses its second chance: the eviction walk evicts it when it
    /// meets it, even if it was used since it was queued. (The walk does not look for idle
    /// cells: one not used since it was queued, met first, goes first.) An evicted cell's
    /// token set with a refresh token is kept after it, unless the refresher keeps the
    /// sessions itself (see the module docs): [`KeyedTokenHandle::remove`] drops it.
    #[must_use]
    pub fn idle_timeout(self, idle: Duration) -> Self {
        self.limits(|l| l.idle_ms = idle.as_millis().min(u128::from(u64::MAX)) as u64)
    }

    /// The handle to every key's token.
    pub fn token_handle(&self) -> KeyedTokenHandle<K> {
        KeyedTokenHandle {
            cells: self.keyed.clone(),
            options: self.options.clone(),
        }
    }
}

impl<S, K, R> Layer<S> for KeyedRefreshLayer<K, R> {
    type Service = KeyedRefresh<S, K, R>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRefresh {
            inner,
            template: None,
            keyed: self.keyed.clone(),
            options: self.options.clone(),
            picker: self.picker.clone(),
        }
    }
}

/// The service made by [`KeyedRefreshLayer`].
pub struct KeyedRefresh<S, K, R> {
    inner: S,
    /// The copy replays are sent through, for a service too large to clone per request.
    template: Option<Template<S>>,
    keyed: Arc<Keyed<K, R>>,
    options: Arc<RefreshOptions>,
    picker: Arc<Picker<K>>,
}

impl<S: Clone, K, R> Clone for KeyedRefresh<S, K, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            template: self.template.clone(),
            keyed: self.keyed.clone(),
            options: self.options.clone(),
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
    pub fn token_handle(&self) -> KeyedTokenHandle<K> {
        KeyedTokenHandle {
            cells: self.keyed.clone(),
            options: self.options.clone(),
        }
    }
}

impl<S, K, R, B, ResBody> Service<Request<B>> for KeyedRefresh<S, K, R>
where
    S: Service<Request<ReplayBody<B>>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Error: Into<BoxError>,
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    type Response = http::Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, S::Future, http::Response<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let Some(key) = self.picker.pick(&parts) else {
            // A request no cell would authenticate (its own `Authorization`, a token request,
            // one from inside a refresher, one the attach rule or the origins leave alone)
            // goes out as the tower layer sends it: untouched, with or without a key.
            if crate::replay::untouched_by_any_cell(&parts, &self.options, &self.keyed.origin) {
                return ResponseFuture::passthrough(
                    self.inner
                        .call(Request::from_parts(parts, ReplayBody::passthrough(body))),
                );
            }
            return ResponseFuture::failed(MissingKey::new().into());
        };
        let shared = Shared::pair(
            self.keyed.cell(&key, &*self.options.clock),
            self.options.clone(),
        );
        let template = template_of(&self.inner, &mut self.template);
        dispatch(
            &shared,
            &mut self.inner,
            |inner| Replayer::of(inner, template),
            Request::from_parts(parts, body),
        )
    }
}

/// The object-safe part of [`Keyed`] a handle needs.
trait KeyedCells<K>: Send + Sync {
    /// Looks `key`'s current cell up on each call, creating it if needed (as a request does).
    fn resolver(self: Arc<Self>, key: &K, clock: Arc<dyn Clock>) -> ResolveCell;
    fn remove(&self, key: &K) -> bool;
    fn len(&self) -> usize;
    fn subscribe(&self) -> broadcast::Receiver<(K, RefreshEvent)>;
}

impl<K, R> KeyedCells<K> for Keyed<K, R>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    R: KeyedRefresher<K>,
{
    fn resolver(self: Arc<Self>, key: &K, clock: Arc<dyn Clock>) -> ResolveCell {
        let key = key.clone();
        Box::new(move || Keyed::cell(&self, &key, &*clock))
    }

    fn remove(&self, key: &K) -> bool {
        Keyed::remove(self, key)
    }

    fn len(&self) -> usize {
        Keyed::len(self)
    }

    fn subscribe(&self) -> broadcast::Receiver<(K, RefreshEvent)> {
        self.events.subscribe()
    }
}

/// A handle to every key's token: a [`TokenHandle`] per key, events tagged with their key.
#[derive(Clone)]
pub struct KeyedTokenHandle<K> {
    cells: Arc<dyn KeyedCells<K>>,
    options: Arc<RefreshOptions>,
}

impl<K> fmt::Debug for KeyedTokenHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedTokenHandle")
            .field("cells", &self.cells.len())
            .finish()
    }
}

impl<K: Clone + Send + 'static> KeyedTokenHandle<K> {
    /// The handle of `key`'s token (its cell is created if needed): install, clear,
    /// invalidate, force a refresh, read the state. Every call acts on the key's current
    /// cell, looked up (and created if needed, as a request would) each time: after
    /// [`remove`](Self::remove) the same handle acts on the key's new cell. The cell it last
    /// acted on is not evicted while the handle is alive (a cell forgotten by `remove` is let
    /// go at the handle's next call).
    ///
    /// [`TokenHandle::subscribe`] follows the cell current when it is called, not the key: it
    /// gets no event of the key's later cells, and its [`Events::recv`](crate::Events::recv)
    /// returns `None` once that cell is gone (evicted or removed, and no longer held by a
    /// handle, request or refresh), while the layer lives on. Drop the handle and the cell can
    /// be evicted: `handle.key(&k).subscribe()` may end at the next eviction. To follow a key
    /// for the layer's life, use [`subscribe`](Self::subscribe) and filter on the key.
    pub fn key(&self, key: &K) -> TokenHandle {
        let clock = self.options.clock.clone();
        TokenHandle::keyed(
            self.cells.clone().resolver(key, clock),
            self.options.clone(),
        )
    }

    /// Forgets `key`'s cell (its token, session state and cool-down), and what was remembered
    /// of an evicted cell of the key (its ended session or its token): the key's next request
    /// or handle call makes a new cell, as for a key never seen (a request then starts with a
    /// fresh refresh, handed no token). Returns whether the key had a cell.
    ///
    /// A refresh running for the forgotten cell is not cancelled: it runs to completion and
    /// answers the requests that were waiting for it, and its token goes to the forgotten
    /// cell only. A request for the key after `remove` starts a refresh of its own in the
    /// new cell, so the refresher may then run twice at once for this key (with rotating
    /// refresh tokens, one of the two may be refused). To avoid that, remove a key when
    /// [`TokenState::refreshing`](crate::TokenState::refreshing) is false.
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
        }
    }
}

/// A stream of `(key, event)` pairs from a [`KeyedTokenHandle`].
pub struct KeyedEvents<K> {
    rx: broadcast::Receiver<(K, RefreshEvent)>,
}

impl<K> fmt::Debug for KeyedEvents<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedEvents").finish_non_exhaustive()
    }
}

impl<K: Clone> KeyedEvents<K> {
    /// Waits for the next event; `Err(Lagged(n))` if `n` events were missed. `None` once
    /// every layer, service and handle is gone.
    pub async fn recv(&mut self) -> Option<Result<(K, RefreshEvent), Lagged>> {
        match self.rx.recv().await {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(Lagged(n))),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Result<(K, RefreshEvent), Lagged>> {
        match self.rx.try_recv() {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(Lagged(n))),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(n: u32) -> Cells<u32> {
        let mut c = Cells::new();
        for k in 0..n {
            let cell = Arc::new(TokenCell::new(
                |_: Option<Token>| async { Token::bearer("t").map_err(RefreshError::from) },
                None,
            ));
            c.insert(k, cell, 0);
        }
        c
    }

    #[test]
    fn eviction_takes_the_oldest_unpinned_cell_and_gives_recent_ones_a_second_chance() {
        let mut c = cells(3);
        // Key 0 was used after it was queued: it gets a second chance, key 1 goes.
        c.map[&0].last_used.store(5, Ordering::Relaxed);
        assert!(evict_one(&mut c, 10, 1_000, Instant::now()));
        assert!(c.map.contains_key(&0) && !c.map.contains_key(&1));
        // A cell with a live handle (another reference) is never evicted.
        let held = c.map[&2].cell.clone();
        assert!(evict_one(&mut c, 10, 1_000, Instant::now()));
        assert!(c.map.contains_key(&2) && !c.map.contains_key(&0));
        assert!(
            !evict_one(&mut c, 10, 1_000, Instant::now()),
            "only a pinned cell is left"
        );
        drop(held);
        assert!(evict_one(&mut c, 10, 1_000, Instant::now()));
        assert!(c.map.is_empty());
    }

    #[test]
    fn idle_cells_are_evicted_even_if_used_after_they_were_queued() {
        let mut c = cells(2);
        c.map[&0].last_used.store(5, Ordering::Relaxed);
        // 30 minutes later, key 0 is idle: it goes first despite its later use.
        let later = 5 + 30 * 60 * 1000;
        assert!(evict_one(&mut c, later, 30 * 60 * 1000, Instant::now()));
        assert!(!c.map.contains_key(&0));
    }
    /// The key at the head of the eviction queue.
    fn front_key(c: &Cells<u32>) -> u32 {
        c.order.front().unwrap().key
    }

    /// Review A2: `remove` forgot the key's queue entry, so remove/re-create cycles grew the
    /// queue without bound (eviction, which drops such entries, runs only on a full map).
    #[test]
    fn removing_and_recreating_a_key_keeps_the_queue_bounded() {
        let layer = KeyedRefreshLayer::new(|_: u32, _: Option<Token>| async {
            Token::bearer("t").map_err(RefreshError::from)
        });
        let handle = layer.token_handle();
        handle.key(&1);
        for _ in 0..1_000 {
            drop(handle.key(&7));
            assert!(handle.remove(&7));
        }
        handle.key(&7);
        let cells = layer.keyed.cells.read().unwrap();
        assert_eq!(cells.map.len(), 2);
        assert!(
            cells.order.len() <= 2 * cells.map.len() + 17,
            "queue of {} entries for 2 cells",
            cells.order.len()
        );
    }

    /// What evicted cells leave is bounded, per kind, the oldest forgotten first, and handed
    /// over once; a token without a refresh token is not kept; `remove` keeps nothing (so it
    /// makes no other key's token forgotten).
    #[test]
    fn what_evicted_cells_leave_is_bounded_and_handed_over_once() {
        // Tokens: as many as the capacity, at least 1,000; ended sessions: ten times as many,
        // at least 10,000.
        assert_eq!(tokens_kept_for(1), 1_000);
        assert_eq!(tokens_kept_for(10_000), 10_000);
        assert_eq!(tokens_kept_for(usize::MAX), usize::MAX);
        assert_eq!(ended_kept_for(1), 10_000);
        assert_eq!(ended_kept_for(10_000), 100_000);
        assert_eq!(ended_kept_for(usize::MAX), usize::MAX);

        let mut c = cells(0);
        c.tokens_cap = 3;
        c.ended_cap = 3;
        let cell_with = |access: String, refresh: Option<String>| {
            let cell = Arc::new(TokenCell::new(
                |_: Option<Token>| async { Token::bearer("t").map_err(RefreshError::from) },
                None,
            ));
            let token = Token::bearer(access).unwrap();
            let token = match refresh {
                Some(rt) => token.with_refresh_token(rt),
                None => token,
            };
            cell.install(token, &RefreshOptions::default());
            cell
        };
        for k in 0..10u32 {
            let cell = cell_with(format!("a{k}"), Some(format!("r{k}")));
            if k % 2 == 1 {
                cell.clear();
            }
            c.insert(k, cell, 0);
            assert!(c.evict(&k));
        }
        // Tokens of keys 4, 6, 8; ended sessions of keys 5, 7, 9 (a logout keeps no token).
        let mut tokens: Vec<_> = c.tokens.map.keys().copied().collect();
        tokens.sort_unstable();
        assert_eq!(tokens, [4, 6, 8]);
        let mut ended: Vec<_> = c.ended.map.keys().copied().collect();
        ended.sort_unstable();
        assert_eq!(ended, [5, 7, 9]);
        assert!(c.tokens.order.len() <= 2 * 3 + 16 && c.ended.order.len() <= 2 * 3 + 16);

        // A token without a refresh token is not kept, and pushes no other out.
        c.insert(10, cell_with("a10".to_owned(), None), 0);
        assert!(c.evict(&10));
        assert!(matches!(c.take_kept(&10), (None, None)));
        let mut tokens: Vec<_> = c.tokens.map.keys().copied().collect();
        tokens.sort_unstable();
        assert_eq!(tokens, [4, 6, 8]);

        let (none, token) = c.take_kept(&6);
        assert!(none.is_none());
        let token = token.unwrap();
        assert_eq!((token.secret(), token.refresh_token()), ("a6", Some("r6")));
        assert!(matches!(c.take_kept(&6), (None, None)), "handed over once");
        let (ended, none) = c.take_kept(&7);
        assert!(ended.unwrap().1.is_none() && none.is_none());

        // Removing a key with a cell keeps nothing of it, and forgets no other key.
        c.insert(20, cell_with("a20".to_owned(), Some("r20".to_owned())), 0);
        let kept = Token::bearer("a21").unwrap().with_refresh_token("r21");
        c.tokens.keep(21, kept, c.tokens_cap);
        assert!(c.remove(&20));
        let mut tokens: Vec<_> = c.tokens.map.keys().copied().collect();
        tokens.sort_unstable();
        assert_eq!(tokens, [4, 8, 21]);

        // A refresher that keeps the sessions itself: an ended session is kept (for the
        // tokens, see the next test).
        c.keep_tokens = false;
        let cell = cell_with("a31".to_owned(), Some("r31".to_owned()));
        cell.clear();
        c.insert(31, cell, 0);
        assert!(c.evict(&31));
        assert!(matches!(c.take_kept(&31), (Some(_), None)));
    }

    /// Review (a login evicted before its first refresh, with a token store): a refresher
    /// that keeps the sessions itself got no token of an evicted cell, so a login installed
    /// through the handle that had not reached it was lost. Now only such a login is kept (in
    /// use, or dropped by the invalidation right after it; with a refresh token), and a cell
    /// rebuilt with it keeps it as a login until a refresh replaces it; a token a refresh got
    /// is not kept.
    #[tokio::test]
    async fn a_refresher_that_keeps_the_sessions_gets_only_an_evicted_login_no_refresh_replaced() {
        let options = RefreshOptions::default();
        let mut c = cells(0);
        c.keep_tokens = false;
        let new_cell = || {
            TokenCell::new(
                |_: Option<Token>| async {
                    let token = Token::bearer("refreshed")?;
                    Ok::<_, RefreshError>(token.with_refresh_token("r-refreshed"))
                },
                None,
            )
        };
        let login = |k: u32| {
            let token = Token::bearer(format!("a{k}")).unwrap();
            token.with_refresh_token(format!("r{k}"))
        };
        let installed = |k: u32| {
            let cell = Arc::new(new_cell());
            cell.install(login(k), &options);
            cell
        };
        // Evicts `cell` as key `k`'s; what is kept of it (the access token), taken.
        let evicted = |c: &mut Cells<u32>, k: u32, cell: Arc<TokenCell>| {
            c.insert(k, cell, 0);
            assert!(c.evict(&k));
            match c.take_kept(&k) {
                (None, token) => token.map(|t| t.secret().to_owned()),
                (Some(_), _) => panic!("key {k}: ended"),
            }
        };

        // A login in use: kept.
        assert_eq!(evicted(&mut c, 40, installed(40)).as_deref(), Some("a40"));
        // A login refreshed since: the refreshed token is not kept.
        let cell = installed(41);
        assert!(cell.force_refresh(&options).await.is_ok());
        assert_eq!(cell.current_token().unwrap().secret(), "refreshed");
        assert_eq!(evicted(&mut c, 41, cell), None);
        // A login without a refresh token: not kept.
        let cell = Arc::new(new_cell());
        cell.install(Token::bearer("a42").unwrap(), &options);
        assert_eq!(evicted(&mut c, 42, cell), None);
        // A login the invalidation right after it dropped: kept.
        let cell = installed(43);
        cell.invalidate();
        assert_eq!(evicted(&mut c, 43, cell).as_deref(), Some("a43"));
        // A refreshed token an invalidation dropped: not kept.
        let cell = installed(44);
        assert!(cell.force_refresh(&options).await.is_ok());
        cell.invalidate();
        assert_eq!(evicted(&mut c, 44, cell), None);

        // A cell rebuilt with a kept login: it is kept again if the cell is evicted before a
        // refresh, also after an invalidation; not once a refresh replaced it.
        let rebuilt = |c: &Cells<u32>, k: u32| {
            let cell = new_cell().starting_after(c.high_water);
            Arc::new(cell.starting_stale(Some(login(k)), true))
        };
        let cell = rebuilt(&c, 45);
        assert_eq!(evicted(&mut c, 45, cell).as_deref(), Some("a45"));
        let cell = rebuilt(&c, 46);
        cell.invalidate();
        assert_eq!(evicted(&mut c, 46, cell).as_deref(), Some("a46"));
        let cell = rebuilt(&c, 47);
        assert!(cell.force_refresh(&options).await.is_ok());
        assert_eq!(evicted(&mut c, 47, cell), None);
        // A token handed over that is not a login (tokens were kept then) is not one either.
        let cell = new_cell().starting_after(c.high_water);
        let cell = Arc::new(cell.starting_stale(Some(login(48)), false));
        assert_eq!(evicted(&mut c, 48, cell), None);
    }

    /// Review A3: with every cell pinned, each new key walked the whole queue under the write
    /// lock. A walk now looks at a bounded number of cells, and later walks go on from there.
    #[test]
    fn a_walk_over_pinned_cells_is_bounded_and_goes_on_where_the_last_one_stopped() {
        let mut c = cells(1_000);
        let mut held: Vec<_> = (0..1_000).map(|k| c.map[&k].cell.clone()).collect();
        assert!(!evict_one(&mut c, 10, 1_000, Instant::now()));
        assert_eq!(front_key(&c), 64, "one walk looked at 64 cells");
        assert!(!evict_one(&mut c, 10, 1_000, Instant::now()));
        assert_eq!(front_key(&c), 128);
        // The one unpinned cell, far down the queue, is found by later walks.
        drop(held.pop());
        let mut walks = 0;
        while !evict_one(&mut c, 10, 1_000, Instant::now()) {
            walks += 1;
            assert!(walks <= 1_000 / 64 + 1, "never found");
        }
        assert!(!c.map.contains_key(&999));
        assert_eq!(c.map.len(), 999);
    }
}
