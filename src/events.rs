//! Events about the token, for logging the user out or auditing refreshes.

use tokio::sync::broadcast;

/// Something that happened to the shared token. Received through
/// [`TokenHandle::subscribe`](crate::TokenHandle::subscribe). Never carries a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshEvent {
    /// A refresh produced a new token, now at `generation`.
    Refreshed {
        /// The new token's generation.
        generation: u64,
    },
    /// A refresh failed (after its retries, for a foreground refresh).
    RefreshFailed {
        /// The generation that could not be replaced.
        generation: u64,
        /// Whether the failure was terminal.
        terminal: bool,
    },
    /// A terminal failure ended the session: the "log the user out" signal. Sent once per
    /// session end, however many requests were waiting.
    SessionEnded {
        /// The generation whose refresh was rejected.
        generation: u64,
    },
    /// A token was installed through the handle.
    Installed {
        /// The installed token's generation.
        generation: u64,
    },
    /// The token was cleared through the handle (logout).
    Cleared {
        /// The generation after clearing.
        generation: u64,
    },
    /// The token was dropped through the handle without a logout; the next request refreshes.
    Invalidated {
        /// The generation after invalidating.
        generation: u64,
    },
}

/// A subscriber fell behind and this many events were dropped (the oldest ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} token events were missed")]
pub struct Lagged(pub u64);

/// A stream of [`RefreshEvent`]s from one [`TokenHandle`](crate::TokenHandle).
///
/// Events are buffered (64); a subscriber that falls further behind skips the oldest and is
/// told how many it missed.
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<RefreshEvent>,
}

impl Events {
    pub(crate) fn new(rx: broadcast::Receiver<RefreshEvent>) -> Self {
        Self { rx }
    }

    /// Waits for the next event; `Err(Lagged(n))` if `n` events were missed. `None` once the
    /// token cell it listens to is gone: the layer, its services and handles are dropped, or,
    /// for a keyed layer's per-key handle, the key's cell was evicted or removed and nothing
    /// holds it any more (the keyed
    /// handle's own [`subscribe`](crate::keyed::KeyedTokenHandle::subscribe) follows every
    /// key for the layer's life).
    pub async fn recv(&mut self) -> Option<Result<RefreshEvent, Lagged>> {
        match self.rx.recv().await {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(Lagged(n))),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<RefreshEvent, Lagged>> {
        match self.rx.try_recv() {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(Lagged(n))),
            Err(_) => None,
        }
    }
}
