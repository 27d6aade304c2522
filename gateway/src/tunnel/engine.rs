//! The tunnel's tasks: TUN pump, QUIC endpoint and TCP fallback listener, per-peer packet
//! pumps, reconnection and the client's move back from TCP to QUIC.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use quinn::{Endpoint, TransportConfig, VarInt};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tun_rs::AsyncDevice;

use super::control::{self, Control, PROTOCOL_VERSION};
use super::link::{ControlRx, ControlTx, Inbound, Link, Opened, SendError, TcpLink};
use super::{dns, nat, net, tls};
use crate::api::{PeerStatus, Refusal, TunnelStatus};
use crate::config::{Role, Transport, Tunnel};
use crate::core::policy::{Decision, Policy};
use crate::core::{icmp, mss, packet};

/// Largest IP packet the TUN can hand us; buffers are this big.
const MAX_PACKET: usize = 65_535;
/// UDP payload size QUIC starts with: its datagrams then hold 1362-byte packets, above IPv6's
/// 1280 minimum, so the TUN can carry IPv6 from the first packet. MTU discovery raises it.
const INITIAL_MTU: u16 = 1400;
/// Ceiling for MTU discovery on a 1500-byte path (1500 - 20 IPv4 - 8 UDP).
const MTU_CEILING: u16 = 1472;
const KEEPALIVE: Duration = Duration::from_secs(1);
/// A connector that vanished is noticed within this, and the client starts reconnecting.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REFUSALS: usize = 20;
const RESERVED_PORTS: &str = "net.ipv4.ip_local_reserved_ports";
/// Control-stream keepalives: they prove the connector's engine (not only its QUIC stack)
/// answers; this many unanswered in a row and the client reconnects.
const CONTROL_KEEPALIVE: Duration = Duration::from_secs(2);
const KEEPALIVES_MISSED: u64 = 3;
/// The connector ends a session whose client sent no control message for this long: a TCP
/// link to a vanished client would otherwise linger until TCP gives up, many minutes later.
const CLIENT_SILENCE: Duration = Duration::from_secs(10);
/// A client on the TCP fallback tries QUIC again this often (with jitter).
const QUIC_PROBE_EVERY: Duration = Duration::from_secs(5);

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    policy_drops: AtomicU64,
}

