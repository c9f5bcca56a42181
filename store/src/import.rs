//! Adding chunks that come from another store (a client's upload, a
//! server's download into a node cache) to this one.
//!
//! A received chunk counts only once it is verified: [`StoredChunk::verify`]
//! decodes it and checks its BLAKE3 against its id, and only then gives a
//! [`VerifiedChunk`], the one thing an [`Importer`] accepts. So a chunk is
//! decoded once, by whoever verifies it (the restore that streams it, the
//! server that receives it), and never again on the way into a pack.

use crate::lease::Lease;
use crate::name::Name;
use crate::repo::{verify_stored, Packer, Store, StoreError, StoredChunk};
use crate::{ChunkId, ManifestId, PackId};
use std::collections::HashSet;
use std::ops::Deref;
use std::sync::Arc;

/// A received chunk whose bytes were checked against its id.
#[derive(Debug, Clone)]
pub struct VerifiedChunk(StoredChunk);

impl StoredChunk {
    /// Decodes the chunk into `raw` and checks that its BLAKE3 is its id.
    pub fn verify(self, raw: &mut Vec<u8>) -> Result<VerifiedChunk, StoreError> {
        verify_stored(&self, raw)?;
        Ok(VerifiedChunk(self))
    }
}

/// Verifies chunks in parallel; the first that does not verify is the
/// error (and none of them counts).
pub fn verify_all(chunks: Vec<StoredChunk>) -> Result<Vec<VerifiedChunk>, StoreError> {
    use rayon::prelude::*;
    chunks
        .into_par_iter()
        .map_init(Vec::new, |raw, c| c.verify(raw))
        .collect()
}

impl VerifiedChunk {
    /// Its id.
    pub fn id(&self) -> ChunkId {
        self.0.id
    }

    /// The chunk as stored.
    pub fn stored(&self) -> &StoredChunk {
        &self.0
    }
}

/// Appends verified chunks to packs of this store, skipping chunks it
/// holds. One importer writes full packs however many chunks arrive, and
/// holds one lease for its whole life, so the collector leaves its packs
/// alone until a manifest references them. `S` is how it holds the store:
/// borrowed ([`Store::importer`]) or shared ([`Importer::shared`], for an
/// importer that outlives a call, like a server connection's).
pub struct Importer<S: Deref<Target = Store>> {
    store: S,
    packer: Packer,
    /// Appended to the open pack, not yet durable.
    open: Vec<ChunkId>,
    added: u64,
    _lease: Option<Lease>,
    /// The packs condemned when the lease was taken. Packs condemned
    /// later stay usable for this importer's commit: the collector deletes
    /// none of them while the lease lives (see [`Importer::commit`]).
    condemned_at_start: HashSet<PackId>,
}

/// What an importer did, when it finished.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Chunks that were new to the store.
    pub added: u64,
    /// Chunks made durable by the final flush.
    pub durable: Vec<ChunkId>,
}

impl Store {
    /// An importer into this store.
    pub fn importer(&self) -> Result<Importer<&Store>, StoreError> {
        Importer::new(self)
    }
}

impl Importer<Arc<Store>> {
    /// An importer that shares ownership of the store.
    pub fn shared(store: Arc<Store>) -> Result<Self, StoreError> {
        Importer::new(store)
    }
}

impl<S: Deref<Target = Store>> Importer<S> {
    fn new(store: S) -> Result<Self, StoreError> {
        let lease = store.lease("import")?;
        // `lease` re-read the marks: this is the collector's view as of now.
        let condemned_at_start = store.condemned.read().expect("condemned lock").clone();
        let packer = Packer::new(&store)?;
        Ok(Importer {
            store,
            packer,
            open: Vec::new(),
            added: 0,
            _lease: lease,
            condemned_at_start,
        })
    }

    /// Makes every chunk added so far durable (the open pack is written
    /// and indexed); returns them. The importer can go on.
    pub fn flush(&mut self) -> Result<Vec<ChunkId>, StoreError> {
        self.packer.flush()?;
        Ok(std::mem::take(&mut self.open))
    }
    /// Adds `chunk` unless the store holds it. Returns the chunks that this
    /// call made durable and visible to readers (the open pack filled up and
    /// was written), `chunk` itself when it was held already.
    pub fn add(&mut self, chunk: &VerifiedChunk) -> Result<Vec<ChunkId>, StoreError> {
        self.append(&chunk.0)
    }

    /// As `add`, for a chunk the caller has verified.
    pub(crate) fn append(&mut self, c: &StoredChunk) -> Result<Vec<ChunkId>, StoreError> {
        let held = {
            let index = self.store.index()?.read().expect("index lock");
            let condemned = self.store.condemned.read().expect("condemned lock");
            self.store.holds(&index, &condemned, &c.id)
        };
        if held {
            return Ok(vec![c.id]);
        }
        if self.packer.contains(&c.id) {
            return Ok(Vec::new());
        }
        self.packer.append(c.id, c.codec, c.raw_len, &c.bytes)?;
        self.added += 1;
        self.open.push(c.id);
        if self.packer.is_open() {
            Ok(Vec::new())
        } else {
            Ok(std::mem::take(&mut self.open))
        }
    }

    /// Chunks added (new to the store) so far.
    pub fn added(&self) -> u64 {
        self.added
    }

    /// Makes everything added durable.
    pub fn finish(mut self) -> Result<ImportReport, StoreError> {
        let durable = self.flush()?;
        Ok(ImportReport {
            added: self.added,
            durable,
        })
    }

    /// Makes everything added durable, then points `name` at the manifest
    /// `stored` (as [`Store::commit_manifest`]), and only then lets go of
    /// the lease.
    ///
    /// A chunk counts as held if the store holds it now, or if it sits in a
    /// pack condemned after this importer took its lease: a collection that
    /// ran while chunks were being imported condemns the packs this
    /// importer already sealed (nothing names them yet), and no collector
    /// deletes such a pack while the lease lives; once `name` points at
    /// its chunks, the next collection takes the pack back. Without this, a
    /// long upload that met a scheduled collection would be refused at its
    /// commit and sent again.
    pub fn commit(
        mut self,
        name: &Name,
        stored: &[u8],
    ) -> Result<(ManifestId, ImportReport), StoreError> {
        let durable = self.flush()?;
        let id =
            self.store
                .commit_manifest_keeping(name, stored, Some(&self.condemned_at_start))?;
        let report = ImportReport {
            added: self.added,
            durable,
        };
        Ok((id, report)) // the lease goes with `self`, after the commit
    }
}

/// Points `name` at the manifest `stored`: under `importer`'s lease when
/// the chunks were just imported with it ([`Importer::commit`]), else as
/// [`Store::commit_manifest`].
pub fn commit<S: Deref<Target = Store>>(
    store: &Store,
    importer: Option<Importer<S>>,
    name: &Name,
    stored: &[u8],
) -> Result<ManifestId, StoreError> {
    match importer {
        Some(importer) => importer.commit(name, stored).map(|(id, _)| id),
        None => store.commit_manifest(name, stored),
    }
}
