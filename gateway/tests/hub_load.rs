//! 100 client sessions at once through one hub (issue 13): a harness in the operator's
//! namespace opens lightweight sessions — each its own certificate, its own outer QUIC link to
//! the hub, and the end-to-end QUIC handshake and hello/welcome with the connector behind it —
//! and the hub relays them all while its resident memory stays under 100 MiB. Sessions are
//! opened at most [`OPENING`] at a time and all held open together: a hundred handshakes begun
//! in the same instant measure how fast a debug build's hub does TLS, not what it holds (a real
//! client whose hello is late dials again).

mod common;
#[path = "common/pair.rs"]
mod pair;
#[path = "hub/setup.rs"]
mod setup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use common::*;
use gateway::config::TlsPaths;
use gateway::core::control::{Control, PROTOCOL_VERSION};
use gateway::tunnel::hub_wire::{self, HubMsg, In, OuterTx};
use gateway::tunnel::vsock::{Route, VirtualSocket};
use gateway::tunnel::{control, tls};
use gateway_lab::Host;
use gateway_lab::hub::addr as hub_addr;
use setup::*;

const SESSIONS: usize = 100;
/// Sessions being opened at once.
const OPENING: usize = 25;

struct ToHub(OuterTx);

impl Route for ToHub {
    fn send(&self, _to: SocketAddr, datagram: &[u8]) -> bool {
        self.0.send_datagram(&[], datagram)
    }
}

/// What keeps one session alive.
type Held = (
    quinn::Connection,
    quinn::Endpoint,
    quinn::SendStream,
    quinn::RecvStream,
);

async fn session(
    pki: &std::path::Path,
    name: &str,
    outer_ep: &quinn::Endpoint,
) -> anyhow::Result<Held> {
    let paths = TlsPaths {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{name}.pem")),
        key: pki.join(format!("{name}.key")),
        crl: None,
    };
    let hub: SocketAddr = hub_target().parse()?;
    let mut outer =
        quinn::ClientConfig::new(Arc::new(tls::client_config(&paths, hub_wire::HUB_ALPN)?));
    outer.transport_config(Arc::new(hub_wire::outer_transport()));
    let conn = outer_ep.connect_with(outer, hub, hub_addr::HUB)?.await?;
    let (s, r) = conn.open_bi().await?;
    let (tx, mut rx) = hub_wire::start_quic(conn, s, r);
    // Not relayed: these sessions ride the outer link, and the hub relays them on to a
    // connector that takes relayed packets (the mixed path).
    tx.send_control(&HubMsg::Client {
        group: Some(GROUP.into()),
        raw: false,
    })
    .await?;
    match hub_wire::first_control(&mut rx, Duration::from_secs(10)).await? {
        HubMsg::Assigned { .. } => {}
        other => bail!("the hub answered {other:?}"),
    }
    let socket = VirtualSocket::new("0.0.0.0:0".parse()?, Box::new(ToHub(tx)));
    let pushed = socket.clone();
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            if let In::Datagram(d) = item {
                pushed.push(hub, d);
            }
        }
    });
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(hub_wire::INNER_MAX_UDP)?;
    let ep = quinn::Endpoint::new_with_abstract_socket(
        config,
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let inner = quinn::ClientConfig::new(Arc::new(tls::client_config(&paths, tls::ALPN)?));
    let conn = ep.connect_with(inner, hub, GROUP)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Control::Hello {
        version: PROTOCOL_VERSION,
        node: GROUP.into(),
        software: gateway::core::control::software(),
        advertise: vec![],
        transport_reason: None,
    };
    control::send(&mut send, &hello).await?;
    match control::recv(&mut recv, 64 << 10).await? {
        Control::Welcome { .. } => Ok((conn, ep, send, recv)),
        other => Err(anyhow!("the connector answered {other:?}")),
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_hub_relays_100_concurrent_sessions_in_under_100_mib() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    let d = h.pki.to_str().expect("utf-8").to_string();
    let names: Vec<String> = (0..SESSIONS).map(|i| format!("ops-load-{i:03}")).collect();
    for n in &names {
        let out = gatewayctl(&h.lab, Host::Operator, &["pki", "issue", n, "--dir", &d]);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let pki = h.pki.clone();
    let pid = h.hub.as_ref().expect("hub").id();
    let (hub_ns, hub_socket) = (h.lab.ns(Host::Hub), h.hub_socket.clone());
    let (opened, errors, rss, relayed) = pair::in_ns(&h.lab, Host::Operator, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let ep = quinn::Endpoint::client("0.0.0.0:0".parse().expect("addr")).expect("endpoint");
            let mut tasks = tokio::task::JoinSet::new();
            let opening = Arc::new(tokio::sync::Semaphore::new(OPENING));
            for n in names {
                let (pki, ep, opening) = (pki.clone(), ep.clone(), opening.clone());
                tasks.spawn(async move {
                    let _turn = opening.acquire_owned().await;
                    tokio::time::timeout(Duration::from_secs(30), session(&pki, &n, &ep))
                        .await
                        .map_err(|_| anyhow!("{n}: timed out"))
                        .and_then(|r| r.map_err(|e| anyhow!("{n}: {e:#}")))
                });
            }
            let mut held = Vec::new();
            let mut errors = Vec::new();
            while let Some(r) = tasks.join_next().await {
                match r.expect("task") {
                    Ok(s) => held.push(s),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            // Every session held open while the hub is looked at.
            let opened = held.len();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss = rss_kib(pid);
            let out = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &hub_ns, GATEWAYCTL, "status", "--json", "--socket",
                ])
                .arg(&hub_socket)
                .output()
                .expect("gatewayctl");
            let status: gateway::api::Status =
                serde_json::from_slice(&out.stdout).expect("status --json");
            let relayed = status
                .tunnel
                .and_then(|t| t.hub)
                .expect("hub tables")
                .clients;
            for (c, ..) in &held {
                c.close(0u32.into(), b"done");
            }
            (opened, errors, rss, relayed)
        })
    });
    assert!(
        errors.is_empty(),
        "{} failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(opened, SESSIONS);
    println!("hub RSS with {SESSIONS} sessions open: {rss} KiB");
    assert!(rss < 100 * 1024, "hub RSS {rss} KiB");
    assert_eq!(relayed.len(), SESSIONS, "the hub lists every session");
    assert!(
        relayed
            .iter()
            .all(|c| c.connector == GW_A && c.bytes_relayed > 1000),
        "{:?}",
        relayed.iter().find(|c| c.bytes_relayed <= 1000)
    );
    let hub = status_json(&h.lab, Host::Hub, &h.hub_socket)
        .tunnel
        .expect("tunnel");
    assert!(hub.refusals.is_empty(), "{:?}", hub.refusals);
}
