//! `ferry serve`: the QUIC server. Thin glue: it accepts connections and
//! streams, reads frames, asks [`ServerSession`] what each means, calls the
//! store on a blocking thread, and writes the answer.
//!
//! A peer that breaks a limit (frame size, batch size, the request
//! deadline, malformed messages) is cut off with an error; everyone else
//! goes on being served. Until it is welcomed a peer may open one stream
//! and send a small hello; an address that fails to authenticate too often
//! is refused for a while ([`AuthThrottle`]). A connection takes one of the
//! `max_connections` slots only once its handshake is done.
//!
//! On shutdown the server stops accepting, lets in-flight requests finish
//! (a commit is one store call, so a name is never half-updated), then
//! closes every connection with "shutting down", which clients treat as a
//! reason to retry.
//!
//! Garbage collection runs on the server's store on a schedule (`[gc]` in
//! the config) and on demand (`ferry gc --remote`, admin tokens), one
//! collection at a time, on a blocking thread: it never blocks serving.

use crate::auth::{AuthThrottle, Grant, PendingHellos, Scopes, TokenTable};
use crate::config::{ConfigError, LimitsConfig, ServerConfig, TokenConfig};
use crate::metrics::{self, GcTrigger, Metrics};
use crate::proto::{self, Action, ErrorKind, GcRequest, ListEntry, Message, Reject, ServerSession};
use crate::tls::{self, TlsError};
use crate::wire::{self, WireError};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::backend::Kind;
use store::gc::{GcOptions, GcReport};
use store::import::{verify_all, Importer, VerifiedChunk};
use store::manifest::{Manifest, ManifestError};
use store::name::Name;
use store::refs::RefError;
use store::repo::{Store, StoreError};
use store::ManifestId;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The certificate or key.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An address could not be bound.
    #[error("cannot listen on {what} {addr}: {error}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Largest hello frame (a token and a version).
const HELLO_MAX_FRAME: u32 = 64 << 10;
/// How long a new connection may take to finish its handshake, and then
/// to say hello.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes an unauthenticated peer may have in flight: a hello and some
/// slack. Raised to [`wire::RECEIVE_WINDOW`] after the welcome.
const PRE_AUTH_WINDOW: u32 = 2 * HELLO_MAX_FRAME;

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Stop accepting, finish in-flight requests, then close.
    Graceful,
    /// Close every connection now (like a crash, minus the process).
    Now,
}

/// Stops a running [`Server`], or replaces its tokens.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    tx: Arc<watch::Sender<Stop>>,
    reloader: Arc<Reloader>,
}

/// The tokens in effect; connections watch it for reloads.
type TokenWatch = watch::Sender<Arc<TokenTable>>;

/// Replaces a running server's tokens ([`ServerHandle::reload`]).
#[derive(Debug)]
struct Reloader {
    tokens: Arc<TokenWatch>,
    /// The config in effect: as the server started, with the tokens of
    /// the last reload.
    config: Mutex<ServerConfig>,
    metrics: Arc<Metrics>,
}

/// What a [`ServerHandle::reload`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// `[[token]]` entries in effect now.
    pub tokens: usize,
    /// Labels (`name`) of tokens the new config added.
    pub added: Vec<String>,
    /// Labels it no longer has: their sessions are closed.
    pub removed: Vec<String>,
    /// Labels whose entries changed (hash, scopes, admin or connection
    /// limit); sessions whose scopes changed are closed.
    pub changed: Vec<String>,
    /// Other keys that differ from the config in effect: they take effect
    /// only at a restart, and were left as they were.
    pub needs_restart: Vec<&'static str>,
}

impl Reloaded {
    /// The token labels added, removed and changed between two configs.
    fn between(old: &[TokenConfig], new: &[TokenConfig]) -> Reloaded {
        use std::collections::BTreeMap;
        let by_label = |tokens: &[TokenConfig]| {
            let mut m: BTreeMap<String, Vec<TokenConfig>> = BTreeMap::new();
            for t in tokens {
                m.entry(t.name.clone()).or_default().push(t.clone());
            }
            m
        };
        let (old, new) = (by_label(old), by_label(new));
        let mut r = Reloaded::default();
        for (label, entries) in &new {
            match old.get(label) {
                None => r.added.push(label.clone()),
                Some(before) if before != entries => r.changed.push(label.clone()),
                Some(_) => {}
            }
        }
        r.removed = old
            .keys()
            .filter(|l| !new.contains_key(*l))
            .cloned()
            .collect();
        r
    }
}

impl ServerHandle {
    /// Graceful: stop accepting, let in-flight requests finish (up to the
    /// grace period), then close connections with "shutting down".
    pub fn shutdown(&self) {
        self.tx.send_if_modified(|s| {
            let change = *s == Stop::Running;
            if change {
                *s = Stop::Graceful;
            }
            change
        });
    }

    /// Immediate: close every connection now.
    pub fn stop_now(&self) {
        self.tx.send_replace(Stop::Now);
    }

    /// Replaces the server's tokens with those of `cfg` (`[[token]]`),
    /// after checking the whole config as at start: a config that does not
    /// check changes nothing. New connections are authenticated against
    /// the new tokens at once. A session whose token is gone, or whose
    /// scopes changed, is closed (its client gets "unauthenticated" saying
    /// why); every other session goes on. The other keys are not reloaded:
    /// those that differ are listed in [`Reloaded::needs_restart`].
    pub fn reload(&self, cfg: &ServerConfig) -> Result<Reloaded, ConfigError> {
        let r = &self.reloader;
        let table = match cfg.checked_token_table() {
            Ok(table) => table,
            Err(e) => {
                r.metrics.config_reload_failures.fetch_add(1, Relaxed);
                return Err(e);
            }
        };
        let mut current = r.config.lock().unwrap_or_else(|e| e.into_inner());
        let reloaded = Reloaded {
            tokens: table.len(),
            needs_restart: current.restart_only_changes(cfg),
            ..Reloaded::between(&current.tokens, &cfg.tokens)
        };
        r.metrics.token_connections.retain_tokens(&table);
        r.tokens.send_replace(Arc::new(table));
        current.tokens = cfg.tokens.clone();
        r.metrics.config_reloads.fetch_add(1, Relaxed);
        Ok(reloaded)
    }
}

/// The collection running now, if any: what started it, and when.
type GcSlot = watch::Sender<Option<(GcTrigger, Instant)>>;

struct Shared {
    store: Arc<Store>,
    tokens: Arc<TokenWatch>,
    limits: LimitsConfig,
    metrics: Arc<Metrics>,
    connections: AtomicU32,
    /// Failed authentications by address.
    throttle: AuthThrottle,
    /// Connections by address that have not said hello yet.
    pending_hellos: Arc<PendingHellos>,
    /// At most one collection at a time, whoever starts it.
    gc: Arc<GcSlot>,
}

/// Holds the collection slot; frees it when dropped (on the blocking
/// thread, once the collection has really ended).
struct GcTicket {
    slot: Arc<GcSlot>,
    metrics: Arc<Metrics>,
}

impl Drop for GcTicket {
    fn drop(&mut self) {
        self.metrics.gc_running.store(0, Relaxed);
        self.slot.send_replace(None);
    }
}

