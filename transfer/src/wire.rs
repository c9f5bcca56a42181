//! Frames over QUIC streams: the only place bytes meet [`crate::proto`].

use crate::proto::{self, Message, ProtoError, HEADER_LEN};
use quinn::{ReadError, ReadExactError, RecvStream, SendStream, WriteError};
use std::sync::Arc;

/// Why a frame could not be moved.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The stream ended before a frame started.
    #[error("the stream ended before a message")]
    Ended,
    /// The stream ended inside a frame.
    #[error("the stream ended inside a message")]
    Truncated,
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// Reading failed (connection lost, stream reset).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// How much of a frame must have arrived before its buffer is reserved:
/// a peer cannot make us reserve `max_frame` by announcing it, only by
/// sending it.
const FIRST_RESERVE: usize = 1 << 20;

/// Most pieces of a frame's first MiB kept as quinn hands them over (each
/// holds on to the datagram buffer it came in): 1 MiB in Ethernet-sized
/// packets is about 750. A peer sending smaller pieces gets them copied.
const FIRST_PIECES: usize = 1024;

/// Reads one frame (its payload gathered by an [`Assembly`]).
pub(crate) async fn read_message(
    recv: &mut RecvStream,
    max_frame: u32,
) -> Result<(Message, usize), WireError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Err(WireError::Ended),
        Err(ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = proto::frame_len(header, max_frame)?;
    let mut payload = Assembly::new(len);
    while payload.missing() > 0 {
        match recv.read_chunk(payload.missing(), true).await? {
            Some(chunk) => payload.push(chunk.bytes),
            None => return Err(WireError::Truncated),
        }
    }
    // Chunks share the payload (one copy from quinn's buffers, no second).
    Ok((proto::decode_shared(&payload.finish())?, HEADER_LEN + len))
}

/// A frame's payload, gathered from the pieces quinn hands over. Its first
/// MiB is kept as those pieces; then the whole frame is reserved once and
/// copied into. (A 1 MiB reserve grown later copied that MiB again: a
/// quarter of every 4 MiB reply.)
struct Assembly {
    len: usize,
    got: usize,
    first: Vec<bytes::Bytes>,
    payload: Vec<u8>,
}

impl Assembly {
    fn new(len: usize) -> Assembly {
        Assembly {
            len,
            got: 0,
            first: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Bytes still to come.
    fn missing(&self) -> usize {
        self.len - self.got
    }

    /// Adds the next piece (anything beyond the frame's length is ignored).
    fn push(&mut self, mut piece: bytes::Bytes) {
        piece.truncate(self.missing());
        self.got += piece.len();
        if self.payload.capacity() == 0 && self.first.len() < FIRST_PIECES {
            self.first.push(piece);
            if self.got >= self.len.min(FIRST_RESERVE) {
                self.payload.reserve_exact(self.len);
                self.take_first();
            }
            return;
        }
        if self.payload.capacity() == 0 {
            // Many small pieces: the first MiB is gathered by copying.
            self.payload.reserve_exact(self.len.min(FIRST_RESERVE));
            self.take_first();
        }
        if self.payload.len() + piece.len() > self.payload.capacity() {
            // The first MiB is there: the rest is reserved at once.
            self.payload.reserve_exact(self.len - self.payload.len());
        }
        self.payload.extend_from_slice(&piece);
    }

    fn take_first(&mut self) {
        for piece in self.first.drain(..) {
            self.payload.extend_from_slice(&piece);
        }
    }

    /// The payload (all of it once [`missing`](Self::missing) is 0).
    fn finish(mut self) -> bytes::Bytes {
        self.take_first();
        self.payload.into()
    }
}

/// Writes one frame; returns its size.
pub(crate) async fn write_message(
    send: &mut SendStream,
    msg: &Message,
) -> Result<usize, WireError> {
    let mut frame = proto::encode_shared(msg);
    let len = frame.iter().map(|b| b.len()).sum();
    write_frame(send, &mut frame).await?;
    Ok(len)
}

/// Hands a frame's pieces to quinn as they are: chunk replies and uploads
/// are frames of up to 32 MiB whose chunks are neither copied into one
/// buffer nor into quinn's send buffer (only into packets).
pub(crate) async fn write_frame(
    send: &mut SendStream,
    frame: &mut [bytes::Bytes],
) -> Result<(), WriteError> {
    send.write_all_chunks(frame).await
}

/// Bytes a peer may have in flight on one connection (all streams): large,
/// because chunks travel in frames of several MiB.
pub(crate) const RECEIVE_WINDOW: u32 = 128 << 20;

/// The QUIC transport settings both ends use.
pub(crate) fn transport(
    idle: std::time::Duration,
    bidi_streams: u32,
) -> Result<quinn::TransportConfig, String> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(bidi_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        // No unreliable datagrams: the protocol has none, and quinn would
        // otherwise buffer a peer's unread ones.
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle).map_err(|e| format!("idle timeout: {e}"))?,
        ))
        .stream_receive_window((16u32 << 20).into())
        .receive_window(RECEIVE_WINDOW.into())
        .send_window(128 << 20);
    // Let MTU discovery find large datagrams where the path has them
    // (loopback, jumbo frames): far fewer packets to build, encrypt, send
    // and acknowledge. Paths with a 1500-byte MTU end at quinn's usual size.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    // (Quinn's search steps are kept: with coarser ones, on a 1500-byte
    // path the search gave up at 1200 bytes after its probes of 8792,
    // 4995 and 3097 bytes were lost.)
    mtu.upper_bound(max_udp_payload())
        // Losses of large datagrams in a burst (a receive buffer that ran
        // full) look like a black hole to quinn, which then falls back to
        // 1200 bytes; probe again soon rather than after a minute.
        .black_hole_cooldown(BLACK_HOLE_COOLDOWN);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

