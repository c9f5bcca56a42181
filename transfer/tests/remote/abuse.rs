//! An abused server stays up: hostile and broken peers against a real
//! server on loopback. Every test ends with the server's store unchanged by
//! the abuse (see [`Snapshot`]) and a well-behaved client served: a push
//! and a pull, byte for byte (see [`still_serves`]).
//!
//! Misbehaving peers speak QUIC through quinn directly (the server's
//! certificate pinned, ALPN `ferry/1`) and send hand-made frames; limits
//! are short so that each test takes a few seconds.

use crate::util::*;
use rand::{Rng, RngCore};
use sha2::Digest;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use store::compress::Codec;
use transfer::client::{list, pull, push, ClientError, Session};
use transfer::config::ServerConfig;
use transfer::proto::{self, ErrorKind, Message};
use transfer::tls::{Trust, Verifier};

/// The request deadline of these servers, seconds.
const DEADLINE: u64 = 2;

fn abuse_config(dir: &Path) -> ServerConfig {
    let mut cfg = config(dir, "127.0.0.1:0".parse().unwrap());
    cfg.limits.request_deadline_secs = DEADLINE;
    cfg.limits.idle_timeout_secs = 10;
    cfg.limits.shutdown_grace_secs = 1;
    cfg
}

// ------------------------------------------------------------ the store

/// What "the store is unchanged" means: the same directories and the same
/// files, with the same bytes (SHA-256), sizes and modification times,
/// everywhere under the store but `leases/` and `tmp/` — which commands
/// use for a moment and which must be empty again once the server is idle
/// (checked by [`Snapshot::take`]).
#[derive(Debug, PartialEq, Eq)]
struct Snapshot(BTreeMap<String, String>);

impl Snapshot {
    async fn take(store: &Path) -> Snapshot {
        let s = store.to_path_buf();
        wait_for(
            10,
            "no lease or temporary file left in the store",
            move || {
                ["leases", "tmp"]
                    .iter()
                    .all(|d| files_under(&s.join(d)) == 0)
            },
        )
        .await;
        let mut out = BTreeMap::new();
        walk(store, store, &mut out);
        assert!(
            out.keys().any(|k| k.starts_with("refs/")),
            "the store was seeded"
        );
        Snapshot(out)
    }

    async fn assert_unchanged(&self, store: &Path, what: &str) {
        let now = Snapshot::take(store).await;
        if now != *self {
            let diff: Vec<String> = self
                .0
                .iter()
                .filter(|(k, v)| now.0.get(*k) != Some(v))
                .map(|(k, _)| format!("changed or gone: {k}"))
                .chain(
                    now.0
                        .keys()
                        .filter(|k| !self.0.contains_key(*k))
                        .map(|k| format!("new: {k}")),
                )
                .collect();
            panic!("{what}: the server's store changed:\n{}", diff.join("\n"));
        }
    }
}

fn files_under(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                files_under(&p)
            } else {
                1
            }
        })
        .sum()
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel == "leases" || rel == "tmp" {
            continue;
        }
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            out.insert(rel, "dir".into());
            walk(root, &p, out);
        } else {
            let bytes = std::fs::read(&p).unwrap();
            let hash = store::id::to_hex(&sha2::Sha256::digest(&bytes));
            out.insert(
                rel,
                format!(
                    "{} bytes, sha256 {hash}, mtime {}.{:09}",
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec()
                ),
            );
        }
    }
}

/// A server from `cfg` whose store holds `main/base` and `pr/1234/own`,
/// and the snapshot of that store.
async fn seeded(dir: &Path, cfg: ServerConfig) -> (TestServer, Snapshot) {
    let server = TestServer::start_with(cfg).await;
    let c = client_store(dir, "seed");
    stash_bytes(&c, "main/base", &mixed_bytes(1, 600_000)).await;
    stash_bytes(&c, "pr/1234/own", &mixed_bytes(2, 300_000)).await;
    push(
        c.clone(),
        &name("main/base"),
        &server.remote(MAIN),
        &opts(),
        none(),
    )
    .await
    .unwrap();
    push(c, &name("pr/1234/own"), &server.remote(PR), &opts(), none())
        .await
        .unwrap();
    let snap = Snapshot::take(&server.store_dir).await;
    (server, snap)
}

/// A well-behaved client is served: a new stash pushed, pulled into an
/// empty store and replayed byte for byte, and listed.
async fn still_serves(server: &TestServer, dir: &Path, tag: &str) {
    let remote = server.remote(MAIN);
    let n = format!("main/after-{tag}");
    let data = mixed_bytes(1000 + tag.len() as u64, 500_000);
    let a = client_store(dir, &format!("after-{tag}-a"));
    stash_bytes(&a, &n, &data).await;
    push(a, &name(&n), &remote, &opts(), none())
        .await
        .unwrap_or_else(|e| panic!("{tag}: a well-behaved push failed: {e}"));
    let b = client_store(dir, &format!("after-{tag}-b"));
    pull(b.clone(), &name(&n), &remote, &opts(), none())
        .await
        .unwrap_or_else(|e| panic!("{tag}: a well-behaved pull failed: {e}"));
    assert!(unstash_bytes(&b, &n).await == data, "{tag}: bytes differ");
    let names: Vec<String> = list(&remote, None, &opts())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&n), "{tag}: {names:?}");
}

// ------------------------------------------------------------ raw peers

/// How a raw peer connects.
#[derive(Clone)]
struct PeerOpts {
    /// Local address to send from (127.0.0.2 is another source address).
    from: IpAddr,
    alpn: Vec<u8>,
    keep_alive: Option<Duration>,
    /// Flow-control window the peer grants each stream the server sends on.
    stream_window: Option<u32>,
}

impl Default for PeerOpts {
    fn default() -> Self {
        PeerOpts {
            from: [127, 0, 0, 1].into(),
            alpn: proto::ALPN.to_vec(),
            keep_alive: None,
            stream_window: None,
        }
    }
}

/// A QUIC connection to the server with none of the client's manners.
struct Peer {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

fn client_config(server: &TestServer, o: &PeerOpts) -> quinn::ClientConfig {
    let verifier = Verifier::new(&Trust::from_arg(&server.fingerprint).unwrap()).unwrap();
    let mut crypto = transfer::tls::client_config(Arc::new(verifier)).unwrap();
    crypto.alpn_protocols = vec![o.alpn.clone()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()))
        .keep_alive_interval(o.keep_alive);
    if let Some(w) = o.stream_window {
        t.stream_receive_window(w.into());
    }
    cfg.transport_config(Arc::new(t));
    cfg
}

