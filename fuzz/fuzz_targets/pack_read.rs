//! store::pack: reading a whole (possibly damaged) pack — header, trailer,
//! entry table — then every chunk in it, as an unstash does (decode with
//! the entry's codec into `raw_len` bytes, check the BLAKE3 id) and as fsck
//! does.
//!
//! Mode byte: 0 = the pack as it is; 1 = the trailer's pack id is
//! recomputed first (it is the table's checksum), so the fuzzer reaches the
//! entry checks and the chunk decoding. A footer that decodes re-encodes to
//! the same table and names itself; a chunk that decodes has exactly
//! `raw_len` bytes.
#![no_main]

use ferry_fuzz::mode;
use libfuzzer_sys::fuzz_target;
use store::compress::{decompress_into, Codec};
use store::pack::{
    decode_trailer, encode_entries, pack_id, read_pack_index, HEADER_LEN, TRAILER_LEN,
};
use store::ChunkId;

const TRAILER: usize = TRAILER_LEN as usize;

/// Recompute the trailer's pack id over the table it announces.
fn fix_up(pack: &mut [u8]) {
    if pack.len() < HEADER_LEN as usize + TRAILER {
        return;
    }
    let t = pack.len() - TRAILER;
    let table_len = u64::from_le_bytes(pack[t..t + 8].try_into().unwrap());
    let Some(start) = (t as u64).checked_sub(table_len) else {
        return;
    };
    if start < HEADER_LEN {
        return;
    }
    let nonce: [u8; 16] = pack[t + 8..t + 24].try_into().unwrap();
    let id = pack_id(&pack[start as usize..t], &nonce);
    pack[t + 24..t + 56].copy_from_slice(&id.0);
}

fuzz_target!(|data: &[u8]| {
    let Some((m, rest)) = mode(data) else { return };
    let mut pack = rest.to_vec();
    if m & 1 == 1 {
        fix_up(&mut pack);
    }
    let trailer_at = pack.len().saturating_sub(TRAILER);
    let _ = decode_trailer(&pack[trailer_at..], pack.len() as u64);
    let Ok(index) = read_pack_index(&pack) else {
        return;
    };
    let table = &pack[index.data_end as usize..trailer_at];
    assert_eq!(
        encode_entries(&index.entries),
        table,
        "table does not re-encode"
    );
    assert_eq!(pack_id(table, &index.nonce), index.pack);
    let mut out = Vec::new();
    for e in index.entries.iter().take(256) {
        let (start, end) = (e.offset as usize, e.offset as usize + e.stored_len as usize);
        assert!(start >= HEADER_LEN as usize && end <= index.data_end as usize);
        let stored = &pack[start..end];
        if decompress_into(e.codec, stored, e.raw_len as usize, &mut out).is_ok() {
            assert_eq!(out.len(), e.raw_len as usize, "decoded to the wrong length");
            if e.codec == Codec::Raw {
                assert_eq!(out, stored);
            }
            // A damaged chunk is caught by its id (what read_chunk checks).
            let _ = ChunkId::of(&out) == e.id;
        }
    }
});
