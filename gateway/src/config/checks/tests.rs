//! One test per kind of mistake: the config is refused (or warned about) naming file, key and
//! a reason an operator can act on.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, ConfigIssue, parse};

const FILE: &str = "/etc/gateway/test.toml";
const TLS: &str = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/n.pem\"\nkey = \"/p/n.key\"\n";
const EGRESS: &str = "[egress]\ninterface = \"ens5\"\nport_range = \"40000-40999\"\n";

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new(FILE), text)
}

/// A connector listening on `listen`, with `extra` appended.
fn connector(listen: &str, extra: &str) -> String {
    format!(
        "[node]\nname = \"gw\"\n[tunnel]\nlisten = \"{listen}\"\n{TLS}{EGRESS}\
         [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16\"]\n{extra}"
    )
}

fn client(extra_client: &str, tunnel_extra: &str) -> String {
    format!(
        "[node]\nname = \"op\"\n[tunnel]\nconnect = [\"gw.example.net:7844\"]\n{tunnel_extra}\
         {TLS}[client]\n{extra_client}"
    )
}

/// The one error `text` gets; fails the test if it is accepted or gets several.
fn refused(text: &str) -> ConfigIssue {
    let err = parse_str(text).expect_err("config should be refused");
    assert_eq!(err.0.len(), 1, "expected one issue, got:\n{err}");
    let issue = err.0.into_iter().next().expect("one issue");
    assert_eq!(issue.file, PathBuf::from(FILE));
    issue
}

fn assert_refused(text: &str, key: &str, reason: &str) {
    let issue = refused(text);
    assert_eq!(issue.key, key, "{issue}");
    assert!(issue.reason.contains(reason), "{issue}");
}

fn warnings(text: &str) -> Vec<ConfigIssue> {
    parse_str(text)
        .unwrap_or_else(|e| panic!("config should be valid:\n{e}"))
        .warnings
}

#[test]
fn a_plain_connector_has_no_errors_and_no_warnings() {
    let text = connector(
        "0.0.0.0:7844",
        "[[route]]\ncidr = \"10.128.0.0/16\"\n[metrics]\nlisten = \"127.0.0.1:9469\"\n\
         [[dns.zone]]\ndomain = \"hoge-vpc.com\"\nservers = [\"10.128.0.61\", \"10.128.0.130\"]\n",
    );
    assert_eq!(warnings(&text), vec![]);
}

#[test]
fn refuses_default_routes_on_a_connector() {
    for cidr in ["0.0.0.0/0", "::/0"] {
        let text = connector("0.0.0.0:7844", &format!("[[route]]\ncidr = \"{cidr}\"\n"));
        assert_refused(&text, "route[0].cidr", "is a default route");
    }
    // A classifier-only node only counts what matches: a default route counts everything.
    parse_str("[node]\nname = \"n\"\n[[route]]\ncidr = \"0.0.0.0/0\"\n").expect("counting only");
}

#[test]
fn refuses_routes_over_loopback_link_local_and_multicast() {
    for (cidr, what) in [
        ("0.0.0.0/1", "\"this network\""),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("128.0.0.0/1", "link-local"),
        ("239.1.0.0/16", "multicast"),
        ("::/1", "unspecified"),
        ("fe80::/64", "link-local"),
        ("ff02::/16", "multicast"),
    ] {
        let text = connector("0.0.0.0:7844", &format!("[[route]]\ncidr = \"{cidr}\"\n"));
        assert_refused(&text, "route[0].cidr", what);
    }
}

#[test]
fn refuses_an_overlay_equal_to_or_overlapping_a_route() {
    for (overlay, route) in [
        ("100.64.0.0/24", "100.64.0.0/24"),
        ("100.64.0.0/24", "100.64.0.0/10"),
        ("10.128.5.0/24", "10.128.0.0/16"),
    ] {
        let text = connector("0.0.0.0:7844", &format!("[[route]]\ncidr = \"{route}\"\n")).replace(
            "[tunnel]\n",
            &format!("[tunnel]\noverlay = \"{overlay}\"\n"),
        );
        assert_refused(&text, "tunnel.overlay", "overlaps route[0]");
    }
    let text = connector(
        "0.0.0.0:7844",
        "[[route]]\ncidr = \"10.128.0.0/16\"\n[[route]]\ncidr = \"fd00::/8\"\n",
    );
    assert_refused(&text, "tunnel.overlay_v6", "overlaps route[1] fd00::/8");
}

#[test]
fn refuses_a_connector_listening_inside_its_own_routes() {
    let text = connector("10.128.0.5:7844", "[[route]]\ncidr = \"10.128.0.0/16\"\n");
    assert_refused(&text, "tunnel.listen", "inside route[0]");
}

