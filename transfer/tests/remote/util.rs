//! Shared helpers: a real server on 127.0.0.1, client stores in temporary
//! directories, tokens, deterministic data and archive builders.

#![allow(dead_code)] // not every test module uses every helper

use rand::{Rng, RngCore, SeedableRng};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::name::Name;
use store::repo::{NoProgress, Progress, Source, StashReport, Store, Target};
use transfer::auth::Token;
use transfer::client::{Options, Remote};
use transfer::config::{ServerConfig, TokenConfig};
use transfer::metrics::Metrics;
use transfer::server::{Server, ServerHandle};
use transfer::tls::Trust;

/// Reads and writes everything.
pub const MAIN: &str = "main-branch-token";
/// Reads `main` and `pr/1234`, writes `pr/1234`.
pub const PR: &str = "pull-request-1234-token";
/// Reads `main` only.
pub const READER: &str = "read-only-token";
/// The admin scope (remote gc), reads everything, writes nothing.
pub const ADMIN: &str = "operator-admin-token";

pub fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

/// Tokens of the test servers.
pub fn tokens() -> Vec<TokenConfig> {
    let t = |label: &str, secret: &str, read: &[&str], write: &[&str]| TokenConfig {
        name: label.into(),
        sha256: Token::new(secret).unwrap().hash().to_hex(),
        read: read.iter().map(|s| s.to_string()).collect(),
        write: write.iter().map(|s| s.to_string()).collect(),
        admin: false,
        max_connections: None,
    };
    vec![
        t("main", MAIN, &["*"], &["*"]),
        t("pr-1234", PR, &["main", "pr/1234"], &["pr/1234"]),
        t("reader", READER, &["main"], &[]),
        TokenConfig {
            admin: true,
            ..t("ops", ADMIN, &["*"], &[])
        },
    ]
}

/// A server config for `dir` (store, certificate) on `listen`.
pub fn config(dir: &Path, listen: SocketAddr) -> ServerConfig {
    let mut cfg = ServerConfig::new(
        listen,
        dir.join("server-store"),
        dir.join("tls/cert.pem"),
        dir.join("tls/key.pem"),
    );
    cfg.tokens = tokens();
    cfg.limits.request_deadline_secs = 30;
    cfg.limits.shutdown_grace_secs = 5;
    cfg
}

/// A server bound for `cfg`; binding is retried for a while (a restarted
/// server may wait for its predecessor's socket to close).
pub async fn bind_retrying(cfg: &ServerConfig) -> Server {
    let mut tries = 0;
    loop {
        match Server::bind(cfg).await {
            Ok(s) => return s,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("bind: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot start the server: {e}"),
        }
    }
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Option<SocketAddr>,
    pub store_dir: PathBuf,
    handle: ServerHandle,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A server on an ephemeral port with its store in `dir`.
    pub async fn start(dir: &Path) -> TestServer {
        Self::start_with(config(dir, "127.0.0.1:0".parse().unwrap())).await
    }

    /// A server from `cfg` (see [`bind_retrying`]).
    pub async fn start_with(cfg: ServerConfig) -> TestServer {
        let server = bind_retrying(&cfg).await;
        let addr = server.local_addr();
        let fingerprint = server.fingerprint().to_string();
        let metrics = server.metrics();
        let metrics_addr = server.metrics_addr();
        let handle = server.handle();
        let task = tokio::spawn(async move {
            server.run().await.unwrap();
        });
        TestServer {
            addr,
            fingerprint,
            metrics,
            metrics_addr,
            store_dir: cfg.store.clone(),
            handle,
            task,
        }
    }

    /// The handle (to stop it from elsewhere).
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// A remote for this server with `token` (empty: none), pinned to its certificate.
    pub fn remote(&self, token: &str) -> Remote {
        let token = (!token.is_empty()).then(|| Token::new(token).unwrap());
        Remote::new(
            &format!("quic://{}", self.addr),
            Trust::from_arg(&self.fingerprint).unwrap(),
            token,
        )
        .unwrap()
    }

    /// Graceful shutdown; waits until the server has stopped.
    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the server stops")
            .unwrap();
    }

    /// Waits for a server stopped through its handle.
    pub async fn join(self) {
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the server stops")
            .unwrap();
    }

    /// The server's store, opened afresh (to look at what it holds).
    pub fn open_store(&self) -> Store {
        Store::open(&self.store_dir).unwrap()
    }
}

/// Client options for tests: small batches (so that even small data takes
/// several requests), no retries unless a test asks.
pub fn opts() -> Options {
    Options {
        streams: 4,
        early_streams: 2,
        early_held_bytes: transfer::push::EARLY_HELD_BYTES,
        batch_bytes: 256 << 10,
        import_bytes: 1 << 20,
        read_ahead: 2 << 20,
        retries: 0,
        backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        busy_wait: Duration::ZERO,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        stop: Default::default(),
    }
}

