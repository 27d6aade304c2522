//! Kernel routes that exist because of a peer, on both ends, applying `core::advertise`.
//!
//! Connector ([`Advertised`]): a client's accepted prefixes are routed into the TUN with
//! exclusive adds (an existing route is a refusal, never replaced), one session at a time
//! (an async lock around check, claim and kernel change, so two clients cannot race for a
//! prefix), and removed by the session that owns them when it ends.
//!
//! Client ([`Learned`]): routes from the connector are added exclusively too, except those
//! this daemon created itself on an earlier connection, which it may replace.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use ipnet::IpNet;

use super::net;
use crate::core::advertise::{self, Grants, Registry, Skipped, Taken};

/// The connector's routes to its clients' advertised prefixes.
pub struct Advertised {
    grants: RwLock<Arc<Grants>>,
    registry: tokio::sync::Mutex<Registry>,
    overlay: Vec<IpNet>,
    netlink: rtnetlink::Handle,
    tun_index: u32,
}

impl Advertised {
    pub fn new(
        grants: Grants,
        overlay: Vec<IpNet>,
        netlink: rtnetlink::Handle,
        tun_index: u32,
    ) -> Advertised {
        Advertised {
            grants: RwLock::new(Arc::new(grants)),
            registry: tokio::sync::Mutex::new(Registry::default()),
            overlay,
            netlink,
            tun_index,
        }
    }

    pub fn grants(&self) -> Arc<Grants> {
        self.grants
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|_| Arc::new(Grants::default()))
    }

    pub fn set_grants(&self, grants: Grants) {
        if let Ok(mut g) = self.grants.write() {
            *g = Arc::new(grants);
        }
    }

    /// Checks `requested` for `identity` and routes what was accepted to the TUN for `session`;
    /// the reason for the client and for status otherwise (nothing changed then).
    pub async fn claim(
        &self,
        identity: &str,
        session: u64,
        requested: &[IpNet],
        offered: &[IpNet],
    ) -> Result<Vec<IpNet>, String> {
        if requested.is_empty() {
            return Ok(Vec::new());
        }
        let mut registry = self.registry.lock().await;
        let mut local = net::address_subnets(&self.netlink, self.tun_index)
            .await
            .map_err(|e| format!("cannot ask the kernel for its subnets: {e}"))?;
        local.extend(
            net::routed_prefixes(&self.netlink, self.tun_index)
                .await
                .map_err(|e| format!("cannot ask the kernel for its routes: {e}"))?,
        );
        let taken = Taken {
            overlay: self.overlay.clone(),
            offered: offered.to_vec(),
            local,
        };
        let accepted = advertise::check(identity, requested, &self.grants(), &taken, &registry)
            .map_err(|r| r.to_string())?;
        let claim = registry.claim(identity, session, &accepted);
        for (i, p) in claim.add.iter().enumerate() {
            if let Err(e) = net::add_route(&self.netlink, *p, self.tun_index).await {
                for done in &claim.add[..i] {
                    let _ = net::delete_route(&self.netlink, *done, self.tun_index).await;
                }
                registry.abort(session, &claim);
                return Err(format!("advertised prefix {p}: {e}"));
            }
        }
        Ok(accepted)
    }

    /// Removes the routes `session` still owns (a newer session of the same identity may have
    /// taken some over: those stay).
    pub async fn release(&self, session: u64) {
        let mut registry = self.registry.lock().await;
        for p in registry.release(session) {
            if let Err(e) = net::delete_route(&self.netlink, p, self.tun_index).await {
                tracing::warn!(route = %p, error = %e, "removing a client's route failed");
            }
        }
    }
}

/// The client's routes learned from its connector.
pub struct Learned {
    /// Routes this daemon added (through its TUN): the only ones it may replace.
    created: Mutex<HashSet<IpNet>>,
    netlink: rtnetlink::Handle,
    tun_index: u32,
}

impl Learned {
    pub fn new(netlink: rtnetlink::Handle, tun_index: u32) -> Learned {
        Learned {
            created: Mutex::new(HashSet::new()),
            netlink,
            tun_index,
        }
    }

    pub fn netlink(&self) -> &rtnetlink::Handle {
        &self.netlink
    }

    fn created(&self, r: &IpNet) -> bool {
        self.created.lock().is_ok_and(|c| c.contains(r))
    }

    /// Makes the routes into the tunnel what may be installed of `routes` (from the connector
    /// at `connector`): those added or kept, and those refused with why. Routes this daemon
    /// created that are no longer offered (withdrawn, or offered before a reconnect) go.
    pub async fn sync(
        &self,
        routes: &[IpNet],
        connector: IpAddr,
    ) -> anyhow::Result<(Vec<IpNet>, Vec<Skipped>)> {
        let local = net::address_subnets(&self.netlink, self.tun_index).await?;
        let (ok, mut skipped) = advertise::learned(routes, &local, connector);
        let mut installed = Vec::with_capacity(ok.len());
        for r in ok {
            let result = if self.created(&r) {
                net::replace_route(&self.netlink, r, self.tun_index).await
            } else {
                net::add_route(&self.netlink, r, self.tun_index).await
            };
            match result {
                Ok(()) => {
                    if let Ok(mut c) = self.created.lock() {
                        c.insert(r);
                    }
                    installed.push(r);
                }
                Err(net::NetError::Exists(_)) => skipped.push(Skipped {
                    route: r,
                    why: "this host already has a route to it (not gatewayd's; left alone)".into(),
                }),
                Err(e) => return Err(anyhow::anyhow!("route {r} into the tunnel: {e}")),
            }
        }
        let stale: Vec<IpNet> = self
            .created
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|r| !installed.contains(r))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        for r in stale {
            self.remove(r).await;
        }
        Ok((installed, skipped))
    }

    /// Removes a route this daemon created.
    async fn remove(&self, r: IpNet) {
        let ours = self.created.lock().is_ok_and(|mut c| c.remove(&r));
        if ours && let Err(e) = net::delete_route(&self.netlink, r, self.tun_index).await {
            tracing::warn!(route = %r, error = %e, "removing a withdrawn route failed");
        }
    }
}
