//! Scratch output beside a restore's target: a hidden temporary file or
//! directory (`.ferry-unstash-*`) that becomes the target by rename once it
//! is complete, so a target is never seen half-written.
//!
//! A restore that stops early must not leave gigabytes of scratch behind:
//!
//! - one that fails removes its scratch when it is dropped;
//! - one interrupted by a signal: the process's handler calls
//!   [`remove_all`] before it exits (the CLI does, for SIGINT, SIGTERM and
//!   SIGHUP);
//! - one killed outright (SIGKILL, the OOM killer, a lost node) cannot, so
//!   every new scratch first sweeps its directory for scratch whose owner is
//!   gone. An owner holds an exclusive `flock` on its scratch for as long as
//!   it lives; the kernel drops the lock with the process, so scratch that
//!   someone else can lock has no owner. (On a file system without `flock`
//!   nothing is swept: ownership cannot be told there.)

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// What every scratch name starts with.
pub const PREFIX: &str = ".ferry-unstash-";

/// Scratch younger than this is never swept: between its creation and its
/// owner's lock it could be mistaken for an orphan.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// Scratch this process is writing, for [`remove_all`].
static LIVE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn live() -> MutexGuard<'static, BTreeSet<PathBuf>> {
    // Paths only: a panicking holder cannot leave them inconsistent.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set by [`remove_all`]: no scratch is made after it.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Removes the scratch of every restore this process is running, for a
/// signal handler that is about to exit. The restores themselves are not
/// stopped: their writes go to removed files, and their renames fail; new
/// scratch can no longer be made (which fails the restore that tries).
/// Returns how many were removed.
pub fn remove_all() -> usize {
    let live = live();
    CLOSED.store(true, SeqCst);
    drop(live);
    remove_live(|_| true)
}

fn remove_live(which: impl Fn(&Path) -> bool) -> usize {
    let mut live = live();
    let paths: Vec<PathBuf> = live.iter().filter(|p| which(p)).cloned().collect();
    paths
        .iter()
        .filter(|p| live.remove(*p) && remove(p).is_ok())
        .count()
}

fn remove(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path)?.is_dir() {
        true => std::fs::remove_dir_all(path),
        false => std::fs::remove_file(path),
    }
}

/// Removes scratch in `dir` whose owner is gone and that is older than
/// [`STALE_AFTER`]. Best effort: what cannot be read, locked or removed is
/// left alone. Returns how many were removed.
pub fn sweep(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(PREFIX.as_bytes())
        {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= STALE_AFTER);
        // Only what a restore makes: never a symlink, nor a FIFO, whose
        // open would wait for a writer.
        if !old || !(meta.is_file() || meta.is_dir()) {
            continue;
        }
        let path = entry.path();
        // Read-only, so that a directory opens too; non-blocking, in case
        // it was replaced by a FIFO since.
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        if f.try_lock().is_ok() && remove(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Keeps a path in [`LIVE`] while it lives.
#[derive(Debug)]
struct Registered(PathBuf);

impl Registered {
    /// Runs `create` (which makes scratch and says where) and registers
    /// what it made, holding [`LIVE`] throughout: a signal handler's
    /// [`remove_all`] waits for it, so no scratch exists unregistered.
    fn create<T>(create: impl FnOnce() -> io::Result<(T, PathBuf)>) -> io::Result<(T, Registered)> {
        let mut live = live();
        if CLOSED.load(SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the process is ending (interrupted): no new output is started",
            ));
        }
        let (made, path) = create()?;
        live.insert(path.clone());
        Ok((made, Registered(path)))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        live().remove(&self.0);
    }
}

/// A scratch file that is to become `target`: created beside it, with the
/// mode the target should end up with (an existing target's own, with
/// `--force`; else what any new file gets, 0666 less the umask), locked, and
/// removed when dropped unless [`ScratchFile::persist`]ed.
#[derive(Debug)]
pub(crate) struct ScratchFile {
    file: tempfile::NamedTempFile,
    _live: Registered,
}

impl ScratchFile {
    pub(crate) fn for_target(target: &Path) -> io::Result<ScratchFile> {
        use std::os::unix::fs::PermissionsExt;
        let dir = parent_dir(target);
        sweep(&dir);
        let mode = std::fs::metadata(target)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o666);
        let (file, live) = Registered::create(|| {
            let file = tempfile::Builder::new()
                .prefix(PREFIX)
                .permissions(std::fs::Permissions::from_mode(mode))
                .tempfile_in(&dir)?;
            let path = file.path().to_path_buf();
            Ok((file, path))
        })?;
        // Unsupported (or refused) only where no sweep could lock it either.
        let _ = file.as_file().try_lock();
        Ok(ScratchFile { file, _live: live })
    }

    pub(crate) fn as_file(&self) -> &File {
        self.file.as_file()
    }

    pub(crate) fn as_file_mut(&mut self) -> &mut File {
        self.file.as_file_mut()
    }

    /// Renames it to `target`, replacing what is there.
    pub(crate) fn persist(self, target: &Path) -> io::Result<()> {
        self.file.persist(target).map(drop).map_err(|e| e.error)
    }
}

