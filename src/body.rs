//! The replayable request body.
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// The default cap on a body kept for replay: 1 MiB.
pub const DEFAULT_MAX_REPLAY_BODY: usize = 1024 * 1024;

/// A request body that can be replayed once after a 401: the caller's body, captured on its
/// way out when it is small enough.
/// when it is small enough to be replayed once.
///
/// The layer decides before the first send, from the body's size hint:
///
/// - **empty** (`is_end_stream()`): always replayable, nothing kept;
/// - **known size ≤ the cap** (default 1 MiB): the data frames are kept as they stream to the
///   inner service (zero-copy: each frame's [`Bytes`] is reference-counted, not copied), along
///   with trailers, so the first attempt is never delayed;
/// - **unknown size or above the cap**: passed through untouched and never replayed.
///
/// A body whose size hint lies and outgrows the cap while streaming drops what it kept and
/// stops keeping, so the layer never holds more than the cap for one request.
///
/// # Example
///
/// ```
/// use http_body::Body;
/// use tower_auth_refresh::ReplayBody;
///
/// // What the inner service sees: the same size hint and bytes as the caller's body.
/// fn inspect<B: Body>(body: &ReplayBody<B>) -> (Option<u64>, usize) {
///     (body.size_hint().exact(), body.buffered_bytes())
/// }
/// # let _ = inspect::<String>;
/// ```
pub struct ReplayBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    Empty,
    Passthrough(Pin<Box<B>>),
    Capture(Capture<B>),
    Replay(Replay<B>),
}

struct Capture<B> {
    body: Option<Pin<Box<B>>>,
    cap: usize,
    /// The exact size announced by the body's size hint.
    total: u64,
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// The captured copy is no longer complete (too big, an error, an unknown frame).
    spoiled: bool,
    slot: Arc<Slot<B>>,
}

struct Replay<B> {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Pin<Box<B>>>,
    remaining: u64,
}

/// Where a capturing body leaves what it kept, for the replay to pick up.
pub(crate) struct Slot<B> {
    state: Mutex<SlotState<B>>,
}

enum SlotState<B> {
    /// The first attempt's body is still alive and has not finished.
    Pending,
    /// Everything was captured.
    Complete {
        chunks: Vec<Bytes>,
        trailers: Option<HeaderMap>,
        len: usize,
    },
    /// The body was dropped before its end: the captured start and the unread rest.
    Partial {
        chunks: Vec<Bytes>,
        rest: Pin<Box<B>>,
        total: u64,
    },
    /// Not replayable, or already taken.
    Gone,
}

/// What the layer keeps, beside the request head, to replay a request.
pub(crate) enum ReplaySource<B> {
    Empty,
    Captured(Arc<Slot<B>>),
}

