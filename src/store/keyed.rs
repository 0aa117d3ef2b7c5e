//! The store protocol for the keyed layer: one record per key.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::refresher::{Lineage, Logout, Unstored};
use super::{DEFAULT_LEASE_TTL, DEFAULT_MIN_REMAINING, StoreError, StoreRefresher, TokenStore};
use crate::keyed::{Bound, KeyedRefresher};
use crate::refresher::{RefreshContext, RefreshError, TokenRefresher};
use crate::token::Token;

/// A [`KeyedRefresher`] that shares each key's token set among processes, through a store of
/// its own per key: [`StoreRefresher`]'s protocol, one record per key.
///
/// `store_for` gives the store of a key: a [`FileStore`](super::FileStore) with the key in
/// the file name, or a `RedisStore` with the key in the prefix (`RedisStore::scoped` shares
/// one connection among keys). Each key needs a store of its own: keys that share one share
/// their tokens. It is called on each refresh, never on the hot path.
///
/// The store keeps each key's session ([`KeyedRefresher::keeps_sessions`]): when the keyed
/// layer evicts a key's cell, it keeps no token of it that a refresh got, and the cell
/// rebuilt for the key takes the stored session over (an evicted logout stays a logout). A
/// login installed through the key's handle
/// ([`TokenHandle::set_token`](crate::TokenHandle::set_token), with a refresh token) reaches
/// the store at its first refresh. If the key's cell is evicted before then, the layer keeps
/// the login (for at most as many keys as its capacity, at least 1,000, the oldest forgotten
/// first) and hands it to the rebuilt cell's first refresh, which refreshes it as a new login
/// and stores the result: it is never replaced by the stored session, which may be another
/// user's. A forced refresh ([`TokenHandle::refresh`](crate::TokenHandle::refresh)) right
/// after the login stores it at once.
///
/// # Example
///
/// ```
/// use std::path::PathBuf;
/// use tower_auth_refresh::keyed::KeyedRefreshLayer;
/// use tower_auth_refresh::store::{FileStore, KeyedStoreRefresher};
/// use tower_auth_refresh::{RefreshError, Token};
///
/// let refresher = |tenant: String, _stale: Option<Token>| async move {
///     Ok::<_, RefreshError>(Token::bearer(format!("token-for-{tenant}"))?)
/// };
/// let dir = PathBuf::from("/var/lib/my-app/tokens");
/// let shared = KeyedStoreRefresher::new(refresher, move |tenant: &String| {
///     FileStore::new(dir.join(format!("{tenant}.json")))
/// });
/// let layer = KeyedRefreshLayer::<String, _>::new(shared);
/// # let _ = layer;
/// ```
pub struct KeyedStoreRefresher<R, F> {
    refresher: Arc<R>,
    store_for: F,
    lease_ttl: Duration,
    lease_wait: Option<Duration>,
    min_remaining: Duration,
    /// The token sets whose write failed, of every key (see [`StoreRefresher`]).
    unstored: Arc<Unstored>,
    /// The refresh tokens of every key's stored session this process handed out.
    lineage: Arc<Lineage>,
    /// The keys logged out while no token was installed for them since.
    logged_out: Arc<LoggedOut>,
}

/// A clone shares what the original remembers (the unstored sets, the lineage, the logged-out
/// keys): keep one to call [`log_out_everywhere`](Self::log_out_everywhere) on after handing
/// the other to the layer. Do not hand clones to two layers: a logout through one would be
/// one of the other too.
impl<R, F: Clone> Clone for KeyedStoreRefresher<R, F> {
    fn clone(&self) -> Self {
        Self {
            refresher: self.refresher.clone(),
            store_for: self.store_for.clone(),
            lease_ttl: self.lease_ttl,
            lease_wait: self.lease_wait,
            min_remaining: self.min_remaining,
            unstored: self.unstored.clone(),
            lineage: self.lineage.clone(),
            logged_out: self.logged_out.clone(),
        }
    }
}

