//! The store as a whole: open a directory, stash and unstash byte streams,
//! files and directories under names, list, inspect, remove, measure and
//! check. This is the library behind `ferry stash`, `ferry unstash`,
//! `ferry ls`, `ferry inspect`, `ferry rm`, `ferry du` and `ferry fsck`.
//!
//! Stash pipeline: a reader thread reads large blocks and computes the
//! SHA-256 of the stream; the tar splitter sends tar structure to the
//! metadata stream and file contents to the content stream; each stream is
//! chunked and hashed in parallel; chunks the store lacks are compressed in
//! parallel, a job at a time, while a thread beside appends the job before
//! to a pack. Packs are durable before the manifest, and the manifest
//! before the name: a killed stash leaves unreferenced packs, never a name
//! that points at missing data.

use crate::backend::{Backend, BackendError, Kind, LocalDir};
use crate::chunker::{Batch, Chunker, ChunkerParams, StreamChunker};
use crate::compress::{self, Codec};
use crate::dirtar::{self, DirTarError};
use crate::image::{self, ImageKind};
use crate::index::{Index, IndexProblem, Location};
use crate::layout::{Layout, RunCursor};
use crate::lease::Lease;
use crate::manifest::{ChunkRef, Header, Manifest, ManifestError, StashKind};
use crate::name::Name;
use crate::pack::{self, PackError, PackWriter};
use crate::refs::{self, RefError};
use crate::scratch::{parent_dir, ScratchDir, ScratchFile};
use crate::tarsplit::{Part, TarSplitter};
use crate::{ChunkId, ManifestId, PackId};
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// Tunables of a store session.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Chunk sizes.
    pub chunker: ChunkerParams,
    /// zstd level for new chunks.
    pub level: i32,
    /// Target size of a pack file.
    pub pack_size: u64,
    /// Write packs past the page cache (`O_DIRECT`; see
    /// [`LocalDir::set_direct_writes`]). Default: yes, unless
    /// `FERRY_DIRECT_IO=0` is set.
    pub direct_writes: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            chunker: ChunkerParams::default(),
            level: compress::DEFAULT_LEVEL,
            pack_size: pack::DEFAULT_TARGET_SIZE,
            direct_writes: crate::direct::wanted(),
        }
    }
}

/// Everything that can go wrong in the store, with what failed and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store directory could not be opened or created.
    #[error("cannot open the store at {}: {error}", path.display())]
    Open {
        /// The store's directory.
        path: PathBuf,
        /// Why.
        error: BackendError,
    },
    /// A storage operation failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The index could not be loaded.
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    /// The chunk sizes are unusable.
    #[error(transparent)]
    Config(#[from] crate::chunker::ParamsError),
    /// Writing or reading a pack failed.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// A name could not be resolved or updated.
    #[error(transparent)]
    Ref(#[from] RefError),
    /// Reading the input failed.
    #[error("reading {what}: {error}")]
    Input {
        /// What was being read.
        what: String,
        /// Why it failed.
        error: io::Error,
    },
    /// Writing the output failed.
    #[error("writing {what}: {error}")]
    Output {
        /// What was being written.
        what: String,
        /// Why it failed.
        error: io::Error,
    },
    /// A directory could not be archived or restored.
    #[error(transparent)]
    Directory(#[from] DirTarError),
    /// A manifest did not decode.
    #[error("the manifest {id} of {name:?} is damaged ({problem}); run `ferry fsck`")]
    Manifest {
        /// The name that points at it.
        name: String,
        /// Its id.
        id: ManifestId,
        /// What is wrong.
        problem: ManifestError,
    },
    /// A chunk a manifest names is not in the store.
    #[error(
        "{name:?} cannot be restored: chunk {chunk} is missing from the store; run `ferry fsck`"
    )]
    MissingChunk {
        /// The stash.
        name: String,
        /// The chunk.
        chunk: ChunkId,
    },
    /// A chunk's stored bytes do not match its id.
    #[error(
        "{name:?} cannot be restored: chunk {chunk} is corrupt ({detail}); run `ferry fsck --full`"
    )]
    CorruptChunk {
        /// The stash.
        name: String,
        /// The chunk.
        chunk: ChunkId,
        /// Where and how.
        detail: String,
    },
    /// The target exists and overwriting was not asked for.
    #[error("{} already exists; use --force to overwrite it", path.display())]
    Exists {
        /// The target.
        path: PathBuf,
    },
    /// The stash cannot be written to that kind of target.
    #[error("{name:?} is a {kind} stash: {hint}")]
    WrongTarget {
        /// The stash.
        name: String,
        /// Its kind.
        kind: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
}

fn input_err(what: &str) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Input {
        what: what.to_string(),
        error: source,
    }
}

fn output_err(what: &str) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Output {
        what: what.to_string(),
        error: source,
    }
}

/// Reports progress of long operations (bytes read or written). The CLI
/// draws a bar on a terminal and log lines elsewhere.
pub trait Progress: Send + Sync {
    /// `bytes` more were processed.
    fn advance(&self, bytes: u64);
    /// The whole operation will process about `bytes` (when it is learnt
    /// after the start, e.g. once a remote manifest has arrived).
    fn total(&self, _bytes: u64) {}
    /// During a stash: these new chunks are now durable in the store (one
    /// call per pack, on the stash's thread), so they may be read back, e.g.
    /// to upload them to a server before the stash ends.
    fn stored(&self, _new: &[ChunkId]) {}
    /// Whether a stash should call [`Progress::compressed`].
    fn wants_compressed(&self) -> bool {
        false
    }
    /// During a stash, if [`Progress::wants_compressed`]: new chunks, just
    /// compressed, on their way into a pack (on the stash's thread). Not
    /// durable yet, so not to be read back from the store; their bytes are
    /// shared with the pack writer, not copied, and whoever keeps them
    /// keeps that memory.
    fn compressed(&self, _new: &[StoredChunk]) {}
}

/// Where a [`StashReader`] gets chunks it does not take from the store's
/// packs: e.g. chunks arriving from a server while the restore runs.
/// Called from several threads at once.
pub trait ChunkSource: Send + Sync {
    /// The reader will soon read these chunks, in about this order.
    fn want(&self, _chunks: &[ChunkRef]) {}
    /// Puts the raw bytes of `chunk`, already checked against its id, into
    /// `out` and returns true; or returns false when the store holds the
    /// chunk (the reader then reads and verifies it from its pack). May
    /// block until the chunk arrives.
    fn read(&self, chunk: &ChunkRef, out: &mut Vec<u8>) -> Result<bool, StoreError>;
}

/// Progress that is not reported.
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _bytes: u64) {}
}

/// What to stash.
pub enum Source {
    /// A byte stream, e.g. standard input (`docker save img | ferry stash x -`).
    Reader(Box<dyn Read + Send>),
    /// A file (a `docker save` archive, an OCI layout tar, or anything).
    File(PathBuf),
    /// A directory tree.
    Directory(PathBuf),
}

/// Where to unstash.
pub enum Target {
    /// A byte stream, e.g. standard output (`ferry unstash x - | docker load`).
    Writer(Box<dyn Write + Send>),
    /// A file, written to a temporary name and renamed when complete.
    File(PathBuf),
    /// A directory, for directory stashes.
    Directory(PathBuf),
}

/// What a stash stored.
#[derive(Debug, Clone, Serialize)]
pub struct StashReport {
    /// The name.
    pub name: String,
    /// The manifest it now points at.
    pub manifest: ManifestId,
    /// What was stashed.
    pub kind: StashKind,
    /// Bytes read.
    pub size: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// Chunks in the recipe.
    pub chunks: u64,
    /// Chunks that were new to the store.
    pub new_chunks: u64,
    /// Raw bytes of the new chunks.
    pub new_bytes: u64,
    /// Bytes written to packs for them (compressed).
    pub stored_bytes: u64,
    /// Chunks the store already had.
    pub reused_chunks: u64,
    /// Raw bytes of those.
    pub reused_bytes: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Input throughput, bytes per second.
    pub bytes_per_second: f64,
}

/// What an unstash wrote.
#[derive(Debug, Clone, Serialize)]
pub struct UnstashReport {
    /// The name.
    pub name: String,
    /// What it was.
    pub kind: StashKind,
    /// Bytes written (for directories: of the tar stream restored).
    pub size: u64,
    /// Chunks read.
    pub chunks: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Output throughput, bytes per second.
    pub bytes_per_second: f64,
}

