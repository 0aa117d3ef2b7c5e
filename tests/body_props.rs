//! Property tests of `ReplayBody`, driven through the layer: whatever the chunking, trailers,
//! size hint and however far the first attempt reads, the replay reproduces the caller's body
//! byte for byte (trailers included), and the layer never holds more than its cap.

mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use proptest::prelude::*;
use tower::{Layer, ServiceExt, service_fn};
use tower_auth_refresh::{RefreshLayer, ReplayBody, Token};

use support::{ScriptedBody, counting};

/// How the inner service reads the first attempt's body before answering 401.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// Polls until `None`.
    ToEnd,
    /// Stops like hyper's HTTP/1 client: after the trailers frame, once the body says it has
    /// ended, or once the announced length was written.
    HyperLike,
    /// Reads this many frames, then drops the body (a cancelled or failed send).
    Drop(usize),
}

/// What one attempt's body looked like from the inner service.
#[derive(Debug, Default, Clone)]
struct Seen {
    replay: bool,
    hint_at_start: Option<u64>,
    data: BytesMut,
    trailers: Option<HeaderMap>,
    max_buffered: usize,
}

async fn read(mut body: ReplayBody<ScriptedBody>, reader: Reader) -> Seen {
    let mut seen = Seen {
        replay: body.is_replay(),
        hint_at_start: body.size_hint().exact(),
        max_buffered: body.buffered_bytes(),
        ..Seen::default()
    };
    let announced = seen.hint_at_start;
    let mut frames = 0;
    loop {
        if let Reader::Drop(k) = reader {
            if frames == k {
                break;
            }
        }
        let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        else {
            break;
        };
        frames += 1;
        let frame = frame.unwrap();
        seen.max_buffered = seen.max_buffered.max(body.buffered_bytes());
        let trailers = match frame.into_data() {
            Ok(data) => {
                seen.data.extend_from_slice(&data);
                false
            }
            Err(frame) => {
                seen.trailers = Some(frame.into_trailers().expect("data or trailers"));
                true
            }
        };
        if let Reader::HyperLike = reader {
            let length_written = announced.is_some_and(|n| seen.data.len() as u64 >= n);
            if trailers || body.is_end_stream() || length_written {
                break;
            }
        }
    }
    seen
}

struct Case {
    chunks: Vec<Vec<u8>>,
    trailers: Option<Vec<(String, String)>>,
    /// `None`: the honest exact size. `Some(None)`: unknown. `Some(Some(n))`: a lie.
    hint: Option<Option<u64>>,
    accurate_end: bool,
    cap: usize,
    reader: Reader,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lens: Vec<usize> = self.chunks.iter().map(Vec::len).collect();
        f.debug_struct("Case")
            .field("chunk_lens", &lens)
            .field("trailers", &self.trailers)
            .field("hint", &self.hint)
            .field("accurate_end", &self.accurate_end)
            .field("cap", &self.cap)
            .field("reader", &self.reader)
            .finish()
    }
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

struct Outcome {
    attempts: Vec<Seen>,
    status: StatusCode,
    refreshes: usize,
}

/// Sends the case's body through the layer with a stale token: the inner service reads the
/// first attempt with `case.reader` and answers 401, then reads the replay to its end.
fn run(case: &Case) -> Outcome {
    let total: usize = case.chunks.iter().map(Vec::len).sum();
    let mut frames: VecDeque<Frame<Bytes>> = case
        .chunks
        .iter()
        .map(|c| Frame::data(Bytes::copy_from_slice(c)))
        .collect();
    if let Some(t) = &case.trailers {
        frames.push_back(Frame::trailers(header_map(t)));
    }
    // The caller's body.
    let body = ScriptedBody {
        frames,
        hint: case.hint.unwrap_or(Some(total as u64)),
        accurate_end: case.accurate_end,
    };

    let attempts = Arc::new(Mutex::new(Vec::new()));
    let refreshes = Arc::new(AtomicUsize::new(0));
    let refresher = counting(&refreshes, "fresh");
    let reader = case.reader;
    let inner = {
        let attempts = attempts.clone();
        service_fn(move |req: Request<ReplayBody<ScriptedBody>>| {
            let attempts = attempts.clone();
            async move {
                let stale = req.headers()[AUTHORIZATION] == "Bearer stale";
                let body = req.into_body();
                let seen = read(body, if stale { reader } else { Reader::ToEnd }).await;
                attempts.lock().unwrap().push(seen);
                let status = if stale {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::OK
                };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(String::new())
                        .unwrap(),
                )
            }
        })
    };
    let svc = RefreshLayer::new(refresher)
        .initial_token(Token::bearer("stale").unwrap())
        .max_replay_body(case.cap)
        .layer(inner);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let res = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            svc.oneshot(Request::post("/upload").body(body).unwrap()),
        )
        .await
        .expect("no hang")
        .expect("no error")
    });
    let attempts = attempts.lock().unwrap().clone();
    let refreshes = refreshes.load(Ordering::SeqCst);
    Outcome {
        attempts,
        status: res.status(),
        refreshes,
    }
}

