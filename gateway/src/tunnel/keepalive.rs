//! Control-stream keepalives after the welcome, both ends: the client sends one every
//! CONTROL_KEEPALIVE and reconnects when the connector stops answering; the connector echoes
//! them (at most CONTROL_RATE a second), pushes route and zone changes, and ends a session
//! whose client fell silent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ipnet::IpNet;
use tokio::sync::watch;

use super::control::Control;
use super::engine::Offer;
use super::link::{ControlRx, ControlTx};
use crate::core::limits::{Tally, TokenBucket};

/// The client sends one this often: they prove the connector's engine (not only its QUIC
/// stack) answers; this many unanswered in a row and the client reconnects.
pub(super) const CONTROL_KEEPALIVE: Duration = Duration::from_secs(2);
const KEEPALIVES_MISSED: u64 = 3;
/// The connector ends a session whose client sent no control message for this long: a TCP
/// link to a vanished client would otherwise linger until TCP gives up, many minutes later.
const CLIENT_SILENCE: Duration = Duration::from_secs(10);
/// Control messages a client may send per second after the welcome (and in a burst): a
/// keepalive every 2 s needs a twentieth of it.
const CONTROL_RATE: u32 = 10;
const CONTROL_BURST: u32 = 20;

/// The connector's side of the control stream after the welcome: echo keepalives, skip what
/// a newer client may send that this version does not know.
pub(super) async fn answer_keepalives(
    mut send: ControlTx,
    mut recv: ControlRx,
    mut offers: watch::Receiver<Offer>,
    tally: Arc<Tally>,
) -> anyhow::Result<()> {
    let mut rate = TokenBucket::new(CONTROL_RATE, CONTROL_BURST, Instant::now());
    // Reading runs in its own task: a QUIC read cut short by an offer change would lose
    // framing; the channel's receive is safe to cancel.
    let (tx, mut messages) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(async move {
        loop {
            let msg = recv.recv().await;
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });
    let _abort = AbortOnDrop(reader);
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(CLIENT_SILENCE, messages.recv()) => m
                .map_err(|_| anyhow!("the client sent nothing for {CLIENT_SILENCE:?}"))?
                .ok_or_else(|| anyhow!("the control channel closed"))??,
            changed = offers.changed() => {
                changed?;
                let offer = offers.borrow_and_update().clone();
                send.send(&Control::Routes { routes: offer.routes, zones: offer.zones }).await?;
                continue;
            }
        };
        if !rate.take(Instant::now()) {
            // Read and dropped: a client cannot make the connector write faster than this.
            tally.bump("control_rate");
            continue;
        }
        match msg {
            Control::Keepalive { seq } => send.send(&Control::Keepalive { seq }).await?,
            Control::Unknown => {}
            other => tracing::debug!(?other, "unexpected control message ignored"),
        }
    }
}

/// The client's side: a keepalive every CONTROL_KEEPALIVE; an error when the connector stops
/// answering them.
pub(super) async fn send_keepalives(
    mut send: ControlTx,
    mut recv: ControlRx,
    offers: tokio::sync::mpsc::Sender<(Vec<IpNet>, Vec<String>)>,
) -> anyhow::Result<()> {
    let answered = Arc::new(AtomicU64::new(0));
    // Reading runs in its own task: a read cut short by the next tick would lose framing.
    let reader = {
        let answered = answered.clone();
        tokio::spawn(async move {
            while let Ok(msg) = recv.recv().await {
                match msg {
                    Control::Keepalive { seq } => {
                        answered.fetch_max(seq, Ordering::Relaxed);
                    }
                    Control::Routes { routes, zones } => {
                        let _ = offers.send((routes, zones)).await;
                    }
                    _ => {}
                }
            }
        })
    };
    let _abort = AbortOnDrop(reader);
    let mut tick = tokio::time::interval(CONTROL_KEEPALIVE);
    let mut seq = 0u64;
    loop {
        tick.tick().await;
        let last = answered.load(Ordering::Relaxed);
        if seq >= last + KEEPALIVES_MISSED {
            bail!("the connector answered no control keepalive since #{last}");
        }
        seq += 1;
        send.send(&Control::Keepalive { seq }).await?;
    }
}

pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