/// Why a collection did not run or did not finish.
#[derive(Debug)]
enum GcFailure {
    /// Another collection is running.
    Busy {
        /// What started it.
        trigger: GcTrigger,
        /// How long it has been running.
        running_for: Duration,
    },
    /// The store failed.
    Store(StoreError),
}

impl Shared {
    /// Takes the collection slot, or says who holds it.
    fn start_gc(&self, trigger: GcTrigger) -> Result<GcTicket, GcFailure> {
        let mut busy = None;
        let taken = self.gc.send_if_modified(|s| match s {
            Some((t, at)) => {
                busy = Some(GcFailure::Busy {
                    trigger: *t,
                    running_for: at.elapsed(),
                });
                false
            }
            None => {
                *s = Some((trigger, Instant::now()));
                true
            }
        });
        if !taken {
            return Err(busy.expect("set when the slot is taken"));
        }
        self.metrics.gc_running.store(1, Relaxed);
        Ok(GcTicket {
            slot: self.gc.clone(),
            metrics: self.metrics.clone(),
        })
    }
}

/// Runs one collection with `opts` on a blocking thread, unless another
/// one is running; logs and counts the outcome. The in-memory index of the
/// server's store is brought up to date afterwards, so that no download
/// reads a pack the collector deleted.
async fn run_gc(
    shared: &Shared,
    opts: GcOptions,
    trigger: GcTrigger,
    by: &str,
) -> Result<GcReport, GcFailure> {
    let ticket = shared.start_gc(trigger)?;
    let store = shared.store.clone();
    let started = Instant::now();
    info!(
        trigger = trigger.as_str(),
        by,
        policies = opts.policies.len(),
        grace_secs = opts.grace.as_secs(),
        repack_below = opts.repack_below,
        dry_run = opts.dry_run,
        "garbage collection started"
    );
    let outcome = tokio::task::spawn_blocking(move || {
        let _ticket = ticket;
        let report = store.gc(&opts);
        if let Err(e) = store.refresh() {
            warn!(error = %e, "cannot re-read the store's index after garbage collection");
        }
        report
    })
    .await
    .unwrap_or_else(|e| {
        Err(StoreError::Output {
            what: "the garbage collection task".into(),
            error: std::io::Error::other(e.to_string()),
        })
    });
    let metrics = &shared.metrics;
    match outcome {
        Ok(report) => {
            metrics.gc_run(
                trigger,
                report.bytes_freed,
                if report.dry_run {
                    0
                } else {
                    report.names_removed.len() as u64
                },
            );
            for r in &report.names_removed {
                if report.dry_run {
                    debug!(name = %r.name, reason = %r.reason, "retention would remove");
                } else {
                    info!(name = %r.name, reason = %r.reason, "removed by retention");
                }
            }
            info!(
                trigger = trigger.as_str(),
                by,
                dry_run = report.dry_run,
                names_removed = report.names_removed.len(),
                names_kept = report.names_kept,
                live_chunks = report.live_chunks,
                packs_condemned = report.packs_condemned,
                packs_repacked = report.packs_repacked,
                packs_deleted = report.packs_deleted,
                packs_uncondemned = report.packs_uncondemned,
                manifests_deleted = report.manifests_deleted,
                bytes_freed = report.bytes_freed,
                bytes_pending = report.bytes_pending,
                blocked_by_leases = report.blocked_by_leases,
                bytes_freeable_now = report.bytes_freeable_now,
                leftovers_removed = report.leftovers_removed,
                seconds = started.elapsed().as_secs_f64(),
                "garbage collection finished"
            );
            Ok(report)
        }
        Err(e) => {
            metrics.gc_error(trigger);
            error!(trigger = trigger.as_str(), by, error = %e,
                   "garbage collection failed; the store stays consistent, the next run carries on");
            Err(GcFailure::Store(e))
        }
    }
}

/// Runs a collection every `interval` until the server stops. A tick
/// while another collection runs is skipped.
async fn gc_schedule(
    shared: Arc<Shared>,
    interval: Duration,
    opts: GcOptions,
    mut rx: watch::Receiver<Stop>,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = rx.wait_for(|s| *s != Stop::Running) => return,
            _ = ticks.tick() => {}
        }
        if let Err(GcFailure::Busy {
            trigger,
            running_for,
        }) = run_gc(&shared, opts.clone(), GcTrigger::Schedule, "schedule").await
        {
            info!(
                running = trigger.as_str(),
                running_secs = running_for.as_secs(),
                "scheduled garbage collection skipped: another one is running"
            );
        }
    }
}

/// What [`check`] found in a config: what a server started from it would
/// use. Nothing is created or bound to find it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigCheck {
    /// UDP address it would serve on.
    pub listen: SocketAddr,
    /// Where the metrics would be served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The store directory.
    pub store: std::path::PathBuf,
    /// Whether the store directory exists (else it is made at start).
    pub store_exists: bool,
    /// SHA-256 fingerprint of the certificate (what clients pin); `None`:
    /// neither certificate nor key exists yet, a self-signed pair is
    /// generated at the first start.
    pub certificate: Option<String>,
    /// The tokens, in config order.
    pub tokens: Vec<TokenCheck>,
    /// How often collections run on a schedule, if they do.
    pub gc_interval_secs: Option<u64>,
    /// `[[gc.retention]]` rules.
    pub retention_rules: usize,
}

/// One `[[token]]` entry, as [`check`] reports it (never the secret).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenCheck {
    /// Its label.
    pub name: String,
    /// Readable prefixes, as scopes (`main/*`; `*`: all).
    pub read: Vec<String>,
    /// Writable prefixes.
    pub write: Vec<String>,
    /// May run `ferry gc --remote`.
    pub admin: bool,
    /// Its own connection limit, if any.
    pub max_connections: Option<u32>,
}

