//! What the client does with the connector's answers: the welcome (the tunnel comes up), a
//! refusal, a welcome on the QUIC probe's link (the move back from TCP), route offers.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{CONTROL_KEEPALIVE, Client, ClientEvent, Probe, QUIC_PROBE_EVERY, State, Up};
use crate::config::Transport;
use crate::core::control::Control;
use crate::node::{LinkId, LinkKind, Refusal, secs};

impl Client {
    pub fn handle_control(&mut self, now: Instant, link: LinkId, msg: Control) {
        match &mut self.state {
            State::Hello { link: l, .. } if *l == link => self.answer_to_hello(now, msg),
            State::Up(up) if up.link == link => match msg {
                Control::Keepalive { seq } => up.answered = up.answered.max(seq),
                Control::Routes { routes, zones } => self.offer(routes, zones),
                _ => {}
            },
            State::Up(up) if matches!(up.probe, Probe::Hello { link: l, .. } if l == link) => {
                self.answer_to_probe(now, msg)
            }
            _ => {}
        }
    }

    pub(super) fn answer_to_hello(&mut self, now: Instant, msg: Control) {
        let State::Hello {
            link, info, reason, ..
        } = &self.state
        else {
            return;
        };
        let (link, info, reason) = (*link, info.clone(), reason.clone());
        match msg {
            Control::Welcome { version, .. } if !crate::core::control::compatible(version) => {
                self.close(link, "an incompatible protocol version");
                let ours = crate::core::control::PROTOCOL_VERSION;
                self.fail(
                    now,
                    format!("the connector speaks protocol {version}; this client speaks {ours}"),
                );
            }
            Control::Welcome {
                version,
                software,
                address_v4,
                address_v6,
                prefix_v4,
                prefix_v6,
                routes,
                zones,
                ..
            } => {
                let (Ok(v4), Ok(v6)) = (
                    Ipv4Net::new(address_v4, prefix_v4),
                    Ipv6Net::new(address_v6, prefix_v6),
                ) else {
                    self.close(link, "the welcome's overlay prefix is not valid");
                    return self.fail(now, "the connector sent an invalid overlay prefix".into());
                };
                self.failures = 0;
                let routes = self.accept_routes(routes, info.remote.ip());
                self.zones = zones.clone();
                self.events.push_back(ClientEvent::TunnelUp {
                    v4,
                    v6,
                    routes: routes.clone(),
                    zones,
                });
                self.status_line = match info.kind {
                    LinkKind::Quic => format!("connected to {} over QUIC", info.remote),
                    LinkKind::Tcp => format!("connected to {} over TCP: {reason}", info.remote),
                };
                let probe = match (self.cfg.transport, info.kind) {
                    (Transport::Auto, LinkKind::Tcp) => Probe::Waiting {
                        at: now + QUIC_PROBE_EVERY + self.jitter.upto(QUIC_PROBE_EVERY / 5),
                    },
                    _ => Probe::Off,
                };
                let peer = Self::peer_path(&self.cfg.server_name, link, &info, v4, v6, None);
                self.state = State::Up(Box::new(Up {
                    link,
                    info,
                    first_reason: reason.clone(),
                    reason,
                    version: crate::node::peer_version(version, software.as_deref()),
                    v4,
                    v6,
                    routes,
                    next_keepalive: now + CONTROL_KEEPALIVE,
                    seq: 0,
                    answered: 0,
                    probe,
                    peer: peer.clone(),
                    since: now,
                    rtt: Duration::ZERO,
                }));
                self.publish(Some(peer));
            }
            Control::Refused { reason } => {
                let reason = crate::core::text::clean(&reason, 200);
                self.refusals.push(Refusal {
                    identity: Some(self.cfg.server_name.clone()),
                    remote: info.remote,
                    reason: reason.clone(),
                    at: now,
                });
                self.close(link, "refused");
                self.fail(now, format!("refused by the connector: {reason}"));
            }
            other => {
                self.close(link, "unexpected answer to hello");
                let what = crate::core::text::clean(&format!("{other:?}"), 80);
                self.fail(now, format!("unexpected answer to hello: {what}"));
            }
        }
    }

