//! Writing a file's pieces, given in any order, as whole aligned blocks.
//!
//! A stash restored by offset ([`crate::place`]) comes as pieces: tar
//! headers of 512 bytes, small files, the ends of chunks. Written with one
//! `pwrite` each, the 2.5 GB image of the benchmarks took 171,000 system
//! calls, most of them into part of a page that the kernel first zeroes,
//! and twice the system time of the same bytes written in 128 KiB blocks
//! (BENCHMARKS.md §4). [`Gather`] holds each piece, by reference to its
//! chunk's buffer, until every byte of its [`BLOCK`] is there, and then
//! writes the block with one `pwritev`; a piece that covers whole blocks
//! is written at once, a block per write. No byte is copied on the way.
//!
//! What it holds is bounded: past a limit of chunk bytes held, the oldest
//! open block is written as it stands (one write per run of adjacent
//! pieces), so a block whose rest comes late, or never, costs the writes
//! it would have cost without gathering and no more.

use crate::place::Piece;
use std::cell::Cell;
use std::collections::{hash_map::Entry, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, IoSlice};
use std::rc::Rc;

/// Size and alignment of the blocks written whole, and the most one write
/// carries. Whole blocks took half the system time of the benchmark
/// image's pieces (§4). Not larger: the kernel caches a write of a file in
/// folios as large as the write (ext4, Linux 6.x), and on the 2-vCPU
/// benchmark VM (Firecracker, free page reporting) folios of 128 KiB cost
/// far more to fill than the 32 KiB ones `zstd -d` writes: a remote
/// unstash of v1 into a file took 4.6-5.6 s in 128 KiB writes against
/// 3.2-4.2 s in 32 KiB ones (four alternating pairs, BENCHMARKS.md §4,
/// 2026-12-03), and 2.5 GB written by a script in 128 KiB writes took
/// 0.8-3.8 s of system time against 0.7-0.9 s in 32 KiB ones.
pub(crate) const BLOCK: u64 = 32 << 10;

/// Bytes of chunks held for open blocks, at most (by default).
pub(crate) const MAX_HELD: usize = 16 << 20;