impl UnstashReport {
    pub(crate) fn new(
        name: &str,
        kind: StashKind,
        size: u64,
        chunks: u64,
        started: Instant,
    ) -> UnstashReport {
        let seconds = started.elapsed().as_secs_f64();
        UnstashReport {
            name: name.to_string(),
            kind,
            size,
            chunks,
            seconds,
            bytes_per_second: size as f64 / seconds.max(1e-9),
        }
    }
}

/// Checks a file target of `name` (a `kind` stash): false for a device,
/// FIFO or socket, which is written into in order; true for a regular file
/// (refused unless `force`) or a path that does not exist yet.
pub(crate) fn check_file_target(
    name: &str,
    kind: StashKind,
    path: &Path,
    force: bool,
) -> Result<bool, StoreError> {
    if kind == StashKind::Directory {
        return Err(StoreError::WrongTarget {
            name: name.to_string(),
            kind: kind.as_str(),
            hint: "unstash it into a directory (a path that does not exist yet, or an empty directory)",
        });
    }
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(true);
    };
    if meta.is_dir() {
        return Err(StoreError::WrongTarget {
            name: name.to_string(),
            kind: kind.as_str(),
            hint: "the target is a directory: name a file in it, or - for standard output",
        });
    }
    if !meta.is_file() {
        return Ok(false);
    }
    if !force {
        return Err(StoreError::Exists {
            path: path.to_path_buf(),
        });
    }
    Ok(true)
}

/// One line of `ferry ls`.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The name.
    pub name: String,
    /// The manifest id.
    pub manifest: ManifestId,
    /// When the name was last stashed, seconds since the Unix epoch.
    pub created: u64,
    /// Kind, size and so on; `None` if the manifest is unreadable.
    pub header: Option<Header>,
}

/// `ferry inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The name.
    pub name: String,
    /// The manifest id.
    pub manifest: ManifestId,
    /// When the name was last stashed, seconds since the Unix epoch.
    pub created: u64,
    /// Kind, size, SHA-256, image metadata.
    #[serde(flatten)]
    pub header: Header,
    /// Chunks in the recipe (both streams).
    pub chunks: u64,
    /// Distinct chunks.
    pub unique_chunks: u64,
    /// Raw bytes of the distinct chunks.
    pub unique_bytes: u64,
    /// Stored (compressed) bytes of the distinct chunks.
    pub stored_bytes: u64,
    /// Bytes of tar structure (metadata stream).
    pub meta_bytes: u64,
    /// `size / stored_bytes`.
    pub dedup_ratio: f64,
}

/// `ferry du`.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Names.
    pub names: u64,
    /// Sum of the sizes of everything named (what restoring all would write).
    pub logical_bytes: u64,
    /// Bytes in pack files.
    pub pack_bytes: u64,
    /// Bytes of manifests.
    pub manifest_bytes: u64,
    /// Pack files.
    pub packs: u64,
    /// Chunks in the index.
    pub chunks: u64,
    /// Raw bytes of the chunks still named by some manifest.
    pub referenced_raw_bytes: u64,
    /// Stored bytes of chunks no name refers to (what `gc` could free).
    pub unreferenced_stored_bytes: u64,
    /// `logical_bytes / (pack_bytes + manifest_bytes)`.
    pub dedup_ratio: f64,
}

/// One problem `ferry fsck` found.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// What is affected (a file, a name, a chunk).
    pub subject: String,
    /// What is wrong.
    pub problem: String,
}

/// `ferry fsck`.
#[derive(Debug, Clone, Serialize)]
pub struct FsckReport {
    /// Whether every chunk was re-read and re-hashed.
    pub full: bool,
    /// Packs checked.
    pub packs: u64,
    /// Chunks checked (by index, or re-hashed with `full`).
    pub chunks: u64,
    /// Names checked.
    pub names: u64,
    /// Everything found wrong; empty for a healthy store.
    pub problems: Vec<Problem>,
    /// Leftovers of interrupted commands that gc will remove (not damage).
    pub notes: Vec<Problem>,
}

/// A content-addressed store in a directory.
pub struct Store {
    root: PathBuf,
    backend: Arc<dyn Backend>,
    /// Loaded on first use: the collector never needs it (it reads pack
    /// indexes one at a time), and it is the largest thing in memory.
    index: std::sync::OnceLock<Arc<RwLock<Index>>>,
    /// Packs the collector condemned: their chunks count as missing for
    /// writers (see `gc`). Re-read after a writer takes its lease.
    pub(crate) condemned: RwLock<HashSet<PackId>>,
    opts: StoreOptions,
    chunker: Chunker,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `root` with default options.
    pub fn open(root: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_with(root, StoreOptions::default())
    }

    /// Opens the store in `root` with `opts`.
    pub fn open_with(root: impl AsRef<Path>, opts: StoreOptions) -> Result<Store, StoreError> {
        let root = root.as_ref().to_path_buf();
        let mut backend = LocalDir::open(&root).map_err(|source| StoreError::Open {
            path: root.clone(),
            error: source,
        })?;
        backend.set_direct_writes(opts.direct_writes);
        let backend: Arc<dyn Backend> = Arc::new(backend);
        let condemned = crate::gc::condemned_packs(backend.as_ref())?;
        let chunker = Chunker::new(opts.chunker)?;
        Ok(Store {
            root,
            backend,
            index: std::sync::OnceLock::new(),
            condemned: RwLock::new(condemned),
            opts,
            chunker,
        })
    }

