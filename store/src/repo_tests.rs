//! Store-level tests through the public API: round trips of every kind,
//! dedup, tar-aware dedup, corruption and error paths.

use super::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

fn stash_bytes(store: &Store, n: &str, data: &[u8]) -> StashReport {
    store
        .stash(
            &name(n),
            Source::Reader(Box::new(io::Cursor::new(data.to_vec()))),
            &NoProgress,
        )
        .unwrap()
}

fn unstash_bytes(store: &Store, n: &str) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .open_stash(&name(n))
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// A tar of `files` (name, bytes) with every mtime set to `mtime`.
fn tar_of(files: &[(String, Vec<u8>)], mtime: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (n, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        b.append_data(&mut h, n, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// Many small, compressible-ish files: the case where tar headers matter.
fn small_files(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.random_range(0..6000);
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            (format!("usr/share/doc/pkg{}/file{i}.txt", i % 37), data)
        })
        .collect()
}

#[test]
fn stream_round_trip_and_report() {
    let (_d, s) = store();
    let data = random(3 << 20, 1);
    let r = stash_bytes(&s, "main/blob", &data);
    assert_eq!(r.size, data.len() as u64);
    assert_eq!(r.kind, StashKind::Stream);
    assert_eq!(r.new_bytes, data.len() as u64);
    assert_eq!(r.sha256, crate::id::to_hex(&Sha256::digest(&data)));
    assert_eq!(unstash_bytes(&s, "main/blob"), data);
}

#[test]
fn empty_input_round_trips() {
    let (_d, s) = store();
    let r = stash_bytes(&s, "e", b"");
    assert_eq!((r.size, r.chunks), (0, 0));
    assert!(unstash_bytes(&s, "e").is_empty());
}

#[test]
fn second_stash_of_the_same_bytes_stores_nothing() {
    let (_d, s) = store();
    let data = random(2 << 20, 2);
    stash_bytes(&s, "a", &data);
    let again = stash_bytes(&s, "b", &data);
    assert_eq!(again.new_chunks, 0);
    assert_eq!(again.stored_bytes, 0);
    assert_eq!(again.reused_bytes, data.len() as u64);
    // The same content shares its manifest too: nothing new at all.
    stash_bytes(&s, "a", &data);
    assert_eq!(s.backend().list(Kind::Manifest).unwrap().len(), 1);
    // Reopening sees the same index.
    let s2 = Store::open(s.root()).unwrap();
    let third = stash_bytes(&s2, "c", &data);
    assert_eq!(third.new_chunks, 0);
}

#[test]
fn retarred_with_new_mtimes_costs_only_headers() {
    let (_d, s) = store();
    let files = small_files(800, 3);
    let v1 = tar_of(&files, 1_000_000);
    let v3 = tar_of(&files, 2_000_000);
    assert_ne!(v1, v3);
    let r1 = stash_bytes(&s, "v1", &v1);
    assert_eq!(r1.kind, StashKind::Tar);
    let r3 = stash_bytes(&s, "v3", &v3);
    // Every header changed, no content did: only the meta stream is new.
    let headers = (files.len() * 512) as u64;
    assert!(
        r3.new_bytes <= headers * 2,
        "new {} for {} bytes of headers",
        r3.new_bytes,
        headers
    );
    assert!(
        r3.stored_bytes < v3.len() as u64 / 20,
        "stored {} of {}",
        r3.stored_bytes,
        v3.len()
    );
    assert_eq!(unstash_bytes(&s, "v3"), v3);
    assert_eq!(unstash_bytes(&s, "v1"), v1);
}

#[test]
fn directory_round_trip() {
    use std::os::unix::fs::PermissionsExt;
    let (d, s) = store();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("a/b/empty")).unwrap();
    std::fs::write(src.join("a/b/file"), random(100_000, 4)).unwrap();
    std::fs::write(src.join("run.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a/b/file", src.join("link")).unwrap();
    let r = s
        .stash(
            &name("build/1/dir"),
            Source::Directory(src.clone()),
            &NoProgress,
        )
        .unwrap();
    assert_eq!(r.kind, StashKind::Directory);
    let dst = d.path().join("restored");
    s.unstash(
        &name("build/1/dir"),
        Target::Directory(dst.clone()),
        false,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(dst.join("a/b/file")).unwrap(),
        std::fs::read(src.join("a/b/file")).unwrap()
    );
    assert!(dst.join("a/b/empty").is_dir());
    assert_eq!(
        std::fs::read_link(dst.join("link")).unwrap(),
        Path::new("a/b/file")
    );
    assert_eq!(
        std::fs::metadata(dst.join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    // A second restore onto the now non-empty directory is refused.
    let err = s
        .unstash(
            &name("build/1/dir"),
            Target::Directory(dst),
            false,
            &NoProgress,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Exists { .. }), "{err}");
    // And a directory stash cannot be written as a file.
    let err = s
        .unstash(
            &name("build/1/dir"),
            Target::File(d.path().join("f")),
            false,
            &NoProgress,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::WrongTarget { .. }), "{err}");
}

#[test]
fn file_target_is_refused_when_it_exists_and_written_whole() {
    let (d, s) = store();
    let data = random(1 << 20, 5);
    stash_bytes(&s, "f", &data);
    let target = d.path().join("out.bin");
    std::fs::write(&target, b"old").unwrap();
    let err = s
        .unstash(&name("f"), Target::File(target.clone()), false, &NoProgress)
        .unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
    s.unstash(&name("f"), Target::File(target.clone()), true, &NoProgress)
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), data);
}

