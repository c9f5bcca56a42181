//! A manifest's layout: how the metadata and content streams interleave to
//! give the stashed bytes back, as runs of (part, length) in stream order.
//!
//! Runs alternate between the two parts, so only the first run's part is
//! kept; the lengths are kept as the manifest's encoding stores them
//! (LEB128), about two bytes per run. Memory is thus proportional to the
//! encoding, which is what bounds a decoded manifest: a peer that sends a
//! small manifest cannot make the server hold sixteen bytes for every byte
//! it sent.

use crate::tarsplit::Part;
use std::fmt;

/// Runs of (part, length), alternating parts, none empty.
#[derive(Clone, PartialEq, Eq)]
pub struct Layout {
    first: Part,
    runs: u64,
    /// LEB128 lengths, one per run.
    lens: Vec<u8>,
    /// Where the last run's length starts in `lens` (to extend it).
    last_at: usize,
}

impl Default for Layout {
    fn default() -> Self {
        Layout::new()
    }
}

impl Layout {
    /// An empty layout (a stash of zero bytes).
    pub fn new() -> Layout {
        Layout {
            first: Part::Meta,
            runs: 0,
            lens: Vec::new(),
            last_at: 0,
        }
    }

    /// Appends `len` bytes of `part`: the last run grows when it is of the
    /// same part, an empty append changes nothing.
    pub fn push(&mut self, part: Part, len: u64) {
        if len == 0 {
            return;
        }
        match self.last_part() {
            Some(last) if last == part => {
                let (run, _) = read_leb128(&self.lens[self.last_at..]).expect("written by us");
                self.lens.truncate(self.last_at);
                // Lengths are byte counts of one stream: they cannot wrap.
                write_leb128(run.saturating_add(len), &mut self.lens);
            }
            last => {
                if last.is_none() {
                    self.first = part;
                }
                self.last_at = self.lens.len();
                write_leb128(len, &mut self.lens);
                self.runs += 1;
            }
        }
    }

    /// How many runs.
    pub fn len(&self) -> u64 {
        self.runs
    }

    /// Whether there are no runs.
    pub fn is_empty(&self) -> bool {
        self.runs == 0
    }

    /// The part of the first run (meaningless when empty).
    pub fn first_part(&self) -> Part {
        self.first
    }

    fn last_part(&self) -> Option<Part> {
        (self.runs > 0).then(|| part_of(self.first, self.runs - 1))
    }

    /// The runs in stream order.
    pub fn iter(&self) -> Runs<'_> {
        Runs {
            layout: self,
            cursor: RunCursor::default(),
        }
    }

    /// The run at `cursor`, moving the cursor past it; `None` at the end.
    pub fn next_run(&self, cursor: &mut RunCursor) -> Option<(Part, u64)> {
        if cursor.index >= self.runs {
            return None;
        }
        let (len, used) = read_leb128(&self.lens[cursor.at..]).expect("written by us");
        let part = part_of(self.first, cursor.index);
        cursor.at += used;
        cursor.index += 1;
        Some((part, len))
    }

    /// The LEB128 lengths, as a manifest encodes them.
    pub(crate) fn encoded_lens(&self) -> &[u8] {
        &self.lens
    }

    /// A layout of `runs` runs starting with `first`, their lengths read
    /// from the front of `bytes`, with `accept` called on each run in order
    /// (it may refuse one). Returns the layout and the bytes after it.
    pub(crate) fn decode<E>(
        first: Part,
        runs: u64,
        mut bytes: &[u8],
        mut accept: impl FnMut(Part, u64) -> Result<(), E>,
        truncated: impl Fn() -> E,
    ) -> Result<(Layout, &[u8]), E> {
        let mut layout = Layout {
            first,
            runs: 0,
            lens: Vec::new(),
            last_at: 0,
        };
        // Not reserved from `runs`: the bytes that follow bound it anyway,
        // and growing as they are read costs nothing a forger can exploit.
        for i in 0..runs {
            let (len, used) = read_leb128(bytes).ok_or_else(&truncated)?;
            let part = part_of(first, i);
            accept(part, len)?;
            layout.last_at = layout.lens.len();
            // Re-encoded, so that the layout is the same however its
            // lengths were written.
            write_leb128(len, &mut layout.lens);
            layout.runs += 1;
            bytes = &bytes[used..];
        }
        Ok((layout, bytes))
    }
}

