//! tunnel::control::decode: the JSON control messages (hello, welcome, refusal, keepalive,
//! access requests) a peer sends.
#![no_main]

use gateway::tunnel::control::{decode, encode_body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode(data) {
        // What we would send back in its place decodes again.
        if let Ok(body) = encode_body(&msg) {
            let again = decode(&body).expect("our own encoding decodes");
            assert_eq!(again, msg, "a message survives being sent back");
        }
    }
});
