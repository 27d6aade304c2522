//! Logging for gatewayd: `tracing` to stderr, one line per event, fit for journald.
//!
//! The level comes from `[node] log_level`; `RUST_LOG`, when set, overrides it, so a developer
//! can ask for one module's debug output without editing the config. A `RUST_LOG` that does
//! not parse is not silently ignored: the daemon says so once it logs.
//!
//! When stderr is systemd's journal stream, each line starts with its syslog priority (`<4>`
//! for a warning), which journald strips and files the line under, so `journalctl -p warning`
//! finds the daemon's warnings; the journal stamps the time itself.

use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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

/// Installs the subscriber. Under journald lines carry their priority and no time; colour only
/// when stderr is a terminal, never into a file or the journal.
pub fn init(level: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, refused) = filter(level, rust_log.as_deref());
    let journal = std::env::var("JOURNAL_STREAM")
        .ok()
        .is_some_and(|v| stderr_is(&v));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    if journal {
        builder
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .init();
    } else {
        builder.init();
    }
    if let Some(why) = refused {
        tracing::warn!("{why}");
    }
}

/// Whether stderr is the stream `JOURNAL_STREAM` names (`DEVICE:INODE`, in decimal). systemd
/// sets it for the service, but a child whose stderr was redirected elsewhere inherits it too:
/// only the very same file is the journal.
fn stderr_is(journal_stream: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = parse_stream(journal_stream) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

fn parse_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// syslog priorities, as journald reads them from a `<N>` line prefix.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Puts the event's priority in front of the line the inner format writes.
struct JournalPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_start_with_the_syslog_priority_of_their_level() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
        });
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        let prefixes: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>"], "{text}");
        assert!(
            text.lines().nth(1).is_some_and(|l| l.contains("WARN")),
            "{text}"
        );
    }

    #[test]
    fn journal_stream_is_device_and_inode_in_decimal() {
        assert_eq!(parse_stream("8:1234"), Some((8, 1234)));
        assert_eq!(parse_stream(" 64769:17\n"), Some((64769, 17)));
        assert_eq!(parse_stream("8"), None);
        assert_eq!(parse_stream("x:1"), None);
        assert!(!stderr_is("0:0"));
    }
}
