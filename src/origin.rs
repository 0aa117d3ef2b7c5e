//! Where the token may go: origins, the allow-list and the loopback rule.

use std::net::IpAddr;
use std::sync::Arc;

use http::Uri;
use http::uri::{Authority, Scheme};

/// An origin (scheme, host, port) that may receive the token.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    scheme: Scheme,
    host: String,
    port: u16,
    /// `https`/`wss`, or a loopback host: the token may go there without an opt-in.
    secure: bool,
    /// The authority as written where the origin came from: a request's authority with the
    /// same text matches without parsing its host and port again (the common case).
    written: Box<str>,
    /// For an origin bound in place of a request refused as plain HTTP ([`Origin::upgraded`]):
    /// that request's origin, which a layer clone allowing plain HTTP still sends to.
    plain: Option<Box<Origin>>,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        (&self.scheme, &self.host, self.port) == (&other.scheme, &other.host, other.port)
    }
}

impl Eq for Origin {}

/// Whether this layer can tell the origin of `scheme://authority`: a scheme with a known
/// default port, or an explicit port. Any other absolute URI never gets the token by the
/// first-seen or allow-list rules (it is not a relative URI).
pub(crate) fn judgeable(scheme: &Scheme, authority: &Authority) -> bool {
    matches!(scheme.as_str(), "https" | "http" | "wss" | "ws") || authority.port_u16().is_some()
}

/// The port of `scheme://authority`, the scheme's default if none is written.
pub(crate) fn port(scheme: &Scheme, authority: &Authority) -> Option<u16> {
    authority.port_u16().or_else(|| match scheme.as_str() {
        "https" | "wss" => Some(443),
        "http" | "ws" => Some(80),
        _ => None,
    })
}

/// Whether a token may go to `scheme://host` without TLS: loopback only.
pub(crate) fn secure_or_loopback(scheme: &Scheme, host: &str) -> bool {
    matches!(scheme.as_str(), "https" | "wss") || is_loopback(host)
}

impl Origin {
    pub(crate) fn of(scheme: &Scheme, authority: &Authority) -> Option<Self> {
        Some(Self {
            port: port(scheme, authority)?,
            scheme: scheme.clone(),
            host: authority.host().to_ascii_lowercase(),
            secure: secure_or_loopback(scheme, authority.host()),
            // Never the user information (it may hold a password, and `Debug` shows this).
            written: authority
                .as_str()
                .rsplit_once('@')
                .map_or(authority.as_str(), |(_, host)| host)
                .into(),
            plain: None,
        })
    }

    /// The same host over TLS (`http` → `https`, `ws` → `wss`; the default port becomes 443,
    /// another port stays): the origin a request refused as plain HTTP was meant for. `None`
    /// for another scheme.
    pub(crate) fn upgraded(&self) -> Option<Self> {
        let scheme = match self.scheme.as_str() {
            "http" => Scheme::HTTPS,
            "ws" => Scheme::try_from("wss").ok()?,
            _ => return None,
        };
        let port = if self.port == 80 { 443 } else { self.port };
        let written = if port == 443 {
            self.host.as_str().into()
        } else {
            format!("{}:{port}", self.host).into()
        };
        Some(Self {
            scheme,
            host: self.host.clone(),
            port,
            secure: true,
            written,
            plain: Some(Box::new(self.clone())),
        })
    }

    /// The origin to bind for a first request refused as plain HTTP: its host over TLS, or,
    /// for a scheme without a TLS form (`h2c://host:port`), that origin itself (not secure:
    /// the token goes there only through a clone that allows plain HTTP). Either way the
    /// refused request's host, never another.
    pub(crate) fn bound_for_refused(self) -> Self {
        self.upgraded().unwrap_or(self)
    }

    /// Whether `scheme://authority` is the plain origin this one was bound in place of.
    pub(crate) fn matches_plain(&self, scheme: &Scheme, authority: &Authority) -> bool {
        self.plain
            .as_ref()
            .is_some_and(|plain| plain.matches(scheme, authority))
    }

    /// Whether `scheme://authority` is this origin; allocates nothing (the request path).
    pub(crate) fn matches(&self, scheme: &Scheme, authority: &Authority) -> bool {
        self.scheme == *scheme
            && (authority.as_str() == &*self.written
                || (port(scheme, authority) == Some(self.port)
                    && self.host.eq_ignore_ascii_case(authority.host())))
    }

    /// Whether `scheme://authority` is this origin written exactly as where it came from
    /// (text only: `false` may still be the same origin spelled another way).
    #[cfg(feature = "reqwest")]
    pub(crate) fn written_as(&self, scheme: &str, authority: &str) -> bool {
        self.scheme.as_str() == scheme && *self.written == *authority
    }

    /// See [`secure_or_loopback`].
    pub(crate) fn secure(&self) -> bool {
        self.secure
    }

    #[cfg(test)]
    fn of_uri(uri: &Uri) -> Option<Self> {
        Self::of(uri.scheme()?, uri.authority()?)
    }

