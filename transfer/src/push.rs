//! Push: a stash from a local store to a server.
//!
//! [`push`] sends the manifest's chunk ids in batches, learns which chunks
//! the server lacks, uploads only those (as stored, already compressed) on
//! parallel streams, and commits the manifest and name last.
//!
//! An [`EarlyUpload`] starts that work while the stash is still being
//! written: the stash hands over its new chunks as they are compressed
//! ([`store::repo::Progress::compressed`]; their bytes, kept up to
//! [`EARLY_HELD_BYTES`]) and reports each pack as it becomes durable
//! ([`store::repo::Progress::stored`]; ids, read back from the store if not
//! held), and the upload sends what the server lacks of them at once,
//! overlapping chunking and compression with the network. The push at the
//! end then asks only about the chunks not sent yet, on the same
//! connection, and commits. Early uploading is only an optimisation: if it
//! fails, the push sends whatever is still missing.

use crate::client::{
    blocking, distinct, frame_budget, with_retries, ClientError, Counters, Options, PushReport,
    Remote, Session,
};
use crate::proto::{self, ErrorKind, Message, CHUNK_OVERHEAD};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;
use store::manifest::ChunkRef;
use store::name::Name;
use store::repo::{NoProgress, Progress, Store, StoreError, StoredChunk};
use store::{ChunkId, ManifestId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// Pushes the stash `name` from `store` to the server: uploads only the
/// chunks the server lacks, then commits the name there.
pub async fn push(
    store: Arc<Store>,
    name: &Name,
    remote: &Remote,
    opts: &Options,
    progress: Arc<dyn Progress>,
) -> Result<PushReport, ClientError> {
    push_after(store, name, remote, opts, progress, None).await
}

/// How many bytes of handed-over chunks an early upload keeps waiting at
/// most, by default ([`Options::early_held_bytes`]). Beyond that a chunk
/// waits until its pack is durable and is then read back from the store:
/// memory stays bounded when the network is slower than the stash.
pub const EARLY_HELD_BYTES: u64 = 64 << 20;

/// What a stash offers an early upload.
enum Offer {
    /// Durable in the store: read them back unless held.
    Durable(Vec<ChunkId>),
    /// Just compressed, with their bytes (counted in `held_bytes`).
    Held(Vec<StoredChunk>),
}

/// Uploads the new chunks of a stash that is still running, so that the
/// push at its end has (almost) nothing left to send.
///
/// Feed it what [`Progress::compressed`] and [`Progress::stored`] report,
/// then call [`EarlyUpload::push`] once the stash has finished. Errors here
/// are not reported: the push re-checks every chunk and sends what is
/// missing.
pub struct EarlyUpload {
    tx: mpsc::UnboundedSender<Offer>,
    /// Bytes of held chunks offered and not yet uploaded (shared with the
    /// task), and how many it may be.
    held_bytes: Arc<AtomicU64>,
    held_limit: u64,
    task: tokio::task::JoinHandle<Early>,
    /// Tells the task to stop at once and close its connection.
    stop: Arc<tokio::sync::Notify>,
    /// What it has moved so far (shared with the task).
    counters: Arc<Counters>,
    store: Arc<Store>,
    name: Name,
    remote: Remote,
    opts: Options,
}

/// What an early upload leaves to the push.
#[derive(Default)]
struct Early {
    /// Its connection, if still good: the server holds what was uploaded
    /// on it (in the connection's pack, made durable before a commit).
    session: Option<Session>,
    /// Chunks the server acknowledged on `session`.
    sent: HashSet<ChunkId>,
    counters: Arc<Counters>,
}

impl EarlyUpload {
    /// Connects to the server and waits for chunks to upload. Must be
    /// called within a tokio runtime, which runs the upload.
    pub fn start(store: Arc<Store>, name: &Name, remote: &Remote, opts: &Options) -> EarlyUpload {
        let (tx, rx) = mpsc::unbounded_channel();
        let early_opts = Options {
            streams: opts.early_streams,
            ..opts.clone()
        };
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(tokio::sync::Notify::new());
        let held_bytes = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run_early(
            store.clone(),
            name.clone(),
            remote.clone(),
            early_opts,
            counters.clone(),
            (rx, held_bytes.clone()),
            stop.clone(),
        ));
        EarlyUpload {
            tx,
            held_bytes,
            held_limit: opts.early_held_bytes,
            task,
            stop,
            counters,
            store,
            name: name.clone(),
            remote: remote.clone(),
            opts: opts.clone(),
        }
    }

    /// These chunks are durable in the store: upload those the server
    /// lacks. Never blocks.
    pub fn offer(&self, ids: &[ChunkId]) {
        // A stopped upload is not an error: the push sends the rest.
        let _ = self.tx.send(Offer::Durable(ids.to_vec()));
    }

    /// These chunks were just compressed (not durable yet): upload those
    /// the server lacks from the bytes given, which it keeps meanwhile —
    /// unless that would hold more than [`Options::early_held_bytes`]; then
    /// they wait for [`EarlyUpload::offer`]. Never blocks.
    pub fn offer_compressed(&self, chunks: &[StoredChunk]) {
        let bytes: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
        let held = self.held_bytes.fetch_add(bytes, Relaxed) + bytes;
        if held > self.held_limit || self.tx.send(Offer::Held(chunks.to_vec())).is_err() {
            self.held_bytes.fetch_sub(bytes, Relaxed);
        }
    }

    /// Chunks the server has acknowledged so far.
    pub fn chunks_sent(&self) -> u64 {
        self.counters.sent.load(Relaxed)
    }

    /// Waits for the chunks offered so far, then pushes the stash (which
    /// must now be committed locally): uploads what is still missing and
    /// commits. The report counts the early uploads too.
    pub async fn push(self, progress: Arc<dyn Progress>) -> Result<PushReport, ClientError> {
        let EarlyUpload {
            tx,
            held_bytes: _,
            held_limit: _,
            task,
            stop: _,
            counters,
            store,
            name,
            remote,
            opts,
        } = self;
        // What went up while the stash ran; the rest is the push's time.
        counters
            .sent_early
            .store(counters.sent.load(Relaxed), Relaxed);
        push_after(store, &name, &remote, &opts, progress, Some((tx, task))).await
    }

    /// The stash failed: stops uploading (what arrived stays on the server
    /// unreferenced, for its garbage collection) and closes the connection
    /// politely, so that the server frees it now rather than after its idle
    /// timeout.
    pub async fn abandon(self) {
        self.stop.notify_one();
        match self.task.await {
            // It had finished: close its connection here.
            Ok(Early {
                session: Some(session),
                counters,
                ..
            }) => session.close_counted(&counters).await,
            Ok(_) => {}
            Err(e) => debug!(error = %e, "the early upload failed"),
        }
        drop(self.tx); // only now: a closed channel also ends the task
    }
}

