//! Segment replacement (`borealis node replace`): moving every segment of a storage
//! node that is gone for good to a new node, through membership epochs, without
//! stopping I/O.
//!
//! ```text
//!   replace X [--with N]      (API: POST /v1/nodes/X/replace)
//!     1. metadata, stored durably: node N (X's AZ, fresh ports); every segment set
//!        holding X gets next = (set with X -> N) and membership epoch + 1
//!     2. N is started; the writer polls the topology, adopts the transitional
//!        membership (write quorum: 4/6 of the old six AND 4/6 of the new six) and
//!        reports its catch-up point (its last LSN when it adopted) in /health
//!     3. N rebuilds from its peers (snapshots of GC'd segments + record gossip) and
//!        gets every new record from the writer
//!   complete_replacements (this module's task, every 200 ms)
//!     4. once N's segments of every PG the writer listed have a durable SCL (as of
//!        N's last fdatasync) at or beyond the catch-up point: segments = next, membership epoch + 1 (stored); X is
//!        stopped and leaves the metadata, its directory moves to DATA/retired/
//! ```
//!
//! Why step 4 is safe: every record acknowledged while the writer used the old
//! six alone is at or below the catch-up point, so N holds it and it sits on 4 of
//! the new six; every later record was acknowledged by 4 of the new six already.
//! Only the control plane changes memberships (invariant 5: no consensus on the
//! I/O path); the writer follows and the segments fence stale membership epochs.

use crate::metadata::{ClusterMeta, NodeKind, NodeMeta, Replacement};
use crate::supervisor::{allocate_ports, ActionError, Cluster, Desired};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// How often the control plane checks whether a replacement can complete.
const COMPLETION_POLL: Duration = Duration::from_millis(200);

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `set` with `old` replaced by `new`, if it contains `old`.
fn moved(set: &[String], old: &str, new: &str) -> Option<Vec<String>> {
    set.iter().any(|n| n == old).then(|| {
        set.iter()
            .map(|n| if n == old { new.to_string() } else { n.clone() })
            .collect()
    })
}

/// The first unused name in `az` of the form `storage-<letter><n>`.
fn default_name(meta: &ClusterMeta, az: &str, data_dir: &std::path::Path) -> String {
    let letter = az.strip_prefix("az-").unwrap_or(az);
    (1u32..)
        .map(|i| format!("storage-{letter}{i}"))
        .find(|n| {
            meta.node(n).is_none() && !meta.retired_nodes.contains(n) && !data_dir.join(n).exists()
        })
        .unwrap_or_else(|| format!("storage-{letter}-new"))
}

