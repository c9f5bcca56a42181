//! Pack files: chunk blobs back to back, followed by their entry table.
//!
//! ```text
//! pack:  "FERRYPK1" | version u32
//!        blob* (each chunk's stored bytes: zstd-compressed or raw)
//!        entry table: entry*
//!        trailer: table length u64 | nonce [16] | pack id [32] | "FERRYEND"
//! entry: chunk id [32] | offset u64 | stored_len u32 | raw_len u32 | codec u8
//! idx:   "FERRYIX1" | version u32 | pack id [32] | nonce [16] | data_end u64
//!        | entry count u64 | entry* | BLAKE3(everything before) [32]
//! ```
//!
//! Integers are little-endian. `data_end` is where the blobs end (the entry
//! table's offset). The pack id is `BLAKE3(table ‖ nonce)`, where the nonce
//! is 16 random bytes, so two writers never produce the same pack name. The
//! id doubles as the footer's checksum: it covers the table and the nonce,
//! and a pack names itself.
//!
//! The same entry table is written as a small `.idx` object so that opening a
//! store never reads packs. The `.idx` is written only after the pack is
//! durable, so an `.idx` never names a pack that does not exist.
//!
//! [`PackBuilder`] plans a pack without I/O; [`PackWriter`] streams blobs into
//! a temporary file and commits it through a [`Backend`]. The decoders
//! ([`decode_idx`], [`read_pack_index`], [`decode_trailer`],
//! [`decode_entries`]) treat their input as untrusted: they return
//! [`FormatError`] on anything unexpected, never panic, and never allocate
//! more than the input's size.

use crate::backend::{Backend, BackendError, Kind, TempObject};
use crate::id::{ChunkId, PackId};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Magic at the start of a pack.
pub const PACK_MAGIC: [u8; 8] = *b"FERRYPK1";
/// Magic at the end of a pack.
pub const PACK_END_MAGIC: [u8; 8] = *b"FERRYEND";
/// Magic at the start of an `.idx`.
pub const IDX_MAGIC: [u8; 8] = *b"FERRYIX1";
/// The pack and idx format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first blob.
pub const HEADER_LEN: u64 = 12;
/// Bytes of the pack trailer.
pub const TRAILER_LEN: u64 = 8 + 16 + 32 + 8;
/// Bytes of one encoded entry.
pub const ENTRY_LEN: usize = 32 + 8 + 4 + 4 + 1;
/// Bytes of the idx before its entries.
const IDX_HEADER_LEN: usize = 8 + 4 + 32 + 16 + 8 + 8;
/// Default target size of a pack.
pub const DEFAULT_TARGET_SIZE: u64 = 64 << 20;

/// How a chunk's bytes are stored (the same type as [`crate::compress::Codec`]).
pub use crate::compress::Codec;

/// One chunk in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexEntry {
    /// The chunk's id (BLAKE3 of its raw bytes).
    pub id: ChunkId,
    /// Offset of the stored bytes in the pack.
    pub offset: u64,
    /// Length of the stored bytes.
    pub stored_len: u32,
    /// Length of the raw (uncompressed) chunk.
    pub raw_len: u32,
    /// How the stored bytes are encoded.
    pub codec: Codec,
}

/// A pack's entry table with what identifies it: the content of an `.idx`,
/// and what a pack's footer decodes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackIndex {
    /// The pack's id, `BLAKE3(table ‖ nonce)`.
    pub pack: PackId,
    /// The pack's random nonce.
    pub nonce: [u8; 16],
    /// Where the blobs end and the entry table begins.
    pub data_end: u64,
    /// The entries, by ascending offset.
    pub entries: Vec<IndexEntry>,
}

/// What is wrong with the bytes of a pack or an `.idx`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The magic bytes are wrong: not a ferry file, or overwritten.
    #[error("bad magic in {what}: expected {expected:?}, found {found:?}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// The expected magic.
        expected: String,
        /// What was there.
        found: String,
    },
    /// A version this code does not read.
    #[error("unsupported format version {found} (this ferry reads version {FORMAT_VERSION}); upgrade ferry")]
    Version {
        /// The version found.
        found: u32,
    },
    /// Fewer bytes than the structure needs.
    #[error("truncated: {what} needs {needed} bytes but only {available} are present")]
    Truncated {
        /// What is truncated.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// Bytes left after the structure.
    #[error("{extra} unexpected bytes after {what}")]
    TrailingBytes {
        /// What was decoded.
        what: &'static str,
        /// How many bytes are left.
        extra: u64,
    },
    /// A length that does not fit the file.
    #[error("{what} of {len} bytes does not fit: {reason}")]
    BadLength {
        /// Which length.
        what: &'static str,
        /// Its value.
        len: u64,
        /// Why it does not fit.
        reason: &'static str,
    },
    /// A checksum does not match.
    #[error("checksum mismatch in {what}")]
    Checksum {
        /// What was checksummed.
        what: &'static str,
    },
    /// The recorded pack id is not `BLAKE3(table ‖ nonce)`, or not the
    /// expected one.
    #[error("pack id mismatch: expected {expected}, the data says {found}")]
    PackId {
        /// The id expected (from the name, or computed).
        expected: PackId,
        /// The id found.
        found: PackId,
    },
    /// An entry with an unknown codec byte.
    #[error("entry {index} ({id}) has unknown codec {codec}")]
    Codec {
        /// Entry number.
        index: usize,
        /// Its chunk id.
        id: ChunkId,
        /// The codec byte.
        codec: u8,
    },
    /// An entry outside the pack's blob area or overlapping the previous one.
    #[error(
        "entry {index} ({id}) at offset {offset}, {len} bytes, is out of range \
         (blobs lie between {start} and {end} in order, without overlap)"
    )]
    EntryRange {
        /// Entry number.
        index: usize,
        /// Its chunk id.
        id: ChunkId,
        /// Its offset.
        offset: u64,
        /// Its stored length.
        len: u32,
        /// Lowest allowed offset.
        start: u64,
        /// End of the blob area.
        end: u64,
    },
    /// A raw entry whose stored and raw lengths differ.
    #[error("entry {index} ({id}) is raw but its stored length {stored_len} differs from its raw length {raw_len}")]
    RawLength {
        /// Entry number.
        index: usize,
        /// Its chunk id.
        id: ChunkId,
        /// Stored length.
        stored_len: u32,
        /// Raw length.
        raw_len: u32,
    },
}

