//! The hub's driver: accepting outer links (QUIC and TLS over TCP on one port), telling
//! connectors from clients by their certificate's profile, and switching datagrams between a
//! client's link and its replica's by flow id, as `node::hub` decides. Nothing here opens a
//! datagram: the hub holds no key of either end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tokio::task::JoinSet;

use super::hub_raw::{End, Switch};
use super::hub_wire::{self, Counter, FLOW_ID, HubMsg, In, OuterRx, OuterTx};
use super::raw::{DemuxSocket, RawFlow};
use super::status::Shared;
use super::tls;
use crate::core::text::{PEER_NAME, PEER_TEXT, clean, is_clean};
use crate::node::drops::Failure;
use crate::node::hub::{ConnectorInfo, Hub, HubEvent};
use crate::node::{HANDSHAKE_TIMEOUT, LinkId, LinkKind};
use crate::pki::{CertInfo, Profile};

/// Outer links being set up at once; more wait in the kernel's backlog (TCP) or are refused
/// by quinn (QUIC).
const MAX_PENDING: usize = 256;

/// A client's session as the hub relays it, for status.
pub struct Relayed {
    pub identity: String,
    pub remote: SocketAddr,
    pub connector: String,
    pub kind: LinkKind,
    pub since: Instant,
    pub bytes: Counter,
    pub relayed: bool,
}

/// A live outer link's certificate, kept so a reload can check it against a new CRL.
struct Live {
    identity: String,
    chain: Vec<CertificateDer<'static>>,
    tx: OuterTx,
}

pub struct HubServer {
    pub shared: Arc<Shared>,
    state: Mutex<Hub>,
    live: Mutex<HashMap<LinkId, Live>>,
    connectors: Mutex<HashMap<LinkId, End>>,
    clients: Mutex<HashMap<LinkId, OuterTx>>,
    /// Each open flow's two ends: where a packet of it goes.
    switch: Arc<Switch>,
    pub relayed: Mutex<HashMap<LinkId, Relayed>>,
    next_link: AtomicU64,
    pending: Arc<tokio::sync::Semaphore>,
}

