//! DNS messages carried over a QUIC link. Two ways, both in DNS-over-TCP framing (a 2-byte
//! length) at the start of a client-opened bidirectional stream:
//! - one stream per query (every version): the query, then the answer;
//! - a DNS channel (newer nodes): the stream opens with [`CHANNEL_MAGIC`] instead of a
//!   length, the connector echoes it, and the stream then carries DnsQuery and DnsAnswer
//!   frames (`core::frame`, a 4-byte request id first, as on the TCP fallback) for the life of
//!   the link, so a query costs a few bytes on a stream that is already open instead of a
//!   stream of its own. A connector that predates channels reads the magic as a length above
//!   [`MAX_QUERY`] and refuses the stream; the client then keeps one stream per query.
//!
//! The TCP fallback carries DNS as frames on its one stream (`link::TcpLink`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::core::frame::{self, FrameType, Limits};
use crate::node::drops::{Limit, Limits as Counts};

/// Largest query a client may relay: one question (a name is at most 255 bytes) and EDNS
/// options; real queries stay under 600 bytes. Both ends check it, so a bigger one is refused
/// by the client instead of breaking the link.
pub const MAX_QUERY: usize = 4096;
/// Largest answer: what DNS over TCP can frame.
pub const MAX_ANSWER: usize = 65_535;
/// A DNS stream that does not deliver its query (or take its answer) in this long is dropped.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// The first two bytes of a DNS channel, both ways.
pub const CHANNEL_MAGIC: [u8; 2] = [0xff, 0xff];
/// How long a client waits for one answer on a channel.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries a client has queued for its channel's writer (its relays in flight are fewer).
const CHANNEL_QUEUE: usize = 1024;
/// Answers queued for a connector's channel writer: more than one client may have in flight
/// (`node::forwarder::MAX_PER_PEER`) plus the instant refusals; beyond it an answer is
/// dropped and counted, as on the TCP fallback.
pub const CHANNEL_ANSWERS: usize = 1024;
/// One write gathers queued frames up to this size.
const WRITE_BATCH: usize = 64 * 1024;
/// What a connector reads on a channel: queries, nothing else.
const CONNECTOR_READS: Limits = Limits {
    control: 0,
    packet: 0,
    dns_query: Some(4 + MAX_QUERY),
    dns_answer: None,
};
/// What a client reads on a channel: answers, nothing else.
const CLIENT_READS: Limits = Limits {
    control: 0,
    packet: 0,
    dns_query: None,
    dns_answer: Some(frame::MAX_PAYLOAD),
};

/// The length at the start of a per-query stream, or the channel's magic.
pub async fn read_len<R: AsyncRead + Unpin>(recv: &mut R) -> anyhow::Result<[u8; 2]> {
    let mut l = [0u8; 2];
    tokio::time::timeout(STREAM_TIMEOUT, recv.read_exact(&mut l)).await??;
    Ok(l)
}

/// The message after a length of `len` bytes, if it is at most `max`, within
/// [`STREAM_TIMEOUT`].
pub async fn read_body<R: AsyncRead + Unpin>(
    recv: &mut R,
    len: [u8; 2],
    max: usize,
) -> anyhow::Result<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes(len));
    anyhow::ensure!(len <= max, "a {len}-byte DNS message, above {max}");
    let mut m = vec![0u8; len];
    tokio::time::timeout(STREAM_TIMEOUT, recv.read_exact(&mut m)).await??;
    Ok(m)
}

/// Reads one framed message of at most `max` bytes from a stream, within [`STREAM_TIMEOUT`].
pub async fn read_framed<R: AsyncRead + Unpin>(
    recv: &mut R,
    max: usize,
) -> anyhow::Result<Vec<u8>> {
    let len = read_len(recv).await?;
    read_body(recv, len, max).await
}

/// Writes one framed message, within [`STREAM_TIMEOUT`].
pub async fn write_framed<W: AsyncWrite + Unpin>(send: &mut W, msg: &[u8]) -> anyhow::Result<()> {
    tokio::time::timeout(STREAM_TIMEOUT, async {
        let len = u16::try_from(msg.len())?;
        let mut m = Vec::with_capacity(2 + msg.len());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(msg);
        send.write_all(&m).await?;
        anyhow::Ok(())
    })
    .await?
}

