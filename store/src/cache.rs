//! Node-local caches with a size limit: least recently used names go first.
//!
//! Every stash and unstash records when a name was last used (a small file
//! per name under `access/`). When the store's packs exceed the limit, the
//! least recently used names are removed one at a time and the collector
//! runs with no grace period, until the store fits. Running unstashes hold
//! leases, so the collector never deletes data one of them may still read:
//! with other commands running, the store may stay over the limit until
//! they finish and the next command enforces it again.

use crate::backend::Kind;
use crate::gc::GcOptions;
use crate::name::Name;
use crate::repo::{Store, StoreError};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

fn access_path(store: &Store, name: &Name) -> PathBuf {
    let key = blake3::hash(name.as_str().as_bytes());
    store
        .root()
        .join("access")
        .join(&crate::id::to_hex(key.as_bytes())[..32])
}

/// Records that `name` was used now (best effort: a cache that cannot
/// record use still works, it just evicts in name order).
pub fn touch(store: &Store, name: &Name) {
    let path = access_path(store, name);
    let _ = std::fs::create_dir_all(path.parent().expect("has a parent"));
    let _ = std::fs::write(&path, format!("{}\n{}\n", crate::lease::now_ms(), name));
}

fn last_used(store: &Store, name: &Name) -> u64 {
    std::fs::read_to_string(access_path(store, name))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0)
}

/// What enforcing the limit did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CacheReport {
    /// The limit, bytes of packs and manifests.
    pub limit: u64,
    /// Stored bytes before.
    pub before: u64,
    /// Stored bytes after.
    pub after: u64,
    /// Names evicted, least recently used first.
    pub evicted: Vec<String>,
    /// Whether the store now fits (false: running commands hold data).
    pub fits: bool,
}

fn stored_bytes(store: &Store) -> Result<u64, StoreError> {
    let backend = store.backend();
    let mut total = 0;
    for kind in [Kind::Pack, Kind::Manifest] {
        for name in backend.list(kind)? {
            total += backend.size(kind, &name).unwrap_or(0);
        }
    }
    Ok(total)
}

/// Evicts least recently used names until the store's packs and manifests
/// take at most `limit` bytes. `keep` is never evicted (the name the
/// current command just used).
pub fn enforce_limit(
    store: &Store,
    limit: u64,
    keep: Option<&Name>,
) -> Result<CacheReport, StoreError> {
    let before = stored_bytes(store)?;
    let mut report = CacheReport {
        limit,
        before,
        after: before,
        evicted: Vec::new(),
        fits: before <= limit,
    };
    if report.fits {
        return Ok(report);
    }
    let opts = GcOptions {
        grace: Duration::ZERO,
        ..GcOptions::default()
    };
    let mut names: Vec<(u64, Name)> = crate::refs::list(store.backend(), None)?
        .into_iter()
        .map(|(n, _)| (last_used(store, &n), n))
        .filter(|(_, n)| Some(n) != keep)
        .collect();
    names.sort();
    let mut candidates = names.into_iter();
    loop {
        // Two passes: the first condemns, the second deletes.
        store.gc(&opts)?;
        store.gc(&opts)?;
        report.after = stored_bytes(store)?;
        if report.after <= limit {
            report.fits = true;
            return Ok(report);
        }
        let Some((_, victim)) = candidates.next() else {
            return Ok(report);
        };
        store.remove(&victim)?;
        let _ = std::fs::remove_file(access_path(store, &victim));
        report.evicted.push(victim.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{NoProgress, Source, Target};
    use std::io::Read;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        crate::testutil::pseudo_random(len, seed as u64)
    }

    #[test]
    fn least_recently_used_names_are_evicted_until_the_store_fits() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let images: Vec<Vec<u8>> = (0..4).map(|i| data(2 << 20, i + 1)).collect();
        let limit = 5 << 20; // room for two 2 MiB incompressible images
        for (i, img) in images.iter().enumerate() {
            let name = Name::parse(&format!("img/{i}")).unwrap();
            s.stash(
                &name,
                Source::Reader(Box::new(std::io::Cursor::new(img.clone()))),
                &NoProgress,
            )
            .unwrap();
            touch(&s, &name);
            std::thread::sleep(Duration::from_millis(5));
            let r = enforce_limit(&s, limit, Some(&name)).unwrap();
            assert!(r.fits && r.after <= limit, "{r:?}");
        }
        // The two most recent survive, byte-exact; the oldest went first.
        let left: Vec<String> = s.list(None).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(left, ["img/2", "img/3"]);
        for i in [2, 3] {
            let name = Name::parse(&format!("img/{i}")).unwrap();
            let mut out = Vec::new();
            s.open_stash(&name).unwrap().read_to_end(&mut out).unwrap();
            assert_eq!(out, images[i]);
        }
        // Using img/2 makes img/3 the least recently used.
        let img2 = Name::parse("img/2").unwrap();
        s.unstash(
            &img2,
            Target::File(dir.path().join("x")),
            false,
            &NoProgress,
        )
        .unwrap();
        touch(&s, &img2);
        let r = enforce_limit(&s, 3 << 20, Some(&img2)).unwrap();
        assert_eq!(r.evicted, ["img/3"]);
        assert!(s.fsck(true, &NoProgress).unwrap().problems.is_empty());
    }
}
