//! Checks across keys of a config that parses: values each fine alone that together make a
//! node that misroutes, exposes or cannot start (a default route offered to clients, an overlay
//! inside a route, the TUN named after the uplink, a resolver the forwarder cannot ask).
//!
//! [`review`] runs after `config::validate` has built a [`Config`], so a file with basic
//! mistakes gets these only once those are fixed. Errors refuse the config like any other;
//! warnings leave it valid and are printed by `gatewayctl check-config` and logged by
//! `gatewayd` at start. What depends on the machine (files, interfaces in this network
//! namespace) is `preflight`'s.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use gateway_common::{MAX_DNS_LABELS, MAX_DNS_ZONES, MAX_REDIRECTS};
use ipnet::IpNet;

use crate::config::{Config, ConfigIssue, Role, Tunnel};

/// Resolvers per zone the failover state machine tracks (`core::resolver`: a 64-bit "tried"
/// mask); any beyond would never be asked.
pub const MAX_ZONE_SERVERS: usize = 64;

/// What [`review`] found: errors refuse the config, warnings do not.
#[derive(Debug, Default)]
pub struct Review {
    pub errors: Vec<ConfigIssue>,
    pub warnings: Vec<ConfigIssue>,
}

impl Review {
    fn error(&mut self, c: &Config, key: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(issue(c, key, reason));
    }

    fn warn(&mut self, c: &Config, key: impl Into<String>, reason: impl Into<String>) {
        self.warnings.push(issue(c, key, reason));
    }
}

fn issue(c: &Config, key: impl Into<String>, reason: impl Into<String>) -> ConfigIssue {
    ConfigIssue {
        file: c.path.clone(),
        key: key.into(),
        reason: reason.into(),
    }
}

/// Address ranges that never belong in a route through the tunnel: the kernel handles them
/// locally or on the link, and the engine drops multicast.
const SPECIAL: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (0.0.0.0/8)"),
    ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
    ("169.254.0.0/16", "link-local (169.254.0.0/16)"),
    ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
    ("255.255.255.255/32", "broadcast (255.255.255.255)"),
    ("::/128", "the unspecified address (::)"),
    ("::1/128", "loopback (::1)"),
    ("::ffff:0.0.0.0/96", "IPv4-mapped addresses (::ffff:0:0/96)"),
    ("fe80::/10", "link-local (fe80::/10)"),
    ("ff00::/8", "multicast (ff00::/8)"),
];

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why `net` cannot go through the tunnel, if it cannot.
fn unroutable(net: &IpNet) -> Option<String> {
    if net.prefix_len() == 0 {
        return Some(format!(
            "{net} is a default route: clients would send everything, the tunnel's own packets \
             included, into the tunnel; list the VPC's prefixes instead"
        ));
    }
    SPECIAL.iter().find_map(|(range, what)| {
        let range: IpNet = range.parse().ok()?;
        overlaps(net, &range).then(|| format!("{net} covers {what}, which no tunnel carries"))
    })
}

/// Checks of a config that validated key by key. `metrics_allow_remote` is
/// `[metrics] allow_remote`, which silences the warning about a non-local endpoint.
pub fn review(c: &Config, metrics_allow_remote: bool) -> Review {
    let mut r = Review::default();
    if let Some(t) = &c.tunnel {
        if let Role::Connector {
            listen: Some(listen),
            ..
        } = &t.role
        {
            connector(c, t, *listen, &mut r);
        }
        tunnel_device(c, t, &mut r);
        client(c, t, &mut r);
        zones(c, t, &mut r);
        for (key, path) in tls_paths(t) {
            if !path.is_absolute() {
                r.warn(
                    c,
                    key,
                    format!(
                        "{} is relative: it is read from the daemon's working directory \
                         (/ under systemd), not from the config's",
                        path.display()
                    ),
                );
            }
        }
    }
    if let Some(m) = c.metrics {
        metrics(c, m, metrics_allow_remote, &mut r);
    }
    r
}

