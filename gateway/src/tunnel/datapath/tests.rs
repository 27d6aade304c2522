//! The batched packet path without a TUN: super-packets split as tun-rs splits what an
//! offloading TUN hands over, batches coalesced as tun-rs coalesces what it writes, and every
//! decision and counter checked per packet on the way.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tun_rs::{VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_LEN, VirtioNetHdr, gso_split, handle_gro};

use super::*;
use crate::core::checksum;
use crate::core::policy::{Entry, Policy, Rule};
use crate::node::datapath::{Counters, PacketSink, Sink};
use crate::node::drops::Drops;
use crate::node::table::PrefixTable;

const CLIENT: [u8; 4] = [100, 64, 0, 2];
const HOST: [u8; 4] = [10, 128, 0, 10];
/// What a fresh QUIC connection's datagrams carry.
const DATAGRAM: usize = 1362;

/// A link that keeps what it is given.
#[derive(Default)]
struct Recorder(Mutex<Vec<Vec<u8>>>);

impl PacketSink for Recorder {
    fn send_packet(&self, pkt: &[u8]) -> Result<(), SendError> {
        self.0.lock().expect("lock").push(pkt.to_vec());
        Ok(())
    }
}

fn peer(sink: Sink, max: usize, connector: bool) -> Arc<PeerPath> {
    let (sources, rules) = if connector {
        let mut sources = PrefixTable::default();
        sources.insert("100.64.0.2/32".parse().expect("net"), ());
        let policy = Policy::from_entries(vec![Entry {
            identity: "ops-*".into(),
            rules: vec![Rule::parse("10.128.0.0/16 tcp/5201").expect("rule")],
            inbound: Vec::new(),
        }]);
        (sources, policy.resolve("ops-alice"))
    } else {
        (PrefixTable::default(), None)
    };
    Arc::new(PeerPath {
        link: crate::node::LinkId(1),
        sink,
        identity: "ops-alice".into(),
        far_end: (Ipv4Addr::new(100, 64, 0, 1), Ipv6Addr::LOCALHOST),
        sources,
        rules,
        max_packet: max.into(),
        counters: Arc::new(Counters::default()),
    })
}

fn snapshot(p: &Arc<PeerPath>, client: bool) -> (Datapath, Arc<Drops>) {
    let drops = Arc::new(Drops::default());
    let dp = Datapath::build(
        drops.clone(),
        vec![p.clone()],
        [("10.128.0.0/16".parse().expect("net"), 0)],
        Vec::new(),
        client,
    );
    (dp, drops)
}

/// An IPv4 TCP packet with ACK (and PSH when `push`), DF set, checksums complete.
fn tcp(src: [u8; 4], dst: [u8; 4], dport: u16, seq: u32, payload: &[u8], push: bool) -> Vec<u8> {
    let total = 40 + payload.len();
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    p[4..6].copy_from_slice(&7u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&1u32.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10 | if push { 0x08 } else { 0 };
    p[34..36].copy_from_slice(&65535u16.to_be_bytes());
    p.extend_from_slice(payload);
    let ip = checksum::checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip.to_be_bytes());
    let l4 = checksum::checksum(&p[20..], pseudo(&p));
    p[36..38].copy_from_slice(&l4.to_be_bytes());
    p
}

/// The IPv4 pseudo-header's sum, for `p`'s transport checksum.
fn pseudo(p: &[u8]) -> u32 {
    let mut ph = Vec::with_capacity(12);
    ph.extend_from_slice(&p[12..20]);
    ph.extend_from_slice(&[0, p[9]]);
    ph.extend_from_slice(&u16::try_from(p.len() - 20).unwrap_or(0).to_be_bytes());
    checksum::sum16(&ph)
}

/// Both checksums of an IPv4 TCP packet verify.
fn checksums_hold(p: &[u8]) -> bool {
    checksum::checksum(&p[..20], 0) == 0 && checksum::checksum(&p[20..], pseudo(p)) == 0
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// What an offloading TUN hands over for a local TCP send of `data`: one super-packet, its
/// checksum left partial, to be cut every `mss` bytes.
fn super_packet(data: &[u8], mss: u16) -> (Vec<u8>, VirtioNetHdr) {
    let mut p = tcp(CLIENT, HOST, 5201, 1000, data, true);
    // CHECKSUM_PARTIAL: the field holds the pseudo-header sum only.
    let partial = checksum::finish(pseudo(&p));
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: 1, // NEEDS_CSUM
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 40,
        gso_size: mss,
        csum_start: 20,
        csum_offset: 16,
    };
    (p, hdr)
}

#[tokio::test]
async fn a_tcp_super_packet_split_at_the_datagram_size_goes_out_whole_and_counted_per_segment() {
    let link = Arc::new(Recorder::default());
    let p = peer(Sink(link.clone()), DATAGRAM, false);
    let (dp, drops) = snapshot(&p, true);
    let data = payload(30_000);
    let mss = u16::try_from(DATAGRAM - 40).expect("fits");
    let (mut input, hdr) = super_packet(&data, mss);
    let mut segments = segment_buffers();
    let mut sizes = vec![0usize; BATCH];
    let n = gso_split(&mut input, hdr, &mut segments, &mut sizes, 0, false).expect("split");
    assert_eq!(n, data.len().div_ceil(usize::from(mss)));
    let mut reply = vec![0u8; 1500];
    for (buf, &len) in segments.iter_mut().zip(&sizes).take(n) {
        assert_eq!(send_one(&dp, &mut buf[..len], &mut reply).await, Sent::Done);
    }
    let sent = link.0.lock().expect("lock");
    assert_eq!(
        sent.len(),
        n,
        "every segment on the link, none answered or dropped"
    );
    let mut carried = Vec::new();
    for (i, seg) in sent.iter().enumerate() {
        assert!(seg.len() <= DATAGRAM, "segment {i} is {} bytes", seg.len());
        assert!(checksums_hold(seg), "segment {i}'s checksums");
        let seq = u32::from_be_bytes([seg[24], seg[25], seg[26], seg[27]]);
        assert_eq!(seq, 1000 + u32::from(mss) * i as u32);
        carried.extend_from_slice(&seg[40..]);
    }
    assert_eq!(carried, data, "the segments carry the send, in order");
    let c = &p.counters;
    assert_eq!(c.tx_packets.load(Ordering::Relaxed), n as u64);
    let bytes: usize = sent.iter().map(Vec::len).sum();
    assert_eq!(c.tx_bytes.load(Ordering::Relaxed), bytes as u64);
    assert!(drops.by_name().is_empty(), "{:?}", drops.by_name());
}

