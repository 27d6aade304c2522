//! `gatewayctl access` for a user with no tunnel and no privileges.

use super::*;

/// A non-root user's own copy of what `gatewayctl access` needs: its certificate and key, the
/// CA, a client config, the ssh key and the gatewayctl binary, all owned by `nobody`.
pub(crate) fn unprivileged_user_dir(lab: &Lab, pki: &std::path::Path) -> PathBuf {
    let dir = lab.dir().join("user");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for f in ["ca.pem", "ops-alice.pem", "ops-alice.key"] {
        std::fs::copy(pki.join(f), dir.join(f)).expect("copy pki");
    }
    std::fs::copy(GATEWAYCTL, dir.join("gatewayctl")).expect("copy gatewayctl");
    std::fs::copy(lab.ssh_key(), dir.join("id")).expect("copy ssh key");
    std::fs::write(
        dir.join("access.toml"),
        format!(
            "[node]\nname = \"alice-laptop\"\n\n[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\n\n{}",
            addr::GW_WAN,
            tls(&dir, "ops-alice")
        ),
    )
    .expect("write access.toml");
    let out = std::process::Command::new("chown")
        .args(["-R", "nobody:nogroup", dir.to_str().expect("utf-8")])
        .output()
        .expect("chown");
    assert!(out.status.success());
    dir
}

/// `argv` run in the operator namespace as `nobody`, with no capabilities at all.
pub(crate) fn as_nobody(lab: &Lab, user: &std::path::Path, argv: &[&str]) -> std::process::Output {
    let home = format!("HOME={}", user.display());
    let mut full = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "env",
        &home,
    ];
    full.extend_from_slice(argv);
    lab.run(Host::Operator, &full).expect("run as nobody")
}

pub(crate) fn user_ssh(user: &str, extra: &[&str], target: &str, cmd: &str) -> Vec<String> {
    let key = std::path::Path::new(user).join("id");
    let mut extra = extra.to_vec();
    extra.extend(["-o", "ConnectTimeout=10"]);
    gateway_lab::ssh_argv_with(&key, &extra, target, cmd)
}

#[test]
fn an_unprivileged_user_reaches_ssh_through_access_without_a_tunnel() {
    let ConnectorOnly {
        lab,
        pki,
        config: _,
        socket: connector_socket,
        daemon: _connector,
    } = connector_only(|_| {});
    let user = unprivileged_user_dir(&lab, &pki);
    let u = user.to_str().expect("utf-8");
    let config = format!("GATEWAY_CONFIG={u}/access.toml");
    // No TUN, no route: the operator host cannot reach the VPC by itself.
    let direct = lab
        .run(
            Host::Operator,
            &["ping", "-c", "1", "-W", "1", addr::VPC_HOST],
        )
        .expect("ping");
    assert!(
        !direct.status.success(),
        "the operator host has a path of its own"
    );

    // 1. ssh with the ProxyCommand, to a private name the connector resolves.
    let proxy = format!("ProxyCommand={u}/gatewayctl access ssh --hostname %h");
    let host = format!("ssh.{}", zone::DOMAIN);
    let argv = user_ssh(
        u,
        &["-o", &proxy],
        &host,
        "echo shell-$((6*7)) on $(hostname -I)",
    );
    let mut full = vec!["env", config.as_str()];
    full.extend(argv.iter().map(String::as_str));
    let out = as_nobody(&lab, &user, &full);
    assert!(
        out.status.success(),
        "ssh via access failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("shell-42 on ") && said.contains(addr::VPC_HOST),
        "{said}"
    );
    // Through the tunnel's pinned egress range, like everything else from the connector.
    let sshd_log = std::fs::read_to_string(lab.dir().join("sshd.log")).unwrap_or_default();
    let from_gw: Vec<&str> = sshd_log
        .lines()
        .filter(|l| l.contains(&format!("from {} port 40", addr::GW_VPC)))
        .collect();
    assert!(!from_gw.is_empty(), "{sshd_log}");
    let status = status_json(&lab, Host::VpcGateway, &connector_socket)
        .tunnel
        .expect("tunnel");
    assert!(status.access_streams_total >= 1, "{status:?}");
    // The stream ends on the connector when ssh ends (an explicit close, not an idle timeout).
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let t = status_json(&lab, Host::VpcGateway, &connector_socket)
            .tunnel
            .expect("tunnel");
        if t.access_streams_active == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "stream still open: {t:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 2. A local forward: `access tcp`, then plain ssh to it.
    let forward = lab
        .spawn(
            Host::Operator,
            &[
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                &format!("{u}/gatewayctl"),
                "access",
                "tcp",
                "--listen",
                "127.0.0.1:2222",
                "--to",
                &format!("{host}:22"),
                "--config",
                &format!("{u}/access.toml"),
            ],
            "access-tcp.log",
        )
        .expect("spawn access tcp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !forward.log().contains("forwarding") {
        assert!(Instant::now() < deadline, "{}", forward.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let argv = user_ssh(u, &["-p", "2222"], "127.0.0.1", "echo forwarded-$((6*7))");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = as_nobody(&lab, &user, &argv);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "forwarded-42",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        forward.log()
    );

    // 3. What the policy does not allow, and names outside the zones, are refused with why.
    for (host, port, why) in [
        (addr::VPC_HOST, "5432", "may not reach 10.128.0.10 tcp/5432"),
        ("db.example.org", "22", "not under this connector's zones"),
    ] {
        let out = as_nobody(
            &lab,
            &user,
            &[
                config.as_str(),
                &format!("{u}/gatewayctl"),
                "access",
                "ssh",
                "--hostname",
                host,
                "--port",
                port,
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{host}:{port}: {err}"
        );
    }

    // 4. Where UDP is dropped, access takes the TLS-over-TCP fallback by itself.
    let _blocked = UdpBlocked::new(&lab);
    let argv = user_ssh(u, &["-o", &proxy], &host, "echo over-tcp");
    let mut full = vec!["env", config.as_str()];
    full.extend(argv.iter().map(String::as_str));
    let out = as_nobody(&lab, &user, &full);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "over-tcp",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