#[test]
fn refuses_a_tun_named_lo_or_after_another_configured_interface() {
    let tun = |name: &str, text: String| {
        text.replace("[tunnel]\n", &format!("[tunnel]\ntun = \"{name}\"\n"))
    };
    assert_refused(
        &tun("lo", connector("0.0.0.0:7844", "")),
        "tunnel.tun",
        "loopback",
    );
    assert_refused(
        &tun("ens5", connector("0.0.0.0:7844", "")),
        "tunnel.tun",
        "is also egress.interface",
    );
    assert_refused(
        &tun(
            "eth1",
            connector("0.0.0.0:7844", "[dataplane]\ninterfaces = [\"eth1\"]\n"),
        ),
        "tunnel.tun",
        "is also dataplane.interfaces[0]",
    );
    assert_refused(
        &tun("lan0", client("lan = [\"lan0\"]\n", "")),
        "tunnel.tun",
        "is also client.lan[0]",
    );
}

#[test]
fn warns_about_relative_tls_paths() {
    let text = connector("0.0.0.0:7844", "").replace("\"/p/n.key\"", "\"pki/n.key\"");
    let w = warnings(&text);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].key, "tls.key");
    assert!(w[0].reason.contains("relative"), "{}", w[0]);
}

fn zone(domain: &str, servers: &str) -> String {
    connector(
        "0.0.0.0:7844",
        &format!("[[dns.zone]]\ndomain = \"{domain}\"\nservers = [{servers}]\n"),
    )
}

#[test]
fn takes_ipv6_resolvers_and_refuses_unusable_ones() {
    assert!(
        crate::config::parse(
            std::path::Path::new("/t.toml"),
            &zone("hoge-vpc.com", "\"10.128.0.61\", \"fd00:128::53\"")
        )
        .is_ok()
    );
    assert_refused(
        &zone("hoge-vpc.com", "\"10.128.0.61\", \"ff02::1\""),
        "dns.zone[0].servers[1]",
        "not a unicast address",
    );
}

#[test]
fn refuses_duplicate_unusable_and_too_many_resolvers() {
    assert_refused(
        &zone("hoge-vpc.com", "\"10.128.0.61\", \"10.128.0.61\""),
        "dns.zone[0].servers[1]",
        "already servers[0]",
    );
    for bad in ["0.0.0.0", "224.0.0.251", "255.255.255.255"] {
        assert_refused(
            &zone("hoge-vpc.com", &format!("\"{bad}\"")),
            "dns.zone[0].servers[0]",
            "not a unicast address",
        );
    }
    assert_refused(
        &zone("hoge-vpc.com", "\"100.64.0.9\""),
        "dns.zone[0].servers[0]",
        "inside tunnel.overlay",
    );
    let many: Vec<String> = (0..=super::MAX_ZONE_SERVERS)
        .map(|i| format!("\"10.128.1.{}\"", i + 1))
        .collect();
    assert_refused(
        &zone("hoge-vpc.com", &many.join(", ")),
        "dns.zone[0].servers",
        "asks at most 64",
    );
    let enough: Vec<String> = (0..super::MAX_ZONE_SERVERS)
        .map(|i| format!("\"10.128.1.{}\"", i + 1))
        .collect();
    parse_str(&zone("hoge-vpc.com", &enough.join(", "))).expect("64 is the limit");
}

#[test]
fn refuses_zones_that_are_not_dns_names() {
    for (domain, why) in [
        ("hoge vpc.com", "' ' in label"),
        ("*.hoge-vpc.com", "'*'"),
        ("-x.hoge-vpc.com", "starts or ends with '-'"),
        ("hoge-vpc-.com", "starts or ends with '-'"),
        ("bücher.example", "xn--"),
        ("a/b.com", "'/'"),
    ] {
        assert_refused(&zone(domain, "\"10.128.0.61\""), "dns.zone[0].domain", why);
    }
    for ok in [
        "0.128.10.in-addr.arpa",
        "_msdcs.corp",
        "corp",
        "xn--bcher-kva.example",
    ] {
        parse_str(&zone(ok, "\"10.128.0.61\"")).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn refuses_more_zones_than_the_ebpf_map_holds() {
    let zones: String = (0..=gateway_common::MAX_DNS_ZONES)
        .map(|i| format!("[[dns.zone]]\ndomain = \"z{i}.corp\"\nservers = [\"10.128.0.61\"]\n"))
        .collect();
    assert_refused(&connector("0.0.0.0:7844", &zones), "dns.zone", "holds 256");
}

#[test]
fn warns_about_zones_too_deep_for_ebpf_steering() {
    let deep: Vec<String> = (0..gateway_common::MAX_DNS_LABELS)
        .map(|i| format!("l{i}"))
        .collect();
    let w = warnings(&zone(&deep.join("."), "\"10.128.0.61\""));
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].key, "dns.zone[0].domain");
    assert!(w[0].reason.contains("eBPF steering"), "{}", w[0]);
}

