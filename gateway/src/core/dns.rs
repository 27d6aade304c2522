//! DNS queries, just enough to steer them: the question's name and type, and whether the name
//! falls under a private zone.
//!
//! Written by hand rather than with a DNS crate because the eBPF classifier must apply exactly
//! the same rules in a verifier-friendly form (bounded loops, no compression in a question);
//! this is the reference those rules are tested against. Answers are relayed as bytes, not
//! parsed, except for the header fields the forwarder needs (id, rcode, truncation).

use super::checksum::{checksum, sum16};

/// Longest name on the wire (RFC 1035 2.3.4), labels and length bytes included.
pub const MAX_NAME: usize = 255;
/// Longest label.
pub const MAX_LABEL: usize = 63;
const HEADER: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than a header, or a question cut short.
    Truncated,
    /// Not a standard query with exactly one question.
    NotAQuery,
    /// A compression pointer in the question: legal in theory, never sent by resolvers, and
    /// the door to pointer loops.
    Compressed,
    LabelTooLong,
    NameTooLong,
    /// A label type that is neither a length nor a pointer (0x40, 0x80).
    BadLabel,
}

impl DnsError {
    pub const fn name(self) -> &'static str {
        match self {
            DnsError::Truncated => "truncated",
            DnsError::NotAQuery => "not_a_query",
            DnsError::Compressed => "compressed_question",
            DnsError::LabelTooLong => "label_too_long",
            DnsError::NameTooLong => "name_too_long",
            DnsError::BadLabel => "bad_label",
        }
    }
}

/// A parsed question. The name is kept in wire form (length-prefixed labels), lowercased, so
/// matching is byte comparison, as in the eBPF program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub name: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just past the question: where EDNS and other records start.
    pub question_end: usize,
}

impl Query {
    /// The name in dotted form, for logs and status.
    pub fn dotted(&self) -> String {
        dotted(&self.name)
    }
}

