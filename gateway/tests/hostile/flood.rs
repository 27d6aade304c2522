//! Floods: DNS queries over the TCP fallback and on the QUIC DNS channel towards a silent
//! resolver, and frames and idle connections before any hello. Every flood is bounded in count and time.

use std::time::{Duration, Instant};

use gateway::core::frame::FrameType;
use gateway::tunnel::control::Control;
use gateway_lab::{Host, addr, zone};
use tokio::io::AsyncWriteExt;

use super::common::*;
use super::peer;
use super::{SILENT_ZONE, start, unit_nofile};

const MIB: u64 = 1024;

/// Queries a second the flood aims at, and for how long.
const FLOOD_QPS: u64 = 100_000;
const FLOOD_FOR: Duration = Duration::from_secs(4);

/// `per_tick` queries for the silent zone as DnsQuery frames (request id first), numbered on
/// from `sent`.
fn query_batch(sent: &mut u64, per_tick: u64) -> Vec<u8> {
    let mut batch = Vec::with_capacity(per_tick as usize * 48);
    for _ in 0..per_tick {
        *sent += 1;
        let mut payload = (*sent as u32).to_be_bytes().to_vec();
        payload.extend(peer::dns_query(
            *sent as u16,
            &format!("q{}.{SILENT_ZONE}", *sent),
        ));
        batch.extend(peer::frame_of(FrameType::DnsQuery, &payload));
    }
    batch
}

/// Writes the flood to `w` at [`FLOOD_QPS`] for [`FLOOD_FOR`], at most; returns how many.
async fn flood_into(w: &mut (impl tokio::io::AsyncWrite + Unpin)) -> u64 {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while start.elapsed() < FLOOD_FOR && sent < FLOOD_QPS * FLOOD_FOR.as_secs() {
        tick.tick().await;
        let batch = query_batch(&mut sent, FLOOD_QPS / 100);
        if w.write_all(&batch).await.is_err() {
            break;
        }
    }
    sent
}

#[test]
fn a_dns_flood_over_tcp_towards_a_silent_resolver_starves_nobody() {
    let h = start(Some(false), &[]);
    let t = h.target("ops-mallory");
    let flood = peer::spawn_in_ns(&t.ns.clone(), move || async move {
        let (answer, tls) = peer::open_session(&t, &peer::hello(&[], Some("flood".into())))
            .await
            .expect("session");
        assert!(matches!(answer, Control::Welcome { .. }), "{answer:?}");
        let (r, mut w) = tokio::io::split(tls);
        let answers = peer::drain(r);
        let sent = flood_into(&mut w).await;
        let _ = w.shutdown().await;
        drop(w);
        answers.abort();
        sent
    });
    starves_nobody(&h, flood);
}

/// The same flood on the QUIC connection's DNS channel (the stream that opens with the
/// channel's magic), which is what a client on QUIC uses.
#[test]
fn a_dns_flood_on_the_quic_dns_channel_towards_a_silent_resolver_starves_nobody() {
    let h = start(Some(false), &[]);
    let t = h.target("ops-mallory");
    let flood = peer::spawn_in_ns(&t.ns.clone(), move || async move {
        let (answer, session) = peer::open_quic_session(&t, &peer::hello(&[], None))
            .await
            .expect("session");
        assert!(matches!(answer, Control::Welcome { .. }), "{answer:?}");
        let (mut w, mut r) = session.1.open_bi().await.expect("channel");
        // The DNS channel's magic (`tunnel::relay::CHANNEL_MAGIC`), echoed by the connector.
        w.write_all(&[0xff, 0xff]).await.expect("magic");
        let mut echo = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), r.read_exact(&mut echo))
            .await
            .expect("magic echoed in time")
            .expect("magic echoed");
        assert_eq!(echo, [0xff, 0xff]);
        let answers = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(Some(_)) = r.read(&mut buf).await {}
        });
        let sent = flood_into(&mut w).await;
        let _ = w.finish();
        answers.abort();
        drop(session);
        sent
    });
    starves_nobody(&h, flood);
}

/// While `flood` runs, and after: the connector's status answers within 1 s, its RSS stays
/// under 100 MiB, another client's ping and private DNS work, and a bound was met and counted.
fn starves_nobody(h: &super::Hostile, flood: std::thread::JoinHandle<u64>) {
    let flood_started = Instant::now();
    let mut worst_status = Duration::ZERO;
    let mut max_rss = 0;
    let mut failures = Vec::new();
    let at = "@127.0.0.53".to_string();
    let db = format!("db.{}", zone::DOMAIN);
    while !flood.is_finished() {
        assert!(
            flood_started.elapsed() < Duration::from_secs(30),
            "the flood did not end"
        );
        let asked = Instant::now();
        let status = h.connector_status();
        worst_status = worst_status.max(asked.elapsed());
        assert!(status.tunnel.is_some());
        max_rss = max_rss.max(h.rss_kib());
        let ping = ["ping", "-c", "1", "-W", "2", addr::VPC_HOST];
        if let Err(e) = h.lab.run_ok(Host::Operator, &ping) {
            failures.push(format!("ping: {e:#}"));
        }
        let dig = ["dig", "+short", "+time=2", "+tries=1", &at, &db];
        match h.lab.run_ok(Host::Operator, &dig) {
            Ok(out) if out.trim() == zone::DB_PRIVATE => {}
            other => failures.push(format!("dig: {other:?}")),
        }
    }
    let sent = flood.join().expect("flood thread");
    let limits = h.connector_status().tunnel.expect("tunnel").limits;
    eprintln!(
        "flood: {sent} queries in {:?}; slowest status {worst_status:?}; max RSS {max_rss} KiB; \
         limits {limits:?}",
        flood_started.elapsed()
    );
    assert!(sent >= 100_000, "the flood sent only {sent} queries");
    assert!(
        failures.is_empty(),
        "the other client suffered: {failures:#?}"
    );
    assert!(
        worst_status < Duration::from_secs(1),
        "status took {worst_status:?} during the flood"
    );
    assert!(max_rss < 100 * MIB, "connector RSS reached {max_rss} KiB");
    // The flood met a bound on its way (which one depends on where it piles up first: the
    // link's queue, the client's rate or its queries in flight), and it was counted.
    let limits = h.connector_status().tunnel.expect("tunnel").limits;
    let bounded: u64 = ["dns_rate", "dns_in_flight_peer", "dns_queue_full"]
        .iter()
        .filter_map(|k| limits.get(*k))
        .sum();
    assert!(bounded > 0, "{limits:?}");
    // And afterwards, still: the private zone answers through the tunnel.
    let out = h
        .lab
        .run_ok(Host::Operator, &["dig", "+short", &at, &db])
        .expect("dig");
    assert_eq!(out.trim(), zone::DB_PRIVATE);
}

