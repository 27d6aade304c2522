//! The policy the node resolves once per identity decides every packet as a plain reading of
//! the rules would: checked against a naive model on random rules, identities and packets.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use crate::core::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, PacketMeta};
use crate::core::policy::{Decision, Entry, Policy, Rule};

/// A rule as the model sees it.
#[derive(Debug, Clone)]
struct ModelRule {
    net: IpNet,
    /// None: any protocol; else tcp, udp or icmp.
    proto: Option<u8>,
    ports: Option<(u16, u16)>,
}

impl ModelRule {
    fn text(&self) -> String {
        let proto = match self.proto {
            None => String::new(),
            Some(PROTO_TCP) => " tcp".into(),
            Some(PROTO_UDP) => " udp".into(),
            Some(_) => " icmp".into(),
        };
        let ports = match self.ports {
            Some((a, b)) if a == b => format!("/{a}"),
            Some((a, b)) => format!("/{a}-{b}"),
            None => String::new(),
        };
        format!("{}{proto}{ports}", self.net)
    }

    fn allows(&self, m: &PacketMeta) -> bool {
        self.net.contains(&m.dst)
            && self.proto.is_none_or(|p| p == m.proto)
            && match self.ports {
                None => true,
                Some((a, b)) => m.dst_port.is_some_and(|p| a <= p && p <= b),
            }
    }
}

/// `*` any run, `?` one character: the reading an operator expects of a glob.
fn glob(p: &[u8], n: &[u8]) -> bool {
    match (p.first(), n.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], n) || (!n.is_empty() && glob(p, &n[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &n[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &n[1..]),
        _ => false,
    }
}

fn model(entries: &[(String, Vec<ModelRule>)], identity: &str, m: &PacketMeta) -> Decision {
    let mine: Vec<_> = entries
        .iter()
        .filter(|(g, _)| glob(g.as_bytes(), identity.as_bytes()))
        .collect();
    if mine.is_empty() {
        Decision::DenyUnknownIdentity
    } else if mine
        .iter()
        .any(|(_, rules)| rules.iter().any(|r| r.allows(m)))
    {
        Decision::Allow
    } else {
        Decision::DenyNoRule
    }
}

fn arb_rule() -> impl Strategy<Value = ModelRule> {
    let proto = prop_oneof![
        Just(None),
        Just(Some(PROTO_TCP)),
        Just(Some(PROTO_UDP)),
        Just(Some(PROTO_ICMP))
    ];
    (0u8..4, 0u8..=32, proto, any::<u16>(), 0u16..200).prop_map(|(b, len, proto, lo, span)| {
        let addr = Ipv4Addr::new(10, 128, b, 0);
        let net = IpNet::new(IpAddr::V4(addr), len.max(8))
            .expect("len")
            .trunc();
        let ports = match proto {
            Some(PROTO_TCP) | Some(PROTO_UDP) if lo % 3 != 0 => {
                let a = (lo % 1000).max(1);
                Some((a, a.saturating_add(span % 50)))
            }
            _ => None,
        };
        ModelRule { net, proto, ports }
    })
}

fn arb_identity() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["ops-alice", "ops-bob", "site-1", "auditor", "mallory"])
        .prop_map(String::from)
}

fn arb_glob() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["ops-*", "*", "site-?", "auditor", "*-bob", "o?s-*"])
        .prop_map(String::from)
}

fn arb_packet() -> impl Strategy<Value = PacketMeta> {
    let proto = prop_oneof![
        Just(PROTO_TCP),
        Just(PROTO_UDP),
        Just(PROTO_ICMP),
        Just(47u8)
    ];
    (0u8..4, any::<u8>(), proto, 0u16..1100, any::<bool>()).prop_map(|(b, h, proto, port, frag)| {
        PacketMeta {
            src: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 128, b, h)),
            proto,
            dst_port: (!frag).then_some(port),
            src_port: None,
            later_fragment: frag,
        }
    })
}

proptest! {
    #[test]
    fn resolved_rules_decide_as_a_plain_reading_of_the_policy(
        entries in prop::collection::vec((arb_glob(), prop::collection::vec(arb_rule(), 0..5)), 0..5),
        identity in arb_identity(),
        packets in prop::collection::vec(arb_packet(), 1..40),
    ) {
        let policy = Policy::from_entries(
            entries
                .iter()
                .map(|(g, rules)| Entry {
                    identity: g.clone(),
                    rules: rules
                        .iter()
                        .map(|r| Rule::parse(&r.text()).expect("a rule the model writes parses"))
                        .collect(),
                    inbound: Vec::new(),
                })
                .collect(),
        );
        let resolved = policy.resolve(&identity);
        for m in packets {
            let want = model(&entries, &identity, &m);
            prop_assert_eq!(policy.decide(&identity, &m), want, "{:?}", m);
            let got = resolved.as_ref().map_or(Decision::DenyUnknownIdentity, |r| r.decide(&m));
            prop_assert_eq!(got, want, "resolved, {:?}", m);
        }
    }
}
