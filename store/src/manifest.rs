//! Manifests: what a stash is. Its kind, length, SHA-256, image metadata,
//! and the recipe that rebuilds its bytes exactly: the chunks of the
//! metadata stream and of the content stream (see [`crate::tarsplit`]), and
//! the layout that interleaves them.
//!
//! Encoding (then zstd-compressed; the manifest id is the BLAKE3 of the
//! stored bytes): `FERRYMF1`, a length-prefixed JSON header, then two chunk
//! lists (`u64` count, then 32-byte id + `u32` length each) and the layout
//! (`u64` count, first part as a byte, then LEB128 run lengths that
//! alternate between the parts). Decoding trusts nothing: every count is
//! bounded by the bytes that remain, no chunk is longer than the chunker
//! makes them, no run is empty, and the totals must agree. A decoded
//! manifest takes about as much memory as its encoding (see
//! [`crate::layout`]), which [`Manifest::decode_within`] bounds.

use crate::image::ImageInfo;
pub use crate::layout::Layout;
use crate::tarsplit::Part;
use crate::ChunkId;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"FERRYMF1";
/// Largest encoding (uncompressed) [`Manifest::decode`] accepts. A 2.5 GB
/// docker archive of 71,000 files encodes to 1.3 MB, so this is room for
/// stashes of several hundred GB; a server bounds what peers send further.
pub const MAX_ENCODED: usize = 1 << 30;

/// What kind of thing was stashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StashKind {
    /// A regular file that is not a recognised archive.
    File,
    /// A stream from standard input that is not a recognised archive.
    Stream,
    /// A directory, stored as a deterministic tar of its tree.
    Directory,
    /// A tar archive that is not a container image.
    Tar,
    /// `docker save` output, legacy layout.
    DockerArchive,
    /// `docker save` output, Docker 25+ (OCI) layout.
    DockerOciArchive,
    /// An OCI image layout in a tar.
    OciLayout,
}

impl StashKind {
    /// Lower-case name, as shown by `ferry ls`.
    pub fn as_str(self) -> &'static str {
        match self {
            StashKind::File => "file",
            StashKind::Stream => "stream",
            StashKind::Directory => "directory",
            StashKind::Tar => "tar",
            StashKind::DockerArchive => "docker-archive",
            StashKind::DockerOciArchive => "docker-oci-archive",
            StashKind::OciLayout => "oci-layout",
        }
    }
}

/// One chunk of a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk's id.
    pub id: ChunkId,
    /// Its raw length.
    pub len: u32,
}

/// The small, human-meaningful part of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// What was stashed.
    pub kind: StashKind,
    /// Total length of the byte stream.
    pub size: u64,
    /// SHA-256 of the whole byte stream, hex.
    pub sha256: String,
    /// The file or directory name stashed, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Image metadata, for container images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
}

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Kind, size, digest, metadata.
    pub header: Header,
    /// Chunks of the metadata stream (tar headers and padding).
    pub meta: Vec<ChunkRef>,
    /// Chunks of the content stream (file data, or everything).
    pub content: Vec<ChunkRef>,
    /// The interleaving: runs of (part, length) in stream order.
    pub layout: Layout,
}

/// A manifest that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Its bytes are not a valid manifest.
    #[error("corrupt manifest: {0}")]
    Corrupt(String),
    /// Its encoding is larger than the decoder was allowed to expand.
    #[error("the manifest is {size} bytes uncompressed, more than the {limit} accepted here")]
    TooLarge {
        /// Its uncompressed size, as its zstd frame declares it.
        size: u64,
        /// The limit.
        limit: usize,
    },
}

impl ManifestError {
    pub(crate) fn new(what: &str) -> ManifestError {
        ManifestError::Corrupt(what.to_string())
    }
}

fn bad(what: impl Into<String>) -> ManifestError {
    ManifestError::Corrupt(what.into())
}

