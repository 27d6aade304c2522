//! A connector behind hubs: one outbound link to each hub, from the pinned source port, kept
//! up for good (QUIC, else TLS over TCP, as the dial plan says; again after a short backoff
//! when it drops; a link on TLS over TCP tries QUIC again every few seconds, as a client does,
//! and moves there when it answers), and one [`VirtualSocket`] under a second QUIC endpoint that accepts the
//! clients the hubs relay. Each relayed session shows to that endpoint as its own synthetic
//! address, `fd68:<hub>:<flow high>:<flow low>::1`, computed from the hub and flow id alone,
//! so the socket keeps no table of sessions that a hub could fill. Each flow is its own /64,
//! so the accept loop's per-source bound applies per client session (the hub admitted only
//! authenticated clients), not to all of a hub's clients at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use bytes::Bytes;

use super::dial::resolve;
use super::hub_wire::{self, FLOW_ID, HubMsg, In, OuterRx, OuterTx, parse_synthetic, synthetic};
use super::net::{canonical, tcp_connect};
use super::raw::{self, DemuxSocket, Divert, RawFlow};
use super::vsock::{Route, VirtualSocket};
use crate::config::Transport;
use crate::node::LinkKind;
use crate::node::drops::{Drop, Drops};

const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Flows one hub may have open on this connector: the hub's own bound.
const MAX_FLOWS: usize = 65_536;

/// A live link to a hub and, when the hub relays packets outside it, the flows it opened
/// (id → token) and its address as the socket spells it.
struct HubLink {
    tx: OuterTx,
    raw: Option<(SocketAddr, HashMap<u32, u64>)>,
}

type Links = Arc<RwLock<HashMap<u16, HubLink>>>;

/// Both ways of the relayed packets: out to the hubs (over the link, or relayed when the hub
/// opened the flow so), and in from the socket (checked against the hub's address and the
/// flow's token) to the inner endpoint.
struct ToHubs {
    links: Links,
    /// Weak: the socket holds this (its divert), and must close when its endpoint goes.
    socket: Option<std::sync::Weak<DemuxSocket>>,
    inner: std::sync::OnceLock<std::sync::Weak<VirtualSocket>>,
    drops: Arc<Drops>,
}

impl ToHubs {
    /// The relayed path to `hub` for `flow`, when it has one.
    fn relayed(&self, hub: u16, flow: u32) -> Option<(SocketAddr, RawFlow)> {
        let links = self.links.read().ok()?;
        let (addr, flows) = links.get(&hub)?.raw.as_ref()?;
        let token = *flows.get(&flow)?;
        Some((*addr, RawFlow { flow, token }))
    }
}

impl Route for Arc<ToHubs> {
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> bool {
        self.send_batch(to, datagram, datagram.len()) == 0
    }

    fn send_batch(&self, to: SocketAddr, contents: &[u8], segment: usize) -> u64 {
        let Some((hub, flow)) = parse_synthetic(to) else {
            return contents.len().div_ceil(segment.max(1)) as u64;
        };
        let socket = self.socket.as_ref().and_then(std::sync::Weak::upgrade);
        if let (Some(socket), Some((addr, f))) = (socket, self.relayed(hub, flow)) {
            return raw::send_inner(&socket, addr, f, contents, segment);
        }
        let link = self
            .links
            .read()
            .ok()
            .and_then(|l| l.get(&hub).map(|h| h.tx.clone()));
        let prefix = flow.to_be_bytes();
        let dropped = contents
            .chunks(segment.max(1))
            .filter(|d| !link.as_ref().is_some_and(|l| l.send_datagram(&prefix, d)))
            .count();
        dropped as u64
    }

    fn max_segments(&self) -> usize {
        match self.socket.as_ref().and_then(std::sync::Weak::upgrade) {
            Some(s) => s.max_transmit_segments().clamp(1, raw::END_SEGMENTS),
            None => 1,
        }
    }
}

