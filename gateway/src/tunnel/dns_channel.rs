//! A DNS channel: one long-lived QUIC stream per link that carries a client's queries and the
//! connector's answers as `core::frame` DnsQuery and DnsAnswer frames (a 4-byte request id
//! first, as on the TCP fallback), so a query costs a few bytes on a stream already open
//! instead of a stream of its own, and answers that arrive together leave in one write. The
//! stream opens with `relay::CHANNEL_MAGIC` both ways; a connector that does not echo it gets
//! a stream per query instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::relay::{CHANNEL_MAGIC, MAX_QUERY, STREAM_TIMEOUT};
use crate::core::frame::{self, FrameType, Limits};
use crate::node::drops::{Limit, Limits as Counts};

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

/// What is done with an answer (or its absence: `None`) without a task waiting for it.
pub type Then = Box<dyn FnOnce(Option<Vec<u8>>) + Send>;

/// Who waits for an answer: a task, or a call made by the channel's reader.
enum Waiter {
    Task(oneshot::Sender<Vec<u8>>),
    /// Called with `None` once the deadline has passed (checked every [`SWEEP_EVERY`]).
    Call(tokio::time::Instant, Then),
}

type Waiters = Arc<Mutex<HashMap<u32, Waiter>>>;

/// How often the reader ends calls whose answer is overdue.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// The client's end of a DNS channel: queries go to a writer task that gathers them into few
/// writes; a reader task hands each answer to whoever waits for its id.
pub struct Channel {
    out: mpsc::Sender<Vec<u8>>,
    waiters: Waiters,
    next: AtomicU32,
    closed: Arc<AtomicBool>,
    answer_timeout: Duration,
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
        Channel::start_timed(recv, send, ANSWER_TIMEOUT)
    }

    /// [`start`](Self::start), waiting `answer_timeout` for each answer.
    fn start_timed<R, W>(recv: R, send: W, answer_timeout: Duration) -> Arc<Channel>
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
            answer_timeout,
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
            w.insert(id, Waiter::Task(tx));
        }
        let result = async {
            // Checked after the waiter is in: a reader that ends now drops it.
            anyhow::ensure!(!self.is_closed(), "the DNS channel closed");
            self.out
                .send(query_frame(id, msg))
                .await
                .map_err(|_| anyhow::anyhow!("the DNS channel closed"))?;
            tokio::time::timeout(self.answer_timeout, rx)
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

    /// Sends `msg` and returns at once; the channel's reader calls `then` with the answer, or
    /// with `None` when none comes in [`ANSWER_TIMEOUT`] or the channel closes. Spares a task
    /// and a wake-up per query.
    pub fn ask_then(&self, msg: &[u8], then: Then) {
        if msg.len() > MAX_QUERY || self.is_closed() {
            return then(None);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.answer_timeout;
        let Ok(mut w) = self.waiters.lock() else {
            return then(None);
        };
        w.insert(id, Waiter::Call(deadline, then));
        drop(w);
        // Checked after the waiter is in: a reader that ends now calls it.
        let sent = !self.is_closed() && self.out.try_send(query_frame(id, msg)).is_ok();
        if !sent && let Some(Waiter::Call(_, then)) = self.take(id) {
            then(None);
        }
    }

    fn take(&self, id: u32) -> Option<Waiter> {
        self.waiters.lock().ok()?.remove(&id)
    }
}

fn query_frame(id: u32, msg: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(frame::HEADER + 4 + msg.len());
    f.push(FrameType::DnsQuery as u8);
    f.extend_from_slice(&((4 + msg.len()) as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(msg);
    f
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
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    'read: loop {
        let n = tokio::select! {
            r = recv.read(&mut buf) => match r {
                Ok(n) if n > 0 => n,
                _ => break,
            },
            now = sweep.tick() => {
                overdue(&waiters, now);
                continue;
            }
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some((FrameType::DnsAnswer, mut a))) if a.len() >= 4 => {
                    let id = u32::from_be_bytes([a[0], a[1], a[2], a[3]]);
                    a.drain(..4);
                    match waiters.lock().ok().and_then(|mut w| w.remove(&id)) {
                        Some(Waiter::Task(tx)) => {
                            let _ = tx.send(a);
                        }
                        Some(Waiter::Call(_, then)) => then(Some(a)),
                        None => {}
                    }
                }
                Ok(None) => break,
                // Anything else from the connector is a broken channel.
                Ok(Some(_)) | Err(_) => break 'read,
            }
        }
    }
    closed.store(true, Ordering::Relaxed);
    let left: Vec<Waiter> = match waiters.lock() {
        Ok(mut w) => w.drain().map(|(_, w)| w).collect(),
        Err(_) => Vec::new(),
    };
    for w in left {
        if let Waiter::Call(_, then) = w {
            then(None);
        }
    }
}

