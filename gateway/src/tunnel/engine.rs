//! The tunnel's composition root: what each role needs set up (TUN, sysctls, the nftables
//! table, listeners or the client's endpoint, the DNS forwarder), the tasks that drive its node,
//! and the handle the daemon holds to reload, revoke and stop it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use quinn::{Endpoint, TransportConfig, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tun_rs::AsyncDevice;

use super::access_server::AccessServer;
use super::connector::{self, Accept};
use super::dial::Dialer;
use super::link::Side;
use super::links::Packets;
use super::peer_routes::Learned;
use super::status::{Role as StatusRole, Shared};
use super::stub::{self, Relays};
use super::{client, control, datapath, dns, nat, net, status, tls};
use crate::config::{PolicyEntry, Role, Tunnel};
use crate::core::advertise::Grants;
use crate::core::policy::Policy;
use crate::node::datapath::Datapath;
use crate::node::{self, ClientConfig, ConnectorConfig};

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
            Role::Connector { .. } => None,
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
        let policy = Arc::new(policy_of(&cfg.policy));
        c.policy.store(policy.clone());
        let zones = cfg.zones.iter().map(|z| z.domain.clone()).collect();
        let next = connector_config(cfg, routes, zones, policy);
        if c.inbox.try_send(connector::Input::Reload(next)).is_err() {
            tracing::error!("the connector's node is not taking inputs; reload not applied");
        }
    }

    pub async fn stop(mut self) {
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

fn policy_of(entries: &[PolicyEntry]) -> Policy {
    Policy::with_inbound(
        &entries
            .iter()
            .map(|p| (p.identity.clone(), p.allow.clone(), p.inbound.clone()))
            .collect::<Vec<_>>(),
    )
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
/// opens one control stream and one stream per DNS query, never a unidirectional one; a
/// connector opens no streams at all.
fn transport(side: Side) -> TransportConfig {
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

/// Undoes what a start did before it failed.
fn undo(table: Option<&String>, sysctls: &mut Vec<(String, String)>) {
    if let Some(t) = table {
        let _ = nat::remove(t);
    }
    net::restore(sysctls);
}

async fn start_connector(
    cfg: &Tunnel,
    listen: SocketAddr,
    routes: Vec<IpNet>,
) -> anyhow::Result<TunnelHandle> {
    let trust = tls::Trust::load(&cfg.tls)?;
    let mut sysctls = Vec::new();
    let table = cfg.egress.as_ref().map(|e| e.table.clone());
    let tcp_listen = SocketAddr::new(listen.ip(), cfg.fallback_port.unwrap_or(listen.port()));
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
        server.max_incoming(2 * connector::MAX_PENDING);
        server.incoming_buffer_size(64 << 10);
        server.incoming_buffer_size_total(8 << 20);
        let (tun, index, handle) = create_tun(&cfg.tun).await?;
        let own_v4 = node::leases::nth_v4(cfg.overlay_v4, 1).context("overlay too small")?;
        let own_v6 = node::leases::nth_v6(cfg.overlay_v6, 1).context("overlay too small")?;
        net::add_address(&handle, index, own_v4.into(), cfg.overlay_v4.prefix_len()).await?;
        net::add_address(&handle, index, own_v6.into(), cfg.overlay_v6.prefix_len()).await?;
        let endpoint = match cfg.transport.uses_quic() {
            true => Some(
                Endpoint::server(server, listen)
                    .with_context(|| format!("listening on UDP {listen}"))?,
            ),
            false => None,
        };
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
            undo(table.as_ref(), &mut sysctls);
            return Err(e);
        }
    };
    let listening = match (&endpoint, &tcp) {
        (Some(_), Some(_)) => {
            format!("listening on {listen} (QUIC) and {tcp_listen} (TCP fallback)")
        }
        (Some(_), None) => format!("listening on {listen} (QUIC only)"),
        (None, Some(_)) => format!("listening on {tcp_listen} (TCP only)"),
        (None, None) => "listening on nothing".into(),
    };
    let shared = Shared::new(StatusRole::Connector, &cfg.tun, &listening);
    let mut tasks = JoinSet::new();
    let forwarder = if cfg.zones.is_empty() {
        None
    } else {
        let ports = cfg.egress.as_ref().map(|e| e.ports);
        match dns::Forwarder::start(&cfg.zones, ports, &mut tasks, shared.limits.clone()).await {
            Ok(f) => Some(f),
            Err(e) => {
                tasks.shutdown().await;
                undo(table.as_ref(), &mut sysctls);
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
        *f = Some((e.table.clone(), firewall_holds(cfg, e, listen, tcp_listen)));
    }
    let policy = Arc::new(policy_of(&cfg.policy));
    let zones = cfg.zones.iter().map(|z| z.domain.clone()).collect();
    let node = node::Connector::new(
        connector_config(cfg, routes, zones, policy.clone()),
        shared.drops.clone(),
        shared.limits.clone(),
    );
    let policy = Arc::new(ArcSwap::new(policy));
    let datapath = Arc::new(ArcSwap::from_pointee(Datapath::new(shared.drops.clone())));
    let (inbox, inputs) = mpsc::channel(INBOX);
    let (events_tx, events) = mpsc::channel(INBOX);
    let (paths_tx, paths) = mpsc::channel(INBOX);
    let packets = Packets {
        datapath: datapath.clone(),
        tun: tun.clone(),
        limits: shared.limits.clone(),
    };
    let nofile = connector::nofile_limit();
    let access = Arc::new(AccessServer {
        shared: shared.clone(),
        policy: policy.clone(),
        forwarder: forwarder.clone(),
        egress_ports: cfg.egress.as_ref().map(|e| e.ports),
        trust: trust.clone(),
        nofile,
    });
    let accept = Arc::new(Accept {
        shared: shared.clone(),
        slots: Accept::new_slots(),
        nofile,
        inbox: inbox.clone(),
        events: events_tx,
        packets,
        forwarder: forwarder.clone(),
        access,
    });
    let task = connector::Task {
        node,
        shared: shared.clone(),
        datapath: datapath.clone(),
        netlink: handle,
        tun_index: index,
        filter: cfg
            .egress
            .as_ref()
            .map(|e| nat::SessionFilter::new(&e.table)),
        policy: policy.clone(),
        inbox: inbox.clone(),
        outs: Default::default(),
        slots: Default::default(),
        up: Default::default(),
        version: 0,
        epoch: (Instant::now(), status::now_unix()),
    };
    tasks.spawn(task.run(inputs, events, paths));
    tasks.spawn(datapath::from_tun(shared.clone(), tun, datapath, None));
    tasks.spawn(datapath::follow_paths(shared.clone(), paths_tx));
    tasks.spawn(status::ping_peers(shared.clone()));
    if let Some(ep) = endpoint.clone() {
        tasks.spawn(accept.clone().quic(ep));
    }
    if let Some((listener, acceptor)) = tcp {
        tasks.spawn(accept.tcp(listener, acceptor));
    }
    Ok(TunnelHandle {
        shared,
        tasks,
        endpoint,
        sysctls,
        nat_table: table,
        trust,
        connector: Some(ConnectorParts {
            inbox,
            policy,
            forwarder,
        }),
    })
}

/// What the connector's nftables table was made to hold, for status.
fn firewall_holds(
    cfg: &Tunnel,
    e: &crate::config::Egress,
    listen: SocketAddr,
    tcp_listen: SocketAddr,
) -> String {
    let mut accepts = Vec::new();
    if cfg.transport.uses_quic() {
        accepts.push(format!("udp/{}", listen.port()));
    }
    if cfg.transport.uses_tcp() {
        accepts.push(format!("tcp/{}", tcp_listen.port()));
    }
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
    )
}

async fn start_client(
    cfg: &Tunnel,
    connect: Vec<String>,
    server_name: String,
    source_port: u16,
    on_routes: super::RoutesHook,
) -> anyhow::Result<TunnelHandle> {
    let trust = tls::Trust::load(&cfg.tls)?;
    let mut sysctls = Vec::new();
    let mut client_filter = None;
    let result = async {
        if !cfg.lan.is_empty() || !cfg.advertise.is_empty() {
            // A site gateway forwards its LAN's replies from the TUN to the LAN.
            net::sysctl_change("net.ipv4.ip_forward", "1", &mut sysctls)?;
            net::sysctl_change("net.ipv6.conf.all.forwarding", "1", &mut sysctls)?;
        }
        client_filter = nat::apply_site_gateway(cfg, &sysctls)?;
        let crypto = trust.quic_client(&cfg.tls, tls::ALPN)?;
        let tcp_tls = trust.client_config(&cfg.tls, tls::ALPN)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport(Side::Client)));
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
        let stub = match cfg.dns_stub {
            Some(addr) => Some(
                tokio::net::UdpSocket::bind(addr)
                    .await
                    .map_err(|e| anyhow!("binding the DNS stub to {addr}: {e}"))?,
            ),
            None => None,
        };
        anyhow::Ok((tun, index, handle, endpoint, tcp_tls, stub))
    }
    .await;
    let (tun, index, handle, endpoint, tcp_tls, stub) = match result {
        Ok(v) => v,
        Err(e) => {
            undo(cfg.client_table.as_ref(), &mut sysctls);
            return Err(e);
        }
    };
    let shared = Shared::new(StatusRole::Client, &cfg.tun, "connecting");
    if let Ok(mut f) = shared.firewall.lock() {
        *f = client_filter;
    }
    let datapath = Arc::new(ArcSwap::from_pointee(Datapath::new(shared.drops.clone())));
    let (current_tx, current_rx) = watch::channel(None);
    let relays = Relays::new(current_rx, shared.limits.clone(), shared.drops.clone());
    let mut tasks = JoinSet::new();
    if let Some(socket) = stub {
        tracing::info!(stub = ?cfg.dns_stub, "DNS stub listening for the connector's zones");
        tasks.spawn(stub::serve_stub(Arc::new(socket), relays.clone()));
    }
    let node = node::Client::new(
        ClientConfig {
            targets: connect,
            server_name: server_name.clone(),
            transport: cfg.transport,
            quic_timeout: cfg.quic_timeout,
            advertise: cfg.advertise.clone(),
        },
        shared.drops.clone(),
        Instant::now(),
        rand::random(),
    );
    let dialer = Arc::new(Dialer {
        endpoint: endpoint.clone(),
        tcp: tokio_rustls::TlsConnector::from(tcp_tls),
        server_name,
        source_port,
        fallback_port: cfg.fallback_port,
        limits: shared.limits.clone(),
    });
    let (inbox, inputs) = mpsc::channel(INBOX);
    let (events_tx, events) = mpsc::channel(INBOX);
    let (paths_tx, paths) = mpsc::channel(INBOX);
    let task = client::Task {
        node,
        shared: shared.clone(),
        datapath: datapath.clone(),
        dialer,
        learned: Learned::new(handle, index),
        tun_index: index,
        on_routes,
        relays: relays.clone(),
        current: current_tx,
        inbox,
        events: events_tx,
        packets: Packets {
            datapath: datapath.clone(),
            tun: tun.clone(),
            limits: shared.limits.clone(),
        },
        outs: Default::default(),
        dials: Default::default(),
        up: None,
        version: 0,
        epoch: (Instant::now(), status::now_unix()),
        mtu: 0,
    };
    tasks.spawn(task.run(inputs, events, paths));
    tasks.spawn(datapath::from_tun(
        shared.clone(),
        tun,
        datapath,
        Some(relays),
    ));
    tasks.spawn(datapath::follow_paths(shared.clone(), paths_tx));
    tasks.spawn(status::ping_peers(shared.clone()));
    Ok(TunnelHandle {
        shared,
        tasks,
        endpoint,
        sysctls,
        nat_table: cfg.client_table.clone(),
        trust,
        connector: None,
    })
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
