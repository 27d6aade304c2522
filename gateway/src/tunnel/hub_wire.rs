//! The hub's outer links, one shape over both transports: a few control messages (who I am,
//! which connector you got, a flow that ended) and opaque datagrams. Over QUIC (ALPN
//! [`HUB_ALPN`]) the control messages travel on one stream the dialler opens and datagrams as
//! DATAGRAM frames; over TLS on TCP both are frames `[kind: u8][length: u16 BE][body]` on the
//! stream, with a ping each second each way so a dead peer is noticed within [`TCP_IDLE`].
//!
//! A datagram between a connector and the hub starts with the 4-byte flow id the hub gave the
//! session ([`FLOW_ID`]); between a client and the hub it is the inner QUIC packet alone (one
//! session per client link). What is inside is the client↔connector QUIC, sealed end to end.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::raw::RawFlow;
use crate::node::LinkKind;

/// ALPN of a hub's outer links; a tunnel peer (`gateway/1`) never mistakes one for its own.
pub const HUB_ALPN: &[u8] = b"gateway-hub/1";
/// Bytes of flow id before each datagram on a connector's link.
pub const FLOW_ID: usize = 4;
/// Largest control message: a hello with a few hundred routes.
pub const MAX_CONTROL: usize = 16 << 10;
/// Largest datagram over TCP: the inner QUIC's packets are at most [`INNER_MAX_UDP`] bytes.
const MAX_DATAGRAM: usize = 1500 + FLOW_ID;
/// UDP payload the inner QUIC may use: an outer QUIC datagram on a 1500-byte IPv4 path holds
/// 1434 bytes (1472 - 38 quinn reserves), less the flow id the hub adds towards the connector.
pub const INNER_MAX_UDP: u16 = 1430;
/// Outer keepalive and idle timeout: a replica that vanished is dropped within this, so its
/// clients are on another one well within 5 s.
pub const OUTER_KEEPALIVE: Duration = Duration::from_millis(500);
pub const OUTER_IDLE: Duration = Duration::from_millis(2500);
const TCP_PING: Duration = Duration::from_secs(1);
pub const TCP_IDLE: Duration = Duration::from_millis(3000);
/// Frames queued towards a TCP socket; datagrams beyond it are dropped as UDP would.
const TCP_QUEUE: usize = 2048;
/// Datagrams and messages read from an outer link and not yet handled.
const IN_QUEUE: usize = 1024;

const KIND_CONTROL: u8 = 0;
const KIND_DATAGRAM: u8 = 1;

/// What the ends of an outer link say to each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum HubMsg {
    /// Connector → hub, first: its replica group and what it serves (for status); `raw`: it
    /// takes relayed packets (tunnel/raw.rs) on this link's QUIC 5-tuple.
    Connector {
        group: String,
        routes: Vec<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        raw: bool,
    },
    /// Client → hub, first: the group it wants (any when absent); `raw` as for a connector.
    Client {
        group: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        raw: bool,
    },
    /// Hub → connector: relaying starts; `raw`: relayed packets too.
    Welcome {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        raw: bool,
    },
    /// Hub → client: the replica its session goes to, and its relayed flow when it asked.
    Assigned {
        connector: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        raw: Option<RawFlow>,
    },
    /// Hub → a connector that asked for relayed packets: a flow opens, sent before its
    /// client can send anything.
    FlowOpened { flow: RawFlow },
    /// Hub → either: why nothing is relayed; the link closes after it.
    Refused { reason: String },
    /// Hub → connector: the session on this flow ended.
    FlowClosed { flow: u32 },
    /// Keepalive on TCP links.
    Ping {},
}

/// Something read from an outer link.
#[derive(Debug)]
pub enum In {
    Control(HubMsg),
    Datagram(Bytes),
}

/// The receiving half of an outer link. Over QUIC, datagrams are read from the connection by
/// whoever forwards them (no task and channel in between: one wake-up less per packet on a
/// relay's hot path); control messages come from the control stream's task.
pub enum OuterRx {
    Quic {
        conn: quinn::Connection,
        control: Option<mpsc::Receiver<HubMsg>>,
    },
    Tcp(mpsc::Receiver<In>),
}