impl Manifest {
    /// Encodes and compresses the manifest; returns the stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("a header always serialises");
        let mut out =
            Vec::with_capacity(64 + header.len() + 36 * (self.meta.len() + self.content.len()));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for list in [&self.meta, &self.content] {
            out.extend_from_slice(&(list.len() as u64).to_le_bytes());
            for c in list {
                out.extend_from_slice(&c.id.0);
                out.extend_from_slice(&c.len.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.layout.len().to_le_bytes());
        if !self.layout.is_empty() {
            out.push(part_code(self.layout.first_part()));
        }
        out.extend_from_slice(self.layout.encoded_lens());
        zstd::bulk::compress(&out, 3).expect("compressing to memory cannot fail")
    }

    /// Decodes stored bytes (untrusted) of at most [`MAX_ENCODED`] bytes
    /// uncompressed.
    pub fn decode(stored: &[u8]) -> Result<Manifest, ManifestError> {
        Manifest::decode_within(stored, MAX_ENCODED)
    }

    /// Decodes stored bytes (untrusted) whose encoding is at most
    /// `max_encoded` bytes uncompressed (at most [`MAX_ENCODED`]). The
    /// decoded manifest takes about as much memory again.
    pub fn decode_within(stored: &[u8], max_encoded: usize) -> Result<Manifest, ManifestError> {
        let max_encoded = max_encoded.min(MAX_ENCODED);
        // Our encoder records the size: say so plainly when it is too large.
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(stored) {
            if size > max_encoded as u64 {
                return Err(ManifestError::TooLarge {
                    size,
                    limit: max_encoded,
                });
            }
        }
        let raw = zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress(stored, max_encoded))
            .map_err(|e| {
                bad(format!(
                    "not a zstd frame of at most {max_encoded} bytes: {e}"
                ))
            })?;
        let mut r = Reader { bytes: &raw };
        if r.take(8)? != MAGIC {
            return Err(bad(
                "wrong magic (not a ferry manifest, or a newer version)",
            ));
        }
        let header_len = r.u32()? as usize;
        let header: Header =
            serde_json::from_slice(r.take(header_len)?).map_err(|e| bad(format!("header: {e}")))?;
        let mut lists = [Vec::new(), Vec::new()];
        // What each stream holds, which the runs must use up exactly.
        let mut totals = [0u64; 2];
        for (list, total) in lists.iter_mut().zip(&mut totals) {
            let n = r.count(36)?;
            list.reserve(n);
            for _ in 0..n {
                let id = ChunkId(r.take(32)?.try_into().expect("32 bytes"));
                let len = r.u32()?;
                if len == 0 || len > crate::repo::MAX_CHUNK {
                    return Err(bad(format!(
                        "a chunk of length {len} (chunks are 1 to {} bytes)",
                        crate::repo::MAX_CHUNK
                    )));
                }
                list.push(ChunkRef { id, len });
                *total += u64::from(len); // at most 2^32 chunks of 2^24 bytes
            }
        }
        // What the streams hold, for the header's size below.
        let sizes = totals;
        let runs = r.count(1)? as u64;
        let first = if runs > 0 {
            match r.take(1)?[0] {
                0 => Part::Meta,
                1 => Part::Content,
                other => return Err(bad(format!("unknown part code {other}"))),
            }
        } else {
            Part::Meta
        };
        let (layout, rest) = Layout::decode(
            first,
            runs,
            r.bytes,
            |part, len| {
                // Checked as each run is read, so that a forged layout is
                // refused at its first impossible run.
                let left = &mut totals[part as usize];
                if len == 0 {
                    return Err(bad("an empty layout run"));
                }
                *left = left
                    .checked_sub(len)
                    .ok_or_else(|| bad("the layout asks for more bytes than the chunks hold"))?;
                Ok(())
            },
            || bad("truncated or overflowing layout run"),
        )?;
        r.bytes = rest;
        if !r.bytes.is_empty() {
            return Err(bad("trailing bytes"));
        }
        // The runs used up what they could (checked above); they must
        // also use up all of it, and the streams make the stashed size.
        if totals != [0, 0] {
            return Err(bad(
                "layout and chunk lists disagree on the stream's length",
            ));
        }
        if sizes[0].checked_add(sizes[1]) != Some(header.size) {
            return Err(bad("size does not match the recipe"));
        }
        let [meta, content] = lists;
        Ok(Manifest {
            header,
            meta,
            content,
            layout,
        })
    }

