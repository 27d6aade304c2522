//! Each kind of mistake in a file named by file, key and reason; what a reload may apply; the
//! shipped examples load.

use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::names::check_interface_name;
use super::*;

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("/etc/gateway/test.toml"), text)
}

fn only_issue(text: &str) -> ConfigIssue {
    let err = parse_str(text).expect_err("config should be rejected");
    assert_eq!(err.0.len(), 1, "expected one issue, got {err}");
    err.0.into_iter().next().expect("one issue")
}

const GOOD: &str = r#"
[node]
name = "vpc-gw-1"
socket = "/run/gw/a.sock"

[dataplane]
interfaces = ["lan0", "eth1"]

[[route]]
cidr = "10.128.0.0/16"

[[route]]
cidr = "fd00:128::/64"
name = "vpc-v6"
"#;

#[test]
fn accepts_a_good_config_and_numbers_routes_in_order() {
    let c = parse_str(GOOD).expect("valid");
    assert_eq!(c.node.name, "vpc-gw-1");
    assert_eq!(c.node.socket, PathBuf::from("/run/gw/a.sock"));
    assert_eq!(c.node.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(c.interfaces, vec!["lan0", "eth1"]);
    let routes: Vec<_> = c
        .routes
        .iter()
        .map(|r| (r.id, r.cidr.to_string(), r.name.clone()))
        .collect();
    assert_eq!(
        routes,
        vec![
            (0, "10.128.0.0/16".to_string(), "10.128.0.0/16".to_string()),
            (1, "fd00:128::/64".to_string(), "vpc-v6".to_string()),
        ]
    );
}

#[test]
fn minimal_config_uses_default_paths() {
    let c = parse_str("[node]\nname = \"n\"\n").expect("valid");
    assert_eq!(c.node.socket, PathBuf::from(DEFAULT_SOCKET));
    assert!(c.interfaces.is_empty());
    assert!(c.routes.is_empty());
}

#[test]
fn rejects_cidr_that_is_not_a_cidr_naming_the_key() {
    let issue = only_issue("[node]\nname = \"n\"\n[[route]]\ncidr = \"10.128.0.0/33\"\n");
    assert_eq!(issue.key, "route[0].cidr");
    assert!(issue.reason.contains("is not a CIDR"), "{}", issue.reason);
    assert_eq!(issue.file, PathBuf::from("/etc/gateway/test.toml"));
}

#[test]
fn rejects_cidr_with_host_bits_and_suggests_the_network() {
    let issue = only_issue(
        "[node]\nname = \"n\"\n[[route]]\ncidr = \"10.0.0.0/8\"\n[[route]]\ncidr = \"10.128.0.1/16\"\n",
    );
    assert_eq!(issue.key, "route[1].cidr");
    assert!(issue.reason.contains("10.128.0.0/16"), "{}", issue.reason);
}

#[test]
fn rejects_duplicate_cidr() {
    let issue = only_issue(
        "[node]\nname = \"n\"\n[[route]]\ncidr = \"fd00::/8\"\n[[route]]\ncidr = \"fd00::/8\"\n",
    );
    assert_eq!(issue.key, "route[1].cidr");
    assert!(issue.reason.contains("route[0]"), "{}", issue.reason);
}

#[test]
fn rejects_unknown_key_naming_its_table() {
    let issue = only_issue("[node]\nname = \"n\"\nsockett = \"/x\"\n");
    assert_eq!(issue.key, "node.sockett");
    assert!(
        issue.reason.contains("unknown field `sockett`"),
        "{}",
        issue.reason
    );
}

#[test]
fn rejects_unknown_key_inside_an_array_of_tables() {
    let issue = only_issue("[node]\nname = \"n\"\n[[route]]\ncidr = \"10.0.0.0/8\"\nvia = \"x\"\n");
    assert_eq!(issue.key, "route[0].via");
    assert!(issue.reason.contains("via"), "{}", issue.reason);
}

#[test]
fn rejects_unknown_section() {
    let issue = only_issue("[node]\nname = \"n\"\n[tunel]\nlisten = \"x\"\n");
    assert!(issue.reason.contains("tunel"), "{}", issue.reason);
}

#[test]
fn rejects_wrong_type_naming_the_key() {
    let issue = only_issue("[node]\nname = \"n\"\n[dataplane]\ninterfaces = \"lan0\"\n");
    assert_eq!(issue.key, "dataplane.interfaces");
}

#[test]
fn syntax_error_names_line_and_column() {
    let issue = only_issue("[node]\nname = \"n\"\n[[route]\n");
    assert!(issue.key.starts_with("line 3"), "{}", issue.key);
}

#[test]
fn missing_node_section_is_named() {
    let issue = only_issue("[[route]]\ncidr = \"10.0.0.0/8\"\n");
    assert!(issue.reason.contains("node"), "{issue}");
}

#[test]
fn reports_every_semantic_issue_at_once() {
    let err = parse_str(
        "[node]\nname = \"bad name\"\nsocket = \"rel.sock\"\n[dataplane]\ninterfaces = [\"a/b\", \"x\", \"x\"]\n[[route]]\ncidr = \"nope\"\n",
    )
    .expect_err("invalid");
    let keys: Vec<_> = err.0.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "node.name",
            "node.socket",
            "dataplane.interfaces[0]",
            "dataplane.interfaces[2]",
            "route[0].cidr"
        ]
    );
}

