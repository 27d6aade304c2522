//! The daemon's one nftables table. On a connector: source NAT of tunnelled traffic into the
//! VPC, from a pinned port range, so the VPC's ACLs need to let back only that range; the input
//! rules the tunnel needs; and the forward filter (`filter`) that keeps the connector from
//! being an open router. On a site gateway: its forward filter.
//!
//! The table is written over netlink (nftnl + mnl, not by running `nft`) in one batch that adds,
//! deletes and re-adds it, so applying is atomic and idempotent, and [`remove`] is too. The
//! connector's session chains are flushed and refilled in one batch as well.

use std::ffi::CString;
use std::io;
use std::ptr;
use std::sync::Mutex;

use nftnl::expr::{Bitwise, Expression, Immediate, Register, States};
use nftnl::{Batch, Chain, FinalizedBatch, MsgType, ProtoFamily, Rule, Table, nft_expr};

use ipnet::IpNet;

use super::filter::{self, Ct, Family, Match, RuleSpec, Session, Verdict};
use crate::core::packet::{PROTO_TCP as IPPROTO_TCP, PROTO_UDP as IPPROTO_UDP};
use crate::core::policy::Policy;

/// NF_NAT_RANGE_PROTO_SPECIFIED: without it the kernel accepts the range, `nft` even prints it,
/// and ports are silently not remapped (NOTES-datapath.md).
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
/// srcnat priority of the postrouting hook.
const SRCNAT: i32 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSpec {
    pub table: String,
    /// Packets coming out of this TUN...
    pub tun: String,
    /// ...and leaving through this interface are masqueraded...
    pub egress: String,
    /// ...to source ports in this inclusive range (TCP and UDP).
    pub ports: (u16, u16),
    /// The tunnel's UDP (QUIC) and TCP (fallback) listen ports, accepted in the input chain.
    pub udp_port: Option<u16>,
    pub tcp_port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("nftables name {0:?} contains a NUL byte")]
    Name(String),
    #[error("nftables table {table}: {source}")]
    Netlink { table: String, source: io::Error },
}

/// `masquerade to :MIN-MAX` with the ports loaded into registers 1 and 2 beforehand.
struct MasqueradeRange;

impl Expression for MasqueradeRange {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<nftnl_sys::nftnl_expr> {
        // SAFETY: plain libnftnl allocation and setters on an expression we own until the rule
        // takes it; a null allocation aborts, as nftnl's own expressions do.
        unsafe {
            let expr = nftnl_sys::nftnl_expr_alloc(c"masq".as_ptr());
            let Some(expr) = ptr::NonNull::new(expr) else {
                std::process::abort();
            };
            nftnl_sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                nftnl_sys::NFTNL_EXPR_MASQ_FLAGS as u16,
                NF_NAT_RANGE_PROTO_SPECIFIED,
            );
            nftnl_sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                nftnl_sys::NFTNL_EXPR_MASQ_REG_PROTO_MIN as u16,
                Register::Reg1.to_raw(),
            );
            nftnl_sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                nftnl_sys::NFTNL_EXPR_MASQ_REG_PROTO_MAX as u16,
                Register::Reg2.to_raw(),
            );
            expr
        }
    }
}

/// `fib saddr . iif oif` into register 1: the interface the route back to the source leaves
/// through, looked up on the input interface only (0: none). nftnl 0.9 has no fib expression.
struct FibSaddrIifOif;

/// NFTA_FIB_F_SADDR | NFTA_FIB_F_IIF, and NFT_FIB_RESULT_OIF.
const FIB_F_SADDR_IIF: u32 = 1 | 8;
const FIB_RESULT_OIF: u32 = 1;