/// Checks `cfg` as [`Server::bind`] would, without binding, creating or
/// generating anything: the limits, tokens and schedule, and a certificate
/// and key that exist (readable, PEM, the key matching the certificate).
/// For `ferry serve --check` before a start or a reload.
pub fn check(cfg: &ServerConfig) -> Result<ConfigCheck, ServerError> {
    cfg.validate()?;
    let certificate = if cfg.cert.exists() || cfg.key.exists() {
        // Both exist (load_or_generate generates only when neither does).
        let identity = tls::load_or_generate(&cfg.cert, &cfg.key, &cfg.cert_names)?;
        tls::server_config(&identity)?;
        Some(identity.fingerprint())
    } else {
        None
    };
    let tokens = cfg
        .tokens
        .iter()
        .map(|t| {
            let scopes = t.scopes()?;
            Ok(TokenCheck {
                name: t.name.clone(),
                read: scopes.read.iter().map(|s| s.to_string()).collect(),
                write: scopes.write.iter().map(|s| s.to_string()).collect(),
                admin: scopes.admin,
                max_connections: t.max_connections,
            })
        })
        .collect::<Result<_, ConfigError>>()?;
    Ok(ConfigCheck {
        listen: cfg.listen,
        metrics_listen: cfg.metrics_listen,
        store: cfg.store.clone(),
        store_exists: cfg.store.is_dir(),
        certificate,
        tokens,
        gc_interval_secs: cfg.gc.interval.map(|i| i.as_secs()),
        retention_rules: cfg.gc.retention.len(),
    })
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    metrics_listener: Option<tokio::net::TcpListener>,
    metrics_addr: Option<SocketAddr>,
    fingerprint: String,
    generated: bool,
    stop: Arc<watch::Sender<Stop>>,
    reloader: Arc<Reloader>,
    /// `[gc]`: how often, and with what options.
    gc_schedule: Option<(Duration, GcOptions)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.endpoint.local_addr().ok())
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store, loads (or generates) the certificate and binds the
    /// UDP socket and the metrics listener. Must run inside a tokio runtime.
    pub async fn bind(cfg: &ServerConfig) -> Result<Server, ServerError> {
        let tokens = cfg.checked_token_table()?;
        if tokens.is_empty() {
            warn!("no [[token]] in the config: every client will be refused");
        }
        let identity = tls::load_or_generate(&cfg.cert, &cfg.key, &cfg.cert_names)?;
        let crypto = tls::server_config(&identity)?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = wire::transport(
            cfg.limits.idle_timeout(),
            cfg.limits.max_streams_per_connection,
        )
        .map_err(|problem| ConfigError::Value {
            key: "limits.idle_timeout_secs",
            problem,
        })?;
        // Until it is welcomed, a peer may open one stream (for its hello)
        // and have little in flight, so that unauthenticated peers cannot
        // make the server buffer many streams' worth of data. Raised for
        // each connection after the welcome.
        transport
            .max_concurrent_bidi_streams(1u32.into())
            .receive_window(PRE_AUTH_WINDOW.into());
        server_config.transport_config(Arc::new(transport));
        let store = {
            let dir = cfg.store.clone();
            tokio::task::spawn_blocking(move || Store::open(dir))
                .await
                .map_err(|e| ServerError::Runtime(std::io::Error::other(e)))??
        };
        let endpoint = wire::endpoint(
            cfg.listen,
            Some(server_config),
            Some(tls::RestartKeys::of(&identity)),
        )
        .map_err(|error| ServerError::Bind {
            what: "QUIC (UDP)",
            addr: cfg.listen,
            error,
        })?;
        let (metrics_listener, metrics_addr) = match cfg.metrics_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await.map_err(|error| {
                    ServerError::Bind {
                        what: "metrics (TCP)",
                        addr,
                        error,
                    }
                })?;
                let a = l.local_addr().ok();
                (Some(l), a)
            }
            None => (None, None),
        };
        let (tx, _) = watch::channel(Stop::Running);
        let metrics = Arc::new(Metrics::for_tokens(&tokens));
        let tokens = Arc::new(watch::channel(Arc::new(tokens)).0);
        let reloader = Arc::new(Reloader {
            tokens: tokens.clone(),
            config: Mutex::new(cfg.clone()),
            metrics: metrics.clone(),
        });
        Ok(Server {
            endpoint,
            reloader,
            shared: Arc::new(Shared {
                store: Arc::new(store),
                tokens,
                limits: cfg.limits.clone(),
                metrics: metrics.clone(),
                connections: AtomicU32::new(0),
                pending_hellos: PendingHellos::new(cfg.limits.max_unauthenticated_per_address),
                throttle: AuthThrottle::new(
                    cfg.limits.max_auth_failures,
                    cfg.limits.auth_failure_window(),
                ),
                gc: Arc::new(watch::channel(None).0),
            }),
            metrics_listener,
            metrics_addr,
            fingerprint: identity.fingerprint(),
            generated: identity.generated,
            stop: Arc::new(tx),
            gc_schedule: cfg.gc.interval.map(|i| (i, cfg.gc.options())),
        })
    }

    /// The UDP address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `sha256:<hex>` of the server's certificate (what clients pin).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether the certificate was generated by this start.
    pub fn generated_certificate(&self) -> bool {
        self.generated
    }

    /// The server's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// A handle to stop the server.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            tx: self.stop.clone(),
            reloader: self.reloader.clone(),
        }
    }

    /// Serves until stopped through a [`ServerHandle`].
    pub async fn run(self) -> Result<(), ServerError> {
        let Server {
            endpoint,
            shared,
            metrics_listener,
            stop,
            gc_schedule: schedule,
            ..
        } = self;
        let metrics_task = metrics_listener.map(|l| {
            let disk = metrics::Disk {
                reserve: shared.limits.min_free_bytes,
                store: shared.store.clone(),
            };
            tokio::spawn(metrics::serve(l, shared.metrics.clone(), Arc::new(disk)))
        });
        let gc_task = schedule.map(|(interval, opts)| {
            info!(
                interval_secs = interval.as_secs(),
                policies = opts.policies.len(),
                grace_secs = opts.grace.as_secs(),
                "garbage collection scheduled"
            );
            tokio::spawn(
                gc_schedule(shared.clone(), interval, opts, stop.subscribe())
                    .instrument(tracing::info_span!("gc")),
            )
        });
        let mut rx = stop.subscribe();
        let mut conns = JoinSet::new();
        info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving");
        loop {
            tokio::select! {
                _ = rx.wait_for(|s| *s != Stop::Running) => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let Some(incoming) = validated(incoming, &shared) else {
                            continue;
                        };
                        // Counted here, not in the task: the next packet's
                        // decision must already see this handshake.
                        let handshake = Counted::start(&shared.metrics, |m| &m.handshakes);
                        let shared = shared.clone();
                        let rx = stop.subscribe();
                        let peer = incoming.remote_address();
                        conns.spawn(
                            handle_incoming(incoming, handshake, shared, rx)
                                .instrument(tracing::info_span!("conn", %peer)),
                        );
                    }
                    None => break,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        endpoint.set_server_config(None);
        let graceful = *stop.borrow() != Stop::Now;
        info!(graceful, "shutting down");
        let until = tokio::time::Instant::now()
            + if graceful {
                shared.limits.shutdown_grace() + Duration::from_secs(1)
            } else {
                Duration::ZERO
            };
        if graceful {
            let drain = async { while conns.join_next().await.is_some() {} };
            if tokio::time::timeout_at(until, drain).await.is_err() {
                warn!("requests still running after the grace period; closing");
            }
        }
        // A collection cannot be interrupted; it is given the rest of the
        // grace period. One cut short by the exit leaves a consistent store
        // and the next run finishes the job.
        let mut gc_rx = shared.gc.subscribe();
        if gc_rx.borrow().is_some() {
            info!("waiting for the running garbage collection to finish");
            if tokio::time::timeout_at(until, gc_rx.wait_for(|s| s.is_none()))
                .await
                .is_err()
            {
                warn!(
                    "garbage collection still running after the grace period; stopping anyway \
                     (the store stays consistent and the next collection finishes the job)"
                );
            }
        }
        if let Some(t) = gc_task {
            t.abort();
        }
        conns.abort_all();
        while conns.join_next().await.is_some() {}
        endpoint.close(
            ErrorKind::ShuttingDown.code().into(),
            b"the server is shutting down; try again",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        if let Some(t) = metrics_task {
            t.abort();
        }
        info!("stopped");
        Ok(())
    }
}

/// Closes `conn` with a refusal (the close reason carries the message)
/// and counts the error.
fn cut_off(conn: &quinn::Connection, shared: &Shared, kind: ErrorKind, message: &str) {
    shared.metrics.error(kind);
    close_with(conn, kind, message);
}

/// Closes `conn` with a refusal already counted.
fn close_with(conn: &quinn::Connection, kind: ErrorKind, message: &str) {
    warn!(kind = kind.as_str(), %message, "cutting the peer off");
    let mut reason = message.as_bytes().to_vec();
    reason.truncate(1000);
    conn.close(kind.code().into(), &reason);
}

/// One unit of a gauge of the metrics (a session, a handshake, a request
/// in flight), given back when dropped.
struct Counted {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &AtomicI64,
}

impl Counted {
    fn start(metrics: &Arc<Metrics>, gauge: fn(&Metrics) -> &AtomicI64) -> Counted {
        gauge(metrics).fetch_add(1, Relaxed);
        Counted {
            metrics: metrics.clone(),
            gauge,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Relaxed);
    }
}

/// One of the `max_connections` slots, held while the connection lives.
struct ConnSlot<'a>(&'a Shared);

