//! The forward filter: what a node that turns IP forwarding on lets the kernel forward, so that
//! neither end of the tunnel becomes an open router.
//!
//! Rules are plain values here (built and tested without a kernel) and written by `nat` into
//! the daemon's own nftables table, atomically with the rest of it. On a connector:
//!
//! - TUN → egress: replies, and new connections only as `[[policy]] allow` grants the sending
//!   client (the engine checked every packet already; the kernel checks each new connection
//!   again, which is what makes an answer to an `inbound` connection safe to pass).
//! - egress → TUN: replies, and new connections only as `[[policy]] inbound` grants.
//! - everything else forwarded through the connector is dropped and counted.
//!
//! On a site gateway (a client with `[client] lan`): LAN → TUN and TUN → LAN only. The eBPF
//! classifier redirects LAN traffic into the TUN before netfilter sees it, so connection
//! tracking never learns those flows and cannot tell replies coming back; the connector's filter
//! is what keeps VPC hosts from opening connections into the LAN. Anything else into or out of
//! the TUN is dropped and counted, and when gatewayd itself turned forwarding on, so is every
//! other forwarded packet of that family (the host was not a router before).

use std::fmt;

use ipnet::IpNet;

use crate::core::packet::{
    PROTO_ICMP as ICMP, PROTO_ICMPV6 as ICMPV6, PROTO_TCP as TCP, PROTO_UDP as UDP,
};
use crate::core::policy::{Proto, Rule};

pub const FORWARD: &str = "forward";
/// Connector: new connections from clients, accepted as their identity's `allow` grants.
pub const TUNNEL_OUT: &str = "tunnel_out";
/// Connector: new connections from the VPC to clients, accepted as `inbound` grants.
pub const TUNNEL_IN: &str = "tunnel_in";

/// Comments of the counted rules: the names status shows. Never renamed.
pub mod counter {
    /// Forwarded to the VPC from anywhere but the tunnel (the underlay routing a VPC prefix
    /// to the connector's public address, say).
    pub const INTO_VPC: &str = "into_vpc";
    /// Into the tunnel: a new connection no `inbound` rule allows (a VPC host connecting to a
    /// client), or anything from elsewhere than the LAN on a site gateway.
    pub const INTO_TUNNEL: &str = "into_tunnel";
    /// Out of the tunnel: a new connection no `allow` rule grants, or not a valid packet
    /// (connector); to elsewhere than the LAN (site gateway).
    pub const FROM_TUNNEL: &str = "from_tunnel";
    /// Anything else forwarded.
    pub const OTHER: &str = "other";
    /// Connections opened from the VPC to a client as an `inbound` rule allows (accepted).
    pub const INBOUND: &str = "inbound";
    pub const DROPS: [&str; 4] = [INTO_VPC, INTO_TUNNEL, FROM_TUNNEL, OTHER];
}

