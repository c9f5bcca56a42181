//! Tokens and scopes.
//!
//! A server knows tokens only by their SHA-256 (hex), each with a label and
//! two lists of name prefixes: what it may read and what it may write. A
//! pull-request build typically reads `main` and `pr/1234` and writes only
//! `pr/1234`; only a trusted branch build writes `main`. Prefixes match whole
//! name parts (`main` covers `main/ci_gpu`, not `mainline/x`); `*` covers
//! every name.
//!
//! Clients read their token from a file (`--token-file` or
//! `$FERRY_TOKEN_FILE`), never from the command line, where other users of
//! the machine could see it.
//!
//! ```
//! use transfer::auth::{Scopes, TokenTable, Token};
//! let token = Token::new("s3cret-for-pr-1234").unwrap();
//! let scopes = Scopes::parse(&["main", "pr/1234"], &["pr/1234"]).unwrap();
//! let table = TokenTable::new(vec![("pr-1234".into(), token.hash(), scopes)]);
//! let grant = table.authenticate("s3cret-for-pr-1234").unwrap();
//! let name = |s| store::name::Name::parse(s).unwrap();
//! assert!(grant.scopes.can_read(&name("main/ci_gpu")));
//! assert!(!grant.scopes.can_write(&name("main/ci_gpu")));
//! assert!(grant.scopes.can_write(&name("pr/1234/ci_gpu")));
//! assert!(!grant.scopes.can_read(&name("pr/999/ci_gpu")));
//! ```

use rand::Rng;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::name::Name;

/// Environment variable naming the client's token file.
pub const TOKEN_FILE_ENV: &str = "FERRY_TOKEN_FILE";

/// What is wrong with a token, a hash or a scope.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token file could not be read.
    #[error("cannot read the token file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The token is empty, too long, or has spaces or control characters.
    #[error("{what}: {problem}")]
    BadToken {
        /// Where it came from.
        what: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A token hash is not 64 hex digits.
    #[error("token hash {0:?} is not a SHA-256 in hex (64 hex digits)")]
    BadHash(String),
    /// A scope is not a name prefix.
    #[error(
        "scope {scope:?} is not a name prefix ({problem}); use e.g. \"main\", \"pr/1234\" or \"*\""
    )]
    BadScope {
        /// The scope.
        scope: String,
        /// What is wrong.
        problem: String,
    },
}

