//! `ferry stash --remote` and `ferry unstash --remote` as a CI job runs
//! them: separate processes with their own stores (builders and test
//! nodes) and one `ferry serve` process on 127.0.0.1.

use crate::util::*;
use serde_json::Value;
use std::fs;
use std::path::Path;

/// A node: its own store, pointed at the server by the environment.
struct Node<'a> {
    env: Env,
    server: &'a Serve,
    token: &'a Path,
}

impl<'a> Node<'a> {
    fn new(server: &'a Serve, token: &'a Path) -> Node<'a> {
        Node {
            env: Env::new(),
            server,
            token,
        }
    }

    /// `ferry ARGS` with this node's environment, not started.
    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = self.env.cmd();
        cmd.env("FERRY_REMOTE", &self.server.remote)
            .env("FERRY_SERVER_CERT", &self.server.cert)
            .env("FERRY_TOKEN_FILE", self.token)
            .args(args);
        cmd
    }

    fn ferry(&self, args: &[&str]) -> Out {
        run(&mut self.cmd(args), None)
    }

    /// `--json` output of several documents, in order.
    fn docs(out: &Out) -> Vec<Value> {
        serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter::<Value>()
            .map(|d| d.expect("JSON documents on stdout"))
            .collect()
    }

    /// Stashes `file` under `name` through the server: (stash, push) reports.
    #[track_caller]
    fn stash(&self, name: &str, file: &Path) -> (Value, Value) {
        let out = self.ferry(&["--json", "stash", name, file.to_str().unwrap()]);
        out.ok();
        let mut docs = Self::docs(&out);
        assert_eq!(docs.len(), 2, "stash --remote prints two documents");
        let push = docs.pop().unwrap();
        (docs.pop().unwrap(), push)
    }
}

/// A `ferry serve` in `root` with one token that reads and writes every
/// name; the token's file.
fn ci_server(root: &Path) -> (Serve, std::path::PathBuf) {
    ci_server_with(root, "")
}

/// [`ci_server`], with `more` (TOML lines) after the token's entry: its
/// keys, then maybe other tables.
fn ci_server_with(root: &Path, more: &str) -> (Serve, std::path::PathBuf) {
    let token = root.join("ci.token");
    let hash = new_token(&token);
    let server = serve(
        root,
        &format!(
            "[[token]]\nname = \"ci\"\nsha256 = \"{hash}\"\nread = [\"*\"]\nwrite = [\"*\"]\n{more}"
        ),
    );
    (server, token)
}