fn max_udp_payload() -> u16 {
    std::env::var("FERRY_QUIC_MAX_UDP_PAYLOAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_UDP_PAYLOAD)
        .clamp(1200, 65527)
}

/// Largest UDP payload accepted and probed for. On loopback, with 16 KiB
/// datagrams instead of 1472-byte ones, a remote stash of 2.5 GB took
/// 7.3-7.6 s instead of 8.0-8.3 s and a remote unstash 3.1-3.2 s instead of
/// 3.8-4.1 s (alternating runs); 64 KiB datagrams were no faster than
/// 16 KiB ones, and probing for them sent 0.5 MB of padding each way per
/// connection (for 16 KiB: 0.15 MB).
const MAX_UDP_PAYLOAD: u16 = 16_384;

/// How long after a suspected black hole MTU discovery probes again.
const BLACK_HOLE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(2);

/// UDP socket buffer asked for on both ends, each way. With the kernel's
/// default (208 KiB on Linux) a server receiving uploads at full speed on
/// loopback dropped 1.7 % of the datagrams (11,000 of 633,000 for one 2.5 GB
/// stash), which QUIC then resent and took for congestion.
const SOCKET_BUFFER: usize = 8 << 20;

/// Asks for `size`-byte receive and send buffers; returns what the kernel
/// granted (Linux caps the request at `net.core.rmem_max` / `wmem_max`).
fn socket_buffers(socket: &std::net::UdpSocket, size: usize) -> (usize, usize) {
    let sock = socket2::SockRef::from(socket);
    // Best effort: a smaller buffer costs retransmissions, not correctness.
    let _ = sock.set_recv_buffer_size(size);
    let _ = sock.set_send_buffer_size(size);
    (
        sock.recv_buffer_size().unwrap_or(0),
        sock.send_buffer_size().unwrap_or(0),
    )
}

/// A QUIC endpoint on `addr` (a server if `server` is given) that accepts
/// datagrams up to [`max_udp_payload`].
pub(crate) fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
    restart: Option<crate::tls::RestartKeys>,
) -> std::io::Result<quinn::Endpoint> {
    let config = endpoint_config(restart)?;
    let socket = std::net::UdpSocket::bind(addr)?;
    let (recv_buf, send_buf) = socket_buffers(&socket, SOCKET_BUFFER);
    tracing::debug!(%addr, recv_buf, send_buf, "UDP socket buffers");
    if server.is_some() && recv_buf < SOCKET_BUFFER / 2 {
        tracing::warn!(
            recv_buf,
            wanted = SOCKET_BUFFER,
            "the UDP receive buffer is small: datagrams arriving in bursts are dropped \
             and sent again; raise net.core.rmem_max (Linux) to {SOCKET_BUFFER} or more"
        );
    }
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    let socket = Arc::new(crate::udp::bounded_batches(
        runtime.wrap_udp_socket(socket)?,
    ));
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// The endpoint settings: datagrams up to [`max_udp_payload`], and for a
/// server the keys that let it recognise a previous run's connections.
fn endpoint_config(
    restart: Option<crate::tls::RestartKeys>,
) -> std::io::Result<quinn::EndpointConfig> {
    let mut config = match restart {
        Some(keys) => {
            let mut c = quinn::EndpointConfig::new(keys.reset);
            c.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(keys.cid))
            });
            c
        }
        None => quinn::EndpointConfig::default(),
    };
    config
        .max_udp_payload_size(max_udp_payload())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(config)
}

