//! The tunnel's shared state and the connector's tasks: TUN pump, QUIC endpoint and TCP
//! fallback listener, handshakes (bounded), sessions and per-peer packet pumps. The client's
//! side is `client`.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use quinn::{Endpoint, TransportConfig, VarInt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tun_rs::AsyncDevice;

use super::control::{self, Control, PROTOCOL_VERSION};
use super::keepalive::answer_keepalives;
use super::link::{ControlRx, ControlTx, Inbound, Link, Opened, SendError, Side, TcpLink};
use super::peer_routes::Advertised;
use super::{dns, nat, net, tls};
use crate::api::{PeerStatus, Refusal, TunnelStatus};
use crate::config::{Role, Tunnel};
use crate::core::advertise::{self, Grants};
use crate::core::limits::{HandshakeSlots, LogLimit, SlotRefused, Tally};
use crate::core::policy::{Decision, Policy};
use crate::core::text::{PEER_NAME, PEER_TEXT, clean, is_clean};
use crate::core::{icmp, mss, packet};

/// Largest IP packet the TUN can hand us; buffers are this big.
pub(super) const MAX_PACKET: usize = 65_535;
/// UDP payload size QUIC starts with: its datagrams then hold 1362-byte packets, above IPv6's
/// 1280 minimum, so the TUN can carry IPv6 from the first packet. MTU discovery raises it.
const INITIAL_MTU: u16 = 1400;
/// Ceiling for MTU discovery on a 1500-byte path (1500 - 20 IPv4 - 8 UDP).
const MTU_CEILING: u16 = 1472;
const KEEPALIVE: Duration = Duration::from_secs(1);
/// A connector that vanished is noticed within this, and the client starts reconnecting.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals of authenticated peers kept for status: they name who and why.
const MAX_REFUSALS: usize = 20;
/// Failed handshakes kept for status, apart: anyone can cause them, so they must not push the
/// refusals above out; their counts by reason are kept too.
const MAX_HANDSHAKE_FAILURES: usize = 5;
const RESERVED_PORTS: &str = "net.ipv4.ip_local_reserved_ports";
/// Connections between their first packet and the welcome (TLS, then the hello), at once: each
/// holds up to two descriptors and ~100 KiB of TLS state; 256 is ~30 MiB at most, and far more
/// than legitimate clients ever start in one handshake time.
const MAX_PENDING: usize = 256;
/// The same from one source (an IPv4 address, an IPv6 /64): a site's NAT starting all its
/// clients at once stays below it, a single host cannot take the whole budget.
const MAX_PENDING_PER_SOURCE: usize = 16;
/// Above this many pending handshakes, a QUIC client must prove its address (a Retry) first,
/// so spoofed sources cannot hold slots.
const RETRY_ABOVE: usize = MAX_PENDING / 4;
/// Descriptors kept free below RLIMIT_NOFILE: new TCP connections (and access streams) are
/// refused closer to it, so `gatewayctl status`, netlink and DNS retries always get one.
const FD_HEADROOM: u64 = 128;
/// `gatewayctl access` streams open at once: two descriptors each.
const MAX_ACCESS_STREAMS: u64 = 256;
/// QUIC streams a client may have open at once: its control stream and its DNS queries.
const CLIENT_STREAMS: u32 = 1 + super::dns_serve::PEER_IN_FLIGHT as u32;
/// Unread bytes per QUIC stream from a client. A tunnel stream needs only a control message
/// or a query (16 KiB would do), but `gatewayctl access` streams carry bulk uploads on the same
/// endpoint (the ALPN is known only after the handshake): 256 KiB per round trip keeps scp
/// through `access` at several MB/s across a continent.
const CLIENT_STREAM_WINDOW: u32 = 256 << 10;
/// Unread bytes over all of a client's streams: what one connection can make the connector
/// buffer, whatever it opens (every DNS stream holding a full query is a quarter of it).
const CLIENT_CONNECTION_WINDOW: u32 = 1 << 20;
/// What a client accepts per stream from its connector (a welcome or a large DNS answer) and
/// over all streams.
const CONNECTOR_STREAM_WINDOW: u32 = 2 * control::MAX_MESSAGE as u32;
const CONNECTOR_CONNECTION_WINDOW: u32 = 4 << 20;
/// Datagrams received and not yet read by the engine, per connection: 4 MiB is ~11 ms at
/// 3 Gbit/s, enough to ride out a busy runtime tick on two cores; only welcomed connections
/// keep any (before the welcome they are read and dropped).
const DATAGRAM_RECEIVE_BUFFER: usize = 4 << 20;

pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) tx_packets: AtomicU64,
    pub(super) tx_bytes: AtomicU64,
    pub(super) rx_packets: AtomicU64,
    pub(super) rx_bytes: AtomicU64,
    policy_drops: AtomicU64,
}

impl Counters {
    pub(super) fn add(count: &AtomicU64, bytes: &AtomicU64, n: usize) {
        count.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

pub(super) struct Peer {
    pub(super) identity: String,
    pub(super) link: Link,
    /// Why this transport; the client updates it as QUIC probes fail.
    pub(super) transport_reason: Mutex<String>,
    /// ICMP echo round trip to the peer's public address, from `ping_peers`.
    pub(super) ping: Mutex<Option<Duration>>,
    pub(super) address_v4: Ipv4Addr,
    pub(super) address_v6: Ipv6Addr,
    /// Sources this peer may send from and destinations routed to it.
    pub(super) owns: Vec<IpNet>,
    /// Connector: the prefixes of `owns` the client advertised (and the policy granted).
    pub(super) advertised: Vec<IpNet>,
    pub(super) connected_since: u64,
    pub(super) counters: Arc<Counters>,
}

/// What `gatewayctl status` reads; shared by every task of the tunnel.
pub struct Shared {
    role: &'static str,
    tun: String,
    mtu: AtomicU32,
    pub(super) peers: Mutex<Vec<Arc<Peer>>>,
    refusals: Mutex<VecDeque<Refusal>>,
    /// Failed handshakes (no authenticated identity), kept apart from `refusals`.
    failed_handshakes: Mutex<VecDeque<Refusal>>,
    /// Their counts by reason.
    handshake_failures: Tally,
    /// What a bound refused or dropped, by name (DNS, frames, handshakes, routes).
    pub(super) limits: Arc<Tally>,
    /// Warnings a peer can cause at will are logged at most this often.
    warn_limit: Mutex<LogLimit>,
    drops: Mutex<HashMap<String, u64>>,
    state: Mutex<String>,
    /// Client: the connector's overlay addresses, the far end of the tunnel, from which its
    /// ICMP "too big" messages come (an address of this node would be dropped as a martian).
    pub(super) far_end: Mutex<(Ipv4Addr, Ipv6Addr)>,
    /// Connector: the DNS forwarder, for its zones' status.
    forwarder: Mutex<Option<Arc<dns::Forwarder>>>,
    /// Client: the zones the connector answers, in wire form.
    pub(super) learned_zones: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Connector: the pinned egress range, for status.
    egress_ports: Mutex<Option<(u16, u16)>>,
    access_active: AtomicU64,
    access_total: AtomicU64,
    /// Connector: the nftables table's name and what it was made to hold.
    pub(super) firewall: Mutex<Option<(String, String)>>,
}

/// Appends to a ring of at most `max` entries.
fn push_ring(ring: &Mutex<VecDeque<Refusal>>, max: usize, entry: Refusal) {
    if let Ok(mut r) = ring.lock() {
        while r.len() >= max {
            r.pop_front();
        }
        r.push_back(entry);
    }
}

impl Shared {
    pub(super) fn drop_packet(&self, reason: &str) {
        if let Ok(mut d) = self.drops.lock() {
            *d.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// `Some(lines left out)` when a peer-caused warning may be logged now.
    fn may_warn(&self) -> Option<u64> {
        self.warn_limit
            .lock()
            .ok()
            .and_then(|mut l| l.allow(Instant::now()))
    }

    /// An authenticated peer refused; what it supplied is escaped and cut here.
    pub(super) fn refuse(&self, identity: Option<String>, remote: SocketAddr, reason: String) {
        let identity = identity.map(|i| clean(&i, PEER_NAME));
        let reason = clean(&reason, PEER_TEXT);
        if let Some(skipped) = self.may_warn() {
            tracing::warn!(?identity, %remote, %reason, skipped, "peer refused");
        }
        let entry = Refusal {
            identity,
            remote: remote.to_string(),
            reason,
            at: now_unix(),
        };
        push_ring(&self.refusals, MAX_REFUSALS, entry);
    }

    /// A connection that never authenticated: counted by `kind`, the latest few kept apart.
    fn handshake_failed(&self, remote: SocketAddr, kind: &'static str, reason: String) {
        self.handshake_failures.bump(kind);
        let reason = clean(&reason, PEER_TEXT);
        if let Some(skipped) = self.may_warn() {
            tracing::warn!(%remote, %reason, skipped, "handshake failed");
        }
        let entry = Refusal {
            identity: None,
            remote: remote.to_string(),
            reason,
            at: now_unix(),
        };
        push_ring(&self.failed_handshakes, MAX_HANDSHAKE_FAILURES, entry);
    }

    pub(super) fn set_state(&self, s: impl Into<String>) {
        if let Ok(mut st) = self.state.lock() {
            // It quotes errors and refusal reasons from the far end.
            *st = clean(&s.into(), 2 * PEER_TEXT);
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
                        advertised: p.advertised.iter().map(|n| n.to_string()).collect(),
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
                            // Label bytes are the connector's: any byte may be in them.
                            domain: clean(
                                crate::core::dns::dotted(w).trim_end_matches('.'),
                                PEER_NAME,
                            ),
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
            refusals: {
                let mut all: Vec<Refusal> = Vec::new();
                for ring in [&self.refusals, &self.failed_handshakes] {
                    if let Ok(r) = ring.lock() {
                        all.extend(r.iter().cloned());
                    }
                }
                all.sort_by_key(|r| r.at);
                all
            },
            limits: self.limits.snapshot(),
            handshake_failures: self.handshake_failures.snapshot(),
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
    pub(super) tasks: JoinSet<()>,
    /// `None` when the config says `transport = "tcp"`.
    pub(super) endpoint: Option<Endpoint>,
    pub(super) sysctls: Vec<(String, String)>,
    pub(super) nat_table: Option<String>,
    pub(super) connector: Option<Arc<Connector>>,
    /// The verifiers every handshake asks; a reload swaps them (a new CRL).
    pub(super) trust: Arc<tls::Trust>,
}

impl TunnelHandle {
    pub fn trust(&self) -> &Arc<tls::Trust> {
        &self.trust
    }

    /// Reads `[tls]` again (the CRL) without applying it, so a bad file changes nothing.
    pub fn prepare_trust(&self, cfg: &Tunnel) -> anyhow::Result<tls::Verifiers> {
        Ok(tls::Verifiers::build(&cfg.tls)?)
    }

    /// New handshakes are verified with `v` from now on, and every live session whose peer
    /// certificate `v` refuses (revoked since) is closed at once and listed as a refusal.
    /// Returns the identities closed.
    pub fn apply_trust(&self, cfg: &Tunnel, v: tls::Verifiers) -> Vec<String> {
        self.trust.install(v);
        let server_name = match &cfg.role {
            Role::Client { server_name, .. } => Some(server_name.as_str()),
            Role::Connector { .. } => None,
        };
        let peers = self
            .shared
            .peers
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        let mut closed = Vec::new();
        for p in peers {
            let verdict = match (p.link.peer_chain(), server_name) {
                (None, _) => Err("no certificate kept to check against the new CRL".into()),
                (Some(chain), Some(name)) => self.trust.check_server(&chain, name),
                (Some(chain), None) => self.trust.check_client(&chain),
            };
            if let Err(reason) = verdict {
                p.link.close(4, &reason);
                if let Ok(mut peers) = self.shared.peers.lock() {
                    peers.retain(|q| q.link.id() != p.link.id());
                }
                self.shared
                    .refuse(Some(p.identity.clone()), p.link.remote(), reason);
                closed.push(p.identity.clone());
            }
        }
        closed
    }

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
    /// connections and get the new routes and zones pushed, except a client whose advertised
    /// prefixes are no longer granted (or now overlap an offered route): its session is closed,
    /// and its reconnect is refused with the reason. A client's routes and zones come from its
    /// connector: nothing to apply there.
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
        c.advertised.set_grants(grants_of(&cfg.policy));
        let grants = c.advertised.grants();
        let peers = self
            .shared
            .peers
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        for p in peers {
            if let Err(r) = advertise::still_granted(&p.identity, &p.advertised, &grants, &routes) {
                let reason = format!("session closed on reload: {r}");
                self.shared
                    .refuse(Some(p.identity.clone()), p.link.remote(), reason);
                p.link.close(4, "advertised prefix no longer granted");
            }
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

/// QUIC settings for `side`: what the protocol needs from the other end and no more. A client
/// opens one control stream and one stream per DNS query, never a unidirectional one; a
/// connector opens no streams at all.
pub(super) fn transport(side: Side) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.initial_mtu(INITIAL_MTU);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MTU_CEILING);
    t.mtu_discovery_config(Some(mtud));
    t.keep_alive_interval(Some(KEEPALIVE));
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER));
    t.datagram_send_buffer_size(4 << 20);
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    let (streams, stream_window, window) = match side {
        Side::Connector => (
            CLIENT_STREAMS,
            CLIENT_STREAM_WINDOW,
            CLIENT_CONNECTION_WINDOW,
        ),
        Side::Client => (0, CONNECTOR_STREAM_WINDOW, CONNECTOR_CONNECTION_WINDOW),
    };
    t.max_concurrent_bidi_streams(VarInt::from_u32(streams));
    t.stream_receive_window(VarInt::from_u32(stream_window));
    t.receive_window(VarInt::from_u32(window));
    t
}

pub(super) async fn create_tun(
    name: &str,
) -> anyhow::Result<(Arc<AsyncDevice>, u32, rtnetlink::Handle)> {
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
            super::client::start_client(
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

pub(super) fn shared(role: &'static str, tun: &str, state: &str) -> Arc<Shared> {
    Arc::new(Shared {
        role,
        tun: tun.into(),
        mtu: AtomicU32::new(0),
        peers: Mutex::new(Vec::new()),
        refusals: Mutex::new(VecDeque::new()),
        failed_handshakes: Mutex::new(VecDeque::new()),
        handshake_failures: Tally::default(),
        limits: Arc::new(Tally::default()),
        // A line a second, ten in a burst: enough to see an attack, not enough to fill a disk.
        warn_limit: Mutex::new(LogLimit::new(1, 10, Instant::now())),
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
    let trust = tls::Trust::load(&cfg.tls)?;
    let mut sysctls = Vec::new();
    let result = async {
        net::sysctl_change("net.ipv4.ip_forward", "1", &mut sysctls)?;
        net::sysctl_change("net.ipv6.conf.all.forwarding", "1", &mut sysctls)?;
        let crypto = trust.quic_server(&cfg.tls)?;
        let tcp_tls = trust.server_config(&cfg.tls)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport(Side::Connector)));
        // Connection attempts quinn queues before the accept loop gives each a slot or a
        // refusal: beyond these quinn refuses by itself; each holds at most 64 KiB of early
        // packets, all together 8 MiB.
        server.max_incoming(2 * MAX_PENDING);
        server.incoming_buffer_size(64 << 10);
        server.incoming_buffer_size_total(8 << 20);
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
        match dns::Forwarder::start(&cfg.zones, ports, &mut tasks, shared.limits.clone()).await {
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
    let overlay = vec![IpNet::V4(cfg.overlay_v4), IpNet::V6(cfg.overlay_v6)];
    let connector = Arc::new(Connector {
        shared: shared.clone(),
        tun: tun.clone(),
        advertised: Advertised::new(grants_of(&cfg.policy), overlay, handle.clone(), index),
        slots: Mutex::new(HandshakeSlots::new(MAX_PENDING, MAX_PENDING_PER_SOURCE)),
        nofile: nofile_limit(),
        policy,
        overlay_v4: cfg.overlay_v4,
        overlay_v6: cfg.overlay_v6,
        offer,
        leases: Mutex::new(HashMap::new()),
        forwarder,
        egress_ports: cfg.egress.as_ref().map(|e| e.ports),
        trust: trust.clone(),
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
                let remote = incoming.remote_address();
                let slot = match connector.slot(remote) {
                    Some(s) => s,
                    None => {
                        incoming.refuse();
                        continue;
                    }
                };
                if slot.busy() && !incoming.remote_address_validated() && incoming.may_retry() {
                    drop(slot);
                    let _ = incoming.retry();
                    continue;
                }
                let c = connector.clone();
                clients.spawn(async move { c.serve_quic(incoming, slot).await });
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
                if !connector.descriptors_left(&stream) {
                    continue;
                }
                let Some(slot) = connector.slot(remote) else {
                    continue;
                };
                let c = connector.clone();
                let acceptor = acceptor.clone();
                clients.spawn(async move { c.serve_tcp(stream, remote, acceptor, slot).await });
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
        trust,
    })
}

fn grants_of(entries: &[crate::config::PolicyEntry]) -> Grants {
    Grants::new(
        entries
            .iter()
            .map(|p| (p.identity.clone(), p.advertise.clone())),
    )
}

/// The soft RLIMIT_NOFILE (what `LimitNOFILE=` sets under systemd).
fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed, nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    if rc == 0 { r.rlim_cur } else { 1024 }
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
pub(super) struct Offer {
    pub(super) routes: Vec<IpNet>,
    pub(super) zones: Vec<String>,
}

/// A pending handshake's share of the connector's bounds, given back when dropped (after the
/// welcome or the refusal, or when the connection fails first).
struct Slot {
    connector: Arc<Connector>,
    ip: IpAddr,
}

impl Slot {
    /// Enough handshakes are pending that new QUIC clients must prove their address.
    fn busy(&self) -> bool {
        self.connector
            .slots
            .lock()
            .is_ok_and(|s| s.pending() > RETRY_ABOVE)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.connector.slots.lock() {
            s.release(self.ip);
        }
    }
}

pub(super) struct Connector {
    shared: Arc<Shared>,
    tun: Arc<AsyncDevice>,
    /// Clients' advertised prefixes and their kernel routes.
    advertised: Advertised,
    slots: Mutex<HandshakeSlots>,
    /// RLIMIT_NOFILE at start.
    nofile: u64,
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
    /// For access streams, which are no peers: they end when a reload revokes their certificate.
    trust: Arc<tls::Trust>,
    /// The forward filter's per-session chains (in the `[egress]` table).
    session_filter: Option<nat::SessionFilter>,
}

impl Connector {
    /// A pending-handshake slot for a connection from `remote`; `None` (counted, and logged at
    /// a bounded rate) when the connector or that source has as many as it may.
    fn slot(self: &Arc<Self>, remote: SocketAddr) -> Option<Slot> {
        let taken = self
            .slots
            .lock()
            .map_err(|_| SlotRefused::Global)
            .and_then(|mut s| s.take(remote.ip()));
        match taken {
            Ok(()) => Some(Slot {
                connector: self.clone(),
                ip: remote.ip(),
            }),
            Err(why) => {
                let reason = match why {
                    SlotRefused::Global => format!("{MAX_PENDING} handshakes already pending"),
                    SlotRefused::Source => format!(
                        "{MAX_PENDING_PER_SOURCE} handshakes already pending from this source"
                    ),
                };
                self.shared.handshake_failed(remote, why.name(), reason);
                None
            }
        }
    }

    /// Whether a descriptor just opened leaves FD_HEADROOM below the limit. The kernel hands
    /// out the lowest free number, so descriptor `n` means at least `n` are open.
    fn descriptors_left(&self, new: &impl AsRawFd) -> bool {
        let n = u64::try_from(new.as_raw_fd()).unwrap_or(u64::MAX);
        if n.saturating_add(FD_HEADROOM) < self.nofile {
            return true;
        }
        self.shared.limits.bump("descriptors_low");
        false
    }

    /// A TLS handshake given HANDSHAKE_TIMEOUT; a failure is counted and listed apart.
    async fn handshake<T, E: std::fmt::Display>(
        &self,
        remote: SocketAddr,
        over: &str,
        handshake: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(done)) => Some(done),
            Ok(Err(e)) => {
                let reason = format!("TLS handshake{over} failed: {e}");
                self.shared.handshake_failed(remote, "tls_failed", reason);
                None
            }
            Err(_) => {
                let reason = format!("handshake{over} timed out");
                self.shared.handshake_failed(remote, "timed_out", reason);
                None
            }
        }
    }

    /// The identity a verified certificate names, if it is a plain name that status and logs
    /// can show as it is.
    fn identity(&self, remote: SocketAddr, name: Option<String>) -> Option<String> {
        match name {
            Some(n) if is_clean(&n, PEER_NAME) => Some(n),
            Some(n) => {
                let reason = format!("certificate name {:?} is not a plain name", clean(&n, 64));
                self.shared.handshake_failed(remote, "bad_name", reason);
                None
            }
            None => {
                let reason = "certificate carries no name".to_string();
                self.shared.handshake_failed(remote, "no_name", reason);
                None
            }
        }
    }

    async fn serve_quic(self: Arc<Self>, incoming: quinn::Incoming, slot: Slot) {
        let remote = incoming.remote_address();
        let Some(conn) = self.handshake(remote, "", incoming.into_future()).await else {
            return;
        };
        let Some(identity) = self.identity(remote, tls::peer_identity(&conn)) else {
            conn.close(VarInt::from_u32(1), b"no identity");
            return;
        };
        if tls::negotiated_alpn(&conn).as_deref() == Some(tls::ALPN_ACCESS) {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
                Ok(Ok((send, recv))) => {
                    let chain = tls::peer_chain(&conn).unwrap_or_default();
                    self.serve_access(&identity, remote, chain, recv, send, slot)
                        .await
                }
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
                control_rx: ControlRx::quic(recv, Side::Connector),
                inbound: Inbound::Quic(conn.clone()),
                dns_queries: None,
            },
            _ => {
                tracing::info!(%identity, %remote, "no control stream; connection dropped");
                conn.close(VarInt::from_u32(1), b"no control stream");
                return;
            }
        };
        self.serve(opened, identity, slot).await;
    }

    async fn serve_tcp(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        slot: Slot,
    ) {
        let _ = stream.set_nodelay(true);
        let Some(tls) = self
            .handshake(remote, " (TCP)", acceptor.accept(stream))
            .await
        else {
            return;
        };
        let name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(tls::identity_of_chain);
        let Some(identity) = self.identity(remote, name) else {
            return;
        };
        if tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_ACCESS) {
            let chain = super::link::PeerCertificates::peer_certificates(&tls);
            let (r, w) = tokio::io::split(tls);
            self.serve_access(&identity, remote, chain, r, w, slot)
                .await;
            return;
        }
        // Only an authenticated peer gets its socket duplicated (for TCP_INFO and shutdown).
        let socket = match tls.get_ref().0.as_fd().try_clone_to_owned() {
            Ok(s) => s,
            Err(e) => {
                self.shared.limits.bump("descriptors_low");
                tracing::warn!(error = %e, "duplicating a TCP socket failed");
                return;
            }
        };
        let tally = self.shared.limits.clone();
        let opened = TcpLink::start(tls, socket, remote, Side::Connector, tally);
        self.serve(opened, identity, slot).await;
    }

    /// One `gatewayctl access` stream: the request, the decision, then bytes both ways, until
    /// either end closes or a reload's CRL revokes `chain`.
    async fn serve_access<R, W>(
        &self,
        identity: &str,
        remote: SocketAddr,
        chain: Vec<rustls_pki_types::CertificateDer<'static>>,
        mut r: R,
        mut w: W,
        slot: Slot,
    ) where
        R: tokio::io::AsyncRead + Unpin + Send,
        W: tokio::io::AsyncWrite + Unpin + Send,
    {
        let max = control::MAX_CLIENT_MESSAGE;
        let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, control::recv_io(&mut r, max)).await;
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
        // Reserved before connecting, so the bound holds however many arrive at once.
        let active = self.shared.access_active.fetch_add(1, Ordering::Relaxed);
        let target = if active >= MAX_ACCESS_STREAMS {
            self.shared.limits.bump("access_streams");
            Err(format!("{MAX_ACCESS_STREAMS} access streams already open"))
        } else {
            self.access_target(identity, &host, port).await
        };
        let (address, mut upstream) = match target {
            Ok(t) => t,
            Err(reason) => {
                self.shared.access_active.fetch_sub(1, Ordering::Relaxed);
                // The request's host is the client's text: cut and escaped in the refusal.
                self.shared.refuse(
                    Some(identity.to_string()),
                    remote,
                    format!("access to {}:{port}: {reason}", clean(&host, 64)),
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
            self.shared.access_active.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        drop(slot);
        let host = clean(&host, PEER_NAME);
        tracing::info!(%identity, %remote, %host, %address, "access stream opened");
        self.shared.access_total.fetch_add(1, Ordering::Relaxed);
        let mut client = tokio::io::join(r, w);
        let result = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r,
            reason = self.trust.client_refused(&chain) => {
                self.shared.refuse(Some(identity.to_string()), remote, format!("access stream to {address} closed: {reason}"));
                Err(std::io::Error::other(reason))
            }
        };
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
        if host.len() > crate::core::dns::MAX_NAME {
            return Err(format!("a host name of {} bytes is no name", host.len()));
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
        if !self.descriptors_left(&stream) {
            return Err("the connector is short of descriptors".into());
        }
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

    async fn serve(&self, opened: Opened, identity: String, slot: Slot) {
        let link = opened.link.clone();
        let remote = link.remote();
        if let Err(e) = self.session(opened, &identity, slot).await {
            // The error may quote what the client sent.
            let error = clean(&format!("{e:#}"), PEER_TEXT);
            tracing::info!(%identity, %remote, transport = link.kind(), %error, "client session ended");
        }
        let id = link.id();
        if let Ok(mut peers) = self.shared.peers.lock() {
            peers.retain(|p| p.link.id() != id);
        }
        self.sync_filter();
        link.close(0, "session ended");
        self.advertised.release(id).await;
    }

    async fn session(&self, opened: Opened, identity: &str, slot: Slot) -> anyhow::Result<()> {
        let Opened {
            link,
            control_tx: mut send,
            control_rx: mut recv,
            mut inbound,
            dns_queries,
        } = opened;
        let remote = link.remote();
        // Datagrams sent before the welcome are read and dropped while the hello is awaited.
        let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            tokio::select! {
                h = recv.recv() => h,
                never = inbound.discard(&self.shared.limits) => match never {},
            }
        })
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
        let mut offers = self.offer.subscribe();
        let offer = offers.borrow_and_update().clone();
        let claimed = self
            .advertised
            .claim(identity, link.id(), &advertise, &offer.routes)
            .await;
        let advertised = match claimed {
            Ok(a) => a,
            Err(reason) => {
                self.shared.limits.bump("advertise_refused");
                self.refuse(&link, &mut send, identity, reason).await;
                return Ok(());
            }
        };
        let mut owns = vec![
            IpNet::from(IpAddr::V4(address_v4)),
            IpNet::from(IpAddr::V6(address_v6)),
        ];
        owns.extend(&advertised);
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
        link.welcomed();
        drop(slot);
        let reason = match (&link, transport_reason) {
            (_, Some(r)) => format!("client: {}", clean(&r, PEER_TEXT)),
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
            advertised,
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
        let share = super::dns_serve::PeerDns::new(self.shared.limits.clone(), Instant::now());
        let dns_requests = async {
            match (&self.forwarder, &link, dns_queries) {
                (Some(f), Link::Quic(conn), _) => {
                    super::dns_serve::serve_streams(conn.clone(), f.clone(), share).await
                }
                (Some(f), Link::Tcp(t), Some(q)) => {
                    super::dns_serve::serve_frames(t.clone(), q, f.clone(), share).await;
                    Ok(())
                }
                _ => std::future::pending().await,
            }
        };
        let tally = self.shared.limits.clone();
        tokio::select! {
            r = self.pump_from_peer(&peer, &mut inbound) => r,
            r = answer_keepalives(send, recv, offers, tally) => r,
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

/// One packet from the TUN; `None` (and a status that says why) if the TUN is gone.
pub(super) async fn read_tun(shared: &Shared, tun: &AsyncDevice, buf: &mut [u8]) -> Option<usize> {
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
pub(super) enum Sent {
    Ok,
    TooBig,
    Dropped,
}

/// Clamps a SYN's MSS to what one datagram carries, then sends the packet as a datagram.
pub(super) fn send_to(shared: &Shared, link: &Link, counters: &Counters, pkt: &mut [u8]) -> Sent {
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
pub(super) async fn answer_too_big(
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
pub(super) async fn ping_peers(shared: Arc<Shared>) {
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
pub(super) async fn follow_mtu(shared: Arc<Shared>, netlink: rtnetlink::Handle, index: u32) {
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
pub(super) fn nth_v4(net: Ipv4Net, n: u32) -> Option<Ipv4Addr> {
    let size = 1u64 << (32 - u32::from(net.prefix_len()));
    if u64::from(n) >= size.saturating_sub(1) {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(net.network()).wrapping_add(n)))
}

pub(super) fn nth_v6(net: Ipv6Net, n: u32) -> Ipv6Addr {
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
    fn failed_handshakes_never_push_out_refusals_of_authenticated_peers() {
        let shared = shared("connector", "gwtun", "listening");
        let remote: SocketAddr = "198.51.100.10:40000".parse().expect("addr");
        for i in 0..3 {
            shared.refuse(
                Some(format!("ops-{i}")),
                remote,
                "no [[policy]] entry".into(),
            );
        }
        for _ in 0..1000 {
            shared.handshake_failed(remote, "timed_out", "handshake (TCP) timed out".into());
        }
        let t = shared.status();
        let named = t.refusals.iter().filter(|r| r.identity.is_some()).count();
        assert_eq!(named, 3, "{:?}", t.refusals);
        assert_eq!(t.refusals.len(), 3 + MAX_HANDSHAKE_FAILURES);
        assert_eq!(t.handshake_failures.get("timed_out"), Some(&1000));
    }

    #[test]
    fn what_a_peer_says_is_escaped_and_cut_as_it_comes_in() {
        let shared = shared("connector", "gwtun", "listening");
        let remote: SocketAddr = "198.51.100.10:40000".parse().expect("addr");
        let hostile = format!("x\nrefused: forged\u{1b}[2J{}", "y".repeat(65_536));
        shared.refuse(Some("ops-\u{1b}]0;x".into()), remote, hostile.clone());
        shared.set_state(hostile);
        let t = shared.status();
        let r = &t.refusals[0];
        assert!(
            r.reason.starts_with("x\\nrefused: forged\\u{1b}[2J"),
            "{}",
            r.reason
        );
        assert_eq!(r.reason.chars().count(), PEER_TEXT);
        assert_eq!(r.identity.as_deref(), Some("ops-\\u{1b}]0;x"));
        assert!(!t.state.chars().any(char::is_control));
        assert!(t.state.chars().count() <= 2 * PEER_TEXT);
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
