//! Reachability probes with ICMP echo sockets (`SOCK_DGRAM`, `IPPROTO_ICMP`/`ICMPV6`): no raw
//! socket and no CAP_NET_RAW, only `net.ipv4.ping_group_range` covering the daemon's group (see
//! `pingrange`). The kernel fills in the identifier and checksum and hands back only the
//! replies to this socket; the probe matches the sequence number.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

static SEQ: AtomicU16 = AtomicU16::new(1);

/// An echo request: type 8 (v4) or 128 (v6), code 0, checksum and identifier left to the
/// kernel, then `seq`, then a short payload.
pub fn echo_request(v6: bool, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = if v6 { 128 } else { 8 };
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"gatewayd");
    p
}

/// The sequence number of an echo reply (type 0 or 129), `None` for anything else.
pub fn echo_reply_seq(v6: bool, msg: &[u8]) -> Option<u16> {
    let want = if v6 { 129 } else { 0 };
    if msg.len() < 8 || msg[0] != want || msg[1] != 0 {
        return None;
    }
    Some(u16::from_be_bytes([msg[6], msg[7]]))
}

/// One echo to `addr`; its round-trip time, or why there is none.
pub async fn echo(addr: IpAddr, timeout: Duration) -> anyhow::Result<Duration> {
    let (domain, proto) = match addr {
        IpAddr::V4(_) => (socket2::Domain::IPV4, socket2::Protocol::ICMPV4),
        IpAddr::V6(_) => (socket2::Domain::IPV6, socket2::Protocol::ICMPV6),
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(proto))
        .context("opening an ICMP echo socket (is net.ipv4.ping_group_range set?)")?;
    socket.set_nonblocking(true)?;
    // An ICMP datagram socket takes the same send/recv calls as a UDP one; tokio only needs a
    // pollable datagram fd.
    let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let v6 = addr.is_ipv6();
    let sent = Instant::now();
    socket
        .send_to(&echo_request(v6, seq), SocketAddr::new(addr, 0))
        .await
        .with_context(|| format!("sending an echo request to {addr}"))?;
    let mut buf = [0u8; 1500];
    tokio::time::timeout(timeout, async {
        loop {
            let (n, from) = socket.recv_from(&mut buf).await?;
            if from.ip() == addr && echo_reply_seq(v6, &buf[..n]) == Some(seq) {
                return anyhow::Ok(sent.elapsed());
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no echo reply from {addr} in {timeout:?}"))?
}

/// Fails fast with the reason when echo sockets cannot be opened at all.
pub fn check_possible() -> anyhow::Result<()> {
    if crate::pingrange::echo_socket_opens() {
        Ok(())
    } else {
        bail!("ICMP echo sockets are not permitted here (net.ipv4.ping_group_range)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_carry_the_sequence_number() {
        let r = echo_request(false, 0x1234);
        assert_eq!((r[0], r[1]), (8, 0));
        let mut reply = r;
        reply[0] = 0;
        assert_eq!(echo_reply_seq(false, &reply), Some(0x1234));
        assert_eq!(echo_reply_seq(false, &r), None, "a request is no reply");
        assert_eq!(echo_reply_seq(true, &reply), None, "v4 reply on a v6 probe");
        let mut v6 = echo_request(true, 7);
        assert_eq!(v6[0], 128);
        v6[0] = 129;
        assert_eq!(echo_reply_seq(true, &v6), Some(7));
        assert_eq!(echo_reply_seq(false, &[0, 0, 0]), None, "short");
    }
}
