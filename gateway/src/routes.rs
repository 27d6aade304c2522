//! The routes a node classifies: validated, numbered, and looked up the way the eBPF tries do.
//!
//! The kernel does the per-packet lookups; this table is the reference model user space keeps
//! (which id names which prefix, for status and for filling the tries) and the oracle the tests
//! check longest-prefix semantics against.

use std::net::IpAddr;

use ipnet::IpNet;

/// One route: its id indexes the per-route counters in the eBPF maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub id: u32,
    pub cidr: IpNet,
    pub name: String,
}

/// Routes in configuration order, ids `0..len`, no two with the same prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Callers (config validation) guarantee unique prefixes and ids.
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn get(&self, id: u32) -> Option<&Route> {
        self.routes.iter().find(|r| r.id == id)
    }

    /// The (id, prefix) pairs to load into the tries.
    pub fn trie_entries(&self) -> Vec<(u32, IpNet)> {
        self.routes.iter().map(|r| (r.id, r.cidr)).collect()
    }

    /// Longest-prefix match, as a BPF LPM trie answers it: the most specific route of the
    /// address's own family, or none.
    pub fn lookup(&self, addr: IpAddr) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.cidr.contains(&addr))
            .max_by_key(|r| r.cidr.prefix_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cidrs: &[&str]) -> RouteTable {
        RouteTable::new(
            cidrs
                .iter()
                .enumerate()
                .map(|(i, c)| Route {
                    id: i as u32,
                    cidr: c.parse().expect("test cidr"),
                    name: (*c).to_string(),
                })
                .collect(),
        )
    }

    fn id_of(t: &RouteTable, addr: &str) -> Option<u32> {
        t.lookup(addr.parse().expect("test addr")).map(|r| r.id)
    }

    #[test]
    fn most_specific_prefix_wins_regardless_of_order() {
        let t = table(&["10.128.1.7/32", "10.0.0.0/8", "10.128.0.0/16"]);
        assert_eq!(id_of(&t, "10.128.1.7"), Some(0));
        assert_eq!(id_of(&t, "10.128.1.8"), Some(2));
        assert_eq!(id_of(&t, "10.1.2.3"), Some(1));
        assert_eq!(id_of(&t, "11.0.0.1"), None);
    }

    #[test]
    fn families_do_not_mix() {
        let t = table(&["0.0.0.0/0", "fd00:128::/64"]);
        assert_eq!(id_of(&t, "203.0.113.10"), Some(0));
        assert_eq!(id_of(&t, "fd00:128::10"), Some(1));
        assert_eq!(id_of(&t, "fd00:129::10"), None);
        // An IPv4-mapped IPv6 address is IPv6 on the wire; the IPv4 default must not catch it.
        assert_eq!(id_of(&t, "::ffff:10.0.0.1"), None);
    }

    #[test]
    fn prefix_boundaries_are_exact() {
        let t = table(&["192.0.2.0/25"]);
        assert_eq!(id_of(&t, "192.0.2.0"), Some(0));
        assert_eq!(id_of(&t, "192.0.2.127"), Some(0));
        assert_eq!(id_of(&t, "192.0.2.128"), None);
    }

    #[test]
    fn trie_entries_keep_ids() {
        let t = table(&["10.0.0.0/8", "fd00::/8"]);
        let e = t.trie_entries();
        assert_eq!(e[1].0, 1);
        assert_eq!(e[1].1.to_string(), "fd00::/8");
        assert_eq!(t.get(1).map(|r| r.name.as_str()), Some("fd00::/8"));
        assert!(t.get(2).is_none());
    }
}