#[test]
fn restash_replaces_the_name_and_both_versions_stay_readable_until_removed() {
    let (_d, s) = store();
    stash_bytes(&s, "x", b"one");
    stash_bytes(&s, "x", b"two");
    assert_eq!(unstash_bytes(&s, "x"), b"two");
    let listed: Vec<String> = s.list(None).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(listed, ["x"]);
    assert!(s.remove(&name("x")).unwrap());
    assert!(!s.remove(&name("x")).unwrap());
    let err = s.open_stash(&name("x")).err().unwrap();
    assert!(err.to_string().contains("no stash named"), "{err}");
}

#[test]
fn a_flipped_byte_in_a_pack_fails_the_restore_and_fsck_full() {
    let (_d, s) = store();
    let data = random(1 << 20, 6);
    stash_bytes(&s, "victim", &data);
    assert!(s.fsck(true, &NoProgress).unwrap().problems.is_empty());
    let packs = s.backend().list(Kind::Pack).unwrap();
    assert_eq!(packs.len(), 1);
    let mut bytes = s.backend().get(Kind::Pack, &packs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    s.backend().put(Kind::Pack, &packs[0], &bytes).unwrap();
    let s = Store::open(s.root()).unwrap();
    let mut out = Vec::new();
    let err = s
        .open_stash(&name("victim"))
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("\"victim\"") && msg.contains("corrupt"),
        "{msg}"
    );
    // What was handed out before the error is a true prefix.
    assert_eq!(&data[..out.len()], &out[..]);
    // The damaged chunk, and the stash that needs it.
    let report = s.fsck(true, &NoProgress).unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(report.problems[0].subject.contains(&packs[0]));
    assert_eq!(report.problems[1].subject, "name \"victim\"");
    assert!(
        report.problems[1]
            .problem
            .contains("1 of its chunks are damaged"),
        "{:?}",
        report.problems[1]
    );
    assert!(s.fsck(false, &NoProgress).unwrap().problems.is_empty());
}

