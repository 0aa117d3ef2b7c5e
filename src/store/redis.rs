//! A store in Redis, for replicas on several hosts.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::socket2::TcpKeepalive;
use redis::{Client, ProtocolVersion, PushKind, RedisResult, Script};
use tokio::sync::watch;

use super::{CasOutcome, Lease, Record, StoreError, TokenStore, fence};

/// The fenced compare-and-set: writes only if the lease still holds the caller's fencing
/// value and the stored version is the expected one, then wakes the waiters. The `PUBLISH`
/// is a `pcall`: a user without permission for the channel (an ACL without `&<prefix>:*`)
/// has written the record all the same, and must hear so (its waiters poll). Keys of another
/// type than a string are checked first (a `GET` of one is an error): a lease key of another
/// type is no lease, a record key of another type is a corrupt record.
const CAS: &str = r"
if redis.call('TYPE', KEYS[2])['ok'] ~= 'string' then return 'lease' end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'lease' end
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'string' then return 'corrupt' end
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if not ok or type(rec) ~= 'table' or type(rec['version']) ~= 'number' then return 'corrupt' end
  v = rec['version']
end
if v ~= tonumber(ARGV[2]) then return 'version' end
redis.call('SET', KEYS[1], ARGV[3])
redis.pcall('PUBLISH', KEYS[3], ARGV[4])
return 'ok'
";

/// Releases the lease only if it still holds the caller's fencing value.
const RELEASE: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.pcall('PUBLISH', KEYS[2], 'released')
end
return 1
";

/// A [`TokenStore`] in Redis, for replicas that share one credential across hosts.
///
/// With the prefix `p`, the record is the string key `p:record` (the JSON of [`Record`]), the
/// lease is `p:lease`, and new versions are published on `p:changed`. Use one prefix per
/// principal (a keyed layer: one store per key, with the key in the prefix).
///
/// - The lease is `SET p:lease <fence> NX PX <ttl>` with a random 128-bit fencing value; a
///   holder that dies loses it when the TTL runs out.
/// - The compare-and-set is a Lua script that checks the fence and the version and writes in
///   one step, then `PUBLISH`es, so waiters wake without polling hard (they still re-check
///   every 250 ms at most, for a missed message or an expired lease).
/// - The connection is a `redis` crate `ConnectionManager` (RESP3, so one connection carries
///   commands and the subscription), which reconnects by itself when the connection drops;
///   while Redis is unreachable, every operation fails as a [`StoreError`] for which
///   [`is_unavailable`](StoreError::is_unavailable) holds, a transient refresh failure.
/// - An operation without an answer within 2 s fails the same way, and the store then
///   replaces the connection: a half-open one (the server's host crashed, a NAT or firewall
///   dropped the flow, a failover moved the address) costs one failed operation, not every
///   operation until the kernel gives the socket up. TCP keepalive probes also close such a
///   connection while it is idle.
///
/// With Redis ACLs, the store's user needs the keys `~p:*`, the commands the store sends
/// (`GET`, `SET`, `DEL`, `TYPE`, `EVALSHA` and `EVAL`, `SUBSCRIBE`, `UNSUBSCRIBE`, `PUBLISH`,
/// besides the connection's handshake), and should have the channels `&p:*`. Without the
/// channels (a new user's default since Redis 7) the store still works: Redis refuses the
/// subscription, the store logs a warning once, and waits look at the record every 100 ms
/// instead of being woken.
///
/// Needs Redis 6 or later (RESP3). Keys must not be evicted (`maxmemory-policy noeviction`,
/// Redis's default: a policy such as `volatile-ttl` evicts the lease first). Redis must keep
/// what it acknowledged: a restart from an
/// RDB snapshot, or with `appendfsync everysec`, or a failover to a replica that lagged, can
/// bring back an older record whose refresh token was already rotated away, and every process
/// then presents that spent token. Where the token endpoint rotates refresh tokens and detects
/// reuse, run Redis with AOF and `appendfsync always`, and do not fail over to an asynchronous
/// replica (or accept that such a failover ends the sessions it rolls back).
///
/// # Example
///
/// ```no_run
/// use tower_auth_refresh::store::{RedisStore, StoreRefresher};
/// use tower_auth_refresh::{refresh_fn, RefreshError, RefreshLayer, Token};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::open("redis://127.0.0.1:6379/", "my-app:tenant-42")?;
/// let refresher = refresh_fn(|_| async { Ok::<_, RefreshError>(Token::bearer("t")?) });
/// let layer = RefreshLayer::new(StoreRefresher::new(refresher, store));
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Arc<Connection>,
    record: String,
    lease: String,
    channel: String,
}

