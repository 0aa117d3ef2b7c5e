//! A store in one file, for the processes of one host.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{CasOutcome, Lease, Record, StoreError, TokenStore, fence};

/// A [`TokenStore`] in one file, shared by the processes of one host; it survives restarts.
///
/// - The record is JSON in the file at `path`, created with mode 0600 (owner only) on Unix. A
///   write goes to a temporary file in the same directory (`.<name>.tmp`, mode 0600), is
///   flushed to disk (`fsync`), and replaces the record with an atomic rename (then the
///   directory is flushed too), so a reader sees the old record or the new one, never half of
///   one, even after a crash. Only the lease holder writes, so one temporary name per record
///   is enough; one left behind by a crash (it holds tokens) is removed by the next process
///   that takes the lease.
/// - The lease is an OS advisory lock (`flock` on Unix, `LockFileEx` on Windows, through the
///   `fs4` crate) on `<path>.lock`. The OS releases it as soon as its holder exits or is
///   killed, so a dead holder never blocks the others; the TTL bounds the refresh the holder
///   runs under it (see [`StoreRefresher::lease_ttl`](super::StoreRefresher::lease_ttl)).
///   A `<path>.lock` file left after a crash is therefore not stale and needs no cleaning:
///   do not delete it (a lock held on a deleted file is no lock for the next process, and two
///   processes could then present the same refresh token).
/// - Waiters learn of a new version by polling the file, every 10 ms at first, backing off to
///   100 ms.
///
/// The directory must exist. Keep it on a local file system: advisory locks over NFS are not
/// reliable. The lock belongs to the open file, which the standard library opens
/// close-on-exec: a child process being spawned shares it only until it `exec`s, so a lease
/// may outlive its release by that moment (the others retry).
///
/// # Example
///
/// ```
/// use tower_auth_refresh::store::FileStore;
///
/// let store = FileStore::new("/var/lib/my-app/token.json");
/// assert!(store.path().ends_with("token.json"));
/// ```
#[derive(Debug, Clone)]
pub struct FileStore {
    paths: Arc<Paths>,
}

#[derive(Debug)]
struct Paths {
    record: PathBuf,
    lock: PathBuf,
    /// Where a write goes before its rename; written only under the lock.
    tmp: PathBuf,
}

const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(100);

impl FileStore {
    /// A store whose record is the file at `path` (its lock is `<path>.lock`).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let record: PathBuf = path.into();
        let mut lock = record.clone().into_os_string();
        lock.push(".lock");
        let dir = match record.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // From the name as the OS has it (not a lossy text of it): two records whose names
        // are not UTF-8 must not share a temporary file.
        let mut name = OsString::from(".");
        name.push(record.file_name().unwrap_or(OsStr::new("token")));
        name.push(".tmp");
        let tmp = dir.join(name);
        Self {
            paths: Arc::new(Paths {
                record,
                lock: PathBuf::from(lock),
                tmp,
            }),
        }
    }

    /// The record's path.
    pub fn path(&self) -> &Path {
        &self.paths.record
    }
}

/// Runs blocking file work off the async threads when there is a Tokio runtime.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| StoreError::unavailable("file store task failed", e))?,
        Err(_) => f(),
    }
}

fn unavailable(what: &str, path: &Path, err: io::Error) -> StoreError {
    StoreError::unavailable(format!("cannot {what} {}", path.display()), err)
}

fn open_private(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

fn read_record(path: &Path) -> Result<Option<Record>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => Record::decode(&bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable("read", path, e)),
    }
}

fn open_lock(path: &Path) -> Result<File, StoreError> {
    open_private(OpenOptions::new().read(true).write(true).create(true))
        .truncate(false)
        .open(path)
        .map_err(|e| unavailable("open the lock file", path, e))
}

/// Takes the OS lock without blocking; `None` if another holder has it.
fn try_lock(file: &File, path: &Path) -> Result<bool, StoreError> {
    match <File as fs4::FileExt>::try_lock(file) {
        Ok(()) => Ok(true),
        Err(fs4::TryLockError::WouldBlock) => Ok(false),
        Err(fs4::TryLockError::Error(e)) => Err(unavailable("lock", path, e)),
    }
}

