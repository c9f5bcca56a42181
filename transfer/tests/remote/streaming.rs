//! The streaming remote unstash: output written while chunks arrive over
//! parallel streams, the node's store keeping what arrived, reconnects that
//! never repeat a byte of standard output, failures that leave nothing
//! half-written, and a stop that keeps what arrived.

use crate::util::*;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::sync::{Arc, Mutex};
use store::manifest::StashKind;
use store::repo::{NoProgress, Source, Store, StoreOptions};
use transfer::client::{pull, push, ClientError, Options, Remote};
use transfer::unstash::{unstash, Destination, RemoteUnstashReport};

/// An in-memory standard output.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

async fn to_sink(
    node: &Arc<Store>,
    n: &str,
    remote: &transfer::Remote,
    o: &transfer::Options,
) -> (Vec<u8>, RemoteUnstashReport) {
    let sink = Sink::default();
    let r = unstash(
        node.clone(),
        &name(n),
        Destination::Writer(Box::new(sink.clone())),
        false,
        remote,
        o,
        none(),
    )
    .await
    .unwrap();
    (sink.bytes(), r)
}

/// A node store with small packs, so chunks become durable (and leave
/// memory) while an unstash runs.
fn small_pack_store(dir: &std::path::Path, label: &str) -> Arc<Store> {
    let opts = StoreOptions {
        pack_size: 256 << 10,
        ..StoreOptions::default()
    };
    Arc::new(Store::open_with(dir.join(label), opts).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_streams_into_each_target_and_stays_cached() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let a = client_store(dir.path(), "a");
    let layers = vec![layer(1, 6, 120_000), layer(2, 4, 80_000)];
    let cases: Vec<(&str, StashKind, Vec<u8>)> = vec![
        ("main/stream", StashKind::Stream, mixed_bytes(7, 3_000_000)),
        (
            "main/docker",
            StashKind::DockerArchive,
            image(Layout::DockerLegacy, &layers, 1_700_000_000),
        ),
        (
            "main/oci",
            StashKind::OciLayout,
            image(Layout::OciTar, &layers, 1_700_000_000),
        ),
        ("main/empty", StashKind::Stream, Vec::new()),
    ];
    let node = small_pack_store(dir.path(), "node");
    for (n, kind, data) in &cases {
        let r = stash_bytes(&a, n, data).await;
        assert_eq!(r.kind, *kind, "{n}");
        push(a.clone(), &name(n), &remote, &opts(), none())
            .await
            .unwrap();
        let (out, report) = to_sink(&node, n, &remote, &opts()).await;
        assert!(out == *data, "{n}: the streamed bytes differ");
        assert_eq!(report.manifest, r.manifest, "{n}");
        assert_eq!(report.unstash.size, data.len() as u64, "{n}");
        assert_eq!(report.cache_error, None);
        // The node's store now holds the stash: a local unstash works, and
        // a second remote unstash transfers no chunk.
        assert!(unstash_bytes(&node, n).await == *data, "{n}: cached copy");
        let (again, second) = to_sink(&node, n, &remote, &opts()).await;
        assert!(again == *data, "{n}: second unstash");
        assert_eq!(second.transfer.chunks_received, 0, "{n}");
        assert_eq!(second.transfer.chunks_present, second.transfer.chunks);
    }

    // A file target: written under a temporary name, complete when it
    // appears; an existing file is refused without --force.
    let file = dir.path().join("plain.bin");
    std::fs::write(&file, random_bytes(9, 2_500_000)).unwrap();
    stash_source(&a, "main/file", Source::File(file.clone())).await;
    push(a.clone(), &name("main/file"), &remote, &opts(), none())
        .await
        .unwrap();
    let fresh = client_store(dir.path(), "fresh");
    let out = dir.path().join("restored.bin");
    let (file_name, o) = (name("main/file"), opts());
    let to_file = |node: &Arc<Store>, force: bool| {
        unstash(
            node.clone(),
            &file_name,
            Destination::Path(out.clone()),
            force,
            &remote,
            &o,
            none(),
        )
    };
    let r = to_file(&fresh, false).await.unwrap();
    assert!(r.transfer.chunks_received > 0);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&file).unwrap());
    let e = to_file(&fresh, false).await.unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    to_file(&fresh, true).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&file).unwrap());

    // A directory stash restores as a tree.
    let src = dir.path().join("tree");
    make_tree(&src, 11);
    stash_source(&a, "main/dir", Source::Directory(src.clone())).await;
    push(a.clone(), &name("main/dir"), &remote, &opts(), none())
        .await
        .unwrap();
    let restored = dir.path().join("restored-tree");
    unstash(
        fresh.clone(),
        &name("main/dir"),
        Destination::Path(restored.clone()),
        false,
        &remote,
        &opts(),
        none(),
    )
    .await
    .unwrap();
    assert_eq!(tree(&restored), tree(&src));
    server.stop().await;
}

