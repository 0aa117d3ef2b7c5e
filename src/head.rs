//! The head of a response, kept as context for an error or a refresh.

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Version};

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

impl std::fmt::Display for ResponseHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a {} response", self.status)
    }
}

impl std::error::Error for ResponseHead {}

/// Up to [`MAX_ERROR_BODY`] bytes of a response body, read within
/// a second when a runtime is there (a refusal's body is small; a stream that never ends is
/// cut off).
pub(crate) async fn body_prefix<ResBody: http_body::Body>(body: ResBody) -> bytes::Bytes {
    use http_body_util::BodyExt;
    let max = MAX_ERROR_BODY;
    let mut kept = bytes::BytesMut::new();
    let mut body = std::pin::pin!(body);
    let read = async {
        while kept.len() < max {
            match body.as_mut().frame().await {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        use bytes::Buf;
                        while data.has_remaining() && kept.len() < max {
                            let chunk = data.chunk();
                            let n = chunk.len().min(max - kept.len());
                            kept.extend_from_slice(&chunk[..n]);
                            data.advance(n);
                        }
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
    };
    if crate::cell::has_runtime() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), read).await;
    } else {
        read.await;
    }
    kept.freeze()
}