/// An error reading, writing or checking a pack.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A pack or `.idx` is corrupt.
    #[error(
        "{location} is corrupt: {problem}; run `ferry fsck` to see which stashes are affected"
    )]
    Corrupt {
        /// The file.
        location: String,
        /// What is wrong.
        problem: FormatError,
    },
    /// A pack's footer and its `.idx` disagree.
    #[error(
        "pack {pack}: its footer ({pack_location}) and its index ({idx_location}) disagree on \
         {what}; rebuild the index from the pack with `ferry fsck --repair`"
    )]
    Mismatch {
        /// The pack.
        pack: PackId,
        /// The pack file.
        pack_location: String,
        /// The idx file.
        idx_location: String,
        /// What differs.
        what: &'static str,
    },
    /// Writing the temporary pack file failed.
    #[error("cannot write temporary pack file {location}: {error}; check free space in the store")]
    Write {
        /// The temporary file.
        location: String,
        /// The underlying error.
        error: std::io::Error,
    },
    /// A chunk too large for one entry (4 GiB).
    #[error(
        "chunk {id} is {len} bytes stored; a pack entry holds at most 4 GiB, use smaller chunks"
    )]
    ChunkTooLarge {
        /// The chunk.
        id: ChunkId,
        /// Its stored length.
        len: u64,
    },
    /// A raw chunk whose raw length is not its stored length (a caller bug).
    #[error("chunk {id} is raw but raw_len {raw_len} differs from the {stored_len} bytes given; this is a bug in ferry")]
    RawLength {
        /// The chunk.
        id: ChunkId,
        /// raw_len given.
        raw_len: u32,
        /// Bytes given.
        stored_len: u64,
    },
    /// The writer failed earlier and cannot continue.
    #[error("this pack writer failed earlier ({0}); discard it and start a new pack")]
    Poisoned(String),
}

fn corrupt(location: String) -> impl FnOnce(FormatError) -> PackError {
    move |problem| PackError::Corrupt { location, problem }
}

// ---------------------------------------------------------------------------
// Encoding and decoding

fn encode_entry(out: &mut Vec<u8>, e: &IndexEntry) {
    out.extend_from_slice(&e.id.0);
    out.extend_from_slice(&e.offset.to_le_bytes());
    out.extend_from_slice(&e.stored_len.to_le_bytes());
    out.extend_from_slice(&e.raw_len.to_le_bytes());
    out.push(e.codec.code());
}

/// Encodes an entry table.
pub fn encode_entries(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        encode_entry(&mut out, e);
    }
    out
}

/// The pack id for an encoded entry table and nonce.
pub fn pack_id(table: &[u8], nonce: &[u8; 16]) -> PackId {
    let mut h = blake3::Hasher::new();
    h.update(table);
    h.update(nonce);
    PackId(*h.finalize().as_bytes())
}

