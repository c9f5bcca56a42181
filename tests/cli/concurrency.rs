//! Several `ferry` processes on one store at once.

use crate::util::*;

/// Run `ferry stash NAME -` for every (name, data) at the same time.
fn stash_all(env: &Env, jobs: &[(&str, &[u8])]) -> Vec<Out> {
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(name, data)| {
                s.spawn(move || env.ferry_in(&["--json", "stash", name, "-"], data))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_stashes_with_overlapping_data_at_once() {
    let env = Env::new();
    let x = mixed_bytes(40, 4 << 20);
    let y = mixed_bytes(41, 6 << 20);
    let z = mixed_bytes(42, 4 << 20);
    let a = [x.as_slice(), y.as_slice()].concat();
    let b = [y.as_slice(), z.as_slice()].concat();
    for round in 0..2 {
        let na = format!("main/a{round}");
        let nb = format!("main/b{round}");
        let outs = stash_all(&env, &[(&na, &a), (&nb, &b)]);
        for out in &outs {
            out.ok();
        }
        assert_bytes_eq(&env.unstash_stdout(&na), &a, &na);
        assert_bytes_eq(&env.unstash_stdout(&nb), &b, &nb);
    }
    // The second round found everything already stored.
    let again = env.stash_stdin("main/c", &a);
    assert_eq!(again["new_bytes"], 0, "{again}");
    env.fsck_clean(true);
}

#[test]
fn same_name_stashed_twice_at_once_ends_as_one_of_them() {
    let env = Env::new();
    let a = mixed_bytes(43, 5 << 20);
    let b = mixed_bytes(44, 5 << 20);
    let outs = stash_all(&env, &[("main/same", &a), ("main/same", &b)]);
    for out in &outs {
        out.ok();
    }
    let got = env.unstash_stdout("main/same");
    assert!(
        got == a || got == b,
        "main/same is neither version ({} bytes)",
        got.len()
    );
    assert_eq!(env.names(), vec!["main/same".to_owned()]);
    env.fsck_clean(true);
}

#[test]
fn unstash_while_another_process_stashes() {
    let env = Env::new();
    let a = mixed_bytes(45, 8 << 20);
    let b = mixed_bytes(46, 8 << 20);
    env.stash_stdin("main/a", &a);
    std::thread::scope(|s| {
        let writer = s.spawn(|| env.ferry_in(&["stash", "main/b", "-"], &b));
        for _ in 0..3 {
            assert_bytes_eq(&env.unstash_stdout("main/a"), &a, "main/a while writing");
        }
        writer.join().unwrap().ok();
    });
    assert_bytes_eq(&env.unstash_stdout("main/b"), &b, "main/b");
    env.fsck_clean(true);
}
