//! Where results go: human text, JSON, or nothing (`-q`).

use serde::Serialize;
use std::io::Write;

/// How the user asked to see results.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
    pub quiet: bool,
    /// Reports go to stderr (when stdout carries data, as in `unstash x -`).
    pub to_stderr: bool,
}

impl Output {
    pub fn new(json: bool, quiet: bool) -> Self {
        Output {
            json,
            quiet,
            to_stderr: false,
        }
    }

    /// Prints `report` as JSON, or `human(report)` as text; nothing if quiet
    /// (JSON is printed even when quiet: scripts asked for it).
    pub fn emit<T: Serialize>(
        &self,
        report: &T,
        human: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        let mut sink: Box<dyn Write> = if self.to_stderr {
            Box::new(std::io::stderr().lock())
        } else {
            Box::new(std::io::stdout().lock())
        };
        if self.json {
            serde_json::to_writer_pretty(&mut sink, report)?;
            writeln!(sink)?;
        } else if !self.quiet {
            write!(sink, "{}", human(report))?;
        }
        sink.flush()?;
        Ok(())
    }
}

/// Human-readable bytes, binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Bytes per second as decimal MB/s or GB/s (what throughput is quoted in).
pub fn rate(bytes_per_second: f64) -> String {
    if bytes_per_second >= 1e9 {
        format!("{:.2} GB/s", bytes_per_second / 1e9)
    } else {
        format!("{:.0} MB/s", bytes_per_second / 1e6)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::bytes(0), "0 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(3 << 30), "3.0 GiB");
        assert_eq!(super::rate(2.5e9), "2.50 GB/s");
        assert_eq!(super::rate(420e6), "420 MB/s");
    }
}
