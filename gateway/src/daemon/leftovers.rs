//! What a run that did not stop cleanly left behind, and what the record must list for the next
//! start to find it.

use gateway_common::programs::{CLASSIFY, DNS_EGRESS};

use super::classified_interfaces;
use crate::config::Config;
use crate::dataplane;
use crate::state::{self, Record};

/// Cleans what the run that wrote `record` left, unless it ran before the last reboot: then the
/// kernel state it lists is gone, and its "old" sysctl values would undo this boot's settings.
pub(super) fn clean(record: &Record, boot_id: &str) {
    if record.from_earlier_boot(boot_id) {
        tracing::info!(
            pid = record.pid,
            "the state record is from an earlier boot: nothing it lists is left to clean"
        );
        return;
    }
    clean_up(record);
}

/// Every (interface, egress) hook this config attaches a program to.
pub(super) fn tc_hooks(config: &Config) -> Vec<(String, bool)> {
    let mut hooks: Vec<(String, bool)> = classified_interfaces(config)
        .into_iter()
        .map(|i| (i, false))
        .collect();
    hooks.extend(
        config
            .tunnel
            .iter()
            .flat_map(|t| t.dns_intercept.iter())
            .map(|i| (i.clone(), true)),
    );
    hooks
}

/// Legacy TC: the interfaces whose clsact qdisc this run is about to add (those without one
/// now), recorded before they are added, so that a crash right after still leads to removal.
pub(super) fn clsact_to_add(hooks: &[(String, bool)]) -> Vec<String> {
    let mut ifaces: Vec<String> = hooks
        .iter()
        .map(|(iface, _)| iface.clone())
        .filter(|iface| {
            crate::sys::if_index(iface)
                .is_some_and(|i| !dataplane::clsact::present(i).unwrap_or(true))
        })
        .collect();
    ifaces.sort_unstable();
    ifaces.dedup();
    ifaces
}

/// Undoes what a run that did not stop cleanly left. Its TCX links were fd-based, so the kernel
/// already detached them when the process died; legacy TC filters and the clsact qdiscs it
/// added stay until removed here, as do the socket file, nftables tables and sysctls.
fn clean_up(record: &Record) {
    tracing::warn!(
        pid = record.pid,
        "the previous gatewayd did not stop cleanly; cleaning what it left"
    );
    match state::clear_stale_socket(&record.socket) {
        Ok(true) => tracing::info!(socket = %record.socket.display(), "removed stale socket"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not remove the previous socket"),
    }
    for table in &record.nft_tables {
        match crate::tunnel::nat::remove(table) {
            Ok(()) => tracing::info!(%table, "removed the previous run's nftables table"),
            Err(e) => tracing::warn!(%table, error = %e, "could not remove nftables table"),
        }
    }
    for (key, old) in record.sysctls.iter().rev() {
        match crate::tunnel::net::sysctl_set(key, old) {
            Ok(()) => {
                tracing::info!(%key, value = %old, "restored sysctl the previous run changed")
            }
            Err(e) => tracing::warn!(%key, error = %e, "could not restore sysctl"),
        }
    }
    for (iface, egress) in &record.tc_hooks {
        let program = if *egress { DNS_EGRESS } else { CLASSIFY };
        match dataplane::remove_leftover_filters(iface, *egress, program) {
            Ok(true) => {
                tracing::info!(interface = %iface, %program, "removed the previous run's TC filter")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(interface = %iface, error = %e, "could not remove a TC filter")
            }
        }
    }
    for iface in &record.clsact_added {
        let Some(index) = crate::sys::if_index(iface) else {
            continue;
        };
        match dataplane::remove_added_clsact(iface, index) {
            Ok(true) => {
                tracing::info!(interface = %iface, "removed the clsact qdisc the previous run added")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(interface = %iface, error = %e, "could not remove a clsact qdisc")
            }
        }
    }
    for iface in &record.interfaces {
        if let Ok(programs) = dataplane::attached_programs(iface)
            && let Some(p) = programs.iter().find(|p| p.name == CLASSIFY)
        {
            tracing::warn!(
                interface = %iface,
                program_id = p.id,
                "a gw_classify program is still attached (not by a link this daemon can own); \
                 it will run beside the new one until removed"
            );
        }
    }
}
