//! `[client] dns = "resolved"` against a real systemd-resolved: the binary `cargo xtask setup`
//! extracts from Debian's package (never installed), run on the operator host's namespace
//! inside a mount namespace of its own (tmpfs on /run/systemd, an empty resolv.conf, so nothing
//! of the host's is read or written) and on a private D-Bus (a dbus-daemon with its own
//! config). Checked the way a user would, with resolvectl, busctl and dig.

mod common;
#[path = "common/pair.rs"]
mod pair;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use gateway_lab::{Host, Lab, LabOptions, Spawned, addr, zone};
use pair::{CLIENT, CONNECTOR, POLICY, wait_connected};

/// The extracted package of the installed systemd's version (see xtask/src/resolved.rs).
fn package_dir() -> PathBuf {
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
struct Resolved {
    bus: String,
    resolvectl: PathBuf,
    log: PathBuf,
    daemon: Option<Spawned>,
    _dbus: Spawned,
}

impl Resolved {
    /// The bus only; [`start`](Self::start) adds resolved.
    fn bus(lab: &Lab) -> Resolved {
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
    fn start(&mut self, lab: &Lab) {
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
            .spawn(
                Host::Operator,
                &["unshare", "-m", "sh", &script],
                "resolved.log",
            )
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
    fn polkit(&mut self, lab: &Lab) -> Spawned {
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
    fn allow(polkitd: &Spawned, user: &str) {
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

    fn env(&self) -> String {
        format!("DBUS_SYSTEM_BUS_ADDRESS={}", self.bus)
    }

    fn resolvectl(&self, lab: &Lab, args: &[&str]) -> std::process::Output {
        let env = self.env();
        let tool = self.resolvectl.display().to_string();
        let mut argv = vec!["env", &env, &tool, "--no-pager"];
        argv.extend_from_slice(args);
        lab.run(Host::Operator, &argv).expect("resolvectl")
    }

    fn busctl(&self, lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
        let env = self.env();
        let mut argv = vec!["env", &env, "busctl", "--system"];
        argv.extend_from_slice(args);
        lab.run_ok(Host::Operator, &argv)
    }

    /// A property of the TUN's link object in resolved.
    fn link_property(&self, lab: &Lab, ifindex: &str, property: &str) -> String {
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

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn wait_for(within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "no {what} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Tunnel {
    lab: Lab,
    connector: Spawned,
    connector_config: PathBuf,
    connector_socket: PathBuf,
    client_config: PathBuf,
    client_socket: PathBuf,
}

/// The lab with a connector serving `hoge-vpc.com` and a client config with `client` as its
/// `[client]` section; the client is not started.
fn tunnel() -> Tunnel {
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })
    .expect("lab");
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
        let out = gatewayctl(&lab, Host::Operator, &args);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let tls = |name: &str| {
        format!(
            "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n",
            pki.display()
        )
    };
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
fn start_client(t: &Tunnel, resolved: &Resolved) -> Spawned {
    start_client_wrapped(t, resolved, &[])
}

/// [`start_client`] through `wrapper` (setpriv, say).
fn start_client_wrapped(t: &Tunnel, resolved: &Resolved, wrapper: &[&str]) -> Spawned {
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
fn resolved_status(
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

fn zone_queries(t: &Tunnel) -> u64 {
    let s = status_json(&t.lab, Host::VpcGateway, &t.connector_socket);
    s.tunnel
        .expect("tunnel")
        .zones
        .iter()
        .find(|z| z.domain == zone::DOMAIN)
        .map_or(0, |z| z.queries)
}

#[test]
fn resolved_sends_the_zone_to_the_stub_through_the_tunnel_and_forgets_the_link_on_stop() {
    let t = tunnel();
    let lab = &t.lab;
    let mut resolved = Resolved::bus(lab);
    resolved.start(lab);
    let mut client = start_client(&t, &resolved);

    let r = resolved_status(&t, Duration::from_secs(10), |r| !r.domains.is_empty());
    assert!(r.on && r.error.is_none(), "{r:?}");
    assert_eq!(r.domains, [zone::DOMAIN]);
    let stub = r.stub.clone().expect("stub");
    assert!(
        stub.starts_with("127.0.0.1:") && !stub.ends_with(":0"),
        "{stub}"
    );

    // What resolved says about the TUN link, as a user would ask.
    let out = resolved.resolvectl(lab, &["status", "optun"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr_of(&out));
    assert!(text.contains(&format!("DNS Servers: {stub}")), "{text}");
    assert!(
        text.contains(&format!("DNS Domain: ~{}", zone::DOMAIN)),
        "{text}"
    );
    assert!(text.contains("-DefaultRoute"), "{text}");
    assert!(text.contains("-LLMNR") && text.contains("-mDNS"), "{text}");
    let ifindex = lab
        .run_ok(Host::Operator, &["cat", "/sys/class/net/optun/ifindex"])
        .expect("ifindex");
    let ifindex = ifindex.trim();
    assert_eq!(
        resolved.link_property(lab, ifindex, "Domains"),
        format!("a(sb) 1 \"{}\" true", zone::DOMAIN)
    );
    assert_eq!(
        resolved.link_property(lab, ifindex, "DefaultRoute"),
        "b false"
    );

    // A query through resolved (its D-Bus API, then its stub at 127.0.0.53) reaches the
    // private resolver through the tunnel.
    let before = zone_queries(&t);
    let db = format!("db.{}", zone::DOMAIN);
    let out = resolved.resolvectl(lab, &["query", "--cache=no", &db]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr_of(&out));
    assert!(text.contains(zone::DB_PRIVATE), "{text}");
    let dig = lab
        .run_ok(
            Host::Operator,
            &["dig", "+short", "+time=2", "+tries=2", "@127.0.0.53", &db],
        )
        .expect("dig");
    assert_eq!(dig.trim(), zone::DB_PRIVATE);
    assert!(zone_queries(&t) > before, "the connector answered none");
    // Other names are not the tunnel's: the link is no default route.
    let out = resolved.resolvectl(lab, &["query", "--cache=no", "www.example.net"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A connector reload that adds a zone reaches resolved: the link's domains follow.
    let text = std::fs::read_to_string(&t.connector_config).expect("config");
    std::fs::write(
        &t.connector_config,
        format!(
            "{text}\n[[dns.zone]]\ndomain = \"corp.example\"\nservers = [\"{}\"]\n",
            addr::RESOLVER_PRIMARY
        ),
    )
    .expect("config");
    t.connector.signal(libc::SIGHUP).expect("SIGHUP");
    let r = resolved_status(&t, Duration::from_secs(10), |r| r.domains.len() == 2);
    assert_eq!(r.domains, [zone::DOMAIN, "corp.example"]);
    let out = resolved.resolvectl(lab, &["domain", "optun"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("~{} ~corp.example", zone::DOMAIN)),
        "{text}"
    );

    // Stopped, the client reverts the link (while it still exists) and resolved has nothing
    // of it left.
    stop_cleanly(&mut client);
    assert!(
        resolved.log().contains("member=RevertLink"),
        "resolved was not asked to revert the link:\n{}",
        resolved.log()
    );
    assert!(
        !client
            .log()
            .contains("reverting the TUN link in systemd-resolved failed"),
        "{}",
        client.log()
    );
    let out = resolved.resolvectl(lab, &["domain"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(zone::DOMAIN), "{text}");
    let out = resolved.resolvectl(lab, &["dns"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&stub));
    let out = lab
        .run(
            Host::Operator,
            &["dig", "+short", "+time=1", "+tries=1", "@127.0.0.53", &db],
        )
        .expect("dig");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(zone::DB_PRIVATE),
        "still answered after stop"
    );
}

#[test]
fn a_client_asking_for_resolved_starts_without_it_says_why_and_sets_the_link_once_it_runs() {
    let t = tunnel();
    let lab = &t.lab;
    let mut resolved = Resolved::bus(lab);
    let _client = start_client(&t, &resolved);

    let r = resolved_status(&t, Duration::from_secs(10), |r| r.error.is_some());
    assert!(r.on && r.domains.is_empty(), "{r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(error.contains("systemd-resolved is not running"), "{error}");
    let out = gatewayctl(
        lab,
        Host::Operator,
        &[
            "status",
            "--socket",
            t.client_socket.to_str().expect("utf-8"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("systemd-resolved: NOT SET: systemd-resolved is not running"),
        "{text}"
    );

    // resolved comes up later (a laptop's boot, a restart): the client retries every 5 s.
    resolved.start(lab);
    let r = resolved_status(&t, Duration::from_secs(15), |r| r.error.is_none());
    assert_eq!(r.domains, [zone::DOMAIN], "{r:?}");
    let out = resolved.resolvectl(lab, &["domain", "optun"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("~{}", zone::DOMAIN)), "{text}");
}

#[test]
fn an_unset_dns_uses_resolved_when_it_runs() {
    let t = tunnel();
    let lab = &t.lab;
    let text = std::fs::read_to_string(&t.client_config).expect("config");
    std::fs::write(&t.client_config, text.replace("dns = \"resolved\"\n", "")).expect("config");
    let mut resolved = Resolved::bus(lab);
    resolved.start(lab);
    let _client = start_client(&t, &resolved);
    let r = resolved_status(&t, Duration::from_secs(10), |r| !r.domains.is_empty());
    assert!(r.on, "{r:?}");
    assert!(r.reason.contains("on the system bus"), "{r:?}");
    let dig = lab
        .run_ok(
            Host::Operator,
            &[
                "dig",
                "+short",
                "+time=2",
                "+tries=2",
                "@127.0.0.53",
                &format!("db.{}", zone::DOMAIN),
            ],
        )
        .expect("dig");
    assert_eq!(dig.trim(), zone::DB_PRIVATE);
}

/// As the unit runs it — user `daemon` standing in for `gateway`, the unit's capabilities
/// only — resolved asks polkit: refused until the shipped rule is installed (status says so
/// and names the rule), then set at the next retry.
#[test]
fn a_client_run_as_the_units_user_sets_the_link_once_polkit_allows_it() {
    let t = tunnel();
    let lab = &t.lab;
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/gatewayd.service"
    ))
    .expect("unit");
    let caps = |key: &str| -> String {
        let caps: Vec<String> = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in the unit"))
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        format!("-all,{}", caps.join(","))
    };
    let (bounding, ambient) = (caps("CapabilityBoundingSet="), caps("AmbientCapabilities="));
    // /dev/net/tun may be 0600 without udev: a 0666 node of the test's own, bind-mounted in
    // the client's private mount namespace.
    let node = lab.dir().join("tun-node");
    lab.run_ok(
        Host::Operator,
        &[
            "mknod",
            "-m",
            "0666",
            node.to_str().expect("utf-8"),
            "c",
            "10",
            "200",
        ],
    )
    .expect("mknod");
    let out = Command::new("chown")
        .args(["-R", "daemon:daemon"])
        .arg(lab.dir())
        .output()
        .expect("chown");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mount = format!(
        "mount --bind {} /dev/net/tun && exec \"$@\"",
        node.display()
    );

    let mut resolved = Resolved::bus(lab);
    let polkitd = resolved.polkit(lab);
    resolved.start(lab);
    let client = start_client_wrapped(
        &t,
        &resolved,
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &mount,
            "sh",
            "setpriv",
            "--reuid=daemon",
            "--regid=daemon",
            "--clear-groups",
            "--bounding-set",
            &bounding,
            "--inh-caps",
            &ambient,
            "--ambient-caps",
            &ambient,
        ],
    );
    let uid = std::fs::read_to_string(format!("/proc/{}/status", client.id()))
        .expect("proc status")
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string());
    assert_eq!(uid.as_deref(), Some("1"), "the client runs as daemon");

    let r = resolved_status(&t, Duration::from_secs(10), |r| r.error.is_some());
    let error = r.error.clone().unwrap_or_default();
    assert!(
        error.contains("install systemd/gatewayd-resolved.rules"),
        "{error}"
    );
    assert!(r.domains.is_empty(), "{r:?}");

    Resolved::allow(&polkitd, "daemon");
    let r = resolved_status(&t, Duration::from_secs(15), |r| r.error.is_none());
    assert_eq!(r.domains, [zone::DOMAIN], "{r:?}");
    let dig = lab
        .run_ok(
            Host::Operator,
            &[
                "dig",
                "+short",
                "+time=2",
                "+tries=2",
                "@127.0.0.53",
                &format!("db.{}", zone::DOMAIN),
            ],
        )
        .expect("dig");
    assert_eq!(dig.trim(), zone::DB_PRIVATE);
    let mut client = client;
    stop_cleanly(&mut client);
    let out = resolved.resolvectl(lab, &["domain"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(zone::DOMAIN));
    assert!(
        resolved.log().contains("member=RevertLink"),
        "{}",
        resolved.log()
    );
}
