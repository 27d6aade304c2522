//! The packet loop from the TUN, the same on both ends, in the order a packet travels: read a
//! batch (a super-packet split into segments when the TUN has offload), let the datapath
//! snapshot decide each (`node::datapath`), then send it on its peer's link (waiting for room
//! rather than dropping), write an ICMP too-big back, or hand a steered DNS query to the relay.
//! Packets from links go the other way in `links`, gathered into [`ToTun`] batches. Also:
//! following each link's path (MTU, RTT) for the node.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE};

use super::status::Shared;
use super::stub::Relays;
use crate::node::LinkId;
use crate::node::datapath::{Datapath, FromTun, PeerPath, SendError};
use crate::node::drops::Drop;

/// Largest IP packet the TUN can hand us, and the largest super-packet an offloading TUN hands
/// in one read.
pub const MAX_PACKET: usize = 65_535;
pub use super::tun_write::{HEADROOM, write_one};
/// Packets handled per wake-up, each way: tun-rs's (and wireguard-go's) batch size. A 64 KB
/// super-packet split into ~1.4 KB segments fills under half of it.
pub const BATCH: usize = IDEAL_BATCH_SIZE;
/// One segment of a split super-packet is at most the TUN's MTU (1400 and up): room for it,
/// jumbo frames included.
const SEGMENT: usize = 9216;
/// How long the TUN reader waits for room in one peer's queue before dropping the packet: long
/// enough for QUIC to send a few windows' worth, short enough that a stalled peer does not
/// hold up the others for long.
const SEND_WAIT: Duration = Duration::from_millis(10);
/// How often each link's path is read for the node.
const PATH_EVERY: Duration = Duration::from_millis(500);

/// Reads the TUN until it fails (then says so in status). With offload, one read brings a TCP
/// or UDP super-packet that tun-rs splits at its segment size (the inner MSS, which the clamp
/// keeps within a datagram) before anything is decided: the policy, the clamp, too-big answers
/// and every counter see the packets the wire will carry, exactly as without offload.
pub async fn from_tun(
    shared: Arc<Shared>,
    tun: Arc<AsyncDevice>,
    datapath: Arc<ArcSwap<Datapath>>,
    relays: Option<Arc<Relays>>,
) {
    let mut original = vec![0u8; HEADROOM + MAX_PACKET];
    // The TUN's gso_max_segs is BATCH (`engine::create_tun`): a super-packet always fits.
    let mut segments = segment_buffers();
    let mut sizes = vec![0usize; BATCH];
    let mut reply = vec![0u8; 1500];
    loop {
        let n = match tun
            .recv_multiple(&mut original, &mut segments, &mut sizes, 0)
            .await
        {
            Ok(n) => n,
            // Not the device failing: a super-packet tun-rs could not split (counted).
            Err(e) if e.raw_os_error().is_none() => {
                datapath.load().drops.count(Drop::MalformedFromTun);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the TUN failed; tunnel stopped");
                shared.set_state(format!("TUN read failed: {e}"));
                return;
            }
        };
        let dp = datapath.load_full();
        for (buf, &len) in segments.iter_mut().zip(&sizes).take(n) {
            let Some(pkt) = buf.get_mut(..len) else {
                continue;
            };
            match send_one(&dp, pkt, &mut reply).await {
                Sent::Done => {}
                Sent::Answer(m) => write(&tun, &reply[..m], &dp).await,
                Sent::Dns => match &relays {
                    Some(r) => r.steered(pkt, &tun),
                    None => dp.drops.count(Drop::NoPeer),
                },
            }
        }
    }
}

/// Where one read's segments go: the first also takes a whole packet when the TUN has no
/// offload (or the kernel did not segment).
fn segment_buffers() -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| vec![0u8; if i == 0 { MAX_PACKET } else { SEGMENT }])
        .collect()
}

/// What became of one packet from the TUN.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Sent on its peer's link, or dropped (counted).
    Done,
    /// Write `reply[..n]` (an ICMP too-big) back into the TUN.
    Answer(usize),
    /// A steered DNS query, for the relay.
    Dns,
}

