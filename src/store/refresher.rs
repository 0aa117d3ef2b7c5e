//! The store protocol as a refresher decorator.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{CasOutcome, Lease, Record, StoreError, TokenStore, digest};
use crate::refresher::{LoggedOut, RefreshContext, RefreshError, TokenRefresher};
use crate::token::Token;

/// A [`TokenRefresher`] that shares one token set among processes through a [`TokenStore`].
///
/// It wraps your refresher and runs the store protocol described in the [module
/// documentation](super) on every refresh the layer asks for: adopt a newer stored token,
/// else take the lease, refresh with the **stored** refresh token (handed to your refresher as
/// `ctx.stale().refresh_token()`; a new login's own, see [below](#logouts-and-new-logins)),
/// compare-and-set the new set, release. Your refresher is
/// called only by the lease holder, so with rotating refresh tokens exactly one process spends
/// each refresh token.
///
/// # Logouts and new logins
///
/// The stored session is the one this process follows, unless the layer hands it another:
///
/// - After [`TokenHandle::clear`](crate::TokenHandle::clear) (which calls
///   [`logout`](TokenRefresher::logout), passed on to your refresher), every refresh is a
///   login until one succeeds and is stored: a refresh without a token (a forced one) never adopts or
///   refreshes the stored session (your refresher is called without a token, and what it
///   returns, if anything, is stored as a new login), and a token installed since is
///   refreshed from itself. A refresh that fails, or one that was already running at the
///   logout, does not end the logout. This logs out this process only: the other processes,
///   and this one after a restart, follow the stored session until
///   [`log_out_everywhere`](Self::log_out_everywhere) replaces it with a logged-out record.
/// - A token installed with [`TokenHandle::set_token`](crate::TokenHandle::set_token) (or
///   `initial_token`) whose refresh token the store does not know (neither the stored one,
///   nor one of the last [`SUPERSEDED_KEPT`](super::SUPERSEDED_KEPT) it replaced, nor one this
///   process got through the store) is a new login: its refresh token is presented, the
///   stored set is never adopted over it, and the result is stored for every process. A token
///   without a refresh token counts as a new login only when installed after a logout.
/// - A token the store knows follows the store: a newer stored set is adopted, the stored
///   refresh token is presented (a stored set without one, a login by a refresher that gets
///   none, is refreshed as it is: never with this process's own, older refresh token). A
///   login's set becomes one the store knows once it is
///   stored: a login whose write lost to another process stays a login until it is.
///
/// # A refused refresh token
///
/// When the token endpoint refuses the stored session's refresh token (a terminal error of
/// your refresher; of the built-in OAuth 2.0 refresher, an `invalid_grant` answer: a wrong
/// client secret in one process does not end the others' session) and no process stored
/// anything newer, the lease holder writes that to the store (a digest of
/// the refused token, never the token) before it gives the lease back. Every other process,
/// waiting for the lease or refreshing later, then fails with the same kind of terminal
/// error without a token call: one token call ends the session for all. A new login stored
/// later replaces that record.
///
/// Your refresher should attach the refresh token it got back to the token it returns
/// ([`Token::with_refresh_token`]); if it returns none, the stored one is kept. The token
/// handed to the layer carries the absolute expiry and the refresh token.
///
/// # When the store fails
///
/// - **Store unreachable** (Redis down, an I/O error): every refresh fails with a transient
///   error ([`RefreshError::transient`], a [`StoreError`] for which
///   [`is_unavailable`](StoreError::is_unavailable) holds) *before* your refresher is called,
///   since refreshing without the lease could spend a refresh token another process is
///   about to present. The layer retries with its backoff; requests whose access token is
///   still valid keep working, the others fail with
///   [`RefreshFailed`](crate::error::RefreshFailed) until the store is back, and then
///   refreshes work again with no other action.
/// - **The write fails after the token endpoint answered**: the new token set is still
///   returned to this process (the refresh token it presented may be spent on the server), and
///   this process remembers that its set is newer than the stored record. As long as that
///   record is still the stored one (nobody wrote since), the next refresh of this process
///   presents its own new refresh token, not the stored spent one, and writes the result
///   back; with a keyed refresher, also after the keyed layer evicted the key's cell (the
///   rebuilt cell refreshes without a token), but not after a logout. Until then, another
///   process that refreshes from the stored record presents the spent refresh token: with a
///   server that detects reuse, that ends its session (and may revoke the whole token
///   family); with one that does not, that process records the refusal, and this process's
///   set stays the live one (its next refresh stores it over the refusal). This memory does
///   not survive a restart of the process.
/// - **The write loses its lease** (the store restarted or was flushed during the token call,
///   or a slow write landed after the lease's TTL) and nobody stored anything newer: the new
///   set is written under a lease taken again (a few tries, at most 250 ms apart), so the
///   other processes follow it; if that fails too, it is kept as above.
/// - **A corrupt record** ([`is_corrupt`](StoreError::is_corrupt)) fails every refresh, before
///   any token call, until it is removed.
///
/// With DPoP, every process sharing the store must prove with the same key (see the `dpop`
/// module): the stored tokens are bound to it.
///
/// # Time limits
///
/// One refresh through the store waits for another process's lease for at most
/// [`lease_wait`](Self::lease_wait), then calls your refresher under its own lease for at
/// most what is left of [`lease_ttl`](Self::lease_ttl) (less a safety margin). Once your
/// refresher is called, the call and the write of its answer run to their end on a task of
/// their own (on the current Tokio runtime), holding the lease: the layer's
/// [`refresh_timeout`](crate::RefreshOptions::refresh_timeout) (and the total bound of its
/// [`Backoff`](crate::Backoff)) bounds how long the layer waits, not the call. A token call
/// the layer stopped waiting for still stores the set the token endpoint gave (the endpoint
/// may have rotated the refresh token), and the layer's next attempt, or another process,
/// adopts it instead of presenting the spent refresh token; the lease is given back when the
/// call has answered and its answer is written, or when its time under the lease is up.
/// **Set `refresh_timeout` above `lease_wait + lease_ttl`** all the same, so that the layer
/// does not give up on a call that answers in time: the defaults fit (17 s of waiting plus at
/// most 10.8 s under a 12 s lease is within the default 30 s `refresh_timeout`). (A write
/// that lost its lease is tried again for up to about 1 s more, a few store calls: the rare
/// case of a store that restarted or slowed down during the token call.) A refresh dropped
/// before its token call gives its lease back at once (best effort: a release task is
/// spawned on the current Tokio runtime, if there is one; without one, a Redis lease is kept
/// until its TTL runs out).
/// The file store holds its OS lock until a write already started has finished, even if the
/// refresh is dropped meanwhile.
///
/// # Example
///
/// ```
/// use tower_auth_refresh::store::{MemoryStore, StoreRefresher};
/// use tower_auth_refresh::{context_fn, RefreshContext, RefreshError, RefreshLayer, Token};
///
/// let refresher = context_fn(|ctx: RefreshContext| async move {
///     let refresh_token = ctx.stale().and_then(|t| t.refresh_token()).unwrap_or("initial");
///     let _ = refresh_token; // present it to the token endpoint
///     Ok::<_, RefreshError>(Token::bearer("access")?.with_refresh_token("rotated"))
/// });
/// let shared = StoreRefresher::new(refresher, MemoryStore::new())
///     .lease_ttl(std::time::Duration::from_secs(10));
/// let layer = RefreshLayer::new(shared);
/// # let _ = layer;
/// ```
pub struct StoreRefresher<R, S> {
    inner: Arc<Inner<R, S>>,
}

struct Inner<R, S> {
    refresher: R,
    store: S,
    lease_ttl: Duration,
    lease_wait: Option<Duration>,
    min_remaining: Duration,
    unstored: Arc<Unstored>,
    lineage: Arc<Lineage>,
    /// The logouts ([`TokenRefresher::logout`]), and the last one a login ended.
    logout: Arc<Logout>,
}

/// The logouts of a session (of one key, for a keyed refresher), counted: a refresh reads the
/// count when the layer asks for it, and it is logged out if a logout came that no login
/// ended since. A login ends the logouts up to the count its refresh read, once that refresh
/// succeeded: a refresh that fails (transiently, say) ends nothing, and a logout that comes
/// while a refresh runs is never ended by that refresh.
#[derive(Debug, Default)]
pub(super) struct Logout {
    logouts: AtomicU64,
    ended: AtomicU64,
}

impl Logout {
    pub(super) fn log_out(&self) {
        self.logouts.fetch_add(1, Ordering::SeqCst);
    }

    /// The logouts so far: what a refresh starting now has seen.
    fn seen(&self) -> u64 {
        self.logouts.load(Ordering::SeqCst)
    }

    /// Whether a logout that a refresh which saw `seen` logouts knows of is still in force.
    fn in_force(&self, seen: u64) -> bool {
        seen > self.ended.load(Ordering::SeqCst)
    }

    /// Whether the last logout is still in force.
    pub(super) fn logged_out(&self) -> bool {
        self.in_force(self.seen())
    }

    /// A login after `seen` logouts succeeded: they are over.
    fn end(&self, seen: u64) {
        self.ended.fetch_max(seen, Ordering::SeqCst);
    }
}

/// Digests of the refresh tokens this process handed to its layer from the store protocol
/// (adopted or refreshed): a stale token that carries one of them, or one the stored record
/// knows ([`Record::knows`]), belongs to the stored session and follows it; any other is a
/// login from outside (`TokenHandle::set_token`, `initial_token`). Shared by a keyed
/// refresher's keys (refresh tokens are never shared among principals). At most
/// [`LINEAGE_KEPT`], the oldest forgotten first.
#[derive(Default)]
pub(super) struct Lineage(Mutex<(HashSet<String>, VecDeque<String>)>);

/// How many refresh tokens [`Lineage`] remembers: a few per principal of a full keyed layer.
const LINEAGE_KEPT: usize = 4 * UNSTORED_KEPT;

