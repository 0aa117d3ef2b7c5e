//! A token set shared by several processes or replicas: one refresh for all of them, a token
//! that survives restarts.
//!
//! The layer's single flight ends at the process boundary. When several processes share one
//! login (or several replicas share one credential), each would refresh on its own: N token
//! calls per expiry and, with rotating refresh tokens, a second process presenting a refresh
//! token that the first one already spent, which an RFC 9700 server answers by revoking the
//! whole token family. A [`TokenStore`] holds the shared record of one principal (access
//! token, its wall-clock expiry, refresh token, a version), and [`StoreRefresher`] wraps your
//! refresher so that every process goes through the store on the refresh path:
//!
//! 1. On a refresh need it re-reads the store: a stored token newer than the rejected one is
//!    adopted without calling your refresher (0 token calls).
//! 2. Otherwise it takes the store's *lease* (a lock with a TTL), or waits for the holder's
//!    new version and adopts it; under the lease it re-reads, refreshes with the **stored**
//!    refresh token, writes the new set with a compare-and-set on the version, and releases.
//! 3. A terminal failure (`invalid_grant`) is checked against the store first: if another
//!    process rotated meanwhile, its set is adopted instead of ending the session. A write that
//!    lost a race adopts the winner's set the same way. Otherwise the refusal is written to
//!    the store (a digest of the refused refresh token, never the token): every other process
//!    ends its session with a terminal error without a token call, until a new login is stored.
//! 4. A lease holder that dies mid-refresh loses the lease (the file store's OS lock is
//!    released at once, the Redis lease expires after its TTL) and another process takes over.
//! 5. A token handed to the layer from outside (`set_token`, `initial_token`) whose refresh
//!    token the store does not know (not the stored one, nor one of the last
//!    [`SUPERSEDED_KEPT`] it replaced, nor one this process got from the store) is a new
//!    login: it is refreshed with its own refresh token, never replaced by the stored set, and
//!    its result is stored for everyone. After a logout (`TokenHandle::clear`), the stored
//!    session is neither adopted nor refreshed by this process until a token is installed
//!    again; [`StoreRefresher::log_out_everywhere`] logs it out for every process.
//!
//! The store is never touched on the hot path: requests with a valid token never see it. At
//! start (the first refresh, with no token) a valid stored set is adopted, so a restarted
//! process sends its first request with the stored access token: start processes that share
//! a store without a token of their own (a token older than the store's last
//! [`SUPERSEDED_KEPT`] rotations would be taken for a new login).
//!
//! Stores: [`MemoryStore`] (one process, tests), [`FileStore`] (one host: one file replaced
//! atomically, an OS advisory lock as the lease, mode 0600) and, with the `redis` feature,
//! `RedisStore` (replicas on several hosts: `SET NX PX` lease with a random fencing value, a
//! fenced compare-and-set in Lua, pub/sub to wake waiters).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_auth_refresh::store::{FileStore, StoreRefresher};
//! use tower_auth_refresh::{context_fn, RefreshContext, RefreshError, RefreshLayer, Token};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("tar-doc-store-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! // Your refresher: it gets the stored refresh token through `ctx.stale()`.
//! let refresher = context_fn(|ctx: RefreshContext| async move {
//!     let _refresh_token = ctx.stale().and_then(|t| t.refresh_token());
//!     // ... the refresh-token grant goes here ...
//!     Ok::<_, RefreshError>(Token::bearer("new-access")?
//!         .with_expires_in(Duration::from_secs(3600))
//!         .with_refresh_token("rotated-refresh"))
//! });
//!
//! let store = FileStore::new(dir.join("token.json"));
//! let layer = RefreshLayer::new(StoreRefresher::new(refresher, store));
//! # let _ = layer;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::token::{Expiry, Token};

mod file;
mod keyed;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod refresher;

pub use file::FileStore;
pub use keyed::KeyedStoreRefresher;
pub use memory::MemoryStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisStore;
pub use refresher::{DEFAULT_LEASE_TTL, DEFAULT_MIN_REMAINING, StoreRefresher};

