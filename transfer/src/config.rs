//! The server's configuration file (TOML). Every key is documented in
//! `docs/remote.md`; `docs/ferry-server.example.toml` is a complete example.

use crate::auth::{AuthError, Scopes, TokenHash, TokenTable};
use crate::proto::{self, Limits};
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use store::gc::{GcOptions, Policy};

/// Default UDP port of `ferry serve` (and of `quic://HOST` without a port).
pub const DEFAULT_PORT: u16 = 4433;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the server config {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("the server config {} is invalid: {error}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and what.
        error: Box<toml::de::Error>,
    },
    /// A token entry is unusable.
    #[error("token {label:?} in the server config: {problem}")]
    Token {
        /// The token's label.
        label: String,
        /// What is wrong.
        problem: AuthError,
    },
    /// A value is out of range.
    #[error("the server config key {key}: {problem}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// `[limits]`: what one peer may use.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent connections; more are refused with "busy".
    pub max_connections: u32,
    /// Concurrent request streams per connection (QUIC flow control).
    pub max_streams_per_connection: u32,
    /// Largest frame, bytes (at least 16 MiB + 64 KiB, to carry any chunk).
    pub max_frame_bytes: u32,
    /// Most chunk ids in one request.
    pub max_batch_ids: u32,
    /// A connection with no traffic for this long is closed, seconds.
    pub idle_timeout_secs: u64,
    /// Deadline for one request (receive, handle, reply), seconds.
    pub request_deadline_secs: u64,
    /// On SIGTERM, how long in-flight requests may take to finish, seconds.
    pub shutdown_grace_secs: u64,
    /// Failed authentications (no or unknown token) from one address (IPv4,
    /// or an IPv6 /64) within `auth_failure_window_secs` after which the
    /// address is refused until the oldest ages out; 0: no limit.
    pub max_auth_failures: u32,
    /// The window failed authentications are counted in, seconds.
    pub auth_failure_window_secs: u64,
    /// With this many handshakes in progress, a new peer must first prove
    /// its address (a QUIC Retry: one more round trip). Spoofed sources never
    /// get past it, so a flood of forged packets keeps no handshake state.
    /// 0: every peer.
    pub validate_addresses_above: u32,
    /// Connections from one address (IPv4, or an IPv6 /64) that have done
    /// their handshake but not yet said hello; more are refused as busy.
    /// No token is needed to get that far, and each holds a slot until the
    /// hello deadline: this keeps one host from taking every slot.
    /// Authenticated connections do not count. 0: no limit.
    pub max_unauthenticated_per_address: u32,
    /// Disk space kept free in the store, bytes: an upload that would leave
    /// less is refused ("no space"), so that commits, removals and
    /// collections (which need a little space to free more) still work
    /// when uploads have filled the disk. 0: no reserve.
    pub min_free_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 256,
            max_streams_per_connection: 16,
            max_frame_bytes: proto::DEFAULT_MAX_FRAME,
            max_batch_ids: proto::DEFAULT_BATCH_IDS,
            idle_timeout_secs: 60,
            request_deadline_secs: 300,
            shutdown_grace_secs: 60,
            max_auth_failures: 10,
            auth_failure_window_secs: 60,
            validate_addresses_above: 32,
            max_unauthenticated_per_address: 16,
            min_free_bytes: 1 << 30,
        }
    }
}

