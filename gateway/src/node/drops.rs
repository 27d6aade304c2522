//! Why the tunnel dropped a packet ([`Drop`]) and which bound a peer ran into ([`Limit`]): one
//! list each, counted in atomics, named in status and metrics. Numbers are never reused or
//! renumbered; add new reasons at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::packet::Malformed;

macro_rules! reasons {
    ($(#[$doc:meta])* $enum:ident {
        $($variant:ident = $n:literal => $name:literal, $why:literal;)*
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum $enum {
            $(#[doc = $why] $variant = $n,)*
        }

        impl $enum {
            pub const ALL: &'static [$enum] = &[$($enum::$variant,)*];

            pub const fn name(self) -> &'static str {
                match self {
                    $($enum::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    /// A reason to drop a packet; the name is the label `gatewayctl status` and metrics show.
    Drop {
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
    MalformedSourceRoute = 16 => "malformed_source_route", "An IPv4 loose or strict source route: a peer must not pick the path.";
    MalformedIpOptions = 17 => "malformed_ip_options", "Any other IPv4 option but padding.";
    MalformedBadOptions = 18 => "malformed_bad_options", "IPv4 options whose lengths do not add up.";
    MalformedRoutingHeader = 19 => "malformed_routing_header", "An IPv6 Routing header anywhere in the extension headers.";
    MalformedExtensionChain = 20 => "malformed_extension_chain", "More IPv6 extension headers than are ever walked.";
    RelayMalformed = 21 => "relay_malformed", "A relayed packet (hub path, outside the outer QUIC) with a bad header.";
    RelayUnknownFlow = 22 => "relay_unknown_flow", "A relayed packet for a flow that is not open.";
    RelayBadToken = 23 => "relay_bad_token", "A relayed packet whose token is not its flow's: forged or stale.";
    RelayWrongSource = 24 => "relay_wrong_source", "A relayed packet from an address that is not its flow's end.";
    }
}

reasons! {
    /// A bound a peer ran into: what it asked for was refused, dropped or cut short.
    Limit {
    DnsRate = 0 => "dns_rate", "A query over its peer's DNS rate, dropped unanswered.";
    DnsInFlightPeer = 1 => "dns_in_flight_peer", "A query past its peer's share of queries in flight.";
    DnsInFlightGlobal = 2 => "dns_in_flight_global", "A query past the forwarder's queries in flight.";
    DnsResolverBusy = 3 => "dns_resolver_busy", "A query past one resolver's queries in flight.";
    DnsNoQueryId = 4 => "dns_no_query_id", "No free query ID in a bounded number of tries.";
    DnsNotAQuery = 5 => "dns_not_a_query", "Bytes relayed as a DNS query that are not one.";
    DnsStreamUnread = 6 => "dns_stream_unread", "A DNS stream that sent no whole query in time.";
    DnsAnswerQueueFull = 7 => "dns_answer_queue_full", "An answer the peer's link had no room for.";
    DnsBadTcpAnswer = 8 => "dns_bad_tcp_answer", "A resolver's TCP answer that does not answer the question.";
    DnsRelayBusy = 9 => "dns_relay_busy", "A client's relayed query past its relays in flight.";
    FrameTooLong = 10 => "frame_too_long", "A TCP-fallback frame longer than its type allows.";
    FrameNotHello = 11 => "frame_not_hello", "A first frame that is not a hello.";
    PacketBeforeWelcome = 12 => "packet_before_welcome", "A packet sent before the welcome.";
    ControlRate = 13 => "control_rate", "Control messages faster than a client sends them.";
    AdvertiseRefused = 14 => "advertise_refused", "A hello advertising a prefix its identity may not have.";
    LearnedRouteRefused = 15 => "learned_route_refused", "A route from the connector this client would not install.";
    DescriptorsLow = 16 => "descriptors_low", "A connection refused to keep descriptors for status and the tunnel.";
    AccessStreams = 17 => "access_streams", "An access stream past the most open at once.";
    FrameUnknownType = 18 => "frame_unknown_type", "A TCP-fallback frame of a type no version sends.";
    FrameUnexpectedType = 19 => "frame_unexpected_type", "A frame type this side never receives.";
    DnsQueueFull = 20 => "dns_queue_full", "A relayed query the forwarder's queue had no room for.";
    }
}

reasons! {
    /// Why a connection never authenticated (before any identity is known).
    Failure {
    TlsFailed = 0 => "tls_failed", "The TLS handshake failed (no or a foreign certificate, a revoked one, ...).";
    TimedOut = 1 => "timed_out", "No TLS handshake in time.";
    OverCapacity = 2 => "over_capacity", "As many handshakes pending as the connector allows.";
    OverCapacityPerSource = 3 => "over_capacity_per_source", "As many handshakes pending from this source as one may have.";
    NoName = 4 => "no_name", "A certificate without a name.";
    BadName = 5 => "bad_name", "A certificate name that is no plain name.";
    }
}

impl Limit {
    /// The bound a TCP-fallback frame broke.
    pub fn of_frame(e: crate::core::frame::FrameError) -> Limit {
        use crate::core::frame::FrameError;
        match e {
            FrameError::UnknownType(_) => Limit::FrameUnknownType,
            FrameError::TooLong(_) => Limit::FrameTooLong,
            FrameError::Unexpected(_) => Limit::FrameUnexpectedType,
        }
    }
}

impl Failure {
    pub fn of_slot(s: crate::core::limits::SlotRefused) -> Failure {
        match s {
            crate::core::limits::SlotRefused::Global => Failure::OverCapacity,
            crate::core::limits::SlotRefused::Source => Failure::OverCapacityPerSource,
        }
    }
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
            Malformed::SourceRoute => Drop::MalformedSourceRoute,
            Malformed::IpOptions => Drop::MalformedIpOptions,
            Malformed::BadOptions => Drop::MalformedBadOptions,
            Malformed::RoutingHeader => Drop::MalformedRoutingHeader,
            Malformed::ExtensionChain => Drop::MalformedExtensionChain,
        }
    }
}

macro_rules! counters {
    ($(#[$doc:meta])* $name:ident, $enum:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name([AtomicU64; $enum::ALL.len()]);

        impl Default for $name {
            fn default() -> Self {
                $name(std::array::from_fn(|_| AtomicU64::new(0)))
            }
        }

        impl $name {
            pub fn count(&self, d: $enum) {
                self.add(d, 1);
            }

            pub fn add(&self, d: $enum, n: u64) {
                if let Some(c) = self.0.get(d as usize) {
                    c.fetch_add(n, Ordering::Relaxed);
                }
            }

            pub fn get(&self, d: $enum) -> u64 {
                self.0
                    .get(d as usize)
                    .map_or(0, |c| c.load(Ordering::Relaxed))
            }

            /// Non-zero counters by name, as status and metrics show them.
            pub fn by_name(&self) -> BTreeMap<String, u64> {
                $enum::ALL
                    .iter()
                    .map(|d| (d.name().to_string(), self.get(*d)))
                    .filter(|(_, n)| *n > 0)
                    .collect()
            }
        }
    };
}

counters!(
    /// One counter per drop reason; shared by every task that moves packets, never locked.
    Drops,
    Drop
);
counters!(
    /// One counter per bound a peer ran into.
    Limits,
    Limit
);
counters!(
    /// One counter per reason a connection never authenticated.
    Failures,
    Failure
);

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
    fn a_malformed_packet_is_counted_under_its_parsers_name() {
        for m in [
            Malformed::Empty,
            Malformed::BadVersion,
            Malformed::TruncatedHeader,
            Malformed::BadHeaderLength,
            Malformed::TruncatedTransport,
            Malformed::SourceRoute,
            Malformed::IpOptions,
            Malformed::BadOptions,
            Malformed::RoutingHeader,
            Malformed::ExtensionChain,
        ] {
            assert_eq!(Drop::malformed(m).name(), format!("malformed_{}", m.name()));
        }
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
