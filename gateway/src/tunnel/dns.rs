//! Private DNS over the tunnel.
//!
//! The connector's [`Forwarder`] asks a zone's resolvers with the failover rules of
//! `core::resolver`, from a small pool of UDP sockets on pinned ports, multiplexed by random
//! query ID and matched on ID, resolver address and question name. A truncated answer is asked
//! again over TCP. The client's stub listener relays queries for the connector's zones through
//! the tunnel, one QUIC stream per query in DNS-over-TCP framing (a 2-byte length).
//!
//! Every bound is counted in the tunnel's `limits`: queries in flight at all
//! ([`MAX_IN_FLIGHT`]), per resolver ([`PER_RESOLVER`], the query-ID table) and per client
//! (`dns_serve::PeerDns`: a rate and its own in-flight share), so a client flooding a silent
//! resolver gets SERVFAIL or silence while everyone else is answered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, oneshot};

use crate::api::{ResolverStatus, ZoneStatus};
use crate::config::Zone;
use crate::core::dns::{self, RCODE_REFUSED, RCODE_SERVFAIL};
use crate::core::limits::{IdRefused, QueryIds, Tally};
use crate::core::resolver::{Resolvers, Step};

/// How long one resolver gets before the next is asked.
const QUERY_TIMEOUT: Duration = Duration::from_millis(1000);
const TCP_TIMEOUT: Duration = Duration::from_secs(3);
const PROBE_EVERY: Duration = Duration::from_secs(2);
const PING_EVERY: Duration = Duration::from_secs(5);
/// Sockets in the pool: enough to spread load, few enough to leave the range to NAT.
const POOL: u16 = 4;
const MAX_MESSAGE: usize = 65_535;
/// Largest query a client may relay: one question (a name is at most 255 bytes) and EDNS
/// options; real queries stay under 600 bytes. Both ends check it, so a bigger one is refused
/// by the client instead of breaking the link.
pub const MAX_QUERY: usize = 4096;
/// Queries being resolved at once, for all clients and access streams together: with the
/// resolvers' 1 s timeout this is ~1,000 queries/s towards silent resolvers, far above what
/// answering resolvers need in flight, and far below the 65,536 query IDs.
const MAX_IN_FLIGHT: usize = 1024;
/// Query IDs in flight towards one resolver (one ID space per resolver address).
const PER_RESOLVER: usize = 512;
/// Random IDs tried for one query before giving up: with at most PER_RESOLVER of 65,536 in
/// use, 16 draws all colliding has a probability below 10^-33.
const ID_TRIES: usize = 16;
/// A DNS stream that does not deliver its query (or take its answer) in this long is dropped.
pub(super) const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

type Pending = Mutex<QueryIds<(Vec<u8>, oneshot::Sender<Vec<u8>>)>>;

#[derive(Default)]
struct ZoneStats {
    queries: AtomicU64,
    answers: AtomicU64,
    failovers: AtomicU64,
    servfails: AtomicU64,
}

struct ZoneSet {
    zones: Vec<Arc<ZoneState>>,
    wires: Vec<Vec<u8>>,
}

impl ZoneSet {
    /// States for `zones`; a zone whose domain, servers and rules are unchanged keeps its
    /// state from `keep` (counters, resolver health), so a reload does not reset them.
    fn build(zones: &[Zone], keep: Option<&ZoneSet>) -> ZoneSet {
        let zones: Vec<Arc<ZoneState>> = zones
            .iter()
            .filter_map(|z| {
                let servers: Vec<SocketAddr> = z
                    .servers
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, 53))
                    .collect();
                if let Some(old) = keep.and_then(|k| {
                    k.zones.iter().find(|o| {
                        o.domain == z.domain
                            && o.servers == servers
                            && o.on_servfail == z.on_servfail
                    })
                }) {
                    return Some(old.clone());
                }
                Some(Arc::new(ZoneState {
                    wire: dns::wire_name(&z.domain).ok()?,
                    domain: z.domain.clone(),
                    servers,
                    on_servfail: z.on_servfail,
                    resolvers: Mutex::new(Resolvers::new(
                        z.servers.len(),
                        z.on_servfail,
                        PROBE_EVERY,
                    )),
                    stats: ZoneStats::default(),
                    pings: Mutex::new(vec![None; z.servers.len()]),
                }))
            })
            .collect();
        ZoneSet {
            wires: zones.iter().map(|z| z.wire.clone()).collect(),
            zones,
        }
    }
}

