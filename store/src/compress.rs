//! Per-chunk compression: zstd where it pays, raw where it does not
//! (layers of already-compressed files, media, packed archives).

use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// How a chunk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is.
    Raw = 0,
    /// A zstd frame.
    Zstd = 1,
}

impl Codec {
    /// The on-disk code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Decodes an on-disk code; `None` for unknown codes.
    pub fn from_code(code: u8) -> Option<Codec> {
        match code {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// zstd level used by stash. Level 1 keeps a stash ahead of `zstd -3 -T0`
/// on the same machine while storing within a few percent of it (see
/// BENCHMARKS.md); chunk-level dedup does the rest.
pub const DEFAULT_LEVEL: i32 = 1;

/// Compression is kept only when it saves at least 1/32 of the chunk:
/// below that, decompressing costs more than the bytes saved.
fn pays(raw: usize, compressed: usize) -> bool {
    compressed + raw / 32 < raw
}

/// A chunk whose stored bytes do not decode to what their id says.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// zstd rejected the frame.
    #[error("corrupt zstd frame: {0}")]
    Zstd(std::io::Error),
    /// The frame decoded to the wrong length.
    #[error("decoded to {got} bytes, expected {expected}")]
    Length {
        /// Length the index promised.
        expected: usize,
        /// Length decoded.
        got: usize,
    },
    /// The promised length is larger than any chunk ferry writes.
    #[error(
        "a chunk of {raw_len} bytes is larger than the largest chunk ({} bytes)",
        crate::repo::MAX_CHUNK
    )]
    TooLarge {
        /// Length the index promised.
        raw_len: usize,
    },
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses one chunk at `level`, or keeps it raw when that does not pay.
/// `out` is overwritten with the stored bytes; returns the codec used.
pub fn compress(data: &[u8], level: i32, out: &mut Vec<u8>) -> Codec {
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    let compressed = COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().map(|(l, _)| *l) != Some(level) {
            *cell = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let (_, compressor) = cell.as_mut()?;
        compressor.compress_to_buffer(data, out).ok()
    });
    match compressed {
        Some(n) if pays(data.len(), n) => Codec::Zstd,
        _ => {
            out.clear();
            out.extend_from_slice(data);
            Codec::Raw
        }
    }
}

/// Decodes a stored chunk of `raw_len` bytes into `out` (cleared first).
pub fn decompress_into(
    codec: Codec,
    stored: &[u8],
    raw_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    out.clear();
    // The length comes from a pack entry: a damaged or forged one must not
    // make us reserve gigabytes before the frame is even looked at.
    if raw_len > crate::repo::MAX_CHUNK as usize {
        return Err(DecodeError::TooLarge { raw_len });
    }
    match codec {
        Codec::Raw => out.extend_from_slice(stored),
        Codec::Zstd => {
            out.reserve(raw_len);
            DECOMPRESSOR.with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(zstd::bulk::Decompressor::new().map_err(DecodeError::Zstd)?);
                }
                let d = cell.as_mut().expect("set above");
                // Never trust the frame's own size: decode into at most raw_len.
                d.decompress_to_buffer(stored, out)
                    .map_err(DecodeError::Zstd)
            })?;
        }
    }
    if out.len() != raw_len {
        return Err(DecodeError::Length {
            expected: raw_len,
            got: out.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_falls_back_to_raw() {
        let text: Vec<u8> = b"ferry moves images "
            .iter()
            .copied()
            .cycle()
            .take(100_000)
            .collect();
        let mut stored = Vec::new();
        assert_eq!(compress(&text, DEFAULT_LEVEL, &mut stored), Codec::Zstd);
        assert!(stored.len() < text.len() / 10);
        let mut back = Vec::new();
        decompress_into(Codec::Zstd, &stored, text.len(), &mut back).unwrap();
        assert_eq!(back, text);

        let noise: Vec<u8> = (0..50_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut stored = Vec::new();
        let codec = compress(&noise, DEFAULT_LEVEL, &mut stored);
        let mut back = Vec::new();
        decompress_into(codec, &stored, noise.len(), &mut back).unwrap();
        assert_eq!(back, noise);
    }

    #[test]
    fn corrupt_frames_are_errors() {
        let mut back = Vec::new();
        assert!(decompress_into(Codec::Zstd, b"not zstd", 10, &mut back).is_err());
        let mut stored = Vec::new();
        compress(&[5u8; 10_000], 3, &mut stored);
        // A frame that decodes to more than promised must not be accepted.
        assert!(decompress_into(Codec::Zstd, &stored, 100, &mut back).is_err());
        assert!(decompress_into(Codec::Raw, b"abc", 4, &mut back).is_err());
    }

    /// Found by the `pack_read` fuzz target: a pack entry promising a
    /// 3.5 GB chunk made decoding reserve 3.5 GB up front.
    #[test]
    fn lying_length_reserves_nothing() {
        let mut stored = Vec::new();
        assert_eq!(compress(&[5u8; 10_000], 3, &mut stored), Codec::Zstd);
        for codec in [Codec::Zstd, Codec::Raw] {
            let mut back = Vec::new();
            let err = decompress_into(codec, &stored, 3_590_325_727, &mut back).unwrap_err();
            assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
            assert!(back.capacity() < 1 << 20);
        }
        // The largest chunk still decodes.
        let big = vec![7u8; crate::repo::MAX_CHUNK as usize];
        compress(&big, 1, &mut stored);
        let mut back = Vec::new();
        decompress_into(Codec::Zstd, &stored, big.len(), &mut back).unwrap();
        assert_eq!(back, big);
    }
}