#[test]
fn display_names_file_key_and_reason() {
    let err = parse_str("[node]\nname = \"n\"\n[[route]]\ncidr = \"x\"\n").expect_err("bad");
    let text = err.to_string();
    assert!(
        text.starts_with("/etc/gateway/test.toml: route[0].cidr: \"x\" is not a CIDR"),
        "{text}"
    );
}

const TLS: &str = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/n.pem\"\nkey = \"/p/n.key\"\n";

#[test]
fn a_connector_config_validates_with_policy_and_egress() {
    let c = parse_str(&format!(
        "[node]\nname = \"vpc-gw-1\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
         [egress]\ninterface = \"ens5\"\nport_range = \"40000-40999\"\n\
         [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 tcp/22\"]\n\
         advertise = [\"192.0.2.0/24\"]\n"
    ))
    .expect("valid");
    let t = c.tunnel.expect("tunnel");
    assert_eq!(
        t.policy[0].advertise,
        ["192.0.2.0/24".parse::<IpNet>().expect("net")]
    );
    assert_eq!(
        t.role,
        Role::Connector {
            listen: Some("0.0.0.0:7844".parse().expect("addr")),
            hubs: Vec::new(),
            source_port: 0,
        }
    );
    let e = t.egress.expect("egress");
    assert_eq!(
        (e.ports, e.table.as_str()),
        ((40000, 40999), "gateway_vpc_gw_1")
    );
    assert_eq!(t.tun, DEFAULT_TUN);
    assert_eq!(
        t.transport,
        Transport::Auto,
        "QUIC with the TCP fallback by default"
    );
    assert_eq!(t.quic_timeout, std::time::Duration::from_millis(1500));
    assert_eq!(t.fallback_port, None, "the fallback uses the tunnel's port");
}

#[test]
fn inbound_rules_and_a_site_gateways_table_are_read_and_checked() {
    let c = parse_str(&format!(
        "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
         [[policy]]\nidentity = \"ops-*\"\ninbound = [\"10.128.0.0/16 tcp/9100\"]\n"
    ))
    .expect("valid");
    let t = c.tunnel.expect("tunnel");
    assert_eq!(
        t.policy[0].inbound,
        vec![Rule::parse("10.128.0.0/16 tcp/9100").expect("rule")]
    );
    assert!(t.policy[0].allow.is_empty());
    let issue = only_issue(&format!(
        "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
         [[policy]]\nidentity = \"ops-*\"\ninbound = [\"10.128.0.0/16 tcp/0\"]\n"
    ));
    assert_eq!(issue.key, "policy[0].inbound[0]");

    let site = |client: &str| {
        format!(
            "[node]\nname = \"site-1\"\n[tunnel]\nconnect = [\"gw:1\"]\n{TLS}[client]\n{client}"
        )
    };
    let c = parse_str(&site("lan = [\"eth1\"]\n")).expect("valid");
    assert_eq!(
        c.tunnel.expect("tunnel").client_table.as_deref(),
        Some("gateway_site_1"),
        "a site gateway owns a table named after the node by default"
    );
    let c = parse_str(&site(
        "advertise = [\"192.0.2.0/24\"]\ntable = \"gw_site\"\n",
    ))
    .expect("valid");
    assert_eq!(
        c.tunnel.expect("tunnel").client_table.as_deref(),
        Some("gw_site")
    );
    let c = parse_str(&site("dns_stub = \"127.0.0.53:53\"\n")).expect("valid");
    assert_eq!(
        c.tunnel.expect("tunnel").client_table,
        None,
        "a workstation forwards nothing"
    );
    assert_eq!(only_issue(&site("table = \"t\"\n")).key, "client.table");
    assert_eq!(
        only_issue(&site("lan = [\"eth1\"]\ntable = \"a-b\"\n")).key,
        "client.table"
    );
}