impl<B> ReplaySource<B> {
    /// The body for the one replay, if the first attempt left a complete copy.
    pub(crate) fn take(self) -> Option<ReplayBody<B>> {
        match self {
            Self::Empty => Some(ReplayBody {
                kind: Kind::Replay(Replay {
                    chunks: VecDeque::new(),
                    trailers: None,
                    rest: None,
                    remaining: 0,
                }),
            }),
            Self::Captured(slot) => {
                let state = std::mem::replace(
                    &mut *slot.state.lock().unwrap_or_else(PoisonError::into_inner),
                    SlotState::Gone,
                );
                let replay = match state {
                    SlotState::Complete {
                        chunks,
                        trailers,
                        len,
                    } => Replay {
                        chunks: chunks.into(),
                        trailers,
                        rest: None,
                        remaining: len as u64,
                    },
                    SlotState::Partial {
                        chunks,
                        rest,
                        total,
                    } => Replay {
                        chunks: chunks.into(),
                        trailers: None,
                        rest: Some(rest),
                        remaining: total,
                    },
                    SlotState::Pending | SlotState::Gone => return None,
                };
                Some(ReplayBody {
                    kind: Kind::Replay(replay),
                })
            }
        }
    }
}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body` for its first send. Returns the source of the replay when the body can be
    /// replayed.
    pub(crate) fn new(body: B, cap: usize) -> (Self, Option<ReplaySource<B>>) {
        if body.is_end_stream() {
            return (Self { kind: Kind::Empty }, Some(ReplaySource::Empty));
        }
        match body.size_hint().exact() {
            Some(n) if n <= cap as u64 => {
                let slot = Arc::new(Slot {
                    state: Mutex::new(SlotState::Pending),
                });
                let capture = Capture {
                    body: Some(Box::pin(body)),
                    cap,
                    total: n,
                    chunks: Vec::new(),
                    len: 0,
                    trailers: None,
                    spoiled: false,
                    slot: slot.clone(),
                };
                (
                    Self {
                        kind: Kind::Capture(capture),
                    },
                    Some(ReplaySource::Captured(slot)),
                )
            }
            _ => (Self::passthrough(body), None),
        }
    }

    /// Wraps `body` without keeping anything.
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Passthrough(Box::pin(body)),
        }
    }
}

impl<B> ReplayBody<B> {
    /// How many bytes this body holds for a replay right now (0 when it keeps nothing).
    /// Never more than the configured cap.
    pub fn buffered_bytes(&self) -> usize {
        match &self.kind {
            Kind::Capture(c) if !c.spoiled => c.chunks.iter().map(Bytes::len).sum(),
            Kind::Replay(r) => r.chunks.iter().map(Bytes::len).sum(),
            _ => 0,
        }
    }

    /// True if this is the replay of an earlier attempt.
    pub fn is_replay(&self) -> bool {
        matches!(self.kind, Kind::Replay(_))
    }
}

impl<B> Capture<B> {
    /// The body ended: hand the complete copy to the slot and drop the finished body.
    fn publish(&mut self) {
        self.body = None;
        let mut state = self
            .slot
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *state = if self.spoiled {
            SlotState::Gone
        } else {
            SlotState::Complete {
                chunks: std::mem::take(&mut self.chunks),
                trailers: self.trailers.take(),
                len: self.len,
            }
        };
    }

    fn spoil(&mut self) {
        self.spoiled = true;
        self.chunks = Vec::new();
        self.len = 0;
    }
}

impl<B> Drop for Capture<B> {
    fn drop(&mut self) {
        let mut state = self
            .slot
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !matches!(*state, SlotState::Pending) {
            return;
        }
        *state = match self.body.take() {
            _ if self.spoiled => SlotState::Gone,
            // Finished: `poll_frame` already published, nothing to do (unreachable in practice).
            None => SlotState::Gone,
            Some(rest) => SlotState::Partial {
                chunks: std::mem::take(&mut self.chunks),
                rest,
                total: self.total,
            },
        };
    }
}

fn to_bytes<D: Buf>(mut data: D) -> Bytes {
    // Zero-copy for `Bytes` (the common case); a copy for other buffer types.
    data.copy_to_bytes(data.remaining())
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Passthrough(body) => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                Poll::Ready(frame.map(|r| r.map(|f| f.map_data(to_bytes))))
            }
            Kind::Capture(c) => {
                let Some(body) = c.body.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = match ready!(body.as_mut().poll_frame(cx)) {
                    None => {
                        c.publish();
                        return Poll::Ready(None);
                    }
                    Some(Err(err)) => {
                        c.spoil();
                        return Poll::Ready(Some(Err(err)));
                    }
                    Some(Ok(frame)) => frame,
                };
                let frame = match frame.into_data() {
                    Ok(data) => {
                        let bytes = to_bytes(data);
                        if !c.spoiled {
                            c.len += bytes.len();
                            if c.len > c.cap {
                                // The size hint lied: stop keeping, free what was kept.
                                c.spoil();
                            } else if !bytes.is_empty() {
                                c.chunks.push(bytes.clone());
                            }
                        }
                        Frame::data(bytes)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            if !c.spoiled {
                                c.trailers = Some(trailers.clone());
                            }
                            Frame::trailers(trailers)
                        }
                        Err(other) => {
                            c.spoil();
                            other.map_data(to_bytes)
                        }
                    },
                };
                if frame.is_trailers() || c.body.as_ref().is_some_and(|b| b.is_end_stream()) {
                    // Trailers are the last frame, and senders may stop polling once a body
                    // says it has ended (or after its trailers): publish now.
                    c.publish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Kind::Replay(r) => {
                if let Some(chunk) = r.chunks.pop_front() {
                    r.remaining = r.remaining.saturating_sub(chunk.len() as u64);
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(rest) = r.rest.as_mut() {
                    let frame = ready!(rest.as_mut().poll_frame(cx));
                    if frame.is_none() {
                        r.rest = None;
                    }
                    return Poll::Ready(frame.map(|res| {
                        res.map(|f| {
                            let f = f.map_data(to_bytes);
                            if let Some(d) = f.data_ref() {
                                r.remaining = r.remaining.saturating_sub(d.len() as u64);
                            }
                            f
                        })
                    }));
                }
                Poll::Ready(r.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Passthrough(body) => body.is_end_stream(),
            Kind::Capture(c) => c.body.as_ref().is_none_or(|b| b.is_end_stream()),
            Kind::Replay(r) => {
                r.chunks.is_empty()
                    && r.trailers.is_none()
                    && r.rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Passthrough(body) => body.size_hint(),
            Kind::Capture(c) => c
                .body
                .as_ref()
                .map_or(SizeHint::with_exact(0), |b| b.size_hint()),
            // The same exact size the caller's body announced, minus what was replayed.
            Kind::Replay(r) => SizeHint::with_exact(r.remaining),
        }
    }
}

/// An empty body, for layers that need to make one (tower-http's `FollowRedirect`, for one).
impl<B> Default for ReplayBody<B> {
    fn default() -> Self {
        Self { kind: Kind::Empty }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Passthrough(_) => "passthrough",
            Kind::Capture(_) => "capturing",
            Kind::Replay(_) => "replay",
        };
        f.debug_struct("ReplayBody")
            .field("kind", &kind)
            .field("buffered_bytes", &self.buffered_bytes())
            .finish()
    }
}
