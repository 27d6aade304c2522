//! The lab's systemd-resolved for `gateway/tests/resolved.rs`: Debian's binary as `cargo xtask
//! setup` extracts it (never installed), run in the operator host's network namespace and a
//! mount namespace of its own (tmpfs on /run/systemd, an empty resolv.conf: nothing of the
//! host's is read or written), on a private dbus-daemon, with polkitd there when a test asks;
//! and a connector serving `hoge-vpc.com` with a client config using it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::pair::{CLIENT, CONNECTOR, POLICY, issue_pki, tls_section, wait_connected};
use gateway_lab::{Host, Lab, LabOptions, Spawned, addr, zone};

/// The extracted package of the installed systemd's version (see xtask/src/resolved.rs).
pub fn package_dir() -> PathBuf {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "systemd"])
        .output()
        .expect("dpkg-query");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/lab/systemd-resolved")
        .join(&version);
    assert!(
        dir.join("lib/systemd/systemd-resolved").is_file(),
        "no systemd-resolved {version} in {}: run `cargo xtask setup`",
        dir.display()
    );
    dir
}

/// A private system bus and systemd-resolved on it, in the operator host's namespace.
pub struct Resolved {
    pub bus: String,
    pub resolvectl: PathBuf,
    pub log: PathBuf,
    pub daemon: Option<Spawned>,
    pub _dbus: Spawned,
}

