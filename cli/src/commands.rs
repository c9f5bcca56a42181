//! The store commands: parse → call the store library → render.

use crate::output::{bytes, rate, Output};
use crate::progress::Reporter;
use anyhow::{bail, Context};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use store::name::Name;
use store::repo::{Entry, FsckReport, Inspection, Source, Store, Target, UnstashReport, Usage};

/// Where the store lives: `--store`, else `$FERRY_STORE`, else the user's
/// cache directory.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// The store directory [default: $FERRY_STORE, else ~/.cache/ferry].
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,

    /// Size limit of this (node-local) store: after each stash and unstash,
    /// the least recently used names are evicted until it fits (e.g. 200GiB).
    #[arg(long, global = true, env = "FERRY_CACHE_SIZE", value_name = "SIZE", value_parser = crate::bench::parse_size)]
    cache_size: Option<u64>,
}

impl StoreArgs {
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.store {
            return Ok(p.clone());
        }
        if let Some(p) = std::env::var_os("FERRY_STORE").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        let cache = dirs::cache_dir().context(
            "no --store given, FERRY_STORE is not set, and this user has no cache directory",
        )?;
        Ok(cache.join("ferry"))
    }

    pub fn open(&self) -> anyhow::Result<Store> {
        let path = self.path()?;
        Ok(Store::open(&path)?)
    }

    /// Applies `--cache-size` after a command that used `name`.
    pub fn enforce_cache(&self, store: &Store, name: &Name, out: &Output) -> anyhow::Result<()> {
        let Some(limit) = self.cache_size else {
            return Ok(());
        };
        let r = store::cache::enforce_limit(store, limit, Some(name))?;
        if !out.quiet && !out.json && (!r.evicted.is_empty() || !r.fits) {
            eprintln!(
                "ferry: cache {} of {}: evicted {}{}",
                bytes(r.after),
                bytes(limit),
                if r.evicted.is_empty() {
                    "nothing".to_string()
                } else {
                    r.evicted.join(", ")
                },
                if r.fits {
                    ""
                } else {
                    " (still over: other ferry commands hold data; the next command retries)"
                }
            );
        }
        Ok(())
    }
}

fn parse_name(text: &str) -> anyhow::Result<Name> {
    Ok(Name::parse(text)?)
}

pub const STASH_ABOUT: &str = "\
Stash a file, a directory or standard input under NAME.

The input is split into content-defined chunks; only chunks the store does not
already hold are compressed and written. Docker archives (`docker save`, both
the legacy and the Docker 25+ layout) and OCI layout tars are recognised: tar
headers and file contents are chunked apart, so a rebuilt image whose files
did not change costs only its headers. Replay is always byte-exact.

NAME is a path with a trust scope in front, e.g. main/ci_gpu or pr/1234/ci_gpu.
Stashing to an existing NAME replaces it atomically.

Examples:
  docker save ci-gpu:latest | ferry stash main/ci_gpu -
  ferry stash build/5678/tvm_lib build/lib/
  ferry stash --store /mnt/ferry pr/42/image image.tar";

#[derive(clap::Args, Debug)]
pub struct StashArgs {
    /// Name to stash under (e.g. main/ci_gpu).
    name: String,
    /// A file, a directory, or - for standard input.
    path: PathBuf,
    /// zstd level for new chunks: higher stores less and takes longer;
    /// negative levels are faster still.
    #[arg(long, default_value_t = store::compress::DEFAULT_LEVEL, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-7..=19))]
    level: i32,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

pub fn stash(store_args: &StoreArgs, args: StashArgs, out: &Output) -> anyhow::Result<()> {
    let name = parse_name(&args.name)?;
    let remote = args.remote.resolve()?;
    let source = if args.path.as_os_str() == "-" {
        if std::io::stdin().is_terminal() {
            bail!("standard input is a terminal: pipe the data in (e.g. docker save img | ferry stash {name} -)");
        }
        Source::Reader(Box::new(std::io::stdin()))
    } else {
        let meta = std::fs::metadata(&args.path)
            .with_context(|| format!("cannot stash {}", args.path.display()))?;
        if meta.is_dir() {
            Source::Directory(args.path.clone())
        } else {
            Source::File(args.path.clone())
        }
    };
    let total = match &source {
        Source::File(p) => std::fs::metadata(p).ok().map(|m| m.len()),
        _ => None,
    };
    let store = Store::open_with(
        store_args.path()?,
        store::repo::StoreOptions {
            level: args.level,
            ..Default::default()
        },
    )?;
    let store = std::sync::Arc::new(store);
    // With a server, new chunks go up while the stash still runs.
    let early = match &remote {
        Some(r) => Some(crate::remote::start_upload(&store, &name, r)?),
        None => None,
    };
    let progress = crate::remote::StashProgress {
        reporter: Reporter::new(out.quiet || out.json, &format!("stash {name}"), total),
        early: early.as_ref(),
    };
    let report = store.stash(&name, source, &progress);
    progress.reporter.finish();
    drop(progress);
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            // Let the server free the early upload's connection now.
            if let Some(early) = early {
                early.abandon();
            }
            return Err(e.into());
        }
    };
    store_args.enforce_cache(&store, &name, out)?;
    out.emit(&report, |r| {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "stashed {} ({}, {}, {} chunks) in {:.1} s, {}",
            r.name,
            r.kind.as_str(),
            bytes(r.size),
            r.chunks,
            r.seconds,
            rate(r.bytes_per_second)
        );
        let _ = writeln!(
            s,
            "  new:    {} chunks, {} -> {} stored",
            r.new_chunks,
            bytes(r.new_bytes),
            bytes(r.stored_bytes)
        );
        let _ = writeln!(
            s,
            "  reused: {} chunks, {}",
            r.reused_chunks,
            bytes(r.reused_bytes)
        );
        s
    })?;
    match early {
        Some(early) => crate::remote::push(early, &name, out),
        None => Ok(()),
    }
}

