//! `ferry demo`: the first thing a new user runs. Builds a small
//! image-like archive (docker save layout) from real files on this machine,
//! stashes it, changes one layer, stashes again, rebuilds a layer with new
//! timestamps only, restores, verifies, and shows what each step cost.

use crate::commands::StoreArgs;
use crate::output::{bytes, rate, Output};
use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use store::name::Name;
use store::repo::{NoProgress, Source, StashReport, Target};

pub const LONG_ABOUT: &str = "\
A guided first run on the store (--store, $FERRY_STORE or ~/.cache/ferry).

It builds a small image-like archive in the `docker save` layout from real
files on this machine (three layers: libraries, shared data, programs), then:
  1. stashes it (cold: everything is new),
  2. changes one layer (a file edited, a file added) and stashes again,
  3. rebuilds another layer with new timestamps only, as `docker build
     --no-cache` does, and stashes again,
  4. restores that last version and checks it is byte-identical.
Each step prints what it stored and what it cost. The stashes are named
demo/v1, demo/v2 and demo/v3; remove them with `ferry rm demo/v1 demo/v2 demo/v3`.

Example:
  ferry demo
  ferry demo --size 200MiB --keep-files /tmp/demo";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// About how big the archive is.
    #[arg(long, default_value = "48MiB", value_parser = crate::bench::parse_size)]
    size: u64,
    /// Keep the generated archives in this directory (default: a temporary one, removed).
    #[arg(long, value_name = "DIR")]
    keep_files: Option<PathBuf>,
}

#[derive(Serialize)]
struct Step {
    step: &'static str,
    name: String,
    size: u64,
    new_bytes: u64,
    stored_bytes: u64,
    reused_bytes: u64,
    seconds: f64,
}

#[derive(Serialize)]
struct DemoReport {
    store: PathBuf,
    steps: Vec<Step>,
    restored_identical: bool,
    restore_seconds: f64,
}

struct FileEntry {
    path: PathBuf,
    name: String,
}

/// Regular files under `roots`, sorted, up to `budget` bytes.
fn pick_files(roots: &[&str], budget: u64) -> Vec<FileEntry> {
    let mut out = Vec::new();
    let mut total = 0u64;
    for root in roots {
        let mut stack = vec![PathBuf::from(root)];
        let mut files = Vec::new();
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    stack.push(e.path());
                } else if ft.is_file() {
                    files.push(e.path());
                }
            }
        }
        files.sort();
        for path in files {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if total + meta.len() > budget || File::open(&path).is_err() {
                continue;
            }
            total += meta.len();
            let name = path.to_string_lossy().trim_start_matches('/').to_string();
            out.push(FileEntry { path, name });
        }
    }
    out
}

/// Writes a layer tar; `edit` may replace a file's bytes, `mtime` is every entry's.
fn write_layer(
    out: &Path,
    files: &[FileEntry],
    mtime: u64,
    extra: Option<(&str, Vec<u8>)>,
    edit: Option<usize>,
) -> anyhow::Result<String> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    for (i, f) in files.iter().enumerate() {
        let mut data = Vec::new();
        File::open(&f.path)?.read_to_end(&mut data)?;
        if edit == Some(i) && !data.is_empty() {
            let mid = data.len() / 2;
            let end = (mid + 64).min(data.len());
            data[mid..end].iter_mut().for_each(|b| *b ^= 0x5a);
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        tar.append_data(&mut h, &f.name, &data[..])?;
    }
    if let Some((name, data)) = extra {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        tar.append_data(&mut h, name, &data[..])?;
    }
    tar.into_inner()?.flush()?;
    let mut sha = Sha256::new();
    std::io::copy(&mut File::open(out)?, &mut sha)?;
    Ok(format!("{:x}", sha.finalize()))
}

/// Writes a docker-save-layout archive of the given layer tars.
fn write_archive(out: &Path, layers: &[(PathBuf, String)], tag: &str) -> anyhow::Result<()> {
    let diff_ids: Vec<String> = layers.iter().map(|(_, d)| format!("sha256:{d}")).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": std::env::consts::ARCH, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let config_hex = format!("{:x}", Sha256::digest(&config));
    let layer_paths: Vec<String> = layers
        .iter()
        .map(|(_, d)| format!("{d}/layer.tar"))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{config_hex}.json"), "RepoTags": [tag], "Layers": layer_paths,
    }]))?;
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        tar.append_data(&mut h, name, data)
    };
    add(&format!("{config_hex}.json"), &config)?;
    for ((path, _), name) in layers.iter().zip(&layer_paths) {
        let mut data = Vec::new();
        File::open(path)?.read_to_end(&mut data)?;
        add(name, &data)?;
    }
    add("manifest.json", &manifest)?;
    tar.into_inner()?.flush()?;
    Ok(())
}

fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

