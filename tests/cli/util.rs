//! Shared helpers: a fresh store per test, a runner for the real binary,
//! deterministic test data, docker/OCI archive builders and tree comparison.

#![allow(dead_code)] // not every test module uses every helper

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// `ferry serve` as a child process on 127.0.0.1 (an ephemeral port), its
/// files in one directory; killed when dropped.
pub struct Serve {
    child: Child,
    /// `quic://127.0.0.1:PORT`.
    pub remote: String,
    /// Its certificate, for `--server-cert`.
    pub cert: PathBuf,
    /// Its store.
    pub store: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Its log (stderr) so far, line by line.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Serve {
    /// Sends it a signal (`kill -s SIGNAL`, e.g. `HUP`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} failed");
    }

    /// Waits (up to `secs`) until the log has `n` lines containing
    /// `needle`; returns the last of them.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, n: usize, secs: u64) -> String {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            {
                let log = self.log.lock().unwrap();
                let found: Vec<&String> = log.iter().filter(|l| l.contains(needle)).collect();
                if found.len() >= n {
                    return found[n - 1].clone();
                }
                if Instant::now() > until {
                    panic!(
                        "no {n} log lines with {needle:?} within {secs} s:\n{}",
                        log.join("\n")
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a new token to `file`; returns its SHA-256 for a server's config.
pub fn new_token(file: &Path) -> String {
    let out = run(
        Command::new(FERRY)
            .args(["--json", "serve", "--new-token"])
            .arg(file),
        None,
    );
    out.ok();
    out.json()["sha256"].as_str().unwrap().to_owned()
}

/// Starts `ferry serve` with its store, certificate and config in `root`
/// and `tokens_toml` (its `[[token]]` entries) in the config; returns once
/// it listens.
pub fn serve(root: &Path, tokens_toml: &str) -> Serve {
    let store = root.join("server-store");
    let cert = root.join("cert.pem");
    let config = root.join("server.toml");
    fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstore = {:?}\ncert = {:?}\nkey = {:?}\n\n{tokens_toml}",
            store,
            cert,
            root.join("key.pem")
        ),
    )
    .unwrap();
    let mut child = Command::new(FERRY)
        .args(["serve", "--config"])
        .arg(&config)
        // Tests that look at the page cache expect the default.
        .env_remove("FERRY_DIRECT_IO")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut remote = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("ferry serve: listening on ") {
            remote = Some(addr.trim().to_owned());
            break;
        }
    }
    let remote = remote.expect("ferry serve did not start");
    // Keep reading the log (so the server never blocks on a full pipe),
    // for tests that look at it.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            kept.lock().unwrap().push(line);
        }
    });
    Serve {
        child,
        remote,
        cert,
        store,
        config,
        log,
    }
}

/// What one run of `ferry` produced.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Out {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Whether stdout or stderr contains `text`.
    pub fn stdout_contains(&self, text: &str) -> bool {
        self.out().contains(text) || self.stderr.contains(text)
    }

    /// Stdout as text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics with both streams unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "expected exit {code}, got {:?}\nstdout: {}\nstderr: {}",
            self.code(),
            truncate(&self.out()),
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn ok(&self) -> &Self {
        self.expect_code(0)
    }

    /// Stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.out(),
                self.stderr
            )
        })
    }
}

fn truncate(s: &str) -> String {
    if s.len() > 2000 {
        format!("{}… ({} bytes)", &s[..2000], s.len())
    } else {
        s.to_owned()
    }
}

