//! The inner loop of the lanes kernel: four gear hashes rolled together
//! over four byte runs until one of them has no bit of a mask set.
//!
//! Two versions with identical results: portable Rust (every CPU, ARM
//! included) and, on x86-64, the same loop in assembly. The loop is bound
//! by instruction throughput, not by the hash's dependency chain: for each
//! byte and lane it loads the byte, loads its gear value, shifts-and-adds,
//! and tests. The compiler spends six instructions per byte and lane on it
//! (a shift and an add instead of one `lea`, a copy and an `and` instead of
//! a `test`, a bounds check per byte); the assembly spends four and checks
//! the bound once per eight bytes: chunking runs about 1.4 times as fast
//! (BENCHMARKS.md §1).

use super::gear::GEAR;

/// Rolls `hash[k] = (hash[k] << 1) + GEAR[byte]` over the bytes of
/// `lanes[k]`, all four together, and stops after the first position where
/// some hash has no bit of `mask` set, or at the end of the shortest run.
/// Returns how many bytes each lane rolled.
pub(super) type Roll4 = fn(&[&[u8]; 4], &mut [u64; 4], u64) -> usize;

/// Portable Rust. Out of line and free of calls so that the four chains
/// stay in registers.
#[inline(never)]
pub(super) fn portable(lanes: &[&[u8]; 4], hash: &mut [u64; 4], mask: u64) -> usize {
    let [mut h0, mut h1, mut h2, mut h3] = *hash;
    let mut rolled = 0;
    // Zipped slice iterators share one counter: no bounds checks.
    let bytes = lanes[0].iter().zip(lanes[1]).zip(lanes[2]).zip(lanes[3]);
    for (((&b0, &b1), &b2), &b3) in bytes {
        h0 = (h0 << 1).wrapping_add(GEAR[b0 as usize]);
        h1 = (h1 << 1).wrapping_add(GEAR[b1 as usize]);
        h2 = (h2 << 1).wrapping_add(GEAR[b2 as usize]);
        h3 = (h3 << 1).wrapping_add(GEAR[b3 as usize]);
        rolled += 1;
        // Rare: about one position in 2^14 for 64 KiB chunks.
        if h0 & mask == 0 || h1 & mask == 0 || h2 & mask == 0 || h3 & mask == 0 {
            break;
        }
    }
    *hash = [h0, h1, h2, h3];
    rolled
}

/// Bytes per lane that one pass of the assembly loop rolls.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
const UNROLL: usize = 8;

/// One byte position `$j` of the assembly loop: the four lanes' bytes,
/// their gear values, the four shift-and-adds, then the four tests, each
/// leaving for exit `3$j` on a hit.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
macro_rules! roll_slot {
    ($j:literal) => {
        concat!(
            "movzx {t0:e}, byte ptr [{e0} + {idx} + ",
            $j,
            "]\n",
            "movzx {t1:e}, byte ptr [{e1} + {idx} + ",
            $j,
            "]\n",
            "movzx {t2:e}, byte ptr [{e2} + {idx} + ",
            $j,
            "]\n",
            "movzx {t3:e}, byte ptr [{e3} + {idx} + ",
            $j,
            "]\n",
            "mov {t0}, qword ptr [{gear} + 8*{t0}]\n",
            "mov {t1}, qword ptr [{gear} + 8*{t1}]\n",
            "mov {t2}, qword ptr [{gear} + 8*{t2}]\n",
            "mov {t3}, qword ptr [{gear} + 8*{t3}]\n",
            "lea {h0}, [{t0} + 2*{h0}]\n",
            "lea {h1}, [{t1} + 2*{h1}]\n",
            "lea {h2}, [{t2} + 2*{h2}]\n",
            "lea {h3}, [{t3} + 2*{h3}]\n",
            "test {h0}, {mask}\n",
            "jz 3",
            $j,
            "f\n",
            "test {h1}, {mask}\n",
            "jz 3",
            $j,
            "f\n",
            "test {h2}, {mask}\n",
            "jz 3",
            $j,
            "f\n",
            "test {h3}, {mask}\n",
            "jz 3",
            $j,
            "f\n",
        )
    };
}

/// Exit `3$j`: a hit at byte `$j` of the pass; count it as rolled.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
macro_rules! roll_exit {
    ($j:literal) => {
        concat!("3", $j, ":\n", "add {idx}, ", $j, " + 1\n", "jmp 9f\n")
    };
}