    /// Decodes only the header of stored bytes (untrusted): what a listing
    /// shows, at a cost that does not grow with the chunk lists behind it.
    /// The rest is not checked.
    pub fn decode_header(stored: &[u8]) -> Result<Header, ManifestError> {
        use std::io::Read;
        let not_zstd = |e: std::io::Error| bad(format!("not a zstd frame: {e}"));
        let mut d = zstd::stream::read::Decoder::with_buffer(stored).map_err(not_zstd)?;
        let mut start = [0u8; 12];
        d.read_exact(&mut start).map_err(|_| bad("truncated"))?;
        if &start[..8] != MAGIC {
            return Err(bad(
                "wrong magic (not a ferry manifest, or a newer version)",
            ));
        }
        let header_len = u32::from_le_bytes(start[8..].try_into().expect("4 bytes"));
        if header_len as usize > MAX_ENCODED {
            return Err(bad("a header longer than any manifest may be"));
        }
        // Grows as bytes arrive: a forged length reserves nothing.
        let mut header = Vec::new();
        d.take(u64::from(header_len))
            .read_to_end(&mut header)
            .map_err(not_zstd)?;
        if header.len() != header_len as usize {
            return Err(bad("truncated"));
        }
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))
    }

    /// Every chunk the manifest names, both streams.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.meta.iter().chain(&self.content)
    }
}

