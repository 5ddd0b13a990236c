//! A database instance (`borealis instance`): the composition of the volume client,
//! the engine and SQL layer, and the PostgreSQL front end.
//!
//! Start-up order matters for availability: the HTTP endpoint comes up first and
//! reports `starting`, then the instance fetches the volume topology from the control
//! plane, opens the volume as writer under the epoch the control plane handed out
//! (this runs recovery: quorum-read of each PG's tail, truncation above VDL, new
//! epoch; no redo replay, invariant 8), opens the database, and only then listens for
//! PostgreSQL clients and reports `available`.

use borealis_common::handoff;
use borealis_common::http::{self, Request, Response};
use borealis_common::Epoch;
use borealis_pgwire_server::{Auth, ServerConfig};
use borealis_sql::Database;
use borealis_volume::{QuorumConfig, Topology, Volume, VolumeConfig};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct InstanceConfig {
    pub data_dir: PathBuf,
    pub name: String,
    pub role: String,
    pub listen: SocketAddr,
    pub http: SocketAddr,
    pub control: SocketAddr,
    pub epoch: u64,
    pub password_file: PathBuf,
    /// Buffer cache size in 8 KiB pages.
    pub cache_pages: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot reach the control plane at {addr}: {why}")]
    Control { addr: SocketAddr, why: String },
    #[error("cannot read the password file {path}: {source}")]
    Password {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the volume: {0}")]
    Volume(#[from] borealis_volume::VolumeError),
    #[error("cannot open the database: {0}")]
    Database(borealis_sql::SqlError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported role {0:?} (this build supports: writer)")]
    Role(String),
}

/// How often the instance reports its oldest read point to storage.
const MIN_READ_POINT_INTERVAL: Duration = Duration::from_millis(500);
/// How often the writer frees the trees of dropped and rewritten tables that no
/// snapshot can see any more (`Engine::reclaim`).
const RECLAIM_INTERVAL: Duration = Duration::from_secs(1);

/// Bounded wait for the control plane at start-up.
const CONTROL_WAIT: Duration = Duration::from_secs(30);

/// How often a running writer asks the control plane for the topology, to learn
/// membership changes (segment replacements) without a restart.
const TOPOLOGY_POLL_INTERVAL: Duration = Duration::from_millis(500);

async fn fetch_topology(control: SocketAddr) -> Result<Topology, InstanceError> {
    let deadline = Instant::now() + CONTROL_WAIT;
    loop {
        let err = match http::get_json(control, "/v1/volume/topology", Duration::from_secs(5)).await
        {
            Ok((200, v)) => match serde_json::from_value::<Topology>(v) {
                Ok(t) => return Ok(t),
                Err(e) => format!("bad topology: {e}"),
            },
            Ok((status, v)) => format!("status {status}: {v}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(InstanceError::Control {
                addr: control,
                why: err,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Default)]
struct Health {
    state: &'static str,
    volume: Option<Volume>,
    db: Option<Database>,
    started: Option<Instant>,
    recovery_ms: f64,
    /// The Unix socket endpoint proxies on this host hand client sockets to.
    handoff: Option<PathBuf>,
}

async fn health_json(
    name: &str,
    role: &str,
    epoch: u64,
    h: &Arc<Mutex<Health>>,
) -> serde_json::Value {
    let (state, volume, db, recovery_ms, uptime, handoff) = {
        let h = h.lock().unwrap_or_else(|p| p.into_inner());
        (
            h.state,
            h.volume.clone(),
            h.db.clone(),
            h.recovery_ms,
            h.started.map(|s| s.elapsed().as_secs_f64()),
            h.handoff.clone(),
        )
    };
    let mut v = json!({ "state": state, "name": name, "role": role, "epoch": epoch, "recovery_ms": recovery_ms, "uptime_s": uptime });
    if let Some(path) = handoff {
        v["handoff"] = json!(path.display().to_string());
    }
    if let Some(vol) = volume {
        let st = vol.status();
        v["vdl"] = json!(st.vdl.0);
        v["vcl"] = json!(st.vcl.0);
        v["applied_lsn"] = json!(st.vdl.0);
        v["last_lsn"] = json!(st.last_lsn.0);
        v["protection_groups"] = json!(st.protection_groups);
        v["commit_hedges"] = json!(st.commit_hedges);
        v["flushes"] = json!(st.flushes);
        v["retained_bytes"] = json!(st.retained_bytes);
        // Segment replacements as this writer sees them: the control plane
        // completes one once the new segments reached `catch_up_lsn`.
        v["transitions"] = json!(vol.transitions());
        v["membership_epochs"] = json!(vol
            .membership_epochs()
            .into_iter()
            .map(|(g, e)| json!({"group": g.map(|p| p.0), "membership_epoch": e}))
            .collect::<Vec<_>>());
    }
    if let Some(db) = db {
        let s = db.engine().stats().await;
        v["cache_pages"] = json!(s.cache_pages);
        v["cache_hits"] = json!(s.cache_hits);
        v["cache_misses"] = json!(s.cache_misses);
        v["active_transactions"] = json!(s.active_transactions);
        v["leaf_prunes"] = json!(s.leaf_prunes);
        v["read_points"] = json!(s.read_points);
        v["prune_lag"] = json!(s.prune_lag);
        v["free_pages"] = json!(s.free_pages);
        v["allocated_pages"] = json!(s.allocated_pages);
    }
    v
}

fn metrics_text(v: &serde_json::Value, db: Option<&Database>, connections: usize) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# HELP borealis_connections Client connections open\n# TYPE borealis_connections gauge\nborealis_connections {connections}\n"
    ));
    if let Some(db) = db {
        let (buckets, sum, count) = db.engine().commit_latency();
        out.push_str("# HELP borealis_commit_latency_seconds Commit record append to durability (VDL)\n# TYPE borealis_commit_latency_seconds histogram\n");
        for (le, n) in buckets {
            out.push_str(&format!(
                "borealis_commit_latency_seconds_bucket{{le=\"{le}\"}} {n}\n"
            ));
        }
        out.push_str(&format!(
            "borealis_commit_latency_seconds_bucket{{le=\"+Inf\"}} {count}\nborealis_commit_latency_seconds_sum {sum}\nborealis_commit_latency_seconds_count {count}\n"
        ));
        if let (Some(h), Some(m)) = (
            v.get("cache_hits").and_then(|x| x.as_f64()),
            v.get("cache_misses").and_then(|x| x.as_f64()),
        ) {
            let ratio = if h + m > 0.0 { h / (h + m) } else { 1.0 };
            out.push_str(&format!(
                "# HELP borealis_buffer_cache_hit_ratio Buffer cache hits / lookups\n# TYPE borealis_buffer_cache_hit_ratio gauge\nborealis_buffer_cache_hit_ratio {ratio}\n"
            ));
        }
    }
    for (key, metric, help) in [
        ("vdl", "borealis_volume_vdl", "Volume durable LSN"),
        ("vcl", "borealis_volume_vcl", "Volume complete LSN"),
        (
            "last_lsn",
            "borealis_volume_last_lsn",
            "Highest LSN allocated",
        ),
        (
            "protection_groups",
            "borealis_volume_protection_groups",
            "Protection groups written",
        ),
        (
            "commit_hedges",
            "borealis_volume_commit_hedges_total",
            "Commits hedged to the lazy segments after an eager one was slow",
        ),
        (
            "flushes",
            "borealis_volume_flushes_total",
            "Times records were released to the segments (a group commit is one)",
        ),
        (
            "retained_bytes",
            "borealis_volume_retained_bytes",
            "Bytes of redo records the writer holds for segments that have not acked them",
        ),
        (
            "cache_pages",
            "borealis_buffer_cache_pages",
            "Pages in the buffer cache",
        ),
        (
            "cache_hits",
            "borealis_buffer_cache_hits_total",
            "Buffer cache hits",
        ),
        (
            "cache_misses",
            "borealis_buffer_cache_misses_total",
            "Buffer cache misses",
        ),
        (
            "active_transactions",
            "borealis_active_transactions",
            "Transactions with writes in progress",
        ),
        (
            "leaf_prunes",
            "borealis_leaf_prunes_total",
            "Table leaves whose dead row versions were cut before a split",
        ),
        (
            "read_points",
            "borealis_read_points",
            "Snapshots in use by transactions",
        ),
        (
            "prune_lag",
            "borealis_prune_lag_lsns",
            "LSNs between VDL and the oldest snapshot in use (how far pruning is held back)",
        ),
        (
            "free_pages",
            "borealis_free_pages",
            "Pages of dropped, truncated or rewritten tables waiting on the free list for reuse",
        ),
        (
            "allocated_pages",
            "borealis_allocated_pages",
            "Page numbers ever handed out (the volume's high-water mark in 8 KiB pages)",
        ),
    ] {
        if let Some(x) = v.get(key).and_then(|x| x.as_f64()) {
            out.push_str(&format!(
                "# HELP {metric} {help}\n# TYPE {metric} gauge\n{metric} {x}\n"
            ));
        }
    }
    out
}

/// Runs the instance until the process is stopped.
/// A number from the environment; unset or unparsable is `None`.
fn env_knob<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

pub async fn run(config: InstanceConfig) -> Result<(), InstanceError> {
    if config.role != "writer" {
        return Err(InstanceError::Role(config.role));
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let health = Arc::new(Mutex::new(Health {
        state: "starting",
        ..Default::default()
    }));
    let http_listener = tokio::net::TcpListener::bind(config.http).await?;
    let open_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (health, name, role, epoch) = (
            health.clone(),
            config.name.clone(),
            config.role.clone(),
            config.epoch,
        );
        let open_connections = open_connections.clone();
        tokio::spawn(http::serve(http_listener, move |req: Request| {
            let (health, name, role) = (health.clone(), name.clone(), role.clone());
            let open = open_connections.load(std::sync::atomic::Ordering::Relaxed);
            async move {
                let v = health_json(&name, &role, epoch, &health).await;
                let db = health.lock().unwrap_or_else(|p| p.into_inner()).db.clone();
                match req.path.as_str() {
                    "/health" => Response::json(200, &v),
                    "/metrics" => Response::text(200, metrics_text(&v, db.as_ref(), open)),
                    _ => Response::error(404, "no such path"),
                }
            }
        }));
    }
    let password = match std::fs::read_to_string(&config.password_file) {
        Ok(p) => Some(p.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(InstanceError::Password {
                path: config.password_file.clone(),
                source,
            })
        }
    };
    let started = Instant::now();
    let topology = fetch_topology(config.control).await?;
    let volume_config = VolumeConfig {
        geometry: topology.geometry,
        ..VolumeConfig::default()
    };
    // Benchmarking knobs, read once at start (see volume::quorum and volume::remote):
    // BOREALIS_LAZY_SEGMENTS (0-2, default 2), how many of a PG's six segments get
    // commits only at the 4 ms lazy flush ("eager four"; 0 sends every commit to all
    // six); BOREALIS_COMMIT_GATHER_ROUNDS (default 8), scheduler rounds a commit
    // waits for others to join its flush while other write transactions are open
    // ("Commit gathering"; 0 sends every commit at once).
    let mut quorum = QuorumConfig::default();
    if let Some(n) = env_knob::<usize>("BOREALIS_LAZY_SEGMENTS") {
        quorum.lazy_segments = n.min(2);
        log::info!("lazy segments per PG: {}", quorum.lazy_segments);
    }
    if let Some(n) = env_knob::<u32>("BOREALIS_COMMIT_GATHER_ROUNDS") {
        quorum.commit_gather_rounds = n.min(1024);
        log::info!("commit gather rounds: {}", quorum.commit_gather_rounds);
    }
    let volume =
        Volume::open_writer_with(topology, Epoch(config.epoch), volume_config, quorum).await?;
    let db = Database::open_with_cache(volume.clone(), config.cache_pages)
        .await
        .map_err(InstanceError::Database)?;
    let recovery_ms = started.elapsed().as_secs_f64() * 1000.0;
    log::info!(
        "{}: volume recovered under epoch {} at VDL {} in {recovery_ms:.1} ms; serving on {}",
        config.name,
        config.epoch,
        volume.vdl(),
        config.listen
    );
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let (handoff_tx, handoff_rx) = tokio::sync::mpsc::channel(64);
    let handoff = bind_handoff(&config.data_dir, handoff_tx);
    {
        let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
        h.handoff = handoff;
        h.state = "available";
        h.volume = Some(volume.clone());
        h.db = Some(db.clone());
        h.started = Some(Instant::now());
        h.recovery_ms = recovery_ms;
    }
    // Tell storage how far back this instance may still read, so segments can
    // garbage-collect below it (PGMRPL).
    {
        let (volume, db) = (volume.clone(), db.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MIN_READ_POINT_INTERVAL);
            loop {
                tick.tick().await;
                volume.set_min_read_point(db.engine().min_read_point().await);
            }
        });
    }
    // Put the pages of dropped, truncated and rewritten tables back into use once no
    // snapshot can see them.
    {
        let db = db.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RECLAIM_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match db.engine().reclaim().await {
                    Ok(s) if s.pages_freed > 0 => log::info!(
                        "freed {} pages of {} dropped or rewritten trees",
                        s.pages_freed,
                        s.trees_freed
                    ),
                    Ok(_) => {}
                    Err(e) => log::warn!("freeing the pages of dropped trees: {e}"),
                }
            }
        });
    }
    // Follow membership changes: the control plane changes the topology during a
    // segment replacement and the writer must adopt it without restarting.
    {
        let (volume, control) = (volume.clone(), config.control);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TOPOLOGY_POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let answer =
                    http::get_json(control, "/v1/volume/topology", Duration::from_secs(2)).await;
                let topology = match answer {
                    Ok((200, v)) => serde_json::from_value::<Topology>(v),
                    Ok((status, _)) => {
                        log::debug!("topology poll: control plane answered {status}");
                        continue;
                    }
                    Err(e) => {
                        log::debug!("topology poll: {e}");
                        continue;
                    }
                };
                match topology {
                    Ok(t) => match volume.update_topology(&t) {
                        Ok(true) => log::info!("adopted a new volume topology"),
                        Ok(false) => {}
                        Err(e) => log::warn!("refusing a topology from the control plane: {e}"),
                    },
                    Err(e) => log::warn!("malformed topology from the control plane: {e}"),
                }
            }
        });
    }
    let server_config = ServerConfig {
        auth: Auth::from_password(password.as_deref()),
        open_connections,
        ..ServerConfig::default()
    };
    borealis_pgwire_server::serve_with_handoff(
        listener,
        handoff_rx,
        db,
        server_config,
        std::future::pending(),
    )
    .await?;
    Ok(())
}

