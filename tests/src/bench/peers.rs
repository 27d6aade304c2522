//! Other tunnels on the same lab, as external programs (never linked: quincy is AGPL): quincy
//! (quinn + TUN, mutual TLS with certificates from `gatewayctl pki`) and boringtun (userspace
//! WireGuard, configured over its UAPI socket), each from the operator host to the VPC gateway,
//! with the same source NAT into the VPC that the connector does.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Running;
use super::parse;
use crate::{Host, Lab, Spawned, addr};

/// The peers' overlay: server end .1, operator end .2.
const OVERLAY_SERVER: &str = "10.99.0.1/24";
const OVERLAY_CLIENT: &str = "10.99.0.2/24";
const QUINCY_PORT: u16 = 55555;
const WG_PORT: u16 = 51820;
/// wg-quick's default MTU for an IPv4 underlay with a 1500-byte path.
const WG_MTU: &str = "1420";

/// Source NAT of everything leaving the VPC gateway into the VPC, as the connector does for
/// its clients, so every path pays for connection tracking and NAT alike. Only inside the
/// lab's own namespace.
pub fn masquerade_into_vpc(lab: &Lab) -> anyhow::Result<()> {
    for argv in [
        &["nft", "add", "table", "ip", "benchnat"][..],
        &[
            "nft",
            "add",
            "chain",
            "ip",
            "benchnat",
            "post",
            "{ type nat hook postrouting priority srcnat ; }",
        ],
        &[
            "nft",
            "add",
            "rule",
            "ip",
            "benchnat",
            "post",
            "oifname",
            "vpc0",
            "masquerade",
        ],
    ] {
        lab.run_ok(Host::VpcGateway, argv)?;
    }
    Ok(())
}

/// The nft commands above, for the report.
pub const MASQUERADE_TEXT: &str = "nft add table ip benchnat; nft add chain ip benchnat post \
    '{ type nat hook postrouting priority srcnat ; }'; nft add rule ip benchnat post oifname vpc0 masquerade";

struct Pair {
    server: Spawned,
    client: Spawned,
    /// Files to remove once stopped (boringtun's UAPI sockets live outside the lab), then
    /// directories to remove if empty (the socket directory, if boringtun made it).
    leftovers: Vec<PathBuf>,
    empty_dirs: Vec<PathBuf>,
}

