//! Capture of a replayable body on its first send, and the hand-over to the replay.
//!
//! The first attempt's body streams through a [`Capture`], which keeps its frames (zero-copy
//! where it pays) in the same allocation as the body, up to the cap. When the caller's body
//! ends, the capture publishes the kept copy to the request's [`Slot`]; when the first
//! attempt drops the body before its end (a server answered early), the capture hands itself
//! over whole: the kept start and the unread rest. [`ReplaySource`] is the replay's side of
//! the slot.
//!
//! The slot is shared by the two sides without a notification primitive: a flag says the
//! first attempt let go of the body, and an [`AtomicWaker`] holds the one replay that may be
//! waiting for it, so publishing costs one short lock and two atomic operations.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::HeaderMap;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;

use super::{Kind, Replay, ReplayBody, to_bytes};

/// Data frames smaller than this are kept by copying them back to back, instead of by
/// reference: keeping a frame by reference costs about 56 bytes of bookkeeping (a slot in the
/// list, and a shared header when its `Bytes` was built from a `Vec`), over 10% of a frame
/// this small. Larger frames are kept zero-copy.
const SMALL_FRAME: usize = 1024;

/// The size of the buffers small frames are copied into (at most what is left of the cap).
const TAIL_BLOCK: usize = 8 * 1024;

/// The first attempt hands data frames larger than this to the sender in slices of this size
/// (zero-copy). A sender then takes a large body a slice at a time, as its connection drains,
/// instead of queueing all of it at once: when a server answers early and stops reading, the
/// first attempt is still sending, so it can be abandoned (and its connection closed) rather
/// than the replay being queued behind the unsent bytes on a connection that looks idle.
pub(super) const SEND_SLICE: usize = 64 * 1024;

/// Kept data chunks, in order. The first is stored inline: most bodies arrive as one frame,
/// and keeping it then allocates nothing.
#[derive(Default)]
pub(super) struct Chunks {
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

    pub(super) fn pop_front(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        let chunk = self.rest.get_mut(self.sent).map(std::mem::take)?;
        self.sent += 1;
        Some(chunk)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.first.is_none() && self.sent >= self.rest.len()
    }

    pub(super) fn bytes(&self) -> usize {
        let rest = self.rest.get(self.sent..).unwrap_or_default();
        self.first.iter().chain(rest).map(Bytes::len).sum()
    }
}

/// Where a capturing body leaves what it kept, for the replay to pick up.
pub(crate) struct Slot<B> {
    state: Mutex<SlotState<B>>,
    /// Set once `state` has left `Pending`: the first attempt let go of the body (finished,
    /// dropped, or outgrew the cap).
    settled: AtomicBool,
    /// The replay waiting in [`ReplaySource::settle`].
    replay: AtomicWaker,
    /// Set by the replay when it takes over: a first attempt still sending ends early.
    abandoned: AtomicBool,
}

impl<B> Slot<B> {
    /// Moves the slot out of `Pending`, if it is still there, and wakes the replay.
    fn settle(&self, state: impl FnOnce() -> SlotState<B>) {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*guard, SlotState::Pending) {
            *guard = state();
        }
        drop(guard);
        self.settled.store(true, Ordering::Release);
        self.replay.wake();
    }
}

enum SlotState<B> {
    /// The first attempt's body is still alive and has not finished.
    Pending,
    /// Everything was captured.
    Complete {
        chunks: Chunks,
        trailers: Option<HeaderMap>,
        len: usize,
        exact: bool,
    },
    /// The body was dropped before its end: the captured start and the unread rest.
    Partial {
        chunks: Chunks,
        rest: Pin<Box<Capture<B>>>,
        hint: Option<u64>,
    },
    /// Not replayable (too big, failed), or already taken.
    Gone,
}

/// What the layer keeps, beside the request head, to replay a request.
pub(crate) enum ReplaySource<B> {
    Empty,
    /// The whole body, one chunk in memory, shared with the first attempt until it sends it.
    Whole(Arc<Bytes>),
    Captured(Arc<Slot<B>>),
}

