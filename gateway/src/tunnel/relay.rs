//! DNS messages carried over a QUIC link, in DNS-over-TCP framing (a 2-byte length) at the
//! start of a client-opened bidirectional stream: one stream per query (every version), the
//! query then the answer, or a DNS channel (newer nodes, `dns_channel`): the stream opens with
//! [`CHANNEL_MAGIC`] instead of a length. A connector that predates channels reads the magic as
//! a length above [`MAX_QUERY`] and refuses the stream; the client then keeps one stream per
//! query. The TCP fallback carries DNS as frames on its one stream (`link::TcpLink`).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

#[cfg(test)]
mod tests {
    use super::*;

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
