//! Which prefixes a client may have routed to it, and which routes a client may take from its
//! connector: a peer never decides what a kernel routes beyond what the config grants.
//!
//! Connector: a hello's `advertise` is accepted only if every prefix lies inside what the
//! identity's `[[policy]] advertise` lists, and none overlaps the overlay, the connector's own
//! routes, a subnet the connector's kernel already routes, a default route, or a prefix another
//! client holds. One refused prefix refuses the session, with a reason naming it. [`Registry`]
//! remembers which session owns which prefix, so routes are added once, handed over when the
//! same identity reconnects, and removed by the session that owns them.
//!
//! Client: a learned route that is a default route, overlaps a subnet the host is connected to,
//! or would carry the tunnel's own packets to the connector is refused and skipped.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::policy::glob_match;

/// Most prefixes one client may advertise: a site gateway has a few LANs, and every prefix is
/// a kernel route and a lookup on the connector's packet path.
pub const MAX_ADVERTISED: usize = 64;

/// Whether two prefixes share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    DefaultRoute,
    /// The overlay the connector hands out client addresses from.
    Overlay(IpNet),
    /// A route the connector offers its clients (`[[route]]`).
    Offered(IpNet),
    /// A subnet the connector's own kernel routes (connected, local, or another route).
    Local(IpNet),
    /// A prefix another connected client holds.
    OtherClient {
        identity: String,
        prefix: IpNet,
    },
    /// Outside every prefix the identity's `[[policy]] advertise` lists.
    NotGranted,
    /// More than [`MAX_ADVERTISED`] prefixes.
    TooMany(usize),
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::DefaultRoute => write!(f, "a default route is never accepted from a peer"),
            Conflict::Overlay(n) => write!(f, "overlaps the overlay {n}"),
            Conflict::Offered(n) => write!(f, "overlaps the connector's route {n}"),
            Conflict::Local(n) => write!(f, "overlaps {n}, which the connector routes itself"),
            Conflict::OtherClient { identity, prefix } => {
                write!(f, "overlaps {prefix}, held by {identity}")
            }
            Conflict::NotGranted => write!(f, "not in any [[policy]] advertise list for it"),
            Conflict::TooMany(n) => write!(f, "{n} prefixes, at most {MAX_ADVERTISED}"),
        }
    }
}

/// A refused advertisement: the prefix and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub prefix: Option<IpNet>,
    pub why: Conflict,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.prefix {
            Some(p) => write!(f, "advertised prefix {p}: {}", self.why),
            None => write!(f, "advertised prefixes: {}", self.why),
        }
    }
}

/// What `[[policy]] advertise` grants, by identity glob.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    entries: Vec<(String, Vec<IpNet>)>,
}

impl Grants {
    pub fn new(entries: impl IntoIterator<Item = (String, Vec<IpNet>)>) -> Grants {
        Grants {
            entries: entries.into_iter().collect(),
        }
    }

    /// Whether `prefix` lies inside a prefix some entry matching `identity` lists.
    pub fn allows(&self, identity: &str, prefix: &IpNet) -> bool {
        self.entries
            .iter()
            .filter(|(glob, _)| glob_match(glob, identity))
            .flat_map(|(_, nets)| nets)
            .any(|g| g.contains(prefix))
    }
}

/// What an advertised prefix must not overlap, besides other clients' prefixes.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    pub overlay: Vec<IpNet>,
    pub offered: Vec<IpNet>,
    /// Prefixes the connector's kernel routes itself (addresses' subnets, its routes that do
    /// not point into the tunnel), default routes excluded.
    pub local: Vec<IpNet>,
}

/// The first conflict of one prefix, checked in the order an operator would want to read it.
fn conflict(
    identity: &str,
    prefix: &IpNet,
    grants: &Grants,
    taken: &Taken,
    registry: &Registry,
) -> Option<Conflict> {
    if prefix.prefix_len() == 0 {
        return Some(Conflict::DefaultRoute);
    }
    if let Some(n) = taken.overlay.iter().find(|n| overlaps(n, prefix)) {
        return Some(Conflict::Overlay(*n));
    }
    if let Some(n) = taken.offered.iter().find(|n| overlaps(n, prefix)) {
        return Some(Conflict::Offered(*n));
    }
    if let Some(n) = taken
        .local
        .iter()
        .find(|n| n.prefix_len() > 0 && overlaps(n, prefix))
    {
        return Some(Conflict::Local(*n));
    }
    if let Some((p, owner)) = registry
        .owners
        .iter()
        .find(|(p, o)| o.identity != identity && overlaps(p, prefix))
    {
        return Some(Conflict::OtherClient {
            identity: owner.identity.clone(),
            prefix: *p,
        });
    }
    if !grants.allows(identity, prefix) {
        return Some(Conflict::NotGranted);
    }
    None
}

