//! Every stash kind through the server, dedup across clients, and the
//! node-local cache.

use crate::util::*;
use std::sync::atomic::Ordering::Relaxed;
use store::backend::Kind;
use store::manifest::StashKind;
use store::repo::{Source, Target};
use transfer::client::{pull, push};

/// Stashes in store A, pushes, pulls into store B, unstashes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stash_kind_round_trips_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let a = client_store(dir.path(), "a");
    let b = client_store(dir.path(), "b");
    let remote = server.remote(MAIN);

    let layers = vec![layer(1, 6, 120_000), layer(2, 4, 80_000)];
    let cases: Vec<(&str, StashKind, Vec<u8>)> = vec![
        ("main/stream", StashKind::Stream, mixed_bytes(7, 700_000)),
        (
            "main/tar",
            StashKind::Tar,
            tar_of(&layer(3, 5, 100_000), 1_700_000_000),
        ),
        (
            "main/docker",
            StashKind::DockerArchive,
            image(Layout::DockerLegacy, &layers, 1_700_000_000),
        ),
        (
            "main/docker-oci",
            StashKind::DockerOciArchive,
            image(Layout::DockerOci, &layers, 1_700_000_000),
        ),
        (
            "main/oci",
            StashKind::OciLayout,
            image(Layout::OciTar, &layers, 1_700_000_000),
        ),
        ("main/empty", StashKind::Stream, Vec::new()),
    ];
    for (n, kind, data) in &cases {
        let r = stash_bytes(&a, n, data).await;
        assert_eq!(r.kind, *kind, "{n}");
        push(a.clone(), &name(n), &remote, &opts(), none())
            .await
            .unwrap();
        let p = pull(b.clone(), &name(n), &remote, &opts(), none())
            .await
            .unwrap();
        assert_eq!(p.manifest, r.manifest, "{n}");
        assert_eq!(&unstash_bytes(&b, n).await, data, "{n}");
    }

    // A regular file, through a file target.
    let file = dir.path().join("plain.bin");
    std::fs::write(&file, random_bytes(9, 500_000)).unwrap();
    let r = stash_source(&a, "main/file", Source::File(file.clone())).await;
    assert_eq!(r.kind, StashKind::File);
    push(a.clone(), &name("main/file"), &remote, &opts(), none())
        .await
        .unwrap();
    pull(b.clone(), &name("main/file"), &remote, &opts(), none())
        .await
        .unwrap();
    let out = dir.path().join("restored.bin");
    unstash_to(&b, "main/file", Target::File(out.clone())).await;
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&file).unwrap());

    // A directory, restored as a tree.
    let src = dir.path().join("tree");
    make_tree(&src, 11);
    let r = stash_source(&a, "main/dir", Source::Directory(src.clone())).await;
    assert_eq!(r.kind, StashKind::Directory);
    push(a.clone(), &name("main/dir"), &remote, &opts(), none())
        .await
        .unwrap();
    pull(b.clone(), &name("main/dir"), &remote, &opts(), none())
        .await
        .unwrap();
    let out = dir.path().join("tree-restored");
    unstash_to(&b, "main/dir", Target::Directory(out.clone())).await;
    assert_eq!(tree(&out), tree(&src));

    // The server's store is healthy and holds every name.
    let s = server.open_store();
    let names: Vec<String> = s.list(None).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names.len(), cases.len() + 2, "{names:?}");
    assert!(s
        .fsck(true, &store::repo::NoProgress)
        .unwrap()
        .problems
        .is_empty());
    server.stop().await;
}