#[test]
fn a_client_expects_the_name_or_address_it_dials_unless_told_otherwise() {
    let by_ip = parse_str(&format!(
        "[node]\nname = \"n\"\n[tunnel]\nconnect = [\"[2001:db8::1]:7844\"]\n{TLS}"
    ))
    .expect("an address is checked against the certificate's IP SANs");
    assert!(
        matches!(by_ip.tunnel.expect("tunnel").role, Role::Client { server_name, .. } if server_name == "2001:db8::1")
    );
    let issue = only_issue(&format!(
        "[node]\nname = \"n\"\n[tunnel]\nconnect = [\"gw:7844\"]\nserver_name = \"a b\"\n{TLS}"
    ));
    assert_eq!(issue.key, "tunnel.server_name");
    let c = parse_str(&format!(
        "[node]\nname = \"n\"\n[tunnel]\nconnect = [\"gw.example.net:7844\"]\nsource_port = 7844\n{TLS}"
    ))
    .expect("a host name is the server name");
    match c.tunnel.expect("tunnel").role {
        Role::Client {
            server_name,
            source_port,
            ..
        } => assert_eq!(
            (server_name.as_str(), source_port),
            ("gw.example.net", 7844)
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tunnel_mistakes_name_their_keys() {
    let cases = [
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\nconnect = [\"a:1\"]\n",
            "tunnel.connect",
        ),
        ("[tunnel]\nlisten = \"7844\"\n", "tunnel.listen"),
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\n[metrics]\nlisten = \"localhost\"\n",
            "metrics.listen",
        ),
        ("[tunnel]\nconnect = [\"gw\"]\n", "tunnel.connect[0]"),
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\n[[policy]]\nidentity = \"x\"\nallow = [\"10.0.0.0/8\", \"10.0.0.0/8 tcp/0\"]\n",
            "policy[0].allow[1]",
        ),
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\n[[policy]]\nidentity = \"x\"\nadvertise = [\"192.0.2.0/24\", \"192.0.2.1/24\"]\n",
            "policy[0].advertise[1]",
        ),
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\n[[policy]]\nidentity = \"x\"\nadvertise = [\"0.0.0.0/0\"]\n",
            "policy[0].advertise[0]",
        ),
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\n[egress]\ninterface = \"e\"\nport_range = \"1-99999\"\n",
            "egress.port_range",
        ),
        (
            "[tunnel]\nconnect = [\"gw:1\"]\n[egress]\ninterface = \"e\"\nport_range = \"40000-40001\"\n",
            "egress",
        ),
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\noverlay = \"100.64.0.0/31\"\n",
            "tunnel.overlay",
        ),
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\ntransport = \"udp\"\n",
            "tunnel.transport",
        ),
        (
            "[tunnel]\nlisten = \"0.0.0.0:1\"\ntransport = \"quic\"\nfallback_port = 443\n",
            "tunnel.fallback_port",
        ),
        (
            "[tunnel]\nconnect = [\"gw:1\"]\nquic_timeout_ms = 10\n",
            "tunnel.quic_timeout_ms",
        ),
    ];
    for (section, key) in cases {
        let issue = only_issue(&format!("[node]\nname = \"n\"\n{section}{TLS}"));
        assert_eq!(issue.key, key, "{section}: {issue}");
    }
    let issue = only_issue("[node]\nname = \"n\"\n[tunnel]\nlisten = \"0.0.0.0:1\"\n");
    assert_eq!(issue.key, "tls");
    let issue = only_issue("[node]\nname = \"n\"\nlog_level = \"loud\"\n");
    assert_eq!(issue.key, "node.log_level");
    let c = parse_str(
        "[node]\nname = \"n\"\nlog_level = \"debug\"\n[metrics]\nlisten = \"127.0.0.1:9469\"\n",
    )
    .expect("valid");
    assert_eq!(c.node.log_level, "debug");
    assert_eq!(c.metrics, Some("127.0.0.1:9469".parse().expect("addr")));
}