struct ZoneState {
    wire: Vec<u8>,
    domain: String,
    servers: Vec<SocketAddr>,
    on_servfail: crate::core::resolver::OnServfail,
    resolvers: Mutex<Resolvers>,
    stats: ZoneStats,
    /// ICMP echo round trip per server, from `ping_resolvers`.
    pings: Mutex<Vec<Option<Duration>>>,
}

pub struct Forwarder {
    /// Swapped whole on reload; queries in flight finish with the set they started with.
    zones: Mutex<Arc<ZoneSet>>,
    sockets: Vec<Arc<UdpSocket>>,
    next_socket: AtomicUsize,
    pending: Arc<Pending>,
    /// The pinned range TCP retries also come from, so the VPC's ACL needs nothing wider.
    ports: Option<(u16, u16)>,
    in_flight: Arc<Semaphore>,
    tally: Arc<Tally>,
}

impl Forwarder {
    /// Binds the socket pool to the top of `ports` (the pinned egress range) or to any port.
    pub async fn start(
        zones: &[Zone],
        ports: Option<(u16, u16)>,
        tasks: &mut tokio::task::JoinSet<()>,
        tally: Arc<Tally>,
    ) -> anyhow::Result<Arc<Forwarder>> {
        let mut sockets = Vec::new();
        match ports {
            Some((lo, hi)) => {
                let first = hi.saturating_sub(POOL - 1).max(lo);
                for port in first..=hi {
                    let s = super::net::udp_dual_stack(port)
                        .await
                        .with_context(|| format!("binding the DNS forwarder to UDP port {port}"))?;
                    sockets.push(Arc::new(s));
                }
            }
            None => {
                for _ in 0..POOL {
                    let s = super::net::udp_dual_stack(0)
                        .await
                        .context("binding the DNS forwarder")?;
                    sockets.push(Arc::new(s));
                }
            }
        }
        let fwd = Arc::new(Forwarder {
            zones: Mutex::new(Arc::new(ZoneSet::build(zones, None))),
            sockets,
            next_socket: AtomicUsize::new(0),
            pending: Arc::new(Mutex::new(QueryIds::new(PER_RESOLVER))),
            ports,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tally,
        });
        for s in &fwd.sockets {
            tasks.spawn(read_answers(s.clone(), fwd.pending.clone()));
        }
        tasks.spawn(probe(fwd.clone()));
        tasks.spawn(ping_resolvers(fwd.clone()));
        Ok(fwd)
    }

    fn zone_set(&self) -> Arc<ZoneSet> {
        self.zones
            .lock()
            .map(|z| z.clone())
            .unwrap_or_else(|_| Arc::new(ZoneSet::build(&[], None)))
    }

    pub fn domains(&self) -> Vec<String> {
        self.zone_set()
            .zones
            .iter()
            .map(|z| z.domain.clone())
            .collect()
    }

    /// Reload: the new zones take effect for the next query.
    pub fn set_zones(&self, zones: &[Zone]) {
        let current = self.zone_set();
        let next = Arc::new(ZoneSet::build(zones, Some(&current)));
        if let Ok(mut z) = self.zones.lock() {
            *z = next;
        }
    }
}