/// A store of its own in `dir/label`.
pub fn client_store(dir: &Path, label: &str) -> Arc<Store> {
    Arc::new(Store::open(dir.join(label)).unwrap())
}

pub fn none() -> Arc<dyn Progress> {
    Arc::new(NoProgress)
}

/// Stashes bytes (off the async threads).
pub async fn stash_bytes(store: &Arc<Store>, n: &str, data: &[u8]) -> StashReport {
    let (s, n, d) = (store.clone(), name(n), data.to_vec());
    tokio::task::spawn_blocking(move || {
        s.stash(
            &n,
            Source::Reader(Box::new(std::io::Cursor::new(d))),
            &NoProgress,
        )
        .unwrap()
    })
    .await
    .unwrap()
}

/// Stashes a file or directory (off the async threads).
pub async fn stash_source(store: &Arc<Store>, n: &str, source: Source) -> StashReport {
    let (s, n) = (store.clone(), name(n));
    tokio::task::spawn_blocking(move || s.stash(&n, source, &NoProgress).unwrap())
        .await
        .unwrap()
}

/// The bytes a local stash replays.
pub async fn unstash_bytes(store: &Arc<Store>, n: &str) -> Vec<u8> {
    let (s, n) = (store.clone(), name(n));
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        s.open_stash(&n).unwrap().read_to_end(&mut out).unwrap();
        out
    })
    .await
    .unwrap()
}

/// Unstashes to a target (off the async threads).
pub async fn unstash_to(store: &Arc<Store>, n: &str, target: Target) {
    let (s, n) = (store.clone(), name(n));
    tokio::task::spawn_blocking(move || {
        s.unstash(&n, target, false, &NoProgress).unwrap();
    })
    .await
    .unwrap()
}

/// A collection that deletes what it may at once (no grace period).
pub fn collect_now() -> store::gc::GcOptions {
    store::gc::GcOptions {
        grace: Duration::ZERO,
        ..store::gc::GcOptions::default()
    }
}

/// Distinct chunk ids of a local stash.
pub fn chunk_ids(store: &Store, n: &str) -> Vec<store::ChunkId> {
    let (_, m) = store.manifest(&name(n)).unwrap();
    let mut seen = std::collections::HashSet::new();
    m.chunks()
        .map(|c| c.id)
        .filter(|id| seen.insert(*id))
        .collect()
}

/// `good` spoiled in the ways an upload must be refused for: a flipped
/// bit, `other`'s bytes under `good`'s id, bytes that are not zstd, and a
/// raw length one too long.
pub fn tampered(
    good: &store::repo::StoredChunk,
    other: &store::repo::StoredChunk,
) -> Vec<(&'static str, store::repo::StoredChunk)> {
    let mut flipped = good.clone();
    let mut bytes = flipped.bytes.to_vec();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    flipped.bytes = bytes.into();
    let mut swapped = other.clone();
    swapped.id = good.id;
    let mut bad_zstd = good.clone();
    bad_zstd.codec = store::compress::Codec::Zstd;
    bad_zstd.bytes = vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3].into();
    let mut longer = good.clone();
    longer.raw_len += 1;
    vec![
        ("a flipped bit", flipped),
        ("another chunk's bytes", swapped),
        ("bytes that are not zstd", bad_zstd),
        ("a wrong length", longer),
    ]
}

/// Progress that counts bytes and runs `hook` once `threshold` is passed.
pub struct Trip {
    pub done: AtomicU64,
    threshold: u64,
    fired: AtomicBool,
    hook: Box<dyn Fn() + Send + Sync>,
}