impl Expression for FibSaddrIifOif {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<nftnl_sys::nftnl_expr> {
        // SAFETY: as in MasqueradeRange: libnftnl allocation and setters on an expression we
        // own until the rule takes it.
        unsafe {
            let expr = nftnl_sys::nftnl_expr_alloc(c"fib".as_ptr());
            let Some(expr) = ptr::NonNull::new(expr) else {
                std::process::abort();
            };
            let set = |attr: u32, value: u32| {
                nftnl_sys::nftnl_expr_set_u32(expr.as_ptr(), attr as u16, value);
            };
            set(nftnl_sys::NFTNL_EXPR_FIB_DREG, Register::Reg1.to_raw());
            set(nftnl_sys::NFTNL_EXPR_FIB_RESULT, FIB_RESULT_OIF);
            set(nftnl_sys::NFTNL_EXPR_FIB_FLAGS, FIB_F_SADDR_IIF);
            expr
        }
    }
}

fn cstring(s: &str) -> Result<CString, NatError> {
    CString::new(s).map_err(|_| NatError::Name(s.into()))
}

/// Interface names compare as NUL-padded 16-byte strings in nftables.
fn ifname(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(name.bytes().take(15)) {
        *o = b;
    }
    out
}

/// Loads the TCP or UDP destination port into the register a following `cmp` reads.
fn load_dport(rule: &mut Rule, proto: u8) {
    if proto == IPPROTO_TCP {
        rule.add_expr(&nft_expr!(payload tcp dport));
    } else {
        rule.add_expr(&nft_expr!(payload udp dport));
    }
}

/// Creates (or replaces) the table.
pub fn apply(spec: &NatSpec) -> Result<(), NatError> {
    let name = cstring(&spec.table)?;
    let table = Table::new(&name, ProtoFamily::Inet);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let chain_name = cstring("postrouting")?;
    let mut chain = Chain::new(&chain_name, &table);
    chain.set_hook(nftnl::Hook::PostRouting, SRCNAT);
    chain.set_type(nftnl::ChainType::Nat);
    batch.add(&chain, MsgType::Add);

    let (tun, egress) = (ifname(&spec.tun), ifname(&spec.egress));
    let matching = |rule: &mut Rule| {
        rule.add_expr(&nft_expr!(meta iifname));
        rule.add_expr(&nft_expr!(cmp == &tun[..]));
        rule.add_expr(&nft_expr!(meta oifname));
        rule.add_expr(&nft_expr!(cmp == &egress[..]));
    };
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let mut rule = Rule::new(&chain);
        matching(&mut rule);
        rule.add_expr(&nft_expr!(meta l4proto));
        rule.add_expr(&nft_expr!(cmp == proto));
        rule.add_expr(&Immediate::new(spec.ports.0.to_be(), Register::Reg1));
        rule.add_expr(&Immediate::new(spec.ports.1.to_be(), Register::Reg2));
        rule.add_expr(&MasqueradeRange);
        batch.add(&rule, MsgType::Add);
    }
    // ICMP and the rest have no ports: plain masquerade.
    let mut rule = Rule::new(&chain);
    matching(&mut rule);
    rule.add_expr(&nft_expr!(masquerade));
    batch.add(&rule, MsgType::Add);

    // The host firewall part: what this daemon needs to reach it, and nothing more — the
    // tunnel port, and replies arriving at the pinned range (the DNS forwarder's sockets). A
    // drop elsewhere in the host's ruleset still wins; these rules document and count.
    let input_name = cstring("input")?;
    let mut input = Chain::new(&input_name, &table);
    input.set_hook(nftnl::Hook::In, 0);
    input.set_type(nftnl::ChainType::Filter);
    batch.add(&input, MsgType::Add);
    for (proto, port) in [(IPPROTO_UDP, spec.udp_port), (IPPROTO_TCP, spec.tcp_port)] {
        let Some(port) = port else { continue };
        let mut rule = Rule::new(&input);
        rule.add_expr(&nft_expr!(meta l4proto));
        rule.add_expr(&nft_expr!(cmp == proto));
        load_dport(&mut rule, proto);
        rule.add_expr(&nft_expr!(cmp == port.to_be()));
        rule.add_expr(&nft_expr!(counter));
        rule.add_expr(&nft_expr!(verdict accept));
        batch.add(&rule, MsgType::Add);
    }
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let mut rule = Rule::new(&input);
        rule.add_expr(&nft_expr!(meta l4proto));
        rule.add_expr(&nft_expr!(cmp == proto));
        load_dport(&mut rule, proto);
        rule.add_expr(&nft_expr!(cmp >= spec.ports.0.to_be()));
        load_dport(&mut rule, proto);
        rule.add_expr(&nft_expr!(cmp <= spec.ports.1.to_be()));
        rule.add_expr(&nft_expr!(counter));
        rule.add_expr(&nft_expr!(verdict accept));
        batch.add(&rule, MsgType::Add);
    }
    // The forward filter, in the same batch: the table never exists without it. Session
    // chains first (the base chain jumps to them), empty: no client, nothing new in or out.
    for name in [filter::TUNNEL_OUT, filter::TUNNEL_IN] {
        add_chain_rules(&mut batch, &table, name, false, &[])?;
    }
    add_chain_rules(
        &mut batch,
        &table,
        filter::FORWARD,
        true,
        &filter::connector_forward(&spec.tun, &spec.egress),
    )?;
    send(&batch.finalize()).map_err(|source| NatError::Netlink {
        table: spec.table.clone(),
        source,
    })
}

