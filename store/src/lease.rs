//! Leases: how running stashes, unstashes and collections tell each other
//! they are alive, without a lock that blocks anyone.
//!
//! A lease is a small object naming its owner and when it started; a
//! background thread rewrites it every [`REFRESH`] with a new refresh time,
//! and dropping the lease deletes it. The collector never deletes a pack
//! that a lease older than the pack's condemnation may still use (see
//! [`crate::gc`]). A lease not refreshed for [`STALE_AFTER`] belongs to a
//! dead process and is ignored (and later removed).

use crate::backend::{Backend, BackendError, Kind};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often a lease is rewritten.
pub const REFRESH: Duration = Duration::from_secs(15);
/// A lease not refreshed for this long is presumed dead.
pub const STALE_AFTER: Duration = Duration::from_secs(300);

/// Milliseconds since the Unix epoch, the clock leases and marks use.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a lease object says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The lease's object name.
    #[serde(skip)]
    pub id: String,
    /// What holds it: "stash", "unstash", "gc", "import".
    pub purpose: String,
    /// The holder's process id (for operators; not used for decisions).
    pub pid: u32,
    /// When it was taken, ms since the epoch.
    pub started_ms: u64,
    /// When it was last refreshed.
    pub refreshed_ms: u64,
}

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A held lease; released (deleted) on drop.
pub struct Lease {
    backend: Arc<dyn Backend>,
    info: LeaseInfo,
    shared: Arc<Shared>,
    refresher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Takes a lease for `purpose` and keeps it fresh until dropped.
    pub fn acquire(backend: Arc<dyn Backend>, purpose: &str) -> Result<Lease, BackendError> {
        let started_ms = now_ms();
        let info = LeaseInfo {
            id: format!(
                "{started_ms:x}-{}",
                crate::id::to_hex(&crate::pack::random_nonce()[..8])
            ),
            purpose: purpose.to_string(),
            pid: std::process::id(),
            started_ms,
            refreshed_ms: started_ms,
        };
        write(backend.as_ref(), &info)?;
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let refresher = {
            let (backend, shared, mut info) =
                (Arc::clone(&backend), Arc::clone(&shared), info.clone());
            std::thread::spawn(move || {
                let mut stop = shared.stop.lock().expect("lease lock");
                loop {
                    // Checked before waiting too: a drop that came before
                    // this thread first waited must not cost a full period.
                    if *stop {
                        return;
                    }
                    let (guard, _) = shared.wake.wait_timeout(stop, REFRESH).expect("lease lock");
                    stop = guard;
                    if *stop {
                        return;
                    }
                    info.refreshed_ms = now_ms();
                    // A failed refresh is retried next time; if it keeps
                    // failing the lease goes stale and gc stops honouring it,
                    // which only makes gc more careful with its grace period.
                    let _ = write(backend.as_ref(), &info);
                }
            })
        };
        Ok(Lease {
            backend,
            info,
            shared,
            refresher: Some(refresher),
        })
    }

    /// When the lease was taken.
    pub fn started_ms(&self) -> u64 {
        self.info.started_ms
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.shared.stop.lock().expect("lease lock") = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self.backend.delete(Kind::Lease, &self.info.id);
    }
}

fn write(backend: &dyn Backend, info: &LeaseInfo) -> Result<(), BackendError> {
    let bytes = serde_json::to_vec(info).expect("a lease serialises");
    backend.put(Kind::Lease, &info.id, &bytes)
}

/// Every lease in the store, split into live and stale.
///
/// An unreadable lease object (leases are written whole and renamed into
/// place, so only a damaged disk or an operator makes one) is read
/// carefully: it started before anything (`started_ms` 0) and was last
/// refreshed when the object was last written. A live holder rewrites it
/// every [`REFRESH`], so one untouched for [`STALE_AFTER`] is stale like any
/// other and the collector removes it; were it live from `now` forever, it
/// would block every deletion for good. Without a modification time (a
/// backend that does not know) it counts as live from `now`.
pub fn list(
    backend: &dyn Backend,
    now_ms: u64,
) -> Result<(Vec<LeaseInfo>, Vec<LeaseInfo>), BackendError> {
    let mut live = Vec::new();
    let mut stale = Vec::new();
    for id in backend.list(Kind::Lease)? {
        let info = match backend.get(Kind::Lease, &id) {
            Ok(bytes) => serde_json::from_slice::<LeaseInfo>(&bytes).ok(),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        let info = info
            .map(|i| LeaseInfo {
                id: id.clone(),
                ..i
            })
            .unwrap_or_else(|| LeaseInfo {
                refreshed_ms: backend
                    .modified_ms(Kind::Lease, &id)
                    .ok()
                    .flatten()
                    .map_or(now_ms, |m| m.min(now_ms)),
                id,
                purpose: "unreadable".into(),
                pid: 0,
                started_ms: 0,
            });
        if now_ms.saturating_sub(info.refreshed_ms) > STALE_AFTER.as_millis() as u64 {
            stale.push(info);
        } else {
            live.push(info);
        }
    }
    Ok((live, stale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalDir;

    #[test]
    fn a_lease_exists_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalDir::open(dir.path()).unwrap());
        let lease = Lease::acquire(Arc::clone(&backend), "stash").unwrap();
        let (live, stale) = list(backend.as_ref(), now_ms()).unwrap();
        assert_eq!(live.len(), 1);
        assert!(stale.is_empty());
        assert_eq!(live[0].purpose, "stash");
        assert_eq!(live[0].started_ms, lease.started_ms());
        // Far in the future, the same lease is stale.
        let (live, stale) = list(backend.as_ref(), now_ms() + 3_600_000).unwrap();
        assert!(live.is_empty());
        assert_eq!(stale.len(), 1);
        drop(lease);
        assert_eq!(list(backend.as_ref(), now_ms()).unwrap(), (vec![], vec![]));
    }

    #[test]
    fn an_unreadable_lease_ages_by_its_modification_time() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalDir::open(dir.path()).unwrap());
        backend.put(Kind::Lease, "damaged", b"").unwrap();
        // Just written: live, and started before anything.
        let (live, stale) = list(backend.as_ref(), now_ms()).unwrap();
        assert_eq!((live.len(), stale.len()), (1, 0));
        assert_eq!(live[0].purpose, "unreadable");
        assert_eq!(live[0].started_ms, 0);
        // Not rewritten for longer than a live holder would wait: stale.
        let later = now_ms() + STALE_AFTER.as_millis() as u64 + 60_000;
        let (live, stale) = list(backend.as_ref(), later).unwrap();
        assert_eq!((live.len(), stale.len()), (0, 1));
        assert_eq!(stale[0].id, "damaged");
    }
}
