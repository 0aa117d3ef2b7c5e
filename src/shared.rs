//! What every service, middleware and handle holds: the token cell and the options.

use std::sync::{Arc, OnceLock};

use http::uri::{Authority, Scheme};

use crate::cell::TokenCell;
use crate::config::{RefreshOptions, RequestHead};
use crate::origin::{Origin, Origins, is_loopback, judgeable, secure_or_loopback};

/// Where the token may go for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Destination {
    /// Attach the token.
    Attach,
    /// Pass the request through untouched.
    Untouched,
    /// Plain `http://` to a host that is not loopback, not allowed.
    Insecure,
}

/// A cell and the options of the layer value that made a service: what every service,
/// middleware and handle holds, and what every request that may be replayed clones.
///
/// A [`RefreshLayer`](crate::RefreshLayer) keeps both behind one `Arc` (one atomic count per
/// request instead of two: measurable on the hot path); the keyed layer pairs a key's cell
/// with the layer's options per request, so it keeps two. Either way clones of a layer with
/// other options share the cell, never the options.
#[derive(Clone)]
pub(crate) struct Shared(Repr);

#[derive(Clone)]
enum Repr {
    One(Arc<Both>),
    Pair(Arc<TokenCell>, Arc<RefreshOptions>),
}

#[derive(Clone)]
struct Both {
    cell: Arc<TokenCell>,
    options: RefreshOptions,
}

impl Shared {
    /// A layer's: its cell and its own options, behind one pointer.
    pub(crate) fn new(cell: Arc<TokenCell>, options: RefreshOptions) -> Self {
        Self(Repr::One(Arc::new(Both { cell, options })))
    }

    /// A key's cell with the keyed layer's options.
    pub(crate) fn pair(cell: Arc<TokenCell>, options: Arc<RefreshOptions>) -> Self {
        Self(Repr::Pair(cell, options))
    }

    #[inline]
    pub(crate) fn cell(&self) -> &Arc<TokenCell> {
        match &self.0 {
            Repr::One(both) => &both.cell,
            Repr::Pair(cell, _) => cell,
        }
    }

    #[inline]
    pub(crate) fn options(&self) -> &RefreshOptions {
        match &self.0 {
            Repr::One(both) => &both.options,
            Repr::Pair(_, options) => options,
        }
    }

    /// The options, to change for this value only (a layer's setters): the cell stays shared.
    pub(crate) fn options_mut(&mut self) -> &mut RefreshOptions {
        match &mut self.0 {
            Repr::One(both) => &mut Arc::make_mut(both).options,
            Repr::Pair(_, options) => Arc::make_mut(options),
        }
    }

    /// Where the token may go for a request to `uri`.
    #[inline]
    pub(crate) fn destination(&self, head: &RequestHead<'_>) -> Destination {
        destination_for(self.options(), &self.cell().origin, head, true)
    }

    /// [`destination`](Self::destination) for an absolute URL given as text, for a layer
    /// without an attach rule: the reqwest front end, which has a `Url`, not an `http::Uri`.
    /// An origin written exactly as the URL's is judged on the text alone; anything else is
    /// parsed and judged as for an `http::Uri`.
    #[cfg(feature = "reqwest")]
    pub(crate) fn destination_text(&self, scheme: &str, authority: &str) -> Destination {
        let options = self.options();
        let written = |o: &&Origin| o.written_as(scheme, authority);
        let found = match &options.origins {
            Origins::FirstSeen => self.cell().origin.get().filter(written),
            Origins::List(list) => list.iter().find(written),
            Origins::Any => None,
        };
        if let Some(origin) = found {
            return secured(options, origin.secure());
        }
        match (scheme.parse::<Scheme>(), authority.parse::<Authority>()) {
            (Ok(scheme), Ok(authority)) => {
                destination_at(options, &self.cell().origin, &scheme, &authority, true)
            }
            // No host: nothing this layer can tell an origin of.
            _ => Destination::Untouched,
        }
    }
}

/// [`Shared::destination`] for every cell that shares the first-seen `origin` (the keyed
/// layer asks before it needs a key), binding nothing: an origin not yet bound is judged as
/// if it became the request's.
pub(crate) fn destination_unbound(
    options: &RefreshOptions,
    origin: &OnceLock<Origin>,
    head: &RequestHead<'_>,
) -> Destination {
    destination_for(options, origin, head, false)
}

