//! The connector's side of `gatewayctl access`: one request on an authenticated connection,
//! the decision (the identity's policy for `tcp/PORT`, a name resolved only under the private
//! zones), a TCP connection from the pinned egress range, then bytes both ways until either end
//! closes or a reload's CRL revokes the certificate. The client side is `access`.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;

use super::control::{self, Control, PROTOCOL_VERSION};
use super::dns::Forwarder;
use super::slots::{FD_HEADROOM, Slot};
use super::status::Shared;
use super::{access, net, tls};
use crate::core::dns;
use crate::core::policy::Policy;
use crate::core::text::{PEER_NAME, clean};
use crate::node::HANDSHAKE_TIMEOUT;
use crate::node::drops::Limit;

/// `gatewayctl access` streams open at once: two descriptors each.
const MAX_ACCESS_STREAMS: u64 = 256;
/// Access streams name the forwarder's peer with this, apart from every link's id.
const ACCESS_PEER: u64 = u64::MAX;

pub struct AccessServer {
    pub shared: Arc<Shared>,
    pub policy: Arc<ArcSwap<Policy>>,
    pub forwarder: Option<Arc<Forwarder>>,
    /// Where streams into the VPC connect from.
    pub egress_ports: Option<(u16, u16)>,
    pub trust: Arc<tls::Trust>,
    pub nofile: u64,
}

impl AccessServer {
    /// One access stream: the request, the decision, then bytes both ways.
    pub async fn serve<R, W>(
        &self,
        identity: &str,
        remote: SocketAddr,
        chain: Vec<CertificateDer<'static>>,
        mut r: R,
        mut w: W,
        slot: Slot,
    ) where
        R: tokio::io::AsyncRead + Unpin + Send,
        W: tokio::io::AsyncWrite + Unpin + Send,
    {
        let max = control::MAX_CLIENT_MESSAGE;
        let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, control::recv_io(&mut r, max)).await;
        let (host, port) = match request {
            Ok(Ok(Control::Open {
                version,
                host,
                port,
            })) if control::compatible(version) => (host, port),
            Ok(Ok(Control::Open { version, .. })) => {
                let reason =
                    format!("protocol version {version}, this connector speaks {PROTOCOL_VERSION}");
                let _ = control::send_io(&mut w, &Control::Refused { reason }).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                return;
            }
            _ => {
                tracing::info!(%identity, %remote, "access connection sent no request");
                return;
            }
        };
        // Reserved before connecting, so the bound holds however many arrive at once.
        let active = self.shared.access_active.fetch_add(1, Ordering::Relaxed);
        let target = if active >= MAX_ACCESS_STREAMS {
            self.shared.limits.count(Limit::AccessStreams);
            Err(format!("{MAX_ACCESS_STREAMS} access streams already open"))
        } else {
            self.target(identity, &host, port).await
        };
        let (address, mut upstream) = match target {
            Ok(t) => t,
            Err(reason) => {
                self.shared.access_active.fetch_sub(1, Ordering::Relaxed);
                // The request's host is the client's text: cut and escaped in the refusal.
                self.shared.refuse(
                    Some(identity.to_string()),
                    remote,
                    format!("access to {}:{port}: {reason}", clean(&host, 64)),
                );
                let _ = control::send_io(&mut w, &Control::Refused { reason }).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                return;
            }
        };
        if control::send_io(&mut w, &Control::Opened { address })
            .await
            .is_err()
        {
            self.shared.access_active.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        drop(slot);
        let host = clean(&host, PEER_NAME);
        tracing::info!(%identity, %remote, %host, %address, "access stream opened");
        self.shared.access_total.fetch_add(1, Ordering::Relaxed);
        let mut client = tokio::io::join(r, w);
        let result = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r,
            reason = self.trust.client_refused(&chain) => {
                self.shared.refuse(
                    Some(identity.to_string()),
                    remote,
                    format!("access stream to {address} closed: {reason}"),
                );
                Err(std::io::Error::other(reason))
            }
        };
        self.shared.access_active.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok((up, down)) => {
                tracing::info!(%identity, %address, bytes_up = up, bytes_down = down, "access stream closed")
            }
            Err(e) => tracing::info!(%identity, %address, error = %e, "access stream ended"),
        }
    }

    /// Resolves `host`, checks policy and connects from the pinned range; the reason otherwise.
    async fn target(
        &self,
        identity: &str,
        host: &str,
        port: u16,
    ) -> Result<(SocketAddr, tokio::net::TcpStream), String> {
        let policy = self.policy.load_full();
        if !policy.knows(identity) {
            return Err(format!("no [[policy]] entry matches identity {identity:?}"));
        }
        if host.len() > dns::MAX_NAME {
            return Err(format!("a host name of {} bytes is no name", host.len()));
        }
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => self.resolve_private(host).await?,
        };
        access::allowed(&policy, identity, ip, port)?;
        let address = SocketAddr::new(ip, port);
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            net::tcp_connect_from_range(address, self.egress_ports),
        )
        .await
        .map_err(|_| format!("connecting to {address}: timed out"))?
        .map_err(|e| format!("connecting to {address}: {e}"))?;
        let fd = u64::try_from(stream.as_raw_fd()).unwrap_or(u64::MAX);
        if fd.saturating_add(FD_HEADROOM) >= self.nofile {
            self.shared.limits.count(Limit::DescriptorsLow);
            return Err("the connector is short of descriptors".into());
        }
        let _ = stream.set_nodelay(true);
        Ok((address, stream))
    }

    /// A name under one of the private zones, asked through the forwarder (A, then AAAA).
    async fn resolve_private(&self, host: &str) -> Result<IpAddr, String> {
        let Some(fwd) = &self.forwarder else {
            return Err(format!(
                "{host:?} is not an address and this connector has no [[dns.zone]]"
            ));
        };
        let wire = dns::wire_name(host).map_err(|e| format!("{host:?}: {e:?}"))?;
        let domains = fwd.domains();
        let zones: Vec<Vec<u8>> = domains
            .iter()
            .filter_map(|d| dns::wire_name(d).ok())
            .collect();
        if dns::matching_zone(&wire, &zones).is_none() {
            return Err(format!(
                "{host:?} is not under this connector's zones ({})",
                domains.join(", ")
            ));
        }
        for aaaa in [false, true] {
            let query = access::address_query(host, aaaa).map_err(|e| e.to_string())?;
            if let Some(answer) = fwd.resolve(ACCESS_PEER, &query).await
                && let Some(ip) = access::answer_addresses(&answer).first()
            {
                return Ok(*ip);
            }
        }
        Err(format!("{host:?} has no address in the private zone"))
    }
}