/// Ends the calls whose answer is overdue (tasks time out on their own).
fn overdue(waiters: &Waiters, now: tokio::time::Instant) {
    let late: Vec<Then> = match waiters.lock() {
        Ok(mut w) => {
            let ids: Vec<u32> = w
                .iter()
                .filter(|(_, w)| matches!(w, Waiter::Call(d, _) if *d <= now))
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| match w.remove(id) {
                    Some(Waiter::Call(_, then)) => Some(then),
                    _ => None,
                })
                .collect()
        }
        Err(_) => Vec::new(),
    };
    for then in late {
        then(None);
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

    /// A `Then` that hands what it was called with to `tx`.
    fn then_to(tx: mpsc::UnboundedSender<Option<Vec<u8>>>) -> Then {
        Box::new(move |a| {
            let _ = tx.send(a);
        })
    }

    #[tokio::test]
    async fn a_call_on_a_channel_gets_its_answer_from_the_reader() {
        let (ch, _server) = pair(2).await;
        let (tx, mut called) = mpsc::unbounded_channel();
        ch.ask_then(b"abc", then_to(tx.clone()));
        ch.ask_then(b"xyz", then_to(tx));
        let mut got = vec![
            called.recv().await.expect("called").expect("answer"),
            called.recv().await.expect("called").expect("answer"),
        ];
        got.sort();
        assert_eq!(got, [b"cba".to_vec(), b"zyx".to_vec()]);
    }

    #[tokio::test]
    async fn a_call_whose_answer_never_comes_is_ended_after_the_timeout() {
        // Held until a second query comes, which never does.
        let (client, connector) = tokio::io::duplex(64 * 1024);
        let _server = reversing_connector(connector, 2, Arc::new(Counts::default()));
        let (mut recv, send) = tokio::io::split(client);
        recv.read_exact(&mut [0u8; 2]).await.expect("magic");
        let timeout = Duration::from_millis(300);
        let ch = Channel::start_timed(recv, send, timeout);
        let (tx, mut called) = mpsc::unbounded_channel();
        ch.ask_then(b"abc", then_to(tx));
        tokio::time::sleep(timeout - Duration::from_millis(100)).await;
        assert!(called.try_recv().is_err(), "ended before its timeout");
        tokio::time::sleep(SWEEP_EVERY + Duration::from_millis(200)).await;
        assert_eq!(called.try_recv().expect("ended"), None);
        assert!(!ch.is_closed());
    }

    #[tokio::test]
    async fn calls_on_a_channel_that_closes_are_ended_and_new_ones_refused() {
        let (client, connector) = tokio::io::duplex(64 * 1024);
        let (recv, send) = tokio::io::split(client);
        let ch = Channel::start(recv, send);
        let (tx, mut called) = mpsc::unbounded_channel();
        ch.ask_then(b"query", then_to(tx.clone()));
        drop(connector);
        let first = tokio::time::timeout(Duration::from_secs(1), called.recv()).await;
        assert_eq!(first.expect("ended at once"), Some(None));
        assert!(ch.is_closed());
        ch.ask_then(b"another", then_to(tx));
        assert_eq!(called.try_recv().expect("refused at once"), None);
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
}
