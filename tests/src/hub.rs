//! The hub's lab: the standard topology plus a hub on the underlay side and a second VPC
//! gateway, both connectors' public sides closed to every inbound connection attempt.
//!
//! ```text
//!                               ┌─ hub0 ─── hub (wan0 198.18.0.10)
//!  office ── op ──────────── ul ┼─ gw0 ──── gw  (wan0 203.0.113.10) ── vpc0 10.128.0.1 ─┐
//!                               └─ gw20 ─── gw2 (wan0 198.19.0.10)  ── vpc0 10.128.0.2 ─┴─ vpc
//! ```
//!
//! [`Lab::add_hub`] adds the hub and gw2 (and gw2's leg into the VPC host, `eth1`, with a
//! host route back to 10.128.0.2) without changing any of the standard lab's links or
//! addresses. [`Lab::close_inbound`] loads a stateless nftables filter into a VPC gateway:
//! on `wan0` only the hub's replies (from its port, to the pinned source port, no TCP SYN
//! without ACK) come in; everything else that arrives there is dropped.

use anyhow::Context;

use crate::{Host, Lab};

pub mod addr {
    pub const HUB: &str = "198.18.0.10";
    pub const UL_HUB: &str = "198.18.0.1";
    pub const GW2_WAN: &str = "198.19.0.10";
    pub const UL_GW2: &str = "198.19.0.1";
    pub const GW2_VPC: &str = "10.128.0.2";
    /// The hub's port, and the connectors' pinned source port.
    pub const PORT: u16 = 7844;
}

const INBOUND_TABLE: &str = "lab_no_inbound";

impl Lab {
    /// Adds the hub's namespace and a second VPC gateway (see the module's picture).
    pub fn add_hub(&mut self) -> anyhow::Result<()> {
        use Host::*;
        for h in [Hub, VpcGateway2] {
            let ns = self.ns(h);
            self.ip(&["netns", "add", &ns])?;
            self.created.push(ns.clone());
            self.ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.sysctl(h, "net.ipv6.conf.all.accept_dad", "0")?;
            self.sysctl(h, "net.ipv6.conf.default.accept_dad", "0")?;
        }
        self.link(Underlay, "hub0", Hub, "wan0")?;
        self.link(Underlay, "gw20", VpcGateway2, "wan0")?;
        self.link(VpcGateway2, "vpc0", Vpc, "eth1")?;
        self.addr(Underlay, "hub0", "198.18.0.1/24")?;
        self.addr(Hub, "wan0", "198.18.0.10/24")?;
        self.addr(Underlay, "gw20", "198.19.0.1/24")?;
        self.addr(VpcGateway2, "wan0", "198.19.0.10/24")?;
        self.addr(VpcGateway2, "vpc0", "10.128.0.2/16")?;
        self.route(Hub, "default", addr::UL_HUB)?;
        self.route(VpcGateway2, "default", addr::UL_GW2)?;
        let vpc = self.ns(Vpc);
        self.ip(&["-n", &vpc, "route", "add", "10.128.0.2/32", "dev", "eth1"])?;
        Ok(())
    }

    /// Drops every packet arriving on `h`'s `wan0` except the hub's replies to the
    /// connector's own outbound links (stateless: no connection tracking).
    pub fn close_inbound(&self, h: Host) -> anyhow::Result<()> {
        let port = addr::PORT;
        let rules = self.dir().join(format!("no-inbound-{}.nft", self.ns(h)));
        std::fs::write(
            &rules,
            format!(
                "table inet {INBOUND_TABLE} {{\n  chain pre {{\n    \
                 type filter hook prerouting priority -300; policy accept;\n    \
                 iifname \"wan0\" ip saddr {hub} udp sport {port} udp dport {port} accept\n    \
                 iifname \"wan0\" ip saddr {hub} tcp sport {port} tcp dport {port} \
                 tcp flags & (syn | ack) != syn accept\n    \
                 iifname \"wan0\" counter drop\n  }}\n}}\n",
                hub = addr::HUB
            ),
        )?;
        self.run_ok(h, &["nft", "-f", rules.to_str().context("utf-8 path")?])
            .map(drop)
    }

    /// Packets the inbound filter of `h` dropped so far.
    pub fn inbound_dropped(&self, h: Host) -> anyhow::Result<u64> {
        let out = self.run_ok(h, &["nft", "list", "table", "inet", INBOUND_TABLE])?;
        Ok(out
            .lines()
            .filter(|l| l.contains("drop"))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "packets")?;
                w.get(i + 1)?.parse::<u64>().ok()
            })
            .sum())
    }
}