impl Running for Pair {
    fn stop(self: Box<Self>) -> anyhow::Result<()> {
        let Pair {
            mut server,
            mut client,
            leftovers,
            empty_dirs,
        } = *self;
        for p in [&mut client, &mut server] {
            let _ = p.terminate();
            if p.wait_timeout(Duration::from_secs(5)).is_err() {
                let _ = p.kill();
            }
        }
        for f in leftovers {
            let _ = std::fs::remove_file(f);
        }
        for d in empty_dirs {
            let _ = std::fs::remove_dir(d);
        }
        Ok(())
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Waits until the VPC host answers a ping from the operator host through the new tunnel,
/// failing early with a log if either end exits.
fn wait_for_path(lab: &Lab, pair: &mut Pair, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (end, p) in [("server", &mut pair.server), ("client", &mut pair.client)] {
            if let Some(status) = p.try_wait()? {
                bail!("{what} {end} exited with {status}:\n{}", p.log());
            }
        }
        let ok = lab
            .run(
                Host::Operator,
                &["ping", "-n", "-c", "1", "-W", "1", addr::VPC_HOST],
            )?
            .status
            .success();
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no ping through {what} within 20 s\nserver:\n{}\nclient:\n{}",
                pair.server.log(),
                pair.client.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn require(bin: &Path) -> anyhow::Result<&str> {
    if !bin.exists() {
        bail!(
            "{} is not installed (cargo xtask bench installs it)",
            bin.display()
        );
    }
    path_str(bin)
}

/// quincy-server on the VPC gateway, quincy-client on the operator host, routing the VPC
/// through it; mutual TLS with a server certificate for the gateway's address and the
/// client's certificate fingerprint in the users file.
pub fn start_quincy(
    lab: &Lab,
    bin_dir: &Path,
    gatewayctl: &str,
) -> anyhow::Result<Box<dyn Running>> {
    let server_bin = require(&bin_dir.join("quincy-server"))?.to_string();
    let client_bin = require(&bin_dir.join("quincy-client"))?.to_string();
    let dir = lab.dir().join("quincy");
    std::fs::create_dir_all(&dir)?;
    let pki = dir.join("pki");
    let pki_s = path_str(&pki)?;
    for argv in [
        &[gatewayctl, "pki", "init", "--dir", pki_s][..],
        &[
            gatewayctl,
            "pki",
            "issue",
            "quincy-server",
            "--dir",
            pki_s,
            "--profile",
            "connector",
            "--ip",
            addr::GW_WAN,
        ],
        &[gatewayctl, "pki", "issue", "quincy-client", "--dir", pki_s],
    ] {
        lab.run_ok(Host::Operator, argv)?;
    }
    let client_pem = pki.join("quincy-client.pem");
    let fingerprint = parse::sha256_fingerprint(&lab.run_ok(
        Host::Operator,
        &[
            "openssl",
            "x509",
            "-in",
            path_str(&client_pem)?,
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    )?)?;
    let users = dir.join("users.toml");
    std::fs::write(
        &users,
        format!("[users.bench]\nauthorized_keys = []\nauthorized_certs = [\"{fingerprint}\"]\n"),
    )?;
    let server_cfg = dir.join("server.toml");
    std::fs::write(
        &server_cfg,
        format!(
            "name = \"quincy\"\ntunnel_network = \"{OVERLAY_SERVER}\"\nusers_file = \"{}\"\n\
             bind_port = {QUINCY_PORT}\n\n[protocol]\nmode = \"tls\"\ncertificate_file = \"{}\"\n\
             certificate_key_file = \"{}\"\n\n[log]\nlevel = \"warn\"\n",
            users.display(),
            pki.join("quincy-server.pem").display(),
            pki.join("quincy-server.key").display(),
        ),
    )?;
    let client_cfg = dir.join("client.toml");
    std::fs::write(
        &client_cfg,
        format!(
            "connection_string = \"{}:{QUINCY_PORT}\"\n\n[protocol]\nmode = \"tls\"\n\
             trusted_certificate_paths = [\"{}\"]\nclient_certificate_file = \"{}\"\n\
             client_certificate_key_file = \"{}\"\n\n[network]\nroutes = [\"{}\"]\n\n\
             [log]\nlevel = \"warn\"\n",
            addr::GW_WAN,
            pki.join("ca.pem").display(),
            client_pem.display(),
            pki.join("quincy-client.key").display(),
            addr::VPC_CIDR,
        ),
    )?;
    masquerade_into_vpc(lab)?;
    let server = lab.spawn(
        Host::VpcGateway,
        &[&server_bin, "--config-path", path_str(&server_cfg)?],
        "quincy-server.log",
    )?;
    wait_udp_listen(lab, Host::VpcGateway, QUINCY_PORT)?;
    let client = lab.spawn(
        Host::Operator,
        &[&client_bin, "--config-path", path_str(&client_cfg)?],
        "quincy-client.log",
    )?;
    let mut pair = Pair {
        server,
        client,
        leftovers: Vec::new(),
        empty_dirs: Vec::new(),
    };
    wait_for_path(lab, &mut pair, "quincy")?;
    Ok(Box::new(pair))
}

/// The quincy configuration written for the report (paths elided).
pub fn quincy_config_text() -> String {
    format!(
        "server: tunnel_network = \"{OVERLAY_SERVER}\", bind_port = {QUINCY_PORT}, [protocol] mode = \"tls\" \
         (certificate from `gatewayctl pki issue --profile connector --ip {}`), users file with the \
         client certificate's SHA-256; client: connection_string = \"{}:{QUINCY_PORT}\", [protocol] \
         mode = \"tls\", [network] routes = [\"{}\"]; everything else quincy's defaults \
         (MTU 1400, Cubic, 2 MiB socket buffers, offload on)",
        addr::GW_WAN,
        addr::GW_WAN,
        addr::VPC_CIDR
    )
}

fn wait_udp_listen(lab: &Lab, h: Host, port: u16) -> anyhow::Result<()> {
    let filter = format!("sport = :{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = lab.run(h, &["ss", "-H", "-uln", &filter])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on UDP {port} in {} after 10 s", lab.ns(h))
}

/// A fresh X25519 key pair from openssl, as raw hex (private, public).
fn x25519_pair(lab: &Lab, dir: &Path, name: &str) -> anyhow::Result<(String, String)> {
    let key = dir.join(format!("{name}.der"));
    let public = dir.join(format!("{name}.pub.der"));
    let (key_s, public_s) = (path_str(&key)?, path_str(&public)?);
    lab.run_ok(
        Host::Operator,
        &[
            "openssl",
            "genpkey",
            "-algorithm",
            "X25519",
            "-outform",
            "DER",
            "-out",
            key_s,
        ],
    )?;
    lab.run_ok(
        Host::Operator,
        &[
            "openssl", "pkey", "-inform", "DER", "-in", key_s, "-pubout", "-outform", "DER",
            "-out", public_s,
        ],
    )?;
    Ok((
        parse::x25519_raw_hex(&std::fs::read(&key)?)?,
        parse::x25519_raw_hex(&std::fs::read(&public)?)?,
    ))
}

/// Sends one `set=1` to a WireGuard UAPI socket and checks the answer is `errno=0`.
fn uapi_set(socket: &Path, body: &str) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("set=1\n{body}\n").as_bytes())?;
    let mut answer = String::new();
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\n" {
            break;
        }
        answer.push_str(&line);
    }
    if answer.trim() != "errno=0" {
        bail!("{} answered {answer:?}", socket.display());
    }
    Ok(())
}

