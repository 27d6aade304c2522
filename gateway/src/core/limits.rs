//! The bounds that keep a peer from exhausting the connector, as plain state: a token bucket
//! (rates), a table of pending handshakes per source (descriptors before authentication), the
//! forwarder's table of query IDs in flight (a bounded, giving-up ID choice), and named
//! counters for status. Time comes in as `now`; randomness comes in as candidates.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

/// `rate` tokens a second, at most `burst` saved up; starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Takes one token if there is one. A clock that goes backwards adds nothing.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A warning that a peer can trigger at will is logged at most at the bucket's rate; the
/// lines left out are counted and named by the next one that is logged.
#[derive(Debug, Clone)]
pub struct LogLimit {
    bucket: TokenBucket,
    suppressed: u64,
}

impl LogLimit {
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> LogLimit {
        LogLimit {
            bucket: TokenBucket::new(per_sec, burst, now),
            suppressed: 0,
        }
    }

    /// `Some(lines left out since the last one logged)` when this one may be logged.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.bucket.take(now) {
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Where a connection comes from, for per-source bounds: the address for IPv4, the /64 for
/// IPv6 (one host usually holds a whole /64, so per-address bounds would not bound it).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Why a handshake was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefused {
    /// As many handshakes are pending as the connector allows at all.
    Global,
    /// As many handshakes are pending from this source as one source may have.
    Source,
}

impl SlotRefused {
    pub const fn name(self) -> &'static str {
        match self {
            SlotRefused::Global => "over_capacity",
            SlotRefused::Source => "over_capacity_per_source",
        }
    }
}

/// Handshakes under way (TCP accepted or QUIC Initial seen, TLS not yet done), globally and
/// per source; each holds a slot from [`take`](Self::take) until [`release`](Self::release).
#[derive(Debug)]
pub struct HandshakeSlots {
    max_total: usize,
    max_per_source: usize,
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl HandshakeSlots {
    pub fn new(max_total: usize, max_per_source: usize) -> HandshakeSlots {
        HandshakeSlots {
            max_total,
            max_per_source,
            total: 0,
            by_source: HashMap::new(),
        }
    }

    pub fn take(&mut self, source: IpAddr) -> Result<(), SlotRefused> {
        let key = source_key(source);
        if self.total >= self.max_total {
            return Err(SlotRefused::Global);
        }
        let n = self.by_source.entry(key).or_default();
        if *n >= self.max_per_source {
            return Err(SlotRefused::Source);
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    pub fn release(&mut self, source: IpAddr) {
        let key = source_key(source);
        if let Some(n) = self.by_source.get_mut(&key) {
            *n -= 1;
            self.total = self.total.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(&key);
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.total
    }
}

/// The first of `candidates` (random IDs drawn by the caller) that is not `taken`; `None`
/// when all are: the caller gives up rather than drawing forever.
pub fn pick_id(candidates: &[u16], taken: impl Fn(u16) -> bool) -> Option<u16> {
    candidates.iter().copied().find(|id| !taken(*id))
}

/// Why a query could not be given an ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdRefused {
    /// This resolver already has as many queries in flight as one resolver may.
    ResolverBusy,
    /// Every candidate ID was in use.
    NoFreeId,
}

impl IdRefused {
    pub const fn name(self) -> &'static str {
        match self {
            IdRefused::ResolverBusy => "dns_resolver_busy",
            IdRefused::NoFreeId => "dns_no_query_id",
        }
    }
}

/// Queries in flight towards resolvers, by (ID, resolver), at most `per_resolver` each: with
/// that well below the 65,536 IDs, a handful of random candidates finds a free one.
#[derive(Debug)]
pub struct QueryIds<V> {
    per_resolver: usize,
    entries: HashMap<(u16, SocketAddr), V>,
    counts: HashMap<SocketAddr, usize>,
}

impl<V> QueryIds<V> {
    pub fn new(per_resolver: usize) -> QueryIds<V> {
        QueryIds {
            per_resolver,
            entries: HashMap::new(),
            counts: HashMap::new(),
        }
    }

    /// Files `value` under the first free candidate ID for `server`.
    pub fn insert(
        &mut self,
        server: SocketAddr,
        candidates: &[u16],
        value: V,
    ) -> Result<u16, IdRefused> {
        let count = self.counts.get(&server).copied().unwrap_or(0);
        if count >= self.per_resolver {
            return Err(IdRefused::ResolverBusy);
        }
        let id = pick_id(candidates, |id| self.entries.contains_key(&(id, server)))
            .ok_or(IdRefused::NoFreeId)?;
        self.entries.insert((id, server), value);
        self.counts.insert(server, count + 1);
        Ok(id)
    }

    pub fn get(&self, id: u16, server: SocketAddr) -> Option<&V> {
        self.entries.get(&(id, server))
    }

    pub fn remove(&mut self, id: u16, server: SocketAddr) -> Option<V> {
        let v = self.entries.remove(&(id, server))?;
        if let Some(n) = self.counts.get_mut(&server) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&server);
            }
        }
        Some(v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Counters by a fixed name (`&'static str`: a peer cannot invent names, so the map stays
/// small), for status.
#[derive(Debug, Default)]
pub struct Tally(Mutex<BTreeMap<&'static str, u64>>);

impl Tally {
    pub fn bump(&self, name: &'static str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(name).or_default() += 1;
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_token_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5, "the burst");
        assert!(!b.take(t0 + Duration::from_millis(50)), "half a token");
        assert!(
            b.take(t0 + Duration::from_millis(100)),
            "one token after 100 ms"
        );
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.take(later)).count(), 5);
        // A clock that goes backwards gives nothing and breaks nothing.
        assert!(!b.take(t0));
        assert!(b.take(later + Duration::from_millis(100)));
    }

    #[test]
    fn a_log_limit_counts_what_it_leaves_out() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(1, 2, t0);
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
    }