async fn connect_to(
    server: &TestServer,
    to: SocketAddr,
    o: &PeerOpts,
) -> Result<Peer, quinn::ConnectionError> {
    let endpoint = quinn::Endpoint::client(SocketAddr::new(o.from, 0)).unwrap();
    let connecting = endpoint
        .connect_with(client_config(server, o), to, "localhost")
        .unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("the handshake finishes or fails within 5 s")?;
    Ok(Peer {
        conn,
        _endpoint: endpoint,
    })
}

async fn peer(server: &TestServer, o: &PeerOpts) -> Peer {
    connect_to(server, server.addr, o)
        .await
        .expect("the QUIC handshake succeeds")
}

impl Peer {
    /// Writes `bytes` on a new stream (and finishes it if `finish`); `None`
    /// if the server has closed the connection already.
    async fn try_send(
        &self,
        bytes: &[u8],
        finish: bool,
    ) -> Option<(quinn::SendStream, quinn::RecvStream)> {
        let (mut send, recv) = self.conn.open_bi().await.ok()?;
        // The server may cut us off while we write: that is its answer.
        let _ = send.write_all(bytes).await;
        if finish {
            let _ = send.finish();
        }
        Some((send, recv))
    }

    async fn send(&self, bytes: &[u8], finish: bool) -> (quinn::SendStream, quinn::RecvStream) {
        self.try_send(bytes, finish)
            .await
            .expect("the connection is open")
    }

    /// Sends one frame on a new stream; the reply frame, if one comes.
    async fn ask(&self, frame: &[u8]) -> Option<Message> {
        let (_send, mut recv) = self.try_send(frame, true).await?;
        read_reply(&mut recv).await
    }

    /// Says hello with `token` (and this protocol `version`).
    async fn hello_v(&self, version: u16, token: &str) -> Option<Message> {
        self.ask(&proto::encode(&Message::Hello {
            version,
            token: token.into(),
        }))
        .await
    }

    async fn hello(&self, token: &str) -> Message {
        let reply = self.hello_v(proto::VERSION, token).await;
        match reply {
            Some(m @ Message::Welcome { .. }) => m,
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// How the server closed the connection (waits up to `secs`).
    async fn closed(&self, secs: u64) -> (ErrorKind, String) {
        let e = tokio::time::timeout(Duration::from_secs(secs), self.conn.closed())
            .await
            .unwrap_or_else(|_| panic!("the server did not close the connection in {secs} s"));
        app_close(e)
    }
}

/// The kind and reason of a close by the server.
fn app_close(e: quinn::ConnectionError) -> (ErrorKind, String) {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => (
            ErrorKind::from_code(c.error_code.into_inner() as u8),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other}"),
    }
}

/// Connects and says hello with `token`; how the server closed the
/// connection (it may do so right after the handshake, before the hello).
async fn refused_peer(server: &TestServer, o: &PeerOpts, token: &str) -> (ErrorKind, String) {
    match connect_to(server, server.addr, o).await {
        Ok(p) => {
            let reply = p.hello_v(proto::VERSION, token).await;
            assert!(!matches!(reply, Some(Message::Welcome { .. })), "welcomed");
            p.closed(5).await
        }
        Err(e) => app_close(e),
    }
}

async fn read_reply(recv: &mut quinn::RecvStream) -> Option<Message> {
    let bytes = recv.read_to_end(64 << 20).await.ok()?;
    let mut d = proto::FrameDecoder::new(u32::MAX);
    d.push(&bytes);
    d.next_message().ok().flatten()
}

/// Runs futures at once; their outputs in order.
async fn futures_join_all<T>(futures: Vec<impl std::future::Future<Output = T>>) -> Vec<T> {
    let mut out = Vec::new();
    let pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    // Poll them together: each makes progress while the others wait.
    let mut pending: Vec<_> = pinned.into_iter().map(Some).collect();
    let mut results: Vec<Option<T>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in pending.iter_mut().enumerate() {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(
        results
            .into_iter()
            .map(|r| r.expect("every future finished")),
    );
    out
}

fn header(len: u32) -> Vec<u8> {
    len.to_le_bytes().to_vec()
}

fn refused(e: &ClientError) -> ErrorKind {
    e.kind()
        .unwrap_or_else(|| panic!("expected a refusal, got {e}"))
}

fn errors(server: &TestServer, kind: ErrorKind) -> u64 {
    server.metrics.errors(kind)
}

// ------------------------------------------------------------ log capture

/// Warnings and errors logged by any server of this test binary.
fn captured() -> &'static Mutex<Vec<String>> {
    static LOG: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing::subscriber::set_global_default(Capture);
    });
    LOG.get_or_init(|| Mutex::new(Vec::new()))
}

/// A minimal subscriber that keeps the fields of every warning and error.
struct Capture;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        self.0.push_str(&format!("{}={v} ", f.name()));
    }
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={v:?} ", f.name()));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        e.record(&mut f);
        captured().lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

// ------------------------------------------------------------------ tests

/// A frame limit just above the least a server with batches of 64 ids
/// accepts (16 MiB + 64 KiB + 36 × 64 bytes).
const SMALL_FRAME: u32 = proto::MIN_FRAME + 4096;

/// [`abuse_config`] with frames of [`SMALL_FRAME`] bytes.
fn small_frames(dir: &Path) -> ServerConfig {
    let mut cfg = abuse_config(dir);
    cfg.limits.max_frame_bytes = SMALL_FRAME;
    cfg.limits.max_batch_ids = 64;
    cfg
}

