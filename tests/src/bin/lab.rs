//! `lab`: build the lab by hand, sweep leftovers, run the product demo or the bench.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gateway_lab::{Host, Lab, LabOptions, addr, zone};

const USAGE: &str = "usage: lab up [--bin-dir DIR [--transport quic|tcp|hub] | --boringtun PEER_BIN_DIR] | lab sweep | \
                     lab demo --bin-dir DIR | lab bench --bin-dir DIR [...]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("up") => up(&args[1..]),
        Some("sweep") => {
            gateway_lab::sweep();
            Ok(())
        }
        Some("demo") => match (args.get(1).map(String::as_str), args.get(2)) {
            (Some("--bin-dir"), Some(dir)) => demo(Path::new(dir)),
            _ => Err(anyhow::anyhow!(USAGE)),
        },
        Some("bench") => bench(&args[1..]),
        _ => Err(anyhow::anyhow!(USAGE)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the lab and, given a bin dir, the gateway's tunnel across it (as the bench starts
/// it), then waits: for looking at a running tunnel by hand (`perf`, `ss`, `gatewayctl status`).
fn up(args: &[String]) -> anyhow::Result<()> {
    let (mut bin_dir, mut transport, mut boringtun) = (None, "quic".to_string(), None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--bin-dir", Some(d)) => bin_dir = Some(PathBuf::from(d)),
            ("--boringtun", Some(d)) => boringtun = Some(PathBuf::from(d)),
            ("--transport", Some(t)) if ["quic", "tcp", "hub"].contains(&t.as_str()) => {
                transport = t.clone()
            }
            _ => bail!("{USAGE}"),
        }
    }
    let mut lab = Lab::start(LabOptions::default())?;
    if transport == "hub" {
        lab.add_hub()?;
    }
    let _tunnel = match &bin_dir {
        Some(d) => Some(start_tunnel(
            &lab,
            path_str(&d.join("gatewayd"))?,
            path_str(&d.join("gatewayctl"))?,
            false,
            &transport,
        )?),
        None => None,
    };
    let _peer = match &boringtun {
        Some(d) => Some(gateway_lab::bench::peers::start_boringtun(&lab, d)?),
        None => None,
    };
    println!("lab is up; logs and configs in {}", lab.dir().display());
    let hub = (transport == "hub").then_some(Host::Hub);
    for h in Host::ALL.into_iter().chain(hub) {
        println!("  {:?}: ip netns exec {} bash", h, lab.ns(h));
    }
    println!("Ctrl-C (or SIGTERM) tears it down.");
    wait_for_signal();
    println!("tearing down");
    Ok(())
}

/// Blocks SIGINT and SIGTERM and waits for one, so Drop runs and the lab is removed.
fn wait_for_signal() {
    // SAFETY: plain libc signal-mask calls on a zeroed, initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

fn show(lab: &Lab, h: Host, argv: &[&str]) -> anyhow::Result<()> {
    println!("\n[{}] $ {}", host_name(h), argv.join(" "));
    let out = lab.run_ok(h, argv)?;
    print!("{out}");
    Ok(())
}

fn host_name(h: Host) -> &'static str {
    match h {
        Host::Office => "office host 192.0.2.10",
        Host::Operator => "operator host",
        Host::Underlay => "underlay",
        Host::VpcGateway => "VPC gateway",
        Host::Vpc => "VPC host",
        Host::Hub => "hub",
        Host::VpcGateway2 => "second VPC gateway",
    }
}

