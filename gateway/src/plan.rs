//! `gatewayctl firewall plan`: the few cloud firewall rules a config needs, derived from it.
//!
//! Every rule names one port or the pinned egress range, never 1024-65535: the tunnel listens
//! on one port, clients send from one pinned port, and the connector's traffic into the VPC
//! (forwarded and DNS) leaves from `[egress] port_range`. A stateless ACL needs each rule and
//! its reply; a stateful security group only the rules that open a flow.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::config::{Config, Role};
use crate::core::policy::{Proto, Rule};

mod aws;
#[cfg(test)]
mod hub_tests;
use aws::Peer;
pub use aws::render_aws_cli;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FwRule {
    pub direction: Direction,
    /// `udp`, `tcp` or `icmp` (ICMPv6 when the peer is IPv6).
    pub proto: &'static str,
    /// Ports on this node; `None` for ICMP.
    pub local_ports: Option<(u16, u16)>,
    pub peer: String,
    pub peer_ports: Option<(u16, u16)>,
    /// A reply to a flow the other rule opened: needed by a stateless ACL only.
    pub reply: bool,
    pub why: String,
}

/// The rules for `config`. A client whose source port is not pinned cannot get a tight rule
/// set: that is an error that says which key to set.
pub fn plan(config: &Config) -> Result<Vec<FwRule>, String> {
    let Some(t) = &config.tunnel else {
        return Err(
            "no [tunnel] in this config: a classifier-only node needs no cloud rules".into(),
        );
    };
    let mut rules = BTreeSet::new();
    let pair = |rules: &mut BTreeSet<FwRule>,
                out: bool,
                proto: &'static str,
                local: Option<(u16, u16)>,
                peer: &str,
                peer_ports: Option<(u16, u16)>,
                why: String| {
        let (open, reply) = if out {
            (Direction::Outbound, Direction::Inbound)
        } else {
            (Direction::Inbound, Direction::Outbound)
        };
        rules.insert(FwRule {
            direction: open,
            proto,
            local_ports: local,
            peer: peer.to_string(),
            peer_ports,
            reply: false,
            why: why.clone(),
        });
        rules.insert(FwRule {
            direction: reply,
            proto,
            local_ports: local,
            peer: peer.to_string(),
            peer_ports,
            reply: true,
            why: format!("replies: {why}"),
        });
    };
    match &t.role {
        Role::Hub { listen } => {
            let port = listen.port();
            if t.transport.uses_quic() {
                pair(
                    &mut rules,
                    false,
                    "udp",
                    Some((port, port)),
                    "0.0.0.0/0",
                    None,
                    "hub: clients and connectors (QUIC), each from its pinned source_port".into(),
                );
            }
            if t.transport.uses_tcp() {
                let tcp = t.fallback_port.unwrap_or(port);
                pair(
                    &mut rules,
                    false,
                    "tcp",
                    Some((tcp, tcp)),
                    "0.0.0.0/0",
                    None,
                    "hub: clients and connectors (TLS over TCP fallback)".into(),
                );
            }
        }
        Role::Connector {
            listen,
            hubs,
            source_port,
        } => {
            if !hubs.is_empty() && *source_port == 0 {
                return Err(
                    "tunnel.source_port is not set: replies from the hubs would need \
                     1024-65535; pin it (e.g. source_port = 7844)"
                        .into(),
                );
            }
            outbound_to(
                &mut rules,
                &pair,
                t,
                hubs,
                *source_port,
                "the outbound link to the hub",
            );
            if let Some(listen) = listen {
                let port = listen.port();
                if t.transport.uses_quic() {
                    pair(
                        &mut rules,
                        false,
                        "udp",
                        Some((port, port)),
                        "0.0.0.0/0",
                        Some((port, port)),
                        format!("tunnel clients (QUIC); clients must set source_port = {port}"),
                    );
                }
                if t.transport.uses_tcp() {
                    let tcp = t.fallback_port.unwrap_or(port);
                    pair(
                        &mut rules,
                        false,
                        "tcp",
                        Some((tcp, tcp)),
                        "0.0.0.0/0",
                        Some((port, port)),
                        format!(
                            "tunnel clients (TLS over TCP fallback); clients must set source_port = {port}"
                        ),
                    );
                }
            }
            let Some(egress) = &t.egress else {
                return Err(
                    "no [egress]: without a pinned port range, VPC replies would need 1024-65535; \
                     set [egress] interface and port_range"
                        .into(),
                );
            };
            let range = Some(egress.ports);
            for p in &t.policy {
                for rule in &p.allow {
                    let peer = rule.net.to_string();
                    let why = format!("policy {}: {}", p.identity, describe(rule));
                    match rule.proto {
                        Proto::Tcp => pair(&mut rules, true, "tcp", range, &peer, rule.ports, why),
                        Proto::Udp => pair(&mut rules, true, "udp", range, &peer, rule.ports, why),
                        Proto::Icmp => pair(&mut rules, true, "icmp", None, &peer, None, why),
                        Proto::Any => {
                            pair(&mut rules, true, "tcp", range, &peer, None, why.clone());
                            pair(&mut rules, true, "udp", range, &peer, None, why.clone());
                            pair(&mut rules, true, "icmp", None, &peer, None, why);
                        }
                    }
                }
            }
            for z in &t.zones {
                for s in &z.servers {
                    let peer = ipnet::IpNet::from(*s).to_string();
                    let why = format!("DNS zone {} (TCP for large answers)", z.domain);
                    pair(
                        &mut rules,
                        true,
                        "udp",
                        range,
                        &peer,
                        Some((53, 53)),
                        why.clone(),
                    );
                    pair(&mut rules, true, "tcp", range, &peer, Some((53, 53)), why);
                }
            }
        }
        Role::Client {
            connect,
            source_port,
            ..
        } => {
            if *source_port == 0 {
                return Err(
                    "tunnel.source_port is not set: replies would need 1024-65535; pin it \
                     (e.g. source_port = 7844)"
                        .into(),
                );
            }
            let to = match t.group {
                Some(_) => "the tunnel through the hub",
                None => "the tunnel to the connector",
            };
            outbound_to(&mut rules, &pair, t, connect, *source_port, to);
        }
    }
    Ok(rules.into_iter().collect())
}

