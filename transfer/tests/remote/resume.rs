//! Interrupted transfers resume without resending what arrived.

use crate::util::*;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use transfer::client::{pull, push, Session};
use transfer::proto::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cancelled_midway_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    // A killed client says nothing: the server learns of it by the idle
    // timeout (its close can also be lost, quinn issue #2785).
    let mut cfg = config(dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.limits.idle_timeout_secs = 2;
    let server = TestServer::start_with(cfg).await;
    let remote = server.remote(MAIN);
    let c = client_store(dir.path(), "c");
    let data = random_bytes(1, 8 << 20);
    let local = stash_bytes(&c, "main/big", &data).await;
    let ids = chunk_ids(&c, "main/big");
    let total = ids.len() as u64;
    assert!(total > 60, "{total} chunks");

    // Upload one batch at a time and kill the client after ~2 MiB.
    let mut o = opts();
    o.streams = 1;
    // The progress hook kills the task itself, at once. It runs inside the
    // upload worker, which would otherwise go on sending batches until the
    // abort of its parent reaches it (on a loaded machine, all of them):
    // holding the worker here lets the abort land first.
    let killer: Arc<std::sync::OnceLock<tokio::task::AbortHandle>> = Arc::default();
    let trip = {
        let killer = killer.clone();
        Trip::new(2 << 20, move || {
            if let Some(k) = killer.get() {
                k.abort();
            }
            std::thread::sleep(Duration::from_millis(500));
        })
    };
    let task = {
        let (c, remote, trip) = (c.clone(), remote.clone(), trip.clone());
        tokio::spawn(async move { push(c, &name("main/big"), &remote, &o, trip).await })
    };
    killer.set(task.abort_handle()).unwrap();
    {
        let trip = trip.clone();
        wait_for(30, "2 MiB uploaded", move || trip.fired()).await;
    }
    task.abort();
    assert!(task.await.is_err(), "the push was cancelled, not finished");
    // The server makes a connection's uploads durable when it ends.
    wait_for(30, "the killed client's connection to end", || {
        server.metrics.active_sessions.load(Ordering::SeqCst) == 0
    })
    .await;

    // Part arrived (durably), the name did not.
    let srv = server.open_store();
    assert!(srv.manifest(&name("main/big")).is_err());
    let s = Session::connect(&remote, &opts()).await.unwrap();
    let Message::MissingReply { ids: missing } = s
        .request(&Message::Missing {
            name: "main/big".into(),
            ids: ids.clone(),
        })
        .await
        .unwrap()
    else {
        panic!("no missing reply")
    };
    s.close().await;
    let missing = missing.len() as u64;
    assert!(
        missing > 0 && missing < total,
        "{missing} of {total} missing"
    );

    // The same command again sends only what is missing.
    let r = push(c.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(r.manifest, local.manifest);
    assert!(r.stats.chunks_sent <= missing, "{:?}", r.stats);
    assert_eq!(r.stats.chunks_sent + r.stats.chunks_present, total);
    assert!(r.stats.chunks_present >= total - missing);

    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(unstash_bytes(&node, "main/big").await, data);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_interrupted_by_a_server_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(dir.path()).await;
    let addr = first.addr;
    let remote = first.remote(MAIN);
    let c = client_store(dir.path(), "c");
    let data = random_bytes(2, 8 << 20);
    stash_bytes(&c, "main/big", &data).await;
    push(c.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap();
    let ids = chunk_ids(&c, "main/big");
    let total = ids.len();

    // Download one batch at a time; the server stops after ~3 MiB.
    let node = client_store(dir.path(), "node");
    let mut o = opts();
    o.streams = 1;
    o.import_bytes = 512 << 10;
    let handle = first.handle();
    let trip = Trip::new(3 << 20, move || handle.stop_now());
    let e = pull(node.clone(), &name("main/big"), &remote, &o, trip.clone())
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    first.join().await;

    // What arrived is in the node's store; the name is not.
    assert!(node.manifest(&name("main/big")).is_err());
    let missing = node.missing(&ids).unwrap().len();
    assert!(
        missing > 0 && missing < total,
        "{missing} of {total} missing"
    );

    // A new server on the same store and port; the same command again
    // fetches exactly what is missing.
    let second = TestServer::start_with(config(dir.path(), addr)).await;
    let r = pull(node.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(r.stats.chunks_received as usize, missing, "{:?}", r.stats);
    assert_eq!(r.stats.chunks_present as usize, total - missing);
    assert_eq!(unstash_bytes(&node, "main/big").await, data);

    // With retries, a client rides out a restart by itself.
    let node2 = client_store(dir.path(), "node2");
    let mut o = opts();
    o.streams = 1;
    o.import_bytes = 512 << 10;
    o.retries = 10;
    o.backoff = Duration::from_millis(200);
    let handle = second.handle();
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stopped.clone();
    let trip = Trip::new(3 << 20, move || {
        handle.stop_now();
        flag.store(true, Ordering::SeqCst);
    });
    let task = {
        let (node2, remote) = (node2.clone(), remote.clone());
        tokio::spawn(async move { pull(node2, &name("main/big"), &remote, &o, trip).await })
    };
    {
        let stopped = stopped.clone();
        wait_for(30, "the server to be stopped", move || {
            stopped.load(Ordering::SeqCst)
        })
        .await;
    }
    second.join().await;
    let third = TestServer::start_with(config(dir.path(), addr)).await;
    let r = task.await.unwrap().unwrap();
    assert!(r.stats.attempts >= 2, "{:?}", r.stats);
    assert!(r.stats.chunks_received as usize >= total, "{:?}", r.stats);
    assert_eq!(unstash_bytes(&node2, "main/big").await, data);
    third.stop().await;
}

/// A server that dies without a word (its runtime dropped: no CONNECTION_CLOSE
/// leaves, as after SIGKILL or a close stuck behind a full congestion window)
/// and comes back with the same key files answers the old connection's next
/// packet with a stateless reset: a request on it fails at once with the
/// connection reset, not after the client's 30 s idle and request timeouts.
#[test]
fn a_server_back_from_a_crash_resets_the_old_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let start = |rt: &tokio::runtime::Runtime, listen: SocketAddr| {
        let cfg = config(dir.path(), listen);
        rt.block_on(async {
            let server = bind_retrying(&cfg).await;
            let found = (server.local_addr(), server.fingerprint().to_string());
            tokio::spawn(async move { server.run().await.unwrap() });
            found
        })
    };
    let first = runtime();
    let (addr, fingerprint) = start(&first, "127.0.0.1:0".parse().unwrap());
    let client = runtime();
    let remote = transfer::client::Remote::new(
        &format!("quic://{addr}"),
        transfer::tls::Trust::from_arg(&fingerprint).unwrap(),
        Some(transfer::auth::Token::new(MAIN).unwrap()),
    )
    .unwrap();
    let list = Message::List {
        prefix: String::new(),
    };
    let session = client.block_on(async {
        let s = Session::connect(&remote, &opts()).await.unwrap();
        s.request(&list).await.unwrap();
        s
    });

    first.shutdown_background();
    let second = runtime();
    start(&second, addr);
    let answer = client.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), session.request(&list)).await
    });
    let err = answer
        .expect("the old connection still waits after 10 s")
        .expect_err("a request on the old connection cannot succeed");
    assert!(err.to_string().contains("reset"), "{err}");
    // A new connection works.
    client.block_on(async {
        let s = Session::connect(&remote, &opts()).await.unwrap();
        s.request(&list).await.unwrap();
        s.close().await;
    });
    second.shutdown_background();
}