/// Removes a temporary file left behind by a writer that crashed. Only under the lock.
fn remove_leftover(tmp: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(tmp) {
        Ok(()) => {
            tracing::debug!(path = %tmp.display(), "token store: removed a temporary file left by a crash");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(unavailable("remove", tmp, e)),
    }
}

/// Replaces the record at `path` through the temporary file `tmp`. Only under the lock.
fn write_atomically(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let result = (|| {
        // A new file (mode 0600 from its creation), not whatever a crash left there.
        remove_leftover(tmp)?;
        let mut file = open_private(OpenOptions::new().write(true).create_new(true))
            .open(tmp)
            .map_err(|e| unavailable("create", tmp, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| unavailable("write", tmp, e))?;
        drop(file);
        std::fs::rename(tmp, path).map_err(|e| unavailable("replace", path, e))?;
        // Make the rename itself durable. Directories cannot be opened this way everywhere
        // (Windows), and failing here would not undo the rename: best effort.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

impl TokenStore for FileStore {
    async fn load(&self) -> Result<Option<Record>, StoreError> {
        let paths = self.paths.clone();
        blocking(move || read_record(&paths.record)).await
    }

    async fn try_lease(&self, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let paths = self.paths.clone();
        blocking(move || {
            let file = open_lock(&paths.lock)?;
            if !try_lock(&file, &paths.lock)? {
                return Ok(None);
            }
            // Best effort: the write removes it too.
            let _ = remove_leftover(&paths.tmp);
            let mut lease = Lease::new(fence(), ttl);
            lease.file = Some((file, paths.lock.clone()));
            Ok(Some(lease))
        })
        .await
    }

    async fn compare_and_set(
        &self,
        lease: &Lease,
        expected: u64,
        record: &Record,
    ) -> Result<CasOutcome, StoreError> {
        if lease
            .file
            .as_ref()
            .is_none_or(|(_, lock)| *lock != self.paths.lock)
        {
            // Not a lease of this store: its OS lock is not held.
            return Ok(CasOutcome::LeaseLost);
        }
        // A second handle on the locked file goes into the write: the OS lock belongs to the
        // open file, so it is held until the write is done even if this future is dropped
        // meanwhile (a timeout) and the lease with it. Else the next holder could take the
        // lease and share the temporary file with a write still running.
        let held = match lease.file.as_ref().map(|(file, _)| file.try_clone()) {
            Some(Ok(file)) => file,
            Some(Err(e)) => return Err(unavailable("lock", &self.paths.lock, e)),
            None => return Ok(CasOutcome::LeaseLost),
        };
        let paths = self.paths.clone();
        let bytes = record.encode();
        blocking(move || {
            let _held = held;
            // The OS lock is held, so no other writer can run between this read and the rename.
            // A corrupt record is an error here too: it is never overwritten automatically.
            let current = read_record(&paths.record)?;
            if current.as_ref().map_or(0, Record::version) != expected {
                return Ok(CasOutcome::VersionChanged);
            }
            write_atomically(&paths.record, &paths.tmp, &bytes)?;
            Ok(CasOutcome::Written)
        })
        .await
    }

    async fn release(&self, lease: Lease) -> Result<(), StoreError> {
        // Closing the file releases the OS lock.
        drop(lease);
        Ok(())
    }

    async fn wait_change(&self, seen: u64, max: Duration) -> Result<(), StoreError> {
        // Bounded: a wait too large to add to an instant is a long one, not a panic.
        let deadline = tokio::time::Instant::now()
            .checked_add(max)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400 * 365));
        let mut step = POLL_FIRST;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(());
            }
            tokio::time::sleep(step.min(deadline - now)).await;
            let paths = self.paths.clone();
            let moved = blocking(move || {
                let newer = match read_record(&paths.record) {
                    Ok(rec) => rec.as_ref().map_or(0, Record::version) > seen,
                    // Let the caller's load report it.
                    Err(_) => true,
                };
                if newer {
                    return Ok(true);
                }
                // A free lock means the holder is gone: worth trying again.
                let file = open_lock(&paths.lock)?;
                try_lock(&file, &paths.lock)
            })
            .await?;
            if moved {
                return Ok(());
            }
            step = (step * 2).min(POLL_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `compare_and_set` relies on to keep the lock through a write whose future was
    /// dropped: a second handle on the locked file holds the OS lock after the lease (and its
    /// handle) is gone, and only until that handle is closed too.
    #[tokio::test]
    async fn a_second_handle_keeps_the_lock_after_the_lease_is_dropped() {
        let dir =
            std::env::temp_dir().join(format!("tar-file-lock-{}-{}", std::process::id(), fence()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (FileStore::new(dir.join("t")), FileStore::new(dir.join("t")));
        let ttl = Duration::from_secs(5);
        let lease = a.try_lease(ttl).await.unwrap().expect("the first lease");
        let held = lease.file.as_ref().unwrap().0.try_clone().unwrap();
        drop(lease);
        assert!(
            b.try_lease(ttl).await.unwrap().is_none(),
            "the second handle still holds the lock"
        );
        drop(held);
        assert!(b.try_lease(ttl).await.unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
