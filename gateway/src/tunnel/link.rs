//! One peer's transport, whichever it is: a QUIC connection (packets as DATAGRAM frames,
//! control and DNS on streams) or the TLS-over-TCP fallback (everything as `core::frame`s on
//! one byte stream). The engine sees only [`Link`], [`ControlTx`]/[`ControlRx`] and
//! [`Inbound`], so every feature works the same over both.
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
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use quinn::VarInt;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::control::{self, Control, ControlError};
use super::reader::{Dispatch, PendingDns, ReadError, read_frames};
pub use super::reader::{Side, TCP_MAX_PACKET};
use crate::core::frame::{self, FrameType};
pub use crate::node::datapath::SendError;
use crate::node::datapath::{PacketSink, SendWait, Sink};
use crate::node::drops::{Limit, Limits as Counts};

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

#[derive(Clone)]
pub enum Link {
    Quic(quinn::Connection),
    Tcp(Arc<TcpLink>),
}

impl Link {
    pub fn kind(&self) -> &'static str {
        match self {
            Link::Quic(_) => "quic",
            Link::Tcp(_) => "tcp",
        }
    }

    /// Stable for the life of the link; a new link after a reconnect or a switch gets a new one.
    pub fn id(&self) -> u64 {
        match self {
            Link::Quic(c) => c.stable_id() as u64,
            Link::Tcp(t) => t.id,
        }
    }

    /// The peer's address, IPv4 as IPv4 (a dual-stack socket sees it IPv4-mapped).
    pub fn remote(&self) -> SocketAddr {
        match self {
            Link::Quic(c) => super::net::canonical(c.remote_address()),
            Link::Tcp(t) => super::net::canonical(t.remote),
        }
    }

    pub fn rtt(&self) -> Duration {
        match self {
            Link::Quic(c) => c.rtt(),
            Link::Tcp(t) => t.rtt(),
        }
    }

    /// The largest IP packet one send carries, `None` while QUIC has not agreed on datagrams.
    pub fn max_packet(&self) -> Option<usize> {
        match self {
            Link::Quic(c) => c.max_datagram_size(),
            Link::Tcp(_) => Some(TCP_MAX_PACKET),
        }
    }

    /// Queues `pkt` if the link has room now. QUIC: `send_datagram` would make room by dropping
    /// the oldest queued datagram; polling `send_datagram_wait` once instead queues it only
    /// when there is room, and otherwise leaves nothing behind.
    pub fn send_packet(&self, pkt: &[u8]) -> Result<(), SendError> {
        match self {
            Link::Quic(c) => {
                let mut send = std::pin::pin!(c.send_datagram_wait(Bytes::copy_from_slice(pkt)));
                let mut cx = Context::from_waker(Waker::noop());
                match send.as_mut().poll(&mut cx) {
                    Poll::Ready(r) => datagram_sent(r),
                    Poll::Pending => Err(SendError::Full),
                }
            }
            Link::Tcp(t) => {
                if pkt.len() > TCP_MAX_PACKET {
                    return Err(SendError::TooBig);
                }
                t.try_send_frame(FrameType::Packet, pkt)
            }
        }
    }

    /// Queues `pkt`, waiting for room.
    pub async fn send_packet_wait(&self, pkt: &[u8]) -> Result<(), SendError> {
        match self {
            Link::Quic(c) => datagram_sent(c.send_datagram_wait(Bytes::copy_from_slice(pkt)).await),
            Link::Tcp(t) => {
                if pkt.len() > TCP_MAX_PACKET {
                    return Err(SendError::TooBig);
                }
                t.send_frame(FrameType::Packet, pkt)
                    .await
                    .map_err(|_| SendError::Dropped)
            }
        }
    }

    /// Asks the connector's DNS forwarder: one QUIC stream per query, or one request id on the
    /// TCP stream.
    pub async fn relay_dns(&self, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self {
            Link::Quic(c) => super::relay::ask(c, msg).await,
            Link::Tcp(t) => t.relay_dns(msg).await,
        }
    }

    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Link::Quic(c) => c.close(VarInt::from_u32(code), reason.as_bytes()),
            Link::Tcp(t) => t.close(),
        }
    }

    /// The connector welcomed the client: its frames after the hello may now be read.
    pub fn welcomed(&self) {
        if let Link::Tcp(t) = self
            && let Ok(mut gate) = t.gate.lock()
            && let Some(open) = gate.take()
        {
            let _ = open.send(());
        }
    }

    /// The certificate chain the peer presented (leaf first), to check it again when the CRL
    /// changes; `None` if there was none.
    pub fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        match self {
            Link::Quic(c) => super::tls::peer_chain(c),
            Link::Tcp(t) => (!t.peer_chain.is_empty()).then(|| t.peer_chain.clone()),
        }
    }
}

fn datagram_sent(r: Result<(), quinn::SendDatagramError>) -> Result<(), SendError> {
    match r {
        Ok(()) => Ok(()),
        Err(quinn::SendDatagramError::TooLarge) => Err(SendError::TooBig),
        Err(_) => Err(SendError::Dropped),
    }
}

