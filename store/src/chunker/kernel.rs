//! Kernel selection and the fast "lanes" kernel.
//!
//! FastCDC's hash, `h = (h << 1) + GEAR[byte]`, is one long dependency
//! chain: the reference kernel waits on it at every byte. The lanes kernel
//! splits the input into four stretches and runs the exact FastCDC
//! algorithm on each, interleaved in one loop, so four independent chains
//! keep the core busy. Each stretch is chunked as if a chunk started at its
//! first byte; the stretches are then stitched where their cuts meet the
//! real ones (see `stitch`), so the result is exactly the sequential one.
//! The loop (`roll.rs`) tests only the bits the two masks share, one test
//! and branch per byte and lane; the rare hits are checked against the
//! exact mask outside the loop.

use super::gear::GEAR;
use super::roll::{self, Roll4};
use super::{Chunk, Chunker};
use crate::ChunkId;
use serde::Serialize;

/// Which implementation finds cut points. All give identical cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    /// One byte at a time, as specified (the portable reference).
    Reference,
    /// Four interleaved FastCDC chains over four stretches of the input,
    /// stitched. Portable Rust: it is what ARM nodes run.
    Lanes,
    /// The lanes kernel with its inner loop in x86-64 assembly (x86-64
    /// only; every x86-64 CPU runs it, no feature detection needed).
    #[serde(rename = "lanes-asm")]
    LanesAsm,
}

impl Kernel {
    /// The kernel to use on this machine: `FERRY_CHUNKER_KERNEL` set to
    /// `reference`, `lanes` or `lanes-asm` overrides (`lanes-asm` means
    /// `lanes` where there is no assembly version); the `portable` cargo
    /// feature picks `lanes`, what CPUs without an assembly version run;
    /// otherwise the fastest.
    pub fn detect() -> Kernel {
        match std::env::var("FERRY_CHUNKER_KERNEL").as_deref() {
            Ok("reference") => return Kernel::Reference,
            Ok("lanes") => return Kernel::Lanes,
            Ok("lanes-asm") => return Kernel::fastest_lanes(),
            _ => {}
        }
        if cfg!(feature = "portable") {
            Kernel::Lanes
        } else {
            Kernel::fastest_lanes()
        }
    }

    fn fastest_lanes() -> Kernel {
        if cfg!(target_arch = "x86_64") {
            Kernel::LanesAsm
        } else {
            Kernel::Lanes
        }
    }

