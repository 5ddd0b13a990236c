//! Durable cluster metadata: volume geometry, PG placements, the volume epoch, the
//! writer, and every node with its ports.
//!
//! The control plane is the only writer of this metadata, so the store interface is
//! deliberately small: load the whole document, store the whole document. A local
//! cluster keeps it in one JSON file replaced atomically ([`FileStore`]); a
//! multi-machine deployment can implement [`MetadataStore`] over etcd (a single key
//! written with a compare-and-swap on its revision gives the same guarantees).
//!
//! **Invariant:** the volume epoch is stored durably *before* any writer is started
//! with it, so an epoch is never handed out twice, even across a crash of the control
//! plane between the bump and the start.

use borealis_common::Geometry;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Marker in the metadata file that tells a Borealis data dir from any other JSON.
pub const FORMAT_NAME: &str = "borealis-cluster";
/// Version of the on-disk layout of a data dir. Bumped on incompatible changes; a
/// data dir with another version is refused untouched.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the metadata document inside the data dir.
pub const METADATA_FILE: &str = "cluster.json";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path} is not a Borealis cluster metadata file: {why}")]
    NotACluster { path: PathBuf, why: String },
    #[error("{path} was written by an incompatible Borealis version (data format {found}, this build reads {supported})")]
    IncompatibleVersion {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("cannot read or write cluster metadata {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Storage,
    Instance,
    Proxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Writer,
    Reader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
        }
    }
}

/// One supervised process of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub name: String,
    pub kind: NodeKind,
    /// Availability zone; empty for proxies (endpoints are regional).
    pub az: String,
    /// Instances: writer or reader. Proxies: which endpoint they serve.
    pub role: Option<Role>,
    /// Port of the node's main listener (storage protocol, PostgreSQL, or endpoint).
    pub listen_port: u16,
    /// Port of the node's `/health` and `/metrics` server.
    pub http_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub writer: u16,
    pub reader: u16,
    pub control: u16,
}

impl Ports {
    /// The fixed layout of DESIGN.md section 5: writer P, reader P+1, control P+2.
    pub fn from_base(port: u16) -> Option<Ports> {
        Some(Ports {
            writer: port,
            reader: port.checked_add(1)?,
            control: port.checked_add(2)?,
        })
    }
}

/// PG membership: which nodes host a PG's six segments, versioned by a membership
/// epoch that is bumped when a segment is replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgMembership {
    pub pg: u32,
    pub membership_epoch: u64,
    pub segments: Vec<String>,
    /// During a segment replacement: the six it is moving to (empty otherwise).
    #[serde(default)]
    pub next_segments: Vec<String>,
}

/// A segment replacement in progress (`borealis node replace`): every segment on
/// `old` moves to `new`. Recorded durably so that a restarted control plane
/// finishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    pub old: String,
    pub new: String,
    pub started_unix: u64,
}

/// The whole metadata document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub format: String,
    pub format_version: u32,
    pub cluster_id: String,
    pub created_unix: u64,
    pub ports: Ports,
    pub geometry: Geometry,
    /// Volume epoch last handed out (DESIGN.md glossary). 0 = never started.
    pub volume_epoch: u64,
    /// Explicit PG placements; PGs not listed live on `default_segments`.
    pub protection_groups: Vec<PgMembership>,
    pub default_segments: Vec<String>,
    /// Membership epoch of the default segments (bumped at each step of a segment
    /// replacement). Absent in older metadata: 0.
    #[serde(default)]
    pub default_membership_epoch: u64,
    /// During a segment replacement: the six the default segments move to.
    #[serde(default)]
    pub default_next_segments: Vec<String>,
    #[serde(default)]
    pub replacement: Option<Replacement>,
    /// Storage nodes retired by a replacement: their names are never reused (a
    /// writer keeps per-node state by name).
    #[serde(default)]
    pub retired_nodes: Vec<String>,
    /// Name of the instance that is (or will be started as) the writer.
    pub writer: String,
    /// Reader instances the operator asked for with `--replicas`.
    pub replicas_requested: u32,
    pub nodes: Vec<NodeMeta>,
}