fn demo(bin_dir: &Path) -> anyhow::Result<()> {
    let gatewayd = bin_dir.join("gatewayd");
    let gatewayctl = bin_dir.join("gatewayctl");
    for b in [&gatewayd, &gatewayctl] {
        if !b.exists() {
            bail!(
                "{} not found; build with `cargo build --release`",
                b.display()
            );
        }
    }
    let (gatewayd, gatewayctl) = (path_str(&gatewayd)?, path_str(&gatewayctl)?);
    println!("building the lab: office - operator host - underlay - VPC gateway - VPC hosts");
    println!("(the underlay has no route to 10.128.0.0/16: the tunnel is the only way in)");
    let lab = Lab::start(LabOptions {
        direct_vpc_route: false,
        servers: true,
    })?;
    let tunnel = start_tunnel(&lab, gatewayd, gatewayctl, true, "auto")?;
    let (client_sock, connector_sock) = (tunnel.client_sock.clone(), tunnel.connector_sock.clone());
    let (mut client, mut connector) = (tunnel.client, tunnel.connector);
    println!("\n--- from the operator host itself (routes into its TUN) ---");
    let ssh = lab.ssh_argv(
        addr::VPC_HOST,
        "echo \"logged in to $(hostname) as $(whoami), from $SSH_CLIENT\"",
    );
    let ssh: Vec<&str> = ssh.iter().map(String::as_str).collect();
    show(&lab, Host::Operator, &ssh)?;
    let db = format!("db.{}", zone::DOMAIN);
    let at = format!("@{}", addr::RESOLVER_PRIMARY);
    show(&lab, Host::Operator, &["dig", "+short", &at, &db])?;
    println!(
        "\n(the normal resolver is the public 198.51.100.53: eBPF steers only the private zone)"
    );
    show(&lab, Host::Operator, &["dig", "+short", &db])?;
    show(&lab, Host::Operator, &["dig", "+short", "www.example.com"])?;
    println!("\n(the client's DNS stub answers the private zone too)");
    show(&lab, Host::Operator, &["dig", "+short", "@127.0.0.53", &db])?;
    show(
        &lab,
        Host::Operator,
        &["ping", "-n", "-c", "3", "-i", "0.2", addr::VPC_HOST],
    )?;
    show(
        &lab,
        Host::Operator,
        &["ping", "-n", "-c", "3", "-i", "0.2", addr::VPC_HOST_V6],
    )?;

    println!("\n--- from the office host behind it (eBPF redirects its packets into the TUN) ---");
    show(&lab, Host::Office, &ssh)?;
    show(&lab, Host::Office, &["dig", "+short", &at, &db])?;
    show(&lab, Host::Office, &["dig", "+short", &db])?;
    show(
        &lab,
        Host::Office,
        &["ping", "-n", "-c", "3", "-i", "0.2", addr::VPC_HOST],
    )?;

    access_demo(&lab, gatewayctl)?;

    show(
        &lab,
        Host::Operator,
        &[gatewayctl, "status", "--socket", path_str(&client_sock)?],
    )?;
    show(
        &lab,
        Host::VpcGateway,
        &[gatewayctl, "status", "--socket", path_str(&connector_sock)?],
    )?;

    println!("\nstopping both daemons (SIGTERM)");
    for (name, d) in [("client", &mut client), ("connector", &mut connector)] {
        d.terminate()?;
        let status = d.wait_timeout(Duration::from_secs(10))?;
        if !status.success() {
            bail!("{name} exited with {status}:\n{}", d.log());
        }
    }
    println!("stopped: TUN devices, routes and the nftables table are gone; tearing the lab down");
    Ok(())
}

/// `gatewayctl access` as an unprivileged user: ssh with a ProxyCommand to a private name,
/// no TUN, no route and no root needed (its own copy of a certificate, owned by nobody).
fn access_demo(lab: &Lab, gatewayctl: &str) -> anyhow::Result<()> {
    println!("\n--- as user nobody, without the tunnel: ssh through `gatewayctl access` ---");
    let user = lab.dir().join("user");
    std::fs::create_dir_all(&user)?;
    let pki = lab.dir().join("pki");
    for f in ["ca.pem", "ops-alice.pem", "ops-alice.key"] {
        std::fs::copy(pki.join(f), user.join(f))?;
    }
    std::fs::copy(gatewayctl, user.join("gatewayctl"))?;
    std::fs::copy(lab.ssh_key(), user.join("id"))?;
    let u = path_str(&user)?;
    std::fs::write(
        user.join("access.toml"),
        format!(
            "[node]\nname = \"alice-laptop\"\n[tunnel]\nconnect = [\"{}:7844\"]\nserver_name = \"lab-gw\"\n\
             [tls]\nca = \"{u}/ca.pem\"\ncert = \"{u}/ops-alice.pem\"\nkey = \"{u}/ops-alice.key\"\n",
            addr::GW_WAN
        ),
    )?;
    let out = std::process::Command::new("chown")
        .args(["-R", "nobody:nogroup", u])
        .output()?;
    if !out.status.success() {
        bail!("chown: {}", String::from_utf8_lossy(&out.stderr));
    }
    let proxy = format!("ProxyCommand={u}/gatewayctl access ssh --hostname %h");
    let config = format!("GATEWAY_CONFIG={u}/access.toml");
    let home = format!("HOME={u}");
    let identity = format!("{u}/id");
    let mut argv: Vec<String> = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--inh-caps=-all",
        "env",
        &home,
        &config,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(gateway_lab::ssh_argv_with(
        Path::new(&identity),
        &["-o", &proxy],
        &format!("ssh.{}", zone::DOMAIN),
        "echo \"logged in to $(hostname) via gatewayctl access, from $SSH_CLIENT\"",
    ));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    show(lab, Host::Operator, &argv)
}

