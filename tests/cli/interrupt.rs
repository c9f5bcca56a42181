//! An unstash into a file that is interrupted leaves no partial output: a
//! signal it can catch (SIGINT, SIGTERM as CI cancels a job, SIGHUP) makes
//! it remove its scratch file, then end by that signal (a remote one first
//! keeps the chunks that arrived); what a SIGKILL leaves is swept by the
//! next restore into the same directory.

use crate::util::*;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Scratch (`.ferry-unstash-*`) in `dir`.
fn scratch_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".ferry-unstash-")
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Spawns `unstash` (an unstash into a file in `dir`) and returns it as soon
/// as its scratch file is there and holds `written` bytes; `None` if it
/// finished first.
fn start_until_scratch(
    mut unstash: Command,
    dir: &Path,
    stderr: &Path,
    written: u64,
) -> Option<Child> {
    let before = scratch_in(dir).len();
    let mut child = unstash
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let scratch = scratch_in(dir);
        // Allocated blocks: the file is sparse until written.
        let allocated = |p: &PathBuf| fs::metadata(p).map_or(0, |m| m.blocks() * 512);
        if scratch.len() > before && scratch.iter().any(|p| allocated(p) >= written) {
            return Some(child);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}: {}", read(stderr));
            return None;
        }
        assert!(
            Instant::now() < until,
            "no scratch file appeared in {dir:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
}

/// Interrupts `unstash` (into `target`) with each signal in turn; checks
/// that each run ends by that signal, says so, and leaves no scratch.
fn interrupt_each(
    unstash: impl Fn() -> Command,
    target: &Path,
    data: &[u8],
    signals: &[(libc::c_int, &str)],
) {
    let dir = target.parent().unwrap();
    let stderr = dir.join("unstash.stderr");
    for &(sig, sig_name) in signals {
        let mut interrupted = false;
        for _ in 0..10 {
            let Some(mut child) = start_until_scratch(unstash(), dir, &stderr, 0) else {
                // Finished before it could be interrupted: again.
                fs::remove_file(target).unwrap();
                continue;
            };
            signal(&child, sig);
            let status = child.wait().unwrap();
            if status.success() {
                fs::remove_file(target).unwrap();
                continue;
            }
            // Ended by the signal, as a calling shell script needs to see.
            assert_eq!(status.signal(), Some(sig), "{status:?}: {}", read(&stderr));
            assert!(
                read(&stderr).contains(&format!("interrupted by {sig_name}")),
                "{}",
                read(&stderr)
            );
            assert_eq!(scratch_in(dir), Vec::<PathBuf>::new(), "after {sig_name}");
            // Only a signal that came after the rename finds a target, whole.
            if let Ok(got) = fs::read(target) {
                assert_bytes_eq(&got, data, "a target renamed before the signal");
                fs::remove_file(target).unwrap();
            }
            interrupted = true;
            break;
        }
        assert!(interrupted, "ten unstashes all ended before {sig_name}");
    }
}

/// A store holding 64 MiB of mixed bytes from `seed` as main/big, and an
/// empty directory for targets.
fn big_stash(seed: u64) -> (Env, Vec<u8>, PathBuf) {
    let env = Env::new();
    let data = mixed_bytes(seed, 64 << 20);
    env.stash_stdin("main/big", &data);
    let out = env.path("out");
    fs::create_dir(&out).unwrap();
    (env, data, out)
}

#[test]
fn a_signal_during_an_unstash_to_a_file_removes_the_partial_file() {
    let (env, data, out) = big_stash(41);
    let target = out.join("image.tar");
    let unstash = || {
        let mut c = env.cmd();
        c.args(["-q", "unstash", "main/big"]).arg(&target);
        c
    };
    interrupt_each(
        unstash,
        &target,
        &data,
        &[
            (libc::SIGTERM, "SIGTERM"),
            (libc::SIGINT, "SIGINT"),
            (libc::SIGHUP, "SIGHUP"),
        ],
    );
}

