//! Early uploads: a stash's new chunks go to the server while the stash
//! still runs, and the push at its end sends only what is left.

use crate::util::*;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::gc::GcOptions;
use store::repo::{Progress, Source, StashReport, Store, StoreOptions, StoredChunk};
use store::ChunkId;
use transfer::client::{gc, pull, push, ClientError, Options, Remote, TransferStats};
use transfer::metrics::Metrics;
use transfer::proto::ErrorKind;
use transfer::push::EarlyUpload;

/// A client store with small packs: a stash of a few MiB makes many, so
/// chunks are offered while it runs.
fn small_pack_store(dir: &std::path::Path, label: &str) -> Arc<Store> {
    let opts = StoreOptions {
        pack_size: 256 << 10,
        ..StoreOptions::default()
    };
    Arc::new(Store::open_with(dir.join(label), opts).unwrap())
}

/// Offers each pack's chunks to the upload as the stash reports them.
/// With `server`, each 4 MiB read waits 100 ms, and the first read after
/// the first offer waits until the server has received a chunk (or 20 s):
/// proof that the upload runs while the stash does.
struct Offer {
    early: Arc<EarlyUpload>,
    offers: std::sync::Mutex<usize>,
    server: Option<Arc<Metrics>>,
    seen_during_stash: AtomicBool,
}

impl Progress for Offer {
    fn advance(&self, _bytes: u64) {
        let Some(metrics) = &self.server else { return };
        // Read like a `docker save` pipe, not a buffer in memory: the
        // packer gets time to make packs durable while input remains.
        std::thread::sleep(Duration::from_millis(100));
        if *self.offers.lock().unwrap() == 0 || self.seen_during_stash.load(Relaxed) {
            return;
        }
        if server_received_a_chunk_within(metrics, Duration::from_secs(20)) {
            self.seen_during_stash.store(true, Relaxed);
        }
    }
    fn stored(&self, new: &[ChunkId]) {
        *self.offers.lock().unwrap() += 1;
        self.early.offer(new);
    }
}

/// Waits (on the stash's thread) until the server has received a chunk,
/// at most `wait`.
fn server_received_a_chunk_within(metrics: &Metrics, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if metrics.chunks_received.load(Relaxed) > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Stashes `data` under `n` while `early` uploads; returns the report and
/// how many packs were offered.
async fn stash_offering(
    store: &Arc<Store>,
    n: &str,
    data: Vec<u8>,
    early: &Arc<EarlyUpload>,
) -> (StashReport, usize) {
    let (report, offers, _) = stash_watching(store, n, data, early, None).await;
    (report, offers)
}

/// [`stash_offering`], and whether `server` received chunks while the
/// stash still read its input.
async fn stash_watching(
    store: &Arc<Store>,
    n: &str,
    data: Vec<u8>,
    early: &Arc<EarlyUpload>,
    server: Option<Arc<Metrics>>,
) -> (StashReport, usize, bool) {
    let offer = Offer {
        early: early.clone(),
        offers: Default::default(),
        server,
        seen_during_stash: AtomicBool::new(false),
    };
    let (r, offer) = stash_with(store, n, data, offer).await;
    let seen = offer.seen_during_stash.load(Relaxed);
    (r, offer.offers.into_inner().unwrap(), seen)
}

/// Stashes `data` under `n` on a blocking thread with `progress`; returns
/// the report and the progress, to look at.
async fn stash_with<P: Progress + 'static>(
    store: &Arc<Store>,
    n: &str,
    data: Vec<u8>,
    progress: P,
) -> (StashReport, P) {
    let (s, n) = (store.clone(), name(n));
    tokio::task::spawn_blocking(move || {
        let r = s
            .stash(
                &n,
                Source::Reader(Box::new(std::io::Cursor::new(data))),
                &progress,
            )
            .unwrap();
        (r, progress)
    })
    .await
    .unwrap()
}

/// An early upload of `n` from `store`, to hand to the stash's progress.
fn start_early(store: &Arc<Store>, n: &str, remote: &Remote, o: &Options) -> Arc<EarlyUpload> {
    Arc::new(EarlyUpload::start(store.clone(), &name(n), remote, o))
}