impl Lineage {
    fn learn(&self, token: &Token) {
        let Some(rt) = token.refresh_token() else {
            return;
        };
        let d = digest(rt);
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, order) = &mut *kept;
        if set.insert(d.clone()) {
            order.push_back(d);
            if order.len() > LINEAGE_KEPT {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    }

    fn knows(&self, refresh_token: &str) -> bool {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.0.contains(&digest(refresh_token))
    }
}

/// Token sets this process got from the token endpoint but could not store (the write
/// failed), each with the record it was refreshed from. While that record is still the stored
/// one, the stored refresh token is spent (rotated away by that refresh) and this process's
/// own set is the newest: the next refresh starts from it and writes its result back.
///
/// One entry per record refreshed from, i.e. per principal (a keyed refresher shares this
/// among its keys), with the refresh tokens spent on the way to it (a layer that stopped
/// waiting for those refreshes still holds one); dropped once a set of its chain is stored,
/// or, with a record, once a set refreshed from that record is stored or the record is
/// replaced (entries without a record, of stores that lost theirs, stay apart per chain). At
/// most [`UNSTORED_KEPT`] (the keyed layer's default capacity): dropping an entry early makes
/// that principal's next refresh present the stored, spent refresh token, so the cap is far
/// above one outage's worth for most applications, and dropping one is logged.
#[derive(Default)]
pub(super) struct Unstored(Mutex<std::collections::VecDeque<Pending>>);

struct Pending {
    /// The record the set was refreshed from (`None`: there was none).
    from: Option<Record>,
    /// The newest set, with its refresh token.
    newest: Token,
    /// A login from outside that lost its write to the session it replaces: `from` is that
    /// session's record, which may move on.
    login: bool,
    /// The refresh tokens presented on the way to `newest` (each refresh from a set kept
    /// here presents that set's, or one spent before it), oldest first, at most
    /// [`PRESENTED_KEPT`]: a layer that stopped waiting for those refreshes still holds a set
    /// that carries one of them, all spent.
    presented: Vec<String>,
}

impl Pending {
    /// Whether `refresh_token` is of this set's chain: its own, or one presented on the way.
    fn carries(&self, refresh_token: &str) -> bool {
        self.newest.refresh_token() == Some(refresh_token)
            || self.presented.iter().any(|t| t == refresh_token)
    }
}

/// How many spent refresh tokens a kept set remembers (see [`Pending::presented`]).
const PRESENTED_KEPT: usize = 8;

/// How many unstored token sets are remembered (one per principal whose write failed).
const UNSTORED_KEPT: usize = 10_000;

impl Unstored {
    fn pending(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Pending>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This process's own newer set, if `record` is still the record it was refreshed from
    /// and the layer still holds that set (`stale` carries its refresh token), or one it was
    /// refreshed from along the way (the layer stopped waiting for those refreshes), or holds
    /// no refresh token at all (a keyed layer rebuilt the key's cell after an eviction or
    /// `remove`; records are per principal, so the set refreshed from `record` is this
    /// principal's). Also when `record` only says that another process presented the spent
    /// refresh token of the record it was refreshed from and was refused: this set is the
    /// session's live one. A set whose record was replaced otherwise (another process wrote)
    /// is forgotten. Not asked after a logout: a logged-out session is never resumed.
    fn find(&self, record: Option<&Record>, stale: Option<&Token>) -> Option<Token> {
        let mut pending = self.pending();
        let at = match stale.and_then(Token::refresh_token) {
            Some(held) => pending
                .iter()
                .position(|p| p.newest.refresh_token() == Some(held))
                .or_else(|| {
                    // The layer never got the set (its refresh was cut off, and the set was
                    // kept when its write failed): it still holds one the set was refreshed
                    // from, which carries a refresh token presented on the way.
                    pending.iter().position(|p| !p.login && p.carries(held))
                })?,
            None => {
                let record = record?;
                pending.iter().position(|p| {
                    p.from.as_ref() == Some(record)
                        || refused_after(Some(record), p.from.as_ref())
                        || replaced_since(record, p)
                })?
            }
        };
        // A store that lost its record (restarted empty, flushed) holds nothing newer than a
        // set of this principal's chain (matched by the refresh token the layer holds).
        let emptied = record.is_none() && stale.is_some_and(|s| s.refresh_token().is_some());
        if pending[at].from.as_ref() == record
            || emptied
            || refused_after(record, pending[at].from.as_ref())
            || (stale.is_none() && record.is_some_and(|r| replaced_since(r, &pending[at])))
        {
            return Some(pending[at].newest.clone());
        }
        pending.remove(at);
        None
    }

    /// A login's own newer set whose write failed, if `stale` carries its refresh token or
    /// one presented on the way to it (the layer stopped waiting for that refresh): the
    /// login goes on from it instead of presenting a spent refresh token.
    fn find_login(&self, stale: Option<&Token>) -> Option<Token> {
        let held = stale.and_then(Token::refresh_token)?;
        self.pending()
            .iter()
            .find(|p| p.login && p.carries(held))
            .map(|p| p.newest.clone())
    }

    /// Remembers `newest`, refreshed from `from` by presenting `presented`, as not stored, in
    /// place of an earlier set refreshed from the same record.
    fn remember(
        &self,
        from: Option<Record>,
        newest: Token,
        login: bool,
        presented: Option<String>,
    ) {
        let mut pending = self.pending();
        // An earlier kept set (of the same kind) this one was refreshed from: it presented
        // that set's refresh token, or one spent on the way to it (the layer still held an
        // older set). Refresh tokens are per principal, so it is this principal's, whatever
        // record each was refreshed from. The tokens spent on the way stay known, so that a
        // layer that still holds one of them finds this set.
        let ancestor =
            |p: &Pending| p.login == login && presented.as_deref().is_some_and(|t| p.carries(t));
        let mut spent: Vec<String> = Vec::new();
        for t in pending
            .iter()
            .filter(|p| ancestor(p))
            .flat_map(|p| p.presented.iter())
        {
            if !spent.contains(t) {
                spent.push(t.clone());
            }
        }
        // In place of its ancestors, and of the earlier set refreshed from the same record
        // (records are per principal); without a record, only of its ancestors (a keyed
        // refresher's principals whose stores all lost their records have `None` alike).
        pending.retain(|p| !ancestor(p) && (p.from != from || from.is_none()));
        if let Some(t) = presented {
            if !spent.contains(&t) {
                spent.push(t);
            }
        }
        if spent.len() > PRESENTED_KEPT {
            spent.drain(..spent.len() - PRESENTED_KEPT);
        }
        let presented = spent;
        if pending.len() >= UNSTORED_KEPT {
            pending.pop_front();
            tracing::warn!(
                kept = UNSTORED_KEPT,
                "token store: forgot the oldest token set that could not be stored"
            );
        }
        pending.push_back(Pending {
            from,
            newest,
            login,
            presented,
        });
    }

    /// Forgets the sets kept of a session `written` went through (its record's refresh token
    /// is one `written` supersedes): a login stored since replaces them (a later refresh or
    /// eviction must not resume one). `logins`: the kept logins too; a logout for every
    /// process forgets the session's own sets only (a login kept beside it is a new session,
    /// stored over the logout).
    fn forget_replaced(&self, written: &Record, logins: bool) {
        self.pending().retain(|p| {
            (p.login && !logins)
                || !p
                    .from
                    .as_ref()
                    .and_then(|f| f.refresh_token.as_deref())
                    .is_some_and(|rt| written.knows(rt))
        });
    }

    /// Whether `refresh_token` is of a chain of this process's kept sets (not a login's): a
    /// token of the stored session, whose record the store may have lost since.
    fn knows(&self, refresh_token: &str) -> bool {
        self.pending()
            .iter()
            .any(|p| !p.login && p.carries(refresh_token))
    }

    /// Forgets the set refreshed from `from`: stored, or replaced by another process's.
    /// `presented`: the refresh token the stored refresh presented; the kept set it was
    /// refreshed from, and the sets before it, are forgotten too. Without a record, only
    /// those: a keyed refresher's principals whose stores lost their records all have `None`.
    fn forget(&self, from: Option<&Record>, presented: Option<&str>) {
        self.pending().retain(|p| {
            let same_record = from.is_some() && p.from.as_ref() == from;
            let of_the_chain = presented.is_some_and(|t| p.carries(t));
            !(same_record || of_the_chain)
        });
    }

    /// The refresh tokens spent on the way to `newest`, a kept set (none if it is not).
    fn spent_before(&self, newest: &Token) -> Vec<String> {
        self.pending()
            .iter()
            .find(|p| {
                p.newest.refresh_token().is_some()
                    && p.newest.refresh_token() == newest.refresh_token()
            })
            .map(|p| p.presented.clone())
            .unwrap_or_default()
    }
}

/// True if `p` is a login that lost its write and `record` is a later record of the session it
/// replaced (it went through that session's refresh token at the loss), not one that went
/// through the login's own set (stored since: the stored set is newer).
fn replaced_since(record: &Record, p: &Pending) -> bool {
    p.login
        && p.newest
            .refresh_token()
            .is_some_and(|own| !record.knows(own))
        && p.from
            .as_ref()
            .and_then(|f| f.refresh_token.as_deref())
            .is_some_and(|rt| record.knows(rt))
}

/// True if `record` is the refusal recorded right after `from` of `from`'s own refresh token:
/// another process presented it (spent by this process, whose write of the successor failed)
/// and the token endpoint refused it.
fn refused_after(record: Option<&Record>, from: Option<&Record>) -> bool {
    let (Some(record), Some(from)) = (record, from) else {
        return false;
    };
    record.is_refused()
        && from.version().checked_add(1) == Some(record.version())
        && from.refresh_token.as_deref().map(digest) == record.refused
}

impl<R, S> Clone for StoreRefresher<R, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<R, S: fmt::Debug> fmt::Debug for StoreRefresher<R, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreRefresher")
            .field("store", &self.inner.store)
            .field("lease_ttl", &self.inner.lease_ttl)
            .field("lease_wait", &self.wait_budget())
            .field("min_remaining", &self.inner.min_remaining)
            .finish_non_exhaustive()
    }
}

/// The default lease TTL, 12 s: the token call under it gets up to 10.8 s (the TTL less its
/// 1/10 safety margin), more than the OAuth 2.0 refresher's 10 s timeout; and the default wait
/// for another process's lease (17 s) plus one call under the lease fits in the layer's
/// default 30 s [`refresh_timeout`](crate::RefreshOptions::refresh_timeout).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(12);

/// The longest lease TTL [`StoreRefresher::lease_ttl`] takes: a holder that dies blocks the
/// other processes for up to its TTL.
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// A stored token with less than this left is not adopted.
pub const DEFAULT_MIN_REMAINING: Duration = Duration::from_secs(5);

/// The longest single wait for a change before the lease is tried again.
const WAIT_SLICE: Duration = Duration::from_millis(250);

/// The least safety margin kept between the end of the token call and the end of the lease.
const MIN_LEASE_MARGIN: Duration = Duration::from_millis(5);

/// How long before its lease runs out the token call is cut off: 1/10 of the TTL, at least
/// [`MIN_LEASE_MARGIN`] (at most half the TTL). It leaves time for the compare-and-set, and
/// covers the store's clock running a little faster than this process's.
fn lease_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(MIN_LEASE_MARGIN).min(ttl / 2)
}

/// The least time left for the token call that is worth starting it: 1/4 of the TTL. With
/// less (the store answered very slowly), the lease is given back and the refresh fails
/// transiently without a token call: a call cut off in flight may spend the refresh token
/// for a result that is lost.
fn min_call_time(ttl: Duration) -> Duration {
    ttl / 4
}

impl<R, S> StoreRefresher<R, S> {
    /// Wraps `refresher` so that every process using `store` shares its token set.
    pub fn new(refresher: R, store: S) -> Self {
        Self::with_memory(
            refresher,
            store,
            Arc::default(),
            Arc::default(),
            Arc::default(),
        )
    }

    /// [`new`](Self::new), remembering unstored token sets in `unstored` and the session's
    /// refresh tokens in `lineage` (both shared by the keyed refresher among its keys), and
    /// the logouts in `logout` (the key's).
    pub(super) fn with_memory(
        refresher: R,
        store: S,
        unstored: Arc<Unstored>,
        lineage: Arc<Lineage>,
        logout: Arc<Logout>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                refresher,
                store,
                lease_ttl: DEFAULT_LEASE_TTL,
                lease_wait: None,
                min_remaining: DEFAULT_MIN_REMAINING,
                unstored,
                lineage,
                logout,
            }),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner<R, S> {
        Arc::get_mut(&mut self.inner).expect("configure a StoreRefresher before cloning it")
    }

    /// How long a lease lasts at most ([`DEFAULT_LEASE_TTL`], 12 s, by default); set it above
    /// the longest token call your refresher makes. Taken between 1 ms and one hour (a dead
    /// holder blocks the other processes for up to the TTL).
    ///
    /// Its time counts from just before the lease is asked for (the store starts it when it
    /// grants the lease). Your refresher gets what is left of it after the lease and the
    /// re-read came back, less a safety margin of 1/10 of the TTL (at least 5 ms), and is cut
    /// off then (a transient failure): a live holder's call has ended before its lease runs
    /// out and another process may take it and present the same refresh token. If less than
    /// 1/4 of the TTL is left for the call (a very slow store), the lease is given back and the
    /// refresh fails transiently without calling your refresher. A holder that dies loses its
    /// lease when the TTL runs out (Redis) or at once (file store).
    ///
    /// The layer's [`refresh_timeout`](crate::RefreshOptions::refresh_timeout) should exceed
    /// [`lease_wait`](Self::lease_wait) plus this TTL (see [Time limits](Self#time-limits)).
    ///
    /// # Panics
    ///
    /// If called on a clone.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.inner_mut().lease_ttl = ttl.clamp(Duration::from_millis(1), MAX_LEASE_TTL);
        self
    }

    /// How long to wait for another process's lease before failing with a transient error
    /// (the lease TTL plus 5 s by default: 17 s with the default TTL, enough for a dead Redis
    /// holder's lease to run out).
    ///
    /// The layer's [`refresh_timeout`](crate::RefreshOptions::refresh_timeout) should exceed
    /// this wait plus [`lease_ttl`](Self::lease_ttl): a process that takes the lease at the
    /// end of its wait still has its whole token call to make (see
    /// [Time limits](Self#time-limits)).
    ///
    /// # Panics
    ///
    /// If called on a clone.
    #[must_use]
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.inner_mut().lease_wait = Some(wait);
        self
    }

    /// A stored token with less than this left before its expiry is not adopted, but
    /// refreshed (5 s by default).
    ///
    /// # Panics
    ///
    /// If called on a clone.
    #[must_use]
    pub fn min_remaining(mut self, left: Duration) -> Self {
        self.inner_mut().min_remaining = left;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The wrapped refresher.
    pub fn get_ref(&self) -> &R {
        &self.inner.refresher
    }

    fn wait_budget(&self) -> Duration {
        self.inner
            .lease_wait
            .unwrap_or_else(|| self.inner.lease_ttl.saturating_add(Duration::from_secs(5)))
    }
}

