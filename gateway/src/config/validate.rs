//! Validation of the sections every node has (`[node]`, `[dataplane]`, `[[route]]`,
//! `[icmp]`, `[metrics]`), collecting every problem, then the tunnel's sections and the checks
//! across keys.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gateway_common::MAX_ROUTES;

use super::names::{check_interface_name, check_node_name};
use super::raw::RawConfig;
use super::{Config, ConfigError, ConfigIssue, DEFAULT_SOCKET, DEFAULT_STATE_DIR, Node};
use crate::core::cidr::parse_cidr;
use crate::routes::{Route, RouteTable};

pub(super) fn validate(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let mut issues = Vec::new();
    let mut push = |key: String, reason: String| {
        issues.push(ConfigIssue {
            file: path.to_owned(),
            key,
            reason,
        })
    };

    if let Err(reason) = check_node_name(&raw.node.name) {
        push("node.name".into(), reason);
    }
    let socket = raw
        .node
        .socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if !socket.is_absolute() {
        push(
            "node.socket".into(),
            format!(
                "must be an absolute path, got {:?}",
                socket.display().to_string()
            ),
        );
    }
    let state_dir = raw
        .node
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    if !state_dir.is_absolute() {
        push(
            "node.state_dir".into(),
            format!(
                "must be an absolute path, got {:?}",
                state_dir.display().to_string()
            ),
        );
    }

    let mut seen_ifaces = BTreeSet::new();
    for (i, name) in raw.dataplane.interfaces.iter().enumerate() {
        let key = format!("dataplane.interfaces[{i}]");
        if let Err(reason) = check_interface_name(name) {
            push(key, reason);
        } else if !seen_ifaces.insert(name.as_str()) {
            push(key, format!("interface {name:?} is listed twice"));
        }
    }

    let attach = match raw.dataplane.attach.as_deref().map(str::parse) {
        None => crate::dataplane::AttachMode::Auto,
        Some(Ok(mode)) => mode,
        Some(Err(reason)) => {
            push("dataplane.attach".into(), reason);
            crate::dataplane::AttachMode::Auto
        }
    };

    let mut routes = Vec::new();
    if raw.route.len() > MAX_ROUTES as usize {
        push(
            "route".into(),
            format!(
                "{} routes configured; the classifier holds at most {MAX_ROUTES}",
                raw.route.len()
            ),
        );
    }
    for (i, r) in raw.route.iter().enumerate() {
        let key = format!("route[{i}].cidr");
        match parse_cidr(&r.cidr) {
            Err(reason) => push(key, reason),
            Ok(cidr) => {
                if let Some(prev) = routes.iter().position(|p: &Route| p.cidr == cidr) {
                    push(
                        key,
                        format!("{cidr} is already configured as route[{prev}]"),
                    );
                    continue;
                }
                let name = match &r.name {
                    Some(n) if n.trim().is_empty() => {
                        push(format!("route[{i}].name"), "must not be empty".into());
                        continue;
                    }
                    Some(n) => n.clone(),
                    None => cidr.to_string(),
                };
                routes.push(Route {
                    // Bounded by the MAX_ROUTES check above; ids index the counter array.
                    id: u32::try_from(routes.len()).unwrap_or(u32::MAX),
                    cidr,
                    name,
                });
            }
        }
    }

    let manage_ping_group_range = raw.icmp.as_ref().is_some_and(|i| i.manage_ping_group_range);
    let metrics = match &raw.metrics {
        None => None,
        Some(m) => match m.listen.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                push(
                    "metrics.listen".into(),
                    "port 0 is not a port to scrape".into(),
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                push(
                    "metrics.listen".into(),
                    format!(
                        "{:?} is not ADDRESS:PORT, e.g. 127.0.0.1:9469 (keep it local)",
                        m.listen
                    ),
                );
                None
            }
        },
    };
    let log_level = raw.node.log_level.clone().unwrap_or_else(|| "info".into());
    if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
        push(
            "node.log_level".into(),
            format!("{log_level:?} is not one of error, warn, info, debug, trace"),
        );
    }
    let node_name = raw.node.name.clone();
    let metrics_allow_remote = raw.metrics.as_ref().is_some_and(|m| m.allow_remote);
    let tunnel = super::tunnel::validate_tunnel(
        &node_name,
        raw.egress,
        raw.dns,
        raw.tunnel,
        raw.tls,
        raw.client,
        raw.policy,
        &mut |k, r| push(k, r),
    );

    if !issues.is_empty() {
        return Err(ConfigError(issues));
    }
    let mut config = Config {
        manage_ping_group_range,
        metrics,
        tunnel,
        path: path.to_owned(),
        node: Node {
            name: raw.node.name,
            socket,
            state_dir,
            log_level,
        },
        interfaces: raw.dataplane.interfaces,
        attach,
        routes: RouteTable::new(routes),
        warnings: Vec::new(),
    };
    let review = super::checks::review(&config, metrics_allow_remote);
    if !review.errors.is_empty() {
        return Err(ConfigError(review.errors));
    }
    config.warnings = review.warnings;
    Ok(config)
}
