//! Faults: hostile directory stashes, a full disk during stash and during
//! unstash, and store files damaged every way a disk or an operator can
//! damage them.
//!
//! Extends `corruption.rs` (flipped bytes inside chunks) and `diskfull.rs`
//! (a new name on a full store) without repeating them.

use crate::util::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// Hostile directory stashes
//
// `ferry stash NAME DIR` only ever records a deterministic tar of a real
// tree, but a directory stash is just a manifest whose kind says
// "directory": anyone who can write a name (a pull-request build pushing to
// its own scope, or anything with write access to a store) can commit a
// manifest of that kind over any byte stream. The server's commit is
// `Store::commit_manifest`, which the forgery below calls directly. The
// restore is then driven through the real binary, `ferry unstash NAME DIR`.

/// A tar built header by header, so that names the `tar` crate's own path
/// setters refuse (`..`, absolute) can be written.
struct RawTar(Vec<u8>);

impl RawTar {
    fn new() -> RawTar {
        RawTar(Vec::new())
    }

    /// One entry: a GNU header with `name` and `link` copied verbatim.
    fn entry(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        mode: u32,
        data: &[u8],
    ) -> &mut RawTar {
        assert!(name.len() <= 100 && link.len() <= 100, "use long_name");
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name);
            g.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.data(data)
    }

    fn data(&mut self, data: &[u8]) -> &mut RawTar {
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut RawTar {
        self.entry(name.as_bytes(), tar::EntryType::Regular, b"", 0o644, data)
    }

    fn dir(&mut self, name: &str) -> &mut RawTar {
        self.entry(name.as_bytes(), tar::EntryType::Directory, b"", 0o755, b"")
    }

    fn link(&mut self, kind: tar::EntryType, name: &str, target: &[u8]) -> &mut RawTar {
        self.entry(name.as_bytes(), kind, target, 0o777, b"")
    }

    /// A GNU long-name record (`././@LongLink`, type `L`) naming the next entry.
    fn long_name(&mut self, name: &[u8]) -> &mut RawTar {
        let mut data = name.to_vec();
        data.push(0);
        self.entry(
            b"././@LongLink",
            tar::EntryType::GNULongName,
            b"",
            0o644,
            &data,
        )
    }

    /// A pax extended header (type `x`) with one `path` record: it overrides
    /// the name of the next entry.
    fn pax_path(&mut self, path: &[u8]) -> &mut RawTar {
        let body_len = " path=".len() + path.len() + 1;
        let mut len = body_len + 1;
        while len != body_len + len.to_string().len() {
            len = body_len + len.to_string().len();
        }
        let mut rec = format!("{len} path=").into_bytes();
        rec.extend_from_slice(path);
        rec.push(b'\n');
        assert_eq!(rec.len(), len);
        self.entry(b"PaxHeaders/x", tar::EntryType::XHeader, b"", 0o644, &rec)
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut out = self.0.clone();
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// Make `name` a *directory* stash of the raw tar stream `tar`, as a hostile
/// writer would: stash the bytes, then commit a manifest that says
/// "directory" over the same chunks.
fn forge_directory_stash(env: &Env, name: &str, tar: &[u8]) {
    env.stash_stdin(name, tar);
    let store = store::repo::Store::open(&env.store).expect("open the test store");
    let n = store::name::Name::parse(name).unwrap();
    let (_, mut manifest) = store.manifest(&n).unwrap();
    manifest.header.kind = store::manifest::StashKind::Directory;
    store.commit_manifest(&n, &manifest.encode()).unwrap();
    drop(store);
    assert_eq!(env.inspect(name)["kind"], "directory");
}

/// A test box: `box/outside` holds a victim file and a victim directory that
/// no restore may touch; restores go to `box/dest`.
struct Box {
    root: PathBuf,
    outside: PathBuf,
    victim: PathBuf,
}

const VICTIM: &[u8] = b"the victim's original bytes\n";

impl Box {
    fn new(env: &Env, tag: &str) -> Box {
        let root = env.path(&format!("box-{tag}"));
        let outside = root.join("outside");
        fs::create_dir_all(outside.join("dir")).unwrap();
        let victim = outside.join("victim");
        fs::write(&victim, VICTIM).unwrap();
        set_mode(&victim, 0o644);
        Box {
            root,
            outside,
            victim,
        }
    }

    fn dest(&self) -> PathBuf {
        self.root.join("dest")
    }

    /// What is in the box, apart from `dest` itself.
    fn around_dest(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "dest")
            .collect();
        v.sort();
        v
    }
}

/// Every path under `dir` with its kind, size and mode (what must not change).
fn listing(dir: &Path) -> Vec<(PathBuf, String)> {
    snapshot(dir)
        .into_iter()
        .map(|(p, n)| (p, format!("{n:?}")))
        .collect()
}

/// Restore the forged `name` into `box/dest` through the CLI (with `extra`
/// arguments such as `--force`); it must be refused, and nothing outside
/// `dest` may change. Returns stderr.
#[track_caller]
fn refused(env: &Env, b: &Box, name: &str, extra: &[&str], must_name: &str) -> String {
    let before = listing(&b.outside);
    let ino = fs::metadata(&b.victim).unwrap().ino();
    let dest_existed = b.dest().exists();
    let mut args = vec!["unstash"];
    args.extend_from_slice(extra);
    args.push(name);
    let dest = b.dest();
    args.push(dest.to_str().unwrap());
    let out = env.ferry(&args);
    out.expect_code(2);
    assert!(
        out.stderr.contains("refused") && out.stderr.contains(must_name),
        "the error names the refused entry {must_name:?}: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked"),
        "ferry panicked: {}",
        out.stderr
    );
    // Outside: the same files, the same bytes, the same inode and modes.
    assert_eq!(
        listing(&b.outside),
        before,
        "something outside dest changed"
    );
    assert_eq!(fs::read(&b.victim).unwrap(), VICTIM);
    assert_eq!(fs::metadata(&b.victim).unwrap().ino(), ino);
    assert_eq!(
        fs::metadata(&b.victim).unwrap().nlink(),
        1,
        "victim hard-linked"
    );
    // Next to dest: nothing new (no staging directory left behind either).
    assert_eq!(b.around_dest(), vec!["outside".to_string()]);
    // A restore into a path that did not exist is all or nothing.
    if !dest_existed {
        assert!(
            !b.dest().exists(),
            "a refused restore left {}",
            b.dest().display()
        );
    }
    out.stderr
}

