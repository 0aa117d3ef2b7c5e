//! The request protocol, written once for every front end (the tower future, the reqwest
//! middleware, the keyed layer): decide, wait, recover after a refusal, judge the replay.
//!
//! A front end only moves its own request and response types between these steps:
//!
//! 1. [`admit_into`] (the tower and keyed layers: the token goes straight into the request's
//!    headers) or `admit` (reqwest): pass through, fail, send now with the current token, or
//!    wait for a newer one.
//! 2. [`wait_for_token`]: the wait before a first send (no token, expired, or the token was
//!    just refused for another request and a refresh for it runs).
//! 3. [`judge`]: after a response, is it final, ours to recover, or a refusal after a wait?
//! 4. [`recover`]: the refresh (a token newer than the refused one) joined with the body's
//!    settling, then a replay or the first response back to the caller.
//! 5. [`refused_again`]: the replay's response is final; a second refusal is
//!    [`UnauthorizedAfterRefresh`](crate::error::UnauthorizedAfterRefresh). After a new proof
//!    (the same token), [`after_new_proof`] tells a refusal of the token, which no refresh
//!    preceded, from a second one: the former is refreshed for ([`refresh_for_later`]) and
//!    returned as it is, as a first refusal that cannot be replayed.

use std::future::Future;

use futures_util::future::join;
use http::header::AUTHORIZATION;
use http::{Extensions, HeaderMap, HeaderValue, Method, StatusCode, Uri};

use crate::cell::{Answer, FreshWait, Lookup, Need, Ticket, Unavailable, in_refresh};
use crate::config::{NoReplay, RequestHead, TokenRequest};
use crate::error::{Failure, UnauthorizedAfterRefresh};
use crate::head::ResponseHead;
use crate::refresher::RefreshReason;
use crate::shared::{Destination, Shared};

/// What to do with a request before its first send. `H` is what `Send` carries of the token:
/// its header, or nothing when it is in the request already (see [`admit_into`]).
#[derive(Debug)]
pub(crate) enum Admit<H = HeaderValue> {
    /// Send it untouched: no token, no refresh, no replay.
    Untouched,
    /// Fail it without sending anything.
    Fail(Failure),
    /// Send it now with this token.
    Send { ticket: Ticket, header: H },
    /// Wait for a token newer than `ticket`, then send it (`expired`: the token expired;
    /// otherwise there is none yet). Kept this small: every `admit` returns one.
    Wait { ticket: Ticket, expired: bool },
}

