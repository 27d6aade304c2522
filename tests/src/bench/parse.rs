//! Reading what the measuring tools print (iperf3 JSON, dnsperf, ping, /proc/stat,
//! /proc/net/snmp, openssl): pure functions, so each is tested on a captured sample and the
//! bench never silently turns a tool's changed output into a zero.

use anyhow::{Context, bail};

/// One iperf3 TCP run as the receiver counted it, with the sender's retransmits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpRun {
    pub bits_per_second: f64,
    pub bytes: f64,
    /// `tcpi_total_retrans` of the sending socket (iperf3 reports the server's with `-R`), so
    /// only the measured flow counts, not the tunnel's own TCP in the same namespace.
    pub retransmits: f64,
}

/// `iperf3 -J` of a TCP test (either direction).
pub fn iperf3_tcp(json: &str) -> anyhow::Result<TcpRun> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let recv = &v["end"]["sum_received"];
    Ok(TcpRun {
        bits_per_second: recv["bits_per_second"]
            .as_f64()
            .context("iperf3 gave no end.sum_received.bits_per_second")?,
        bytes: recv["bytes"]
            .as_f64()
            .context("iperf3 gave no end.sum_received.bytes")?,
        retransmits: v["end"]["sum_sent"]["retransmits"]
            .as_f64()
            .context("iperf3 gave no end.sum_sent.retransmits")?,
    })
}

/// One iperf3 UDP run: what arrived and the share lost on the way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpRun {
    pub sent_bits_per_second: f64,
    pub received_bits_per_second: f64,
    pub lost_percent: f64,
}

/// `iperf3 -u -J`: the receiver's view is in `end.sum_received` (iperf3 3.12).
pub fn iperf3_udp(json: &str) -> anyhow::Result<UdpRun> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let recv = &end["sum_received"];
    let num = |x: &serde_json::Value, what: &str| {
        x.as_f64()
            .with_context(|| format!("iperf3 gave no end.{what}"))
    };
    Ok(UdpRun {
        sent_bits_per_second: num(&end["sum_sent"]["bits_per_second"], "sum_sent")?,
        received_bits_per_second: num(&recv["bits_per_second"], "sum_received.bits_per_second")?,
        lost_percent: num(&recv["lost_percent"], "sum_received.lost_percent")?,
    })
}

/// dnsperf's summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DnsRun {
    pub queries_per_second: f64,
    pub lost: f64,
}

pub fn dnsperf(out: &str) -> anyhow::Result<DnsRun> {
    let field = |name: &str| -> anyhow::Result<f64> {
        out.lines()
            .map(str::trim_start)
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim_start().strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("dnsperf printed no \"{name}:\""))
    };
    Ok(DnsRun {
        queries_per_second: field("Queries per second")?,
        lost: field("Queries lost")?,
    })
}

/// Every `time=` of a non-quiet ping, in ms, in arrival order.
pub fn ping_rtts(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.split_once("time=").map(|(_, t)| t))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// Busy and total time of all CPUs from the first line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    /// user + nice + system + irq + softirq (guest time is inside user already).
    pub busy: u64,
    pub total: u64,
}

impl CpuTicks {
    /// Ticks spent busy from `self` to `later` (0 if the counters went backwards).
    pub fn busy_since(self, earlier: CpuTicks) -> u64 {
        self.busy.saturating_sub(earlier.busy)
    }
}

pub fn proc_stat(text: &str) -> anyhow::Result<CpuTicks> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no \"cpu \" line")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().context("/proc/stat: not a number"))
        .collect::<anyhow::Result<_>>()?;
    if f.len() < 7 {
        bail!("/proc/stat: {} fields on the cpu line, 7 needed", f.len());
    }
    // user nice system idle iowait irq softirq [steal guest guest_nice]
    let busy = f[0] + f[1] + f[2] + f[5] + f[6];
    let total = f.iter().take(8).sum();
    Ok(CpuTicks { busy, total })
}

/// CPU-seconds per GB moved: busy ticks over the run at `hz` ticks a second, per 10^9 bytes.
pub fn cpu_seconds_per_gb(busy_ticks: u64, hz: u64, bytes: f64) -> Option<f64> {
    (bytes > 0.0 && hz > 0).then(|| busy_ticks as f64 / hz as f64 / (bytes / 1e9))
}