/// Rules a chain holds at most: peers × owned prefixes × rules stays far below this in any
/// sane deployment; past it the rest is left out (fail closed) and the log says so.
pub const MAX_SESSION_RULES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct {
    /// `ct state established,related`
    Replies,
    /// `ct state new`
    New,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Iif(String),
    Oif(String),
    Ct(Ct),
    Family(Family),
    Saddr(IpNet),
    Daddr(IpNet),
    /// `meta l4proto`
    L4(u8),
    /// TCP or UDP destination port range (after an `L4` of either).
    Dport(u8, u16, u16),
    /// `fib saddr . iif oif exists`: the source is routed back through the interface the
    /// packet came in on (a reverse-path check, so a LAN's source cannot be spoofed from
    /// elsewhere).
    RoutedBack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Jump(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub matches: Vec<Match>,
    pub counter: bool,
    pub verdict: Verdict,
    /// A counted rule's name ([`counter`]), shown by `nft list` as its comment.
    pub comment: Option<&'static str>,
}

impl RuleSpec {
    fn new(matches: Vec<Match>, verdict: Verdict) -> Self {
        RuleSpec {
            matches,
            counter: false,
            verdict,
            comment: None,
        }
    }

    fn counted(matches: Vec<Match>, verdict: Verdict, name: &'static str) -> Self {
        RuleSpec {
            matches,
            counter: true,
            verdict,
            comment: Some(name),
        }
    }
}

/// The connector's base chain, hooked at forward. `tun` is the daemon's TUN, `egress` the
/// VPC-facing interface.
pub fn connector_forward(tun: &str, egress: &str) -> Vec<RuleSpec> {
    use Match::{Ct as C, Iif, Oif};
    let (t, e) = (tun.to_string(), egress.to_string());
    let out = || vec![Iif(t.clone()), Oif(e.clone())];
    let back = || vec![Iif(e.clone()), Oif(t.clone())];
    let with = |mut v: Vec<Match>, m: Match| {
        v.push(m);
        v
    };
    vec![
        RuleSpec::new(with(out(), C(Ct::Replies)), Verdict::Accept),
        RuleSpec::new(with(back(), C(Ct::Replies)), Verdict::Accept),
        RuleSpec::new(with(out(), C(Ct::New)), Verdict::Jump(TUNNEL_OUT)),
        RuleSpec::new(with(back(), C(Ct::New)), Verdict::Jump(TUNNEL_IN)),
        RuleSpec::counted(out(), Verdict::Drop, counter::FROM_TUNNEL),
        RuleSpec::counted(vec![Oif(t.clone())], Verdict::Drop, counter::INTO_TUNNEL),
        RuleSpec::counted(vec![Oif(e.clone())], Verdict::Drop, counter::INTO_VPC),
        RuleSpec::counted(vec![], Verdict::Drop, counter::OTHER),
    ]
}

/// One connected client as the filter sees it: the prefixes it owns (its overlay addresses and
/// advertised LANs) and its identity's `allow` and `inbound` rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub owns: Vec<IpNet>,
    pub allow: Vec<Rule>,
    pub inbound: Vec<Rule>,
}

/// The connector's two session chains, rebuilt whole when a session starts or ends or the
/// policy is reloaded: ([`TUNNEL_OUT`], [`TUNNEL_IN`]), each at most [`MAX_SESSION_RULES`]
/// long; `true` when something had to be left out.
pub fn session_chains(sessions: &[Session]) -> (Vec<RuleSpec>, Vec<RuleSpec>, bool) {
    let (mut out, mut inbound) = (Vec::new(), Vec::new());
    let mut truncated = false;
    for s in sessions {
        for own in &s.owns {
            for r in &s.allow {
                if let Some(m) = rule_matches(Match::Saddr(*own), r) {
                    truncated |= !push_bounded(&mut out, RuleSpec::new(m, Verdict::Accept));
                }
            }
            for r in &s.inbound {
                if let Some(m) = rule_matches(Match::Daddr(*own), r) {
                    let spec = RuleSpec::counted(m, Verdict::Accept, counter::INBOUND);
                    truncated |= !push_bounded(&mut inbound, spec);
                }
            }
        }
    }
    (out, inbound, truncated)
}

fn push_bounded(chain: &mut Vec<RuleSpec>, rule: RuleSpec) -> bool {
    if chain.len() >= MAX_SESSION_RULES {
        return false;
    }
    chain.push(rule);
    true
}

/// `own` (the client's side) plus a policy rule's CIDR on the other side, protocol and
/// destination ports; `None` when the two are of different address families.
fn rule_matches(own: Match, r: &Rule) -> Option<Vec<Match>> {
    let own_net = match &own {
        Match::Saddr(n) | Match::Daddr(n) => *n,
        _ => return None,
    };
    let family = Family::of(&own_net);
    if family != Family::of(&r.net) {
        return None;
    }
    let far = match own {
        Match::Saddr(_) => Match::Daddr(r.net),
        _ => Match::Saddr(r.net),
    };
    let mut m = vec![Match::Family(family), own, far];
    let l4 = match (r.proto, family) {
        (Proto::Any, _) => None,
        (Proto::Tcp, _) => Some(TCP),
        (Proto::Udp, _) => Some(UDP),
        (Proto::Icmp, Family::V4) => Some(ICMP),
        (Proto::Icmp, Family::V6) => Some(ICMPV6),
    };
    if let Some(p) = l4 {
        m.push(Match::L4(p));
        if let Some((lo, hi)) = r.ports {
            m.push(Match::Dport(p, lo, hi));
        }
    }
    Some(m)
}