/// Listens on `<data dir>/handoff.sock` for client sockets handed over by endpoint
/// proxies on this host (`borealis_common::handoff`) and forwards them to the
/// PostgreSQL server. Without it (path too long, bind failure) proxies splice bytes
/// instead, so a failure here is logged, not fatal.
fn bind_handoff(
    data_dir: &std::path::Path,
    to_server: tokio::sync::mpsc::Sender<tokio::net::TcpStream>,
) -> Option<PathBuf> {
    let path = data_dir.join("handoff.sock");
    if path.as_os_str().len() > handoff::MAX_SOCKET_PATH {
        log::warn!(
            "{} is too long for a Unix socket: endpoint proxies will splice bytes",
            path.display()
        );
        return None;
    }
    // A socket file left by an earlier run of this instance.
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            log::warn!(
                "cannot listen on {}: {e}; endpoint proxies will splice bytes",
                path.display()
            );
            return None;
        }
    };
    tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((sock, _)) => sock,
                Err(e) => {
                    log::warn!("handoff accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let to_server = to_server.clone();
            tokio::spawn(async move {
                let received =
                    tokio::time::timeout(Duration::from_secs(5), handoff::recv_fd(&sock)).await;
                let fd = match received {
                    Ok(Ok(fd)) => fd,
                    Ok(Err(e)) => return log::warn!("bad handoff: {e}"),
                    Err(_) => return log::warn!("handoff sent no descriptor within 5 s"),
                };
                let std_stream = std::net::TcpStream::from(fd);
                // A connected TCP socket has a peer address; anything else is refused.
                let stream = std_stream
                    .peer_addr()
                    .and_then(|_| std_stream.set_nonblocking(true))
                    .and_then(|()| tokio::net::TcpStream::from_std(std_stream));
                match stream {
                    Ok(s) => {
                        let _ = to_server.send(s).await;
                    }
                    Err(e) => log::warn!("handed-off descriptor is not a TCP socket: {e}"),
                }
            });
        }
    });
    Some(path)
}
