//! The tunnel's composition root: what each role needs set up (TUN, sysctls, the nftables
//! table, listeners or the client's endpoint, the DNS forwarder), the tasks that drive its node,
//! and the handle the daemon holds to reload, revoke and stop it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use quinn::{Endpoint, TransportConfig, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tun_rs::AsyncDevice;

use super::accept::Accept;
use super::access_server::AccessServer;
use super::connector;
use super::dial::Dialer;
use super::link::Side;
use super::links::Packets;
use super::peer_routes::Learned;
use super::slots::{self, Slots};
use super::status::{Role as StatusRole, Shared};
use super::stub::{self, Relays};
use super::{client, control, datapath, dns, nat, net, resolved, status, tls};
use crate::config::{PolicyEntry, Role, Tunnel};
use crate::core::advertise::Grants;
use crate::core::policy::Policy;
use crate::node::datapath::Datapath;
use crate::node::{self, ClientConfig, ConnectorConfig};

mod as_client;
mod as_connector;
mod as_hub;

/// UDP payload size QUIC starts with: its datagrams then hold 1362-byte packets, above IPv6's
/// 1280 minimum, so the TUN can carry IPv6 from the first packet. MTU discovery raises it.
const INITIAL_MTU: u16 = 1400;
/// Ceiling for MTU discovery on a 1500-byte path (1500 - 20 IPv4 - 8 UDP).
const MTU_CEILING: u16 = 1472;
const KEEPALIVE: Duration = Duration::from_secs(1);
/// A connector that vanished is noticed within this, and the client starts reconnecting.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const RESERVED_PORTS: &str = "net.ipv4.ip_local_reserved_ports";
/// QUIC streams a client may have open at once: its control stream and its DNS queries.
const CLIENT_STREAMS: u32 = 1 + node::forwarder::MAX_PER_PEER;
/// Unread bytes per QUIC stream from a client. A tunnel stream needs only a control message
/// or a query (16 KiB would do), but `gatewayctl access` streams carry bulk uploads on the same
/// endpoint (the ALPN is known only after the handshake): 256 KiB per round trip keeps scp
/// through `access` at several MB/s across a continent.
const CLIENT_STREAM_WINDOW: u32 = 256 << 10;
/// Unread bytes over all of a client's streams: what one connection can make the connector
/// buffer, whatever it opens.
const CLIENT_CONNECTION_WINDOW: u32 = 1 << 20;
/// What a client accepts per stream from its connector (a welcome or a large DNS answer) and
/// over all streams.
const CONNECTOR_STREAM_WINDOW: u32 = 2 * control::MAX_MESSAGE as u32;
const CONNECTOR_CONNECTION_WINDOW: u32 = 4 << 20;
/// Datagrams received and not yet read, per connection: 4 MiB is ~11 ms at 3 Gbit/s, enough to
/// ride out a busy runtime tick on two cores; only welcomed connections keep any.
const DATAGRAM_RECEIVE_BUFFER: usize = 4 << 20;
/// Clients a connector leases addresses to.
const MAX_CLIENTS: usize = 65_536;
/// Inputs, link events and path readings waiting for a node's task.
const INBOX: usize = 1024;

/// A running tunnel. Dropping it stops every task; the TUN device, and with it every route
/// through it, disappears when the last task holding it ends.
pub struct TunnelHandle {
    pub shared: Arc<Shared>,
    tasks: JoinSet<()>,
    /// `None` when the config says `transport = "tcp"`.
    endpoint: Option<Endpoint>,
    sysctls: Vec<(String, String)>,
    nat_table: Option<String>,
    /// The verifiers every handshake asks; a reload swaps them (a new CRL).
    trust: Arc<tls::Trust>,
    connector: Option<ConnectorParts>,
    /// Client: systemd-resolved's settings for the TUN, reverted first on stop.
    resolved: Option<resolved::Link>,
    /// Hub: its outer links, checked again when a reload brings a new CRL.
    hub: Option<Arc<super::hub_server::HubServer>>,
}