/// What the stores of several prefixes share: one connection, its subscriptions.
struct Connection {
    client: Client,
    config: ConnectionManagerConfig,
    current: RwLock<Current>,
    channels: Arc<Channels>,
    /// Held while a channel is subscribed or unsubscribed, so that the two never cross (an
    /// unsubscription decided before a new waiter came must not land after its subscription).
    subscribing: tokio::sync::Mutex<()>,
    cas: Script,
    release: Script,
    /// Redis refused a `SUBSCRIBE` for want of permission (`NOPERM`: an ACL user without the
    /// channels): every wait on this connection polls the record from then on.
    polling: AtomicBool,
}

/// The channels subscribed on the connection, each while a store waits on it: a keyed layer
/// with many keys does not keep one subscription per key it ever waited for.
#[derive(Default)]
struct Channels(Mutex<HashMap<String, Channel>>);

/// A channel while stores wait on it.
struct Channel {
    /// Bumped on every message of this channel (not of the others: a waiter wakes only for
    /// its own key).
    changed: watch::Sender<u64>,
    /// Waits on it now.
    waiters: usize,
    /// The generation of the connection it is subscribed on, once `SUBSCRIBE` was answered.
    subscribed: Option<u64>,
    /// The generation of the connection a `SUBSCRIBE` was sent on, answered or not (a wait
    /// dropped before the answer): the last wait to leave unsubscribes it.
    attempted: Option<u64>,
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A message on `channel`: its waiters wake.
    fn message(&self, channel: &[u8]) {
        let Ok(channel) = std::str::from_utf8(channel) else {
            return;
        };
        if let Some(c) = self.lock().get(channel) {
            c.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// How often a wait looks at the record when Redis refuses this user the store's channels.
const POLL: Duration = Duration::from_millis(100);

/// How many times the last wait to leave a channel tries to unsubscribe it, and the pause
/// between tries (the connection manager reconnects meanwhile).
const UNSUBSCRIBE_TRIES: usize = 3;
const UNSUBSCRIBE_PAUSE: Duration = Duration::from_millis(500);

/// One wait on a channel: counted while it lives; the last one to leave unsubscribes.
struct Watch {
    conn: Arc<Connection>,
    channel: String,
    changed: watch::Receiver<u64>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let last = {
            let mut channels = self.conn.channels.lock();
            match channels.get_mut(&self.channel) {
                Some(c) => {
                    c.waiters = c.waiters.saturating_sub(1);
                    c.waiters == 0
                }
                None => false,
            }
        };
        if !last {
            return;
        }
        // Best effort, on the current runtime: without one, the subscription stays until the
        // next wait on the channel leaves.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (conn, channel) = (self.conn.clone(), std::mem::take(&mut self.channel));
            drop(runtime.spawn(async move { conn.unsubscribe_if_unwatched(&channel).await }));
        }
    }
}

/// The connection manager in use, and how many times it was replaced before.
#[derive(Clone)]
struct Current {
    generation: u64,
    manager: ConnectionManager,
}

impl Connection {
    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// After an operation on the manager of `generation` timed out, a new manager (so a new
    /// connection) for the next operations: a `ConnectionManager` reconnects after a dropped
    /// connection, not after a timeout, and a half-open connection never drops by itself.
    /// Concurrent timeouts on one manager replace it once. The old manager, and its
    /// connection, go away with the last operation still using it.
    fn replace_after_timeout(&self, generation: u64) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.generation != generation {
            return;
        }
        // Only fails for a configuration `open` already accepted; then keep the old one.
        if let Ok(manager) =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
        {
            *current = Current {
                generation: generation.wrapping_add(1),
                manager,
            };
        }
    }

