//! The report `cargo xtask bench` writes to docs/bench.md: the machine, the run, the table,
//! and exactly how each figure was measured, so a reader can judge and repeat it.

use std::time::Duration;

use super::measure::{self, Plan};
use super::report::{self, Column, Samples};
use super::{BORINGTUN_VERSION, Options, QUINCY_VERSION, peers};

pub(super) fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}

/// Facts about the machine and the run, for the report.
#[derive(Debug, Clone)]
pub(super) struct Environment {
    pub(super) date: String,
    pub(super) kernel: String,
    pub(super) cpu: String,
    pub(super) load_before: String,
    pub(super) revision: String,
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Environment {
    pub(super) fn read() -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown", |(_, m)| m.trim());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        Environment {
            date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .unwrap_or_else(|| "unknown".into()),
            kernel: command_line("uname", &["-r"]).unwrap_or_else(|| "unknown".into()),
            cpu: format!("{model}, {cpus} CPUs"),
            load_before: load_average(),
            revision: command_line("git", &["describe", "--always", "--dirty"])
                .unwrap_or_else(|| "unknown".into()),
        }
    }
}

pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// A finished run, for the report.
pub(super) struct Finished<'a> {
    pub(super) options: &'a Options,
    pub(super) plan: &'a Plan,
    pub(super) env: &'a Environment,
    pub(super) columns: &'a [Column],
    pub(super) table: &'a str,
    pub(super) samples: &'a Samples,
    pub(super) notes: &'a [String],
    /// Each column's UDP rate search, probe by probe.
    pub(super) udp_log: &'a [String],
    pub(super) elapsed: Duration,
    pub(super) load_after: String,
}

