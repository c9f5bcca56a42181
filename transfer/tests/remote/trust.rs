//! Tokens, scopes and certificates.

use crate::util::*;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use transfer::auth::Token;
use transfer::client::{list, pull, push, ClientError, Remote, Session};
use transfer::proto::{ErrorKind, Message};
use transfer::tls::Trust;

fn refused(e: ClientError) -> ErrorKind {
    match e {
        ClientError::Refused { kind, .. } => kind,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_request_token_reads_main_and_its_own_pr_and_writes_only_its_pr() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let main = server.remote(MAIN);
    let pr = server.remote(PR);
    let ci = client_store(dir.path(), "ci");
    let data = mixed_bytes(1, 600_000);
    stash_bytes(&ci, "main/base", &data).await;
    stash_bytes(&ci, "pr/999/other", &mixed_bytes(2, 300_000)).await;
    for n in ["main/base", "pr/999/other"] {
        push(ci.clone(), &name(n), &main, &opts(), none())
            .await
            .unwrap();
    }

    // The PR token reads main, and writes its own scope.
    let node = client_store(dir.path(), "pr-node");
    pull(node.clone(), &name("main/base"), &pr, &opts(), none())
        .await
        .unwrap();
    assert_eq!(unstash_bytes(&node, "main/base").await, data);
    stash_bytes(&node, "pr/1234/ci", &mixed_bytes(3, 300_000)).await;
    push(node.clone(), &name("pr/1234/ci"), &pr, &opts(), none())
        .await
        .unwrap();

    // It cannot write main, nor read another PR.
    stash_bytes(&node, "main/poisoned", &mixed_bytes(4, 300_000)).await;
    let e = push(node.clone(), &name("main/poisoned"), &pr, &opts(), none())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(r#"this token may not write "main/poisoned" (it writes "#),
        "{e}"
    );
    assert_eq!(refused(e), ErrorKind::Forbidden);
    let e = pull(node.clone(), &name("pr/999/other"), &pr, &opts(), none())
        .await
        .unwrap_err();
    assert_eq!(refused(e), ErrorKind::Forbidden);

    // The server enforces it too, whatever the client does: crafted requests.
    let s = Session::connect(&pr, &opts()).await.unwrap();
    let ids = chunk_ids(&node, "main/poisoned");
    let stored = node.read_stored(&ids[0]).unwrap().unwrap();
    let (_, manifest) = node.manifest_bytes(&name("main/poisoned")).unwrap();
    for msg in [
        Message::Missing {
            name: "main/poisoned".into(),
            ids: ids.clone(),
        },
        Message::PutChunks {
            name: "main/poisoned".into(),
            chunks: vec![stored],
        },
        Message::Commit {
            name: "main/poisoned".into(),
            manifest,
        },
        Message::GetManifest {
            name: "pr/999/other".into(),
            have: vec![],
        },
        // Chunk ids of another PR's stash, known from elsewhere.
        Message::GetChunks {
            ids: chunk_ids(&ci, "pr/999/other"),
        },
    ] {
        let what = msg.kind_name();
        let e = s.request(&msg).await.unwrap_err();
        assert_eq!(refused(e), ErrorKind::Forbidden, "{what}");
    }
    // Refusals do not end the session.
    assert!(matches!(
        s.request(&Message::GetManifest {
            name: "main/base".into(),
            have: vec![],
        })
        .await
        .unwrap(),
        Message::Manifest { .. }
    ));
    s.close().await;

    // Nothing of main/poisoned reached the server.
    let srv = server.open_store();
    assert!(srv.manifest(&name("main/poisoned")).is_err());
    assert_eq!(srv.missing(&ids).unwrap().len(), ids.len());

    // Listing shows only readable names.
    let seen: Vec<String> = list(&pr, None, &opts())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(seen, ["main/base", "pr/1234/ci"]);
    let all = list(&main, None, &opts()).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all[0].header.as_ref().is_some_and(|h| h.size == 600_000));

    // A read-only token cannot push at all.
    let e = push(
        node.clone(),
        &name("main/base"),
        &server.remote(READER),
        &opts(),
        none(),
    )
    .await
    .unwrap_err();
    assert_eq!(refused(e), ErrorKind::Forbidden);
    assert!(server.metrics.errors(ErrorKind::Forbidden) >= 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_tokens_are_rejected_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = client_store(dir.path(), "c");
    stash_bytes(&c, "main/x", &mixed_bytes(1, 300_000)).await;
    for (token, needle) in [("", "no token"), ("not-a-known-token", "not known")] {
        let remote = server.remote(token);
        let e = push(c.clone(), &name("main/x"), &remote, &opts(), none())
            .await
            .unwrap_err();
        assert!(!e.is_transient());
        assert!(e.to_string().contains(needle), "{e}");
        assert_eq!(refused(e), ErrorKind::Unauthenticated);
        let e = list(&remote, None, &opts()).await.unwrap_err();
        assert_eq!(refused(e), ErrorKind::Unauthenticated);
    }
    let srv = server.open_store();
    assert!(srv.list(None).unwrap().is_empty());
    assert_eq!(srv.usage().unwrap().chunks, 0);
    wait_for(5, "4 refusals counted", || {
        server.metrics.errors(ErrorKind::Unauthenticated) == 4
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_mismatch_and_unreachable_servers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let url = format!("quic://{}", server.addr);
    let token = Some(transfer::auth::Token::new(MAIN).unwrap());

    // Pinned to another certificate.
    let other = Trust::from_arg(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    let r = Remote::new(&url, other, token.clone()).unwrap();
    let e = list(&r, None, &opts()).await.unwrap_err();
    assert!(matches!(e, ClientError::Certificate { .. }), "{e}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains(&server.fingerprint), "{e}");

    // The server's certificate file works (pinned), as does its fingerprint.
    let cert = dir.path().join("tls/cert.pem");
    let r = Remote::new(
        &url,
        Trust::from_arg(cert.to_str().unwrap()).unwrap(),
        token.clone(),
    )
    .unwrap();
    assert!(list(&r, None, &opts()).await.unwrap().is_empty());

    // Nobody listens: unreachable, transient, and said so.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    drop(sock);
    let r = Remote::new(
        &format!("quic://127.0.0.1:{port}"),
        Trust::from_arg(&server.fingerprint).unwrap(),
        token,
    )
    .unwrap();
    let mut o = opts();
    o.connect_timeout = std::time::Duration::from_millis(500);
    let e = list(&r, None, &o).await.unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
    assert!(e.is_transient());
    server.stop().await;
}

/// A CA-signed server certificate is accepted through the CA, for the
/// name it was issued to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_can_stand_in_for_pinning() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &*ca)
        .unwrap();
    std::fs::write(tls.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(tls.join("key.pem"), leaf_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let server = TestServer::start(dir.path()).await;
    let trust = Trust::from_arg(dir.path().join("ca.pem").to_str().unwrap()).unwrap();
    let token = Some(transfer::auth::Token::new(MAIN).unwrap());
    let ok = Remote::new(
        &format!("quic://localhost:{}", server.addr.port()),
        trust.clone(),
        token.clone(),
    )
    .unwrap();
    assert!(list(&ok, None, &opts()).await.unwrap().is_empty());
    // The same CA, but a name the certificate does not carry.
    let wrong = Remote::new(&format!("quic://{}", server.addr), trust, token).unwrap();
    let e = list(&wrong, None, &opts()).await.unwrap_err();
    assert!(matches!(e, ClientError::Certificate { .. }), "{e}");
    server.stop().await;
}

/// A pull request's token drops its own scope when its build ends, and
/// nothing else: not main's names, not another pull request's, not a
/// prefix wider than its scope. Listed names go all or nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_is_bounded_by_the_write_scope() {
    use transfer::client::{remove, Removal};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = client_store(dir.path(), "c");
    let names = [
        "main/base",
        "pr/1234/build/1/cpu",
        "pr/1234/build/1/gpu",
        "pr/1234/build/2/cpu",
        "pr/999/build/1/cpu",
    ];
    for (i, n) in names.iter().enumerate() {
        stash_bytes(&c, n, &random_bytes(60 + i as u64, 50_000)).await;
        push(c.clone(), &name(n), &server.remote(MAIN), &opts(), none())
            .await
            .unwrap();
    }
    let on_server = || -> Vec<String> {
        let mut v: Vec<String> = server
            .open_store()
            .list(None)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        v.sort();
        v
    };
    let pr = server.remote(PR);
    let prefix = |p: &str| Removal::Prefix(p.into());
    let listed = |v: &[&str]| Removal::Names(v.iter().map(|n| name(n)).collect());

    for (removal, kind) in [
        (prefix("pr"), ErrorKind::Forbidden),
        (prefix(""), ErrorKind::Forbidden),
        (prefix("main"), ErrorKind::Forbidden),
        (prefix("pr/999"), ErrorKind::Forbidden),
        (
            listed(&["pr/1234/build/1/cpu", "main/base"]),
            ErrorKind::Forbidden,
        ),
        (
            listed(&["pr/1234/build/1/cpu", "pr/1234/nope"]),
            ErrorKind::NotFound,
        ),
    ] {
        let e = remove(&pr, &removal, &opts()).await.unwrap_err();
        assert_eq!(e.kind(), Some(kind), "{removal:?}: {e}");
        assert_eq!(
            on_server().len(),
            names.len(),
            "{removal:?} removed something"
        );
    }

    let r = remove(&pr, &listed(&["pr/1234/build/2/cpu"]), &opts())
        .await
        .unwrap();
    assert_eq!(r.removed, ["pr/1234/build/2/cpu"]);
    let r = remove(&pr, &prefix("pr/1234/build/1"), &opts())
        .await
        .unwrap();
    assert_eq!(r.removed, ["pr/1234/build/1/cpu", "pr/1234/build/1/gpu"]);
    assert_eq!(r.names_not_listed, 0);
    assert_eq!(on_server(), ["main/base", "pr/999/build/1/cpu"]);
    // Removing an empty scope again is not an error: it is already clean.
    let r = remove(&pr, &prefix("pr/1234"), &opts()).await.unwrap();
    assert!(r.removed.is_empty());
    // The rest is intact and readable.
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/base"), &pr, &opts(), none())
        .await
        .unwrap();
    assert_eq!(
        unstash_bytes(&node, "main/base").await,
        random_bytes(60, 50_000)
    );
    server.stop().await;
}

/// A token with a connection limit of its own (`max_connections` in its
/// `[[token]]` entry): its holders get that many connections at once and
/// no more — refused "busy", worth retrying, the message naming the limit —
/// while another token still gets the server's other slots; a connection
/// that ends frees its hold, and a client that retries then gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_own_connection_limit_leaves_the_other_slots_to_other_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.limits.max_connections = 4;
    let pr_entry = cfg.tokens.iter_mut().find(|t| t.name == "pr-1234");
    pr_entry.expect("the PR token").max_connections = Some(2);
    let server = TestServer::start_with(cfg).await;
    let (pr, main) = (server.remote(PR), server.remote(MAIN));
    let c = client_store(dir.path(), "c");
    let data = mixed_bytes(7, 300_000);
    stash_bytes(&c, "main/base", &data).await;
    push(c.clone(), &name("main/base"), &main, &opts(), none())
        .await
        .unwrap();
    let open = || server.metrics.connections_open.load(Relaxed);
    wait_for(5, "the seeding client gone", || open() == 0).await;

    let mut prs = Vec::new();
    for _ in 0..2 {
        prs.push(Session::connect(&pr, &opts()).await.unwrap());
    }
    let shown = server.metrics.render();
    assert!(
        shown.contains("ferry_token_connections{token=\"pr-1234\"} 2\n")
            && shown.contains("ferry_token_connections{token=\"main\"} 0\n"),
        "{shown}"
    );
    let busy_before = server.metrics.errors(ErrorKind::Busy);
    let e = Session::connect(&pr, &opts()).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("token \"pr-1234\" is at its connection limit (max_connections = 2"),
        "{text}"
    );
    assert_eq!(refused(e), ErrorKind::Busy);
    // Counted once the server has cut the peer off, just after its answer.
    wait_for(5, "the refusal counted", || {
        server.metrics.errors(ErrorKind::Busy) == busy_before + 1
    })
    .await;

    // The main token gets the server's two other slots, and is served.
    let mut mains = Vec::new();
    for _ in 0..2 {
        mains.push(Session::connect(&main, &opts()).await.unwrap());
    }
    let list_main = Message::List {
        prefix: "main".into(),
    };
    for s in mains.iter().chain(&prs) {
        let listing = s.request(&list_main).await.unwrap();
        assert!(matches!(listing, Message::Listing { .. }), "{listing:?}");
    }
    for s in mains {
        s.close().await;
    }

    // A PR client waits while both PR connections are held (with two free
    // server slots) — busy refusals do not use up its retries, of which
    // it has none — and gets in once one of them ends.
    let mut patient = opts();
    patient.busy_wait = Duration::from_secs(30);
    let node = client_store(dir.path(), "pr-node");
    let pull = tokio::spawn({
        let node = node.clone();
        async move { pull(node, &name("main/base"), &pr, &patient, none()).await }
    });
    wait_for(10, "the waiting PR client refused at least twice", || {
        server.metrics.errors(ErrorKind::Busy) >= busy_before + 3
    })
    .await;
    assert!(!pull.is_finished(), "a third PR connection got in");
    prs.pop().unwrap().close().await;
    pull.await.unwrap().expect("the retrying PR client got in");
    assert_eq!(unstash_bytes(&node, "main/base").await, data);
    for s in prs {
        s.close().await;
    }
    wait_for(5, "every slot free", || open() == 0).await;
    server.stop().await;
}

/// A reload (SIGHUP in `ferry serve`) replaces the tokens: a removed token
/// is refused from then on and its open sessions are closed, a token whose
/// scopes changed is served under the new ones after reconnecting, new
/// tokens work at once, and every other session goes on undisturbed. A
/// config that does not check changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_replaces_the_tokens_and_closes_only_the_sessions_it_revokes() {
    const NEW: &str = "a-token-added-by-reload";
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "127.0.0.1:0".parse().unwrap());
    let server = TestServer::start_with(cfg.clone()).await;
    let c = client_store(dir.path(), "c");
    stash_bytes(&c, "main/base", &mixed_bytes(3, 200_000)).await;
    push(
        c.clone(),
        &name("main/base"),
        &server.remote(MAIN),
        &opts(),
        none(),
    )
    .await
    .unwrap();
    let list_main = Message::List {
        prefix: "main".into(),
    };
    let main = Session::connect(&server.remote(MAIN), &opts())
        .await
        .unwrap();
    let pr = Session::connect(&server.remote(PR), &opts()).await.unwrap();
    let reader = Session::connect(&server.remote(READER), &opts())
        .await
        .unwrap();
    for s in [&main, &pr, &reader] {
        assert!(matches!(
            s.request(&list_main).await,
            Ok(Message::Listing { .. })
        ));
    }

    // The reader's token goes, the PR token no longer reads main, a new
    // token comes, and a limit changes (which needs a restart).
    let mut newer = cfg.clone();
    newer.tokens.retain(|t| t.name != "reader");
    let pr_entry = newer
        .tokens
        .iter_mut()
        .find(|t| t.name == "pr-1234")
        .unwrap();
    pr_entry.read = vec!["pr/1234".into()];
    let mut added = newer.tokens[0].clone();
    (added.name, added.sha256) = ("new".into(), Token::new(NEW).unwrap().hash().to_hex());
    added.write = vec![];
    newer.tokens.push(added);
    newer.limits.max_connections = 7;
    let reloaded = server.handle().reload(&newer).unwrap();
    assert_eq!(
        (
            reloaded.tokens,
            reloaded.added,
            reloaded.removed,
            reloaded.changed
        ),
        (
            4,
            vec!["new".to_string()],
            vec!["reader".to_string()],
            vec!["pr-1234".to_string()]
        )
    );
    assert_eq!(reloaded.needs_restart, ["[limits]"]);

    // Untouched: served on the same connection.
    assert!(matches!(
        main.request(&list_main).await,
        Ok(Message::Listing { .. })
    ));
    // Revoked and changed: their connections are closed, saying why.
    let e = reader.request(&list_main).await.unwrap_err().to_string();
    assert!(
        e.contains("no longer accepts this token (\"reader\")"),
        "{e}"
    );
    let e = pr.request(&list_main).await.unwrap_err().to_string();
    assert!(e.contains("changed what this token (\"pr-1234\")"), "{e}");
    assert_eq!(server.metrics.sessions_revoked.load(Relaxed), 2);
    assert_eq!(server.metrics.config_reloads.load(Relaxed), 1);

    // New connections: the removed token is refused, the PR token gets
    // its new scopes, the new token works.
    let e = Session::connect(&server.remote(READER), &opts())
        .await
        .unwrap_err();
    assert_eq!(refused(e), ErrorKind::Unauthenticated);
    let node = client_store(dir.path(), "pr-node");
    let e = pull(
        node,
        &name("main/base"),
        &server.remote(PR),
        &opts(),
        none(),
    )
    .await
    .unwrap_err();
    assert_eq!(refused(e), ErrorKind::Forbidden);
    let names = list(&server.remote(NEW), Some("main"), &opts())
        .await
        .unwrap();
    assert_eq!(names.len(), 1, "{names:?}");

    // A config that does not check: nothing changes, the failure counted.
    let mut broken = newer.clone();
    broken.tokens[0].sha256 = "not-hex".into();
    let e = server.handle().reload(&broken).unwrap_err().to_string();
    assert!(e.contains("main"), "{e}");
    assert_eq!(server.metrics.config_reload_failures.load(Relaxed), 1);
    let names = list(&server.remote(NEW), Some("main"), &opts())
        .await
        .unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    main.close().await;
    server.stop().await;
}
