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
//!   first send, with the method, URL, headers (every value, in order, still marked
//!   sensitive where it was), version and timeout: what [`reqwest::Request::try_clone`]
//!   copies but the extensions a request brought from an `http::Request`, which reqwest does
//!   not send (a middleware below this one that turns the request back into an
//!   `http::Request` sees them on the first send only). The copy shares the body's bytes. A
//!   larger one is sent once, as in the tower layer.
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
use crate::head::{ResponseHead, read_records, records_len, write_records};
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
    /// the replay copy itself (with a short head's text: no allocation of its own) and stays
    /// under the allocator's small-size limit of 1,032 bytes: 872 bytes
    /// (`-Zprint-type-sizes`; 784 with the copy's text always allocated apart, 960 when the
    /// copy was a whole `reqwest::Request`, 808 with that copy boxed apart, 1,088 with it
    /// inline and the locals unscoped).
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
        match (copy, self.0.as_deref()) {
            (Some(copy), _) => copy.redirected(res),
            (None, Some(sent)) => redirected(sent, res),
            // Never: `keep` keeps a URL whenever there is no copy.
            (None, None) => true,
        }
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
    if url.fragment().is_none() {
        return text;
    }
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
                    (Some(copy), Some(token)) => copy
                        .into_request(&method, first.url().clone(), wait)
                        .await
                        .map(|r| (r, token)),
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
                Some(copy) => copy.into_request(&method, first.url().clone(), wait).await,
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
    /// A copy made before the first send (the body is in memory; `None` without one).
    Whole {
        head: Head,
        body: Option<reqwest::Body>,
    },
    /// The request's head, and the body captured as it streams out.
    Captured {
        head: Head,
        body: ReplaySource<reqwest::Body>,
    },
}

impl Copy {
    /// Prepares the replay of `req` before its first send, or `None` when its body cannot be
    /// replayed (a stream of unknown size or larger than `cap`).
    fn prepare(req: &mut Request, cap: usize) -> Option<Self> {
        match req.body().map(reqwest::Body::as_bytes) {
            None => Some(Self::Whole {
                head: Head::of(req),
                body: None,
            }),
            // In memory: both requests share its bytes, up to the cap, as in the tower layer.
            Some(Some(bytes)) => {
                if bytes.len() > cap {
                    return None;
                }
                let body = share(req.body_mut().as_mut()?);
                Some(Self::Whole {
                    head: Head::of(req),
                    body: Some(body),
                })
            }
            // A stream: kept as it goes out.
            Some(None) => {
                let body = req.body_mut().take()?;
                let head = Head::of(req);
                let (body, source) = ReplayBody::new(body, cap);
                *req.body_mut() = Some(reqwest::Body::wrap(body));
                Some(Self::Captured {
                    head,
                    body: source?,
                })
            }
        }
    }

    /// Whether `res`, the response to the first send, came from another URL than this
    /// request's: a redirect reqwest followed.
    fn redirected(&self, res: &Response) -> bool {
        let (Self::Whole { head, .. } | Self::Captured { head, .. }) = self;
        head.url() != without_fragment(res.url())
    }

    /// The request to replay, sent to `url` (the first response's: see [`Head`]), if its
    /// body is complete (waiting up to `patience` for the first send to let go of it) and its
    /// head could be rebuilt.
    async fn into_request(
        self,
        method: &http::Method,
        url: reqwest::Url,
        patience: Duration,
    ) -> Option<Request> {
        let (head, body) = match self {
            Self::Whole { head, body } => (head, body),
            Self::Captured { head, body } => {
                body.settle(patience).await;
                (head, Some(reqwest::Body::wrap(body.take()?)))
            }
        };
        let mut req = head.into_request(method.clone(), url)?;
        *req.body_mut() = body;
        Some(req)
    }
}

/// What reqwest sends of a request but its method and body, kept for its replay: the URL's
/// text, the headers, the version and (if set) the timeout.
///
/// The URL's text and every header's name and value are written one after the other into
/// one buffer, kept in the request's future itself when it is short (up to 96 bytes: a URL
/// and a header or two) and allocated once otherwise: a clone of the URL and of the header
/// map would take at least three allocations
/// (the URL's string, the map's two tables) and one more for each header value not yet shared
/// (a value made from a `&str` shares its bytes only once cloned), and as many frees; with
/// their copies they were about 1,300 of the 2,400 instructions this middleware added per
/// POST to a static header (`benches/reqwest_e2e.rs`, BENCHMARKS.md). The replay, the rare
/// path, builds the map again (the values checked again, each keeping whether it is
/// sensitive) and takes the first response's URL: a replay follows only a response that came
/// from the URL this request was sent to ([`Copy::redirected`]), which is the same URL but
/// the fragment (never sent); the request's fragment is put back.
///
/// What `Request::try_clone` copies besides, the extensions a request brought from an
/// `http::Request`, reqwest 0.13 does not send (of its own extensions it reads only the
/// timeout, copied here); a middleware below this one that turns the request back into an
/// `http::Request` sees them on the first send only.
struct Head {
    /// The URL's text, then the headers in the map's order as
    /// [`write_records`](crate::head::write_records) writes them (the tower layer's
    /// [`RequestCopy`](crate::head::RequestCopy) keeps them the same way).
    text: Text,
    /// Where the URL's text ends in `text`.
    url_len: usize,
    /// Where the URL's text before its fragment (what is sent) ends.
    sent_len: usize,
    version: http::Version,
    timeout: Option<Duration>,
}

