//! The tunnel's part of `gatewayctl status`: this node's certificate and CRL, then the
//! tunnel with its peers, refusals, drops and DNS zones; apart because it is as long as the
//! rest of the status put together.

use std::fmt::Write;

use super::{esc, human_duration, table};

/// This node's certificate (with a warning near expiry) and the CRL in force.
pub(super) fn render_tls(out: &mut String, t: &crate::api::TlsStatus) {
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

pub(super) fn render_tunnel(out: &mut String, t: &crate::api::TunnelStatus, now: u64) {
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
                    if p.version.is_empty() {
                        "-".into()
                    } else {
                        esc(&p.version)
                    },
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
                "VERSION",
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
                false, false, false, false, false, true, true, true, true, true, true,
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
    if let Some(r) = &t.resolved {
        render_resolved(out, r);
    }
}

/// One line for `[client] dns`: what systemd-resolved sends where, or why it does not.
pub(super) fn render_resolved(out: &mut String, r: &crate::api::ResolvedStatus) {
    let stub = r.stub.as_deref().unwrap_or("-");
    let line = match (&r.error, r.on, r.domains.is_empty()) {
        (_, false, _) => format!("not used ({})", esc(&r.reason)),
        (Some(e), true, _) => format!("NOT SET: {} (stub {stub}; {})", esc(e), esc(&r.reason)),
        (None, true, true) => format!("no zones set yet (stub {stub}; {})", esc(&r.reason)),
        (None, true, false) => {
            let domains: Vec<String> = r.domains.iter().map(|d| format!("~{}", esc(d))).collect();
            format!("{} to {stub} ({})", domains.join(" "), esc(&r.reason))
        }
    };
    let _ = writeln!(out, "systemd-resolved: {line}");
    if !r.skipped.is_empty() {
        let skipped: Vec<String> = r.skipped.iter().map(|s| esc(s)).collect();
        let _ = writeln!(
            out,
            "systemd-resolved: zones not set: {}",
            skipped.join(", ")
        );
    }
}
