//! Single packets into a TUN that may have offload on: the datapath's ICMP answers and the DNS
//! relay's replies both write this way, so neither needs the other's module.

use tun_rs::{AsyncDevice, VIRTIO_NET_HDR_LEN};

/// Room in front of every packet written into the TUN: the virtio-net header a TUN with offload
/// expects, which tun-rs's GRO fills in when it coalesces a batch into super-packets.
pub const HEADROOM: usize = VIRTIO_NET_HDR_LEN;

/// Writes one packet into the TUN, behind an empty virtio-net header when the TUN has offload
/// on (no segmentation, checksums already complete): for the rare packets written alone, ICMP
/// answers and DNS replies.
pub async fn write_one(tun: &AsyncDevice, pkt: &[u8]) -> std::io::Result<()> {
    if tun.tcp_gso() {
        tun.send(&framed(pkt)).await.map(|_| ())
    } else {
        tun.send(pkt).await.map(|_| ())
    }
}

/// `pkt` as a TUN with offload takes one packet: behind an empty virtio-net header (no GSO,
/// no checksum to finish), which the kernel would otherwise read the packet's first bytes as.
pub fn for_tun(tun: &AsyncDevice, pkt: Vec<u8>) -> Vec<u8> {
    match tun.tcp_gso() {
        true => framed(&pkt),
        false => pkt,
    }
}

fn framed(pkt: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(HEADROOM + pkt.len());
    framed.resize(HEADROOM, 0);
    framed.extend_from_slice(pkt);
    framed
}
