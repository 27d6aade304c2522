//! The client's session: which connector and transport to dial, the hello, the welcome's
//! addresses and routes, keepalives, reconnecting with backoff and jitter, and — while on the
//! TCP fallback — probing QUIC and moving back to it with the same overlay addresses.
//!
//! ```text
//!  Backoff ─▶ Dialing(QUIC) ─timeout/fail, auto─▶ Dialing(TCP) ─fail─▶ Backoff (next target)
//!                 └─link up─▶ Hello ─welcome─▶ Up ─keepalives missed/link down─▶ Backoff
//!                                 └─refused/timeout─▶ Backoff     │ on TCP, auto: probe QUIC
//!                                                                 └─welcome on QUIC─▶ Up(QUIC)
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::datapath::{Datapath, PeerPath};
use super::dial;
use super::drops::Drops;
use super::{HANDSHAKE_TIMEOUT, Jitter, LinkId, LinkInfo, LinkKind, Refusals, Transmit, secs};
use crate::config::Transport;
use crate::core::control::{Control, PROTOCOL_VERSION};

mod answers;
mod view;

/// Control keepalives prove the connector's engine (not only its QUIC stack) answers.
pub const CONTROL_KEEPALIVE: Duration = Duration::from_secs(2);
/// This many unanswered in a row and the client reconnects.
pub const KEEPALIVES_MISSED: u64 = 3;
/// A client on the TCP fallback tries QUIC again this often (plus up to a fifth as jitter).
pub const QUIC_PROBE_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(4);

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of each connector, tried in turn.
    pub targets: Vec<String>,
    /// The name the connector's certificate must carry; also the peer's name in status.
    pub server_name: String,
    pub transport: Transport,
    pub quic_timeout: Duration,
    /// Prefixes behind this client (its LANs), offered to the connector.
    pub advertise: Vec<IpNet>,
}

/// Effects the driver carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Open a link to `target` (resolve it, TLS handshake); answer with `handle_link_up` or
    /// `handle_dial_failed` naming `attempt`. `timeout` bounds the whole attempt.
    Dial {
        attempt: u64,
        target: String,
        kind: LinkKind,
        timeout: Duration,
    },
    /// The node stopped waiting for this attempt: close its link if it still comes up.
    CancelDial {
        attempt: u64,
    },
    CloseLink {
        link: LinkId,
        code: u32,
        reason: String,
    },
    /// The tunnel is up: give the TUN these addresses and route these prefixes into it
    /// (without replacing routes that exist), load the zones into the DNS steering.
    TunnelUp {
        v4: Ipv4Net,
        v6: Ipv6Net,
        routes: Vec<IpNet>,
        zones: Vec<String>,
    },
    /// The connector changed what it offers (its reload), on the same connection: all its
    /// routes and zones now.
    Offer {
        routes: Vec<IpNet>,
        zones: Vec<String>,
    },
    TunnelDown,
}

#[derive(Debug)]
enum Probe {
    Off,
    Waiting {
        at: Instant,
    },
    Dialing {
        attempt: u64,
        deadline: Instant,
    },
    Hello {
        link: LinkId,
        info: LinkInfo,
        deadline: Instant,
    },
}

#[derive(Debug)]
struct Up {
    link: LinkId,
    info: LinkInfo,
    /// Why this transport: empty on QUIC.
    reason: String,
    /// The first reason, kept while probe failures are appended to `reason`.
    first_reason: String,
    /// The connector's release and protocol.
    version: String,
    v4: Ipv4Net,
    v6: Ipv6Net,
    routes: Vec<IpNet>,
    next_keepalive: Instant,
    seq: u64,
    answered: u64,
    probe: Probe,
    peer: Arc<PeerPath>,
    since: Instant,
    rtt: Duration,
}

#[derive(Debug)]
enum State {
    Backoff {
        until: Instant,
    },
    Dialing {
        attempt: u64,
        /// Which step of the dial plan.
        step: usize,
        deadline: Instant,
        /// The errors of the steps before.
        errors: Vec<String>,
    },
    Hello {
        link: LinkId,
        info: LinkInfo,
        deadline: Instant,
        reason: String,
    },
    Up(Box<Up>),
}

