//! The tunnel under the faults an underlay has: loss and delay, a cut link, and a daemon killed
//! with SIGKILL and started again. Each test is bounded in time; the only durations asserted are
//! the recovery bounds the issue names (a generous upper bound, never a speed).

mod common;
#[path = "common/pair.rs"]
mod pair;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use gateway_lab::{Host, Lab, addr};
use pair::{Pair, in_ns, ssh};

/// How long until a ping through the tunnel is answered, at most `within`: one `ping` that
/// sends every 0.2 s and stops at the first reply.
fn time_until_ping(lab: &Lab, host: Host, target: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let deadline = within.as_secs().max(1).to_string();
    let out = lab
        .run(
            host,
            &[
                "ping", "-n", "-i", "0.2", "-c", "1", "-w", &deadline, target,
            ],
        )
        .ok()?;
    out.status.success().then(|| start.elapsed())
}

#[test]
fn an_ssh_session_runs_a_command_every_second_for_a_minute_over_loss_and_delay() {
    let t = pair::start(pair::POLICY, pair::WORKSTATION);
    let lab = &t.lab;
    let impairment = lab
        .impair_underlay(5, Duration::from_millis(50))
        .expect("loss and delay on the underlay");
    // The impairment is real: the connector's public address is 2 × 50 ms away now.
    let out = lab
        .run_ok(
            Host::Operator,
            &["ping", "-c", "5", "-i", "0.2", "-W", "2", addr::GW_WAN],
        )
        .unwrap_or_default();
    let min_rtt = out
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        min_rtt.is_some_and(|ms| ms >= 100.0),
        "no 2 x 50 ms delay on the underlay: {out}"
    );

    // One ssh session, one command a second for 60 s; every one must come back.
    let argv = lab.ssh_argv(
        addr::VPC_HOST,
        "for i in $(seq 1 60); do echo \"tick $i $(date +%s)\"; sleep 1; done",
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut session = lab
        .spawn(Host::Operator, &argv, "ssh-ticks.log")
        .expect("spawn ssh");
    let exit = session
        .wait_timeout(Duration::from_secs(120))
        .expect("the ssh session ends within 120 s");
    let log = session.log();
    let ticks = log.lines().filter(|l| l.starts_with("tick ")).count();
    assert!(exit.success(), "ssh exited with {exit}:\n{log}");
    assert_eq!(ticks, 60, "{log}");
    let (dropped, relayed) = impairment.counts();
    let total = dropped + relayed;
    // About 5 % of a few hundred packets: far from 0 and from 12 % unless the relay is broken.
    assert!(
        total > 200 && dropped * 100 >= total && dropped * 100 <= 12 * total,
        "5 % loss: dropped {dropped} of {total}"
    );
    eprintln!("loss and delay: {dropped} packets dropped, {relayed} relayed; 60/60 commands");
    drop(impairment);
    assert!(ssh(lab, Host::Operator, addr::VPC_HOST, "true").is_ok());
}

#[test]
fn the_tunnel_is_back_within_10_s_of_a_20_s_cut() {
    let t = pair::start(pair::POLICY, pair::WORKSTATION);
    let lab = &t.lab;
    assert!(time_until_ping(lab, Host::Operator, addr::VPC_HOST, Duration::from_secs(5)).is_some());

    let cut = lab.cut_underlay().expect("cut");
    let out = lab
        .run(
            Host::Operator,
            &["ping", "-c", "2", "-W", "1", addr::VPC_HOST],
        )
        .expect("ping");
    assert!(!out.status.success(), "the cut lets pings through");
    std::thread::sleep(Duration::from_secs(20));
    let during = status_json(lab, Host::Operator, &t.client_socket);
    let state = during.tunnel.map(|t| t.state).unwrap_or_default();
    assert!(
        !state.starts_with("connected"),
        "after 20 s of silence the client should know: {state}"
    );
    cut.restore().expect("restore the link");

    let back = time_until_ping(lab, Host::Operator, addr::VPC_HOST, Duration::from_secs(10));
    let back = back.unwrap_or_else(|| {
        panic!(
            "no ping through the tunnel within 10 s of the link's return; client log:\n{}",
            t.client.log()
        )
    });
    eprintln!("tunnel back {:.1} s after a 20 s cut", back.as_secs_f64());
    assert_eq!(
        ssh(lab, Host::Operator, addr::VPC_HOST, "echo back")
            .expect("ssh after the cut")
            .trim(),
        "back"
    );
}

