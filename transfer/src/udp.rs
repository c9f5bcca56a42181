//! The UDP socket under quinn, with one repair: a batch of datagrams handed
//! to the kernel at once (GSO) never exceeds what one UDP send can carry.
//!
//! quinn batches up to ten datagrams of the path's MTU into one send. With
//! the large datagrams MTU discovery finds on loopback or jumbo-frame paths
//! (9000 bytes and up), ten of them exceed 64 KiB; the kernel refuses such
//! a send (EMSGSIZE), and quinn-udp drops it without a word, as it expects
//! that only of MTU probes. The datagrams were then lost, QUIC took it for
//! congestion, and its black-hole detection fell back to 1200-byte packets.
//! Here a batch that is too large goes out as several sends.

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Most payload bytes one UDP send may carry over IPv4 (65535 less the IP
/// and UDP headers); over IPv6 the limit is a little higher.
const MAX_SEND: usize = 65_507;

/// How a [`PolicySocket`] sends: with the socket it wraps.
pub(crate) trait SendPolicy: std::fmt::Debug + Send + Sync + 'static {
    fn send(&self, inner: &dyn AsyncUdpSocket, transmit: &Transmit) -> io::Result<()>;
}

/// A quinn socket that sends as its policy says and does everything else
/// as the socket it wraps.
#[derive(Debug)]
pub(crate) struct PolicySocket<P> {
    pub(crate) inner: Arc<dyn AsyncUdpSocket>,
    pub(crate) policy: P,
}

impl<P: SendPolicy> AsyncUdpSocket for PolicySocket<P> {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.policy.send(self.inner.as_ref(), transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    // quinn runs MTU discovery only on sockets that do not fragment.
    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// `inner`, with batched sends that stay within [`MAX_SEND`].
pub(crate) fn bounded_batches(inner: Arc<dyn AsyncUdpSocket>) -> PolicySocket<BoundedBatches> {
    PolicySocket {
        inner,
        policy: BoundedBatches,
    }
}

/// Sends a batch larger than [`MAX_SEND`] as several sends.
#[derive(Debug)]
pub(crate) struct BoundedBatches;

impl SendPolicy for BoundedBatches {
    fn send(&self, inner: &dyn AsyncUdpSocket, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size.filter(|&s| s > 0) else {
            return inner.try_send(transmit);
        };
        if transmit.contents.len() <= MAX_SEND {
            return inner.try_send(transmit);
        }
        // Whole datagrams per send. Should a later send find the socket
        // full, the error makes quinn send the whole batch again: the
        // receiver discards the datagrams it already has as duplicates.
        let per_send = (MAX_SEND / segment).max(1) * segment;
        for piece in transmit.contents.chunks(per_send) {
            inner.try_send(&Transmit {
                contents: piece,
                segment_size: (piece.len() > segment).then_some(segment),
                ..*transmit
            })?;
        }
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Ten 9000-byte datagrams in one batch (90,000 bytes, which one
    /// send cannot carry) all arrive, each whole.
    #[tokio::test]
    async fn a_batch_larger_than_one_send_arrives_whole() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let runtime = quinn::default_runtime().unwrap();
        let inner = runtime
            .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        if inner.max_transmit_segments() < 10 {
            eprintln!("skipped: this kernel does not batch sends (no UDP GSO)");
            return;
        }
        let socket = Arc::new(bounded_batches(inner));
        let mut writable = socket.clone().create_io_poller();
        let contents: Vec<u8> = (0..90_000u32).map(|i| (i / 9000) as u8).collect();
        let transmit = Transmit {
            destination: receiver.local_addr().unwrap(),
            ecn: None,
            contents: &contents,
            segment_size: Some(9000),
            src_ip: None,
        };
        loop {
            std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx))
                .await
                .unwrap();
            match socket.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                sent => break sent.unwrap(),
            }
        }
        let mut buf = vec![0u8; 65_536];
        for i in 0..10u8 {
            let n = receiver
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} did not arrive: {e}"));
            assert_eq!(n, 9000, "datagram {i}");
            assert!(buf[..n].iter().all(|&b| b == i), "datagram {i} in order");
        }
    }
}