/// Parses a DNS query: a header with QR=0, OPCODE=0, QDCOUNT=1, then one question.
pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    if msg.len() < HEADER {
        return Err(DnsError::Truncated);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let is_response = msg[2] & 0x80 != 0;
    let opcode = (msg[2] >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if is_response || opcode != 0 || qdcount != 1 {
        return Err(DnsError::NotAQuery);
    }
    let (name, end) = parse_name(msg, HEADER)?;
    let fixed = msg.get(end..end + 4).ok_or(DnsError::Truncated)?;
    Ok(Query {
        id,
        name,
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
        question_end: end + 4,
    })
}

/// Reads an uncompressed name at `at`; returns it lowercased in wire form and the offset
/// after it. The loop is bounded by the name's maximum length.
pub fn parse_name(msg: &[u8], at: usize) -> Result<(Vec<u8>, usize), DnsError> {
    let mut name = Vec::with_capacity(32);
    let mut pos = at;
    loop {
        let len = *msg.get(pos).ok_or(DnsError::Truncated)?;
        match len & 0xc0 {
            0x00 => {}
            0xc0 => return Err(DnsError::Compressed),
            _ => return Err(DnsError::BadLabel),
        }
        let len = usize::from(len);
        if len > MAX_LABEL {
            return Err(DnsError::LabelTooLong);
        }
        if name.len() + 1 + len > MAX_NAME {
            return Err(DnsError::NameTooLong);
        }
        name.push(len as u8);
        if len == 0 {
            return Ok((name, pos + 1));
        }
        let label = msg.get(pos + 1..pos + 1 + len).ok_or(DnsError::Truncated)?;
        name.extend(label.iter().map(u8::to_ascii_lowercase));
        pos += 1 + len;
    }
}

/// A zone name ("hoge-vpc.com", trailing dot optional) in lowercase wire form.
pub fn wire_name(dotted: &str) -> Result<Vec<u8>, DnsError> {
    let trimmed = dotted.trim_end_matches('.');
    let mut out = Vec::with_capacity(trimmed.len() + 2);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() {
                return Err(DnsError::BadLabel);
            }
            if label.len() > MAX_LABEL {
                return Err(DnsError::LabelTooLong);
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    if out.len() > MAX_NAME {
        return Err(DnsError::NameTooLong);
    }
    Ok(out)
}

/// Whether wire name `name` is `zone` or under it, on label boundaries: `db.hoge-vpc.com` and
/// `hoge-vpc.com` are in `hoge-vpc.com`; `xhoge-vpc.com` is not. Both lowercased wire form.
pub fn in_zone(name: &[u8], zone: &[u8]) -> bool {
    if zone.len() > name.len() {
        return false;
    }
    // Walk label starts of `name`; the suffix must begin exactly at one of them.
    let start = name.len() - zone.len();
    let mut pos = 0;
    while pos < start {
        pos += 1 + usize::from(name[pos]);
    }
    pos == start && &name[start..] == zone
}

/// The zone with the longest match for `name`, as an index into `zones`.
pub fn matching_zone(name: &[u8], zones: &[Vec<u8>]) -> Option<usize> {
    zones
        .iter()
        .enumerate()
        .filter(|(_, z)| in_zone(name, z))
        .max_by_key(|(_, z)| z.len())
        .map(|(i, _)| i)
}

pub fn dotted(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while let Some(&len) = wire.get(pos) {
        if len == 0 {
            break;
        }
        let label = wire.get(pos + 1..pos + 1 + usize::from(len)).unwrap_or(&[]);
        out.push_str(&String::from_utf8_lossy(label));
        out.push('.');
        pos += 1 + usize::from(len);
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// RCODE of a response, or `None` if `msg` is not one.
pub fn response_rcode(msg: &[u8]) -> Option<u8> {
    (msg.len() >= HEADER && msg[2] & 0x80 != 0).then(|| msg[3] & 0x0f)
}

/// Whether a response has TC set: the answer did not fit and must be asked again over TCP.
pub fn truncated(msg: &[u8]) -> bool {
    msg.len() >= HEADER && msg[2] & 0x02 != 0
}

pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_REFUSED: u8 = 5;

/// A query for `name` (dotted) with type A, as dig sends it (without EDNS): the one the
/// tests of every DNS path ask.
#[cfg(test)]
pub fn test_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&[0, 1, 0, 1]);
    m
}

#[cfg(test)]
mod tests {
    use super::test_query as query;
    use super::*;

    #[test]
    fn parses_a_query_lowercasing_the_name() {
        let q = parse_query(&query(0xbeef, "DB.Hoge-VPC.com")).expect("query");
        assert_eq!(q.id, 0xbeef);
        assert_eq!(q.dotted(), "db.hoge-vpc.com.");
        assert_eq!((q.qtype, q.qclass), (1, 1));
        assert_eq!(q.question_end, query(0, "DB.Hoge-VPC.com").len());
    }

    #[test]
    fn suffix_matching_respects_label_boundaries() {
        let zone = wire_name("hoge-vpc.com.").expect("zone");
        let name = |s: &str| wire_name(s).expect("name");
        assert!(in_zone(&name("db.hoge-vpc.com"), &zone));
        assert!(in_zone(&name("a.b.c.hoge-vpc.com"), &zone));
        assert!(in_zone(&name("hoge-vpc.com"), &zone));
        assert!(!in_zone(&name("xhoge-vpc.com"), &zone));
        assert!(!in_zone(&name("hoge-vpc.com.evil.net"), &zone));
        assert!(!in_zone(&name("com"), &zone));
        // One label whose bytes spell the zone in wire form: the bytes match, the boundary
        // does not.
        let mut tricky = vec![14, b'x'];
        tricky.extend_from_slice(&zone[..13]);
        tricky.push(0);
        assert!(tricky.ends_with(&zone));
        assert!(!in_zone(&tricky, &zone));
    }

    #[test]
    fn longest_zone_wins() {
        let zones = vec![
            wire_name("hoge-vpc.com").expect("zone"),
            wire_name("prod.hoge-vpc.com").expect("zone"),
        ];
        let name = wire_name("db.prod.hoge-vpc.com").expect("name");
        assert_eq!(matching_zone(&name, &zones), Some(1));
        let other = wire_name("www.example.com").expect("name");
        assert_eq!(matching_zone(&other, &zones), None);
    }

    #[test]
    fn rejects_malformed_compressed_and_over_long_names() {
        assert_eq!(parse_query(&[0; 11]), Err(DnsError::Truncated));
        let mut resp = query(1, "a.com");
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(DnsError::NotAQuery));
        let mut two = query(1, "a.com");
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(DnsError::NotAQuery));
        // A pointer to itself: a loop if followed.
        let mut looped = query(1, "");
        looped.truncate(12);
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&looped), Err(DnsError::Compressed));
        // On the wire a 64-byte label is not even a length: 0x40 is an extended label type.
        let long_label = "a".repeat(64);
        assert_eq!(
            parse_query(&query(1, &format!("{long_label}.com"))),
            Err(DnsError::BadLabel)
        );
        assert_eq!(
            wire_name(&format!("{long_label}.com")),
            Err(DnsError::LabelTooLong)
        );
        let long_name = vec!["abcdefghij"; 25].join(".");
        assert_eq!(
            parse_query(&query(1, &long_name)),
            Err(DnsError::NameTooLong)
        );
        let mut cut = query(1, "db.hoge-vpc.com");
        cut.truncate(20);
        assert_eq!(parse_query(&cut), Err(DnsError::Truncated));
        let mut bad = query(1, "a.com");
        bad[12] = 0x41;
        assert_eq!(parse_query(&bad), Err(DnsError::BadLabel));
        assert_eq!(wire_name("a..com"), Err(DnsError::BadLabel));
    }

    #[test]
    fn reads_response_header_fields() {
        let mut r = query(7, "a.com");
        r[2] |= 0x80 | 0x02;
        r[3] = RCODE_SERVFAIL;
        assert_eq!(response_rcode(&r), Some(RCODE_SERVFAIL));
        assert!(truncated(&r));
        assert_eq!(response_rcode(&query(7, "a.com")), None);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut x: u32 = 0x9e37_79b9;
        let mut buf = [0u8; 300];
        for _ in 0..20_000 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = (x % 70) as u8; // small bytes: plausible label lengths
            }
            buf[2] = 0x01;
            buf[4] = 0;
            buf[5] = 1;
            let len = (x as usize) % buf.len();
            let _ = parse_query(&buf[..len]);
            let z = wire_name("hoge-vpc.com").expect("zone");
            let _ = in_zone(&buf[12..len.max(12)], &z);
        }
    }
}