fn check(case: &Case) -> Result<(), TestCaseError> {
    let total: usize = case.chunks.iter().map(Vec::len).sum();
    let original: Vec<u8> = case.chunks.concat();
    let expected_trailers = case.trailers.as_deref().map(header_map);
    let out = run(case);
    prop_assert_eq!(out.refreshes, 1, "one refresh for the 401");

    // Never more than the cap held for a replay, at any frame of any attempt.
    for seen in &out.attempts {
        prop_assert!(
            seen.max_buffered <= case.cap,
            "buffered {} > cap {}",
            seen.max_buffered,
            case.cap
        );
    }

    let empty = case.accurate_end && case.chunks.is_empty() && case.trailers.is_none();
    let announced = case.hint.unwrap_or(Some(total as u64));
    // Known size above the cap: decided up front. Unknown size: captured while it streams.
    let replayable_up_front = empty || announced.is_none_or(|n| n <= case.cap as u64);
    if !replayable_up_front {
        // Passed through: nothing kept, not replayed, the caller gets the 401 itself.
        prop_assert_eq!(out.attempts.len(), 1);
        prop_assert_eq!(out.attempts[0].max_buffered, 0);
        prop_assert_eq!(out.status, StatusCode::UNAUTHORIZED);
        return Ok(());
    }
    let honest = case.hint.is_none();
    let unknown = case.hint == Some(None);
    if honest || (unknown && total <= case.cap) {
        // An honest body of known size within the cap, or a body of unknown size that ends
        // within the cap, is always replayed.
        prop_assert_eq!(out.attempts.len(), 2, "replayed");
    }
    if out.attempts.len() == 1 {
        // The body outgrew the cap while streaming (its size was unknown, or its size hint
        // lied): not replayed, the 401 is the caller's.
        prop_assert!(total > case.cap);
        prop_assert_eq!(out.status, StatusCode::UNAUTHORIZED);
        return Ok(());
    }
    prop_assert_eq!(out.attempts.len(), 2);
    prop_assert_eq!(out.status, StatusCode::OK);
    let first = &out.attempts[0];
    let replay = &out.attempts[1];
    prop_assert!(!first.replay);
    prop_assert!(replay.replay);
    if honest {
        prop_assert_eq!(first.hint_at_start, Some(total as u64));
        prop_assert_eq!(replay.hint_at_start, Some(total as u64), "replay size hint");
    }
    if unknown && !empty {
        // The replay announces what the caller's body announced: no exact size.
        prop_assert_eq!(first.hint_at_start, None);
        prop_assert_eq!(replay.hint_at_start, None, "replay size hint");
    }
    if let Reader::ToEnd = case.reader {
        prop_assert_eq!(&first.data[..], &original[..]);
        prop_assert_eq!(&first.trailers, &expected_trailers);
    }
    prop_assert_eq!(&replay.data[..], &original[..], "replayed bytes");
    prop_assert_eq!(&replay.trailers, &expected_trailers, "replayed trailers");
    Ok(())
}

fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
    // Empty chunks included: they must not disturb the replay.
    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..12)
}

fn trailers() -> impl Strategy<Value = Option<Vec<(String, String)>>> {
    proptest::option::of(proptest::collection::vec(
        ("x-[a-z]{1,6}", "[ -~]{0,12}").prop_map(|(k, v)| (k, v.trim().to_owned())),
        1..4,
    ))
}