impl Counters {
    fn add(count: &AtomicU64, bytes: &AtomicU64, n: usize) {
        count.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

struct Peer {
    identity: String,
    link: Link,
    /// Why this transport; the client updates it as QUIC probes fail.
    transport_reason: Mutex<String>,
    /// ICMP echo round trip to the peer's public address, from `ping_peers`.
    ping: Mutex<Option<Duration>>,
    address_v4: Ipv4Addr,
    address_v6: Ipv6Addr,
    /// Sources this peer may send from and destinations routed to it.
    owns: Vec<IpNet>,
    connected_since: u64,
    counters: Arc<Counters>,
}

/// What `gatewayctl status` reads; shared by every task of the tunnel.
pub struct Shared {
    role: &'static str,
    tun: String,
    mtu: AtomicU32,
    peers: Mutex<Vec<Arc<Peer>>>,
    refusals: Mutex<VecDeque<Refusal>>,
    drops: Mutex<HashMap<String, u64>>,
    state: Mutex<String>,
    /// Client: the connector's overlay addresses, the far end of the tunnel, from which its
    /// ICMP "too big" messages come (an address of this node would be dropped as a martian).
    far_end: Mutex<(Ipv4Addr, Ipv6Addr)>,
    /// Connector: the DNS forwarder, for its zones' status.
    forwarder: Mutex<Option<Arc<dns::Forwarder>>>,
    /// Client: the zones the connector answers, in wire form.
    learned_zones: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Connector: the pinned egress range, for status.
    egress_ports: Mutex<Option<(u16, u16)>>,
    access_active: AtomicU64,
    access_total: AtomicU64,
    /// Connector: the nftables table's name and what it was made to hold.
    firewall: Mutex<Option<(String, String)>>,
}

impl Shared {
    fn drop_packet(&self, reason: &str) {
        if let Ok(mut d) = self.drops.lock() {
            *d.entry(reason.to_string()).or_default() += 1;
        }
    }

    fn refuse(&self, identity: Option<String>, remote: SocketAddr, reason: String) {
        tracing::warn!(?identity, %remote, %reason, "peer refused");
        if let Ok(mut r) = self.refusals.lock() {
            if r.len() == MAX_REFUSALS {
                r.pop_front();
            }
            r.push_back(Refusal {
                identity,
                remote: remote.to_string(),
                reason,
                at: now_unix(),
            });
        }
    }

    fn set_state(&self, s: impl Into<String>) {
        if let Ok(mut st) = self.state.lock() {
            *st = s.into();
        }
    }

    fn peer_for(&self, dst: IpAddr) -> Option<Arc<Peer>> {
        let peers = self.peers.lock().ok()?;
        peers
            .iter()
            .filter_map(|p| {
                p.owns
                    .iter()
                    .filter(|n| n.contains(&dst))
                    .map(|n| n.prefix_len())
                    .max()
                    .map(|len| (len, p))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, p)| p.clone())
    }

    pub fn status(&self) -> TunnelStatus {
        let peers = self
            .peers
            .lock()
            .map(|peers| {
                peers
                    .iter()
                    .map(|p| PeerStatus {
                        identity: p.identity.clone(),
                        remote: p.link.remote().to_string(),
                        transport: p.link.kind().into(),
                        transport_reason: p
                            .transport_reason
                            .lock()
                            .map(|r| r.clone())
                            .unwrap_or_default(),
                        address_v4: p.address_v4.to_string(),
                        address_v6: p.address_v6.to_string(),
                        rtt_ms: p.link.rtt().as_secs_f64() * 1000.0,
                        connected_since: p.connected_since,
                        connection_id: p.link.id(),
                        max_datagram: p.link.max_packet().unwrap_or(0) as u64,
                        tx_packets: p.counters.tx_packets.load(Ordering::Relaxed),
                        tx_bytes: p.counters.tx_bytes.load(Ordering::Relaxed),
                        rx_packets: p.counters.rx_packets.load(Ordering::Relaxed),
                        rx_bytes: p.counters.rx_bytes.load(Ordering::Relaxed),
                        policy_drops: p.counters.policy_drops.load(Ordering::Relaxed),
                        ping_ms: p
                            .ping
                            .lock()
                            .ok()
                            .and_then(|d| *d)
                            .map(|d| d.as_secs_f64() * 1000.0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let zones = match self.forwarder.lock().ok().and_then(|f| f.clone()) {
            Some(f) => f.status(),
            None => self
                .learned_zones
                .lock()
                .map(|z| {
                    z.iter()
                        .map(|w| crate::api::ZoneStatus {
                            domain: crate::core::dns::dotted(w)
                                .trim_end_matches('.')
                                .to_string(),
                            queries: 0,
                            answers: 0,
                            failovers: 0,
                            servfails: 0,
                            resolvers: vec![],
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        let egress_ports = self
            .egress_ports
            .lock()
            .ok()
            .and_then(|p| *p)
            .map(|(lo, hi)| {
                let reserved = net::sysctl_get(RESERVED_PORTS).unwrap_or_default();
                let range = format!("{lo}-{hi}");
                if reserved.split(',').any(|r| r.trim() == range) {
                    format!(
                        "{range} (NAT and DNS; reserved from ephemeral use in {RESERVED_PORTS})"
                    )
                } else {
                    format!(
                        "{range} (NOT reserved in {RESERVED_PORTS}: ephemeral ports may collide)"
                    )
                }
            });
        let (firewall, forward_filter) = match self.firewall.lock().ok().and_then(|f| f.clone()) {
            Some((table, holds)) => {
                let (line, filter) = super::nftdump::firewall_status(&table, &holds);
                (Some(line), filter)
            }
            None => (None, None),
        };
        TunnelStatus {
            firewall,
            forward_filter,
            egress_ports,
            access_streams_active: self.access_active.load(Ordering::Relaxed),
            access_streams_total: self.access_total.load(Ordering::Relaxed),
            zones,
            role: self.role.into(),
            tun: self.tun.clone(),
            mtu: self.mtu.load(Ordering::Relaxed),
            state: self.state.lock().map(|s| s.clone()).unwrap_or_default(),
            peers,
            refusals: self
                .refusals
                .lock()
                .map(|r| r.iter().cloned().collect())
                .unwrap_or_default(),
            drops: self
                .drops
                .lock()
                .map(|d| d.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default(),
        }
    }
}

/// A running tunnel. Dropping it stops every task; the TUN device, and with it every route
/// through it, disappears when the last task holding it ends.
pub struct TunnelHandle {
    pub shared: Arc<Shared>,
    tasks: JoinSet<()>,
    /// `None` when the config says `transport = "tcp"`.
    endpoint: Option<Endpoint>,
    sysctls: Vec<(String, String)>,
    nat_table: Option<String>,
    connector: Option<Arc<Connector>>,
}

impl TunnelHandle {
    /// Sysctls the tunnel changed, with their old values, for the crash record.
    pub fn changed_sysctls(&self) -> &[(String, String)] {
        &self.sysctls
    }

    /// Whether [`reload`](Self::reload) can apply `cfg`: adding the first zone or removing the
    /// last needs a restart (the forwarder's sockets). Asked before anything changes.
    pub fn check_reload(&self, cfg: &Tunnel) -> anyhow::Result<()> {
        if let Some(c) = &self.connector
            && c.forwarder.is_some() == cfg.zones.is_empty()
        {
            bail!("adding the first [[dns.zone]] or removing the last needs a restart");
        }
        Ok(())
    }

    /// Reload on a connector: new routes, policy and zones, live. Connected clients keep their
    /// connections and get the new routes and zones pushed. A client's routes and zones come
    /// from its connector: nothing to apply there.
    pub fn reload(&self, cfg: &Tunnel, routes: Vec<IpNet>) {
        let Some(c) = &self.connector else {
            return;
        };
        if let Some(f) = &c.forwarder {
            f.set_zones(&cfg.zones);
        }
        if let Ok(mut p) = c.policy.write() {
            *p = Arc::new(policy_of(&cfg.policy));
        }
        c.sync_filter();
        let zones = c
            .forwarder
            .as_ref()
            .map(|f| f.domains())
            .unwrap_or_default();
        c.offer.send_if_modified(|o| {
            let next = Offer { routes, zones };
            let changed = *o != next;
            *o = next;
            changed
        });
    }

    pub async fn stop(mut self) {
        if let Some(e) = &self.endpoint {
            e.close(VarInt::from_u32(0), b"gatewayd stopping");
        }
        let peers = self
            .shared
            .peers
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        for p in peers {
            p.link.close(0, "gatewayd stopping");
        }
        self.tasks.shutdown().await;
        if let Some(table) = &self.nat_table
            && let Err(e) = nat::remove(table)
        {
            tracing::error!(error = %e, "removing the nftables table failed");
        }
        net::restore(&mut self.sysctls);
    }
}

fn transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.initial_mtu(INITIAL_MTU);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MTU_CEILING);
    t.mtu_discovery_config(Some(mtud));
    t.keep_alive_interval(Some(KEEPALIVE));
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    // One stream per relayed DNS query: leave room for bursts.
    t.max_concurrent_bidi_streams(VarInt::from_u32(1024));
    t
}

async fn create_tun(name: &str) -> anyhow::Result<(Arc<AsyncDevice>, u32, rtnetlink::Handle)> {
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .build_async()
        .with_context(|| format!("creating TUN device {name}"))?;
    let handle = net::connect()?;
    let index = net::link_index(&handle, name).await?;
    // No router solicitations or MLD reports into the tunnel (NOTES-datapath.md).
    if let Err(e) = net::sysctl_set(&format!("net.ipv6.conf.{name}.addr_gen_mode"), "1") {
        tracing::warn!(error = %e, "could not disable IPv6 address generation on the TUN");
    }
    net::set_up(&handle, index, u32::from(INITIAL_MTU)).await?;
    Ok((Arc::new(dev), index, handle))
}

/// Starts the tunnel for this node's role. `routes` are the prefixes a connector offers.
pub async fn start(
    cfg: &Tunnel,
    routes: Vec<IpNet>,
    on_routes: super::RoutesHook,
) -> anyhow::Result<TunnelHandle> {
    match &cfg.role {
        Role::Connector { listen } => start_connector(cfg, *listen, routes).await,
        Role::Client {
            connect,
            server_name,
            source_port,
        } => {
            start_client(
                cfg,
                connect.clone(),
                server_name.clone(),
                *source_port,
                on_routes,
            )
            .await
        }
    }
}

fn shared(role: &'static str, tun: &str, state: &str) -> Arc<Shared> {
    Arc::new(Shared {
        role,
        tun: tun.into(),
        mtu: AtomicU32::new(0),
        peers: Mutex::new(Vec::new()),
        refusals: Mutex::new(VecDeque::new()),
        drops: Mutex::new(HashMap::new()),
        state: Mutex::new(state.into()),
        far_end: Mutex::new((Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED)),
        forwarder: Mutex::new(None),
        learned_zones: Arc::new(Mutex::new(Vec::new())),
        egress_ports: Mutex::new(None),
        access_active: AtomicU64::new(0),
        access_total: AtomicU64::new(0),
        firewall: Mutex::new(None),
    })
}

// ---------------------------------------------------------------------------------------------
// Connector

async fn start_connector(
    cfg: &Tunnel,
    listen: SocketAddr,
    routes: Vec<IpNet>,
) -> anyhow::Result<TunnelHandle> {
    let mut sysctls = Vec::new();
    let result = async {
        net::sysctl_change("net.ipv4.ip_forward", "1", &mut sysctls)?;
        net::sysctl_change("net.ipv6.conf.all.forwarding", "1", &mut sysctls)?;
        let crypto = tls::server_config(&cfg.tls)?;
        let tcp_tls = tls::rustls_server(&cfg.tls)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport()));
        let (tun, index, handle) = create_tun(&cfg.tun).await?;
        let own_v4 = nth_v4(cfg.overlay_v4, 1).context("overlay too small")?;
        let own_v6 = nth_v6(cfg.overlay_v6, 1);
        net::add_address(&handle, index, own_v4.into(), cfg.overlay_v4.prefix_len()).await?;
        net::add_address(&handle, index, own_v6.into(), cfg.overlay_v6.prefix_len()).await?;
        let endpoint = match cfg.transport.uses_quic() {
            true => Some(
                Endpoint::server(server, listen)
                    .with_context(|| format!("listening on UDP {listen}"))?,
            ),
            false => None,
        };
        let tcp_listen = SocketAddr::new(listen.ip(), cfg.fallback_port.unwrap_or(listen.port()));
        let tcp = match cfg.transport.uses_tcp() {
            true => Some((
                tokio::net::TcpListener::bind(tcp_listen)
                    .await
                    .with_context(|| format!("listening on TCP {tcp_listen}"))?,
                tokio_rustls::TlsAcceptor::from(tcp_tls),
            )),
            false => None,
        };
        if let Some(e) = &cfg.egress {
            // The kernel's own ephemeral ports must not collide with the NAT range.
            let current = net::sysctl_get(RESERVED_PORTS)?;
            let reserved = reserve_range(&current, e.ports);
            net::sysctl_change(RESERVED_PORTS, &reserved, &mut sysctls)?;
            nat::apply(&nat::NatSpec {
                table: e.table.clone(),
                tun: cfg.tun.clone(),
                egress: e.interface.clone(),
                ports: e.ports,
                udp_port: cfg.transport.uses_quic().then_some(listen.port()),
                tcp_port: cfg.transport.uses_tcp().then_some(tcp_listen.port()),
            })?;
            tracing::info!(table = %e.table, interface = %e.interface, ports = ?e.ports, "source NAT into the VPC");
        }
        anyhow::Ok((tun, index, handle, endpoint, tcp))
    }
    .await;
    let (tun, index, handle, endpoint, tcp) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Some(eg) = &cfg.egress {
                let _ = nat::remove(&eg.table);
            }
            net::restore(&mut sysctls);
            return Err(e);
        }
    };

    let listening = match (&endpoint, &tcp) {
        (Some(_), Some((l, _))) => format!(
            "listening on {listen} (QUIC) and {} (TCP fallback)",
            l.local_addr().map_or(String::new(), |a| a.to_string())
        ),
        (Some(_), None) => format!("listening on {listen} (QUIC only)"),
        (None, Some((l, _))) => format!(
            "listening on {} (TCP only)",
            l.local_addr().map_or(String::new(), |a| a.to_string())
        ),
        (None, None) => "listening on nothing".into(),
    };
    let shared = shared("connector", &cfg.tun, &listening);
    let mut tasks = JoinSet::new();
    let forwarder = if cfg.zones.is_empty() {
        None
    } else {
        let ports = cfg.egress.as_ref().map(|e| e.ports);
        match dns::Forwarder::start(&cfg.zones, ports, &mut tasks).await {
            Ok(f) => Some(f),
            Err(e) => {
                tasks.shutdown().await;
                if let Some(eg) = &cfg.egress {
                    let _ = nat::remove(&eg.table);
                }
                net::restore(&mut sysctls);
                return Err(e);
            }
        }
    };
    if let Ok(mut f) = shared.forwarder.lock() {
        f.clone_from(&forwarder);
    }
    if let Ok(mut p) = shared.egress_ports.lock() {
        *p = cfg.egress.as_ref().map(|e| e.ports);
    }
    if let (Some(e), Ok(mut f)) = (&cfg.egress, shared.firewall.lock()) {
        let mut accepts = Vec::new();
        if cfg.transport.uses_quic() {
            accepts.push(format!("udp/{}", listen.port()));
        }
        if cfg.transport.uses_tcp() {
            accepts.push(format!(
                "tcp/{}",
                cfg.fallback_port.unwrap_or(listen.port())
            ));
        }
        *f = Some((
            e.table.clone(),
            format!(
                "masquerade {} -> {} to ports {}-{}; input accepts {} and replies to {}-{}; {}",
                cfg.tun,
                e.interface,
                e.ports.0,
                e.ports.1,
                accepts.join(", "),
                e.ports.0,
                e.ports.1,
                super::filter::describe_connector(&cfg.tun, &e.interface)
            ),
        ));
    }
    let policy = std::sync::RwLock::new(Arc::new(policy_of(&cfg.policy)));
    let offer = watch::Sender::new(Offer {
        routes,
        zones: forwarder.as_ref().map(|f| f.domains()).unwrap_or_default(),
    });
    let connector = Arc::new(Connector {
        shared: shared.clone(),
        tun: tun.clone(),
        tun_index: index,
        netlink: handle.clone(),
        policy,
        overlay_v4: cfg.overlay_v4,
        overlay_v6: cfg.overlay_v6,
        offer,
        leases: Mutex::new(HashMap::new()),
        forwarder,
        egress_ports: cfg.egress.as_ref().map(|e| e.ports),
        session_filter: cfg
            .egress
            .as_ref()
            .map(|e| nat::SessionFilter::new(&e.table)),
    });
    tasks.spawn(tun_to_peers(shared.clone(), tun));
    tasks.spawn(ping_peers(shared.clone()));
    tasks.spawn(follow_mtu(shared.clone(), handle, index));
    let handle_connector = connector.clone();
    if let Some(ep) = endpoint.clone() {
        let connector = connector.clone();
        tasks.spawn(async move {
            let mut clients = JoinSet::new();
            while let Some(incoming) = ep.accept().await {
                let c = connector.clone();
                clients.spawn(async move { c.serve_quic(incoming).await });
                while clients.try_join_next().is_some() {}
            }
        });
    }
    if let Some((listener, acceptor)) = tcp {
        tasks.spawn(async move {
            let mut clients = JoinSet::new();
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a TCP fallback connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let c = connector.clone();
                let acceptor = acceptor.clone();
                clients.spawn(async move { c.serve_tcp(stream, remote, acceptor).await });
                // Reap finished sessions so a long-lived connector does not accumulate them.
                while clients.try_join_next().is_some() {}
            }
        });
    }
    Ok(TunnelHandle {
        shared,
        tasks,
        endpoint,
        sysctls,
        nat_table: cfg.egress.as_ref().map(|e| e.table.clone()),
        connector: Some(handle_connector),
    })
}

fn policy_of(entries: &[crate::config::PolicyEntry]) -> Policy {
    Policy::with_inbound(
        &entries
            .iter()
            .map(|p| (p.identity.clone(), p.allow.clone(), p.inbound.clone()))
            .collect::<Vec<_>>(),
    )
}

/// Routes and zones a connector offers its clients.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Offer {
    routes: Vec<IpNet>,
    zones: Vec<String>,
}

struct Connector {
    shared: Arc<Shared>,
    tun: Arc<AsyncDevice>,
    tun_index: u32,
    netlink: rtnetlink::Handle,
    /// Replaced whole on reload.
    policy: std::sync::RwLock<Arc<Policy>>,
    overlay_v4: Ipv4Net,
    overlay_v6: Ipv6Net,
    /// What clients are offered; every session pushes a change to its client.
    offer: watch::Sender<Offer>,
    /// Overlay host number per identity, so a reconnecting client keeps its address.
    leases: Mutex<HashMap<String, u32>>,
    forwarder: Option<Arc<dns::Forwarder>>,
    /// Where `access` streams into the VPC connect from.
    egress_ports: Option<(u16, u16)>,
    /// The forward filter's per-session chains (in the `[egress]` table).
    session_filter: Option<nat::SessionFilter>,
}

impl Connector {
    /// A TLS handshake given HANDSHAKE_TIMEOUT; a failure is listed as a refusal in status.
    async fn handshake<T, E: std::fmt::Display>(
        &self,
        remote: SocketAddr,
        over: &str,
        handshake: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(done)) => Some(done),
            Ok(Err(e)) => {
                self.shared
                    .refuse(None, remote, format!("TLS handshake{over} failed: {e}"));
                None
            }
            Err(_) => {
                self.shared
                    .refuse(None, remote, format!("handshake{over} timed out"));
                None
            }
        }
    }

    async fn serve_quic(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let Some(conn) = self.handshake(remote, "", incoming.into_future()).await else {
            return;
        };
        let Some(identity) = tls::peer_identity(&conn) else {
            self.shared
                .refuse(None, remote, "certificate carries no name".into());
            conn.close(VarInt::from_u32(1), b"no identity");
            return;
        };
        if tls::negotiated_alpn(&conn).as_deref() == Some(tls::ALPN_ACCESS) {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
                Ok(Ok((send, recv))) => self.serve_access(&identity, remote, recv, send).await,
                _ => tracing::info!(%identity, %remote, "access connection opened no stream"),
            }
            // Closing at once could overtake a refusal still in flight: let the client close.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(VarInt::from_u32(0), b"done");
            return;
        }
        let opened = match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok((send, recv))) => Opened {
                link: Link::Quic(conn.clone()),
                control_tx: ControlTx::Quic(send),
                control_rx: ControlRx::Quic(recv),
                inbound: Inbound::Quic(conn.clone()),
                dns_queries: None,
            },
            _ => {
                tracing::info!(%identity, %remote, "no control stream; connection dropped");
                conn.close(VarInt::from_u32(1), b"no control stream");
                return;
            }
        };
        self.serve(opened, identity).await;
    }