    /// Parses an allowed origin: `scheme://host[:port]`, nothing else (no user info, no path
    /// beyond `/`, no query).
    pub(crate) fn parse(s: &str) -> Result<Self, InvalidOrigin> {
        let uri: Uri = s.parse().map_err(|_| InvalidOrigin::new(s, "not a URI"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| InvalidOrigin::new(s, "no host"))?;
        if authority.as_str().contains('@') {
            return Err(InvalidOrigin::new(
                s,
                "user information is not part of an origin",
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(InvalidOrigin::new(
                s,
                "a path or query is not part of an origin",
            ));
        }
        let scheme = uri
            .scheme()
            .ok_or_else(|| InvalidOrigin::new(s, "no scheme"))?;
        Self::of(scheme, authority).ok_or_else(|| InvalidOrigin::new(s, "unknown scheme"))
    }
}

/// `localhost`, `127.0.0.0/8` and `::1`.
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Where the token may go.
#[derive(Debug, Clone)]
pub(crate) enum Origins {
    /// The origin of the first request with an absolute URI, fixed from then on (for one
    /// refused as plain HTTP, its host over TLS: [`Origin::upgraded`]).
    FirstSeen,
    /// These origins only.
    List(Arc<[Origin]>),
    /// Every origin (an explicit opt-in).
    Any,
}

/// An allowed origin that is not `scheme://host[:port]`.
///
/// The message says what is wrong without repeating the value (it may hold credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid origin: expected scheme://host[:port] ({reason})")]
pub struct InvalidOrigin {
    reason: &'static str,
}

impl InvalidOrigin {
    fn new(_value: &str, reason: &'static str) -> Self {
        Self { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_origin_upgrades_to_its_host_over_tls() {
        let up = |s: &str| Origin::of_uri(&s.parse().unwrap()).unwrap().upgraded();
        let origin = |s: &str| Origin::parse(s).unwrap();
        assert_eq!(
            up("http://Api.Example/x"),
            Some(origin("https://api.example"))
        );
        assert_eq!(
            up("http://api.example:80/"),
            Some(origin("https://api.example:443"))
        );
        assert_eq!(
            up("http://api.example:8080/"),
            Some(origin("https://api.example:8080"))
        );
        assert_eq!(up("ws://[::1]:9000/"), Some(origin("wss://[::1]:9000")));
        assert_eq!(up("foo://api.example:99/"), None);
        let secure = up("http://api.example/").unwrap();
        assert!(secure.secure());
        for (scheme, authority) in [("https", "api.example"), ("https", "API.example:443")] {
            let (scheme, authority) = (scheme.parse().unwrap(), authority.parse().unwrap());
            assert!(secure.matches(&scheme, &authority), "{authority}");
        }
        let (http, same) = ("http".parse().unwrap(), "api.example".parse().unwrap());
        assert!(!secure.matches(&http, &same));
    }

    #[test]
    fn allowed_origins_must_be_exactly_origins() {
        for ok in [
            "https://api.example.com",
            "https://api.example.com/",
            "http://127.0.0.1:8080",
        ] {
            assert!(Origin::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://api.example.com/v1/prefix",
            "https://user:pw@api.example.com",
            "https://api.example.com/?q=1",
            "api.example.com",
            "/relative",
            "",
        ] {
            let err = Origin::parse(bad).unwrap_err();
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }

    #[test]
    fn an_origin_matches_its_own_text_and_every_spelling_of_the_same_host_and_port() {
        let origin = Origin::parse("https://API.example.com").unwrap();
        let matches = |uri: &str| {
            let uri: Uri = uri.parse().unwrap();
            origin.matches(uri.scheme().unwrap(), uri.authority().unwrap())
        };
        for same in [
            "https://API.example.com/x",
            "https://api.example.com/x",
            "https://api.EXAMPLE.com:443/x",
        ] {
            assert!(matches(same), "{same}");
        }
        for other in [
            "http://api.example.com/x",
            "https://api.example.com:8443/x",
            "https://api.example.com.evil.test/x",
            "https://evil.test/x",
        ] {
            assert!(!matches(other), "{other}");
        }
        let with_user = Origin::of_uri(&"http://u:pw-123@127.0.0.1:8080/".parse().unwrap());
        let with_user = with_user.unwrap();
        assert!(!format!("{with_user:?}").contains("pw-123"));
        let again: Uri = "http://u:pw-123@127.0.0.1:8080/b".parse().unwrap();
        assert!(with_user.matches(again.scheme().unwrap(), again.authority().unwrap()));
        let first = Origin::of_uri(&"http://127.0.0.1:8080/a".parse().unwrap()).unwrap();
        assert_eq!(first, Origin::parse("http://127.0.0.1:8080").unwrap());
        assert_ne!(first, Origin::parse("http://127.0.0.1:8081").unwrap());
    }

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]", "LOCALHOST"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1", "localhost.example.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