impl OuterRx {
    /// The next message or datagram; `None` once the link is closed.
    pub async fn recv(&mut self) -> Option<In> {
        match self {
            OuterRx::Tcp(rx) => rx.recv().await,
            OuterRx::Quic { conn, control } => loop {
                let Some(c) = control else {
                    return conn.read_datagram().await.ok().map(In::Datagram);
                };
                tokio::select! {
                    biased;
                    m = c.recv() => match m {
                        Some(m) => return Some(In::Control(m)),
                        None => *control = None,
                    },
                    d = conn.read_datagram() => return d.ok().map(In::Datagram),
                }
            },
        }
    }
}

#[derive(Clone)]
enum Tx {
    Quic {
        conn: quinn::Connection,
        control: mpsc::Sender<HubMsg>,
    },
    Tcp {
        frames: mpsc::Sender<Bytes>,
        close: watch::Sender<bool>,
    },
}

/// The sending half of an outer link; cheap to clone, shared by whoever forwards into it.
#[derive(Clone)]
pub struct OuterTx {
    tx: Tx,
    pub kind: LinkKind,
    pub remote: SocketAddr,
}

fn frame(kind: u8, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut b = BytesMut::with_capacity(3 + len);
    b.put_u8(kind);
    b.put_u16(u16::try_from(len).unwrap_or(u16::MAX));
    for p in parts {
        b.put_slice(p);
    }
    b.freeze()
}

impl OuterTx {
    /// Sends `prefix` then `body` as one datagram; `false` when it was dropped (too big for
    /// the path, or no room).
    pub fn send_datagram(&self, prefix: &[u8], body: &[u8]) -> bool {
        match &self.tx {
            Tx::Quic { conn, .. } => {
                let d = if prefix.is_empty() {
                    Bytes::copy_from_slice(body)
                } else {
                    let mut b = BytesMut::with_capacity(prefix.len() + body.len());
                    b.put_slice(prefix);
                    b.put_slice(body);
                    b.freeze()
                };
                conn.send_datagram(d).is_ok()
            }
            Tx::Tcp { frames, .. } => {
                if prefix.len() + body.len() > MAX_DATAGRAM {
                    return false;
                }
                frames
                    .try_send(frame(KIND_DATAGRAM, &[prefix, body]))
                    .is_ok()
            }
        }
    }

    /// Sends `d` as one datagram as it is (over QUIC without a copy).
    pub fn send_bytes(&self, d: Bytes) -> bool {
        match &self.tx {
            Tx::Quic { conn, .. } => conn.send_datagram(d).is_ok(),
            Tx::Tcp { .. } => self.send_datagram(&[], &d),
        }
    }

    pub async fn send_control(&self, msg: &HubMsg) -> anyhow::Result<()> {
        match &self.tx {
            Tx::Quic { control, .. } => control
                .send(msg.clone())
                .await
                .map_err(|_| anyhow!("outer link closed")),
            Tx::Tcp { frames, .. } => {
                let body = serde_json::to_vec(msg)?;
                frames
                    .send(frame(KIND_CONTROL, &[&body]))
                    .await
                    .map_err(|_| anyhow!("outer link closed"))
            }
        }
    }

    pub fn close(&self, reason: &str) {
        match &self.tx {
            Tx::Quic { conn, .. } => conn.close(0u32.into(), reason.as_bytes()),
            Tx::Tcp { close, .. } => {
                let _ = close.send(true);
            }
        }
    }

    /// The peer's address as this link's QUIC socket spells it now (QUIC follows a NAT's
    /// rebinding); `None` on TCP.
    pub fn quic_remote(&self) -> Option<SocketAddr> {
        match &self.tx {
            Tx::Quic { conn, .. } => Some(conn.remote_address()),
            Tx::Tcp { .. } => None,
        }
    }

    /// The largest datagram one send carries now.
    pub fn max_datagram(&self) -> Option<usize> {
        match &self.tx {
            Tx::Quic { conn, .. } => conn.max_datagram_size(),
            Tx::Tcp { .. } => Some(MAX_DATAGRAM),
        }
    }
}

