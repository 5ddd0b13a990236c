//! The supervisor: one task per node that keeps its process in the state the
//! operator asked for.
//!
//! # Design
//!
//! Every node (storage node, instance, proxy) is a child OS process of the control
//! plane, started from the same `borealis` executable with a subcommand. For each
//! node the supervisor runs one small state machine as a tokio task:
//!
//! ```text
//!                 spawn ok               first 200 on /health
//!   (desired=run) ---------> starting ---------------------------> available
//!        ^                      |  exit / no health in start_timeout    |
//!        |   backoff (bounded,  v                                       | exit, or
//!        +-------------------- failed <---------------------------------+ unhealthy too long
//!                               (killed with SIGKILL if still alive)
//!
//!   desired=stop (operator `node stop`, `az stop`, shutdown):
//!     SIGTERM -> wait stop_timeout -> SIGKILL -> stopped   (and no restart)
//! ```
//!
//! * **Desired state is the operator's; observed state is the supervisor's.** The
//!   API only flips `desired` and wakes the node's task (`Notify`, which keeps a
//!   permit, so no wake-up is lost); the task alone spawns, signals and reaps. That
//!   makes `start`/`stop` idempotent for free: asking for the state already desired
//!   changes nothing. `kill` is the exception on purpose: it sends SIGKILL directly,
//!   exactly like an external crash, and the task sees an unexpected exit and
//!   restarts the node.
//! * **Restarts are bounded.** Backoff doubles from `backoff_initial` to
//!   `backoff_max` and resets after a node has been available for `backoff_reset`.
//! * **Children never outlive the control plane.** Each child is in its own process
//!   group (a terminal's Ctrl-C reaches only `up`, which then stops children in
//!   order: proxies, instances, storage) and has `PR_SET_PDEATHSIG = SIGKILL`, so
//!   even a SIGKILLed control plane leaves nothing behind. PDEATHSIG fires when the
//!   *thread* that forked exits, which is why `up` runs the control plane on a
//!   current-thread runtime: the forking thread is the main thread.
//! * **Epochs before writers.** Before a writer starts, the volume epoch is bumped
//!   and stored durably (metadata.rs), then passed to the writer with `--epoch`.
//! * **Ports are sticky.** A node restarts on the ports recorded in metadata when
//!   they are free, so the addresses in `status` and the topology stay stable.

use crate::metadata::{ClusterMeta, MetaError, MetadataStore, NodeKind, Role};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Notify};

/// Timeouts and limits of supervision (invariant 9: everything bounded).
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The `borealis` executable that children are started from.
    pub exe: PathBuf,
    pub data_dir: PathBuf,
    pub health_interval: Duration,
    pub health_interval_starting: Duration,
    pub health_timeout: Duration,
    /// A node that is not healthy this long after spawning is killed and restarted.
    pub start_timeout: Duration,
    /// An available node that stops answering health checks is reported `failed`
    /// after `unhealthy_grace`, and killed (then restarted) after `unhealthy_kill`.
    pub unhealthy_grace: Duration,
    pub unhealthy_kill: Duration,
    /// Between SIGTERM and SIGKILL when stopping a node.
    pub stop_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backoff_reset: Duration,
}

impl SupervisorConfig {
    pub fn new(exe: PathBuf, data_dir: PathBuf) -> SupervisorConfig {
        SupervisorConfig {
            exe,
            data_dir,
            health_interval: Duration::from_millis(500),
            health_interval_starting: Duration::from_millis(100),
            health_timeout: Duration::from_secs(2),
            start_timeout: Duration::from_secs(60),
            unhealthy_grace: Duration::from_secs(3),
            unhealthy_kill: Duration::from_secs(15),
            stop_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            backoff_reset: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    Running,
    Stopped,
}

/// Observed state, as shown by `status` (DESIGN.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Starting,
    Available,
    Stopped,
    Failed,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Available => "available",
            NodeState::Stopped => "stopped",
            NodeState::Failed => "failed",
        }
    }
}

/// What the supervisor knows about one running (or not) node.
#[derive(Debug, Clone)]
pub struct NodeRuntime {
    pub desired: Desired,
    pub state: NodeState,
    pub pid: Option<u32>,
    /// Automatic restarts since `up` (not counting operator `start`s).
    pub restarts: u64,
    pub last_exit: Option<String>,
    /// Last successful `/health` body.
    pub health: Option<Value>,
    pub state_since: Instant,
    notify: Arc<Notify>,
}

