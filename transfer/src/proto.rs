//! The wire protocol, without I/O: typed messages, their framing and
//! encoding, and the session logic of both ends.
//!
//! # Framing
//!
//! A frame is a 4-byte little-endian payload length followed by the payload:
//! one type byte, then the message's fields. Integers are little-endian,
//! byte strings and text are a `u32` length then the bytes, lists are a
//! `u32` count then the elements. Decoding trusts nothing: every length is
//! checked against the bytes that remain and against the frame limit before
//! anything is allocated, and no input makes it panic.
//!
//! # Conversation
//!
//! One QUIC connection is one session. The client opens a bidirectional
//! stream, sends [`Message::Hello`] and waits for [`Message::Welcome`] (or
//! [`Message::Error`]). After that every request travels on a stream of its
//! own: one request frame from the client, one reply frame from the server,
//! so requests run in parallel and a slow one does not hold up the others.
//! [`ServerSession`] is the server's state machine: it authenticates, checks
//! every request against the token's scopes and the limits, and tells the
//! transport what to do ([`Action`]); the transport only moves bytes and
//! calls the store.
//!
//! ```
//! use transfer::proto::{self, Message};
//! let msg = Message::List { prefix: "main".into() };
//! let frame = proto::encode(&msg);
//! let mut dec = proto::FrameDecoder::new(proto::DEFAULT_MAX_FRAME);
//! dec.push(&frame[..3]);
//! assert_eq!(dec.next_message().unwrap(), None); // needs more bytes
//! dec.push(&frame[3..]);
//! assert_eq!(dec.next_message().unwrap(), Some(msg));
//! ```

use crate::auth::{Grant, Scopes, TokenHash, TokenTable};
use bytes::Bytes;
use std::collections::HashSet;
use std::time::Duration;
use store::compress::Codec;
use store::gc::{GcOptions, GcReport, Policy, RemovedName};
use store::manifest::Manifest;
use store::name::Name;
use store::repo::{StoredChunk, MAX_CHUNK};
use store::{ChunkId, ManifestId};

/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// ALPN protocol id negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"ferry/1";
/// Bytes of the frame header (the payload length).
pub const HEADER_LEN: usize = 4;
/// Smallest frame limit that still carries the largest chunk.
pub const MIN_FRAME: u32 = MAX_CHUNK + (1 << 16);
/// Default frame limit.
pub const DEFAULT_MAX_FRAME: u32 = 32 << 20;
/// Default number of ids in one `Missing` or `GetChunks` request.
pub const DEFAULT_BATCH_IDS: u32 = 16384;
/// Most distinct chunk ids whose manifests one connection may have fetched
/// (a hash set of 32-byte ids: under 300 MB of server memory; 4 Mi chunks
/// are some 350 GB of stashes).
pub const MAX_READABLE_IDS: usize = 1 << 22;
/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Most manifests a client offers as delta bases.
pub const MAX_HAVE: usize = 16;
/// Bytes of a chunk's fixed fields in a frame (id, codec, raw and stored length).
pub const CHUNK_OVERHEAD: usize = 32 + 1 + 4 + 4;
/// Most retention policies in one [`Message::Gc`].
pub const MAX_GC_POLICIES: usize = 64;
/// Longest policy prefix in a [`Message::Gc`] (a name and a trailing `/`).
pub const MAX_GC_PREFIX_LEN: usize = store::name::MAX_NAME_LEN + 1;
/// Longest grace period a [`Message::Gc`] may ask for (ten years).
pub const MAX_GC_GRACE: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Most names kept by a `keep_last` policy in a [`Message::Gc`].
pub const MAX_GC_KEEP_LAST: u64 = u32::MAX as u64;
/// The repack threshold's unit in a [`Message::Gc`]: parts per million.
pub const PPM: u32 = 1_000_000;

/// What went wrong, as it travels in [`Message::Error`] and as a QUIC
/// application close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A malformed or unexpected message.
    Protocol,
    /// The peers speak different protocol versions.
    Version,
    /// No token, or an unknown one.
    Unauthenticated,
    /// The token does not grant this name (or these chunks).
    Forbidden,
    /// No stash has this name.
    NotFound,
    /// A chunk does not match its id.
    Corrupt,
    /// A commit names chunks the server does not hold.
    MissingChunks,
    /// A limit was exceeded (frame size, batch size, streams).
    Limit,
    /// The server has too many connections; try again later.
    Busy,
    /// The server is shutting down; try again later.
    ShuttingDown,
    /// The server failed (its store); see its log.
    Internal,
    /// A name is not valid.
    BadName,
    /// A request took longer than the server's deadline.
    Deadline,
    /// The server's disk is full, or would be within its reserve
    /// (`limits.min_free_bytes`): uploads are refused until space is freed.
    NoSpace,
    /// A code this build does not know.
    Unknown(u8),
}

impl ErrorKind {
    /// The wire code (also the QUIC close code).
    pub fn code(self) -> u8 {
        match self {
            ErrorKind::Protocol => 1,
            ErrorKind::Version => 2,
            ErrorKind::Unauthenticated => 3,
            ErrorKind::Forbidden => 4,
            ErrorKind::NotFound => 5,
            ErrorKind::Corrupt => 6,
            ErrorKind::MissingChunks => 7,
            ErrorKind::Limit => 8,
            ErrorKind::Busy => 9,
            ErrorKind::ShuttingDown => 10,
            ErrorKind::Internal => 11,
            ErrorKind::BadName => 12,
            ErrorKind::Deadline => 13,
            ErrorKind::NoSpace => 14,
            ErrorKind::Unknown(c) => c,
        }
    }

    /// The kind for a wire code.
    pub fn from_code(code: u8) -> ErrorKind {
        match code {
            1 => ErrorKind::Protocol,
            2 => ErrorKind::Version,
            3 => ErrorKind::Unauthenticated,
            4 => ErrorKind::Forbidden,
            5 => ErrorKind::NotFound,
            6 => ErrorKind::Corrupt,
            7 => ErrorKind::MissingChunks,
            8 => ErrorKind::Limit,
            9 => ErrorKind::Busy,
            10 => ErrorKind::ShuttingDown,
            11 => ErrorKind::Internal,
            12 => ErrorKind::BadName,
            13 => ErrorKind::Deadline,
            14 => ErrorKind::NoSpace,
            c => ErrorKind::Unknown(c),
        }
    }

    /// A short label (metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Version => "version",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::MissingChunks => "missing_chunks",
            ErrorKind::Limit => "limit",
            ErrorKind::Busy => "busy",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Internal => "internal",
            ErrorKind::BadName => "bad_name",
            ErrorKind::Deadline => "deadline",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Unknown(_) => "unknown",
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Busy | ErrorKind::ShuttingDown | ErrorKind::Internal | ErrorKind::Deadline
        )
    }

    /// Every known kind (for metrics).
    pub const ALL: [ErrorKind; 14] = [
        ErrorKind::Protocol,
        ErrorKind::Version,
        ErrorKind::Unauthenticated,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::Corrupt,
        ErrorKind::MissingChunks,
        ErrorKind::Limit,
        ErrorKind::Busy,
        ErrorKind::ShuttingDown,
        ErrorKind::Internal,
        ErrorKind::BadName,
        ErrorKind::Deadline,
        ErrorKind::NoSpace,
    ];
}

