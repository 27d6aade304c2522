//! Reads the daemon's nftables table back from the kernel: the packet counters of the forward
//! filter's named rules, which `gatewayctl status` shows as the kernel has them now.
//!
//! One rule dump (`NFT_MSG_GETRULE`) of the table; each rule's comment (its user data) names
//! it and its `counter` expression carries the count. The netlink attributes are parsed here,
//! bounds-checked, without libnftnl.

use std::collections::BTreeMap;
use std::io;

use super::filter::counter;
use crate::api::ForwardFilterStatus;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWRULE: u16 = 6;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NFPROTO_INET: u8 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// libnftnl's user-data TLV type for a rule comment.
const UDATA_RULE_COMMENT: u8 = 0;
const NLA_TYPE_MASK: u16 = 0x3fff;
const HEADER: usize = 16;
const NFGENMSG: usize = 4;

/// `name → packets`, summed over the rules with that comment, for every counted rule of
/// `table` (family inet).
pub fn counters(table: &str) -> io::Result<BTreeMap<String, u64>> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    let seq = 1;
    socket.send(&dump_request(table, seq))?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut out = BTreeMap::new();
    loop {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            match mnl::cb_run(message, seq, portid)? {
                mnl::CbResult::Stop => return Ok(out),
                mnl::CbResult::Ok => {
                    if let Some((name, packets)) = counted_rule(message) {
                        *out.entry(name).or_default() += packets;
                    }
                }
            }
        }
    }
}

/// The firewall line of `gatewayctl status` (`holds`: what the table was made to hold) and the
/// forward filter's counters, both as the kernel has them now.
pub fn firewall_status(table: &str, holds: &str) -> (String, Option<ForwardFilterStatus>) {
    match super::nat::table_exists(table) {
        Ok(true) => {}
        Ok(false) => {
            return (
                format!(
                    "nftables table inet {table} MISSING (removed by someone else?): restart gatewayd to restore {holds}"
                ),
                None,
            );
        }
        Err(e) => {
            return (
                format!("nftables table inet {table}: cannot ask the kernel: {e}"),
                None,
            );
        }
    }
    let line = format!("nftables table inet {table} present: {holds}");
    match counters(table) {
        Ok(c) => {
            let status = ForwardFilterStatus {
                table: table.into(),
                drops: counter::DROPS
                    .iter()
                    .filter_map(|n| c.get(*n).map(|v| (n.to_string(), *v)))
                    .collect(),
                inbound_accepted: c.get(counter::INBOUND).copied().unwrap_or(0),
            };
            let drops: Vec<String> = status
                .drops
                .iter()
                .map(|(n, v)| format!("{n} {v}"))
                .collect();
            let mut line = format!("{line}; forward filter dropped {}", drops.join(", "));
            if status.inbound_accepted > 0 {
                line.push_str(&format!(
                    "; inbound connections accepted {}",
                    status.inbound_accepted
                ));
            }
            (line, Some(status))
        }
        Err(e) => (
            format!("{line}; forward filter counters: cannot ask the kernel: {e}"),
            None,
        ),
    }
}

/// A dump request for every rule of one inet table.
fn dump_request(table: &str, seq: u32) -> Vec<u8> {
    let attr_len = 4 + table.len() + 1;
    let total = HEADER + NFGENMSG + attr_len.div_ceil(4) * 4;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&NFTA_RULE_TABLE.to_ne_bytes());
    m.extend_from_slice(table.as_bytes());
    m.resize(total, 0);
    m
}