/// Three copies of the same 3 MB (from `seed`), with different data between
/// them (from `gap_seed` on): the copies' chunks occur three times each.
fn repeated_block(seed: u64, gap_seed: u64) -> Vec<u8> {
    let block = random_bytes(seed, 3_000_000);
    let mut data = Vec::new();
    for i in 0..3u64 {
        data.extend_from_slice(&block);
        data.extend_from_slice(&random_bytes(gap_seed + i, 1_500_000));
    }
    data
}

/// Many streams, a tiny read-ahead window and small packs: chunks arrive
/// out of order, repeated chunks are read again after their pack became
/// durable, and the output is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_arrivals_and_repeated_chunks_give_exact_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let a = client_store(dir.path(), "a");
    let data = repeated_block(21, 30);
    stash_bytes(&a, "main/repeats", &data).await;
    push(a.clone(), &name("main/repeats"), &remote, &opts(), none())
        .await
        .unwrap();
    let node = small_pack_store(dir.path(), "node");
    let mut o = opts();
    o.streams = 8;
    o.read_ahead = 1 << 20;
    let (out, r) = to_sink(&node, "main/repeats", &remote, &o).await;
    assert!(out == data, "the streamed bytes differ");
    let distinct = chunk_ids(&a, "main/repeats").len() as u64;
    assert_eq!(r.transfer.chunks_received, distinct, "each chunk once");
    assert!(unstash_bytes(&node, "main/repeats").await == data);
    server.stop().await;
}

/// A node that holds v1 fetches only v2's new chunks, and reads the rest
/// from its own packs while it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_related_stash_fetches_only_what_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let a = client_store(dir.path(), "a");
    let base = vec![layer(1, 8, 200_000), layer(2, 6, 150_000)];
    let mut changed = base.clone();
    changed.push(layer(3, 3, 100_000));
    let v1 = image(Layout::DockerOci, &base, 1_700_000_000);
    let v2 = image(Layout::DockerOci, &changed, 1_700_000_100);
    stash_bytes(&a, "main/v1", &v1).await;
    stash_bytes(&a, "main/v2", &v2).await;
    for n in ["main/v1", "main/v2"] {
        push(a.clone(), &name(n), &remote, &opts(), none())
            .await
            .unwrap();
    }
    let node = client_store(dir.path(), "node");
    let (out, _) = to_sink(&node, "main/v1", &remote, &opts()).await;
    assert!(out == v1);
    let expected = node.missing(&chunk_ids(&a, "main/v2")).unwrap().len() as u64;
    assert!(expected > 0);
    let (out, r) = to_sink(&node, "main/v2", &remote, &opts()).await;
    assert!(out == v2, "v2 differs");
    assert_eq!(r.transfer.chunks_received, expected, "{:?}", r.transfer);
    assert_eq!(
        r.transfer.chunks_present,
        r.transfer.chunks - expected,
        "{:?}",
        r.transfer
    );
    server.stop().await;
}

/// What a server restart in the middle of an unstash left.
struct Restarted {
    report: RemoteUnstashReport,
    data: Vec<u8>,
    /// Distinct chunks of the stash.
    distinct: u64,
    node: Arc<Store>,
    server: TestServer,
}

/// `data` stashed as main/big in a client store of its own in `dir` and
/// pushed through `remote`: the ids of its distinct chunks.
async fn push_big(dir: &std::path::Path, remote: &Remote, data: &[u8]) -> Vec<store::ChunkId> {
    let a = client_store(dir, "a");
    stash_bytes(&a, "main/big", data).await;
    push(a.clone(), &name("main/big"), remote, &opts(), none())
        .await
        .unwrap();
    chunk_ids(&a, "main/big")
}

/// main/big from `remote` into the file `out`, on `node`.
async fn unstash_big_into(
    node: &Arc<Store>,
    remote: &Remote,
    out: &std::path::Path,
    o: &Options,
    progress: Arc<dyn store::repo::Progress>,
) -> Result<RemoteUnstashReport, ClientError> {
    let dest = Destination::Path(out.to_path_buf());
    unstash(
        node.clone(),
        &name("main/big"),
        dest,
        false,
        remote,
        o,
        progress,
    )
    .await
}