/// UDP socket buffer drops of one namespace: `RcvbufErrors + SndbufErrors` from /proc/net/snmp.
pub fn udp_buffer_drops(snmp: &str) -> anyhow::Result<u64> {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (
        lines.next().context("/proc/net/snmp has no Udp header")?,
        lines.next().context("/proc/net/snmp has no Udp values")?,
    );
    let mut total = 0;
    for want in ["RcvbufErrors", "SndbufErrors"] {
        let i = names
            .split_whitespace()
            .position(|n| n == want)
            .with_context(|| format!("/proc/net/snmp has no Udp {want}"))?;
        total += values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("/proc/net/snmp: no value for Udp {want}"))?;
    }
    Ok(total)
}

/// `openssl x509 -noout -fingerprint -sha256` → `sha256:<lowercase hex>`, the form quincy's
/// users file lists client certificates by.
pub fn sha256_fingerprint(openssl_out: &str) -> anyhow::Result<String> {
    let (_, hex) = openssl_out
        .trim()
        .split_once('=')
        .context("openssl printed no fingerprint")?;
    let hex: String = hex
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_lowercase();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("not a SHA-256 fingerprint: {hex:?}");
    }
    Ok(format!("sha256:{hex}"))
}

/// The last 32 bytes of a DER X25519 key (PKCS#8 private or SPKI public) as hex: the raw key,
/// which is what WireGuard's configuration protocol takes.
pub fn x25519_raw_hex(der: &[u8]) -> anyhow::Result<String> {
    if der.len() < 32 + 12 {
        bail!("{} bytes is too short for a DER X25519 key", der.len());
    }
    Ok(der[der.len() - 32..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_REVERSE: &str = r#"{"start":{},"intervals":[],"end":{"streams":[],
        "sum_sent":{"start":0,"end":8.0004,"seconds":8.0004,"bytes":1969356800,
          "bits_per_second":15748192914.4,"retransmits":698,"sender":false},
        "sum_received":{"start":0,"end":8.0001,"seconds":8.0001,"bytes":1966407304,
          "bits_per_second":15729040637.3,"sender":false},
        "cpu_utilization_percent":{"host_total":48.5}}}"#;

    #[test]
    fn reads_received_throughput_and_sender_retransmits_from_iperf3_tcp_json() {
        let r = iperf3_tcp(TCP_REVERSE).expect("parse");
        assert_eq!(r.bits_per_second, 15729040637.3);
        assert_eq!(r.bytes, 1966407304.0);
        assert_eq!(r.retransmits, 698.0);
    }

    #[test]
    fn an_iperf3_error_is_an_error_not_a_zero() {
        let e = iperf3_tcp(r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}"#)
            .expect_err("error");
        assert!(e.to_string().contains("Connection refused"), "{e}");
        assert!(iperf3_tcp(r#"{"end":{}}"#).is_err());
        assert!(iperf3_tcp("iperf3: error").is_err());
    }

    #[test]
    fn reads_received_rate_and_loss_from_iperf3_udp_json() {
        let json = r#"{"end":{"streams":[],"sum":{"bits_per_second":199828013.07,"lost_percent":0.51},
            "sum_sent":{"bytes":24980400,"bits_per_second":199828013.07,"lost_packets":108,
              "packets":20817,"lost_percent":0.5188,"sender":true},
            "sum_received":{"bytes":24850800,"bits_per_second":198765056.87,"lost_packets":108,
              "packets":20817,"lost_percent":0.5188067444876784,"sender":false}}}"#;
        let r = iperf3_udp(json).expect("parse");
        assert_eq!(r.sent_bits_per_second, 199828013.07);
        assert_eq!(r.received_bits_per_second, 198765056.87);
        assert_eq!(r.lost_percent, 0.5188067444876784);
    }

    #[test]
    fn reads_queries_per_second_and_lost_from_dnsperf() {
        let out = "DNS Performance Testing Tool\nVersion 2.10.0\n\nStatistics:\n\n  \
                   Queries sent:         108246\n  Queries completed:    108240 (99.99%)\n  \
                   Queries lost:         6 (0.01%)\n\n  Run time (s):         2.001039\n  \
                   Queries per second:   54094.897701\n\n  Average Latency (s):  0.001470\n";
        let r = dnsperf(out).expect("parse");
        assert_eq!(r.queries_per_second, 54094.897701);
        assert_eq!(r.lost, 6.0);
        assert!(dnsperf("Error: could not open file").is_err());
    }

    #[test]
    fn collects_every_ping_reply_time() {
        let out = "PING 10.128.0.10 (10.128.0.10) 56(84) bytes of data.\n\
                   64 bytes from 10.128.0.10: icmp_seq=1 ttl=62 time=0.045 ms\n\
                   64 bytes from 10.128.0.10: icmp_seq=2 ttl=62 time=1.59 ms\n\
                   64 bytes from 10.128.0.10: icmp_seq=4 ttl=62 time=12 ms\n\n\
                   --- 10.128.0.10 ping statistics ---\n\
                   4 packets transmitted, 3 received, 25% packet loss, time 64ms\n\
                   rtt min/avg/max/mdev = 0.045/4.545/12.000/0.006 ms\n";
        assert_eq!(ping_rtts(out), vec![0.045, 1.59, 12.0]);
    }

    #[test]
    fn counts_user_nice_system_irq_softirq_as_busy() {
        let a = proc_stat("cpu  100 10 50 1000 5 3 7 2 0 0\ncpu0 50 5 25 500 2 1 3 1 0 0\n")
            .expect("parse");
        assert_eq!(a.busy, 100 + 10 + 50 + 3 + 7);
        assert_eq!(a.total, 100 + 10 + 50 + 1000 + 5 + 3 + 7 + 2);
        let b = proc_stat("cpu  300 10 150 1100 5 3 57 2 0 0\n").expect("parse");
        assert_eq!(b.busy_since(a), 200 + 100 + 50);
        assert_eq!(a.busy_since(b), 0, "counters never go back; no underflow");
        assert!(proc_stat("cpu0 1 2 3\n").is_err());
        assert!(proc_stat("cpu  1 2 3\n").is_err());
    }

    #[test]
    fn cpu_seconds_per_gb_divides_busy_seconds_by_gigabytes() {
        // 250 ticks at 100 Hz = 2.5 s for 0.5 GB: 5 s/GB.
        assert_eq!(cpu_seconds_per_gb(250, 100, 0.5e9), Some(5.0));
        assert_eq!(cpu_seconds_per_gb(250, 100, 0.0), None);
    }

    #[test]
    fn udp_buffer_drops_add_receive_and_send_buffer_errors() {
        let snmp = "Tcp: RtoAlgorithm RtoMin\nTcp: 1 200\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    Udp: 108252 0 660 774475 650 10 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    UdpLite: 0 0 0 0 99 99 0\n";
        assert_eq!(udp_buffer_drops(snmp).expect("parse"), 660);
        assert!(udp_buffer_drops("Udp: InDatagrams\nUdp: 1\n").is_err());
    }

    #[test]
    fn fingerprint_becomes_quincys_lowercase_sha256_form() {
        let out = "sha256 Fingerprint=2D:BA:01:52:92:10:E4:E8:28:26:5D:56:32:9D:F1:B8:5A:8F:9A:ED:CC:DD:3F:EF:67:AB:50:2B:57:CB:00:29\n";
        assert_eq!(
            sha256_fingerprint(out).expect("parse"),
            "sha256:2dba01529210e4e828265d56329df1b85a8f9aedccdd3fef67ab502b57cb0029"
        );
        assert!(sha256_fingerprint("SHA1 Fingerprint=AB:CD").is_err());
    }

    #[test]
    fn raw_x25519_key_is_the_last_32_bytes_of_the_der() {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e,
        ];
        der.extend([0x04, 0x22, 0x04, 0x20]);
        der.extend(0u8..32);
        let hex = x25519_raw_hex(&der).expect("key");
        assert_eq!(hex.len(), 64);
        assert!(
            hex.starts_with("000102") && hex.ends_with("1d1e1f"),
            "{hex}"
        );
        assert!(x25519_raw_hex(&[0; 40]).is_err());
    }
}