#[test]
fn hostile_paths_are_refused_and_nothing_is_written_outside() {
    let env = Env::new();
    let b = Box::new(&env, "paths");
    let abs_new = b.outside.join("created-by-absolute-path");
    let abs_victim = b.victim.as_os_str().as_bytes().to_vec();
    let long_escape = format!("{}/../../../outside/long-escape", "d".repeat(120));
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "dotdot",
            RawTar::new()
                .file("ok.txt", b"harmless")
                .file("../outside/victim", b"overwritten")
                .finish(),
            "../outside/victim".into(),
        ),
        (
            "dotdot-new",
            RawTar::new().file("../escaped", b"escaped").finish(),
            "../escaped".into(),
        ),
        (
            "nested-dotdot",
            RawTar::new()
                .dir("a/")
                .file("a/../../outside/victim", b"overwritten")
                .finish(),
            "a/../../outside/victim".into(),
        ),
        (
            "absolute-existing",
            RawTar::new()
                .entry(
                    &abs_victim,
                    tar::EntryType::Regular,
                    b"",
                    0o644,
                    b"overwritten",
                )
                .finish(),
            b.victim.display().to_string(),
        ),
        (
            "absolute-new",
            RawTar::new()
                .entry(
                    abs_new.as_os_str().as_bytes(),
                    tar::EntryType::Regular,
                    b"",
                    0o644,
                    b"created",
                )
                .finish(),
            abs_new.display().to_string(),
        ),
        (
            "gnu-long-name-dotdot",
            RawTar::new()
                .long_name(long_escape.as_bytes())
                .file("short-name", b"escaped")
                .finish(),
            "long-escape".into(),
        ),
        (
            "pax-path-dotdot",
            RawTar::new()
                .pax_path(b"../outside/victim")
                .file("innocent", b"overwritten")
                .finish(),
            "../outside/victim".into(),
        ),
        (
            "absolute-directory",
            RawTar::new()
                .entry(
                    format!("{}/newdir/", b.outside.display()).as_bytes(),
                    tar::EntryType::Directory,
                    b"",
                    0o777,
                    b"",
                )
                .finish(),
            "newdir".into(),
        ),
    ];
    for (tag, tar, entry) in &cases {
        let name = format!("pr/666/{tag}");
        forge_directory_stash(&env, &name, tar);
        refused(&env, &b, &name, &[], entry);
        // Into an existing empty directory, and with --force into a
        // non-empty one: refused the same way.
        fs::create_dir(b.dest()).unwrap();
        refused(&env, &b, &name, &[], entry);
        // (What was restored before the refusal stays in an existing dest.)
        fs::remove_dir_all(b.dest()).unwrap();
        fs::create_dir(b.dest()).unwrap();
        fs::write(b.dest().join("mine"), b"the user's").unwrap();
        refused(&env, &b, &name, &["--force"], entry);
        assert_eq!(fs::read(b.dest().join("mine")).unwrap(), b"the user's");
        fs::remove_dir_all(b.dest()).unwrap();
        assert!(!abs_new.exists());
        assert!(!b.root.join("escaped").exists());
    }
    // The forged stashes are well-formed as far as the store goes.
    env.fsck_clean(true);
}

