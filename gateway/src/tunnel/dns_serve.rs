//! Serving one client's DNS queries on the connector (QUIC streams or TCP-fallback frames):
//! its share of the forwarder, a query rate and queries in flight, decided per query by
//! [`PeerDns::admit`] and counted in the tunnel's `limits`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::dns::{Forwarder, MAX_QUERY, STREAM_TIMEOUT, error_response, read_framed, write_framed};
use crate::core::dns::{self, RCODE_SERVFAIL};
use crate::core::limits::{Tally, TokenBucket};

/// One client's queries being resolved at once: above dnsperf's 100 outstanding queries, a
/// quarter of the forwarder's 1,024 so three flooding clients still leave room for the rest.
pub const PEER_IN_FLIGHT: usize = 256;
/// One client's query rate (per second, and the burst): half of what one Route 53 Resolver
/// endpoint address accepts (10,000/s), far above a workstation or a site's office.
const PEER_RATE: u32 = 5000;

/// One client's share of the forwarder: a query rate and its own queries in flight.
pub struct PeerDns {
    bucket: Mutex<TokenBucket>,
    in_flight: Arc<Semaphore>,
    tally: Arc<Tally>,
}

/// What to do with one query from a client.
pub enum Admit {
    /// Resolve it, holding the permit until answered.
    Go(OwnedSemaphorePermit),
    /// Over the client's rate: dropped without an answer.
    Drop,
    /// Too many of its queries in flight: answered SERVFAIL at once.
    Busy,
}

impl PeerDns {
    pub fn new(tally: Arc<Tally>, now: Instant) -> Arc<PeerDns> {
        Arc::new(PeerDns {
            bucket: Mutex::new(TokenBucket::new(PEER_RATE, PEER_RATE, now)),
            in_flight: Arc::new(Semaphore::new(PEER_IN_FLIGHT)),
            tally,
        })
    }

    /// Decides (and counts) what happens to a query that arrived at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        if !self.bucket.lock().is_ok_and(|mut b| b.take(now)) {
            self.tally.bump("dns_rate");
            return Admit::Drop;
        }
        match self.in_flight.clone().try_acquire_owned() {
            Ok(p) => Admit::Go(p),
            Err(_) => {
                self.tally.bump("dns_in_flight_peer");
                Admit::Busy
            }
        }
    }
}

/// SERVFAIL for `query`, or nothing for bytes that are no query.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = dns::parse_query(query).ok()?;
    Some(error_response(query, q.question_end, RCODE_SERVFAIL))
}

/// Serves a client's DNS streams (every stream after the control stream) until the
/// connection ends. A task per stream: their number is bounded by the streams QUIC lets the
/// client open at once (`engine::transport`).
pub async fn serve_streams(
    conn: quinn::Connection,
    fwd: Arc<Forwarder>,
    peer: Arc<PeerDns>,
) -> anyhow::Result<()> {
    loop {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let (fwd, peer) = (fwd.clone(), peer.clone());
        tokio::spawn(async move {
            let Ok(query) = read_framed(&mut recv, MAX_QUERY).await else {
                peer.tally.bump("dns_stream_unread");
                return;
            };
            let answer = match peer.admit(Instant::now()) {
                Admit::Drop => {
                    let _ = send.reset(quinn::VarInt::from_u32(1));
                    return;
                }
                Admit::Busy => servfail(&query),
                Admit::Go(_permit) => fwd.resolve(&query).await,
            };
            if let Some(answer) = answer {
                let sent = tokio::time::timeout(STREAM_TIMEOUT, write_framed(&mut send, &answer));
                if matches!(sent.await, Ok(Ok(()))) {
                    let _ = send.finish();
                }
            }
        });
    }
}

/// Answers the DNS queries a client sends on its TCP link: a task per admitted query, so at
/// most [`PEER_IN_FLIGHT`] at once; SERVFAIL beyond that, nothing beyond the rate.
pub async fn serve_frames(
    link: Arc<super::link::TcpLink>,
    mut queries: mpsc::Receiver<(u32, Vec<u8>)>,
    fwd: Arc<Forwarder>,
    peer: Arc<PeerDns>,
) {
    while let Some((id, query)) = queries.recv().await {
        match peer.admit(Instant::now()) {
            Admit::Drop => {}
            Admit::Busy => {
                if let Some(answer) = servfail(&query)
                    && link.try_answer_dns(id, &answer).is_err()
                {
                    peer.tally.bump("dns_answer_queue_full");
                }
            }
            Admit::Go(permit) => {
                let (link, fwd) = (link.clone(), fwd.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(answer) = fwd.resolve(&query).await {
                        let _ = link.answer_dns(id, &answer).await;
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_in_flight_share_then_servfail_then_nothing_past_its_rate() {
        let tally = Arc::new(Tally::default());
        let t0 = Instant::now();
        let peer = PeerDns::new(tally.clone(), t0);
        let (mut go, mut busy, mut dropped) = (Vec::new(), 0, 0);
        for _ in 0..PEER_RATE + 100 {
            match peer.admit(t0) {
                Admit::Go(p) => go.push(p),
                Admit::Busy => busy += 1,
                Admit::Drop => dropped += 1,
            }
        }
        assert_eq!(go.len(), PEER_IN_FLIGHT);
        assert_eq!(busy, PEER_RATE as usize - PEER_IN_FLIGHT);
        assert_eq!(dropped, 100);
        let counts = tally.snapshot();
        assert_eq!(counts.get("dns_rate"), Some(&100));
        // Answered queries give their place back; time gives the rate back.
        go.clear();
        let later = t0 + std::time::Duration::from_millis(10);
        assert!(matches!(peer.admit(later), Admit::Go(_)));
    }
}
