//! Byte-exact round trips: files, stdin/stdout, empty input, directory
//! trees, docker and OCI archives, and property tests over random inputs.

use crate::util::*;
use proptest::prelude::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

#[test]
fn file_round_trips_to_file_and_stdout() {
    let env = Env::new();
    let data = mixed_bytes(1, 3 << 20);
    let input = env.path("input.bin");
    fs::write(&input, &data).unwrap();

    let report = env.stash_path("main/file", &input);
    assert_eq!(report["kind"], "file");
    assert_eq!(report["size"], data.len() as u64);
    assert_eq!(report["sha256"], sha256_hex(&data));

    let target = env.path("restored.bin");
    env.ferry(&["unstash", "main/file", target.to_str().unwrap()])
        .ok();
    assert_bytes_eq(&fs::read(&target).unwrap(), &data, "file target");
    assert_bytes_eq(&env.unstash_stdout("main/file"), &data, "stdout");

    let info = env.inspect("main/file");
    assert_eq!(info["kind"], "file");
    assert_eq!(info["size"], data.len() as u64);
    assert_eq!(info["sha256"], sha256_hex(&data));
    assert_eq!(env.names(), vec!["main/file".to_owned()]);
}

#[test]
fn stdin_round_trips_to_stdout() {
    let env = Env::new();
    let data = mixed_bytes(2, (5 << 20) / 2 + 17);
    let report = env.stash_stdin("pr/12/stream", &data);
    assert_eq!(report["size"], data.len() as u64);
    assert_eq!(report["sha256"], sha256_hex(&data));
    assert_eq!(
        report["new_bytes"],
        data.len() as u64,
        "a cold store: all new"
    );
    assert_bytes_eq(&env.unstash_stdout("pr/12/stream"), &data, "stdout");
    // To a file as well.
    let target = env.path("out.bin");
    env.ferry(&["unstash", "pr/12/stream", target.to_str().unwrap()])
        .ok();
    assert_bytes_eq(&fs::read(&target).unwrap(), &data, "file target");
}

#[test]
fn empty_input_round_trips() {
    let env = Env::new();
    let report = env.stash_stdin("main/empty", b"");
    assert_eq!(report["size"], 0);
    assert_eq!(report["sha256"], sha256_hex(b""));
    assert_eq!(env.unstash_stdout("main/empty"), Vec::<u8>::new());

    let empty = env.path("empty.bin");
    fs::write(&empty, b"").unwrap();
    env.stash_path("main/empty-file", &empty);
    let target = env.path("restored-empty");
    env.ferry(&["unstash", "main/empty-file", target.to_str().unwrap()])
        .ok();
    assert_eq!(fs::read(&target).unwrap(), Vec::<u8>::new());

    let dir = env.path("empty-dir");
    fs::create_dir(&dir).unwrap();
    env.stash_path("main/empty-dir", &dir);
    let restored = env.path("restored-dir");
    env.ferry(&["unstash", "main/empty-dir", restored.to_str().unwrap()])
        .ok();
    assert!(restored.is_dir());
    assert_eq!(fs::read_dir(&restored).unwrap().count(), 0);
    env.fsck_clean(true);
}

/// A tree with nested dirs, an empty dir, symlinks (to a file, to a dir,
/// dangling-but-inside), an executable, odd modes, long names and a big file.
fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("private")).unwrap();
    fs::write(root.join("README"), b"hello\n").unwrap();
    fs::write(root.join("a/b/c/d/deep.txt"), b"deep").unwrap();
    fs::write(root.join("a/zero"), b"").unwrap();
    fs::write(root.join("a/big.bin"), mixed_bytes(3, 1_500_000)).unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    set_mode(&root.join("run.sh"), 0o755);
    fs::write(root.join("private/secret"), random_bytes(4, 1000)).unwrap();
    set_mode(&root.join("private/secret"), 0o600);
    set_mode(&root.join("private"), 0o700);
    fs::write(root.join("a/open"), b"everyone").unwrap();
    set_mode(&root.join("a/open"), 0o777);
    // Long names: a 200-byte component, and a path longer than 255 bytes.
    let long = "n".repeat(200);
    fs::write(root.join(&long), b"long name").unwrap();
    let mut deep = root.to_path_buf();
    for i in 0..4 {
        deep = deep.join(format!("{i}{}", "x".repeat(90)));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join(format!("leaf-{}", "y".repeat(100))), b"leaf").unwrap();
    fs::write(root.join("unicode-ü-名前"), b"utf8 name").unwrap();
    symlink("README", root.join("link-to-file")).unwrap();
    symlink("a/b", root.join("link-to-dir")).unwrap();
    symlink("../../README", root.join("a/b/up-link")).unwrap();
    symlink("does-not-exist", root.join("dangling")).unwrap();
    let long_target = format!("{}/{}", "t".repeat(120), "u".repeat(120));
    symlink(&long_target, root.join("long-link")).unwrap();
    // Fixed mtimes (whole seconds), deepest first so parents keep theirs.
    let snap = snapshot(root);
    for (i, path) in snap.keys().rev().enumerate() {
        set_mtime(&root.join(path), 1_600_000_000 + i as i64 * 61);
    }
}