pub(super) fn render_report(f: &Finished) -> String {
    let Finished {
        options: o,
        plan,
        env,
        columns,
        table,
        samples,
        notes,
        udp_log,
        elapsed,
        ref load_after,
    } = *f;
    let background: Vec<f64> = columns
        .iter()
        .flat_map(|c| samples.get(&c.id, report::IDLE_CPU).to_vec())
        .collect();
    let busy = report::median(&background).unwrap_or(0.0);
    let busiest = background.iter().copied().fold(0.0, f64::max);
    let mut s = String::new();
    s.push_str("# Bench: the gateway tunnel against the direct path and other tunnels\n\n");
    s.push_str(&format!(
        "Written by `cargo xtask bench{}` on {} ({} repetition(s), medians; {} in all). \
         Figures are comparable only inside one run: rerun the bench to compare a change.\n\n",
        if o.quick { " --quick" } else { "" },
        env.date,
        o.reps,
        minutes(elapsed)
    ));
    s.push_str(&format!("- kernel {}; {}\n", env.kernel, env.cpu));
    s.push_str(&format!("- gateway at `{}`", env.revision));
    if let Some(b) = &o.baseline_bin_dir {
        s.push_str(&format!("; baseline binaries from `{}`", b.display()));
    }
    s.push('\n');
    s.push_str(&format!(
        "- load average before {}, after {}; machine CPU busy in the idle second before a TCP \
         run: median {:.2}, at most {:.2} cores{}\n\n",
        env.load_before,
        load_after,
        busy,
        busiest,
        if busy > 0.2 || busiest > 0.5 {
            " — **the machine was shared with other work during this run**: CPU per GB includes it, throughput suffers from it"
        } else {
            ""
        }
    ));
    s.push_str(table);
    s.push_str(
        "\nRatios divide the gateway (QUIC) by the column named (gw/baseline: this build by the \
         baseline build; tls/quic: the TLS-over-TCP fallback by QUIC), figure by figure: above 1 is \
         better for Mbit/s and q/s, below 1 is better for ms, CPU-s/GB and counts.\n",
    );
    if !notes.is_empty() {
        s.push_str("\n## Notes from this run\n\n");
        for n in notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s.push_str("\n## How it was measured\n\n");
    s.push_str(&format!(
        "Each repetition runs every column in turn, each in a fresh lab (the README's \
         namespaces: operator host → underlay → VPC gateway → VPC host). Direct: the underlay \
         routes 10.128.0.0/16 to the VPC gateway. Every other column: no such route, the tunnel \
         runs from the operator host to the VPC gateway. Every path except the gateway's gets \
         source NAT into the VPC on the VPC gateway (`{}`), as the connector does.\n\n\
         Commands, in the operator host's namespace, each under `timeout`:\n\n",
        peers::MASQUERADE_TEXT
    ));
    for c in measure::commands(plan) {
        s.push_str(&format!("    {c}\n"));
    }
    s.push_str(&format!(
        "\n- `queries.txt`: {}; the gateway is also asked at its client's stub \
         (`dnsperf -s 127.0.0.53`).\n\
         - UDP: `RATE` starts at 100 Mbit/s, doubles while ≤ 1 % of datagrams are lost and halves \
         while more are, then bisects geometrically until within 10 % ({} probes at most); the \
         figure is the highest rate received by a passing probe. A passing probe that received \
         under 90 % of what it offered (the sender's limit) ends the search.\n\
         - Ping: the mean and the nearest-rank 99th percentile of the {} reply times.\n\
         - CPU: /proc/stat of the whole machine (user + nice + system + irq + softirq, all CPUs) \
         read around each TCP run, per 10^9 bytes received; it counts iperf3, both tunnel ends, the \
         kernel and anything else running then.\n\
         - Retransmits: the sending socket's total retransmits as iperf3 reports them (TCP_INFO), \
         so the tunnel's own TCP does not count. UDP drops: RcvbufErrors + SndbufErrors of \
         /proc/net/snmp in the operator host's and the VPC gateway's namespaces, around each TCP run.\n\
         - quincy {QUINCY_VERSION} (`cargo install --locked quincy-client@{QUINCY_VERSION} \
         quincy-server@{QUINCY_VERSION}`): {}.\n\
         - boringtun {BORINGTUN_VERSION} (`cargo install --locked boringtun-cli@{BORINGTUN_VERSION}`): {}.\n",
        measure::query_file_text().trim().replace('\n', ", "),
        plan.udp_max_probes,
        plan.ping_count,
        peers::quincy_config_text(),
        peers::boringtun_config_text(),
    ));
    s.push_str("\n## Every repetition\n\n");
    s.push_str(&report::samples_table(columns, samples));
    if !udp_log.is_empty() {
        s.push_str("\nThe UDP rate searches (offered → received Mbit/s, loss):\n\n");
        for l in udp_log {
            s.push_str(&format!("- {l}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished_with_background(cores: &[f64], f: impl FnOnce(&Finished) -> String) -> String {
        let options = Options::parse(&["--bin-dir".into(), "/b".into()]).expect("options");
        let env = Environment {
            date: "2026-11-29 22:00 UTC".into(),
            kernel: "6.18.44".into(),
            cpu: "AMD EPYC, 2 CPUs".into(),
            load_before: "0.10 0.20 0.30".into(),
            revision: "ae4615e".into(),
        };
        let columns = [Column {
            id: "gateway".into(),
            title: "gateway".into(),
        }];
        let mut samples = Samples::default();
        for c in cores {
            samples.add("gateway", report::IDLE_CPU, *c);
        }
        let notes = ["quincy did not start".to_string()];
        let udp_log = ["gateway (repetition 1): 100→99 0.10%".to_string()];
        f(&Finished {
            options: &options,
            plan: &Plan::FULL,
            env: &env,
            columns: &columns,
            table: "| the table |\n",
            samples: &samples,
            notes: &notes,
            udp_log: &udp_log,
            elapsed: Duration::from_secs(905),
            load_after: "1.00 0.50 0.25".into(),
        })
    }

    #[test]
    fn report_names_machine_run_commands_and_notes() {
        let doc = finished_with_background(&[0.01, 0.02], render_report);
        for want in [
            "2026-11-29 22:00 UTC",
            "3 repetition(s)",
            "15 min 05 s",
            "kernel 6.18.44; AMD EPYC, 2 CPUs",
            "`ae4615e`",
            "| the table |",
            "- quincy did not start",
            "iperf3 -J -c 10.128.0.10 -t 8 -R",
            "ping -n -c 200 -i 0.01 10.128.0.10",
            "iperf3 -J -u -l 1200 -b RATE -c 10.128.0.10 -t 3",
            "dnsperf -s 10.128.0.61 -d queries.txt -l 10",
            "quincy-client@3.1.1",
            "boringtun-cli@0.7.1",
            "- gateway (repetition 1): 100→99 0.10%",
        ] {
            assert!(doc.contains(want), "missing {want:?} in:\n{doc}");
        }
        assert!(!doc.contains("was shared"), "{doc}");
    }

    #[test]
    fn report_says_the_machine_was_shared_when_it_was_busy_before_a_run() {
        let doc = finished_with_background(&[0.01, 0.01, 1.4], render_report);
        assert!(doc.contains("at most 1.40 cores"), "{doc}");
        assert!(doc.contains("the machine was shared"), "{doc}");
    }
}
