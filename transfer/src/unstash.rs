//! Remote unstash that streams: output is written while the chunks this
//! node lacks arrive, out of order, over parallel streams.
//!
//! Three parties share a board (`Arrivals`):
//! - the **restore** (on a blocking thread) writes the output, in one of
//!   two ways. Into a file, by offset ([`store::place`]): chunks the node
//!   holds are read from its packs and written where they go, downloaded
//!   ones are written by the downloaders as they arrive, and the file gets
//!   its name once every byte is in place. Into a stream (standard output,
//!   a FIFO) or a directory, in order: the store's own
//!   [`StashReader`](store::repo::StashReader) says which chunks it wants
//!   next and waits on the board for each one it reads;
//! - **downloaders** (one task per stream) take work from the board: first
//!   what the in-order restore is waiting for, then read-ahead of the
//!   content stream, as long as no more than a window of bytes is fetched
//!   but not yet consumed (a file written by offset consumes every chunk
//!   as it arrives, so everything missing is read ahead, in the order of
//!   the file); each reply is verified once (decoded, BLAKE3 against the
//!   id);
//! - the **importer** (a thread) appends the verified chunks, as received,
//!   to packs of the node's store, so the next unstash fetches nothing;
//!   once a pack is durable, its chunks leave the board (later uses read
//!   them from the pack).
//!
//! Memory stays bounded by the window (or, by offset, the requests in
//! flight), the importer's queue (32 MiB), one pack and the restore's
//! batches, whatever the size of the stash. A lost connection is
//! re-established (with backoff, within the retry budget) and the
//! outstanding requests are asked again, so standard output never sees a
//! byte twice. The local name is committed last, once every chunk is
//! durable in the node's store.

use crate::client::{
    blocking, delta_bases, fetch_manifest, frame_budget, get_chunks, with_retries, ClientError,
    Counters, Options, Remote, Session, TransferStats,
};
use crate::proto::{self, ErrorKind, Message};
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use store::import::{Importer, VerifiedChunk};
use store::manifest::{ChunkRef, Manifest, StashKind};
use store::name::Name;
use store::place::{PlacedFile, Placement};
use store::repo::{ChunkSource, Progress, Store, StoreError, Target, UnstashReport};
use store::{ChunkId, ManifestId};
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// Where a remote unstash writes.
pub enum Destination {
    /// A byte stream, e.g. standard output.
    Writer(Box<dyn Write + Send>),
    /// A path: a file (written under a temporary name, renamed when
    /// complete), or a directory for directory stashes.
    Path(PathBuf),
}

/// A finished remote unstash.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteUnstashReport {
    /// What was written.
    #[serde(flatten)]
    pub unstash: UnstashReport,
    /// The manifest restored.
    pub manifest: ManifestId,
    /// The server.
    pub remote: String,
    /// What moved.
    pub transfer: TransferStats,
    /// Why the node's cache could not keep the fetched chunks (the output is
    /// complete and verified all the same; the next unstash fetches again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_error: Option<String>,
}

