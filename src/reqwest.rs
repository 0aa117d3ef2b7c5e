//! A [`reqwest_middleware::Middleware`] with the same semantics as the tower layer (feature
//! `reqwest`).
//!
//! [`RefreshMiddleware`] is made from a [`RefreshLayer`] and shares its token cell: the layer,
//! every tower service it made, every middleware made from it and their
//! [`TokenHandle`]s see one token, one refresh in flight at a time and one generation counter.
//! A tower client and a reqwest client built from the same layer therefore never refresh twice
//! for the same stale token.
//!
//! # How a request goes through
//!
//! Exactly as in the tower layer (see the [crate documentation](crate)):
//!
//! 1. A request that already has an `Authorization` header, carries the
//!    [`TokenRequest`] marker (`.with_extension(TokenRequest)`), is for an origin outside
//!    [`RefreshLayer::allowed_origins`], or is sent from inside a refresher passes through
//!    untouched.
//! 2. After a terminal refresh failure the request fails fast with
//!    [`SessionEnded`], without a network call. With no usable token it waits for a refresh.
//! 3. `Authorization` is set (marked sensitive) and the request is sent. A request marked
//!    [`NoReplay`] stops here: a 401 is returned as it is.
//! 4. If the response asks for a refresh (by default a 401 not excluded by RFC 6750) and came
//!    from the request the middleware sent (not from a redirect target reqwest followed), the
//!    request gets a token newer than the one it was sent with (the one already there, the
//!    refresh in flight, or a new refresh) and is replayed **once**. A second refusal is
//!    [`UnauthorizedAfterRefresh`]; a replay answered by a redirect target is returned as it
//!    is, as a first send's.
//! 5. With a proof of possession, a refused proof (a DPoP nonce challenge) is answered by one
//!    replay with the same token and a new proof, no refresh. If that replay's token is
//!    refused (a server may check the proof before the token) and no refresh preceded it,
//!    that is the token's first refusal: the middleware refreshes for later requests and
//!    returns the 401 as it is (the request is not sent a third time).
//!
//! With a proof of possession (DPoP), build the reqwest client with
//! `redirect::Policy::none()` (or handle redirects above this middleware): reqwest follows a
//! redirect below the middleware and re-sends a same-host hop's headers, the first hop's
//! `DPoP` proof included (its method and URI, and a `jti` already used), which the server
//! refuses.
//!
//! A request's own reqwest `timeout` bounds each of its sends (the replay gets it again),
//! not the wait for a token before the first send nor the refresh before the replay: those
//! are bounded by the layer's [`refresh_timeout`](RefreshLayer::refresh_timeout) and
//! [`retries`](RefreshLayer::retries). To bound the whole call, wrap it in
//! `tokio::time::timeout`.
//!
//! A redirect is told by the response's URL: a response from another URL than the one this
//! middleware sent comes from a redirect target, and is never refreshed or replayed for.
//! Add middleware that rewrites URLs (a base URL, an API version in the query, a signer)
//! **before** this one (`ClientBuilder::with` runs them in order): below it, its rewrite
//! looks like a redirect, and its 401s are returned as they are.
//!
//! # Which bodies are replayed
//!
//! - Bodies that reqwest keeps in memory (`String`, `Vec<u8>`, `Bytes`, `&'static str`, JSON
//!   and form bodies, no body) up to [`RefreshLayer::max_replay_body`]: copied before the
//!   first send, with the method, URL, headers, version and timeout: what
//!   [`reqwest::Request::try_clone`] copies but the extensions a request brought from an
//!   `http::Request`, which reqwest does not send (a middleware below this one that turns the
//!   request back into an `http::Request` sees them on the first send only). The copy shares
//!   the body's bytes. A larger one is sent once, as in the tower
//!   layer.
//! - Streaming bodies (`reqwest::Body::wrap`, `wrap_stream`) not known to be larger than
//!   [`RefreshLayer::max_replay_body`]: kept as they stream out, as the tower layer does; one
//!   that ended within the cap is replayed.
//! - A streaming body known to be larger than the cap, or one that went past it or failed
//!   while streaming, is sent once. If that send is refused, the caller gets the 401
//!   response, after the refresh has run, so a retry by the caller goes out with the new
//!   token. Such a request never fails before its first send for being impossible to clone.
//!
//! # Errors
//!
//! The middleware's own failures are [`reqwest_middleware::Error::Middleware`] wrapping one of
//! the types of [`error`](crate::error): [`RefreshRejected`], [`RefreshFailed`],
//! [`SessionEnded`] or [`UnauthorizedAfterRefresh`] for the token's fate, and
//! [`InsecureTransport`] (the token would go over plain HTTP to a host that is not loopback)
//! or [`ProofFailed`] (a proof of possession could not be made) for a request the middleware
//! would not send (a request sent from inside the refresher passes through untouched).
//! Downcast to tell them apart. Errors of the client and of later middleware pass through
//! unchanged.
//!
//! The markers [`NoReplay`] and [`TokenRequest`] are read from reqwest-middleware's
//! extensions (`RequestBuilder::with_extension`): reqwest keeps a `reqwest::Request`'s own
//! extensions private, so a marker put into an `http::Request` converted into a
//! `reqwest::Request` is not seen.
//!
//! ```
//! use reqwest_middleware::Error;
//! use tower_auth_refresh::error::{
//!     is_auth_failure, RefreshRejected, SessionEnded, UnauthorizedAfterRefresh,
//! };
//!
//! fn explain(err: &Error) -> &'static str {
//!     let Error::Middleware(e) = err else {
//!         return "a network error";
//!     };
//!     if e.is::<RefreshRejected>() || e.is::<SessionEnded>() {
//!         "log in again"
//!     } else if let Some(twice) = e.downcast_ref::<UnauthorizedAfterRefresh>() {
//!         let _ = twice.last().headers(); // the final `WWW-Authenticate`, for one
//!         "the new token is not enough for this resource"
//!     } else if is_auth_failure(&**e) {
//!         "another failure of the refresh layer"
//!     } else {
//!         "another middleware's error"
//!     }
//! }
//! # let _ = explain;
//! ```
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
//!
//! let layer = RefreshLayer::new(refresh_fn(|_stale| async {
//!     Ok::<_, RefreshError>(Token::bearer("fresh")?.with_expires_in(Duration::from_secs(3600)))
//! }));
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(layer.reqwest_middleware())
//!     .build();
//! // `client.get(...).send().await` now carries the token and refreshes it when needed.
//! # let _ = client;
//! ```

