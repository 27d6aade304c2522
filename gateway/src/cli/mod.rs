//! Operator-facing text. Rendering returns a `String` so it can be checked against expected
//! text in tests, without a daemon.

use std::fmt::Write;

use crate::api::{InterfaceStatus, Status};
use crate::core::text;

mod hub;
mod tunnel;

use tunnel::{render_tls, render_tunnel};

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
        hub::render_hub(&mut out, t, s.started_at + s.uptime_secs);
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

#[cfg(test)]
mod tests;