impl PacketSink for Link {
    fn send_packet(&self, pkt: &[u8]) -> Result<(), SendError> {
        Link::send_packet(self, pkt)
    }

    fn send_packet_wait<'a>(&'a self, pkt: &'a [u8]) -> SendWait<'a> {
        Box::pin(Link::send_packet_wait(self, pkt))
    }

    fn max_packet(&self) -> Option<usize> {
        Link::max_packet(self)
    }
}

impl Link {
    /// This link as the node's packet sink.
    pub fn sink(&self) -> Sink {
        Sink(Arc::new(self.clone()))
    }
}

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

/// Sends control messages on the link's control channel.
pub enum ControlTx {
    Quic(quinn::SendStream),
    Tcp(Arc<TcpLink>),
}

impl ControlTx {
    pub async fn send(&mut self, msg: &Control) -> Result<(), ControlError> {
        match self {
            ControlTx::Quic(s) => control::send(s, msg).await,
            ControlTx::Tcp(t) => {
                let body = control::encode_body(msg)?;
                t.send_frame(FrameType::Control, &body)
                    .await
                    .map_err(|_| ControlError::Closed)
            }
        }
    }

    /// Flushes what was sent; the link stays up.
    pub fn finish(&mut self) {
        if let ControlTx::Quic(s) = self {
            let _ = s.finish();
        }
    }
}

pub enum ControlRx {
    /// The stream and the largest message read from it.
    Quic(quinn::RecvStream, usize),
    Tcp(mpsc::Receiver<Result<Control, ControlError>>),
}

impl ControlRx {
    pub fn quic(stream: quinn::RecvStream, side: Side) -> ControlRx {
        ControlRx::Quic(stream, side.control_max())
    }

    pub async fn recv(&mut self) -> Result<Control, ControlError> {
        match self {
            ControlRx::Quic(s, max) => control::recv(s, *max).await,
            ControlRx::Tcp(rx) => rx.recv().await.unwrap_or(Err(ControlError::Closed)),
        }
    }
}

/// IP packets arriving on a link.
pub enum Inbound {
    Quic(quinn::Connection),
    Tcp(mpsc::Receiver<Bytes>),
}

impl Inbound {
    pub async fn packet(&mut self) -> anyhow::Result<Bytes> {
        match self {
            Inbound::Quic(c) => Ok(c.read_datagram().await?),
            Inbound::Tcp(packets) => packets
                .recv()
                .await
                .ok_or_else(|| anyhow!("the TCP link closed")),
        }
    }
    /// A packet that has already arrived, without waiting: `None` when there is none yet.
    pub fn try_packet(&mut self) -> Option<anyhow::Result<Bytes>> {
        match self {
            Inbound::Quic(c) => {
                let mut read = std::pin::pin!(c.read_datagram());
                let mut cx = Context::from_waker(Waker::noop());
                match read.as_mut().poll(&mut cx) {
                    Poll::Ready(r) => Some(r.map_err(Into::into)),
                    Poll::Pending => None,
                }
            }
            Inbound::Tcp(packets) => match packets.try_recv() {
                Ok(pkt) => Some(Ok(pkt)),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    Some(Err(anyhow!("the TCP link closed")))
                }
            },
        }
    }

    /// Before the welcome: QUIC datagrams are read and dropped (counted) so none pile up;
    /// the TCP link reads nothing yet. Never returns.
    pub async fn discard(&mut self, counts: &Counts) -> std::convert::Infallible {
        if let Inbound::Quic(c) = self {
            while c.read_datagram().await.is_ok() {
                counts.count(Limit::PacketBeforeWelcome);
            }
        }
        std::future::pending().await
    }
}

/// A freshly established link with its channels, before the hello.
pub struct Opened {
    pub link: Link,
    pub control_tx: ControlTx,
    pub control_rx: ControlRx,
    pub inbound: Inbound,
    /// TCP: DNS queries (request id, message) for the connector's forwarder. QUIC brings each
    /// query on its own stream instead.
    pub dns_queries: Option<mpsc::Receiver<(u32, Vec<u8>)>>,
    /// Through a hub: how the outer link travels, which is what the network sees and what a
    /// move back to QUIC changes (the inner session is QUIC either way).
    pub outer: Option<crate::node::LinkKind>,
}

impl Opened {
    /// A QUIC link whose control stream `side` opened or accepted: packets and DNS on the
    /// connection itself.
    pub fn quic(
        conn: quinn::Connection,
        (send, recv): (quinn::SendStream, quinn::RecvStream),
        side: Side,
        outer: Option<crate::node::LinkKind>,
    ) -> Opened {
        Opened {
            link: Link::Quic(conn.clone()),
            control_tx: ControlTx::Quic(send),
            control_rx: ControlRx::quic(recv, side),
            inbound: Inbound::Quic(conn),
            dns_queries: None,
            outer,
        }
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

    fn rtt(&self) -> Duration {
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

    fn try_send_frame(&self, kind: FrameType, payload: &[u8]) -> Result<(), SendError> {
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

    async fn relay_dns(&self, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        if msg.len() > super::relay::MAX_QUERY {
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
