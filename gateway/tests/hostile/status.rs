//! What peers put into status: escaped, cut, and never enough to break the reply.

use std::time::Duration;

use gateway::tunnel::control::Control;
use gateway_lab::Host;
use tokio::io::AsyncWriteExt;

use super::common::*;
use super::peer;
use super::start;

/// Every string in a JSON value.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push(k.clone());
            strings(x, out);
        }),
        _ => {}
    }
}

#[test]
fn status_stays_parseable_and_clean_after_hostile_hellos_and_oversized_access_hosts() {
    let h = start(Some(false), &[]);
    let hostile_reasons = [
        "\u{1b}[2J\u{1b}[31mred\u{1b}[0m\u{7}".to_string(),
        "ok\nrefused: ops-alice from 1.2.3.4: forged line\r\n".to_string(),
        "\u{202e}desrever\u{2066}\u{85}".to_string(),
        format!("long {}", "x\u{1b}".repeat(500)),
    ];
    // Four identities, so all four sessions stay up at once (one per identity).
    let who = ["ops-mallory", "ops-m1", "ops-m2", "ops-m3"];
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let sessions: Vec<_> = who
        .iter()
        .zip(hostile_reasons.clone())
        .map(|(name, reason)| {
            let t = h.target(name);
            let up = up_tx.clone();
            peer::spawn_in_ns(&t.ns.clone(), move || async move {
                let (answer, mut tls) = peer::open_session(&t, &peer::hello(&[], Some(reason)))
                    .await
                    .expect("session");
                assert!(matches!(answer, Control::Welcome { .. }), "{answer:?}");
                let _ = up.send(());
                // Alive while the test looks at status (the connector waits 10 s for a word).
                tokio::time::sleep(Duration::from_secs(4)).await;
                let _ = tls.shutdown().await;
            })
        })
        .collect();
    drop(up_tx);
    for _ in &who {
        up_rx
            .recv_timeout(Duration::from_secs(15))
            .expect("a hostile session up");
    }

    let t = h.target("ops-mallory");
    let (too_long, refusals) = peer::in_ns(&t.ns.clone(), move || async move {
        // A hello above the connector's limit: the connection closes, unanswered.
        let huge = peer::hello(&[], Some("y".repeat(60 * 1024)));
        let too_long = peer::open_session(&t, &huge).await.map(|(a, _)| a);
        let mut refusals = Vec::new();
        // Twenty access requests for hosts far too long (unanswered), twenty for long ones
        // full of escape sequences (refused).
        for i in 0..20 {
            let _ = peer::access(&t, &format!("{i}\u{1b}[31m{}", "h".repeat(60 * 1024))).await;
            let host = format!(
                "{i}.\u{1b}]0;pwned\u{7}\nrefused: x from y: z{}",
                "a".repeat(2000)
            );
            refusals.push(peer::access(&t, &host).await);
        }
        (too_long, refusals)
    });
    assert!(
        too_long.is_err(),
        "a 60 KiB hello was answered: {too_long:?}"
    );
    for r in &refusals {
        assert!(matches!(r, Ok(Control::Refused { .. })), "{r:?}");
    }

    let raw = status_json_output(&h.lab, Host::VpcGateway, &h.connector_socket);
    assert!(
        raw.len() < 64 * 1024,
        "status --json is {} bytes",
        raw.len()
    );
    let status = status_json(&h.lab, Host::VpcGateway, &h.connector_socket);
    let value = status_validated(&h.lab, Host::VpcGateway, &h.connector_socket);
    // Peers' text lands in the tunnel section (elsewhere is the kernel's, e.g. a tab in
    // ping_group_range).
    let mut all = Vec::new();
    strings(&value["tunnel"], &mut all);
    for s in &all {
        assert!(
            !s.chars().any(|c| c.is_control()
                || ('\u{2066}'..='\u{2069}').contains(&c)
                || c == '\u{202e}'),
            "a control character in status: {s:?}"
        );
    }
    let tunnel = status.tunnel.expect("tunnel");
    let hostile: Vec<_> = tunnel
        .peers
        .iter()
        .filter(|p| who.contains(&p.identity.as_str()))
        .collect();
    assert_eq!(hostile.len(), 4, "{:?}", tunnel.peers);
    for p in &hostile {
        assert!(
            p.transport_reason.chars().count() <= 300,
            "{}",
            p.transport_reason
        );
        assert!(
            p.transport_reason.starts_with("client: "),
            "{}",
            p.transport_reason
        );
    }
    assert!(
        hostile
            .iter()
            .any(|p| p.transport_reason.contains("\\u{1b}[2J")),
        "escapes are shown, escaped: {hostile:?}"
    );
    assert!(tunnel.refusals.len() <= 25);
    for r in &tunnel.refusals {
        assert!(r.reason.chars().count() <= 256, "{}", r.reason);
    }
    assert!(
        tunnel
            .refusals
            .iter()
            .any(|r| r.reason.starts_with("access to 19.\\u{1b}]0;pwned")),
        "{:#?}",
        tunnel.refusals
    );
    assert!(tunnel.limits.get("frame_too_long").copied().unwrap_or(0) >= 1);

    // The text a terminal gets: no control characters, one line per refusal.
    let out = gatewayctl(
        &h.lab,
        Host::VpcGateway,
        &[
            "status",
            "--socket",
            h.connector_socket.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "control characters reach the terminal:\n{text:?}"
    );
    let lines = text.lines().filter(|l| l.starts_with("refused:")).count();
    assert_eq!(lines, tunnel.refusals.len(), "{text}");
    for s in sessions {
        s.join().expect("session thread");
    }
}