/// Unstashes `name` from the server into `dest`, streaming: output is
/// written while chunks arrive, and the node's store (`store`) keeps the
/// chunks it lacked, so that a later unstash of the same or a related
/// stash fetches only what is new. Existing targets are refused unless
/// `force`.
pub async fn unstash(
    store: Arc<Store>,
    name: &Name,
    dest: Destination,
    force: bool,
    remote: &Remote,
    opts: &Options,
    progress: Arc<dyn Progress>,
) -> Result<RemoteUnstashReport, ClientError> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let ((session, id, bytes), _) = with_retries(opts, "unstash", |_| {
        let store = store.clone();
        async move {
            let session = Session::connect(remote, opts).await?;
            check_read(&session, name)?;
            let have = {
                let (s, n) = (store.clone(), name.clone());
                blocking(move || Ok(delta_bases(&s, &n))).await?
            };
            let (id, bytes) = fetch_manifest(&session, &store, name, have).await?;
            if ManifestId::of(&bytes) != id {
                return Err(session.protocol(format!("manifest {id} does not match its bytes")));
            }
            Ok((session, id, bytes))
        }
    })
    .await?;
    let manifest = Manifest::decode(&bytes)
        .map_err(|e| session.protocol(format!("manifest {id} does not decode: {e}")))?;
    let output = match dest {
        Destination::Writer(w) => Output::InOrder(Target::Writer(w)),
        Destination::Path(p) if manifest.header.kind == StashKind::Directory => {
            Output::InOrder(Target::Directory(p))
        }
        Destination::Path(p) if store::place::placeable(&p) => Output::ByOffset(p),
        Destination::Path(p) => Output::InOrder(Target::File(p)),
    };

    let board = Arc::new(Arrivals::new(opts.read_ahead.max(1)));
    let (planned_tx, planned_rx) = tokio::sync::oneshot::channel::<Option<Arc<PlacedFile>>>();
    let restore = {
        let (store, board, counters, progress) = (
            store.clone(),
            board.clone(),
            counters.clone(),
            progress.clone(),
        );
        let label = name.to_string();
        tokio::task::spawn_blocking(move || {
            // What the plan counts as held stays held until the restore
            // ends: the reader, or the placed file, takes its lease first.
            let plan = |board: &Arrivals, manifest: &Manifest, placement: Option<&Placement>| {
                let refs = crate::client::distinct(manifest);
                let ids: Vec<ChunkId> = refs.iter().map(|c| c.id).collect();
                let missing = store.missing(&ids)?;
                counters.chunks.store(refs.len() as u64, Relaxed);
                counters
                    .present
                    .store((refs.len() - missing.len()) as u64, Relaxed);
                board.plan(manifest, &missing, placement);
                Ok::<_, StoreError>(missing)
            };
            match output {
                Output::InOrder(target) => {
                    let plan_from = manifest.clone();
                    let reader = store.open_manifest(&label, manifest, board.clone())?;
                    plan(&board, &plan_from, None)?;
                    let _ = planned_tx.send(None);
                    store.restore(reader, target, force, progress.as_ref())
                }
                Output::ByOffset(path) => {
                    let placed =
                        Arc::new(store.place_file(&label, &manifest, &path, force, progress)?);
                    let missing: HashSet<ChunkId> =
                        plan(&board, &manifest, Some(placed.placement()))?
                            .into_iter()
                            .collect();
                    let _ = planned_tx.send(Some(placed.clone()));
                    // While the downloaders place what they fetch.
                    let held: Vec<ChunkId> = placed
                        .placement()
                        .chunks()
                        .iter()
                        .filter(|id| !missing.contains(*id))
                        .copied()
                        .collect();
                    placed.place_stored(&held)?;
                    board.wait_for_the_rest()?;
                    placed.finish()
                }
            }
        })
    };

    let link = Arc::new(Link {
        current: tokio::sync::Mutex::new((0, session)),
        remote: remote.clone(),
        opts: opts.clone(),
        name: name.clone(),
        manifest: id,
        reconnects: AtomicU32::new(0),
    });
    let mut workers = JoinSet::new();
    let mut importer = None;
    if let Ok(placed) = planned_rx.await {
        debug!(chunks = board.lock().missing.len(), "chunks to download");
        let (tx, rx) = std::sync::mpsc::channel::<VerifiedChunk>();
        let queue = Arc::new(ImportQueue::new(IMPORT_QUEUE_BYTES));
        importer = Some(spawn_importer(
            store.clone(),
            board.clone(),
            rx,
            queue.clone(),
        ));
        let limits = link.limits().await;
        let streams = opts.streams.clamp(1, limits.max_streams as usize);
        // Requests small enough that every stream has one in the window.
        let request_bytes = frame_budget(&limits, opts.batch_bytes)
            .min(opts.read_ahead / (2 * streams as u64))
            .max(1 << 20);
        let max_ids = limits.max_batch_ids as usize;
        for _ in 0..streams {
            let importer = Importing {
                chunks: tx.clone(),
                queue: queue.clone(),
            };
            let (board, link, counters, placed) = (
                board.clone(),
                link.clone(),
                counters.clone(),
                placed.clone(),
            );
            workers.spawn(async move {
                let r = download(
                    &board,
                    &link,
                    &counters,
                    importer,
                    placed,
                    request_bytes,
                    max_ids,
                )
                .await;
                if let Err(e) = &r {
                    board.fail(e);
                }
                r
            });
        }
    }

    let restored = restore
        .await
        .map_err(|e| ClientError::Config(format!("the restore task failed: {e}")))?;
    match &restored {
        // A restore may end without reading every chunk (a directory's tar
        // stops at its end-of-archive blocks): fetch the rest for the cache.
        Ok(_) => board.want_the_rest(),
        Err(_) => board.stop(),
    }
    // On success the downloaders finish what the restore did not read (a
    // tar's trailing padding, say): the node's copy must be whole.
    let mut download_err = None;
    while let Some(r) = workers.join_next().await {
        let r = r.unwrap_or_else(|e| Err(ClientError::Config(format!("a download failed: {e}"))));
        if let Err(e) = r {
            download_err.get_or_insert(e);
            board.stop();
        }
    }
    let imported = match importer {
        Some(handle) => Some(
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_else(|| {
                    Err(StoreError::Output {
                        what: "the node's store".into(),
                        error: io::Error::other("the importer thread panicked"),
                    })
                }),
        ),
        None => None,
    };
    let attempts = link.attempts();
    link.close(&counters).await;

    let unstashed = match restored {
        Ok(report) => report,
        // A download failure is the cause; the restore only saw its echo.
        Err(e) => return Err(download_err.unwrap_or(ClientError::Store(e))),
    };
    if let Some(e) = download_err {
        return Err(e);
    }
    let cache_error = match imported {
        Some(Err(e)) => Some(e.to_string()),
        imported => {
            let (s, n) = (store.clone(), name.clone());
            blocking(move || {
                // With the importer's lease: a collection on this node
                // that condemned the packs it sealed (nothing named them
                // yet) does not make the fetched chunks count as missing.
                store::import::commit(&s, imported.and_then(Result::ok), &n, &bytes)?;
                store::cache::touch(&s, &n);
                Ok(())
            })
            .await
            .err()
            .map(|e| e.to_string())
        }
    };
    if let Some(e) = &cache_error {
        warn!(error = %e, "the node's store could not keep the fetched chunks");
    }
    Ok(RemoteUnstashReport {
        unstash: unstashed,
        manifest: id,
        remote: remote.display(),
        transfer: counters.stats(attempts, started),
        cache_error,
    })
}

