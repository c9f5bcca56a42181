//! The client: push a stash from a local store to a server, pull one from a
//! server into a local store (the node's cache), list a server's names.
//!
//! A **push** sends the manifest's chunk ids in large batches, learns which
//! the server lacks, uploads only those (as stored, already compressed) over
//! several parallel streams, and commits the manifest and name last. A
//! **pull** fetches the manifest, asks the local store which chunks it
//! lacks, downloads those over parallel streams, verifies and imports them,
//! and commits the name locally. Both resume: a re-run (or a retry after a
//! transient error) moves only what is still missing. Transient failures
//! (unreachable server, lost connection, "shutting down") are retried
//! `retries` times with exponential backoff; "busy" (no connection slot
//! free, for the server or for the token) is waited out for up to
//! `busy_wait`, polling every few seconds; persistent failures (bad token,
//! scope, certificate mismatch, corrupt data) end at once with a clear
//! error.
//!
//! [`gc`] asks the server to run retention and garbage collection on its
//! store (admin tokens only) and returns the server's report.

use crate::auth::{Scopes, Token};
use crate::config::DEFAULT_PORT;
use crate::proto::{self, ErrorKind, GcRequest, Limits, Message};
use crate::tls::{self, TlsError, Trust, Verifier};
use crate::wire::{self, WireError};
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::backend::Kind;
use store::gc::{GcOptions, GcReport};
use store::import::{verify_all, Importer};
use store::manifest::{ChunkRef, Header, Manifest};
use store::name::Name;
use store::repo::{Entry, Progress, Store, StoreError, StoredChunk};
use store::{ChunkId, ManifestId};
use tokio::task::JoinSet;
use tracing::{debug, warn};

pub use crate::push::push;

/// Environment variable with the server's URL.
pub const REMOTE_ENV: &str = "FERRY_REMOTE";
/// Environment variable with the server certificate (file or fingerprint).
pub const SERVER_CERT_ENV: &str = "FERRY_SERVER_CERT";
/// How long a remote collection may take before the client gives up
/// waiting for its report (the collection itself goes on on the server).
pub const GC_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// The client pings this often while its connection is quiet: while a
/// request is long (a collection) or it waits for a stash's next pack (an
/// early upload), neither side takes the connection for a dead one (a
/// server's idle timeout may be as short as a second); and if the server
/// restarted, the ping draws its stateless reset (see `tls::RestartKeys`),
/// so the client reconnects at once instead of after its idle timeout.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// The client's QUIC idle timeout: a live server answers the keep-alives
/// within milliseconds, so 20 unanswered ones mean it is gone (a server
/// that stopped at once, or whose CONNECTION_CLOSE was lost, quinn #2785),
/// and the retry or the error should come now, not after minutes. Long
/// requests are bounded by the request timeout, not by this.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The remote URL or the options are unusable.
    #[error("{0}")]
    Config(String),
    /// TLS setup (the trusted certificate file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server did not answer.
    #[error(
        "cannot reach the ferry server at {remote}: {detail} \
         (is `ferry serve` running there, and is UDP port open?)"
    )]
    Unreachable {
        /// The server.
        remote: String,
        /// What happened.
        detail: String,
    },
    /// The server's certificate is not the trusted one.
    #[error(
        "the server at {remote} is not the trusted one: {detail}; check --server-cert \
         (the server prints its fingerprint when it starts)"
    )]
    Certificate {
        /// The server.
        remote: String,
        /// What was presented.
        detail: String,
    },
    /// The connection broke.
    #[error("the connection to {remote} was lost: {detail}")]
    ConnectionLost {
        /// The server.
        remote: String,
        /// What happened.
        detail: String,
    },
    /// The server refused a request.
    #[error("the server at {remote} refused: {message} ({})", kind.as_str())]
    Refused {
        /// The server.
        remote: String,
        /// Why.
        kind: ErrorKind,
        /// Its explanation.
        message: String,
    },
    /// The server sent something it should not have.
    #[error("the server at {remote} broke the protocol: {detail}")]
    Protocol {
        /// The server.
        remote: String,
        /// What was wrong.
        detail: String,
    },
    /// The local store failed (or holds damaged data).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// [`Stop::request`] was called: the transfer wound down.
    #[error("the transfer was stopped; what had arrived is kept for the next run")]
    Stopped,
}

impl ClientError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::ConnectionLost { .. } => true,
            ClientError::Refused { kind, .. } => kind.is_transient(),
            _ => false,
        }
    }

    /// The server's error kind, if the server refused.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Refused { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// Where a server is and how to trust and authenticate to it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Host name or IP address.
    pub host: String,
    /// UDP port.
    pub port: u16,
    /// The certificate(s) trusted.
    pub trust: Trust,
    /// The token, if any.
    pub token: Option<Token>,
}

impl Remote {
    /// Parses `quic://HOST[:PORT]` (IPv6 in brackets).
    pub fn parse_url(url: &str) -> Result<(String, u16), ClientError> {
        let bad = |why: &str| {
            ClientError::Config(format!(
                "remote {url:?} {why}: expected quic://HOST:PORT, e.g. quic://ferry.ci.internal:{DEFAULT_PORT}"
            ))
        };
        let rest = url
            .strip_prefix("quic://")
            .ok_or_else(|| bad("does not start with quic://"))?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err(bad("is not a host and port"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("has an unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("has text after the ]")),
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("has an invalid port"))?,
            None => DEFAULT_PORT,
        };
        Ok((host, port))
    }

    /// A remote from its URL, trust and token.
    pub fn new(url: &str, trust: Trust, token: Option<Token>) -> Result<Remote, ClientError> {
        let (host, port) = Self::parse_url(url)?;
        Ok(Remote {
            host,
            port,
            trust,
            token,
        })
    }

