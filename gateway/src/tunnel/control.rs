//! Control messages on streams: reading and writing [`Control`] on a QUIC stream or any byte
//! stream, with the length prefix and the size bounds of `core::control`.

use crate::core::control::CodecError;
pub use crate::core::control::{
    Control, MAX_CLIENT_MESSAGE, MAX_MESSAGE, PROTOCOL_VERSION, compatible, decode, encode,
    encode_body, software,
};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control message of {0} bytes exceeds this side's limit")]
    TooLong(usize),
    #[error("control stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("control stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("control message is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the link closed")]
    Closed,
    #[error("TCP link: {0}")]
    Stream(String),
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
}

impl From<CodecError> for ControlError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooLong(n) => ControlError::TooLong(n),
            CodecError::Decode(d) => ControlError::Decode(d),
        }
    }
}

pub async fn send(stream: &mut quinn::SendStream, msg: &Control) -> Result<(), ControlError> {
    stream.write_all(&encode(msg)?).await?;
    Ok(())
}

/// One message of at most `max` bytes; a longer one is refused from its length prefix.
pub async fn recv(stream: &mut quinn::RecvStream, max: usize) -> Result<Control, ControlError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(ControlError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(decode(&body)?)
}

/// [`send`] for any byte stream (an access connection over QUIC or TLS over TCP).
pub async fn send_io<W>(w: &mut W, msg: &Control) -> Result<(), ControlError>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    w.write_all(&encode(msg)?).await?;
    w.flush().await?;
    Ok(())
}

/// [`recv`] for any byte stream.
pub async fn recv_io<R>(r: &mut R, max: usize) -> Result<Control, ControlError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(ControlError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(decode(&body)?)
}
