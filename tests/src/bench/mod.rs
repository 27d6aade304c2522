//! `lab bench`: the gateway tunnel against the direct path and against other tunnels (quincy,
//! boringtun) on the same lab and with the same commands, repeated and summarised in one table,
//! so a change to the data path is judged by figures from one run on one machine.
//!
//! Each repetition measures every column in turn, each in a fresh lab, starting one column
//! later each time, so slow drift on a shared machine spreads over all columns instead of
//! landing on one.

pub mod measure;
pub mod parse;
pub mod peers;
pub mod report;
pub mod search;
mod written;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{Lab, LabOptions};
use measure::Plan;
use report::{Column, Ratio, Samples};
use written::{Environment, Finished, minutes, render_report};

/// A tunnel started in a lab for the bench; `stop` ends it (the lab's teardown removes the rest).
pub trait Running {
    fn stop(self: Box<Self>) -> anyhow::Result<()>;
}

/// Starts the gateway's client and connector from a bin dir over a transport ("quic", "tcp")
/// and waits until the client is connected. The lab binary supplies it (it owns the configs).
pub type StartGateway<'a> = &'a dyn Fn(&Lab, &Path, &str) -> anyhow::Result<Box<dyn Running>>;

/// A peer tunnel's crate: installed with `cargo install --locked CRATE@VERSION` when missing
/// and only ever run as a program.
#[derive(Debug, Clone, Copy)]
pub struct PeerCrate {
    pub krate: &'static str,
    pub version: &'static str,
    pub bins: &'static [&'static str],
}

pub const QUINCY_VERSION: &str = "3.1.1";
pub const BORINGTUN_VERSION: &str = "0.7.1";
pub const PEER_CRATES: &[PeerCrate] = &[
    PeerCrate {
        krate: "quincy-server",
        version: QUINCY_VERSION,
        bins: &["quincy-server"],
    },
    PeerCrate {
        krate: "quincy-client",
        version: QUINCY_VERSION,
        bins: &["quincy-client"],
    },
    PeerCrate {
        krate: "boringtun-cli",
        version: BORINGTUN_VERSION,
        bins: &["boringtun-cli"],
    },
];

/// What carries the traffic in one column.
#[derive(Debug, Clone)]
enum Kind {
    Direct,
    Gateway { bin_dir: PathBuf, transport: String },
    Quincy,
    Boringtun,
}

#[derive(Debug, Clone)]
struct Contender {
    column: Column,
    kind: Kind,
    /// Why this column is no longer measured (it could not start).
    skipped: Option<String>,
}

pub const COLUMN_IDS: &[&str] = &[
    "direct",
    "gateway",
    "gateway-tcp",
    "gateway-hub",
    "baseline",
    "baseline-tcp",
    "quincy",
    "boringtun",
];

pub const RATIOS: &[Ratio] = &[
    Ratio {
        title: "gw/direct",
        numerator: "gateway",
        denominator: "direct",
    },
    Ratio {
        title: "gw/quincy",
        numerator: "gateway",
        denominator: "quincy",
    },
    Ratio {
        title: "gw/boringtun",
        numerator: "gateway",
        denominator: "boringtun",
    },
    Ratio {
        title: "hub/gw",
        numerator: "gateway-hub",
        denominator: "gateway",
    },
    Ratio {
        title: "tls/quic",
        numerator: "gateway-tcp",
        denominator: "gateway",
    },
    Ratio {
        title: "gw/baseline",
        numerator: "gateway",
        denominator: "baseline",
    },
];

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub baseline_bin_dir: Option<PathBuf>,
    /// Where quincy-* and boringtun-cli are (default: `$CARGO_HOME/bin`).
    pub peer_bin_dir: PathBuf,
    pub quick: bool,
    pub reps: usize,
    /// Only these column ids (all when empty).
    pub only: Vec<String>,
    /// Where the Markdown report goes (none when unset).
    pub out: Option<PathBuf>,
}

pub const USAGE: &str = "lab bench --bin-dir DIR [--baseline-bin-dir DIR] [--peer-bin-dir DIR] \
                         [--quick] [--reps N] [--only ID,ID..] [--out FILE]";