/// A secret token. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Checks a token's text: 1 to 4096 visible ASCII characters.
    pub fn new(text: &str) -> Result<Token, AuthError> {
        Self::checked(text, "token")
    }

    fn checked(text: &str, what: &str) -> Result<Token, AuthError> {
        let bad = |problem| AuthError::BadToken {
            what: what.to_string(),
            problem,
        };
        if text.is_empty() {
            return Err(bad("the token is empty"));
        }
        if text.len() > crate::proto::MAX_TOKEN_LEN {
            return Err(bad("the token is longer than 4096 bytes"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the token has spaces, control or non-ASCII characters"));
        }
        Ok(Token(text.to_string()))
    }

    /// A new random token (256 bits, hex).
    pub fn generate() -> Token {
        let mut bytes = [0u8; 32];
        rand::rng().fill(&mut bytes);
        Token(store::id::to_hex(&bytes))
    }

    /// The secret text (to send in `Hello`).
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Its SHA-256, what the server's config holds.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

/// Reads a token from `path`; surrounding whitespace (a trailing newline)
/// is ignored.
pub fn read_token_file(path: &Path) -> Result<Token, AuthError> {
    let read_err = |error| AuthError::Read {
        path: path.to_path_buf(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > 2 * crate::proto::MAX_TOKEN_LEN as u64 {
        return Err(AuthError::BadToken {
            what: format!("token file {}", path.display()),
            problem: "the file is too large to be a token",
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    Token::checked(text.trim(), &format!("token file {}", path.display()))
}

/// The client's token file: `flag` (`--token-file`), else the file
/// `$FERRY_TOKEN_FILE` names, else none.
pub fn client_token_file(flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(TOKEN_FILE_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// The client's token, read from [`client_token_file`], if there is one.
pub fn client_token(flag: Option<&Path>) -> Result<Option<Token>, AuthError> {
    client_token_file(flag)
        .map(|p| read_token_file(&p))
        .transpose()
}

/// A warning if the token file at `path` is open to other users of the
/// machine (any group or other permission bit): whoever can read it can
/// act as this job. Not an error: secret files some CI systems mount are
/// group- or world-readable by default, and refusing them would only make
/// people copy the token somewhere worse.
pub fn token_file_exposure(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Some(format!(
                "the token file {} is open to other users of this machine (mode {mode:04o}); \
                 make it private: chmod 600 {}",
                path.display(),
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    None
}

/// SHA-256 of a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.to_hex())
    }
}

impl TokenHash {
    /// The hash of `token`'s text.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses 64 hex digits (upper or lower case).
    pub fn from_hex(hex: &str) -> Result<TokenHash, AuthError> {
        parse_hex32(hex.trim())
            .map(TokenHash)
            .ok_or_else(|| AuthError::BadHash(hex.to_string()))
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        store::id::to_hex(&self.0)
    }

    fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Parses 64 hex digits into 32 bytes.
pub(crate) fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// A name prefix a token is granted. Empty: every name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope(String);

impl Scope {
    /// Parses `main`, `pr/1234`, `main/*` (same as `main`) or `*` (all).
    pub fn parse(text: &str) -> Result<Scope, AuthError> {
        let t = text.trim();
        if t == "*" {
            return Ok(Scope(String::new()));
        }
        let t = t.strip_suffix("/*").unwrap_or(t).trim_end_matches('/');
        if t.is_empty() {
            return Err(AuthError::BadScope {
                scope: text.to_string(),
                problem: "it is empty (write \"*\" for every name)".into(),
            });
        }
        Name::parse(t).map_err(|e| AuthError::BadScope {
            scope: text.to_string(),
            problem: e.to_string(),
        })?;
        Ok(Scope(t.to_string()))
    }

    /// Whether `name` is under this prefix.
    pub fn covers(&self, name: &Name) -> bool {
        name.starts_with_prefix(&self.0)
    }

    /// The prefix ("" for every name).
    pub fn prefix(&self) -> &str {
        &self.0
    }
}

/// As the server's config writes it (`pr/1234/*`, `*`), so that a refusal
/// reads as a prefix, not as one exact name.
impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("*")
        } else {
            write!(f, "{}/*", self.0)
        }
    }
}

/// What a token may read and write, and whether it may administer the
/// server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes {
    /// Readable prefixes.
    pub read: Vec<Scope>,
    /// Writable prefixes.
    pub write: Vec<Scope>,
    /// The admin scope: may run a collection on the server (`ferry gc
    /// --remote`), which can remove any name whatever `read` and `write`
    /// say.
    pub admin: bool,
}

impl Scopes {
    /// Parses two lists of prefixes (no admin scope).
    pub fn parse(read: &[&str], write: &[&str]) -> Result<Scopes, AuthError> {
        Ok(Scopes {
            read: read
                .iter()
                .map(|s| Scope::parse(s))
                .collect::<Result<_, _>>()?,
            write: write
                .iter()
                .map(|s| Scope::parse(s))
                .collect::<Result<_, _>>()?,
            admin: false,
        })
    }

    /// The same scopes, with the admin scope granted or not.
    pub fn with_admin(mut self, admin: bool) -> Scopes {
        self.admin = admin;
        self
    }

    /// Whether `name` may be read (fetched, listed).
    pub fn can_read(&self, name: &Name) -> bool {
        self.read.iter().any(|s| s.covers(name))
    }

    /// Whether `name` may be written (uploaded to, committed).
    pub fn can_write(&self, name: &Name) -> bool {
        self.write.iter().any(|s| s.covers(name))
    }

    /// Whether every name under `prefix` (whole parts; "" for every name)
    /// is writable: some write scope covers the prefix itself.
    pub fn can_write_under(&self, prefix: &str) -> bool {
        let prefix = prefix.trim_end_matches('/');
        self.write.iter().any(|s| {
            s.prefix().is_empty()
                || (!prefix.is_empty() && Name::parse(prefix).is_ok_and(|n| s.covers(&n)))
        })
    }

    /// The readable prefixes, for messages.
    pub fn describe_read(&self) -> String {
        describe(&self.read)
    }

    /// The writable prefixes, for messages.
    pub fn describe_write(&self) -> String {
        describe(&self.write)
    }
}

fn describe(scopes: &[Scope]) -> String {
    if scopes.is_empty() {
        return "nothing".into();
    }
    scopes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an authenticated token is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's label from the config (for logs; never the secret).
    pub label: String,
    /// Its scopes.
    pub scopes: Scopes,
    /// At most this many connections may hold this token at once
    /// (`max_connections` in its `[[token]]` entry); `None`: only the
    /// server's own limit.
    pub max_connections: Option<u32>,
}

/// The tokens a server accepts, kept hashed.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    entries: Vec<(TokenHash, Grant)>,
}

impl TokenTable {
    /// A table of (label, hash, scopes).
    pub fn new(entries: Vec<(String, TokenHash, Scopes)>) -> TokenTable {
        TokenTable {
            entries: entries
                .into_iter()
                .map(|(label, hash, scopes)| {
                    let grant = Grant {
                        label,
                        scopes,
                        max_connections: None,
                    };
                    (hash, grant)
                })
                .collect(),
        }
    }

    /// The same table, with at most `max` connections at once for the
    /// token labelled `label` (see [`TokenConnections`]).
    pub fn limit_connections(mut self, label: &str, max: u32) -> TokenTable {
        for (_, grant) in &mut self.entries {
            if grant.label == label {
                grant.max_connections = Some(max);
            }
        }
        self
    }

    /// The grant of `token`, if it is known. Every entry is compared, in
    /// constant time, so timing does not tell how close a guess was.
    pub fn authenticate(&self, token: &str) -> Option<&Grant> {
        self.grant_of(&TokenHash::of(token))
    }

    /// What the token whose hash is `hash` is granted now, if anything:
    /// for a session authenticated earlier, after the table was replaced.
    pub fn grant_of(&self, hash: &TokenHash) -> Option<&Grant> {
        let mut found = None;
        for (h, grant) in &self.entries {
            if h.ct_eq(hash) && found.is_none() {
                found = Some(grant);
            }
        }
        found
    }

    /// The tokens' labels, in config order.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(_, g)| g.label.as_str())
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Connections held per token, so that one token's holders (say, every
/// pull-request build) cannot take all of the server's connection slots
/// and lock the others (the branch builds) out.
///
/// Counted by label: entries that share one (an old and a new token while
/// rotating) share a count, and the config makes them agree on the
/// limit. Sans-IO: the server takes a [`TokenConnection`] after the hello
/// and holds it while the connection lives.
#[derive(Debug, Default)]
pub struct TokenConnections {
    held: Mutex<HashMap<String, u32>>,
}

impl TokenConnections {
    /// Counts for `tokens`, each at 0 (so that every token has a count to
    /// report, in use or not).
    pub fn new(tokens: &TokenTable) -> TokenConnections {
        let held = tokens.labels().map(|l| (l.to_string(), 0)).collect();
        TokenConnections {
            held: Mutex::new(held),
        }
    }

    /// After the tokens were replaced by `tokens`: new labels get a count
    /// (at 0); labels no token has any more are dropped unless connections
    /// still hold them.
    pub fn retain_tokens(&self, tokens: &TokenTable) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let labels: HashSet<&str> = tokens.labels().collect();
        held.retain(|label, n| *n > 0 || labels.contains(label.as_str()));
        for label in labels {
            held.entry(label.to_string()).or_insert(0);
        }
    }

    /// Every token's connections now, by label.
    pub fn snapshot(&self) -> Vec<(String, u32)> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = held.iter().map(|(l, n)| (l.clone(), *n)).collect();
        all.sort();
        all
    }

    /// Takes one of `grant`'s connections, or returns `None` if its
    /// holders already have all it may have (`grant.max_connections`).
    pub fn take(self: &Arc<Self>, grant: &Grant) -> Option<TokenConnection> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(grant.label.clone()).or_insert(0);
        if grant.max_connections.is_some_and(|max| *n >= max) {
            return None;
        }
        *n += 1;
        Some(TokenConnection {
            owner: self.clone(),
            label: grant.label.clone(),
        })
    }

    /// How many connections hold the token labelled `label` now.
    pub fn held(&self, label: &str) -> u32 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(label).copied().unwrap_or(0)
    }
}

/// One connection's hold on its token; given back when dropped.
#[derive(Debug)]
pub struct TokenConnection {
    owner: Arc<TokenConnections>,
    label: String,
}

impl Drop for TokenConnection {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.label) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Most source addresses [`AuthThrottle`] remembers. When full, addresses
/// whose failures have aged out go first, then the one whose last failure
/// is oldest: memory stays bounded whatever the number of attackers.
pub const MAX_THROTTLED_ADDRESSES: usize = 65_536;

/// Failed authentications by source address, to slow down token guessing.
///
/// An address that failed `max_failures` times within `window` is refused
/// (whatever token it brings) until the oldest of those failures is
/// `window` old: at most `max_failures` guesses per window and address, and
/// as many log lines. IPv4 addresses count one by one; IPv6 addresses by
/// their /64, which one host usually holds whole. Refused attempts do not
/// count as failures (they test no token). Sans-IO: the caller passes the
/// time.
#[derive(Debug)]
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    /// The newest (at most `max_failures`) failure times per address.
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl AuthThrottle {
    /// Refuses an address after `max_failures` failures within `window`;
    /// `max_failures == 0` never refuses.
    pub fn new(max_failures: u32, window: Duration) -> AuthThrottle {
        AuthThrottle {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The failures that make an address refused (0: no limit).
    pub fn max_failures(&self) -> u32 {
        self.max_failures
    }

    /// The window failures are counted in.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The key `addr` is counted under: the IPv4 address, or the /64 of an
    /// IPv6 one (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn key(addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => addr,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
        }
    }

    /// How much longer `addr` is refused, or `None` if it may authenticate.
    pub fn refused_for(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        if self.max_failures == 0 {
            return None;
        }
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let key = Self::key(addr);
        let times = map.get_mut(&key)?;
        self.expire(times, now);
        if times.is_empty() {
            map.remove(&key);
            return None;
        }
        self.refusal(times, now)
    }

    /// Records a failed authentication from `addr`. Returns how long the
    /// address is now refused if this failure reached the limit.
    pub fn failed(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        if self.max_failures == 0 {
            return None;
        }
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let key = Self::key(addr);
        if !map.contains_key(&key) && map.len() >= MAX_THROTTLED_ADDRESSES {
            self.make_room(&mut map, now);
        }
        let times = map.entry(key).or_default();
        self.expire(times, now);
        times.push_back(now);
        // Only the newest `max_failures` decide when the address is free.
        while times.len() > self.max_failures as usize {
            times.pop_front();
        }
        self.refusal(times, now)
    }

    /// Addresses tracked now (for tests).
    pub fn tracked(&self) -> usize {
        self.failures.lock().map_or(0, |m| m.len())
    }

    fn expire(&self, times: &mut VecDeque<Instant>, now: Instant) {
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
    }

    fn refusal(&self, times: &VecDeque<Instant>, now: Instant) -> Option<Duration> {
        if times.len() < self.max_failures as usize {
            return None;
        }
        let oldest = *times.front()?;
        Some(
            self.window
                .saturating_sub(now.saturating_duration_since(oldest)),
        )
    }

    fn make_room(&self, map: &mut HashMap<IpAddr, VecDeque<Instant>>, now: Instant) {
        map.retain(|_, times| {
            times
                .back()
                .is_some_and(|t| now.saturating_duration_since(*t) < self.window)
        });
        if map.len() >= MAX_THROTTLED_ADDRESSES {
            let stalest = map
                .iter()
                .min_by_key(|(_, times)| times.back().copied())
                .map(|(k, _)| *k);
            if let Some(k) = stalest {
                map.remove(&k);
            }
        }
    }
}

/// Connections from one address (keyed as [`AuthThrottle::key`]) whose
/// handshake is done but whose hello is not answered yet. A peer needs no
/// token to get that far, and each such connection holds a server slot
/// until the hello deadline: without a bound, one host could hold them
/// all. Authenticated connections do not count, so many clients behind one
/// NAT are not limited (their hellos take a round trip). Sans-IO: the
/// server holds a [`PendingHello`] from the handshake to the welcome.
#[derive(Debug)]
pub struct PendingHellos {
    max: u32,
    by_address: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection from an address waiting to say hello; counted until
/// dropped.
#[derive(Debug)]
pub struct PendingHello {
    table: Arc<PendingHellos>,
    key: IpAddr,
}

impl PendingHellos {
    /// At most `max` per address (0: no limit).
    pub fn new(max: u32) -> Arc<PendingHellos> {
        Arc::new(PendingHellos {
            max,
            by_address: Mutex::new(HashMap::new()),
        })
    }

    /// The limit (0: none).
    pub fn max(&self) -> u32 {
        self.max
    }

    /// A place for one more connection from `addr`, or `None` if `max` of
    /// its connections are waiting to say hello already.
    pub fn take(self: &Arc<Self>, addr: IpAddr) -> Option<PendingHello> {
        let key = AuthThrottle::key(addr);
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PendingHello {
            table: Arc::clone(self),
            key,
        })
    }

    /// Connections from `addr` waiting now.
    pub fn waiting(&self, addr: IpAddr) -> u32 {
        let map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&AuthThrottle::key(addr)).copied().unwrap_or(0)
    }
}

impl Drop for PendingHello {
    fn drop(&mut self) {
        let mut map = self
            .table
            .by_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            // Gone when none wait: the map holds only live connections.
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_waiting_to_say_hello_are_bounded_per_address() {
        let table = PendingHellos::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = table.take(a).unwrap();
        let second = table.take(a).unwrap();
        assert!(table.take(a).is_none(), "a third from one address");
        let other = table
            .take(b)
            .expect("another address has places of its own");
        assert_eq!((table.waiting(a), table.waiting(b)), (2, 1));
        drop(first);
        let again = table.take(a).expect("a place freed by a welcome");
        drop((second, again, other));
        assert_eq!((table.waiting(a), table.waiting(b)), (0, 0));
        assert!(table.by_address.lock().unwrap().is_empty(), "no entry left");

        // An IPv6 host holds its /64 and counts as one address.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let one = table.take(v6("2001:db8::1")).unwrap();
        let two = table.take(v6("2001:db8::ffff:2")).unwrap();
        assert!(table.take(v6("2001:db8::3")).is_none());
        assert!(table.take(v6("2001:db8:0:1::1")).is_some(), "another /64");
        drop((one, two));

        // 0: no limit.
        let open = PendingHellos::new(0);
        let held: Vec<_> = (0..100).map(|_| open.take(a).unwrap()).collect();
        assert_eq!(open.waiting(a), 100);
        drop(held);
        assert_eq!(open.waiting(a), 0);
    }

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[test]
    fn scopes_table() {
        let pr = Scopes::parse(&["main", "pr/1234"], &["pr/1234"]).unwrap();
        let branch = Scopes::parse(&["*"], &["main/*", "pr"]).unwrap();
        let reader = Scopes::parse(&["main/"], &[]).unwrap();
        // (scopes, name, can read, can write)
        let cases: &[(&Scopes, &str, bool, bool)] = &[
            (&pr, "main/ci_gpu", true, false),
            (&pr, "main", true, false),
            (&pr, "mainline/x", false, false),
            (&pr, "pr/1234/ci_gpu", true, true),
            (&pr, "pr/1234", true, true),
            (&pr, "pr/12345/ci_gpu", false, false),
            (&pr, "pr/999/ci_gpu", false, false),
            (&pr, "build/1/x", false, false),
            (&branch, "main/ci_gpu", true, true),
            (&branch, "pr/7/x", true, true),
            (&branch, "build/1/x", true, false),
            (&reader, "main/a/b/c", true, false),
            (&reader, "pr/1/a", false, false),
        ];
        for &(scopes, n, r, w) in cases {
            assert_eq!(scopes.can_read(&name(n)), r, "read {n} with {scopes:?}");
            assert_eq!(scopes.can_write(&name(n)), w, "write {n} with {scopes:?}");
        }
    }

    #[test]
    fn scope_parsing() {
        assert_eq!(Scope::parse("*").unwrap().prefix(), "");
        assert_eq!(Scope::parse("main/*").unwrap().prefix(), "main");
        assert_eq!(Scope::parse("pr/12/").unwrap().prefix(), "pr/12");
        assert_eq!(Scope::parse("*").unwrap().to_string(), "*");
        for written in ["pr/12", "pr/12/", "pr/12/*"] {
            assert_eq!(Scope::parse(written).unwrap().to_string(), "pr/12/*");
        }
        for bad in ["", "/", "../x", "a//b", "/abs", "pr/*/x"] {
            assert!(Scope::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tokens_authenticate_by_hash_only() {
        let a = Token::new("alpha-token").unwrap();
        let b = Token::new("beta-token").unwrap();
        let table = TokenTable::new(vec![
            ("a".into(), a.hash(), Scopes::default()),
            ("b".into(), b.hash(), Scopes::parse(&["*"], &[]).unwrap()),
        ]);
        assert_eq!(table.authenticate("alpha-token").unwrap().label, "a");
        assert_eq!(table.authenticate("beta-token").unwrap().label, "b");
        assert!(table.authenticate("gamma").is_none());
        assert!(table.authenticate("").is_none());
        assert!(table.authenticate("alpha-token ").is_none());
        let hex = a.hash().to_hex();
        assert_eq!(TokenHash::from_hex(&hex).unwrap(), a.hash());
        assert_eq!(TokenHash::from_hex(&hex.to_uppercase()).unwrap(), a.hash());
        assert!(TokenHash::from_hex(&hex[1..]).is_err());
        assert!(TokenHash::from_hex(&format!("{}g", &hex[1..])).is_err());
        assert!(!format!("{a:?}").contains("alpha"));
    }

    #[test]
    fn a_token_with_a_connection_limit_holds_at_most_that_many() {
        let pr = Token::new("pr-token").unwrap();
        let main = Token::new("main-token").unwrap();
        let table = TokenTable::new(vec![
            ("pr".into(), pr.hash(), Scopes::default()),
            ("main".into(), main.hash(), Scopes::default()),
        ])
        .limit_connections("pr", 2);
        let pr = table.authenticate("pr-token").unwrap();
        let main = table.authenticate("main-token").unwrap();
        assert_eq!(pr.max_connections, Some(2));
        assert_eq!(main.max_connections, None);

        let held = Arc::new(TokenConnections::new(&table));
        assert_eq!(held.snapshot(), [("main".into(), 0), ("pr".into(), 0)]);
        let first = held.take(pr).expect("first of two");
        let second = held.take(pr).expect("second of two");
        assert!(held.take(pr).is_none(), "a third one got in");
        assert_eq!(held.held("pr"), 2);
        // Another token is not affected, and has no limit of its own.
        let mains: Vec<_> = (0..10).map(|_| held.take(main).unwrap()).collect();
        assert_eq!(held.held("main"), 10);
        assert_eq!(held.snapshot(), [("main".into(), 10), ("pr".into(), 2)]);
        // A connection that ends gives its hold back.
        drop(first);
        assert_eq!(held.held("pr"), 1);
        let third = held.take(pr).expect("a freed hold is taken again");
        assert!(held.take(pr).is_none());
        drop((second, third, mains));
        assert_eq!(held.held("pr"), 0);
        assert_eq!(held.held("main"), 0);
        assert_eq!(held.snapshot(), [("main".into(), 0), ("pr".into(), 0)]);
    }

    #[cfg(unix)]
    #[test]
    fn token_files_open_to_others_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "abc123\n").unwrap();
        let set = |mode| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
        for private in [0o600, 0o400, 0o700] {
            set(private).unwrap();
            assert_eq!(token_file_exposure(&p), None, "{private:o}");
        }
        for open in [0o644, 0o640, 0o604, 0o660, 0o606] {
            set(open).unwrap();
            let w = token_file_exposure(&p).unwrap_or_else(|| panic!("{open:o} not named"));
            assert!(w.contains(&format!("mode {open:04o}")), "{w}");
            assert!(w.contains("chmod 600") && w.contains("tok"), "{w}");
        }
        assert_eq!(token_file_exposure(&dir.path().join("nope")), None);
        assert_eq!(client_token_file(Some(&p)), Some(p.clone()));
    }

    #[test]
    fn token_text_is_checked() {
        assert!(Token::new("").is_err());
        assert!(Token::new("has space").is_err());
        assert!(Token::new("tab\there").is_err());
        assert!(Token::new("ünicode").is_err());
        assert!(Token::new(&"x".repeat(4097)).is_err());
        let t = Token::generate();
        assert_eq!(t.secret().len(), 64);
        assert_ne!(Token::generate(), t);
    }

    #[test]
    fn token_files_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "  abc123\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap().secret(), "abc123");
        std::fs::write(&p, "\n").unwrap();
        let e = read_token_file(&p).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("tok"), "{e}");
        let e = read_token_file(&dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(client_token(Some(&dir.path().join("nope"))).is_err());
        std::fs::write(&p, "abc123\n").unwrap();
        assert_eq!(client_token(Some(&p)).unwrap().unwrap().secret(), "abc123");
    }
    #[test]
    fn throttle_refuses_after_repeated_failures_within_the_window() {
        let t = AuthThrottle::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(t.refused_for(a, at(0)), None);
        assert_eq!(t.failed(a, at(0)), None);
        assert_eq!(t.failed(a, at(10)), None);
        assert_eq!(t.refused_for(a, at(11)), None);
        // The third failure within 60 s: refused until the first is 60 s old.
        assert_eq!(t.failed(a, at(20)), Some(Duration::from_secs(40)));
        assert_eq!(t.refused_for(a, at(30)), Some(Duration::from_secs(30)));
        assert_eq!(
            t.refused_for(b, at(30)),
            None,
            "other addresses are not affected"
        );
        // Once the first failure ages out, one more try.
        assert_eq!(t.refused_for(a, at(60)), None);
        assert_eq!(t.failed(a, at(61)), Some(Duration::from_secs(9)));
        assert_eq!(t.refused_for(a, at(69)), Some(Duration::from_secs(1)));
        assert_eq!(t.refused_for(a, at(200)), None);
        assert_eq!(t.tracked(), 0, "aged-out addresses are forgotten");
        // 0: no limit.
        let off = AuthThrottle::new(0, Duration::from_secs(60));
        for s in 0..100 {
            assert_eq!(off.failed(a, at(s)), None);
        }
        assert_eq!(off.refused_for(a, at(100)), None);
    }

    #[test]
    fn throttle_counts_ipv6_by_64_and_stays_bounded() {
        let t = AuthThrottle::new(2, Duration::from_secs(60));
        let now = Instant::now();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(t.failed(one, now), None);
        assert!(t.failed(same64, now).is_some());
        assert!(t.refused_for(one, now).is_some());
        assert_eq!(t.refused_for(other64, now), None);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            AuthThrottle::key(mapped),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        // Many addresses: the table never grows past its bound.
        let t = AuthThrottle::new(5, Duration::from_secs(60));
        for i in 0..(MAX_THROTTLED_ADDRESSES as u32 + 100) {
            t.failed(IpAddr::V4(i.into()), now);
        }
        assert_eq!(t.tracked(), MAX_THROTTLED_ADDRESSES);
    }
}