#[test]
fn links_out_of_the_tree_are_never_written_through() {
    let env = Env::new();
    let b = Box::new(&env, "links");
    let outside_abs = b.outside.as_os_str().as_bytes().to_vec();
    let victim_abs = b.victim.as_os_str().as_bytes().to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // A directory symlink out of the tree, then a file written through it.
        (
            "relative-dir-link",
            RawTar::new()
                .link(tar::EntryType::Symlink, "out", b"../outside")
                .file("out/victim", b"overwritten")
                .finish(),
            "out/victim",
        ),
        (
            "absolute-dir-link",
            RawTar::new()
                .link(tar::EntryType::Symlink, "out", &outside_abs)
                .file("out/new-file", b"created")
                .finish(),
            "out/new-file",
        ),
        (
            "dir-through-link",
            RawTar::new()
                .link(tar::EntryType::Symlink, "out", &outside_abs)
                .dir("out/newdir/")
                .finish(),
            "out/newdir",
        ),
        (
            "link-in-link",
            RawTar::new()
                .dir("a/")
                .link(tar::EntryType::Symlink, "a/up", b"../..")
                .file("a/up/outside/victim", b"overwritten")
                .finish(),
            "a/up/outside/victim",
        ),
        // A symlink to a file outside, then a regular file of the same name:
        // the file must not be written through the link.
        (
            "file-link-then-file",
            RawTar::new()
                .link(tar::EntryType::Symlink, "v", b"../outside/victim")
                .file("v", b"overwritten")
                .finish(),
            "v",
        ),
        (
            "file-link-then-dir",
            RawTar::new()
                .link(tar::EntryType::Symlink, "d", b"../outside/dir")
                .dir("d/")
                .file("d/new-file", b"created")
                .finish(),
            "d",
        ),
        // Hard links: to an absolute outside file, to a relative one, and to
        // a file of the tree; then data written to the link's name.
        (
            "hardlink-absolute",
            RawTar::new()
                .link(tar::EntryType::Link, "h", &victim_abs)
                .finish(),
            "h",
        ),
        (
            "hardlink-relative-then-write",
            RawTar::new()
                .link(tar::EntryType::Link, "h", b"../outside/victim")
                .file("h", b"overwritten")
                .finish(),
            "h",
        ),
        (
            "hardlink-inside",
            RawTar::new()
                .file("a", b"inside")
                .link(tar::EntryType::Link, "h", b"a")
                .finish(),
            "h",
        ),
        // Device nodes and fifos: never created.
        (
            "char-device",
            RawTar::new()
                .entry(b"null", tar::EntryType::Char, b"", 0o666, b"")
                .finish(),
            "null",
        ),
        (
            "block-device",
            RawTar::new()
                .entry(b"disk", tar::EntryType::Block, b"", 0o666, b"")
                .finish(),
            "disk",
        ),
        (
            "fifo",
            RawTar::new()
                .entry(b"pipe", tar::EntryType::Fifo, b"", 0o666, b"")
                .finish(),
            "pipe",
        ),
    ];
    for (tag, tar, entry) in &cases {
        let name = format!("pr/666/{tag}");
        forge_directory_stash(&env, &name, tar);
        refused(&env, &b, &name, &[], entry);
        fs::create_dir(b.dest()).unwrap();
        refused(&env, &b, &name, &["--force"], entry);
        // Whatever was restored before the refusal is inside dest, and is
        // no device node.
        for (path, _) in snapshot(&b.dest()) {
            let m = fs::symlink_metadata(b.dest().join(&path)).unwrap();
            let ft = m.file_type();
            assert!(
                ft.is_file() || ft.is_dir() || ft.is_symlink(),
                "{tag}: {} is a special file",
                path.display()
            );
        }
        fs::remove_dir_all(b.dest()).unwrap();
    }
}

/// A destination that already holds a symlink out of the tree (restoring
/// with --force into a directory a previous job left behind): entries under
/// it are refused, not written through.
#[test]
fn existing_symlink_in_the_destination_is_not_followed() {
    let env = Env::new();
    let b = Box::new(&env, "existing");
    let with_dir_entry = RawTar::new()
        .dir("sub/")
        .file("sub/victim", b"overwritten")
        .finish();
    let without = RawTar::new().file("sub/victim", b"overwritten").finish();
    forge_directory_stash(&env, "pr/666/with-dir", &with_dir_entry);
    forge_directory_stash(&env, "pr/666/without-dir", &without);
    for (name, says) in [
        ("pr/666/with-dir", "already exists"),
        ("pr/666/without-dir", "is a symlink"),
    ] {
        fs::create_dir(b.dest()).unwrap();
        symlink(&b.outside, b.dest().join("sub")).unwrap();
        let err = refused(&env, &b, name, &["--force"], "sub");
        assert!(err.contains(says), "{err}");
        assert_eq!(fs::read_link(b.dest().join("sub")).unwrap(), b.outside);
        fs::remove_dir_all(b.dest()).unwrap();
    }
}