/// The limits a server announces in [`Message::Welcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame (payload bytes) either side may send.
    pub max_frame: u32,
    /// Most ids in one `Missing` or `GetChunks`, most chunks in one `PutChunks`.
    pub max_batch_ids: u32,
    /// Concurrent request streams per connection.
    pub max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: DEFAULT_MAX_FRAME,
            max_batch_ids: DEFAULT_BATCH_IDS,
            max_streams: 16,
        }
    }
}

impl Limits {
    /// Largest manifest encoding (uncompressed) a server accepts in a
    /// commit: four frames. Its stored (compressed) form travels in one
    /// frame; manifests hardly compress (chunk ids are random), so this is
    /// room to spare for any manifest that fits, while a few KiB of forged
    /// zstd cannot make the server expand them to more. (A 2.5 GB docker
    /// archive of 71,000 files: 1.25 MB stored, 1.33 MB uncompressed; the
    /// default frame carries the manifest of a stash of about 65 GB.)
    pub fn max_manifest(&self) -> usize {
        4 * self.max_frame as usize
    }
}

/// One line of a remote listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// The name.
    pub name: String,
    /// The manifest it points at.
    pub manifest: ManifestId,
    /// When the name was last set, seconds since the Unix epoch.
    pub created: u64,
    /// The manifest header as JSON (`store::manifest::Header`), if readable.
    pub header: Option<String>,
}

/// What a remote collection is to do: the options of `ferry gc`, as they
/// travel in [`Message::Gc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcRequest {
    /// Retention rules (at most [`MAX_GC_POLICIES`]); a name goes if any
    /// rule removes it.
    pub policies: Vec<Policy>,
    /// Condemned data lives at least this long before it is deleted
    /// (whole seconds; at most [`MAX_GC_GRACE`]).
    pub grace: Duration,
    /// Repack packs whose live share of bytes is below this many parts per
    /// million (0: never; at most [`PPM`]).
    pub repack_below_ppm: u32,
    /// Plan only: change nothing.
    pub dry_run: bool,
}

impl GcRequest {
    /// The request for a collection with `opts` (the mark slack stays the
    /// server's).
    pub fn from_options(opts: &GcOptions) -> GcRequest {
        let ppm = (opts.repack_below.clamp(0.0, 1.0) * PPM as f64).round() as u32;
        GcRequest {
            policies: opts.policies.clone(),
            grace: Duration::from_secs(opts.grace.as_secs()),
            repack_below_ppm: ppm,
            dry_run: opts.dry_run,
        }
    }

    /// The options a server runs the collection with.
    pub fn to_options(&self) -> GcOptions {
        GcOptions {
            policies: self.policies.clone(),
            grace: self.grace,
            repack_below: f64::from(self.repack_below_ppm) / f64::from(PPM),
            dry_run: self.dry_run,
            ..GcOptions::default()
        }
    }

    /// Checks every value against its bounds (the server does, whatever
    /// the client sent): the error's kind and what is wrong.
    pub fn check(&self) -> Result<(), (ErrorKind, String)> {
        if self.policies.len() > MAX_GC_POLICIES {
            return Err((
                ErrorKind::Limit,
                format!(
                    "{} retention policies; at most {MAX_GC_POLICIES} are accepted",
                    self.policies.len()
                ),
            ));
        }
        for (i, p) in self.policies.iter().enumerate() {
            if p.prefix
                .as_ref()
                .is_some_and(|x| x.len() > MAX_GC_PREFIX_LEN)
            {
                return Err((
                    ErrorKind::BadName,
                    format!("policy {}: the prefix is longer than a name", i + 1),
                ));
            }
            if p.keep_last.is_some_and(|k| k as u64 > MAX_GC_KEEP_LAST) {
                return Err((
                    ErrorKind::Limit,
                    format!("policy {}: keep_last is out of range", i + 1),
                ));
            }
            p.validate().map_err(|e| {
                let kind = if e.contains("prefix") && p.prefix.is_some() {
                    ErrorKind::BadName
                } else {
                    ErrorKind::Protocol
                };
                (kind, format!("policy {}: {e}", i + 1))
            })?;
        }
        if self.grace > MAX_GC_GRACE {
            return Err((
                ErrorKind::Limit,
                format!(
                    "a grace period of {} s is longer than the limit of {} s",
                    self.grace.as_secs(),
                    MAX_GC_GRACE.as_secs()
                ),
            ));
        }
        if self.repack_below_ppm > PPM {
            return Err((
                ErrorKind::Limit,
                "the repack threshold is above 1 (every byte of a pack)".into(),
            ));
        }
        Ok(())
    }
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client → server, first on a new connection.
    Hello {
        /// The client's protocol version.
        version: u16,
        /// The secret token (empty: none).
        token: String,
    },
    /// Server → client: authenticated.
    Welcome {
        /// The server's protocol version.
        version: u16,
        /// What the server accepts.
        limits: Limits,
        /// Name prefixes the token may read.
        read: Vec<String>,
        /// Name prefixes the token may write.
        write: Vec<String>,
    },
    /// Either way: a refusal or failure.
    Error {
        /// What kind.
        kind: ErrorKind,
        /// What happened and what to do, for humans.
        message: String,
    },
    /// Which of these chunks does the server lack (for a push to `name`)?
    Missing {
        /// The name the chunks will be committed under.
        name: String,
        /// Chunk ids.
        ids: Vec<ChunkId>,
    },
    /// The ids the server lacks.
    MissingReply {
        /// Chunk ids.
        ids: Vec<ChunkId>,
    },
    /// Upload of chunks as stored (for a push to `name`).
    PutChunks {
        /// The name the chunks will be committed under.
        name: String,
        /// The chunks.
        chunks: Vec<StoredChunk>,
    },
    /// All chunks of a `PutChunks` were verified and stored. They are
    /// durable once the connection's pack is full, before a commit on the
    /// same connection, and when the connection ends.
    PutReply {
        /// Chunks received.
        received: u32,
        /// Of those, new to the server's store.
        new: u32,
    },
    /// Point `name` at this manifest (stored bytes); sent last.
    Commit {
        /// The name.
        name: String,
        /// The manifest's stored bytes.
        manifest: Vec<u8>,
    },
    /// The name now points at the manifest.
    CommitReply {
        /// Its id.
        id: ManifestId,
    },
    /// What does `name` point at?
    GetManifest {
        /// The name.
        name: String,
        /// Manifests the client holds (at most [`MAX_HAVE`]), most similar
        /// first: the server may answer with a delta against one of them.
        have: Vec<ManifestId>,
    },
    /// A manifest.
    Manifest {
        /// Its id.
        id: ManifestId,
        /// Its stored bytes.
        bytes: Vec<u8>,
    },
    /// A manifest as a delta against one the client holds: a zstd frame of
    /// the manifest's uncompressed encoding, compressed with the base's
    /// uncompressed encoding as dictionary. `base == id` with an empty delta:
    /// the client holds the manifest already.
    ManifestDelta {
        /// The manifest's id.
        id: ManifestId,
        /// The manifest (from the client's `have`) the delta is against.
        base: ManifestId,
        /// The delta.
        delta: Vec<u8>,
    },
    /// Download chunks (of manifests fetched on this connection).
    GetChunks {
        /// Chunk ids.
        ids: Vec<ChunkId>,
    },
    /// Downloaded chunks. Requested ids that are in neither list did not fit
    /// in the frame: ask again.
    Chunks {
        /// Chunks as stored.
        chunks: Vec<StoredChunk>,
        /// Requested ids the server does not hold.
        not_found: Vec<ChunkId>,
    },
    /// Names under a prefix (the token's readable ones).
    List {
        /// The prefix ("" for all).
        prefix: String,
    },
    /// A listing.
    Listing {
        /// Entries, sorted by name.
        entries: Vec<ListEntry>,
    },
    /// Run retention and garbage collection on the server's store (tokens
    /// with the admin scope only).
    Gc {
        /// What to collect.
        request: GcRequest,
    },
    /// What the collection did (or, for a dry run, would do).
    GcReply {
        /// The server's report. Its `names_removed` may be cut short to fit
        /// in one frame.
        report: GcReport,
        /// Removed names missing from `report.names_removed`.
        names_not_listed: u64,
    },
    /// Remove names the token may write: the listed ones (all or nothing:
    /// each must exist), or every name under `prefix` (the whole prefix
    /// must be writable). Exactly one of the two is given.
    Remove {
        /// Names.
        names: Vec<String>,
        /// A prefix (whole parts; "" for every name).
        prefix: Option<String>,
    },
    /// The names removed.
    Removed {
        /// Names, sorted; may be cut short to fit in one frame.
        names: Vec<String>,
        /// Removed names missing from `names`.
        not_listed: u64,
    },
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const MISSING: u8 = 10;
    pub const MISSING_REPLY: u8 = 11;
    pub const PUT_CHUNKS: u8 = 12;
    pub const PUT_REPLY: u8 = 13;
    pub const COMMIT: u8 = 14;
    pub const COMMIT_REPLY: u8 = 15;
    pub const GET_MANIFEST: u8 = 16;
    pub const MANIFEST: u8 = 17;
    pub const GET_CHUNKS: u8 = 18;
    pub const CHUNKS: u8 = 19;
    pub const LIST: u8 = 20;
    pub const LISTING: u8 = 21;
    pub const MANIFEST_DELTA: u8 = 22;
    pub const GC: u8 = 23;
    pub const GC_REPLY: u8 = 24;
    pub const REMOVE: u8 = 25;
    pub const REMOVED: u8 = 26;
}

