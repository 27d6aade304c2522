//! One task per link, the same on both ends: its control messages in (to the role's node task)
//! and out (from it), its packets in (decided by the datapath snapshot, written into the TUN)
//! and, on a connector, its client's DNS queries. Packets and queries flow only once the node
//! task has published a datapath with this link's peer in it and said so ([`Outgoing::Up`]).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tun_rs::AsyncDevice;

use super::control::Control;
use super::datapath::{BATCH, ToTun};
use super::dns::Forwarder;
use super::link::{ControlRx, ControlTx, Inbound, Link, Opened};
use crate::node::LinkId;
use crate::node::datapath::{Datapath, PeerPath};
use crate::node::drops::{Drop, Limit, Limits};

/// Control messages queued towards one link: control is rare, and a peer that does not read
/// its control stream is closed rather than queued for.
pub const OUT_QUEUE: usize = 64;
/// How long a refusal gets to reach the peer before the close overtakes it.
const LINGER: Duration = Duration::from_millis(100);

/// What a link task tells its node task.
#[derive(Debug)]
pub enum LinkEvent {
    Control(LinkId, Control),
    Down(LinkId, String),
}

/// What the node task tells a link task.
#[derive(Debug)]
pub enum Outgoing {
    Control(Control),
    /// The datapath now holds this link's peer: read its packets (and, on a connector, open the
    /// TCP reader's gate past the hello and serve its DNS).
    Up,
    /// Close the link; with `linger`, once what was sent before has had a moment to arrive.
    Close {
        code: u32,
        reason: String,
        linger: bool,
    },
}

/// What packets need, shared by every link of a node.
#[derive(Clone)]
pub struct Packets {
    pub datapath: Arc<ArcSwap<Datapath>>,
    pub tun: Arc<AsyncDevice>,
    pub limits: Arc<Limits>,
}

/// Where a link's control will be sent, and its task's end of it. Made before the task is
/// started, so the node can be told of the link before the link can tell it anything.
pub fn channel() -> (mpsc::Sender<Outgoing>, mpsc::Receiver<Outgoing>) {
    mpsc::channel(OUT_QUEUE)
}

/// Starts the task of `opened` (numbered `id`); returns where to send its control. For a
/// caller that tells its node of the link after this returns (the client: its node and the
/// link's events share one task).
pub fn start(
    opened: Opened,
    id: LinkId,
    events: mpsc::Sender<LinkEvent>,
    packets: Packets,
    dns: Option<Arc<Forwarder>>,
) -> mpsc::Sender<Outgoing> {
    let (tx, rx) = channel();
    spawn(opened, id, events, rx, packets, dns);
    tx
}

/// Starts the task of `opened` (numbered `id`), taking what arrives on `out`.
pub fn spawn(
    opened: Opened,
    id: LinkId,
    events: mpsc::Sender<LinkEvent>,
    out: mpsc::Receiver<Outgoing>,
    packets: Packets,
    dns: Option<Arc<Forwarder>>,
) {
    tokio::spawn(run(opened, id, events, out, packets, dns));
}

async fn run(
    opened: Opened,
    id: LinkId,
    events: mpsc::Sender<LinkEvent>,
    out: mpsc::Receiver<Outgoing>,
    packets: Packets,
    dns: Option<Arc<Forwarder>>,
) {
    let Opened {
        link,
        control_tx,
        control_rx,
        inbound,
        dns_queries,
        outer: _,
    } = opened;
    let (up_tx, up_rx) = watch::channel(false);
    let reason = tokio::select! {
        r = read_control(control_rx, id, &events) => r,
        r = write_control(&link, control_tx, out, &up_tx) => r,
        r = pump(inbound, id, up_rx.clone(), &packets) => r,
        r = serve_dns(&link, dns_queries, dns, id, up_rx, &packets.limits) => r,
    };
    link.close(0, "session ended");
    let _ = events.send(LinkEvent::Down(id, reason)).await;
}

