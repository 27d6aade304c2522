//! Starting a hub: a QUIC endpoint and a TLS-over-TCP listener on one port (ALPN
//! `gateway-hub/1`, a certificate from the CA required of every peer), and the hub's driver.
//! No TUN, no routes, no NAT: a hub forwards sealed datagrams and nothing else.

use super::*;
use crate::tunnel::hub_server::HubServer;
use crate::tunnel::hub_wire::{HUB_ALPN, RelayThread, outer_transport};

pub(super) async fn start(cfg: &Tunnel, listen: SocketAddr) -> anyhow::Result<TunnelHandle> {
    let trust = tls::Trust::load(&cfg.tls)?;
    let mut rustls = (*trust.server_config(&cfg.tls)?).clone();
    rustls.alpn_protocols = vec![HUB_ALPN.to_vec()];
    let rustls = Arc::new(rustls);
    let tcp_listen = SocketAddr::new(listen.ip(), cfg.fallback_port.unwrap_or(listen.port()));
    let relay = RelayThread::start("hub-relay")?;
    // Sockets, quinn's drivers and the relay tasks all on the relay's thread.
    let entered = relay.handle.enter();
    let endpoint = if cfg.transport.uses_quic() {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(rustls.clone())
            .map_err(|e| anyhow!("QUIC crypto: {e}"))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(outer_transport()));
        server.max_incoming(2 * slots::MAX_PENDING);
        Some(
            // Big socket buffers as on the tunnel's ends: every relayed packet crosses twice.
            std::net::UdpSocket::bind(listen)
                .and_then(|socket| demux_endpoint(socket, Some(server)))
                .with_context(|| format!("listening on UDP {listen}"))?,
        )
    } else {
        None
    };
    let tcp = if cfg.transport.uses_tcp() {
        Some(
            std::net::TcpListener::bind(tcp_listen)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                })
                .with_context(|| format!("listening on TCP {tcp_listen}"))?,
        )
    } else {
        None
    };
    drop(entered);
    let listening = crate::tunnel::hub_server::describe(listen, tcp_listen);
    let shared = Shared::new(StatusRole::Hub, "", &listening);
    // `relay = false`: nobody is offered relayed packets; any that come are dropped.
    let relaying = endpoint.as_ref().map(|(_, s)| s).filter(|_| cfg.relay);
    let hub = HubServer::new(shared.clone(), relaying);
    let endpoint = endpoint.map(|(ep, _)| ep);
    if let Ok(mut h) = shared.hub.lock() {
        // Weak: the hub's tables hold `shared`, which must not hold them back.
        let view = Arc::downgrade(&hub);
        *h = Some(Arc::new(move || {
            view.upgrade().map(|h| h.status()).unwrap_or_default()
        }));
    }
    let mut tasks = JoinSet::new();
    if let Some(ep) = endpoint.clone() {
        tasks.spawn_on(hub.clone().accept_quic(ep), &relay.handle);
    }
    if let Some(l) = tcp {
        tasks.spawn_on(
            hub.clone()
                .accept_tcp(l, tokio_rustls::TlsAcceptor::from(rustls)),
            &relay.handle,
        );
    }
    relay.keep_in(&mut tasks);
    tracing::info!(%listening, "hub up");
    Ok(TunnelHandle {
        shared,
        tasks,
        endpoint,
        sysctls: Vec::new(),
        nat_table: None,
        trust,
        connector: None,
        resolved: None,
        hub: Some(hub),
    })
}
