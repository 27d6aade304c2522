//! Who may reach what: `[[policy]] identity = "ops-*"`, `allow = ["10.128.0.0/16 tcp/22"]`.
//!
//! Default deny. The connector decides on packets from a client towards the VPC; replies
//! coming back are not policed here (they answer what was allowed), and the connector's forward
//! filter lets back only replies (connection tracking). A non-first fragment has no ports, so it
//! passes only a rule that allows every port of its protocol.
//!
//! `inbound = ["10.128.0.0/16 tcp/9100"]` is the other way round: VPC sources in the CIDR may
//! open those connections to the identity's own addresses. The forward filter admits them; the
//! client's answers are recognised here by their shape ([`Decision::AllowReply`]) and the
//! filter's connection tracking drops any that answer no real connection.

use std::net::IpAddr;

use ipnet::IpNet;

use super::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketMeta};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    /// ICMP for IPv4 destinations, ICMPv6 for IPv6 ones.
    Icmp,
}

/// One `allow` entry: `CIDR [proto[/port[-port]]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub net: IpNet,
    pub proto: Proto,
    /// Inclusive port range; `None` is every port.
    pub ports: Option<(u16, u16)>,
}

impl Rule {
    pub fn parse(s: &str) -> Result<Rule, String> {
        let mut words = s.split_whitespace();
        let cidr = words
            .next()
            .ok_or_else(|| "empty rule; expected \"CIDR [proto[/port[-port]]]\"".to_string())?;
        let net = super::cidr::parse_cidr(cidr)?;
        let (proto, ports) = match words.next() {
            None => (Proto::Any, None),
            Some(spec) => {
                let (name, range) = match spec.split_once('/') {
                    Some((n, r)) => (n, Some(r)),
                    None => (spec, None),
                };
                let proto = match name.to_ascii_lowercase().as_str() {
                    "any" => Proto::Any,
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    "icmp" | "icmpv6" => Proto::Icmp,
                    other => {
                        return Err(format!(
                            "unknown protocol {other:?} in {s:?}; use tcp, udp, icmp or any"
                        ));
                    }
                };
                let ports = match range {
                    None => None,
                    Some(_) if !matches!(proto, Proto::Tcp | Proto::Udp) => {
                        return Err(format!("{s:?}: only tcp and udp take ports"));
                    }
                    Some(r) => Some(parse_ports(r).map_err(|e| format!("{s:?}: {e}"))?),
                };
                (proto, ports)
            }
        };
        if let Some(extra) = words.next() {
            return Err(format!(
                "{s:?}: unexpected {extra:?}; one protocol per rule"
            ));
        }
        Ok(Rule { net, proto, ports })
    }

    /// Whether `m` (from a client) could answer a connection this rule, as an `inbound` rule,
    /// lets a source in `net` open: to `net`, from one of the ports, or an echo reply or ICMP
    /// error. Only a shape: connection tracking decides whether such a connection exists.
    fn answers(&self, m: &PacketMeta) -> bool {
        if !self.net.contains(&m.dst) {
            return false;
        }
        let icmp = match m.dst {
            IpAddr::V4(_) => PROTO_ICMP,
            IpAddr::V6(_) => PROTO_ICMPV6,
        };
        if m.proto == icmp {
            // Echo reply, destination unreachable, time exceeded, parameter problem (ICMP),
            // and for ICMPv6 also packet too big: what a host sends back, never an opener.
            let answer_types: &[u16] = if icmp == PROTO_ICMP {
                &[0, 3, 11, 12]
            } else {
                &[129, 1, 2, 3, 4]
            };
            let echo_reply = matches!(m.dst_port, Some(0) | Some(129));
            return match m.dst_port {
                Some(t) if answer_types.contains(&t) => {
                    !echo_reply || matches!(self.proto, Proto::Icmp | Proto::Any)
                }
                _ => false,
            };
        }
        let proto_ok = match self.proto {
            Proto::Any => true,
            Proto::Tcp => m.proto == PROTO_TCP,
            Proto::Udp => m.proto == PROTO_UDP,
            Proto::Icmp => false,
        };
        if !proto_ok {
            return false;
        }
        match (self.ports, m.src_port) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((lo, hi)), Some(p)) => (lo..=hi).contains(&p),
        }
    }

    fn matches(&self, m: &PacketMeta) -> bool {
        if !self.net.contains(&m.dst) {
            return false;
        }
        let proto_ok = match self.proto {
            Proto::Any => true,
            Proto::Tcp => m.proto == PROTO_TCP,
            Proto::Udp => m.proto == PROTO_UDP,
            Proto::Icmp => match m.dst {
                IpAddr::V4(_) => m.proto == PROTO_ICMP,
                IpAddr::V6(_) => m.proto == PROTO_ICMPV6,
            },
        };
        if !proto_ok {
            return false;
        }
        match (self.ports, m.dst_port) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((lo, hi)), Some(p)) => (lo..=hi).contains(&p),
        }
    }
}