impl fmt::Debug for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl FromIterator<(Part, u64)> for Layout {
    fn from_iter<I: IntoIterator<Item = (Part, u64)>>(runs: I) -> Layout {
        let mut layout = Layout::new();
        for (part, len) in runs {
            layout.push(part, len);
        }
        layout
    }
}

impl<'a> IntoIterator for &'a Layout {
    type Item = (Part, u64);
    type IntoIter = Runs<'a>;
    fn into_iter(self) -> Runs<'a> {
        self.iter()
    }
}

/// A position in a [`Layout`], for readers that own the layout they walk
/// (see [`Layout::next_run`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCursor {
    index: u64,
    at: usize,
}

/// The runs of a [`Layout`], in order.
pub struct Runs<'a> {
    layout: &'a Layout,
    cursor: RunCursor,
}

impl Iterator for Runs<'_> {
    type Item = (Part, u64);
    fn next(&mut self) -> Option<(Part, u64)> {
        self.layout.next_run(&mut self.cursor)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.layout.runs - self.cursor.index).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

fn part_of(first: Part, index: u64) -> Part {
    match (first, index % 2) {
        (p, 0) => p,
        (Part::Meta, _) => Part::Content,
        (Part::Content, _) => Part::Meta,
    }
}

pub(crate) fn write_leb128(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A LEB128 number from the front of `bytes` and how many bytes it took;
/// `None` if it is cut short or does not fit in 64 bits.
pub(crate) fn read_leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let shift = 7 * i as u32;
        if shift == 63 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pushes_merge_runs_of_one_part_and_skip_empty_ones() {
        let mut l = Layout::new();
        assert!(l.is_empty());
        l.push(Part::Content, 0);
        assert!(l.is_empty());
        l.push(Part::Content, 100);
        l.push(Part::Content, 28); // 128 needs a second LEB128 byte
        l.push(Part::Meta, 512);
        l.push(Part::Meta, 0);
        l.push(Part::Content, 1);
        assert_eq!(
            l.iter().collect::<Vec<_>>(),
            [(Part::Content, 128), (Part::Meta, 512), (Part::Content, 1)]
        );
        assert_eq!(l.len(), 3);
        assert_eq!(l.first_part(), Part::Content);
        assert_eq!(l.encoded_lens(), [0x80, 0x01, 0x80, 0x04, 0x01]);
    }

    #[test]
    fn leb128_refuses_what_does_not_fit() {
        assert_eq!(read_leb128(&[]), None);
        assert_eq!(read_leb128(&[0x80]), None);
        let mut max = Vec::new();
        write_leb128(u64::MAX, &mut max);
        assert_eq!(read_leb128(&max), Some((u64::MAX, 10)));
        let mut over = max.clone();
        over[9] = 2;
        assert_eq!(read_leb128(&over), None);
        assert_eq!(read_leb128(&[0xff; 11]), None);
    }

    proptest! {
        #[test]
        fn a_layout_holds_what_was_pushed(
            pushes in proptest::collection::vec((any::<bool>(), 0u64..1 << 40), 0..200)
        ) {
            let part = |meta: bool| if meta { Part::Meta } else { Part::Content };
            // The runs a Vec would hold, merged the same way.
            let mut expected: Vec<(Part, u64)> = Vec::new();
            for &(meta, len) in &pushes {
                if len == 0 {
                    continue;
                }
                match expected.last_mut() {
                    Some((p, n)) if *p == part(meta) => *n += len,
                    _ => expected.push((part(meta), len)),
                }
            }
            let layout: Layout = pushes.iter().map(|&(m, n)| (part(m), n)).collect();
            prop_assert_eq!(layout.iter().collect::<Vec<_>>(), expected.clone());
            prop_assert_eq!(layout.len(), expected.len() as u64);
            // Decoding its own lengths gives the same layout back.
            let (back, rest) = Layout::decode(
                layout.first_part(),
                layout.len(),
                layout.encoded_lens(),
                |_, _| Ok::<(), ()>(()),
                || (),
            )
            .unwrap();
            prop_assert!(rest.is_empty());
            prop_assert_eq!(back, layout);
        }
    }
}
