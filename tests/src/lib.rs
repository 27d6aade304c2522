//! The lab: PRODUCT.md's topology in network namespaces, with real servers.
//!
//! ```text
//!  office ──────── op ──────────── ul ───────────── gw ──────────── vpc
//!  eth0     lan0 (site gw)  wan0   op0 (underlay) gw0   wan0 (VPC gw) vpc0   eth0 (hosts)
//!  192.0.2.10  192.0.2.1   198.51.100.10/.1      203.0.113.1/.10     10.128.0.1   10.128.0.10
//!                                  .53 resolver                                   .61 .130 resolvers
//! ```
//!
//! Every lab gets namespace names unique to its process and instance, so tests run in
//! parallel, and [`Lab`]'s `Drop` kills what runs inside and deletes the namespaces, also when a
//! test panics. Namespaces left by a killed test run are swept at the next start. Nothing here
//! touches the host's own links, addresses, routes, firewall or sysctls: veth pairs are created
//! directly inside the namespaces, sysctls are set inside them.
//!
//! Test support shells out to `ip`, `sysctl` and the servers; the product itself uses netlink.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod bench;
pub mod hub;
pub mod impair;
mod servers;

/// Addresses of the lab's hosts.
pub mod addr {
    pub const OFFICE: &str = "192.0.2.10";
    pub const OFFICE_V6: &str = "2001:db8:2::10";
    pub const OP_LAN: &str = "192.0.2.1";
    pub const OP_LAN_V6: &str = "2001:db8:2::1";
    pub const OP_WAN: &str = "198.51.100.10";
    pub const OP_WAN_V6: &str = "2001:db8:51::10";
    pub const UL_OP: &str = "198.51.100.1";
    pub const UL_OP_V6: &str = "2001:db8:51::1";
    /// The operator's normal ("public") resolver, in the underlay.
    pub const PUBLIC_DNS: &str = "198.51.100.53";
    pub const UL_GW: &str = "203.0.113.1";
    pub const UL_GW_V6: &str = "2001:db8:113::1";
    /// The VPC gateway's public address.
    pub const GW_WAN: &str = "203.0.113.10";
    pub const GW_WAN_V6: &str = "2001:db8:113::10";
    pub const GW_VPC: &str = "10.128.0.1";
    pub const GW_VPC_V6: &str = "fd00:128::1";
    /// The VPC host running sshd and iperf3.
    pub const VPC_HOST: &str = "10.128.0.10";
    pub const VPC_HOST_V6: &str = "fd00:128::10";
    pub const RESOLVER_PRIMARY: &str = "10.128.0.61";
    pub const RESOLVER_SECONDARY: &str = "10.128.0.130";
    pub const VPC_CIDR: &str = "10.128.0.0/16";
    pub const VPC_CIDR_V6: &str = "fd00:128::/64";
}

/// The private zone the VPC resolvers serve, and what they answer.
pub mod zone {
    pub const DOMAIN: &str = "hoge-vpc.com";
    /// `db.hoge-vpc.com A` from the VPC resolvers.
    pub const DB_PRIVATE: &str = "10.128.0.20";
    /// `db.hoge-vpc.com A` from the public resolver: what leaks without split DNS.
    pub const DB_PUBLIC: &str = "203.0.113.80";
    pub const WWW_EXAMPLE: &str = "203.0.113.81";
    /// The connector's public name in the public resolver (A only: the VPC gateway's
    /// [`addr::GW_WAN`](super::addr::GW_WAN)), as the shipped client example dials it.
    pub const GW_PUBLIC_NAME: &str = "gw.example.net";
    /// `big.hoge-vpc.com TXT`: twelve 182-byte strings, over 2 KB, past any UDP default.
    pub const BIG: &str = "big";
    /// `broken.hoge-vpc.com`: SERVFAIL from the primary, an answer from the secondary.
    pub const BROKEN: &str = "broken";
    pub const BROKEN_ANSWER: &str = "10.128.0.99";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Office,
    Operator,
    Underlay,
    VpcGateway,
    Vpc,
    /// Only in a lab that [`Lab::add_hub`] extended.
    Hub,
    VpcGateway2,
}

impl Host {
    pub const ALL: [Host; 5] = [
        Host::Office,
        Host::Operator,
        Host::Underlay,
        Host::VpcGateway,
        Host::Vpc,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Host::Office => "office",
            Host::Operator => "op",
            Host::Underlay => "ul",
            Host::VpcGateway => "gw",
            Host::Vpc => "vpc",
            Host::Hub => "hub",
            Host::VpcGateway2 => "gw2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The underlay routes the VPC's prefixes to the VPC gateway. Tunnel tests turn it off so
    /// the tunnel is the only way in.
    pub direct_vpc_route: bool,
    /// Start sshd, iperf3 and the resolvers.
    pub servers: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            direct_vpc_route: true,
            servers: true,
        }
    }
}

/// Prefix of every lab namespace: `gwl<pid>x<n>-<host>`.
const PREFIX: &str = "gwl";
static INSTANCE: AtomicU32 = AtomicU32::new(0);