/// On a site gateway (`[client] table` set), its table with the forward filter; `changed` are
/// the sysctls the tunnel changed so far (whether gatewayd turned forwarding on). The table's
/// name and what it holds, for status.
pub fn apply_site_gateway(
    cfg: &crate::config::Tunnel,
    changed: &[(String, String)],
) -> Result<Option<(String, String)>, NatError> {
    let Some(table) = &cfg.client_table else {
        return Ok(None);
    };
    let turned_on = |key: &str| changed.iter().any(|(k, _)| k == key);
    let (v4, v6) = (
        turned_on("net.ipv4.ip_forward"),
        turned_on("net.ipv6.conf.all.forwarding"),
    );
    let rules = filter::client_forward(&cfg.tun, &cfg.lan, &cfg.advertise, v4, v6);
    apply_client(table, &rules)?;
    let holds = filter::describe_client(&cfg.tun, &cfg.lan, &cfg.advertise, v4, v6);
    Ok(Some((table.clone(), holds)))
}

/// A site gateway's table: its forward filter only ([`filter::client_forward`]).
fn apply_client(table: &str, rules: &[RuleSpec]) -> Result<(), NatError> {
    let name = cstring(table)?;
    let t = Table::new(&name, ProtoFamily::Inet);
    let mut batch = Batch::new();
    batch.add(&t, MsgType::Add);
    batch.add(&t, MsgType::Del);
    batch.add(&t, MsgType::Add);
    add_chain_rules(&mut batch, &t, filter::FORWARD, true, rules)?;
    send(&batch.finalize()).map_err(|source| NatError::Netlink {
        table: table.into(),
        source,
    })
}

/// Adds chain `name` (hooked at forward, filter priority, when `base`) with `rules`.
fn add_chain_rules(
    batch: &mut Batch,
    table: &Table,
    name: &str,
    base: bool,
    rules: &[RuleSpec],
) -> Result<(), NatError> {
    let chain_name = cstring(name)?;
    let mut chain = Chain::new(&chain_name, table);
    if base {
        chain.set_hook(nftnl::Hook::Forward, 0);
        chain.set_type(nftnl::ChainType::Filter);
        chain.set_policy(nftnl::Policy::Accept);
    }
    batch.add(&chain, MsgType::Add);
    for spec in rules {
        batch.add(&to_rule(&chain, spec)?, MsgType::Add);
    }
    Ok(())
}

/// The connector's session chains, serialised: a session that ends while another starts must
/// not let an older picture of the sessions overwrite a newer one.
pub struct SessionFilter {
    table: String,
    lock: Mutex<()>,
}

impl SessionFilter {
    pub fn new(table: &str) -> Self {
        SessionFilter {
            table: table.into(),
            lock: Mutex::new(()),
        }
    }