//!
//! [`TokenRequest`]: crate::TokenRequest
//! [`NoReplay`]: crate::NoReplay
//! [`SessionEnded`]: crate::error::SessionEnded
//! [`RefreshRejected`]: crate::error::RefreshRejected
//! [`RefreshFailed`]: crate::error::RefreshFailed
//! [`UnauthorizedAfterRefresh`]: crate::error::UnauthorizedAfterRefresh
//! [`InsecureTransport`]: crate::error::InsecureTransport
//! [`ProofFailed`]: crate::error::ProofFailed

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;

use http::Extensions;
use http::header::AUTHORIZATION;
use http_body::Body as _;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use crate::body::{ReplayBody, ReplaySource};
use crate::handle::TokenHandle;
use crate::head::ResponseHead;
use crate::layer::RefreshLayer;
use crate::replay::{self, Admit, Recovery, Sent, Verdict};
use crate::shared::Shared;

/// A [`reqwest_middleware::Middleware`] that attaches the token of a [`RefreshLayer`],
/// refreshes it once for all concurrent requests that need it, and replays a rejected request
/// once. See the [module documentation](self) for the details.
///
/// Made by [`RefreshMiddleware::from_layer`] or [`RefreshLayer::reqwest_middleware`]. Clones
/// share the token cell.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::reqwest::RefreshMiddleware;
/// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
///
/// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
/// let layer = RefreshLayer::new(refresher)
///     .initial_token(Token::bearer("from-login")?);
/// let middleware = RefreshMiddleware::from_layer(&layer);
///
/// // Debug never shows the token.
/// assert!(!format!("{middleware:?}").contains("from-login"));
///
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(middleware)
///     .build();
/// # let _ = client;
/// # Ok::<(), tower_auth_refresh::InvalidToken>(())
/// ```
#[derive(Clone)]
pub struct RefreshMiddleware {
    shared: Shared,
}

