//! Directories as deterministic tar streams, and safe restore.
//!
//! [`write_dir_tar`] turns a directory tree into a tar stream that depends
//! only on the tree: entries in a fixed order, relative paths, uid/gid 0, no
//! user or group names. The same tree always gives the same bytes, so
//! stashing it twice stores nothing new.
//!
//! [`extract_tar`] restores such a stream. It treats the stream as untrusted:
//! it never writes outside the destination, never follows a symlink while
//! creating a path, and refuses hard links, device nodes and fifos. Symlinks
//! are restored as they were, absolute or leading out of the tree included
//! (build trees hold such links); they are never followed by the restore.
//!
//! Both are Unix-only: they keep Unix modes and symlinks.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Permission bits kept on restore; setuid, setgid and sticky bits are dropped.
const MODE_MASK: u32 = 0o777;

/// What [`write_dir_tar`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirTarStats {
    /// Regular files written (hard-linked files count once per name).
    pub files: u64,
    /// Directories written, not counting the root.
    pub dirs: u64,
    /// Symlinks written.
    pub symlinks: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Sockets, fifos and device nodes left out.
    pub skipped: u64,
}

/// What [`extract_tar`] restored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractStats {
    /// Regular files created.
    pub files: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// Why a directory could not be archived or a tar not restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirTarError {
    /// The root to archive is not a directory.
    #[error("{}: not a directory", path.display())]
    NotADirectory {
        /// The root given.
        path: PathBuf,
    },
    /// Reading the tree to archive failed.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file or directory being read.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Writing the tar stream failed.
    #[error("writing the tar stream (at {}): {source}", path.display())]
    Write {
        /// The entry being written, relative to the root.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file changed size while it was archived.
    #[error("{}: file changed while being archived (expected {expected} bytes, read {read})", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
        /// Size when it was stat'ed.
        expected: u64,
        /// Bytes that could be read.
        read: u64,
    },
    /// Reading the tar stream failed or it is malformed.
    #[error("reading the tar stream{}: {source}", after.as_ref().map(|p| format!(" (after entry {})", p.display())).unwrap_or_default())]
    Tar {
        /// The last entry read successfully, if any.
        after: Option<PathBuf>,
        /// The underlying error.
        source: io::Error,
    },
    /// An entry is refused because restoring it would be unsafe or is not supported.
    #[error("tar entry {}: refused: {reason}", entry.display())]
    Refused {
        /// The entry's path as stored in the tar.
        entry: PathBuf,
        /// Why.
        reason: String,
    },
    /// Restoring an entry failed.
    #[error("tar entry {}: restoring to {}: {source}", entry.display(), path.display())]
    Extract {
        /// The entry's path as stored in the tar.
        entry: PathBuf,
        /// Where it was being restored.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Write the tree under `root` to `out` as a deterministic tar stream.
///
/// Entries are written depth first with siblings sorted by name bytes, each
/// directory before its contents; paths are relative to `root` (which itself
/// gets no entry), directories end in `/`. Regular files keep their mode and
/// mtime (whole seconds) and are streamed, never loaded whole; directories
/// (empty ones too) keep mode and mtime; symlinks are stored with their
/// target verbatim and are not followed. Owners are 0 with empty names.
/// Hard-linked files are stored as ordinary files; sockets, fifos and device
/// nodes are skipped and counted. Long paths and link targets use GNU
/// long-name records.
pub fn write_dir_tar(root: &Path, out: &mut dyn Write) -> Result<DirTarStats, DirTarError> {
    let meta = fs::metadata(root).map_err(|source| DirTarError::Read {
        path: root.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(DirTarError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, out));
    let mut stats = DirTarStats::default();
    // Each frame: a directory (relative path) and its children still to write.
    let mut stack: Vec<(PathBuf, std::vec::IntoIter<OsString>)> =
        vec![(PathBuf::new(), sorted_children(root)?)];
    while let Some((dir, children)) = stack.last_mut() {
        let Some(name) = children.next() else {
            stack.pop();
            continue;
        };
        let rel = dir.join(&name);
        let full = root.join(&rel);
        let meta = fs::symlink_metadata(&full).map_err(|source| DirTarError::Read {
            path: full.clone(),
            source,
        })?;
        let ft = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(meta.mode() & 0o7777);
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        let write_err = |source| DirTarError::Write {
            path: rel.clone(),
            source,
        };
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            let mut tar_path = rel.clone().into_os_string();
            tar_path.push("/");
            append_entry(&mut builder, &mut header, Path::new(&tar_path), io::empty())
                .map_err(write_err)?;
            stats.dirs += 1;
            let children = sorted_children(&full)?;
            stack.push((rel, children));
        } else if ft.is_file() {
            let size = meta.len();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            let file = File::open(&full).map_err(|source| DirTarError::Read {
                path: full.clone(),
                source,
            })?;
            let mut reader = CountingReader {
                inner: file.take(size),
                count: 0,
                error: None,
            };
            let result = append_entry(&mut builder, &mut header, &rel, &mut reader);
            if let Some(source) = reader.error.take() {
                return Err(DirTarError::Read { path: full, source });
            }
            result.map_err(write_err)?;
            if reader.count != size {
                return Err(DirTarError::Changed {
                    path: full,
                    expected: size,
                    read: reader.count,
                });
            }
            stats.files += 1;
            stats.bytes += size;
        } else if ft.is_symlink() {
            let target = fs::read_link(&full).map_err(|source| DirTarError::Read {
                path: full.clone(),
                source,
            })?;
            append_symlink(
                &mut builder,
                &mut header,
                &rel,
                target.as_os_str().as_bytes(),
            )
            .map_err(write_err)?;
            stats.symlinks += 1;
        } else {
            stats.skipped += 1;
        }
    }
    let mut out = builder.into_inner().map_err(|source| DirTarError::Write {
        path: PathBuf::from("<end of archive>"),
        source,
    })?;
    out.flush().map_err(|source| DirTarError::Write {
        path: PathBuf::from("<end of archive>"),
        source,
    })?;
    Ok(stats)
}

/// The names in directory `full`, sorted by bytes.
fn sorted_children(full: &Path) -> Result<std::vec::IntoIter<OsString>, DirTarError> {
    let read_err = |source| DirTarError::Read {
        path: full.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(full).map_err(read_err)? {
        names.push(entry.map_err(read_err)?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names.into_iter())
}

/// Append a GNU long-name ('L') or long-link ('K') record carrying `value`
/// (NUL-terminated) for the entry that follows, as GNU tar writes it.
fn append_gnu_long<W: Write>(
    builder: &mut tar::Builder<W>,
    kind: tar::EntryType,
    value: &[u8],
) -> io::Result<()> {
    let mut long = tar::Header::new_gnu();
    long.set_entry_type(kind);
    if let Some(gnu) = long.as_gnu_mut() {
        gnu.name[..13].copy_from_slice(b"././@LongLink");
    }
    long.set_mode(0o644);
    long.set_uid(0);
    long.set_gid(0);
    long.set_mtime(0);
    long.set_size(value.len() as u64 + 1);
    long.set_cksum();
    builder.append(&long, value.chain(&[0u8][..]))
}

/// Append a symlink entry whose target is stored byte for byte (a GNU 'K'
/// record carries targets longer than the header field).
fn append_symlink<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    path: &Path,
    target: &[u8],
) -> io::Result<()> {
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    const LINKNAME_LEN: usize = 100;
    if target.len() > LINKNAME_LEN {
        append_gnu_long(builder, tar::EntryType::GNULongLink, target)?;
        header.set_link_name_literal(&target[..LINKNAME_LEN])?;
    } else {
        header.set_link_name_literal(target)?;
    }
    append_entry(builder, header, path, io::empty())
}

/// Append an entry at `path`, as `tar::Builder::append_data` does. For a
/// path longer than the header's name field, the tar crate writes a GNU
/// long-name record and puts the longest UTF-8 prefix of the first 100
/// bytes in the header, failing when that prefix is empty (a long path
/// whose first byte is not UTF-8, which Unix names may be). Such paths get
/// the same record written here, with the raw bytes in the header.
fn append_entry<W: Write, R: Read>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    path: &Path,
    data: R,
) -> io::Result<()> {
    const NAME_LEN: usize = 100;
    let bytes = path.as_os_str().as_bytes();
    let tar_can = bytes.len() <= NAME_LEN
        || std::str::from_utf8(&bytes[..NAME_LEN]).map_or_else(|e| e.valid_up_to() > 0, |_| true);
    if tar_can {
        return builder.append_data(header, path, data);
    }
    append_gnu_long(builder, tar::EntryType::GNULongName, bytes)?;
    header.as_old_mut().name.copy_from_slice(&bytes[..NAME_LEN]);
    header.set_cksum();
    builder.append(header, data)
}

/// A reader that counts bytes and keeps its own read error apart from the
/// tar writer's write errors.
struct CountingReader<R> {
    inner: R,
    count: u64,
    error: Option<io::Error>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.count += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kind = e.kind();
                self.error = Some(e);
                Err(io::Error::new(kind, "reading the file failed"))
            }
        }
    }
}

