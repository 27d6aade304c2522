//! The measurements: the same iperf3, ping and dnsperf commands from the operator host to the
//! VPC host, whatever carries them, each bounded in time by `timeout`, with the machine-wide
//! CPU time and the tunnel ends' UDP buffer drops read around each TCP run.

use std::time::Duration;

use anyhow::Context;

use super::parse::{self, CpuTicks};
use super::report::{self, Figure, Samples};
use super::search::RateSearch;
use crate::{Host, Lab, addr};

/// How long and how often; `quick` is for trying the bench out, not for figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub tcp_secs: u32,
    pub ping_count: u32,
    pub udp_probe_secs: u32,
    pub udp_max_probes: usize,
    pub dns_secs: u32,
}

impl Plan {
    pub const FULL: Plan = Plan {
        tcp_secs: 8,
        ping_count: 200,
        udp_probe_secs: 3,
        udp_max_probes: 8,
        dns_secs: 10,
    };
    pub const QUICK: Plan = Plan {
        tcp_secs: 2,
        ping_count: 200,
        udp_probe_secs: 1,
        udp_max_probes: 6,
        dns_secs: 2,
    };
}

/// Ping interval: 10 ms, idle traffic.
pub const PING_INTERVAL: &str = "0.01";
/// UDP datagram payload for the rate search.
pub const UDP_LEN: &str = "1200";
/// The rate search's bounds, in bit/s: it starts at 100 Mbit/s, never offers below 10 or
/// above 20,000, and stops within 10 %.
const UDP_START: f64 = 100e6;
const UDP_FLOOR: f64 = 10e6;
const UDP_CEILING: f64 = 20e9;
const UDP_PRECISION: f64 = 1.1;
/// The resolver dnsperf asks directly (through whatever carries the traffic).
pub const RESOLVER: &str = addr::RESOLVER_PRIMARY;
/// The names dnsperf cycles through, all in the private zone.
pub fn query_file_text() -> String {
    let d = crate::zone::DOMAIN;
    format!("db.{d} A\nssh.{d} A\nwhich.{d} TXT\n")
}

/// The exact commands, as run in the operator host's namespace (`RATE` is the search's).
pub fn commands(plan: &Plan) -> Vec<String> {
    let t = plan.tcp_secs.to_string();
    vec![
        ping_argv(plan).join(" "),
        iperf3_tcp_argv(&t, false).join(" "),
        iperf3_tcp_argv(&t, true).join(" "),
        iperf3_udp_argv("RATE", &plan.udp_probe_secs.to_string()).join(" "),
        dnsperf_argv(RESOLVER, "queries.txt", plan.dns_secs).join(" "),
    ]
}

fn ping_argv(plan: &Plan) -> Vec<String> {
    [
        "ping",
        "-n",
        "-c",
        &plan.ping_count.to_string(),
        "-i",
        PING_INTERVAL,
        addr::VPC_HOST,
    ]
    .map(String::from)
    .to_vec()
}

fn iperf3_tcp_argv(secs: &str, reverse: bool) -> Vec<String> {
    let mut v: Vec<String> = ["iperf3", "-J", "-c", addr::VPC_HOST, "-t", secs]
        .map(String::from)
        .to_vec();
    if reverse {
        v.push("-R".into());
    }
    v
}

fn iperf3_udp_argv(rate: &str, secs: &str) -> Vec<String> {
    [
        "iperf3",
        "-J",
        "-u",
        "-l",
        UDP_LEN,
        "-b",
        rate,
        "-c",
        addr::VPC_HOST,
        "-t",
        secs,
    ]
    .map(String::from)
    .to_vec()
}

fn dnsperf_argv(server: &str, file: &str, secs: u32) -> Vec<String> {
    ["dnsperf", "-s", server, "-d", file, "-l", &secs.to_string()]
        .map(String::from)
        .to_vec()
}

