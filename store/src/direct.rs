//! Writing large files past the page cache.
//!
//! A store writes packs once and reads them rarely: a node cache filled by
//! an unstash, a build's packs before they are pushed. Written through the
//! page cache, every such byte is copied into a freshly allocated page,
//! later written back by the kernel's flusher threads and then fsynced —
//! CPU taken from the job that runs next to the store, and memory taken
//! from the page cache that `docker load` is about to need. [`BlockWriter`]
//! gathers whole blocks in an aligned buffer and writes them with
//! `O_DIRECT`, so the device reads them from that buffer; the short tail of
//! the file and files that never fill one block go through the page cache
//! as usual. Where the file system refuses `O_DIRECT` (tmpfs on older
//! kernels, some network file systems) the writer silently stays buffered.

use std::fs::File;
use std::io::{self, Write};

/// Bytes gathered before one write; a multiple of every block size in use.
pub(crate) const BLOCK: usize = 1 << 20;
/// Alignment of the buffer, the file offset and the length of a direct write.
const ALIGN: usize = 4096;

/// Whether direct writes are wanted: yes unless `FERRY_DIRECT_IO=0`
/// (read once per process).
pub(crate) fn wanted() -> bool {
    use std::sync::OnceLock;
    static WANTED: OnceLock<bool> = OnceLock::new();
    *WANTED.get_or_init(|| std::env::var_os("FERRY_DIRECT_IO").is_none_or(|v| v != "0"))
}

/// A buffered writer that sends whole [`BLOCK`]s with `O_DIRECT`.
///
/// It must start at offset 0 of a new, empty file, so that every block
/// lands at an aligned offset. [`BlockWriter::finish`] (or `flush`) writes
/// the tail; what is written after that goes through the page cache.
pub(crate) struct BlockWriter {
    file: File,
    /// `BLOCK + ALIGN` bytes once the first byte arrives; the block being
    /// gathered is `buf[start..start + len]`.
    buf: Vec<u8>,
    start: usize,
    len: usize,
    /// `None` until the first block: then `Some(true)` if `O_DIRECT` is on,
    /// `Some(false)` if refused, not wanted, or the tail was written.
    direct: Option<bool>,
}

impl BlockWriter {
    /// Wraps a new, empty file opened for writing; `direct: false` keeps
    /// every write in the page cache.
    pub(crate) fn new(file: File, direct: bool) -> BlockWriter {
        BlockWriter {
            file,
            buf: Vec::new(),
            start: 0,
            len: 0,
            direct: if direct { None } else { Some(false) },
        }
    }

    /// The underlying file.
    pub(crate) fn get_ref(&self) -> &File {
        &self.file
    }

    /// Whether whole blocks bypass the page cache.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct == Some(true)
    }

    /// Writes the gathered block, turning `O_DIRECT` on before the first.
    fn write_block(&mut self) -> io::Result<()> {
        if self.direct.is_none() {
            self.direct = Some(set_direct(&self.file, true).is_ok());
        }
        let mut done = 0;
        while done < self.len {
            let rest = &self.buf[self.start + done..self.start + self.len];
            match (&self.file).write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The file system took the flag but refuses the write (or a
                // short write left the rest unaligned): go on buffered.
                Err(e) if self.direct == Some(true) && e.raw_os_error() == Some(libc::EINVAL) => {
                    set_direct(&self.file, false)?;
                    self.direct = Some(false);
                }
                Err(e) => return Err(e),
            }
        }
        self.len = 0;
        Ok(())
    }

    /// Writes everything gathered, the tail through the page cache, and
    /// leaves the file buffered. Call before the file is synced or read.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        if self.len == BLOCK {
            self.write_block()?;
        }
        if self.direct == Some(true) {
            set_direct(&self.file, false)?;
        }
        self.direct = Some(false);
        self.write_block()
    }
}

impl Write for BlockWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() {
            // Allocated zeroed (and so untouched) until written, and only
            // for files that get a first byte.
            self.buf = vec![0u8; BLOCK + ALIGN];
            self.start = self.buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        }
        if self.len == BLOCK {
            self.write_block()?;
        }
        let n = bytes.len().min(BLOCK - self.len);
        let at = self.start + self.len;
        self.buf[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        Ok(n)
    }

    /// Same as [`BlockWriter::finish`].
    fn flush(&mut self) -> io::Result<()> {
        self.finish()
    }
}