    /// The URL, `quic://HOST:PORT`.
    pub fn display(&self) -> String {
        if self.host.contains(':') {
            format!("quic://[{}]:{}", self.host, self.port)
        } else {
            format!("quic://{}:{}", self.host, self.port)
        }
    }
}

/// Tunables of a transfer.
#[derive(Debug, Clone)]
pub struct Options {
    /// Parallel request streams (capped by the server's limit).
    pub streams: usize,
    /// Parallel streams of an [`crate::push::EarlyUpload`]: it only has to
    /// keep up with the stash it overlaps, and should leave the CPU to it.
    pub early_streams: usize,
    /// Bytes of chunks handed over by a running stash that an
    /// [`crate::push::EarlyUpload`] keeps waiting at most (see
    /// [`crate::push::EARLY_HELD_BYTES`]).
    pub early_held_bytes: u64,
    /// Bytes of chunks per upload or download request.
    pub batch_bytes: u64,
    /// A pull imports received chunks into the local store in groups of
    /// about this many bytes (each group is one durable pack).
    pub import_bytes: u64,
    /// A streaming unstash fetches at most this many raw bytes ahead of
    /// what it has written (memory stays bounded by it).
    pub read_ahead: u64,
    /// Retries after transient failures.
    pub retries: u32,
    /// First backoff; doubled after each failure, up to `max_backoff`
    /// (each wait is stretched by a random 0–50 %).
    pub backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// How long to keep trying while the server answers "busy" (all its
    /// connections, or all its connections for this token, are taken):
    /// such refusals do not count against `retries`, because a slot frees
    /// only when another job's transfer ends, which can take minutes.
    pub busy_wait: Duration,
    /// How long to wait for the server to answer a connection.
    pub connect_timeout: Duration,
    /// How long one request may take.
    pub request_timeout: Duration,
    /// Winds a remote unstash down when requested (say, on a signal).
    pub stop: Stop,
}

/// Asks a remote unstash to wind down: its downloads stop after the
/// requests in flight, the chunks that arrived are made durable in the
/// local store (so a run of the same command fetches none of them again),
/// its partial output is removed, and it fails with
/// [`ClientError::Stopped`]. Clones share one request.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<std::sync::atomic::AtomicBool>);

impl Stop {
    /// Requests the stop; it cannot be undone.
    pub fn request(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            streams: 8,
            // Measured on 2 cores (BENCHMARKS.md §4): 2 beat 8.
            early_streams: 2,
            early_held_bytes: crate::push::EARLY_HELD_BYTES,
            // Small enough that every stream has work and memory stays
            // bounded (a batch is held twice: as chunks and as a frame).
            batch_bytes: 4 << 20,
            import_bytes: 64 << 20,
            read_ahead: 64 << 20,
            retries: 4,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
            busy_wait: DEFAULT_BUSY_WAIT,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(300),
            stop: Stop::default(),
        }
    }
}

/// What a transfer moved (summed over retries).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TransferStats {
    /// Distinct chunks in the stash.
    pub chunks: u64,
    /// Chunks the other side already had.
    pub chunks_present: u64,
    /// Chunks uploaded.
    pub chunks_sent: u64,
    /// Of those, the ones the server had acknowledged when the stash ended
    /// (`stash --remote`; see [`crate::push::EarlyUpload`]).
    #[serde(skip_serializing_if = "is_zero")]
    pub chunks_sent_early: u64,
    /// Their stored bytes.
    pub bytes_sent: u64,
    /// Chunks downloaded.
    pub chunks_received: u64,
    /// Their stored bytes.
    pub bytes_received: u64,
    /// UDP payload bytes sent (everything on the wire: chunks, ids, manifest, QUIC).
    pub wire_bytes_sent: u64,
    /// UDP payload bytes received.
    pub wire_bytes_received: u64,
    /// UDP datagrams sent: their average size shows what MTU discovery
    /// found on the path (about 1.4 KB on Ethernet, up to 16 KiB on
    /// loopback or jumbo frames).
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
    /// Connections made (1 without retries).
    pub attempts: u32,
    /// Wall time, seconds.
    pub seconds: f64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) chunks: AtomicU64,
    pub(crate) present: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) sent_early: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) wire_sent: AtomicU64,
    pub(crate) wire_received: AtomicU64,
    pub(crate) datagrams_sent: AtomicU64,
    pub(crate) datagrams_received: AtomicU64,
}

impl Counters {
    /// Adds the UDP bytes `session` has moved so far.
    pub(crate) fn add_wire(&self, session: &Session) {
        let (tx, rx) = session.wire_bytes();
        self.wire_sent.fetch_add(tx, Relaxed);
        self.wire_received.fetch_add(rx, Relaxed);
        let (tx, rx) = session.datagrams();
        self.datagrams_sent.fetch_add(tx, Relaxed);
        self.datagrams_received.fetch_add(rx, Relaxed);
    }