/// Decides one packet (a whole one, or a segment of a super-packet) and sends it on its peer's
/// link, counting it there.
async fn send_one(dp: &Datapath, pkt: &mut [u8], reply: &mut [u8]) -> Sent {
    match dp.from_tun(pkt, reply) {
        FromTun::Send(peer) => match send(&peer, pkt).await {
            Ok(()) => {
                peer.counters.sent(pkt.len());
                Sent::Done
            }
            Err(SendError::TooBig) => {
                // The path shrank since the snapshot's size was read: answered alike.
                let mtu = peer.max_packet().unwrap_or(1280);
                match dp.too_big(&peer, pkt, mtu, reply) {
                    Some(m) => Sent::Answer(m),
                    None => Sent::Done,
                }
            }
            Err(SendError::Dropped | SendError::Full) => {
                dp.drops.count(Drop::SendFailed);
                Sent::Done
            }
        },
        FromTun::Reply(m) => Sent::Answer(m),
        FromTun::Dns(_) => Sent::Dns,
        FromTun::Drop(_) => Sent::Done,
    }
}

/// Sends `pkt` on `peer`'s link, waiting up to [`SEND_WAIT`] for room in its queue.
async fn send(peer: &PeerPath, pkt: &[u8]) -> Result<(), SendError> {
    match peer.sink.0.send_packet(pkt) {
        Err(SendError::Full) => tokio::time::timeout(SEND_WAIT, peer.sink.0.send_packet_wait(pkt))
            .await
            .unwrap_or(Err(SendError::Dropped)),
        r => r,
    }
}

async fn write(tun: &AsyncDevice, pkt: &[u8], dp: &Datapath) {
    if write_one(tun, pkt).await.is_err() {
        dp.drops.count(Drop::TunWrite);
    }
}

/// Packets gathered for the TUN, each behind [`HEADROOM`] bytes, written with one
/// `send_multiple`: with offload, tun-rs's GRO coalesces a flow's consecutive segments into one
/// super-packet (one write, one pass through the kernel's stack). Everything about a packet
/// (policy, counters) is decided before it is pushed, so coalescing changes no count. A busy
/// link's batch holds up to [`BATCH`] buffers of 64 KB (8 MB), as wireguard-go's does.
pub struct ToTun {
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: GROTable,
}

impl Default for ToTun {
    fn default() -> Self {
        ToTun {
            bufs: Vec::with_capacity(BATCH),
            len: 0,
            gro: GROTable::default(),
        }
    }
}

impl ToTun {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    pub fn is_full(&self) -> bool {
        self.len >= BATCH
    }

    /// Decides `pkt` from `peer` (counted there) and adds it to the batch if it passes.
    pub fn admit(&mut self, dp: &Datapath, peer: &PeerPath, pkt: &[u8]) {
        if dp.from_peer(peer, pkt).is_ok() {
            self.push(pkt);
        }
    }

    /// Adds `pkt` to the batch (a full batch takes nothing: write it first).
    pub fn push(&mut self, pkt: &[u8]) {
        if self.is_full() {
            return;
        }
        if self.len == self.bufs.len() {
            // tun-rs coalesces into a buffer only as far as its capacity goes: room for a
            // whole super-packet. Allocated as a busy link first needs it, then kept.
            self.bufs.push(Vec::with_capacity(HEADROOM + MAX_PACKET));
        }
        let b = &mut self.bufs[self.len];
        b.clear();
        b.resize(HEADROOM, 0);
        b.extend_from_slice(pkt);
        self.len += 1;
    }

    /// The batch as tun-rs takes it.
    #[cfg(test)]
    fn packets(&mut self) -> &mut [Vec<u8>] {
        &mut self.bufs[..self.len]
    }

    /// Writes the batch (coalesced when the TUN has offload) and empties it.
    pub async fn write(&mut self, tun: &AsyncDevice) -> std::io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let r = tun
            .send_multiple(&mut self.gro, &mut self.bufs[..self.len], HEADROOM)
            .await;
        self.clear();
        r.map(|_| ())
    }

    /// Empties the batch (its buffers are kept for the next).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// A link's path as the node wants it.
#[derive(Debug, Clone, Copy)]
pub struct Path {
    pub link: LinkId,
    pub max_packet: Option<usize>,
    pub rtt: Duration,
}

/// Reads every live link's datagram size and RTT (QUIC's MTU discovery moves the first) and
/// hands them to the node's task.
pub async fn follow_paths(shared: Arc<Shared>, to: mpsc::Sender<Path>) {
    let mut tick = tokio::time::interval(PATH_EVERY);
    loop {
        tick.tick().await;
        for (link, _, l) in shared.link_records() {
            let path = Path {
                link,
                max_packet: l.max_packet(),
                rtt: l.rtt(),
            };
            if to.send(path).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
