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

/// A request's head, kept for its replay: `http::request::Parts` with the headers written
/// into one buffer ([`write_records`]).
///
/// Every request that may be replayed keeps one, in its future. A `Parts` clone copies the
/// header map (two allocations: its index and its entries) into 224 bytes, and a header value
/// made from a `&str` (`HeaderValue::from_str`, what `Request::builder().header(name, "…")`
/// makes) shares its bytes only once cloned: an allocation, an atomic exchange, and an atomic
/// count for each later clone and drop. This copies the headers' bytes into one allocation
/// (none for a request without headers of its own) in 144 bytes, and builds the map again
/// only for a replay.
pub(crate) struct RequestCopy {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    version: Version,
    /// The headers, as [`write_records`] writes them.
    headers: Box<[u8]>,
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
        // before it.
        let uri = parts.uri.clone();
        let mut headers = Box::default();
        if parts.headers.len() > tokens {
            let kept = || {
                parts
                    .headers
                    .iter()
                    .filter(|(name, _)| tokens == 0 || *name != AUTHORIZATION)
            };
            let mut buf = Vec::with_capacity(records_len(kept()));
            write_records(kept(), |bytes| buf.extend_from_slice(bytes));
            headers = buf.into_boxed_slice();
        }
        Self {
            method: parts.method.clone(),
            uri,
            version: parts.version,
            headers,
            extensions: parts.extensions.clone(),
        }
    }

    /// The head again, for the replay; `None` if a header cannot be made again (see
    /// [`read_records`]): the request is then not replayed.
    pub(crate) fn into_parts(self) -> Option<http::request::Parts> {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        read_records(&self.headers, &mut parts.headers)?;
        parts.method = self.method;
        parts.uri = self.uri;
        parts.version = self.version;
        parts.extensions = self.extensions;
        Some(parts)
    }
}

/// Bytes before each header's name and value in [`write_records`]' output: two lengths and a
/// flag.
pub(crate) const HEADER_PREFIX: usize = 2 * size_of::<usize>() + 1;

/// The bytes [`write_records`] writes for `headers`.
#[inline(always)]
pub(crate) fn records_len<'a>(
    headers: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) -> usize {
    headers.fold(0, |len, (name, value)| {
        len + HEADER_PREFIX + name.as_str().len() + value.len()
    })
}

/// Writes `headers` to `put`, one record after the other: the name's length and the value's
/// (native `usize`s), whether the value is sensitive (one byte), the name and the value. A
/// copy of the bytes, so that a request's headers are kept for a replay in one allocation
/// and its own values stay as they are (a clone would make the bytes of one made from a
/// `&str` shared: see [`RequestCopy`]).
#[inline(always)]
pub(crate) fn write_records<'a>(
    headers: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    mut put: impl FnMut(&[u8]),
) {
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        put(&name.len().to_ne_bytes());
        put(&value.len().to_ne_bytes());
        put(&[u8::from(value.is_sensitive())]);
        put(name);
        put(value.as_bytes());
    }
}

