//! What every service, middleware and handle holds: the token cell and the options.

use std::sync::Arc;

use crate::cell::TokenCell;
use crate::config::{RefreshOptions, RequestHead};
use crate::origin::{Origin, Origins, port, secure_or_loopback};

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
/// middleware and handle holds (two pointers).
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) cell: Arc<TokenCell>,
    pub(crate) options: Arc<RefreshOptions>,
}

impl Shared {
    /// Where the token may go for a request to `uri`.
    pub(crate) fn destination(&self, head: &RequestHead<'_>) -> Destination {
        let options = &self.options;
        if let Some(rule) = &options.attach_when {
            if !rule(head) {
                return Destination::Untouched;
            }
        }
        let uri = head.uri();
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return relative(&options.origins);
        };
        if port(scheme, authority).is_none() {
            // A scheme without a known port is not an origin this layer can judge.
            return relative(&options.origins);
        }
        // Compared in place: no allocation per request.
        let secure = match &options.origins {
            Origins::Any => secure_or_loopback(scheme, authority.host()),
            Origins::List(list) => match list.iter().find(|o| o.matches(scheme, authority)) {
                Some(origin) => origin.secure(),
                None => return Destination::Untouched,
            },
            Origins::FirstSeen => {
                let origin = match self.cell.origin.get() {
                    Some(origin) => origin,
                    None => match Origin::of_uri(uri) {
                        Some(first) => self.cell.origin.get_or_init(|| first),
                        None => return relative(&options.origins),
                    },
                };
                if !origin.matches(scheme, authority) {
                    return Destination::Untouched;
                }
                origin.secure()
            }
        };
        if !options.allow_insecure_http && !secure {
            Destination::Insecure
        } else {
            Destination::Attach
        }
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