fn part_code(p: Part) -> u8 {
    match p {
        Part::Meta => 0,
        Part::Content => 1,
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        if n > self.bytes.len() {
            return Err(bad("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, ManifestError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    /// A count of items of at least `item` bytes each, bounded by what is left.
    fn count(&mut self, item: usize) -> Result<usize, ManifestError> {
        let n = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
        if n > (self.bytes.len() / item) as u64 {
            return Err(bad(format!(
                "a count of {n} does not fit in the bytes left"
            )));
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            header: Header {
                kind: StashKind::Tar,
                size: 1000 + 24,
                sha256: "ab".repeat(32),
                source: Some("x.tar".into()),
                image: None,
            },
            meta: vec![ChunkRef {
                id: ChunkId::of(b"m"),
                len: 24,
            }],
            content: vec![
                ChunkRef {
                    id: ChunkId::of(b"a"),
                    len: 600,
                },
                ChunkRef {
                    id: ChunkId::of(b"b"),
                    len: 400,
                },
            ],
            layout: [(Part::Meta, 12), (Part::Content, 1000), (Part::Meta, 12)]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let mut m = sample();
        m.header.size += 1;
        assert!(Manifest::decode(&m.encode())
            .unwrap_err()
            .to_string()
            .contains("size"));
        let mut m = sample();
        m.layout = [(Part::Meta, 12), (Part::Content, 999), (Part::Meta, 12)]
            .into_iter()
            .collect();
        assert!(Manifest::decode(&m.encode()).is_err());
    }

    /// The encoding of a manifest with the given chunk lists and a layout
    /// of `runs` runs given as raw LEB128 bytes, compressed.
    fn forged(size: u64, meta: &[u32], content: &[u32], runs: u64, lens: &[u8]) -> Vec<u8> {
        let header = serde_json::to_vec(&Header {
            kind: StashKind::Stream,
            size,
            sha256: "00".repeat(32),
            source: None,
            image: None,
        })
        .unwrap();
        let mut raw = MAGIC.to_vec();
        raw.extend_from_slice(&(header.len() as u32).to_le_bytes());
        raw.extend_from_slice(&header);
        for list in [meta, content] {
            raw.extend_from_slice(&(list.len() as u64).to_le_bytes());
            for (i, len) in list.iter().enumerate() {
                raw.extend_from_slice(&ChunkId::of(&i.to_le_bytes()).0);
                raw.extend_from_slice(&len.to_le_bytes());
            }
        }
        raw.extend_from_slice(&runs.to_le_bytes());
        raw.push(1); // content first
        raw.extend_from_slice(lens);
        zstd::bulk::compress(&raw, 19).unwrap()
    }

    /// A few KiB that decompress to 64 MiB of layout: refused at the first
    /// run the chunks cannot hold, and empty runs are refused outright, so
    /// a small upload cannot make a decoder build a huge layout.
    #[test]
    fn forged_layouts_are_refused_at_their_first_impossible_run() {
        let n = 64u64 << 20;
        let ones = forged(3, &[], &[3], n, &vec![1u8; n as usize]);
        let zeros = forged(3, &[], &[3], n, &vec![0u8; n as usize]);
        assert!(ones.len() < 64 << 10 && zeros.len() < 64 << 10);
        let e = Manifest::decode(&ones).unwrap_err().to_string();
        assert!(e.contains("more bytes than the chunks hold"), "{e}");
        let e = Manifest::decode(&zeros).unwrap_err().to_string();
        assert!(e.contains("empty layout run"), "{e}");
        // Chunks longer than any chunker makes are refused too.
        let e = Manifest::decode(&forged(
            1 << 25,
            &[],
            &[1 << 25],
            1,
            &[0x80, 0x80, 0x80, 0x10],
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("chunks are 1 to"), "{e}");
        // One content run that uses up the one chunk is fine.
        let m = Manifest::decode(&forged(3, &[], &[3], 1, &[3])).unwrap();
        assert_eq!(m.layout.iter().collect::<Vec<_>>(), [(Part::Content, 3)]);
    }

    #[test]
    fn the_header_decodes_alone() {
        let m = sample();
        assert_eq!(Manifest::decode_header(&m.encode()).unwrap(), m.header);
        // Only what a header needs is read: damage behind it goes unseen.
        let mut raw = zstd::bulk::decompress(&m.encode(), 1 << 20).unwrap();
        let behind = raw.len() - 1;
        raw[behind] ^= 0xff;
        let damaged = zstd::bulk::compress(&raw, 1).unwrap();
        assert!(Manifest::decode(&damaged).is_err());
        assert_eq!(Manifest::decode_header(&damaged).unwrap(), m.header);
        // A header length past the end is refused, not reserved.
        let forged = |len: u32| {
            let mut raw = MAGIC.to_vec();
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(b"{}");
            Manifest::decode_header(&zstd::bulk::compress(&raw, 1).unwrap())
        };
        assert_eq!(forged(1 << 20), Err(bad("truncated")));
        assert_eq!(
            forged(u32::MAX),
            Err(bad("a header longer than any manifest may be"))
        );
        assert!(Manifest::decode_header(b"not zstd").is_err());
    }

    #[test]
    fn decode_within_bounds_the_encoding() {
        let m = sample();
        let stored = m.encode();
        let raw_len = zstd::bulk::decompress(&stored, 1 << 20).unwrap().len();
        assert_eq!(Manifest::decode_within(&stored, raw_len).unwrap(), m);
        assert_eq!(
            Manifest::decode_within(&stored, raw_len - 1),
            Err(ManifestError::TooLarge {
                size: raw_len as u64,
                limit: raw_len - 1
            })
        );
        // A frame that does not declare its size is cut off all the same.
        let raw = zstd::bulk::decompress(&stored, 1 << 20).unwrap();
        let mut undeclared = Vec::new();
        let mut enc = zstd::stream::write::Encoder::new(&mut undeclared, 3).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &raw).unwrap();
        enc.finish().unwrap();
        assert!(matches!(
            zstd::zstd_safe::get_frame_content_size(&undeclared),
            Ok(None)
        ));
        assert_eq!(Manifest::decode_within(&undeclared, raw_len).unwrap(), m);
        let e = Manifest::decode_within(&undeclared, raw_len - 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("at most {} bytes", raw_len - 1)), "{e}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
            // Valid zstd around garbage too.
            let _ = Manifest::decode(&zstd::bulk::compress(&bytes, 1).unwrap());
        }

        #[test]
        fn damaged_manifest_never_panics(at in any::<prop::sample::Index>(), flip in 1u8..) {
            let raw = {
                let enc = sample().encode();
                zstd::bulk::decompress(&enc, 1 << 20).unwrap()
            };
            let mut damaged = raw.clone();
            let i = at.index(damaged.len());
            damaged[i] ^= flip;
            let _ = Manifest::decode(&zstd::bulk::compress(&damaged, 1).unwrap());
            for cut in [0, raw.len() / 2, raw.len() - 1] {
                let _ = Manifest::decode(&zstd::bulk::compress(&raw[..cut], 1).unwrap());
            }
        }
    }
}
