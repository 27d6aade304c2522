//! Opening the tunnel's links to a connector, one transport at a time as `node::dial` orders
//! them: QUIC from the client's endpoint, or TLS over TCP from the same pinned source port, so
//! a stateless ACL needs no ephemeral range.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use quinn::Endpoint;

use super::link::TcpLink;
use super::link::{Opened, Side};
use crate::node::LinkKind;
use crate::node::drops::Limits;

pub struct Dialer {
    /// `None` when the config says `transport = "tcp"`.
    pub endpoint: Option<Endpoint>,
    pub tcp: tokio_rustls::TlsConnector,
    pub server_name: String,
    /// Pinned source port, for QUIC (the endpoint's) and TCP alike (0: any).
    pub source_port: u16,
    pub fallback_port: Option<u16>,
    pub limits: Arc<Limits>,
    /// Set when the targets are hubs: the session runs through them (`[tunnel] group`).
    pub hub: Option<Arc<super::hub_dial::ViaHub>>,
    /// The endpoint's relayed sessions, when its socket carries relayed packets (through hubs).
    pub raw: Option<Arc<super::hub_dial::RawEnd>>,
}

/// The first address `target` (`host:port`) resolves to.
pub async fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("resolving {target}"))?
        .next()
        .ok_or_else(|| anyhow!("{target} resolves to nothing"))
}

impl Dialer {
    /// A link to `target` over `kind`, within `timeout`.
    pub async fn open(
        &self,
        target: &str,
        kind: LinkKind,
        timeout: Duration,
    ) -> anyhow::Result<Opened> {
        let addr = resolve(target).await?;
        let opened = tokio::time::timeout(timeout, async {
            match (&self.hub, kind) {
                (Some(hub), _) => {
                    let from = super::hub_dial::From {
                        endpoint: self.endpoint.as_ref(),
                        server_name: &self.server_name,
                        source_port: self.source_port,
                        fallback_port: self.fallback_port,
                        raw: self.raw.as_ref(),
                    };
                    hub.open(&from, target, addr, kind).await
                }
                (None, LinkKind::Quic) => self.quic(addr).await,
                (None, LinkKind::Tcp) => self.tcp(addr).await,
            }
        })
        .await;
        opened.map_err(|_| {
            anyhow!(
                "{}",
                crate::node::dial::timed_out(crate::node::dial::Step { kind, timeout })
            )
        })?
    }

    async fn quic(&self, addr: SocketAddr) -> anyhow::Result<Opened> {
        let endpoint = self
            .endpoint
            .as_ref()
            .ok_or_else(|| anyhow!("QUIC is off (transport = \"tcp\")"))?;
        let conn = endpoint.connect(addr, &self.server_name)?.await?;
        let control = conn.open_bi().await?;
        Ok(Opened::quic(conn, control, Side::Client, None))
    }

    async fn tcp(&self, addr: SocketAddr) -> anyhow::Result<Opened> {
        let addr = SocketAddr::new(addr.ip(), self.fallback_port.unwrap_or(addr.port()));
        let stream = super::net::tcp_connect(addr, self.source_port).await?;
        let fd = stream.as_fd().try_clone_to_owned()?;
        let name = rustls_pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|e| anyhow!("server_name {:?}: {e}", self.server_name))?;
        let tls = self
            .tcp
            .connect(name, stream)
            .await
            .with_context(|| format!("TLS over TCP to {addr}"))?;
        Ok(TcpLink::start(
            tls,
            fd,
            addr,
            Side::Client,
            self.limits.clone(),
        ))
    }
}