/// A little reader over untrusted bytes; every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.bytes.len() < n {
            return Err(FormatError::Truncated {
                what: self.what,
                needed: n as u64,
                available: self.bytes.len() as u64,
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
}

fn check_magic(what: &'static str, found: &[u8], expected: &[u8; 8]) -> Result<(), FormatError> {
    if found == expected {
        Ok(())
    } else {
        Err(FormatError::BadMagic {
            what,
            expected: String::from_utf8_lossy(expected).into_owned(),
            found: String::from_utf8_lossy(found).into_owned(),
        })
    }
}

fn check_version(found: u32) -> Result<(), FormatError> {
    if found == FORMAT_VERSION {
        Ok(())
    } else {
        Err(FormatError::Version { found })
    }
}

/// Decodes an entry table whose blobs must lie in `HEADER_LEN..data_end`,
/// in ascending order without overlap.
pub fn decode_entries(table: &[u8], data_end: u64) -> Result<Vec<IndexEntry>, FormatError> {
    if !table.len().is_multiple_of(ENTRY_LEN) {
        return Err(FormatError::BadLength {
            what: "entry table",
            len: table.len() as u64,
            reason: "not a whole number of entries",
        });
    }
    if data_end < HEADER_LEN {
        return Err(FormatError::BadLength {
            what: "blob area",
            len: data_end,
            reason: "it ends before the pack header",
        });
    }
    // The capacity is bounded by the input's length.
    let mut entries = Vec::with_capacity(table.len() / ENTRY_LEN);
    let mut next = HEADER_LEN;
    for (index, raw) in table.chunks_exact(ENTRY_LEN).enumerate() {
        let mut c = Cursor {
            bytes: raw,
            what: "entry",
        };
        let id = ChunkId(c.array()?);
        let offset = c.u64()?;
        let stored_len = c.u32()?;
        let raw_len = c.u32()?;
        let codec_byte = c.array::<1>()?[0];
        let codec = Codec::from_code(codec_byte).ok_or(FormatError::Codec {
            index,
            id,
            codec: codec_byte,
        })?;
        let end = offset.checked_add(u64::from(stored_len));
        if offset < next || end.is_none_or(|end| end > data_end) {
            return Err(FormatError::EntryRange {
                index,
                id,
                offset,
                len: stored_len,
                start: next,
                end: data_end,
            });
        }
        if codec == Codec::Raw && stored_len != raw_len {
            return Err(FormatError::RawLength {
                index,
                id,
                stored_len,
                raw_len,
            });
        }
        next = offset + u64::from(stored_len);
        entries.push(IndexEntry {
            id,
            offset,
            stored_len,
            raw_len,
            codec,
        });
    }
    Ok(entries)
}

/// Encodes an `.idx`.
pub fn encode_idx(index: &PackIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDX_HEADER_LEN + index.entries.len() * ENTRY_LEN + 32);
    out.extend_from_slice(&IDX_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&index.pack.0);
    out.extend_from_slice(&index.nonce);
    out.extend_from_slice(&index.data_end.to_le_bytes());
    out.extend_from_slice(&(index.entries.len() as u64).to_le_bytes());
    for e in &index.entries {
        encode_entry(&mut out, e);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes and checks an `.idx`: magic, version, checksum, that the pack id
/// is `BLAKE3(table ‖ nonce)`, and every entry.
pub fn decode_idx(bytes: &[u8]) -> Result<PackIndex, FormatError> {
    let mut c = Cursor {
        bytes,
        what: "index header",
    };
    check_magic("index header", c.take(8)?, &IDX_MAGIC)?;
    check_version(c.u32()?)?;
    if bytes.len() < IDX_HEADER_LEN + 32 {
        return Err(FormatError::Truncated {
            what: "index",
            needed: (IDX_HEADER_LEN + 32) as u64,
            available: bytes.len() as u64,
        });
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(FormatError::Checksum { what: "index" });
    }
    let pack = PackId(c.array()?);
    let nonce: [u8; 16] = c.array()?;
    let data_end = c.u64()?;
    let count = c.u64()?;
    let table = &body[IDX_HEADER_LEN..];
    let expected = count.checked_mul(ENTRY_LEN as u64);
    if expected != Some(table.len() as u64) {
        return Err(FormatError::BadLength {
            what: "index entry table",
            len: table.len() as u64,
            reason: "the entry count says otherwise",
        });
    }
    let computed = pack_id(table, &nonce);
    if computed != pack {
        return Err(FormatError::PackId {
            expected: computed,
            found: pack,
        });
    }
    let entries = decode_entries(table, data_end)?;
    Ok(PackIndex {
        pack,
        nonce,
        data_end,
        entries,
    })
}

/// A decoded pack trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Length of the entry table.
    pub table_len: u64,
    /// The pack's nonce.
    pub nonce: [u8; 16],
    /// The pack's id, `BLAKE3(table ‖ nonce)`: the footer's checksum.
    pub pack: PackId,
}

impl Trailer {
    /// Where the entry table starts in a pack of `pack_size` bytes (checked
    /// by [`decode_trailer`]).
    pub fn table_offset(&self, pack_size: u64) -> u64 {
        pack_size
            .saturating_sub(TRAILER_LEN)
            .saturating_sub(self.table_len)
    }
}

/// Decodes the last [`TRAILER_LEN`] bytes of a pack of `pack_size` bytes.
pub fn decode_trailer(trailer: &[u8], pack_size: u64) -> Result<Trailer, FormatError> {
    if pack_size < HEADER_LEN + TRAILER_LEN {
        return Err(FormatError::Truncated {
            what: "pack",
            needed: HEADER_LEN + TRAILER_LEN,
            available: pack_size,
        });
    }
    let mut c = Cursor {
        bytes: trailer,
        what: "pack trailer",
    };
    let table_len = c.u64()?;
    let nonce = c.array()?;
    let pack = PackId(c.array()?);
    check_magic("pack trailer", c.take(8)?, &PACK_END_MAGIC)?;
    if !c.bytes.is_empty() {
        return Err(FormatError::TrailingBytes {
            what: "pack trailer",
            extra: c.bytes.len() as u64,
        });
    }
    if table_len > pack_size - HEADER_LEN - TRAILER_LEN {
        return Err(FormatError::BadLength {
            what: "entry table",
            len: table_len,
            reason: "longer than the pack",
        });
    }
    Ok(Trailer {
        table_len,
        nonce,
        pack,
    })
}

fn check_header(header: &[u8]) -> Result<(), FormatError> {
    let mut c = Cursor {
        bytes: header,
        what: "pack header",
    };
    check_magic("pack header", c.take(8)?, &PACK_MAGIC)?;
    check_version(c.u32()?)
}

fn decode_table(table: &[u8], trailer: &Trailer, data_end: u64) -> Result<PackIndex, FormatError> {
    if pack_id(table, &trailer.nonce) != trailer.pack {
        return Err(FormatError::Checksum {
            what: "pack entry table",
        });
    }
    let entries = decode_entries(table, data_end)?;
    Ok(PackIndex {
        pack: trailer.pack,
        nonce: trailer.nonce,
        data_end,
        entries,
    })
}

/// Decodes the footer of a whole pack held in memory, checking header,
/// trailer, table checksum (the pack id) and entries.
pub fn read_pack_index(pack: &[u8]) -> Result<PackIndex, FormatError> {
    let size = pack.len() as u64;
    check_header(pack)?;
    let trailer_at = pack.len().saturating_sub(TRAILER_LEN as usize);
    let trailer = decode_trailer(&pack[trailer_at..], size)?;
    let data_end = trailer.table_offset(size);
    // Both bounds were checked by decode_trailer.
    let table = &pack[data_end as usize..trailer_at];
    decode_table(table, &trailer, data_end)
}

// ---------------------------------------------------------------------------
// Building and writing

/// Plans a pack without doing I/O: assigns offsets, tracks size and
/// entries, and produces the footer and `.idx` bytes.
#[derive(Debug, Clone)]
pub struct PackBuilder {
    entries: Vec<IndexEntry>,
    positions: HashMap<ChunkId, usize>,
    offset: u64,
    target_size: u64,
}

/// What [`PackBuilder::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A new entry: append its stored bytes.
    New(IndexEntry),
    /// The chunk was already in the pack: append nothing.
    Existing(IndexEntry),
}

impl Added {
    /// The chunk's entry.
    pub fn entry(&self) -> IndexEntry {
        match *self {
            Added::New(e) | Added::Existing(e) => e,
        }
    }
}

