//! Starting a connector: forwarding on, its TUN and overlay addresses, the QUIC endpoint and
//! TLS-over-TCP listener, source NAT and the forward filter, the DNS forwarder, and the tasks:
//! its node's, the accept loops, the TUN loop, path readings and pings.

use super::*;

pub(super) async fn start(
    cfg: &Tunnel,
    listen: Option<SocketAddr>,
    hubs: &[String],
    source_port: u16,
    routes: Vec<IpNet>,
) -> anyhow::Result<TunnelHandle> {
    let trust = tls::Trust::load(&cfg.tls)?;
    let mut sysctls = Vec::new();
    let table = cfg.egress.as_ref().map(|e| e.table.clone());
    let tcp_listen = listen.map(|l| SocketAddr::new(l.ip(), cfg.fallback_port.unwrap_or(l.port())));
    let advertised: Vec<String> = routes.iter().map(ToString::to_string).collect();
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
        server.max_incoming(2 * slots::MAX_PENDING);
        server.incoming_buffer_size(64 << 10);
        server.incoming_buffer_size_total(8 << 20);
        let (tun, index, handle) = create_tun(&cfg.tun).await?;
        let own_v4 = node::leases::nth_v4(cfg.overlay_v4, 1).context("overlay too small")?;
        let own_v6 = node::leases::nth_v6(cfg.overlay_v6, 1).context("overlay too small")?;
        net::add_address(&handle, index, own_v4.into(), cfg.overlay_v4.prefix_len()).await?;
        net::add_address(&handle, index, own_v6.into(), cfg.overlay_v6.prefix_len()).await?;
        let endpoint = match (cfg.transport.uses_quic(), listen) {
            (true, Some(listen)) => Some(
                std::net::UdpSocket::bind(listen)
                    .and_then(|socket| quic_endpoint(socket, Some(server.clone())))
                    .with_context(|| format!("listening on UDP {listen}"))?,
            ),
            _ => None,
        };
        let uplink = match hubs.is_empty() {
            true => None,
            false => Some(uplink(cfg, &trust, source_port, server)?),
        };
        let tcp = match (cfg.transport.uses_tcp(), tcp_listen) {
            (true, Some(tcp_listen)) => Some((
                tokio::net::TcpListener::bind(tcp_listen)
                    .await
                    .with_context(|| format!("listening on TCP {tcp_listen}"))?,
                tokio_rustls::TlsAcceptor::from(tcp_tls),
            )),
            _ => None,
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
                udp_port: listen.filter(|_| cfg.transport.uses_quic()).map(|l| l.port()),
                tcp_port: tcp_listen.filter(|_| cfg.transport.uses_tcp()).map(|l| l.port()),
            })?;
            tracing::info!(table = %e.table, interface = %e.interface, ports = ?e.ports, "source NAT into the VPC");
        }
        anyhow::Ok((tun, index, handle, endpoint, tcp, uplink))
    }
    .await;
    let (tun, index, handle, endpoint, tcp, uplink) = match result {
        Ok(v) => v,
        Err(e) => {
            undo(table.as_ref(), &mut sysctls);
            return Err(e);
        }
    };
    let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    let (l, t) = (show(listen), show(tcp_listen));
    let mut listening = match (&endpoint, &tcp) {
        (Some(_), Some(_)) => format!("listening on {l} (QUIC) and {t} (TCP fallback)"),
        (Some(_), None) => format!("listening on {l} (QUIC only)"),
        (None, Some(_)) => format!("listening on {t} (TCP only)"),
        (None, None) => "listening on nothing".into(),
    };
    if !hubs.is_empty() {
        listening = format!("{listening}; dialling hubs {}", hubs.join(", "));
    }
    let shared = Shared::new(StatusRole::Connector, &cfg.tun, &listening);
    // Hub i+1 of the uplinks is hubs[i] (`hub_wire::synthetic`).
    let _ = shared.hubs.set(hubs.to_vec());
    let mut tasks = JoinSet::new();
    let mut inner_endpoint = None;
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
    if let Some((u, inner_server)) = uplink {
        let socket = super::super::hub_uplink::start(
            super::super::hub_uplink::Uplinks {
                routes: advertised,
                drops: shared.drops.clone(),
                ..u
            },
            &mut tasks,
        );
        let mut config = quinn::EndpointConfig::default();
        if let Err(e) = config.max_udp_payload_size(super::super::hub_wire::INNER_MAX_UDP) {
            tracing::error!(error = %e, "inner endpoint payload size");
        }
        match Endpoint::new_with_abstract_socket(
            config,
            Some(inner_server),
            socket,
            Arc::new(quinn::TokioRuntime),
        ) {
            Ok(ep) => inner_endpoint = Some(ep),
            Err(e) => {
                tasks.shutdown().await;
                undo(table.as_ref(), &mut sysctls);
                return Err(anyhow!("the endpoint for sessions through hubs: {e}"));
            }
        }
    }
    let policy = Arc::new(crate::config::policy_of(&cfg.policy));
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
    let nofile = slots::nofile_limit();
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
        slots: Slots::new(shared.clone(), nofile),
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
        epoch: (Instant::now(), crate::sys::unix_now()),
    };
    tasks.spawn(task.run(inputs, events, paths));
    tasks.spawn(datapath::from_tun(shared.clone(), tun, datapath, None));
    tasks.spawn(datapath::follow_paths(shared.clone(), paths_tx));
    tasks.spawn(status::ping_peers(shared.clone()));
    if let Some(ep) = endpoint.clone() {
        tasks.spawn(accept.clone().quic(ep));
    }
    if let Some(ep) = inner_endpoint {
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
        resolved: None,
        hub: None,
    })
}

