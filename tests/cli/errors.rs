//! Errors are clear, exit 2, and leave nothing half-committed; odd inputs
//! still round-trip.

use crate::util::*;
use std::fs;

/// Nothing under the store's `refs/` (or no `refs/` at all).
fn no_refs(env: &Env) -> bool {
    fn count(dir: &std::path::Path) -> usize {
        fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        count(&p)
                    } else {
                        1
                    }
                })
                .sum()
            })
            .unwrap_or(0)
    }
    count(&env.store.join("refs")) == 0
}

#[test]
fn unstash_of_missing_name_fails_clearly() {
    let env = Env::new();
    env.stash_stdin("main/present", b"something");
    let target = env.path("x");
    let out = env.ferry(&["unstash", "nope", target.to_str().unwrap()]);
    out.expect_code(2);
    assert!(out.stderr.contains("nope"), "{}", out.stderr);
    assert!(!target.exists());
    let out = env.ferry(&["unstash", "main/nope", "-"]);
    out.expect_code(2);
    assert!(out.stderr.contains("main/nope"), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let out = env.ferry(&["inspect", "main/nope"]);
    out.expect_code(2);
    assert!(out.stderr.contains("main/nope"), "{}", out.stderr);
}

#[test]
fn unstash_from_a_store_that_does_not_exist_fails_clearly() {
    let env = Env::new();
    let out = env.ferry(&["unstash", "main/x", "-"]);
    out.expect_code(2);
    assert!(out.stderr.contains("main/x"), "{}", out.stderr);
}

#[test]
fn invalid_names_are_refused() {
    let env = Env::new();
    let long_part = "a".repeat(300);
    let long_path = vec!["abcdefghij"; 30].join("/"); // 329 bytes, short parts
    let bad = [
        "../x",
        "main/../x",
        "/abs",
        "a//b",
        "a/",
        "",
        "./a",
        "a/.hidden",
        "a\\b",
        "a b",
        "a\u{1}b",
        "a\nb",
        "a/x.ref",
        long_part.as_str(),
        long_path.as_str(),
    ];
    for name in bad {
        let out = env.ferry_in(&["stash", name, "-"], b"data");
        out.expect_code(2);
        assert!(
            out.stderr.contains("name"),
            "stash {name:?}: the message should explain the name: {}",
            out.stderr
        );
        let out = env.ferry(&["unstash", name, "-"]);
        out.expect_code(2);
        assert!(!out.stderr.is_empty(), "unstash {name:?}: a message");
        let out = env.ferry(&["rm", name]);
        out.expect_code(2);
    }
    assert!(no_refs(&env), "no ref written for an invalid name");
    assert!(!env.path("x.ref").exists() && !env.path("x").exists());
    assert!(env.names().is_empty());
    // A 255-byte name is fine.
    let ok = format!("main/{}", "b".repeat(128)) + "/" + &"c".repeat(121);
    assert_eq!(ok.len(), 255);
    env.stash_stdin(&ok, b"fine");
    assert_eq!(env.unstash_stdout(&ok), b"fine");
}

#[test]
fn store_path_that_is_a_regular_file_is_refused() {
    let env = Env::new();
    let file = env.path("not-a-dir");
    fs::write(&file, b"keep me").unwrap();
    let mut cmd = std::process::Command::new(FERRY);
    cmd.arg("--store").arg(&file).args(["stash", "main/x", "-"]);
    let out = run(&mut cmd, Some(b"data"));
    out.expect_code(2);
    assert!(
        out.stderr.contains("not-a-dir"),
        "message names the store: {}",
        out.stderr
    );
    assert_eq!(fs::read(&file).unwrap(), b"keep me");
    let mut cmd = std::process::Command::new(FERRY);
    cmd.arg("--store").arg(&file).arg("ls");
    run(&mut cmd, None).expect_code(2);
}

#[test]
fn store_under_a_regular_file_is_refused() {
    let env = Env::new();
    let file = env.path("file");
    fs::write(&file, b"x").unwrap();
    let mut cmd = std::process::Command::new(FERRY);
    cmd.arg("--store")
        .arg(file.join("store"))
        .args(["stash", "main/x", "-"]);
    let out = run(&mut cmd, Some(b"data"));
    out.expect_code(2);
    assert!(out.stderr.contains("store"), "{}", out.stderr);
}

/// Bind-mount `env`'s store read-only at `<dir>/ro`; `None` if not possible.
fn read_only_store(env: &Env) -> Option<(Mount, std::path::PathBuf)> {
    let ro = env.path("ro");
    let mount = Mount::bind_ro(&env.store, &ro)?;
    if fs::write(ro.join("probe"), b"x").is_ok() {
        eprintln!("note: the bind mount is writable; skipping");
        return None;
    }
    Some((mount, ro))
}

fn ferry_at(store: &std::path::Path, args: &[&str], input: Option<&[u8]>) -> Out {
    let mut cmd = std::process::Command::new(FERRY);
    cmd.arg("--store").arg(store).args(args);
    run(&mut cmd, input)
}

#[test]
fn read_only_store_refuses_stash_clearly() {
    let env = Env::new();
    env.stash_stdin("main/ro", b"data");
    let Some((mount, ro)) = read_only_store(&env) else {
        return;
    };
    let out = ferry_at(
        &ro,
        &["stash", "main/new", "-"],
        Some(&mixed_bytes(61, 1 << 20)),
    );
    out.expect_code(2);
    assert!(
        out.stderr.to_lowercase().contains("read-only"),
        "message says why: {}",
        out.stderr
    );
    drop(mount);
    assert_eq!(env.names(), vec!["main/ro".to_owned()]);
    env.fsck_clean(true);
}

#[test]
fn read_only_store_can_still_be_read() {
    let env = Env::new();
    let data = mixed_bytes(60, 1 << 20);
    env.stash_stdin("main/ro", &data);
    let Some((_mount, ro)) = read_only_store(&env) else {
        return;
    };
    let out = ferry_at(&ro, &["unstash", "main/ro", "-"], None);
    out.ok();
    assert_bytes_eq(&out.stdout, &data, "read from a read-only store");
    ferry_at(&ro, &["ls"], None).ok();
    ferry_at(&ro, &["inspect", "main/ro"], None).ok();
    ferry_at(&ro, &["fsck", "--full"], None).ok();
}

#[test]
fn store_open_error_is_said_once() {
    let env = Env::new();
    let file = env.path("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let out = ferry_at(&file, &["ls"], None);
    out.expect_code(2);
    assert_eq!(
        out.stderr.matches("Not a directory").count(),
        1,
        "the cause is printed once: {}",
        out.stderr
    );
}

#[test]
fn stash_of_missing_path_fails_and_creates_nothing() {
    let env = Env::new();
    let out = env.ferry(&["stash", "main/x", "no-such-file"]);
    out.expect_code(2);
    assert!(out.stderr.contains("no-such-file"), "{}", out.stderr);
    assert!(no_refs(&env));
}

#[test]
fn truncated_docker_archives_still_round_trip() {
    let env = Env::new();
    let layers: Vec<_> = (1..=2).map(|i| layer_files(70 + i, 6, 150_000)).collect();
    for layout in [Layout::DockerLegacy, Layout::DockerOci] {
        let img = image_archive(layout, &layers, "ex/trunc:v1", 1_700_000_000);
        let n = img.bytes.len();
        // Inside a header, inside layer data, mid-way, just before the end.
        for (i, cut) in [700, 1536 + 512 + 100, n / 3, n / 2 + 3, n - 1024, n - 1]
            .into_iter()
            .enumerate()
        {
            let data = &img.bytes[..cut];
            let name = format!("trunc/{layout:?}/{i}");
            let report = env.stash_stdin(&name, data);
            assert_eq!(report["size"], cut as u64);
            assert_bytes_eq(&env.unstash_stdout(&name), data, &name);
        }
    }
    env.fsck_clean(true);
}

#[test]
fn garbage_and_tar_lookalikes_round_trip() {
    let env = Env::new();
    let img = image_archive(
        Layout::DockerOci,
        &[layer_files(80, 4, 100_000)],
        "ex/g:v1",
        1_700_000_000,
    );
    // A valid header followed by garbage.
    let mut header_then_garbage = img.bytes[..512].to_vec();
    header_then_garbage.extend(random_bytes(81, 300_000));
    // A header with a broken checksum.
    let mut bad_checksum = img.bytes.clone();
    bad_checksum[148] ^= 1;
    // A layer's inner header damaged in the middle of the archive.
    let mut inner_damage = img.bytes.clone();
    inner_damage[1536 + 512 + 10] ^= 0xff;
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("random", random_bytes(82, 2 << 20)),
        ("zeros", vec![0u8; 700_000]),
        ("one-byte", vec![7]),
        ("one-block", vec![0u8; 512]),
        ("header-then-garbage", header_then_garbage),
        ("bad-checksum", bad_checksum),
        ("inner-damage", inner_damage),
        (
            "text",
            b"manifest.json oci-layout index.json\n".repeat(5000),
        ),
    ];
    for (what, data) in &inputs {
        let name = format!("garbage/{what}");
        env.stash_stdin(&name, data);
        assert_bytes_eq(&env.unstash_stdout(&name), data, what);
        let file = env.path(what);
        fs::write(&file, data).unwrap();
        let name = format!("garbage-file/{what}");
        env.stash_path(&name, &file);
        assert_bytes_eq(&env.unstash_stdout(&name), data, what);
    }
    env.fsck_clean(true);
}

#[test]
fn existing_target_needs_force() {
    let env = Env::new();
    let data = mixed_bytes(90, 500_000);
    env.stash_stdin("main/f", &data);
    let target = env.path("target.bin");
    fs::write(&target, b"precious").unwrap();
    let out = env.ferry(&["unstash", "main/f", target.to_str().unwrap()]);
    out.expect_code(2);
    assert!(out.stderr.contains("--force"), "{}", out.stderr);
    assert_eq!(fs::read(&target).unwrap(), b"precious");
    env.ferry(&["unstash", "--force", "main/f", target.to_str().unwrap()])
        .ok();
    assert_bytes_eq(&fs::read(&target).unwrap(), &data, "forced");

    // Directories: a non-empty target is refused without --force.
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), b"A").unwrap();
    env.stash_path("main/d", &src);
    let dst = env.path("dst");
    fs::create_dir(&dst).unwrap();
    fs::write(dst.join("keep"), b"K").unwrap();
    let out = env.ferry(&["unstash", "main/d", dst.to_str().unwrap()]);
    out.expect_code(2);
    assert!(out.stderr.contains("--force"), "{}", out.stderr);
    assert!(!dst.join("a").exists());
    env.ferry(&["unstash", "--force", "main/d", dst.to_str().unwrap()])
        .ok();
    assert_eq!(fs::read(dst.join("a")).unwrap(), b"A");

    // A directory stash cannot go to a file, nor a file stash into a dir.
    let out = env.ferry(&["unstash", "main/d", target.to_str().unwrap()]);
    out.expect_code(2);
    assert_bytes_eq(&fs::read(&target).unwrap(), &data, "untouched");
}