/// Where gathered bytes go.
pub(crate) trait WriteAt {
    /// Writes `bufs`, one after the other, starting at offset `at`.
    fn write_all_vectored_at(&mut self, bufs: &mut [IoSlice<'_>], at: u64) -> io::Result<()>;
}

impl WriteAt for &File {
    #[cfg(target_os = "linux")]
    fn write_all_vectored_at(&mut self, mut bufs: &mut [IoSlice<'_>], at: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // The most slices one call takes (the kernel's UIO_MAXIOV).
        const MAX_SLICES: usize = 1024;
        let mut at = at;
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let offset = libc::off_t::try_from(at)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
            let count = bufs.len().min(MAX_SLICES) as libc::c_int;
            // SAFETY: `IoSlice` is guaranteed to be ABI-compatible with
            // `iovec` on Unix, and the `count` slices passed are borrowed
            // for the whole call, which only reads them.
            let written = unsafe {
                libc::pwritev(
                    self.as_raw_fd(),
                    bufs.as_ptr().cast::<libc::iovec>(),
                    count,
                    offset,
                )
            };
            match written {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n if n > 0 => {
                    at += n as u64;
                    IoSlice::advance_slices(&mut bufs, n as usize);
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn write_all_vectored_at(&mut self, bufs: &mut [IoSlice<'_>], at: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut at = at;
        for b in bufs.iter() {
            self.write_all_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
}

/// A chunk's bytes, shared by the open blocks that hold pieces of it. The
/// count of bytes held drops when the last of them lets go.
struct Held {
    bytes: Vec<u8>,
    total: Rc<Cell<usize>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.set(self.total.get() - self.bytes.len());
    }
}

/// A piece waiting in an open block.
struct Waiting {
    at: u64,
    held: Rc<Held>,
    from: usize,
    len: usize,
}

impl Waiting {
    fn bytes(&self) -> &[u8] {
        // In range: `Gather::put` checked it.
        &self.held.bytes[self.from..self.from + self.len]
    }
}

/// A block with some of its bytes.
struct Open {
    filled: u64,
    pieces: Vec<Waiting>,
    /// The tick it opened at, to find it in `Gather::ages`.
    opened: u64,
}

/// Gathers the pieces of a file of a known size into whole blocks: see the
/// [module docs](self).
pub(crate) struct Gather<W: WriteAt> {
    out: W,
    size: u64,
    open: HashMap<u64, Open>,
    /// Blocks in the order they opened, with their tick; entries of blocks
    /// written since are skipped.
    ages: VecDeque<(u64, u64)>,
    tick: u64,
    held: Rc<Cell<usize>>,
    max_held: usize,
}

impl<W: WriteAt> Gather<W> {
    /// Gathers for `out`, a file of `size` bytes.
    pub(crate) fn new(out: W, size: u64) -> Gather<W> {
        Gather::with_limit(out, size, MAX_HELD)
    }

    /// As [`Gather::new`], holding at most about `max_held` bytes of chunks.
    pub(crate) fn with_limit(out: W, size: u64, max_held: usize) -> Gather<W> {
        Gather {
            out,
            size,
            open: HashMap::new(),
            ages: VecDeque::new(),
            tick: 0,
            held: Rc::new(Cell::new(0)),
            max_held,
        }
    }

    /// Takes a chunk's bytes and writes, now or once their blocks are
    /// complete, the `pieces` of it that go into the file.
    pub(crate) fn put(&mut self, bytes: Vec<u8>, pieces: &[Piece]) -> io::Result<()> {
        for p in pieces {
            let end = p.from as usize + p.len as usize;
            if end > bytes.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a piece ends at {end} of a chunk of {} bytes", bytes.len()),
                ));
            }
        }
        self.held.set(self.held.get() + bytes.len());
        let held = Rc::new(Held {
            bytes,
            total: self.held.clone(),
        });
        for p in pieces {
            self.put_piece(&held, p.at, p.from as usize, p.len as usize)?;
        }
        drop(held);
        while self.held.get() > self.max_held {
            if !self.write_oldest()? {
                break;
            }
        }
        Ok(())
    }

    fn put_piece(
        &mut self,
        held: &Rc<Held>,
        mut at: u64,
        mut from: usize,
        mut len: usize,
    ) -> io::Result<()> {
        while len > 0 {
            let end = at.saturating_add(len as u64);
            if end > self.size {
                // Not the file the pieces were planned for: write as given.
                let slice = &held.bytes[from..from + len];
                return self
                    .out
                    .write_all_vectored_at(&mut [IoSlice::new(slice)], at);
            }
            let block = at / BLOCK;
            let block_start = block * BLOCK;
            let block_end = (block_start + BLOCK).min(self.size);
            // Whole blocks from here: written at once.
            let whole_end = if end == self.size {
                end
            } else {
                end / BLOCK * BLOCK
            };
            if at == block_start && whole_end > at {
                let n = ((whole_end - at) as usize).min(BLOCK as usize);
                let slice = &held.bytes[from..from + n];
                self.out
                    .write_all_vectored_at(&mut [IoSlice::new(slice)], at)?;
                (at, from, len) = (at + n as u64, from + n, len - n);
                continue;
            }
            let n = len.min((block_end - at) as usize);
            let open = match self.open.entry(block) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    self.tick += 1;
                    self.ages.push_back((block, self.tick));
                    e.insert(Open {
                        filled: 0,
                        pieces: Vec::new(),
                        opened: self.tick,
                    })
                }
            };
            open.pieces.push(Waiting {
                at,
                held: held.clone(),
                from,
                len: n,
            });
            open.filled += n as u64;
            if open.filled >= block_end - block_start {
                if let Some(done) = self.open.remove(&block) {
                    self.write_pieces(done.pieces)?;
                }
                if self.ages.len() > 2 * self.open.len() + 1024 {
                    // Forget the blocks written since they opened.
                    let open = &self.open;
                    self.ages
                        .retain(|(b, t)| open.get(b).is_some_and(|o| o.opened == *t));
                }
            }
            (at, from, len) = (at + n as u64, from + n, len - n);
        }
        Ok(())
    }

    /// Writes the block open longest as it stands; false if none is open.
    fn write_oldest(&mut self) -> io::Result<bool> {
        while let Some((block, tick)) = self.ages.pop_front() {
            if let Entry::Occupied(e) = self.open.entry(block) {
                if e.get().opened == tick {
                    let open = e.remove();
                    self.write_pieces(open.pieces)?;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Writes pieces, one write per run of adjacent ones.
    fn write_pieces(&mut self, mut pieces: Vec<Waiting>) -> io::Result<()> {
        pieces.sort_unstable_by_key(|p| p.at);
        let mut rest = &pieces[..];
        while let Some(first) = rest.first() {
            let mut end = first.at + first.len as u64;
            let mut n = 1;
            while let Some(next) = rest.get(n).filter(|p| p.at == end) {
                end += next.len as u64;
                n += 1;
            }
            let mut slices: Vec<IoSlice<'_>> =
                rest[..n].iter().map(|p| IoSlice::new(p.bytes())).collect();
            self.out.write_all_vectored_at(&mut slices, first.at)?;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Writes what is still open, as it stands, and gives the output back.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        let mut open: Vec<(u64, Open)> = self.open.drain().collect();
        open.sort_unstable_by_key(|(block, _)| *block);
        for (_, o) in open {
            self.write_pieces(o.pieces)?;
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A file in memory that records its writes.
    #[derive(Default)]
    struct Image {
        bytes: Vec<u8>,
        writes: Vec<(u64, usize)>,
    }

    impl WriteAt for Image {
        fn write_all_vectored_at(&mut self, bufs: &mut [IoSlice<'_>], at: u64) -> io::Result<()> {
            let mut pos = at as usize;
            for b in bufs.iter() {
                if self.bytes.len() < pos + b.len() {
                    self.bytes.resize(pos + b.len(), 0);
                }
                self.bytes[pos..pos + b.len()].copy_from_slice(b);
                pos += b.len();
            }
            self.writes.push((at, pos - at as usize));
            Ok(())
        }
    }

    /// `data` cut into pieces of `lens` (cycled), dealt round-robin to
    /// `chunks` chunks: each chunk's bytes and where its pieces go.
    fn deal(data: &[u8], lens: &[usize], chunks: usize) -> Vec<(Vec<u8>, Vec<Piece>)> {
        let mut out: Vec<(Vec<u8>, Vec<Piece>)> = vec![Default::default(); chunks];
        let (mut at, mut k) = (0usize, 0usize);
        while at < data.len() {
            let len = lens[k % lens.len()].min(data.len() - at);
            let (bytes, pieces) = &mut out[k % chunks];
            pieces.push(Piece {
                at: at as u64,
                from: bytes.len() as u32,
                len: len as u32,
            });
            bytes.extend_from_slice(&data[at..at + len]);
            (at, k) = (at + len, k + 1);
        }
        out
    }

    fn gathered(size: usize, given: Vec<(Vec<u8>, Vec<Piece>)>, limit: usize) -> Image {
        let mut g = Gather::with_limit(Image::default(), size as u64, limit);
        for (bytes, pieces) in given {
            g.put(bytes, &pieces).unwrap();
        }
        g.finish().unwrap()
    }

    fn data(size: usize) -> Vec<u8> {
        (0..size).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn small_pieces_are_written_as_whole_blocks() {
        let size = 3 * BLOCK as usize + 1000;
        let d = data(size);
        // Tar-like: 512-byte headers from one chunk between the files of
        // another, all in pieces of at most 3,000 bytes.
        let given = deal(&d, &[512, 3000, 512, 700, 512, 2900], 2);
        let pieces: usize = given.iter().map(|(_, p)| p.len()).sum();
        let image = gathered(size, given, MAX_HELD);
        assert_eq!(image.bytes, d);
        assert!(pieces > 16 * image.writes.len(), "{pieces} pieces");
        assert_eq!(
            image.writes,
            [
                (0, BLOCK as usize),
                (BLOCK, BLOCK as usize),
                (2 * BLOCK, BLOCK as usize),
                (3 * BLOCK, 1000),
            ]
        );
    }

    #[test]
    fn a_piece_over_whole_blocks_is_written_at_once_a_block_a_write() {
        let size = 5 * BLOCK as usize;
        let d = data(size);
        // 100 bytes, then one chunk of the rest but 100 bytes, then those.
        let big = size - 200;
        let given = deal(&d, &[100, big, 100], 3);
        let image = gathered(size, given, MAX_HELD);
        assert_eq!(image.bytes, d);
        // Block 0 once the big piece completes it, then the big piece's
        // whole blocks (1 to 3) at once, one write each, then block 4 once
        // the last chunk completes it.
        let blocks: Vec<_> = (0..5).map(|b| (b * BLOCK, BLOCK as usize)).collect();
        assert_eq!(image.writes, blocks);
    }

    #[test]
    fn past_the_limit_the_oldest_block_is_written_as_it_stands() {
        let size = 4 * BLOCK as usize;
        let d = data(size);
        // Chunk 0 has a 512-byte piece in every block; the rest comes in
        // chunks given later.
        let given = deal(&d, &[512, BLOCK as usize - 512], 2);
        let (first, rest) = given.split_at(1);
        let mut g = Gather::with_limit(Image::default(), size as u64, 0);
        g.put(first[0].0.clone(), &first[0].1).unwrap();
        // Nothing may be held: each block's 512 bytes went out at once.
        assert_eq!(g.held.get(), 0);
        assert_eq!(g.out.writes.len(), 4);
        for (bytes, pieces) in rest {
            g.put(bytes.clone(), pieces).unwrap();
        }
        let image = g.finish().unwrap();
        assert_eq!(image.bytes, d);
    }

    #[test]
    fn an_incomplete_file_is_written_as_far_as_it_goes() {
        let size = 2 * BLOCK as usize;
        let d = data(size);
        let mut given = deal(&d, &[1000], 3);
        given.remove(1);
        let image = gathered(size, given, MAX_HELD);
        // Every byte of the chunks given, none of the one missing.
        for (i, (a, b)) in image.bytes.iter().zip(&d).enumerate() {
            if (i / 1000) % 3 != 1 {
                assert_eq!(a, b, "byte {i}");
            }
        }
    }

    #[test]
    fn a_piece_outside_its_chunk_is_an_error() {
        let mut g = Gather::new(Image::default(), 100);
        let piece = Piece {
            at: 0,
            from: 5,
            len: 10,
        };
        let err = g.put(vec![0; 10], &[piece]).unwrap_err();
        assert!(err.to_string().contains("ends at 15"), "{err}");
    }

    #[test]
    fn a_file_takes_more_slices_than_one_call_does() {
        let size = 2 * BLOCK as usize + 17;
        let d = data(size);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        file.set_len(size as u64).unwrap();
        // 64-byte pieces: 2,048 in each block, in one write.
        let mut given = deal(&d, &[64], 7);
        given.reverse();
        let mut g = Gather::new(&file, size as u64);
        for (bytes, pieces) in given {
            g.put(bytes, &pieces).unwrap();
        }
        g.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), d);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any pieces, given in any order and held within any limit, make
        /// the same file; within the default limit every write is one
        /// whole block (or the file's short last one).
        #[test]
        fn any_order_makes_the_same_file(
            size in 1usize..700_000,
            lens in prop::collection::vec(
                prop_oneof![1usize..600, 1usize..5000, 1usize..300_000], 1..12),
            chunks in 1usize..9,
            order in any::<prop::sample::Index>(),
            limit in prop_oneof![Just(0usize), 0usize..400_000, Just(MAX_HELD)],
        ) {
            let d = data(size);
            let mut given = deal(&d, &lens, chunks);
            let turn = order.index(given.len());
            given.rotate_left(turn);
            let image = gathered(size, given, limit);
            prop_assert_eq!(&image.bytes, &d);
            if limit == MAX_HELD {
                for &(at, len) in &image.writes {
                    prop_assert!(at.is_multiple_of(BLOCK));
                    prop_assert!(len as u64 == BLOCK || at + len as u64 == size as u64);
                    prop_assert!(len as u64 <= BLOCK);
                }
            }
        }
    }
}
