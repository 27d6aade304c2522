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
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use super::dial::resolve;
use super::hub_wire::{self, FLOW_ID, HubMsg, In, OuterRx, OuterTx};
use super::net::tcp_connect;
use super::vsock::{Route, VirtualSocket};
use crate::config::Transport;
use crate::node::LinkKind;

const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const SYNTHETIC_PORT: u16 = 1;

/// The synthetic address of `flow` through hub number `hub`.
pub fn synthetic(hub: u16, flow: u32) -> SocketAddr {
    let ip = Ipv6Addr::new(0xfd68, hub, (flow >> 16) as u16, flow as u16, 0, 0, 0, 1);
    SocketAddr::new(ip.into(), SYNTHETIC_PORT)
}

/// The hub and flow a synthetic address stands for.
pub fn parse_synthetic(a: SocketAddr) -> Option<(u16, u32)> {
    let SocketAddr::V6(v6) = a else {
        return None;
    };
    let s = v6.ip().segments();
    if s[0] != 0xfd68 || s[4..] != [0, 0, 0, 1] || v6.port() != SYNTHETIC_PORT {
        return None;
    }
    Some((s[1], (u32::from(s[2]) << 16) | u32::from(s[3])))
}

type Links = Arc<RwLock<HashMap<u16, OuterTx>>>;

struct ToHubs(Links);

impl Route for ToHubs {
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> bool {
        let Some((hub, flow)) = parse_synthetic(to) else {
            return false;
        };
        let link = self.0.read().ok().and_then(|l| l.get(&hub).cloned());
        link.is_some_and(|l| l.send_datagram(&flow.to_be_bytes(), datagram))
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
    /// An endpoint on the source port (no server), `None` with `transport = "tcp"`.
    pub endpoint: Option<quinn::Endpoint>,
    pub quic: quinn::ClientConfig,
    pub tcp: tokio_rustls::TlsConnector,
}

/// The virtual socket for the inner endpoint, and the tasks that keep every hub link up.
pub fn start(u: Uplinks, tasks: &mut tokio::task::JoinSet<()>) -> Arc<VirtualSocket> {
    let links: Links = Arc::default();
    let local = synthetic(0, 0);
    let socket = VirtualSocket::new(local, Box::new(ToHubs(links.clone())));
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
                    let (tx, rx, kind) = link;
                    tracing::info!(%hub, transport = kind.name(), "linked to the hub");
                    if let Ok(mut l) = links.write() {
                        l.insert(index, tx.clone());
                    }
                    let moved = tokio::select! {
                        () = relay(rx, index, &socket) => None,
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
async fn probe_quic(u: &Uplinks, hub: &str, kind: LinkKind) -> (OuterTx, OuterRx, LinkKind) {
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

/// Datagrams from the hub into the inner endpoint, each under its flow's address.
async fn relay(mut rx: OuterRx, index: u16, socket: &VirtualSocket) {
    while let Some(item) = rx.recv().await {
        match item {
            In::Datagram(d) if d.len() > FLOW_ID => {
                let flow = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                socket.push(synthetic(index, flow), d.slice(FLOW_ID..));
            }
            // A flow that ended needs nothing here: its address is computed, its inner
            // connection times out.
            _ => {}
        }
    }
}

/// One outer link to `hub`, the steps of `plan` in turn, announced and welcomed.
async fn dial(
    u: &Uplinks,
    hub: &str,
    plan: &[crate::node::dial::Step],
) -> anyhow::Result<(OuterTx, OuterRx, LinkKind)> {
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
                    let ep = u.endpoint.as_ref().ok_or_else(|| anyhow!("QUIC is off"))?;
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
        })
        .await?;
        match hub_wire::first_control(&mut rx, Duration::from_secs(5)).await? {
            HubMsg::Welcome {} => return Ok((tx, rx, step.kind)),
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

    #[test]
    fn synthetic_addresses_name_hub_and_flow_and_nothing_else() {
        for (hub, flow) in [(1, 1), (7, 0x0102_0304), (u16::MAX, u32::MAX)] {
            assert_eq!(parse_synthetic(synthetic(hub, flow)), Some((hub, flow)));
        }
        assert_eq!(parse_synthetic("10.0.0.1:1".parse().expect("addr")), None);
        assert_eq!(
            parse_synthetic("[fd68:7562::1:0:1]:2".parse().expect("addr")),
            None
        );
        assert_eq!(
            parse_synthetic("[fd00::1:0:1]:1".parse().expect("addr")),
            None
        );
    }
}
