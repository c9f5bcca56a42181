//! Garbage collection beside running stashes, gc killed at random points,
//! retention through the CLI, and the node-cache size limit.

use crate::util::*;
use rand::Rng;
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An image related to the others: a shared base with a few changed regions.
fn related_image(base: &[u8], worker: usize, version: usize) -> Vec<u8> {
    let mut img = base.to_vec();
    let mut r = rng((worker * 1000 + version) as u64);
    for _ in 0..3 {
        let at = r.random_range(0..img.len() - 70_000);
        let patch = random_bytes(r.random(), 64 * 1024);
        img[at..at + patch.len()].copy_from_slice(&patch);
    }
    img
}

fn gc_json(env: &Env, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "gc", "--grace", "0", "--mark-slack", "1s"];
    args.extend_from_slice(extra);
    let out = env.ferry(&args);
    out.ok();
    out.json()
}

#[test]
fn gc_runs_beside_stashing_and_deleting_processes() {
    let env = Env::new();
    let base = mixed_bytes(7, 3 << 20);
    // What each surviving name must hold.
    let expected: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let (base, expected, env) = (base.clone(), Arc::clone(&expected), env.clone());
            std::thread::spawn(move || {
                for v in 0..10 {
                    let name = format!("w{w}/img/{v}");
                    let img = related_image(&base, w, v);
                    env.stash_stdin(&name, &img);
                    expected.lock().unwrap().insert(name, img);
                    if v >= 2 {
                        let old = format!("w{w}/img/{}", v - 2);
                        env.ferry(&["rm", &old]).ok();
                        expected.lock().unwrap().remove(&old);
                    }
                }
            })
        })
        .collect();
    let collector = {
        let (env, done) = (env.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let started = Instant::now();
            let (mut runs, mut deleted) = (0, 0);
            while !done.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(90) {
                deleted += gc_json(&env, &[])["packs_deleted"].as_u64().unwrap();
                runs += 1;
            }
            (runs, deleted)
        })
    };
    for w in workers {
        w.join().expect("a stashing worker failed");
    }
    done.store(true, Ordering::SeqCst);
    let (runs, deleted_during) = collector.join().expect("the collector failed");
    assert!(runs > 0, "gc never ran");

    // With nothing else running, two more passes (repacking every pack
    // with any dead chunk) delete everything dead.
    let first = gc_json(&env, &["--repack-below", "1"]);
    let second = gc_json(&env, &["--repack-below", "1"]);
    let deleted =
        first["packs_deleted"].as_u64().unwrap() + second["packs_deleted"].as_u64().unwrap();
    let expected = expected.lock().unwrap();
    assert_eq!(env.names().len(), expected.len());
    for (name, data) in expected.iter() {
        assert_bytes_eq(&env.unstash_stdout(name), data, name);
    }
    env.fsck_clean(true);
    // Deleted names freed something at some point (in the loop or after).
    let du = env.ferry(&["--json", "du"]);
    du.ok();
    assert_eq!(
        du.json()["unreferenced_stored_bytes"],
        0,
        "dead data left after gc: {}",
        du.json()
    );
    eprintln!("gc runs during the stashes: {runs}, packs deleted then: {deleted_during}; afterwards: {deleted}");
}

