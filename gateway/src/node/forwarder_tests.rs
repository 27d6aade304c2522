//! The DNS forwarder's decisions, in-process: failover, SERVFAIL in both modes, truncation,
//! spoofed answers, and the bounds that keep one peer's flood from starving the rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::drops::{Limit, Limits};
use super::forwarder::{
    Asker, Forwarder, MAX_PER_PEER, Output, PEER_BURST, QUERY_TIMEOUT, ZoneSpec,
};
use crate::core::dns::{self, RCODE_NXDOMAIN, RCODE_SERVFAIL};
use crate::core::resolver::OnServfail;

const PRIMARY: &str = "10.128.0.61:53";
const SECONDARY: &str = "10.128.0.130:53";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn zone(domain: &str, servers: &[&str], on_servfail: OnServfail) -> ZoneSpec {
    ZoneSpec {
        domain: domain.into(),
        servers: servers.iter().map(|s| addr(s)).collect(),
        on_servfail,
    }
}

fn query(id: u16, name: &str) -> Vec<u8> {
    dns::test_query(id, name)
}

/// What a resolver would answer to `q`: the question echoed, `rcode`, TC when `truncated`.
fn answer(q: &[u8], rcode: u8, truncated: bool) -> Vec<u8> {
    let mut a = q.to_vec();
    a[2] = 0x80 | (q[2] & 0x01) | if truncated { 0x02 } else { 0 };
    a[3] = 0x80 | rcode;
    a
}

struct Sim {
    now: Instant,
    f: Forwarder,
    limits: Arc<Limits>,
    /// Queries sent to resolvers, and answers relayed to peers.
    sent: Vec<(SocketAddr, Vec<u8>)>,
    tcp: Vec<(u64, SocketAddr, Vec<u8>)>,
    answers: Vec<(Asker, Vec<u8>)>,
}