/// Step 1: the decision, without awaiting anything (the reqwest front end; the tower one
/// uses [`admit_into`]).
#[cfg(feature = "reqwest")]
#[inline(always)]
pub(crate) fn admit(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Admit {
    admit_to(shared, headers, extensions, || {
        shared.destination(&RequestHead::new(method, uri, headers))
    })
}

/// [`admit`] for a request known by its URL's text (the reqwest front end, for a layer
/// without an attach rule: no `http::Uri` is parsed).
#[cfg(feature = "reqwest")]
pub(crate) fn admit_url(
    shared: &Shared,
    scheme: &str,
    authority: &str,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Admit {
    admit_to(shared, headers, extensions, || {
        shared.destination_text(scheme, authority)
    })
}

/// Step 1 for a request taken apart (the tower and keyed layers): a usable token goes
/// straight into its headers, while the cell is locked for reading, so that no copy of the
/// header is moved around on the hot path.
#[inline(always)]
pub(crate) fn admit_into(shared: &Shared, parts: &mut http::request::Parts) -> Admit<()> {
    let gated = gate(&parts.headers, &parts.extensions, || {
        shared.destination(&RequestHead::new(&parts.method, &parts.uri, &parts.headers))
    });
    if let Some(decision) = gated {
        return decision;
    }
    grant(shared, |header| {
        parts.headers.insert(AUTHORIZATION, header.clone());
    })
}

#[cfg(feature = "reqwest")]
#[inline(always)]
fn admit_to(
    shared: &Shared,
    headers: &HeaderMap,
    extensions: &Extensions,
    destination: impl FnOnce() -> Destination,
) -> Admit {
    match gate(headers, extensions, destination) {
        Some(decision) => decision,
        None => grant(shared, HeaderValue::clone),
    }
}

/// The checks before a token: `None` when the request is the layer's to authenticate.
#[inline(always)]
fn gate<H>(
    headers: &HeaderMap,
    extensions: &Extensions,
    destination: impl FnOnce() -> Destination,
) -> Option<Admit<H>> {
    if not_ours(headers, extensions) {
        return Some(Admit::Untouched);
    }
    match destination() {
        Destination::Attach => None,
        Destination::Untouched => Some(Admit::Untouched),
        Destination::Insecure => Some(Admit::Fail(Failure::Insecure)),
    }
}

/// The cell's answer: a usable token's header goes to `use_header`.
#[inline(always)]
fn grant<H>(shared: &Shared, use_header: impl FnOnce(&HeaderValue) -> H) -> Admit<H> {
    match shared.cell().lookup_with(shared.options(), use_header) {
        Lookup::Usable { ticket, header, .. } => Admit::Send { ticket, header },
        Lookup::Stale { ticket, expired } => Admit::Wait { ticket, expired },
        Lookup::Cooling(cooling) => {
            Admit::Fail(Failure::Unavailable(Unavailable::Cooling(cooling), None))
        }
        Lookup::Ended(_) if shared.options().anonymous => Admit::Untouched,
        Lookup::Ended(cause) => Admit::Fail(Failure::Unavailable(Unavailable::Ended(cause), None)),
    }
}

/// Whether a request goes out untouched whatever its token cell would say: its own
/// `Authorization`, a token request, a request sent from inside a refresher, one the attach
/// rule leaves alone, or one for an origin no cell sharing the first-seen `origin` would send
/// the token to. The keyed layer asks this before it needs a key, so that such a request
/// never fails for having none (and never makes a cell).
pub(crate) fn untouched_by_any_cell(
    parts: &http::request::Parts,
    options: &crate::config::RefreshOptions,
    origin: &std::sync::OnceLock<crate::origin::Origin>,
) -> bool {
    not_ours(&parts.headers, &parts.extensions)
        || crate::shared::destination_unbound(
            options,
            origin,
            &RequestHead::new(&parts.method, &parts.uri, &parts.headers),
        ) == Destination::Untouched
}

/// A request the layer never authenticates, whatever its cell and destination: its own
/// `Authorization`, a token request, or one sent from inside a refresher.
#[inline(always)]
fn not_ours(headers: &HeaderMap, extensions: &Extensions) -> bool {
    has_authorization(headers) || extensions.get::<TokenRequest>().is_some() || in_refresh()
}

/// Whether the caller set an `Authorization` header of its own. Requests carry few headers
/// when they reach the layer: a look at each name costs less than hashing one.
#[inline]
fn has_authorization(headers: &HeaderMap) -> bool {
    if headers.keys_len() > 8 {
        return headers.contains_key(AUTHORIZATION);
    }
    headers.keys().any(|name| name == AUTHORIZATION)
}

/// The token a request that waited is sent with.
#[derive(Debug)]
pub(crate) struct Granted {
    pub(crate) ticket: Ticket,
    pub(crate) header: HeaderValue,
    /// A refresh the request waited for produced it: a refusal of it is final (no second
    /// refresh). `false`: the refresh failed inside the leeway and this is the token the
    /// layer held, still valid; the server never refused it, so a refusal now is a first
    /// refusal, recorded and recovered from as any other.
    pub(crate) refreshed: bool,
}

/// Step 2: waits for a token newer than `ticket` before the first send. `Ok(None)`: send the
/// request untouched (anonymous mode, no token can be had).
#[cfg(feature = "reqwest")]
pub(crate) async fn wait_for_token(
    shared: &Shared,
    ticket: Ticket,
    expired: bool,
) -> Result<Option<Granted>, Failure> {
    let answer = start_wait(shared, ticket, expired).await;
    waited(shared, answer)
}

/// Step 2 in two parts, for a front end that keeps the wait in its own state:
/// the wait itself (a small future that holds no borrow)…
pub(crate) fn start_wait(shared: &Shared, ticket: Ticket, expired: bool) -> FreshWait {
    tracing::trace!(
        generation = ticket.generation,
        "no usable token; waiting for a refresh"
    );
    let reason = if expired {
        RefreshReason::Expired
    } else {
        RefreshReason::NoToken
    };
    shared
        .cell()
        .wait_fresher_than(ticket, Need::BeforeSend, reason, shared.options())
}

/// …and what its answer means for the request.
// `Failure` is large only for its rare refresh variants.
#[allow(clippy::result_large_err)]
pub(crate) fn waited(shared: &Shared, answer: Answer) -> Result<Option<Granted>, Failure> {
    let options = shared.options();
    match answer {
        Ok(fresh) => Ok(Some(Granted {
            ticket: fresh.ticket,
            header: fresh.header,
            refreshed: true,
        })),
        Err(err @ (Unavailable::Failed(_) | Unavailable::Cooling(_))) => {
            // A refresh inside the leeway failed: the token is still valid until it expires
            // (with a cool-down or without one).
            match shared.cell().unexpired(options) {
                Some((ticket, header)) => Ok(Some(Granted {
                    ticket,
                    header,
                    refreshed: false,
                })),
                None => Err(Failure::Unavailable(err, None)),
            }
        }
        Err(Unavailable::Rejected(_) | Unavailable::Ended(_)) if options.anonymous => Ok(None),
        Err(err) => Err(Failure::Unavailable(err, None)),
    }
}

/// Adds the proof of possession, if the layer has one, to a send that carries the token.
// `Failure` is large only for its rare refresh variants; this path returns `Proof` alone.
#[allow(clippy::result_large_err)]
#[inline]
pub(crate) fn prove(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
) -> Result<(), Failure> {
    match &shared.options().proof {
        Some(proof) => proof.prove(method, uri, headers).map_err(Failure::Proof),
        None => Ok(()),
    }
}

/// Whether the response to a send is worth a look: it may ask for a refresh, or the layer
/// has a proof that watches every response.
#[inline]
pub(crate) fn interesting(shared: &Shared, status: StatusCode, headers: &HeaderMap) -> bool {
    shared.options().proof.is_some() || shared.options().triggers(status, headers)
}

/// Shows the proof a response to a proven send (a replay's); `true` if it asks for a new
/// proof (too late: the request was replayed already).
pub(crate) fn observe(shared: &Shared, uri: &Uri, status: StatusCode, headers: &HeaderMap) -> bool {
    shared
        .options()
        .proof
        .as_ref()
        .is_some_and(|proof| proof.wants_new_proof(uri, status, headers))
}

/// A placeholder URI for a front end that kept none (only a proof reads it, and a layer with
/// a proof always keeps the real one).
pub(crate) fn no_uri() -> &'static Uri {
    static NONE: std::sync::LazyLock<Uri> = std::sync::LazyLock::new(Uri::default);
    &NONE
}

/// How a request was sent, for [`judge`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    pub(crate) ticket: Ticket,
    /// It carries a token a refresh it waited for produced (a refusal is then final).
    pub(crate) waited: bool,
    /// It carries [`NoReplay`].
    pub(crate) no_replay: bool,
}

