//! TCP MSS clamping: a SYN crossing the tunnel promises to send no segment bigger than one
//! datagram carries, so TCP never needs fragmentation or a lost ICMP to find the tunnel's MTU.
//! This matters for forwarded LAN traffic, whose hosts see a 1500-byte link and know nothing
//! of the tunnel behind it.

use super::checksum;
use super::packet::PROTO_TCP as TCP;

const SYN: u8 = 0x02;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;

/// The largest MSS for packets of at most `mtu` bytes.
pub fn mss_for_mtu(mtu: usize, ipv6: bool) -> u16 {
    let headers = if ipv6 { 60 } else { 40 };
    u16::try_from(mtu.saturating_sub(headers)).unwrap_or(u16::MAX)
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) in `pkt` to at most what fits in `mtu`,
/// fixing the TCP checksum incrementally. Returns whether it changed the packet. Anything that
/// is not a well-formed SYN is left alone: clamping is an optimisation, never a reason to drop.
pub fn clamp(pkt: &mut [u8], mtu: usize) -> bool {
    let Some(&first) = pkt.first() else {
        return false;
    };
    let (l4, ipv6) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            let frag = pkt
                .get(6..8)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) & 0x1fff);
            if pkt.len() < 20 || ihl < 20 || pkt[9] != TCP || frag != Some(0) {
                return false;
            }
            (ihl, false)
        }
        // Extension headers before TCP are rare on SYNs; they are left unclamped.
        6 if pkt.len() >= 40 && pkt[6] == TCP => (40, true),
        _ => return false,
    };
    let max = mss_for_mtu(mtu, ipv6);
    let Some(tcp) = pkt.get_mut(l4..) else {
        return false;
    };
    if tcp.len() < 20 || tcp[13] & SYN == 0 {
        return false;
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < 20 || data_offset > tcp.len() {
        return false;
    }
    let mut i = 20;
    while i < data_offset {
        match tcp[i] {
            OPT_END => return false,
            OPT_NOP => i += 1,
            kind => {
                let Some(&len) = tcp.get(i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > data_offset {
                    return false;
                }
                if kind == OPT_MSS && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= max {
                        return false;
                    }
                    set_u16_fixing_checksum(tcp, i + 2, max);
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// Writes `value` at `at` in a TCP segment and updates its checksum (bytes 16..18) by
/// RFC 1624, also when `at` is odd and the value straddles two checksum words.
fn set_u16_fixing_checksum(tcp: &mut [u8], at: usize, value: u16) {
    let word = |t: &[u8], w: usize| u16::from_be_bytes([t[w], t.get(w + 1).copied().unwrap_or(0)]);
    let words: &[usize] = if at.is_multiple_of(2) {
        &[at]
    } else {
        &[at - 1, at + 1]
    };
    let old: Vec<u16> = words.iter().map(|w| word(tcp, *w)).collect();
    tcp[at..at + 2].copy_from_slice(&value.to_be_bytes());
    let mut check = u16::from_be_bytes([tcp[16], tcp[17]]);
    for (w, o) in words.iter().zip(old) {
        check = checksum::update(check, o, word(tcp, *w));
    }
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packet::tests::v4;

    /// Straightforward full checksum over the IPv4 pseudo-header and segment, to check the
    /// incremental update against.
    fn tcp_checksum_v4(pkt: &[u8]) -> u16 {
        let seg = &pkt[20..];
        let mut data = Vec::new();
        data.extend_from_slice(&pkt[12..20]);
        data.extend_from_slice(&[0, TCP]);
        data.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        data.extend_from_slice(seg);
        checksum::checksum(&data, 0)
    }

    /// A SYN with `options`, its checksum set right.
    fn syn(options: &[u8]) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&22u16.to_be_bytes());
        tcp[12] = (((20 + options.len()) / 4) as u8) << 4;
        tcp[13] = SYN;
        tcp.extend_from_slice(options);
        let mut p = v4(TCP, [192, 0, 2, 10], [10, 128, 0, 10], &tcp);
        let c = tcp_checksum_v4(&p);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn mss_of(p: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([p[20 + at], p[21 + at]])
    }

    #[test]
    fn clamps_a_syn_to_the_tunnel_mtu_with_a_valid_checksum() {
        let mut p = syn(&[OPT_MSS, 4, 0x05, 0xb4]); // 1460
        assert!(clamp(&mut p, 1434));
        assert_eq!(mss_of(&p, 22), 1394);
        assert_eq!(tcp_checksum_v4(&p), 0, "checksum must verify");
    }

    #[test]
    fn clamps_an_mss_at_an_odd_offset() {
        let mut p = syn(&[OPT_NOP, OPT_MSS, 4, 0x05, 0xb4, OPT_NOP, OPT_NOP, OPT_NOP]);
        assert!(clamp(&mut p, 1434));
        assert_eq!(mss_of(&p, 23), 1394);
        assert_eq!(tcp_checksum_v4(&p), 0);
    }

    #[test]
    fn leaves_small_mss_non_syn_and_non_tcp_alone() {
        let mut p = syn(&[OPT_MSS, 4, 0x04, 0x00]); // 1024
        let before = p.clone();
        assert!(!clamp(&mut p, 1434));
        assert_eq!(p, before);
        let mut ack = syn(&[OPT_MSS, 4, 0x05, 0xb4]);
        ack[33] = 0x10;
        assert!(!clamp(&mut ack, 1434));
        let mut udp = v4(17, [1, 1, 1, 1], [2, 2, 2, 2], &[0u8; 8]);
        assert!(!clamp(&mut udp, 1434));
    }

    #[test]
    fn malformed_options_are_left_alone_without_panicking() {
        for opts in [
            &[OPT_MSS, 0, 0, 0][..],     // zero length
            &[OPT_MSS, 40, 5, 0xb4][..], // beyond the header
            &[OPT_MSS, 3, 5, 0xb4][..],  // wrong MSS length
            &[8, 1, 0, 0][..],           // length below 2
        ] {
            let mut p = syn(opts);
            let before = p.clone();
            assert!(!clamp(&mut p, 1434), "{opts:?}");
            assert_eq!(p, before);
        }
        let mut p = syn(&[OPT_MSS, 4, 0x05, 0xb4]);
        p[32] = 0xf0; // data offset 60 > segment
        assert!(!clamp(&mut p, 1434));
        for len in 0..p.len() {
            let mut t = p[..len].to_vec();
            let _ = clamp(&mut t, 1434);
        }
    }

    #[test]
    fn mss_leaves_room_for_the_headers() {
        assert_eq!(mss_for_mtu(1434, false), 1394);
        assert_eq!(mss_for_mtu(1434, true), 1374);
        assert_eq!(mss_for_mtu(10, true), 0);
    }
}
