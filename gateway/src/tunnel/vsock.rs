//! A UDP socket that is not one: quinn's `AsyncUdpSocket` over the hub's outer links, so the
//! client↔connector QUIC session (mTLS, hello, policy, packets, DNS) runs end to end while its
//! datagrams travel inside the links to and from a hub. The hub only ever sees them sealed.
//!
//! Incoming datagrams are pushed by the outer links' tasks with the (synthetic) address they
//! stand for; outgoing ones go to [`Route`], which maps that address back to an outer link. Like
//! UDP, nothing here blocks or fails: a datagram that has nowhere to go, or no room, is
//! dropped and counted, and QUIC's recovery does the rest.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Datagrams received and not yet read by quinn: beyond it new ones are dropped, as a full
/// socket buffer drops them (~6 MB of full datagrams).
const INBOX: usize = 4096;

/// Where an outgoing datagram goes: its destination's outer link.
pub trait Route: Send + Sync + 'static {
    /// Sends `datagram` towards `to`; `false` when it had to be dropped.
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> bool;

    /// Sends datagrams of `segment` bytes (the last may be shorter) towards `to`; how many
    /// were dropped. One at a time unless the route can do better (relayed packets: one
    /// system call for the batch).
    fn send_batch(&self, to: SocketAddr, contents: &[u8], segment: usize) -> u64 {
        let dropped = contents
            .chunks(segment.max(1))
            .filter(|d| !self.send(to, d))
            .count();
        dropped as u64
    }

    /// The most datagrams quinn may hand over in one transmit.
    fn max_segments(&self) -> usize {
        1
    }
}

#[derive(Default)]
struct Inbox {
    queue: VecDeque<(SocketAddr, Bytes)>,
    waker: Option<Waker>,
}

pub struct VirtualSocket {
    local: SocketAddr,
    inbox: Mutex<Inbox>,
    route: Box<dyn Route>,
    /// Datagrams dropped: no room inbound, nowhere to go or too big outbound.
    pub dropped: AtomicU64,
}

impl fmt::Debug for VirtualSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualSocket")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl VirtualSocket {
    pub fn new(local: SocketAddr, route: Box<dyn Route>) -> Arc<VirtualSocket> {
        Arc::new(VirtualSocket {
            local,
            inbox: Mutex::new(Inbox::default()),
            route,
            dropped: AtomicU64::new(0),
        })
    }

    /// A datagram from `from` arrived over an outer link.
    pub fn push(&self, from: SocketAddr, datagram: Bytes) {
        let waker = match self.inbox.lock() {
            Ok(mut inbox) if inbox.queue.len() < INBOX => {
                inbox.queue.push_back((from, datagram));
                inbox.waker.take()
            }
            _ => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Sends never wait: the outer links queue or drop.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for VirtualSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let dropped = self
            .route
            .send_batch(transmit.destination, transmit.contents, size);
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut inbox) = self.inbox.lock() else {
            return Poll::Ready(Err(io::Error::other("virtual socket poisoned")));
        };
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some((from, d)) = inbox.queue.pop_front() else {
                break;
            };
            if d.len() > bufs[n].len() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            bufs[n][..d.len()].copy_from_slice(&d);
            meta[n] = RecvMeta {
                addr: from,
                len: d.len(),
                stride: d.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n == 0 {
            inbox.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_transmit_segments(&self) -> usize {
        self.route.max_segments()
    }

    /// The outer link carries each datagram whole or not at all, so path MTU discovery inside
    /// stays truthful.
    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Mutex<Vec<(SocketAddr, Vec<u8>)>>);

    impl Route for Arc<Collect> {
        fn send(&self, to: SocketAddr, datagram: &[u8]) -> bool {
            if let Ok(mut v) = self.0.lock() {
                v.push((to, datagram.to_vec()));
            }
            true
        }
    }

    /// Two QUIC endpoints over two virtual sockets joined by hand: a handshake and a datagram
    /// both ways, which is all the hub path asks of quinn.
    #[tokio::test]
    async fn quinn_runs_over_virtual_sockets() {
        use rcgen::generate_simple_self_signed;
        let cert = generate_simple_self_signed(vec!["inner".into()]).expect("cert");
        let der = rustls_pki_types::CertificateDer::from(cert.cert.der().to_vec());
        let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_no_client_auth()
            .with_single_cert(vec![der], key)
            .expect("server tls");
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).expect("quic"),
        ));
        let mut t = quinn::TransportConfig::default();
        t.datagram_receive_buffer_size(Some(1 << 20));
        server_cfg.transport_config(Arc::new(t));
        let client_cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("quic"),
        ));
        let a_addr: SocketAddr = "[fd68::1]:1".parse().expect("addr");
        let b_addr: SocketAddr = "[fd68::2]:1".parse().expect("addr");
        let to_b = Arc::new(Collect(Mutex::new(Vec::new())));
        let to_a = Arc::new(Collect(Mutex::new(Vec::new())));
        let a = VirtualSocket::new(a_addr, Box::new(to_b.clone()));
        let b = VirtualSocket::new(b_addr, Box::new(to_a.clone()));
        let rt = Arc::new(quinn::TokioRuntime);
        let server = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server_cfg),
            b.clone(),
            rt.clone(),
        )
        .expect("server");
        let mut client = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            a.clone(),
            rt,
        )
        .expect("client");
        client.set_default_client_config(client_cfg);
        // The "wire": move what each side sent into the other's inbox.
        let (a2, b2) = (a.clone(), b.clone());
        let (ta, tb) = (to_a.clone(), to_b.clone());
        let pump = tokio::spawn(async move {
            loop {
                for (q, dst, from) in [(&tb, &b2, a_addr), (&ta, &a2, b_addr)] {
                    let batch: Vec<_> =
                        q.0.lock()
                            .map(|mut v| v.drain(..).collect())
                            .unwrap_or_default();
                    for (_, d) in batch {
                        dst.push(from, Bytes::from(d));
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        let accept = tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("handshake");
            let d = conn.read_datagram().await.expect("datagram");
            conn.send_datagram(d).expect("echo");
            conn.closed().await;
        });
        let conn = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.connect(b_addr, "inner").expect("connect"),
        )
        .await
        .expect("in time")
        .expect("handshake");
        conn.send_datagram(Bytes::from_static(b"hello"))
            .expect("send");
        let echo = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read_datagram())
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(&echo[..], b"hello");
        conn.close(0u32.into(), b"done");
        pump.abort();
        accept.abort();
    }
}