/// Pushes 40 MiB of random bytes (from `seed`) to a server, unstashes them
/// from an empty node into `dest` over two streams, stops the server once
/// 3 MiB were written (the restore has asked for its first two 16 MiB
/// batches by then, not the third) and starts it again.
async fn unstash_across_a_restart(
    dir: &std::path::Path,
    seed: u64,
    dest: Destination,
) -> Restarted {
    let first = TestServer::start(dir).await;
    let addr = first.addr;
    let remote = first.remote(MAIN);
    let data = random_bytes(seed, 40 << 20);
    let distinct = push_big(dir, &remote, &data).await.len() as u64;

    let node = client_store(dir, "node");
    let mut o = opts();
    o.streams = 2;
    o.retries = 10;
    o.backoff = std::time::Duration::from_millis(200);
    let handle = first.handle();
    let trip = Trip::new(3 << 20, move || handle.stop_now());
    let task = {
        let (node, remote, trip) = (node.clone(), remote.clone(), trip.clone());
        tokio::spawn(async move {
            unstash(node, &name("main/big"), dest, false, &remote, &o, trip).await
        })
    };
    {
        let trip = trip.clone();
        wait_for(60, "the server to be stopped", move || trip.fired()).await;
    }
    first.join().await;
    let server = TestServer::start_with(config(dir, addr)).await;
    let report = task.await.unwrap().unwrap();
    assert!(report.transfer.attempts >= 2, "{:?}", report.transfer);
    Restarted {
        report,
        data,
        distinct,
        node,
        server,
    }
}

/// The server restarts in the middle: the unstash reconnects and asks for
/// what had not arrived; standard output gets every byte exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_stream_is_ridden_out_without_repeating_output() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::default();
    let r =
        unstash_across_a_restart(dir.path(), 2, Destination::Writer(Box::new(sink.clone()))).await;
    assert!(sink.bytes() == r.data, "output differs after the reconnect");
    assert!(unstash_bytes(&r.node, "main/big").await == r.data);
    r.server.stop().await;
}

/// Temporary files of unstashes in `dir`, with their lengths.
fn temporaries(dir: &std::path::Path) -> Vec<u64> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".ferry-unstash-")
        })
        .map(|e| e.metadata().unwrap().len())
        .collect()
}

/// Records, at the first bytes written, the temporary files next to the
/// target: a file written by offset has its full length from the start.
struct FirstWrite {
    dir: std::path::PathBuf,
    seen: Mutex<Option<Vec<u64>>>,
}

impl store::repo::Progress for FirstWrite {
    fn advance(&self, _bytes: u64) {
        let mut seen = self.seen.lock().unwrap();
        if seen.is_none() {
            *seen = Some(temporaries(&self.dir));
        }
    }
}

/// A file target is written by offset: sized at once, each chunk written
/// where it goes as it arrives (out of order, over 8 streams), chunks used
/// several times written to every place, chunks the node holds read from
/// its packs meanwhile; the file gets its name only when complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_target_is_written_by_offset_as_chunks_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let a = client_store(dir.path(), "a");
    let repeats = repeated_block(41, 50);
    let base = vec![layer(4, 8, 200_000), layer(5, 6, 150_000)];
    let mut changed = base.clone();
    changed.push(layer(6, 3, 100_000));
    let v1 = image(Layout::DockerLegacy, &base, 1_700_000_000);
    let v2 = image(Layout::DockerLegacy, &changed, 1_700_000_100);
    for (n, data) in [
        ("main/repeats", &repeats),
        ("main/v1", &v1),
        ("main/v2", &v2),
    ] {
        stash_bytes(&a, n, data).await;
        push(a.clone(), &name(n), &remote, &opts(), none())
            .await
            .unwrap();
    }
    let node = small_pack_store(dir.path(), "node");
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let mut o = opts();
    o.streams = 8;
    o.read_ahead = 1 << 20;
    for (n, data) in [
        ("main/repeats", &repeats),
        ("main/v1", &v1),
        ("main/v2", &v2),
    ] {
        let out = out_dir.join(n.replace('/', "-"));
        let first = Arc::new(FirstWrite {
            dir: out_dir.clone(),
            seen: Mutex::new(None),
        });
        let expected = node.missing(&chunk_ids(&a, n)).unwrap().len() as u64;
        let r = unstash(
            node.clone(),
            &name(n),
            Destination::Path(out.clone()),
            false,
            &remote,
            &o,
            first.clone(),
        )
        .await
        .unwrap();
        assert_eq!(
            first.seen.lock().unwrap().as_deref(),
            Some(&[data.len() as u64][..]),
            "{n}: one temporary file, of the stash's full length"
        );
        assert!(
            std::fs::read(&out).unwrap() == *data,
            "{n}: the file differs"
        );
        assert!(temporaries(&out_dir).is_empty(), "{n}: temporary file left");
        assert_eq!(r.unstash.size, data.len() as u64);
        // Only what the node lacked came (for v2: only its new layer's
        // chunks), each once, and the node keeps it.
        assert_eq!(
            r.transfer.chunks_received, expected,
            "{n}: {:?}",
            r.transfer
        );
        assert!(unstash_bytes(&node, n).await == *data, "{n}: cached copy");
    }
    assert!(node.missing(&chunk_ids(&a, "main/v2")).unwrap().is_empty());
    server.stop().await;
}

