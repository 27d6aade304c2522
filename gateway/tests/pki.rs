//! Certificates in the lab: revoking an identity shuts it out of a running connector (tunnel
//! sessions and access streams), a client refuses a "connector" presenting a client
//! certificate, and the shipped examples connect to gw.example.net with no server_name until
//! the connector's certificate is revoked.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gateway::api::{PeerStatus, Refusal, Status};
use gateway_lab::{Host, Lab, LabOptions, Spawned, addr, zone};

fn lab(servers: bool) -> Lab {
    Lab::start(LabOptions {
        direct_vpc_route: false,
        servers,
    })
    .expect("lab")
}

fn ctl_ok(lab: &Lab, args: &[&str]) -> String {
    let out = gatewayctl(lab, Host::Operator, args);
    assert!(
        out.status.success(),
        "gatewayctl {args:?}: {}",
        stderr_of(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `pki init`, then `pki issue NAME ARGS...` for each entry.
fn pki(lab: &Lab, certs: &[(&str, &[&str])]) -> PathBuf {
    let dir = lab.dir().join("pki");
    let d = dir.to_str().expect("utf-8");
    ctl_ok(lab, &["pki", "init", "--dir", d]);
    for (name, args) in certs {
        let mut argv = vec!["pki", "issue", name, "--dir", d];
        argv.extend_from_slice(args);
        ctl_ok(lab, &argv);
    }
    dir
}

fn tls(pki: &Path, name: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n\
         crl = \"{0}/crl.pem\"\n",
        pki.display()
    )
}

fn connector(lab: &Lab, pki: &Path) -> (Spawned, PathBuf) {
    let config = write_config(
        lab,
        "lab-gw",
        &[],
        &format!(
            "[tunnel]\nlisten = \"0.0.0.0:7844\"\ntun = \"gwtun\"\n\n{}\n\
             [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\n\
             [[route]]\ncidr = \"{}\"\n\n[[policy]]\nidentity = \"ops-*\"\n\
             allow = [\"10.128.0.0/16 icmp\", \"10.128.0.0/16 tcp/22\"]\n",
            tls(pki, "lab-gw"),
            addr::VPC_CIDR,
        ),
    );
    let socket = socket_path(lab, "lab-gw");
    let daemon = start_daemon(lab, Host::VpcGateway, &config, &socket, "connector.log");
    (daemon, socket)
}

fn client(lab: &Lab, pki: &Path, host: Host, name: &str, transport: &str) -> (Spawned, PathBuf) {
    let config = write_config(
        lab,
        name,
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\nsource_port = 7844\n\
             tun = \"optun\"\ntransport = \"{transport}\"\n\n{}",
            addr::GW_WAN,
            tls(pki, name)
        ),
    );
    let socket = socket_path(lab, name);
    let daemon = start_daemon(lab, host, &config, &socket, &format!("{name}.log"));
    (daemon, socket)
}

/// Polls `f` on `host`'s status every 50 ms until it returns something, for at most `within`.
fn wait_for<T>(
    lab: &Lab,
    host: Host,
    socket: &Path,
    within: Duration,
    what: &str,
    mut f: impl FnMut(&Status) -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let s = status_json(lab, host, socket);
        if let Some(v) = f(&s) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; status:\n{:#?}",
            s.tunnel
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn peer<'a>(s: &'a Status, identity: &str) -> Option<&'a PeerStatus> {
    s.tunnel
        .as_ref()?
        .peers
        .iter()
        .find(|p| p.identity == identity)
}

fn connected(s: &Status) -> Option<PeerStatus> {
    let t = s.tunnel.as_ref()?;
    t.state
        .starts_with("connected")
        .then(|| t.peers.first().cloned())
        .flatten()
}

fn refusals(s: &Status) -> Vec<Refusal> {
    s.tunnel
        .as_ref()
        .map(|t| t.refusals.clone())
        .unwrap_or_default()
}

/// `gatewayctl status` as an operator reads it.
fn status_text(lab: &Lab, host: Host, socket: &Path) -> String {
    let out = gatewayctl(
        lab,
        host,
        &["status", "--socket", socket.to_str().expect("utf-8")],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ping(lab: &Lab, host: Host) -> bool {
    lab.run(
        host,
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", addr::VPC_HOST],
    )
    .is_ok_and(|o| o.status.success())
}

#[test]
fn a_revoked_identity_is_shut_out_on_sighup_while_others_keep_their_sessions() {
    let lab = lab(true);
    let pki = pki(
        &lab,
        &[
            ("lab-gw", &["--profile", "connector"]),
            ("ops-alice", &[]),
            ("ops-bob", &[]),
        ],
    );
    let d = pki.to_str().expect("utf-8");
    let (connector, gw_socket) = connector(&lab, &pki);
    // Alice on QUIC from the operator host, bob on the TCP fallback from the office host: the
    // re-check reads the peer's certificate from either kind of link.
    let (_alice, alice_socket) = client(&lab, &pki, Host::Operator, "ops-alice", "quic");
    let (bob, bob_socket) = client(&lab, &pki, Host::Office, "ops-bob", "tcp");
    let ten = Duration::from_secs(10);
    let alice_before = wait_for(&lab, Host::Operator, &alice_socket, ten, "alice", connected);
    wait_for(&lab, Host::Office, &bob_socket, ten, "bob", connected);
    let gw = wait_for(&lab, Host::VpcGateway, &gw_socket, ten, "both peers", |s| {
        (peer(s, "ops-alice").is_some() && peer(s, "ops-bob").is_some()).then(|| s.clone())
    });
    let alice_at_gw = peer(&gw, "ops-alice").expect("alice").clone();
    assert_eq!(
        (
            alice_at_gw.transport.as_str(),
            peer(&gw, "ops-bob").expect("bob").transport.as_str()
        ),
        ("quic", "tcp")
    );
    assert!(ping(&lab, Host::Operator) && ping(&lab, Host::Office));
    // Bob also holds an ssh session through `gatewayctl access` (a stream, not a tunnel peer).
    let gatewayctl_dir = Path::new(GATEWAYCTL)
        .parent()
        .expect("dir")
        .display()
        .to_string();
    let proxy = format!(
        "ProxyCommand={gatewayctl_dir}/gatewayctl access ssh --hostname %h --config {}",
        lab.dir().join("ops-bob.toml").display()
    );
    let ssh = lab.ssh_argv(addr::VPC_HOST, "echo up; sleep 60");
    let mut argv: Vec<&str> = ssh.iter().map(String::as_str).collect();
    argv.splice(1..1, ["-o", proxy.as_str()]);
    let mut bob_ssh = lab.spawn(Host::Office, &argv, "bob-ssh.log").expect("ssh");
    let up = Instant::now();
    while !std::fs::read_to_string(lab.dir().join("bob-ssh.log"))
        .unwrap_or_default()
        .contains("up")
    {
        assert!(
            up.elapsed() < Duration::from_secs(10) && bob_ssh.try_wait().expect("poll").is_none(),
            "bob's ssh through access: {}",
            bob_ssh.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = ctl_ok(
        &lab,
        &[
            "pki",
            "revoke",
            "ops-bob",
            "--dir",
            d,
            "--reason",
            "key-compromise",
        ],
    );
    assert!(out.contains("revoked ops-bob serial"), "{out}");
    let sighup = Instant::now();
    connector.signal(libc::SIGHUP).expect("SIGHUP");
    let closed = wait_for(
        &lab,
        Host::VpcGateway,
        &gw_socket,
        Duration::from_secs(2),
        "bob's session closed",
        |s| {
            let listed = refusals(s).into_iter().find(|r| {
                r.identity.as_deref() == Some("ops-bob")
                    && r.reason == "certificate revoked (key-compromise)"
            });
            listed.filter(|_| peer(s, "ops-bob").is_none())
        },
    );
    eprintln!("bob closed {:?} after SIGHUP", sighup.elapsed());
    let access = wait_for(
        &lab,
        Host::VpcGateway,
        &gw_socket,
        Duration::from_secs(2),
        "bob's access stream closed",
        |s| {
            refusals(s).into_iter().find(|r| {
                r.identity.as_deref() == Some("ops-bob")
                    && r.reason
                        == format!(
                            "access stream to {}:22 closed: certificate revoked (key-compromise)",
                            addr::VPC_HOST
                        )
            })
        },
    );
    eprintln!("{access:?} {:?} after SIGHUP", sighup.elapsed());
    let ended = bob_ssh
        .wait_timeout(Duration::from_secs(2))
        .expect("bob's ssh ends with its stream");
    assert!(!ended.success(), "{ended}: {}", bob_ssh.log());
    assert!(
        closed.remote.starts_with(&format!("{}:", addr::OFFICE)),
        "{closed:?}"
    );
    let gw = status_json(&lab, Host::VpcGateway, &gw_socket);
    let reload = gw.last_reload.clone().expect("reload reported");
    assert!(
        reload.ok && reload.message.contains("closed the session(s) of ops-bob"),
        "{reload:?}"
    );
    let alice_now = peer(&gw, "ops-alice").expect("alice is untouched");
    assert_eq!(
        (alice_now.connection_id, alice_now.connected_since),
        (alice_at_gw.connection_id, alice_at_gw.connected_since)
    );
    let crl = gw.tls.as_ref().and_then(|t| t.crl.clone()).expect("crl");
    assert_eq!((crl.revoked, crl.number), (1, 2));

    // Bob's client reconnects at once: refused in the TLS handshake, and listed.
    let refused = wait_for(
        &lab,
        Host::VpcGateway,
        &gw_socket,
        Duration::from_secs(15),
        "bob's reconnect refused",
        |s| {
            refusals(s).into_iter().find(|r| {
                r.identity.is_none()
                    && r.remote.starts_with(&format!("{}:", addr::OFFICE))
                    && r.reason.contains("TLS handshake")
                    && r.reason.contains("Revoked")
            })
        },
    );
    eprintln!("bob's reconnect: {refused:?}");
    let bob_state = status_json(&lab, Host::Office, &bob_socket)
        .tunnel
        .expect("tunnel")
        .state;
    assert!(bob_state.starts_with("reconnecting"), "{bob_state}");
    assert!(!ping(&lab, Host::Office), "bob still reaches the VPC");
    assert!(
        peer(&status_json(&lab, Host::VpcGateway, &gw_socket), "ops-bob").is_none(),
        "bob got back in; log:\n{}",
        bob.log()
    );
    assert!(ping(&lab, Host::Operator), "alice lost the VPC");
    let alice_after = connected(&status_json(&lab, Host::Operator, &alice_socket)).expect("alice");
    assert_eq!(alice_after.connection_id, alice_before.connection_id);

    let text = status_text(&lab, Host::VpcGateway, &gw_socket);
    assert!(
        text.contains("certificate revoked (key-compromise)") && text.contains(", 1 revoked"),
        "{text}"
    );

    // Revoking alice closes a QUIC session just as fast.
    ctl_ok(&lab, &["pki", "revoke", "ops-alice", "--dir", d]);
    connector.signal(libc::SIGHUP).expect("SIGHUP");
    wait_for(
        &lab,
        Host::VpcGateway,
        &gw_socket,
        Duration::from_secs(2),
        "alice's QUIC session closed",
        |s| {
            refusals(s)
                .iter()
                .any(|r| {
                    r.identity.as_deref() == Some("ops-alice") && r.reason == "certificate revoked"
                })
                .then_some(())
                .filter(|()| peer(s, "ops-alice").is_none())
        },
    );
    let list = ctl_ok(&lab, &["pki", "list", "--dir", d]);
    assert!(
        list.lines()
            .filter(|l| l.starts_with("ops-") && l.contains("REVOKED"))
            .count()
            == 2,
        "{list}"
    );
}

/// A rogue "connector" in `ns`: the tunnel's own QUIC and TLS-over-TCP server configs with the
/// certificate `paths` names, listening on `listen` for `secs`. Returns how each handshake
/// ended, as the rogue saw it.
fn rogue_connector(
    ns: String,
    listen: SocketAddr,
    paths: gateway::config::TlsPaths,
    secs: u64,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        enter_netns(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use gateway::tunnel::tls;
            let quic = tls::server_config(&paths).expect("QUIC config");
            let endpoint =
                quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(quic)), listen)
                    .expect("UDP");
            let tcp = tokio::net::TcpListener::bind(listen).await.expect("TCP");
            let acceptor =
                tokio_rustls::TlsAcceptor::from(tls::rustls_server(&paths).expect("TLS"));
            let mut seen = Vec::new();
            let end = tokio::time::sleep(Duration::from_secs(secs));
            tokio::pin!(end);
            let limit = Duration::from_secs(5);
            loop {
                tokio::select! {
                    Some(incoming) = endpoint.accept() => {
                        seen.push(match tokio::time::timeout(limit, incoming).await {
                            Ok(Ok(_)) => "quic: accepted".to_string(),
                            Ok(Err(e)) => format!("quic: {e}"),
                            Err(_) => "quic: timed out".into(),
                        });
                    }
                    Ok((stream, _)) = tcp.accept() => {
                        seen.push(match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                            Ok(Ok(_)) => "tcp: accepted".to_string(),
                            Ok(Err(e)) => format!("tcp: {e}"),
                            Err(_) => "tcp: timed out".into(),
                        });
                    }
                    _ = &mut end => break,
                }
            }
            endpoint.close(0u32.into(), b"done");
            seen
        })
    })
}

