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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FwRule {
    pub direction: Direction,
    /// `udp`, `tcp` or `icmp`.
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
        Role::Connector { listen } => {
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
            let Some(egress) = &t.egress else {
                return Err(
                    "no [egress]: without a pinned port range, VPC replies would need 1024-65535; \
                     set [egress] interface and port_range"
                        .into(),
                );
            };
            let range = Some(egress.ports);
            for p in &t.policy {
                for rule in p.allow.iter().filter_map(|r| Rule::parse(r).ok()) {
                    let peer = rule.net.to_string();
                    let why = format!("policy {}: {}", p.identity, describe(&rule));
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
            for c in connect {
                let (host, port) = c.rsplit_once(':').unwrap_or((c.as_str(), "0"));
                let port: u16 = port.parse().unwrap_or(0);
                let host = host.trim_matches(['[', ']']);
                if t.transport.uses_quic() {
                    pair(
                        &mut rules,
                        true,
                        "udp",
                        Some((*source_port, *source_port)),
                        host,
                        Some((port, port)),
                        "the tunnel to the connector (QUIC)".into(),
                    );
                }
                if t.transport.uses_tcp() {
                    let tcp = t.fallback_port.unwrap_or(port);
                    pair(
                        &mut rules,
                        true,
                        "tcp",
                        Some((*source_port, *source_port)),
                        host,
                        Some((tcp, tcp)),
                        "the tunnel to the connector (TLS over TCP fallback)".into(),
                    );
                }
            }
        }
    }
    Ok(rules.into_iter().collect())
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
            "{:<9} {:<5} {:<12} {:<18} {:<11} WHY",
            "DIRECTION", "PROTO", "LOCAL PORTS", "PEER", "PEER PORTS"
        );
        for r in rules.iter().filter(|r| !(stateful && r.reply)) {
            let dir = match r.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            };
            let _ = writeln!(
                out,
                "{:<9} {:<5} {:<12} {:<18} {:<11} {}",
                dir,
                r.proto,
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

/// Ready-to-run AWS CLI commands; `$ACL_ID` and `$SG_ID` are the operator's to set.
pub fn render_aws_cli(rules: &[FwRule]) -> String {
    let mut out = String::from(
        "# Set ACL_ID (the subnet's network ACL) and SG_ID (the instance's security group) first.\n",
    );
    let proto_num = |p: &str| match p {
        "tcp" => "6",
        "udp" => "17",
        _ => "1",
    };
    for (i, r) in rules.iter().enumerate() {
        let egress = if r.direction == Direction::Outbound {
            "--egress"
        } else {
            "--ingress"
        };
        // The ACL's port range is the destination port of the packet.
        let dst = match r.direction {
            Direction::Inbound => r.local_ports,
            Direction::Outbound => r.peer_ports,
        };
        let range = match (r.proto, dst) {
            ("icmp", _) => " --icmp-type-code Code=-1,Type=-1".to_string(),
            (_, Some((a, b))) => format!(" --port-range From={a},To={b}"),
            (_, None) => " --port-range From=0,To=65535".to_string(),
        };
        let _ = writeln!(
            out,
            "aws ec2 create-network-acl-entry --network-acl-id \"$ACL_ID\" {egress} --rule-number {} \
             --protocol {}{range} --cidr-block {} --rule-action allow  # {}",
            100 + i * 10,
            proto_num(r.proto),
            r.peer,
            r.why
        );
    }
    for r in rules.iter().filter(|r| !r.reply) {
        let cmd = if r.direction == Direction::Inbound {
            "authorize-security-group-ingress"
        } else {
            "authorize-security-group-egress"
        };
        let dst = match r.direction {
            Direction::Inbound => r.local_ports,
            Direction::Outbound => r.peer_ports,
        };
        let port = match (r.proto, dst) {
            ("icmp", _) => " --port -1".to_string(),
            (_, Some((a, b))) if a == b => format!(" --port {a}"),
            (_, Some((a, b))) => format!(" --port {a}-{b}"),
            (_, None) => " --port 0-65535".to_string(),
        };
        let _ = writeln!(
            out,
            "aws ec2 {cmd} --group-id \"$SG_ID\" --protocol {}{port} --cidr {}  # {}",
            r.proto, r.peer, r.why
        );
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
                .map(|p| {
                    let parse =
                        |v: &[String]| v.iter().filter_map(|r| Rule::parse(r).ok()).collect();
                    (p.identity.clone(), parse(&p.allow), parse(&p.inbound))
                })
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
            "authorize-security-group-ingress --group-id \"$SG_ID\" --protocol udp --port 7844"
        ));
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
