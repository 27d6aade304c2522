//! What the daemon leaves behind: nothing after SIGTERM, nothing after a failed start, and
//! nothing (once it starts again) after SIGKILL.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use gateway_lab::{Host, Lab, LabOptions};

const ROUTES: &str = "[[route]]\ncidr = \"10.128.0.0/16\"\n";

fn lab() -> Lab {
    Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab")
}

fn state_record(lab: &Lab, name: &str) -> std::path::PathBuf {
    lab.dir()
        .join(format!("{name}-state"))
        .join("gatewayd.state")
}

#[test]
fn sigterm_detaches_the_classifier_and_removes_socket_and_state() {
    let lab = lab();
    let op = lab.ns(Host::Operator);
    let config = write_config(&lab, "op", &["lan0"], ROUTES);
    let socket = socket_path(&lab, "op");
    let mut daemon = start_daemon(&lab, Host::Operator, &config, &socket, "gatewayd.log");
    assert_eq!(classifier_count(&op, "lan0"), 1);
    assert!(state_record(&lab, "op").exists());
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "status socket must be root-only");

    daemon.terminate().expect("SIGTERM");
    let status = daemon.wait_timeout(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "exit {status}; log:\n{}", daemon.log());
    assert_eq!(
        classifier_count(&op, "lan0"),
        0,
        "classifier still attached"
    );
    assert!(!socket.exists(), "socket left behind");
    assert!(
        !state_record(&lab, "op").exists(),
        "state record left behind"
    );

    let out = gatewayctl(
        &lab,
        Host::Operator,
        &["status", "--socket", socket.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(3), "a stopped daemon is exit 3");
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "one line, not a trace: {err}");
    assert!(err.contains("not running"), "{err}");
}

