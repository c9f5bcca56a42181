//! Tar-aware stream splitting.
//!
//! Image layers are tar streams, and a rebuild rewrites every tar header
//! (mtimes, ownership) while the file contents stay the same. [`TarSplitter`]
//! classifies a byte stream into two logical streams — [`Part::Meta`] (tar
//! headers, pax and GNU long-name records, padding, end-of-archive blocks) and
//! [`Part::Content`] (file data, and anything that is not tar) — so that each
//! can be chunked on its own and unchanged file contents deduplicate even
//! when the headers around them change.
//!
//! The split never changes bytes: concatenating every run in the order it was
//! emitted gives back the input exactly, for any input (tar or not, complete
//! or truncated). The splitter is push-based and holds back at most one
//! 512-byte block, so memory stays flat for any input size; the only other
//! buffering is the small outer-archive files kept for image detection (see
//! [`Collected`]).
//!
//! Regular files whose data is itself an uncompressed tar (the layers inside a
//! `docker save` archive) are split recursively, up to [`MAX_DEPTH`] levels
//! deep.
//!
//! ```
//! use store::tarsplit::{Part, TarSplitter};
//!
//! let input = b"not a tar at all";
//! let mut splitter = TarSplitter::new();
//! let mut out = Vec::new();
//! let mut sink = |part: Part, bytes: &[u8]| out.push((part, bytes.to_vec()));
//! splitter.feed(input, &mut sink);
//! splitter.finish(&mut sink);
//! let replay: Vec<u8> = out.iter().flat_map(|(_, b)| b.iter().copied()).collect();
//! assert_eq!(replay, input);
//! assert!(out.iter().all(|(part, _)| *part == Part::Content));
//! ```

use std::mem;

/// Which logical stream a run of bytes belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// Tar structure: headers, extension records, padding, end-of-archive blocks.
    Meta,
    /// File data, and every byte that does not parse as tar.
    Content,
}

/// How deep nested tars are split: the outer archive is depth 0, the layers
/// inside a docker archive are depth 1.
pub const MAX_DEPTH: usize = 3;

/// Outer-archive files up to this size whose names look like image metadata
/// are kept in [`Collected::files`].
pub const SMALL_FILE_MAX: u64 = 4 << 20;

/// Total bytes kept in [`Collected::files`].
pub const CAPTURE_TOTAL_MAX: u64 = 64 << 20;

/// Most entries kept in [`Collected::spans`].
pub const SPANS_MAX: usize = 1_000_000;

const BLOCK: usize = 512;
const BLOCK_U64: u64 = BLOCK as u64;
/// Largest pax / GNU long-name record that is parsed (larger ones are still
/// classified as Meta, just not interpreted).
const EXT_MAX: u64 = 1 << 20;

/// A small regular file of the outer archive, kept whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedFile {
    /// Entry name, with any leading `./` removed.
    pub name: String,
    /// Offset of the file's data in the input stream.
    pub offset: u64,
    /// The file's bytes.
    pub data: Vec<u8>,
}

/// Where a regular file of the outer archive lies in the input stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpan {
    /// Entry name, with any leading `./` removed.
    pub name: String,
    /// Offset of the file's data in the input stream.
    pub offset: u64,
    /// Size of the file's data as its header states it.
    pub size: u64,
    /// Whether the data was recognised as a nested tar and split recursively.
    pub nested_tar: bool,
}

/// What [`TarSplitter`] learned about the outer (depth 0) archive: enough to
/// detect a container image and locate its parts, and nothing unbounded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Whether the input began as a tar archive (its first non-zero block was
    /// a valid tar header).
    pub is_tar: bool,
    /// Total input length in bytes.
    pub input_len: u64,
    /// Entries (headers other than extension records) in the outer archive.
    pub entries: u64,
    /// Entries inside nested tars, at any depth.
    pub inner_entries: u64,
    /// Nested tars recognised and split, at any depth.
    pub nested_tars: u64,
    /// Small regular files of the outer archive (at most [`SMALL_FILE_MAX`]
    /// each, [`CAPTURE_TOTAL_MAX`] in all) named `manifest.json`,
    /// `index.json`, `oci-layout`, `repositories`, `*.json` or `blobs/*`,
    /// unless recognised as nested tars.
    pub files: Vec<CapturedFile>,
    /// Regular files of the outer archive that are larger than
    /// [`SMALL_FILE_MAX`], recognised as nested tars, or named `*.tar`
    /// (at most [`SPANS_MAX`]).
    pub spans: Vec<FileSpan>,
    /// Whether a cap was hit and some file or span was left out.
    pub incomplete: bool,
}

impl Collected {
    /// The captured bytes of the outer-archive file `name` (leading `./` ignored).
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        let name = normalize_name(name);
        self.files
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.data.as_slice())
    }

    /// Offset and size of the outer-archive file `name`, if it was captured or
    /// is listed in [`Collected::spans`].
    pub fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let name = normalize_name(name);
        if let Some(s) = self.spans.iter().find(|s| s.name == name) {
            return Some((s.offset, s.size));
        }
        self.files
            .iter()
            .find(|f| f.name == name)
            .map(|f| (f.offset, f.data.len() as u64))
    }
}

fn normalize_name(mut name: &str) -> &str {
    while let Some(rest) = name.strip_prefix("./") {
        name = rest.trim_start_matches('/');
    }
    name
}

/// What an extension record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExtKind {
    /// pax per-file header ('x', and Solaris 'X').
    Pax,
    /// pax global header ('g'); not interpreted.
    Global,
    /// GNU long name ('L').
    LongName,
    /// GNU long link name ('K'); not interpreted.
    LongLink,
}