impl Cluster {
    /// Starts replacing every segment of storage node `old` by a new node (`with`,
    /// or a generated name in the same AZ). Returns the new node's name.
    pub fn replace_node(
        self: &Arc<Self>,
        old: &str,
        with: Option<&str>,
    ) -> Result<String, ActionError> {
        let new = {
            let mut inner = self.lock();
            let known = || {
                inner
                    .meta
                    .nodes
                    .iter()
                    .map(|n| n.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let Some(node) = inner.meta.node(old).cloned() else {
                return Err(ActionError::UnknownNode {
                    name: old.into(),
                    known: known(),
                });
            };
            if node.kind != NodeKind::Storage {
                return Err(ActionError::Conflict(format!(
                    "{old} is not a storage node; only storage nodes host segments"
                )));
            }
            if let Some(r) = &inner.meta.replacement {
                return Err(ActionError::Conflict(format!(
                    "the replacement of {} by {} is still in progress",
                    r.old, r.new
                )));
            }
            let new = match with {
                Some(n) => n.to_string(),
                None => default_name(&inner.meta, &node.az, &self.config.data_dir),
            };
            if new.is_empty()
                || !new
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ActionError::Conflict(format!(
                    "invalid node name {new:?} (letters, digits, '-' and '_' only)"
                )));
            }
            if inner.meta.node(&new).is_some()
                || inner.meta.retired_nodes.contains(&new)
                || self.config.data_dir.join(&new).exists()
            {
                return Err(ActionError::Conflict(format!(
                    "a node (or a data directory, or a retired node) named {new} already exists"
                )));
            }
            let mut meta = inner.meta.clone();
            let mut moved_any = false;
            if let Some(next) = moved(&meta.default_segments, old, &new) {
                meta.default_next_segments = next;
                meta.default_membership_epoch += 1;
                moved_any = true;
            }
            for p in &mut meta.protection_groups {
                if let Some(next) = moved(&p.segments, old, &new) {
                    p.next_segments = next;
                    p.membership_epoch += 1;
                    moved_any = true;
                }
            }
            if !moved_any {
                return Err(ActionError::Conflict(format!(
                    "{old} hosts no segment; nothing to replace"
                )));
            }
            let ports = allocate_ports(2)
                .map_err(|e| ActionError::Conflict(format!("cannot allocate ports: {e}")))?;
            let at = meta
                .nodes
                .iter()
                .rposition(|n| n.kind == NodeKind::Storage)
                .map(|i| i + 1)
                .unwrap_or(0);
            meta.nodes.insert(
                at,
                NodeMeta {
                    name: new.clone(),
                    kind: NodeKind::Storage,
                    az: node.az.clone(),
                    role: None,
                    listen_port: ports[0],
                    http_port: ports[1],
                },
            );
            meta.replacement = Some(Replacement {
                old: old.to_string(),
                new: new.clone(),
                started_unix: now_unix(),
            });
            // Durable before anyone acts on it: the writer learns it from the
            // topology, which is served from this metadata.
            self.store_meta(&meta)
                .map_err(|e| ActionError::Conflict(format!("cannot store metadata: {e}")))?;
            log::info!(
                "replacement: {old} -> {new} started (default membership epoch {})",
                meta.default_membership_epoch
            );
            inner.meta = meta;
            new
        };
        self.add_node(&new, Desired::Running);
        Ok(new)
    }

    /// Completes the replacement in progress if the writer adopted the
    /// transitional memberships and the new node caught up. Returns the replaced
    /// node's name when it did.
    pub async fn complete_replacement_if_ready(self: &Arc<Self>) -> Option<String> {
        let (old, new) = {
            let mut inner = self.lock();
            let r = inner.meta.replacement.clone()?;
            let writer_health = inner.nodes.get(&inner.meta.writer)?.health.clone()?;
            let new_health = inner.nodes.get(&r.new)?.health.clone()?;
            let meta = &inner.meta;
            let mut groups: Vec<(Value, u64)> = Vec::new();
            if !meta.default_next_segments.is_empty() {
                groups.push((Value::Null, meta.default_membership_epoch));
            }
            for p in &meta.protection_groups {
                if !p.next_segments.is_empty() {
                    groups.push((json!(p.pg), p.membership_epoch));
                }
            }
            for (group, epoch) in &groups {
                if !caught_up(&writer_health, &new_health, group, *epoch) {
                    return None;
                }
            }
            let mut meta = meta.clone();
            if !meta.default_next_segments.is_empty() {
                meta.default_segments = std::mem::take(&mut meta.default_next_segments);
                meta.default_membership_epoch += 1;
            }
            for p in &mut meta.protection_groups {
                if !p.next_segments.is_empty() {
                    p.segments = std::mem::take(&mut p.next_segments);
                    p.membership_epoch += 1;
                }
            }
            meta.nodes.retain(|n| n.name != r.old);
            meta.retired_nodes.push(r.old.clone());
            meta.replacement = None;
            if let Err(e) = self.store_meta(&meta) {
                log::error!("replacement: cannot store the completed membership: {e}");
                return None;
            }
            log::info!(
                "replacement: {} -> {} complete (default membership epoch {})",
                r.old,
                r.new,
                meta.default_membership_epoch
            );
            inner.meta = meta;
            (r.old, r.new)
        };
        // The old node leaves: stopped if it still runs, forgotten, its data moved
        // aside (never reused under its name by a later replacement).
        let names = vec![old.clone()];
        let _ = self.set_desired(&names, Desired::Stopped);
        if let Err(e) = self.wait_stopped(&names).await {
            log::warn!("replacement: {e}");
        }
        self.remove_node(&old);
        let dir = self.config.data_dir.join(&old);
        if dir.exists() {
            let retired = self.config.data_dir.join("retired");
            let to = retired.join(format!("{old}-{}", now_unix()));
            if let Err(e) =
                std::fs::create_dir_all(&retired).and_then(|()| std::fs::rename(&dir, &to))
            {
                log::warn!("replacement: cannot move {} aside: {e}", dir.display());
            }
        }
        log::info!("replacement: {old} retired; its segments live on {new}");
        Some(old)
    }
}