/// Frames larger than the limit — before authentication (64 KiB) and
/// after (`max_frame_bytes`) — are refused from their header, before the
/// server buffers their bytes; a frame that ends early is a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused_from_their_header() {
    let dir = tempfile::tempdir().unwrap();
    let (server, before) = seeded(dir.path(), small_frames(dir.path())).await;
    let max_frame = SMALL_FRAME;
    let o = PeerOpts::default();

    // Before hello: the limit is 64 KiB.
    for len in [(64 << 10) + 1, u32::MAX] {
        let p = peer(&server, &o).await;
        let (mut send, _recv) = p.send(&header(len), false).await;
        // The body is never waited for.
        let _ = send.write_all(&[7u8; 4096]).await;
        let (kind, why) = p.closed(5).await;
        assert_eq!(kind, ErrorKind::Limit, "{len}: {why}");
        assert!(
            why.contains(&format!("frame of {len} bytes exceeds the limit of 65536")),
            "{why}"
        );
    }

    // After hello: max_frame_bytes.
    for len in [max_frame + 1, u32::MAX] {
        let p = peer(&server, &o).await;
        p.hello(MAIN).await;
        let (mut send, _recv) = p.send(&header(len), false).await;
        // Megabytes of body behind the header: the server has closed by
        // the time they would matter, so the write fails.
        let body = vec![0u8; 4 << 20];
        let wrote = tokio::time::timeout(Duration::from_secs(5), async {
            for _ in 0..16 {
                send.write_all(&body).await?;
            }
            Ok::<_, quinn::WriteError>(())
        })
        .await
        .expect("the write ends");
        assert!(wrote.is_err(), "64 MiB accepted behind an oversized header");
        let (kind, why) = p.closed(5).await;
        assert_eq!(kind, ErrorKind::Limit, "{why}");
        assert!(
            why.contains(&format!("exceeds the limit of {max_frame} bytes")),
            "{why}"
        );
    }

    // A frame within the limit whose stream ends early.
    let p = peer(&server, &o).await;
    p.hello(MAIN).await;
    let mut frame = header(max_frame);
    frame.extend_from_slice(&[0; 1 << 20]);
    let _ = p.send(&frame, true).await;
    let (kind, why) = p.closed(5).await;
    assert_eq!(kind, ErrorKind::Protocol, "{why}");
    assert!(why.contains("ended inside a message"), "{why}");

    assert_eq!(errors(&server, ErrorKind::Limit), 4);
    assert_eq!(errors(&server, ErrorKind::Protocol), 1);
    before
        .assert_unchanged(&server.store_dir, "oversized frames")
        .await;
    still_serves(&server, dir.path(), "oversized").await;
    server.stop().await;
}

/// Unknown message types, messages that are not requests, malformed and
/// random bytes — before and after hello — and random UDP datagrams: the
/// peer is cut off with "protocol" (or "limit"), nobody else notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_types_and_garbage_are_cut_off_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (server, before) = seeded(dir.path(), abuse_config(dir.path())).await;
    let o = PeerOpts::default();
    let bystander = Session::connect(&server.remote(MAIN), &opts())
        .await
        .unwrap();

    // Before hello, on the first stream.
    let list = proto::encode(&Message::List {
        prefix: String::new(),
    });
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown type",
            vec![5, 0, 0, 0, 99, 1, 2, 3, 4],
            "unknown message type 99",
        ),
        ("type 0", vec![1, 0, 0, 0, 0], "unknown message type 0"),
        ("empty frame", vec![0, 0, 0, 0], "empty frame"),
        (
            "a request before hello",
            list.clone(),
            "expected hello, got list",
        ),
        ("truncated header", vec![9, 0], "ended inside a message"),
        ("nothing at all", vec![], "ended without a request"),
        (
            "hello with trailing bytes",
            {
                let mut f = proto::encode(&Message::Hello {
                    version: proto::VERSION,
                    token: MAIN.into(),
                });
                f.push(0);
                f[0] += 1;
                f
            },
            "1 trailing bytes",
        ),
    ];
    for (what, bytes, expect) in &cases {
        let p = peer(&server, &o).await;
        let _ = p.send(bytes, true).await;
        let (kind, why) = p.closed(5).await;
        assert_eq!(kind, ErrorKind::Protocol, "{what}: {why}");
        assert!(why.contains(expect), "{what}: {why}");
    }
    // Random bytes instead of a hello.
    for seed in 0..4u64 {
        let p = peer(&server, &o).await;
        let _ = p.send(&random_bytes(seed, 8192), true).await;
        let (kind, why) = p.closed(5).await;
        assert!(
            matches!(kind, ErrorKind::Protocol | ErrorKind::Limit),
            "seed {seed}: {kind:?} {why}"
        );
    }

    // After hello, each on a new stream of a new connection.
    let mut trailing = list.clone();
    trailing.push(0);
    trailing[0] += 1;
    let after: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown type",
            vec![1, 0, 0, 0, 255],
            "unknown message type 255",
        ),
        (
            "a second hello",
            proto::encode(&Message::Hello {
                version: proto::VERSION,
                token: MAIN.into(),
            }),
            "hello is not a request",
        ),
        (
            "a server message",
            proto::encode(&Message::CommitReply {
                id: store::ManifestId([0; 32]),
            }),
            "commit_reply is not a request",
        ),
        ("trailing bytes", trailing, "1 trailing bytes"),
        (
            "a count larger than the frame",
            {
                let mut f = vec![0u8; 4];
                f.push(18); // get_chunks
                f.extend_from_slice(&u32::MAX.to_le_bytes());
                f.extend_from_slice(&[0; 32]);
                let len = (f.len() - 4) as u32;
                f[..4].copy_from_slice(&len.to_le_bytes());
                f
            },
            "announces 4294967295 elements",
        ),
    ];
    for (what, bytes, expect) in &after {
        let p = peer(&server, &o).await;
        p.hello(MAIN).await;
        let _ = p.send(bytes, true).await;
        let (kind, why) = p.closed(5).await;
        assert_eq!(kind, ErrorKind::Protocol, "{what}: {why}");
        assert!(why.contains(expect), "{what}: {why}");
    }
    for seed in 10..14u64 {
        let s = Session::connect(&server.remote(MAIN), &opts())
            .await
            .unwrap();
        let e = s.exchange(&random_bytes(seed, 8192)).await.unwrap_err();
        assert!(
            matches!(refused(&e), ErrorKind::Protocol | ErrorKind::Limit),
            "seed {seed}: {e}"
        );
    }

    // Bytes after a hello on the hello stream are ignored; the session works.
    let p = peer(&server, &o).await;
    let mut f = proto::encode(&Message::Hello {
        version: proto::VERSION,
        token: MAIN.into(),
    });
    f.extend_from_slice(&random_bytes(99, 4096));
    assert!(matches!(p.ask(&f).await, Some(Message::Welcome { .. })));
    assert!(matches!(p.ask(&list).await, Some(Message::Listing { .. })));

    // Datagrams that are not QUIC at all.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut r = rng(5);
    for _ in 0..300 {
        let mut d = vec![0u8; r.random_range(1..1500)];
        r.fill_bytes(&mut d);
        let _ = udp.send_to(&d, server.addr);
    }

    assert!(matches!(
        bystander
            .request(&Message::List {
                prefix: String::new()
            })
            .await
            .unwrap(),
        Message::Listing { .. }
    ));
    bystander.close().await;
    assert!(errors(&server, ErrorKind::Protocol) >= (cases.len() + after.len()) as u64);
    before.assert_unchanged(&server.store_dir, "garbage").await;
    still_serves(&server, dir.path(), "garbage").await;
    server.stop().await;
}

