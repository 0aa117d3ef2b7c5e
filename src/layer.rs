use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::cell::TokenCell;
use crate::config::{RefreshOptions, option_setters};
use crate::handle::TokenHandle;
use crate::refresher::TokenRefresher;
use crate::service::Refresh;
use crate::shared::Shared;
use crate::token::Token;

/// Attaches a refreshed bearer token to every request and replays a request once after a 401.
///
/// The layer owns the token cell: every service it produces, every clone of those and of the
/// layer, shares one token, one refresh in flight at a time and one [`TokenHandle`].
///
/// # Options and clones
///
/// The options are a value (see [`RefreshOptions`], which lists them with their defaults):
/// a setter changes this layer value only, not a clone made before nor a service already
/// made. The token is shared by all of them.
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
#[derive(Clone)]
pub struct RefreshLayer {
    shared: Shared,
}

impl fmt::Debug for RefreshLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshLayer")
            .field("cell", &self.shared.cell())
            .field("options", self.shared.options())
            .finish()
    }
}

impl RefreshLayer {
    /// A layer that gets its tokens from `refresher`, with the default options. The first
    /// request triggers the first refresh, unless a token is installed with
    /// [`initial_token`](Self::initial_token).
    pub fn new<R: TokenRefresher>(refresher: R) -> Self {
        Self::with_options(refresher, RefreshOptions::default())
    }

    /// A layer with the given options.
    pub fn with_options<R: TokenRefresher>(refresher: R, options: RefreshOptions) -> Self {
        Self {
            shared: Shared::new(Arc::new(TokenCell::new(refresher, None)), options),
        }
    }

    /// The cell and options, for adapters that share them (the reqwest middleware).
    #[cfg(feature = "reqwest")]
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// This layer's options.
    pub fn options(&self) -> &RefreshOptions {
        self.shared.options()
    }

    fn map_options(mut self, f: impl FnOnce(RefreshOptions) -> RefreshOptions) -> Self {
        let options = self.shared.options_mut();
        *options = f(std::mem::take(options));
        self
    }

    option_setters!();

    /// The handle to the shared token: install, clear, invalidate, force a refresh, read the
    /// state, subscribe to events. Every handle and service of this layer shares one cell.
    pub fn token_handle(&self) -> TokenHandle {
        TokenHandle::new(self.shared.clone())
    }

    /// Starts with `token` (or a token set: see [`Token::with_refresh_token`]), so the first
    /// requests need no refresh. Its lifetime is placed on the layer's clock as it is now:
    /// set [`clock`](Self::clock) first.
    #[must_use]
    pub fn initial_token(self, token: Token) -> Self {
        self.shared.cell().install(token, self.shared.options());
        self
    }
}

impl<S> Layer<S> for RefreshLayer {
    type Service = Refresh<S>;

    fn layer(&self, inner: S) -> Refresh<S> {
        Refresh::from_shared(inner, self.shared.clone())
    }
}