    async fn serve_tcp(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
    ) {
        let _ = stream.set_nodelay(true);
        let socket = match std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "duplicating a TCP socket failed");
                return;
            }
        };
        let Some(tls) = self
            .handshake(remote, " (TCP)", acceptor.accept(stream))
            .await
        else {
            return;
        };
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(tls::identity_of_chain);
        let Some(identity) = identity else {
            self.shared
                .refuse(None, remote, "certificate carries no name".into());
            return;
        };
        if tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_ACCESS) {
            let (r, w) = tokio::io::split(tls);
            self.serve_access(&identity, remote, r, w).await;
            return;
        }
        let opened = TcpLink::start(tls, socket, remote);
        self.serve(opened, identity).await;
    }

    /// One `gatewayctl access` stream: the request, the decision, then bytes both ways.
    async fn serve_access<R, W>(&self, identity: &str, remote: SocketAddr, mut r: R, mut w: W)
    where
        R: tokio::io::AsyncRead + Unpin + Send,
        W: tokio::io::AsyncWrite + Unpin + Send,
    {
        let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, control::recv_io(&mut r)).await;
        let (host, port) = match request {
            Ok(Ok(Control::Open {
                version,
                host,
                port,
            })) if version == PROTOCOL_VERSION => (host, port),
            Ok(Ok(Control::Open { version, .. })) => {
                let reason =
                    format!("protocol version {version}, this connector speaks {PROTOCOL_VERSION}");
                let _ = control::send_io(&mut w, &Control::Refused { reason }).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                return;
            }
            _ => {
                tracing::info!(%identity, %remote, "access connection sent no request");
                return;
            }
        };
        let (address, mut upstream) = match self.access_target(identity, &host, port).await {
            Ok(t) => t,
            Err(reason) => {
                self.shared.refuse(
                    Some(identity.to_string()),
                    remote,
                    format!("access to {host}:{port}: {reason}"),
                );
                let _ = control::send_io(&mut w, &Control::Refused { reason }).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                return;
            }
        };
        if control::send_io(&mut w, &Control::Opened { address })
            .await
            .is_err()
        {
            return;
        }
        tracing::info!(%identity, %remote, %host, %address, "access stream opened");
        self.shared.access_total.fetch_add(1, Ordering::Relaxed);
        self.shared.access_active.fetch_add(1, Ordering::Relaxed);
        let mut client = tokio::io::join(r, w);
        let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        self.shared.access_active.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok((up, down)) => {
                tracing::info!(%identity, %address, bytes_up = up, bytes_down = down, "access stream closed")
            }
            Err(e) => tracing::info!(%identity, %address, error = %e, "access stream ended"),
        }
    }

    /// Resolves `host`, checks policy and connects from the pinned range; the reason otherwise.
    async fn access_target(
        &self,
        identity: &str,
        host: &str,
        port: u16,
    ) -> Result<(SocketAddr, tokio::net::TcpStream), String> {
        if !self.policy().knows(identity) {
            return Err(format!("no [[policy]] entry matches identity {identity:?}"));
        }
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => self.resolve_private(host).await?,
        };
        super::access::allowed(&self.policy(), identity, ip, port)?;
        let address = SocketAddr::new(ip, port);
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            net::tcp_connect_from_range(address, self.egress_ports),
        )
        .await
        .map_err(|_| format!("connecting to {address}: timed out"))?
        .map_err(|e| format!("connecting to {address}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok((address, stream))
    }

    /// A name under one of the private zones, asked through the forwarder (A, then AAAA).
    async fn resolve_private(&self, host: &str) -> Result<IpAddr, String> {
        let Some(fwd) = &self.forwarder else {
            return Err(format!(
                "{host:?} is not an address and this connector has no [[dns.zone]]"
            ));
        };
        let wire = crate::core::dns::wire_name(host).map_err(|e| format!("{host:?}: {e:?}"))?;
        let zones: Vec<Vec<u8>> = fwd
            .domains()
            .iter()
            .filter_map(|d| crate::core::dns::wire_name(d).ok())
            .collect();
        if crate::core::dns::matching_zone(&wire, &zones).is_none() {
            return Err(format!(
                "{host:?} is not under this connector's zones ({})",
                fwd.domains().join(", ")
            ));
        }
        for aaaa in [false, true] {
            let query = super::access::address_query(host, aaaa).map_err(|e| e.to_string())?;
            if let Some(answer) = fwd.resolve(&query).await
                && let Some(ip) = super::access::answer_addresses(&answer).first()
            {
                return Ok(*ip);
            }
        }
        Err(format!("{host:?} has no address in the private zone"))
    }

    async fn serve(&self, opened: Opened, identity: String) {
        let link = opened.link.clone();
        let remote = link.remote();
        if let Err(e) = self.session(opened, &identity).await {
            tracing::info!(%identity, %remote, transport = link.kind(), error = %format!("{e:#}"), "client session ended");
        }
        let id = link.id();
        if let Ok(mut peers) = self.shared.peers.lock() {
            peers.retain(|p| p.link.id() != id);
        }
        self.sync_filter();
        link.close(0, "session ended");
    }

    async fn session(&self, opened: Opened, identity: &str) -> anyhow::Result<()> {
        let Opened {
            link,
            control_tx: mut send,
            control_rx: mut recv,
            mut inbound,
            dns_queries,
        } = opened;
        let remote = link.remote();
        let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, recv.recv())
            .await
            .context("no hello")??;
        let Control::Hello {
            version,
            advertise,
            transport_reason,
            ..
        } = hello
        else {
            bail!("first message was not a hello");
        };
        if version != PROTOCOL_VERSION {
            let reason =
                format!("protocol version {version}, this connector speaks {PROTOCOL_VERSION}");
            self.refuse(&link, &mut send, identity, reason).await;
            return Ok(());
        }
        if !self.policy().knows(identity) {
            let reason = format!("no [[policy]] entry matches identity {identity:?}");
            self.refuse(&link, &mut send, identity, reason).await;
            return Ok(());
        }
        let host = self.lease(identity);
        let (Some(address_v4), address_v6) =
            (nth_v4(self.overlay_v4, host), nth_v6(self.overlay_v6, host))
        else {
            let reason = "overlay address pool exhausted".to_string();
            self.refuse(&link, &mut send, identity, reason).await;
            return Ok(());
        };
        let mut owns = vec![
            IpNet::from(IpAddr::V4(address_v4)),
            IpNet::from(IpAddr::V6(address_v6)),
        ];
        for net in advertise {
            net::replace_route(&self.netlink, net, self.tun_index)
                .await
                .with_context(|| format!("routing {net} to {identity}"))?;
            owns.push(net);
        }
        let mut offers = self.offer.subscribe();
        let offer = offers.borrow_and_update().clone();
        send.send(&Control::Welcome {
            version: PROTOCOL_VERSION,
            node: identity.to_string(),
            address_v4,
            address_v6,
            prefix_v4: self.overlay_v4.prefix_len(),
            prefix_v6: self.overlay_v6.prefix_len(),
            routes: offer.routes,
            keepalive_secs: KEEPALIVE.as_secs(),
            zones: offer.zones,
        })
        .await?;
        let reason = match (&link, transport_reason) {
            (_, Some(r)) => format!("client: {r}"),
            (Link::Quic(_), None) => String::new(),
            (Link::Tcp(_), None) => "client chose TCP".into(),
        };
        let peer = Arc::new(Peer {
            identity: identity.to_string(),
            link: link.clone(),
            transport_reason: Mutex::new(reason),
            ping: Mutex::new(None),
            address_v4,
            address_v6,
            owns,
            connected_since: now_unix(),
            counters: Arc::new(Counters::default()),
        });
        if let Ok(mut peers) = self.shared.peers.lock() {
            // A client that reconnects, or moves between QUIC and TCP, replaces its old link.
            for old in peers.iter().filter(|p| p.identity == identity) {
                old.link.close(3, "replaced by a new connection");
            }
            peers.retain(|p| p.identity != identity);
            peers.push(peer.clone());
        }
        self.sync_filter();
        tracing::info!(%identity, %remote, transport = link.kind(), %address_v4, %address_v6, "client connected");
        let dns_requests = async {
            match (&self.forwarder, &link, dns_queries) {
                (Some(f), Link::Quic(conn), _) => dns::serve_streams(conn.clone(), f.clone()).await,
                (Some(f), Link::Tcp(t), Some(q)) => {
                    serve_tcp_dns(t.clone(), q, f.clone()).await;
                    Ok(())
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.pump_from_peer(&peer, &mut inbound) => r,
            r = answer_keepalives(send, recv, offers) => r,
            r = dns_requests => r,
        }
    }

    /// Tells the client why, records it for status, and closes the connection.
    async fn refuse(&self, link: &Link, send: &mut ControlTx, identity: &str, reason: String) {
        self.shared
            .refuse(Some(identity.to_string()), link.remote(), reason.clone());
        let _ = send.send(&Control::Refused { reason }).await;
        send.finish();
        // Give the refusal a moment to reach the client before the close overtakes it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        link.close(2, "refused");
    }

    /// The forward filter's session chains follow the peers and the policy: rebuilt when a
    /// session starts (before its first packet) or ends, and on reload.
    fn sync_filter(&self) {
        let Some(f) = &self.session_filter else {
            return;
        };
        let peers = || {
            let peers = self
                .shared
                .peers
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default();
            peers
                .iter()
                .map(|p| (p.identity.clone(), p.owns.clone()))
                .collect()
        };
        if let Err(e) = f.sync(&self.policy(), peers) {
            tracing::error!(error = %e, "updating the forward filter failed");
        }
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|_| Arc::new(Policy::new(&[])))
    }

    fn lease(&self, identity: &str) -> u32 {
        let Ok(mut leases) = self.leases.lock() else {
            return 2;
        };
        let next = leases.values().max().map_or(2, |m| m + 1);
        *leases.entry(identity.to_string()).or_insert(next)
    }

    /// Packets from a client: parse, check the source belongs to it, check policy, deliver.
    async fn pump_from_peer(&self, peer: &Peer, inbound: &mut Inbound) -> anyhow::Result<()> {
        loop {
            let dgram = inbound.packet().await?;
            Counters::add(
                &peer.counters.rx_packets,
                &peer.counters.rx_bytes,
                dgram.len(),
            );
            let meta = match packet::parse(&dgram) {
                Ok(m) => m,
                Err(e) => {
                    self.shared.drop_packet(&format!("malformed_{}", e.name()));
                    continue;
                }
            };
            if meta.dst.is_multicast() {
                // The kernel's own MLD/IGMP chatter on the peer's TUN: nothing to forward.
                self.shared.drop_packet("multicast");
                continue;
            }
            if !peer.owns.iter().any(|n| n.contains(&meta.src)) {
                self.shared.drop_packet("spoofed_source");
                continue;
            }
            match self.policy().decide(&peer.identity, &meta) {
                // An answer to an `inbound` connection: the forward filter checks it is one.
                Decision::Allow | Decision::AllowReply => {
                    if let Err(e) = self.tun.send(&dgram).await {
                        tracing::debug!(error = %e, "TUN write failed");
                        self.shared.drop_packet("tun_write");
                    }
                }
                Decision::DenyNoRule | Decision::DenyUnknownIdentity => {
                    peer.counters.policy_drops.fetch_add(1, Ordering::Relaxed);
                    self.shared.drop_packet("policy");
                }
            }
        }
    }
}