async fn read_control(mut rx: ControlRx, id: LinkId, events: &mpsc::Sender<LinkEvent>) -> String {
    loop {
        match rx.recv().await {
            Ok(msg) => {
                if events.send(LinkEvent::Control(id, msg)).await.is_err() {
                    return "the tunnel is stopping".into();
                }
            }
            Err(e) => return e.to_string(),
        }
    }
}

async fn write_control(
    link: &Link,
    mut tx: ControlTx,
    mut out: mpsc::Receiver<Outgoing>,
    up: &watch::Sender<bool>,
) -> String {
    while let Some(o) = out.recv().await {
        match o {
            Outgoing::Control(msg) => {
                if let Err(e) = tx.send(&msg).await {
                    return format!("sending control: {e}");
                }
            }
            Outgoing::Up => {
                link.welcomed();
                up.send_replace(true);
            }
            Outgoing::Close {
                code,
                reason,
                linger,
            } => {
                if linger {
                    tx.finish();
                    tokio::time::sleep(LINGER).await;
                }
                link.close(code, &reason);
                return reason;
            }
        }
    }
    "the tunnel is stopping".into()
}

/// Waits until the node says the link is up.
async fn until_up(up: &mut watch::Receiver<bool>) -> bool {
    up.wait_for(|u| *u).await.is_ok()
}

/// Packets from the peer: before it is up, read and dropped (counted) so none pile up; after,
/// each decided by the datapath snapshot, and what is let through written into the TUN a batch
/// at a time: what has arrived by the time the first packet is handled, up to [`BATCH`].
async fn pump(
    mut inbound: Inbound,
    id: LinkId,
    mut up: watch::Receiver<bool>,
    p: &Packets,
) -> String {
    tokio::select! {
        ok = until_up(&mut up) => if !ok { return "the tunnel is stopping".into() },
        never = inbound.discard(&p.limits) => match never {},
    }
    let mut cached: Option<(Arc<Datapath>, Arc<PeerPath>)> = None;
    let mut batch = ToTun::default();
    loop {
        let first = match inbound.packet().await {
            Ok(pkt) => pkt,
            Err(e) => return format!("{e:#}"),
        };
        let current = p.datapath.load();
        let fresh = cached
            .as_ref()
            .is_some_and(|(d, _)| Arc::ptr_eq(d, &current));
        if !fresh {
            let dp: Arc<Datapath> = Arc::clone(&current);
            cached = dp.peer_by_link(id).cloned().map(|peer| (dp, peer));
        }
        let Some((dp, peer)) = &cached else {
            // The node took the peer out of the datapath: the link is going.
            p.limits.count(Limit::PacketBeforeWelcome);
            continue;
        };
        let mut next = Some(Ok(first));
        let mut ended = None;
        // Bounded in reads too, so a flood of refused packets still yields.
        for _ in 0..2 * BATCH {
            match next {
                Some(Ok(pkt)) => batch.admit(dp, peer, &pkt),
                Some(Err(e)) => {
                    ended = Some(e);
                    break;
                }
                None => break,
            }
            if batch.is_full() {
                break;
            }
            next = inbound.try_packet();
        }
        if batch.write(&p.tun).await.is_err() {
            dp.drops.count(Drop::TunWrite);
        }
        if let Some(e) = ended {
            return format!("{e:#}");
        }
    }
}

/// Connector: the client's DNS queries, once it is up.
async fn serve_dns(
    link: &Link,
    tcp_queries: Option<mpsc::Receiver<(u32, Vec<u8>)>>,
    fwd: Option<Arc<Forwarder>>,
    id: LinkId,
    mut up: watch::Receiver<bool>,
    limits: &Arc<Limits>,
) -> String {
    let Some(fwd) = fwd else {
        return std::future::pending().await;
    };
    if !until_up(&mut up).await {
        return "the tunnel is stopping".into();
    }
    match super::dns_serve::serve(link, tcp_queries, fwd, id.0, limits).await {
        Ok(()) => "the link closed".into(),
        Err(e) => format!("{e:#}"),
    }
}
