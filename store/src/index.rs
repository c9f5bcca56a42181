//! The merged in-memory index: where each chunk is stored.
//!
//! Built from every pack's `.idx` by [`Index::load`]; packs written later are
//! added with [`Index::insert_pack`]. Pack ids are kept once in a `Vec` and
//! entries refer to them by a `u32` number, so each chunk costs its 32-byte
//! id plus a 24-byte slot. Share it between threads with
//! `Arc<RwLock<Index>>`.

use crate::backend::{Backend, BackendError, Kind};
use crate::id::{ChunkId, PackId};
use crate::pack::{decode_idx, Codec, IndexEntry};
use std::collections::{HashMap, HashSet};
use std::fmt;

/// Where a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    /// The pack holding it.
    pub pack: PackId,
    /// Offset of its stored bytes in the pack.
    pub offset: u64,
    /// Length of its stored bytes.
    pub stored_len: u32,
    /// Length of the raw chunk.
    pub raw_len: u32,
    /// How the stored bytes are encoded.
    pub codec: Codec,
}

/// The compact per-chunk record.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    pack: u32,
    stored_len: u32,
    raw_len: u32,
    codec: Codec,
}

/// Chunk id → location, over all packs.
#[derive(Debug, Default, Clone)]
pub struct Index {
    packs: Vec<PackId>,
    pack_numbers: HashMap<PackId, u32>,
    chunks: HashMap<ChunkId, Slot>,
}

/// Something wrong found while loading the index. Loading goes on; these
/// are for `ferry fsck` to report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum IndexProblem {
    /// An `.idx` that cannot be read or decoded; its pack's chunks are not
    /// indexed.
    CorruptIndex {
        /// The pack it is named for.
        pack: String,
        /// The `.idx` file.
        location: String,
        /// What is wrong.
        problem: String,
    },
    /// A pack without an `.idx`: its chunks are not indexed (an interrupted
    /// write, or a lost `.idx` that `ferry fsck --repair` can rebuild).
    MissingIndex {
        /// The pack.
        pack: String,
        /// The pack file.
        location: String,
    },
    /// An `.idx` whose pack is missing: its chunks are not indexed.
    MissingPack {
        /// The pack.
        pack: String,
        /// The `.idx` file.
        location: String,
    },
    /// An object whose name is not a pack id.
    BadName {
        /// Its kind.
        kind: Kind,
        /// Its name.
        name: String,
        /// Where it is.
        location: String,
    },
}

impl fmt::Display for IndexProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexProblem::CorruptIndex {
                location, problem, ..
            } => write!(
                f,
                "index {location} is unusable: {problem}; rebuild it with `ferry fsck --repair`"
            ),
            IndexProblem::MissingIndex { location, .. } => write!(
                f,
                "pack {location} has no index; rebuild it with `ferry fsck --repair`, \
                 or let `ferry gc` remove it"
            ),
            IndexProblem::MissingPack { location, .. } => write!(
                f,
                "index {location} names a pack that does not exist; its chunks are \
                 ignored, `ferry gc` removes it"
            ),
            IndexProblem::BadName { kind, location, .. } => write!(
                f,
                "{kind} {location} is not named by a pack id; it is ignored, remove it"
            ),
        }
    }
}

/// An error loading the index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// Listing the store failed.
    #[error("cannot load the chunk index: {0}")]
    Backend(#[from] BackendError),
}

impl Index {
    /// An empty index.
    pub fn new() -> Index {
        Index::default()
    }

