//! TEMPORARY placeholder for `borealis instance` until `borealis_instance::run`
//! (crates/instance, owned by the lead) lands. It is honest about what it is: it
//! fetches the volume topology from the control plane (so that path is exercised),
//! serves `/health` with `"placeholder": true`, and closes every PostgreSQL
//! connection at once. Delete this file when the real instance is wired in.

use borealis_common::http::{self, Request, Response};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub struct InstanceArgs {
    pub data_dir: PathBuf,
    pub name: String,
    pub role: String,
    pub listen: SocketAddr,
    pub http: SocketAddr,
    pub control: SocketAddr,
    pub epoch: u64,
    pub password_file: PathBuf,
}

pub async fn run_instance(args: InstanceArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)?;
    let (status, topology) =
        http::get_json(args.control, "/v1/volume/topology", Duration::from_secs(5)).await?;
    if status != 200 {
        anyhow::bail!("control plane answered {status} for the volume topology");
    }
    let topology: borealis_volume::Topology = serde_json::from_value(topology)?;
    log::warn!(
        "{}: PLACEHOLDER instance (no SQL yet): epoch {}, {} storage nodes, password file {}",
        args.name,
        args.epoch,
        topology.nodes.len(),
        args.password_file.display()
    );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let http_listener = tokio::net::TcpListener::bind(args.http).await?;
    let health = json!({
        "status": "ok",
        "placeholder": true,
        "name": args.name,
        "role": args.role,
        "epoch": args.epoch,
        "applied_lsn": 0,
        "vdl": 0,
        "protection_groups": 1,
    });
    tokio::spawn(http::serve(http_listener, move |req: Request| {
        let health = health.clone();
        async move {
            match req.path.as_str() {
                "/health" => Response::json(200, &health),
                "/metrics" => Response::text(200, "borealis_instance_placeholder 1\n"),
                _ => Response::error(404, "no such path"),
            }
        }
    }));
    loop {
        // Accept and drop: no protocol is spoken yet.
        if let Err(e) = listener.accept().await {
            log::warn!("accept: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
