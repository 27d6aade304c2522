//! The reader of a TLS-over-TCP link: on a connector, the hello alone (one Control frame of
//! bounded size, its length checked from the header before anything else is read), then
//! nothing until the welcome; after it, and on a client, frames checked against the side's
//! limits from their header and handed to the link's queues.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use super::control::{self, Control, ControlError, MAX_CLIENT_MESSAGE};
use crate::core::frame::{self, FrameError, FrameType, Limits};
use crate::node::drops::{Limit, Limits as Counts};

/// DNS answers a client is waiting for, by request id; shared with its link.
pub(super) type PendingDns =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u32, oneshot::Sender<Vec<u8>>>>>;

/// Largest IP packet the TCP fallback carries. Below the 1362 bytes a fresh QUIC connection's
/// datagrams hold, so a TCP session whose MSS was clamped on the fallback still fits when the
/// tunnel moves back to QUIC, without waiting for path MTU discovery.
pub const TCP_MAX_PACKET: usize = 1360;
/// Which end of a link this is: it decides what may be read from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Connector,
}

impl Side {
    /// The largest frame of each type this side accepts from its peer.
    pub const fn limits(self) -> Limits {
        match self {
            // From the connector: welcomes and route updates, packets, answers.
            Side::Client => Limits {
                control: control::MAX_MESSAGE,
                packet: TCP_MAX_PACKET,
                dns_query: None,
                dns_answer: Some(frame::MAX_PAYLOAD),
            },
            // From a client: small control messages, packets, queries; never answers.
            Side::Connector => Limits {
                control: MAX_CLIENT_MESSAGE,
                packet: TCP_MAX_PACKET,
                dns_query: Some(4 + super::relay::MAX_QUERY),
                dns_answer: None,
            },
        }
    }

    /// The largest control message this side reads.
    pub const fn control_max(self) -> usize {
        match self {
            Side::Client => control::MAX_MESSAGE,
            Side::Connector => MAX_CLIENT_MESSAGE,
        }
    }
}

/// Where the reader hands what it decoded.
pub(super) struct Dispatch<'a> {
    pub(super) pending: PendingDns,
    pub(super) packets: mpsc::Sender<Bytes>,
    pub(super) control: mpsc::Sender<Result<Control, ControlError>>,
    pub(super) dns: mpsc::Sender<(u32, Vec<u8>)>,
    pub(super) tally: &'a Counts,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("{0}")]
    Frame(FrameError),
    #[error("the first frame is a {0:?} frame, not the hello")]
    NotHello(FrameType),
    #[error("reading the TCP link: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the TCP link")]
    Eof,
    #[error("DNS frame shorter than its request id")]
    ShortDns,
}

