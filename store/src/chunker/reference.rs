//! The portable reference kernel: FastCDC 2020 exactly as specified, one
//! byte at a time. Every other kernel is tested against it.

use super::gear::GEAR;
use super::kernel::Window;
use super::Chunker;

/// First cut in `window`, hashing from the chunk's minimum size onwards.
pub(super) fn search(c: &Chunker, data: &[u8], w: &Window) -> Option<usize> {
    let mut hash = 0u64;
    for (p, &byte) in data.iter().enumerate().take(w.limit_s).skip(w.first) {
        hash = (hash << 1).wrapping_add(GEAR[byte as usize]);
        if hash & c.mask_s == 0 {
            return Some(p);
        }
    }
    for (p, &byte) in data.iter().enumerate().take(w.limit).skip(w.limit_s) {
        hash = (hash << 1).wrapping_add(GEAR[byte as usize]);
        if hash & c.mask_l == 0 {
            return Some(p);
        }
    }
    None
}