#[test]
fn rm_removes_and_missing_rm_fails() {
    let env = Env::new();
    env.stash_stdin("main/a", b"aaa");
    env.stash_stdin("main/b", b"bbb");
    let out = env.ferry(&["rm", "main/nope"]);
    out.expect_code(2);
    assert!(out.stderr.contains("main/nope"), "{}", out.stderr);
    assert_eq!(env.names(), vec!["main/a".to_owned(), "main/b".to_owned()]);

    env.ferry(&["rm", "main/a"]).ok();
    assert_eq!(env.names(), vec!["main/b".to_owned()]);
    let out = env.ferry(&["ls"]);
    out.ok();
    assert!(!out.out().contains("main/a"), "{}", out.out());
    env.ferry(&["unstash", "main/a", "-"]).expect_code(2);
    env.ferry(&["inspect", "main/a"]).expect_code(2);
    env.ferry(&["rm", "main/a"]).expect_code(2);
    assert_eq!(env.unstash_stdout("main/b"), b"bbb");
    env.fsck_clean(true);
}

#[test]
fn rm_prefix_removes_whole_parts_only() {
    let env = Env::new();
    for n in ["ci/1/cpu", "ci/1/gpu", "ci/10/cpu", "main/x"] {
        env.stash_stdin(n, n.as_bytes());
    }
    // Names and --prefix do not mix; one of them is needed.
    env.ferry(&["rm", "--prefix", "ci/1", "main/x"])
        .expect_code(2);
    env.ferry(&["rm"]).expect_code(2);
    let out = env.ferry(&["rm", "--prefix", "ci/../main"]);
    out.expect_code(2);
    assert_eq!(env.names().len(), 4);

    let out = env.ferry(&["--json", "rm", "--prefix", "ci/1/"]);
    out.ok();
    assert_eq!(out.json(), serde_json::json!(["ci/1/cpu", "ci/1/gpu"]));
    assert_eq!(env.names(), ["ci/10/cpu", "main/x"]);
    let out = env.ferry(&["rm", "--prefix", "ci/1"]);
    out.ok();
    assert!(out.out().contains("nothing to remove"), "{}", out.out());
    assert_eq!(env.unstash_stdout("ci/10/cpu"), b"ci/10/cpu");
    env.fsck_clean(true);
}

#[test]
fn ls_prefix_matches_whole_parts() {
    let env = Env::new();
    for name in ["main/x", "main/y/z", "mainline/x", "pr/1/x"] {
        env.stash_stdin(name, name.as_bytes());
    }
    let out = env.ferry(&["--json", "ls", "main"]);
    out.ok();
    let names: Vec<_> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["main/x", "main/y/z"]);
}
