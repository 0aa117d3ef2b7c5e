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
//! The protocol is written once (the crate's `replay` module) and shared by the tower
//! service, the keyed layer and the reqwest middleware.
//!
//! 1. **Admit.** The current `(generation, token)` is read without awaiting anything (a `std`
//!    read lock held for a reference-count bump). A request that already has an
//!    `Authorization` header, is marked [`TokenRequest`], is sent from inside a refresher, is
//!    rejected by the [attach rule](RefreshOptions::attach_when), or goes to an origin the token
//!    may not go to (by default any but the first origin the layer saw; see
//!    [`RefreshOptions::allowed_origins`]) passes through untouched. Plain `http://` to a host
//!    that is not loopback fails with [`InsecureTransport`](error::InsecureTransport) unless
//!    allowed.
//! 2. **Wait** when there is no usable token: none yet, expired or inside the expiry leeway,
//!    or **already refused** by the server for another request (a refresh for it is running
//!    or about to: the layer never sends a token it knows is rejected). The request joins the
//!    one refresh in flight; while it waits it holds no readiness of the inner service.
//! 3. **Send.** The body is wrapped in a [`ReplayBody`] (captured as it streams, up to a cap),
//!    `Authorization: <scheme> <token>` is set (replacing, never appending; marked sensitive)
//!    and the request is sent with the inner service that `poll_ready` made ready.
//! 4. **Recover.** If the response asks for a refresh (by default a 401 not excluded by
//!    RFC 6750, see [`policy`]), the request asks the cell for a token *newer than the
//!    generation it was sent with*: if another request already refreshed, it reuses that
//!    token; otherwise it joins or starts the one refresh in flight. Then it is replayed once,
//!    with the same method, URI, version, headers, extensions and body bytes.
//! 5. **Final.** The response to the replay is final: a second refusal is the typed
//!    [`UnauthorizedAfterRefresh`](error::UnauthorizedAfterRefresh) error (or the response
//!    itself, with [`RefreshOptions::unauthorized_as_response`]). A request that was sent only
//!    after waiting for a refresh and is refused gets the same, without a second refresh.
//!
//! # The refresh
//!
//! One refresh runs at a time for the layer and all clones of its services. It runs as a Tokio
//! task of its own and stores its result even if every request waiting on it is dropped: with
//! rotating refresh tokens, a cancelled refresh may already have spent the old refresh token
//! on the server. The task runs on the runtime the layer (for a keyed layer, the key's token)
//! was created in, else on that of the request that starts it; the waiters only wait for its
//! answer, they never run it. A waiter on another runtime than the task's waits at most
//! [`refresh_timeout`](RefreshOptions::refresh_timeout) or
//! [`Backoff::max_elapsed`], whichever is longer, plus 5 s: if the task's runtime is alive
//! but no longer driven, the refresh does not progress and such a waiter fails with
//! [`RefreshFailed`](error::RefreshFailed) at that bound, and the next request starts a new
//! refresh, again on that runtime, until it shuts down (then on the requester's runtime, from
//! the first refresh after the shutdown: a request polled on a runtime does not fail for it).
//! (With no Tokio runtime at all, neither where the layer was made nor where the request is
//! polled, it runs inside the waiting requests; dropping the last one cancels it. A request
//! polled outside any runtime for a layer made in one has no timer to bound its wait: it
//! waits for the task on the layer's runtime.)
//!
//! The runtime needs its time driver (`enable_time`, or `enable_all`; `#[tokio::main]` and
//! `#[tokio::test]` have it): the refresh timeout, the backoff and the bounded waits for a
//! replay's body use Tokio timers. Without it a refresh is not started (it could not be
//! bounded): it fails with an error that names `enable_time`. A request polled on such a
//! runtime for a refresh running on another one, which has timers, waits for that refresh
//! as a request polled outside any runtime does (the refresh's own timeout bounds it there).
//!
//! - Each refresher call is bounded by [`RefreshOptions::refresh_timeout`] (30 s): a refresher
//!   that never returns fails as a transient error instead of wedging the layer.
//! - Transient failures ([`RefreshError::transient`]) are retried with exponential backoff and
//!   full jitter ([`Backoff`]), honouring a server's `Retry-After`, within a total time bound;
//!   then every waiter gets [`RefreshFailed`](error::RefreshFailed) and a
//!   [cool-down](Cooldown) starts: requests keep using a token that is still valid, others
//!   fail fast without calling the refresher until it ends.
//! - A terminal failure ([`RefreshError::terminal`]), in the foreground or in a background
//!   refresh, is never retried. Every waiter gets [`RefreshRejected`](error::RefreshRejected)
//!   holding the *same* `Arc`'d error, one [`RefreshEvent::SessionEnded`] is emitted (the "log
//!   the user out" signal), and later requests fail fast with
//!   [`SessionEnded`](error::SessionEnded), without calling the refresher or the network, until
//!   the [`TokenHandle`] installs new credentials.
//! - A refresher that panics is caught: waiters get a transient error and the layer stays
//!   usable. A refresher that returns an already expired token while a valid one is held has
//!   failed transiently (the valid token stays).
//! - The refresher gets a [`RefreshContext`]: the stale token (with its refresh token, for
//!   token sets) and why it is asked ([`RefreshReason`]: the 401 with its challenges, expiry,
//!   forced, background).
//!
//! # Bodies and replay
//!
//! A replay needs the body twice. The layer keeps a body while it streams to the inner
//! service, up to [`RefreshOptions::max_replay_body`] (1 MiB by default), zero-copy (the
//! [`Bytes`](bytes::Bytes) of each frame are shared, not copied), so the first attempt is never
//! delayed: an in-memory body (`Full<Bytes>`, `String`) is its own replay, a body of known or
//! unknown size is captured frame by frame. A body that outgrows the cap is let go at once and
//! passes through untouched; it is **not replayed**: its 401 response goes back to the caller,
//! after the refresh has run, so a retry by the caller goes out with the new token. Memory
//! stays bounded by the cap in every case, even when a size hint lies.
//!
//! A server may answer 401 before it has read the body, while the client is still sending it.
//! The replay then waits, up to [`RefreshOptions::replay_body_wait`] (1 s), for the first send
//! to finish or be dropped, and sends the whole body again (what was captured, then the unsent
//! rest); the first attempt's body is abandoned (it ends short, so the client closes that
//! connection instead of reusing it); after the wait the 401 goes back to the caller.
//!
//! Before the replay, the rest of the refusal's body is read and dropped (at most 64 KiB,
//! waiting at most 100 ms, as OkHttp does before it gives up on a connection): an HTTP/1.1
//! client hands a connection back to its pool only once the response on it was read to its
//! end, so the replay goes out on the same connection instead of a new one. A larger or
//! slower body is dropped as it is (its connection closes).
//!
//! gRPC signals an expired token as `grpc-status: 16` (UNAUTHENTICATED) in the headers of a
//! trailers-only response; [`policy::default_trigger`] recognises it too.
//!
//! # Layer order
//!
//! ```text
//! ServiceBuilder::new()
//!     .layer(TraceLayer::new_for_http())        // sees the caller's request and the final response
//!     .layer(RetryLayer::new(policy))           // retries 5xx/transport errors; see `error::is_auth_failure`
//!     .layer(TimeoutLayer::new(per_try))        // one try: the send, a refresh and the replay;
//!                                               // cancelling a caller never cancels a refresh
//!     .layer(RefreshLayer::new(refresher))
//!     .layer(FollowRedirectLayer::new())        // inside: the token is attached once, and tower-http
//!                                               // drops it on a cross-origin redirect
//!                                               // (with a proof, e.g. DPoP: outside, see below)
//!     .layer(TimeoutLayer::new(per_attempt))    // each attempt, the replay included
//!     .service(client)
//! ```
//!
//! A timeout for the whole call, retries included, goes outside `RetryLayer`.
//!
//! Inside, a redirect is told apart by the URL of the final response: a chain of redirects
//! that ends at the URL the layer sent (to another origin and back) reads as that URL's own
//! answer, and a 401 there is recovered from as a first refusal, although the hop back came
//! without the token (dropped at the cross-origin hop). Such chains are rare; the caller then
//! gets [`UnauthorizedAfterRefresh`](error::UnauthorizedAfterRefresh) after one refresh and
//! one replay, never a loop. The reqwest middleware reads reqwest's own redirects the same way.
//!
//! If `FollowRedirectLayer` must sit outside this layer, every hop passes through this layer
//! and gets the token unless its origin is not allowed: by default only the first origin the
//! layer saw gets the token (see [`RefreshOptions::allowed_origins`]).
//!
//! With a proof of possession ([`RefreshLayer::proof`], such as DPoP's
//! [`Dpop`][dpop-Dpop]), `FollowRedirectLayer` goes **outside** this layer. Inside, it sends
//! every hop with the first hop's headers, and tower-http takes out only `Authorization`,
//! `Cookie` and `Proxy-Authorization` (and only on a cross-origin hop): the `DPoP` proof goes
//! again, made for the first hop's method and URI (`htm`, `htu`) with a `jti` the server has
//! seen, and the server refuses it (a cross-origin hop gets that proof without the token).
//! Outside, as above, each hop is a request of this layer's own: a hop to an allowed origin
//! gets the token and a proof of its own (its method and URI, a new `jti`, the nonce of its
//! origin), and a 401 on it is refreshed or replayed for as on any request; a hop to an origin
//! that is not allowed gets neither the token nor a proof.
//!
//! # Errors
//!
//! The service's error is [`BoxError`]. Downcast to tell the layer's failures apart; errors of
//! the inner service pass through unchanged:
//!
//! ```
//! use tower_auth_refresh::error::{RefreshFailed, RefreshRejected, SessionEnded, UnauthorizedAfterRefresh};
//! use tower_auth_refresh::BoxError;
//!
//! fn classify(err: &BoxError) -> &'static str {
//!     if err.is::<RefreshRejected>() || err.is::<SessionEnded>() {
//!         "credentials are gone: ask the user to log in again"
//!     } else if err.is::<RefreshFailed>() {
//!         "the identity provider is unavailable: try again later"
//!     } else if let Some(e) = err.downcast_ref::<UnauthorizedAfterRefresh>() {
//!         let _ = e.last().headers(); // e.g. WWW-Authenticate of the final refusal
//!         "a fresh token is not enough for this resource"
//!     } else {
//!         "the inner service failed"
//!     }
//! }
//! # let _ = classify;
//! ```
//!
//! # Security
//!
//! - No public type prints a token: [`Token`]'s `Debug` and `Display` redact the secret, and no
//!   error message or tracing event carries it (tests capture all output at TRACE level).
//! - The `Authorization` value is marked sensitive, so tower-http's `TraceLayer` and hyper print
//!   it as `Sensitive`.
//! - By default the token goes only to the origin of the first request; an allow-list or an
//!   explicit [`any_origin`](RefreshOptions::any_origin) changes that. Plain `http://` is refused
//!   except to loopback.
//! - The refresh-token grant of the [`oauth2`][mod-oauth2] module refuses a non-https token endpoint that
//!   is not loopback, and persists rotated refresh tokens before the new access token is used.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `oauth2` | yes | the RFC 6749 refresh-token and client-credentials refreshers ([`oauth2`][mod-oauth2]) |
//! | `follow-redirect` | yes | a 401 from a later hop of tower-http's `FollowRedirectLayer` is never refreshed or replayed |
//! | `reqwest` | no | a `reqwest-middleware` adapter ([`reqwest`][mod-reqwest]) sharing the layer's token, and a `reqwest::Client` as the OAuth 2.0 token client |
//! | `store` | no | a token set shared by several processes ([`store`][mod-store]): memory and file stores |
//! | `redis` | no | the Redis token store, for replicas on several hosts (implies `store`) |
//! | `dpop` | no | [`dpop::Dpop`][dpop-Dpop]: DPoP (RFC 9449) proofs, DPoP-bound OAuth 2.0 tokens |
//!
//! # Many principals
//!
//! [`keyed::KeyedRefreshLayer`] keeps one token per key (tenant, account, user), chosen from the
//! request, with the same guarantees per key and isolation between keys.
//!
//! (Without its feature, a module's name in the table links to the table itself.)
//!