pub const UNSTASH_ABOUT: &str = "\
Restore what was stashed under NAME, byte for byte.

To - (standard output) for piping into `docker load`; to a file, written under
a temporary name and renamed when complete (with --remote, each chunk is
written at its offset as it arrives); or, for directory stashes, into a
directory (created; an existing one must be empty). Every chunk is checked
against its BLAKE3 id before its bytes are written: a damaged store makes the
command fail, never emit wrong bytes. Existing targets are refused unless
--force.

The temporary file or directory is hidden beside the target
(.ferry-unstash-*). Interrupted by Ctrl-C, SIGTERM (a cancelled CI job) or
SIGHUP, the command removes it, then ends by that signal (a shell reports
128 + its number); with --remote it first keeps the chunks that arrived, so
that running it again fetches none of them (at most 5 s; a second signal
ends it at once). What a SIGKILL leaves is removed by the next unstash
into the same directory, once it is a minute old and no running unstash
holds its lock.

Examples:
  ferry unstash main/ci_gpu - | docker load
  ferry unstash main/ci_gpu image.tar
  ferry unstash build/5678/tvm_lib build/lib/";

#[derive(clap::Args, Debug)]
pub struct UnstashArgs {
    /// The stash to restore.
    name: String,
    /// A file, a directory (for directory stashes), or - for standard output.
    path: PathBuf,
    /// Overwrite an existing file, or restore into a non-empty directory.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

pub fn unstash(store_args: &StoreArgs, args: UnstashArgs, out: &Output) -> anyhow::Result<()> {
    let name = parse_name(&args.name)?;
    let to_stdout = args.path.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() && !args.force {
        bail!("standard output is a terminal: pipe it (e.g. ferry unstash {name} - | docker load), or use --force");
    }
    let mut out = *out;
    // Standard output carries the data.
    out.to_stderr |= to_stdout;
    let stdout = || {
        // Small buffer: it gathers tar headers; whole chunks bypass it.
        Box::new(std::io::BufWriter::with_capacity(
            64 << 10,
            std::io::stdout(),
        ))
    };
    if let Some(remote) = args.remote.resolve()? {
        let dest = if to_stdout {
            transfer::unstash::Destination::Writer(stdout())
        } else {
            transfer::unstash::Destination::Path(args.path.clone())
        };
        return crate::remote::unstash(store_args, &name, &remote, dest, args.force, &out);
    }
    let store = store_args.open()?;
    let (_, manifest) = store.manifest(&name)?;
    let kind = manifest.header.kind;
    let target = if to_stdout {
        // A directory stash streams as its tar.
        Target::Writer(stdout())
    } else if kind == store::manifest::StashKind::Directory {
        Target::Directory(args.path.clone())
    } else {
        Target::File(args.path.clone())
    };
    let progress = Reporter::new(
        out.quiet || out.json,
        &format!("unstash {name}"),
        Some(manifest.header.size),
    );
    let report = store.unstash(&name, target, args.force, &progress);
    progress.finish();
    let report = report?;
    store_args.enforce_cache(&store, &name, &out)?;
    out.emit(&report, unstash_line)
}

/// The summary line of an unstash.
pub fn unstash_line(r: &UnstashReport) -> String {
    format!(
        "unstashed {} ({}, {}, {} chunks) in {:.1} s, {}\n",
        r.name,
        r.kind.as_str(),
        bytes(r.size),
        r.chunks,
        r.seconds,
        rate(r.bytes_per_second)
    )
}

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    /// Only names under this prefix (whole parts: `main` lists main/x, not mainline/x).
    prefix: Option<String>,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

pub fn ls(store: &StoreArgs, args: LsArgs, out: &Output) -> anyhow::Result<()> {
    let entries = match args.remote.resolve()? {
        Some(remote) => crate::remote::list(&remote, args.prefix.as_deref())?,
        None => store.open()?.list(args.prefix.as_deref())?,
    };
    out.emit(&entries, |entries: &Vec<Entry>| {
        let mut s = String::new();
        if entries.is_empty() {
            let _ = writeln!(s, "no stashes");
            return s;
        }
        let _ = writeln!(
            s,
            "{:<40} {:<18} {:>10}  {:<20}",
            "NAME", "KIND", "SIZE", "CREATED (UTC)"
        );
        for e in entries {
            match &e.header {
                Some(h) => {
                    let _ = writeln!(
                        s,
                        "{:<40} {:<18} {:>10}  {:<20}",
                        e.name,
                        h.kind.as_str(),
                        bytes(h.size),
                        utc(e.created)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "{:<40} {:<18} (manifest unreadable: run ferry fsck)",
                        e.name, "?"
                    );
                }
            }
        }
        s
    })
}

/// `YYYY-MM-DD HH:MM:SS` from Unix seconds (civil-from-days, no time zone
/// database needed).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The stash.
    name: String,
}