struct ConnectorParts {
    inbox: mpsc::Sender<connector::Input>,
    policy: Arc<ArcSwap<Policy>>,
    forwarder: Option<Arc<dns::Forwarder>>,
}

impl TunnelHandle {
    pub fn trust(&self) -> &Arc<tls::Trust> {
        &self.trust
    }

    /// Reads `[tls]` again (the CRL) without applying it, so a bad file changes nothing.
    pub fn prepare_trust(&self, cfg: &Tunnel) -> anyhow::Result<tls::Verifiers> {
        Ok(tls::Verifiers::build(&cfg.tls)?)
    }

    /// New handshakes are verified with `v` from now on, and every live link whose peer
    /// certificate `v` refuses (revoked since) is closed at once and listed as a refusal.
    /// Returns the identities closed.
    pub fn apply_trust(&self, cfg: &Tunnel, v: tls::Verifiers) -> Vec<String> {
        self.trust.install(v);
        let server_name = match &cfg.role {
            Role::Client { server_name, .. } => Some(server_name.as_str()),
            Role::Connector { .. } | Role::Hub { .. } => None,
        };
        let mut closed = Vec::new();
        for (_, identity, link) in self.shared.link_records() {
            let verdict = match (link.peer_chain(), server_name) {
                (None, _) => Err("no certificate kept to check against the new CRL".into()),
                (Some(chain), Some(name)) => self.trust.check_server(&chain, name),
                (Some(chain), None) => self.trust.check_client(&chain),
            };
            if let Err(reason) = verdict {
                link.close(4, &reason);
                self.shared
                    .refuse(Some(identity.clone()), link.remote(), reason);
                closed.push(identity);
            }
        }
        if let Some(hub) = &self.hub {
            closed.extend(hub.recheck(|chain| self.trust.check_client(chain)));
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
    /// connections and get the new routes and zones pushed, except a client the new policy no
    /// longer admits (its identity, or a prefix it advertises): its session is closed with the
    /// reason. A client's routes and zones come from its connector: nothing to apply there.
    pub fn reload(&self, cfg: &Tunnel, routes: Vec<IpNet>) {
        let Some(c) = &self.connector else {
            return;
        };
        if let Some(f) = &c.forwarder {
            f.set_zones(&cfg.zones);
        }
        let policy = Arc::new(crate::config::policy_of(&cfg.policy));
        c.policy.store(policy.clone());
        let zones = cfg.zones.iter().map(|z| z.domain.clone()).collect();
        let next = connector_config(cfg, routes, zones, policy);
        if c.inbox.try_send(connector::Input::Reload(next)).is_err() {
            tracing::error!("the connector's node is not taking inputs; reload not applied");
        }
    }

    pub async fn stop(mut self) {
        // While the TUN is there: resolved reverts only links it knows.
        if let Some(r) = self.resolved.take() {
            r.stop().await;
        }
        if let Some(e) = &self.endpoint {
            e.close(VarInt::from_u32(0), b"gatewayd stopping");
        }
        for (_, _, link) in self.shared.link_records() {
            link.close(0, "gatewayd stopping");
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

fn grants_of(entries: &[PolicyEntry]) -> Grants {
    Grants::new(
        entries
            .iter()
            .map(|p| (p.identity.clone(), p.advertise.clone())),
    )
}

fn connector_config(
    cfg: &Tunnel,
    routes: Vec<IpNet>,
    zones: Vec<String>,
    policy: Arc<Policy>,
) -> ConnectorConfig {
    ConnectorConfig {
        overlay_v4: cfg.overlay_v4,
        overlay_v6: cfg.overlay_v6,
        routes,
        zones,
        policy,
        grants: grants_of(&cfg.policy),
        max_clients: MAX_CLIENTS,
    }
}

/// QUIC settings for `side`: what the protocol needs from the other end and no more. A client
/// opens one control stream and one DNS channel (or, towards an older connector, a stream per
/// DNS query), never a unidirectional one; a
/// connector opens no streams at all.
fn transport(side: Side) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.initial_mtu(INITIAL_MTU);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MTU_CEILING);
    mtud.black_hole_cooldown(super::link::BLACK_HOLE_COOLDOWN);
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

/// Kernel buffers of a QUIC socket, each way: a burst of GSO batches from the other end, or a
/// runtime tick lost to the other tasks on a small machine, must not overflow them (an overflow
/// is a loss inside the tunnel, which the inner TCP pays for with a retransmit).
const UDP_BUFFER: usize = 7 << 20;

/// Sizes a QUIC socket's kernel buffers: `SO_*BUFFORCE` past `net.core.[rw]mem_max` when the
/// daemon may (CAP_NET_ADMIN), else as much as the limit allows. Too small a buffer costs speed
/// only, so a refusal is logged and the socket used as it is.
fn size_udp_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(UDP_BUFFER).unwrap_or(libc::c_int::MAX);
    let set = |opt: libc::c_int| {
        // SAFETY: setsockopt with a c_int value of the size passed, on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    };
    for (force, plain, name) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
    ] {
        if !set(force) && !set(plain) {
            let e = std::io::Error::last_os_error();
            tracing::warn!(error = %e, "could not size the QUIC socket's {name} buffer");
        }
    }
}

/// A QUIC endpoint on `socket`, its buffers sized first.
fn quic_endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<Endpoint> {
    size_udp_buffers(&socket);
    Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// An endpoint whose socket also carries a hub's relayed packets (tunnel/raw.rs).
fn demux_endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<(Endpoint, Arc<crate::tunnel::raw::DemuxSocket>)> {
    size_udp_buffers(&socket);
    crate::tunnel::raw::endpoint(socket, server)
}

async fn create_tun(name: &str) -> anyhow::Result<(Arc<AsyncDevice>, u32, rtnetlink::Handle)> {
    // Offload (IFF_VNET_HDR, TSO/USO): the kernel hands over super-packets and takes coalesced
    // ones, so the stacks on both sides of the TUN handle one 64 KB packet where they would
    // handle ~45 (`datapath` splits and coalesces).
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .offload(true)
        .build_async()
        .with_context(|| format!("creating TUN device {name}"))?;
    let handle = net::connect()?;
    let index = net::link_index(&handle, name).await?;
    // No router solicitations or MLD reports into the tunnel (NOTES-datapath.md).
    if let Err(e) = net::sysctl_set(&format!("net.ipv6.conf.{name}.addr_gen_mode"), "1") {
        tracing::warn!(error = %e, "could not disable IPv6 address generation on the TUN");
    }
    net::set_up(&handle, index, u32::from(INITIAL_MTU)).await?;
    // A super-packet must split into at most one read's worth of segments: the kernel
    // segments anything larger itself before it reaches the TUN (a LAN host's tiny MSS).
    let segs = rtnetlink::LinkUnspec::new_with_index(index)
        .append_extra_attribute(rtnetlink::packet_route::link::LinkAttribute::GsoMaxSegs(
            datapath::BATCH as u32,
        ))
        .build();
    if let Err(e) = handle.link().set(segs).execute().await {
        tracing::warn!(error = %e, "could not bound the TUN's segments per super-packet");
    }
    Ok((Arc::new(dev), index, handle))
}

/// Starts the tunnel for this node's role. `routes` are the prefixes a connector offers.
pub async fn start(
    cfg: &Tunnel,
    routes: Vec<IpNet>,
    on_routes: super::RoutesHook,
) -> anyhow::Result<TunnelHandle> {
    match &cfg.role {
        Role::Connector {
            listen,
            hubs,
            source_port,
        } => as_connector::start(cfg, *listen, hubs, *source_port, routes).await,
        Role::Hub { listen } => as_hub::start(cfg, *listen).await,
        Role::Client {
            connect,
            server_name,
            source_port,
        } => {
            as_client::start(
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

/// Undoes what a start did before it failed.
fn undo(table: Option<&String>, sysctls: &mut Vec<(String, String)>) {
    if let Some(t) = table {
        let _ = nat::remove(t);
    }
    net::restore(sysctls);
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
}