/// What can be restored safely is: setuid, setgid and sticky bits are
/// dropped, and a symlink pointing out of the tree is recreated as a link
/// (never followed), exactly as `ferry stash` of such a tree records it.
#[test]
fn special_mode_bits_are_dropped_and_outward_links_stay_links() {
    let env = Env::new();
    let b = Box::new(&env, "modes");
    let tar = RawTar::new()
        .entry(
            b"suid",
            tar::EntryType::Regular,
            b"",
            0o4755,
            b"#!/bin/sh\n",
        )
        .entry(b"sgid-dir/", tar::EntryType::Directory, b"", 0o2775, b"")
        .entry(b"sticky/", tar::EntryType::Directory, b"", 0o1777, b"")
        .link(
            tar::EntryType::Symlink,
            "to-victim",
            b.victim.as_os_str().as_bytes(),
        )
        .link(tar::EntryType::Symlink, "up", b"../outside")
        .finish();
    forge_directory_stash(&env, "pr/666/modes", &tar);
    let before = listing(&b.outside);
    let dest = b.dest();
    env.ferry(&["unstash", "pr/666/modes", dest.to_str().unwrap()])
        .ok();
    assert_eq!(
        fs::metadata(dest.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        fs::metadata(dest.join("sgid-dir")).unwrap().mode() & 0o7777,
        0o775
    );
    assert_eq!(
        fs::metadata(dest.join("sticky")).unwrap().mode() & 0o7777,
        0o777
    );
    assert_eq!(fs::read_link(dest.join("to-victim")).unwrap(), b.victim);
    assert_eq!(
        fs::read_link(dest.join("up")).unwrap(),
        Path::new("../outside")
    );
    assert_eq!(listing(&b.outside), before);
    assert_eq!(fs::read(&b.victim).unwrap(), VICTIM);
    assert_eq!(b.around_dest(), vec!["outside".to_string()]);
}

// ---------------------------------------------------------------------------
// A full disk during stash and during unstash

/// Grow (or shrink) a tmpfs mount.
fn remount(mount: &Mount, size: &str) {
    let st = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={size}")])
        .arg(&mount.dir)
        .status()
        .expect("run mount");
    assert!(st.success(), "remount {} to {size}", mount.dir.display());
}

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[track_caller]
fn says_disk_full(out: &Out) {
    out.expect_code(2);
    assert!(
        out.stderr
            .to_lowercase()
            .contains("no space left on device"),
        "the message should say the disk is full: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// Stashing a new version of existing names onto a full store, from a file,
/// from standard input and from a directory: each fails saying the disk is
/// full, the names keep their previous versions byte for byte, the store
/// checks clean with no temporary file left, and once there is space again
/// the same commands succeed.
#[test]
fn full_disk_during_stash_keeps_the_previous_version() {
    let mut env = Env::new();
    let Some(mount) = Mount::tmpfs(&env.path("small"), "size=24m") else {
        eprintln!(
            "skipping full_disk_during_stash_keeps_the_previous_version: cannot mount a tmpfs"
        );
        return;
    };
    env.store = mount.dir.join("store");
    let v1 = mixed_bytes(200, 3 << 20);
    env.stash_stdin("main/app", &v1);
    let tree = env.path("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/a"), random_bytes(201, 1 << 20)).unwrap();
    fs::write(tree.join("b"), b"small").unwrap();
    env.stash_path("main/tree", &tree);

    // Version 2 of each is far larger than the 24 MB disk.
    let v2 = random_bytes(202, 40 << 20);
    let v2_file = env.path("v2.bin");
    fs::write(&v2_file, &v2).unwrap();
    let big_tree = env.path("big-tree");
    fs::create_dir_all(big_tree.join("sub")).unwrap();
    fs::write(big_tree.join("sub/a"), random_bytes(203, 20 << 20)).unwrap();
    fs::write(big_tree.join("b"), random_bytes(204, 20 << 20)).unwrap();

    let attempts = |env: &Env| -> Vec<(&'static str, Out)> {
        vec![
            (
                "main/app",
                env.ferry(&["stash", "main/app", v2_file.to_str().unwrap()]),
            ),
            ("main/app", env.ferry_in(&["stash", "main/app", "-"], &v2)),
            (
                "main/tree",
                env.ferry(&["stash", "main/tree", big_tree.to_str().unwrap()]),
            ),
        ]
    };
    for (name, out) in attempts(&env) {
        says_disk_full(&out);
        assert!(
            out.stderr.contains(env.store.to_str().unwrap()),
            "the message names where space ran out: {}",
            out.stderr
        );
        assert_eq!(env.names(), ["main/app", "main/tree"], "after {name}");
        assert_bytes_eq(&env.unstash_stdout("main/app"), &v1, "main/app v1");
        let restored = env.path("restored");
        env.ferry(&["unstash", "main/tree", restored.to_str().unwrap()])
            .ok();
        assert_same_tree(&restored, &tree);
        fs::remove_dir_all(&restored).unwrap();
        assert_eq!(
            entries(&env.store.join("tmp")),
            Vec::<String>::new(),
            "a failed stash left temporary files"
        );
        env.fsck_clean(true);
    }

    // Space is back: the same commands succeed.
    remount(&mount, "160m");
    for (name, out) in attempts(&env) {
        out.ok();
        if name == "main/app" {
            assert_bytes_eq(&env.unstash_stdout("main/app"), &v2, "main/app v2");
        }
    }
    let restored = env.path("restored");
    env.ferry(&["unstash", "main/tree", restored.to_str().unwrap()])
        .ok();
    assert_same_tree(&restored, &big_tree);
    env.fsck_clean(true);
}

/// Restoring onto a full filesystem: to a new file, over an existing file
/// with --force, into a new directory, and to standard output redirected to
/// a file there. Each fails saying the disk is full; no partial file or
/// directory is left under the target's name (an existing file keeps its
/// bytes) and no temporary file is left beside it; the store is untouched;
/// with space back, every restore succeeds.
#[test]
fn full_disk_during_unstash_leaves_no_partial_output() {
    let env = Env::new();
    let Some(mount) = Mount::tmpfs(&env.path("out"), "size=8m") else {
        eprintln!(
            "skipping full_disk_during_unstash_leaves_no_partial_output: cannot mount a tmpfs"
        );
        return;
    };
    let out_dir = mount.dir.clone();
    let data = random_bytes(210, 20 << 20);
    env.stash_stdin("main/img", &data);
    let tree = env.path("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/a"), random_bytes(211, 6 << 20)).unwrap();
    fs::write(tree.join("b"), random_bytes(212, 6 << 20)).unwrap();
    env.stash_path("main/tree", &tree);

    // A new file.
    let img = out_dir.join("img.tar");
    let out = env.ferry(&["unstash", "main/img", img.to_str().unwrap()]);
    says_disk_full(&out);
    assert!(!img.exists(), "a partial file under the target's name");
    assert_eq!(
        entries(&out_dir),
        Vec::<String>::new(),
        "temporary files left"
    );

    // Over an existing file: it keeps its bytes.
    let old = out_dir.join("old.tar");
    fs::write(&old, b"the previous image").unwrap();
    let out = env.ferry(&["unstash", "--force", "main/img", old.to_str().unwrap()]);
    says_disk_full(&out);
    assert_eq!(fs::read(&old).unwrap(), b"the previous image");
    assert_eq!(entries(&out_dir), ["old.tar"]);

    // A new directory.
    let dir = out_dir.join("tree");
    let out = env.ferry(&["unstash", "main/tree", dir.to_str().unwrap()]);
    says_disk_full(&out);
    assert!(!dir.exists(), "a partial directory under the target's name");
    assert_eq!(entries(&out_dir), ["old.tar"], "staging left behind");

    // Standard output into a file on the full disk: the exit status is what
    // tells the pipeline the output is incomplete.
    let stdout_file = out_dir.join("stdout.bin");
    let child = env
        .cmd()
        .args(["unstash", "main/img", "-"])
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&stdout_file).unwrap())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let out = Out {
        status: child.status,
        stdout: Vec::new(),
        stderr: String::from_utf8_lossy(&child.stderr).into_owned(),
    };
    says_disk_full(&out);
    let partial = fs::read(&stdout_file).unwrap();
    assert!(partial.len() < data.len());
    assert_bytes_eq(&partial, &data[..partial.len()], "stdout prefix");
    fs::remove_file(&stdout_file).unwrap();

    // The store was only read.
    env.fsck_clean(true);
    assert_eq!(env.names(), ["main/img", "main/tree"]);

    // Space is back.
    remount(&mount, "64m");
    env.ferry(&["unstash", "main/img", img.to_str().unwrap()])
        .ok();
    assert_bytes_eq(&fs::read(&img).unwrap(), &data, "img");
    env.ferry(&["unstash", "--force", "main/img", old.to_str().unwrap()])
        .ok();
    assert_bytes_eq(&fs::read(&old).unwrap(), &data, "old.tar replaced");
    env.ferry(&["unstash", "main/tree", dir.to_str().unwrap()])
        .ok();
    assert_same_tree(&dir, &tree);
    assert_eq!(entries(&out_dir), ["img.tar", "old.tar", "tree"]);
}