async fn run_early(
    store: Arc<Store>,
    name: Name,
    remote: Remote,
    opts: Options,
    counters: Arc<Counters>,
    mut offers: (mpsc::UnboundedReceiver<Offer>, Arc<AtomicU64>),
    stop: Arc<tokio::sync::Notify>,
) -> Early {
    let mut early = Early {
        counters,
        ..Early::default()
    };
    // The session's pings keep the connection open while the stash has no
    // new pack (the server's idle timeout may be shorter than that wait).
    let session = match Session::connect(&remote, &opts).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "no early upload: cannot connect; the push will retry");
            return early;
        }
    };
    let uploads = upload_offered(&session, &store, &name, &opts, &mut early, &mut offers);
    let finished = tokio::select! {
        biased; // a stop wins over the end of the offers
        () = stop.notified() => false,
        finished = uploads => finished,
    };
    if finished {
        early.session = Some(session);
    } else {
        // The dropped requests reset their streams; what is in flight
        // still fills the congestion window until acknowledged.
        session.settle_and_close(&early.counters).await;
        early.sent.clear();
    }
    early
}

/// Uploads what the server lacks of every batch offered, until the offers
/// end; returns whether the session is still good for the push.
async fn upload_offered(
    session: &Session,
    store: &Arc<Store>,
    name: &Name,
    opts: &Options,
    early: &mut Early,
    (rx, held_bytes): &mut (mpsc::UnboundedReceiver<Offer>, Arc<AtomicU64>),
) -> bool {
    // Without the right to write, leave the clear refusal to the push.
    if session.scopes().can_write(name) {
        while let Some(first) = rx.recv().await {
            // Everything offered meanwhile, once: ids not sent yet, and the
            // bytes of those that were handed over.
            let mut offers = vec![first];
            while let Ok(more) = rx.try_recv() {
                offers.push(more);
            }
            let mut ids = Vec::new();
            let mut seen = HashSet::new();
            let mut held = HashMap::new();
            let mut held_total = 0u64;
            for offer in offers {
                let offered: Vec<ChunkId> = match offer {
                    Offer::Durable(ids) => ids,
                    Offer::Held(chunks) => chunks
                        .into_iter()
                        .map(|c| {
                            held_total += c.bytes.len() as u64;
                            let id = c.id;
                            held.insert(id, c);
                            id
                        })
                        .collect(),
                };
                ids.extend(
                    offered
                        .into_iter()
                        .filter(|id| !early.sent.contains(id) && seen.insert(*id)),
                );
            }
            let sent = async {
                let missing = missing_on_server(session, name, &ids, opts).await?;
                upload(
                    session,
                    store,
                    name,
                    missing.clone(),
                    std::mem::take(&mut held),
                    opts,
                    &early.counters,
                    Arc::new(NoProgress),
                )
                .await?;
                Ok::<_, ClientError>(missing)
            }
            .await;
            held_bytes.fetch_sub(held_total, Relaxed);
            match sent {
                Ok(missing) => early.sent.extend(missing),
                Err(e) => {
                    debug!(error = %e, "the early upload stopped; the push will send the rest");
                    return false;
                }
            }
        }
    }
    true
}

