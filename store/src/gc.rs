//! Retention and garbage collection, safe while any number of stashes run.
//!
//! **Retention** removes names by policy: per prefix, keep the newest N of
//! each group (names that share a parent path, e.g. `main/ci_gpu/<commit>`),
//! drop names older than a maximum age, or drop a whole scope.
//!
//! **Collection** is mark and sweep over names → manifests → chunks →
//! packs, with no lock that blocks writers:
//!
//! 1. A pack with no live chunk is *condemned*: a small mark records when.
//!    Writers that start after that (they take a [lease](crate::lease)
//!    first, then read the marks) treat the pack's chunks as missing and
//!    write them again; so nothing new comes to depend on it.
//! 2. A condemned pack is deleted only when (a) it is still dead, or every
//!    live chunk in it also sits in a healthy pack, (b) it was condemned
//!    longer than the grace period ago, and (c) no live lease started
//!    before the condemnation (plus a slack for writing the mark): such a
//!    writer may have decided to reuse a chunk in it before it was marked.
//! 3. A condemned pack that became live again (a writer that started before
//!    the mark committed a stash using it) is un-condemned.
//! 4. A pack whose live share fell below a threshold is *repacked*: its live
//!    chunks are copied (still compressed) into a new pack, then the old
//!    pack is condemned and goes by the same rules.
//!
//! Unreferenced manifests are condemned and deleted the same way. Every
//! step is an atomic object write or delete, so a collector killed at any
//! point leaves a consistent store and the next run carries on. Memory is
//! bounded by the live chunk set (one hash set of ids) and one pack's index
//! at a time.

use crate::backend::{Backend, BackendError, Kind};
use crate::lease::{self, now_ms, LeaseInfo};
use crate::manifest::Manifest;
use crate::name::Name;
use crate::pack::{self, PackWriter};
use crate::refs;
use crate::repo::{Store, StoreError};
use crate::{ChunkId, ManifestId, PackId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// One retention rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Policy {
    /// Names it applies to (whole parts); `None`: every name.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Keep the newest N names of each group (names with the same parent path).
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// Remove names created longer ago than this.
    #[serde(default, with = "duration_secs_opt")]
    pub max_age: Option<Duration>,
}

mod duration_secs_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        d.map(|d| d.as_secs()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

impl Policy {
    /// Checks the rule makes sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.prefix.is_none() && self.keep_last.is_none() && self.max_age.is_none() {
            return Err(
                "a policy needs a prefix (to drop a scope), --keep-last or --max-age".into(),
            );
        }
        if let Some(p) = &self.prefix {
            let trimmed = p.trim_end_matches('/');
            if !trimmed.is_empty() {
                Name::parse(trimmed).map_err(|e| format!("invalid prefix: {e}"))?;
            }
        }
        Ok(())
    }

    fn covers(&self, name: &Name) -> bool {
        self.prefix
            .as_deref()
            .is_none_or(|p| name.starts_with_prefix(p))
    }
}

/// Parses a duration: `30s`, `15m`, `12h`, `7d`, `2w`, or plain seconds
/// (the syntax of `ferry gc` and of the config files).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 30m, 12h, 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?}: use s, m, h, d or w"
            ))
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {text:?} is too long"))
}

/// How a collection runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Retention rules; a name is removed if any rule removes it.
    pub policies: Vec<Policy>,
    /// Condemned data lives at least this long before it is deleted.
    pub grace: Duration,
    /// Repack packs whose live share of stored bytes is below this (0 = never).
    pub repack_below: f64,
    /// A lease that started less than this after a condemnation still
    /// blocks it (covers the time it takes to write the mark, and clock
    /// skew between machines).
    pub mark_slack: Duration,
    /// Plan only: change nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            policies: Vec::new(),
            grace: Duration::from_secs(3600),
            repack_below: 0.5,
            mark_slack: Duration::from_secs(60),
            dry_run: false,
        }
    }
}

/// A name retention removed, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RemovedName {
    /// The name.
    pub name: String,
    /// The rule that removed it.
    pub reason: String,
}