fn profile_of(chain: &[CertificateDer<'_>]) -> Option<Profile> {
    let leaf = chain.first()?;
    Profile::of(&CertInfo::from_der(leaf).ok()?)
}

impl HubServer {
    /// A hub; with `socket` (its QUIC socket) it offers relayed packets to ends that ask.
    pub fn new(shared: Arc<Shared>, socket: Option<&Arc<DemuxSocket>>) -> Arc<HubServer> {
        let switch = Switch::new(shared.drops.clone());
        if let Some(s) = socket {
            switch.attach(s);
        }
        Arc::new(HubServer {
            shared,
            state: Mutex::new(Hub::new()),
            live: Mutex::new(HashMap::new()),
            connectors: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            switch,
            relayed: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            pending: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING)),
        })
    }

    /// Status: connectors (identity, group, routes, since, transport, sessions) and the client
    /// sessions relayed (identity, connector, bytes).
    pub fn status(&self) -> crate::api::HubStatus {
        let (now, unix) = (Instant::now(), crate::sys::unix_now());
        let at = |t: Instant| unix.saturating_sub(now.saturating_duration_since(t).as_secs());
        let connectors = self
            .state
            .lock()
            .map(|s| {
                let ends = self.connectors.lock().ok();
                s.connectors()
                    .map(|(link, c, n)| {
                        let end = ends.as_ref().and_then(|l| l.get(&link));
                        crate::api::HubConnectorStatus {
                            identity: c.identity.clone(),
                            group: c.group.clone(),
                            routes: c.routes.clone(),
                            remote: end.map(|e| e.tx.remote.to_string()).unwrap_or_default(),
                            transport: c.kind.name().into(),
                            since: at(c.since),
                            sessions: n as u64,
                            relayed: end.is_some_and(|e| e.raw),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let clients = self
            .relayed
            .lock()
            .map(|r| {
                let mut v: Vec<_> = r
                    .values()
                    .map(|c| crate::api::HubClientStatus {
                        identity: c.identity.clone(),
                        connector: c.connector.clone(),
                        remote: c.remote.to_string(),
                        transport: c.kind.name().into(),
                        since: at(c.since),
                        bytes_relayed: c.bytes.load(Ordering::Relaxed),
                        relayed: c.relayed,
                    })
                    .collect();
                v.sort_by(|a, b| (a.since, &a.identity).cmp(&(b.since, &b.identity)));
                v
            })
            .unwrap_or_default();
        crate::api::HubStatus {
            connectors,
            clients,
        }
    }

    pub async fn accept_quic(self: Arc<Self>, ep: quinn::Endpoint) {
        let mut tasks = JoinSet::new();
        while let Some(incoming) = ep.accept().await {
            let Ok(permit) = self.pending.clone().try_acquire_owned() else {
                incoming.refuse();
                continue;
            };
            let me = self.clone();
            tasks.spawn(async move {
                let remote = incoming.remote_address();
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        let reason = format!("TLS handshake failed: {e}");
                        return me
                            .shared
                            .handshake_failed(remote, Failure::TlsFailed, reason);
                    }
                    Err(_) => {
                        let reason = "handshake timed out".to_string();
                        return me
                            .shared
                            .handshake_failed(remote, Failure::TimedOut, reason);
                    }
                };
                let chain = tls::peer_chain(&conn).unwrap_or_default();
                let (send, recv) =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
                        Ok(Ok(s)) => s,
                        _ => return conn.close(1u32.into(), b"no control stream"),
                    };
                let (tx, rx) = hub_wire::start_quic(conn, send, recv);
                drop(permit);
                me.serve(tx, rx, chain).await;
            });
            while tasks.try_join_next().is_some() {}
        }
    }

    pub async fn accept_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) {
        let mut tasks = JoinSet::new();
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.pending.clone().try_acquire_owned() else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            let acceptor = acceptor.clone();
            tasks.spawn(async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            let reason = format!("TLS handshake (TCP) failed: {e}");
                            return me
                                .shared
                                .handshake_failed(remote, Failure::TlsFailed, reason);
                        }
                        Err(_) => {
                            let reason = "handshake (TCP) timed out".to_string();
                            return me
                                .shared
                                .handshake_failed(remote, Failure::TimedOut, reason);
                        }
                    };
                let chain: Vec<CertificateDer<'static>> = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default();
                let (tx, rx) = hub_wire::start_tcp(tls, remote);
                drop(permit);
                me.serve(tx, rx, chain).await;
            });
            while tasks.try_join_next().is_some() {}
        }
    }

    fn refuse(&self, tx: &OuterTx, identity: Option<&str>, reason: String) {
        let msg = HubMsg::Refused {
            reason: reason.clone(),
        };
        let tx2 = tx.clone();
        tokio::spawn(async move {
            let _ = tx2.send_control(&msg).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx2.close("refused");
        });
        self.shared
            .refuse(identity.map(str::to_string), tx.remote, reason);
    }

    /// Closes every live outer link whose certificate `check` now refuses (a reload brought a
    /// CRL that revokes it), lists it as a refusal and returns the identities closed. A closed
    /// connector takes its relayed clients with it, as when it goes away.
    pub fn recheck(
        &self,
        check: impl Fn(&[CertificateDer<'static>]) -> Result<(), String>,
    ) -> Vec<String> {
        let refused: Vec<(String, OuterTx, String)> = match self.live.lock() {
            Ok(l) => l
                .values()
                .filter_map(|l| {
                    let reason = check(&l.chain).err()?;
                    Some((l.identity.clone(), l.tx.clone(), reason))
                })
                .collect(),
            Err(_) => return Vec::new(),
        };
        refused
            .into_iter()
            .map(|(identity, tx, reason)| {
                tx.close(&reason);
                self.shared
                    .refuse(Some(identity.clone()), tx.remote, reason);
                identity
            })
            .collect()
    }

    async fn serve(&self, tx: OuterTx, rx: OuterRx, chain: Vec<CertificateDer<'static>>) {
        let id = LinkId(self.next_link.fetch_add(1, Ordering::Relaxed));
        let identity = tls::identity_of_chain(&chain).unwrap_or_default();
        if let Ok(mut l) = self.live.lock() {
            let tx = tx.clone();
            l.insert(
                id,
                Live {
                    identity,
                    chain: chain.clone(),
                    tx,
                },
            );
        }
        self.serve_link(id, tx, rx, &chain).await;
        if let Ok(mut l) = self.live.lock() {
            l.remove(&id);
        }
    }

    async fn serve_link(
        &self,
        id: LinkId,
        tx: OuterTx,
        mut rx: OuterRx,
        chain: &[CertificateDer<'_>],
    ) {
        let remote = tx.remote;
        let identity = match tls::identity_of_chain(chain) {
            Some(n) if is_clean(&n, PEER_NAME) => n,
            _ => {
                let reason = "certificate carries no plain name".to_string();
                self.shared
                    .handshake_failed(remote, Failure::NoName, reason);
                return tx.close("no identity");
            }
        };
        let first = match hub_wire::first_control(&mut rx, HANDSHAKE_TIMEOUT).await {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(%identity, %remote, error = %e, "outer link said nothing");
                return tx.close("no hello");
            }
        };
        match (profile_of(chain), first) {
            (Some(Profile::Connector), HubMsg::Connector { group, routes, raw }) => {
                let group = clean(&group, 64);
                let routes: Vec<String> = routes.iter().take(64).map(|r| clean(r, 64)).collect();
                let end = self.end(tx, raw);
                self.connector(id, identity, group, routes, end, rx).await
            }
            (Some(Profile::Client), HubMsg::Client { group, raw }) => {
                let group = group.map(|g| clean(&g, 64));
                let end = self.end(tx, raw);
                self.client(id, identity, group, end, rx).await
            }
            (profile, _) => {
                let as_what = profile.map_or("no profile", Profile::name);
                let reason = format!(
                    "certificate profile {as_what} does not match its first message; nothing relayed"
                );
                self.refuse(&tx, Some(&identity), reason);
            }
        }
    }

    /// An end takes relayed packets when it asked, its link is QUIC and the hub has a socket.
    fn end(&self, tx: OuterTx, asked: bool) -> End {
        let raw = asked && tx.kind == LinkKind::Quic && self.switch.relays();
        End { tx, raw }
    }

    async fn connector(
        &self,
        id: LinkId,
        identity: String,
        group: String,
        routes: Vec<String>,
        end: End,
        mut rx: OuterRx,
    ) {
        let tx = end.tx.clone();
        let info = ConnectorInfo {
            identity: identity.clone(),
            group: group.clone(),
            routes,
            kind: tx.kind,
            since: Instant::now(),
        };
        let up = self
            .state
            .lock()
            .map_err(|_| "poisoned".to_string())
            .and_then(|mut s| s.handle_connector_up(id, info));
        if let Err(reason) = up {
            return self.refuse(&tx, Some(&identity), reason);
        }
        if let Ok(mut c) = self.connectors.lock() {
            c.insert(id, end.clone());
        }
        let _ = tx.send_control(&HubMsg::Welcome { raw: end.raw }).await;
        tracing::info!(%identity, %group, remote = %tx.remote, transport = tx.kind.name(), relayed = end.raw, "connector up");
        while let Some(item) = rx.recv().await {
            let In::Datagram(d) = item else {
                continue;
            };
            if d.len() <= FLOW_ID {
                continue;
            }
            let flow = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
            self.switch.to_client(flow, d.slice(FLOW_ID..));
        }
        tracing::info!(%identity, %group, "connector gone");
        if let Ok(mut c) = self.connectors.lock() {
            c.remove(&id);
        }
        if let Ok(mut s) = self.state.lock() {
            s.handle_connector_down(id);
        }
        self.carry_out();
    }

    async fn client(
        &self,
        id: LinkId,
        identity: String,
        group: Option<String>,
        end: End,
        mut rx: OuterRx,
    ) {
        let tx = end.tx.clone();
        let assigned = self
            .state
            .lock()
            .map_err(|_| "poisoned".to_string())
            .and_then(|mut s| {
                let (flow, conn) = s.handle_client(
                    Instant::now(),
                    id,
                    identity.clone(),
                    tx.kind,
                    group.as_deref(),
                )?;
                let name = s
                    .connector(conn)
                    .map(|c| c.identity.clone())
                    .unwrap_or_default();
                Ok((flow, conn, name))
            });
        let (flow, conn, name) = match assigned {
            Ok(v) => v,
            Err(reason) => return self.refuse(&tx, Some(&identity), reason),
        };
        let to = self
            .connectors
            .lock()
            .ok()
            .and_then(|c| c.get(&conn).cloned());
        let Some(to) = to else {
            if let Ok(mut s) = self.state.lock() {
                s.handle_client_down(id);
            }
            self.carry_out();
            return self.refuse(&tx, Some(&identity), "the connector went away".into());
        };
        let bytes: Counter = Arc::new(AtomicU64::new(0));
        let rf = RawFlow::new(flow);
        self.switch.open(rf, end.clone(), to.clone(), bytes.clone());
        // The connector knows the flow before its client can send a relayed packet of it.
        if to.raw {
            let _ = to.tx.send_control(&HubMsg::FlowOpened { flow: rf }).await;
        }
        if let Ok(mut c) = self.clients.lock() {
            c.insert(id, tx.clone());
        }
        if let Ok(mut r) = self.relayed.lock() {
            r.insert(
                id,
                Relayed {
                    identity: identity.clone(),
                    remote: tx.remote,
                    connector: name.clone(),
                    kind: tx.kind,
                    since: Instant::now(),
                    bytes: bytes.clone(),
                    relayed: end.raw,
                },
            );
        }
        let _ = tx
            .send_control(&HubMsg::Assigned {
                connector: name.clone(),
                raw: end.raw.then_some(rf),
            })
            .await;
        tracing::info!(%identity, connector = %name, flow, transport = tx.kind.name(), relayed = end.raw, "client relayed");
        while let Some(item) = rx.recv().await {
            if let In::Datagram(d) = item {
                self.switch.to_connector(flow, d);
            }
        }
        self.switch.close(flow);
        if let Ok(mut c) = self.clients.lock() {
            c.remove(&id);
        }
        if let Ok(mut r) = self.relayed.lock() {
            r.remove(&id);
        }
        if let Ok(mut s) = self.state.lock() {
            s.handle_client_down(id);
        }
        self.carry_out();
    }

    /// The state machine's effects: close clients whose replica went, tell connectors which
    /// flows ended.
    fn carry_out(&self) {
        let events: Vec<HubEvent> = match self.state.lock() {
            Ok(mut s) => std::iter::from_fn(|| s.poll_event()).collect(),
            Err(_) => return,
        };
        for e in events {
            match e {
                HubEvent::CloseClient { client, reason } => {
                    let tx = self
                        .clients
                        .lock()
                        .ok()
                        .and_then(|c| c.get(&client).cloned());
                    if let Some(tx) = tx {
                        tracing::info!(reason = %clean(&reason, PEER_TEXT), "closing a client's link");
                        tx.close(&reason);
                    }
                }
                HubEvent::FlowClosed { connector, flow } => {
                    let tx = self
                        .connectors
                        .lock()
                        .ok()
                        .and_then(|c| c.get(&connector).map(|e| e.tx.clone()));
                    if let Some(tx) = tx {
                        tokio::spawn(async move {
                            let _ = tx.send_control(&HubMsg::FlowClosed { flow }).await;
                        });
                    }
                }
            }
        }
    }
}

/// The address a hub reports for itself in logs.
pub fn describe(listen: SocketAddr, tcp: SocketAddr) -> String {
    format!("hub listening on {listen} (QUIC) and {tcp} (TLS over TCP)")
}
