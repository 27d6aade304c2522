//! The lab itself: its real servers answer what a user would ask, the underlay routes only what
//! it is told to, and nothing of a lab outlives it.

use gateway_lab::{Host, Lab, LabOptions, addr, zone};

fn namespaces() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn servers_answer_from_the_office_over_the_direct_path() {
    let lab = Lab::start(LabOptions::default()).expect("lab");

    let ssh = lab.ssh_argv(
        addr::VPC_HOST,
        "echo hello from $(cat /proc/sys/kernel/ostype)",
    );
    let ssh: Vec<&str> = ssh.iter().map(String::as_str).collect();
    let out = lab.run_ok(Host::Office, &ssh).expect("ssh");
    assert_eq!(out.trim(), "hello from Linux");

    let which = format!("which.{}", zone::DOMAIN);
    for (server, expected) in [
        (addr::RESOLVER_PRIMARY, "\"primary\""),
        (addr::RESOLVER_SECONDARY, "\"secondary\""),
    ] {
        let at = format!("@{server}");
        let out = lab
            .run_ok(Host::Office, &["dig", "+short", &at, &which, "TXT"])
            .expect("dig");
        assert_eq!(out.trim(), expected, "{server}");
    }
    // broken.hoge-vpc.com: SERVFAIL from the primary, an answer from the secondary.
    let broken = format!("{}.{}", zone::BROKEN, zone::DOMAIN);
    let out = lab
        .run(
            Host::Office,
            &[
                "dig",
                "+time=2",
                "+tries=1",
                &format!("@{}", addr::RESOLVER_PRIMARY),
                &broken,
            ],
        )
        .expect("dig");
    assert!(String::from_utf8_lossy(&out.stdout).contains("status: SERVFAIL"));
    let out = lab
        .run_ok(
            Host::Office,
            &[
                "dig",
                "+short",
                &format!("@{}", addr::RESOLVER_SECONDARY),
                &broken,
            ],
        )
        .expect("dig");
    assert_eq!(out.trim(), zone::BROKEN_ANSWER);
    // big.hoge-vpc.com is over 2 KB: complete over TCP.
    let big = format!("{}.{}", zone::BIG, zone::DOMAIN);
    let out = lab
        .run_ok(
            Host::Office,
            &[
                "dig",
                "+tcp",
                "+short",
                &format!("@{}", addr::RESOLVER_PRIMARY),
                &big,
                "TXT",
            ],
        )
        .expect("dig");
    assert_eq!(out.lines().count(), 12, "{out}");

    // The office's own resolver is the public one: it gives the public answer for the
    // private name, the leak split DNS exists to prevent.
    let db = format!("db.{}", zone::DOMAIN);
    let out = lab
        .run_ok(Host::Office, &["dig", "+short", &db])
        .expect("dig via resolv.conf");
    assert_eq!(out.trim(), zone::DB_PUBLIC);

    for target in [addr::VPC_HOST, addr::VPC_HOST_V6] {
        lab.run_ok(
            Host::Office,
            &["ping", "-q", "-c", "2", "-i", "0.2", "-W", "2", target],
        )
        .expect("ping");
    }

    for reverse in [false, true] {
        let mut argv = vec!["iperf3", "-c", addr::VPC_HOST, "-t", "1", "-J"];
        if reverse {
            argv.push("-R");
        }
        let out = lab.run_ok(Host::Office, &argv).expect("iperf3");
        let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 json");
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .expect("bits_per_second");
        assert!(bps > 0.0, "reverse={reverse}: {bps}");
    }
}

#[test]
fn without_the_direct_route_the_vpc_is_unreachable() {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: false,
    })
    .expect("lab");
    let out = lab
        .run(
            Host::Office,
            &["ping", "-c", "1", "-W", "1", addr::VPC_HOST],
        )
        .expect("ping");
    assert!(
        !out.status.success(),
        "10.128.0.10 reachable without a route"
    );
    // The rest of the path still works.
    lab.run_ok(Host::Office, &["ping", "-c", "1", "-W", "2", addr::GW_WAN])
        .expect("gateway's public address reachable");
}

#[test]
fn dropping_a_lab_removes_its_namespaces_even_after_a_panic() {
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::start(LabOptions {
            servers: false,
            ..LabOptions::default()
        })
        .expect("lab");
        let mut n = names.lock().expect("lock");
        n.extend(Host::ALL.iter().map(|h| lab.ns(*h)));
        drop(n);
        assert!(namespaces().contains(&lab.ns(Host::Vpc)));
        panic!("a failing test");
    });
    assert!(result.is_err());
    let left = namespaces();
    for ns in names.lock().expect("lock").iter() {
        assert!(!left.contains(ns.as_str()), "{ns} survived");
        assert!(!std::path::Path::new("/etc/netns").join(ns).exists());
    }
}