fn parse_ports(r: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (lo, hi) = match r.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(r)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("port range {lo}-{hi} is backwards"));
    }
    Ok((lo, hi))
}

/// `*` matches any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub identity: String,
    pub rules: Vec<Rule>,
    /// Connections VPC sources may open to this identity's addresses (`inbound`).
    pub inbound: Vec<Rule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Not allowed as a new flow, but shaped like an answer to a connection an `inbound` rule
    /// lets the VPC open. Passed on: the forward filter's connection tracking drops it unless
    /// such a connection exists. Never enough to open anything (an access stream, say).
    AllowReply,
    /// No entry names this identity at all.
    DenyUnknownIdentity,
    /// The identity has rules, none of which allows this packet.
    DenyNoRule,
}

impl Policy {
    /// From entries whose rules the config parsed when it was validated: nothing here can
    /// fail, and no rule string is read again while the tunnel runs.
    pub fn from_entries(entries: Vec<Entry>) -> Policy {
        Policy { entries }
    }

    /// Every `allow` and every `inbound` rule that applies to `identity`, for the forward
    /// filter, which checks new connections again in the kernel.
    pub fn rules_for(&self, identity: &str) -> (Vec<Rule>, Vec<Rule>) {
        let (mut allow, mut inbound) = (Vec::new(), Vec::new());
        for e in self
            .entries
            .iter()
            .filter(|e| glob_match(&e.identity, identity))
        {
            allow.extend(e.rules.iter().copied());
            inbound.extend(e.inbound.iter().copied());
        }
        (allow, inbound)
    }

    /// Whether any entry applies to `identity`: a client no entry names is refused at once.
    pub fn knows(&self, identity: &str) -> bool {
        self.entries
            .iter()
            .any(|e| glob_match(&e.identity, identity))
    }

    pub fn decide(&self, identity: &str, m: &PacketMeta) -> Decision {
        let mut known = false;
        for e in self
            .entries
            .iter()
            .filter(|e| glob_match(&e.identity, identity))
        {
            known = true;
            if e.rules.iter().any(|r| r.matches(m)) {
                return Decision::Allow;
            }
        }
        let answers = self
            .entries
            .iter()
            .filter(|e| glob_match(&e.identity, identity))
            .any(|e| e.inbound.iter().any(|r| r.answers(m)));
        if answers {
            Decision::AllowReply
        } else if known {
            Decision::DenyNoRule
        } else {
            Decision::DenyUnknownIdentity
        }
    }
}

/// Every rule that applies to one identity, gathered once when its session starts and again on
/// reload, so a packet's decision matches no glob and allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRules {
    allow: Vec<Rule>,
    inbound: Vec<Rule>,
}

impl IdentityRules {
    /// [`Policy::decide`] for this identity; never `DenyUnknownIdentity` (it is known).
    pub fn decide(&self, m: &PacketMeta) -> Decision {
        if self.allow.iter().any(|r| r.matches(m)) {
            Decision::Allow
        } else if self.inbound.iter().any(|r| r.answers(m)) {
            Decision::AllowReply
        } else {
            Decision::DenyNoRule
        }
    }
}

