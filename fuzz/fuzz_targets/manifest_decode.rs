//! store::manifest::Manifest::decode on untrusted stored bytes (and
//! decode_header, decode_within, the placement of a decoded manifest's
//! chunks), and
//! transfer::delta::apply on an untrusted delta.
//!
//! Mode byte: 0 = the bytes as stored (a zstd frame); 1 = the bytes are the
//! uncompressed encoding (compressed here, so the fuzzer works on the
//! format itself); 2 = a manifest delta against a fixed base (first 32
//! bytes: the target id). A manifest that decodes must encode and decode
//! back to itself, with a stable encoding.
#![no_main]

use ferry_fuzz::{delta_base, mode};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use store::manifest::Manifest;
use store::ManifestId;

fn check(stored: &[u8]) {
    // What a listing reads: never a panic, and the full decode's header
    // when that succeeds.
    let header = Manifest::decode_header(stored);
    let Ok(m) = Manifest::decode(stored) else {
        return;
    };
    assert_eq!(header.as_ref(), Ok(&m.header), "the header alone decodes otherwise");
    // A bound at its exact size takes it, one byte less does not.
    let size = zstd::bulk::decompress(stored, store::manifest::MAX_ENCODED)
        .expect("it decoded")
        .len();
    assert_eq!(Manifest::decode_within(stored, size).as_ref(), Ok(&m));
    assert!(Manifest::decode_within(stored, size - 1).is_err());
    // The totals were checked: the recipe describes `size` bytes.
    let total: u64 = m.layout.iter().map(|(_, n)| n).sum();
    assert!(m.layout.iter().all(|(_, n)| n > 0), "an empty run decoded");
    assert_eq!(total, m.header.size);
    // A remote unstash into a file places its chunks by this: every byte
    // of the output belongs to exactly one piece of one chunk.
    let placement = store::place::Placement::of(&m).expect("a decoded manifest places");
    assert_eq!(placement.size(), m.header.size);
    let mut pieces: Vec<_> = placement
        .chunks()
        .iter()
        .flat_map(|id| placement.pieces(id).expect("its own chunk").to_vec())
        .collect();
    pieces.sort_unstable_by_key(|p| p.at);
    let mut at = 0;
    for p in pieces {
        assert_eq!(p.at, at, "a gap or an overlap in the placement");
        at += u64::from(p.len);
    }
    assert_eq!(at, m.header.size);
    let enc = m.encode();
    let back = Manifest::decode(&enc).expect("a re-encoded manifest decodes");
    assert_eq!(back, m, "decode -> encode -> decode changed the manifest");
    assert_eq!(back.encode(), enc, "encoding is not stable");
}

fuzz_target!(|data: &[u8]| {
    let Some((m, rest)) = mode(data) else { return };
    match m % 3 {
        0 => check(rest),
        1 => check(&zstd::bulk::compress(rest, 1).expect("compress to memory")),
        _ => {
            static BASE: OnceLock<Vec<u8>> = OnceLock::new();
            let base = BASE.get_or_init(delta_base);
            if rest.len() < 32 {
                return;
            }
            let (id, delta) = rest.split_at(32);
            let id = ManifestId(id.try_into().expect("32 bytes"));
            if let Some(stored) = transfer::delta::apply(base, delta, &id) {
                assert_eq!(
                    ManifestId::of(&stored),
                    id,
                    "apply returned another manifest"
                );
                check(&stored);
            }
        }
    }
});
