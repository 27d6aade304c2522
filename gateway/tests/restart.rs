//! A crash and the automatic restart after it, as under the unit: the record of what the killed
//! daemon changed lives in the state directory, which a restart keeps (unlike the runtime
//! directory, which systemd empties), so the next start puts every sysctl back.

mod common;

use std::time::Duration;

use common::*;
use gateway_lab::{Host, Lab, LabOptions};

/// Every sysctl a connector may change (the tunnel: forwarding, the reserved egress ports; the
/// daemon: ping_group_range).
const SYSCTLS: [&str; 4] = [
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.ping_group_range",
];

fn sysctls(lab: &Lab) -> Vec<String> {
    SYSCTLS
        .iter()
        .map(|k| {
            lab.run_ok(Host::VpcGateway, &["sysctl", "-n", k])
                .unwrap_or_else(|e| panic!("sysctl {k}: {e:#}"))
                .trim()
                .to_string()
        })
        .collect()
}

#[test]
fn kill_9_and_a_restart_restore_every_sysctl_from_the_record_in_the_state_dir() {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let pki = lab.dir().join("pki");
    let d = pki.to_str().expect("utf-8");
    for args in [
        vec!["pki", "init", "--dir", d],
        vec![
            "pki",
            "issue",
            "lab-gw",
            "--dir",
            d,
            "--profile",
            "connector",
        ],
    ] {
        let out = gatewayctl(&lab, Host::VpcGateway, &args);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    // As under the unit: the socket in a runtime directory, the record in a state directory.
    let run = lab.dir().join("run-gateway");
    let state = lab.dir().join("lib-gateway");
    let socket = run.join("gatewayd.sock");
    let config = write_config(
        &lab,
        "lab-gw",
        &[],
        &format!(
            "[tunnel]\nlisten = \"0.0.0.0:7844\"\ntun = \"gwtun\"\n\
             [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/lab-gw.pem\"\nkey = \"{d}/lab-gw.key\"\n\
             [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\
             [[route]]\ncidr = \"10.128.0.0/16\"\n\
             [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 icmp\"]\n\
             [icmp]\nmanage_ping_group_range = true\n"
        ),
    );
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace(
            &socket_path(&lab, "lab-gw").display().to_string(),
            &socket.display().to_string(),
        )
        .replace(
            &lab.dir().join("lab-gw-state").display().to_string(),
            &state.display().to_string(),
        );
    std::fs::write(&config, text).expect("write config");

    let before = sysctls(&lab);
    let mut first = start_daemon(&lab, Host::VpcGateway, &config, &socket, "first.log");
    // The socket is bound before the tunnel starts; an answer comes once it has.
    let _ = status_json(&lab, Host::VpcGateway, &socket);
    let running = sysctls(&lab);
    let changed: Vec<&str> = SYSCTLS
        .iter()
        .zip(before.iter().zip(&running))
        .filter(|(_, (b, r))| b != r)
        .map(|(k, _)| *k)
        .collect();
    assert!(
        changed.contains(&"net.ipv4.ip_local_reserved_ports")
            && changed.contains(&"net.ipv4.ping_group_range"),
        "the connector changed {changed:?}; before {before:?}, running {running:?}"
    );

    first.kill().expect("SIGKILL");
    first.wait_timeout(Duration::from_secs(10)).expect("killed");
    assert_eq!(sysctls(&lab), running, "a killed daemon restores nothing");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(state.join("gatewayd.state")).expect("the record survives the crash"),
    )
    .expect("record JSON");
    let recorded: Vec<&str> = record["sysctls"]
        .as_array()
        .expect("sysctls")
        .iter()
        .filter_map(|pair| pair[0].as_str())
        .collect();
    for key in &changed {
        assert!(recorded.contains(key), "{key} not in the record: {record}");
    }
    // systemd empties the RuntimeDirectory before it starts the unit again.
    std::fs::remove_dir_all(&run).expect("remove the runtime directory");

    let mut second = start_daemon(&lab, Host::VpcGateway, &config, &socket, "second.log");
    let _ = status_json(&lab, Host::VpcGateway, &socket);
    let log = second.log();
    for key in &changed {
        assert!(
            log.lines()
                .any(|l| l.contains("restored sysctl") && l.contains(key)),
            "{key} not restored from the record:\n{log}"
        );
    }
    stop_cleanly(&mut second);
    assert_eq!(
        sysctls(&lab),
        before,
        "after the crash and a clean stop every sysctl is as it was"
    );
}