impl<'a> ConnSlot<'a> {
    /// Takes a slot; returns it and how many are taken now.
    fn take(shared: &'a Shared) -> (ConnSlot<'a>, u32) {
        let count = shared.connections.fetch_add(1, Relaxed) + 1;
        shared.metrics.connections_open.fetch_add(1, Relaxed);
        (ConnSlot(shared), count)
    }
}

impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
        self.0.metrics.connections_open.fetch_sub(1, Relaxed);
    }
}

/// `incoming`, unless it must first prove its address: once
/// `validate_addresses_above` handshakes are in progress, a peer whose address
/// is not yet validated is sent a QUIC Retry and nothing is kept for it.
/// A real client comes back at once with the Retry's token (an address
/// validated); a forged source address never does.
fn validated(incoming: quinn::Incoming, shared: &Shared) -> Option<quinn::Incoming> {
    let in_progress = shared.metrics.handshakes.load(Relaxed);
    let busy = in_progress >= i64::from(shared.limits.validate_addresses_above);
    if !busy || incoming.remote_address_validated() || !incoming.may_retry() {
        return Some(incoming);
    }
    shared.metrics.address_validations.fetch_add(1, Relaxed);
    match incoming.retry() {
        Ok(()) => None,
        Err(e) => Some(e.into_incoming()),
    }
}