// ---------------------------------------------------------------------------
// Store files damaged by a disk or an operator (layout: store/src/backend.rs)

/// A store with two names in two packs: `main/victim`, whose files the tests
/// damage, and `main/other`, which must keep working.
struct Damaged {
    env: Env,
    victim: Vec<u8>,
    other: Vec<u8>,
    /// The victim's pack, its index and its manifest; the victim's ref.
    pack: PathBuf,
    idx: PathBuf,
    manifest_id: String,
    manifest: PathBuf,
    reff: PathBuf,
}

impl Damaged {
    fn new() -> Damaged {
        let env = Env::new();
        let other = random_bytes(300, 1 << 20);
        env.stash_stdin("main/other", &other);
        let before = env.packs();
        let victim = mixed_bytes(301, 3 << 20);
        env.stash_stdin("main/victim", &victim);
        let new: Vec<PathBuf> = env
            .packs()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        assert_eq!(new.len(), 1, "one new pack: {new:?}");
        let pack = new[0].clone();
        let stem = pack.file_stem().unwrap().to_str().unwrap().to_owned();
        let idx = env.store.join("index").join(format!("{stem}.idx"));
        assert!(idx.is_file());
        let manifest_id = env.inspect("main/victim")["manifest"]
            .as_str()
            .unwrap()
            .to_owned();
        let manifest = env
            .store
            .join("manifests")
            .join(&manifest_id[..2])
            .join(&manifest_id);
        assert!(manifest.is_file());
        let reff = env.store.join("refs/main/victim.ref");
        assert!(reff.is_file());
        Damaged {
            env,
            victim,
            other,
            pack,
            idx,
            manifest_id,
            manifest,
            reff,
        }
    }

    fn pack_id(&self) -> String {
        self.pack.file_stem().unwrap().to_str().unwrap().to_owned()
    }

    /// `ferry fsck ARGS…` finds problems (exit 1) and its report contains
    /// every one of `needles`; returns the report text.
    #[track_caller]
    fn fsck_finds(&self, args: &[&str], needles: &[&str]) -> String {
        let mut a = vec!["fsck"];
        a.extend_from_slice(args);
        let out = self.env.ferry(&a);
        out.expect_code(1);
        let text = format!("{}{}", out.out(), out.stderr);
        for n in needles {
            assert!(text.contains(n), "fsck {args:?} should name {n:?}:\n{text}");
        }
        text
    }

