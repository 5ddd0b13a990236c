//! The control plane's HTTP JSON API (served on 127.0.0.1:P+2). The CLI talks only
//! to this; proxies ask it where the writer is; instances fetch the volume topology.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/health` | `{"status":"ok"}` |
//! | GET | `/metrics` | Prometheus text |
//! | GET | `/v1/status` | the `status --json` document (DESIGN.md section 5) |
//! | GET | `/v1/volume/topology` | `borealis_volume::Topology` |
//! | GET | `/v1/endpoints` | where the writer and the readers are, for proxies |
//! | POST | `/v1/nodes/{name}/{kill,stop,start}` | one node |
//! | POST | `/v1/nodes/{name}/replace` | body `{"with": "storage-b3"}` or `{}`: move the storage node's segments to a new node (see `repair.rs`) |
//! | POST | `/v1/azs/{az}/{stop,start}` | every node of an AZ |
//! | POST | `/v1/failover` | body `{"to": "instance-2"}` or `{}` |
//!
//! Errors are `{"error": "one line"}` with 404 (unknown name), 409 (not possible in
//! this state) or 400 (bad request).

use crate::metadata::{NodeKind, Role};
use crate::supervisor::{loopback, ActionError, Cluster, Desired, NodeState};
use borealis_common::http::{Request, Response};
use serde_json::{json, Value};
use std::sync::Arc;

pub async fn handle(cluster: Arc<Cluster>, req: Request) -> Response {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["health"]) => Response::json(200, &json!({"status": "ok", "role": "control"})),
        ("GET", ["metrics"]) => Response::text(200, metrics(&cluster)),
        ("GET", ["v1", "status"]) => Response::json(200, &status(&cluster)),
        ("GET", ["v1", "volume", "topology"]) => Response::json(200, &topology(&cluster)),
        ("GET", ["v1", "endpoints"]) => Response::json(200, &endpoints(&cluster)),
        ("POST", ["v1", "nodes", name, "replace"]) => replace(&cluster, name, &req.body),
        ("POST", ["v1", "nodes", name, action]) => node_action(&cluster, name, action).await,
        ("POST", ["v1", "azs", az, action]) => az_action(&cluster, az, action).await,
        ("POST", ["v1", "failover"]) => failover(&cluster, &req.body).await,
        _ => Response::error(404, format!("no such API: {} {}", req.method, req.path)),
    }
}

fn action_error(e: ActionError) -> Response {
    let status = match e {
        ActionError::UnknownNode { .. } | ActionError::UnknownAz { .. } => 404,
        ActionError::StopTimeout(_) => 500,
        ActionError::ShuttingDown | ActionError::Conflict(_) => 409,
    };
    Response::error(status, e.to_string())
}

async fn node_action(cluster: &Arc<Cluster>, name: &str, action: &str) -> Response {
    let names = vec![name.to_string()];
    let result = match action {
        "kill" => match cluster.kill(name) {
            Ok(Some(pid)) => Ok(format!("killed pid {pid}; the supervisor restarts it")),
            Ok(None) => Ok("not running; nothing to kill".to_string()),
            Err(e) => Err(e),
        },
        "stop" => {
            let was_stopped = cluster
                .lock()
                .nodes
                .get(name)
                .map(|rt| rt.desired == Desired::Stopped);
            match cluster.set_desired(&names, Desired::Stopped) {
                Ok(()) => match cluster.wait_stopped(&names).await {
                    Ok(()) if was_stopped == Some(true) => Ok("already stopped".to_string()),
                    Ok(()) => Ok("stopped".to_string()),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        }
        "start" => {
            let was_running = cluster
                .lock()
                .nodes
                .get(name)
                .map(|rt| rt.desired == Desired::Running);
            match cluster.set_desired(&names, Desired::Running) {
                Ok(()) if was_running == Some(true) => {
                    Ok("already running; nothing to do".to_string())
                }
                Ok(()) => Ok("starting".to_string()),
                Err(e) => Err(e),
            }
        }
        other => {
            return Response::error(
                400,
                format!("unknown node action {other:?} (kill, stop, start)"),
            )
        }
    };
    match result {
        Ok(message) => Response::json(
            200,
            &json!({"node": name, "action": action, "result": message}),
        ),
        Err(e) => action_error(e),
    }
}

fn replace(cluster: &Arc<Cluster>, name: &str, body: &[u8]) -> Response {
    let with: Option<String> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v.get("with").and_then(|t| t.as_str()).map(str::to_string),
            Err(e) => return Response::error(400, format!("bad replace request: {e}")),
        }
    };
    match cluster.replace_node(name, with.as_deref()) {
        Ok(new) => {
            let epoch = cluster.lock().meta.default_membership_epoch;
            Response::json(
                200,
                &json!({"node": name, "action": "replace", "new": new, "membership_epoch": epoch,
                    "result": format!("replacing with {new} (membership epoch {epoch}); writes continue on both segment sets until {new} has caught up, then {name} is retired")}),
            )
        }
        Err(e) => action_error(e),
    }
}

