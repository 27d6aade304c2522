//! `gatewayctl access`: one byte stream to a VPC host through the connector, for a user with
//! no TUN, no routes and no root (an ssh `ProxyCommand`, or a local TCP forward).
//!
//! The client opens a connection with its own ALPN ([`tls::ALPN_ACCESS`]), over QUIC or, when
//! QUIC gets no handshake, TLS over TCP — the same certificates and the same policy as the
//! tunnel. It sends one [`Control::Open`]; the connector resolves the host (an address, or a
//! name under one of its private zones), checks the identity's policy for `tcp/PORT`, connects
//! from the pinned egress range, answers [`Control::Opened`] or [`Control::Refused`], and then
//! copies bytes both ways. With `[tunnel] group` the targets are hubs: the same request rides
//! an end-to-end QUIC session through the hub (its outer link QUIC, else TLS over TCP), as the
//! tunnel's does.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncRead, AsyncWrite};

use super::control::{self, Control, PROTOCOL_VERSION};
use super::tls;
use crate::config::{Role, Transport, Tunnel};
use crate::core::packet::{PROTO_TCP, PacketMeta};
use crate::core::policy::{Decision, Policy};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// An open stream and what keeps it alive (the QUIC endpoint and connection).
pub struct Stream {
    pub reader: Reader,
    pub writer: Writer,
    /// Where the connector connected.
    pub address: SocketAddr,
    /// `quic` or `tcp`.
    pub transport: &'static str,
    _keep: Option<(quinn::Endpoint, quinn::Connection)>,
}

