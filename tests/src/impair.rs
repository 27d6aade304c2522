//! Underlay faults for the lab: loss and delay, and a cut link, on the underlay router.
//!
//! This kernel has no netem qdisc, so loss and delay come from a relay in user space: the
//! underlay routes everything it forwards between `op0` and `gw0` into a TUN device (policy
//! routing by input interface), a thread holds each packet for the delay, drops the given share
//! at random and writes the rest back into the TUN, from where the kernel routes it on as usual.
//! A cut is an nftables table in the underlay that drops everything it would forward. Both are
//! undone when their guard drops, and go with the namespace anyway.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{Host, Lab};

const RELAY_TUN: &str = "imp0";
const RELAY_TABLE: &str = "77";
/// Packets held at once: a bound on the relay's memory, far above what the tests send.
const MAX_HELD: usize = 20_000;
const CUT_TABLE: &str = "lab_cut";

/// Loss and delay on the underlay while it lives.
pub struct Impairment {
    stop: Arc<AtomicBool>,
    relay: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
    relayed: Arc<AtomicU64>,
}

impl Impairment {
    /// Packets the relay dropped and passed on so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.dropped.load(Ordering::Relaxed),
            self.relayed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Impairment {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.relay.take() {
            let _ = t.join();
        }
    }
}

/// The underlay forwards nothing while it lives.
pub struct Cut<'a> {
    lab: &'a Lab,
    active: bool,
}

impl Cut<'_> {
    /// Lets traffic through again.
    pub fn restore(mut self) -> anyhow::Result<()> {
        self.active = false;
        self.lab
            .run_ok(
                Host::Underlay,
                &["nft", "delete", "table", "inet", CUT_TABLE],
            )
            .map(drop)
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        if self.active {
            let _ = self.lab.run(
                Host::Underlay,
                &["nft", "delete", "table", "inet", CUT_TABLE],
            );
        }
    }
}

impl Lab {
    /// Drops `loss_percent` % of what the underlay forwards, at random, and delays the rest by
    /// `delay`, each way.
    pub fn impair_underlay(
        &self,
        loss_percent: u32,
        delay: Duration,
    ) -> anyhow::Result<Impairment> {
        if loss_percent > 100 {
            bail!("loss {loss_percent} % is not a share");
        }
        let ns = self.ns(Host::Underlay);
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let relayed = Arc::new(AtomicU64::new(0));
        let (s, d, r) = (stop.clone(), dropped.clone(), relayed.clone());
        let relay = std::thread::spawn(move || {
            let tun = match open_tun_in(&ns, RELAY_TUN) {
                Ok(t) => {
                    let _ = tx.send(Ok(()));
                    t
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            relay(&tun, loss_percent, delay, &s, &d, &r);
        });
        rx.recv()
            .context("relay thread ended before it made its TUN")??;
        let guard = Impairment {
            stop,
            relay: Some(relay),
            dropped,
            relayed,
        };
        let ns = self.ns(Host::Underlay);
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let mut argv = vec!["ip", "-n", &ns];
            argv.extend_from_slice(args);
            let out = std::process::Command::new(argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .output()
                .context("running ip")?;
            if !out.status.success() {
                bail!("{argv:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        };
        ip(&["link", "set", RELAY_TUN, "addrgenmode", "none"])?;
        ip(&["link", "set", RELAY_TUN, "up"])?;
        for key in ["all", "default", RELAY_TUN] {
            self.run_ok(
                Host::Underlay,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.ipv4.conf.{key}.rp_filter=0"),
                ],
            )?;
        }
        for family in ["-4", "-6"] {
            ip(&[
                family,
                "route",
                "add",
                "default",
                "dev",
                RELAY_TUN,
                "table",
                RELAY_TABLE,
            ])?;
            for iface in ["op0", "gw0"] {
                ip(&[
                    family,
                    "rule",
                    "add",
                    "iif",
                    iface,
                    "table",
                    RELAY_TABLE,
                    "pref",
                    "100",
                ])?;
            }
        }
        Ok(guard)
    }

    /// Cuts the underlay: nothing is forwarded between the operator side and the VPC gateway
    /// until [`Cut::restore`] (or the guard drops).
    pub fn cut_underlay(&self) -> anyhow::Result<Cut<'_>> {
        let rules = self.dir().join("cut.nft");
        std::fs::write(
            &rules,
            format!(
                "table inet {CUT_TABLE} {{\n  chain forward {{\n    \
                 type filter hook forward priority -300; policy drop;\n  }}\n}}\n"
            ),
        )?;
        self.run_ok(
            Host::Underlay,
            &["nft", "-f", rules.to_str().context("utf-8 path")?],
        )?;
        Ok(Cut {
            lab: self,
            active: true,
        })
    }
}

/// Opens a TUN device named `name` in network namespace `ns` (this thread enters it).
fn open_tun_in(ns: &str, name: &str) -> anyhow::Result<OwnedFd> {
    let ns_path = format!("/var/run/netns/{ns}");
    let f = File::open(&ns_path).with_context(|| format!("open {ns_path}"))?;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns_path}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: open(2) with a NUL-terminated path; the fd is owned below.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("open /dev/net/tun: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let tun = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq lays out (40 bytes).
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// Reads packets, drops `loss_percent` % of them, writes the rest back `delay` later, until
/// `stop`.
fn relay(
    tun: &OwnedFd,
    loss_percent: u32,
    delay: Duration,
    stop: &AtomicBool,
    dropped: &AtomicU64,
    relayed: &AtomicU64,
) {
    let mut held: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65_536];
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, p)) = held.pop_front() {
                // SAFETY: write(2) from a live buffer of p.len() bytes.
                unsafe { libc::write(tun.as_raw_fd(), p.as_ptr().cast(), p.len()) };
                relayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let wait = held
            .front()
            .map(|(due, _)| due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        let mut pfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().max(1) as libc::c_int;
        // SAFETY: poll(2) on one pollfd we own.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 || pfd.revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: read(2) into a live buffer of buf.len() bytes.
        let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if (rng % 100) < u64::from(loss_percent) || held.len() >= MAX_HELD {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        held.push_back((Instant::now() + delay, buf[..n as usize].to_vec()));
    }
}
