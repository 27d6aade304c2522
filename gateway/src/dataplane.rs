//! The eBPF dataplane: a thin adapter over aya that loads the embedded object, keeps the route
//! tries in step with the config, attaches the classifier and reads its counters.
//!
//! Programs attach with TCX (Linux 6.6 and later: a link the kernel drops with the process) or,
//! where TCX is missing or `[dataplane] attach = "tc"` says so, as legacy netlink TC filters on
//! a `clsact` qdisc, which this dataplane adds when the interface has none and removes again.
//!
//! The arithmetic (prefix → trie key, which keys to remove, per-CPU sums) is in small pure
//! functions below with their own tests; everything else is one aya call each.

use std::collections::BTreeSet;

use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData, MapError, PerCpuArray, PerCpuValues};
use aya::programs::tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, TcAttachType};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier};
use gateway_common::{
    Counter, MAX_ROUTES, RouteCounters, maps,
    programs::{CLASSIFY, DNS_EGRESS},
};
use ipnet::IpNet;

pub mod clsact;
mod hooks;

pub use crate::api::AttachKind;
pub use hooks::{
    AttachMode, AttachedProgram, attached_egress_programs, attached_programs, remove_added_clsact,
    remove_leftover_filters,
};

/// The legacy TC filter priority the programs ask for: the first to run.
const FIRST_PRIORITY: u16 = 1;

/// The object built by `cargo xtask build-ebpf`, embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The kernel refused the object (verifier, missing capability, no BTF).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// The object lacks a map or program this daemon expects: built from another version.
    #[error("the eBPF object has no {0}; rebuild it with `cargo xtask build-ebpf`")]
    Missing(String),
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("classifier program: {0}")]
    Program(#[from] ProgramError),
    #[error("attaching the classifier to {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("querying the programs attached to {iface}: {source}")]
    Query { iface: String, source: ProgramError },
    /// Adding, listing or removing the clsact qdisc or its filters (legacy TC).
    #[error("legacy TC on {iface}: {source}")]
    Tc {
        iface: String,
        source: std::io::Error,
    },
    #[error("route id {0} is out of range (at most {MAX_ROUTES} routes)")]
    RouteId(u32),
    #[error("counting CPUs: {0}")]
    Cpus(std::io::Error),
}

