//! `ferry bench`: the chunking core's benchmark on this machine.

use crate::output::Output;
use std::fmt::Write;
use store::bench::{BenchConfig, BenchReport};

pub const LONG_ABOUT: &str = "\
Benchmark the chunking core on this machine: GB/s for chunking, BLAKE3,
chunk+hash (one thread and all), and zstd compression and decompression at
the default level, on a buffer of real files from /usr. It runs the same code
paths as `ferry stash`, so operators can compare CPU, GPU and ARM nodes
without cargo.

Every chunking kernel this CPU runs gets a row: `lanes-asm` (x86-64
assembly, the default there), `lanes` (portable, what other CPUs such as ARM
run) and `reference` (byte at a time). All cut at the same points;
FERRY_CHUNKER_KERNEL=reference|lanes|lanes-asm makes ferry use another one.

`chunk + blake3` is what stash does: each chunk is hashed as soon as it is
found, while its bytes are still in the CPU's cache. `chunk, then blake3`
hashes them all after chunking, from memory again, for comparison.

Examples:
  ferry bench                     # 256 MiB buffer, human table
  ferry bench --size 1GiB --json  # for scripts
  ferry bench --threads 1         # one core only";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Buffer size: bytes, or with a unit (KiB, MiB, GiB, KB, MB, GB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    size: u64,

    /// Timed runs per measurement; the fastest counts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,

    /// Threads for the multi-threaded rows (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
}

/// Parses `123`, `64KiB`, `1.5GB`, `256M` (binary for bare K/M/G).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number with an optional unit, e.g. 512MiB")
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
            "invalid size unit {other:?} in {text:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
        ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes as u64)
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<()> {
    const MIN: u64 = 1 << 20;
    const MAX: u64 = 64 << 30;
    anyhow::ensure!(
        (MIN..=MAX).contains(&args.size),
        "--size must be between 1 MiB and 64 GiB (got {} bytes)",
        args.size
    );
    let cfg = BenchConfig {
        size: args.size as usize,
        runs: args.runs as usize,
        ..BenchConfig::default()
    };
    let report = match args.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build()?
            .install(|| store::bench::run(&cfg)),
        None => store::bench::run(&cfg),
    };
    out.emit(&report, render)
}

fn render(r: &BenchReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "ferry bench: {} MiB of {}", r.size >> 20, r.data);
    let _ = writeln!(
        s,
        "cpu: {} [{}], kernel {}, {} threads; {} chunks, mean {} KiB; zstd -{} stores {:.1}%",
        r.arch,
        r.cpu_features.join(" "),
        r.kernel.name(),
        r.threads,
        r.chunks,
        r.mean_chunk >> 10,
        r.level,
        r.compression_ratio * 100.0
    );
    let _ = writeln!(s, "{:<28} {:>7} {:>9}", "measurement", "threads", "GB/s");
    for row in &r.rows {
        let _ = writeln!(
            s,
            "{:<28} {:>7} {:>9.2}",
            row.name, row.threads, row.gb_per_s
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("-1").is_err());
    }
}
