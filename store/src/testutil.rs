//! Helpers shared by the unit tests, and (with the `test-support`
//! feature) by the CLI's black-box tests. Not part of the API.

/// `len` pseudo-random bytes (xorshift), different for each seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every file below `dir`, recursively.
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Whether the file system of `dir` takes an `O_DIRECT` write and keeps
/// its page out of the page cache (tmpfs takes the flag and caches), found
/// without the code under test.
#[cfg(target_os = "linux")]
pub fn takes_o_direct(dir: &std::path::Path) -> bool {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("o_direct_probe");
    let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    else {
        return false;
    };
    let buf = vec![7u8; 8192];
    let at = buf.as_ptr().align_offset(4096);
    let ok = file.write_all(&buf[at..at + 4096]).is_ok() && !resident(&path)[0];
    drop(file);
    std::fs::remove_file(&path).unwrap();
    ok
}

/// Pages of the file at `path` in the page cache, per 4 KiB page.
#[cfg(target_os = "linux")]
pub fn resident(path: &std::path::Path) -> Vec<bool> {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: the test owns the file and nothing changes it while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let mut vec = vec![0u8; map.len().div_ceil(4096)];
    // SAFETY: `map` is a live mapping of `map.len()` bytes and `vec` has
    // one byte per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().map(|b| b & 1 == 1).collect()
}

/// Set the mtime of `path` itself (not following a symlink).
pub fn set_mtime(path: &std::path::Path, secs: i64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: `c` is a valid NUL-terminated path and `times` two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}
