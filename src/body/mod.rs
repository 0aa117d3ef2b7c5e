//! The replayable request body: [`ReplayBody`] and its `Body` impl. The capture of the first
//! send and the hand-over to the replay live in `capture`.
use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

mod capture;

pub(crate) use capture::ReplaySource;
use capture::{Capture, Chunks, SEND_SLICE, hand_over};

/// How long a replay waits, by default, for the first attempt to let go of its body.
pub(crate) const DEFAULT_REPLAY_BODY_WAIT: Duration = Duration::from_secs(1);

/// The default cap on a body kept for replay: 1 MiB.
pub const DEFAULT_MAX_REPLAY_BODY: usize = 1024 * 1024;

/// A request body that can be replayed once after a 401: the caller's body, captured on its
/// way out when it is small enough to be replayed.
///
/// The layer decides before the first send, from the body's size hint:
///
/// - **empty** (`is_end_stream()`): always replayable, nothing kept;
/// - **one chunk in memory** (`Full<Bytes>` or `String`, up to 64 KiB and the cap): the
///   chunk itself is the replay (a reference-counted `Bytes` shared with the first attempt),
///   nothing is captured;
/// - **known size ≤ the cap**, or **unknown size** (default cap 1 MiB): the data frames are
///   kept as they stream to the inner service (zero-copy: each frame's [`Bytes`] is
///   reference-counted, not copied), along with trailers, so the first attempt is never
///   delayed. A body of unknown size (a chunked upload, a gRPC message stream) is replayable
///   if it ends within the cap;
/// - **known size above the cap**: passed through untouched and never replayed.
///
/// A body that outgrows the cap while streaming (its size was unknown, or its size hint
/// lied) drops what was kept and stops keeping: it is sent on untouched but is not replayed,
/// so the layer never holds more than the cap for one request.
///
/// The replay announces the size the caller's body announced (exact, or unknown).
///
/// When the replay starts while the first attempt is still sending a body of known size (a
/// server answered before reading it), the first attempt's body ends early, short of its
/// announced length: a client then aborts that send and closes the connection instead of
/// queueing the replay behind the unsent bytes.
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
    /// A body that was one chunk in memory (see `ReplayBody::new`): its bytes, not yet sent.
    /// The replay source holds a clone; no shared state, no lock.
    Whole(Arc<Bytes>),
    Passthrough(Pin<Box<B>>),
    Capture(Pin<Box<Capture<B>>>),
    Replay(Box<Replay<B>>),
}

struct Replay<B> {
    chunks: Chunks,
    trailers: Option<HeaderMap>,
    /// The unread rest of a body dropped before its end, still pinned in its capture.
    rest: Option<Pin<Box<Capture<B>>>>,
    /// What is left to send, when the caller's body announced its exact size.
    remaining: Option<u64>,
}

impl<B: Body + 'static> ReplayBody<B> {
    /// Wraps `body` for its first send. Returns the source of the replay when the body can be
    /// replayed.
    ///
    /// A body that is already one chunk in memory (`Full<Bytes>`, `String`) of at most
    /// [`SEND_SLICE`] bytes and the cap needs no capture: its bytes are
    /// the replay (a reference-counted clone), with no shared slot, no lock, no allocation.
    #[inline]
    pub(crate) fn new(body: B, cap: usize) -> (Self, Option<ReplaySource<B>>) {
        if body.is_end_stream() {
            return (Self { kind: Kind::Empty }, Some(ReplaySource::Empty));
        }
        Self::with_data(body, cap)
    }

    /// [`new`](Self::new) for a body that has data to send.
    fn with_data(mut body: B, cap: usize) -> (Self, Option<ReplaySource<B>>) {
        let hint = body.size_hint();
        let too_big = match hint.exact() {
            Some(n) => n > cap as u64,
            None => hint.lower() > cap as u64,
        };
        if too_big {
            return (Self::passthrough(body), None);
        }
        let small = hint.exact().is_some_and(|n| n as usize <= SEND_SLICE);
        if let Some(bytes) = small.then(|| in_memory(&mut body)).flatten() {
            // These types announce their exact length; `cap` holds for the bytes themselves.
            let bytes = Arc::new(bytes);
            let source = (bytes.len() <= cap).then(|| ReplaySource::Whole(bytes.clone()));
            return (
                Self {
                    kind: Kind::Whole(bytes),
                },
                source,
            );
        }
        let (capture, slot) = Capture::start(body, cap, hint.exact());
        (
            Self {
                kind: Kind::Capture(capture),
            },
            Some(ReplaySource::Captured(slot)),
        )
    }
}