    /// Unstashing the victim fails (to a file and to stdout) with a message
    /// holding every one of `needles`, and leaves no file behind.
    #[track_caller]
    fn victim_fails(&self, needles: &[&str]) {
        let dir = self.env.path("restore");
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("victim.bin");
        let out = self
            .env
            .ferry(&["unstash", "main/victim", target.to_str().unwrap()]);
        out.expect_code(2);
        for n in needles {
            assert!(
                out.stderr.contains(n),
                "unstash should name {n:?}: {}",
                out.stderr
            );
        }
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        assert_eq!(entries(&dir), Vec::<String>::new(), "left a file behind");
        let out = self.env.ferry(&["unstash", "main/victim", "-"]);
        out.expect_code(2);
        assert!(
            self.victim.starts_with(&out.stdout),
            "wrong bytes on stdout"
        );
    }

    #[track_caller]
    fn victim_ok(&self) {
        assert_bytes_eq(
            &self.env.unstash_stdout("main/victim"),
            &self.victim,
            "main/victim",
        );
    }

    #[track_caller]
    fn other_ok(&self) {
        assert_bytes_eq(
            &self.env.unstash_stdout("main/other"),
            &self.other,
            "main/other",
        );
    }

    /// The operator's remedy for lost data: remove the name, collect
    /// (twice: condemn, then delete), and the store checks clean.
    #[track_caller]
    fn remove_victim_and_collect(&self) {
        self.env.ferry(&["rm", "main/victim"]).ok();
        for _ in 0..2 {
            self.env.ferry(&["gc", "--grace", "0s"]).ok();
        }
        self.env.fsck_clean(true);
        assert_eq!(self.env.names(), ["main/other"]);
        self.other_ok();
        // And the victim can be stashed again.
        self.env.stash_stdin("main/victim", &self.victim);
        self.victim_ok();
        self.env.fsck_clean(true);
    }
}

/// A pack cut short (half its length, or nothing at all): fsck names the
/// pack and the stash that needs it; the victim fails naming the stash, the pack and what is wrong;
/// --repair cannot bring data back, removing the name and collecting does.
#[test]
fn truncated_pack() {
    for keep in [0.5, 0.0] {
        let d = Damaged::new();
        let len = fs::metadata(&d.pack).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&d.pack).unwrap();
        f.set_len((len as f64 * keep) as u64).unwrap();
        drop(f);
        let pack = d.pack.to_str().unwrap();
        // fsck names the pack, and the stash that loses data by it (only
        // that one).
        for args in [&[][..], &["--full"][..]] {
            let text = d.fsck_finds(
                args,
                &[pack, "corrupt", "main/victim", "chunks are damaged"],
            );
            assert!(!text.contains("main/other"), "{text}");
        }
        d.victim_fails(&["main/victim", pack, "truncated"]);
        d.other_ok();
        d.fsck_finds(&["--repair"], &[pack]);
        d.remove_victim_and_collect();
        assert!(
            !d.pack.exists() && !d.idx.exists(),
            "gc removed the damaged pack"
        );
    }
}

/// A pack deleted: fsck names the stash that lost its chunks (and the index
/// left without its pack); the victim fails naming the missing pack.
#[test]
fn missing_pack() {
    let d = Damaged::new();
    fs::remove_file(&d.pack).unwrap();
    let idx = d.idx.to_str().unwrap();
    d.fsck_finds(&[], &["main/victim", "missing", idx]);
    d.victim_fails(&["main/victim", d.pack.to_str().unwrap(), "not found"]);
    d.other_ok();
    d.fsck_finds(&["--repair"], &["main/victim"]);
    d.remove_victim_and_collect();
    assert!(!d.idx.exists(), "gc removed the orphaned index");
}

/// An index file deleted, emptied or overwritten: the chunks are still in
/// the pack. fsck names the stash (and the index or pack); gc does not take
/// the pack for garbage; `fsck --repair` rebuilds the index from the pack
/// and everything restores again.
#[test]
fn missing_or_damaged_index() {
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 3] = [
        ("missing", |p| fs::remove_file(p).unwrap()),
        ("zero-length", |p| fs::write(p, b"").unwrap()),
        ("garbage", |p| {
            let mut b = fs::read(p).unwrap();
            let n = b.len();
            b[n / 2..].iter_mut().for_each(|x| *x = 0x5a);
            fs::write(p, b).unwrap()
        }),
    ];
    for (what, damage) in damages {
        let d = Damaged::new();
        damage(&d.idx);
        let mention = if what == "missing" {
            d.pack.to_str().unwrap().to_owned()
        } else {
            d.idx.to_str().unwrap().to_owned()
        };
        d.fsck_finds(&[], &["main/victim", "missing", &mention, "--repair"]);
        d.victim_fails(&["main/victim", "missing from the store"]);
        d.other_ok();
        // A collection meanwhile must not take the unindexed pack for garbage.
        for _ in 0..2 {
            d.env.ferry(&["gc", "--grace", "0s"]).ok();
        }
        assert!(
            d.pack.exists(),
            "{what}: gc deleted a pack it could not index"
        );
        let out = d.env.ferry(&["fsck", "--repair"]);
        out.ok();
        assert!(
            out.stderr
                .contains(&format!("rebuilt the index of pack {}", d.pack_id())),
            "{what}: {}",
            out.stderr
        );
        d.env.fsck_clean(true);
        d.victim_ok();
        d.other_ok();
    }
}