/// Appends the headers [`write_records`] wrote in `records` to `map`, each value keeping
/// whether it is sensitive. `None` if `records` is cut inside a record or a length runs past
/// its end (never a panic, never a made-up header; the records before stay appended), or if
/// a name or value is not one `http` accepts: every `HeaderValue` safe code can make passes
/// `HeaderValue::from_bytes` again; only one made with the `unsafe`
/// `from_maybe_shared_unchecked` in breach of its contract (bytes a header value may not
/// hold) does not.
pub(crate) fn read_records(mut rest: &[u8], map: &mut HeaderMap) -> Option<()> {
    while !rest.is_empty() {
        let (name_len, after) = rest.split_first_chunk()?;
        let (value_len, after) = after.split_first_chunk()?;
        let (&sensitive, after) = after.split_first()?;
        let name_len = usize::from_ne_bytes(*name_len);
        let value_len = usize::from_ne_bytes(*value_len);
        let (name, after) = after.split_at_checked(name_len)?;
        let (value, after) = after.split_at_checked(value_len)?;
        let name = HeaderName::from_bytes(name).ok()?;
        let mut value = HeaderValue::from_bytes(value).ok()?;
        value.set_sensitive(sensitive != 0);
        map.append(name, value);
        rest = after;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, HeaderMap, HeaderName, HeaderValue};
    use http::{Method, Request, Version};

    use super::{HEADER_PREFIX, RequestCopy, read_records, records_len, write_records};

    fn records(map: &HeaderMap) -> Vec<u8> {
        let mut out = Vec::new();
        write_records(map.iter(), |bytes| out.extend_from_slice(bytes));
        assert_eq!(out.len(), records_len(map.iter()));
        out
    }

    /// Every entry with its sensitivity, in the map's order.
    fn entries(map: &HeaderMap) -> Vec<(HeaderName, HeaderValue, bool)> {
        map.iter()
            .map(|(n, v)| (n.clone(), v.clone(), v.is_sensitive()))
            .collect()
    }

    fn a_map() -> HeaderMap {
        let mut secret = HeaderValue::from_static("session=s3cr3t");
        secret.set_sensitive(true);
        let mut map = HeaderMap::new();
        map.append("x-one", HeaderValue::from_static("1"));
        map.append(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        map.append(
            "X-Bytes",
            HeaderValue::from_bytes(b"caf\xc3\xa9 \x80\xff").unwrap(),
        );
        map.append("x-one", HeaderValue::from_str("2").unwrap());
        map.append(COOKIE, secret);
        map.append("x-empty", HeaderValue::from_static(""));
        let custom = HeaderName::from_bytes(String::from("x-custom-name").as_bytes()).unwrap();
        map.append(custom, HeaderValue::from_str("v").unwrap());
        map
    }

    /// The copy's head, made again for the replay, is the request's but the layer's token:
    /// method, URI, version, extensions, and every header in order with every value's bytes
    /// and sensitivity.
    #[test]
    fn a_request_copy_is_the_head_again_without_the_token() {
        #[derive(Clone, Debug, PartialEq)]
        struct Trace(u32);
        let mut req = Request::builder()
            .method(Method::PATCH)
            .uri("http://api.example/a?b=c")
            .version(Version::HTTP_10)
            .extension(Trace(7))
            .body(())
            .unwrap();
        *req.headers_mut() = a_map();
        let (mut parts, ()) = req.into_parts();
        let plain = RequestCopy::of(&parts).into_parts().unwrap();
        assert_eq!(entries(&plain.headers), entries(&parts.headers));
        // With the layer's token in the map (`insert`: where the map puts it), the copy
        // leaves it out.
        parts
            .headers
            .insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let again = RequestCopy::without_token(&parts).into_parts().unwrap();
        parts.headers.remove(AUTHORIZATION);
        assert_eq!(entries(&again.headers), entries(&parts.headers));
        assert_eq!(again.method, Method::PATCH);
        assert_eq!(again.uri, parts.uri);
        assert_eq!(again.version, Version::HTTP_10);
        assert_eq!(again.extensions.get::<Trace>(), Some(&Trace(7)));
        // Nothing but the token: nothing kept (no allocation), nothing made up.
        let mut only_token = HeaderMap::new();
        only_token.insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let (mut bare, ()) = Request::new(()).into_parts();
        bare.headers = only_token;
        let copy = RequestCopy::without_token(&bare);
        assert!(copy.headers.is_empty());
        assert!(copy.into_parts().unwrap().headers.is_empty());
    }

    /// Records cut or corrupted never panic and never make up a header: cut between two
    /// records they give exactly the headers before the cut; cut inside one, or with a length
    /// past the end, they give `None`.
    #[test]
    fn cut_or_corrupt_records_keep_whole_records_only_and_never_panic() {
        let map = a_map();
        let all = entries(&map);
        let text = records(&map);
        let mut ends = vec![0];
        for (name, value, _) in &all {
            ends.push(ends[ends.len() - 1] + HEADER_PREFIX + name.as_str().len() + value.len());
        }
        assert_eq!(ends[ends.len() - 1], text.len());
        for cut in 0..=text.len() {
            let mut got = HeaderMap::new();
            let read = read_records(&text[..cut], &mut got);
            match ends.iter().position(|&end| end == cut) {
                Some(whole) => {
                    assert_eq!(read, Some(()), "cut at {cut}");
                    assert_eq!(entries(&got), all[..whole], "cut at {cut}");
                }
                None => assert_eq!(read, None, "cut at {cut}"),
            }
        }
        // A name's or a value's length past the end: `None`.
        for at in [0, size_of::<usize>()] {
            for len in [usize::MAX, text.len()] {
                let mut bad = text.clone();
                bad[at..at + size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
                assert_eq!(read_records(&bad, &mut HeaderMap::new()), None);
            }
        }
        // A name `http` refuses: `None`.
        let mut bad = text.clone();
        bad[HEADER_PREFIX] = b' ';
        assert_eq!(read_records(&bad, &mut HeaderMap::new()), None);
    }
}