#[tokio::test]
async fn segments_above_the_path_are_each_answered_too_big() {
    let link = Arc::new(Recorder::default());
    let p = peer(Sink(link.clone()), DATAGRAM, false);
    let (dp, drops) = snapshot(&p, true);
    // The kernel's segment size went above the path (the TUN's MTU, not the clamped MSS).
    let (mut input, hdr) = super_packet(&payload(5_000), 1400);
    let mut segments = segment_buffers();
    let mut sizes = vec![0usize; BATCH];
    let n = gso_split(&mut input, hdr, &mut segments, &mut sizes, 0, false).expect("split");
    let mut reply = vec![0u8; 1500];
    let mut answered = 0;
    for (buf, &len) in segments.iter_mut().zip(&sizes).take(n) {
        match send_one(&dp, &mut buf[..len], &mut reply).await {
            Sent::Answer(m) => {
                answered += 1;
                // ICMP "fragmentation needed" carrying the link's size.
                assert_eq!((reply[20], reply[21]), (3, 4));
                let mtu = u16::from_be_bytes([reply[26], reply[27]]);
                assert_eq!(usize::from(mtu), DATAGRAM);
                assert!(m > 28);
            }
            Sent::Done if len <= DATAGRAM => {}
            other => panic!("segment of {len} bytes: {other:?}"),
        }
    }
    let too_big = sizes[..n].iter().filter(|&&l| l > DATAGRAM).count();
    assert!(too_big > 0);
    assert_eq!(answered, too_big);
    assert_eq!(drops.get(Drop::TooBigAnswered), too_big as u64);
    assert_eq!(link.0.lock().expect("lock").len(), n - too_big);
}

#[test]
fn a_batch_coalesces_into_one_write_and_every_packet_is_counted_and_policed() {
    let p = peer(Sink::none(), DATAGRAM, true);
    let (dp, drops) = snapshot(&p, false);
    let mut batch = ToTun::default();
    let seg = 1300;
    let data = payload(seg * 20);
    let mut bytes = 0;
    for (i, chunk) in data.chunks(seg).enumerate() {
        let seq = 1000 + (i * seg) as u32;
        let pkt = tcp(CLIENT, HOST, 5201, seq, chunk, false);
        bytes += pkt.len();
        batch.admit(&dp, &p, &pkt);
        if i == 5 {
            // Amid the flow: a spoofed source and a port the policy does not allow.
            batch.admit(&dp, &p, &tcp([100, 64, 0, 9], HOST, 5201, 7, b"x", false));
            batch.admit(&dp, &p, &tcp(CLIENT, HOST, 22, 7, b"y", false));
        }
    }
    assert_eq!(batch.len(), 20, "only the allowed packets are batched");
    let mut tcp_table = Default::default();
    let mut udp_table = Default::default();
    let mut to_write = Vec::new();
    handle_gro(
        batch.packets(),
        HEADROOM,
        &mut tcp_table,
        &mut udp_table,
        true,
        &mut to_write,
    )
    .expect("gro");
    assert_eq!(to_write.len(), 1, "one flow, one write");
    let out = &batch.packets()[to_write[0]];
    let hdr = VirtioNetHdr::decode(&out[..VIRTIO_NET_HDR_LEN]).expect("header");
    assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
    assert_eq!(usize::from(hdr.gso_size), seg);
    assert_eq!(&out[HEADROOM + 40..], &data[..], "the payloads in order");
    // Counted per packet before coalescing: 20 allowed, 2 refused, each by its reason.
    let c = &p.counters;
    assert_eq!(c.rx_packets.load(Ordering::Relaxed), 22);
    assert_eq!(c.rx_bytes.load(Ordering::Relaxed), (bytes + 41 + 41) as u64);
    assert_eq!(c.policy_drops.load(Ordering::Relaxed), 1);
    assert_eq!(drops.get(Drop::SpoofedSource), 1);
    assert_eq!(drops.get(Drop::Policy), 1);
    batch.clear();
    assert_eq!(batch.len(), 0);
}

#[test]
fn a_full_batch_takes_no_more() {
    let mut batch = ToTun::default();
    let pkt = tcp(CLIENT, HOST, 5201, 1, b"z", false);
    for _ in 0..BATCH + 3 {
        batch.push(&pkt);
    }
    assert!(batch.is_full());
    assert_eq!(batch.len(), BATCH);
    for b in batch.packets() {
        assert_eq!(
            &b[..HEADROOM],
            &[0u8; HEADROOM],
            "room for the virtio header"
        );
        assert_eq!(&b[HEADROOM..], &pkt[..]);
    }
}
