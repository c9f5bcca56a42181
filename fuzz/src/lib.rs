//! Helpers shared by the fuzz targets and the seed generator
//! (`examples/gen_seeds.rs`): fixed sample objects built with the real
//! encoders, so seeds and targets agree on them.

use store::manifest::{ChunkRef, Header, Manifest, StashKind};
use store::tarsplit::Part;
use store::ChunkId;

/// A small but real manifest: two meta chunks, `n` content chunks.
pub fn sample_manifest(n: usize, salt: u8) -> Manifest {
    let meta = vec![
        ChunkRef {
            id: ChunkId::of(&[salt, 0]),
            len: 512,
        },
        ChunkRef {
            id: ChunkId::of(&[salt, 1]),
            len: 1024,
        },
    ];
    let content: Vec<ChunkRef> = (0..n)
        .map(|i| ChunkRef {
            id: ChunkId::of(&[salt, 2, i as u8]),
            len: 1000 + i as u32,
        })
        .collect();
    let content_len: u64 = content.iter().map(|c| u64::from(c.len)).sum();
    Manifest {
        header: Header {
            kind: StashKind::Tar,
            size: 1536 + content_len,
            sha256: "ab".repeat(32),
            source: Some(format!("sample-{salt}.tar")),
            image: None,
        },
        meta,
        content,
        layout: [
            (Part::Meta, 512),
            (Part::Content, content_len),
            (Part::Meta, 1024),
        ]
        .into_iter()
        .collect(),
    }
}

/// The stored base manifest that `manifest_decode` applies deltas to.
pub fn delta_base() -> Vec<u8> {
    sample_manifest(24, 1).encode()
}

/// Splits fuzz input into a mode byte and the rest.
pub fn mode(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(&m, rest)| (m, rest))
}
