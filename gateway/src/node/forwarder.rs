//! The connector's DNS forwarder as a state machine: which resolver to ask (the failover rules
//! of `core::resolver`), under which query ID, what to do with each answer, timeout and
//! truncation, and how much any one peer may ask. Sockets live in `tunnel::dns`.
//!
//! Every query a peer relays is bounded before it costs anything: a token bucket per peer, a
//! cap on queries in flight per peer, per resolver and in all, and a bounded number of tries to
//! find a free query ID. Over a bound the query is dropped and counted, never queued.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Jitter;
use super::drops::{Limit, Limits};
use crate::core::dns::{self, RCODE_REFUSED, RCODE_SERVFAIL};
use crate::core::limits::{IdRefused, QueryIds, TokenBucket};
use crate::core::resolver::{Attempt, OnServfail, Resolvers, Step};

/// How long one resolver gets before the next is asked.
pub const QUERY_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a retry over TCP (for a truncated answer) may take.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a resolver marked down is asked again.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Queries in flight in all: well under the 65,536 IDs, so a free ID is found in a few tries.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Queries in flight for one peer: a flood from one client leaves room for everyone else.
pub const MAX_PER_PEER: u32 = 256;
/// Queries in flight to one resolver: a silent resolver cannot hold every slot.
pub const MAX_PER_RESOLVER: u32 = 1024;
/// Each peer's sustained rate and burst, in queries per second: a busy site gateway's whole
/// office resolves through one client, so this is generous; the in-flight caps are what stop
/// a flood at a silent resolver.
pub const PEER_RATE: u32 = 50_000;
pub const PEER_BURST: u32 = 10_000;
/// Random IDs tried before the query is given up.
const ID_TRIES: usize = 16;