impl Resolved {
    /// The bus only; [`start`](Self::start) adds resolved.
    pub fn bus(lab: &Lab) -> Resolved {
        let dir = lab.dir();
        let socket = dir.join("system_bus.sock");
        let conf = dir.join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
                 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                 <busconfig>\n  <type>system</type>\n  <listen>unix:path={}</listen>\n  \
                 <auth>EXTERNAL</auth>\n  <policy context=\"default\">\n    \
                 <allow user=\"*\"/>\n    <allow own=\"*\"/>\n    \
                 <allow send_destination=\"*\"/>\n    <allow receive_sender=\"*\"/>\n  \
                 </policy>\n</busconfig>\n",
                socket.display()
            ),
        )
        .expect("bus config");
        let conf_arg = format!("--config-file={}", conf.display());
        let dbus = lab
            .spawn(
                Host::Operator,
                &["dbus-daemon", &conf_arg, "--nofork", "--nopidfile"],
                "dbus.log",
            )
            .expect("dbus-daemon");
        wait_for(Duration::from_secs(10), "the private bus", || {
            socket.exists()
        });
        let pkg = package_dir();
        Resolved {
            bus: format!("unix:path={}", socket.display()),
            resolvectl: pkg.join("usr/bin/resolvectl"),
            log: dir.join("resolved.log"),
            daemon: None,
            _dbus: dbus,
        }
    }

    /// systemd-resolved as `nobody` with the capabilities its unit gives it; no fallback or
    /// upstream servers, no LLMNR/mDNS: only what a link is told reaches anywhere.
    pub fn start(&mut self, lab: &Lab) {
        self.start_in(lab, Host::Operator);
    }

    /// [`start`](Self::start) in `host`'s network namespace.
    pub fn start_in(&mut self, lab: &Lab, host: Host) {
        let script = lab.dir().join("resolved.sh");
        let binary = package_dir().join("lib/systemd/systemd-resolved");
        std::fs::write(
            &script,
            format!(
                "set -e\n\
                 mount --make-rprivate /\n\
                 mount -t tmpfs tmpfs /run/systemd\n\
                 mkdir -p /run/systemd/resolve /run/systemd/resolved.conf.d\n\
                 chown nobody:nogroup /run/systemd/resolve\n\
                 printf '[Resolve]\\nDNS=\\nFallbackDNS=\\nLLMNR=no\\nMulticastDNS=no\\nDNSSEC=no\\n' \
                   > /run/systemd/resolved.conf.d/lab.conf\n\
                 : > /run/systemd/resolv.conf.empty\n\
                 mount --bind /run/systemd/resolv.conf.empty /etc/resolv.conf\n\
                 export DBUS_SYSTEM_BUS_ADDRESS={bus} SYSTEMD_LOG_LEVEL=debug\n\
                 exec setpriv --reuid nobody --regid nogroup --clear-groups \
                   --inh-caps +net_bind_service,+net_raw,+setpcap \
                   --ambient-caps +net_bind_service,+net_raw,+setpcap {binary}\n",
                bus = self.bus,
                binary = binary.display(),
            ),
        )
        .expect("resolved script");
        let script = script.display().to_string();
        let daemon = lab
            .spawn(host, &["unshare", "-m", "sh", &script], "resolved.log")
            .expect("systemd-resolved");
        self.daemon = Some(daemon);
        wait_for(Duration::from_secs(10), "resolved on the bus", || {
            self.busctl(
                lab,
                &[
                    "call",
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "NameHasOwner",
                    "s",
                    "org.freedesktop.resolve1",
                ],
            )
            .is_ok_and(|o| o.trim() == "b true")
        });
    }

    /// polkitd on the private bus, as resolved asks it about callers that are not root: the
    /// resolve1 actions (owned by `nobody`, whom resolved runs as here) and, once
    /// [`allow`](Self::allow) is called, the shipped rule for the user `user`.
    pub fn polkit(&mut self, lab: &Lab) -> Spawned {
        let script = lab.dir().join("polkit.sh");
        let policy =
            package_dir().join("usr/share/polkit-1/actions/org.freedesktop.resolve1.policy");
        std::fs::write(
            &script,
            format!(
                "set -e\n\
                 mount --make-rprivate /\n\
                 mount -t tmpfs tmpfs /etc/polkit-1/rules.d\n\
                 mount -t tmpfs tmpfs /usr/share/polkit-1/actions\n\
                 sed 's/unix-user:systemd-resolve/unix-user:nobody/' {policy} \
                   > /usr/share/polkit-1/actions/org.freedesktop.resolve1.policy\n\
                 export DBUS_SYSTEM_BUS_ADDRESS={bus}\n\
                 exec /usr/lib/polkit-1/polkitd --no-debug\n",
                policy = policy.display(),
                bus = self.bus,
            ),
        )
        .expect("polkit script");
        let script = script.display().to_string();
        let polkitd = lab
            .spawn(
                Host::Operator,
                &["unshare", "-m", "sh", &script],
                "polkitd.log",
            )
            .expect("polkitd");
        wait_for(Duration::from_secs(10), "polkitd on the bus", || {
            self.busctl(
                lab,
                &[
                    "call",
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "NameHasOwner",
                    "s",
                    "org.freedesktop.PolicyKit1",
                ],
            )
            .is_ok_and(|o| o.trim() == "b true")
        });
        polkitd
    }

    /// The shipped rule, for `user` instead of `gateway`, into the running polkitd's rules
    /// (in its own mount namespace; polkitd reloads on the change).
    pub fn allow(polkitd: &Spawned, user: &str) {
        let rule = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../systemd/gatewayd-resolved.rules"
        ))
        .expect("rule");
        assert!(rule.contains("subject.user == \"gateway\""), "{rule}");
        let dir = format!("/proc/{}/root/etc/polkit-1/rules.d", polkitd.id());
        std::fs::write(
            format!("{dir}/50-gatewayd-resolved.rules"),
            rule.replace("\"gateway\"", &format!("\"{user}\"")),
        )
        .expect("install the rule");
    }

    pub fn env(&self) -> String {
        format!("DBUS_SYSTEM_BUS_ADDRESS={}", self.bus)
    }

    pub fn resolvectl(&self, lab: &Lab, args: &[&str]) -> std::process::Output {
        let env = self.env();
        let tool = self.resolvectl.display().to_string();
        let mut argv = vec!["env", &env, &tool, "--no-pager"];
        argv.extend_from_slice(args);
        lab.run(Host::Operator, &argv).expect("resolvectl")
    }

    pub fn busctl(&self, lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
        let env = self.env();
        let mut argv = vec!["env", &env, "busctl", "--system"];
        argv.extend_from_slice(args);
        lab.run_ok(Host::Operator, &argv)
    }

    /// A property of the TUN's link object in resolved.
    pub fn link_property(&self, lab: &Lab, ifindex: &str, property: &str) -> String {
        let path = self
            .busctl(
                lab,
                &[
                    "call",
                    "org.freedesktop.resolve1",
                    "/org/freedesktop/resolve1",
                    "org.freedesktop.resolve1.Manager",
                    "GetLink",
                    "i",
                    ifindex,
                ],
            )
            .expect("GetLink");
        let path = path.trim().trim_start_matches("o ").trim_matches('"');
        self.busctl(
            lab,
            &[
                "get-property",
                "org.freedesktop.resolve1",
                path,
                "org.freedesktop.resolve1.Link",
                property,
            ],
        )
        .expect("get-property")
        .trim()
        .to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub fn wait_for(within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "no {what} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Tunnel {
    pub lab: Lab,
    pub connector: Spawned,
    pub connector_config: PathBuf,
    pub connector_socket: PathBuf,
    pub client_config: PathBuf,
    pub client_socket: PathBuf,
}

/// The lab with a connector serving `hoge-vpc.com` and a client config with `client` as its
/// `[client]` section; the client is not started.
pub fn tunnel() -> Tunnel {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
    let pki = issue_pki(&lab);
    let tls = |name: &str| tls_section(&pki, name);
    let connector_config = write_config(
        &lab,
        CONNECTOR,
        &[],
        &format!(
            "[tunnel]\nlisten = \"0.0.0.0:7844\"\ntun = \"gwtun\"\n\n{}\n\
             [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\n\
             [[route]]\ncidr = \"{}\"\n{POLICY}\n\
             [[dns.zone]]\ndomain = \"{}\"\nservers = [\"{}\"]\n",
            tls(CONNECTOR),
            addr::VPC_CIDR,
            zone::DOMAIN,
            addr::RESOLVER_PRIMARY,
        ),
    );
    let connector_socket = socket_path(&lab, CONNECTOR);
    let connector = start_daemon(
        &lab,
        Host::VpcGateway,
        &connector_config,
        &connector_socket,
        "connector.log",
    );
    let client_config = write_config(
        &lab,
        CLIENT,
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"{CONNECTOR}\"\ntun = \"optun\"\n\n\
             {}\n[client]\ndns = \"resolved\"\n",
            addr::GW_WAN,
            tls(CLIENT)
        ),
    );
    Tunnel {
        client_socket: socket_path(&lab, CLIENT),
        lab,
        connector,
        connector_config,
        connector_socket,
        client_config,
    }
}

