//! Crash safety: SIGKILL a running `ferry stash` / `ferry unstash` at random
//! points; the store must stay consistent and every name must read back as
//! a complete version, never a mix or an error.

use crate::util::*;
use rand::Rng;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A seed that differs per run, printed so a failure can be replayed by
/// setting `FERRY_TEST_SEED`.
fn seed() -> u64 {
    let seed = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("FERRY_TEST_SEED={seed}");
    seed
}

/// How a stash child ends.
#[derive(Debug)]
enum Ending {
    /// Killed while stdin was still being fed, after this many pieces.
    KilledFeeding(usize),
    /// Killed this long after stdin was closed.
    KilledAfterInput(Duration),
    /// Not killed.
    Never,
}

/// The longest a killed-or-not child may run before the test calls it hung.
const HUNG: Duration = Duration::from_secs(120);

/// Feed `data` to a `ferry stash NAME -` child in 1 MiB pieces with pauses,
/// and kill it as `ending` says. Returns whether the child finished on its
/// own with exit 0 before the kill, and how long it ran after its input
/// ended.
fn stash_and_kill(env: &Env, name: &str, data: &[u8], ending: &Ending) -> (bool, Duration) {
    let stderr = env.path("child.stderr");
    let mut child = env
        .cmd()
        .args(["-q", "stash", name, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn ferry");
    let stdin = child.stdin.take().unwrap();
    let fed = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let closed: Mutex<Option<Instant>> = Mutex::new(None);
    let started = Instant::now();
    let (killed, after_input) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut stdin = stdin;
            for piece in data.chunks(1 << 20) {
                if stop.load(Ordering::SeqCst) || stdin.write_all(piece).is_err() {
                    return; // killed
                }
                fed.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
            drop(stdin);
            *closed.lock().unwrap() = Some(Instant::now());
        });
        let since_close = || closed.lock().unwrap().map(|t| t.elapsed());
        loop {
            if child.try_wait().unwrap().is_some() {
                stop.store(true, Ordering::SeqCst);
                return (false, since_close().unwrap_or_default());
            }
            let kill = match ending {
                Ending::KilledFeeding(at) => fed.load(Ordering::SeqCst) >= *at,
                Ending::KilledAfterInput(delay) => since_close().is_some_and(|t| t >= *delay),
                Ending::Never => false,
            };
            if kill || started.elapsed() > HUNG {
                child.kill().unwrap();
                stop.store(true, Ordering::SeqCst);
                assert!(started.elapsed() <= HUNG, "ferry stash hung for {HUNG:?}");
                return (true, since_close().unwrap_or_default());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    (finish(child, killed, &stderr), after_input)
}

/// Reap a child; true when it exited 0 (a kill that came too late counts
/// as finished). A child that exited on its own with an error fails the
/// test.
fn finish(mut child: Child, killed: bool, stderr: &Path) -> bool {
    let status = child.wait().unwrap();
    if killed && status.code().is_none() {
        return false;
    }
    assert!(
        status.success(),
        "ferry failed on its own: {status:?}: {}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
    true
}

/// Whether `name` is listed, and if so its bytes (which must unstash).
fn read_name(env: &Env, name: &str) -> Option<Vec<u8>> {
    let listed = env.names().iter().any(|n| n == name);
    let out = env.ferry(&["unstash", name, "-"]);
    if listed {
        out.ok();
        Some(out.stdout)
    } else {
        out.expect_code(2);
        assert!(
            out.stderr.contains(name),
            "error should name {name}: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "no bytes for a missing name");
        None
    }
}

/// Known bug (see `pack_left_without_index_by_a_kill_is_not_a_problem`): a
/// kill between a pack's rename and its `.idx` write makes `ferry fsck`
/// report "pack … has no index" and exit 1. While it stands, the random-kill
/// test tolerates exactly that problem (and says so on stderr) so that it
/// keeps checking everything else; set this to false once it is fixed.
const TOLERATE_PACK_WITHOUT_INDEX: bool = false;

/// `ferry fsck [--full]` after a kill: clean, or only the known bug.
#[track_caller]
fn fsck_after_kill(env: &Env, full: bool) {
    let mut args = vec!["--json", "fsck"];
    if full {
        args.push("--full");
    }
    let out = env.ferry(&args);
    if out.code() == Some(1) && TOLERATE_PACK_WITHOUT_INDEX {
        let report = out.json();
        let problems = report["problems"].as_array().expect("problems");
        let known = |p: &serde_json::Value| {
            p["subject"] == "index"
                && p["problem"]
                    .as_str()
                    .is_some_and(|t| t.contains("has no index"))
        };
        if !problems.is_empty() && problems.iter().all(known) {
            eprintln!("known bug seen: {report}");
            return;
        }
    }
    env.fsck_clean(full);
}

#[test]
fn sigkill_during_stash_leaves_old_or_new_never_broken() {
    let seed = seed();
    let mut r = rng(seed);
    let env = Env::new();
    let old = mixed_bytes(20, 3 << 20);
    env.stash_stdin("main/crash", &old);
    // Each attempt stashes bytes that start like `old` (reused chunks) and
    // go on with bytes the store has never seen (a pack to write).
    let version = |i: u64| {
        let mut v = old.clone();
        v.extend_from_slice(&mixed_bytes(seed.wrapping_add(i), 13 << 20));
        v
    };
    let pieces = version(0).len().div_ceil(1 << 20);

    // How long a stash takes to commit once its input has ended: kills
    // after the input are spread over that window.
    let (done, commit) = stash_and_kill(&env, "main/calibrate", &version(1000), &Ending::Never);
    assert!(done);
    let commit_us = (commit.as_micros() as u64).max(1000);
    eprintln!("a stash commits {commit:?} after its input ends");

    let mut current = old.clone();
    let mut finished = 0;
    // Fresh names that exist after their kill, with the SHA-256 of their bytes.
    let mut fresh = Vec::new();
    const ROUNDS: u64 = 12;
    for i in 0..ROUNDS {
        let new = version(i);
        let ending = if r.random_bool(0.4) {
            Ending::KilledFeeding(r.random_range(0..pieces))
        } else {
            Ending::KilledAfterInput(Duration::from_micros(r.random_range(0..commit_us * 3 / 2)))
        };
        let name = if i % 2 == 0 {
            "main/crash".to_owned()
        } else {
            format!("fresh/n{i}")
        };
        let (done, _) = stash_and_kill(&env, &name, &new, &ending);
        finished += done as u32;
        eprintln!("iteration {i}: {name} {ending:?}, finished: {done}");

        fsck_after_kill(&env, false);
        let got = read_name(&env, &name);
        if name == "main/crash" {
            let got = got.expect("main/crash had a version: it must still exist");
            if got == new {
                current = new;
            } else {
                assert!(!done, "a finished stash must be visible");
                assert_bytes_eq(&got, &current, "main/crash after a kill: the old version");
            }
        } else {
            match got {
                Some(got) => {
                    assert_bytes_eq(&got, &new, &name);
                    fresh.push((name, sha256_hex(&new)));
                }
                None => assert!(!done, "{name}: a finished stash must exist"),
            }
        }
    }
    eprintln!("{finished} of {ROUNDS} stashes finished before the kill");
    fsck_after_kill(&env, true);
    // Collecting the garbage the kills left must not touch live data.
    for _ in 0..2 {
        env.ferry(&["gc", "--grace", "0s"]).ok();
    }
    assert_bytes_eq(
        &env.unstash_stdout("main/crash"),
        &current,
        "main/crash after gc",
    );
    for (name, sha) in &fresh {
        assert_eq!(
            &sha256_hex(&env.unstash_stdout(name)),
            sha,
            "{name} after gc"
        );
    }
    fsck_after_kill(&env, true);
    // The store still works: stashing again succeeds and reads back.
    let after = version(2000);
    env.stash_stdin("main/after", &after);
    assert_bytes_eq(&env.unstash_stdout("main/after"), &after, "after");
    assert_bytes_eq(&env.unstash_stdout("main/crash"), &current, "main/crash");
    fsck_after_kill(&env, true);
}

/// The state a stash killed between writing its pack and its `.idx` leaves
/// (pack files are renamed in first, then the `.idx`, then the manifest and
/// the ref): a pack nobody indexes or references. Made deterministically
/// here by stashing, removing the name, and deleting the `.idx` and the
/// manifest.
#[test]
fn pack_left_without_index_by_a_kill_is_not_a_problem() {
    let env = Env::new();
    let data = random_bytes(35, 2 << 20);
    env.stash_stdin("main/x", &data);
    env.ferry(&["rm", "main/x"]).ok();
    for dir in ["index", "manifests"] {
        let dir = env.store.join(dir);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
    }
    assert_eq!(env.packs().len(), 1);
    let out = env.ferry(&["fsck"]);
    for suggested in ["--repair", "ferry gc"] {
        if out.stdout_contains(suggested) {
            let help = env.ferry(&["fsck", "--help"]);
            let gc = env.ferry(&["gc", "--help"]);
            assert!(
                help.out().contains("--repair") && gc.code() == Some(0),
                "fsck suggests {suggested:?}, which does not exist: {}",
                out.out()
            );
        }
    }
    out.ok();
    env.fsck_clean(true);
    // And the data can be stashed again.
    env.stash_stdin("main/x", &data);
    assert_bytes_eq(&env.unstash_stdout("main/x"), &data, "main/x");
}

#[test]
fn sigkill_during_unstash_to_file_leaves_no_partial_file() {
    let seed = seed();
    let mut r = rng(seed);
    let env = Env::new();
    let data = mixed_bytes(30, 24 << 20);
    env.stash_stdin("main/big", &data);
    let fresh = env.path("fresh.bin");
    let existing = env.path("existing.bin");
    let before = b"the previous contents".to_vec();
    std::fs::write(&existing, &before).unwrap();

    // How long a whole unstash takes: kills are spread over that time.
    let started = Instant::now();
    env.ferry(&["-q", "unstash", "main/big", fresh.to_str().unwrap()])
        .ok();
    let full_us = (started.elapsed().as_micros() as u64).max(1000);
    assert_bytes_eq(&std::fs::read(&fresh).unwrap(), &data, "calibration");
    std::fs::remove_file(&fresh).unwrap();

    for i in 0..8 {
        let (target, force) = if i % 2 == 0 {
            (&fresh, false)
        } else {
            (&existing, true)
        };
        let mut cmd = env.cmd();
        cmd.args(["-q", "unstash", "main/big"]).arg(target);
        if force {
            cmd.arg("--force");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(env.path("child.stderr")).unwrap())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(r.random_range(0..full_us)));
        let killed = child.try_wait().unwrap().is_none();
        if killed {
            child.kill().unwrap();
        }
        // Either it had exited (reaped at once) or it is killed now.
        let done = finish(child, killed, &env.path("child.stderr"));
        eprintln!("iteration {i}: killed: {killed}, finished: {done}");
        match std::fs::read(target) {
            Ok(got) if force && got == before => assert!(!done),
            Ok(got) => assert_bytes_eq(&got, &data, "target after a kill"),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
                assert!(!done && !force, "the target must exist");
            }
        }
        if !force {
            let _ = std::fs::remove_file(&fresh);
        } else {
            std::fs::write(&existing, &before).unwrap();
        }
    }
}