/// A test's own temporary directory with a store inside it.
#[derive(Clone)]
pub struct Env {
    /// Shared so that threads of one test can run ferry on the same store.
    pub dir: std::sync::Arc<tempfile::TempDir>,
    pub store: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("ferry-cli-test")
            .tempdir()
            .unwrap();
        let store = dir.path().join("store");
        Env {
            dir: std::sync::Arc::new(dir),
            store,
        }
    }

    /// A path inside the test's directory (not inside the store).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `ferry --store <store>` with no further arguments, ready to spawn.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(FERRY);
        c.arg("--store").arg(&self.store);
        c.env_remove("FERRY_STORE");
        // Tests that look at the page cache expect the default.
        c.env_remove("FERRY_DIRECT_IO");
        c.current_dir(self.dir.path());
        c
    }

    /// Run `ferry --store <store> args…` with empty stdin.
    pub fn ferry<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        run(self.cmd().args(args), None)
    }

    /// Run `ferry --store <store> args…` feeding `input` on stdin.
    pub fn ferry_in<S: AsRef<OsStr>>(&self, args: &[S], input: &[u8]) -> Out {
        run(self.cmd().args(args), Some(input))
    }

    /// Stash `data` from stdin under `name` (asserting success); the `--json` report.
    #[track_caller]
    pub fn stash_stdin(&self, name: &str, data: &[u8]) -> Value {
        let out = self.ferry_in(&["--json", "stash", name, "-"], data);
        out.ok();
        out.json()
    }

    /// Stash the file or directory at `path` under `name`; the `--json` report.
    #[track_caller]
    pub fn stash_path(&self, name: &str, path: &Path) -> Value {
        let out = self.ferry(&[
            OsStr::new("--json"),
            OsStr::new("stash"),
            OsStr::new(name),
            path.as_os_str(),
        ]);
        out.ok();
        out.json()
    }

    /// `ferry unstash name -`, asserting success; the bytes.
    #[track_caller]
    pub fn unstash_stdout(&self, name: &str) -> Vec<u8> {
        let out = self.ferry(&["unstash", name, "-"]);
        out.ok();
        out.stdout
    }

    /// `ferry --json inspect name`, asserting success.
    #[track_caller]
    pub fn inspect(&self, name: &str) -> Value {
        let out = self.ferry(&["--json", "inspect", name]);
        out.ok();
        out.json()
    }

    /// The names `ferry --json ls` lists.
    #[track_caller]
    pub fn names(&self) -> Vec<String> {
        let out = self.ferry(&["--json", "ls"]);
        out.ok();
        out.json()
            .as_array()
            .expect("ls --json is an array")
            .iter()
            .map(|e| e["name"].as_str().expect("name").to_owned())
            .collect()
    }

    /// `ferry fsck [--full]` must exit 0 and report no problems.
    #[track_caller]
    pub fn fsck_clean(&self, full: bool) {
        let mut args = vec!["--json", "fsck"];
        if full {
            args.push("--full");
        }
        let out = self.ferry(&args);
        out.ok();
        let report = out.json();
        assert_eq!(
            report["problems"],
            json!([]),
            "fsck found problems: {report}"
        );
    }

    /// Every `.pack` file in the store.
    pub fn packs(&self) -> Vec<PathBuf> {
        packs_in(&self.store)
    }
}

/// Every `.pack` file in the store at `store`, sorted.
pub fn packs_in(store: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    walk_files(&store.join("packs"), &mut |p| {
        if p.extension() == Some(OsStr::new("pack")) {
            v.push(p.to_path_buf());
        }
    });
    v.sort();
    v
}

/// Calls `f` with every file below `dir`, recursively (none if `dir` is
/// missing).
fn walk_files(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk_files(&p, f);
        } else {
            f(&p);
        }
    }
}

/// How long one `ferry` run may take before the test calls it hung.
const TIMEOUT: Duration = Duration::from_secs(180);

/// Run a prepared command to completion; stdin is fed and stdout/stderr are
/// drained from threads so a large output cannot deadlock it. A run that
/// takes longer than [`TIMEOUT`] is killed and fails the test.
pub fn run(cmd: &mut Command, input: Option<&[u8]>) -> Out {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ferry");
    let started = Instant::now();
    std::thread::scope(|s| {
        if let Some(input) = input {
            let mut stdin = child.stdin.take().unwrap();
            s.spawn(move || {
                // ferry may exit early (an error): a broken pipe is fine here.
                let _ = stdin.write_all(input);
            });
        }
        let mut out_pipe = child.stdout.take().unwrap();
        let mut err_pipe = child.stderr.take().unwrap();
        let stdout = s.spawn(move || {
            let mut v = Vec::new();
            out_pipe.read_to_end(&mut v).unwrap();
            v
        });
        let stderr = s.spawn(move || {
            let mut v = Vec::new();
            err_pipe.read_to_end(&mut v).unwrap();
            v
        });
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for ferry") {
                break status;
            }
            if started.elapsed() > TIMEOUT {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("ferry hung for {TIMEOUT:?}: {cmd:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        Out {
            status,
            stdout: stdout.join().unwrap(),
            stderr: String::from_utf8_lossy(&stderr.join().unwrap()).into_owned(),
        }
    })
}

/// Assert two byte strings are equal without dumping megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: bytes differ: got {} bytes, want {} bytes, first difference at offset {first}",
            got.len(),
            want.len()
        );
    }
}

/// Whether `text` contains a 64-hex-digit id; returns the ids found.
pub fn hex_ids(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut ids = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_hexdigit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_hexdigit() {
                i += 1;
            }
            if i - start == 64 {
                ids.push(text[start..i].to_ascii_lowercase());
            }
        } else {
            i += 1;
        }
    }
    ids
}

// ---------------------------------------------------------------------------
// Test data

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `len` random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng(seed).fill_bytes(&mut v);
    v
}

