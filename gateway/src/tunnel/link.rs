//! One peer's transport, whichever it is: a QUIC connection (packets as DATAGRAM frames,
//! control and DNS on streams) or the TLS-over-TCP fallback (everything as `core::frame`s on
//! one byte stream). The engine sees only [`Link`], [`ControlTx`]/[`ControlRx`] and
//! [`Inbound`], so every feature works the same over both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use quinn::VarInt;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::control::{self, Control, ControlError};
use crate::core::frame::{self, FrameType};

/// Largest IP packet the TCP fallback carries. Below the 1362 bytes a fresh QUIC connection's
/// datagrams hold, so a TCP session whose MSS was clamped on the fallback still fits when the
/// tunnel moves back to QUIC, without waiting for path MTU discovery.
pub const TCP_MAX_PACKET: usize = 1360;
/// Packets queued towards the TCP socket; beyond this they are dropped (and counted), as a
/// full QUIC datagram queue would drop them, rather than delaying everything behind them.
const TCP_QUEUE: usize = 2048;
/// One write to the socket gathers queued frames up to this size.
const WRITE_BATCH: usize = 64 * 1024;
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// Larger than one packet on this link: answered with ICMP "too big".
    TooBig,
    /// Queue full or link closed.
    Dropped,
}

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

    pub fn remote(&self) -> SocketAddr {
        match self {
            Link::Quic(c) => c.remote_address(),
            Link::Tcp(t) => t.remote,
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

    pub fn send_packet(&self, pkt: &[u8]) -> Result<(), SendError> {
        match self {
            Link::Quic(c) => match c.send_datagram(Bytes::copy_from_slice(pkt)) {
                Ok(()) => Ok(()),
                Err(quinn::SendDatagramError::TooLarge) => Err(SendError::TooBig),
                Err(_) => Err(SendError::Dropped),
            },
            Link::Tcp(t) => {
                if pkt.len() > TCP_MAX_PACKET {
                    return Err(SendError::TooBig);
                }
                t.try_send_frame(FrameType::Packet, pkt)
            }
        }
    }

    /// Asks the connector's DNS forwarder: one QUIC stream per query, or one request id on the
    /// TCP stream.
    pub async fn relay_dns(&self, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self {
            Link::Quic(c) => super::dns::relay(c, msg).await,
            Link::Tcp(t) => t.relay_dns(msg).await,
        }
    }

    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Link::Quic(c) => c.close(VarInt::from_u32(code), reason.as_bytes()),
            Link::Tcp(t) => t.close(),
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
    Quic(quinn::RecvStream),
    Tcp(mpsc::Receiver<Result<Control, ControlError>>),
}

impl ControlRx {
    pub async fn recv(&mut self) -> Result<Control, ControlError> {
        match self {
            ControlRx::Quic(s) => control::recv(s).await,
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
}

/// The TLS-over-TCP link: a reader task that decodes frames and dispatches them, a writer task
/// that gathers queued frames into few writes.
pub struct TcpLink {
    id: u64,
    remote: SocketAddr,
    /// A duplicate of the socket: for TCP_INFO (the kernel's RTT) and to shut it down.
    socket: OwnedFd,
    out: mpsc::Sender<Vec<u8>>,
    pending_dns: Mutex<HashMap<u32, oneshot::Sender<Vec<u8>>>>,
    next_dns: AtomicU32,
    closed: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// What the peer presented in the TLS handshake, leaf first.
    peer_chain: Vec<CertificateDer<'static>>,
}

static NEXT_TCP_ID: AtomicU64 = AtomicU64::new(1 << 48);

impl TcpLink {
    /// Wraps an established TLS stream. `socket` is the underlying TCP socket (duplicated).
    pub fn start<S>(stream: S, socket: OwnedFd, remote: SocketAddr) -> Opened
    where
        S: AsyncRead + AsyncWrite + PeerCertificates + Send + 'static,
    {
        let peer_chain = stream.peer_certificates();
        let (reader, writer) = tokio::io::split(stream);
        let (out_tx, out_rx) = mpsc::channel(TCP_QUEUE);
        let (packets_tx, packets_rx) = mpsc::channel(TCP_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(16);
        let (dns_tx, dns_rx) = mpsc::channel(256);
        let link = Arc::new(TcpLink {
            id: NEXT_TCP_ID.fetch_add(1, Ordering::Relaxed),
            remote,
            socket,
            out: out_tx,
            pending_dns: Mutex::new(HashMap::new()),
            next_dns: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            peer_chain,
        });
        let weak = Arc::downgrade(&link);
        let read = tokio::spawn(async move {
            let result = read_frames(reader, &weak, packets_tx, control_tx.clone(), dns_tx).await;
            if let Err(e) = result {
                let _ = control_tx.send(Err(ControlError::Stream(e))).await;
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
            dns_queries: Some(dns_rx),
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
        self.out
            .try_send(Self::frame(kind, payload)?)
            .map_err(|_| SendError::Dropped)
    }

    /// Waits for room in the queue: for control and DNS, which must not be dropped.
    pub async fn send_frame(&self, kind: FrameType, payload: &[u8]) -> anyhow::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            bail!("the TCP link is closed");
        }
        let f = Self::frame(kind, payload).map_err(|_| anyhow!("frame too large"))?;
        self.out
            .send(f)
            .await
            .map_err(|_| anyhow!("the TCP link is closed"))
    }

    async fn relay_dns(&self, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
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

    pub fn close(&self) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
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

async fn read_frames<R: AsyncRead>(
    reader: R,
    link: &std::sync::Weak<TcpLink>,
    packets: mpsc::Sender<Bytes>,
    control: mpsc::Sender<Result<Control, ControlError>>,
    dns: mpsc::Sender<(u32, Vec<u8>)>,
) -> Result<(), String> {
    let mut reader = std::pin::pin!(reader);
    let mut decoder = frame::Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the peer closed the TCP link".into());
        }
        decoder.push(&buf[..n]);
        while let Some((kind, payload)) = decoder.next_frame().map_err(|e| format!("{e:?}"))? {
            match kind {
                FrameType::Packet => {
                    // Waiting here pushes back on the sender through TCP's own flow control.
                    if packets.send(Bytes::from(payload)).await.is_err() {
                        return Ok(());
                    }
                }
                FrameType::Control => {
                    let msg = control::decode(&payload);
                    if control.send(msg).await.is_err() {
                        return Ok(());
                    }
                }
                FrameType::DnsQuery | FrameType::DnsAnswer if payload.len() < 4 => {
                    return Err("DNS frame shorter than its request id".into());
                }
                FrameType::DnsQuery => {
                    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    // A client does not answer queries; dropping them is all it can do.
                    let _ = dns.try_send((id, payload[4..].to_vec()));
                }
                FrameType::DnsAnswer => {
                    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    let Some(link) = link.upgrade() else {
                        return Ok(());
                    };
                    let waiter = link.pending_dns.lock().ok().and_then(|mut p| p.remove(&id));
                    if let Some(tx) = waiter {
                        let _ = tx.send(payload[4..].to_vec());
                    }
                }
            }
        }
    }
}

async fn write_frames<W: AsyncWrite>(writer: W, mut out: mpsc::Receiver<Vec<u8>>) {
    let mut writer = std::pin::pin!(writer);
    while let Some(first) = out.recv().await {
        let mut batch = first;
        while batch.len() < WRITE_BATCH {
            match out.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if writer.write_all(&batch).await.is_err() || writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}