    pub(crate) fn stats(&self, attempts: u32, started: Instant) -> TransferStats {
        TransferStats {
            chunks: self.chunks.load(Relaxed),
            chunks_present: self.present.load(Relaxed),
            chunks_sent: self.sent.load(Relaxed),
            chunks_sent_early: self.sent_early.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            chunks_received: self.received.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            wire_bytes_sent: self.wire_sent.load(Relaxed),
            wire_bytes_received: self.wire_received.load(Relaxed),
            datagrams_sent: self.datagrams_sent.load(Relaxed),
            datagrams_received: self.datagrams_received.load(Relaxed),
            attempts,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// A finished push.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// The name on the server.
    pub name: String,
    /// The manifest it points at.
    pub manifest: ManifestId,
    /// The server.
    pub remote: String,
    /// What moved.
    pub stats: TransferStats,
}

/// A finished pull.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    /// The name (the same locally and on the server).
    pub name: String,
    /// The manifest it points at.
    pub manifest: ManifestId,
    /// The server.
    pub remote: String,
    /// What moved.
    pub stats: TransferStats,
}

/// An authenticated connection to a server: one request per stream.
/// Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct Session {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    verifier: Arc<Verifier>,
    remote: String,
    limits: Limits,
    scopes: Scopes,
    request_timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("remote", &self.remote)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Connects, checks the server's certificate and says hello.
    pub async fn connect(remote: &Remote, opts: &Options) -> Result<Session, ClientError> {
        let shown = remote.display();
        let unreachable = |detail: String| ClientError::Unreachable {
            remote: shown.clone(),
            detail,
        };
        let mut addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((remote.host.as_str(), remote.port))
                .await
                .map_err(|e| unreachable(format!("cannot resolve {}: {e}", remote.host)))?
                .collect();
        // IPv4 first: `localhost` often resolves to ::1 first while servers
        // listen on 0.0.0.0.
        addrs.sort_by_key(|a| a.is_ipv6());
        let addr = *addrs
            .first()
            .ok_or_else(|| unreachable(format!("{} has no address", remote.host)))?;
        let verifier = Arc::new(Verifier::new(&remote.trust)?);
        let crypto = tls::client_config(verifier.clone())?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| ClientError::Config(format!("TLS: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = wire::transport(IDLE_TIMEOUT, 0).map_err(ClientError::Config)?;
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = wire::endpoint(bind, None, None)
            .map_err(|e| ClientError::Config(format!("cannot open a UDP socket: {e}")))?;
        endpoint.set_default_client_config(config);
        let server_name = if remote.host.parse::<std::net::IpAddr>().is_ok()
            || rustls::pki_types::ServerName::try_from(remote.host.as_str()).is_ok()
        {
            remote.host.as_str()
        } else {
            "localhost"
        };
        let connecting = endpoint
            .connect(addr, server_name)
            .map_err(|e| ClientError::Config(format!("cannot connect to {shown}: {e}")))?;
        let conn = match tokio::time::timeout(opts.connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(conn_error(&shown, &verifier, e)),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {} s",
                    opts.connect_timeout.as_secs()
                )))
            }
        };
        let mut session = Session {
            conn,
            endpoint,
            verifier,
            remote: shown,
            limits: Limits::default(),
            scopes: Scopes::default(),
            request_timeout: opts.request_timeout,
        };
        let hello = Message::Hello {
            version: proto::VERSION,
            token: remote
                .token
                .as_ref()
                .map(|t| t.secret().to_string())
                .unwrap_or_default(),
        };
        let welcome = session.exchange(&proto::encode(&hello)).await?;
        let (limits, read, write) =
            proto::check_welcome(welcome).map_err(|r| session.refused(r.kind, r.message))?;
        let read: Vec<&str> = read.iter().map(String::as_str).collect();
        let write: Vec<&str> = write.iter().map(String::as_str).collect();
        session.scopes = Scopes::parse(&read, &write).map_err(|e| ClientError::Protocol {
            remote: session.remote.clone(),
            detail: format!("unusable scopes in welcome: {e}"),
        })?;
        session.limits = limits;
        Ok(session)
    }

    /// The server's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// What the token may read and write.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }

    /// UDP bytes (sent, received) on this connection so far.
    pub fn wire_bytes(&self) -> (u64, u64) {
        let s = self.conn.stats();
        (s.udp_tx.bytes, s.udp_rx.bytes)
    }

    /// UDP datagrams (sent, received) on this connection so far.
    pub fn datagrams(&self) -> (u64, u64) {
        let s = self.conn.stats();
        (s.udp_tx.datagrams, s.udp_rx.datagrams)
    }

    pub(crate) fn refused(&self, kind: ErrorKind, message: String) -> ClientError {
        ClientError::Refused {
            remote: self.remote.clone(),
            kind,
            message,
        }
    }

    pub(crate) fn protocol(&self, detail: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            remote: self.remote.clone(),
            detail: detail.into(),
        }
    }

    fn wire_error(&self, e: WireError) -> ClientError {
        match e {
            WireError::Read(quinn::ReadError::ConnectionLost(c))
            | WireError::Write(quinn::WriteError::ConnectionLost(c)) => {
                conn_error(&self.remote, &self.verifier, c)
            }
            WireError::Read(quinn::ReadError::Reset(code))
            | WireError::Write(quinn::WriteError::Stopped(code)) => {
                let kind = u8::try_from(code.into_inner())
                    .map(ErrorKind::from_code)
                    .unwrap_or(ErrorKind::Unknown(0));
                // The server resets streams only while closing the connection.
                if let Some(reason) = self.conn.close_reason() {
                    return conn_error(&self.remote, &self.verifier, reason);
                }
                ClientError::ConnectionLost {
                    remote: self.remote.clone(),
                    detail: format!("the server abandoned a request ({})", kind.as_str()),
                }
            }
            WireError::Ended | WireError::Truncated => {
                if let Some(reason) = self.conn.close_reason() {
                    return conn_error(&self.remote, &self.verifier, reason);
                }
                ClientError::ConnectionLost {
                    remote: self.remote.clone(),
                    detail: e.to_string(),
                }
            }
            other => self.protocol(other.to_string()),
        }
    }

    /// Sends one raw frame on a new stream and reads the reply (for tools
    /// and tests that craft frames; [`Session::request`] is the normal way).
    pub async fn exchange(&self, frame: &[u8]) -> Result<Message, ClientError> {
        self.exchange_frame(vec![bytes::Bytes::copy_from_slice(frame)])
            .await
    }

    async fn exchange_frame(&self, mut frame: Vec<bytes::Bytes>) -> Result<Message, ClientError> {
        let work = async {
            let (send, mut recv) = self
                .conn
                .open_bi()
                .await
                .map_err(|e| conn_error(&self.remote, &self.verifier, e))?;
            let mut send = ResetOnDrop(Some(send));
            let stream = send.0.as_mut().expect("set above");
            wire::write_frame(stream, &mut frame)
                .await
                .map_err(|e| self.wire_error(WireError::Write(e)))?;
            let _ = stream.finish();
            let (reply, _) =
                wire::read_message(&mut recv, self.limits.max_frame.max(proto::MIN_FRAME))
                    .await
                    .map_err(|e| self.wire_error(e))?;
            send.0 = None; // answered: nothing to reset
            Ok(reply)
        };
        match tokio::time::timeout(self.request_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::ConnectionLost {
                remote: self.remote.clone(),
                detail: format!(
                    "no answer to a request within {} s",
                    self.request_timeout.as_secs()
                ),
            }),
        }
    }

    /// Sends a request and returns the reply; an `Error` reply becomes
    /// [`ClientError::Refused`].
    pub async fn request(&self, msg: &Message) -> Result<Message, ClientError> {
        match self.exchange_frame(proto::encode_shared(msg)).await? {
            Message::Error { kind, message } => Err(self.refused(kind, message)),
            reply => Ok(reply),
        }
    }

    /// Adds the connection's UDP bytes to `counters`, then closes it.
    pub(crate) async fn close_counted(self, counters: &Counters) {
        counters.add_wire(&self);
        self.close().await;
    }

    /// Closes the connection politely after a moment for the peer to
    /// acknowledge what is in flight (see [`ResetOnDrop`]).
    pub(crate) async fn settle_and_close(self, counters: &Counters) {
        let settle =
            (self.conn.rtt() * 2 + Duration::from_millis(5)).min(Duration::from_millis(250));
        tokio::time::sleep(settle).await;
        self.close_counted(counters).await;
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// A request's send stream, reset if the request is dropped before its
/// answer (cancelled, timed out): a dropped `SendStream` would otherwise
/// go on sending the rest of its frame, for nothing, and keep the
/// connection's congestion window full when it is closed (quinn then never
/// sends the close; quinn issue #2785).
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(s) = &mut self.0 {
            let _ = s.reset(0u32.into());
        }
    }
}

