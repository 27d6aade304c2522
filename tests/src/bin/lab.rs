//! `lab`: build the lab by hand, sweep leftovers, or run the product demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gateway_lab::{Host, Lab, LabOptions, addr, zone};

const USAGE: &str = "usage: lab up | lab sweep | lab demo --bin-dir DIR";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("up") => up(),
        Some("sweep") => {
            gateway_lab::sweep();
            Ok(())
        }
        Some("demo") => match (args.get(1).map(String::as_str), args.get(2)) {
            (Some("--bin-dir"), Some(dir)) => demo(Path::new(dir)),
            _ => Err(anyhow::anyhow!(USAGE)),
        },
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

fn up() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default())?;
    println!("lab is up; logs and configs in {}", lab.dir().display());
    for h in Host::ALL {
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
    println!("building the lab: office - operator - underlay - VPC gateway - VPC hosts");
    let lab = Lab::start(LabOptions::default())?;
    let socket = lab.dir().join("gatewayd.sock");
    let config = lab.dir().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"lab-op\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n\n\
             [dataplane]\ninterfaces = [\"lan0\"]\n\n\
             [[route]]\ncidr = \"{}\"\nname = \"vpc\"\n\n\
             [[route]]\ncidr = \"{}\"\nname = \"vpc-v6\"\n",
            socket.display(),
            lab.dir().join("state").display(),
            addr::VPC_CIDR,
            addr::VPC_CIDR_V6,
        ),
    )?;
    println!("\n[operator host] gatewayd --config {}", config.display());
    print!("{}", std::fs::read_to_string(&config)?);
    let mut daemon = lab.spawn(
        Host::Operator,
        &[path_str(&gatewayd)?, "--config", path_str(&config)?],
        "gatewayd.log",
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Some(status) = daemon.try_wait()? {
            bail!("gatewayd exited with {status}:\n{}", daemon.log());
        }
        if Instant::now() > deadline {
            bail!("gatewayd not ready within 15 s:\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    print!("{}", daemon.log());

    let ssh = lab.ssh_argv(
        addr::VPC_HOST,
        "echo \"logged in to $(hostname) as $(whoami)\"; uname -sr",
    );
    let ssh: Vec<&str> = ssh.iter().map(String::as_str).collect();
    show(&lab, Host::Office, &ssh)?;
    let db = format!("db.{}", zone::DOMAIN);
    show(
        &lab,
        Host::Office,
        &[
            "dig",
            "+short",
            &format!("@{}", addr::RESOLVER_PRIMARY),
            &db,
        ],
    )?;
    show(
        &lab,
        Host::Office,
        &["ping", "-n", "-c", "3", "-i", "0.2", addr::VPC_HOST],
    )?;
    show(
        &lab,
        Host::Office,
        &["ping", "-n", "-c", "3", "-i", "0.2", addr::VPC_HOST_V6],
    )?;
    println!("\n(203.0.113.10 is outside every configured route: counted as unmatched)");
    show(
        &lab,
        Host::Office,
        &["ping", "-n", "-c", "2", "-i", "0.2", addr::GW_WAN],
    )?;

    show(
        &lab,
        Host::Operator,
        &[
            path_str(&gatewayctl)?,
            "status",
            "--socket",
            path_str(&socket)?,
        ],
    )?;

    println!("\n[operator host] stopping gatewayd (SIGTERM)");
    daemon.terminate()?;
    let status = daemon.wait_timeout(Duration::from_secs(10))?;
    if !status.success() {
        bail!("gatewayd exited with {status}:\n{}", daemon.log());
    }
    println!("gatewayd stopped: classifier detached, socket removed; tearing the lab down");
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", PathBuf::from(p).display()))
}