#[cfg(test)]
mod assembly_tests {
    use super::*;
    use proptest::prelude::*;

    /// `frame` cut into pieces of the given sizes (cycled).
    fn assemble(frame: &[u8], sizes: &[usize]) -> (bytes::Bytes, usize, usize) {
        let mut a = Assembly::new(frame.len());
        let (mut most_kept, mut early_reserve) = (0, 0);
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if a.missing() == 0 {
                break;
            }
            let n = (*size).clamp(1, a.missing());
            a.push(bytes::Bytes::copy_from_slice(&frame[at..at + n]));
            at += n;
            most_kept = most_kept.max(a.first.len());
            if a.got < FIRST_RESERVE.min(a.len) {
                early_reserve = early_reserve.max(a.payload.capacity());
            }
        }
        (a.finish(), most_kept, early_reserve)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any cut gives the frame back; before its first MiB has arrived
        /// no more than that is reserved, and never more pieces are kept
        /// than FIRST_PIECES.
        #[test]
        fn any_cut_gives_the_frame_back(
            len in 0usize..(3 << 20),
            sizes in proptest::collection::vec(
                prop_oneof![1usize..64, 1000usize..1500, 10_000usize..70_000], 1..8),
        ) {
            let frame: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let (payload, most_kept, early_reserve) = assemble(&frame, &sizes);
            prop_assert_eq!(&payload[..], &frame[..]);
            prop_assert!(most_kept <= FIRST_PIECES);
            prop_assert!(early_reserve <= FIRST_RESERVE);
        }
    }

    /// Tiny pieces are copied once FIRST_PIECES are kept: a peer cannot
    /// make us hold a receive buffer per byte.
    #[test]
    fn tiny_pieces_are_copied_not_kept() {
        let frame: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251) as u8).collect();
        let (payload, most_kept, early_reserve) = assemble(&frame, &[100]);
        assert_eq!(most_kept, FIRST_PIECES);
        assert_eq!(early_reserve, FIRST_RESERVE);
        assert_eq!(&payload[..], &frame[..]);
    }

    /// A 4 MiB frame in 16 KiB pieces is copied into one buffer reserved
    /// once, of the frame's size.
    #[test]
    fn large_pieces_are_reserved_once() {
        let frame = vec![7u8; 4 << 20];
        let mut a = Assembly::new(frame.len());
        let mut buffers = std::collections::HashSet::new();
        for piece in frame.chunks(16 << 10) {
            a.push(bytes::Bytes::copy_from_slice(piece));
            if a.payload.capacity() > 0 {
                buffers.insert(a.payload.as_ptr());
            }
        }
        assert_eq!(buffers.len(), 1, "the buffer moved");
        assert_eq!(a.payload.capacity(), frame.len());
        assert_eq!(&a.finish()[..], &frame[..]);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn sysctl(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// The kernel grants what it allows (Linux doubles the request for
    /// its bookkeeping and caps it at `rmem_max` / `wmem_max`), never less
    /// than that: the request is made.
    #[test]
    fn socket_buffers_are_as_large_as_the_kernel_allows() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (recv, send) = socket_buffers(&socket, SOCKET_BUFFER);
        assert_eq!(recv, 2 * SOCKET_BUFFER.min(sysctl("rmem_max")));
        assert_eq!(send, 2 * SOCKET_BUFFER.min(sysctl("wmem_max")));
    }
}

/// What MTU discovery settles on with these transport settings, on a real
/// QUIC connection over loopback whose path is narrowed in the socket.
#[cfg(test)]
mod mtu_tests {
    use super::*;
    use crate::udp::{PolicySocket, SendPolicy};
    use quinn::udp::Transmit;
    use quinn::AsyncUdpSocket;
    use std::io;
    use std::time::{Duration, Instant};

