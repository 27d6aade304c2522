//! The UDP rate search: the highest offered rate whose datagrams arrive with at most 1 % lost,
//! found with a bounded number of iperf3 probes (doubling up from a start rate, or halving down,
//! until one probe passes and one fails, then geometric bisection between them).

/// Loss above this share of the datagrams fails a probe.
pub const MAX_LOSS_PERCENT: f64 = 1.0;

/// A probe that passed but received less than this share of what was offered says the sender
/// (iperf3 itself) is the limit: offering more cannot find a higher rate.
const SENDER_BOUND: f64 = 0.9;

#[derive(Debug, Clone)]
pub struct RateSearch {
    start: f64,
    floor: f64,
    ceiling: f64,
    /// Stop when the failing rate is within this factor of the passing one (e.g. 1.1).
    precision: f64,
    max_probes: usize,
    probes: usize,
    /// The highest offered rate that passed, and the lowest that failed.
    pass: Option<f64>,
    fail: Option<f64>,
    /// The most received by a passing probe, in bit/s.
    best: Option<f64>,
    done: bool,
}

impl RateSearch {
    /// Rates in bit/s. The search never offers below `floor` or above `ceiling`, and never runs
    /// more than `max_probes` probes.
    pub fn new(start: f64, floor: f64, ceiling: f64, precision: f64, max_probes: usize) -> Self {
        Self {
            start: start.clamp(floor, ceiling),
            floor,
            ceiling,
            precision: precision.max(1.01),
            max_probes,
            probes: 0,
            pass: None,
            fail: None,
            best: None,
            done: false,
        }
    }

    /// The next rate to offer, or `None` when the search is over.
    pub fn next_rate(&self) -> Option<f64> {
        if self.done || self.probes >= self.max_probes {
            return None;
        }
        match (self.pass, self.fail) {
            (None, None) => Some(self.start),
            (Some(p), None) => (p < self.ceiling).then(|| (p * 2.0).min(self.ceiling)),
            (None, Some(f)) => (f > self.floor).then(|| (f / 2.0).max(self.floor)),
            (Some(p), Some(f)) => (f / p > self.precision).then(|| (p * f).sqrt()),
        }
    }

    /// What a probe at `offered` achieved: the received rate and the loss in percent.
    pub fn record(&mut self, offered: f64, received: f64, lost_percent: f64) {
        self.probes += 1;
        if lost_percent <= MAX_LOSS_PERCENT {
            self.pass = Some(self.pass.map_or(offered, |p| p.max(offered)));
            self.best = Some(self.best.map_or(received, |b| b.max(received)));
            if received < SENDER_BOUND * offered {
                self.done = true;
            }
        } else {
            self.fail = Some(self.fail.map_or(offered, |f| f.min(offered)));
        }
    }

    /// The highest received rate with at most 1 % loss, in bit/s; `None` if no probe passed.
    pub fn result(&self) -> Option<f64> {
        self.best
    }

    pub fn probes(&self) -> usize {
        self.probes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: f64 = 1e6;

    /// Runs a search against a path that carries up to `capacity` bit/s without loss and loses
    /// what exceeds it; returns the offered rates in order and the result.
    fn run(mut s: RateSearch, capacity: f64, sender_max: f64) -> (Vec<f64>, Option<f64>) {
        let mut offered = Vec::new();
        while let Some(rate) = s.next_rate() {
            offered.push(rate);
            let sent = rate.min(sender_max);
            let received = sent.min(capacity);
            let lost = 100.0 * (sent - received) / sent;
            s.record(rate, received, lost);
        }
        (offered, s.result())
    }

    #[test]
    fn doubles_until_loss_then_bisects_geometrically() {
        let s = RateSearch::new(100.0 * M, 10.0 * M, 10_000.0 * M, 1.1, 12);
        let (offered, best) = run(s, 450.0 * M, f64::INFINITY);
        assert_eq!(&offered[..4], &[100.0 * M, 200.0 * M, 400.0 * M, 800.0 * M]);
        // Between 400 (pass) and 800 (fail): sqrt(400*800) ≈ 565.7 fails, then ≈ 475.7 fails,
        // then ≈ 436.2 passes: 475.7/436.2 < 1.1, done.
        let rounded: Vec<u64> = offered[4..]
            .iter()
            .map(|r| (r / M).round() as u64)
            .collect();
        assert_eq!(rounded, vec![566, 476, 436]);
        let best = best.expect("a passing probe");
        assert!((best / M - 436.2).abs() < 0.1, "{best}");
    }

    #[test]
    fn halves_down_when_the_start_rate_already_loses() {
        let s = RateSearch::new(100.0 * M, 10.0 * M, 10_000.0 * M, 1.1, 12);
        let (offered, best) = run(s, 30.0 * M, f64::INFINITY);
        assert_eq!(&offered[..3], &[100.0 * M, 50.0 * M, 25.0 * M]);
        let best = best.expect("25 Mbit/s passes");
        assert!((25.0 * M..=30.0 * M).contains(&best), "{best}");
    }

    #[test]
    fn never_offers_below_the_floor_and_reports_none_when_nothing_passes() {
        let s = RateSearch::new(100.0 * M, 10.0 * M, 10_000.0 * M, 1.1, 12);
        let (offered, best) = run(s, 1.0 * M, f64::INFINITY);
        assert_eq!(
            offered,
            vec![100.0 * M, 50.0 * M, 25.0 * M, 12.5 * M, 10.0 * M]
        );
        assert_eq!(best, None);
    }

    #[test]
    fn stops_at_the_probe_limit() {
        let s = RateSearch::new(1.0 * M, 1.0 * M, 1e15, 1.1, 5);
        let (offered, best) = run(s, f64::INFINITY, f64::INFINITY);
        assert_eq!(offered.len(), 5);
        assert_eq!(best, Some(16.0 * M));
    }

    #[test]
    fn stops_at_the_ceiling() {
        let s = RateSearch::new(100.0 * M, 10.0 * M, 300.0 * M, 1.1, 12);
        let (offered, best) = run(s, f64::INFINITY, f64::INFINITY);
        assert_eq!(offered, vec![100.0 * M, 200.0 * M, 300.0 * M]);
        assert_eq!(best, Some(300.0 * M));
    }

    #[test]
    fn stops_when_the_sender_cannot_offer_more() {
        let s = RateSearch::new(100.0 * M, 10.0 * M, 10_000.0 * M, 1.1, 12);
        let (offered, best) = run(s, f64::INFINITY, 350.0 * M);
        assert_eq!(offered, vec![100.0 * M, 200.0 * M, 400.0 * M]);
        assert_eq!(best, Some(350.0 * M));
    }
}
