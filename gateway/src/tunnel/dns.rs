//! The connector's DNS forwarder, as IO around `node::forwarder`: a task that owns the state
//! machine, a small pool of UDP sockets on the pinned egress ports (their answers fed back to
//! it), TCP retries for truncated answers, ICMP echo to the resolvers for status, and a bounded
//! queue of queries from clients and access streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::link::TcpLink;
use crate::api::{ResolverStatus, ZoneStatus};
use crate::config::Zone;
use crate::node::drops::{Limit, Limits};
use crate::node::forwarder::{self, Asker, Output, ZoneSpec};

const PING_EVERY: Duration = Duration::from_secs(5);
/// Sockets in the pool: enough to spread load, few enough to leave the range to NAT.
const POOL: u16 = 4;
const MAX_MESSAGE: usize = 65_535;
/// Queries waiting for the forwarder's task: a burst from every client at once; beyond it a
/// query is dropped (and counted) rather than queued.
const QUEUE: usize = 4096;
/// TCP retries (truncated answers) at once: each holds a socket for up to 3 s.
const MAX_TCP_RETRIES: usize = 64;
/// How often status' copy of the zones' counters and health is refreshed when nothing happens
/// (resolver probes, pings), and at most how stale it gets while queries keep coming.
const STATUS_EVERY: Duration = Duration::from_millis(250);
const STATUS_UNDER_LOAD: Duration = Duration::from_millis(20);
/// Queries and answers the task takes in one turn when more are waiting.
const BATCH: usize = 64;

/// Where an answer goes.
pub enum Reply {
    /// A task waiting for it (a QUIC stream, an access stream's name lookup).
    Waiter(oneshot::Sender<Vec<u8>>),
    /// A DnsAnswer frame with this request id on a client's TCP link.
    Frame(Arc<TcpLink>, u32),
    /// An answer with this request id for a QUIC DNS channel's writer; the permit is the
    /// query's share of the channel's bound, given back when the answer leaves (or the query
    /// is dropped).
    Channel(mpsc::Sender<(u32, Vec<u8>)>, u32, OwnedSemaphorePermit),
}

enum Request {
    Query {
        peer: u64,
        msg: Vec<u8>,
        reply: Reply,
    },
    Zones(Vec<ZoneSpec>),
}

/// A handle on the forwarder's task.
pub struct Forwarder {
    requests: mpsc::Sender<Request>,
    domains: Mutex<Vec<String>>,
    status: Arc<Mutex<Vec<ZoneStatus>>>,
    limits: Arc<Limits>,
}

fn specs(zones: &[Zone]) -> Vec<ZoneSpec> {
    zones
        .iter()
        .map(|z| ZoneSpec {
            domain: z.domain.clone(),
            servers: z
                .servers
                .iter()
                .map(|ip| SocketAddr::new(*ip, 53))
                .collect(),
            on_servfail: z.on_servfail,
        })
        .collect()
}

impl Forwarder {
    /// Binds the socket pool to the top of `ports` (the pinned egress range) or to any port,
    /// and starts the task.
    pub async fn start(
        zones: &[Zone],
        ports: Option<(u16, u16)>,
        tasks: &mut tokio::task::JoinSet<()>,
        limits: Arc<Limits>,
    ) -> anyhow::Result<Arc<Forwarder>> {
        let mut sockets = Vec::new();
        let binds: Vec<u16> = match ports {
            Some((lo, hi)) => (hi.saturating_sub(POOL - 1).max(lo)..=hi).collect(),
            None => vec![0; usize::from(POOL)],
        };
        for port in binds {
            // Dual stack: IPv4 and IPv6 resolvers alike, from the same pinned ports.
            let s = super::net::udp_dual_stack(port)
                .await
                .with_context(|| format!("binding the DNS forwarder to UDP port {port}"))?;
            sockets.push(Arc::new(s));
        }
        let (requests, rx) = mpsc::channel(QUEUE);
        let specs = specs(zones);
        let fwd = Arc::new(Forwarder {
            requests,
            domains: Mutex::new(specs.iter().map(|z| z.domain.clone()).collect()),
            status: Arc::new(Mutex::new(Vec::new())),
            limits: limits.clone(),
        });
        let pings = Arc::new(Mutex::new(HashMap::new()));
        let seed = rand::random::<u64>();
        let task = Task {
            f: forwarder::Forwarder::new(specs, limits, seed),
            sockets,
            next_socket: 0,
            replies: HashMap::new(),
            next_reply: 1,
            ports,
            tcp_retries: 0,
            status: fwd.status.clone(),
            pings: pings.clone(),
            zones_generation: 1,
            published_generation: 0,
        };
        tasks.spawn(task.run(rx));
        tasks.spawn(ping_resolvers(fwd.clone(), pings));
        Ok(fwd)
    }

