//! Just enough IP parsing for the tunnel's decisions: addresses, protocol, destination port.
//! Bounds-checked slices only; malformed input is an error value, never a panic.
//!
//! Packets that ask routers to do more than forward them by destination are refused here, in
//! both directions, so no policy rule can let them through: IPv4 source routes (LSRR, SSRR)
//! and every other IPv4 option (record route and timestamp would have VPC routers write their
//! addresses and clocks into packets that go back to the client; router alert and the rest ask
//! for handling nobody here has vetted; nothing the tunnel carries needs one), and IPv6
//! Routing headers of any type, wherever they sit in the (bounded) extension-header chain.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 protocol / IPv6 next header after the extension headers we walk.
    pub proto: u8,
    /// TCP/UDP destination port, or the ICMP type; `None` in a non-first fragment.
    pub dst_port: Option<u16>,
    /// TCP/UDP source port; `None` for other protocols and in a non-first fragment. Replies to
    /// connections an `inbound` policy rule lets the VPC open are recognised by it.
    pub src_port: Option<u16>,
    /// A fragment other than the first: it carries no transport header.
    pub later_fragment: bool,
}

/// Why a packet could not be parsed. Names are stable: they label drop counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Empty,
    BadVersion,
    TruncatedHeader,
    BadHeaderLength,
    TruncatedTransport,
    /// IPv4 loose or strict source route (options 131, 137): the sender picks the path.
    SourceRoute,
    /// Any other IPv4 option than end-of-list and no-operation padding.
    IpOptions,
    /// An IPv4 option whose length runs past the header or is below 2.
    BadOptions,
    /// An IPv6 Routing header (next header 43), of any type.
    RoutingHeader,
    /// More IPv6 extension headers than the bounded walk reads.
    ExtensionChain,
}