/// The shared record of one principal: an access token, its wall-clock expiry, the refresh
/// token if any, and the version the store gave it; or, once the session was logged out for
/// every process ([`is_logged_out`](Self::is_logged_out)), no token at all.
///
/// It also carries digests (never the tokens) of the refresh tokens its session went through
/// before (the last [`SUPERSEDED_KEPT`]), so that a process handed an older token of the same
/// session follows the store instead of taking it for a new login, and, once the token
/// endpoint refused the session's refresh token, a digest of that token: the session ended,
/// and no process presents it again ([`is_ended`](Self::is_ended)).
///
/// Holds secrets: its `Debug` redacts them. [`encode`](Self::encode) and
/// [`decode`](Self::decode) give the JSON form the built-in stores keep, for stores of your own.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    version: u64,
    scheme: String,
    access_token: String,
    expires_at: Option<SystemTime>,
    refresh_token: Option<String>,
    /// Digests of the refresh tokens this record's session superseded, newest first.
    superseded: Vec<String>,
    /// The digest of the refresh token the token endpoint refused: the session ended.
    refused: Option<String>,
    /// The session was logged out for every process ([`StoreRefresher::log_out_everywhere`]): the
    /// record keeps no token, only the digests of the refresh tokens it superseded.
    logged_out: bool,
}

/// How many digests of superseded refresh tokens a record keeps.
pub const SUPERSEDED_KEPT: usize = 32;

