//! `ferry serve`: share a store with CI nodes over QUIC.

use crate::output::Output;
use anyhow::{bail, Context};
use std::io::Write;
use std::path::PathBuf;
use transfer::auth::Token;
use transfer::config::ServerConfig;

pub const LONG_ABOUT: &str = "\
Serve a store to `ferry stash/unstash/ls --remote quic://HOST:PORT` over QUIC
(TLS 1.3, ALPN ferry/1). Only the chunks the other side lacks cross the wire;
every uploaded chunk is verified (decompressed, BLAKE3-hashed) before it counts,
and a name is committed only once every chunk it needs is stored.

The config is a TOML file (docs/remote.md; docs/ferry-server.example.toml is a
complete example). Relative paths in it are relative to the file. Keys:

  listen = \"0.0.0.0:4433\"          UDP address to serve on
  store = \"/var/lib/ferry/store\"   the store directory
  cert = \"tls/cert.pem\"            certificate chain (PEM)
  key = \"tls/key.pem\"              its private key (PEM); if neither file
                                   exists, a self-signed pair is generated and
                                   its SHA-256 fingerprint printed
  cert_names = [\"localhost\"]       DNS names / IPs put in a generated cert
  metrics_listen = \"127.0.0.1:9464\"  Prometheus metrics over HTTP (optional)

  [limits]
  max_connections = 256            more are refused as busy (clients retry)
  max_streams_per_connection = 16  parallel requests per connection
  max_frame_bytes = 33554432       largest message (>= 16 MiB + 64 KiB); a
                                   stash's manifest must fit in one (the
                                   default: a stash of roughly 65 GB)
  max_batch_ids = 16384            chunk ids per request
  idle_timeout_secs = 60           silent connections are closed
  request_deadline_secs = 300      one request, start to answer
  shutdown_grace_secs = 60         on SIGTERM, in-flight requests may finish
  max_auth_failures = 10           failed authentications from one address
                                   (IPv4, or IPv6 /64) within the window
                                   before it is refused whatever token it
                                   brings, until the oldest ages out; 0: off
  auth_failure_window_secs = 60    the window those failures are counted in
  validate_addresses_above = 32    with this many handshakes in progress, a
                                   new peer must first prove its address (a
                                   QUIC Retry, one more round trip): forged
                                   sources then cost no state; 0: every peer
  max_unauthenticated_per_address = 16
                                   connections from one address (IPv4, or
                                   IPv6 /64) done with their handshake but
                                   not yet with their hello; more are busy
                                   (keeps one host from holding every slot
                                   without a token); 0: no limit
  min_free_bytes = 1073741824      disk space kept free in the store: uploads
                                   that would eat into it are refused (\"no
                                   space\"), so commits, removals and gc
                                   still run on a full disk; 0: no reserve

  [[token]]                        one per CI trust level
  name = \"pr-builds\"               label for logs and metrics (never the
                                   secret); entries sharing one share its
                                   max_connections
  sha256 = \"<64 hex>\"              SHA-256 of the token (--new-token prints it)
  read = [\"main\", \"pr\"]            name prefixes it may read (\"*\": all)
  write = [\"pr\"]                   name prefixes it may write
  admin = false                    true: may run `ferry gc --remote` (which can
                                   remove any name); for operators only
  max_connections = 64             at most this many connections with this
                                   token at once, more are refused as busy
                                   (clients wait, --busy-wait): keeps one
                                   trust level's jobs from taking every slot
                                   (absent: only limits.max_connections)

  [gc]                             scheduled retention and garbage collection
  interval = \"1h\"                  how often (>= 1s); absent: never on a
                                   schedule (only `ferry gc --remote`)
  grace = \"1h\"                     condemned data is deleted only after this
  repack_below = 0.5               repack packs less live than this (0: never)
  [[gc.retention]]                 rules, as in `ferry gc --config`; a name
  prefix = \"pr\"                    goes if any rule removes it: prefix alone
  max_age = \"3d\"                   drops the scope, keep_last = N keeps the
  keep_last = 10                   newest N per parent path, max_age drops
                                   older names (durations: 90s, 15m, 12h, 7d, 2w)

A peer that breaks a limit is cut off with an error; others keep being served.
One collection runs at a time (scheduled or remote), beside any number of
stashes; its report is logged and counted in the metrics (ferry_gc_*).
SIGTERM or Ctrl-C: stop accepting, let in-flight requests and a running
collection finish (up to shutdown_grace_secs), exit.
SIGHUP: read the config again and replace the [[token]] entries (rotate or
revoke tokens without a restart). New connections use the new tokens at
once; an open session whose token is gone, or whose scopes changed, is
closed (\"unauthenticated\", saying why); the others go on. Other keys take
effect only at a restart (the log names those that changed); a config that
does not load or check changes nothing (logged at error). Try a config with
--check first.
Logs go to stderr (FERRY_LOG=error|warn|info|debug|trace, default info).
UDP: 8 MiB socket buffers are asked for (Linux caps them at
net.core.rmem_max / wmem_max: raise those on a busy server); QUIC datagrams
grow to 16 KiB where the path carries them (FERRY_QUIC_MAX_UDP_PAYLOAD,
1200-65527, on both sides). See docs/remote.md, section UDP.
Packs are written with O_DIRECT, past the page cache (FERRY_DIRECT_IO=0:
buffered); see docs/remote.md, section Disk.

Examples:
  ferry serve --config /etc/ferry/server.toml
  ferry serve --config /etc/ferry/server.toml --check   # then kill -HUP the server
  ferry serve --new-token /etc/ferry/tokens/main   # then paste the printed [[token]]";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's TOML config file.
    #[arg(long, value_name = "FILE", required_unless_present = "new_token")]
    config: Option<PathBuf>,
    /// Instead of serving: write a new random token to FILE (readable by
    /// its owner only) and print the [[token]] entry for the config.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    new_token: Option<PathBuf>,
    /// Instead of serving: check the config (keys, limits, tokens,
    /// schedule, and the certificate and key if they exist), print what a
    /// server would use, and exit: 0 if it would start, 2 if not. Binds,
    /// creates and generates nothing, so it can run beside the server
    /// before a restart or a SIGHUP.
    #[arg(long, requires = "config")]
    check: bool,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<()> {
    if let Some(path) = args.new_token {
        return new_token(&path, out);
    }
    let path = args.config.context("--config FILE is required")?;
    let cfg = ServerConfig::load(&path)?;
    if args.check {
        let report = transfer::server::check(&cfg)?;
        return out.emit(&report, |r| render_check(&path, r));
    }
    let level = match std::env::var("FERRY_LOG").as_deref() {
        Ok("error") => tracing_subscriber::filter::LevelFilter::ERROR,
        Ok("warn") => tracing_subscriber::filter::LevelFilter::WARN,
        Ok("debug") => tracing_subscriber::filter::LevelFilter::DEBUG,
        Ok("trace") => tracing_subscriber::filter::LevelFilter::TRACE,
        _ => tracing_subscriber::filter::LevelFilter::INFO,
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(level)
        .try_init();
    let quiet = out.quiet;
    transfer::server::serve_until_signal(&cfg, Some(&path), |server| {
        if quiet {
            return;
        }
        let mut e = std::io::stderr().lock();
        let _ = writeln!(
            e,
            "ferry serve: listening on quic://{}",
            server.local_addr()
        );
        if server.generated_certificate() {
            let _ = writeln!(
                e,
                "ferry serve: generated a self-signed certificate at {}",
                cfg.cert.display()
            );
        }
        let _ = writeln!(
            e,
            "ferry serve: certificate {} (clients: --server-cert {} or --server-cert {})",
            server.fingerprint(),
            cfg.cert.display(),
            server.fingerprint()
        );
        if let Some(m) = server.metrics_addr() {
            let _ = writeln!(e, "ferry serve: metrics on http://{m}/metrics");
        }
    })?;
    Ok(())
}

fn render_check(path: &std::path::Path, r: &transfer::server::ConfigCheck) -> String {
    use std::fmt::Write as _;
    let mut s = format!("{}: OK\n", path.display());
    let _ = writeln!(s, "listen   quic://{}", r.listen);
    let _ = match r.metrics_listen {
        Some(m) => writeln!(s, "metrics  http://{m}/metrics"),
        None => writeln!(s, "metrics  off (no metrics_listen)"),
    };
    let made = if r.store_exists {
        ""
    } else {
        " (made at start)"
    };
    let _ = writeln!(s, "store    {}{made}", r.store.display());
    let _ = match &r.certificate {
        Some(f) => writeln!(s, "cert     {f}"),
        None => writeln!(
            s,
            "cert     none yet: a self-signed one is generated at the first start"
        ),
    };
    let _ = writeln!(s, "tokens   {}", r.tokens.len());
    let list = |v: &[String]| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(", ")
        }
    };
    for t in &r.tokens {
        let _ = write!(
            s,
            "  {}: read {}; write {}",
            t.name,
            list(&t.read),
            list(&t.write)
        );
        if t.admin {
            s.push_str("; admin");
        }
        if let Some(n) = t.max_connections {
            let _ = write!(s, "; max_connections {n}");
        }
        s.push('\n');
    }
    let _ = match r.gc_interval_secs {
        Some(i) => writeln!(
            s,
            "gc       every {i} s, {} retention rule(s)",
            r.retention_rules
        ),
        None => writeln!(s, "gc       no schedule (only `ferry gc --remote`)"),
    };
    s
}

fn new_token(path: &std::path::Path, out: &Output) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        bail!("{} exists; refusing to overwrite a token", path.display());
    }
    let token = Token::generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{}", token.secret())
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[derive(serde::Serialize)]
    struct NewToken {
        file: String,
        sha256: String,
    }
    let report = NewToken {
        file: path.display().to_string(),
        sha256: token.hash().to_hex(),
    };
    out.emit(&report, |r| {
        format!(
            "wrote a new token to {}; add to the server's config:\n\n\
             [[token]]\nname = \"CHANGE-ME\"\nsha256 = \"{}\"\nread = [\"main\"]\nwrite = []\n",
            r.file, r.sha256
        )
    })
}

