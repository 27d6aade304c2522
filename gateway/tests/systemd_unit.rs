//! The shipped unit passes `systemd-analyze verify`, and the daemon speaks the notify protocol
//! its `Type=notify` relies on.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use gateway_lab::{Host, Lab, LabOptions};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/gatewayd.service");

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
    std::fs::write(units.join("gatewayd.service"), unit_text).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("--man=no")
        .arg("/etc/systemd/system/gatewayd.service")
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