#[test]
fn a_signal_winds_a_remote_unstash_down_keeping_what_arrived() {
    let root = tempfile::tempdir().unwrap();
    let token = root.path().join("ci.token");
    let hash = new_token(&token);
    let server = serve(
        root.path(),
        &format!(
            "[[token]]\nname = \"ci\"\nsha256 = \"{hash}\"\nread = [\"*\"]\nwrite = [\"*\"]\n"
        ),
    );
    let remote = |env: &Env| {
        let mut c = env.cmd();
        c.env("FERRY_REMOTE", &server.remote)
            .env("FERRY_SERVER_CERT", &server.cert)
            .env("FERRY_TOKEN_FILE", &token);
        c
    };
    // Less than one pack (64 MiB) of chunks: without the wind-down, a
    // stopped unstash would keep none of them.
    let data = mixed_bytes(42, 64 << 20);
    let builder = Env::new();
    run(
        remote(&builder).args(["-q", "stash", "main/big", "-"]),
        Some(&data),
    )
    .ok();

    let node = Env::new();
    let out = node.path("out");
    fs::create_dir(&out).unwrap();
    let target = out.join("image.tar");
    let stderr = node.path("unstash.stderr");
    let mut stopped = false;
    for _ in 0..10 {
        // From an empty node cache: every chunk comes over the wire, out
        // of order, and is written by offset.
        let _ = fs::remove_dir_all(&node.store);
        let mut unstash = remote(&node);
        unstash.args(["-q", "unstash", "main/big"]).arg(&target);
        // Stopped once some of it is in.
        let Some(mut child) = start_until_scratch(unstash, &out, &stderr, 8 << 20) else {
            fs::remove_file(&target).unwrap();
            continue;
        };
        signal(&child, libc::SIGTERM);
        let status = child.wait().unwrap();
        if status.success() {
            fs::remove_file(&target).unwrap();
            continue;
        }
        assert_eq!(
            status.signal(),
            Some(libc::SIGTERM),
            "{status:?}: {}",
            read(&stderr)
        );
        assert!(
            read(&stderr)
                .contains("interrupted by SIGTERM; the chunks fetched were kept for the next run"),
            "{}",
            read(&stderr)
        );
        assert_eq!(scratch_in(&out), Vec::<PathBuf>::new());
        assert!(!target.exists());
        stopped = true;
        break;
    }
    assert!(stopped, "ten unstashes all ended before SIGTERM");

    // The same command again: what had arrived is in the node's store.
    let again = run(
        remote(&node).args(["--json", "unstash", "main/big", target.to_str().unwrap()]),
        None,
    );
    again.ok();
    let t = &again.json()["transfer"];
    let (chunks, present, received) = (
        t["chunks"].as_u64().unwrap(),
        t["chunks_present"].as_u64().unwrap(),
        t["chunks_received"].as_u64().unwrap(),
    );
    assert!(present > 0, "nothing was kept: {t}");
    assert!(received > 0, "it was stopped before the end: {t}");
    assert_eq!(present + received, chunks, "{t}");
    assert_bytes_eq(&fs::read(&target).unwrap(), &data, "the resumed unstash");
}

#[test]
fn what_a_killed_unstash_leaves_is_swept_by_the_next_restore_beside_it() {
    let (env, data, out) = big_stash(43);
    let stderr = env.path("unstash.stderr");
    let unstash = |target: &str| {
        let mut c = env.cmd();
        c.args(["-q", "unstash", "main/big"]).arg(out.join(target));
        c
    };

    let mut left = Vec::new();
    for _ in 0..10 {
        let Some(mut child) = start_until_scratch(unstash("killed.tar"), &out, &stderr, 0) else {
            fs::remove_file(out.join("killed.tar")).unwrap();
            continue;
        };
        child.kill().unwrap();
        let status = child.wait().unwrap();
        left = scratch_in(&out);
        if status.success() {
            fs::remove_file(out.join("killed.tar")).unwrap();
            continue;
        }
        break;
    }
    assert_eq!(left.len(), 1, "a SIGKILL leaves its scratch: {left:?}");
    assert!(!out.join("killed.tar").exists());

    // Too young to be told from one whose owner has just created it.
    env.ferry(&[
        "-q",
        "unstash",
        "main/big",
        out.join("a.tar").to_str().unwrap(),
    ])
    .ok();
    assert_eq!(scratch_in(&out), left);

    // Older than a minute and nobody holds its lock: the next one sweeps it.
    let then = SystemTime::now() - Duration::from_secs(120);
    File::open(&left[0]).unwrap().set_modified(then).unwrap();
    env.ferry(&[
        "-q",
        "unstash",
        "main/big",
        out.join("b.tar").to_str().unwrap(),
    ])
    .ok();
    assert_eq!(scratch_in(&out), Vec::<PathBuf>::new());
    assert_bytes_eq(&fs::read(out.join("b.tar")).unwrap(), &data, "b.tar");
}