/// Every index file gone at once (an operator "cleaning up" `index/`).
#[test]
fn all_index_files_missing() {
    let d = Damaged::new();
    for e in fs::read_dir(d.env.store.join("index")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    d.fsck_finds(&[], &["main/victim", "main/other"]);
    let out = d.env.ferry(&["fsck", "--repair"]);
    out.ok();
    assert_eq!(out.stderr.matches("rebuilt the index of pack").count(), 2);
    d.env.fsck_clean(true);
    d.victim_ok();
    d.other_ok();
}

/// A manifest truncated, emptied, overwritten or deleted: fsck names the
/// stash and the manifest; the victim fails naming the manifest; --repair
/// cannot help, stashing the same input again rewrites the manifest.
#[test]
fn damaged_or_missing_manifest() {
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 4] = [
        ("truncated", |p| {
            let b = fs::read(p).unwrap();
            fs::write(p, &b[..b.len() / 2]).unwrap()
        }),
        ("zero-length", |p| fs::write(p, b"").unwrap()),
        ("garbage", |p| {
            fs::write(p, random_bytes(302, 4096)).unwrap()
        }),
        ("missing", |p| fs::remove_file(p).unwrap()),
    ];
    for (what, damage) in damages {
        let d = Damaged::new();
        damage(&d.manifest);
        let problem = if what == "missing" {
            "not found"
        } else {
            "damaged"
        };
        d.fsck_finds(&[], &["main/victim", &d.manifest_id, problem]);
        d.victim_fails(&[&d.manifest_id, problem]);
        d.other_ok();
        // ls still lists both names.
        let out = d.env.ferry(&["ls"]);
        out.ok();
        assert!(out.out().contains("main/victim") && out.out().contains("main/other"));
        d.fsck_finds(&["--repair"], &["main/victim"]);
        // The remedy: stash the same input again.
        d.env.stash_stdin("main/victim", &d.victim);
        d.env.fsck_clean(true);
        d.victim_ok();
    }
}

/// A ref overwritten with garbage, emptied, or pointing at a manifest that
/// does not exist: fsck names the ref; the victim fails naming it; the other
/// name still restores; `ferry rm` of the broken name works (as the message
/// says) and leaves a clean store.
#[test]
fn corrupt_ref() {
    let damages: [(&str, &[u8]); 3] = [
        ("garbage", b"not a manifest id\n"),
        ("zero-length", b""),
        (
            "dangling",
            b"0000000000000000000000000000000000000000000000000000000000000000\n",
        ),
    ];
    for (what, value) in damages {
        let d = Damaged::new();
        fs::write(&d.reff, value).unwrap();
        let reff = d.reff.to_str().unwrap();
        if what == "dangling" {
            d.fsck_finds(&[], &["main/victim", "not found"]);
            d.victim_fails(&["not found"]);
        } else {
            d.fsck_finds(&[], &[reff, "corrupt"]);
            d.victim_fails(&["main/victim", reff, "corrupt"]);
            // The other names are still listed, measured and checked.
            assert!(d.env.names().contains(&"main/other".to_string()), "{what}");
            d.env.ferry(&["du"]).ok();
            let out = d.env.ferry(&["--json", "fsck"]);
            out.expect_code(1);
            let report = out.json();
            assert!(report["names"].as_u64() >= Some(1), "{what}: {report}");
        }
        d.other_ok();
        let out = d.env.ferry(&["rm", "main/victim"]);
        out.ok();
        assert!(!d.reff.exists(), "{what}");
        d.env.fsck_clean(true);
        d.env.stash_stdin("main/victim", &d.victim);
        d.victim_ok();
    }
}

/// Leftovers that are not damage: temporary files of killed commands,
/// stray files an operator dropped among ferry's, empty directories. fsck
/// stays clean, every name restores, and gc removes old temporary files
/// (not young ones, which a running command may own).
#[test]
fn stray_and_temporary_files_are_not_damage() {
    let d = Damaged::new();
    let s = &d.env.store;
    let old_tmp = s.join("tmp/123-4-5.tmp");
    let young_tmp = s.join("tmp/123-4-6.tmp");
    fs::write(&old_tmp, random_bytes(303, 100_000)).unwrap();
    fs::write(&young_tmp, b"being written").unwrap();
    set_mtime(&old_tmp, (now_secs() - 3 * 3600) as i64);
    let pack_dir = d.pack.parent().unwrap();
    for (path, bytes) in [
        (pack_dir.join("notes.txt"), &b"operator notes"[..]),
        (pack_dir.join("x.pack"), b"a pack with an invalid name"),
        (s.join("index/README"), b"stray"),
        (s.join("index/.idx"), b""),
        (s.join("refs/main/victim.ref.orig"), b"backup"),
        (s.join("leases/notes.txt"), b""),
        (s.join("condemned/stray"), b""),
    ] {
        fs::write(path, bytes).unwrap();
    }
    fs::create_dir_all(s.join("packs/zz")).unwrap();
    fs::create_dir_all(s.join("manifests/zz")).unwrap();
    fs::create_dir_all(s.join("refs/empty/dir")).unwrap();

    d.env.fsck_clean(true);
    assert_eq!(d.env.names(), ["main/other", "main/victim"]);
    d.victim_ok();
    d.other_ok();
    d.env.ferry(&["gc", "--grace", "0s"]).ok();
    assert!(!old_tmp.exists(), "gc removes an old temporary file");
    assert!(young_tmp.exists(), "gc keeps a young temporary file");
    d.env.fsck_clean(true);
    d.victim_ok();
}

