//! Criterion benchmarks of the chunking core on 1 GiB of real, mixed binary
//! data (the files under /usr), ferry and the `fastcdc` crate (the oracle)
//! in the same run. After the measurements it prints a summary with the
//! ratios that BENCHMARKS.md records.
//!
//! `cargo bench -p ferry-store --bench chunking` (FERRY_BENCH_MIB=256 for a
//! smaller buffer).

use criterion::{Criterion, Throughput};
use std::time::Duration;
use store::chunker::{Chunker, ChunkerParams, Kernel};

fn main() {
    let mib: usize = std::env::var("FERRY_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let (data, desc) = store::bench::machine_corpus(mib << 20);
    println!("data: {desc}, {} bytes", data.len());
    let p = ChunkerParams::default();
    // The kernel stash uses on this machine (the x86-64 assembly loop here),
    // and the portable one that ARM nodes run.
    let fastest = Chunker::new(p).unwrap();
    // Hashing all chunks after chunking, as before eager hashing: the
    // comparison shows what reading each chunk while it is cached gains.
    let after = fastest.with_eager_hashing(false);
    let portable = Chunker::with_kernel(p, Kernel::Lanes).unwrap();
    println!("fastest kernel: {}", fastest.kernel().name());
    let reference = Chunker::with_kernel(p, Kernel::Reference).unwrap();
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let (one, two) = (pool(1), pool(2));

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("memory_read", |b| {
        b.iter(|| {
            data.chunks_exact(8).fold(0u64, |a, w| {
                a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()))
            })
        })
    });
    g.bench_function("oracle_fastcdc_v2020", |b| {
        b.iter(|| fastcdc::v2020::FastCDC::new(&data, p.min, p.avg, p.max).count())
    });
    g.bench_function("ferry_chunk_fastest", |b| {
        b.iter(|| fastest.cuts(&data).len())
    });
    g.bench_function("ferry_chunk_lanes_portable", |b| {
        b.iter(|| portable.cuts(&data).len())
    });
    g.bench_function("ferry_chunk_reference", |b| {
        b.iter(|| reference.cuts(&data).len())
    });
    g.bench_function("blake3_64k", |b| {
        b.iter(|| {
            data.chunks(64 << 10)
                .map(|c| blake3::hash(c).as_bytes()[0])
                .fold(0u8, |a, x| a ^ x)
        })
    });
    g.bench_function("ferry_chunk_hash_1t", |b| {
        b.iter(|| one.install(|| fastest.par_chunk_and_hash(&data).len()))
    });
    g.bench_function("ferry_chunk_then_hash_1t", |b| {
        b.iter(|| one.install(|| after.par_chunk_and_hash(&data).len()))
    });
    g.bench_function("ferry_chunk_hash_2t", |b| {
        b.iter(|| two.install(|| fastest.par_chunk_and_hash(&data).len()))
    });
    g.finish();
    c.final_summary();
    summary(data.len());
}

/// Reads criterion's estimates back and prints GB/s and the ratios.
fn summary(bytes: usize) {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
    let gbps = |name: &str| -> Option<f64> {
        let path = format!("{dir}/criterion/core/{name}/new/estimates.json");
        let text = std::fs::read_to_string(path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let ns = v["median"]["point_estimate"].as_f64()?;
        Some(bytes as f64 / ns)
    };
    println!("\nsummary (median, GB/s = 10^9 bytes/s):");
    let names = [
        "memory_read",
        "oracle_fastcdc_v2020",
        "ferry_chunk_fastest",
        "ferry_chunk_lanes_portable",
        "ferry_chunk_reference",
        "blake3_64k",
        "ferry_chunk_hash_1t",
        "ferry_chunk_then_hash_1t",
        "ferry_chunk_hash_2t",
    ];
    for n in names {
        if let Some(g) = gbps(n) {
            println!("  {n:<28} {g:>7.2} GB/s");
        }
    }
    if let Some(o) = gbps("oracle_fastcdc_v2020") {
        if let Some(f) = gbps("ferry_chunk_fastest") {
            println!("  chunking, ferry fastest / fastcdc v2020:  {:.2}x", f / o);
        }
        if let Some(l) = gbps("ferry_chunk_lanes_portable") {
            println!("  chunking, ferry portable / fastcdc v2020: {:.2}x", l / o);
        }
    }
    if let (Some(e), Some(a)) = (
        gbps("ferry_chunk_hash_1t"),
        gbps("ferry_chunk_then_hash_1t"),
    ) {
        println!("  chunk+hash 1 thread, eager / after:       {:.2}x", e / a);
    }
    if let (Some(t2), Some(t1)) = (gbps("ferry_chunk_hash_2t"), gbps("ferry_chunk_hash_1t")) {
        println!(
            "  chunk+hash, 2 threads / 1 thread:         {:.2}x",
            t2 / t1
        );
    }
}