/// Bytes of a [`Head::text`] kept in the request's future itself; a longer one is allocated
/// apart. Every byte here is moved with the future (a larger one cost a POST more in moves
/// than it saved in allocations: `benches/reqwest_e2e.rs`, 160 bytes against 96).
const INLINE: usize = 96;

/// [`Head::text`]: in the future itself when short (no allocation), on the heap otherwise.
enum Text {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Text {
    /// `len` bytes, written by `fill`.
    #[inline(always)]
    fn with(len: usize, fill: impl FnOnce(&mut [u8])) -> Self {
        match u8::try_from(len) {
            Ok(short) if len <= INLINE => {
                let mut bytes = [0; INLINE];
                if let Some(dst) = bytes.get_mut(..len) {
                    fill(dst);
                }
                Self::Inline { len: short, bytes }
            }
            _ => {
                let mut bytes = vec![0; len].into_boxed_slice();
                fill(&mut bytes);
                Self::Heap(bytes)
            }
        }
    }
}

impl std::ops::Deref for Text {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Self::Heap(bytes) => bytes,
        }
    }
}

#[cfg(test)]
impl From<&[u8]> for Text {
    fn from(bytes: &[u8]) -> Self {
        Self::with(bytes.len(), |dst| dst.copy_from_slice(bytes))
    }
}

/// Writes into a slice from its start on (what does not fit is left out; [`Head::of`]
/// sizes the slice to what it writes).
struct Cursor<'a>(&'a mut [u8]);

impl Cursor<'_> {
    #[inline(always)]
    fn put(&mut self, src: &[u8]) {
        let dst = std::mem::take(&mut self.0);
        if let Some((head, rest)) = dst.split_at_mut_checked(src.len()) {
            head.copy_from_slice(src);
            self.0 = rest;
        }
    }
}

impl Head {
    fn of(req: &Request) -> Self {
        let url = req.url().as_str();
        let headers = req.headers();
        let len = url.len() + records_len(headers.iter());
        let text = Text::with(len, |dst| {
            let mut at = Cursor(dst);
            at.put(url.as_bytes());
            write_records(headers.iter(), |bytes| at.put(bytes));
        });
        Self {
            text,
            url_len: url.len(),
            sent_len: without_fragment(req.url()).len(),
            version: req.version(),
            timeout: req.timeout().copied(),
        }
    }

    /// The URL's text as sent (without its fragment).
    fn url(&self) -> &str {
        self.text_of(..self.sent_len)
    }

    /// The URL's fragment, if it has one.
    fn fragment(&self) -> Option<&str> {
        (self.url_len > self.sent_len).then(|| self.text_of(self.sent_len + 1..self.url_len))
    }

    /// Part of the URL's text: written from a `&str` and cut at its ends or after its `#`,
    /// it is never out of bounds or split inside a character.
    fn text_of(&self, range: impl std::slice::SliceIndex<[u8], Output = [u8]>) -> &str {
        self.text
            .get(range)
            .and_then(|url| std::str::from_utf8(url).ok())
            .unwrap_or_default()
    }

    /// The request again, without a body, sent to `url` with the request's fragment; `None`
    /// if a header cannot be made again. Every `HeaderValue` safe code can make passes
    /// `HeaderValue::from_bytes` again; only one made with the `unsafe`
    /// `from_maybe_shared_unchecked` in breach of its contract (bytes a header value may not
    /// hold) does not, and its request is then not replayed: the caller gets the first
    /// response, after the refresh.
    fn into_request(self, method: http::Method, mut url: reqwest::Url) -> Option<Request> {
        if url.fragment() != self.fragment() {
            url.set_fragment(self.fragment());
        }
        let mut req = Request::new(method, url);
        read_records(self.text.get(self.url_len..)?, req.headers_mut())?;
        *req.version_mut() = self.version;
        // Only a timeout that is set: setting `None` would build reqwest's extensions map
        // for nothing.
        if let Some(timeout) = self.timeout {
            *req.timeout_mut() = Some(timeout);
        }
        Some(req)
    }
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

