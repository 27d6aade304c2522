//! The bench's figures and how they are summarised: every sample kept per column and figure,
//! medians over the repetitions, ratios between columns, rendered as one Markdown table (which
//! reads as well in a terminal as in docs/bench.md).

use std::collections::BTreeMap;

/// One measured quantity: a row of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub decimals: usize,
    /// Whether a ratio between columns means anything (not for the background load).
    pub ratios: bool,
}

const fn fig(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    decimals: usize,
) -> Figure {
    Figure {
        key,
        label,
        unit,
        decimals,
        ratios: true,
    }
}

pub const TCP_UP: Figure = fig("tcp_up", "TCP 1 stream operator→VPC", "Mbit/s", 0);
pub const TCP_DOWN: Figure = fig("tcp_down", "TCP 1 stream VPC→operator", "Mbit/s", 0);
pub const PING_AVG: Figure = fig("ping_avg", "idle ping avg", "ms", 3);
pub const PING_P99: Figure = fig("ping_p99", "idle ping p99", "ms", 3);
pub const UDP: Figure = fig(
    "udp",
    "UDP 1200 B: highest rate received with ≤ 1 % loss",
    "Mbit/s",
    0,
);
pub const DNS_QPS: Figure = fig("dns_qps", "DNS at the resolver 10.128.0.61", "q/s", 0);
pub const DNS_LOST: Figure = fig("dns_lost", "DNS at the resolver: lost", "queries", 0);
pub const STUB_QPS: Figure = fig("stub_qps", "DNS at the client's stub 127.0.0.53", "q/s", 0);
pub const STUB_LOST: Figure = fig("stub_lost", "DNS at the stub: lost", "queries", 0);
pub const CPU_UP: Figure = fig("cpu_up", "machine CPU per GB operator→VPC", "CPU-s/GB", 1);
pub const CPU_DOWN: Figure = fig("cpu_down", "machine CPU per GB VPC→operator", "CPU-s/GB", 1);
pub const RETRANS_UP: Figure = fig(
    "retrans_up",
    "inner TCP retransmits operator→VPC",
    "per run",
    0,
);
pub const RETRANS_DOWN: Figure = fig(
    "retrans_down",
    "inner TCP retransmits VPC→operator",
    "per run",
    0,
);
pub const DROPS_UP: Figure = fig(
    "drops_up",
    "UDP socket buffer drops, tunnel ends, operator→VPC",
    "per run",
    0,
);
pub const DROPS_DOWN: Figure = fig(
    "drops_down",
    "UDP socket buffer drops, tunnel ends, VPC→operator",
    "per run",
    0,
);
pub const IDLE_CPU: Figure = Figure {
    ratios: false,
    ..fig(
        "idle_cpu",
        "machine busy in the 1 s before each TCP run",
        "cores",
        2,
    )
};

/// The rows, in the order they are printed.
pub const FIGURES: &[Figure] = &[
    TCP_UP,
    TCP_DOWN,
    PING_AVG,
    PING_P99,
    UDP,
    DNS_QPS,
    DNS_LOST,
    STUB_QPS,
    STUB_LOST,
    CPU_UP,
    CPU_DOWN,
    RETRANS_UP,
    RETRANS_DOWN,
    DROPS_UP,
    DROPS_DOWN,
    IDLE_CPU,
];

/// A column: one path measured (direct, a gateway build over one transport, a peer tunnel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub id: String,
    pub title: String,
}

/// `numerator / denominator`, both column ids; shown only when both columns were measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    pub title: &'static str,
    pub numerator: &'static str,
    pub denominator: &'static str,
}

/// Every sample, by column id and figure key, in the order measured.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    values: BTreeMap<(String, &'static str), Vec<f64>>,
}

impl Samples {
    pub fn add(&mut self, column: &str, figure: Figure, value: f64) {
        if value.is_finite() {
            self.values
                .entry((column.to_string(), figure.key))
                .or_default()
                .push(value);
        }
    }

    pub fn get(&self, column: &str, figure: Figure) -> &[f64] {
        self.values
            .get(&(column.to_string(), figure.key))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn median(&self, column: &str, figure: Figure) -> Option<f64> {
        median(self.get(column, figure))
    }
}

/// The median (the mean of the middle two for an even count); `None` for no samples.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The nearest-rank percentile `p` (0-100) of `values`; `None` for no samples.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// `x` with `decimals` places, thousands separated by commas.
pub fn number(x: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, x.abs());
    let (int, frac) = s.split_once('.').unwrap_or((&s, ""));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if x < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0') {
        "-"
    } else {
        ""
    };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

/// A ratio for the table: two decimals, or "—" when either side is missing or the
/// denominator is zero (a count that stayed at zero).
pub fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> String {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d != 0.0 => format!("{:.2}", n / d),
        _ => "—".into(),
    }
}