impl LimitsConfig {
    /// What the protocol announces to clients.
    pub fn proto(&self) -> Limits {
        Limits {
            max_frame: self.max_frame_bytes,
            max_batch_ids: self.max_batch_ids,
            max_streams: self.max_streams_per_connection,
        }
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The per-request deadline.
    pub fn request_deadline(&self) -> Duration {
        Duration::from_secs(self.request_deadline_secs)
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The window failed authentications are counted in.
    pub fn auth_failure_window(&self) -> Duration {
        Duration::from_secs(self.auth_failure_window_secs)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, problem: String| Err(ConfigError::Value { key, problem });
        if self.max_connections == 0 {
            return bad("limits.max_connections", "must be at least 1".into());
        }
        if !(1..=1024).contains(&self.max_streams_per_connection) {
            return bad(
                "limits.max_streams_per_connection",
                "must be between 1 and 1024".into(),
            );
        }
        if !(proto::MIN_FRAME..=(1 << 30)).contains(&self.max_frame_bytes) {
            return bad(
                "limits.max_frame_bytes",
                format!(
                    "must be between {} (a 16 MiB chunk and its header) and 1 GiB",
                    proto::MIN_FRAME
                ),
            );
        }
        if !(1..=1 << 20).contains(&self.max_batch_ids) {
            return bad(
                "limits.max_batch_ids",
                "must be between 1 and 1048576".into(),
            );
        }
        // A reply may carry a maximal chunk beside a batch of ids.
        let need = proto::MIN_FRAME as u64 + 36 * self.max_batch_ids as u64;
        if (self.max_frame_bytes as u64) < need {
            return bad(
                "limits.max_frame_bytes",
                format!(
                    "must be at least {need} for max_batch_ids = {} \
                     (a 16 MiB chunk beside 36 bytes per id)",
                    self.max_batch_ids
                ),
            );
        }
        if self.max_auth_failures > 100_000 {
            return bad(
                "limits.max_auth_failures",
                "must be at most 100000 (0: no limit)".into(),
            );
        }
        for (key, v) in [
            ("limits.idle_timeout_secs", self.idle_timeout_secs),
            ("limits.request_deadline_secs", self.request_deadline_secs),
            (
                "limits.auth_failure_window_secs",
                self.auth_failure_window_secs,
            ),
        ] {
            if !(1..=86_400).contains(&v) {
                return bad(key, "must be between 1 and 86400 seconds".into());
            }
        }
        Ok(())
    }
}

/// `[[token]]`: one token the server accepts.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A label for logs and metrics (never the secret).
    pub name: String,
    /// SHA-256 of the token, 64 hex digits (`ferry serve --new-token FILE` prints it).
    pub sha256: String,
    /// Name prefixes the token may read (`"*"` for all).
    #[serde(default)]
    pub read: Vec<String>,
    /// Name prefixes the token may write.
    #[serde(default)]
    pub write: Vec<String>,
    /// The admin scope: may run `ferry gc --remote` (which can remove any
    /// name, whatever `read` and `write` say).
    #[serde(default)]
    pub admin: bool,
    /// At most this many connections with this token at once; more are
    /// refused as busy (clients wait for a slot, `Options::busy_wait`).
    /// Keeps one class of jobs (every pull-request build) from taking all
    /// `limits.max_connections`.
    /// Absent: only the server's limit.
    #[serde(default)]
    pub max_connections: Option<u32>,
}

impl TokenConfig {
    /// Its scopes, parsed (with the admin scope if set).
    pub fn scopes(&self) -> Result<Scopes, ConfigError> {
        let read: Vec<&str> = self.read.iter().map(String::as_str).collect();
        let write: Vec<&str> = self.write.iter().map(String::as_str).collect();
        let scopes = Scopes::parse(&read, &write).map_err(|problem| ConfigError::Token {
            label: self.name.clone(),
            problem,
        })?;
        Ok(scopes.with_admin(self.admin))
    }
}

/// A duration in a config file: `"90s"`, `"15m"`, `"12h"`, `"7d"`, `"2w"`,
/// or a number of seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Secs(u64),
        Text(String),
    }
    match Text::deserialize(d)? {
        Text::Secs(n) => Ok(Duration::from_secs(n)),
        Text::Text(t) => store::gc::parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// `[[gc.retention]]`: one retention rule, as in `ferry gc --config`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Names the rule applies to (whole parts); alone, drop them all.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Keep the newest N names of each group (names sharing a parent path).
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// Remove names set longer ago than this.
    #[serde(default, deserialize_with = "some_duration")]
    pub max_age: Option<Duration>,
}

/// `[gc]`: the server's scheduled retention and garbage collection.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// How often to collect; `None` (the key absent): never on a schedule.
    #[serde(deserialize_with = "some_duration")]
    pub interval: Option<Duration>,
    /// Condemned data lives at least this long before it is deleted.
    #[serde(deserialize_with = "duration")]
    pub grace: Duration,
    /// Repack packs whose live share of bytes is below this (0: never).
    pub repack_below: f64,
    /// Retention rules; a name goes if any rule removes it.
    pub retention: Vec<RetentionConfig>,
}

impl Default for GcConfig {
    fn default() -> Self {
        let d = GcOptions::default();
        GcConfig {
            interval: None,
            grace: d.grace,
            repack_below: d.repack_below,
            retention: Vec::new(),
        }
    }
}

