//! The store protocol for the keyed layer: one record per key.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::refresher::Unstored;
use super::{DEFAULT_LEASE_TTL, DEFAULT_MIN_REMAINING, StoreRefresher, TokenStore};
use crate::keyed::{Bound, KeyedRefresher};
use crate::refresher::{RefreshContext, RefreshError, TokenRefresher};
use crate::token::Token;

/// A [`KeyedRefresher`] that shares each key's token set among processes, through a store of
/// its own per key: [`StoreRefresher`]'s protocol, one record per key.
///
/// `store_for` gives the store of a key: a [`FileStore`](super::FileStore) with the key in
/// the file name, or a `RedisStore` with the key in the prefix (`RedisStore::scoped` shares
/// one connection among keys). It is called on each refresh, never on the hot path.
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

impl<K, R, F, S> KeyedRefresher<K> for KeyedStoreRefresher<R, F>
where
    K: Clone + Send + Sync + 'static,
    R: KeyedRefresher<K>,
    F: Fn(&K) -> S + Send + Sync + 'static,
    S: TokenStore,
{
    type Future = Pin<Box<dyn Future<Output = Result<Token, RefreshError>> + Send>>;

    fn refresh(&self, key: &K, ctx: RefreshContext) -> Self::Future {
        let bound = Bound {
            key: key.clone(),
            refresher: self.refresher.clone(),
        };
        let mut shared =
            StoreRefresher::with_unstored(bound, (self.store_for)(key), self.unstored.clone())
                .lease_ttl(self.lease_ttl)
                .min_remaining(self.min_remaining);
        if let Some(wait) = self.lease_wait {
            shared = shared.lease_wait(wait);
        }
        shared.refresh(ctx)
    }

    /// Passed on to the wrapped refresher, as [`StoreRefresher`] does: a refresher that
    /// forgets a key's refresh token at logout then refuses to present it again, even when
    /// the store hands it back.
    fn logout(&self, key: &K) {
        self.refresher.logout(key);
    }
}
