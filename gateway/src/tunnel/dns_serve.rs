//! Serving one client's DNS queries on the connector, over whichever transport it is on: on
//! QUIC a DNS channel (one long-lived stream of framed queries and answers, at most one per
//! link at a time) or a stream per query (older clients; their number bounded by the streams
//! QUIC lets a client open), or DnsQuery frames on the TCP fallback. Every query goes to the
//! forwarder's task, which applies the client's rate and its share of queries in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Semaphore, mpsc};

use super::dns::{Forwarder, Reply};
use super::dns_channel;
use super::link::Link;
use super::relay::{CHANNEL_MAGIC, MAX_QUERY, error_response, read_body, read_len, write_framed};
use crate::core::dns::{self, RCODE_SERVFAIL};
use crate::node::drops::{Limit, Limits};

/// Queries a client may have on its DNS channel at once, queued or in flight: what the streams
/// QUIC allows it bounded before channels, so a channel cannot hold more of the forwarder's
/// shared queue than streams could.
pub const CHANNEL_IN_FLIGHT: usize = crate::node::forwarder::MAX_PER_PEER as usize;

/// Serves until the link ends. `peer` names the client for the forwarder's bounds.
pub async fn serve(
    link: &Link,
    tcp_queries: Option<mpsc::Receiver<(u32, Vec<u8>)>>,
    fwd: Arc<Forwarder>,
    peer: u64,
    limits: &Arc<Limits>,
) -> anyhow::Result<()> {
    match (link, tcp_queries) {
        (Link::Quic(conn), _) => {
            let channel_open = Arc::new(AtomicBool::new(false));
            loop {
                let (send, recv) = conn.accept_bi().await?;
                let (fwd, limits) = (fwd.clone(), limits.clone());
                tokio::spawn(serve_stream(
                    send,
                    recv,
                    fwd,
                    peer,
                    limits,
                    channel_open.clone(),
                ));
            }
        }
        (Link::Tcp(t), Some(mut queries)) => {
            while let Some((id, query)) = queries.recv().await {
                fwd.submit(peer, query, Reply::Frame(t.clone(), id));
            }
            Ok(())
        }
        (Link::Tcp(_), None) => std::future::pending().await,
    }
}

/// One stream from the client: a DNS channel if it opens with the magic, else one query.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    fwd: Arc<Forwarder>,
    peer: u64,
    limits: Arc<Limits>,
    channel_open: Arc<AtomicBool>,
) {
    let Ok(len) = read_len(&mut recv).await else {
        limits.count(Limit::DnsStreamUnread);
        return;
    };
    if len == CHANNEL_MAGIC {
        // One channel per link: a second one is refused like an unreadable stream.
        if channel_open.swap(true, Ordering::AcqRel) {
            limits.count(Limit::DnsStreamUnread);
            let _ = send.reset(quinn::VarInt::from_u32(1));
            return;
        }
        let bound = Arc::new(Semaphore::new(CHANNEL_IN_FLIGHT));
        let submit = |id, query, answers: &mpsc::Sender<(u32, Vec<u8>)>| {
            submit_on_channel(&bound, &fwd, peer, &limits, (id, query), answers);
        };
        let _ = dns_channel::serve_channel(recv, send, submit, &limits).await;
        channel_open.store(false, Ordering::Release);
        return;
    }
    let Ok(query) = read_body(&mut recv, len, MAX_QUERY).await else {
        limits.count(Limit::DnsStreamUnread);
        return;
    };
    match fwd.resolve(peer, &query).await {
        Some(answer) => {
            if write_framed(&mut send, &answer).await.is_ok() {
                let _ = send.finish();
            }
        }
        // Over the client's rate: no answer, the stream is reset.
        None => {
            let _ = send.reset(quinn::VarInt::from_u32(1));
        }
    }
}

/// A query from a channel to the forwarder, within the channel's bound; past it, answered
/// SERVFAIL at once as the forwarder answers a query past the client's share in flight.
fn submit_on_channel(
    bound: &Arc<Semaphore>,
    fwd: &Forwarder,
    peer: u64,
    limits: &Limits,
    (id, query): (u32, Vec<u8>),
    answers: &mpsc::Sender<(u32, Vec<u8>)>,
) {
    if let Ok(permit) = bound.clone().try_acquire_owned() {
        fwd.submit(peer, query, Reply::Channel(answers.clone(), id, permit));
        return;
    }
    limits.count(Limit::DnsInFlightPeer);
    if let Ok(q) = dns::parse_query(&query) {
        let servfail = error_response(&query, q.question_end, RCODE_SERVFAIL);
        if answers.try_send((id, servfail)).is_err() {
            limits.count(Limit::DnsAnswerQueueFull);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Zone;
    use crate::core::dns::response_rcode;

    fn query(id: u16) -> Vec<u8> {
        crate::core::dns::test_query(id, "db.hoge-vpc.com")
    }

    #[tokio::test]
    async fn a_channel_holds_at_most_its_share_of_queries_and_servfails_the_rest() {
        // Nothing is sent: the forwarder's task never runs before the test ends.
        let zone = Zone {
            domain: "hoge-vpc.com".into(),
            servers: vec![std::net::Ipv4Addr::LOCALHOST.into()],
            on_servfail: crate::core::resolver::OnServfail::Failover,
        };
        let limits = Arc::new(Limits::default());
        let mut tasks = tokio::task::JoinSet::new();
        let fwd = Forwarder::start(&[zone], None, &mut tasks, limits.clone())
            .await
            .expect("forwarder");
        let bound = Arc::new(Semaphore::new(CHANNEL_IN_FLIGHT));
        let (answers, mut queued) = mpsc::channel(dns_channel::CHANNEL_ANSWERS);
        let over = 10;
        for i in 0..CHANNEL_IN_FLIGHT + over {
            let id = i as u32;
            submit_on_channel(&bound, &fwd, 7, &limits, (id, query(i as u16)), &answers);
        }
        assert_eq!(limits.get(Limit::DnsInFlightPeer), over as u64);
        for i in 0..over {
            let (id, answer) = queued.try_recv().expect("answered at once");
            assert_eq!(id as usize, CHANNEL_IN_FLIGHT + i);
            assert_eq!(response_rcode(&answer), Some(RCODE_SERVFAIL));
            assert_eq!(answer[..2], ((CHANNEL_IN_FLIGHT + i) as u16).to_be_bytes());
        }
        assert_eq!(bound.available_permits(), 0);
        tasks.abort_all();
    }
}
