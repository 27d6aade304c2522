//! The TLS-over-TCP fallback link: every packet, control message and DNS query as a
//! `core::frame` on one byte stream, a reader task that decodes and dispatches frames and a
//! writer task that gathers queued frames into few writes.
//!
//! Bounds on a connector's TCP link, where the client is not trusted yet: the first frame must
//! be a Control frame (the hello) of at most [`MAX_CLIENT_MESSAGE`] bytes, checked from its
//! header; nothing else is read until [`Link::welcomed`]; after it, frames are checked against
//! [`Side::limits`] from their header, before their payload is waited for. Queues are bounded
//! in bytes both ways.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{ControlRx, ControlTx, Inbound, Link, Opened};
use crate::core::frame::{self, FrameType};
use crate::node::datapath::SendError;
use crate::node::drops::{Limit, Limits as Counts};
use crate::tunnel::control::ControlError;
use crate::tunnel::reader::{Dispatch, PendingDns, ReadError, read_frames};
use crate::tunnel::reader::{Side, TCP_MAX_PACKET};

/// Bytes of frames queued towards the TCP socket: ~1,500 full packets, 4 ms at 3 Gbit/s and
/// what a writer stalled by a slow peer may hold. The TUN reader waits for room (a bounded
/// while, then drops and counts), as it does for a full QUIC datagram queue; control and DNS
/// wait for room.
const OUT_QUEUE_BYTES: usize = 2 << 20;
/// Packets read from the socket and not yet handled: 1 MiB of the largest packet frames. The
/// reader waits when it is full, which pushes back on the sender through TCP.
const IN_QUEUE_PACKETS: usize = (1 << 20) / TCP_MAX_PACKET;
/// One write to the socket gathers queued frames up to this size.
const WRITE_BATCH: usize = 64 * 1024;
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// DNS queries read from a client and not yet admitted (at most MAX_QUERY bytes each); more
/// are dropped and counted.
const DNS_QUEUE: usize = 256;

/// A stream that knows which certificates its peer presented: the TLS streams of the fallback.
pub trait PeerCertificates {
    fn peer_certificates(&self) -> Vec<CertificateDer<'static>>;
}

impl<IO> PeerCertificates for tokio_rustls::server::TlsStream<IO> {
    fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        self.get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .to_vec()
    }
}

impl<IO> PeerCertificates for tokio_rustls::client::TlsStream<IO> {
    fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        self.get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .to_vec()
    }
}

/// In-memory streams in tests: no peer, no certificates.
impl PeerCertificates for tokio::io::DuplexStream {
    fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        Vec::new()
    }
}

/// The TLS-over-TCP link: a reader task that decodes frames and dispatches them, a writer task
/// that gathers queued frames into few writes.
pub struct TcpLink {
    id: u64,
    remote: SocketAddr,
    /// A duplicate of the socket: for TCP_INFO (the kernel's RTT) and to shut it down.
    socket: OwnedFd,
    /// Frames to write, each with its share of `budget`.
    out: mpsc::Sender<(Vec<u8>, OwnedSemaphorePermit)>,
    /// OUT_QUEUE_BYTES permits, one per queued byte; closed with the link.
    budget: Arc<Semaphore>,
    pending_dns: PendingDns,
    next_dns: AtomicU32,
    closed: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Connector: opened by [`Link::welcomed`]; until then the reader stops after the hello.
    gate: Mutex<Option<oneshot::Sender<()>>>,
    /// What the peer presented in the TLS handshake, leaf first.
    peer_chain: Vec<CertificateDer<'static>>,
}

static NEXT_TCP_ID: AtomicU64 = AtomicU64::new(1 << 48);

impl TcpLink {
    /// Stable for the life of the link.
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Connector: the client is welcomed, so the reader may go on past the hello.
    pub(super) fn open_gate(&self) {
        if let Ok(mut gate) = self.gate.lock()
            && let Some(open) = gate.take()
        {
            let _ = open.send(());
        }
    }