/// Restore the tar stream `input` into `dest` (created if missing; the caller
/// makes sure it is empty).
///
/// Regular files, directories and symlinks are restored with their
/// permission bits (setuid, setgid and sticky dropped) and mtimes; parent
/// directories missing from the stream are created. The stream is untrusted:
/// entries with absolute paths or `..` components, entries whose parent is a
/// symlink or not a directory, entries that would replace something already
/// there, hard links, device nodes, fifos, GNU sparse files, unknown entry
/// types and symlinks with an empty target or a NUL are refused with an
/// error naming the entry. Other symlinks are restored verbatim, wherever
/// they point, and never followed. Nothing is written outside `dest`. On
/// error, what was restored so far stays.
pub fn extract_tar(input: &mut dyn Read, dest: &Path) -> Result<ExtractStats, DirTarError> {
    extract_tar_over(input, dest, false)
}

/// As [`extract_tar`]; with `replace`, a file, symlink or other
/// non-directory already at an entry's path is removed first (unlinked, so
/// a symlink there is replaced, never followed), as `ferry unstash --force`
/// into a directory that holds an earlier restore needs. A directory in the
/// way of a non-directory entry is still refused, and nothing outside
/// `dest` is touched: parents are checked as always.
pub fn extract_tar_over(
    input: &mut dyn Read,
    dest: &Path,
    replace: bool,
) -> Result<ExtractStats, DirTarError> {
    fs::create_dir_all(dest).map_err(|source| DirTarError::Extract {
        entry: PathBuf::new(),
        path: dest.to_path_buf(),
        source,
    })?;
    let mut stats = ExtractStats::default();
    // Directories whose mode and mtime are applied last, deepest first, so
    // that restoring their contents neither changes the mtime nor is blocked
    // by a read-only mode.
    let mut dirs: Vec<(PathBuf, PathBuf, u32, u64)> = Vec::new();
    // Files and links this restore made (with `replace`, only others are
    // replaced).
    let mut created: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut archive = tar::Archive::new(input);
    let mut last: Option<PathBuf> = None;
    let entries = archive.entries().map_err(|source| DirTarError::Tar {
        after: None,
        source,
    })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| DirTarError::Tar {
            after: last.clone(),
            source,
        })?;
        let raw = entry.path_bytes().into_owned();
        let entry_path = PathBuf::from(OsStr::from_bytes(&raw));
        let refuse = |reason: &str| DirTarError::Refused {
            entry: entry_path.clone(),
            reason: reason.to_owned(),
        };
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(|_| refuse("malformed mode field"))? & MODE_MASK;
        let mtime = header
            .mtime()
            .map_err(|_| refuse("malformed mtime field"))?;

        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let parts = relative_parts(&entry_path).map_err(&refuse)?;
        let Some((name, parents)) = parts.split_last() else {
            if kind.is_dir() {
                continue; // "./": the destination itself
            }
            return Err(refuse("empty path"));
        };
        let path = ensure_parents(dest, parents, &entry_path)?;
        let path = path.join(name);
        let extract_err = |source| DirTarError::Extract {
            entry: entry_path.clone(),
            path: path.clone(),
            source,
        };
        let replaceable = matches!(
            kind,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Symlink
        );
        // Only what was there before this restore is replaced: a stream
        // never gets to replace its own entries (a link, then a file
        // through its name).
        if replace && replaceable && !created.contains(&path) {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {
                    return Err(refuse("a directory already exists at this path"))
                }
                Ok(_) => fs::remove_file(&path).map_err(extract_err)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(extract_err(e)),
            }
        }
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(refuse("a non-directory already exists at this path")),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir(&path).map_err(extract_err)?;
                    }
                    Err(e) => return Err(extract_err(e)),
                }
                dirs.push((entry_path.clone(), path.clone(), mode, mtime));
                stats.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            refuse("something already exists at this path")
                        } else {
                            extract_err(e)
                        }
                    })?;
                let n = io::copy(&mut entry, &mut file).map_err(extract_err)?;
                file.set_modified(system_time(mtime)).map_err(extract_err)?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(extract_err)?;
                stats.files += 1;
                if replace {
                    created.insert(path.clone());
                }
                stats.bytes += n;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse("symlink without a target"))?
                    .into_owned();
                check_symlink_target(&target, parents.len()).map_err(&refuse)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        refuse("something already exists at this path")
                    } else {
                        extract_err(e)
                    }
                })?;
                set_mtime_nofollow(&path, mtime).map_err(extract_err)?;
                stats.symlinks += 1;
                if replace {
                    created.insert(path.clone());
                }
            }
            tar::EntryType::Link => return Err(refuse("hard links are not supported")),
            // ferry never writes them, and the tar crate reads a hole as
            // zeros: a 2 KB entry could make us write gigabytes.
            tar::EntryType::GNUSparse => return Err(refuse("sparse files are not restored")),
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refuse("device nodes are not restored"))
            }
            tar::EntryType::Fifo => return Err(refuse("fifos are not restored")),
            other => {
                return Err(refuse(&format!(
                    "unsupported entry type {:?}",
                    other.as_byte() as char
                )))
            }
        }
        last = Some(entry_path);
    }
    for (entry, path, mode, mtime) in dirs.into_iter().rev() {
        let err = |source| DirTarError::Extract {
            entry: entry.clone(),
            path: path.clone(),
            source,
        };
        set_mtime_nofollow(&path, mtime).map_err(err)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(stats)
}