/// The prefixes `identity` advertised, deduplicated and truncated to their network, if every
/// one of them is acceptable; the first refusal otherwise.
pub fn check(
    identity: &str,
    advertised: &[IpNet],
    grants: &Grants,
    taken: &Taken,
    registry: &Registry,
) -> Result<Vec<IpNet>, Refused> {
    if advertised.len() > MAX_ADVERTISED {
        return Err(Refused {
            prefix: None,
            why: Conflict::TooMany(advertised.len()),
        });
    }
    let mut accepted: Vec<IpNet> = Vec::with_capacity(advertised.len());
    for p in advertised {
        let p = p.trunc();
        if let Some(why) = conflict(identity, &p, grants, taken, registry) {
            return Err(Refused {
                prefix: Some(p),
                why,
            });
        }
        if !accepted.contains(&p) {
            accepted.push(p);
        }
    }
    Ok(accepted)
}

/// After a reload: whether a live session's accepted prefixes are all still granted and clear
/// of the routes offered now; the first that is not, otherwise.
pub fn still_granted(
    identity: &str,
    prefixes: &[IpNet],
    grants: &Grants,
    offered: &[IpNet],
) -> Result<(), Refused> {
    for p in prefixes {
        let why = if let Some(n) = offered.iter().find(|n| overlaps(n, p)) {
            Conflict::Offered(*n)
        } else if !grants.allows(identity, p) {
            Conflict::NotGranted
        } else {
            continue;
        };
        return Err(Refused {
            prefix: Some(*p),
            why,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    identity: String,
    session: u64,
}

/// Which session owns which advertised prefix (and so the kernel route to it).
#[derive(Debug, Default)]
pub struct Registry {
    owners: HashMap<IpNet, Owner>,
}

/// What [`Registry::claim`] changed, so that [`Registry::abort`] can put it back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// Prefixes nobody routed: they need a kernel route.
    pub add: Vec<IpNet>,
    /// Prefixes an earlier session of the same identity owned (and routes), with its id.
    pub took: Vec<(IpNet, u64)>,
}

impl Registry {
    /// Records `prefixes` (already [`check`]ed against this registry, under the same lock) as
    /// `session`'s.
    pub fn claim(&mut self, identity: &str, session: u64, prefixes: &[IpNet]) -> Claim {
        let mut claim = Claim::default();
        for p in prefixes {
            let owner = Owner {
                identity: identity.to_string(),
                session,
            };
            match self.owners.insert(*p, owner) {
                Some(old) if old.identity == identity && old.session != session => {
                    claim.took.push((*p, old.session));
                }
                Some(old) if old.identity == identity => {}
                _ => claim.add.push(*p),
            }
        }
        claim
    }

    /// Undoes `claim` (a kernel route could not be added): new prefixes forgotten, taken-over
    /// ones given back to the session that had them.
    pub fn abort(&mut self, session: u64, claim: &Claim) {
        for p in &claim.add {
            if self.owners.get(p).is_some_and(|o| o.session == session) {
                self.owners.remove(p);
            }
        }
        for (p, old) in &claim.took {
            if let Some(o) = self.owners.get_mut(p)
                && o.session == session
            {
                o.session = *old;
            }
        }
    }

    /// Everything `session` still owns, forgotten: the kernel routes to remove. Prefixes a
    /// newer session of the same identity took over are not returned.
    pub fn release(&mut self, session: u64) -> Vec<IpNet> {
        let mine: Vec<IpNet> = self
            .owners
            .iter()
            .filter(|(_, o)| o.session == session)
            .map(|(p, _)| *p)
            .collect();
        for p in &mine {
            self.owners.remove(p);
        }
        mine
    }

    /// Prefixes `session` owns.
    pub fn owned_by(&self, session: u64) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self
            .owners
            .iter()
            .filter(|(_, o)| o.session == session)
            .map(|(p, _)| *p)
            .collect();
        v.sort();
        v
    }
}

/// A learned route the client will not install, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub route: IpNet,
    pub why: String,
}