/// Where the token may go for a request: not where the attach rule says no; else by the
/// allow-list or the first-seen `origin` (which the request's becomes, with `bind`, if none
/// is bound yet).
#[inline]
fn destination_for(
    options: &RefreshOptions,
    origin: &OnceLock<Origin>,
    head: &RequestHead<'_>,
    bind: bool,
) -> Destination {
    if options.rule_skips(head) {
        return Destination::Untouched;
    }
    destination_of(options, origin, head.uri(), bind)
}

#[inline]
fn destination_of(
    options: &RefreshOptions,
    origin: &OnceLock<Origin>,
    uri: &http::Uri,
    bind: bool,
) -> Destination {
    match (uri.scheme(), uri.authority()) {
        (Some(scheme), Some(authority)) => destination_at(options, origin, scheme, authority, bind),
        // A host without a scheme (the authority form of `CONNECT`): the connector picks the
        // transport, so it is judged as a scheme this layer does not know.
        (None, Some(authority)) => unknown_scheme(options, authority),
        (_, None) => relative(&options.origins),
    }
}

/// The origin check for `scheme://authority`. Compared in place: no allocation per request
/// (one, once, to bind the first-seen origin; and on the keyed layer's rare keyless look
/// before anything is bound).
fn destination_at(
    options: &RefreshOptions,
    origin: &OnceLock<Origin>,
    scheme: &Scheme,
    authority: &Authority,
    bind: bool,
) -> Destination {
    if !judgeable(scheme, authority) {
        return unknown_scheme(options, authority);
    }
    let secure = match &options.origins {
        Origins::Any => secure_or_loopback(scheme, authority.host()),
        Origins::List(list) => match list.iter().find(|o| o.matches(scheme, authority)) {
            Some(origin) => origin.secure(),
            None => return Destination::Untouched,
        },
        Origins::FirstSeen => match origin.get() {
            Some(origin) if origin.matches(scheme, authority) => origin.secure(),
            // Bound by a clone that refused this very plain-HTTP origin: a clone that
            // allows plain HTTP sends the token there, as if it had bound it first.
            Some(origin) if origin.matches_plain(scheme, authority) => false,
            Some(_) => return Destination::Untouched,
            None => match Origin::of(scheme, authority) {
                // Refused as plain HTTP: the token never goes there. The host it was meant
                // for becomes the first-seen origin (over TLS where the scheme has a TLS
                // form): a later `https` request to it gets the token, a request to another
                // host never does.
                Some(first) if !first.secure() && !options.allow_insecure_http => {
                    if bind {
                        origin.get_or_init(|| first.bound_for_refused());
                    }
                    return Destination::Insecure;
                }
                Some(first) if bind => {
                    // Another request may have bound another origin meanwhile.
                    let bound = origin.get_or_init(|| first);
                    if !bound.matches(scheme, authority) {
                        return Destination::Untouched;
                    }
                    bound.secure()
                }
                // Judged as if it became the first-seen origin.
                Some(first) => first.secure(),
                // Not reached: a judgeable origin has a port.
                None => return Destination::Untouched,
            },
        },
    };
    secured(options, secure)
}

/// Attach, unless the destination is not secure and plain HTTP was not allowed.
fn secured(options: &RefreshOptions, secure: bool) -> Destination {
    if !options.allow_insecure_http && !secure {
        Destination::Insecure
    } else {
        Destination::Attach
    }
}

/// An absolute URI with a host whose origin this layer cannot tell: a scheme without a known
/// default port and no port written (`foo://host/`), or no scheme at all (`host:port`). It is
/// not a relative URI: the connector decides where it goes, and may send it as plain HTTP to
/// that host (hyper-rustls' `https_or_http` does). It never becomes the first-seen origin, is
/// never on an allow-list, and with [`Origins::Any`] it is held to the plain-http rule (its
/// transport cannot be shown to be TLS): refused unless loopback or insecure http is allowed.
/// The rare path: a comparison or two, no allocation.
#[cold]
#[inline(never)]
fn unknown_scheme(options: &RefreshOptions, authority: &Authority) -> Destination {
    match &options.origins {
        // `https` and `wss` are judgeable: only a loopback host is secure here.
        Origins::Any => secured(options, is_loopback(authority.host())),
        Origins::FirstSeen | Origins::List(_) => Destination::Untouched,
    }
}

/// A URI without a scheme and host: the inner service adds the origin (a gRPC channel, an
/// in-memory service). With an explicit allow-list its destination is unknown.
fn relative(origins: &Origins) -> Destination {
    match origins {
        Origins::List(_) => Destination::Untouched,
        Origins::FirstSeen | Origins::Any => Destination::Attach,
    }
}