async fn read_msg(recv: &mut quinn::RecvStream) -> anyhow::Result<HubMsg> {
    let len = recv.read_u16().await? as usize;
    if len > MAX_CONTROL {
        bail!("control message of {len} bytes");
    }
    let mut body = vec![0; len];
    recv.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// An outer QUIC link whose control stream is `send`/`recv`.
pub fn start_quic(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> (OuterTx, OuterRx) {
    let (control, mut control_rx) = mpsc::channel::<HubMsg>(16);
    let (control_in, control_in_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(m) = control_rx.recv().await {
            let Ok(body) = serde_json::to_vec(&m) else {
                continue;
            };
            let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
            if send.write_all(&len.to_be_bytes()).await.is_err()
                || send.write_all(&body).await.is_err()
            {
                return;
            }
        }
    });
    let reader = conn.clone();
    tokio::spawn(async move {
        while let Ok(m) = read_msg(&mut recv).await {
            if control_in.send(m).await.is_err() {
                return;
            }
        }
        reader.close(1u32.into(), b"control stream ended");
    });
    let remote = super::net::canonical(conn.remote_address());
    let rx = OuterRx::Quic {
        conn: conn.clone(),
        control: Some(control_in_rx),
    };
    (
        OuterTx {
            tx: Tx::Quic { conn, control },
            kind: LinkKind::Quic,
            remote,
        },
        rx,
    )
}

/// An outer link over a TLS stream. Pings each second; ends when nothing arrived for
/// [`TCP_IDLE`], on a malformed frame, or on [`OuterTx::close`].
pub fn start_tcp<S>(stream: S, remote: SocketAddr) -> (OuterTx, OuterRx)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (frames, mut frames_rx) = mpsc::channel::<Bytes>(TCP_QUEUE);
    let (close, mut closed) = watch::channel(false);
    let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
    let mut closed_w = closed.clone();
    tokio::spawn(async move {
        let ping = frame(
            KIND_CONTROL,
            &[&serde_json::to_vec(&HubMsg::Ping {}).unwrap_or_default()],
        );
        let mut buf = Vec::with_capacity(64 << 10);
        loop {
            let first = tokio::select! {
                f = tokio::time::timeout(TCP_PING, frames_rx.recv()) => match f {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(_) => ping.clone(),
                },
                _ = closed_w.wait_for(|c| *c) => break,
            };
            buf.clear();
            buf.extend_from_slice(&first);
            while buf.len() < 64 << 10 {
                match frames_rx.try_recv() {
                    Ok(f) => buf.extend_from_slice(&f),
                    Err(_) => break,
                }
            }
            if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let close_r = close.clone();
    tokio::spawn(async move {
        let read = async {
            let mut header = [0u8; 3];
            loop {
                match tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut header)).await {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
                let limit = match header[0] {
                    KIND_CONTROL => MAX_CONTROL,
                    KIND_DATAGRAM => MAX_DATAGRAM,
                    _ => return,
                };
                if len > limit {
                    return;
                }
                let mut body = vec![0; len];
                match tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut body)).await {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                let item = if header[0] == KIND_DATAGRAM {
                    In::Datagram(Bytes::from(body))
                } else {
                    match serde_json::from_slice::<HubMsg>(&body) {
                        Ok(HubMsg::Ping {}) => continue,
                        Ok(m) => In::Control(m),
                        Err(_) => return,
                    }
                };
                if in_tx.send(item).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = read => {}
            _ = closed.wait_for(|c| *c) => {}
        }
        let _ = close_r.send(true);
    });
    (
        OuterTx {
            tx: Tx::Tcp { frames, close },
            kind: LinkKind::Tcp,
            remote: super::net::canonical(remote),
        },
        OuterRx::Tcp(in_rx),
    )
}

/// Waits (bounded) for the first control message of a link.
pub async fn first_control(rx: &mut OuterRx, within: Duration) -> anyhow::Result<HubMsg> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(In::Control(m))) => return Ok(m),
            Ok(Some(In::Datagram(_))) => continue,
            Ok(None) => bail!("the link closed"),
            Err(_) => bail!("no answer in {} s", within.as_secs()),
        }
    }
}

/// QUIC settings of an outer link: short keepalive and idle timeout (a replica that vanished is
/// noticed fast), datagrams that hold a full inner packet plus a flow id from the start.
pub fn outer_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.initial_mtu(1472);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(1472);
    t.mtu_discovery_config(Some(mtud));
    t.keep_alive_interval(Some(OUTER_KEEPALIVE));
    t.max_idle_timeout(OUTER_IDLE.try_into().ok());
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(1u32.into());
    t.stream_receive_window((64u32 << 10).into());
    t
}

/// A thread of its own for relaying: sockets, quinn's drivers and the relay loops created on
/// it share one thread, so a relayed packet never waits for a wake-up on another thread and
/// quinn finds several datagrams queued per send (one batch, one system call). Measured on the
/// hub (docs/hub.md): about 15 % less CPU per byte than on the daemon's shared runtime.
pub struct RelayThread {
    pub handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl RelayThread {
    pub fn start(name: &str) -> anyhow::Result<RelayThread> {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| anyhow!("starting the relay thread: {e}"))?;
        let handle = ready
            .recv()
            .map_err(|_| anyhow!("the relay thread ended"))?
            .map_err(|e| anyhow!("the relay runtime: {e}"))?;
        Ok(RelayThread { handle, stop })
    }