impl Forwarder {
    /// Answers one query; always returns a response to relay (REFUSED outside the zones,
    /// SERVFAIL when no resolver answered), or `None` for bytes that are no query at all.
    pub async fn resolve(&self, msg: &[u8]) -> Option<Vec<u8>> {
        let q = dns::parse_query(msg).ok()?;
        let set = self.zone_set();
        let Some(zi) = dns::matching_zone(&q.name, &set.wires) else {
            return Some(error_response(msg, q.question_end, RCODE_REFUSED));
        };
        let zone = set.zones.get(zi)?;
        zone.stats.queries.fetch_add(1, Ordering::Relaxed);
        let servfail = || {
            zone.stats.servfails.fetch_add(1, Ordering::Relaxed);
            Some(error_response(msg, q.question_end, RCODE_SERVFAIL))
        };
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            self.tally.bump("dns_in_flight_global");
            return servfail();
        };
        let mut attempt = zone.resolvers.lock().ok()?.start(Instant::now())?;
        loop {
            let server = *zone.servers.get(attempt.current)?;
            let answer = match self.ask_udp(server, msg, &q.name).await {
                Ok(a) => a,
                Err(refused) => {
                    // Not the resolver's fault: its health stays as it is.
                    self.tally.bump(refused.name());
                    return servfail();
                }
            };
            let now = Instant::now();
            let step;
            let mut delivered = None;
            match answer {
                Some(mut a) => {
                    if dns::truncated(&a)
                        && let Ok(full) = ask_tcp(server, msg, self.ports).await
                    {
                        if answers(&full, &q.name) {
                            a = full;
                        } else {
                            self.tally.bump("dns_bad_tcp_answer");
                        }
                    }
                    let rcode = dns::response_rcode(&a).unwrap_or(RCODE_SERVFAIL);
                    step = zone
                        .resolvers
                        .lock()
                        .ok()?
                        .on_answer(&mut attempt, rcode, now);
                    delivered = Some(a);
                }
                None => {
                    step = zone.resolvers.lock().ok()?.on_timeout(&mut attempt, now);
                }
            }
            match step {
                Step::Deliver => {
                    let mut a = delivered?;
                    let Some(id) = a.get_mut(..2) else {
                        return servfail();
                    };
                    id.copy_from_slice(&q.id.to_be_bytes());
                    zone.stats.answers.fetch_add(1, Ordering::Relaxed);
                    return Some(a);
                }
                Step::Ask(_) => {
                    zone.stats.failovers.fetch_add(1, Ordering::Relaxed);
                }
                Step::GiveUp => return servfail(),
            }
        }
    }

    /// Sends `msg` under a fresh random ID and waits for the answer with that ID, from that
    /// resolver, for that name; anything else arriving on the socket is ignored. `Ok(None)`:
    /// no answer in time; `Err`: no ID could be had (the resolver is not asked).
    async fn ask_udp(
        &self,
        server: SocketAddr,
        msg: &[u8],
        name: &[u8],
    ) -> Result<Option<Vec<u8>>, IdRefused> {
        let i = self.next_socket.fetch_add(1, Ordering::Relaxed) % self.sockets.len().max(1);
        let Some(socket) = self.sockets.get(i) else {
            return Ok(None);
        };
        let (tx, rx) = oneshot::channel();
        // Drawn before the lock: under it, only a scan of these few.
        let candidates: [u16; ID_TRIES] = rand::rng().random();
        let id = match self.pending.lock() {
            Ok(mut pending) => pending.insert(server, &candidates, (name.to_vec(), tx))?,
            Err(_) => return Ok(None),
        };
        let mut out = msg.to_vec();
        if let Some(head) = out.get_mut(..2) {
            head.copy_from_slice(&id.to_be_bytes());
        }
        let answer = match socket.send_to(&out, server).await {
            Ok(_) => tokio::time::timeout(QUERY_TIMEOUT, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(id, server);
        }
        Ok(answer)
    }

    pub fn status(&self) -> Vec<ZoneStatus> {
        self.zone_set()
            .zones
            .iter()
            .map(|z| {
                let health = z
                    .resolvers
                    .lock()
                    .map(|r| r.health().to_vec())
                    .unwrap_or_default();
                let pings = z.pings.lock().map(|p| p.clone()).unwrap_or_default();
                ZoneStatus {
                    domain: z.domain.clone(),
                    queries: z.stats.queries.load(Ordering::Relaxed),
                    answers: z.stats.answers.load(Ordering::Relaxed),
                    failovers: z.stats.failovers.load(Ordering::Relaxed),
                    servfails: z.stats.servfails.load(Ordering::Relaxed),
                    resolvers: z
                        .servers
                        .iter()
                        .zip(health)
                        .enumerate()
                        .map(|(i, (s, h))| ResolverStatus {
                            address: s.ip().to_string(),
                            up: h.up,
                            latency_ms: h.latency.map(|l| l.as_secs_f64() * 1000.0),
                            ping_ms: pings
                                .get(i)
                                .copied()
                                .flatten()
                                .map(|l| l.as_secs_f64() * 1000.0),
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

async fn read_answers(socket: Arc<UdpSocket>, pending: Arc<Pending>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let from = super::net::canonical(from);
        let msg = &buf[..n];
        if dns::response_rcode(msg).is_none() {
            continue;
        }
        let id = u16::from_be_bytes([msg[0], msg[1]]);
        let Ok(mut p) = pending.lock() else { return };
        // Spoof resistance: the ID, the resolver's address and the question must all match.
        let matches = p.get(id, from).is_some_and(|(name, _)| answers(msg, name));
        if matches && let Some((_, tx)) = p.remove(id, from) {
            let _ = tx.send(msg.to_vec());
        }
    }
}

/// Re-probes resolvers marked down, so queries stop skipping them once they answer again.
async fn probe(fwd: Arc<Forwarder>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        for zone in &fwd.zone_set().zones {
            let due = zone
                .resolvers
                .lock()
                .map(|mut r| r.due_probes(Instant::now()))
                .unwrap_or_default();
            for index in due {
                let Some(server) = zone.servers.get(index).copied() else {
                    continue;
                };
                let query = soa_query(&zone.wire);
                let sent = Instant::now();
                if let Ok(Some(_)) = fwd.ask_udp(server, &query, &zone.wire).await
                    && let Ok(mut r) = zone.resolvers.lock()
                {
                    r.on_probe_answer(index, sent.elapsed());
                    tracing::info!(zone = %zone.domain, %server, "resolver answers again");
                }
            }
        }
    }
}

/// ICMP echo to every resolver, for status: whether the host answers at all, apart from its
/// DNS server. Skipped (all `None`) where echo sockets are not permitted.
pub async fn ping_resolvers(fwd: Arc<Forwarder>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    loop {
        tick.tick().await;
        if super::probe::check_possible().is_err() {
            continue;
        }
        for zone in &fwd.zone_set().zones {
            let mut results = Vec::with_capacity(zone.servers.len());
            for server in &zone.servers {
                results.push(super::probe::echo(server.ip(), QUERY_TIMEOUT).await.ok());
            }
            if let Ok(mut p) = zone.pings.lock() {
                *p = results;
            }
        }
    }
}

fn soa_query(zone_wire: &[u8]) -> Vec<u8> {
    let mut q = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(zone_wire);
    q.extend_from_slice(&[0, 6, 0, 1]);
    q
}

/// Asks again over TCP, for answers too large for UDP, from a random port of the pinned range.
async fn ask_tcp(
    server: SocketAddr,
    msg: &[u8],
    ports: Option<(u16, u16)>,
) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(TCP_TIMEOUT, async {
        let mut s = super::net::tcp_connect_from_range(server, ports).await?;
        let len = u16::try_from(msg.len())?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(msg).await?;
        let mut l = [0u8; 2];
        s.read_exact(&mut l).await?;
        let len = usize::from(u16::from_be_bytes(l));
        // Shorter than a header is no answer; `answers` checks the rest.
        anyhow::ensure!(len >= 12, "a {len}-byte answer over TCP");
        let mut a = vec![0u8; len];
        s.read_exact(&mut a).await?;
        anyhow::Ok(a)
    })
    .await?
}

/// Whether `msg` is a response whose question is `name` (wire form, lowercase): an answer
/// from outside is used only then, whatever its length or content.
fn answers(msg: &[u8], name: &[u8]) -> bool {
    dns::response_rcode(msg).is_some() && dns::parse_name(msg, 12).is_ok_and(|(got, _)| got == name)
}

/// A response with `rcode` that repeats the query's question and nothing else.
pub fn error_response(query: &[u8], question_end: usize, rcode: u8) -> Vec<u8> {
    let end = question_end.min(query.len());
    let mut r = query[..end].to_vec();
    if r.len() >= 12 {
        r[2] = 0x80 | (query[2] & 0x79); // QR, keep opcode and RD
        r[3] = 0x80 | rcode; // RA
        r[6..12].fill(0); // no answer, authority or additional records
    }
    r
}

/// Reads one DNS-over-TCP-framed message of at most `max` bytes from a stream, within
/// [`STREAM_TIMEOUT`].
pub async fn read_framed(recv: &mut quinn::RecvStream, max: usize) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(STREAM_TIMEOUT, async {
        let mut l = [0u8; 2];
        recv.read_exact(&mut l).await?;
        let len = usize::from(u16::from_be_bytes(l));
        anyhow::ensure!(len <= max, "a {len}-byte DNS message, above {max}");
        let mut m = vec![0u8; len];
        recv.read_exact(&mut m).await?;
        Ok(m)
    })
    .await?
}

pub async fn write_framed(send: &mut quinn::SendStream, msg: &[u8]) -> anyhow::Result<()> {
    let len = u16::try_from(msg.len())?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(msg).await?;
    Ok(())
}

/// DNS queries a client relays to its connector at once, from its own stub and from what
/// eBPF steers (its host's and its LAN's): twice what the connector admits from one client, so
/// a burst meets the connector's bound, and a flooding LAN host meets this one.
pub const MAX_RELAYS: usize = 2 * super::dns_serve::PEER_IN_FLIGHT;

/// The client's stub listener: queries for the connector's zones go through the tunnel, one
/// stream each; anything else is REFUSED (a stub for routing domains, not a full resolver).
/// At most `relays` queries are under way; more are dropped and counted.
pub async fn serve_stub<C>(
    socket: Arc<UdpSocket>,
    zones: Arc<Mutex<Vec<Vec<u8>>>>,
    current: C,
    relays: Arc<Semaphore>,
    tally: Arc<Tally>,
) where
    C: Fn() -> Option<super::link::Link>,
{
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let msg = buf[..n].to_vec();
        let Ok(q) = dns::parse_query(&msg) else {
            continue;
        };
        let Ok(permit) = relays.clone().try_acquire_owned() else {
            tally.bump("dns_relay_busy");
            continue;
        };
        let in_zone = zones
            .lock()
            .map(|z| dns::matching_zone(&q.name, &z).is_some())
            .unwrap_or(false);
        let link = current();
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
            let _ = socket.send_to(&answer, from).await;
        });
    }
}

pub async fn relay(conn: &quinn::Connection, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_framed(&mut send, msg).await?;
        send.finish()?;
        read_framed(&mut recv, MAX_MESSAGE).await
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_echo_the_question_and_set_the_rcode() {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        let qend = {
            q.extend_from_slice(&[2, b'd', b'b', 0, 0, 1, 0, 1]);
            q.len()
        };
        q.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]); // an OPT record
        let r = error_response(&q, qend, RCODE_REFUSED);
        assert_eq!(r.len(), qend, "the OPT record is not echoed");
        assert_eq!(&r[..2], &[0xab, 0xcd]);
        assert_eq!(dns::response_rcode(&r), Some(RCODE_REFUSED));
        assert_eq!(r[2] & 0x01, 0x01, "RD kept");
        assert_eq!(&r[10..12], &[0, 0], "no additional records");
        assert_eq!(
            dns::parse_name(&r, 12).map(|(n, _)| n),
            Ok(vec![2, b'd', b'b', 0])
        );
    }
}