pub struct Client {
    cfg: ClientConfig,
    state: State,
    /// Which target the current or next attempt is for.
    target: usize,
    failures: u32,
    next_attempt: u64,
    jitter: Jitter,
    /// The host's own connected subnets and default routes' prefixes, from the driver: a route
    /// the connector offers that overlaps one is refused.
    local_nets: Vec<IpNet>,
    status_line: String,
    refusals: Refusals,
    /// Offered routes this client would not install, with why.
    rejected: Vec<(IpNet, String)>,
    out: VecDeque<Transmit>,
    events: VecDeque<ClientEvent>,
    drops: Arc<Drops>,
    datapath: Arc<Datapath>,
    zones: Vec<String>,
    version: u64,
}

impl Client {
    /// A client that dials its first target at `now`. `seed` spreads the jitter of a fleet.
    pub fn new(cfg: ClientConfig, drops: Arc<Drops>, now: Instant, seed: u64) -> Client {
        let mut c = Client {
            cfg,
            state: State::Backoff { until: now },
            target: 0,
            failures: 0,
            next_attempt: 1,
            jitter: Jitter::new(seed),
            local_nets: Vec::new(),
            status_line: "connecting".into(),
            refusals: Refusals::default(),
            rejected: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            datapath: Arc::new(Datapath::new(drops.clone())),
            drops,
            zones: Vec::new(),
            version: 0,
        };
        c.publish(None);
        c
    }

    pub fn set_local_nets(&mut self, nets: Vec<IpNet>) {
        self.local_nets = nets;
    }

    fn target_name(&self) -> String {
        self.cfg
            .targets
            .get(self.target)
            .cloned()
            .unwrap_or_default()
    }

    /// Dials step `step` of the plan for the current target.
    fn dial(&mut self, now: Instant, step: usize, errors: Vec<String>) {
        let plan = dial::plan(self.cfg.transport, self.cfg.quic_timeout);
        let Some(s) = plan.get(step).copied() else {
            let reason = dial::failure(self.cfg.transport, &errors);
            return self.fail(now, reason);
        };
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        self.events.push_back(ClientEvent::Dial {
            attempt,
            target: self.target_name(),
            kind: s.kind,
            timeout: s.timeout,
        });
        self.state = State::Dialing {
            attempt,
            step,
            deadline: now + s.timeout,
            errors,
        };
    }

    pub fn handle_dial_failed(&mut self, now: Instant, attempt: u64, error: String) {
        let error = crate::core::text::clean(&error, 200);
        if let State::Up(up) = &mut self.state {
            if let Probe::Dialing { attempt: a, .. } = up.probe
                && a == attempt
            {
                self.probe_failed(now, error);
            }
            return;
        }
        let State::Dialing {
            attempt: a,
            step,
            errors,
            ..
        } = &self.state
        else {
            return;
        };
        if *a != attempt {
            return;
        }
        let (step, mut errors) = (*step, errors.clone());
        errors.push(error);
        self.dial(now, step + 1, errors);
    }

    /// The session attempt failed or ended: backoff with jitter, then the next target.
    fn fail(&mut self, now: Instant, reason: String) {
        if matches!(self.state, State::Up(_)) {
            self.events.push_back(ClientEvent::TunnelDown);
        }
        self.status_line = format!("reconnecting: {reason}");
        self.failures = self.failures.saturating_add(1);
        let base = BACKOFF_FIRST
            .saturating_mul(1u32 << self.failures.min(4))
            .min(BACKOFF_MAX);
        let wait = base + self.jitter.upto(base / 2);
        self.state = State::Backoff { until: now + wait };
        if !self.cfg.targets.is_empty() {
            self.target = (self.target + 1) % self.cfg.targets.len();
        }
        self.publish(None);
    }

    pub fn handle_link_up(&mut self, now: Instant, attempt: u64, link: LinkId, info: LinkInfo) {
        let name = self.cfg.server_name.clone();
        let hello = |reason: &str, advertise: &[IpNet]| Control::Hello {
            version: PROTOCOL_VERSION,
            node: name.clone(),
            software: crate::core::control::software(),
            advertise: advertise.to_vec(),
            transport_reason: (!reason.is_empty()).then(|| reason.to_string()),
        };
        match &mut self.state {
            State::Dialing {
                attempt: a, errors, ..
            } if *a == attempt => {
                let reason = dial::reason(self.cfg.transport, errors);
                self.out.push_back(Transmit {
                    link,
                    msg: hello(&reason, &self.cfg.advertise),
                });
                self.state = State::Hello {
                    link,
                    info,
                    deadline: now + HANDSHAKE_TIMEOUT,
                    reason,
                };
            }
            State::Up(up) if matches!(up.probe, Probe::Dialing { attempt: a, .. } if a == attempt) =>
            {
                self.out.push_back(Transmit {
                    link,
                    msg: hello("", &self.cfg.advertise),
                });
                up.probe = Probe::Hello {
                    link,
                    info,
                    deadline: now + HANDSHAKE_TIMEOUT,
                };
            }
            _ => self.events.push_back(ClientEvent::CloseLink {
                link,
                code: 0,
                reason: "not needed any more".into(),
            }),
        }
    }

