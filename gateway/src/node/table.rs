//! Longest-prefix lookup from a destination address to the peer that owns it, without a lock
//! or a scan of every prefix: one hash map per prefix length present, longest first.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Prefixes of one address family, as 128-bit keys (IPv4 in the low 32 bits).
#[derive(Debug, Clone)]
struct Family<V> {
    /// Address width in bits: 32 or 128.
    width: u8,
    /// Non-empty maps only, longest prefix first, so a lookup stops at its first hit and costs
    /// one hash per distinct prefix length (typically two or three), not one per prefix.
    lengths: Vec<(u8, HashMap<u128, V>)>,
}

impl<V> Family<V> {
    fn new(width: u8) -> Self {
        Family {
            width,
            lengths: Vec::new(),
        }
    }

    fn mask(&self, bits: u128, len: u8) -> u128 {
        match len {
            0 => 0,
            l => bits & (u128::MAX << (u32::from(self.width - l))) & self.all(),
        }
    }

    fn all(&self) -> u128 {
        match self.width {
            128 => u128::MAX,
            w => (1u128 << w) - 1,
        }
    }

    fn insert(&mut self, bits: u128, len: u8, v: V) -> Option<V> {
        let key = self.mask(bits, len);
        let at = match self.lengths.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.lengths[i].0 == len => i,
            Some(i) => {
                self.lengths.insert(i, (len, HashMap::new()));
                i
            }
            None => {
                self.lengths.push((len, HashMap::new()));
                self.lengths.len() - 1
            }
        };
        self.lengths[at].1.insert(key, v)
    }

    fn remove(&mut self, bits: u128, len: u8) -> Option<V> {
        let key = self.mask(bits, len);
        let i = self.lengths.iter().position(|(l, _)| *l == len)?;
        let v = self.lengths[i].1.remove(&key);
        if self.lengths[i].1.is_empty() {
            self.lengths.remove(i);
        }
        v
    }

    fn lookup(&self, bits: u128) -> Option<(u8, &V)> {
        self.lengths
            .iter()
            .find_map(|(len, map)| map.get(&self.mask(bits, *len)).map(|v| (*len, v)))
    }
}

/// A longest-prefix-match table. Cloned into each datapath snapshot, so lookups never lock.
#[derive(Debug, Clone)]
pub struct PrefixTable<V> {
    v4: Family<V>,
    v6: Family<V>,
}

impl<V> Default for PrefixTable<V> {
    fn default() -> Self {
        PrefixTable {
            v4: Family::new(32),
            v6: Family::new(128),
        }
    }
}

fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl<V> PrefixTable<V> {
    /// Adds `net` (host bits ignored), returning what it replaced.
    pub fn insert(&mut self, net: IpNet, v: V) -> Option<V> {
        let len = net.prefix_len();
        match net {
            IpNet::V4(_) => self.v4.insert(key(net.addr()), len, v),
            IpNet::V6(_) => self.v6.insert(key(net.addr()), len, v),
        }
    }

    pub fn remove(&mut self, net: IpNet) -> Option<V> {
        let len = net.prefix_len();
        match net {
            IpNet::V4(_) => self.v4.remove(key(net.addr()), len),
            IpNet::V6(_) => self.v6.remove(key(net.addr()), len),
        }
    }

    /// The value of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&V> {
        self.lookup_len(ip).map(|(_, v)| v)
    }

    /// The longest matching prefix's length and value.
    pub fn lookup_len(&self, ip: IpAddr) -> Option<(u8, &V)> {
        match ip {
            IpAddr::V4(_) => self.v4.lookup(key(ip)),
            IpAddr::V6(_) => self.v6.lookup(key(ip)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.lengths.is_empty() && self.v6.lengths.is_empty()
    }

    /// Removes every prefix whose value fails `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        for fam in [&mut self.v4, &mut self.v6] {
            for (_, map) in fam.lengths.iter_mut() {
                map.retain(|_, v| keep(v));
            }
            fam.lengths.retain(|(_, m)| !m.is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_longest_prefix_wins_whatever_the_insertion_order() {
        let mut t = PrefixTable::default();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.128.0.5/32"), 3);
        t.insert(net("10.128.0.0/16"), 2);
        t.insert(net("0.0.0.0/0"), 0);
        assert_eq!(t.lookup(ip("10.128.0.5")), Some(&3));
        assert_eq!(t.lookup(ip("10.128.0.6")), Some(&2));
        assert_eq!(t.lookup(ip("10.1.0.6")), Some(&1));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&0));
        assert_eq!(t.lookup(ip("fd00::1")), None, "families are apart");
        assert_eq!(t.remove(net("10.128.0.0/16")), Some(2));
        assert_eq!(t.lookup(ip("10.128.0.6")), Some(&1));
    }

    #[test]
    fn host_bits_are_ignored_and_ipv6_works() {
        let mut t = PrefixTable::default();
        t.insert(IpNet::new(ip("fd00:128::77"), 64).expect("net"), 'a');
        t.insert(net("fd00:64::2/128"), 'b');
        assert_eq!(t.lookup(ip("fd00:128::10")), Some(&'a'));
        assert_eq!(t.lookup(ip("fd00:64::2")), Some(&'b'));
        assert_eq!(t.lookup(ip("fd00:64::3")), None);
        t.retain(|v| *v != 'a');
        assert_eq!(t.lookup(ip("fd00:128::10")), None);
        assert_eq!(t.lookup(ip("fd00:64::2")), Some(&'b'));
    }

    /// The reference: scan every prefix, keep the longest that contains the address.
    fn naive(prefixes: &[(IpNet, u32)], addr: IpAddr) -> Option<u32> {
        let mut best: Option<(u8, u32)> = None;
        for (n, v) in prefixes {
            if n.contains(&addr) && best.is_none_or(|(l, _)| n.prefix_len() >= l) {
                best = Some((n.prefix_len(), *v));
            }
        }
        best.map(|(_, v)| v)
    }

    fn arb_v4() -> impl Strategy<Value = IpNet> {
        // A small address space so random prefixes overlap often.
        (any::<u8>(), any::<u8>(), 0u8..=32).prop_map(|(a, b, len)| {
            let addr = std::net::Ipv4Addr::new(10, a % 4, b % 8, b);
            IpNet::new(addr.into(), len).expect("len").trunc()
        })
    }

    fn arb_v6() -> impl Strategy<Value = IpNet> {
        (any::<u16>(), 0u8..=128).prop_map(|(x, len)| {
            let addr = std::net::Ipv6Addr::new(0xfd00, 0, 0, x % 4, 0, 0, 0, x % 16);
            IpNet::new(addr.into(), len).expect("len").trunc()
        })
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_a_scan_of_every_prefix(
            v4 in proptest::collection::vec(arb_v4(), 0..24),
            v6 in proptest::collection::vec(arb_v6(), 0..24),
            removed in proptest::collection::vec(any::<usize>(), 0..6),
            probes in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u16>()), 1..64),
        ) {
            // Later duplicates replace earlier ones in both models.
            let mut model: Vec<(IpNet, u32)> = Vec::new();
            let mut table = PrefixTable::default();
            for (i, n) in v4.iter().chain(v6.iter()).enumerate() {
                let v = i as u32;
                model.retain(|(m, _)| m != n);
                model.push((*n, v));
                table.insert(*n, v);
            }
            for r in removed {
                if model.is_empty() { break; }
                let (n, _) = model.remove(r % model.len());
                table.remove(n);
            }
            for (a, b, x) in probes {
                let p4 = IpAddr::V4(std::net::Ipv4Addr::new(10, a % 4, b % 8, b));
                let p6 = IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, x % 4, 0, 0, 0, x % 16));
                for p in [p4, p6] {
                    prop_assert_eq!(table.lookup(p).copied(), naive(&model, p), "{}", p);
                }
            }
        }
    }
}
