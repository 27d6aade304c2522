//! The connector's front door: accepting QUIC and TLS-over-TCP connections within bounded
//! handshake slots, authenticating them (a plain certificate name), sending `gatewayctl
//! access` connections to the access server, and handing each tunnel link to its link task and
//! to the node's task (`connector`).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, VarInt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::access_server::AccessServer;
use super::connector::Input;
use super::dns::Forwarder;
use super::link::{Opened, Side};
use super::link::{PeerCertificates, TcpLink};
use super::links::{self, LinkEvent, Packets};
use super::slots::{Slot, Slots};
use super::status::{LinkRecord, Shared};
use super::tls;
use crate::core::text::{PEER_NAME, clean, is_clean};
use crate::node::drops::{Failure, Limit};
use crate::node::{HANDSHAKE_TIMEOUT, LinkId, LinkInfo, LinkKind};

/// What the accept loops need.
pub struct Accept {
    pub shared: Arc<Shared>,
    pub slots: Slots,
    pub inbox: mpsc::Sender<Input>,
    pub events: mpsc::Sender<LinkEvent>,
    pub packets: Packets,
    pub forwarder: Option<Arc<Forwarder>>,
    pub access: Arc<AccessServer>,
}

impl Accept {
    /// A TLS handshake given HANDSHAKE_TIMEOUT; a failure is counted and listed apart.
    async fn handshake<T, E: std::fmt::Display>(
        &self,
        remote: SocketAddr,
        over: &str,
        handshake: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(done)) => Some(done),
            Ok(Err(e)) => {
                let reason = format!("TLS handshake{over} failed: {e}");
                self.shared
                    .handshake_failed(remote, Failure::TlsFailed, reason);
                None
            }
            Err(_) => {
                let reason = format!("handshake{over} timed out");
                self.shared
                    .handshake_failed(remote, Failure::TimedOut, reason);
                None
            }
        }
    }

    /// The identity a verified certificate names, if it is a plain name that status and logs
    /// can show as it is.
    fn identity(&self, remote: SocketAddr, name: Option<String>) -> Option<String> {
        match name {
            Some(n) if is_clean(&n, PEER_NAME) => Some(n),
            Some(n) => {
                let reason = format!("certificate name {:?} is not a plain name", clean(&n, 64));
                self.shared
                    .handshake_failed(remote, Failure::BadName, reason);
                None
            }
            None => {
                let reason = "certificate carries no name".to_string();
                self.shared
                    .handshake_failed(remote, Failure::NoName, reason);
                None
            }
        }
    }

    pub async fn quic(self: Arc<Self>, ep: Endpoint) {
        let mut clients = JoinSet::new();
        while let Some(incoming) = ep.accept().await {
            let Some(slot) = self.slots.take(incoming.remote_address()) else {
                incoming.refuse();
                continue;
            };
            if slot.busy() && !incoming.remote_address_validated() && incoming.may_retry() {
                drop(slot);
                let _ = incoming.retry();
                continue;
            }
            let me = self.clone();
            clients.spawn(async move { me.serve_quic(incoming, slot).await });
            while clients.try_join_next().is_some() {}
        }
    }

    pub async fn tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) {
        let mut clients = JoinSet::new();
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP fallback connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !self.slots.descriptors_left(&stream) {
                continue;
            }
            let Some(slot) = self.slots.take(remote) else {
                continue;
            };
            let me = self.clone();
            let acceptor = acceptor.clone();
            clients.spawn(async move { me.serve_tcp(stream, remote, acceptor, slot).await });
            // Reap finished handshakes so a long-lived connector does not accumulate them.
            while clients.try_join_next().is_some() {}
        }
    }

    async fn serve_quic(&self, incoming: quinn::Incoming, slot: Slot) {
        let remote = incoming.remote_address();
        let Some(conn) = self.handshake(remote, "", incoming.into_future()).await else {
            return;
        };
        let Some(identity) = self.identity(remote, tls::peer_identity(&conn)) else {
            conn.close(VarInt::from_u32(1), b"no identity");
            return;
        };
        if tls::negotiated_alpn(&conn).as_deref() == Some(tls::ALPN_ACCESS) {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
                Ok(Ok((send, recv))) => {
                    let chain = tls::peer_chain(&conn).unwrap_or_default();
                    self.access
                        .serve(&identity, remote, chain, recv, send, slot)
                        .await
                }
                _ => tracing::info!(%identity, %remote, "access connection opened no stream"),
            }
            // Closing at once could overtake a refusal still in flight: let the client close.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(VarInt::from_u32(0), b"done");
            return;
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(control)) => {
                let opened = Opened::quic(conn.clone(), control, Side::Connector, None);
                self.up(opened, identity, LinkKind::Quic, slot).await;
            }
            _ => {
                tracing::info!(%identity, %remote, "no control stream; connection dropped");
                conn.close(VarInt::from_u32(1), b"no control stream");
            }
        }
    }

    async fn serve_tcp(
        &self,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        slot: Slot,
    ) {
        let _ = stream.set_nodelay(true);
        let Some(tls) = self
            .handshake(remote, " (TCP)", acceptor.accept(stream))
            .await
        else {
            return;
        };
        let name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(tls::identity_of_chain);
        let Some(identity) = self.identity(remote, name) else {
            return;
        };
        if tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_ACCESS) {
            let chain = PeerCertificates::peer_certificates(&tls);
            let (r, w) = tokio::io::split(tls);
            self.access
                .serve(&identity, remote, chain, r, w, slot)
                .await;
            return;
        }
        // Only an authenticated peer gets its socket duplicated (for TCP_INFO and shutdown).
        let socket = match tls.get_ref().0.as_fd().try_clone_to_owned() {
            Ok(s) => s,
            Err(e) => {
                self.shared.limits.count(Limit::DescriptorsLow);
                tracing::warn!(error = %e, "duplicating a TCP socket failed");
                return;
            }
        };
        let limits = self.shared.limits.clone();
        let opened = TcpLink::start(tls, socket, remote, Side::Connector, limits);
        self.up(opened, identity, LinkKind::Tcp, slot).await;
    }

    /// An authenticated link: its task starts, and the node hears of it.
    async fn up(&self, opened: Opened, identity: String, kind: LinkKind, slot: Slot) {
        let link = opened.link.clone();
        let id = LinkId(link.id());
        let info = LinkInfo {
            kind,
            remote: link.remote(),
            identity: identity.clone(),
            max_packet: link.max_packet(),
            sink: link.sink(),
        };
        if let Ok(mut l) = self.shared.links.lock() {
            l.insert(id, LinkRecord { identity, link });
        }
        // The node hears of the link before the link's task exists: a hello it reads at once
        // must not reach the node ahead of the link (it would be dropped, and the client
        // would wait out its hello timeout). The node's task takes inputs first.
        let (out, rx) = links::channel();
        let _ = self
            .inbox
            .send(Input::LinkUp {
                id,
                info,
                out,
                slot,
            })
            .await;
        links::spawn(
            opened,
            id,
            self.events.clone(),
            rx,
            self.packets.clone(),
            self.forwarder.clone(),
        );
    }
}