async fn az_action(cluster: &Arc<Cluster>, az: &str, action: &str) -> Response {
    let names = match cluster.nodes_in_az(az) {
        Ok(names) => names,
        Err(e) => return action_error(e),
    };
    let result = match action {
        "stop" => match cluster.set_desired(&names, Desired::Stopped) {
            Ok(()) => cluster.wait_stopped(&names).await,
            Err(e) => Err(e),
        },
        "start" => cluster.set_desired(&names, Desired::Running),
        other => return Response::error(400, format!("unknown AZ action {other:?} (stop, start)")),
    };
    match result {
        Ok(()) => Response::json(200, &json!({"az": az, "action": action, "nodes": names})),
        Err(e) => action_error(e),
    }
}

async fn failover(cluster: &Arc<Cluster>, body: &[u8]) -> Response {
    let target: Option<String> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v.get("to").and_then(|t| t.as_str()).map(str::to_string),
            Err(e) => return Response::error(400, format!("bad failover request: {e}")),
        }
    };
    match cluster.failover(target.as_deref()).await {
        Ok(message) => Response::json(200, &json!({"action": "failover", "result": message})),
        Err(e) => action_error(e),
    }
}

fn addr_of(port: u16) -> String {
    loopback(port).to_string()
}

fn num(health: Option<&Value>, keys: &[&str]) -> Option<Value> {
    let h = health?;
    keys.iter()
        .find_map(|k| h.get(*k).filter(|v| v.is_number()).cloned())
}

