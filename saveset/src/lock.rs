//! Writer locks: a backup holds `locks/<random id>` (sealed JSON: host, pid, started,
//! refreshed) from before it loads the index until its manifest is written, refreshed on a
//! timer. Prune records which locks existed when it marked packs for deletion and deletes them
//! only once those locks are gone or stale (FORMAT.md, "Prune"). Readers take no lock.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::crypto::{self, hex, MasterKey};
use crate::error::{Error, Result};
use crate::repo::now_ms;
use crate::storage::Storage;

/// How often a writer rewrites its lock.
pub(crate) const LOCK_REFRESH: Duration = Duration::from_secs(60);
/// A lock not refreshed for this long (by the pruning host's clock) belongs to a dead writer.
pub(crate) const LOCK_STALE: Duration = Duration::from_secs(30 * 60);
/// A writer whose lock has not been refreshed successfully for this long fails rather than
/// write its manifest: prune may already take it for dead. Far below [`LOCK_STALE`], so clocks
/// may disagree by minutes.
pub(crate) const LOCK_TRUST: Duration = Duration::from_secs(10 * 60);

/// What a lock object holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct LockInfo {
    pub host: String,
    pub pid: u32,
    pub started_unix_ms: u64,
    pub refreshed_unix_ms: u64,
}

fn seal(key: &MasterKey, name: &str, info: &LockInfo) -> Vec<u8> {
    let json = serde_json::to_vec(info).expect("a lock serializes");
    key.seal(format!("locks/{name}").as_bytes(), &json)
}

/// Reads lock `name` (the id after `locks/`); `Ok(None)` if it is gone, an error message if it
/// does not decrypt or parse.
pub(crate) fn read(
    storage: &dyn Storage,
    key: &MasterKey,
    name: &str,
) -> Result<Option<std::result::Result<LockInfo, String>>> {
    let Some(blob) = storage.get(&format!("locks/{name}"))? else { return Ok(None) };
    let Some(plain) = key.open(format!("locks/{name}").as_bytes(), &blob) else {
        return Ok(Some(Err("does not decrypt".into())));
    };
    Ok(Some(serde_json::from_slice(&plain).map_err(|e| e.to_string())))
}

/// This host's name, for people reading a lock.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// A lock held by this process, refreshed by a thread of its own, deleted when dropped.
pub(crate) struct WriterLock {
    name: String,
    storage: Arc<dyn Storage>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// When the lock was last written successfully.
    last_ok: Arc<Mutex<Instant>>,
}

impl WriterLock {
    /// Writes a new lock (durably) and starts refreshing it every `every`.
    pub(crate) fn take(
        storage: Arc<dyn Storage>,
        key: &MasterKey,
        every: Duration,
    ) -> Result<Self> {
        let name = hex(&crypto::random::<32>());
        let now = now_ms();
        let info = LockInfo {
            host: hostname(),
            pid: std::process::id(),
            started_unix_ms: now,
            refreshed_unix_ms: now,
        };
        storage.put(&format!("locks/{name}"), &seal(key, &name, &info))?;
        let last_ok = Arc::new(Mutex::new(Instant::now()));
        let (stop, stopped) = channel::<()>();
        let thread = {
            let (storage, key, name, last_ok) =
                (Arc::clone(&storage), key.clone(), name.clone(), Arc::clone(&last_ok));
            std::thread::spawn(move || loop {
                match stopped.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let info = LockInfo { refreshed_unix_ms: now_ms(), ..info.clone() };
                match storage.put(&format!("locks/{name}"), &seal(&key, &name, &info)) {
                    Ok(()) => *last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now(),
                    Err(e) => tracing::warn!(lock = %name, error = %e, "could not refresh lock"),
                }
            })
        };
        Ok(WriterLock { name, storage, stop: Some(stop), thread: Some(thread), last_ok })
    }

    /// The lock's id (its name under `locks/`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// An error if the lock has not been refreshed for [`LOCK_TRUST`]: a prune may have
    /// taken this writer for dead, so what it references may be gone.
    pub(crate) fn check(&self) -> Result<()> {
        let since = self.last_ok.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
        if since < LOCK_TRUST {
            return Ok(());
        }
        Err(Error::LockLost {
            lock: self.storage.describe(&format!("locks/{}", self.name)),
            secs: since.as_secs(),
        })
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.storage.delete(&format!("locks/{}", self.name)) {
            // Harmless: prune ignores it once stale.
            tracing::warn!(lock = %self.name, error = %e, "could not delete lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalStorage;

    #[test]
    fn a_lock_is_refreshed_while_held_and_gone_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage: Arc<dyn Storage> =
            Arc::new(LocalStorage::create(&dir.path().join("r")).expect("create"));
        let key = MasterKey::from_bytes(&[7; 64]);
        let lock =
            WriterLock::take(Arc::clone(&storage), &key, Duration::from_millis(20)).expect("take");
        let listed = storage.list("locks/").expect("list");
        assert_eq!(listed.len(), 1);
        let name = listed[0].0["locks/".len()..].to_owned();
        let first = read(&*storage, &key, &name).expect("read").expect("there").expect("valid");
        assert_eq!(first.pid, std::process::id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = read(&*storage, &key, &name).expect("read").expect("there").expect("ok");
            if now.refreshed_unix_ms > first.refreshed_unix_ms {
                assert_eq!(now.started_unix_ms, first.started_unix_ms);
                break;
            }
            assert!(Instant::now() < deadline, "never refreshed");
            std::thread::sleep(Duration::from_millis(10));
        }
        lock.check().expect("fresh");
        drop(lock);
        assert!(storage.list("locks/").expect("list").is_empty(), "dropped, so deleted");
        let wrong = MasterKey::from_bytes(&[8; 64]);
        let other = WriterLock::take(Arc::clone(&storage), &key, LOCK_REFRESH).expect("take");
        let name = storage.list("locks/").expect("list")[0].0["locks/".len()..].to_owned();
        assert!(read(&*storage, &wrong, &name).expect("read").expect("there").is_err());
        drop(other);
    }
}