    #[test]
    fn handshake_slots_bound_the_total_and_each_source() {
        let a: IpAddr = "198.51.100.10".parse().expect("ip");
        let b: IpAddr = "198.51.100.11".parse().expect("ip");
        let mut s = HandshakeSlots::new(3, 2);
        assert_eq!(s.take(a), Ok(()));
        assert_eq!(s.take(a), Ok(()));
        assert_eq!(s.take(a), Err(SlotRefused::Source));
        assert_eq!(s.take(b), Ok(()));
        assert_eq!(s.take(b), Err(SlotRefused::Global));
        s.release(a);
        assert_eq!(s.pending(), 2);
        assert_eq!(s.take(b), Ok(()));
        for ip in [a, b, b] {
            s.release(ip);
        }
        assert_eq!(s.pending(), 0);
        s.release(a); // one release too many changes nothing
        assert_eq!(s.pending(), 0);
        assert!(s.by_source.is_empty());
    }

    #[test]
    fn one_ipv6_host_is_one_source_however_many_addresses_it_uses() {
        let mut s = HandshakeSlots::new(100, 2);
        for i in 1..=2u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i));
            assert_eq!(s.take(ip), Ok(()));
        }
        let third = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 9, 9, 9, 9));
        assert_eq!(s.take(third), Err(SlotRefused::Source));
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert_eq!(s.take(other), Ok(()));
        let mapped: IpAddr = "::ffff:198.51.100.10".parse().expect("ip");
        assert_eq!(
            source_key(mapped),
            "198.51.100.10".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn id_choice_gives_up_instead_of_looping() {
        let server: SocketAddr = "10.128.0.61:53".parse().expect("addr");
        let mut ids = QueryIds::new(1000);
        assert_eq!(ids.insert(server, &[7, 8], "a"), Ok(7));
        assert_eq!(ids.insert(server, &[7, 8], "b"), Ok(8));
        assert_eq!(ids.insert(server, &[7, 8], "c"), Err(IdRefused::NoFreeId));
        assert_eq!(ids.insert(server, &[], "d"), Err(IdRefused::NoFreeId));
        // The same ID towards another resolver is another entry.
        let other: SocketAddr = "10.128.0.130:53".parse().expect("addr");
        assert_eq!(ids.insert(other, &[7], "e"), Ok(7));
        assert_eq!(ids.get(7, server), Some(&"a"));
        assert_eq!(ids.remove(7, server), Some("a"));
        assert_eq!(ids.remove(7, server), None);
        assert_eq!(ids.insert(server, &[7], "f"), Ok(7));
        assert_eq!(ids.len(), 3);
        assert_eq!(pick_id(&[1, 2, 3], |id| id < 3), Some(3));
    }

    #[test]
    fn each_resolver_has_a_bounded_share_of_ids() {
        let server: SocketAddr = "10.128.0.61:53".parse().expect("addr");
        let other: SocketAddr = "10.128.0.130:53".parse().expect("addr");
        let mut ids = QueryIds::new(2);
        assert!(ids.insert(server, &[1], ()).is_ok());
        assert!(ids.insert(server, &[2], ()).is_ok());
        assert_eq!(ids.insert(server, &[3], ()), Err(IdRefused::ResolverBusy));
        assert!(ids.insert(other, &[3], ()).is_ok(), "others unaffected");
        ids.remove(1, server);
        assert!(ids.insert(server, &[3], ()).is_ok());
    }

    #[test]
    fn a_tally_counts_by_name() {
        let t = Tally::default();
        t.bump("dns_rate");
        t.bump("dns_rate");
        t.bump("frame_too_long");
        let s = t.snapshot();
        assert_eq!(s.get("dns_rate"), Some(&2));
        assert_eq!(s.get("frame_too_long"), Some(&1));
    }
}