/// Another protocol version is refused with a message saying so (on the
/// stream and as the close reason), and is not taken for a failed
/// authentication; another ALPN fails the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_versions_and_alpn_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, before) = seeded(dir.path(), abuse_config(dir.path())).await;
    let o = PeerOpts::default();
    for version in [0, proto::VERSION + 1, u16::MAX] {
        let p = peer(&server, &o).await;
        match p.hello_v(version, MAIN).await {
            Some(Message::Error { kind, message }) => {
                assert_eq!(kind, ErrorKind::Version, "{message}");
                assert!(
                    message.contains(&format!(
                        "speaks protocol version {}, the client {version}",
                        proto::VERSION
                    )),
                    "{message}"
                );
            }
            other => panic!("version {version}: {other:?}"),
        }
        let (kind, why) = p.closed(5).await;
        assert_eq!(kind, ErrorKind::Version, "{why}");
    }
    assert_eq!(errors(&server, ErrorKind::Version), 3);
    assert_eq!(server.metrics.auth_failures.load(Relaxed), 0);

    let other_alpn = PeerOpts {
        alpn: b"ferry/2".to_vec(),
        ..PeerOpts::default()
    };
    match connect_to(&server, server.addr, &other_alpn).await {
        Err(e) => assert!(
            e.to_string()
                .contains("peer doesn't support any known protocol"),
            "{e}"
        ),
        Ok(_) => panic!("a handshake with ALPN ferry/2 succeeded"),
    }
    before.assert_unchanged(&server.store_dir, "versions").await;
    still_serves(&server, dir.path(), "versions").await;
    server.stop().await;
}

/// Silent peers cannot hold the server: a connection without a hello is
/// cut at the hello deadline, a request that stalls or trickles (even with
/// keep-alives) at the request deadline, an answer the peer does not read
/// at the same deadline, and a connection without traffic at the idle
/// timeout. Issue 4's per-request deadline test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_cut_off_by_deadlines_and_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = abuse_config(dir.path());
    cfg.limits.idle_timeout_secs = 3;
    let (server, before) = seeded(dir.path(), cfg).await;
    let kept_alive = PeerOpts {
        keep_alive: Some(Duration::from_millis(200)),
        ..PeerOpts::default()
    };
    let deadline = Duration::from_secs(DEADLINE);
    // `since`: when the peer's last step was done (the server's clock for
    // it starts a little later).
    let timed = |what: &'static str, expect: &'static str, (p, since): (Peer, Instant)| async move {
        let (kind, why) = p.closed(10).await;
        let took = since.elapsed();
        assert_eq!(kind, ErrorKind::Deadline, "{what}: {why}");
        assert!(why.contains(expect), "{what}: {why}");
        assert!(
            took >= deadline - Duration::from_millis(100) && took < deadline * 3,
            "{what}: cut off after {took:?}"
        );
    };

    // Connected, kept alive, never says hello.
    let mute = peer(&server, &kept_alive).await;
    let mute = (mute, Instant::now());
    // Starts a hello and stops.
    let half_hello = peer(&server, &kept_alive).await;
    let started = Instant::now();
    let _h = half_hello.send(&[20, 0, 0], false).await;
    let half_hello = (half_hello, started);
    // Welcomed, then starts a request and stops (keep-alives flowing).
    let stalled = peer(&server, &kept_alive).await;
    stalled.hello(MAIN).await;
    let _s = stalled.send(&[64, 0], false).await;
    let stalled = (stalled, Instant::now());
    // Welcomed, then trickles a request a few bytes at a time.
    let trickle = peer(&server, &kept_alive).await;
    trickle.hello(MAIN).await;
    let (mut t_send, _t_recv) = trickle.send(&header(1000), false).await;
    let trickle = (trickle, Instant::now());
    let trickler = tokio::spawn(async move {
        while t_send.write_all(&[0; 8]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Welcomed, asks for a listing and never reads it: the server cannot
    // send more than the 64 bytes the stream's window allows.
    let deaf = peer(
        &server,
        &PeerOpts {
            stream_window: Some(64),
            ..kept_alive.clone()
        },
    )
    .await;
    deaf.hello(MAIN).await;
    let _d = deaf
        .send(
            &proto::encode(&Message::List {
                prefix: String::new(),
            }),
            true,
        )
        .await;
    let deaf = (deaf, Instant::now());
    // Welcomed, then nothing: not even keep-alives.
    let idle = peer(&server, &PeerOpts::default()).await;
    idle.hello(MAIN).await;
    let idle_started = Instant::now();

    tokio::join!(
        timed("no hello", "no hello within the request deadline", mute),
        timed(
            "half a hello",
            "no hello within the request deadline",
            half_hello
        ),
        timed(
            "a stalled request",
            "longer than the deadline of 2 s",
            stalled
        ),
        timed("a trickled request", "longer than the deadline", trickle),
        timed(
            "an unread answer",
            "the reply was not read within the request deadline",
            deaf
        ),
    );
    trickler.abort();
    assert_eq!(errors(&server, ErrorKind::Deadline), 5);

    // The idle connection is closed by the idle timeout (3 s) on both
    // sides; the server no longer counts it.
    let e = tokio::time::timeout(Duration::from_secs(10), idle.conn.closed())
        .await
        .expect("the idle connection ends");
    assert!(matches!(e, quinn::ConnectionError::TimedOut), "{e}");
    let took = idle_started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "{took:?}"
    );
    wait_for(5, "no connection left open on the server", || {
        server.metrics.connections_open.load(Relaxed) == 0
            && server.metrics.active_sessions.load(Relaxed) == 0
            && server.metrics.requests_in_flight.load(Relaxed) == 0
    })
    .await;

    before.assert_unchanged(&server.store_dir, "silence").await;
    still_serves(&server, dir.path(), "silence").await;
    server.stop().await;
}

/// Streams past the limit are not opened: an unauthenticated peer gets one
/// stream (its hello), an authenticated one `max_streams_per_connection`;
/// the next waits, the server never has more requests of one connection in
/// flight, and a flood of requests is served that many at a time. Issue
/// 4's stream-count limit test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_wait_and_the_limit_holds_under_a_flood() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = abuse_config(dir.path());
    cfg.limits.max_streams_per_connection = 4;
    // Long enough that the held requests outlive the checks below.
    cfg.limits.request_deadline_secs = 10;
    let (server, before) = seeded(dir.path(), cfg).await;
    let in_flight = || server.metrics.requests_in_flight.load(Relaxed);
    let blocked = Duration::from_millis(500);

    // Before hello: one stream.
    let p = peer(&server, &PeerOpts::default()).await;
    let _first = p.send(&[1], false).await;
    assert!(
        tokio::time::timeout(blocked, p.conn.open_bi())
            .await
            .is_err(),
        "an unauthenticated peer opened a second stream"
    );
    p.conn.close(0u32.into(), b"bye");

    // After hello: four, each holding a request open.
    let p = peer(&server, &PeerOpts::default()).await;
    p.hello(MAIN).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(p.send(&[1], false).await);
    }
    wait_for(5, "4 requests in flight", || in_flight() == 4).await;
    let fifth = tokio::time::timeout(blocked, p.conn.open_bi()).await;
    assert!(fifth.is_err(), "a fifth stream was opened");
    assert_eq!(in_flight(), 4);
    // (The request deadline would cut the held requests off; see
    // `silent_peers_…`.) Leaving frees them at once.
    p.conn.close(0u32.into(), b"bye");
    drop(held);
    wait_for(5, "no request in flight", || in_flight() == 0).await;

    // A flood of 200 requests on one connection: all answered, never more
    // than four at a time.
    let s = Session::connect(&server.remote(MAIN), &opts())
        .await
        .unwrap();
    let metrics = server.metrics.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut most = 0;
            while !stop.load(Relaxed) {
                most = most.max(metrics.requests_in_flight.load(Relaxed));
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            most
        })
    };
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200 {
        let s = s.clone();
        set.spawn(async move {
            let msg = if i % 2 == 0 {
                Message::List {
                    prefix: String::new(),
                }
            } else {
                Message::GetManifest {
                    name: "main/base".into(),
                    have: vec![],
                }
            };
            s.request(&msg).await
        });
    }
    let mut answered = 0;
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
        answered += 1;
    }
    stop.store(true, Relaxed);
    let most = sampler.await.unwrap();
    assert_eq!(answered, 200);
    assert!(
        (1..=4).contains(&most),
        "{most} requests of one connection in flight at once"
    );
    s.close().await;

    before
        .assert_unchanged(&server.store_dir, "stream flood")
        .await;
    still_serves(&server, dir.path(), "streams").await;
    server.stop().await;
}

