//! `firewall plan --format aws-cli`: the rules as AWS CLI commands, each peer in the form its
//! family needs.

use std::fmt::Write;

use super::{Direction, FwRule, proto_name};

/// A rule's peer as cloud firewalls take it: an IPv4 or an IPv6 prefix (a bare address is its
/// /32 or /128), or a host name (a client's `connect`) that the operator must resolve, since
/// ACLs and security groups hold addresses only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Peer {
    V4(String),
    V6(String),
    Name(String),
}

impl Peer {
    pub(super) fn of(peer: &str) -> Self {
        let net = peer
            .parse::<ipnet::IpNet>()
            .or_else(|_| peer.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(n @ ipnet::IpNet::V4(_)) => Self::V4(n.to_string()),
            Ok(n @ ipnet::IpNet::V6(_)) => Self::V6(n.to_string()),
            Err(_) => Self::Name(peer.to_string()),
        }
    }

    /// A shell variable for a name's address, so the commands stay runnable once it is set.
    fn variable(name: &str) -> String {
        let tail: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("CIDR_{tail}")
    }
}

/// Ready-to-run AWS CLI commands; `$ACL_ID` and `$SG_ID` are the operator's to set, and so is
/// `$CIDR_NAME` for a peer given by name. IPv6 peers take `--ipv6-cidr-block` in an ACL and
/// `Ipv6Ranges` in a security group; ICMP towards them is ICMPv6, protocol 58.
pub fn render_aws_cli(rules: &[FwRule]) -> String {
    let mut out = String::from(
        "# Set ACL_ID (the subnet's network ACL) and SG_ID (the instance's security group) first.\n",
    );
    let mut names: Vec<&str> = rules
        .iter()
        .filter(|r| matches!(Peer::of(&r.peer), Peer::Name(_)))
        .map(|r| r.peer.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let _ = writeln!(
            out,
            "# {name} is a name: set {}=ADDRESS/32 (its IPv4 address) too.",
            Peer::variable(name)
        );
    }
    // The ACL's port range is the destination port of the packet.
    let dst = |r: &FwRule| match r.direction {
        Direction::Inbound => r.local_ports,
        Direction::Outbound => r.peer_ports,
    };
    for (i, r) in rules.iter().enumerate() {
        let egress = if r.direction == Direction::Outbound {
            "--egress"
        } else {
            "--ingress"
        };
        let peer = Peer::of(&r.peer);
        let (proto, cidr) = match (&peer, r.proto) {
            (Peer::V6(net), "icmp") => ("58", format!("--ipv6-cidr-block {net}")),
            (Peer::V6(net), p) => (proto_number(p), format!("--ipv6-cidr-block {net}")),
            (Peer::V4(net), p) => (proto_number(p), format!("--cidr-block {net}")),
            (Peer::Name(n), p) => (
                proto_number(p),
                format!("--cidr-block \"${}\"", Peer::variable(n)),
            ),
        };
        let range = match (r.proto, dst(r)) {
            ("icmp", _) => " --icmp-type-code Code=-1,Type=-1".to_string(),
            (_, Some((a, b))) => format!(" --port-range From={a},To={b}"),
            (_, None) => " --port-range From=0,To=65535".to_string(),
        };
        let _ = writeln!(
            out,
            "aws ec2 create-network-acl-entry --network-acl-id \"$ACL_ID\" {egress} --rule-number {} \
             --protocol {proto}{range} {cidr} --rule-action allow  # {}",
            100 + i * 10,
            r.why
        );
    }
    for r in rules.iter().filter(|r| !r.reply) {
        let cmd = if r.direction == Direction::Inbound {
            "authorize-security-group-ingress"
        } else {
            "authorize-security-group-egress"
        };
        // For ICMP the "ports" are the type and code: -1 for all of them.
        let (from, to) = match (r.proto, dst(r)) {
            ("icmp", _) => (-1, -1),
            (_, Some((a, b))) => (i32::from(a), i32::from(b)),
            (_, None) => (0, 65535),
        };
        let ranges = match Peer::of(&r.peer) {
            Peer::V4(net) => format!("IpRanges=[{{CidrIp={net}}}]"),
            Peer::V6(net) => format!("Ipv6Ranges=[{{CidrIpv6={net}}}]"),
            Peer::Name(n) => format!("IpRanges=[{{CidrIp='\"${}\"'}}]", Peer::variable(&n)),
        };
        let _ = writeln!(
            out,
            "aws ec2 {cmd} --group-id \"$SG_ID\" --ip-permissions \
             'IpProtocol={},FromPort={from},ToPort={to},{ranges}'  # {}",
            proto_name(r),
            r.why
        );
    }
    out
}

