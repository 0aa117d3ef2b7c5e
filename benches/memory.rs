//! Memory: what keeping a request body for a replay costs, in allocated bytes, measured
//! by a counting global allocator in this bench binary (the library itself forbids unsafe
//! code; this allocator is the only unsafe code, and it only forwards to `System`).
//!
//! Each scenario sends one request through an in-memory inner service that reads the body
//! frame by frame to its end (dropping each frame) and answers 200. Two lines:
//!
//! - `bare`: the inner service alone;
//! - `refresh`: `Refresh` with a valid token (no refresh, no replay).
//!
//! Figures, in bytes, relative to the live heap just before `call` (service, request head and
//! body value already built):
//!
//! - `held`: live bytes when the inner service has read the whole body, i.e. what the request
//!   keeps alive while its response is pending (for `refresh`: the replay copy);
//! - `peak`: the highest live heap during the request.
//!
//! The cost of buffering is `held(refresh) - held(bare)`, compared with the body's size.
//!
//! Bodies: `Full<Bytes>` (the caller already holds the bytes: the zero-copy capture costs
//! O(1)), and a streaming body that allocates each chunk as it is polled (like a body read
//! from a socket or a file), with an exact size hint, or none (a body of unknown size is
//! captured while it streams, up to the cap, and dropped once it outgrows it).

#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_auth_refresh::{DEFAULT_MAX_REPLAY_BODY, ReplayBody};

/// Counts live heap bytes and their high-water mark; forwards everything to `System`.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(n: usize) {
    LIVE.fetch_sub(n, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A body that allocates each chunk when it is polled.
struct Streamed {
    remaining: usize,
    chunk: usize,
    exact: bool,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.chunk.min(self.remaining);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining as u64)
        } else {
            SizeHint::default()
        }
    }
}

#[derive(Clone, Copy)]
enum Shape {
    /// `Full<Bytes>` of this many bytes, allocated before the measurement.
    Full(usize),
    /// A streamed body: total, chunk size, exact size hint.
    Streamed(usize, usize, bool),
}

impl Shape {
    fn len(self) -> usize {
        match self {
            Shape::Full(n) | Shape::Streamed(n, _, _) => n,
        }
    }

    fn describe(self) -> String {
        match self {
            Shape::Full(n) => format!("`Full<Bytes>` {}", size(n)),
            Shape::Streamed(n, c, exact) => format!(
                "streamed {} in {} chunks{}",
                size(n),
                size(c),
                if exact { "" } else { ", no size hint" }
            ),
        }
    }
}