struct Tunnel {
    /// Only for `transport = "hub"`: the session goes through it.
    hub: Option<gateway_lab::Spawned>,
    connector: gateway_lab::Spawned,
    client: gateway_lab::Spawned,
    connector_sock: PathBuf,
    client_sock: PathBuf,
}

/// Issues certificates, starts the connector on the VPC gateway and the client on the
/// operator host (a site gateway for the office LAN), and waits until the client is connected.
/// `transport` "hub": a hub in the lab's hub namespace (`Lab::add_hub`), the connector dialling
/// out to it and the client reaching the connector through it.
fn start_tunnel(
    lab: &Lab,
    gatewayd: &str,
    gatewayctl: &str,
    verbose: bool,
    transport: &str,
) -> anyhow::Result<Tunnel> {
    let dir = lab.dir().to_path_buf();
    let pki = dir.join("pki");
    let pki_s = path_str(&pki)?;
    for argv in [
        &[gatewayctl, "pki", "init", "--dir", pki_s][..],
        &[
            gatewayctl,
            "pki",
            "issue",
            "lab-gw",
            "--dir",
            pki_s,
            "--profile",
            "connector",
        ][..],
        &[gatewayctl, "pki", "issue", "ops-alice", "--dir", pki_s][..],
        &[
            gatewayctl,
            "pki",
            "issue",
            "lab-hub",
            "--dir",
            pki_s,
            "--profile",
            "hub",
            "--ip",
            gateway_lab::hub::addr::HUB,
        ][..],
    ] {
        if verbose {
            show(lab, Host::Operator, argv)?;
        } else {
            lab.run_ok(Host::Operator, argv)?;
        }
    }
    let tls = |name: &str| {
        format!(
            "[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/{name}.pem\"\nkey = \"{p}/{name}.key\"\n",
            p = pki.display()
        )
    };
    let via_hub = transport == "hub";
    let hub_target = format!("{}:7844", gateway_lab::hub::addr::HUB);
    let (connector_tunnel, client_tunnel, transport) = if via_hub {
        (
            format!(
                "role = \"connector\"\nconnect = [\"{hub_target}\"]\nsource_port = 7844\ngroup = \"lab-gw\""
            ),
            format!("connect = [\"{hub_target}\"]\ngroup = \"lab-gw\""),
            "auto",
        )
    } else {
        (
            "listen = \"0.0.0.0:7844\"".to_string(),
            format!(
                "connect = [\"{}:7844\"]\nserver_name = \"lab-gw\"",
                addr::GW_WAN
            ),
            transport,
        )
    };
    let hub = if via_hub {
        let sock = dir.join("hub.sock");
        let cfg = dir.join("hub.toml");
        std::fs::write(
            &cfg,
            format!(
                "[node]\nname = \"lab-hub\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n\
                 [tunnel]\nrole = \"hub\"\nlisten = \"0.0.0.0:7844\"\n\n{}",
                sock.display(),
                dir.join("hub-state").display(),
                tls("lab-hub")
            ),
        )?;
        Some(start_daemon(
            lab,
            Host::Hub,
            gatewayd,
            &cfg,
            &sock,
            "hub.log",
        )?)
    } else {
        None
    };
    let connector_sock = dir.join("connector.sock");
    let connector_cfg = dir.join("connector.toml");
    std::fs::write(
        &connector_cfg,
        format!(
            "[node]\nname = \"lab-gw\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n\
             [tunnel]\n{connector_tunnel}\ntun = \"gwtun\"\n\n{}\n\
             [egress]\ninterface = \"vpc0\"\nport_range = \"40000-40999\"\n\n\
             [[route]]\ncidr = \"{}\"\nname = \"vpc\"\n\n[[route]]\ncidr = \"{}\"\nname = \"vpc-v6\"\n\n\
             [[policy]]\nidentity = \"ops-*\"\nallow = [\"10.128.0.0/16 tcp/22\", \"10.128.0.0/16 icmp\", \
             \"10.128.0.0/16 udp/53\", \"10.128.0.0/16 tcp/5201\", \"10.128.0.0/16 udp/5201\", \"fd00:128::/64\"]\n\
             advertise = [\"192.0.2.0/24\", \"2001:db8:2::/64\"]\n\n\
             [[dns.zone]]\ndomain = \"{}\"\nservers = [\"{}\", \"{}\"]\n\n\
             [icmp]\nmanage_ping_group_range = true\n",
            connector_sock.display(),
            dir.join("connector-state").display(),
            tls("lab-gw"),
            addr::VPC_CIDR,
            addr::VPC_CIDR_V6,
            zone::DOMAIN,
            addr::RESOLVER_PRIMARY,
            addr::RESOLVER_SECONDARY,
        ),
    )?;
    let client_sock = dir.join("client.sock");
    let client_cfg = dir.join("client.toml");
    std::fs::write(
        &client_cfg,
        format!(
            "[node]\nname = \"ops-alice\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n\
             [tunnel]\n{client_tunnel}\nsource_port = 7844\ntun = \"optun\"\n\
             transport = \"{transport}\"\n\n{}\n\
             [icmp]\nmanage_ping_group_range = true\n\n\
             [client]\nlan = [\"lan0\"]\nadvertise = [\"192.0.2.0/24\", \"2001:db8:2::/64\"]\n\
             dns_stub = \"127.0.0.53:53\"\ndns_intercept = [\"wan0\"]\n",
            client_sock.display(),
            dir.join("client-state").display(),
            tls("ops-alice"),
        ),
    )?;
    if verbose {
        println!(
            "\n[VPC gateway] gatewayd --config {}",
            connector_cfg.display()
        );
        print!("{}", std::fs::read_to_string(&connector_cfg)?);
    }
    let connector = start_daemon(
        lab,
        Host::VpcGateway,
        gatewayd,
        &connector_cfg,
        &connector_sock,
        "connector.log",
    )?;
    if verbose {
        println!(
            "\n[operator host] gatewayd --config {}",
            client_cfg.display()
        );
        print!("{}", std::fs::read_to_string(&client_cfg)?);
    }
    let client = start_daemon(
        lab,
        Host::Operator,
        gatewayd,
        &client_cfg,
        &client_sock,
        "client.log",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab.run(
            Host::Operator,
            &[
                gatewayctl,
                "status",
                "--json",
                "--socket",
                path_str(&client_sock)?,
            ],
        )?;
        if String::from_utf8_lossy(&out.stdout).contains("\"state\": \"connected") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the client did not connect within 10 s:\n{}", client.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    Ok(Tunnel {
        hub,
        connector,
        client,
        connector_sock,
        client_sock,
    })
}