/// The portable loop's x86-64 twin: same arguments, same result.
#[cfg(all(target_arch = "x86_64", not(fuzzing)))]
#[inline(never)]
pub(super) fn x86_64(lanes: &[&[u8]; 4], hash: &mut [u64; 4], mask: u64) -> usize {
    let n = lanes.iter().map(|l| l.len()).min().unwrap_or(0);
    let whole = n / UNROLL * UNROLL;
    if whole == 0 {
        return portable(lanes, hash, mask);
    }
    let [mut h0, mut h1, mut h2, mut h3] = *hash;
    // The loop indexes every lane from its `whole`-th byte with one
    // negative offset that counts up to zero.
    let ends: [*const u8; 4] = std::array::from_fn(|k| lanes[k][whole..].as_ptr());
    let mut idx = -(whole as isize);
    // SAFETY: every load is in bounds. The byte loads read
    // `ends[k] + idx + j` with `-whole <= idx < 0` a multiple of UNROLL and
    // `j < UNROLL`, i.e. `lanes[k][whole + idx + j]`, below `whole <= len`.
    // The gear loads index the 256-entry table with a zero-extended byte.
    // The block only reads memory (`readonly`), uses no stack (`nostack`),
    // and declares every register it writes.
    unsafe {
        std::arch::asm!(
            "2:",
            roll_slot!(0),
            roll_slot!(1),
            roll_slot!(2),
            roll_slot!(3),
            roll_slot!(4),
            roll_slot!(5),
            roll_slot!(6),
            roll_slot!(7),
            "add {idx}, 8",
            "jnz 2b",
            "jmp 9f",
            roll_exit!(0),
            roll_exit!(1),
            roll_exit!(2),
            roll_exit!(3),
            roll_exit!(4),
            roll_exit!(5),
            roll_exit!(6),
            roll_exit!(7),
            "9:",
            e0 = in(reg) ends[0],
            e1 = in(reg) ends[1],
            e2 = in(reg) ends[2],
            e3 = in(reg) ends[3],
            gear = in(reg) GEAR.as_ptr(),
            mask = in(reg) mask,
            idx = inout(reg) idx,
            h0 = inout(reg) h0,
            h1 = inout(reg) h1,
            h2 = inout(reg) h2,
            h3 = inout(reg) h3,
            t0 = out(reg) _,
            t1 = out(reg) _,
            t2 = out(reg) _,
            t3 = out(reg) _,
            options(nostack, readonly),
        );
    }
    *hash = [h0, h1, h2, h3];
    // `idx` is minus the bytes not rolled. At zero, all were rolled and the
    // last one may still have been a hit: then some hash has no mask bit.
    let rolled = (whole as isize + idx) as usize;
    if idx < 0 || hash.iter().any(|h| h & mask == 0) {
        return rolled;
    }
    let tails: [&[u8]; 4] = std::array::from_fn(|k| &lanes[k][whole..]);
    whole + portable(&tails, hash, mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::pseudo_random;

    /// Every implementation this CPU runs besides the portable one, which
    /// the tests compare them with (none on CPUs without an assembly loop).
    #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
    fn others() -> Vec<(&'static str, Roll4)> {
        vec![("x86_64", x86_64)]
    }

    #[cfg(not(all(target_arch = "x86_64", not(fuzzing))))]
    fn others() -> Vec<(&'static str, Roll4)> {
        Vec::new()
    }

    /// The same stop and hashes as the portable loop for runs of every
    /// length up to five passes, starting at every offset, so that the
    /// first hit falls on every byte of a pass, of the last pass and of the
    /// tail, in every lane; also with a mask that (almost) never hits.
    #[test]
    fn every_version_rolls_like_the_portable_one() {
        let data = pseudo_random(1 << 16, 7);
        // Three to seven mask bits put the first hit of four lanes anywhere
        // in the first few dozen bytes.
        let masks = [
            0x0000_0100_0001_0100u64,
            0x0000_0101_0101_0100,
            0x0000_1101_0101_0110,
            0x0000_d907_0353_0000,
            u64::MAX,
        ];
        for mask in masks {
            for len in 0..=41 {
                for start in 0..64 {
                    let starts = [start, 5000 + 2 * start, 20_000 + 3 * start, 40_000];
                    let lanes: [&[u8]; 4] =
                        std::array::from_fn(|k| &data[starts[k]..starts[k] + len + k]);
                    let seed = [1u64, 2, 3, u64::MAX];
                    let mut want = seed;
                    let want_rolled = portable(&lanes, &mut want, mask);
                    for (name, roll) in others() {
                        let mut got = seed;
                        let rolled = roll(&lanes, &mut got, mask);
                        let case = format!("{name} mask {mask:#x} len {len} start {start}");
                        assert_eq!(rolled, want_rolled, "{case}");
                        assert_eq!(got, want, "{case}");
                    }
                }
            }
        }
    }

    /// Rolling on from each stop until the runs end visits the same stops.
    #[test]
    fn every_version_stops_at_the_same_positions() {
        let data = pseudo_random(1 << 18, 9);
        let mask = 0x0000_0100_0001_0100u64; // a hit about every 2^3 positions and lane
        let quarter = data.len() / 4;
        let walk = |roll: Roll4| {
            let (mut pos, mut hash, mut stops) = (0, [0u64; 4], Vec::new());
            while pos < quarter {
                let lanes: [&[u8]; 4] =
                    std::array::from_fn(|k| &data[k * quarter + pos..(k + 1) * quarter]);
                pos += roll(&lanes, &mut hash, mask);
                stops.push((pos, hash));
            }
            stops
        };
        let wstops = walk(portable);
        assert!(wstops.len() > 1000, "the mask should hit often");
        for (name, roll) in others() {
            let stops = walk(roll);
            assert_eq!(stops, wstops, "{name}");
        }
    }
}