#[test]
fn inspect_and_usage_report_dedup() {
    let (_d, s) = store();
    let data = random(2 << 20, 7);
    stash_bytes(&s, "a", &data);
    stash_bytes(&s, "b", &data);
    let i = s.inspect(&name("a")).unwrap();
    assert_eq!(i.header.size, data.len() as u64);
    assert_eq!(i.unique_bytes, data.len() as u64);
    let u = s.usage().unwrap();
    assert_eq!(u.names, 2);
    assert_eq!(u.logical_bytes, 2 * data.len() as u64);
    assert!(u.dedup_ratio > 1.9, "{}", u.dedup_ratio);
    assert_eq!(u.unreferenced_stored_bytes, 0);
    s.remove(&name("a")).unwrap();
    s.remove(&name("b")).unwrap();
    assert!(s.usage().unwrap().unreferenced_stored_bytes > 0);
}

#[test]
fn unreadable_input_is_a_clear_error_and_commits_nothing() {
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }
    let (_d, s) = store();
    let err = s
        .stash(
            &name("broken"),
            Source::Reader(Box::new(Failing(5 << 20))),
            &NoProgress,
        )
        .unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert!(s.list(None).unwrap().is_empty());
    assert!(s.backend().list(Kind::Manifest).unwrap().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_stream_round_trips(seed in any::<u64>(), len in 0usize..400_000, as_tar in any::<bool>(), cut in 0usize..1000) {
        let (_d, s) = store();
        let data = if as_tar {
            let mut t = tar_of(&small_files(40, seed), seed % 1_000_000);
            // Sometimes truncated mid-archive: still exact.
            let keep = t.len() - (cut * 37).min(t.len());
            t.truncate(keep);
            t
        } else {
            random(len, seed)
        };
        stash_bytes(&s, "p/x", &data);
        prop_assert_eq!(unstash_bytes(&s, "p/x"), data);
    }
}

#[test]
fn stored_chunks_are_read_in_runs_within_a_budget() {
    let (_d, s) = store();
    let chunk_ids = |n: &str| -> Vec<ChunkId> {
        let (_, bytes) = s.manifest_bytes(&name(n)).unwrap();
        Manifest::decode(&bytes)
            .unwrap()
            .chunks()
            .map(|c| c.id)
            .collect()
    };
    stash_bytes(&s, "a", &random(3 << 20, 21));
    stash_bytes(&s, "b", &random(2 << 20, 22));
    let (a, b) = (chunk_ids("a"), chunk_ids("b"));
    assert!(a.len() >= 3 && !b.is_empty());
    let unknown = ChunkId::of(b"held nowhere");
    let mut ids = a.clone();
    ids.push(unknown);
    ids.extend(&b);

    let all = s.read_stored_within(&ids, usize::MAX, 40).unwrap();
    assert_eq!(all.missing, vec![unknown]);
    let one_by_one: Vec<StoredChunk> = a
        .iter()
        .chain(&b)
        .map(|id| s.read_stored(id).unwrap().unwrap())
        .collect();
    assert_eq!(all.chunks, one_by_one);
    let mut raw = Vec::new();
    for c in &all.chunks {
        c.clone().verify(&mut raw).unwrap();
    }
    let read: Vec<ChunkId> = all.chunks.iter().map(|c| c.id).collect();
    assert_eq!(read, [a.clone(), b.clone()].concat());
    // Neighbours in a pack came from one read: their bytes are adjacent
    // slices of one buffer.
    let (first, second) = (&all.chunks[0].bytes, &all.chunks[1].bytes);
    assert_eq!(first.as_ptr().wrapping_add(first.len()), second.as_ptr());

    // The budget counts stored bytes plus the overhead of each chunk; the
    // first chunk found always fits, and what does not fit is in neither
    // list.
    let sizes: Vec<usize> = one_by_one.iter().map(|c| c.bytes.len() + 40).collect();
    let cut = s.read_stored_within(&ids, sizes[0] + sizes[1], 40).unwrap();
    assert_eq!(cut.chunks, one_by_one[..2]);
    assert!(cut.missing.is_empty());
    let first_only = s.read_stored_within(&ids, 0, 40).unwrap();
    assert_eq!(first_only.chunks, one_by_one[..1]);
    let mut from_unknown = vec![unknown];
    from_unknown.extend(&b);
    let past_unknown = s.read_stored_within(&from_unknown, 0, 40).unwrap();
    assert_eq!(past_unknown.missing, vec![unknown]);
    assert_eq!(past_unknown.chunks, one_by_one[a.len()..a.len() + 1]);
}

