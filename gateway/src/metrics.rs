//! The opt-in metrics endpoint (`[metrics] listen`): Prometheus text (format 0.0.4, or
//! OpenMetrics when the scraper asks for it) built from the same [`Status`] snapshot
//! `gatewayctl status --json` prints, so the two always agree. Rendering is a pure function;
//! the HTTP side is a few lines around it.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::Status;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Adds counter or gauge families to a registry and fills them in one call each.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn counter(&mut self, name: &str, help: &str, values: Vec<(Labels, u64)>) {
        let family = Family::<Labels, Counter>::default();
        for (l, v) in values {
            family.get_or_create(&l).inc_by(v);
        }
        self.registry.register(name, help, family);
    }

    fn gauge(&mut self, name: &str, help: &str, values: Vec<(Labels, f64)>) {
        let family = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for (l, v) in values {
            family.get_or_create(&l).set(v);
        }
        self.registry.register(name, help, family);
    }
}

/// The metrics for one status snapshot, in the OpenMetrics text format.
pub fn render(s: &Status) -> String {
    let mut b = Builder {
        registry: Registry::with_prefix("gateway"),
    };
    b.registry.register(
        "build",
        "gatewayd version and node name",
        Info::new(labels(&[("version", &s.version), ("node", &s.node)])),
    );
    b.gauge(
        "uptime_seconds",
        "Seconds since gatewayd started",
        vec![(vec![], s.uptime_secs as f64)],
    );
    b.counter(
        "route_packets",
        "Packets the eBPF classifier matched to each route",
        s.routes
            .iter()
            .map(|r| (labels(&[("route", &r.name), ("cidr", &r.cidr)]), r.packets))
            .collect(),
    );
    b.counter(
        "route_bytes",
        "Bytes (from the IP header on) the eBPF classifier matched to each route",
        s.routes
            .iter()
            .map(|r| (labels(&[("route", &r.name), ("cidr", &r.cidr)]), r.bytes))
            .collect(),
    );
    b.counter(
        "classifier_packets",
        "Classifier totals by outcome",
        s.classifier
            .iter()
            .map(|(k, v)| (labels(&[("outcome", k)]), *v))
            .collect(),
    );
    b.gauge(
        "program_attached",
        "1 when the kernel reports gatewayd's program at the interface's hook (tcx_* for a TCX \
         link, tc_* for a filter on a clsact qdisc)",
        s.interfaces
            .iter()
            .map(|i| (i, "ingress"))
            .chain(s.dns_egress.iter().map(|i| (i, "egress")))
            .map(|(i, side)| {
                let mode = i
                    .programs
                    .iter()
                    .find(|p| p.ours)
                    .and_then(|p| p.mode)
                    .or(i.attach)
                    .unwrap_or(crate::api::AttachKind::Tcx);
                let hook = format!("{}_{side}", mode.as_str());
                (
                    labels(&[("interface", &i.name), ("hook", &hook)]),
                    f64::from(u8::from(i.classifier_attached)),
                )
            })
            .collect(),
    );
    if let Some(icmp) = &s.icmp {
        b.gauge(
            "icmp_probes_possible",
            "1 when ICMP echo sockets open (net.ipv4.ping_group_range)",
            vec![(vec![], f64::from(u8::from(icmp.probes_possible)))],
        );
    }
    if let Some(t) = &s.tunnel {
        let peer = |p: &crate::api::PeerStatus| {
            labels(&[("identity", &p.identity), ("transport", &p.transport)])
        };
        b.gauge(
            "peers",
            "Connected tunnel peers",
            vec![(vec![], t.peers.len() as f64)],
        );
        for (name, help, get) in [
            (
                "peer_tx_packets",
                "Packets sent to the peer",
                (|p: &crate::api::PeerStatus| p.tx_packets) as fn(&crate::api::PeerStatus) -> u64,
            ),
            ("peer_tx_bytes", "Bytes sent to the peer", |p| p.tx_bytes),
            ("peer_rx_packets", "Packets received from the peer", |p| {
                p.rx_packets
            }),
            ("peer_rx_bytes", "Bytes received from the peer", |p| {
                p.rx_bytes
            }),
            (
                "peer_policy_drops",
                "Packets from the peer its policy did not allow",
                |p| p.policy_drops,
            ),
        ] {
            b.counter(
                name,
                help,
                t.peers.iter().map(|p| (peer(p), get(p))).collect(),
            );
        }
        b.gauge(
            "peer_rtt_seconds",
            "Round-trip time of the peer's connection",
            t.peers
                .iter()
                .map(|p| (peer(p), p.rtt_ms / 1000.0))
                .collect(),
        );
        b.counter(
            "tunnel_drops",
            "Packets the tunnel dropped, by reason",
            t.drops
                .iter()
                .map(|(k, v)| (labels(&[("reason", k)]), *v))
                .collect(),
        );
        b.gauge(
            "refusals_listed",
            "Refused peers in the status list (the most recent ones)",
            vec![(vec![], t.refusals.len() as f64)],
        );
        b.gauge(
            "access_streams_active",
            "gatewayctl access streams open now",
            vec![(vec![], t.access_streams_active as f64)],
        );
        b.counter(
            "access_streams",
            "gatewayctl access streams opened",
            vec![(vec![], t.access_streams_total)],
        );
        if let Some(f) = &t.forward_filter {
            b.counter(
                "forward_filter_drops",
                "Packets the forward filter dropped, by what they tried",
                f.drops
                    .iter()
                    .map(|(k, v)| (labels(&[("reason", k)]), *v))
                    .collect(),
            );
        }
        for (name, help, get) in [
            (
                "dns_queries",
                "Queries for the zone",
                (|z: &crate::api::ZoneStatus| z.queries) as fn(&crate::api::ZoneStatus) -> u64,
            ),
            ("dns_answers", "Answers relayed for the zone", |z| z.answers),
            (
                "dns_failovers",
                "Times a query moved to the next resolver",
                |z| z.failovers,
            ),
            ("dns_servfails", "Queries no resolver answered", |z| {
                z.servfails
            }),
        ] {
            b.counter(
                name,
                help,
                t.zones
                    .iter()
                    .map(|z| (labels(&[("zone", &z.domain)]), get(z)))
                    .collect(),
            );
        }
        b.gauge(
            "dns_resolver_up",
            "1 when the resolver answers",
            t.zones
                .iter()
                .flat_map(|z| {
                    z.resolvers.iter().map(|r| {
                        (
                            labels(&[("zone", &z.domain), ("resolver", &r.address)]),
                            f64::from(u8::from(r.up)),
                        )
                    })
                })
                .collect(),
        );
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &b.registry).is_err() {
        out = "# encoding failed\n# EOF\n".into();
    }
    out
}