fn reader() -> impl Strategy<Value = Reader> {
    prop_oneof![
        Just(Reader::ToEnd),
        Just(Reader::HyperLike),
        (0usize..14).prop_map(Reader::Drop),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Failures print their minimal input; no regression files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::with_cases(1000)
    })]

    /// Honest bodies of known size: replayed byte for byte, trailers included, however the
    /// first attempt read them.
    #[test]
    fn replay_reproduces_any_chunking_byte_for_byte(
        chunks in chunks(),
        trailers in trailers(),
        accurate_end in any::<bool>(),
        reader in reader(),
    ) {
        let total: usize = chunks.iter().map(Vec::len).sum();
        check(&Case { chunks, trailers, hint: None, accurate_end, cap: total.max(1) + 16, reader })?;
    }

    /// Any size hint (honest, unknown, lying) against any cap: never more than the cap kept,
    /// a body of unknown size is replayed whenever it ends within the cap, and whatever is
    /// replayed is the caller's body exactly.
    #[test]
    fn never_buffers_past_the_cap(
        chunks in chunks(),
        trailers in trailers(),
        hint in proptest::option::of(proptest::option::of(0u64..800)),
        accurate_end in any::<bool>(),
        cap in 0usize..600,
        reader in reader(),
    ) {
        check(&Case { chunks, trailers, hint, accurate_end, cap, reader })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(1000)
    })]

    /// Bodies of unknown size (chunked uploads, gRPC message streams): captured while they
    /// stream, replayed byte for byte when they end within the cap, passed through (the caller
    /// gets the 401) when they outgrow it; never more than the cap kept.
    #[test]
    fn unknown_size_bodies_are_captured_up_to_the_cap(
        chunks in chunks(),
        trailers in trailers(),
        accurate_end in any::<bool>(),
        cap in 0usize..800,
        reader in reader(),
    ) {
        check(&Case { chunks, trailers, hint: Some(None), accurate_end, cap, reader })?;
    }
}

/// The smallest case the property finds for the trailers bug: a known-size body with
/// trailers whose `is_end_stream` stays false (as `StreamBody`'s does), sent by a client that
/// stops polling after the trailers frame (as hyper's HTTP/1 and HTTP/2 clients do).
#[test]
fn trailers_survive_a_sender_that_stops_after_the_trailers_frame() {
    check(&Case {
        chunks: vec![b"abc".to_vec()],
        trailers: Some(vec![("x-checksum".into(), "1234".into())]),
        hint: None,
        accurate_end: false,
        cap: 1024,
        reader: Reader::HyperLike,
    })
    .unwrap();
}

/// Sends `body` (an in-memory body type) with a stale token; the inner service drops the
/// first attempt's body unread or reads it, per `read_first`, and answers 401. Returns the
/// bytes of every attempt the inner service read, and the final status.
fn run_in_memory<B>(body: B, read_first: bool) -> (Vec<(bool, Vec<u8>)>, StatusCode)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let refreshes = Arc::new(AtomicUsize::new(0));
    let inner = {
        let attempts = attempts.clone();
        service_fn(move |req: Request<ReplayBody<B>>| {
            let attempts = attempts.clone();
            async move {
                let stale = req.headers()[AUTHORIZATION] == "Bearer stale";
                let mut body = req.into_body();
                let replay = body.is_replay();
                let mut data = Vec::new();
                if !stale || read_first {
                    while let Some(frame) =
                        std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                    {
                        if let Ok(d) = frame.unwrap().into_data() {
                            data.extend_from_slice(&d);
                        }
                    }
                }
                attempts.lock().unwrap().push((replay, data));
                let status = if stale { 401 } else { 200 };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(String::new())
                        .unwrap(),
                )
            }
        })
    };
    let svc = RefreshLayer::new(counting(&refreshes, "fresh"))
        .initial_token(Token::bearer("stale").unwrap())
        .layer(inner);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let res = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                svc.oneshot(Request::post("/upload").body(body).unwrap()),
            )
            .await
        })
        .expect("no hang")
        .expect("no error");
    assert_eq!(refreshes.load(Ordering::SeqCst), 1);
    let attempts = attempts.lock().unwrap().clone();
    (attempts, res.status())
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(200)
    })]

    /// Bodies that are one chunk in memory (`Full<Bytes>`, `String`) skip the capture: the replay is their bytes exactly, whether or not the first attempt read
    /// them, and the first attempt still sends them whole.
    #[test]
    fn in_memory_bodies_are_replayed_byte_for_byte(
        text in "[ -~]{1,300}",
        kind in 0u8..2,
        read_first in any::<bool>(),
    ) {
        let bytes = text.clone().into_bytes();
        let (attempts, status) = match kind {
            0 => run_in_memory(http_body_util::Full::new(Bytes::from(bytes.clone())), read_first),
            _ => run_in_memory(text.clone(), read_first),
        };
        prop_assert_eq!(status, StatusCode::OK);
        prop_assert_eq!(attempts.len(), 2);
        prop_assert!(!attempts[0].0 && attempts[1].0);
        if read_first {
            prop_assert_eq!(&attempts[0].1, &bytes);
        }
        prop_assert_eq!(&attempts[1].1, &bytes, "replayed bytes");
    }
}
