//! [`ResponseFuture`], the future returned by [`Refresh`](crate::Refresh).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::join;
use http::header::AUTHORIZATION;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::BoxError;
use crate::body::{ReplayBody, ReplaySource};
use crate::cell::ObtainError;
use crate::error::{
    RefreshFailed, RefreshRejected, ResponseHead, SessionEnded, UnauthorizedAfterRefresh,
};
use crate::layer::Shared;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a request keeps to ask for a fresher token and replay itself once.
pub(crate) struct Retry<S, B> {
    pub(crate) svc: S,
    pub(crate) shared: Arc<Shared>,
    /// The request head, kept only when the body can be replayed.
    pub(crate) head: Option<http::request::Parts>,
    pub(crate) body: Option<ReplaySource<B>>,
    /// The generation and attempt counter of the token the request was sent with.
    pub(crate) generation: u64,
    pub(crate) attempts: u64,
}

pin_project! {
    /// The response future of [`Refresh`](crate::Refresh).
    ///
    /// With a valid token it only forwards the inner service's future; it moves to a boxed
    /// slow path when it must wait for a refresh or replay after a 401.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        Direct { #[pin] fut: S::Future },
        First { #[pin] fut: S::Future, retry: Option<Retry<S, B>> },
        Slow { fut: BoxFuture<Result<S::Response, BoxError>> },
        Failed { error: Option<BoxError> },
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Direct { .. } => "direct",
            State::First { .. } => "first attempt",
            State::Slow { .. } => "refreshing or replaying",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResBody> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Send + 'static,
{
    #[inline]
    pub(crate) fn direct(fut: S::Future) -> Self {
        Self {
            state: State::Direct { fut },
        }
    }

    #[inline]
    pub(crate) fn failed(error: BoxError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }

    #[inline]
    pub(crate) fn first(fut: S::Future, retry: Retry<S, B>) -> Self {
        Self {
            state: State::First {
                fut,
                retry: Some(retry),
            },
        }
    }

    #[inline]
    pub(crate) fn after_refresh(retry: Retry<S, B>, body: ReplayBody<B>, no_refresh: bool) -> Self {
        Self {
            state: State::Slow {
                fut: Box::pin(send_after_refresh(retry, body, no_refresh)),
            },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResBody: Send + 'static,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Direct { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::First { fut, retry } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let wants_refresh = retry
                        .as_ref()
                        .is_some_and(|r| r.shared.config.triggers(res.status(), res.headers()));
                    if !wants_refresh {
                        return Poll::Ready(Ok(res));
                    }
                    let retry = retry.take().expect("checked above");
                    this.state.set(State::Slow {
                        fut: Box::pin(replay_after(retry, res)),
                    });
                }
                StateProj::Slow { fut } => return fut.as_mut().poll(cx),
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
            }
        }
    }
}

pub(crate) fn obtain_error(err: ObtainError, unauthorized: Option<ResponseHead>) -> BoxError {
    match err {
        ObtainError::Rejected(e) => RefreshRejected::new(e, unauthorized).into(),
        ObtainError::Failed(e) => RefreshFailed::new(e, unauthorized).into(),
        ObtainError::Ended(e) => SessionEnded::new(e).into(),
    }
}

/// No usable token at `call`: wait for one, then send.
async fn send_after_refresh<S, B, ResBody>(
    mut retry: Retry<S, B>,
    body: ReplayBody<B>,
    no_refresh: bool,
) -> Result<Response<ResBody>, BoxError>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    B: Body,
{
    let fresh = retry
        .shared
        .cell
        .fresher_than(retry.generation, retry.attempts)
        .await
        .map_err(|e| obtain_error(e, None))?;
    let mut parts = retry
        .head
        .take()
        .expect("the head is kept for the first send");
    if retry.body.is_some() {
        retry.head = Some(parts.clone());
    }
    parts.headers.insert(AUTHORIZATION, fresh.header);
    retry.generation = fresh.generation;
    retry.attempts = fresh.attempts;
    // `svc` was made ready by `poll_ready` before `call`.
    let res = retry
        .svc
        .call(Request::from_parts(parts, body))
        .await
        .map_err(Into::into)?;
    if no_refresh || !retry.shared.config.triggers(res.status(), res.headers()) {
        return Ok(res);
    }
    replay_after(retry, res).await
}

/// The response asked for a refresh: get a token newer than the one the request used and
/// replay the request once.
async fn replay_after<S, B, ResBody>(
    retry: Retry<S, B>,
    first: Response<ResBody>,
) -> Result<Response<ResBody>, BoxError>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    B: Body,
{
    let Retry {
        mut svc,
        shared,
        head,
        body,
        generation,
        attempts,
    } = retry;
    let (first_parts, first_body) = first.into_parts();
    // The refresh runs while the body is being let go of (a server may answer before reading
    // it): the wait and the refresh overlap, and a request that turns out not replayable still
    // leaves a fresh token for later requests.
    let replay = async {
        match (head, body) {
            (Some(head), Some(source)) if shared.config.may_replay(&head.method) => {
                source.settle(shared.config.replay_body_wait).await;
                source.take().map(|body| (head, body))
            }
            _ => None,
        }
    };
    let (fresh, replay) = join(shared.cell.fresher_than(generation, attempts), replay).await;
    let Some((mut head, body)) = replay else {
        // Not replayable: the caller gets the response, after the refresh.
        tracing::debug!(
            generation,
            status = first_parts.status.as_u16(),
            "request cannot be replayed; refreshed for later requests"
        );
        return Ok(Response::from_parts(first_parts, first_body));
    };
    let first_head = ResponseHead::from_parts(&first_parts);
    drop(first_body);
    let fresh = match fresh {
        Ok(fresh) => fresh,
        Err(err) => return Err(obtain_error(err, Some(first_head))),
    };
    head.headers.insert(AUTHORIZATION, fresh.header);
    tracing::debug!(
        stale_generation = generation,
        generation = fresh.generation,
        method = %head.method,
        "replaying request with a fresh token"
    );
    poll_fn(|cx| svc.poll_ready(cx)).await.map_err(Into::into)?;
    let second = svc
        .call(Request::from_parts(head, body))
        .await
        .map_err(Into::into)?;
    if shared.config.triggers(second.status(), second.headers()) {
        let (parts, _) = second.into_parts();
        tracing::warn!(
            generation = fresh.generation,
            status = parts.status.as_u16(),
            "request refused again after a token refresh"
        );
        return Err(
            UnauthorizedAfterRefresh::new(first_head, ResponseHead::from_parts(&parts)).into(),
        );
    }
    Ok(second)
}
