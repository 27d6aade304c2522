//! Serving one client's DNS queries on the connector, over whichever transport it is on: a
//! stream per query on QUIC (their number bounded by the streams QUIC lets a client open), or
//! DnsQuery frames on the TCP fallback. Every query goes to the forwarder's task, which applies
//! the client's rate and its share of queries in flight.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::dns::{Forwarder, Reply};
use super::link::Link;
use super::relay::{MAX_QUERY, read_framed, write_framed};
use crate::node::drops::{Limit, Limits};

/// Serves until the link ends. `peer` names the client for the forwarder's bounds.
pub async fn serve(
    link: &Link,
    tcp_queries: Option<mpsc::Receiver<(u32, Vec<u8>)>>,
    fwd: Arc<Forwarder>,
    peer: u64,
    limits: &Arc<Limits>,
) -> anyhow::Result<()> {
    match (link, tcp_queries) {
        (Link::Quic(conn), _) => loop {
            let (mut send, mut recv) = conn.accept_bi().await?;
            let (fwd, limits) = (fwd.clone(), limits.clone());
            tokio::spawn(async move {
                let Ok(query) = read_framed(&mut recv, MAX_QUERY).await else {
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
            });
        },
        (Link::Tcp(t), Some(mut queries)) => {
            while let Some((id, query)) = queries.recv().await {
                fwd.submit(peer, query, Reply::Frame(t.clone(), id));
            }
            Ok(())
        }
        (Link::Tcp(_), None) => std::future::pending().await,
    }
}