fn conn_error(remote: &str, verifier: &Verifier, e: quinn::ConnectionError) -> ClientError {
    use quinn::ConnectionError as C;
    let remote = remote.to_string();
    if let Some(detail) = verifier.refused() {
        return ClientError::Certificate { remote, detail };
    }
    match e {
        C::ApplicationClosed(close) => {
            let kind = u8::try_from(close.error_code.into_inner())
                .map(ErrorKind::from_code)
                .unwrap_or(ErrorKind::Unknown(0));
            let message = String::from_utf8_lossy(&close.reason).into_owned();
            if close.error_code.into_inner() == 0 {
                return ClientError::ConnectionLost {
                    remote,
                    detail: format!("closed by the server: {message}"),
                };
            }
            ClientError::Refused {
                remote,
                kind,
                message,
            }
        }
        C::TimedOut => ClientError::Unreachable {
            remote,
            detail: "the connection timed out".into(),
        },
        C::TransportError(t) => {
            let text = t.to_string();
            if text.contains("certificate") || text.contains("crypto") || text.contains("TLS") {
                ClientError::Certificate {
                    remote,
                    detail: text,
                }
            } else {
                ClientError::Protocol {
                    remote,
                    detail: text,
                }
            }
        }
        C::ConnectionClosed(c) => ClientError::ConnectionLost {
            remote,
            detail: format!("closed by the server: {c}"),
        },
        other => ClientError::ConnectionLost {
            remote,
            detail: other.to_string(),
        },
    }
}

/// How long a client waits for a busy server by default.
pub const DEFAULT_BUSY_WAIT: Duration = Duration::from_secs(600);