fn proto_number(proto: &str) -> &'static str {
    match proto {
        "tcp" => "6",
        "udp" => "17",
        _ => "1",
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::plan::plan;
    use std::path::Path;

    fn config(text: &str) -> crate::config::Config {
        crate::config::parse(Path::new("/t.toml"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    const TLS: &str = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/n.pem\"\nkey = \"/p/n.key\"\n";

    /// A connector whose policy and resolvers are IPv4 and IPv6, and a client that dials an
    /// IPv6 address and a name.
    pub(crate) fn dual_stack() -> (Vec<FwRule>, Vec<FwRule>) {
        let connector = config(&format!(
            "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
             [egress]\ninterface = \"ens5\"\nport_range = \"40000-40999\"\n\
             [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 icmp\", \"fd00:128::/64 icmp\", \
             \"fd00:128::/64 tcp/22\"]\n\
             [[dns.zone]]\ndomain = \"hoge-vpc.com\"\nservers = [\"10.128.0.61\", \"fd00:128::61\"]\n"
        ));
        let client = config(&format!(
            "[node]\nname = \"c\"\n[tunnel]\nconnect = [\"[2001:db8::7]:7844\", \"gw.example.net:7844\"]\n\
             server_name = \"gw\"\nsource_port = 7844\ntransport = \"quic\"\n{TLS}"
        ));
        (
            plan(&connector).expect("connector plan"),
            plan(&client).expect("client plan"),
        )
    }

    #[test]
    fn aws_acl_entries_use_the_ipv6_block_and_protocol_58_for_ipv6_peers() {
        let (connector, client) = dual_stack();
        let aws = render_aws_cli(&connector);
        let acl: Vec<&str> = aws
            .lines()
            .filter(|l| l.contains("create-network-acl-entry"))
            .collect();
        let v6: Vec<&&str> = acl.iter().filter(|l| l.contains("fd00:128::")).collect();
        let v4: Vec<&&str> = acl.iter().filter(|l| l.contains("10.128.0.")).collect();
        assert!(!v6.is_empty() && !v4.is_empty(), "{aws}");
        for l in &v6 {
            assert!(l.contains(" --ipv6-cidr-block fd00:128::"), "{l}");
            assert!(!l.contains("--cidr-block fd00"), "{l}");
            assert!(
                !l.contains("--protocol 1 "),
                "ICMP to an IPv6 peer is not protocol 1: {l}"
            );
        }
        for l in &v4 {
            assert!(l.contains(" --cidr-block 10.128.0."), "{l}");
            assert!(!l.contains("--protocol 58"), "{l}");
        }
        assert!(
            acl.iter().any(|l| l.contains(
                "--protocol 58 --icmp-type-code Code=-1,Type=-1 --ipv6-cidr-block fd00:128::/64"
            )),
            "{aws}"
        );
        assert!(
            acl.iter().any(|l| l.contains(
                "--protocol 1 --icmp-type-code Code=-1,Type=-1 --cidr-block 10.128.0.0/16"
            )),
            "{aws}"
        );
        assert!(
            acl.iter().any(|l| l.contains(
                "--protocol 17 --port-range From=53,To=53 --ipv6-cidr-block fd00:128::61/128"
            )),
            "{aws}"
        );

        let aws = render_aws_cli(&client);
        assert!(aws.contains("--ipv6-cidr-block 2001:db8::7/128"), "{aws}");
        assert!(
            aws.contains("--cidr-block \"$CIDR_GW_EXAMPLE_NET\""),
            "{aws}"
        );
        assert!(aws.contains("set CIDR_GW_EXAMPLE_NET="), "{aws}");
    }

    #[test]
    fn aws_security_group_rules_put_ipv6_peers_in_ipv6_ranges() {
        let (connector, client) = dual_stack();
        let aws = render_aws_cli(&connector);
        let sg: Vec<&str> = aws
            .lines()
            .filter(|l| l.contains("authorize-security-group"))
            .collect();
        assert!(
            sg.iter().any(|l| l.contains(
                "authorize-security-group-egress --group-id \"$SG_ID\" --ip-permissions \
             'IpProtocol=icmpv6,FromPort=-1,ToPort=-1,Ipv6Ranges=[{CidrIpv6=fd00:128::/64}]'"
            )),
            "{aws}"
        );
        assert!(
            sg.iter().any(|l| l.contains(
                "'IpProtocol=icmp,FromPort=-1,ToPort=-1,IpRanges=[{CidrIp=10.128.0.0/16}]'"
            )),
            "{aws}"
        );
        assert!(
            sg.iter().any(|l| l.contains(
                "'IpProtocol=tcp,FromPort=22,ToPort=22,Ipv6Ranges=[{CidrIpv6=fd00:128::/64}]'"
            )),
            "{aws}"
        );
        for l in &sg {
            assert!(
                !(l.contains("CidrIp=fd00") || l.contains("CidrIpv6=10.")),
                "family mixed up: {l}"
            );
        }
        let aws = render_aws_cli(&client);
        assert!(
            aws.contains(
                "'IpProtocol=udp,FromPort=7844,ToPort=7844,Ipv6Ranges=[{CidrIpv6=2001:db8::7/128}]'"
            ),
            "{aws}"
        );
        assert!(
            aws.contains("IpRanges=[{CidrIp='\"$CIDR_GW_EXAMPLE_NET\"'}]"),
            "{aws}"
        );
    }
}