impl Divert for ToHubs {
    fn divert(&self, _: &DemuxSocket, from: SocketAddr, stride: usize, run: &[u8]) {
        let Some(inner) = self.inner.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let Ok(links) = self.links.read() else {
            return;
        };
        let from = canonical(from);
        let hub = links.iter().find_map(|(i, l)| {
            let (addr, flows) = l.raw.as_ref()?;
            (canonical(*addr) == from).then_some((*i, flows))
        });
        for seg in raw::segments(run, stride) {
            let verdict = match (seg, hub) {
                (None, _) => Err(Drop::RelayMalformed),
                (_, None) => Err(Drop::RelayWrongSource),
                (Some((f, d)), Some((index, flows))) => match flows.get(&f.flow) {
                    None => Err(Drop::RelayUnknownFlow),
                    Some(t) if *t != f.token => Err(Drop::RelayBadToken),
                    Some(_) => Ok((synthetic(index, f.flow), d)),
                },
            };
            match verdict {
                Ok((addr, d)) => inner.push(addr, Bytes::copy_from_slice(d)),
                Err(d) => self.drops.count(d),
            }
        }
    }
}

/// What the uplinks need to dial.
pub struct Uplinks {
    pub hubs: Vec<String>,
    pub group: String,
    pub routes: Vec<String>,
    pub transport: Transport,
    pub quic_timeout: Duration,
    pub source_port: u16,
    pub fallback_port: Option<u16>,
    /// An endpoint on the source port (no server), `None` with `transport = "tcp"`, and its
    /// socket, which also carries relayed packets.
    pub endpoint: Option<(quinn::Endpoint, Arc<DemuxSocket>)>,
    /// Whether to ask hubs for relayed packets (`[tunnel] relay`).
    pub relay: bool,
    /// Where relayed packets that fail their checks are counted.
    pub drops: Arc<Drops>,
    pub quic: quinn::ClientConfig,
    pub tcp: tokio_rustls::TlsConnector,
}

/// The virtual socket for the inner endpoint, and the tasks that keep every hub link up.
pub fn start(u: Uplinks, tasks: &mut tokio::task::JoinSet<()>) -> Arc<VirtualSocket> {
    let links: Links = Arc::default();
    let local = synthetic(0, 0);
    let route = Arc::new(ToHubs {
        links: links.clone(),
        socket: u.endpoint.as_ref().map(|(_, s)| Arc::downgrade(s)),
        inner: std::sync::OnceLock::new(),
        drops: u.drops.clone(),
    });
    let socket = VirtualSocket::new(local, Box::new(route.clone()));
    let _ = route.inner.set(Arc::downgrade(&socket));
    // The inner endpoint holds `route` (in its virtual socket) for as long as the tunnel runs.
    if let Some((_, s)) = &u.endpoint {
        let divert: std::sync::Weak<dyn Divert> = Arc::downgrade(&route) as std::sync::Weak<ToHubs>;
        s.set_divert(divert);
    }
    let u = Arc::new(u);
    for (i, hub) in u.hubs.iter().enumerate() {
        let index = u16::try_from(i + 1).unwrap_or(u16::MAX);
        tasks.spawn(keep_up(
            u.clone(),
            hub.clone(),
            index,
            links.clone(),
            socket.clone(),
        ));
    }
    socket
}

async fn keep_up(
    u: Arc<Uplinks>,
    hub: String,
    index: u16,
    links: Links,
    socket: Arc<VirtualSocket>,
) {
    let mut failures = 0u32;
    let plan = crate::node::dial::plan(u.transport, u.quic_timeout);
    loop {
        match dial(&u, &hub, &plan).await {
            Ok(mut link) => {
                failures = 0;
                loop {
                    let (tx, rx, kind, relayed) = link;
                    tracing::info!(%hub, transport = kind.name(), relayed, "linked to the hub");
                    let raw = tx
                        .quic_remote()
                        .filter(|_| relayed)
                        .map(|a| (a, HashMap::new()));
                    if let Ok(mut l) = links.write() {
                        l.insert(
                            index,
                            HubLink {
                                tx: tx.clone(),
                                raw,
                            },
                        );
                    }
                    let moved = tokio::select! {
                        () = relay(rx, index, &socket, &links) => None,
                        quic = probe_quic(&u, &hub, kind) => Some(quic),
                    };
                    // The sessions on the old link end with it; their clients dial again at
                    // once and find this connector on its new link, with their addresses.
                    tx.close(if moved.is_some() {
                        "moved to QUIC"
                    } else {
                        "link ended"
                    });
                    match moved {
                        Some(quic) => link = quic,
                        None => break,
                    }
                }
                if let Ok(mut l) = links.write() {
                    l.remove(&index);
                }
                tracing::warn!(%hub, "the link to the hub ended; dialling again");
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%hub, error = %format!("{e:#}"), "linking to the hub failed");
            }
        }
        let wait = BACKOFF_FIRST
            .saturating_mul(1 << failures.min(3))
            .min(BACKOFF_MAX);
        tokio::time::sleep(wait).await;
    }
}