    /// Rebuilds [`filter::TUNNEL_OUT`] and [`filter::TUNNEL_IN`] for the peers (identity and
    /// the prefixes it owns) `snapshot` returns, taken under the lock; flush and refill in one
    /// batch.
    pub fn sync(
        &self,
        policy: &Policy,
        snapshot: impl FnOnce() -> Vec<(String, Vec<IpNet>)>,
    ) -> Result<(), NatError> {
        let _serial = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let sessions: Vec<Session> = snapshot()
            .into_iter()
            .map(|(identity, owns)| {
                let (allow, inbound) = policy.rules_for(&identity);
                Session {
                    owns,
                    allow,
                    inbound,
                }
            })
            .collect();
        let (out, inbound, truncated) = filter::session_chains(&sessions);
        if truncated {
            tracing::warn!(
                table = %self.table,
                max = filter::MAX_SESSION_RULES,
                "forward filter: too many session rules; the rest are left out (their new connections are dropped)"
            );
        }
        let name = cstring(&self.table)?;
        let table = Table::new(&name, ProtoFamily::Inet);
        let mut batch = Batch::new();
        for (chain_name, rules) in [(filter::TUNNEL_OUT, &out), (filter::TUNNEL_IN, &inbound)] {
            let chain_name = cstring(chain_name)?;
            let chain = Chain::new(&chain_name, &table);
            // A rule without a handle deletes every rule of its chain: a flush.
            batch.add(&Rule::new(&chain), MsgType::Del);
            for spec in rules {
                batch.add(&to_rule(&chain, spec)?, MsgType::Add);
            }
        }
        send(&batch.finalize()).map_err(|source| NatError::Netlink {
            table: self.table.clone(),
            source,
        })
    }
}

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// One rule as nftables expressions, in the order `nft` itself would emit them.
fn to_rule<'a>(chain: &'a Chain<'a>, spec: &RuleSpec) -> Result<Rule<'a>, NatError> {
    let mut rule = Rule::new(chain);
    for m in &spec.matches {
        match m {
            Match::Iif(name) => {
                rule.add_expr(&nft_expr!(meta iifname));
                rule.add_expr(&nft_expr!(cmp == &ifname(name)[..]));
            }
            Match::Oif(name) => {
                rule.add_expr(&nft_expr!(meta oifname));
                rule.add_expr(&nft_expr!(cmp == &ifname(name)[..]));
            }
            Match::Ct(which) => {
                let states = match which {
                    Ct::Replies => States::ESTABLISHED | States::RELATED,
                    Ct::New => States::NEW,
                };
                rule.add_expr(&nft_expr!(ct state));
                rule.add_expr(&Bitwise::new(states.bits(), 0u32));
                rule.add_expr(&nft_expr!(cmp != 0u32));
            }
            Match::Family(f) => {
                rule.add_expr(&nft_expr!(meta nfproto));
                rule.add_expr(&nft_expr!(
                    cmp == match f {
                        Family::V4 => NFPROTO_IPV4,
                        Family::V6 => NFPROTO_IPV6,
                    }
                ));
            }
            Match::Saddr(net) | Match::Daddr(net) => {
                // A /0 matches every address of the family, which Family already checked.
                if net.prefix_len() == 0 {
                    continue;
                }
                let source = matches!(m, Match::Saddr(_));
                match (net, source) {
                    (IpNet::V4(_), true) => rule.add_expr(&nft_expr!(payload ipv4 saddr)),
                    (IpNet::V4(_), false) => rule.add_expr(&nft_expr!(payload ipv4 daddr)),
                    (IpNet::V6(_), true) => rule.add_expr(&nft_expr!(payload ipv6 saddr)),
                    (IpNet::V6(_), false) => rule.add_expr(&nft_expr!(payload ipv6 daddr)),
                }
                let (mask, addr) = filter::prefix_bytes(net);
                if net.prefix_len() < net.max_prefix_len() {
                    let zeros = vec![0u8; mask.len()];
                    rule.add_expr(&Bitwise::new(&mask[..], &zeros[..]));
                }
                rule.add_expr(&nft_expr!(cmp == &addr[..]));
            }
            Match::L4(p) => {
                rule.add_expr(&nft_expr!(meta l4proto));
                rule.add_expr(&nft_expr!(cmp == *p));
            }
            Match::RoutedBack => {
                rule.add_expr(&FibSaddrIifOif);
                rule.add_expr(&nft_expr!(cmp != 0u32));
            }
            Match::Dport(p, lo, hi) => {
                load_dport(&mut rule, *p);
                if lo == hi {
                    rule.add_expr(&nft_expr!(cmp == lo.to_be()));
                } else {
                    rule.add_expr(&nft_expr!(cmp >= lo.to_be()));
                    load_dport(&mut rule, *p);
                    rule.add_expr(&nft_expr!(cmp <= hi.to_be()));
                }
            }
        }
    }
    if spec.counter {
        rule.add_expr(&nft_expr!(counter));
    }
    match spec.verdict {
        Verdict::Accept => rule.add_expr(&nft_expr!(verdict accept)),
        Verdict::Drop => rule.add_expr(&nft_expr!(verdict drop)),
        Verdict::Jump(chain) => {
            rule.add_expr(&nft_expr!(verdict jump cstring(chain)?));
        }
    }
    if let Some(c) = spec.comment {
        rule.set_comment(cstring(c)?)
            .map_err(|e| NatError::Name(format!("{c}: {e}")))?;
    }
    Ok(rule)
}

