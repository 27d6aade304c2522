//! A connector and a client in the lab with the tunnel up, for the forward-filter and fault
//! tests; and TCP from inside a lab namespace (listen, connect from a chosen source), which
//! the lab's command-line tools cannot do.
#![allow(
    dead_code,
    reason = "each test file uses a different part of this module"
)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;
use gateway_lab::{Host, Lab, LabOptions, Spawned, addr};

pub const CONNECTOR: &str = "lab-gw";
pub const CLIENT: &str = "ops-alice";

pub const POLICY: &str = r#"
[[policy]]
identity = "ops-*"
allow = ["10.128.0.0/16 tcp/22", "10.128.0.0/16 icmp", "10.128.0.0/16 udp/53",
         "fd00:128::/64"]
advertise = ["192.0.2.0/24", "2001:db8:2::/64"]
"#;

/// `[client]` lines: a workstation (its own traffic only).
pub const WORKSTATION: &str = "";
/// A site gateway whose eBPF classifier steers the office LAN into the TUN.
pub const SITE: &str = "lan = [\"lan0\"]\nadvertise = [\"192.0.2.0/24\", \"2001:db8:2::/64\"]\n\
                        dns_intercept = [\"wan0\"]\n";
/// A site gateway that only routes its office LAN (no steering): the kernel forwards it.
pub const ROUTED_SITE: &str = "advertise = [\"192.0.2.0/24\", \"2001:db8:2::/64\"]\n";

pub struct Pair {
    pub lab: Lab,
    pub connector: Spawned,
    pub client: Spawned,
    pub connector_config: PathBuf,
    pub client_config: PathBuf,
    pub connector_socket: PathBuf,
    pub client_socket: PathBuf,
}

/// The lab without the underlay's route to the VPC, a connector with `policy` and a client
/// with the `client` lines ([`WORKSTATION`], [`SITE`], ...), connected.
pub fn start(policy: &str, client: &str) -> Pair {
    start_in(
        Lab::start(LabOptions {
            direct_vpc_route: false,
            servers: true,
        })
        .expect("lab"),
        policy,
        client,
    )
}

/// Like [`start`], in a lab the caller prepared (sysctls, say).
pub fn start_in(lab: Lab, policy: &str, client: &str) -> Pair {
    let pki = issue_pki(&lab);
    let tls = |name: &str| tls_section(&pki, name);
    let connector_config = write_config(
        &lab,
        CONNECTOR,
        &[],
        &format!(
            "[tunnel]\nlisten = \"0.0.0.0:7844\"\ntun = \"gwtun\"\n\n{}\n\
             [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\n\
             [[route]]\ncidr = \"{}\"\n\n[[route]]\ncidr = \"{}\"\n{policy}\n\
             [[dns.zone]]\ndomain = \"hoge-vpc.com\"\nservers = [\"{}\"]\n",
            tls(CONNECTOR),
            addr::VPC_CIDR,
            addr::VPC_CIDR_V6,
            addr::RESOLVER_PRIMARY,
        ),
    );
    let client_config = write_config(
        &lab,
        CLIENT,
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"{CONNECTOR}\"\nsource_port = 7844\n\
             tun = \"optun\"\n\n{}\n[client]\ndns_stub = \"127.0.0.53:53\"\n{client}",
            addr::GW_WAN,
            tls(CLIENT)
        ),
    );
    let connector_socket = socket_path(&lab, CONNECTOR);
    let client_socket = socket_path(&lab, CLIENT);
    let connector = start_daemon(
        &lab,
        Host::VpcGateway,
        &connector_config,
        &connector_socket,
        "connector.log",
    );
    let client = start_daemon(
        &lab,
        Host::Operator,
        &client_config,
        &client_socket,
        "client.log",
    );
    wait_connected(&lab, &client_socket, Duration::from_secs(15));
    Pair {
        lab,
        connector,
        client,
        connector_config,
        client_config,
        connector_socket,
        client_socket,
    }
}

/// Waits (bounded) until the client says it is connected; its status then.
pub fn wait_connected(lab: &Lab, socket: &Path, within: Duration) -> gateway::api::Status {
    wait_tunnel(lab, socket, within, "client not connected", |t| {
        t.state.starts_with("connected") && !t.peers.is_empty()
    })
}

