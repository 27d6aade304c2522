//! config::parse: the config loader on any text (TOML syntax, shapes, and every check).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/gateway/fuzz.toml");
    match gateway::config::parse(path, text) {
        Ok(c) => {
            assert_eq!(
                gateway::config::reload_changes(&c, &c),
                Ok(Default::default()),
                "a config differs from nothing in itself"
            );
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "an error names at least one problem");
            let _ = e.to_string();
        }
    }
});
