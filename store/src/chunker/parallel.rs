//! Parallel chunking with the same cut points as the sequential walk.
//!
//! The buffer is cut into segments; each is chunked on its own as if a
//! chunk started at its first byte, and hashed, on rayon's pool. The chains
//! are then stitched into the real one (`kernel::stitch`): where the real
//! chain reaches a cut of a segment's own chain, every later cut of that
//! segment is real too. Chunks the real chain shares with a segment keep
//! the segment's hash; the few others are hashed here.

use super::kernel::stitch;
use super::{Chunk, Chunker};
use rayon::prelude::*;

/// Smallest segment worth a task of its own.
const MIN_SEGMENT: usize = 8 << 20;

/// Chunks and hashes every decided chunk of `data` (all of them if `eof`).
/// Returns them and the offset where the first undecided chunk starts.
pub(super) fn chunk_and_hash(c: &Chunker, data: &[u8], eof: bool) -> (Vec<Chunk>, usize) {
    let threads = rayon::current_num_threads();
    let seg_len = (data.len() / (threads * 4)).max(MIN_SEGMENT);
    let segments = data.len().div_ceil(seg_len).max(1);
    let bounds: Vec<usize> = (0..=segments)
        .map(|k| (k * seg_len).min(data.len()))
        .collect();
    let run = |k: usize| -> (Vec<usize>, Vec<Chunk>) {
        let (start, stop) = (bounds[k], bounds[k + 1]);
        // A segment looks one maximal chunk past its end, no further.
        let to = (stop + c.max).min(data.len());
        c.kernel.chain_hashed(
            c,
            &data[..to],
            start,
            stop,
            eof && to == data.len(),
            k == 0, // only the first segment starts at a known cut
            c.eager,
        )
    };
    let parts: Vec<(Vec<usize>, Vec<Chunk>)> = if segments == 1 {
        vec![run(0)]
    } else {
        (0..segments).into_par_iter().map(run).collect()
    };
    let (chains, hashed): (Vec<Vec<usize>>, Vec<Vec<Chunk>>) = parts.into_iter().unzip();
    let mut ends = Vec::with_capacity(chains.iter().map(Vec::len).sum());
    let next = stitch(c, data, eof, &bounds, &chains, &mut ends);
    // Chunks the real chain shares with a segment keep its hash.
    let out = super::assign_ids(data, 0, &ends, hashed.into_iter().flatten().collect());
    (out, next)
}