#[test]
fn reload_applies_routes_policy_and_zones_and_refuses_the_rest() {
    let base = format!(
        "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}\
         [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 tcp/22\"]\n"
    );
    let old = parse_str(&base).expect("valid");
    assert_eq!(reload_changes(&old, &old), Ok(ReloadChanges::default()));
    let more = parse_str(&format!(
        "{base}[[route]]\ncidr = \"10.129.0.0/16\"\n[[dns.zone]]\ndomain = \"x.internal\"\n\
         servers = [\"10.129.0.2\"]\n[[policy]]\nidentity = \"dev-*\"\nallow = [\"10.129.0.0/16\"]\n"
    ))
    .expect("valid");
    let changes = reload_changes(&old, &more).expect("reloadable");
    assert_eq!(
        changes,
        ReloadChanges {
            routes: true,
            policy: true,
            zones: true,
            crl: false,
        }
    );
    let with_crl = parse_str(&base.replace(
        "key = \"/p/n.key\"\n",
        "key = \"/p/n.key\"\ncrl = \"/p/crl.pem\"\n",
    ))
    .expect("valid");
    assert_eq!(
        reload_changes(&old, &with_crl).map(|c| c.crl),
        Ok(true),
        "[tls] crl applies live; ca, cert and key do not"
    );
    let other_ca = parse_str(&base.replace("/p/ca.pem", "/q/ca.pem")).expect("valid");
    assert_eq!(reload_changes(&old, &other_ca), Err(vec!["tls"]));
    assert!(changes.any());
    let moved = parse_str(&base.replace("0.0.0.0:7844", "0.0.0.0:7845")).expect("valid");
    assert_eq!(
        reload_changes(&old, &moved),
        Err(vec!["tunnel.listen/connect"])
    );
    let renamed = parse_str(&base.replace("name = \"gw\"", "name = \"gw2\"")).expect("valid");
    assert_eq!(reload_changes(&old, &renamed), Err(vec!["node"]));
}

#[test]
fn shipped_example_config_is_valid() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/gateway.toml"
    ));
    let c = load(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.routes.len(), 1);
    // `cargo xtask install` puts these in /etc/gateway/examples: they must load as shipped.
    for (example, connector) in [("connector.toml", true), ("client.toml", false)] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(example);
        let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
        let role = c.tunnel.expect("a tunnel").role;
        assert_eq!(
            matches!(role, Role::Connector { .. }),
            connector,
            "{example}"
        );
    }
}

#[test]
fn interface_names_follow_kernel_rules() {
    assert!(check_interface_name("eth0").is_ok());
    assert!(check_interface_name("a-very-long-nam").is_ok());
    assert!(check_interface_name("a-very-long-name").is_err());
    assert!(check_interface_name("").is_err());
    assert!(check_interface_name("..").is_err());
    assert!(check_interface_name("eth0:1").is_err());
}

#[test]
fn client_dns_chooses_resolved_or_none_and_never_points_resolved_at_itself() {
    let client = |lines: &str| {
        format!("[node]\nname = \"c\"\n[tunnel]\nconnect = [\"gw:1\"]\n{TLS}[client]\n{lines}")
    };
    let dns_of = |lines: &str| {
        parse_str(&client(lines))
            .expect("valid")
            .tunnel
            .expect("t")
            .dns
    };
    assert_eq!(dns_of(""), HostDns::Auto);
    assert_eq!(dns_of("dns = \"resolved\"\n"), HostDns::Resolved);
    assert_eq!(dns_of("dns = \"none\"\n"), HostDns::None);
    // Without resolved the operator may put the stub anywhere, 127.0.0.53 included.
    assert_eq!(
        dns_of("dns = \"none\"\ndns_stub = \"127.0.0.53:53\"\n"),
        HostDns::None
    );
    assert_eq!(
        dns_of("dns_stub = \"127.0.0.2:53\"\ndns = \"resolved\"\n"),
        HostDns::Resolved
    );
    for stub in ["127.0.0.53:53", "127.0.0.54:53", "127.0.0.53:5353"] {
        let issue = only_issue(&client(&format!(
            "dns = \"resolved\"\ndns_stub = \"{stub}\"\n"
        )));
        assert_eq!(issue.key, "client.dns_stub", "{stub}");
        assert!(
            issue.reason.contains("resolved would ask itself"),
            "{issue}"
        );
    }
    assert_eq!(only_issue(&client("dns = \"dnsmasq\"\n")).key, "client.dns");
    let connector = format!(
        "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"0.0.0.0:7844\"\n{TLS}[client]\ndns = \"resolved\"\n"
    );
    assert_eq!(only_issue(&connector).key, "client.dns");

    // A change takes a restart: resolved's link settings belong to the TUN the daemon made.
    let old = parse_str(&client("")).expect("valid");
    let new = parse_str(&client("dns = \"none\"\n")).expect("valid");
    assert_eq!(reload_changes(&old, &new), Err(vec!["client.dns"]));
}
