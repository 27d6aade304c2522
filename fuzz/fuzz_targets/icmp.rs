//! core::icmp::too_big: builds "fragmentation needed" / "packet too big" from a packet a peer
//! or the TUN sent.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use gateway::core::icmp::too_big;
use gateway::core::packet::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, pkt)) = data.split_first_chunk::<3>() else {
        return;
    };
    let mtu = u16::from_be_bytes([head[0], head[1]]);
    // Buffers from too small to the engine's 1500 bytes.
    let mut out = vec![0u8; usize::from(head[2]) * 8];
    let from6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1);
    if let Some(n) = too_big(pkt, mtu, Ipv4Addr::new(100, 64, 0, 1), from6, &mut out) {
        assert!(n <= out.len());
        parse(&out[..n]).expect("the ICMP we build parses");
    }
});