impl Message {
    /// The message's name, for logs and metrics.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Error { .. } => "error",
            Message::Missing { .. } => "missing",
            Message::MissingReply { .. } => "missing_reply",
            Message::PutChunks { .. } => "put_chunks",
            Message::PutReply { .. } => "put_reply",
            Message::Commit { .. } => "commit",
            Message::CommitReply { .. } => "commit_reply",
            Message::GetManifest { .. } => "get_manifest",
            Message::Manifest { .. } => "manifest",
            Message::ManifestDelta { .. } => "manifest_delta",
            Message::GetChunks { .. } => "get_chunks",
            Message::Chunks { .. } => "chunks",
            Message::List { .. } => "list",
            Message::Listing { .. } => "listing",
            Message::Gc { .. } => "gc",
            Message::GcReply { .. } => "gc_reply",
            Message::Remove { .. } => "remove",
            Message::Removed { .. } => "removed",
        }
    }

    /// An error message.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Message {
        Message::Error {
            kind,
            message: message.into(),
        }
    }
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The frame announces more bytes than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The payload is malformed.
    #[error("malformed {what} message: {detail}")]
    Malformed {
        /// The message type being decoded.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// An unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// An empty payload.
    #[error("empty frame")]
    Empty,
}

// ----------------------------------------------------------------- encoding

/// Where an encoder writes: one buffer ([`encode_into`]), or pieces that
/// share the chunks' bytes instead of copying them ([`encode_shared`]).
trait Out {
    fn push(&mut self, b: u8);
    fn extend_from_slice(&mut self, b: &[u8]);
    /// Bytes that may be passed on as they are.
    fn shared(&mut self, b: &Bytes);
}

impl Out for Vec<u8> {
    fn push(&mut self, b: u8) {
        Vec::push(self, b);
    }
    fn extend_from_slice(&mut self, b: &[u8]) {
        Vec::extend_from_slice(self, b);
    }
    fn shared(&mut self, b: &Bytes) {
        Vec::extend_from_slice(self, b);
    }
}

/// A frame as pieces: small fields gathered into buffers, chunk bytes
/// referenced where they already are.
#[derive(Default)]
struct Pieces {
    done: Vec<Bytes>,
    open: Vec<u8>,
}

impl Pieces {
    /// Below this a chunk is copied: a piece of its own costs more.
    const SHARE_FROM: usize = 1024;

    fn finish(mut self) -> Vec<Bytes> {
        if !self.open.is_empty() {
            self.done.push(std::mem::take(&mut self.open).into());
        }
        self.done
    }
}

impl Out for Pieces {
    fn push(&mut self, b: u8) {
        self.open.push(b);
    }
    fn extend_from_slice(&mut self, b: &[u8]) {
        self.open.extend_from_slice(b);
    }
    fn shared(&mut self, b: &Bytes) {
        if b.len() < Self::SHARE_FROM {
            self.open.extend_from_slice(b);
            return;
        }
        if !self.open.is_empty() {
            self.done.push(std::mem::take(&mut self.open).into());
        }
        self.done.push(b.clone());
    }
}

