//! The hub's switching decisions, sans IO: which connectors (replicas of a group) are up, which
//! replica a new client session goes to (the least loaded healthy one), the flow id that names
//! the session on that replica's link, and what to undo when either end goes. The driver
//! (`tunnel::hub_server`) moves the bytes; it asks this state machine where they go.
//!
//! The hub never reads a session: a flow is a pair of outer links, nothing more. When a
//! replica's link goes, every flow through it is ended, so its clients dial again at once and
//! land on another replica (their inner QUIC would otherwise wait out its idle timeout).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use super::{LinkId, LinkKind};

/// Client sessions one hub relays at once; a new one beyond it is refused.
pub const MAX_FLOWS: usize = 65_536;
/// Connectors one hub keeps links with.
pub const MAX_CONNECTORS: usize = 1024;
/// Sessions one client identity holds at once: its tunnel's (two for a moment while it
/// moves) and one per `gatewayctl access` stream. An identity that opens more (a stolen key, a
/// runaway script) is refused before it takes the hub's table.
pub const MAX_FLOWS_PER_IDENTITY: usize = 64;

/// A connector's link as the hub knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorInfo {
    pub identity: String,
    pub group: String,
    /// What it says it serves: shown in status, never acted on (the hub routes nothing).
    pub routes: Vec<String>,
    pub kind: LinkKind,
    pub since: Instant,
}

/// A client's session as the hub knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    pub client: LinkId,
    pub identity: String,
    pub connector: LinkId,
    pub kind: LinkKind,
    pub since: Instant,
}

/// What the driver must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// End the client's outer link: its replica went, it will dial again.
    CloseClient { client: LinkId, reason: String },
    /// Tell the connector that `flow` ended, so it forgets its synthetic address.
    FlowClosed { connector: LinkId, flow: u32 },
}

#[derive(Debug)]
struct Conn {
    info: ConnectorInfo,
    flows: usize,
}

