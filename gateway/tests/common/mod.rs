//! Support shared by the daemon's integration tests: a gatewayd running in a lab namespace,
//! and a look at what the kernel has attached, asked from inside that namespace.
#![allow(
    dead_code,
    reason = "each test file uses a different part of this module"
)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use gateway::api::Status;
use gateway::dataplane::AttachedProgram;
use gateway_lab::{Host, Lab, Spawned};

pub const GATEWAYD: &str = env!("CARGO_BIN_EXE_gatewayd");
pub const GATEWAYCTL: &str = env!("CARGO_BIN_EXE_gatewayctl");

/// A config for the operator host with the classifier on its LAN interface. `extra` is appended
/// verbatim (routes, usually).
pub fn write_config(lab: &Lab, name: &str, interfaces: &[&str], extra: &str) -> PathBuf {
    write_config_attach(lab, name, interfaces, None, extra)
}

/// [`write_config`] with `[dataplane] attach = ATTACH` when given ("tc" forces legacy TC).
pub fn write_config_attach(
    lab: &Lab,
    name: &str,
    interfaces: &[&str],
    attach: Option<&str>,
    extra: &str,
) -> PathBuf {
    let dir = lab.dir();
    let path = dir.join(format!("{name}.toml"));
    let ifaces: Vec<String> = interfaces.iter().map(|i| format!("{i:?}")).collect();
    let attach = attach
        .map(|a| format!("attach = \"{a}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "[node]\nname = \"{name}\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n[dataplane]\ninterfaces = [{}]\n{attach}\n{extra}",
        socket_path(lab, name).display(),
        dir.join(format!("{name}-state")).display(),
        ifaces.join(", ")
    );
    std::fs::write(&path, text).expect("write config");
    path
}

pub fn socket_path(lab: &Lab, name: &str) -> PathBuf {
    lab.dir().join(format!("{name}.sock"))
}

/// Starts gatewayd in `host`'s namespace and waits (bounded) until its socket answers.
pub fn start_daemon(lab: &Lab, host: Host, config: &Path, socket: &Path, log: &str) -> Spawned {
    let argv = [GATEWAYD, "--config", config.to_str().expect("utf-8 path")];
    start_daemon_argv(lab, host, &argv, socket, log)
}

/// Like [`start_daemon`], for a gatewayd started through a wrapper (setpriv, env).
pub fn start_daemon_argv(
    lab: &Lab,
    host: Host,
    argv: &[&str],
    socket: &Path,
    log: &str,
) -> Spawned {
    let mut daemon = lab.spawn(host, argv, log).expect("spawn gatewayd");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return daemon;
        }
        if let Some(status) = daemon.try_wait().expect("poll gatewayd") {
            panic!(
                "gatewayd exited with {status} before it was ready; log:\n{}",
                daemon.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "gatewayd not ready within 15 s; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn gatewayctl(lab: &Lab, host: Host, args: &[&str]) -> Output {
    let mut argv = vec![GATEWAYCTL];
    argv.extend_from_slice(args);
    lab.run(host, &argv).expect("run gatewayctl")
}

/// `gatewayctl status --json`, parsed back into the type the daemon serialised.
pub fn status_json(lab: &Lab, host: Host, socket: &Path) -> Status {
    let out = status_json_output(lab, host, socket);
    serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "status --json is not a Status ({e}):\n{}",
            String::from_utf8_lossy(&out)
        )
    })
}