type EarlyTask = (mpsc::UnboundedSender<Offer>, tokio::task::JoinHandle<Early>);

async fn push_after(
    store: Arc<Store>,
    name: &Name,
    remote: &Remote,
    opts: &Options,
    progress: Arc<dyn Progress>,
    early: Option<EarlyTask>,
) -> Result<PushReport, ClientError> {
    let started = Instant::now();
    let early = match early {
        Some((tx, task)) => {
            drop(tx); // no more chunks: the task ends after the last batch
            task.await.unwrap_or_else(|e| {
                debug!(error = %e, "the early upload failed");
                Early::default()
            })
        }
        None => Early::default(),
    };
    let (id, manifest, manifest_bytes) = {
        let (s, n) = (store.clone(), name.clone());
        blocking(move || s.manifest_and_bytes(&n)).await?
    };
    let refs = Arc::new(distinct(&manifest));
    let manifest_bytes = Arc::new(manifest_bytes);
    let counters = early.counters;
    counters.chunks.store(refs.len() as u64, Relaxed);
    // The first attempt continues on the early upload's connection and
    // skips what it sent; a retry starts over on a new one.
    let mut reuse = early.session.map(|s| (s, early.sent));
    let (_, attempts) = with_retries(opts, "push", |_| {
        let (store, refs, bytes, counters, progress) = (
            store.clone(),
            refs.clone(),
            manifest_bytes.clone(),
            counters.clone(),
            progress.clone(),
        );
        let reuse = reuse.take();
        async move {
            let (session, skip) = match reuse {
                Some(r) => r,
                None => (Session::connect(remote, opts).await?, HashSet::new()),
            };
            let r = push_once(
                &session, store, name, &refs, &skip, &bytes, id, opts, &counters, progress,
            )
            .await;
            session.close_counted(&counters).await;
            r
        }
    })
    .await?;
    Ok(PushReport {
        name: name.to_string(),
        manifest: id,
        remote: remote.display(),
        stats: counters.stats(attempts, started),
    })
}