/// The hub's tables.
#[derive(Debug, Default)]
pub struct Hub {
    connectors: BTreeMap<LinkId, Conn>,
    flows: HashMap<u32, FlowInfo>,
    by_client: HashMap<LinkId, u32>,
    next_flow: u32,
    /// Round-robin start among equally loaded replicas, so ties do not all go to the first.
    turn: usize,
    events: Vec<HubEvent>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            next_flow: 1,
            ..Hub::default()
        }
    }

    /// A connector's outer link authenticated and said its group. Refused beyond
    /// [`MAX_CONNECTORS`].
    pub fn handle_connector_up(&mut self, link: LinkId, info: ConnectorInfo) -> Result<(), String> {
        if self.connectors.len() >= MAX_CONNECTORS && !self.connectors.contains_key(&link) {
            return Err(format!("the hub holds {MAX_CONNECTORS} connectors already"));
        }
        self.connectors.insert(link, Conn { info, flows: 0 });
        Ok(())
    }

    /// A connector's outer link is gone: every flow through it ends, its clients are closed.
    pub fn handle_connector_down(&mut self, link: LinkId) {
        let Some(c) = self.connectors.remove(&link) else {
            return;
        };
        let gone: Vec<u32> = self
            .flows
            .iter()
            .filter(|(_, f)| f.connector == link)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(f) = self.flows.remove(&id) {
                self.by_client.remove(&f.client);
                self.events.push(HubEvent::CloseClient {
                    client: f.client,
                    reason: format!("connector {} went away", c.info.identity),
                });
            }
        }
    }

    /// A client asks for a connector of `group` (any group when `None`): the least loaded
    /// replica, ties taken in turn. Returns the flow id and the connector's link.
    pub fn handle_client(
        &mut self,
        now: Instant,
        client: LinkId,
        identity: String,
        kind: LinkKind,
        group: Option<&str>,
    ) -> Result<(u32, LinkId), String> {
        if self.by_client.contains_key(&client) {
            return Err("this link has a session already".into());
        }
        if self.flows.len() >= MAX_FLOWS {
            return Err(format!("the hub relays {MAX_FLOWS} sessions already"));
        }
        if self
            .flows
            .values()
            .filter(|f| f.identity == identity)
            .count()
            >= MAX_FLOWS_PER_IDENTITY
        {
            return Err(format!(
                "this identity holds {MAX_FLOWS_PER_IDENTITY} sessions through the hub already"
            ));
        }
        let candidates: Vec<(LinkId, usize)> = self
            .connectors
            .iter()
            .filter(|(_, c)| group.is_none_or(|g| c.info.group == g))
            .map(|(l, c)| (*l, c.flows))
            .collect();
        let Some(least) = candidates.iter().map(|(_, n)| *n).min() else {
            return Err(match group {
                Some(g) => format!("no connector of group {g} is connected to this hub"),
                None => "no connector is connected to this hub".into(),
            });
        };
        let tied: Vec<LinkId> = candidates
            .iter()
            .filter(|(_, n)| *n == least)
            .map(|(l, _)| *l)
            .collect();
        let connector = tied[self.turn % tied.len()];
        self.turn = self.turn.wrapping_add(1);
        let flow = self.new_flow_id();
        if let Some(c) = self.connectors.get_mut(&connector) {
            c.flows += 1;
        }
        self.flows.insert(
            flow,
            FlowInfo {
                client,
                identity,
                connector,
                kind,
                since: now,
            },
        );
        self.by_client.insert(client, flow);
        Ok((flow, connector))
    }

    /// A flow id not in use: never 0, and not one that ended a moment ago where it can be
    /// helped (ids count up and wrap).
    fn new_flow_id(&mut self) -> u32 {
        loop {
            let id = self.next_flow;
            self.next_flow = self.next_flow.wrapping_add(1).max(1);
            if !self.flows.contains_key(&id) {
                return id;
            }
        }
    }

    /// A client's outer link is gone: its flow ends and its connector is told.
    pub fn handle_client_down(&mut self, client: LinkId) {
        let Some(flow) = self.by_client.remove(&client) else {
            return;
        };
        if let Some(f) = self.flows.remove(&flow)
            && let Some(c) = self.connectors.get_mut(&f.connector)
        {
            c.flows = c.flows.saturating_sub(1);
            self.events.push(HubEvent::FlowClosed {
                connector: f.connector,
                flow,
            });
        }
    }

    pub fn poll_event(&mut self) -> Option<HubEvent> {
        if self.events.is_empty() {
            None
        } else {
            Some(self.events.remove(0))
        }
    }

    /// Connectors with the number of sessions each carries.
    pub fn connectors(&self) -> impl Iterator<Item = (LinkId, &ConnectorInfo, usize)> {
        self.connectors.iter().map(|(l, c)| (*l, &c.info, c.flows))
    }

    pub fn flows(&self) -> impl Iterator<Item = (u32, &FlowInfo)> {
        self.flows.iter().map(|(id, f)| (*id, f))
    }

    pub fn connector(&self, link: LinkId) -> Option<&ConnectorInfo> {
        self.connectors.get(&link).map(|c| &c.info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, group: &str, now: Instant) -> ConnectorInfo {
        ConnectorInfo {
            identity: name.into(),
            group: group.into(),
            routes: vec!["10.128.0.0/16".into()],
            kind: LinkKind::Quic,
            since: now,
        }
    }

    fn client(hub: &mut Hub, now: Instant, link: u64, group: Option<&str>) -> (u32, LinkId) {
        hub.handle_client(
            now,
            LinkId(link),
            format!("ops-{link}"),
            LinkKind::Quic,
            group,
        )
        .expect("assigned")
    }

    #[test]
    fn new_sessions_spread_over_the_replicas_of_a_group() {
        let now = Instant::now();
        let mut hub = Hub::new();
        hub.handle_connector_up(LinkId(1), info("gw-a", "vpc", now))
            .expect("up");
        hub.handle_connector_up(LinkId(2), info("gw-b", "vpc", now))
            .expect("up");
        hub.handle_connector_up(LinkId(3), info("other", "lab", now))
            .expect("up");
        let mut on = BTreeMap::new();
        for c in 0..10 {
            let (_, conn) = client(&mut hub, now, 100 + c, Some("vpc"));
            *on.entry(conn).or_insert(0) += 1;
        }
        assert_eq!(on.get(&LinkId(1)), Some(&5));
        assert_eq!(on.get(&LinkId(2)), Some(&5));
        assert_eq!(on.get(&LinkId(3)), None, "another group gets none");
    }

    #[test]
    fn a_group_without_connectors_is_refused_with_why() {
        let now = Instant::now();
        let mut hub = Hub::new();
        let e = hub
            .handle_client(now, LinkId(9), "ops-a".into(), LinkKind::Tcp, Some("vpc"))
            .expect_err("nobody serves vpc");
        assert!(e.contains("no connector of group vpc"), "{e}");
    }

    #[test]
    fn a_replica_that_goes_ends_its_flows_and_new_sessions_go_to_the_other() {
        let now = Instant::now();
        let mut hub = Hub::new();
        hub.handle_connector_up(LinkId(1), info("gw-a", "vpc", now))
            .expect("up");
        hub.handle_connector_up(LinkId(2), info("gw-b", "vpc", now))
            .expect("up");
        let (flow_a, on_a) = client(&mut hub, now, 10, Some("vpc"));
        let (_, on_b) = client(&mut hub, now, 11, Some("vpc"));
        assert_ne!(on_a, on_b);
        hub.handle_connector_down(on_a);
        assert_eq!(
            hub.poll_event(),
            Some(HubEvent::CloseClient {
                client: LinkId(10),
                reason: format!(
                    "connector {} went away",
                    if on_a == LinkId(1) { "gw-a" } else { "gw-b" }
                ),
            })
        );
        assert_eq!(hub.poll_event(), None);
        assert!(hub.flows().all(|(id, _)| id != flow_a));
        // The client dials again on a new link and lands on the survivor.
        let (_, again) = client(&mut hub, now, 12, Some("vpc"));
        assert_eq!(again, on_b);
    }

    #[test]
    fn a_client_that_goes_is_forgotten_and_its_connector_told() {
        let now = Instant::now();
        let mut hub = Hub::new();
        hub.handle_connector_up(LinkId(1), info("gw-a", "vpc", now))
            .expect("up");
        let (flow, _) = client(&mut hub, now, 10, None);
        hub.handle_client_down(LinkId(10));
        assert_eq!(
            hub.poll_event(),
            Some(HubEvent::FlowClosed {
                connector: LinkId(1),
                flow
            })
        );
        assert_eq!(hub.connectors().next().map(|(_, _, n)| n), Some(0));
        // Twice is harmless.
        hub.handle_client_down(LinkId(10));
        assert_eq!(hub.poll_event(), None);
    }

    #[test]
    fn one_link_one_session_and_flow_ids_are_unique_and_never_zero() {
        let now = Instant::now();
        let mut hub = Hub::new();
        hub.handle_connector_up(LinkId(1), info("gw-a", "vpc", now))
            .expect("up");
        hub.next_flow = u32::MAX;
        let (a, _) = client(&mut hub, now, 10, None);
        let (b, _) = client(&mut hub, now, 11, None);
        assert_eq!((a, b), (u32::MAX, 1), "wraps past zero");
        assert!(
            hub.handle_client(now, LinkId(10), "x".into(), LinkKind::Quic, None)
                .is_err()
        );
    }

    #[test]
    fn one_identity_holds_a_bounded_number_of_sessions_and_others_are_not_affected() {
        let now = Instant::now();
        let mut hub = Hub::new();
        hub.handle_connector_up(LinkId(1), info("gw-a", "vpc", now))
            .expect("up");
        let open = |hub: &mut Hub, link: u64, who: &str| {
            hub.handle_client(now, LinkId(link), who.into(), LinkKind::Quic, Some("vpc"))
        };
        for l in 0..MAX_FLOWS_PER_IDENTITY as u64 {
            open(&mut hub, 100 + l, "ops-mallory").expect("within the bound");
        }
        let over = open(&mut hub, 200, "ops-mallory").expect_err("one too many");
        assert_eq!(
            over,
            format!(
                "this identity holds {MAX_FLOWS_PER_IDENTITY} sessions through the hub already"
            )
        );
        open(&mut hub, 201, "ops-alice").expect("another identity is not affected");
        // One ends: room for one more, and no more.
        hub.handle_client_down(LinkId(100));
        open(&mut hub, 202, "ops-mallory").expect("room again");
        assert!(open(&mut hub, 203, "ops-mallory").is_err());
        // A replica that goes takes them all: the bound counts live sessions only.
        hub.handle_connector_down(LinkId(1));
        hub.handle_connector_up(LinkId(2), info("gw-b", "vpc", now))
            .expect("up");
        open(&mut hub, 204, "ops-mallory").expect("nothing left over");
    }
}