#[test]
fn next_start_cleans_what_a_sigkilled_daemon_left() {
    let lab = lab();
    let op = lab.ns(Host::Operator);
    let config = write_config(&lab, "op", &["lan0"], ROUTES);
    let socket = socket_path(&lab, "op");
    let mut first = start_daemon(&lab, Host::Operator, &config, &socket, "first.log");
    first.kill().expect("SIGKILL");
    first.wait_timeout(Duration::from_secs(10)).expect("killed");

    // What a crash leaves: the socket file and the state record. The TCX link was held by the
    // process's fd, so the kernel detached the program itself.
    assert!(socket.exists(), "a killed daemon cannot remove its socket");
    assert!(state_record(&lab, "op").exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    while classifier_count(&op, "lan0") != 0 {
        assert!(
            Instant::now() < deadline,
            "kernel kept the classifier of a dead daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut second = start_daemon(&lab, Host::Operator, &config, &socket, "second.log");
    let log = second.log();
    assert!(log.contains("did not stop cleanly"), "{log}");
    assert!(log.contains("removed stale socket"), "{log}");
    assert_eq!(
        classifier_count(&op, "lan0"),
        1,
        "exactly one classifier after restart"
    );
    let status = status_json(&lab, Host::Operator, &socket);
    assert!(status.interfaces[0].classifier_attached);

    second.terminate().expect("SIGTERM");
    assert!(
        second
            .wait_timeout(Duration::from_secs(10))
            .expect("exits")
            .success()
    );
    assert_eq!(classifier_count(&op, "lan0"), 0);
    assert!(!socket.exists());
}

#[test]
fn a_second_daemon_on_the_same_state_is_refused_and_the_first_keeps_running() {
    let lab = lab();
    let config = write_config(&lab, "op", &["lan0"], ROUTES);
    let socket = socket_path(&lab, "op");
    let mut first = start_daemon(&lab, Host::Operator, &config, &socket, "first.log");

    let out = lab
        .run(
            Host::Operator,
            &[GATEWAYD, "--config", config.to_str().expect("utf-8")],
        )
        .expect("run second");
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("another gatewayd is running"), "{err}");

    assert!(
        socket.exists(),
        "the refused daemon must not touch the running one's socket"
    );
    let status = status_json(&lab, Host::Operator, &socket);
    assert_eq!(classifier_count(&lab.ns(Host::Operator), "lan0"), 1);
    assert_eq!(status.pid, first.id());
    first.terminate().expect("SIGTERM");
    assert!(
        first
            .wait_timeout(Duration::from_secs(10))
            .expect("exits")
            .success()
    );
}

/// Each bad config: gatewayd and check-config both refuse it, naming file, key and reason, and
/// the daemon attaches nothing and creates no socket.
#[test]
fn bad_configs_are_refused_by_daemon_and_check_config_and_nothing_is_attached() {
    let lab = lab();
    let op = lab.ns(Host::Operator);
    let cases: [(&str, &[&str], &str, &str, &str); 3] = [
        (
            "badcidr",
            &["lan0"],
            "[[route]]\ncidr = \"10.128.0.0/16\"\n[[route]]\ncidr = \"10.300.0.0/16\"\n",
            "route[1].cidr",
            "is not a CIDR",
        ),
        (
            "unknownkey",
            &["lan0"],
            "[[route]]\ncidr = \"10.128.0.0/16\"\nnexthop = \"10.0.0.1\"\n",
            "route[0].nexthop",
            "unknown field",
        ),
        (
            "noiface",
            &["lan0", "nosuch0"],
            ROUTES,
            "dataplane.interfaces[1]",
            "does not exist",
        ),
    ];
    for (name, ifaces, extra, key, reason) in cases {
        let config = write_config(&lab, name, ifaces, extra);
        let config_str = config.to_str().expect("utf-8");
        let expected = format!("{config_str}: {key}: ");

        let out = lab
            .run(Host::Operator, &[GATEWAYD, "--config", config_str])
            .expect("run gatewayd");
        let err = stderr_of(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: gatewayd exit; stderr: {err}"
        );
        assert!(
            err.contains(&expected) && err.contains(reason),
            "{name}: {err}"
        );

        let out = gatewayctl(&lab, Host::Operator, &["check-config", config_str]);
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{name}: check-config accepted it");
        assert!(
            err.contains(&expected) && err.contains(reason),
            "{name}: {err}"
        );

        assert_eq!(
            classifier_count(&op, "lan0"),
            0,
            "{name}: something was attached"
        );
        assert!(!socket_path(&lab, name).exists(), "{name}: socket created");
    }

    // And the good one passes the same check.
    let good = write_config(&lab, "good", &["lan0"], ROUTES);
    let out = gatewayctl(
        &lab,
        Host::Operator,
        &["check-config", good.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
}

/// What only the machine or several keys together tell, checked in a lab namespace: a TUN
/// named after an existing veth is refused by gatewayd and check-config alike (the driver is
/// asked in the namespace), and a metrics endpoint on every address is a warning that
/// check-config prints while exiting 0 and that gatewayd logs at start, then runs.
#[test]
fn cross_key_mistakes_are_refused_and_warnings_shown_without_failing() {
    let lab = lab();
    let pki = lab.dir().join("pki");
    let d = pki.to_str().expect("utf-8");
    for args in [
        &["pki", "init", "--dir", d][..],
        &["pki", "issue", "op", "--dir", d][..],
    ] {
        let out = gatewayctl(&lab, Host::Operator, args);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let tls = format!("[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/op.pem\"\nkey = \"{d}/op.key\"\n");
    let config = write_config(
        &lab,
        "tunonveth",
        &[],
        &format!(
            "[tunnel]\nconnect = [\"203.0.113.10:7844\"]\nserver_name = \"lab-gw\"\n\
             tun = \"lan0\"\n{tls}"
        ),
    );
    let config_str = config.to_str().expect("utf-8");
    let expected = format!("{config_str}: tunnel.tun: \"lan0\" already exists here");
    let out = lab
        .run(Host::Operator, &[GATEWAYD, "--config", config_str])
        .expect("run gatewayd");
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains(&expected) && stderr_of(&out).contains("driver veth"),
        "{}",
        stderr_of(&out)
    );
    let out = gatewayctl(&lab, Host::Operator, &["check-config", config_str]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains(&expected), "{}", stderr_of(&out));

    let name = "openmetrics";
    let config = write_config(
        &lab,
        name,
        &["lan0"],
        &format!("{ROUTES}[metrics]\nlisten = \"0.0.0.0:9469\"\n"),
    );
    let config_str = config.to_str().expect("utf-8");
    let warning = format!("{config_str}: metrics.listen: listens on every address");
    let out = gatewayctl(&lab, Host::Operator, &["check-config", config_str]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains(&format!("gatewayctl: warning: {warning}")),
        "{}",
        stderr_of(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 warning(s)"),
        "{out:?}"
    );
    let mut daemon = start_daemon(
        &lab,
        Host::Operator,
        &config,
        &socket_path(&lab, name),
        "openmetrics.log",
    );
    assert!(daemon.log().contains(&warning), "{}", daemon.log());
    stop_cleanly(&mut daemon);
}