fn tls_paths(t: &Tunnel) -> [(&'static str, &Path); 3] {
    [
        ("tls.ca", &t.tls.ca),
        ("tls.cert", &t.tls.cert),
        ("tls.key", &t.tls.key),
    ]
}

/// The TCP port the connector's fallback listens on, if it listens on TCP.
fn tcp_port(t: &Tunnel, listen: SocketAddr) -> Option<u16> {
    t.transport
        .uses_tcp()
        .then(|| t.fallback_port.unwrap_or(listen.port()))
}

fn connector(c: &Config, t: &Tunnel, listen: SocketAddr, r: &mut Review) {
    // Routes refused for themselves are not checked against the rest: one error each.
    let mut routes = Vec::new();
    for route in c.routes.iter() {
        match unroutable(&route.cidr) {
            Some(why) => r.error(c, format!("route[{}].cidr", route.id), why),
            None => routes.push(route),
        }
    }
    for route in &routes {
        if !listen.ip().is_unspecified() && route.cidr.contains(&listen.ip()) {
            r.error(
                c,
                "tunnel.listen",
                format!(
                    "{} is inside route[{}] {}: clients would send the tunnel's own packets \
                     into the tunnel",
                    listen.ip(),
                    route.id,
                    route.cidr
                ),
            );
        }
    }
    for (key, overlay) in [
        ("tunnel.overlay", IpNet::V4(t.overlay_v4)),
        ("tunnel.overlay_v6", IpNet::V6(t.overlay_v6)),
    ] {
        if let Some(route) = routes.iter().find(|rt| overlaps(&rt.cidr, &overlay)) {
            r.error(
                c,
                key,
                format!(
                    "{overlay} overlaps route[{}] {}: client addresses would be offered as a \
                     route into the VPC; pick an overlay outside every route",
                    route.id, route.cidr
                ),
            );
        }
        if let Some((_, what)) = SPECIAL.iter().find(|(range, _)| {
            range
                .parse::<IpNet>()
                .is_ok_and(|range| overlaps(&overlay, &range))
        }) {
            r.error(
                c,
                key,
                format!("{overlay} overlaps {what}: client addresses must be routable"),
            );
        }
    }
    if let Some(e) = &t.egress {
        let (lo, hi) = e.ports;
        let udp = t.transport.uses_quic().then_some(listen.port());
        for (what, port) in [("UDP", udp), ("TCP", tcp_port(t, listen))] {
            if let Some(port) = port.filter(|p| (lo..=hi).contains(p)) {
                r.error(
                    c,
                    "egress.port_range",
                    format!(
                        "{lo}-{hi} holds the tunnel's {what} port {port}: the range is for NAT \
                         and the DNS forwarder, whose sockets would collide with the tunnel's"
                    ),
                );
            }
        }
        if e.interface == "lo" {
            r.error(
                c,
                "egress.interface",
                "\"lo\" is loopback; name the interface that faces the VPC",
            );
        }
    }
    if let (Some(m), Some(port)) = (c.metrics, tcp_port(t, listen))
        && m.port() == port
        && (m.ip() == listen.ip() || m.ip().is_unspecified() || listen.ip().is_unspecified())
    {
        r.error(
            c,
            "metrics.listen",
            format!("{m} takes the tunnel's TCP port {port}"),
        );
    }
    if let (Some(m), Some(e)) = (c.metrics, &t.egress)
        && (e.ports.0..=e.ports.1).contains(&m.port())
    {
        r.error(
            c,
            "metrics.listen",
            format!(
                "port {} is inside egress.port_range {}-{}, which is for NAT and the DNS \
                 forwarder",
                m.port(),
                e.ports.0,
                e.ports.1
            ),
        );
    }
}

/// The TUN is created by the daemon: it must not be an interface the config gives another job.
fn tunnel_device(c: &Config, t: &Tunnel, r: &mut Review) {
    let tun = t.tun.as_str();
    if tun == "lo" {
        r.error(
            c,
            "tunnel.tun",
            "\"lo\" is loopback; the daemon creates its own TUN device: pick a new name",
        );
    }
    let mut others: Vec<(String, &str)> = Vec::new();
    if let Some(e) = &t.egress {
        others.push(("egress.interface".into(), &e.interface));
    }
    for (section, names) in [
        ("dataplane.interfaces", &c.interfaces),
        ("client.lan", &t.lan),
        ("client.dns_intercept", &t.dns_intercept),
    ] {
        others.extend(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("{section}[{i}]"), n.as_str())),
        );
    }
    if let Some((key, _)) = others.iter().find(|(_, n)| *n == tun) {
        r.error(
            c,
            "tunnel.tun",
            format!(
                "{tun:?} is also {key}; the daemon creates the TUN itself: pick a name no \
                 other interface has"
            ),
        );
    }
}

