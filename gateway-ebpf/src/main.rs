//! The gateway's eBPF programs.
//!
//! `gw_classify` runs at TC ingress (TCX) of the interfaces the daemon is told to watch. It
//! looks each IP packet's destination up in the route tries that user space fills from the
//! config and counts it per route. It never drops or rewrites a packet: the verdict is always
//! "next", so other TCX programs on the same interface still run and the kernel's own
//! processing carries on as if we were not there.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::{classifier, map},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use gateway_common::{
    COUNTER_SLOTS, Counter, MAX_DNS_LABELS, MAX_DNS_ZONES, MAX_REDIRECTS, MAX_ROUTES,
    RouteCounters, dns_hash_step,
};

/// TCX_NEXT (== TC_ACT_UNSPEC): hand the packet to the next program, or to the stack.
const TCX_NEXT: i32 = -1;
/// TC_ACT_REDIRECT: the packet went where bpf_redirect said.
const TC_ACT_REDIRECT: i32 = 7;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Offset of the destination address inside the IPv4 / IPv6 header.
const IPV4_DST: usize = 16;
const IPV6_DST: usize = 24;

#[map(name = "ROUTES_V4")]
static ROUTES_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_ROUTES, BPF_F_NO_PREALLOC);

#[map(name = "ROUTES_V6")]
static ROUTES_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_ROUTES, BPF_F_NO_PREALLOC);

#[map(name = "ROUTE_COUNTERS")]
static ROUTE_COUNTERS: PerCpuArray<RouteCounters> = PerCpuArray::with_max_entries(MAX_ROUTES, 0);

#[map(name = "REDIRECT")]
static REDIRECT: HashMap<u32, u32> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

#[map(name = "DNS_ZONES")]
static DNS_ZONES: HashMap<u64, u32> = HashMap::with_max_entries(MAX_DNS_ZONES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[classifier]
pub fn gw_classify(ctx: TcContext) -> i32 {
    let outcome = classify(&ctx);
    bump(outcome);
    if outcome == Counter::Unmatched {
        // A query for a private zone, to whatever resolver the LAN host uses.
        return steer_dns(&ctx);
    }
    if outcome != Counter::Matched {
        return TCX_NEXT;
    }
    // On a site gateway's LAN interface, matched packets go straight into the TUN: no
    // routing, no TTL change (NOTES-datapath.md). Elsewhere they are only counted.
    // SAFETY: reading a field of the context's own __sk_buff.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain map lookup; the value is copied out at once.
    let Some(target) = (unsafe { REDIRECT.get(&ingress) }).copied() else {
        return TCX_NEXT;
    };
    // SAFETY: bpf_redirect takes an ifindex and flags and touches no memory of ours.
    let verdict = unsafe { aya_ebpf::helpers::bpf_redirect(target, 0) };
    if verdict == i64::from(TC_ACT_REDIRECT) {
        bump(Counter::Redirected);
        TC_ACT_REDIRECT
    } else {
        bump(Counter::RedirectFailed);
        TCX_NEXT
    }
}

/// Classifies one frame and, on a route match, bumps that route's counters.
#[inline(always)]
fn classify(ctx: &TcContext) -> Counter {
    // bpf_skb_load_bytes (ctx.load) rather than direct packet access: it also reads headers
    // that sit in a non-linear part of the skb, and a short frame simply fails the load.
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
        return Counter::Malformed;
    };
    match u16::from_be_bytes(ethertype) {
        ETH_P_IP => {
            let Ok(version_ihl) = ctx.load::<u8>(ETH_HLEN) else {
                return Counter::Malformed;
            };
            if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
                return Counter::Malformed;
            }
            let Ok(dst) = ctx.load::<[u8; 4]>(ETH_HLEN + IPV4_DST) else {
                return Counter::Malformed;
            };
            match ROUTES_V4.get(&Key::new(32, dst)) {
                Some(id) => count_route(ctx, *id),
                None => Counter::Unmatched,
            }
        }
        ETH_P_IPV6 => {
            let Ok(version) = ctx.load::<u8>(ETH_HLEN) else {
                return Counter::Malformed;
            };
            if version >> 4 != 6 {
                return Counter::Malformed;
            }
            let Ok(dst) = ctx.load::<[u8; 16]>(ETH_HLEN + IPV6_DST) else {
                return Counter::Malformed;
            };
            match ROUTES_V6.get(&Key::new(128, dst)) {
                Some(id) => count_route(ctx, *id),
                None => Counter::Unmatched,
            }
        }
        // VLAN-tagged frames land here too: the interfaces we attach to carry untagged IP.
        _ => Counter::NotIp,
    }
}

