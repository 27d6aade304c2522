//! What a SIGHUP may apply to a running daemon: the difference between the config it runs
//! and the one just read, refused whole when any of it needs a restart.

use super::Config;

/// What a reload (SIGHUP) applies to a running daemon without dropping its tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadChanges {
    pub routes: bool,
    pub policy: bool,
    pub zones: bool,
    /// `[tls] crl` names another file (or none). The file itself is read again on every reload.
    pub crl: bool,
}

impl ReloadChanges {
    pub fn any(self) -> bool {
        self.routes || self.policy || self.zones || self.crl
    }
}

/// Compares the running config with a newly read one. Routes, `[[policy]]`, `[[dns.zone]]`
/// and `[tls] crl` apply live; anything else (addresses, ports, certificates, interfaces, ...) needs a
/// restart, and then the whole reload is refused, naming those keys, so the daemon never runs
/// half of each.
pub fn reload_changes(old: &Config, new: &Config) -> Result<ReloadChanges, Vec<&'static str>> {
    let mut fixed = Vec::new();
    let mut differs = |key: &'static str, changed: bool| {
        if changed {
            fixed.push(key);
        }
    };
    differs("node", old.node != new.node);
    differs("dataplane.interfaces", old.interfaces != new.interfaces);
    differs("dataplane.attach", old.attach != new.attach);
    differs("metrics.listen", old.metrics != new.metrics);
    differs(
        "icmp.manage_ping_group_range",
        old.manage_ping_group_range != new.manage_ping_group_range,
    );
    match (&old.tunnel, &new.tunnel) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            differs("tunnel.listen/connect", a.role != b.role);
            differs("tunnel.tun", a.tun != b.tun);
            differs(
                "tunnel.overlay",
                a.overlay_v4 != b.overlay_v4 || a.overlay_v6 != b.overlay_v6,
            );
            differs(
                "tls",
                (&a.tls.ca, &a.tls.cert, &a.tls.key) != (&b.tls.ca, &b.tls.cert, &b.tls.key),
            );
            differs("client.lan", a.lan != b.lan);
            differs("client.advertise", a.advertise != b.advertise);
            differs("client.table", a.client_table != b.client_table);
            differs("egress", a.egress != b.egress);
            differs("client.dns_stub", a.dns_stub != b.dns_stub);
            differs("client.dns_intercept", a.dns_intercept != b.dns_intercept);
            differs("client.dns", a.dns != b.dns);
            differs("tunnel.transport", a.transport != b.transport);
            differs("tunnel.fallback_port", a.fallback_port != b.fallback_port);
            differs("tunnel.quic_timeout_ms", a.quic_timeout != b.quic_timeout);
            differs("tunnel.relay", a.relay != b.relay);
        }
        _ => differs("tunnel", true),
    }
    if !fixed.is_empty() {
        return Err(fixed);
    }
    let (policy, zones, crl) = match (&old.tunnel, &new.tunnel) {
        (Some(a), Some(b)) => (
            a.policy != b.policy,
            a.zones != b.zones,
            a.tls.crl != b.tls.crl,
        ),
        _ => (false, false, false),
    };
    Ok(ReloadChanges {
        routes: old.routes != new.routes,
        policy,
        zones,
        crl,
    })
}