impl RefreshMiddleware {
    /// A middleware sharing `layer`'s token cell and handle, with the layer's options as they
    /// are now (options are a value: setting them on the layer afterwards does not reach this
    /// middleware).
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::reqwest::RefreshMiddleware;
    /// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
    ///
    /// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
    /// let layer = RefreshLayer::new(refresher);
    /// let middleware = RefreshMiddleware::from_layer(&layer);
    /// layer.token_handle().set_token(Token::bearer("from-login")?);
    /// assert_eq!(middleware.token_handle().state().generation(), 1);
    /// # Ok::<(), tower_auth_refresh::InvalidToken>(())
    /// ```
    pub fn from_layer(layer: &RefreshLayer) -> Self {
        Self {
            shared: layer.shared().clone(),
        }
    }

    /// The handle to the shared token (the same as [`RefreshLayer::token_handle`]).
    pub fn token_handle(&self) -> TokenHandle {
        TokenHandle::new(self.shared.clone())
    }

    /// One request through the middleware: the same protocol as the tower layer
    /// ([`replay`](crate::replay) steps), with reqwest's types.
    ///
    /// One path for every request; the wait for a token and the recovery after a refusal are
    /// boxed futures of their own, so the future every request allocates stays small.
    ///
    /// Not an `async fn`: the request is captured once by the `async move` block (an
    /// `async fn` keeps a second copy of every argument). With the admission's and the first
    /// response's locals scoped to blocks that end before the next await, the future holds
    /// the replay copy itself (no allocation of its own) and stays under the allocator's
    /// small-size limit of 1,032 bytes: 960 bytes (`-Zprint-type-sizes`; it was 808 with the
    /// copy boxed apart, 1,088 with the copy inline and the locals unscoped).
    #[allow(clippy::manual_async_fn)]
    fn send<'a>(
        &'a self,
        mut req: Request,
        extensions: &'a mut Extensions,
        next: Next<'a>,
    ) -> impl Future<Output = reqwest_middleware::Result<Response>> + Send + 'a {
        async move {
            let shared = &self.shared;
            let options = shared.options();
            // Everything up to the recovery lives in this block: the recovery, awaited after
            // it, keeps nothing else in the future (the first response, the copy now in the
            // recovery's own allocation).
            let recovery = {
                // The admission's locals (the 176-byte decision, the header) live in this block
                // only: held in the outer scope, they would stay in the future through every
                // later await, and the future every request allocates would outgrow the
                // allocator's small-size limit once the replay copy is kept in it.
                let (uri, sent, method, copy, token) = {
                    // An attach rule or a proof sees the request's `http::Uri`; without them
                    // the origin check reads the URL's text, and `uri` is never looked at (no
                    // parse per request).
                    let (uri, decision) = if options.attach_when.is_some()
                        || options.proof.is_some()
                    {
                        // Parsed in a statement of its own: a parse error is not kept in the
                        // future through the send below.
                        let uri: Option<Box<http::Uri>> =
                            req.url().as_str().parse().ok().map(Box::new);
                        // Not representable as an `http::Uri`: not ours to authenticate.
                        let Some(uri) = uri else {
                            return next.run(req, extensions).await;
                        };
                        let decision =
                            replay::admit(shared, req.method(), &uri, req.headers(), extensions);
                        (Some(uri), decision)
                    } else {
                        let url = req.url();
                        let decision = replay::admit_url(
                            shared,
                            url.scheme(),
                            url.authority(),
                            req.headers(),
                            extensions,
                        );
                        (None, decision)
                    };
                    let (uri, sent, header) = match decision {
                        Admit::Untouched => return next.run(req, extensions).await,
                        Admit::Fail(failure) => return Err(failure.into_reqwest()),
                        Admit::Send { ticket, header } => {
                            (uri, Sent::new(ticket, false, extensions), header)
                        }
                        Admit::Wait { ticket, expired } => {
                            // Boxed: most requests never wait, and the wait is a large future.
                            let waited = Box::pin(replay::wait_for_token(shared, ticket, expired))
                                .await
                                .map_err(|f| f.into_reqwest())?;
                            match waited {
                                // The token the layer held, sent after its refresh failed:
                                // its refusal is a first one (`Granted::refreshed`).
                                Some(granted) => (
                                    uri,
                                    Sent::new(granted.ticket, granted.refreshed, extensions),
                                    granted.header,
                                ),
                                // Anonymous: no token can be had; send it as it is.
                                None => return next.run(req, extensions).await,
                            }
                        }
                    };
                    let method = req.method().clone();
                    // After a wait a refusal is final (no second refresh): only a refused proof (a
                    // nonce challenge) replays, so only a layer with a proof keeps a copy then.
                    // A request sent with the held token after a failed refresh did not get a
                    // token from a refresh (`waited` is false): it keeps one as any other.
                    let replays = if sent.waited {
                        shared.options().proof.is_some()
                    } else {
                        // A refused proof (a nonce challenge) replays whatever the method,
                        // as in the tower layer; a refused token only if the method may be.
                        shared.options().may_replay(&method) || shared.options().proof.is_some()
                    };
                    // The copy for the replay is taken before the token goes in (the replay
                    // sets a newer one): a request without headers of its own then clones
                    // without allocating a map. It is kept in this future, not boxed apart.
                    let copy = if !sent.no_replay && replays {
                        Copy::prepare(&mut req, shared.options().max_replay_body)
                    } else {
                        None
                    };
                    let token = shared.options().proof.is_some().then(|| header.clone());
                    req.headers_mut().insert(AUTHORIZATION, header);
                    (uri, sent, method, copy, token)
                };
                replay::prove(shared, &method, target(&uri), req.headers_mut())
                    .map_err(|f| f.into_reqwest())?;
                if sent.no_replay {
                    return next.run(req, extensions).await;
                }
                let sent_url = SentUrl::keep(&req, &copy);
                let first = next.clone().run(req, &mut *extensions).await?;
                if !replay::interesting(shared, first.status(), first.headers()) {
                    return Ok(first);
                }
                let redirected = sent_url.redirected(&copy, &first);
                let verdict = replay::judge(
                    shared,
                    sent,
                    target(&uri),
                    first.status(),
                    first.headers(),
                    redirected,
                );
                if verdict == Verdict::Final {
                    return Ok(first);
                }
                let refused = Refused {
                    method,
                    uri,
                    sent,
                    copy,
                    token,
                };
                Box::pin(refused.recover(shared, verdict, first, extensions, next))
            };
            recovery.await
        }
    }
}

