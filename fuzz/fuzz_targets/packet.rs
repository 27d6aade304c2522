//! core::packet::parse and the policy decision it feeds: every packet a peer sends and every
//! packet the TUN hands the engine.
#![no_main]

use gateway::core::packet::parse;
use gateway::core::policy::Policy;
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
    let policy = Policy::new(&[(
        "ops-*".to_string(),
        vec![
            "10.128.0.0/16 tcp/22".to_string(),
            "10.128.0.0/16 icmp".to_string(),
            "fd00:128::/64 udp/53".to_string(),
            "10.129.0.0/16".to_string(),
        ],
    )]);
    let _ = policy.decide("ops-alice", &meta);
});