impl Options {
    /// Parses the arguments after `bench`.
    pub fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut bin_dir = None;
        let mut o = Options {
            bin_dir: PathBuf::new(),
            baseline_bin_dir: None,
            peer_bin_dir: default_peer_bin_dir(),
            quick: false,
            reps: 0,
            only: Vec::new(),
            out: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .with_context(|| format!("{a} needs a value; usage: {USAGE}"))
            };
            match a.as_str() {
                "--bin-dir" => bin_dir = Some(PathBuf::from(value()?)),
                "--baseline-bin-dir" => o.baseline_bin_dir = Some(PathBuf::from(value()?)),
                "--peer-bin-dir" => o.peer_bin_dir = PathBuf::from(value()?),
                "--out" => o.out = Some(PathBuf::from(value()?)),
                "--quick" => o.quick = true,
                "--reps" => {
                    let v = value()?;
                    o.reps = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=20).contains(n))
                        .with_context(|| format!("--reps {v}: a count from 1 to 20"))?;
                }
                "--only" => {
                    for id in value()?.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        if !COLUMN_IDS.contains(&id) {
                            bail!("--only {id}: not one of {}", COLUMN_IDS.join(", "));
                        }
                        o.only.push(id.to_string());
                    }
                }
                other => bail!("unknown argument {other}; usage: {USAGE}"),
            }
        }
        o.bin_dir = bin_dir.with_context(|| format!("--bin-dir is required; usage: {USAGE}"))?;
        if o.reps == 0 {
            o.reps = if o.quick { 1 } else { 3 };
        }
        Ok(o)
    }

    pub fn plan(&self) -> Plan {
        if self.quick { Plan::QUICK } else { Plan::FULL }
    }
}

fn default_peer_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn contenders(o: &Options) -> Vec<Contender> {
    let c = |id: &str, title: String, kind: Kind| Contender {
        column: Column {
            id: id.into(),
            title,
        },
        kind,
        skipped: None,
    };
    let gw = |dir: &Path, transport: &str| Kind::Gateway {
        bin_dir: dir.to_path_buf(),
        transport: transport.into(),
    };
    let mut v = vec![
        c("direct", "direct".into(), Kind::Direct),
        c("gateway", "gateway".into(), gw(&o.bin_dir, "quic")),
        c(
            "gateway-tcp",
            "gateway TLS/TCP".into(),
            gw(&o.bin_dir, "tcp"),
        ),
        // Through a hub (docs/hub.md): the connector dials out, the session stays end to end.
        c(
            "gateway-hub",
            "gateway via hub".into(),
            gw(&o.bin_dir, "hub"),
        ),
    ];
    if let Some(b) = &o.baseline_bin_dir {
        v.push(c("baseline", "baseline".into(), gw(b, "quic")));
        v.push(c("baseline-tcp", "baseline TLS/TCP".into(), gw(b, "tcp")));
    }
    v.push(c(
        "quincy",
        format!("quincy {QUINCY_VERSION}"),
        Kind::Quincy,
    ));
    v.push(c(
        "boringtun",
        format!("boringtun {BORINGTUN_VERSION}"),
        Kind::Boringtun,
    ));
    v.retain(|c| o.only.is_empty() || o.only.contains(&c.column.id));
    v
}

