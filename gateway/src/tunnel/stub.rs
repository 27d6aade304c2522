//! The client's private DNS: queries for the connector's zones, from its stub listener or
//! steered into the TUN by eBPF (the host's own and a LAN's, sent to whatever resolver they
//! use), relayed to the connector over the current link and answered as the resolver asked
//! would have. At most [`MAX_RELAYS`] are under way; more are dropped and counted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};
use tun_rs::AsyncDevice;

use super::dns_channel::Channel;
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
    /// The QUIC link's DNS channel, by link id.
    channel: Arc<Mutex<(u64, Route)>>,
}

/// How queries reach the connector on the current QUIC link.
#[derive(Clone)]
enum Route {
    /// A channel is being opened; queries take a stream each meanwhile.
    Opening,
    Channel(Arc<Channel>),
    /// The connector does not take channels (an older one), or the channel broke.
    Streams,
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
            channel: Arc::new(Mutex::new((u64::MAX, Route::Streams))),
        })
    }

    /// Asks the connector over `link`: on QUIC through the link's DNS channel once it is open
    /// (a stream per query before, or if the connector does not take channels).
    async fn relay(&self, link: &Link, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        if let Some(ch) = self.channel_of(link) {
            match ch.ask(msg).await {
                Ok(answer) => return Ok(answer),
                Err(e) if !ch.is_closed() => return Err(e),
                Err(_) => {
                    if let Ok(mut c) = self.channel.lock()
                        && c.0 == link.id()
                    {
                        c.1 = Route::Streams;
                    }
                }
            }
        }
        link.relay_dns(msg).await
    }

    /// The channel to use on `link`, starting to open one on a QUIC link seen first.
    fn channel_of(&self, link: &Link) -> Option<Arc<Channel>> {
        let Link::Quic(conn) = link else {
            return None;
        };
        let id = link.id();
        let mut c = self.channel.lock().ok()?;
        if c.0 != id {
            *c = (id, Route::Opening);
            let (conn, slot) = (conn.clone(), self.channel.clone());
            tokio::spawn(async move {
                let route = match Channel::open(&conn).await {
                    Ok(ch) => Route::Channel(ch),
                    Err(_) => Route::Streams,
                };
                if let Ok(mut c) = slot.lock()
                    && c.0 == id
                {
                    c.1 = route;
                }
            });
            return None;
        }
        match &c.1 {
            Route::Channel(ch) if !ch.is_closed() => Some(ch.clone()),
            Route::Channel(_) => {
                c.1 = Route::Streams;
                None
            }
            Route::Opening | Route::Streams => None,
        }
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
        if let Some(ch) = self.channel_of(&link) {
            let Some((msg, _)) = dns::udp_query(pkt) else {
                return;
            };
            // Answered from the channel's reader: no task, no wake-up of one.
            let then = move |answer: Option<Vec<u8>>| {
                let _permit = permit;
                match answer.and_then(|a| dns::udp_reply(&query, &a)) {
                    Some(r) => me.write_answer(&tun, r),
                    None => me.drops.count(Drop::DnsRelayFailed),
                }
            };
            ch.ask_then(msg, Box::new(then));
            return;
        }
        tokio::spawn(async move {
            let _permit = permit;
            let Some((msg, _)) = dns::udp_query(&query) else {
                return;
            };
            let reply = match me.relay(&link, msg).await {
                Ok(answer) => dns::udp_reply(&query, &answer),
                Err(_) => None,
            };
            match reply {
                Some(r) => {
                    let _ = super::tun_write::write_one(&tun, &r).await;
                }
                None => me.drops.count(Drop::DnsRelayFailed),
            }
        });
    }
}

impl Relays {
    /// Writes a steered query's answer into the TUN, waiting only when the TUN is full.
    fn write_answer(&self, tun: &Arc<AsyncDevice>, reply: Vec<u8>) {
        let reply = super::tun_write::for_tun(tun, reply);
        match tun.try_send(&reply) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let (tun, drops) = (tun.clone(), self.drops.clone());
                tokio::spawn(async move {
                    if tun.send(&reply).await.is_err() {
                        drops.count(Drop::TunWrite);
                    }
                });
            }
            Err(_) => self.drops.count(Drop::TunWrite),
        }
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
        let (socket, relays) = (socket.clone(), relays.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer = match (in_zone, link) {
                (true, Some(link)) => match relays.relay(&link, &msg).await {
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
