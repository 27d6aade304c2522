//! tunnel::access: addresses read from a resolver's answer for a `gatewayctl access` host, and
//! the query built from the host name a user typed.
#![no_main]

use gateway::tunnel::access::{address_query, answer_addresses};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = answer_addresses(data);
    if let Ok(name) = std::str::from_utf8(data) {
        let _ = address_query(name, name.len() % 2 == 0);
    }
});