/// The request's `http::Uri` where a proof or an attach rule needs it; `/` (never looked at)
/// otherwise. Boxed where kept: every request's future holds it.
fn target(uri: &Option<Box<http::Uri>>) -> &http::Uri {
    uri.as_deref().unwrap_or_else(|| replay::no_uri())
}

/// The URL a request was sent to, to tell its response from a later redirect hop's: the copy
/// kept for the replay has it; a request without a copy keeps a clone.
struct SentUrl(Option<Box<reqwest::Url>>);

impl SentUrl {
    fn keep(req: &Request, copy: &Option<Copy>) -> Self {
        Self(copy.is_none().then(|| Box::new(req.url().clone())))
    }

    /// Whether `res` came from another URL than the one sent: a redirect reqwest followed.
    /// The fragment is never sent (a response's URL has none): it is not compared.
    fn redirected(&self, copy: &Option<Copy>, res: &Response) -> bool {
        let sent = match copy {
            Some(copy) => copy.url(),
            None => self.0.as_deref().expect("kept without a copy"),
        };
        redirected(sent, res)
    }
}

/// Whether `res`, the response to a request sent to `sent`, came from another URL: a
/// redirect reqwest followed. The fragment is never sent (a response's URL has none): it is
/// not compared.
fn redirected(sent: &reqwest::Url, res: &Response) -> bool {
    if sent.fragment().is_none() {
        // The common case: one comparison of the two URLs' text.
        return sent != res.url();
    }
    without_fragment(sent) != without_fragment(res.url())
}

fn without_fragment(url: &reqwest::Url) -> &str {
    let text = url.as_str();
    // A URL's text has at most one `#`, where its fragment starts.
    text.split_once('#').map_or(text, |(before, _)| before)
}

