//! core::policy: `allow` rules as written in a config, and identity globs matched against the
//! names in peers' certificates.
#![no_main]

use gateway::core::policy::{Rule, glob_match};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, name) = text.split_once('\n').unwrap_or((text, ""));
    let _ = Rule::parse(pattern);
    let matched = glob_match(pattern, name);
    if !pattern.contains(['*', '?']) {
        assert_eq!(
            matched,
            pattern == name,
            "without wildcards a glob is equality"
        );
    }
});
