//! The replayable request body.
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::Notify;

/// How long a replay waits, by default, for the first attempt to let go of its body.
pub(crate) const DEFAULT_REPLAY_BODY_WAIT: Duration = Duration::from_secs(1);

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

// `ReplayBody` stays two words: requests are moved many times on their way through a
// client (hyper moves the body into its dispatcher, its channel, its connection task), so
// the capture state lives in the one allocation that also holds the body, and the rare
// replay state is boxed.
enum Kind<B> {
    Empty,
    Passthrough(Pin<Box<B>>),
    Capture(Pin<Box<Capture<B>>>),
    Replay(Box<Replay<B>>),
}

pin_project! {
    /// The first send of a replayable body: the body itself and what was kept of it, in one
    /// allocation.
    #[project = CaptureProj]
    struct Capture<B> {
        // `None` once the body has ended.
        #[pin]
        body: Option<B>,
        cap: usize,
        // The exact size announced by the body's size hint.
        total: u64,
        chunks: Chunks,
        // Small frames, copied back to back (see `SMALL_FRAME`); not yet in `chunks`.
        tail: Option<BytesMut>,
        len: usize,
        trailers: Option<HeaderMap>,
        // The captured copy is no longer complete (too big, an error, an unknown frame).
        spoiled: bool,
        // Where the kept copy goes; taken when it is published or handed over, so that a
        // capture handed to the slot does not keep the slot alive.
        slot: Option<Arc<Slot<B>>>,
    }
}

struct Replay<B> {
    chunks: Chunks,
    trailers: Option<HeaderMap>,
    /// The unread rest of a body dropped before its end, still pinned in its capture.
    rest: Option<Pin<Box<Capture<B>>>>,
    remaining: u64,
}

/// Data frames smaller than this are kept by copying them back to back, instead of by
/// reference: keeping a frame by reference costs about 56 bytes of bookkeeping (a slot in the
/// list, and a shared header when its `Bytes` was built from a `Vec`), over 10% of a frame
/// this small. Larger frames are kept zero-copy.
const SMALL_FRAME: usize = 1024;

/// The size of the buffers small frames are copied into (at most what is left of the body).
const TAIL_BLOCK: usize = 8 * 1024;

/// Kept data chunks, in order. The first is stored inline: most bodies with a known size
/// arrive as one frame, and keeping it then allocates nothing.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    rest: Vec<Bytes>,
    /// How many of `rest` a replay has sent.
    sent: usize,
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(chunk);
        } else {
            self.rest.push(chunk);
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        let chunk = self.rest.get_mut(self.sent).map(std::mem::take)?;
        self.sent += 1;
        Some(chunk)
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.sent >= self.rest.len()
    }

    fn bytes(&self) -> usize {
        let rest = self.rest.get(self.sent..).unwrap_or_default();
        self.first.iter().chain(rest).map(Bytes::len).sum()
    }
}

/// Where a capturing body leaves what it kept, for the replay to pick up.
pub(crate) struct Slot<B> {
    state: Mutex<SlotState<B>>,
    /// Signalled when the first attempt lets go of the body (finished or dropped).
    released: Notify,
}

enum SlotState<B> {
    /// The first attempt's body is still alive and has not finished.
    Pending,
    /// Everything was captured.
    Complete {
        chunks: Chunks,
        trailers: Option<HeaderMap>,
        len: usize,
    },
    /// The body was dropped before its end: the captured start and the unread rest.
    Partial {
        chunks: Chunks,
        rest: Pin<Box<Capture<B>>>,
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
    /// Waits, at most `patience`, for the first attempt to let go of the body.
    ///
    /// A server may answer 401 before it has read the body; the client is then still
    /// sending it (or about to drop it) when the response arrives. Either ends soon, and the
    /// replay needs one of them: the whole body captured, or the unsent rest handed over.
    /// Without a Tokio runtime there is no timer, so there is no wait.
    pub(crate) async fn settle(&self, patience: Duration) {
        let Self::Captured(slot) = self else { return };
        let released = slot.released.notified();
        let mut released = std::pin::pin!(released);
        released.as_mut().enable();
        let pending = matches!(
            *slot.state.lock().unwrap_or_else(PoisonError::into_inner),
            SlotState::Pending
        );
        if !pending || patience.is_zero() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let _ = tokio::time::timeout(patience, released).await;
    }

    /// The body for the one replay, if the first attempt left a complete copy.
    pub(crate) fn take(self) -> Option<ReplayBody<B>> {
        match self {
            Self::Empty => Some(ReplayBody {
                kind: Kind::Replay(Box::new(Replay {
                    chunks: Chunks::default(),
                    trailers: None,
                    rest: None,
                    remaining: 0,
                })),
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
                        chunks,
                        trailers,
                        rest: None,
                        remaining: len as u64,
                    },
                    SlotState::Partial {
                        chunks,
                        rest,
                        total,
                    } => Replay {
                        chunks,
                        trailers: None,
                        rest: Some(rest),
                        remaining: total,
                    },
                    SlotState::Pending | SlotState::Gone => return None,
                };
                Some(ReplayBody {
                    kind: Kind::Replay(Box::new(replay)),
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
                    released: Notify::new(),
                });
                let capture = Box::pin(Capture {
                    body: Some(body),
                    cap,
                    total: n,
                    chunks: Chunks::default(),
                    tail: None,
                    len: 0,
                    trailers: None,
                    spoiled: false,
                    slot: Some(slot.clone()),
                });
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
            Kind::Capture(c) if !c.spoiled => {
                c.chunks.bytes() + c.tail.as_ref().map_or(0, BytesMut::len)
            }
            Kind::Replay(r) => r.chunks.bytes(),
            _ => 0,
        }
    }

    /// True if this is the replay of an earlier attempt.
    pub fn is_replay(&self) -> bool {
        matches!(self.kind, Kind::Replay(_))
    }
}

impl<B> CaptureProj<'_, B> {
    /// The body ended: drop it and hand the complete copy to the slot.
    /// Keeps a data frame: by reference, or copied into the tail if it is small.
    #[inline]
    fn keep(&mut self, bytes: &Bytes) {
        if bytes.len() >= SMALL_FRAME {
            self.flush_tail();
            self.chunks.push(bytes.clone());
            return;
        }
        let fits = self
            .tail
            .as_ref()
            .is_some_and(|t| t.capacity() - t.len() >= bytes.len());
        if !fits {
            self.flush_tail();
            // `len` already counts this frame: what is left of the body, this frame included.
            let left = (*self.total as usize).saturating_sub(*self.len - bytes.len());
            *self.tail = Some(BytesMut::with_capacity(left.clamp(bytes.len(), TAIL_BLOCK)));
        }
        if let Some(tail) = self.tail.as_mut() {
            tail.extend_from_slice(bytes);
        }
    }