/// Whole seconds, rounded up (so that "try again in 0 s" never happens).
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The refusal of a connection past its token's own limit.
fn token_busy(grant: &Grant) -> Reject {
    Reject {
        kind: ErrorKind::Busy,
        message: format!(
            "token {:?} is at its connection limit (max_connections = {} in its \
             [[token]] entry); try again later",
            grant.label,
            grant.max_connections.unwrap_or_default()
        ),
        fatal: true,
    }
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    handshake_counted: Counted,
    shared: Arc<Shared>,
    rx: watch::Receiver<Stop>,
) {
    let limits = &shared.limits;
    let deadline = limits.request_deadline();
    // A handshake takes no connection slot: half-open handshakes (one
    // packet each, from any address) must not lock real clients out.
    let handshake = async { incoming.accept()?.await };
    let conn = tokio::time::timeout(deadline.min(HELLO_DEADLINE), handshake).await;
    drop(handshake_counted);
    let conn = match conn {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!("handshake timed out");
            return;
        }
    };
    // Before a slot is taken: a host's silent connections past its share
    // take none.
    let ip = conn.remote_address().ip();
    let Some(pending_hello) = shared.pending_hellos.take(ip) else {
        shared.metrics.connections.fetch_add(1, Relaxed);
        shared.metrics.error(ErrorKind::Busy);
        let message = format!(
            "too many connections from {} are waiting to say hello ({} at most: \
             limits.max_unauthenticated_per_address); try again shortly",
            AuthThrottle::key(ip),
            shared.pending_hellos.max()
        );
        // Not at warn: a host that floods must not flood the log too.
        debug!(%message, "refusing a connection");
        conn.close(ErrorKind::Busy.code().into(), message.as_bytes());
        return;
    };
    let (_slot, count) = ConnSlot::take(&shared);
    shared.metrics.connections.fetch_add(1, Relaxed);
    if count > limits.max_connections {
        cut_off(
            &conn,
            &shared,
            ErrorKind::Busy,
            &format!(
                "the server is busy ({} connections); try again later",
                limits.max_connections
            ),
        );
        return;
    }

    // An address that failed to authenticate too often is refused whatever
    // token it brings now: otherwise guessing would go on at full speed.
    // Not logged at warn: the lockout itself was, once.
    if let Some(left) = shared.throttle.refused_for(ip, Instant::now()) {
        shared.metrics.auth_refused.fetch_add(1, Relaxed);
        shared.metrics.error(ErrorKind::Unauthenticated);
        let message = format!(
            "too many failed authentications from {} ({} within {} s): it is refused for \
             another {} s; check the client's token (--token-file or FERRY_TOKEN_FILE) \
             and that its SHA-256 is in the server's config",
            AuthThrottle::key(ip),
            shared.throttle.max_failures(),
            shared.throttle.window().as_secs(),
            ceil_secs(left)
        );
        debug!(%message, "refusing a connection");
        conn.close(ErrorKind::Unauthenticated.code().into(), message.as_bytes());
        return;
    }

    // Hello, on the first stream.
    let started = Instant::now();
    let first = tokio::time::timeout(deadline.min(HELLO_DEADLINE), async {
        let (send, mut recv) = conn.accept_bi().await.map_err(WireError::from_conn)?;
        // Before authentication only a small frame is accepted.
        let (msg, n) = wire::read_message(&mut recv, HELLO_MAX_FRAME).await?;
        Ok::<_, WireError>((send, msg, n))
    })
    .await;
    let (mut send, msg, n) = match first {
        Ok(Ok(first)) => first,
        Ok(Err(e)) => {
            reject_wire(&conn, &shared, e);
            return;
        }
        Err(_) => {
            cut_off(
                &conn,
                &shared,
                ErrorKind::Deadline,
                "no hello within the request deadline",
            );
            return;
        }
    };
    shared.metrics.bytes_in.fetch_add(n as u64, Relaxed);
    let mut session = ServerSession::new(limits.proto());
    let mut token_hold = None;
    // Watched from before the hello: a reload after it is not missed.
    let mut tokens = shared.tokens.subscribe();
    let table = tokens.borrow_and_update().clone();
    let hello = session.on_hello(msg, &table).and_then(|welcome| {
        let grant = session.grant().expect("welcomed sessions have a grant");
        // Held (and counted in the metrics) while the connection lives.
        token_hold = shared.metrics.token_connections.take(grant);
        match token_hold {
            Some(_) => Ok(welcome),
            None => Err(token_busy(grant)),
        }
    });
    match hello {
        Ok(welcome) => {
            // Welcomed: the full stream count and window (before the
            // welcome, so that the update travels with it).
            conn.set_max_concurrent_bi_streams(limits.max_streams_per_connection.into());
            conn.set_receive_window(wire::RECEIVE_WINDOW.into());
            if let Ok(n) = wire::write_message(&mut send, &welcome).await {
                shared.metrics.bytes_out.fetch_add(n as u64, Relaxed);
            }
            let _ = send.finish();
        }
        Err(rej) => {
            if rej.kind == ErrorKind::Unauthenticated {
                shared.metrics.auth_failures.fetch_add(1, Relaxed);
                if let Some(refused) = shared.throttle.failed(ip, Instant::now()) {
                    warn!(
                        address = %AuthThrottle::key(ip),
                        failures = shared.throttle.max_failures(),
                        window_secs = shared.throttle.window().as_secs(),
                        refused_secs = ceil_secs(refused),
                        "too many failed authentications: refusing this address"
                    );
                }
            }
            if wire::write_message(&mut send, &rej.to_message())
                .await
                .is_ok()
            {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            }
            cut_off(&conn, &shared, rej.kind, &rej.message);
            return;
        }
    }
    drop(pending_hello);
    shared.metrics.observe("hello", started.elapsed());
    let label = session.grant().map(|g| g.label.clone()).unwrap_or_default();
    info!(token = %label, "session started");
    let _session_counted = Counted::start(&shared.metrics, |m| &m.active_sessions);
    let session = Arc::new(Mutex::new(session));
    let uploads = Uploads::default();

    let mut streams = JoinSet::new();
    let mut rx = rx;
    let mut revoked = false;
    loop {
        tokio::select! {
            // In this order: a reload is seen before any request that
            // arrived after it.
            biased;
            _ = rx.wait_for(|s| *s != Stop::Running) => break,
            Ok(()) = tokens.changed() => {
                let table = tokens.borrow_and_update().clone();
                let changed = session
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .on_tokens_changed(&table);
                if let Err(rej) = changed {
                    shared.metrics.sessions_revoked.fetch_add(1, Relaxed);
                    cut_off(&conn, &shared, rej.kind, &rej.message);
                    revoked = true;
                    break;
                }
            }
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    streams.spawn(
                        handle_stream(
                            conn.clone(),
                            shared.clone(),
                            session.clone(),
                            uploads.clone(),
                            send,
                            recv,
                        )
                        .in_current_span(),
                    );
                }
                Err(e) => {
                    debug!(error = %e, "connection ended");
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    let stop = if revoked { Stop::Running } else { *rx.borrow() };
    if stop == Stop::Graceful {
        // Let in-flight requests finish; the server's loop bounds the wait.
        while streams.join_next().await.is_some() {}
    }
    if stop != Stop::Running {
        conn.close(
            ErrorKind::ShuttingDown.code().into(),
            b"the server is shutting down; try again",
        );
    }
    streams.abort_all();
    // What this connection uploaded becomes durable even if it never
    // committed: a client that resumes after a crash finds it there.
    let flushed = blocking(move || uploads.flush()).await;
    if let Err(e) = flushed {
        error!(error = %e, "could not write the chunks a connection uploaded");
    }
    // The path as QUIC saw it: losses and small datagrams are what slow a
    // transfer down (docs/remote.md, "UDP").
    let path = conn.stats().path;
    info!(
        token = %label,
        mtu = path.current_mtu,
        lost_packets = path.lost_packets,
        congestion_events = path.congestion_events,
        rtt_us = conn.rtt().as_micros() as u64,
        "session ended"
    );
}

/// Chunks uploaded on one connection: verified, appended to one pack of
/// the store's target size (not a pack per request), made durable when the
/// pack is full, before a commit on the connection, and when it ends.
#[derive(Clone, Default)]
struct Uploads(Arc<Mutex<Option<Importer<Arc<Store>>>>>);

impl Uploads {
    /// Adds verified chunks; returns how many were new to the store.
    fn add(&self, store: &Arc<Store>, chunks: &[VerifiedChunk]) -> Result<u64, StoreError> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(Importer::shared(store.clone())?);
        }
        let importer = slot.as_mut().expect("set above");
        let before = importer.added();
        for c in chunks {
            importer.add(c)?;
        }
        Ok(importer.added() - before)
    }

    /// Commits `name` → `manifest`. What this connection uploaded is made
    /// durable first, and a collection that condemned it meanwhile (its
    /// packs were sealed but not named yet) does not make the commit fail:
    /// the importer's lease kept them (see `Importer::commit`). Lets go of
    /// the importer and its lease afterwards.
    fn commit(
        &self,
        store: &Store,
        name: &Name,
        manifest: &[u8],
    ) -> Result<ManifestId, StoreError> {
        let importer = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        store::import::commit(store, importer, name, manifest)
    }

    /// Makes every uploaded chunk durable, and lets go of the importer and
    /// its lease (an idle connection must not hold the collector back).
    fn flush(&self) -> Result<(), StoreError> {
        let importer = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(importer) = importer {
            importer.finish()?;
        }
        Ok(())
    }
}

impl WireError {
    fn from_conn(e: quinn::ConnectionError) -> WireError {
        WireError::Read(quinn::ReadError::ConnectionLost(e))
    }
}

/// Cuts off a peer whose bytes broke the protocol or a limit; a lost
/// connection or a reset stream needs no answer.
fn reject_wire(conn: &quinn::Connection, shared: &Shared, e: WireError) {
    match e {
        WireError::Proto(p @ proto::ProtoError::FrameTooLarge { .. }) => {
            cut_off(conn, shared, ErrorKind::Limit, &p.to_string())
        }
        WireError::Proto(p) => cut_off(conn, shared, ErrorKind::Protocol, &p.to_string()),
        WireError::Truncated => cut_off(
            conn,
            shared,
            ErrorKind::Protocol,
            "the stream ended inside a message",
        ),
        WireError::Ended => cut_off(
            conn,
            shared,
            ErrorKind::Protocol,
            "the stream ended without a request",
        ),
        WireError::Read(e) => debug!(error = %e, "stream read failed"),
        WireError::Write(e) => debug!(error = %e, "stream write failed"),
    }
}

