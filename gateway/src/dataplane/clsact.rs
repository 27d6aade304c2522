//! Legacy TC for kernels without TCX (before 6.6): the `clsact` qdisc the programs hang from,
//! and the BPF filters the kernel reports on it, over a plain synchronous rtnetlink socket.
//!
//! aya attaches and detaches the filters; it cannot tell whether a clsact qdisc is there,
//! remove one, or list the filters with their program ids — which the daemon needs to remove
//! only a qdisc it added, and status needs to show what the kernel has, not what the daemon
//! believes. Synchronous, so status and cleanup can ask from any thread without a runtime.

use std::io;

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

const CLSACT: &str = "clsact";

/// Which side of a clsact qdisc a filter hangs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ingress,
    Egress,
}

impl Side {
    fn parent(self) -> TcHandle {
        TcHandle {
            major: 0xffff,
            minor: match self {
                Side::Ingress => TcHandle::MIN_INGRESS,
                Side::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

/// A BPF filter (cls_bpf) the kernel reports on a clsact hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfFilter {
    pub prog_id: u32,
    /// The name tc shows: the program's name as the loader gave it.
    pub name: String,
    /// The program's tag, as `bpftool prog` shows it.
    pub tag: String,
    pub priority: u16,
    pub handle: u32,
}

/// Whether the interface has a clsact qdisc now.
pub fn present(ifindex: u32) -> io::Result<bool> {
    let replies = request(
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
        NLM_F_REQUEST | NLM_F_DUMP,
    )?;
    // Without strict checking the kernel dumps every interface's qdiscs: pick ours.
    Ok(replies.iter().any(|m| match m {
        RouteNetlinkMessage::NewQueueDiscipline(q) => {
            index_matches(q, ifindex) && kind(q) == Some(CLSACT)
        }
        _ => false,
    }))
}

/// Adds a clsact qdisc; `Ok(false)` when one was already there (someone else's: it stays when
/// the daemon stops). Another root ingress qdisc in its place is an error that says so.
pub fn add(iface: &str, ifindex: u32) -> io::Result<bool> {
    match aya::programs::tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            if present(ifindex)? {
                Ok(false)
            } else {
                Err(io::Error::other(format!(
                    "{iface} has an ingress qdisc, which takes the place of the clsact qdisc \
                     legacy TC needs; remove it (tc qdisc del dev {iface} ingress) or use TCX"
                )))
            }
        }
        Err(e) => Err(e),
    }
}

/// Deletes the interface's clsact qdisc, and with it every filter still on it.
pub fn remove(ifindex: u32) -> io::Result<()> {
    let mut msg = TcMessage::default();
    msg.header.index = ifindex_i32(ifindex)?;
    msg.header.parent = TcHandle::CLSACT;
    msg.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    msg.attributes.push(TcAttribute::Kind(CLSACT.into()));
    request(
        RouteNetlinkMessage::DelQueueDiscipline(msg),
        NLM_F_REQUEST | NLM_F_ACK,
    )
    .map(|_| ())
}

/// The BPF filters on one side of the interface's clsact qdisc, in the order they run
/// (by priority); none when there is no clsact qdisc.
pub fn bpf_filters(ifindex: u32, side: Side) -> io::Result<Vec<BpfFilter>> {
    if !present(ifindex)? {
        return Ok(Vec::new());
    }
    let mut msg = TcMessage::default();
    msg.header.index = ifindex_i32(ifindex)?;
    msg.header.parent = side.parent();
    let replies = request(
        RouteNetlinkMessage::GetTrafficFilter(msg),
        NLM_F_REQUEST | NLM_F_DUMP,
    )?;
    let mut filters: Vec<BpfFilter> = replies
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(f) if index_matches(f, ifindex) => bpf_filter(f),
            _ => None,
        })
        .collect();
    filters.sort_by_key(|f| (f.priority, f.handle));
    Ok(filters)
}

/// Whether any filter (BPF or not) hangs on either side of the interface's clsact qdisc.
pub fn has_filters(ifindex: u32) -> io::Result<bool> {
    for side in [Side::Ingress, Side::Egress] {
        let mut msg = TcMessage::default();
        msg.header.index = ifindex_i32(ifindex)?;
        msg.header.parent = side.parent();
        let replies = request(
            RouteNetlinkMessage::GetTrafficFilter(msg),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        if replies.iter().any(
            |m| matches!(m, RouteNetlinkMessage::NewTrafficFilter(f) if index_matches(f, ifindex)),
        ) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One filter message as a BPF filter, when it is one with a program attached (the kernel also
/// reports a bare entry per priority, without options).
fn bpf_filter(f: &TcMessage) -> Option<BpfFilter> {
    if kind(f) != Some("bpf") {
        return None;
    }
    let mut prog_id = None;
    let mut name = String::new();
    let mut tag = String::new();
    for a in &f.attributes {
        if let TcAttribute::Options(options) = a {
            for o in options {
                match o {
                    TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => prog_id = Some(*id),
                    TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = n.clone(),
                    TcOption::Bpf(TcFilterBpfOption::ProgTag(t)) => {
                        tag = t.iter().map(|b| format!("{b:02x}")).collect()
                    }
                    _ => {}
                }
            }
        }
    }
    Some(BpfFilter {
        prog_id: prog_id?,
        name,
        tag,
        // tcm_info carries the priority in its upper 16 bits and the protocol below.
        priority: (f.header.info >> 16) as u16,
        handle: u32::from(f.header.handle),
    })
}

fn kind(m: &TcMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })
}

fn index_matches(m: &TcMessage, ifindex: u32) -> bool {
    u32::try_from(m.header.index) == Ok(ifindex)
}

fn ifindex_i32(ifindex: u32) -> io::Result<i32> {
    i32::try_from(ifindex).map_err(|_| io::Error::other(format!("ifindex {ifindex} too large")))
}

/// Sends one request and collects the replies: every message of a dump until its end, or the
/// acknowledgement of a change. A netlink error becomes the matching `io::Error`.
fn request(msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = NetlinkMessage::from(msg);
    message.header.flags = flags;
    message.header.sequence_number = 1;
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut replies = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        if data.is_empty() {
            return Err(io::Error::other("netlink: empty reply"));
        }
        let mut offset = 0;
        while offset < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(|e| io::Error::other(format!("netlink: {e}")))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(replies),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(m) => replies.push(m),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
        }
        if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
            return Ok(replies);
        }
    }
}