    /// The merged index, loaded on first use.
    pub(crate) fn index(&self) -> Result<&Arc<RwLock<Index>>, StoreError> {
        if let Some(i) = self.index.get() {
            return Ok(i);
        }
        let (index, _problems) = Index::load(self.backend.as_ref())?;
        Ok(self.index.get_or_init(|| Arc::new(RwLock::new(index))))
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes that can still be written to the store's disk, if its backend
    /// knows.
    pub fn available_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.backend.available_bytes()?)
    }

    /// The storage backend (for tools that work below the store).
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The storage backend, shared.
    pub fn backend_arc(&self) -> Arc<dyn Backend> {
        Arc::clone(&self.backend)
    }

    /// Stashes `source` under `name`, replacing what the name pointed at.
    pub fn stash(
        &self,
        name: &Name,
        source: Source,
        progress: &dyn Progress,
    ) -> Result<StashReport, StoreError> {
        let started = Instant::now();
        let _lease = self.lease("stash")?;
        let (reader, what, kind_hint, source_name, dir_thread): (
            Box<dyn Read + Send>,
            String,
            StashKind,
            _,
            _,
        ) = match source {
            Source::Reader(r) => (
                r,
                "standard input".to_string(),
                StashKind::Stream,
                None,
                None,
            ),
            Source::File(path) => {
                let file = File::open(&path).map_err(input_err(&path.display().to_string()))?;
                let meta = file
                    .metadata()
                    .map_err(input_err(&path.display().to_string()))?;
                if meta.is_dir() {
                    return self.stash(name, Source::Directory(path), progress);
                }
                let source_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                (
                    Box::new(file),
                    path.display().to_string(),
                    StashKind::File,
                    source_name,
                    None,
                )
            }
            Source::Directory(path) => {
                let (pipe_reader, mut pipe_writer) = io::pipe().map_err(input_err("a pipe"))?;
                let root = path.clone();
                let thread =
                    std::thread::spawn(move || dirtar::write_dir_tar(&root, &mut pipe_writer));
                let source_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                (
                    Box::new(pipe_reader),
                    path.display().to_string(),
                    StashKind::Directory,
                    source_name,
                    Some(thread),
                )
            }
        };

        let mut writer = ChunkWriter::new(self, progress.wants_compressed())?;
        let (size, sha256, collected, layout) = {
            let mut splitter = TarSplitter::new();
            let mut meta = StreamChunker::new(self.chunker, 4 << 20);
            let mut content = StreamChunker::new(self.chunker, StreamChunker::DEFAULT_CAPACITY);
            let mut layout = Layout::new();
            let mut failed: Option<StoreError> = None;
            let mut route = |part: Part,
                             bytes: &[u8],
                             writer: &mut ChunkWriter<'_>,
                             failed: &mut Option<StoreError>| {
                if failed.is_some() || bytes.is_empty() {
                    return;
                }
                layout.push(part, bytes.len() as u64);
                let (chunker, list) = match part {
                    Part::Meta => (&mut meta, Part::Meta),
                    Part::Content => (&mut content, Part::Content),
                };
                if let Err(e) = chunker.push(bytes, &mut |b: Batch<'_>| writer.add_batch(&b, list))
                {
                    *failed = Some(e);
                }
            };
            let read = read_blocks(reader, progress, |block| {
                splitter.feed(block, &mut |part, bytes| {
                    route(part, bytes, &mut writer, &mut failed)
                });
                writer.report_stored(progress);
                match failed.take() {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            });
            let (size, sha256) = match read {
                Ok(r) => r,
                Err(e) => {
                    if let Some(t) = dir_thread {
                        // The archiver's own error says more than the broken pipe.
                        if let Ok(Err(dir_err)) = t.join() {
                            return Err(dir_err.into());
                        }
                    }
                    return Err(e.with_input(&what));
                }
            };
            splitter.finish(&mut |part, bytes| route(part, bytes, &mut writer, &mut failed));
            if let Some(e) = failed.take() {
                return Err(e);
            }
            meta.finish(&mut |b: Batch<'_>| writer.add_batch(&b, Part::Meta))?;
            content.finish(&mut |b: Batch<'_>| writer.add_batch(&b, Part::Content))?;
            (size, sha256, splitter.into_collected(), layout)
        };
        if let Some(t) = dir_thread {
            t.join().map_err(|_| StoreError::Input {
                what: what.clone(),
                error: io::Error::other("the directory archiver panicked"),
            })??;
        }

        let image = image::detect(&collected);
        let kind = match (&image, kind_hint) {
            (_, StashKind::Directory) => StashKind::Directory,
            (Some(info), _) => match info.kind {
                ImageKind::DockerArchive => StashKind::DockerArchive,
                ImageKind::DockerOciArchive => StashKind::DockerOciArchive,
                ImageKind::OciLayout => StashKind::OciLayout,
            },
            (None, hint) if collected.is_tar && size > 0 => {
                let _ = hint;
                StashKind::Tar
            }
            (None, hint) => hint,
        };
        let stats = writer.finish(progress)?;
        let manifest = Manifest {
            header: Header {
                kind,
                size,
                sha256: sha256.clone(),
                source: source_name,
                image,
            },
            meta: stats.meta,
            content: stats.content,
            layout,
        };
        let encoded = manifest.encode();
        let id = ManifestId::of(&encoded);
        // Packs are durable (PackWriter::finish); now the manifest, then the name.
        self.backend.put(Kind::Manifest, &id.to_hex(), &encoded)?;
        refs::set(self.backend.as_ref(), name, &id)?;
        crate::cache::touch(self, name);
        let seconds = started.elapsed().as_secs_f64();
        Ok(StashReport {
            name: name.to_string(),
            manifest: id,
            kind,
            size,
            sha256,
            chunks: (manifest.meta.len() + manifest.content.len()) as u64,
            new_chunks: stats.new_chunks,
            new_bytes: stats.new_bytes,
            stored_bytes: stats.stored_bytes,
            reused_chunks: stats.reused_chunks,
            reused_bytes: stats.reused_bytes,
            seconds,
            bytes_per_second: size as f64 / seconds.max(1e-9),
        })
    }

    /// Takes a lease for `purpose` and re-reads the condemned packs, in that
    /// order: from now on the collector will not delete a pack this
    /// operation may decide to use.
    pub(crate) fn lease(&self, purpose: &str) -> Result<Option<Lease>, StoreError> {
        // A read-only store cannot be collected either: readers need no lease.
        let lease = match Lease::acquire(Arc::clone(&self.backend), purpose) {
            Ok(l) => Some(l),
            Err(_) if self.backend.read_only() && matches!(purpose, "unstash" | "fsck") => None,
            // A full disk must not stop reads: restoring or checking is
            // what one does before freeing space. (Nothing can collect on
            // a full disk either, gc needs to write its marks first: the
            // server keeps a reserve for it.)
            Err(e) if e.is_storage_full() && matches!(purpose, "unstash" | "fsck") => None,
            Err(e) => return Err(e.into()),
        };
        *self.condemned.write().expect("condemned lock") =
            crate::gc::condemned_packs(self.backend.as_ref())?;
        self.index()?
            .write()
            .expect("index lock")
            .sync(self.backend.as_ref())?;
        Ok(lease)
    }

    /// Whether a writer may reuse the stored copy of `id` (held, and not only
    /// in a condemned pack).
    pub(crate) fn holds(&self, index: &Index, condemned: &HashSet<PackId>, id: &ChunkId) -> bool {
        index
            .get(id)
            .is_some_and(|loc| !condemned.contains(&loc.pack))
    }

    /// Runs retention and garbage collection (see [`crate::gc`]).
    pub fn gc(&self, opts: &crate::gc::GcOptions) -> Result<crate::gc::GcReport, StoreError> {
        crate::gc::collect(self, opts)
    }

    /// Re-reads the collector's marks and brings the chunk index up to date
    /// with the packs on disk. Writers do this when they take their lease;
    /// a long-lived reader of the store (a server) calls it after a
    /// collection, so that no chunk keeps pointing at a pack it deleted.
    /// Does nothing to the index if it was never loaded.
    pub fn refresh(&self) -> Result<(), StoreError> {
        *self.condemned.write().expect("condemned lock") =
            crate::gc::condemned_packs(self.backend.as_ref())?;
        if let Some(index) = self.index.get() {
            index
                .write()
                .expect("index lock")
                .sync(self.backend.as_ref())?;
        }
        Ok(())
    }

    /// Of `ids`, those the store does not hold (in the order given, each once).
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let index = self.index()?.read().expect("index lock");
        let condemned = self.condemned.read().expect("condemned lock");
        let mut seen = HashSet::new();
        Ok(ids
            .iter()
            .filter(|id| !self.holds(&index, &condemned, id) && seen.insert(**id))
            .copied()
            .collect())
    }

    /// A chunk as stored (compressed or raw), for sending to another store.
    /// The bytes are not verified here: the receiver verifies them.
    pub fn read_stored(&self, id: &ChunkId) -> Result<Option<StoredChunk>, StoreError> {
        // The first chunk found always fits, whatever the budget.
        Ok(self
            .read_stored_within(std::slice::from_ref(id), 0, 0)?
            .chunks
            .pop())
    }

    /// Chunks as stored, for sending: those of `ids` this store holds, in
    /// the order given, as long as their stored sizes (each plus
    /// `overhead`) fit in `budget` bytes; the first chunk found always
    /// fits. Ids past the budget are in neither list: the caller asks for
    /// them again. Chunks that lie back to back in one pack are read with
    /// one read and share its buffer, so a batch of a stash's chunks (which
    /// packs keep in the order they were stored) costs a few reads, not
    /// one per chunk. The bytes are not verified here: the receiver does.
    pub fn read_stored_within(
        &self,
        ids: &[ChunkId],
        budget: usize,
        overhead: usize,
    ) -> Result<StoredBatch, StoreError> {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        {
            let index = self.index()?.read().expect("index lock");
            let mut used = 0usize;
            for id in ids {
                let Some(loc) = index.get(id) else {
                    missing.push(*id);
                    continue;
                };
                let cost = overhead.saturating_add(loc.stored_len as usize);
                if used.saturating_add(cost) > budget && !found.is_empty() {
                    break;
                }
                used = used.saturating_add(cost);
                found.push((*id, loc));
            }
        }
        let mut chunks = Vec::with_capacity(found.len());
        let mut rest = &found[..];
        while let Some((_, first)) = rest.first() {
            // The run: following chunks that start where the previous ends.
            let mut end = first.offset.saturating_add(first.stored_len as u64);
            let mut len = 1;
            while let Some((_, next)) = rest.get(len) {
                if next.pack != first.pack || next.offset != end {
                    break;
                }
                end = end.saturating_add(next.stored_len as u64);
                len += 1;
            }
            let run = bytes::Bytes::from(self.backend.get_range(
                Kind::Pack,
                &first.pack.to_hex(),
                first.offset,
                end - first.offset,
            )?);
            for (id, loc) in &rest[..len] {
                let at = (loc.offset - first.offset) as usize;
                chunks.push(StoredChunk {
                    id: *id,
                    codec: loc.codec,
                    raw_len: loc.raw_len,
                    bytes: run.slice(at..at + loc.stored_len as usize),
                });
            }
            rest = &rest[len..];
        }
        Ok(StoredBatch { chunks, missing })
    }

    /// Adds chunks received from elsewhere (a client's upload, a server's
    /// download into a node cache). Each is decoded and its BLAKE3 checked
    /// against its id before it counts: content addressing is what makes a
    /// shared store safe against poisoning. Chunks already held are skipped.
    /// Returns how many were new. The pack is durable when this returns.
    pub fn import_chunks(&self, chunks: &[StoredChunk]) -> Result<u64, StoreError> {
        chunks
            .par_iter()
            .try_for_each_init(Vec::new, |buf, c| verify_stored(c, buf))?;
        let mut importer = self.importer()?;
        for c in chunks {
            importer.append(c)?;
        }
        Ok(importer.finish()?.added)
    }

    /// The stored bytes of the manifest `name` points at, and its id.
    pub fn manifest_bytes(&self, name: &Name) -> Result<(ManifestId, Vec<u8>), StoreError> {
        let (id, _, bytes) = self.manifest_and_bytes(name)?;
        Ok((id, bytes))
    }

    /// The manifest `name` points at, its id and its stored bytes (to send
    /// elsewhere), decoded once.
    pub fn manifest_and_bytes(
        &self,
        name: &Name,
    ) -> Result<(ManifestId, Manifest, Vec<u8>), StoreError> {
        let id = refs::resolve(self.backend.as_ref(), name)?;
        let bytes = self.backend.get(Kind::Manifest, &id.to_hex())?;
        let manifest = self.decode_manifest(name.as_str(), &id, &bytes)?;
        Ok((id, manifest, bytes))
    }

    /// Points `name` at a manifest given as stored bytes (from another
    /// store), after checking that it decodes and that every chunk it names
    /// is held here: a commit never makes a name point at missing data.
    pub fn commit_manifest(&self, name: &Name, stored: &[u8]) -> Result<ManifestId, StoreError> {
        self.commit_manifest_keeping(name, stored, None)
    }

    /// [`Store::commit_manifest`] for a writer whose lease saw the packs
    /// `condemned_then` condemned: a chunk in a pack condemned since then
    /// also counts as held (see [`crate::import::Importer::commit`]). The
    /// caller must hold that lease until this returns.
    pub(crate) fn commit_manifest_keeping(
        &self,
        name: &Name,
        stored: &[u8],
        condemned_then: Option<&HashSet<PackId>>,
    ) -> Result<ManifestId, StoreError> {
        let _lease = self.lease("commit")?;
        let id = ManifestId::of(stored);
        let manifest = self.decode_manifest(name.as_str(), &id, stored)?;
        let ids: Vec<ChunkId> = manifest.chunks().map(|c| c.id).collect();
        let missing = self.missing(&ids)?;
        let first = match condemned_then {
            None => missing.first().copied(),
            Some(then) => {
                let index = self.index()?.read().expect("index lock");
                missing.into_iter().find(|c| !self.holds(&index, then, c))
            }
        };
        if let Some(chunk) = first {
            return Err(StoreError::MissingChunk {
                name: name.to_string(),
                chunk,
            });
        }
        self.backend.put(Kind::Manifest, &id.to_hex(), stored)?;
        refs::set(self.backend.as_ref(), name, &id)?;
        Ok(id)
    }

    /// The manifest `name` points at.
    pub fn manifest(&self, name: &Name) -> Result<(ManifestId, Manifest), StoreError> {
        let id = refs::resolve(self.backend.as_ref(), name)?;
        let bytes = self.backend.get(Kind::Manifest, &id.to_hex())?;
        let manifest = self.decode_manifest(name.as_str(), &id, &bytes)?;
        Ok((id, manifest))
    }

    fn decode_manifest(
        &self,
        name: &str,
        id: &ManifestId,
        bytes: &[u8],
    ) -> Result<Manifest, StoreError> {
        let err = |source| StoreError::Manifest {
            name: name.to_string(),
            id: *id,
            problem: source,
        };
        if ManifestId::of(bytes) != *id {
            return Err(err(ManifestError::new("its bytes do not match its id")));
        }
        Manifest::decode(bytes).map_err(err)
    }

    /// A reader that replays the bytes stashed under `name`, verifying every
    /// chunk before handing out its bytes.
    pub fn open_stash(&self, name: &Name) -> Result<StashReader<'_>, StoreError> {
        let lease = self.lease("unstash")?;
        let (_, manifest) = self.manifest(name)?;
        let index = Arc::clone(self.index()?);
        Ok(StashReader::new(
            self,
            index,
            name.to_string(),
            manifest,
            lease,
            None,
        ))
    }

    /// A reader that replays `manifest` (e.g. one fetched from a server,
    /// named `label` in messages), taking chunks from `source` first and
    /// from this store's packs where `source` says the store holds them.
    /// Holds a lease, so the collector keeps what the reader may read.
    pub fn open_manifest(
        &self,
        label: &str,
        manifest: Manifest,
        source: Arc<dyn ChunkSource>,
    ) -> Result<StashReader<'_>, StoreError> {
        let lease = self.lease("unstash")?;
        let index = Arc::clone(self.index()?);
        Ok(StashReader::new(
            self,
            index,
            label.to_string(),
            manifest,
            lease,
            Some(source),
        ))
    }

    /// Restores `name` into `target`. Files are written under a temporary
    /// name and renamed when complete; existing targets are refused unless
    /// `force`.
    pub fn unstash(
        &self,
        name: &Name,
        target: Target,
        force: bool,
        progress: &dyn Progress,
    ) -> Result<UnstashReport, StoreError> {
        let reader = self.open_stash(name)?;
        crate::cache::touch(self, name);
        self.restore(reader, target, force, progress)
    }

    /// Writes what `reader` replays into `target`, as [`Store::unstash`]
    /// does: files and new directories appear complete or not at all.
    pub fn restore(
        &self,
        mut reader: StashReader<'_>,
        target: Target,
        force: bool,
        progress: &dyn Progress,
    ) -> Result<UnstashReport, StoreError> {
        let started = Instant::now();
        let name = &reader.name.clone();
        let kind = reader.manifest.header.kind;
        let size = reader.manifest.header.size;
        progress.total(size);
        let chunks = reader.manifest.chunks().count() as u64;
        match target {
            Target::Writer(mut w) => {
                reader.copy_to(&mut w, progress)?;
                w.flush().map_err(output_err("the output"))?;
            }
            Target::File(path) => {
                if !check_file_target(name, kind, &path, force)? {
                    // A device, FIFO or socket (/dev/stdout, a named pipe): write
                    // into it; renaming over it would replace the node itself.
                    let shown = path.display().to_string();
                    let mut out = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(output_err(&shown))?;
                    let mut w = io::BufWriter::with_capacity(OUTPUT_BUFFER, &mut out);
                    reader.copy_to(&mut w, progress)?;
                    w.flush().map_err(output_err(&shown))?;
                    drop(w);
                    return Ok(UnstashReport::new(name, kind, size, chunks, started));
                }
                let shown = path.display().to_string();
                let mut tmp = ScratchFile::for_target(&path).map_err(output_err(&shown))?;
                // Not fsynced: a restore is scratch data for the job at hand,
                // and the rename already keeps a partial file from its name.
                let mut file = io::BufWriter::with_capacity(OUTPUT_BUFFER, tmp.as_file_mut());
                reader.copy_to(&mut file, progress)?;
                file.flush().map_err(output_err(&shown))?;
                drop(file);
                tmp.persist(&path).map_err(output_err(&shown))?;
            }
            Target::Directory(path) => {
                if kind != StashKind::Directory {
                    return Err(StoreError::WrongTarget {
                        name: name.to_string(),
                        kind: kind.as_str(),
                        hint: "unstash it to a file or to - (standard output)",
                    });
                }
                let exists = path.exists();
                let non_empty = exists
                    && std::fs::read_dir(&path)
                        .map_err(output_err(&path.display().to_string()))?
                        .next()
                        .is_some();
                if non_empty && !force {
                    return Err(StoreError::Exists { path });
                }
                if exists {
                    // --force into a directory that holds an earlier restore:
                    // the stash's files replace what is in their way.
                    dirtar::extract_tar_over(
                        &mut ProgressReader {
                            inner: reader,
                            progress,
                        },
                        &path,
                        force,
                    )?;
                } else {
                    // Restore next to the target, then rename: all or nothing.
                    let staging = ScratchDir::in_dir(&parent_dir(&path))
                        .map_err(output_err(&path.display().to_string()))?;
                    dirtar::extract_tar(
                        &mut ProgressReader {
                            inner: reader,
                            progress,
                        },
                        staging.path(),
                    )?;
                    std::fs::rename(staging.path(), &path)
                        .map_err(output_err(&path.display().to_string()))?;
                    staging.keep();
                }
            }
        }
        Ok(UnstashReport::new(name, kind, size, chunks, started))
    }

    /// Names, optionally under `prefix`, with their manifest headers.
    /// A name whose ref is damaged is left out (`ferry fsck` names it).
    pub fn list(&self, prefix: Option<&str>) -> Result<Vec<Entry>, StoreError> {
        self.list_where(prefix, |_| true)
    }

    /// [`Store::list`] of the names `keep` accepts (a server's read scope):
    /// the manifests of the others are not even read.
    pub fn list_where(
        &self,
        prefix: Option<&str>,
        keep: impl Fn(&Name) -> bool,
    ) -> Result<Vec<Entry>, StoreError> {
        let (names, _damaged) = refs::list_lenient(self.backend.as_ref(), prefix)?;
        Ok(names
            .into_iter()
            .filter(|(name, _)| keep(name))
            .map(|(name, manifest)| {
                // Only the header: a listing costs the same however many
                // chunks the stashes have.
                let header = self
                    .backend
                    .get(Kind::Manifest, &manifest.to_hex())
                    .ok()
                    .filter(|b| ManifestId::of(b) == manifest)
                    .and_then(|b| Manifest::decode_header(&b).ok());
                Entry {
                    created: self.created(&name),
                    name: name.to_string(),
                    manifest,
                    header,
                }
            })
            .collect())
    }

    /// When `name` was last set (stashed or committed), seconds since the
    /// epoch; 0 if unknown. Kept by the ref, not the manifest, so that
    /// identical content stashed again shares its manifest.
    fn created(&self, name: &Name) -> u64 {
        self.backend
            .ref_modified_ms(name)
            .ok()
            .flatten()
            .unwrap_or(0)
            / 1000
    }

    /// Whether `name` exists.
    /// Whether `name` exists (a name whose ref is damaged exists too).
    pub fn contains(&self, name: &Name) -> Result<bool, StoreError> {
        Ok(self.backend.read_ref(name)?.is_some())
    }

    /// Rebuilds missing or unreadable pack indexes from the packs' own
    /// footers (`ferry fsck --repair`). Returns the packs repaired.
    pub fn repair_indexes(&self) -> Result<Vec<PackId>, StoreError> {
        let (_, problems) = Index::load(self.backend.as_ref())?;
        let mut repaired = Vec::new();
        for p in problems {
            if let IndexProblem::MissingIndex { pack, .. }
            | IndexProblem::CorruptIndex { pack, .. } = p
            {
                if let Ok(id) = pack.parse::<PackId>() {
                    if pack::rebuild_idx(self.backend.as_ref(), &id).is_ok() {
                        repaired.push(id);
                    }
                }
            }
        }
        if !repaired.is_empty() {
            self.index()?
                .write()
                .expect("index lock")
                .sync(self.backend.as_ref())?;
        }
        Ok(repaired)
    }

    /// Details of one stash.
    pub fn inspect(&self, name: &Name) -> Result<Inspection, StoreError> {
        let (id, m) = self.manifest(name)?;
        let index = self.index()?.read().expect("index lock");
        let mut seen = HashSet::new();
        let (mut unique_bytes, mut stored_bytes) = (0u64, 0u64);
        for c in m.chunks() {
            if seen.insert(c.id) {
                unique_bytes += c.len as u64;
                stored_bytes += index.get(&c.id).map_or(0, |l| l.stored_len as u64);
            }
        }
        Ok(Inspection {
            created: self.created(name),
            name: name.to_string(),
            manifest: id,
            chunks: m.chunks().count() as u64,
            unique_chunks: seen.len() as u64,
            unique_bytes,
            stored_bytes,
            meta_bytes: m.meta.iter().map(|c| c.len as u64).sum(),
            dedup_ratio: m.header.size as f64 / stored_bytes.max(1) as f64,
            header: m.header,
        })
    }

    /// Removes a name; returns whether it existed. The data stays until
    /// garbage collection.
    pub fn remove(&self, name: &Name) -> Result<bool, StoreError> {
        Ok(refs::remove(self.backend.as_ref(), name)?)
    }

    /// Logical versus stored size.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let (names, _damaged) = refs::list_lenient(self.backend.as_ref(), None)?;
        let mut logical = 0u64;
        let mut live = HashSet::new();
        let mut manifest_bytes = 0u64;
        for (name, id) in &names {
            let bytes = self.backend.get(Kind::Manifest, &id.to_hex())?;
            manifest_bytes += bytes.len() as u64;
            let m = self.decode_manifest(name.as_str(), id, &bytes)?;
            logical += m.header.size;
            live.extend(m.chunks().map(|c| c.id));
        }
        let packs = self.backend.list(Kind::Pack)?;
        let mut pack_bytes = 0;
        for p in &packs {
            pack_bytes += self.backend.size(Kind::Pack, p)?;
        }
        let index = self.index()?.read().expect("index lock");
        let (mut referenced, mut unreferenced) = (0u64, 0u64);
        for (id, loc) in index.iter() {
            if live.contains(&id) {
                referenced += loc.raw_len as u64;
            } else {
                unreferenced += loc.stored_len as u64;
            }
        }
        Ok(Usage {
            names: names.len() as u64,
            logical_bytes: logical,
            pack_bytes,
            manifest_bytes,
            packs: packs.len() as u64,
            chunks: index.len() as u64,
            referenced_raw_bytes: referenced,
            unreferenced_stored_bytes: unreferenced,
            dedup_ratio: logical as f64 / (pack_bytes + manifest_bytes).max(1) as f64,
        })
    }

    /// Checks the store: every index against its pack, every name's
    /// manifest and the presence of its chunks; with `full`, re-reads and
    /// re-hashes every chunk.
    pub fn fsck(&self, full: bool, progress: &dyn Progress) -> Result<FsckReport, StoreError> {
        let _lease = self.lease("fsck")?;
        // Check what is on disk now, not what this handle loaded at open.
        let (fresh, index_problems) = Index::load(self.backend.as_ref())?;
        *self.index()?.write().expect("index lock") = fresh;
        // A pack without its index, or an index without its pack, is what a
        // stash or gc killed at the wrong moment leaves: garbage for gc, not
        // damage. If a name needed its chunks, the name check below says so.
        let (orphans, damage): (Vec<&IndexProblem>, Vec<&IndexProblem>) =
            index_problems.iter().partition(|p| {
                matches!(
                    p,
                    IndexProblem::MissingIndex { .. } | IndexProblem::MissingPack { .. }
                )
            });
        let notes: Vec<Problem> = orphans
            .iter()
            .map(|p| Problem {
                subject: "garbage".into(),
                problem: format!("{p} (gc removes it)"),
            })
            .collect();
        let mut problems: Vec<Problem> = damage
            .iter()
            .map(|p| Problem {
                subject: "index".into(),
                problem: p.to_string(),
            })
            .collect();
        let backend = self.backend.as_ref();
        let index = self.index()?.read().expect("index lock");
        let packs: Vec<_> = index.packs().copied().collect();
        let mut chunks = 0u64;
        // What is damaged, to name the stashes that lose data by it.
        let mut damaged_packs: HashSet<PackId> = HashSet::new();
        // A chunk is damaged only in that pack: the index may use a good copy.
        let mut damaged_chunks: HashSet<(ChunkId, PackId)> = HashSet::new();
        for p in &packs {
            if let Err(e) = pack::verify_pack(backend, p) {
                problems.push(Problem {
                    subject: backend.location(Kind::Pack, &p.to_hex()),
                    problem: e.to_string(),
                });
                damaged_packs.insert(*p);
                continue;
            }
            if full {
                let idx = pack::verify_pack(backend, p)?;
                match pack::verify_chunks(backend, &idx) {
                    Ok(bad) => {
                        chunks += idx.entries.len() as u64;
                        for b in bad {
                            damaged_chunks.insert((b.id, *p));
                            problems.push(Problem {
                                subject: backend.location(Kind::Pack, &p.to_hex()),
                                problem: format!(
                                    "chunk {} at offset {}: {}",
                                    b.id, b.offset, b.problem
                                ),
                            });
                        }
                    }
                    Err(e) => {
                        damaged_packs.insert(*p);
                        problems.push(Problem {
                            subject: backend.location(Kind::Pack, &p.to_hex()),
                            problem: e.to_string(),
                        })
                    }
                }
                progress.advance(backend.size(Kind::Pack, &p.to_hex()).unwrap_or(0));
            }
        }
        if !full {
            chunks = index.len() as u64;
        }
        let names = match refs::list_lenient(backend, None) {
            Ok((names, damaged)) => {
                // Each damaged ref is a problem; the other names are
                // still checked.
                for e in damaged {
                    let subject = match &e {
                        RefError::Corrupt { name, .. } => format!("name {:?}", name.as_str()),
                        _ => "refs".into(),
                    };
                    problems.push(Problem {
                        subject,
                        problem: e.to_string(),
                    });
                }
                names
            }
            Err(e) => {
                problems.push(Problem {
                    subject: "refs".into(),
                    problem: e.to_string(),
                });
                Vec::new()
            }
        };
        for (name, id) in &names {
            let subject = format!("name {:?}", name.as_str());
            let bytes = match backend.get(Kind::Manifest, &id.to_hex()) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(Problem {
                        subject,
                        problem: format!("manifest {id}: {e}"),
                    });
                    continue;
                }
            };
            match self.decode_manifest(name.as_str(), id, &bytes) {
                Err(e) => problems.push(Problem {
                    subject,
                    problem: e.to_string(),
                }),
                Ok(m) => {
                    let missing: Vec<_> = m.chunks().filter(|c| !index.contains(&c.id)).collect();
                    if let Some(first) = missing.first() {
                        problems.push(Problem {
                            subject: subject.clone(),
                            problem: format!(
                                "{} chunk(s) missing from the store, first {}",
                                missing.len(),
                                first.id
                            ),
                        });
                    }
                    let mut seen = HashSet::new();
                    let hit: Vec<(ChunkId, PackId)> = m
                        .chunks()
                        .filter_map(|c| Some((c.id, index.get(&c.id)?.pack)))
                        .filter(|(id, pack)| {
                            (damaged_packs.contains(pack) || damaged_chunks.contains(&(*id, *pack)))
                                && seen.insert(*id)
                        })
                        .collect();
                    if let Some((first, pack)) = hit.first() {
                        problems.push(Problem {
                            subject,
                            problem: format!(
                                "{} of its chunks are damaged (first {first}, in {}): \
                                 unstashing it fails; remove it (ferry rm) and let ferry gc \
                                 delete the damaged pack, then stash it again or unstash it \
                                 from a server that holds it",
                                hit.len(),
                                backend.location(Kind::Pack, &pack.to_hex())
                            ),
                        });
                    }
                }
            }
        }
        Ok(FsckReport {
            full,
            packs: packs.len() as u64,
            chunks,
            names: names.len() as u64,
            problems,
            notes,
        })
    }
}

