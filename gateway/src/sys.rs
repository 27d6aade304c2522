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