/// What a collection did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Names removed by retention.
    pub names_removed: Vec<RemovedName>,
    /// Names kept.
    pub names_kept: u64,
    /// Distinct chunks still named.
    pub live_chunks: u64,
    /// Packs condemned in this run.
    pub packs_condemned: u64,
    /// Condemned packs found live again and restored.
    pub packs_uncondemned: u64,
    /// Packs repacked (their live chunks copied, the pack condemned).
    pub packs_repacked: u64,
    /// Packs deleted.
    pub packs_deleted: u64,
    /// Manifests deleted.
    pub manifests_deleted: u64,
    /// Bytes deleted (packs, indexes, manifests).
    pub bytes_freed: u64,
    /// Bytes condemned but kept for now (grace period or running leases).
    pub bytes_pending: u64,
    /// Condemned objects whose deletion waits on a running stash or unstash.
    pub blocked_by_leases: u64,
    /// Bytes a dry run would delete now.
    pub bytes_freeable_now: u64,
    /// Stale leases and old temporary files removed.
    pub leftovers_removed: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Mark {
    condemned_ms: u64,
}

/// A pack's entries: from its index, or from the pack's own footer when
/// the index is missing or unreadable.
fn pack_entries(
    backend: &dyn Backend,
    id: &PackId,
) -> Result<Vec<pack::IndexEntry>, pack::PackError> {
    pack::read_idx(backend, id)
        .or_else(|_| pack::read_pack_footer(backend, id))
        .map(|i| i.entries)
}

/// The live-set key of a chunk: the first 8 bytes of its id.
fn key(id: &ChunkId) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

fn pack_mark(p: &PackId) -> String {
    format!("pack-{}", p.to_hex())
}

fn manifest_mark(m: &ManifestId) -> String {
    format!("manifest-{}", m.to_hex())
}

/// The condemned packs, as writers see them (to treat their chunks as missing).
pub fn condemned_packs(backend: &dyn Backend) -> Result<HashSet<PackId>, BackendError> {
    Ok(backend
        .list(Kind::Condemned)?
        .into_iter()
        .filter_map(|m| m.strip_prefix("pack-").and_then(|h| h.parse().ok()))
        .collect())
}