/// The client, with the private bus as its system bus.
pub fn start_client(t: &Tunnel, resolved: &Resolved) -> Spawned {
    start_client_wrapped(t, resolved, &[])
}

/// [`start_client`] through `wrapper` (setpriv, say).
pub fn start_client_wrapped(t: &Tunnel, resolved: &Resolved, wrapper: &[&str]) -> Spawned {
    let env = resolved.env();
    let config = t.client_config.display().to_string();
    let mut argv = vec!["env", &env];
    argv.extend_from_slice(wrapper);
    argv.extend([GATEWAYD, "--config", &config]);
    let client = start_daemon_argv(
        &t.lab,
        Host::Operator,
        &argv,
        &t.client_socket,
        "client.log",
    );
    wait_connected(&t.lab, &t.client_socket, Duration::from_secs(15));
    client
}

/// The client's view of resolved, once `ok` holds (bounded).
pub fn resolved_status(
    t: &Tunnel,
    within: Duration,
    ok: impl Fn(&gateway::api::ResolvedStatus) -> bool,
) -> gateway::api::ResolvedStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = status_json(&t.lab, Host::Operator, &t.client_socket);
        let r = s.tunnel.and_then(|t| t.resolved).expect("resolved status");
        if ok(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "resolved status stays {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn zone_queries(t: &Tunnel) -> u64 {
    let s = status_json(&t.lab, Host::VpcGateway, &t.connector_socket);
    s.tunnel
        .expect("tunnel")
        .zones
        .iter()
        .find(|z| z.domain == zone::DOMAIN)
        .map_or(0, |z| z.queries)
}