    use http::HeaderValue;

    use super::{Head, INLINE, Text, share, whole};
    use crate::head::HEADER_PREFIX;

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
    /// headers (every value of a name, in order, sensitive or not, any bytes a value may
    /// hold), version and timeout (set or not); only the body is left to the caller.
    #[test]
    fn the_head_copy_matches_try_clone() {
        let client = reqwest::Client::new();
        let mut secret = HeaderValue::from_static("key-0123");
        secret.set_sensitive(true);
        let requests = [
            client
                .patch("http://127.0.0.1:1/a?b=c")
                .header("x-one", "1")
                .header(
                    "X-Two",
                    HeaderValue::from_bytes(b"caf\xc3\xa9 \x80\xff").unwrap(),
                )
                .header("x-one", "2")
                .header("x-api-key", secret)
                .header("x-empty", "")
                .basic_auth("user", Some("pw"))
                .version(http::Version::HTTP_10)
                .timeout(Duration::from_millis(1234))
                .build()
                .unwrap(),
            client.get("http://127.0.0.1:1/").build().unwrap(),
            client
                .post("http://[::1]:8080/p%20q/?x=%2F#frag")
                .header("content-type", "application/json")
                .build()
                .unwrap(),
        ];
        let mut kinds = Vec::new();
        for req in requests {
            let head = Head::of(&req);
            // Kept in the future up to `INLINE` bytes, allocated beyond.
            let inline = matches!(head.text, Text::Inline { .. });
            assert_eq!(inline, head.text.len() <= INLINE);
            kinds.push(inline);
            assert_eq!(head.url(), super::without_fragment(req.url()));
            assert_eq!(head.fragment(), req.url().fragment());
            // The replay takes the first response's URL, which has no fragment.
            let mut sent = req.url().clone();
            sent.set_fragment(None);
            let copy = head.into_request(req.method().clone(), sent).unwrap();
            let cloned = req.try_clone().unwrap();
            assert_eq!(copy.method(), cloned.method());
            assert_eq!(copy.url(), cloned.url());
            assert_eq!(copy.headers(), cloned.headers());
            let order = |r: &reqwest::Request| -> Vec<_> {
                r.headers()
                    .iter()
                    .map(|(n, v)| (n.clone(), v.clone(), v.is_sensitive()))
                    .collect()
            };
            assert_eq!(order(&copy), order(&cloned));
            assert_eq!(copy.version(), cloned.version());
            assert_eq!(copy.timeout(), cloned.timeout());
            assert!(copy.body().is_none());
        }
        assert_eq!(kinds, [false, true, true]);
    }

    /// A head whose text was cut or corrupted never panics and never makes up a header: cut
    /// between two records it gives exactly the headers before the cut, in order; cut inside
    /// a record, or with a URL length past its end, it gives no request (the records' own
    /// lengths: `head::tests`).
    #[test]
    fn a_cut_or_corrupt_head_keeps_whole_records_only_and_never_panics() {
        let req = reqwest::Client::new()
            .get("http://127.0.0.1:1/a")
            .header("x-multi", "a")
            .header("x-one", "value-1")
            .header("x-multi", "b")
            .build()
            .unwrap();
        let all: Vec<_> = req.headers().iter().collect();
        let whole = Head::of(&req);
        let url = req.url().clone();
        let with_text = |text: &[u8], url_len: usize| Head {
            text: text.into(),
            url_len,
            sent_len: url_len,
            version: whole.version,
            timeout: whole.timeout,
        };
        // Where each record ends, in the map's order (the URL first).
        let mut ends = vec![whole.url_len];
        for (name, value) in &all {
            ends.push(ends[ends.len() - 1] + HEADER_PREFIX + name.as_str().len() + value.len());
        }
        assert_eq!(ends[ends.len() - 1], whole.text.len());
        for cut in whole.url_len..=whole.text.len() {
            let rebuilt = with_text(&whole.text[..cut], whole.url_len)
                .into_request(http::Method::GET, url.clone());
            match ends.iter().position(|&end| end == cut) {
                Some(records) => {
                    let rebuilt = rebuilt.unwrap_or_else(|| panic!("cut at {cut}"));
                    let got: Vec<_> = rebuilt.headers().iter().collect();
                    assert_eq!(got, all[..records], "cut at {cut}");
                }
                None => assert!(rebuilt.is_none(), "cut at {cut}"),
            }
        }
        // A URL length past the text: no request.
        let head = with_text(&whole.text, whole.text.len() + 1);
        assert_eq!(head.url(), "");
        assert!(head.into_request(http::Method::GET, url).is_none());
    }
}