#[test]
fn duplicate_zones_and_routes_stay_refused() {
    assert_refused(
        &connector(
            "0.0.0.0:7844",
            "[[dns.zone]]\ndomain = \"a.corp\"\nservers = [\"10.0.0.2\"]\n\
             [[dns.zone]]\ndomain = \"A.corp.\"\nservers = [\"10.0.0.2\"]\n",
        ),
        "dns.zone[1].domain",
        "listed twice",
    );
    assert_refused(
        &connector(
            "0.0.0.0:7844",
            "[[route]]\ncidr = \"10.128.0.0/16\"\n[[route]]\ncidr = \"10.128.0.0/16\"\n",
        ),
        "route[1].cidr",
        "already configured as route[0]",
    );
}

#[test]
fn warns_about_metrics_beyond_loopback_unless_allowed() {
    for listen in ["0.0.0.0:9469", "[::]:9469", "10.128.0.5:9469"] {
        let text = connector(
            "0.0.0.0:7844",
            &format!("[metrics]\nlisten = \"{listen}\"\n"),
        );
        let w = warnings(&text);
        assert_eq!(w.len(), 1, "{listen}: {w:?}");
        assert_eq!(w[0].key, "metrics.listen");
        assert!(w[0].reason.contains("without authentication"), "{}", w[0]);
        assert!(
            w[0].to_string()
                .starts_with(&format!("{FILE}: metrics.listen: ")),
            "{}",
            w[0]
        );
        let allowed = text.replace("[metrics]\n", "[metrics]\nallow_remote = true\n");
        assert_eq!(
            warnings(&allowed),
            vec![],
            "{listen}: allow_remote silences it"
        );
    }
    for listen in ["127.0.0.1:9469", "[::1]:9469", "127.0.0.53:9469"] {
        let text = connector(
            "0.0.0.0:7844",
            &format!("[metrics]\nlisten = \"{listen}\"\n"),
        );
        assert_eq!(warnings(&text), vec![], "{listen}");
    }
}

#[test]
fn refuses_metrics_on_the_tunnels_tcp_port_or_inside_the_egress_range() {
    assert_refused(
        &connector("0.0.0.0:7844", "[metrics]\nlisten = \"127.0.0.1:7844\"\n"),
        "metrics.listen",
        "tunnel's TCP port 7844",
    );
    // With transport = "quic" nothing listens on TCP 7844.
    parse_str(
        &connector("0.0.0.0:7844", "[metrics]\nlisten = \"127.0.0.1:7844\"\n")
            .replace("[tunnel]\n", "[tunnel]\ntransport = \"quic\"\n"),
    )
    .expect("no TCP listener to collide with");
    assert_refused(
        &connector("0.0.0.0:7844", "[metrics]\nlisten = \"127.0.0.1:40500\"\n"),
        "metrics.listen",
        "inside egress.port_range",
    );
}

#[test]
fn refuses_an_egress_range_holding_the_tunnel_port() {
    let text = connector("0.0.0.0:40100", "");
    let err = parse_str(&text).expect_err("refused");
    let keys: Vec<_> = err.0.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["egress.port_range", "egress.port_range"], "{err}");
    assert!(err.0[0].reason.contains("UDP port 40100"), "{err}");
    assert!(err.0[1].reason.contains("TCP port 40100"), "{err}");
    assert_refused(
        &connector("0.0.0.0:7844", "").replace("[tunnel]\n", "[tunnel]\nfallback_port = 40443\n"),
        "egress.port_range",
        "TCP port 40443",
    );
}

#[test]
fn refuses_loopback_as_the_egress_interface() {
    assert_refused(
        &connector("0.0.0.0:7844", "").replace("interface = \"ens5\"", "interface = \"lo\""),
        "egress.interface",
        "loopback",
    );
}

#[test]
fn refuses_client_mistakes_advertise_default_duplicates_and_too_many_lans() {
    assert_refused(
        &client("advertise = [\"0.0.0.0/0\"]\n", ""),
        "client.advertise[0]",
        "default route",
    );
    assert_refused(
        &client("advertise = [\"192.0.2.0/24\", \"192.0.2.0/24\"]\n", ""),
        "client.advertise[1]",
        "already client.advertise[0]",
    );
    assert_refused(
        &client("lan = [\"eth1\", \"eth1\"]\n", ""),
        "client.lan[1]",
        "already client.lan[0]",
    );
    let lans: Vec<String> = (0..=gateway_common::MAX_REDIRECTS)
        .map(|i| format!("\"lan{i}\""))
        .collect();
    assert_refused(
        &client(&format!("lan = [{}]\n", lans.join(", ")), ""),
        "client",
        "redirect map holds 64",
    );
}