/// The connector's side of the control stream after the welcome: echo keepalives, skip what
/// a newer client may send that this version does not know.
async fn answer_keepalives(
    mut send: ControlTx,
    mut recv: ControlRx,
    mut offers: watch::Receiver<Offer>,
) -> anyhow::Result<()> {
    // Reading runs in its own task: a QUIC read cut short by an offer change would lose
    // framing; the channel's receive is safe to cancel.
    let (tx, mut messages) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(async move {
        loop {
            let msg = recv.recv().await;
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });
    let _abort = AbortOnDrop(reader);
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(CLIENT_SILENCE, messages.recv()) => m
                .map_err(|_| anyhow!("the client sent nothing for {CLIENT_SILENCE:?}"))?
                .ok_or_else(|| anyhow!("the control channel closed"))??,
            changed = offers.changed() => {
                changed?;
                let offer = offers.borrow_and_update().clone();
                send.send(&Control::Routes { routes: offer.routes, zones: offer.zones }).await?;
                continue;
            }
        };
        match msg {
            Control::Keepalive { seq } => send.send(&Control::Keepalive { seq }).await?,
            Control::Unknown => {}
            other => tracing::debug!(?other, "unexpected control message ignored"),
        }
    }
}

/// The client's side: a keepalive every CONTROL_KEEPALIVE; an error when the connector stops
/// answering them.
async fn send_keepalives(
    mut send: ControlTx,
    mut recv: ControlRx,
    offers: tokio::sync::mpsc::Sender<(Vec<IpNet>, Vec<String>)>,
) -> anyhow::Result<()> {
    let answered = Arc::new(AtomicU64::new(0));
    // Reading runs in its own task: a read cut short by the next tick would lose framing.
    let reader = {
        let answered = answered.clone();
        tokio::spawn(async move {
            while let Ok(msg) = recv.recv().await {
                match msg {
                    Control::Keepalive { seq } => {
                        answered.fetch_max(seq, Ordering::Relaxed);
                    }
                    Control::Routes { routes, zones } => {
                        let _ = offers.send((routes, zones)).await;
                    }
                    _ => {}
                }
            }
        })
    };
    let _abort = AbortOnDrop(reader);
    let mut tick = tokio::time::interval(CONTROL_KEEPALIVE);
    let mut seq = 0u64;
    loop {
        tick.tick().await;
        let last = answered.load(Ordering::Relaxed);
        if seq >= last + KEEPALIVES_MISSED {
            bail!("the connector answered no control keepalive since #{last}");
        }
        seq += 1;
        send.send(&Control::Keepalive { seq }).await?;
    }
}