/// A site gateway's base chain: between the TUN and the `lans` (interfaces) or the
/// `advertised` prefixes (a LAN the kernel routes, where no eBPF steering runs), arriving where
/// their route points. `police_v4`/`police_v6`: gatewayd turned that family's forwarding on,
/// so nothing but the tunnel's traffic may be forwarded.
pub fn client_forward(
    tun: &str,
    lans: &[String],
    advertised: &[IpNet],
    police_v4: bool,
    police_v6: bool,
) -> Vec<RuleSpec> {
    use Match::{Iif, Oif};
    let mut rules = Vec::new();
    for lan in lans {
        rules.push(RuleSpec::new(
            vec![Iif(tun.into()), Oif(lan.clone())],
            Verdict::Accept,
        ));
        rules.push(RuleSpec::new(
            vec![Iif(lan.clone()), Oif(tun.into())],
            Verdict::Accept,
        ));
    }
    for net in advertised {
        let family = Match::Family(Family::of(net));
        rules.push(RuleSpec::new(
            vec![Iif(tun.into()), family.clone(), Match::Daddr(*net)],
            Verdict::Accept,
        ));
        rules.push(RuleSpec::new(
            vec![
                Oif(tun.into()),
                family,
                Match::Saddr(*net),
                Match::RoutedBack,
            ],
            Verdict::Accept,
        ));
    }
    rules.push(RuleSpec::counted(
        vec![Oif(tun.into())],
        Verdict::Drop,
        counter::INTO_TUNNEL,
    ));
    rules.push(RuleSpec::counted(
        vec![Iif(tun.into())],
        Verdict::Drop,
        counter::FROM_TUNNEL,
    ));
    for (police, family) in [(police_v4, Family::V4), (police_v6, Family::V6)] {
        if police {
            rules.push(RuleSpec::counted(
                vec![Match::Family(family)],
                Verdict::Drop,
                counter::OTHER,
            ));
        }
    }
    rules
}

/// What the connector's filter holds, for the status line.
pub fn describe_connector(tun: &str, egress: &str) -> String {
    format!(
        "forward filter: {tun} -> {egress} replies and new connections as [[policy]] allow grants, \
         {egress} -> {tun} replies and new connections as [[policy]] inbound grants, nothing else"
    )
}

/// What a site gateway's filter holds, for the status line.
pub fn describe_client(
    tun: &str,
    lans: &[String],
    advertised: &[IpNet],
    police_v4: bool,
    police_v6: bool,
) -> String {
    let others = match (police_v4, police_v6) {
        (true, true) => "; no other forwarding (gatewayd turned it on)",
        (true, false) => "; no other IPv4 forwarding (gatewayd turned it on)",
        (false, true) => "; no other IPv6 forwarding (gatewayd turned it on)",
        (false, false) => "",
    };
    let mut sides: Vec<String> = lans.to_vec();
    sides.extend(advertised.iter().map(|n| n.to_string()));
    format!(
        "forward filter: {tun} <-> {} only, nothing else into or out of {tun}{others}",
        sides.join(", ")
    )
}