fn put_u16(out: &mut impl Out, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut impl Out, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_len(out: &mut impl Out, n: usize) {
    put_u32(out, u32::try_from(n).unwrap_or(u32::MAX));
}
fn put_bytes(out: &mut impl Out, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}
fn put_ids(out: &mut impl Out, ids: &[ChunkId]) {
    put_len(out, ids.len());
    for id in ids {
        out.extend_from_slice(&id.0);
    }
}
fn put_strings(out: &mut impl Out, v: &[String]) {
    put_len(out, v.len());
    for s in v {
        put_bytes(out, s.as_bytes());
    }
}
fn put_chunks(out: &mut impl Out, chunks: &[StoredChunk]) {
    put_len(out, chunks.len());
    for c in chunks {
        out.extend_from_slice(&c.id.0);
        out.push(c.codec.code());
        put_u32(out, c.raw_len);
        put_len(out, c.bytes.len());
        out.shared(&c.bytes);
    }
}

fn policy_len(p: &Policy) -> usize {
    1 + p.prefix.as_ref().map_or(0, |x| 4 + x.len())
        + p.keep_last.map_or(0, |_| 8)
        + p.max_age.map_or(0, |_| 8)
}

/// Bytes one removed name takes in a [`Message::GcReply`].
pub fn removed_name_len(r: &RemovedName) -> usize {
    8 + r.name.len() + r.reason.len()
}

/// Bytes of a [`Message::GcReply`] besides its removed names.
pub const GC_REPLY_FIXED: usize = HEADER_LEN + 1 + 1 + 4 + 8 + 12 * 8;

fn gc_counters(r: &GcReport) -> [u64; 12] {
    [
        r.names_kept,
        r.live_chunks,
        r.packs_condemned,
        r.packs_uncondemned,
        r.packs_repacked,
        r.packs_deleted,
        r.manifests_deleted,
        r.bytes_freed,
        r.bytes_pending,
        r.blocked_by_leases,
        r.bytes_freeable_now,
        r.leftovers_removed,
    ]
}

/// Bytes `msg` takes as a frame, header included.
pub fn encoded_len(msg: &Message) -> usize {
    let strs = |v: &[String]| 4 + v.iter().map(|s| 4 + s.len()).sum::<usize>();
    let chunks = |v: &[StoredChunk]| {
        4 + v
            .iter()
            .map(|c| CHUNK_OVERHEAD + c.bytes.len())
            .sum::<usize>()
    };
    HEADER_LEN
        + 1
        + match msg {
            Message::Hello { token, .. } => 2 + 4 + token.len(),
            Message::Welcome { read, write, .. } => 2 + 12 + strs(read) + strs(write),
            Message::Error { message, .. } => 1 + 4 + message.len(),
            Message::Missing { name, ids } => 4 + name.len() + 4 + 32 * ids.len(),
            Message::MissingReply { ids } | Message::GetChunks { ids } => 4 + 32 * ids.len(),
            Message::PutChunks { name, chunks: c } => 4 + name.len() + chunks(c),
            Message::PutReply { .. } => 8,
            Message::Commit { name, manifest } => 8 + name.len() + manifest.len(),
            Message::CommitReply { .. } => 32,
            Message::GetManifest { name, have } => 4 + name.len() + 4 + 32 * have.len(),
            Message::List { prefix } => 4 + prefix.len(),
            Message::Manifest { bytes, .. } => 32 + 4 + bytes.len(),
            Message::ManifestDelta { delta, .. } => 64 + 4 + delta.len(),
            Message::Chunks {
                chunks: c,
                not_found,
            } => chunks(c) + 4 + 32 * not_found.len(),
            Message::Listing { entries } => {
                4 + entries
                    .iter()
                    .map(|e| {
                        4 + e.name.len() + 32 + 8 + 1 + e.header.as_ref().map_or(0, |h| 4 + h.len())
                    })
                    .sum::<usize>()
            }
            Message::Gc { request } => {
                4 + request.policies.iter().map(policy_len).sum::<usize>() + 8 + 4 + 1
            }
            Message::GcReply { report, .. } => {
                GC_REPLY_FIXED - HEADER_LEN - 1
                    + report
                        .names_removed
                        .iter()
                        .map(removed_name_len)
                        .sum::<usize>()
            }
            Message::Remove { names, prefix } => {
                strs(names) + 1 + prefix.as_ref().map_or(0, |p| 4 + p.len())
            }
            Message::Removed { names, .. } => strs(names) + 8,
        }
}

/// Encodes `msg` as a frame (header and payload) appended to `out`.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) {
    out.reserve(encoded_len(msg));
    encode_to(msg, out);
}

/// Encodes `msg` as a frame in pieces whose concatenation is
/// [`encode`]`(msg)`: chunks' bytes are shared, not copied, so a frame of
/// 32 MiB of chunks costs a few small buffers.
pub fn encode_shared(msg: &Message) -> Vec<Bytes> {
    let mut out = Pieces::default();
    encode_to(msg, &mut out);
    out.finish()
}