/// The entry whose data comes next.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Bytes of data following the header.
    size: u64,
    /// Regular file (typeflag '0', '\0' or '7').
    regular: bool,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Expecting a header block (held back in `Level::buf`).
    Header,
    /// Expecting a GNU sparse extension block before `entry`'s data.
    SparseExt { entry: Entry },
    /// Inside an extension record's data (Meta).
    Ext {
        kind: ExtKind,
        remaining: u64,
        pad: u64,
    },
    /// Holding back the first block of a regular file to see if it is a tar.
    Sniff { entry: Entry },
    /// Inside file data (Content).
    Data { remaining: u64, pad: u64 },
    /// Inside file data that the next level parses as a tar.
    Nested { remaining: u64, pad: u64 },
    /// Inside the padding after data (Meta).
    Pad { remaining: u64 },
    /// Not (or no longer) tar: everything is Content.
    NotTar,
}

/// Overrides that extension records set for the next entry.
#[derive(Default, Debug)]
struct PendingExt {
    size: Option<u64>,
    path: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
}

/// One tar parser: the outer archive, or a nested tar inside an entry's data.
#[derive(Debug)]
struct Level {
    depth: usize,
    state: State,
    /// Held-back bytes of a header, sparse extension or sniffed block.
    buf: Vec<u8>,
    /// Data of the extension record being read (up to `EXT_MAX`).
    ext: Vec<u8>,
    /// The extension record was too large to interpret.
    ext_overflow: bool,
    pending: PendingExt,
}

impl Level {
    fn new(depth: usize) -> Self {
        Level {
            depth,
            state: State::Header,
            buf: Vec::with_capacity(BLOCK),
            ext: Vec::new(),
            ext_overflow: false,
            pending: PendingExt::default(),
        }
    }
}

/// The outer-archive entry whose data is being read.
#[derive(Debug)]
struct Current {
    name: String,
    offset: u64,
    size: u64,
    capture: Option<Vec<u8>>,
}

/// Streaming tar-aware splitter. See the [module docs](self).
#[derive(Debug)]
pub struct TarSplitter {
    /// Parsers, outermost first; only the last one can hold bytes back.
    levels: Vec<Level>,
    /// Bytes fed so far.
    pos: u64,
    /// The outer-archive regular file being read.
    current: Option<Current>,
    /// Bytes reserved for captured files.
    captured: u64,
    collected: Collected,
}

impl Default for TarSplitter {
    fn default() -> Self {
        Self::new()
    }
}

impl TarSplitter {
    /// A splitter at the start of its input.
    pub fn new() -> Self {
        TarSplitter {
            levels: vec![Level::new(0)],
            pos: 0,
            current: None,
            captured: 0,
            collected: Collected::default(),
        }
    }

    /// Classify the next bytes of the input. Calls `sink(part, bytes)` for
    /// each run, in input order; adjacent runs of the same part may or may not
    /// be merged (the caller merges). Up to one block may be held back until
    /// the next call or [`TarSplitter::finish`].
    pub fn feed(&mut self, data: &[u8], sink: &mut dyn FnMut(Part, &[u8])) {
        self.feed_level(0, data, self.pos, sink);
        self.pos += data.len() as u64;
    }

    /// End of input: flush anything held back.
    pub fn finish(&mut self, sink: &mut dyn FnMut(Part, &[u8])) {
        while let Some(level) = self.levels.pop() {
            flush_level(level, sink);
        }
        self.levels.push(Level::new(0));
        self.levels[0].state = State::NotTar;
        // A file cut short by the end of input is neither kept nor located:
        // its span would point past the end of the input.
        if let Some(cur) = self.current.take() {
            let last = self.collected.spans.last();
            if last.is_some_and(|s| s.offset == cur.offset && s.name == cur.name) {
                self.collected.spans.pop();
            }
        }
        self.collected.input_len = self.pos;
    }

    /// What was learned about the outer archive; complete after
    /// [`TarSplitter::finish`].
    pub fn into_collected(self) -> Collected {
        let mut c = self.collected;
        c.input_len = self.pos;
        c
    }