/// The connector's filter as `firewall plan` shows it: the base chain, and the session chains
/// as they look for one client of each `[[policy]]` entry, with `overlay` standing for that
/// client's own addresses.
pub fn plan_connector(
    tun: &str,
    egress: &str,
    overlay: &[IpNet],
    policy: &[(String, Vec<Rule>, Vec<Rule>)],
) -> String {
    let mut out = format!("  chain {FORWARD} (hook forward):\n");
    for r in connector_forward(tun, egress) {
        out.push_str(&format!("    {r}\n"));
    }
    for (identity, allow, inbound) in policy {
        let s = Session {
            owns: overlay.to_vec(),
            allow: allow.clone(),
            inbound: inbound.clone(),
        };
        let (o, i, _) = session_chains(&[s]);
        for (chain, rules) in [(TUNNEL_OUT, o), (TUNNEL_IN, i)] {
            if rules.is_empty() {
                continue;
            }
            out.push_str(&format!(
                "  chain {chain}, for each connected client {identity:?} (its own addresses in place of {}):\n",
                overlay
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            for r in rules {
                out.push_str(&format!("    {r}\n"));
            }
        }
    }
    out
}

/// A site gateway's filter as `firewall plan` shows it.
pub fn plan_client(tun: &str, lans: &[String], advertised: &[IpNet]) -> String {
    let mut out = format!("  chain {FORWARD} (hook forward):\n");
    for r in client_forward(tun, lans, advertised, true, true) {
        let note = match r.comment {
            Some(counter::OTHER) => "   # only when gatewayd turned forwarding on",
            _ => "",
        };
        out.push_str(&format!("    {r}{note}\n"));
    }
    out
}

/// nft's own syntax, for `firewall plan`, logs and tests.
impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = Vec::new();
        let family_word = |n: &IpNet| match n {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        for m in &self.matches {
            match m {
                Match::Iif(i) => words.push(format!("iifname {i:?}")),
                Match::Oif(o) => words.push(format!("oifname {o:?}")),
                Match::Ct(Ct::Replies) => words.push("ct state established,related".into()),
                Match::Ct(Ct::New) => words.push("ct state new".into()),
                // Implied by an address match; shown only on its own.
                Match::Family(fam) => {
                    let implied = self
                        .matches
                        .iter()
                        .any(|m| matches!(m, Match::Saddr(_) | Match::Daddr(_)));
                    if !implied {
                        words.push(match fam {
                            Family::V4 => "meta nfproto ipv4".into(),
                            Family::V6 => "meta nfproto ipv6".into(),
                        });
                    }
                }
                Match::Saddr(n) => words.push(format!("{} saddr {n}", family_word(n))),
                Match::Daddr(n) => words.push(format!("{} daddr {n}", family_word(n))),
                Match::L4(p) => words.push(format!("meta l4proto {}", proto_name(*p))),
                Match::Dport(p, lo, hi) => {
                    let range = if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo}-{hi}")
                    };
                    words.push(format!("{} dport {range}", proto_name(*p)));
                }
                Match::RoutedBack => words.push("fib saddr . iif oif exists".into()),
            }
        }
        if self.counter {
            words.push("counter".into());
        }
        words.push(match self.verdict {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
            Verdict::Jump(c) => format!("jump {c}"),
        });
        if let Some(c) = self.comment {
            words.push(format!("comment {c:?}"));
        }
        write!(f, "{}", words.join(" "))
    }
}

fn proto_name(p: u8) -> String {
    match p {
        TCP => "tcp".into(),
        UDP => "udp".into(),
        ICMP => "icmp".into(),
        ICMPV6 => "icmpv6".into(),
        other => other.to_string(),
    }
}