#[test]
fn a_client_refuses_a_connector_presenting_a_client_certificate() {
    let lab = lab(false);
    // The rogue holds a client certificate from the right CA whose name is the server_name
    // clients expect (issued with the default profile: ClientAuth only).
    let pki = pki(&lab, &[("ops-alice", &[]), ("lab-gw", &[])]);
    let paths = gateway::config::TlsPaths {
        ca: pki.join("ca.pem"),
        cert: pki.join("lab-gw.pem"),
        key: pki.join("lab-gw.key"),
        crl: None,
    };
    let listen: SocketAddr = format!("{}:7844", addr::GW_WAN).parse().expect("addr");
    let rogue = rogue_connector(lab.ns(Host::VpcGateway), listen, paths, 12);
    std::thread::sleep(Duration::from_millis(300));
    let (client, socket) = client(&lab, &pki, Host::Operator, "ops-alice", "auto");
    let state = wait_for(
        &lab,
        Host::Operator,
        &socket,
        Duration::from_secs(10),
        "refused over QUIC and TCP",
        |s| {
            let t = s.tunnel.as_ref()?;
            assert!(t.peers.is_empty(), "connected to the rogue: {t:?}");
            (t.state.contains("QUIC:") && t.state.contains("TCP fallback:"))
                .then(|| t.state.clone())
        },
    );
    eprintln!("client: {state}");
    let eku = "does not allow extended key usage for server authentication";
    assert_eq!(
        state.matches(eku).count(),
        2,
        "both QUIC and the TCP fallback refuse it for its key usage: {state}"
    );
    let seen = rogue.join().expect("rogue");
    eprintln!("rogue saw: {seen:?}");
    assert!(!seen.iter().any(|s| s.ends_with("accepted")), "{seen:?}");
    assert!(
        seen.iter()
            .any(|s| s.starts_with("quic:") && s.contains("error 43") && s.contains(eku))
            && seen
                .iter()
                .any(|s| s.starts_with("tcp:") && s.contains("UnsupportedCertificate")),
        "the client's alert (43, unsupported certificate) reached the rogue on both \
         transports: {seen:?}; client log:\n{}",
        client.log()
    );

    // gatewayd itself refuses to serve with such a certificate, naming the key.
    let config = write_config(
        &lab,
        "rogue",
        &[],
        &format!(
            "[tunnel]\nlisten = \"0.0.0.0:7845\"\ntun = \"rgtun\"\n\n{}",
            tls(&pki, "lab-gw")
        ),
    );
    let out = gatewayctl(
        &lab,
        Host::VpcGateway,
        &["check-config", config.to_str().expect("utf-8")],
    );
    let err = stderr_of(&out);
    assert!(
        !out.status.success() && err.contains("tls.cert") && err.contains("--profile connector"),
        "{err}"
    );
}