/// A relay that passes a client's packets to the server and drops the
/// server's: the server sees a handshake from the relay's address that
/// never completes, as from a spoofed source address.
async fn black_hole(server: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = front.recv_from(&mut buf).await {
            let _ = back.send_to(&buf[..n], server).await;
        }
    });
    (addr, task)
}

/// Connections past `max_connections` are closed "busy" (and counted);
/// half-open handshakes take no slot; slots free up when peers leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_and_half_open_ones_take_no_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = abuse_config(dir.path());
    cfg.limits.max_connections = 4;
    let (server, before) = seeded(dir.path(), cfg).await;
    let open = || server.metrics.connections_open.load(Relaxed);
    wait_for(5, "the seeding clients gone", || open() == 0).await;
    let accepted = server.metrics.connections.load(Relaxed);

    // Eight handshakes that never finish.
    let mut relays = Vec::new();
    let mut half_open = Vec::new();
    for _ in 0..8 {
        let (addr, task) = black_hole(server.addr).await;
        relays.push(task);
        let o = PeerOpts::default();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = endpoint
            .connect_with(client_config(&server, &o), addr, "localhost")
            .unwrap();
        half_open.push((endpoint, tokio::spawn(connecting)));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Four real clients still get in.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(
            Session::connect(&server.remote(MAIN), &opts())
                .await
                .expect("half-open handshakes took a connection slot"),
        );
    }
    assert_eq!(open(), 4);

    // Eight more, at once: each is closed "busy".
    let plain = PeerOpts::default();
    let tries: Vec<_> = (0..8)
        .map(|_| refused_peer(&server, &plain, MAIN))
        .collect();
    for (kind, why) in futures_join_all(tries).await {
        assert_eq!(kind, ErrorKind::Busy, "{why}");
        assert!(why.contains("busy (4 connections)"), "{why}");
    }
    // The client library reports it as worth retrying.
    let e = Session::connect(&server.remote(MAIN), &opts())
        .await
        .unwrap_err();
    assert_eq!(refused(&e), ErrorKind::Busy);
    assert!(e.is_transient());
    assert_eq!(errors(&server, ErrorKind::Busy), 9);
    assert_eq!(server.metrics.connections.load(Relaxed) - accepted, 4 + 9);
    wait_for(5, "refused connections gone", || open() == 4).await;
    // The four sessions were never disturbed.
    for s in &sessions {
        assert!(matches!(
            s.request(&Message::List {
                prefix: String::new()
            })
            .await
            .unwrap(),
            Message::Listing { .. }
        ));
    }
    for s in sessions {
        s.close().await;
    }
    wait_for(5, "every slot free", || open() == 0).await;
    for t in relays {
        t.abort();
    }
    for (endpoint, connecting) in half_open {
        connecting.abort();
        endpoint.close(0u32.into(), b"");
    }

    before
        .assert_unchanged(&server.store_dir, "connection flood")
        .await;
    still_serves(&server, dir.path(), "connections").await;
    server.stop().await;
}