/// The digest a record keeps of a refresh token: 128 bits of SHA-256, as 32 hex digits.
pub(crate) fn digest(refresh_token: &str) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"tower-auth-refresh refresh token\0");
    hasher.update(refresh_token.as_bytes());
    let sum = hasher.finalize();
    sum[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// True for a digest as [`digest`] writes it.
fn is_digest(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The stored JSON form; `format` lets a later release change it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    format: u32,
    version: u64,
    scheme: String,
    access_token: String,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    expires_at_ms: Option<u64>,
    #[serde(default)]
    refresh_token: Option<String>,
    /// Digests of superseded refresh tokens (absent in records written before it existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    superseded: Vec<String>,
    /// The digest of a refused refresh token (absent unless the session ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
    /// The session was logged out for every process (absent unless it was): the access
    /// token is then empty, and no refresh token is kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    logged_out: bool,
}

const FORMAT: u32 = 1;

impl Record {
    /// The record of `token` as version `version`. An expiry given as a lifetime
    /// ([`Token::with_expires_in`]) becomes a wall-clock time counted from `now`; the token's
    /// refresh token, if any, is kept with it.
    pub fn from_token(version: u64, token: &Token, now: SystemTime) -> Self {
        let expires_at = match token.expiry() {
            Some(Expiry::At(at)) => Some(at),
            Some(Expiry::In(life)) => now.checked_add(life),
            None => None,
        };
        Self {
            version,
            scheme: token.scheme().to_owned(),
            access_token: token.secret().to_owned(),
            expires_at,
            refresh_token: token.refresh_token().map(str::to_owned),
            superseded: Vec::new(),
            refused: None,
            logged_out: false,
        }
    }

    /// This record as the successor of `previous`, refreshed by presenting `presented`
    /// (newest first: the refresh token presented, then those spent on the way to it when it
    /// was a set of this process's whose write had failed): it supersedes them, the refresh
    /// token `previous` carried, and its predecessors'.
    pub(crate) fn superseding<'a>(
        mut self,
        previous: Option<&Record>,
        presented: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut superseded = Vec::new();
        let mut add = |d: String| {
            if !superseded.contains(&d) {
                superseded.push(d);
            }
        };
        presented.into_iter().map(digest).for_each(&mut add);
        if let Some(previous) = previous {
            if let Some(rt) = &previous.refresh_token {
                add(digest(rt));
            }
            if let Some(refused) = &previous.refused {
                add(refused.clone());
            }
            previous.superseded.iter().cloned().for_each(&mut add);
        }
        let own = self.refresh_token.as_deref().map(digest);
        superseded.retain(|d| Some(d) != own.as_ref());
        superseded.truncate(SUPERSEDED_KEPT);
        self.superseded = superseded;
        self
    }

    /// The successor of this record, as `version`, saying that the token endpoint refused
    /// `refused` (this record's refresh token, or the one presented in its stead): the session
    /// ended. It keeps the access token but no refresh token.
    pub(crate) fn ended(&self, version: u64, refused: &str) -> Self {
        let mut next = Self {
            version,
            refresh_token: None,
            superseded: Vec::new(),
            refused: None,
            ..self.clone()
        }
        .superseding(Some(self), [refused]);
        next.refused = Some(digest(refused));
        next
    }

    /// The first record of a store, saying that the session was logged out for every process
    /// (a logout with no record stored).
    pub(crate) fn logged_out_first() -> Self {
        Self {
            version: 1,
            scheme: "Bearer".to_owned(),
            access_token: String::new(),
            expires_at: None,
            refresh_token: None,
            superseded: Vec::new(),
            refused: None,
            logged_out: true,
        }
    }

    /// The successor of this record, as `version`, saying that the session was logged out
    /// for every process: no access token, no refresh token, no expiry; the digests of the
    /// refresh tokens it went through are kept, so that a process still holding one of them
    /// knows its session ended.
    pub(crate) fn logged_out(&self, version: u64) -> Self {
        Self {
            version,
            scheme: self.scheme.clone(),
            ..Self::logged_out_first()
        }
        .superseding(Some(self), [])
    }

    /// True if this record's session went through `refresh_token` (its own refresh token,
    /// one it superseded, or the one that was refused).
    pub(crate) fn knows(&self, refresh_token: &str) -> bool {
        if self.refresh_token.as_deref() == Some(refresh_token) {
            return true;
        }
        let d = digest(refresh_token);
        self.refused.as_ref() == Some(&d) || self.superseded.contains(&d)
    }

    /// True if this record's session ended: the token endpoint refused its refresh token
    /// (`invalid_grant`), or it was logged out for every process
    /// ([`is_logged_out`](Self::is_logged_out)). Every process then ends its session without
    /// a token call, until a new login is stored.
    pub fn is_ended(&self) -> bool {
        self.refused.is_some() || self.logged_out
    }

    /// True if this record's session was logged out for every process
    /// ([`StoreRefresher::log_out_everywhere`]): the record holds no token.
    pub fn is_logged_out(&self) -> bool {
        self.logged_out
    }

    /// True if the token endpoint refused this record's refresh token.
    pub(crate) fn is_refused(&self) -> bool {
        self.refused.is_some()
    }

    /// The version the store gave this record; 0 is never a stored version (it stands for
    /// "no record" in [`TokenStore::compare_and_set`]), nor is `u64::MAX` (no version could
    /// follow it).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the access token expires, if known.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// True if a refresh token is stored with the access token.
    pub fn has_refresh_token(&self) -> bool {
        self.refresh_token.is_some()
    }

    /// True if the access token is known to expire within `margin` of `now` (or already has).
    pub fn expires_within(&self, margin: Duration, now: SystemTime) -> bool {
        self.expires_at
            .is_some_and(|at| at.duration_since(now).map_or(true, |left| left <= margin))
    }

    /// The token set as a [`Token`] with an absolute expiry and its refresh token.
    ///
    /// # Errors
    ///
    /// A [`StoreError`] for which [`is_corrupt`](StoreError::is_corrupt) holds if the stored
    /// scheme or token cannot be sent in an `Authorization` header, and one for which
    /// [`is_logged_out`](StoreError::is_logged_out) holds if the session was logged out (the
    /// record holds no token).
    pub fn to_token(&self) -> Result<Token, StoreError> {
        if self.logged_out {
            return Err(StoreError::logged_out());
        }
        let mut token =
            Token::with_scheme(&self.scheme, self.access_token.as_str()).map_err(|e| {
                StoreError::corrupt(format!("the stored access token is unusable: {e}"))
            })?;
        if let Some(at) = self.expires_at {
            token = token.with_expires_at(at);
        }
        if let Some(refresh) = &self.refresh_token {
            token = token.with_refresh_token(refresh.as_str());
        }
        Ok(token)
    }

    /// True if this record's access token is the same as `token`'s.
    pub fn same_access_token(&self, token: &Token) -> bool {
        self.scheme == token.scheme() && self.access_token == token.secret()
    }

    /// The JSON form the built-in stores keep.
    pub fn encode(&self) -> Vec<u8> {
        let wire = Wire {
            format: FORMAT,
            version: self.version,
            scheme: self.scheme.clone(),
            access_token: self.access_token.clone(),
            expires_at_ms: self.expires_at.map(|at| {
                // Past what a `u64` holds: the farthest expiry, never a wrapped one.
                at.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }),
            refresh_token: self.refresh_token.clone(),
            superseded: self.superseded.clone(),
            refused: self.refused.clone(),
            logged_out: self.logged_out,
        };
        serde_json::to_vec(&wire).expect("a record always serializes")
    }

    /// Reads the JSON form back.
    ///
    /// # Errors
    ///
    /// A [`StoreError`] for which [`is_corrupt`](StoreError::is_corrupt) holds if `bytes` is
    /// not a whole record (truncated, not JSON, missing or mistyped fields, version 0 or
    /// `u64::MAX`, an unknown format, an unusable token, a digest that is not 32 lowercase hex
    /// digits or more than [`SUPERSEDED_KEPT`] of them, a logged-out record that holds a
    /// token or a refusal). A record written before digests existed (without them) is read as
    /// it was; a logged-out record's empty access token is its only valid one. The message
    /// gives the position, never the content.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's messages can quote the offending value, a secret perhaps: keep
            // only the category and the position.
            StoreError::corrupt(format!(
                "the stored record is not valid ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if wire.format != FORMAT {
            return Err(StoreError::corrupt(format!(
                "the stored record has an unknown format {}",
                wire.format
            )));
        }
        if wire.version == 0 {
            return Err(StoreError::corrupt("the stored record has version 0"));
        }
        if wire.version == u64::MAX {
            // No version can follow it: a refresh could never store its result.
            return Err(StoreError::corrupt(
                "the stored record has the last possible version (u64::MAX)",
            ));
        }
        if wire.superseded.len() > SUPERSEDED_KEPT
            || !wire
                .superseded
                .iter()
                .chain(wire.refused.as_ref())
                .all(|d| is_digest(d))
        {
            return Err(StoreError::corrupt(
                "the stored record has a malformed refresh token digest",
            ));
        }
        let record = Self {
            version: wire.version,
            scheme: wire.scheme,
            access_token: wire.access_token,
            expires_at: wire
                .expires_at_ms
                .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms))),
            refresh_token: wire.refresh_token.filter(|r| !r.is_empty()),
            superseded: wire.superseded,
            refused: wire.refused,
            logged_out: wire.logged_out,
        };
        if record.logged_out {
            // It keeps no token, nor the refusal of one.
            if !record.access_token.is_empty()
                || record.refresh_token.is_some()
                || record.refused.is_some()
            {
                return Err(StoreError::corrupt(
                    "the stored record of a logged-out session holds a token",
                ));
            }
            return Ok(record);
        }
        // A record whose token cannot be sent is corrupt too.
        record.to_token()?;
        Ok(record)
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("version", &self.version)
            .field("scheme", &self.scheme)
            .field("access_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("superseded", &self.superseded.len())
            .field("ended", &self.is_ended())
            .field("logged_out", &self.logged_out)
            .finish()
    }
}

