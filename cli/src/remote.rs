//! `--remote`: stash = local stash, its new chunks uploaded as they are
//! packed, then push (what is left) and commit; unstash = a streaming restore
//! that fetches what the local store (the node's cache) lacks while it
//! writes, and keeps it there; ls = the server's list;
//! gc = a collection on the server's store (admin tokens).

use crate::commands::StoreArgs;
use crate::output::{bytes, rate, Output};
use crate::progress::Reporter;
use anyhow::{anyhow, Context};
use std::path::PathBuf;
use std::sync::Arc;
use store::name::Name;
use store::repo::{Entry, Store};
use transfer::client::{
    self, blocking, Options, PushReport, Remote, RemoteGcReport, TransferStats,
};
use transfer::tls::Trust;
use transfer::unstash::{Destination, RemoteUnstashReport};

/// Where the shared server is, and how to trust and authenticate to it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RemoteArgs {
    /// A ferry server, quic://HOST:PORT: stash stores locally and uploads
    /// the chunks the server lacks while it runs, then commits the name
    /// there; unstash fetches the chunks this node lacks while it writes;
    /// ls lists and gc collects the server's store.
    #[arg(long, env = client::REMOTE_ENV, value_name = "URL")]
    remote: Option<String>,
    /// File holding the token for --remote (never pass a token itself).
    /// Keep it private (chmod 600): one that other users may read works,
    /// with a warning.
    #[arg(long, env = transfer::auth::TOKEN_FILE_ENV, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The server's certificate (its cert.pem, or a CA) or its fingerprint
    /// sha256:HEX, as `ferry serve` prints it.
    #[arg(long, env = client::SERVER_CERT_ENV, value_name = "FILE|sha256:HEX")]
    server_cert: Option<String>,
    /// While the server is busy (all its connections, or all its token's,
    /// in use) keep trying this long before giving up (e.g. 90s, 15m, 1h;
    /// 0: give up at once) [default: 10m]
    #[arg(long, env = "FERRY_BUSY_WAIT", value_name = "DURATION",
          value_parser = store::gc::parse_duration)]
    busy_wait: Option<std::time::Duration>,
}

/// A server to talk to, and how to talk to it.
pub struct Target {
    /// Where it is, how to trust it, the token.
    pub remote: Remote,
    /// Retries, waits and the like, as the command line set them.
    pub opts: Options,
}

impl RemoteArgs {
    /// The remote, if `--remote` (or `$FERRY_REMOTE`) is set.
    pub fn resolve(&self) -> anyhow::Result<Option<Target>> {
        let Some(url) = self.remote.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .with_target(false)
            .try_init();
        let cert = self.server_cert.as_deref().ok_or_else(|| {
            anyhow!(
                "--remote {url} needs the server's certificate: --server-cert FILE (the \
                 server's cert.pem, or a CA) or --server-cert sha256:FINGERPRINT (printed by \
                 `ferry serve`), or FERRY_SERVER_CERT"
            )
        })?;
        let trust = Trust::from_arg(cert)?;
        let token = transfer::auth::client_token(self.token_file.as_deref())?;
        let file = transfer::auth::client_token_file(self.token_file.as_deref());
        if let Some(warning) = file.and_then(|f| transfer::auth::token_file_exposure(&f)) {
            eprintln!("ferry: warning: {warning}");
        }
        let mut opts = Options::default();
        if let Some(wait) = self.busy_wait {
            opts.busy_wait = wait;
        }
        Ok(Some(Target {
            remote: Remote::new(url, trust, token)?,
            opts,
        }))
    }
}

fn transfer_line(verb: &str, remote: &str, s: &TransferStats, sent: bool) -> String {
    let (n, b) = if sent {
        (s.chunks_sent, s.bytes_sent)
    } else {
        (s.chunks_received, s.bytes_received)
    };
    let there = if sent {
        "already there"
    } else {
        "already cached"
    };
    // Uploads that overlapped the stash make a rate over `seconds` (the
    // time after the stash) meaningless.
    let (early, timing) = if s.chunks_sent_early > 0 {
        (
            format!("; {} while stashing", s.chunks_sent_early),
            format!("done {:.1} s after the stash", s.seconds),
        )
    } else {
        (
            String::new(),
            format!(
                "in {:.1} s, {}",
                s.seconds,
                rate(b as f64 / s.seconds.max(1e-9))
            ),
        )
    };
    format!(
        "{verb} {remote}: {n} of {} chunks ({}{early}), {} {there}; {} on the wire {timing}{}\n",
        s.chunks,
        bytes(b),
        s.chunks_present,
        bytes(s.wire_bytes_sent + s.wire_bytes_received),
        if s.attempts > 1 {
            format!(" ({} attempts)", s.attempts)
        } else {
            String::new()
        }
    )
}