    /// Ends the thread, and everything still on it, when `tasks` drops or aborts the task
    /// this adds (the tunnel handle's stop does).
    pub fn keep_in(self, tasks: &mut tokio::task::JoinSet<()>) {
        let stop = self.stop;
        tasks.spawn(async move {
            let _stop = stop;
            std::future::pending::<()>().await;
        });
    }
}

const SYNTHETIC_PORT: u16 = 1;

/// The synthetic address of `flow` through hub number `hub`.
pub fn synthetic(hub: u16, flow: u32) -> SocketAddr {
    let ip = Ipv6Addr::new(0xfd68, hub, (flow >> 16) as u16, flow as u16, 0, 0, 0, 1);
    SocketAddr::new(ip.into(), SYNTHETIC_PORT)
}

/// The hub and flow a synthetic address stands for.
pub fn parse_synthetic(a: SocketAddr) -> Option<(u16, u32)> {
    let SocketAddr::V6(v6) = a else {
        return None;
    };
    let s = v6.ip().segments();
    if s[0] != 0xfd68 || s[4..] != [0, 0, 0, 1] || v6.port() != SYNTHETIC_PORT {
        return None;
    }
    Some((s[1], (u32::from(s[2]) << 16) | u32::from(s[3])))
}

/// Shared byte counter for status.
pub type Counter = Arc<std::sync::atomic::AtomicU64>;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn addr() -> SocketAddr {
        "192.0.2.1:7844".parse().expect("addr")
    }

    #[test]
    fn synthetic_addresses_name_hub_and_flow_and_nothing_else() {
        for (hub, flow) in [(1, 1), (7, 0x0102_0304), (u16::MAX, u32::MAX)] {
            assert_eq!(parse_synthetic(synthetic(hub, flow)), Some((hub, flow)));
        }
        assert_eq!(parse_synthetic("10.0.0.1:1".parse().expect("addr")), None);
        assert_eq!(
            parse_synthetic("[fd68:7562::1:0:1]:2".parse().expect("addr")),
            None
        );
        assert_eq!(
            parse_synthetic("[fd00::1:0:1]:1".parse().expect("addr")),
            None
        );
    }

    #[tokio::test]
    async fn tcp_frames_carry_control_and_datagrams_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ta, mut ra) = start_tcp(a, addr());
        let (tb, mut rb) = start_tcp(b, addr());
        ta.send_control(&HubMsg::Client {
            group: Some("vpc".into()),
            raw: false,
        })
        .await
        .expect("send");
        assert!(ta.send_datagram(&7u32.to_be_bytes(), b"sealed"));
        match first_control(&mut rb, Duration::from_secs(2)).await {
            Ok(HubMsg::Client { group, .. }) => assert_eq!(group.as_deref(), Some("vpc")),
            other => panic!("{other:?}"),
        }
        match rb.recv().await {
            Some(In::Datagram(d)) => assert_eq!(&d[..], b"\0\0\0\x07sealed"),
            other => panic!("{other:?}"),
        }
        assert!(tb.send_datagram(&[], b"back"));
        match ra.recv().await {
            Some(In::Datagram(d)) => assert_eq!(&d[..], b"back"),
            other => panic!("{other:?}"),
        }
        // Too big for any inner packet: dropped at the sender, never framed.
        assert!(!ta.send_datagram(&[], &[0; MAX_DATAGRAM + 1]));
        ta.close("done");
        assert!(
            tokio::time::timeout(Duration::from_secs(2), rb.recv())
                .await
                .expect("closes")
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_malformed_or_oversized_frame_ends_the_link() {
        for bad in [
            vec![9u8, 0, 1, 0],                                  // unknown kind
            vec![KIND_CONTROL, 0xff, 0xff],                      // control longer than MAX_CONTROL
            vec![KIND_DATAGRAM, 0xff, 0xff],                     // datagram longer than any packet
            [vec![KIND_CONTROL, 0, 2], b"{]".to_vec()].concat(), // not JSON
        ] {
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let (_tx, mut rx) = start_tcp(a, addr());
            b.write_all(&bad).await.expect("write");
            let end = tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .expect("ends at once, not at the idle timeout");
            assert!(end.is_none(), "{bad:?}: {end:?}");
        }
    }
}