impl<B> ReplaySource<B> {
    /// Waits, at most `patience`, for the first attempt to let go of the body.
    ///
    /// A server may answer 401 before it has read the body; the client is then still
    /// sending it (or about to drop it) when the response arrives. Either ends soon, and the
    /// replay needs one of them: the whole body captured, or the unsent rest handed over.
    /// Without a Tokio runtime, or on one without its time driver, there is no timer, so
    /// there is no wait.
    pub(crate) async fn settle(&self, patience: Duration) {
        let Self::Captured(slot) = self else { return };
        if slot.settled.load(Ordering::Acquire) || patience.is_zero() || !crate::head::timer_here()
        {
            return;
        }
        let released = poll_fn(|cx| {
            slot.replay.register(cx.waker());
            if slot.settled.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let _ = tokio::time::timeout(patience, released).await;
    }

    /// The body for the one replay, if the first attempt left a complete copy (or its
    /// unsent rest).
    ///
    /// When it does, a first attempt still sending slices of its body is abandoned: its body
    /// ends short of its announced length, so the client aborts that send and does not reuse
    /// the connection (the server answered without reading it, and the replay must not queue
    /// behind it).
    pub(crate) fn take(self) -> Option<ReplayBody<B>> {
        let replay = match self {
            Self::Empty => Replay {
                chunks: Chunks::default(),
                trailers: None,
                rest: None,
                remaining: Some(0),
            },
            Self::Whole(bytes) => {
                let remaining = Some(bytes.len() as u64);
                let mut chunks = Chunks::default();
                chunks.push(Arc::unwrap_or_clone(bytes));
                Replay {
                    chunks,
                    trailers: None,
                    rest: None,
                    remaining,
                }
            }
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
                        exact,
                    } => Replay {
                        chunks,
                        trailers,
                        rest: None,
                        remaining: exact.then_some(len as u64),
                    },
                    SlotState::Partial { chunks, rest, hint } => Replay {
                        chunks,
                        trailers: None,
                        rest: Some(rest),
                        remaining: hint,
                    },
                    SlotState::Pending | SlotState::Gone => return None,
                };
                slot.abandoned.store(true, Ordering::Release);
                replay
            }
        };
        Some(ReplayBody {
            kind: Kind::Replay(Box::new(replay)),
        })
    }
}

pin_project! {
    /// The first send of a replayable body: the body itself and what was kept of it, in one
    /// allocation.
    #[project = CaptureProj]
    pub(super) struct Capture<B> {
        // `None` once the body has ended.
        #[pin]
        pub(super) body: Option<B>,
        cap: usize,
        // The exact size announced by the body's size hint, if it announced one.
        hint: Option<u64>,
        pub(super) chunks: Chunks,
        // Small frames, copied back to back (see `SMALL_FRAME`); not yet in `chunks`.
        pub(super) tail: Option<BytesMut>,
        len: usize,
        trailers: Option<HeaderMap>,
        // The captured copy is no longer complete (too big, an error, an unknown frame).
        pub(super) spoiled: bool,
        // The rest of a large data frame, handed to the sender in slices (see `SEND_SLICE`).
        pending: Option<Bytes>,
        // Where the kept copy goes; taken when the capture is handed over, so that a capture
        // handed to the slot does not keep the slot alive.
        slot: Option<Arc<Slot<B>>>,
    }
}

impl<B> Capture<B> {
    /// Starts capturing `body` (at most `cap` bytes; `hint` is its exact size, if known):
    /// the capture, and the slot where it leaves the kept copy.
    pub(super) fn start(body: B, cap: usize, hint: Option<u64>) -> (Pin<Box<Self>>, Arc<Slot<B>>) {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::Pending),
            settled: AtomicBool::new(false),
            replay: AtomicWaker::new(),
            abandoned: AtomicBool::new(false),
        });
        let capture = Box::pin(Capture {
            body: Some(body),
            cap,
            hint,
            chunks: Chunks::default(),
            tail: None,
            len: 0,
            trailers: None,
            spoiled: false,
            pending: None,
            slot: Some(slot.clone()),
        });
        (capture, slot)
    }

    /// Bytes not yet handed to the sender of a frame already taken from the body.
    pub(super) fn pending(&self) -> usize {
        self.pending.as_ref().map_or(0, Bytes::len)
    }
}

