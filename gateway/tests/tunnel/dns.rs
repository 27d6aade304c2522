//! Private DNS through the tunnel: the stub, failover, TCP retry, SERVFAIL modes, steering of the normal resolver's queries, and a sustained load.

use super::*;

pub(crate) fn dig(lab: &Lab, args: &[&str]) -> String {
    let mut argv = vec!["dig", "@127.0.0.53", "+time=5", "+tries=1"];
    argv.extend_from_slice(args);
    let out = lab.run(Host::Operator, &argv).expect("dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn resolver_log(lab: &Lab, which: &str) -> String {
    std::fs::read_to_string(lab.dir().join(format!("unbound-{which}/unbound.log")))
        .unwrap_or_default()
}

#[test]
fn private_zone_resolves_through_the_tunnel_with_failover_and_tcp_retry() {
    let t = start();
    let lab = &t.lab;
    let db = format!("db.{}", zone::DOMAIN);
    assert_eq!(dig(lab, &["+short", &db]).trim(), zone::DB_PRIVATE);
    // Outside the zone: refused by the stub, never sent to the private resolvers.
    assert!(dig(lab, &["www.example.com"]).contains("status: REFUSED"));
    for which in ["primary", "secondary"] {
        assert!(
            !resolver_log(lab, which).contains("www.example.com"),
            "{which} saw it"
        );
    }
    // SERVFAIL from the primary: the secondary answers (the default, stub-resolver semantics).
    let broken = format!("{}.{}", zone::BROKEN, zone::DOMAIN);
    assert_eq!(dig(lab, &["+short", &broken]).trim(), zone::BROKEN_ANSWER);
    // Over 2 KB: the forwarder retried over TCP and the whole answer came through.
    let big = format!("{}.{}", zone::BIG, zone::DOMAIN);
    let out = dig(lab, &["+short", "+bufsize=4096", &big, "TXT"]);
    assert_eq!(out.lines().count(), 12, "{out}");

    // The primary stops: answers come from the secondary within 3 s, then without waiting.
    let conf = lab.dir().join("unbound-primary/unbound.conf");
    lab.run(Host::Vpc, &["pkill", "-f", conf.to_str().expect("utf-8")])
        .expect("pkill");
    let which = format!("which.{}", zone::DOMAIN);
    let started = Instant::now();
    assert_eq!(dig(lab, &["+short", &which, "TXT"]).trim(), "\"secondary\"");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(dig(lab, &["+short", &which, "TXT"]).trim(), "\"secondary\"");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a later query waited for the primary: {:?}",
        started.elapsed()
    );
    let status = status_json(lab, Host::VpcGateway, &t.connector_socket);
    let z = &status.tunnel.expect("tunnel").zones[0];
    assert_eq!(z.domain, zone::DOMAIN);
    assert!(!z.resolvers[0].up && z.resolvers[1].up, "{z:?}");
    assert!(
        z.failovers >= 2 && z.queries == 5 && z.answers == 5,
        "{z:?}"
    );
}

/// Queries sent to the hosts' normal resolver (the public one in the underlay): names under the
/// private zone are steered by eBPF into the tunnel and answered by the VPC's resolvers, as if
/// from the resolver asked; every other name goes to the normal resolver, untouched.
#[test]
fn private_names_sent_to_the_normal_resolver_are_answered_privately() {
    private_names_are_answered_privately(&start_with(true), AttachKind::Tcx);
}

pub(crate) fn private_names_are_answered_privately(t: &TunnelLab, mode: AttachKind) {
    let lab = &t.lab;
    let db = format!("db.{}", zone::DOMAIN);
    for host in [Host::Operator, Host::Office] {
        let out = lab
            .run_ok(host, &["dig", "+time=3", "+tries=1", &db])
            .expect("dig via resolv.conf");
        assert!(
            out.contains(&format!("SERVER: {}#53", addr::PUBLIC_DNS)),
            "{out}"
        );
        let answer: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&db))
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        assert_eq!(answer, [zone::DB_PRIVATE], "{host:?}: {out}");
        let out = lab
            .run_ok(
                host,
                &["dig", "+short", "+time=3", "+tries=1", "www.example.com"],
            )
            .expect("dig");
        assert_eq!(out.trim(), zone::WWW_EXAMPLE, "{host:?}");
    }
    for which in ["primary", "secondary"] {
        assert!(
            !resolver_log(lab, which).contains("www.example.com"),
            "{which} saw it"
        );
    }
    let public =
        std::fs::read_to_string(lab.dir().join("unbound-public/unbound.log")).unwrap_or_default();
    assert!(
        !public.contains("db.hoge-vpc.com"),
        "the private name leaked to the public resolver"
    );
    let status = status_json(lab, Host::Operator, &t.client_socket);
    assert!(
        status.classifier.get("dns_steered").copied().unwrap_or(0) >= 2,
        "{:?}",
        status.classifier
    );
    assert_eq!(attached_via(&status.dns_egress[0]), mode);
}

#[test]
fn on_servfail_return_gives_servfail_and_spares_the_secondary() {
    let t = start_servfail("return");
    let lab = &t.lab;
    let broken = format!("{}.{}", zone::BROKEN, zone::DOMAIN);
    assert!(dig(lab, &[&broken]).contains("status: SERVFAIL"));
    assert!(resolver_log(lab, "primary").contains(&broken));
    assert!(
        !resolver_log(lab, "secondary").contains(&broken),
        "the secondary was asked"
    );
}

/// A sustained query load at the private zone through the stub: every query answered, none
/// lost, and the forwarder still on its small pinned socket pool.
#[test]
fn sustained_dns_load_loses_no_query() {
    let t = start();
    let lab = &t.lab;
    let names: String = ["db", "ssh", "which"]
        .iter()
        .map(|n| format!("{n}.{} A\n", zone::DOMAIN))
        .collect();
    let file = lab.dir().join("queries.txt");
    std::fs::write(&file, names).expect("query file");
    let out = lab
        .run_ok(
            Host::Operator,
            &[
                "dnsperf",
                "-s",
                "127.0.0.53",
                "-d",
                file.to_str().expect("utf-8"),
                "-l",
                "4",
                "-Q",
                "2000",
            ],
        )
        .expect("dnsperf");
    let field = |name: &str| -> u64 {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in dnsperf output:\n{out}"))
    };
    let (sent, completed, lost) = (
        field("Queries sent"),
        field("Queries completed"),
        field("Queries lost"),
    );
    assert!(sent > 4000, "{out}");
    assert_eq!(lost, 0, "{out}");
    assert_eq!(completed, sent, "{out}");
    let status = status_json(lab, Host::VpcGateway, &t.connector_socket);
    let z = &status.tunnel.expect("tunnel").zones[0];
    assert_eq!(z.servfails, 0, "{z:?}");
}