#[test]
fn chunks_and_manifests_move_between_stores() {
    let (_a, src) = store();
    let (_b, dst) = store();
    let data = random(3 << 20, 9);
    stash_bytes(&src, "main/img", &data);
    let (id, manifest) = src.manifest_bytes(&name("main/img")).unwrap();
    let ids: Vec<ChunkId> = Manifest::decode(&manifest)
        .unwrap()
        .chunks()
        .map(|c| c.id)
        .collect();
    // A commit before the chunks arrive is refused and changes nothing.
    let err = dst
        .commit_manifest(&name("main/img"), &manifest)
        .unwrap_err();
    assert!(matches!(err, StoreError::MissingChunk { .. }), "{err}");
    assert!(dst.list(None).unwrap().is_empty());
    let missing = dst.missing(&ids).unwrap();
    assert_eq!(missing.len(), ids.iter().collect::<HashSet<_>>().len());
    let stored: Vec<StoredChunk> = missing
        .iter()
        .map(|i| src.read_stored(i).unwrap().unwrap())
        .collect();
    // A tampered chunk is rejected, and nothing of the batch is imported.
    let mut bad = stored.clone();
    let mut tampered = bad[0].bytes.to_vec();
    tampered[0] ^= 1;
    bad[0].bytes = tampered.into();
    assert!(dst.import_chunks(&bad).is_err());
    assert_eq!(dst.missing(&ids).unwrap().len(), missing.len());
    assert_eq!(dst.import_chunks(&stored).unwrap(), missing.len() as u64);
    assert_eq!(dst.import_chunks(&stored).unwrap(), 0);
    assert!(dst.missing(&ids).unwrap().is_empty());
    assert_eq!(
        dst.commit_manifest(&name("main/img"), &manifest).unwrap(),
        id
    );
    assert_eq!(unstash_bytes(&dst, "main/img"), data);
}

#[test]
fn unstash_into_a_fifo_writes_into_it_and_leaves_the_node() {
    use std::os::unix::fs::FileTypeExt;
    let (d, s) = store();
    let data = random(300_000, 11);
    stash_bytes(&s, "f", &data);
    let fifo = d.path().join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    s.unstash(&name("f"), Target::File(fifo.clone()), false, &NoProgress)
        .unwrap();
    assert_eq!(reader.join().unwrap(), data);
    assert!(
        std::fs::metadata(&fifo).unwrap().file_type().is_fifo(),
        "the FIFO was replaced"
    );
}

/// Records what a stash reports as durable, checking each chunk is
/// readable from the store at the moment it is reported.
struct StoredLog<'a> {
    store: &'a Store,
    calls: std::sync::Mutex<Vec<Vec<ChunkId>>>,
    /// Blocks read so far, and how many had been read at the first report.
    advances: std::sync::atomic::AtomicU64,
    first_report_at: std::sync::OnceLock<u64>,
}

impl<'a> StoredLog<'a> {
    fn new(store: &'a Store) -> Self {
        StoredLog {
            store,
            calls: Default::default(),
            advances: Default::default(),
            first_report_at: Default::default(),
        }
    }
}

impl Progress for StoredLog<'_> {
    fn advance(&self, _bytes: u64) {
        self.advances
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn stored(&self, new: &[ChunkId]) {
        let _ = self
            .first_report_at
            .set(self.advances.load(std::sync::atomic::Ordering::SeqCst));
        for id in new {
            assert!(
                self.store.read_stored(id).unwrap().is_some(),
                "{id} was reported stored but is not readable"
            );
        }
        self.calls.lock().unwrap().push(new.to_vec());
    }
}