#[test]
fn gc_killed_at_random_points_loses_nothing_and_the_next_run_finishes() {
    let env = Env::new();
    let mut keep = Vec::new();
    for i in 0..6 {
        let data = mixed_bytes(100 + i, 1 << 20);
        env.stash_stdin(&format!("n/{i}"), &data);
        keep.push(data);
    }
    for i in (0..6).step_by(2) {
        env.ferry(&["rm", &format!("n/{i}")]).ok();
    }
    let mut r = rng(42);
    for round in 0..10 {
        let mut child = env
            .cmd()
            .args([
                "-q",
                "gc",
                "--grace",
                "0",
                "--mark-slack",
                "0s",
                "--repack-below",
                "0.9",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(r.random_range(0..40)));
        let _ = child.kill();
        let _ = child.wait();
        // Whatever the kill interrupted: consistent, and nothing live lost.
        env.fsck_clean(false);
        for i in (1..6).step_by(2) {
            assert_bytes_eq(
                &env.unstash_stdout(&format!("n/{i}")),
                &keep[i],
                &format!("round {round}"),
            );
        }
    }
    // The next runs finish the job.
    gc_json(&env, &["--repack-below", "1"]);
    gc_json(&env, &["--repack-below", "1"]);
    env.fsck_clean(true);
    let du = env.ferry(&["--json", "du"]);
    du.ok();
    assert_eq!(du.json()["unreferenced_stored_bytes"], 0, "{}", du.json());
}

#[test]
fn retention_through_the_cli() {
    let env = Env::new();
    for n in [
        "build/5678/lib",
        "build/5679/lib",
        "main/ci/a",
        "main/ci/b",
        "main/ci/c",
    ] {
        env.stash_stdin(n, &random_bytes(n.len() as u64, 300_000));
        std::thread::sleep(Duration::from_millis(1100)); // distinct stash times (seconds)
    }
    // Dry run: says what it would remove, removes nothing.
    let out = env.ferry(&["--json", "gc", "--prefix", "build/5678", "--dry-run"]);
    out.ok();
    let plan = out.json();
    assert_eq!(plan["names_removed"][0]["name"], "build/5678/lib");
    assert_eq!(env.names().len(), 5);
    // A finished build's scope.
    gc_json(&env, &["--prefix", "build/5678"]);
    assert!(!env.names().contains(&"build/5678/lib".to_string()));
    // Keep the newest two of main/ci.
    gc_json(&env, &["--prefix", "main", "--keep-last", "2"]);
    assert_eq!(env.names(), ["build/5679/lib", "main/ci/b", "main/ci/c"]);
    // Policies from a config file.
    std::fs::write(
        env.path("gc.toml"),
        "grace = \"0s\"\n[[retention]]\nprefix = \"build\"\nmax_age = \"1s\"\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    env.ferry(&["gc", "--config", env.path("gc.toml").to_str().unwrap()])
        .ok();
    assert_eq!(env.names(), ["main/ci/b", "main/ci/c"]);
    // Errors are clear.
    let bad = env.ferry(&["gc", "--max-age", "soon"]);
    assert_eq!(bad.code(), Some(2));
    let bad = env.ferry(&["gc", "--prefix", "a/../b"]);
    assert_eq!(bad.code(), Some(2));
    assert!(bad.stderr.contains("invalid"), "{}", bad.stderr);
}

#[test]
fn cache_limit_holds_after_every_command() {
    let env = Env::new();
    let limit: u64 = 5 << 20;
    let images: Vec<Vec<u8>> = (0..5).map(|i| random_bytes(900 + i, 2 << 20)).collect();
    let stored = |env: &Env| -> u64 {
        let du = env.ferry(&["--json", "du"]);
        du.ok();
        let j = du.json();
        j["pack_bytes"].as_u64().unwrap() + j["manifest_bytes"].as_u64().unwrap()
    };
    for (i, img) in images.iter().enumerate() {
        let name = format!("cache/{i}");
        let out = env.ferry_in(&["--cache-size", "5MiB", "stash", &name, "-"], img);
        out.ok();
        assert!(
            stored(&env) <= limit,
            "over the limit after stashing {name}"
        );
        // The image just stashed is always kept, and restores exactly.
        assert_bytes_eq(&env.unstash_stdout(&name), img, &name);
    }
    // Every name still there restores byte-exactly; the newest survived.
    let names = env.names();
    assert!(
        names.contains(&"cache/4".to_string()) && names.len() < 5,
        "{names:?}"
    );
    for n in &names {
        let i: usize = n.rsplit('/').next().unwrap().parse().unwrap();
        assert_bytes_eq(&env.unstash_stdout(n), &images[i], n);
    }
    // Unstashing through the cache also enforces the limit.
    let out = env.ferry(&["--cache-size", "3MiB", "unstash", "cache/4", "-"]);
    out.ok();
    assert!(stored(&env) <= 3 << 20);
    assert_eq!(env.names(), ["cache/4"]);
    env.fsck_clean(true);
}
