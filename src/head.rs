//! The head of a response, kept as context for an error or a refresh, and the copy of a
//! request's head kept for its replay.

use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use http::{Extensions, HeaderMap, Method, StatusCode, Uri, Version};

/// The status line and headers of a response, kept as context for an error, and (for the
/// final refusal of [`UnauthorizedAfterRefresh`](crate::error::UnauthorizedAfterRefresh)) the start of its body.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

/// How much of a refused response's body an error keeps: 8 KiB.
pub const MAX_ERROR_BODY: usize = 8 * 1024;

impl ResponseHead {
    pub(crate) fn from_parts(parts: &http::response::Parts) -> Self {
        Self::new(parts.status, parts.version, parts.headers.clone())
    }

    pub(crate) fn new(status: StatusCode, version: Version, headers: HeaderMap) -> Self {
        Self {
            status,
            version,
            headers,
            body: Bytes::new(),
        }
    }

    pub(crate) fn with_body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }

    /// What refused the request, for messages: the HTTP status, or the gRPC status in the
    /// headers of an HTTP 200 (a trailers-only gRPC response, as `UNAUTHENTICATED` is).
    pub(crate) fn refusal(&self) -> Refusal<'_> {
        Refusal(self)
    }

    /// The response's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The response's headers (for instance `WWW-Authenticate`).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The first bytes (at most [`MAX_ERROR_BODY`], read within a second) of the response's
    /// body, where the layer kept them: the final refusal in
    /// [`UnauthorizedAfterRefresh::last`](crate::error::UnauthorizedAfterRefresh::last).
    /// Empty otherwise. For the whole response, use
    /// [`unauthorized_as_response`](crate::RefreshOptions::unauthorized_as_response).
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// See [`ResponseHead::refusal`].
pub(crate) struct Refusal<'a>(&'a ResponseHead);

impl std::fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = self.0;
        let grpc = head
            .headers
            .get("grpc-status")
            .filter(|_| head.status == StatusCode::OK);
        match grpc.map(|v| v.as_bytes().trim_ascii()) {
            Some(b"16") => f.write_str("gRPC status 16 (UNAUTHENTICATED)"),
            // A server's text: a few bytes of it.
            Some(code) => write!(
                f,
                "gRPC status {}",
                String::from_utf8_lossy(&code[..code.len().min(16)])
            ),
            None => write!(f, "{}", head.status),
        }
    }
}

impl std::fmt::Display for ResponseHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a {} response", self.refusal())
    }
}

impl std::error::Error for ResponseHead {}

/// Up to [`MAX_ERROR_BODY`] bytes of a response body, read within a second (a refusal's body
/// is small; a stream that never ends is cut off).
pub(crate) async fn body_prefix<ResBody: http_body::Body>(body: ResBody) -> bytes::Bytes {
    let mut kept = bytes::BytesMut::new();
    read_bounded(
        body,
        MAX_ERROR_BODY,
        std::time::Duration::from_secs(1),
        |chunk| kept.extend_from_slice(chunk),
    )
    .await;
    kept.freeze()
}

/// The most of a refusal's body [`drain`] reads before a replay.
pub(crate) const DRAIN_MAX: usize = 64 * 1024;

/// The longest [`drain`] waits for the rest of a refusal's body (OkHttp waits as long before
/// it gives up on reusing a connection).
pub(crate) const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads what is left of a refused response's body, then drops it: an HTTP/1.1 client (hyper's
/// pool, reqwest) hands a connection back to its pool only once the response on it was read to
/// its end, so the replay that follows can reuse it instead of opening a new one. Bounded: a
/// body announced or found larger than [`DRAIN_MAX`] is dropped (its connection closes, as it
/// would have), and the wait for more data is at most [`DRAIN_WAIT`].
pub(crate) async fn drain<ResBody: http_body::Body>(body: ResBody) {
    if body.is_end_stream()
        || body
            .size_hint()
            .exact()
            .is_some_and(|n| n > DRAIN_MAX as u64)
    {
        return;
    }
    read_bounded(body, DRAIN_MAX, DRAIN_WAIT, |_| {}).await;
}