/// Splits the routes a connector sent into those to install and those refused: a default
/// route, a route overlapping a subnet this host is connected to (`local`), or one containing
/// the connector's own address (the tunnel's packets would be routed into the tunnel).
pub fn learned(routes: &[IpNet], local: &[IpNet], connector: IpAddr) -> (Vec<IpNet>, Vec<Skipped>) {
    let mut ok = Vec::new();
    let mut skipped = Vec::new();
    for r in routes {
        let r = r.trunc();
        let why = if r.prefix_len() == 0 {
            Some("a default route is never taken from the connector".to_string())
        } else if let Some(l) = local.iter().find(|l| l.prefix_len() > 0 && overlaps(l, &r)) {
            Some(format!("overlaps {l}, a subnet this host is connected to"))
        } else if r.contains(&connector) {
            Some(format!(
                "contains the connector's address {connector}: the tunnel would route into itself"
            ))
        } else {
            None
        };
        match why {
            Some(why) => skipped.push(Skipped { route: r, why }),
            None if !ok.contains(&r) => ok.push(r),
            None => {}
        }
    }
    (ok, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    fn grants() -> Grants {
        Grants::new([
            (
                "ops-*".to_string(),
                vec![net("192.0.2.0/24"), net("2001:db8:2::/64")],
            ),
            ("site-*".to_string(), vec![net("198.18.0.0/15")]),
        ])
    }

    fn taken() -> Taken {
        Taken {
            overlay: vec![net("100.64.0.0/24"), net("fd00:64::/64")],
            offered: vec![net("10.128.0.0/16"), net("fd00:128::/64")],
            local: vec![
                net("203.0.113.0/24"),
                net("10.128.0.0/16"),
                net("0.0.0.0/0"),
            ],
        }
    }

    fn refuse(id: &str, p: &str, reg: &Registry) -> Conflict {
        check(id, &[net(p)], &grants(), &taken(), reg)
            .expect_err(p)
            .why
    }

    #[test]
    fn a_granted_prefix_is_accepted_and_a_bigger_one_is_not() {
        let reg = Registry::default();
        let ok = check(
            "ops-alice",
            &[
                net("192.0.2.0/24"),
                net("192.0.2.128/25"),
                net("192.0.2.0/24"),
            ],
            &grants(),
            &taken(),
            &reg,
        );
        assert_eq!(ok, Ok(vec![net("192.0.2.0/24"), net("192.0.2.128/25")]));
        assert_eq!(
            refuse("ops-alice", "192.0.0.0/16", &reg),
            Conflict::NotGranted
        );
        assert_eq!(
            refuse("ops-alice", "198.18.0.0/24", &reg),
            Conflict::NotGranted
        );
        assert!(check("site-1", &[net("198.19.1.0/24")], &grants(), &taken(), &reg).is_ok());
        assert!(check("ops-a", &[], &grants(), &taken(), &reg).is_ok());
    }

    #[test]
    fn overlay_routes_local_subnets_and_default_routes_are_never_accepted() {
        let reg = Registry::default();
        assert_eq!(refuse("ops-a", "0.0.0.0/0", &reg), Conflict::DefaultRoute);
        assert_eq!(refuse("ops-a", "::/0", &reg), Conflict::DefaultRoute);
        assert_eq!(
            refuse("ops-a", "100.64.0.2/32", &reg),
            Conflict::Overlay(net("100.64.0.0/24")),
            "another client's overlay address"
        );
        assert_eq!(
            refuse("ops-a", "10.128.0.0/16", &reg),
            Conflict::Offered(net("10.128.0.0/16"))
        );
        assert_eq!(
            refuse("ops-a", "10.0.0.0/8", &reg),
            Conflict::Offered(net("10.128.0.0/16")),
            "a supernet overlaps too"
        );
        assert_eq!(
            refuse("ops-a", "203.0.113.7/32", &reg),
            Conflict::Local(net("203.0.113.0/24"))
        );
        let r = check("ops-a", &[net("10.128.5.0/24")], &grants(), &taken(), &reg)
            .expect_err("refused");
        assert_eq!(
            r.to_string(),
            "advertised prefix 10.128.5.0/24: overlaps the connector's route 10.128.0.0/16"
        );
        // The local default route does not make every prefix overlap.
        assert!(check("ops-a", &[net("192.0.2.0/24")], &grants(), &taken(), &reg).is_ok());
    }

    #[test]
    fn another_clients_prefix_is_refused_and_the_same_identity_takes_it_over() {
        let mut reg = Registry::default();
        assert_eq!(
            reg.claim("ops-alice", 1, &[net("192.0.2.0/24")]).add,
            [net("192.0.2.0/24")]
        );
        assert_eq!(
            refuse("ops-mallory", "192.0.2.128/25", &reg),
            Conflict::OtherClient {
                identity: "ops-alice".into(),
                prefix: net("192.0.2.0/24")
            }
        );
        // Alice reconnecting: accepted, and no second kernel route.
        let again = check(
            "ops-alice",
            &[net("192.0.2.0/24")],
            &grants(),
            &taken(),
            &reg,
        )
        .expect("same identity");
        let claim = reg.claim("ops-alice", 2, &again);
        assert!(claim.add.is_empty(), "no second kernel route");
        assert_eq!(claim.took, [(net("192.0.2.0/24"), 1)]);
        assert!(reg.release(1).is_empty(), "the new session owns it now");
        assert_eq!(reg.owned_by(2), [net("192.0.2.0/24")]);
        assert_eq!(reg.release(2), [net("192.0.2.0/24")]);
        assert!(
            check(
                "ops-mallory",
                &[net("192.0.2.0/24")],
                &grants(),
                &taken(),
                &reg
            )
            .is_ok()
        );
    }

    #[test]
    fn a_failed_kernel_add_is_undone_and_gives_prefixes_back() {
        let mut reg = Registry::default();
        let lan = net("192.0.2.0/24");
        let lab = net("192.0.2.128/25");
        reg.claim("ops-alice", 1, &[lan]);
        let claim = reg.claim("ops-alice", 2, &[lan, lab]);
        assert_eq!(claim.add, [lab]);
        reg.abort(2, &claim);
        assert_eq!(reg.owned_by(1), [lan], "back to the session that had it");
        assert!(reg.owned_by(2).is_empty());
        assert_eq!(reg.release(1), [lan]);
    }

    #[test]
    fn a_reload_that_withdraws_a_grant_is_noticed() {
        let lan = [net("192.0.2.0/24")];
        assert!(still_granted("ops-a", &lan, &grants(), &[]).is_ok());
        let none = Grants::default();
        assert_eq!(
            still_granted("ops-a", &lan, &none, &[])
                .expect_err("gone")
                .why,
            Conflict::NotGranted
        );
        assert_eq!(
            still_granted("ops-a", &lan, &grants(), &[net("192.0.0.0/16")])
                .expect_err("offered now")
                .why,
            Conflict::Offered(net("192.0.0.0/16"))
        );
    }

    #[test]
    fn too_many_prefixes_are_refused_whole() {
        let many: Vec<IpNet> = (0..=MAX_ADVERTISED)
            .map(|i| net(&format!("192.0.2.{i}/32")))
            .collect();
        let r = check("ops-a", &many, &grants(), &taken(), &Registry::default()).expect_err("many");
        assert_eq!(r.why, Conflict::TooMany(MAX_ADVERTISED + 1));
    }

    #[test]
    fn a_client_skips_default_routes_its_own_subnets_and_the_connectors_address() {
        let local = [
            net("192.0.2.0/24"),
            net("198.51.100.0/24"),
            net("0.0.0.0/0"),
        ];
        let connector: IpAddr = "203.0.113.10".parse().expect("ip");
        let (ok, skipped) = learned(
            &[
                net("10.128.0.0/16"),
                net("0.0.0.0/0"),
                net("192.0.2.128/25"),
                net("203.0.113.0/24"),
                net("fd00:128::/64"),
            ],
            &local,
            connector,
        );
        assert_eq!(ok, [net("10.128.0.0/16"), net("fd00:128::/64")]);
        let refused: Vec<_> = skipped.iter().map(|s| s.route).collect();
        assert_eq!(
            refused,
            [
                net("0.0.0.0/0"),
                net("192.0.2.128/25"),
                net("203.0.113.0/24")
            ]
        );
        assert!(skipped[1].why.contains("192.0.2.0/24"), "{:?}", skipped[1]);
    }
}