pub fn inspect(store: &StoreArgs, args: InspectArgs, out: &Output) -> anyhow::Result<()> {
    let name = parse_name(&args.name)?;
    let store = store.open()?;
    let report = store.inspect(&name)?;
    out.emit(&report, |r: &Inspection| {
        let h = &r.header;
        let mut s = String::new();
        let _ = writeln!(s, "name:      {}", r.name);
        let _ = writeln!(s, "kind:      {}", h.kind.as_str());
        let _ = writeln!(s, "size:      {} ({} bytes)", bytes(h.size), h.size);
        let _ = writeln!(s, "sha256:    {}", h.sha256);
        let _ = writeln!(s, "stashed:   {} UTC", utc(r.created));
        if let Some(src) = &h.source {
            let _ = writeln!(s, "source:    {src}");
        }
        let _ = writeln!(s, "manifest:  {}", r.manifest);
        let _ = writeln!(
            s,
            "chunks:    {} ({} distinct, {}; tar headers {})",
            r.chunks,
            r.unique_chunks,
            bytes(r.unique_bytes),
            bytes(r.meta_bytes)
        );
        let _ = writeln!(
            s,
            "stored:    {} (size / stored = {:.2}x)",
            bytes(r.stored_bytes),
            r.dedup_ratio
        );
        if let Some(img) = &h.image {
            if !img.tags.is_empty() {
                let _ = writeln!(s, "tags:      {}", img.tags.join(", "));
            }
            if let Some(c) = &img.config_digest {
                let _ = writeln!(s, "config:    {c}");
            }
            let _ = writeln!(s, "layers:    {}", img.layers.len());
            for (i, l) in img.layers.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "  {i:>3}  {:>10}  {}  {}",
                    bytes(l.size),
                    l.diff_id.as_deref().unwrap_or("(no diff_id)"),
                    l.path
                );
            }
        }
        s
    })
}

const RM_HELP: &str = "\
Removes names, locally or on the server (--remote). Their data is freed by
the next `ferry gc` (on a server: its next collection) once nothing else uses
it. Listed names are all or nothing: if one does not exist, none is removed.
--prefix removes every name under a prefix (whole parts), e.g. a CI build's
scope when it ends; on a server the token must write the whole prefix.

Examples:
  ferry rm main/ci_gpu
  ferry rm --remote quic://ferry.ci:4433 --prefix ci/main/1234";