impl StoreError {
    /// Whether the store's disk (or its owner's quota) is full.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Backend(error) | StoreError::Open { error, .. } => error.is_storage_full(),
            StoreError::Output { error, .. } => crate::backend::is_storage_full(error),
            _ => false,
        }
    }

    fn with_input(self, what: &str) -> StoreError {
        match self {
            StoreError::Input { error: source, .. } => StoreError::Input {
                what: what.to_string(),
                error: source,
            },
            other => other,
        }
    }
}

/// What [`Store::read_stored_within`] read.
#[derive(Debug)]
pub struct StoredBatch {
    /// The chunks found, in the order asked.
    pub chunks: Vec<StoredChunk>,
    /// The ids asked for that this store does not hold.
    pub missing: Vec<ChunkId>,
}

/// A chunk as a store keeps it: what travels between stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    /// Its id (BLAKE3 of the raw bytes).
    pub id: ChunkId,
    /// How `bytes` are encoded.
    pub codec: Codec,
    /// Length of the raw chunk.
    pub raw_len: u32,
    /// The stored bytes: shared, so that a chunk received in a frame or
    /// read from a pack moves between stores and connections uncopied.
    pub bytes: bytes::Bytes,
}

/// Largest chunk accepted from elsewhere (the chunker's maximum maximum).
pub const MAX_CHUNK: u32 = 16 << 20;