/// Netlink attributes in `b`: (type, payload), stopping at the first malformed one.
fn attributes(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = b;
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*rest.first()?, *rest.get(1)?]));
        let kind = u16::from_ne_bytes([*rest.get(2)?, *rest.get(3)?]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        let payload = &rest[4..len];
        rest = rest.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

fn attr(b: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(b).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// The comment and counted packets of one `NEWRULE` message, if it has both.
fn counted_rule(message: &[u8]) -> Option<(String, u64)> {
    let kind = u16::from_ne_bytes([*message.get(4)?, *message.get(5)?]);
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE {
        return None;
    }
    let attrs = message.get(HEADER + NFGENMSG..)?;
    let name = comment(attr(attrs, NFTA_RULE_USERDATA)?)?;
    let packets = attributes(attr(attrs, NFTA_RULE_EXPRESSIONS)?)
        .filter(|(k, _)| *k == NFTA_LIST_ELEM)
        .find_map(|(_, elem)| {
            if attr(elem, NFTA_EXPR_NAME)? != b"counter\0" {
                return None;
            }
            let p = attr(attr(elem, NFTA_EXPR_DATA)?, NFTA_COUNTER_PACKETS)?;
            Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
        })?;
    Some((name, packets))
}

/// The comment in libnftnl's user data: TLVs of one type byte, one length byte, the value
/// (NUL-terminated).
fn comment(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while let [kind, len, tail @ ..] = rest {
        let value = tail.get(..usize::from(*len))?;
        if *kind == UDATA_RULE_COMMENT {
            let text = value.split(|b| *b == 0).next()?;
            return std::str::from_utf8(text).ok().map(str::to_string);
        }
        rest = &tail[usize::from(*len)..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(a.len().div_ceil(4) * 4, 0);
        a
    }

    /// A NEWRULE message as the kernel sends it: a match, a counter, a comment.
    fn rule_message(comment: &[u8], packets: u64) -> Vec<u8> {
        let cmp = [nla(NFTA_EXPR_NAME, b"cmp\0"), nla(NFTA_EXPR_DATA, &[])].concat();
        let counter_data = [
            nla(1, &7000u64.to_be_bytes()),
            nla(NFTA_COUNTER_PACKETS, &packets.to_be_bytes()),
        ]
        .concat();
        let counter = [
            nla(NFTA_EXPR_NAME, b"counter\0"),
            nla(NFTA_EXPR_DATA | 0x8000, &counter_data),
        ]
        .concat();
        let exprs = [nla(NFTA_LIST_ELEM, &cmp), nla(NFTA_LIST_ELEM, &counter)].concat();
        let mut udata = vec![UDATA_RULE_COMMENT, comment.len() as u8];
        udata.extend_from_slice(comment);
        let body = [
            nla(NFTA_RULE_TABLE, b"gw\0"),
            nla(NFTA_RULE_EXPRESSIONS | 0x8000, &exprs),
            nla(NFTA_RULE_USERDATA, &udata),
        ]
        .concat();
        let mut m = Vec::new();
        m.extend_from_slice(&((HEADER + NFGENMSG + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn reads_a_rules_comment_and_packet_count() {
        let m = rule_message(b"into_vpc\0", 42);
        assert_eq!(counted_rule(&m), Some(("into_vpc".into(), 42)));
    }

    #[test]
    fn rules_without_a_comment_or_counter_and_other_messages_are_skipped() {
        let mut m = rule_message(b"into_vpc\0", 1);
        m[4..6].copy_from_slice(&0x0a05u16.to_ne_bytes());
        assert_eq!(counted_rule(&m), None, "not a NEWRULE");
        assert_eq!(comment(&[1, 2, b'x', 0]), None, "no comment TLV");
        assert_eq!(comment(&[0, 9, b'x']), None, "a length past the end");
    }

    #[test]
    fn truncated_messages_never_panic() {
        let m = rule_message(b"other\0", 3);
        for len in 0..m.len() {
            let _ = counted_rule(&m[..len]);
        }
        let mut bad = m.clone();
        // The first attribute claims more than there is.
        bad[HEADER + NFGENMSG..HEADER + NFGENMSG + 2].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(counted_rule(&bad), None);
    }

    #[test]
    fn the_dump_request_is_one_aligned_message_for_the_table() {
        let m = dump_request("gateway_gw", 3);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(&m[24..34], b"gateway_gw");
    }
}
