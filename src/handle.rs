use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::BoxError;
use crate::cell::{TokenCell, in_refresh};
use crate::config::RefreshOptions;
use crate::error::Failure;
use crate::events::Events;
use crate::shared::Shared;
use crate::token::Token;

/// A handle to the token shared by a [`RefreshLayer`](crate::RefreshLayer), every service it
/// made and their clones.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
/// let layer = RefreshLayer::new(refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("refreshed")?) }));
/// let handle = layer.token_handle();
///
/// // After a login (a token set: the refresh token goes with it):
/// handle.set_token(Token::bearer("from-login")?.with_refresh_token("rt-1"));
/// assert_eq!(handle.state().generation(), 1);
///
/// // Refresh now, whatever the token's age:
/// let state = handle.refresh().await?;
/// assert_eq!(state.generation(), 2);
///
/// // Drop the token but stay logged in: the next request refreshes.
/// handle.invalidate();
/// assert!(!handle.state().has_token());
///
/// // Logout: requests fail fast until the next `set_token`.
/// handle.clear();
/// assert!(handle.state().session_ended());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TokenHandle(Of);

#[derive(Clone)]
enum Of {
    /// A layer's (or a middleware's) cell and options.
    Layer(Shared),
    /// A keyed layer's handle to one key: the key's current cell is looked up on every call.
    Key(Arc<KeyCell>),
}

/// How a key's handle finds the key's current cell, the cell it last acted on (held, so that
/// the keyed layer does not evict it while the handle is alive; a cell forgotten by a
/// `remove` is let go at the next call), and the keyed layer's options.
struct KeyCell {
    resolve: ResolveCell,
    held: Mutex<Arc<TokenCell>>,
    options: Arc<RefreshOptions>,
}

/// Looks a key's current cell up, creating it if needed as a request would.
pub(crate) type ResolveCell = Box<dyn Fn() -> Arc<TokenCell> + Send + Sync>;

impl std::fmt::Debug for TokenHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cell = match &self.0 {
            Of::Layer(shared) => shared.cell().clone(),
            Of::Key(key) => key
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        f.debug_struct("TokenHandle").field("cell", &cell).finish()
    }
}

impl TokenHandle {
    pub(crate) fn new(shared: Shared) -> Self {
        Self(Of::Layer(shared))
    }

    /// A keyed layer's handle to one key: `resolve` gives the key's current cell (made if
    /// needed), looked up on every call.
    pub(crate) fn keyed(resolve: ResolveCell, options: Arc<RefreshOptions>) -> Self {
        let held = Mutex::new(resolve());
        Self(Of::Key(Arc::new(KeyCell {
            resolve,
            held,
            options,
        })))
    }

    /// The cell to act on: the layer's, or the key's current one.
    fn cell(&self) -> Arc<TokenCell> {
        match &self.0 {
            Of::Layer(shared) => shared.cell().clone(),
            Of::Key(key) => {
                let cell = (key.resolve)();
                // The previous cell (forgotten by a `remove`) is let go.
                *key.held.lock().unwrap_or_else(PoisonError::into_inner) = cell.clone();
                cell
            }
        }
    }

    fn options(&self) -> &RefreshOptions {
        match &self.0 {
            Of::Layer(shared) => shared.options(),
            Of::Key(key) => &key.options,
        }
    }

    /// Installs a token, or a whole token set (access token, expiry, refresh token: see
    /// [`Token::with_refresh_token`]), after a login or from storage, and returns its
    /// generation. Ends a session-ended state and a refresh cool-down. A late 401 for an older
    /// token replays with this one instead of refreshing. A refresh in flight does not
    /// overwrite it.
    pub fn set_token(&self, token: Token) -> u64 {
        self.cell().install(token, self.options())
    }