/// A link on TLS over TCP under `transport = "auto"`: QUIC tried again every few seconds
/// (jittered), returned once it is up and welcomed. Never returns otherwise.
async fn probe_quic(u: &Uplinks, hub: &str, kind: LinkKind) -> Link {
    use crate::node::client::QUIC_PROBE_EVERY;
    use rand::Rng;
    if kind != LinkKind::Tcp || u.transport != Transport::Auto || u.endpoint.is_none() {
        return std::future::pending().await;
    }
    let quic = [crate::node::dial::Step {
        kind: LinkKind::Quic,
        timeout: u.quic_timeout,
    }];
    loop {
        let jitter = rand::rng().random_range(0..=QUIC_PROBE_EVERY.as_millis() as u64 / 5);
        tokio::time::sleep(QUIC_PROBE_EVERY + Duration::from_millis(jitter)).await;
        match dial(u, hub, &quic).await {
            Ok(link) => return link,
            Err(e) => tracing::debug!(%hub, error = %format!("{e:#}"), "QUIC to the hub: not yet"),
        }
    }
}

/// Datagrams from the hub into the inner endpoint, each under its flow's address; the flows
/// the hub opens and closes for relayed packets.
async fn relay(mut rx: OuterRx, index: u16, socket: &VirtualSocket, links: &Links) {
    let flows = |f: &dyn Fn(&mut HashMap<u32, u64>)| {
        if let Ok(mut l) = links.write()
            && let Some((_, flows)) = l.get_mut(&index).and_then(|h| h.raw.as_mut())
        {
            f(flows);
        }
    };
    while let Some(item) = rx.recv().await {
        match item {
            In::Datagram(d) if d.len() > FLOW_ID => {
                let flow = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                socket.push(synthetic(index, flow), d.slice(FLOW_ID..));
            }
            In::Control(HubMsg::FlowOpened { flow: f }) => flows(&|m| {
                if m.len() < MAX_FLOWS {
                    m.insert(f.flow, f.token);
                }
            }),
            // Its address is computed and its inner connection times out: only the token
            // goes.
            In::Control(HubMsg::FlowClosed { flow }) => flows(&|m| {
                m.remove(&flow);
            }),
            _ => {}
        }
    }
}

/// A link to a hub, its transport, and whether the hub relays packets outside it.
type Link = (OuterTx, OuterRx, LinkKind, bool);