/// A finished pack plan: what to append to the pack and the `.idx` bytes.
#[derive(Debug, Clone)]
pub struct FinishedPack {
    /// The pack's entries, id and nonce.
    pub index: PackIndex,
    /// Bytes to append after the last blob: entry table and trailer.
    pub footer: Vec<u8>,
    /// The `.idx` object.
    pub idx: Vec<u8>,
}

impl PackBuilder {
    /// A builder for packs of about `target_size` bytes.
    pub fn new(target_size: u64) -> PackBuilder {
        PackBuilder {
            entries: Vec::new(),
            positions: HashMap::new(),
            offset: HEADER_LEN,
            target_size,
        }
    }

    /// The bytes every pack starts with.
    pub fn header() -> [u8; HEADER_LEN as usize] {
        let mut out = [0; HEADER_LEN as usize];
        out[..8].copy_from_slice(&PACK_MAGIC);
        out[8..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out
    }

    /// Plans the next blob. For [`Added::New`] the caller must append
    /// exactly `stored_len` bytes to the pack; for [`Added::Existing`] (the
    /// chunk is already in this pack) nothing.
    pub fn add(
        &mut self,
        id: ChunkId,
        codec: Codec,
        raw_len: u32,
        stored_len: u64,
    ) -> Result<Added, PackError> {
        if let Some(&i) = self.positions.get(&id) {
            return Ok(Added::Existing(self.entries[i]));
        }
        let stored_len_u32 = u32::try_from(stored_len).map_err(|_| PackError::ChunkTooLarge {
            id,
            len: stored_len,
        })?;
        if codec == Codec::Raw && u64::from(raw_len) != stored_len {
            return Err(PackError::RawLength {
                id,
                raw_len,
                stored_len,
            });
        }
        let entry = IndexEntry {
            id,
            offset: self.offset,
            stored_len: stored_len_u32,
            raw_len,
            codec,
        };
        self.offset += stored_len;
        self.positions.insert(id, self.entries.len());
        self.entries.push(entry);
        Ok(Added::New(entry))
    }

    /// The entry for `id` if it is in this pack.
    pub fn get(&self, id: &ChunkId) -> Option<&IndexEntry> {
        self.positions.get(id).map(|&i| &self.entries[i])
    }

    /// Whether `id` is in this pack.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.positions.contains_key(id)
    }

    /// The entries so far.
    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no chunk was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pack's size if finished now.
    pub fn size(&self) -> u64 {
        self.offset + (self.entries.len() * ENTRY_LEN) as u64 + TRAILER_LEN
    }

    /// Whether the pack reached its target size.
    pub fn is_full(&self) -> bool {
        self.size() >= self.target_size
    }

    /// Finishes the plan with a random `nonce`: the footer to append and the
    /// `.idx` to store.
    pub fn finish(self, nonce: [u8; 16]) -> FinishedPack {
        let table = encode_entries(&self.entries);
        let mut footer = Vec::with_capacity(table.len() + TRAILER_LEN as usize);
        footer.extend_from_slice(&table);
        footer.extend_from_slice(&(table.len() as u64).to_le_bytes());
        let pack = pack_id(&table, &nonce);
        footer.extend_from_slice(&nonce);
        footer.extend_from_slice(&pack.0);
        footer.extend_from_slice(&PACK_END_MAGIC);
        let index = PackIndex {
            pack,
            nonce,
            data_end: self.offset,
            entries: self.entries,
        };
        let idx = encode_idx(&index);
        FinishedPack { index, footer, idx }
    }
}

/// 16 bytes that differ between any two calls, in any process.
pub fn random_nonce() -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    let mut urandom = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut urandom);
    }
    h.update(&urandom);
    // Fallbacks in case /dev/urandom is unavailable.
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(&nanos.to_le_bytes());
    h.update(format!("{:?}", std::thread::current().id()).as_bytes());
    let mut out = [0; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Streams chunk blobs into a temporary file and commits it as a pack.
///
/// ```
/// use store::backend::LocalDir;
/// use store::pack::{Codec, PackWriter};
/// use store::ChunkId;
/// let dir = tempfile::tempdir().unwrap();
/// let backend = LocalDir::open(dir.path()).unwrap();
/// let mut writer = PackWriter::new(&backend).unwrap();
/// let data = b"some chunk";
/// writer.add(ChunkId::of(data), Codec::Raw, data.len() as u32, data).unwrap();
/// let (pack, entries) = writer.finish(&backend).unwrap();
/// assert_eq!(entries.len(), 1);
/// ```
#[derive(Debug)]
pub struct PackWriter {
    builder: PackBuilder,
    tmp: TempObject,
    failed: Option<String>,
}

impl PackWriter {
    /// A writer for a pack of [`DEFAULT_TARGET_SIZE`].
    pub fn new(backend: &dyn Backend) -> Result<PackWriter, PackError> {
        Self::with_target_size(backend, DEFAULT_TARGET_SIZE)
    }

    /// A writer whose pack is full at about `target_size` bytes.
    pub fn with_target_size(
        backend: &dyn Backend,
        target_size: u64,
    ) -> Result<PackWriter, PackError> {
        let mut writer = PackWriter {
            builder: PackBuilder::new(target_size),
            tmp: backend.create_temp()?,
            failed: None,
        };
        writer.write(&PackBuilder::header())?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), PackError> {
        if let Some(failed) = &self.failed {
            return Err(PackError::Poisoned(failed.clone()));
        }
        self.tmp.write_all(bytes).map_err(|error| {
            self.failed = Some(error.to_string());
            PackError::Write {
                location: self.tmp.path().display().to_string(),
                error,
            }
        })
    }

    /// Appends a chunk's stored bytes. A chunk already in this pack is not
    /// written again; its existing entry is returned.
    pub fn add(
        &mut self,
        id: ChunkId,
        codec: Codec,
        raw_len: u32,
        stored: &[u8],
    ) -> Result<IndexEntry, PackError> {
        if let Some(failed) = &self.failed {
            return Err(PackError::Poisoned(failed.clone()));
        }
        match self.builder.add(id, codec, raw_len, stored.len() as u64)? {
            Added::New(entry) => {
                self.write(stored)?;
                Ok(entry)
            }
            Added::Existing(entry) => Ok(entry),
        }
    }

    /// Whether `id` is in this pack.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.builder.contains(id)
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.builder.len()
    }

    /// Whether no chunk was added.
    pub fn is_empty(&self) -> bool {
        self.builder.is_empty()
    }

    /// The pack's size if finished now.
    pub fn size(&self) -> u64 {
        self.builder.size()
    }

    /// Whether the pack reached its target size; call [`PackWriter::finish`].
    pub fn is_full(&self) -> bool {
        self.builder.is_full()
    }

    /// Writes the footer, makes the pack durable under its id, then writes
    /// its `.idx`. Returns the pack id and its entries.
    pub fn finish(self, backend: &dyn Backend) -> Result<(PackId, Vec<IndexEntry>), PackError> {
        let PackWriter {
            builder,
            mut tmp,
            failed,
        } = self;
        if let Some(failed) = failed {
            return Err(PackError::Poisoned(failed));
        }
        let finished = builder.finish(random_nonce());
        tmp.write_all(&finished.footer)
            .map_err(|error| PackError::Write {
                location: tmp.path().display().to_string(),
                error,
            })?;
        let name = finished.index.pack.to_hex();
        // Order matters: the .idx appears only once the pack is durable.
        backend.put_file(Kind::Pack, &name, tmp)?;
        backend.put(Kind::Index, &name, &finished.idx)?;
        Ok((finished.index.pack, finished.index.entries))
    }
}

