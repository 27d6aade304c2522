//! A client's session through a hub: the outer link to the hub (QUIC from the pinned port, or
//! TLS over TCP, as the dial plan says), the hub's answer naming the replica, and then the
//! same end-to-end QUIC session a direct link has, run over a [`VirtualSocket`] whose
//! datagrams ride the outer link. What the client driver gets is an ordinary QUIC [`Link`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;

use super::hub_wire::{self, HubMsg, In, OuterTx};
use super::link::{Opened, Side};
use super::net::{canonical, tcp_connect};
use super::raw::{self, DemuxSocket, Divert, RawFlow};
use super::tls;
use super::vsock::{Route, VirtualSocket};
use crate::node::LinkKind;
use crate::node::drops::{Drop, Drops};
use crate::pki::{CertInfo, Profile};

/// What a client needs to go through hubs.
pub struct ViaHub {
    pub group: Option<String>,
    /// The outer link's QUIC settings (ALPN `gateway-hub/1`).
    pub outer_quic: quinn::ClientConfig,
    pub outer_tcp: tokio_rustls::TlsConnector,
    /// The end-to-end session's QUIC settings (ALPN `gateway/1`, inner MTU).
    pub inner: quinn::ClientConfig,
}

/// What the client's dialler lends a dial through a hub.
pub struct From<'a> {
    pub endpoint: Option<&'a quinn::Endpoint>,
    /// The name the connector's certificate must carry (the group's, by default).
    pub server_name: &'a str,
    pub source_port: u16,
    pub fallback_port: Option<u16>,
    /// The endpoint's socket and its relayed sessions, when it carries relayed packets.
    pub raw: Option<&'a Arc<RawEnd>>,
}

/// A client's relayed sessions: the hub's address and the flow name a session, the token
/// must match, and what arrives goes into that session's virtual socket.
pub struct RawEnd {
    pub socket: Arc<DemuxSocket>,
    sessions: RwLock<HashMap<(SocketAddr, u32), Session>>,
    drops: Arc<Drops>,
}

struct Session {
    token: u64,
    /// The address the inner endpoint knows the hub by.
    remote: SocketAddr,
    inner: Weak<VirtualSocket>,
}

impl RawEnd {
    /// The relayed sessions of the endpoint over `socket`; it hands them what arrives.
    pub fn attach(socket: Arc<DemuxSocket>, drops: Arc<Drops>) -> Arc<RawEnd> {
        let end = Arc::new(RawEnd {
            socket: socket.clone(),
            sessions: RwLock::new(HashMap::new()),
            drops,
        });
        let divert: Weak<dyn Divert> = Arc::downgrade(&end) as Weak<RawEnd>;
        socket.set_divert(divert);
        end
    }
}

impl Divert for RawEnd {
    fn divert(&self, _: &DemuxSocket, from: SocketAddr, stride: usize, run: &[u8]) {
        let end = self;
        let Ok(sessions) = end.sessions.read() else {
            return;
        };
        let from = canonical(from);
        for seg in raw::segments(run, stride) {
            let Some((f, d)) = seg else {
                end.drops.count(Drop::RelayMalformed);
                continue;
            };
            match sessions.get(&(from, f.flow)) {
                None => end.drops.count(Drop::RelayUnknownFlow),
                Some(s) if s.token != f.token => end.drops.count(Drop::RelayBadToken),
                Some(s) => {
                    if let Some(inner) = s.inner.upgrade() {
                        inner.push(s.remote, Bytes::copy_from_slice(d));
                    }
                }
            }
        }
    }
}

/// Takes a session out of [`RawEnd`] when it ends.
struct Unregister(Weak<RawEnd>, (SocketAddr, u32));

impl std::ops::Drop for Unregister {
    fn drop(&mut self) {
        if let Some(end) = self.0.upgrade()
            && let Ok(mut s) = end.sessions.write()
        {
            s.remove(&self.1);
        }
    }
}

/// A relayed session's packets: straight to the hub's address on the endpoint's socket.
struct RawToHub {
    socket: Arc<DemuxSocket>,
    to: SocketAddr,
    flow: RawFlow,
}

impl Route for RawToHub {
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> bool {
        self.send_batch(to, datagram, datagram.len()) == 0
    }

