//! Storage backends: immutable objects keyed by (kind, name), plus refs that
//! are updated atomically.
//!
//! [`Backend`] is the whole interface the store needs, small enough that an
//! S3-compatible object store can implement it later. [`LocalDir`] implements
//! it on a local directory:
//!
//! ```text
//! root/packs/<first 2 chars>/<name>.pack
//! root/index/<name>.idx
//! root/manifests/<first 2 chars>/<name>
//! root/refs/<ref name>.ref
//! root/tmp/                  temporary files, renamed into place when complete
//! ```
//!
//! Every write goes to a unique temporary file in `root/tmp`, is fsynced,
//! renamed to its final name and the directory fsynced, so a crash leaves
//! garbage in `tmp/`, never a half-written object under its real name.
//!
//! ```
//! use store::backend::{Backend, Kind, LocalDir};
//! let dir = tempfile::tempdir().unwrap();
//! let store = LocalDir::open(dir.path()).unwrap();
//! store.put(Kind::Manifest, "ab12", b"hello").unwrap();
//! assert_eq!(store.get_range(Kind::Manifest, "ab12", 1, 3).unwrap(), b"ell");
//! assert!(store.get(Kind::Manifest, "cd34").unwrap_err().is_not_found());
//! ```

use crate::direct::{self, BlockWriter};
use crate::name::Name;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// The kinds of immutable objects a backend stores.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A pack file: chunk blobs and their entry table.
    Pack,
    /// A pack's index file (`.idx`), the entry table alone.
    Index,
    /// A manifest: the recipe of one stash.
    Manifest,
    /// A lease: a running stash, unstash or gc says it is alive (small,
    /// rewritten to refresh it).
    Lease,
    /// A mark saying the collector condemned a pack (named by the pack id).
    Condemned,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [
        Kind::Pack,
        Kind::Index,
        Kind::Manifest,
        Kind::Lease,
        Kind::Condemned,
    ];

    /// Lower-case name, as used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pack => "pack",
            Kind::Index => "index",
            Kind::Manifest => "manifest",
            Kind::Lease => "lease",
            Kind::Condemned => "condemned mark",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from a [`Backend`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The object does not exist. Test with [`BackendError::is_not_found`].
    #[error("{kind} {name} not found at {location}; the store is missing data, run `ferry fsck`")]
    NotFound {
        /// The object's kind.
        kind: Kind,
        /// The object's name.
        name: String,
        /// Where it was looked for.
        location: String,
    },
    /// An I/O operation failed.
    #[error("cannot {action} {location}: {error}{hint}", hint = io_hint(error))]
    Io {
        /// What was being done, e.g. "read" or "rename into place".
        action: &'static str,
        /// The file or directory concerned.
        location: String,
        /// The underlying error.
        error: io::Error,
    },
    /// A range read went past the end of the object.
    #[error(
        "cannot read {len} bytes at offset {offset} of {location}, which is {size} bytes long; \
         the file is truncated or the index is wrong, run `ferry fsck`"
    )]
    ShortRead {
        /// The object read.
        location: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The object's actual size.
        size: u64,
    },
    /// An object name that cannot be stored safely.
    #[error(
        "invalid {kind} name {name:?}: object names are 2 to 128 characters from \
         [A-Za-z0-9_-]; this is a bug in ferry, please report it"
    )]
    InvalidName {
        /// The kind asked for.
        kind: Kind,
        /// The refused name.
        name: String,
    },
    /// The store directory cannot be created or written.
    #[error(
        "store directory {location} is not usable: {error}; choose a writable directory \
         (set FERRY_STORE) or fix its permissions"
    )]
    NotWritable {
        /// The store's root.
        location: String,
        /// The underlying error.
        error: io::Error,
    },
}

impl BackendError {
    /// Whether this is [`BackendError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound { .. })
    }

    /// Whether the disk (or the user's quota) is full.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, BackendError::Io { error, .. } if is_storage_full(error))
    }
}