async fn handle_stream(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    session: Arc<Mutex<ServerSession>>,
    uploads: Uploads,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let started = Instant::now();
    let _in_flight = Counted::start(&shared.metrics, |m| &m.requests_in_flight);
    let deadline = shared.limits.request_deadline();
    // One deadline from the first byte of the request to the last of the
    // answer (a collection excepted: it gets a fresh one to answer).
    let until = tokio::time::Instant::now() + deadline;
    let work = async {
        let (msg, n) = match wire::read_message(&mut recv, shared.limits.max_frame_bytes).await {
            Ok(m) => m,
            Err(e) => {
                reject_wire(&conn, &shared, e);
                return None;
            }
        };
        shared.metrics.bytes_in.fetch_add(n as u64, Relaxed);
        let op = msg.kind_name();
        let checked = match session.lock() {
            // Cut off already: the connection is closing.
            Ok(s) if s.is_closed() => return None,
            Ok(mut s) => s.on_request(msg),
            Err(_) => Err(Reject {
                kind: ErrorKind::Internal,
                message: "session state poisoned".into(),
                fatal: true,
            }),
        };
        Some(match checked {
            // A collection takes as long as the store needs: it runs
            // outside the request deadline (below).
            Ok(Action::Gc { request }) => Step::Gc(request),
            Ok(action) => Step::Reply(op, execute(&shared, &session, &uploads, action).await, None),
            Err(rej) => {
                shared.metrics.error(rej.kind);
                debug!(kind = rej.kind.as_str(), message = %rej.message, "request refused");
                let fatal = rej.fatal.then(|| rej.clone());
                Step::Reply(op, rej.to_message(), fatal)
            }
        })
    };
    let outcome = match tokio::time::timeout_at(until, work).await {
        Ok(o) => o,
        Err(_) => {
            cut_off(
                &conn,
                &shared,
                ErrorKind::Deadline,
                &format!(
                    "a request took longer than the deadline of {} s",
                    deadline.as_secs()
                ),
            );
            return;
        }
    };
    let (op, reply, fatal, until) = match outcome {
        None => return,
        Some(Step::Reply(op, reply, fatal)) => (op, reply, fatal, until),
        Some(Step::Gc(request)) => {
            let by = token_label(&session);
            let reply = execute_gc(&shared, request, &by).await;
            ("gc", reply, None, tokio::time::Instant::now() + deadline)
        }
    };
    let fatal = {
        let fatal = match &reply {
            // Tampered or damaged uploads: the peer is cut off.
            Message::Error {
                kind: ErrorKind::Corrupt,
                message,
            } if fatal.is_none() => Some(Reject {
                kind: ErrorKind::Corrupt,
                message: message.clone(),
                fatal: true,
            }),
            _ => fatal,
        };
        if fatal.is_some() {
            // Serve nothing more on this connection, from now on.
            if let Ok(mut s) = session.lock() {
                s.close();
            }
        }
        fatal
    };
    match tokio::time::timeout_at(until, wire::write_message(&mut send, &reply)).await {
        Ok(Ok(n)) => {
            shared.metrics.bytes_out.fetch_add(n as u64, Relaxed);
            let _ = send.finish();
        }
        Ok(Err(e)) => debug!(error = %e, "reply not delivered"),
        Err(_) => {
            cut_off(
                &conn,
                &shared,
                ErrorKind::Deadline,
                "the reply was not read within the request deadline",
            );
            return;
        }
    }
    shared.metrics.observe(op, started.elapsed());
    if let Some(rej) = fatal {
        // Give the error frame a moment to arrive before the close.
        let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
        close_with(&conn, rej.kind, &rej.message);
    }
}

/// Something of the session's grant (the default before its hello).
fn from_grant<T: Default>(session: &Mutex<ServerSession>, get: impl Fn(&Grant) -> T) -> T {
    session
        .lock()
        .ok()
        .and_then(|s| s.grant().map(get))
        .unwrap_or_default()
}

/// The label of the session's token (for logs).
fn token_label(session: &Mutex<ServerSession>) -> String {
    from_grant(session, |g| g.label.clone())
}

/// What the session's token may read and write (nothing before its hello).
fn token_scopes(session: &Mutex<ServerSession>) -> Scopes {
    from_grant(session, |g| g.scopes.clone())
}

/// What a checked request leads to.
enum Step {
    /// Send this reply (and cut the peer off if fatal).
    Reply(&'static str, Message, Option<Reject>),
    /// Run a collection, then reply.
    Gc(GcRequest),
}

/// A remote collection (the session checked the admin scope and the
/// request's bounds): runs it unless another one is running and answers
/// with the report. Removed names that do not fit in one frame are counted,
/// not listed.
async fn execute_gc(shared: &Arc<Shared>, request: GcRequest, by: &str) -> Message {
    let reply = match run_gc(shared, request.to_options(), GcTrigger::Remote, by).await {
        Ok(mut report) => {
            let budget = (shared.limits.max_frame_bytes as usize)
                .saturating_sub(proto::GC_REPLY_FIXED + 4096);
            let mut used = 0;
            let fits = report
                .names_removed
                .iter()
                .take_while(|r| {
                    used += proto::removed_name_len(r);
                    used <= budget
                })
                .count();
            let names_not_listed = (report.names_removed.len() - fits) as u64;
            report.names_removed.truncate(fits);
            Message::GcReply {
                report,
                names_not_listed,
            }
        }
        Err(GcFailure::Busy {
            trigger,
            running_for,
        }) => Message::error(
            ErrorKind::Busy,
            format!(
                "a garbage collection is already running on the server (started by {}, \
                 {} s ago) and only one runs at a time; nothing was collected: try again \
                 when it has finished",
                match trigger {
                    GcTrigger::Schedule => "the [gc] schedule",
                    GcTrigger::Remote => "another `ferry gc --remote`",
                },
                running_for.as_secs()
            ),
        ),
        Err(GcFailure::Store(e)) => internal("collect garbage", &e),
    };
    if let Message::Error { kind, .. } = &reply {
        shared.metrics.error(*kind);
    }
    reply
}

/// Runs `f` on the blocking pool (store calls do disk I/O and hashing).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Output {
            what: "a store task".into(),
            error: std::io::Error::other(e.to_string()),
        })
    })
}

fn internal(what: &str, e: &StoreError) -> Message {
    error!(error = %e, "{what} failed");
    Message::error(
        ErrorKind::Internal,
        format!("the server could not {what} (its store failed; see the server's log)"),
    )
}