static WG_N: AtomicU32 = AtomicU32::new(0);

/// boringtun-cli on both ends (its own TUN and UAPI socket each), keys from openssl, the VPC
/// routed into the operator's end.
pub fn start_boringtun(lab: &Lab, bin_dir: &Path) -> anyhow::Result<Box<dyn Running>> {
    let bin = require(&bin_dir.join("boringtun-cli"))?.to_string();
    let dir = lab.dir().join("boringtun");
    std::fs::create_dir_all(&dir)?;
    let (server_key, server_pub) = x25519_pair(lab, &dir, "server")?;
    let (client_key, client_pub) = x25519_pair(lab, &dir, "client")?;
    // Interface names are per namespace, but the UAPI sockets share /var/run/wireguard.
    let n = WG_N.fetch_add(1, Ordering::Relaxed);
    let id = std::process::id() % 100_000;
    let (server_if, client_if) = (format!("bt{id}x{n}g"), format!("bt{id}x{n}o"));
    let socket_dir = Path::new("/var/run/wireguard");
    let made_socket_dir = !socket_dir.exists();
    let socket = |ifname: &str| socket_dir.join(format!("{ifname}.sock"));
    let spawn = |h: Host, ifname: &str| -> anyhow::Result<Spawned> {
        let log = dir.join(format!("{ifname}.log"));
        let _ = std::fs::remove_file(socket(ifname));
        lab.spawn(
            h,
            &[
                &bin,
                "--foreground",
                "--disable-drop-privileges",
                "--log",
                path_str(&log)?,
                ifname,
            ],
            &format!("boringtun-{ifname}.out"),
        )
    };
    masquerade_into_vpc(lab)?;
    let mut pair = Pair {
        server: spawn(Host::VpcGateway, &server_if)?,
        client: spawn(Host::Operator, &client_if)?,
        leftovers: vec![socket(&server_if), socket(&client_if)],
        empty_dirs: if made_socket_dir {
            vec![socket_dir.to_path_buf()]
        } else {
            Vec::new()
        },
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(socket(&server_if).exists() && socket(&client_if).exists()) {
        for p in [&mut pair.server, &mut pair.client] {
            if let Some(status) = p.try_wait()? {
                bail!("boringtun-cli exited with {status}:\n{}", p.log());
            }
        }
        if Instant::now() > deadline {
            bail!("boringtun-cli made no UAPI socket within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let server_overlay = OVERLAY_SERVER.split('/').next().unwrap_or_default();
    let client_overlay = OVERLAY_CLIENT.split('/').next().unwrap_or_default();
    uapi_set(
        &socket(&server_if),
        &format!(
            "private_key={server_key}\nlisten_port={WG_PORT}\npublic_key={client_pub}\n\
             allowed_ip={client_overlay}/32\n"
        ),
    )?;
    uapi_set(
        &socket(&client_if),
        &format!(
            "private_key={client_key}\nlisten_port={}\npublic_key={server_pub}\n\
             endpoint={}:{WG_PORT}\nallowed_ip={server_overlay}/32\nallowed_ip={}\n",
            WG_PORT + 1,
            addr::GW_WAN,
            addr::VPC_CIDR,
        ),
    )?;
    for (h, ifname, overlay) in [
        (Host::VpcGateway, &server_if, OVERLAY_SERVER),
        (Host::Operator, &client_if, OVERLAY_CLIENT),
    ] {
        lab.run_ok(h, &["ip", "addr", "add", overlay, "dev", ifname])?;
        lab.run_ok(h, &["ip", "link", "set", ifname, "mtu", WG_MTU, "up"])?;
    }
    lab.run_ok(
        Host::Operator,
        &["ip", "route", "add", addr::VPC_CIDR, "dev", &client_if],
    )?;
    wait_for_path(lab, &mut pair, "boringtun")?;
    Ok(Box::new(pair))
}

/// The boringtun configuration written for the report.
pub fn boringtun_config_text() -> String {
    format!(
        "boringtun-cli --foreground --disable-drop-privileges IFNAME on each end (default 4 threads); \
         UAPI set: server listen_port={WG_PORT}, peer allowed_ip={}/32; client peer \
         endpoint={}:{WG_PORT}, allowed_ip={} and the server's overlay; MTU {WG_MTU}; route {} dev IFNAME",
        OVERLAY_CLIENT.split('/').next().unwrap_or_default(),
        addr::GW_WAN,
        addr::VPC_CIDR,
        addr::VPC_CIDR,
    )
}
