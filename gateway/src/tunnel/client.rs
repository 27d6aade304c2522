//! The client's side of the tunnel: connect (QUIC, else TLS over TCP), hello, routes and zones
//! from the connector, packets both ways, reconnection with backoff, and the move back from TCP
//! to QUIC. Routes learned from the connector go through `peer_routes::Learned`: never a
//! default route, never over one of this host's own subnets, never replacing a route this
//! daemon did not create.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use quinn::Endpoint;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tun_rs::AsyncDevice;

use super::control::{Control, PROTOCOL_VERSION};
use super::engine::{
    Counters, HANDSHAKE_TIMEOUT, MAX_PACKET, Peer, Sent, Shared, TunnelHandle, answer_too_big,
    create_tun, follow_mtu, now_unix, nth_v4, nth_v6, ping_peers, read_tun, send_to, shared,
    transport,
};
use super::keepalive::send_keepalives;
use super::link::{ControlRx, ControlTx, Inbound, Link, Opened, Side, TcpLink};
use super::peer_routes::Learned;
use super::{dns, nat, net, tls};
use crate::config::{Transport, Tunnel};
use crate::core::packet;
use crate::core::text::{PEER_TEXT, clean};

/// A client on the TCP fallback tries QUIC again this often (with jitter).
const QUIC_PROBE_EVERY: Duration = Duration::from_secs(5);

pub(super) async fn start_client(
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
    let relays = Arc::new(tokio::sync::Semaphore::new(dns::MAX_RELAYS));
    tasks.spawn(tun_to_connector(
        shared.clone(),
        tun.clone(),
        current_rx,
        relays.clone(),
    ));
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
        learned: Learned::new(handle, index),
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
                    relays,
                    shared.limits.clone(),
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
        trust,
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
    learned: Learned,
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
                        let e = clean(&format!("{e:#}"), 2 * PEER_TEXT);
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
            control_rx: ControlRx::quic(recv, Side::Client),
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
            let tally = self.shared.limits.clone();
            anyhow::Ok(TcpLink::start(tls, fd, addr, Side::Client, tally))
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
            // The connector keeps no more than this of it; the hello must stay small.
            transport_reason: (!reason.is_empty()).then(|| clean(&reason, PEER_TEXT)),
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
                let reason = clean(&reason, PEER_TEXT);
                self.shared
                    .refuse(Some(self.server_name.clone()), addr, reason.clone());
                bail!("refused by the connector: {reason}");
            }
            other => bail!("unexpected answer to hello: {other:?}"),
        };
        let netlink = self.learned.netlink();
        net::add_address(netlink, self.tun_index, address_v4.into(), prefix_v4).await?;
        net::add_address(netlink, self.tun_index, address_v6.into(), prefix_v6).await?;
        let routes = self.install_routes(&routes, addr).await?;
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
            // The connector's certificate name; server_name may be the address it was dialled by.
            identity: link
                .peer_chain()
                .and_then(|c| tls::identity_of_chain(&c))
                .unwrap_or_else(|| self.server_name.clone()),
            link: link.clone(),
            transport_reason: Mutex::new(reason.clone()),
            ping: Mutex::new(None),
            address_v4,
            address_v6,
            owns: routes.clone(),
            advertised: Vec::new(),
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
        let node = clean(&node, crate::core::text::PEER_NAME);
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
        let result = loop {
            tokio::select! {
                r = &mut packets => break r.map(|()| None),
                r = &mut keepalives => break r.map(|()| None),
                quic = &mut probe => break Ok(Some(quic)),
                Some((new_routes, zones)) = offers.recv() => {
                    match self.apply_offer(addr, &new_routes, &zones).await {
                        Ok(installed) => {
                            tracing::info!(routes = ?installed, ?zones, "the connector changed its routes and zones");
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
        addr: SocketAddr,
        routes: &[IpNet],
        zones: &[String],
    ) -> anyhow::Result<Vec<IpNet>> {
        let routes = self.install_routes(routes, addr).await?;
        let zone_wires: Vec<Vec<u8>> = zones
            .iter()
            .filter_map(|d| crate::core::dns::wire_name(d).ok())
            .collect();
        (self.on_routes)(&routes, &zone_wires, self.tun_index)
            .context("loading routes into the classifier")?;
        if let Ok(mut z) = self.shared.learned_zones.lock() {
            *z = zone_wires;
        }
        Ok(routes)
    }

    /// Installs the connector's routes that may be installed; the others are logged, counted
    /// and listed with the refusals. Returns those in place.
    async fn install_routes(
        &self,
        routes: &[IpNet],
        addr: SocketAddr,
    ) -> anyhow::Result<Vec<IpNet>> {
        let (installed, skipped) = self.learned.sync(routes, addr.ip()).await?;
        for s in skipped {
            let reason = format!("learned route {} refused: {}", s.route, s.why);
            self.shared.limits.bump("learned_route_refused");
            self.shared
                .refuse(Some(self.server_name.clone()), addr, reason);
        }
        Ok(installed)
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
    relays: Arc<tokio::sync::Semaphore>,
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
            let Ok(permit) = relays.clone().try_acquire_owned() else {
                shared.limits.bump("dns_relay_busy");
                continue;
            };
            let (link, tun, shared) = (p.link.clone(), tun.clone(), shared.clone());
            tokio::spawn(async move {
                let _permit = permit;
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