    /// Starts a wait on `channel`, subscribing it on the current connection if needed.
    async fn watch(self: &Arc<Self>, channel: &str) -> Result<Watch, StoreError> {
        let changed = {
            let mut channels = self.channels.lock();
            let c = channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    changed: watch::channel(0).0,
                    waiters: 0,
                    subscribed: None,
                    attempted: None,
                });
            c.waiters += 1;
            c.changed.subscribe()
        };
        // Counted from here: dropped on an error below, it leaves as any wait does.
        let watch = Watch {
            conn: self.clone(),
            channel: channel.to_owned(),
            changed,
        };
        let subscribed_on = |generation: u64| {
            self.channels
                .lock()
                .get(channel)
                .is_some_and(|c| c.subscribed == Some(generation))
        };
        if subscribed_on(self.current().generation) {
            return Ok(watch);
        }
        let _turn = self.subscribing.lock().await;
        // The connection in use once it is this wait's turn: an earlier one's timeout may
        // have replaced it meanwhile.
        let Current {
            generation,
            mut manager,
        } = self.current();
        if subscribed_on(generation) {
            return Ok(watch);
        }
        // Marked as sent before it goes out: if this wait is dropped before the answer (the
        // command may still reach Redis), the last wait to leave unsubscribes anyway
        // (`UNSUBSCRIBE` of a channel not subscribed does nothing). Subscribed, for the other
        // waits, only once answered.
        if let Some(c) = self.channels.lock().get_mut(channel) {
            c.attempted = Some(generation);
        }
        let result = manager.subscribe(channel).await;
        self.settle(generation, result).map_err(|e| {
            if e.code() == Some("NOPERM") && !self.polling.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the Redis user may not subscribe to the store's channels (NOPERM): \
                     waits for another process's refresh poll the record every {} ms",
                    POLL.as_millis()
                );
            }
            unavailable("SUBSCRIBE", e)
        })?;
        if let Some(c) = self.channels.lock().get_mut(channel) {
            c.subscribed = Some(generation);
        }
        Ok(watch)
    }

    /// Unsubscribes `channel` if no store waits on it any more.
    async fn unsubscribe_if_unwatched(&self, channel: &str) {
        let mut subscribed = None;
        // A few tries: a failed `UNSUBSCRIBE` leaves the channel in the connection manager's
        // list, which it subscribes again at every reconnection. The turn is held for one
        // try at a time, not across the pause (other keys subscribe meanwhile).
        for attempt in 0..UNSUBSCRIBE_TRIES {
            if attempt > 0 {
                tokio::time::sleep(UNSUBSCRIBE_PAUSE).await;
            }
            let _turn = self.subscribing.lock().await;
            {
                let mut channels = self.channels.lock();
                match channels.get(channel) {
                    Some(c) if attempt == 0 && c.waiters == 0 => {
                        subscribed = channels
                            .remove(channel)
                            // The newest send (an answered one was sent first).
                            .and_then(|c| c.attempted);
                    }
                    // A wait is on it (again): it is that wait's now.
                    Some(_) => return,
                    None => {}
                }
            }
            let Current {
                generation,
                mut manager,
            } = self.current();
            // Never subscribed, or on a connection since replaced (it went with it).
            if subscribed != Some(generation) {
                return;
            }
            let result = manager.unsubscribe(channel).await;
            match self.settle(generation, result) {
                Ok(()) => return,
                Err(err) => {
                    tracing::debug!(error = %err, attempt, "token store: redis UNSUBSCRIBE failed");
                }
            }
        }
    }

    /// `result` of an operation on the manager of `generation`, replacing that manager if
    /// the operation timed out.
    fn settle<T>(&self, generation: u64, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(err) = &result {
            if err.is_timeout() {
                self.replace_after_timeout(generation);
            }
        }
        result
    }
}

