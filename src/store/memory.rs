//! A store in memory: for several layers in one process, and for tests.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{CasOutcome, Lease, Record, StoreError, TokenStore, fence};

/// A [`TokenStore`] in memory. Clones share the same record.
///
/// For several layers (or a layer and a keyed layer) in one process that must share one
/// login, and for tests. Nothing survives the process; use [`FileStore`](super::FileStore) for
/// that.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::store::{MemoryStore, StoreRefresher};
/// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
///
/// let store = MemoryStore::new();
/// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
/// let a = RefreshLayer::new(StoreRefresher::new(refresher, store.clone()));
/// # let _ = a;
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    record: Option<Record>,
    lease: Option<(String, Instant)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self) {
        self.inner.changed.send_modify(|n| *n += 1);
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state();
        f.debug_struct("MemoryStore")
            .field("record", &st.record)
            .field("leased", &st.lease.is_some())
            .finish()
    }
}

impl TokenStore for MemoryStore {
    async fn load(&self) -> Result<Option<Record>, StoreError> {
        Ok(self.state().record.clone())
    }

    async fn try_lease(&self, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let mut st = self.state();
        let now = Instant::now();
        if st.lease.as_ref().is_some_and(|(_, until)| *until > now) {
            return Ok(None);
        }
        let lease = Lease::new(fence(), ttl);
        // A TTL too large to add to an instant holds the lease for good (until released).
        let until = now
            .checked_add(ttl)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
        st.lease = Some((lease.fence().to_owned(), until));
        Ok(Some(lease))
    }

    async fn compare_and_set(
        &self,
        lease: &Lease,
        expected: u64,
        record: &Record,
    ) -> Result<CasOutcome, StoreError> {
        let outcome = {
            let mut st = self.state();
            let now = Instant::now();
            let held = st
                .lease
                .as_ref()
                .is_some_and(|(f, until)| f == lease.fence() && *until > now);
            if !held {
                CasOutcome::LeaseLost
            } else if st.record.as_ref().map_or(0, Record::version) != expected {
                CasOutcome::VersionChanged
            } else {
                st.record = Some(record.clone());
                CasOutcome::Written
            }
        };
        if outcome == CasOutcome::Written {
            self.notify();
        }
        Ok(outcome)
    }

    async fn release(&self, lease: Lease) -> Result<(), StoreError> {
        {
            let mut st = self.state();
            if st.lease.as_ref().is_some_and(|(f, _)| f == lease.fence()) {
                st.lease = None;
            }
        }
        self.notify();
        Ok(())
    }

    async fn wait_change(&self, seen: u64, max: Duration) -> Result<(), StoreError> {
        let mut rx = self.inner.changed.subscribe();
        if self.state().record.as_ref().map_or(0, Record::version) > seen {
            return Ok(());
        }
        let _ = tokio::time::timeout(max, rx.changed()).await;
        Ok(())
    }
}
