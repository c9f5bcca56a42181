//! Differential tests against the `fastcdc` crate's `v2020` module (the
//! oracle), and the parallel and streaming paths against the sequential one.

use super::*;
use fastcdc::v2020 as oracle;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn oracle_level(n: Normalization) -> oracle::Normalization {
    match n {
        Normalization::Level0 => oracle::Normalization::Level0,
        Normalization::Level1 => oracle::Normalization::Level1,
        Normalization::Level2 => oracle::Normalization::Level2,
        Normalization::Level3 => oracle::Normalization::Level3,
    }
}

fn oracle_cuts(data: &[u8], p: ChunkerParams) -> Vec<usize> {
    oracle::FastCDC::with_level(data, p.min, p.avg, p.max, oracle_level(p.normalization))
        .map(|c| c.offset + c.length)
        .collect()
}

fn params(min: usize, avg: usize, max: usize, normalization: Normalization) -> ChunkerParams {
    ChunkerParams {
        min,
        avg,
        max,
        normalization,
    }
}

fn small() -> ChunkerParams {
    params(256, 1024, 4096, Normalization::Level1)
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// Real binaries from this machine, concatenated (mixed, structured data).
fn machine_binaries(limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for dir in [
        "/usr/bin",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if out.len() >= limit {
                return out;
            }
            if path.is_file() {
                if let Ok(bytes) = std::fs::read(&path) {
                    out.extend_from_slice(&bytes[..bytes.len().min(limit - out.len())]);
                }
            }
        }
    }
    assert!(
        out.len() > 1 << 20,
        "expected some binaries on this machine"
    );
    out
}

fn check_all_paths(data: &[u8], p: ChunkerParams) {
    let expected = oracle_cuts(data, p);
    for &kernel in Kernel::all() {
        let c = Chunker::with_kernel(p, kernel).unwrap();
        assert_eq!(
            c.cuts(data),
            expected,
            "{kernel:?} {p:?} len {}",
            data.len()
        );
        // Hashing each chunk as it is found, or all after chunking.
        for eager in [true, false] {
            let hashed = c.with_eager_hashing(eager).chunk_and_hash(data);
            let ends: Vec<usize> = hashed
                .iter()
                .map(|c| (c.offset + c.len as u64) as usize)
                .collect();
            assert_eq!(ends, expected, "{kernel:?} chunk_and_hash, eager {eager}");
            for ch in &hashed {
                let bytes = &data[ch.offset as usize..][..ch.len as usize];
                assert_eq!(ch.id, ChunkId::of(bytes), "{kernel:?} eager {eager}");
            }
        }
    }
}

#[test]
fn masks_match_the_oracle() {
    assert_eq!(gear::MASKS, oracle::MASKS);
}

#[test]
fn edge_lengths() {
    for p in [small(), ChunkerParams::default()] {
        let data = random_bytes(3 * p.max + 7, 1);
        for len in [
            0,
            1,
            2,
            p.min - 1,
            p.min,
            p.min + 1,
            p.avg,
            p.max - 1,
            p.max,
            p.max + 1,
            p.max + 2,
            2 * p.max + 1,
        ] {
            check_all_paths(&data[..len], p);
        }
    }
}

#[test]
fn random_data_default_params() {
    check_all_paths(&random_bytes(24 << 20, 2), ChunkerParams::default());
}

#[test]
fn real_binaries() {
    let data = machine_binaries(48 << 20);
    check_all_paths(&data, ChunkerParams::default());
    check_all_paths(&data[..8 << 20], small());
}

#[test]
fn zeros_and_periodic_data() {
    let p = ChunkerParams::default();
    check_all_paths(&vec![0u8; 5 << 20], p);
    // Long enough for the lanes kernel's four stretches to meet zeros.
    check_all_paths(&vec![0u8; (17 << 20) + 3], p);
    let period: Vec<u8> = (0..4099u32).map(|i| (i * 31 % 251) as u8).collect();
    let periodic: Vec<u8> = period.iter().copied().cycle().take(12 << 20).collect();
    check_all_paths(&periodic, p);
    check_all_paths(&periodic[..1 << 20], small());
    // Zeros with a little noise: cuts only at max most of the time.
    let mut sparse = vec![0u8; 3 << 20];
    for i in (0..sparse.len()).step_by(100_003) {
        sparse[i] = 1;
    }
    check_all_paths(&sparse, p);
}

