//! Garbage collection on the server: `ferry gc --remote` with an admin
//! token, refused for every other token, and the `[gc]` schedule running
//! beside clients that keep pushing.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::gc::{GcOptions, Policy};
use store::repo::NoProgress;
use transfer::client::{gc, list, pull, push, ClientError};
use transfer::config::RetentionConfig;
use transfer::metrics::GcTrigger;
use transfer::proto::ErrorKind;

fn scope(prefix: &str) -> Policy {
    Policy {
        prefix: Some(prefix.into()),
        ..Policy::default()
    }
}

fn options(policies: Vec<Policy>, repack_below: f64, dry_run: bool) -> GcOptions {
    GcOptions {
        policies,
        grace: Duration::ZERO,
        repack_below,
        dry_run,
        ..GcOptions::default()
    }
}

/// Every file of a store (but leases and temporary files) with its size.
fn files(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            if rel.starts_with("leases") || rel.starts_with("tmp") {
                continue;
            }
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                out.push((rel, meta.len()));
            }
        }
    }
    out.sort();
    out
}

fn server_names(server: &TestServer) -> Vec<String> {
    server
        .open_store()
        .list(None)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

fn assert_fsck_clean(server: &TestServer) {
    let report = server.open_store().fsck(true, &NoProgress).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// An admin token drops a finished build's scope: a dry run changes
/// nothing, the real run removes the names and condemns what only they
/// used (repacking the rest), the next run deletes it; every other name
/// still unstashes byte for byte from a fresh node, and fsck is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_collects_a_finished_build_scope_on_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let main = server.remote(MAIN);
    let admin = server.remote(ADMIN);
    let ci = client_store(dir.path(), "ci");
    let shared = random_bytes(10, 1 << 20);
    let build1 = [shared.clone(), random_bytes(11, 2 << 20)].concat();
    let build2 = [shared.clone(), random_bytes(12, 512 << 10)].concat();
    let base = mixed_bytes(13, 1 << 20);
    let stashes = [
        ("main/base", &base),
        ("build/1/img", &build1),
        ("build/2/img", &build2),
    ];
    for (n, data) in stashes {
        stash_bytes(&ci, n, data).await;
        push(ci.clone(), &name(n), &main, &opts(), none())
            .await
            .unwrap();
    }
    let before = files(&server.store_dir);

    // A dry run says what would go and changes nothing.
    let dry = gc(&admin, &options(vec![scope("build/1")], 1.0, true), &opts())
        .await
        .unwrap();
    assert!(dry.report.dry_run);
    let removed: Vec<&str> = dry
        .report
        .names_removed
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(removed, ["build/1/img"]);
    assert_eq!(dry.names_not_listed, 0);
    assert!(
        dry.remote.starts_with("quic://127.0.0.1:"),
        "{}",
        dry.remote
    );
    assert_eq!(files(&server.store_dir), before);

    // The real run: the scope goes, its data is condemned; with a repack
    // threshold of 1 every live pack is rewritten as well.
    let first = gc(
        &admin,
        &options(vec![scope("build/1")], 1.0, false),
        &opts(),
    )
    .await
    .unwrap();
    assert!(!first.report.dry_run);
    assert_eq!(first.report.names_removed.len(), 1);
    assert_eq!(first.report.names_removed[0].name, "build/1/img");
    assert!(
        first.report.names_removed[0].reason.contains("build/1"),
        "{:?}",
        first.report.names_removed
    );
    assert_eq!(first.report.names_kept, 2);
    assert!(first.report.packs_condemned > 0, "{:?}", first.report);
    assert!(first.report.packs_repacked > 0, "{:?}", first.report);
    assert_eq!(server_names(&server), ["build/2/img", "main/base"]);

    // The grace period (0 here) has passed: the next run deletes.
    let second = gc(&admin, &options(vec![], 0.5, false), &opts())
        .await
        .unwrap();
    assert!(second.report.names_removed.is_empty());
    assert!(second.report.packs_deleted > 0, "{:?}", second.report);
    assert!(second.report.bytes_freed > 0, "{:?}", second.report);
    let stored = |f: &[(PathBuf, u64)]| {
        f.iter()
            .filter(|(p, _)| p.starts_with("packs"))
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let after = files(&server.store_dir);
    assert!(
        stored(&after) + (2 << 20) <= stored(&before),
        "packs of {} bytes before, {} after",
        stored(&before),
        stored(&after)
    );

    // The removed name is gone; the others replay exactly from a node that
    // holds nothing (every chunk is read from the repacked packs).
    let names: Vec<String> = list(&main, None, &opts())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["build/2/img", "main/base"]);
    let node = client_store(dir.path(), "node");
    let e = pull(node.clone(), &name("build/1/img"), &main, &opts(), none())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound), "{e}");
    assert!(
        e.to_string()
            .contains(r#"the server has no stash named "build/1/img""#),
        "{e}"
    );
    for (n, data) in stashes.iter().filter(|(n, _)| *n != "build/1/img") {
        pull(node.clone(), &name(n), &main, &opts(), none())
            .await
            .unwrap();
        assert!(unstash_bytes(&node, n).await == **data, "{n}");
    }
    assert_fsck_clean(&server);
    assert_eq!(server.metrics.gc_runs(GcTrigger::Remote), 3);
    assert_eq!(server.metrics.gc_errors(GcTrigger::Remote), 0);
    server.stop().await;
}