impl GcConfig {
    /// The retention rules.
    pub fn policies(&self) -> Vec<Policy> {
        self.retention
            .iter()
            .map(|r| Policy {
                prefix: r.prefix.clone(),
                keep_last: r.keep_last,
                max_age: r.max_age,
            })
            .collect()
    }

    /// The options of each scheduled collection.
    pub fn options(&self) -> GcOptions {
        GcOptions {
            policies: self.policies(),
            grace: self.grace,
            repack_below: self.repack_below,
            ..GcOptions::default()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, problem: String| Err(ConfigError::Value { key, problem });
        if let Some(i) = self.interval {
            if !(Duration::from_secs(1)..=Duration::from_secs(366 * 86_400)).contains(&i) {
                return bad(
                    "gc.interval",
                    "must be between 1 s and a year (e.g. \"1h\"); leave it out to \
                     collect only on demand"
                        .into(),
                );
            }
        }
        if self.grace > proto::MAX_GC_GRACE {
            return bad("gc.grace", "must be at most ten years".into());
        }
        if !(0.0..=1.0).contains(&self.repack_below) {
            return bad(
                "gc.repack_below",
                format!(
                    "must be between 0 (never repack) and 1 (got {})",
                    self.repack_below
                ),
            );
        }
        for (i, p) in self.policies().iter().enumerate() {
            p.validate().map_err(|e| ConfigError::Value {
                key: "gc.retention",
                problem: format!("entry {} ([[gc.retention]] number {}): {e}", i + 1, i + 1),
            })?;
        }
        Ok(())
    }
}

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address to listen on, e.g. `0.0.0.0:4433`.
    pub listen: SocketAddr,
    /// The store directory.
    pub store: PathBuf,
    /// TLS certificate chain (PEM); generated (self-signed) if absent with `key`.
    pub cert: PathBuf,
    /// TLS private key (PEM).
    pub key: PathBuf,
    /// Names (DNS or IP) put in a generated certificate.
    #[serde(default = "default_cert_names")]
    pub cert_names: Vec<String>,
    /// TCP address of the Prometheus metrics endpoint; none if absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Accepted tokens.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenConfig>,
    /// Scheduled collection.
    #[serde(default)]
    pub gc: GcConfig,
}

fn default_cert_names() -> Vec<String> {
    vec!["localhost".into()]
}

impl ServerConfig {
    /// A config with defaults for everything but the addresses and paths
    /// (for tests and embedding).
    pub fn new(listen: SocketAddr, store: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        ServerConfig {
            listen,
            store,
            cert,
            key,
            cert_names: default_cert_names(),
            metrics_listen: None,
            limits: LimitsConfig::default(),
            tokens: Vec::new(),
            gc: GcConfig::default(),
        }
    }