    pub fn domains(&self) -> Vec<String> {
        self.domains.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Reload: the new zones take effect for the next query.
    pub fn set_zones(&self, zones: &[Zone]) {
        let specs = specs(zones);
        if let Ok(mut d) = self.domains.lock() {
            *d = specs.iter().map(|z| z.domain.clone()).collect();
        }
        let _ = self.requests.try_send(Request::Zones(specs));
    }

    /// Queues `msg` from `peer`; `false` (counted) when the queue is full.
    pub fn submit(&self, peer: u64, msg: Vec<u8>, reply: Reply) -> bool {
        let ok = self
            .requests
            .try_send(Request::Query { peer, msg, reply })
            .is_ok();
        if !ok {
            self.limits.count(Limit::DnsQueueFull);
        }
        ok
    }

    /// The answer to `msg` from `peer`, or `None` when it was dropped (a bound) or no query.
    pub async fn resolve(&self, peer: u64, msg: &[u8]) -> Option<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        if !self.submit(peer, msg.to_vec(), Reply::Waiter(tx)) {
            return None;
        }
        // Every admitted query is answered within the resolvers' timeouts; the bound is a
        // backstop against a task that stopped.
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .ok()?
            .ok()
    }

    pub fn status(&self) -> Vec<ZoneStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

struct Task {
    f: forwarder::Forwarder,
    sockets: Vec<Arc<UdpSocket>>,
    next_socket: usize,
    replies: HashMap<u64, Reply>,
    next_reply: u64,
    /// The pinned range TCP retries also come from, so the VPC's ACL needs nothing wider.
    ports: Option<(u16, u16)>,
    tcp_retries: usize,
    status: Arc<Mutex<Vec<ZoneStatus>>>,
    pings: Arc<Mutex<HashMap<SocketAddr, Duration>>>,
    /// Bumped when the zones change; status is rebuilt whole only then, and its figures
    /// updated in place otherwise (it is published after nearly every answer).
    zones_generation: u64,
    published_generation: u64,
}

impl Task {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let (tcp_tx, mut tcp_done) = mpsc::channel::<(u64, Option<Vec<u8>>)>(MAX_TCP_RETRIES);
        let mut status = tokio::time::interval(STATUS_EVERY);
        let mut published = Instant::now();
        // The task reads the pool itself: no task and no queue between an answer and the
        // state machine.
        let sockets = self.sockets.clone();
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let wake = self.f.poll_timeout();
            tokio::select! {
                r = requests.recv() => match r {
                    Some(r) => self.request(r),
                    None => return,
                },
                i = recv_ready(&sockets) => self.read_answers(i, &mut buf),
                Some((ticket, answer)) = tcp_done.recv() => {
                    self.tcp_retries = self.tcp_retries.saturating_sub(1);
                    self.f.handle_tcp_answer(Instant::now(), ticket, answer);
                }
                _ = sleep_until(wake) => self.f.handle_timeout(Instant::now()),
                _ = status.tick() => self.publish(),
            }
            // The queries waiting too (answers are read until the socket is empty): one status
            // update and one round of sends for the lot instead of one per message.
            for _ in 0..BATCH {
                let Ok(r) = requests.try_recv() else {
                    break;
                };
                self.request(r);
            }
            // Status is brought up to date before answers leave, so whoever got an answer sees
            // it counted; under load (queries waiting) at most every STATUS_UNDER_LOAD.
            if requests.is_empty() || published.elapsed() >= STATUS_UNDER_LOAD {
                self.publish();
                published = Instant::now();
            }
            self.carry_out(&tcp_tx);
        }
    }

    /// What pool socket `i` holds, up to a batch (the rest on the next turn).
    fn read_answers(&mut self, i: usize, buf: &mut [u8]) {
        let Some(socket) = self.sockets.get(i).cloned() else {
            return;
        };
        let now = Instant::now();
        for _ in 0..BATCH {
            match socket.try_recv_from(buf) {
                Ok((n, from)) => {
                    let from = super::net::canonical(from);
                    self.f.handle_udp_answer(now, from, &buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                // A socket error is reported once: like a datagram lost, the timeout moves on.
                Err(_) => {}
            }
        }
    }

    fn request(&mut self, r: Request) {
        match r {
            Request::Zones(z) => {
                self.f.set_zones(z);
                self.zones_generation += 1;
            }
            Request::Query { peer, msg, reply } => {
                let reply_to = self.next_reply;
                self.next_reply += 1;
                let asker = Asker { peer, reply_to };
                if self.f.handle_query(Instant::now(), asker, &msg) {
                    self.replies.insert(reply_to, reply);
                }
            }
        }
    }

    /// Does what the state machine asked.
    fn carry_out(&mut self, tcp_tx: &mpsc::Sender<(u64, Option<Vec<u8>>)>) {
        while let Some(o) = self.f.poll_output() {
            match o {
                Output::Udp { server, bytes } => {
                    let i = self.next_socket % self.sockets.len().max(1);
                    self.next_socket = self.next_socket.wrapping_add(1);
                    // A full socket buffer loses the query like the network would: the
                    // resolver's timeout moves it on.
                    if let Some(s) = self.sockets.get(i) {
                        let _ = s.try_send_to(&bytes, server);
                    }
                }
                Output::Tcp {
                    ticket,
                    server,
                    bytes,
                } => {
                    if self.tcp_retries >= MAX_TCP_RETRIES {
                        self.f.handle_tcp_answer(Instant::now(), ticket, None);
                        continue;
                    }
                    self.tcp_retries += 1;
                    let (tx, ports) = (tcp_tx.clone(), self.ports);
                    tokio::spawn(async move {
                        let answer = ask_tcp(server, &bytes, ports).await.ok();
                        let _ = tx.send((ticket, answer)).await;
                    });
                }
                Output::Answer { asker, bytes } => match self.replies.remove(&asker.reply_to) {
                    Some(Reply::Waiter(tx)) => {
                        let _ = tx.send(bytes);
                    }
                    Some(Reply::Frame(link, id)) if link.try_answer_dns(id, &bytes).is_err() => {
                        self.f.limits().count(Limit::DnsAnswerQueueFull);
                    }
                    Some(Reply::Channel(tx, id, _)) if tx.try_send((id, bytes)).is_err() => {
                        self.f.limits().count(Limit::DnsAnswerQueueFull);
                    }
                    Some(Reply::Frame(..) | Reply::Channel(..)) => {}
                    None => {}
                },
            }
        }
    }

    fn publish(&mut self) {
        let (Ok(pings), Ok(mut status)) = (self.pings.lock(), self.status.lock()) else {
            return;
        };
        if self.published_generation != self.zones_generation {
            self.published_generation = self.zones_generation;
            *status = self
                .f
                .zones()
                .map(|z| ZoneStatus {
                    domain: z.spec.domain.clone(),
                    queries: 0,
                    answers: 0,
                    failovers: 0,
                    servfails: 0,
                    resolvers: z
                        .spec
                        .servers
                        .iter()
                        .map(|s| ResolverStatus {
                            address: s.ip().to_string(),
                            up: true,
                            latency_ms: None,
                            ping_ms: None,
                        })
                        .collect(),
                })
                .collect();
        }
        for (z, st) in self.f.zones().zip(status.iter_mut()) {
            st.queries = z.stats.queries;
            st.answers = z.stats.answers;
            st.failovers = z.stats.failovers;
            st.servfails = z.stats.servfails;
            let health = z.resolvers.health();
            for ((s, h), r) in z
                .spec
                .servers
                .iter()
                .zip(health)
                .zip(st.resolvers.iter_mut())
            {
                r.up = h.up;
                r.latency_ms = h.latency.map(|l| l.as_secs_f64() * 1000.0);
                r.ping_ms = pings.get(s).map(|l| l.as_secs_f64() * 1000.0);
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The index of a pool socket with something to read.
async fn recv_ready(sockets: &[Arc<UdpSocket>]) -> usize {
    std::future::poll_fn(|cx| {
        for (i, s) in sockets.iter().enumerate() {
            if s.poll_recv_ready(cx).is_ready() {
                return std::task::Poll::Ready(i);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// ICMP echo to every resolver, for status: whether the host answers at all, apart from its
/// DNS server. Skipped where echo sockets are not permitted.
async fn ping_resolvers(fwd: Arc<Forwarder>, pings: Arc<Mutex<HashMap<SocketAddr, Duration>>>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    loop {
        tick.tick().await;
        if super::probe::check_possible().is_err() {
            continue;
        }
        let servers: Vec<SocketAddr> = fwd
            .status()
            .iter()
            .flat_map(|z| z.resolvers.iter())
            .filter_map(|r| r.address.parse().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        let mut results = HashMap::new();
        for server in servers {
            if let Ok(rtt) = super::probe::echo(server.ip(), forwarder::QUERY_TIMEOUT).await {
                results.insert(server, rtt);
            }
        }
        if let Ok(mut p) = pings.lock() {
            *p = results;
        }
    }
}

/// Asks again over TCP, for answers too large for UDP, from a random port of the pinned range.
async fn ask_tcp(
    server: SocketAddr,
    msg: &[u8],
    ports: Option<(u16, u16)>,
) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(forwarder::TCP_TIMEOUT, async {
        let mut s = super::net::tcp_connect_from_range(server, ports).await?;
        let len = u16::try_from(msg.len())?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(msg).await?;
        let mut l = [0u8; 2];
        s.read_exact(&mut l).await?;
        let len = usize::from(u16::from_be_bytes(l));
        // Shorter than a header is no answer; the forwarder checks the rest.
        anyhow::ensure!(len >= 12, "a {len}-byte answer over TCP");
        let mut a = vec![0u8; len];
        s.read_exact(&mut a).await?;
        anyhow::Ok(a)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::dns::response_rcode;

    /// A resolver on loopback that answers every query NOERROR, echoing its ID and question.
    async fn resolver(ip: std::net::Ipv4Addr) -> tokio::task::JoinHandle<()> {
        let s = UdpSocket::bind((ip, 53))
            .await
            .expect("bind the test resolver");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let mut a = buf[..n].to_vec();
                a[2] |= 0x80;
                let _ = s.send_to(&a, from).await;
            }
        })
    }

    fn query(id: u16) -> Vec<u8> {
        crate::core::dns::test_query(id, "db.hoge-vpc.com")
    }

    #[tokio::test]
    async fn a_burst_of_queries_is_answered_each_to_its_asker_and_counted_in_status() {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, 201);
        let _resolver = resolver(ip).await;
        let zone = Zone {
            domain: "hoge-vpc.com".into(),
            servers: vec![ip.into()],
            on_servfail: crate::core::resolver::OnServfail::Failover,
        };
        let mut tasks = tokio::task::JoinSet::new();
        let fwd = Forwarder::start(&[zone], None, &mut tasks, Arc::new(Limits::default()))
            .await
            .expect("forwarder");
        let burst = 200u16;
        let asks: Vec<_> = (0..burst)
            .map(|i| {
                let fwd = fwd.clone();
                tokio::spawn(async move { (i, fwd.resolve(1, &query(i)).await) })
            })
            .collect();
        for a in asks {
            let (i, answer) = a.await.expect("task");
            let answer = answer.expect("answered");
            assert_eq!(answer[..2], i.to_be_bytes(), "the asker's own ID");
            assert_eq!(response_rcode(&answer), Some(0), "NOERROR");
        }
        let status = fwd.status();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].domain, "hoge-vpc.com");
        assert_eq!((status[0].queries, status[0].answers), (200, 200));
        assert_eq!(status[0].resolvers[0].address, "127.0.0.201");
        assert!(status[0].resolvers[0].up);
        tasks.abort_all();
    }
}