    /// Splits a whole input held in memory, fed in pieces of the given
    /// sizes (cycled; the whole input at once if none), into runs with
    /// adjacent runs of the same part merged, as the stash pipeline sees
    /// them; and what was collected. For tests and tools: the stash itself
    /// feeds a stream.
    pub fn split_all(input: &[u8], feed_sizes: &[usize]) -> (Vec<(Part, Vec<u8>)>, Collected) {
        let mut runs: Vec<(Part, Vec<u8>)> = Vec::new();
        let mut sink = |part: Part, bytes: &[u8]| {
            debug_assert!(!bytes.is_empty(), "the splitter emitted an empty run");
            match runs.last_mut() {
                Some((p, buf)) if *p == part => buf.extend_from_slice(bytes),
                _ => runs.push((part, bytes.to_vec())),
            }
        };
        let mut s = TarSplitter::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = feed_sizes
                .get(i % feed_sizes.len().max(1))
                .copied()
                .unwrap_or(rest.len())
                .clamp(1, rest.len());
            s.feed(&rest[..n], &mut sink);
            rest = &rest[n..];
            i += 1;
        }
        s.finish(&mut sink);
        (runs, s.into_collected())
    }

    fn feed_level(
        &mut self,
        idx: usize,
        mut data: &[u8],
        mut base: u64,
        sink: &mut dyn FnMut(Part, &[u8]),
    ) {
        while !data.is_empty() {
            let n = self.step(idx, data, base, sink);
            debug_assert!(n > 0 && n <= data.len());
            data = &data[n..];
            base += n as u64;
        }
    }

    /// Consume between 1 and `data.len()` bytes at level `idx` (which must be
    /// the innermost level unless it is in the `Nested` state). `base` is the
    /// input offset of `data[0]`, meaningful for level 0 only.
    fn step(
        &mut self,
        idx: usize,
        data: &[u8],
        base: u64,
        sink: &mut dyn FnMut(Part, &[u8]),
    ) -> usize {
        match self.levels[idx].state {
            State::NotTar => {
                sink(Part::Content, data);
                data.len()
            }
            State::Header | State::SparseExt { .. } => {
                let level = &mut self.levels[idx];
                let take = (BLOCK - level.buf.len()).min(data.len());
                level.buf.extend_from_slice(&data[..take]);
                if level.buf.len() == BLOCK {
                    let block = mem::take(&mut level.buf);
                    self.on_block(idx, &block, base + take as u64, sink);
                    let mut block = block;
                    block.clear();
                    self.levels[idx].buf = block;
                }
                take
            }
            State::Ext {
                kind,
                remaining,
                pad,
            } => {
                let take = clamp(remaining, data.len());
                let chunk = &data[..take];
                sink(Part::Meta, chunk);
                let level = &mut self.levels[idx];
                let wanted = match kind {
                    ExtKind::Pax => true,
                    ExtKind::LongName => level.depth == 0,
                    ExtKind::Global | ExtKind::LongLink => false,
                };
                if wanted && !level.ext_overflow {
                    level.ext.extend_from_slice(chunk);
                }
                let remaining = remaining - take as u64;
                if remaining == 0 {
                    level.state = after_data(pad);
                    self.end_ext(idx, kind);
                } else {
                    level.state = State::Ext {
                        kind,
                        remaining,
                        pad,
                    };
                }
                take
            }
            State::Data { remaining, pad } => {
                let take = clamp(remaining, data.len());
                let chunk = &data[..take];
                sink(Part::Content, chunk);
                if idx == 0 {
                    self.capture(chunk);
                }
                let remaining = remaining - take as u64;
                if remaining == 0 {
                    self.levels[idx].state = after_data(pad);
                    if idx == 0 {
                        self.end_current();
                    }
                } else {
                    self.levels[idx].state = State::Data { remaining, pad };
                }
                take
            }
            State::Sniff { entry } => {
                let level = &mut self.levels[idx];
                let take = (BLOCK - level.buf.len()).min(data.len());
                level.buf.extend_from_slice(&data[..take]);
                if level.buf.len() == BLOCK {
                    let block = mem::take(&mut level.buf);
                    self.on_sniffed(idx, entry, &block, sink);
                    let mut block = block;
                    block.clear();
                    self.levels[idx].buf = block;
                }
                take
            }
            State::Nested { remaining, pad } => {
                let take = clamp(remaining, data.len());
                self.feed_level(idx + 1, &data[..take], 0, sink);
                let remaining = remaining - take as u64;
                if remaining == 0 {
                    self.end_nested(idx, pad, sink);
                } else {
                    self.levels[idx].state = State::Nested { remaining, pad };
                }
                take
            }
            State::Pad { remaining } => {
                let take = clamp(remaining, data.len());
                sink(Part::Meta, &data[..take]);
                let remaining = remaining - take as u64;
                self.levels[idx].state = if remaining == 0 {
                    State::Header
                } else {
                    State::Pad { remaining }
                };
                take
            }
        }
    }

    /// A whole block where a header (or GNU sparse extension) was expected.
    /// `data_offset` is the input offset just past the block (level 0 only).
    fn on_block(
        &mut self,
        idx: usize,
        block: &[u8],
        data_offset: u64,
        sink: &mut dyn FnMut(Part, &[u8]),
    ) {
        if let State::SparseExt { entry } = self.levels[idx].state {
            sink(Part::Meta, block);
            if block[504] == 0 {
                self.start_data(idx, entry, data_offset);
            }
            return;
        }
        if block.iter().all(|&b| b == 0) {
            // End-of-archive marker, or record padding after it.
            sink(Part::Meta, block);
            return;
        }
        let Some(header) = parse_header(block) else {
            sink(Part::Content, block);
            self.levels[idx].state = State::NotTar;
            return;
        };
        sink(Part::Meta, block);
        if idx == 0 {
            self.collected.is_tar = true;
        }
        let pad = padding(header.size);
        let ext = match header.typeflag {
            b'x' | b'X' => Some(ExtKind::Pax),
            b'g' => Some(ExtKind::Global),
            b'L' => Some(ExtKind::LongName),
            b'K' => Some(ExtKind::LongLink),
            _ => None,
        };
        let level = &mut self.levels[idx];
        if let Some(kind) = ext {
            level.ext.clear();
            level.ext_overflow = header.size > EXT_MAX;
            if header.size == 0 {
                level.state = State::Header;
                self.end_ext(idx, kind);
            } else {
                level.state = State::Ext {
                    kind,
                    remaining: header.size,
                    pad,
                };
            }
            return;
        }

        // A real entry: apply and clear the pending extension records.
        let pending = mem::take(&mut level.pending);
        let size = pending.size.unwrap_or(header.size);
        let regular = matches!(header.typeflag, b'0' | 0 | b'7');
        // Links, devices, directories and fifos carry no data whatever their
        // size field says (as GNU tar, Go and Python read them).
        let size = if matches!(header.typeflag, b'1'..=b'6') {
            0
        } else {
            size
        };
        let entry = Entry { size, regular };
        if idx == 0 {
            self.collected.entries += 1;
            if regular {
                let raw = pending
                    .path
                    .or(pending.long_name)
                    .unwrap_or_else(|| header_name(block));
                let name = normalize_name(&String::from_utf8_lossy(&raw)).to_owned();
                self.current = Some(Current {
                    name,
                    offset: 0,
                    size,
                    capture: None,
                });
            }
        } else {
            self.collected.inner_entries += 1;
        }
        let sparse_ext = header.typeflag == b'S' && header.gnu && block[482] != 0;
        if sparse_ext {
            self.levels[idx].state = State::SparseExt { entry };
        } else {
            self.start_data(idx, entry, data_offset);
        }
    }

    /// The header (and any sparse extension blocks) of `entry` are done; its
    /// data starts at input offset `data_offset` (level 0 only).
    fn start_data(&mut self, idx: usize, entry: Entry, data_offset: u64) {
        let depth = self.levels[idx].depth;
        let pad = padding(entry.size);
        if idx == 0 {
            if let Some(cur) = &mut self.current {
                cur.offset = data_offset;
                if capture_eligible(&cur.name) && cur.size <= SMALL_FILE_MAX {
                    if self.captured + cur.size <= CAPTURE_TOTAL_MAX {
                        self.captured += cur.size;
                        cur.capture = Some(Vec::with_capacity(cur.size as usize));
                    } else {
                        self.collected.incomplete = true;
                    }
                }
            }
        }
        let state = if entry.size == 0 {
            if idx == 0 {
                self.end_current();
            }
            State::Header
        } else if entry.regular && entry.size >= BLOCK_U64 && depth < MAX_DEPTH {
            State::Sniff { entry }
        } else {
            if idx == 0 {
                self.record_span(false);
            }
            State::Data {
                remaining: entry.size,
                pad,
            }
        };
        self.levels[idx].state = state;
    }

    /// The first block of a regular file's data is in: split the file as a
    /// nested tar if it starts with a valid header, else pass it on as Content.
    fn on_sniffed(
        &mut self,
        idx: usize,
        entry: Entry,
        block: &[u8],
        sink: &mut dyn FnMut(Part, &[u8]),
    ) {
        let pad = padding(entry.size);
        let remaining = entry.size - BLOCK_U64;
        if parse_header(block).is_some() {
            self.collected.nested_tars += 1;
            if idx == 0 {
                // A nested tar is located through `spans`, not kept whole.
                if let Some(cur) = &mut self.current {
                    if cur.capture.take().is_some() {
                        self.captured -= cur.size;
                    }
                }
                self.record_span(true);
            }
            let depth = self.levels[idx].depth;
            self.levels[idx].state = State::Nested { remaining, pad };
            self.levels.push(Level::new(depth + 1));
            self.feed_level(idx + 1, block, 0, sink);
            if remaining == 0 {
                self.end_nested(idx, pad, sink);
            }
        } else {
            sink(Part::Content, block);
            if idx == 0 {
                self.capture(block);
                self.record_span(false);
            }
            if remaining == 0 {
                self.levels[idx].state = after_data(pad);
                if idx == 0 {
                    self.end_current();
                }
            } else {
                self.levels[idx].state = State::Data { remaining, pad };
            }
        }
    }

    /// The data of the nested tar parsed by level `idx + 1` has ended.
    fn end_nested(&mut self, idx: usize, pad: u64, sink: &mut dyn FnMut(Part, &[u8])) {
        while self.levels.len() > idx + 1 {
            if let Some(level) = self.levels.pop() {
                flush_level(level, sink);
            }
        }
        self.levels[idx].state = after_data(pad);
        if idx == 0 {
            self.end_current();
        }
    }

    /// An extension record's data is complete: remember what it says.
    fn end_ext(&mut self, idx: usize, kind: ExtKind) {
        let level = &mut self.levels[idx];
        let ext = mem::take(&mut level.ext);
        if level.ext_overflow {
            return;
        }
        match kind {
            ExtKind::Pax => {
                for (key, value) in pax_records(&ext) {
                    match key {
                        b"size" => {
                            level.pending.size = std::str::from_utf8(value)
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok());
                        }
                        b"path" if level.depth == 0 => level.pending.path = Some(value.to_vec()),
                        _ => {}
                    }
                }
            }
            ExtKind::LongName if level.depth == 0 => {
                let end = ext.iter().position(|&b| b == 0).unwrap_or(ext.len());
                level.pending.long_name = Some(ext[..end].to_vec());
            }
            _ => {}
        }
    }

    /// Keep `chunk` if the current outer-archive file is being captured.
    fn capture(&mut self, chunk: &[u8]) {
        if let Some(buf) = self.current.as_mut().and_then(|c| c.capture.as_mut()) {
            buf.extend_from_slice(chunk);
        }
    }

    /// List the current outer-archive file in `spans` if it qualifies.
    fn record_span(&mut self, nested_tar: bool) {
        let Some(cur) = &self.current else { return };
        if !(nested_tar || cur.size > SMALL_FILE_MAX || cur.name.ends_with(".tar")) {
            return;
        }
        if self.collected.spans.len() >= SPANS_MAX {
            self.collected.incomplete = true;
            return;
        }
        self.collected.spans.push(FileSpan {
            name: cur.name.clone(),
            offset: cur.offset,
            size: cur.size,
            nested_tar,
        });
    }

    /// The current outer-archive file's data is complete.
    fn end_current(&mut self) {
        if let Some(cur) = self.current.take() {
            if let Some(data) = cur.capture {
                self.collected.files.push(CapturedFile {
                    name: cur.name,
                    offset: cur.offset,
                    data,
                });
            }
        }
    }
}

