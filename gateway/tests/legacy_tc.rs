//! Legacy TC (`[dataplane] attach = "tc"`, what kernels before 6.6 get): the daemon adds a
//! clsact qdisc only where there is none, removes only the one it added, and cleans the filters
//! and qdisc a killed run left, since netlink filters, unlike TCX links, outlive the process.

mod common;

use std::time::Duration;

use common::*;
use gateway::api::AttachKind;
use gateway_lab::{Host, Lab, LabOptions};

const ROUTES: &str = "[[route]]\ncidr = \"10.128.0.0/16\"\n";

fn lab() -> Lab {
    Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab")
}

fn tc(lab: &Lab, args: &[&str]) -> String {
    let mut argv = vec!["tc"];
    argv.extend_from_slice(args);
    lab.run_ok(Host::Operator, &argv)
        .unwrap_or_else(|e| panic!("tc {args:?}: {e:#}"))
}

fn has_clsact(lab: &Lab) -> bool {
    tc(lab, &["qdisc", "show", "dev", "lan0"]).contains("qdisc clsact")
}

/// What `tc filter show dev lan0 ingress` reports.
fn ingress_filters(lab: &Lab) -> String {
    tc(lab, &["filter", "show", "dev", "lan0", "ingress"])
}

#[test]
fn stop_removes_the_clsact_qdisc_it_added_and_the_next_start_cleans_a_killed_runs_filter() {
    let lab = lab();
    let op = lab.ns(Host::Operator);
    assert!(
        !has_clsact(&lab),
        "the lab's lan0 starts without a clsact qdisc"
    );
    let config = write_config_attach(&lab, "op", &["lan0"], Some("tc"), ROUTES);
    let socket = socket_path(&lab, "op");

    let mut daemon = start_daemon(&lab, Host::Operator, &config, &socket, "first.log");
    assert!(has_clsact(&lab), "no clsact qdisc while attached");
    assert!(ingress_filters(&lab).contains("gw_classify"));
    let status = status_json(&lab, Host::Operator, &socket);
    assert_eq!(attached_via(&status.interfaces[0]), AttachKind::Tc);
    stop_cleanly(&mut daemon);
    assert!(
        !has_clsact(&lab),
        "the clsact qdisc it added outlived the daemon"
    );
    assert_eq!(classifier_count(&op, "lan0"), 0);

    // Killed: the filter and the qdisc stay in the kernel; the record lists both.
    let mut killed = start_daemon(&lab, Host::Operator, &config, &socket, "killed.log");
    killed.kill().expect("SIGKILL");
    killed
        .wait_timeout(Duration::from_secs(10))
        .expect("killed");
    assert_eq!(
        classifier_count(&op, "lan0"),
        1,
        "a netlink TC filter outlives its process"
    );
    assert!(has_clsact(&lab));

    let mut next = start_daemon(&lab, Host::Operator, &config, &socket, "next.log");
    let log = next.log();
    assert!(
        log.contains("removed the previous run's TC filter"),
        "{log}"
    );
    assert_eq!(
        classifier_count(&op, "lan0"),
        1,
        "exactly one classifier after the restart"
    );
    let status = status_json(&lab, Host::Operator, &socket);
    assert!(status.interfaces[0].classifier_attached, "{status:?}");
    stop_cleanly(&mut next);
    assert!(!has_clsact(&lab), "qdisc left after the cleaned restart");
    assert_eq!(classifier_count(&op, "lan0"), 0);
}

#[test]
fn a_clsact_qdisc_that_was_there_before_stays_with_its_filters() {
    let lab = lab();
    let op = lab.ns(Host::Operator);
    tc(&lab, &["qdisc", "add", "dev", "lan0", "clsact"]);
    // Someone else's filter (u32, the one classifier besides bpf this kernel has built in).
    tc(
        &lab,
        &[
            "filter", "add", "dev", "lan0", "ingress", "prio", "7", "protocol", "all", "u32",
            "match", "u32", "0", "0", "flowid", "1:1",
        ],
    );
    let config = write_config_attach(&lab, "op", &["lan0"], Some("tc"), ROUTES);
    let socket = socket_path(&lab, "op");

    let mut daemon = start_daemon(&lab, Host::Operator, &config, &socket, "first.log");
    let filters = ingress_filters(&lab);
    assert!(
        filters.contains("gw_classify") && filters.contains("u32"),
        "{filters}"
    );
    // Ours runs first and passes packets on: it counts a ping from the office host.
    lab.run_ok(
        Host::Office,
        &[
            "ping",
            "-q",
            "-n",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "10.128.0.10",
        ],
    )
    .expect("ping");
    let status = status_json(&lab, Host::Operator, &socket);
    assert_eq!(attached_via(&status.interfaces[0]), AttachKind::Tc);
    assert_eq!(status.routes[0].packets, 2, "{status:?}");
    stop_cleanly(&mut daemon);

    assert!(
        has_clsact(&lab),
        "a clsact qdisc that was there before was removed"
    );
    let filters = ingress_filters(&lab);
    assert!(
        filters.contains("u32"),
        "someone else's filter went: {filters}"
    );
    assert!(!filters.contains("gw_classify"), "{filters}");
    assert_eq!(classifier_count(&op, "lan0"), 0);

    // Killed and restarted: the next start removes only our filter, not the qdisc.
    let mut killed = start_daemon(&lab, Host::Operator, &config, &socket, "killed.log");
    killed.kill().expect("SIGKILL");
    killed
        .wait_timeout(Duration::from_secs(10))
        .expect("killed");
    let mut next = start_daemon(&lab, Host::Operator, &config, &socket, "next.log");
    assert_eq!(classifier_count(&op, "lan0"), 1);
    stop_cleanly(&mut next);
    assert!(has_clsact(&lab));
    let filters = ingress_filters(&lab);
    assert!(
        filters.contains("u32") && !filters.contains("gw_classify"),
        "{filters}"
    );
}