impl Sim {
    fn new(zones: Vec<ZoneSpec>) -> Sim {
        let limits = Arc::new(Limits::default());
        Sim {
            now: Instant::now(),
            f: Forwarder::new(zones, limits.clone(), 42),
            limits,
            sent: Vec::new(),
            tcp: Vec::new(),
            answers: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(o) = self.f.poll_output() {
            match o {
                Output::Udp { server, bytes } => self.sent.push((server, bytes)),
                Output::Tcp {
                    ticket,
                    server,
                    bytes,
                } => self.tcp.push((ticket, server, bytes)),
                Output::Answer { asker, bytes } => self.answers.push((asker, bytes)),
            }
        }
    }

    fn ask(&mut self, peer: u64, id: u16, name: &str) {
        let asker = Asker {
            peer,
            reply_to: u64::from(id),
        };
        let _ = self.f.handle_query(self.now, asker, &query(id, name));
        self.drain();
    }

    /// The resolver `server` answers the last query sent to it.
    fn resolver_answers(&mut self, server: &str, rcode: u8, truncated: bool) {
        let (to, q) = self
            .sent
            .iter()
            .rev()
            .find(|(s, _)| *s == addr(server))
            .cloned()
            .expect("a query was sent there");
        self.f
            .handle_udp_answer(self.now, to, &answer(&q, rcode, truncated));
        self.drain();
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.f.handle_timeout(self.now);
        self.drain();
    }
}

fn rcode(a: &[u8]) -> u8 {
    dns::response_rcode(a).expect("a response")
}

#[test]
fn a_silent_primary_fails_over_to_the_secondary_and_is_skipped_after() {
    let mut s = Sim::new(vec![zone(
        "hoge-vpc.com",
        &[PRIMARY, SECONDARY],
        OnServfail::Failover,
    )]);
    s.ask(1, 7, "db.hoge-vpc.com");
    assert_eq!(s.sent.last().map(|(a, _)| *a), Some(addr(PRIMARY)));
    s.advance(QUERY_TIMEOUT);
    assert_eq!(s.sent.last().map(|(a, _)| *a), Some(addr(SECONDARY)));
    s.resolver_answers(SECONDARY, 0, false);
    let (asker, a) = s.answers.last().expect("answered");
    assert_eq!(asker.reply_to, 7);
    assert_eq!(
        &a[..2],
        &7u16.to_be_bytes(),
        "the client's own ID comes back"
    );
    // The next query does not wait for the primary.
    s.ask(1, 8, "db.hoge-vpc.com");
    assert_eq!(s.sent.last().map(|(a, _)| *a), Some(addr(SECONDARY)));
    let z = s.f.zones().next().expect("zone");
    assert_eq!(
        (z.stats.queries, z.stats.answers, z.stats.failovers),
        (2, 1, 1)
    );
    assert!(!z.resolvers.health()[0].up);
}

#[test]
fn servfail_moves_on_by_default_and_is_the_answer_with_on_servfail_return() {
    let mut s = Sim::new(vec![zone(
        "hoge-vpc.com",
        &[PRIMARY, SECONDARY],
        OnServfail::Failover,
    )]);
    s.ask(1, 1, "broken.hoge-vpc.com");
    s.resolver_answers(PRIMARY, RCODE_SERVFAIL, false);
    s.resolver_answers(SECONDARY, 0, false);
    assert_eq!(rcode(&s.answers.last().expect("answer").1), 0);

    let mut s = Sim::new(vec![zone(
        "hoge-vpc.com",
        &[PRIMARY, SECONDARY],
        OnServfail::Return,
    )]);
    s.ask(1, 1, "broken.hoge-vpc.com");
    s.resolver_answers(PRIMARY, RCODE_SERVFAIL, false);
    assert_eq!(rcode(&s.answers.last().expect("answer").1), RCODE_SERVFAIL);
    assert_eq!(s.sent.len(), 1, "the secondary was not asked");
    // NXDOMAIN is final in both modes.
    s.ask(1, 2, "nope.hoge-vpc.com");
    s.resolver_answers(PRIMARY, RCODE_NXDOMAIN, false);
    assert_eq!(rcode(&s.answers.last().expect("answer").1), RCODE_NXDOMAIN);
}

#[test]
fn every_resolver_silent_is_servfail_and_names_outside_the_zones_are_refused() {
    let mut s = Sim::new(vec![zone(
        "hoge-vpc.com",
        &[PRIMARY, SECONDARY],
        OnServfail::Failover,
    )]);
    s.ask(1, 3, "db.hoge-vpc.com");
    s.advance(QUERY_TIMEOUT);
    s.advance(QUERY_TIMEOUT);
    assert_eq!(rcode(&s.answers.last().expect("answer").1), RCODE_SERVFAIL);
    s.ask(1, 4, "www.example.com");
    assert_eq!(
        rcode(&s.answers.last().expect("answer").1),
        dns::RCODE_REFUSED
    );
    assert_eq!(s.f.in_flight(), 0);
}

#[test]
fn a_truncated_answer_is_asked_again_over_tcp() {
    let mut s = Sim::new(vec![zone("hoge-vpc.com", &[PRIMARY], OnServfail::Failover)]);
    s.ask(1, 9, "big.hoge-vpc.com");
    s.resolver_answers(PRIMARY, 0, true);
    assert!(s.answers.is_empty());
    let (ticket, server, q) = s.tcp.pop().expect("a TCP retry");
    assert_eq!(server, addr(PRIMARY));
    let mut full = answer(&q, 0, false);
    full.extend_from_slice(&[0u8; 3000]);
    s.f.handle_tcp_answer(s.now, ticket, Some(full.clone()));
    s.drain();
    let (_, a) = s.answers.last().expect("answered");
    assert_eq!(a.len(), full.len());
    assert_eq!(&a[..2], &9u16.to_be_bytes());
    // When TCP fails, the truncated answer is relayed: the stub can retry by itself.
    s.ask(1, 10, "big.hoge-vpc.com");
    s.resolver_answers(PRIMARY, 0, true);
    let (ticket, _, _) = s.tcp.pop().expect("a TCP retry");
    s.f.handle_tcp_answer(s.now, ticket, Some(vec![0x12])); // shorter than a header
    s.drain();
    let (_, a) = s.answers.last().expect("answered");
    assert!(dns::truncated(a));
}

#[test]
fn spoofed_answers_are_ignored() {
    let mut s = Sim::new(vec![zone("hoge-vpc.com", &[PRIMARY], OnServfail::Failover)]);
    s.ask(1, 5, "db.hoge-vpc.com");
    let (_, q) = s.sent.last().cloned().expect("sent");
    let now = s.now;
    // Wrong server, wrong ID, wrong name: none is taken.
    s.f.handle_udp_answer(now, addr(SECONDARY), &answer(&q, 0, false));
    let mut wrong_id = answer(&q, 0, false);
    wrong_id[0] ^= 0xff;
    s.f.handle_udp_answer(now, addr(PRIMARY), &wrong_id);
    let mut other = query(0, "evil.hoge-vpc.com");
    other[..2].copy_from_slice(&q[..2]);
    s.f.handle_udp_answer(now, addr(PRIMARY), &answer(&other, 0, false));
    s.f.handle_udp_answer(now, addr(PRIMARY), &[0xff]);
    s.drain();
    assert!(s.answers.is_empty());
    s.resolver_answers(PRIMARY, 0, false);
    assert_eq!(s.answers.len(), 1);
}

#[test]
fn one_peers_flood_is_bounded_and_others_still_get_answers() {
    let mut s = Sim::new(vec![
        zone("silent.test", &["10.128.0.200:53"], OnServfail::Failover),
        zone("hoge-vpc.com", &[PRIMARY], OnServfail::Failover),
    ]);
    // 100k queries/s for 4 s from peer 1 at a silent resolver.
    for i in 0..400_000u32 {
        if i % 100 == 0 {
            s.advance(Duration::from_millis(1));
        }
        s.ask(1, i as u16, "x.silent.test");
        assert!(s.f.in_flight() <= MAX_PER_PEER as usize + 1);
        s.sent.clear();
        s.answers.clear();
    }
    let refused = s.limits.get(Limit::DnsRate) + s.limits.get(Limit::DnsInFlightPeer);
    assert!(refused > 390_000, "{refused}");
    assert!(s.limits.get(Limit::DnsRate) >= 400_000 - 4 * 50_000 - u64::from(PEER_BURST));
    // Peer 2 is not starved.
    s.ask(2, 77, "db.hoge-vpc.com");
    s.resolver_answers(PRIMARY, 0, false);
    let (asker, _) = s.answers.last().expect("answered");
    assert_eq!((asker.peer, asker.reply_to), (2, 77));
}

#[test]
fn a_resolver_marked_down_is_probed_and_comes_back() {
    let mut s = Sim::new(vec![zone(
        "hoge-vpc.com",
        &[PRIMARY, SECONDARY],
        OnServfail::Failover,
    )]);
    s.ask(1, 1, "db.hoge-vpc.com");
    s.advance(QUERY_TIMEOUT);
    s.resolver_answers(SECONDARY, 0, false);
    s.sent.clear();
    for _ in 0..5 {
        s.advance(Duration::from_millis(500));
    }
    let probe = s
        .sent
        .iter()
        .find(|(a, _)| *a == addr(PRIMARY))
        .cloned()
        .expect("the primary is probed");
    assert_eq!(&probe.1[probe.1.len() - 4..], &[0, 6, 0, 1], "an SOA query");
    s.resolver_answers(PRIMARY, 0, false);
    assert!(s.f.zones().next().expect("zone").resolvers.health()[0].up);
    s.ask(1, 2, "db.hoge-vpc.com");
    assert_eq!(s.sent.last().map(|(a, _)| *a), Some(addr(PRIMARY)));
}

#[test]
fn bytes_that_are_no_query_are_dropped_and_counted() {
    let mut s = Sim::new(vec![zone("hoge-vpc.com", &[PRIMARY], OnServfail::Failover)]);
    let asker = Asker {
        peer: 1,
        reply_to: 1,
    };
    for junk in [&[][..], &[1, 2, 3], &[0u8; 12], &[0xff; 40]] {
        assert!(!s.f.handle_query(s.now, asker, junk));
    }
    s.drain();
    assert!(s.answers.is_empty() && s.sent.is_empty());
    assert_eq!(s.limits.get(Limit::DnsNotAQuery), 4);
}
