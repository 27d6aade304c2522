//! Just enough IP parsing for the tunnel's decisions: addresses, protocol, destination port.
//! Bounds-checked slices only; malformed input is an error value, never a panic.

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
}

impl Malformed {
    pub const fn name(self) -> &'static str {
        match self {
            Malformed::Empty => "empty",
            Malformed::BadVersion => "bad_version",
            Malformed::TruncatedHeader => "truncated_header",
            Malformed::BadHeaderLength => "bad_header_length",
            Malformed::TruncatedTransport => "truncated_transport",
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
    // Hop-by-hop, routing, destination options and fragment headers; bounded so a chain of
    // headers cannot keep us busy.
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                let len =
                    (usize::from(*pkt.get(off + 1).ok_or(Malformed::TruncatedHeader)?) + 1) * 8;
                next = *pkt.get(off).ok_or(Malformed::TruncatedHeader)?;
                off += len;
            }
            44 => {
                let frag = be16(pkt, off + 2).ok_or(Malformed::TruncatedHeader)?;
                later_fragment = frag & 0xfff8 != 0;
                next = *pkt.get(off).ok_or(Malformed::TruncatedHeader)?;
                off += 8;
            }
            _ => break,
        }
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
