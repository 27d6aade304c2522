//! Relayed packets outside the hub's outer QUIC: once an outer link has authenticated both ends
//! of a session, the end-to-end (inner) QUIC packets travel as plain UDP on the same sockets
//! and 5-tuples, each behind a 13-byte header the hub forwards without opening anything (as
//! TURN does after its authenticated allocation). That spares every packet the outer layer's
//! seal and open at each end and both at the hub: 2 QUIC passes per packet instead of 6.
//!
//! Header: `[TAG][flow: u32 BE][token: u64 BE]`. `TAG`'s two top bits are clear, which no QUIC
//! packet of ours has (our endpoints never grease the fixed bit), so one socket carries both and
//! [`DemuxSocket`] tells them apart by the first byte. The token is 64 random bits the hub gave
//! the flow over the authenticated outer links: an off-path sender who cannot read those links
//! cannot guess it, and the hub also checks the sender's address. What a packet carries is the
//! inner QUIC, sealed end to end; a forged one that got through would be dropped by the inner
//! QUIC like any stray packet.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// First byte of a relayed packet: fixed bit and long-header bit clear.
pub const TAG: u8 = 0x2a;
/// Bytes before the inner QUIC packet.
pub const HEADER: usize = 13;
/// Reads in a row that held nothing for quinn before it gets its turn back.
const RELAYED_READS: usize = 8;
/// The most one send may carry (a UDP datagram's length field bounds a GSO batch too).
const MAX_GSO_BYTES: usize = 65_000;

/// A flow as both of its ends and the hub know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlow {
    pub flow: u32,
    pub token: u64,
}

impl RawFlow {
    /// A fresh flow id's token, from the thread's CSPRNG.
    pub fn new(flow: u32) -> RawFlow {
        RawFlow {
            flow,
            token: rand::random(),
        }
    }

    pub fn header(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0] = TAG;
        h[1..5].copy_from_slice(&self.flow.to_be_bytes());
        h[5..].copy_from_slice(&self.token.to_be_bytes());
        h
    }
}

/// Sends inner packets of `f` (`segment` bytes each, the last may be shorter) to the hub at
/// `to`, each behind its header, in one system call per batch; how many were dropped.
pub fn send_inner(
    socket: &DemuxSocket,
    to: SocketAddr,
    f: RawFlow,
    contents: &[u8],
    segment: usize,
) -> u64 {
    let segment = segment.max(1);
    let count = contents.len().div_ceil(segment);
    let header = f.header();
    let mut buf = Vec::with_capacity(contents.len() + count * HEADER);
    for c in contents.chunks(segment) {
        buf.extend_from_slice(&header);
        buf.extend_from_slice(c);
    }
    if socket.send(to, &buf, segment + HEADER) {
        0
    } else {
        count as u64
    }
}

/// The relayed segments of a run, parsed; `None` for each malformed one.
pub fn segments(run: &[u8], stride: usize) -> impl Iterator<Item = Option<(RawFlow, &[u8])>> {
    run.chunks(stride.max(1)).map(parse)
}

/// Transmits an end hands the socket at once: quinn's batches through the virtual socket.
pub const END_SEGMENTS: usize = 16;

/// Whether a datagram's first byte says "not QUIC": it goes to the [`Divert`], never to quinn.
fn is_raw(first: u8) -> bool {
    first & 0xc0 == 0
}

/// The flow and token of a relayed packet, and the inner packet; `None` when malformed.
pub fn parse(d: &[u8]) -> Option<(RawFlow, &[u8])> {
    if d.len() <= HEADER || d[0] != TAG {
        return None;
    }
    let flow = u32::from_be_bytes(d[1..5].try_into().ok()?);
    let token = u64::from_be_bytes(d[5..HEADER].try_into().ok()?);
    Some((RawFlow { flow, token }, &d[HEADER..]))
}

/// Where relayed packets go when they arrive: `run` is one or more of them from `from`, each
/// `stride` bytes but the last (a GRO batch, or part of one).
pub trait Divert: Send + Sync + 'static {
    fn divert(&self, socket: &DemuxSocket, from: SocketAddr, stride: usize, run: &[u8]);
}

/// A real UDP socket under a quinn endpoint that takes the relayed packets out of what quinn
/// reads, and lets their owner send them on the same socket.
pub struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    /// Weak: what it diverts to may hold quinn connections, which hold this socket.
    divert: OnceLock<Weak<dyn Divert>>,
}