fn encode_to(msg: &Message, out: &mut impl Out) {
    put_len(out, encoded_len(msg) - HEADER_LEN);
    match msg {
        Message::Hello { version, token } => {
            out.push(tag::HELLO);
            put_u16(out, *version);
            put_bytes(out, token.as_bytes());
        }
        Message::Welcome {
            version,
            limits,
            read,
            write,
        } => {
            out.push(tag::WELCOME);
            put_u16(out, *version);
            put_u32(out, limits.max_frame);
            put_u32(out, limits.max_batch_ids);
            put_u32(out, limits.max_streams);
            put_strings(out, read);
            put_strings(out, write);
        }
        Message::Error { kind, message } => {
            out.push(tag::ERROR);
            out.push(kind.code());
            put_bytes(out, message.as_bytes());
        }
        Message::Missing { name, ids } => {
            out.push(tag::MISSING);
            put_bytes(out, name.as_bytes());
            put_ids(out, ids);
        }
        Message::MissingReply { ids } => {
            out.push(tag::MISSING_REPLY);
            put_ids(out, ids);
        }
        Message::PutChunks { name, chunks } => {
            out.push(tag::PUT_CHUNKS);
            put_bytes(out, name.as_bytes());
            put_chunks(out, chunks);
        }
        Message::PutReply { received, new } => {
            out.push(tag::PUT_REPLY);
            put_u32(out, *received);
            put_u32(out, *new);
        }
        Message::Commit { name, manifest } => {
            out.push(tag::COMMIT);
            put_bytes(out, name.as_bytes());
            put_bytes(out, manifest);
        }
        Message::CommitReply { id } => {
            out.push(tag::COMMIT_REPLY);
            out.extend_from_slice(&id.0);
        }
        Message::GetManifest { name, have } => {
            out.push(tag::GET_MANIFEST);
            put_bytes(out, name.as_bytes());
            put_len(out, have.len());
            for id in have {
                out.extend_from_slice(&id.0);
            }
        }
        Message::Manifest { id, bytes } => {
            out.push(tag::MANIFEST);
            out.extend_from_slice(&id.0);
            put_bytes(out, bytes);
        }
        Message::ManifestDelta { id, base, delta } => {
            out.push(tag::MANIFEST_DELTA);
            out.extend_from_slice(&id.0);
            out.extend_from_slice(&base.0);
            put_bytes(out, delta);
        }
        Message::GetChunks { ids } => {
            out.push(tag::GET_CHUNKS);
            put_ids(out, ids);
        }
        Message::Chunks { chunks, not_found } => {
            out.push(tag::CHUNKS);
            put_chunks(out, chunks);
            put_ids(out, not_found);
        }
        Message::List { prefix } => {
            out.push(tag::LIST);
            put_bytes(out, prefix.as_bytes());
        }
        Message::Listing { entries } => {
            out.push(tag::LISTING);
            put_len(out, entries.len());
            for e in entries {
                put_bytes(out, e.name.as_bytes());
                out.extend_from_slice(&e.manifest.0);
                out.extend_from_slice(&e.created.to_le_bytes());
                match &e.header {
                    Some(h) => {
                        out.push(1);
                        put_bytes(out, h.as_bytes());
                    }
                    None => out.push(0),
                }
            }
        }
        Message::Gc { request } => {
            out.push(tag::GC);
            put_len(out, request.policies.len());
            for p in &request.policies {
                let flags = u8::from(p.prefix.is_some())
                    | u8::from(p.keep_last.is_some()) << 1
                    | u8::from(p.max_age.is_some()) << 2;
                out.push(flags);
                if let Some(x) = &p.prefix {
                    put_bytes(out, x.as_bytes());
                }
                if let Some(k) = p.keep_last {
                    out.extend_from_slice(&(k as u64).to_le_bytes());
                }
                if let Some(a) = p.max_age {
                    out.extend_from_slice(&a.as_secs().to_le_bytes());
                }
            }
            out.extend_from_slice(&request.grace.as_secs().to_le_bytes());
            put_u32(out, request.repack_below_ppm);
            out.push(u8::from(request.dry_run));
        }
        Message::Remove { names, prefix } => {
            out.push(tag::REMOVE);
            put_strings(out, names);
            match prefix {
                Some(p) => {
                    out.push(1);
                    put_bytes(out, p.as_bytes());
                }
                None => out.push(0),
            }
        }
        Message::Removed { names, not_listed } => {
            out.push(tag::REMOVED);
            put_strings(out, names);
            out.extend_from_slice(&not_listed.to_le_bytes());
        }
        Message::GcReply {
            report,
            names_not_listed,
        } => {
            out.push(tag::GC_REPLY);
            out.push(u8::from(report.dry_run));
            put_len(out, report.names_removed.len());
            for r in &report.names_removed {
                put_bytes(out, r.name.as_bytes());
                put_bytes(out, r.reason.as_bytes());
            }
            out.extend_from_slice(&names_not_listed.to_le_bytes());
            for v in gc_counters(report) {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Encodes `msg` as a frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(msg, &mut out);
    out
}

// ----------------------------------------------------------------- decoding

/// The payload length a frame header announces, checked against `max_frame`.
pub fn frame_len(header: [u8; HEADER_LEN], max_frame: u32) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(header);
    if len > max_frame {
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max: max_frame,
        });
    }
    if len == 0 {
        return Err(ProtoError::Empty);
    }
    Ok(len as usize)
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
    /// What `buf` is part of, when chunks may share it instead of copying.
    shared: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    fn bad(&self, detail: impl Into<String>) -> ProtoError {
        ProtoError::Malformed {
            what: self.what,
            detail: detail.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(self.bad(format!("needs {n} more bytes, {} remain", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn id32(&mut self) -> Result<[u8; 32], ProtoError> {
        let mut id = [0u8; 32];
        id.copy_from_slice(self.take(32)?);
        Ok(id)
    }

    fn bytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn text(&mut self, field: &str) -> Result<String, ProtoError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{field} is not UTF-8")))
    }

    /// A list count, bounded by the bytes left (each element takes at
    /// least `min_size` bytes), so a lying count cannot make us allocate.
    fn count(&mut self, min_size: usize) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.buf.len() {
            return Err(self.bad(format!(
                "announces {n} elements but only {} bytes remain",
                self.buf.len()
            )));
        }
        Ok(n)
    }

    fn ids(&mut self) -> Result<Vec<ChunkId>, ProtoError> {
        let n = self.count(32)?;
        (0..n).map(|_| self.id32().map(ChunkId)).collect()
    }

    fn strings(&mut self, field: &str) -> Result<Vec<String>, ProtoError> {
        let n = self.count(4)?;
        (0..n).map(|_| self.text(field)).collect()
    }

    fn chunks(&mut self) -> Result<Vec<StoredChunk>, ProtoError> {
        let n = self.count(CHUNK_OVERHEAD)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = ChunkId(self.id32()?);
            let code = self.u8()?;
            let codec = Codec::from_code(code)
                .ok_or_else(|| self.bad(format!("chunk {id}: unknown codec {code}")))?;
            let raw_len = self.u32()?;
            if raw_len == 0 || raw_len > MAX_CHUNK {
                return Err(self.bad(format!("chunk {id}: raw length {raw_len} out of range")));
            }
            let bytes = self.bytes()?;
            if bytes.len() > MAX_CHUNK as usize + 4096 {
                return Err(self.bad(format!("chunk {id}: {} stored bytes", bytes.len())));
            }
            let bytes = match self.shared {
                Some(frame) => frame.slice_ref(bytes),
                None => Bytes::copy_from_slice(bytes),
            };
            out.push(StoredChunk {
                id,
                codec,
                raw_len,
                bytes,
            });
        }
        Ok(out)
    }

    fn flag(&mut self, field: &str) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            f => Err(self.bad(format!("{field} flag {f}"))),
        }
    }

    fn gc_request(&mut self) -> Result<GcRequest, ProtoError> {
        let n = self.count(1)?;
        if n > MAX_GC_POLICIES {
            return Err(self.bad(format!(
                "{n} retention policies; at most {MAX_GC_POLICIES} are accepted"
            )));
        }
        let mut policies = Vec::with_capacity(n);
        for _ in 0..n {
            let flags = self.u8()?;
            if flags & !0b111 != 0 {
                return Err(self.bad(format!("policy flags {flags:#x}")));
            }
            let prefix = if flags & 1 != 0 {
                let p = self.text("prefix")?;
                if p.len() > MAX_GC_PREFIX_LEN {
                    return Err(self.bad(format!(
                        "a prefix of {} bytes; names are at most {} bytes",
                        p.len(),
                        store::name::MAX_NAME_LEN
                    )));
                }
                Some(p)
            } else {
                None
            };
            let keep_last = if flags & 2 != 0 {
                let k = self.u64()?;
                if k > MAX_GC_KEEP_LAST {
                    return Err(self.bad(format!("keep_last {k} out of range")));
                }
                Some(k as usize)
            } else {
                None
            };
            let max_age = if flags & 4 != 0 {
                Some(Duration::from_secs(self.u64()?))
            } else {
                None
            };
            policies.push(Policy {
                prefix,
                keep_last,
                max_age,
            });
        }
        Ok(GcRequest {
            policies,
            grace: Duration::from_secs(self.u64()?),
            repack_below_ppm: self.u32()?,
            dry_run: self.flag("dry run")?,
        })
    }

    fn gc_report(&mut self) -> Result<(GcReport, u64), ProtoError> {
        let dry_run = self.flag("dry run")?;
        let n = self.count(8)?;
        let mut names_removed = Vec::with_capacity(n);
        for _ in 0..n {
            names_removed.push(RemovedName {
                name: self.text("name")?,
                reason: self.text("reason")?,
            });
        }
        let not_listed = self.u64()?;
        let mut c = [0u64; 12];
        for v in &mut c {
            *v = self.u64()?;
        }
        let [names_kept, live_chunks, packs_condemned, packs_uncondemned, packs_repacked, packs_deleted, manifests_deleted, bytes_freed, bytes_pending, blocked_by_leases, bytes_freeable_now, leftovers_removed] =
            c;
        Ok((
            GcReport {
                dry_run,
                names_removed,
                names_kept,
                live_chunks,
                packs_condemned,
                packs_uncondemned,
                packs_repacked,
                packs_deleted,
                manifests_deleted,
                bytes_freed,
                bytes_pending,
                blocked_by_leases,
                bytes_freeable_now,
                leftovers_removed,
            },
            not_listed,
        ))
    }

    fn end(self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// Decodes one payload (the bytes after the frame header).
pub fn decode(payload: &[u8]) -> Result<Message, ProtoError> {
    decode_from(payload, None)
}

/// [`decode`], with the chunks of [`Message::PutChunks`] and
/// [`Message::Chunks`] sharing `payload` instead of copying it: they keep
/// the whole payload alive until the last of them is dropped.
pub fn decode_shared(payload: &Bytes) -> Result<Message, ProtoError> {
    decode_from(payload, Some(payload))
}

fn decode_from(payload: &[u8], shared: Option<&Bytes>) -> Result<Message, ProtoError> {
    let (&t, body) = payload.split_first().ok_or(ProtoError::Empty)?;
    let what = match t {
        tag::HELLO => "hello",
        tag::WELCOME => "welcome",
        tag::ERROR => "error",
        tag::MISSING => "missing",
        tag::MISSING_REPLY => "missing_reply",
        tag::PUT_CHUNKS => "put_chunks",
        tag::PUT_REPLY => "put_reply",
        tag::COMMIT => "commit",
        tag::COMMIT_REPLY => "commit_reply",
        tag::GET_MANIFEST => "get_manifest",
        tag::MANIFEST => "manifest",
        tag::MANIFEST_DELTA => "manifest_delta",
        tag::GET_CHUNKS => "get_chunks",
        tag::CHUNKS => "chunks",
        tag::LIST => "list",
        tag::LISTING => "listing",
        tag::GC => "gc",
        tag::GC_REPLY => "gc_reply",
        tag::REMOVE => "remove",
        tag::REMOVED => "removed",
        other => return Err(ProtoError::UnknownType(other)),
    };
    let mut r = Reader {
        buf: body,
        what,
        shared,
    };
    let msg = match t {
        tag::HELLO => {
            let version = r.u16()?;
            let token = r.text("token")?;
            if token.len() > MAX_TOKEN_LEN {
                return Err(r.bad("token too long"));
            }
            Message::Hello { version, token }
        }
        tag::WELCOME => Message::Welcome {
            version: r.u16()?,
            limits: Limits {
                max_frame: r.u32()?,
                max_batch_ids: r.u32()?,
                max_streams: r.u32()?,
            },
            read: r.strings("read scope")?,
            write: r.strings("write scope")?,
        },
        tag::ERROR => Message::Error {
            kind: ErrorKind::from_code(r.u8()?),
            message: r.text("message")?,
        },
        tag::MISSING => Message::Missing {
            name: r.text("name")?,
            ids: r.ids()?,
        },
        tag::MISSING_REPLY => Message::MissingReply { ids: r.ids()? },
        tag::PUT_CHUNKS => Message::PutChunks {
            name: r.text("name")?,
            chunks: r.chunks()?,
        },
        tag::PUT_REPLY => Message::PutReply {
            received: r.u32()?,
            new: r.u32()?,
        },
        tag::COMMIT => Message::Commit {
            name: r.text("name")?,
            manifest: r.bytes()?.to_vec(),
        },
        tag::COMMIT_REPLY => Message::CommitReply {
            id: ManifestId(r.id32()?),
        },
        tag::GET_MANIFEST => Message::GetManifest {
            name: r.text("name")?,
            have: r.ids()?.into_iter().map(|c| ManifestId(c.0)).collect(),
        },
        tag::MANIFEST => Message::Manifest {
            id: ManifestId(r.id32()?),
            bytes: r.bytes()?.to_vec(),
        },
        tag::MANIFEST_DELTA => Message::ManifestDelta {
            id: ManifestId(r.id32()?),
            base: ManifestId(r.id32()?),
            delta: r.bytes()?.to_vec(),
        },
        tag::GET_CHUNKS => Message::GetChunks { ids: r.ids()? },
        tag::CHUNKS => Message::Chunks {
            chunks: r.chunks()?,
            not_found: r.ids()?,
        },
        tag::LIST => Message::List {
            prefix: r.text("prefix")?,
        },
        tag::LISTING => {
            let n = r.count(4 + 32 + 8 + 1)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let name = r.text("name")?;
                let manifest = ManifestId(r.id32()?);
                let created = r.u64()?;
                let header = match r.u8()? {
                    0 => None,
                    1 => Some(r.text("header")?),
                    f => return Err(r.bad(format!("header flag {f}"))),
                };
                entries.push(ListEntry {
                    name,
                    manifest,
                    created,
                    header,
                });
            }
            Message::Listing { entries }
        }
        tag::GC => Message::Gc {
            request: r.gc_request()?,
        },
        tag::GC_REPLY => {
            let (report, names_not_listed) = r.gc_report()?;
            Message::GcReply {
                report,
                names_not_listed,
            }
        }
        tag::REMOVE => Message::Remove {
            names: r.strings("name")?,
            prefix: match r.u8()? {
                0 => None,
                1 => Some(r.text("prefix")?),
                f => return Err(r.bad(format!("prefix flag {f}"))),
            },
        },
        tag::REMOVED => Message::Removed {
            names: r.strings("name")?,
            not_listed: r.u64()?,
        },
        _ => unreachable!("every known tag is matched above"),
    };
    r.end()?;
    Ok(msg)
}

/// Splits a byte stream into messages (for transports that deliver bytes in
/// arbitrary pieces, and for tests).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_frame: u32,
}