type Pair<'a> = dyn Fn(
        &mut BTreeSet<FwRule>,
        bool,
        &'static str,
        Option<(u16, u16)>,
        &str,
        Option<(u16, u16)>,
        String,
    ) + 'a;

/// Outbound rules (and their replies) from the pinned `source_port` to each `HOST:PORT`.
fn outbound_to(
    rules: &mut BTreeSet<FwRule>,
    pair: &Pair<'_>,
    t: &crate::config::Tunnel,
    targets: &[String],
    source_port: u16,
    to: &str,
) {
    for c in targets {
        let (host, port) = c.rsplit_once(':').unwrap_or((c.as_str(), "0"));
        let port: u16 = port.parse().unwrap_or(0);
        let host = host.trim_matches(['[', ']']);
        if t.transport.uses_quic() {
            pair(
                rules,
                true,
                "udp",
                Some((source_port, source_port)),
                host,
                Some((port, port)),
                format!("{to} (QUIC)"),
            );
        }
        if t.transport.uses_tcp() {
            let tcp = t.fallback_port.unwrap_or(port);
            pair(
                rules,
                true,
                "tcp",
                Some((source_port, source_port)),
                host,
                Some((tcp, tcp)),
                format!("{to} (TLS over TCP fallback)"),
            );
        }
    }
}

fn describe(rule: &Rule) -> String {
    let proto = match rule.proto {
        Proto::Any => "any",
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    };
    match rule.ports {
        Some((a, b)) if a == b => format!("{} {proto}/{a}", rule.net),
        Some((a, b)) => format!("{} {proto}/{a}-{b}", rule.net),
        None => format!("{} {proto}", rule.net),
    }
}

fn ports(p: Option<(u16, u16)>) -> String {
    match p {
        None => "-".into(),
        Some((a, b)) if a == b => a.to_string(),
        Some((a, b)) => format!("{a}-{b}"),
    }
}

/// The protocol as a person reads it: ICMP towards an IPv6 peer is ICMPv6, another protocol.
fn proto_name(r: &FwRule) -> &'static str {
    match (r.proto, Peer::of(&r.peer)) {
        ("icmp", Peer::V6(_)) => "icmpv6",
        (p, _) => p,
    }
}

/// Two tables: the stateless ACL (every rule) and the stateful security group (openers only).
pub fn render_table(rules: &[FwRule]) -> String {
    let mut out = String::new();
    for (title, stateful) in [
        (
            "Network ACL (stateless): allow exactly these, deny the rest",
            false,
        ),
        (
            "Security group (stateful): allow these; replies follow by themselves",
            true,
        ),
    ] {
        let _ = writeln!(out, "{title}");
        let _ = writeln!(
            out,
            "{:<9} {:<6} {:<12} {:<18} {:<11} WHY",
            "DIRECTION", "PROTO", "LOCAL PORTS", "PEER", "PEER PORTS"
        );
        for r in rules.iter().filter(|r| !(stateful && r.reply)) {
            let dir = match r.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            };
            let _ = writeln!(
                out,
                "{:<9} {:<6} {:<12} {:<18} {:<11} {}",
                dir,
                proto_name(r),
                ports(r.local_ports),
                r.peer,
                ports(r.peer_ports),
                r.why
            );
        }
        out.push('\n');
    }
    out
}

