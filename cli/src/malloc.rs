//! glibc's allocator, tuned for ferry's large, short-lived buffers.
//!
//! By default glibc serves blocks above its dynamic mmap threshold (128 KiB
//! rising to 32 MiB) with fresh `mmap`s and gives freed heap tops back to
//! the kernel above twice that threshold, so each new multi-MiB frame,
//! chunk or decode buffer was faulted in page by page again: about 5 % of
//! a remote unstash's CPU in `perf`. Fixing the thresholds keeps such
//! buffers in the heap for reuse. Measured A/B (2026-11-30, 22:05–22:20
//! UTC, client and server both tuned, rounds alternating): a remote
//! unstash of v1 took 61,000 minor page faults instead of 138,000–155,000
//! and 3.88–3.99 s instead of 3.97–4.47 s (the same thresholds set
//! through `GLIBC_TUNABLES`: 3.62–3.90 s against 3.81–3.96 s); the
//! server's CPU for a remote cold stash 3.59 / 3.62 s against 3.78 /
//! 3.81 s. Peak RSS grows by 12–54 MiB (BENCHMARKS.md, remote memory).

/// Blocks below this size come from the heap, not from `mmap`: every
/// chunk (at most 16 MiB) and every frame up to the default
/// `max_frame_bytes`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory kept at the top of a heap before it is returned: 32, 64 and
/// 256 MiB gave the same page faults and times (2026-11-30, 22:20 UTC);
/// the smaller keeps less memory.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Sets the thresholds; `false` if glibc refused one. Elsewhere (musl,
/// other systems) there is nothing to tune.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters (glibc serialises
        // it against the arenas); the values are in glibc's ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        true
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Bytes glibc holds in `mmap`ed blocks.
    fn mapped() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        unsafe { libc::mallinfo2() }.hblkhd
    }

    /// Once tuned, buffers of several MiB come from a heap and are reused:
    /// the bytes glibc holds in `mmap`ed blocks do not grow by their size.
    /// By default each of them is a fresh mapping. (On a thread of its
    /// own: the test harness's threads may share the main arena, which
    /// falls back to `mmap` when the program's break cannot grow.)
    #[test]
    fn large_buffers_come_from_the_heap() {
        assert!(super::tune());
        let grown = std::thread::spawn(|| {
            (0..3)
                .map(|_| {
                    let before = mapped();
                    let buf = std::hint::black_box(vec![7u8; 16 << 20]);
                    let during = mapped();
                    assert_eq!(buf[buf.len() - 1], 7);
                    during.saturating_sub(before)
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        assert!(
            grown.iter().all(|&g| g < 16 << 20),
            "16 MiB buffers were mapped: mmaped bytes grew by {grown:?}"
        );
    }
}
