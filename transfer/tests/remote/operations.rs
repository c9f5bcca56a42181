//! Running a server: metrics, graceful shutdown.

use crate::util::*;
use std::io::{Read, Write};
use std::time::Duration;
use transfer::client::{pull, push};
use transfer::proto::ErrorKind;

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = TestServer::start_with(cfg).await;
    let addr = server.metrics_addr.unwrap();
    let remote = server.remote(MAIN);
    let c = client_store(dir.path(), "c");
    stash_bytes(&c, "main/x", &mixed_bytes(1, 800_000)).await;
    let p = push(c.clone(), &name("main/x"), &remote, &opts(), none())
        .await
        .unwrap();
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/x"), &remote, &opts(), none())
        .await
        .unwrap();
    let _ = pull(
        node.clone(),
        &name("pr/1234/nope"),
        &server.remote(PR),
        &opts(),
        none(),
    )
    .await;

    let body = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("# TYPE ferry_bytes_received_total counter"));
    assert_eq!(
        metric(&body, "ferry_chunks_received_total") as u64,
        p.stats.chunks_sent
    );
    assert_eq!(
        metric(&body, "ferry_chunks_sent_total") as u64,
        p.stats.chunks
    );
    assert!(metric(&body, "ferry_bytes_received_total") > p.stats.bytes_sent as f64);
    assert!(metric(&body, "ferry_bytes_sent_total") > 0.0);
    assert_eq!(metric(&body, "ferry_commits_total"), 1.0);
    assert_eq!(metric(&body, "ferry_errors_total{kind=\"not_found\"}"), 1.0);
    assert!(
        metric(
            &body,
            "ferry_request_duration_seconds_count{op=\"put_chunks\"}"
        ) >= 1.0
    );
    assert!(body.contains("ferry_active_sessions "));
    // The store's disk: what is free (a tempdir on a real disk) and the reserve.
    assert!(metric(&body, "ferry_store_available_bytes") > 0.0);
    assert_eq!(
        metric(&body, "ferry_store_reserve_bytes"),
        (1u64 << 30) as f64
    );
    let nf = tokio::task::spawn_blocking(move || http_get(addr, "/nope"))
        .await
        .unwrap();
    assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
    server.stop().await;
}

/// A shutdown during a push: the push fails with "shutting down" (worth
/// retrying) or completes; the name is never half-visible; re-running
/// against a restarted server completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_never_leaves_a_half_visible_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let addr = server.addr;
    let remote = server.remote(MAIN);
    let c = client_store(dir.path(), "c");
    let data = random_bytes(5, 6 << 20);
    stash_bytes(&c, "main/big", &data).await;
    let handle = server.handle();
    let trip = Trip::new(1 << 20, move || handle.shutdown());
    let mut o = opts();
    o.streams = 2;
    let r = push(c.clone(), &name("main/big"), &remote, &o, trip).await;
    server.join().await;
    let srv = store::repo::Store::open(dir.path().join("server-store")).unwrap();
    match r {
        Ok(_) => {
            // Finished within the grace period: complete.
            assert!(srv
                .fsck(true, &store::repo::NoProgress)
                .unwrap()
                .problems
                .is_empty());
        }
        Err(e) => {
            assert_eq!(e.kind(), Some(ErrorKind::ShuttingDown), "{e}");
            assert!(e.is_transient());
            assert!(srv.manifest(&name("main/big")).is_err());
        }
    }
    let again = TestServer::start_with(config(dir.path(), addr)).await;
    push(c.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap();
    let node = client_store(dir.path(), "node");
    pull(node.clone(), &name("main/big"), &remote, &opts(), none())
        .await
        .unwrap();
    assert_eq!(unstash_bytes(&node, "main/big").await, data);
    again.stop().await;
}