/// Whether the writer reports group `group` at membership `epoch` in transition
/// and the new node's segments of its PGs reached the catch-up point.
fn caught_up(writer: &Value, new_node: &Value, group: &Value, epoch: u64) -> bool {
    let Some(t) = writer
        .get("transitions")
        .and_then(|t| t.as_array())
        .and_then(|a| {
            a.iter().find(|t| {
                t.get("group").unwrap_or(&Value::Null) == group
                    && t.get("membership_epoch").and_then(|e| e.as_u64()) == Some(epoch)
            })
        })
    else {
        return false; // the writer has not adopted this membership yet
    };
    let Some(catch_up) = t.get("catch_up_lsn").and_then(|l| l.as_u64()) else {
        return false;
    };
    let segments = new_node
        .get("segments")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    let scl = |pg: u64| {
        segments
            .iter()
            .find(|s| s.get("pg").and_then(|p| p.as_u64()) == Some(pg))
            .and_then(|s| s.get("durable_scl"))
            .and_then(|s| s.as_u64())
    };
    t.get("pgs").and_then(|p| p.as_array()).is_some_and(|pgs| {
        pgs.iter()
            .all(|pg| pg.as_u64().and_then(scl).is_some_and(|s| s >= catch_up))
    })
}

/// The control plane's task that completes replacements (see the module docs).
pub async fn complete_replacements(cluster: Arc<Cluster>) {
    loop {
        tokio::time::sleep(COMPLETION_POLL).await;
        if cluster.is_shutting_down() {
            return;
        }
        cluster.complete_replacement_if_ready().await;
    }
}

/// Memberships and the replacement in progress, for `status --json`.
pub fn membership_json(meta: &ClusterMeta) -> Value {
    json!({
        "default": {
            "membership_epoch": meta.default_membership_epoch,
            "segments": meta.default_segments,
            "next_segments": meta.default_next_segments,
        },
        "protection_groups": meta.protection_groups.iter().map(|p| json!({
            "pg": p.pg,
            "membership_epoch": p.membership_epoch,
            "segments": p.segments,
            "next_segments": p.next_segments,
        })).collect::<Vec<_>>(),
        "replacement": meta.replacement.as_ref().map(|r| json!({
            "old": r.old,
            "new": r.new,
            "started_unix": r.started_unix,
            "state": "rebuilding",
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_waits_for_the_writer_and_the_new_segments() {
        let writer = json!({"transitions": [{"group": null, "membership_epoch": 1,
            "catch_up_lsn": 100, "pgs": [0, 1]}]});
        let behind = json!({"segments": [{"pg": 0, "durable_scl": 150},
            {"pg": 1, "scl": 100, "durable_scl": 99}]});
        let ahead = json!({"segments": [{"pg": 0, "durable_scl": 150},
            {"pg": 1, "durable_scl": 100}]});
        assert!(!caught_up(&writer, &behind, &Value::Null, 1));
        assert!(caught_up(&writer, &ahead, &Value::Null, 1));
        // The writer still on the previous membership: not yet.
        assert!(!caught_up(&writer, &ahead, &Value::Null, 2));
        assert!(!caught_up(&json!({}), &ahead, &Value::Null, 1));
        assert_eq!(
            moved(&["a".into(), "x".into()], "x", "n"),
            Some(vec!["a".to_string(), "n".to_string()])
        );
        assert_eq!(moved(&["a".into()], "x", "n"), None);
    }
}