/// The server restarts while a file is written by offset: the unstash
/// reconnects, asks only for what had not arrived, and the file is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_while_writing_a_file_by_offset_is_ridden_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.bin");
    let r = unstash_across_a_restart(dir.path(), 12, Destination::Path(out.clone())).await;
    // No chunk twice: what arrived before the restart was not asked again.
    assert_eq!(
        r.report.transfer.chunks_received, r.distinct,
        "{:?}",
        r.report.transfer
    );
    assert!(std::fs::read(&out).unwrap() == r.data, "the file differs");
    assert!(temporaries(dir.path()).is_empty());
    r.server.stop().await;
}

/// A FIFO takes its bytes in order: an unstash into one streams, as into
/// standard output, rather than replacing it with a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_target_is_written_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let a = client_store(dir.path(), "a");
    let data = mixed_bytes(13, 3_000_000);
    stash_bytes(&a, "main/x", &data).await;
    push(a.clone(), &name("main/x"), &remote, &opts(), none())
        .await
        .unwrap();
    let fifo = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let node = client_store(dir.path(), "node");
    unstash(
        node,
        &name("main/x"),
        Destination::Path(fifo.clone()),
        false,
        &remote,
        &opts(),
        none(),
    )
    .await
    .unwrap();
    assert!(
        reader.join().unwrap() == data,
        "the FIFO's reader got other bytes"
    );
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    server.stop().await;
}

/// The server goes away for good: a clear error, no file at the target,
/// no local name; what arrived is kept, and the same command later fetches
/// only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_server_leaves_no_output_and_the_rerun_fetches_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(dir.path()).await;
    let addr = first.addr;
    let remote = first.remote(MAIN);
    let data = random_bytes(3, 40 << 20);
    let ids = push_big(dir.path(), &remote, &data).await;

    let node = small_pack_store(dir.path(), "node");
    let out = dir.path().join("big.bin");
    let mut o = opts();
    o.streams = 1;
    let handle = first.handle();
    let trip = Trip::new(3 << 20, move || handle.stop_now());
    let e = unstash_big_into(&node, &remote, &out, &o, trip)
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(!out.exists(), "a partial output file was left");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".ferry-unstash-") || n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(node.manifest(&name("main/big")).is_err(), "name committed");
    first.join().await;
    let missing = node.missing(&ids).unwrap().len();
    assert!(missing < ids.len(), "nothing kept of what arrived");

    let second = TestServer::start_with(config(dir.path(), addr)).await;
    let r = unstash_big_into(&node, &remote, &out, &opts(), none())
        .await
        .unwrap();
    assert_eq!(
        r.transfer.chunks_received as usize, missing,
        "{:?}",
        r.transfer
    );
    assert!(std::fs::read(&out).unwrap() == data);
    second.stop().await;
}

/// A token that may not read the name: refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_name_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let a = client_store(dir.path(), "a");
    stash_bytes(&a, "pr/999/img", &random_bytes(4, 100_000)).await;
    push(
        a.clone(),
        &name("pr/999/img"),
        &server.remote(MAIN),
        &opts(),
        none(),
    )
    .await
    .unwrap();
    let node = client_store(dir.path(), "node");
    let out = dir.path().join("img.tar");
    let e = unstash(
        node,
        &name("pr/999/img"),
        Destination::Path(out.clone()),
        false,
        &server.remote(PR),
        &opts(),
        Arc::new(NoProgress),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("may not read"), "{e}");
    assert!(!out.exists());
    server.stop().await;
}

