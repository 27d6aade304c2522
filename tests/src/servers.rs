//! The lab's real servers (sshd, the unbound resolvers, iperf3), started in their namespaces
//! when a lab is built and waited for until they answer.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Host, Lab, addr, wait_until, zone};

impl Lab {
    pub(crate) fn start_servers(&mut self) -> anyhow::Result<()> {
        self.start_sshd()?;
        // Both private resolvers: the zone, plus a TXT set too big for a 1232-byte UDP answer.
        let big: Vec<String> = (0..12)
            .map(|i| {
                format!(
                    "{}.{} TXT \"{i:02}{}\"",
                    zone::BIG,
                    zone::DOMAIN,
                    "x".repeat(180)
                )
            })
            .collect();
        let private = |which: &str| {
            let mut d = vec![
                format!("db.{} A {}", zone::DOMAIN, zone::DB_PRIVATE),
                format!("ssh.{} A {}", zone::DOMAIN, addr::VPC_HOST),
                format!("which.{} TXT \"{which}\"", zone::DOMAIN),
            ];
            d.extend(big.iter().cloned());
            d
        };
        // The primary cannot resolve broken.hoge-vpc.com (its only forwarder is refused), so it
        // answers SERVFAIL; the secondary knows the name.
        let broken = format!("{}.{}", zone::BROKEN, zone::DOMAIN);
        self.start_unbound(
            Host::Vpc,
            "primary",
            addr::RESOLVER_PRIMARY,
            &[(zone::DOMAIN, "static"), (&broken, "transparent")],
            &private("primary"),
            &format!("forward-zone:\n  name: \"{broken}.\"\n  forward-addr: 127.0.0.1@1\n"),
        )?;
        let mut secondary = private("secondary");
        secondary.push(format!("{broken} A {}", zone::BROKEN_ANSWER));
        self.start_unbound(
            Host::Vpc,
            "secondary",
            addr::RESOLVER_SECONDARY,
            &[(zone::DOMAIN, "static")],
            &secondary,
            "",
        )?;
        self.start_unbound(
            Host::Underlay,
            "public",
            addr::PUBLIC_DNS,
            &[
                (zone::DOMAIN, "static"),
                ("example.com", "static"),
                ("example.net", "static"),
            ],
            &[
                format!("db.{} A {}", zone::DOMAIN, zone::DB_PUBLIC),
                format!("www.example.com A {}", zone::WWW_EXAMPLE),
                format!("{} A {}", zone::GW_PUBLIC_NAME, addr::GW_WAN),
            ],
            "",
        )?;
        let iperf = self.spawn_server(
            Host::Vpc,
            &["iperf3", "-s", "-B", addr::VPC_HOST],
            "iperf3.log",
        )?;
        self.children.push(iperf);
        self.wait_tcp(Host::Vpc, addr::VPC_HOST, 5201)?;
        Ok(())
    }

    fn spawn_server(&self, h: Host, argv: &[&str], log_name: &str) -> anyhow::Result<Child> {
        self.spawn_child(h, argv, log_name).map(|(child, _)| child)
    }

    fn start_sshd(&mut self) -> anyhow::Result<()> {
        let host_key = self.dir.join("ssh_host_ed25519_key");
        for key in [&host_key, &self.ssh_key] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(key)
                .stdin(Stdio::null())
                .output()
                .context("running ssh-keygen")?;
            if !out.status.success() {
                bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let authorized = self.dir.join("authorized_keys");
        fs::copy(self.ssh_key.with_extension("pub"), &authorized)?;
        let config = self.dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "ListenAddress {}\nListenAddress [{}]\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PidFile {}\nSubsystem sftp internal-sftp\n",
                addr::VPC_HOST,
                addr::VPC_HOST_V6,
                host_key.display(),
                authorized.display(),
                self.dir.join("sshd.pid").display(),
            ),
        )?;
        // sshd insists on its privilege separation directory.
        fs::create_dir_all("/run/sshd")?;
        let sshd = self.spawn_server(
            Host::Vpc,
            &[
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                config.to_str().context("utf-8 path")?,
            ],
            "sshd.log",
        )?;
        self.children.push(sshd);
        self.wait_tcp(Host::Vpc, addr::VPC_HOST, 22)
    }

    fn start_unbound(
        &mut self,
        h: Host,
        name: &str,
        listen: &str,
        zones: &[(&str, &str)],
        data: &[String],
        extra: &str,
    ) -> anyhow::Result<()> {
        let dir = self.dir.join(format!("unbound-{name}"));
        fs::create_dir_all(&dir)?;
        let mut conf = format!(
            "server:\n  interface: {listen}\n  port: 53\n  do-daemonize: no\n  chroot: \"\"\n  \
             username: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  \
             logfile: \"{d}/unbound.log\"\n  use-syslog: no\n  log-queries: yes\n  \
             verbosity: 1\n  access-control: 0.0.0.0/0 allow\n  access-control: ::/0 allow\n  \
             do-ip6: yes\n  num-threads: 1\n  \
             # Never recurse to the outside world: the lab has no internet.\n  \
             do-not-query-localhost: yes\n",
            d = dir.display()
        );
        for (zone, kind) in zones {
            conf.push_str(&format!("  local-zone: \"{zone}.\" {kind}\n"));
        }
        for record in data {
            conf.push_str(&format!("  local-data: '{record}'\n"));
        }
        // With no root hints reachable and no forwarders, anything outside the local zones
        // fails fast instead of leaving the lab.
        conf.push_str("  local-zone: \".\" refuse\n");
        conf.push_str(extra);
        let path = dir.join("unbound.conf");
        fs::write(&path, conf)?;
        let child = self.spawn_server(
            h,
            &["unbound", "-d", "-c", path.to_str().context("utf-8 path")?],
            &format!("unbound-{name}.stderr"),
        )?;
        self.children.push(child);
        let probe = zones
            .first()
            .map(|(z, _)| format!("probe.{z}"))
            .unwrap_or_else(|| "probe.".into());
        self.wait_dns(h, listen, &probe)
    }

    fn wait_tcp(&self, h: Host, ip: &str, port: u16) -> anyhow::Result<()> {
        // A connect from inside the namespace: bash's /dev/tcp avoids needing nc.
        let target = format!("exec 3<>/dev/tcp/{ip}/{port}");
        wait_until(Duration::from_secs(10), || {
            self.run(h, &["bash", "-c", &target])
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .with_context(|| format!("{ip}:{port} in {} did not accept connections", self.ns(h)))
    }

    fn wait_dns(&self, h: Host, server: &str, name: &str) -> anyhow::Result<()> {
        let at = format!("@{server}");
        wait_until(Duration::from_secs(10), || {
            self.run(h, &["dig", "+time=1", "+tries=1", &at, name])
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .with_context(|| format!("resolver {server} in {} did not answer", self.ns(h)))
    }
}