pub struct Lab {
    id: String,
    dir: PathBuf,
    created: Vec<String>,
    children: Vec<Child>,
    ssh_key: PathBuf,
}

impl Lab {
    pub fn start(opts: LabOptions) -> anyhow::Result<Lab> {
        sweep();
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("gateway-lab-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut lab = Lab {
            ssh_key: dir.join("id_ed25519"),
            id,
            dir,
            created: Vec::new(),
            children: Vec::new(),
        };
        // On error `lab` drops here and removes whatever was built.
        lab.build(&opts)?;
        if opts.servers {
            lab.start_servers()?;
        }
        Ok(lab)
    }

    pub fn ns(&self, h: Host) -> String {
        format!("{}-{}", self.id, h.suffix())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A command that runs inside `h`'s network namespace.
    pub fn command(&self, h: Host, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(h), program]);
        c
    }

    /// Runs `argv` in `h` and returns its output whatever its exit status.
    pub fn run(&self, h: Host, argv: &[&str]) -> anyhow::Result<Output> {
        let (program, args) = argv.split_first().context("empty argv")?;
        self.command(h, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.ns(h)))
    }

    /// Runs `argv` in `h`; an error (with its output) unless it exits 0. Returns stdout.
    pub fn run_ok(&self, h: Host, argv: &[&str]) -> anyhow::Result<String> {
        let out = self.run(h, argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {} exited with {}\nstdout:\n{}\nstderr:\n{}",
                self.ns(h),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `argv` in `h` in the background, stdout and stderr to `dir/log_name`.
    pub fn spawn(&self, h: Host, argv: &[&str], log_name: &str) -> anyhow::Result<Spawned> {
        let (child, log) = self.spawn_child(h, argv, log_name)?;
        Ok(Spawned {
            child,
            log,
            done: None,
        })
    }

    fn spawn_child(
        &self,
        h: Host,
        argv: &[&str],
        log_name: &str,
    ) -> anyhow::Result<(Child, PathBuf)> {
        let (program, args) = argv.split_first().context("empty argv")?;
        let log = self.dir.join(log_name);
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = self
            .command(h, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {argv:?} in {}", self.ns(h)))?;
        Ok((child, log))
    }

    /// `ssh` arguments that log into the lab's sshd at `target` as root with the lab's key.
    pub fn ssh_argv(&self, target: &str, remote_cmd: &str) -> Vec<String> {
        ssh_argv_with(
            &self.ssh_key,
            &["-o", "ConnectTimeout=5"],
            target,
            remote_cmd,
        )
    }

    /// The lab's ssh key: a copy of it lets another user log in.
    pub fn ssh_key(&self) -> &Path {
        &self.ssh_key
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn sysctl(&self, h: Host, key: &str, value: &str) -> anyhow::Result<()> {
        self.run_ok(h, &["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Creates a veth pair with one end in each namespace, never in the host's.
    fn link(&self, a: Host, a_if: &str, b: Host, b_if: &str) -> anyhow::Result<()> {
        let (na, nb) = (self.ns(a), self.ns(b));
        self.ip(&[
            "-n", &na, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &nb,
        ])?;
        self.ip(&["-n", &na, "link", "set", a_if, "up"])?;
        self.ip(&["-n", &nb, "link", "set", b_if, "up"])
    }

    fn addr(&self, h: Host, dev: &str, cidr: &str) -> anyhow::Result<()> {
        let ns = self.ns(h);
        if cidr.contains(':') {
            self.ip(&["-n", &ns, "addr", "add", cidr, "dev", dev, "nodad"])
        } else {
            self.ip(&["-n", &ns, "addr", "add", cidr, "dev", dev])
        }
    }

    fn route(&self, h: Host, dst: &str, via: &str) -> anyhow::Result<()> {
        let ns = self.ns(h);
        let family = if via.contains(':') { "-6" } else { "-4" };
        self.ip(&[family, "-n", &ns, "route", "add", dst, "via", via])
    }

    fn build(&mut self, opts: &LabOptions) -> anyhow::Result<()> {
        use Host::*;
        for h in Host::ALL {
            let ns = self.ns(h);
            self.ip(&["netns", "add", &ns])?;
            self.created.push(ns.clone());
            self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // Router solicitations and DAD only add noise and delay inside the lab.
            self.sysctl(h, "net.ipv6.conf.all.accept_dad", "0")?;
            self.sysctl(h, "net.ipv6.conf.default.accept_dad", "0")?;
        }
        self.link(Office, "eth0", Operator, "lan0")?;
        self.link(Operator, "wan0", Underlay, "op0")?;
        self.link(Underlay, "gw0", VpcGateway, "wan0")?;
        self.link(VpcGateway, "vpc0", Vpc, "eth0")?;

        self.addr(Office, "eth0", "192.0.2.10/24")?;
        self.addr(Office, "eth0", "2001:db8:2::10/64")?;
        self.addr(Operator, "lan0", "192.0.2.1/24")?;
        self.addr(Operator, "lan0", "2001:db8:2::1/64")?;
        self.addr(Operator, "wan0", "198.51.100.10/24")?;
        self.addr(Operator, "wan0", "2001:db8:51::10/64")?;
        self.addr(Underlay, "op0", "198.51.100.1/24")?;
        self.addr(Underlay, "op0", "198.51.100.53/24")?;
        self.addr(Underlay, "op0", "2001:db8:51::1/64")?;
        self.addr(Underlay, "gw0", "203.0.113.1/24")?;
        self.addr(Underlay, "gw0", "2001:db8:113::1/64")?;
        self.addr(VpcGateway, "wan0", "203.0.113.10/24")?;
        self.addr(VpcGateway, "wan0", "2001:db8:113::10/64")?;
        self.addr(VpcGateway, "vpc0", "10.128.0.1/16")?;
        self.addr(VpcGateway, "vpc0", "fd00:128::1/64")?;
        self.addr(Vpc, "eth0", "10.128.0.10/16")?;
        self.addr(Vpc, "eth0", "10.128.0.61/16")?;
        self.addr(Vpc, "eth0", "10.128.0.130/16")?;
        self.addr(Vpc, "eth0", "fd00:128::10/64")?;

        self.route(Office, "default", addr::OP_LAN)?;
        self.route(Office, "default", addr::OP_LAN_V6)?;
        self.route(Operator, "default", addr::UL_OP)?;
        self.route(Operator, "default", addr::UL_OP_V6)?;
        self.route(Underlay, "192.0.2.0/24", addr::OP_WAN)?;
        self.route(Underlay, "2001:db8:2::/64", addr::OP_WAN_V6)?;
        if opts.direct_vpc_route {
            self.route(Underlay, addr::VPC_CIDR, addr::GW_WAN)?;
            self.route(Underlay, addr::VPC_CIDR_V6, addr::GW_WAN_V6)?;
        }
        self.route(VpcGateway, "default", addr::UL_GW)?;
        self.route(VpcGateway, "default", addr::UL_GW_V6)?;
        self.route(Vpc, "default", addr::GW_VPC)?;
        self.route(Vpc, "default", addr::GW_VPC_V6)?;

        for h in [Operator, Underlay, VpcGateway] {
            self.sysctl(h, "net.ipv4.ip_forward", "1")?;
            self.sysctl(h, "net.ipv6.conf.all.forwarding", "1")?;
        }

        // `ip netns exec` bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf: the
        // office and operator hosts use the underlay's "public" resolver, as a workstation would.
        for h in [Office, Operator] {
            let d = PathBuf::from("/etc/netns").join(self.ns(h));
            fs::create_dir_all(&d)?;
            fs::write(
                d.join("resolv.conf"),
                format!("nameserver {}\n", addr::PUBLIC_DNS),
            )?;
        }
        Ok(())
    }

    fn teardown(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        for ns in self.created.drain(..).rev() {
            kill_namespace_processes(&ns);
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stdin(Stdio::null())
                .output();
            let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(&ns));
        }
        if std::env::var_os("GATEWAY_LAB_KEEP").is_some() {
            eprintln!(
                "lab {}: logs and configs kept in {}",
                self.id,
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A background process in the lab. Killed on drop; the lab kills whatever else runs inside
/// its namespaces when it goes.
pub struct Spawned {
    child: Child,
    log: PathBuf,
    done: Option<ExitStatus>,
}

impl Spawned {
    /// PID of the program itself: `ip netns exec` execs it in place, so this is not a wrapper.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        if rc != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGTERM)
    }

    pub fn kill(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGKILL)
    }

    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.done.is_none() {
            self.done = self.child.try_wait()?;
        }
        Ok(self.done)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("pid {} still running after {timeout:?}", self.child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything it wrote so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.done.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ssh` arguments that log in as root at `target` with `key`, non-interactively and without
/// host-key prompts; `extra` options go before the destination.
pub fn ssh_argv_with(key: &Path, extra: &[&str], target: &str, remote_cmd: &str) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "ssh".into(),
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push(format!("root@{target}"));
    v.push(remote_cmd.into());
    v
}

/// SIGKILLs every process whose network namespace is `ns`.
fn kill_namespace_processes(ns: &str) {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) has no memory-safety requirements.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes namespaces of labs whose process is gone (a test run killed before its Drop ran).
pub fn sweep() {
    let Ok(out) = Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(owner) = lab_owner(ns) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        kill_namespace_processes(ns);
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stdin(Stdio::null())
            .output();
        let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        let dir = ns.rsplit_once('-').map(|(id, _)| id).unwrap_or(ns);
        let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("gateway-lab-{dir}")));
    }
}

/// The pid in a lab namespace name `gwl<pid>x<n>-<host>`, if it is one.
fn lab_owner(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(PREFIX)?;
    let (id, _host) = rest.split_once('-')?;
    let (pid, n) = id.split_once('x')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner_pid_from_lab_namespace_names() {
        assert_eq!(lab_owner("gwl1234x0-office"), Some(1234));
        assert_eq!(lab_owner("gwl1234x17-vpc"), Some(1234));
        assert_eq!(lab_owner("gwl1234-office"), None);
        assert_eq!(lab_owner("other-ns"), None);
        assert_eq!(lab_owner("gwlx1-op"), None);
    }
}
