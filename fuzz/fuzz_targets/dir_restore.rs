//! store::dirtar::extract_tar: restoring any tar stream into a fresh
//! directory never writes outside it.
//!
//! The destination sits in a sandbox next to an `outside/` directory and a
//! file; after each run the sandbox must hold exactly what it held before
//! apart from the destination, and the destination must hold only regular
//! files (one link each), directories and symlinks. A file size limit
//! (RLIMIT_FSIZE) turns an unbounded write into a crash (SIGXFSZ) instead of
//! a full disk. When a restore succeeds, archiving the result and restoring
//! that again must give the same archive.
//!
//! The sandbox path is fixed (`/tmp/ferry-fuzz-restore`, or
//! `$FERRY_FUZZ_RESTORE_DIR`) so that absolute symlink targets into it can
//! be found; run this target with one job only.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use store::dirtar::{extract_tar, write_dir_tar};

/// Largest file the target lets the restore write.
const FSIZE_LIMIT: u64 = 64 << 20;

struct Sandbox {
    root: PathBuf,
    before: BTreeSet<(PathBuf, u64)>,
}

/// Every path under `dir` (not following symlinks) with its size.
fn listing(dir: &Path, skip: &Path, out: &mut BTreeSet<(PathBuf, u64)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p == skip {
            continue;
        }
        let m = fs::symlink_metadata(&p).expect("stat in the sandbox");
        out.insert((p.clone(), if m.is_file() { m.len() } else { 0 }));
        if m.is_dir() {
            listing(&p, skip, out);
        }
    }
}

fn sandbox() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| {
        let root = std::env::var_os("FERRY_FUZZ_RESTORE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/ferry-fuzz-restore"));
        let _ = make_removable(&root);
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("outside/sub")).unwrap();
        fs::write(root.join("outside/keep"), b"must not change").unwrap();
        fs::write(root.join("file"), b"must not change").unwrap();
        let limit = libc::rlimit {
            rlim_cur: FSIZE_LIMIT,
            rlim_max: FSIZE_LIMIT,
        };
        // SAFETY: setrlimit reads the struct it is given; nothing else.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);
        let mut before = BTreeSet::new();
        listing(&root, &root.join("dest"), &mut before);
        Sandbox { root, before }
    })
}

/// Gives every directory under `p` owner rwx so it can be removed.
fn make_removable(p: &Path) -> std::io::Result<()> {
    let m = fs::symlink_metadata(p)?;
    if m.is_dir() {
        fs::set_permissions(p, fs::Permissions::from_mode(0o700))?;
        for e in fs::read_dir(p)?.flatten() {
            let _ = make_removable(&e.path());
        }
    }
    Ok(())
}

fn clear(p: &Path) {
    if fs::symlink_metadata(p).is_ok() {
        let _ = make_removable(p);
        fs::remove_dir_all(p).expect("clean up the destination");
    }
}

fn check_tree(dir: &Path) {
    for e in fs::read_dir(dir).expect("read the destination").flatten() {
        let m = fs::symlink_metadata(e.path()).unwrap();
        let t = m.file_type();
        if t.is_dir() {
            check_tree(&e.path());
        } else if t.is_file() {
            assert_eq!(m.nlink(), 1, "{} is hard-linked", e.path().display());
        } else {
            assert!(t.is_symlink(), "{} is a special file", e.path().display());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let s = sandbox();
    let dest = s.root.join("dest");
    clear(&dest);
    fs::create_dir(&dest).unwrap();
    let restored = extract_tar(&mut &data[..], &dest);

    let mut after = BTreeSet::new();
    listing(&s.root, &dest, &mut after);
    assert_eq!(
        after, s.before,
        "the restore changed something outside its destination"
    );
    assert_eq!(
        fs::read(s.root.join("outside/keep")).unwrap(),
        b"must not change"
    );
    check_tree(&dest);

    if restored.is_ok() {
        // What was restored archives and restores to the same archive.
        let mut tar1 = Vec::new();
        write_dir_tar(&dest, &mut tar1).expect("archive a restored tree");
        let dest2 = s.root.join("dest2");
        clear(&dest2);
        extract_tar(&mut &tar1[..], &dest2).expect("restore our own archive");
        let mut tar2 = Vec::new();
        write_dir_tar(&dest2, &mut tar2).expect("archive it again");
        clear(&dest2);
        assert!(tar1 == tar2, "archive -> restore -> archive is not stable");
    }
});