impl Malformed {
    pub const fn name(self) -> &'static str {
        match self {
            Malformed::Empty => "empty",
            Malformed::BadVersion => "bad_version",
            Malformed::TruncatedHeader => "truncated_header",
            Malformed::BadHeaderLength => "bad_header_length",
            Malformed::TruncatedTransport => "truncated_transport",
            Malformed::SourceRoute => "source_route",
            Malformed::IpOptions => "ip_options",
            Malformed::BadOptions => "bad_options",
            Malformed::RoutingHeader => "routing_header",
            Malformed::ExtensionChain => "extension_chain",
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses the IP header (and the transport header's first bytes) of `pkt`.
pub fn parse(pkt: &[u8]) -> Result<PacketMeta, Malformed> {
    let first = *pkt.first().ok_or(Malformed::Empty)?;
    match first >> 4 {
        4 => parse_v4(pkt),
        6 => parse_v6(pkt),
        _ => Err(Malformed::BadVersion),
    }
}

fn parse_v4(pkt: &[u8]) -> Result<PacketMeta, Malformed> {
    if pkt.len() < 20 {
        return Err(Malformed::TruncatedHeader);
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let total = usize::from(be16(pkt, 2).ok_or(Malformed::TruncatedHeader)?);
    if ihl < 20 || total < ihl || pkt.len() < ihl {
        return Err(Malformed::BadHeaderLength);
    }
    check_v4_options(&pkt[20..ihl])?;
    let frag = be16(pkt, 6).ok_or(Malformed::TruncatedHeader)?;
    let later_fragment = frag & 0x1fff != 0;
    let proto = pkt[9];
    let src = IpAddr::V4(Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]));
    let (dst_port, src_port) = if later_fragment {
        (None, None)
    } else {
        let (dst, src) = transport_ports(pkt, ihl, proto)?;
        (Some(dst), src)
    };
    Ok(PacketMeta {
        src,
        dst,
        proto,
        dst_port,
        src_port,
        later_fragment,
    })
}

fn parse_v6(pkt: &[u8]) -> Result<PacketMeta, Malformed> {
    if pkt.len() < 40 {
        return Err(Malformed::TruncatedHeader);
    }
    let addr = |at: usize| -> IpAddr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&pkt[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    let (src, dst) = (addr(8), addr(24));
    let mut next = pkt[6];
    let mut off = 40;
    let mut later_fragment = false;
    // Hop-by-hop, destination options, authentication and fragment headers; bounded so a chain of headers
    // cannot keep us busy, and a chain longer than the bound is refused rather than taken for
    // the transport protocol (it could hide a Routing header behind it).
    let mut walked = 0;
    loop {
        match next {
            EXT_ROUTING => return Err(Malformed::RoutingHeader),
            EXT_HOP_BY_HOP | EXT_DEST_OPTS | EXT_AUTH | EXT_FRAGMENT
                if walked == MAX_EXT_HEADERS =>
            {
                return Err(Malformed::ExtensionChain);
            }
            EXT_HOP_BY_HOP | EXT_DEST_OPTS => {
                let len =
                    (usize::from(*pkt.get(off + 1).ok_or(Malformed::TruncatedHeader)?) + 1) * 8;
                next = *pkt.get(off).ok_or(Malformed::TruncatedHeader)?;
                off += len;
            }
            EXT_AUTH => {
                // Its length is in 4-byte units, less 2 (RFC 4302).
                let len =
                    (usize::from(*pkt.get(off + 1).ok_or(Malformed::TruncatedHeader)?) + 2) * 4;
                next = *pkt.get(off).ok_or(Malformed::TruncatedHeader)?;
                off += len;
            }
            EXT_FRAGMENT => {
                let frag = be16(pkt, off + 2).ok_or(Malformed::TruncatedHeader)?;
                later_fragment = frag & 0xfff8 != 0;
                next = *pkt.get(off).ok_or(Malformed::TruncatedHeader)?;
                off += 8;
                if later_fragment {
                    // The rest is payload, not headers. A Routing header right behind the
                    // fragment header is in every fragment's next-header field: refuse them all.
                    if next == EXT_ROUTING {
                        return Err(Malformed::RoutingHeader);
                    }
                    break;
                }
            }
            _ => break,
        }
        walked += 1;
    }
    let (dst_port, src_port) = if later_fragment {
        (None, None)
    } else {
        let (dst, src) = transport_ports(pkt, off, next)?;
        (Some(dst), src)
    };
    Ok(PacketMeta {
        src,
        dst,
        proto: next,
        dst_port,
        src_port,
        later_fragment,
    })
}

const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_DEST_OPTS: u8 = 60;
const EXT_AUTH: u8 = 51;
/// Extension headers read before giving up: real packets carry one or two.
const MAX_EXT_HEADERS: usize = 8;

const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_LSRR: u8 = 131;
const OPT_SSRR: u8 = 137;

/// Refuses IPv4 options (see the module comment). `opts` is the header past its first 20
/// bytes; every option is walked, so a source route behind another option is still named.
fn check_v4_options(opts: &[u8]) -> Result<(), Malformed> {
    let mut found = None;
    let mut i = 0;
    while let Some(&kind) = opts.get(i) {
        match kind {
            OPT_END => break,
            OPT_NOP => i += 1,
            _ => {
                let len = usize::from(*opts.get(i + 1).ok_or(Malformed::BadOptions)?);
                if len < 2 || i + len > opts.len() {
                    return Err(Malformed::BadOptions);
                }
                if matches!(kind, OPT_LSRR | OPT_SSRR) {
                    return Err(Malformed::SourceRoute);
                }
                found = Some(Malformed::IpOptions);
                i += len;
            }
        }
    }
    found.map_or(Ok(()), Err)
}

/// TCP/UDP destination and source port, or the ICMP type for ICMP; 0 for other protocols.
fn transport_ports(pkt: &[u8], off: usize, proto: u8) -> Result<(u16, Option<u16>), Malformed> {
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let dst = be16(pkt, off + 2).ok_or(Malformed::TruncatedTransport)?;
            Ok((dst, be16(pkt, off)))
        }
        PROTO_ICMP | PROTO_ICMPV6 => pkt
            .get(off)
            .map(|t| (u16::from(*t), None))
            .ok_or(Malformed::TruncatedTransport),
        _ => Ok((0, None)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal IPv4 packet: 20-byte header, then `l4`.
    pub(crate) fn v4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    pub(crate) fn v6(next: u8, src: Ipv6Addr, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    pub(crate) fn tcp_to(port: u16) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&port.to_be_bytes());
        t[12] = 5 << 4;
        t
    }

    #[test]
    fn reads_tcp_destination_port_over_ipv4() {
        let p = v4(PROTO_TCP, [100, 64, 0, 2], [10, 128, 0, 10], &tcp_to(22));
        let m = parse(&p).expect("valid");
        assert_eq!(m.dst, "10.128.0.10".parse::<IpAddr>().expect("ip"));
        assert_eq!((m.proto, m.dst_port), (PROTO_TCP, Some(22)));
        assert_eq!(m.src_port, Some(40000));
    }

    #[test]
    fn reads_icmpv6_type_after_a_hop_by_hop_header() {
        let mut l4 = vec![PROTO_ICMPV6, 0, 0, 0, 0, 0, 0, 0]; // hop-by-hop, 8 bytes
        l4.extend_from_slice(&[128, 0, 0, 0]); // echo request
        let p = v6(
            0,
            "fd00:64::2".parse().expect("ip"),
            "fd00:128::10".parse().expect("ip"),
            &l4,
        );
        let m = parse(&p).expect("valid");
        assert_eq!((m.proto, m.dst_port), (PROTO_ICMPV6, Some(128)));
    }

    #[test]
    fn later_fragments_have_no_port() {
        let mut p = v4(PROTO_UDP, [1, 1, 1, 1], [2, 2, 2, 2], &[0u8; 8]);
        p[6..8].copy_from_slice(&100u16.to_be_bytes());
        let m = parse(&p).expect("valid");
        assert!(m.later_fragment);
        assert_eq!((m.dst_port, m.src_port), (None, None));
    }

    #[test]
    fn rejects_truncated_and_malformed_packets() {
        assert_eq!(parse(&[]), Err(Malformed::Empty));
        assert_eq!(parse(&[0x55; 40]), Err(Malformed::BadVersion));
        assert_eq!(parse(&[0x45; 19]), Err(Malformed::TruncatedHeader));
        let mut p = v4(PROTO_TCP, [1, 1, 1, 1], [2, 2, 2, 2], &tcp_to(22));
        p[0] = 0x44; // IHL 16 bytes
        assert_eq!(parse(&p), Err(Malformed::BadHeaderLength));
        let p = v4(PROTO_TCP, [1, 1, 1, 1], [2, 2, 2, 2], &[0, 1]);
        assert_eq!(parse(&p), Err(Malformed::TruncatedTransport));
        assert_eq!(parse(&[0x60; 39]), Err(Malformed::TruncatedHeader));
    }

    /// `v4` with `opts` (padded to a multiple of 4 bytes with end-of-list) after the header.
    fn v4_with_options(opts: &[u8], l4: &[u8]) -> Vec<u8> {
        let mut opts = opts.to_vec();
        while !opts.len().is_multiple_of(4) {
            opts.push(OPT_END);
        }
        let plain = v4(PROTO_TCP, [100, 64, 0, 2], [10, 128, 0, 10], l4);
        let ihl = (20 + opts.len()) / 4;
        let mut p = plain[..20].to_vec();
        p[0] = 0x40 | ihl as u8;
        p[2..4].copy_from_slice(&((20 + opts.len() + l4.len()) as u16).to_be_bytes());
        p.extend_from_slice(&opts);
        p.extend_from_slice(l4);
        p
    }

    /// A loose (131) or strict (137) source route through 192.0.2.1.
    fn source_route(kind: u8) -> Vec<u8> {
        vec![kind, 7, 4, 192, 0, 2, 1]
    }

    #[test]
    fn refuses_ipv4_loose_and_strict_source_routes() {
        for kind in [OPT_LSRR, OPT_SSRR] {
            let p = v4_with_options(&source_route(kind), &tcp_to(22));
            assert_eq!(parse(&p), Err(Malformed::SourceRoute), "option {kind}");
        }
        // Behind padding and another option it is still found and named.
        let mut opts = vec![OPT_NOP, 7, 3, 4]; // NOP, then an empty record route
        opts.extend_from_slice(&source_route(OPT_SSRR));
        let p = v4_with_options(&opts, &tcp_to(22));
        assert_eq!(parse(&p), Err(Malformed::SourceRoute));
        // A later fragment carries it too (the option's copy bit): refused as well.
        let mut p = v4_with_options(&source_route(OPT_LSRR), &[0u8; 8]);
        p[6..8].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse(&p), Err(Malformed::SourceRoute));
    }

    #[test]
    fn refuses_record_route_timestamp_and_router_alert() {
        for opts in [
            vec![7, 7, 4, 0, 0, 0, 0],     // record route
            vec![68, 8, 5, 0, 0, 0, 0, 0], // timestamp
            vec![148, 4, 0, 0],            // router alert
        ] {
            let p = v4_with_options(&opts, &tcp_to(22));
            assert_eq!(parse(&p), Err(Malformed::IpOptions), "{opts:?}");
        }
    }

    #[test]
    fn accepts_ipv4_header_padding_and_refuses_broken_option_lengths() {
        let p = v4_with_options(&[OPT_NOP, OPT_NOP, OPT_NOP, OPT_END], &tcp_to(22));
        assert_eq!(parse(&p).map(|m| m.dst_port), Ok(Some(22)));
        for opts in [
            vec![7, 1, 0, 0],
            vec![7, 9, 4, 0],
            vec![OPT_NOP, OPT_NOP, OPT_NOP, 7],
        ] {
            let p = v4_with_options(&opts, &tcp_to(22));
            assert_eq!(parse(&p), Err(Malformed::BadOptions), "{opts:?}");
        }
    }

    fn ext(next: u8) -> Vec<u8> {
        vec![next, 0, 0, 0, 0, 0, 0, 0]
    }

    fn v6_with(headers: &[(u8, Vec<u8>)], l4: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for (_, h) in headers {
            body.extend_from_slice(h);
        }
        body.extend_from_slice(l4);
        let first = headers.first().map_or(PROTO_TCP, |(kind, _)| *kind);
        v6(
            first,
            "fd00:64::2".parse().expect("ip"),
            "fd00:128::10".parse().expect("ip"),
            &body,
        )
    }

    #[test]
    fn refuses_ipv6_routing_headers_wherever_they_sit() {
        let routing = |next| vec![next, 0, 2, 0, 0, 0, 0, 0]; // type 2, segments left 0
        let cases = [
            vec![(EXT_ROUTING, routing(PROTO_TCP))],
            vec![
                (EXT_HOP_BY_HOP, ext(EXT_DEST_OPTS)),
                (EXT_DEST_OPTS, ext(EXT_ROUTING)),
                (EXT_ROUTING, routing(PROTO_TCP)),
            ],
            // Behind an authentication header (length 4 => 24 bytes).
            vec![
                (EXT_AUTH, {
                    let mut ah = vec![EXT_ROUTING, 4];
                    ah.resize(24, 0);
                    ah
                }),
                (EXT_ROUTING, routing(PROTO_TCP)),
            ],
            // First fragment: the routing header behind the fragment header.
            vec![
                (EXT_FRAGMENT, vec![EXT_ROUTING, 0, 0, 1, 0, 0, 0, 1]),
                (EXT_ROUTING, routing(PROTO_TCP)),
            ],
        ];
        for headers in cases {
            let p = v6_with(&headers, &tcp_to(22));
            assert_eq!(parse(&p), Err(Malformed::RoutingHeader), "{headers:?}");
        }
        // A later fragment of such a packet names it in the fragment header: refused too.
        let p = v6_with(
            &[(EXT_FRAGMENT, vec![EXT_ROUTING, 0, 0x05, 0x01, 0, 0, 0, 1])],
            &[0u8; 16],
        );
        assert_eq!(parse(&p), Err(Malformed::RoutingHeader));
    }

    #[test]
    fn walks_a_bounded_ipv6_extension_chain_and_refuses_a_longer_one() {
        let chain = |n: usize| -> Vec<(u8, Vec<u8>)> {
            (0..n)
                .map(|i| {
                    let next = if i + 1 == n { PROTO_TCP } else { EXT_DEST_OPTS };
                    (EXT_DEST_OPTS, ext(next))
                })
                .collect()
        };
        let p = v6_with(&chain(MAX_EXT_HEADERS), &tcp_to(22));
        assert_eq!(
            parse(&p).map(|m| (m.proto, m.dst_port)),
            Ok((PROTO_TCP, Some(22)))
        );
        let p = v6_with(&chain(MAX_EXT_HEADERS + 1), &tcp_to(22));
        assert_eq!(parse(&p), Err(Malformed::ExtensionChain));
        // An authentication header is walked too: the policy sees the TCP behind it.
        let mut ah = vec![PROTO_TCP, 1]; // (1 + 2) * 4 = 12 bytes
        ah.resize(12, 0);
        let p = v6_with(&[(EXT_AUTH, ah)], &tcp_to(22));
        assert_eq!(
            parse(&p).map(|m| (m.proto, m.dst_port)),
            Ok((PROTO_TCP, Some(22)))
        );
    }

    #[test]
    fn a_later_ipv6_fragment_is_not_walked_as_headers() {
        // The payload of a later fragment starts with bytes that look like a short header.
        let p = v6_with(
            &[(EXT_FRAGMENT, vec![EXT_DEST_OPTS, 0, 0x05, 0x01, 0, 0, 0, 1])],
            &[0xff, 0xff],
        );
        let m = parse(&p).expect("a later fragment");
        assert!(m.later_fragment);
        assert_eq!(m.dst_port, None);
    }

    #[test]
    fn refusal_names_are_the_drop_counter_labels() {
        let names: Vec<_> = [
            Malformed::SourceRoute,
            Malformed::IpOptions,
            Malformed::BadOptions,
            Malformed::RoutingHeader,
            Malformed::ExtensionChain,
        ]
        .iter()
        .map(|m| format!("malformed_{}", m.name()))
        .collect();
        assert_eq!(
            names,
            [
                "malformed_source_route",
                "malformed_ip_options",
                "malformed_bad_options",
                "malformed_routing_header",
                "malformed_extension_chain"
            ]
        );
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut x: u32 = 0x1234_5678;
        let mut buf = [0u8; 96];
        for round in 0..20_000 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            buf[0] = if round % 2 == 0 { 0x45 } else { 0x60 };
            let len = (x as usize) % buf.len();
            let _ = parse(&buf[..len]);
        }
    }
}