/// An upload refused for the disk reserve: bytes free, bytes offered.
struct NoSpace {
    free: u64,
    incoming: u64,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The disk filled up under a write (the reserve is 0, or something else
/// filled it): nothing was stored, and the client should not retry.
fn disk_full(what: &str, e: &StoreError) -> Message {
    error!(error = %e, "{what} failed: the disk is full");
    Message::error(
        ErrorKind::NoSpace,
        format!(
            "the server could not {what}: its disk is full; nothing was stored. \
             Ask the server's operator to free space (`ferry gc` with retention, or a \
             larger disk) and to keep a reserve (limits.min_free_bytes)"
        ),
    )
}

async fn execute(
    shared: &Arc<Shared>,
    session: &Arc<Mutex<ServerSession>>,
    uploads: &Uploads,
    action: Action,
) -> Message {
    let store = shared.store.clone();
    let metrics = &shared.metrics;
    let reply = match action {
        Action::Missing { ids } => {
            let n = ids.len() as u64;
            match blocking(move || store.missing(&ids)).await {
                Ok(missing) => {
                    metrics
                        .dedup_hits
                        .fetch_add(n - missing.len() as u64, Relaxed);
                    Message::MissingReply { ids: missing }
                }
                Err(e) => internal("look chunks up", &e),
            }
        }
        Action::Put { chunks } => {
            let n = chunks.len() as u32;
            let uploads = uploads.clone();
            let reserve = shared.limits.min_free_bytes;
            let stored = blocking(move || {
                // Checked first: refusing costs nothing, verifying does.
                let incoming: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
                if let Some(free) = store.available_bytes()? {
                    if free < reserve.saturating_add(incoming) {
                        return Ok(Err(NoSpace { free, incoming }));
                    }
                }
                // Every chunk is verified before any counts.
                let verified = verify_all(chunks)?;
                uploads.add(&store, &verified).map(Ok)
            });
            match stored.await {
                Ok(Err(NoSpace { free, incoming })) => {
                    warn!(
                        free_bytes = free,
                        upload_bytes = incoming,
                        min_free_bytes = reserve,
                        "upload refused: the store's disk is at its reserve"
                    );
                    let short = if reserve == 0 {
                        format!("too little for an upload of {}", mib(incoming))
                    } else {
                        format!(
                            "and an upload of {} would leave less than its reserve of {} \
                             (limits.min_free_bytes)",
                            mib(incoming),
                            mib(reserve)
                        )
                    };
                    Message::error(
                        ErrorKind::NoSpace,
                        format!(
                            "the server's disk is full: {} free, {short}; nothing of this \
                             upload was stored. Ask the server's operator to free space \
                             (`ferry gc` with retention, or a larger disk)",
                            mib(free)
                        ),
                    )
                }
                Ok(Ok(new)) => {
                    metrics.chunks_received.fetch_add(n as u64, Relaxed);
                    metrics.chunks_stored.fetch_add(new, Relaxed);
                    Message::PutReply {
                        received: n,
                        new: new as u32,
                    }
                }
                Err(StoreError::CorruptChunk { chunk, detail, .. }) => Message::error(
                    ErrorKind::Corrupt,
                    format!(
                        "uploaded chunk {chunk} does not match its id ({detail}); \
                         nothing of this upload was stored"
                    ),
                ),
                Err(e) if e.is_storage_full() => disk_full("store uploaded chunks", &e),
                Err(e) => internal("store uploaded chunks", &e),
            }
        }
        Action::Commit { name, manifest } => {
            let n = name.clone();
            let uploads = uploads.clone();
            let max_encoded = shared.limits.proto().max_manifest();
            let committed = blocking(move || {
                // Bounded first: a few KiB of zstd can expand to the 1 GiB
                // a local store accepts. Once committed, every later read
                // of it (lists, downloads, collections) is bounded too.
                Manifest::decode_within(&manifest, max_encoded).map_err(|problem| {
                    StoreError::Manifest {
                        name: n.to_string(),
                        id: ManifestId::of(&manifest),
                        problem,
                    }
                })?;
                uploads.commit(&store, &n, &manifest)
            });
            match committed.await {
                Ok(id) => {
                    metrics.commits.fetch_add(1, Relaxed);
                    info!(name = %name, manifest = %id, "committed");
                    Message::CommitReply { id }
                }
                Err(StoreError::MissingChunk { chunk, .. }) => Message::error(
                    ErrorKind::MissingChunks,
                    format!(
                        "commit of {name} refused: chunk {chunk} is not on the server \
                         (upload every chunk before committing)"
                    ),
                ),
                Err(StoreError::Manifest {
                    problem: source @ ManifestError::TooLarge { .. },
                    ..
                }) => Message::error(
                    ErrorKind::Limit,
                    format!(
                        "commit of {name} refused: {source} (this server takes manifests of \
                         up to four times limits.max_frame_bytes)"
                    ),
                ),
                Err(StoreError::Manifest {
                    problem: source, ..
                }) => Message::error(
                    ErrorKind::Corrupt,
                    format!("commit of {name} refused: the manifest does not decode ({source})"),
                ),
                Err(e) if e.is_storage_full() => disk_full(&format!("commit {name}"), &e),
                Err(e) => internal("commit", &e),
            }
        }
        Action::GetManifest { name, have } => {
            let n = name.clone();
            let scopes = token_scopes(session);
            match blocking(move || {
                let (id, m, bytes) = store.manifest_and_bytes(&n)?;
                Ok((manifest_reply(&store, id, bytes, &have, &scopes), m))
            })
            .await
            {
                Ok((reply, m)) => {
                    let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
                    match s.manifest_served(&m) {
                        Ok(()) => reply,
                        Err(r) => Message::error(r.kind, r.message),
                    }
                }
                Err(StoreError::Ref(RefError::NotFound(_))) => Message::error(
                    ErrorKind::NotFound,
                    format!("the server has no stash named {:?}", name.as_str()),
                ),
                Err(e) => internal("read the manifest", &e),
            }
        }
        Action::GetChunks { ids } => {
            let budget =
                (shared.limits.max_frame_bytes as usize).saturating_sub(1024 + 32 * ids.len());
            match blocking(move || {
                let read = || store.read_stored_within(&ids, budget, proto::CHUNK_OVERHEAD);
                // A collection outside this server (`ferry gc` on its host)
                // may have moved chunks and deleted a pack this server's
                // index points at: look again once with a fresh index.
                let batch = match read() {
                    Ok(batch) => batch,
                    Err(first) => {
                        // Logged: should the retry fail too, or the
                        // refresh, this is the error that says why.
                        warn!(error = %first, "reading chunks failed; reading the index again");
                        store.refresh()?;
                        read()?
                    }
                };
                // Ids past the budget are in neither list: the client asks
                // again for the rest.
                Ok((batch.chunks, batch.missing))
            })
            .await
            {
                Ok((chunks, not_found)) => {
                    metrics.chunks_sent.fetch_add(chunks.len() as u64, Relaxed);
                    if !not_found.is_empty() {
                        warn!(count = not_found.len(), first = %not_found[0],
                              "a served manifest names chunks the store lacks; run ferry fsck");
                    }
                    Message::Chunks { chunks, not_found }
                }
                Err(e) => internal("read chunks", &e),
            }
        }
        Action::List { prefix } => {
            let p = prefix.clone();
            let scopes = token_scopes(session);
            // Filtered before any manifest is read: a token that reads
            // little costs the server little, however large the store.
            let listed = blocking(move || {
                let prefix = if p.is_empty() { None } else { Some(p.as_str()) };
                store.list_where(prefix, |n| scopes.can_read(n))
            });
            match listed.await {
                Ok(entries) => {
                    let entries = entries
                        .into_iter()
                        .map(|e| ListEntry {
                            name: e.name,
                            manifest: e.manifest,
                            created: e.created,
                            header: e.header.and_then(|h| serde_json::to_string(&h).ok()),
                        })
                        .collect();
                    Message::Listing { entries }
                }
                Err(e) => internal("list", &e),
            }
        }
        Action::Gc { request } => {
            let by = token_label(session);
            return execute_gc(shared, request, &by).await;
        }
        Action::RemoveNames { names } => {
            let shown: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let removed = blocking(move || {
                // All or nothing: every name must exist before any goes.
                for n in &names {
                    if !store.contains(n)? {
                        return Ok(Err(n.to_string()));
                    }
                }
                for n in &names {
                    store.remove(n)?;
                }
                Ok(Ok(()))
            })
            .await;
            match removed {
                Ok(Ok(())) => {
                    info!(token = %token_label(session), names = ?shown, "removed");
                    removed_reply(shared, shown)
                }
                Ok(Err(absent)) => Message::error(
                    ErrorKind::NotFound,
                    format!("no stash named {absent:?} on the server; nothing was removed"),
                ),
                Err(e) => internal("remove names", &e),
            }
        }
        Action::RemovePrefix { prefix } => {
            let p = prefix.clone();
            let removed = blocking(move || {
                let prefix = if p.is_empty() { None } else { Some(p.as_str()) };
                let mut removed = Vec::new();
                for e in store.list(prefix)? {
                    if let Ok(n) = store::name::Name::parse(&e.name) {
                        if store.remove(&n)? {
                            removed.push(e.name);
                        }
                    }
                }
                Ok(removed)
            })
            .await;
            match removed {
                Ok(names) => {
                    info!(token = %token_label(session), prefix = %prefix, count = names.len(),
                          "removed every name under a prefix");
                    removed_reply(shared, names)
                }
                Err(e) => internal("remove names", &e),
            }
        }
    };
    if let Message::Error { kind, .. } = &reply {
        metrics.error(*kind);
    }
    reply
}

/// The names removed, as many as fit in one frame.
fn removed_reply(shared: &Shared, mut names: Vec<String>) -> Message {
    names.sort();
    let budget = (shared.limits.max_frame_bytes as usize).saturating_sub(4096);
    let mut used = 0;
    let fits = names
        .iter()
        .take_while(|n| {
            used += 4 + n.len();
            used <= budget
        })
        .count();
    let not_listed = (names.len() - fits) as u64;
    names.truncate(fits);
    Message::Removed { names, not_listed }
}

/// The answer to a manifest request: nothing if the client holds the
/// manifest, a delta against one it holds (and the token may read), or the
/// manifest whole.
fn manifest_reply(
    store: &Store,
    id: ManifestId,
    bytes: Vec<u8>,
    have: &[ManifestId],
    scopes: &Scopes,
) -> Message {
    if have.contains(&id) {
        return Message::ManifestDelta {
            id,
            base: id,
            delta: Vec::new(),
        };
    }
    if have.is_empty() {
        return Message::Manifest { id, bytes };
    }
    // Only manifests that a name the token may read points at serve as
    // bases: the delta then tells the client nothing it could not fetch.
    let backend = store.backend();
    let mut readable = HashSet::new();
    for scope in &scopes.read {
        let prefix = Some(scope.prefix()).filter(|p| !p.is_empty());
        if let Ok(refs) = store::refs::list(backend, prefix) {
            readable.extend(refs.into_iter().map(|(_, m)| m));
        }
    }
    let base = have.iter().find(|b| readable.contains(*b));
    if let Some(base) = base {
        if let Ok(b) = backend.get(Kind::Manifest, &base.to_hex()) {
            if let Some(delta) = crate::delta::make(&b, &bytes) {
                return Message::ManifestDelta {
                    id,
                    base: *base,
                    delta,
                };
            }
        }
    }
    Message::Manifest { id, bytes }
}

/// Runs a server from `cfg` until SIGTERM or SIGINT, on a runtime of its
/// own. `ready` is called once the server listens (to print the address
/// and the certificate's fingerprint). On SIGHUP the config is read again
/// from `reload_from` and its tokens replace the server's
/// ([`ServerHandle::reload`]); what happened is logged.
pub fn serve_until_signal(
    cfg: &ServerConfig,
    reload_from: Option<&std::path::Path>,
    ready: impl FnOnce(&Server),
) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let served = rt.block_on(async {
        let server = Server::bind(cfg).await?;
        ready(&server);
        let handle = server.handle();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(ServerError::Runtime)?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(ServerError::Runtime)?;
        let path = reload_from.map(|p| p.to_path_buf());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT"),
                    Some(()) = hup.recv() => {
                        reload(&handle, path.as_deref()).await;
                        continue;
                    }
                }
                handle.shutdown();
                return;
            }
        });
        server.run().await
    });
    // A collection still running on a blocking thread (past the grace
    // period) is not waited for: the store stays consistent without it.
    rt.shutdown_timeout(Duration::from_secs(1));
    served
}