impl Sent {
    #[inline]
    pub(crate) fn new(ticket: Ticket, waited: bool, extensions: &Extensions) -> Self {
        Self {
            ticket,
            waited,
            no_replay: extensions.get::<NoReplay>().is_some(),
        }
    }
}

/// What a response means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The caller gets it.
    Final,
    /// A refusal of the token this request carried: refresh and replay.
    Recover,
    /// A refusal of a token this request waited for: no second refresh.
    RefusedAfterRefresh,
    /// The proof was refused (DPoP `use_dpop_nonce`): replay once with the same token and a
    /// new proof, no refresh.
    NewProof,
}

/// Step 3. `redirected`: the response came from a later hop than the request the layer sent
/// (a redirect followed below the layer); it never triggers a refresh or a replay.
pub(crate) fn judge(
    shared: &Shared,
    sent: Sent,
    uri: &Uri,
    status: StatusCode,
    headers: &HeaderMap,
    redirected: bool,
) -> Verdict {
    if let Some(proof) = &shared.options().proof {
        if !redirected && proof.wants_new_proof(uri, status, headers) {
            tracing::debug!(
                status = status.as_u16(),
                "the proof was refused; replaying with a new one"
            );
            return Verdict::NewProof;
        }
    }
    judge_token(shared, sent, status, headers, redirected)
}

