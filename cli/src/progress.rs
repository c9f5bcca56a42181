//! Progress for long commands: a bar on a terminal, periodic log lines in CI
//! logs (not a terminal), nothing with `-q`.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Progress reporter handed to the store library.
pub enum Reporter {
    Silent,
    Bar(ProgressBar),
    Log {
        what: String,
        started: Instant,
        done: AtomicU64,
        last: Mutex<Instant>,
    },
}

/// How often a plain log line is printed.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Reporter {
    pub fn new(quiet: bool, what: &str, total: Option<u64>) -> Reporter {
        if quiet {
            return Reporter::Silent;
        }
        if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            let template = if total.is_some() {
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "{spinner} {msg} {bytes} {bytes_per_sec}"
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            Reporter::Bar(bar)
        } else {
            Reporter::Log {
                what: what.to_string(),
                started: Instant::now(),
                done: AtomicU64::new(0),
                last: Mutex::new(Instant::now()),
            }
        }
    }

    pub fn finish(&self) {
        if let Reporter::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

impl store::repo::Progress for Reporter {
    fn advance(&self, bytes: u64) {
        match self {
            Reporter::Silent => {}
            Reporter::Bar(bar) => bar.inc(bytes),
            Reporter::Log {
                what,
                started,
                done,
                last,
            } => {
                let total = done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                let mut last = last.lock().expect("progress lock");
                if last.elapsed() >= LOG_EVERY {
                    *last = Instant::now();
                    let secs = started.elapsed().as_secs_f64();
                    eprintln!(
                        "ferry: {what}: {} in {:.0} s ({}/s)",
                        crate::output::bytes(total),
                        secs,
                        crate::output::bytes((total as f64 / secs.max(1e-9)) as u64)
                    );
                }
            }
        }
    }

    fn total(&self, bytes: u64) {
        if let Reporter::Bar(bar) = self {
            if bar.length().is_none() {
                bar.set_length(bytes);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
            }
        }
    }
}