#[test]
fn every_normalization_level_and_odd_sizes() {
    let data = random_bytes(4 << 20, 3);
    for level in [
        Normalization::Level0,
        Normalization::Level1,
        Normalization::Level2,
        Normalization::Level3,
    ] {
        check_all_paths(&data, params(8192, 32768, 131072, level));
        check_all_paths(&data[..1 << 20], params(64, 256, 1024, level));
    }
    // Averages that are not powers of two pick masks by rounding log2.
    check_all_paths(
        &data,
        params(10_000, 50_000, 300_000, Normalization::Level2),
    );
}

#[test]
fn invalid_params_are_refused() {
    for p in [
        params(63, 256, 1024, Normalization::Level1),
        params(65, 256, 1024, Normalization::Level1),
        params(2048, 1024, 4096, Normalization::Level1),
        params(256, 1024, 512, Normalization::Level1),
        params(256, 1024, 32 << 20, Normalization::Level1),
    ] {
        let err = Chunker::new(p).unwrap_err().to_string();
        assert!(err.contains("invalid chunk sizes"), "{err}");
    }
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn parallel_equals_sequential_for_any_thread_count() {
    let p = ChunkerParams::default();
    let mixed = {
        let mut v = machine_binaries(20 << 20);
        v.extend(vec![0u8; 9 << 20]);
        v.extend(random_bytes(11 << 20, 4));
        v
    };
    for &kernel in Kernel::all() {
        let c = Chunker::with_kernel(p, kernel).unwrap();
        // Hashed after chunking, on one thread: the eager, parallel path
        // must give the same chunks and ids.
        let expected = c.with_eager_hashing(false).chunk_and_hash(&mixed);
        for threads in [1, 2, 3, 8] {
            assert_eq!(
                in_pool(threads, || c.par_chunk_and_hash(&mixed)),
                expected,
                "{threads} threads"
            );
        }
    }
}

fn stream_chunks(c: Chunker, data: &[u8], capacity: usize, piece: usize) -> Vec<Chunk> {
    let mut s = StreamChunker::new(c, capacity);
    let mut out = Vec::new();
    let mut sink = |b: Batch<'_>| -> Result<(), ()> {
        for ch in b.chunks {
            assert_eq!(ChunkId::of(b.bytes(ch)), ch.id);
        }
        out.extend_from_slice(b.chunks);
        Ok(())
    };
    for part in data.chunks(piece.max(1)) {
        s.push(part, &mut sink).unwrap();
    }
    s.finish(&mut sink).unwrap();
    out
}

#[test]
fn streaming_equals_slice() {
    let p = small();
    let c = Chunker::new(p).unwrap();
    let data = machine_binaries(3 << 20);
    let expected = c.chunk_and_hash(&data);
    for (capacity, piece) in [
        (8192, 1),
        (8192, 4097),
        (10_000, 65536),
        (1 << 20, 333_333),
        (1 << 22, 1 << 22),
    ] {
        assert_eq!(
            stream_chunks(
                c,
                &data[..if piece == 1 { 200_000 } else { data.len() }],
                capacity,
                piece
            ),
            c.chunk_and_hash(&data[..if piece == 1 { 200_000 } else { data.len() }]),
            "capacity {capacity} piece {piece}"
        );
    }
    let mut reader = &data[..];
    let mut s = StreamChunker::new(c, 65536);
    let mut got = Vec::new();
    let n = s
        .chunk_reader(
            &mut reader,
            &mut |b: Batch<'_>| -> Result<(), std::io::Error> {
                got.extend_from_slice(b.chunks);
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(got, expected);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prop_matches_oracle(seed in any::<u64>(), len in 0usize..200_000, zero_run in 0usize..50_000,
                           level in 0u8..4, min_exp in 6u32..10) {
        let mut data = random_bytes(len, seed);
        let at = (seed as usize) % (len + 1);
        let end = (at + zero_run).min(len);
        data[at..end].fill(0);
        let min = 1usize << min_exp;
        let level = [Normalization::Level0, Normalization::Level1, Normalization::Level2, Normalization::Level3][level as usize];
        let p = params(min, min * 4, min * 16, level);
        check_all_paths(&data, p);
    }

    #[test]
    fn prop_parallel_and_stream_equal_sequential(seed in any::<u64>(), len in 0usize..3_000_000,
                                                  threads in 1usize..5, capacity in 8192usize..200_000,
                                                  piece in 1usize..100_000) {
        let p = small();
        let data = random_bytes(len, seed);
        let c = Chunker::new(p).unwrap();
        let expected = c.with_eager_hashing(false).chunk_and_hash(&data);
        prop_assert_eq!(&in_pool(threads, || c.par_chunk_and_hash(&data)), &expected);
        prop_assert_eq!(&stream_chunks(c, &data, capacity, piece), &expected);
    }
}
