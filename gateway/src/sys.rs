//! Small wrappers over libc calls that have no well-kept crate of their own here.

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
