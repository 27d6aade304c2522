//! Overlay addresses per identity: a client that reconnects, or moves between QUIC and TCP,
//! keeps its addresses, so its open TCP sessions survive. The pool is finite and says so.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Host 1 of the overlay is the connector itself.
const FIRST_CLIENT_HOST: u32 = 2;

#[derive(Debug, Clone)]
pub struct Leases {
    v4: Ipv4Net,
    v6: Ipv6Net,
    by_identity: HashMap<String, u32>,
    taken: BTreeSet<u32>,
    /// Most leases kept at once: identities beyond it are refused, not given a duplicate.
    limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub host: u32,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Leases {
    pub fn new(v4: Ipv4Net, v6: Ipv6Net, limit: usize) -> Leases {
        Leases {
            v4: v4.trunc(),
            v6: v6.trunc(),
            by_identity: HashMap::new(),
            taken: BTreeSet::new(),
            limit,
        }
    }

    /// This node's own addresses (host 1).
    pub fn own(&self) -> Option<(Ipv4Addr, Ipv6Addr)> {
        Some((nth_v4(self.v4, 1)?, nth_v6(self.v6, 1)?))
    }

    /// The identity's lease, the same one every time; `None` when the pool is exhausted.
    pub fn lease(&mut self, identity: &str) -> Option<Lease> {
        if let Some(host) = self.by_identity.get(identity) {
            return self.addresses(*host);
        }
        if self.by_identity.len() >= self.limit {
            return None;
        }
        let host = (FIRST_CLIENT_HOST..)
            .take(self.limit.saturating_add(1))
            .find(|h| !self.taken.contains(h))?;
        let lease = self.addresses(host)?;
        self.taken.insert(host);
        self.by_identity.insert(identity.to_string(), host);
        Some(lease)
    }

    fn addresses(&self, host: u32) -> Option<Lease> {
        Some(Lease {
            host,
            v4: nth_v4(self.v4, host)?,
            v6: nth_v6(self.v6, host)?,
        })
    }
}

/// The `n`th address of a prefix (0 is the network address); `None` past its broadcast.
pub fn nth_v4(net: Ipv4Net, n: u32) -> Option<Ipv4Addr> {
    let size = 1u64 << (32 - u32::from(net.prefix_len()));
    if u64::from(n) >= size.saturating_sub(1) {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(net.network()).wrapping_add(n)))
}

/// The `n`th address of an IPv6 prefix; `None` when `n` does not fit in it.
pub fn nth_v6(net: Ipv6Net, n: u32) -> Option<Ipv6Addr> {
    let host_bits = 128 - u32::from(net.prefix_len());
    if host_bits < 32 && u64::from(n) >= (1u64 << host_bits) {
        return None;
    }
    Some(Ipv6Addr::from(
        u128::from(net.network()).wrapping_add(u128::from(n)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(v4: &str, limit: usize) -> Leases {
        Leases::new(
            v4.parse().expect("v4"),
            "fd00:64::/64".parse().expect("v6"),
            limit,
        )
    }

    #[test]
    fn an_identity_keeps_its_lease_and_others_get_their_own() {
        let mut l = leases("100.64.0.0/24", 100);
        let a = l.lease("ops-alice").expect("lease");
        let b = l.lease("ops-bob").expect("lease");
        assert_eq!(a.v4, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(b.v4, Ipv4Addr::new(100, 64, 0, 3));
        assert_eq!(b.v6, "fd00:64::3".parse::<Ipv6Addr>().expect("ip"));
        assert_eq!(l.lease("ops-alice"), Some(a));
        assert_eq!(
            l.own(),
            Some((
                Ipv4Addr::new(100, 64, 0, 1),
                "fd00:64::1".parse().expect("ip")
            ))
        );
    }

    #[test]
    fn an_exhausted_pool_refuses_rather_than_sharing_an_address() {
        // /30: host 1 is the connector, host 2 the only client address, 3 is broadcast.
        let mut l = leases("100.64.0.0/30", 100);
        assert!(l.lease("a").is_some());
        assert_eq!(l.lease("b"), None);
        let mut l = leases("100.64.0.0/16", 2);
        assert!(l.lease("a").is_some() && l.lease("b").is_some());
        assert_eq!(l.lease("c"), None, "the limit holds");
        assert!(l.lease("a").is_some(), "known identities still get theirs");
    }

    #[test]
    fn overlay_hosts_skip_network_and_broadcast() {
        let net: Ipv4Net = "100.64.0.0/30".parse().expect("net");
        assert_eq!(nth_v4(net, 1), Some(Ipv4Addr::new(100, 64, 0, 1)));
        assert_eq!(nth_v4(net, 3), None, "broadcast");
        let v6: Ipv6Net = "fd00:64::/126".parse().expect("net");
        assert_eq!(nth_v6(v6, 3), Some("fd00:64::3".parse().expect("ip")));
        assert_eq!(nth_v6(v6, 4), None);
    }
}