/// The `status --json` document. Fields required by DESIGN.md section 5 first; the
/// rest is extra.
pub fn status(cluster: &Cluster) -> Value {
    let inner = cluster.lock();
    let meta = &inner.meta;
    let mut instances = Vec::new();
    let mut storage_nodes = Vec::new();
    let mut proxies = Vec::new();
    let mut writer_health: Option<&Value> = None;
    for node in &meta.nodes {
        let Some(rt) = inner.nodes.get(&node.name) else {
            continue;
        };
        let health = rt
            .health
            .as_ref()
            .filter(|_| rt.state != NodeState::Stopped);
        let common = json!({
            "name": node.name,
            "state": rt.state.as_str(),
            "addr": addr_of(node.listen_port),
            "http": addr_of(node.http_port),
            "pid": rt.pid,
            "az": node.az,
            "desired": match rt.desired { Desired::Running => "running", Desired::Stopped => "stopped" },
            "restarts": rt.restarts,
            "last_exit": rt.last_exit,
            "state_for_s": rt.state_since.elapsed().as_secs_f64(),
            "health": health,
        });
        let mut entry = common;
        match node.kind {
            NodeKind::Instance => {
                let role = node.role.unwrap_or(Role::Reader);
                if role == Role::Writer && node.name == meta.writer {
                    writer_health = health;
                }
                entry["role"] = json!(role.as_str());
                entry["applied_lsn"] = num(health, &["applied_lsn", "vdl"]).unwrap_or(json!(0));
                entry["vdl"] = num(health, &["vdl"]).unwrap_or(json!(0));
                entry["lag_ms"] = num(health, &["lag_ms"]).unwrap_or(json!(0.0));
                instances.push(entry);
            }
            NodeKind::Storage => {
                // Per-segment SCLs as the node reports them; `scl` is the lowest
                // (with one PG per node, simply the segment's SCL).
                let segments: Vec<Value> = health
                    .and_then(|h| h.get("segments"))
                    .and_then(|s| s.as_array())
                    .map(|a| {
                        a.iter()
                            .map(|s| json!({"pg": s.get("pg"), "scl": s.get("scl")}))
                            .collect()
                    })
                    .unwrap_or_default();
                let scl = segments.iter().filter_map(|s| s["scl"].as_u64()).min();
                entry["scl"] = json!(scl.unwrap_or(0));
                entry["segments"] = json!(segments);
                storage_nodes.push(entry)
            }
            NodeKind::Proxy => {
                entry["role"] = json!(node.role.unwrap_or(Role::Writer).as_str());
                proxies.push(entry);
            }
        }
    }
    let pgs = num(writer_health, &["protection_groups"])
        .unwrap_or(json!(meta.protection_groups.len().max(1)));
    let mut notes = Vec::new();
    let readers = meta
        .nodes
        .iter()
        .filter(|n| n.kind == NodeKind::Instance && n.role == Some(Role::Reader))
        .count();
    if (readers as u32) < meta.replicas_requested {
        notes.push(format!(
            "{} reader instance(s) requested, {readers} present: this build's instance has no reader role yet; the reader endpoint routes to the writer",
            meta.replicas_requested
        ));
    }
    json!({
        "writer": meta.writer,
        "endpoints": {
            "writer": addr_of(meta.ports.writer),
            "reader": addr_of(meta.ports.reader),
            "control": addr_of(meta.ports.control),
        },
        "instances": instances,
        "storage_nodes": storage_nodes,
        "volume": {
            "epoch": meta.volume_epoch,
            "vdl": num(writer_health, &["vdl"]).unwrap_or(json!(0)),
            "vcl": num(writer_health, &["vcl"]).unwrap_or(json!(0)),
            "protection_groups": pgs,
            "pages_per_pg": meta.geometry.pages_per_pg,
        },
        "proxies": proxies,
        "cluster_id": meta.cluster_id,
        "data_dir": cluster.config.data_dir.display().to_string(),
        "replicas_requested": meta.replicas_requested,
        "membership": crate::repair::membership_json(meta),
        "notes": notes,
    })
}

pub fn topology(cluster: &Cluster) -> Value {
    let inner = cluster.lock();
    let meta = &inner.meta;
    let topology = borealis_volume::Topology {
        geometry: meta.geometry,
        nodes: meta
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Storage)
            .map(|n| borealis_volume::StorageNodeInfo {
                name: n.name.clone(),
                az: n.az.clone(),
                addr: loopback(n.listen_port),
            })
            .collect(),
        protection_groups: meta
            .protection_groups
            .iter()
            .map(|p| borealis_volume::PgPlacement {
                pg: borealis_common::PgId(p.pg),
                membership_epoch: p.membership_epoch,
                segments: p.segments.clone(),
                next_segments: p.next_segments.clone(),
            })
            .collect(),
        default_segments: meta.default_segments.clone(),
        default_membership_epoch: meta.default_membership_epoch,
        default_next_segments: meta.default_next_segments.clone(),
    };
    let mut value =
        serde_json::to_value(&topology).unwrap_or_else(|e| json!({"error": e.to_string()}));
    value["epoch"] = json!(meta.volume_epoch);
    value
}