/// Deletes the table; succeeds when it does not exist.
pub fn remove(table: &str) -> Result<(), NatError> {
    let name = cstring(table)?;
    let t = Table::new(&name, ProtoFamily::Inet);
    let mut batch = Batch::new();
    batch.add(&t, MsgType::Add);
    batch.add(&t, MsgType::Del);
    send(&batch.finalize()).map_err(|source| NatError::Netlink {
        table: table.into(),
        source,
    })
}

/// NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE.
const GETTABLE: u16 = (10 << 8) | 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NFPROTO_INET: u8 = 1;
const NFTA_TABLE_NAME: u16 = 1;

/// A netlink request for one inet table by name: header, nfgenmsg, the name attribute.
fn get_table_request(name: &str, seq: u32) -> Vec<u8> {
    let attr_len = 4 + name.len() + 1;
    let padded = attr_len.div_ceil(4) * 4;
    let total = 16 + 4 + padded;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&GETTABLE.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
    m.extend_from_slice(name.as_bytes());
    m.resize(total, 0);
    m
}

/// Whether the kernel has the table now: what status reports, asked rather than assumed.
pub fn table_exists(table: &str) -> io::Result<bool> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    let seq = 1;
    socket.send(&get_table_request(table, seq))?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    loop {
        let mut got_table = false;
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            match mnl::cb_run(message, seq, portid) {
                Ok(mnl::CbResult::Stop) => return Ok(got_table),
                Ok(mnl::CbResult::Ok) => got_table = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if got_table {
            return Ok(true);
        }
    }
}

fn send(batch: &FinalizedBatch) -> io::Result<()> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    socket.send_all(batch)?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            let Some(seq) = expected.next() else {
                return Err(io::Error::other("unexpected netlink acknowledgement"));
            };
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_request_is_one_aligned_netlink_message() {
        let m = get_table_request("gateway_gw", 7);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), GETTABLE);
        assert_eq!(u32::from_ne_bytes([m[8], m[9], m[10], m[11]]), 7);
        assert_eq!(m[16], NFPROTO_INET);
        assert_eq!(&m[24..34], b"gateway_gw");
        assert_eq!(m[34], 0, "NUL-terminated name");
    }

    #[test]
    fn interface_names_are_nul_padded_and_truncated_like_the_kernels() {
        assert_eq!(&ifname("gwtun")[..6], b"gwtun\0");
        assert_eq!(ifname("gwtun")[15], 0);
        assert_eq!(ifname("a-very-long-interface")[15], 0, "15 bytes at most");
    }
}
