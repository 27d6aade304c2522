//! DNS messages carried over a QUIC link: one bidirectional stream per query, each message in
//! DNS-over-TCP framing (a 2-byte length). The TCP fallback carries them as frames instead
//! (`link::TcpLink`); both ends of both transports use what is here.

use std::time::Duration;

/// Largest query a client may relay: one question (a name is at most 255 bytes) and EDNS
/// options; real queries stay under 600 bytes. Both ends check it, so a bigger one is refused
/// by the client instead of breaking the link.
pub const MAX_QUERY: usize = 4096;
/// Largest answer: what DNS over TCP can frame.
pub const MAX_ANSWER: usize = 65_535;
/// A DNS stream that does not deliver its query (or take its answer) in this long is dropped.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads one framed message of at most `max` bytes from a stream, within [`STREAM_TIMEOUT`].
pub async fn read_framed(recv: &mut quinn::RecvStream, max: usize) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(STREAM_TIMEOUT, async {
        let mut l = [0u8; 2];
        recv.read_exact(&mut l).await?;
        let len = usize::from(u16::from_be_bytes(l));
        anyhow::ensure!(len <= max, "a {len}-byte DNS message, above {max}");
        let mut m = vec![0u8; len];
        recv.read_exact(&mut m).await?;
        Ok(m)
    })
    .await?
}

/// Writes one framed message, within [`STREAM_TIMEOUT`].
pub async fn write_framed(send: &mut quinn::SendStream, msg: &[u8]) -> anyhow::Result<()> {
    tokio::time::timeout(STREAM_TIMEOUT, async {
        let len = u16::try_from(msg.len())?;
        send.write_all(&len.to_be_bytes()).await?;
        send.write_all(msg).await?;
        anyhow::Ok(())
    })
    .await?
}

/// Client: asks the connector over `conn`.
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
