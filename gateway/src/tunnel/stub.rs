//! The client's private DNS: queries for the connector's zones, from its stub listener or
//! steered into the TUN by eBPF (the host's own and a LAN's, sent to whatever resolver they
//! use), relayed to the connector over the current link and answered as the resolver asked
//! would have. At most [`MAX_RELAYS`] are under way; more are dropped and counted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};
use tun_rs::AsyncDevice;

use super::link::Link;
use super::relay::error_response;
use crate::core::dns::{self, RCODE_REFUSED, RCODE_SERVFAIL};
use crate::node::drops::{Drop, Drops, Limit, Limits};

/// Relayed queries under way at once, from the stub and from what eBPF steers: twice what the
/// connector lets one client have in flight, so a burst meets the connector's bound and a
/// flooding LAN host meets this one.
pub const MAX_RELAYS: usize = 2 * crate::node::forwarder::MAX_PER_PEER as usize;
const MAX_MESSAGE: usize = 65_535;

/// What relaying needs: the current link to the connector and the zones it answers.
pub struct Relays {
    pub current: watch::Receiver<Option<Link>>,
    /// Wire names of the learned zones.
    pub zones: Arc<Mutex<Vec<Vec<u8>>>>,
    permits: Arc<Semaphore>,
    limits: Arc<Limits>,
    drops: Arc<Drops>,
}

impl Relays {
    pub fn new(
        current: watch::Receiver<Option<Link>>,
        limits: Arc<Limits>,
        drops: Arc<Drops>,
    ) -> Arc<Relays> {
        Arc::new(Relays {
            current,
            zones: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(MAX_RELAYS)),
            limits,
            drops,
        })
    }

    pub fn set_zones(&self, zones: &[String]) {
        let wires = zones
            .iter()
            .filter_map(|z| dns::wire_name(z).ok())
            .collect();
        if let Ok(mut z) = self.zones.lock() {
            *z = wires;
        }
    }

    /// A query the datapath recognised in the TUN (an IP/UDP packet to port 53): relayed, and
    /// the answer written into the TUN from the resolver it was sent to.
    pub fn steered(self: &Arc<Self>, pkt: &[u8], tun: &Arc<AsyncDevice>) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.limits.count(Limit::DnsRelayBusy);
            return;
        };
        let Some(link) = self.current.borrow().clone() else {
            self.drops.count(Drop::TunnelDown);
            return;
        };
        let (query, tun, me) = (pkt.to_vec(), tun.clone(), self.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some((msg, _)) = dns::udp_query(&query) else {
                return;
            };
            let reply = match link.relay_dns(msg).await {
                Ok(answer) => dns::udp_reply(&query, &answer),
                Err(_) => None,
            };
            match reply {
                Some(r) => {
                    let _ = super::datapath::write_one(&tun, &r).await;
                }
                None => me.drops.count(Drop::DnsRelayFailed),
            }
        });
    }
}

/// The stub listener: queries for the connector's zones go through the tunnel; anything else
/// is REFUSED (a stub for routing domains, not a full resolver).
pub async fn serve_stub(socket: Arc<UdpSocket>, relays: Arc<Relays>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let msg = buf[..n].to_vec();
        let Ok(q) = dns::parse_query(&msg) else {
            continue;
        };
        let Ok(permit) = relays.permits.clone().try_acquire_owned() else {
            relays.limits.count(Limit::DnsRelayBusy);
            continue;
        };
        let in_zone = relays
            .zones
            .lock()
            .map(|z| dns::matching_zone(&q.name, &z).is_some())
            .unwrap_or(false);
        let link = relays.current.borrow().clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let answer = match (in_zone, link) {
                (true, Some(link)) => match link.relay_dns(&msg).await {
                    Ok(a) => a,
                    Err(_) => error_response(&msg, q.question_end, RCODE_SERVFAIL),
                },
                (true, None) => error_response(&msg, q.question_end, RCODE_SERVFAIL),
                (false, _) => error_response(&msg, q.question_end, RCODE_REFUSED),
            };
            answer_to(&socket, &answer, from).await;
        });
    }
}

async fn answer_to(socket: &UdpSocket, answer: &[u8], to: SocketAddr) {
    let _ = socket.send_to(answer, to).await;
}