impl FrameDecoder {
    /// A decoder that refuses frames larger than `max_frame`.
    pub fn new(max_frame: u32) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max_frame,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `None` if more bytes are needed. After an
    /// error the stream is unusable (the peer is to be cut off).
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtoError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.buf[..HEADER_LEN]);
        let len = frame_len(header, self.max_frame)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = decode(&self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        msg.map(Some)
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

// ------------------------------------------------------------ server session

/// A refusal: the error to send, and whether the connection is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// What kind.
    pub kind: ErrorKind,
    /// For humans.
    pub message: String,
    /// Whether the peer is cut off (limits, protocol, authentication).
    pub fatal: bool,
}

impl Reject {
    fn fatal(kind: ErrorKind, message: impl Into<String>) -> Reject {
        Reject {
            kind,
            message: message.into(),
            fatal: true,
        }
    }

    fn refuse(kind: ErrorKind, message: impl Into<String>) -> Reject {
        Reject {
            kind,
            message: message.into(),
            fatal: false,
        }
    }

    /// The message that carries this refusal.
    pub fn to_message(&self) -> Message {
        Message::error(self.kind, self.message.clone())
    }
}

/// What the transport is to do for an accepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer which of `ids` the store lacks.
    Missing {
        /// Chunk ids.
        ids: Vec<ChunkId>,
    },
    /// Verify and import `chunks`.
    Put {
        /// The chunks.
        chunks: Vec<StoredChunk>,
    },
    /// Commit the manifest under the name.
    Commit {
        /// The name (checked against the write scope).
        name: Name,
        /// Stored manifest bytes.
        manifest: Vec<u8>,
    },
    /// Send the manifest of `name`, then report it with
    /// [`ServerSession::manifest_served`].
    GetManifest {
        /// The name (checked against the read scope).
        name: Name,
        /// Manifests the client holds (for a delta).
        have: Vec<ManifestId>,
    },
    /// Send these chunks (all readable on this session).
    GetChunks {
        /// Chunk ids.
        ids: Vec<ChunkId>,
    },
    /// List names under `prefix`, then filter with [`ServerSession::readable`].
    List {
        /// The prefix ("" for all).
        prefix: String,
    },
    /// Run a collection on the store (the token has the admin scope; the
    /// request is within its bounds).
    Gc {
        /// What to collect.
        request: GcRequest,
    },
    /// Remove these names (each writable; all or nothing: refuse with
    /// `NotFound` if one does not exist).
    RemoveNames {
        /// The names.
        names: Vec<Name>,
    },
    /// Remove every name under `prefix` (the whole prefix is writable).
    RemovePrefix {
        /// The prefix ("" for every name).
        prefix: String,
    },
}

