//! A connector's reload: the new offer pushed to live sessions on their links, their rules
//! resolved again, and sessions the new policy no longer admits closed with why; and closing a
//! session for a reason decided outside the node (a revoked certificate).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Connector, ConnectorConfig};
use crate::core::advertise;
use crate::core::control::Control;
use crate::node::datapath::PeerPath;
use crate::node::{LinkId, Transmit};

impl Connector {
    /// A new config: live sessions keep their links and get the new offer; a session the new
    /// policy no longer admits (its identity, or a prefix it advertises) is closed with why.
    pub fn reload(&mut self, now: Instant, cfg: ConnectorConfig) {
        let offer_changed = cfg.routes != self.cfg.routes || cfg.zones != self.cfg.zones;
        self.cfg = cfg;
        let live: Vec<LinkId> = self.current.values().copied().collect();
        for link in live {
            let Some(s) = self.sessions.get(&link) else {
                continue;
            };
            let identity = s.info.identity.clone();
            if !self.cfg.policy.knows(&identity) {
                let reason = format!("no [[policy]] entry matches identity {identity:?} any more");
                self.refuse(now, link, reason);
                continue;
            }
            if let Err(r) =
                advertise::still_granted(&identity, &s.prefixes, &self.cfg.grants, &self.cfg.routes)
            {
                self.refuse(now, link, format!("after reload: {r}"));
                continue;
            }
            if let Some(s) = self.sessions.get_mut(&link)
                && let Some(old) = &s.peer
            {
                s.peer = Some(Arc::new(PeerPath {
                    link,
                    sink: old.sink.clone(),
                    identity: old.identity.clone(),
                    far_end: old.far_end,
                    sources: old.sources.clone(),
                    rules: self.cfg.policy.resolve(&identity),
                    max_packet: old.max_packet.load(Ordering::Relaxed).into(),
                    counters: old.counters.clone(),
                }));
            }
            if offer_changed {
                self.out.push_back(Transmit {
                    link,
                    msg: Control::Routes {
                        routes: self.cfg.routes.clone(),
                        zones: self.cfg.zones.clone(),
                    },
                });
            }
        }
        self.publish();
    }

    /// Closes a live session for a reason decided outside the node (a revoked certificate).
    pub fn close_link(&mut self, now: Instant, link: LinkId, reason: String) {
        self.refuse(now, link, reason);
    }
}