/// At egress of the uplink: the host's own queries for private zones go into the TUN.
#[classifier]
pub fn gw_dns_egress(ctx: TcContext) -> i32 {
    steer_dns(&ctx)
}

/// Redirects a DNS query for a private zone to this interface's TUN, if it has one.
#[inline(always)]
fn steer_dns(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of the context's own __sk_buff.
    let dev = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain map lookup; the value is copied out at once.
    let Some(target) = (unsafe { REDIRECT.get(&dev) }).copied() else {
        return TCX_NEXT;
    };
    let Some(payload) = dns_payload(ctx) else {
        return TCX_NEXT;
    };
    if !query_in_zone(ctx, payload) {
        return TCX_NEXT;
    }
    // SAFETY: bpf_redirect touches no memory of ours.
    let verdict = unsafe { aya_ebpf::helpers::bpf_redirect(target, 0) };
    if verdict == i64::from(TC_ACT_REDIRECT) {
        bump(Counter::DnsSteered);
        TC_ACT_REDIRECT
    } else {
        bump(Counter::RedirectFailed);
        TCX_NEXT
    }
}

/// Offset of the payload of a UDP datagram to port 53 (not a later fragment), IPv4 or IPv6.
#[inline(always)]
fn dns_payload(ctx: &TcContext) -> Option<usize> {
    let ethertype = u16::from_be_bytes(ctx.load::<[u8; 2]>(12).ok()?);
    let l4 = match ethertype {
        ETH_P_IP => {
            let vihl = ctx.load::<u8>(ETH_HLEN).ok()?;
            let frag = u16::from_be_bytes(ctx.load::<[u8; 2]>(ETH_HLEN + 6).ok()?);
            if ctx.load::<u8>(ETH_HLEN + 9).ok()? != 17 || frag & 0x1fff != 0 {
                return None;
            }
            ETH_HLEN + usize::from(vihl & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != 17 {
                return None;
            }
            ETH_HLEN + 40
        }
        _ => return None,
    };
    let dport = u16::from_be_bytes(ctx.load::<[u8; 2]>(l4 + 2).ok()?);
    (dport == 53).then_some(l4 + 8)
}

/// Whether the question name of the DNS message at `msg` is a private zone or under one.
/// A first bounded walk over the labels finds where the name ends; a second goes from its last
/// byte back to the first, extending the suffix hash one byte at a time and looking each
/// suffix up in DNS_ZONES. Looking up at every byte rather than only at label starts keeps
/// the verifier's work linear; a mid-label suffix can only match a zone's wire form in a name
/// whose labels contain length-like bytes, and user space checks every steered query exactly.
/// Compression pointers, extended labels and names of more than MAX_DNS_LABELS labels never
/// match.
#[inline(always)]
fn query_in_zone(ctx: &TcContext, msg: usize) -> bool {
    let Ok(flags) = ctx.load::<u8>(msg + 2) else {
        return false;
    };
    if flags & 0x80 != 0 {
        return false; // a response
    }
    let name = msg + 12;
    let mut pos = 0usize;
    let mut end = 0usize;
    for _ in 0..=MAX_DNS_LABELS {
        let Ok(len) = ctx.load::<u8>(name + pos) else {
            return false;
        };
        if len == 0 {
            end = pos + 1;
            break;
        }
        if len > 63 {
            return false;
        }
        pos += 1 + usize::from(len);
        if pos > 254 {
            return false;
        }
    }
    if end == 0 {
        return false;
    }
    let mut h = 0u64;
    for j in 0..255usize {
        if j >= end {
            break;
        }
        let Ok(b) = ctx.load::<u8>(name + (end - 1 - j)) else {
            return false;
        };
        // Length bytes are at most 63, below 'A': lowercasing every byte is safe.
        h = dns_hash_step(h, b.to_ascii_lowercase());
        // SAFETY: a plain map lookup.
        if unsafe { DNS_ZONES.get(&h) }.is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn count_route(ctx: &TcContext, id: u32) -> Counter {
    if id >= MAX_ROUTES {
        // User space and the object disagree about the map's size: worth a log line, and rare
        // enough (never, unless something is broken) to stay off the hot path.
        warn!(ctx, "route id {} out of range", id);
        return Counter::BadRouteId;
    }
    if let Some(c) = ROUTE_COUNTERS.get_ptr_mut(id) {
        // Bytes from the IP header on, so the numbers do not depend on the link layer.
        let bytes = (ctx.len() as u64).saturating_sub(ETH_HLEN as u64);
        // SAFETY: per-CPU slot, this program is its only writer on this CPU (no preemption
        // inside a TC program); the pointer comes from the map and is valid.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    Counter::Matched
}

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: as in count_route: a per-CPU slot with a single writer.
        unsafe { *v += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible, because aya-log's perf event output is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
