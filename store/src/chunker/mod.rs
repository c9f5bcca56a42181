//! Content-defined chunking: FastCDC 2020, with BLAKE3 ids computed in the
//! same pass.
//!
//! Cut points are identical to the `fastcdc` crate's `v2020` module for the
//! same min/avg/max and normalization level (a differential test checks it).
//! Three ways in, all with the same cuts:
//!
//! - [`Chunker::cuts`] / [`Chunker::chunk_and_hash`] over a byte slice
//!   (zero-copy; files come in through `memmap2`);
//! - [`Chunker::par_chunk_and_hash`], which splits the slice into segments,
//!   chunks them on rayon's pool and stitches them together — the result
//!   equals the sequential one for any thread count;
//! - [`StreamChunker`], push-based with a bounded buffer, for pipes.
//!
//! ```
//! use store::chunker::{Chunker, ChunkerParams};
//! let chunker = Chunker::new(ChunkerParams::default()).unwrap();
//! let data = vec![7u8; 1 << 20];
//! let chunks = chunker.chunk_and_hash(&data);
//! assert_eq!(chunks.iter().map(|c| c.len as usize).sum::<usize>(), data.len());
//! ```

mod gear;
mod kernel;
mod parallel;
mod reference;
mod roll;
mod stream;

pub use kernel::Kernel;
pub use stream::{Batch, StreamChunker};

use crate::ChunkId;
use serde::{Deserialize, Serialize};

/// How strongly FastCDC 2020 pulls chunk sizes towards the average
/// (the "normalization level"; 0 is plain gear CDC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Normalization {
    /// No normalization: one mask everywhere.
    Level0,
    /// One bit harder before the average, one bit easier after it (default).
    Level1,
    /// Two bits.
    Level2,
    /// Three bits.
    Level3,
}

impl Normalization {
    fn bits(self) -> u32 {
        match self {
            Normalization::Level0 => 0,
            Normalization::Level1 => 1,
            Normalization::Level2 => 2,
            Normalization::Level3 => 3,
        }
    }
}

/// Chunk size bounds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// No chunk is shorter, except the last one of a stream.
    pub min: usize,
    /// The size chunks are normalized towards.
    pub avg: usize,
    /// No chunk is longer.
    pub max: usize,
    /// Normalization level.
    pub normalization: Normalization,
}

impl Default for ChunkerParams {
    /// 16 KiB / 64 KiB / 256 KiB, normalization level 1.
    fn default() -> Self {
        ChunkerParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
            normalization: Normalization::Level1,
        }
    }
}

/// Chunk sizes that FastCDC 2020 cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunk sizes min={min} avg={avg} max={max}: {reason}")]
pub struct ParamsError {
    min: usize,
    avg: usize,
    max: usize,
    reason: &'static str,
}

/// One chunk of a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk's first byte in the chunked input.
    pub offset: u64,
    /// Length in bytes (at most 16 MiB).
    pub len: u32,
    /// BLAKE3 of the chunk's bytes.
    pub id: ChunkId,
}

/// A configured FastCDC 2020 chunker. Cheap to copy and share.
#[derive(Debug, Clone, Copy)]
pub struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    kernel: Kernel,
    /// Hash each chunk as soon as the lanes kernel finds it.
    eager: bool,
}

impl Chunker {
    /// A chunker with the given sizes, using the fastest kernel this CPU runs.
    pub fn new(params: ChunkerParams) -> Result<Self, ParamsError> {
        Self::with_kernel(params, Kernel::detect())
    }