    /// A path that loses every datagram larger than `mtu` bytes.
    #[derive(Debug)]
    struct Narrow {
        mtu: usize,
    }

    impl SendPolicy for Narrow {
        fn send(&self, inner: &dyn AsyncUdpSocket, t: &Transmit) -> io::Result<()> {
            if t.segment_size.unwrap_or(t.contents.len()) > self.mtu {
                return Ok(()); // lost on the way
            }
            inner.try_send(t)
        }
    }

    /// The client's datagram size once `done` says so (or after 10 s),
    /// sending all the while, over a path that carries at most `path_mtu`.
    async fn settled_mtu(path_mtu: usize, done: impl Fn(u16) -> bool) -> u16 {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::tls::load_or_generate(
            &dir.path().join("cert.pem"),
            &dir.path().join("key.pem"),
            &["localhost".to_string()],
        )
        .unwrap();
        let transport = || Arc::new(transport(Duration::from_secs(10), 4).unwrap());

        let crypto = crate::tls::server_config(&id).unwrap();
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap(),
        ));
        server_config.transport_config(transport());
        let loopback = "127.0.0.1:0".parse().unwrap();
        let server = endpoint(loopback, Some(server_config), None).unwrap();
        let server_addr = server.local_addr().unwrap();
        let sink = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (_, mut recv) = conn.accept_bi().await.unwrap();
            // Until the client closes the connection.
            while let Ok(Some(_)) = recv.read_chunk(1 << 20, true).await {}
        });

        let verifier = crate::tls::Verifier::new(&crate::tls::Trust::pinned(&id.certs[0])).unwrap();
        let crypto = crate::tls::client_config(Arc::new(verifier)).unwrap();
        let mut client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
        ));
        client_config.transport_config(transport());
        // The client as wire::endpoint makes it, with the narrow path
        // between quinn and the socket.
        let runtime = quinn::default_runtime().unwrap();
        let socket = runtime
            .wrap_udp_socket(std::net::UdpSocket::bind(loopback).unwrap())
            .unwrap();
        let socket = Arc::new(PolicySocket {
            inner: Arc::new(crate::udp::bounded_batches(socket)),
            policy: Narrow { mtu: path_mtu },
        });
        let config = endpoint_config(None).unwrap();
        let client =
            quinn::Endpoint::new_with_abstract_socket(config, None, socket, runtime).unwrap();
        let conn = client
            .connect_with(client_config, server_addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _) = conn.open_bi().await.unwrap();
        let data = bytes::Bytes::from(vec![0u8; 64 << 10]);
        let until = Instant::now() + Duration::from_secs(10);
        while !done(conn.stats().path.current_mtu) && Instant::now() < until {
            send.write_chunk(data.clone()).await.unwrap();
        }
        let mtu = conn.stats().path.current_mtu;
        // Not waiting for the server: a close behind a full congestion
        // window can be lost (quinn issue #2785).
        sink.abort();
        mtu
    }

    /// On a path with Ethernet's MTU (1472-byte UDP payloads) the probes
    /// larger than that are lost and the search still settles close to it,
    /// not at the 1200 bytes it starts from. (Coarser search steps gave up
    /// at 1200 there.)
    #[tokio::test]
    async fn an_ethernet_path_settles_near_its_mtu() {
        let mtu = settled_mtu(1472, |m| m >= 1400).await;
        assert!((1400..=1472).contains(&mtu), "settled at {mtu} bytes");
    }

    /// On a path with jumbo frames (9000-byte MTU) it settles close to
    /// that, well above Ethernet's size.
    #[tokio::test]
    async fn a_jumbo_frame_path_settles_near_its_mtu() {
        let mtu = settled_mtu(8972, |m| m >= 8900).await;
        assert!((8900..=8972).contains(&mtu), "settled at {mtu} bytes");
    }

    /// On loopback the search reaches the largest size probed for.
    #[tokio::test]
    async fn loopback_reaches_the_largest_size() {
        let mtu = settled_mtu(usize::MAX, |m| m >= MAX_UDP_PAYLOAD).await;
        assert_eq!(mtu, MAX_UDP_PAYLOAD);
    }
}
