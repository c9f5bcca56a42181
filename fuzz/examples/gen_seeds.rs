//! Writes the checked-in seed corpus, `fuzz/corpus/<target>/`, with the
//! real encoders: tars and image archives built with the `tar` crate and
//! `store::dirtar`, manifests, packs and `.idx` files written by `store`,
//! frames encoded by `transfer::proto`.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds [-- OUT_DIR]
//! ```
//!
//! Output is deterministic; rerun it when a format changes.

use ferry_fuzz::{delta_base, sample_manifest};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use store::compress::{self, Codec};
use store::gc::{GcReport, Policy, RemovedName};
use store::image::{ImageInfo, ImageKind, LayerInfo};
use store::manifest::StashKind;
use store::pack::PackBuilder;
use store::repo::StoredChunk;
use store::{ChunkId, ManifestId};
use transfer::proto::{self, ErrorKind, GcRequest, Limits, ListEntry, Message};

struct Out(PathBuf);

impl Out {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.0.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

// ------------------------------------------------------------------ tars

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn text(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| b"ferry moves images "[(i + seed as usize) % 19])
        .collect()
}

fn sha(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// A tar with a pax long name, a GNU long name, a directory, a symlink.
fn varied_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let long = format!("dir/{}/file.txt", "x".repeat(120));
    let data = text(700, 1);
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, &long, &data[..]).unwrap();
    b.append_pax_extensions([("path", long.as_bytes()), ("mtime", b"1.5".as_slice())])
        .unwrap();
    let mut h = header(tar::EntryType::Regular, 5, 0o600);
    b.append_data(&mut h, "pax-named", &b"hello"[..]).unwrap();
    let mut h = header(tar::EntryType::Directory, 0, 0o755);
    b.append_data(&mut h, "dir/", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, "dir/link", "../pax-named").unwrap();
    b.into_inner().unwrap()
}

/// A GNU sparse file: one data block at an offset, a hole before it.
fn sparse_tar(hole: u64) -> Vec<u8> {
    let data = text(512, 3);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_size(512);
    h.set_path("sparse.bin").unwrap();
    {
        let gnu = h.as_gnu_mut().unwrap();
        octal(&mut gnu.sparse[0].offset, hole);
        octal(&mut gnu.sparse[0].numbytes, 512);
        octal(&mut gnu.realsize, hole + 512);
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&data);
    out.extend_from_slice(&[0; 1024]);
    out
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}", v, width = field.len() - 1);
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
}

/// A tar entry whose header is built by hand (for names the tar crate refuses).
fn raw_entry(name: &[u8], kind: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Sets the mtime of `path` itself (a symlink is not followed).
fn set_mtime(path: &Path, secs: i64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    // SAFETY: `c` is NUL-terminated and outlives the call; `times` holds
    // the two timespecs utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

fn end(mut v: Vec<u8>) -> Vec<u8> {
    v.extend_from_slice(&[0; 1024]);
    v
}

// ---------------------------------------------------------- image archives

/// `docker save` (legacy layout, or Docker 25+ when `oci`).
fn docker_archive(oci: bool, truncate: bool) -> Vec<u8> {
    let layer1 = tar_of(&[
        ("etc/os-release", b"NAME=fuzz\n"),
        ("bin/sh", &text(600, 2)),
    ]);
    let layer2 = tar_of(&[("app/main", &text(300, 5))]);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{}","sha256:{}"]}}}}"#,
        sha(&layer1),
        sha(&layer2)
    );
    let cfg = sha(config.as_bytes());
    let (cfg_path, l1, l2) = if oci {
        (
            format!("blobs/sha256/{cfg}"),
            format!("blobs/sha256/{}", sha(&layer1)),
            format!("blobs/sha256/{}", sha(&layer2)),
        )
    } else {
        (
            format!("{cfg}.json"),
            "aaaa/layer.tar".to_string(),
            "bbbb/layer.tar".to_string(),
        )
    };
    let manifest = format!(
        r#"[{{"Config":"{cfg_path}","RepoTags":["fuzz/app:1"],"Layers":["{l1}","{l2}"]}}]"#
    );
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (cfg_path, config.into_bytes()),
        (l1, layer1),
        (l2, layer2),
        ("manifest.json".into(), manifest.into_bytes()),
    ];
    if oci {
        files.push((
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ));
        files.push((
            "index.json".into(),
            br#"{"schemaVersion":2,"manifests":[]}"#.to_vec(),
        ));
    } else {
        files.push((
            "repositories".into(),
            br#"{"fuzz/app":{"1":"bbbb"}}"#.to_vec(),
        ));
    }
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    let mut t = tar_of(&refs);
    if truncate {
        // Cut inside the last layer's data, keeping manifest.json: put the
        // manifest first instead.
        let mut refs = refs.clone();
        refs.rotate_right(2);
        t = tar_of(&refs);
        t.truncate(t.len() - 1700);
    }
    t
}