pub fn run(store_args: &StoreArgs, args: Args, out: &Output) -> anyhow::Result<()> {
    let store = store_args.open()?;
    let (_tmp, dir) = match &args.keep_files {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let say = |msg: String| {
        if !out.quiet && !out.json {
            eprintln!("{msg}");
        }
    };
    say(format!(
        "ferry demo: store {}, work files in {}",
        store.root().display(),
        dir.display()
    ));
    let budget = args.size.max(4 << 20);
    let libs = pick_files(
        &[
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib",
        ],
        budget / 2,
    );
    let share = pick_files(
        &[
            "/usr/share/doc",
            "/usr/share/zoneinfo",
            "/usr/share/perl5",
            "/usr/share",
        ],
        budget / 3,
    );
    let progs = pick_files(&["/usr/bin"], budget / 6);
    anyhow::ensure!(
        !progs.is_empty() && !libs.is_empty(),
        "found too few readable files under /usr to build a demo image"
    );

    let base_time = 1_700_000_000;
    let l = |n: &str| dir.join(n);
    let d_libs = write_layer(&l("libs.tar"), &libs, base_time, None, None)?;
    let d_share = write_layer(&l("share.tar"), &share, base_time, None, None)?;
    let d_progs = write_layer(&l("progs.tar"), &progs, base_time, None, None)?;
    let d_progs2 = write_layer(
        &l("progs2.tar"),
        &progs,
        base_time,
        Some((
            "usr/bin/ferry-demo-added",
            b"#!/bin/sh\necho added in v2\n".repeat(2000),
        )),
        Some(progs.len() / 2),
    )?;
    let d_share3 = write_layer(&l("share3.tar"), &share, base_time + 86_400, None, None)?;
    let v1 = l("v1.tar");
    let v2 = l("v2.tar");
    let v3 = l("v3.tar");
    write_archive(
        &v1,
        &[
            (l("libs.tar"), d_libs.clone()),
            (l("share.tar"), d_share.clone()),
            (l("progs.tar"), d_progs.clone()),
        ],
        "demo:v1",
    )?;
    write_archive(
        &v2,
        &[
            (l("libs.tar"), d_libs.clone()),
            (l("share.tar"), d_share),
            (l("progs2.tar"), d_progs2.clone()),
        ],
        "demo:v2",
    )?;
    write_archive(
        &v3,
        &[
            (l("libs.tar"), d_libs),
            (l("share3.tar"), d_share3),
            (l("progs2.tar"), d_progs2),
        ],
        "demo:v3",
    )?;

    let mut steps = Vec::new();
    let plan: [(&'static str, &str, &PathBuf); 3] = [
        ("1. first stash (cold)", "demo/v1", &v1),
        (
            "2. one layer changed (a file edited, one added)",
            "demo/v2",
            &v2,
        ),
        (
            "3. a layer rebuilt with new timestamps only",
            "demo/v3",
            &v3,
        ),
    ];
    for (step, name, path) in plan {
        let name = Name::parse(name)?;
        let r: StashReport = store.stash(&name, Source::File(path.clone()), &NoProgress)?;
        say(format!(
            "{step}: {} of {} -> {} new ({} stored), {} reused, {:.2} s ({})",
            r.name,
            bytes(r.size),
            bytes(r.new_bytes),
            bytes(r.stored_bytes),
            bytes(r.reused_bytes),
            r.seconds,
            rate(r.bytes_per_second)
        ));
        steps.push(Step {
            step,
            name: r.name,
            size: r.size,
            new_bytes: r.new_bytes,
            stored_bytes: r.stored_bytes,
            reused_bytes: r.reused_bytes,
            seconds: r.seconds,
        });
    }
    let restored = dir.join("restored-v3.tar");
    let _ = std::fs::remove_file(&restored);
    let r = store.unstash(
        &Name::parse("demo/v3")?,
        Target::File(restored.clone()),
        false,
        &NoProgress,
    )?;
    let identical = same_bytes(&restored, &v3)?;
    say(format!(
        "4. restored demo/v3 ({}) in {:.2} s: {}",
        bytes(r.size),
        r.seconds,
        if identical {
            "byte-identical to the archive"
        } else {
            "DIFFERENT"
        }
    ));
    let report = DemoReport {
        store: store.root().to_path_buf(),
        steps,
        restored_identical: identical,
        restore_seconds: r.seconds,
    };
    out.emit(&report, |r| {
        let mut s = String::new();
        let _ = writeln!(s, "\n{:<50} {:>10} {:>12} {:>8}", "step", "size", "stored", "time");
        for st in &r.steps {
            let _ = writeln!(s, "{:<50} {:>10} {:>12} {:>7.2}s", st.step, bytes(st.size), bytes(st.stored_bytes), st.seconds);
        }
        let _ = writeln!(
            s,
            "restore of demo/v3: {} in {:.2} s\nnext: ferry ls demo, ferry inspect demo/v3, ferry du",
            if r.restored_identical { "byte-identical" } else { "MISMATCH" },
            r.restore_seconds
        );
        s
    })?;
    anyhow::ensure!(identical, "the restored archive differs from the original");
    Ok(())
}