impl Trip {
    pub fn new(threshold: u64, hook: impl Fn() + Send + Sync + 'static) -> Arc<Trip> {
        Arc::new(Trip {
            done: AtomicU64::new(0),
            threshold,
            fired: AtomicBool::new(false),
            hook: Box::new(hook),
        })
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Progress for Trip {
    fn advance(&self, bytes: u64) {
        let total = self.done.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if total >= self.threshold && !self.fired.swap(true, Ordering::SeqCst) {
            (self.hook)();
        }
    }
}

/// Waits until `f` holds (polling), or panics after `secs`.
pub async fn wait_for(secs: u64, what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ------------------------------------------------------------------- data

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng(seed).fill_bytes(&mut v);
    v
}

/// Random blocks mixed with compressible text.
pub fn mixed_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rng(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let block = r.random_range(4096..150_000usize).min(len - v.len());
        if r.random_range(0..3) == 0 {
            let word = format!("line {} of text that compresses\n", r.random::<u16>());
            v.extend(word.bytes().cycle().take(block));
        } else {
            let start = v.len();
            v.resize(start + block, 0);
            r.fill_bytes(&mut v[start..]);
        }
    }
    v
}

/// A tar of (path, bytes); paths ending in `/` are directories.
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

/// Files of one layer.
pub fn layer(seed: u64, files: usize, max: usize) -> Vec<(String, Vec<u8>)> {
    let mut r = rng(seed);
    let mut out = vec![(format!("usr/lib/l{seed}/"), Vec::new())];
    for i in 0..files {
        let len = r.random_range(0..max);
        out.push((
            format!("usr/lib/l{seed}/f{i}"),
            mixed_bytes(seed * 100 + i as u64, len),
        ));
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    store::id::to_hex(&sha2::Sha256::digest(data))
}

/// Which image archive layout to build.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    DockerLegacy,
    DockerOci,
    OciTar,
}

/// An image archive of `layers` (each a list of files).
pub fn image(layout: Layout, layers: &[Vec<(String, Vec<u8>)>], mtime: u64) -> Vec<u8> {
    let tars: Vec<Vec<u8>> = layers.iter().map(|l| tar_of(l, mtime)).collect();
    let diff_ids: Vec<String> = tars
        .iter()
        .map(|t| format!("sha256:{}", sha256_hex(t)))
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_hex = sha256_hex(&config);
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut paths = Vec::new();
    match layout {
        Layout::DockerLegacy => {
            for (i, t) in tars.iter().enumerate() {
                let id = sha256_hex(format!("layer{i}{}", diff_ids[i]).as_bytes());
                entries.push((format!("{id}/"), Vec::new()));
                entries.push((format!("{id}/VERSION"), b"1.0".to_vec()));
                entries.push((
                    format!("{id}/json"),
                    format!("{{\"id\":\"{id}\"}}").into_bytes(),
                ));
                entries.push((format!("{id}/layer.tar"), t.clone()));
                paths.push(format!("{id}/layer.tar"));
            }
            entries.push((format!("{config_hex}.json"), config.clone()));
            let manifest = serde_json::json!([{
                "Config": format!("{config_hex}.json"),
                "RepoTags": ["ci:latest"],
                "Layers": paths,
            }]);
            entries.push((
                "manifest.json".into(),
                serde_json::to_vec(&manifest).unwrap(),
            ));
            entries.push(("repositories".into(), br#"{"ci":{"latest":"x"}}"#.to_vec()));
        }
        Layout::DockerOci | Layout::OciTar => {
            entries.push(("blobs/".into(), Vec::new()));
            entries.push(("blobs/sha256/".into(), Vec::new()));
            let mut descs = Vec::new();
            for (i, t) in tars.iter().enumerate() {
                let hex = sha256_hex(t);
                entries.push((format!("blobs/sha256/{hex}"), t.clone()));
                paths.push(format!("blobs/sha256/{hex}"));
                descs.push(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": diff_ids[i], "size": t.len(),
                }));
            }
            entries.push((format!("blobs/sha256/{config_hex}"), config.clone()));
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{config_hex}"), "size": config.len(),
                },
                "layers": descs,
            }))
            .unwrap();
            let mhex = sha256_hex(&manifest);
            entries.push((format!("blobs/sha256/{mhex}"), manifest.clone()));
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{mhex}"), "size": manifest.len(),
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }],
            });
            entries.push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
            if layout == Layout::DockerOci {
                let m = serde_json::json!([{
                    "Config": format!("blobs/sha256/{config_hex}"),
                    "RepoTags": ["ci:latest"],
                    "Layers": paths,
                }]);
                entries.push(("manifest.json".into(), serde_json::to_vec(&m).unwrap()));
            }
            entries.push((
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ));
        }
    }
    tar_of(&entries, mtime)
}

/// Writes a small directory tree with files, an empty directory and a symlink.
pub fn make_tree(root: &Path, seed: u64) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("a/one.bin"), random_bytes(seed, 300_000)).unwrap();
    std::fs::write(root.join("a/b/two.txt"), mixed_bytes(seed + 1, 200_000)).unwrap();
    std::fs::write(root.join("top"), b"hello").unwrap();
    std::fs::set_permissions(root.join("top"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a/one.bin", root.join("link")).unwrap();
}

/// Relative path → (kind, mode, content or link target) for every entry.
pub fn tree(root: &Path) -> Vec<(PathBuf, String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode() & 0o777;
            if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.push((
                    rel,
                    "link".into(),
                    0,
                    t.into_os_string().into_encoded_bytes(),
                ));
            } else if meta.is_dir() {
                out.push((rel, "dir".into(), mode, Vec::new()));
                stack.push(p);
            } else {
                out.push((rel, "file".into(), mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}
