//! core::packet::parse and the policy decision it feeds: every packet a peer sends and every
//! packet the TUN hands the engine.
#![no_main]

use gateway::core::packet::parse;
use gateway::core::policy::{Entry, Policy, Rule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(meta) = parse(data) else {
        return;
    };
    assert_eq!(meta.src.is_ipv4(), meta.dst.is_ipv4());
    if meta.later_fragment {
        assert_eq!(
            meta.dst_port, None,
            "a later fragment has no transport header"
        );
    }
    let rules = [
        "10.128.0.0/16 tcp/22",
        "10.128.0.0/16 icmp",
        "fd00:128::/64 udp/53",
        "10.129.0.0/16",
    ];
    let policy = Policy::from_entries(vec![Entry {
        identity: "ops-*".to_string(),
        rules: rules
            .iter()
            .map(|r| Rule::parse(r).expect("a valid rule"))
            .collect(),
        inbound: Vec::new(),
    }]);
    let _ = policy.decide("ops-alice", &meta);
});