/// Runs the bench and prints the table; writes the report to `--out` if given.
pub fn run(o: &Options, start_gateway: StartGateway) -> anyhow::Result<()> {
    let plan = o.plan();
    let started = Instant::now();
    let env = Environment::read();
    let gatewayctl = o.bin_dir.join("gatewayctl");
    let gatewayctl = gatewayctl
        .to_str()
        .context("bin dir is not UTF-8")?
        .to_string();
    let mut contenders = contenders(o);
    let mut samples = Samples::default();
    let mut notes: Vec<String> = Vec::new();
    let mut udp_log: Vec<String> = Vec::new();
    println!(
        "bench: {} repetition(s) of {} column(s); load average before: {}",
        o.reps,
        contenders.len(),
        env.load_before
    );
    for rep in 1..=o.reps {
        let n = contenders.len();
        for i in rotation(n, rep - 1) {
            let c = &mut contenders[i];
            if c.skipped.is_some() {
                continue;
            }
            println!("[{rep}/{}] {}", o.reps, c.column.title);
            let id = c.column.id.clone();
            match run_one(o, &plan, c, &gatewayctl, start_gateway, &mut samples) {
                Ok(outcome) => {
                    notes.extend(
                        outcome
                            .warnings
                            .into_iter()
                            .map(|w| format!("{} (repetition {rep}): {w}", c.column.title)),
                    );
                    udp_log.push(format!(
                        "{} (repetition {rep}): {}",
                        c.column.title, outcome.udp_line
                    ));
                }
                Err(e) if id == "gateway" => return Err(e.context("the gateway did not start")),
                Err(e) => {
                    let reason = format!("{e:#}");
                    println!("    skipped from now on: {}", first_line(&reason));
                    notes.push(format!(
                        "{} did not start in repetition {rep} and was skipped from then on: {}",
                        c.column.title,
                        first_line(&reason)
                    ));
                    c.skipped = Some(reason);
                }
            }
            print_progress(&c.column.id, &samples);
        }
    }
    let columns: Vec<Column> = contenders
        .iter()
        .filter(|c| c.skipped.is_none() || !samples_empty(&samples, &c.column.id))
        .map(|c| c.column.clone())
        .collect();
    let table = report::table(&columns, RATIOS, &samples);
    let elapsed = started.elapsed();
    println!("\n{table}");
    for n in &notes {
        println!("note: {n}");
    }
    println!("bench took {}", minutes(elapsed));
    if let Some(out) = &o.out {
        let text = render_report(&Finished {
            options: o,
            plan: &plan,
            env: &env,
            columns: &columns,
            table: &table,
            samples: &samples,
            notes: &notes,
            udp_log: &udp_log,
            elapsed,
            load_after: written::load_average(),
        });
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
        println!("report written to {}", out.display());
    }
    Ok(())
}