/// Big-endian network mask of `net` and its network address, as nftables compares them.
pub fn prefix_bytes(net: &IpNet) -> (Vec<u8>, Vec<u8>) {
    match net {
        IpNet::V4(n) => (n.netmask().octets().to_vec(), n.network().octets().to_vec()),
        IpNet::V6(n) => (n.netmask().octets().to_vec(), n.network().octets().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        Rule::parse(s).expect("valid rule")
    }

    fn lines(rules: &[RuleSpec]) -> Vec<String> {
        rules.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn the_connector_chain_lets_replies_and_policy_through_and_counts_the_rest() {
        assert_eq!(
            lines(&connector_forward("gwtun", "vpc0")),
            [
                r#"iifname "gwtun" oifname "vpc0" ct state established,related accept"#,
                r#"iifname "vpc0" oifname "gwtun" ct state established,related accept"#,
                r#"iifname "gwtun" oifname "vpc0" ct state new jump tunnel_out"#,
                r#"iifname "vpc0" oifname "gwtun" ct state new jump tunnel_in"#,
                r#"iifname "gwtun" oifname "vpc0" counter drop comment "from_tunnel""#,
                r#"oifname "gwtun" counter drop comment "into_tunnel""#,
                r#"oifname "vpc0" counter drop comment "into_vpc""#,
                r#"counter drop comment "other""#,
            ]
        );
    }

    #[test]
    fn session_chains_pair_each_owned_prefix_with_rules_of_its_family() {
        let s = Session {
            owns: vec![
                "100.64.0.2/32".parse().expect("net"),
                "fd00:64::2/128".parse().expect("net"),
            ],
            allow: vec![
                rule("10.128.0.0/16 tcp/22"),
                rule("10.128.0.0/16 icmp"),
                rule("fd00:128::/64"),
                rule("fd00:128::/64 icmp"),
            ],
            inbound: vec![rule("10.128.0.0/24 tcp/9100-9101")],
        };
        let (out, inbound, truncated) = session_chains(&[s]);
        assert!(!truncated);
        assert_eq!(
            lines(&out),
            [
                "ip saddr 100.64.0.2/32 ip daddr 10.128.0.0/16 meta l4proto tcp tcp dport 22 accept",
                "ip saddr 100.64.0.2/32 ip daddr 10.128.0.0/16 meta l4proto icmp accept",
                "ip6 saddr fd00:64::2/128 ip6 daddr fd00:128::/64 accept",
                "ip6 saddr fd00:64::2/128 ip6 daddr fd00:128::/64 meta l4proto icmpv6 accept",
            ]
        );
        assert_eq!(
            lines(&inbound),
            [
                r#"ip daddr 100.64.0.2/32 ip saddr 10.128.0.0/24 meta l4proto tcp tcp dport 9100-9101 counter accept comment "inbound""#
            ]
        );
    }

    #[test]
    fn session_chains_are_bounded_and_say_when_they_are_cut() {
        let s = Session {
            owns: (0..100u32)
                .map(|i| {
                    IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::from(
                        0x6440_0000 + i,
                    )))
                })
                .collect(),
            allow: (1..=50u16)
                .map(|p| rule(&format!("10.128.0.0/16 tcp/{p}")))
                .collect(),
            inbound: vec![],
        };
        let (out, inbound, truncated) = session_chains(&[s]);
        assert!(truncated);
        assert_eq!((out.len(), inbound.len()), (MAX_SESSION_RULES, 0));
        assert_eq!(session_chains(&[]), (vec![], vec![], false));
    }

    #[test]
    fn a_site_gateway_forwards_lan_and_tunnel_only_and_polices_what_it_turned_on() {
        let lan: IpNet = "192.0.2.0/24".parse().expect("net");
        assert_eq!(
            lines(&client_forward(
                "optun",
                &["lan0".into()],
                &[lan],
                true,
                false
            )),
            [
                r#"iifname "optun" oifname "lan0" accept"#,
                r#"iifname "lan0" oifname "optun" accept"#,
                r#"iifname "optun" ip daddr 192.0.2.0/24 accept"#,
                r#"oifname "optun" ip saddr 192.0.2.0/24 fib saddr . iif oif exists accept"#,
                r#"oifname "optun" counter drop comment "into_tunnel""#,
                r#"iifname "optun" counter drop comment "from_tunnel""#,
                r#"meta nfproto ipv4 counter drop comment "other""#,
            ]
        );
        assert_eq!(
            client_forward("optun", &[], &[], false, false).len(),
            2,
            "forwarding was on before gatewayd: only the tunnel is policed"
        );
    }

    #[test]
    fn prefixes_become_a_mask_and_the_masked_address() {
        let (m, a) = prefix_bytes(&"10.128.0.0/9".parse().expect("net"));
        assert_eq!((m, a), (vec![255, 128, 0, 0], vec![10, 128, 0, 0]));
        let (m, _) = prefix_bytes(&"fd00::/8".parse().expect("net"));
        assert_eq!(m[0], 0xff);
        assert!(m[1..].iter().all(|b| *b == 0));
    }
}