/// What `gatewayctl status --json` printed, after checking it succeeded.
pub fn status_json_output(lab: &Lab, host: Host, socket: &Path) -> Vec<u8> {
    let out = gatewayctl(
        lab,
        host,
        &[
            "status",
            "--json",
            "--socket",
            socket.to_str().expect("utf-8"),
        ],
    );
    assert!(
        out.status.success(),
        "gatewayctl status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Programs the kernel reports at TCX ingress of `iface` inside namespace `ns`. Asked from a
/// thread that enters the namespace, because network namespaces are per thread; the test's
/// other threads stay where they were.
pub fn tcx_ingress_programs(ns: &str, iface: &str) -> Vec<AttachedProgram> {
    let ns_path = format!("/var/run/netns/{ns}");
    let iface = iface.to_string();
    std::thread::spawn(move || {
        let f = File::open(&ns_path).unwrap_or_else(|e| panic!("open {ns_path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {ns_path}: {}",
            std::io::Error::last_os_error()
        );
        gateway::dataplane::attached_programs(&iface).expect("query tcx")
    })
    .join()
    .expect("namespace thread")
}

/// Moves the calling thread into namespace `ns` (network namespaces are per thread); spawn a
/// thread for it, so the test's other threads stay where they were.
pub fn enter_netns(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

pub fn classifier_count(ns: &str, iface: &str) -> usize {
    tcx_ingress_programs(ns, iface)
        .iter()
        .filter(|p| p.name == gateway_common::programs::CLASSIFY)
        .count()
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `GET path` from `addr` inside namespace `ns` (a thread that entered it), the body.
pub fn http_get_in_ns(ns: &str, addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let ns_path = format!("/var/run/netns/{ns}");
    let (addr, path) = (addr.to_string(), path.to_string());
    std::thread::spawn(move || {
        let f = File::open(&ns_path).unwrap_or_else(|e| panic!("open {ns_path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let mut s = std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
        let mut response = String::new();
        s.read_to_string(&mut response).expect("response");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end: {response}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    })
    .join()
    .expect("namespace thread")
}

/// The value of the series `line_prefix` (name and labels) in an OpenMetrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `gatewayctl status --json` exactly as printed, validated against docs/status.schema.json.
pub fn status_validated(lab: &Lab, host: Host, socket: &Path) -> serde_json::Value {
    let value: serde_json::Value =
        serde_json::from_slice(&status_json_output(lab, host, socket)).expect("JSON");
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/status.schema.json"
        ))
        .expect("read the schema"),
    )
    .expect("the schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "status --json breaks the documented schema: {errors:#?}\n{value:#}"
    );
    value
}

/// SIGTERM, then the clean exit expected of gatewayd; its log when it does not exit 0.
pub fn stop_cleanly(daemon: &mut Spawned) {
    daemon.terminate().expect("SIGTERM");
    let exit = daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("gatewayd exits");
    assert!(
        exit.success(),
        "gatewayd exit {exit}; log:\n{}",
        daemon.log()
    );
}

/// `gatewayctl status --watch --interval 0.3 --socket SOCKET` running in the background in
/// `host`, its output in `log`.
pub fn spawn_watch(lab: &Lab, host: Host, socket: &str, log: &str) -> Spawned {
    lab.spawn(
        host,
        &[
            GATEWAYCTL,
            "status",
            "--watch",
            "--interval",
            "0.3",
            "--socket",
            socket,
        ],
        log,
    )
    .expect("spawn gatewayctl status --watch")
}

/// How status says our program is attached at `iface` (one of `interfaces` or `dns_egress`):
/// the kernel's report for our program, and the daemon's own mode, which must agree.
pub fn attached_via(iface: &gateway::api::InterfaceStatus) -> gateway::api::AttachKind {
    let ours = iface
        .programs
        .iter()
        .find(|p| p.ours)
        .unwrap_or_else(|| panic!("our program is not at {}: {iface:?}", iface.name));
    let mode = ours.mode.expect("the kernel's mode is reported");
    assert_eq!(iface.attach, Some(mode), "{iface:?}");
    mode
}

/// The client's peer while it says it is connected.
pub fn client_peer(lab: &Lab, socket: &Path) -> Option<gateway::api::PeerStatus> {
    let s = status_json(lab, Host::Operator, socket);
    let t = s.tunnel?;
    if !t.state.starts_with("connected") {
        return None;
    }
    t.peers.into_iter().next()
}

/// Waits until the client is connected (over `transport`, when given) and returns its peer;
/// fails the test if that takes more than `within` seconds from `since`.
pub fn wait_transport(
    lab: &Lab,
    socket: &Path,
    transport: Option<&str>,
    since: Instant,
    within: u64,
    client: &Spawned,
) -> gateway::api::PeerStatus {
    loop {
        if let Some(p) = client_peer(lab, socket)
            && transport.is_none_or(|t| p.transport == t)
        {
            eprintln!("connected over {} after {:?}", p.transport, since.elapsed());
            return p;
        }
        assert!(
            since.elapsed() < Duration::from_secs(within),
            "not connected over {transport:?} within {within} s; client log:\n{}",
            client.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A long ssh session that prints a tick every 0.2 s until told to stop: a session that must
/// survive a move shows it by ticking on, then ending cleanly.
pub struct Ticking {
    session: Spawned,
    stop: PathBuf,
}

impl Ticking {
    /// Opens it from `host` to `target` and waits (bounded) for its first ticks.
    pub fn start(lab: &Lab, host: Host, target: &str) -> Ticking {
        let stop = lab.dir().join("stop-ticking");
        let remote = format!(
            "while [ ! -e {} ]; do echo tick; sleep 0.2; done; echo finished",
            stop.display()
        );
        let argv = lab.ssh_argv(target, &remote);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let session = lab.spawn(host, &argv, "long-ssh.log").expect("ssh");
        let t = Ticking { session, stop };
        t.ticks_on(3, "ssh session never started");
        t
    }

    fn ticks(&self) -> usize {
        self.session.log().matches("tick").count()
    }

    /// Waits up to 10 s for `more` ticks than now; fails the test with `what` otherwise.
    pub fn ticks_on(&self, more: usize, what: &str) {
        let want = self.ticks() + more;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ticks() < want {
            assert!(Instant::now() < deadline, "{what}:\n{}", self.session.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Tells it to stop; it must end by itself, cleanly, within 10 s.
    pub fn finish(mut self) {
        std::fs::write(&self.stop, "").expect("stop file");
        let status = self
            .session
            .wait_timeout(Duration::from_secs(10))
            .expect("ssh ends");
        let log = self.session.log();
        assert!(status.success(), "ssh: {status}\n{log}");
        assert!(log.contains("finished"), "{log}");
    }
}