#[test]
fn builders_upload_only_what_the_server_lacks_and_nodes_fetch_only_what_they_lack() {
    let root = tempfile::tempdir().unwrap();
    let (server, token) = ci_server(root.path());
    let layers: Vec<Vec<LayerFile>> = (1..=3).map(|i| layer_files(i, 8, 400_000)).collect();
    let v1 = image_archive(Layout::DockerOci, &layers, "ci/app:v1", 1_700_000_000);
    let mut layers2 = layers.clone();
    layers2[2] = layer_files(9, 8, 400_000);
    let v2 = image_archive(Layout::DockerOci, &layers2, "ci/app:v2", 1_700_000_000);
    let (v1_file, v2_file) = (root.path().join("v1.tar"), root.path().join("v2.tar"));
    fs::write(&v1_file, &v1.bytes).unwrap();
    fs::write(&v2_file, &v2.bytes).unwrap();

    // A builder with an empty store: every chunk goes up (most while its
    // stash runs), each once.
    let builder = Node::new(&server, &token);
    let (stash, push) = builder.stash("main/app", &v1_file);
    let new = stash["new_chunks"].as_u64().unwrap();
    let s = &push["stats"];
    assert_eq!(s["chunks"], new, "{push}");
    assert_eq!(s["chunks_sent"], new, "{push}");
    assert_eq!(s["chunks_present"], 0, "{push}");
    assert_eq!(s["bytes_sent"], stash["stored_bytes"], "{push}");
    // Of those, what the server had when the stash ended (this small image
    // makes one pack, offered as the stash ends: maybe none yet).
    assert!(
        s["chunks_sent_early"].as_u64().unwrap_or(0) <= new,
        "{push}"
    );
    assert_eq!(push["manifest"], stash["manifest"]);

    // Another builder, empty store, same image: nothing goes up.
    let other = Node::new(&server, &token);
    let (_, push) = other.stash("main/app-again", &v1_file);
    assert_eq!(push["stats"]["chunks_sent"], 0, "{push}");
    assert_eq!(push["stats"]["chunks_present"], new, "{push}");
    assert!(push["stats"].get("chunks_sent_early").is_none(), "{push}");

    // v2 from the first builder: only the changed layer's chunks go up.
    let (stash2, push2) = builder.stash("main/app-v2", &v2_file);
    let new2 = stash2["new_chunks"].as_u64().unwrap();
    assert!(new2 > 0 && new2 < new, "{stash2}");
    assert_eq!(push2["stats"]["chunks_sent"], new2, "{push2}");

    // A test node fetches v1 whole, then only v2's new chunks, then nothing.
    let node = Node::new(&server, &token);
    let out_path = root.path().join("out.tar");
    let fetched = |name: &str| {
        let _ = fs::remove_file(&out_path);
        let out = node.ferry(&["--json", "unstash", name, out_path.to_str().unwrap()]);
        out.ok();
        out.json()["transfer"]["chunks_received"].as_u64().unwrap()
    };
    assert_eq!(fetched("main/app"), new);
    assert_bytes_eq(&fs::read(&out_path).unwrap(), &v1.bytes, "main/app");
    assert_eq!(fetched("main/app-v2"), new2);
    assert_bytes_eq(&fs::read(&out_path).unwrap(), &v2.bytes, "main/app-v2");
    assert_eq!(fetched("main/app-v2"), 0);
    let out = node.ferry(&["unstash", "main/app", "-"]);
    out.ok();
    assert_bytes_eq(&out.stdout, &v1.bytes, "main/app to stdout");

    // Without --json: one line says what went up.
    let notes = root.path().join("notes.bin");
    fs::write(&notes, random_bytes(77, 300_000)).unwrap();
    let out = Node::new(&server, &token).ferry(&["stash", "main/notes", notes.to_str().unwrap()]);
    out.ok();
    let text = out.out();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("pushed to {}: ", server.remote)))
        .unwrap_or_else(|| panic!("no push line: {text}"));
    assert!(line.contains(", 0 already there; "), "{line}");

    // The server's store is whole.
    fsck_full(&server.store);
}

/// Packs are written past the page cache (O_DIRECT) by a local stash, the
/// server and a node cache filled by an unstash; a remote stash hands its
/// chunks to the upload, so it reads none of its packs back.
#[cfg(target_os = "linux")]
#[test]
fn packs_bypass_the_page_cache_and_a_remote_stash_reads_none_back() {
    let root = tempfile::tempdir().unwrap();
    if !store::testutil::takes_o_direct(root.path()) {
        eprintln!("the temp directory's file system refuses O_DIRECT; skipped");
        return;
    }
    let (server, token) = ci_server(root.path());
    // Incompressible: each store's one pack holds 6 MiB, so its first five
    // 1 MiB blocks are written whole.
    let file = root.path().join("blob.bin");
    let data = random_bytes(31, 6 << 20);
    fs::write(&file, &data).unwrap();
    let whole_blocks = 5 * 256;
    let cached = |store: &Path| {
        let packs = packs_in(store);
        assert_eq!(packs.len(), 1, "{packs:?}");
        store::testutil::resident(&packs[0])[..whole_blocks]
            .iter()
            .filter(|&&r| r)
            .count()
    };

    let local = Env::new();
    local
        .ferry(&["stash", "main/blob", file.to_str().unwrap()])
        .ok();
    assert_eq!(cached(&local.store), 0, "a local stash's pack");

    // The builder's pack goes direct too, and its upload takes the chunks
    // from the stash: reading the pack back (a buffered read) would have
    // brought its pages into the page cache.
    let builder = Node::new(&server, &token);
    builder
        .ferry(&["stash", "main/blob", file.to_str().unwrap()])
        .ok();
    assert_eq!(
        cached(&builder.env.store),
        0,
        "the builder's pack: written buffered, or read back for the upload"
    );
    assert_eq!(cached(&server.store), 0, "the server's pack");

    let node = Node::new(&server, &token);
    let out = root.path().join("out.bin");
    node.ferry(&["unstash", "main/blob", out.to_str().unwrap()])
        .ok();
    assert_eq!(cached(&node.env.store), 0, "the node cache's pack");
    assert_bytes_eq(&fs::read(&out).unwrap(), &data, "main/blob");
}