    /// Drops the current token *without* logging out (Ktor's `clearToken`): the next request
    /// gets a new one through the refresher, which is handed the dropped token (and its
    /// refresh token). Concurrent requests share that one refresh.
    ///
    /// If a refresh is running when the token is invalidated, its result is not used: the
    /// refresher is called again once that call ends, for the requests that waited on it and
    /// those that come after the invalidation, and they all get the token of that second
    /// call. The refresher is never called twice at once: the second call starts only when
    /// the first one has returned, and it is handed the token the first one returned (if it
    /// succeeded; with refresh-token rotation, that one holds the valid refresh token),
    /// otherwise the dropped token; but if [`set_token`](Self::set_token) installed a token
    /// after the first call started, the second call is handed the dropped (installed) token,
    /// not the first call's result. A request after the invalidation may so wait for up to two
    /// refresher calls. (A request driven by another runtime than the refresh task's keeps its
    /// own bound, the refresh timeout or the backoff's total plus 5 s, across both calls: if
    /// the two together outlast it, that request fails with
    /// [`RefreshFailed`](crate::error::RefreshFailed) and the refresh goes on.)
    ///
    /// An ended session stays ended: after a terminal refresh failure or [`clear`](Self::clear),
    /// `invalidate` changes nothing (no event; the current generation is returned), and
    /// requests keep failing fast without calling the refresher until
    /// [`set_token`](Self::set_token) or [`refresh`](Self::refresh).
    ///
    /// A refresh cool-down ([`Cooldown`](crate::Cooldown)) outlasts an invalidation: while it
    /// runs, requests without a token fail fast as before, and the next refresh after it
    /// makes a single attempt (dropping a token says nothing about the token endpoint). So
    /// does the second call after an invalidation during a refresh, when the first call
    /// failed or failures came before it: invalidating never buys the retry budget again.
    pub fn invalidate(&self) -> u64 {
        self.cell().invalidate()
    }

    /// Logs out: drops the token and the refresher forgets its own credentials
    /// ([`TokenRefresher::logout`](crate::TokenRefresher::logout)). Requests then fail fast
    /// with [`SessionEnded`](crate::error::SessionEnded), without calling the refresher or the
    /// network (or go out untouched, with
    /// [`anonymous_when_logged_out`](crate::RefreshOptions::anonymous_when_logged_out)),
    /// until [`set_token`](Self::set_token) or [`refresh`](Self::refresh).
    pub fn clear(&self) {
        self.cell().clear();
    }

    /// Refreshes now: always calls the refresher, or joins the refresh already in flight.
    /// Works in a session-ended state and during a cool-down (the refresher may hold new
    /// credentials).
    ///
    /// # Errors
    ///
    /// [`RefreshRejected`](crate::error::RefreshRejected) or
    /// [`RefreshFailed`](crate::error::RefreshFailed);
    /// [`SessionEnded`](crate::error::SessionEnded) when [`clear`](Self::clear) ends the
    /// session while this refresh runs; and
    /// [`ReentrantRefresh`](crate::error::ReentrantRefresh) at once when called from inside
    /// the refresher (it would wait for itself).
    pub async fn refresh(&self) -> Result<TokenState, BoxError> {
        if in_refresh() {
            return Err(Failure::Reentrant.into_box());
        }
        self.cell()
            .force_refresh(self.options())
            .await
            .map_err(|e| Failure::Unavailable(e, None).into_box())?;
        Ok(self.state())
    }

    /// The current token, for code that must forward it (a WebSocket upgrade, a subprocess).
    /// **A secret**: never log it. `None` when there is no token.
    pub fn token(&self) -> Option<Token> {
        self.cell().current_token()
    }

    /// The state of the token, without its secret.
    pub fn state(&self) -> TokenState {
        let s = self.cell().status(self.options());
        TokenState {
            generation: s.generation,
            has_token: s.has_token,
            expires_in: s.expires_in,
            refresh_in: s.refresh_in,
            session_ended: s.session_ended,
            refreshing: s.refreshing,
            cooling_for: s.cooling_for,
        }
    }

    /// Subscribes to [`RefreshEvent`](crate::RefreshEvent)s from now on.
    pub fn subscribe(&self) -> Events {
        Events::new(self.cell().subscribe())
    }
}

/// The state of the shared token, without its secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenState {
    generation: u64,
    has_token: bool,
    expires_in: Option<Duration>,
    refresh_in: Option<Duration>,
    session_ended: bool,
    refreshing: bool,
    cooling_for: Option<Duration>,
}

impl TokenState {
    /// The token generation: bumped by every refresh, install, invalidate and clear. 0
    /// before the first.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether there is a token.
    pub fn has_token(&self) -> bool {
        self.has_token
    }

    /// Time left until the token expires, if it has a lifetime.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_in
    }

    /// Time left until requests wait for a refresh first (expiry minus leeway).
    pub fn refresh_in(&self) -> Option<Duration> {
        self.refresh_in
    }

    /// Whether a terminal failure or a logout ended the session.
    pub fn session_ended(&self) -> bool {
        self.session_ended
    }

    /// Whether a refresh is running.
    pub fn refreshing(&self) -> bool {
        self.refreshing
    }

    /// Time left in the cool-down after a failed refresh, if one runs.
    pub fn cooling_for(&self) -> Option<Duration> {
        self.cooling_for
    }
}