/// Runs `argv` on the operator host under `timeout` (killed `limit` seconds in), returning
/// stdout whatever the exit status, plus the status and stderr for error messages.
fn run_bounded(lab: &Lab, limit: u32, argv: &[String]) -> anyhow::Result<(bool, String, String)> {
    let limit = limit.to_string();
    let mut full: Vec<&str> = vec!["timeout", "-k", "5", &limit];
    full.extend(argv.iter().map(String::as_str));
    let out = lab.run(Host::Operator, &full)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Idle ping: average and p99 of every reply's RTT, in ms.
pub fn ping(lab: &Lab, plan: &Plan, column: &str, samples: &mut Samples) -> anyhow::Result<()> {
    let limit = plan.ping_count / 50 + 15;
    let (_, out, err) = run_bounded(lab, limit, &ping_argv(plan))?;
    let rtts = parse::ping_rtts(&out);
    if rtts.is_empty() {
        anyhow::bail!("ping got no reply\n{out}{err}");
    }
    if rtts.len() < plan.ping_count as usize {
        eprintln!("    ping: {} of {} replies", rtts.len(), plan.ping_count);
    }
    samples.add(
        column,
        report::PING_AVG,
        report::mean(&rtts).unwrap_or(f64::NAN),
    );
    samples.add(
        column,
        report::PING_P99,
        report::percentile(&rtts, 99.0).unwrap_or(f64::NAN),
    );
    Ok(())
}

fn cpu_now() -> anyhow::Result<CpuTicks> {
    parse::proc_stat(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety requirements.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100)
}

/// UDP buffer drops summed over the namespaces of both tunnel ends.
fn udp_drops(lab: &Lab) -> anyhow::Result<u64> {
    let mut total = 0;
    for h in [Host::Operator, Host::VpcGateway] {
        total += parse::udp_buffer_drops(&lab.run_ok(h, &["cat", "/proc/net/snmp"])?)?;
    }
    Ok(total)
}

/// One 1-stream TCP run, operator→VPC or (`reverse`) VPC→operator: throughput, machine CPU
/// per GB received, the sender's retransmits, the tunnel ends' UDP buffer drops, and how busy
/// the machine was in the second before (other work on a shared machine shows there).
pub fn tcp(
    lab: &Lab,
    plan: &Plan,
    reverse: bool,
    column: &str,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let (throughput, cpu, retrans, drops): (Figure, Figure, Figure, Figure) = if reverse {
        (
            report::TCP_DOWN,
            report::CPU_DOWN,
            report::RETRANS_DOWN,
            report::DROPS_DOWN,
        )
    } else {
        (
            report::TCP_UP,
            report::CPU_UP,
            report::RETRANS_UP,
            report::DROPS_UP,
        )
    };
    let hz = clock_ticks_per_second();
    let idle0 = cpu_now()?;
    std::thread::sleep(Duration::from_secs(1));
    let before = cpu_now()?;
    let drops0 = udp_drops(lab)?;
    let cpu0 = cpu_now()?;
    let argv = iperf3_tcp_argv(&plan.tcp_secs.to_string(), reverse);
    let (_, out, err) = run_bounded(lab, plan.tcp_secs + 30, &argv)?;
    let cpu1 = cpu_now()?;
    let drops1 = udp_drops(lab)?;
    let run = parse::iperf3_tcp(&out).with_context(|| format!("{}\n{err}", argv.join(" ")))?;
    samples.add(
        column,
        report::IDLE_CPU,
        before.busy_since(idle0) as f64 / hz as f64,
    );
    samples.add(column, throughput, run.bits_per_second / 1e6);
    if let Some(c) = parse::cpu_seconds_per_gb(cpu1.busy_since(cpu0), hz, run.bytes) {
        samples.add(column, cpu, c);
    }
    samples.add(column, retrans, run.retransmits);
    samples.add(column, drops, drops1.saturating_sub(drops0) as f64);
    Ok(())
}

/// One probe of the UDP rate search, in Mbit/s; `failed` says why iperf3 gave no result
/// (counted as everything lost).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub offered: f64,
    pub received: f64,
    pub lost_percent: f64,
    pub failed: Option<String>,
}

