//! core::dns::udp_query / udp_reply: DNS queries steered out of IP packets, and the reply
//! built around a resolver's answer.
#![no_main]

use gateway::core::{dns, packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes say where the query packet ends and the answer begins.
    let Some((split, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_be_bytes(*split)).min(rest.len());
    let (query, answer) = rest.split_at(split);
    let Some((msg, header_len)) = dns::udp_query(query) else {
        return;
    };
    assert_eq!(header_len + msg.len(), query.len());
    if let Some(reply) = dns::udp_reply(query, answer) {
        let asked = packet::parse(query).expect("udp_query parsed it");
        let got = packet::parse(&reply).expect("the reply we build parses");
        assert_eq!((got.src, got.dst), (asked.dst, asked.src));
        assert!(reply.ends_with(answer));
    }
});