pub struct Inner {
    pub meta: ClusterMeta,
    pub nodes: BTreeMap<String, NodeRuntime>,
}

/// The control plane's shared state: metadata plus the supervisor's view of nodes.
pub struct Cluster {
    pub config: SupervisorConfig,
    store: Box<dyn MetadataStore>,
    inner: Mutex<Inner>,
    shutdown: watch::Sender<bool>,
    failover_running: std::sync::atomic::AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("unknown node {name:?} (known: {known})")]
    UnknownNode { name: String, known: String },
    #[error("unknown AZ {az:?} (known: {known})")]
    UnknownAz { az: String, known: String },
    #[error("timed out waiting for {0} to stop")]
    StopTimeout(String),
    #[error("the cluster is shutting down")]
    ShuttingDown,
    /// Not possible in the cluster's current state (one line saying why).
    #[error("{0}")]
    Conflict(String),
}

impl Cluster {
    pub fn new(
        config: SupervisorConfig,
        store: Box<dyn MetadataStore>,
        meta: ClusterMeta,
    ) -> Arc<Cluster> {
        let now = Instant::now();
        let nodes = meta
            .nodes
            .iter()
            .map(|n| {
                let rt = NodeRuntime {
                    // Nodes are started by `up` in order (storage, writer, proxies),
                    // so every node starts out stopped until `up` asks for it.
                    desired: Desired::Stopped,
                    state: NodeState::Stopped,
                    pid: None,
                    restarts: 0,
                    last_exit: None,
                    health: None,
                    state_since: now,
                    notify: Arc::new(Notify::new()),
                };
                (n.name.clone(), rt)
            })
            .collect();
        let (shutdown, _) = watch::channel(false);
        Arc::new(Cluster {
            config,
            store,
            inner: Mutex::new(Inner { meta, nodes }),
            shutdown,
            failover_running: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The lock is never held across an `.await`, so poisoning can only come from a
    /// panic in plain code; the data is still consistent enough to shut down with.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.config
            .data_dir
            .join(crate::datadir::LOGS_DIR)
            .join(format!("{name}.log"))
    }

    /// Stores the metadata durably (under the caller's lock: nobody sees a change
    /// that is not on disk yet).
    pub(crate) fn store_meta(&self, meta: &ClusterMeta) -> Result<(), MetaError> {
        self.store.store(meta)
    }

    /// Supervises a node just added to the metadata (a replacement storage node).
    pub(crate) fn add_node(self: &Arc<Self>, name: &str, desired: Desired) {
        {
            let mut inner = self.lock();
            if inner.nodes.contains_key(name) {
                return;
            }
            inner.nodes.insert(
                name.to_string(),
                NodeRuntime {
                    desired,
                    state: NodeState::Stopped,
                    pid: None,
                    restarts: 0,
                    last_exit: None,
                    health: None,
                    state_since: Instant::now(),
                    notify: Arc::new(Notify::new()),
                },
            );
        }
        let cluster = self.clone();
        let name = name.to_string();
        tokio::spawn(async move { cluster.supervise(name).await });
    }

    /// Forgets a stopped node that left the metadata; its task ends.
    pub(crate) fn remove_node(&self, name: &str) {
        let mut inner = self.lock();
        if let Some(rt) = inner.nodes.remove(name) {
            rt.notify.notify_one();
        }
    }

    /// Starts one supervision task per node (all initially stopped).
    pub fn spawn_tasks(self: &Arc<Self>) {
        let names: Vec<String> = self.lock().nodes.keys().cloned().collect();
        for name in names {
            let cluster = self.clone();
            tokio::spawn(async move { cluster.supervise(name).await });
        }
    }

    fn known_nodes(inner: &Inner) -> String {
        inner.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    fn set_state(&self, name: &str, state: NodeState) {
        let mut inner = self.lock();
        if let Some(rt) = inner.nodes.get_mut(name) {
            if rt.state != state {
                log::info!("node {name}: {} -> {}", rt.state.as_str(), state.as_str());
                rt.state = state;
                rt.state_since = Instant::now();
            }
        }
    }

    fn desired(&self, name: &str) -> Desired {
        self.lock()
            .nodes
            .get(name)
            .map(|rt| rt.desired)
            .unwrap_or(Desired::Stopped)
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sets the desired state of `names` and wakes their tasks.
    pub fn set_desired(&self, names: &[String], desired: Desired) -> Result<(), ActionError> {
        if self.is_shutting_down() && desired == Desired::Running {
            return Err(ActionError::ShuttingDown);
        }
        let mut inner = self.lock();
        for name in names {
            if !inner.nodes.contains_key(name) {
                return Err(ActionError::UnknownNode {
                    name: name.clone(),
                    known: Self::known_nodes(&inner),
                });
            }
        }
        for name in names {
            if let Some(rt) = inner.nodes.get_mut(name) {
                if rt.desired != desired {
                    log::info!("node {name}: desired {desired:?}");
                    rt.desired = desired;
                    rt.notify.notify_one();
                }
            }
        }
        Ok(())
    }

    /// Waits (bounded) until every node in `names` is `stopped`.
    pub async fn wait_stopped(&self, names: &[String]) -> Result<(), ActionError> {
        let deadline = Instant::now() + self.config.stop_timeout + Duration::from_secs(5);
        loop {
            let pending: Vec<String> = {
                let inner = self.lock();
                names
                    .iter()
                    .filter(|n| {
                        inner
                            .nodes
                            .get(*n)
                            .is_some_and(|rt| rt.state != NodeState::Stopped)
                    })
                    .cloned()
                    .collect()
            };
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ActionError::StopTimeout(pending.join(", ")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `node kill`: SIGKILL, as a crash would; the supervisor restarts the node.
    /// Returns the pid killed, or None when the node was not running.
    pub fn kill(&self, name: &str) -> Result<Option<u32>, ActionError> {
        let inner = self.lock();
        let rt = inner
            .nodes
            .get(name)
            .ok_or_else(|| ActionError::UnknownNode {
                name: name.into(),
                known: Self::known_nodes(&inner),
            })?;
        let Some(pid) = rt.pid else { return Ok(None) };
        log::warn!("node {name}: SIGKILL pid {pid} on operator request");
        // SAFETY: plain syscall. The pid is still our unreaped child (we clear `pid`
        // under this lock when the task reaps it), so it cannot name another process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        Ok(Some(pid))
    }

    /// Names of the nodes in `az`.
    pub fn nodes_in_az(&self, az: &str) -> Result<Vec<String>, ActionError> {
        let inner = self.lock();
        let names: Vec<String> = inner
            .meta
            .nodes
            .iter()
            .filter(|n| n.az == az)
            .map(|n| n.name.clone())
            .collect();
        if names.is_empty() {
            let mut azs: Vec<&str> = inner
                .meta
                .nodes
                .iter()
                .map(|n| n.az.as_str())
                .filter(|a| !a.is_empty())
                .collect();
            azs.sort();
            azs.dedup();
            return Err(ActionError::UnknownAz {
                az: az.into(),
                known: azs.join(", "),
            });
        }
        Ok(names)
    }

    /// Planned failover: promote a reader (`to`, or the available reader with the
    /// highest applied LSN) to writer.
    ///
    /// Promotion is by restart: stop the old writer and the target, swap their roles
    /// in the metadata durably, start the target as writer (which bumps the volume
    /// epoch, fencing anything the old writer might still send), then the old writer
    /// as a reader. The proxies follow on their next route lookup.
    pub async fn failover(&self, to: Option<&str>) -> Result<String, ActionError> {
        use std::sync::atomic::Ordering;
        if self.failover_running.swap(true, Ordering::SeqCst) {
            return Err(ActionError::Conflict(
                "a failover is already in progress".into(),
            ));
        }
        let result = self.failover_inner(to).await;
        self.failover_running.store(false, Ordering::SeqCst);
        result
    }

    async fn failover_inner(&self, to: Option<&str>) -> Result<String, ActionError> {
        let (old, target) = {
            let inner = self.lock();
            let meta = &inner.meta;
            let readers: Vec<&crate::metadata::NodeMeta> = meta
                .nodes
                .iter()
                .filter(|n| n.kind == NodeKind::Instance && n.role == Some(Role::Reader))
                .collect();
            if let Some(to) = to {
                match meta.node(to) {
                    None => {
                        return Err(ActionError::UnknownNode {
                            name: to.into(),
                            known: Self::known_nodes(&inner),
                        })
                    }
                    Some(n) if n.kind != NodeKind::Instance => {
                        return Err(ActionError::Conflict(format!("{to} is not an instance")));
                    }
                    Some(_) if to == meta.writer => {
                        return Err(ActionError::Conflict(format!("{to} is already the writer")));
                    }
                    Some(_) => {}
                }
            }
            if readers.is_empty() {
                return Err(ActionError::Conflict(
                    "failover needs a reader instance to promote, and this cluster has none (this build's instance has no reader role yet)".into(),
                ));
            }
            let available = |name: &str| {
                inner
                    .nodes
                    .get(name)
                    .is_some_and(|rt| rt.state == NodeState::Available)
            };
            let applied = |name: &str| {
                inner
                    .nodes
                    .get(name)
                    .and_then(|rt| rt.health.as_ref())
                    .and_then(|h| h.get("applied_lsn"))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0)
            };
            let target = match to {
                Some(to) if available(to) => to.to_string(),
                Some(to) => {
                    return Err(ActionError::Conflict(format!(
                        "{to} is not available; cannot promote it"
                    )))
                }
                None => readers
                    .iter()
                    .filter(|n| available(&n.name))
                    .max_by_key(|n| applied(&n.name))
                    .map(|n| n.name.clone())
                    .ok_or_else(|| {
                        ActionError::Conflict("no available reader to promote".into())
                    })?,
            };
            (meta.writer.clone(), target)
        };
        log::warn!("failover: {old} -> {target}");
        let both = vec![old.clone(), target.clone()];
        self.set_desired(&both, Desired::Stopped)?;
        self.wait_stopped(&both).await?;
        {
            let mut inner = self.lock();
            let before = inner.meta.clone();
            if let Some(n) = inner.meta.node_mut(&old) {
                n.role = Some(Role::Reader);
            }
            if let Some(n) = inner.meta.node_mut(&target) {
                n.role = Some(Role::Writer);
            }
            inner.meta.writer = target.clone();
            if let Err(e) = self.store.store(&inner.meta) {
                inner.meta = before;
                drop(inner);
                let _ = self.set_desired(&both, Desired::Running);
                return Err(ActionError::Conflict(format!(
                    "cannot store the new roles ({e}); restarted the old writer"
                )));
            }
        }
        self.set_desired(std::slice::from_ref(&target), Desired::Running)?;
        self.set_desired(std::slice::from_ref(&old), Desired::Running)?;
        let epoch = self.lock().meta.volume_epoch;
        Ok(format!(
            "{target} is now the writer; {old} restarts as a reader (volume epoch {epoch})"
        ))
    }

    /// Stops every node, proxies first and storage last (so that no instance loses
    /// its storage while it still serves), then ends the supervision tasks.
    pub async fn shutdown(&self) {
        let order = [NodeKind::Proxy, NodeKind::Instance, NodeKind::Storage];
        for kind in order {
            let names: Vec<String> = self
                .lock()
                .meta
                .nodes
                .iter()
                .filter(|n| n.kind == kind)
                .map(|n| n.name.clone())
                .collect();
            let _ = self.set_desired(&names, Desired::Stopped);
            if let Err(e) = self.wait_stopped(&names).await {
                log::error!("shutdown: {e}");
            }
        }
        self.shutdown.send_replace(true);
    }

    // ---- the per-node task -------------------------------------------------

    async fn supervise(self: Arc<Self>, name: String) {
        let Some(notify) = self.lock().nodes.get(&name).map(|rt| rt.notify.clone()) else {
            return;
        };
        let mut shutdown = self.shutdown.subscribe();
        let mut backoff = self.config.backoff_initial;
        loop {
            if *shutdown.borrow() {
                return;
            }
            if !self.lock().nodes.contains_key(&name) {
                return; // removed (a replaced storage node)
            }
            if self.desired(&name) == Desired::Stopped {
                self.set_state(&name, NodeState::Stopped);
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            self.set_state(&name, NodeState::Starting);
            let outcome = match self.spawn_child(&name) {
                Ok(child) => self.watch_child(&name, child, &notify, &mut shutdown).await,
                Err(e) => {
                    log::error!("node {name}: cannot start: {e}");
                    Outcome::Failed {
                        reason: format!("cannot start: {e}"),
                        available_for: Duration::ZERO,
                    }
                }
            };
            match outcome {
                Outcome::Stopped => {}
                Outcome::Shutdown => return,
                Outcome::Failed {
                    reason,
                    available_for,
                } => {
                    {
                        let mut inner = self.lock();
                        if let Some(rt) = inner.nodes.get_mut(&name) {
                            rt.last_exit = Some(reason.clone());
                            rt.restarts += 1;
                        }
                    }
                    self.set_state(&name, NodeState::Failed);
                    if available_for >= self.config.backoff_reset {
                        backoff = self.config.backoff_initial;
                    }
                    log::warn!(
                        "node {name}: {reason}; restarting in {} ms",
                        backoff.as_millis()
                    );
                    // Interruptible: `node stop` during backoff stops at once, and
                    // `node start` (a no-op here: already desired) just re-checks.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = notify.notified() => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
    }

    /// Runs until the child exits, is stopped, or the cluster shuts down.
    async fn watch_child(
        &self,
        name: &str,
        mut child: Child,
        notify: &Notify,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let spawned_at = Instant::now();
        let mut last_ok: Option<Instant> = None;
        let mut available_at: Option<Instant> = None;
        let http = self.lock().meta.node(name).map(|n| loopback(n.http_port));
        loop {
            let interval = if available_at.is_some() {
                self.config.health_interval
            } else {
                self.config.health_interval_starting
            };
            tokio::select! {
                status = child.wait() => {
                    self.clear_pid(name);
                    let reason = match status {
                        Ok(s) => format!("exited unexpectedly ({s})"),
                        Err(e) => format!("lost track of the process ({e})"),
                    };
                    let available_for = available_at.map(|t| t.elapsed()).unwrap_or_default();
                    return Outcome::Failed { reason, available_for };
                }
                _ = notify.notified() => {
                    if self.desired(name) == Desired::Stopped {
                        self.terminate(name, &mut child).await;
                        return Outcome::Stopped;
                    }
                }
                _ = shutdown.changed() => {
                    self.terminate(name, &mut child).await;
                    return Outcome::Shutdown;
                }
                _ = tokio::time::sleep(interval) => {
                    let Some(http) = http else { continue };
                    let answer = borealis_common::http::get_json(http, "/health", self.config.health_timeout).await;
                    match health_verdict(answer) {
                        Verdict::Healthy(body) => {
                            last_ok = Some(Instant::now());
                            available_at.get_or_insert_with(Instant::now);
                            if let Some(rt) = self.lock().nodes.get_mut(name) {
                                rt.health = Some(body);
                            }
                            self.set_state(name, NodeState::Available);
                        }
                        // Up, but not serving yet (an instance in recovery).
                        Verdict::Starting(body) if last_ok.is_none() => {
                            if let Some(rt) = self.lock().nodes.get_mut(name) {
                                rt.health = Some(body);
                            }
                            if spawned_at.elapsed() > self.config.start_timeout {
                                log::error!("node {name}: still starting {} s after spawn; killing it", self.config.start_timeout.as_secs());
                                let _ = child.start_kill();
                            }
                        }
                        Verdict::Starting(_) => self.unhealthy(name, &mut child, last_ok, spawned_at, "reports state starting again".into()),
                        Verdict::Unhealthy(why) => self.unhealthy(name, &mut child, last_ok, spawned_at, why),
                    }
                }
            }
        }
    }

    /// A failed health check: report `failed` after a grace period, kill (so the
    /// node is restarted) after a longer one, or when it never became healthy.
    fn unhealthy(
        &self,
        name: &str,
        child: &mut Child,
        last_ok: Option<Instant>,
        spawned_at: Instant,
        why: String,
    ) {
        match last_ok {
            None if spawned_at.elapsed() > self.config.start_timeout => {
                log::error!(
                    "node {name}: not healthy {} s after start ({why}); killing it",
                    self.config.start_timeout.as_secs()
                );
                let _ = child.start_kill();
            }
            Some(t) if t.elapsed() > self.config.unhealthy_kill => {
                log::error!(
                    "node {name}: unhealthy for {} s ({why}); killing it",
                    t.elapsed().as_secs()
                );
                let _ = child.start_kill();
            }
            Some(t) if t.elapsed() > self.config.unhealthy_grace => {
                log::warn!("node {name}: unhealthy ({why})");
                if let Some(rt) = self.lock().nodes.get_mut(name) {
                    rt.last_exit = Some(format!("unhealthy: {why}"));
                }
                self.set_state(name, NodeState::Failed);
            }
            _ => {}
        }
    }

    fn clear_pid(&self, name: &str) {
        if let Some(rt) = self.lock().nodes.get_mut(name) {
            rt.pid = None;
        }
    }

    /// SIGTERM, bounded wait, SIGKILL.
    async fn terminate(&self, name: &str, child: &mut Child) {
        if let Some(pid) = child.id() {
            log::info!("node {name}: SIGTERM pid {pid}");
            // SAFETY: plain syscall on our own unreaped child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            match tokio::time::timeout(self.config.stop_timeout, child.wait()).await {
                Ok(status) => log::info!("node {name}: stopped ({status:?})"),
                Err(_) => {
                    log::warn!(
                        "node {name}: no exit {} s after SIGTERM; SIGKILL",
                        self.config.stop_timeout.as_secs()
                    );
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        }
        self.clear_pid(name);
    }

    /// Picks ports (sticky), bumps the epoch for a writer, and spawns the process.
    fn spawn_child(&self, name: &str) -> Result<Child, SpawnError> {
        let (args, epoch_note) = {
            let mut inner = self.lock();
            let mut changed = false;
            let node = inner
                .meta
                .node(name)
                .cloned()
                .ok_or_else(|| SpawnError::Other(format!("{name} has no metadata")))?;
            let listen_port = if node.kind == NodeKind::Proxy {
                // Endpoints are fixed by the contract (P, P+1); never moved.
                node.listen_port
            } else {
                sticky_port(node.listen_port, &mut changed)?
            };
            let http_port = sticky_port(node.http_port, &mut changed)?;
            if changed {
                if let Some(n) = inner.meta.node_mut(name) {
                    n.listen_port = listen_port;
                    n.http_port = http_port;
                }
            }
            let mut epoch_note = None;
            if node.kind == NodeKind::Instance && node.role == Some(Role::Writer) {
                // Durable before use: an epoch is never handed out twice.
                inner.meta.volume_epoch += 1;
                changed = true;
                epoch_note = Some(inner.meta.volume_epoch);
            }
            if changed {
                self.store.store(&inner.meta)?;
            }
            let data = &self.config.data_dir;
            let control = loopback(inner.meta.ports.control).to_string();
            let listen = loopback(listen_port).to_string();
            let http = loopback(http_port).to_string();
            let log_file = self.log_path(name).display().to_string();
            let node_dir = data.join(name).display().to_string();
            let mut args: Vec<String> = match node.kind {
                NodeKind::Storage => vec![
                    "storage-node".into(),
                    "--data-dir".into(),
                    node_dir,
                    "--name".into(),
                    name.into(),
                    "--az".into(),
                    node.az.clone(),
                ],
                NodeKind::Instance => vec![
                    "instance".into(),
                    "--data-dir".into(),
                    node_dir,
                    "--name".into(),
                    name.into(),
                    "--role".into(),
                    node.role.unwrap_or(Role::Reader).as_str().into(),
                    "--control".into(),
                    control.clone(),
                    "--epoch".into(),
                    inner.meta.volume_epoch.to_string(),
                    "--password-file".into(),
                    data.join(crate::datadir::PASSWORD_FILE)
                        .display()
                        .to_string(),
                ],
                NodeKind::Proxy => vec![
                    "proxy".into(),
                    "--control".into(),
                    control.clone(),
                    "--role".into(),
                    node.role.unwrap_or(Role::Writer).as_str().into(),
                ],
            };
            args.extend([
                "--listen".into(),
                listen,
                "--http".into(),
                http,
                "--log-file".into(),
                log_file,
            ]);
            (args, epoch_note)
        };
        if let Some(epoch) = epoch_note {
            log::info!(
                "node {name}: volume epoch bumped to {epoch} (stored) before starting the writer"
            );
        }
        let log_path = self.log_path(name);
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).map_err(SpawnError::Io)?;
        }
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(SpawnError::Io)?;
        let stderr = stdout.try_clone().map_err(SpawnError::Io)?;
        let mut cmd = Command::new(&self.config.exe);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe syscalls (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| SpawnError::Exec(self.config.exe.display().to_string(), e))?;
        let pid = child.id();
        log::info!(
            "node {name}: spawned pid {pid:?}: {} {}",
            self.config.exe.display(),
            args.join(" ")
        );
        if let Some(rt) = self.lock().nodes.get_mut(name) {
            rt.pid = pid;
            rt.health = None;
        }
        Ok(child)
    }
}

enum Verdict {
    Healthy(Value),
    Starting(Value),
    Unhealthy(String),
}

/// Reads a `/health` answer. A node is available when it answers 200 and its
/// `state` (if it reports one) is `available`; `starting` means up but not serving
/// yet (an instance in recovery); anything else (a storage node reporting `failed`
/// after a disk error) is unhealthy.
fn health_verdict(answer: Result<(u16, Value), borealis_common::http::HttpError>) -> Verdict {
    match answer {
        Ok((200, body)) => match body.get("state").and_then(|s| s.as_str()) {
            None | Some("available") => Verdict::Healthy(body),
            Some("starting") => Verdict::Starting(body),
            Some(other) => Verdict::Unhealthy(format!("reports state {other}: {body}")),
        },
        Ok((status, body)) => Verdict::Unhealthy(format!("/health answered {status}: {body}")),
        Err(e) => Verdict::Unhealthy(e.to_string()),
    }
}

enum Outcome {
    Stopped,
    Shutdown,
    Failed {
        reason: String,
        available_for: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot execute {0}: {1}")]
    Exec(String, std::io::Error),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Other(String),
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// Whether `port` can be bound on loopback right now (std sets SO_REUSEADDR, as the
/// children's listeners do, so a port in TIME_WAIT counts as free).
pub fn port_is_free(port: u16) -> bool {
    port != 0 && std::net::TcpListener::bind(loopback(port)).is_ok()
}

/// The recorded port if still free, else a fresh one from the kernel.
fn sticky_port(recorded: u16, changed: &mut bool) -> Result<u16, SpawnError> {
    if port_is_free(recorded) {
        return Ok(recorded);
    }
    let listener = std::net::TcpListener::bind(loopback(0)).map_err(SpawnError::Io)?;
    let port = listener.local_addr().map_err(SpawnError::Io)?.port();
    *changed = true;
    Ok(port)
}

/// Allocates `n` distinct free loopback ports (all held open until all are chosen,
/// so the kernel cannot hand out one twice).
pub fn allocate_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind(loopback(0)))
        .collect::<Result<_, _>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn health_verdicts() {
        let v = |status: u16, body: Value| health_verdict(Ok((status, body)));
        assert!(matches!(
            v(200, json!({"status": "ok"})),
            Verdict::Healthy(_)
        ));
        assert!(matches!(
            v(200, json!({"state": "available"})),
            Verdict::Healthy(_)
        ));
        assert!(matches!(
            v(200, json!({"state": "starting"})),
            Verdict::Starting(_)
        ));
        assert!(matches!(
            v(200, json!({"state": "failed", "error": "disk"})),
            Verdict::Unhealthy(_)
        ));
        assert!(matches!(v(503, json!({})), Verdict::Unhealthy(_)));
        let err = borealis_common::http::HttpError::Timeout("x".into());
        assert!(matches!(health_verdict(Err(err)), Verdict::Unhealthy(_)));
    }

    #[test]
    fn allocated_ports_are_distinct_and_free() {
        let ports = allocate_ports(16).expect("ports");
        let mut sorted = ports.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 16);
        assert!(ports.iter().all(|p| port_is_free(*p)));
        let mut changed = false;
        let held = std::net::TcpListener::bind(loopback(0)).expect("bind");
        let busy = held.local_addr().expect("addr").port();
        let moved = sticky_port(busy, &mut changed).expect("sticky");
        assert!(changed && moved != busy);
        let mut changed = false;
        assert_eq!(
            sticky_port(ports[0], &mut changed).expect("sticky"),
            ports[0]
        );
        assert!(!changed);
    }
}