/// A scratch directory in `dir`, locked, removed with its contents when
/// dropped unless [`ScratchDir::keep`] is called (after renaming it).
#[derive(Debug)]
pub(crate) struct ScratchDir {
    path: PathBuf,
    _lock: Option<File>,
    _live: Registered,
    kept: bool,
}

impl ScratchDir {
    pub(crate) fn in_dir(dir: &Path) -> io::Result<ScratchDir> {
        sweep(dir);
        let (path, live) = Registered::create(|| {
            let path = tempfile::Builder::new()
                .prefix(PREFIX)
                .tempdir_in(dir)?
                .keep();
            Ok((path.clone(), path))
        })?;
        let lock = File::open(&path).ok().filter(|f| f.try_lock().is_ok());
        Ok(ScratchDir {
            path,
            _lock: lock,
            _live: live,
            kept: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// It was renamed into place: nothing to remove.
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The directory `path` is in (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_in(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    }

    /// Backdates `path` itself (not what a symlink points at) past
    /// [`STALE_AFTER`].
    fn age(path: &Path) {
        let then = SystemTime::now() - STALE_AFTER - Duration::from_secs(5);
        let secs = then
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        crate::testutil::set_mtime(path, secs as i64);
    }

    #[test]
    fn a_dropped_scratch_file_is_removed_and_a_persisted_one_becomes_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let s = ScratchFile::for_target(&target).unwrap();
        assert_eq!(scratch_in(dir.path()).len(), 1);
        assert!(live().contains(s.file.path()));
        let path = s.file.path().to_path_buf();
        drop(s);
        assert!(scratch_in(dir.path()).is_empty());
        assert!(!live().contains(&path));

        let mut s = ScratchFile::for_target(&target).unwrap();
        std::io::Write::write_all(s.as_file_mut(), b"done").unwrap();
        s.persist(&target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"done");
        assert!(scratch_in(dir.path()).is_empty());
    }

    #[test]
    fn only_old_scratch_nobody_holds_is_swept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // An orphan file and an orphan directory with contents, both old.
        let orphan = d.join(format!("{PREFIX}orphan"));
        std::fs::write(&orphan, b"partial").unwrap();
        age(&orphan);
        let orphan_dir = d.join(format!("{PREFIX}dir"));
        std::fs::create_dir_all(orphan_dir.join("a/b")).unwrap();
        std::fs::write(orphan_dir.join("a/b/f"), b"x").unwrap();
        age(&orphan_dir);
        // A fresh orphan: possibly not locked yet by a starting owner.
        let fresh = d.join(format!("{PREFIX}fresh"));
        std::fs::write(&fresh, b"partial").unwrap();
        // An old one whose owner lives (its lock is held).
        let held = d.join(format!("{PREFIX}held"));
        std::fs::write(&held, b"partial").unwrap();
        let owner = File::open(&held).unwrap();
        owner.lock().unwrap();
        age(&held);
        // Not scratch at all.
        let other = d.join("keep.bin");
        std::fs::write(&other, b"mine").unwrap();
        age(&other);
        // Named like scratch, but nothing a restore makes: a FIFO (opening
        // it would block) and a symlink (to something that must stay).
        let fifo = d.join(format!("{PREFIX}fifo"));
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        age(&fifo);
        let link = d.join(format!("{PREFIX}link"));
        std::os::unix::fs::symlink(&other, &link).unwrap();
        age(&link);

        assert_eq!(sweep(d), 2);
        let mut kept = vec![fifo, fresh, held, link];
        assert_eq!(scratch_in(d), kept);
        assert!(other.exists());

        drop(owner);
        assert_eq!(sweep(d), 1);
        kept.retain(|p| !p.ends_with(format!("{PREFIX}held")));
        assert_eq!(scratch_in(d), kept);
    }

    #[test]
    fn a_live_scratch_is_not_swept_even_when_old() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let file = ScratchFile::for_target(&target).unwrap();
        let staging = ScratchDir::in_dir(dir.path()).unwrap();
        age(file.file.path());
        age(staging.path());
        assert_eq!(sweep(dir.path()), 0);
        assert_eq!(scratch_in(dir.path()).len(), 2);
        // A new scratch beside them sweeps, and leaves them too.
        let again = ScratchFile::for_target(&target).unwrap();
        assert_eq!(scratch_in(dir.path()).len(), 3);
        drop((file, staging, again));
        assert!(scratch_in(dir.path()).is_empty());
    }

    #[test]
    fn remove_all_removes_what_this_process_is_writing() {
        let dir = tempfile::tempdir().unwrap();
        let file = ScratchFile::for_target(&dir.path().join("out.bin")).unwrap();
        let staging = ScratchDir::in_dir(dir.path()).unwrap();
        std::fs::write(staging.path().join("f"), b"x").unwrap();
        let mine = [file.file.path().to_path_buf(), staging.path().to_path_buf()];
        // Other tests' scratch is registered too: remove only ours.
        assert_eq!(remove_live(|p| p.starts_with(dir.path())), 2);
        assert!(mine.iter().all(|p| !p.exists()));
        // Dropping them afterwards is harmless.
        drop((file, staging));
        assert!(scratch_in(dir.path()).is_empty());
    }
}
