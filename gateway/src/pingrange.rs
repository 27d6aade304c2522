//! `net.ipv4.ping_group_range`: whether this daemon may open ICMP echo sockets, and, when
//! configured to, widening it just enough and putting it back on stop.
//!
//! The sysctl is per network namespace and starts at `1 0` (nobody) in every new one; with it,
//! `socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)` fails with EACCES even for root. The decision is
//! a pure function; the IO is reading and writing the sysctl and trying to open the socket.

pub const SYSCTL: &str = "net.ipv4.ping_group_range";

/// Parses `"LOW HIGH"`; `1 0` (low above high) is the empty range.
pub fn parse(value: &str) -> Option<(u32, u32)> {
    let mut it = value.split_whitespace();
    let lo = it.next()?.parse().ok()?;
    let hi = it.next()?.parse().ok()?;
    it.next().is_none().then_some((lo, hi))
}

pub fn covers((lo, hi): (u32, u32), gid: u32) -> bool {
    lo <= gid && gid <= hi
}

/// The narrowest range that keeps every group the current one allows and adds `gid`.
pub fn widened((lo, hi): (u32, u32), gid: u32) -> (u32, u32) {
    if lo > hi {
        (gid, gid)
    } else {
        (lo.min(gid), hi.max(gid))
    }
}

pub fn format((lo, hi): (u32, u32)) -> String {
    format!("{lo} {hi}")
}

pub use crate::api::IcmpStatus;

/// Tries to open an IPv4 ICMP echo socket, the kind the daemon's probes use.
pub fn echo_socket_opens() -> bool {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::ICMPV4),
    )
    .is_ok()
}

pub fn gid() -> u32 {
    // SAFETY: getgid cannot fail and touches no memory.
    unsafe { libc::getgid() }
}

/// The live state for status, with `value` the sysctl as read (or why it could not be).
pub fn status(managed: bool, value: String) -> IcmpStatus {
    let gid = gid();
    let probes_possible = echo_socket_opens();
    let fix = (!probes_possible).then(|| {
        let wanted = parse(&value).map_or((gid, gid), |r| widened(r, gid));
        format!(
            "sysctl -w {SYSCTL}=\"{}\" (in the daemon's network namespace), or set [icmp] manage_ping_group_range = true",
            format(wanted)
        )
    });
    IcmpStatus {
        ping_group_range: value,
        gid,
        managed,
        probes_possible,
        fix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_range_is_empty_and_widening_adds_just_the_group() {
        let r = parse("1\t0").expect("parse");
        assert!(!covers(r, 0));
        assert_eq!(widened(r, 0), (0, 0));
        assert_eq!(widened((100, 200), 0), (0, 200));
        assert_eq!(widened((0, 2_147_483_647), 5), (0, 2_147_483_647));
        assert!(covers((0, 0), 0));
        assert_eq!(format((0, 0)), "0 0");
        assert_eq!(parse("1"), None);
        assert_eq!(parse("a b"), None);
        assert_eq!(parse("1 2 3"), None);
    }
}
