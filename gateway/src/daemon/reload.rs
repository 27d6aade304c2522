//! SIGHUP: the config read again and checked like at start, then applied live where it can be
//! (routes, policy, zones, the CRL) or refused whole, with the outcome kept for status.

use super::Shared;
use crate::config::Config;

/// SIGHUP: reads the config again and applies routes, policy and zones without touching the
/// tunnel's connections. A config that is invalid, or that changes what only a restart can,
/// is refused whole: the daemon keeps running the old one, and status says why.
pub(super) fn reload(shared: &Shared, tunnel: Option<&crate::tunnel::TunnelHandle>) {
    let mut notify = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        notify.push(now);
    }
    let _ = sd_notify::notify(false, &notify);
    let old = shared.config();
    let result = apply_reload(shared, &old, tunnel);
    let status = match &result {
        Ok(message) => {
            tracing::info!(%message, "SIGHUP: config reloaded");
            crate::api::ReloadStatus {
                at: crate::sys::unix_now(),
                ok: true,
                message: message.clone(),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: reload refused; still running the previous config");
            crate::api::ReloadStatus {
                at: crate::sys::unix_now(),
                ok: false,
                message: e.clone(),
            }
        }
    };
    if let Ok(mut r) = shared.last_reload.lock() {
        *r = Some(status);
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

fn apply_reload(
    shared: &Shared,
    old: &Config,
    tunnel: Option<&crate::tunnel::TunnelHandle>,
) -> Result<String, String> {
    let new = crate::config::load(&old.path)
        .and_then(|c| crate::preflight::check_system(&c).map(|()| c))
        .map_err(|e| {
            e.0.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })?;
    for warning in &new.warnings {
        tracing::warn!("config: {warning}");
    }
    let changes = crate::config::reload_changes(old, &new).map_err(|keys| {
        format!(
            "{} changed; that takes a restart (systemctl restart gatewayd)",
            keys.join(", ")
        )
    })?;
    // The CRL file is read again on every reload: revoking changes the file, not the config.
    let trust = match (tunnel, &new.tunnel) {
        (Some(handle), Some(t)) if t.tls.crl.is_some() || changes.crl => Some(
            handle
                .prepare_trust(t)
                .map_err(|e| format!("tls.crl: {e:#}"))?,
        ),
        _ => None,
    };
    if !changes.any() && trust.is_none() {
        return Ok("no change".into());
    }
    let is_client = matches!(
        new.tunnel.as_ref().map(|t| &t.role),
        Some(crate::config::Role::Client { .. })
    );
    // Everything that can refuse is asked first, so a refusal changes nothing.
    if let (Some(handle), Some(t)) = (tunnel, &new.tunnel) {
        handle.check_reload(t).map_err(|e| format!("{e:#}"))?;
    }
    // A client's classifier holds the routes its connector sent; its own [[route]]s count only
    // where there is no tunnel to learn from.
    if changes.routes && !is_client {
        let mut dp = shared
            .dataplane
            .lock()
            .map_err(|_| "dataplane lock poisoned".to_string())?;
        dp.set_routes(&new.routes.trie_entries())
            .map_err(|e| format!("loading routes into the classifier: {e}"))?;
        if let Ok(mut r) = shared.routes.lock() {
            *r = new.routes.clone();
        }
    }
    if let (Some(handle), Some(t)) = (tunnel, &new.tunnel) {
        handle.reload(t, new.routes.iter().map(|r| r.cidr).collect());
    }
    let mut applied = Vec::new();
    if let (Some(handle), Some(t), Some(v)) = (tunnel, &new.tunnel, trust) {
        let crl = match v.crl() {
            Some((path, crl)) => format!("CRL {} ({} revoked)", path.display(), crl.revoked.len()),
            None => "no CRL".into(),
        };
        let closed = handle.apply_trust(t, v);
        applied.push(match closed.is_empty() {
            true => crl,
            false => format!("{crl}, closed the session(s) of {}", closed.join(", ")),
        });
    }
    if changes.routes {
        applied.push(format!("{} route(s)", new.routes.len()));
    }
    if changes.policy {
        applied.push("policy".to_string());
    }
    if changes.zones {
        applied.push("DNS zones".to_string());
    }
    if let Ok(mut c) = shared.config.lock() {
        *c = new;
    }
    Ok(format!("applied {}", applied.join(", ")))
}