/// Reads `body` to its end, an error, `max` bytes or `wait`, whichever comes first, handing
/// the data to `keep`. Without a timer (no Tokio runtime, or one without its time driver)
/// only what has arrived already is read (never a wait without a bound, never a panic).
async fn read_bounded<ResBody: http_body::Body>(
    body: ResBody,
    max: usize,
    wait: std::time::Duration,
    mut keep: impl FnMut(&[u8]),
) {
    use bytes::Buf;
    use http_body_util::BodyExt;
    let mut body = std::pin::pin!(body);
    let read = async {
        let mut read = 0;
        while read < max {
            let Some(Ok(frame)) = body.as_mut().frame().await else {
                return;
            };
            if let Ok(mut data) = frame.into_data() {
                while data.has_remaining() && read < max {
                    let chunk = data.chunk();
                    let n = chunk.len().min(max - read);
                    keep(&chunk[..n]);
                    read += n;
                    data.advance(n);
                }
            }
        }
    };
    if timer_here() {
        let _ = tokio::time::timeout(wait, read).await;
    } else {
        // No timer to bound a wait: only what has arrived already.
        let _ = futures_util::FutureExt::now_or_never(read);
    }
}

/// Whether a timer can bound a wait here: a Tokio runtime with its time driver. A runtime
/// built without `enable_time` panics at its first timer; that panic is caught here (the
/// panic hook prints it once per thread and runtime: the answer is remembered for the last
/// runtime each thread asked about).
pub(crate) fn timer_here() -> bool {
    use std::cell::Cell;
    thread_local! {
        static LAST: Cell<Option<(tokio::runtime::Id, bool)>> = const { Cell::new(None) };
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let id = runtime.id();
    if let Some((last, timer)) = LAST.get() {
        if last == id {
            return timer;
        }
    }
    let timer =
        std::panic::catch_unwind(|| drop(tokio::time::sleep(std::time::Duration::ZERO))).is_ok();
    LAST.set(Some((id, timer)));
    timer
}

/// A request's head, kept for its replay: `http::request::Parts` with the headers as a list.
///
/// Every request that may be replayed keeps one, in its future. A `Parts` clone copies the
/// header map (two allocations: its index and its entries) into 224 bytes; this keeps the
/// headers in one allocation (none for a request without headers) in 152 bytes, and builds
/// the map again only for a replay.
pub(crate) struct RequestCopy {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
    extensions: Extensions,
}

impl RequestCopy {
    /// A copy of `parts`, which carry no `Authorization` (the headers in the map's order,
    /// every value of a name).
    pub(crate) fn of(parts: &http::request::Parts) -> Self {
        Self::copy(parts, 0)
    }

    /// A copy of `parts` without the token the layer has just put in them (a replay sets a
    /// newer one; a request with an `Authorization` of its own is never the layer's).
    pub(crate) fn without_token(parts: &http::request::Parts) -> Self {
        Self::copy(parts, 1)
    }

    #[inline(always)]
    fn copy(parts: &http::request::Parts, tokens: usize) -> Self {
        // The URI first: its clone may take an atomic count, which waits for the stores
        // before it (the header list's are many).
        let uri = parts.uri.clone();
        let mut headers = Vec::new();
        let kept = parts.headers.len().saturating_sub(tokens);
        if kept > 0 {
            headers = Vec::with_capacity(kept);
            for (name, value) in &parts.headers {
                if tokens == 0 || name != AUTHORIZATION {
                    headers.push((name.clone(), value.clone()));
                }
            }
        }
        Self {
            method: parts.method.clone(),
            uri,
            version: parts.version,
            headers,
            extensions: parts.extensions.clone(),
        }
    }

    /// The head again, for the replay.
    pub(crate) fn into_parts(self) -> http::request::Parts {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        // The copy came from a map that held these entries, so the map can hold them again.
        let mut headers = HeaderMap::try_with_capacity(self.headers.len()).unwrap_or_default();
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        parts.method = self.method;
        parts.uri = self.uri;
        parts.version = self.version;
        parts.headers = headers;
        parts.extensions = self.extensions;
        parts
    }
}
