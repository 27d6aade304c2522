//! A hostile peer: a small client of the TLS-over-TCP frame protocol, built from the crate's
//! own modules (`core::frame`, `tunnel::control`, `tunnel::tls`) with a certificate from the
//! lab's CA, that sends whatever a test asks instead of what gatewayd would. Everything runs on
//! a thread that entered the operator host's network namespace, on a small tokio runtime, and
//! is bounded in time by the caller.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use gateway::config::TlsPaths;
use gateway::core::frame::{self, FrameType};
use gateway::tunnel::control::{self, Control, PROTOCOL_VERSION};
use gateway::tunnel::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Where the hostile peer connects, and as whom.
#[derive(Clone)]
pub struct Target {
    /// The network namespace it runs in (`/var/run/netns/NAME`).
    pub ns: String,
    pub addr: SocketAddr,
    pub paths: TlsPaths,
}

impl Target {
    pub fn new(ns: String, addr: SocketAddr, pki: &Path, name: &str) -> Target {
        Target {
            ns,
            addr,
            paths: TlsPaths {
                ca: pki.join("ca.pem"),
                cert: pki.join(format!("{name}.pem")),
                key: pki.join(format!("{name}.key")),
                crl: None,
            },
        }
    }
}

/// Runs `f` on a new thread inside namespace `ns`, on a current-thread runtime, and waits
/// for it. Sockets opened there belong to that namespace.
pub fn in_ns<T, F>(ns: &str, f: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    spawn_in_ns(ns, f).join().expect("hostile peer thread")
}

/// [`in_ns`] without waiting.
pub fn spawn_in_ns<T, F>(
    ns: &str,
    f: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

/// A TLS-over-TCP connection to the connector with `alpn`.
pub async fn connect(t: &Target, alpn: &[u8]) -> anyhow::Result<TlsStream<TcpStream>> {
    let config = tls::rustls_client(&t.paths, alpn)?;
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(t.addr))
        .await
        .context("TCP connect timed out")??;
    let name = rustls_pki_types::ServerName::try_from("lab-gw")?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(config).connect(name, stream),
    )
    .await
    .context("TLS handshake timed out")??;
    Ok(tls)
}

/// What keeps a QUIC session open: its endpoint, connection and control stream.
pub type QuicSession = (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
);

/// A session over QUIC, as gatewayd opens it: the hello on the control stream, the first
/// control message back, and the session, still open.
pub async fn open_quic_session(
    t: &Target,
    hello: &Control,
) -> anyhow::Result<(Control, QuicSession)> {
    let config = quinn::ClientConfig::new(std::sync::Arc::new(tls::client_config(
        &t.paths,
        tls::ALPN,
    )?));
    let ep = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect_with(config, t.addr, "lab-gw")?,
    )
    .await
    .context("QUIC handshake timed out")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    control::send(&mut send, hello).await?;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        control::recv(&mut recv, control::MAX_MESSAGE),
    )
    .await
    .context("no answer to the hello")??;
    Ok((answer, (ep, conn, send, recv)))
}

/// One frame as it goes on the wire; `len` may lie about the payload that follows.
pub fn raw_frame(kind: u8, len: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn frame_of(kind: FrameType, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    frame::encode(kind, payload, &mut f).expect("payload fits a frame");
    f
}

pub fn hello(advertise: &[&str], transport_reason: Option<String>) -> Control {
    Control::Hello {
        version: PROTOCOL_VERSION,
        node: "ops-mallory".into(),
        software: None,
        advertise: advertise
            .iter()
            .map(|a| a.parse().expect("prefix"))
            .collect(),
        transport_reason,
    }
}

/// Reads frames until a Control one and decodes it.
pub async fn read_control(tls: &mut TlsStream<TcpStream>) -> anyhow::Result<Control> {
    let mut decoder = frame::Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Some((kind, payload)) = decoder.next_frame().map_err(|e| anyhow!("{e}"))? {
            if kind == FrameType::Control {
                return Ok(control::decode(&payload)?);
            }
        }
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            bail!("the connector closed the connection");
        }
        decoder.push(&buf[..n]);
    }
}

/// A session: the hello sent, the first control message back (a welcome or a refusal), and
/// the connection, still open.
pub async fn open_session(
    t: &Target,
    hello: &Control,
) -> anyhow::Result<(Control, TlsStream<TcpStream>)> {
    let mut tls = connect(t, tls::ALPN).await?;
    let body = control::encode_body(hello)?;
    tls.write_all(&frame_of(FrameType::Control, &body)).await?;
    tls.flush().await?;
    let answer = tokio::time::timeout(Duration::from_secs(10), read_control(&mut tls))
        .await
        .context("no answer to the hello")??;
    Ok((answer, tls))
}

/// The connector's answer to a hello with these prefixes (the connection is closed after).
pub async fn advertise(t: &Target, prefixes: &[&str]) -> anyhow::Result<Control> {
    let (answer, mut tls) = open_session(t, &hello(prefixes, None)).await?;
    let _ = tls.shutdown().await;
    Ok(answer)
}

/// A `gatewayctl access` request for `host`, the connector's answer (or why there is none).
pub async fn access(t: &Target, host: &str) -> anyhow::Result<Control> {
    let mut tls = connect(t, tls::ALPN_ACCESS).await?;
    let open = Control::Open {
        version: PROTOCOL_VERSION,
        host: host.to_string(),
        port: 22,
    };
    control::send_io(&mut tls, &open).await?;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        control::recv_io(&mut tls, control::MAX_MESSAGE),
    )
    .await
    .context("no answer to the access request")??;
    Ok(answer)
}

/// A DNS query for `name` (dotted), type A, as a stub sends it.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(u8::try_from(label.len()).expect("short label"));
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// Keeps a session's counterpart alive: answers nothing, reads and drops what comes.
pub fn drain(mut r: tokio::io::ReadHalf<TlsStream<TcpStream>>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    })
}