/// Turns `O_DIRECT` on or off for an open file.
#[cfg(target_os = "linux")]
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this File owns; F_GETFL/F_SETFL read and
    // set status flags and touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Elsewhere there is no `O_DIRECT`: always buffered.
#[cfg(not(target_os = "linux"))]
fn set_direct(_file: &File, on: bool) -> io::Result<()> {
    if on {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_os = "linux")]
    use crate::testutil::{resident, takes_o_direct};
    use std::fs::{self, OpenOptions};
    use std::path::Path;

    fn writer(path: &Path, direct: bool) -> BlockWriter {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        BlockWriter::new(file, direct)
    }

    fn data(len: usize) -> Vec<u8> {
        crate::testutil::pseudo_random(len, 1)
    }

    #[test]
    fn every_size_round_trips_in_odd_slices() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [true, false] {
            for len in [0, 1, 4095, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
                let path = dir.path().join(format!("{direct}-{len}"));
                let bytes = data(len);
                let mut w = writer(&path, direct);
                for piece in bytes.chunks(7777) {
                    w.write_all(piece).unwrap();
                }
                w.finish().unwrap();
                assert_eq!(
                    fs::read(&path).unwrap(),
                    bytes,
                    "direct {direct}, {len} bytes"
                );
            }
        }
    }

    #[test]
    fn writes_after_a_flush_continue_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes = data(2 * BLOCK + 5000);
        let mut w = writer(&path, true);
        w.write_all(&bytes[..BLOCK + 3]).unwrap();
        #[cfg(target_os = "linux")]
        if takes_o_direct(dir.path()) {
            assert!(w.is_direct(), "the first block went direct");
        }
        w.flush().unwrap();
        assert!(!w.is_direct());
        w.write_all(&bytes[BLOCK + 3..]).unwrap();
        w.finish().unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    /// A direct write the kernel refuses (here: at an unaligned file
    /// offset, as a file system without `O_DIRECT` support would refuse
    /// any) is written again through the page cache, and the file stays
    /// buffered.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_refused_direct_write_goes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        if !takes_o_direct(dir.path()) {
            eprintln!("the temp directory's file system refuses O_DIRECT; skipped");
            return;
        }
        let path = dir.path().join("f");
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.write_all(b"x").unwrap();
        let bytes = data(2 * BLOCK + 99);
        // The flag itself is taken here: what follows is the write refused.
        set_direct(&file, true).unwrap();
        set_direct(&file, false).unwrap();
        let mut w = BlockWriter::new(file, true);
        w.write_all(&bytes[..BLOCK + 1]).unwrap();
        assert_eq!(w.direct, Some(false), "the unaligned write was not refused");
        w.write_all(&bytes[BLOCK + 1..]).unwrap();
        w.finish().unwrap();
        let mut want = b"x".to_vec();
        want.extend_from_slice(&bytes);
        assert_eq!(fs::read(&path).unwrap(), want);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn whole_blocks_bypass_the_page_cache_and_the_tail_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let len = 4 * BLOCK + 100;
        let bytes = data(len);
        if !takes_o_direct(dir.path()) {
            eprintln!("the temp directory's file system refuses O_DIRECT; skipped");
            return;
        }
        let mut cached_pages = Vec::new();
        for direct in [true, false] {
            let path = dir.path().join(format!("{direct}"));
            let mut w = writer(&path, direct);
            w.write_all(&bytes).unwrap();
            assert_eq!(w.is_direct(), direct);
            w.finish().unwrap();
            let pages = resident(&path);
            cached_pages.push(pages[..4 * BLOCK / 4096].iter().filter(|&&r| r).count());
            assert!(
                pages[4 * BLOCK / 4096],
                "the tail is written through the page cache"
            );
            assert_eq!(fs::read(&path).unwrap(), bytes);
        }
        assert_eq!(
            cached_pages[0], 0,
            "direct blocks left pages in the page cache"
        );
        assert!(
            cached_pages[1] > 0,
            "buffered blocks should be in the page cache"
        );
    }
}