#[test]
fn directory_tree_round_trips() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    build_tree(&src);

    let report = env.stash_path("build/1/tree", &src);
    assert_eq!(report["kind"], "directory");
    assert_eq!(env.inspect("build/1/tree")["kind"], "directory");

    let dst = env.path("restored/here");
    fs::create_dir(env.path("restored")).unwrap();
    env.ferry(&["unstash", "build/1/tree", dst.to_str().unwrap()])
        .ok();
    assert_same_tree(&dst, &src);

    // An existing empty directory is a valid target too.
    let empty = env.path("empty-target");
    fs::create_dir(&empty).unwrap();
    env.ferry(&["unstash", "build/1/tree", empty.to_str().unwrap()])
        .ok();
    assert_same_tree(&empty, &src);

    // The same tree stashed again stores nothing new.
    let again = env.stash_path("build/2/tree", &src);
    assert_eq!(again["new_bytes"], 0, "{again}");
    env.fsck_clean(true);
}

fn three_layers() -> Vec<Vec<LayerFile>> {
    (1..=3).map(|i| layer_files(i, 8, 200_000)).collect()
}

fn check_image(layout: Layout, kind: &str, image_kind: &str) {
    let env = Env::new();
    let img = image_archive(layout, &three_layers(), "example/app:v1", 1_700_000_000);
    let file = env.path("image.tar");
    fs::write(&file, &img.bytes).unwrap();

    // As CI does: `docker save … | ferry stash NAME -`.
    let report = env.stash_stdin("main/img", &img.bytes);
    assert_eq!(report["kind"], kind, "{report}");
    assert_eq!(report["sha256"], sha256_hex(&img.bytes));
    // And from a file.
    let report = env.stash_path("main/img-file", &file);
    assert_eq!(report["kind"], kind, "{report}");
    assert_eq!(report["new_bytes"], 0, "same bytes: nothing new: {report}");

    for name in ["main/img", "main/img-file"] {
        let info = env.inspect(name);
        assert_eq!(info["kind"], kind, "{info}");
        assert_eq!(info["size"], img.bytes.len() as u64);
        assert_eq!(info["sha256"], sha256_hex(&img.bytes));
        let image = &info["image"];
        assert_eq!(image["kind"], image_kind, "{info}");
        assert_eq!(image["tags"], serde_json::json!(img.tags), "{info}");
        assert_eq!(image["config_digest"], img.config_digest, "{info}");
        let layers = image["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), img.layers.len(), "{info}");
        for (got, (path, diff_id)) in layers.iter().zip(&img.layers) {
            assert_eq!(got["path"], path.as_str());
            assert_eq!(got["diff_id"], diff_id.as_str());
            // offset and size locate exactly the layer's bytes.
            let offset = got["offset"].as_u64().unwrap() as usize;
            let size = got["size"].as_u64().unwrap() as usize;
            let bytes = &img.bytes[offset..offset + size];
            assert_eq!(format!("sha256:{}", sha256_hex(bytes)), *diff_id);
        }
        assert_bytes_eq(&env.unstash_stdout(name), &img.bytes, name);
    }
    let target = env.path("restored.tar");
    env.ferry(&["unstash", "main/img", target.to_str().unwrap()])
        .ok();
    assert_bytes_eq(&fs::read(&target).unwrap(), &img.bytes, "file target");
    env.fsck_clean(true);
}

#[test]
fn docker_legacy_archive_round_trips_with_metadata() {
    check_image(Layout::DockerLegacy, "docker-archive", "DockerArchive");
}

#[test]
fn docker25_oci_archive_round_trips_with_metadata() {
    check_image(Layout::DockerOci, "docker-oci-archive", "DockerOciArchive");
}

#[test]
fn oci_layout_tar_round_trips_with_metadata() {
    check_image(Layout::OciTar, "oci-layout", "OciLayout");
}

#[test]
fn plain_tar_round_trips() {
    let env = Env::new();
    let files = layer_files(9, 6, 150_000);
    let bytes = layer_tar(&files, 1_234_567_890);
    let report = env.stash_stdin("main/tar", &bytes);
    assert_eq!(report["kind"], "tar", "{report}");
    assert_bytes_eq(&env.unstash_stdout("main/tar"), &bytes, "tar");
}

/// Random bytes with repeats, of a random length (0 to ~600 KB).
fn stream_strategy() -> impl Strategy<Value = Vec<u8>> {
    (any::<u64>(), 0usize..600_000, 0u8..3).prop_map(|(seed, len, style)| match style {
        0 => random_bytes(seed, len),
        1 => mixed_bytes(seed, len),
        _ => vec![(seed & 0xff) as u8; len],
    })
}

#[derive(Debug, Clone)]
enum Entry {
    File { len: usize, seed: u64, mode: u32 },
    Dir { mode: u32 },
    Link { target: String },
}

fn tree_strategy() -> impl Strategy<Value = Vec<(Vec<String>, Entry)>> {
    let part = prop::sample::select(vec!["a", "b", "c", "data", "x.txt", "long-name-ü"]);
    let path = prop::collection::vec(part.prop_map(str::to_owned), 1..4);
    let entry = prop_oneof![
        4 => (0usize..200_000, any::<u64>(), prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o700, 0o444]))
            .prop_map(|(len, seed, mode)| Entry::File { len, seed, mode }),
        1 => prop::sample::select(vec![0o755u32, 0o700, 0o750]).prop_map(|mode| Entry::Dir { mode }),
        1 => prop::sample::select(vec!["a", "../b", "c/x.txt", "nowhere"]).prop_map(|t| Entry::Link { target: t.to_owned() }),
    ];
    prop::collection::vec((path, entry), 0..12)
}

