//! `[client] dns = "resolved"` against a real systemd-resolved (see `common/resolved_lab.rs`
//! for how it runs without touching the host), checked the way a user would: resolvectl,
//! busctl, dig and `gatewayctl status`.

mod common;
#[path = "common/pair.rs"]
mod pair;
#[path = "common/resolved_lab.rs"]
mod resolved_lab;

use std::process::Command;
use std::time::Duration;

use common::*;
use gateway_lab::{Host, addr, zone};
use resolved_lab::*;

#[test]
fn resolved_sends_the_zone_to_the_stub_through_the_tunnel_and_forgets_the_link_on_stop() {
    let t = tunnel();
    let lab = &t.lab;
    let mut resolved = Resolved::bus(lab);
    resolved.start(lab);
    let mut client = start_client(&t, &resolved);

    let r = resolved_status(&t, Duration::from_secs(10), |r| !r.domains.is_empty());
    assert!(r.on && r.error.is_none(), "{r:?}");
    assert_eq!(r.domains, [zone::DOMAIN]);
    let stub = r.stub.clone().expect("stub");
    assert!(
        stub.starts_with("127.0.0.1:") && !stub.ends_with(":0"),
        "{stub}"
    );

    // What resolved says about the TUN link, as a user would ask.
    let out = resolved.resolvectl(lab, &["status", "optun"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr_of(&out));
    assert!(text.contains(&format!("DNS Servers: {stub}")), "{text}");
    assert!(
        text.contains(&format!("DNS Domain: ~{}", zone::DOMAIN)),
        "{text}"
    );
    assert!(text.contains("-DefaultRoute"), "{text}");
    assert!(text.contains("-LLMNR") && text.contains("-mDNS"), "{text}");
    let ifindex = lab
        .run_ok(Host::Operator, &["cat", "/sys/class/net/optun/ifindex"])
        .expect("ifindex");
    let ifindex = ifindex.trim();
    assert_eq!(
        resolved.link_property(lab, ifindex, "Domains"),
        format!("a(sb) 1 \"{}\" true", zone::DOMAIN)
    );
    assert_eq!(
        resolved.link_property(lab, ifindex, "DefaultRoute"),
        "b false"
    );

    // A query through resolved (its D-Bus API, then its stub at 127.0.0.53) reaches the
    // private resolver through the tunnel.
    let before = zone_queries(&t);
    let db = format!("db.{}", zone::DOMAIN);
    let out = resolved.resolvectl(lab, &["query", "--cache=no", &db]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr_of(&out));
    assert!(text.contains(zone::DB_PRIVATE), "{text}");
    let dig = lab
        .run_ok(
            Host::Operator,
            &["dig", "+short", "+time=2", "+tries=2", "@127.0.0.53", &db],
        )
        .expect("dig");
    assert_eq!(dig.trim(), zone::DB_PRIVATE);
    assert!(zone_queries(&t) > before, "the connector answered none");
    // Other names are not the tunnel's: the link is no default route.
    let out = resolved.resolvectl(lab, &["query", "--cache=no", "www.example.net"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A connector reload that adds a zone reaches resolved: the link's domains follow.
    let text = std::fs::read_to_string(&t.connector_config).expect("config");
    std::fs::write(
        &t.connector_config,
        format!(
            "{text}\n[[dns.zone]]\ndomain = \"corp.example\"\nservers = [\"{}\"]\n",
            addr::RESOLVER_PRIMARY
        ),
    )
    .expect("config");
    t.connector.signal(libc::SIGHUP).expect("SIGHUP");
    let r = resolved_status(&t, Duration::from_secs(10), |r| r.domains.len() == 2);
    assert_eq!(r.domains, [zone::DOMAIN, "corp.example"]);
    let out = resolved.resolvectl(lab, &["domain", "optun"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("~{} ~corp.example", zone::DOMAIN)),
        "{text}"
    );

    // Stopped, the client reverts the link (while it still exists) and resolved has nothing
    // of it left.
    stop_cleanly(&mut client);
    assert!(
        resolved.log().contains("member=RevertLink"),
        "resolved was not asked to revert the link:\n{}",
        resolved.log()
    );
    assert!(
        !client
            .log()
            .contains("reverting the TUN link in systemd-resolved failed"),
        "{}",
        client.log()
    );
    let out = resolved.resolvectl(lab, &["domain"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(zone::DOMAIN), "{text}");
    let out = resolved.resolvectl(lab, &["dns"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&stub));
    let out = lab
        .run(
            Host::Operator,
            &["dig", "+short", "+time=1", "+tries=1", "@127.0.0.53", &db],
        )
        .expect("dig");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(zone::DB_PRIVATE),
        "still answered after stop"
    );
}

#[test]
fn a_client_asking_for_resolved_starts_without_it_says_why_and_sets_the_link_once_it_runs() {
    let t = tunnel();
    let lab = &t.lab;
    let mut resolved = Resolved::bus(lab);
    let _client = start_client(&t, &resolved);

    let r = resolved_status(&t, Duration::from_secs(10), |r| r.error.is_some());
    assert!(r.on && r.domains.is_empty(), "{r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(error.contains("systemd-resolved is not running"), "{error}");
    let out = gatewayctl(
        lab,
        Host::Operator,
        &[
            "status",
            "--socket",
            t.client_socket.to_str().expect("utf-8"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("systemd-resolved: NOT SET: systemd-resolved is not running"),
        "{text}"
    );

    // resolved comes up later (a laptop's boot, a restart): the client retries every 5 s.
    resolved.start(lab);
    let r = resolved_status(&t, Duration::from_secs(15), |r| r.error.is_none());
    assert_eq!(r.domains, [zone::DOMAIN], "{r:?}");
    let out = resolved.resolvectl(lab, &["domain", "optun"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("~{}", zone::DOMAIN)), "{text}");
}

#[test]
fn an_unset_dns_uses_resolved_when_it_runs() {
    let t = tunnel();
    let lab = &t.lab;
    let text = std::fs::read_to_string(&t.client_config).expect("config");
    std::fs::write(&t.client_config, text.replace("dns = \"resolved\"\n", "")).expect("config");
    let mut resolved = Resolved::bus(lab);
    resolved.start(lab);
    let _client = start_client(&t, &resolved);
    let r = resolved_status(&t, Duration::from_secs(10), |r| !r.domains.is_empty());
    assert!(r.on, "{r:?}");
    assert!(r.reason.contains("on the system bus"), "{r:?}");
    let dig = lab
        .run_ok(
            Host::Operator,
            &[
                "dig",
                "+short",
                "+time=2",
                "+tries=2",
                "@127.0.0.53",
                &format!("db.{}", zone::DOMAIN),
            ],
        )
        .expect("dig");
    assert_eq!(dig.trim(), zone::DB_PRIVATE);
}

/// As the unit runs it — user `daemon` standing in for `gateway`, the unit's capabilities
/// only — resolved asks polkit: refused until the shipped rule is installed (status says so
/// and names the rule), then set at the next retry.
#[test]
fn a_client_run_as_the_units_user_sets_the_link_once_polkit_allows_it() {
    let t = tunnel();
    let lab = &t.lab;
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/gatewayd.service"
    ))
    .expect("unit");
    let caps = |key: &str| -> String {
        let caps: Vec<String> = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in the unit"))
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        format!("-all,{}", caps.join(","))
    };
    let (bounding, ambient) = (caps("CapabilityBoundingSet="), caps("AmbientCapabilities="));
    // /dev/net/tun may be 0600 without udev: a 0666 node of the test's own, bind-mounted in
    // the client's private mount namespace.
    let node = lab.dir().join("tun-node");
    lab.run_ok(
        Host::Operator,
        &[
            "mknod",
            "-m",
            "0666",
            node.to_str().expect("utf-8"),
            "c",
            "10",
            "200",
        ],
    )
    .expect("mknod");
    let out = Command::new("chown")
        .args(["-R", "daemon:daemon"])
        .arg(lab.dir())
        .output()
        .expect("chown");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mount = format!(
        "mount --bind {} /dev/net/tun && exec \"$@\"",
        node.display()
    );

    let mut resolved = Resolved::bus(lab);
    let polkitd = resolved.polkit(lab);
    resolved.start(lab);
    let client = start_client_wrapped(
        &t,
        &resolved,
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &mount,
            "sh",
            "setpriv",
            "--reuid=daemon",
            "--regid=daemon",
            "--clear-groups",
            "--bounding-set",
            &bounding,
            "--inh-caps",
            &ambient,
            "--ambient-caps",
            &ambient,
        ],
    );
    let uid = std::fs::read_to_string(format!("/proc/{}/status", client.id()))
        .expect("proc status")
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string());
    assert_eq!(uid.as_deref(), Some("1"), "the client runs as daemon");

    let r = resolved_status(&t, Duration::from_secs(10), |r| r.error.is_some());
    let error = r.error.clone().unwrap_or_default();
    assert!(
        error.contains("install systemd/gatewayd-resolved.rules"),
        "{error}"
    );
    assert!(r.domains.is_empty(), "{r:?}");

    Resolved::allow(&polkitd, "daemon");
    let r = resolved_status(&t, Duration::from_secs(15), |r| r.error.is_none());
    assert_eq!(r.domains, [zone::DOMAIN], "{r:?}");
    let dig = lab
        .run_ok(
            Host::Operator,
            &[
                "dig",
                "+short",
                "+time=2",
                "+tries=2",
                "@127.0.0.53",
                &format!("db.{}", zone::DOMAIN),
            ],
        )
        .expect("dig");
    assert_eq!(dig.trim(), zone::DB_PRIVATE);
    let mut client = client;
    stop_cleanly(&mut client);
    let out = resolved.resolvectl(lab, &["domain"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(zone::DOMAIN));
    assert!(
        resolved.log().contains("member=RevertLink"),
        "{}",
        resolved.log()
    );
}

/// A link index names a link only in resolved's own network namespace: a client in another
/// one (a lab, a container sharing the host's bus) leaves resolved alone and says why.
#[test]
fn resolved_in_another_network_namespace_is_left_alone() {
    let t = tunnel();
    let lab = &t.lab;
    let text = std::fs::read_to_string(&t.client_config).expect("config");
    std::fs::write(&t.client_config, text.replace("dns = \"resolved\"\n", "")).expect("config");
    let mut resolved = Resolved::bus(lab);
    resolved.start_in(lab, Host::VpcGateway);
    let _client = start_client(&t, &resolved);
    let r = resolved_status(&t, Duration::from_secs(10), |_| true);
    assert!(!r.on, "{r:?}");
    assert!(r.reason.contains("another network namespace"), "{r:?}");
    assert!(
        !resolved.log().contains("member=SetLinkDNSEx"),
        "{}",
        resolved.log()
    );
}