/// The right to refresh: held by one process at a time, until it is released, its holder
/// dies, or its TTL runs out.
///
/// Carries a fencing value, unique per lease, that the store checks on
/// [`compare_and_set`](TokenStore::compare_and_set), so a holder whose lease expired cannot
/// overwrite the record.
pub struct Lease {
    fence: String,
    ttl: Duration,
    /// The file store's OS lock: the open lock file, and its path (a lease is good only for
    /// the store whose lock it holds).
    file: Option<(std::fs::File, std::path::PathBuf)>,
}

impl Lease {
    /// A lease with this fencing value, for stores of your own.
    pub fn new(fence: impl Into<String>, ttl: Duration) -> Self {
        Self {
            fence: fence.into(),
            ttl,
            file: None,
        }
    }

    /// The fencing value.
    pub fn fence(&self) -> &str {
        &self.fence
    }

    /// How long the lease lasts at most.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("fence", &self.fence)
            .field("ttl", &self.ttl)
            .field("os_lock", &self.file.is_some())
            .finish()
    }
}

/// A fencing value: 128 random bits (from the standard library's per-process random hasher
/// keys, the process id, the time and a counter), as 32 hex digits.
pub(crate) fn fence() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut out = String::with_capacity(32);
    for round in 0..2u8 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(round);
        h.write_u32(std::process::id());
        h.write_u128(nanos);
        h.write_u64(n);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// What [`TokenStore::compare_and_set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CasOutcome {
    /// The record was written.
    Written,
    /// The stored version is not the expected one any more (another process wrote): nothing
    /// was written.
    VersionChanged,
    /// The lease is no longer held (expired or taken over): nothing was written.
    LeaseLost,
}