/// Create `entries` under `root`, skipping those that clash with earlier ones.
fn make_tree(root: &Path, entries: &[(Vec<String>, Entry)]) {
    let mut dirs_to_chmod = Vec::new();
    for (parts, entry) in entries {
        let path = parts.iter().fold(root.to_path_buf(), |p, s| p.join(s));
        // Every ancestor must be (or become) a real directory.
        let mut ok = true;
        let mut anc = root.to_path_buf();
        for part in &parts[..parts.len() - 1] {
            anc = anc.join(part);
            match fs::symlink_metadata(&anc) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => ok = false,
                Err(_) => fs::create_dir(&anc).unwrap(),
            }
            if !ok {
                break;
            }
        }
        if !ok || fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        match entry {
            Entry::File { len, seed, mode } => {
                fs::write(&path, mixed_bytes(*seed, *len)).unwrap();
                set_mode(&path, *mode);
            }
            Entry::Dir { mode } => {
                fs::create_dir(&path).unwrap();
                dirs_to_chmod.push((path, *mode));
            }
            Entry::Link { target } => {
                // Keep every link inside the tree: `..` only below the root.
                let target = if target.starts_with("../") && parts.len() < 2 {
                    "b"
                } else {
                    target
                };
                symlink(target, &path).unwrap()
            }
        }
    }
    for (path, mode) in dirs_to_chmod {
        set_mode(&path, mode);
    }
    let snap = snapshot(root);
    for (i, path) in snap.keys().rev().enumerate() {
        set_mtime(&root.join(path), 1_500_000_000 + i as i64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_random_streams_round_trip(data in stream_strategy()) {
        let env = Env::new();
        let report = env.stash_stdin("prop/stream", &data);
        prop_assert_eq!(&report["sha256"], &serde_json::json!(sha256_hex(&data)));
        let back = env.unstash_stdout("prop/stream");
        prop_assert!(back == data, "round trip differs: {} vs {} bytes", back.len(), data.len());
    }

    #[test]
    fn prop_random_trees_round_trip(entries in tree_strategy()) {
        let env = Env::new();
        let src = env.path("src");
        fs::create_dir(&src).unwrap();
        make_tree(&src, &entries);
        env.stash_path("prop/tree", &src);
        let dst = env.path("dst");
        env.ferry(&["unstash", "prop/tree", dst.to_str().unwrap()]).ok();
        assert_same_tree(&dst, &src);
    }
}

#[test]
fn file_target_gets_ordinary_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.stash_stdin("main/f", b"contents");
    // What any ordinary program creating a file here gets (same umask).
    let reference = env.path("reference");
    fs::File::create(&reference).unwrap();
    let want = fs::metadata(&reference).unwrap().permissions().mode() & 0o777;
    let target = env.path("restored");
    env.ferry(&["unstash", "main/f", target.to_str().unwrap()])
        .ok();
    let got = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(got, want, "mode {got:o}, want {want:o}");
    // Overwriting keeps the existing file's mode.
    set_mode(&target, 0o644);
    env.ferry(&["unstash", "--force", "main/f", target.to_str().unwrap()])
        .ok();
    let got = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(got, 0o644, "mode after --force {got:o}");
}

