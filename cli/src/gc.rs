//! `ferry gc`: retention policies and garbage collection.

use crate::commands::StoreArgs;
use crate::output::{bytes, Output};
use anyhow::{bail, Context};
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;
use store::gc::{parse_duration, GcOptions, GcReport, Policy};
use transfer::client::RemoteGcReport;

pub const LONG_ABOUT: &str = "\
Apply retention policies, then delete what no name refers to.

Safe while any number of stashes and unstashes run: nothing is locked. Data no
name uses is first condemned; it is deleted on a later run once the grace
period has passed and no command that started before the condemnation is still
running. Packs that are mostly dead are repacked. A gc killed at any point
leaves a consistent store; the next run carries on.

Policies (combinable; a name goes if any rule removes it):
  --prefix P               limit the rules to names under P; alone, drop them all
  --keep-last N            keep the newest N names of each group (names sharing
                           a parent path, e.g. main/ci_gpu/<commit>)
  --max-age DURATION       remove names older than this (30m, 12h, 7d, 2w)
  --config FILE            more policies, per prefix (see below)

Config file (TOML):
  grace = \"1h\"
  [[retention]]
  prefix = \"pr\"
  max_age = \"3d\"
  [[retention]]
  prefix = \"main\"
  keep_last = 10

On a server:
  --remote quic://HOST:PORT  run the same collection, with the same options, on
                           the store of that `ferry serve` (also $FERRY_REMOTE)
                           and print the server's report. Needs a token with
                           the admin scope (`admin = true` in the server's
                           [[token]] entry): --token-file FILE or
                           $FERRY_TOKEN_FILE, and --server-cert as for the other
                           remote commands. Only one collection runs on a
                           server at a time; while one runs (its [gc]
                           schedule), the request is refused as busy and
                           retried for up to --busy-wait (default 10m).

Examples:
  ferry gc --prefix build/5678            # a finished build's scope
  ferry gc --prefix main --keep-last 5 --dry-run
  ferry gc --max-age 7d --json
  ferry gc                                # no policy: only collect garbage
  ferry gc --remote quic://ferry.ci:4433 --token-file ops.token \\
      --server-cert sha256:… --prefix build/5678";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Apply the rules to names under this prefix; alone, drop them all.
    #[arg(long, value_name = "P")]
    prefix: Option<String>,
    /// Keep the newest N names of each group.
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Remove names older than this (e.g. 12h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_age: Option<Duration>,
    /// Keep condemned data at least this long before deleting it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    grace: Option<Duration>,
    /// Repack packs whose live share of bytes is below this fraction (0 disables).
    #[arg(long, default_value_t = 0.5, value_name = "FRACTION")]
    repack_below: f64,
    /// Retention policies per prefix, and the grace period, from a TOML file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print what would be removed and freed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long after a condemnation a starting command may still have missed
    /// the mark (time to write it, plus clock skew between machines).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, hide = true)]
    mark_slack: Option<Duration>,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    grace: Option<String>,
    #[serde(default)]
    retention: Vec<FilePolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    prefix: Option<String>,
    keep_last: Option<usize>,
    max_age: Option<String>,
}

pub fn run(store_args: &StoreArgs, args: Args, out: &Output) -> anyhow::Result<()> {
    let mut opts = GcOptions {
        dry_run: args.dry_run,
        repack_below: args.repack_below,
        ..GcOptions::default()
    };
    if !(0.0..=1.0).contains(&args.repack_below) {
        bail!(
            "--repack-below must be between 0 and 1 (got {})",
            args.repack_below
        );
    }
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: FileConfig =
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
        if let Some(g) = cfg.grace {
            opts.grace = parse_duration(&g)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("grace in {}", path.display()))?;
        }
        for p in cfg.retention {
            let max_age = p
                .max_age
                .map(|m| parse_duration(&m))
                .transpose()
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("max_age in {}", path.display()))?;
            opts.policies.push(Policy {
                prefix: p.prefix,
                keep_last: p.keep_last,
                max_age,
            });
        }
    }
    if args.prefix.is_some() || args.keep_last.is_some() || args.max_age.is_some() {
        opts.policies.push(Policy {
            prefix: args.prefix,
            keep_last: args.keep_last,
            max_age: args.max_age,
        });
    }
    if let Some(g) = args.grace {
        opts.grace = g;
    }
    if let Some(m) = args.mark_slack {
        opts.mark_slack = m;
    }
    for p in &opts.policies {
        p.validate().map_err(anyhow::Error::msg)?;
    }
    if let Some(remote) = args.remote.resolve()? {
        if args.mark_slack.is_some() {
            bail!("--mark-slack applies to a local gc only; a server uses its own");
        }
        let report = crate::remote::gc(&remote, &opts)?;
        return out.emit(&report, |r: &RemoteGcReport| {
            format!(
                "on {}:\n{}",
                r.remote,
                render_counted(&r.report, r.names_not_listed)
            )
        });
    }
    let store = store_args.open()?;
    let report = store.gc(&opts)?;
    out.emit(&report, render)
}

fn render(r: &GcReport) -> String {
    render_counted(r, 0)
}

/// The report as text; `not_listed` more names were removed than
/// `names_removed` lists (a server's report that did not fit in one reply).
fn render_counted(r: &GcReport, not_listed: u64) -> String {
    let mut s = String::new();
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for n in &r.names_removed {
        let _ = writeln!(s, "{verb} {} ({})", n.name, n.reason);
    }
    if not_listed > 0 {
        let _ = writeln!(
            s,
            "… and {not_listed} more (the list did not fit in the server's reply; see its log)"
        );
    }
    let _ = writeln!(
        s,
        "names: {} {verb}, {} kept; {} live chunks",
        r.names_removed.len() as u64 + not_listed,
        r.names_kept,
        r.live_chunks
    );
    if r.dry_run {
        let _ = writeln!(
            s,
            "dry run: {} could be freed now, {} would wait for the grace period or running commands",
            bytes(r.bytes_freeable_now),
            bytes(r.bytes_pending)
        );
    } else {
        let _ = writeln!(
            s,
            "packs: {} condemned, {} repacked, {} deleted, {} restored; {} manifests deleted",
            r.packs_condemned,
            r.packs_repacked,
            r.packs_deleted,
            r.packs_uncondemned,
            r.manifests_deleted
        );
        let _ = writeln!(
            s,
            "freed {}; {} condemned, freed by a later gc once the grace period has passed{}",
            bytes(r.bytes_freed),
            bytes(r.bytes_pending),
            if r.blocked_by_leases > 0 {
                format!(" ({} waiting for running commands)", r.blocked_by_leases)
            } else {
                String::new()
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("7 parsecs").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999w").is_err());
    }
}
