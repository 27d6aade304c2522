//! core::mss::clamp: rewrites the MSS option of SYNs crossing the tunnel, in place.
#![no_main]

use gateway::core::mss::clamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mtu, pkt)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mtu = usize::from(u16::from_be_bytes(*mtu));
    let mut out = pkt.to_vec();
    if clamp(&mut out, mtu) {
        assert_eq!(out.len(), pkt.len());
        assert!(!clamp(&mut out, mtu), "clamping twice changes nothing more");
    } else {
        assert_eq!(out, pkt, "a packet left alone is untouched");
    }
});