    /// Loads every `.idx` of the store. Unusable `.idx` files, packs
    /// without one and `.idx` files without a pack are returned as problems
    /// and left out; only a failure to list the store is an error.
    pub fn load(backend: &dyn Backend) -> Result<(Index, Vec<IndexProblem>), IndexError> {
        let mut index = Index::new();
        let mut problems = Vec::new();
        let packs: HashSet<String> = backend.list(Kind::Pack)?.into_iter().collect();
        let idxs = backend.list(Kind::Index)?;
        let idx_set: HashSet<&str> = idxs.iter().map(String::as_str).collect();

        for name in &idxs {
            let location = backend.location(Kind::Index, name);
            let Ok(pack) = name.parse::<PackId>() else {
                problems.push(IndexProblem::BadName {
                    kind: Kind::Index,
                    name: name.clone(),
                    location,
                });
                continue;
            };
            if !packs.contains(name) {
                problems.push(IndexProblem::MissingPack {
                    pack: name.clone(),
                    location,
                });
                continue;
            }
            let bytes = match backend.get(Kind::Index, name) {
                Ok(bytes) => bytes,
                // Removed since listing (by gc): nothing to index.
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    problems.push(IndexProblem::CorruptIndex {
                        pack: name.clone(),
                        location,
                        problem: e.to_string(),
                    });
                    continue;
                }
            };
            match decode_idx(&bytes) {
                Ok(decoded) if decoded.pack == pack => {
                    index.insert_pack(pack, &decoded.entries);
                }
                Ok(decoded) => problems.push(IndexProblem::CorruptIndex {
                    pack: name.clone(),
                    location,
                    problem: format!("it describes pack {}", decoded.pack),
                }),
                Err(e) => problems.push(IndexProblem::CorruptIndex {
                    pack: name.clone(),
                    location,
                    problem: e.to_string(),
                }),
            }
        }