/// The table of medians: one row per figure that has a sample anywhere, one column per path,
/// then the ratios whose two columns are both present.
pub fn table(columns: &[Column], ratios: &[Ratio], samples: &Samples) -> String {
    let present = |id: &str| columns.iter().any(|c| c.id == id);
    let ratios: Vec<&Ratio> = ratios
        .iter()
        .filter(|r| present(r.numerator) && present(r.denominator))
        .collect();
    let mut header = vec!["figure".to_string(), "unit".to_string()];
    header.extend(columns.iter().map(|c| c.title.clone()));
    header.extend(ratios.iter().map(|r| r.title.to_string()));
    let mut rows = vec![header];
    for f in FIGURES {
        if columns.iter().all(|c| samples.get(&c.id, *f).is_empty()) {
            continue;
        }
        let mut row = vec![f.label.to_string(), f.unit.to_string()];
        for c in columns {
            row.push(
                samples
                    .median(&c.id, *f)
                    .map_or_else(|| "—".into(), |m| number(m, f.decimals)),
            );
        }
        for r in &ratios {
            row.push(if f.ratios {
                ratio(
                    samples.median(r.numerator, *f),
                    samples.median(r.denominator, *f),
                )
            } else {
                String::new()
            });
        }
        rows.push(row);
    }
    markdown(&rows, 2)
}

/// Every repetition's value, `a / b / c`, so the spread behind each median can be seen.
pub fn samples_table(columns: &[Column], samples: &Samples) -> String {
    let mut header = vec!["figure".to_string()];
    header.extend(columns.iter().map(|c| c.title.clone()));
    let mut rows = vec![header];
    for f in FIGURES {
        if columns.iter().all(|c| samples.get(&c.id, *f).is_empty()) {
            continue;
        }
        let mut row = vec![format!("{} ({})", f.label, f.unit)];
        for c in columns {
            let v = samples.get(&c.id, *f);
            row.push(if v.is_empty() {
                "—".into()
            } else {
                v.iter()
                    .map(|x| number(*x, f.decimals))
                    .collect::<Vec<_>>()
                    .join(" / ")
            });
        }
        rows.push(row);
    }
    markdown(&rows, 1)
}

/// A Markdown table with padded cells; the first `left` columns align left, the rest right.
pub fn markdown(rows: &[Vec<String>], left: usize) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(0)
            .max(3)
    };
    let widths: Vec<usize> = (0..n).map(width).collect();
    let line = |r: &Vec<String>| {
        let cells: Vec<String> = (0..n)
            .map(|i| {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                if i < left {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut out = String::new();
    let Some((head, body)) = rows.split_first() else {
        return out;
    };
    out.push_str(&line(head));
    let rule: Vec<String> = (0..n)
        .map(|i| {
            if i < left {
                format!(":{}", "-".repeat(widths[i] - 1))
            } else {
                format!("{}:", "-".repeat(widths[i] - 1))
            }
        })
        .collect();
    out.push_str(&format!("| {} |\n", rule.join(" | ")));
    for r in body {
        out.push_str(&line(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_and_ignores_missing_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(198.0));
        assert_eq!(percentile(&v, 50.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 9.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn numbers_group_thousands_and_keep_their_decimals() {
        assert_eq!(number(12302.4, 0), "12,302");
        assert_eq!(number(1234567.891, 2), "1,234,567.89");
        assert_eq!(number(0.1094, 3), "0.109");
        assert_eq!(number(999.5, 0), "1,000");
        assert_eq!(number(-1234.0, 0), "-1,234");
        assert_eq!(number(-0.0001, 2), "0.00");
    }

    #[test]
    fn ratio_is_blank_without_both_sides_or_with_a_zero_denominator() {
        assert_eq!(ratio(Some(529.0), Some(370.0)), "1.43");
        assert_eq!(ratio(Some(5.0), Some(0.0)), "—");
        assert_eq!(ratio(None, Some(1.0)), "—");
    }

    fn col(id: &str, title: &str) -> Column {
        Column {
            id: id.into(),
            title: title.into(),
        }
    }

    #[test]
    fn table_shows_medians_and_only_the_ratios_whose_columns_ran() {
        let mut s = Samples::default();
        for v in [500.0, 540.0, 520.0] {
            s.add("gateway", TCP_UP, v);
        }
        for v in [13000.0, 12000.0, 12500.0] {
            s.add("direct", TCP_UP, v);
        }
        s.add("gateway", PING_AVG, 0.71);
        s.add("direct", PING_AVG, f64::NAN);
        s.add("gateway", IDLE_CPU, 1.5);
        s.add("direct", IDLE_CPU, 0.5);
        let columns = [col("direct", "direct"), col("gateway", "gateway")];
        let ratios = [
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
        ];
        let t = table(&columns, &ratios, &s);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "header, rule, three figures:\n{t}");
        assert!(
            lines[0].contains("gw/direct") && !lines[0].contains("gw/quincy"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("| :--") && lines[1].ends_with("-: |"),
            "{t}"
        );
        let cells = |l: &str| -> Vec<String> {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        };
        assert_eq!(
            cells(lines[2]),
            [
                "TCP 1 stream operator→VPC",
                "Mbit/s",
                "12,500",
                "520",
                "0.04"
            ]
        );
        assert_eq!(cells(lines[3]), ["idle ping avg", "ms", "—", "0.710", "—"]);
        assert_eq!(
            cells(lines[4]),
            [
                "machine busy in the 1 s before each TCP run",
                "cores",
                "0.50",
                "1.50",
                ""
            ],
            "no ratio of background load"
        );
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "aligned:\n{t}");
    }

    #[test]
    fn samples_table_lists_every_repetition() {
        let mut s = Samples::default();
        for v in [1.0, 2.0, 3.0] {
            s.add("quincy", DNS_LOST, v);
        }
        let t = samples_table(&[col("quincy", "quincy 3.1.1")], &s);
        assert!(t.contains(" 1 / 2 / 3 |"), "{t}");
        assert!(t.contains("DNS at the resolver: lost (queries)"), "{t}");
    }
}