/// A commit the server would refuse for its size is refused before
/// anything is uploaded (by this attempt), naming the limit to raise.
fn commit_fits(
    session: &Session,
    name: &Name,
    commit: &Message,
    manifest_bytes: &[u8],
) -> Result<(), ClientError> {
    let limits = session.limits();
    let frame = proto::encoded_len(commit) - proto::HEADER_LEN;
    // Our own encoder records the uncompressed size in the frame.
    let raw = zstd::zstd_safe::get_frame_content_size(manifest_bytes)
        .ok()
        .flatten()
        .unwrap_or(0);
    if frame > limits.max_frame as usize || raw > limits.max_manifest() as u64 {
        return Err(session.refused(
            ErrorKind::Limit,
            format!(
                "the manifest of {name} is too large for this server ({} bytes stored, {raw} \
                 uncompressed; it takes frames of {} bytes and manifests of up to {} bytes \
                 uncompressed): raise limits.max_frame_bytes in the server's config, or \
                 stash the data under several names",
                manifest_bytes.len(),
                limits.max_frame,
                limits.max_manifest()
            ),
        ));
    }
    Ok(())
}

/// One attempt on one connection. `skip`: chunks already uploaded on it.
#[allow(clippy::too_many_arguments)]
async fn push_once(
    session: &Session,
    store: Arc<Store>,
    name: &Name,
    refs: &[ChunkRef],
    skip: &HashSet<ChunkId>,
    manifest_bytes: &[u8],
    id: ManifestId,
    opts: &Options,
    counters: &Arc<Counters>,
    progress: Arc<dyn Progress>,
) -> Result<(), ClientError> {
    if !session.scopes().can_write(name) {
        return Err(session.refused(
            ErrorKind::Forbidden,
            format!(
                "this token may not write {:?} (it writes {}); nothing was sent",
                name.as_str(),
                session.scopes().describe_write()
            ),
        ));
    }
    let commit = Message::Commit {
        name: name.to_string(),
        manifest: manifest_bytes.to_vec(),
    };
    commit_fits(session, name, &commit, manifest_bytes)?;
    // The server re-checks every chunk at the commit; if its garbage
    // collector condemned one it had said it held, ask again and upload it.
    let mut round = 0;
    loop {
        round += 1;
        let ask: Vec<ChunkId> = refs
            .iter()
            .map(|c| c.id)
            .filter(|id| round > 1 || !skip.contains(id))
            .collect();
        let missing = missing_on_server(session, name, &ask, opts).await?;
        let uploaded = refs.len() - ask.len();
        counters
            .present
            .store((ask.len() - missing.len()) as u64, Relaxed);
        debug!(missing = missing.len(), uploaded, "server lacks");
        upload(
            session,
            &store,
            name,
            missing,
            HashMap::new(),
            opts,
            counters,
            progress.clone(),
        )
        .await?;

        // Commit, last.
        match session.request(&commit).await {
            Ok(Message::CommitReply { id: got }) if got == id => return Ok(()),
            Ok(other) => {
                return Err(session.protocol(format!("unexpected answer to a commit: {other:?}")))
            }
            Err(e) if e.kind() == Some(ErrorKind::MissingChunks) && round < 3 => {
                warn!(error = %e, "the server lost chunks before the commit; uploading them");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Of `ids`, those the server lacks: batches asked on parallel streams.
async fn missing_on_server(
    session: &Session,
    name: &Name,
    ids: &[ChunkId],
    opts: &Options,
) -> Result<Vec<ChunkId>, ClientError> {
    let limits = session.limits();
    let streams = opts.streams.clamp(1, limits.max_streams as usize);
    let batches: Vec<Vec<ChunkId>> = ids
        .chunks(limits.max_batch_ids as usize)
        .map(<[ChunkId]>::to_vec)
        .collect();
    let mut results: Vec<Option<Vec<ChunkId>>> = vec![None; batches.len()];
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < batches.len() || !set.is_empty() {
        while next < batches.len() && set.len() < streams {
            let (s, ids, n) = (session.clone(), batches[next].clone(), name.to_string());
            let i = next;
            set.spawn(async move {
                let asked: HashSet<ChunkId> = ids.iter().copied().collect();
                match s.request(&Message::Missing { name: n, ids }).await? {
                    Message::MissingReply { ids } if ids.iter().all(|i| asked.contains(i)) => {
                        Ok((i, ids))
                    }
                    other => Err(s.protocol(format!(
                        "unexpected answer to a missing query: {}",
                        other.kind_name()
                    ))),
                }
            });
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            let (i, ids) = r.map_err(|e| session.protocol(format!("task failed: {e}")))??;
            results[i] = Some(ids);
        }
    }
    Ok(results.into_iter().flatten().flatten().collect())
}

/// Uploads `missing`, from `held` where it has them and else from the
/// store: a reader thread groups stored chunks into batches; parallel
/// workers send them, one request per batch.
#[allow(clippy::too_many_arguments)]
async fn upload(
    session: &Session,
    store: &Arc<Store>,
    name: &Name,
    missing: Vec<ChunkId>,
    mut held: HashMap<ChunkId, StoredChunk>,
    opts: &Options,
    counters: &Arc<Counters>,
    progress: Arc<dyn Progress>,
) -> Result<(), ClientError> {
    if missing.is_empty() {
        return Ok(());
    }
    let limits = session.limits();
    let streams = opts.streams.clamp(1, limits.max_streams as usize);
    let max_ids = limits.max_batch_ids as usize;
    let budget = frame_budget(&limits, opts.batch_bytes);
    // Two batches wait: reading packs is faster than the network.
    let (tx, rx) = mpsc::channel::<Vec<StoredChunk>>(2);
    let reader_store = store.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        for id in missing {
            let c = match held.remove(&id) {
                Some(c) => c,
                None => reader_store
                    .read_stored(&id)?
                    .ok_or_else(|| StoreError::MissingChunk {
                        name: "(push)".into(),
                        chunk: id,
                    })?,
            };
            let cost = (CHUNK_OVERHEAD + c.bytes.len()) as u64;
            if !batch.is_empty() && (bytes + cost > budget || batch.len() >= max_ids) {
                if tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                    return Ok(()); // the workers stopped; their error is reported
                }
                bytes = 0;
            }
            bytes += cost;
            batch.push(c);
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(batch);
        }
        Ok(())
    });
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = JoinSet::new();
    for _ in 0..streams {
        let (s, rx, counters, progress, n) = (
            session.clone(),
            rx.clone(),
            counters.clone(),
            progress.clone(),
            name.to_string(),
        );
        workers.spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(chunks) = next else {
                    return Ok::<(), ClientError>(());
                };
                let count = chunks.len() as u64;
                let bytes: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
                match s
                    .request(&Message::PutChunks {
                        name: n.clone(),
                        chunks,
                    })
                    .await?
                {
                    Message::PutReply { received, .. } if received as u64 == count => {}
                    other => {
                        return Err(s.protocol(format!("unexpected answer to an upload: {other:?}")))
                    }
                }
                counters.sent.fetch_add(count, Relaxed);
                counters.bytes_sent.fetch_add(bytes, Relaxed);
                progress.advance(bytes);
            }
        });
    }
    let mut first_err = None;
    while let Some(r) = workers.join_next().await {
        let r = r.unwrap_or_else(|e| Err(session.protocol(format!("task failed: {e}"))));
        if let Err(e) = r {
            if first_err.is_none() {
                first_err = Some(e);
                workers.abort_all();
                rx.lock().await.close();
            }
        }
    }
    // Drain so the reader's blocking_send cannot wait forever.
    while rx.lock().await.recv().await.is_some() {}
    let read = reader
        .await
        .map_err(|e| ClientError::Config(format!("the chunk reader failed: {e}")))?;
    if let Some(e) = first_err {
        return Err(e);
    }
    read?;
    Ok(())
}
