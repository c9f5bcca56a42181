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
//! bounded by the bytes that remain and the totals must agree.

use crate::image::ImageInfo;
use crate::tarsplit::Part;
use crate::ChunkId;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"FERRYMF1";
/// Largest manifest accepted when decoding (a 25 GB image needs ~20 MiB).
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
    pub layout: Vec<(Part, u64)>,
}

/// A manifest that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt manifest: {0}")]
pub struct ManifestError(String);

impl ManifestError {
    pub(crate) fn new(what: &str) -> ManifestError {
        ManifestError(what.to_string())
    }
}

fn bad(what: impl Into<String>) -> ManifestError {
    ManifestError(what.into())
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
        out.extend_from_slice(&(self.layout.len() as u64).to_le_bytes());
        if let Some(&(first, _)) = self.layout.first() {
            out.push(part_code(first));
        }
        for &(_, len) in &self.layout {
            leb128(len, &mut out);
        }
        zstd::bulk::compress(&out, 3).expect("compressing to memory cannot fail")
    }

    /// Decodes stored bytes (untrusted).
    pub fn decode(stored: &[u8]) -> Result<Manifest, ManifestError> {
        let raw = zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress(stored, MAX_ENCODED))
            .map_err(|e| {
                bad(format!(
                    "not a zstd frame of at most {MAX_ENCODED} bytes: {e}"
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
        for list in &mut lists {
            let n = r.count(36)?;
            list.reserve(n);
            for _ in 0..n {
                let id = ChunkId(r.take(32)?.try_into().expect("32 bytes"));
                let len = r.u32()?;
                if len == 0 {
                    return Err(bad("a chunk of length 0"));
                }
                list.push(ChunkRef { id, len });
            }
        }
        let runs = r.count(1)?;
        let mut layout = Vec::with_capacity(runs);
        if runs > 0 {
            let mut part = match r.take(1)?[0] {
                0 => Part::Meta,
                1 => Part::Content,
                other => return Err(bad(format!("unknown part code {other}"))),
            };
            for _ in 0..runs {
                layout.push((part, r.leb128()?));
                part = match part {
                    Part::Meta => Part::Content,
                    Part::Content => Part::Meta,
                };
            }
        }
        if !r.bytes.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let [meta, content] = lists;
        let m = Manifest {
            header,
            meta,
            content,
            layout,
        };
        m.check_totals()?;
        Ok(m)
    }

    /// The layout and the chunk lists must describe the same bytes.
    fn check_totals(&self) -> Result<(), ManifestError> {
        let sum = |l: &[ChunkRef]| l.iter().map(|c| c.len as u64).sum::<u64>();
        let run_sum = |p: Part| {
            self.layout
                .iter()
                .filter(|(q, _)| *q == p)
                .try_fold(0u64, |a, (_, n)| a.checked_add(*n))
        };
        let (meta, content) = (run_sum(Part::Meta), run_sum(Part::Content));
        let (Some(meta), Some(content)) = (meta, content) else {
            return Err(bad("layout lengths overflow"));
        };
        if meta != sum(&self.meta) || content != sum(&self.content) {
            return Err(bad(
                "layout and chunk lists disagree on the stream's length",
            ));
        }
        if meta.checked_add(content) != Some(self.header.size) {
            return Err(bad("size does not match the recipe"));
        }
        Ok(())
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

fn leb128(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
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

    fn leb128(&mut self) -> Result<u64, ManifestError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= ((b & 0x7f) as u64)
                .checked_shl(shift)
                .filter(|_| shift < 63 || b <= 1)
                .ok_or_else(|| bad("run length overflows"))?;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("run length overflows"))
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
            layout: vec![(Part::Meta, 12), (Part::Content, 1000), (Part::Meta, 12)],
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
        m.layout[1].1 -= 1;
        assert!(Manifest::decode(&m.encode()).is_err());
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