    pub fn handle_link_down(&mut self, now: Instant, link: LinkId, reason: String) {
        match &mut self.state {
            State::Hello { link: l, .. } if *l == link => self.fail(now, reason),
            State::Up(up) if up.link == link => self.fail(now, reason),
            State::Up(up) if matches!(up.probe, Probe::Hello { link: l, .. } if l == link) => {
                self.probe_failed(now, reason)
            }
            _ => {}
        }
    }

    /// QUIC MTU discovery or the RTT of `link` moved.
    pub fn handle_path(&mut self, link: LinkId, max_packet: Option<usize>, rtt: Duration) {
        if let State::Up(up) = &mut self.state
            && up.link == link
        {
            up.rtt = rtt;
            up.info.max_packet = max_packet;
            up.peer
                .max_packet
                .store(max_packet.unwrap_or(0), Ordering::Relaxed);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Backoff { until } if now >= *until => self.dial(now, 0, Vec::new()),
            State::Dialing {
                attempt,
                step,
                deadline,
                errors,
            } if now >= *deadline => {
                let (attempt, step, mut errors) = (*attempt, *step, errors.clone());
                self.events.push_back(ClientEvent::CancelDial { attempt });
                let plan = dial::plan(self.cfg.transport, self.cfg.quic_timeout);
                if let Some(s) = plan.get(step) {
                    errors.push(dial::timed_out(*s));
                }
                self.dial(now, step + 1, errors);
            }
            State::Hello { link, deadline, .. } if now >= *deadline => {
                let link = *link;
                self.close(link, "no answer to hello");
                self.fail(now, "no answer to hello".into());
            }
            State::Up(up) => {
                if now >= up.next_keepalive {
                    if up.seq >= up.answered + KEEPALIVES_MISSED {
                        let reason = format!(
                            "the connector answered no control keepalive since #{}",
                            up.answered
                        );
                        let link = up.link;
                        self.close(link, "keepalives unanswered");
                        return self.fail(now, reason);
                    }
                    up.seq += 1;
                    up.next_keepalive = now + CONTROL_KEEPALIVE;
                    self.out.push_back(Transmit {
                        link: up.link,
                        msg: Control::Keepalive { seq: up.seq },
                    });
                }
                match up.probe {
                    Probe::Waiting { at } if now >= at => {
                        let attempt = self.next_attempt;
                        self.next_attempt += 1;
                        let timeout = self.cfg.quic_timeout;
                        up.probe = Probe::Dialing {
                            attempt,
                            deadline: now + timeout,
                        };
                        self.events.push_back(ClientEvent::Dial {
                            attempt,
                            target: self
                                .cfg
                                .targets
                                .get(self.target)
                                .cloned()
                                .unwrap_or_default(),
                            kind: LinkKind::Quic,
                            timeout,
                        });
                    }
                    Probe::Dialing { attempt, deadline } if now >= deadline => {
                        self.events.push_back(ClientEvent::CancelDial { attempt });
                        let e = format!("no QUIC handshake in {}", secs(self.cfg.quic_timeout));
                        self.probe_failed(now, e);
                    }
                    Probe::Hello { link, deadline, .. } if now >= deadline => {
                        self.close(link, "no answer to hello");
                        self.probe_failed(now, "no answer to hello over QUIC".into());
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Backoff { until } => Some(*until),
            State::Dialing { deadline, .. } | State::Hello { deadline, .. } => Some(*deadline),
            State::Up(up) => {
                let probe = match up.probe {
                    Probe::Off => None,
                    Probe::Waiting { at } => Some(at),
                    Probe::Dialing { deadline, .. } | Probe::Hello { deadline, .. } => {
                        Some(deadline)
                    }
                };
                Some(probe.map_or(up.next_keepalive, |p| p.min(up.next_keepalive)))
            }
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }
}
