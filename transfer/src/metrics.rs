//! Server metrics in the Prometheus text format, served over plain HTTP on
//! their own address by a tiny responder (`GET /metrics`).

use crate::auth::{TokenConnections, TokenTable};
use crate::proto::ErrorKind;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Request kinds timed separately.
pub const OPS: [&str; 8] = [
    "hello",
    "missing",
    "put_chunks",
    "commit",
    "get_manifest",
    "get_chunks",
    "list",
    "gc",
];

/// What started a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcTrigger {
    /// The `[gc] interval` schedule.
    Schedule,
    /// `ferry gc --remote` (an admin token).
    Remote,
}

impl GcTrigger {
    /// A short label (metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            GcTrigger::Schedule => "schedule",
            GcTrigger::Remote => "remote",
        }
    }

    const ALL: [GcTrigger; 2] = [GcTrigger::Schedule, GcTrigger::Remote];
}

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Counters of one server.
#[derive(Default)]
pub struct Metrics {
    /// Frame bytes received.
    pub bytes_in: AtomicU64,
    /// Frame bytes sent.
    pub bytes_out: AtomicU64,
    /// Chunks received in uploads (verified).
    pub chunks_received: AtomicU64,
    /// Of those, new to the store.
    pub chunks_stored: AtomicU64,
    /// Chunks sent in downloads.
    pub chunks_sent: AtomicU64,
    /// Chunks clients asked about that the store already held.
    pub dedup_hits: AtomicU64,
    /// Names committed.
    pub commits: AtomicU64,
    /// Connections accepted, ever.
    pub connections: AtomicU64,
    /// Authenticated sessions now open.
    pub active_sessions: AtomicI64,
    /// Connections open now (handshake done, authenticated or not).
    pub connections_open: AtomicI64,
    /// Handshakes in progress now.
    pub handshakes: AtomicI64,
    /// Connections open now, by token.
    pub token_connections: Arc<TokenConnections>,
    /// Peers asked to prove their address (QUIC Retry) before a handshake.
    pub address_validations: AtomicU64,
    /// Requests being received, handled or answered now.
    pub requests_in_flight: AtomicI64,
    /// Failed authentications (no or unknown token).
    pub auth_failures: AtomicU64,
    /// Connections refused because their address failed to authenticate
    /// too often.
    pub auth_refused: AtomicU64,
    /// Config reloads (SIGHUP) that replaced the tokens.
    pub config_reloads: AtomicU64,
    /// Config reloads refused (the file did not load or check).
    pub config_reload_failures: AtomicU64,
    /// Sessions closed because a reload removed their token or changed
    /// its scopes.
    pub sessions_revoked: AtomicU64,
    /// Collections finished, by trigger (schedule, remote).
    gc_runs: [AtomicU64; 2],
    /// Collections that failed, by trigger.
    gc_errors: [AtomicU64; 2],
    /// Bytes collections deleted.
    pub gc_bytes_freed: AtomicU64,
    /// Names retention removed.
    pub gc_names_removed: AtomicU64,
    /// 1 while a collection runs.
    pub gc_running: AtomicI64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    latency: [Histogram; OPS.len()],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Counters for a server with `tokens`.
    pub fn for_tokens(tokens: &TokenTable) -> Metrics {
        Metrics {
            token_connections: Arc::new(TokenConnections::new(tokens)),
            ..Metrics::default()
        }
    }

    /// Counts an error sent to (or a cut-off of) a peer.
    pub fn error(&self, kind: ErrorKind) {
        if let Some(i) = ErrorKind::ALL.iter().position(|k| *k == kind) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    /// Errors of `kind` so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        ErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.errors[i].load(Relaxed))
    }

    /// Counts a finished collection (`freed` bytes, `names` removed; a dry
    /// run frees nothing).
    pub fn gc_run(&self, trigger: GcTrigger, freed: u64, names: u64) {
        self.gc_runs[trigger as usize].fetch_add(1, Relaxed);
        self.gc_bytes_freed.fetch_add(freed, Relaxed);
        self.gc_names_removed.fetch_add(names, Relaxed);
    }