/// Prometheus asks for this in its Accept header; everything else (curl, older scrapers, the
/// node exporter's textfile collector) gets the classic text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The same metrics in the Prometheus text format 0.0.4. prometheus-client writes only
/// OpenMetrics, which differs in three places: a counter family is named without `_total`
/// there (its samples have it), `info` is a type of its own (a gauge of 1 here), and the text
/// ends with `# EOF`. Samples and label escaping are the same.
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gaugehistogram" | "stateset" | "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// What one request asks for, from its head (request line and headers).
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics { openmetrics: bool },
    NotFound,
    NotAllowed,
}

fn parse_request(head: &str) -> Asked {
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (request_line.next(), request_line.next().unwrap_or(""));
    // A query string (`?name[]=...` from some scrapers) does not change the answer.
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Asked::NotFound;
    }
    if method != Some("GET") {
        return Asked::NotAllowed;
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    });
    Asked::Metrics { openmetrics }
}

/// Scrapes served at once: Prometheus sends one at a time per target.
pub const MAX_CONNECTIONS: usize = 32;
/// Time for the request head to arrive, all of it: a scraper sends it at once.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Time for a whole exchange, the answer included.
pub const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest request head read; the rest is ignored.
const MAX_HEAD: usize = 4096;

/// Serves `GET /metrics` (anything else: 404 or 405) on `listener`, one snapshot per request.
/// Bounded as the status socket is (`server::Slots`): at most [`MAX_CONNECTIONS`] open, the
/// oldest closed for a new one, [`READ_TIMEOUT`] for the head and [`EXCHANGE_TIMEOUT`] in all.
pub async fn serve<F>(listener: tokio::net::TcpListener, snapshot: Arc<F>)
where
    F: Fn() -> Option<Status> + Send + Sync + 'static,
{
    let mut slots = crate::server::Slots::new(MAX_CONNECTIONS);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, usually: wait instead of spinning on the error.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let snapshot = snapshot.clone();
        let closed = slots.spawn(async move {
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, answer(stream, snapshot.as_ref())).await;
        });
        if closed > 0 {
            tracing::debug!(
                "metrics endpoint: {MAX_CONNECTIONS} connections open; closed the oldest"
            );
        }
    }
}

