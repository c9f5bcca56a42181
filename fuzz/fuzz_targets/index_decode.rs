//! store::pack::decode_idx on untrusted `.idx` bytes, and the index built
//! from it.
//!
//! Mode byte: 0 = the bytes as they are; 1 = the pack id and checksum are
//! recomputed first, so the fuzzer gets past them to the entry checks. An
//! `.idx` that decodes re-encodes to exactly its bytes, and its entries
//! are in order, inside the blob area, and consistent.
#![no_main]

use ferry_fuzz::mode;
use libfuzzer_sys::fuzz_target;
use store::index::Index;
use store::pack::{decode_idx, encode_idx, pack_id, Codec, HEADER_LEN};

/// `.idx` layout: magic 8, version 4, pack id 32, nonce 16, data_end 8,
/// count 8, entries, checksum 32.
const ID_AT: usize = 12;
const NONCE_AT: usize = 44;
const TABLE_AT: usize = 76;

fn fix_up(bytes: &mut [u8]) {
    if bytes.len() < TABLE_AT + 32 {
        return;
    }
    let body_end = bytes.len() - 32;
    let nonce: [u8; 16] = bytes[NONCE_AT..NONCE_AT + 16].try_into().unwrap();
    let id = pack_id(&bytes[TABLE_AT..body_end], &nonce);
    bytes[ID_AT..ID_AT + 32].copy_from_slice(&id.0);
    // The checksum is BLAKE3, as a chunk id is.
    let sum = store::ChunkId::of(&bytes[..body_end]).0;
    bytes[body_end..].copy_from_slice(&sum);
}

fuzz_target!(|data: &[u8]| {
    let Some((m, rest)) = mode(data) else { return };
    let mut bytes = rest.to_vec();
    if m & 1 == 1 {
        fix_up(&mut bytes);
    }
    let Ok(idx) = decode_idx(&bytes) else { return };
    assert_eq!(
        encode_idx(&idx),
        bytes,
        "decode -> encode is not the identity"
    );
    let mut next = HEADER_LEN;
    for e in &idx.entries {
        assert!(e.offset >= next, "entries overlap or are out of order");
        next = e.offset + u64::from(e.stored_len);
        assert!(next <= idx.data_end, "entry past the blob area");
        if e.codec == Codec::Raw {
            assert_eq!(e.stored_len, e.raw_len);
        }
    }
    let mut index = Index::new();
    index.insert_pack(idx.pack, &idx.entries);
    for e in &idx.entries {
        let loc = index.get(&e.id).expect("an inserted chunk is indexed");
        assert_eq!(loc.pack, idx.pack);
    }
    assert!(index.len() <= idx.entries.len());
});
