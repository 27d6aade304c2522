//! The hub's switch: each open flow's two ends, and the way to each — relayed packets on the
//! hub's own socket (tunnel/raw.rs) when that end asked for them over QUIC, its outer link
//! otherwise (TLS over TCP, or a peer that did not ask). Every relayed packet is checked against
//! its flow's token and its sender's address before it goes anywhere; nothing is opened.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock, Weak};

use bytes::Bytes;

use super::hub_wire::{Counter, FLOW_ID, OuterTx};
use super::net::canonical;
use super::raw::{self, DemuxSocket, Divert, RawFlow};
use crate::node::drops::{Drop, Drops};

/// One end of a flow: its outer link, and whether it takes relayed packets on that link's
/// QUIC 5-tuple.
#[derive(Clone)]
pub struct End {
    pub tx: OuterTx,
    pub raw: bool,
}

impl End {
    /// The address relayed packets go to and must come from, as the socket spells it.
    fn raw_addr(&self) -> Option<SocketAddr> {
        if self.raw {
            self.tx.quic_remote()
        } else {
            None
        }
    }
}

struct Flow {
    token: u64,
    client: End,
    connector: End,
    bytes: Counter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toward {
    Client,
    Connector,
}

/// Which way a relayed packet from `from` goes: it must carry its flow's token and come from
/// one of the flow's relayed ends (their addresses as they are now: QUIC follows a NAT's
/// rebinding, and so does this).
fn decide(
    token: u64,
    client: Option<SocketAddr>,
    connector: Option<SocketAddr>,
    from: SocketAddr,
    got: u64,
) -> Result<Toward, Drop> {
    if got != token {
        return Err(Drop::RelayBadToken);
    }
    let from = canonical(from);
    if client.map(canonical) == Some(from) {
        Ok(Toward::Connector)
    } else if connector.map(canonical) == Some(from) {
        Ok(Toward::Client)
    } else {
        Err(Drop::RelayWrongSource)
    }
}

/// Where a flow's packets go and the counter of its bytes, or why nowhere.
type Way = Result<(Out, Counter), Drop>;

/// Where one packet goes.
enum Out {
    Socket(SocketAddr),
    Link(OuterTx, Option<[u8; FLOW_ID]>),
}

pub struct Switch {
    flows: RwLock<HashMap<u32, Flow>>,
    socket: OnceLock<Weak<DemuxSocket>>,
    drops: Arc<Drops>,
}

impl Switch {
    pub fn new(drops: Arc<Drops>) -> Arc<Switch> {
        Arc::new(Switch {
            flows: RwLock::new(HashMap::new()),
            socket: OnceLock::new(),
            drops,
        })
    }

    /// The hub's UDP socket: relayed packets arrive on it and leave by it.
    pub fn attach(self: &Arc<Self>, socket: &Arc<DemuxSocket>) {
        let _ = self.socket.set(Arc::downgrade(socket));
        let me: Weak<dyn Divert> = Arc::downgrade(self) as Weak<Switch>;
        socket.set_divert(me);
    }

    /// Whether relayed packets can be offered at all (the hub listens on QUIC).
    pub fn relays(&self) -> bool {
        self.socket.get().is_some()
    }

    pub fn open(&self, f: RawFlow, client: End, connector: End, bytes: Counter) {
        if let Ok(mut flows) = self.flows.write() {
            flows.insert(
                f.flow,
                Flow {
                    token: f.token,
                    client,
                    connector,
                    bytes,
                },
            );
        }
    }

    pub fn close(&self, flow: u32) {
        if let Ok(mut flows) = self.flows.write() {
            flows.remove(&flow);
        }
    }

    fn out(flow: u32, to: &End, toward: Toward) -> Out {
        match to.raw_addr() {
            Some(a) => Out::Socket(a),
            None => Out::Link(
                to.tx.clone(),
                (toward == Toward::Connector).then_some(flow.to_be_bytes()),
            ),
        }
    }

    /// An inner packet of `flow` that arrived over an outer link, sent on `toward` its other
    /// end.
    fn forward(&self, flow: u32, toward: Toward, inner: Bytes) -> bool {
        let (out, token, bytes) = {
            let Ok(flows) = self.flows.read() else {
                return false;
            };
            let Some(f) = flows.get(&flow) else {
                return false;
            };
            let to = if toward == Toward::Client {
                &f.client
            } else {
                &f.connector
            };
            (Self::out(flow, to, toward), f.token, f.bytes.clone())
        };
        let len = inner.len() as u64;
        let sent = match out {
            Out::Socket(a) => {
                let socket = self.socket.get().and_then(Weak::upgrade);
                let mut d = RawFlow { flow, token }.header().to_vec();
                d.extend_from_slice(&inner);
                socket.is_some_and(|s| s.send(a, &d, d.len()))
            }
            Out::Link(tx, Some(prefix)) => tx.send_datagram(&prefix, &inner),
            Out::Link(tx, None) => tx.send_bytes(inner),
        };
        if sent {
            bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            self.drops.count(Drop::SendFailed);
        }
        sent
    }

    /// A client's packet from its outer link.
    pub fn to_connector(&self, flow: u32, inner: Bytes) -> bool {
        self.forward(flow, Toward::Connector, inner)
    }