    /// A welcome on the QUIC probe's link: the tunnel moves there, keeping its addresses.
    pub(super) fn answer_to_probe(&mut self, now: Instant, msg: Control) {
        let State::Up(up) = &mut self.state else {
            return;
        };
        let Probe::Hello { link, info, .. } = &up.probe else {
            return;
        };
        let (link, info) = (*link, info.clone());
        match msg {
            Control::Welcome {
                address_v4,
                address_v6,
                routes,
                zones,
                ..
            } if address_v4 == up.v4.addr() && address_v6 == up.v6.addr() => {
                let old = up.link;
                let peer = Self::peer_path(
                    &self.cfg.server_name,
                    link,
                    &info,
                    up.v4,
                    up.v6,
                    Some(&up.peer.counters),
                );
                up.link = link;
                up.info = info.clone();
                up.reason = String::new();
                up.first_reason = String::new();
                up.probe = Probe::Off;
                up.peer = peer.clone();
                up.next_keepalive = now + CONTROL_KEEPALIVE;
                up.seq = 0;
                up.answered = 0;
                self.status_line = format!("connected to {} over QUIC", info.remote);
                self.events.push_back(ClientEvent::CloseLink {
                    link: old,
                    code: 0,
                    reason: "moved to another transport".into(),
                });
                self.offer(routes, zones);
                self.publish(Some(peer));
            }
            Control::Welcome { .. } => {
                // Other addresses would break open sessions: stay on TCP, try again later.
                self.close(link, "the QUIC session got other overlay addresses");
                self.probe_failed(now, "the connector gave other overlay addresses".into());
            }
            Control::Refused { reason } => {
                self.close(link, "refused");
                let reason = crate::core::text::clean(&reason, 200);
                self.probe_failed(now, format!("refused over QUIC: {reason}"));
            }
            _ => {}
        }
    }

    pub(super) fn probe_failed(&mut self, now: Instant, error: String) {
        let State::Up(up) = &mut self.state else {
            return;
        };
        up.reason = format!(
            "{}; QUIC retried every {}, last: {}",
            up.first_reason,
            secs(QUIC_PROBE_EVERY),
            crate::core::text::clean(&error, 200)
        );
        up.probe = Probe::Waiting {
            at: now + QUIC_PROBE_EVERY + self.jitter.upto(QUIC_PROBE_EVERY / 5),
        };
    }

    /// The routes the connector offers, minus those that would take over the host's own
    /// networks, its default route or the tunnel's own path; those are listed in status.
    pub(super) fn accept_routes(&mut self, routes: Vec<IpNet>, connector: IpAddr) -> Vec<IpNet> {
        let (ok, skipped) = crate::core::advertise::learned(&routes, &self.local_nets, connector);
        self.rejected = skipped.into_iter().map(|s| (s.route, s.why)).collect();
        ok
    }

    pub(super) fn offer(&mut self, routes: Vec<IpNet>, zones: Vec<String>) {
        let State::Up(up) = &self.state else {
            return;
        };
        let routes = self.accept_routes(routes, up.info.remote.ip());
        let State::Up(up) = &mut self.state else {
            return;
        };
        let added: Vec<IpNet> = routes
            .iter()
            .filter(|r| !up.routes.contains(r))
            .copied()
            .collect();
        let removed: Vec<IpNet> = up
            .routes
            .iter()
            .filter(|r| !routes.contains(r))
            .copied()
            .collect();
        if added.is_empty() && removed.is_empty() && zones == self.zones {
            return;
        }
        up.routes = routes.clone();
        self.zones = zones.clone();
        self.events.push_back(ClientEvent::Offer { routes, zones });
        let peer = up.peer.clone();
        self.publish(Some(peer));
    }
}