/// What the connector's nftables table was made to hold, for status.
fn firewall_holds(
    cfg: &Tunnel,
    e: &crate::config::Egress,
    listen: Option<SocketAddr>,
    tcp_listen: Option<SocketAddr>,
) -> String {
    let mut accepts = Vec::new();
    if let Some(l) = listen.filter(|_| cfg.transport.uses_quic()) {
        accepts.push(format!("udp/{}", l.port()));
    }
    if let Some(l) = tcp_listen.filter(|_| cfg.transport.uses_tcp()) {
        accepts.push(format!("tcp/{}", l.port()));
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
        crate::tunnel::filter::describe_connector(&cfg.tun, &e.interface)
    )
}

/// What dialling the hubs needs: an endpoint on the pinned source port, the outer TLS (ALPN
/// `gateway-hub/1`, the hub's certificate checked for its name), and the server config the
/// inner endpoint accepts relayed clients with (the same as a direct listener's).
fn uplink(
    cfg: &Tunnel,
    trust: &Arc<tls::Trust>,
    source_port: u16,
    server: quinn::ServerConfig,
) -> anyhow::Result<(super::super::hub_uplink::Uplinks, quinn::ServerConfig)> {
    use super::super::hub_wire::{HUB_ALPN, outer_transport};
    let Role::Connector { hubs, .. } = &cfg.role else {
        bail!("not a connector");
    };
    let mut quic = quinn::ClientConfig::new(Arc::new(trust.quic_client(&cfg.tls, HUB_ALPN)?));
    quic.transport_config(Arc::new(outer_transport()));
    let endpoint = if cfg.transport.uses_quic() {
        let socket = net::udp_dual_stack_std(source_port)
            .with_context(|| format!("binding UDP source port {source_port}"))?;
        Some(
            demux_endpoint(socket, None)
                .with_context(|| format!("a QUIC endpoint on UDP source port {source_port}"))?,
        )
    } else {
        None
    };
    let u = super::super::hub_uplink::Uplinks {
        hubs: hubs.clone(),
        group: cfg.group.clone().unwrap_or_else(|| "default".into()),
        routes: Vec::new(),
        transport: cfg.transport,
        quic_timeout: cfg.quic_timeout,
        source_port,
        fallback_port: cfg.fallback_port,
        endpoint,
        relay: cfg.relay,
        drops: Default::default(),
        quic,
        tcp: tokio_rustls::TlsConnector::from(trust.client_config(&cfg.tls, HUB_ALPN)?),
    };
    Ok((u, server))
}
