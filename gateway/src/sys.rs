//! Small wrappers over what only the system can answer: libc calls that have no well-kept
//! crate of their own here, and the wall clock (which core and node never read).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The interface's index in the current network namespace, if it exists.
pub fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// The driver behind an interface of this network namespace, as `ethtool -i` shows it ("tun"
/// for a TUN device, "veth", ...); `None` when it does not exist or reports none (loopback).
/// Asked with an ioctl on the interface, which sees the caller's namespace whatever /sys shows.
pub fn if_driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    /// `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    /// `struct ifreq` with the `ifr_data` member of its union (padded to the union's size).
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        pad: [u8; 16],
    }
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: (&raw mut info).cast(),
        pad: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() has no memory-safety requirements; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` is a valid ifreq whose data pointer refers to `info`, a properly sized
    // ethtool_drvinfo; both outlive the call, and the kernel writes only within them.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut req) };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Seconds since the Unix epoch by the wall clock, for timestamps an operator reads (status,
/// reloads, certificate expiry); 0 on a clock set before 1970.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Takes an exclusive advisory lock without waiting. The kernel drops it when the process dies,
/// however it dies, which is what makes it a reliable "is the previous daemon still alive" test.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a valid open fd has no memory-safety requirements.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Restricts the mode of every file the daemon creates (socket, state) to its owner.
pub fn set_private_umask() {
    // SAFETY: umask only changes process state and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Capabilities gatewayd needs: CAP_BPF and CAP_PERFMON to load programs and maps,
/// CAP_NET_ADMIN to attach them, CAP_SYS_ADMIN to ask the kernel which programs are attached
/// (bpf_prog_get_fd_by_id). Numbers from linux/capability.h.
pub const REQUIRED_CAPABILITIES: [(&str, u32); 4] = [
    ("CAP_NET_ADMIN", 12),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

/// Which of [`REQUIRED_CAPABILITIES`] this process lacks in its effective set, read from
/// /proc/self/status so a missing one is named up front instead of surfacing as a verifier
/// error about a bad file descriptor.
pub fn missing_capabilities() -> io::Result<Vec<&'static str>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let effective = parse_cap_eff(&status)
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))?;
    Ok(REQUIRED_CAPABILITIES
        .iter()
        .filter(|(_, bit)| effective & (1u64 << bit) == 0)
        .map(|(name, _)| *name)
        .collect())
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_driver_of_an_interface_or_none() {
        assert_eq!(if_driver("gwnosuch0"), None, "no such interface");
        assert_eq!(if_driver("lo"), None, "loopback reports no driver");
        assert_eq!(if_driver(""), None);
        assert_eq!(if_driver("a-name-far-too-long"), None);
    }

    #[test]
    fn reads_the_effective_capability_mask() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000201000\n";
        let eff = parse_cap_eff(status).expect("parsed");
        for (name, bit) in REQUIRED_CAPABILITIES {
            assert!(eff & (1 << bit) != 0, "{name}");
        }
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