    /// Counts a failed collection.
    pub fn gc_error(&self, trigger: GcTrigger) {
        self.gc_errors[trigger as usize].fetch_add(1, Relaxed);
    }

    /// Collections finished so far, by trigger.
    pub fn gc_runs(&self, trigger: GcTrigger) -> u64 {
        self.gc_runs[trigger as usize].load(Relaxed)
    }

    /// Collections failed so far, by trigger.
    pub fn gc_errors(&self, trigger: GcTrigger) -> u64 {
        self.gc_errors[trigger as usize].load(Relaxed)
    }

    /// Records how long a request of kind `op` took.
    pub fn observe(&self, op: &str, took: Duration) {
        let Some(i) = OPS.iter().position(|o| *o == op) else {
            return;
        };
        let h = &self.latency[i];
        let secs = took.as_secs_f64();
        for (b, c) in BUCKETS.iter().zip(&h.counts) {
            if secs <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        h.count.fetch_add(1, Relaxed);
        h.sum_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let counters: [(&str, &str, u64); 14] = [
            (
                "ferry_bytes_received_total",
                "Frame bytes received from clients.",
                self.bytes_in.load(Relaxed),
            ),
            (
                "ferry_bytes_sent_total",
                "Frame bytes sent to clients.",
                self.bytes_out.load(Relaxed),
            ),
            (
                "ferry_chunks_received_total",
                "Chunks uploaded and verified.",
                self.chunks_received.load(Relaxed),
            ),
            (
                "ferry_chunks_stored_total",
                "Uploaded chunks that were new to the store.",
                self.chunks_stored.load(Relaxed),
            ),
            (
                "ferry_chunks_sent_total",
                "Chunks downloaded by clients.",
                self.chunks_sent.load(Relaxed),
            ),
            (
                "ferry_dedup_hits_total",
                "Chunks clients offered that the store already held.",
                self.dedup_hits.load(Relaxed),
            ),
            (
                "ferry_commits_total",
                "Names committed.",
                self.commits.load(Relaxed),
            ),
            (
                "ferry_connections_total",
                "Connections accepted.",
                self.connections.load(Relaxed),
            ),
            (
                "ferry_address_validations_total",
                "Peers asked to prove their address (QUIC Retry) before their handshake.",
                self.address_validations.load(Relaxed),
            ),
            (
                "ferry_auth_failures_total",
                "Failed authentications (no or unknown token).",
                self.auth_failures.load(Relaxed),
            ),
            (
                "ferry_auth_refused_total",
                "Connections refused: their address failed to authenticate too often.",
                self.auth_refused.load(Relaxed),
            ),
            (
                "ferry_config_reloads_total",
                "Config reloads (SIGHUP) that replaced the tokens.",
                self.config_reloads.load(Relaxed),
            ),
            (
                "ferry_config_reload_failures_total",
                "Config reloads refused: the file did not load or check; the tokens stayed.",
                self.config_reload_failures.load(Relaxed),
            ),
            (
                "ferry_sessions_revoked_total",
                "Sessions closed because a reload removed their token or changed its scopes.",
                self.sessions_revoked.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        for (name, help, v) in [
            (
                "ferry_active_sessions",
                "Authenticated sessions open now.",
                &self.active_sessions,
            ),
            (
                "ferry_connections_open",
                "Connections open now, authenticated or not.",
                &self.connections_open,
            ),
            (
                "ferry_handshakes_in_progress",
                "QUIC handshakes in progress now.",
                &self.handshakes,
            ),
            (
                "ferry_requests_in_flight",
                "Requests being received, handled or answered now.",
                &self.requests_in_flight,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP ferry_token_connections Connections open now, by token.\n\
             # TYPE ferry_token_connections gauge"
        );
        for (label, n) in self.token_connections.snapshot() {
            let label = label_value(&label);
            let _ = writeln!(s, "ferry_token_connections{{token=\"{label}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP ferry_gc_bytes_freed_total Bytes garbage collections deleted.\n\
             # TYPE ferry_gc_bytes_freed_total counter\nferry_gc_bytes_freed_total {}\n\
             # HELP ferry_gc_names_removed_total Names retention policies removed.\n\
             # TYPE ferry_gc_names_removed_total counter\nferry_gc_names_removed_total {}\n\
             # HELP ferry_gc_running Whether a garbage collection is running.\n\
             # TYPE ferry_gc_running gauge\nferry_gc_running {}",
            self.gc_bytes_freed.load(Relaxed),
            self.gc_names_removed.load(Relaxed),
            self.gc_running.load(Relaxed)
        );
        for (name, help, counts) in [
            (
                "ferry_gc_runs_total",
                "Garbage collections finished, by trigger.",
                &self.gc_runs,
            ),
            (
                "ferry_gc_errors_total",
                "Garbage collections that failed, by trigger.",
                &self.gc_errors,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (t, c) in GcTrigger::ALL.iter().zip(counts) {
                let _ = writeln!(
                    s,
                    "{name}{{trigger=\"{}\"}} {}",
                    t.as_str(),
                    c.load(Relaxed)
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP ferry_errors_total Errors sent to clients, by kind.\n# TYPE ferry_errors_total counter"
        );
        for (k, c) in ErrorKind::ALL.iter().zip(&self.errors) {
            let _ = writeln!(
                s,
                "ferry_errors_total{{kind=\"{}\"}} {}",
                k.as_str(),
                c.load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP ferry_request_duration_seconds Time to receive, handle and answer a request.\n\
             # TYPE ferry_request_duration_seconds histogram"
        );
        for (op, h) in OPS.iter().zip(&self.latency) {
            for (b, c) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    s,
                    "ferry_request_duration_seconds_bucket{{op=\"{op}\",le=\"{b}\"}} {}",
                    c.load(Relaxed)
                );
            }
            let n = h.count.load(Relaxed);
            let _ = writeln!(
                s,
                "ferry_request_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {n}\n\
                 ferry_request_duration_seconds_sum{{op=\"{op}\"}} {}\n\
                 ferry_request_duration_seconds_count{{op=\"{op}\"}} {n}",
                h.sum_micros.load(Relaxed) as f64 / 1e6
            );
        }
        s
    }
}

/// The store's disk, looked at on every scrape.
pub(crate) struct Disk {
    /// `limits.min_free_bytes`.
    pub reserve: u64,
    /// The store, asked for its free space (a file-system call: off the
    /// runtime).
    pub store: Arc<store::repo::Store>,
}

impl Disk {
    /// Gauges for alerting before uploads are refused: the space free and
    /// the reserve it is compared with.
    fn render(&self, available: Option<u64>) -> String {
        let mut s = String::new();
        if let Some(free) = available {
            let _ = writeln!(
                s,
                "# HELP ferry_store_available_bytes Bytes free on the store's disk.\n\
                 # TYPE ferry_store_available_bytes gauge\nferry_store_available_bytes {free}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP ferry_store_reserve_bytes Uploads are refused below this many bytes free \
             (limits.min_free_bytes).\n\
             # TYPE ferry_store_reserve_bytes gauge\nferry_store_reserve_bytes {}",
            self.reserve
        );
        s
    }
}

/// Answers `GET /metrics` on `listener` until the task is dropped. Every
/// other path is a 404; requests are bounded in size and time.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, disk: Arc<Disk>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let disk = disk.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        return true;
                    }
                }
                false
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if head.starts_with("GET ") && (path == "/metrics" || path == "/")
            {
                let probe = disk.clone();
                // Not known (or failed): the gauge is left out.
                let free = tokio::task::spawn_blocking(move || {
                    probe.store.available_bytes().ok().flatten()
                })
                .await
                .ok()
                .flatten();
                ("200 OK", metrics.render() + &disk.render(free))
            } else {
                ("404 Not Found", "not found: try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ =
                tokio::time::timeout(Duration::from_secs(5), sock.write_all(resp.as_bytes())).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// `text` as a Prometheus label value: backslash, quote and newline
/// escaped.
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.bytes_in.fetch_add(10, Relaxed);
        m.error(ErrorKind::Forbidden);
        m.observe("commit", Duration::from_millis(3));
        let t = m.render();
        assert!(t.contains("ferry_bytes_received_total 10\n"));
        assert!(t.contains("ferry_errors_total{kind=\"forbidden\"} 1\n"));
        assert!(t.contains("ferry_request_duration_seconds_bucket{op=\"commit\",le=\"0.005\"} 1\n"));
        assert!(
            t.contains("ferry_request_duration_seconds_bucket{op=\"commit\",le=\"0.0025\"} 0\n")
        );
        assert!(t.contains("ferry_request_duration_seconds_count{op=\"commit\"} 1\n"));
        assert_eq!(m.errors(ErrorKind::Forbidden), 1);
        m.gc_run(GcTrigger::Schedule, 4096, 2);
        m.gc_error(GcTrigger::Remote);
        let t = m.render();
        assert!(t.contains("ferry_gc_runs_total{trigger=\"schedule\"} 1\n"));
        assert!(t.contains("ferry_gc_runs_total{trigger=\"remote\"} 0\n"));
        assert!(t.contains("ferry_gc_errors_total{trigger=\"remote\"} 1\n"));
        assert!(t.contains("ferry_gc_bytes_freed_total 4096\n"));
        assert!(t.contains("ferry_gc_names_removed_total 2\n"));
        assert!(t.contains("ferry_gc_running 0\n"));
        m.auth_failures.fetch_add(3, Relaxed);
        m.requests_in_flight.fetch_add(2, Relaxed);
        let t = m.render();
        assert!(t.contains("ferry_auth_failures_total 3\n"));
        assert!(t.contains("ferry_auth_refused_total 0\n"));
        m.sessions_revoked.fetch_add(1, Relaxed);
        let t = m.render();
        assert!(t.contains("ferry_config_reloads_total 0\n"));
        assert!(t.contains(
            "# TYPE ferry_sessions_revoked_total counter\nferry_sessions_revoked_total 1\n"
        ));
        assert!(t.contains("# TYPE ferry_requests_in_flight gauge\nferry_requests_in_flight 2\n"));
        assert!(t.contains("ferry_connections_open 0\n"));
        assert!(t.contains("ferry_active_sessions 0\n"));
        assert_eq!(m.gc_runs(GcTrigger::Schedule), 1);
        m.handshakes.fetch_add(4, Relaxed);
        m.address_validations.fetch_add(5, Relaxed);
        let t = m.render();
        assert!(t.contains(
            "# TYPE ferry_handshakes_in_progress gauge\nferry_handshakes_in_progress 4\n"
        ));
        assert!(t.contains(
            "# TYPE ferry_address_validations_total counter\nferry_address_validations_total 5\n"
        ));
        assert!(
            t.contains("# TYPE ferry_token_connections gauge\n# HELP"),
            "{t}"
        );

        // Every configured token has a count, in use or not.
        let hash = |t: &str| crate::auth::Token::new(t).unwrap().hash();
        let tokens = TokenTable::new(vec![
            ("pr \"x\"".into(), hash("a-token"), Default::default()),
            ("main".into(), hash("b-token"), Default::default()),
        ]);
        let m = Metrics::for_tokens(&tokens);
        let grant = tokens.authenticate("a-token").unwrap();
        let _held = [
            m.token_connections.take(grant),
            m.token_connections.take(grant),
        ];
        let t = m.render();
        assert!(
            t.contains(
                "# TYPE ferry_token_connections gauge\n\
                 ferry_token_connections{token=\"main\"} 0\n\
                 ferry_token_connections{token=\"pr \\\"x\\\"\"} 2\n"
            ),
            "{t}"
        );
    }
}
