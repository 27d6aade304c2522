//! core::frame::Decoder: the TLS-over-TCP fallback's framing, fed by a peer before and after
//! authentication, in chunks split wherever TCP split them.
#![no_main]

use gateway::core::frame::{Decoder, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so frames arrive cut at every boundary.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut decoder = Decoder::default();
    let mut reencoded = Vec::new();
    'chunks: for piece in stream.chunks(usize::from(chunk).max(1)) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some((kind, payload))) => {
                    encode(kind, &payload, &mut reencoded).expect("a decoded frame re-encodes");
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(
                        decoder.next_frame().is_err(),
                        "a broken stream stays broken"
                    );
                    break 'chunks;
                }
            }
        }
    }
    // The frames that came out, framed again, are exactly the bytes that went in.
    assert_eq!(&stream[..reencoded.len()], &reencoded[..]);
});