/// Checks that a received chunk decodes to bytes whose BLAKE3 is its id.
pub fn verify_stored(c: &StoredChunk, buf: &mut Vec<u8>) -> Result<(), StoreError> {
    let corrupt = |detail: String| StoreError::CorruptChunk {
        name: "(received)".into(),
        chunk: c.id,
        detail,
    };
    if c.raw_len == 0 || c.raw_len > MAX_CHUNK {
        return Err(corrupt(format!("raw length {} is out of range", c.raw_len)));
    }
    compress::decompress_into(c.codec, &c.bytes, c.raw_len as usize, buf)
        .map_err(|e| corrupt(e.to_string()))?;
    if ChunkId::of(buf) != c.id {
        return Err(corrupt("its bytes hash to a different id".into()));
    }
    Ok(())
}

/// Reads and verifies one chunk.
pub(crate) fn read_chunk(
    backend: &dyn Backend,
    name: &str,
    chunk: &ChunkRef,
    loc: Option<Location>,
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let loc = loc.ok_or_else(|| StoreError::MissingChunk {
        name: name.to_string(),
        chunk: chunk.id,
    })?;
    let corrupt = |detail: String| StoreError::CorruptChunk {
        name: name.to_string(),
        chunk: chunk.id,
        detail,
    };
    if loc.raw_len != chunk.len {
        return Err(corrupt(format!(
            "the index says {} bytes, the manifest {}",
            loc.raw_len, chunk.len
        )));
    }
    let pack = loc.pack.to_hex();
    let stored = backend
        .get_range(Kind::Pack, &pack, loc.offset, loc.stored_len as u64)
        .map_err(|e| corrupt(e.to_string()))?;
    if loc.codec == Codec::Raw {
        // Stored as is: the read buffer is the chunk, no copy.
        *out = stored;
    } else {
        compress::decompress_into(loc.codec, &stored, loc.raw_len as usize, out)
            .map_err(|e| corrupt(format!("pack {pack} at offset {}: {e}", loc.offset)))?;
    }
    if out.len() != loc.raw_len as usize {
        return Err(corrupt(format!(
            "pack {pack} at offset {}: wrong length",
            loc.offset
        )));
    }
    if ChunkId::of(out) != chunk.id {
        return Err(corrupt(format!(
            "pack {pack} at offset {}: its bytes hash to something else",
            loc.offset
        )));
    }
    Ok(())
}