/// Starts uploading a stash's new chunks to `remote` while it runs.
pub fn start_upload(
    store: &Arc<Store>,
    name: &Name,
    target: &Target,
) -> anyhow::Result<blocking::EarlyUpload> {
    Ok(blocking::EarlyUpload::start(
        store.clone(),
        name,
        &target.remote,
        &target.opts,
    )?)
}

/// A stash's progress: drawn by the reporter; new chunks offered to the
/// early upload as soon as they are compressed (their bytes, within the
/// upload's budget) and again once their pack is durable (their ids).
pub struct StashProgress<'a> {
    pub reporter: Reporter,
    pub early: Option<&'a blocking::EarlyUpload>,
}

impl store::repo::Progress for StashProgress<'_> {
    fn advance(&self, bytes: u64) {
        self.reporter.advance(bytes)
    }
    fn total(&self, bytes: u64) {
        self.reporter.total(bytes)
    }
    fn stored(&self, new: &[store::ChunkId]) {
        if let Some(early) = self.early {
            early.offer(new);
        }
    }
    fn wants_compressed(&self) -> bool {
        self.early.is_some()
    }
    fn compressed(&self, new: &[store::repo::StoredChunk]) {
        if let Some(early) = self.early {
            early.offer_compressed(new);
        }
    }
}

/// After a local stash: finishes its upload, commits it on the server and
/// prints what moved.
pub fn push(early: blocking::EarlyUpload, name: &Name, out: &Output) -> anyhow::Result<()> {
    let progress = Arc::new(Reporter::new(
        out.quiet || out.json,
        &format!("push {name}"),
        None,
    ));
    let pushed = early.push(progress.clone());
    progress.finish();
    let pushed = pushed.map_err(|e| {
        // Re-running at once would be refused again.
        let when = if e.kind() == Some(transfer::proto::ErrorKind::NoSpace) {
            "once space is freed on the server"
        } else {
            "to resume"
        };
        anyhow::Error::new(e).context(format!(
            "{name} is stashed locally, but pushing it failed; \
             run the same command again {when}"
        ))
    })?;
    out.emit(&pushed, |p: &PushReport| {
        transfer_line("pushed to", &p.remote, &p.stats, true)
    })
}

/// A streaming remote unstash: writes `dest` while the chunks this node
/// lacks arrive, and keeps them in the local store (the node's cache).
pub fn unstash(
    store_args: &StoreArgs,
    name: &Name,
    target: &Target,
    dest: Destination,
    force: bool,
    out: &Output,
) -> anyhow::Result<()> {
    let store = Arc::new(store_args.open()?);
    let progress = Arc::new(Reporter::new(
        out.quiet || out.json,
        &format!("unstash {name}"),
        None,
    ));
    let opts = Options {
        // A signal winds the download down: what arrived stays.
        stop: crate::interrupt::winding_down(),
        ..target.opts.clone()
    };
    let remote = &target.remote;
    let done = blocking::unstash(
        store.clone(),
        name,
        dest,
        force,
        remote,
        &opts,
        progress.clone(),
    );
    progress.finish();
    let done = done.with_context(|| format!("cannot unstash {name} from {}", remote.display()))?;
    if let Some(e) = &done.cache_error {
        if !out.quiet {
            eprintln!("ferry: warning: the output is complete, but the node's store could not keep the fetched chunks: {e}");
        }
    } else {
        store_args.enforce_cache(&store, name, out)?;
    }
    out.emit(&done, |r: &RemoteUnstashReport| {
        transfer_line("fetched from", &r.remote, &r.transfer, false)
            + &crate::commands::unstash_line(&r.unstash)
    })
}

/// The server's names under `prefix` (those the token may read).
pub fn list(target: &Target, prefix: Option<&str>) -> anyhow::Result<Vec<Entry>> {
    Ok(blocking::list(&target.remote, prefix, &target.opts)?)
}

/// Removes names (or every name under a prefix) on the server.
pub fn remove(
    target: &Target,
    removal: &transfer::client::Removal,
) -> anyhow::Result<transfer::client::RemoteRemoveReport> {
    blocking::remove(&target.remote, removal, &target.opts)
        .with_context(|| format!("rm on {} failed", target.remote.display()))
}

/// Runs a collection with `opts` on the server's store (admin tokens only).
pub fn gc(target: &Target, opts: &store::gc::GcOptions) -> anyhow::Result<RemoteGcReport> {
    blocking::gc(&target.remote, opts, &target.opts)
        .with_context(|| format!("gc on {} failed", target.remote.display()))
}