fn size(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1024 && n % 1024 == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// Live bytes, relative to the start of the request, when the inner service has read the
/// whole body.
static HELD_AT_END: AtomicUsize = AtomicUsize::new(0);
static BASE: AtomicUsize = AtomicUsize::new(0);

fn inner<B>()
-> impl Service<Request<B>, Response = Response<String>, Error = Infallible, Future: Send> + Clone
where
    B: Body + Unpin + Send + 'static,
{
    service_fn(|req: Request<B>| async move {
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            drop(frame);
        }
        drop(body);
        HELD_AT_END.store(
            LIVE.load(Ordering::Relaxed)
                .saturating_sub(BASE.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        Ok::<_, Infallible>(Response::new(String::new()))
    })
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    held: usize,
    peak: usize,
}

/// Sends one request with the body `make` builds through `svc`.
async fn measure<S, B>(svc: &S, make: impl Fn() -> B) -> Figures
where
    S: Service<Request<B>, Response = Response<String>> + Clone,
    S::Error: std::fmt::Debug,
{
    let svc = svc.clone();
    let req = Request::post("/upload").body(make()).unwrap();
    let base = LIVE.load(Ordering::Relaxed);
    BASE.store(base, Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let res = svc.oneshot(req).await.unwrap();
    drop(res);
    Figures {
        held: HELD_AT_END.load(Ordering::Relaxed),
        peak: PEAK.load(Ordering::Relaxed) - base,
    }
}

/// Runs one shape through the bare and the refresh line; returns the last of a few passes
/// (the first ones warm lazily initialised state: thread-locals, the runtime).
async fn scenario<BF, RF, BS, RS>(
    shape: Shape,
    bare_full: &BF,
    refresh_full: &RF,
    bare_streamed: &BS,
    refresh_streamed: &RS,
) -> (Figures, Figures)
where
    BF: Service<Request<Full<Bytes>>, Response = Response<String>> + Clone,
    BF::Error: std::fmt::Debug,
    RF: Service<Request<Full<Bytes>>, Response = Response<String>> + Clone,
    RF::Error: std::fmt::Debug,
    BS: Service<Request<Streamed>, Response = Response<String>> + Clone,
    BS::Error: std::fmt::Debug,
    RS: Service<Request<Streamed>, Response = Response<String>> + Clone,
    RS::Error: std::fmt::Debug,
{
    let payload = match shape {
        Shape::Full(n) => Bytes::from(vec![b'x'; n]),
        Shape::Streamed(..) => Bytes::new(),
    };
    let mut last = None;
    for _ in 0..4 {
        last = Some(match shape {
            Shape::Full(_) => (
                measure(bare_full, || Full::new(payload.clone())).await,
                measure(refresh_full, || Full::new(payload.clone())).await,
            ),
            Shape::Streamed(n, chunk, exact) => {
                let make = || Streamed {
                    remaining: n,
                    chunk,
                    exact,
                };
                (
                    measure(bare_streamed, make).await,
                    measure(refresh_streamed, make).await,
                )
            }
        });
    }
    last.unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (calls, layer) = common::valid_token_layer("memory-token");
        let refresh_full = layer.layer(inner::<ReplayBody<Full<Bytes>>>());
        let refresh_streamed = layer.layer(inner::<ReplayBody<Streamed>>());
        let bare_full = inner::<Full<Bytes>>();
        let bare_streamed = inner::<Streamed>();

        let cap = DEFAULT_MAX_REPLAY_BODY;
        println!(
            "Memory: bytes allocated by one request, counting global allocator; replay cap {}",
            size(cap)
        );
        println!(
            "| body | held, bare | held, refresh | buffering cost (held refresh - bare) | cost / body bytes | peak, bare | peak, refresh |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let kib = 1024;
        let mib = 1024 * 1024;
        let shapes = [
            Shape::Full(0),
            Shape::Full(kib),
            Shape::Full(64 * kib),
            Shape::Full(mib),
            Shape::Streamed(64 * kib, 16 * kib, true),
            Shape::Streamed(64 * kib, kib, true),
            Shape::Streamed(64 * kib, 256, true),
            Shape::Streamed(mib, 16 * kib, true),
            Shape::Streamed(mib, kib, true),
            // Unknown size: captured while it streams, up to the cap.
            Shape::Streamed(64 * kib, 16 * kib, false),
            Shape::Streamed(mib, 16 * kib, false),
            Shape::Streamed(mib + 1, 16 * kib, true),
            Shape::Streamed(2 * mib, 16 * kib, true),
            Shape::Streamed(8 * mib, 16 * kib, true),
            Shape::Streamed(8 * mib, 16 * kib, false),
        ];
        for shape in shapes {
            let (b, r) = scenario(
                shape,
                &bare_full,
                &refresh_full,
                &bare_streamed,
                &refresh_streamed,
            )
            .await;
            let cost = r.held as i64 - b.held as i64;
            let ratio = if shape.len() == 0 {
                "-".to_owned()
            } else {
                format!("{:.3}", cost as f64 / shape.len() as f64)
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                shape.describe(),
                b.held,
                r.held,
                cost,
                ratio,
                b.peak,
                r.peak
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the refresher was called");
    });
}