    /// A chunker that uses `kernel` (tests and benchmarks compare them).
    pub fn with_kernel(params: ChunkerParams, kernel: Kernel) -> Result<Self, ParamsError> {
        let ChunkerParams { min, avg, max, .. } = params;
        let err = |reason| {
            Err(ParamsError {
                min,
                avg,
                max,
                reason,
            })
        };
        if !(64..=1 << 20).contains(&min) {
            return err("min must be between 64 B and 1 MiB");
        }
        if !(256..=4 << 20).contains(&avg) {
            return err("avg must be between 256 B and 4 MiB");
        }
        if !(1024..=16 << 20).contains(&max) {
            return err("max must be between 1 KiB and 16 MiB");
        }
        if min % 2 != 0 || avg % 2 != 0 || max % 2 != 0 {
            return err("sizes must be even");
        }
        if !(min <= avg && avg <= max) {
            return err("sizes must satisfy min <= avg <= max");
        }
        // Round log2 the way FastCDC does, so odd averages pick the same masks.
        let bits = (avg as f64).log2().round() as u32;
        let level = params.normalization.bits();
        Ok(Chunker {
            min,
            avg,
            max,
            mask_s: gear::MASKS[(bits + level) as usize],
            mask_l: gear::MASKS[(bits - level) as usize],
            kernel,
            eager: true,
        })
    }

    /// The sizes this chunker was built with.
    pub fn params(&self) -> (usize, usize, usize) {
        (self.min, self.avg, self.max)
    }

    /// The kernel in use.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// This chunker hashing each chunk as soon as it is found, while its
    /// bytes are in the CPU's cache (`true`, the default), or all of them
    /// after chunking (`false`; tests and benchmarks compare the two). The
    /// ids are the same either way.
    pub fn with_eager_hashing(mut self, eager: bool) -> Self {
        self.eager = eager;
        self
    }

    /// Largest chunk this chunker emits.
    pub fn max_size(&self) -> usize {
        self.max
    }

    /// End offsets of the chunks of `data` (the last one is `data.len()`).
    pub fn cuts(&self, data: &[u8]) -> Vec<usize> {
        let mut ends = Vec::with_capacity(data.len() / self.avg + 1);
        self.kernel.cut_all(self, data, 0, true, &mut ends);
        ends
    }

    /// Chunks of `data` with their BLAKE3 ids, on the calling thread.
    pub fn chunk_and_hash(&self, data: &[u8]) -> Vec<Chunk> {
        let (ends, hashed) =
            self.kernel
                .chain_hashed(self, data, 0, data.len(), true, true, self.eager);
        assign_ids(data, 0, &ends, hashed)
    }

    /// Like [`Chunker::chunk_and_hash`], spread over the current rayon pool.
    /// The chunks are the same for any number of threads.
    pub fn par_chunk_and_hash(&self, data: &[u8]) -> Vec<Chunk> {
        parallel::chunk_and_hash(self, data, true).0
    }
}

/// Hashes the chunks `[start, ends[0])`, `[ends[0], ends[1])`, … of `data`.
fn hash_chunks(data: &[u8], start: usize, ends: &[usize], out: &mut Vec<Chunk>) {
    let mut begin = start;
    for &end in ends {
        let bytes = &data[begin..end];
        out.push(Chunk {
            offset: begin as u64,
            len: bytes.len() as u32,
            id: ChunkId::of(bytes),
        });
        begin = end;
    }
}

/// The chunks `[start, ends[0])`, `[ends[0], ends[1])`, … of `data` with
/// their ids: taken from `hashed` where it has the same chunk, else
/// computed here.
fn assign_ids(data: &[u8], start: usize, ends: &[usize], hashed: Vec<Chunk>) -> Vec<Chunk> {
    let known: std::collections::HashMap<(u64, u32), ChunkId> = hashed
        .into_iter()
        .map(|c| ((c.offset, c.len), c.id))
        .collect();
    let mut out = Vec::with_capacity(ends.len());
    let mut begin = start;
    for &end in ends {
        let (offset, len) = (begin as u64, (end - begin) as u32);
        let id = match known.get(&(offset, len)) {
            Some(id) => *id,
            None => ChunkId::of(&data[begin..end]),
        };
        out.push(Chunk { offset, len, id });
        begin = end;
    }
    out
}

#[cfg(test)]
mod tests;