impl<R, S> StoreRefresher<R, S>
where
    R: TokenRefresher,
    S: TokenStore,
{
    /// Logs the stored session out for every process that shares the store: the record is
    /// replaced by one that holds no token (only digests of the refresh tokens the session went
    /// through), so that no process adopts or refreshes it again. A process that holds a token
    /// of the session keeps sending it until it is refused or expires; its refresh then fails
    /// with a terminal error whose source is [`LoggedOut`](crate::error::LoggedOut) (the layer's
    /// [`SessionEnded`](crate::error::SessionEnded) says
    /// [`is_logout`](crate::error::SessionEnded::is_logout)), without a token call. A process
    /// started later, without a token, finds no session to adopt. A new login (a token
    /// installed with [`TokenHandle::set_token`](crate::TokenHandle::set_token), or got by your
    /// refresher after [`TokenHandle::clear`](crate::TokenHandle::clear)) is stored over it and
    /// starts a new session for all.
    ///
    /// [`TokenHandle::clear`](crate::TokenHandle::clear) alone logs out this process only (the
    /// stored session stays for the others, and for a restart); call both for a logout
    /// everywhere. This does not call the authorization server: no token revocation
    /// (RFC 7009), no RP-initiated logout.
    ///
    /// Waits for the lease as a refresh does (at most [`lease_wait`](Self::lease_wait)); a
    /// refresh under it finishes first, and its result is logged out too. Without a record
    /// (a store that lost it, or processes that never refreshed yet) the logout is written
    /// all the same: a process whose token went through the store then ends too, while one
    /// that holds only a token of its own (an `initial_token` never refreshed through the
    /// store) is a login from outside, refreshed and stored as any. Nothing to do when the
    /// record is logged out already.
    ///
    /// # Errors
    ///
    /// A [`StoreError`]: the store is unreachable, its record is corrupt (left as it is), or
    /// another process held the lease longer than the wait.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_auth_refresh::store::{MemoryStore, StoreRefresher};
    /// use tower_auth_refresh::{RefreshError, RefreshLayer, Token, refresh_fn};
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let shared = StoreRefresher::new(
    ///     refresh_fn(|_stale| async { Ok::<_, RefreshError>(Token::bearer("access")?) }),
    ///     MemoryStore::new(),
    /// );
    /// let layer = RefreshLayer::new(shared.clone());
    /// // The user logs out: this process forgets its token, every process its session.
    /// layer.token_handle().clear();
    /// shared.log_out_everywhere().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn log_out_everywhere(&self) -> Result<(), StoreError> {
        let store = &self.inner.store;
        let started = Instant::now();
        let wait = self.wait_budget();
        loop {
            let record = store.load().await?;
            if record.as_ref().is_some_and(Record::is_logged_out) {
                return Ok(());
            }
            let seen = record.as_ref().map_or(0, Record::version);
            if let Some(lease) = store.try_lease(self.inner.lease_ttl).await? {
                // Given back even if this future is dropped while it holds the lease.
                let held = Held {
                    inner: self.inner.clone(),
                    lease: Some(lease),
                };
                let written = self.log_out_under(held.lease()).await;
                held.release().await;
                if written? {
                    return Ok(());
                }
            }
            let waited = started.elapsed();
            if waited >= wait {
                tracing::warn!(
                    waited_ms = waited.as_millis() as u64,
                    "token store: gave up waiting for the lease to log the session out"
                );
                return Err(StoreError::lease_timeout(waited));
            }
            store
                .wait_change(seen, WAIT_SLICE.min(wait - waited))
                .await?;
        }
    }

    /// Writes the logout of the stored record under `lease`: `false` if the record changed
    /// under it (the lease was lost), to try again.
    async fn log_out_under(&self, lease: &Lease) -> Result<bool, StoreError> {
        let store = &self.inner.store;
        let record = store.load().await?;
        let logged_out = match &record {
            Some(record) if record.is_logged_out() => return Ok(true),
            Some(record) => {
                let Some(next) = record.version().checked_add(1).filter(|v| *v != u64::MAX) else {
                    return Err(StoreError::corrupt(
                        "the stored record's version has no usable successor (u64::MAX is never stored)",
                    ));
                };
                record.logged_out(next)
            }
            // No record (a store that lost it, or whose processes never refreshed): the logout
            // is recorded all the same, so that a process whose token went through the store
            // does not store its session again.
            None => Record::logged_out_first(),
        };
        let expected = record.as_ref().map_or(0, Record::version);
        match store.compare_and_set(lease, expected, &logged_out).await? {
            CasOutcome::Written => {
                tracing::info!(
                    version = logged_out.version(),
                    "token store: logged the session out for every process"
                );
                self.inner.unstored.forget_replaced(&logged_out, false);
                Ok(true)
            }
            lost => {
                tracing::debug!(outcome = ?lost, "token store: the logout lost its write; trying again");
                Ok(false)
            }
        }
    }
}

impl<R, S> TokenRefresher for StoreRefresher<R, S>
where
    R: TokenRefresher,
    S: TokenStore,
{
    type Future = Pin<Box<dyn Future<Output = Result<Token, RefreshError>> + Send>>;

    fn refresh(&self, ctx: RefreshContext) -> Self::Future {
        let this = self.clone();
        // Read when the layer asks: a logout that comes while this refresh reads the store
        // is not this refresh's to end.
        let seen = self.inner.logout.seen();
        Box::pin(async move {
            let (token, stored) = this.run(ctx, seen).await?;
            if stored {
                // A refresh after a logout that succeeded is a login: the logouts it saw are
                // over once it is stored (a failed one ends nothing, nor does a login whose
                // write failed: the next refresh must not take the logged-out session for
                // this process's).
                this.inner.logout.end(seen);
            }
            Ok(token)
        })
    }

    /// Passed on to the wrapped refresher; and until a refresh after it succeeds with a
    /// token installed since (`set_token`), or with one your refresher got without a token,
    /// and its result is stored, the stored session is neither adopted nor refreshed by this
    /// process. The other processes, and this one after a restart, still follow it: to log
    /// it out for all, call [`log_out_everywhere`](Self::log_out_everywhere). Clones of this
    /// refresher share this state: give each layer that must log out on its own a refresher
    /// of its own.
    fn logout(&self) {
        self.inner.logout.log_out();
        self.inner.refresher.logout();
    }
}

fn store_failure(err: StoreError) -> RefreshError {
    RefreshError::transient(err)
}

/// True if `record` went through `stale`'s refresh token: a login from outside that another
/// process refreshed (or stored) meanwhile, so it is now the stored session's to follow (two
/// processes started with the same token share one refresh).
fn stored_from(stale: Option<&Token>, record: Option<&Record>) -> bool {
    stale
        .and_then(Token::refresh_token)
        .is_some_and(|rt| record.is_some_and(|r| r.knows(rt)))
}

/// Whether a terminal error says that the token endpoint refused the refresh token itself,
/// which ends the session for every process: any terminal error of a refresher of your own
/// (terminal means the session ends), but from the built-in OAuth 2.0 refresher only an
/// `invalid_grant` answer. Its other terminal errors (a wrong client secret, token URL or
/// DPoP setting) are this process's configuration, and must not end the session of the
/// processes that are configured right.
fn refuses_the_refresh_token(err: &RefreshError) -> bool {
    #[cfg(feature = "oauth2")]
    if let Some(e) = crate::oauth2::OAuth2Error::find(err) {
        return e.error_code() == Some("invalid_grant");
    }
    let _ = err;
    true
}

/// The terminal error of a refresh whose stored session ended: another process (or this
/// one) presented its refresh token and the token endpoint refused it.
fn session_ended() -> RefreshError {
    RefreshError::terminal(
        "token store: the token endpoint refused the shared session's refresh token \
         (recorded in the store by the process that presented it); log in again",
    )
}