/// Client: asks the connector over `conn` on a stream of its own.
pub async fn ask(conn: &quinn::Connection, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(STREAM_TIMEOUT, async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_framed(&mut send, msg).await?;
        send.finish()?;
        read_framed(&mut recv, MAX_ANSWER).await
    })
    .await?
}

/// A response with `rcode` that repeats the query's question and nothing else.
pub fn error_response(query: &[u8], question_end: usize, rcode: u8) -> Vec<u8> {
    crate::node::forwarder::error_response(query, question_end, rcode)
}

type Waiters = Arc<Mutex<HashMap<u32, oneshot::Sender<Vec<u8>>>>>;

/// The client's end of a DNS channel: queries go to a writer task that gathers them into few
/// writes; a reader task hands each answer to whoever waits for its id.
pub struct Channel {
    out: mpsc::Sender<Vec<u8>>,
    waiters: Waiters,
    next: AtomicU32,
    closed: Arc<AtomicBool>,
}

impl Channel {
    /// Opens a channel on `conn`; an error when the connector does not take it.
    pub async fn open(conn: &quinn::Connection) -> anyhow::Result<Arc<Channel>> {
        let (send, recv) = tokio::time::timeout(STREAM_TIMEOUT, async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&CHANNEL_MAGIC).await?;
            let mut echo = [0u8; 2];
            recv.read_exact(&mut echo).await?;
            anyhow::ensure!(
                echo == CHANNEL_MAGIC,
                "the connector does not take DNS channels"
            );
            anyhow::Ok((send, recv))
        })
        .await??;
        Ok(Channel::start(recv, send))
    }

    /// A channel on streams past the magic both ways.
    pub fn start<R, W>(recv: R, send: W) -> Arc<Channel>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, queued) = mpsc::channel(CHANNEL_QUEUE);
        let ch = Arc::new(Channel {
            out,
            waiters: Waiters::default(),
            next: AtomicU32::new(1),
            closed: Arc::new(AtomicBool::new(false)),
        });
        tokio::spawn(write_batches(send, queued));
        tokio::spawn(read_answers(recv, ch.waiters.clone(), ch.closed.clone()));
        ch
    }

    /// The stream ended or broke: nothing more is answered on it.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub async fn ask(&self, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(
            msg.len() <= MAX_QUERY,
            "a {}-byte query is above what a connector takes",
            msg.len()
        );
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(id, tx);
        }
        let result = async {
            // Checked after the waiter is in: a reader that ends now drops it.
            anyhow::ensure!(!self.is_closed(), "the DNS channel closed");
            let mut f = Vec::with_capacity(frame::HEADER + 4 + msg.len());
            f.push(FrameType::DnsQuery as u8);
            f.extend_from_slice(&((4 + msg.len()) as u16).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(msg);
            self.out
                .send(f)
                .await
                .map_err(|_| anyhow::anyhow!("the DNS channel closed"))?;
            tokio::time::timeout(ANSWER_TIMEOUT, rx)
                .await
                .map_err(|_| anyhow::anyhow!("no DNS answer on the channel"))?
                .map_err(|_| anyhow::anyhow!("the DNS channel closed"))
        }
        .await;
        if result.is_err()
            && let Ok(mut w) = self.waiters.lock()
        {
            w.remove(&id);
        }
        result
    }
}

async fn write_batches<W: AsyncWrite + Unpin>(mut send: W, mut queued: mpsc::Receiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = queued.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH
            && let Ok(more) = queued.try_recv()
        {
            batch.extend_from_slice(&more);
        }
        if send.write_all(&batch).await.is_err() {
            return;
        }
    }
    let _ = send.shutdown().await;
}