/// A request whose first response was not final: what its recovery needs.
struct Refused {
    method: http::Method,
    uri: Option<Box<http::Uri>>,
    sent: Sent,
    copy: Option<Copy>,
    /// The `Authorization` it was sent with, kept when the layer has a proof (a new proof
    /// goes with the same token).
    token: Option<http::HeaderValue>,
}

impl Refused {
    async fn recover(
        self,
        shared: &Shared,
        verdict: Verdict,
        first: Response,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let Self {
            method,
            uri,
            sent,
            copy,
            token,
        } = self;
        let wait = shared.options().replay_body_wait;
        match verdict {
            Verdict::Final => return Ok(first),
            Verdict::RefusedAfterRefresh => return refused_again(shared, None, first, false).await,
            Verdict::NewProof => {
                // The proof was refused (a nonce challenge): the same token, a new proof, once.
                let again = match (copy, token) {
                    (Some(copy), Some(token)) => copy.into_request(wait).await.map(|r| (r, token)),
                    _ => None,
                };
                let Some((mut again, token)) = again else {
                    return Ok(first);
                };
                let first_head = ResponseHead::from_reqwest_ref(&first);
                crate::head::drain(http::Response::from(first).into_body()).await;
                again.headers_mut().insert(AUTHORIZATION, token);
                replay::prove(shared, &method, target(&uri), again.headers_mut())
                    .map_err(|f| f.into_reqwest())?;
                let sent_url = again.url().clone();
                let second = next.run(again, extensions).await?;
                if redirected(&sent_url, &second) {
                    return Ok(second);
                }
                let challenged =
                    replay::observe(shared, target(&uri), second.status(), second.headers());
                // As in the tower layer: a refusal of the token, no refresh before it, is
                // refreshed for later requests and returned; never a third send.
                return match replay::after_new_proof(
                    shared,
                    sent,
                    challenged,
                    second.status(),
                    second.headers(),
                ) {
                    Verdict::Final => Ok(second),
                    Verdict::NewProof => {
                        refused_again(shared, Some(first_head), second, true).await
                    }
                    Verdict::RefusedAfterRefresh => {
                        refused_again(shared, Some(first_head), second, false).await
                    }
                    Verdict::Recover => {
                        let refused = ResponseHead::from_reqwest_ref(&second);
                        replay::refresh_for_later(shared, sent, &refused).await;
                        Ok(second)
                    }
                };
            }
            Verdict::Recover => {}
        }
        let first_head = ResponseHead::from_reqwest_ref(&first);
        let replayable = async {
            match copy {
                Some(copy) => copy.into_request(wait).await,
                None => None,
            }
        };
        match replay::recover(shared, sent, &first_head, &method, replayable).await {
            Recovery::ReturnFirst => Ok(first),
            Recovery::Fail(failure) => Err(failure.into_reqwest()),
            Recovery::Replay(mut again, ticket, header) => {
                crate::head::drain(http::Response::from(first).into_body()).await;
                again.headers_mut().insert(AUTHORIZATION, header);
                replay::prove(shared, &method, target(&uri), again.headers_mut())
                    .map_err(|f| f.into_reqwest())?;
                let sent = again.url().clone();
                let second = next.run(again, extensions).await?;
                // A redirect target's answer is returned as it is, as for a first send (the
                // replay was accepted by the server it went to).
                if redirected(&sent, &second) {
                    return Ok(second);
                }
                // A challenge of the replay's proof is a second refusal too, as in the tower
                // layer: one replay, never more.
                let challenged =
                    replay::observe(shared, target(&uri), second.status(), second.headers());
                if challenged
                    || replay::refused_again(shared, ticket, second.status(), second.headers())
                {
                    return refused_again(shared, Some(first_head), second, false).await;
                }
                Ok(second)
            }
        }
    }
}

/// A refusal after a refresh: the response itself, or the typed error (with the first bytes
/// of the refusal's body).
async fn refused_again(
    shared: &Shared,
    first: Option<ResponseHead>,
    last: Response,
    proof_refused: bool,
) -> reqwest_middleware::Result<Response> {
    if shared.options().unauthorized_as_response {
        return Ok(last);
    }
    let head = ResponseHead::from_reqwest_ref(&last);
    let body = crate::head::body_prefix(http::Response::from(last).into_body()).await;
    Err(replay::twice(first, head.with_body(body), proof_refused).into_reqwest())
}

