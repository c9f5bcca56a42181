//! The chunking-core benchmark behind `ferry bench`: the same code paths
//! that stash runs, timed on one buffer, so operators can compare nodes
//! (CPU, GPU, ARM) without cargo.

use crate::chunker::{Chunker, ChunkerParams, Kernel};
use crate::compress::{self, Codec};
use crate::ChunkId;
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Buffer size in bytes.
    pub size: usize,
    /// Timed runs per measurement; the fastest counts.
    pub runs: usize,
    /// zstd level for the compression rows.
    pub level: i32,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            size: 256 << 20,
            runs: 3,
            level: compress::DEFAULT_LEVEL,
        }
    }
}

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// What was measured.
    pub name: String,
    /// Threads used.
    pub threads: usize,
    /// Input bytes per second, in GB/s (10^9).
    pub gb_per_s: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Buffer size in bytes.
    pub size: usize,
    /// Where the buffer came from.
    pub data: String,
    /// CPU architecture.
    pub arch: &'static str,
    /// CPU features detected at run time that ferry's code paths use.
    pub cpu_features: Vec<&'static str>,
    /// The chunking kernel stash uses on this machine.
    pub kernel: Kernel,
    /// Threads in the pool.
    pub threads: usize,
    /// Chunks found in the buffer and their mean size.
    pub chunks: usize,
    /// Mean chunk size in bytes.
    pub mean_chunk: usize,
    /// Stored size over input size at `level`.
    pub compression_ratio: f64,
    /// zstd level used.
    pub level: i32,
    /// The measurements.
    pub rows: Vec<BenchRow>,
}

/// CPU features relevant to ferry's code paths, as detected at run time.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$( if std::is_x86_feature_detected!($f) { found.push($f); } )*};
        }
        probe!("sse4.1", "avx2", "bmi2", "avx512f", "avx512vl", "sha");
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            found.push("neon");
        }
    }
    found
}

/// Real, mixed binary data: the files under `/usr` (libraries, programs,
/// shared data) in a fixed order, up to `size` bytes; topped up with
/// pseudo-random bytes when the machine has fewer.
pub fn machine_corpus(size: usize) -> (Vec<u8>, String) {
    let mut out = Vec::with_capacity(size);
    let mut files = 0usize;
    for root in [
        "/usr/lib",
        "/usr/bin",
        "/usr/libexec",
        "/usr/share",
        "/usr/local",
    ] {
        walk_files(Path::new(root), &mut |path| {
            if out.len() >= size {
                return false;
            }
            if let Ok(bytes) = std::fs::read(path) {
                let take = bytes.len().min(size - out.len());
                out.extend_from_slice(&bytes[..take]);
                files += 1;
            }
            true
        });
    }
    let real = out.len();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes()[..(size - out.len()).min(8)]);
    }
    let what = if real == size {
        format!("{files} files under /usr")
    } else {
        format!(
            "{files} files under /usr ({real} bytes) + {} pseudo-random bytes",
            size - real
        )
    };
    (out, what)
}

fn walk_files(dir: &Path, f: &mut dyn FnMut(&Path) -> bool) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return true;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Ok(ft) = e.file_type() else { continue };
        let keep_going = if ft.is_dir() {
            walk_files(&e.path(), f)
        } else if ft.is_file() {
            f(&e.path())
        } else {
            true
        };
        if !keep_going {
            return false;
        }
    }
    true
}

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("at least one run")
}