/// Closes a QUIC access connection explicitly and lets the close go out, so the connector
/// ends the stream now rather than after its idle timeout.
async fn close_quic(keep: Option<(quinn::Endpoint, quinn::Connection)>) {
    if let Some((endpoint, conn)) = keep {
        conn.close(quinn::VarInt::from_u32(0), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    }
}

/// Opens a stream to `host:port` through the connector `cfg` names (a client config).
pub async fn open(cfg: &Tunnel, host: &str, port: u16) -> anyhow::Result<Stream> {
    let Role::Client {
        connect,
        server_name,
        ..
    } = &cfg.role
    else {
        bail!("this config is a connector's; access needs a client config ([tunnel] connect)");
    };
    let mut errors = Vec::new();
    for target in connect {
        let addr = match tokio::net::lookup_host(target).await {
            Ok(mut a) => match a.next() {
                Some(a) => a,
                None => {
                    errors.push(format!("{target}: resolves to nothing"));
                    continue;
                }
            },
            Err(e) => {
                errors.push(format!("{target}: {e}"));
                continue;
            }
        };
        let quic_timeout = match cfg.transport {
            Transport::Auto => cfg.quic_timeout,
            _ => HANDSHAKE_TIMEOUT,
        };
        if let Some(group) = &cfg.group {
            match open_via_hub(cfg, group, server_name, target, addr, quic_timeout).await {
                Ok((r, w, keep, transport)) => {
                    return request(server_name, r, w, Some(keep), transport, host, port).await;
                }
                Err(e) => {
                    errors.push(format!("{target} (hub): {e:#}"));
                    continue;
                }
            }
        }
        let quic = if cfg.transport.uses_quic() {
            match open_quic(cfg, server_name, addr, quic_timeout).await {
                Ok((r, w, keep)) => Some((r, w, Some(keep), "quic")),
                Err(e) => {
                    errors.push(format!("{target} (QUIC): {e:#}"));
                    None
                }
            }
        } else {
            None
        };
        let opened = match quic {
            Some(o) => Some(o),
            None if cfg.transport.uses_tcp() => {
                let tcp = SocketAddr::new(addr.ip(), cfg.fallback_port.unwrap_or(addr.port()));
                match open_tcp(cfg, server_name, tcp).await {
                    Ok((r, w)) => Some((r, w, None, "tcp")),
                    Err(e) => {
                        errors.push(format!("{target} (TCP): {e:#}"));
                        None
                    }
                }
            }
            None => None,
        };
        let Some((reader, writer, keep, transport)) = opened else {
            continue;
        };
        return request(server_name, reader, writer, keep, transport, host, port).await;
    }
    Err(anyhow!("no connector reachable: {}", errors.join("; ")))
}

/// Asks the connector for `host:port` on an open access connection; the stream on `Opened`.
async fn request(
    server_name: &str,
    mut reader: Reader,
    mut writer: Writer,
    keep: Option<(quinn::Endpoint, quinn::Connection)>,
    transport: &'static str,
    host: &str,
    port: u16,
) -> anyhow::Result<Stream> {
    let open = Control::Open {
        version: PROTOCOL_VERSION,
        host: host.to_string(),
        port,
    };
    control::send_io(&mut writer, &open).await?;
    let answer = tokio::time::timeout(
        HANDSHAKE_TIMEOUT * 2,
        control::recv_io(&mut reader, control::MAX_MESSAGE),
    )
    .await
    .map_err(|_| anyhow!("{server_name} did not answer the request"))??;
    match answer {
        Control::Opened { address } => Ok(Stream {
            reader,
            writer,
            address,
            transport,
            _keep: keep,
        }),
        Control::Refused { reason } => Err(anyhow!("refused by {server_name}: {reason}")),
        other => Err(anyhow!("unexpected answer from {server_name}: {other:?}")),
    }
}

/// An access connection through the hub at `target`: its outer link over QUIC within
/// `quic_timeout` when the config allows, else TLS over TCP; inside, the end-to-end session
/// with ALPN access. Kept: the outer endpoint, and the inner connection to close.
async fn open_via_hub(
    cfg: &Tunnel,
    group: &str,
    server_name: &str,
    target: &str,
    addr: SocketAddr,
    quic_timeout: Duration,
) -> anyhow::Result<(
    Reader,
    Writer,
    (quinn::Endpoint, quinn::Connection),
    &'static str,
)> {
    use super::hub_dial::{From, ViaHub};
    use crate::node::LinkKind;
    let trust = tls::Trust::load(&cfg.tls)?;
    let via = ViaHub::new(
        &trust,
        &cfg.tls,
        group,
        tls::ALPN_ACCESS,
        quinn::TransportConfig::default(),
    )?;
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let endpoint = quinn::Endpoint::client(bind).context("binding a UDP socket")?;
    let from = From {
        endpoint: cfg.transport.uses_quic().then_some(&endpoint),
        server_name,
        // An unprivileged user's stream: any source port, as a direct access stream has.
        source_port: 0,
        fallback_port: cfg.fallback_port,
        raw: None,
    };
    let mut errors = Vec::new();
    let mut plan = Vec::new();
    if cfg.transport.uses_quic() {
        plan.push((LinkKind::Quic, quic_timeout));
    }
    if cfg.transport.uses_tcp() {
        plan.push((LinkKind::Tcp, HANDSHAKE_TIMEOUT * 2));
    }
    for (kind, within) in plan {
        let session = tokio::time::timeout(within, async {
            let conn = via.session(&from, target, addr, kind).await?;
            let (send, recv) = conn.open_bi().await?;
            anyhow::Ok((conn, send, recv))
        })
        .await;
        match session {
            Ok(Ok((conn, send, recv))) => {
                let reader: Reader = Box::pin(recv);
                let writer: Writer = Box::pin(send);
                return Ok((reader, writer, (endpoint, conn), kind.name()));
            }
            Ok(Err(e)) => errors.push(format!("{}: {e:#}", kind.name())),
            Err(_) => errors.push(format!("{}: no session in {within:?}", kind.name())),
        }
    }
    Err(anyhow!("{}", errors.join("; ")))
}

async fn open_quic(
    cfg: &Tunnel,
    server_name: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<(Reader, Writer, (quinn::Endpoint, quinn::Connection))> {
    let crypto = tls::client_config(&cfg.tls, tls::ALPN_ACCESS)?;
    let client = quinn::ClientConfig::new(Arc::new(crypto));
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint = quinn::Endpoint::client(bind).context("binding a UDP socket")?;
    endpoint.set_default_client_config(client);
    let (conn, send, recv) = tokio::time::timeout(timeout, async {
        let conn = endpoint.connect(addr, server_name)?.await?;
        let (send, recv) = conn.open_bi().await?;
        anyhow::Ok((conn, send, recv))
    })
    .await
    .map_err(|_| anyhow!("no QUIC handshake in {timeout:?}"))??;
    Ok((Box::pin(recv), Box::pin(send), (endpoint, conn)))
}

async fn open_tcp(
    cfg: &Tunnel,
    server_name: &str,
    addr: SocketAddr,
) -> anyhow::Result<(Reader, Writer)> {
    let config = tls::rustls_client(&cfg.tls, tls::ALPN_ACCESS)?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| anyhow!("server_name {server_name:?}: {e}"))?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .with_context(|| format!("TLS over TCP to {addr}"))
    })
    .await
    .map_err(|_| anyhow!("no TCP+TLS handshake with {addr} in {HANDSHAKE_TIMEOUT:?}"))??;
    let (r, w) = tokio::io::split(tls);
    Ok((Box::pin(r), Box::pin(w)))
}

/// `gatewayctl access ssh`: the stream on stdin/stdout, for ssh's `ProxyCommand`. Returns when
/// the far end closes; stdin's end is passed on as a half-close.
pub async fn stdio(cfg: &Tunnel, host: &str, port: u16) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let Stream {
        mut reader,
        mut writer,
        _keep: keep,
        ..
    } = open(cfg, host, port).await?;
    let upload = async {
        let mut stdin = tokio::io::stdin();
        tokio::io::copy(&mut stdin, &mut writer).await?;
        writer.shutdown().await?;
        std::future::pending::<anyhow::Result<()>>().await
    };
    let download = async {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut reader, &mut stdout).await?;
        stdout.flush().await?;
        anyhow::Ok(())
    };
    // ssh sends its ProxyCommand SIGHUP when the session ends: that too ends the stream, with
    // a close the connector sees at once.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let result = tokio::select! {
        r = upload => r,
        r = download => r,
        _ = hup.recv() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    close_quic(keep).await;
    result
}

