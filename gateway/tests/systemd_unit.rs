//! The shipped units pass `systemd-analyze verify`, agree with the daemon on exit statuses and
//! directories, and the daemon speaks the notify protocol their `Type=notify` relies on.
//! systemd is not PID 1 here: what it would do is checked through the settings it reads and the
//! exit statuses and environment it would see.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use gateway_lab::{Host, Lab, LabOptions};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/gatewayd.service");
const TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/gatewayd@.service");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        let ty = entry.file_type().expect("file type");
        if ty.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if ty.is_symlink() {
            let link = std::fs::read_link(entry.path()).expect("readlink");
            let _ = std::os::unix::fs::symlink(link, &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// `systemd-analyze verify` in a throwaway root that holds systemd's own units, the binaries
/// where the unit expects them, and `unit_text`. Returns (success, stderr).
fn verify(unit_text: &str) -> (bool, String) {
    verify_as(unit_text, "gatewayd.service", "gatewayd.service")
}

/// [`verify`] for `unit_text` installed as `file`, verifying `unit` (an instance of a template).
fn verify_as(unit_text: &str, file: &str, unit: &str) -> (bool, String) {
    let root = std::env::temp_dir().join(format!(
        "gw-unit-{}-{}",
        std::process::id(),
        unit_text.len()
    ));
    let _ = std::fs::remove_dir_all(&root);
    copy_dir(
        Path::new("/usr/lib/systemd/system"),
        &root.join("usr/lib/systemd/system"),
    );
    let bin = root.join("usr/local/bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    std::fs::copy(GATEWAYD, bin.join("gatewayd")).expect("copy gatewayd");
    std::fs::copy(GATEWAYCTL, bin.join("gatewayctl")).expect("copy gatewayctl");
    // ExecReload's kill.
    std::fs::create_dir_all(root.join("bin")).expect("mkdir /bin");
    std::fs::copy("/bin/kill", root.join("bin/kill")).expect("copy kill");
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(&units).expect("mkdir units");
    std::fs::write(units.join(file), unit_text).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("--man=no")
        .arg(
            units
                .strip_prefix(&root)
                .map(|u| Path::new("/").join(u).join(unit))
                .expect("under root"),
        )
        .output()
        .expect("systemd-analyze (cargo xtask setup installs it)");
    let _ = std::fs::remove_dir_all(&root);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_unit_verifies_without_a_warning() {
    let text = std::fs::read_to_string(UNIT).expect("read unit");
    let (ok, stderr) = verify(&text);
    assert!(
        ok && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

#[test]
fn template_unit_verifies_for_an_instance_without_a_warning() {
    let text = std::fs::read_to_string(TEMPLATE).expect("read template");
    let (ok, stderr) = verify_as(&text, "gatewayd@.service", "gatewayd@vpc2.service");
    assert!(
        ok && stderr.trim().is_empty(),
        "systemd-analyze verify gatewayd@vpc2.service:\n{stderr}"
    );
}

/// The settings of a unit file, in order, comments and blank lines left out.
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The template differs from the unit only where an instance must: its config, its
/// directories, its description. Any other change must be made to both.
#[test]
fn template_unit_differs_from_the_unit_only_in_its_instance_paths() {
    let unit = settings(&std::fs::read_to_string(UNIT).expect("unit"));
    let template = settings(&std::fs::read_to_string(TEMPLATE).expect("template"));
    assert_eq!(unit.len(), template.len());
    let differing: Vec<(&str, &str)> = unit
        .iter()
        .zip(&template)
        .inspect(|((k, _), (kt, _))| assert_eq!(k, kt, "settings in another order"))
        .filter(|(a, b)| a != b)
        .map(|((k, _), (_, v))| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        differing,
        [
            (
                "Description",
                "gateway %i: eBPF-accelerated private network access gateway"
            ),
            (
                "ExecStart",
                "/usr/local/bin/gatewayd --config /etc/gateway/%i.toml"
            ),
            (
                "ExecReload",
                "/usr/local/bin/gatewayctl check-config /etc/gateway/%i.toml"
            ),
            ("RuntimeDirectory", "gateway-%i"),
            ("StateDirectory", "gateway-%i"),
        ]
    );
}

/// The one value of `key` in a unit's settings.
fn setting(text: &str, key: &str) -> String {
    let values: Vec<String> = settings(text)
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(values.len(), 1, "{key}: {values:?}");
    values[0].clone()
}

/// gatewayd's default socket and state directory are where the unit's RuntimeDirectory= and
/// StateDirectory= put them: the crash record in a directory a restart keeps.
#[test]
fn default_paths_are_the_units_directories() {
    let unit = std::fs::read_to_string(UNIT).expect("unit");
    let runtime = Path::new("/run").join(setting(&unit, "RuntimeDirectory"));
    let state = Path::new("/var/lib").join(setting(&unit, "StateDirectory"));
    assert_eq!(
        Path::new(gateway::config::DEFAULT_SOCKET).parent(),
        Some(runtime.as_path())
    );
    assert_eq!(Path::new(gateway::config::DEFAULT_STATE_DIR), state);
    assert_eq!(setting(&unit, "RuntimeDirectoryPreserve"), "no");
    assert!(
        !state.starts_with("/run"),
        "the record must not live where systemd empties on restart"
    );
}

/// A config that does not validate makes gatewayd exit with a status in the unit's
/// RestartPreventExitStatus=, so systemd does not restart it, and check-config says the same.
/// Nothing else validates the config at start: systemd would restart on a failed ExecStartPre=
/// whatever its status.
#[test]
fn a_bad_config_exits_with_a_status_the_units_do_not_restart_on() {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let config = write_config(
        &lab,
        "bad",
        &["lan0"],
        "[[route]]\ncidr = \"10.300.0.0/16\"\n",
    );
    let path = config.to_str().expect("utf-8");
    let daemon = lab
        .run(Host::Operator, &[GATEWAYD, "--config", path])
        .expect("run gatewayd");
    let check = gatewayctl(&lab, Host::Operator, &["check-config", path]);
    let code = daemon.status.code().expect("an exit status, not a signal");
    assert_eq!(
        check.status.code(),
        Some(code),
        "check-config and gatewayd agree"
    );
    assert!(
        stderr_of(&daemon).contains("route[0].cidr"),
        "{}",
        stderr_of(&daemon)
    );
    for file in [UNIT, TEMPLATE] {
        let unit = std::fs::read_to_string(file).expect("unit");
        assert_eq!(setting(&unit, "Restart"), "on-failure", "{file}");
        let prevent: Vec<String> = setting(&unit, "RestartPreventExitStatus")
            .split_whitespace()
            .map(String::from)
            .collect();
        assert!(
            prevent.contains(&code.to_string()),
            "{file}: exit {code} not in RestartPreventExitStatus={prevent:?}"
        );
        assert!(
            !settings(&unit).iter().any(|(k, _)| k == "ExecStartPre"),
            "{file}: a failing ExecStartPre= is restarted whatever its status"
        );
    }
}

/// Under an instance of the template, systemd gives the daemon RUNTIME_DIRECTORY and
/// STATE_DIRECTORY; a config whose socket or state_dir lies elsewhere is refused as a config
/// error naming the value to set, and one that uses them starts.
#[test]
fn an_instance_config_must_use_the_instance_directories() {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let run = lab.dir().join("run-gateway-vpc2");
    let lib = lab.dir().join("lib-gateway-vpc2");
    let env_run = format!("RUNTIME_DIRECTORY={}", run.display());
    let env_lib = format!("STATE_DIRECTORY={}", lib.display());
    let config = write_config(&lab, "vpc2", &["lan0"], "");
    let path = config.to_str().expect("utf-8");
    let out = lab
        .run(
            Host::Operator,
            &["env", &env_run, &env_lib, GATEWAYD, "--config", path],
        )
        .expect("run gatewayd");
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(gateway::config::EXIT_BAD_CONFIG as i32),
        "{err}"
    );
    let want = format!("set socket = \"{}/vpc2.sock\"", run.display());
    assert!(err.contains("node.socket") && err.contains(&want), "{err}");
    let want = format!("set state_dir = \"{}\"", lib.display());
    assert!(
        err.contains("node.state_dir") && err.contains(&want),
        "{err}"
    );

    let text = std::fs::read_to_string(&config).expect("read config");
    let socket = run.join("vpc2.sock");
    let text = text
        .replace(
            &socket_path(&lab, "vpc2").display().to_string(),
            &socket.display().to_string(),
        )
        .replace(
            &lab.dir().join("vpc2-state").display().to_string(),
            &lib.display().to_string(),
        );
    std::fs::write(&config, text).expect("write config");
    let mut daemon = start_daemon_argv(
        &lab,
        Host::Operator,
        &["env", &env_run, &env_lib, GATEWAYD, "--config", path],
        &socket,
        "vpc2.log",
    );
    assert!(
        lib.join("gatewayd.state").exists(),
        "the record is in the state directory"
    );
    stop_cleanly(&mut daemon);
}

#[test]
fn verification_catches_a_broken_unit() {
    let text = std::fs::read_to_string(UNIT).expect("read unit");
    let broken = text.replace(
        "ProtectSystem=strict",
        "ProtectSystem=strict\nProtectSystm=yes",
    );
    let (_, stderr) = verify(&broken);
    assert!(
        stderr.contains("ProtectSystm"),
        "warning expected, got:\n{stderr}"
    );
}

/// The next notification that contains `what`, skipping others (watchdog pings).
fn next_containing(sock: &UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 512];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {what} notification: {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains(what) {
            return msg;
        }
    }
}

#[test]
fn daemon_notifies_ready_watchdog_reloading_and_stopping() {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let notify: PathBuf = lab.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let config = write_config(
        &lab,
        "op",
        &["lan0"],
        "[[route]]\ncidr = \"10.128.0.0/16\"\n",
    );
    let socket = socket_path(&lab, "op");
    let env = format!("NOTIFY_SOCKET={}", notify.display());
    // As systemd does: WATCHDOG_USEC, and WATCHDOG_PID naming the daemon itself (the shell's
    // pid, which exec hands to gatewayd).
    let exec = format!(
        "export WATCHDOG_PID=$$; exec {GATEWAYD} --config {}",
        config.display()
    );
    let mut daemon = lab
        .spawn(
            Host::Operator,
            &["env", &env, "WATCHDOG_USEC=400000", "sh", "-c", &exec],
            "gatewayd.log",
        )
        .expect("spawn");

    next_containing(&sock, "READY=1");
    // READY means serving: the status socket answers and the classifier is attached.
    let status = status_json(&lab, Host::Operator, &socket);
    assert!(status.interfaces[0].classifier_attached);

    // The watchdog is pinged at half the interval systemd asks for (0.4 s here).
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    for _ in 0..3 {
        next_containing(&sock, "WATCHDOG=1");
    }

    // SIGHUP is a reload: RELOADING with the time systemd wants, then READY again.
    daemon.signal(libc::SIGHUP).expect("SIGHUP");
    let reloading = next_containing(&sock, "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    next_containing(&sock, "READY=1");
    let status = status_json(&lab, Host::Operator, &socket);
    let reload = status.last_reload.expect("reload reported");
    assert!(reload.ok && reload.message == "no change", "{reload:?}");

    daemon.terminate().expect("SIGTERM");
    next_containing(&sock, "STOPPING=1");
    assert!(
        daemon
            .wait_timeout(Duration::from_secs(10))
            .expect("exit")
            .success()
    );
}