#[test]
fn hard_links_and_fifos_in_a_tree() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    let data = mixed_bytes(5, 300_000);
    fs::write(src.join("file"), &data).unwrap();
    fs::hard_link(src.join("file"), src.join("sub/hard")).unwrap();
    let fifo = std::ffi::CString::new(src.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    env.stash_path("main/links", &src);
    let dst = env.path("dst");
    env.ferry(&["unstash", "main/links", dst.to_str().unwrap()])
        .ok();
    // Both names of the hard-linked file come back with its bytes; the
    // fifo is skipped.
    assert_bytes_eq(&fs::read(dst.join("file")).unwrap(), &data, "file");
    assert_bytes_eq(&fs::read(dst.join("sub/hard")).unwrap(), &data, "hard");
    assert!(fs::symlink_metadata(dst.join("fifo")).is_err());
}

/// Symlinks whose targets are absolute or climb out of the tree are common
/// (build trees, `/usr/lib` links). Either stash refuses them up front, or
/// the stash restores them as they were; a stash that can never be
/// restored is the one wrong outcome.
#[test]
fn trees_with_outward_symlinks_are_refused_or_restored() {
    for target in ["/etc/hostname", "../../outside"] {
        let env = Env::new();
        let src = env.path("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("f"), b"data").unwrap();
        symlink(target, src.join("sub/link")).unwrap();
        let out = env.ferry(&["stash", "main/t", src.to_str().unwrap()]);
        if out.code() == Some(2) {
            assert!(out.stderr.contains("link"), "{}", out.stderr);
            assert!(env.names().is_empty());
            continue;
        }
        out.ok();
        let dst = env.path("dst");
        env.ferry(&["unstash", "main/t", dst.to_str().unwrap()])
            .ok();
        assert_eq!(
            fs::read_link(dst.join("sub/link")).unwrap(),
            Path::new(target)
        );
    }
}

/// `unstash --force` into a directory that holds an earlier restore (a CI
/// workspace restored twice): the stash's files replace what is in their
/// way, a symlink there is replaced and never followed, the directory's
/// other files stay; without --force it is refused and nothing changes.
#[test]
fn force_restores_over_an_earlier_restore() {
    use std::os::unix::fs::symlink;
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("lib/sub")).unwrap();
    fs::write(src.join("lib/a.so"), b"library a").unwrap();
    fs::write(src.join("lib/sub/b.txt"), b"file b").unwrap();
    symlink("a.so", src.join("lib/current")).unwrap();
    env.stash_path("build/lib", &src);

    let dest = env.path("workspace");
    env.ferry(&["unstash", "build/lib", dest.to_str().unwrap()])
        .ok();
    // The job changes things, then restores again.
    let outside = env.path("outside.txt");
    fs::write(&outside, b"not yours").unwrap();
    fs::write(dest.join("lib/a.so"), b"changed").unwrap();
    fs::remove_file(dest.join("lib/sub/b.txt")).unwrap();
    symlink(&outside, dest.join("lib/sub/b.txt")).unwrap();
    fs::write(dest.join("lib/extra.log"), b"the job's own file").unwrap();

    let out = env.ferry(&["unstash", "build/lib", dest.to_str().unwrap()]);
    out.expect_code(2);
    assert_eq!(fs::read(dest.join("lib/a.so")).unwrap(), b"changed");

    env.ferry(&["unstash", "--force", "build/lib", dest.to_str().unwrap()])
        .ok();
    assert_eq!(fs::read(dest.join("lib/a.so")).unwrap(), b"library a");
    let b = dest.join("lib/sub/b.txt");
    assert!(!fs::symlink_metadata(&b).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(&b).unwrap(), b"file b");
    assert_eq!(fs::read(&outside).unwrap(), b"not yours", "written through");
    assert_eq!(
        fs::read_link(dest.join("lib/current")).unwrap(),
        Path::new("a.so")
    );
    assert_eq!(
        fs::read(dest.join("lib/extra.log")).unwrap(),
        b"the job's own file"
    );
}