impl Policy {
    /// The rules of every entry naming `identity`; `None` when no entry does.
    pub fn resolve(&self, identity: &str) -> Option<IdentityRules> {
        let mut known = false;
        let mut rules = IdentityRules::default();
        for e in self
            .entries
            .iter()
            .filter(|e| glob_match(&e.identity, identity))
        {
            known = true;
            rules.allow.extend_from_slice(&e.rules);
            rules.inbound.extend_from_slice(&e.inbound);
        }
        known.then_some(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::packet::{self, tests as p};

    /// A policy from `(identity, allow, inbound)` as a config would write it.
    fn parsed(entries: &[(&str, &[&str], &[&str])]) -> Policy {
        let rules = |v: &[&str]| v.iter().map(|r| Rule::parse(r).expect(r)).collect();
        Policy::from_entries(
            entries
                .iter()
                .map(|(identity, allow, inbound)| Entry {
                    identity: identity.to_string(),
                    rules: rules(allow),
                    inbound: rules(inbound),
                })
                .collect(),
        )
    }

    fn policy() -> Policy {
        parsed(&[
            (
                "ops-*",
                &[
                    "10.128.0.0/16 tcp/22",
                    "10.128.0.0/16 icmp",
                    "10.128.0.0/16 udp/53",
                    "10.128.1.7/32 tcp/8000-8100",
                    "fd00:128::/64",
                ],
                &[],
            ),
            ("auditor", &["10.128.0.61/32 udp/53"], &[]),
        ])
    }

    fn tcp(dst: [u8; 4], port: u16) -> PacketMeta {
        packet::parse(&p::v4(PROTO_TCP, [100, 64, 0, 2], dst, &p::tcp_to(port))).expect("valid")
    }

    #[test]
    fn allows_what_a_rule_names_and_nothing_else() {
        let pol = policy();
        assert_eq!(
            pol.decide("ops-alice", &tcp([10, 128, 0, 10], 22)),
            Decision::Allow
        );
        assert_eq!(
            pol.decide("ops-alice", &tcp([10, 128, 0, 10], 23)),
            Decision::DenyNoRule
        );
        assert_eq!(
            pol.decide("ops-alice", &tcp([10, 129, 0, 10], 22)),
            Decision::DenyNoRule
        );
        assert_eq!(
            pol.decide("ops-alice", &tcp([10, 128, 1, 7], 8050)),
            Decision::Allow
        );
        assert_eq!(
            pol.decide("ops-alice", &tcp([10, 128, 1, 7], 8101)),
            Decision::DenyNoRule
        );
        assert_eq!(
            pol.decide("auditor", &tcp([10, 128, 0, 10], 22)),
            Decision::DenyNoRule
        );
        assert_eq!(
            pol.decide("mallory", &tcp([10, 128, 0, 10], 22)),
            Decision::DenyUnknownIdentity
        );
        assert!(pol.knows("ops-bob") && pol.knows("auditor") && !pol.knows("auditors"));
    }

    #[test]
    fn icmp_means_icmpv6_for_ipv6_and_no_proto_means_any() {
        let pol = policy();
        let echo = packet::parse(&p::v4(
            PROTO_ICMP,
            [100, 64, 0, 2],
            [10, 128, 0, 10],
            &[8, 0, 0, 0],
        ))
        .expect("valid");
        assert_eq!(pol.decide("ops-a", &echo), Decision::Allow);
        let v6 = packet::parse(&p::v6(
            PROTO_UDP,
            "fd00:64::2".parse().expect("ip"),
            "fd00:128::10".parse().expect("ip"),
            &[0, 1, 0, 9, 0, 8, 0, 0],
        ))
        .expect("valid");
        assert_eq!(pol.decide("ops-a", &v6), Decision::Allow);
    }

    /// A client's packet from `sport` to `dst`:`dport`.
    fn tcp_from(sport: u16, dst: [u8; 4], dport: u16) -> PacketMeta {
        let mut l4 = p::tcp_to(dport);
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        packet::parse(&p::v4(PROTO_TCP, [100, 64, 0, 2], dst, &l4)).expect("valid")
    }

    fn icmp_to(dst: [u8; 4], icmp_type: u8) -> PacketMeta {
        packet::parse(&p::v4(
            PROTO_ICMP,
            [100, 64, 0, 2],
            dst,
            &[icmp_type, 0, 0, 0],
        ))
        .expect("valid")
    }

    fn inbound_policy() -> Policy {
        parsed(&[
            (
                "ops-*",
                &["10.128.0.0/16 tcp/22"],
                &["10.128.0.0/24 tcp/9100", "10.128.0.0/24 icmp"],
            ),
            ("auditor", &["10.128.0.61/32 udp/53"], &[]),
        ])
    }

    #[test]
    fn inbound_rules_let_answers_through_only_as_replies() {
        let pol = inbound_policy();
        // The node exporter answering a scrape from 10.128.0.5:51000.
        assert_eq!(
            pol.decide("ops-alice", &tcp_from(9100, [10, 128, 0, 5], 51000)),
            Decision::AllowReply
        );
        // Outside the rule's CIDR, from another port, or for an identity without the rule.
        for (identity, m) in [
            ("ops-alice", tcp_from(9100, [10, 128, 1, 5], 51000)),
            ("ops-alice", tcp_from(9101, [10, 128, 0, 5], 51000)),
            ("auditor", tcp_from(9100, [10, 128, 0, 5], 51000)),
        ] {
            assert_eq!(pol.decide(identity, &m), Decision::DenyNoRule, "{m:?}");
        }
        // An allow rule still wins: a new connection is not a reply.
        assert_eq!(
            pol.decide("ops-alice", &tcp_from(9100, [10, 128, 0, 5], 22)),
            Decision::Allow
        );
        // `icmp` inbound: echo replies and errors answer, an echo request does not.
        assert_eq!(
            pol.decide("ops-alice", &icmp_to([10, 128, 0, 5], 0)),
            Decision::AllowReply
        );
        assert_eq!(
            pol.decide("ops-alice", &icmp_to([10, 128, 0, 5], 3)),
            Decision::AllowReply
        );
        assert_eq!(
            pol.decide("ops-alice", &icmp_to([10, 128, 0, 5], 8)),
            Decision::DenyNoRule
        );
    }

    #[test]
    fn an_echo_reply_answers_only_an_icmp_or_any_inbound_rule() {
        let pol = parsed(&[("a", &[], &["10.128.0.0/16 tcp/9100"])]);
        assert_eq!(
            pol.decide("a", &icmp_to([10, 128, 0, 5], 0)),
            Decision::DenyNoRule
        );
        // An ICMP error about a TCP connection it accepted is an answer all the same.
        assert_eq!(
            pol.decide("a", &icmp_to([10, 128, 0, 5], 3)),
            Decision::AllowReply
        );
    }

    #[test]
    fn rules_for_collects_every_matching_entry() {
        let pol = inbound_policy();
        let (allow, inbound) = pol.rules_for("ops-alice");
        assert_eq!((allow.len(), inbound.len()), (1, 2));
        let (allow, inbound) = pol.rules_for("auditor");
        assert_eq!((allow.len(), inbound.len()), (1, 0));
        assert_eq!(pol.rules_for("mallory"), (vec![], vec![]));
    }

    #[test]
    fn later_fragments_pass_only_rules_without_ports() {
        let pol = parsed(&[("a", &["10.0.0.0/8 tcp/22"], &[])]);
        let mut pk = p::v4(PROTO_TCP, [1, 1, 1, 1], [10, 0, 0, 1], &[0u8; 8]);
        pk[6..8].copy_from_slice(&10u16.to_be_bytes());
        let m = packet::parse(&pk).expect("valid");
        assert_eq!(pol.decide("a", &m), Decision::DenyNoRule);
        let pol = parsed(&[("a", &["10.0.0.0/8 tcp"], &[])]);
        assert_eq!(pol.decide("a", &m), Decision::Allow);
    }

    #[test]
    fn grammar_errors_say_what_is_wrong() {
        for (bad, says) in [
            ("", "empty rule"),
            ("10.0.0.0/33 tcp", "is not a CIDR"),
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0/8 sctp", "unknown protocol"),
            ("10.0.0.0/8 icmp/8", "only tcp and udp take ports"),
            ("10.0.0.0/8 tcp/0", "not a port"),
            ("10.0.0.0/8 tcp/90-80", "backwards"),
            ("10.0.0.0/8 tcp/22 udp/53", "one protocol per rule"),
        ] {
            let err = Rule::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        assert_eq!(
            Rule::parse("10.128.0.0/16 TCP/22").expect("ok").ports,
            Some((22, 22))
        );
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("ops-*", "ops-alice"));
        assert!(glob_match("ops-*", "ops-"));
        assert!(!glob_match("ops-*", "xops-alice"));
        assert!(glob_match("*-site-?", "tokyo-site-1"));
        assert!(!glob_match("*-site-?", "tokyo-site-12"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a", "ab"));
    }
}
