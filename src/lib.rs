//! Tower middleware that keeps a bearer token fresh: it attaches the token to every request,
//! refreshes it **once** when it expires or a server answers 401 (however many requests are
//! in flight), and replays the rejected request **exactly once** with the new token.
//!
//! # Quick start
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use http::{Request, Response, StatusCode};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, ReplayBody, Token};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_auth_refresh::BoxError> {
//! // Where new tokens come from: any async function, or the built-in OAuth 2.0 refresher.
//! let refresher = refresh_fn(|_stale: Option<Token>| async {
//!     Ok::<_, RefreshError>(Token::bearer("fresh")?.with_expires_in(Duration::from_secs(3600)))
//! });
//!
//! // An API that only accepts the fresh token.
//! let api = service_fn(|req: Request<ReplayBody<String>>| async move {
//!     let ok = req.headers()["authorization"] == "Bearer fresh";
//!     let status = if ok { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
//!     Ok::<_, Infallible>(Response::builder().status(status).body(String::new()).unwrap())
//! });
//!
//! let layer = RefreshLayer::new(refresher).initial_token(Token::bearer("expired")?);
//! let client = ServiceBuilder::new().layer(layer).service(api);
//!
//! // Sent with "expired", refused with 401, refreshed, replayed with "fresh":
//! let res = client.oneshot(Request::post("/orders").body("{}".to_owned())?).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! # Ok(())
//! # }
//! ```
//!
//! # How a request goes through
//!
//! 1. The current `(generation, token)` is read without awaiting anything. A request that
//!    already has an `Authorization` header, is marked [`RefreshRequest`], or is for an origin
//!    outside [`RefreshLayer::allowed_origins`] passes through untouched.
//! 2. With no token, or one inside the expiry leeway, the request waits for a refresh first.
//! 3. The body is wrapped in a [`ReplayBody`]: empty bodies and bodies of known size up to the
//!    cap (1 MiB) are captured as they stream out, so they can be replayed; others pass through
//!    and are never replayed.
//! 4. `Authorization: <scheme> <token>` is set (marked sensitive) and the request is sent.
//! 5. If the response asks for a refresh (by default a 401 not excluded by RFC 6750), the
//!    request asks the cell for a token newer than the generation it was sent with: if another
//!    request already refreshed, it gets that token; otherwise it joins or starts the one
//!    refresh in flight. Then it is replayed once. A second refusal is the typed
//!    [`UnauthorizedAfterRefresh`](error::UnauthorizedAfterRefresh) error.
//!
//! A request whose body cannot be replayed gets its 401 response back, after the refresh has
//! run, so a retry by the caller goes out with the new token.
//!
//! # The refresh
//!
//! One refresh runs at a time for all clones of the service. It runs as a Tokio task of its own
//! and stores its result even if every request waiting on it is dropped: with rotating refresh
//! tokens, a cancelled refresh may already have spent the old refresh token on the server.
//! Outside a Tokio runtime it runs inside the waiting request instead.
//!
//! Transient failures are retried with backoff ([`RetryPolicy`]); a terminal failure reaches
//! every waiter as the same error ([`RefreshRejected`](error::RefreshRejected)) and ends the
//! session: later requests fail fast with [`SessionEnded`](error::SessionEnded), without a
//! network call, until new credentials are installed through the [`TokenHandle`].
//!
//! # Security
//!
//! - No public type prints a token: [`Token`]'s `Debug` and `Display` redact the secret, and
//!   no error or tracing event carries it.
//! - The `Authorization` value is marked sensitive, so tower-http's tracing and
//!   `SetSensitiveRequestHeaders` layers treat it as such.
//! - [`RefreshLayer::allowed_origins`] keeps the token off requests to other origins. Put
//!   tower-http's `FollowRedirectLayer` *outside* this layer only if you also restrict origins;
//!   the safe order is this layer outside the redirect layer, so a redirect to another origin
//!   is followed without the token being re-attached by this layer.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod cell;
mod clock;
mod events;
mod handle;
mod layer;
mod refresher;
mod retry;
mod service;
mod token;

pub mod error;
pub mod future;
pub mod keyed;
#[cfg(feature = "oauth2")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
pub mod oauth2;
pub mod policy;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;

pub use body::{DEFAULT_MAX_REPLAY_BODY, ReplayBody};
pub use clock::{Clock, TokioClock};
pub use events::{Events, Received, RefreshEvent};
pub use handle::{TokenHandle, TokenState};
pub use layer::{InvalidOrigin, RefreshLayer, ReplayMethods};
pub use refresher::{RefreshError, TokenRefresher, refresh_fn};
pub use retry::RetryPolicy;
pub use service::{NoRefresh, Refresh, RefreshRequest};
pub use token::{InvalidToken, Token};

/// The boxed error type of the layer's service, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