/// Emit whatever `level` holds back at the end of its stream.
fn flush_level(level: Level, sink: &mut dyn FnMut(Part, &[u8])) {
    if level.buf.is_empty() {
        return;
    }
    let part = match level.state {
        State::Header | State::SparseExt { .. } if level.buf.iter().all(|&b| b == 0) => Part::Meta,
        State::SparseExt { .. } => Part::Meta,
        _ => Part::Content,
    };
    sink(part, &level.buf);
}

fn after_data(pad: u64) -> State {
    if pad == 0 {
        State::Header
    } else {
        State::Pad { remaining: pad }
    }
}

fn clamp(remaining: u64, len: usize) -> usize {
    usize::try_from(remaining).map_or(len, |r| r.min(len))
}

fn padding(size: u64) -> u64 {
    (BLOCK_U64 - size % BLOCK_U64) % BLOCK_U64
}

fn capture_eligible(name: &str) -> bool {
    matches!(
        name,
        "manifest.json" | "index.json" | "oci-layout" | "repositories"
    ) || name.ends_with(".json")
        || name.starts_with("blobs/")
}

/// The fields of a valid header block that the splitter needs.
struct Header {
    typeflag: u8,
    size: u64,
    /// GNU format (`ustar  \0` magic).
    gnu: bool,
}