    /// Reads and checks a config file. Relative paths in it are relative
    /// to the file's directory.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut cfg = Self::parse(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error: Box::new(error),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.store, &mut cfg.cert, &mut cfg.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no path resolution, no checks).
    pub fn parse(text: &str) -> Result<ServerConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// The keys whose change a reload does not apply (only `[[token]]`
    /// entries are reloaded): what differs between `self` and `newer`
    /// among them.
    pub fn restart_only_changes(&self, newer: &ServerConfig) -> Vec<&'static str> {
        // Destructured, so that a new key cannot be forgotten here.
        let ServerConfig {
            listen,
            store,
            cert,
            key,
            cert_names,
            metrics_listen,
            limits,
            tokens: _,
            gc,
        } = newer;
        [
            ("listen", self.listen != *listen),
            ("store", self.store != *store),
            ("cert", self.cert != *cert),
            ("key", self.key != *key),
            ("cert_names", self.cert_names != *cert_names),
            ("metrics_listen", self.metrics_listen != *metrics_listen),
            ("[limits]", self.limits != *limits),
            ("[gc]", self.gc != *gc),
        ]
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect()
    }

    /// Checks the limits, the tokens and the collection schedule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.checked_token_table().map(|_| ())
    }

    /// [`validate`](Self::validate), returning the token table it built.
    pub fn checked_token_table(&self) -> Result<TokenTable, ConfigError> {
        self.limits.validate()?;
        self.gc.validate()?;
        self.token_table()
    }

    /// The tokens as a lookup table.
    pub fn token_table(&self) -> Result<TokenTable, ConfigError> {
        let bad = |key, problem: String| Err(ConfigError::Value { key, problem });
        let mut entries = Vec::new();
        let mut limits = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let err = |problem| ConfigError::Token {
                label: t.name.clone(),
                problem,
            };
            // Logs, metrics and connection limits go by the label: entries
            // that share one (an old and a new token while rotating) count
            // as one token, so they must agree on its limit.
            if let Some(other) = self.tokens[..i].iter().find(|u| u.name == t.name) {
                if other.max_connections != t.max_connections {
                    return bad(
                        "token.max_connections",
                        format!(
                            "two [[token]] entries named {:?} set different limits; entries \
                             that share a name share its connections, so give them the same \
                             max_connections or different names",
                            t.name
                        ),
                    );
                }
            }
            match t.max_connections {
                Some(0) => {
                    return bad(
                        "token.max_connections",
                        format!(
                            "token {:?}: must be at least 1 (leave it out for no limit of its own)",
                            t.name
                        ),
                    )
                }
                Some(max) => limits.push((t.name.as_str(), max)),
                None => {}
            }
            let hash = TokenHash::from_hex(&t.sha256).map_err(err)?;
            entries.push((t.name.clone(), hash, t.scopes()?));
        }
        Ok(limits
            .into_iter()
            .fold(TokenTable::new(entries), |table, (label, max)| {
                table.limit_connections(label, max)
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../docs/ferry-server.example.toml");
        let cfg = ServerConfig::parse(text).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.tokens.len() >= 2);
        assert!(cfg.metrics_listen.is_some());
        assert!(
            cfg.gc.interval.is_none(),
            "the example's [gc] is commented out"
        );
        // Uncommented, its [gc] section (lines "#key = …") is valid too.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = ServerConfig::parse(&uncommented).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.gc.interval.is_some());
        assert!(!cfg.gc.retention.is_empty());
        assert!(cfg.tokens.iter().any(|t| t.admin));
    }

    /// An old and a new token under one name (a rotation) are one token to
    /// logs, metrics and its connection limit.
    #[test]
    fn tokens_sharing_a_name_share_its_connections() {
        let hash = |t: &str| crate::auth::Token::new(t).unwrap().hash().to_hex();
        let text = format!(
            "listen = \"127.0.0.1:1\"\nstore = \"s\"\ncert = \"c\"\nkey = \"k\"\n\
             [[token]]\nname = \"ci\"\nsha256 = \"{}\"\nmax_connections = 1\n\
             [[token]]\nname = \"ci\"\nsha256 = \"{}\"\nmax_connections = 1\n",
            hash("old-secret"),
            hash("new-secret"),
        );
        let cfg = ServerConfig::parse(&text).unwrap();
        cfg.validate().unwrap();
        let table = cfg.token_table().unwrap();
        let (old, new) = (
            table.authenticate("old-secret").unwrap(),
            table.authenticate("new-secret").unwrap(),
        );
        let held = std::sync::Arc::new(crate::auth::TokenConnections::new(&table));
        assert_eq!(held.snapshot(), [("ci".to_string(), 0)]);
        let _one = held.take(old).unwrap();
        assert!(
            held.take(new).is_none(),
            "the new token has a limit of its own"
        );
    }

    #[test]
    fn gc_section_and_admin_tokens() {
        let text = format!(
            "listen = \"127.0.0.1:1\"\nstore = \"s\"\ncert = \"c\"\nkey = \"k\"\n\
             [[token]]\nname = \"ops\"\nsha256 = \"{}\"\nadmin = true\n\
             [[token]]\nname = \"ci\"\nsha256 = \"{}\"\nread = [\"*\"]\nmax_connections = 64\n\
             [gc]\ninterval = \"1h\"\ngrace = 30\nrepack_below = 0.25\n\
             [[gc.retention]]\nprefix = \"pr\"\nmax_age = \"3d\"\n\
             [[gc.retention]]\nprefix = \"main\"\nkeep_last = 10\n",
            crate::auth::Token::new("ops-secret")
                .unwrap()
                .hash()
                .to_hex(),
            crate::auth::Token::new("ci-secret")
                .unwrap()
                .hash()
                .to_hex(),
        );
        let cfg = ServerConfig::parse(&text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.gc.interval, Some(Duration::from_secs(3600)));
        let o = cfg.gc.options();
        assert_eq!(o.grace, Duration::from_secs(30));
        assert_eq!(o.repack_below, 0.25);
        assert_eq!(o.policies.len(), 2);
        assert_eq!(o.policies[0].max_age, Some(Duration::from_secs(3 * 86_400)));
        assert_eq!(o.policies[1].keep_last, Some(10));
        let table = cfg.token_table().unwrap();
        let admin = |t: &str| table.authenticate(t).map(|g| g.scopes.admin);
        assert_eq!(admin("ops-secret"), Some(true));
        assert_eq!(admin("ci-secret"), Some(false));
        let max = |t: &str| table.authenticate(t).map(|g| g.max_connections);
        assert_eq!(max("ops-secret"), Some(None));
        assert_eq!(max("ci-secret"), Some(Some(64)));
        // No [gc]: nothing scheduled, the defaults of `ferry gc`.
        let cfg = ServerConfig::parse(
            "listen = \"127.0.0.1:1\"\nstore = \"s\"\ncert = \"c\"\nkey = \"k\"\n",
        )
        .unwrap();
        assert!(cfg.gc.interval.is_none());
        assert_eq!(cfg.gc.grace, GcOptions::default().grace);
    }

    #[test]
    fn minimal_config_gets_defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ferry.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:4433\"\nstore = \"store\"\ncert = \"c.pem\"\nkey = \"/k.pem\"\n",
        )
        .unwrap();
        let cfg = ServerConfig::load(&p).unwrap();
        assert_eq!(cfg.store, dir.path().join("store"));
        assert_eq!(cfg.cert, dir.path().join("c.pem"));
        assert_eq!(cfg.key, PathBuf::from("/k.pem"));
        assert_eq!(cfg.limits.max_streams_per_connection, 16);
        assert_eq!(cfg.limits.max_auth_failures, 10);
        assert_eq!(cfg.limits.auth_failure_window_secs, 60);
        assert_eq!(cfg.limits.validate_addresses_above, 32);
        assert!(cfg.tokens.is_empty());
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let base = "listen = \"127.0.0.1:1\"\nstore = \"s\"\ncert = \"c\"\nkey = \"k\"\n";
        let cases = [
            (format!("{base}bogus = 1\n"), "bogus"),
            (
                format!("{base}[limits]\nmax_frame_bytes = 1000\n"),
                "max_frame_bytes",
            ),
            (
                format!("{base}[[token]]\nname = \"ci\"\nsha256 = \"abc\"\n"),
                "ci",
            ),
            (
                format!(
                    "{base}[[token]]\nname = \"ci\"\nsha256 = \"{}\"\nwrite = [\"../x\"]\n",
                    "a".repeat(64)
                ),
                "../x",
            ),
            (
                format!("{base}[limits]\nauth_failure_window_secs = 0\n"),
                "auth_failure_window_secs",
            ),
            (
                format!("{base}[limits]\nmax_auth_failures = 1000000\n"),
                "max_auth_failures",
            ),
            (
                format!(
                    "{base}[[token]]\nname = \"ci\"\nsha256 = \"{}\"\nmax_connections = 0\n",
                    "a".repeat(64)
                ),
                "token.max_connections: token \"ci\": must be at least 1",
            ),
            (
                format!(
                    "{base}[[token]]\nname = \"ci\"\nsha256 = \"{}\"\n\
                     [[token]]\nname = \"ci\"\nsha256 = \"{}\"\nmax_connections = 3\n",
                    "a".repeat(64),
                    "b".repeat(64)
                ),
                "two [[token]] entries named \"ci\" set different limits",
            ),
            (format!("{base}[gc]\ninterval = \"0s\"\n"), "gc.interval"),
            (format!("{base}[gc]\ninterval = \"soon\"\n"), "soon"),
            (
                format!("{base}[gc]\nrepack_below = 2.0\n"),
                "gc.repack_below",
            ),
            (format!("{base}[gc]\nintervall = \"1h\"\n"), "intervall"),
            (
                format!("{base}[[gc.retention]]\nprefix = \"../x\"\n"),
                "gc.retention",
            ),
            (format!("{base}[[gc.retention]]\n"), "gc.retention"),
            (
                format!("{base}[[gc.retention]]\nprefix = \"pr\"\nmax_age = \"3 days\"\n"),
                "3 days",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (text, needle) in cases {
            let p = dir.path().join("c.toml");
            std::fs::write(&p, &text).unwrap();
            let e = ServerConfig::load(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
