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

#[test]
fn daemon_notifies_ready_once_serving_and_stopping_on_sigterm() {
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
    let mut daemon = lab
        .spawn(
            Host::Operator,
            &[
                "env",
                &env,
                GATEWAYD,
                "--config",
                config.to_str().expect("utf-8"),
            ],
            "gatewayd.log",
        )
        .expect("spawn");

    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY within 15 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // READY means serving: the status socket answers and the classifier is attached.
    let status = status_json(&lab, Host::Operator, &socket);
    assert!(status.interfaces[0].classifier_attached);

    daemon.terminate().expect("SIGTERM");
    let n = sock.recv(&mut buf).expect("STOPPING");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(
        daemon
            .wait_timeout(Duration::from_secs(10))
            .expect("exit")
            .success()
    );
}