    /// What the peer presented (leaf first); `None` if nothing.
    pub(super) fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        (!self.peer_chain.is_empty()).then(|| self.peer_chain.clone())
    }

    /// Wraps an established TLS stream. `socket` is the underlying TCP socket (duplicated).
    /// Protocol violations and drops are counted in `tally`.
    pub fn start<S>(
        stream: S,
        socket: OwnedFd,
        remote: SocketAddr,
        side: Side,
        tally: Arc<Counts>,
    ) -> Opened
    where
        S: AsyncRead + AsyncWrite + PeerCertificates + Send + 'static,
    {
        let peer_chain = stream.peer_certificates();
        let (reader, writer) = tokio::io::split(stream);
        // The byte budget bounds the queue; the count only has to be large enough for it.
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE_BYTES / 64);
        let (packets_tx, packets_rx) = mpsc::channel(IN_QUEUE_PACKETS);
        let (control_tx, control_rx) = mpsc::channel(16);
        let (dns_tx, dns_rx) = mpsc::channel(DNS_QUEUE);
        let (gate_tx, gate_rx) = oneshot::channel();
        let gate_rx = (side == Side::Connector).then_some(gate_rx);
        let pending = PendingDns::default();
        let link = Arc::new(TcpLink {
            id: NEXT_TCP_ID.fetch_add(1, Ordering::Relaxed),
            remote,
            socket,
            out: out_tx,
            budget: Arc::new(Semaphore::new(OUT_QUEUE_BYTES)),
            pending_dns: pending.clone(),
            next_dns: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            gate: Mutex::new(Some(gate_tx)),
            peer_chain,
        });
        let weak = Arc::downgrade(&link);
        let read = tokio::spawn(async move {
            let to = Dispatch {
                pending: pending.clone(),
                packets: packets_tx,
                control: control_tx.clone(),
                dns: dns_tx,
                tally: &tally,
            };
            let result = read_frames(reader, side, gate_rx, to).await;
            if let Err(e) = result {
                match &e {
                    ReadError::Frame(f) => tally.count(Limit::of_frame(*f)),
                    ReadError::NotHello(_) => tally.count(Limit::FrameNotHello),
                    _ => {}
                }
                let _ = control_tx
                    .send(Err(ControlError::Stream(e.to_string())))
                    .await;
            }
            if let Some(l) = weak.upgrade() {
                l.close();
            }
        });
        let write = tokio::spawn(write_frames(writer, out_rx));
        if let Ok(mut t) = link.tasks.lock() {
            t.push(read.abort_handle());
            t.push(write.abort_handle());
        }
        Opened {
            link: Link::Tcp(link.clone()),
            control_tx: ControlTx::Tcp(link),
            control_rx: ControlRx::Tcp(control_rx),
            inbound: Inbound::Tcp(packets_rx),
            dns_queries: (side == Side::Connector).then_some(dns_rx),
            outer: None,
        }
    }

    pub(super) fn rtt(&self) -> Duration {
        // SAFETY: getsockopt into a zeroed tcp_info of the size passed, on a socket we own.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Duration::from_micros(u64::from(info.tcpi_rtt))
        } else {
            Duration::ZERO
        }
    }

    fn frame(kind: FrameType, payload: &[u8]) -> Result<Vec<u8>, SendError> {
        let mut buf = Vec::with_capacity(payload.len() + 3);
        frame::encode(kind, payload, &mut buf).map_err(|_| SendError::TooBig)?;
        Ok(buf)
    }

    pub(super) fn try_send_frame(&self, kind: FrameType, payload: &[u8]) -> Result<(), SendError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(SendError::Dropped);
        }
        let f = Self::frame(kind, payload)?;
        let n = u32::try_from(f.len()).map_err(|_| SendError::TooBig)?;
        let permit = match self.budget.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(SendError::Full),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SendError::Dropped),
        };
        self.out.try_send((f, permit)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Dropped,
        })
    }

    /// Waits for room in the queue: for control and DNS, which must not be dropped.
    pub async fn send_frame(&self, kind: FrameType, payload: &[u8]) -> anyhow::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            bail!("the TCP link is closed");
        }
        let f = Self::frame(kind, payload).map_err(|_| anyhow!("frame too large"))?;
        let n = u32::try_from(f.len()).map_err(|_| anyhow!("frame too large"))?;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| anyhow!("the TCP link is closed"))?;
        self.out
            .send((f, permit))
            .await
            .map_err(|_| anyhow!("the TCP link is closed"))
    }

    pub(super) async fn relay_dns(&self, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        if msg.len() > crate::tunnel::relay::MAX_QUERY {
            bail!("a {}-byte query is above what a connector takes", msg.len());
        }
        let id = self.next_dns.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending_dns.lock() {
            p.insert(id, tx);
        }
        let mut payload = Vec::with_capacity(4 + msg.len());
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(msg);
        let result = async {
            self.send_frame(FrameType::DnsQuery, &payload).await?;
            tokio::time::timeout(DNS_TIMEOUT, rx)
                .await
                .map_err(|_| anyhow!("no DNS answer over the TCP link"))?
                .map_err(|_| anyhow!("the TCP link closed"))
        }
        .await;
        if let Ok(mut p) = self.pending_dns.lock() {
            p.remove(&id);
        }
        result
    }

    /// The connector's answer to a DnsQuery frame.
    pub async fn answer_dns(&self, id: u32, answer: &[u8]) -> anyhow::Result<()> {
        let mut payload = Vec::with_capacity(4 + answer.len());
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(answer);
        self.send_frame(FrameType::DnsAnswer, &payload).await
    }

    /// [`answer_dns`](Self::answer_dns) if the queue has room now, else dropped.
    pub fn try_answer_dns(&self, id: u32, answer: &[u8]) -> Result<(), SendError> {
        let mut payload = Vec::with_capacity(4 + answer.len());
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(answer);
        self.try_send_frame(FrameType::DnsAnswer, &payload)
    }

    pub fn close(&self) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        // Wakes whoever waits for room in the queue.
        self.budget.close();
        // SAFETY: shutdown(2) on a socket we hold a duplicate of; wakes both tasks.
        unsafe {
            libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.close();
    }
}

async fn write_frames<W: AsyncWrite>(
    writer: W,
    mut out: mpsc::Receiver<(Vec<u8>, OwnedSemaphorePermit)>,
) {
    let mut writer = std::pin::pin!(writer);
    let mut permits = Vec::new();
    while let Some((first, permit)) = out.recv().await {
        let mut batch = first;
        permits.push(permit);
        while batch.len() < WRITE_BATCH {
            match out.try_recv() {
                Ok((more, permit)) => {
                    batch.extend_from_slice(&more);
                    permits.push(permit);
                }
                Err(_) => break,
            }
        }
        if writer.write_all(&batch).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        // Written: the room is free again.
        permits.clear();
    }
    let _ = writer.shutdown().await;
}
