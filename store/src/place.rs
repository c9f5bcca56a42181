//! Writing a stash into a file by offset: its chunks are placed in any
//! order, from any thread, as they become available — e.g. as they arrive
//! from a server over parallel streams — with no reordering buffer, so the
//! memory a restore needs does not depend on how late a chunk comes.
//!
//! A [`Placement`] says where each chunk's bytes go: a manifest lists two
//! chunk streams (tar structure and content) and a layout that interleaves
//! them, so a chunk may be split across layout runs and a chunk used twice
//! goes to two places. A [`PlacedFile`] writes into a temporary file next
//! to the target and renames it once every byte is placed: the target
//! appears complete or not at all, as with [`Store::unstash`].

use crate::backend::Backend;
use crate::gather::Gather;
use crate::index::Index;
use crate::lease::Lease;
use crate::manifest::{ChunkRef, Manifest, StashKind};
use crate::repo::{read_chunk, Progress, Store, StoreError, UnstashReport};
use crate::scratch::ScratchFile;
use crate::tarsplit::Part;
use crate::ChunkId;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

/// Where a run of a chunk's bytes goes in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the output.
    pub at: u64,
    /// Offset in the chunk.
    pub from: u32,
    /// Length.
    pub len: u32,
}

/// Where every chunk of a manifest goes in the restored bytes.
#[derive(Debug)]
pub struct Placement {
    /// Distinct chunks, sorted.
    ids: Vec<ChunkId>,
    /// Raw length of each (as the manifest first gives it).
    lens: Vec<u32>,
    /// `pieces[starts[i]..starts[i + 1]]` belong to `ids[i]`.
    starts: Vec<usize>,
    pieces: Vec<Piece>,
    size: u64,
}

impl Placement {
    /// The placement of `manifest`'s chunks, or `None` when its layout and
    /// chunk lists disagree (a decoded manifest never does: decoding
    /// checks it).
    pub fn of(manifest: &Manifest) -> Option<Placement> {
        // (chunk, piece) in output order, then grouped by chunk.
        let mut all: Vec<(ChunkId, Piece)> = Vec::with_capacity(manifest.chunks().count() + 1);
        let mut cursors = [(0usize, 0u32); 2];
        let mut at = 0u64;
        for (part, run) in &manifest.layout {
            let list = match part {
                Part::Meta => &manifest.meta,
                Part::Content => &manifest.content,
            };
            let (next, used) = &mut cursors[part as usize];
            let mut left = run;
            while left > 0 {
                let chunk = list.get(*next)?;
                let take = u64::from(chunk.len - *used).min(left) as u32;
                if take > 0 {
                    all.push((
                        chunk.id,
                        Piece {
                            at,
                            from: *used,
                            len: take,
                        },
                    ));
                }
                at = at.checked_add(u64::from(take))?;
                left -= u64::from(take);
                *used += take;
                if *used == chunk.len {
                    *next += 1;
                    *used = 0;
                }
            }
        }
        // Every chunk consumed, to its end (empty ones included).
        for (part, list) in [
            (Part::Meta, &manifest.meta),
            (Part::Content, &manifest.content),
        ] {
            let (next, used) = &mut cursors[part as usize];
            while *used == 0 && list.get(*next).is_some_and(|c| c.len == 0) {
                *next += 1;
            }
            if *next != list.len() || *used != 0 {
                return None;
            }
        }
        if at != manifest.header.size {
            return None;
        }
        all.sort_unstable_by_key(|(id, p)| (*id, p.at));
        let mut lens_of: std::collections::HashMap<ChunkId, u32> = Default::default();
        for c in manifest.chunks() {
            lens_of.entry(c.id).or_insert(c.len);
        }
        let mut ids: Vec<ChunkId> = lens_of.keys().copied().collect();
        ids.sort_unstable();
        let lens = ids.iter().map(|id| lens_of[id]).collect();
        let mut starts = Vec::with_capacity(ids.len() + 1);
        let mut k = 0;
        for id in &ids {
            starts.push(k);
            while k < all.len() && all[k].0 == *id {
                k += 1;
            }
        }
        starts.push(k);
        Some(Placement {
            ids,
            lens,
            starts,
            pieces: all.into_iter().map(|(_, p)| p).collect(),
            size: at,
        })
    }

