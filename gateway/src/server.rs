//! The status socket: a thin tokio adapter around a request handler.
//!
//! Bounded like everything that reads from outside: a request is one short line read within
//! [`READ_TIMEOUT`], a whole exchange lasts at most [`EXCHANGE_TIMEOUT`], and at most
//! [`MAX_CONNECTIONS`] are open at once ([`Slots`]: a new one closes the oldest), so idle or
//! slow clients can neither exhaust the daemon's descriptors nor keep `gatewayctl status` out.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::api::{Request, Response};

/// Connections served at once; `gatewayctl status --watch` needs one at a time.
pub const MAX_CONNECTIONS: usize = 64;
/// Time for the request line to arrive: `gatewayctl` sends it at once.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for a whole exchange, writing the answer to a client that reads it included.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line: a request is a few bytes of JSON.
pub const MAX_REQUEST: u64 = 4096;

/// The connections being served, oldest first, so a server can hold at most `max`: taking a
/// slot when all are used closes the oldest, which is the one most likely idle (a real client
/// is done in milliseconds). Unlike waiting for a free slot, this keeps the newest client, the
/// operator typing `gatewayctl status` now, from queueing behind a flood of idle ones.
pub(crate) struct Slots {
    max: usize,
    live: VecDeque<tokio::task::AbortHandle>,
}

impl Slots {
    pub(crate) fn new(max: usize) -> Slots {
        Slots {
            max,
            live: VecDeque::with_capacity(max),
        }
    }

    /// Spawns `serve` for a connection just accepted, closing the oldest if all slots are used.
    /// Returns how many connections were closed to make room (0 or 1).
    pub(crate) fn spawn<F>(&mut self, serve: F) -> usize
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.live.retain(|h| !h.is_finished());
        let mut closed = 0;
        while self.live.len() >= self.max.max(1) {
            if let Some(oldest) = self.live.pop_front() {
                oldest.abort();
                closed += 1;
            }
        }
        self.live.push_back(tokio::spawn(serve).abort_handle());
        closed
    }
}

/// Binds `path` readable and writable by its owner only: access control is by file
/// permission, and the daemon runs as root, so only root may ask it anything.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests until the task is dropped. One slow or broken client never blocks others.
pub async fn serve<H>(listener: UnixListener, handler: Arc<H>)
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let mut slots = Slots::new(MAX_CONNECTIONS);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                let closed = slots.spawn(async move {
                    match tokio::time::timeout(EXCHANGE_TIMEOUT, answer(stream, handler.as_ref()))
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "status client went away"),
                        Err(_) => tracing::debug!("status client too slow; closed"),
                    }
                });
                if closed > 0 {
                    tracing::debug!(
                        "status socket: {MAX_CONNECTIONS} connections open; closed the oldest"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting on the status socket failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer<H>(stream: UnixStream, handler: &H) -> std::io::Result<()>
where
    H: Fn(Request) -> Response,
{
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    tokio::time::timeout(
        READ_TIMEOUT,
        BufReader::new(read.take(MAX_REQUEST)).read_until(b'\n', &mut line),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))??;
    let response = if line.last() != Some(&b'\n') && line.len() as u64 >= MAX_REQUEST {
        Response::Error {
            message: format!("bad request: longer than {MAX_REQUEST} bytes"),
        }
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handler(req),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream as StdStream;
    use std::time::Instant;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    /// Held by each test that runs a server, one at a time: the descriptor count of
    /// `answers_while_five_hundred_idle_connections_are_open` is the whole process's, and
    /// another server's runtime and connections starting meanwhile would be counted as its.
    static ONE_SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A status server on a socket in a fresh directory, answering every request with an
    /// error naming `name` (enough to tell a served request from a refused one). The guard
    /// (first) outlives the runtime when the caller binds all three.
    fn start(
        name: &str,
    ) -> (
        std::sync::MutexGuard<'static, ()>,
        tokio::runtime::Runtime,
        std::path::PathBuf,
    ) {
        let one = ONE_SERVER.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("gw-server-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("s.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = {
            let _guard = rt.enter();
            bind(&path).expect("bind")
        };
        rt.spawn(serve(
            listener,
            Arc::new(|_req: Request| Response::Error {
                message: "served".into(),
            }),
        ));
        (one, rt, path)
    }

    fn ask(path: &Path) -> Result<Response, crate::api::ClientError> {
        crate::api::request(path, &Request::Status, Duration::from_secs(5))
    }

    #[test]
    fn answers_while_five_hundred_idle_connections_are_open() {
        let (_one, _rt, path) = start("idle");
        let before = open_fds();
        let idle: Vec<StdStream> = (0..500)
            .map(|_| StdStream::connect(&path).expect("connect"))
            .collect();
        // Let the server accept them all.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let answer = ask(&path).expect("status answers");
        assert_eq!(
            answer,
            Response::Error {
                message: "served".into()
            }
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        // The server holds at most MAX_CONNECTIONS of them; the test holds the 500 client ends.
        let held = open_fds().saturating_sub(before + idle.len());
        assert!(
            held <= MAX_CONNECTIONS + 4,
            "the server holds {held} descriptors"
        );
        drop(idle);
    }

    #[test]
    fn closes_a_connection_that_sends_nothing() {
        use std::io::Read;
        let (_one, _rt, path) = start("silent");
        let mut s = StdStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(READ_TIMEOUT * 3)).expect("timeout");
        let started = Instant::now();
        let mut buf = Vec::new();
        let n = s
            .read_to_end(&mut buf)
            .expect("closed by the server, not timed out");
        assert_eq!(n, 0, "no answer to no request");
        assert!(started.elapsed() >= READ_TIMEOUT - Duration::from_millis(100));
        assert!(
            started.elapsed() < READ_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn refuses_an_oversized_request_without_reading_it_all() {
        use std::io::{BufRead, Write};
        let (_one, _rt, path) = start("big");
        let mut s = StdStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // No newline: a client that would stream forever.
        let _ = s.write_all(&vec![b'x'; 64 * 1024]);
        let mut line = String::new();
        std::io::BufReader::new(&s)
            .read_line(&mut line)
            .expect("an answer");
        let answer: Response = serde_json::from_str(&line).expect("json");
        match answer {
            Response::Error { message } => {
                assert!(message.contains("longer than 4096 bytes"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn slots_close_the_oldest_when_full() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut slots = Slots::new(2);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let first_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = first_closed.clone();
            struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);
            impl Drop for SetOnDrop {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            assert_eq!(
                slots.spawn(async move {
                    let _g = SetOnDrop(flag);
                    std::future::pending::<()>().await
                }),
                0
            );
            assert_eq!(
                slots.spawn(async move {
                    let _ = rx.await;
                }),
                0
            );
            tokio::task::yield_now().await;
            assert_eq!(slots.spawn(async {}), 1, "the third closes the first");
            tokio::task::yield_now().await;
            assert!(first_closed.load(std::sync::atomic::Ordering::SeqCst));
            // A finished connection frees its slot without closing anyone.
            let _ = tx.send(());
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert_eq!(slots.spawn(async {}), 0);
        });
    }
}
