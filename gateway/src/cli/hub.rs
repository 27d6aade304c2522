//! The hub's part of `gatewayctl status`: the connectors linked to it (by group) and the client
//! sessions it relays; and, on a client, the hub its session goes through.

use std::fmt::Write;

use super::{esc, human_duration, table};
use crate::api::{HubStatus, TunnelStatus};

pub(super) fn render_hub(out: &mut String, t: &TunnelStatus, now: u64) {
    if let Some(via) = &t.via_hub {
        let _ = writeln!(out, "through hub: {}", esc(via));
    }
    let Some(h) = &t.hub else {
        return;
    };
    render_tables(out, h, now);
}

fn render_tables(out: &mut String, h: &HubStatus, now: u64) {
    if h.connectors.is_empty() {
        out.push_str("connectors: none\n");
    } else {
        let rows: Vec<Vec<String>> = h
            .connectors
            .iter()
            .map(|c| {
                vec![
                    esc(&c.identity),
                    esc(&c.group),
                    transport(&c.transport, c.relayed),
                    esc(&c.remote),
                    human_duration(now.saturating_sub(c.since)),
                    c.sessions.to_string(),
                    esc(&c.routes.join(", ")),
                ]
            })
            .collect();
        table(
            out,
            &[
                "CONNECTOR",
                "GROUP",
                "TRANSPORT",
                "REMOTE",
                "SINCE",
                "SESSIONS",
                "ROUTES",
            ],
            &rows,
            &[false, false, false, false, true, true, false],
        );
    }
    if h.clients.is_empty() {
        out.push_str("clients: none\n");
    } else {
        let rows: Vec<Vec<String>> = h
            .clients
            .iter()
            .map(|c| {
                vec![
                    esc(&c.identity),
                    esc(&c.connector),
                    transport(&c.transport, c.relayed),
                    esc(&c.remote),
                    human_duration(now.saturating_sub(c.since)),
                    c.bytes_relayed.to_string(),
                ]
            })
            .collect();
        table(
            out,
            &[
                "CLIENT",
                "CONNECTOR",
                "TRANSPORT",
                "REMOTE",
                "SINCE",
                "BYTES RELAYED",
            ],
            &rows,
            &[false, false, false, false, true, true],
        );
    }
}

/// The outer link's transport, and whether packets travel beside it.
fn transport(t: &str, relayed: bool) -> String {
    if relayed {
        format!("{} (relayed)", esc(t))
    } else {
        esc(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HubClientStatus, HubConnectorStatus};

    #[test]
    fn a_hub_lists_its_connectors_and_relayed_clients() {
        let h = HubStatus {
            connectors: vec![HubConnectorStatus {
                identity: "gw-a".into(),
                group: "vpc".into(),
                routes: vec!["10.128.0.0/16".into()],
                remote: "203.0.113.10:7844".into(),
                transport: "quic".into(),
                since: 1000,
                sessions: 1,
                relayed: true,
            }],
            clients: vec![HubClientStatus {
                identity: "ops-\u{1b}alice".into(),
                connector: "gw-a".into(),
                remote: "198.51.100.10:7844".into(),
                transport: "tcp".into(),
                since: 1060,
                bytes_relayed: 4096,
                relayed: false,
            }],
        };
        let mut out = String::new();
        render_tables(&mut out, &h, 1120);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("CONNECTOR"), "{out}");
        assert!(
            lines[1].contains("gw-a")
                && lines[1].contains("vpc")
                && lines[1].contains("quic (relayed)")
                && lines[1].contains("10.128.0.0/16"),
            "{out}"
        );
        assert!(lines[2].starts_with("CLIENT"), "{out}");
        assert!(
            lines[3].contains("4096") && lines[3].contains("tcp") && !lines[3].contains("relayed"),
            "{out}"
        );
        assert!(!out.contains('\u{1b}'), "peer text is escaped: {out:?}");
    }
}