fn unwrap_early(early: Arc<EarlyUpload>) -> EarlyUpload {
    Arc::try_unwrap(early).unwrap_or_else(|_| panic!("the stash still holds the upload"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_chunks_reach_the_server_before_the_push_and_are_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let builder = small_pack_store(dir.path(), "builder");
    // More than the packer may queue (two jobs of up to 16 MiB), so that
    // packs become durable while the input is still being read.
    let data = mixed_bytes(11, 48 << 20);

    let early = start_early(&builder, "main/early", &remote, &opts());
    let (stash, packs, seen) = stash_watching(
        &builder,
        "main/early",
        data.clone(),
        &early,
        Some(server.metrics.clone()),
    )
    .await;
    assert!(packs > 3, "the stash made {packs} packs");
    assert!(seen, "no chunk reached the server while the stash ran");
    let received = || server.metrics.chunks_received.load(Relaxed);
    // Every new chunk arrives without a push being asked for.
    wait_for(30, "the early upload of every new chunk", || {
        received() == stash.new_chunks
    })
    .await;
    assert!(
        server.open_store().list(None).unwrap().is_empty(),
        "nothing is named on the server before the push commits"
    );

    let report = unwrap_early(early).push(none()).await.unwrap();
    let s = &report.stats;
    assert_eq!(s.chunks, stash.new_chunks);
    assert_eq!(s.chunks_sent, stash.new_chunks, "{s:?}");
    // Counted when the stash ended: some went up while it ran (above).
    assert!(
        s.chunks_sent_early > 0 && s.chunks_sent_early <= s.chunks_sent,
        "{s:?}"
    );
    assert_eq!(s.chunks_present, 0, "{s:?}");
    assert_eq!(s.bytes_sent, stash.stored_bytes, "{s:?}");
    assert_eq!(s.attempts, 1);
    assert_eq!(received(), stash.new_chunks, "the push sent a chunk again");
    assert_eq!(report.manifest, stash.manifest);

    // A node pulls it from the server, byte-exact.
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/early"), &remote, &opts(), none())
        .await
        .unwrap();
    assert!(unstash_bytes(&node, "main/early").await == data);
    server.stop().await;
}

/// Hands the upload each job's chunks as they are compressed, as `ferry
/// stash --remote` does, but keeps the ids of durable packs back until the
/// stash has ended: while it runs, only handed-over bytes can reach the
/// server. The first hand-over waits (on the stash's thread) up to `wait`
/// for the server to receive a chunk.
struct HandOver {
    early: Arc<EarlyUpload>,
    server: Arc<Metrics>,
    wait: Duration,
    waited: AtomicBool,
    seen_during_stash: AtomicBool,
    durable: std::sync::Mutex<Vec<ChunkId>>,
}

impl Progress for HandOver {
    fn advance(&self, _bytes: u64) {}
    fn wants_compressed(&self) -> bool {
        true
    }
    fn compressed(&self, new: &[StoredChunk]) {
        self.early.offer_compressed(new);
        if !self.waited.swap(true, Relaxed)
            && server_received_a_chunk_within(&self.server, self.wait)
        {
            self.seen_during_stash.store(true, Relaxed);
        }
    }
    fn stored(&self, new: &[ChunkId]) {
        self.durable.lock().unwrap().extend_from_slice(new);
    }
}

/// Stashes `data` under `n` from `builder`, handing its chunks to an early
/// upload with options `o` (see [`HandOver`]), offers the durable ones,
/// and pushes; checks that every new chunk went up exactly once and that a
/// node pulls the stash back byte-exact. Returns the stash report, the
/// push's statistics and whether a chunk reached the server within `wait`
/// of the first hand-over.
async fn hand_over_and_push(
    server: &TestServer,
    dir: &std::path::Path,
    builder: &Arc<Store>,
    n: &str,
    data: Vec<u8>,
    (o, wait): (&Options, Duration),
) -> (StashReport, TransferStats, bool) {
    let remote = server.remote(MAIN);
    let early = start_early(builder, n, &remote, o);
    let progress = HandOver {
        early: early.clone(),
        server: server.metrics.clone(),
        wait,
        waited: AtomicBool::new(false),
        seen_during_stash: AtomicBool::new(false),
        durable: Default::default(),
    };
    let (stash, progress) = stash_with(builder, n, data.clone(), progress).await;
    assert!(progress.waited.load(Relaxed), "nothing was handed over");
    let seen = progress.seen_during_stash.load(Relaxed);
    early.offer(&progress.durable.lock().unwrap());
    drop(progress);
    let stats = unwrap_early(early).push(none()).await.unwrap().stats;
    assert_eq!(stats.chunks_sent, stash.new_chunks, "{stats:?}");
    assert_eq!(
        server.metrics.chunks_received.load(Relaxed),
        stash.new_chunks,
        "a chunk went up twice"
    );
    let node = client_store(dir, &format!("node-{}", n.replace('/', "-")));
    pull(node.clone(), &name(n), &remote, &opts(), none())
        .await
        .unwrap();
    assert!(unstash_bytes(&node, n).await == data);
    (stash, stats, seen)
}

/// No pack's ids are offered while the stash runs (see [`HandOver`]), so a
/// chunk that reaches the server then went up from the bytes handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_handed_over_as_compressed_go_up_before_their_packs_are_offered() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let builder = client_store(dir.path(), "builder");
    let data = mixed_bytes(12, 40 << 20);
    let o = (&opts(), Duration::from_secs(20));
    let (stash, s, seen) =
        hand_over_and_push(&server, dir.path(), &builder, "main/handed", data, o).await;
    assert!(seen, "no handed-over chunk reached the server");
    assert!(s.chunks_sent_early > 0, "{s:?}");
    assert_eq!(s.bytes_sent, stash.stored_bytes, "{s:?}");
    server.stop().await;
}

/// Each job's chunks are more than the 256 KiB budget: the upload keeps
/// none of their bytes, so nothing reaches the server before the packs'
/// ids are offered; then every chunk goes up once, read back from the
/// store (checked by the helper).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_over_chunks_beyond_the_budget_go_up_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let builder = small_pack_store(dir.path(), "builder");
    let data = mixed_bytes(13, 8 << 20);
    let o = Options {
        early_held_bytes: 256 << 10,
        ..opts()
    };
    let (stash, _, seen) = hand_over_and_push(
        &server,
        dir.path(),
        &builder,
        "main/budget",
        data,
        (&o, Duration::from_secs(2)),
    )
    .await;
    assert!(
        stash.stored_bytes > 256 << 10,
        "the stash must not fit the budget: {stash:?}"
    );
    assert!(!seen, "bytes beyond the budget were held and uploaded");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_the_server_already_holds_are_not_uploaded_early() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    // One builder pushes v1 the plain way.
    let v1 = mixed_bytes(21, 4 << 20);
    let first = client_store(dir.path(), "first");
    stash_bytes(&first, "main/v1", &v1).await;
    push(first.clone(), &name("main/v1"), &remote, &opts(), none())
        .await
        .unwrap();
    let before = server.metrics.chunks_received.load(Relaxed);

    // Another builder, with an empty store, stashes v2 = v1 + 1 MiB: every
    // chunk is new to it, but the server holds v1's.
    let mut v2 = v1.clone();
    v2.extend_from_slice(&random_bytes(22, 1 << 20));
    let second = small_pack_store(dir.path(), "second");
    let early = start_early(&second, "main/v2", &remote, &opts());
    let (stash, _) = stash_offering(&second, "main/v2", v2.clone(), &early).await;
    let report = unwrap_early(early).push(none()).await.unwrap();
    let s = &report.stats;
    let v1_ids: std::collections::HashSet<ChunkId> =
        chunk_ids(&first, "main/v1").into_iter().collect();
    let new_on_server = chunk_ids(&second, "main/v2")
        .into_iter()
        .filter(|id| !v1_ids.contains(id))
        .count() as u64;
    assert!(new_on_server > 0 && new_on_server < stash.new_chunks);
    assert_eq!(s.chunks_sent, new_on_server, "{s:?}");
    assert!(s.chunks_sent_early <= s.chunks_sent, "{s:?}");
    assert_eq!(s.chunks_present, s.chunks - new_on_server, "{s:?}");
    assert_eq!(
        server.metrics.chunks_received.load(Relaxed) - before,
        new_on_server
    );
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/v2"), &remote, &opts(), none())
        .await
        .unwrap();
    assert!(unstash_bytes(&node, "main/v2").await == v2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_may_not_write_the_name_uploads_nothing_and_the_push_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(PR);
    let builder = small_pack_store(dir.path(), "builder");
    let early = start_early(&builder, "main/x", &remote, &opts());
    stash_offering(&builder, "main/x", mixed_bytes(31, 2 << 20), &early).await;
    let e = unwrap_early(early).push(none()).await.unwrap_err();
    match &e {
        ClientError::Refused { kind, .. } => assert_eq!(*kind, ErrorKind::Forbidden, "{e}"),
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(e.to_string().contains("may not write"), "{e}");
    assert_eq!(server.metrics.chunks_received.load(Relaxed), 0);
    assert!(server.open_store().list(None).unwrap().is_empty());
    server.stop().await;
}

/// The server restarts after the early upload: the push finds its
/// connection gone, reconnects (a retry) and still commits every chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_after_the_early_upload_is_ridden_out_by_the_push() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(dir.path()).await;
    let addr = first.addr;
    let remote = first.remote(MAIN);
    let builder = small_pack_store(dir.path(), "builder");
    let data = mixed_bytes(41, 3 << 20);
    let o = Options {
        retries: 5,
        ..opts()
    };
    let early = start_early(&builder, "main/restart", &remote, &o);
    let (stash, _) = stash_offering(&builder, "main/restart", data.clone(), &early).await;
    // Until the client has every answer: a stop before the last one would
    // break the early upload itself, and the push would start afresh on a
    // new connection instead of finding its connection gone.
    wait_for(30, "the early upload", || {
        early.chunks_sent() == stash.new_chunks
    })
    .await;
    assert_eq!(
        first.metrics.chunks_received.load(Relaxed),
        stash.new_chunks
    );
    // A graceful stop keeps what the connection uploaded (flushed at its end).
    first.stop().await;
    let second = TestServer::start_with(config(dir.path(), addr)).await;
    let report = unwrap_early(early).push(none()).await.unwrap();
    assert!(report.stats.attempts >= 2, "{:?}", report.stats);
    assert_eq!(report.manifest, stash.manifest);
    let node = client_store(dir.path(), "node");
    pull(
        node.clone(),
        &name("main/restart"),
        &remote,
        &opts(),
        none(),
    )
    .await
    .unwrap();
    assert!(unstash_bytes(&node, "main/restart").await == data);
    second.stop().await;
}

/// The stash makes no new pack for longer than the server's idle timeout
/// (a slow `docker save`, or a long run of chunks the store already holds):
/// the early upload's connection stays open, so nothing is sent twice and
/// the push needs no second connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_longer_than_the_idle_timeout_keeps_the_early_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.limits.idle_timeout_secs = 1;
    let server = TestServer::start_with(cfg).await;
    let remote = server.remote(MAIN);
    let builder = small_pack_store(dir.path(), "builder");
    let first = mixed_bytes(51, 3 << 20);
    let mut second = first.clone();
    second.extend_from_slice(&random_bytes(52, 2 << 20));

    let early = start_early(&builder, "main/slow", &remote, &opts());
    // Two stashes of the name, the second extending the first, with a
    // pause of three idle timeouts between them; one upload serves both.
    let (one, _) = stash_offering(&builder, "main/slow", first, &early).await;
    wait_for(30, "the first part's upload", || {
        server.metrics.chunks_received.load(Relaxed) == one.new_chunks
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (two, _) = stash_offering(&builder, "main/slow", second.clone(), &early).await;
    let report = unwrap_early(early).push(none()).await.unwrap();
    let s = &report.stats;
    assert_eq!(s.attempts, 1, "{s:?}");
    assert_eq!(s.chunks as usize, chunk_ids(&builder, "main/slow").len());
    // Every new chunk of both stashes went up once (the first stash's last
    // chunk, cut at its end, is not in the second), and the push found
    // every chunk of the name already sent on its connection.
    assert_eq!(s.chunks_sent, one.new_chunks + two.new_chunks, "{s:?}");
    assert_eq!(s.chunks_present, 0, "{s:?}");
    assert_eq!(
        server.metrics.chunks_received.load(Relaxed),
        s.chunks_sent,
        "a chunk went up twice"
    );
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/slow"), &remote, &opts(), none())
        .await
        .unwrap();
    assert!(unstash_bytes(&node, "main/slow").await == second);
    server.stop().await;
}

/// A stash that fails after its early upload began: `abandon` (or
/// dropping the blocking upload) stops the upload and closes the
/// connection at once, instead of leaving the server to hold it until its
/// idle timeout (60 s here). Nothing is named on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_early_upload_closes_its_connection_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let builder = client_store(dir.path(), "builder");
    stash_bytes(&builder, "main/failed", &random_bytes(5, 8 << 20)).await;
    let ids = chunk_ids(&builder, "main/failed");
    let sessions = || server.metrics.active_sessions.load(Relaxed);
    let received = || server.metrics.chunks_received.load(Relaxed);

    for (round, abandon) in [(0, true), (1, false)] {
        let before = received();
        let some = ids[round * 8..round * 8 + 8].to_vec();
        let (store, remote) = (builder.clone(), remote.clone());
        let early = tokio::task::spawn_blocking(move || {
            let early = transfer::client::blocking::EarlyUpload::start(
                store,
                &name("main/failed"),
                &remote,
                &opts(),
            )
            .unwrap();
            early.offer(&some);
            early
        })
        .await
        .unwrap();
        wait_for(30, "chunks on the early connection", || {
            sessions() == 1 && received() > before
        })
        .await;
        tokio::task::spawn_blocking(move || {
            if abandon {
                early.abandon()
            } else {
                drop(early)
            }
        })
        .await
        .unwrap();
        wait_for(5, "the server to see the connection closed", || {
            sessions() == 0
        })
        .await;
    }
    assert!(server.open_store().list(None).unwrap().is_empty());
}

/// A collection on the server while a long early upload runs condemns the
/// pack the server already sealed for it (nothing names it yet). The push
/// still commits on its first attempt and sends nothing twice; the next
/// collection takes the pack back and deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_during_an_early_upload_costs_no_second_upload() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let remote = server.remote(MAIN);
    let admin = server.remote(ADMIN);
    let builder = small_pack_store(dir.path(), "builder");
    // More than one server pack (64 MiB): one is sealed, unnamed, while
    // the upload runs.
    let data = random_bytes(21, 72 << 20);
    let early = start_early(&builder, "main/long", &remote, &opts());
    let (stash, _) = stash_offering(&builder, "main/long", data.clone(), &early).await;
    let received = || server.metrics.chunks_received.load(Relaxed);
    wait_for(60, "the early upload of every new chunk", || {
        received() == stash.new_chunks
    })
    .await;

    let collect = GcOptions {
        repack_below: 0.0,
        ..collect_now()
    };
    let first = gc(&admin, &collect, &opts()).await.unwrap();
    assert!(first.report.packs_condemned >= 1, "{:?}", first.report);
    assert_eq!(first.report.packs_deleted, 0, "{:?}", first.report);

    let report = unwrap_early(early).push(none()).await.unwrap();
    let s = &report.stats;
    assert_eq!(s.attempts, 1, "{s:?}");
    assert_eq!(s.chunks_sent, stash.new_chunks, "{s:?}");
    assert_eq!(received(), stash.new_chunks, "a chunk went up twice");

    let second = gc(&admin, &collect, &opts()).await.unwrap();
    assert!(second.report.packs_uncondemned >= 1, "{:?}", second.report);
    assert_eq!(second.report.packs_deleted, 0, "{:?}", second.report);
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/long"), &remote, &opts(), none())
        .await
        .unwrap();
    assert!(unstash_bytes(&node, "main/long").await == data);
    server.stop().await;
}