/// The hello: exactly one Control frame of at most MAX_CLIENT_MESSAGE bytes, its length
/// checked before the payload is read. Nothing past it is read.
async fn read_hello<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, ReadError> {
    // Any other type is refused as such (NotHello), whatever length it announces.
    let limits = Limits {
        control: MAX_CLIENT_MESSAGE,
        ..Limits::ANY
    };
    let mut header = [0u8; frame::HEADER];
    reader.read_exact(&mut header).await?;
    let (kind, len) = frame::check_header(header, &limits).map_err(ReadError::Frame)?;
    if kind != FrameType::Control {
        return Err(ReadError::NotHello(kind));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(body)
}

pub(super) async fn read_frames<R: AsyncRead>(
    reader: R,
    side: Side,
    gate: Option<oneshot::Receiver<()>>,
    to: Dispatch<'_>,
) -> Result<(), ReadError> {
    let mut reader = std::pin::pin!(reader);
    if let Some(gate) = gate {
        let hello = read_hello(&mut reader).await?;
        if to
            .control
            .send(control::decode(&hello).map_err(ControlError::from))
            .await
            .is_err()
        {
            return Ok(());
        }
        // A refused client is closed instead (and this task aborted).
        if gate.await.is_err() {
            return Ok(());
        }
    }
    let mut decoder = frame::Decoder::new(side.limits());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Err(ReadError::Eof);
        }
        decoder.push(&buf[..n]);
        while let Some((kind, payload)) = decoder.next_frame().map_err(ReadError::Frame)? {
            match kind {
                FrameType::Packet => {
                    // Waiting here pushes back on the sender through TCP's own flow control.
                    if to.packets.send(Bytes::from(payload)).await.is_err() {
                        return Ok(());
                    }
                }
                FrameType::Control => {
                    let msg = control::decode(&payload).map_err(ControlError::from);
                    if to.control.send(msg).await.is_err() {
                        return Ok(());
                    }
                }
                FrameType::DnsQuery | FrameType::DnsAnswer if payload.len() < 4 => {
                    return Err(ReadError::ShortDns);
                }
                FrameType::DnsQuery => {
                    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if to.dns.try_send((id, payload[4..].to_vec())).is_err() {
                        to.tally.count(Limit::DnsQueueFull);
                    }
                }
                FrameType::DnsAnswer => {
                    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    let waiter = to.pending.lock().ok().and_then(|mut p| p.remove(&id));
                    if let Some(tx) = waiter {
                        let _ = tx.send(payload[4..].to_vec());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(kind: FrameType, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame::encode(kind, payload, &mut f).expect("encode");
        f
    }

    struct Ends {
        packets: mpsc::Receiver<Bytes>,
        control: mpsc::Receiver<Result<Control, ControlError>>,
    }

    /// Runs a connector's reader on `input` (then the stream stays open), its gate shut.
    async fn connector_reads(input: Vec<u8>) -> (Result<(), ReadError>, Ends, Counts) {
        let (mut peer, ours) = tokio::io::duplex(256 * 1024);
        peer.write_all(&input).await.expect("write");
        let (packets_tx, packets) = mpsc::channel(16);
        let (control_tx, control) = mpsc::channel(16);
        let (dns_tx, _dns) = mpsc::channel(16);
        let (_gate_tx, gate) = oneshot::channel::<()>();
        let tally = Counts::default();
        let to = Dispatch {
            pending: PendingDns::default(),
            packets: packets_tx,
            control: control_tx,
            dns: dns_tx,
            tally: &tally,
        };
        let run = read_frames(ours, Side::Connector, Some(gate), to);
        // A reader waiting at its gate (or for bytes) has done all it will do.
        let result = tokio::time::timeout(std::time::Duration::from_millis(200), run)
            .await
            .unwrap_or(Ok(()));
        drop(peer);
        (result, Ends { packets, control }, tally)
    }

    #[tokio::test]
    async fn before_the_welcome_only_the_hello_is_read() {
        let hello = br#"{"type":"keepalive","seq":1}"#;
        let mut input = frame(FrameType::Control, hello);
        input.extend(frame(FrameType::Packet, &[0x45; 100]));
        input.extend(frame(FrameType::Control, hello));
        let (result, mut ends, _) = connector_reads(input).await;
        assert!(result.is_ok());
        assert!(matches!(
            ends.control.try_recv(),
            Ok(Ok(Control::Keepalive { seq: 1 }))
        ));
        assert!(ends.control.try_recv().is_err(), "nothing after the hello");
        assert!(
            ends.packets.try_recv().is_err(),
            "no packet before the welcome"
        );
    }

    #[tokio::test]
    async fn a_first_frame_that_is_no_small_hello_ends_the_link_from_its_header() {
        // Only the header is sent: the reader must not wait for the 64 KiB it announces.
        let (result, _, _) = connector_reads(vec![0, 0xff, 0xff]).await;
        assert!(
            matches!(result, Err(ReadError::Frame(FrameError::TooLong(65_535)))),
            "{result:?}"
        );
        let over = u16::try_from(MAX_CLIENT_MESSAGE + 1).expect("fits");
        let mut header = vec![0];
        header.extend(over.to_be_bytes());
        let (result, _, _) = connector_reads(header).await;
        assert!(matches!(
            result,
            Err(ReadError::Frame(FrameError::TooLong(_)))
        ));
        let (result, _, _) = connector_reads(vec![1, 0xff, 0xff]).await;
        assert!(
            matches!(result, Err(ReadError::NotHello(FrameType::Packet))),
            "{result:?}"
        );
    }
}