    /// The distinct chunks, sorted.
    pub fn chunks(&self) -> &[ChunkId] {
        &self.ids
    }

    /// Length of the output.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where `id`'s bytes go, in output order; `None` if the manifest does
    /// not name it.
    pub fn pieces(&self, id: &ChunkId) -> Option<&[Piece]> {
        self.position(id).map(|i| self.pieces_of(i))
    }

    /// The distinct chunks in the order of their first bytes in the
    /// output: the order in which to fetch them, so that the blocks of
    /// the file fill up one after the other.
    pub fn in_output_order(&self) -> Vec<ChunkId> {
        let mut order: Vec<(u64, usize)> =
            (0..self.ids.len()).map(|i| (self.first_at(i), i)).collect();
        order.sort_unstable();
        order.into_iter().map(|(_, i)| self.ids[i]).collect()
    }

    /// Where the `i`th distinct chunk's first byte goes (0 for an empty one).
    fn first_at(&self, i: usize) -> u64 {
        self.pieces_of(i).first().map_or(0, |p| p.at)
    }

    /// The pieces of the `i`th distinct chunk.
    fn pieces_of(&self, i: usize) -> &[Piece] {
        &self.pieces[self.starts[i]..self.starts[i + 1]]
    }

    fn position(&self, id: &ChunkId) -> Option<usize> {
        self.ids.binary_search(id).ok()
    }
}

/// Whether a file target can be written by offset: anything but an
/// existing device, FIFO or socket (`/dev/stdout`, a named pipe), which
/// take their bytes in order.
pub fn placeable(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) => meta.is_file() || meta.is_dir(),
        Err(_) => true,
    }
}

/// A file being restored by offset: see the [module docs](self).
///
/// One writer thread writes the chunks, as they are placed, where they go:
/// whoever places a chunk goes on (a downloader to its next request) unless
/// the writer's bounded queue is full, which then holds it back at the
/// disk's pace; and writes into the file do not contend for its inode lock.
/// Dropped before [`finish`](Self::finish), it removes its temporary file
/// and the target is untouched.
pub struct PlacedFile {
    name: String,
    kind: StashKind,
    path: PathBuf,
    placement: Arc<Placement>,
    /// Chunk references in the manifest, for the report.
    refs: u64,
    state: Arc<Mutex<Placing>>,
    /// To the writer; `None` once finished.
    queue: Mutex<Option<Queue>>,
    writer: Mutex<Option<std::thread::JoinHandle<Option<ScratchFile>>>>,
    backend: Arc<dyn Backend>,
    index: Arc<RwLock<Index>>,
    started: Instant,
    /// Keeps the collector from deleting packs this restore reads.
    _lease: Option<Lease>,
}

/// To the writer thread: a chunk's position in the placement, its raw bytes.
type Queue = std::sync::mpsc::SyncSender<Vec<(usize, Vec<u8>)>>;

/// What the writer thread did, shared.
struct Placing {
    placed: Vec<bool>,
    /// Why the writer stopped early.
    failed: Option<String>,
}

/// Batches of chunks placed but not written yet: at most this many.
const QUEUE: usize = 8;

/// Raw bytes per batch handed to the writer, at most (a single chunk
/// larger than this goes alone); callers of [`PlacedFile::place_all`]
/// gather about this much before handing chunks over. Handed over one by
/// one, the chunks of a remote unstash of the benchmark's v1 woke the
/// writer for nearly each of its 28,000 chunks (18,000-21,000 voluntary
/// context switches in all, 6,000-11,000 in batches), and the unstash took
/// 4.06-4.23 s against 3.54-3.77 s in batches (four alternating pairs,
/// BENCHMARKS.md §4, 2026-12-03). With [`QUEUE`], at most 16 MiB wait for
/// the writer.
pub const BATCH_BYTES: usize = 2 << 20;

/// Chunks read from the store's packs per hand-over to the writer: about
/// 2 MiB at the average chunk size.
const PLACE_STORED_GROUP: usize = 32;