// ---------------------------------------------------------------------------
// Reading and checking

/// Reads and checks a stored pack's footer with range reads (header,
/// trailer, table): magic, version, checksum, entries, and that the
/// pack's id is `pack`.
pub fn read_pack_footer(backend: &dyn Backend, pack: &PackId) -> Result<PackIndex, PackError> {
    let name = pack.to_hex();
    let location = backend.location(Kind::Pack, &name);
    let size = backend.size(Kind::Pack, &name)?;
    if size < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(location)(FormatError::Truncated {
            what: "pack",
            needed: HEADER_LEN + TRAILER_LEN,
            available: size,
        }));
    }
    let header = backend.get_range(Kind::Pack, &name, 0, HEADER_LEN)?;
    check_header(&header).map_err(corrupt(location.clone()))?;
    let trailer = backend.get_range(Kind::Pack, &name, size - TRAILER_LEN, TRAILER_LEN)?;
    let trailer = decode_trailer(&trailer, size).map_err(corrupt(location.clone()))?;
    let data_end = trailer.table_offset(size);
    let table = backend.get_range(Kind::Pack, &name, data_end, trailer.table_len)?;
    let index = decode_table(&table, &trailer, data_end).map_err(corrupt(location.clone()))?;
    if index.pack != *pack {
        return Err(corrupt(location)(FormatError::PackId {
            expected: *pack,
            found: index.pack,
        }));
    }
    Ok(index)
}

/// Reads and checks a stored `.idx`, including that it names `pack`.
pub fn read_idx(backend: &dyn Backend, pack: &PackId) -> Result<PackIndex, PackError> {
    let name = pack.to_hex();
    let bytes = backend.get(Kind::Index, &name)?;
    let location = backend.location(Kind::Index, &name);
    let index = decode_idx(&bytes).map_err(corrupt(location.clone()))?;
    if index.pack != *pack {
        return Err(corrupt(location)(FormatError::PackId {
            expected: *pack,
            found: index.pack,
        }));
    }
    Ok(index)
}

/// For fsck: checks that a pack's footer is intact and matches its `.idx`.
/// Returns the pack's index.
pub fn verify_pack(backend: &dyn Backend, pack: &PackId) -> Result<PackIndex, PackError> {
    let footer = read_pack_footer(backend, pack)?;
    let idx = read_idx(backend, pack)?;
    let what = if idx.nonce != footer.nonce {
        "the nonce"
    } else if idx.data_end != footer.data_end {
        "where the blobs end"
    } else if idx.entries != footer.entries {
        "the entries"
    } else {
        return Ok(footer);
    };
    let name = pack.to_hex();
    Err(PackError::Mismatch {
        pack: *pack,
        pack_location: backend.location(Kind::Pack, &name),
        idx_location: backend.location(Kind::Index, &name),
        what,
    })
}

/// For fsck: rewrites a pack's `.idx` from its footer (when the `.idx` is
/// missing or corrupt).
pub fn rebuild_idx(backend: &dyn Backend, pack: &PackId) -> Result<PackIndex, PackError> {
    let footer = read_pack_footer(backend, pack)?;
    backend.put(Kind::Index, &pack.to_hex(), &encode_idx(&footer))?;
    Ok(footer)
}

/// A chunk in a pack whose bytes do not match its id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChunkProblem {
    /// The chunk.
    pub id: ChunkId,
    /// Its offset in the pack.
    pub offset: u64,
    /// What is wrong.
    pub problem: String,
}

/// For fsck: reads every blob of a pack, decodes it and checks its length
/// and hash. Returns the chunks that are damaged.
pub fn verify_chunks(
    backend: &dyn Backend,
    index: &PackIndex,
) -> Result<Vec<ChunkProblem>, PackError> {
    let name = index.pack.to_hex();
    let mut problems = Vec::new();
    for e in &index.entries {
        let stored = backend.get_range(Kind::Pack, &name, e.offset, u64::from(e.stored_len))?;
        let raw = match e.codec {
            Codec::Raw => Ok(stored),
            Codec::Zstd => decompress_bounded(&stored, e.raw_len),
        };
        let problem = match raw {
            Err(msg) => Some(msg),
            Ok(raw) if raw.len() as u64 != u64::from(e.raw_len) => Some(format!(
                "decodes to {} bytes, the index says {}",
                raw.len(),
                e.raw_len
            )),
            Ok(raw) if ChunkId::of(&raw) != e.id => {
                Some("its bytes do not hash to its id".to_string())
            }
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            problems.push(ChunkProblem {
                id: e.id,
                offset: e.offset,
                problem,
            });
        }
    }
    Ok(problems)
}

