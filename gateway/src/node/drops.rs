//! Why the tunnel dropped a packet or a message: one list, counted in atomics, named in status
//! and metrics. Numbers are never reused or renumbered; add new reasons at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::packet::Malformed;

macro_rules! reasons {
    ($($variant:ident = $n:literal => $name:literal, $why:literal;)*) => {
        /// A reason to drop; the name is the label `gatewayctl status` and metrics show.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum Drop {
            $(#[doc = $why] $variant = $n,)*
        }

        impl Drop {
            pub const ALL: &'static [Drop] = &[$(Drop::$variant,)*];

            pub const fn name(self) -> &'static str {
                match self {
                    $(Drop::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    MalformedEmpty = 0 => "malformed_empty", "An empty datagram from a peer.";
    MalformedBadVersion = 1 => "malformed_bad_version", "Neither IPv4 nor IPv6.";
    MalformedTruncatedHeader = 2 => "malformed_truncated_header", "Shorter than its IP header.";
    MalformedBadHeaderLength = 3 => "malformed_bad_header_length", "An IP header length that does not fit.";
    MalformedTruncatedTransport = 4 => "malformed_truncated_transport", "Shorter than its TCP/UDP/ICMP header.";
    MalformedFromTun = 5 => "malformed_from_tun", "The kernel handed the TUN something unparsable.";
    Multicast = 6 => "multicast", "Multicast (the kernel's MLD/IGMP chatter): nothing to forward.";
    SpoofedSource = 7 => "spoofed_source", "A peer sent from an address it does not own.";
    Policy = 8 => "policy", "No `[[policy]]` rule allows it.";
    TunWrite = 9 => "tun_write", "Writing into the TUN failed.";
    NoPeer = 10 => "no_peer", "No connected peer owns the destination.";
    SendFailed = 11 => "send_failed", "The link's queue was full or the link closed.";
    TooBigAnswered = 12 => "too_big_answered", "Larger than the peer's path: answered with ICMP too-big.";
    TooBigNoDf = 13 => "too_big_no_df", "Larger than the peer's path and not answerable (no DF, or an ICMP error).";
    TunnelDown = 14 => "tunnel_down", "A client with no connector yet.";
    DnsRelayFailed = 15 => "dns_relay_failed", "A steered DNS query whose relay failed.";
    MalformedSourceRoute = 16 => "malformed_source_route", "IPv4 source-route option or IPv6 routing header.";
    DnsMalformed = 17 => "dns_malformed", "A relayed DNS message that is not a query.";
    DnsRateLimited = 18 => "dns_rate_limited", "Over the peer's DNS rate.";
    DnsTooManyInFlight = 19 => "dns_too_many_in_flight", "Over the queries in flight allowed per peer, per resolver or in all.";
    DnsNoQueryId = 20 => "dns_no_query_id", "No free query ID found in a bounded number of tries.";
}

impl Drop {
    /// The drop for a packet a peer sent that does not parse.
    pub fn malformed(m: Malformed) -> Drop {
        match m {
            Malformed::Empty => Drop::MalformedEmpty,
            Malformed::BadVersion => Drop::MalformedBadVersion,
            Malformed::TruncatedHeader => Drop::MalformedTruncatedHeader,
            Malformed::BadHeaderLength => Drop::MalformedBadHeaderLength,
            Malformed::TruncatedTransport => Drop::MalformedTruncatedTransport,
        }
    }
}

/// One counter per reason; shared by every task that moves packets, never locked.
#[derive(Debug)]
pub struct Drops([AtomicU64; Drop::ALL.len()]);

impl Default for Drops {
    fn default() -> Self {
        Drops(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Drops {
    pub fn count(&self, d: Drop) {
        self.add(d, 1);
    }

    pub fn add(&self, d: Drop, n: u64) {
        if let Some(c) = self.0.get(d as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, d: Drop) -> u64 {
        self.0
            .get(d as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Non-zero counters by name, as status and metrics show them.
    pub fn by_name(&self) -> BTreeMap<String, u64> {
        Drop::ALL
            .iter()
            .map(|d| (d.name().to_string(), self.get(*d)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_dense_and_names_unique_so_the_array_indexes_them() {
        for (i, d) in Drop::ALL.iter().enumerate() {
            assert_eq!(
                *d as usize, i,
                "{d:?} is out of order: append, never renumber"
            );
        }
        let names: std::collections::BTreeSet<_> = Drop::ALL.iter().map(|d| d.name()).collect();
        assert_eq!(names.len(), Drop::ALL.len());
    }

    #[test]
    fn counts_by_name_without_zeroes() {
        let d = Drops::default();
        d.count(Drop::Policy);
        d.add(Drop::NoPeer, 2);
        assert_eq!(
            d.by_name(),
            BTreeMap::from([("no_peer".to_string(), 2), ("policy".to_string(), 1)])
        );
    }
}