/// Answers the DNS queries a client sends on its TCP link, each in its own task.
async fn serve_tcp_dns(
    link: Arc<TcpLink>,
    mut queries: tokio::sync::mpsc::Receiver<(u32, Vec<u8>)>,
    fwd: Arc<dns::Forwarder>,
) {
    while let Some((id, query)) = queries.recv().await {
        let (link, fwd) = (link.clone(), fwd.clone());
        tokio::spawn(async move {
            if let Some(answer) = fwd.resolve(&query).await {
                let _ = link.answer_dns(id, &answer).await;
            }
        });
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One packet from the TUN; `None` (and a status that says why) if the TUN is gone.
async fn read_tun(shared: &Shared, tun: &AsyncDevice, buf: &mut [u8]) -> Option<usize> {
    match tun.recv(buf).await {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::error!(error = %e, "reading the TUN failed; tunnel stopped");
            shared.set_state(format!("TUN read failed: {e}"));
            None
        }
    }
}

/// Packets the kernel routed into the TUN go to the peer that owns their destination.
async fn tun_to_peers(shared: Arc<Shared>, tun: Arc<AsyncDevice>) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut reply = vec![0u8; 1500];
    loop {
        let Some(n) = read_tun(&shared, &tun, &mut buf).await else {
            return;
        };
        let Ok(meta) = packet::parse(&buf[..n]) else {
            shared.drop_packet("malformed_from_tun");
            continue;
        };
        if meta.dst.is_multicast() {
            shared.drop_packet("multicast");
            continue;
        }
        let Some(peer) = shared.peer_for(meta.dst) else {
            shared.drop_packet("no_peer");
            continue;
        };
        if send_to(&shared, &peer.link, &peer.counters, &mut buf[..n]) == Sent::TooBig {
            // Toward the VPC the far end is the client.
            let from = (peer.address_v4, peer.address_v6);
            answer_too_big(&shared, &tun, &peer.link, from, &buf[..n], &mut reply).await;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Ok,
    TooBig,
    Dropped,
}

/// Clamps a SYN's MSS to what one datagram carries, then sends the packet as a datagram.
fn send_to(shared: &Shared, link: &Link, counters: &Counters, pkt: &mut [u8]) -> Sent {
    if let Some(max) = link.max_packet() {
        mss::clamp(pkt, max);
    }
    match link.send_packet(pkt) {
        Ok(()) => {
            Counters::add(&counters.tx_packets, &counters.tx_bytes, pkt.len());
            Sent::Ok
        }
        Err(SendError::TooBig) => Sent::TooBig,
        Err(SendError::Dropped) => {
            shared.drop_packet("send_failed");
            Sent::Dropped
        }
    }
}

/// A packet too big for a datagram is answered, never silently dropped: the sender gets
/// "fragmentation needed" / "packet too big" with the tunnel's MTU, through the TUN.
async fn answer_too_big(
    shared: &Shared,
    tun: &AsyncDevice,
    link: &Link,
    (v4, v6): (Ipv4Addr, Ipv6Addr),
    pkt: &[u8],
    reply: &mut [u8],
) {
    let mtu = link
        .max_packet()
        .and_then(|m| u16::try_from(m).ok())
        .unwrap_or(1280);
    match icmp::too_big(pkt, mtu, v4, v6, reply) {
        Some(n) => {
            shared.drop_packet("too_big_answered");
            if let Err(e) = tun.send(&reply[..n]).await {
                tracing::debug!(error = %e, "writing ICMP too-big to the TUN failed");
            }
        }
        None => shared.drop_packet("too_big_no_df"),
    }
}

/// ICMP echo to each peer's public address, outside the tunnel: with the tunnel down, it tells
/// "host unreachable" from "tunnel port blocked". Skipped where echo sockets are not permitted.
async fn ping_peers(shared: Arc<Shared>) {
    const EVERY: Duration = Duration::from_secs(5);
    // A new peer is pinged within a second of joining, then every EVERY.
    let mut last: HashMap<u64, std::time::Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if super::probe::check_possible().is_err() {
            continue;
        }
        let peers = shared.peers.lock().map(|p| p.clone()).unwrap_or_default();
        last.retain(|id, _| peers.iter().any(|p| p.link.id() == *id));
        for p in peers {
            if last.get(&p.link.id()).is_some_and(|t| t.elapsed() < EVERY) {
                continue;
            }
            last.insert(p.link.id(), std::time::Instant::now());
            let rtt = super::probe::echo(p.link.remote().ip(), Duration::from_secs(1))
                .await
                .ok();
            if let Ok(mut ping) = p.ping.lock() {
                *ping = rtt;
            }
        }
    }
}

/// Keeps the TUN's MTU at what one datagram carries; MTU discovery raises it after start.
async fn follow_mtu(shared: Arc<Shared>, netlink: rtnetlink::Handle, index: u32) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let smallest = shared
            .peers
            .lock()
            .ok()
            .and_then(|peers| peers.iter().filter_map(|p| p.link.max_packet()).min());
        let Some(size) = smallest else { continue };
        let mtu = u32::try_from(size.min(MAX_PACKET)).unwrap_or(u32::from(INITIAL_MTU));
        if shared.mtu.swap(mtu, Ordering::Relaxed) != mtu {
            match net::set_mtu(&netlink, index, mtu).await {
                Ok(()) => tracing::info!(mtu, "TUN MTU follows the tunnel's datagram size"),
                Err(e) => tracing::warn!(mtu, error = %e, "could not set TUN MTU"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client

async fn start_client(
    cfg: &Tunnel,
    connect: Vec<String>,
    server_name: String,
    source_port: u16,
    on_routes: super::RoutesHook,
) -> anyhow::Result<TunnelHandle> {
    let mut sysctls = Vec::new();
    let mut client_filter = None;
    let result = async {
        if !cfg.lan.is_empty() || !cfg.advertise.is_empty() {
            // A site gateway forwards its LAN's replies from the TUN to the LAN.
            net::sysctl_change("net.ipv4.ip_forward", "1", &mut sysctls)?;
            net::sysctl_change("net.ipv6.conf.all.forwarding", "1", &mut sysctls)?;
        }
        client_filter = nat::apply_site_gateway(cfg, &sysctls)?;
        let crypto = tls::client_config(&cfg.tls, tls::ALPN)?;
        let tcp_tls = tls::rustls_client(&cfg.tls, tls::ALPN)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport()));
        let endpoint = if cfg.transport.uses_quic() {
            let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, source_port));
            let mut endpoint = Endpoint::client(bind)
                .with_context(|| format!("binding UDP source port {bind}"))?;
            endpoint.set_default_client_config(client);
            Some(endpoint)
        } else {
            None
        };
        let (tun, index, handle) = create_tun(&cfg.tun).await?;
        anyhow::Ok((tun, index, handle, endpoint, tcp_tls))
    }
    .await;
    let (tun, index, handle, endpoint, tcp_tls) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Some(table) = &cfg.client_table {
                let _ = nat::remove(table);
            }
            net::restore(&mut sysctls);
            return Err(e);
        }
    };
    let shared = shared("client", &cfg.tun, "connecting");
    if let Ok(mut f) = shared.firewall.lock() {
        *f = client_filter;
    }
    let (current_tx, current_rx) = watch::channel::<Option<Arc<Peer>>>(None);
    let current_rx_stub = current_rx.clone();
    let mut tasks = JoinSet::new();
    tasks.spawn(tun_to_connector(shared.clone(), tun.clone(), current_rx));
    tasks.spawn(ping_peers(shared.clone()));
    tasks.spawn(follow_mtu(shared.clone(), handle.clone(), index));
    let client = Client {
        shared: shared.clone(),
        endpoint: endpoint.clone(),
        tcp: tokio_rustls::TlsConnector::from(tcp_tls),
        transport: cfg.transport,
        fallback_port: cfg.fallback_port,
        quic_timeout: cfg.quic_timeout,
        source_port,
        tun,
        tun_index: index,
        netlink: handle,
        connect,
        server_name,
        advertise: cfg.advertise.clone(),
        current: current_tx,
        on_routes,
    };
    tasks.spawn(client.run());
    if let Some(stub) = cfg.dns_stub {
        match tokio::net::UdpSocket::bind(stub).await {
            Ok(socket) => {
                let rx = current_rx_stub;
                tasks.spawn(dns::serve_stub(
                    Arc::new(socket),
                    shared.learned_zones.clone(),
                    move || rx.borrow().as_ref().map(|p| p.link.clone()),
                ));
                tracing::info!(%stub, "DNS stub listening for the connector's zones");
            }
            Err(e) => {
                tasks.shutdown().await;
                if let Some(table) = &cfg.client_table {
                    let _ = nat::remove(table);
                }
                net::restore(&mut sysctls);
                return Err(anyhow!("binding the DNS stub to {stub}: {e}"));
            }
        }
    }
    Ok(TunnelHandle {
        shared,
        tasks,
        endpoint,
        sysctls,
        nat_table: cfg.client_table.clone(),
        connector: None,
    })
}

