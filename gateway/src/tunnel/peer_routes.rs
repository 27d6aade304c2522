//! The client's kernel routes learned from its connector, applying `core::advertise`: added
//! exclusively (a route that exists is left alone and listed), except those this daemon created
//! itself on an earlier connection, which it may replace; withdrawn ones removed. (A connector's
//! routes to its clients' prefixes are the node's decision, added by `connector`.)

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;

use ipnet::IpNet;

use super::net;
use crate::core::advertise::{self, Skipped};

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