/// The DNS message inside an IP/UDP packet to port 53, with the packet's header length.
pub fn udp_query(pkt: &[u8]) -> Option<(&[u8], usize)> {
    let meta = super::packet::parse(pkt).ok()?;
    if meta.proto != super::packet::PROTO_UDP || meta.dst_port != Some(53) {
        return None;
    }
    let l4 = match pkt.first()? >> 4 {
        4 => usize::from(pkt[0] & 0x0f) * 4,
        // Only a UDP header right after the fixed IPv6 header; parse() found UDP there or
        // behind extension headers, which queries do not carry in practice.
        6 if pkt.get(6) == Some(&super::packet::PROTO_UDP) => 40,
        _ => return None,
    };
    let payload = pkt.get(l4 + 8..)?;
    Some((payload, l4 + 8))
}

/// The answer to `query` (an IP/UDP packet), as the resolver it was sent to would have sent
/// it: addresses and ports swapped, lengths and checksums computed.
pub fn udp_reply(query: &[u8], answer: &[u8]) -> Option<Vec<u8>> {
    let (_, header_len) = udp_query(query)?;
    let l4 = header_len - 8;
    let udp_len = 8 + answer.len();
    let mut out = Vec::with_capacity(l4 + udp_len);
    out.extend_from_slice(&query[..l4]);
    let v4 = out[0] >> 4 == 4;
    if v4 {
        out.truncate(20); // no options in our reply
        out[0] = 0x45;
        let total = u16::try_from(20 + udp_len).ok()?;
        out[2..4].copy_from_slice(&total.to_be_bytes());
        out[6] = 0x40;
        out[7] = 0;
        out[8] = 64;
        let (src, dst) = (query[12..16].to_vec(), query[16..20].to_vec());
        out[12..16].copy_from_slice(&dst);
        out[16..20].copy_from_slice(&src);
        out[10..12].fill(0);
        let sum = checksum(&out[..20], 0);
        out[10..12].copy_from_slice(&sum.to_be_bytes());
    } else {
        out.truncate(40);
        out[4..6].copy_from_slice(&u16::try_from(udp_len).ok()?.to_be_bytes());
        out[6] = super::packet::PROTO_UDP;
        out[7] = 64;
        let (src, dst) = (query[8..24].to_vec(), query[24..40].to_vec());
        out[8..24].copy_from_slice(&dst);
        out[24..40].copy_from_slice(&src);
    }
    let ip_len = out.len();
    let ports = query.get(l4..l4 + 4)?;
    out.extend_from_slice(&ports[2..4]); // from port 53
    out.extend_from_slice(&ports[0..2]); // to the asking port
    out.extend_from_slice(&u16::try_from(udp_len).ok()?.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(answer);
    // Pseudo-header: source, destination, protocol, UDP length.
    let addrs = if v4 { &out[12..20] } else { &out[8..40] };
    let mut pseudo = sum16(addrs);
    pseudo += u32::from(super::packet::PROTO_UDP) + udp_len as u32;
    let mut sum = checksum(&out[ip_len..], pseudo);
    if sum == 0 {
        sum = 0xffff; // 0 means "no checksum" in UDP
    }
    out[ip_len + 6..ip_len + 8].copy_from_slice(&sum.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod udp_tests {
    use super::*;
    use crate::core::packet::{self, PROTO_UDP, tests as p};

    fn udp_to_53(payload: &[u8]) -> Vec<u8> {
        let mut udp = vec![0xc3, 0x50, 0, 53];
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        p::v4(PROTO_UDP, [198, 51, 100, 10], [198, 51, 100, 53], &udp)
    }

    #[test]
    fn reply_comes_from_the_resolver_asked_with_valid_checksums() {
        let q = udp_to_53(b"query-bytes!");
        let (msg, _) = udp_query(&q).expect("a DNS query");
        assert_eq!(msg, b"query-bytes!");
        let r = udp_reply(&q, b"answer").expect("reply");
        let m = packet::parse(&r).expect("valid packet");
        assert_eq!(m.src.to_string(), "198.51.100.53");
        assert_eq!(m.dst.to_string(), "198.51.100.10");
        assert_eq!(&r[20..22], &53u16.to_be_bytes());
        assert_eq!(&r[22..24], &[0xc3, 0x50]);
        assert_eq!(&r[28..], b"answer");
        assert_eq!(checksum(&r[..20], 0), 0, "IP header checksum");
        let pseudo = sum16(&r[12..20]) + u32::from(PROTO_UDP) + (r.len() - 20) as u32;
        assert_eq!(checksum(&r[20..], pseudo), 0, "UDP checksum");
    }

    #[test]
    fn only_udp_to_port_53_is_a_query() {
        assert!(
            udp_query(&p::v4(
                17,
                [1, 1, 1, 1],
                [2, 2, 2, 2],
                &[0, 1, 0, 54, 0, 8, 0, 0]
            ))
            .is_none()
        );
        assert!(udp_query(&p::v4(6, [1, 1, 1, 1], [2, 2, 2, 2], &p::tcp_to(53))).is_none());
        assert!(udp_query(&[0x45]).is_none());
    }
}