/// The keys logged out ([`KeyedRefresher::logout`]) that no login ended since, each with the
/// logouts its [`StoreRefresher`] reads; at most [`LOGGED_OUT_KEPT`], the oldest forgotten
/// first (logged), as the keyed layer remembers at most so many ended sessions of evicted
/// keys. The keyed layer keeps a logged-out key logged out by itself, without calling the
/// refresher; this memory matters for a forced refresh and a removed key.
#[derive(Default)]
struct LoggedOut(Mutex<VecDeque<LoggedOutKey>>);

/// A logged-out key (of the keyed layer's key type) and its logouts.
type LoggedOutKey = (Box<dyn Any + Send + Sync>, Arc<Logout>);

/// How many logged-out keys [`LoggedOut`] remembers.
const LOGGED_OUT_KEPT: usize = 10_000;

impl LoggedOut {
    /// The logouts of `key` (none if it is not logged out).
    fn of<K: PartialEq + Send + Sync + 'static>(&self, key: &K) -> Arc<Logout> {
        let mut keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        keys.retain(|(_, logout)| logout.logged_out());
        keys.iter()
            .find(|(k, _)| k.downcast_ref::<K>() == Some(key))
            .map(|(_, logout)| logout.clone())
            .unwrap_or_default()
    }

    fn log_out<K: Clone + PartialEq + Send + Sync + 'static>(&self, key: &K) {
        let mut keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, logout)) = keys
            .iter()
            .find(|(k, _)| k.downcast_ref::<K>() == Some(key))
        {
            logout.log_out();
            return;
        }
        if keys.len() >= LOGGED_OUT_KEPT {
            // Keys whose logout a login ended first; then the oldest logout.
            keys.retain(|(_, logout)| logout.logged_out());
            if keys.len() >= LOGGED_OUT_KEPT {
                keys.pop_front();
                tracing::warn!(
                    kept = LOGGED_OUT_KEPT,
                    "token store: forgot the oldest logout of a key (a forced refresh of it may adopt its stored session)"
                );
            }
        }
        let logout = Arc::new(Logout::default());
        logout.log_out();
        keys.push_back((Box::new(key.clone()), logout));
    }
}

impl<R, F> fmt::Debug for KeyedStoreRefresher<R, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedStoreRefresher")
            .field("lease_ttl", &self.lease_ttl)
            .field("lease_wait", &self.lease_wait)
            .field("min_remaining", &self.min_remaining)
            .finish_non_exhaustive()
    }
}

impl<R, F> KeyedStoreRefresher<R, F> {
    /// Wraps `refresher`; `store_for` gives each key's store.
    pub fn new(refresher: R, store_for: F) -> Self {
        Self {
            refresher: Arc::new(refresher),
            store_for,
            lease_ttl: DEFAULT_LEASE_TTL,
            lease_wait: None,
            min_remaining: DEFAULT_MIN_REMAINING,
            unstored: Arc::default(),
            lineage: Arc::default(),
            logged_out: Arc::default(),
        }
    }

    /// See [`StoreRefresher::lease_ttl`].
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// See [`StoreRefresher::lease_wait`].
    #[must_use]
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = Some(wait);
        self
    }

    /// See [`StoreRefresher::min_remaining`].
    #[must_use]
    pub fn min_remaining(mut self, left: Duration) -> Self {
        self.min_remaining = left;
        self
    }
}