/// The normal components of a relative path; `.` components are dropped.
fn relative_parts(path: &Path) -> Result<Vec<&OsStr>, &'static str> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("path has a `..` component"),
            Component::RootDir | Component::Prefix(_) => return Err("path is absolute"),
        }
    }
    Ok(parts)
}

/// Make sure every parent of an entry exists under `dest` as a real
/// directory (creating missing ones), and return the innermost.
fn ensure_parents(dest: &Path, parents: &[&OsStr], entry: &Path) -> Result<PathBuf, DirTarError> {
    let mut dir = dest.to_path_buf();
    for part in parents {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(DirTarError::Refused {
                    entry: entry.to_path_buf(),
                    reason: format!("parent {} is a symlink", dir.display()),
                })
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(DirTarError::Refused {
                    entry: entry.to_path_buf(),
                    reason: format!("parent {} is not a directory", dir.display()),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(|source| DirTarError::Extract {
                    entry: entry.to_path_buf(),
                    path: dir.clone(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(DirTarError::Extract {
                    entry: entry.to_path_buf(),
                    path: dir,
                    source,
                })
            }
        }
    }
    Ok(dir)
}

/// Symlinks are restored as they were, pointing wherever they pointed
/// (build trees and virtualenvs hold absolute links); what keeps a restore
/// inside the destination is that no entry is ever written through a
/// symlink (every parent is checked) and nothing existing is replaced.
/// Only targets that cannot be a path are refused.
fn check_symlink_target(target: &[u8], _depth: usize) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("symlink target is empty");
    }
    if target.contains(&0) {
        return Err("symlink target contains a NUL byte");
    }
    Ok(())
}

fn system_time(mtime: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(mtime))
        .unwrap_or(UNIX_EPOCH)
}