#[derive(Debug)]
enum State {
    AwaitHello,
    Ready(Grant),
    Closed,
}

/// The server's side of one connection: authentication, then a check of
/// every request against the token's scopes and the limits.
#[derive(Debug)]
pub struct ServerSession {
    state: State,
    limits: Limits,
    /// Chunks of manifests served on this session: the only ones it may
    /// download. A token that cannot read a name cannot fetch its chunks
    /// by asking for their ids (one that may write can still commit a
    /// manifest naming them: docs/SECURITY.md, "Known gaps").
    readable: HashSet<ChunkId>,
    /// At most this many ids in `readable` ([`MAX_READABLE_IDS`]; tests
    /// lower it).
    max_readable: usize,
    /// The hash of the token it was welcomed with: to tell, when the
    /// server's tokens change, whether that token still has its scopes.
    token: Option<TokenHash>,
}

impl ServerSession {
    /// A new session on a connection.
    pub fn new(limits: Limits) -> Self {
        ServerSession {
            state: State::AwaitHello,
            limits,
            readable: HashSet::new(),
            max_readable: MAX_READABLE_IDS,
            token: None,
        }
    }

    /// The token's label and scopes, once authenticated.
    pub fn grant(&self) -> Option<&Grant> {
        match &self.state {
            State::Ready(g) => Some(g),
            State::AwaitHello | State::Closed => None,
        }
    }

    /// Handles the first message: a `Hello` with a known token gets a
    /// `Welcome`; anything else is refused and the connection closed.
    pub fn on_hello(&mut self, msg: Message, tokens: &TokenTable) -> Result<Message, Reject> {
        if self.grant().is_some() {
            return Err(Reject::fatal(
                ErrorKind::Protocol,
                "hello sent twice on one connection",
            ));
        }
        let Message::Hello { version, token } = msg else {
            return Err(Reject::fatal(
                ErrorKind::Protocol,
                format!("expected hello, got {}", msg.kind_name()),
            ));
        };
        if version != VERSION {
            return Err(Reject::fatal(
                ErrorKind::Version,
                format!(
                    "this server speaks protocol version {VERSION}, the client {version}: \
                     use a ferry of the same release as the server"
                ),
            ));
        }
        if token.is_empty() {
            return Err(Reject::fatal(
                ErrorKind::Unauthenticated,
                "no token: pass --token-file FILE or set FERRY_TOKEN_FILE",
            ));
        }
        let hash = TokenHash::of(&token);
        let Some(grant) = tokens.grant_of(&hash) else {
            return Err(Reject::fatal(
                ErrorKind::Unauthenticated,
                "the token is not known to this server (check the token file, \
                 and that its SHA-256 is in the server's config)",
            ));
        };
        let welcome = Message::Welcome {
            version: VERSION,
            limits: self.limits,
            read: grant.scopes.read.iter().map(|s| s.to_string()).collect(),
            write: grant.scopes.write.iter().map(|s| s.to_string()).collect(),
        };
        self.state = State::Ready(grant.clone());
        self.token = Some(hash);
        Ok(welcome)
    }

    /// The server's tokens were replaced (its config reloaded): a session
    /// whose token is gone, or whose scopes (or admin) changed, is closed
    /// with the refusal to send. It is not moved to the new scopes, because
    /// requests it has in flight were checked against the old ones; the
    /// client reconnects and is welcomed (or refused) afresh. A new label
    /// or connection limit alone leaves it open.
    pub fn on_tokens_changed(&mut self, tokens: &TokenTable) -> Result<(), Reject> {
        let State::Ready(grant) = &self.state else {
            return Ok(());
        };
        let now = self.token.as_ref().and_then(|h| tokens.grant_of(h));
        if now.is_some_and(|g| g.scopes == grant.scopes) {
            return Ok(());
        }
        let label = grant.label.clone();
        self.close();
        Err(Reject::fatal(
            ErrorKind::Unauthenticated,
            match now {
                None => format!(
                    "the server no longer accepts this token (\"{label}\"): its config was \
                     reloaded without it; use a token it accepts"
                ),
                Some(_) => format!(
                    "the server's config was reloaded and changed what this token (\"{label}\") \
                     may do; run the command again to reconnect under the new grant"
                ),
            },
        ))
    }

    fn batch(&self, n: usize, what: &str) -> Result<(), Reject> {
        if n > self.limits.max_batch_ids as usize {
            return Err(Reject::fatal(
                ErrorKind::Limit,
                format!(
                    "{what} of {n} exceeds the batch limit of {}",
                    self.limits.max_batch_ids
                ),
            ));
        }
        Ok(())
    }

    fn name(text: &str) -> Result<Name, Reject> {
        Name::parse(text).map_err(|e| Reject::refuse(ErrorKind::BadName, e.to_string()))
    }

    fn writable(scopes: &Scopes, text: &str) -> Result<Name, Reject> {
        let name = Self::name(text)?;
        if !scopes.can_write(&name) {
            return Err(Reject::refuse(
                ErrorKind::Forbidden,
                format!(
                    "this token may not write {:?} (it writes {})",
                    name.as_str(),
                    scopes.describe_write()
                ),
            ));
        }
        Ok(name)
    }