impl<R, S> StoreRefresher<R, S>
where
    R: TokenRefresher,
    S: TokenStore,
{
    /// A stored token this process may use instead of refreshing: not the one that was
    /// rejected, and valid for a while yet (`min_remaining`), or at all if it was written
    /// after version `written_after` (just refreshed by another process: refreshing again
    /// could not give a longer-lived one).
    fn adoptable(
        &self,
        record: Option<&Record>,
        stale: Option<&Token>,
        written_after: u64,
    ) -> Option<Token> {
        let record = record?;
        if record.is_ended() {
            return None;
        }
        if self.inner.unstored.find(Some(record), stale).is_some() {
            // Older than this process's own set, whose write failed: its refresh token is
            // spent.
            return None;
        }
        let margin = if record.version() > written_after {
            Duration::ZERO
        } else {
            self.inner.min_remaining
        };
        if record.expires_within(margin, SystemTime::now()) {
            return None;
        }
        if stale.is_some_and(|s| record.same_access_token(s)) {
            return None;
        }
        record.to_token().ok()
    }

    /// True if `stale` is a login from outside the stored session, so that this refresh
    /// starts from it and never adopts the stored record over it: anything after a logout
    /// that no login ended (a refresh without a token then calls the wrapped refresher
    /// without one), or a refresh token neither this process got from the store nor the
    /// stored record knows ([`Record::knows`]). `seen`: the logouts when the layer asked.
    fn is_login(&self, stale: Option<&Token>, record: Option<&Record>, seen: u64) -> bool {
        if self.inner.logout.in_force(seen) {
            return true;
        }
        match stale.and_then(Token::refresh_token) {
            // No refresh token to tell a session by: it follows the store.
            None => false,
            Some(rt) => {
                !(self.inner.lineage.knows(rt)
                    || record.is_some_and(|r| r.knows(rt))
                    || self.inner.unstored.knows(rt))
            }
        }
    }

    /// Whether the stored session ended (its refresh token was refused) while this process
    /// holds no newer set of it (one whose write failed, refreshed from the refused one), or
    /// was logged out for every process.
    ///
    /// The terminal error to fail with then: `None` if the session did not end. A session
    /// logged out for every process ([`log_out_everywhere`](Self::log_out_everywhere)) ended whatever this
    /// process holds.
    fn ended(&self, record: Option<&Record>, stale: Option<&Token>) -> Option<RefreshError> {
        let record = record?;
        if record.is_logged_out() {
            return Some(RefreshError::terminal(LoggedOut::everywhere()));
        }
        (record.is_refused() && self.inner.unstored.find(Some(record), stale).is_none())
            .then(session_ended)
    }

    /// `token`, handed to the layer: its refresh token is now of the stored session.
    fn hand_over(&self, token: Token) -> Token {
        self.inner.lineage.learn(&token);
        token
    }

    /// The protocol: the token for the layer, and whether it is of the stored session
    /// (stored or adopted), not a login whose write failed.
    async fn run(&self, ctx: RefreshContext, logouts: u64) -> Result<(Token, bool), RefreshError> {
        let store = &self.inner.store;
        let stale = ctx.stale().cloned();
        let record = store.load().await.map_err(store_failure)?;
        let mut login = self.is_login(stale.as_ref(), record.as_ref(), logouts);
        if login {
            tracing::debug!("token store: refreshing a login from outside the stored session");
        } else {
            if let Some(ended) = self.ended(record.as_ref(), stale.as_ref()) {
                return Err(ended);
            }
            if let Some(token) = self.adoptable(record.as_ref(), stale.as_ref(), u64::MAX) {
                tracing::debug!(
                    version = record.as_ref().map_or(0, Record::version),
                    "token store: adopted a newer stored token"
                );
                return Ok((self.hand_over(token), true));
            }
        }
        let first_seen = record.as_ref().map_or(0, Record::version);
        let mut seen = first_seen;

        // Take the lease, or adopt what its holder stores.
        let started = Instant::now();
        let wait = self.wait_budget();
        let (lease, asked) = loop {
            // The lease's time counts from here: the store starts it when it grants the
            // lease, before its answer gets back.
            let asked = Instant::now();
            if let Some(lease) = store
                .try_lease(self.inner.lease_ttl)
                .await
                .map_err(store_failure)?
            {
                break (lease, asked);
            }
            let waited = started.elapsed();
            if waited >= wait {
                tracing::warn!(
                    waited_ms = waited.as_millis() as u64,
                    "token store: gave up waiting for the refresh lease"
                );
                return Err(store_failure(StoreError::lease_timeout(waited)));
            }
            store
                .wait_change(seen, WAIT_SLICE.min(wait - waited))
                .await
                .map_err(store_failure)?;
            let record = store.load().await.map_err(store_failure)?;
            login = login && !stored_from(stale.as_ref(), record.as_ref());
            if !login {
                if let Some(ended) = self.ended(record.as_ref(), stale.as_ref()) {
                    tracing::debug!("token store: the session ended while the lease was held");
                    return Err(ended);
                }
                if let Some(token) = self.adoptable(record.as_ref(), stale.as_ref(), first_seen) {
                    tracing::debug!(
                        version = record.as_ref().map_or(0, Record::version),
                        "token store: adopted the token stored by the lease holder"
                    );
                    return Ok((self.hand_over(token), true));
                }
            }
            seen = seen.max(record.as_ref().map_or(0, Record::version));
        };
        tracing::debug!(fence = lease.fence(), "token store: lease taken");
        // Given back even if this future is dropped while it holds the lease.
        let held = Held {
            inner: self.inner.clone(),
            lease: Some(lease),
        };
        let result = match self.under_lease(asked, ctx, first_seen, login).await {
            Ok(Step::Call(call)) => {
                // On a task of its own, holding the lease to its end: once the token endpoint
                // is asked, its answer is stored (or kept as this process's unstored set) even
                // if the layer stops waiting (its refresh timeout cut the attempt short).
                // Dropped with the call, a rotated set would be lost, and the next refresh
                // would present the spent refresh token.
                let this = self.clone();
                crate::cell::run_to_end(async move {
                    let result = this.call_and_store(held.lease(), call).await;
                    if matches!(result, Ok((_, true))) {
                        // As `refresh` does, also when nobody waits for this one any more:
                        // a login stored here ended the logouts it saw. Not one that was
                        // not stored: nobody may get it, and the next refresh must not
                        // take the logged-out session for this process's.
                        this.inner.logout.end(logouts);
                    }
                    held.release().await;
                    result
                })
                .await
            }
            Ok(Step::Adopt(token)) => {
                held.release().await;
                Ok((token, true))
            }
            Err(err) => {
                held.release().await;
                Err(err)
            }
        };
        result.map(|(token, of_the_store)| {
            if of_the_store {
                (self.hand_over(token), true)
            } else {
                (token, false)
            }
        })
    }

    /// The protocol under the lease, asked for at `asked`, up to the token call: a token to
    /// adopt, or the call to make. `login`: refresh from the stale token (a login from
    /// outside the stored session, see [`is_login`](Self::is_login)), never from or into the
    /// stored record.
    async fn under_lease(
        &self,
        asked: Instant,
        ctx: RefreshContext,
        first_seen: u64,
        login: bool,
    ) -> Result<Step, RefreshError> {
        let store = &self.inner.store;
        let stale = ctx.stale().cloned();
        let record = store.load().await.map_err(store_failure)?;
        let login = login && !stored_from(stale.as_ref(), record.as_ref());
        if !login {
            if let Some(ended) = self.ended(record.as_ref(), stale.as_ref()) {
                return Err(ended);
            }
            if let Some(token) = self.adoptable(record.as_ref(), stale.as_ref(), first_seen) {
                tracing::debug!("token store: adopted a token stored before the lease was taken");
                return Ok(Step::Adopt(token));
            }
        }
        let base = record.as_ref().map_or(0, Record::version);
        // Checked before the token call: a result that cannot be stored must not spend the
        // refresh token. `u64::MAX` could be written but never read back (`Record::decode`
        // refuses it), so it is no successor either.
        let Some(next) = base.checked_add(1).filter(|v| *v != u64::MAX) else {
            return Err(store_failure(StoreError::corrupt(
                "the stored record's version has no usable successor (u64::MAX is never stored)",
            )));
        };

        // The token set to refresh from: the stored one (its refresh token is the current one
        // for every process), else this process's own; and this process's own when the stored
        // refresh token is one it spent in a refresh whose write failed. A login from outside
        // refreshes from itself.
        let mine = if login {
            self.inner.unstored.find_login(stale.as_ref())
        } else {
            self.inner.unstored.find(record.as_ref(), stale.as_ref())
        };
        // The refresh tokens spent on the way to the kept set it goes on from: the record it
        // writes supersedes them too, so that a layer still holding one follows the store.
        let spent = mine
            .as_ref()
            .map(|mine| self.inner.unstored.spent_before(mine))
            .unwrap_or_default();
        let from = match (mine, &record) {
            // A login refreshes from itself, or from its own newer set whose write failed
            // (the layer stopped waiting for that refresh, or holds that set).
            (mine, _) if login => mine.or_else(|| stale.clone()),
            (Some(mine), _) => {
                tracing::info!(
                    version = base,
                    "token store: refreshing from this process's own newer token set (its write had failed)"
                );
                Some(mine)
            }
            // As it is, also without a refresh token (a login by a refresher that gets none):
            // this process's own refresh token is of an earlier set of the session (the record
            // was written since), spent or of another login, never one to present with it.
            (None, Some(record)) => Some(record.to_token().map_err(store_failure)?),
            (None, None) => stale.clone(),
        };
        // The call ends a safety margin before the lease does, counted from when the lease
        // was asked for: once the lease runs out another process may present the same
        // refresh token.
        let ttl = self.inner.lease_ttl;
        let call_ends = asked
            .checked_add(ttl - lease_margin(ttl))
            .unwrap_or_else(far_future);
        let left = call_ends.saturating_duration_since(Instant::now());
        if left < min_call_time(ttl) {
            tracing::warn!(
                left_ms = left.as_millis() as u64,
                lease_ttl_ms = ttl.as_millis() as u64,
                "token store: too little of the lease left for the token call; not calling"
            );
            return Err(store_failure(StoreError::too_slow(left, ttl)));
        }
        Ok(Step::Call(Box::new(Call {
            stale,
            login,
            record,
            from,
            spent,
            next,
            reason: ctx.reason().clone(),
            call_ends,
        })))
    }

    /// The token call of [`under_lease`](Self::under_lease), under `lease`, and the write of
    /// its result: the token, and whether it is of the stored session.
    async fn call_and_store(
        &self,
        lease: &Lease,
        call: Box<Call>,
    ) -> Result<(Token, bool), RefreshError> {
        let Call {
            stale,
            login,
            record,
            from,
            spent,
            next,
            reason,
            call_ends,
        } = *call;
        let store = &self.inner.store;
        let base = record.as_ref().map_or(0, Record::version);
        // The refresh token presented (kept with a set whose write fails, recorded if refused).
        let presented = from
            .as_ref()
            .and_then(Token::refresh_token)
            .map(str::to_owned);
        let call = self
            .inner
            .refresher
            .refresh(RefreshContext::new(from.clone(), reason));
        let outcome = match tokio::time::timeout_at(call_ends, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(RefreshError::transient(
                "the refresher ran longer than what was left of the store's lease",
            )),
        };
        let token = match outcome {
            Ok(token) => token,
            Err(err) if err.is_terminal() => {
                // Rotation race: another process may have rotated the refresh token we
                // presented. Check the store before ending the session.
                if let Ok(Some(now)) = store.load().await {
                    // Not for a login from outside: the newer record is the session it
                    // replaces (unless it went through the login's own refresh token).
                    if now.version() > base && (!login || stored_from(stale.as_ref(), Some(&now))) {
                        if let Some(token) = self.adoptable(Some(&now), from.as_ref(), base) {
                            tracing::info!(
                                version = now.version(),
                                "token store: refresh rejected, but another process had rotated; adopted its token"
                            );
                            return Ok((token, true));
                        }
                    } else if !login
                        && Some(&now) == record.as_ref()
                        && refuses_the_refresh_token(&err)
                    {
                        // Nothing newer: the stored session's refresh token was refused. Say
                        // so in the store, so that no other process presents it again.
                        if let Some(refused) = presented.as_deref() {
                            self.record_refusal(lease, &now, next, refused).await;
                        }
                    }
                }
                return Err(err);
            }
            Err(err) => return Err(err),
        };

        let token = match (token.refresh_token(), presented.as_deref()) {
            (None, Some(previous)) => token.with_refresh_token(previous),
            _ => token,
        };
        let chain = presented
            .iter()
            .chain(spent.iter().rev())
            .map(String::as_str);
        let new_record =
            Record::from_token(next, &token, SystemTime::now()).superseding(record.as_ref(), chain);
        let token = match new_record.expires_at() {
            Some(at) => token.with_expires_at(at),
            None => token,
        };
        // If the write fails, is the stored set left behind? Yes if this set's refresh token
        // is not the stored one (rotated): the stored one is spent.
        let left_behind = token.refresh_token().is_some()
            && token.refresh_token() != record.as_ref().and_then(|r| r.refresh_token.as_deref());
        // A login's set is of the stored session only once stored: until then, the next
        // refresh takes it for a login again, and writes it over whatever is stored.
        let unstored = |token: Token| {
            if left_behind {
                self.inner.unstored.remember(
                    record.clone(),
                    token.clone(),
                    login,
                    presented.clone(),
                );
            }
            Ok((token, !login))
        };
        match store.compare_and_set(lease, base, &new_record).await {
            Ok(CasOutcome::Written) => {
                tracing::debug!(version = next, "token store: stored the new token");
                self.inner
                    .unstored
                    .forget(record.as_ref(), presented.as_deref());
                if login {
                    self.inner.unstored.forget_replaced(&new_record, true);
                }
                Ok((token, true))
            }
            Ok(lost) => match self.store_again(lease, record.as_ref(), &new_record).await {
                // Nobody stored anything newer (the lease vanished with a restarted or
                // flushed store, or ran out before a slow write): stored under a new lease.
                Rewrite::Stored => {
                    tracing::info!(
                        version = next,
                        outcome = ?lost,
                        "token store: the first write of the new token failed; stored it after all"
                    );
                    self.inner
                        .unstored
                        .forget(record.as_ref(), presented.as_deref());
                    if login {
                        self.inner.unstored.forget_replaced(&new_record, true);
                    }
                    Ok((token, true))
                }
                // The session was logged out for every process meanwhile: so it is for this
                // one, whatever its refresh got.
                Rewrite::Newer(now) if now.is_logged_out() => {
                    tracing::info!(
                        version = now.version(),
                        "token store: the session was logged out during the refresh; not kept"
                    );
                    Err(RefreshError::terminal(LoggedOut::everywhere()))
                }
                // Another process wrote meanwhile (our lease expired or was not exclusive):
                // everyone else follows the stored set, so follow it too.
                // (Unless that process's refresh token was refused: this set is the live one.)
                Rewrite::Newer(now) if now.is_refused() => {
                    tracing::warn!(outcome = ?lost, "token store: the new token was not stored");
                    unstored(token)
                }
                // A login from outside never gives way to the session it replaces (another
                // process refreshed that one meanwhile): it is kept and not taken for the
                // stored session's (not learned), so that the next refresh takes it for a
                // login again, presents its own refresh token and stores the result, however
                // often the record changes meanwhile.
                Rewrite::Newer(now) if login && !stored_from(stale.as_ref(), Some(&now)) => {
                    tracing::warn!(
                        version = now.version(),
                        outcome = ?lost,
                        "token store: a login lost its write to a refresh of the session it replaces; kept"
                    );
                    self.inner
                        .unstored
                        .remember(Some(now), token.clone(), true, presented.clone());
                    Ok((token, false))
                }
                Rewrite::Newer(now) => match now.to_token() {
                    Ok(winner) => {
                        tracing::info!(
                            version = now.version(),
                            outcome = ?lost,
                            "token store: lost the write to another process; adopted its token"
                        );
                        self.inner
                            .unstored
                            .forget(record.as_ref(), presented.as_deref());
                        Ok((winner, true))
                    }
                    Err(_) => Ok((token, !login)),
                },
                Rewrite::NotStored => {
                    tracing::warn!(outcome = ?lost, "token store: the new token was not stored");
                    unstored(token)
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "token store: the new token was not stored");
                unstored(token)
            }
        }
    }
}

impl<R, S> StoreRefresher<R, S>
where
    R: TokenRefresher,
    S: TokenStore,
{
    /// Writes under `lease` that the token endpoint refused `refused`, presented for the
    /// stored `record` (the successor version `next`), so that the other processes end their
    /// session without presenting it again. Best effort: if the write fails, they present it
    /// once more each, as before.
    async fn record_refusal(&self, lease: &Lease, record: &Record, next: u64, refused: &str) {
        let ended = record.ended(next, refused);
        match self
            .inner
            .store
            .compare_and_set(lease, record.version(), &ended)
            .await
        {
            Ok(CasOutcome::Written) => {
                tracing::info!(
                    version = next,
                    "token store: the refresh token was refused; recorded that the session ended"
                );
            }
            Ok(outcome) => {
                tracing::debug!(
                    ?outcome,
                    "token store: could not record the refused refresh token"
                );
            }
            Err(err) => {
                tracing::debug!(error = %err, "token store: could not record the refused refresh token");
            }
        }
    }
}

/// What became of a write that lost its lease or found another version, tried again by
/// [`StoreRefresher::store_again`].
enum Rewrite {
    /// Stored after all (under the write's own lease, or a new one).
    Stored,
    /// Another process stored this newer record meanwhile.
    Newer(Record),
    /// Not stored: the store failed, another process kept the lease, or it holds a record of
    /// another lineage (not newer by version).
    NotStored,
}

/// How many times [`StoreRefresher::store_again`] asks for a new lease; it waits at most
/// [`WAIT_SLICE`] after a refused one.
const REWRITE_TRIES: usize = 3;

