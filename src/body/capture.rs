//! Capture of a replayable body on its first send, and the hand-over to the replay.
//!
//! The first attempt's body streams through a [`Capture`], which keeps its frames (zero-copy
//! where it pays) in the same allocation as the body. When the body ends, the capture
//! publishes the kept copy to the request's [`Slot`]; when the first attempt drops the body
//! before its end (a server answered early), the capture hands itself over whole: the kept
//! start and the unread rest. [`ReplaySource`] is the replay's side of the slot.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::sync::Notify;

use super::{Kind, Replay, ReplayBody, to_bytes};

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

pin_project! {
    /// The first send of a replayable body: the body itself and what was kept of it, in one
    /// allocation.
    #[project = CaptureProj]
    pub(super) struct Capture<B> {
        // `None` once the body has ended.
        #[pin]
        pub(super) body: Option<B>,
        cap: usize,
        // The exact size announced by the body's size hint.
        total: u64,
        pub(super) chunks: Chunks,
        // Small frames, copied back to back (see `SMALL_FRAME`); not yet in `chunks`.
        pub(super) tail: Option<BytesMut>,
        len: usize,
        trailers: Option<HeaderMap>,
        // The captured copy is no longer complete (too big, an error, an unknown frame).
        pub(super) spoiled: bool,
        // Where the kept copy goes; taken when it is published or handed over, so that a
        // capture handed to the slot does not keep the slot alive.
        slot: Option<Arc<Slot<B>>>,
    }
}

impl<B> Capture<B> {
    /// Starts capturing `body`, of exactly `total` bytes (at most `cap`): the capture, and the
    /// slot where it leaves the kept copy.
    pub(super) fn start(body: B, cap: usize, total: u64) -> (Pin<Box<Self>>, Arc<Slot<B>>) {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::Pending),
            released: Notify::new(),
        });
        let capture = Box::pin(Capture {
            body: Some(body),
            cap,
            total,
            chunks: Chunks::default(),
            tail: None,
            len: 0,
            trailers: None,
            spoiled: false,
            slot: Some(slot.clone()),
        });
        (capture, slot)
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
                let bytes = to_bytes(data);
                if !*self.spoiled {
                    *self.len += bytes.len();
                    if *self.len > *self.cap {
                        // The size hint lied: stop keeping, free what was kept.
                        self.spoil();
                    } else if !bytes.is_empty() {
                        self.keep(&bytes);
                    }
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
pub(super) fn hand_over<B>(mut capture: Pin<Box<Capture<B>>>) {
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