/// `ferry gc` run on the server's host beside the server, not through it,
/// rewrites the packs a stash uses and deletes the old ones. The running
/// server's index still points at those: it reads its packs again and
/// serves the stash instead of failing the download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_beside_the_server_does_not_break_its_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let main = server.remote(MAIN);
    let ci = client_store(dir.path(), "ci");
    let data = mixed_bytes(20, 3 << 20);
    stash_bytes(&ci, "main/img", &data).await;
    push(ci.clone(), &name("main/img"), &main, &opts(), none())
        .await
        .unwrap();
    let packs_before: Vec<PathBuf> = files(&server.store_dir)
        .into_iter()
        .filter(|(p, _)| p.starts_with("packs"))
        .map(|(p, _)| p)
        .collect();
    assert!(!packs_before.is_empty());

    // A repack threshold of 1 rewrites every live pack; the second run
    // deletes the old ones (no grace period).
    let beside = server.open_store();
    let first = beside.gc(&options(vec![], 1.0, false)).unwrap();
    assert!(first.packs_repacked > 0, "{first:?}");
    let second = beside.gc(&options(vec![], 1.0, false)).unwrap();
    assert!(second.packs_deleted > 0, "{second:?}");
    for p in &packs_before {
        assert!(
            !server.store_dir.join(p).exists(),
            "{} is still there",
            p.display()
        );
    }

    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/img"), &main, &opts(), none())
        .await
        .unwrap();
    assert!(unstash_bytes(&node, "main/img").await == data);
    server.stop().await;
}

/// Any token without the admin scope — even one that may read and write
/// everything — is refused with an error that says what is needed, and
/// nothing on the server changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_the_admin_scope_cannot_collect() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let ci = client_store(dir.path(), "ci");
    stash_bytes(&ci, "main/base", &mixed_bytes(1, 400_000)).await;
    stash_bytes(&ci, "pr/1234/img", &mixed_bytes(2, 400_000)).await;
    push(
        ci.clone(),
        &name("main/base"),
        &server.remote(MAIN),
        &opts(),
        none(),
    )
    .await
    .unwrap();
    let pr = server.remote(PR);
    push(ci.clone(), &name("pr/1234/img"), &pr, &opts(), none())
        .await
        .unwrap();
    let before = files(&server.store_dir);
    let names = server_names(&server);

    // Its own scope, everything, or only a dry run: all refused.
    for (token, policies, dry_run) in [
        (PR, vec![scope("pr/1234")], false),
        (MAIN, vec![scope("main")], false),
        (READER, vec![], true),
    ] {
        let e = gc(
            &server.remote(token),
            &options(policies, 0.5, dry_run),
            &opts(),
        )
        .await
        .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(
                e,
                ClientError::Refused {
                    kind: ErrorKind::Forbidden,
                    ..
                }
            ),
            "{token}: {text}"
        );
        assert!(
            text.contains("admin") && text.contains("nothing was collected"),
            "{text}"
        );
    }
    assert_eq!(files(&server.store_dir), before);
    assert_eq!(server_names(&server), names);
    assert_eq!(server.metrics.gc_runs(GcTrigger::Remote), 0);
    assert!(server.metrics.errors(ErrorKind::Forbidden) >= 3);
    // The refused session is not cut off: the same token goes on working.
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("pr/1234/img"), &pr, &opts(), none())
        .await
        .unwrap();
    server.stop().await;
}

