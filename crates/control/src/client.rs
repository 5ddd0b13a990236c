//! The CLI's side of the control API: find the running control plane from the data
//! dir's metadata and call it.

use crate::metadata::{FileStore, MetadataStore};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Operations may wait for a node to stop (SIGTERM, then SIGKILL after 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no Borealis cluster at {0} (start one with `borealis up --data-dir {0}`)")]
    NoCluster(String),
    #[error(transparent)]
    Meta(#[from] crate::metadata::MetaError),
    #[error("the cluster at {dir} is not running (control API {addr}: {why})")]
    NotRunning {
        dir: String,
        addr: SocketAddr,
        why: String,
    },
    /// The control plane refused the request; its one-line reason.
    #[error("{0}")]
    Refused(String),
}

pub fn control_addr(data_dir: &Path) -> Result<SocketAddr, ClientError> {
    let meta = FileStore::new(data_dir)
        .load()?
        .ok_or_else(|| ClientError::NoCluster(data_dir.display().to_string()))?;
    Ok(crate::supervisor::loopback(meta.ports.control))
}

/// Calls the control API. Non-200 answers become [`ClientError::Refused`] carrying
/// the server's `error` message.
pub async fn call(
    data_dir: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ClientError> {
    let addr = control_addr(data_dir)?;
    let not_running = |why: String| ClientError::NotRunning {
        dir: data_dir.display().to_string(),
        addr,
        why,
    };
    let (status, bytes) = borealis_common::http::request(addr, method, path, body, CALL_TIMEOUT)
        .await
        .map_err(|e| not_running(e.to_string()))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Refused(format!("malformed answer from the control API: {e}")))?;
    if status != 200 {
        let message = value
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("request failed")
            .to_string();
        return Err(ClientError::Refused(message));
    }
    Ok(value)
}
