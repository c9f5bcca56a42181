//! Manifest deltas: a node that holds v1 of an image fetches v2's manifest
//! as the difference, not whole. A 25 GB image has a manifest of ~12 MiB
//! (its chunk ids); a rebuild changes a few hundred of them.
//!
//! The delta is a zstd frame of v2's *uncompressed* manifest encoding,
//! compressed with v1's uncompressed encoding as dictionary (a few KiB when
//! little changed). The receiver rebuilds the stored form by compressing
//! the result the way the store does and checks it against the manifest
//! id; if that does not reproduce the id (a store that compresses
//! manifests differently), it asks for the whole manifest. Correctness never
//! depends on the delta: only the id does.

use std::io::Read;
use store::ManifestId;

/// zstd level of stored manifests (`store::manifest::Manifest::encode`).
/// The `delta_round_trips_real_manifests` test fails if it changes.
const STORED_LEVEL: i32 = 3;

/// Largest uncompressed manifest handled (a 25 GB image needs ~15 MiB).
const MAX_RAW: u64 = 256 << 20;

/// Largest zstd window used (2^27 = 128 MiB, zstd's default decoder limit).
const MAX_WINDOW_LOG: u32 = 27;

fn window_log(total: usize) -> u32 {
    let bits = usize::BITS - total.max(1).leading_zeros();
    bits.clamp(20, MAX_WINDOW_LOG)
}

fn read_bounded(r: impl Read) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    r.take(MAX_RAW + 1).read_to_end(&mut out).ok()?;
    (out.len() as u64 <= MAX_RAW).then_some(out)
}

/// The uncompressed encoding of a stored manifest.
pub fn raw(stored: &[u8]) -> Option<Vec<u8>> {
    let mut d = zstd::stream::read::Decoder::new(stored).ok()?;
    d.window_log_max(MAX_WINDOW_LOG).ok()?;
    read_bounded(d)
}

/// The delta that turns `base` into `target` (both stored manifests), or
/// `None` if it would not be smaller than `target` itself.
pub fn make(base: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    let (base, raw_target) = (raw(base)?, raw(target)?);
    let mut c = zstd::bulk::Compressor::with_dictionary(STORED_LEVEL, &base).ok()?;
    let log = window_log(base.len() + raw_target.len());
    c.set_parameter(zstd::stream::raw::CParameter::WindowLog(log))
        .ok()?;
    c.set_parameter(zstd::stream::raw::CParameter::EnableLongDistanceMatching(
        true,
    ))
    .ok()?;
    let delta = c.compress(&raw_target).ok()?;
    (delta.len() < target.len()).then_some(delta)
}

/// Rebuilds the stored manifest `id` from `base` (stored) and `delta`;
/// `None` if the delta is damaged or does not reproduce `id`.
pub fn apply(base: &[u8], delta: &[u8], id: &ManifestId) -> Option<Vec<u8>> {
    let base = raw(base)?;
    let mut d = zstd::stream::read::Decoder::with_dictionary(delta, &base).ok()?;
    d.window_log_max(MAX_WINDOW_LOG).ok()?;
    let raw_target = read_bounded(d)?;
    let stored = zstd::bulk::compress(&raw_target, STORED_LEVEL).ok()?;
    (ManifestId::of(&stored) == *id).then_some(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::name::Name;
    use store::repo::{NoProgress, Source, Store};

    fn stored(store: &Store, name: &str) -> (ManifestId, Vec<u8>) {
        store.manifest_bytes(&Name::parse(name).unwrap()).unwrap()
    }

    #[test]
    fn delta_round_trips_real_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut data = vec![0u8; 6 << 20];
        let mut x = 1u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let stash = |n: &str, d: &[u8]| {
            s.stash(
                &Name::parse(n).unwrap(),
                Source::Reader(Box::new(std::io::Cursor::new(d.to_vec()))),
                &NoProgress,
            )
            .unwrap()
        };
        stash("v1", &data);
        data[3 << 20] ^= 1;
        stash("v2", &data);
        let (id1, m1) = stored(&s, "v1");
        let (id2, m2) = stored(&s, "v2");
        let d = make(&m1, &m2).expect("a delta smaller than the manifest");
        assert!(d.len() * 4 < m2.len(), "delta {} of {}", d.len(), m2.len());
        // The receiver reproduces the stored bytes exactly (the id says so).
        assert_eq!(apply(&m1, &d, &id2).unwrap(), m2);
        // Against the wrong base, or damaged, it is refused, never wrong.
        // (Another base may happen to work; what comes out is right or nothing.)
        assert!(apply(&m2, &d, &id2).is_none_or(|m| m == m2));
        let mut bad = d.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x55;
        assert!(apply(&m1, &bad, &id2).is_none());
        assert!(apply(&m1, &d, &id1).is_none());
        assert!(apply(b"junk", &d, &id2).is_none());
        assert!(make(b"junk", &m2).is_none());
    }
}
