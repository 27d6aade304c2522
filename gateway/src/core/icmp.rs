//! "Fragmentation needed" (ICMPv4) and "packet too big" (ICMPv6) for packets larger than one
//! tunnel datagram, so the sender's path MTU discovery learns the tunnel's MTU instead of its
//! packets vanishing.
//!
//! Not sent in answer to an ICMP error (RFC 1122/4443), nor for an IPv4 packet without DF:
//! the sender did not ask for path MTU discovery, and the caller counts and drops those.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::checksum::{checksum, sum16};
use super::packet::{PROTO_ICMP, PROTO_ICMPV6};

/// IPv6's minimum MTU: an ICMPv6 error never exceeds it.
const IPV6_MIN_MTU: usize = 1280;

/// Writes into `out` the ICMP telling the sender of `pkt` that at most `mtu` bytes fit, from
/// `from_v4`/`from_v6` (an address of this node). Returns its length, or `None` when no ICMP
/// is due (see the module comment) or `pkt` is malformed.
pub fn too_big(
    pkt: &[u8],
    mtu: u16,
    from_v4: Ipv4Addr,
    from_v6: Ipv6Addr,
    out: &mut [u8],
) -> Option<usize> {
    match pkt.first()? >> 4 {
        4 => too_big_v4(pkt, mtu, from_v4, out),
        6 => too_big_v6(pkt, u32::from(mtu).max(IPV6_MIN_MTU as u32), from_v6, out),
        _ => None,
    }
}