fn client(c: &Config, t: &Tunnel, r: &mut Review) {
    for (i, net) in t.advertise.iter().enumerate() {
        if let Some(why) = unroutable(net) {
            r.error(c, format!("client.advertise[{i}]"), why);
        } else if let Some(j) = t.advertise[..i].iter().position(|p| p == net) {
            r.error(
                c,
                format!("client.advertise[{i}]"),
                format!("{net} is already client.advertise[{j}]"),
            );
        }
    }
    for (section, names) in [
        ("client.lan", &t.lan),
        ("client.dns_intercept", &t.dns_intercept),
    ] {
        for (i, name) in names.iter().enumerate() {
            if let Some(j) = names[..i].iter().position(|n| n == name) {
                r.error(
                    c,
                    format!("{section}[{i}]"),
                    format!("interface {name:?} is already {section}[{j}]"),
                );
            }
        }
    }
    let steered = t.lan.len() + t.dns_intercept.len();
    if steered > MAX_REDIRECTS as usize {
        r.error(
            c,
            "client",
            format!(
                "{steered} interfaces in client.lan and client.dns_intercept; the eBPF redirect \
                 map holds {MAX_REDIRECTS}"
            ),
        );
    }
}

/// A zone name as resolvers and the eBPF steering see it: ASCII letters, digits, '-' and '_'
/// (punycode for anything else), no label starting or ending with '-'.
fn check_domain(domain: &str) -> Result<(), String> {
    for label in domain.split('.') {
        if let Some(ch) = label
            .chars()
            .find(|ch| !(ch.is_ascii_alphanumeric() || *ch == '-' || *ch == '_'))
        {
            let hint = if ch.is_ascii() {
                ""
            } else {
                " (write internationalised names in their xn-- form)"
            };
            return Err(format!(
                "{domain:?} is not a DNS name: {ch:?} in label {label:?}; use letters, digits, \
                 '-' and '_'{hint}"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "{domain:?} is not a DNS name: label {label:?} starts or ends with '-'"
            ));
        }
    }
    Ok(())
}

fn zones(c: &Config, t: &Tunnel, r: &mut Review) {
    if t.zones.len() > MAX_DNS_ZONES as usize {
        r.error(
            c,
            "dns.zone",
            format!(
                "{} zones; the eBPF zone map holds {MAX_DNS_ZONES}",
                t.zones.len()
            ),
        );
    }
    for (i, z) in t.zones.iter().enumerate() {
        if let Err(why) = check_domain(&z.domain) {
            r.error(c, format!("dns.zone[{i}].domain"), why);
        }
        let labels = z.domain.split('.').count();
        if labels >= MAX_DNS_LABELS {
            r.warn(
                c,
                format!("dns.zone[{i}].domain"),
                format!(
                    "{labels} labels: names under it have more than {MAX_DNS_LABELS}, which the \
                     eBPF steering does not read; only a client's dns_stub answers them"
                ),
            );
        }
        if z.servers.len() > MAX_ZONE_SERVERS {
            r.error(
                c,
                format!("dns.zone[{i}].servers"),
                format!(
                    "{} resolvers; the failover logic asks at most {MAX_ZONE_SERVERS}",
                    z.servers.len()
                ),
            );
        }
        for (j, ip) in z.servers.iter().enumerate() {
            let key = format!("dns.zone[{i}].servers[{j}]");
            if let Some(k) = z.servers[..j].iter().position(|p| p == ip) {
                r.error(c, key, format!("{ip} is already servers[{k}]"));
                continue;
            }
            match ip {
                IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => {
                    r.error(c, key, format!("{ip} is not a unicast address"))
                }
                IpAddr::V4(v4) if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() => {
                    r.error(c, key, format!("{ip} is not a unicast address"))
                }
                IpAddr::V4(v4) if t.overlay_v4.contains(v4) => r.error(
                    c,
                    key,
                    format!(
                        "{ip} is inside tunnel.overlay {}, the clients' addresses",
                        t.overlay_v4
                    ),
                ),
                IpAddr::V6(v6) if t.overlay_v6.contains(v6) => r.error(
                    c,
                    key,
                    format!(
                        "{ip} is inside tunnel.overlay_v6 {}, the clients' addresses",
                        t.overlay_v6
                    ),
                ),
                IpAddr::V4(_) | IpAddr::V6(_) => {}
            }
        }
    }
}

fn metrics(c: &Config, m: SocketAddr, allow_remote: bool, r: &mut Review) {
    let ip = m.ip().to_canonical();
    if ip.is_loopback() || allow_remote {
        return;
    }
    let where_ = if ip.is_unspecified() {
        "listens on every address".to_string()
    } else {
        format!("{ip} is not a loopback address")
    };
    r.warn(
        c,
        "metrics.listen",
        format!(
            "{where_}: whoever reaches port {} reads peer identities, addresses and counters \
             without authentication; use 127.0.0.1:{}, or set metrics.allow_remote = true if a \
             firewall limits who reaches it",
            m.port(),
            m.port()
        ),
    );
}

#[cfg(test)]
mod tests;