/// [`judge`] once the proof is not in question: is the response a refusal of the token, and
/// what may follow it?
fn judge_token(
    shared: &Shared,
    sent: Sent,
    status: StatusCode,
    headers: &HeaderMap,
    redirected: bool,
) -> Verdict {
    if !shared.options().triggers(status, headers) {
        return Verdict::Final;
    }
    if redirected {
        tracing::debug!(
            status = status.as_u16(),
            "refusal from a redirect target; returned as it is"
        );
        return Verdict::Final;
    }
    if sent.no_replay {
        return Verdict::Final;
    }
    if sent.waited {
        tracing::warn!(
            generation = sent.ticket.generation,
            status = status.as_u16(),
            "request refused right after a token refresh"
        );
        return Verdict::RefusedAfterRefresh;
    }
    Verdict::Recover
}

/// What to do after a refusal.
#[derive(Debug)]
pub(crate) enum Recovery<T> {
    /// Give the caller the first response (not replayable, or inside a cool-down).
    ReturnFirst,
    /// Fail with this error (the first response's head is in it).
    Fail(Failure),
    /// Replay `T` with this token.
    Replay(T, Ticket, HeaderValue),
}

/// Step 4: gets a token newer than the refused one while the body settles (a server may answer
/// before reading it: the wait and the refresh overlap, and a request that turns out not to be
/// replayable still leaves a fresh token for later requests). `replayable` resolves to what
/// the replay needs, or `None`.
pub(crate) async fn recover<T>(
    shared: &Shared,
    sent: Sent,
    first: &ResponseHead,
    method: &Method,
    replayable: impl Future<Output = Option<T>>,
) -> Recovery<T> {
    let replayable = async {
        if shared.options().may_replay(method) {
            replayable.await
        } else {
            None
        }
    };
    let refresh = shared.cell().fresher_than(
        sent.ticket,
        Need::Refused,
        RefreshReason::Unauthorized(first.clone()),
        shared.options(),
    );
    let (fresh, replay) = join(refresh, replayable).await;
    let fresh = match fresh {
        Err(Unavailable::Cooling(_)) => {
            tracing::debug!(
                generation = sent.ticket.generation,
                "refused during a refresh cool-down; returned as it is"
            );
            return Recovery::ReturnFirst;
        }
        // Anonymous mode: the session ended under this request; its refusal is its answer.
        Err(Unavailable::Rejected(_) | Unavailable::Ended(_)) if shared.options().anonymous => {
            tracing::debug!(
                generation = sent.ticket.generation,
                "session ended while recovering; refusal returned (anonymous mode)"
            );
            return Recovery::ReturnFirst;
        }
        other => other,
    };
    let Some(replay) = replay else {
        tracing::debug!(
            generation = sent.ticket.generation,
            status = first.status().as_u16(),
            "request cannot be replayed; refreshed for later requests"
        );
        return Recovery::ReturnFirst;
    };
    match fresh {
        Ok(fresh) => {
            tracing::debug!(
                stale_generation = sent.ticket.generation,
                generation = fresh.ticket.generation,
                method = %method,
                "replaying request with a fresh token"
            );
            Recovery::Replay(replay, fresh.ticket, fresh.header)
        }
        Err(err) => Recovery::Fail(Failure::Unavailable(err, Some(first.clone()))),
    }
}