/// `100→99 1.05%, 400 failed (reason)`: the probes in the order they ran.
pub fn probe_line(probes: &[Probe]) -> String {
    probes
        .iter()
        .map(|p| match &p.failed {
            None => format!("{:.0}→{:.0} {:.2}%", p.offered, p.received, p.lost_percent),
            Some(why) => format!("{:.0} failed ({why})", p.offered),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The highest UDP rate received with at most 1 % of 1200-byte datagrams lost; returns every
/// probe, for the report.
pub fn udp(
    lab: &Lab,
    plan: &Plan,
    column: &str,
    samples: &mut Samples,
) -> anyhow::Result<Vec<Probe>> {
    let mut search = RateSearch::new(
        UDP_START,
        UDP_FLOOR,
        UDP_CEILING,
        UDP_PRECISION,
        plan.udp_max_probes,
    );
    let mut probes = Vec::new();
    let secs = plan.udp_probe_secs.to_string();
    while let Some(rate) = search.next_rate() {
        let argv = iperf3_udp_argv(&format!("{rate:.0}"), &secs);
        let (_, out, err) = run_bounded(lab, plan.udp_probe_secs + 30, &argv)?;
        match parse::iperf3_udp(&out) {
            Ok(r) => {
                search.record(rate, r.received_bits_per_second, r.lost_percent);
                probes.push(Probe {
                    offered: rate / 1e6,
                    received: r.received_bits_per_second / 1e6,
                    lost_percent: r.lost_percent,
                    failed: None,
                });
            }
            Err(e) if search.probes() == 0 => {
                return Err(e).with_context(|| format!("{}\n{err}", argv.join(" ")));
            }
            Err(e) => {
                // Mid-search, a failed probe is the path failing at that rate (e.g. the
                // tunnel's MTU fell below the datagram: EMSGSIZE): nothing got through.
                search.record(rate, 0.0, 100.0);
                probes.push(Probe {
                    offered: rate / 1e6,
                    received: 0.0,
                    lost_percent: 100.0,
                    failed: Some(format!("{e:#}").lines().next().unwrap_or_default().into()),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    if let Some(best) = search.result() {
        samples.add(column, report::UDP, best / 1e6);
    }
    Ok(probes)
}

/// dnsperf at `server` for the plan's seconds: queries per second and queries lost.
pub fn dns(
    lab: &Lab,
    plan: &Plan,
    server: &str,
    figures: (Figure, Figure),
    column: &str,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let file = lab.dir().join("queries.txt");
    std::fs::write(&file, query_file_text())?;
    let file = file.to_str().context("lab dir is not UTF-8")?;
    let argv = dnsperf_argv(server, file, plan.dns_secs);
    let (_, out, err) = run_bounded(lab, plan.dns_secs + 30, &argv)?;
    let run = parse::dnsperf(&out).with_context(|| format!("{}\n{out}{err}", argv.join(" ")))?;
    samples.add(column, figures.0, run.queries_per_second);
    samples.add(column, figures.1, run.lost);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_line_lists_rates_losses_and_failures_in_order() {
        let probes = [
            Probe {
                offered: 100.0,
                received: 99.4,
                lost_percent: 1.049,
                failed: None,
            },
            Probe {
                offered: 400.0,
                received: 0.0,
                lost_percent: 100.0,
                failed: Some("iperf3: Message too long".into()),
            },
        ];
        assert_eq!(
            probe_line(&probes),
            "100→99 1.05%, 400 failed (iperf3: Message too long)"
        );
    }

    #[test]
    fn commands_are_the_ones_run() {
        let c = commands(&Plan::QUICK);
        assert_eq!(c[0], "ping -n -c 200 -i 0.01 10.128.0.10");
        assert_eq!(c[1], "iperf3 -J -c 10.128.0.10 -t 2");
        assert_eq!(c[2], "iperf3 -J -c 10.128.0.10 -t 2 -R");
        assert_eq!(c[3], "iperf3 -J -u -l 1200 -b RATE -c 10.128.0.10 -t 1");
        assert_eq!(c[4], "dnsperf -s 10.128.0.61 -d queries.txt -l 2");
    }
}
