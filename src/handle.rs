use std::sync::Arc;
use std::time::Duration;

use crate::BoxError;
use crate::cell::Cell;
use crate::events::Events;
use crate::future::obtain_error;
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
/// let handle = layer.handle();
///
/// // After a login:
/// handle.set_token(Token::bearer("from-login")?);
/// assert_eq!(handle.state().generation(), 1);
///
/// // Refresh now, whatever the token's age:
/// let state = handle.refresh().await?;
/// assert_eq!(state.generation(), 2);
///
/// // Logout: requests fail fast until the next `set_token`.
/// handle.clear();
/// assert!(handle.state().session_ended());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TokenHandle {
    cell: Arc<Cell>,
}

impl std::fmt::Debug for TokenHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenHandle")
            .field("cell", &self.cell)
            .finish()
    }
}

impl TokenHandle {
    pub(crate) fn new(cell: Arc<Cell>) -> Self {
        Self { cell }
    }

    /// Installs a token (after a login, or from storage) and returns its generation. Ends a
    /// session-ended state. A late 401 for an older token replays with this one instead of
    /// refreshing. A refresh in flight does not overwrite it.
    pub fn set_token(&self, token: Token) -> u64 {
        self.cell.install(token)
    }

    /// Drops the token (logout). Requests then fail fast with
    /// [`SessionEnded`](crate::error::SessionEnded), without calling the refresher or the
    /// network, until [`set_token`](Self::set_token) or [`refresh`](Self::refresh).
    pub fn clear(&self) {
        self.cell.clear();
    }

    /// Refreshes now: always calls the refresher, or joins the refresh already in flight.
    /// Works in a session-ended state too (the refresher may hold new credentials).
    ///
    /// # Errors
    ///
    /// [`RefreshRejected`](crate::error::RefreshRejected) or
    /// [`RefreshFailed`](crate::error::RefreshFailed).
    pub async fn refresh(&self) -> Result<TokenState, BoxError> {
        self.cell
            .force_refresh()
            .await
            .map_err(|e| obtain_error(e, None))?;
        Ok(self.state())
    }

    /// The state of the token, without its secret.
    pub fn state(&self) -> TokenState {
        let s = self.cell.status();
        TokenState {
            generation: s.generation,
            has_token: s.has_token,
            expires_in: s.expires_in,
            refresh_in: s.refresh_in,
            session_ended: s.session_ended,
            refreshing: s.refreshing,
        }
    }

    /// Subscribes to [`RefreshEvent`](crate::RefreshEvent)s from now on.
    pub fn subscribe(&self) -> Events {
        Events::new(self.cell.subscribe())
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
}

impl TokenState {
    /// The token generation: bumped by every refresh, install and clear. 0 before the first.
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
}
