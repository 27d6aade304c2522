//! One peer's transport, whichever it is: a QUIC connection (packets as DATAGRAM frames,
//! control and DNS on streams) or the TLS-over-TCP fallback (everything as `core::frame`s on
//! one byte stream). The engine sees only [`Link`], [`ControlTx`]/[`ControlRx`] and
//! [`Inbound`], so every feature works the same over both. The TCP side is
//! [`TcpLink`] (`link/tcp.rs`).

mod tcp;
pub use tcp::{PeerCertificates, TcpLink};

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use anyhow::anyhow;
use bytes::Bytes;
use quinn::VarInt;
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;

use super::control::{self, Control, ControlError};
pub use super::reader::{Side, TCP_MAX_PACKET};
use crate::core::frame::FrameType;
pub use crate::node::datapath::SendError;
use crate::node::datapath::{PacketSink, SendWait, Sink};
use crate::node::drops::{Limit, Limits as Counts};

/// How long QUIC keeps a path at 1200 bytes after it took losses for a black hole, on every
/// session (direct, or through a hub): congestion alone (a UDP flood past the link's rate)
/// trips the detection, and quinn's minute would leave every packet over ~1160 bytes answered
/// with too-big for that long. Searching again sooner costs a true black hole a few probes
/// each time.
pub const BLACK_HOLE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(5);

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
            Link::Tcp(t) => t.id(),
        }
    }

    /// The peer's address, IPv4 as IPv4 (a dual-stack socket sees it IPv4-mapped).
    pub fn remote(&self) -> SocketAddr {
        match self {
            Link::Quic(c) => super::net::canonical(c.remote_address()),
            Link::Tcp(t) => super::net::canonical(t.remote()),
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
        if let Link::Tcp(t) = self {
            t.open_gate();
        }
    }

    /// The certificate chain the peer presented (leaf first), to check it again when the CRL
    /// changes; `None` if there was none.
    pub fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        match self {
            Link::Quic(c) => super::tls::peer_chain(c),
            Link::Tcp(t) => t.peer_chain(),
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