/// Longest backoff while the server is busy: a freed slot should not sit
/// unused for long, and a refusal costs the server one handshake.
const BUSY_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds, fails persistently, or the retries
/// are used up (or, while the server is busy, `busy_wait` is); waits with
/// exponential backoff between tries, stretched by a random 0–50 % so
/// that jobs refused together do not come back together.
pub(crate) async fn with_retries<T, F, Fut>(
    opts: &Options,
    what: &str,
    mut attempt: F,
) -> Result<(T, u32), ClientError>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let started = tokio::time::Instant::now();
    let mut backoff = opts.backoff;
    let (mut n, mut busy) = (0u32, 0u32);
    loop {
        n += 1;
        let wait = backoff.mul_f64(rand::random_range(1.0..=1.5));
        match attempt(n).await {
            Ok(v) => return Ok((v, n)),
            // Busy has a budget of its own, in time, not in retries.
            Err(e) if e.kind() == Some(ErrorKind::Busy) => {
                if started.elapsed() + wait > opts.busy_wait {
                    return Err(e);
                }
                busy += 1;
                // Said once, then about once a minute: a job may wait long.
                if busy % 12 == 1 {
                    warn!(error = %e, attempt = n, waited_secs = started.elapsed().as_secs(),
                          busy_wait_secs = opts.busy_wait.as_secs(),
                          "{what}: the server is busy; waiting for a slot");
                }
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(opts.max_backoff.min(BUSY_MAX_BACKOFF));
                continue;
            }
            Err(e) if e.is_transient() && n - busy <= opts.retries => {
                warn!(error = %e, attempt = n, wait_ms = wait.as_millis() as u64,
                      "{what} failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
        backoff = (backoff * 2).min(opts.max_backoff);
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Config(format!("a store task failed: {e}")))?
        .map_err(ClientError::Store)
}

/// Distinct chunks of a manifest, in recipe order.
pub(crate) fn distinct(m: &Manifest) -> Vec<ChunkRef> {
    let mut seen = HashSet::new();
    m.chunks().filter(|c| seen.insert(c.id)).copied().collect()
}

pub(crate) fn frame_budget(limits: &Limits, batch_bytes: u64) -> u64 {
    (limits.max_frame as u64 - 4096).min(batch_bytes.max(1))
}

/// Manifests this store holds that are likely similar to `name`'s on the
/// server (the same name first, then names sharing their last or first
/// part): the server may send a delta against one of them.
pub(crate) fn delta_bases(store: &Store, name: &Name) -> Vec<ManifestId> {
    let backend = store.backend();
    let Ok(refs) = store::refs::list(backend, None) else {
        return Vec::new();
    };
    let parts: Vec<&str> = name.parts().collect();
    let score = |n: &Name| {
        if n == name {
            return 4;
        }
        let p: Vec<&str> = n.parts().collect();
        2 * u32::from(p.last() == parts.last()) + u32::from(p.first() == parts.first())
    };
    let mut scored: Vec<(u32, ManifestId)> = refs.iter().map(|(n, id)| (score(n), *id)).collect();
    scored.sort_by_key(|s| std::cmp::Reverse(s.0));
    let mut out: Vec<ManifestId> = Vec::new();
    for (_, id) in scored {
        if out.len() == proto::MAX_HAVE {
            break;
        }
        if !out.contains(&id)
            && backend
                .exists(Kind::Manifest, &id.to_hex())
                .unwrap_or(false)
        {
            out.push(id);
        }
    }
    out
}

/// Fetches `name`'s manifest (stored bytes), as a delta when the server
/// offers one; falls back to the whole manifest if the delta does not
/// rebuild it.
pub(crate) async fn fetch_manifest(
    session: &Session,
    store: &Arc<Store>,
    name: &Name,
    have: Vec<ManifestId>,
) -> Result<(ManifestId, Vec<u8>), ClientError> {
    let request = |have: Vec<ManifestId>| Message::GetManifest {
        name: name.to_string(),
        have,
    };
    match session.request(&request(have.clone())).await? {
        Message::Manifest { id, bytes } => return Ok((id, bytes)),
        Message::ManifestDelta { id, base, delta } if have.contains(&base) => {
            let s = store.clone();
            let rebuilt = blocking(move || {
                let Ok(b) = s.backend().get(Kind::Manifest, &base.to_hex()) else {
                    return Ok(None);
                };
                Ok(if base == id && delta.is_empty() {
                    Some(b)
                } else {
                    crate::delta::apply(&b, &delta, &id)
                })
            })
            .await?;
            if let Some(bytes) = rebuilt {
                return Ok((id, bytes));
            }
            debug!("the manifest delta did not rebuild {id}; fetching it whole");
        }
        other => {
            return Err(session.protocol(format!(
                "unexpected answer to a manifest request: {}",
                other.kind_name()
            )))
        }
    }
    match session.request(&request(Vec::new())).await? {
        Message::Manifest { id, bytes } => Ok((id, bytes)),
        other => Err(session.protocol(format!(
            "unexpected answer to a manifest request: {}",
            other.kind_name()
        ))),
    }
}

/// Pulls the stash `name` from the server into `store` (the node's cache):
/// downloads only the chunks the store lacks, verifies and imports them,
/// and points the local `name` at the server's manifest. Unstash it
/// locally afterwards.
pub async fn pull(
    store: Arc<Store>,
    name: &Name,
    remote: &Remote,
    opts: &Options,
    progress: Arc<dyn Progress>,
) -> Result<PullReport, ClientError> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let (id, attempts) = with_retries(opts, "pull", |_| {
        let (store, counters, progress) = (store.clone(), counters.clone(), progress.clone());
        async move {
            let session = Session::connect(remote, opts).await?;
            let r = pull_once(&session, store, name, opts, &counters, progress).await;
            session.close_counted(&counters).await;
            r
        }
    })
    .await?;
    Ok(PullReport {
        name: name.to_string(),
        manifest: id,
        remote: remote.display(),
        stats: counters.stats(attempts, started),
    })
}

async fn pull_once(
    session: &Session,
    store: Arc<Store>,
    name: &Name,
    opts: &Options,
    counters: &Arc<Counters>,
    progress: Arc<dyn Progress>,
) -> Result<ManifestId, ClientError> {
    if !session.scopes().can_read(name) {
        return Err(session.refused(
            ErrorKind::Forbidden,
            format!(
                "this token may not read {:?} (it reads {})",
                name.as_str(),
                session.scopes().describe_read()
            ),
        ));
    }
    let have = {
        let (s, n) = (store.clone(), name.clone());
        blocking(move || Ok(delta_bases(&s, &n))).await?
    };
    let (id, bytes) = fetch_manifest(session, &store, name, have).await?;
    if ManifestId::of(&bytes) != id {
        return Err(session.protocol(format!("manifest {id} does not match its bytes")));
    }
    let manifest = Manifest::decode(&bytes)
        .map_err(|e| session.protocol(format!("manifest {id} does not decode: {e}")))?;
    let refs = distinct(&manifest);
    counters.chunks.store(refs.len() as u64, Relaxed);
    let lens: HashMap<ChunkId, u32> = refs.iter().map(|c| (c.id, c.len)).collect();
    let needed = {
        let s = store.clone();
        let ids: Vec<ChunkId> = refs.iter().map(|c| c.id).collect();
        blocking(move || s.missing(&ids)).await?
    };
    counters
        .present
        .store((refs.len() - needed.len()) as u64, Relaxed);
    debug!(needed = needed.len(), "chunks to download");

    // The importer that wrote what arrived, for the commit.
    let mut kept: Option<Importer<Arc<Store>>> = None;
    if !needed.is_empty() {
        let limits = session.limits();
        let streams = opts.streams.clamp(1, limits.max_streams as usize);
        let sizes: Vec<u64> = needed.iter().map(|i| lens[i] as u64).collect();
        let budget = frame_budget(&limits, opts.batch_bytes);
        let queue: VecDeque<Vec<ChunkId>> =
            proto::batches(&sizes, limits.max_batch_ids as usize, budget)
                .into_iter()
                .map(|r| needed[r].to_vec())
                .collect();
        let queue = Arc::new(Mutex::new(queue));
        let lens = Arc::new(lens);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<StoredChunk>>(streams * 2);
        // The importer: verifies and writes received chunks in groups, and
        // makes whatever arrived durable even when the download fails, so
        // that a retry or a re-run does not fetch it again. One importer
        // (one lease) for the whole pull: the name is committed with it.
        let import_store = store.clone();
        let import_bytes = opts.import_bytes;
        let importer = tokio::spawn(async move {
            let mut buf: Vec<StoredChunk> = Vec::new();
            let mut held = 0u64;
            let mut importer: Option<Importer<Arc<Store>>> = None;
            let mut result: Result<(), ClientError> = Ok(());
            loop {
                let next = rx.recv().await;
                let last = next.is_none();
                if let Some(chunks) = next {
                    held += chunks.iter().map(|c| c.bytes.len() as u64).sum::<u64>();
                    buf.extend(chunks);
                }
                let due = held >= import_bytes || (last && !buf.is_empty());
                if result.is_ok() && (due || (last && importer.is_some())) {
                    let group = std::mem::take(&mut buf);
                    let (s, open) = (import_store.clone(), importer.take());
                    held = 0;
                    match blocking(move || import_group(s, open, group, last)).await {
                        Ok(i) => importer = Some(i),
                        Err(e) => result = Err(e),
                    }
                }
                if last {
                    break;
                }
            }
            result.map(|()| importer)
        });
        let mut workers = JoinSet::new();
        for _ in 0..streams {
            let (s, queue, lens, tx, counters, progress) = (
                session.clone(),
                queue.clone(),
                lens.clone(),
                tx.clone(),
                counters.clone(),
                progress.clone(),
            );
            workers.spawn(async move {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                    let Some(ids) = next else {
                        return Ok::<(), ClientError>(());
                    };
                    let (chunks, rest) = get_chunks(&s, &ids, |id| lens.get(id).copied()).await?;
                    if !rest.is_empty() {
                        if let Ok(mut q) = queue.lock() {
                            q.push_back(rest);
                        }
                    }
                    let bytes: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
                    counters.received.fetch_add(chunks.len() as u64, Relaxed);
                    counters.bytes_received.fetch_add(bytes, Relaxed);
                    progress.advance(bytes);
                    if tx.send(chunks).await.is_err() {
                        return Ok(()); // the importer failed; its error is reported
                    }
                }
            });
        }
        drop(tx);
        let mut first_err = None;
        while let Some(r) = workers.join_next().await {
            let r = r.unwrap_or_else(|e| Err(session.protocol(format!("task failed: {e}"))));
            if let Err(e) = r {
                if first_err.is_none() {
                    first_err = Some(e);
                    workers.abort_all();
                }
            }
        }
        let imported = importer
            .await
            .map_err(|e| ClientError::Config(format!("the importer failed: {e}")))?;
        match imported {
            Ok(i) => kept = i,
            // A chunk that does not verify is the server's fault.
            Err(e) => {
                return Err(match e {
                    ClientError::Store(StoreError::CorruptChunk { chunk, detail, .. }) => session
                        .refused(
                            ErrorKind::Corrupt,
                            format!(
                            "the server sent chunk {chunk}, which does not match its id ({detail})"
                        ),
                        ),
                    other => other,
                })
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
    }
    let s = store.clone();
    let n = name.clone();
    // Under the lease that wrote the chunks: a collection meanwhile
    // condemned their packs but could not delete them.
    let committed = blocking(move || store::import::commit(&s, kept, &n, &bytes)).await?;
    debug_assert_eq!(committed, id);
    Ok(id)
}

/// Verifies `group` and adds it to `importer` (a new one if `None`); with
/// `last`, makes everything added durable.
fn import_group(
    store: Arc<Store>,
    importer: Option<Importer<Arc<Store>>>,
    group: Vec<StoredChunk>,
    last: bool,
) -> Result<Importer<Arc<Store>>, StoreError> {
    let mut importer = match importer {
        Some(i) => i,
        None => Importer::shared(store)?,
    };
    let verified = match verify_all(group) {
        Ok(v) => v,
        Err(e) => {
            // What arrived before the bad chunk stays.
            importer.flush()?;
            return Err(e);
        }
    };
    for c in &verified {
        importer.add(c)?;
    }
    if last {
        importer.flush()?;
    }
    Ok(importer)
}

/// Asks for chunks and checks the answer: only chunks asked for, of the
/// length the manifest gives (`len_of`), at least one. Returns them and the
/// ids that did not fit in the answer's frame, to ask again.
pub(crate) async fn get_chunks(
    session: &Session,
    ids: &[ChunkId],
    len_of: impl Fn(&ChunkId) -> Option<u32>,
) -> Result<(Vec<StoredChunk>, Vec<ChunkId>), ClientError> {
    let reply = session
        .request(&Message::GetChunks { ids: ids.to_vec() })
        .await?;
    let Message::Chunks { chunks, not_found } = reply else {
        return Err(session.protocol(format!(
            "unexpected answer to a chunk request: {}",
            reply.kind_name()
        )));
    };
    if let Some(first) = not_found.first() {
        return Err(session.refused(
            ErrorKind::NotFound,
            format!(
                "the server's store lacks chunk {first} of {} (and {} more); \
                 its store needs `ferry fsck`",
                ids.len(),
                not_found.len() - 1
            ),
        ));
    }
    if chunks.is_empty() {
        return Err(session.protocol("answered a chunk request with no chunk"));
    }
    let mut left: HashSet<ChunkId> = ids.iter().copied().collect();
    for c in &chunks {
        if !left.remove(&c.id) || len_of(&c.id) != Some(c.raw_len) {
            return Err(session.protocol(format!(
                "sent chunk {} that was not asked for (or of the wrong length)",
                c.id
            )));
        }
    }
    let rest = ids.iter().filter(|i| left.contains(i)).copied().collect();
    Ok((chunks, rest))
}

/// The names on the server under `prefix` that the token may read.
pub async fn list(
    remote: &Remote,
    prefix: Option<&str>,
    opts: &Options,
) -> Result<Vec<Entry>, ClientError> {
    let (entries, _) = with_retries(opts, "list", |_| async move {
        let session = Session::connect(remote, opts).await?;
        let r = session
            .request(&Message::List {
                prefix: prefix.unwrap_or("").to_string(),
            })
            .await;
        session.clone().close().await;
        match r? {
            Message::Listing { entries } => Ok(entries),
            other => Err(session.protocol(format!(
                "unexpected answer to a listing: {}",
                other.kind_name()
            ))),
        }
    })
    .await?;
    Ok(entries
        .into_iter()
        .map(|e| Entry {
            name: e.name,
            manifest: e.manifest,
            created: e.created,
            header: e
                .header
                .and_then(|h| serde_json::from_str::<Header>(&h).ok()),
        })
        .collect())
}

/// What a remote collection did.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteGcReport {
    /// The server.
    pub remote: String,
    /// The server's report. `names_removed` may be cut short when the list
    /// does not fit in one reply: see `names_not_listed`.
    #[serde(flatten)]
    pub report: GcReport,
    /// Names removed that `report.names_removed` does not list.
    pub names_not_listed: u64,
}

/// Runs retention and garbage collection with `gc` on the server's store
/// and returns the server's report. Needs a token with the admin scope;
/// any other is refused ([`ErrorKind::Forbidden`]) and nothing runs. A
/// server already collecting answers [`ErrorKind::Busy`] (retried for up
/// to `opts.busy_wait`, as a full server is). The mark slack of `gc` is not
/// sent: the server uses its own.
pub async fn gc(
    remote: &Remote,
    gc: &GcOptions,
    opts: &Options,
) -> Result<RemoteGcReport, ClientError> {
    let request = GcRequest::from_options(gc);
    request
        .check()
        .map_err(|(_, m)| ClientError::Config(format!("cannot ask for this collection: {m}")))?;
    let ((report, names_not_listed), _) = with_retries(opts, "gc", |_| {
        let request = request.clone();
        async move {
            let mut session = Session::connect(remote, opts).await?;
            session.request_timeout = session.request_timeout.max(GC_TIMEOUT);
            let r = session.request(&Message::Gc { request }).await;
            session.clone().close().await;
            match r? {
                Message::GcReply {
                    report,
                    names_not_listed,
                } => Ok((report, names_not_listed)),
                other => Err(session.protocol(format!(
                    "unexpected answer to a gc request: {}",
                    other.kind_name()
                ))),
            }
        }
    })
    .await?;
    Ok(RemoteGcReport {
        remote: remote.display(),
        report,
        names_not_listed,
    })
}

/// What a remote removal did.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteRemoveReport {
    /// The server.
    pub remote: String,
    /// The names removed, sorted (may be cut short: see `names_not_listed`).
    pub removed: Vec<String>,
    /// Names removed that `removed` does not list.
    pub names_not_listed: u64,
}