pub struct Dataplane {
    ebpf: Ebpf,
    /// (program name, interface, link) for every attachment this dataplane made.
    links: Vec<(&'static str, String, SchedClassifierLinkId)>,
    kind: AttachKind,
    /// Interfaces (name, ifindex) whose clsact qdisc this dataplane added, to remove on detach.
    clsact_added: Vec<(String, u32)>,
    program_id: u32,
    /// The (route id, prefix) pairs in the tries now, to tell a route that stays from one
    /// that is new or renumbered.
    loaded: Vec<(u32, IpNet)>,
    _logger: Option<aya_log::EbpfLogger>,
}

impl Dataplane {
    /// Loads the embedded object and starts forwarding the programs' logs to `log`/`tracing`;
    /// programs will be attached the `kind` way. Must run inside a tokio runtime (aya-log reads
    /// its perf buffers from tasks).
    pub fn load(kind: AttachKind) -> Result<Self, DataplaneError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF logs will not be forwarded");
                None
            }
        };
        let egress = program_by_name(&mut ebpf, DNS_EGRESS)?;
        egress.load()?;
        let program = classifier(&mut ebpf)?;
        program.load()?;
        let program_id = program.info()?.id();
        Ok(Self {
            ebpf,
            links: Vec::new(),
            kind,
            clsact_added: Vec::new(),
            loaded: Vec::new(),
            program_id,
            _logger: logger,
        })
    }

    /// Kernel id of the loaded classifier, to tell ours from other programs on an interface.
    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    /// How this dataplane attaches its programs.
    pub fn kind(&self) -> AttachKind {
        self.kind
    }

    /// Makes the tries hold exactly `routes` and zeroes the counters of every id that is new or
    /// now names another prefix, so a reused id starts from nothing while a route that stays
    /// (a reload, a client's reconnect) keeps counting: its metrics are counters, and a
    /// needless reset reads as a drop in traffic.
    pub fn set_routes(&mut self, routes: &[(u32, IpNet)]) -> Result<(), DataplaneError> {
        if let Some((id, _)) = routes.iter().find(|(id, _)| *id >= MAX_ROUTES) {
            return Err(DataplaneError::RouteId(*id));
        }
        let mut v4: Vec<(u32, [u8; 4], u32)> = Vec::new();
        let mut v6: Vec<(u32, [u8; 16], u32)> = Vec::new();
        for (id, net) in routes {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.prefix_len()), n.network().octets(), *id)),
                IpNet::V6(n) => v6.push((u32::from(n.prefix_len()), n.network().octets(), *id)),
            }
        }
        sync_trie(&mut self.ebpf, maps::ROUTES_V4, &v4)?;
        sync_trie(&mut self.ebpf, maps::ROUTES_V6, &v6)?;

        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
        let fresh = ids_to_zero(&self.loaded, routes);
        let mut counters: PerCpuArray<&mut MapData, RouteCounters> =
            typed_map_mut(&mut self.ebpf, maps::ROUTE_COUNTERS)?;
        for id in fresh {
            let zero = PerCpuValues::try_from(vec![RouteCounters::default(); cpus])
                .map_err(DataplaneError::Cpus)?;
            counters
                .set(id, zero, 0)
                .map_err(map_error(maps::ROUTE_COUNTERS))?;
        }
        self.loaded = routes.to_vec();
        Ok(())
    }

    /// Attaches the classifier at ingress of `iface`: a TCX link (which the kernel drops by
    /// itself if this process dies) or a filter on the interface's clsact qdisc.
    pub fn attach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        self.attach_program(CLASSIFY, iface, TcAttachType::Ingress)
    }

    /// Attaches the DNS steering program at egress of `iface` (a client's uplink), so the
    /// host's own queries for private zones can be redirected into the TUN.
    pub fn attach_dns_egress(&mut self, iface: &str) -> Result<(), DataplaneError> {
        self.attach_program(DNS_EGRESS, iface, TcAttachType::Egress)
    }

    fn attach_program(
        &mut self,
        name: &'static str,
        iface: &str,
        hook: TcAttachType,
    ) -> Result<(), DataplaneError> {
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_string(),
            source,
        };
        let link = match self.kind {
            AttachKind::Tcx => program_by_name(&mut self.ebpf, name)?
                .attach_with_options(iface, hook, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(attach_err)?,
            AttachKind::Tc => {
                self.ensure_clsact(iface)?;
                let program = program_by_name(&mut self.ebpf, name)?;
                // First, as under TCX (which runs before any filter): a filter that ends
                // classification (a match without action) would otherwise hide packets from us.
                let first = NlOptions {
                    priority: FIRST_PRIORITY,
                    handle: 0,
                };
                match program.attach_with_options(iface, hook, TcAttachOptions::Netlink(first)) {
                    Ok(link) => link,
                    Err(e) => {
                        tracing::warn!(
                            interface = %iface, error = %e,
                            "TC priority {FIRST_PRIORITY} is taken by another filter; gatewayd's \
                             runs after it, and sees only what it passes on"
                        );
                        program
                            .attach_with_options(
                                iface,
                                hook,
                                TcAttachOptions::Netlink(NlOptions::default()),
                            )
                            .map_err(attach_err)?
                    }
                }
            }
        };
        self.links.push((name, iface.to_string(), link));
        Ok(())
    }

    /// Legacy TC needs a clsact qdisc; one already there is someone else's and stays.
    fn ensure_clsact(&mut self, iface: &str) -> Result<(), DataplaneError> {
        if self.clsact_added.iter().any(|(n, _)| n == iface) {
            return Ok(());
        }
        let tc_err = |source| DataplaneError::Tc {
            iface: iface.to_string(),
            source,
        };
        let index = crate::sys::if_index(iface)
            .ok_or_else(|| tc_err(std::io::Error::other("no such interface")))?;
        if clsact::add(iface, index).map_err(tc_err)? {
            tracing::info!(interface = %iface, "added a clsact qdisc for legacy TC");
            self.clsact_added.push((iface.to_string(), index));
        }
        Ok(())
    }

    /// Makes DNS_ZONES hold exactly these zones (lowercase wire names).
    pub fn set_dns_zones(&mut self, zones: &[Vec<u8>]) -> Result<(), DataplaneError> {
        let err = map_error(maps::DNS_ZONES);
        let mut m: aya::maps::HashMap<&mut MapData, u64, u32> =
            typed_map_mut(&mut self.ebpf, maps::DNS_ZONES)?;
        let wanted: Vec<u64> = zones
            .iter()
            .map(|z| gateway_common::dns_suffix_hash(z))
            .collect();
        for (id, h) in wanted.iter().enumerate() {
            m.insert(*h, id as u32, 0).map_err(err)?;
        }
        let present: Vec<u64> = m.keys().collect::<Result<_, _>>().map_err(err)?;
        for h in stale_keys(&present, &wanted) {
            m.remove(&h).map_err(err)?;
        }
        Ok(())
    }

    /// Detaches every link this dataplane made, then removes the clsact qdiscs it added; tries
    /// all of them and reports the first error.
    pub fn detach_all(&mut self) -> Result<(), DataplaneError> {
        let links = std::mem::take(&mut self.links);
        let mut first_error = None;
        for (name, iface, link) in links {
            let program = program_by_name(&mut self.ebpf, name)?;
            if let Err(e) = program.detach(link) {
                tracing::warn!(interface = %iface, error = %e, "detaching the classifier failed");
                first_error.get_or_insert(DataplaneError::from(e));
            }
        }
        for (iface, index) in std::mem::take(&mut self.clsact_added) {
            match remove_added_clsact(&iface, index) {
                Ok(true) => tracing::info!(interface = %iface, "removed the clsact qdisc it added"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(interface = %iface, error = %e, "removing the clsact qdisc failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Makes the classifier on `ingress` (an ifindex) hand matched packets to `target` with
    /// bpf_redirect instead of passing them on.
    pub fn set_redirect(&mut self, ingress: u32, target: u32) -> Result<(), DataplaneError> {
        let mut redirect: aya::maps::HashMap<&mut MapData, u32, u32> =
            typed_map_mut(&mut self.ebpf, maps::REDIRECT)?;
        redirect
            .insert(ingress, target, 0)
            .map_err(map_error(maps::REDIRECT))
    }

    /// One route's counters, summed over all CPUs.
    pub fn route_counters(&self, id: u32) -> Result<RouteCounters, DataplaneError> {
        let array: PerCpuArray<&MapData, RouteCounters> =
            typed_map(&self.ebpf, maps::ROUTE_COUNTERS)?;
        let values = array.get(&id, 0).map_err(map_error(maps::ROUTE_COUNTERS))?;
        Ok(sum_route_counters(&values))
    }

    /// The classifier's global counters, summed over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, DataplaneError> {
        let array: PerCpuArray<&MapData, u64> = typed_map(&self.ebpf, maps::COUNTERS)?;
        Counter::ALL
            .iter()
            .map(|c| {
                let values = array
                    .get(&(*c as u32), 0)
                    .map_err(map_error(maps::COUNTERS))?;
                Ok((*c, values.iter().copied().fold(0u64, u64::wrapping_add)))
            })
            .collect()
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if !self.links.is_empty() || !self.clsact_added.is_empty() {
            let _ = self.detach_all();
        }
    }
}

fn classifier(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    program_by_name(ebpf, CLASSIFY)
}

fn program_by_name<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::Missing(format!("program {name}")))?;
    Ok(program.try_into()?)
}

/// The object's map `name` as the typed aya map `T`, read-only; a missing map or one of
/// another type is an error naming it.
fn typed_map<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a Map, Error = MapError>,
{
    let map = ebpf
        .map(name)
        .ok_or_else(|| DataplaneError::Missing(format!("map {name}")))?;
    T::try_from(map).map_err(map_error(name))
}

/// [`typed_map`] for writing.
fn typed_map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a mut Map, Error = MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| DataplaneError::Missing(format!("map {name}")))?;
    T::try_from(map).map_err(map_error(name))
}

