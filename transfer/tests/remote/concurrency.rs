//! Many clients at once.

use crate::util::*;
use transfer::client::{pull, push};

/// 16 clients, each with its own store, stash overlapping data, push it,
/// then pull a neighbour's stash and check it byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_stash_and_unstash_overlapping_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let base = mixed_bytes(1, 1 << 20);
    let shared = random_bytes(2, 512 << 10);
    let data = |i: usize| {
        let mut v = base.clone();
        if i.is_multiple_of(2) {
            v.extend_from_slice(&shared);
        }
        v.extend_from_slice(&random_bytes(100 + i as u64, 384 << 10));
        v
    };
    let mut set = tokio::task::JoinSet::new();
    for i in 0..16usize {
        let store = client_store(dir.path(), &format!("client{i}"));
        let remote = remote.clone();
        let mine = data(i);
        let theirs = data((i + 1) % 16);
        set.spawn(async move {
            let n = format!("main/c{i}");
            stash_bytes(&store, &n, &mine).await;
            push(store.clone(), &name(&n), &remote, &opts(), none())
                .await
                .unwrap();
            // Wait for the neighbour's stash to appear, then fetch it.
            let other = format!("main/c{}", (i + 1) % 16);
            let mut tries = 0;
            loop {
                match pull(store.clone(), &name(&other), &remote, &opts(), none()).await {
                    Ok(_) => break,
                    Err(e)
                        if e.kind() == Some(transfer::proto::ErrorKind::NotFound)
                            && tries < 400 =>
                    {
                        tries += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
            assert!(unstash_bytes(&store, &other).await == theirs, "client {i}");
            assert!(unstash_bytes(&store, &n).await == mine, "client {i}");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let srv = server.open_store();
    assert_eq!(srv.list(Some("main")).unwrap().len(), 16);
    assert!(srv
        .fsck(true, &store::repo::NoProgress)
        .unwrap()
        .problems
        .is_empty());
    server.stop().await;
}
