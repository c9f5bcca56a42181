//! A full disk: a clear error, nothing committed, and the store recovers.

use crate::util::*;
use std::fs;

/// Bytes used under `dir`, counting file sizes.
fn used(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            total += if m.is_dir() { used(&p) } else { m.len() };
        }
    }
    total
}

#[test]
fn full_disk_fails_cleanly_and_the_store_recovers() {
    let mut env = Env::new();
    let Some(mount) = Mount::tmpfs(&env.path("small"), "size=20m") else {
        return;
    };
    env.store = mount.dir.join("store");
    env.stash_stdin("main/before", b"a small stash that was there first");

    // 40 MB of incompressible bytes cannot fit in 20 MB.
    let big = random_bytes(110, 40 << 20);
    let file = env.path("big.bin");
    fs::write(&file, &big).unwrap();
    for (name, from_stdin) in [("main/big", false), ("main/big-stdin", true)] {
        let out = if from_stdin {
            env.ferry_in(&["stash", name, "-"], &big)
        } else {
            env.ferry(&["stash", name, file.to_str().unwrap()])
        };
        out.expect_code(2);
        let msg = out.stderr.to_lowercase();
        assert!(
            msg.contains("no space"),
            "the message should say the disk is full: {}",
            out.stderr
        );
        env.fsck_clean(false);
        assert!(!env.names().contains(&name.to_owned()));
        let out = env.ferry(&["unstash", name, "-"]);
        out.expect_code(2);
        assert!(out.stdout.is_empty());
        // The failed stash left no big temporary files behind.
        let left = used(&env.store);
        assert!(
            left < 4 << 20,
            "{left} bytes left in the store after a failed stash"
        );
    }
    env.fsck_clean(true);

    // With the space free again, a smaller stash succeeds.
    let small = random_bytes(111, 6 << 20);
    env.stash_stdin("main/small", &small);
    assert_bytes_eq(&env.unstash_stdout("main/small"), &small, "small");
    assert_eq!(
        env.unstash_stdout("main/before"),
        b"a small stash that was there first"
    );
    env.fsck_clean(true);
}