/// One outer link to `hub`, the steps of `plan` in turn, announced and welcomed.
async fn dial(u: &Uplinks, hub: &str, plan: &[crate::node::dial::Step]) -> anyhow::Result<Link> {
    let addr = resolve(hub).await?;
    let host = hub
        .rsplit_once(':')
        .map_or(hub, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string();
    let mut errors = Vec::new();
    for &step in plan {
        let attempt = async {
            match step.kind {
                LinkKind::Quic => {
                    let (ep, _) = u.endpoint.as_ref().ok_or_else(|| anyhow!("QUIC is off"))?;
                    let conn = ep.connect_with(u.quic.clone(), addr, &host)?.await?;
                    let (send, recv) = conn.open_bi().await?;
                    anyhow::Ok(hub_wire::start_quic(conn, send, recv))
                }
                LinkKind::Tcp => {
                    let addr = SocketAddr::new(addr.ip(), u.fallback_port.unwrap_or(addr.port()));
                    let stream = tcp_connect(addr, u.source_port).await?;
                    let name = rustls_pki_types::ServerName::try_from(host.clone())
                        .map_err(|e| anyhow!("hub name {host:?}: {e}"))?;
                    let tls = u.tcp.connect(name, stream).await.context("TLS over TCP")?;
                    anyhow::Ok(hub_wire::start_tcp(tls, addr))
                }
            }
        };
        let (tx, mut rx) = match tokio::time::timeout(step.timeout, attempt).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                errors.push(format!("{e:#}"));
                continue;
            }
            Err(_) => {
                errors.push(crate::node::dial::timed_out(step));
                continue;
            }
        };
        tx.send_control(&HubMsg::Connector {
            group: u.group.clone(),
            routes: u.routes.clone(),
            raw: u.relay && step.kind == LinkKind::Quic,
        })
        .await?;
        match hub_wire::first_control(&mut rx, Duration::from_secs(5)).await? {
            HubMsg::Welcome { raw } => return Ok((tx, rx, step.kind, raw)),
            HubMsg::Refused { reason } => {
                tx.close("refused");
                bail!(
                    "the hub refused: {}",
                    crate::core::text::clean(&reason, 200)
                );
            }
            other => {
                tx.close("unexpected");
                bail!("the hub answered {other:?}");
            }
        }
    }
    bail!("{}", crate::node::dial::failure(u.transport, &errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What arrives relayed reaches the inner endpoint only from a hub's address (however
    /// the socket spells it), for a flow that hub opened, with that flow's token; everything
    /// else is counted by its reason and goes nowhere.
    #[tokio::test]
    async fn relayed_packets_need_the_hubs_address_an_open_flow_and_its_token() {
        use quinn::AsyncUdpSocket;
        let hub: SocketAddr = "192.0.2.1:7844".parse().expect("addr");
        let (tx, _rx) = hub_wire::start_tcp(tokio::io::duplex(64).0, hub);
        let links: Links = Arc::default();
        let flows = HashMap::from([(5u32, 77u64)]);
        if let Ok(mut l) = links.write() {
            l.insert(
                3,
                HubLink {
                    tx,
                    raw: Some((hub, flows)),
                },
            );
        }
        let drops = Arc::new(Drops::default());
        let route = Arc::new(ToHubs {
            links,
            socket: None,
            inner: std::sync::OnceLock::new(),
            drops: drops.clone(),
        });
        let inner = VirtualSocket::new(synthetic(0, 0), Box::new(route.clone()));
        let _ = route.inner.set(Arc::downgrade(&inner));
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let runtime = quinn::TokioRuntime;
        let demux =
            DemuxSocket::new(quinn::Runtime::wrap_udp_socket(&runtime, std_socket).expect("wrap"));
        let packet = |flow: u32, token: u64| {
            let mut d = RawFlow { flow, token }.header().to_vec();
            d.extend_from_slice(b"sealed");
            d
        };
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:7844".parse().expect("addr");
        let other: SocketAddr = "192.0.2.2:7844".parse().expect("addr");
        // Two segments of one run (a GRO batch): both valid.
        let run = [packet(5, 77), packet(5, 77)].concat();
        route.divert(&demux, mapped, run.len() / 2, &run);
        route.divert(&demux, hub, 64, &packet(5, 76));
        route.divert(&demux, hub, 64, &packet(6, 77));
        route.divert(&demux, other, 64, &packet(5, 77));
        route.divert(&demux, hub, 64, &packet(5, 77)[..raw::HEADER]);
        let mut bufs = [[0u8; 64]; 4];
        let mut slices: Vec<_> = bufs
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        let mut meta = [quinn::udp::RecvMeta::default(); 4];
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let got = match inner.poll_recv(&mut cx, &mut slices, &mut meta) {
            std::task::Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(got, 2);
        for m in &meta[..2] {
            assert_eq!((m.addr, m.len), (synthetic(3, 5), 6));
        }
        for (d, n) in [
            (Drop::RelayBadToken, 1),
            (Drop::RelayUnknownFlow, 1),
            (Drop::RelayWrongSource, 1),
            (Drop::RelayMalformed, 1),
        ] {
            assert_eq!(drops.get(d), n, "{d:?}");
        }
    }
}