    fn send_batch(&self, _to: SocketAddr, contents: &[u8], segment: usize) -> u64 {
        raw::send_inner(&self.socket, self.to, self.flow, contents, segment)
    }

    fn max_segments(&self) -> usize {
        self.socket
            .max_transmit_segments()
            .clamp(1, raw::END_SEGMENTS)
    }
}

/// Every datagram of the inner session goes to the one outer link.
struct ToHub(OuterTx);

impl Route for ToHub {
    fn send(&self, _to: SocketAddr, datagram: &[u8]) -> bool {
        self.0.send_datagram(&[], datagram)
    }
}

/// The host part of `HOST:PORT`: the name the hub's certificate must carry.
fn host_of(target: &str) -> &str {
    target
        .rsplit_once(':')
        .map_or(target, |(h, _)| h)
        .trim_matches(['[', ']'])
}

impl ViaHub {
    /// Through the hubs of `group`: the outer link's TLS and QUIC (ALPN `gateway-hub/1`), and
    /// the end-to-end session's with `inner_alpn` and transport `inner`, whose packets must fit
    /// an outer datagram (its MTU search stops at [`hub_wire::INNER_MAX_UDP`]).
    pub fn new(
        trust: &Arc<tls::Trust>,
        paths: &crate::config::TlsPaths,
        group: &str,
        inner_alpn: &[u8],
        mut inner: quinn::TransportConfig,
    ) -> Result<ViaHub, tls::TlsError> {
        use hub_wire::{HUB_ALPN, INNER_MAX_UDP, outer_transport};
        let mut outer_quic =
            quinn::ClientConfig::new(Arc::new(trust.quic_client(paths, HUB_ALPN)?));
        outer_quic.transport_config(Arc::new(outer_transport()));
        // The whole search replaces the tunnel's: its black-hole cooldown is set again, or a
        // burst of loss through the hub would keep big packets out for quinn's minute.
        let mut mtud = quinn::MtuDiscoveryConfig::default();
        mtud.upper_bound(INNER_MAX_UDP);
        mtud.black_hole_cooldown(super::link::BLACK_HOLE_COOLDOWN);
        inner.mtu_discovery_config(Some(mtud));
        let mut inner_quic =
            quinn::ClientConfig::new(Arc::new(trust.quic_client(paths, inner_alpn)?));
        inner_quic.transport_config(Arc::new(inner));
        Ok(ViaHub {
            group: Some(group.to_string()),
            outer_quic,
            outer_tcp: tokio_rustls::TlsConnector::from(trust.client_config(paths, HUB_ALPN)?),
            inner: inner_quic,
        })
    }