/// Reloads the tokens from the config file at `path` (SIGHUP), logging
/// what changed or why nothing did.
async fn reload(handle: &ServerHandle, path: Option<&std::path::Path>) {
    let Some(path) = path else {
        warn!("SIGHUP: this server was not started from a config file; nothing to reload");
        return;
    };
    let owned = path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || ServerConfig::load(&owned)).await;
    let loaded = loaded.unwrap_or_else(|e| {
        Err(ConfigError::Read {
            path: path.to_path_buf(),
            error: std::io::Error::other(e),
        })
    });
    let reloaded = match loaded {
        Ok(cfg) => handle.reload(&cfg),
        Err(e) => {
            handle
                .reloader
                .metrics
                .config_reload_failures
                .fetch_add(1, Relaxed);
            Err(e)
        }
    };
    match reloaded {
        Ok(r) => {
            info!(
                config = %path.display(),
                tokens = r.tokens,
                added = ?r.added,
                removed = ?r.removed,
                changed = ?r.changed,
                "SIGHUP: tokens reloaded"
            );
            if !r.needs_restart.is_empty() {
                warn!(
                    keys = ?r.needs_restart,
                    "SIGHUP: these settings changed in the config but take effect only at a \
                     restart; they were left as they were"
                );
            }
            if r.tokens == 0 {
                warn!("no [[token]] in the config: every client will be refused");
            }
        }
        Err(e) => {
            error!(error = %e, "SIGHUP: the config was not reloaded; the tokens in effect stay")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(dir: &std::path::Path) -> Arc<Shared> {
        Arc::new(Shared {
            store: Arc::new(Store::open(dir).unwrap()),
            tokens: Arc::new(watch::channel(Arc::new(TokenTable::default())).0),
            limits: LimitsConfig::default(),
            metrics: Arc::new(Metrics::default()),
            connections: AtomicU32::new(0),
            throttle: AuthThrottle::new(0, Duration::from_secs(60)),
            pending_hellos: PendingHellos::new(0),
            gc: Arc::new(watch::channel(None).0),
        })
    }

    #[tokio::test]
    async fn one_collection_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        let ticket = shared.start_gc(GcTrigger::Schedule).unwrap();
        assert_eq!(shared.metrics.gc_running.load(Relaxed), 1);
        assert!(matches!(
            shared.start_gc(GcTrigger::Remote),
            Err(GcFailure::Busy {
                trigger: GcTrigger::Schedule,
                ..
            })
        ));
        // A remote request meanwhile is answered "busy", saying why, and
        // runs nothing.
        let request = GcRequest::from_options(&GcOptions::default());
        match execute_gc(&shared, request.clone(), "ops").await {
            Message::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Busy);
                assert!(
                    message.contains("already running") && message.contains("[gc] schedule"),
                    "{message}"
                );
            }
            other => panic!("expected busy, got {other:?}"),
        }
        assert_eq!(shared.metrics.gc_runs(GcTrigger::Remote), 0);
        assert_eq!(shared.metrics.errors(ErrorKind::Busy), 1);
        drop(ticket);
        assert_eq!(shared.metrics.gc_running.load(Relaxed), 0);
        match execute_gc(&shared, request, "ops").await {
            Message::GcReply {
                report,
                names_not_listed,
            } => {
                assert_eq!((report.names_kept, names_not_listed), (0, 0));
            }
            other => panic!("expected a report, got {other:?}"),
        }
        assert_eq!(shared.metrics.gc_runs(GcTrigger::Remote), 1);
        assert!(shared.gc.borrow().is_none(), "the slot is free again");
    }
}