/// A server holding `main/big` (6 MiB of random bytes from `seed`), a node
/// store with small packs, and a progress that collects on the node
/// halfway through (waiting there for a sealed pack if `wait`).
async fn collecting_node(
    dir: &std::path::Path,
    seed: u64,
    wait: bool,
) -> (TestServer, Vec<u8>, Arc<Store>, Arc<CollectHalfway>) {
    let server = TestServer::start(dir).await;
    let data = random_bytes(seed, 6 << 20);
    push_big(dir, &server.remote(MAIN), &data).await;
    let node = small_pack_store(dir, "node");
    let progress = Arc::new(CollectHalfway {
        node: node.clone(),
        half: data.len() as u64 / 2,
        wait,
        written: Mutex::new(0),
        report: Mutex::new(None),
        deleted: Mutex::new(0),
    });
    (server, data, node, progress)
}

/// Runs collections on the node's store once the transfer passes half of
/// the stash, until one condemns a pack, and keeps the last report.
struct CollectHalfway {
    node: Arc<Store>,
    half: u64,
    /// Whether the call that passes half waits (up to 20 s) for the
    /// node's importer to seal a pack. It may lag behind the output by its
    /// queue (32 MiB, more than this stash), so without the wait a loaded
    /// machine can finish the output before any pack is sealed. Only where
    /// the progress is called on a thread of its own (the restore's), not
    /// on a runtime worker.
    wait: bool,
    written: Mutex<u64>,
    report: Mutex<Option<store::gc::GcReport>>,
    /// Packs deleted by any of the collections.
    deleted: Mutex<u64>,
}

impl CollectHalfway {
    /// The collection ran, condemned the packs written so far, and none
    /// of the collections deleted any of them (the transfer's lease kept
    /// them).
    fn condemned_and_kept(&self) {
        let report = self.report.lock().unwrap().clone();
        let report = report.expect("a collection ran");
        assert!(report.packs_condemned >= 1, "{report:?}");
        assert_eq!(*self.deleted.lock().unwrap(), 0, "{report:?}");
    }

    fn collect(&self) -> store::gc::GcReport {
        let report = self.node.gc(&collect_now()).unwrap();
        *self.deleted.lock().unwrap() += report.packs_deleted;
        report
    }
}

impl store::repo::Progress for CollectHalfway {
    fn advance(&self, bytes: u64) {
        let mut written = self.written.lock().unwrap();
        *written += bytes;
        let mut report = self.report.lock().unwrap();
        // Until a collection finds a sealed pack to condemn: the node's
        // importer may not have sealed one yet when half has arrived.
        if *written < self.half || report.as_ref().is_some_and(|r| r.packs_condemned > 0) {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let r = self.collect();
            let condemned = r.packs_condemned > 0;
            *report = Some(r);
            if condemned || !self.wait || std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// A collection on the node while an unstash runs condemns the packs the
/// unstash already wrote into the node's store (nothing names them yet):
/// the unstash still keeps the name in the node's store; the next
/// collection takes the packs back, and an unstash then fetches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_on_the_node_during_an_unstash_keeps_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (server, data, node, progress) = collecting_node(dir.path(), 31, true).await;
    let remote = server.remote(MAIN);
    let sink = Sink::default();
    let r = unstash(
        node.clone(),
        &name("main/big"),
        Destination::Writer(Box::new(sink.clone())),
        false,
        &remote,
        &opts(),
        progress.clone(),
    )
    .await
    .unwrap();
    assert!(sink.bytes() == data);
    progress.condemned_and_kept();
    assert_eq!(r.cache_error, None);
    assert_eq!(node.list(None).unwrap().len(), 1);
    let next = node.gc(&collect_now()).unwrap();
    assert!(next.packs_uncondemned >= 1, "{next:?}");
    assert_eq!(next.packs_deleted, 0, "{next:?}");

    let (out, again) = to_sink(&node, "main/big", &remote, &opts()).await;
    assert!(out == data);
    assert_eq!(again.transfer.chunks_received, 0, "{:?}", again.transfer);
    server.stop().await;
}

/// The same for a pull into the node's store (no output): a collection
/// halfway through does not make the commit of the name fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_on_the_node_during_a_pull_does_not_fail_it() {
    let dir = tempfile::tempdir().unwrap();
    let (server, data, node, progress) = collecting_node(dir.path(), 32, false).await;
    let remote = server.remote(MAIN);
    // Small import groups: packs are sealed while the pull runs.
    let o = transfer::Options {
        import_bytes: 512 << 10,
        ..opts()
    };
    pull(
        node.clone(),
        &name("main/big"),
        &remote,
        &o,
        progress.clone(),
    )
    .await
    .unwrap();
    progress.condemned_and_kept();
    assert!(unstash_bytes(&node, "main/big").await == data);
    server.stop().await;
}

/// A stop request winds an unstash down: it fails with `Stopped`, leaves no
/// output, and the chunks that arrived stay in the node's store (less than
/// one pack of them: written by the wind-down, not because a pack filled
/// up), so the same unstash again fetches only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_unstash_keeps_what_arrived_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let data = random_bytes(8, 24 << 20);
    let ids = push_big(dir.path(), &remote, &data).await;
    let distinct = ids.len() as u64;