// The feature-gated modules of the table: links where the module is built, the table otherwise
// (so that `cargo doc` with any set of features has no broken link).
#![cfg_attr(feature = "oauth2", doc = "[mod-oauth2]: crate::oauth2")]
#![cfg_attr(not(feature = "oauth2"), doc = "[mod-oauth2]: #feature-flags")]
#![cfg_attr(feature = "reqwest", doc = "[mod-reqwest]: crate::reqwest")]
#![cfg_attr(not(feature = "reqwest"), doc = "[mod-reqwest]: #feature-flags")]
#![cfg_attr(feature = "store", doc = "[mod-store]: crate::store")]
#![cfg_attr(not(feature = "store"), doc = "[mod-store]: #feature-flags")]
#![cfg_attr(feature = "dpop", doc = "[dpop-Dpop]: crate::dpop::Dpop")]
#![cfg_attr(not(feature = "dpop"), doc = "[dpop-Dpop]: #feature-flags")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
mod body;
mod cell;
mod clock;
mod config;
mod events;
mod handle;
mod head;
mod layer;
mod origin;
mod refresher;
mod replay;
mod retry_after;
mod service;
mod shared;
mod token;

#[cfg(feature = "dpop")]
#[cfg_attr(docsrs, doc(cfg(feature = "dpop")))]
pub mod dpop;
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
#[cfg(feature = "store")]
#[cfg_attr(docsrs, doc(cfg(feature = "store")))]
pub mod store;

pub use backoff::{Backoff, Cooldown, RefreshAhead};
pub use body::{DEFAULT_MAX_REPLAY_BODY, ReplayBody};
pub use clock::{Clock, TokioClock};
pub use config::{
    InvalidOrigin, NoReplay, RefreshOptions, ReplayMethods, RequestHead, RequestProof, TokenRequest,
};
pub use events::{Events, Lagged, RefreshEvent};
pub use handle::{TokenHandle, TokenState};
pub use layer::RefreshLayer;
pub use refresher::{
    ContextFn, RefreshContext, RefreshError, RefreshReason, TokenRefresher, context_fn, refresh_fn,
};
pub use retry_after::retry_after;
pub use service::Refresh;
pub use token::{Expiry, InvalidToken, Token};

/// The boxed error type of the layer's service, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The README's example compiles.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
