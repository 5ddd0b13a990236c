//! `borealis up`: the control plane process itself. Checks everything that can be
//! checked before touching anything (binary, data dir, lock, ports), creates or
//! loads the metadata, serves the control API, starts the nodes in dependency
//! order (storage, writer, proxies), prints the connection strings and waits for
//! Ctrl-C / SIGTERM to stop them all.

use crate::datadir::{self, DirLock, Found};
use crate::metadata::{
    ClusterMeta, FileStore, MetadataStore, NodeKind, NodeMeta, Ports, Role, FORMAT_NAME,
    FORMAT_VERSION,
};
use crate::supervisor::{
    allocate_ports, loopback, port_is_free, Cluster, Desired, NodeState, SupervisorConfig,
};
use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// Progress output to the operator's terminal. Never panics: if the terminal went
/// away (EPIPE), the cluster keeps running and stopping cleanly all the same.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub const DEFAULT_PORT: u16 = 5432;
/// Reader instances per cluster (DESIGN.md section 1: 0..15, as in Aurora).
pub const MAX_REPLICAS: u32 = 15;
/// Storage nodes of a cluster in a box: two per AZ (DESIGN.md section 1).
pub const STORAGE_NODES: [(&str, &str); 6] = [
    ("storage-a1", "az-a"),
    ("storage-a2", "az-a"),
    ("storage-b1", "az-b"),
    ("storage-b2", "az-b"),
    ("storage-c1", "az-c"),
    ("storage-c2", "az-c"),
];
pub const WRITER_NAME: &str = "instance-1";
/// `up` gives up on a node that failed this many times before first being available.
const STARTUP_ATTEMPTS: u64 = 4;
pub const WRITER_PROXY: &str = "proxy-writer";
pub const READER_PROXY: &str = "proxy-reader";

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub data_dir: PathBuf,
    /// None: the port recorded in the metadata, or 5432 for a new cluster.
    pub port: Option<u16>,
    /// From `--password` or `BOREALIS_PASSWORD`; None keeps (or generates) one.
    pub password: Option<String>,
    pub replicas: u32,
    pub exe: PathBuf,
    /// Whether the instance binary supports `--role reader`. Until it does, no
    /// readers are started (status says so) rather than faking them.
    pub readers_supported: bool,
    pub start_timeout: Duration,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_meta(ports: Ports, replicas: u32) -> anyhow::Result<ClusterMeta> {
    let mut nodes = Vec::new();
    for (name, az) in STORAGE_NODES {
        nodes.push(NodeMeta {
            name: name.into(),
            kind: NodeKind::Storage,
            az: az.into(),
            role: None,
            listen_port: 0,
            http_port: 0,
        });
    }
    nodes.push(NodeMeta {
        name: WRITER_NAME.into(),
        kind: NodeKind::Instance,
        az: "az-a".into(),
        role: Some(Role::Writer),
        listen_port: 0,
        http_port: 0,
    });
    for (name, role, port) in [
        (WRITER_PROXY, Role::Writer, ports.writer),
        (READER_PROXY, Role::Reader, ports.reader),
    ] {
        nodes.push(NodeMeta {
            name: name.into(),
            kind: NodeKind::Proxy,
            az: String::new(),
            role: Some(role),
            listen_port: port,
            http_port: 0,
        });
    }
    // Every node's ports come from one batch, all held open until chosen: distinct.
    let needed: usize = nodes
        .iter()
        .map(|n| if n.kind == NodeKind::Proxy { 1 } else { 2 })
        .sum();
    let mut free = allocate_ports(needed)
        .context("cannot allocate loopback ports")?
        .into_iter();
    for n in &mut nodes {
        if n.kind != NodeKind::Proxy {
            n.listen_port = free
                .next()
                .ok_or_else(|| anyhow!("port allocation came up short"))?;
        }
        n.http_port = free
            .next()
            .ok_or_else(|| anyhow!("port allocation came up short"))?;
    }
    Ok(ClusterMeta {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        cluster_id: datadir::generate_id().context("cannot read /dev/urandom")?,
        created_unix: now_unix(),
        ports,
        geometry: borealis_common::Geometry::default(),
        volume_epoch: 0,
        protection_groups: Vec::new(),
        default_segments: STORAGE_NODES.iter().map(|(n, _)| n.to_string()).collect(),
        default_membership_epoch: 0,
        default_next_segments: Vec::new(),
        replacement: None,
        retired_nodes: Vec::new(),
        writer: WRITER_NAME.into(),
        replicas_requested: replicas,
        nodes,
    })
}