impl Store {
    /// Starts restoring `manifest` (named `label` in messages) into the
    /// file `path` by offset; see [`PlacedFile`]. Holds a lease, so the
    /// collector keeps what [`PlacedFile::place_stored`] may read. The
    /// target is checked as [`Store::unstash`] checks it: an existing file
    /// is refused unless `force` (then its mode is kept), a directory is
    /// refused, and so is a device, FIFO or socket (see [`placeable`]).
    pub fn place_file(
        &self,
        label: &str,
        manifest: &Manifest,
        path: &Path,
        force: bool,
        progress: Arc<dyn Progress>,
    ) -> Result<PlacedFile, StoreError> {
        let kind = manifest.header.kind;
        if !crate::repo::check_file_target(label, kind, path, force)? {
            return Err(StoreError::WrongTarget {
                name: label.to_string(),
                kind: kind.as_str(),
                hint: "the target is a device, FIFO or socket, which is written in order: restore into it with `ferry unstash NAME - > TARGET`",
            });
        }
        let placement = Placement::of(manifest).ok_or_else(|| StoreError::CorruptChunk {
            name: label.to_string(),
            chunk: ChunkId([0; 32]),
            detail: "the layout and the chunk lists describe different bytes".into(),
        })?;
        let placement = Arc::new(placement);
        let lease = self.lease("unstash")?;
        let index = Arc::clone(self.index()?);
        let shown = path.display().to_string();
        let output = |error| StoreError::Output {
            what: shown.clone(),
            error,
        };
        let file = ScratchFile::for_target(path).map_err(output)?;
        // Sparse until written: no byte is written twice.
        file.as_file().set_len(placement.size).map_err(output)?;
        progress.total(placement.size);
        let state = Arc::new(Mutex::new(Placing {
            placed: vec![false; placement.ids.len()],
            failed: None,
        }));
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let writer = {
            let (placement, state) = (placement.clone(), state.clone());
            std::thread::Builder::new()
                .name("ferry-place".into())
                .spawn(move || write_placed(file, &placement, &state, rx, progress.as_ref()))
                .map_err(output)?
        };
        Ok(PlacedFile {
            name: label.to_string(),
            kind,
            path: path.to_path_buf(),
            placement,
            refs: manifest.chunks().count() as u64,
            state,
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            backend: self.backend_arc(),
            index,
            started: Instant::now(),
            _lease: lease,
        })
    }
}

/// The writer thread: writes each chunk it is given to its places (in
/// whole blocks where it can: [`Gather`]), until the queue closes or a
/// write fails; hands the file back if every write succeeded.
fn write_placed(
    file: ScratchFile,
    placement: &Placement,
    state: &Mutex<Placing>,
    queue: std::sync::mpsc::Receiver<Vec<(usize, Vec<u8>)>>,
    progress: &dyn Progress,
) -> Option<ScratchFile> {
    let failed = |e: std::io::Error| {
        lock(state).failed = Some(e.to_string());
        None
    };
    let mut gather = Gather::new(file.as_file(), placement.size);
    for (i, raw) in queue.into_iter().flatten() {
        if lock(state).placed[i] {
            continue;
        }
        let pieces = placement.pieces_of(i);
        if let Err(e) = gather.put(raw, pieces) {
            return failed(e);
        }
        lock(state).placed[i] = true;
        progress.advance(pieces.iter().map(|p| u64::from(p.len)).sum());
    }
    if let Err(e) = gather.finish() {
        return failed(e);
    }
    Some(file)
}

fn lock(state: &Mutex<Placing>) -> MutexGuard<'_, Placing> {
    // A panicking holder leaves at worst a chunk not marked placed, which
    // `finish` reports.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for PlacedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacedFile")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("unplaced", &self.unplaced())
            .finish_non_exhaustive()
    }
}