/// Set the mtime of `path` itself (a symlink is not followed); the access
/// time is left alone.
fn set_mtime_nofollow(path: &Path, mtime: u64) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: libc::time_t::try_from(mtime).unwrap_or(libc::time_t::MAX),
            tv_nsec: 0,
        },
    ];
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the
    // call, and `times` points to the two `timespec` values utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn set_mtime(path: &Path, secs: u64) {
        set_mtime_nofollow(path, secs).unwrap();
    }

    /// A tree with nested and empty dirs, modes, a symlink, long and
    /// non-UTF-8 names, a fifo and a socket.
    fn sample_tree(root: &Path) {
        let long_dir = root.join("d".repeat(60)).join("e".repeat(60));
        fs::create_dir_all(&long_dir).unwrap();
        let long_file = long_dir.join("f".repeat(150));
        fs::write(&long_file, b"deep and long").unwrap();
        fs::create_dir_all(root.join("a/b/empty")).unwrap();
        fs::write(root.join("a/b/data.bin"), vec![7u8; 100_000]).unwrap();
        fs::write(root.join("a/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("a/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("a/readonly"), b"ro").unwrap();
        fs::set_permissions(root.join("a/readonly"), fs::Permissions::from_mode(0o444)).unwrap();
        fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1 name").unwrap();
        fs::write(root.join("empty-file"), b"").unwrap();
        symlink("b/data.bin", root.join("a/link")).unwrap();
        symlink(format!("../{}", "x/".repeat(60)), root.join("a/longlink")).unwrap();
        std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        let c = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        for p in [
            "a/b/data.bin",
            "a/run.sh",
            "a/readonly",
            "a/link",
            "a/longlink",
            "empty-file",
            "a/b/empty",
            "a/b",
            "a",
        ] {
            set_mtime(&root.join(p), 1_600_000_000);
        }
        set_mtime(&long_file, 1_234_567_890);
        set_mtime(&long_dir, 1_234_567_000);
    }

    fn tar_of(root: &Path) -> (Vec<u8>, DirTarStats) {
        let mut out = Vec::new();
        let stats = write_dir_tar(root, &mut out).unwrap();
        (out, stats)
    }

    /// Found by the `dir_restore` fuzz target: a tree whose long path
    /// starts with a byte that is not UTF-8 could be restored but not
    /// archived again (the tar crate's long-name fallback failed).
    #[test]
    fn long_paths_starting_with_non_utf8_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let dir = src
            .join(OsStr::from_bytes(b"\x9c\x96r"))
            .join("x".repeat(120));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("dest.txt"), b"data").unwrap();
        symlink("dest.txt", dir.join("link")).unwrap();
        let (tar, stats) = tar_of(&src);
        assert_eq!((stats.dirs, stats.files, stats.symlinks), (2, 1, 1));
        let dst = tmp.path().join("dst");
        extract_tar(&mut tar.as_slice(), &dst).unwrap();
        let back = dst
            .join(OsStr::from_bytes(b"\x9c\x96r"))
            .join("x".repeat(120));
        assert_eq!(fs::read(back.join("dest.txt")).unwrap(), b"data");
        assert_eq!(
            fs::read_link(back.join("link")).unwrap(),
            Path::new("dest.txt")
        );
        assert_eq!(tar_of(&dst).0, tar);
        // Long UTF-8 paths are written as before, by the tar crate.
        let utf8 = tmp.path().join("utf8");
        fs::create_dir_all(utf8.join("y".repeat(150))).unwrap();
        let (tar, _) = tar_of(&utf8);
        let mut expected = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        let m = fs::metadata(utf8.join("y".repeat(150))).unwrap();
        h.set_mode(m.mode() & 0o7777);
        h.set_mtime(m.mtime() as u64);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        expected
            .append_data(&mut h, format!("{}/", "y".repeat(150)), io::empty())
            .unwrap();
        assert_eq!(tar, expected.into_inner().unwrap());
    }

    #[test]
    fn round_trip_is_exact_and_deterministic() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        sample_tree(&src);
        let (tar1, stats) = tar_of(&src);
        let (tar2, _) = tar_of(&src);
        assert_eq!(tar1, tar2, "same tree, same bytes");
        assert_eq!(stats.skipped, 2, "socket and fifo");
        assert_eq!(stats.symlinks, 2);
        assert_eq!(stats.files, 6);
        assert_eq!(stats.dirs, 5);

        let dst = tmp.path().join("dst");
        let x = extract_tar(&mut tar1.as_slice(), &dst).unwrap();
        assert_eq!(
            (x.files, x.dirs, x.symlinks, x.bytes),
            (6, 5, 2, stats.bytes)
        );
        // Everything the tar records survived: archiving the copy gives the
        // same bytes.
        let (tar3, _) = tar_of(&dst);
        assert_eq!(tar1, tar3);

        let long = dst
            .join("d".repeat(60))
            .join("e".repeat(60))
            .join("f".repeat(150));
        assert_eq!(fs::read(&long).unwrap(), b"deep and long");
        assert_eq!(fs::metadata(&long).unwrap().mtime(), 1_234_567_890);
        let run = fs::metadata(dst.join("a/run.sh")).unwrap();
        assert_eq!(run.mode() & 0o777, 0o755);
        assert_eq!(
            fs::read_link(dst.join("a/link")).unwrap(),
            Path::new("b/data.bin")
        );
        assert!(dst.join("a/b/empty").is_dir());
        assert_eq!(
            fs::read(dst.join(OsStr::from_bytes(b"caf\xe9"))).unwrap(),
            b"latin-1 name"
        );
        assert_eq!(fs::metadata(dst.join("a")).unwrap().mtime(), 1_600_000_000);
    }

    #[test]
    fn root_must_be_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        fs::write(&f, b"x").unwrap();
        let err = write_dir_tar(&f, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, DirTarError::NotADirectory { .. }), "{err}");
    }

    /// A raw tar of one entry with an arbitrary name (the tar crate's own
    /// path setters refuse the malicious ones).
    fn raw_entry(
        b: &mut tar::Builder<Vec<u8>>,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name);
            g.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn malicious(entries: &[(&[u8], tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link) in entries {
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"pwned"
            } else {
                b""
            };
            raw_entry(&mut b, name, *kind, link, data);
        }
        b.into_inner().unwrap()
    }

    /// Extract into `<tmp>/box/dest`; return the error and check nothing
    /// appeared outside `dest`.
    fn refuse(tar: &[u8]) -> DirTarError {
        let tmp = tempfile::tempdir().unwrap();
        let boxdir = tmp.path().join("box");
        let dest = boxdir.join("dest");
        fs::create_dir_all(&dest).unwrap();
        let err = extract_tar(&mut &tar[..], &dest).unwrap_err();
        let names: Vec<_> = fs::read_dir(&boxdir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("dest")], "wrote outside dest");
        err
    }

    fn assert_refused(err: DirTarError, entry: &str) {
        match &err {
            DirTarError::Refused { entry: e, .. } => assert_eq!(e, Path::new(entry), "{err}"),
            other => panic!("expected refusal of {entry}, got {other}"),
        }
        assert!(err.to_string().contains(entry), "{err}");
    }

    #[test]
    fn refuses_parent_dir_components() {
        let tar = malicious(&[(b"../x", tar::EntryType::Regular, b"")]);
        assert_refused(refuse(&tar), "../x");
        let tar = malicious(&[(b"a/../../x", tar::EntryType::Regular, b"")]);
        assert_refused(refuse(&tar), "a/../../x");
    }

    #[test]
    fn refuses_absolute_paths() {
        let tar = malicious(&[(b"/x", tar::EntryType::Regular, b"")]);
        assert_refused(refuse(&tar), "/x");
    }

    #[test]
    fn refuses_writing_through_a_symlink() {
        // The link itself stays inside, so it is created; writing through it is not.
        let tar = malicious(&[
            (b"sub/", tar::EntryType::Directory, b""),
            (b"link", tar::EntryType::Symlink, b"sub"),
            (b"link/file", tar::EntryType::Regular, b""),
        ]);
        assert_refused(refuse(&tar), "link/file");
        let tar = malicious(&[
            (b"link", tar::EntryType::Symlink, b"."),
            (b"link", tar::EntryType::Regular, b""),
        ]);
        assert_refused(refuse(&tar), "link");
    }

    #[test]
    fn outward_symlinks_are_restored_but_never_written_through() {
        for target in [&b"/etc"[..], b"../..", b"a/../..", b"../../x"] {
            let tmp = tempfile::tempdir().unwrap();
            let dest = tmp.path().join("dest");
            let tar = malicious(&[(b"d/link", tar::EntryType::Symlink, target)]);
            extract_tar(&mut &tar[..], &dest).unwrap();
            assert_eq!(
                fs::read_link(dest.join("d/link"))
                    .unwrap()
                    .as_os_str()
                    .as_bytes(),
                target
            );
            // Writing through it is refused, and nothing appears outside.
            let tar = malicious(&[
                (b"d/link", tar::EntryType::Symlink, target),
                (b"d/link/owned", tar::EntryType::Regular, b"x"),
            ]);
            assert_refused(refuse(&tar), "d/link/owned");
            assert!(!Path::new("/etc/owned").exists());
        }
    }

    #[test]
    fn refuses_hard_links_devices_and_fifos() {
        for kind in [
            tar::EntryType::Link,
            tar::EntryType::Char,
            tar::EntryType::Block,
            tar::EntryType::Fifo,
        ] {
            let tar = malicious(&[(b"node", kind, b"/etc/passwd")]);
            assert_refused(refuse(&tar), "node");
        }
    }

    /// Seen while writing the `dir_restore` fuzz target (its file size
    /// limit turns the write into a crash): a GNU sparse entry with a 1 GiB
    /// hole made a 2 KB stream write 1 GiB of zeros (up to 8 GiB with octal
    /// fields, more with base-256 ones).
    #[test]
    fn refuses_sparse_files() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_path("sparse").unwrap();
        h.set_mode(0o644);
        h.set_size(512);
        let gnu = h.as_gnu_mut().unwrap();
        let hole = b"00004000000\0"; // 1 MiB, octal (the same with 8 GiB)
        gnu.sparse[0].offset.copy_from_slice(hole);
        gnu.sparse[0].numbytes.copy_from_slice(b"00000001000\0");
        gnu.realsize.copy_from_slice(b"00004001000\0");
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(&[b'A'; 512]);
        tar.extend_from_slice(&[0; 1024]);
        assert_refused(refuse(&tar), "sparse");
    }

    #[test]
    fn corrupt_stream_is_an_error() {
        let tar = malicious(&[(b"ok", tar::EntryType::Regular, b"")]);
        // One good entry, then garbage where the next header should be.
        let mut garbage = tar[..1024].to_vec();
        garbage.extend_from_slice(&[0x55; 512]);
        let tmp = tempfile::tempdir().unwrap();
        let err = extract_tar(&mut garbage.as_slice(), tmp.path()).unwrap_err();
        assert!(matches!(err, DirTarError::Tar { .. }), "{err}");
        assert!(err.to_string().contains("after entry ok"), "{err}");
    }

    #[test]
    fn check_symlink_target_rules() {
        assert!(check_symlink_target(b"x", 0).is_ok());
        assert!(check_symlink_target(b"./x/y", 0).is_ok());
        assert!(check_symlink_target(b"../x", 1).is_ok());
        assert!(check_symlink_target(b"/etc/hostname", 0).is_ok());
        assert!(check_symlink_target(b"", 3).is_err());
        assert!(check_symlink_target(b"a\0b", 3).is_err());
    }
}