/// What a daemon leaves in the kernel of `host`, in a form that compares across restarts:
/// routes, rules, links, the nftables ruleset without counters, the TCX programs attached
/// (by name: ids change), the forwarding sysctls.
fn kernel_state(
    lab: &Lab,
    host: Host,
    ingress: &[&str],
    egress: &[&str],
) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let run = |argv: &[&str]| lab.run_ok(host, argv).expect("state query");
    let sorted = |text: String| {
        let mut lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        lines.sort_unstable();
        lines.join("\n")
    };
    s.insert(
        "ip -4 route".into(),
        sorted(run(&["ip", "-4", "route", "show", "table", "all"])),
    );
    s.insert(
        "ip -6 route".into(),
        sorted(link_local_masked(run(&[
            "ip", "-6", "route", "show", "table", "all",
        ]))),
    );
    s.insert("ip -4 rule".into(), sorted(run(&["ip", "-4", "rule"])));
    s.insert("ip -6 rule".into(), sorted(run(&["ip", "-6", "rule"])));
    let links: Vec<String> = run(&["ip", "-o", "link"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect();
    s.insert("links".into(), sorted(links.join("\n")));
    s.insert(
        "nft -s list ruleset".into(),
        run(&["nft", "-s", "list", "ruleset"]),
    );
    for (key, value) in [
        ("ip_forward", "net.ipv4.ip_forward"),
        ("forwarding6", "net.ipv6.conf.all.forwarding"),
        ("reserved ports", "net.ipv4.ip_local_reserved_ports"),
    ] {
        s.insert(key.into(), run(&["sysctl", "-n", value]));
    }
    let ns = lab.ns(host);
    for iface in ingress {
        let names: Vec<String> = tcx_ingress_programs(&ns, iface)
            .into_iter()
            .map(|p| p.name)
            .collect();
        s.insert(format!("tcx ingress {iface}"), names.join(","));
    }
    for iface in egress {
        let i = iface.to_string();
        let names: Vec<String> = in_ns(lab, host, move || {
            gateway::dataplane::attached_egress_programs(&i).expect("tcx egress")
        })
        .into_iter()
        .map(|p| p.name)
        .collect();
        s.insert(format!("tcx egress {iface}"), names.join(","));
    }
    s
}

/// A TUN made anew gets a new random link-local address: the same route, another value.
fn link_local_masked(routes: String) -> String {
    routes
        .lines()
        .map(|l| match l.strip_prefix("local fe80::") {
            Some(rest) => format!(
                "local fe80::(random) {}",
                rest.split_once(' ').map_or("", |(_, r)| r)
            ),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn both_states(t: &Pair) -> [BTreeMap<String, String>; 2] {
    [
        kernel_state(&t.lab, Host::Operator, &["lan0", "wan0"], &["lan0", "wan0"]),
        kernel_state(
            &t.lab,
            Host::VpcGateway,
            &["wan0", "vpc0"],
            &["wan0", "vpc0"],
        ),
    ]
}

fn assert_same(
    before: &[BTreeMap<String, String>; 2],
    after: &[BTreeMap<String, String>; 2],
    what: &str,
) {
    for (host, (b, a)) in ["operator", "connector"]
        .iter()
        .zip(before.iter().zip(after))
    {
        for (key, value) in b {
            assert_eq!(
                Some(value),
                a.get(key),
                "{what}: {key} on the {host} host differs\nbefore:\n{value}\nafter:\n{}",
                a.get(key).map(String::as_str).unwrap_or("(none)")
            );
        }
    }
}

fn works(t: &Pair) {
    let lab = &t.lab;
    for (host, who) in [(Host::Operator, "operator"), (Host::Office, "office")] {
        let out = ssh(lab, host, addr::VPC_HOST, "echo ok")
            .unwrap_or_else(|e| panic!("ssh from the {who} host: {e:#}"));
        assert_eq!(out.trim(), "ok");
    }
    lab.run_ok(
        Host::Operator,
        &["ping", "-c", "1", "-W", "2", addr::VPC_HOST_V6],
    )
    .expect("ping6");
}

/// The client's current connection to the connector (its id and when it connected), if
/// connected.
fn connection(lab: &Lab, socket: &std::path::Path) -> Option<(u64, u64)> {
    std::os::unix::net::UnixStream::connect(socket).ok()?;
    let s = status_json(lab, Host::Operator, socket);
    let t = s.tunnel?;
    if !t.state.starts_with("connected") {
        return None;
    }
    t.peers
        .first()
        .map(|p| (p.connection_id, p.connected_since))
}

#[test]
fn sigkill_of_either_daemon_and_a_restart_leave_nothing_twice_and_nothing_missing() {
    let mut t = pair::start(pair::POLICY, pair::SITE);
    works(&t);
    let running = both_states(&t);
    // The states are worth comparing: the daemons' own pieces are in them.
    assert!(running[0]["links"].contains("optun") && running[1]["links"].contains("gwtun"));
    assert!(running[0]["nft -s list ruleset"].contains("gateway_ops_alice"));
    assert!(running[1]["nft -s list ruleset"].contains("gateway_lab_gw"));
    assert!(running[0]["tcx ingress lan0"].contains("gw_classify"));
    assert!(running[0]["ip -4 route"].contains("10.128.0.0/16 dev optun"));

    for (which, host) in [("connector", Host::VpcGateway), ("client", Host::Operator)] {
        let (daemon, config, socket) = match which {
            "connector" => (&mut t.connector, &t.connector_config, &t.connector_socket),
            _ => (&mut t.client, &t.client_config, &t.client_socket),
        };
        let old = connection(&t.lab, &t.client_socket);
        daemon.kill().expect("SIGKILL");
        daemon.wait_timeout(Duration::from_secs(5)).expect("killed");
        let (config, socket) = (config.clone(), socket.clone());
        *daemon = start_daemon(
            &t.lab,
            host,
            &config,
            &socket,
            &format!("{which}-restarted.log"),
        );
        // A client that outlives its connector notices by the idle timeout: wait for the new
        // connection, not the old one it still reports for a few seconds. The id alone cannot
        // tell (a restarted daemon counts from the start again), nor can "not connected" (a
        // restarted client has no status socket yet): the id with the time it connected can.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match connection(&t.lab, &t.client_socket) {
                Some(now) if Some(now) != old => break,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no new connection after the {which} restart"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        works(&t);
        let after = both_states(&t);
        assert_same(
            &running,
            &after,
            &format!("after SIGKILL of the {which} and a restart"),
        );
    }
}