/// Step 5: is the replay (or the send after a wait) refused again?
pub(crate) fn refused_again(
    shared: &Shared,
    ticket: Ticket,
    status: StatusCode,
    headers: &HeaderMap,
) -> bool {
    let refused = shared.options().triggers(status, headers);
    if refused {
        tracing::warn!(
            generation = ticket.generation,
            status = status.as_u16(),
            "request refused again after a token refresh"
        );
    }
    refused
}

/// Step 5 after a new proof ([`Verdict::NewProof`]: the replay carried the same token and a
/// new proof): the replay's response judged as a first send's (`challenged`: it asked for a
/// new proof again, [`observe`]). Its one replay spent, what follows differs:
/// [`NewProof`](Verdict::NewProof) is a proof refused again and
/// [`RefusedAfterRefresh`](Verdict::RefusedAfterRefresh) a token refused again after the
/// refresh it waited for (both final: [`UnauthorizedAfterRefresh`], or the response with
/// `unauthorized_as_response`); [`Recover`](Verdict::Recover) is a first refusal of its token
/// (a server may check the proof first), which cannot be replayed: [`refresh_for_later`],
/// and the caller gets it as it is, as [`recover`] does for a refusal it cannot replay.
///
/// [`UnauthorizedAfterRefresh`]: crate::error::UnauthorizedAfterRefresh
pub(crate) fn after_new_proof(
    shared: &Shared,
    sent: Sent,
    challenged: bool,
    status: StatusCode,
    headers: &HeaderMap,
) -> Verdict {
    if challenged {
        tracing::warn!(
            status = status.as_u16(),
            "the proof was refused again on the replay with a new proof"
        );
        return Verdict::NewProof;
    }
    judge_token(shared, sent, status, headers, false)
}

/// Records the refusal of `sent`'s token and gets a newer one for later requests, through the
/// cell (one refresh however many requests ask), as [`recover`] does for a refusal it cannot
/// replay: the refresh is awaited, and its outcome (a new token, a cool-down, a failure, an
/// ended session) is for later requests to see; the caller of this one gets `refused` as it
/// is (never an error that would claim a refresh preceded the refusal).
pub(crate) async fn refresh_for_later(shared: &Shared, sent: Sent, refused: &ResponseHead) {
    let fresh = shared
        .cell()
        .fresher_than(
            sent.ticket,
            Need::Refused,
            RefreshReason::Unauthorized(refused.clone()),
            shared.options(),
        )
        .await;
    match fresh {
        Ok(fresh) => tracing::debug!(
            stale_generation = sent.ticket.generation,
            generation = fresh.ticket.generation,
            "refreshed for later requests; refusal returned"
        ),
        Err(Unavailable::Cooling(_)) => tracing::debug!(
            generation = sent.ticket.generation,
            "refused during a refresh cool-down; returned as it is"
        ),
        Err(Unavailable::Failed(_)) => tracing::debug!(
            generation = sent.ticket.generation,
            "refresh for later requests failed; refusal returned"
        ),
        // Later requests fail with `SessionEnded` (or go out untouched, anonymous); this one's
        // refusal is its answer.
        Err(Unavailable::Rejected(_) | Unavailable::Ended(_)) => tracing::debug!(
            generation = sent.ticket.generation,
            "session ended while refreshing for later requests; refusal returned"
        ),
    }
}

/// The error for a request refused again (`proof_refused`: its proof, on a replay with a new
/// one, without a refresh).
pub(crate) fn twice(
    first: Option<ResponseHead>,
    last: ResponseHead,
    proof_refused: bool,
) -> Failure {
    Failure::Twice(UnauthorizedAfterRefresh::new(first, last, proof_refused))
}
