//! core::dns: queries from clients and LAN hosts, names, and the header fields read from
//! resolvers' answers.
#![no_main]

use gateway::core::dns;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let zones = [
        dns::wire_name("hoge-vpc.com").expect("zone"),
        dns::wire_name("prod.hoge-vpc.com").expect("zone"),
    ];
    if let Ok(q) = dns::parse_query(data) {
        assert!(q.name.len() <= dns::MAX_NAME);
        assert!(q.question_end <= data.len());
        let _ = q.dotted();
        if let Some(i) = dns::matching_zone(&q.name, &zones) {
            assert!(dns::in_zone(&q.name, &zones[i]));
        }
    }
    // The question of an answer, as the forwarder matches it, and a name anywhere else.
    let at = data.first().map_or(0, |b| usize::from(*b));
    for at in [12, at] {
        if let Ok((name, end)) = dns::parse_name(data, at) {
            assert!(end <= data.len());
            assert!(name.len() <= dns::MAX_NAME);
            let _ = dns::dotted(&name);
        }
    }
    let _ = dns::response_rcode(data);
    let _ = dns::truncated(data);
    let _ = dns::dotted(data);
    let _ = dns::in_zone(data, &zones[0]);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dns::wire_name(text);
    }
});
