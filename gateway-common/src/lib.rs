//! The ABI between the eBPF programs (`gateway-ebpf`) and user space (`gateway`).
//!
//! Everything here is `#[repr(C)]` without padding, because both sides read the same bytes out of
//! the same maps and a silent layout mismatch would turn counters into garbage. Sizes are checked
//! at compile time below.
#![no_std]

/// Names of the maps in the object, as user space looks them up.
pub mod maps {
    /// `LpmTrie<[u8; 4], u32>`: IPv4 destination prefix → route id.
    pub const ROUTES_V4: &str = "ROUTES_V4";
    /// `LpmTrie<[u8; 16], u32>`: IPv6 destination prefix → route id.
    pub const ROUTES_V6: &str = "ROUTES_V6";
    /// `PerCpuArray<RouteCounters>` indexed by route id.
    pub const ROUTE_COUNTERS: &str = "ROUTE_COUNTERS";
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `HashMap<u32, u32>`: ingress ifindex → ifindex to redirect matched packets to (the TUN).
    /// An interface without an entry only counts.
    pub const REDIRECT: &str = "REDIRECT";
    /// `HashMap<u64, u32>`: [`crate::dns_suffix_hash`] of a private zone's wire name → zone id.
    pub const DNS_ZONES: &str = "DNS_ZONES";
}

/// Capacity of [`maps::DNS_ZONES`].
pub const MAX_DNS_ZONES: u32 = 256;
/// Query names with more labels than this are not steered (no real zone needs it).
pub const MAX_DNS_LABELS: usize = 16;

const DNS_HASH_MUL: u64 = 0x0000_0100_0000_01b3;

/// Hash of a lowercase wire-form name (length-prefixed labels and the final zero byte),
/// computed from its last byte to its first: `h = h * M + byte`. Going backwards lets the eBPF
/// program get the hash of every label-boundary suffix of a query's name in one bounded pass,
/// looking each up in [`maps::DNS_ZONES`].
pub const fn dns_suffix_hash(wire: &[u8]) -> u64 {
    let mut h = 0u64;
    let mut i = wire.len();
    while i > 0 {
        i -= 1;
        h = dns_hash_step(h, wire[i]);
    }
    h
}

/// Prepends one byte to a suffix hash.
#[inline(always)]
pub const fn dns_hash_step(h: u64, byte: u8) -> u64 {
    h.wrapping_mul(DNS_HASH_MUL).wrapping_add(byte as u64)
}

/// Capacity of [`maps::REDIRECT`]: LAN interfaces one node steers.
pub const MAX_REDIRECTS: u32 = 64;

/// Names of the programs in the object.
pub mod programs {
    /// TC classifier attached at ingress of the configured interfaces.
    pub const CLASSIFY: &str = "gw_classify";
    /// TC program at egress of a client's uplink: steers the host's own private-zone queries.
    pub const DNS_EGRESS: &str = "gw_dns_egress";
}

/// Capacity of each route trie and of the per-route counter array. Route ids are `0..MAX_ROUTES`.
pub const MAX_ROUTES: u32 = 1024;

/// Packets and bytes seen for one route. Bytes are counted from the start of the IP header, so
/// they do not depend on the link layer in front of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// Global classifier counters, indices into [`maps::COUNTERS`].
///
/// The numbers are part of the ABI: append new variants, never renumber or reuse one, so that
/// an older daemon reading a newer object (or the reverse) still labels every counter right.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IP packet whose destination matched a route in a trie.
    Matched = 0,
    /// IP packet whose destination matched no route; passed untouched.
    Unmatched = 1,
    /// Frame that is not IPv4 or IPv6 (ARP, LLDP, …); passed untouched.
    NotIp = 2,
    /// Frame too short for the header it claims, or an IPv4 header with a bad IHL/version.
    Malformed = 3,
    /// A trie returned a route id outside `0..MAX_ROUTES`: user space and the object disagree.
    BadRouteId = 4,
    /// Matched and handed to the TUN with bpf_redirect (a subset of `Matched`).
    Redirected = 5,
    /// Matched, but bpf_redirect refused (the TUN vanished); passed to the stack instead.
    RedirectFailed = 6,
    /// A DNS query for a private zone, redirected into the TUN.
    DnsSteered = 7,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 8] = [
        Counter::Matched,
        Counter::Unmatched,
        Counter::NotIp,
        Counter::Malformed,
        Counter::BadRouteId,
        Counter::Redirected,
        Counter::RedirectFailed,
        Counter::DnsSteered,
    ];

    /// Stable name used in `gatewayctl status` and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Matched => "matched",
            Counter::Unmatched => "unmatched",
            Counter::NotIp => "not_ip",
            Counter::Malformed => "malformed",
            Counter::BadRouteId => "bad_route_id",
            Counter::Redirected => "redirected",
            Counter::RedirectFailed => "redirect_failed",
            Counter::DnsSteered => "dns_steered",
        }
    }
}

/// Size of the [`maps::COUNTERS`] array; larger than [`Counter::ALL`] so new counters can be
/// added without changing the map's definition.
pub const COUNTER_SLOTS: u32 = 16;

const _: () = assert!(core::mem::size_of::<RouteCounters>() == 16);
const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);

#[cfg(feature = "user")]
// SAFETY: RouteCounters is repr(C), two u64 fields, no padding, valid for any bit pattern.
unsafe impl aya::Pod for RouteCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eBPF program extends the hash from a name's last byte backwards; at the start of
    /// the zone's labels it must hold exactly the zone's own hash.
    #[test]
    fn backward_hash_of_a_name_passes_through_the_zone_hash() {
        let zone = b"\x08hoge-vpc\x03com\x00";
        let name = b"\x02db\x08hoge-vpc\x03com\x00";
        let want = dns_suffix_hash(zone);
        let mut h = 0u64;
        let mut seen_at = None;
        for at in (0..name.len()).rev() {
            h = dns_hash_step(h, name[at]);
            if h == want {
                seen_at = Some(at);
            }
        }
        assert_eq!(seen_at, Some(3), "the zone starts at byte 3 of the name");
        assert_ne!(dns_suffix_hash(b"\x07xoge-vpc\x03com\x00"), want);
    }
}