/// A token file that other users of the machine can read still works, but
/// the client says so, naming the file and the fix; a private one (as
/// `ferry serve --new-token` writes it) gets no warning.
#[test]
fn a_token_file_open_to_other_users_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let (server, token) = ci_server(root.path());
    let node = Node::new(&server, &token);
    let out = node.ferry(&["ls"]);
    out.ok();
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);

    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    let out = node.ferry(&["ls"]);
    out.ok();
    let warning = format!(
        "ferry: warning: the token file {} is open to other users of this machine \
         (mode 0644); make it private: chmod 600 {}",
        token.display(),
        token.display()
    );
    assert!(out.stderr.contains(&warning), "{}", out.stderr);
}

/// A token at its connection limit (`max_connections = 1`): with
/// `--busy-wait 0` a command gives up at once, saying why; by default it
/// waits for the slot and gets it when the job holding it ends.
#[test]
fn a_command_waits_for_its_tokens_connection_slot_unless_told_not_to() {
    use std::io::Write;
    use std::process::Stdio;
    let root = tempfile::tempdir().unwrap();
    let (server, token) = ci_server_with(root.path(), "max_connections = 1\n");
    let node = Node::new(&server, &token);

    // A stash reading a pipe that stays open holds the token's connection
    // (its upload connects at the start).
    let mut holder = node
        .cmd(&["stash", "main/held", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = holder.stdin.take().unwrap();
    pipe.write_all(&random_bytes(5, 300_000)).unwrap();
    let refusal = "token \"ci\" is at its connection limit (max_connections = 1";
    // Probes are spaced out: each holds the slot for a moment, and a
    // holder refused meanwhile would itself wait.
    let started = std::time::Instant::now();
    let out = loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let out = node.ferry(&["ls", "--busy-wait", "0"]);
        if !out.status.success() || started.elapsed().as_secs() > 20 {
            break out;
        }
    };
    assert!(!out.status.success(), "the holder never held the slot");
    assert!(out.stderr.contains(refusal), "{}", out.stderr);
    // At once: one attempt, no retry, no waiting.
    assert!(
        !out.stderr.contains("retrying") && !out.stderr.contains("waiting for a slot"),
        "{}",
        out.stderr
    );

    // By default `ls` waits; it is served once the stash ends.
    let mut waiting = node
        .cmd(&["ls"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(waiting.try_wait().unwrap().is_none(), "ls did not wait");
    drop(pipe);
    let held = holder.wait_with_output().unwrap();
    assert!(
        held.status.success(),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    let listed = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&listed.stderr);
    assert!(listed.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&listed.stdout).contains("main/held"));
    assert!(
        stderr.contains("the server is busy; waiting for a slot"),
        "{stderr}"
    );
}

/// `ferry fsck --full` of a server's store.
fn fsck_full(store: &Path) {
    let out = run(
        std::process::Command::new(FERRY)
            .arg("--store")
            .arg(store)
            .args(["fsck", "--full"]),
        None,
    );
    out.ok();
}

/// [`ci_server`] with its store on a tmpfs mounted with `options` and
/// `min_free_bytes = reserve`; `None` where mounting is not allowed.
fn server_on_tmpfs(
    root: &Path,
    options: &str,
    reserve: u64,
) -> Option<(Mount, Serve, std::path::PathBuf)> {
    let disk = Mount::tmpfs(&root.join("disk"), options)?;
    fs::create_dir(disk.dir.join("store")).unwrap();
    std::os::unix::fs::symlink(disk.dir.join("store"), root.join("server-store")).unwrap();
    let (server, token) =
        ci_server_with(root, &format!("\n[limits]\nmin_free_bytes = {reserve}\n"));
    Some((disk, server, token))
}

/// Bytes free on the file system holding `path`, as `df` reports them.
fn available(path: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().nth(1).unwrap().trim().parse().unwrap()
}

/// A server whose disk fills up (a 48 MiB tmpfs, taken by another file
/// down to 8 MiB, below the 16 MiB reserve) refuses uploads, saying why,
/// and goes on serving: commits of chunks it holds, restores and removals
/// work in the reserve; once space is freed, uploads work again.
#[test]
fn a_server_at_its_disk_reserve_refuses_uploads_and_goes_on_serving() {
    let root = tempfile::tempdir().unwrap();
    let Some((disk, server, token)) = server_on_tmpfs(root.path(), "size=48m", 16 << 20) else {
        return;
    };
    let node = Node::new(&server, &token);
    let old = root.path().join("old.bin");
    let old_bytes = random_bytes(30, 3 << 20);
    fs::write(&old, &old_bytes).unwrap();
    node.stash("main/old", &old);

    let filler = disk.dir.join("filler");
    let free = available(&disk.dir);
    fs::write(&filler, vec![7u8; (free - (8 << 20)) as usize]).unwrap();
    let new = root.path().join("new.bin");
    fs::write(&new, random_bytes(31, 1 << 20)).unwrap();
    let out = node.ferry(&["stash", "main/new", new.to_str().unwrap()]);
    out.expect_code(2);
    for says in [
        "run the same command again once space is freed on the server",
        "the server's disk is full",
        "less than its reserve of 16.0 MiB (limits.min_free_bytes)",
        "nothing of this upload was stored",
        "(no_space)",
    ] {
        assert!(out.stderr.contains(says), "{says:?} not in: {}", out.stderr);
    }
    // Refused at once, not retried.
    assert!(!out.stderr.contains("retrying"), "{}", out.stderr);
    let listed = node.ferry(&["ls"]);
    listed.ok();
    assert!(!listed.out().contains("main/new"), "{}", listed.out());

    // What the server holds can still be named, restored and removed.
    let other = Node::new(&server, &token);
    let (_, push) = other.stash("main/old-again", &old);
    assert_eq!(push["stats"]["chunks_sent"], 0, "{push}");
    let fetched = Node::new(&server, &token);
    let out = fetched.ferry(&["unstash", "main/old-again", "-"]);
    out.ok();
    assert_bytes_eq(&out.stdout, &old_bytes, "main/old-again");
    node.ferry(&["rm", "main/old-again"]).ok();

    // With space freed, the same command succeeds.
    fs::remove_file(&filler).unwrap();
    node.stash("main/new", &new);
    let out = fetched.ferry(&["unstash", "main/new", "-"]);
    out.ok();
    assert_bytes_eq(&out.stdout, &fs::read(&new).unwrap(), "main/new");
    fsck_full(&server.store);
    drop(server);
}

/// A disk that fills under an upload, past the reserve check (here: no
/// inodes left, so the bytes free say nothing), ends the push with the
/// same clear refusal, not "internal" and retries; nothing is committed,
/// and the server recovers once space is freed.
#[test]
fn a_disk_filling_under_an_upload_is_reported_as_full() {
    let root = tempfile::tempdir().unwrap();
    // No reserve: the bytes are there, the inodes are not.
    let Some((disk, server, token)) = server_on_tmpfs(root.path(), "size=24m,nr_inodes=64", 0)
    else {
        return;
    };
    let node = Node::new(&server, &token);
    node.ferry(&["ls"]).ok();

    // Take every inode left.
    let fillers = disk.dir.join("fillers");
    fs::create_dir(&fillers).unwrap();
    let mut taken = 0;
    while fs::write(fillers.join(taken.to_string()), b"").is_ok() {
        taken += 1;
    }
    assert!(taken < 64, "the tmpfs ignored nr_inodes");
    let new = root.path().join("new.bin");
    let new_bytes = random_bytes(32, 4 << 20);
    fs::write(&new, &new_bytes).unwrap();
    let out = node.ferry(&["stash", "main/new", new.to_str().unwrap()]);
    out.expect_code(2);
    for says in ["its disk is full; nothing was stored", "(no_space)"] {
        assert!(out.stderr.contains(says), "{says:?} not in: {}", out.stderr);
    }
    assert!(!out.stderr.contains("retrying"), "{}", out.stderr);
    let listed = node.ferry(&["ls"]);
    listed.ok();
    assert!(!listed.out().contains("main/new"), "{}", listed.out());

    fs::remove_dir_all(&fillers).unwrap();
    node.stash("main/new", &new);
    let out = Node::new(&server, &token).ferry(&["unstash", "main/new", "-"]);
    out.ok();
    assert_bytes_eq(&out.stdout, &new_bytes, "main/new");
    fsck_full(&server.store);
    drop(server);
}

/// `kill -HUP` makes a running `ferry serve` re-read its config's tokens:
/// a token taken out is refused from then on, one put in works at once,
/// without a restart; a config that does not load changes nothing.
#[test]
fn sighup_reloads_the_tokens_of_a_running_server() {
    let root = tempfile::tempdir().unwrap();
    let (server, old_token) = ci_server(root.path());
    let data = root.path().join("notes.txt");
    fs::write(&data, b"stashed before the reload\n").unwrap();
    Node::new(&server, &old_token).stash("main/notes", &data);

    // The token is rotated: the config gets the new one instead.
    let rotated = root.path().join("rotated.token");
    let new_hash = new_token(&rotated);
    let config = fs::read_to_string(&server.config).unwrap();
    let old_hash = config
        .lines()
        .find_map(|l| l.strip_prefix("sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_owned();
    fs::write(&server.config, config.replace(&old_hash, &new_hash)).unwrap();
    server.signal("HUP");
    let line = server.wait_for_log("SIGHUP: tokens reloaded", 1, 20);
    assert!(line.contains("changed=[\"ci\"]"), "{line}");

    let out = Node::new(&server, &old_token).ferry(&["ls"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("the token is not known to this server"),
        "{}",
        out.stderr
    );
    let out = Node::new(&server, &rotated).ferry(&["ls"]);
    out.ok();
    assert!(String::from_utf8_lossy(&out.stdout).contains("main/notes"));

    // A broken config: logged, and the rotated token still works.
    fs::write(&server.config, "listen = [").unwrap();
    server.signal("HUP");
    let line = server.wait_for_log("SIGHUP: the config was not reloaded", 1, 20);
    assert!(line.contains(server.config.to_str().unwrap()), "{line}");
    Node::new(&server, &rotated).ferry(&["ls"]).ok();
}

/// `ferry serve --check` says what a server would use from a config, or
/// why it would not start, and binds, creates and generates nothing.
#[test]
fn serve_check_reports_a_config_and_touches_nothing() {
    let root = tempfile::tempdir().unwrap();
    let hash = new_token(&root.path().join("pr.token"));
    let config = root.path().join("server.toml");
    let text = format!(
        "listen = \"127.0.0.1:4433\"\nstore = \"store\"\ncert = \"tls/cert.pem\"\n\
         key = \"tls/key.pem\"\n\n[[token]]\nname = \"pr-7\"\nsha256 = \"{hash}\"\n\
         read = [\"main\", \"pr/7\"]\nwrite = [\"pr/7\"]\nmax_connections = 4\n\n\
         [gc]\ninterval = \"1h\"\n"
    );
    fs::write(&config, &text).unwrap();
    let check = |json: bool| {
        let mut cmd = std::process::Command::new(FERRY);
        if json {
            cmd.arg("--json");
        }
        run(
            cmd.args(["serve", "--check", "--config"]).arg(&config),
            None,
        )
    };
    let out = check(false);
    out.ok();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    for expected in [
        ": OK\n",
        "listen   quic://127.0.0.1:4433\n",
        "(made at start)",
        "none yet: a self-signed one is generated at the first start",
        "  pr-7: read main/*, pr/7/*; write pr/7/*; max_connections 4\n",
        "gc       every 3600 s, 0 retention rule(s)\n",
    ] {
        assert!(shown.contains(expected), "{expected:?} in\n{shown}");
    }
    let doc = check(true).json();
    assert_eq!(doc["tokens"][0]["write"], serde_json::json!(["pr/7/*"]));
    assert_eq!(doc["certificate"], Value::Null);
    let left: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "only the token and the config: {left:?}");

    // With a certificate: its fingerprint, as `ferry serve` prints it.
    let (a_root, b_root) = (root.path().join("a"), root.path().join("b"));
    fs::create_dir_all(&a_root).unwrap();
    fs::create_dir_all(&b_root).unwrap();
    let (a, b) = (serve(&a_root, ""), serve(&b_root, ""));
    let (a_dir, b_dir) = (a.cert.parent().unwrap(), b.cert.parent().unwrap());
    let with_cert = text
        .replace("tls/cert.pem", a.cert.to_str().unwrap())
        .replace("tls/key.pem", a_dir.join("key.pem").to_str().unwrap());
    fs::write(&config, &with_cert).unwrap();
    let doc = check(true).json();
    let fingerprint = doc["certificate"].as_str().unwrap().to_owned();
    assert!(fingerprint.starts_with("sha256:"), "{fingerprint}");
    let printed = a.wait_for_log("ferry serve: certificate sha256:", 1, 10);
    assert!(
        printed.contains(&format!("certificate {fingerprint} ")),
        "{printed}"
    );
    // Another server's key: refused, as the start would be.
    fs::write(
        &config,
        with_cert.replace(
            a_dir.join("key.pem").to_str().unwrap(),
            b_dir.join("key.pem").to_str().unwrap(),
        ),
    )
    .unwrap();
    let out = check(false);
    out.expect_code(2);
    assert!(out.stderr.to_lowercase().contains("key"), "{}", out.stderr);

    // A token entry that does not check: refused, naming it.
    fs::write(&config, text.replace(&hash, "abc")).unwrap();
    let out = check(false);
    out.expect_code(2);
    assert!(out.stderr.contains("pr-7"), "{}", out.stderr);
    drop((a, b));
}