    /// A connector's packet from its outer link, its flow id taken off.
    pub fn to_client(&self, flow: u32, inner: Bytes) -> bool {
        self.forward(flow, Toward::Client, inner)
    }

    /// Where a relayed segment goes, and its flow's byte counter; the drop when it goes
    /// nowhere.
    fn route(&self, flows: &HashMap<u32, Flow>, from: SocketAddr, seg: &[u8]) -> Way {
        let (rf, _) = raw::parse(seg).ok_or(Drop::RelayMalformed)?;
        let f = flows.get(&rf.flow).ok_or(Drop::RelayUnknownFlow)?;
        let toward = decide(
            f.token,
            f.client.raw_addr(),
            f.connector.raw_addr(),
            from,
            rf.token,
        )?;
        let out = match toward {
            Toward::Client => Self::out(rf.flow, &f.client, toward),
            Toward::Connector => Self::out(rf.flow, &f.connector, toward),
        };
        Ok((out, f.bytes.clone()))
    }
}

impl Divert for Switch {
    /// Forwards a run of relayed segments as they are; consecutive ones to one address leave
    /// in one send (GSO), as they came in.
    fn divert(&self, socket: &DemuxSocket, from: SocketAddr, stride: usize, run: &[u8]) {
        let Ok(flows) = self.flows.read() else {
            return;
        };
        let stride = stride.max(1);
        let mut batch: Option<(SocketAddr, usize, usize)> = None;
        let flush = |b: &mut Option<(SocketAddr, usize, usize)>| {
            if let Some((to, start, end)) = b.take()
                && !socket.send(to, &run[start..end], stride)
            {
                self.drops.count(Drop::SendFailed);
            }
        };
        // A run comes from one sender, and its segments mostly belong to one flow: the way for
        // a flow and token is worked out once (a lookup and three connection addresses), not
        // once per segment.
        let mut last: Option<(&[u8], Way)> = None;
        let mut at = 0;
        while at < run.len() {
            let end = (at + stride).min(run.len());
            let seg = &run[at..end];
            let verdict = if seg.len() <= raw::HEADER {
                Err(Drop::RelayMalformed)
            } else {
                let key = &seg[..raw::HEADER];
                if last.as_ref().is_none_or(|(k, _)| *k != key) {
                    last = Some((key, self.route(&flows, from, seg)));
                }
                match &last {
                    Some((_, Ok((out, bytes)))) => {
                        bytes.fetch_add((seg.len() - raw::HEADER) as u64, Ordering::Relaxed);
                        Ok(out)
                    }
                    Some((_, Err(d))) => Err(*d),
                    None => Err(Drop::RelayMalformed),
                }
            };
            match verdict {
                Ok(Out::Socket(to)) => {
                    let to = *to;
                    match &mut batch {
                        Some((t, _, e)) if *t == to && *e == at => *e = end,
                        _ => {
                            flush(&mut batch);
                            batch = Some((to, at, end));
                        }
                    }
                }
                Ok(Out::Link(tx, prefix)) => {
                    flush(&mut batch);
                    let inner = &seg[raw::HEADER..];
                    if !tx.send_datagram(prefix.as_ref().map_or(&[][..], |p| &p[..]), inner) {
                        self.drops.count(Drop::SendFailed);
                    }
                }
                Err(d) => {
                    flush(&mut batch);
                    self.drops.count(d);
                }
            }
            at = end;
        }
        flush(&mut batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// A relayed packet goes to the other end of its flow only with the flow's token and from
    /// one of its ends' addresses (a v4-mapped spelling is the same address); anything else is
    /// dropped with its reason.
    #[test]
    fn only_the_token_and_an_ends_address_open_the_way() {
        let (c, k) = (Some(a("198.51.100.7:7844")), Some(a("203.0.113.9:7844")));
        assert_eq!(
            decide(9, c, k, a("198.51.100.7:7844"), 9),
            Ok(Toward::Connector)
        );
        assert_eq!(
            decide(9, c, k, a("[::ffff:203.0.113.9]:7844"), 9),
            Ok(Toward::Client)
        );
        assert_eq!(
            decide(9, c, k, a("198.51.100.7:7844"), 8),
            Err(Drop::RelayBadToken)
        );
        assert_eq!(
            decide(9, c, k, a("198.51.100.7:7845"), 9),
            Err(Drop::RelayWrongSource),
            "another port of the same host is not the end"
        );
        assert_eq!(
            decide(9, None, k, a("198.51.100.7:7844"), 9),
            Err(Drop::RelayWrongSource),
            "an end on TLS over TCP sends nothing relayed"
        );
    }

    #[test]
    fn a_segment_of_no_open_flow_or_a_bad_header_goes_nowhere() {
        let s = Switch::new(Arc::new(Drops::default()));
        let flows = HashMap::new();
        let mut d = RawFlow { flow: 3, token: 1 }.header().to_vec();
        d.push(0);
        assert!(matches!(
            s.route(&flows, a("192.0.2.1:1"), &d),
            Err(Drop::RelayUnknownFlow)
        ));
        assert!(matches!(
            s.route(&flows, a("192.0.2.1:1"), &d[..raw::HEADER]),
            Err(Drop::RelayMalformed)
        ));
    }
}