        let mut packs: Vec<String> = packs.into_iter().collect();
        packs.sort();
        for name in packs {
            if idx_set.contains(name.as_str()) {
                continue;
            }
            let location = backend.location(Kind::Pack, &name);
            if name.parse::<PackId>().is_err() {
                problems.push(IndexProblem::BadName {
                    kind: Kind::Pack,
                    name,
                    location,
                });
            } else {
                problems.push(IndexProblem::MissingIndex {
                    pack: name,
                    location,
                });
            }
        }
        Ok((index, problems))
    }

    /// Brings the index up to date with the store: indexes packs written
    /// since (by other processes), and if any indexed pack is gone (deleted
    /// by the collector) reloads everything, so that no chunk keeps pointing
    /// at a deleted pack. Problems are dropped here (fsck reloads and
    /// reports them).
    pub fn sync(&mut self, backend: &dyn Backend) -> Result<(), IndexError> {
        let names = backend.list(Kind::Index)?;
        let present: HashSet<PackId> = names.iter().filter_map(|n| n.parse().ok()).collect();
        if self.packs.iter().any(|p| !present.contains(p)) {
            *self = Index::load(backend)?.0;
            return Ok(());
        }
        for pack in present {
            if self.contains_pack(&pack) {
                continue;
            }
            // New since the last look; one that vanished meanwhile is skipped.
            if let Ok(bytes) = backend.get(Kind::Index, &pack.to_hex()) {
                if let Ok(decoded) = decode_idx(&bytes) {
                    if decoded.pack == pack {
                        self.insert_pack(pack, &decoded.entries);
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds a pack's entries. A chunk already indexed in another pack moves
    /// to this one: a chunk is written again only when its old copy is going
    /// away (its pack was condemned, or gc repacked it), so the newer copy
    /// is the one to use; were the old location kept, the store would go on
    /// calling the chunk condemned (missing) although a healthy copy exists,
    /// and a server would refuse every commit that needs it until gc
    /// deleted the old pack. Adding the same pack again changes nothing.
    /// Returns how many chunks were new.
    pub fn insert_pack(&mut self, pack: PackId, entries: &[IndexEntry]) -> usize {
        let number = match self.pack_numbers.get(&pack) {
            Some(_) => return 0,
            None => {
                // 2^32 packs of even 1 MiB would be 4 PiB in one store.
                let n = u32::try_from(self.packs.len()).expect("more than 2^32 packs");
                self.packs.push(pack);
                self.pack_numbers.insert(pack, n);
                n
            }
        };
        self.chunks.reserve(entries.len());
        let mut added = 0;
        for e in entries {
            let slot = Slot {
                offset: e.offset,
                pack: number,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
                codec: e.codec,
            };
            if self.chunks.insert(e.id, slot).is_none() {
                added += 1;
            }
        }
        added
    }

    fn location(&self, slot: &Slot) -> Location {
        Location {
            pack: self.packs[slot.pack as usize],
            offset: slot.offset,
            stored_len: slot.stored_len,
            raw_len: slot.raw_len,
            codec: slot.codec,
        }
    }

    /// Where `id` is stored.
    pub fn get(&self, id: &ChunkId) -> Option<Location> {
        self.chunks.get(id).map(|slot| self.location(slot))
    }

    /// Whether `id` is stored.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether no chunk is indexed.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Number of packs.
    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    /// Whether `pack` was inserted.
    pub fn contains_pack(&self, pack: &PackId) -> bool {
        self.pack_numbers.contains_key(pack)
    }

    /// The packs, in insertion order.
    pub fn packs(&self) -> impl Iterator<Item = &PackId> + '_ {
        self.packs.iter()
    }

    /// Every chunk and its location, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (ChunkId, Location)> + '_ {
        self.chunks
            .iter()
            .map(|(id, slot)| (*id, self.location(slot)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalDir;
    use crate::pack::PackWriter;

    fn store() -> (tempfile::TempDir, LocalDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::open(dir.path()).unwrap();
        (dir, store)
    }

    fn write_pack(backend: &dyn Backend, range: std::ops::Range<u32>) -> PackId {
        let mut w = PackWriter::new(backend).unwrap();
        for i in range {
            let raw = format!("chunk number {i}").repeat(i as usize % 7 + 1);
            if i % 2 == 0 {
                let stored = zstd::bulk::compress(raw.as_bytes(), 1).unwrap();
                w.add(
                    ChunkId::of(raw.as_bytes()),
                    Codec::Zstd,
                    raw.len() as u32,
                    &stored,
                )
                .unwrap();
            } else {
                w.add(
                    ChunkId::of(raw.as_bytes()),
                    Codec::Raw,
                    raw.len() as u32,
                    raw.as_bytes(),
                )
                .unwrap();
            }
        }
        w.finish(backend).unwrap().0
    }

    fn raw(i: u32) -> Vec<u8> {
        format!("chunk number {i}")
            .repeat(i as usize % 7 + 1)
            .into_bytes()
    }

    #[test]
    fn load_and_read_back() {
        let (_dir, store) = store();
        let a = write_pack(&store, 0..50);
        let b = write_pack(&store, 40..100); // 40..50 are in both
        let (index, problems) = Index::load(&store).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(index.len(), 100);
        assert_eq!(index.pack_count(), 2);
        assert!(index.contains_pack(&a) && index.contains_pack(&b));
        assert_eq!(index.iter().count(), 100);
        for i in 0..100 {
            let raw = raw(i);
            let loc = index.get(&ChunkId::of(&raw)).unwrap();
            assert!(loc.pack == a || loc.pack == b);
            if i < 40 {
                assert_eq!(loc.pack, a);
            } else if i >= 50 {
                assert_eq!(loc.pack, b);
            }
            let stored = store
                .get_range(
                    Kind::Pack,
                    &loc.pack.to_hex(),
                    loc.offset,
                    u64::from(loc.stored_len),
                )
                .unwrap();
            let decoded = match loc.codec {
                Codec::Raw => stored,
                Codec::Zstd => zstd::bulk::decompress(&stored, loc.raw_len as usize).unwrap(),
            };
            assert_eq!(decoded, raw);
            assert_eq!(loc.raw_len as usize, raw.len());
        }
        assert!(!index.contains(&ChunkId::of(b"absent")));
        assert_eq!(index.get(&ChunkId::of(b"absent")), None);
    }

    #[test]
    fn insert_pack_is_idempotent_and_the_later_pack_wins() {
        let (_dir, store) = store();
        let a = write_pack(&store, 0..10);
        let b = write_pack(&store, 5..15);
        let entries = |p: &PackId| crate::pack::read_idx(&store, p).unwrap().entries;
        let mut index = Index::new();
        assert!(index.is_empty());
        assert_eq!(index.insert_pack(a, &entries(&a)), 10);
        assert_eq!(index.insert_pack(a, &entries(&a)), 0);
        assert_eq!(index.insert_pack(b, &entries(&b)), 5);
        assert_eq!(index.len(), 15);
        assert_eq!(index.packs().copied().collect::<Vec<_>>(), [a, b]);
        // The chunks both packs hold moved to the later one.
        assert_eq!(index.get(&ChunkId::of(&raw(7))).unwrap().pack, b);
        assert_eq!(index.get(&ChunkId::of(&raw(3))).unwrap().pack, a);
        // Adding a known pack again moves nothing back.
        assert_eq!(index.insert_pack(a, &entries(&a)), 0);
        assert_eq!(index.get(&ChunkId::of(&raw(7))).unwrap().pack, b);
    }

    #[test]
    fn problems_are_reported_not_fatal() {
        let (_dir, store) = store();
        let good = write_pack(&store, 0..10);
        let corrupt = write_pack(&store, 10..20);
        let no_idx = write_pack(&store, 20..30);
        let no_pack = write_pack(&store, 30..40);
        let renamed = write_pack(&store, 40..50);
        let other = write_pack(&store, 50..60);

        let bytes = store.get(Kind::Index, &corrupt.to_hex()).unwrap();
        store
            .put(Kind::Index, &corrupt.to_hex(), &bytes[..bytes.len() / 2])
            .unwrap();
        store.delete(Kind::Index, &no_idx.to_hex()).unwrap();
        store.delete(Kind::Pack, &no_pack.to_hex()).unwrap();
        // The idx of `other` stored under the name of `renamed`.
        let bytes = store.get(Kind::Index, &other.to_hex()).unwrap();
        store.put(Kind::Index, &renamed.to_hex(), &bytes).unwrap();
        // A stray object that is not a pack id.
        store.put(Kind::Index, "not_a_pack", b"x").unwrap();

        let (index, problems) = Index::load(&store).unwrap();
        // Only `good` and `other` are usable.
        assert_eq!(index.len(), 20);
        assert_eq!(index.pack_count(), 2);
        let mut seen = Vec::new();
        for p in &problems {
            let text = p.to_string();
            match p {
                IndexProblem::CorruptIndex { pack, problem, .. } => {
                    assert!(text.contains(&format!("{pack}.idx")), "{text}");
                    if *pack == corrupt.to_hex() {
                        assert!(problem.contains("checksum"), "{problem}");
                    } else {
                        assert_eq!(*pack, renamed.to_hex());
                        assert!(problem.contains(&other.to_hex()), "{problem}");
                    }
                    seen.push(pack.clone());
                }
                IndexProblem::MissingIndex { pack, .. } => {
                    assert_eq!(*pack, no_idx.to_hex());
                    assert!(text.contains(&format!("{pack}.pack")), "{text}");
                    seen.push(pack.clone());
                }
                IndexProblem::MissingPack { pack, .. } => {
                    assert_eq!(*pack, no_pack.to_hex());
                    seen.push(pack.clone());
                }
                IndexProblem::BadName { name, .. } => {
                    assert_eq!(name, "not_a_pack");
                    seen.push(name.clone());
                }
            }
        }
        seen.sort();
        let mut expected = vec![
            corrupt.to_hex(),
            no_idx.to_hex(),
            no_pack.to_hex(),
            renamed.to_hex(),
            "not_a_pack".to_string(),
        ];
        expected.sort();
        assert_eq!(seen, expected);
        assert!(index.contains_pack(&good));
        // Problems serialise for `fsck --json`.
        let json = serde_json::to_string(&problems).unwrap();
        assert!(json.contains("missing_index"), "{json}");
    }

    #[test]
    fn empty_store_loads_empty() {
        let (_dir, store) = store();
        let (index, problems) = Index::load(&store).unwrap();
        assert!(index.is_empty() && problems.is_empty());
    }
}