impl RefreshLayer {
    /// A [`reqwest_middleware::Middleware`] sharing this layer's token cell and handle (same
    /// as [`RefreshMiddleware::from_layer`]).
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
    ///
    /// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
    /// let layer = RefreshLayer::new(refresher);
    /// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
    ///     .with(layer.reqwest_middleware())
    ///     .build();
    /// # let _ = client;
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
    pub fn reqwest_middleware(&self) -> RefreshMiddleware {
        RefreshMiddleware::from_layer(self)
    }
}

impl fmt::Debug for RefreshMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshMiddleware")
            .field("cell", &self.shared.cell())
            .field("options", &self.shared.options())
            .finish()
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// Written out instead of `#[async_trait]`, which this crate does not depend on; the signature
// is the one `async_trait` generates for `Middleware::handle`.
impl Middleware for RefreshMiddleware {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        req: Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> BoxFuture<'async_trait, reqwest_middleware::Result<Response>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.send(req, extensions, next))
    }
}

/// What a request keeps to replay itself once.
enum Copy {
    /// A full copy made before the first send (the body is in memory).
    Whole(Request),
    /// The request without its body, and the body captured as it streams out.
    Captured {
        head: Request,
        body: ReplaySource<reqwest::Body>,
    },
}

impl Copy {
    /// Prepares the replay of `req` before its first send, or `None` when its body cannot be
    /// replayed (a stream of unknown size or larger than `cap`).
    fn prepare(req: &mut Request, cap: usize) -> Option<Self> {
        match req.body().map(reqwest::Body::as_bytes) {
            None => Some(Self::Whole(head_of(req))),
            // In memory: both requests share its bytes, up to the cap, as in the tower layer.
            Some(Some(bytes)) => {
                if bytes.len() > cap {
                    return None;
                }
                let body = share(req.body_mut().as_mut()?);
                let mut copy = head_of(req);
                *copy.body_mut() = Some(body);
                Some(Self::Whole(copy))
            }
            // A stream: kept as it goes out.
            Some(None) => {
                let body = req.body_mut().take()?;
                let head = head_of(req);
                let (body, source) = ReplayBody::new(body, cap);
                *req.body_mut() = Some(reqwest::Body::wrap(body));
                Some(Self::Captured {
                    head,
                    body: source?,
                })
            }
        }
    }

    /// The URL of the request.
    fn url(&self) -> &reqwest::Url {
        match self {
            Self::Whole(req) | Self::Captured { head: req, .. } => req.url(),
        }
    }

    /// The request to replay, if its body is complete (waiting up to `patience` for the
    /// first send to let go of it).
    async fn into_request(self, patience: Duration) -> Option<Request> {
        match self {
            Self::Whole(req) => Some(req),
            Self::Captured { mut head, body } => {
                body.settle(patience).await;
                *head.body_mut() = Some(reqwest::Body::wrap(body.take()?));
                Some(head)
            }
        }
    }
}

/// A copy of what reqwest sends of `req` but its body: method, URL, headers, version and
/// timeout.
///
/// Made field by field rather than with `Request::try_clone`, which in reqwest 0.13 builds an
/// extensions map for the copy's timeout and drops it again: three allocations and their
/// frees, about 790 of the 2,720 instructions per GET this middleware added to a static
/// header (`benches/reqwest_e2e.rs`, BENCHMARKS.md).
/// What `try_clone` copies besides, the extensions a request brought from an `http::Request`,
/// reqwest 0.13 does not send (of its own extensions it reads only the timeout, copied here);
/// a middleware below this one that turns the request back into an `http::Request` sees them
/// on the first send only.
fn head_of(req: &Request) -> Request {
    let mut copy = Request::new(req.method().clone(), req.url().clone());
    *copy.headers_mut() = req.headers().clone();
    *copy.version_mut() = req.version();
    // Only a timeout that is set: setting `None` would build the map for nothing.
    if let Some(&timeout) = req.timeout() {
        *copy.timeout_mut() = Some(timeout);
    }
    copy
}