/// Keepalive probes after 30 s of silence, then every 10 s, 3 unanswered ones closing the
/// connection: an idle half-open connection (the subscription's) is seen within about a minute.
fn keepalive() -> TcpKeepalive {
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(30));
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "windows",
    ))]
    let keepalive = keepalive
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    keepalive
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("record", &self.inner.record)
            .field("lease", &self.inner.lease)
            .field("channel", &self.inner.channel)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, err: redis::RedisError) -> StoreError {
    StoreError::unavailable(format!("redis {what} failed"), err)
}

impl RedisStore {
    /// A store at `url` (`redis://host:port/db`) whose keys start with `prefix`. Connects
    /// lazily: a process can start while Redis is down, and its refreshes fail transiently
    /// until Redis is back.
    ///
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    ///
    /// A [`StoreError`] if the URL is not a Redis URL.
    pub fn open(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client =
            Client::open(url).map_err(|e| StoreError::unavailable("invalid redis URL", e))?;
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let tcp = info.tcp_settings().clone().set_keepalive(keepalive());
        let info = info.set_redis_settings(settings).set_tcp_settings(tcp);
        let client =
            Client::open(info).map_err(|e| StoreError::unavailable("invalid redis URL", e))?;
        let channels = Arc::new(Channels::default());
        let tx = channels.clone();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_push_sender(move |info: redis::PushInfo| {
                if matches!(info.kind, PushKind::Message) {
                    // A message is the channel, then its payload.
                    if let Some(redis::Value::BulkString(channel)) = info.data.first() {
                        tx.message(channel);
                    }
                }
                Ok::<(), ()>(())
            })
            .set_automatic_resubscription();
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| StoreError::unavailable("redis connection setup failed", e))?;
        let conn = Arc::new(Connection {
            client,
            config,
            current: RwLock::new(Current {
                generation: 0,
                manager,
            }),
            channels,
            subscribing: tokio::sync::Mutex::new(()),
            polling: AtomicBool::new(false),
            cas: Script::new(CAS),
            release: Script::new(RELEASE),
        });
        Ok(Self::with_connection(conn, prefix))
    }

    fn with_connection(conn: Arc<Connection>, prefix: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                conn,
                record: format!("{prefix}:record"),
                lease: format!("{prefix}:lease"),
                channel: format!("{prefix}:changed"),
            }),
        }
    }

    /// The store of another principal (`prefix`) on the same connection: for the keyed
    /// layer, one record per key without one connection per key.
    ///
    /// ```no_run
    /// # use tower_auth_refresh::store::RedisStore;
    /// # fn main() -> Result<(), tower_auth_refresh::store::StoreError> {
    /// let base = RedisStore::open("redis://127.0.0.1:6379/", "my-app")?;
    /// let tenant = base.scoped("my-app:tenant-7");
    /// assert_eq!(tenant.record_key(), "my-app:tenant-7:record");
    /// # Ok(())
    /// # }
    /// ```
    pub fn scoped(&self, prefix: &str) -> Self {
        Self::with_connection(self.inner.conn.clone(), prefix)
    }

    /// The key of the record.
    pub fn record_key(&self) -> &str {
        &self.inner.record
    }

    fn conn(&self) -> Current {
        self.inner.conn.current()
    }

    fn settle<T>(&self, generation: u64, result: RedisResult<T>) -> RedisResult<T> {
        self.inner.conn.settle(generation, result)
    }
}

impl RedisStore {
    /// [`wait_change`](TokenStore::wait_change) without a subscription: looks at the record
    /// every [`POLL`] until its version is past `seen` or `deadline` comes.
    async fn poll_change(
        &self,
        seen: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        loop {
            let Ok(current) = tokio::time::timeout_at(deadline, self.load()).await else {
                return Ok(());
            };
            if current?.map_or(0, |r| r.version()) > seen {
                return Ok(());
            }
            let next = tokio::time::Instant::now() + POLL;
            if next >= deadline {
                tokio::time::sleep_until(deadline).await;
                return Ok(());
            }
            tokio::time::sleep_until(next).await;
        }
    }
}