/// Reads one request head and answers it.
async fn answer<F>(mut stream: tokio::net::TcpStream, snapshot: &F)
where
    F: Fn() -> Option<Status>,
{
    let mut buf = vec![0u8; MAX_HEAD];
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    // The request line and headers; a scrape sends no body.
    while n < buf.len() {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            // Nothing whole in time: answer nothing.
            Err(_) => return,
            Ok(Ok(k)) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let (status, ctype, body) = match parse_request(&head) {
        Asked::Metrics { openmetrics } => match snapshot() {
            Some(s) if openmetrics => ("200 OK", OPENMETRICS, render(&s)),
            Some(s) => ("200 OK", TEXT_004, to_text_004(&render(&s))),
            None => (
                "500 Internal Server Error",
                "text/plain",
                "status unavailable\n".into(),
            ),
        },
        Asked::NotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
        Asked::NotFound => ("404 Not Found", "text/plain", "try /metrics\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_peers_and_zones_become_labelled_series() {
        let s = crate::api::tests::full_status();
        let text = render(&s);
        for line in [
            "gateway_route_packets_total{route=\"vpc\",cidr=\"10.128.0.0/16\"} 5",
            "gateway_route_bytes_total{route=\"vpc\",cidr=\"10.128.0.0/16\"} 420",
            "gateway_peer_rx_bytes_total{identity=\"ops-alice\",transport=\"tcp\"} 1200",
            "gateway_peer_policy_drops_total{identity=\"ops-alice\",transport=\"tcp\"} 3",
            "gateway_peer_rtt_seconds{identity=\"ops-alice\",transport=\"tcp\"} 0.0025",
            "gateway_tunnel_drops_total{reason=\"policy\"} 3",
            "gateway_dns_queries_total{zone=\"hoge-vpc.com\"} 7",
            "gateway_dns_resolver_up{zone=\"hoge-vpc.com\",resolver=\"10.128.0.61\"} 0.0",
            "gateway_access_streams_total 2",
            "gateway_forward_filter_drops_total{reason=\"into_vpc\"} 4",
            "gateway_program_attached{interface=\"lan0\",hook=\"tcx_ingress\"} 1.0",
            "gateway_program_attached{interface=\"wan0\",hook=\"tc_egress\"} 1.0",
            "gateway_build_info{version=\"0.1.0\",node=\"lab-op\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_classic_text_format_names_counters_with_total_and_has_no_eof() {
        let s = crate::api::tests::full_status();
        let open = render(&s);
        let text = to_text_004(&open);
        for line in [
            "# HELP gateway_route_packets_total Packets the eBPF classifier matched to each route.",
            "# TYPE gateway_route_packets_total counter",
            "gateway_route_packets_total{route=\"vpc\",cidr=\"10.128.0.0/16\"} 5",
            "# TYPE gateway_build_info gauge",
            "gateway_build_info{version=\"0.1.0\",node=\"lab-op\"} 1",
            "# TYPE gateway_uptime_seconds gauge",
            "# TYPE gateway_dns_resolver_up gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        assert!(!text.contains("# EOF"), "{text}");
        // Every sample line is kept as it was; only comments change.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(samples(&open), samples(&text));
        // Each family: HELP then TYPE, and its samples carry the TYPE line's name.
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or("").to_string();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&family), "{line} outside {family}");
            }
        }
    }

    /// A metrics endpoint on a loopback port, serving the test status.
    fn start() -> (tokio::runtime::Runtime, std::net::SocketAddr) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status = crate::api::tests::full_status();
        rt.spawn(serve(listener, Arc::new(move || Some(status.clone()))));
        (rt, addr)
    }

    fn scrape(addr: std::net::SocketAddr) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    #[test]
    fn scrapes_are_answered_while_five_hundred_idle_connections_are_open() {
        let (_rt, addr) = start();
        let idle: Vec<std::net::TcpStream> = (0..500)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let started = std::time::Instant::now();
        let answer = scrape(addr);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("gateway_peers 1"), "{answer}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // Most idle ones were closed by the server to make room: reading gives EOF at once.
        let closed = idle
            .iter()
            .filter(|s| {
                use std::io::Read;
                let mut s: &std::net::TcpStream = s;
                let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(20)));
                matches!(s.read(&mut [0u8; 1]), Ok(0))
            })
            .count();
        assert!(
            closed >= 500 - MAX_CONNECTIONS,
            "only {closed} idle connections were closed"
        );
    }

    #[test]
    fn a_head_that_trickles_in_is_cut_off_after_the_read_timeout() {
        use std::io::{Read, Write};
        let (_rt, addr) = start();
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(READ_TIMEOUT * 3)).expect("timeout");
        let started = std::time::Instant::now();
        // One byte every 300 ms: each read is quick, the head never completes.
        for b in b"GET /metr" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty(), "no answer to half a request");
        assert!(
            started.elapsed() < READ_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn requests_are_answered_by_path_method_and_accept_header() {
        assert_eq!(
            parse_request("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics { openmetrics: false }
        );
        assert_eq!(
            parse_request(
                "GET /metrics?name[]=up HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3\r\n\r\n"
            ),
            Asked::Metrics { openmetrics: true }
        );
        assert_eq!(
            parse_request("POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::NotAllowed
        );
        assert_eq!(parse_request("GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse_request(""), Asked::NotFound);
        assert_eq!(parse_request("\u{0}\u{ff}garbage"), Asked::NotFound);
    }
}