/// An example config as shipped, with the lab's paths and interface put in.
fn example(lab: &Lab, file: &str, name: &str, pki: &Path) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(file),
    )
    .expect("example");
    let node = format!("name = \"{name}\"\n");
    assert!(text.contains(&node), "{file} names {name}");
    let text = text
        .replace("/etc/gateway/pki", pki.to_str().expect("utf-8"))
        .replace("interface = \"ens5\"", "interface = \"vpc0\"")
        .replacen(
            &node,
            &format!(
                "{node}socket = \"{}\"\nstate_dir = \"{}\"\n",
                socket_path(lab, name).display(),
                lab.dir().join(format!("{name}-state")).display()
            ),
            1,
        );
    let path = lab.dir().join(file);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn the_shipped_examples_reach_gw_example_net_without_server_name_until_it_is_revoked() {
    let lab = lab(true);
    let pki = pki(
        &lab,
        &[
            (
                "vpc-gw-1",
                &["--profile", "connector", "--dns", zone::GW_PUBLIC_NAME],
            ),
            ("ops-alice", &[]),
        ],
    );
    let connector = example(&lab, "connector.toml", "vpc-gw-1", &pki);
    let client = example(&lab, "client.toml", "ops-alice", &pki);
    let client_text = std::fs::read_to_string(&client).expect("read");
    assert!(
        client_text.contains(&format!("connect = [\"{}:7844\"]", zone::GW_PUBLIC_NAME))
            && !client_text.lines().any(|l| l.starts_with("server_name")),
        "the example dials gw.example.net and sets no server_name:\n{client_text}"
    );
    let gw_socket = socket_path(&lab, "vpc-gw-1");
    let _gw = start_daemon(
        &lab,
        Host::VpcGateway,
        &connector,
        &gw_socket,
        "connector.log",
    );
    let socket = socket_path(&lab, "ops-alice");
    let daemon = start_daemon(&lab, Host::Operator, &client, &socket, "client.log");
    let p = wait_for(
        &lab,
        Host::Operator,
        &socket,
        Duration::from_secs(10),
        "connected to gw.example.net",
        connected,
    );
    assert_eq!(
        (p.identity.as_str(), p.remote.as_str()),
        ("vpc-gw-1", format!("{}:7844", addr::GW_WAN).as_str()),
        "resolved by the public resolver, verified by its DNS SAN; log:\n{}",
        daemon.log()
    );
    assert!(ping(&lab, Host::Operator), "no VPC through the tunnel");

    let s = status_json(&lab, Host::Operator, &socket);
    let tls = s.tls.expect("tls status");
    assert_eq!(
        (tls.identity.as_str(), tls.profile.as_str(), tls.warning),
        ("ops-alice", "client", None)
    );
    assert!(
        (395..=397).contains(&tls.expires_in_days),
        "{}",
        tls.expires_in_days
    );
    assert_eq!(tls.crl.map(|c| c.revoked), Some(0));
    let text = status_text(&lab, Host::Operator, &socket);
    assert!(
        text.contains("certificate: ops-alice (client), serial ") && text.contains("days left"),
        "{text}"
    );
    status_validated(&lab, Host::Operator, &socket);
    status_validated(&lab, Host::VpcGateway, &gw_socket);

    // The client checks its connector against the CRL too: revoked, its session ends on the
    // client's own reload and it is not accepted again.
    let d = pki.to_str().expect("utf-8");
    ctl_ok(&lab, &["pki", "revoke", "vpc-gw-1", "--dir", d]);
    daemon.signal(libc::SIGHUP).expect("SIGHUP");
    let closed = wait_for(
        &lab,
        Host::Operator,
        &socket,
        Duration::from_secs(2),
        "the client drops its revoked connector",
        |s| {
            refusals(s).into_iter().find(|r| {
                r.identity.as_deref() == Some("vpc-gw-1") && r.reason == "certificate revoked"
            })
        },
    );
    eprintln!("{closed:?}");
    let state = wait_for(
        &lab,
        Host::Operator,
        &socket,
        Duration::from_secs(10),
        "reconnects refused",
        |s| {
            let t = s.tunnel.as_ref()?;
            assert!(connected(s).is_none(), "reconnected to a revoked connector");
            t.state
                .contains("invalid peer certificate: Revoked")
                .then(|| t.state.clone())
        },
    );
    eprintln!("client: {state}");
}