/// Adds or removes reader instances so that there are exactly `replicas`. New ones
/// are named `instance-N` with the lowest unused N and spread over the AZs; the
/// highest-numbered readers go first. The writer is never touched (after a failover
/// it may be any `instance-N`).
pub fn reconcile_readers(meta: &mut ClusterMeta, replicas: u32) -> anyhow::Result<()> {
    let is_reader = |n: &NodeMeta| n.kind == NodeKind::Instance && n.role == Some(Role::Reader);
    let index = |n: &NodeMeta| {
        n.name
            .strip_prefix("instance-")
            .and_then(|i| i.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let mut readers: Vec<(u32, String)> = meta
        .nodes
        .iter()
        .filter(|n| is_reader(n))
        .map(|n| (index(n), n.name.clone()))
        .collect();
    readers.sort();
    while readers.len() > replicas as usize {
        if let Some((_, name)) = readers.pop() {
            meta.nodes.retain(|n| n.name != name);
        }
    }
    let missing = (replicas as usize).saturating_sub(readers.len());
    if missing == 0 {
        return Ok(());
    }
    let mut free = allocate_ports(missing * 2)
        .context("cannot allocate loopback ports")?
        .into_iter();
    let mut next = 2;
    for k in 0..missing {
        while meta.node(&format!("instance-{next}")).is_some() {
            next += 1;
        }
        let listen_port = free
            .next()
            .ok_or_else(|| anyhow!("port allocation came up short"))?;
        let http_port = free
            .next()
            .ok_or_else(|| anyhow!("port allocation came up short"))?;
        let node = NodeMeta {
            name: format!("instance-{next}"),
            kind: NodeKind::Instance,
            az: borealis_common::AZS[(readers.len() + k + 1) % 3].into(),
            role: Some(Role::Reader),
            listen_port,
            http_port,
        };
        // Keep instances together, before the proxies.
        let at = meta
            .nodes
            .iter()
            .rposition(|n| n.kind == NodeKind::Instance)
            .map(|i| i + 1)
            .unwrap_or(meta.nodes.len());
        meta.nodes.insert(at, node);
    }
    Ok(())
}

/// Checks that the three fixed ports are free; returns the bound control listener.
fn claim_ports(ports: Ports) -> anyhow::Result<std::net::TcpListener> {
    for (port, what) in [
        (ports.writer, "writer endpoint"),
        (ports.reader, "reader endpoint"),
    ] {
        if !port_is_free(port) {
            bail!("port {port} ({what}) on 127.0.0.1 is already in use; pick another base port with --port");
        }
    }
    let control = std::net::TcpListener::bind(loopback(ports.control)).map_err(|e| {
        anyhow!("port {} (control API) on 127.0.0.1 is already in use ({e}); pick another base port with --port", ports.control)
    })?;
    control.set_nonblocking(true).context("control listener")?;
    Ok(control)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Runs the cluster until SIGINT/SIGTERM. Must run on a current-thread runtime (see
/// supervisor.rs: PR_SET_PDEATHSIG is tied to the forking thread).
pub async fn run_up(opts: UpOptions) -> anyhow::Result<()> {
    let dir = opts.data_dir.clone();
    // Everything that can fail without side effects is checked first.
    std::fs::metadata(&opts.exe).map_err(|e| {
        anyhow!(
            "cannot find the borealis binary {} to start child processes: {e}",
            display(&opts.exe)
        )
    })?;
    if opts.port == Some(0) {
        bail!("--port 0 is not allowed: the endpoints need fixed ports (P, P+1, P+2)");
    }
    if opts.replicas > MAX_REPLICAS {
        bail!(
            "--replicas {} is too many: a cluster has at most {MAX_REPLICAS} reader instances",
            opts.replicas
        );
    }
    let found = datadir::inspect(&dir)?;
    let (mut lock, existing) = match found {
        Found::Cluster(meta) => (Some(DirLock::acquire(&dir)?), Some(*meta)),
        Found::Empty => (None, None),
    };
    let base = opts
        .port
        .or(existing.as_ref().map(|m| m.ports.writer))
        .unwrap_or(DEFAULT_PORT);
    let ports = Ports::from_base(base).ok_or_else(|| {
        anyhow!("--port {base} is too large: the cluster uses ports P, P+1 and P+2")
    })?;
    let signals_int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let signals_term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    // A closed terminal (SIGHUP) stops the cluster cleanly too, rather than leaving
    // the children to PDEATHSIG.
    let signals_hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    let control_listener = claim_ports(ports)?;

    // From here on the data dir is ours.
    let store = FileStore::new(&dir);
    let is_new = existing.is_none();
    let mut meta = match existing {
        Some(meta) => meta,
        None => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create data dir {}", display(&dir)))?;
            lock = Some(DirLock::acquire(&dir)?);
            match store.load()? {
                // Another `up` created it between our look and our lock.
                Some(meta) => meta,
                None => new_meta(ports, opts.replicas)?,
            }
        }
    };
    let _lock = lock;
    // Children get absolute paths: they do not depend on where `up` was started.
    let dir = std::fs::canonicalize(&dir)
        .with_context(|| format!("cannot resolve data dir {}", display(&dir)))?;
    let store = FileStore::new(&dir);
    if meta.ports != ports {
        meta.ports = ports;
        for n in &mut meta.nodes {
            match (n.kind, n.role) {
                (NodeKind::Proxy, Some(Role::Writer)) => n.listen_port = ports.writer,
                (NodeKind::Proxy, Some(Role::Reader)) => n.listen_port = ports.reader,
                _ => {}
            }
        }
    }
    meta.replicas_requested = opts.replicas;
    if opts.readers_supported {
        reconcile_readers(&mut meta, opts.replicas)?;
    }
    store.store(&meta)?;

    let log_path = dir.join(datadir::LOGS_DIR).join("control.log");
    borealis_common::logging::init("control", Some(&log_path))
        .with_context(|| format!("cannot open log file {}", display(&log_path)))?;
    log::info!(
        "up: data dir {}, ports {:?}, new cluster: {is_new}",
        display(&dir),
        ports
    );

    let stored_password = datadir::read_password(&dir)?;
    let (password, generated) = match (&opts.password, stored_password) {
        (Some(pw), stored) => {
            if pw.is_empty() || pw.contains('\n') {
                bail!("the password must be non-empty and on one line");
            }
            if stored.as_deref() != Some(pw.as_str()) {
                datadir::write_password(&dir, pw)?;
            }
            (pw.clone(), false)
        }
        (None, Some(stored)) => (stored, false),
        (None, None) => {
            let pw = datadir::generate_password().context("cannot generate a password")?;
            datadir::write_password(&dir, &pw)?;
            (pw, true)
        }
    };

    say!(
        "Borealis: {} cluster {} in {}",
        if is_new { "creating" } else { "starting" },
        meta.cluster_id,
        display(&dir)
    );
    let config = SupervisorConfig::new(opts.exe.clone(), dir.clone());
    let cluster = Cluster::new(config, Box::new(FileStore::new(&dir)), meta);
    cluster.spawn_tasks();
    let api_cluster = cluster.clone();
    let listener =
        tokio::net::TcpListener::from_std(control_listener).context("control listener")?;
    let api = tokio::spawn(borealis_common::http::serve(listener, move |req| {
        let cluster = api_cluster.clone();
        async move { crate::api::handle(cluster, req).await }
    }));
    say!("  control API     http://{}", loopback(ports.control));

    let mut signals = Signals {
        int: signals_int,
        term: signals_term,
        hup: signals_hup,
    };
    let repair = tokio::spawn(crate::repair::complete_replacements(cluster.clone()));
    let started = start_in_order(&cluster, &opts, &mut signals).await;
    if let Err(e) = started {
        say!("stopping the processes started so far...");
        repair.abort();
        cluster.shutdown().await;
        api.abort();
        return Err(e);
    }

    let writer_endpoint = loopback(ports.writer);
    let reader_endpoint = loopback(ports.reader);
    let epoch = cluster.lock().meta.volume_epoch;
    say!("Borealis is up (volume epoch {epoch}). Connect with psql:");
    say!("  writer endpoint  psql \"postgresql://postgres@{writer_endpoint}/postgres\"");
    say!("  reader endpoint  psql \"postgresql://postgres@{reader_endpoint}/postgres\"");
    let password_path = dir.join(datadir::PASSWORD_FILE);
    if generated {
        say!(
            "  password         {password}   (generated, shown once; kept in {})",
            display(&password_path)
        );
    } else {
        say!(
            "  password         in {}   (export PGPASSWORD=\"$(cat {})\")",
            display(&password_path),
            display(&password_path)
        );
    }
    if !opts.readers_supported && opts.replicas > 0 {
        say!(
            "  note             {} reader(s) requested, none started: this build's instance has no reader role yet; the reader endpoint routes to the writer",
            opts.replicas
        );
    }
    say!(
        "  status           borealis status --data-dir {}",
        display(&dir)
    );
    say!("Ctrl-C stops the cluster.");

    let events = tokio::spawn(print_state_changes(cluster.clone()));
    let which = signals.next().await;
    events.abort();
    repair.abort();
    say!("{which}: stopping the cluster...");
    log::info!("up: {which}, shutting down");
    cluster.shutdown().await;
    api.abort();
    log::info!("up: stopped");
    say!("stopped.");
    Ok(())
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

async fn start_in_order(
    cluster: &Arc<Cluster>,
    opts: &UpOptions,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let groups: Vec<(&str, Vec<String>)> = {
        let inner = cluster.lock();
        let names = |pred: &dyn Fn(&NodeMeta) -> bool| -> Vec<String> {
            inner
                .meta
                .nodes
                .iter()
                .filter(|n| pred(n))
                .map(|n| n.name.clone())
                .collect()
        };
        // A storage node being replaced is gone for good: it stays stopped (the
        // replacement carries on without it after a restart of `up`).
        let replaced = inner.meta.replacement.as_ref().map(|r| r.old.clone());
        vec![
            (
                "storage nodes",
                names(&|n| n.kind == NodeKind::Storage && Some(&n.name) != replaced.as_ref()),
            ),
            (
                "writer",
                names(&|n| n.kind == NodeKind::Instance && n.role == Some(Role::Writer)),
            ),
            (
                "readers",
                names(&|n| n.kind == NodeKind::Instance && n.role == Some(Role::Reader)),
            ),
            ("endpoints", names(&|n| n.kind == NodeKind::Proxy)),
        ]
    };
    for (what, names) in groups {
        if names.is_empty() {
            continue;
        }
        cluster.set_desired(&names, Desired::Running)?;
        tokio::select! {
            r = wait_available(cluster, &names, opts.start_timeout) => r.with_context(|| format!("starting the {what}"))?,
            s = signals.next() => bail!("{s} received while starting; stopped"),
        }
    }
    Ok(())
}

/// Waits (bounded) for every node in `names` to be available, printing each.
async fn wait_available(
    cluster: &Cluster,
    names: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<String> = names.to_vec();
    loop {
        let mut still = Vec::new();
        for name in pending {
            let line = {
                let inner = cluster.lock();
                let (Some(rt), Some(node)) = (inner.nodes.get(&name), inner.meta.node(&name))
                else {
                    continue;
                };
                if rt.state == NodeState::Available {
                    let what = match (node.kind, node.role) {
                        (NodeKind::Storage, _) => node.az.clone(),
                        (_, Some(role)) => role.as_str().to_string(),
                        _ => String::new(),
                    };
                    Some(format!(
                        "  {:<15} {:<7} available  {}  pid {}",
                        name,
                        what,
                        loopback(node.listen_port),
                        rt.pid.map(|p| p.to_string()).unwrap_or_default()
                    ))
                } else {
                    None
                }
            };
            match line {
                Some(line) => say!("{line}"),
                None => still.push(name),
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        // A node that keeps failing will not come up by waiting longer: say why now.
        let crash_looping = {
            let inner = cluster.lock();
            still.iter().find_map(|n| {
                let rt = inner.nodes.get(n)?;
                (rt.restarts >= STARTUP_ATTEMPTS && rt.state == NodeState::Failed).then(|| {
                    format!(
                        "{n} failed {} times while starting (last: {}; see {})",
                        rt.restarts,
                        rt.last_exit.clone().unwrap_or_default(),
                        display(&cluster.log_path(n))
                    )
                })
            })
        };
        if let Some(why) = crash_looping {
            bail!(why);
        }
        if Instant::now() >= deadline {
            let inner = cluster.lock();
            let details: Vec<String> = still
                .iter()
                .map(|n| {
                    let why = inner
                        .nodes
                        .get(n)
                        .and_then(|rt| rt.last_exit.clone())
                        .unwrap_or_else(|| "no healthy answer".into());
                    format!("{n} ({why}; see {})", display(&cluster.log_path(n)))
                })
                .collect();
            bail!(
                "not available within {} s: {}",
                timeout.as_secs(),
                details.join(", ")
            );
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After start-up, `up` keeps the operator informed in its terminal: one line per
/// node state change (the details are in DATA/logs/).
async fn print_state_changes(cluster: Arc<Cluster>) {
    let snapshot = |cluster: &Cluster| -> Vec<(String, NodeState, Option<String>)> {
        let inner = cluster.lock();
        inner
            .nodes
            .iter()
            .map(|(n, rt)| (n.clone(), rt.state, rt.last_exit.clone()))
            .collect()
    };
    let mut last = snapshot(&cluster);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = snapshot(&cluster);
        for ((name, state, exit), (_, old, _)) in now.iter().zip(last.iter()) {
            if state != old {
                let why = match (state, exit) {
                    (NodeState::Failed, Some(e)) => format!(" ({e})"),
                    _ => String::new(),
                };
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                say!(
                    "[{:02}:{:02}:{:02}] {name}: {}{why}",
                    (t / 3600) % 24,
                    (t / 60) % 60,
                    t % 60,
                    state.as_str()
                );
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(meta: &ClusterMeta) -> Vec<String> {
        meta.nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Instance)
            .map(|n| format!("{}:{:?}", n.name, n.role))
            .collect()
    }

    #[test]
    fn readers_are_added_and_removed_around_the_writer() {
        let mut meta = new_meta(Ports::from_base(5432).expect("ports"), 2).expect("meta");
        assert_eq!(names(&meta), ["instance-1:Some(Writer)"]);
        reconcile_readers(&mut meta, 2).expect("add");
        assert_eq!(
            names(&meta),
            [
                "instance-1:Some(Writer)",
                "instance-2:Some(Reader)",
                "instance-3:Some(Reader)"
            ]
        );
        assert_eq!(meta.nodes.last().map(|n| n.kind), Some(NodeKind::Proxy));
        // After a failover instance-2 is the writer; shrinking keeps it.
        meta.writer = "instance-2".into();
        for n in &mut meta.nodes {
            match n.name.as_str() {
                "instance-1" => n.role = Some(Role::Reader),
                "instance-2" => n.role = Some(Role::Writer),
                _ => {}
            }
        }
        reconcile_readers(&mut meta, 1).expect("shrink");
        assert_eq!(
            names(&meta),
            ["instance-1:Some(Reader)", "instance-2:Some(Writer)"]
        );
        reconcile_readers(&mut meta, 2).expect("grow");
        assert_eq!(
            names(&meta),
            [
                "instance-1:Some(Reader)",
                "instance-2:Some(Writer)",
                "instance-3:Some(Reader)"
            ]
        );
        let mut ports: Vec<u16> = meta
            .nodes
            .iter()
            .flat_map(|n| [n.listen_port, n.http_port])
            .filter(|p| *p != 0)
            .collect();
        let before = ports.len();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), before, "ports must be distinct");
    }
}