impl<R, S> StoreRefresher<R, S>
where
    R: TokenRefresher,
    S: TokenStore,
{
    /// After a write of `new_record` (refreshed from `record`) under `lease` that lost its
    /// lease or found another version: if the store still holds `record`, or no record at all
    /// (a flushed or evicted one), the refresh token `record` carries is spent and nobody
    /// stored its successor, so `new_record` is written after all: first under `lease` (still
    /// ours if only the version had changed: an evicted record), then under a lease taken
    /// again (and given back). What the store holds is read under the lease each time, so a
    /// newer set written meanwhile is adopted, never overwritten. Bounded: at most
    /// [`REWRITE_TRIES`] new leases, waiting at most [`WAIT_SLICE`] after a refused one.
    /// Never calls the refresher.
    async fn store_again(
        &self,
        lease: &Lease,
        record: Option<&Record>,
        new_record: &Record,
    ) -> Rewrite {
        let store = &self.inner.store;
        let base = record.map_or(0, Record::version);
        match self.write_if_unchanged(lease, record, new_record).await {
            Ok(decided) => return decided,
            // The lease is still this write's: a new one cannot be had while it is held.
            Err(CasOutcome::VersionChanged) => return Rewrite::NotStored,
            Err(_) => {}
        }
        for _ in 0..REWRITE_TRIES {
            let again = match store.try_lease(self.inner.lease_ttl).await {
                Ok(Some(again)) => again,
                Ok(None) => {
                    if store.wait_change(base, WAIT_SLICE).await.is_err() {
                        return Rewrite::NotStored;
                    }
                    continue;
                }
                Err(_) => return Rewrite::NotStored,
            };
            let held = Held {
                inner: self.inner.clone(),
                lease: Some(again),
            };
            let decided = self
                .write_if_unchanged(held.lease(), record, new_record)
                .await;
            held.release().await;
            if let Ok(decided) = decided {
                return decided;
            }
        }
        match store.load().await {
            Ok(Some(now)) if now.version() > base => Rewrite::Newer(now),
            _ => Rewrite::NotStored,
        }
    }

    /// Reads the store under `lease` and writes `new_record` if it still holds `record` (or
    /// nothing): the outcome, or the write's answer when it wrote nothing (`LeaseLost`: the
    /// lease was not, or no longer, ours; `VersionChanged`: written meanwhile without it).
    async fn write_if_unchanged(
        &self,
        lease: &Lease,
        record: Option<&Record>,
        new_record: &Record,
    ) -> Result<Rewrite, CasOutcome> {
        let store = &self.inner.store;
        let base = record.map_or(0, Record::version);
        let Ok(now) = store.load().await else {
            return Ok(Rewrite::NotStored);
        };
        match now {
            Some(now) if now.version() > base => return Ok(Rewrite::Newer(now)),
            Some(ref now) if Some(now) != record => return Ok(Rewrite::NotStored),
            _ => {}
        }
        let expected = now.as_ref().map_or(0, Record::version);
        match store.compare_and_set(lease, expected, new_record).await {
            Ok(CasOutcome::Written) => Ok(Rewrite::Stored),
            Ok(nothing) => Err(nothing),
            Err(_) => Ok(Rewrite::NotStored),
        }
    }
}

/// The lease while the protocol holds it. [`release`](Self::release) gives it back. If the
/// protocol's future is dropped first (the layer's `refresh_timeout` ran out, a caller gave
/// up) before the token call (which, once made, runs to its end on a task of its own, and
/// gives the lease back there), dropping this spawns the release on the current Tokio
/// runtime, if there is one (best effort); without one the lease is only dropped (the file
/// store's OS lock goes with it, a Redis lease runs out after its TTL).
struct Held<R: TokenRefresher, S: TokenStore> {
    inner: Arc<Inner<R, S>>,
    lease: Option<Lease>,
}

impl<R: TokenRefresher, S: TokenStore> Held<R, S> {
    fn lease(&self) -> &Lease {
        self.lease.as_ref().expect("held until released")
    }

    async fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            release(&self.inner.store, lease).await;
        }
    }
}

impl<R: TokenRefresher, S: TokenStore> Drop for Held<R, S> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::debug!(
                    fence = lease.fence(),
                    "token store: refresh dropped while holding the lease; releasing it"
                );
                let inner = self.inner.clone();
                drop(runtime.spawn(async move { release(&inner.store, lease).await }));
            }
            Err(_) => drop(lease),
        }
    }
}

/// Where the protocol under the lease got to before the token call.
enum Step {
    /// A stored token to hand over (of the stored session).
    Adopt(Token),
    /// The token call to make (boxed: it is moved onto the call's own task).
    Call(Box<Call>),
}

/// A token call decided under the lease, with what its result is stored against.
struct Call {
    /// The token the layer asked to refresh.
    stale: Option<Token>,
    /// A login from outside the stored session (see `is_login`).
    login: bool,
    /// The record read under the lease (the call's result is written over it).
    record: Option<Record>,
    /// The token set the wrapped refresher is called with.
    from: Option<Token>,
    /// The refresh tokens spent on the way to `from`, when it is a kept set.
    spent: Vec<String>,
    /// The version its result is written as (the record's successor).
    next: u64,
    reason: crate::refresher::RefreshReason,
    /// When the call must have answered: a margin before the lease runs out.
    call_ends: Instant,
}

/// A deadline that never comes (a lease TTL too large to add to an instant).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

