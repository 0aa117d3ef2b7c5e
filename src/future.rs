//! [`ResponseFuture`], the future returned by [`Refresh`](crate::Refresh).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::AUTHORIZATION;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::BoxError;
use crate::body::{ReplayBody, ReplaySource};
use crate::cell::FreshWait;
use crate::head::{RequestCopy, ResponseHead};
use crate::replay::{self, Admit, Granted, Recovery, Sent, Verdict};
use crate::shared::Shared;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where a replay gets its inner service from.
pub(crate) enum Replayer<S> {
    /// A clone taken at `call`: for a service no larger than two words, whose clone costs no
    /// more than the shared count below (a closure, a handle around one `Arc`).
    Own(S),
    /// The layer's own copy, shared and cloned only for a replay: a larger service (a
    /// hyper-util `Client` is 120 bytes and several reference counts) is neither cloned
    /// nor carried in every request's future. Behind a lock only because a service need
    /// not be `Sync`; it is taken once per replay.
    Shared(Template<S>),
}

/// A layer's shared copy of its inner service (see [`Replayer::Shared`]).
pub(crate) type Template<S> = Arc<std::sync::Mutex<S>>;

/// A layer's shared copy of `inner`, made on first use when `S` is a service to share.
#[inline]
pub(crate) fn template_of<'a, S: Clone>(
    inner: &S,
    template: &'a mut Option<Template<S>>,
) -> Option<&'a Template<S>> {
    if Replayer::<S>::SHARES && template.is_none() {
        *template = Some(Arc::new(std::sync::Mutex::new(inner.clone())));
    }
    template.as_ref()
}

impl<S: Clone> Replayer<S> {
    /// Whether a layer shares a copy of `S` for replays instead of cloning it per request.
    pub(crate) const SHARES: bool = std::mem::size_of::<S>() > 2 * std::mem::size_of::<usize>();

    /// How a request sent through `inner` replays: `template` is the layer's shared copy
    /// (present when [`SHARES`](Self::SHARES)).
    #[inline]
    pub(crate) fn of(inner: &S, template: Option<&Template<S>>) -> Self {
        match template {
            Some(template) => Self::Shared(template.clone()),
            None => Self::Own(inner.clone()),
        }
    }