fn check_read(session: &Session, name: &Name) -> Result<(), ClientError> {
    if session.scopes().can_read(name) {
        return Ok(());
    }
    Err(session.refused(
        ErrorKind::Forbidden,
        format!(
            "this token may not read {:?} (it reads {})",
            name.as_str(),
            session.scopes().describe_read()
        ),
    ))
}

/// What the restore writes into.
enum Output {
    /// The store's restore, reading the stash in order (standard output, a
    /// device or FIFO, a directory).
    InOrder(Target),
    /// A file, each chunk written where it goes as it arrives.
    ByOffset(PathBuf),
}

/// One downloader: takes work from the board until nothing is missing.
/// Verified chunks go into `placed` when the file is written by offset,
/// else onto the board for the restore; and to the importer.
async fn download(
    board: &Arc<Arrivals>,
    link: &Link,
    counters: &Counters,
    importer: Importing,
    placed: Option<Arc<PlacedFile>>,
    request_bytes: u64,
    max_ids: usize,
) -> Result<(), ClientError> {
    loop {
        if link.opts.stop.requested() {
            return Err(ClientError::Stopped);
        }
        // Registered before looking, so a wake-up in between is not lost.
        let notified = board.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let ids = match board.next_work(request_bytes, max_ids) {
            Work::Done => return Ok(()),
            Work::Wait => {
                let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
                continue;
            }
            Work::Fetch(ids) => ids,
        };
        let (generation, session) = link.current().await;
        let (chunks, rest) = match get_chunks(&session, &ids, |id| board.len_of(id)).await {
            Ok(answer) => answer,
            Err(e) if e.is_transient() => {
                board.requeue(&ids);
                link.reconnect(generation, e, counters).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !rest.is_empty() {
            // Did not fit in one frame: asked again later.
            board.requeue(&rest);
        }
        let stored: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
        counters.received.fetch_add(chunks.len() as u64, Relaxed);
        counters.bytes_received.fetch_add(stored, Relaxed);
        let (b, tx, placed) = (board.clone(), importer.clone(), placed.clone());
        let verified = tokio::task::spawn_blocking(move || {
            // Chunks for the file go to its writer a batch at a time.
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            let place = |batch: Vec<(ChunkId, Vec<u8>)>| {
                let Some(placed) = &placed else { return Ok(()) };
                let ids: Vec<ChunkId> = batch.iter().map(|c| c.0).collect();
                placed.place_all(batch).map_err(Failed::Write)?;
                for id in ids {
                    b.arrive(id, Vec::new());
                }
                Ok(())
            };
            for c in chunks {
                let id = c.id;
                let mut raw = Vec::with_capacity(c.raw_len as usize);
                let v = c
                    .verify(&mut raw)
                    .map_err(|e| Failed::Corrupt(id, e.to_string()))?;
                if placed.is_some() {
                    // Handed over before it would outgrow one batch, so
                    // place_all need not split it.
                    if batch_bytes > 0 && batch_bytes + raw.len() > store::place::BATCH_BYTES {
                        place(std::mem::take(&mut batch))?;
                        batch_bytes = 0;
                    }
                    batch_bytes += raw.len();
                    batch.push((id, raw));
                } else {
                    b.arrive(id, raw);
                }
                // A stopped importer (the node's store failed) is reported
                // when it is joined; the restore goes on without it.
                tx.send(v);
            }
            place(batch)?;
            Ok::<(), Failed>(())
        })
        .await
        .map_err(|e| ClientError::Config(format!("a verification task failed: {e}")))?;
        match verified {
            Ok(()) => {}
            Err(Failed::Corrupt(chunk, e)) => {
                return Err(session.refused(
                    ErrorKind::Corrupt,
                    format!("the server sent chunk {chunk}, which does not match its id ({e})"),
                ))
            }
            Err(Failed::Write(e)) => return Err(ClientError::Store(e)),
        }
    }
}

/// Why a downloaded chunk went nowhere.
enum Failed {
    /// It does not match its id.
    Corrupt(ChunkId, String),
    /// Writing it into the file failed.
    Write(StoreError),
}

/// Ends with every fetched chunk durable and the importer (and its lease)
/// still held, for the commit of the name into the node's store.
type ImporterThread = std::thread::JoinHandle<Result<Importer<Arc<Store>>, StoreError>>;

/// Raw bytes of chunks read once and wanted again that may wait in memory
/// for their pack to be written.
const RETAIN_LIMIT: u64 = 32 << 20;

/// Stored bytes of verified chunks that may wait for the importer. It
/// stops at each full pack while the pack is made durable (an fsync, 70-150
/// ms on the bench VM) and writes past the page cache at the device's
/// pace. Behind a queue of 64 chunks (about 2 MiB) the downloaders waited
/// for it 11-16 s of their 8 x 5.5 s in an unstash of v1, with the cores
/// not busy. A 48 MiB queue took 0.2-1.0 s off the unstash in six
/// alternating pairs; 16-96 MiB did about alike, and 32 MiB costs 10-30
/// MiB more peak RSS than before (BENCHMARKS.md §4, 2026-12-03).
const IMPORT_QUEUE_BYTES: u64 = 32 << 20;

/// The downloaders' end of the importer's queue.
#[derive(Clone)]
struct Importing {
    chunks: std::sync::mpsc::Sender<VerifiedChunk>,
    queue: Arc<ImportQueue>,
}

impl Importing {
    /// Queues `chunk` for the importer; waits while the queue is full. A
    /// stopped importer takes nothing (its error is reported when joined).
    fn send(&self, chunk: VerifiedChunk) {
        self.queue.take(chunk.stored().bytes.len() as u64);
        let _ = self.chunks.send(chunk);
    }
}

/// The bytes in the importer's queue, bounded: senders wait while it is
/// full, unless it is empty (a chunk larger than the bound still goes) or
/// the importer has stopped.
struct ImportQueue {
    state: Mutex<Queued>,
    freed: Condvar,
    limit: u64,
}

#[derive(Default)]
struct Queued {
    bytes: u64,
    /// The importer has stopped.
    closed: bool,
}

impl ImportQueue {
    fn new(limit: u64) -> ImportQueue {
        ImportQueue {
            state: Mutex::default(),
            freed: Condvar::new(),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `bytes` in, once they fit.
    fn take(&self, bytes: u64) {
        let mut q = self.lock();
        while !q.closed && q.bytes > 0 && q.bytes + bytes > self.limit {
            q = self.freed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        q.bytes += bytes;
    }

    /// Counts `bytes` out: the importer is done with them.
    fn give(&self, bytes: u64) {
        let mut q = self.lock();
        q.bytes = q.bytes.saturating_sub(bytes);
        drop(q);
        self.freed.notify_all();
    }

    /// The importer stopped: nobody waits any more.
    fn close(&self) {
        self.lock().closed = true;
        self.freed.notify_all();
    }
}

/// Closes the queue when the importer thread ends, however it ends.
struct CloseOnDrop(Arc<ImportQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Appends verified chunks to the node's store as they come; tells the
/// board when they are durable.
fn spawn_importer(
    store: Arc<Store>,
    board: Arc<Arrivals>,
    rx: std::sync::mpsc::Receiver<VerifiedChunk>,
    queue: Arc<ImportQueue>,
) -> ImporterThread {
    std::thread::spawn(move || {
        let _close = CloseOnDrop(queue.clone());
        let mut importer = Importer::shared(store)?;
        for chunk in rx {
            let added = importer.add(&chunk);
            queue.give(chunk.stored().bytes.len() as u64);
            let mut durable = added?;
            if durable.is_empty() && board.retained() > RETAIN_LIMIT {
                // Chunks read once and wanted again wait in memory until
                // their pack is written: write it early rather than hold
                // up to a whole pack of them.
                durable = importer.flush()?;
            }
            board.durable(&durable);
        }
        board.durable(&importer.flush()?);
        Ok(importer)
    })
}

/// The connection shared by the downloaders, replaced when it breaks.
struct Link {
    current: tokio::sync::Mutex<(u64, Session)>,
    remote: Remote,
    opts: Options,
    /// The stash and manifest being fetched: a new connection asks for the
    /// manifest again, since a server sends only chunks of manifests its
    /// client fetched on that connection.
    name: Name,
    manifest: ManifestId,
    reconnects: AtomicU32,
}

impl Link {
    async fn connect(&self) -> Result<Session, ClientError> {
        let session = Session::connect(&self.remote, &self.opts).await?;
        let reply = session
            .request(&Message::GetManifest {
                name: self.name.to_string(),
                have: vec![self.manifest],
            })
            .await?;
        let id = match reply {
            Message::Manifest { id, .. } | Message::ManifestDelta { id, .. } => id,
            other => {
                return Err(session.protocol(format!(
                    "unexpected answer to a manifest request: {}",
                    other.kind_name()
                )))
            }
        };
        if id != self.manifest {
            return Err(ClientError::Config(format!(
                "{} was stashed again on {} while it was being unstashed; run the unstash again",
                self.name,
                self.remote.display()
            )));
        }
        Ok(session)
    }

    async fn current(&self) -> (u64, Session) {
        let g = self.current.lock().await;
        (g.0, g.1.clone())
    }

    async fn limits(&self) -> proto::Limits {
        self.current.lock().await.1.limits()
    }

    fn attempts(&self) -> u32 {
        1 + self.reconnects.load(Relaxed)
    }

    /// Replaces the connection of `generation` after `cause` broke it
    /// (once, however many downloaders saw it break), waiting with backoff;
    /// gives up with `cause` when the retries are used up.
    async fn reconnect(
        &self,
        generation: u64,
        cause: ClientError,
        counters: &Counters,
    ) -> Result<(), ClientError> {
        let mut g = self.current.lock().await;
        if g.0 != generation {
            return Ok(());
        }
        let mut cause = cause;
        loop {
            let n = self.reconnects.fetch_add(1, Relaxed) + 1;
            if n > self.opts.retries {
                return Err(cause);
            }
            let wait = self
                .opts
                .backoff
                .saturating_mul(1 << (n - 1).min(16))
                .min(self.opts.max_backoff);
            warn!(error = %cause, attempt = n, wait_ms = wait.as_millis() as u64,
                  "download failed; reconnecting");
            tokio::time::sleep(wait).await;
            match self.connect().await {
                Ok(s) => {
                    let old = std::mem::replace(&mut g.1, s);
                    g.0 += 1;
                    counters.add_wire(&old);
                    tokio::spawn(old.close());
                    return Ok(());
                }
                Err(e) if e.is_transient() => cause = e,
                Err(e) => return Err(e),
            }
        }
    }

    async fn close(&self, counters: &Counters) {
        let session = self.current.lock().await.1.clone();
        session.close_counted(counters).await;
    }
}

/// What a downloader should do next.
#[derive(Debug, PartialEq, Eq)]
enum Work {
    Fetch(Vec<ChunkId>),
    Wait,
    Done,
}

/// The board the restore, the downloaders and the importer share.
struct Arrivals {
    state: Mutex<Board>,
    /// Readers wait here for chunks.
    arrived: Condvar,
    /// Downloaders wait here for work.
    work: tokio::sync::Notify,
}

#[derive(Default)]
struct Board {
    /// Raw length of every chunk to download.
    lens: HashMap<ChunkId, u32>,
    /// How often each chunk to download occurs in the stash.
    uses: HashMap<ChunkId, u32>,
    /// To download: not arrived yet.
    missing: HashSet<ChunkId>,
    /// Asked for, no answer yet.
    in_flight: HashSet<ChunkId>,
    /// Wanted by the restore, in the order it wants them.
    demand: VecDeque<ChunkId>,
    demanded: HashSet<ChunkId>,
    /// The chunks to download, in order, for read-ahead: the content
    /// stream's, or (placing) all, in the order of the file.
    ahead: Vec<ChunkId>,
    ahead_next: usize,
    /// Arrived, with uses left.
    ready: HashMap<ChunkId, Ready>,
    /// Raw bytes asked for or arrived but not read yet: bounded by `window`
    /// (read-ahead stops there; what the restore waits for is always asked).
    buffered: u64,
    /// Raw bytes of chunks read and wanted again, held until durable.
    retained: u64,
    window: u64,
    /// The chunks are written into a file by offset as they arrive: none
    /// waits on the board, and everything missing is read ahead.
    placing: bool,
    failed: Option<String>,
    stopped: bool,
    /// Chunks restore threads are waiting for (how many threads each): an
    /// arrival wakes them only if it is one of these, not at every chunk.
    waiting: HashMap<ChunkId, u32>,
}

struct Ready {
    raw: Vec<u8>,
    uses: u32,
    read: bool,
    durable: bool,
}

impl Arrivals {
    fn new(window: u64) -> Arrivals {
        Arrivals {
            state: Mutex::new(Board {
                window,
                ..Board::default()
            }),
            arrived: Condvar::new(),
            work: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Board> {
        // A panicking holder cannot leave the board inconsistent in a way
        // that matters more than the panic itself.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what must be downloaded: `missing` among `manifest`'s
    /// chunks, in `placement`'s output order for a file written by offset.
    fn plan(&self, manifest: &Manifest, missing: &[ChunkId], placement: Option<&Placement>) {
        let mut b = self.lock();
        b.placing = placement.is_some();
        if b.placing {
            // Placed chunks leave memory at once: no window to keep.
            b.window = u64::MAX;
        }
        b.missing = missing.iter().copied().collect();
        for c in manifest.chunks() {
            if b.missing.contains(&c.id) {
                b.lens.insert(c.id, c.len);
                *b.uses.entry(c.id).or_default() += 1;
            }
        }
        // A file written by offset takes everything as it comes, best in
        // the order of the file, so that its blocks fill up one after the
        // other (see `store::place`); a restore in order reads the content
        // ahead and asks for the tar structure when it gets there.
        b.ahead = match placement {
            Some(p) => p
                .in_output_order()
                .into_iter()
                .filter(|id| b.missing.contains(id))
                .collect(),
            None => {
                let mut seen = HashSet::new();
                manifest
                    .content
                    .iter()
                    .filter(|c| b.missing.contains(&c.id) && seen.insert(c.id))
                    .map(|c| c.id)
                    .collect()
            }
        };
        drop(b);
        self.work.notify_waiters();
    }

    /// Bytes held for chunks' later uses until they are durable.
    fn retained(&self) -> u64 {
        self.lock().retained
    }

    fn len_of(&self, id: &ChunkId) -> Option<u32> {
        self.lock().lens.get(id).copied()
    }

    /// The next request for a downloader: what the restore waits for first,
    /// then read-ahead within the window.
    fn next_work(&self, max_bytes: u64, max_ids: usize) -> Work {
        let mut b = self.lock();
        if b.failed.is_some() || b.stopped || b.missing.is_empty() {
            return Work::Done;
        }
        let b = &mut *b;
        let mut ids = Vec::new();
        let mut bytes = 0u64;
        let take = |b: &mut Board, id: ChunkId, ids: &mut Vec<ChunkId>, bytes: &mut u64| {
            let len = b.lens.get(&id).copied().unwrap_or(0) as u64;
            b.in_flight.insert(id);
            b.buffered += len;
            *bytes += len;
            ids.push(id);
        };
        while let Some(id) = b.demand.pop_front() {
            b.demanded.remove(&id);
            if b.missing.contains(&id) && !b.in_flight.contains(&id) {
                take(b, id, &mut ids, &mut bytes);
                if bytes >= max_bytes || ids.len() >= max_ids {
                    break;
                }
            }
        }
        if ids.is_empty() {
            while b.ahead_next < b.ahead.len()
                && b.buffered < b.window
                && bytes < max_bytes
                && ids.len() < max_ids
            {
                let id = b.ahead[b.ahead_next];
                b.ahead_next += 1;
                if b.missing.contains(&id) && !b.in_flight.contains(&id) {
                    take(b, id, &mut ids, &mut bytes);
                }
            }
        }
        if ids.is_empty() {
            Work::Wait
        } else {
            Work::Fetch(ids)
        }
    }

    /// Asks for every chunk still missing (the restore is done with it).
    fn want_the_rest(&self) {
        {
            let mut guard = self.lock();
            let b = &mut *guard;
            let mut rest: Vec<ChunkId> = b
                .missing
                .iter()
                .filter(|id| !b.in_flight.contains(*id) && !b.demanded.contains(*id))
                .copied()
                .collect();
            rest.sort_unstable();
            for id in rest {
                b.demanded.insert(id);
                b.demand.push_back(id);
            }
        }
        self.work.notify_waiters();
    }

    /// Puts requests that got no answer back at the front of the queue.
    fn requeue(&self, ids: &[ChunkId]) {
        let mut b = self.lock();
        for id in ids.iter().rev() {
            if b.in_flight.remove(id) {
                let len = b.lens.get(id).copied().unwrap_or(0) as u64;
                b.buffered = b.buffered.saturating_sub(len);
            }
            if b.missing.contains(id) && b.demanded.insert(*id) {
                b.demand.push_front(*id);
            }
        }
        drop(b);
        self.work.notify_waiters();
    }

    /// A verified chunk arrived.
    fn arrive(&self, id: ChunkId, raw: Vec<u8>) {
        let mut b = self.lock();
        b.in_flight.remove(&id);
        if !b.missing.remove(&id) || b.stopped {
            return;
        }
        if b.placing {
            if b.missing.is_empty() {
                drop(b);
                self.arrived.notify_all();
                self.work.notify_waiters();
            }
            return;
        }
        let uses = b.uses.get(&id).copied().unwrap_or(1).max(1);
        b.ready.insert(
            id,
            Ready {
                raw,
                uses,
                read: false,
                durable: false,
            },
        );
        let last = b.missing.is_empty();
        let awaited = b.waiting.contains_key(&id);
        drop(b);
        if awaited {
            self.arrived.notify_all();
        }
        if last {
            // Ends the downloaders' waiting: nothing is left to fetch.
            self.work.notify_waiters();
        }
    }

    /// Waits until no chunk is missing, or a download failed for good.
    fn wait_for_the_rest(&self) -> Result<(), StoreError> {
        let mut b = self.lock();
        loop {
            if b.missing.is_empty() {
                return Ok(());
            }
            let why = match (&b.failed, b.stopped) {
                (Some(why), _) => why.clone(),
                (None, true) => "the download was stopped".into(),
                (None, false) => {
                    b = self
                        .arrived
                        .wait_timeout(b, Duration::from_millis(500))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                    continue;
                }
            };
            return Err(StoreError::Input {
                what: format!("{} chunks from the server", b.missing.len()),
                error: io::Error::other(why),
            });
        }
    }

    /// These chunks are in durable packs of the node's store: once read,
    /// their further uses read them from there.
    fn durable(&self, ids: &[ChunkId]) {
        let mut b = self.lock();
        for id in ids {
            if let Some(r) = b.ready.get_mut(id) {
                r.durable = true;
                if r.read {
                    let len = r.raw.len() as u64;
                    b.ready.remove(id);
                    b.retained = b.retained.saturating_sub(len);
                }
            }
        }
    }

    /// A downloader failed for good: readers stop waiting.
    fn fail(&self, e: &ClientError) {
        let mut b = self.lock();
        b.failed.get_or_insert_with(|| e.to_string());
        drop(b);
        self.arrived.notify_all();
        self.work.notify_waiters();
    }

    /// The restore ended early: downloaders stop, memory is freed.
    fn stop(&self) {
        let mut b = self.lock();
        b.stopped = true;
        b.ready.clear();
        b.retained = 0;
        drop(b);
        self.arrived.notify_all();
        self.work.notify_waiters();
    }
}

impl ChunkSource for Arrivals {
    fn want(&self, chunks: &[ChunkRef]) {
        let mut b = self.lock();
        let mut added = false;
        for c in chunks {
            if b.missing.contains(&c.id) && !b.in_flight.contains(&c.id) && b.demanded.insert(c.id)
            {
                b.demand.push_back(c.id);
                added = true;
            }
        }
        drop(b);
        if added {
            self.work.notify_waiters();
        }
    }

    fn read(&self, chunk: &ChunkRef, out: &mut Vec<u8>) -> Result<bool, StoreError> {
        let mut b = self.lock();
        loop {
            let board = &mut *b;
            if let Some(r) = board.ready.get_mut(&chunk.id) {
                let first_read = !r.read;
                r.read = true;
                r.uses = r.uses.saturating_sub(1);
                let len = r.raw.len() as u64;
                if r.uses == 0 || r.durable {
                    if !first_read {
                        board.retained = board.retained.saturating_sub(len);
                    }
                    *out = board
                        .ready
                        .remove(&chunk.id)
                        .map(|r| r.raw)
                        .unwrap_or_default();
                } else {
                    if first_read {
                        board.retained += len;
                    }
                    out.clone_from(&r.raw);
                }
                if first_read {
                    let len = board.lens.get(&chunk.id).copied().unwrap_or(0) as u64;
                    let was_full = board.buffered >= board.window;
                    board.buffered = board.buffered.saturating_sub(len);
                    if was_full && board.buffered < board.window {
                        // Read-ahead may go on.
                        drop(b);
                        self.work.notify_waiters();
                    }
                }
                return Ok(true);
            }
            if !board.missing.contains(&chunk.id) {
                return Ok(false);
            }
            if let Some(why) = &board.failed {
                return Err(StoreError::Input {
                    what: format!("chunk {} from the server", chunk.id),
                    error: io::Error::other(why.clone()),
                });
            }
            if board.stopped {
                return Err(StoreError::Input {
                    what: format!("chunk {} from the server", chunk.id),
                    error: io::Error::other("the download was stopped"),
                });
            }
            if !board.in_flight.contains(&chunk.id) && board.demanded.insert(chunk.id) {
                board.demand.push_back(chunk.id);
                self.work.notify_waiters();
            }
            *board.waiting.entry(chunk.id).or_default() += 1;
            b = self
                .arrived
                .wait_timeout(b, Duration::from_millis(500))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            if let Some(n) = b.waiting.get_mut(&chunk.id) {
                *n -= 1;
                if *n == 0 {
                    b.waiting.remove(&chunk.id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::manifest::Header;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn manifest(content: &[(u8, u32)]) -> Manifest {
        let content: Vec<ChunkRef> = content
            .iter()
            .map(|&(n, len)| ChunkRef { id: id(n), len })
            .collect();
        let size = content.iter().map(|c| c.len as u64).sum();
        Manifest {
            header: Header {
                kind: StashKind::File,
                size,
                sha256: String::new(),
                source: None,
                image: None,
            },
            meta: Vec::new(),
            content,
            layout: [(store::tarsplit::Part::Content, size)]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn demand_goes_first_and_read_ahead_stops_at_the_window() {
        let board = Arrivals::new(250);
        let m = manifest(&[(1, 100), (2, 100), (3, 100), (4, 100)]);
        board.plan(&m, &[id(1), id(2), id(3), id(4)], None);
        board.want(&[ChunkRef {
            id: id(4),
            len: 100,
        }]);
        assert_eq!(board.next_work(1000, 100), Work::Fetch(vec![id(4)]));
        // 100 buffered: read-ahead takes 1 and 2, then the window is full.
        assert_eq!(board.next_work(1000, 100), Work::Fetch(vec![id(1), id(2)]));
        assert_eq!(board.next_work(1000, 100), Work::Wait);
        board.arrive(id(1), vec![0; 100]);
        let mut out = Vec::new();
        assert!(board
            .read(
                &ChunkRef {
                    id: id(1),
                    len: 100
                },
                &mut out
            )
            .unwrap());
        assert_eq!(out.len(), 100);
        assert_eq!(board.next_work(1000, 100), Work::Fetch(vec![id(3)]));
    }

    #[test]
    fn unanswered_requests_are_asked_again_first() {
        let board = Arrivals::new(1 << 20);
        let m = manifest(&[(1, 10), (2, 10), (3, 10)]);
        board.plan(&m, &[id(1), id(2), id(3)], None);
        assert_eq!(
            board.next_work(1000, 100),
            Work::Fetch(vec![id(1), id(2), id(3)])
        );
        board.requeue(&[id(2), id(3)]);
        assert_eq!(board.next_work(1000, 100), Work::Fetch(vec![id(2), id(3)]));
        for n in 1..=3 {
            board.arrive(id(n), vec![n; 10]);
        }
        assert_eq!(board.next_work(1000, 100), Work::Done);
    }

    #[test]
    fn repeated_chunks_stay_until_durable_then_read_from_the_store() {
        let board = Arrivals::new(1 << 20);
        let m = manifest(&[(1, 10), (2, 10), (1, 10)]);
        board.plan(&m, &[id(1)], None);
        board.arrive(id(1), vec![7; 10]);
        let c = ChunkRef { id: id(1), len: 10 };
        let mut out = Vec::new();
        assert!(board.read(&c, &mut out).unwrap());
        assert_eq!(out, vec![7; 10]);
        // Held for its second use until the importer made it durable.
        assert!(board.lock().ready.contains_key(&id(1)));
        assert_eq!(board.retained(), 10);
        board.durable(&[id(1)]);
        assert_eq!(board.retained(), 0);
        assert!(!board.read(&c, &mut out).unwrap(), "read from the pack");
        // Chunk 2 was never missing: the store has it.
        let c2 = ChunkRef { id: id(2), len: 10 };
        assert!(!board.read(&c2, &mut out).unwrap());
    }

    #[test]
    fn chunks_the_restore_never_read_are_fetched_for_the_cache() {
        let board = Arrivals::new(100);
        // Meta chunks are fetched only when wanted; content is read ahead.
        let mut m = manifest(&[(1, 100)]);
        m.meta = vec![ChunkRef { id: id(9), len: 10 }];
        board.plan(&m, &[id(1), id(9)], None);
        assert_eq!(board.next_work(1000, 100), Work::Fetch(vec![id(1)]));
        board.arrive(id(1), vec![1; 100]);
        assert_eq!(board.next_work(1000, 100), Work::Wait);
        board.want_the_rest();
        assert_eq!(board.next_work(1000, 100), Work::Fetch(vec![id(9)]));
    }

    /// `take(bytes)` on a thread of its own; the receiver hears when it returns.
    fn takes_soon(queue: &Arc<ImportQueue>, bytes: u64) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let q = queue.clone();
        std::thread::spawn(move || {
            q.take(bytes);
            let _ = tx.send(());
        });
        rx
    }

    #[test]
    fn the_importers_queue_holds_senders_while_full_and_never_once_closed() {
        let wait = Duration::from_millis(50);
        let queue = Arc::new(ImportQueue::new(100));
        // Larger than the bound, into an empty queue: it goes.
        queue.take(150);
        let blocked = takes_soon(&queue, 1);
        assert!(
            blocked.recv_timeout(wait).is_err(),
            "took into a full queue"
        );
        queue.give(150);
        blocked.recv_timeout(Duration::from_secs(5)).unwrap();
        // 1 queued: up to the bound goes, one byte more waits.
        queue.take(98);
        assert!(takes_soon(&queue, 1)
            .recv_timeout(Duration::from_secs(5))
            .is_ok());
        let blocked = takes_soon(&queue, 1);
        assert!(blocked.recv_timeout(wait).is_err(), "took past the bound");
        // A stopped importer frees every sender, now and later.
        queue.close();
        blocked.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(takes_soon(&queue, 1000)
            .recv_timeout(Duration::from_secs(5))
            .is_ok());
    }

    #[test]
    fn a_failure_ends_the_readers_wait_with_its_reason() {
        let board = Arc::new(Arrivals::new(1 << 20));
        board.plan(&manifest(&[(1, 10)]), &[id(1)], None);
        let b = board.clone();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            b.read(&ChunkRef { id: id(1), len: 10 }, &mut out)
        });
        std::thread::sleep(Duration::from_millis(50));
        board.fail(&ClientError::Config("the server went away".into()));
        let err = reader.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("the server went away"), "{err}");
        assert_eq!(board.next_work(1000, 100), Work::Done);
    }
}