#[test]
fn a_stash_reports_each_new_chunk_once_as_its_pack_becomes_durable() {
    let dir = tempfile::tempdir().unwrap();
    // Small packs: several per stash, so reports come while it runs.
    let store = Store::open_with(
        dir.path().join("store"),
        StoreOptions {
            pack_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    // Larger than what the packer may have queued (two jobs of up to
    // 16 MiB): some packs must be reported while the input is still read.
    let first = random(96 << 20, 7);
    let log = StoredLog::new(&store);
    let report = store
        .stash(
            &name("a/one"),
            Source::Reader(Box::new(io::Cursor::new(first.clone()))),
            &log,
        )
        .unwrap();
    let read = log.advances.load(std::sync::atomic::Ordering::SeqCst);
    let first_at = *log.first_report_at.get().expect("packs were reported");
    assert!(
        first_at < read,
        "the first pack was reported after all {read} blocks were read"
    );
    let calls = log.calls.into_inner().unwrap();
    assert!(calls.len() > 2, "one report per pack, got {}", calls.len());
    let reported: Vec<ChunkId> = calls.concat();
    let distinct: HashSet<ChunkId> = reported.iter().copied().collect();
    assert_eq!(distinct.len(), reported.len(), "a chunk was reported twice");
    assert_eq!(reported.len() as u64, report.new_chunks);
    let (_, manifest) = store.manifest(&name("a/one")).unwrap();
    let all: HashSet<ChunkId> = manifest.chunks().map(|c| c.id).collect();
    assert_eq!(distinct, all);

    // A second stash sharing most bytes reports only its new chunks.
    let mut second = first.clone();
    second.extend_from_slice(&random(2 << 20, 8));
    let log = StoredLog::new(&store);
    let report = store
        .stash(
            &name("a/two"),
            Source::Reader(Box::new(io::Cursor::new(second))),
            &log,
        )
        .unwrap();
    let reported: HashSet<ChunkId> = log
        .calls
        .into_inner()
        .unwrap()
        .concat()
        .into_iter()
        .collect();
    assert!(report.new_chunks > 0 && report.reused_chunks > 0);
    assert_eq!(reported.len() as u64, report.new_chunks);
    assert!(
        reported.is_disjoint(&all),
        "a reused chunk was reported as new"
    );
}

/// A source whose reads wait until released (chunks still on the network).
struct HeldSource {
    released: std::sync::Mutex<bool>,
    wake: std::sync::Condvar,
    waiting: std::sync::atomic::AtomicUsize,
}

impl ChunkSource for HeldSource {
    fn read(&self, _chunk: &ChunkRef, _out: &mut Vec<u8>) -> Result<bool, StoreError> {
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut released = self.released.lock().unwrap();
        while !*released {
            released = self.wake.wait(released).unwrap();
        }
        Ok(false) // the store holds it: read it from its pack
    }
}

/// Reads waiting on a source must not hold the threads of rayon's global
/// pool: in one process a server verifies uploads and packers compress on
/// it (this once stalled requests for 30 s in the loopback tests).
#[test]
fn a_blocking_chunk_source_leaves_the_global_thread_pool_free() {
    let (_d, s) = store();
    let data = random(4 << 20, 12);
    stash_bytes(&s, "held", &data);
    let (_, manifest) = s.manifest(&name("held")).unwrap();
    let source = Arc::new(HeldSource {
        released: std::sync::Mutex::new(false),
        wake: std::sync::Condvar::new(),
        waiting: Default::default(),
    });
    let s = Arc::new(s);
    let reader = {
        let (s, source) = (s.clone(), source.clone());
        std::thread::spawn(move || {
            let mut out = Vec::new();
            s.open_manifest("held", manifest, source)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            out
        })
    };
    // Every decoding thread is now waiting on the source ...
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while source.waiting.load(std::sync::atomic::Ordering::SeqCst) < rayon::current_num_threads() {
        assert!(
            Instant::now() < deadline,
            "the reader never asked the source"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // ... and work on the global pool still runs.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let sum: u64 = (0..1000u64).into_par_iter().sum();
        let _ = tx.send(sum);
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(10));
    *source.released.lock().unwrap() = true;
    source.wake.notify_all();
    assert_eq!(
        got,
        Ok(499_500),
        "the global pool was blocked by the source"
    );
    assert!(reader.join().unwrap() == data);
}

/// Packs go past the page cache unless the options say otherwise (for a
/// caller that reads each pack back at once, which would then read the
/// disk).
#[cfg(target_os = "linux")]
#[test]
fn direct_writes_keep_packs_out_of_the_page_cache_unless_turned_off() {
    let probe = tempfile::tempdir().unwrap();
    if !crate::testutil::takes_o_direct(probe.path()) {
        eprintln!("the temp directory's file system refuses O_DIRECT; skipped");
        return;
    }
    let data = random(6 << 20, 7);
    let mut cached = Vec::new();
    for direct_writes in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let opts = StoreOptions {
            direct_writes,
            ..StoreOptions::default()
        };
        let store = Store::open_with(&root, opts).unwrap();
        stash_bytes(&store, "main/x", &data);
        let packs = crate::testutil::files_under(&root.join("packs"));
        assert_eq!(packs.len(), 1, "{packs:?}");
        let pages = crate::testutil::resident(&packs[0]);
        // Random data does not compress: the pack holds 6 MiB, so its
        // first five 1 MiB blocks were written whole.
        cached.push(pages[..5 * 256].iter().filter(|&&r| r).count());
        assert_eq!(unstash_bytes(&store, "main/x"), data);
    }
    assert_eq!(
        cached[0], 0,
        "direct_writes left pack pages in the page cache"
    );
    assert!(
        cached[1] > 0,
        "without direct_writes the pack should be cached"
    );
}

/// Restores `n` into `path` by offset: the chunks in `order`'s shuffled
/// order, the first `given` of them handed over as raw bytes (as a remote
/// unstash does), the rest read from the store's packs.
fn place_shuffled(s: &Store, n: &str, path: &Path, seed: u64, given: usize) -> UnstashReport {
    use rand::seq::SliceRandom;
    let (_, m) = s.manifest(&name(n)).unwrap();
    let placed = s
        .place_file(n, &m, path, false, Arc::new(NoProgress))
        .unwrap();
    let mut ids = placed.placement().chunks().to_vec();
    ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let given = given.min(ids.len());
    let raw_of = |id: &ChunkId| {
        let mut raw = Vec::new();
        verify_stored(&s.read_stored(id).unwrap().unwrap(), &mut raw).unwrap();
        raw
    };
    if seed.is_multiple_of(2) {
        for id in &ids[..given] {
            placed.place(id, raw_of(id)).unwrap();
            // Twice is harmless (a chunk asked again after a reconnect).
            placed.place(id, raw_of(id)).unwrap();
        }
    } else {
        // In batches, as the downloaders hand them over.
        for group in ids[..given].chunks(1 + seed as usize % 7) {
            let batch = || group.iter().map(|id| (*id, raw_of(id))).collect();
            placed.place_all(batch()).unwrap();
            placed.place_all(batch()).unwrap();
        }
    }
    placed.place_stored(&ids[given..]).unwrap();
    let report = placed.finish().unwrap();
    assert_eq!(placed.unplaced(), 0);
    report
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_stream_placed_in_any_order_is_byte_exact(
        seed in any::<u64>(),
        len in 0usize..300_000,
        as_tar in any::<bool>(),
        given in 0usize..100,
    ) {
        let (d, s) = store();
        let data = if as_tar {
            tar_of(&small_files(40, seed), seed % 1_000_000)
        } else {
            // Repeated content: one chunk goes to several places.
            let a = random(len, seed);
            [&a[..], &random(len / 3, seed + 1), &a[..]].concat()
        };
        stash_bytes(&s, "p/x", &data);
        let path = d.path().join("out");
        let report = place_shuffled(&s, "p/x", &path, seed, given);
        prop_assert_eq!(report.size, data.len() as u64);
        prop_assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}

#[test]
fn chunks_placed_all_at_once_are_split_into_batches_and_all_written() {
    let (d, s) = store();
    // More raw bytes than one batch to the writer holds.
    let data = random(3 * crate::place::BATCH_BYTES + 12_345, 7);
    stash_bytes(&s, "p/x", &data);
    let (_, m) = s.manifest(&name("p/x")).unwrap();
    let path = d.path().join("out");
    let placed = s
        .place_file("p/x", &m, &path, false, Arc::new(NoProgress))
        .unwrap();
    let ids = placed.placement().chunks().to_vec();
    let all = ids
        .iter()
        .map(|id| {
            let mut raw = Vec::new();
            verify_stored(&s.read_stored(id).unwrap().unwrap(), &mut raw).unwrap();
            (*id, raw)
        })
        .collect();
    placed.place_all(all).unwrap();
    assert_eq!(placed.finish().unwrap().size, data.len() as u64);
    assert_eq!(std::fs::read(&path).unwrap(), data);
}

#[test]
fn a_placed_file_appears_only_when_complete() {
    let (d, s) = store();
    let data = [random(1 << 20, 1), random(1 << 20, 1)].concat();
    stash_bytes(&s, "p/x", &data);
    let (_, m) = s.manifest(&name("p/x")).unwrap();
    let path = d.path().join("out");
    let temps = || {
        std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".ferry-unstash-")
            })
            .count()
    };

    // Not every chunk: finish refuses, and dropping leaves nothing behind.
    let placed = s
        .place_file("p/x", &m, &path, false, Arc::new(NoProgress))
        .unwrap();
    assert_eq!(temps(), 1);
    let ids = placed.placement().chunks().to_vec();
    assert!(ids.len() > 2, "{} chunks", ids.len());
    placed.place_stored(&ids[1..]).unwrap();
    // A batch with one wrong chunk is refused whole: the good one in it is
    // not written either (else the file would be complete).
    let mut raw = Vec::new();
    verify_stored(&s.read_stored(&ids[0]).unwrap().unwrap(), &mut raw).unwrap();
    let err = placed
        .place_all(vec![(ids[0], raw), (ChunkId([9; 32]), vec![0; 10])])
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not name it"), "{err}");
    let err = placed.finish().unwrap_err().to_string();
    assert!(err.contains("never written"), "{err}");
    assert_eq!(placed.unplaced(), 1);
    assert!(!path.exists());
    // Bytes that are not the chunk's length are refused, not written.
    let err = placed.place(&ids[0], vec![0; 10]).unwrap_err().to_string();
    assert!(err.contains("10 bytes"), "{err}");
    let err = placed
        .place(&ChunkId([9; 32]), vec![0; 10])
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not name it"), "{err}");
    drop(placed);
    assert_eq!(temps(), 0);
    assert!(!path.exists());

    // An existing file: refused without force; with it, replaced keeping
    // its mode.
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&path, b"old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = s
        .place_file("p/x", &m, &path, false, Arc::new(NoProgress))
        .unwrap_err();
    assert!(matches!(err, StoreError::Exists { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    let placed = s
        .place_file("p/x", &m, &path, true, Arc::new(NoProgress))
        .unwrap();
    placed.place_stored(&ids).unwrap();
    placed.finish().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    assert_eq!(temps(), 0);

    // A directory, or a device (written in order elsewhere), is refused.
    let err = s
        .place_file("p/x", &m, d.path(), true, Arc::new(NoProgress))
        .unwrap_err();
    assert!(matches!(err, StoreError::WrongTarget { .. }), "{err}");
    let err = s
        .place_file(
            "p/x",
            &m,
            Path::new("/dev/null"),
            true,
            Arc::new(NoProgress),
        )
        .unwrap_err();
    assert!(err.to_string().contains("written in order"), "{err}");
}
