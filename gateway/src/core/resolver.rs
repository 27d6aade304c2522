//! Which of a zone's resolvers to ask, and what to do with each outcome: the failover rules of
//! issue 4 as a state machine. Time comes in as `now`; sockets live elsewhere.
//!
//! - Resolvers are asked in configured order, skipping those marked down while any is up.
//! - A timeout or an unreachable resolver marks it down and moves to the next; a down
//!   resolver is re-probed in the background ([`Resolvers::due_probes`]) so later queries do
//!   not wait for its timeout.
//! - SERVFAIL and REFUSED move to the next resolver by default, as stub resolvers do; with
//!   `on_servfail = "return"` (managed client VPN semantics) SERVFAIL is the answer. REFUSED
//!   always moves on: it says "not me", not "the name is broken".
//! - NXDOMAIN and every other answer are final.

use std::time::{Duration, Instant};

use super::dns::{RCODE_REFUSED, RCODE_SERVFAIL};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnServfail {
    /// Ask the next resolver (stub-resolver semantics; the default).
    Failover,
    /// SERVFAIL is the answer (managed-client-VPN semantics).
    Return,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Round trip of the latest answer.
    pub latency: Option<Duration>,
    /// When a down resolver is next probed.
    next_probe: Option<Instant>,
}

/// What to do next for one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send (again) to resolver `index`.
    Ask(usize),
    /// Relay the answer just received.
    Deliver,
    /// Every resolver was tried and none answered: reply SERVFAIL.
    GiveUp,
}

/// One query's progress through the resolvers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub current: usize,
    pub sent_at: Instant,
    tried: u64,
}