/// Whether `error` says the disk (or the user's quota) is full.
pub fn is_storage_full(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

fn io_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            "; check the permissions of the store directory"
        }
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            "; free disk space or run `ferry gc`"
        }
        _ => "",
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackendError + 'a {
    move |error| BackendError::Io {
        action,
        location: path.display().to_string(),
        error,
    }
}

/// The storage interface: immutable objects plus atomically updated refs.
///
/// Object names are 2 to 128 characters from `[A-Za-z0-9_-]` (in practice
/// hexadecimal ids). Writes are atomic, durable and idempotent: an object is
/// either absent or complete under its name.
pub trait Backend: Send + Sync {
    /// Stores `data` as the object `(kind, name)`, replacing any previous one.
    fn put(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError>;
    /// Commits a streamed temporary file (from [`Backend::create_temp`]) as
    /// the object `(kind, name)`: flush, fsync, rename, fsync the directory.
    fn put_file(&self, kind: Kind, name: &str, tmp: TempObject) -> Result<(), BackendError>;
    /// A new writable temporary file with a unique name. Dropping it without
    /// [`Backend::put_file`] deletes it.
    fn create_temp(&self) -> Result<TempObject, BackendError>;
    /// The whole object.
    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>, BackendError>;
    /// `len` bytes at `offset`; reading past the end is an error
    /// ([`BackendError::ShortRead`]).
    fn get_range(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, BackendError>;
    /// Whether the object exists.
    fn exists(&self, kind: Kind, name: &str) -> Result<bool, BackendError>;
    /// The names of all objects of `kind`, sorted.
    fn list(&self, kind: Kind) -> Result<Vec<String>, BackendError>;
    /// Deletes the object; deleting a missing object is not an error.
    fn delete(&self, kind: Kind, name: &str) -> Result<(), BackendError>;
    /// The object's size in bytes.
    fn size(&self, kind: Kind, name: &str) -> Result<u64, BackendError>;
    /// When the object was last written, ms since the epoch, if the backend
    /// knows (`None`: unknown, or no such object). Used to age objects
    /// whose contents cannot be read, such as a damaged lease.
    fn modified_ms(&self, _kind: Kind, _name: &str) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }
    /// Human-readable location of an object, for messages.
    fn location(&self, kind: Kind, name: &str) -> String;

    /// The value of a ref, or `None` if it does not exist. Values longer than
    /// 4 KiB are cut; invalid UTF-8 is replaced, so that a corrupt value
    /// fails to parse instead of failing to read.
    fn read_ref(&self, name: &Name) -> Result<Option<String>, BackendError>;
    /// Sets a ref atomically: readers see the old or the new value, never a mix.
    fn write_ref(&self, name: &Name, value: &str) -> Result<(), BackendError>;
    /// Deletes a ref; `false` if it did not exist.
    fn delete_ref(&self, name: &Name) -> Result<bool, BackendError>;
    /// All refs, sorted. Entries whose names are not valid are skipped.
    fn list_refs(&self) -> Result<Vec<Name>, BackendError>;
    /// When the ref was last written, ms since the epoch (`None`: no such ref).
    fn ref_modified_ms(&self, name: &Name) -> Result<Option<u64>, BackendError>;
    /// Whether the store can only be read (writes will fail).
    fn read_only(&self) -> bool {
        false
    }
    /// Bytes that can still be written, if the backend knows (`None`:
    /// unknown). A server keeps a reserve with it, so that a full disk
    /// cannot stop commits and collections.
    fn available_bytes(&self) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }
    /// Human-readable location of a ref, for messages.
    fn ref_location(&self, name: &Name) -> String;
}

/// A temporary file being written, committed with [`Backend::put_file`].
///
/// Dropping it uncommitted deletes the file; a crash leaves it in `tmp/`.
pub struct TempObject {
    file: BlockWriter,
    path: PathBuf,
    written: u64,
    committed: bool,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempObject {
    /// Creates a new uniquely named temporary file in `dir`. With `direct`,
    /// whole 1 MiB blocks are written past the page cache (`O_DIRECT`) where
    /// the file system allows it; the rest goes through it.
    pub fn create_in(dir: &Path, direct: bool) -> Result<TempObject, BackendError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{}-{n}-{nanos:x}.tmp", std::process::id()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(TempObject {
                        file: BlockWriter::new(file, direct),
                        path,
                        written: 0,
                        committed: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create temporary file", &path)(e)),
            }
        }
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Writes what is buffered and fsyncs the file.
    pub fn sync(&mut self) -> Result<(), BackendError> {
        self.file
            .finish()
            .and_then(|()| self.file.get_ref().sync_all())
            .map_err(io_err("flush and fsync", &self.path))
    }

    /// Marks the file as moved away, so that drop does not delete it.
    fn mark_committed(&mut self) {
        self.committed = true;
    }
}