/// `len` bytes mixing random blocks, repeats of earlier blocks and
/// compressible text, so that chunking, dedup and compression all have
/// something to do.
pub fn mixed_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rng(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let block = r.random_range(4096..200_000usize).min(len - v.len());
        match r.random_range(0..4) {
            0 if v.len() > block => {
                let start = r.random_range(0..v.len() - block);
                let copy = v[start..start + block].to_vec();
                v.extend_from_slice(&copy);
            }
            1 => {
                let word = format!("line {} of some compressible text\n", r.random::<u16>());
                let text: Vec<u8> = word.bytes().cycle().take(block).collect();
                v.extend_from_slice(&text);
            }
            _ => {
                let start = v.len();
                v.resize(start + block, 0);
                r.fill_bytes(&mut v[start..]);
            }
        }
    }
    v.truncate(len);
    v
}

pub fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Tar and image archives

/// One regular file inside a layer.
#[derive(Clone)]
pub struct LayerFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Files for a layer: `count` files of mixed sizes, deterministic from `seed`.
pub fn layer_files(seed: u64, count: usize, max_size: usize) -> Vec<LayerFile> {
    let mut r = rng(seed);
    (0..count)
        .map(|i| {
            let size = match i % 4 {
                0 => r.random_range(0..2_000),
                1 => r.random_range(2_000..40_000),
                _ => r.random_range(40_000..max_size.max(40_001)),
            };
            LayerFile {
                path: format!("usr/lib/layer{seed}/dir{}/file{i}.bin", i % 3),
                data: if i % 2 == 0 {
                    random_bytes(seed * 1000 + i as u64, size)
                } else {
                    mixed_bytes(seed * 1000 + i as u64, size)
                },
                mode: if i % 5 == 0 { 0o755 } else { 0o644 },
            }
        })
        .collect()
}

/// A tar of `files` (with their parent directories), every entry with `mtime`.
pub fn layer_tar(files: &[LayerFile], mtime: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let mut p = Path::new(&f.path).parent();
        let mut chain = Vec::new();
        while let Some(d) = p {
            if d.as_os_str().is_empty() {
                break;
            }
            chain.push(d.to_path_buf());
            p = d.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.insert(d.clone()) {
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_mtime(mtime);
                h.set_size(0);
                b.append_data(&mut h, format!("{}/", d.display()), &[][..])
                    .unwrap();
            }
        }
        let mut h = tar::Header::new_ustar();
        h.set_mode(f.mode);
        h.set_mtime(mtime);
        h.set_size(f.data.len() as u64);
        b.append_data(&mut h, &f.path, &f.data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// Build a tar of (path, bytes) entries; directories are entries ending in `/`.
pub fn tar_of(entries: &[(String, Vec<u8>)], mtime: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_ustar();
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
        } else {
            h.set_mode(0o644);
        }
        h.set_mtime(mtime);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// Which layout [`image_archive`] produces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    /// `docker save` before Docker 25.
    DockerLegacy,
    /// `docker save` from Docker 25 on.
    DockerOci,
    /// A tar of an OCI image layout.
    OciTar,
}

/// A generated image archive and what `ferry inspect` should report.
pub struct Image {
    pub bytes: Vec<u8>,
    pub tags: Vec<String>,
    pub config_digest: String,
    /// Archive path and diff_id (`sha256:…`) of each layer, base first.
    pub layers: Vec<(String, String)>,
}

/// An image archive of `layers` in `layout`, every tar entry (outer and
/// inner) with `mtime`.
pub fn image_archive(layout: Layout, layers: &[Vec<LayerFile>], tag: &str, mtime: u64) -> Image {
    let tars: Vec<Vec<u8>> = layers.iter().map(|l| layer_tar(l, mtime)).collect();
    let diff_ids: Vec<String> = tars
        .iter()
        .map(|t| format!("sha256:{}", sha256_hex(t)))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": format!("2024-01-01T00:00:{:02}Z", mtime % 60),
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [],
    }))
    .unwrap();
    let config_hex = sha256_hex(&config);
    let config_digest = format!("sha256:{config_hex}");
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layer_paths = Vec::new();
    match layout {
        Layout::DockerLegacy => {
            for (i, t) in tars.iter().enumerate() {
                let id = sha256_hex(format!("layer-id-{i}-{}", diff_ids[i]).as_bytes());
                entries.push((format!("{id}/"), Vec::new()));
                entries.push((format!("{id}/VERSION"), b"1.0".to_vec()));
                entries.push((
                    format!("{id}/json"),
                    serde_json::to_vec(&json!({"id": id})).unwrap(),
                ));
                entries.push((format!("{id}/layer.tar"), t.clone()));
                layer_paths.push(format!("{id}/layer.tar"));
            }
            entries.push((format!("{config_hex}.json"), config.clone()));
            let manifest = json!([{
                "Config": format!("{config_hex}.json"),
                "RepoTags": [tag],
                "Layers": layer_paths,
            }]);
            entries.push((
                "manifest.json".into(),
                serde_json::to_vec(&manifest).unwrap(),
            ));
            let (repo, t) = tag.rsplit_once(':').unwrap();
            entries.push((
                "repositories".into(),
                serde_json::to_vec(&json!({ repo: { t: "x" } })).unwrap(),
            ));
        }
        Layout::DockerOci | Layout::OciTar => {
            entries.push(("blobs/".into(), Vec::new()));
            entries.push(("blobs/sha256/".into(), Vec::new()));
            let mut descs = Vec::new();
            for (i, t) in tars.iter().enumerate() {
                let hex = sha256_hex(t);
                entries.push((format!("blobs/sha256/{hex}"), t.clone()));
                layer_paths.push(format!("blobs/sha256/{hex}"));
                descs.push(json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": diff_ids[i],
                    "size": t.len(),
                }));
            }
            entries.push((format!("blobs/sha256/{config_hex}"), config.clone()));
            let manifest = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": config.len(),
                },
                "layers": descs,
            }))
            .unwrap();
            let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
            entries.push((
                format!("blobs/sha256/{}", sha256_hex(&manifest)),
                manifest.clone(),
            ));
            let (_, short_tag) = tag.rsplit_once(':').unwrap();
            let index = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": manifest.len(),
                    "annotations": {
                        "io.containerd.image.name": format!("docker.io/library/{tag}"),
                        "org.opencontainers.image.ref.name": if layout == Layout::OciTar { short_tag.to_owned() } else { tag.to_owned() },
                    },
                }],
            });
            entries.push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
            if layout == Layout::DockerOci {
                let manifest = json!([{
                    "Config": format!("blobs/sha256/{config_hex}"),
                    "RepoTags": [tag],
                    "Layers": layer_paths,
                }]);
                entries.push((
                    "manifest.json".into(),
                    serde_json::to_vec(&manifest).unwrap(),
                ));
            }
            entries.push((
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ));
        }
    }
    let tags = match layout {
        Layout::OciTar => vec![tag.rsplit_once(':').unwrap().1.to_owned()],
        _ => vec![tag.to_owned()],
    };
    Image {
        bytes: tar_of(&entries, mtime),
        tags,
        config_digest,
        layers: layer_paths.into_iter().zip(diff_ids).collect(),
    }
}

