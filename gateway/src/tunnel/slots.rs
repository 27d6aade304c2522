//! The connector's bounds before authentication: slots for pending handshakes (globally and
//! per source), each held until the welcome, the refusal or the connection's end, and the
//! descriptors kept free below the limit. Shared by the accept loops and access streams.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use super::status::Shared;
use crate::core::limits::{HandshakeSlots, SlotRefused};
use crate::node::drops::{Failure, Limit};

/// Connections between their first packet and the welcome (TLS, then the hello), at once: each
/// holds up to two descriptors and ~100 KiB of TLS state; 256 is ~30 MiB at most, and far more
/// than legitimate clients ever start in one handshake time.
pub const MAX_PENDING: usize = 256;
/// The same from one source (an IPv4 address, an IPv6 /64): a site's NAT starting all its
/// clients at once stays below it, a single host cannot take the whole budget.
const MAX_PENDING_PER_SOURCE: usize = 16;
/// Above this many pending handshakes, a QUIC client must prove its address (a Retry) first,
/// so spoofed sources cannot hold slots.
const RETRY_ABOVE: usize = MAX_PENDING / 4;
/// Descriptors kept free below RLIMIT_NOFILE: new TCP connections (and access streams) are
/// refused closer to it, so `gatewayctl status`, netlink and DNS retries always get one.
pub const FD_HEADROOM: u64 = 128;

/// A pending handshake's share of the bounds, given back when dropped (after the welcome or
/// the refusal, or when the connection fails first).
pub struct Slot {
    slots: Arc<Mutex<HandshakeSlots>>,
    ip: IpAddr,
}

impl Slot {
    /// Enough handshakes are pending that new QUIC clients must prove their address first.
    pub fn busy(&self) -> bool {
        self.slots.lock().is_ok_and(|s| s.pending() > RETRY_ABOVE)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock() {
            s.release(self.ip);
        }
    }
}

/// The slots, and what counts their refusals.
#[derive(Clone)]
pub struct Slots {
    slots: Arc<Mutex<HandshakeSlots>>,
    shared: Arc<Shared>,
    /// RLIMIT_NOFILE at start.
    nofile: u64,
}

impl Slots {
    pub fn new(shared: Arc<Shared>, nofile: u64) -> Slots {
        Slots {
            slots: Arc::new(Mutex::new(HandshakeSlots::new(
                MAX_PENDING,
                MAX_PENDING_PER_SOURCE,
            ))),
            shared,
            nofile,
        }
    }

    /// A pending-handshake slot for a connection from `remote`; `None` (counted, and logged at
    /// a bounded rate) when the connector or that source has as many as it may.
    pub fn take(&self, remote: SocketAddr) -> Option<Slot> {
        let taken = self
            .slots
            .lock()
            .map_err(|_| SlotRefused::Global)
            .and_then(|mut s| s.take(remote.ip()));
        match taken {
            Ok(()) => Some(Slot {
                slots: self.slots.clone(),
                ip: remote.ip(),
            }),
            Err(why) => {
                let reason = match why {
                    SlotRefused::Global => format!("{MAX_PENDING} handshakes already pending"),
                    SlotRefused::Source => format!(
                        "{MAX_PENDING_PER_SOURCE} handshakes already pending from this source"
                    ),
                };
                self.shared
                    .handshake_failed(remote, Failure::of_slot(why), reason);
                None
            }
        }
    }

    /// Whether a descriptor just opened leaves FD_HEADROOM below the limit. The kernel hands
    /// out the lowest free number, so descriptor `n` means at least `n` are open.
    pub fn descriptors_left(&self, new: &impl AsRawFd) -> bool {
        let n = u64::try_from(new.as_raw_fd()).unwrap_or(u64::MAX);
        if n.saturating_add(FD_HEADROOM) < self.nofile {
            return true;
        }
        self.shared.limits.count(Limit::DescriptorsLow);
        false
    }
}

/// The soft RLIMIT_NOFILE (what `LimitNOFILE=` sets under systemd).
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed, nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    if rc == 0 { r.rlim_cur } else { 1024 }
}