async fn release<S: TokenStore>(store: &S, lease: Lease) {
    if let Err(err) = store.release(lease).await {
        // The lease runs out by itself.
        tracing::debug!(error = %err, "token store: releasing the lease failed");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::keyed::KeyedRefresher;
    use crate::refresher::{RefreshReason, context_fn};
    use crate::store::{KeyedStoreRefresher, MemoryStore};

    fn counting(calls: Arc<AtomicUsize>, delay: Duration) -> impl TokenRefresher {
        context_fn(move |ctx: RefreshContext| {
            let calls = calls.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                let presented = ctx
                    .stale()
                    .and_then(Token::refresh_token)
                    .map(str::to_owned);
                tokio::time::sleep(delay).await;
                assert_eq!(presented.as_deref(), Some(format!("r{}", n - 1).as_str()));
                Ok(Token::bearer(format!("a{n}"))?
                    .with_expires_in(Duration::from_secs(600))
                    .with_refresh_token(format!("r{n}")))
            }
        })
    }

    fn stale() -> RefreshContext {
        let token = Token::bearer("a0").unwrap().with_refresh_token("r0");
        RefreshContext::new(Some(token), RefreshReason::Expired)
    }

    #[tokio::test]
    async fn concurrent_refreshers_share_one_call_and_the_stored_refresh_token() {
        let store = MemoryStore::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let shared: Vec<_> = (0..4)
            .map(|_| {
                StoreRefresher::new(
                    counting(calls.clone(), Duration::from_millis(20)),
                    store.clone(),
                )
            })
            .collect();
        let results =
            futures_util::future::join_all(shared.iter().map(|s| s.refresh(stale()))).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for r in results {
            let t = r.unwrap();
            assert_eq!(t.secret(), "a1");
            assert_eq!(t.refresh_token(), Some("r1"));
            assert!(matches!(t.expiry(), Some(crate::Expiry::At(_))));
        }
        // The next refresh starts from the stored refresh token r1 (checked by the refresher).
        let next = RefreshContext::new(Some(Token::bearer("a1").unwrap()), RefreshReason::Expired);
        assert_eq!(shared[2].refresh(next).await.unwrap().secret(), "a2");
        assert_eq!(store.load().await.unwrap().unwrap().version(), 2);
    }

    #[tokio::test]
    async fn a_just_refreshed_short_lived_token_is_adopted_by_the_waiters() {
        let store = MemoryStore::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let short = {
            let calls = calls.clone();
            context_fn(move |_ctx: RefreshContext| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    // Shorter than `min_remaining` (5 s).
                    Ok(Token::bearer("short")?.with_expires_in(Duration::from_secs(2)))
                }
            })
        };
        let short = Arc::new(short);
        let shared: Vec<_> = (0..4)
            .map(|_| {
                let short = short.clone();
                let inner = context_fn(move |ctx| short.refresh(ctx));
                StoreRefresher::new(inner, store.clone())
            })
            .collect();
        let results =
            futures_util::future::join_all(shared.iter().map(|s| s.refresh(stale()))).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one call, however short the lifetime"
        );
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().unwrap().secret() == "short")
        );
    }

    #[tokio::test]
    async fn an_abandoned_lease_is_taken_over_after_its_ttl() {
        let store = MemoryStore::new();
        // A holder that took the lease and vanished.
        let _lost = store
            .try_lease(Duration::from_millis(50))
            .await
            .unwrap()
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let shared = StoreRefresher::new(counting(calls.clone(), Duration::ZERO), store.clone())
            .lease_ttl(Duration::from_millis(50));
        let token = shared.refresh(stale()).await.unwrap();
        assert_eq!(token.secret(), "a1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A lease TTL or wait too large to add to an instant is capped, not a panic (in `Debug`,
    /// in the refresh, or in the store's own lease).
    #[tokio::test]
    async fn an_absurd_lease_ttl_or_wait_is_not_a_panic() {
        let calls = Arc::new(AtomicUsize::new(0));
        let shared =
            StoreRefresher::new(counting(calls.clone(), Duration::ZERO), MemoryStore::new())
                .lease_ttl(Duration::MAX);
        assert!(format!("{shared:?}").contains("lease_ttl"));
        assert_eq!(shared.refresh(stale()).await.unwrap().secret(), "a1");
        let other = Arc::new(AtomicUsize::new(0));
        let waiting =
            StoreRefresher::new(counting(other.clone(), Duration::ZERO), MemoryStore::new())
                .lease_wait(Duration::MAX);
        assert_eq!(waiting.refresh(stale()).await.unwrap().secret(), "a1");
        assert!(format!("{waiting:?}").contains("lease_wait"));
        assert_eq!(
            calls.load(Ordering::SeqCst) + other.load(Ordering::SeqCst),
            2
        );
        // The store trait's own methods, called directly.
        let store = MemoryStore::new();
        assert!(store.try_lease(Duration::MAX).await.unwrap().is_some());
        assert!(store.try_lease(Duration::MAX).await.unwrap().is_none());
    }

    /// A store of its own may hold a record at `u64::MAX` (the built-in ones refuse to read
    /// one): refused before the refresher is called, never a panic or a wrapped version. At
    /// `u64::MAX - 1` too: its successor `u64::MAX` could be written but never read again, so
    /// the refresh token would be spent for a record every process then refuses.
    #[tokio::test]
    async fn a_record_at_the_last_version_is_refused_before_the_refresher_runs() {
        for version in [u64::MAX, u64::MAX - 1] {
            let store = MemoryStore::new();
            let lease = store
                .try_lease(Duration::from_secs(5))
                .await
                .unwrap()
                .unwrap();
            let expiring = Token::bearer("a0")
                .unwrap()
                .with_expires_in(Duration::from_secs(1))
                .with_refresh_token("r0");
            let last = Record::from_token(version, &expiring, SystemTime::now());
            let written = store.compare_and_set(&lease, 0, &last).await.unwrap();
            assert_eq!(written, CasOutcome::Written);
            store.release(lease).await.unwrap();
            let calls = Arc::new(AtomicUsize::new(0));
            let shared =
                StoreRefresher::new(counting(calls.clone(), Duration::ZERO), store.clone());
            let err = shared.refresh(stale()).await.unwrap_err();
            assert!(err.is_transient());
            let cause = std::error::Error::source(&err).unwrap();
            assert!(cause.downcast_ref::<StoreError>().unwrap().is_corrupt());
            assert_eq!(calls.load(Ordering::SeqCst), 0, "version {version}");
            assert_eq!(store.load().await.unwrap(), Some(last));
        }
    }

    #[tokio::test]
    async fn waiting_for_a_live_lease_is_bounded() {
        let store = MemoryStore::new();
        let _held = store
            .try_lease(Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let shared = StoreRefresher::new(counting(calls.clone(), Duration::ZERO), store)
            .lease_wait(Duration::from_millis(30));
        let err = shared.refresh(stale()).await.unwrap_err();
        assert!(err.is_transient());
        let cause = std::error::Error::source(&err).unwrap();
        assert!(
            cause
                .downcast_ref::<StoreError>()
                .unwrap()
                .is_lease_timeout()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    /// Every refresh token presented to the "token endpoint", and any presented again while an
    /// earlier presentation of it was still running.
    #[derive(Default)]
    struct Presentations {
        running: Mutex<std::collections::HashMap<String, usize>>,
        overlaps: Mutex<Vec<String>>,
        calls: AtomicUsize,
    }

    /// One running presentation; dropping it (the call finished or was cut off) ends it.
    struct Running(Arc<Presentations>, String);

    impl Presentations {
        fn start(self: &Arc<Self>, refresh_token: &str) -> Running {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut running = self.running.lock().unwrap();
            let n = running.entry(refresh_token.to_owned()).or_default();
            if *n > 0 {
                self.overlaps.lock().unwrap().push(refresh_token.to_owned());
            }
            *n += 1;
            Running(self.clone(), refresh_token.to_owned())
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            *self.0.running.lock().unwrap().get_mut(&self.1).unwrap() -= 1;
        }
    }

    /// A refresher whose token call takes `takes`, recording what it presents.
    fn presenting(log: Arc<Presentations>, takes: Duration) -> impl TokenRefresher {
        context_fn(move |ctx: RefreshContext| {
            let log = log.clone();
            async move {
                let presented = ctx.stale().and_then(Token::refresh_token).unwrap();
                let _running = log.start(presented);
                tokio::time::sleep(takes).await;
                let n = log.calls.load(Ordering::SeqCst);
                Ok(Token::bearer(format!("a{n}"))?
                    .with_expires_in(Duration::from_secs(600))
                    .with_refresh_token(format!("r{n}")))
            }
        })
    }

    /// A memory store whose lease answers arrive `delay` late: the lease is granted (its TTL
    /// counts from then, as Redis counts `PX` from the `SET`) and the answer takes a while, as
    /// over a slow network. Notifies `granted` when it grants one.
    struct SlowLease {
        inner: MemoryStore,
        delay: Duration,
        granted: Arc<tokio::sync::Notify>,
    }

    impl TokenStore for SlowLease {
        async fn load(&self) -> Result<Option<Record>, StoreError> {
            self.inner.load().await
        }

        async fn try_lease(&self, ttl: Duration) -> Result<Option<Lease>, StoreError> {
            let lease = self.inner.try_lease(ttl).await?;
            if lease.is_some() {
                self.granted.notify_one();
                tokio::time::sleep(self.delay).await;
            }
            Ok(lease)
        }

        async fn compare_and_set(
            &self,
            lease: &Lease,
            expected: u64,
            record: &Record,
        ) -> Result<CasOutcome, StoreError> {
            self.inner.compare_and_set(lease, expected, record).await
        }

        async fn release(&self, lease: Lease) -> Result<(), StoreError> {
            self.inner.release(lease).await
        }

        async fn wait_change(&self, seen: u64, max: Duration) -> Result<(), StoreError> {
            self.inner.wait_change(seen, max).await
        }
    }

    /// Two processes on one store with a 10 s lease: A's lease answer arrives `delay` after
    /// the grant; B asks while A holds it. Both present the stored refresh token `r0`, each
    /// call taking `takes`.
    async fn slow_holder_and_a_waiter(
        delay: Duration,
        takes: Duration,
    ) -> (
        Arc<Presentations>,
        Result<Token, RefreshError>,
        Result<Token, RefreshError>,
    ) {
        let ttl = Duration::from_secs(10);
        let store = MemoryStore::new();
        let lease = store.try_lease(ttl).await.unwrap().unwrap();
        let expired = Token::bearer("a0")
            .unwrap()
            .with_expires_at(SystemTime::now() - Duration::from_secs(1))
            .with_refresh_token("r0");
        let first = Record::from_token(1, &expired, SystemTime::now());
        let written = store.compare_and_set(&lease, 0, &first).await.unwrap();
        assert_eq!(written, CasOutcome::Written);
        store.release(lease).await.unwrap();

        let log = Arc::new(Presentations::default());
        let granted = Arc::new(tokio::sync::Notify::new());
        let slow = SlowLease {
            inner: store.clone(),
            delay,
            granted: granted.clone(),
        };
        let a = StoreRefresher::new(presenting(log.clone(), takes), slow).lease_ttl(ttl);
        let b = StoreRefresher::new(presenting(log.clone(), takes), store.clone()).lease_ttl(ttl);
        let a = tokio::spawn(a.refresh(stale()));
        granted.notified().await;
        let b = tokio::spawn(b.refresh(stale()));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        (log, a, b)
    }

    /// The lease's TTL runs from the grant, before its answer and the re-read: a holder whose
    /// answer came late has too little lease left for a token call, and makes none.
    #[tokio::test(start_paused = true)]
    async fn a_holder_whose_lease_is_nearly_gone_never_calls() {
        let (log, a, b) =
            slow_holder_and_a_waiter(Duration::from_secs(8), Duration::from_secs(5)).await;
        assert_eq!(*log.overlaps.lock().unwrap(), Vec::<String>::new());
        assert_eq!(log.calls.load(Ordering::SeqCst), 1, "only B calls");
        let err = a.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert_eq!(b.unwrap().refresh_token(), Some("r1"));
    }

    /// A holder's call is cut off before its lease runs out, measured from the lease request:
    /// the next holder never presents the same refresh token while that call is running.
    #[tokio::test(start_paused = true)]
    async fn a_call_under_the_lease_ends_before_the_lease() {
        let (log, a, b) =
            slow_holder_and_a_waiter(Duration::from_secs(5), Duration::from_secs(6)).await;
        assert_eq!(*log.overlaps.lock().unwrap(), Vec::<String>::new());
        assert!(a.unwrap_err().is_transient());
        assert!(b.is_ok());
        assert_eq!(log.calls.load(Ordering::SeqCst), 2);
    }

    /// A refresh dropped while its token call runs (the layer's `refresh_timeout` ran out, a
    /// caller gave up) keeps the lease until the call answers, stores the answer, and then
    /// gives the lease back at once (not after its TTL). (Review, twelfth session: the call
    /// was dropped with it and the lease released, so the rotated set was lost while another
    /// process could present the spent refresh token.)
    #[tokio::test]
    async fn a_refresh_dropped_during_its_call_stores_the_answer_then_releases_the_lease() {
        let store = MemoryStore::new();
        let reached = Arc::new(tokio::sync::Notify::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let gated = {
            let (reached, gate) = (reached.clone(), gate.clone());
            context_fn(move |_ctx: RefreshContext| {
                let (reached, gate) = (reached.clone(), gate.clone());
                async move {
                    reached.notify_one();
                    gate.notified().await;
                    Ok(Token::bearer("a1")?.with_refresh_token("r1"))
                }
            })
        };
        let shared = StoreRefresher::new(gated, store.clone()).lease_ttl(Duration::from_secs(600));
        let task = tokio::spawn(shared.refresh(stale()));
        reached.notified().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(
            store
                .try_lease(Duration::from_secs(1))
                .await
                .unwrap()
                .is_none(),
            "the lease is held while the call runs"
        );
        gate.notify_one();
        let mut taken = None;
        for _ in 0..100 {
            taken = store.try_lease(Duration::from_secs(1)).await.unwrap();
            if taken.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            taken.is_some(),
            "released once stored, not after its 600 s TTL"
        );
        let stored = store.load().await.unwrap().unwrap().to_token().unwrap();
        assert_eq!(stored.refresh_token(), Some("r1"));
    }

    /// A login after a logout whose write failed (a refresher that gets no refresh token, so
    /// nothing to keep) does not end the logout, also when the layer got it: the next refresh
    /// logs in again instead of adopting the stored session this process logged out of.
    /// (Review, twelfth session: it ended the logout, and the next refresh adopted `a0`.)
    #[tokio::test]
    async fn a_login_whose_write_failed_keeps_the_logout() {
        let store = Faulty::default();
        let valid = Token::bearer("a0")
            .unwrap()
            .with_expires_in(Duration::from_secs(600))
            .with_refresh_token("r0");
        seed(&store, 1, &valid).await;
        let logins = Arc::new(AtomicUsize::new(0));
        let login = {
            let logins = logins.clone();
            context_fn(move |_ctx: RefreshContext| {
                let n = logins.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    Ok(Token::bearer(format!("login-{n}"))?
                        .with_expires_at(SystemTime::now() - Duration::from_secs(1)))
                }
            })
        };
        let shared = StoreRefresher::new(login, store.clone());
        shared.logout();
        store.writes_fail.store(true, Ordering::SeqCst);
        let first = shared
            .refresh(RefreshContext::new(None, RefreshReason::Forced))
            .await
            .unwrap();
        assert_eq!(first.secret(), "login-1");
        store.writes_fail.store(false, Ordering::SeqCst);
        let next = shared
            .refresh(RefreshContext::new(Some(first), RefreshReason::Expired))
            .await
            .unwrap();
        assert_ne!(next.secret(), "a0", "the logged-out session was adopted");
        assert_eq!(next.secret(), "login-2");
    }

    /// A login after a logout (a forced refresh without a token) that the layer stopped
    /// waiting for still ends the logout once stored: the retry adopts the stored login
    /// instead of logging in a second time (a second prompt of an interactive login).
    #[tokio::test]
    async fn a_cut_off_login_after_a_logout_is_adopted_not_repeated() {
        let store = MemoryStore::new();
        seed(&store, 1, &expired("a0", "r0")).await;
        let logins = Arc::new(AtomicUsize::new(0));
        let reached = Arc::new(tokio::sync::Notify::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let login = {
            let (logins, reached, gate) = (logins.clone(), reached.clone(), gate.clone());
            context_fn(move |_ctx: RefreshContext| {
                let (logins, reached, gate) = (logins.clone(), reached.clone(), gate.clone());
                async move {
                    reached.notify_one();
                    gate.notified().await;
                    let n = logins.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok(Token::bearer(format!("login-{n}"))?
                        .with_expires_in(Duration::from_secs(600))
                        .with_refresh_token(format!("login-r{n}")))
                }
            })
        };
        let shared = StoreRefresher::new(login, store.clone());
        shared.logout();
        let forced = || RefreshContext::new(None, RefreshReason::Forced);
        let task = tokio::spawn(shared.refresh(forced()));
        reached.notified().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        gate.notify_one();
        let mut stored = None;
        for _ in 0..100 {
            stored = store.load().await.unwrap().filter(|r| r.version() == 2);
            if stored.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(stored.is_some(), "the cut-off login was stored");
        // A permit for a second login, so that one fails the test instead of hanging it.
        gate.notify_one();
        let again = tokio::time::timeout(Duration::from_secs(10), shared.refresh(forced()))
            .await
            .expect("the retry ends")
            .unwrap();
        assert_eq!(logins.load(Ordering::SeqCst), 1, "logged in a second time");
        assert_eq!(again.secret(), "login-1");
    }

    /// A cut-off login after a logout whose write failed (and that has no refresh token to
    /// be kept by) does not end the logout: the retry logs in again, and never hands out the
    /// logged-out session's token. (Review, twelfth session: the detached task ended the
    /// logout for a login nobody got, and the retry adopted `a0`.)
    #[tokio::test]
    async fn a_cut_off_login_that_was_not_stored_keeps_the_logout() {
        let store = Faulty::default();
        let valid = Token::bearer("a0")
            .unwrap()
            .with_expires_in(Duration::from_secs(600))
            .with_refresh_token("r0");
        seed(&store, 1, &valid).await;
        let logins = Arc::new(AtomicUsize::new(0));
        let reached = Arc::new(tokio::sync::Notify::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let login = {
            let (logins, reached, gate) = (logins.clone(), reached.clone(), gate.clone());
            context_fn(move |_ctx: RefreshContext| {
                let (logins, reached, gate) = (logins.clone(), reached.clone(), gate.clone());
                async move {
                    reached.notify_one();
                    gate.notified().await;
                    let n = logins.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok(Token::bearer(format!("login-{n}"))?
                        .with_expires_in(Duration::from_secs(600)))
                }
            })
        };
        let shared = StoreRefresher::new(login, store.clone());
        shared.logout();
        let forced = || RefreshContext::new(None, RefreshReason::Forced);
        store.writes_fail.store(true, Ordering::SeqCst);
        cut_off(
            tokio::spawn(shared.refresh(forced())),
            &reached,
            &gate,
            &store,
        )
        .await;
        assert!(logins.load(Ordering::SeqCst) == 1);
        store.writes_fail.store(false, Ordering::SeqCst);
        gate.notify_one();
        let again = tokio::time::timeout(Duration::from_secs(10), shared.refresh(forced()))
            .await
            .expect("the retry ends")
            .unwrap();
        assert_ne!(
            again.secret(),
            "a0",
            "the logged-out session was handed out"
        );
        assert_eq!(again.secret(), "login-2");
    }

    /// Aborts `task` (a refresh whose call was reached), lets the call answer, and waits until
    /// its lease is given back.
    async fn cut_off(
        task: tokio::task::JoinHandle<Result<Token, RefreshError>>,
        reached: &tokio::sync::Notify,
        gate: &tokio::sync::Notify,
        store: &impl TokenStore,
    ) {
        reached.notified().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        gate.notify_one();
        for _ in 0..100 {
            if let Some(lease) = store.try_lease(Duration::from_secs(1)).await.unwrap() {
                store.release(lease).await.unwrap();
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the cut-off call kept the lease");
    }

    /// For the refreshes cut off in their token call: a store refresher over a faulty store
    /// seeded with the expired `a0`/`r0`, whose wrapped refresher records what it is
    /// presented (see [`recording`]) once it has told `reached` and passed `gate`.
    struct Cuts<R> {
        store: Faulty,
        log: Arc<Mutex<Vec<String>>>,
        reached: Arc<tokio::sync::Notify>,
        gate: Arc<tokio::sync::Notify>,
        shared: StoreRefresher<R, Faulty>,
    }

    async fn cuts() -> Cuts<impl TokenRefresher> {
        let store = Faulty::default();
        seed(&store, 1, &expired("a0", "r0")).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let reached = Arc::new(tokio::sync::Notify::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let gated = {
            let recording = Arc::new(recording(log.clone()));
            let (reached, gate) = (reached.clone(), gate.clone());
            context_fn(move |ctx: RefreshContext| {
                let (recording, reached, gate) = (recording.clone(), reached.clone(), gate.clone());
                async move {
                    reached.notify_one();
                    gate.notified().await;
                    recording.refresh(ctx).await
                }
            })
        };
        let shared = StoreRefresher::new(gated, store.clone());
        Cuts {
            store,
            log,
            reached,
            gate,
            shared,
        }
    }

    impl<R: TokenRefresher> Cuts<R> {
        /// A refresh of `held`, cut off in its token call; the call then answers.
        async fn cut(&self, held: &RefreshContext) {
            let task = tokio::spawn(self.shared.refresh(held.clone()));
            cut_off(task, &self.reached, &self.gate, &self.store).await;
        }

        /// A refresh of `held` waited for to its end (the gate opened for it).
        async fn refresh(&self, held: &RefreshContext) -> Token {
            self.gate.notify_one();
            tokio::time::timeout(Duration::from_secs(10), self.shared.refresh(held.clone()))
                .await
                .expect("the refresh ends")
                .unwrap()
        }

        /// A refresh of `held` that resumes the kept chain: every refresh token presented so
        /// far is `presented` (`why`: what another one would be), and the set it gets carries
        /// `carries`.
        async fn resumes(
            &self,
            held: &RefreshContext,
            presented: &[&str],
            carries: &str,
            why: &str,
        ) {
            let token = self.refresh(held).await;
            assert_eq!(self.presented(), presented, "{why}");
            assert_eq!(token.refresh_token(), Some(carries));
        }

        fn writes_fail(&self, fail: bool) {
            self.store.writes_fail.store(fail, Ordering::SeqCst);
        }

        fn presented(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }

        async fn stored_refresh_token(&self) -> Option<String> {
            let stored = self.store.load().await.unwrap().unwrap();
            stored
                .to_token()
                .unwrap()
                .refresh_token()
                .map(str::to_owned)
        }
    }

    fn held(access: &str, refresh: &str) -> RefreshContext {
        RefreshContext::new(Some(expired(access, refresh)), RefreshReason::Expired)
    }

    /// A refresh cut off during its token call whose write then fails keeps the set as this
    /// process's unstored one, and the layer's retry, which still holds the set it refreshed
    /// from, presents the kept set's refresh token, not the spent one. (Review, twelfth
    /// session: the kept set was looked up by the refresh token the layer never got.)
    #[tokio::test]
    async fn a_cut_off_refresh_whose_write_failed_is_resumed_by_the_retry() {
        let c = cuts().await;
        c.writes_fail(true);
        c.cut(&held("a0", "r0")).await;
        assert_eq!(c.presented(), ["r0"]);
        c.writes_fail(false);
        c.resumes(
            &held("a0", "r0"),
            &["r0", "r1"],
            "r2",
            "the spent r0 was presented again",
        )
        .await;
        assert_eq!(c.stored_refresh_token().await.as_deref(), Some("r2"));
    }

    /// Two refreshes whose writes failed, the second cut off: the retry, which holds the
    /// first one's set, presents the kept second set's refresh token, not the spent stored
    /// one. (Review, twelfth session: the kept set was looked up by the stored record's
    /// refresh token, `r0`, not by the one presented for it, `r1`.)
    #[tokio::test]
    async fn a_second_cut_off_refresh_whose_write_failed_is_resumed_by_the_retry() {
        let c = cuts().await;
        c.writes_fail(true);
        let first = c.refresh(&held("a0", "r0")).await;
        assert_eq!(first.refresh_token(), Some("r1"));
        // The first call's notice, not waited for then.
        c.reached.notified().await;
        let first = RefreshContext::new(Some(first), RefreshReason::Expired);
        c.cut(&first).await;
        assert_eq!(c.presented(), ["r0", "r1"]);
        c.writes_fail(false);
        c.resumes(
            &first,
            &["r0", "r1", "r2"],
            "r3",
            "a spent refresh token again",
        )
        .await;
    }

    /// Two refreshes cut off in a row, with the same token held, both writes failed: the
    /// third attempt presents the second kept set's refresh token, not the spent stored one.
    /// (Review, twelfth session: only the last refresh token presented was remembered.)
    #[tokio::test]
    async fn two_cut_off_refreshes_in_a_row_are_resumed_by_the_retry() {
        let c = cuts().await;
        c.writes_fail(true);
        c.cut(&held("a0", "r0")).await;
        c.cut(&held("a0", "r0")).await;
        assert_eq!(c.presented(), ["r0", "r1"]);
        c.writes_fail(false);
        c.resumes(
            &held("a0", "r0"),
            &["r0", "r1", "r2"],
            "r3",
            "a spent refresh token again",
        )
        .await;
    }

    /// Two cut-off refreshes with another process's refusal of the spent stored refresh
    /// token between them (writes failing): the third attempt, the layer still holding the
    /// stored set, presents the newest kept set's refresh token. (Review, twelfth session:
    /// the chain split at the refusal, and `r1` was presented twice.)
    #[tokio::test]
    async fn cut_off_refreshes_around_a_refusal_are_resumed_by_the_retry() {
        let c = cuts().await;
        c.writes_fail(true);
        c.cut(&held("a0", "r0")).await;
        // Another process presents the spent r0, is refused, and records it.
        let stored = c.store.load().await.unwrap().unwrap();
        let inner = c.store.store();
        let lease = inner.try_lease(Duration::from_secs(1)).await.unwrap();
        let lease = lease.expect("a free lease");
        let refused = stored.ended(2, "r0");
        let written = inner.compare_and_set(&lease, 1, &refused).await.unwrap();
        assert_eq!(written, CasOutcome::Written);
        inner.release(lease).await.unwrap();
        c.cut(&held("a0", "r0")).await;
        assert_eq!(c.presented(), ["r0", "r1"]);
        c.writes_fail(false);
        c.resumes(
            &held("a0", "r0"),
            &["r0", "r1", "r2"],
            "r3",
            "a spent refresh token again",
        )
        .await;
    }

    /// A login from outside (a refresh token the store does not know) cut off with its write
    /// failed: the retry, the layer still holding the login's own set, goes on from the kept
    /// set instead of presenting the spent login refresh token. (Review, twelfth session.)
    #[tokio::test]
    async fn a_cut_off_login_whose_write_failed_is_resumed_by_the_retry() {
        let c = cuts().await;
        c.writes_fail(true);
        c.cut(&held("l-access", "l0")).await;
        assert_eq!(c.presented(), ["l0"]);
        c.writes_fail(false);
        c.resumes(
            &held("l-access", "l0"),
            &["l0", "r1"],
            "r2",
            "the spent login refresh token again",
        )
        .await;
        let stored = c.stored_refresh_token().await;
        assert_eq!(stored.as_deref(), Some("r2"), "the login is stored for all");
    }

    /// A refresh cut off with its write failed, then the store comes back empty (restarted
    /// without persistence, flushed): the retry, the layer still holding the set it refreshed
    /// from, presents the kept set's refresh token, not the spent one. (Review, twelfth
    /// session: with no record, the kept set was dropped and `r0` presented again.)
    #[tokio::test]
    async fn a_cut_off_refresh_whose_write_failed_survives_a_store_that_came_back_empty() {
        let c = cuts().await;
        c.writes_fail(true);
        c.cut(&held("a0", "r0")).await;
        *c.store.current.lock().unwrap() = MemoryStore::new();
        c.writes_fail(false);
        c.resumes(
            &held("a0", "r0"),
            &["r0", "r1"],
            "r2",
            "the spent r0 was presented again",
        )
        .await;
        assert_eq!(c.stored_refresh_token().await.as_deref(), Some("r2"));
    }

    /// The same with a layer whose token never went through the store (`initial_token`):
    /// its refresh token is of this process's kept chain, so it is no login, and the kept set
    /// is resumed.
    #[tokio::test]
    async fn a_cut_off_initial_token_whose_write_failed_survives_an_empty_store() {
        let c = cuts().await;
        c.writes_fail(true);
        c.cut(&held("a0", "r0")).await;
        *c.store.current.lock().unwrap() = MemoryStore::new();
        c.writes_fail(false);
        // A fresh process's view: it never handed `r0` to its layer (no lineage), only the
        // kept chain knows it.
        c.shared.inner.lineage.0.lock().unwrap().0.clear();
        c.resumes(
            &held("a0", "r0"),
            &["r0", "r1"],
            "r2",
            "the spent r0 was presented again",
        )
        .await;
    }

    /// A set kept of a session logged out for every process (`clear` then
    /// `log_out_everywhere`) is forgotten, and so is one of a session a later login replaced:
    /// the refresh token of a session nobody follows is not kept in memory. (Review, twelfth
    /// session: it stayed until the 10,000 cap.)
    #[tokio::test]
    async fn kept_sets_of_a_logged_out_or_replaced_session_are_forgotten() {
        for logout in [true, false] {
            let c = cuts().await;
            c.writes_fail(true);
            c.refresh(&held("a0", "r0")).await;
            c.writes_fail(false);
            assert_eq!(c.shared.inner.unstored.pending().len(), 1, "kept");
            if logout {
                c.shared.logout();
                c.shared.log_out_everywhere().await.unwrap();
            } else {
                // A login from outside, stored over the session.
                c.refresh(&held("l-access", "l0")).await;
                assert!(c.stored_refresh_token().await.is_some());
            }
            assert!(
                c.shared.inner.unstored.pending().is_empty(),
                "a set of a session nobody follows is kept (logout: {logout})"
            );
        }
    }

    /// A login from outside cut off with its write failed, then a logout for every process
    /// of the session it replaces: the login is a new session, kept, and its retry goes on
    /// from its kept set and is stored over the logout. (Review, twelfth session: the logout
    /// forgot the kept login, and the retry presented the spent `l0`.)
    #[tokio::test]
    async fn a_kept_login_outlives_a_logout_of_the_session_it_replaces() {
        let c = cuts().await;
        c.writes_fail(true);
        c.cut(&held("l-access", "l0")).await;
        c.writes_fail(false);
        c.shared.log_out_everywhere().await.unwrap();
        c.resumes(
            &held("l-access", "l0"),
            &["l0", "r1"],
            "r2",
            "the spent login refresh token again",
        )
        .await;
        assert_eq!(c.stored_refresh_token().await.as_deref(), Some("r2"));
    }

    /// A login from outside cut off twice, the first write failed and the second stored:
    /// the layer still holds the login's first set, and its next refresh follows the stored
    /// session instead of presenting that set's spent refresh token as a new login.
    /// (Review, twelfth session: the stored record did not know `l0`.)
    #[tokio::test]
    async fn a_login_cut_off_twice_follows_the_stored_session() {
        let c = cuts().await;
        c.writes_fail(true);
        c.cut(&held("l-access", "l0")).await;
        c.writes_fail(false);
        c.cut(&held("l-access", "l0")).await;
        assert_eq!(c.presented(), ["l0", "r1"]);
        let token = c.refresh(&held("l-access", "l0")).await;
        assert_eq!(c.presented(), ["l0", "r1"], "a spent refresh token again");
        assert_eq!(token.refresh_token(), Some("r2"), "the stored set, adopted");
    }

    /// A memory store whose loads after the first `quick` ones never answer (a store that
    /// hangs under the lease).
    struct HangingLoads {
        inner: MemoryStore,
        quick: usize,
        loads: AtomicUsize,
        reached: Arc<tokio::sync::Notify>,
    }

    impl TokenStore for HangingLoads {
        async fn load(&self) -> Result<Option<Record>, StoreError> {
            if self.loads.fetch_add(1, Ordering::SeqCst) >= self.quick {
                self.reached.notify_one();
                std::future::pending::<()>().await;
            }
            self.inner.load().await
        }

        async fn try_lease(&self, ttl: Duration) -> Result<Option<Lease>, StoreError> {
            self.inner.try_lease(ttl).await
        }

        async fn compare_and_set(
            &self,
            lease: &Lease,
            expected: u64,
            record: &Record,
        ) -> Result<CasOutcome, StoreError> {
            self.inner.compare_and_set(lease, expected, record).await
        }

        async fn release(&self, lease: Lease) -> Result<(), StoreError> {
            self.inner.release(lease).await
        }

        async fn wait_change(&self, seen: u64, max: Duration) -> Result<(), StoreError> {
            self.inner.wait_change(seen, max).await
        }
    }

    /// A refresh dropped under the lease before its token call (the store hangs on the read
    /// under the lease, and the layer stops waiting) gives the lease back at once, not after
    /// its TTL; no token call is made.
    #[tokio::test]
    async fn a_refresh_dropped_before_its_call_gives_the_lease_back_at_once() {
        let inner = MemoryStore::new();
        seed(&inner, 1, &expired("a0", "r0")).await;
        let reached = Arc::new(tokio::sync::Notify::new());
        let store = HangingLoads {
            inner: inner.clone(),
            quick: 1,
            loads: AtomicUsize::new(0),
            reached: reached.clone(),
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared =
            StoreRefresher::new(recording(log.clone()), store).lease_ttl(Duration::from_secs(600));
        let task = tokio::spawn(shared.refresh(stale()));
        reached.notified().await;
        assert!(
            inner
                .try_lease(Duration::from_secs(1))
                .await
                .unwrap()
                .is_none(),
            "the refresh holds the lease"
        );
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        let mut taken = None;
        for _ in 0..100 {
            taken = inner.try_lease(Duration::from_secs(1)).await.unwrap();
            if taken.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(taken.is_some(), "released at once, not after its 600 s TTL");
        assert!(log.lock().unwrap().is_empty(), "no token call");
    }

    /// A token call that never answers, its refresh dropped: the call keeps the lease until
    /// the margin before the lease's end, and gives it back then (before the TTL runs out).
    #[tokio::test(start_paused = true)]
    async fn a_token_call_that_never_answers_gives_the_lease_back_before_it_runs_out() {
        let store = MemoryStore::new();
        let reached = Arc::new(tokio::sync::Notify::new());
        let hanging = {
            let reached = reached.clone();
            context_fn(move |_ctx: RefreshContext| {
                reached.notify_one();
                std::future::pending::<Result<Token, RefreshError>>()
            })
        };
        let shared = StoreRefresher::new(hanging, store.clone()).lease_ttl(Duration::from_secs(10));
        let task = tokio::spawn(shared.refresh(stale()));
        reached.notified().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        // The call may run until 1 s (the margin) before the lease's 10 s end.
        tokio::time::sleep(Duration::from_millis(8_500)).await;
        let held = store.try_lease(Duration::from_secs(1)).await.unwrap();
        assert!(
            held.is_none(),
            "the lease is held while the call may still answer"
        );
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let taken = store.try_lease(Duration::from_secs(1)).await.unwrap();
        assert!(
            taken.is_some(),
            "given back when the call's time was up, before the TTL"
        );
        assert!(store.load().await.unwrap().is_none(), "nothing stored");
    }

    /// A refresher that records every refresh token it is presented and answers `a{n}` with
    /// the rotated refresh token `r{n}` (`n`: the count of presentations so far).
    fn recording(log: Arc<Mutex<Vec<String>>>) -> impl TokenRefresher {
        context_fn(move |ctx: RefreshContext| {
            let log = log.clone();
            async move {
                let presented = ctx.stale().and_then(Token::refresh_token).unwrap();
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(presented.to_owned());
                    log.len()
                };
                Ok(Token::bearer(format!("a{n}"))?
                    .with_expires_in(Duration::from_secs(600))
                    .with_refresh_token(format!("r{n}")))
            }
        })
    }

    /// Writes `token` as version `version` into an empty `store`.
    async fn seed(store: &impl TokenStore, version: u64, token: &Token) {
        let lease = store
            .try_lease(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        let record = Record::from_token(version, token, SystemTime::now());
        let written = store.compare_and_set(&lease, 0, &record).await.unwrap();
        assert_eq!(written, CasOutcome::Written);
        store.release(lease).await.unwrap();
    }

    /// An expired stored set with refresh token `refresh`.
    fn expired(access: &str, refresh: &str) -> Token {
        Token::bearer(access)
            .unwrap()
            .with_expires_at(SystemTime::now() - Duration::from_secs(1))
            .with_refresh_token(refresh)
    }

    /// What happens to the store just before the next compare-and-set lands.
    #[derive(Clone, Copy)]
    enum Fault {
        /// The lease vanishes (a Redis restart that kept the data, a lease whose TTL ran out
        /// before a slow write): the write answers `LeaseLost`.
        LeaseGone,
        /// Everything vanishes, lease and record (a flushed Redis): `LeaseLost`.
        Flushed,
        /// Another process takes the lease and keeps it (ours ran out): `LeaseLost`.
        TakenOver,
        /// Another process takes the lease and stores a set of its own: `LeaseLost`.
        Overtaken,
        /// The version looks changed although the lease is still ours (the record evicted
        /// and back, say): `VersionChanged`, nothing written.
        VersionMoved,
    }

    /// A memory store with faults: one armed [`Fault`] for the next write, and writes that fail
    /// (an error) while `writes_fail` is set. Clones share everything.
    #[derive(Clone, Default)]
    struct Faulty {
        current: Arc<Mutex<MemoryStore>>,
        fault: Arc<Mutex<Option<Fault>>>,
        other: Arc<Mutex<Option<Lease>>>,
        writes_fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Faulty {
        fn store(&self) -> MemoryStore {
            self.current.lock().unwrap().clone()
        }

        fn arm(&self, fault: Fault) {
            *self.fault.lock().unwrap() = Some(fault);
        }
    }

    impl TokenStore for Faulty {
        async fn load(&self) -> Result<Option<Record>, StoreError> {
            self.store().load().await
        }

        async fn try_lease(&self, ttl: Duration) -> Result<Option<Lease>, StoreError> {
            self.store().try_lease(ttl).await
        }

        async fn compare_and_set(
            &self,
            lease: &Lease,
            expected: u64,
            record: &Record,
        ) -> Result<CasOutcome, StoreError> {
            if self.writes_fail.load(Ordering::SeqCst) {
                return Err(StoreError::unavailable(
                    "the store is down",
                    "connection refused",
                ));
            }
            let fault = self.fault.lock().unwrap().take();
            let store = self.store();
            match fault {
                None => {}
                Some(Fault::LeaseGone) => {
                    store
                        .release(Lease::new(lease.fence(), lease.ttl()))
                        .await?;
                }
                Some(Fault::Flushed) => *self.current.lock().unwrap() = MemoryStore::new(),
                Some(Fault::TakenOver) => {
                    store
                        .release(Lease::new(lease.fence(), lease.ttl()))
                        .await?;
                    let other = store.try_lease(Duration::from_secs(600)).await?;
                    *self.other.lock().unwrap() = other;
                }
                Some(Fault::VersionMoved) => return Ok(CasOutcome::VersionChanged),
                Some(Fault::Overtaken) => {
                    store
                        .release(Lease::new(lease.fence(), lease.ttl()))
                        .await?;
                    let other = store.try_lease(Duration::from_secs(600)).await?.unwrap();
                    let theirs = Token::bearer("theirs")
                        .unwrap()
                        .with_expires_in(Duration::from_secs(600))
                        .with_refresh_token("their-refresh");
                    let now = Record::from_token(record.version(), &theirs, SystemTime::now());
                    let written = store.compare_and_set(&other, expected, &now).await?;
                    assert_eq!(written, CasOutcome::Written);
                    store.release(other).await?;
                }
            }
            self.store().compare_and_set(lease, expected, record).await
        }

        async fn release(&self, lease: Lease) -> Result<(), StoreError> {
            self.store().release(lease).await
        }

        async fn wait_change(&self, seen: u64, max: Duration) -> Result<(), StoreError> {
            self.store().wait_change(seen, max).await
        }
    }

    /// One process rotates `r0 -> r1` and its write meets `fault`; returns that process, its
    /// token, the store, and the log of presented refresh tokens.
    async fn rotate_through(
        fault: Fault,
    ) -> (
        StoreRefresher<impl TokenRefresher, Faulty>,
        Token,
        Faulty,
        Arc<Mutex<Vec<String>>>,
    ) {
        let store = Faulty::default();
        seed(&store, 1, &expired("a0", "r0")).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let a = StoreRefresher::new(recording(log.clone()), store.clone());
        store.arm(fault);
        let got = a.refresh(stale()).await.unwrap();
        assert!(store.fault.lock().unwrap().is_none(), "the fault was met");
        (a, got, store, log)
    }

    /// The write of a rotated set lost its lease, and nobody stored anything since: the set
    /// is stored after all (under a lease taken again, and given back), so another process
    /// presents the new refresh token, never the spent one.
    #[tokio::test]
    async fn a_rotated_set_whose_lease_vanished_is_stored_after_all() {
        for fault in [Fault::LeaseGone, Fault::Flushed] {
            let (_a, got, store, log) = rotate_through(fault).await;
            assert_eq!(got.refresh_token(), Some("r1"));
            let stored = store.load().await.unwrap().expect("a stored set");
            assert_eq!(stored.to_token().unwrap().refresh_token(), Some("r1"));
            assert!(stored.same_access_token(&got));
            let lease = store.try_lease(Duration::from_secs(1)).await.unwrap();
            store
                .release(lease.expect("the lease was given back"))
                .await
                .unwrap();

            // Another process: adopts the stored set, then refreshes from its refresh token.
            let b = StoreRefresher::new(recording(log.clone()), store.clone());
            let adopted = b.refresh(stale()).await.unwrap();
            assert_eq!(adopted.secret(), "a1");
            let next = b
                .refresh(RefreshContext::new(Some(adopted), RefreshReason::Forced))
                .await
                .unwrap();
            assert_eq!(next.refresh_token(), Some("r2"));
            assert_eq!(*log.lock().unwrap(), ["r0", "r1"]);
            let stored = store.load().await.unwrap().unwrap();
            assert_eq!(stored.to_token().unwrap().refresh_token(), Some("r2"));
        }
    }

    /// A write that found another version while its lease was still its own is written under
    /// that lease (a new lease could never be had: it is held by this very write), at once.
    #[tokio::test(start_paused = true)]
    async fn a_rotated_set_whose_write_saw_another_version_is_stored_under_its_own_lease() {
        let started = tokio::time::Instant::now();
        let (_a, got, store, log) = rotate_through(Fault::VersionMoved).await;
        assert_eq!(got.refresh_token(), Some("r1"));
        let stored = store.load().await.unwrap().expect("a stored set");
        assert_eq!(stored.version(), 2);
        assert_eq!(stored.to_token().unwrap().refresh_token(), Some("r1"));
        assert_eq!(*log.lock().unwrap(), ["r0"]);
        assert!(
            started.elapsed() < WAIT_SLICE,
            "no wait for a lease it held itself (paused clock)"
        );
    }

    /// A write that lost to another process's set adopts that set, as before.
    #[tokio::test]
    async fn a_rotated_set_overtaken_by_another_process_adopts_its_set() {
        let (_a, got, store, log) = rotate_through(Fault::Overtaken).await;
        assert_eq!(got.secret(), "theirs");
        assert_eq!(got.refresh_token(), Some("their-refresh"));
        let stored = store.load().await.unwrap().unwrap();
        assert_eq!(stored.version(), 2);
        assert!(stored.same_access_token(&got));
        assert_eq!(*log.lock().unwrap(), ["r0"]);
    }

    /// Storing the rotated set again is bounded: with the lease held elsewhere for long, the
    /// set is kept in memory, and this process's next refresh presents its refresh token.
    #[tokio::test(start_paused = true)]
    async fn storing_a_rotated_set_again_gives_up_while_another_process_holds_the_lease() {
        let (a, got, store, log) = rotate_through(Fault::TakenOver).await;
        assert_eq!(got.refresh_token(), Some("r1"));
        let stored = store.load().await.unwrap().unwrap();
        assert_eq!(stored.version(), 1, "not stored");
        let other = store.other.lock().unwrap().take().unwrap();
        store.release(other).await.unwrap();

        let next = a
            .refresh(RefreshContext::new(Some(got), RefreshReason::Forced))
            .await
            .unwrap();
        assert_eq!(next.refresh_token(), Some("r2"));
        assert_eq!(*log.lock().unwrap(), ["r0", "r1"]);
        let stored = store.load().await.unwrap().unwrap();
        assert_eq!(stored.to_token().unwrap().refresh_token(), Some("r2"));
    }

    /// A keyed refresher whose token call for key `k` presents and rotates `r{k}.{n}`.
    fn keyed_recording(
        log: Arc<Mutex<Vec<(usize, String)>>>,
    ) -> impl Fn(
        usize,
        Option<Token>,
    ) -> futures_util::future::BoxFuture<'static, Result<Token, RefreshError>>
    + Send
    + Sync
    + 'static {
        move |key: usize, stale: Option<Token>| {
            let log = log.clone();
            Box::pin(async move {
                let presented = stale.as_ref().and_then(Token::refresh_token).unwrap();
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push((key, presented.to_owned()));
                    log.iter().filter(|(k, _)| *k == key).count()
                };
                Ok(Token::bearer(format!("a{key}.{n}"))?
                    .with_expires_in(Duration::from_secs(600))
                    .with_refresh_token(format!("r{key}.{n}")))
            })
        }
    }

    /// An outage of the store's writes across many keys of a keyed refresher: once writes work
    /// again, every key's next refresh presents its own rotated refresh token, not the stored
    /// spent one, however many keys the outage hit.
    #[tokio::test]
    async fn unstored_sets_of_many_keys_all_survive_an_outage() {
        const KEYS: usize = 100;
        let writes_fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stores: Vec<Faulty> = (0..KEYS)
            .map(|_| Faulty {
                writes_fail: writes_fail.clone(),
                ..Faulty::default()
            })
            .collect();
        for (key, store) in stores.iter().enumerate() {
            seed(
                store,
                1,
                &expired(&format!("a{key}.0"), &format!("r{key}.0")),
            )
            .await;
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let stores = Arc::new(stores);
        let shared = {
            let stores = stores.clone();
            KeyedStoreRefresher::new(keyed_recording(log.clone()), move |key: &usize| {
                stores[*key].clone()
            })
        };
        writes_fail.store(true, Ordering::SeqCst);
        let mut held = Vec::new();
        for key in 0..KEYS {
            let initial = expired(&format!("a{key}.0"), &format!("r{key}.0"));
            let ctx = RefreshContext::new(Some(initial), RefreshReason::Expired);
            let got = KeyedRefresher::refresh(&shared, &key, ctx).await.unwrap();
            assert_eq!(got.refresh_token(), Some(format!("r{key}.1").as_str()));
            held.push(got);
        }
        writes_fail.store(false, Ordering::SeqCst);
        for (key, got) in held.into_iter().enumerate() {
            let ctx = RefreshContext::new(Some(got), RefreshReason::Forced);
            let next = KeyedRefresher::refresh(&shared, &key, ctx).await.unwrap();
            assert_eq!(next.refresh_token(), Some(format!("r{key}.2").as_str()));
            let presented = log.lock().unwrap().last().cloned().unwrap();
            assert_eq!(presented, (key, format!("r{key}.1")), "key {key}");
            let stored = stores[key].load().await.unwrap().unwrap();
            assert_eq!(stored.version(), 2);
            assert!(stored.same_access_token(&next));
        }
    }
}