fn read_marks(backend: &dyn Backend) -> Result<HashMap<String, u64>, BackendError> {
    let mut out = HashMap::new();
    for name in backend.list(Kind::Condemned)? {
        let at = match backend.get(Kind::Condemned, &name) {
            Ok(b) => serde_json::from_slice::<Mark>(&b)
                .map(|m| m.condemned_ms)
                .unwrap_or(0),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        out.insert(name, at);
    }
    Ok(out)
}

/// Which names the policies remove, given each name's creation time.
pub fn apply_policies(
    names: &[(Name, u64)],
    policies: &[Policy],
    now_secs: u64,
) -> Vec<RemovedName> {
    let mut removed: HashMap<&Name, String> = HashMap::new();
    for (i, policy) in policies.iter().enumerate() {
        let rule = |what: String| format!("policy {}: {what}", i + 1);
        let covered: Vec<&(Name, u64)> = names.iter().filter(|(n, _)| policy.covers(n)).collect();
        if policy.keep_last.is_none() && policy.max_age.is_none() {
            for (n, _) in &covered {
                removed.entry(n).or_insert_with(|| {
                    rule(format!(
                        "drop scope {}",
                        policy.prefix.as_deref().unwrap_or("")
                    ))
                });
            }
            continue;
        }
        if let Some(age) = policy.max_age {
            for (n, created) in &covered {
                if now_secs.saturating_sub(*created) > age.as_secs() {
                    removed
                        .entry(n)
                        .or_insert_with(|| rule(format!("older than {}s", age.as_secs())));
                }
            }
        }
        if let Some(keep) = policy.keep_last {
            let mut groups: HashMap<String, Vec<&(Name, u64)>> = HashMap::new();
            for entry in &covered {
                let parent = entry
                    .0
                    .as_str()
                    .rsplit_once('/')
                    .map_or("", |(p, _)| p)
                    .to_string();
                groups.entry(parent).or_default().push(entry);
            }
            for (_, mut members) in groups {
                // Newest first; ties broken by name so the result is stable.
                members.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.as_str().cmp(a.0.as_str())));
                for (n, _) in members.into_iter().skip(keep) {
                    removed
                        .entry(n)
                        .or_insert_with(|| rule(format!("beyond the newest {keep}")));
                }
            }
        }
    }
    let mut out: Vec<RemovedName> = removed
        .into_iter()
        .map(|(n, reason)| RemovedName {
            name: n.to_string(),
            reason,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

struct PackStat {
    id: PackId,
    size: u64,
    live_bytes: u64,
    live: u64,
    condemned_ms: Option<u64>,
}

/// Runs retention and one collection pass.
pub fn collect(store: &Store, opts: &GcOptions) -> Result<GcReport, StoreError> {
    for p in &opts.policies {
        p.validate().map_err(|e| StoreError::Input {
            what: "the retention policy".into(),
            error: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
    }
    let backend = store.backend();
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };

    // 1. Retention.
    let entries = store.list(None)?;
    let names_total = entries.len();
    let created: Vec<(Name, u64)> = entries
        .into_iter()
        .filter_map(|e| {
            // An unreadable manifest counts as new: retention never removes
            // what it cannot date (fsck reports it).
            let at = if e.header.is_some() && e.created > 0 {
                e.created
            } else {
                u64::MAX / 2
            };
            Name::parse(&e.name).ok().map(|n| (n, at))
        })
        .collect();
    report.names_removed = apply_policies(&created, &opts.policies, now_ms() / 1000);
    let removed: HashSet<&str> = report
        .names_removed
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    if !opts.dry_run {
        for r in &report.names_removed {
            refs::remove(
                backend,
                &Name::parse(&r.name).expect("listed names are valid"),
            )?;
        }
    }

    // 2. Leases before refs: a writer that finished after this read has
    //    committed its name before the refs are read below.
    let now = now_ms();
    let (leases, stale) = lease::list(backend, now)?;

    // 3. Mark: every chunk and manifest still named. Chunks are kept by the
    //    first 8 bytes of their id: an 8-byte key per live chunk keeps
    //    memory small for millions of chunks, and a collision can only make
    //    a dead chunk look live (kept longer), never the other way round.
    let mut live: HashSet<u64> = HashSet::new();
    let mut live_manifests: HashSet<ManifestId> = HashSet::new();
    for (name, id) in refs::list(backend, None)? {
        if opts.dry_run && removed.contains(name.as_str()) {
            continue;
        }
        let bytes = backend.get(Kind::Manifest, &id.to_hex())?;
        let manifest = Manifest::decode(&bytes).map_err(|source| StoreError::Manifest {
            name: name.to_string(),
            id,
            problem: source,
        })?;
        live.extend(manifest.chunks().map(|c| key(&c.id)));
        live_manifests.insert(id);
    }
    report.names_kept = (names_total - report.names_removed.len()) as u64;
    report.live_chunks = live.len() as u64;

    // 4. Sweep packs, one index at a time.
    let marks = read_marks(backend)?;
    let mut stats = Vec::new();
    let indexed: HashSet<String> = backend.list(Kind::Index)?.into_iter().collect();
    for name in backend.list(Kind::Pack)? {
        let Ok(id) = name.parse::<PackId>() else {
            continue;
        };
        // A pack whose entries cannot be read is left alone: it may be a
        // passing I/O error, and damage is fsck's to report, not gc's to erase.
        let Ok(entries) = pack_entries(backend, &id) else {
            continue;
        };
        // Gone since the listing (another collector): nothing to decide.
        let Ok(size) = backend.size(Kind::Pack, &name) else {
            continue;
        };
        let (mut live_n, mut live_bytes) = (0u64, 0u64);
        for e in &entries {
            if live.contains(&key(&e.id)) {
                live_n += 1;
                live_bytes += e.stored_len as u64;
            }
        }
        stats.push(PackStat {
            id,
            size,
            live_bytes,
            live: live_n,
            condemned_ms: marks.get(&pack_mark(&id)).copied(),
        });
    }
    // An index whose pack is gone is useless.
    let packs: HashSet<String> = stats.iter().map(|s| s.id.to_hex()).collect();
    for name in &indexed {
        if !packs.contains(name) && !opts.dry_run {
            backend.delete(Kind::Index, name)?;
            report.leftovers_removed += 1;
        }
    }

    let to_repack: HashSet<PackId> = stats
        .iter()
        .filter(|s| {
            s.condemned_ms.is_none()
                && s.live > 0
                && opts.repack_below > 0.0
                && (s.live_bytes as f64) < opts.repack_below * s.size as f64
        })
        .map(|s| s.id)
        .collect();
    // Live chunks in packs that go (condemned, or about to be repacked),
    // and which of them also sit in a pack that stays: a condemned pack
    // holding only such chunks is no longer needed.
    let leaving = |s: &PackStat| s.condemned_ms.is_some() || to_repack.contains(&s.id);
    let mut wanted: HashSet<u64> = HashSet::new();
    for s in stats.iter().filter(|s| leaving(s) && s.live > 0) {
        for e in pack_entries(backend, &s.id).unwrap_or_default() {
            if live.contains(&key(&e.id)) {
                wanted.insert(key(&e.id));
            }
        }
    }
    let mut healthy: HashSet<u64> = HashSet::new();
    if !wanted.is_empty() {
        // Unreadable here: fewer healthy copies, so more is kept.
        for s in stats.iter().filter(|s| !leaving(s) && s.live > 0) {
            for e in pack_entries(backend, &s.id).unwrap_or_default() {
                if wanted.contains(&key(&e.id)) {
                    healthy.insert(key(&e.id));
                }
            }
        }
    }
    drop(wanted);

    // Repack: copy live chunks not held elsewhere into new packs.
    if !opts.dry_run && !to_repack.is_empty() {
        let mut writer: Option<PackWriter> = None;
        for s in stats.iter().filter(|s| to_repack.contains(&s.id)) {
            // Unreadable now: nothing is copied, and the "needed" check
            // below keeps the pack.
            for e in pack_entries(backend, &s.id).unwrap_or_default() {
                if !live.contains(&key(&e.id)) || healthy.contains(&key(&e.id)) {
                    continue;
                }
                let bytes =
                    backend.get_range(Kind::Pack, &s.id.to_hex(), e.offset, e.stored_len as u64)?;
                let w = match &mut writer {
                    Some(w) => w,
                    None => writer.insert(PackWriter::new(backend)?),
                };
                w.add(e.id, e.codec, e.raw_len, &bytes)?;
                healthy.insert(key(&e.id));
                if w.is_full() {
                    writer.take().expect("set").finish(backend)?;
                }
            }
        }
        if let Some(w) = writer.take() {
            if !w.is_empty() {
                w.finish(backend)?;
            }
        }
        // The copies are durable: the old packs can be condemned.
        report.packs_repacked = to_repack.len() as u64;
    }

    let blocking = |condemned_ms: u64| -> bool {
        let limit = condemned_ms + opts.mark_slack.as_millis() as u64;
        leases.iter().any(|l: &LeaseInfo| l.started_ms <= limit)
    };
    let grace_ms = opts.grace.as_millis() as u64;
    for s in &stats {
        let dead = s.live == 0 || to_repack.contains(&s.id);
        match s.condemned_ms {
            None if dead => {
                report.bytes_pending += s.size;
                if opts.dry_run {
                    continue;
                }
                put_mark(backend, &pack_mark(&s.id), now)?;
                report.packs_condemned += 1;
            }
            None => {}
            Some(at) => {
                let needed = if s.live == 0 {
                    false
                } else {
                    // Still needed unless every live chunk has a healthy
                    // copy; if its entries cannot be read, assume needed.
                    pack_entries(backend, &s.id).map_or(true, |entries| {
                        entries
                            .iter()
                            .any(|e| live.contains(&key(&e.id)) && !healthy.contains(&key(&e.id)))
                    })
                };
                if needed {
                    if !opts.dry_run {
                        backend.delete(Kind::Condemned, &pack_mark(&s.id))?;
                    }
                    report.packs_uncondemned += 1;
                } else if now.saturating_sub(at) < grace_ms {
                    report.bytes_pending += s.size;
                } else if blocking(at) {
                    report.bytes_pending += s.size;
                    report.blocked_by_leases += 1;
                } else if opts.dry_run {
                    report.bytes_freeable_now += s.size;
                } else {
                    let name = s.id.to_hex();
                    let idx = backend.size(Kind::Index, &name).unwrap_or(0);
                    // Index first: a crash in between leaves a pack without
                    // an index, which the next run deletes.
                    backend.delete(Kind::Index, &name)?;
                    backend.delete(Kind::Pack, &name)?;
                    backend.delete(Kind::Condemned, &pack_mark(&s.id))?;
                    report.packs_deleted += 1;
                    report.bytes_freed += s.size + idx;
                }
            }
        }
    }

    // 5. Manifests no name uses.
    for name in backend.list(Kind::Manifest)? {
        let Ok(id) = name.parse::<ManifestId>() else {
            continue;
        };
        let mark = manifest_mark(&id);
        match (live_manifests.contains(&id), marks.get(&mark)) {
            (true, Some(_)) => {
                if !opts.dry_run {
                    backend.delete(Kind::Condemned, &mark)?;
                }
            }
            (true, None) => {}
            (false, None) => {
                if !opts.dry_run {
                    put_mark(backend, &mark, now)?;
                }
            }
            (false, Some(&at)) => {
                if now.saturating_sub(at) < grace_ms || blocking(at) {
                    continue;
                }
                let size = backend.size(Kind::Manifest, &name).unwrap_or(0);
                if opts.dry_run {
                    report.bytes_freeable_now += size;
                    continue;
                }
                backend.delete(Kind::Manifest, &name)?;
                backend.delete(Kind::Condemned, &mark)?;
                report.manifests_deleted += 1;
                report.bytes_freed += size;
            }
        }
    }
    // Marks whose object is gone (a crash after the delete).
    if !opts.dry_run {
        for mark in marks.keys() {
            let gone = match (mark.strip_prefix("pack-"), mark.strip_prefix("manifest-")) {
                (Some(p), _) => !packs.contains(p),
                (_, Some(m)) => !backend.exists(Kind::Manifest, m)?,
                _ => true,
            };
            if gone {
                backend.delete(Kind::Condemned, mark)?;
            }
        }
    }

    // 6. Leftovers of dead processes.
    if !opts.dry_run {
        for l in &stale {
            if now.saturating_sub(l.refreshed_ms) > grace_ms {
                backend.delete(Kind::Lease, &l.id)?;
                report.leftovers_removed += 1;
            }
        }
        let oldest_live = leases.iter().map(|l| l.started_ms).min();
        report.leftovers_removed += remove_old_temp_files(store, opts.grace, oldest_live);
    }
    Ok(report)
}

fn put_mark(backend: &dyn Backend, name: &str, at: u64) -> Result<(), BackendError> {
    let bytes = serde_json::to_vec(&Mark { condemned_ms: at }).expect("a mark serialises");
    backend.put(Kind::Condemned, name, &bytes)
}

/// Temporary files younger than this are never removed.
const TEMP_MIN_AGE: Duration = Duration::from_secs(3600);

/// Temporary files of crashed writers (local stores only). A running
/// command creates its temporary files after taking its lease and keeps
/// writing them, so a file last modified before the oldest live lease
/// started (and older than the grace period) belongs to nobody alive.
fn remove_old_temp_files(store: &Store, grace: Duration, oldest_live_lease_ms: Option<u64>) -> u64 {
    let Ok(entries) = std::fs::read_dir(store.root().join("tmp")) else {
        return 0;
    };
    let now = now_ms();
    let mut n = 0;
    for e in entries.flatten() {
        let Some(modified_ms) = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
        else {
            continue;
        };
        let orphan = oldest_live_lease_ms.is_none_or(|oldest| modified_ms < oldest);
        // At least an hour whatever the grace period: a command writes a
        // temporary file before its lease or object exists (the lease's own
        // file, for one), and a file untouched for an hour is no one's.
        let min_age = grace.max(TEMP_MIN_AGE);
        let old = now.saturating_sub(modified_ms) > min_age.as_millis() as u64;
        if orphan && old && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    fn policy(prefix: Option<&str>, keep_last: Option<usize>, max_age: Option<u64>) -> Policy {
        Policy {
            prefix: prefix.map(str::to_string),
            keep_last,
            max_age: max_age.map(Duration::from_secs),
        }
    }

    fn removed(names: &[(&str, u64)], policies: &[Policy], now: u64) -> Vec<String> {
        let names: Vec<(Name, u64)> = names.iter().map(|(s, t)| (n(s), *t)).collect();
        apply_policies(&names, policies, now)
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn retention_table() {
        let names = [
            ("main/ci_gpu/a", 100),
            ("main/ci_gpu/b", 200),
            ("main/ci_gpu/c", 300),
            ("main/ci_cpu/a", 100),
            ("pr/1/ci_gpu", 50),
            ("pr/2/ci_gpu", 290),
            ("build/5678/lib", 10),
            ("build/56789/lib", 10),
        ];
        struct Case {
            policies: Vec<Policy>,
            now: u64,
            expect: &'static [&'static str],
        }
        let cases = [
            Case {
                policies: vec![policy(Some("build/5678"), None, None)],
                now: 400,
                expect: &["build/5678/lib"],
            },
            Case {
                policies: vec![policy(Some("main"), Some(2), None)],
                now: 400,
                expect: &["main/ci_gpu/a"],
            },
            Case {
                policies: vec![policy(None, Some(1), None)],
                now: 400,
                expect: &["main/ci_gpu/a", "main/ci_gpu/b"],
            },
            Case {
                policies: vec![policy(Some("pr"), None, Some(150))],
                now: 400,
                expect: &["pr/1/ci_gpu"],
            },
            Case {
                policies: vec![
                    policy(Some("pr"), None, Some(150)),
                    policy(Some("main"), Some(1), None),
                ],
                now: 400,
                expect: &["main/ci_gpu/a", "main/ci_gpu/b", "pr/1/ci_gpu"],
            },
            Case {
                // keep-last and max-age together: either removes.
                policies: vec![policy(Some("main/ci_gpu"), Some(2), Some(150))],
                now: 400,
                expect: &["main/ci_gpu/a", "main/ci_gpu/b"],
            },
            Case {
                policies: vec![policy(Some("nothing"), None, None)],
                now: 400,
                expect: &[],
            },
            Case {
                policies: vec![],
                now: 400,
                expect: &[],
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(removed(&names, &c.policies, c.now), c.expect, "case {i}");
        }
    }

    use crate::repo::{NoProgress, Source};
    use std::io::Read;

    fn quick() -> GcOptions {
        GcOptions {
            grace: Duration::ZERO,
            mark_slack: Duration::ZERO,
            ..GcOptions::default()
        }
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        crate::testutil::pseudo_random(len, seed as u64)
    }

    fn stash(s: &Store, name: &str, bytes: &[u8]) -> crate::repo::StashReport {
        s.stash(
            &n(name),
            Source::Reader(Box::new(std::io::Cursor::new(bytes.to_vec()))),
            &NoProgress,
        )
        .unwrap()
    }

    fn read(s: &Store, name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        s.open_stash(&n(name))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn packs(s: &Store) -> usize {
        s.backend().list(Kind::Pack).unwrap().len()
    }

    #[test]
    fn dead_packs_are_condemned_then_deleted_and_live_data_stays() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (a, b) = (data(2 << 20, 1), data(2 << 20, 2));
        stash(&s, "keep", &a);
        stash(&s, "drop", &b);
        assert_eq!(packs(&s), 2);
        s.remove(&n("drop")).unwrap();
        let first = s.gc(&quick()).unwrap();
        assert_eq!((first.packs_condemned, first.packs_deleted), (1, 0));
        assert!(first.bytes_pending > 0);
        let second = s.gc(&quick()).unwrap();
        assert_eq!(second.packs_deleted, 1);
        assert!(second.bytes_freed > 0);
        assert_eq!(packs(&s), 1);
        assert_eq!(read(&Store::open(dir.path()).unwrap(), "keep"), a);
        assert!(s.fsck(true, &NoProgress).unwrap().problems.is_empty());
        // Nothing more to do.
        let third = s.gc(&quick()).unwrap();
        assert_eq!((third.packs_condemned, third.packs_deleted), (0, 0));
    }

    #[test]
    fn grace_period_and_running_leases_delay_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        stash(&s, "x", &data(1 << 20, 3));
        s.remove(&n("x")).unwrap();
        let long = GcOptions {
            grace: Duration::from_secs(3600),
            ..quick()
        };
        s.gc(&long).unwrap();
        let r = s.gc(&long).unwrap();
        assert_eq!(r.packs_deleted, 0, "grace period not honoured");
        // A lease taken before the condemnation blocks deletion...
        let lease =
            crate::lease::Lease::acquire(std::sync::Arc::clone(&s.backend_arc()), "stash").unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let s2 = Store::open(dir2.path()).unwrap();
        stash(&s2, "y", &data(1 << 20, 4));
        s2.remove(&n("y")).unwrap();
        let _ = s2;
        let blocked = s
            .gc(&GcOptions {
                mark_slack: Duration::from_secs(3600),
                ..quick()
            })
            .unwrap();
        assert_eq!(blocked.packs_deleted, 0);
        assert_eq!(blocked.blocked_by_leases, 1);
        drop(lease);
        assert_eq!(s.gc(&quick()).unwrap().packs_deleted, 1);
    }

    /// An import's sealed pack that a collection condemned before the
    /// import's commit (nothing named it yet) is kept by the importer's
    /// lease and counts for its commit; a writer that starts after the
    /// mark finds the chunks missing; the next collection takes the pack
    /// back.
    #[test]
    fn an_import_condemned_before_its_commit_still_commits() {
        let dir = tempfile::tempdir().unwrap();
        let src = Store::open(dir.path().join("src")).unwrap();
        let bytes = data(1 << 20, 7);
        stash(&src, "x", &bytes);
        let (_, manifest) = src.manifest_bytes(&n("x")).unwrap();
        let dst = Store::open(dir.path().join("dst")).unwrap();
        let mut importer = dst.importer().unwrap();
        let (_, m) = src.manifest(&n("x")).unwrap();
        let mut raw = Vec::new();
        for c in m.chunks() {
            let stored = src.read_stored(&c.id).unwrap().unwrap();
            importer.add(&stored.verify(&mut raw).unwrap()).unwrap();
        }
        assert!(!importer.flush().unwrap().is_empty(), "a sealed pack");

        let first = dst.gc(&quick()).unwrap();
        assert_eq!(first.packs_condemned, 1, "{first:?}");
        assert_eq!(first.packs_deleted, 0, "the import's lease keeps it");
        match dst.commit_manifest(&n("late"), &manifest) {
            Err(StoreError::MissingChunk { .. }) => {}
            other => panic!("a writer after the mark reused condemned chunks: {other:?}"),
        }
        importer.commit(&n("x"), &manifest).unwrap();

        let second = dst.gc(&quick()).unwrap();
        assert_eq!(second.packs_uncondemned, 1, "{second:?}");
        assert_eq!(second.packs_deleted, 0, "{second:?}");
        let mut out = Vec::new();
        dst.open_stash(&n("x"))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == bytes);
        assert!(dst.fsck(true, &NoProgress).unwrap().problems.is_empty());
    }

    #[test]
    fn a_new_writer_does_not_reuse_condemned_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let a = data(2 << 20, 5);
        stash(&s, "a", &a);
        s.remove(&n("a")).unwrap();
        s.gc(&quick()).unwrap(); // condemns the pack
        let again = stash(&s, "a", &a);
        assert_eq!(
            again.new_bytes,
            a.len() as u64,
            "chunks of a condemned pack were reused"
        );
        let r = s.gc(&quick()).unwrap();
        assert_eq!(r.packs_deleted, 1);
        assert_eq!(read(&Store::open(dir.path()).unwrap(), "a"), a);
    }

    #[test]
    fn a_condemned_pack_that_became_live_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let a = data(1 << 20, 6);
        stash(&s, "a", &a);
        let (_, manifest) = s.manifest_bytes(&n("a")).unwrap();
        s.remove(&n("a")).unwrap();
        s.gc(&quick()).unwrap();
        // A writer that decided before the mark commits a manifest naming
        // the condemned chunks (what commit_manifest refuses today, done
        // here by hand through the ref).
        let id = ManifestId::of(&manifest);
        refs::set(s.backend(), &n("late"), &id).unwrap();
        let r = s.gc(&quick()).unwrap();
        assert_eq!((r.packs_uncondemned, r.packs_deleted), (1, 0));
        assert_eq!(read(&Store::open(dir.path()).unwrap(), "late"), a);
    }

    #[test]
    fn mostly_dead_packs_are_repacked() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (keep, dead) = (data(1 << 20, 7), data(3 << 20, 8));
        let mut both = keep.clone();
        both.extend_from_slice(&dead);
        stash(&s, "both", &both);
        stash(&s, "keep", &keep);
        s.remove(&n("both")).unwrap();
        let before = s.usage().unwrap().pack_bytes;
        let r = s.gc(&quick()).unwrap();
        assert_eq!(r.packs_repacked, 1);
        let r = s.gc(&quick()).unwrap();
        assert_eq!(r.packs_deleted, 1);
        let after = Store::open(dir.path()).unwrap();
        assert!(after.usage().unwrap().pack_bytes < before / 2);
        assert_eq!(read(&after, "keep"), keep);
        assert!(after.fsck(true, &NoProgress).unwrap().problems.is_empty());
    }

    #[test]
    fn damaged_or_missing_indexes_never_make_live_data_look_dead() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let a = data(1 << 20, 10);
        stash(&s, "a", &a);
        let pack = s.backend().list(Kind::Index).unwrap().remove(0);
        // A damaged index: gc reads the pack's own footer instead.
        s.backend().put(Kind::Index, &pack, b"garbage").unwrap();
        s.gc(&quick()).unwrap();
        s.gc(&quick()).unwrap();
        assert_eq!(packs(&s), 1);
        // No index at all: the same.
        s.backend().delete(Kind::Index, &pack).unwrap();
        s.gc(&quick()).unwrap();
        s.gc(&quick()).unwrap();
        assert_eq!(packs(&s), 1);
        // fsck --repair rebuilds it and the name restores.
        let fresh = Store::open(dir.path()).unwrap();
        assert_eq!(fresh.repair_indexes().unwrap().len(), 1);
        assert_eq!(read(&fresh, "a"), a);
    }

    #[test]
    fn dry_run_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        stash(&s, "build/1/x", &data(1 << 20, 9));
        let opts = GcOptions {
            policies: vec![policy(Some("build/1"), None, None)],
            dry_run: true,
            ..quick()
        };
        let r = s.gc(&opts).unwrap();
        assert_eq!(r.names_removed.len(), 1);
        assert_eq!(s.list(None).unwrap().len(), 1);
        assert!(s.backend().list(Kind::Condemned).unwrap().is_empty());
        let r = s
            .gc(&GcOptions {
                dry_run: false,
                ..opts
            })
            .unwrap();
        assert_eq!((r.names_removed.len(), r.packs_condemned), (1, 1));
    }

    #[test]
    fn empty_policy_is_refused() {
        assert!(Policy::default().validate().is_err());
        assert!(policy(Some("a/../b"), None, None).validate().is_err());
        assert!(policy(Some("main/"), Some(3), None).validate().is_ok());
    }
}