/// `[gc] interval = 1s` with a keep-the-newest-one rule: the server removes
/// the older nightly images by itself, while a client keeps pushing other
/// names, every one of which succeeds and replays exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_collection_applies_retention_beside_pushing_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.gc.interval = Some(Duration::from_secs(1));
    cfg.gc.grace = Duration::ZERO;
    cfg.gc.retention = vec![RetentionConfig {
        prefix: Some("nightly".into()),
        keep_last: Some(1),
        max_age: None,
    }];
    let server = TestServer::start_with(cfg).await;
    let main = server.remote(MAIN);

    // A client pushing main/c<i> until told to stop; every push must work.
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (stop, main, store) = (
            stop.clone(),
            main.clone(),
            client_store(dir.path(), "pusher"),
        );
        let base = mixed_bytes(20, 300_000);
        tokio::spawn(async move {
            let mut pushed = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) || i < 3 {
                let n = format!("main/c{i}");
                let data = [base.clone(), random_bytes(100 + i, 200_000)].concat();
                stash_bytes(&store, &n, &data).await;
                push(store.clone(), &name(&n), &main, &opts(), none())
                    .await
                    .unwrap_or_else(|e| panic!("push of {n} beside the collector: {e}"));
                pushed.push((n, data));
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            pushed
        })
    };

    let ci = client_store(dir.path(), "ci");
    for i in 1..=3u64 {
        let n = format!("nightly/img/{i}");
        stash_bytes(&ci, &n, &mixed_bytes(30 + i, 400_000)).await;
        push(ci.clone(), &name(&n), &main, &opts(), none())
            .await
            .unwrap();
    }
    let kept = mixed_bytes(33, 400_000);

    // Within a bounded wait, only the newest nightly image is left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let nightly: Vec<String> = server_names(&server)
            .into_iter()
            .filter(|n| n.starts_with("nightly/"))
            .collect();
        if nightly == ["nightly/img/3"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the schedule did not apply retention: {nightly:?} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let a few more collections run beside the pushes.
    let runs = server.metrics.gc_runs(GcTrigger::Schedule);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.metrics.gc_runs(GcTrigger::Schedule) < runs + 2 {
        assert!(tokio::time::Instant::now() < deadline, "no more runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let pushed = pusher.await.unwrap();
    assert!(pushed.len() >= 3);

    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("nightly/img/3"), &main, &opts(), none())
        .await
        .unwrap();
    assert!(unstash_bytes(&node, "nightly/img/3").await == kept);
    for (n, data) in &pushed {
        pull(node.clone(), &name(n), &main, &opts(), none())
            .await
            .unwrap();
        assert!(unstash_bytes(&node, n).await == *data, "{n}");
    }
    assert_eq!(server.metrics.gc_errors(GcTrigger::Schedule), 0);
    assert!(server.metrics.gc_runs(GcTrigger::Schedule) >= 3);
    // A graceful stop waits for a running collection; the store is sound.
    let store_dir = server.store_dir.clone();
    server.stop().await;
    let report = store::repo::Store::open(&store_dir)
        .unwrap()
        .fsck(true, &NoProgress)
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