impl PlacedFile {
    /// Where the chunks go.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    fn write_error(&self, why: String) -> StoreError {
        StoreError::Output {
            what: self.path.display().to_string(),
            error: std::io::Error::other(why),
        }
    }

    /// Where `id` is in the placement; an error if the manifest does not
    /// name it.
    fn position(&self, id: &ChunkId) -> Result<usize, StoreError> {
        self.placement
            .position(id)
            .ok_or_else(|| StoreError::CorruptChunk {
                name: self.name.clone(),
                chunk: *id,
                detail: "the manifest does not name it".into(),
            })
    }

    /// Queues chunk `id`, whose raw bytes `raw` the caller has checked
    /// against the id, to be written to every place the stash uses it.
    /// Placing a chunk twice does nothing the second time. Fails if the
    /// chunk does not belong here or an earlier write failed.
    pub fn place(&self, id: &ChunkId, raw: Vec<u8>) -> Result<(), StoreError> {
        self.place_all(vec![(*id, raw)])
    }

    /// [`place`](Self::place) for several chunks at once: the writer
    /// thread is handed them in a few batches instead of one by one, so
    /// it wakes less often. Checks every chunk before queueing any.
    pub fn place_all(&self, chunks: Vec<(ChunkId, Vec<u8>)>) -> Result<(), StoreError> {
        let mut positions = Vec::with_capacity(chunks.len());
        for (id, raw) in &chunks {
            positions.push(self.check(id, raw)?);
        }
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(queue) = queue else {
            // Finished: only chunks already written may come again.
            let state = lock(&self.state);
            if positions.iter().all(|&i| state.placed[i]) {
                return Ok(());
            }
            drop(state);
            return Err(self.write_error("the file is already complete".into()));
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        for (i, (_, raw)) in positions.into_iter().zip(chunks) {
            if bytes > 0 && bytes + raw.len() > BATCH_BYTES {
                self.send(&queue, std::mem::take(&mut batch))?;
                bytes = 0;
            }
            bytes += raw.len();
            batch.push((i, raw));
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.send(&queue, batch)
    }

    /// Where chunk `id` goes, once its bytes `raw` are checked against the
    /// placement.
    fn check(&self, id: &ChunkId, raw: &[u8]) -> Result<usize, StoreError> {
        let wrong = |detail: String| StoreError::CorruptChunk {
            name: self.name.clone(),
            chunk: *id,
            detail,
        };
        let i = self.position(id)?;
        let len = self.placement.lens[i];
        if raw.len() != len as usize {
            return Err(wrong(format!(
                "{} bytes, the manifest says {len}",
                raw.len()
            )));
        }
        let pieces = self.placement.pieces_of(i);
        if pieces.iter().any(|p| p.from + p.len > len) {
            return Err(wrong("the manifest gives it two lengths".into()));
        }
        Ok(i)
    }

    /// Hands `batch` to the writer; waits while its queue is full. Fails
    /// if the writer stopped (an earlier write failed).
    fn send(&self, queue: &Queue, batch: Vec<(usize, Vec<u8>)>) -> Result<(), StoreError> {
        if queue.send(batch).is_ok() {
            return Ok(());
        }
        let why = lock(&self.state).failed.clone();
        Err(self.write_error(why.unwrap_or_else(|| "the writer stopped".into())))
    }

    /// Places chunks this store holds, reading and verifying them from its
    /// packs, several at a time, in about the order they go in the file.
    pub fn place_stored(&self, ids: &[ChunkId]) -> Result<(), StoreError> {
        let mut order = Vec::with_capacity(ids.len());
        for id in ids {
            let i = self.position(id)?;
            order.push((self.placement.first_at(i), i));
        }
        order.sort_unstable();
        // Groups of chunks: each is one hand-over to the writer.
        order.par_chunks(PLACE_STORED_GROUP).try_for_each(|group| {
            let mut batch = Vec::with_capacity(group.len());
            for &(_, i) in group {
                let chunk = ChunkRef {
                    id: self.placement.ids[i],
                    len: self.placement.lens[i],
                };
                let loc = self.index.read().expect("index lock").get(&chunk.id);
                let mut raw = Vec::new();
                read_chunk(self.backend.as_ref(), &self.name, &chunk, loc, &mut raw)?;
                batch.push((chunk.id, raw));
            }
            self.place_all(batch)
        })
    }

    /// Distinct chunks not written yet.
    pub fn unplaced(&self) -> usize {
        lock(&self.state).placed.iter().filter(|p| !**p).count()
    }

    /// Waits for the writes, then gives the file its name if every chunk
    /// was placed; reports what was written.
    pub fn finish(&self) -> Result<UnstashReport, StoreError> {
        // Closing the queue ends the writer once it wrote what is queued.
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(writer) = writer else {
            return Err(self.write_error("the file is already complete".into()));
        };
        let file = writer.join().ok().flatten();
        let state = lock(&self.state);
        let Some(file) = file else {
            let why = state.failed.clone();
            return Err(
                self.write_error(why.unwrap_or_else(|| "the writer thread panicked".into()))
            );
        };
        if let Some(i) = state.placed.iter().position(|p| !p) {
            return Err(self.write_error(format!(
                "chunk {} was never written, nor {} other(s): the file is incomplete",
                self.placement.ids[i],
                state.placed[i..].iter().filter(|p| !**p).count() - 1
            )));
        }
        drop(state);
        // Not fsynced: a restore is scratch data for the job at hand, and
        // the rename already keeps a partial file from its name.
        file.persist(&self.path)
            .map_err(|error| StoreError::Output {
                what: self.path.display().to_string(),
                error,
            })?;
        Ok(UnstashReport::new(
            &self.name,
            self.kind,
            self.placement.size,
            self.refs,
            self.started,
        ))
    }
}

impl Drop for PlacedFile {
    fn drop(&mut self) {
        // The writer ends, and its temporary file goes with it.
        if let Ok(queue) = self.queue.get_mut() {
            queue.take();
        }
        if let Some(w) = self.writer.get_mut().ok().and_then(Option::take) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Header;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn refs(list: &[(u8, u32)]) -> Vec<ChunkRef> {
        list.iter()
            .map(|&(n, len)| ChunkRef { id: id(n), len })
            .collect()
    }

    fn manifest(meta: &[(u8, u32)], content: &[(u8, u32)], layout: &[(Part, u64)]) -> Manifest {
        Manifest {
            header: Header {
                kind: StashKind::File,
                size: layout.iter().map(|r| r.1).sum(),
                sha256: String::new(),
                source: None,
                image: None,
            },
            meta: refs(meta),
            content: refs(content),
            layout: layout.iter().copied().collect(),
        }
    }

    fn piece(at: u64, from: u32, len: u32) -> Piece {
        Piece { at, from, len }
    }

    #[test]
    fn chunks_split_across_runs_and_repeated_go_everywhere_they_are_used() {
        // meta: chunk 1 (10 bytes) split by a content run; content: 2, 3, 2.
        let m = manifest(
            &[(1, 10)],
            &[(2, 5), (3, 5), (2, 5)],
            &[
                (Part::Meta, 4),
                (Part::Content, 7),
                (Part::Meta, 6),
                (Part::Content, 8),
            ],
        );
        let p = Placement::of(&m).unwrap();
        assert_eq!(p.size(), 25);
        assert_eq!(p.chunks(), &[id(1), id(2), id(3)]);
        assert_eq!(
            p.pieces(&id(1)).unwrap(),
            &[piece(0, 0, 4), piece(11, 4, 6)]
        );
        assert_eq!(
            p.pieces(&id(2)).unwrap(),
            &[piece(4, 0, 5), piece(20, 0, 5)]
        );
        // Chunk 3 straddles the meta run: 2 bytes before, 3 after.
        assert_eq!(
            p.pieces(&id(3)).unwrap(),
            &[piece(9, 0, 2), piece(17, 2, 3)]
        );
        assert_eq!(p.pieces(&id(9)), None);
    }

    #[test]
    fn chunks_are_fetched_in_the_order_the_file_first_uses_them() {
        // Tar-like: headers (meta 7, then 5) before the files they
        // describe (content 9, then 6), each chunk used once.
        let m = manifest(
            &[(7, 3), (5, 3)],
            &[(9, 4), (6, 4)],
            &[
                (Part::Meta, 3),
                (Part::Content, 4),
                (Part::Meta, 3),
                (Part::Content, 4),
            ],
        );
        let p = Placement::of(&m).unwrap();
        assert_eq!(p.chunks(), &[id(5), id(6), id(7), id(9)]);
        assert_eq!(p.in_output_order(), [id(7), id(9), id(5), id(6)]);
    }

    #[test]
    fn a_layout_that_disagrees_with_the_lists_is_refused() {
        let short = manifest(&[], &[(1, 10)], &[(Part::Content, 9)]);
        assert!(Placement::of(&short).is_none());
        let long = manifest(&[], &[(1, 10)], &[(Part::Content, 11)]);
        assert!(Placement::of(&long).is_none());
        let empty = manifest(&[], &[], &[]);
        assert_eq!(Placement::of(&empty).unwrap().size(), 0);
    }

    #[test]
    fn targets_that_take_bytes_in_order_are_not_placeable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(placeable(&dir.path().join("new")));
        assert!(placeable(dir.path()));
        assert!(!placeable(Path::new("/dev/null")));
    }
}
