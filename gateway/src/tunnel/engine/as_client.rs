//! Starting a client: forwarding and the site gateway's filter where it has a LAN, its QUIC
//! endpoint on the pinned source port, its TUN, the DNS stub, and the tasks: its node's (which
//! dials), the TUN loop, path readings and pings.

use super::*;

/// Idle timeout of a client with replicas (several targets, or hubs): short enough that
/// after a replica dies, the next one carries traffic within 5 s (backoff and handshake
/// included); keepalives each second keep a live path well inside it.
const REPLICA_IDLE: Duration = Duration::from_secs(3);

pub(super) async fn start(
    cfg: &Tunnel,
    connect: Vec<String>,
    server_name: String,
    source_port: u16,
    on_routes: crate::tunnel::RoutesHook,
) -> anyhow::Result<TunnelHandle> {
    let trust = tls::Trust::load(&cfg.tls)?;
    // Asked before anything is set up; it changes nothing itself.
    let choice = resolved::choose(cfg.dns, cfg.dns_stub).await;
    // For resolved without a configured stub: loopback, a port the kernel picks (never
    // resolved's 127.0.0.53, and one per daemon).
    let stub_at = match cfg.dns_stub {
        Some(a) => Some(a),
        None if choice.on => Some(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0))),
        None => None,
    };
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
        let mut t = transport(Side::Client);
        if connect.len() > 1 {
            // Replicas: a connector that vanished is left for the next within REPLICA_IDLE.
            t.max_idle_timeout(REPLICA_IDLE.try_into().ok());
        }
        client.transport_config(Arc::new(t));
        let endpoint = if cfg.transport.uses_quic() {
            // Dual stack: connectors with IPv4 and IPv6 addresses alike, from one pinned port.
            let socket = net::udp_dual_stack_std(source_port)
                .with_context(|| format!("binding UDP source port {source_port}"))?;
            // Through hubs, the socket also carries relayed packets (tunnel/raw.rs).
            let (mut endpoint, demux) = if cfg.group.is_some() {
                let (ep, demux) = demux_endpoint(socket, None)
                    .with_context(|| format!("a QUIC endpoint on UDP source port {source_port}"))?;
                (ep, Some(demux))
            } else {
                let ep = quic_endpoint(socket, None)
                    .with_context(|| format!("a QUIC endpoint on UDP source port {source_port}"))?;
                (ep, None)
            };
            endpoint.set_default_client_config(client);
            (Some(endpoint), demux)
        } else {
            (None, None)
        };
        let (tun, index, handle) = create_tun(&cfg.tun).await?;
        let stub = match stub_at {
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
    let via_hub = match &cfg.group {
        None => None,
        Some(group) => match via_hub(cfg, &trust, group) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                undo(cfg.client_table.as_ref(), &mut sysctls);
                return Err(e);
            }
        },
    };
    let (tun, index, handle, endpoint, tcp_tls, stub) = match result {
        Ok(v) => v,
        Err(e) => {
            undo(cfg.client_table.as_ref(), &mut sysctls);
            return Err(e);
        }
    };
    let (endpoint, demux) = endpoint;
    let shared = Shared::new(StatusRole::Client, &cfg.tun, "connecting");
    if let Ok(mut f) = shared.firewall.lock() {
        *f = client_filter;
    }
    shared
        .through_hub
        .store(via_hub.is_some(), std::sync::atomic::Ordering::Relaxed);
    let datapath = Arc::new(ArcSwap::from_pointee(Datapath::new(shared.drops.clone())));
    let (current_tx, current_rx) = watch::channel(None);
    let relays = Relays::new(current_rx, shared.limits.clone(), shared.drops.clone());
    let mut tasks = JoinSet::new();
    let stub_local = stub.as_ref().and_then(|s| s.local_addr().ok());
    let resolved = resolved::Link::start(choice, index, stub_local, &shared);
    if let Some(socket) = stub {
        tracing::info!(stub = ?stub_local, "DNS stub listening for the connector's zones");
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
        hub: via_hub,
        raw: demux
            .filter(|_| cfg.relay)
            .map(|s| super::super::hub_dial::RawEnd::attach(s, shared.drops.clone())),
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
        resolved: resolved.as_ref().map(resolved::Link::zones),
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
        epoch: (Instant::now(), crate::sys::unix_now()),
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
        resolved,
        hub: None,
    })
}

/// A client whose targets are hubs: the tunnel's own session inside, with the replica idle
/// timeout.
fn via_hub(
    cfg: &Tunnel,
    trust: &Arc<tls::Trust>,
    group: &str,
) -> anyhow::Result<crate::tunnel::hub_dial::ViaHub> {
    let mut t = transport(Side::Client);
    t.max_idle_timeout(REPLICA_IDLE.try_into().ok());
    t.initial_mtu(INITIAL_MTU);
    Ok(crate::tunnel::hub_dial::ViaHub::new(
        trust,
        &cfg.tls,
        group,
        tls::ALPN,
        t,
    )?)
}