/// Decompresses at most `raw_len + 1` bytes, so a lying length cannot make
/// us allocate more than the data really holds.
fn decompress_bounded(stored: &[u8], raw_len: u32) -> Result<Vec<u8>, String> {
    let decoder = zstd::stream::read::Decoder::new(stored).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    decoder
        .take(u64::from(raw_len) + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("does not decompress: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalDir;
    use proptest::prelude::*;
    use std::sync::Mutex;

    fn store() -> (tempfile::TempDir, LocalDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::open(dir.path()).unwrap();
        (dir, store)
    }

    /// Chunks of varied sizes; every third is zstd-compressed.
    fn chunks(n: usize, seed: u8) -> Vec<(ChunkId, Codec, Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let raw: Vec<u8> = (0..(i * 97 % 3000))
                    .map(|j| (j as u8).wrapping_mul(seed).wrapping_add(i as u8))
                    .collect();
                let id = ChunkId::of(&raw);
                if i % 3 == 0 {
                    let stored = zstd::bulk::compress(&raw, 3).unwrap();
                    (id, Codec::Zstd, raw, stored)
                } else {
                    (id, Codec::Raw, raw.clone(), raw)
                }
            })
            .collect()
    }

    fn write_pack(
        backend: &dyn Backend,
        chunks: &[(ChunkId, Codec, Vec<u8>, Vec<u8>)],
    ) -> (PackId, Vec<IndexEntry>) {
        let mut w = PackWriter::new(backend).unwrap();
        for (id, codec, raw, stored) in chunks {
            w.add(*id, *codec, raw.len() as u32, stored).unwrap();
        }
        w.finish(backend).unwrap()
    }

    /// A small pack and its idx, built once.
    fn small_pack() -> (Vec<u8>, Vec<u8>) {
        static SAMPLE: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
        SAMPLE
            .get_or_init(|| {
                let (_dir, store) = store();
                let (id, _) = write_pack(&store, &chunks(5, 7));
                (
                    store.get(Kind::Pack, &id.to_hex()).unwrap(),
                    store.get(Kind::Index, &id.to_hex()).unwrap(),
                )
            })
            .clone()
    }

    #[test]
    fn write_read_round_trip() {
        let (_dir, store) = store();
        let chunks = chunks(40, 3);
        let (id, entries) = write_pack(&store, &chunks);
        let name = id.to_hex();
        assert!(store.exists(Kind::Pack, &name).unwrap());
        assert!(store.exists(Kind::Index, &name).unwrap());
        assert_eq!(entries.len(), chunks.len());

        let idx = decode_idx(&store.get(Kind::Index, &name).unwrap()).unwrap();
        let footer = read_pack_index(&store.get(Kind::Pack, &name).unwrap()).unwrap();
        assert_eq!(idx, footer);
        assert_eq!(idx.pack, id);
        assert_eq!(idx.entries, entries);
        assert_eq!(verify_pack(&store, &id).unwrap(), idx);
        assert!(verify_chunks(&store, &idx).unwrap().is_empty());

        for ((cid, codec, raw, stored), e) in chunks.iter().zip(&entries) {
            assert_eq!((e.id, e.codec, e.raw_len), (*cid, *codec, raw.len() as u32));
            let blob = store
                .get_range(Kind::Pack, &name, e.offset, u64::from(e.stored_len))
                .unwrap();
            assert_eq!(&blob, stored);
        }
        // Only the pack and its idx exist; tmp is clean.
        assert!(std::fs::read_dir(store.tmp_dir()).unwrap().next().is_none());
    }

    #[test]
    fn duplicates_are_written_once() {
        let (_dir, store) = store();
        let mut w = PackWriter::new(&store).unwrap();
        let e1 = w.add(ChunkId::of(b"abc"), Codec::Raw, 3, b"abc").unwrap();
        let size = w.size();
        let e2 = w.add(ChunkId::of(b"abc"), Codec::Raw, 3, b"abc").unwrap();
        assert_eq!(e1, e2);
        assert_eq!(w.size(), size);
        assert_eq!(w.len(), 1);
        let (_, entries) = w.finish(&store).unwrap();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn is_full_at_target_size() {
        let (_dir, store) = store();
        let mut w = PackWriter::with_target_size(&store, 10_000).unwrap();
        let mut n = 0u32;
        while !w.is_full() {
            let data = n.to_le_bytes().repeat(250);
            w.add(ChunkId::of(&data), Codec::Raw, 1000, &data).unwrap();
            n += 1;
        }
        assert_eq!(n, 10);
        let (id, _) = w.finish(&store).unwrap();
        assert!(store.size(Kind::Pack, &id.to_hex()).unwrap() >= 10_000);
    }

    #[test]
    fn empty_pack_is_valid() {
        let (_dir, store) = store();
        let w = PackWriter::new(&store).unwrap();
        assert!(w.is_empty());
        let (id, entries) = w.finish(&store).unwrap();
        assert!(entries.is_empty());
        assert!(verify_pack(&store, &id).unwrap().entries.is_empty());
    }

    #[test]
    fn caller_mistakes_are_errors() {
        let (_dir, store) = store();
        let mut w = PackWriter::new(&store).unwrap();
        let err = w
            .add(ChunkId::of(b"abc"), Codec::Raw, 4, b"abc")
            .unwrap_err();
        assert!(matches!(err, PackError::RawLength { .. }), "{err}");
        let mut b = PackBuilder::new(DEFAULT_TARGET_SIZE);
        let err = b
            .add(ChunkId::of(b""), Codec::Zstd, 1, 1 << 32)
            .unwrap_err();
        assert!(matches!(err, PackError::ChunkTooLarge { .. }), "{err}");
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let (_dir, store) = store();
        let mut w = PackWriter::new(&store).unwrap();
        w.add(ChunkId::of(b"abc"), Codec::Raw, 3, b"abc").unwrap();
        drop(w);
        for kind in Kind::ALL {
            assert!(store.list(kind).unwrap().is_empty());
        }
        assert!(std::fs::read_dir(store.tmp_dir()).unwrap().next().is_none());
    }

    #[test]
    fn crashed_writer_leaves_only_tmp_garbage() {
        let (_dir, store) = store();
        let mut w = PackWriter::new(&store).unwrap();
        w.add(ChunkId::of(b"abc"), Codec::Raw, 3, b"abc").unwrap();
        std::mem::forget(w);
        for kind in Kind::ALL {
            assert!(store.list(kind).unwrap().is_empty());
        }
        assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 1);
    }

    /// Records the order in which objects become visible.
    struct Recording {
        inner: LocalDir,
        log: Mutex<Vec<(Kind, String)>>,
    }

    impl Backend for Recording {
        fn put(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), BackendError> {
            // The pack must already be durable when its .idx is written.
            if kind == Kind::Index {
                assert!(self.inner.exists(Kind::Pack, name).unwrap());
            }
            self.inner.put(kind, name, data)?;
            self.log.lock().unwrap().push((kind, name.to_string()));
            Ok(())
        }
        fn put_file(&self, kind: Kind, name: &str, tmp: TempObject) -> Result<(), BackendError> {
            assert!(!self.inner.exists(Kind::Index, name).unwrap());
            self.inner.put_file(kind, name, tmp)?;
            self.log.lock().unwrap().push((kind, name.to_string()));
            Ok(())
        }
        fn create_temp(&self) -> Result<TempObject, BackendError> {
            self.inner.create_temp()
        }
        fn get(&self, kind: Kind, name: &str) -> Result<Vec<u8>, BackendError> {
            self.inner.get(kind, name)
        }
        fn get_range(
            &self,
            kind: Kind,
            name: &str,
            offset: u64,
            len: u64,
        ) -> Result<Vec<u8>, BackendError> {
            self.inner.get_range(kind, name, offset, len)
        }
        fn exists(&self, kind: Kind, name: &str) -> Result<bool, BackendError> {
            self.inner.exists(kind, name)
        }
        fn list(&self, kind: Kind) -> Result<Vec<String>, BackendError> {
            self.inner.list(kind)
        }
        fn delete(&self, kind: Kind, name: &str) -> Result<(), BackendError> {
            self.inner.delete(kind, name)
        }
        fn size(&self, kind: Kind, name: &str) -> Result<u64, BackendError> {
            self.inner.size(kind, name)
        }
        fn location(&self, kind: Kind, name: &str) -> String {
            self.inner.location(kind, name)
        }
        fn read_ref(&self, name: &crate::name::Name) -> Result<Option<String>, BackendError> {
            self.inner.read_ref(name)
        }
        fn write_ref(&self, name: &crate::name::Name, value: &str) -> Result<(), BackendError> {
            self.inner.write_ref(name, value)
        }
        fn delete_ref(&self, name: &crate::name::Name) -> Result<bool, BackendError> {
            self.inner.delete_ref(name)
        }
        fn list_refs(&self) -> Result<Vec<crate::name::Name>, BackendError> {
            self.inner.list_refs()
        }
        fn ref_location(&self, name: &crate::name::Name) -> String {
            self.inner.ref_location(name)
        }
        fn ref_modified_ms(&self, name: &crate::name::Name) -> Result<Option<u64>, BackendError> {
            self.inner.ref_modified_ms(name)
        }
    }

    #[test]
    fn idx_is_written_after_the_pack() {
        let (_dir, store) = store();
        let rec = Recording {
            inner: store,
            log: Mutex::new(Vec::new()),
        };
        let (id, _) = write_pack(&rec, &chunks(3, 1));
        let name = id.to_hex();
        assert_eq!(
            *rec.log.lock().unwrap(),
            [(Kind::Pack, name.clone()), (Kind::Index, name)]
        );
    }

    #[test]
    fn concurrent_writers_make_distinct_packs() {
        let (_dir, store) = store();
        // Same chunks in both: only the nonce tells the packs apart.
        let chunks = chunks(20, 5);
        let ids: Vec<PackId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| s.spawn(|| write_pack(&store, &chunks).0))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_ne!(ids[0], ids[1]);
        for id in &ids {
            let index = verify_pack(&store, id).unwrap();
            assert_eq!(index.entries.len(), 20);
        }
        assert_eq!(store.list(Kind::Pack).unwrap().len(), 2);
        assert_eq!(store.list(Kind::Index).unwrap().len(), 2);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let (pack, idx) = small_pack();
        for len in 0..pack.len() {
            assert!(read_pack_index(&pack[..len]).is_err(), "pack cut at {len}");
        }
        for len in 0..idx.len() {
            assert!(decode_idx(&idx[..len]).is_err(), "idx cut at {len}");
        }
        // An extra byte at the end is rejected too.
        let mut longer = idx.clone();
        longer.push(0);
        assert!(decode_idx(&longer).is_err());
    }

    #[test]
    fn every_bit_flip_in_idx_and_footer_is_rejected() {
        let (pack, idx) = small_pack();
        for i in 0..idx.len() {
            let mut bad = idx.clone();
            bad[i] ^= 0x10;
            assert!(decode_idx(&bad).is_err(), "idx byte {i}");
        }
        let footer_start = read_pack_index(&pack).unwrap().data_end as usize;
        for i in (0..HEADER_LEN as usize).chain(footer_start..pack.len()) {
            let mut bad = pack.clone();
            bad[i] ^= 0x01;
            assert!(read_pack_index(&bad).is_err(), "pack byte {i}");
        }
    }

    #[test]
    fn decoders_reject_bad_structure() {
        let (_, idx) = small_pack();
        let mut index = decode_idx(&idx).unwrap();
        // Unsupported version.
        let mut bad = idx.clone();
        bad[8] = 2;
        let n = bad.len();
        let sum = blake3::hash(&bad[..n - 32]);
        bad[n - 32..].copy_from_slice(sum.as_bytes());
        assert_eq!(decode_idx(&bad), Err(FormatError::Version { found: 2 }));
        // Bad magic.
        assert!(matches!(
            decode_idx(b"NOTFERRY\x01\0\0\0"),
            Err(FormatError::BadMagic { .. })
        ));
        // Entries past data_end, overlapping, unknown codec: re-encode with a
        // valid checksum and id so only the entry check can catch them.
        let reencode = |index: &PackIndex| {
            let mut index = index.clone();
            index.pack = pack_id(&encode_entries(&index.entries), &index.nonce);
            decode_idx(&encode_idx(&index))
        };
        assert!(reencode(&index).is_ok());
        let mut past_end = index.clone();
        past_end.data_end -= 1;
        assert!(matches!(
            reencode(&past_end),
            Err(FormatError::EntryRange { .. })
        ));
        let mut overlap = index.clone();
        overlap.entries[2].offset -= 1;
        assert!(matches!(
            reencode(&overlap),
            Err(FormatError::EntryRange { index: 2, .. })
        ));
        let mut raw_len = index.clone();
        let raw = raw_len
            .entries
            .iter()
            .position(|e| e.codec == Codec::Raw)
            .unwrap();
        raw_len.entries[raw].raw_len += 1;
        assert!(matches!(
            reencode(&raw_len),
            Err(FormatError::RawLength { .. })
        ));
        // A wrong pack id with a valid checksum.
        index.pack = PackId([7; 32]);
        assert!(matches!(
            decode_idx(&encode_idx(&index)),
            Err(FormatError::PackId { .. })
        ));
        // An entry count that would need a huge allocation.
        let mut huge = encode_idx(&decode_idx(&idx).unwrap());
        huge[68..76].copy_from_slice(&u64::MAX.to_le_bytes());
        let n = huge.len();
        let sum = blake3::hash(&huge[..n - 32]);
        huge[n - 32..].copy_from_slice(sum.as_bytes());
        assert!(matches!(
            decode_idx(&huge),
            Err(FormatError::BadLength { .. })
        ));
    }

    #[test]
    fn huge_table_length_in_trailer_is_rejected() {
        let (pack, _) = small_pack();
        let mut bad = pack.clone();
        let at = bad.len() - TRAILER_LEN as usize;
        bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_pack_index(&bad),
            Err(FormatError::BadLength { .. })
        ));
    }

    #[test]
    fn verify_pack_finds_damage_on_disk() {
        let (_dir, store) = store();
        let (a, _) = write_pack(&store, &chunks(4, 1));
        let (b, _) = write_pack(&store, &chunks(6, 2));
        let (an, bn) = (a.to_hex(), b.to_hex());

        // An idx from another pack under this pack's name.
        let b_idx = store.get(Kind::Index, &bn).unwrap();
        store.put(Kind::Index, &an, &b_idx).unwrap();
        let err = verify_pack(&store, &a).unwrap_err();
        assert!(matches!(err, PackError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{an}.idx")), "{err}");
        // rebuild_idx repairs it.
        rebuild_idx(&store, &a).unwrap();
        verify_pack(&store, &a).unwrap();

        // A truncated pack.
        let pack = store.get(Kind::Pack, &bn).unwrap();
        store.put(Kind::Pack, &bn, &pack[..pack.len() - 1]).unwrap();
        let err = verify_pack(&store, &b).unwrap_err();
        assert!(matches!(err, PackError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{bn}.pack")), "{err}");

        // A missing pack.
        store.delete(Kind::Pack, &bn).unwrap();
        let err = verify_pack(&store, &b).unwrap_err();
        assert!(
            matches!(err, PackError::Backend(ref e) if e.is_not_found()),
            "{err}"
        );
    }

    #[test]
    fn verify_chunks_finds_damaged_blobs() {
        let (_dir, store) = store();
        let (id, entries) = write_pack(&store, &chunks(7, 9));
        let name = id.to_hex();
        let mut pack = store.get(Kind::Pack, &name).unwrap();
        // Damage the blob of entry 1 (raw) and entry 3 (zstd).
        for i in [1, 3] {
            let e = entries[i];
            pack[e.offset as usize + e.stored_len as usize / 2] ^= 0xff;
        }
        store.put(Kind::Pack, &name, &pack).unwrap();
        let index = verify_pack(&store, &id).unwrap();
        let problems = verify_chunks(&store, &index).unwrap();
        let ids: Vec<ChunkId> = problems.iter().map(|p| p.id).collect();
        assert_eq!(ids, [entries[1].id, entries[3].id]);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(random_nonce(), random_nonce());
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_idx(&bytes);
            let _ = read_pack_index(&bytes);
            let _ = decode_trailer(&bytes, bytes.len() as u64);
            let _ = decode_entries(&bytes, bytes.len() as u64);
        }

        #[test]
        fn decoders_never_panic_on_damaged_files(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let (pack, idx) = small_pack();
            for (original, is_idx) in [(pack, false), (idx, true)] {
                let mut bad = original.clone();
                for &(at, byte) in &flips {
                    let n = bad.len();
                    bad[at % n] = byte;
                }
                let pack_result = read_pack_index(&bad);
                let idx_result = decode_idx(&bad);
                // The idx is fully checksummed: any change is caught.
                if is_idx && bad != original {
                    prop_assert!(idx_result.is_err());
                }
                let _ = pack_result;
                bad.truncate(cut % (bad.len() + 1));
                let _ = read_pack_index(&bad);
                let _ = decode_idx(&bad);
            }
        }
    }
}