impl TokenStore for RedisStore {
    async fn load(&self) -> Result<Option<Record>, StoreError> {
        let Current {
            generation,
            mut manager,
        } = self.conn();
        let result = redis::cmd("GET")
            .arg(&self.inner.record)
            .query_async(&mut manager)
            .await;
        let bytes: Option<Vec<u8>> = self.settle(generation, result).map_err(|e| {
            if e.code() == Some("WRONGTYPE") {
                StoreError::corrupt("the record key holds a value that is not a string")
            } else {
                unavailable("GET", e)
            }
        })?;
        bytes.map(|b| Record::decode(&b)).transpose()
    }

    async fn try_lease(&self, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let fence = fence();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let Current {
            generation,
            mut manager,
        } = self.conn();
        let result = redis::cmd("SET")
            .arg(&self.inner.lease)
            .arg(&fence)
            .arg("NX")
            .arg("PX")
            .arg(ms)
            .query_async(&mut manager)
            .await;
        let set: Option<String> = self
            .settle(generation, result)
            .map_err(|e| unavailable("SET NX", e))?;
        Ok(set.map(|_| Lease::new(fence, ttl)))
    }

    async fn compare_and_set(
        &self,
        lease: &Lease,
        expected: u64,
        record: &Record,
    ) -> Result<CasOutcome, StoreError> {
        let Current {
            generation,
            mut manager,
        } = self.conn();
        let result = self
            .inner
            .conn
            .cas
            .key(&self.inner.record)
            .key(&self.inner.lease)
            .key(&self.inner.channel)
            .arg(lease.fence())
            .arg(expected)
            .arg(record.encode())
            .arg(record.version())
            .invoke_async(&mut manager)
            .await;
        let answer: String = self.settle(generation, result).map_err(|e| {
            if e.code() == Some("WRONGTYPE") {
                StoreError::corrupt("a key of the store holds a value that is not a string")
            } else {
                unavailable("compare-and-set", e)
            }
        })?;
        match answer.as_str() {
            "ok" => Ok(CasOutcome::Written),
            "version" => Ok(CasOutcome::VersionChanged),
            "lease" => Ok(CasOutcome::LeaseLost),
            _ => Err(StoreError::corrupt(
                "the stored record is not valid; it was not overwritten",
            )),
        }
    }

    async fn release(&self, lease: Lease) -> Result<(), StoreError> {
        let Current {
            generation,
            mut manager,
        } = self.conn();
        let result = self
            .inner
            .conn
            .release
            .key(&self.inner.lease)
            .key(&self.inner.channel)
            .arg(lease.fence())
            .invoke_async(&mut manager)
            .await;
        let _: i64 = self
            .settle(generation, result)
            .map_err(|e| unavailable("lease release", e))?;
        Ok(())
    }

    async fn wait_change(&self, seen: u64, max: Duration) -> Result<(), StoreError> {
        // Subscribed while it waits (on the connection in use: a replaced one has not heard
        // of the subscription), and unsubscribed once no wait of this process is on it. The
        // subscription (its turn among other keys' included) counts against `max`: a wait
        // that could not subscribe in time ends as one that saw nothing, and its caller
        // looks again.
        // One deadline for the subscription, the read and the wait.
        // (A bound too large to add to an instant is a day: a caller looks again then.)
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(max)
            .unwrap_or_else(|| now + Duration::from_secs(86_400));
        if self.inner.conn.polling.load(Ordering::Relaxed) {
            return self.poll_change(seen, deadline).await;
        }
        let Ok(watch) =
            tokio::time::timeout_at(deadline, self.inner.conn.watch(&self.inner.channel)).await
        else {
            return Ok(());
        };
        let mut watch = match watch {
            Ok(watch) => watch,
            // Refused the channel: looks at the record now and then instead.
            Err(_) if self.inner.conn.polling.load(Ordering::Relaxed) => {
                return self.poll_change(seen, deadline).await;
            }
            Err(err) => return Err(err),
        };
        // A version published before the subscription is seen here.
        let Ok(current) = tokio::time::timeout_at(deadline, self.load()).await else {
            return Ok(());
        };
        if current?.map_or(0, |r| r.version()) > seen {
            return Ok(());
        }
        let _ = tokio::time::timeout_at(deadline, watch.changed.changed()).await;
        Ok(())
    }
}