/// One flooding connection after another for `for_`, each sending 64 KiB frames as fast as it
/// can: `how` 0 before any hello (packet frames), 1 after a valid hello, 2 as an oversized
/// hello. Returns (connections, bytes written).
async fn frame_flood(t: peer::Target, how: u8, for_: Duration) -> (u64, u64) {
    let start = Instant::now();
    let (mut conns, mut bytes) = (0u64, 0u64);
    let big = peer::raw_frame(if how == 2 { 0 } else { 1 }, u16::MAX, &[0x45; 65_535]);
    while start.elapsed() < for_ && conns < 10_000 {
        let tls = if how == 1 {
            match peer::open_session(&t, &peer::hello(&[], None)).await {
                Ok((_, tls)) => Ok(tls),
                Err(e) => Err(e),
            }
        } else {
            peer::connect(&t, gateway::tunnel::tls::ALPN).await
        };
        let Ok(mut tls) = tls else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        conns += 1;
        while start.elapsed() < for_ {
            match tokio::time::timeout(Duration::from_secs(1), tls.write_all(&big)).await {
                Ok(Ok(())) => bytes += big.len() as u64,
                _ => break,
            }
        }
    }
    (conns, bytes)
}

#[test]
fn frames_before_the_hello_and_idle_connections_exhaust_neither_memory_nor_descriptors() {
    let h = start(Some(false), &[]);
    let limit = unit_nofile();
    let ssh = h.ticking_ssh(Host::Operator, 14, "steady-ssh.log");
    let flooders: Vec<_> = (0..3u8)
        .map(|how| {
            let t = h.target("ops-mallory");
            peer::spawn_in_ns(&t.ns.clone(), move || {
                frame_flood(t, how, Duration::from_secs(10))
            })
        })
        .collect();
    let (mut max_rss, mut max_fds) = (0u64, 0usize);
    let mut sample = |h: &super::Hostile| {
        let out = gatewayctl(
            &h.lab,
            Host::VpcGateway,
            &[
                "status",
                "--socket",
                h.connector_socket.to_str().expect("utf-8"),
            ],
        );
        assert!(out.status.success(), "status failed: {}", stderr_of(&out));
        max_rss = max_rss.max(h.rss_kib());
        max_fds = max_fds.max(h.fds());
    };
    // The frame floods alone first, then 600 idle connections on top.
    let phase = Instant::now();
    while phase.elapsed() < Duration::from_secs(4) {
        sample(&h);
        std::thread::sleep(Duration::from_millis(200));
    }
    let mid = h.connector_status().tunnel.expect("tunnel");
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let target = format!("{}:7844", addr::GW_WAN)
        .parse::<std::net::SocketAddr>()
        .expect("addr");
    let idle = peer::spawn_in_ns(&h.lab.ns(Host::Operator), move || async move {
        let mut held = Vec::new();
        for _ in 0..600 {
            let connect = tokio::net::TcpStream::connect(target);
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
                held.push(s);
            }
        }
        let n = held.len();
        // Held (never a byte sent) until the test has looked.
        tokio::task::spawn_blocking(move || stop_rx.recv_timeout(Duration::from_secs(30)))
            .await
            .ok();
        n
    });
    let phase = Instant::now();
    while phase.elapsed() < Duration::from_secs(6) {
        sample(&h);
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = stop_tx.send(());
    let held = idle.join().expect("idle connections");
    let floods: Vec<(u64, u64)> = flooders
        .into_iter()
        .map(|f| f.join().expect("flooder"))
        .collect();
    sample(&h);
    eprintln!(
        "idle connections made: {held}; floods (connections, bytes): {floods:?}; \
         max RSS {max_rss} KiB, max descriptors {max_fds} (limit {limit})"
    );
    assert!(held >= 500, "only {held} idle connections were made");
    assert!(floods.iter().all(|(c, _)| *c > 0), "{floods:?}");
    assert!(max_rss < 100 * MIB, "connector RSS reached {max_rss} KiB");
    assert!(
        (max_fds as u64) < limit,
        "{max_fds} descriptors, limit {limit}"
    );
    h.ticked(ssh, 14);
    h.ssh_ok(Host::Operator);
    let limits = &mid.limits;
    assert!(
        limits.get("frame_too_long").copied().unwrap_or(0) > 0,
        "{limits:?}"
    );
    let end = h.connector_status().tunnel.expect("tunnel");
    let failed = &end.handshake_failures;
    assert!(
        failed.get("over_capacity_per_source").copied().unwrap_or(0) > 0,
        "{failed:?}"
    );
    // Anyone's failed handshakes never push authenticated refusals out.
    assert!(end.refusals.iter().filter(|r| r.identity.is_none()).count() <= 5);
}