/// A zero-length lease (a crash of the disk, not of ferry: leases are
/// written whole and renamed) must not block gc forever: once it has not
/// been refreshed for longer than a live lease would be, gc treats it as
/// stale, removes it and deletes condemned data (and old temporary files).
#[test]
fn unreadable_lease_does_not_block_gc_forever() {
    let d = Damaged::new();
    let lease = d.env.store.join("leases/18f0000000-0123456789abcdef.lease");
    fs::write(&lease, b"").unwrap();
    set_mtime(&lease, (now_secs() - 3600) as i64);
    let old_tmp = d.env.store.join("tmp/99-1-1.tmp");
    fs::write(&old_tmp, b"x").unwrap();
    set_mtime(&old_tmp, (now_secs() - 3 * 3600) as i64);
    d.env.ferry(&["rm", "main/victim"]).ok();
    for _ in 0..2 {
        d.env.ferry(&["gc", "--grace", "0s"]).ok();
    }
    assert!(!d.pack.exists(), "the dead pack was deleted");
    assert!(!lease.exists(), "the stale lease was removed");
    assert!(!old_tmp.exists(), "the old temporary file was removed");
    d.env.fsck_clean(true);
    d.other_ok();
}

/// A fresh unreadable lease still counts as a running command: gc keeps
/// condemned data while it lasts (the careful reading).
#[test]
fn fresh_unreadable_lease_still_blocks_deletion() {
    let d = Damaged::new();
    let lease = d.env.store.join("leases/18f0000000-0123456789abcdef.lease");
    fs::write(&lease, b"{ not json").unwrap();
    d.env.ferry(&["rm", "main/victim"]).ok();
    for _ in 0..2 {
        d.env.ferry(&["gc", "--grace", "0s"]).ok();
    }
    assert!(d.pack.exists(), "deleted while a lease might be live");
    fs::remove_file(&lease).unwrap();
    d.env.ferry(&["gc", "--grace", "0s"]).ok();
    assert!(!d.pack.exists());
    d.env.fsck_clean(true);
}

/// A zero-length condemned mark on a live pack: gc neither trusts it to
/// delete the pack nor fails; the mark is dropped and the data stays.
#[test]
fn zero_length_condemned_mark_on_a_live_pack() {
    let d = Damaged::new();
    let mark = d
        .env
        .store
        .join("condemned")
        .join(format!("pack-{}.condemned", d.pack_id()));
    fs::write(&mark, b"").unwrap();
    d.env.fsck_clean(false);
    for _ in 0..2 {
        d.env.ferry(&["gc", "--grace", "0s"]).ok();
    }
    assert!(d.pack.exists());
    assert!(!mark.exists(), "the bogus mark on a live pack was dropped");
    d.victim_ok();
    d.env.fsck_clean(true);
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A store whose disk is full to the last byte: reading and checking are
/// what one does before freeing space, so `unstash` and `fsck` still work
/// (they cannot write a lease there); a stash fails saying the disk is full.
#[test]
fn a_store_on_a_completely_full_disk_still_unstashes_and_checks() {
    let mut env = Env::new();
    let Some(mount) = Mount::tmpfs(&env.path("small"), "size=16m") else {
        eprintln!("skipping a_store_on_a_completely_full_disk_still_unstashes_and_checks: cannot mount a tmpfs");
        return;
    };
    env.store = mount.dir.join("store");
    let data = mixed_bytes(220, 4 << 20);
    env.stash_stdin("main/app", &data);
    // Fill what is left, to the last block.
    let filler = mount.dir.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let block = vec![0x5a; 64 << 10];
    loop {
        match std::io::Write::write(&mut f, &block) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    loop {
        match std::io::Write::write(&mut f, &block[..512]) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    drop(f);
    // Nothing more fits: even a one-byte file fails.
    assert!(
        fs::write(mount.dir.join("probe"), b"x").is_err() || {
            let _ = fs::remove_file(mount.dir.join("probe"));
            false
        }
    );

    assert!(
        env.unstash_stdout("main/app") == data,
        "unstash on a full disk"
    );
    let out_file = env.path("app.bin");
    env.ferry(&["unstash", "main/app", out_file.to_str().unwrap()])
        .ok();
    assert!(fs::read(&out_file).unwrap() == data);
    env.fsck_clean(true);
    says_disk_full(&env.ferry_in(&["stash", "main/other", "-"], &mixed_bytes(221, 1 << 20)));

    fs::remove_file(&filler).unwrap();
    env.stash_stdin("main/other", &mixed_bytes(221, 1 << 20));
    env.fsck_clean(true);
}