    fn flush_tail(&mut self) {
        if let Some(tail) = self.tail.as_mut().filter(|t| !t.is_empty()) {
            let full = tail.split().freeze();
            self.chunks.push(full);
        }
    }

    fn publish(&mut self) {
        self.flush_tail();
        self.body.set(None);
        let Some(slot) = self.slot.take() else { return };
        let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = if *self.spoiled {
            SlotState::Gone
        } else {
            SlotState::Complete {
                chunks: std::mem::take(self.chunks),
                trailers: self.trailers.take(),
                len: *self.len,
            }
        };
        drop(state);
        slot.released.notify_waiters();
    }

    fn spoil(&mut self) {
        *self.spoiled = true;
        *self.chunks = Chunks::default();
        *self.tail = None;
        *self.len = 0;
    }
}

/// The first attempt's body is dropped before its end (the inner service answered early, or
/// gave up): hand the kept start and the unread rest to the slot, for the replay.
fn hand_over<B>(mut capture: Pin<Box<Capture<B>>>) {
    let mut this = capture.as_mut().project();
    // Published already (or handed over): nothing to do.
    let Some(slot) = this.slot.take() else { return };
    let keep = !*this.spoiled && this.body.as_ref().get_ref().is_some();
    this.flush_tail();
    let chunks = std::mem::take(this.chunks);
    let total = *this.total;
    let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
    if !matches!(*state, SlotState::Pending) {
        return;
    }
    *state = if keep {
        SlotState::Partial {
            chunks,
            rest: capture,
            total,
        }
    } else {
        SlotState::Gone
    };
    drop(state);
    slot.released.notify_waiters();
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if matches!(self.kind, Kind::Capture(_)) {
            if let Kind::Capture(capture) = std::mem::replace(&mut self.kind, Kind::Empty) {
                hand_over(capture);
            }
        }
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
                let mut c = c.as_mut().project();
                let Some(body) = c.body.as_mut().as_pin_mut() else {
                    return Poll::Ready(None);
                };
                let frame = match ready!(body.poll_frame(cx)) {
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
                        if !*c.spoiled {
                            *c.len += bytes.len();
                            if *c.len > *c.cap {
                                // The size hint lied: stop keeping, free what was kept.
                                c.spoil();
                            } else if !bytes.is_empty() {
                                c.keep(&bytes);
                            }
                        }
                        Frame::data(bytes)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            if !*c.spoiled {
                                *c.trailers = Some(trailers.clone());
                            }
                            Frame::trailers(trailers)
                        }
                        Err(other) => {
                            c.spoil();
                            other.map_data(to_bytes)
                        }
                    },
                };
                let ended = c
                    .body
                    .as_ref()
                    .get_ref()
                    .as_ref()
                    .is_none_or(|b| b.is_end_stream());
                if frame.is_trailers() || ended {
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
                if let Some(body) = r
                    .rest
                    .as_mut()
                    .and_then(|c| c.as_mut().project().body.as_pin_mut())
                {
                    let frame = ready!(body.poll_frame(cx));
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
                    && r.rest
                        .as_ref()
                        .and_then(|c| c.body.as_ref())
                        .is_none_or(|b| b.is_end_stream())
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