impl fmt::Debug for DemuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemuxSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl DemuxSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> Arc<DemuxSocket> {
        Arc::new(DemuxSocket {
            inner,
            divert: OnceLock::new(),
        })
    }

    /// Who gets the relayed packets, for as long as its owner keeps it; set once. Until then,
    /// and after, they are dropped.
    pub fn set_divert(&self, d: Weak<dyn Divert>) {
        let _ = self.divert.set(d);
    }

    /// Sends `contents` (segments of `segment`, the last may be shorter) to `to`; `false` when
    /// the socket had no room or refused it: the packets are lost, as UDP loses them.
    pub fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> bool {
        let segment = segment.max(1);
        // GSO: at most the socket's segments, and at most 64 KB per system call.
        let per = self
            .inner
            .max_transmit_segments()
            .min(MAX_GSO_BYTES / segment)
            .max(1);
        contents.chunks(per * segment).all(|part| {
            let t = Transmit {
                destination: to,
                ecn: None,
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                src_ip: None,
            };
            self.inner.try_send(&t).is_ok()
        })
    }

    pub fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    /// Takes the relayed segments out of one received buffer: hands each run of them to the
    /// divert and moves what is left (QUIC) to the front. Returns the bytes left.
    fn split(&self, from: SocketAddr, stride: usize, data: &mut [u8]) -> usize {
        let stride = stride.max(1);
        let mut kept = 0;
        let mut start = 0;
        let len = data.len();
        let seg_end = |at: usize| (at + stride).min(len);
        while start < len {
            if is_raw(data[start]) {
                let mut end = seg_end(start);
                while end < len && is_raw(data[end]) {
                    end = seg_end(end);
                }
                if let Some(d) = self.divert.get().and_then(Weak::upgrade) {
                    d.divert(self, from, stride, &data[start..end]);
                }
                start = end;
            } else {
                let end = seg_end(start);
                data.copy_within(start..end, kept);
                kept += end - start;
                start = end;
            }
        }
        kept
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        for _ in 0..RELAYED_READS {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let mut out = 0;
            for i in 0..n {
                let m = meta[i];
                let len = m.len.min(bufs[i].len());
                let quic_only = bufs[i][..len]
                    .chunks(m.stride.max(1))
                    .all(|s| !is_raw(s[0]));
                let kept = if quic_only {
                    len
                } else {
                    self.split(m.addr, m.stride, &mut bufs[i][..len])
                };
                if kept == 0 {
                    continue;
                }
                if out != i {
                    let (head, tail) = bufs.split_at_mut(i);
                    head[out][..kept].copy_from_slice(&tail[0][..kept]);
                }
                meta[out] = RecvMeta { len: kept, ..m };
                out += 1;
            }
            if out > 0 {
                return Poll::Ready(Ok(out));
            }
            // Everything read was relayed: read again (the inner socket registers the waker
            // when it has nothing).
        }
        // A stream of relayed packets (a busy flow, or a flood of forged ones) must not keep
        // quinn's driver in here: it gets back to its connections, and comes back at once.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A quinn endpoint over a [`DemuxSocket`] on `socket`. Its QUIC never greases the fixed bit,
/// so no packet of it is mistaken for a relayed one.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> io::Result<(quinn::Endpoint, Arc<DemuxSocket>)> {
    let runtime = Arc::new(quinn::TokioRuntime);
    let demux = DemuxSocket::new(quinn::Runtime::wrap_udp_socket(&*runtime, socket)?);
    let mut config = quinn::EndpointConfig::default();
    config.grease_quic_bit(false);
    let ep = quinn::Endpoint::new_with_abstract_socket(config, server, demux.clone(), runtime)?;
    Ok((ep, demux))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_header_round_trips_and_anything_else_is_refused() {
        let f = RawFlow {
            flow: 7,
            token: 0x0102_0304_0506_0708,
        };
        let mut d = f.header().to_vec();
        d.extend_from_slice(b"inner");
        assert_eq!(parse(&d), Some((f, &b"inner"[..])));
        assert_eq!(parse(&f.header()), None, "no inner packet");
        d[0] = 0x40;
        assert_eq!(parse(&d), None, "a QUIC short header");
        assert!(is_raw(TAG) && !is_raw(0x40) && !is_raw(0xc0) && !is_raw(0x80 | 0x40));
    }

    struct Seen(Mutex<Vec<(usize, Vec<u8>)>>);

    impl Divert for Seen {
        fn divert(&self, _: &DemuxSocket, _: SocketAddr, stride: usize, run: &[u8]) {
            if let Ok(mut v) = self.0.lock() {
                v.push((stride, run.to_vec()));
            }
        }
    }

    /// A socket under test: it never delivers (`split` is what is tested), or, as a flood,
    /// always has one more relayed packet; it counts its reads.
    #[derive(Debug, Default)]
    struct TestSocket {
        flood: bool,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl AsyncUdpSocket for TestSocket {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            unreachable!("not polled")
        }
        fn try_send(&self, _: &Transmit) -> io::Result<()> {
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut Context,
            bufs: &mut [IoSliceMut<'_>],
            meta: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !self.flood {
                return Poll::Pending;
            }
            bufs[0][..HEADER + 1].fill(0);
            bufs[0][0] = TAG;
            meta[0] = RecvMeta {
                addr: "192.0.2.1:1".parse().expect("addr"),
                len: HEADER + 1,
                stride: HEADER + 1,
                ecn: None,
                dst_ip: None,
            };
            Poll::Ready(Ok(1))
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Err(io::Error::other("none"))
        }
    }

    /// A GRO batch mixing relayed segments and QUIC ones (a keepalive can ride as the short
    /// last segment): the relayed runs go to the divert whole, the QUIC ones stay, in order.
    #[test]
    fn a_mixed_batch_is_split_by_segment() {
        let s = DemuxSocket::new(Arc::new(TestSocket::default()));
        let seen = Arc::new(Seen(Mutex::new(Vec::new())));
        s.set_divert(Arc::downgrade(&seen) as Weak<dyn Divert>);
        let from: SocketAddr = "192.0.2.1:7844".parse().expect("addr");
        let seg = |first: u8, fill: u8| {
            let mut v = vec![fill; 4];
            v[0] = first;
            v
        };
        let mut data = [
            seg(TAG, 1),
            seg(TAG, 2),
            seg(0x41, 3),
            seg(TAG, 4),
            vec![0x40, 5],
        ]
        .concat();
        let kept = s.split(from, 4, &mut data);
        assert_eq!(&data[..kept], &[seg(0x41, 3), vec![0x40, 5]].concat()[..]);
        let seen = seen.0.lock().expect("lock");
        assert_eq!(
            *seen,
            vec![(4, [seg(TAG, 1), seg(TAG, 2)].concat()), (4, seg(TAG, 4))]
        );
    }

    struct Woken(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A flood of relayed packets cannot hold quinn's driver: after a bounded number of reads
    /// that held nothing for quinn, the socket hands the turn back and asks to be polled again.
    #[test]
    fn a_flood_of_relayed_packets_hands_quinn_its_turn_back() {
        use std::sync::atomic::Ordering;
        let flood = Arc::new(TestSocket {
            flood: true,
            ..Default::default()
        });
        let s = DemuxSocket::new(flood.clone());
        let woken = Arc::new(Woken(Default::default()));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 64];
        let mut bufs = [IoSliceMut::new(&mut buf)];
        let mut meta = [RecvMeta::default()];
        assert!(s.poll_recv(&mut cx, &mut bufs, &mut meta).is_pending());
        assert_eq!(flood.reads.load(Ordering::Relaxed), RELAYED_READS);
        assert_eq!(woken.0.load(Ordering::Relaxed), 1, "polled again at once");
    }

    proptest::proptest! {
        /// Any batch (any stride, segments of either kind, a short last one) splits into the
        /// QUIC segments, kept in order at the front, and the relayed ones, handed over in
        /// order: nothing lost, nothing made up, no panic.
        #[test]
        fn any_batch_splits_into_its_two_kinds(
            stride in 1usize..40,
            kinds in proptest::collection::vec(proptest::bool::ANY, 1..20),
            last in 1usize..40,
        ) {
            let s = DemuxSocket::new(Arc::new(TestSocket::default()));
            let seen = Arc::new(Seen(Mutex::new(Vec::new())));
            s.set_divert(Arc::downgrade(&seen) as Weak<dyn Divert>);
            let mut data = Vec::new();
            let (mut quic, mut relayed) = (Vec::new(), Vec::new());
            for (i, raw) in kinds.iter().enumerate() {
                let len = if i + 1 == kinds.len() { last.min(stride) } else { stride };
                let mut seg: Vec<u8> = (0..len).map(|b| (b as u8) | 0x40).collect();
                seg[0] = if *raw { TAG } else { 0x40 | (i as u8 & 0x3f) };
                if *raw { relayed.extend_from_slice(&seg) } else { quic.extend_from_slice(&seg) }
                data.extend_from_slice(&seg);
            }
            let kept = s.split("192.0.2.1:1".parse().expect("addr"), stride, &mut data);
            proptest::prop_assert_eq!(&data[..kept], &quic[..]);
            let seen = seen.0.lock().expect("lock");
            let got: Vec<u8> = seen.iter().flat_map(|(_, r)| r.clone()).collect();
            proptest::prop_assert_eq!(got, relayed);
        }
    }
}
