//! Operator-facing text. Rendering returns a `String` so it can be checked against expected
//! text in tests, without a daemon.

use std::fmt::Write;

use crate::api::{InterfaceStatus, Status};
use crate::core::text;

/// Text that came from a daemon, escaped again for the terminal: the daemon escapes what peers
/// send as it comes in, and this holds even for a daemon that did not.
fn esc(s: &str) -> String {
    text::clean(s, 4 * text::PEER_TEXT)
}

/// Renders `1h 2m 5s` style durations: operators read uptime, not seconds.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

/// Left-aligned columns, two spaces apart; numbers right-aligned.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>], numeric: &[bool]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            if numeric.get(i).copied().unwrap_or(false) {
                let _ = write!(l, "{cell:>w$}", w = widths[i]);
            } else {
                let _ = write!(l, "{cell:<w$}", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

/// Colour for a terminal, applied to the finished plain text so the alignment computed on
/// plain widths holds (escape codes take no columns). `anstream` strips it again when stdout
/// is not a terminal or NO_COLOR is set, so a pipe gets the plain text.
pub fn colourize(text: &str) -> String {
    use anstyle::{AnsiColor, Style};
    let red = Style::new().fg_color(Some(AnsiColor::Red.into())).bold();
    let green = Style::new().fg_color(Some(AnsiColor::Green.into()));
    let yellow = Style::new().fg_color(Some(AnsiColor::Yellow.into()));
    let bold = Style::new().bold();
    let paint = |style: Style, s: &str| format!("{style}{s}{style:#}");
    let mut out = String::with_capacity(text.len() + 256);
    for line in text.lines() {
        // The first line's "up 5m" is uptime, not a resolver's health.
        if line.starts_with("gatewayd ") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let is_header = line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.len() > 1 && w.chars().all(|c| c.is_ascii_uppercase()));
        if is_header {
            out.push_str(&paint(bold, line));
            out.push('\n');
            continue;
        }
        let mut l = line.to_string();
        for (word, style) in [
            ("NOT ATTACHED", red),
            ("IMPOSSIBLE", red),
            ("REFUSED", red),
            (" DOWN", red),
            ("NOT reserved", red),
            ("MISSING", red),
            ("is not running", red),
            ("EXPIRED", red),
            ("REVOKED", red),
            ("EXPIRES", yellow),
            ("refused:", yellow),
            ("reconnecting", yellow),
            ("tcp:", yellow),
            (" attached", green),
            (" present:", green),
            (" up ", green),
            ("connected to", green),
        ] {
            if l.contains(word) {
                l = l.replace(word, &paint(style, word));
            }
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Whether our program is at the hook, and how the kernel holds it there (`tcx`, or
/// `tc (clsact)` for a filter on a clsact qdisc); when it is missing, how it would be.
fn attach_state(i: &InterfaceStatus) -> String {
    if let Some(e) = &i.error {
        return format!("unknown: {e}");
    }
    let ours = i.programs.iter().find(|p| p.ours).and_then(|p| p.mode);
    match (i.classifier_attached, ours.or(i.attach)) {
        (true, mode) => format!("attached{}", via(mode)),
        (false, Some(mode)) => format!("NOT ATTACHED ({})", mode.label()),
        (false, None) => "NOT ATTACHED".into(),
    }
}

fn via(mode: Option<crate::api::AttachKind>) -> String {
    mode.map(|m| format!(" via {}", m.label()))
        .unwrap_or_default()
}

pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gatewayd {} on node {}, {} (pid {}), up {}",
        s.version,
        s.node,
        s.tunnel
            .as_ref()
            .map_or("classifier only", |t| t.role.as_str()),
        s.pid,
        human_duration(s.uptime_secs)
    );
    let _ = writeln!(out, "config: {}", s.config.display());
    if let Some(t) = &s.tls {
        render_tls(&mut out, t);
    }
    if let Some(r) = &s.last_reload {
        let when = human_duration((s.started_at + s.uptime_secs).saturating_sub(r.at));
        if r.ok {
            let _ = writeln!(out, "last reload: {when} ago, {}", esc(&r.message));
        } else {
            let _ = writeln!(
                out,
                "last reload: {when} ago, REFUSED (running the previous config): {}",
                esc(&r.message)
            );
        }
    }

    out.push('\n');
    if s.interfaces.is_empty() {
        out.push_str("classifier: attached to no interface ([dataplane] interfaces is empty)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .interfaces
            .iter()
            .map(|i| {
                let programs = if i.programs.is_empty() {
                    "-".to_string()
                } else {
                    i.programs
                        .iter()
                        .map(|p| {
                            format!(
                                "{} (id {}{}){}",
                                p.name,
                                p.id,
                                if p.ours { "" } else { ", not ours" },
                                via(p.mode)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                vec![i.name.clone(), attach_state(i), programs]
            })
            .collect();
        table(
            &mut out,
            &["INTERFACE", "CLASSIFIER", "INGRESS PROGRAMS"],
            &rows,
            &[false, false, false],
        );
    }

    out.push('\n');
    if s.routes.is_empty() {
        out.push_str("routes: none configured\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .routes
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.cidr.clone(),
                    r.packets.to_string(),
                    r.bytes.to_string(),
                ]
            })
            .collect();
        table(
            &mut out,
            &["ROUTE", "CIDR", "PACKETS", "BYTES"],
            &rows,
            &[false, false, true, true],
        );
    }

    out.push('\n');
    let counters: Vec<String> = s
        .classifier
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(out, "classifier packets: {}", counters.join(", "));
    for d in &s.dns_egress {
        let _ = writeln!(
            out,
            "dns steering at {} egress: {}",
            d.name,
            attach_state(d)
        );
    }
    if let Some(t) = &s.tunnel {
        render_tunnel(&mut out, t, s.started_at + s.uptime_secs);
    }
    if let Some(i) = &s.icmp {
        out.push('\n');
        let _ = writeln!(
            out,
            "icmp: ping_group_range \"{}\" (gid {}{}), echo probes {}",
            // The kernel separates the two numbers with a tab; a terminal would widen it.
            i.ping_group_range
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            i.gid,
            if i.managed { ", managed" } else { "" },
            if i.probes_possible {
                "work"
            } else {
                "IMPOSSIBLE"
            }
        );
        if let Some(fix) = &i.fix {
            let _ = writeln!(out, "  fix: {fix}");
        }
    }
    out
}

/// This node's certificate (with a warning near expiry) and the CRL in force.
fn render_tls(out: &mut String, t: &crate::api::TlsStatus) {
    let until = crate::pki::date(t.not_after);
    let left = match (&t.warning, t.expires_in_days) {
        (Some(w), _) if w.starts_with("REVOKED") => {
            format!("{w}; issue another (gatewayctl pki renew {})", t.identity)
        }
        (_, d) if d < 0 => format!(
            "EXPIRED on {until}: renew it (gatewayctl pki renew {})",
            t.identity
        ),
        (Some(_), d) => format!(
            "EXPIRES in {d} days ({until}): renew it (gatewayctl pki renew {})",
            t.identity
        ),
        (None, d) => format!("valid until {until}, {d} days left"),
    };
    let _ = writeln!(
        out,
        "certificate: {} ({}), serial {}, {left}",
        t.identity, t.profile, t.serial
    );
    if let Some(c) = &t.crl {
        let _ = writeln!(
            out,
            "crl: {}, {} revoked (number {}, issued {})",
            c.path.display(),
            c.revoked,
            c.number,
            crate::pki::date(c.issued_at)
        );
    }
}

fn render_tunnel(out: &mut String, t: &crate::api::TunnelStatus, now: u64) {
    out.push('\n');
    let _ = writeln!(
        out,
        "tunnel: {} on {} (mtu {}), {}",
        t.role,
        t.tun,
        t.mtu,
        esc(&t.state)
    );
    if let Some(p) = &t.egress_ports {
        let _ = writeln!(out, "egress ports: {p}");
    }
    if let Some(f) = &t.firewall {
        let _ = writeln!(out, "firewall: {f}");
    }
    if t.peers.is_empty() {
        out.push_str("peers: none\n");
    } else {
        let rows: Vec<Vec<String>> = t
            .peers
            .iter()
            .map(|p| {
                vec![
                    esc(&p.identity),
                    esc(&p.remote),
                    if p.transport_reason.is_empty() {
                        esc(&p.transport)
                    } else {
                        esc(&format!("{}: {}", p.transport, p.transport_reason))
                    },
                    p.address_v4.clone(),
                    format!("{:.1} ms", p.rtt_ms),
                    p.ping_ms.map_or("-".into(), |ms| format!("{ms:.1} ms")),
                    human_duration(now.saturating_sub(p.connected_since)),
                    format!("{}/{}", p.tx_packets, p.tx_bytes),
                    format!("{}/{}", p.rx_packets, p.rx_bytes),
                    p.policy_drops.to_string(),
                ]
            })
            .collect();
        table(
            out,
            &[
                "PEER",
                "REMOTE",
                "TRANSPORT",
                "ADDRESS",
                "RTT",
                "PING",
                "CONNECTED",
                "TX PKTS/BYTES",
                "RX PKTS/BYTES",
                "POLICY DROPS",
            ],
            &rows,
            &[
                false, false, false, false, true, true, true, true, true, true,
            ],
        );
    }
    for p in t.peers.iter().filter(|p| !p.advertised.is_empty()) {
        let _ = writeln!(
            out,
            "routed to {}: {}",
            esc(&p.identity),
            esc(&p.advertised.join(", "))
        );
    }
    for r in &t.refusals {
        let _ = writeln!(
            out,
            "refused: {} from {}: {}",
            esc(r.identity.as_deref().unwrap_or("(no identity)")),
            esc(&r.remote),
            esc(&r.reason)
        );
    }
    let counts = |m: &std::collections::BTreeMap<String, u64>| -> String {
        let v: Vec<String> = m.iter().map(|(k, v)| format!("{} {v}", esc(k))).collect();
        v.join(", ")
    };
    if !t.handshake_failures.is_empty() {
        let _ = writeln!(out, "failed handshakes: {}", counts(&t.handshake_failures));
    }
    if !t.limits.is_empty() {
        let _ = writeln!(out, "limits hit: {}", counts(&t.limits));
    }
    if t.access_streams_total > 0 {
        let _ = writeln!(
            out,
            "access streams: {} open, {} since start",
            t.access_streams_active, t.access_streams_total
        );
    }
    if !t.drops.is_empty() {
        let drops: Vec<String> = t.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "tunnel drops: {}", drops.join(", "));
    }
    for z in &t.zones {
        let resolvers: Vec<String> = z
            .resolvers
            .iter()
            .map(|r| {
                let dns = match (r.up, r.latency_ms) {
                    (true, Some(ms)) => format!("{} up {ms:.1} ms", r.address),
                    (true, None) => format!("{} up", r.address),
                    (false, _) => format!("{} DOWN", r.address),
                };
                match r.ping_ms {
                    Some(ms) => format!("{dns} (ping {ms:.1} ms)"),
                    None => dns,
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "dns zone {}: {} queries, {} answers, {} failovers, {} servfail{}{}",
            esc(&z.domain),
            z.queries,
            z.answers,
            z.failovers,
            z.servfails,
            if resolvers.is_empty() { "" } else { "; " },
            resolvers.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AttachKind, InterfaceStatus, ProgramInfo, RouteStatus, STATUS_SCHEMA};
    use std::collections::BTreeMap;

    #[test]
    fn tunnel_section_lists_peers_refusals_and_drops() {
        let t = crate::api::TunnelStatus {
            role: "connector".into(),
            tun: "gwtun".into(),
            mtu: 1434,
            state: "listening on 0.0.0.0:7844".into(),
            peers: vec![crate::api::PeerStatus {
                identity: "ops-alice".into(),
                remote: "198.51.100.10:7844".into(),
                transport: "tcp".into(),
                transport_reason: "no QUIC handshake in 1.5 s".into(),
                address_v4: "100.64.0.2".into(),
                address_v6: "fd00:64::2".into(),
                advertised: vec!["192.0.2.0/24".into(), "2001:db8:2::/64".into()],
                rtt_ms: 0.25,
                connected_since: 100,
                connection_id: 1,
                max_datagram: 1434,
                tx_packets: 10,
                tx_bytes: 1000,
                rx_packets: 12,
                rx_bytes: 1200,
                policy_drops: 1,
                ping_ms: Some(0.2),
            }],
            refusals: vec![crate::api::Refusal {
                identity: Some("dev-bob".into()),
                remote: "198.51.100.10:40000".into(),
                reason: "no [[policy]] entry matches identity \"dev-bob\"".into(),
                at: 150,
            }],
            drops: BTreeMap::from([("policy".into(), 1)]),
            egress_ports: None,
            firewall: None,
            access_streams_active: 1,
            access_streams_total: 3,
            limits: BTreeMap::from([("dns_rate".into(), 12), ("frame_too_long".into(), 1)]),
            handshake_failures: BTreeMap::from([("tls_failed".into(), 2)]),
            forward_filter: None,
            zones: vec![crate::api::ZoneStatus {
                domain: "hoge-vpc.com".into(),
                queries: 7,
                answers: 7,
                failovers: 2,
                servfails: 0,
                resolvers: vec![
                    crate::api::ResolverStatus {
                        address: "10.128.0.61".into(),
                        up: false,
                        latency_ms: Some(0.3),
                        ping_ms: Some(0.1),
                    },
                    crate::api::ResolverStatus {
                        address: "10.128.0.130".into(),
                        up: true,
                        latency_ms: Some(0.25),
                        ping_ms: None,
                    },
                ],
            }],
        };
        let mut out = String::new();
        render_tunnel(&mut out, &t, 165);
        let expected = "
tunnel: connector on gwtun (mtu 1434), listening on 0.0.0.0:7844
PEER       REMOTE              TRANSPORT                        ADDRESS        RTT    PING  CONNECTED  TX PKTS/BYTES  RX PKTS/BYTES  POLICY DROPS
ops-alice  198.51.100.10:7844  tcp: no QUIC handshake in 1.5 s  100.64.0.2  0.2 ms  0.2 ms      1m 5s        10/1000        12/1200             1
routed to ops-alice: 192.0.2.0/24, 2001:db8:2::/64
refused: dev-bob from 198.51.100.10:40000: no [[policy]] entry matches identity \"dev-bob\"
failed handshakes: tls_failed 2
limits hit: dns_rate 12, frame_too_long 1
access streams: 1 open, 3 since start
tunnel drops: policy 1
dns zone hoge-vpc.com: 7 queries, 7 answers, 2 failovers, 0 servfail; 10.128.0.61 DOWN (ping 0.1 ms), 10.128.0.130 up 0.2 ms
";
        assert_eq!(out, expected);
    }

    #[test]
    fn text_from_peers_cannot_add_lines_or_escape_sequences() {
        let hostile = "x\nrefused: ops-alice from 1.2.3.4: forged\x1b[2J\u{202e}";
        let peer = crate::api::PeerStatus {
            identity: "ops-\x1b]0;owned\x07".into(),
            remote: "198.51.100.10:7844".into(),
            transport: "tcp".into(),
            transport_reason: hostile.into(),
            address_v4: "100.64.0.2".into(),
            address_v6: "fd00:64::2".into(),
            advertised: vec![],
            rtt_ms: 0.0,
            connected_since: 0,
            connection_id: 1,
            max_datagram: 0,
            tx_packets: 0,
            tx_bytes: 0,
            rx_packets: 0,
            rx_bytes: 0,
            policy_drops: 0,
            ping_ms: None,
        };
        let t = crate::api::TunnelStatus {
            role: "connector".into(),
            tun: "gwtun".into(),
            mtu: 0,
            state: hostile.into(),
            peers: vec![peer],
            refusals: vec![crate::api::Refusal {
                identity: None,
                remote: "198.51.100.10:1".into(),
                reason: hostile.into(),
                at: 0,
            }],
            drops: BTreeMap::new(),
            zones: vec![],
            egress_ports: None,
            firewall: None,
            access_streams_active: 0,
            access_streams_total: 0,
            limits: BTreeMap::new(),
            handshake_failures: BTreeMap::new(),
            forward_filter: None,
        };
        let mut out = String::new();
        render_tunnel(&mut out, &t, 0);
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n'),
            "control characters reach the terminal: {out:?}"
        );
        assert_eq!(
            out.lines().filter(|l| l.starts_with("refused:")).count(),
            1,
            "{out}"
        );
        assert!(out.contains("\\u{1b}[2J"), "{out}");
    }

    #[test]
    fn colour_marks_problems_and_keeps_the_plain_text() {
        let plain = "INTERFACE  CLASSIFIER\nlan0       attached\neth1       NOT ATTACHED\n\
                     firewall: nftables table inet gw MISSING (removed by someone else?)\n";
        let coloured = colourize(plain);
        assert_ne!(coloured, plain);
        assert!(
            coloured.contains("\u{1b}[1m\u{1b}[31mNOT ATTACHED\u{1b}[0m"),
            "{coloured:?}"
        );
        assert!(
            coloured.contains("\u{1b}[1m\u{1b}[31mMISSING\u{1b}[0m"),
            "a missing table is red: {coloured:?}"
        );
        assert!(
            coloured.contains("\u{1b}[32m attached\u{1b}[0m"),
            "{coloured:?}"
        );
        let mut stripped = Vec::new();
        {
            let mut w = anstream::StripStream::new(&mut stripped);
            std::io::Write::write_all(&mut w, coloured.as_bytes()).expect("write");
        }
        assert_eq!(
            String::from_utf8_lossy(&stripped),
            plain,
            "piped output is the plain text"
        );
    }

    #[test]
    fn icmp_line_names_the_range_and_the_fix() {
        let mut s = crate::api::tests::sample_status();
        s.icmp = Some(crate::api::IcmpStatus {
            ping_group_range: "1\t0".into(),
            gid: 0,
            managed: false,
            probes_possible: false,
            fix: Some("sysctl -w net.ipv4.ping_group_range=\"0 0\"".into()),
        });
        let text = render_status(&s);
        assert!(
            text.ends_with(
                "\nicmp: ping_group_range \"1 0\" (gid 0), echo probes IMPOSSIBLE\n  \
                 fix: sysctl -w net.ipv4.ping_group_range=\"0 0\"\n"
            ),
            "{text}"
        );
        let coloured = colourize(&text);
        assert!(
            coloured.starts_with("gatewayd 0.1.0 on node lab-op, classifier only (pid 42), up 1h"),
            "uptime is not a health word: {coloured:?}"
        );
        assert!(coloured.contains("\u{1b}[31mIMPOSSIBLE"), "{coloured:?}");
    }

    #[test]
    fn certificate_line_warns_near_expiry_and_names_the_crl() {
        let mut s = crate::api::tests::sample_status();
        let mut tls = crate::api::tests::full_status().tls.expect("tls");
        s.tls = Some(tls.clone());
        let text = render_status(&s);
        assert!(
            text.contains(
                "\ncertificate: vpc-gw-1 (connector), serial 4f1c, EXPIRES in 9 days \
                 (2023-11-24): renew it (gatewayctl pki renew vpc-gw-1)\n\
                 crl: /etc/gateway/pki/crl.pem, 2 revoked (number 3, issued 2023-11-03)\n"
            ),
            "{text}"
        );
        assert!(colourize(&text).contains("\u{1b}[33mEXPIRES"), "yellow");
        tls.warning = None;
        tls.expires_in_days = 300;
        tls.crl = None;
        s.tls = Some(tls.clone());
        let text = render_status(&s);
        assert!(
            text.contains(
                "\ncertificate: vpc-gw-1 (connector), serial 4f1c, valid until 2023-11-24, \
                 300 days left\n\n"
            ),
            "{text}"
        );
        tls.expires_in_days = -1;
        s.tls = Some(tls.clone());
        assert!(render_status(&s).contains("EXPIRED on 2023-11-24"));
        tls.warning = Some("REVOKED by the CRL in force: peers refuse it".into());
        s.tls = Some(tls);
        let text = render_status(&s);
        assert!(
            text.contains("serial 4f1c, REVOKED by the CRL in force: peers refuse it; issue"),
            "{text}"
        );
        assert!(colourize(&text).contains("\u{1b}[31mREVOKED"), "red");
    }

    #[test]
    fn durations_read_like_a_person_says_them() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(65), "1m 5s");
        assert_eq!(human_duration(3725), "1h 2m 5s");
        assert_eq!(human_duration(90_061), "1d 1h 1m");
    }

    #[test]
    fn status_renders_as_aligned_tables() {
        let s = Status {
            schema: STATUS_SCHEMA,
            version: "0.1.0".into(),
            node: "lab-op".into(),
            pid: 42,
            config: "/etc/gateway/gateway.toml".into(),
            started_at: 0,
            uptime_secs: 65,
            interfaces: vec![
                InterfaceStatus {
                    name: "lan0".into(),
                    classifier_attached: true,
                    programs: vec![ProgramInfo {
                        id: 17,
                        name: "gw_classify".into(),
                        ours: true,
                        mode: Some(AttachKind::Tcx),
                    }],
                    attach: Some(AttachKind::Tcx),
                    error: None,
                },
                InterfaceStatus {
                    name: "eth1".into(),
                    classifier_attached: false,
                    programs: vec![],
                    attach: Some(AttachKind::Tcx),
                    error: None,
                },
                InterfaceStatus {
                    name: "eth2".into(),
                    classifier_attached: true,
                    programs: vec![
                        ProgramInfo {
                            id: 9,
                            name: "other".into(),
                            ours: false,
                            mode: Some(AttachKind::Tcx),
                        },
                        ProgramInfo {
                            id: 17,
                            name: "gw_classify".into(),
                            ours: true,
                            mode: Some(AttachKind::Tc),
                        },
                    ],
                    attach: Some(AttachKind::Tc),
                    error: None,
                },
            ],
            routes: vec![
                RouteStatus {
                    id: 0,
                    name: "10.128.0.0/16".into(),
                    cidr: "10.128.0.0/16".into(),
                    packets: 5,
                    bytes: 420,
                },
                RouteStatus {
                    id: 1,
                    name: "vpc-v6".into(),
                    cidr: "fd00:128::/64".into(),
                    packets: 12,
                    bytes: 1248,
                },
            ],
            classifier: BTreeMap::from([("matched".into(), 17), ("unmatched".into(), 3)]),
            tunnel: None,
            dns_egress: vec![],
            icmp: None,
            tls: None,
            last_reload: Some(crate::api::ReloadStatus {
                at: 5,
                ok: false,
                message: "tunnel.tun changed; that takes a restart".into(),
            }),
        };
        let expected = "\
gatewayd 0.1.0 on node lab-op, classifier only (pid 42), up 1m 5s
config: /etc/gateway/gateway.toml
last reload: 1m 0s ago, REFUSED (running the previous config): tunnel.tun changed; that takes a restart

INTERFACE  CLASSIFIER                INGRESS PROGRAMS
lan0       attached via tcx          gw_classify (id 17) via tcx
eth1       NOT ATTACHED (tcx)        -
eth2       attached via tc (clsact)  other (id 9, not ours) via tcx, gw_classify (id 17) via tc (clsact)

ROUTE          CIDR           PACKETS  BYTES
10.128.0.0/16  10.128.0.0/16        5    420
vpc-v6         fd00:128::/64       12   1248

classifier packets: matched 17, unmatched 3
";
        assert_eq!(render_status(&s), expected);
    }
}