/// An aya map error as this dataplane's, naming the map.
fn map_error(map: &'static str) -> impl Fn(MapError) -> DataplaneError + Copy {
    move |source| DataplaneError::Map { map, source }
}

/// Writes `entries` (prefix length, address bytes, route id) into the trie and removes every
/// key that is not among them. Inserts go first so a prefix that stays never disappears.
fn sync_trie<const N: usize>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(u32, [u8; N], u32)],
) -> Result<(), DataplaneError>
where
    [u8; N]: aya::Pod,
{
    let mut trie: LpmTrie<&mut MapData, [u8; N], u32> = typed_map_mut(ebpf, name)?;
    let err = map_error(name);
    for (prefix, addr, id) in entries {
        trie.insert(&Key::new(*prefix, *addr), *id, 0)
            .map_err(err)?;
    }
    let present: Vec<(u32, [u8; N])> = trie
        .keys()
        .map(|k| k.map(|k| (k.prefix_len(), k.data())))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let wanted: Vec<(u32, [u8; N])> = entries.iter().map(|(p, a, _)| (*p, *a)).collect();
    for (prefix, addr) in stale_keys(&present, &wanted) {
        trie.remove(&Key::new(prefix, addr)).map_err(err)?;
    }
    Ok(())
}

/// Keys present in a trie that are not wanted any more.
fn stale_keys<K: Ord + Copy>(present: &[K], wanted: &[K]) -> Vec<K> {
    let wanted: BTreeSet<K> = wanted.iter().copied().collect();
    present
        .iter()
        .copied()
        .filter(|k| !wanted.contains(k))
        .collect()
}