impl ClusterMeta {
    pub fn node(&self, name: &str) -> Option<&NodeMeta> {
        self.nodes.iter().find(|n| n.name == name)
    }
    pub fn node_mut(&mut self, name: &str) -> Option<&mut NodeMeta> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }
}

/// Durable storage of [`ClusterMeta`]. `store` must be atomic (a reader sees the old
/// or the new document, never a mix) and durable when it returns.
pub trait MetadataStore: Send + Sync {
    /// `Ok(None)` when no cluster has been created yet.
    fn load(&self) -> Result<Option<ClusterMeta>, MetaError>;
    fn store(&self, meta: &ClusterMeta) -> Result<(), MetaError>;
}

/// Metadata in `DATA/cluster.json`, replaced by write-temp, fsync, rename, fsync-dir.
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn new(data_dir: &Path) -> FileStore {
        FileStore {
            dir: data_dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(METADATA_FILE)
    }
}

/// Parses and validates a metadata document: its format marker first, then its
/// version, and only then its fields, so that an old or foreign file is reported as
/// such rather than as a missing field.
pub fn parse_meta(path: &Path, bytes: &[u8]) -> Result<ClusterMeta, MetaError> {
    let not_cluster = |why: String| MetaError::NotACluster {
        path: path.to_path_buf(),
        why,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| not_cluster(format!("not JSON ({e})")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(not_cluster(format!(
            "missing \"format\": \"{FORMAT_NAME}\""
        )));
    }
    let found = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if found != u64::from(FORMAT_VERSION) {
        return Err(MetaError::IncompatibleVersion {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        });
    }
    serde_json::from_value(value).map_err(|e| not_cluster(format!("bad field ({e})")))
}

impl MetadataStore for FileStore {
    fn load(&self) -> Result<Option<ClusterMeta>, MetaError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => parse_meta(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(MetaError::Io { path, source }),
        }
    }

    fn store(&self, meta: &ClusterMeta) -> Result<(), MetaError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{METADATA_FILE}.tmp"));
        let io = |source| MetaError::Io {
            path: path.clone(),
            source,
        };
        let mut body = serde_json::to_vec_pretty(meta).map_err(|e| io(std::io::Error::other(e)))?;
        body.push(b'\n');
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(&body).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io)?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterMeta {
        ClusterMeta {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            cluster_id: "c1".into(),
            created_unix: 1,
            ports: Ports::from_base(5432).expect("small port"),
            geometry: Geometry::default(),
            volume_epoch: 3,
            protection_groups: vec![],
            default_segments: vec!["storage-a1".into()],
            default_membership_epoch: 0,
            default_next_segments: vec![],
            replacement: None,
            retired_nodes: vec![],
            writer: "instance-1".into(),
            replicas_requested: 1,
            nodes: vec![NodeMeta {
                name: "storage-a1".into(),
                kind: NodeKind::Storage,
                az: "az-a".into(),
                role: None,
                listen_port: 1000,
                http_port: 1001,
            }],
        }
    }

    #[test]
    fn store_then_load_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::new(dir.path());
        assert!(store.load().expect("load empty").is_none());
        let meta = sample();
        store.store(&meta).expect("store");
        assert_eq!(store.load().expect("load").expect("present"), meta);
        assert!(!dir.path().join("cluster.json.tmp").exists());
    }

    #[test]
    fn foreign_and_future_files_are_refused() {
        let p = Path::new("x/cluster.json");
        assert!(matches!(
            parse_meta(p, b"garbage"),
            Err(MetaError::NotACluster { .. })
        ));
        assert!(matches!(
            parse_meta(p, b"{\"a\":1}"),
            Err(MetaError::NotACluster { .. })
        ));
        let future = format!("{{\"format\":\"{FORMAT_NAME}\",\"format_version\":99}}");
        assert!(matches!(
            parse_meta(p, future.as_bytes()),
            Err(MetaError::IncompatibleVersion { found: 99, .. })
        ));
        assert!(Ports::from_base(65535).is_none());
    }
}