fn too_big_v4(pkt: &[u8], mtu: u16, from: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl {
        return None;
    }
    let dont_fragment = pkt[6] & 0x40 != 0;
    let later_fragment = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff != 0;
    if !dont_fragment || later_fragment {
        return None;
    }
    if pkt[9] == PROTO_ICMP {
        // Only echo requests get an answer; an ICMP error never causes another.
        let icmp_type = *pkt.get(ihl)?;
        if !matches!(icmp_type, 0 | 8 | 13 | 14) {
            return None;
        }
    }
    let quoted = (ihl + 8).min(pkt.len());
    let len = 20 + 8 + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[6] = 0x40; // DF
    out[8] = 64; // TTL
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&from.octets());
    out[16..20].copy_from_slice(&pkt[12..16]); // back to the sender
    let ip_sum = checksum(&out[..20], 0);
    out[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    out[20] = 3; // destination unreachable
    out[21] = 4; // fragmentation needed and DF set
    out[26..28].copy_from_slice(&mtu.to_be_bytes());
    out[28..].copy_from_slice(&pkt[..quoted]);
    let icmp_sum = checksum(&out[20..], 0);
    out[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
    Some(len)
}

fn too_big_v6(pkt: &[u8], mtu: u32, from: Ipv6Addr, out: &mut [u8]) -> Option<usize> {
    if pkt.len() < 40 {
        return None;
    }
    // Never about an ICMPv6 error (types below 128). Extension headers before ICMPv6 are rare
    // enough not to look behind.
    if pkt[6] == PROTO_ICMPV6 && pkt.get(40).is_some_and(|t| *t < 128) {
        return None;
    }
    let quoted = pkt.len().min(IPV6_MIN_MTU - 40 - 8);
    let payload = 8 + quoted;
    let len = 40 + payload;
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x60;
    out[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    out[6] = PROTO_ICMPV6;
    out[7] = 64;
    out[8..24].copy_from_slice(&from.octets());
    out[24..40].copy_from_slice(&pkt[8..24]);
    out[40] = 2; // packet too big
    out[44..48].copy_from_slice(&mtu.to_be_bytes());
    out[48..].copy_from_slice(&pkt[..quoted]);
    // Pseudo-header: source and destination, length, next header.
    let pseudo = sum16(&out[8..40]) + payload as u32 + u32::from(PROTO_ICMPV6);
    let icmp_sum = checksum(&out[40..], pseudo);
    out[42..44].copy_from_slice(&icmp_sum.to_be_bytes());
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packet::{self, tests as p};

    const FROM4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn from6() -> Ipv6Addr {
        "fd00:64::2".parse().expect("ip")
    }

    fn verify(sum_over: &[u8]) -> bool {
        checksum(sum_over, 0) == 0
    }

    #[test]
    fn ipv4_df_packet_gets_fragmentation_needed_with_the_mtu() {
        let big = p::v4(17, [192, 0, 2, 10], [10, 128, 0, 10], &[0u8; 1472]);
        let mut out = [0u8; 1500];
        let n = too_big(&big, 1434, FROM4, from6(), &mut out).expect("icmp due");
        let reply = &out[..n];
        let meta = packet::parse(reply).expect("a valid packet");
        assert_eq!(meta.src, std::net::IpAddr::V4(FROM4));
        assert_eq!(meta.dst.to_string(), "192.0.2.10");
        assert_eq!((reply[20], reply[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([reply[26], reply[27]]), 1434);
        assert_eq!(&reply[28..48], &big[..20], "quotes the original header");
        assert!(verify(&reply[..20]), "IP checksum");
        assert!(verify(&reply[20..]), "ICMP checksum");
    }

    #[test]
    fn no_icmp_without_df_for_fragments_or_for_icmp_errors() {
        let mut out = [0u8; 1500];
        let mut no_df = p::v4(17, [1, 1, 1, 1], [2, 2, 2, 2], &[0u8; 1500]);
        no_df[6] = 0;
        assert_eq!(too_big(&no_df, 1400, FROM4, from6(), &mut out), None);
        let mut err = p::v4(PROTO_ICMP, [1, 1, 1, 1], [2, 2, 2, 2], &[3u8; 1500]);
        err[6] = 0x40;
        assert_eq!(too_big(&err, 1400, FROM4, from6(), &mut out), None);
        let echo = p::v4(PROTO_ICMP, [1, 1, 1, 1], [2, 2, 2, 2], &[8u8; 1500]);
        assert!(too_big(&echo, 1400, FROM4, from6(), &mut out).is_some());
        let v6_err = p::v6(PROTO_ICMPV6, from6(), from6(), &[1u8; 1500]);
        assert_eq!(too_big(&v6_err, 1400, FROM4, from6(), &mut out), None);
    }

    #[test]
    fn ipv6_packet_too_big_fits_in_1280_and_verifies() {
        let src: Ipv6Addr = "2001:db8:2::10".parse().expect("ip");
        let big = p::v6(17, src, "fd00:128::10".parse().expect("ip"), &[7u8; 1600]);
        let mut out = [0u8; 2000];
        let n = too_big(&big, 1434, FROM4, from6(), &mut out).expect("icmp due");
        assert_eq!(n, 1280);
        let reply = &out[..n];
        assert_eq!(reply[40], 2);
        assert_eq!(
            u32::from_be_bytes([reply[44], reply[45], reply[46], reply[47]]),
            1434
        );
        assert_eq!(&reply[24..40], &src.octets());
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&reply[8..40]);
        pseudo.extend_from_slice(&((n - 40) as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
        pseudo.extend_from_slice(&reply[40..]);
        assert!(verify(&pseudo), "ICMPv6 checksum");
    }

    #[test]
    fn malformed_or_short_input_and_small_buffers_give_nothing() {
        let mut out = [0u8; 64];
        assert_eq!(too_big(&[], 1400, FROM4, from6(), &mut out), None);
        assert_eq!(too_big(&[0x45; 10], 1400, FROM4, from6(), &mut out), None);
        let big = p::v4(17, [1, 1, 1, 1], [2, 2, 2, 2], &[0u8; 100]);
        let mut tiny = [0u8; 20];
        assert_eq!(too_big(&big, 1400, FROM4, from6(), &mut tiny), None);
        for len in 0..big.len() {
            let _ = too_big(&big[..len], 1400, FROM4, from6(), &mut out);
        }
    }
}