/// Route ids whose counters must start from zero: those not loaded before with the same prefix.
fn ids_to_zero(loaded: &[(u32, IpNet)], wanted: &[(u32, IpNet)]) -> Vec<u32> {
    let loaded: BTreeSet<(u32, IpNet)> = loaded.iter().copied().collect();
    wanted
        .iter()
        .filter(|pair| !loaded.contains(pair))
        .map(|(id, _)| *id)
        .collect()
}

/// Per-CPU slots are written without atomics by one CPU each; the sum is the total.
fn sum_route_counters(per_cpu: &[RouteCounters]) -> RouteCounters {
    per_cpu
        .iter()
        .fold(RouteCounters::default(), |acc, c| RouteCounters {
            packets: acc.packets.wrapping_add(c.packets),
            bytes: acc.bytes.wrapping_add(c.bytes),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_counters_over_cpus() {
        let per_cpu = [
            RouteCounters {
                packets: 2,
                bytes: 168,
            },
            RouteCounters {
                packets: 3,
                bytes: 252,
            },
        ];
        assert_eq!(
            sum_route_counters(&per_cpu),
            RouteCounters {
                packets: 5,
                bytes: 420
            }
        );
        assert_eq!(sum_route_counters(&[]), RouteCounters::default());
    }

    #[test]
    fn zeroes_counters_of_new_and_renumbered_routes_only() {
        let net = |s: &str| -> IpNet { s.parse().expect("cidr") };
        let before = [(0, net("10.128.0.0/16")), (1, net("fd00:128::/64"))];
        assert_eq!(
            ids_to_zero(&[], &before),
            vec![0, 1],
            "a first load zeroes all"
        );
        assert!(
            ids_to_zero(&before, &before).is_empty(),
            "a reload keeps counts"
        );
        let added = [
            (0, net("10.128.0.0/16")),
            (1, net("fd00:128::/64")),
            (2, net("10.129.0.0/16")),
        ];
        assert_eq!(ids_to_zero(&before, &added), vec![2]);
        let inserted = [
            (0, net("10.129.0.0/16")),
            (1, net("10.128.0.0/16")),
            (2, net("fd00:128::/64")),
        ];
        assert_eq!(
            ids_to_zero(&before, &inserted),
            vec![0, 1, 2],
            "an id now naming another prefix starts again"
        );
    }

    #[test]
    fn removes_only_keys_no_longer_wanted() {
        let present = [
            (16, [10, 128, 0, 0]),
            (8, [10, 0, 0, 0]),
            (32, [10, 128, 0, 10]),
        ];
        let wanted = [(16, [10, 128, 0, 0]), (24, [192, 0, 2, 0])];
        assert_eq!(
            stale_keys(&present, &wanted),
            vec![(8, [10, 0, 0, 0]), (32, [10, 128, 0, 10])]
        );
        assert!(stale_keys(&wanted, &wanted).is_empty());
    }
}