/// The host's own forward filter, which gatewayd installs (and removes) in its nftables table:
/// not a cloud rule, but what this node lets through when it forwards. `None` for a node that
/// forwards nothing (a workstation client, a classifier).
pub fn host_forward_filter(config: &Config) -> Option<String> {
    use crate::tunnel::filter;
    let t = config.tunnel.as_ref()?;
    let (table, body) = match (&t.role, &t.egress, &t.client_table) {
        (Role::Connector { .. }, Some(e), _) => {
            let policy: Vec<_> = t
                .policy
                .iter()
                .map(|p| (p.identity.clone(), p.allow.clone(), p.inbound.clone()))
                .collect();
            let overlay = [t.overlay_v4.into(), t.overlay_v6.into()];
            let mut body = filter::plan_connector(&t.tun, &e.interface, &overlay, &policy);
            if t.policy.iter().any(|p| !p.inbound.is_empty()) {
                let _ = writeln!(
                    body,
                    "  inbound rules also need the VPC's route table to send {} and {} to this \
                     instance (source/destination check off) and its security group to let \
                     those connections in",
                    t.overlay_v4, t.overlay_v6
                );
            }
            (e.table.as_str(), body)
        }
        (Role::Client { .. }, _, Some(table)) => (
            table.as_str(),
            filter::plan_client(&t.tun, &t.lan, &t.advertise),
        ),
        _ => return None,
    };
    Some(format!(
        "Host forward filter (nftables table inet {table}, installed and removed by gatewayd; \
         dropped packets counted in gatewayctl status)\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        crate::config::parse(Path::new("/t.toml"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    const TLS: &str = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/n.pem\"\nkey = \"/p/n.key\"\n";

    fn connector() -> Config {
        config(&format!(
            "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
             [egress]\ninterface = \"ens5\"\nport_range = \"40000-40999\"\n\
             [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 tcp/22\", \"10.128.0.0/16 icmp\"]\n\
             [[dns.zone]]\ndomain = \"hoge-vpc.com\"\nservers = [\"10.128.0.61\"]\n"
        ))
    }

    #[test]
    fn the_host_forward_filter_is_shown_for_nodes_that_forward() {
        let text = host_forward_filter(&connector()).expect("a connector forwards");
        assert!(text.contains("table inet gateway_gw"), "{text}");
        assert!(
            text.contains(r#"iifname "gateway0" oifname "ens5" ct state new jump tunnel_out"#),
            "{text}"
        );
        assert!(
            text.contains(
                "ip saddr 100.64.0.0/24 ip daddr 10.128.0.0/16 meta l4proto tcp tcp dport 22 accept"
            ),
            "{text}"
        );
        assert!(
            !text.contains("tunnel_in,"),
            "no inbound rules, no inbound chain: {text}"
        );
        let site = config(&format!(
            "[node]\nname = \"site\"\n[tunnel]\nconnect = [\"gw:7844\"]\nsource_port = 7844\n{TLS}\
             [client]\nlan = [\"eth1\"]\n"
        ));
        let text = host_forward_filter(&site).expect("a site gateway forwards");
        assert!(
            text.contains(r#"iifname "eth1" oifname "gateway0" accept"#),
            "{text}"
        );
        let workstation = config(&format!(
            "[node]\nname = \"ws\"\n[tunnel]\nconnect = [\"gw:7844\"]\n{TLS}"
        ));
        assert_eq!(host_forward_filter(&workstation), None);
    }

    #[test]
    fn connector_plan_has_the_tunnel_port_policy_ports_and_the_pinned_range_only() {
        let rules = plan(&connector()).expect("plan");
        let has = |dir, proto, local: Option<(u16, u16)>, peer: &str, pp: Option<(u16, u16)>| {
            rules.iter().any(|r| {
                r.direction == dir
                    && r.proto == proto
                    && r.local_ports == local
                    && r.peer == peer
                    && r.peer_ports == pp
            })
        };
        assert!(has(
            Direction::Inbound,
            "udp",
            Some((7844, 7844)),
            "0.0.0.0/0",
            Some((7844, 7844))
        ));
        assert!(has(
            Direction::Outbound,
            "udp",
            Some((7844, 7844)),
            "0.0.0.0/0",
            Some((7844, 7844))
        ));
        // The TLS-over-TCP fallback: the same port number, from the client's pinned port.
        assert!(has(
            Direction::Inbound,
            "tcp",
            Some((7844, 7844)),
            "0.0.0.0/0",
            Some((7844, 7844))
        ));
        assert!(has(
            Direction::Outbound,
            "tcp",
            Some((40000, 40999)),
            "10.128.0.0/16",
            Some((22, 22))
        ));
        assert!(has(
            Direction::Inbound,
            "tcp",
            Some((40000, 40999)),
            "10.128.0.0/16",
            Some((22, 22))
        ));
        assert!(has(
            Direction::Outbound,
            "icmp",
            None,
            "10.128.0.0/16",
            None
        ));
        assert!(has(
            Direction::Outbound,
            "udp",
            Some((40000, 40999)),
            "10.128.0.61/32",
            Some((53, 53))
        ));
        for r in &rules {
            for (a, b) in [r.local_ports, r.peer_ports].into_iter().flatten() {
                assert!(b - a < 1000, "a wide range in {r:?}");
            }
        }
        let text = render_table(&rules);
        assert!(!text.contains("1024-65535"));
        assert!(text.contains("Security group (stateful)"));
        let aws = render_aws_cli(&rules);
        assert!(
            aws.contains("--protocol 17 --port-range From=7844,To=7844 --cidr-block 0.0.0.0/0")
        );
        assert!(aws.contains(
            "authorize-security-group-ingress --group-id \"$SG_ID\" --ip-permissions \
             'IpProtocol=udp,FromPort=7844,ToPort=7844,IpRanges=[{CidrIp=0.0.0.0/0}]'"
        ));
    }

    #[test]
    fn table_names_icmpv6_for_ipv6_peers_and_icmp_for_ipv4_ones() {
        let (connector, client) = aws::tests::dual_stack();
        let text = render_table(&connector);
        let row = |proto: &str, peer: &str| {
            text.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.get(1) == Some(&proto) && w.get(3) == Some(&peer)
            })
        };
        assert!(row("icmp", "10.128.0.0/16"), "{text}");
        assert!(row("icmpv6", "fd00:128::/64"), "{text}");
        assert!(!row("icmp", "fd00:128::/64"), "{text}");
        assert!(row("tcp", "fd00:128::/64"), "{text}");
        assert!(row("udp", "fd00:128::61/128"), "{text}");
        let text = render_table(&client);
        assert!(text.contains("2001:db8::7"), "{text}");
        assert!(text.contains("gw.example.net"), "{text}");
    }

    #[test]
    fn refuses_configs_that_would_need_wide_open_ports() {
        let no_egress = config(&format!(
            "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}"
        ));
        assert!(
            plan(&no_egress)
                .expect_err("no egress")
                .contains("port_range")
        );
        let unpinned = config(&format!(
            "[node]\nname = \"c\"\n[tunnel]\nconnect = [\"gw.example.net:7844\"]\n{TLS}"
        ));
        assert!(
            plan(&unpinned)
                .expect_err("unpinned")
                .contains("source_port")
        );
        let pinned = config(&format!(
            "[node]\nname = \"c\"\n[tunnel]\nconnect = [\"gw.example.net:7844\"]\nsource_port = 7844\n{TLS}"
        ));
        let rules = plan(&pinned).expect("plan");
        assert_eq!(
            rules.len(),
            4,
            "QUIC and the TCP fallback, each way: {rules:?}"
        );
        let https = config(&format!(
            "[node]\nname = \"c\"\n[tunnel]\nconnect = [\"gw.example.net:7844\"]\nsource_port = 7844\n\
             fallback_port = 443\n{TLS}"
        ));
        let rules = plan(&https).expect("plan");
        assert!(
            rules.iter().any(|r| r.proto == "tcp"
                && r.direction == Direction::Outbound
                && r.peer_ports == Some((443, 443))
                && r.local_ports == Some((7844, 7844))),
            "{rules:?}"
        );
        let quic_only = config(&format!(
            "[node]\nname = \"c\"\n[tunnel]\nconnect = [\"gw.example.net:7844\"]\nsource_port = 7844\n\
             transport = \"quic\"\n{TLS}"
        ));
        assert!(
            plan(&quic_only)
                .expect("plan")
                .iter()
                .all(|r| r.proto == "udp")
        );
    }
}