/// Parse a 512-byte block as a tar header; `None` unless its checksum is
/// valid and its size field parses.
fn parse_header(block: &[u8]) -> Option<Header> {
    if block.len() != BLOCK {
        return None;
    }
    let stored = parse_octal(&block[148..156])?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
        return None;
    }
    let size = parse_numeric(&block[124..136])?;
    Some(Header {
        typeflag: block[156],
        size,
        gnu: &block[257..265] == b"ustar  \0",
    })
}

/// The name stored in the header itself (with the ustar prefix).
fn header_name(block: &[u8]) -> Vec<u8> {
    let name = until_nul(&block[0..100]);
    if &block[257..263] == b"ustar\0" {
        let prefix = until_nul(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(name);
            return full;
        }
    }
    name.to_vec()
}

fn until_nul(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// A numeric header field: octal text, or base-256 when the high bit of the
/// first byte is set. Negative and overflowing values are rejected.
fn parse_numeric(field: &[u8]) -> Option<u64> {
    let first = *field.first()?;
    if first & 0x80 == 0 {
        // Some writers leave a zero size blank.
        if field.iter().all(|&b| b == 0 || b == b' ') {
            return Some(0);
        }
        return parse_octal(field);
    }
    if first & 0x40 != 0 {
        return None; // negative
    }
    let mut value = u64::from(first & 0x3f);
    for &b in &field[1..] {
        value = value.checked_mul(256)?.checked_add(u64::from(b))?;
    }
    Some(value)
}

/// Octal text: optional leading spaces, at least one digit, then NUL or
/// space (or the end of the field).
fn parse_octal(field: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i < field.len() && field[i] == b' ' {
        i += 1;
    }
    let start = i;
    let mut value: u64 = 0;
    while i < field.len() && (b'0'..=b'7').contains(&field[i]) {
        value = value
            .checked_mul(8)?
            .checked_add(u64::from(field[i] - b'0'))?;
        i += 1;
    }
    if i == start {
        return None;
    }
    match field.get(i) {
        None | Some(0) | Some(b' ') => Some(value),
        _ => None,
    }
}

/// The `key=value` records of a pax extended header; stops at the first
/// malformed record.
fn pax_records(mut data: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let Some(space) = data.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            break;
        }
        let record = &data[space + 1..len - 1];
        if let Some(eq) = record.iter().position(|&b| b == b'=') {
            out.push((&record[..eq], &record[eq + 1..]));
        }
        data = &data[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(input: &[u8]) -> (Vec<(Part, Vec<u8>)>, Collected) {
        TarSplitter::split_all(input, &[])
    }

    fn concat(runs: &[(Part, Vec<u8>)]) -> Vec<u8> {
        runs.iter().flat_map(|(_, b)| b.iter().copied()).collect()
    }

    fn stream(runs: &[(Part, Vec<u8>)], part: Part) -> Vec<u8> {
        runs.iter()
            .filter(|(p, _)| *p == part)
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }

    #[derive(Clone, Debug)]
    enum Item {
        File {
            name: String,
            data: Vec<u8>,
            mtime: u64,
        },
        Dir(String),
        Symlink(String, String),
        /// A file whose name is carried in a pax 'x' record.
        PaxFile(String, Vec<u8>),
        Nested(String, Vec<Item>),
    }

    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = 3 + key.len() + value.len(); // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        let mut rec = format!("{len} {key}=").into_bytes();
        rec.extend_from_slice(value);
        rec.push(b'\n');
        rec
    }

    fn build(items: &[Item], mtime_shift: u64) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for item in items {
            match item {
                Item::File { name, data, mtime } => {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    h.set_mtime(mtime + mtime_shift);
                    b.append_data(&mut h, name, data.as_slice()).unwrap();
                }
                Item::Dir(name) => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_mtime(7 + mtime_shift);
                    b.append_data(&mut h, format!("{name}/"), std::io::empty())
                        .unwrap();
                }
                Item::Symlink(name, target) => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mtime(9 + mtime_shift);
                    b.append_link(&mut h, name, target).unwrap();
                }
                Item::PaxFile(name, data) => {
                    let rec = pax_record("path", name.as_bytes());
                    let mut x = tar::Header::new_ustar();
                    x.set_entry_type(tar::EntryType::XHeader);
                    x.set_path("PaxHeaders/x").unwrap();
                    x.set_size(rec.len() as u64);
                    x.set_mtime(mtime_shift);
                    x.set_cksum();
                    b.append(&x, rec.as_slice()).unwrap();
                    let mut h = tar::Header::new_ustar();
                    h.set_path("short-name").unwrap();
                    h.set_size(data.len() as u64);
                    h.set_mtime(3 + mtime_shift);
                    h.set_cksum();
                    b.append(&h, data.as_slice()).unwrap();
                }
                Item::Nested(name, inner) => {
                    let data = build(inner, mtime_shift);
                    let mut h = tar::Header::new_gnu();
                    h.set_size(data.len() as u64);
                    h.set_mtime(5 + mtime_shift);
                    b.append_data(&mut h, name, data.as_slice()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// The file contents a correct split puts in Content, in order.
    fn expected_content(items: &[Item], depth: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for item in items {
            match item {
                Item::File { data, .. } | Item::PaxFile(_, data) => out.extend_from_slice(data),
                Item::Nested(_, inner) if depth < MAX_DEPTH && !inner.is_empty() => {
                    out.extend(expected_content(inner, depth + 1))
                }
                Item::Nested(_, inner) => out.extend(build(inner, 0)),
                Item::Dir(_) | Item::Symlink(..) => {}
            }
        }
        out
    }

    fn arb_name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,12}",
            "[a-z]{1,12}(/[a-z][a-z0-9._-]{0,39}){2,6}", // often > 100 bytes
        ]
    }

    fn arb_data() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 0..2000),
            (0usize..3).prop_map(|k| vec![0xa5; 511 + k]),
        ]
    }

    fn arb_items(depth: u32) -> impl Strategy<Value = Vec<Item>> {
        let leaf =
            prop_oneof![
                (arb_name(), arb_data(), 0u64..1 << 33)
                    .prop_map(|(name, data, mtime)| Item::File { name, data, mtime }),
                arb_name().prop_map(Item::Dir),
                (arb_name(), "[a-z./]{1,150}").prop_map(|(n, t)| Item::Symlink(n, t)),
                ("[a-z]{1,20}(/[a-z]{50,60}){2,3}", arb_data())
                    .prop_map(|(n, d)| Item::PaxFile(n, d)),
            ];
        let items = proptest::collection::vec(leaf.clone(), 0..6);
        if depth == 0 {
            items.boxed()
        } else {
            proptest::collection::vec(
                prop_oneof![
                    3 => leaf,
                    1 => (arb_name(), arb_items(depth - 1))
                        .prop_map(|(n, inner)| Item::Nested(n, inner)),
                ],
                0..6,
            )
            .boxed()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn arbitrary_bytes_replay_exactly(
            input in proptest::collection::vec(any::<u8>(), 0..5000),
            pieces in proptest::collection::vec(1usize..1200, 0..8),
        ) {
            let (runs, _) = TarSplitter::split_all(&input, &pieces);
            prop_assert_eq!(concat(&runs), input);
        }

        #[test]
        fn generated_tars_replay_exactly_and_split_contents(
            items in arb_items(3),
            pieces in proptest::collection::vec(1usize..1500, 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let tar = build(&items, 0);
            let (runs, collected) = TarSplitter::split_all(&tar, &pieces);
            prop_assert_eq!(concat(&runs), tar.clone());
            prop_assert_eq!(stream(&runs, Part::Content), expected_content(&items, 0));
            prop_assert_eq!(collected.is_tar, !items.is_empty());
            // Streaming does not change the classification.
            prop_assert_eq!(&split(&tar).0, &runs);

            // Any truncation still replays exactly.
            let cut = cut.index(tar.len() + 1);
            let (runs, _) = TarSplitter::split_all(&tar[..cut], &pieces);
            prop_assert_eq!(concat(&runs), &tar[..cut]);
        }

        #[test]
        fn corrupted_tars_replay_exactly(
            items in arb_items(2),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            pieces in proptest::collection::vec(1usize..1500, 0..8),
        ) {
            let mut tar = build(&items, 0);
            if !tar.is_empty() {
                for (at, byte) in flips {
                    let i = at.index(tar.len());
                    tar[i] = byte;
                }
            }
            let (runs, _) = TarSplitter::split_all(&tar, &pieces);
            prop_assert_eq!(concat(&runs), tar.clone());
            prop_assert_eq!(&split(&tar).0, &runs);
        }

        #[test]
        fn random_valid_headers_replay_exactly(
            blocks in proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 512),
                    prop::sample::select(b"0x gLKS5\x007D".to_vec()),
                    0u64..3000,
                    any::<bool>(),
                    proptest::collection::vec(any::<u8>(), 0..1500),
                ),
                1..6,
            ),
            pieces in proptest::collection::vec(1usize..1500, 0..8),
        ) {
            let mut input = Vec::new();
            for (mut block, typeflag, size, base256, data) in blocks {
                block[156] = typeflag;
                if base256 {
                    block[124..136].fill(0);
                    block[124] = 0x80;
                    block[128..136].copy_from_slice(&size.to_be_bytes());
                } else {
                    block[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
                }
                block[148..156].fill(b' ');
                let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
                block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                prop_assert!(parse_header(&block).is_some());
                input.extend_from_slice(&block);
                input.extend_from_slice(&data);
            }
            let (runs, _) = TarSplitter::split_all(&input, &pieces);
            prop_assert_eq!(concat(&runs), input.clone());
            prop_assert_eq!(&split(&input).0, &runs);
        }

        #[test]
        fn mtimes_do_not_change_content(items in arb_items(2), shift in 1u64..1 << 30) {
            let a = split(&build(&items, 0)).0;
            let b = split(&build(&items, shift)).0;
            prop_assert_eq!(stream(&a, Part::Content), stream(&b, Part::Content));
        }
    }

    fn file(name: &str, data: &[u8]) -> Item {
        Item::File {
            name: name.into(),
            data: data.to_vec(),
            mtime: 1_700_000_000,
        }
    }

    #[test]
    fn headers_are_meta_and_contents_are_content() {
        let items = vec![
            file("a.txt", b"hello"),
            file("empty", b""),
            file("b.bin", &[1u8; 1000]),
        ];
        let tar = build(&items, 0);
        let (runs, collected) = split(&tar);
        let expect = vec![
            (Part::Meta, tar[..512].to_vec()),
            (Part::Content, b"hello".to_vec()),
            (Part::Meta, tar[517..2048].to_vec()),
            (Part::Content, vec![1u8; 1000]),
            (Part::Meta, tar[3048..].to_vec()),
        ];
        assert_eq!(runs, expect);
        assert!(collected.is_tar);
        assert_eq!(collected.entries, 3);
        assert_eq!(collected.nested_tars, 0);
    }

    #[test]
    fn not_tar_is_all_content() {
        let mut input = vec![0x42u8; 3000];
        input[0] = b'x';
        let (runs, c) = split(&input);
        assert_eq!(runs, vec![(Part::Content, input)]);
        assert!(!c.is_tar);
        let (runs, c) = split(b"");
        assert!(runs.is_empty());
        assert!(!c.is_tar);
    }

    #[test]
    fn garbage_after_valid_entries_is_content() {
        let mut tar = build(&[file("a", b"abc")], 0);
        tar.truncate(1024); // header, data, padding; no end blocks
        let garbage = vec![0x77u8; 700];
        tar.extend_from_slice(&garbage);
        let (runs, _) = split(&tar);
        assert_eq!(runs.last().unwrap(), &(Part::Content, garbage));
        assert_eq!(concat(&runs), tar);
    }

    #[test]
    fn data_after_end_of_archive_is_content() {
        let mut tar = build(&[file("a", b"abc")], 0);
        tar.resize(10240, 0); // record padding
        tar.extend_from_slice(b"trailing junk");
        let (runs, _) = split(&tar);
        assert_eq!(
            runs,
            vec![
                (Part::Meta, tar[..512].to_vec()),
                (Part::Content, b"abc".to_vec()),
                (Part::Meta, tar[515..10240].to_vec()),
                (Part::Content, b"trailing junk".to_vec()),
            ]
        );
    }

    #[test]
    fn base256_size_is_understood() {
        let data = vec![9u8; 700];
        let mut h = tar::Header::new_gnu();
        h.set_path("big").unwrap();
        h.set_size(0);
        let raw = h.as_mut_bytes();
        raw[124..136].fill(0);
        raw[124] = 0x80;
        raw[134] = (700u16 >> 8) as u8;
        raw[135] = (700u16 & 0xff) as u8;
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(&data);
        tar.resize(2048 + 512, 0);
        let (runs, _) = split(&tar);
        assert_eq!(stream(&runs, Part::Content), data);
    }

    #[test]
    fn pax_size_overrides_header_size() {
        let data = vec![3u8; 1500];
        let rec = pax_record("size", b"1500");
        let mut b = tar::Builder::new(Vec::new());
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_path("PaxHeaders/big").unwrap();
        x.set_size(rec.len() as u64);
        x.set_cksum();
        b.append(&x, rec.as_slice()).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("big").unwrap();
        h.set_size(0); // as a writer would when the size does not fit
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        let mut tar = b.into_inner().unwrap();
        // Splice the data in after the real header (the builder wrote none).
        let end = tar.len() - 1024;
        let mut padded = data.clone();
        padded.resize(2048, 0);
        tar.splice(end..end, padded);
        let (runs, _) = split(&tar);
        assert_eq!(stream(&runs, Part::Content), data);
    }

    #[test]
    fn docker_like_archive_splits_layers() {
        let layer1 = vec![
            Item::Dir("etc".into()),
            file("etc/os-release", b"NAME=test\n"),
            file("usr/bin/tool", &[0xee; 5000]),
        ];
        let layer2 = vec![file("app/main.py", b"print('hi')\n")];
        let items = vec![
            Item::Nested("aaaa/layer.tar".into(), layer1),
            Item::Nested("bbbb/layer.tar".into(), layer2),
            file("cccc.json", br#"{"rootfs":{}}"#),
            file("manifest.json", br#"[{"Config":"cccc.json"}]"#),
        ];
        let tar = build(&items, 0);
        let (runs, c) = split(&tar);
        assert_eq!(concat(&runs), tar);
        let mut content = b"NAME=test\n".to_vec();
        content.extend_from_slice(&[0xee; 5000]);
        content.extend_from_slice(b"print('hi')\n");
        content.extend_from_slice(br#"{"rootfs":{}}"#);
        content.extend_from_slice(br#"[{"Config":"cccc.json"}]"#);
        assert_eq!(stream(&runs, Part::Content), content);
        assert_eq!(c.nested_tars, 2);
        assert_eq!(c.entries, 4);
        assert_eq!(c.inner_entries, 4);
        assert_eq!(c.spans.len(), 2);
        assert!(c.spans.iter().all(|s| s.nested_tar));
        assert_eq!(
            c.file("manifest.json").unwrap(),
            br#"[{"Config":"cccc.json"}]"#
        );
        assert_eq!(c.file("./cccc.json").unwrap(), br#"{"rootfs":{}}"#);

        // Offsets point at the entries' data.
        let mut ar = tar::Archive::new(tar.as_slice());
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let (off, size) = c.locate(&name).unwrap();
            assert_eq!((off, size), (e.raw_file_position(), e.size()), "{name}");
        }
    }

    /// Found by the `docker_archive` fuzz target: an archive cut inside a
    /// layer listed that layer's span past the end of the input, and image
    /// detection reported a layer whose bytes are not there.
    #[test]
    fn file_cut_short_is_not_located() {
        let items = vec![
            file(
                "manifest.json",
                br#"[{"Config":"c.json","Layers":["a/layer.tar","b/layer.tar"]}]"#,
            ),
            Item::Nested("a/layer.tar".into(), vec![file("x", &[1; 700])]),
            Item::Nested("b/layer.tar".into(), vec![file("y", &[2; 3000])]),
        ];
        let tar = build(&items, 0);
        let (_, whole) = split(&tar);
        assert_eq!(whole.spans.len(), 2);
        for cut in [tar.len() - 1700, tar.len() - 3000, 1024 + 600] {
            let (runs, c) = split(&tar[..cut]);
            assert_eq!(concat(&runs), &tar[..cut]);
            for s in &c.spans {
                assert!(s.offset + s.size <= cut as u64, "{s:?} past {cut}");
            }
            assert_eq!(crate::image::detect(&c), None, "cut at {cut}");
        }
        // Whole layers before the cut are still located.
        let (_, c) = split(&tar[..tar.len() - 1700]);
        assert_eq!(c.spans.len(), 1);
        assert_eq!(c.spans[0].name, "a/layer.tar");
    }

    #[test]
    fn broken_inner_tar_does_not_break_outer() {
        let inner = build(&[file("x", &[5u8; 600])], 0);
        let mut broken = inner[..1536].to_vec(); // header, data, padding...
        broken.extend_from_slice(&[0x99; 600]); // ...then garbage where a header should be
        let items = vec![
            Item::File {
                name: "bad.tar".into(),
                data: broken.clone(),
                mtime: 0,
            },
            file("after", b"still parsed"),
        ];
        let tar = build(&items, 0);
        let (runs, c) = split(&tar);
        assert_eq!(concat(&runs), tar);
        let content = stream(&runs, Part::Content);
        let mut expect = vec![5u8; 600];
        expect.extend_from_slice(&[0x99; 600]);
        expect.extend_from_slice(b"still parsed");
        assert_eq!(content, expect);
        assert_eq!(c.entries, 2);
        assert_eq!(c.nested_tars, 1);
    }

    #[test]
    fn gzip_layer_is_content() {
        let blob = [0x1f, 0x8b, 8, 0].repeat(300);
        let tar = build(&[file("blobs/sha256/ab", &blob)], 0);
        let (runs, c) = split(&tar);
        assert_eq!(stream(&runs, Part::Content), blob);
        assert_eq!(c.nested_tars, 0);
        assert_eq!(c.file("blobs/sha256/ab").unwrap(), blob.as_slice());
    }

    #[test]
    fn depth_limit_leaves_deeper_tars_as_content() {
        let mut items = vec![file("leaf", b"deep")];
        for i in 0..5 {
            items = vec![Item::Nested(format!("n{i}.tar"), items)];
        }
        let tar = build(&items, 0);
        let (runs, c) = split(&tar);
        assert_eq!(concat(&runs), tar);
        assert_eq!(c.nested_tars, MAX_DEPTH as u64);
        assert_eq!(stream(&runs, Part::Content), expected_content(&items, 0));
    }

    #[test]
    fn large_file_content_streams_without_buffering() {
        let mut h = tar::Header::new_gnu();
        h.set_path("big.bin").unwrap();
        h.set_size(8 << 20);
        h.set_cksum();
        let mut s = TarSplitter::new();
        let mut content = 0usize;
        let mut sink = |p: Part, b: &[u8]| {
            if p == Part::Content {
                content += b.len();
            }
        };
        s.feed(h.as_bytes(), &mut sink);
        let chunk = vec![1u8; 1 << 20];
        s.feed(&chunk, &mut sink);
        s.feed(&chunk, &mut sink);
        // Content is passed on as it arrives, not held until the entry ends.
        assert_eq!(content, 2 << 20);
        let mut sink = |_: Part, _: &[u8]| {};
        s.finish(&mut sink);
        let c = s.into_collected();
        // The input ended 6 MiB into the file: it is not located.
        assert_eq!(c.spans, vec![]);
        assert_eq!(c.input_len, 512 + (2 << 20));
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
        assert_eq!(parse_octal(b"  644 \0\0"), Some(0o644));
        assert_eq!(parse_octal(b"\0\0\0\0"), None);
        assert_eq!(parse_octal(b"12x"), None);
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Some(256)
        );
        assert_eq!(parse_numeric(&[0xff; 12]), None);
        assert_eq!(
            parse_numeric(&[0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
        assert_eq!(padding(0), 0);
        assert_eq!(padding(1), 511);
        assert_eq!(padding(512), 0);
    }
}
