//! The status socket: a thin tokio adapter around a request handler.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::api::{MAX_LINE, Request, Response};

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
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, handler.as_ref()).await {
                        tracing::debug!(error = %e, "status client went away");
                    }
                });
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
    let mut line = String::new();
    BufReader::new(read.take(MAX_LINE))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handler(req),
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}