impl Write for TempObject {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl fmt::Debug for TempObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempObject")
            .field("path", &self.path)
            .field("written", &self.written)
            .finish()
    }
}

impl Drop for TempObject {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// How many open files [`LocalDir`] keeps for range reads.
const OPEN_FILES: usize = 64;
/// Longest ref value read.
const MAX_REF_LEN: u64 = 4096;

#[derive(Default)]
struct FileCache {
    files: HashMap<PathBuf, (Arc<File>, u64)>,
    tick: u64,
}

/// A [`Backend`] on a local directory.
pub struct LocalDir {
    root: PathBuf,
    open_files: Mutex<FileCache>,
    read_only: bool,
    direct_writes: bool,
}

impl fmt::Debug for LocalDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDir")
            .field("root", &self.root)
            .finish()
    }
}

fn check_object_name(kind: Kind, name: &str) -> Result<(), BackendError> {
    let ok = (2..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BackendError::InvalidName {
            kind,
            name: name.chars().take(200).collect(),
        })
    }
}

fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

impl LocalDir {
    /// Opens the store at `root`, creating it and its layout if missing.
    /// Fails with [`BackendError::NotWritable`] if `root` cannot be written.
    pub fn open(root: impl AsRef<Path>) -> Result<LocalDir, BackendError> {
        let root = root.as_ref().to_path_buf();
        let not_writable = |error| BackendError::NotWritable {
            location: root.display().to_string(),
            error,
        };
        let subs = [
            "packs",
            "index",
            "manifests",
            "refs",
            "tmp",
            "leases",
            "condemned",
        ];
        let writable = subs
            .iter()
            .try_for_each(|sub| fs::create_dir_all(root.join(sub)))
            .and_then(|()| match TempObject::create_in(&root.join("tmp"), false) {
                // Probe: creating (and dropping) a temporary file proves we can write.
                Ok(probe) => {
                    drop(probe);
                    Ok(())
                }
                Err(BackendError::Io { error, .. }) => Err(error),
                Err(e) => Err(io::Error::other(e.to_string())),
            });
        let read_only = match writable {
            Ok(()) => false,
            // An existing store on a read-only mount (or without write
            // permission) can still be read: restores, listings, checks.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied
                ) && root.join("refs").is_dir()
                    && root.join("packs").is_dir() =>
            {
                true
            }
            Err(e) => return Err(not_writable(e)),
        };
        Ok(LocalDir {
            root,
            open_files: Mutex::new(FileCache::default()),
            read_only,
            direct_writes: direct::wanted(),
        })
    }

    /// Whether large objects (packs) are written past the page cache:
    /// yes by default, unless `FERRY_DIRECT_IO=0` is set. Worth turning off
    /// where each pack is read back right after it is written: those reads
    /// would go to the disk.
    pub fn set_direct_writes(&mut self, on: bool) {
        self.direct_writes = on;
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The temporary directory.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn object_path(&self, kind: Kind, name: &str) -> Result<PathBuf, BackendError> {
        check_object_name(kind, name)?;
        Ok(self.unchecked_path(kind, name))
    }

    fn unchecked_path(&self, kind: Kind, name: &str) -> PathBuf {
        let fan_out = name.get(..2).unwrap_or("__");
        match kind {
            Kind::Pack => self
                .root
                .join("packs")
                .join(fan_out)
                .join(format!("{name}.pack")),
            Kind::Index => self.root.join("index").join(format!("{name}.idx")),
            Kind::Manifest => self.root.join("manifests").join(fan_out).join(name),
            Kind::Lease => self.root.join("leases").join(format!("{name}.lease")),
            Kind::Condemned => self
                .root
                .join("condemned")
                .join(format!("{name}.condemned")),
        }
    }

    fn ref_path(&self, name: &Name) -> PathBuf {
        // Valid names are safe relative paths without `.`/`..` parts.
        self.root.join("refs").join(format!("{name}.ref"))
    }

    fn not_found(&self, kind: Kind, name: &str, path: &Path) -> BackendError {
        BackendError::NotFound {
            kind,
            name: name.to_string(),
            location: path.display().to_string(),
        }
    }

    /// Maps an I/O error, turning "not found" into [`BackendError::NotFound`].
    fn object_err<'a>(
        &'a self,
        action: &'static str,
        kind: Kind,
        name: &'a str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> BackendError + 'a {
        move |error| {
            if error.kind() == io::ErrorKind::NotFound {
                self.not_found(kind, name, path)
            } else {
                io_err(action, path)(error)
            }
        }
    }

    /// Creates `dir` and any missing parents below the root, fsyncing each
    /// parent whose entries changed.
    fn ensure_dir(&self, dir: &Path) -> Result<(), BackendError> {
        if dir.is_dir() {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut cur = dir;
        while !cur.is_dir() && cur != self.root {
            missing.push(cur.to_path_buf());
            match cur.parent() {
                Some(p) => cur = p,
                None => break,
            }
        }
        for d in missing.iter().rev() {
            match fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create directory", d)(e)),
            }
            if let Some(parent) = d.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// Renames `tmp` to `path` (creating its directory), then fsyncs the
    /// directory. Retries if a concurrent cleanup removed the directory.
    fn commit(&self, mut tmp: TempObject, path: &Path) -> Result<(), BackendError> {
        tmp.sync()?;
        let dir = path.parent().unwrap_or(&self.root);
        let mut attempts = 0;
        loop {
            let result = self.ensure_dir(dir).and_then(|()| {
                fs::rename(&tmp.path, path).map_err(io_err("rename into place", path))
            });
            match result {
                Ok(()) => break,
                Err(BackendError::Io { ref error, .. })
                    if error.kind() == io::ErrorKind::NotFound && attempts < 10 =>
                {
                    attempts += 1
                }
                Err(e) => return Err(e),
            }
        }
        tmp.mark_committed();
        self.forget_open(path);
        sync_dir(dir)
    }

    fn open_cached(&self, kind: Kind, name: &str, path: &Path) -> Result<Arc<File>, BackendError> {
        {
            let mut cache = self.open_files.lock().unwrap_or_else(|e| e.into_inner());
            cache.tick += 1;
            let tick = cache.tick;
            if let Some((file, used)) = cache.files.get_mut(path) {
                *used = tick;
                return Ok(Arc::clone(file));
            }
        }
        let file = Arc::new(File::open(path).map_err(self.object_err("open", kind, name, path))?);
        let mut cache = self.open_files.lock().unwrap_or_else(|e| e.into_inner());
        if cache.files.len() >= OPEN_FILES {
            let oldest = cache
                .files
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(p, _)| p.clone());
            if let Some(oldest) = oldest {
                cache.files.remove(&oldest);
            }
        }
        let tick = cache.tick;
        cache
            .files
            .insert(path.to_path_buf(), (Arc::clone(&file), tick));
        Ok(file)
    }

    fn forget_open(&self, path: &Path) {
        let mut cache = self.open_files.lock().unwrap_or_else(|e| e.into_inner());
        cache.files.remove(path);
    }

    /// Appends the valid object names in `dir` that end in `suffix`.
    fn list_dir(
        &self,
        kind: Kind,
        dir: &Path,
        suffix: &str,
        out: &mut Vec<String>,
    ) -> Result<(), BackendError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list directory", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("list directory", dir))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let Some(name) = file_name.strip_suffix(suffix) else {
                continue;
            };
            if check_object_name(kind, name).is_ok() {
                out.push(name.to_string());
            }
        }
        Ok(())
    }

    /// Subdirectories of `dir` (not following symlinks).
    fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, BackendError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list directory", dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list directory", dir))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(entry.path());
            }
        }
        Ok(out)
    }

    fn walk_refs(&self, dir: &Path, prefix: &str, out: &mut Vec<Name>) -> Result<(), BackendError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list directory", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("list directory", dir))?;
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_type.is_dir() {
                // Names are at most 255 bytes, so recursion depth is bounded.
                if prefix.len() + file_name.len() < crate::name::MAX_NAME_LEN {
                    self.walk_refs(&entry.path(), &format!("{prefix}{file_name}/"), out)?;
                }
            } else if file_type.is_file() {
                if let Some(stem) = file_name.strip_suffix(".ref") {
                    if let Ok(name) = Name::parse(&format!("{prefix}{stem}")) {
                        out.push(name);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Backend for LocalDir {
    fn put(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError> {
        let path = self.object_path(kind, name)?;
        let mut tmp = self.create_temp()?;
        tmp.write_all(data)
            .map_err(io_err("write temporary file", &tmp.path))?;
        self.commit(tmp, &path)
    }

    fn put_file(&self, kind: Kind, name: &str, tmp: TempObject) -> Result<(), BackendError> {
        let path = self.object_path(kind, name)?;
        self.commit(tmp, &path)
    }

    fn create_temp(&self) -> Result<TempObject, BackendError> {
        TempObject::create_in(&self.tmp_dir(), self.direct_writes)
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>, BackendError> {
        let path = self.object_path(kind, name)?;
        fs::read(&path).map_err(self.object_err("read", kind, name, &path))
    }

    fn get_range(
        &self,
        kind: Kind,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, BackendError> {
        let path = self.object_path(kind, name)?;
        let file = self.open_cached(kind, name, &path)?;
        let size = file
            .metadata()
            .map_err(io_err("read metadata of", &path))?
            .len();
        let short = || BackendError::ShortRead {
            location: path.display().to_string(),
            offset,
            len,
            size,
        };
        // Check before allocating: `len` may come from a corrupt index.
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(short());
        }
        let mut buf = vec![0; usize::try_from(len).map_err(|_| short())?];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(short()),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    fn exists(&self, kind: Kind, name: &str) -> Result<bool, BackendError> {
        let path = self.object_path(kind, name)?;
        path.try_exists().map_err(io_err("check", &path))
    }

    fn list(&self, kind: Kind) -> Result<Vec<String>, BackendError> {
        let mut out = Vec::new();
        match kind {
            Kind::Pack => {
                for dir in Self::subdirs(&self.root.join("packs"))? {
                    self.list_dir(kind, &dir, ".pack", &mut out)?;
                }
            }
            Kind::Index => self.list_dir(kind, &self.root.join("index"), ".idx", &mut out)?,
            Kind::Lease => self.list_dir(kind, &self.root.join("leases"), ".lease", &mut out)?,
            Kind::Condemned => {
                self.list_dir(kind, &self.root.join("condemned"), ".condemned", &mut out)?
            }
            Kind::Manifest => {
                for dir in Self::subdirs(&self.root.join("manifests"))? {
                    self.list_dir(kind, &dir, "", &mut out)?;
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<(), BackendError> {
        let path = self.object_path(kind, name)?;
        self.forget_open(&path);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &path)(e)),
        }
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, BackendError> {
        let path = self.object_path(kind, name)?;
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(self.object_err("read metadata of", kind, name, &path))
    }

    fn modified_ms(&self, kind: Kind, name: &str) -> Result<Option<u64>, BackendError> {
        let path = self.object_path(kind, name)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read the metadata of", &path)(e)),
        }
    }

    fn location(&self, kind: Kind, name: &str) -> String {
        self.unchecked_path(kind, name).display().to_string()
    }

    fn read_ref(&self, name: &Name) -> Result<Option<String>, BackendError> {
        let path = self.ref_path(name);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_REF_LEN)
            .read_to_end(&mut bytes)
            .map_err(io_err("read", &path))?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn write_ref(&self, name: &Name, value: &str) -> Result<(), BackendError> {
        let path = self.ref_path(name);
        let mut tmp = self.create_temp()?;
        tmp.write_all(value.as_bytes())
            .map_err(io_err("write temporary file", &tmp.path))?;
        self.commit(tmp, &path)
    }

    fn delete_ref(&self, name: &Name) -> Result<bool, BackendError> {
        let path = self.ref_path(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("delete", &path)(e)),
        }
        let refs = self.root.join("refs");
        let mut dir = path.parent();
        // Remove directories left empty (`pr/1234/`), best effort: a
        // concurrent write_ref recreates what it needs.
        while let Some(d) = dir {
            if d == refs || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        // Gone already means another delete_ref pruned it (and syncs its parent).
        match sync_dir(dir.unwrap_or(&refs)) {
            Err(BackendError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
        Ok(true)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn available_bytes(&self) -> Result<Option<u64>, BackendError> {
        // What an unprivileged writer may use (`f_bavail`), as `df` shows.
        let stat = rustix::fs::statvfs(&self.root).map_err(|e| BackendError::Io {
            action: "query the free space of",
            location: self.root.display().to_string(),
            error: e.into(),
        })?;
        Ok(Some(stat.f_bavail.saturating_mul(stat.f_frsize)))
    }

    fn ref_modified_ms(&self, name: &Name) -> Result<Option<u64>, BackendError> {
        let path = self.ref_path(name);
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read the metadata of", &path)(e)),
        }
    }

    fn list_refs(&self) -> Result<Vec<Name>, BackendError> {
        let mut out = Vec::new();
        self.walk_refs(&self.root.join("refs"), "", &mut out)?;
        out.sort();
        Ok(out)
    }

    fn ref_location(&self, name: &Name) -> String {
        self.ref_path(name).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::files_under;

    fn store() -> (tempfile::TempDir, LocalDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::open(dir.path().join("store")).unwrap();
        (dir, store)
    }

    #[test]
    fn open_creates_layout() {
        let (_dir, store) = store();
        for sub in [
            "packs",
            "index",
            "manifests",
            "refs",
            "tmp",
            "leases",
            "condemned",
        ] {
            assert!(store.root().join(sub).is_dir(), "{sub}");
        }
        assert!(files_under(store.root()).is_empty());
        // Opening again is fine.
        LocalDir::open(store.root()).unwrap();
    }

    #[test]
    fn available_bytes_is_what_the_file_system_reports() {
        let (_dir, store) = store();
        let free = store
            .available_bytes()
            .unwrap()
            .expect("a local disk knows");
        let stat = rustix::fs::statvfs(store.root()).unwrap();
        assert!(free > 0, "a test directory on a full disk");
        assert!(
            free <= stat.f_blocks * stat.f_frsize,
            "more free than the disk holds"
        );
        let missing = LocalDir {
            root: store.root().join("gone"),
            ..store
        };
        let err = missing.available_bytes().unwrap_err();
        assert!(err.to_string().contains("free space"), "{err}");
        assert!(!err.is_storage_full());
    }

    #[test]
    fn open_refuses_unusable_root() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = LocalDir::open(&file).unwrap_err();
        assert!(matches!(err, BackendError::NotWritable { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&file.display().to_string()), "{text}");
        assert!(text.contains("writable"), "{text}");
    }

    #[test]
    fn put_get_list_delete() {
        let (_dir, store) = store();
        store.put(Kind::Pack, "abcd", b"pack data").unwrap();
        store.put(Kind::Index, "abcd", b"idx").unwrap();
        store.put(Kind::Manifest, "ab12", b"m1").unwrap();
        store.put(Kind::Manifest, "cd34", b"m2").unwrap();
        assert!(store.root().join("packs/ab/abcd.pack").is_file());
        assert!(store.root().join("index/abcd.idx").is_file());
        assert!(store.root().join("manifests/cd/cd34").is_file());

        assert_eq!(store.get(Kind::Pack, "abcd").unwrap(), b"pack data");
        assert_eq!(store.size(Kind::Pack, "abcd").unwrap(), 9);
        assert!(store.exists(Kind::Index, "abcd").unwrap());
        assert!(!store.exists(Kind::Index, "ffff").unwrap());
        assert_eq!(store.list(Kind::Pack).unwrap(), ["abcd"]);
        assert_eq!(store.list(Kind::Manifest).unwrap(), ["ab12", "cd34"]);

        // Idempotent put.
        store.put(Kind::Manifest, "ab12", b"m1").unwrap();
        assert_eq!(store.get(Kind::Manifest, "ab12").unwrap(), b"m1");

        store.delete(Kind::Manifest, "ab12").unwrap();
        store.delete(Kind::Manifest, "ab12").unwrap();
        assert_eq!(store.list(Kind::Manifest).unwrap(), ["cd34"]);
        // Nothing left behind in tmp.
        assert!(files_under(&store.tmp_dir()).is_empty());
    }

    #[test]
    fn list_ignores_stray_files() {
        let (_dir, store) = store();
        store.put(Kind::Pack, "abcd", b"x").unwrap();
        fs::write(store.root().join("packs/ab/notes.txt"), b"x").unwrap();
        fs::write(store.root().join("packs/ab/x.pack"), b"x").unwrap();
        fs::write(store.root().join("index/.hidden.idx"), b"x").unwrap();
        assert_eq!(store.list(Kind::Pack).unwrap(), ["abcd"]);
        assert!(store.list(Kind::Index).unwrap().is_empty());
    }

    #[test]
    fn not_found_is_distinguishable() {
        let (_dir, store) = store();
        let errs = [
            store.get(Kind::Pack, "abcd").unwrap_err(),
            store.get_range(Kind::Pack, "abcd", 0, 1).unwrap_err(),
            store.size(Kind::Manifest, "abcd").unwrap_err(),
        ];
        for err in errs {
            assert!(err.is_not_found(), "{err}");
            assert!(err.to_string().contains("abcd"), "{err}");
        }
    }

    #[test]
    fn invalid_names_are_refused() {
        let (_dir, store) = store();
        for name in [
            "",
            "a",
            "../etc",
            "ab/cd",
            "ab.cd",
            "ab\0",
            &"a".repeat(129),
        ] {
            let err = store.put(Kind::Manifest, name, b"x").unwrap_err();
            assert!(matches!(err, BackendError::InvalidName { .. }), "{err}");
            assert!(store.get(Kind::Pack, name).is_err());
        }
    }

    #[test]
    fn get_range_reads_and_rejects_short_reads() {
        let (_dir, store) = store();
        let data: Vec<u8> = (0..=255).collect();
        store.put(Kind::Pack, "abcd", &data).unwrap();
        assert_eq!(
            store.get_range(Kind::Pack, "abcd", 10, 5).unwrap(),
            &data[10..15]
        );
        assert_eq!(store.get_range(Kind::Pack, "abcd", 256, 0).unwrap(), b"");
        for (offset, len) in [(250, 7), (257, 0), (0, u64::MAX), (u64::MAX, 2)] {
            let err = store
                .get_range(Kind::Pack, "abcd", offset, len)
                .unwrap_err();
            assert!(
                matches!(err, BackendError::ShortRead { size: 256, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn get_range_with_many_open_files() {
        let (_dir, store) = store();
        let names: Vec<String> = (0..OPEN_FILES * 2).map(|i| format!("{i:04x}")).collect();
        for name in &names {
            store.put(Kind::Pack, name, name.as_bytes()).unwrap();
        }
        for _ in 0..3 {
            for name in &names {
                assert_eq!(
                    store.get_range(Kind::Pack, name, 1, 3).unwrap(),
                    &name.as_bytes()[1..4]
                );
            }
        }
        assert!(store.open_files.lock().unwrap().files.len() <= OPEN_FILES);
        // A deleted object is not served from a cached handle.
        store.delete(Kind::Pack, &names[0]).unwrap();
        assert!(store
            .get_range(Kind::Pack, &names[0], 0, 1)
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn temp_object_commit_and_drop() {
        let (_dir, store) = store();
        let mut tmp = store.create_temp().unwrap();
        tmp.write_all(b"streamed").unwrap();
        assert_eq!(tmp.len(), 8);
        let tmp_path = tmp.path().to_path_buf();
        assert!(tmp_path.starts_with(store.tmp_dir()));
        store.put_file(Kind::Pack, "ab12", tmp).unwrap();
        assert!(!tmp_path.exists());
        assert_eq!(store.get(Kind::Pack, "ab12").unwrap(), b"streamed");

        // Dropped without commit: nothing anywhere.
        let mut tmp = store.create_temp().unwrap();
        tmp.write_all(b"abandoned").unwrap();
        drop(tmp);
        assert_eq!(files_under(store.root()).len(), 1);
    }

    #[test]
    fn crash_leaves_only_tmp_garbage() {
        let (_dir, store) = store();
        let mut tmp = store.create_temp().unwrap();
        tmp.write_all(b"half a pack").unwrap();
        tmp.flush().unwrap();
        // A crash: the process dies with the temp file neither committed
        // nor removed.
        std::mem::forget(tmp);
        let files = files_under(store.root());
        assert_eq!(files.len(), 1);
        assert!(files[0].starts_with(store.tmp_dir()));
        for kind in Kind::ALL {
            assert!(store.list(kind).unwrap().is_empty());
        }
    }

    #[test]
    fn temp_names_are_unique_across_threads() {
        let (_dir, store) = store();
        let paths: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..50)
                            .map(|_| {
                                let tmp = store.create_temp().unwrap();
                                let path = tmp.path().to_path_buf();
                                std::mem::forget(tmp);
                                path
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let unique: std::collections::HashSet<_> = paths.iter().collect();
        assert_eq!(unique.len(), 200);
    }

    #[test]
    fn refs_round_trip() {
        let (_dir, store) = store();
        let a = Name::parse("pr/1234/ci_gpu").unwrap();
        let b = Name::parse("main").unwrap();
        let c = Name::parse("main/ci_cpu").unwrap();
        assert_eq!(store.read_ref(&a).unwrap(), None);
        store.write_ref(&a, "one\n").unwrap();
        store.write_ref(&b, "two\n").unwrap();
        store.write_ref(&c, "three\n").unwrap();
        assert_eq!(store.read_ref(&a).unwrap().as_deref(), Some("one\n"));
        store.write_ref(&a, "uno\n").unwrap();
        assert_eq!(store.read_ref(&a).unwrap().as_deref(), Some("uno\n"));
        assert!(store.root().join("refs/pr/1234/ci_gpu.ref").is_file());
        assert_eq!(
            store.list_refs().unwrap(),
            [b.clone(), c.clone(), a.clone()]
        );

        assert!(store.delete_ref(&a).unwrap());
        assert!(!store.delete_ref(&a).unwrap());
        // Empty directories are pruned, and writing again recreates them.
        assert!(!store.root().join("refs/pr").exists());
        store.write_ref(&a, "again\n").unwrap();
        assert_eq!(store.read_ref(&a).unwrap().as_deref(), Some("again\n"));
        assert!(store.delete_ref(&b).unwrap());
        assert_eq!(store.list_refs().unwrap(), [c, a]);
        assert!(files_under(&store.tmp_dir()).is_empty());
    }

    #[test]
    fn list_refs_skips_invalid_entries() {
        let (_dir, store) = store();
        let refs = store.root().join("refs");
        fs::create_dir_all(refs.join("a b")).unwrap();
        fs::write(refs.join("a b/x.ref"), "v").unwrap();
        fs::write(refs.join("notes.txt"), "v").unwrap();
        fs::write(refs.join(".hidden.ref"), "v").unwrap();
        fs::write(refs.join("ok.ref"), "v").unwrap();
        assert_eq!(store.list_refs().unwrap(), [Name::parse("ok").unwrap()]);
    }

    #[test]
    fn read_ref_bounds_size_and_tolerates_bad_utf8() {
        let (_dir, store) = store();
        let name = Name::parse("big").unwrap();
        fs::write(store.ref_path(&name), vec![0xff; 100_000]).unwrap();
        let value = store.read_ref(&name).unwrap().unwrap();
        assert_eq!(value.chars().count(), MAX_REF_LEN as usize);
    }
}