/// A host whose connections never say hello holds at most
/// `max_unauthenticated_per_address` of them: the next is refused "busy"
/// (naming the limit), while other addresses are served; once the silent
/// ones are cut off at the hello deadline, the host gets in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_one_address_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = abuse_config(dir.path());
    cfg.limits.max_unauthenticated_per_address = 3;
    let (server, before) = seeded(dir.path(), cfg).await;
    let open = || server.metrics.connections_open.load(Relaxed);
    wait_for(5, "the seeding clients gone", || open() == 0).await;
    let host = PeerOpts {
        from: [127, 0, 0, 2].into(),
        ..PeerOpts::default()
    };

    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(peer(&server, &host).await);
    }
    wait_for(5, "three silent connections held", || open() == 3).await;
    let busy = errors(&server, ErrorKind::Busy);
    let (kind, why) = refused_peer(&server, &host, MAIN).await;
    assert_eq!(kind, ErrorKind::Busy, "{why}");
    assert!(
        why.contains("too many connections from 127.0.0.2 are waiting to say hello (3 at most: limits.max_unauthenticated_per_address)"),
        "{why}"
    );
    assert_eq!(errors(&server, ErrorKind::Busy), busy + 1);
    // The three silent ones are still held (whether the refused one ever
    // took a slot, this cannot tell: it is gone by now either way).
    assert_eq!(open(), 3);

    // Another address is served meanwhile.
    let s = Session::connect(&server.remote(MAIN), &opts())
        .await
        .unwrap();
    assert!(matches!(
        s.request(&Message::List {
            prefix: String::new()
        })
        .await
        .unwrap(),
        Message::Listing { .. }
    ));
    s.close().await;

    // The silent ones end at the hello deadline; then the host gets in.
    for p in &silent {
        let (kind, why) = p.closed(10).await;
        assert_eq!(kind, ErrorKind::Deadline, "{why}");
    }
    let welcomed = peer(&server, &host).await;
    welcomed.hello(MAIN).await;
    drop(welcomed);
    drop(silent);

    before
        .assert_unchanged(&server.store_dir, "silent connections")
        .await;
    still_serves(&server, dir.path(), "silent-host").await;
    server.stop().await;
}

/// Past `validate_addresses_above` handshakes in progress, a peer must
/// prove its address first (a QUIC Retry): peers that never answer —
/// forged sources — get no handshake state, while real clients pay one
/// round trip and are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_a_few_handshakes_peers_must_prove_their_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = abuse_config(dir.path());
    cfg.limits.validate_addresses_above = 4;
    // The four half-open handshakes must outlast the real client's.
    cfg.limits.request_deadline_secs = 6;
    let (server, before) = seeded(dir.path(), cfg).await;
    let m = server.metrics.clone();
    let handshakes = || m.handshakes.load(Relaxed);
    let validations = || m.address_validations.load(Relaxed);
    wait_for(5, "the seeding clients' handshakes done", || {
        handshakes() == 0
    })
    .await;
    assert_eq!(
        validations(),
        0,
        "the seeding clients were asked to validate"
    );

    // Eight peers whose answers go nowhere, as from forged addresses: the
    // first four get handshakes (and hold them until the deadline), the
    // others only a Retry they never see.
    let mut relays = Vec::new();
    let mut half_open = Vec::new();
    for i in 0..8 {
        let (addr, task) = black_hole(server.addr).await;
        relays.push(task);
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = endpoint
            .connect_with(
                client_config(&server, &PeerOpts::default()),
                addr,
                "localhost",
            )
            .unwrap();
        half_open.push((endpoint, tokio::spawn(connecting)));
        let want = (i + 1).min(4);
        wait_for(5, "the handshake counted or refused", || {
            handshakes() == want && validations() as i64 + handshakes() > i
        })
        .await;
    }
    assert_eq!(handshakes(), 4);
    assert!(validations() >= 4, "{}", validations());
    // No more packets from them (their resent Initials would be validated
    // too): from now on only the real client is.
    for t in relays {
        t.abort();
    }

    // A real client is validated too, and served.
    let asked = validations();
    let s = Session::connect(&server.remote(MAIN), &opts())
        .await
        .unwrap();
    assert!(
        validations() > asked,
        "the client was not asked to validate"
    );
    let listing = s
        .request(&Message::List {
            prefix: String::new(),
        })
        .await
        .unwrap();
    assert!(matches!(listing, Message::Listing { .. }), "{listing:?}");
    s.close().await;

    // Once the half-open handshakes time out, nobody is asked again.
    wait_for(10, "the half-open handshakes timed out", || {
        handshakes() == 0
    })
    .await;
    for (endpoint, connecting) in half_open {
        connecting.abort();
        endpoint.close(0u32.into(), b"");
    }
    before
        .assert_unchanged(&server.store_dir, "address validation")
        .await;
    let asked = validations();
    still_serves(&server, dir.path(), "validation").await;
    assert_eq!(
        validations(),
        asked,
        "validated with no handshake in progress"
    );
    server.stop().await;
}