impl Attempt {
    /// A re-probe of resolver `index` alone.
    pub fn probe(index: usize, now: Instant) -> Attempt {
        Attempt {
            current: index,
            sent_at: now,
            tried: 1 << index.min(63),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Resolvers {
    health: Vec<Health>,
    on_servfail: OnServfail,
    probe_every: Duration,
}

impl Resolvers {
    /// `count` resolvers (at most 64), all presumed up.
    pub fn new(count: usize, on_servfail: OnServfail, probe_every: Duration) -> Resolvers {
        Resolvers {
            health: vec![
                Health {
                    up: true,
                    latency: None,
                    next_probe: None,
                };
                count.min(64)
            ],
            on_servfail,
            probe_every,
        }
    }

    pub fn health(&self) -> &[Health] {
        &self.health
    }

    /// Starts a query: the first resolver that is up, or the first of all if none is.
    pub fn start(&self, now: Instant) -> Option<Attempt> {
        let first = self.next_untried(0)?;
        Some(Attempt {
            current: first,
            sent_at: now,
            tried: 1 << first,
        })
    }

    /// The answer to `attempt` arrived with `rcode`.
    pub fn on_answer(&mut self, attempt: &mut Attempt, rcode: u8, now: Instant) -> Step {
        if let Some(h) = self.health.get_mut(attempt.current) {
            h.up = true;
            h.next_probe = None;
            h.latency = Some(now.saturating_duration_since(attempt.sent_at));
        }
        let move_on = rcode == RCODE_REFUSED
            || (rcode == RCODE_SERVFAIL && self.on_servfail == OnServfail::Failover);
        if !move_on {
            return Step::Deliver;
        }
        match self.next_untried(attempt.tried) {
            Some(next) => self.ask(attempt, next, now),
            // Nobody left to ask: the last answer is the best there is.
            None => Step::Deliver,
        }
    }

    /// `attempt`'s resolver did not answer in time, or is unreachable.
    pub fn on_timeout(&mut self, attempt: &mut Attempt, now: Instant) -> Step {
        if let Some(h) = self.health.get_mut(attempt.current) {
            h.up = false;
            h.next_probe.get_or_insert(now + self.probe_every);
        }
        match self.next_untried(attempt.tried) {
            Some(next) => self.ask(attempt, next, now),
            None => Step::GiveUp,
        }
    }

    /// Down resolvers whose re-probe is due; each is scheduled for its next probe.
    pub fn due_probes(&mut self, now: Instant) -> Vec<usize> {
        let every = self.probe_every;
        self.health
            .iter_mut()
            .enumerate()
            .filter(|(_, h)| !h.up && h.next_probe.is_some_and(|t| t <= now))
            .map(|(i, h)| {
                h.next_probe = Some(now + every);
                i
            })
            .collect()
    }

    /// A probe of resolver `index` got an answer (any answer: it is reachable).
    pub fn on_probe_answer(&mut self, index: usize, latency: Duration) {
        if let Some(h) = self.health.get_mut(index) {
            h.up = true;
            h.next_probe = None;
            h.latency = Some(latency);
        }
    }

    fn ask(&self, attempt: &mut Attempt, next: usize, now: Instant) -> Step {
        attempt.current = next;
        attempt.sent_at = now;
        attempt.tried |= 1 << next;
        Step::Ask(next)
    }

    /// The first resolver not in `tried`: an up one if any, else a down one.
    fn next_untried(&self, tried: u64) -> Option<usize> {
        let untried = |i: &usize| tried & (1 << i) == 0;
        let up = (0..self.health.len())
            .filter(untried)
            .find(|i| self.health[*i].up);
        up.or_else(|| (0..self.health.len()).find(untried))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::dns::RCODE_NXDOMAIN;

    const PROBE: Duration = Duration::from_secs(5);

    #[test]
    fn asks_in_order_and_delivers_a_good_answer() {
        let t0 = Instant::now();
        let mut r = Resolvers::new(2, OnServfail::Failover, PROBE);
        let mut a = r.start(t0).expect("a resolver");
        assert_eq!(a.current, 0);
        let step = r.on_answer(&mut a, 0, t0 + Duration::from_millis(3));
        assert_eq!(step, Step::Deliver);
        assert_eq!(r.health()[0].latency, Some(Duration::from_millis(3)));
    }

    #[test]
    fn servfail_moves_on_by_default_and_is_final_with_return() {
        let t0 = Instant::now();
        let mut r = Resolvers::new(2, OnServfail::Failover, PROBE);
        let mut a = r.start(t0).expect("start");
        assert_eq!(r.on_answer(&mut a, RCODE_SERVFAIL, t0), Step::Ask(1));
        assert_eq!(
            r.on_answer(&mut a, RCODE_SERVFAIL, t0),
            Step::Deliver,
            "nobody left"
        );

        let mut r = Resolvers::new(2, OnServfail::Return, PROBE);
        let mut a = r.start(t0).expect("start");
        assert_eq!(r.on_answer(&mut a, RCODE_SERVFAIL, t0), Step::Deliver);
        // REFUSED says "not me": it moves on even then.
        let mut a = r.start(t0).expect("start");
        assert_eq!(r.on_answer(&mut a, RCODE_REFUSED, t0), Step::Ask(1));
    }

    #[test]
    fn nxdomain_is_final() {
        let t0 = Instant::now();
        let mut r = Resolvers::new(2, OnServfail::Failover, PROBE);
        let mut a = r.start(t0).expect("start");
        assert_eq!(r.on_answer(&mut a, RCODE_NXDOMAIN, t0), Step::Deliver);
    }

    #[test]
    fn a_timed_out_resolver_is_skipped_until_a_probe_finds_it_again() {
        let t0 = Instant::now();
        let mut r = Resolvers::new(2, OnServfail::Failover, PROBE);
        let mut a = r.start(t0).expect("start");
        assert_eq!(
            r.on_timeout(&mut a, t0 + Duration::from_secs(1)),
            Step::Ask(1)
        );
        assert_eq!(
            r.on_answer(&mut a, 0, t0 + Duration::from_secs(1)),
            Step::Deliver
        );
        assert!(!r.health()[0].up);

        // Later queries go straight to the secondary: no waiting for the primary's timeout.
        let a = r.start(t0 + Duration::from_secs(2)).expect("start");
        assert_eq!(a.current, 1);

        assert!(
            r.due_probes(t0 + Duration::from_secs(3)).is_empty(),
            "not due yet"
        );
        assert_eq!(r.due_probes(t0 + Duration::from_secs(6)), vec![0]);
        assert!(
            r.due_probes(t0 + Duration::from_secs(7)).is_empty(),
            "rescheduled"
        );
        r.on_probe_answer(0, Duration::from_millis(2));
        assert_eq!(
            r.start(t0 + Duration::from_secs(8)).expect("start").current,
            0
        );
    }

    #[test]
    fn all_down_still_tries_each_once_then_gives_up() {
        let t0 = Instant::now();
        let mut r = Resolvers::new(2, OnServfail::Failover, PROBE);
        let mut a = r.start(t0).expect("start");
        assert_eq!(r.on_timeout(&mut a, t0), Step::Ask(1));
        assert_eq!(r.on_timeout(&mut a, t0), Step::GiveUp);
        let mut a = r.start(t0).expect("all down: try the first anyway");
        assert_eq!(a.current, 0);
        assert_eq!(r.on_timeout(&mut a, t0), Step::Ask(1));
        assert!(
            Resolvers::new(0, OnServfail::Failover, PROBE)
                .start(t0)
                .is_none()
        );
    }
}