#[cfg(test)]
mod tests {
    use super::LONG_ABOUT;

    /// Every key the example config sets (its commented-out `[gc]` too) is
    /// explained in `ferry serve --help` and in docs/remote.md's table, so
    /// that a new key cannot land documented in one place only.
    #[test]
    fn every_key_of_the_example_config_is_documented() {
        let example = include_str!("../../docs/ferry-server.example.toml");
        let docs = include_str!("../../docs/remote.md");
        let mut header = String::new();
        let mut keys = Vec::new();
        for line in example.lines() {
            // "#key = …" and "#[gc]" are settings commented out; "# …" is prose.
            let line = match line.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => {
                    rest
                }
                _ => line,
            };
            if line.starts_with('[') {
                header = line.trim().to_string();
            } else if let Some((key, _)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
                keys.push((header.clone(), key.trim().to_string()));
            }
        }
        assert!(keys.len() > 20, "too few keys found: {keys:?}");
        for (header, key) in keys {
            assert!(
                LONG_ABOUT.contains(&format!("\n  {key} = ")),
                "{header} {key} is not in `ferry serve --help`"
            );
            let row = if header.is_empty() {
                format!("| `{key}` |")
            } else {
                format!("| `{header} {key}` |")
            };
            assert!(docs.contains(&row), "{row} is not in docs/remote.md");
        }
    }
}
