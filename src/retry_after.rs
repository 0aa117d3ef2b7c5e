//! Reading a `Retry-After` header (RFC 9110 §10.2.3), for refreshers of any kind.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;

/// The delay a `Retry-After` header asks for: delay-seconds (`120`) or an HTTP-date in any of
/// the three formats of RFC 9110 §5.6.7 (IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, the
/// obsolete RFC 850 `Sunday, 06-Nov-94 08:49:37 GMT` and asctime `Sun Nov  6 08:49:37 1994`).
///
/// A date in the past is [`Duration::ZERO`]; a number too large for a `u64` saturates. `None`
/// when there is no header or it is neither form (a negative or fractional number, junk).
/// The delay is not capped: pass it to [`RefreshError::with_retry_after`](crate::RefreshError::with_retry_after),
/// and cap it first if the server is not trusted (the OAuth 2.0 refresher caps it at an
/// hour).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use http::{HeaderMap, HeaderValue, StatusCode};
/// use tower_auth_refresh::{retry_after, RefreshError};
///
/// /// What a closure refresher returns for a token endpoint's error answer.
/// fn refused(status: StatusCode, headers: &HeaderMap) -> RefreshError {
///     let err = RefreshError::from_status(status);
///     match retry_after(headers) {
///         Some(delay) => err.with_retry_after(delay.min(Duration::from_secs(600))),
///         None => err,
///     }
/// }
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", HeaderValue::from_static("3"));
/// assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
/// let err = refused(StatusCode::SERVICE_UNAVAILABLE, &headers);
/// assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
/// ```
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse(value, SystemTime::now())
}

/// `Retry-After` as seen at `now`.
fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // delay-seconds = 1*DIGIT; more digits than a u64 holds is a very long delay.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// 1994-11-06 08:49:37 UTC.
    fn sunday() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    #[test]
    fn all_three_http_date_formats() {
        let now = sunday() - Duration::from_secs(90);
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse(date, now), Some(Duration::from_secs(90)), "{date}");
        }
    }

    #[test]
    fn past_dates_are_zero() {
        let now = sunday() + Duration::from_secs(3600);
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse("Thu, 01 Jan 1970 00:00:00 GMT", SystemTime::now()),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn delay_seconds() {
        let now = sunday();
        assert_eq!(parse("0", now), Some(Duration::ZERO));
        assert_eq!(parse(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse("99999999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn junk_is_none() {
        let now = sunday();
        for junk in [
            "",
            "soon",
            "-5",
            "1.5",
            "+5",
            "5s",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
        ] {
            assert_eq!(parse(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn from_a_header_map() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
