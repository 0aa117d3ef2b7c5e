//! What every service, middleware and handle holds: the token cell and the options.

use std::sync::Arc;

use crate::cell::TokenCell;
use crate::config::{RefreshOptions, RequestHead};
use crate::origin::{Origin, Origins};

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
        let Some(origin) = Origin::of_uri(head.uri()) else {
            // A relative URI: the inner service adds the origin (a gRPC channel, an
            // in-memory service). With an explicit allow-list its destination is unknown.
            return match options.origins {
                Origins::List(_) => Destination::Untouched,
                Origins::FirstSeen | Origins::Any => Destination::Attach,
            };
        };
        let allowed = match &options.origins {
            Origins::Any => true,
            Origins::List(list) => list.contains(&origin),
            Origins::FirstSeen => *self.cell.origin.get_or_init(|| origin.clone()) == origin,
        };
        if !allowed {
            Destination::Untouched
        } else if !options.allow_insecure_http && !origin.secure_or_loopback() {
            Destination::Insecure
        } else {
            Destination::Attach
        }
    }
}
