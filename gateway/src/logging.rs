//! Logging for gatewayd: `tracing` to stderr, one line per event, fit for journald.
//!
//! The level comes from `[node] log_level`; `RUST_LOG`, when set, overrides it, so a developer
//! can ask for one module's debug output without editing the config. A `RUST_LOG` that does
//! not parse is not silently ignored: the daemon says so once it logs.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter for `level` (validated by config) unless `rust_log` overrides it; the second
/// value is why an override was refused, to log once logging works.
pub fn filter(level: &str, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        None => (EnvFilter::new(level), None),
        Some(directives) => match EnvFilter::try_new(directives) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new(level),
                Some(format!(
                    "RUST_LOG={directives:?} is not a filter ({e}); using [node] log_level = {level:?}"
                )),
            ),
        },
    }
}

/// Installs the subscriber. Under systemd (JOURNAL_STREAM set) journald adds the time itself,
/// so lines carry none; colour only when stderr is a terminal, never into a file or the
/// journal.
pub fn init(level: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, refused) = filter(level, rust_log.as_deref());
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::stderr().is_terminal());
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
    if let Some(why) = refused {
        tracing::warn!("{why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_overrides_the_config_level_unless_it_is_empty_or_broken() {
        assert_eq!(filter("warn", None).0.to_string(), "warn");
        let (f, refused) = filter("info", Some("gateway::tunnel=debug"));
        assert_eq!(
            (f.to_string(), refused),
            ("gateway::tunnel=debug".into(), None)
        );
        assert_eq!(filter("info", Some("  ")).0.to_string(), "info");
        let (f, refused) = filter("info", Some("gateway=[[["));
        assert_eq!(f.to_string(), "info");
        assert!(
            refused.is_some_and(|r| r.contains("RUST_LOG") && r.contains("\"info\"")),
            "a broken RUST_LOG is reported"
        );
    }
}