impl<B> CaptureProj<'_, B> {
    /// Polls the first attempt's body, keeping what it yields.
    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
    where
        B: Body,
    {
        if self.pending.is_some()
            && self
                .slot
                .as_ref()
                .is_some_and(|s| s.abandoned.load(Ordering::Acquire))
        {
            // The replay took over while slices of a body of known size were still unsent:
            // end it short of its announced length, so the client aborts this send and
            // closes the connection (see `SEND_SLICE`).
            *self.pending = None;
            return Poll::Ready(None);
        }
        if let Some(pending) = self.pending.as_mut() {
            let slice = if pending.len() > SEND_SLICE {
                pending.split_to(SEND_SLICE)
            } else {
                self.pending.take().unwrap_or_default()
            };
            return Poll::Ready(Some(Ok(Frame::data(slice))));
        }
        let Some(body) = self.body.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = match ready!(body.poll_frame(cx)) {
            None => {
                self.publish();
                return Poll::Ready(None);
            }
            Some(Err(err)) => {
                self.spoil();
                return Poll::Ready(Some(Err(err)));
            }
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let mut bytes = to_bytes(data);
                if !*self.spoiled {
                    *self.len += bytes.len();
                    if *self.len > *self.cap {
                        // Past the cap (a size hint that lied, or a body of unknown size
                        // that outgrew it): stop keeping, free what was kept.
                        self.spoil();
                    } else if !bytes.is_empty() {
                        self.keep(&bytes);
                    }
                }
                // Only a body of known size is sliced: ending it early (on abandonment) is
                // then an error for the client, never a complete but shorter body.
                if bytes.len() > SEND_SLICE && self.hint.is_some() {
                    *self.pending = Some(bytes.split_off(SEND_SLICE));
                }
                Frame::data(bytes)
            }
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => {
                    if !*self.spoiled {
                        *self.trailers = Some(trailers.clone());
                    }
                    Frame::trailers(trailers)
                }
                Err(other) => {
                    self.spoil();
                    other.map_data(to_bytes)
                }
            },
        };
        let ended = self
            .body
            .as_ref()
            .get_ref()
            .as_ref()
            .is_none_or(|b| b.is_end_stream());
        if frame.is_trailers() || ended {
            // Trailers are the last frame, and senders may stop polling once a body
            // says it has ended (or after its trailers): publish now.
            self.publish();
        }
        Poll::Ready(Some(Ok(frame)))
    }

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
            // `len` already counts this frame: what is left of the body (or of the cap, for a
            // body of unknown size), this frame included.
            let limit = self.hint.map_or(*self.cap, |n| n as usize);
            let left = limit.saturating_sub(*self.len - bytes.len());
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

    /// The caller's body ended: drop it and hand the complete copy to the slot. The capture
    /// keeps the slot: the first attempt may still be sending slices, and must see an
    /// abandonment.
    fn publish(&mut self) {
        self.flush_tail();
        self.body.set(None);
        let Some(slot) = self.slot.as_ref() else {
            return;
        };
        let spoiled = *self.spoiled;
        let (chunks, trailers, len, exact) = (
            std::mem::take(self.chunks),
            self.trailers.take(),
            *self.len,
            self.hint.is_some(),
        );
        slot.settle(|| {
            if spoiled {
                SlotState::Gone
            } else {
                SlotState::Complete {
                    chunks,
                    trailers,
                    len,
                    exact,
                }
            }
        });
    }

    /// The copy can no longer be complete: free it, and tell a waiting replay at once.
    fn spoil(&mut self) {
        *self.spoiled = true;
        *self.chunks = Chunks::default();
        *self.tail = None;
        *self.trailers = None;
        *self.len = 0;
        if let Some(slot) = self.slot.as_ref() {
            slot.settle(|| SlotState::Gone);
        }
    }
}

/// The first attempt's body is dropped before its end (the inner service answered early, or
/// gave up): hand the kept start and the unread rest to the slot, for the replay.
pub(super) fn hand_over<B>(mut capture: Pin<Box<Capture<B>>>) {
    let mut this = capture.as_mut().project();
    // Taken out first: a capture kept in the slot must not keep the slot alive.
    let Some(slot) = this.slot.take() else { return };
    if slot.settled.load(Ordering::Acquire) {
        // Published, spoiled or taken already.
        return;
    }
    let keep = !*this.spoiled && this.body.as_ref().get_ref().is_some();
    this.flush_tail();
    // Slices not yet sent are part of the kept chunks already.
    *this.pending = None;
    let chunks = std::mem::take(this.chunks);
    let hint = *this.hint;
    slot.settle(move || {
        if keep {
            SlotState::Partial {
                chunks,
                rest: capture,
                hint,
            }
        } else {
            SlotState::Gone
        }
    });
}