    /// A service to replay through (not ready yet).
    fn service(self) -> S {
        match self {
            Self::Own(svc) => svc,
            Self::Shared(template) => template
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

/// What a request keeps to wait for a token, or to replay itself once.
pub(crate) struct Kit<S, B> {
    /// Where a replay gets its inner service from.
    pub(crate) replayer: Replayer<S>,
    pub(crate) shared: Shared,
    /// The request head without the token, kept only when the body can be replayed.
    pub(crate) head: Option<RequestCopy>,
    pub(crate) body: Option<ReplaySource<B>>,
    pub(crate) sent: Sent,
    /// The URI the request was sent to, kept apart only when `head` is not kept: a response
    /// from another URI came from a redirect hop below the layer. Boxed, as `header`: both
    /// are rare, and every request's future is moved a few times.
    pub(crate) uri: Option<Box<http::Uri>>,
    /// The `Authorization` the request was sent with, kept only when the layer has a
    /// [`RequestProof`](crate::RequestProof) (a new proof is sent with the same token).
    pub(crate) header: Option<Box<http::HeaderValue>>,
}

impl<S, B> Kit<S, B> {
    /// The URI the request was sent to, if kept (whenever a proof or the redirect check may
    /// need it): in the head, boxed apart, or `elsewhere` (a parked request keeps it in its
    /// own allocation).
    fn sent_uri<'a>(&'a self, elsewhere: Option<&'a http::Uri>) -> Option<&'a http::Uri> {
        self.head
            .as_ref()
            .map(|h| &h.uri)
            .or(self.uri.as_deref())
            .or(elsewhere)
    }

    /// What `res` means for the request: `None` when it goes to the caller as it is.
    #[inline]
    fn verdict<T>(&self, res: &Response<T>) -> Option<Verdict> {
        self.verdict_at(res, None)
    }

    /// [`verdict`](Self::verdict) for a request whose URI is kept `elsewhere`.
    #[inline]
    fn verdict_at<T>(&self, res: &Response<T>, elsewhere: Option<&http::Uri>) -> Option<Verdict> {
        if !replay::interesting(&self.shared, res.status(), res.headers()) {
            return None;
        }
        self.judge(res, self.sent_uri(elsewhere))
    }

    /// [`verdict`](Self::verdict) for a response worth a look; `sent`: where the request went.
    /// A response from another URI came from a later redirect hop than the request this
    /// layer sent (tower-http's `FollowRedirectLayer` records the final URI on the response).
    fn judge<T>(&self, res: &Response<T>, sent: Option<&http::Uri>) -> Option<Verdict> {
        let (status, headers) = (res.status(), res.headers());
        match replay::judge(
            &self.shared,
            self.sent,
            sent.unwrap_or_else(|| replay::no_uri()),
            status,
            headers,
            redirected(res, sent),
        ) {
            Verdict::Final => None,
            verdict => Some(verdict),
        }
    }
}

#[cfg(feature = "follow-redirect")]
fn redirected<T>(res: &Response<T>, sent: Option<&http::Uri>) -> bool {
    match res
        .extensions()
        .get::<tower_http::follow_redirect::RequestUri>()
    {
        Some(final_uri) => sent.is_none_or(|sent| *sent != final_uri.0),
        None => false,
    }
}

#[cfg(not(feature = "follow-redirect"))]
fn redirected<T>(_: &Response<T>, _: Option<&http::Uri>) -> bool {
    false
}

/// What `Refresh::request` keeps until the inner service is ready.
struct Readying<S, B> {
    svc: S,
    replayer: Replayer<S>,
    shared: Shared,
    req: Request<B>,
}

/// A request that waits for a token before its first send, in one allocation (every future
/// is sized for its largest state, and in a stampede every request waits): the kit, the
/// body, the wait, then the token it is sent with once the inner service is ready.
pub(crate) struct Parked<S, B> {
    kit: Kit<S, B>,
    /// The request's head, as the caller made it (taken by the send).
    parts: Option<http::request::Parts>,
    /// The service it is sent through once the wait is over: an unready clone (the readied
    /// one was given up, see `dispatch`).
    svc: S,
    /// The caller's body (taken by the send): whether it is kept for a replay is decided
    /// once the token it goes out with is known.
    body: Option<B>,
    phase: Phase,
}

impl<S, B> Parked<S, B> {
    /// What the response to its send means (see [`Kit::verdict`]).
    #[inline]
    fn verdict<T>(&self, res: &Response<T>) -> Option<Verdict> {
        let uri = match &self.phase {
            Phase::Sent(uri) => uri.as_ref(),
            _ => None,
        };
        self.kit.verdict_at(res, uri)
    }
}

/// Where a parked request's wait is.
enum Phase {
    /// Not started: the first poll starts it (`expired`: why it waits).
    Start {
        expired: bool,
    },
    Waiting(FreshWait),
    /// Over: the token to send with (`None`: anonymous, sent without one).
    Over(Option<Granted>),
    /// The request went out (its kit stays here, see `State::Resent`), to this URI when the
    /// kit keeps no head (for the redirect check; kept here rather than boxed in the kit).
    Sent(Option<http::Uri>),
}

pin_project! {
    /// The response future of [`Refresh`](crate::Refresh): `F` is the inner service's future,
    /// `R` its response, `S` and `B` the inner service and request body it may replay with.
    ///
    /// With a valid token it only forwards the inner service's future; it moves to a boxed
    /// slow path when it must wait for a refresh or replay after a 401.
    ///
    /// It has no bounds of its own (only its `Future` impl has), so a future that holds it is
    /// `Send` whenever its parts are, whatever lifetimes the body type's error carries.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<S, B, F, R> {
        #[pin]
        state: State<S, B, F, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F, R> {
        // Made by `Refresh::request`: readying a clone of the inner service first.
        // Boxed: only `Refresh::request` needs it, and every future is sized for its largest
        // state (moved a few times per request).
        Readying { ready: Option<Box<Readying<S, B>>> },
        // Not ours to touch: the inner future, as it is.
        Passthrough { #[pin] fut: F },
        // Sent with the current token; a refusal moves on to `Recovering`.
        Sent { #[pin] fut: F, kit: Option<Kit<S, B>> },
        // Sent after a wait: as `Sent`, its kit kept where it waited (not moved again).
        Resent { #[pin] fut: F, parked: Option<Box<Parked<S, B>>> },
        // No usable token at `call`: waiting for one, holding no readiness of the inner
        // service; then readying it, and the send with the new token goes on as `Resent` (or
        // `Passthrough`, anonymous).
        Waiting { parked: Option<Box<Parked<S, B>>> },
        // Replaying after a refusal (boxed: the rare path).
        Recovering { fut: BoxFuture<Result<R, BoxError>> },
        // Failed before anything was sent.
        Failed { error: Option<BoxError> },
    }
}

impl<S, B, F, R> std::fmt::Debug for ResponseFuture<S, B, F, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Readying { .. } => "readying",
            State::Passthrough { .. } => "passthrough",
            State::Sent { .. } | State::Resent { .. } => "sent",
            State::Waiting { .. } => "waiting",
            State::Recovering { .. } => "recovering",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResBody> ResponseFuture<S, B, S::Future, Response<ResBody>>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    pub(crate) fn readying(svc: S, replayer: Replayer<S>, shared: Shared, req: Request<B>) -> Self {
        Self {
            state: State::Readying {
                ready: Some(Box::new(Readying {
                    svc,
                    replayer,
                    shared,
                    req,
                })),
            },
        }
    }

    #[inline]
    pub(crate) fn passthrough(fut: S::Future) -> Self {
        Self {
            state: State::Passthrough { fut },
        }
    }

    #[inline]
    pub(crate) fn failed(error: BoxError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }

    #[inline]
    pub(crate) fn sent(fut: S::Future, kit: Kit<S, B>) -> Self {
        Self {
            state: State::Sent {
                fut,
                kit: Some(kit),
            },
        }
    }

    pub(crate) fn after_wait(
        kit: Kit<S, B>,
        parts: http::request::Parts,
        svc: S,
        body: B,
        expired: bool,
    ) -> Self {
        let parked = Parked {
            kit,
            parts: Some(parts),
            svc,
            body: Some(body),
            phase: Phase::Start { expired },
        };
        Self {
            state: State::Waiting {
                parked: Some(Box::new(parked)),
            },
        }
    }

    /// Every state, moving from one to the next until one is pending or done.
    #[inline(never)]
    fn poll_states(
        mut state: Pin<&mut State<S, B, S::Future, Response<ResBody>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ResBody>, BoxError>> {
        loop {
            match state.as_mut().project() {
                StateProj::Readying { ready } => {
                    let polled = ready
                        .as_mut()
                        .expect("polled after completion")
                        .svc
                        .poll_ready(cx);
                    if let Err(err) = ready!(polled) {
                        return Poll::Ready(Err(err.into()));
                    }
                    let Readying {
                        mut svc,
                        replayer,
                        shared,
                        req,
                    } = *ready.take().expect("readied once");
                    let next = dispatch(&shared, &mut svc, |_| replayer, req);
                    state.set(next.state);
                }
                StateProj::Passthrough { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Sent { fut, kit } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let Some(verdict) = kit.as_ref().and_then(|k| k.verdict(&res)) else {
                        return Poll::Ready(Ok(res));
                    };
                    let kit = kit.take().expect("checked above");
                    state.set(recovering(kit, res, verdict));
                }
                StateProj::Resent { fut, parked } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let Some(verdict) = parked.as_ref().and_then(|p| p.verdict(&res)) else {
                        return Poll::Ready(Ok(res));
                    };
                    let kit = parked.take().expect("checked above").kit;
                    state.set(recovering(kit, res, verdict));
                }
                StateProj::Waiting { parked } => {
                    let p = parked.as_mut().expect("polled after completion");
                    if let Phase::Start { expired } = p.phase {
                        // The wait starts at the first poll, as an `async` block's would.
                        let wait = replay::start_wait(&p.kit.shared, p.kit.sent.ticket, expired);
                        p.phase = Phase::Waiting(wait);
                    }
                    if let Phase::Waiting(wait) = &mut p.phase {
                        let answer = ready!(Pin::new(wait).poll(cx));
                        let token = replay::waited(&p.kit.shared, answer);
                        p.phase = Phase::Over(token.map_err(|f| f.into_box())?);
                    }
                    if let Err(err) = ready!(p.svc.poll_ready(cx)) {
                        return Poll::Ready(Err(err.into()));
                    }
                    let next = send_after_wait(parked.take().expect("readied once"));
                    state.set(next.state);
                }
                StateProj::Recovering { fut } => return fut.as_mut().poll(cx),
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B, S::Future, Response<ResBody>>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        // The common path, kept small so that the inner future's `poll` can be inlined
        // here: a request sent with the current token, its response not worth a look.
        if let StateProj::Sent { fut, kit } = state.as_mut().project() {
            let res = ready!(fut.poll(cx)).map_err(Into::into)?;
            let Some(verdict) = kit.as_ref().and_then(|k| k.verdict(&res)) else {
                return Poll::Ready(Ok(res));
            };
            let kit = kit.take().expect("checked above");
            state.set(recovering(kit, res, verdict));
        }
        Self::poll_states(state, cx)
    }
}

/// Readies `svc` and sends `req` through it.
async fn ready_call<S, B, ResBody>(
    svc: &mut S,
    req: Request<ReplayBody<B>>,
) -> Result<Response<ResBody>, BoxError>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    poll_fn(|cx| svc.poll_ready(cx)).await.map_err(Into::into)?;
    svc.call(req).await.map_err(Into::into)
}

/// The wait for a token is over and `parked.svc` is ready: sends the request with the token
/// (`None`: anonymous, untouched). The response is judged as any other (`Sent`): a refusal
/// of a token from the refresh is final ([`Verdict::RefusedAfterRefresh`]) unless a proof
/// asks for a new one; a refusal of the token the layer held (its refresh failed inside the
/// leeway) is recovered from as any first refusal.
fn send_after_wait<S, B, ResBody>(
    mut parked: Box<Parked<S, B>>,
) -> ResponseFuture<S, B, S::Future, Response<ResBody>>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let Phase::Over(token) = std::mem::replace(&mut parked.phase, Phase::Sent(None)) else {
        unreachable!("the wait is over before the send");
    };
    let body = parked
        .body
        .take()
        .expect("the body is kept for the first send");
    let Parked {
        kit,
        svc,
        parts,
        phase,
        ..
    } = &mut *parked;
    let mut parts = parts.take().expect("the head is kept for the first send");
    let Some(Granted {
        ticket,
        header,
        refreshed,
    }) = token
    else {
        // Anonymous: no token can be had; send it as it is.
        let req = Request::from_parts(parts, ReplayBody::passthrough(body));
        return ResponseFuture::passthrough(svc.call(req));
    };
    let options = kit.shared.options();
    // With a token from the refresh it waited for, a refusal is final (no second refresh):
    // only a refused proof (a nonce challenge) replays, so only a layer with a proof keeps
    // the body, the head and the header. The token the layer held, sent because its refresh
    // failed, was never refused: its refusal is a first one, replayed as any other's.
    let replays = !kit.sent.no_replay && (!refreshed || options.proof.is_some());
    let body = if replays {
        let (body, source) = ReplayBody::new(body, options.max_replay_body);
        if source.is_some() {
            kit.head = Some(RequestCopy::of(&parts));
        }
        kit.body = source;
        body
    } else {
        ReplayBody::passthrough(body)
    };
    if options.proof.is_some() {
        kit.header = Some(Box::new(header.clone()));
    }
    if kit.head.is_none() {
        // The clone shares the URI's bytes; it stays in the parked request's allocation
        // instead of a box of its own.
        *phase = Phase::Sent(Some(parts.uri.clone()));
    }
    parts.headers.insert(AUTHORIZATION, header);
    if let Err(f) = replay::prove(&kit.shared, &parts.method, &parts.uri, &mut parts.headers) {
        return ResponseFuture::failed(f.into_box());
    }
    kit.sent.ticket = ticket;
    // The token the layer held, sent after its refresh failed: its refusal is a first one.
    kit.sent.waited = refreshed;
    let fut = svc.call(Request::from_parts(parts, body));
    ResponseFuture {
        state: State::Resent {
            fut,
            parked: Some(parked),
        },
    }
}

/// The state that recovers from a refusal with this verdict.
fn recovering<S, B, F, ResBody>(
    kit: Kit<S, B>,
    res: Response<ResBody>,
    verdict: Verdict,
) -> State<S, B, F, Response<ResBody>>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let fut: BoxFuture<Result<Response<ResBody>, BoxError>> = match verdict {
        Verdict::NewProof => Box::pin(new_proof_replay(kit, res)),
        _ => Box::pin(recover_and_replay(kit, res)),
    };
    State::Recovering { fut }
}

/// The response refused the token the request carried: get a newer one and replay once.
async fn recover_and_replay<S, B, ResBody>(
    kit: Kit<S, B>,
    first: Response<ResBody>,
) -> Result<Response<ResBody>, BoxError>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    ResBody: Body,
{
    let Kit {
        replayer,
        shared,
        head,
        body,
        sent,
        uri: _,
        header: _,
    } = kit;
    if sent.waited {
        return refused_again(&shared, None, first, false).await;
    }
    let (first_parts, first_body) = first.into_parts();
    let first_head = ResponseHead::from_parts(&first_parts);
    let method = head.as_ref().map(|h| h.method.clone()).unwrap_or_default();
    let replayable = async {
        let (head, source) = (head?, body?);
        source.settle(shared.options().replay_body_wait).await;
        let body = source.take()?;
        Some((head.into_parts()?, body))
    };
    match replay::recover(&shared, sent, &first_head, &method, replayable).await {
        Recovery::ReturnFirst => Ok(Response::from_parts(first_parts, first_body)),
        Recovery::Fail(failure) => Err(failure.into_box()),
        Recovery::Replay((head, body), ticket, header) => {
            crate::head::drain(first_body).await;
            let mut svc = replayer.service();
            let second = send_replay(&mut svc, &shared, head, body, header).await?;
            if second.redirected {
                return Ok(second.res);
            }
            if second.challenged
                || replay::refused_again(&shared, ticket, second.res.status(), second.res.headers())
            {
                return refused_again(&shared, Some(first_head), second.res, false).await;
            }
            Ok(second.res)
        }
    }
}

/// The proof was refused (a nonce challenge): replay once with the same token and a new proof.
/// A refusal of the token then (a server that checks the proof first) is a first refusal
/// when no refresh preceded it: refreshed for later requests and returned as it is (see
/// [`replay::after_new_proof`]); the request is never sent a third time.
async fn new_proof_replay<S, B, ResBody>(
    kit: Kit<S, B>,
    first: Response<ResBody>,
) -> Result<Response<ResBody>, BoxError>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    ResBody: Body,
{
    let Kit {
        replayer,
        shared,
        head,
        body,
        header,
        sent,
        ..
    } = kit;
    let wait = shared.options().replay_body_wait;
    let replay = async {
        let (head, source, header) = (head?, body?, header?);
        source.settle(wait).await;
        let body = source.take()?;
        Some((head.into_parts()?, body, header))
    }
    .await;
    let Some((head, body, header)) = replay else {
        return Ok(first);
    };
    let (first_parts, first_body) = first.into_parts();
    crate::head::drain(first_body).await;
    let first_head = ResponseHead::from_parts(&first_parts);
    let mut svc = replayer.service();
    let second = send_replay(&mut svc, &shared, head, body, *header).await?;
    if second.redirected {
        return Ok(second.res);
    }
    let res = second.res;
    match replay::after_new_proof(
        &shared,
        sent,
        second.challenged,
        res.status(),
        res.headers(),
    ) {
        Verdict::Final => Ok(res),
        Verdict::NewProof => refused_again(&shared, Some(first_head), res, true).await,
        Verdict::RefusedAfterRefresh => refused_again(&shared, Some(first_head), res, false).await,
        Verdict::Recover => {
            let refused = ResponseHead::new(res.status(), res.version(), res.headers().clone());
            replay::refresh_for_later(&shared, sent, &refused).await;
            Ok(res)
        }
    }
}

/// The response to a replay, and whether it asked for a new proof again.
struct Replayed<R> {
    res: R,
    challenged: bool,
    /// It came from a redirect target: returned as it is, as for a first send (the replay
    /// was accepted by the server it went to).
    redirected: bool,
}

/// Sends the replay: the token set, a fresh proof if the layer has one, the proof shown the
/// response.
async fn send_replay<S, B, ResBody>(
    svc: &mut S,
    shared: &Shared,
    mut head: http::request::Parts,
    body: ReplayBody<B>,
    header: http::HeaderValue,
) -> Result<Replayed<Response<ResBody>>, BoxError>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    head.headers.insert(AUTHORIZATION, header);
    replay::prove(shared, &head.method, &head.uri, &mut head.headers).map_err(|f| f.into_box())?;
    let uri = head.uri.clone();
    let res = ready_call(svc, Request::from_parts(head, body)).await?;
    if redirected(&res, Some(&uri)) {
        // Not the proof's server: nothing to learn from it.
        return Ok(Replayed {
            res,
            challenged: false,
            redirected: true,
        });
    }
    let challenged = replay::observe(shared, &uri, res.status(), res.headers());
    Ok(Replayed {
        res,
        challenged,
        redirected: false,
    })
}

/// A refusal after a refresh (or, `proof_refused`, of a new proof): the response itself, or
/// the typed error (with the first bytes of the refusal's body).
async fn refused_again<ResBody>(
    shared: &Shared,
    first: Option<ResponseHead>,
    last: Response<ResBody>,
    proof_refused: bool,
) -> Result<Response<ResBody>, BoxError>
where
    ResBody: Body,
{
    if shared.options().unauthorized_as_response {
        return Ok(last);
    }
    let (parts, body) = last.into_parts();
    let head = ResponseHead::from_parts(&parts).with_body(crate::head::body_prefix(body).await);
    Err(replay::twice(first, head, proof_refused).into_box())
}

/// Sends `req` through `inner` (already ready) as the protocol decides; `replayer` says how
/// a request that may be replayed gets a service for it.
///
/// A request that must wait for a token first leaves `inner` unready (a clone in place of
/// the readied one, whose readiness may hold a permit the token request needs).
#[inline]
pub(crate) fn dispatch<S, B, ResBody>(
    shared: &Shared,
    inner: &mut S,
    replayer: impl FnOnce(&S) -> Replayer<S>,
    req: Request<B>,
) -> ResponseFuture<S, B, S::Future, http::Response<ResBody>>
where
    S: Service<Request<ReplayBody<B>>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    // A usable token is in `parts` once this returns `Send`.
    match replay::admit_into(shared, &mut parts) {
        Admit::Untouched => ResponseFuture::passthrough(
            inner.call(Request::from_parts(parts, ReplayBody::passthrough(body))),
        ),
        Admit::Fail(failure) => ResponseFuture::failed(failure.into_box()),
        Admit::Send { ticket, header: () } => {
            // The kit's count on the shared state is taken first: an atomic operation (a
            // locked instruction on x86) waits until every store before it has left the store
            // buffer, and the copies below store a few hundred bytes. (A request that is never
            // replayed drops it again: rare.)
            let kit_shared = shared.clone();
            let sent = Sent::new(ticket, false, &parts.extensions);
            if sent.no_replay {
                if let Err(f) = replay::prove(shared, &parts.method, &parts.uri, &mut parts.headers)
                {
                    return ResponseFuture::failed(f.into_box());
                }
                let req = Request::from_parts(parts, ReplayBody::passthrough(body));
                return ResponseFuture::passthrough(inner.call(req));
            }
            // Kept whatever the method (one path: a check of the method here costs the hot
            // path more than it saves); a body the options never replay is dropped with the
            // response.
            let (body, source) = ReplayBody::new(body, shared.options().max_replay_body);
            // The head is kept without the token (the replay sets a newer one); a request
            // without headers of its own then is copied without allocating.
            let head = source.as_ref().map(|_| RequestCopy::without_token(&parts));
            let uri = head.is_none().then(|| Box::new(parts.uri.clone()));
            let kept = match &shared.options().proof {
                Some(_) => parts.headers.get(AUTHORIZATION).cloned().map(Box::new),
                None => None,
            };
            if let Err(f) = replay::prove(shared, &parts.method, &parts.uri, &mut parts.headers) {
                return ResponseFuture::failed(f.into_box());
            }
            let replayer = replayer(inner);
            let fut = inner.call(Request::from_parts(parts, body));
            let kit = Kit {
                replayer,
                shared: kit_shared,
                head,
                body: source,
                sent,
                uri,
                header: kept,
            };
            ResponseFuture::sent(fut, kit)
        }
        Admit::Wait { ticket, expired } => {
            // Whether the body is kept for a replay is decided at the send, by the token it
            // goes out with (`send_after_wait`).
            let sent = Sent::new(ticket, true, &parts.extensions);
            // Give up the readied service while waiting: it may hold a permit the token
            // request needs (a concurrency limit below the layer). A clone is readied later.
            let svc = inner.clone();
            drop(std::mem::replace(inner, svc.clone()));
            let kit = Kit {
                replayer: replayer(&svc),
                shared: shared.clone(),
                uri: None,
                head: None,
                body: None,
                sent,
                header: None,
            };
            ResponseFuture::after_wait(kit, parts, svc, body, expired)
        }
    }
}
