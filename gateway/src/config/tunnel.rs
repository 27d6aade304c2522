//! Validation of a tunnel node's sections: `[tunnel]`, `[tls]`, `[client]`, `[[policy]]`,
//! `[egress]` and `[[dns.zone]]`, each mistake named by its key; what a connector may not set
//! on a client and the other way round.

use std::net::SocketAddr;

use ipnet::IpNet;

use super::names::{check_interface_name, check_table_name, default_table};
use super::raw::{RawClient, RawDns, RawEgress, RawPolicy, RawTls, RawTunnel};
use super::{
    DEFAULT_QUIC_TIMEOUT_MS, Egress, HostDns, PolicyEntry, Role, TlsPaths, Transport, Tunnel, Zone,
};
use crate::core::cidr::{parse_cidr, parse_port_range};
use crate::core::policy::Rule;

/// Default overlay prefixes; RFC 6598 shared space and a ULA, unlikely to clash with a VPC.
pub const DEFAULT_OVERLAY_V4: &str = "100.64.0.0/24";
pub const DEFAULT_OVERLAY_V6: &str = "fd00:64::/64";
pub const DEFAULT_TUN: &str = "gateway0";

#[allow(clippy::too_many_arguments, reason = "one argument per config section")]
pub(super) fn validate_tunnel(
    node_name: &str,
    egress: Option<RawEgress>,
    dns: Option<RawDns>,
    tunnel: Option<RawTunnel>,
    tls: Option<RawTls>,
    client: Option<RawClient>,
    policy: Vec<RawPolicy>,
    push: &mut dyn FnMut(String, String),
) -> Option<Tunnel> {
    let Some(t) = tunnel else {
        if tls.is_some() {
            push(
                "tls".into(),
                "set, but there is no [tunnel] to use it".into(),
            );
        }
        if client.is_some() {
            push("client".into(), "set, but there is no [tunnel]".into());
        }
        if !policy.is_empty() {
            push("policy".into(), "set, but there is no [tunnel]".into());
        }
        if egress.is_some() {
            push("egress".into(), "set, but there is no [tunnel]".into());
        }
        if dns.is_some() {
            push("dns".into(), "set, but there is no [tunnel]".into());
        }
        return None;
    };
    let mut ok = true;
    let mut bad = |k: &str, r: String, ok: &mut bool| {
        *ok = false;
        push(k.into(), r)
    };
    let role_name = match (t.role.as_deref(), &t.listen, &t.connect) {
        (Some(r @ ("connector" | "client" | "hub")), _, _) => Some(r),
        (Some(other), _, _) => {
            bad(
                "tunnel.role",
                format!("{other:?} is not one of \"connector\", \"client\", \"hub\""),
                &mut ok,
            );
            None
        }
        (None, Some(_), Some(_)) => {
            bad("tunnel.connect", "set together with tunnel.listen: a node either listens (connector) or connects (client); a connector that also dials hubs says role = \"connector\"".into(), &mut ok);
            None
        }
        (None, None, None) => {
            bad(
                "tunnel",
                "needs listen (connector) or connect (client)".into(),
                &mut ok,
            );
            None
        }
        (None, Some(_), None) => Some("connector"),
        (None, None, Some(_)) => Some("client"),
    };
    let listen = match &t.listen {
        None => None,
        Some(listen) => match listen.parse::<SocketAddr>() {
            Ok(l) => Some(l),
            Err(_) => {
                bad(
                    "tunnel.listen",
                    format!("{listen:?} is not ADDRESS:PORT, e.g. 0.0.0.0:7844"),
                    &mut ok,
                );
                None
            }
        },
    };
    let mut hosts = Vec::new();
    if let Some(connect) = &t.connect {
        for (i, c) in connect.iter().enumerate() {
            match c.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) =>
                {
                    hosts.push(host.trim_matches(['[', ']']).to_string())
                }
                _ => bad(
                    &format!("tunnel.connect[{i}]"),
                    format!("{c:?} is not HOST:PORT"),
                    &mut ok,
                ),
            }
        }
        if connect.is_empty() {
            bad("tunnel.connect", "is empty".into(), &mut ok);
        }
    }
    // Only what goes through hubs relays: a hub, a connector that dials hubs, a client with a
    // group.
    let through_hubs = match role_name {
        Some("hub") => true,
        Some("connector") => t.connect.is_some(),
        _ => t.group.is_some(),
    };
    if t.relay.is_some() && !through_hubs {
        bad(
            "tunnel.relay",
            "only for hubs, connectors that dial hubs (connect) and clients through hubs (group)"
                .into(),
            &mut ok,
        );
    }
    if let Some(g) = &t.group
        && !crate::core::text::is_clean(g, 64)
    {
        bad(
            "tunnel.group",
            format!(
                "{:?} is not a plain name of at most 64 characters",
                crate::core::text::clean(g, 64)
            ),
            &mut ok,
        );
    }
    let role = match role_name {
        Some("hub") => {
            if t.connect.is_some() {
                bad("tunnel.connect", "a hub only listens".into(), &mut ok);
            }
            if t.group.is_some() {
                bad(
                    "tunnel.group",
                    "a hub serves every group its connectors announce".into(),
                    &mut ok,
                );
            }
            if t.listen.is_none() {
                bad("tunnel.listen", "a hub needs listen".into(), &mut ok);
            }
            listen.map(|listen| Role::Hub { listen })
        }
        Some("connector") => {
            if t.source_port.is_some() && t.connect.is_none() {
                bad(
                    "tunnel.source_port",
                    "only for clients and connectors that dial hubs (connect); a connector answers from its listen port".into(),
                    &mut ok,
                );
            }
            if t.listen.is_none() && t.connect.is_none() {
                bad(
                    "tunnel",
                    "a connector needs listen, or connect (the hubs it dials), or both".into(),
                    &mut ok,
                );
            }
            if t.listen.is_some() && listen.is_none() {
                None
            } else {
                Some(Role::Connector {
                    listen,
                    hubs: t.connect.clone().unwrap_or_default(),
                    source_port: t.source_port.unwrap_or(0),
                })
            }
        }
        Some(_) => {
            if t.listen.is_some() {
                bad("tunnel.listen", "a client does not listen".into(), &mut ok);
            }
            let connect = t.connect.clone().unwrap_or_default();
            if t.connect.is_none() {
                bad("tunnel.connect", "a client needs connect".into(), &mut ok);
            }
            // Unset, the name is the host the client dials: a DNS name the connector's
            // certificate carries (`pki issue --dns`), or an address it carries (`--ip`).
            // Through hubs, the connector's name is the group's unless said otherwise.
            let server_name = match (&t.server_name, &t.group, hosts.first()) {
                (Some(n), _, _) => Some(n.clone()),
                (None, Some(g), _) => Some(g.clone()),
                (None, None, Some(h)) => Some(h.clone()),
                (None, None, None) => None,
            };
            if let Some(n) = &t.server_name
                && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
            {
                bad(
                    "tunnel.server_name",
                    format!("{n:?} is neither a DNS name nor an IP address"),
                    &mut ok,
                );
            }
            server_name.map(|server_name| Role::Client {
                connect,
                server_name,
                source_port: t.source_port.unwrap_or(0),
            })
        }
        None => None,
    };
    let transport = match t.transport.as_deref() {
        None | Some("auto") => Transport::Auto,
        Some("quic") => Transport::Quic,
        Some("tcp") => Transport::Tcp,
        Some(other) => {
            bad(
                "tunnel.transport",
                format!("{other:?} is not one of \"auto\", \"quic\", \"tcp\""),
                &mut ok,
            );
            Transport::Auto
        }
    };
    if t.fallback_port == Some(0) {
        bad(
            "tunnel.fallback_port",
            "0 is not a port; leave it out to use the tunnel's port".into(),
            &mut ok,
        );
    }
    if t.fallback_port.is_some() && transport == Transport::Quic {
        bad(
            "tunnel.fallback_port",
            "set, but transport = \"quic\" never uses TCP".into(),
            &mut ok,
        );
    }
    let quic_timeout_ms = t.quic_timeout_ms.unwrap_or(DEFAULT_QUIC_TIMEOUT_MS);
    if !(100..=30_000).contains(&quic_timeout_ms) {
        bad(
            "tunnel.quic_timeout_ms",
            format!("{quic_timeout_ms} is outside 100-30000"),
            &mut ok,
        );
    }
    let tun = t.tun.unwrap_or_else(|| DEFAULT_TUN.into());
    if let Err(r) = check_interface_name(&tun) {
        bad("tunnel.tun", r, &mut ok);
    }
    let overlay_v4 = match parse_cidr(t.overlay.as_deref().unwrap_or(DEFAULT_OVERLAY_V4)) {
        Ok(IpNet::V4(n)) if n.prefix_len() <= 30 => Some(n),
        Ok(_) => {
            bad(
                "tunnel.overlay",
                "must be an IPv4 prefix of /30 or shorter".into(),
                &mut ok,
            );
            None
        }
        Err(r) => {
            bad("tunnel.overlay", r, &mut ok);
            None
        }
    };
    let overlay_v6 = match parse_cidr(t.overlay_v6.as_deref().unwrap_or(DEFAULT_OVERLAY_V6)) {
        Ok(IpNet::V6(n)) if n.prefix_len() <= 120 => Some(n),
        Ok(_) => {
            bad(
                "tunnel.overlay_v6",
                "must be an IPv6 prefix of /120 or shorter".into(),
                &mut ok,
            );
            None
        }
        Err(r) => {
            bad("tunnel.overlay_v6", r, &mut ok);
            None
        }
    };
    let Some(tls) = tls else {
        bad(
            "tls",
            "the tunnel needs [tls] ca, cert and key".into(),
            &mut ok,
        );
        return None;
    };
    if role_name == Some("hub") && client.is_some() {
        bad("client", "a hub is no client".into(), &mut ok);
    }
    let client = client.unwrap_or_default();
    let is_connector = role_name == Some("connector");
    if is_connector && (!client.lan.is_empty() || !client.advertise.is_empty()) {
        bad(
            "client",
            "only for clients (this node listens: it is a connector)".into(),
            &mut ok,
        );
    }
    for (i, name) in client.lan.iter().enumerate() {
        if let Err(r) = check_interface_name(name) {
            bad(&format!("client.lan[{i}]"), r, &mut ok);
        }
    }
    let mut advertise = Vec::new();
    for (i, c) in client.advertise.iter().enumerate() {
        match parse_cidr(c) {
            Ok(n) => advertise.push(n),
            Err(r) => bad(&format!("client.advertise[{i}]"), r, &mut ok),
        }
    }
    // A client that forwards (a site gateway) owns a table that keeps forwarding to LAN <-> TUN.
    let client_table = if client.lan.is_empty() && client.advertise.is_empty() {
        if client.table.is_some() {
            bad(
                "client.table",
                "only for a site gateway (client.lan or client.advertise set)".into(),
                &mut ok,
            );
        }
        None
    } else {
        let table = client
            .table
            .clone()
            .unwrap_or_else(|| default_table(node_name));
        if let Err(r) = check_table_name(&table) {
            bad("client.table", r, &mut ok);
        }
        Some(table)
    };
    if !is_connector && !policy.is_empty() {
        bad(
            "policy",
            "only for connectors: they decide what clients may reach".into(),
            &mut ok,
        );
    }
    let mut entries = Vec::new();
    for (i, p) in policy.into_iter().enumerate() {
        if p.identity.trim().is_empty() {
            bad(
                &format!("policy[{i}].identity"),
                "must not be empty".into(),
                &mut ok,
            );
        }
        let allow = parse_rules(&format!("policy[{i}].allow"), &p.allow, &mut bad, &mut ok);
        let mut advertise = Vec::new();
        for (j, c) in p.advertise.iter().enumerate() {
            match parse_cidr(c) {
                Ok(n) if n.prefix_len() == 0 => bad(
                    &format!("policy[{i}].advertise[{j}]"),
                    format!("{c:?} is a default route; a client is never routed everything"),
                    &mut ok,
                ),
                Ok(n) => advertise.push(n),
                Err(r) => bad(&format!("policy[{i}].advertise[{j}]"), r, &mut ok),
            }
        }
        let inbound = parse_rules(
            &format!("policy[{i}].inbound"),
            &p.inbound,
            &mut bad,
            &mut ok,
        );
        entries.push(PolicyEntry {
            identity: p.identity,
            allow,
            advertise,
            inbound,
        });
    }
    let egress = match egress {
        None => None,
        Some(_) if !is_connector => {
            bad("egress", "only for connectors".into(), &mut ok);
            None
        }
        Some(e) => {
            if let Err(r) = check_interface_name(&e.interface) {
                bad("egress.interface", r, &mut ok);
            }
            let ports = match parse_port_range(&e.port_range) {
                Ok(p) => Some(p),
                Err(r) => {
                    bad("egress.port_range", r, &mut ok);
                    None
                }
            };
            let table = e.table.unwrap_or_else(|| default_table(node_name));
            if let Err(r) = check_table_name(&table) {
                bad("egress.table", r, &mut ok);
            }
            ports.map(|ports| Egress {
                interface: e.interface,
                ports,
                table,
            })
        }
    };
    let raw_zones = dns.map(|d| d.zone).unwrap_or_default();
    if !is_connector && !raw_zones.is_empty() {
        bad(
            "dns.zone",
            "only for connectors: clients learn zones from them".into(),
            &mut ok,
        );
    }
    let mut zones: Vec<Zone> = Vec::new();
    for (i, z) in raw_zones.into_iter().enumerate() {
        let domain = z.domain.trim_end_matches('.').to_ascii_lowercase();
        if let Err(e) = crate::core::dns::wire_name(&domain) {
            bad(
                &format!("dns.zone[{i}].domain"),
                format!("{:?} is not a domain name ({})", z.domain, e.name()),
                &mut ok,
            );
        } else if domain.is_empty() {
            bad(
                &format!("dns.zone[{i}].domain"),
                "the root zone cannot be private".into(),
                &mut ok,
            );
        } else if zones.iter().any(|p| p.domain == domain) {
            bad(
                &format!("dns.zone[{i}].domain"),
                format!("{domain} is listed twice"),
                &mut ok,
            );
        }
        let mut servers = Vec::new();
        for (j, srv) in z.servers.iter().enumerate() {
            match srv.parse() {
                Ok(ip) => servers.push(ip),
                Err(_) => bad(
                    &format!("dns.zone[{i}].servers[{j}]"),
                    format!("{srv:?} is not an IP address"),
                    &mut ok,
                ),
            }
        }
        if z.servers.is_empty() {
            bad(
                &format!("dns.zone[{i}].servers"),
                "needs at least one resolver".into(),
                &mut ok,
            );
        }
        let on_servfail = match z.on_servfail.as_deref() {
            None | Some("failover") => crate::core::resolver::OnServfail::Failover,
            Some("return") => crate::core::resolver::OnServfail::Return,
            Some(other) => {
                bad(
                    &format!("dns.zone[{i}].on_servfail"),
                    format!("{other:?}: use \"failover\" (the default) or \"return\""),
                    &mut ok,
                );
                crate::core::resolver::OnServfail::Failover
            }
        };
        zones.push(Zone {
            domain,
            servers,
            on_servfail,
        });
    }
    if is_connector && !client.dns_intercept.is_empty() {
        bad("client.dns_intercept", "only for clients".into(), &mut ok);
    }
    for (i, name) in client.dns_intercept.iter().enumerate() {
        if let Err(r) = check_interface_name(name) {
            bad(&format!("client.dns_intercept[{i}]"), r, &mut ok);
        }
    }
    let dns_stub = match client.dns_stub.as_deref() {
        None => None,
        Some(_) if is_connector => {
            bad("client.dns_stub", "only for clients".into(), &mut ok);
            None
        }
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                bad(
                    "client.dns_stub",
                    format!("{s:?} is not ADDRESS:PORT, e.g. 127.0.0.53:53"),
                    &mut ok,
                );
                None
            }
        },
    };
    let dns = match client.dns.as_deref() {
        None => HostDns::Auto,
        Some(_) if is_connector => {
            bad("client.dns", "only for clients".into(), &mut ok);
            HostDns::Auto
        }
        Some("resolved") => HostDns::Resolved,
        Some("none") => HostDns::None,
        Some(other) => {
            bad(
                "client.dns",
                format!("{other:?} is not one of \"resolved\", \"none\""),
                &mut ok,
            );
            HostDns::Auto
        }
    };
    // resolved would ask itself: its own listeners are 127.0.0.53 and 127.0.0.54.
    if let Some(stub) = dns_stub
        && dns == HostDns::Resolved
        && HostDns::is_resolved_listener(stub.ip())
    {
        bad(
            "client.dns_stub",
            format!(
                "{stub} is systemd-resolved's own listener, so resolved would ask itself; leave \
                 dns_stub out (resolved is pointed at a free port on 127.0.0.1) or use another \
                 address, e.g. 127.0.0.2:53"
            ),
            &mut ok,
        );
    }
    let (Some(role), Some(overlay_v4), Some(overlay_v6), true) = (role, overlay_v4, overlay_v6, ok)
    else {
        return None;
    };
    Some(Tunnel {
        role,
        tun,
        overlay_v4,
        overlay_v6,
        tls: TlsPaths {
            ca: tls.ca,
            cert: tls.cert,
            key: tls.key,
            crl: tls.crl,
        },
        lan: client.lan,
        advertise,
        client_table,
        policy: entries,
        egress,
        zones,
        dns_stub,
        dns_intercept: client.dns_intercept,
        dns,
        transport,
        fallback_port: t.fallback_port,
        quic_timeout: std::time::Duration::from_millis(quic_timeout_ms),
        group: t.group,
        relay: t.relay.unwrap_or(true),
    })
}

/// Each rule of `key` (`policy[0].allow`, say) parsed, every one that does not parse reported
/// as `key[j]`.
fn parse_rules(
    key: &str,
    written: &[String],
    bad: &mut impl FnMut(&str, String, &mut bool),
    ok: &mut bool,
) -> Vec<Rule> {
    let mut parsed = Vec::new();
    for (j, rule) in written.iter().enumerate() {
        match Rule::parse(rule) {
            Ok(r) => parsed.push(r),
            Err(reason) => bad(&format!("{key}[{j}]"), reason, ok),
        }
    }
    parsed
}