/// A tar of an OCI image layout.
fn oci_layout() -> Vec<u8> {
    let layer = tar_of(&[("hello.txt", b"hello from a layer\n")]);
    let config = format!(
        r#"{{"rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}}}}"#,
        sha(&layer)
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{}","size":{}}}]}}"#,
        sha(config.as_bytes()),
        config.len(),
        sha(&layer),
        layer.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"fuzz:latest"}}}}]}}"#,
        sha(manifest.as_bytes()),
        manifest.len()
    );
    let files: Vec<(String, Vec<u8>)> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), index.into_bytes()),
        (
            format!("blobs/sha256/{}", sha(manifest.as_bytes())),
            manifest.into_bytes(),
        ),
        (
            format!("blobs/sha256/{}", sha(config.as_bytes())),
            config.into_bytes(),
        ),
        (format!("blobs/sha256/{}", sha(&layer)), layer),
    ];
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    tar_of(&refs)
}

// ------------------------------------------------------------ packs, idx

/// A real pack (raw and zstd chunks) and its `.idx`.
fn pack() -> (Vec<u8>, Vec<u8>) {
    let mut b = PackBuilder::new(1 << 20);
    let mut pack = PackBuilder::header().to_vec();
    let chunks: Vec<Vec<u8>> = vec![
        text(900, 1),
        (0..300u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
        text(1500, 7),
        b"tiny".to_vec(),
    ];
    let mut stored = Vec::new();
    for c in &chunks {
        let codec = compress::compress(c, compress::DEFAULT_LEVEL, &mut stored);
        assert!(codec == Codec::Raw || stored.len() < c.len());
        let added = b
            .add(ChunkId::of(c), codec, c.len() as u32, stored.len() as u64)
            .unwrap();
        if let store::pack::Added::New(_) = added {
            pack.extend_from_slice(&stored);
        }
    }
    let finished = b.finish([7; 16]);
    pack.extend_from_slice(&finished.footer);
    assert_eq!(store::pack::read_pack_index(&pack).unwrap(), finished.index);
    (pack, finished.idx)
}

// -------------------------------------------------------------- protocol

fn stored_chunk(data: &[u8]) -> StoredChunk {
    let mut bytes = Vec::new();
    let codec = compress::compress(data, compress::DEFAULT_LEVEL, &mut bytes);
    StoredChunk {
        id: ChunkId::of(data),
        codec,
        raw_len: data.len() as u32,
        bytes: bytes.into(),
    }
}

fn messages() -> Vec<(&'static str, Message)> {
    let ids = vec![ChunkId::of(b"a"), ChunkId::of(b"b")];
    let manifest = sample_manifest(3, 9).encode();
    let mid = ManifestId::of(&manifest);
    vec![
        (
            "hello",
            Message::Hello {
                version: proto::VERSION,
                token: "fuzz-token-0123456789".into(),
            },
        ),
        (
            "welcome",
            Message::Welcome {
                version: proto::VERSION,
                limits: Limits::default(),
                read: vec!["pub".into(), "team/a".into()],
                write: vec!["pub".into()],
            },
        ),
        ("error", Message::error(ErrorKind::Forbidden, "no")),
        (
            "missing",
            Message::Missing {
                name: "pub/app".into(),
                ids: ids.clone(),
            },
        ),
        ("missing_reply", Message::MissingReply { ids: ids.clone() }),
        (
            "put_chunks",
            Message::PutChunks {
                name: "pub/app".into(),
                chunks: vec![stored_chunk(&text(2000, 1)), stored_chunk(b"raw bytes")],
            },
        ),
        (
            "put_reply",
            Message::PutReply {
                received: 2,
                new: 1,
            },
        ),
        (
            "commit",
            Message::Commit {
                name: "pub/app".into(),
                manifest: manifest.clone(),
            },
        ),
        ("commit_reply", Message::CommitReply { id: mid }),
        (
            "get_manifest",
            Message::GetManifest {
                name: "team/a/x".into(),
                have: vec![mid],
            },
        ),
        (
            "manifest",
            Message::Manifest {
                id: mid,
                bytes: manifest.clone(),
            },
        ),
        (
            "manifest_delta",
            Message::ManifestDelta {
                id: mid,
                base: ManifestId::of(b"base"),
                delta: vec![1, 2, 3],
            },
        ),
        ("get_chunks", Message::GetChunks { ids: ids.clone() }),
        (
            "chunks",
            Message::Chunks {
                chunks: vec![stored_chunk(b"chunk")],
                not_found: ids.clone(),
            },
        ),
        (
            "list",
            Message::List {
                prefix: "pub".into(),
            },
        ),
        (
            "listing",
            Message::Listing {
                entries: vec![
                    ListEntry {
                        name: "pub/app".into(),
                        manifest: mid,
                        created: 1_700_000_000,
                        header: Some(r#"{"kind":"tar","size":1}"#.into()),
                    },
                    ListEntry {
                        name: "pub/b".into(),
                        manifest: mid,
                        created: 1,
                        header: None,
                    },
                ],
            },
        ),
        (
            "remove",
            Message::Remove {
                names: vec!["pub/app".into(), "pub/b".into()],
                prefix: None,
            },
        ),
        (
            "remove_prefix",
            Message::Remove {
                names: vec![],
                prefix: Some("pub/".into()),
            },
        ),
        (
            "removed",
            Message::Removed {
                names: vec!["pub/app".into()],
                not_listed: 1,
            },
        ),
        (
            "gc",
            Message::Gc {
                request: GcRequest {
                    policies: vec![
                        Policy {
                            prefix: Some("pr/".into()),
                            keep_last: Some(3),
                            max_age: Some(Duration::from_secs(86_400)),
                        },
                        Policy {
                            prefix: None,
                            keep_last: None,
                            max_age: Some(Duration::from_secs(60)),
                        },
                    ],
                    grace: Duration::from_secs(3600),
                    repack_below_ppm: 500_000,
                    dry_run: true,
                },
            },
        ),
        (
            "gc_reply",
            Message::GcReply {
                report: GcReport {
                    dry_run: false,
                    names_removed: vec![RemovedName {
                        name: "pr/1/x".into(),
                        reason: "keep-last 3".into(),
                    }],
                    names_kept: 4,
                    live_chunks: 100,
                    packs_deleted: 1,
                    bytes_freed: 1 << 20,
                    ..GcReport::default()
                },
                names_not_listed: 0,
            },
        ),
    ]
}

// ------------------------------------------------------------------ main

fn main() {
    let out = Out(std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")));

    // tar_split_roundtrip: [piece count, piece sizes..., input]
    let t = "tar_split_roundtrip";
    let docker = docker_archive(false, false);
    out.put(
        t,
        "plain.tar",
        &with_mode(0, &tar_of(&[("a", b"hello"), ("b/c", &text(1200, 4))])),
    );
    out.put(t, "varied.tar", &with_mode(0, &varied_tar()));
    out.put(t, "sparse.tar", &with_mode(0, &sparse_tar(4096)));
    out.put(
        t,
        "docker-pieces.tar",
        &[&[3u8, 10, 200, 0xf1][..], &docker].concat(),
    );
    out.put(t, "not-a-tar", &with_mode(0, &text(1000, 0)));
    let mut truncated = tar_of(&[("big", &text(3000, 9))]);
    truncated.truncate(1500);
    out.put(t, "truncated.tar", &with_mode(0, &truncated));

    // docker_archive: the archive itself.
    let t = "docker_archive";
    out.put(t, "docker-legacy.tar", &docker);
    out.put(t, "docker-oci.tar", &docker_archive(true, false));
    out.put(t, "docker-truncated.tar", &docker_archive(false, true));
    out.put(t, "oci-layout.tar", &oci_layout());

    // manifest_decode: [mode, ...]
    let t = "manifest_decode";
    let small = sample_manifest(3, 2);
    out.put(t, "stored", &with_mode(0, &small.encode()));
    let raw = zstd::bulk::decompress(&small.encode(), 1 << 20).unwrap();
    out.put(t, "raw", &with_mode(1, &raw));
    let mut image = sample_manifest(2, 3);
    image.header.kind = StashKind::DockerArchive;
    image.header.image = Some(ImageInfo {
        kind: ImageKind::DockerArchive,
        tags: vec!["fuzz/app:1".into()],
        config_digest: Some(format!("sha256:{}", "c".repeat(64))),
        layers: vec![LayerInfo {
            path: "aaaa/layer.tar".into(),
            diff_id: Some(format!("sha256:{}", "d".repeat(64))),
            size: 2048,
            offset: 1536,
        }],
    });
    let raw = zstd::bulk::decompress(&image.encode(), 1 << 20).unwrap();
    out.put(t, "raw-image", &with_mode(1, &raw));
    let base = delta_base();
    let mut next = sample_manifest(24, 1);
    next.content[5].id = ChunkId::of(b"changed");
    let target = next.encode();
    let delta = transfer::delta::make(&base, &target).expect("a delta");
    let id = ManifestId::of(&target);
    out.put(t, "delta", &with_mode(2, &[&id.0[..], &delta].concat()));

    // index_decode and pack_read: [mode, ...]
    let (pack, idx) = pack();
    out.put("index_decode", "idx", &with_mode(0, &idx));
    out.put("index_decode", "idx-fixup", &with_mode(1, &idx));
    out.put("pack_read", "pack", &with_mode(0, &pack));
    out.put("pack_read", "pack-fixup", &with_mode(1, &pack));

    // proto_decode: [mode, ...]
    let t = "proto_decode";
    let msgs = messages();
    let mut stream = Vec::new();
    for (name, msg) in &msgs {
        let frame = proto::encode(msg);
        out.put(
            t,
            &format!("payload-{name}"),
            &with_mode(0, &frame[proto::HEADER_LEN..]),
        );
        stream.extend_from_slice(&frame);
    }
    let mut framed = vec![1, 3, 5, 255, 17];
    framed.extend_from_slice(&stream[..stream.len().min(3000)]);
    out.put(t, "stream", &framed);
    let mut sess = vec![2];
    for (name, msg) in &msgs {
        if *name != "welcome" {
            sess.extend_from_slice(&proto::encode(msg));
        }
    }
    out.put(t, "session", &sess);

    // name_parse: the text.
    let t = "name_parse";
    for (i, n) in [
        "main/ci_gpu",
        "pr/1234/ci_gpu",
        "build/5678/tvm_lib@v1:x=y+z",
        "a/../b",
        "/abs",
        ".hidden/x",
        "x.ref",
        "tab\there",
        "ünïcode",
    ]
    .iter()
    .enumerate()
    {
        out.put(t, &format!("name-{i}"), n.as_bytes());
    }

    // dir_restore: tar streams.
    let t = "dir_restore";
    let tree = std::env::temp_dir().join(format!("ferry-gen-seeds-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("d/e")).unwrap();
    fs::write(tree.join("d/e/f.txt"), text(700, 1)).unwrap();
    fs::write(tree.join("top"), b"top").unwrap();
    std::os::unix::fs::symlink("d/e/f.txt", tree.join("link")).unwrap();
    // Fixed mtimes, deepest first, so that the seed is the same every time.
    for p in ["d/e/f.txt", "d/e", "d", "top", "link", ""] {
        set_mtime(&tree.join(p), 1_700_000_000);
    }
    let mut own = Vec::new();
    store::dirtar::write_dir_tar(&tree, &mut own).unwrap();
    fs::remove_dir_all(&tree).unwrap();
    out.put(t, "own.tar", &own);
    out.put(
        t,
        "dotdot.tar",
        &end(raw_entry(b"../escape", b'0', b"", b"x")),
    );
    out.put(
        t,
        "absolute.tar",
        &end(raw_entry(
            b"/tmp/ferry-fuzz-restore/outside/x",
            b'0',
            b"",
            b"x",
        )),
    );
    out.put(
        t,
        "symlink-then-write.tar",
        &end([
            raw_entry(b"up", b'2', b"../outside", b""),
            raw_entry(b"up/x", b'0', b"", b"x"),
        ]
        .concat()),
    );
    out.put(
        t,
        "abs-symlink-then-write.tar",
        &end([
            raw_entry(b"abs", b'2', b"/tmp/ferry-fuzz-restore/outside", b""),
            raw_entry(b"abs/keep", b'0', b"", b"x"),
        ]
        .concat()),
    );
    out.put(
        t,
        "hardlink.tar",
        &end(raw_entry(b"h", b'1', b"../file", b"")),
    );
    out.put(t, "sparse.tar", &sparse_tar(4096));
    out.put(t, "varied.tar", &varied_tar());
}
