//! store::tarsplit: for any bytes, the split replays the input exactly
//! (interleaving the meta and content streams by the layout, as a manifest
//! does), it does not depend on how the input is fed, and what it collects
//! about the outer archive points at the input's own bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use store::tarsplit::{Part, TarSplitter};

type Runs = Vec<(Part, Vec<u8>)>;

/// Rebuild the input the way an unstash does: two streams and the run
/// lengths that interleave them.
fn rebuild(runs: &Runs) -> Vec<u8> {
    let mut meta = Vec::new();
    let mut content = Vec::new();
    let mut layout = Vec::new();
    for (part, bytes) in runs {
        match part {
            Part::Meta => meta.extend_from_slice(bytes),
            Part::Content => content.extend_from_slice(bytes),
        }
        layout.push((*part, bytes.len()));
    }
    let (mut m, mut c) = (&meta[..], &content[..]);
    let mut out = Vec::with_capacity(meta.len() + content.len());
    for (part, len) in layout {
        let src = match part {
            Part::Meta => &mut m,
            Part::Content => &mut c,
        };
        let (head, tail) = src.split_at(len);
        out.extend_from_slice(head);
        *src = tail;
    }
    assert!(
        m.is_empty() && c.is_empty(),
        "streams longer than the layout"
    );
    out
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many of the next bytes are feed sizes (0 to 7).
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 8).min(rest.len());
    let (sizes, input) = rest.split_at(n);
    let pieces: Vec<usize> = sizes
        .iter()
        .map(|&b| {
            if b >= 0xf0 {
                (b as usize - 0xef) * 512
            } else {
                b as usize + 1
            }
        })
        .collect();

    let (runs, collected) = TarSplitter::split_all(input, &[]);
    assert_eq!(
        rebuild(&runs),
        input,
        "split then rebuild changed the bytes"
    );
    for w in runs.windows(2) {
        assert_ne!(w[0].0, w[1].0, "merged runs alternate");
    }

    let (runs2, collected2) = TarSplitter::split_all(input, &pieces);
    assert_eq!(runs, runs2, "the split depends on how the input was fed");
    assert_eq!(
        collected, collected2,
        "what is collected depends on the feed"
    );

    assert_eq!(collected.input_len, input.len() as u64);
    for f in &collected.files {
        let end = f.offset as usize + f.data.len();
        assert!(
            end <= input.len(),
            "captured file {:?} past the end",
            f.name
        );
        assert_eq!(
            &input[f.offset as usize..end],
            &f.data[..],
            "captured file {:?} is not the input's bytes",
            f.name
        );
    }
    for s in &collected.spans {
        assert!(
            s.offset
                .checked_add(s.size)
                .is_some_and(|e| e <= input.len() as u64),
            "span {:?} ({} + {}) lies past the end of a {}-byte input",
            s.name,
            s.offset,
            s.size,
            input.len()
        );
    }
    if !collected.is_tar {
        assert_eq!(collected.entries, 0);
    }
});