/// Waits (bounded) until a connector says it listens: its status socket answers a moment
/// before its QUIC socket is bound, and a client dialling in that moment rightly moves on to
/// its next target.
pub fn wait_listening(lab: &Lab, socket: &Path, within: Duration) -> gateway::api::Status {
    wait_tunnel(lab, socket, within, "connector not listening", |t| {
        t.state.starts_with("listening")
    })
}

/// Polls the node at `socket` until its tunnel status satisfies `ok`, failing with `what`
/// and the last status after `within`.
fn wait_tunnel(
    lab: &Lab,
    socket: &Path,
    within: Duration,
    what: &str,
    ok: impl Fn(&gateway::api::TunnelStatus) -> bool,
) -> gateway::api::Status {
    let deadline = Instant::now() + within;
    loop {
        let s = status_json(lab, Host::Operator, socket);
        if s.tunnel.as_ref().is_some_and(&ok) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}: {:?}",
            s.tunnel
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ssh root@target cmd` from `host` through whatever route it has; its stdout.
pub fn ssh(lab: &Lab, host: Host, target: &str, cmd: &str) -> anyhow::Result<String> {
    let argv = lab.ssh_argv(target, cmd);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.run_ok(host, &argv)
}

/// The forward filter's drop counter `name` on the node at `socket` in `host`, as its status
/// reads it from the kernel.
pub fn filter_drops(lab: &Lab, host: Host, socket: &Path, name: &str) -> u64 {
    let s = status_json(lab, host, socket);
    let f = s
        .tunnel
        .and_then(|t| t.forward_filter)
        .unwrap_or_else(|| panic!("{host:?} reports no forward filter"));
    *f.drops
        .get(name)
        .unwrap_or_else(|| panic!("no {name} counter: {:?}", f.drops))
}

/// Runs `f` on a thread inside `host`'s network namespace.
pub fn in_ns<T: Send + 'static>(
    lab: &Lab,
    host: Host,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let ns_path = format!("/var/run/netns/{}", lab.ns(host));
    std::thread::spawn(move || {
        enter(&ns_path);
        f()
    })
    .join()
    .expect("namespace thread")
}

fn enter(ns_path: &str) {
    let f = File::open(ns_path).unwrap_or_else(|e| panic!("open {ns_path}: {e}"));
    // SAFETY: setns on a valid namespace fd affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// A TCP connection from inside `host` to `to`, from `from` when given (address and port),
/// within `timeout`; on success the first line the server sent.
pub fn tcp_connect(
    lab: &Lab,
    host: Host,
    from: Option<SocketAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<String> {
    in_ns(lab, host, move || {
        let domain = socket2::Domain::for_address(to);
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        if let Some(from) = from {
            s.set_reuse_address(true)?;
            s.bind(&from.into())?;
        }
        s.connect_timeout(&to.into(), timeout)?;
        let mut stream: std::net::TcpStream = s.into();
        stream.set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte)? == 1 && byte[0] != b'\n' && line.len() < 100 {
            line.push(byte[0] as char);
        }
        Ok(line)
    })
}

/// A TCP server in a lab namespace that greets each connection with a line and closes it;
/// stops when dropped.
pub struct Listener {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn start(lab: &Lab, host: Host, at: SocketAddr, greeting: &'static str) -> Listener {
        let ns_path = format!("/var/run/netns/{}", lab.ns(host));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&ns_path);
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(at),
                socket2::Type::STREAM,
                None,
            )
            .expect("socket");
            socket.set_reuse_address(true).expect("reuse");
            socket.bind(&at.into()).expect("bind");
            socket.listen(16).expect("listen");
            let listener: TcpListener = socket.into();
            listener.set_nonblocking(true).expect("nonblocking");
            let _ = tx.send(());
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let _ = c.write_all(format!("{greeting}\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("listener ready");
        Listener {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A CA, the connector's certificate (connector profile) and the client's, under the lab's
/// `pki/`.
pub fn issue_pki(lab: &Lab) -> std::path::PathBuf {
    let pki = lab.dir().join("pki");
    let d = pki.to_str().expect("utf-8");
    for args in [
        vec!["pki", "init", "--dir", d],
        vec![
            "pki",
            "issue",
            CONNECTOR,
            "--dir",
            d,
            "--profile",
            "connector",
        ],
        vec!["pki", "issue", CLIENT, "--dir", d],
    ] {
        let out = gatewayctl(lab, Host::Operator, &args);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    pki
}

/// The `[tls]` section for `name`'s certificate from [`issue_pki`].
pub fn tls_section(pki: &std::path::Path, name: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n",
        pki.display()
    )
}