struct Client {
    shared: Arc<Shared>,
    endpoint: Option<Endpoint>,
    tcp: tokio_rustls::TlsConnector,
    transport: Transport,
    fallback_port: Option<u16>,
    quic_timeout: Duration,
    /// Pinned source port, for QUIC and for the TCP fallback alike (0: any).
    source_port: u16,
    tun: Arc<AsyncDevice>,
    tun_index: u32,
    netlink: rtnetlink::Handle,
    connect: Vec<String>,
    server_name: String,
    advertise: Vec<IpNet>,
    current: watch::Sender<Option<Arc<Peer>>>,
    on_routes: super::RoutesHook,
}

/// How a session ended without an error: QUIC works again, here is its link.
struct MoveToQuic(Opened);

impl Client {
    /// Connects, serves until the connection dies, and again, with backoff and jitter so a
    /// fleet of clients does not reconnect in lockstep.
    async fn run(self) {
        let mut failures: u32 = 0;
        loop {
            for target in &self.connect {
                match self.serve_target(target).await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        let e = format!("{e:#}");
                        tracing::warn!(%target, error = %e, "tunnel down");
                        self.shared.set_state(format!("reconnecting: {e}"));
                        failures = failures.saturating_add(1);
                    }
                }
                self.current.send_replace(None);
                if let Ok(mut p) = self.shared.peers.lock() {
                    p.clear();
                }
                let base = Duration::from_millis(250)
                    .saturating_mul(1u32 << failures.min(4))
                    .min(Duration::from_secs(4));
                let jitter = rand::rng().random_range(0..=base.as_millis() as u64 / 2);
                tokio::time::sleep(base + Duration::from_millis(jitter)).await;
            }
        }
    }

    /// Opens a link to `target` (QUIC, else TCP in auto mode) and serves it; when a session on
    /// TCP finds QUIC working again, the next session runs on QUIC with the same overlay
    /// addresses, the TCP link kept until the QUIC one is welcomed.
    async fn serve_target(&self, target: &str) -> anyhow::Result<()> {
        let addr = tokio::net::lookup_host(target)
            .await
            .with_context(|| format!("resolving {target}"))?
            .next()
            .ok_or_else(|| anyhow!("{target} resolves to nothing"))?;
        let (mut opened, mut reason) = self.open(addr).await?;
        let mut previous: Option<Link> = None;
        loop {
            let (MoveToQuic(quic), old) =
                self.session(addr, opened, reason, previous.take()).await?;
            tracing::info!(%addr, "QUIC works again; moving the tunnel back from TCP");
            opened = quic;
            reason = String::new();
            previous = Some(old);
        }
    }

    /// The first link to `addr` that works, and why it is that one.
    async fn open(&self, addr: SocketAddr) -> anyhow::Result<(Opened, String)> {
        match self.transport {
            Transport::Quic => Ok((
                self.open_quic(addr, HANDSHAKE_TIMEOUT).await?,
                String::new(),
            )),
            Transport::Tcp => Ok((
                self.open_tcp(addr).await?,
                "transport = \"tcp\" in the config".into(),
            )),
            Transport::Auto => match self.open_quic(addr, self.quic_timeout).await {
                Ok(o) => Ok((o, String::new())),
                Err(quic) => {
                    let why = format!("{quic:#}");
                    tracing::info!(%addr, reason = %why, "QUIC failed; trying the TCP fallback");
                    let o = self
                        .open_tcp(addr)
                        .await
                        .map_err(|tcp| anyhow!("QUIC: {why}; TCP fallback: {tcp:#}"))?;
                    Ok((o, why))
                }
            },
        }
    }

    async fn open_quic(&self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Opened> {
        let endpoint = self
            .endpoint
            .as_ref()
            .ok_or_else(|| anyhow!("QUIC is off (transport = \"tcp\")"))?;
        let conn = tokio::time::timeout(timeout, async {
            let conn = endpoint.connect(addr, &self.server_name)?.await?;
            let (send, recv) = conn.open_bi().await?;
            anyhow::Ok((conn, send, recv))
        })
        .await
        .map_err(|_| anyhow!("no QUIC handshake in {}", secs(timeout)))??;
        let (conn, send, recv) = conn;
        Ok(Opened {
            link: Link::Quic(conn.clone()),
            control_tx: ControlTx::Quic(send),
            control_rx: ControlRx::Quic(recv),
            inbound: Inbound::Quic(conn),
            dns_queries: None,
        })
    }

    async fn open_tcp(&self, addr: SocketAddr) -> anyhow::Result<Opened> {
        let addr = SocketAddr::new(addr.ip(), self.fallback_port.unwrap_or(addr.port()));
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if self.source_port != 0 {
                // The same pinned port as QUIC's, so a stateless ACL needs no ephemeral range;
                // reuse lets a reconnect bind it while the last connection is in TIME_WAIT.
                socket.set_reuseaddr(true)?;
                let any: IpAddr = if addr.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    Ipv6Addr::UNSPECIFIED.into()
                };
                socket
                    .bind(SocketAddr::new(any, self.source_port))
                    .with_context(|| format!("binding TCP source port {}", self.source_port))?;
            }
            let stream = socket
                .connect(addr)
                .await
                .with_context(|| format!("TCP connect to {addr}"))?;
            stream.set_nodelay(true)?;
            let fd = std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned()?;
            let name = rustls_pki_types::ServerName::try_from(self.server_name.clone())
                .map_err(|e| anyhow!("server_name {:?}: {e}", self.server_name))?;
            let tls = self
                .tcp
                .connect(name, stream)
                .await
                .with_context(|| format!("TLS over TCP to {addr}"))?;
            anyhow::Ok(TcpLink::start(tls, fd, addr))
        })
        .await
        .map_err(|_| {
            anyhow!(
                "no TCP+TLS handshake with {addr} in {}",
                secs(HANDSHAKE_TIMEOUT)
            )
        })?
    }

    /// Keeps trying QUIC while the tunnel runs on TCP; returns the first QUIC link that works.
    async fn probe_quic(&self, addr: SocketAddr, peer: Arc<Peer>, first_reason: String) -> Opened {
        loop {
            let jitter = rand::rng().random_range(0..=QUIC_PROBE_EVERY.as_millis() as u64 / 5);
            tokio::time::sleep(QUIC_PROBE_EVERY + Duration::from_millis(jitter)).await;
            match self.open_quic(addr, self.quic_timeout).await {
                Ok(o) => return o,
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "QUIC probe failed");
                    if let Ok(mut r) = peer.transport_reason.lock() {
                        *r = format!(
                            "{first_reason}; QUIC retried every {}, last: {e:#}",
                            secs(QUIC_PROBE_EVERY)
                        );
                    }
                }
            }
        }
    }

    /// Hello, welcome, routes, then packets until the link dies (an error) or, on TCP in auto
    /// mode, until QUIC works again. `previous` (the link being replaced) is closed once this
    /// one carries the traffic.
    async fn session(
        &self,
        addr: SocketAddr,
        opened: Opened,
        reason: String,
        previous: Option<Link>,
    ) -> anyhow::Result<(MoveToQuic, Link)> {
        let Opened {
            link,
            control_tx: mut send,
            control_rx: mut recv,
            mut inbound,
            ..
        } = opened;
        send.send(&Control::Hello {
            version: PROTOCOL_VERSION,
            node: self.server_name.clone(),
            advertise: self.advertise.clone(),
            transport_reason: (!reason.is_empty()).then(|| reason.clone()),
        })
        .await?;
        let welcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, recv.recv())
            .await
            .context("no answer to hello")??;
        let (address_v4, address_v6, prefix_v4, prefix_v6, routes, node, zones) = match welcome {
            Control::Welcome {
                address_v4,
                address_v6,
                prefix_v4,
                prefix_v6,
                routes,
                node,
                zones,
                ..
            } => (
                address_v4, address_v6, prefix_v4, prefix_v6, routes, node, zones,
            ),
            Control::Refused { reason } => {
                self.shared
                    .refuse(Some(self.server_name.clone()), addr, reason.clone());
                bail!("refused by the connector: {reason}");
            }
            other => bail!("unexpected answer to hello: {other:?}"),
        };
        net::add_address(&self.netlink, self.tun_index, address_v4.into(), prefix_v4).await?;
        net::add_address(&self.netlink, self.tun_index, address_v6.into(), prefix_v6).await?;
        for r in &routes {
            net::replace_route(&self.netlink, *r, self.tun_index)
                .await
                .with_context(|| format!("route {r} into the tunnel"))?;
        }
        let zone_wires: Vec<Vec<u8>> = zones
            .iter()
            .filter_map(|d| crate::core::dns::wire_name(d).ok())
            .collect();
        (self.on_routes)(&routes, &zone_wires, self.tun_index)
            .context("loading routes into the classifier")?;
        if let Ok(mut z) = self.shared.learned_zones.lock() {
            *z = zone_wires;
        }
        let peer = Arc::new(Peer {
            identity: self.server_name.clone(),
            link: link.clone(),
            transport_reason: Mutex::new(reason.clone()),
            ping: Mutex::new(None),
            address_v4,
            address_v6,
            owns: routes.clone(),
            connected_since: now_unix(),
            counters: Arc::new(Counters::default()),
        });
        if let Ok(mut p) = self.shared.peers.lock() {
            *p = vec![peer.clone()];
        }
        let far_v4 = Ipv4Net::new(address_v4, prefix_v4)
            .ok()
            .and_then(|n| nth_v4(n.trunc(), 1));
        let far_v6 = Ipv6Net::new(address_v6, prefix_v6).map(|n| nth_v6(n.trunc(), 1));
        if let (Some(v4), Ok(v6), Ok(mut far)) = (far_v4, far_v6, self.shared.far_end.lock()) {
            *far = (v4, v6);
        }
        self.current.send_replace(Some(peer.clone()));
        if let Some(old) = previous {
            old.close(0, "moved to another transport");
        }
        let via = match &link {
            Link::Quic(_) => format!("connected to {addr} over QUIC"),
            Link::Tcp(_) => format!("connected to {} over TCP: {reason}", link.remote()),
        };
        self.shared.set_state(via);
        tracing::info!(%addr, transport = link.kind(), %reason, identity = %node, %address_v4, %address_v6, ?routes, "tunnel up");
        let packets = async {
            loop {
                let dgram = match inbound.packet().await {
                    Ok(d) => d,
                    Err(e) => return Err::<(), _>(e),
                };
                Counters::add(
                    &peer.counters.rx_packets,
                    &peer.counters.rx_bytes,
                    dgram.len(),
                );
                if let Err(e) = self.tun.send(&dgram).await {
                    tracing::debug!(error = %e, "TUN write failed");
                    self.shared.drop_packet("tun_write");
                }
            }
        };
        let probing = matches!(link, Link::Tcp(_)) && self.transport == Transport::Auto;
        let probe = async {
            match probing {
                true => self.probe_quic(addr, peer.clone(), reason.clone()).await,
                false => std::future::pending().await,
            }
        };
        let (offers_tx, mut offers) = tokio::sync::mpsc::channel(4);
        let keepalives = send_keepalives(send, recv, offers_tx);
        tokio::pin!(packets, probe, keepalives);
        let mut routes = routes;
        let result = loop {
            tokio::select! {
                r = &mut packets => break r.map(|()| None),
                r = &mut keepalives => break r.map(|()| None),
                quic = &mut probe => break Ok(Some(quic)),
                Some((new_routes, zones)) = offers.recv() => {
                    match self.apply_offer(&routes, &new_routes, &zones).await {
                        Ok(()) => {
                            tracing::info!(routes = ?new_routes, ?zones, "the connector changed its routes and zones");
                            routes = new_routes;
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "applying the connector's new routes failed"),
                    }
                }
            }
        };
        match result {
            Ok(Some(quic)) => Ok((MoveToQuic(quic), link)),
            Ok(None) => bail!("the tunnel ended"),
            Err(e) => {
                link.close(0, "session ended");
                Err(e)
            }
        }
    }
}