/// Which names a remote removal is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// These names, all or nothing: if one does not exist on the server,
    /// none is removed.
    Names(Vec<Name>),
    /// Every name under this prefix (whole parts): a build's scope.
    Prefix(String),
}

/// Removes names on the server. The token must write every name (for a
/// prefix: the whole prefix), or nothing is removed. Their data is freed by
/// the server's next collection. Only connecting is retried: a removal
/// whose answer was lost is not sent twice.
pub async fn remove(
    remote: &Remote,
    removal: &Removal,
    opts: &Options,
) -> Result<RemoteRemoveReport, ClientError> {
    let (session, _) = with_retries(opts, "connect", |_| Session::connect(remote, opts)).await?;
    let msg = match removal {
        Removal::Names(names) => Message::Remove {
            names: names.iter().map(|n| n.to_string()).collect(),
            prefix: None,
        },
        Removal::Prefix(p) => Message::Remove {
            names: Vec::new(),
            prefix: Some(p.clone()),
        },
    };
    let r = session.request(&msg).await;
    session.clone().close().await;
    match r? {
        Message::Removed { names, not_listed } => Ok(RemoteRemoveReport {
            remote: remote.display(),
            removed: names,
            names_not_listed: not_listed,
        }),
        other => Err(session.protocol(format!(
            "unexpected answer to a removal: {}",
            other.kind_name()
        ))),
    }
}

