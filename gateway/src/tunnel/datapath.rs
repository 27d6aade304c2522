//! The packet loop from the TUN, the same on both ends, in the order a packet travels: read it,
//! let the datapath snapshot decide (`node::datapath`), then send it on its peer's link, write
//! an ICMP too-big back, or hand a steered DNS query to the relay. Packets from links go the
//! other way in `links`. Also: following each link's path (MTU, RTT) for the node.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tun_rs::AsyncDevice;

use super::status::Shared;
use super::stub::Relays;
use crate::node::LinkId;
use crate::node::datapath::{Datapath, FromTun, PeerPath, SendError};
use crate::node::drops::Drop;

/// Largest IP packet the TUN can hand us; buffers are this big.
pub const MAX_PACKET: usize = 65_535;
/// How long the TUN reader waits for room in one peer's queue before dropping the packet: long
/// enough for QUIC to send a few windows' worth, short enough that a stalled peer does not
/// hold up the others for long.
const SEND_WAIT: Duration = Duration::from_millis(10);
/// How often each link's path is read for the node.
const PATH_EVERY: Duration = Duration::from_millis(500);

/// Reads the TUN until it fails (then says so in status).
pub async fn from_tun(
    shared: Arc<Shared>,
    tun: Arc<AsyncDevice>,
    datapath: Arc<ArcSwap<Datapath>>,
    relays: Option<Arc<Relays>>,
) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut reply = vec![0u8; 1500];
    loop {
        let n = match tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading the TUN failed; tunnel stopped");
                shared.set_state(format!("TUN read failed: {e}"));
                return;
            }
        };
        let pkt = &mut buf[..n];
        let dp = datapath.load();
        match dp.from_tun(pkt, &mut reply) {
            FromTun::Send(peer) => match send(&peer, pkt).await {
                Ok(()) => peer.counters.sent(n),
                Err(SendError::TooBig) => {
                    // The path shrank since the snapshot's size was read: answered alike.
                    let mtu = peer.max_packet().unwrap_or(1280);
                    if let Some(m) = dp.too_big(&peer, pkt, mtu, &mut reply) {
                        write(&tun, &reply[..m], &dp).await;
                    }
                }
                Err(SendError::Dropped | SendError::Full) => dp.drops.count(Drop::SendFailed),
            },
            FromTun::Reply(m) => write(&tun, &reply[..m], &dp).await,
            FromTun::Dns(_) => match &relays {
                Some(r) => r.steered(pkt, &tun),
                None => dp.drops.count(Drop::NoPeer),
            },
            FromTun::Drop(_) => {}
        }
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
    if tun.send(pkt).await.is_err() {
        dp.drops.count(Drop::TunWrite);
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
