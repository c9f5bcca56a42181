//! A damaged store: unstash fails loudly and names the damage, never emits
//! wrong bytes or leaves a half-written target; fsck --full finds it.

use crate::util::*;
use std::fs;
use std::path::Path;

/// One entry of a pack's entry table (see `store/src/pack.rs`).
struct PackEntry {
    id: String,
    offset: u64,
    stored_len: u64,
    codec: u8,
}

/// Read a pack's entry table from its trailer:
/// `table | table length u64 | nonce [16] | pack id [32] | "FERRYEND"`.
fn pack_entries(pack: &[u8]) -> Vec<PackEntry> {
    assert_eq!(&pack[..8], b"FERRYPK1", "pack magic");
    assert_eq!(&pack[pack.len() - 8..], b"FERRYEND", "pack end magic");
    let t = pack.len() - 64;
    let table_len = u64::from_le_bytes(pack[t..t + 8].try_into().unwrap()) as usize;
    let table = &pack[t - table_len..t];
    assert_eq!(table_len % 49, 0, "entry table length");
    table
        .chunks(49)
        .map(|e| PackEntry {
            id: e[..32].iter().map(|b| format!("{b:02x}")).collect(),
            offset: u64::from_le_bytes(e[32..40].try_into().unwrap()),
            stored_len: u32::from_le_bytes(e[40..44].try_into().unwrap()) as u64,
            codec: e[48],
        })
        .collect()
}

/// Flip one byte in the middle of the middle chunk of the only pack
/// written since `before`; returns the damaged chunk's id and codec.
fn damage_middle_chunk(pack_path: &Path) -> (String, u8) {
    let mut pack = fs::read(pack_path).unwrap();
    let entries = pack_entries(&pack);
    assert!(entries.len() >= 3, "want several chunks in the pack");
    let e = &entries[entries.len() / 2];
    let pos = (e.offset + e.stored_len / 2) as usize;
    pack[pos] ^= 0x5a;
    // Keep the file's mode; root can write a read-only file.
    fs::write(pack_path, &pack).unwrap();
    (e.id.clone(), e.codec)
}

fn new_pack(env: &Env, before: &[std::path::PathBuf]) -> std::path::PathBuf {
    let mut new: Vec<_> = env
        .packs()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "one new pack: {new:?}");
    new.pop().unwrap()
}

fn check_damage(data: Vec<u8>, want_codec: Option<u8>) {
    let env = Env::new();
    // An unrelated stash in its own pack must survive the damage.
    let other = random_bytes(50, 1 << 20);
    env.stash_stdin("main/other", &other);
    let before = env.packs();
    env.stash_stdin("main/victim", &data);
    let pack = new_pack(&env, &before);
    let (chunk, codec) = damage_middle_chunk(&pack);
    if let Some(want) = want_codec {
        assert_eq!(codec, want, "the damaged chunk's codec");
    }

    // To a file: fails, names the stash and the chunk, leaves nothing.
    let outdir = env.path("out");
    fs::create_dir(&outdir).unwrap();
    let target = outdir.join("victim.bin");
    let out = env.ferry(&["unstash", "main/victim", target.to_str().unwrap()]);
    assert_ne!(out.code(), Some(0), "unstash of damaged data must fail");
    out.expect_code(2);
    assert!(
        out.stderr.contains("main/victim"),
        "stderr names the stash: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&chunk),
        "stderr names chunk {chunk}: {}",
        out.stderr
    );
    assert!(!target.exists(), "no half-written target");
    let left: Vec<_> = fs::read_dir(&outdir).unwrap().collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");

    // To stdout: fails, and whatever was written is a correct prefix.
    let out = env.ferry(&["unstash", "main/victim", "-"]);
    out.expect_code(2);
    assert!(out.stderr.contains(&chunk), "{}", out.stderr);
    assert!(
        out.stdout.len() < data.len(),
        "not all bytes can have been written"
    );
    assert_bytes_eq(&out.stdout, &data[..out.stdout.len()], "stdout prefix");

    // fsck --full finds and names it; exit 1 means problems found.
    let out = env.ferry(&["fsck", "--full"]);
    out.expect_code(1);
    let text = format!("{}{}", out.out(), out.stderr);
    assert!(text.contains(&chunk), "fsck --full names {chunk}: {text}");
    let out = env.ferry(&["--json", "fsck", "--full"]);
    out.expect_code(1);
    let report = out.json();
    let problems = report["problems"].as_array().expect("problems");
    assert!(!problems.is_empty(), "{report}");
    assert!(report.to_string().contains(&chunk), "{report}");

    // The quick fsck (structure and index only) still runs.
    let out = env.ferry(&["fsck"]);
    out.ok();

    // Undamaged data still restores.
    assert_bytes_eq(&env.unstash_stdout("main/other"), &other, "main/other");
}

#[test]
fn flipped_byte_in_raw_chunk_is_caught() {
    // Random bytes do not compress: stored raw, so the flip is in the data.
    check_damage(random_bytes(51, 3 << 20), Some(0));
}

#[test]
fn flipped_byte_in_compressed_chunk_is_caught() {
    let text: Vec<u8> = (0..120_000u32)
        .flat_map(|i| format!("{i:08} some log line that compresses well\n").into_bytes())
        .take(3 << 20)
        .collect();
    check_damage(text, Some(1));
}

#[test]
fn damaged_directory_stash_fails_to_restore() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/a.bin"), random_bytes(52, 2 << 20)).unwrap();
    fs::write(src.join("b.bin"), random_bytes(53, 1 << 20)).unwrap();
    env.stash_path("main/dir", &src);
    let pack = env.packs().pop().unwrap();
    let (chunk, _) = damage_middle_chunk(&pack);
    let dst = env.path("dst");
    let out = env.ferry(&["unstash", "main/dir", dst.to_str().unwrap()]);
    out.expect_code(2);
    assert!(out.stderr.contains("main/dir"), "{}", out.stderr);
    assert!(out.stderr.contains(&chunk), "{}", out.stderr);
    env.ferry(&["fsck", "--full"]).expect_code(1);
}

#[test]
fn missing_pack_is_reported() {
    let env = Env::new();
    let data = random_bytes(54, 2 << 20);
    env.stash_stdin("main/gone", &data);
    for pack in env.packs() {
        fs::remove_file(pack).unwrap();
    }
    let out = env.ferry(&["unstash", "main/gone", "-"]);
    out.expect_code(2);
    assert!(out.stderr.contains("main/gone"), "{}", out.stderr);
    assert!(out.stdout.is_empty() || data.starts_with(&out.stdout));
    let out = env.ferry(&["fsck"]);
    out.expect_code(1);
    let out = env.ferry(&["fsck", "--full"]);
    out.expect_code(1);
}