/// The bytes of a body that is one chunk in memory, taken out of it (which leaves it empty),
/// for the body types that are: `Full<Bytes>` (the usual in-memory body; `Full::new(bytes)`
/// for a `Bytes` or a `Vec<u8>`) and `String`. `None` (and the body untouched) for any other
/// type.
fn in_memory<B: 'static>(body: &mut B) -> Option<Bytes> {
    let body: &mut dyn Any = body;
    if let Some(full) = body.downcast_mut::<Full<Bytes>>() {
        // `Full` yields its one frame at once, whatever the waker.
        let mut cx = Context::from_waker(Waker::noop());
        return match Pin::new(full).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            _ => None,
        };
    }
    if let Some(text) = body.downcast_mut::<String>() {
        return Some(Bytes::from(std::mem::take(text)));
    }
    None
}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body` without keeping anything. An empty body is not kept at all (no
    /// allocation), as in [`new`](Self::new).
    pub(crate) fn passthrough(body: B) -> Self {
        if body.is_end_stream() {
            return Self { kind: Kind::Empty };
        }
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
            // The replay's clone shares these bytes: nothing is kept beside them.
            Kind::Whole(b) => b.len(),
            _ => 0,
        }
    }

    /// True if this is the replay of an earlier attempt.
    pub fn is_replay(&self) -> bool {
        matches!(self.kind, Kind::Replay(_))
    }
}

impl<B> Drop for ReplayBody<B> {
    #[inline]
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
            Kind::Whole(_) => {
                let Kind::Whole(bytes) = std::mem::replace(&mut self.kind, Kind::Empty) else {
                    return Poll::Ready(None);
                };
                // A clone of the shared `Bytes` (one count), not `Arc::unwrap_or_clone`: the
                // replay source usually holds the other `Arc`, so the unwrap would not succeed.
                let data = Bytes::clone(&bytes);
                drop(bytes);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Kind::Passthrough(body) => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                Poll::Ready(frame.map(|r| r.map(|f| f.map_data(to_bytes))))
            }
            Kind::Capture(c) => c.as_mut().project().poll_frame(cx),
            Kind::Replay(r) => {
                if let Some(chunk) = r.chunks.pop_front() {
                    if let Some(remaining) = r.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(chunk.len() as u64);
                    }
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
                            if let (Some(d), Some(remaining)) = (f.data_ref(), r.remaining.as_mut())
                            {
                                *remaining = remaining.saturating_sub(d.len() as u64);
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
            Kind::Whole(_) => false,
            Kind::Passthrough(body) => body.is_end_stream(),
            Kind::Capture(c) => {
                c.pending() == 0 && c.body.as_ref().is_none_or(|b| b.is_end_stream())
            }
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
            Kind::Whole(bytes) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Passthrough(body) => body.size_hint(),
            Kind::Capture(c) => {
                let pending = c.pending() as u64;
                match c.body.as_ref() {
                    None => SizeHint::with_exact(pending),
                    Some(b) => {
                        let hint = b.size_hint();
                        let mut out = SizeHint::new();
                        out.set_lower(hint.lower().saturating_add(pending));
                        if let Some(upper) = hint.upper() {
                            out.set_upper(upper.saturating_add(pending));
                        }
                        out
                    }
                }
            }
            // What the caller's body announced, minus what was replayed: exact, or unknown.
            Kind::Replay(r) => match r.remaining {
                Some(n) => SizeHint::with_exact(n),
                None => {
                    let mut out = SizeHint::new();
                    out.set_lower(r.chunks.bytes() as u64);
                    out
                }
            },
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
            Kind::Whole(_) => "in memory",
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
