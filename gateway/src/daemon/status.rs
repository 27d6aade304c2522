//! What `gatewayctl status` and the metrics endpoint read: the daemon's shared state, the
//! kernel's view of each classified interface, the classifier's counters, the tunnel's status
//! and this node's certificate, gathered into one `api::Status`.

use std::path::PathBuf;

use gateway_common::Counter;

use super::{Shared, classified_interfaces};
use crate::api::{
    AttachKind, InterfaceStatus, ProgramInfo, Request, Response, RouteStatus, STATUS_SCHEMA, Status,
};
use crate::dataplane;

pub(super) fn handle(shared: &Shared, req: Request) -> Response {
    match req {
        Request::Status => match status(shared) {
            Ok(s) => Response::Status(Box::new(s)),
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        },
    }
}

pub(super) fn status(shared: &Shared) -> anyhow::Result<Status> {
    let dp = shared
        .dataplane
        .lock()
        .map_err(|_| anyhow::anyhow!("dataplane lock poisoned"))?;
    let ours = dp.program_id();
    let attach = dp.kind();
    let config = shared.config();
    let interfaces = classified_interfaces(&config)
        .iter()
        .map(|name| {
            interface_status(name, attach, dataplane::attached_programs(name), |p| {
                p.id == ours
            })
        })
        .collect();
    let table = shared
        .routes
        .lock()
        .map_err(|_| anyhow::anyhow!("routes lock poisoned"))?
        .clone();
    let mut routes = Vec::new();
    for r in table.iter() {
        let c = dp.route_counters(r.id)?;
        routes.push(RouteStatus {
            id: r.id,
            name: r.name.clone(),
            cidr: r.cidr.to_string(),
            packets: c.packets,
            bytes: c.bytes,
        });
    }
    let classifier = dp
        .counters()?
        .into_iter()
        .map(|(c, v): (Counter, u64)| (c.name().to_string(), v))
        .collect();
    Ok(Status {
        schema: STATUS_SCHEMA,
        version: env!("CARGO_PKG_VERSION").to_string(),
        node: config.node.name.clone(),
        pid: std::process::id(),
        config: absolute(&config.path),
        started_at: shared.started_at,
        uptime_secs: shared.started.elapsed().as_secs(),
        interfaces,
        routes,
        classifier,
        tunnel: shared.tunnel.as_ref().map(|t| t.status()),
        dns_egress: config
            .tunnel
            .iter()
            .flat_map(|t| t.dns_intercept.iter())
            .map(|name| {
                interface_status(
                    name,
                    attach,
                    dataplane::attached_egress_programs(name),
                    |p| p.name == gateway_common::programs::DNS_EGRESS,
                )
            })
            .collect(),
        icmp: Some(crate::pingrange::status(
            config.manage_ping_group_range,
            crate::tunnel::net::sysctl_get(crate::pingrange::SYSCTL)
                .unwrap_or_else(|e| format!("unreadable: {e}")),
        )),
        tls: shared
            .certificate
            .as_ref()
            .map(|c| tls_status(c, shared.trust.as_deref())),
        last_reload: shared.last_reload.lock().ok().and_then(|r| r.clone()),
    })
}

/// This node's certificate and the CRL in force, with the expiry counted from now.
fn tls_status(
    cert: &crate::pki::CertInfo,
    trust: Option<&crate::tunnel::tls::Trust>,
) -> crate::api::TlsStatus {
    let now = crate::sys::unix_now() as i64;
    let crl = trust.and_then(|t| t.crl());
    // Peers refuse a node whose own certificate its CRL lists: say so before anything else.
    let revoked = crl
        .as_ref()
        .is_some_and(|(_, c)| c.find(&cert.serial).is_some());
    crate::api::TlsStatus {
        identity: cert.identity.clone(),
        profile: cert.profile_name(),
        serial: cert.serial_hex(),
        not_after: cert.not_after,
        expires_in_days: (cert.not_after - now).div_euclid(86_400),
        warning: match revoked {
            true => Some("REVOKED by the CRL in force: peers refuse it".into()),
            false => crate::pki::list::expiry_warning(cert.not_after, now),
        },
        crl: crl.map(|(path, crl)| crate::api::CrlStatus {
            path: absolute(&path),
            revoked: crl.revoked.len() as u64,
            number: crl.number,
            issued_at: crl.this_update,
        }),
    }
}

/// What the kernel reported at one interface, with our program marked.
fn interface_status(
    name: &str,
    attach: AttachKind,
    programs: Result<Vec<dataplane::AttachedProgram>, dataplane::DataplaneError>,
    ours: impl Fn(&dataplane::AttachedProgram) -> bool,
) -> InterfaceStatus {
    match programs {
        Ok(programs) => {
            let programs: Vec<ProgramInfo> = programs
                .into_iter()
                .map(|p| ProgramInfo {
                    ours: ours(&p),
                    id: p.id,
                    name: p.name,
                    mode: Some(p.kind),
                })
                .collect();
            InterfaceStatus {
                name: name.to_string(),
                classifier_attached: programs.iter().any(|p| p.ours),
                programs,
                attach: Some(attach),
                error: None,
            }
        }
        Err(e) => InterfaceStatus {
            name: name.to_string(),
            classifier_attached: false,
            programs: vec![],
            attach: Some(attach),
            error: Some(e.to_string()),
        },
    }
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}
