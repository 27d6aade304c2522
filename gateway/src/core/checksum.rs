//! The Internet checksum (RFC 1071) of the IP, ICMP, UDP and TCP headers this program writes
//! or edits, and its incremental update (RFC 1624), in one place so every writer agrees on
//! byte order, odd lengths and the end-around carry.

/// The ones'-complement sum of `data` as big-endian 16-bit words, an odd last byte padded
/// with zero; not yet folded, so sums of several parts (a pseudo-header, then the segment)
/// can be added before [`finish`].
pub fn sum16(data: &[u8]) -> u32 {
    let total: u64 = data
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    // Fold into 32 bits so a caller may add a few more words without overflow, whatever
    // the length of `data`.
    let mut s = total;
    while s > u64::from(u32::MAX >> 1) {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u32
}

/// Folds the carries of `sum` back in and complements it: the value for a checksum field.
pub fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum of `data` with `initial` (a pseudo-header's [`sum16`], or 0) added in. Over
/// data that holds its own correct checksum, it is 0.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    finish(initial + sum16(data))
}

/// The checksum `check` after one 16-bit word it covers changed from `old` to `new`, by
/// RFC 1624 eqn. 3 (`HC' = ~(~HC + ~m + m')`), which never yields the 0xffff that eqn. 2 can.
pub fn update(check: u16, old: u16, new: u16) -> u16 {
    finish(u32::from(!check) + u32::from(!old) + u32::from(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_as_rfc_1071_shows() {
        // RFC 1071 section 3: these bytes sum to 0x2ddf0, folded 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum16(&data), 0x2ddf0);
        assert_eq!(checksum(&data, 0), !0xddf2);
    }

    #[test]
    fn an_odd_last_byte_counts_as_the_high_half_of_a_word() {
        assert_eq!(sum16(&[0x12]), 0x1200);
        assert_eq!(sum16(&[0xab, 0xcd, 0x12]), 0xabcd + 0x1200);
        assert_eq!(checksum(&[], 0), 0xffff);
    }

    #[test]
    fn data_holding_its_checksum_verifies_to_zero() {
        // An IPv4 header with its checksum field zeroed, then filled in.
        let mut ip = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let c = checksum(&ip, 0);
        assert_eq!(c, 0xb861, "the worked example's header checksum");
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&ip, 0), 0);
    }

    #[test]
    fn updates_as_rfc_1624_shows() {
        // RFC 1624 section 4: eqn. 3 gives 0x0000 where eqn. 2 gave 0xffff.
        assert_eq!(update(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn an_update_matches_summing_again() {
        // Deterministic pseudo-random data; every word position changed in turn.
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 16) as u16
        };
        for len in [2usize, 20, 40, 60] {
            let mut data: Vec<u8> = (0..len / 2).flat_map(|_| next().to_be_bytes()).collect();
            for at in (0..len).step_by(2) {
                let before = checksum(&data, 0);
                let old = u16::from_be_bytes([data[at], data[at + 1]]);
                let new = next();
                data[at..at + 2].copy_from_slice(&new.to_be_bytes());
                let again = checksum(&data, 0);
                let updated = update(before, old, new);
                // Both are the same ones'-complement number; only the sign of zero may differ.
                assert!(
                    updated == again || (updated, again) == (0, 0xffff),
                    "len {len} at {at}: {updated:#06x} != {again:#06x}"
                );
            }
        }
    }
}