fn start_daemon(
    lab: &Lab,
    host: Host,
    gatewayd: &str,
    config: &Path,
    socket: &Path,
    log: &str,
) -> anyhow::Result<gateway_lab::Spawned> {
    let mut daemon = lab.spawn(host, &[gatewayd, "--config", path_str(config)?], log)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = daemon.try_wait()? {
            bail!("gatewayd exited with {status}:\n{}", daemon.log());
        }
        if Instant::now() > deadline {
            bail!("gatewayd not ready within 15 s:\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(daemon)
}

impl gateway_lab::bench::Running for Tunnel {
    fn stop(self: Box<Self>) -> anyhow::Result<()> {
        let (mut client, mut connector) = (self.client, self.connector);
        for d in [&mut client, &mut connector] {
            d.terminate()?;
            d.wait_timeout(Duration::from_secs(10))?;
        }
        if let Some(mut hub) = self.hub {
            hub.terminate()?;
            hub.wait_timeout(Duration::from_secs(10))?;
        }
        Ok(())
    }
}

/// The bench (`gateway_lab::bench`) with this binary's way of starting the gateway.
fn bench(args: &[String]) -> anyhow::Result<()> {
    let opts = gateway_lab::bench::Options::parse(args)?;
    let start = |lab: &Lab, bin_dir: &Path, transport: &str| {
        let gatewayd = bin_dir.join("gatewayd");
        let gatewayctl = bin_dir.join("gatewayctl");
        for b in [&gatewayd, &gatewayctl] {
            if !b.exists() {
                bail!("{} not found", b.display());
            }
        }
        let t = start_tunnel(
            lab,
            path_str(&gatewayd)?,
            path_str(&gatewayctl)?,
            false,
            transport,
        )?;
        Ok(Box::new(t) as Box<dyn gateway_lab::bench::Running>)
    };
    gateway_lab::bench::run(&opts, &start)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", PathBuf::from(p).display()))
}