/// Who asked: the peer (for its bounds) and the driver's handle for where the answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asker {
    pub peer: u64,
    pub reply_to: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSpec {
    pub domain: String,
    pub servers: Vec<SocketAddr>,
    pub on_servfail: OnServfail,
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send to the resolver over UDP (from a socket of the pool on the pinned ports).
    Udp { server: SocketAddr, bytes: Vec<u8> },
    /// Ask again over TCP (the UDP answer was truncated); answer with `handle_tcp_answer`.
    Tcp {
        ticket: u64,
        server: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Relay this answer to whoever asked.
    Answer { asker: Asker, bytes: Vec<u8> },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ZoneStats {
    pub queries: u64,
    pub answers: u64,
    pub failovers: u64,
    pub servfails: u64,
}

#[derive(Debug)]
pub struct Zone {
    pub spec: ZoneSpec,
    wire: Vec<u8>,
    pub resolvers: Resolvers,
    pub stats: ZoneStats,
}

#[derive(Debug)]
struct Flight {
    /// `None` for the forwarder's own probe of a resolver marked down.
    asker: Option<Asker>,
    zone: u64,
    msg: Vec<u8>,
    client_id: u16,
    question_end: usize,
    name: Vec<u8>,
    attempt: Attempt,
    server: SocketAddr,
    wire_id: u16,
    deadline: Instant,
    /// Waiting for the TCP retry; the truncated answer is relayed if it fails.
    truncated: Option<Vec<u8>>,
    probe_of: Option<usize>,
}

#[derive(Debug, Clone)]
struct Bucket {
    rate: TokenBucket,
    in_flight: u32,
}

pub struct Forwarder {
    /// By key, so a reload keeps the state of zones that did not change.
    zones: Vec<(u64, Zone)>,
    next_zone: u64,
    flights: HashMap<u64, Flight>,
    next_flight: u64,
    /// (query ID on the wire, resolver) → flight, at most MAX_PER_RESOLVER per resolver.
    pending: QueryIds<u64>,
    peers: HashMap<u64, Bucket>,
    out: std::collections::VecDeque<Output>,
    rng: Jitter,
    next_probe: Option<Instant>,
    limits: Arc<Limits>,
}

impl Forwarder {
    pub fn new(zones: Vec<ZoneSpec>, limits: Arc<Limits>, seed: u64) -> Forwarder {
        let mut f = Forwarder {
            zones: Vec::new(),
            next_zone: 1,
            flights: HashMap::new(),
            next_flight: 1,
            pending: QueryIds::new(MAX_PER_RESOLVER as usize),
            peers: HashMap::new(),
            out: std::collections::VecDeque::new(),
            rng: Jitter::new(seed),
            next_probe: None,
            limits,
        };
        f.set_zones(zones);
        f
    }

    /// Reload: a zone whose domain, servers and rules are unchanged keeps its counters and
    /// resolver health; queries in flight for a removed zone end in SERVFAIL.
    pub fn set_zones(&mut self, zones: Vec<ZoneSpec>) {
        let mut old = std::mem::take(&mut self.zones);
        for spec in zones {
            if let Some(i) = old.iter().position(|(_, z)| z.spec == spec) {
                self.zones.push(old.swap_remove(i));
                continue;
            }
            let Ok(wire) = dns::wire_name(&spec.domain) else {
                continue;
            };
            let key = self.next_zone;
            self.next_zone += 1;
            self.zones.push((
                key,
                Zone {
                    resolvers: Resolvers::new(spec.servers.len(), spec.on_servfail, PROBE_EVERY),
                    spec,
                    wire,
                    stats: ZoneStats::default(),
                },
            ));
        }
    }

    pub fn zones(&self) -> impl Iterator<Item = &Zone> {
        self.zones.iter().map(|(_, z)| z)
    }

    pub fn domains(&self) -> Vec<String> {
        self.zones().map(|z| z.spec.domain.clone()).collect()
    }

    fn zone_mut(&mut self, key: u64) -> Option<&mut Zone> {
        self.zones
            .iter_mut()
            .find(|(k, _)| *k == key)
            .map(|(_, z)| z)
    }

    /// A query relayed by a peer. Answered (REFUSED outside the zones, SERVFAIL when no
    /// resolver answers or over an in-flight bound) unless it is not a query at all or over
    /// the peer's rate: then dropped, counted, and `false` returned (no answer will come).
    pub fn handle_query(&mut self, now: Instant, asker: Asker, msg: &[u8]) -> bool {
        let Ok(q) = dns::parse_query(msg) else {
            self.limits.count(Limit::DnsNotAQuery);
            return false;
        };
        let bucket = self.peers.entry(asker.peer).or_insert_with(|| Bucket {
            rate: TokenBucket::new(PEER_RATE, PEER_BURST, now),
            in_flight: 0,
        });
        if !bucket.rate.take(now) {
            self.limits.count(Limit::DnsRate);
            return false;
        }
        let Some(zi) = self
            .zones
            .iter()
            .position(|(_, z)| dns::in_zone(&q.name, &z.wire))
        else {
            let bytes = error_response(msg, q.question_end, RCODE_REFUSED);
            self.out.push_back(Output::Answer { asker, bytes });
            return true;
        };
        if bucket.in_flight >= MAX_PER_PEER || self.flights.len() >= MAX_IN_FLIGHT {
            self.limits.count(if bucket.in_flight >= MAX_PER_PEER {
                Limit::DnsInFlightPeer
            } else {
                Limit::DnsInFlightGlobal
            });
            let bytes = error_response(msg, q.question_end, RCODE_SERVFAIL);
            self.out.push_back(Output::Answer { asker, bytes });
            return true;
        }
        bucket.in_flight += 1;
        let (key, zone) = &mut self.zones[zi];
        zone.stats.queries += 1;
        let Some(attempt) = zone.resolvers.start(now) else {
            zone.stats.servfails += 1;
            self.release(asker);
            self.finish_error(asker, msg, q.question_end);
            return true;
        };
        let server = zone.spec.servers.get(attempt.current).copied();
        let id = self.next_flight;
        self.next_flight += 1;
        let flight = Flight {
            asker: Some(asker),
            zone: *key,
            msg: msg.to_vec(),
            client_id: q.id,
            question_end: q.question_end,
            name: q.name,
            attempt,
            server: server.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 53))),
            wire_id: 0,
            deadline: now,
            truncated: None,
            probe_of: None,
        };
        self.flights.insert(id, flight);
        self.send(now, id);
        true
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Sends flight `id` to its current resolver under a fresh ID, or ends it.
    fn send(&mut self, now: Instant, id: u64) {
        let Some(f) = self.flights.get(&id) else {
            return;
        };
        let server = f.server;
        let candidates: [u16; ID_TRIES] =
            std::array::from_fn(|_| (self.rng.next_u64() >> 48) as u16);
        let wire_id = match self.pending.insert(server, &candidates, id) {
            Ok(w) => w,
            Err(e) => {
                self.limits.count(match e {
                    IdRefused::ResolverBusy => Limit::DnsResolverBusy,
                    IdRefused::NoFreeId => Limit::DnsNoQueryId,
                });
                return self.give_up(id);
            }
        };
        let Some(f) = self.flights.get_mut(&id) else {
            return;
        };
        f.wire_id = wire_id;
        f.deadline = now + QUERY_TIMEOUT;
        let mut bytes = f.msg.clone();
        if bytes.len() >= 2 {
            bytes[..2].copy_from_slice(&wire_id.to_be_bytes());
        }
        self.out.push_back(Output::Udp { server, bytes });
    }

    fn unpend(&mut self, id: u64) {
        if let Some(f) = self.flights.get(&id)
            && self.pending.get(f.wire_id, f.server) == Some(&id)
        {
            self.pending.remove(f.wire_id, f.server);
        }
    }

    /// An answer on one of the pool's sockets, from `from`. Anything that does not match a
    /// query in flight by ID, resolver and question is ignored: spoofed answers go nowhere.
    pub fn handle_udp_answer(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let (Some(_), Some(id)) = (
            dns::response_rcode(bytes),
            bytes.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])),
        ) else {
            return;
        };
        let Some(fid) = self.pending.get(id, from).copied() else {
            return;
        };
        let same_question = self.flights.get(&fid).is_some_and(|f| {
            dns::parse_name(bytes, 12).is_ok_and(|(got, _)| got.eq_ignore_ascii_case(&f.name))
        });
        if !same_question {
            return;
        }
        self.unpend(fid);
        let Some(f) = self.flights.get_mut(&fid) else {
            return;
        };
        if dns::truncated(bytes) && f.probe_of.is_none() {
            f.truncated = Some(bytes.to_vec());
            f.deadline = now + TCP_TIMEOUT;
            let mut q = f.msg.clone();
            q[..2].copy_from_slice(&f.wire_id.to_be_bytes());
            self.out.push_back(Output::Tcp {
                ticket: fid,
                server: from,
                bytes: q,
            });
            return;
        }
        self.answered(now, fid, bytes.to_vec());
    }

    /// The TCP retry's outcome. A failure relays the truncated UDP answer: the stub can retry.
    pub fn handle_tcp_answer(&mut self, now: Instant, ticket: u64, answer: Option<Vec<u8>>) {
        let Some(f) = self.flights.get_mut(&ticket) else {
            return;
        };
        let Some(truncated) = f.truncated.take() else {
            return;
        };
        let asked = answer.is_some();
        let good = answer.filter(|a| {
            dns::response_rcode(a).is_some()
                && dns::parse_name(a, 12).is_ok_and(|(n, _)| n.eq_ignore_ascii_case(&f.name))
        });
        if asked && good.is_none() {
            self.limits.count(Limit::DnsBadTcpAnswer);
        }
        self.answered(now, ticket, good.unwrap_or(truncated));
    }

    fn answered(&mut self, now: Instant, fid: u64, mut bytes: Vec<u8>) {
        let Some(f) = self.flights.get_mut(&fid) else {
            return;
        };
        let rcode = dns::response_rcode(&bytes).unwrap_or(RCODE_SERVFAIL);
        let zone_key = f.zone;
        let mut attempt = f.attempt.clone();
        let probe_of = f.probe_of;
        let Some(zone) = self.zone_mut(zone_key) else {
            return self.give_up(fid);
        };
        if let Some(index) = probe_of {
            zone.resolvers
                .on_probe_answer(index, now.saturating_duration_since(attempt.sent_at));
            self.flights.remove(&fid);
            return;
        }
        let step = zone.resolvers.on_answer(&mut attempt, rcode, now);
        match step {
            Step::Deliver => {
                zone.stats.answers += 1;
                if let Some(f) = self.flights.remove(&fid) {
                    if bytes.len() >= 2 {
                        bytes[..2].copy_from_slice(&f.client_id.to_be_bytes());
                    }
                    if let Some(asker) = f.asker {
                        self.release(asker);
                        self.out.push_back(Output::Answer { asker, bytes });
                    }
                }
            }
            Step::Ask(next) => {
                zone.stats.failovers += 1;
                self.retarget(now, fid, attempt, next, zone_key);
            }
            Step::GiveUp => {
                zone.stats.servfails += 1;
                self.give_up(fid);
            }
        }
    }

    fn retarget(&mut self, now: Instant, fid: u64, attempt: Attempt, next: usize, zone: u64) {
        let server = self
            .zone_mut(zone)
            .and_then(|z| z.spec.servers.get(next).copied());
        let (Some(server), Some(f)) = (server, self.flights.get_mut(&fid)) else {
            return self.give_up(fid);
        };
        f.attempt = attempt;
        f.server = server;
        self.send(now, fid);
    }

    /// Ends a flight with SERVFAIL to whoever asked.
    fn give_up(&mut self, fid: u64) {
        self.unpend(fid);
        if let Some(f) = self.flights.remove(&fid)
            && let Some(asker) = f.asker
        {
            self.release(asker);
            self.finish_error(asker, &f.msg, f.question_end);
        }
    }

    fn finish_error(&mut self, asker: Asker, msg: &[u8], question_end: usize) {
        let bytes = error_response(msg, question_end, RCODE_SERVFAIL);
        self.out.push_back(Output::Answer { asker, bytes });
    }

    fn release(&mut self, asker: Asker) {
        if let Some(b) = self.peers.get_mut(&asker.peer) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }

    /// A peer left: its bucket goes (its queries in flight still end normally).
    pub fn forget_peer(&mut self, peer: u64) {
        if self.peers.get(&peer).is_some_and(|b| b.in_flight == 0) {
            self.peers.remove(&peer);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .flights
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for fid in late {
            let Some(f) = self.flights.get_mut(&fid) else {
                continue;
            };
            if let Some(t) = f.truncated.take() {
                self.answered(now, fid, t);
                continue;
            }
            if f.probe_of.is_some() {
                self.unpend(fid);
                self.flights.remove(&fid);
                continue;
            }
            let (zone_key, mut attempt) = (f.zone, f.attempt.clone());
            self.unpend(fid);
            let Some(zone) = self.zone_mut(zone_key) else {
                self.give_up(fid);
                continue;
            };
            match zone.resolvers.on_timeout(&mut attempt, now) {
                Step::Ask(next) => {
                    zone.stats.failovers += 1;
                    self.retarget(now, fid, attempt, next, zone_key);
                }
                Step::Deliver | Step::GiveUp => {
                    zone.stats.servfails += 1;
                    self.give_up(fid);
                }
            }
        }
        if self.next_probe.is_none_or(|t| t <= now) {
            self.next_probe = Some(now + Duration::from_millis(500));
            self.probe(now);
        }
    }

    /// Asks each resolver marked down for its zone's SOA, so queries stop skipping it once it
    /// answers again.
    fn probe(&mut self, now: Instant) {
        let mut probes = Vec::new();
        for (key, zone) in &mut self.zones {
            for index in zone.resolvers.due_probes(now) {
                if let Some(server) = zone.spec.servers.get(index) {
                    probes.push((
                        *key,
                        index,
                        *server,
                        soa_query(&zone.wire),
                        zone.wire.clone(),
                    ));
                }
            }
        }
        for (zone, index, server, msg, name) in probes {
            if self.flights.len() >= MAX_IN_FLIGHT {
                return;
            }
            let id = self.next_flight;
            self.next_flight += 1;
            self.flights.insert(
                id,
                Flight {
                    asker: None,
                    zone,
                    msg,
                    client_id: 0,
                    question_end: 0,
                    name,
                    attempt: Attempt::probe(index, now),
                    server,
                    wire_id: 0,
                    deadline: now,
                    truncated: None,
                    probe_of: Some(index),
                },
            );
            self.send(now, id);
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let flights = self.flights.values().map(|f| f.deadline).min();
        let probe = self
            .zones()
            .any(|z| z.resolvers.health().iter().any(|h| !h.up))
            .then_some(self.next_probe)
            .flatten();
        match (flights, probe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Queries in flight, for tests and status.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }
}

fn soa_query(zone_wire: &[u8]) -> Vec<u8> {
    let mut q = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(zone_wire);
    q.extend_from_slice(&[0, 6, 0, 1]);
    q
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