    let node = client_store(dir.path(), "node");
    let target = dir.path().join("out.bin");
    let o = opts();
    let stop = o.stop.clone();
    // Stopped once 4 MiB of the output are written.
    let trip = Trip::new(4 << 20, move || stop.request());
    let err = unstash_big_into(&node, &remote, &target, &o, trip.clone())
        .await
        .unwrap_err();
    assert!(trip.fired());
    assert!(matches!(err, ClientError::Stopped), "{err}");
    assert!(!target.exists());
    assert_eq!(temporaries(dir.path()), Vec::<u64>::new());
    let kept = distinct - node.missing(&ids).unwrap().len() as u64;
    assert!(kept > 0 && kept < distinct, "{kept} of {distinct} kept");

    let again = unstash_big_into(&node, &remote, &target, &opts(), none())
        .await
        .unwrap();
    let t = &again.transfer;
    assert_eq!(t.chunks_present, kept, "{t:?}");
    assert_eq!(t.chunks_received, distinct - kept, "{t:?}");
    assert!(std::fs::read(&target).unwrap() == data);
    server.stop().await;
}

/// A node store that cannot keep what arrives (its packs cannot be
/// written) does not hold up the unstash: the importer stops at its first
/// pack, the downloaders stop queueing for it, the output is whole, and the
/// report says why nothing was kept. The image is larger than the
/// importer's queue, so a downloader would wait forever on a dead
/// importer's full queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_store_that_cannot_keep_chunks_does_not_hold_up_the_unstash() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    // Incompressible: 48 MiB stored, past the importer's queue of 32 MiB.
    let data = random_bytes(41, 48 << 20);
    push_big(dir.path(), &remote, &data).await;

    for (target, label) in [("stream", "node-stream"), ("file", "node-file")] {
        let node = small_pack_store(dir.path(), label);
        // The index is read (the packs listed) once, before they go.
        node.missing(&[store::ChunkId::of(b"x")]).unwrap();
        let packs = dir.path().join(label).join("packs");
        std::fs::remove_dir_all(&packs).unwrap();
        std::fs::write(&packs, b"not a directory").unwrap();
        let out = dir.path().join(format!("{label}.bin"));
        let destination = match target {
            "stream" => Destination::Writer(Box::new(std::fs::File::create(&out).unwrap())),
            _ => Destination::Path(out.clone()),
        };
        // On a runtime of its own: a downloader stuck on the queue would
        // keep a runtime from shutting down, and this test from ending.
        let (done, ended) = std::sync::mpsc::channel();
        let (n, remote) = (node.clone(), remote.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let r = rt.block_on(unstash(
                n,
                &name("main/big"),
                destination,
                false,
                &remote,
                &opts(),
                none(),
            ));
            let _ = done.send(r);
        });
        let wait = std::time::Duration::from_secs(120);
        let r = tokio::task::spawn_blocking(move || ended.recv_timeout(wait))
            .await
            .unwrap()
            .unwrap_or_else(|_| panic!("{target}: the unstash did not end"))
            .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{target}: output differs"
        );
        let why = r
            .cache_error
            .unwrap_or_else(|| panic!("{target}: no cache error"));
        assert!(why.contains("packs"), "{target}: {why}");
        assert!(
            node.list(None).unwrap().is_empty(),
            "{target}: a name without its chunks"
        );
    }
    server.stop().await;
}