/// Where proxies send connections: the writer (only when available, so a proxy
/// waits through a writer restart instead of connecting to a dead port) and the
/// available readers.
pub fn endpoints(cluster: &Cluster) -> Value {
    let inner = cluster.lock();
    let meta = &inner.meta;
    let available = |name: &str| {
        inner
            .nodes
            .get(name)
            .is_some_and(|rt| rt.state == NodeState::Available)
    };
    // An instance's handoff socket (from its health report) lets a proxy on the same
    // host pass client sockets instead of splicing bytes (borealis_common::handoff).
    let target = |n: &crate::metadata::NodeMeta| {
        let mut v = json!({"name": n.name, "addr": addr_of(n.listen_port)});
        if let Some(path) = inner
            .nodes
            .get(&n.name)
            .and_then(|rt| rt.health.as_ref())
            .and_then(|h| h.get("handoff"))
        {
            v["handoff"] = path.clone();
        }
        v
    };
    let writer = meta
        .node(&meta.writer)
        .filter(|n| available(&n.name))
        .map(target);
    let readers: Vec<Value> = meta
        .nodes
        .iter()
        .filter(|n| {
            n.kind == NodeKind::Instance && n.role == Some(Role::Reader) && available(&n.name)
        })
        .map(target)
        .collect();
    json!({"writer": writer, "readers": readers})
}

fn metrics(cluster: &Cluster) -> String {
    let inner = cluster.lock();
    let mut out = String::new();
    out.push_str(
        "# HELP borealis_volume_epoch Volume epoch last handed out by the control plane.\n",
    );
    out.push_str("# TYPE borealis_volume_epoch gauge\n");
    out.push_str(&format!(
        "borealis_volume_epoch {}\n",
        inner.meta.volume_epoch
    ));
    let writer_health = inner
        .nodes
        .get(&inner.meta.writer)
        .and_then(|rt| rt.health.as_ref());
    for key in ["vdl", "vcl"] {
        if let Some(v) = writer_health
            .and_then(|h| h.get(key))
            .and_then(|v| v.as_u64())
        {
            out.push_str(&format!(
                "# TYPE borealis_volume_{key} gauge\nborealis_volume_{key} {v}\n"
            ));
        }
    }
    out.push_str("# HELP borealis_segment_scl Segment complete LSN, per storage node and PG.\n");
    out.push_str("# TYPE borealis_segment_scl gauge\n");
    for (name, rt) in &inner.nodes {
        let segments = rt
            .health
            .as_ref()
            .and_then(|h| h.get("segments"))
            .and_then(|s| s.as_array());
        for seg in segments.into_iter().flatten() {
            if let (Some(pg), Some(scl)) = (
                seg.get("pg").and_then(|v| v.as_u64()),
                seg.get("scl").and_then(|v| v.as_u64()),
            ) {
                out.push_str(&format!(
                    "borealis_segment_scl{{node=\"{name}\",pg=\"{pg}\"}} {scl}\n"
                ));
            }
        }
    }
    out.push_str(
        "# HELP borealis_node_up 1 when the node is available.\n# TYPE borealis_node_up gauge\n",
    );
    for (name, rt) in &inner.nodes {
        out.push_str(&format!(
            "borealis_node_up{{node=\"{name}\"}} {}\n",
            u8::from(rt.state == NodeState::Available)
        ));
    }
    out.push_str("# HELP borealis_node_state Current state of each node (one series per state).\n");
    out.push_str("# TYPE borealis_node_state gauge\n");
    for (name, rt) in &inner.nodes {
        for s in [
            NodeState::Starting,
            NodeState::Available,
            NodeState::Stopped,
            NodeState::Failed,
        ] {
            out.push_str(&format!(
                "borealis_node_state{{node=\"{name}\",state=\"{}\"}} {}\n",
                s.as_str(),
                u8::from(rt.state == s)
            ));
        }
    }
    out.push_str("# HELP borealis_node_restarts_total Automatic restarts by the supervisor.\n");
    out.push_str("# TYPE borealis_node_restarts_total counter\n");
    for (name, rt) in &inner.nodes {
        out.push_str(&format!(
            "borealis_node_restarts_total{{node=\"{name}\"}} {}\n",
            rt.restarts
        ));
    }
    out
}