    /// Every kernel this CPU runs, for tests and benchmarks.
    pub fn all() -> &'static [Kernel] {
        if cfg!(target_arch = "x86_64") {
            &[Kernel::Reference, Kernel::Lanes, Kernel::LanesAsm]
        } else {
            &[Kernel::Reference, Kernel::Lanes]
        }
    }

    /// Short lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Reference => "reference",
            Kernel::Lanes => "lanes",
            Kernel::LanesAsm => "lanes-asm",
        }
    }

    /// Appends to `ends` the end of every chunk of `data[start..]` that is
    /// decided: all of them when `eof`, else those that no later byte can
    /// move. Returns the start of the first undecided chunk.
    pub(super) fn cut_all(
        self,
        c: &Chunker,
        data: &[u8],
        start: usize,
        eof: bool,
        ends: &mut Vec<usize>,
    ) -> usize {
        self.chain(c, data, start, data.len(), eof, ends)
    }

    /// The chain of chunks that starts at `start`: appends each chunk's end
    /// to `ends` and stops after the first end at or past `stop`, at the end
    /// of the data, or at an undecided chunk. Returns where the next chunk
    /// would start.
    pub(super) fn chain(
        self,
        c: &Chunker,
        data: &[u8],
        start: usize,
        stop: usize,
        eof: bool,
        ends: &mut Vec<usize>,
    ) -> usize {
        match self {
            Kernel::Reference => {
                let mut s = start;
                while s < stop {
                    match cut_reference(c, data, s, eof) {
                        Some(end) => {
                            ends.push(end);
                            s = end;
                        }
                        None => break,
                    }
                }
                s
            }
            Kernel::Lanes | Kernel::LanesAsm => lanes_chain(
                c,
                data,
                start,
                stop,
                eof,
                ends,
                &mut Plain(self.lanes_roll()),
            ),
        }
    }

    /// The lanes kernel's inner loop: the assembly one for `lanes-asm` on
    /// x86-64, else the portable one.
    fn lanes_roll(self) -> Roll4 {
        match self {
            // Sanitizer builds (cargo fuzz) cannot spare the 15 registers
            // the assembly loop asks for.
            #[cfg(all(target_arch = "x86_64", not(fuzzing)))]
            Kernel::LanesAsm => roll::x86_64,
            _ => roll::portable,
        }
    }

    /// [`Kernel::chain`] that also hashes the chunks: returns the chain's
    /// ends and the chunks it hashed. With `eager`, the lanes kernel hashes
    /// each chunk as soon as it finds it, while its bytes are still in the
    /// CPU's cache (the chunker has just read them; hashing them later
    /// reads them from memory again), and skips chunks that are only
    /// guesses — the first one of each stretch, and of the chain unless
    /// `start_is_cut` — so a few chunks of the chain may be missing:
    /// [`super::assign_ids`] hashes those. Otherwise it hashes the whole
    /// chain after chunking it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn chain_hashed(
        self,
        c: &Chunker,
        data: &[u8],
        start: usize,
        stop: usize,
        eof: bool,
        start_is_cut: bool,
        eager: bool,
    ) -> (Vec<usize>, Vec<Chunk>) {
        let mut ends = Vec::new();
        if eager && self != Kernel::Reference {
            let mut roller = Eager {
                roll: self.lanes_roll(),
                data,
                chunks: Vec::new(),
                start_is_cut,
            };
            lanes_chain(c, data, start, stop, eof, &mut ends, &mut roller);
            return (ends, roller.chunks);
        }
        self.chain(c, data, start, stop, eof, &mut ends);
        let mut chunks = Vec::with_capacity(ends.len());
        super::hash_chunks(data, start, &ends, &mut chunks);
        (ends, chunks)
    }
}

/// How the lanes kernel rolls its four hashes, and whom it tells of the
/// chunks it finds.
trait Roller {
    /// Rolls as [`Roll4`] does.
    fn roll(&mut self, lanes: &[&[u8]; 4], hash: &mut [u64; 4], mask: u64) -> usize;
    /// Lane `lane` found the chunk `start..end`, its `first`.
    fn chunk(&mut self, _lane: usize, _first: bool, _start: usize, _end: usize) {}
}

/// Just rolling.
struct Plain(Roll4);

impl Roller for Plain {
    fn roll(&mut self, lanes: &[&[u8]; 4], hash: &mut [u64; 4], mask: u64) -> usize {
        (self.0)(lanes, hash, mask)
    }
}

/// Rolling, and hashing every chunk as soon as it is found.
struct Eager<'a> {
    roll: Roll4,
    data: &'a [u8],
    /// The chunks hashed, in the order found.
    chunks: Vec<Chunk>,
    /// Whether lane 0's first chunk starts at a real cut.
    start_is_cut: bool,
}

impl Roller for Eager<'_> {
    fn roll(&mut self, lanes: &[&[u8]; 4], hash: &mut [u64; 4], mask: u64) -> usize {
        (self.roll)(lanes, hash, mask)
    }

    fn chunk(&mut self, lane: usize, first: bool, start: usize, end: usize) {
        // A stretch's first chunk starts at a guess, rarely at a real cut.
        if first && (lane > 0 || !self.start_is_cut) {
            return;
        }
        let bytes = &self.data[start..end];
        self.chunks.push(Chunk {
            offset: start as u64,
            len: bytes.len() as u32,
            id: ChunkId::of(bytes),
        });
    }
}

/// The positions a chunk starting at `start` may be cut at, as FastCDC
/// 2020 defines them: from `min` on, the strict mask before `avg`
/// (`limit_s`), the loose one up to `max` or the end of data (`limit`).
/// Positions are absolute indexes into the buffer.
pub(super) struct Window {
    pub(super) first: usize,
    pub(super) limit_s: usize,
    pub(super) limit: usize,
    /// Where the chunk ends if no position in the window matches; `None`
    /// if that is not decided yet (more data could still hold a cut).
    pub(super) otherwise: Option<usize>,
}