/// Blocking wrappers (each runs its own small runtime), for the CLI.
pub mod blocking {
    use super::*;

    fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| ClientError::Config(format!("cannot start the async runtime: {e}")))
    }

    /// An [`crate::push::EarlyUpload`] on its own runtime: offer it chunks
    /// from the thread that runs the stash, then push. Dropped without a
    /// push (the stash failed), it abandons the upload: see
    /// [`EarlyUpload::abandon`]. Like every blocking wrapper here, use and
    /// drop it outside any async runtime (its drop waits on its own).
    pub struct EarlyUpload {
        runtime: tokio::runtime::Runtime,
        /// `None` once pushed or abandoned.
        upload: Option<crate::push::EarlyUpload>,
    }

    impl EarlyUpload {
        /// Connects and starts uploading what [`EarlyUpload::offer`] gets.
        pub fn start(
            store: Arc<Store>,
            name: &Name,
            remote: &Remote,
            opts: &Options,
        ) -> Result<EarlyUpload, ClientError> {
            let runtime = runtime()?;
            let upload = {
                let _in = runtime.enter();
                crate::push::EarlyUpload::start(store, name, remote, opts)
            };
            Ok(EarlyUpload {
                runtime,
                upload: Some(upload),
            })
        }

        /// See [`crate::push::EarlyUpload::offer`].
        pub fn offer(&self, ids: &[ChunkId]) {
            if let Some(u) = &self.upload {
                u.offer(ids)
            }
        }

        /// See [`crate::push::EarlyUpload::offer_compressed`].
        pub fn offer_compressed(&self, chunks: &[store::repo::StoredChunk]) {
            if let Some(u) = &self.upload {
                u.offer_compressed(chunks)
            }
        }

        /// See [`crate::push::EarlyUpload::push`].
        pub fn push(mut self, progress: Arc<dyn Progress>) -> Result<PushReport, ClientError> {
            let upload = self.upload.take().expect("an upload is pushed once");
            self.runtime.block_on(upload.push(progress))
        }

        /// See [`crate::push::EarlyUpload::abandon`]. Stopping the runtime
        /// with the connection still open would leave the server holding
        /// it until its idle timeout.
        pub fn abandon(mut self) {
            self.abandon_now();
        }

        fn abandon_now(&mut self) {
            if let Some(upload) = self.upload.take() {
                self.runtime.block_on(upload.abandon());
            }
        }
    }

    impl Drop for EarlyUpload {
        fn drop(&mut self) {
            self.abandon_now();
        }
    }

    /// [`super::push`], blocking.
    pub fn push(
        store: Arc<Store>,
        name: &Name,
        remote: &Remote,
        opts: &Options,
        progress: Arc<dyn Progress>,
    ) -> Result<PushReport, ClientError> {
        runtime()?.block_on(super::push(store, name, remote, opts, progress))
    }

    /// [`super::pull`], blocking.
    pub fn pull(
        store: Arc<Store>,
        name: &Name,
        remote: &Remote,
        opts: &Options,
        progress: Arc<dyn Progress>,
    ) -> Result<PullReport, ClientError> {
        runtime()?.block_on(super::pull(store, name, remote, opts, progress))
    }

    /// [`crate::unstash::unstash`], blocking.
    pub fn unstash(
        store: Arc<Store>,
        name: &Name,
        dest: crate::unstash::Destination,
        force: bool,
        remote: &Remote,
        opts: &Options,
        progress: Arc<dyn Progress>,
    ) -> Result<crate::unstash::RemoteUnstashReport, ClientError> {
        runtime()?.block_on(crate::unstash::unstash(
            store, name, dest, force, remote, opts, progress,
        ))
    }

    /// [`super::list`], blocking.
    pub fn list(
        remote: &Remote,
        prefix: Option<&str>,
        opts: &Options,
    ) -> Result<Vec<Entry>, ClientError> {
        runtime()?.block_on(super::list(remote, prefix, opts))
    }

    /// [`super::remove`], blocking.
    pub fn remove(
        remote: &Remote,
        removal: &Removal,
        opts: &Options,
    ) -> Result<RemoteRemoveReport, ClientError> {
        runtime()?.block_on(super::remove(remote, removal, opts))
    }

    /// [`super::gc`], blocking.
    pub fn gc(
        remote: &Remote,
        gc: &GcOptions,
        opts: &Options,
    ) -> Result<RemoteGcReport, ClientError> {
        runtime()?.block_on(super::gc(remote, gc, opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = |u: &str| Remote::parse_url(u).unwrap();
        assert_eq!(ok("quic://h:1"), ("h".into(), 1));
        assert_eq!(ok("quic://ferry.ci:7443/"), ("ferry.ci".into(), 7443));
        assert_eq!(ok("quic://h"), ("h".into(), DEFAULT_PORT));
        assert_eq!(ok("quic://[::1]:9"), ("::1".into(), 9));
        assert_eq!(ok("quic://[::1]"), ("::1".into(), DEFAULT_PORT));
        for bad in [
            "h:1",
            "http://h:1",
            "quic://",
            "quic://h:0",
            "quic://h:x",
            "quic://h:1/path",
            "quic://[::1",
            "quic://u@h:1",
            "quic://:5",
        ] {
            let e = Remote::parse_url(bad).unwrap_err().to_string();
            assert!(e.contains("quic://HOST:PORT"), "{bad}: {e}");
        }
    }
}