    /// Checks a request; returns what to do, or the refusal to send.
    pub fn on_request(&mut self, msg: Message) -> Result<Action, Reject> {
        let grant = match &self.state {
            State::Ready(grant) => grant,
            State::AwaitHello => {
                return Err(Reject::fatal(
                    ErrorKind::Unauthenticated,
                    "request before hello",
                ))
            }
            State::Closed => {
                return Err(Reject::fatal(
                    ErrorKind::Protocol,
                    "the connection is being closed",
                ))
            }
        };
        let scopes = &grant.scopes;
        match msg {
            Message::Missing { name, ids } => {
                self.batch(ids.len(), "a missing query")?;
                Self::writable(scopes, &name)?;
                Ok(Action::Missing { ids })
            }
            Message::PutChunks { name, chunks } => {
                self.batch(chunks.len(), "an upload")?;
                Self::writable(scopes, &name)?;
                Ok(Action::Put { chunks })
            }
            Message::Commit { name, manifest } => {
                let name = Self::writable(scopes, &name)?;
                Ok(Action::Commit { name, manifest })
            }
            Message::GetManifest { name, mut have } => {
                have.truncate(MAX_HAVE);
                let name = Self::name(&name)?;
                if !scopes.can_read(&name) {
                    return Err(Reject::refuse(
                        ErrorKind::Forbidden,
                        format!(
                            "this token may not read {:?} (it reads {})",
                            name.as_str(),
                            scopes.describe_read()
                        ),
                    ));
                }
                Ok(Action::GetManifest { name, have })
            }
            Message::GetChunks { ids } => {
                self.batch(ids.len(), "a chunk request")?;
                if let Some(bad) = ids.iter().find(|id| !self.readable.contains(id)) {
                    return Err(Reject::refuse(
                        ErrorKind::Forbidden,
                        format!(
                            "chunk {bad} is not part of a manifest fetched on this connection \
                             (fetch the manifest of a readable name first)"
                        ),
                    ));
                }
                Ok(Action::GetChunks { ids })
            }
            Message::List { prefix } => Ok(Action::List { prefix }),
            Message::Remove { names, prefix } => {
                self.batch(names.len(), "a removal")?;
                match prefix {
                    Some(_) if !names.is_empty() => Err(Reject::refuse(
                        ErrorKind::Protocol,
                        "a removal names either names or a prefix, not both",
                    )),
                    Some(prefix) => {
                        let prefix = prefix.trim_end_matches('/').to_string();
                        if !prefix.is_empty() {
                            Self::name(&prefix)?;
                        }
                        if !scopes.can_write_under(&prefix) {
                            return Err(Reject::refuse(
                                ErrorKind::Forbidden,
                                format!(
                                    "this token may not write every name under {prefix:?} \
                                     (it writes {}); nothing was removed",
                                    scopes.describe_write()
                                ),
                            ));
                        }
                        Ok(Action::RemovePrefix { prefix })
                    }
                    None if names.is_empty() => Err(Reject::refuse(
                        ErrorKind::Protocol,
                        "a removal names no name",
                    )),
                    None => {
                        let names = names
                            .iter()
                            .map(|n| Self::writable(scopes, n))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|mut r| {
                                r.message.push_str("; nothing was removed");
                                r
                            })?;
                        Ok(Action::RemoveNames { names })
                    }
                }
            }
            Message::Gc { request } => {
                if !scopes.admin {
                    return Err(Reject::refuse(
                        ErrorKind::Forbidden,
                        format!(
                            "the token {:?} does not have the admin scope, which a remote gc \
                             needs (add `admin = true` to its [[token]] entry in the server's \
                             config, or use an admin token); nothing was collected",
                            grant.label
                        ),
                    ));
                }
                request.check().map_err(|(kind, message)| {
                    Reject::refuse(
                        kind,
                        format!("the gc request is invalid: {message}; nothing was collected"),
                    )
                })?;
                Ok(Action::Gc { request })
            }
            other => Err(Reject::fatal(
                ErrorKind::Protocol,
                format!("{} is not a request", other.kind_name()),
            )),
        }
    }

    /// Marks the session as cut off (after a fatal refusal): no further
    /// request is served while the connection closes.
    pub fn close(&mut self) {
        self.state = State::Closed;
    }

    /// Whether [`ServerSession::close`] was called.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Records that `manifest` is being sent: its chunks may now be
    /// downloaded. Refused (and nothing recorded) when this session would
    /// then hold more than [`MAX_READABLE_IDS`] chunk ids: what one
    /// connection may have fetched is bounded, not the whole store.
    pub fn manifest_served(&mut self, manifest: &Manifest) -> Result<(), Reject> {
        let new: HashSet<ChunkId> = manifest
            .chunks()
            .map(|c| c.id)
            .filter(|id| !self.readable.contains(id))
            .collect();
        if self.readable.len() + new.len() > self.max_readable {
            return Err(Reject::refuse(
                ErrorKind::Limit,
                format!(
                    "this connection has fetched manifests of {} chunks; {} more would pass \
                     the {} one connection may download: fetch this stash on a new \
                     connection",
                    self.readable.len(),
                    new.len(),
                    self.max_readable
                ),
            ));
        }
        self.readable.extend(new);
        Ok(())
    }

    /// Whether the token may see `name` in a listing.
    pub fn readable(&self, name: &str) -> bool {
        match (self.grant(), Name::parse(name)) {
            (Some(g), Ok(n)) => g.scopes.can_read(&n),
            _ => false,
        }
    }
}

// ------------------------------------------------------------ client helpers

/// Checks the server's answer to `Hello`.
pub fn check_welcome(msg: Message) -> Result<(Limits, Vec<String>, Vec<String>), Reject> {
    match msg {
        Message::Welcome {
            version,
            limits,
            read,
            write,
        } => {
            if version != VERSION {
                return Err(Reject::fatal(
                    ErrorKind::Version,
                    format!("the server speaks protocol version {version}, this client {VERSION}"),
                ));
            }
            if limits.max_frame < MIN_FRAME || limits.max_batch_ids == 0 || limits.max_streams == 0
            {
                return Err(Reject::fatal(
                    ErrorKind::Protocol,
                    format!("the server announced unusable limits {limits:?}"),
                ));
            }
            Ok((limits, read, write))
        }
        Message::Error { kind, message } => Err(Reject::fatal(kind, message)),
        other => Err(Reject::fatal(
            ErrorKind::Protocol,
            format!("expected welcome, got {}", other.kind_name()),
        )),
    }
}

/// Groups chunks (by their sizes) into batches of at most `max_ids` chunks
/// and at most `max_bytes` bytes each (a chunk larger than `max_bytes` goes
/// alone). Returns index ranges into `sizes`.
pub fn batches(sizes: &[u64], max_ids: usize, max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let max_ids = max_ids.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        let cost = s + CHUNK_OVERHEAD as u64;
        if i > start && (i - start >= max_ids || bytes + cost > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += cost;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

#[cfg(test)]
mod tests;