/// The window of the chunk at `start`, or `Err(end)` when the chunk is too
/// short to search (`end` is `None` while undecided).
fn window(c: &Chunker, len: usize, start: usize, eof: bool) -> Result<Window, Option<usize>> {
    let remaining = len - start;
    let complete = eof || remaining >= c.max;
    if remaining <= c.min {
        return Err(complete.then_some(len));
    }
    let size = remaining.min(c.max);
    // FastCDC checks positions in pairs, so odd limits round down.
    let center = c.avg.min(size);
    Ok(Window {
        first: start + c.min,
        limit_s: start + center / 2 * 2,
        limit: start + size / 2 * 2,
        otherwise: complete.then_some(start + size),
    })
}

/// One chunk by the reference kernel; `None` if undecided.
pub(super) fn cut_reference(c: &Chunker, data: &[u8], start: usize, eof: bool) -> Option<usize> {
    match window(c, data.len(), start, eof) {
        Err(end) => end,
        Ok(w) => super::reference::search(c, data, &w).or(w.otherwise),
    }
}

/// Per-stretch state of the lanes kernel: a FastCDC chunker paused at
/// byte `pos` of the current chunk's window.
struct Lane {
    pos: usize,
    hash: u64,
    window: Window,
    stop: usize,
    done: bool,
    ends: Vec<usize>,
}

impl Lane {
    fn new(c: &Chunker, len: usize, start: usize, stop: usize, eof: bool) -> Lane {
        let mut lane = Lane {
            pos: 0,
            hash: 0,
            window: Window {
                first: 0,
                limit_s: 0,
                limit: 0,
                otherwise: None,
            },
            stop,
            done: start >= stop,
            ends: Vec::new(),
        };
        if !lane.done {
            lane.begin(c, len, start, eof);
        }
        lane
    }

    /// Starts the chunk at `start`, cutting at once when it is too short.
    fn begin(&mut self, c: &Chunker, len: usize, mut start: usize, eof: bool) {
        loop {
            match window(c, len, start, eof) {
                Ok(w) => {
                    self.pos = w.first;
                    self.hash = 0;
                    self.window = w;
                    return;
                }
                Err(Some(end)) => {
                    if !self.cut(end) {
                        return;
                    }
                    start = end;
                }
                Err(None) => {
                    self.done = true;
                    return;
                }
            }
        }
    }

    /// Records a cut; returns whether the lane goes on.
    fn cut(&mut self, end: usize) -> bool {
        self.ends.push(end);
        if end >= self.stop {
            self.done = true;
        }
        !self.done
    }

    /// After rolling up to `pos`: acts on a hit at `pos - 1` or on the end
    /// of the window.
    fn settle(&mut self, c: &Chunker, len: usize, eof: bool) {
        let p = self.pos - 1;
        if self.pos > self.window.first {
            let mask = if p < self.window.limit_s {
                c.mask_s
            } else {
                c.mask_l
            };
            if self.hash & mask == 0 {
                if self.cut(p) {
                    self.begin(c, len, p, eof);
                }
                return;
            }
        }
        if self.pos == self.window.limit {
            match self.window.otherwise {
                Some(end) => {
                    if self.cut(end) {
                        self.begin(c, len, end, eof);
                    }
                }
                None => self.done = true,
            }
        }
    }
}

/// Smallest stretch worth a lane of its own.
fn min_stretch(c: &Chunker) -> usize {
    8 * c.max
}