/// A second body with the bytes of `body`, an in-memory one, sharing them (what reqwest's own,
/// crate-private, `Body::try_clone` does).
fn share(body: &mut reqwest::Body) -> reqwest::Body {
    let len = body.as_bytes().map_or(0, <[u8]>::len);
    // An in-memory body gives all its bytes in its first frame, at once, without a waker.
    let mut cx = Context::from_waker(Waker::noop());
    let first = match Pin::new(&mut *body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    };
    let bytes = whole(first, len, body.as_bytes());
    *body = reqwest::Body::from(bytes.clone());
    reqwest::Body::from(bytes)
}

/// The bytes of an in-memory body of `len` bytes, from its first frame and what it holds
/// after that frame was read: the frame itself when it is the whole body (reqwest 0.13's way),
/// the two together otherwise.
fn whole(first: Bytes, len: usize, rest: Option<&[u8]>) -> Bytes {
    if first.len() == len {
        return first;
    }
    Bytes::from([first.as_ref(), rest.unwrap_or_default()].concat())
}

impl ResponseHead {
    /// The head of a reqwest response.
    pub(crate) fn from_reqwest_ref(res: &Response) -> Self {
        Self::new(res.status(), res.version(), res.headers().clone())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::BodyExt;

    use super::{head_of, share, whole};

    async fn bytes_of(body: reqwest::Body) -> Bytes {
        body.collect().await.unwrap().to_bytes()
    }

    /// Both bodies give the bytes the original had, for every kind of in-memory body; the
    /// copy shares them instead of copying.
    #[tokio::test]
    async fn an_in_memory_body_is_shared_whole() {
        let large = vec![7u8; 64 * 1024];
        let bodies: Vec<(reqwest::Body, Vec<u8>)> = vec![
            (reqwest::Body::from("static text"), b"static text".to_vec()),
            (
                reqwest::Body::from(String::from("a string")),
                b"a string".to_vec(),
            ),
            (reqwest::Body::from(large.clone()), large),
            (
                reqwest::Body::from(Bytes::from_static(b"\x00\xff")),
                b"\x00\xff".to_vec(),
            ),
            (reqwest::Body::from(""), Vec::new()),
            (reqwest::Body::default(), Vec::new()),
        ];
        for (mut body, want) in bodies {
            let copy = share(&mut body);
            assert_eq!(body.as_bytes(), Some(&want[..]));
            assert_eq!(copy.as_bytes(), Some(&want[..]));
            if !want.is_empty() {
                assert_eq!(
                    body.as_bytes().unwrap().as_ptr(),
                    copy.as_bytes().unwrap().as_ptr()
                );
            }
            assert_eq!(bytes_of(body).await, want);
            assert_eq!(bytes_of(copy).await, want);
        }
    }

    /// A body given in pieces loses nothing: the first piece and the rest are put together.
    #[test]
    fn a_body_given_in_pieces_is_put_together() {
        let first = Bytes::from_static(b"abcd");
        let same = whole(first.clone(), 4, Some(b""));
        assert_eq!(same.as_ptr(), first.as_ptr());
        assert_eq!(whole(Bytes::from_static(b"ab"), 5, Some(b"cde")), "abcde");
        assert_eq!(whole(Bytes::new(), 3, Some(b"xyz")), "xyz");
    }

    /// The copy has what `try_clone` gives of every setting reqwest sends: method, URL,
    /// headers, version and timeout (set or not); only the body is left to the caller.
    #[test]
    fn the_head_copy_matches_try_clone() {
        let client = reqwest::Client::new();
        let requests = [
            client
                .patch("http://127.0.0.1:1/a?b=c#d")
                .header("x-one", "1")
                .header("x-one", "2")
                .basic_auth("user", Some("pw"))
                .version(http::Version::HTTP_10)
                .timeout(Duration::from_millis(1234))
                .build()
                .unwrap(),
            client.get("http://127.0.0.1:1/").build().unwrap(),
        ];
        for req in requests {
            let copy = head_of(&req);
            let cloned = req.try_clone().unwrap();
            assert_eq!(copy.method(), cloned.method());
            assert_eq!(copy.url(), cloned.url());
            assert_eq!(copy.headers(), cloned.headers());
            assert_eq!(copy.version(), cloned.version());
            assert_eq!(copy.timeout(), cloned.timeout());
            assert!(copy.body().is_none());
        }
    }
}