/// The shared record of one principal, and the lease that lets one process refresh it at a
/// time.
///
/// [`StoreRefresher`] uses these operations only on the refresh path. Implementations:
/// [`MemoryStore`], [`FileStore`], and `RedisStore` (feature `redis`).
pub trait TokenStore: Send + Sync + 'static {
    /// Reads the record; `None` if there is none yet.
    fn load(&self) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Takes the lease for at most `ttl` if no one holds it; `None` if someone does.
    fn try_lease(
        &self,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Lease>, StoreError>> + Send;

    /// Writes `record` if the stored version is still `expected` (0: no record) and `lease`
    /// is still held. `record.version()` must be greater than `expected`.
    fn compare_and_set(
        &self,
        lease: &Lease,
        expected: u64,
        record: &Record,
    ) -> impl Future<Output = Result<CasOutcome, StoreError>> + Send;

    /// Gives the lease up (if it is still this one).
    ///
    /// [`StoreRefresher`] also calls it from a task it spawns when a refresh is dropped while
    /// holding the lease before its token call (cancelled by the layer's `refresh_timeout`),
    /// so that the others need not wait for the TTL; once the token call is made, the call's
    /// own task gives the lease back when it is done.
    fn release(&self, lease: Lease) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Waits until the store may hold a version newer than `seen`, or the lease may have been
    /// released, for at most `max`. Pub/sub where the store has it, bounded polling with
    /// backoff otherwise. Returning early is always allowed.
    fn wait_change(
        &self,
        seen: u64,
        max: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A store operation failed.
///
/// Its message names what went wrong, never a token. As a refresh failure it is transient
/// ([`RefreshError::transient`](crate::RefreshError::transient)): the layer retries, and the
/// next refresh tries again.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    source: Option<crate::BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreErrorKind {
    Corrupt,
    Unavailable,
    LeaseTimeout,
    LoggedOut,
}

impl StoreError {
    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Self {
            kind: StoreErrorKind::Corrupt,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn unavailable(
        message: impl Into<String>,
        source: impl Into<crate::BoxError>,
    ) -> Self {
        Self {
            kind: StoreErrorKind::Unavailable,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The store answered so slowly that too little of a lease was left for the token call.
    pub(crate) fn too_slow(left: Duration, ttl: Duration) -> Self {
        Self {
            kind: StoreErrorKind::Unavailable,
            message: format!(
                "the store answered too slowly: {} ms of the {} ms lease left for the token call, \
                 which was not made",
                left.as_millis(),
                ttl.as_millis()
            ),
            source: None,
        }
    }

    pub(crate) fn lease_timeout(waited: Duration) -> Self {
        Self {
            kind: StoreErrorKind::LeaseTimeout,
            message: format!(
                "another process held the refresh lease for {} ms without storing a new token",
                waited.as_millis()
            ),
            source: None,
        }
    }

    /// The stored session was logged out for every process: the record holds no token.
    pub(crate) fn logged_out() -> Self {
        Self {
            kind: StoreErrorKind::LoggedOut,
            message: "the stored session was logged out; it holds no token".to_owned(),
            source: None,
        }
    }

    /// The stored record cannot be read (truncated, not a record, an unusable token). It is
    /// never overwritten automatically: remove it to start over.
    pub fn is_corrupt(&self) -> bool {
        self.kind == StoreErrorKind::Corrupt
    }

    /// The store could not be reached or read (I/O error, Redis down), or answered so slowly
    /// that too little of the lease was left for the token call.
    pub fn is_unavailable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }

    /// Waiting for another process's lease took too long.
    pub fn is_lease_timeout(&self) -> bool {
        self.kind == StoreErrorKind::LeaseTimeout
    }

    /// The stored session was logged out for every process ([`Record::to_token`] of a
    /// logged-out record): it holds no token.
    pub fn is_logged_out(&self) -> bool {
        self.kind == StoreErrorKind::LoggedOut
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token store: {}", self.message)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_redacts() {
        let now = SystemTime::now();
        let token = Token::bearer("acc-secret")
            .unwrap()
            .with_expires_in(Duration::from_secs(60))
            .with_refresh_token("ref-secret");
        let rec = Record::from_token(3, &token, now);
        let back = Record::decode(&rec.encode()).unwrap();
        assert_eq!(back.version(), 3);
        assert!(back.same_access_token(&token));
        let t = back.to_token().unwrap();
        assert_eq!(t.refresh_token(), Some("ref-secret"));
        assert!(!format!("{rec:?}").contains("secret\""));
        assert!(!format!("{rec:?}").contains("acc-secret"));
        assert!(!format!("{rec:?}").contains("ref-secret"));
    }

    /// An expiry past what milliseconds since the epoch hold in a `u64` (a JWT `exp` far in
    /// the future) is stored as the farthest one, not wrapped into 1970.
    #[test]
    fn a_far_future_expiry_stays_in_the_future() {
        let now = SystemTime::now();
        // Not representable on every platform (Windows' `SystemTime` is narrower).
        let Some(far) = UNIX_EPOCH
            .checked_add(Duration::from_millis(u64::MAX))
            .and_then(|t| t.checked_add(Duration::from_secs(2)))
        else {
            return;
        };
        let token = Token::bearer("a").unwrap().with_expires_at(far);
        let back = Record::decode(&Record::from_token(1, &token, now).encode()).unwrap();
        assert!(!back.expires_within(Duration::from_secs(86_400 * 365), now));
    }

    #[test]
    fn decode_errors_never_quote_the_content() {
        let bad: &[&[u8]] = &[
            b"",
            b"{\"format\":1,\"version\":2,\"scheme\":\"Bearer\",\"access_token\":\"tops",
            b"{\"format\":1,\"version\":\"topsecret\",\"scheme\":\"Bearer\",\"access_token\":\"x\"}",
            b"{\"format\":1,\"version\":0,\"scheme\":\"Bearer\",\"access_token\":\"topsecret\"}",
            b"{\"format\":1,\"version\":18446744073709551615,\"scheme\":\"Bearer\",\"access_token\":\"topsecret\"}",
            b"{\"format\":1,\"version\":1,\"scheme\":\"Bearer\",\"access_token\":\"top secret\"}",
            b"{\"format\":1,\"version\":1,\"scheme\":\"Bearer\",\"access_token\":\"t\",\"x\":\"topsecret\"}",
            b"\xff\xfe",
        ];
        for bytes in bad {
            let err = Record::decode(bytes).unwrap_err();
            assert!(err.is_corrupt());
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains("topsecret") && !shown.contains("top secret"),
                "{shown}"
            );
        }
    }

    /// A logged-out record keeps no token and reads back as one; a logged-out record that
    /// holds a token (or a refusal) is corrupt, never a session to adopt; `to_token` of it is
    /// a typed error; nothing of the session's secrets is written.
    #[test]
    fn a_logged_out_record_keeps_no_token() {
        let token = Token::bearer("acc-secret")
            .unwrap()
            .with_expires_in(Duration::from_secs(60))
            .with_refresh_token("ref-secret");
        let rec = Record::from_token(3, &token, SystemTime::now()).superseding(None, ["old"]);
        let out = rec.logged_out(4);
        let written = String::from_utf8(out.encode()).unwrap();
        assert!(
            !written.contains("secret") && written.contains("\"logged_out\":true"),
            "{written}"
        );
        let back = Record::decode(written.as_bytes()).unwrap();
        assert!(back.is_logged_out() && back.is_ended() && !back.has_refresh_token());
        assert_eq!(back.version(), 4);
        assert!(
            back.knows("ref-secret") && back.knows("old"),
            "its history is kept"
        );
        assert!(back.to_token().unwrap_err().is_logged_out());
        assert!(!format!("{back:?}").contains("secret"));
        assert!(!rec.is_logged_out() && !written.is_empty());
        let plain = String::from_utf8(rec.encode()).unwrap();
        assert!(
            !plain.contains("logged_out"),
            "not written for a live session"
        );
        for bad in [
            &br#"{"format":1,"version":2,"scheme":"Bearer","access_token":"a","logged_out":true}"#
                [..],
            br#"{"format":1,"version":2,"scheme":"Bearer","access_token":"","refresh_token":"r","logged_out":true}"#,
            br#"{"format":1,"version":2,"scheme":"Bearer","access_token":"","refused":"0123456789abcdef0123456789abcdef","logged_out":true}"#,
            br#"{"format":1,"version":2,"scheme":"Bearer","access_token":"","logged_out":"yes"}"#,
        ] {
            assert!(Record::decode(bad).unwrap_err().is_corrupt());
        }
    }

    /// A record written before the digests existed reads as before; a malformed digest is a
    /// corrupt record, never a panic; an ended record round-trips without its refresh token.
    #[test]
    fn digests_are_optional_and_checked() {
        let old =
            br#"{"format":1,"version":2,"scheme":"Bearer","access_token":"a","refresh_token":"r"}"#;
        let rec = Record::decode(old).unwrap();
        assert!(!rec.is_ended() && rec.knows("r") && !rec.knows("x"));
        let written = String::from_utf8(rec.encode()).unwrap();
        assert!(
            !written.contains("superseded") && !written.contains("refused"),
            "nothing new written for a session without a history"
        );
        for bad in [
            &br#"{"format":1,"version":2,"scheme":"Bearer","access_token":"a","refused":"nothex"}"#
                [..],
            br#"{"format":1,"version":2,"scheme":"Bearer","access_token":"a","refused":7}"#,
            br#"{"format":1,"version":2,"scheme":"Bearer","access_token":"a","superseded":["AB"]}"#,
        ] {
            assert!(Record::decode(bad).unwrap_err().is_corrupt());
        }
        let ended = Record::decode(&rec.ended(3, "r").encode()).unwrap();
        assert!(ended.is_ended() && ended.knows("r") && !ended.has_refresh_token());
        assert!(!String::from_utf8(ended.encode()).unwrap().contains("\"r\""));
    }

    #[test]
    fn fences_differ() {
        let a = fence();
        let b = fence();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