/// Uploads whose bytes do not match their ids are refused whole (the good
/// chunks beside them are not stored either) and cut the peer off;
/// commits naming chunks the server lacks, or bytes that are not a
/// manifest, are refused; nothing of any of it reaches the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_uploads_and_commits_of_missing_chunks_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, before) = seeded(dir.path(), abuse_config(dir.path())).await;
    let remote = server.remote(MAIN);
    let c = client_store(dir.path(), "c");
    stash_bytes(&c, "main/x", &mixed_bytes(7, 500_000)).await;
    let ids = chunk_ids(&c, "main/x");
    let good = c.read_stored(&ids[0]).unwrap().unwrap();
    let other = c.read_stored(&ids[1]).unwrap().unwrap();

    // A zstd bomb: 64 MiB of zeros in a few KiB, claiming 1 KiB.
    let zeros = vec![0u8; 64 << 20];
    let mut bomb = good.clone();
    bomb.codec = Codec::Zstd;
    bomb.raw_len = 1024;
    bomb.bytes = zstd::bulk::compress(&zeros, 19).unwrap().into();
    bomb.id = store::ChunkId::of(&zeros[..1024]);
    let mut raw_lie = good.clone();
    raw_lie.codec = Codec::Raw;
    raw_lie.bytes = vec![1; 100].into();
    raw_lie.raw_len = 100;

    let mut spoiled = tampered(&good, &other);
    spoiled.push(("a zstd bomb", bomb));
    spoiled.push(("raw bytes of another id", raw_lie));
    for (what, bad) in spoiled {
        let s = Session::connect(&remote, &opts()).await.unwrap();
        let e = s
            .request(&Message::PutChunks {
                name: "main/x".into(),
                chunks: vec![other.clone(), bad.clone()],
            })
            .await
            .unwrap_err();
        assert_eq!(refused(&e), ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.to_string().contains(&bad.id.to_hex()), "{what}: {e}");
        let after = s
            .request(&Message::List {
                prefix: String::new(),
            })
            .await;
        assert!(after.is_err(), "{what}: the peer was not cut off");
    }
    assert_eq!(errors(&server, ErrorKind::Corrupt), 6);
    // A length out of range does not even decode.
    let mut zero = good.clone();
    zero.raw_len = 0;
    let s = Session::connect(&remote, &opts()).await.unwrap();
    let e = s
        .request(&Message::PutChunks {
            name: "main/x".into(),
            chunks: vec![zero],
        })
        .await
        .unwrap_err();
    assert_eq!(refused(&e), ErrorKind::Protocol, "{e}");

    // Commits: of a manifest whose chunks the server lacks (one session:
    // this refusal is not fatal), then of bytes that are no manifest.
    let (_, manifest) = c.manifest_bytes(&name("main/x")).unwrap();
    let s = Session::connect(&remote, &opts()).await.unwrap();
    for n in ["main/x", "main/base", "main/new/deeper"] {
        let e = s
            .request(&Message::Commit {
                name: n.into(),
                manifest: manifest.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused(&e), ErrorKind::MissingChunks, "{n}: {e}");
        assert!(e.to_string().contains("upload every chunk"), "{e}");
    }
    let e = s
        .request(&Message::Commit {
            name: "main/y".into(),
            manifest: b"not a manifest".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused(&e), ErrorKind::Corrupt, "{e}");
    // And a pull-request token cannot commit outside its scope, even a
    // manifest whose chunks are all there.
    let (_, base) = client_store(dir.path(), "seed")
        .manifest_bytes(&name("main/base"))
        .unwrap();
    let pr = Session::connect(&server.remote(PR), &opts()).await.unwrap();
    let e = pr
        .request(&Message::Commit {
            name: "main/base".into(),
            manifest: base,
        })
        .await
        .unwrap_err();
    assert_eq!(refused(&e), ErrorKind::Forbidden, "{e}");
    pr.close().await;

    before
        .assert_unchanged(&server.store_dir, "bad uploads")
        .await;
    // The honest push of main/x works afterwards.
    push(c, &name("main/x"), &remote, &opts(), none())
        .await
        .unwrap();
    still_serves(&server, dir.path(), "uploads").await;
    server.stop().await;
}

/// Manifests larger than the server takes. A forged one that a few KiB of
/// zstd expand past four frames is refused at the commit as a limit
/// (whether or not its frame declares its size), before the server expands
/// it; and a client whose stash's manifest is too large is told before it
/// uploads anything, with the limit to raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_larger_than_the_server_takes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, before) = seeded(dir.path(), small_frames(dir.path())).await;
    let max_frame = SMALL_FRAME;
    let remote = server.remote(MAIN);
    let max = proto::Limits {
        max_frame,
        ..Default::default()
    }
    .max_manifest();

    let mut raw = b"FERRYMF1".to_vec();
    raw.resize(max + 1, 0);
    let declared = zstd::bulk::compress(&raw, 1).unwrap();
    let mut undeclared = Vec::new();
    let mut enc = zstd::stream::write::Encoder::new(&mut undeclared, 1).unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, &raw).unwrap();
    enc.finish().unwrap();
    assert!(declared.len() < 64 << 10 && undeclared.len() < 64 << 10);
    let s = Session::connect(&remote, &opts()).await.unwrap();
    let commit = |manifest: &Vec<u8>| Message::Commit {
        name: "main/bomb".into(),
        manifest: manifest.clone(),
    };
    let e = s.request(&commit(&declared)).await.unwrap_err();
    assert_eq!(refused(&e), ErrorKind::Limit, "{e}");
    assert!(
        e.to_string().contains(&format!(
            "the manifest is {} bytes uncompressed, more than the {max} accepted here",
            max + 1
        )) && e.to_string().contains("four times limits.max_frame_bytes"),
        "{e}"
    );
    let e = s.request(&commit(&undeclared)).await.unwrap_err();
    assert_eq!(refused(&e), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains(&format!("at most {max} bytes")),
        "{e}"
    );
    s.close().await;

    // A real stash: one chunk of one byte, named often enough that the
    // manifest (which compresses to almost nothing) is too large.
    let c = client_store(dir.path(), "big");
    stash_bytes(&c, "main/one", b"x").await;
    let (_, one) = c.manifest(&name("main/one")).unwrap();
    let n = max / 36 + 1;
    let mut big = one.clone();
    big.header.size = n as u64;
    big.content = vec![one.content[0]; n];
    big.layout = [(store::tarsplit::Part::Content, n as u64)]
        .into_iter()
        .collect();
    c.commit_manifest(&name("main/big"), &big.encode()).unwrap();
    let e = push(c.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap_err();
    assert_eq!(refused(&e), ErrorKind::Limit, "{e}");
    assert!(
        e.to_string().contains("too large for this server")
            && e.to_string().contains("raise limits.max_frame_bytes"),
        "{e}"
    );

    before
        .assert_unchanged(&server.store_dir, "too-large manifests")
        .await;
    still_serves(&server, dir.path(), "large-manifests").await;
    server.stop().await;
}

