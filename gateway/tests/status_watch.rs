//! `gatewayctl status --watch` keeps redrawing through a daemon restart: while the daemon is
//! gone it shows the one "not running" line and asks again. On a terminal it clears the screen
//! and colours; piped, or with NO_COLOR, it prints plain text.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use gateway_lab::{Host, Lab, LabOptions, Spawned};

const ROUTES: &str = "[[route]]\ncidr = \"10.128.0.0/16\"\nname = \"vpc\"\n";

/// Waits (bounded) until `done` holds for what `watch` printed so far.
fn wait_for_output(watch: &Spawned, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = watch.log();
        if done(&log) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within 10 s; output:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `gatewayctl status --watch` on a pseudo-terminal (script(1)), with `env` before it.
fn watch_on_a_terminal(lab: &Lab, socket: &Path, env: &[&str], log: &str) -> Spawned {
    let command = format!(
        "{GATEWAYCTL} status --watch --interval 0.3 --socket {}",
        socket.display()
    );
    let mut argv = vec!["env", "TERM=xterm"];
    argv.extend_from_slice(env);
    argv.extend_from_slice(&["script", "-qfec", &command, "/dev/null"]);
    lab.spawn(Host::Operator, &argv, log).expect("spawn script")
}

#[test]
fn watch_shows_not_running_while_the_daemon_is_away_and_resumes_when_it_returns() {
    let lab = Lab::start(LabOptions {
        servers: false,
        ..LabOptions::default()
    })
    .expect("lab");
    let config = write_config(&lab, "op", &["lan0"], ROUTES);
    let socket = socket_path(&lab, "op");
    let mut daemon = start_daemon(&lab, Host::Operator, &config, &socket, "gatewayd.log");
    let sock = socket.to_str().expect("utf-8");

    let mut watch = spawn_watch(&lab, Host::Operator, sock, "watch.log");
    wait_for_output(&watch, "two screens", |l| l.matches("ROUTE").count() >= 2);

    daemon.terminate().expect("SIGTERM");
    daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("gatewayd exits");
    let away = wait_for_output(&watch, "not-running line", |l| {
        l.contains("gatewayd is not running")
    });
    assert!(
        watch.try_wait().expect("poll").is_none(),
        "watch gave up when the daemon went away:\n{away}"
    );
    // One line per screen while the daemon is away: the separator, then the reason.
    let screen = away
        .rsplit("--- ")
        .find(|s| s.contains("not running"))
        .expect("a not-running screen");
    assert_eq!(screen.trim_end().lines().count(), 2, "{screen:?}");

    let mut daemon = start_daemon(&lab, Host::Operator, &config, &socket, "gatewayd-2.log");
    let at = away.len();
    let back = wait_for_output(&watch, "status after the restart", |l| {
        l.get(at..).is_some_and(|rest| rest.contains("ROUTE"))
    });
    assert!(
        !back.contains('\u{1b}'),
        "escape codes in piped output:\n{back}"
    );
    watch.terminate().expect("SIGTERM");
    watch
        .wait_timeout(Duration::from_secs(5))
        .expect("watch exits");

    // On a terminal: each screen starts with home + clear and a clock line, and "attached"
    // is green.
    let tty = watch_on_a_terminal(&lab, &socket, &[], "watch-tty.log");
    let screen = wait_for_output(&tty, "two terminal screens", |l| {
        l.matches("\u{1b}[H\u{1b}[2J").count() >= 2 && l.matches("ROUTE").count() >= 2
    });
    assert!(screen.contains("every 0.3s, "), "{screen:?}");
    assert!(screen.contains("\u{1b}[32m attached"), "{screen:?}");
    drop(tty);

    // NO_COLOR: still redrawn in place, but no colour.
    let plain = watch_on_a_terminal(&lab, &socket, &["NO_COLOR=1"], "watch-nocolor.log");
    let screen = wait_for_output(&plain, "two NO_COLOR screens", |l| {
        l.matches("\u{1b}[H\u{1b}[2J").count() >= 2 && l.matches("ROUTE").count() >= 2
    });
    assert!(
        !screen.replace("\u{1b}[H\u{1b}[2J", "").contains('\u{1b}'),
        "colour despite NO_COLOR: {screen:?}"
    );
    drop(plain);

    daemon.terminate().expect("SIGTERM");
    daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("gatewayd exits");
}