/// Two clients stash the same image in their own stores: the second push
/// uploads nothing; a rebuilt image uploads only what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_across_two_client_stores() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let a = client_store(dir.path(), "a");
    let b = client_store(dir.path(), "b");
    let layers = vec![layer(1, 8, 150_000), layer(2, 8, 150_000)];
    let v1 = image(Layout::DockerLegacy, &layers, 1_700_000_000);

    stash_bytes(&a, "main/img", &v1).await;
    let first = push(a.clone(), &name("main/img"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(first.stats.chunks_present, 0);
    assert_eq!(first.stats.chunks_sent, first.stats.chunks);

    stash_bytes(&b, "main/img", &v1).await;
    let second = push(b.clone(), &name("main/img"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(second.stats.chunks_sent, 0, "{:?}", second.stats);
    assert_eq!(second.stats.bytes_sent, 0);
    assert_eq!(second.stats.chunks_present, second.stats.chunks);
    assert_eq!(second.manifest, first.manifest);

    // Rebuild: the last layer changes.
    let mut layers2 = layers.clone();
    layers2[1] = layer(3, 3, 150_000);
    let v2 = image(Layout::DockerLegacy, &layers2, 1_700_000_000);
    let local = stash_bytes(&b, "main/img2", &v2).await;
    let third = push(b.clone(), &name("main/img2"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(
        third.stats.chunks_sent, local.new_chunks,
        "{:?}",
        third.stats
    );
    assert!(third.stats.chunks_present > 0);
    assert!(
        server
            .metrics
            .dedup_hits
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    server.stop().await;
}

/// The node-local cache: a second unstash of the same image moves no
/// chunk; an unstash of v2 on a node with v1 moves only v2's new chunks,
/// and the bytes on the wire stay close to their stored size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cache_fetches_only_what_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let builder = client_store(dir.path(), "builder");
    let node = client_store(dir.path(), "node");
    let layers = vec![layer(1, 10, 200_000), layer(2, 10, 200_000)];
    let v1 = image(Layout::DockerOci, &layers, 1_700_000_000);
    let mut layers2 = layers.clone();
    layers2[1].truncate(6);
    layers2[1].extend(layer(5, 3, 200_000).into_iter().skip(1));
    let v2 = image(Layout::DockerOci, &layers2, 1_700_000_000);
    stash_bytes(&builder, "main/v1", &v1).await;
    let v2_local = stash_bytes(&builder, "main/v2", &v2).await;
    for n in ["main/v1", "main/v2"] {
        push(builder.clone(), &name(n), &remote, &opts(), none())
            .await
            .unwrap();
    }

    let cold = pull(node.clone(), &name("main/v1"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(cold.stats.chunks_received, cold.stats.chunks);
    assert_eq!(unstash_bytes(&node, "main/v1").await, v1);

    let answered_before = server.metrics.bytes_out.load(Relaxed);
    let again = pull(node.clone(), &name("main/v1"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(again.stats.chunks_received, 0, "{:?}", again.stats);
    assert_eq!(again.stats.bytes_received, 0);
    // Not even the manifest travels again: all the server's answers
    // together are smaller than it.
    let manifest = node
        .backend()
        .get(Kind::Manifest, &cold.manifest.to_hex())
        .unwrap();
    let answered = server.metrics.bytes_out.load(Relaxed) - answered_before;
    assert!(
        answered < manifest.len() as u64,
        "answers {answered} B, manifest {} B",
        manifest.len()
    );
    // On the wire besides: the handshake and QUIC's MTU probes (about ten
    // padded datagrams of up to 16 KiB: 150 KB on loopback).
    assert!(
        again.stats.wire_bytes_received < 256 << 10,
        "{:?}",
        again.stats
    );

    let answered_before = server.metrics.bytes_out.load(Relaxed);
    let v2p = pull(node.clone(), &name("main/v2"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(
        v2p.stats.chunks_received, v2_local.new_chunks,
        "{:?}",
        v2p.stats
    );
    assert_eq!(v2p.stats.bytes_received, v2_local.stored_bytes);
    let limit = (v2_local.stored_bytes as f64 * 1.05) as u64 + (1 << 20);
    assert!(
        v2p.stats.wire_bytes_received <= limit,
        "wire {} > {limit}",
        v2p.stats.wire_bytes_received
    );
    // v2's manifest came as a delta against v1's: the answers carry little
    // beyond the new chunks, and the wire little beyond the answers (the
    // handshake and MTU probes as above).
    let answered = server.metrics.bytes_out.load(Relaxed) - answered_before;
    let overhead = answered - v2p.stats.bytes_received;
    assert!(
        overhead < (v2p.stats.bytes_received / 20).max(16 << 10),
        "answers {answered} B, {:?}",
        v2p.stats
    );
    assert!(
        v2p.stats.wire_bytes_received - answered < 256 << 10,
        "answers {answered} B, {:?}",
        v2p.stats
    );
    assert_eq!(unstash_bytes(&node, "main/v2").await, v2);
    server.stop().await;
}

/// A push of many small upload requests lands in one pack on the server
/// (durable by the commit), not one pack per request; and what a client
/// uploaded without committing is durable once its connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_fill_packs_and_are_durable_by_the_commit() {
    use store::backend::Kind;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let a = client_store(dir.path(), "a");
    let data = random_bytes(77, 6 << 20);
    stash_bytes(&a, "main/six", &data).await;
    let r = push(a.clone(), &name("main/six"), &remote, &opts(), none())
        .await
        .unwrap();
    // 256 KiB requests: two dozen of them.
    assert!(r.stats.chunks_sent > 20, "{:?}", r.stats);
    let packs = |s: &store::repo::Store| s.backend().list(Kind::Pack).unwrap().len();
    assert_eq!(packs(&server.open_store()), 1, "one pack for one push");
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/six"), &remote, &opts(), none())
        .await
        .unwrap();
    assert!(unstash_bytes(&node, "main/six").await == data);

    // Upload without a commit, then drop the connection: the chunks are
    // written when the server sees it end.
    let more = random_bytes(78, 1 << 20);
    stash_bytes(&a, "main/more", &more).await;
    let session = transfer::client::Session::connect(&remote, &opts())
        .await
        .unwrap();
    let ids = chunk_ids(&a, "main/more");
    let chunks: Vec<_> = ids
        .iter()
        .map(|id| a.read_stored(id).unwrap().unwrap())
        .collect();
    let reply = session
        .request(&transfer::proto::Message::PutChunks {
            name: "main/more".into(),
            chunks,
        })
        .await
        .unwrap();
    assert!(matches!(reply, transfer::proto::Message::PutReply { .. }));
    session.close().await;
    let server_store = server.open_store();
    wait_for(10, "the uploads to be written", || {
        server_store.refresh().is_ok() && server_store.missing(&ids).unwrap().is_empty()
    })
    .await;
    assert_eq!(packs(&server_store), 2);
    server.stop().await;
}

/// On loopback MTU discovery finds datagrams far larger than Ethernet's
/// (up to 16 KiB), and batches of them reach the peer: a push and a pull
/// of 16 MiB carry more than 2 KiB per datagram on average, where
/// 1472-byte datagrams (or batches the kernel refuses, see
/// `transfer/src/udp.rs`) would carry less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_transfers_use_large_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let a = client_store(dir.path(), "a");
    let b = client_store(dir.path(), "b");
    let data = random_bytes(21, 16 << 20);
    stash_bytes(&a, "main/big", &data).await;
    let pushed = push(a.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap();
    let pulled = pull(b.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap();
    for (what, bytes, datagrams) in [
        (
            "push",
            pushed.stats.wire_bytes_sent,
            pushed.stats.datagrams_sent,
        ),
        (
            "pull",
            pulled.stats.wire_bytes_received,
            pulled.stats.datagrams_received,
        ),
    ] {
        assert!(bytes >= 16 << 20, "{what}: {bytes} B on the wire");
        assert!(
            bytes > 2048 * datagrams,
            "{what}: {bytes} B in {datagrams} datagrams"
        );
    }
    assert_eq!(unstash_bytes(&b, "main/big").await, data);
    server.stop().await;
}