/// Runs every measurement on `data`.
pub fn run_on(data: &[u8], data_desc: String, cfg: &BenchConfig) -> BenchReport {
    let threads = rayon::current_num_threads();
    let chunker = Chunker::new(ChunkerParams::default()).expect("default params are valid");
    let gbps = |d: Duration| data.len() as f64 / d.as_secs_f64() / 1e9;
    let mut rows = Vec::new();
    let mut row = |name: &str, threads: usize, d: Duration| {
        rows.push(BenchRow {
            name: name.to_string(),
            threads,
            gb_per_s: gbps(d),
        })
    };

    row(
        "memory read (the limit)",
        1,
        best_of(cfg.runs, || {
            let sum = data.chunks_exact(8).fold(0u64, |a, w| {
                a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")))
            });
            std::hint::black_box(sum);
        }),
    );
    row(
        &format!("chunk ({})", chunker.kernel().name()),
        1,
        best_of(cfg.runs, || {
            std::hint::black_box(chunker.cuts(data));
        }),
    );
    // The other kernels, for comparison with nodes that run them.
    for &kernel in Kernel::all().iter().rev() {
        if kernel == chunker.kernel() {
            continue;
        }
        let other = Chunker::with_kernel(ChunkerParams::default(), kernel).expect("valid");
        row(
            &format!("chunk ({})", kernel.name()),
            1,
            best_of(cfg.runs, || {
                std::hint::black_box(other.cuts(data));
            }),
        );
    }
    let cuts = chunker.cuts(data);
    let spans: Vec<(usize, usize)> = cuts
        .iter()
        .scan(0, |start, &end| {
            let s = *start;
            *start = end;
            Some((s, end))
        })
        .collect();
    row(
        "blake3 of the chunks",
        1,
        best_of(cfg.runs, || {
            for &(s, e) in &spans {
                std::hint::black_box(ChunkId::of(&data[s..e]));
            }
        }),
    );
    row(
        "chunk + blake3",
        1,
        best_of(cfg.runs, || {
            std::hint::black_box(chunker.chunk_and_hash(data));
        }),
    );
    // Each chunk hashed once all are found: its bytes come from memory
    // again, not from the cache (see `Chunker::with_eager_hashing`).
    let after = chunker.with_eager_hashing(false);
    row(
        "chunk, then blake3",
        1,
        best_of(cfg.runs, || {
            std::hint::black_box(after.chunk_and_hash(data));
        }),
    );
    row(
        "chunk + blake3",
        threads,
        best_of(cfg.runs, || {
            std::hint::black_box(chunker.par_chunk_and_hash(data));
        }),
    );

    // Compression rows work per chunk, as stash does.
    let compress_all = |spans: &[(usize, usize)]| -> Vec<(Codec, Vec<u8>)> {
        spans
            .par_iter()
            .map_init(Vec::new, |buf, &(s, e)| {
                let codec = compress::compress(&data[s..e], cfg.level, buf);
                (codec, buf.clone())
            })
            .collect()
    };
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("thread pool");
    row(
        &format!("zstd -{} compress", cfg.level),
        1,
        best_of(cfg.runs, || {
            std::hint::black_box(one.install(|| compress_all(&spans)));
        }),
    );
    row(
        &format!("zstd -{} compress", cfg.level),
        threads,
        best_of(cfg.runs, || {
            std::hint::black_box(compress_all(&spans));
        }),
    );
    let stored = compress_all(&spans);
    let stored_bytes: usize = stored.iter().map(|(_, b)| b.len()).sum();
    let decompress_all = || {
        stored
            .par_iter()
            .zip(&spans)
            .for_each_init(Vec::new, |buf, ((codec, bytes), &(s, e))| {
                compress::decompress_into(*codec, bytes, e - s, buf).expect("own output decodes");
            })
    };
    row(
        "zstd decompress",
        1,
        best_of(cfg.runs, || one.install(decompress_all)),
    );
    row(
        "zstd decompress",
        threads,
        best_of(cfg.runs, decompress_all),
    );

    BenchReport {
        size: data.len(),
        data: data_desc,
        arch: std::env::consts::ARCH,
        cpu_features: cpu_features(),
        kernel: chunker.kernel(),
        threads,
        chunks: cuts.len(),
        mean_chunk: data.len() / cuts.len().max(1),
        compression_ratio: stored_bytes as f64 / data.len().max(1) as f64,
        level: cfg.level,
        rows,
    }
}

/// Builds the corpus and runs every measurement.
pub fn run(cfg: &BenchConfig) -> BenchReport {
    let (data, desc) = machine_corpus(cfg.size);
    run_on(&data, desc, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_every_row_and_sane_numbers() {
        let cfg = BenchConfig {
            size: 4 << 20,
            runs: 1,
            level: 1,
        };
        let r = run(&cfg);
        assert_eq!(r.size, 4 << 20);
        assert!(r.chunks > 4, "{} chunks", r.chunks);
        assert!(r.rows.len() >= 8);
        for row in &r.rows {
            assert!(row.gb_per_s.is_finite() && row.gb_per_s > 0.0, "{row:?}");
        }
        assert!(r.compression_ratio > 0.0 && r.compression_ratio <= 1.0);
    }
}
