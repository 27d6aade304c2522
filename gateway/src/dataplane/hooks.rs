//! Where the programs hang: choosing TCX or legacy TC (`[dataplane] attach`), asking the
//! kernel what is attached at a hook, and removing what a killed run left on a clsact qdisc.

use std::str::FromStr;

use aya::programs::SchedClassifier;
use aya::programs::tc::TcAttachType;
use aya::util::KernelVersion;
use serde::{Deserialize, Serialize};

use super::{AttachKind, DataplaneError, clsact};

/// A program the kernel reports at an interface's ingress or egress: a TCX link, or a BPF
/// filter on its clsact qdisc.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachedProgram {
    pub id: u32,
    pub name: String,
    pub tag: String,
    pub kind: AttachKind,
}

/// `[dataplane] attach`: how the TC programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// TCX where the kernel has it (6.6 and later), legacy TC on a clsact qdisc before.
    #[default]
    Auto,
    /// TCX only: a kernel without it is an error at start.
    Tcx,
    /// Legacy TC (netlink filters on a clsact qdisc) even where TCX exists.
    Tc,
}

impl FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "tc" => Ok(Self::Tc),
            other => Err(format!(
                "must be \"auto\", \"tcx\" (Linux 6.6 or later) or \"tc\" (a clsact qdisc), \
                 got {other:?}"
            )),
        }
    }
}

impl AttachMode {
    /// The mechanism this mode uses on the running kernel.
    pub fn resolve(self) -> AttachKind {
        match self {
            Self::Tcx => AttachKind::Tcx,
            Self::Tc => AttachKind::Tc,
            Self::Auto if tcx_supported() => AttachKind::Tcx,
            Self::Auto => AttachKind::Tc,
        }
    }
}

/// TCX arrived in Linux 6.6; aya draws the same line.
fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Removes a clsact qdisc this daemon added — unless it is gone already (`Ok(false)`), or filters
/// that are not ours hang on it: deleting it would take theirs too, so it stays, with a warning.
pub fn remove_added_clsact(iface: &str, index: u32) -> Result<bool, DataplaneError> {
    let tc_err = |source| DataplaneError::Tc {
        iface: iface.to_string(),
        source,
    };
    if !clsact::present(index).map_err(tc_err)? {
        return Ok(false);
    }
    if clsact::has_filters(index).map_err(tc_err)? {
        tracing::warn!(
            interface = %iface,
            "leaving the clsact qdisc gatewayd added: filters that are not its own hang on it"
        );
        return Ok(false);
    }
    clsact::remove(index).map_err(tc_err)?;
    Ok(true)
}

/// Removes the legacy TC filters named `program` from one side of `iface`, as a run that was
/// killed left them (netlink filters, unlike TCX links, outlive the process). Returns whether
/// there were any.
pub fn remove_leftover_filters(
    iface: &str,
    egress: bool,
    program: &str,
) -> Result<bool, DataplaneError> {
    let hook = if egress {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    };
    match aya::programs::tc::qdisc_detach_program(iface, hook, program) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DataplaneError::Tc {
            iface: iface.to_string(),
            source,
        }),
    }
}

/// What the kernel reports at ingress of `iface`: every program, ours and others', TCX links
/// first, then filters on its clsact qdisc, in the order they run.
pub fn attached_programs(iface: &str) -> Result<Vec<AttachedProgram>, DataplaneError> {
    kernel_programs(iface, TcAttachType::Ingress)
}

/// The same at egress (where the DNS steering program sits on a client's uplink).
pub fn attached_egress_programs(iface: &str) -> Result<Vec<AttachedProgram>, DataplaneError> {
    kernel_programs(iface, TcAttachType::Egress)
}

fn kernel_programs(
    iface: &str,
    direction: TcAttachType,
) -> Result<Vec<AttachedProgram>, DataplaneError> {
    let mut programs = match tcx_programs(iface, direction) {
        Ok(p) => p,
        // Before 6.6 there is no TCX to ask, and nothing can be attached there.
        Err(_) if !tcx_supported() => Vec::new(),
        Err(e) => return Err(e),
    };
    let tc_err = |source| DataplaneError::Tc {
        iface: iface.to_string(),
        source,
    };
    let index = crate::sys::if_index(iface)
        .ok_or_else(|| tc_err(std::io::Error::other("no such interface")))?;
    let side = match direction {
        TcAttachType::Egress => clsact::Side::Egress,
        _ => clsact::Side::Ingress,
    };
    programs.extend(
        clsact::bpf_filters(index, side)
            .map_err(tc_err)?
            .into_iter()
            .map(|f| AttachedProgram {
                id: f.prog_id,
                name: f.name,
                tag: f.tag,
                kind: AttachKind::Tc,
            }),
    );
    Ok(programs)
}

fn tcx_programs(
    iface: &str,
    direction: TcAttachType,
) -> Result<Vec<AttachedProgram>, DataplaneError> {
    let (_revision, programs) =
        SchedClassifier::query_tcx(iface, direction).map_err(|source| DataplaneError::Query {
            iface: iface.to_string(),
            source,
        })?;
    Ok(programs
        .iter()
        .map(|p| AttachedProgram {
            id: p.id(),
            name: p.name_as_str().unwrap_or("").to_string(),
            tag: format!("{:016x}", p.tag()),
            kind: AttachKind::Tcx,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_mode_is_validated_auto_by_default_and_takes_a_restart_to_change() {
        let parse = |extra: &str| {
            crate::config::parse(
                std::path::Path::new("/t.toml"),
                &format!("[node]\nname = \"n\"\n[dataplane]\n{extra}"),
            )
        };
        let auto = parse("").expect("valid");
        assert_eq!(auto.attach, AttachMode::Auto);
        let tc = parse("attach = \"tc\"\n").expect("valid");
        assert_eq!(tc.attach, AttachMode::Tc);
        assert_eq!(
            parse("attach = \"tcx\"\n").expect("valid").attach,
            AttachMode::Tcx
        );
        let err = parse("attach = \"clsact\"\n").expect_err("not a mode");
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].key, "dataplane.attach");
        assert!(err.0[0].reason.contains("\"clsact\""), "{err}");
        let keys = crate::config::reload_changes(&auto, &tc).expect_err("a restart");
        assert_eq!(keys, vec!["dataplane.attach"]);

        assert_eq!(AttachMode::Tc.resolve(), AttachKind::Tc);
        assert_eq!(AttachMode::Tcx.resolve(), AttachKind::Tcx);
        let expected = if tcx_supported() {
            AttachKind::Tcx
        } else {
            AttachKind::Tc
        };
        assert_eq!(AttachMode::Auto.resolve(), expected);
    }
}
