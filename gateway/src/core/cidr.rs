//! Strict parsing of the address and port ranges an operator writes, shared by config
//! validation and the policy grammar so both refuse the same typos with the same words.

use ipnet::IpNet;

/// Parses a CIDR strictly: the address must be the network address, so a typo such as
/// `10.128.0.1/16` is caught instead of silently widened or narrowed.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.trim().parse().map_err(|_| {
        format!(
            "{s:?} is not a CIDR (expected ADDRESS/PREFIX, e.g. 10.128.0.0/16 or fd00:128::/64)"
        )
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; the network is {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// `LOW-HIGH`, both in 1024-65535: pinned ports live above the privileged ones.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not LOW-HIGH, e.g. 40000-40999"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p >= 1024)
            .ok_or_else(|| format!("{p:?} is not a port in 1024-65535"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(format!("{s:?} is backwards"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cidr_must_name_its_network() {
        assert_eq!(
            parse_cidr(" 10.128.0.0/16 ").map(|n| n.to_string()),
            Ok("10.128.0.0/16".to_string())
        );
        assert!(parse_cidr("fd00:128::/64").is_ok());
        let err = parse_cidr("10.128.0.1/16").expect_err("host bits");
        assert!(err.contains("the network is 10.128.0.0/16"), "{err}");
        for bad in ["10.0.0.0/33", "10.0.0.0", "", "x/8"] {
            let err = parse_cidr(bad).expect_err(bad);
            assert!(err.contains("is not a CIDR"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_port_range_is_unprivileged_and_in_order() {
        assert_eq!(parse_port_range("40000-40999"), Ok((40000, 40999)));
        assert_eq!(parse_port_range("1024 - 1024"), Ok((1024, 1024)));
        for (bad, says) in [
            ("40000", "is not LOW-HIGH"),
            ("80-1024", "is not a port in 1024-65535"),
            ("1024-99999", "is not a port in 1024-65535"),
            ("2000-1999", "is backwards"),
        ] {
            let err = parse_port_range(bad).expect_err(bad);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