async fn read_answers<R: AsyncRead + Unpin>(
    mut recv: R,
    waiters: Waiters,
    closed: Arc<AtomicBool>,
) {
    let mut decoder = frame::Decoder::new(CLIENT_READS);
    let mut buf = vec![0u8; 16 * 1024];
    'read: while let Ok(n) = recv.read(&mut buf).await
        && n > 0
    {
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some((FrameType::DnsAnswer, mut a))) if a.len() >= 4 => {
                    let id = u32::from_be_bytes([a[0], a[1], a[2], a[3]]);
                    a.drain(..4);
                    let waiter = waiters.lock().ok().and_then(|mut w| w.remove(&id));
                    if let Some(tx) = waiter {
                        let _ = tx.send(a);
                    }
                }
                Ok(None) => break,
                // Anything else from the connector is a broken channel.
                Ok(Some(_)) | Err(_) => break 'read,
            }
        }
    }
    closed.store(true, Ordering::Relaxed);
    if let Ok(mut w) = waiters.lock() {
        w.clear();
    }
}

/// Connector: serves a channel whose magic was read, until the client ends it: each query is
/// handed to `submit` with its request id and the queue its answer goes to; answers are
/// written back as they come. Frames other than queries end the channel (counted).
pub async fn serve_channel<R, W, S>(
    mut recv: R,
    mut send: W,
    submit: S,
    counts: &Arc<Counts>,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    S: Fn(u32, Vec<u8>, &mpsc::Sender<(u32, Vec<u8>)>),
{
    tokio::time::timeout(STREAM_TIMEOUT, send.write_all(&CHANNEL_MAGIC)).await??;
    let (answers, queued) = mpsc::channel(CHANNEL_ANSWERS);
    tokio::spawn(write_answers(send, queued, counts.clone()));
    let mut decoder = frame::Decoder::new(CONNECTOR_READS);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = recv.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some((FrameType::DnsQuery, mut q))) if q.len() >= 4 => {
                    let id = u32::from_be_bytes([q[0], q[1], q[2], q[3]]);
                    q.drain(..4);
                    submit(id, q, &answers);
                }
                Ok(Some((kind, _))) => anyhow::bail!("a {kind:?} frame on a DNS channel"),
                Ok(None) => break,
                Err(e) => {
                    counts.count(Limit::of_frame(e));
                    anyhow::bail!("{e}");
                }
            }
        }
    }
}