#[derive(clap::Args, Debug)]
#[command(after_help = RM_HELP)]
pub struct RmArgs {
    /// Names to remove.
    #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
    names: Vec<String>,
    /// Remove every name under this prefix instead (whole parts: `ci/1`
    /// covers ci/1/x, not ci/10/x).
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

pub fn rm(store: &StoreArgs, args: RmArgs, out: &Output) -> anyhow::Result<()> {
    let names = args
        .names
        .iter()
        .map(|n| parse_name(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let prefix = match &args.prefix {
        Some(p) => {
            let p = p.trim_end_matches('/');
            if !p.is_empty() {
                parse_name(p).context("--prefix must look like a name (parts separated by /)")?;
            }
            Some(p.to_string())
        }
        None => None,
    };
    if let Some(remote) = args.remote.resolve()? {
        let removal = match prefix {
            Some(p) => transfer::client::Removal::Prefix(p),
            None => transfer::client::Removal::Names(names),
        };
        let report = crate::remote::remove(&remote, &removal)?;
        return out.emit(&report, |r| {
            let mut s: String = r.removed.iter().map(|n| format!("removed {n}\n")).collect();
            if r.names_not_listed > 0 {
                let _ = writeln!(s, "and {} more", r.names_not_listed);
            }
            if r.removed.is_empty() {
                s.push_str("nothing to remove\n");
            }
            s
        });
    }
    let store = store.open()?;
    let names = match prefix {
        Some(p) => store
            .list(if p.is_empty() { None } else { Some(&p) })?
            .into_iter()
            .map(|e| parse_name(&e.name))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => {
            // All or nothing: check every name first.
            for name in &names {
                // A corrupt ref exists too: removing it is the remedy its
                // error message gives, so it must not stop `rm`.
                let exists = match store.contains(name) {
                    Ok(exists) => exists,
                    Err(store::repo::StoreError::Ref(store::refs::RefError::Corrupt {
                        ..
                    })) => true,
                    Err(e) => return Err(e.into()),
                };
                if !exists {
                    bail!(
                        "no stash named {:?}; see ferry ls (nothing was removed)",
                        name.as_str()
                    );
                }
            }
            names
        }
    };
    let mut removed = Vec::new();
    for name in &names {
        store.remove(name)?;
        removed.push(name.to_string());
    }
    out.emit(&removed, |r| {
        if r.is_empty() {
            return "nothing to remove\n".to_string();
        }
        r.iter().map(|n| format!("removed {n}\n")).collect()
    })
}

pub fn du(store: &StoreArgs, out: &Output) -> anyhow::Result<()> {
    let store = store.open()?;
    let u = store.usage()?;
    out.emit(&u, |u: &Usage| {
        let mut s = String::new();
        let _ = writeln!(s, "names:          {}", u.names);
        let _ = writeln!(s, "logical size:   {}", bytes(u.logical_bytes));
        let _ = writeln!(
            s,
            "stored:         {} in {} packs, {} in manifests",
            bytes(u.pack_bytes),
            u.packs,
            bytes(u.manifest_bytes)
        );
        let _ = writeln!(s, "chunks:         {}", u.chunks);
        let _ = writeln!(
            s,
            "dedup ratio:    {:.2}x (logical / stored)",
            u.dedup_ratio
        );
        let _ = writeln!(
            s,
            "unreferenced:   {} (stored bytes no name uses)",
            bytes(u.unreferenced_stored_bytes)
        );
        s
    })
}

#[derive(clap::Args, Debug)]
pub struct FsckArgs {
    /// Re-read and re-hash every chunk (reads the whole store).
    #[arg(long)]
    full: bool,
    /// First rebuild missing or unreadable pack indexes from the packs.
    #[arg(long)]
    repair: bool,
}

/// `fsck` found problems: exit code 1, not 2.
#[derive(Debug)]
pub struct ProblemsFound(pub usize);

impl std::fmt::Display for ProblemsFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fsck found {} problem(s)", self.0)
    }
}

impl std::error::Error for ProblemsFound {}

pub fn fsck(store: &StoreArgs, args: FsckArgs, out: &Output) -> anyhow::Result<()> {
    let store = store.open()?;
    if args.repair {
        let repaired = store.repair_indexes()?;
        if !out.quiet && !out.json {
            for p in &repaired {
                eprintln!("ferry: rebuilt the index of pack {p}");
            }
        }
    }
    let progress = Reporter::new(out.quiet || out.json || !args.full, "fsck --full", None);
    let report = store.fsck(args.full, &progress);
    progress.finish();
    let report = report?;
    out.emit(&report, |r: &FsckReport| {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "checked {} packs, {} chunks{}, {} names",
            r.packs,
            r.chunks,
            if r.full { " (re-hashed)" } else { "" },
            r.names
        );
        if r.problems.is_empty() {
            let _ = writeln!(s, "no problems found");
        }
        for p in &r.problems {
            let _ = writeln!(s, "PROBLEM {}: {}", p.subject, p.problem);
        }
        for n in &r.notes {
            let _ = writeln!(s, "note {}: {}", n.subject, n.problem);
        }
        s
    })?;
    if !report.problems.is_empty() {
        return Err(ProblemsFound(report.problems.len()).into());
    }
    Ok(())
}