// ---------------------------------------------------------------------------
// Directory trees

/// What a tree holds at one relative path, for comparison.
#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32, mtime: i64 },
    File { mode: u32, mtime: i64, sha: String },
    Symlink { target: PathBuf, mtime: i64 },
}

/// Every path under `root` (relative, `root` itself excluded) and what it is.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut map = BTreeMap::new();
    fn go(root: &Path, dir: &Path, map: &mut BTreeMap<PathBuf, Node>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let m = fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let node = if m.file_type().is_symlink() {
                Node::Symlink {
                    target: fs::read_link(&p).unwrap(),
                    mtime: m.mtime(),
                }
            } else if m.is_dir() {
                go(root, &p, map);
                Node::Dir {
                    mode,
                    mtime: m.mtime(),
                }
            } else {
                Node::File {
                    mode,
                    mtime: m.mtime(),
                    sha: sha256_hex(&fs::read(&p).unwrap()),
                }
            };
            map.insert(rel, node);
        }
    }
    go(root, root, &mut map);
    map
}

/// Assert two trees hold the same paths with the same contents, modes,
/// symlink targets and mtimes (whole seconds).
#[track_caller]
pub fn assert_same_tree(got: &Path, want: &Path) {
    let g = snapshot(got);
    let w = snapshot(want);
    for (path, node) in &w {
        match g.get(path) {
            None => panic!("restored tree lacks {}", path.display()),
            Some(n) => assert_eq!(n, node, "{} differs", path.display()),
        }
    }
    for path in g.keys() {
        assert!(
            w.contains_key(path),
            "restored tree has extra {}",
            path.display()
        );
    }
}

pub use store::testutil::set_mtime;

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A mount on a directory, unmounted on drop. `None` (with a note on
/// stderr) when mounting is not permitted here.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// `mount -t tmpfs -o OPTIONS tmpfs DIR`.
    pub fn tmpfs(dir: &Path, options: &str) -> Option<Mount> {
        Mount::new(dir, &["-t", "tmpfs", "-o", options, "tmpfs"])
    }

    /// A read-only bind mount of `src` on `dir`.
    pub fn bind_ro(src: &Path, dir: &Path) -> Option<Mount> {
        Mount::new(dir, &["-o", "bind,ro", src.to_str().unwrap()])
    }

    fn new(dir: &Path, args: &[&str]) -> Option<Mount> {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(args).arg(dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Mount {
                dir: dir.to_path_buf(),
            }),
            Ok(o) => {
                eprintln!(
                    "note: cannot mount ({}); skipping",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("note: cannot run mount ({e}); skipping");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}