/// The order of `n` columns in repetition `rep` (from 0): each repetition starts one column
/// later, so no column always runs first, or always right after the same one.
fn rotation(n: usize, rep: usize) -> Vec<usize> {
    (0..n).map(|i| (i + rep) % n.max(1)).collect()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

fn samples_empty(s: &Samples, id: &str) -> bool {
    report::FIGURES.iter().all(|f| s.get(id, *f).is_empty())
}

fn print_progress(id: &str, s: &Samples) {
    let last = |f: report::Figure| {
        s.get(id, f)
            .last()
            .map_or_else(|| "—".into(), |v| report::number(*v, f.decimals))
    };
    println!(
        "    tcp {} / {} Mbit/s, ping {} / {} ms, udp {} Mbit/s, dns {} q/s",
        last(report::TCP_UP),
        last(report::TCP_DOWN),
        last(report::PING_AVG),
        last(report::PING_P99),
        last(report::UDP),
        last(report::DNS_QPS),
    );
}

/// What one column's repetition leaves besides its samples.
struct Outcome {
    warnings: Vec<String>,
    /// The UDP rate search, probe by probe.
    udp_line: String,
}

/// One column in one repetition, in a fresh lab. An error means the tunnel did not start;
/// a measurement that fails is a warning and leaves its figure without this sample.
fn run_one(
    o: &Options,
    plan: &Plan,
    c: &Contender,
    gatewayctl: &str,
    start_gateway: StartGateway,
    samples: &mut Samples,
) -> anyhow::Result<Outcome> {
    let mut lab = Lab::start(LabOptions {
        direct_vpc_route: matches!(c.kind, Kind::Direct),
        servers: true,
    })?;
    if matches!(&c.kind, Kind::Gateway { transport, .. } if transport == "hub") {
        lab.add_hub()?;
    }
    let lab = lab;
    let running: Option<Box<dyn Running>> = match &c.kind {
        Kind::Direct => {
            peers::masquerade_into_vpc(&lab)?;
            None
        }
        Kind::Gateway { bin_dir, transport } => Some(start_gateway(&lab, bin_dir, transport)?),
        Kind::Quincy => Some(peers::start_quincy(&lab, &o.peer_bin_dir, gatewayctl)?),
        Kind::Boringtun => Some(peers::start_boringtun(&lab, &o.peer_bin_dir)?),
    };
    // Let path MTU discovery and handshakes settle, then warm the path up.
    std::thread::sleep(Duration::from_secs(1));
    let _ = lab.run(
        crate::Host::Operator,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            crate::addr::VPC_HOST,
        ],
    );
    let id = &c.column.id;
    let mut warnings = Vec::new();
    let mut note = |what: &str, r: anyhow::Result<()>| {
        if let Err(e) = r {
            println!("    {what} failed: {}", first_line(&format!("{e:#}")));
            warnings.push(format!("{what} failed: {}", first_line(&format!("{e:#}"))));
        }
    };
    note("ping", measure::ping(&lab, plan, id, samples));
    note(
        "tcp operator→VPC",
        measure::tcp(&lab, plan, false, id, samples),
    );
    note(
        "tcp VPC→operator",
        measure::tcp(&lab, plan, true, id, samples),
    );
    let mut udp_line = String::new();
    match measure::udp(&lab, plan, id, samples) {
        Ok(probes) => {
            udp_line = measure::probe_line(&probes);
            println!("    udp probes (offered → received Mbit/s, loss %): {udp_line}");
            for p in probes.iter().filter(|p| p.failed.is_some()) {
                note(
                    &format!("udp probe at {:.0} Mbit/s", p.offered),
                    Err(anyhow::anyhow!(p.failed.clone().unwrap_or_default())),
                );
            }
        }
        Err(e) => note("udp rate search", Err(e)),
    }
    note(
        "dns at the resolver",
        measure::dns(
            &lab,
            plan,
            measure::RESOLVER,
            (report::DNS_QPS, report::DNS_LOST),
            id,
            samples,
        ),
    );
    if matches!(c.kind, Kind::Gateway { .. }) {
        note(
            "dns at the stub",
            measure::dns(
                &lab,
                plan,
                "127.0.0.53",
                (report::STUB_QPS, report::STUB_LOST),
                id,
                samples,
            ),
        );
    }
    if let Some(Err(e)) = running.map(|r| r.stop()) {
        note("stopping the tunnel", Err(e));
    }
    Ok(Outcome { warnings, udp_line })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn each_repetition_starts_one_column_later() {
        assert_eq!(rotation(3, 0), [0, 1, 2]);
        assert_eq!(rotation(3, 1), [1, 2, 0]);
        assert_eq!(rotation(3, 4), [1, 2, 0]);
        assert!(rotation(0, 2).is_empty());
    }

    #[test]
    fn options_default_to_three_repetitions_or_one_when_quick() {
        let o = Options::parse(&args("--bin-dir /b")).expect("parse");
        assert_eq!((o.reps, o.quick, o.plan()), (3, false, Plan::FULL));
        let o = Options::parse(&args("--quick --bin-dir /b --reps 2")).expect("parse");
        assert_eq!((o.reps, o.quick, o.plan()), (2, true, Plan::QUICK));
    }

    #[test]
    fn options_refuse_unknown_columns_and_missing_values() {
        assert!(Options::parse(&args("--quick")).is_err(), "no --bin-dir");
        assert!(Options::parse(&args("--bin-dir /b --only gateway,wireguard")).is_err());
        assert!(Options::parse(&args("--bin-dir /b --reps 0")).is_err());
        assert!(Options::parse(&args("--bin-dir")).is_err());
        assert!(Options::parse(&args("--bin-dir /b --fast")).is_err());
    }

    #[test]
    fn a_baseline_adds_its_two_columns_and_only_keeps_the_named_ones() {
        let o = Options::parse(&args("--bin-dir /new --baseline-bin-dir /old")).expect("parse");
        let ids: Vec<String> = contenders(&o).into_iter().map(|c| c.column.id).collect();
        assert_eq!(ids, COLUMN_IDS);
        let o = Options::parse(&args("--bin-dir /new --only gateway,quincy")).expect("parse");
        let ids: Vec<String> = contenders(&o).into_iter().map(|c| c.column.id).collect();
        assert_eq!(ids, ["gateway", "quincy"]);
        let o = Options::parse(&args("--bin-dir /new")).expect("parse");
        assert!(
            contenders(&o)
                .iter()
                .all(|c| !c.column.id.starts_with("baseline"))
        );
    }
}