fn lanes_chain(
    c: &Chunker,
    data: &[u8],
    start: usize,
    stop: usize,
    eof: bool,
    ends: &mut Vec<usize>,
    roller: &mut impl Roller,
) -> usize {
    const LANES: usize = 4;
    let len = data.len();
    let span = stop.saturating_sub(start);
    let common = c.mask_s & c.mask_l;
    if span < LANES * min_stretch(c) {
        let mut lane = Lane::new(c, len, start, stop, eof);
        run_single(c, data, eof, common, &mut lane);
        report(roller, 0, start, &lane.ends, 0);
        ends.extend_from_slice(&lane.ends);
        return lane.ends.last().copied().unwrap_or(start);
    }
    let stretch = span / LANES;
    let bounds: [usize; LANES + 1] = std::array::from_fn(|k| {
        if k == LANES {
            stop
        } else {
            start + k * stretch
        }
    });
    let mut lanes: [Lane; LANES] =
        std::array::from_fn(|k| Lane::new(c, len, bounds[k], bounds[k + 1], eof));

    // All four lanes roll together while none is done.
    while lanes.iter().all(|l| !l.done) {
        let k = lanes
            .iter()
            .map(|l| l.window.limit - l.pos)
            .min()
            .expect("four lanes");
        if k > 0 {
            let slices: [&[u8]; LANES] =
                std::array::from_fn(|i| &data[lanes[i].pos..lanes[i].pos + k]);
            let mut hash: [u64; LANES] = std::array::from_fn(|i| lanes[i].hash);
            let rolled = roller.roll(&slices, &mut hash, common);
            for (lane, h) in lanes.iter_mut().zip(hash) {
                lane.hash = h;
                lane.pos += rolled;
            }
        }
        for (k, lane) in lanes.iter_mut().enumerate() {
            let found = lane.ends.len();
            lane.settle(c, len, eof);
            report(roller, k, bounds[k], &lane.ends, found);
        }
    }
    for (k, lane) in lanes.iter_mut().enumerate() {
        let found = lane.ends.len();
        run_single(c, data, eof, common, lane);
        report(roller, k, bounds[k], &lane.ends, found);
    }
    stitch(c, data, eof, &bounds, &lanes.map(|l| l.ends), ends)
}

/// Tells `roller` of lane `k`'s chunks from `ends[from]` on; the lane
/// started at `start`.
fn report(roller: &mut impl Roller, k: usize, start: usize, ends: &[usize], from: usize) {
    for i in from..ends.len() {
        let begin = if i == 0 { start } else { ends[i - 1] };
        roller.chunk(k, i == 0, begin, ends[i]);
    }
}

/// Runs one lane to its stop.
fn run_single(c: &Chunker, data: &[u8], eof: bool, common: u64, lane: &mut Lane) {
    while !lane.done {
        let bytes = &data[lane.pos..lane.window.limit];
        let mut hash = lane.hash;
        let mut rolled = 0;
        for &b in bytes {
            hash = (hash << 1).wrapping_add(GEAR[b as usize]);
            rolled += 1;
            if hash & common == 0 {
                break;
            }
        }
        lane.hash = hash;
        lane.pos += rolled;
        lane.settle(c, data.len(), eof);
    }
}

/// Joins chains computed from stretch starts into the real chain from
/// `bounds[0]`. Cuts depend only on where the current chunk started, so
/// once the real chain reaches one of a stretch's own boundaries, the rest
/// of that stretch's chain is real too; until then it is continued one
/// reference cut at a time. Returns where the next chunk would start.
pub(super) fn stitch(
    c: &Chunker,
    data: &[u8],
    eof: bool,
    bounds: &[usize],
    chains: &[Vec<usize>],
    ends: &mut Vec<usize>,
) -> usize {
    let mut next = bounds[0];
    for (k, chain) in chains.iter().enumerate() {
        let (seg_start, seg_end) = (bounds[k], bounds[k + 1]);
        if next < seg_start {
            // The chain stopped at an undecided chunk in an earlier stretch.
            return next;
        }
        while next < seg_end {
            if next == seg_start {
                ends.extend_from_slice(chain);
                next = chain.last().copied().unwrap_or(seg_start);
                if chain.is_empty() {
                    return next;
                }
                break;
            }
            if let Ok(i) = chain.binary_search(&next) {
                ends.extend_from_slice(&chain[i + 1..]);
                next = *chain.last().expect("found in it");
                break;
            }
            match cut_reference(c, data, next, eof) {
                Some(end) => {
                    ends.push(end);
                    next = end;
                }
                None => return next,
            }
        }
    }
    next
}
