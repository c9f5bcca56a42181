//! Refs: names that point at manifests.
//!
//! A ref's value is its manifest id in hex followed by a newline, updated
//! atomically by the backend. Write a ref only after its manifest and every
//! chunk it names are durable.

use crate::backend::{Backend, BackendError};
use crate::id::ManifestId;
use crate::name::Name;

/// An error reading or writing refs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefError {
    /// No ref has this name.
    #[error("no stash named \"{0}\"; see `ferry ls`")]
    NotFound(Name),
    /// A ref file does not hold a manifest id.
    #[error(
        "ref \"{name}\" is corrupt: {location} does not hold a manifest id (found {found:?}); \
         remove it with `ferry rm {name}` and stash again"
    )]
    Corrupt {
        /// The ref.
        name: Name,
        /// Its file.
        location: String,
        /// The start of what it holds.
        found: String,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

fn parse(backend: &dyn Backend, name: &Name, value: &str) -> Result<ManifestId, RefError> {
    value
        .trim_end_matches(['\n', '\r'])
        .parse()
        .map_err(|_| RefError::Corrupt {
            name: name.clone(),
            location: backend.ref_location(name),
            found: value.chars().take(80).collect(),
        })
}

/// The manifest a ref points at, or `None` if there is no such ref.
pub fn get(backend: &dyn Backend, name: &Name) -> Result<Option<ManifestId>, RefError> {
    match backend.read_ref(name)? {
        Some(value) => parse(backend, name, &value).map(Some),
        None => Ok(None),
    }
}

/// The manifest a ref points at; [`RefError::NotFound`] if there is none.
pub fn resolve(backend: &dyn Backend, name: &Name) -> Result<ManifestId, RefError> {
    get(backend, name)?.ok_or_else(|| RefError::NotFound(name.clone()))
}

/// Points `name` at `manifest`, atomically replacing any previous value.
pub fn set(backend: &dyn Backend, name: &Name, manifest: &ManifestId) -> Result<(), RefError> {
    backend.write_ref(name, &format!("{}\n", manifest.to_hex()))?;
    Ok(())
}

/// Removes a ref; `false` if it did not exist. A corrupt ref can be removed.
pub fn remove(backend: &dyn Backend, name: &Name) -> Result<bool, RefError> {
    Ok(backend.delete_ref(name)?)
}

/// All refs under `prefix` (whole parts: `main` matches `main/x`, not
/// `mainline/x`), sorted by name. Fails on the first corrupt ref, naming it.
pub fn list(
    backend: &dyn Backend,
    prefix: Option<&str>,
) -> Result<Vec<(Name, ManifestId)>, RefError> {
    let mut out = Vec::new();
    for name in backend.list_refs()? {
        if prefix.is_some_and(|p| !name.starts_with_prefix(p)) {
            continue;
        }
        // A ref removed since listing is simply gone.
        if let Some(id) = get(backend, &name)? {
            out.push((name, id));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Names with their manifests, and the errors of damaged refs.
pub type LenientListing = (Vec<(Name, ManifestId)>, Vec<RefError>);

/// As [`list`], but a damaged ref does not stop the listing: the names
/// whose refs are corrupt come back apart, with their errors (for `fsck`,
/// `ls` and `du`, which must go on showing the rest).
pub fn list_lenient(
    backend: &dyn Backend,
    prefix: Option<&str>,
) -> Result<LenientListing, RefError> {
    let mut out = Vec::new();
    let mut damaged = Vec::new();
    for name in backend.list_refs()? {
        if prefix.is_some_and(|p| !name.starts_with_prefix(p)) {
            continue;
        }
        match get(backend, &name) {
            Ok(Some(id)) => out.push((name, id)),
            Ok(None) => {}
            Err(e @ RefError::Corrupt { .. }) => damaged.push(e),
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, damaged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalDir;

    fn store() -> (tempfile::TempDir, LocalDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::open(dir.path()).unwrap();
        (dir, store)
    }

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[test]
    fn set_resolve_remove() {
        let (_dir, store) = store();
        let n = name("main/ci_gpu");
        let m1 = ManifestId::of(b"one");
        let m2 = ManifestId::of(b"two");
        let err = resolve(&store, &n).unwrap_err();
        assert!(matches!(err, RefError::NotFound(_)));
        assert_eq!(
            err.to_string(),
            "no stash named \"main/ci_gpu\"; see `ferry ls`"
        );
        assert_eq!(get(&store, &n).unwrap(), None);

        set(&store, &n, &m1).unwrap();
        assert_eq!(resolve(&store, &n).unwrap(), m1);
        let file = store.root().join("refs/main/ci_gpu.ref");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            format!("{}\n", m1.to_hex())
        );
        set(&store, &n, &m2).unwrap();
        assert_eq!(resolve(&store, &n).unwrap(), m2);

        assert!(remove(&store, &n).unwrap());
        assert!(!remove(&store, &n).unwrap());
        assert!(resolve(&store, &n).is_err());
    }

    #[test]
    fn corrupt_ref_names_its_file() {
        let (_dir, store) = store();
        let n = name("pr/7/ci");
        set(&store, &n, &ManifestId::of(b"x")).unwrap();
        let file = store.root().join("refs/pr/7/ci.ref");
        for bad in [&b""[..], b"garbage\n", &[0xff; 64], b"0123"] {
            std::fs::write(&file, bad).unwrap();
            let err = resolve(&store, &n).unwrap_err();
            assert!(matches!(err, RefError::Corrupt { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(&file.display().to_string()), "{text}");
            assert!(text.contains("pr/7/ci"), "{text}");
            assert!(list(&store, None).is_err());
        }
        // A corrupt ref can still be removed.
        assert!(remove(&store, &n).unwrap());
        assert!(list(&store, None).unwrap().is_empty());
    }

    #[test]
    fn accepts_crlf_and_missing_newline() {
        let (_dir, store) = store();
        let n = name("x");
        let m = ManifestId::of(b"m");
        for value in [m.to_hex(), format!("{}\r\n", m.to_hex())] {
            store.write_ref(&n, &value).unwrap();
            assert_eq!(resolve(&store, &n).unwrap(), m);
        }
    }

    #[test]
    fn list_by_prefix_sorted() {
        let (_dir, store) = store();
        let names = [
            "pr/1234/ci_gpu",
            "main/ci_gpu",
            "mainline/x",
            "main/ci_cpu",
            "main",
            "build/5678/tvm_lib",
            "pr/123/ci",
        ];
        for (i, n) in names.iter().enumerate() {
            set(&store, &name(n), &ManifestId::of(&[i as u8])).unwrap();
        }
        let listed = |prefix| -> Vec<String> {
            list(&store, prefix)
                .unwrap()
                .into_iter()
                .map(|(n, _)| n.to_string())
                .collect()
        };
        assert_eq!(
            listed(None),
            [
                "build/5678/tvm_lib",
                "main",
                "main/ci_cpu",
                "main/ci_gpu",
                "mainline/x",
                "pr/123/ci",
                "pr/1234/ci_gpu"
            ]
        );
        assert_eq!(listed(Some("main")), ["main", "main/ci_cpu", "main/ci_gpu"]);
        assert_eq!(
            listed(Some("main/")),
            ["main", "main/ci_cpu", "main/ci_gpu"]
        );
        assert_eq!(listed(Some("pr/123")), ["pr/123/ci"]);
        assert!(listed(Some("nothing")).is_empty());
        let all = list(&store, Some("main/ci_gpu")).unwrap();
        assert_eq!(all, [(name("main/ci_gpu"), ManifestId::of(&[1]))]);
    }

    #[test]
    fn concurrent_updates_are_atomic() {
        let (_dir, store) = store();
        let n = name("main/ci_gpu");
        let ids: Vec<ManifestId> = (0..4u8).map(|i| ManifestId::of(&[i])).collect();
        set(&store, &n, &ids[0]).unwrap();
        std::thread::scope(|s| {
            for id in &ids {
                let (store, n) = (&store, &n);
                s.spawn(move || {
                    for _ in 0..50 {
                        set(store, n, id).unwrap();
                    }
                });
            }
            // A reader never sees a partial or missing value.
            s.spawn(|| {
                for _ in 0..500 {
                    let id = resolve(&store, &n).unwrap();
                    assert!(ids.contains(&id));
                }
            });
        });
        assert!(ids.contains(&resolve(&store, &n).unwrap()));
        assert!(std::fs::read_dir(store.tmp_dir()).unwrap().next().is_none());
    }

    #[test]
    fn concurrent_write_and_remove_in_one_scope() {
        // delete_ref prunes empty directories while another ref in the same
        // directory is being written: the write must still succeed.
        let (_dir, store) = store();
        let a = name("pr/9/a");
        let b = name("pr/9/b");
        let m = ManifestId::of(b"m");
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..200 {
                    set(&store, &a, &m).unwrap();
                    remove(&store, &a).unwrap();
                }
            });
            s.spawn(|| {
                for _ in 0..200 {
                    set(&store, &b, &m).unwrap();
                    assert_eq!(resolve(&store, &b).unwrap(), m);
                    remove(&store, &b).unwrap();
                }
            });
        });
    }
}