impl<R, F> KeyedStoreRefresher<R, F> {
    /// [`StoreRefresher::log_out_everywhere`] for `key`'s stored session: logged out for every
    /// process that shares the store. The key's [`TokenHandle::clear`](crate::TokenHandle::clear)
    /// (through [`KeyedTokenHandle::key`](crate::keyed::KeyedTokenHandle::key)) alone logs it
    /// out in this process only.
    ///
    /// # Errors
    ///
    /// As [`StoreRefresher::log_out_everywhere`].
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::keyed::KeyedRefreshLayer;
    /// use tower_auth_refresh::store::{FileStore, KeyedStoreRefresher};
    /// use tower_auth_refresh::{RefreshError, Token};
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let refresher = |tenant: String, _stale: Option<Token>| async move {
    ///     Ok::<_, RefreshError>(Token::bearer(format!("token-for-{tenant}"))?)
    /// };
    /// // One store per key (never one shared by every key).
    /// let dir = std::path::PathBuf::from("/var/lib/my-app/tokens");
    /// let shared = KeyedStoreRefresher::new(refresher, move |tenant: &String| {
    ///     FileStore::new(dir.join(format!("{tenant}.json")))
    /// });
    /// let layer = KeyedRefreshLayer::<String, _>::new(shared.clone());
    /// // Tenant "acme" logs out: this process forgets its token, every process its session.
    /// let tenant = "acme".to_owned();
    /// layer.token_handle().key(&tenant).clear();
    /// shared.log_out_everywhere(&tenant).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn log_out_everywhere<K, S>(&self, key: &K) -> Result<(), StoreError>
    where
        K: Clone + PartialEq + Send + Sync + 'static,
        R: KeyedRefresher<K>,
        F: Fn(&K) -> S + Send + Sync + 'static,
        S: TokenStore,
    {
        self.for_key(key).log_out_everywhere().await
    }

    /// The store protocol of `key`, with what this refresher remembers across keys.
    fn for_key<K, S>(&self, key: &K) -> StoreRefresher<Bound<K, R>, S>
    where
        K: Clone + PartialEq + Send + Sync + 'static,
        R: KeyedRefresher<K>,
        F: Fn(&K) -> S + Send + Sync + 'static,
        S: TokenStore,
    {
        let bound = Bound {
            key: key.clone(),
            refresher: self.refresher.clone(),
        };
        let mut shared = StoreRefresher::with_memory(
            bound,
            (self.store_for)(key),
            self.unstored.clone(),
            self.lineage.clone(),
            self.logged_out.of(key),
        )
        .lease_ttl(self.lease_ttl)
        .min_remaining(self.min_remaining);
        if let Some(wait) = self.lease_wait {
            shared = shared.lease_wait(wait);
        }
        shared
    }
}

impl<K, R, F, S> KeyedRefresher<K> for KeyedStoreRefresher<R, F>
where
    K: Clone + PartialEq + Send + Sync + 'static,
    R: KeyedRefresher<K>,
    F: Fn(&K) -> S + Send + Sync + 'static,
    S: TokenStore,
{
    type Future = Pin<Box<dyn Future<Output = Result<Token, RefreshError>> + Send>>;

    fn refresh(&self, key: &K, ctx: RefreshContext) -> Self::Future {
        self.for_key(key).refresh(ctx)
    }

    /// Passed on to the wrapped refresher, as [`StoreRefresher`] does: a refresher that
    /// forgets a key's refresh token at logout then refuses to present it again, even when
    /// the store hands it back. And, as [`StoreRefresher`] does, the key's stored session is
    /// neither adopted nor refreshed until the key is handed a token again.
    fn logout(&self, key: &K) {
        self.logged_out.log_out(key);
        self.refresher.logout(key);
    }

    /// True: the store keeps each key's session, so the keyed layer keeps no token of an
    /// evicted key's cell that a refresh got, and the rebuilt cell's refresh takes the stored
    /// session over. (A token kept since the eviction may carry a refresh token other
    /// processes rotated away meanwhile, which this refresher, once it no longer recognises
    /// it, would take for a new login and present again.) A login installed through the
    /// key's handle that no refresh replaced is kept and handed over: this refresher has not
    /// seen it, takes it for a new login and stores it.
    fn keeps_sessions(&self) -> bool {
        true
    }
}