/// Names with `..`, absolute paths, NUL, backslashes or 10 000 characters
/// are refused in every request that takes a name, without ending the
/// session; as listing prefixes they match nothing. No file appears
/// anywhere, in the store or beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused_and_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, before) = seeded(dir.path(), abuse_config(dir.path())).await;
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let c = client_store(dir.path(), "c");
    stash_bytes(&c, "main/x", &mixed_bytes(8, 300_000)).await;
    let ids = chunk_ids(&c, "main/x");
    let chunk = c.read_stored(&ids[0]).unwrap().unwrap();
    // A manifest whose chunks the server holds (main/base's own).
    let (_, manifest) = client_store(dir.path(), "seed")
        .manifest_bytes(&name("main/base"))
        .unwrap();

    let long = "a".repeat(10_000);
    let bad_names = [
        "..".to_string(),
        "../x".into(),
        "main/../../etc/passwd".into(),
        "main/..".into(),
        "/etc/passwd".into(),
        "/".into(),
        "main/\0".into(),
        "\0".into(),
        "main\\..\\x".into(),
        "main//x".into(),
        "main/./x".into(),
        "main/.hidden".into(),
        "main/x.ref".into(),
        String::new(),
        long.clone(),
        format!("main/{long}"),
        format!("main/{}", "a/".repeat(5_000)),
    ];
    for token in [MAIN, PR] {
        let s = Session::connect(&server.remote(token), &opts())
            .await
            .unwrap();
        let listing = |m: Message| match m {
            Message::Listing { entries } => entries.into_iter().map(|e| e.name).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let readable = listing(
            s.request(&Message::List {
                prefix: String::new(),
            })
            .await
            .unwrap(),
        );
        assert!(!readable.is_empty());
        let mut names = bad_names.to_vec();
        names.push("pr/1234/../../main/base".into());
        for n in &names {
            let shown: String = n.chars().take(40).collect();
            for msg in [
                Message::Missing {
                    name: n.clone(),
                    ids: ids.clone(),
                },
                Message::PutChunks {
                    name: n.clone(),
                    chunks: vec![chunk.clone()],
                },
                Message::Commit {
                    name: n.clone(),
                    manifest: manifest.clone(),
                },
                Message::GetManifest {
                    name: n.clone(),
                    have: vec![],
                },
            ] {
                let what = msg.kind_name();
                let e = s.request(&msg).await.unwrap_err();
                assert_eq!(refused(&e), ErrorKind::BadName, "{what} {shown:?}: {e}");
                assert!(
                    e.to_string().len() < 1000,
                    "{what} {shown:?}: a {} byte error",
                    e.to_string().len()
                );
            }
            // A listing prefix is only a filter: it shows at most what the
            // token may read, and nothing for a prefix no name can have.
            let seen = listing(
                s.request(&Message::List { prefix: n.clone() })
                    .await
                    .unwrap(),
            );
            assert!(
                seen.iter().all(|x| readable.contains(x)),
                "prefix {shown:?}: {seen:?}"
            );
            if n.contains("..") || n.contains('\0') || n.len() > 255 {
                assert!(seen.is_empty(), "prefix {shown:?}: {seen:?}");
            }
        }
        // The session survived every refusal.
        let again = listing(
            s.request(&Message::List {
                prefix: String::new(),
            })
            .await
            .unwrap(),
        );
        assert_eq!(again, readable);
        s.close().await;
    }
    assert!(errors(&server, ErrorKind::BadName) >= 2 * 4 * bad_names.len() as u64);

    before
        .assert_unchanged(&server.store_dir, "hostile names")
        .await;
    let mut now: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "c")
        .collect();
    let mut was = beside.clone();
    now.sort();
    was.sort();
    assert_eq!(now, was, "files appeared beside the store");
    still_serves(&server, dir.path(), "names").await;
    server.stop().await;
}

/// A wrong token tried again and again: after `max_auth_failures` within
/// the window, the address is refused whatever token it brings (so that
/// guessing cannot go on at full speed), the lockout is logged once and
/// counted, other addresses are served, and once the window has passed
/// the address may try again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_tokens_are_rate_limited_and_logged() {
    let log = captured();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = abuse_config(dir.path());
    cfg.limits.max_auth_failures = 5;
    cfg.limits.auth_failure_window_secs = 3;
    let (server, before) = seeded(dir.path(), cfg).await;
    // The guesser comes from 127.0.0.2, honest clients from 127.0.0.1.
    let guesser = PeerOpts {
        from: [127, 0, 0, 2].into(),
        ..PeerOpts::default()
    };
    let started = Instant::now();
    for i in 0..5 {
        let p = peer(&server, &guesser).await;
        let token = if i == 0 {
            String::new()
        } else {
            format!("guess-{i}")
        };
        match p.hello_v(proto::VERSION, &token).await {
            Some(Message::Error { kind, .. }) => assert_eq!(kind, ErrorKind::Unauthenticated),
            other => panic!("guess {i}: {other:?}"),
        }
    }
    assert_eq!(server.metrics.auth_failures.load(Relaxed), 5);

    // Refused now, even with the right token, and without trying it.
    for i in 0..20 {
        let token = if i == 0 { MAIN } else { "guess-again" };
        let (kind, why) = refused_peer(&server, &guesser, token).await;
        assert_eq!(kind, ErrorKind::Unauthenticated, "{why}");
        assert!(
            why.contains("too many failed authentications from 127.0.0.2 (5 within 3 s)"),
            "{why}"
        );
    }
    assert_eq!(server.metrics.auth_failures.load(Relaxed), 5);
    assert_eq!(server.metrics.auth_refused.load(Relaxed), 20);
    let lockouts = |log: &Mutex<Vec<String>>| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| {
                l.contains("too many failed authentications: refusing this address")
                    && l.contains("address=127.0.0.2")
            })
            .count()
    };
    assert_eq!(lockouts(log), 1, "the lockout is logged once");

    // The client library says what is wrong (and does not retry); this
    // failure, from 127.0.0.1, is the sixth.
    let e = Session::connect(&server.remote("another-wrong-token"), &opts())
        .await
        .unwrap_err();
    assert_eq!(refused(&e), ErrorKind::Unauthenticated);
    assert!(!e.is_transient());

    // Other addresses are not affected.
    let s = Session::connect(&server.remote(MAIN), &opts())
        .await
        .unwrap();
    s.close().await;
    assert!(server
        .metrics
        .render()
        .contains("ferry_auth_refused_total 20\n"));

    // Once the first failure is older than the window, the right token works.
    let mut welcomed = false;
    while started.elapsed() < Duration::from_secs(8) {
        let p = peer(&server, &guesser).await;
        if let Some(Message::Welcome { .. }) = p.hello_v(proto::VERSION, MAIN).await {
            welcomed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(welcomed, "127.0.0.2 still refused after the window");
    assert!(started.elapsed() >= Duration::from_millis(2500));
    assert_eq!(server.metrics.auth_failures.load(Relaxed), 6);

    before
        .assert_unchanged(&server.store_dir, "wrong tokens")
        .await;
    still_serves(&server, dir.path(), "tokens").await;
    server.stop().await;
}