/// Reads `reader` in large blocks on a separate thread (so reading, and
/// hashing the whole stream with SHA-256, overlap the chunking) and hands
/// each block to `f`. Returns the length and the SHA-256.
fn read_blocks(
    mut reader: Box<dyn Read + Send>,
    progress: &dyn Progress,
    mut f: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<(u64, String), StoreError> {
    const BLOCK: usize = 4 << 20;
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(3);
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let thread = std::thread::spawn(move || -> (u64, String) {
        let mut sha = Sha256::new();
        let mut total = 0u64;
        loop {
            let mut buf = back_rx.try_recv().unwrap_or_else(|_| vec![0u8; BLOCK]);
            buf.resize(BLOCK, 0);
            let mut filled = 0;
            let result = loop {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == BLOCK {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = result {
                let _ = tx.send(Err(e));
                break;
            }
            buf.truncate(filled);
            sha.update(&buf);
            total += filled as u64;
            let last = filled < BLOCK;
            if !buf.is_empty() && tx.send(Ok(buf)).is_err() {
                break;
            }
            if last {
                break;
            }
        }
        (total, crate::id::to_hex(&sha.finalize()))
    });
    let mut outcome = Ok(());
    for block in rx {
        match block {
            Ok(buf) => {
                progress.advance(buf.len() as u64);
                if let Err(e) = f(&buf) {
                    outcome = Err(e);
                    break;
                }
                let _ = back_tx.send(buf);
            }
            Err(e) => {
                outcome = Err(StoreError::Input {
                    what: String::new(),
                    error: e,
                });
                break;
            }
        }
    }
    // Dropping the receiver (on error) stops the reader at its next send.
    let (total, sha) = thread.join().map_err(|_| StoreError::Input {
        what: String::new(),
        error: io::Error::other("the reader thread panicked"),
    })?;
    outcome.map(|()| (total, sha))
}

#[derive(Default)]
struct WriterStats {
    meta: Vec<ChunkRef>,
    content: Vec<ChunkRef>,
    new_chunks: u64,
    new_bytes: u64,
    stored_bytes: u64,
    reused_chunks: u64,
    reused_bytes: u64,
}

/// New chunks on their way to the packer: (id, raw bytes).
type PackJob = Vec<(ChunkId, Vec<u8>)>;

/// Compresses a job's chunks in parallel (on rayon's pool).
fn compress_job(job: &PackJob, level: i32) -> Vec<StoredChunk> {
    let compressed: Vec<(Codec, Vec<u8>)> = job
        .par_iter()
        .map_init(Vec::new, |buf, (_, raw)| {
            let codec = compress::compress(raw, level, buf);
            (codec, buf.clone())
        })
        .collect();
    job.iter()
        .zip(compressed)
        .map(|((id, raw), (codec, stored))| StoredChunk {
            id: *id,
            codec,
            raw_len: raw.len() as u32,
            bytes: stored.into(),
        })
        .collect()
}

/// Appends stored chunks to packs; makes each full pack durable and visible
/// in the index. During a stash it runs on a thread of its own, fed jobs as
/// they are compressed (`ChunkWriter`); imports use it inline.
pub(crate) struct Packer {
    backend: Arc<dyn Backend>,
    index: Arc<RwLock<Index>>,
    pack_size: u64,
    pack: Option<PackWriter>,
    /// Told the ids of each pack's chunks once the pack is durable.
    stored: Option<std::sync::mpsc::Sender<Vec<ChunkId>>>,
    new_chunks: u64,
    new_bytes: u64,
    stored_bytes: u64,
}

impl Packer {
    pub(crate) fn new(store: &Store) -> Result<Packer, StoreError> {
        Ok(Packer {
            backend: Arc::clone(&store.backend),
            index: Arc::clone(store.index()?),
            pack_size: store.opts.pack_size,
            pack: None,
            stored: None,
            new_chunks: 0,
            new_bytes: 0,
            stored_bytes: 0,
        })
    }

    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.pack.as_ref().is_some_and(|p| p.contains(id))
    }

    /// Appends compressed chunks in order.
    fn append_all(&mut self, chunks: &[StoredChunk]) -> Result<(), StoreError> {
        for c in chunks {
            self.append(c.id, c.codec, c.raw_len, &c.bytes)?;
        }
        Ok(())
    }

    /// Appends one chunk's stored bytes to the current pack.
    pub(crate) fn append(
        &mut self,
        id: ChunkId,
        codec: Codec,
        raw_len: u32,
        stored: &[u8],
    ) -> Result<(), StoreError> {
        if self.pack.is_none() {
            self.pack = Some(PackWriter::with_target_size(
                self.backend.as_ref(),
                self.pack_size,
            )?);
        }
        let pack = self.pack.as_mut().expect("set above");
        pack.add(id, codec, raw_len, stored)?;
        self.new_chunks += 1;
        self.new_bytes += raw_len as u64;
        self.stored_bytes += stored.len() as u64;
        if pack.is_full() {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether a pack is open (appended to and not yet flushed).
    pub(crate) fn is_open(&self) -> bool {
        self.pack.is_some()
    }

    /// Makes the current pack durable and visible in the index.
    pub(crate) fn flush(&mut self) -> Result<(), StoreError> {
        if let Some(pack) = self.pack.take() {
            if pack.is_empty() {
                return Ok(());
            }
            let (id, entries) = pack.finish(self.backend.as_ref())?;
            self.index
                .write()
                .expect("index lock")
                .insert_pack(id, &entries);
            if let Some(tx) = &self.stored {
                let _ = tx.send(entries.iter().map(|e| e.id).collect());
            }
        }
        Ok(())
    }
}

/// Deduplicates the chunks of one stash and sends the new ones to a
/// packer thread; records the recipe.
struct ChunkWriter<'a> {
    store: &'a Store,
    /// Sent to the packer, maybe not yet in the index.
    pending: HashSet<ChunkId>,
    stats: WriterStats,
    jobs: Option<std::sync::mpsc::SyncSender<PackJob>>,
    packer: Option<std::thread::JoinHandle<Result<Packer, StoreError>>>,
    /// Ids of the chunks of each pack the packer made durable.
    stored: std::sync::mpsc::Receiver<Vec<ChunkId>>,
    /// Each job's chunks once compressed (if the progress wants them).
    compressed: Option<std::sync::mpsc::Receiver<Vec<StoredChunk>>>,
}

impl<'a> ChunkWriter<'a> {
    fn new(store: &'a Store, wants_compressed: bool) -> Result<Self, StoreError> {
        // Two jobs (up to 32 MiB of new chunks) may wait: memory stays bounded.
        let (tx, rx) = std::sync::mpsc::sync_channel::<PackJob>(2);
        let (stored_tx, stored) = std::sync::mpsc::channel();
        let mut packer = Packer::new(store)?;
        packer.stored = Some(stored_tx);
        let (compressed_tx, compressed) = match wants_compressed {
            true => {
                let (tx, rx) = std::sync::mpsc::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let level = store.opts.level;
        let thread = std::thread::Builder::new()
            .name("ferry-packer".into())
            .spawn(move || {
                // This thread compresses each job while a second one
                // appends the job before it: the cores go on compressing
                // while a pack is written and made durable.
                let (appends, to_append) = std::sync::mpsc::sync_channel::<Vec<StoredChunk>>(1);
                let written = std::thread::scope(|s| {
                    let packer = &mut packer;
                    let appender = std::thread::Builder::new()
                        .name("ferry-append".into())
                        .spawn_scoped(s, move || -> Result<(), StoreError> {
                            for chunks in to_append {
                                packer.append_all(&chunks)?;
                            }
                            packer.flush()
                        })
                        .map_err(|e| StoreError::Output {
                            what: "a pack writer thread".into(),
                            error: e,
                        })?;
                    for job in rx {
                        let chunks = compress_job(&job, level);
                        drop(job); // not held while the appender is busy
                        if let Some(tx) = &compressed_tx {
                            let _ = tx.send(chunks.clone()); // shares the bytes
                        }
                        if appends.send(chunks).is_err() {
                            break; // the appender failed: its error says why
                        }
                    }
                    drop(appends);
                    appender.join().map_err(|_| StoreError::Output {
                        what: "the pack writer".into(),
                        error: io::Error::other("the pack writer thread panicked"),
                    })?
                });
                written.map(|()| packer)
            })
            .map_err(|e| StoreError::Output {
                what: "a packer thread".into(),
                error: e,
            })?;
        Ok(ChunkWriter {
            store,
            pending: HashSet::new(),
            stats: WriterStats::default(),
            jobs: Some(tx),
            packer: Some(thread),
            stored,
            compressed,
        })
    }

    /// Tells `progress` which new chunks were compressed and which became
    /// durable since the last call.
    fn report_stored(&self, progress: &dyn Progress) {
        if let Some(rx) = &self.compressed {
            while let Ok(chunks) = rx.try_recv() {
                progress.compressed(&chunks);
            }
        }
        while let Ok(ids) = self.stored.try_recv() {
            progress.stored(&ids);
        }
    }

    fn add_batch(&mut self, batch: &Batch<'_>, part: Part) -> Result<(), StoreError> {
        let mut job = Vec::new();
        {
            let index = self.store.index()?.read().expect("index lock");
            let condemned = self.store.condemned.read().expect("condemned lock");
            for c in batch.chunks {
                let known =
                    self.store.holds(&index, &condemned, &c.id) || self.pending.contains(&c.id);
                if known {
                    self.stats.reused_chunks += 1;
                    self.stats.reused_bytes += c.len as u64;
                } else {
                    self.pending.insert(c.id);
                    job.push((c.id, batch.bytes(c).to_vec()));
                }
                let r = ChunkRef {
                    id: c.id,
                    len: c.len,
                };
                match part {
                    Part::Meta => self.stats.meta.push(r),
                    Part::Content => self.stats.content.push(r),
                }
            }
        }
        if !job.is_empty() {
            let sent = self.jobs.as_ref().expect("open until finish").send(job);
            if sent.is_err() {
                // The packer stopped: its error says why.
                return Err(self.join().err().unwrap_or_else(|| StoreError::Output {
                    what: "the packer".into(),
                    error: io::Error::other("stopped early"),
                }));
            }
        }
        Ok(())
    }

    fn join(&mut self) -> Result<Packer, StoreError> {
        self.jobs = None;
        match self.packer.take() {
            Some(t) => t.join().map_err(|_| StoreError::Output {
                what: "the packer".into(),
                error: io::Error::other("the packer thread panicked"),
            })?,
            None => Err(StoreError::Output {
                what: "the packer".into(),
                error: io::Error::other("already finished"),
            }),
        }
    }

    /// Waits until every new chunk is in a durable pack.
    fn finish(mut self, progress: &dyn Progress) -> Result<WriterStats, StoreError> {
        let packer = self.join()?;
        self.report_stored(progress);
        let mut stats = std::mem::take(&mut self.stats);
        stats.new_chunks = packer.new_chunks;
        stats.new_bytes = packer.new_bytes;
        stats.stored_bytes = packer.stored_bytes;
        Ok(stats)
    }
}

impl Drop for ChunkWriter<'_> {
    fn drop(&mut self) {
        // On an error path: stop the packer and wait for it, so no thread
        // outlives the stash. What it had appended is flushed into a pack
        // that no name uses, for a later collection to take back.
        self.jobs = None;
        if let Some(t) = self.packer.take() {
            let _ = t.join();
        }
    }
}

/// Replays a stash's bytes: decodes chunks of each stream in parallel
/// batches, checks each against its id, and interleaves the streams as the
/// layout says.
pub struct StashReader<'a> {
    store: &'a Store,
    index: Arc<RwLock<Index>>,
    name: String,
    /// The manifest being replayed.
    pub manifest: Manifest,
    streams: [Cursor; 2],
    /// The run being written: its part, what is left of it, and where the
    /// next one starts.
    run: Part,
    run_left: u64,
    next_run: RunCursor,
    /// Chunks from elsewhere, consulted before the packs.
    source: Option<Arc<dyn ChunkSource>>,
    /// Decodes batches when a source may block: its waits must not hold
    /// the threads of rayon's global pool, which others in the process
    /// (a server verifying uploads, a packer compressing) need meanwhile.
    pool: Option<Arc<rayon::ThreadPool>>,
    /// Keeps the collector from deleting packs this reader may read.
    _lease: Option<Lease>,
}

/// Decoded batches awaited from the background.
type PendingBatch = std::sync::mpsc::Receiver<Result<Vec<Vec<u8>>, StoreError>>;

#[derive(Default)]
struct Cursor {
    next: usize,
    ready: VecDeque<Vec<u8>>,
    pos: usize,
    pending: Option<PendingBatch>,
}

/// Decode at most this many raw bytes per parallel batch.
const BATCH_BYTES: u64 = 16 << 20;

/// Buffer of an unstash's output: it gathers tar headers and small files;
/// any piece at least this long (most chunks: the chunker's minimum is
/// 16 KiB) is written straight from the decoded chunk, without a copy
/// into the buffer (with 64 KiB, chunks below that were copied: about 1.3 %
/// of a remote unstash's CPU).
const OUTPUT_BUFFER: usize = 8 << 10;

impl<'a> StashReader<'a> {
    fn new(
        store: &'a Store,
        index: Arc<RwLock<Index>>,
        name: String,
        manifest: Manifest,
        lease: Option<Lease>,
        source: Option<Arc<dyn ChunkSource>>,
    ) -> Self {
        let mut next_run = RunCursor::default();
        let (run, run_left) = manifest
            .layout
            .next_run(&mut next_run)
            .unwrap_or((Part::Meta, 0));
        // Without a pool of its own (it could not be built) the reader
        // still works, on the global pool.
        let pool = source.as_ref().and_then(|_| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .thread_name(|i| format!("ferry-restore-{i}"))
                .build()
                .ok()
                .map(Arc::new)
        });
        StashReader {
            store,
            index,
            name,
            manifest,
            streams: [Cursor::default(), Cursor::default()],
            run,
            run_left,
            next_run,
            source,
            pool,
            _lease: lease,
        }
    }

    fn list(&self, part: Part) -> &[ChunkRef] {
        match part {
            Part::Meta => &self.manifest.meta,
            Part::Content => &self.manifest.content,
        }
    }

    /// Starts decoding the next batch of `part`'s chunks in the background
    /// (on rayon's global pool, or the reader's own when its source may
    /// block), so that decoding overlaps writing.
    fn prefetch(&mut self, part: Part) {
        let k = part as usize;
        let list = self.list(part);
        let start = self.streams[k].next;
        let mut end = start;
        let mut bytes = 0u64;
        while end < list.len() && (end == start || bytes + list[end].len as u64 <= BATCH_BYTES) {
            bytes += list[end].len as u64;
            end += 1;
        }
        if end == start {
            return;
        }
        let jobs: Vec<ChunkRef> = list[start..end].to_vec();
        if let Some(source) = &self.source {
            source.want(&jobs);
        }
        let index = Arc::clone(&self.index);
        let source = self.source.clone();
        let backend = Arc::clone(&self.store.backend);
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let decode = move || {
            let decoded = jobs
                .par_iter()
                .map(|c| {
                    let mut out = Vec::new();
                    if let Some(source) = &source {
                        if source.read(c, &mut out)? {
                            return Ok(out);
                        }
                    }
                    // Looked up now, not when the batch was planned: a
                    // source's chunks become visible in the index as they
                    // are written to packs.
                    let loc = index.read().expect("index lock").get(&c.id);
                    read_chunk(backend.as_ref(), &name, c, loc, &mut out)?;
                    Ok(out)
                })
                .collect();
            let _ = tx.send(decoded);
        };
        // The batch's par_iter runs on the pool the job was spawned on.
        match &self.pool {
            Some(pool) => pool.spawn(decode),
            None => rayon::spawn(decode),
        }
        let cursor = &mut self.streams[k];
        cursor.pending = Some(rx);
        cursor.next = end;
    }

    /// Makes sure the cursor of `part` has bytes ready.
    fn fill(&mut self, part: Part) -> Result<(), StoreError> {
        let k = part as usize;
        if !self.streams[k].ready.is_empty() {
            return Ok(());
        }
        if self.streams[k].pending.is_none() {
            self.prefetch(part);
        }
        let Some(pending) = self.streams[k].pending.take() else {
            return Err(StoreError::CorruptChunk {
                name: self.name.clone(),
                chunk: ChunkId([0; 32]),
                detail: "the layout asks for more bytes than the recipe holds".into(),
            });
        };
        let decoded = pending.recv().map_err(|_| StoreError::Output {
            what: "the chunk decoder".into(),
            error: io::Error::other("a decoding task stopped without an answer"),
        })??;
        self.streams[k].ready.extend(decoded);
        self.prefetch(part);
        Ok(())
    }

    /// The next piece of the output: at most `max` bytes, from one chunk.
    fn next_piece(&mut self, max: usize) -> Result<Option<&[u8]>, StoreError> {
        while self.run_left == 0 {
            match self.manifest.layout.next_run(&mut self.next_run) {
                Some((part, len)) => (self.run, self.run_left) = (part, len),
                None => return Ok(None),
            }
        }
        let k = self.run as usize;
        let cursor = &mut self.streams[k];
        if cursor.ready.front().is_some_and(|c| cursor.pos == c.len()) {
            cursor.ready.pop_front();
            cursor.pos = 0;
        }
        self.fill(self.run)?;
        let run_left = usize::try_from(self.run_left).unwrap_or(usize::MAX);
        let cursor = &mut self.streams[k];
        let available = cursor.ready.front().expect("filled").len() - cursor.pos;
        let take = available.min(max).min(run_left);
        let start = cursor.pos;
        cursor.pos += take;
        self.run_left -= take as u64;
        Ok(Some(
            &self.streams[k].ready.front().expect("filled")[start..start + take],
        ))
    }

    /// Writes the whole stash to `w`.
    pub fn copy_to(
        &mut self,
        w: &mut dyn Write,
        progress: &dyn Progress,
    ) -> Result<u64, StoreError> {
        let mut total = 0u64;
        while let Some(piece) = self.next_piece(usize::MAX)? {
            w.write_all(piece).map_err(output_err("the output"))?;
            total += piece.len() as u64;
            progress.advance(piece.len() as u64);
        }
        Ok(total)
    }
}

impl Read for StashReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.next_piece(buf.len()) {
            Ok(Some(piece)) => {
                let n = piece.len();
                buf[..n].copy_from_slice(piece);
                Ok(n)
            }
            Ok(None) => Ok(0),
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

struct ProgressReader<'a, 'p> {
    inner: StashReader<'a>,
    progress: &'p dyn Progress,
}

impl Read for ProgressReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
#[path = "repo_tests.rs"]
mod tests;