/// `gatewayctl access tcp`: every connection to `listen` gets its own stream to `host:port`.
pub async fn forward(
    cfg: Tunnel,
    listen: SocketAddr,
    host: String,
    port: u16,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!(
        "gatewayctl: forwarding {} to {host}:{port} through the connector",
        listener.local_addr().unwrap_or(listen)
    );
    let cfg = Arc::new(cfg);
    let host: Arc<str> = host.into();
    loop {
        let (mut local, from) = listener.accept().await?;
        let (cfg, host) = (cfg.clone(), host.clone());
        tokio::spawn(async move {
            match open(&cfg, &host, port).await {
                Ok(stream) => {
                    let Stream {
                        reader,
                        writer,
                        _keep: keep,
                        ..
                    } = stream;
                    let mut remote = tokio::io::join(reader, writer);
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                    close_quic(keep).await;
                }
                Err(e) => eprintln!("gatewayctl: {from}: {e:#}"),
            }
        });
    }
}

/// The connector's decision on an access request: policy for `identity` to `address` tcp/port.
pub fn allowed(policy: &Policy, identity: &str, address: IpAddr, port: u16) -> Result<(), String> {
    let meta = PacketMeta {
        src: match address {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        },
        dst: address,
        proto: PROTO_TCP,
        dst_port: Some(port),
        src_port: None,
        later_fragment: false,
    };
    match policy.decide(identity, &meta) {
        Decision::Allow => Ok(()),
        // An answer's shape opens nothing.
        Decision::DenyNoRule | Decision::AllowReply => Err(format!(
            "policy: {identity} may not reach {address} tcp/{port}"
        )),
        Decision::DenyUnknownIdentity => {
            Err(format!("no [[policy]] entry matches identity {identity:?}"))
        }
    }
}

/// A DNS query for `name` and `qtype` (A or AAAA), in wire form.
pub fn address_query(name: &str, aaaa: bool) -> anyhow::Result<Vec<u8>> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let name = Name::from_ascii(name).map_err(|e| anyhow!("{name:?} is not a host name: {e}"))?;
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        name,
        if aaaa {
            RecordType::AAAA
        } else {
            RecordType::A
        },
    ));
    m.to_vec().map_err(|e| anyhow!("encoding a query: {e}"))
}

/// The addresses in an answer (A and AAAA records of the answer section, CNAME targets included
/// as the resolver returned them).
pub fn answer_addresses(answer: &[u8]) -> Vec<IpAddr> {
    use hickory_proto::rr::RData;
    use hickory_proto::serialize::binary::BinDecodable;
    let Ok(m) = hickory_proto::op::Message::from_bytes(answer) else {
        return Vec::new();
    };
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_decides_access_like_a_tcp_syn() {
        let p = Policy::from_entries(vec![crate::core::policy::Entry {
            identity: "ops-*".into(),
            rules: vec![crate::core::policy::Rule::parse("10.128.0.0/16 tcp/22").expect("rule")],
            inbound: vec![],
        }]);
        let host: IpAddr = "10.128.0.10".parse().expect("ip");
        assert_eq!(allowed(&p, "ops-alice", host, 22), Ok(()));
        assert!(
            allowed(&p, "ops-alice", host, 5432)
                .expect_err("no rule")
                .contains("tcp/5432")
        );
        assert!(
            allowed(&p, "dev-bob", host, 22)
                .expect_err("unknown")
                .contains("no [[policy]]")
        );
    }

    #[test]
    fn queries_and_answers_round_trip_through_the_wire_format() {
        use hickory_proto::op::Message;
        use hickory_proto::rr::{Name, RData, Record, rdata};
        use hickory_proto::serialize::binary::BinDecodable;
        let q = address_query("ssh.hoge-vpc.com", false).expect("query");
        let parsed = crate::core::dns::parse_query(&q).expect("our own parser reads it");
        assert_eq!(parsed.dotted(), "ssh.hoge-vpc.com.");
        assert_eq!(parsed.qtype, 1);
        let mut answer = Message::from_bytes(&q).expect("parse");
        let name = Name::from_ascii("ssh.hoge-vpc.com.").expect("name");
        answer.add_answer(Record::from_rdata(
            name.clone(),
            60,
            RData::CNAME(rdata::CNAME(
                Name::from_ascii("host.hoge-vpc.com.").expect("n"),
            )),
        ));
        answer.add_answer(Record::from_rdata(
            name,
            60,
            RData::A(rdata::A(Ipv4Addr::new(10, 128, 0, 10))),
        ));
        let wire = answer.to_vec().expect("encode");
        assert_eq!(
            answer_addresses(&wire),
            ["10.128.0.10".parse::<IpAddr>().expect("ip")]
        );
        assert!(answer_addresses(b"\x00\x01garbage").is_empty());
        assert!(address_query("bad name..", false).is_err());
    }
}