    /// A tunnel link through the hub at `target`: the session, and its control stream.
    pub async fn open(
        &self,
        d: &From<'_>,
        target: &str,
        addr: SocketAddr,
        kind: LinkKind,
    ) -> anyhow::Result<Opened> {
        let conn = self.session(d, target, addr, kind).await?;
        let control = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                conn.close(1u32.into(), b"no control stream");
                return Err(e.into());
            }
        };
        Ok(Opened::quic(conn, control, Side::Client, Some(kind)))
    }

    /// The end-to-end QUIC session (with `self.inner`'s ALPN) with the connector the hub at
    /// `target` assigns, checked to be a connector. The outer link lives as long as it does.
    pub async fn session(
        &self,
        d: &From<'_>,
        target: &str,
        addr: SocketAddr,
        kind: LinkKind,
    ) -> anyhow::Result<quinn::Connection> {
        let host = host_of(target);
        let (tx, mut rx) = match kind {
            LinkKind::Quic => {
                let endpoint = d
                    .endpoint
                    .ok_or_else(|| anyhow!("QUIC is off (transport = \"tcp\")"))?;
                let conn = endpoint
                    .connect_with(self.outer_quic.clone(), addr, host)?
                    .await
                    .with_context(|| format!("QUIC to the hub {addr}"))?;
                let (send, recv) = conn.open_bi().await?;
                hub_wire::start_quic(conn, send, recv)
            }
            LinkKind::Tcp => {
                let addr = SocketAddr::new(addr.ip(), d.fallback_port.unwrap_or(addr.port()));
                let stream = tcp_connect(addr, d.source_port).await?;
                let name = rustls_pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| anyhow!("hub name {host:?}: {e}"))?;
                let stream = self
                    .outer_tcp
                    .connect(name, stream)
                    .await
                    .with_context(|| format!("TLS over TCP to the hub {addr}"))?;
                hub_wire::start_tcp(stream, addr)
            }
        };
        // Relayed packets only beside an outer QUIC link: they take its 5-tuple.
        let relay = d.raw.filter(|_| kind == LinkKind::Quic);
        tx.send_control(&HubMsg::Client {
            group: self.group.clone(),
            raw: relay.is_some(),
        })
        .await?;
        let flow = match hub_wire::first_control(&mut rx, Duration::from_secs(5)).await {
            Ok(HubMsg::Assigned { connector, raw }) => {
                tracing::info!(hub = %addr, %connector, transport = kind.name(), relayed = raw.is_some(), "the hub relays this session");
                raw
            }
            Ok(HubMsg::Refused { reason }) => {
                tx.close("refused");
                bail!(
                    "the hub refused: {}",
                    crate::core::text::clean(&reason, 200)
                );
            }
            Ok(other) => {
                tx.close("unexpected");
                bail!("the hub answered {other:?}");
            }
            Err(e) => {
                tx.close("no answer");
                bail!("the hub: {e}");
            }
        };
        // The inner session sees the hub's address as its peer's: status shows through which
        // hub, and the routes learned never cover it.
        let remote = tx.remote;
        let local: IpAddr = match remote {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let relayed = match (relay, flow, tx.quic_remote()) {
            (Some(end), Some(flow), Some(to)) => Some((end, flow, to)),
            _ => None,
        };
        let route: Box<dyn Route> = match relayed {
            Some((end, flow, to)) => Box::new(RawToHub {
                socket: end.socket.clone(),
                to,
                flow,
            }),
            None => Box::new(ToHub(tx.clone())),
        };
        let socket = VirtualSocket::new(SocketAddr::new(local, 0), route);
        // Registered for as long as this function's session lives (the guard below).
        let registered = relayed.map(|(end, flow, to)| {
            let key = (canonical(to), flow.flow);
            if let Ok(mut s) = end.sessions.write() {
                s.insert(
                    key,
                    Session {
                        token: flow.token,
                        remote,
                        inner: Arc::downgrade(&socket),
                    },
                );
            }
            Unregister(Arc::downgrade(end), key)
        });
        let mut config = quinn::EndpointConfig::default();
        config
            .max_udp_payload_size(hub_wire::INNER_MAX_UDP)
            .map_err(|e| anyhow!("inner endpoint: {e}"))?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            config,
            None,
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        let pump_socket = socket.clone();
        let pump = tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                if let In::Datagram(d) = item {
                    pump_socket.push(remote, d);
                }
            }
        });
        let inner = async {
            let conn = endpoint
                .connect_with(self.inner.clone(), remote, d.server_name)?
                .await
                .context("the end-to-end handshake through the hub")?;
            // A hub's certificate can pass as a server's: the end to end session must be
            // with a connector, whatever name a hub certificate might carry.
            let chain = tls::peer_chain(&conn).unwrap_or_default();
            let profile = chain
                .first()
                .and_then(|c| CertInfo::from_der(c).ok())
                .and_then(|i| Profile::of(&i));
            if profile != Some(Profile::Connector) {
                conn.close(1u32.into(), b"not a connector");
                bail!("the peer through the hub is not a connector");
            }
            anyhow::Ok(conn)
        }
        .await;
        let conn = match inner {
            Ok(v) => v,
            Err(e) => {
                pump.abort();
                tx.close("handshake failed");
                return Err(e);
            }
        };
        // Either end of the pair going takes the other with it.
        let watch = conn.clone();
        tokio::spawn(async move {
            let _keep = endpoint;
            let _registered = registered;
            tokio::select! {
                _ = watch.closed() => {}
                _ = pump => {
                    watch.close(0u32.into(), b"the hub link closed");
                }
            }
            tx.close("session ended");
        });
        Ok(conn)
    }
}