async fn write_answers<W: AsyncWrite + Unpin>(
    mut send: W,
    mut queued: mpsc::Receiver<(u32, Vec<u8>)>,
    counts: Arc<Counts>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut payload = Vec::new();
    while let Some(first) = queued.recv().await {
        batch.clear();
        let mut next = Some(first);
        while let Some((id, answer)) = next.take() {
            payload.clear();
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&answer);
            if frame::encode(FrameType::DnsAnswer, &payload, &mut batch).is_err() {
                counts.count(Limit::DnsAnswerQueueFull);
            }
            if batch.len() < WRITE_BATCH {
                next = queued.try_recv().ok();
            }
        }
        if send.write_all(&batch).await.is_err() {
            return;
        }
    }
    let _ = send.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connector end on `stream` that answers each query with its bytes reversed, in
    /// batches of `hold` (the last first) so answers come back out of order.
    fn reversing_connector(
        stream: tokio::io::DuplexStream,
        hold: usize,
        counts: Arc<Counts>,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        tokio::spawn(async move {
            let (recv, send) = tokio::io::split(stream);
            let held = Mutex::new(Vec::new());
            let submit = |id, mut q: Vec<u8>, answers: &mpsc::Sender<(u32, Vec<u8>)>| {
                q.reverse();
                let mut h = held.lock().expect("lock");
                h.push((id, q, answers.clone()));
                if h.len() == hold {
                    for (id, a, tx) in h.drain(..).rev() {
                        tx.try_send((id, a)).expect("room");
                    }
                }
            };
            serve_channel(recv, send, submit, &counts).await
        })
    }

    /// Both ends past the magic, as `Channel::open` and the connector leave them.
    async fn pair(hold: usize) -> (Arc<Channel>, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let (client, connector) = tokio::io::duplex(64 * 1024);
        let server = reversing_connector(connector, hold, Arc::new(Counts::default()));
        let (mut recv, send) = tokio::io::split(client);
        let mut echo = [0u8; 2];
        recv.read_exact(&mut echo).await.expect("magic");
        assert_eq!(echo, CHANNEL_MAGIC);
        (Channel::start(recv, send), server)
    }

    #[tokio::test]
    async fn each_answer_on_a_channel_reaches_the_query_with_its_id() {
        let (ch, _server) = pair(8).await;
        let asks: Vec<_> = (0..64u8)
            .map(|i| {
                let ch = ch.clone();
                tokio::spawn(async move {
                    let q = vec![i, i.wrapping_add(1), 0xee];
                    (q.clone(), ch.ask(&q).await)
                })
            })
            .collect();
        for a in asks {
            let (mut q, answer) = a.await.expect("task");
            q.reverse();
            assert_eq!(answer.expect("answered"), q);
        }
        assert!(!ch.is_closed());
    }

    #[tokio::test]
    async fn a_channel_whose_stream_ends_fails_its_waiting_queries_at_once() {
        let (client, connector) = tokio::io::duplex(64 * 1024);
        let (recv, send) = tokio::io::split(client);
        let ch = Channel::start(recv, send);
        let waiting = {
            let ch = ch.clone();
            tokio::spawn(async move { ch.ask(b"query").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(connector);
        let r = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("failed well before the answer timeout")
            .expect("task");
        assert!(r.is_err());
        assert!(ch.is_closed());
        assert!(ch.ask(b"another").await.is_err());
    }

    #[tokio::test]
    async fn a_connector_ends_a_channel_that_sends_anything_but_queries() {
        for (kind, payload, counted) in [
            (
                FrameType::DnsAnswer,
                vec![0u8; 8],
                Some(Limit::FrameUnexpectedType),
            ),
            (
                FrameType::Control,
                b"{}".to_vec(),
                Some(Limit::FrameTooLong),
            ),
            (FrameType::Packet, vec![0x45; 20], Some(Limit::FrameTooLong)),
            (
                FrameType::DnsQuery,
                vec![0; 5 + MAX_QUERY],
                Some(Limit::FrameTooLong),
            ),
        ] {
            let (mut client, connector) = tokio::io::duplex(64 * 1024);
            let counts = Arc::new(Counts::default());
            let server = reversing_connector(connector, 1, counts.clone());
            let mut f = Vec::new();
            frame::encode(kind, &payload, &mut f).expect("encode");
            client.write_all(&f).await.expect("write");
            let r = tokio::time::timeout(Duration::from_secs(1), server)
                .await
                .expect("ended")
                .expect("task");
            assert!(r.is_err(), "{kind:?} accepted");
            let n = counted.map_or(0, |l| counts.get(l));
            assert_eq!(n, u64::from(counted.is_some()), "{kind:?}");
        }
    }

    #[tokio::test]
    async fn a_query_frame_too_short_for_its_id_ends_the_channel() {
        let (mut client, connector) = tokio::io::duplex(64 * 1024);
        let server = reversing_connector(connector, 1, Arc::new(Counts::default()));
        let mut f = Vec::new();
        frame::encode(FrameType::DnsQuery, &[0, 0, 1], &mut f).expect("encode");
        client.write_all(&f).await.expect("write");
        let r = tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .expect("ended")
            .expect("task");
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn the_channel_magic_is_a_length_an_older_connector_refuses() {
        // What a connector without channels does with a stream: a length, then the query.
        let mut stream: &[u8] = &[0xff, 0xff, 0, 0, 0, 0];
        let len = read_len(&mut stream).await.expect("two bytes");
        assert_eq!(len, CHANNEL_MAGIC);
        assert!(read_body(&mut stream, len, MAX_QUERY).await.is_err());
    }

    #[tokio::test]
    async fn a_per_query_stream_still_reads_as_before() {
        let mut wire = Vec::new();
        write_framed(&mut wire, b"hello").await.expect("write");
        assert_eq!(wire, [0, 5, b'h', b'e', b'l', b'l', b'o']);
        let mut stream: &[u8] = &wire;
        assert_eq!(
            read_framed(&mut stream, MAX_QUERY).await.expect("read"),
            b"hello"
        );
    }
}