impl Client {
    /// Routes and zones the connector pushed after a reload: kernel routes added and removed,
    /// the classifier and the DNS steering reloaded; the connection is untouched.
    async fn apply_offer(
        &self,
        old: &[IpNet],
        routes: &[IpNet],
        zones: &[String],
    ) -> anyhow::Result<()> {
        for r in routes {
            net::replace_route(&self.netlink, *r, self.tun_index)
                .await
                .with_context(|| format!("route {r} into the tunnel"))?;
        }
        for r in old.iter().filter(|r| !routes.contains(r)) {
            if let Err(e) = net::delete_route(&self.netlink, *r, self.tun_index).await {
                tracing::warn!(route = %r, error = %e, "removing a withdrawn route failed");
            }
        }
        let zone_wires: Vec<Vec<u8>> = zones
            .iter()
            .filter_map(|d| crate::core::dns::wire_name(d).ok())
            .collect();
        (self.on_routes)(routes, &zone_wires, self.tun_index)
            .context("loading routes into the classifier")?;
        if let Ok(mut z) = self.shared.learned_zones.lock() {
            *z = zone_wires;
        }
        Ok(())
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// Everything routed into the client's TUN goes to the connector, while there is one.
async fn tun_to_connector(
    shared: Arc<Shared>,
    tun: Arc<AsyncDevice>,
    current: watch::Receiver<Option<Arc<Peer>>>,
) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut reply = vec![0u8; 1500];
    loop {
        let Some(n) = read_tun(&shared, &tun, &mut buf).await else {
            return;
        };
        if packet::parse(&buf[..n]).is_ok_and(|m| m.dst.is_multicast()) {
            shared.drop_packet("multicast");
            continue;
        }
        let peer = current.borrow().clone();
        // A query for a private zone that eBPF steered here: answered by the connector's
        // forwarder, and the reply comes from the resolver the application asked.
        if let (Some(p), Some(query)) = (&peer, steered_query(&shared, &buf[..n])) {
            let (link, tun, shared) = (p.link.clone(), tun.clone(), shared.clone());
            tokio::spawn(async move {
                let Some((msg, _)) = crate::core::dns::udp_query(&query) else {
                    return;
                };
                let reply = match link.relay_dns(msg).await {
                    Ok(answer) => crate::core::dns::udp_reply(&query, &answer),
                    Err(_) => None,
                };
                match reply {
                    Some(r) => {
                        let _ = tun.send(&r).await;
                    }
                    None => shared.drop_packet("dns_relay_failed"),
                }
            });
            continue;
        }
        match peer {
            Some(p) => {
                if send_to(&shared, &p.link, &p.counters, &mut buf[..n]) == Sent::TooBig {
                    let from = shared
                        .far_end
                        .lock()
                        .map(|f| *f)
                        .unwrap_or((Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED));
                    answer_too_big(&shared, &tun, &p.link, from, &buf[..n], &mut reply).await;
                }
            }
            None => shared.drop_packet("tunnel_down"),
        }
    }
}

/// The packet, if it is a DNS query for one of the zones the connector answers.
fn steered_query(shared: &Shared, pkt: &[u8]) -> Option<Vec<u8>> {
    let (msg, _) = crate::core::dns::udp_query(pkt)?;
    let q = crate::core::dns::parse_query(msg).ok()?;
    let zones = shared.learned_zones.lock().ok()?;
    crate::core::dns::matching_zone(&q.name, &zones)?;
    Some(pkt.to_vec())
}

/// `ip_local_reserved_ports` with `lo-hi` added (kept as is when already listed).
fn reserve_range(current: &str, (lo, hi): (u16, u16)) -> String {
    let range = format!("{lo}-{hi}");
    let current = current.trim();
    if current.split(',').any(|r| r.trim() == range) {
        current.to_string()
    } else if current.is_empty() {
        range
    } else {
        format!("{current},{range}")
    }
}

/// The `n`th address of a prefix (0 is the network address).
fn nth_v4(net: Ipv4Net, n: u32) -> Option<Ipv4Addr> {
    let size = 1u64 << (32 - u32::from(net.prefix_len()));
    if u64::from(n) >= size.saturating_sub(1) {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(net.network()).wrapping_add(n)))
}

fn nth_v6(net: Ipv6Net, n: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()).wrapping_add(u128::from(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserving_the_range_keeps_what_was_reserved() {
        assert_eq!(reserve_range("", (40000, 40999)), "40000-40999");
        assert_eq!(
            reserve_range("8080,9000-9100\n", (40000, 40999)),
            "8080,9000-9100,40000-40999"
        );
        assert_eq!(reserve_range("40000-40999", (40000, 40999)), "40000-40999");
    }

    #[test]
    fn overlay_hosts_skip_network_and_broadcast() {
        let net: Ipv4Net = "100.64.0.0/30".parse().expect("net");
        assert_eq!(nth_v4(net, 1), Some(Ipv4Addr::new(100, 64, 0, 1)));
        assert_eq!(nth_v4(net, 2), Some(Ipv4Addr::new(100, 64, 0, 2)));
        assert_eq!(nth_v4(net, 3), None, "broadcast");
        let v6: Ipv6Net = "fd00:64::/64".parse().expect("net");
        assert_eq!(nth_v6(v6, 2), "fd00:64::2".parse::<Ipv6Addr>().expect("ip"));
    }
}
