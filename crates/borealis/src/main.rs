//! The `borealis` binary: CLI parsing and process start-up only.
//!
//! Operator commands (`up`, `status`, `node`, `az`, `failover`) are described in
//! DESIGN.md section 5. The other subcommands (`storage-node`, `instance`, `proxy`)
//! are how the control plane starts each node as its own OS process; they are
//! documented in `--help` but meant for the supervisor.

mod status;

use borealis_control::{client, up};
use clap::{Parser, Subcommand};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Whether `borealis instance` supports `--role reader`. Until it does, `up` starts
/// no readers and says so.
const READERS_SUPPORTED: bool = false;

/// mimalloc instead of glibc's malloc for every Borealis process. Profiles of the
/// storage nodes and the writer under TPC-B showed glibc's allocator (bin
/// unlinking, consolidation, realloc of growing batch buffers) at 10-15% of their
/// CPU; the many short-lived buffers of a redo batch are mimalloc's good case.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "borealis",
    version,
    about = "An Aurora-style, PostgreSQL-compatible database: cluster in a box"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct DataDir {
    /// The cluster's data directory.
    #[arg(long, default_value = "borealis-data")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Start the whole cluster in the foreground (Ctrl-C stops it).
    Up {
        #[command(flatten)]
        dir: DataDir,
        /// Writer endpoint port P; the reader endpoint is P+1, the control API P+2.
        /// Default: the port the cluster used last, or 5432.
        #[arg(long)]
        port: Option<u16>,
        /// Password of the `postgres` user (else BOREALIS_PASSWORD, else the stored
        /// one, else a generated one).
        #[arg(long)]
        password: Option<String>,
        /// Reader instances.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
    },
    /// Topology and health.
    Status {
        #[command(flatten)]
        dir: DataDir,
        /// One JSON object (DESIGN.md section 5) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Kill, stop or start one node.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Stop or start every node of an availability zone.
    Az {
        #[command(subcommand)]
        action: AzAction,
    },
    /// Planned failover to a reader.
    Failover {
        #[command(flatten)]
        dir: DataDir,
        /// The reader to promote (default: the most caught-up one).
        #[arg(long)]
        to: Option<String>,
    },
    /// (Started by the control plane.) Run a storage node.
    StorageNode {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        az: String,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Page images (8 KiB each) kept in memory over all segments; the rest are
        /// read back from the segment logs when needed. Default: the environment's
        /// BOREALIS_STORAGE_PAGE_IMAGES (which `borealis up` passes on to the nodes
        /// it starts), else 131072 (1 GiB).
        #[arg(long)]
        max_page_images: Option<usize>,
    },
    /// (Started by the control plane.) Run a database instance.
    Instance {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        control: SocketAddr,
        #[arg(long)]
        epoch: u64,
        #[arg(long)]
        password_file: PathBuf,
        /// Buffer cache size in 8 KiB pages (default 65536 = 512 MiB). Instances keep
        /// no OS page cache of their own data, so the buffer cache is their memory.
        #[arg(long, default_value_t = 65536)]
        cache_pages: usize,
        /// Threads running sessions. 1 (the default): one event loop, which on a host
        /// shared with the storage nodes cost a quarter less CPU per transaction than
        /// a work-stealing pool (no hand-offs between threads), but a long statement
        /// delays the other sessions while it computes. More: a work-stealing pool of
        /// that many threads, for hosts with cores to spare.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// (Started by the control plane.) Run an endpoint proxy.
    Proxy {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        http: Option<SocketAddr>,
        #[arg(long)]
        control: SocketAddr,
        #[arg(long, default_value = "writer")]
        role: borealis_proxy::Endpoint,
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NodeAction {
    /// SIGKILL the node (the supervisor restarts it).
    Kill {
        name: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Stop the node gracefully; it stays stopped until started.
    Stop {
        name: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Start a stopped node.
    Start {
        name: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Replace a storage node that is gone for good: a new storage node in the same
    /// AZ takes over its segments through a membership change (writes continue);
    /// the old node is retired once the new one has caught up.
    Replace {
        name: String,
        /// Name of the new storage node (default: the next free storage-<az><n>).
        #[arg(long)]
        with: Option<String>,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand)]
enum AzAction {
    /// Stop every node of the AZ (an AZ outage drill).
    Stop {
        az: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Start every node of the AZ.
    Start {
        az: String,
        #[command(flatten)]
        dir: DataDir,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the problem; the usage that follows
            // is what `--help` is for.
            // ("the following required arguments were not provided:" continues on
            // the next lines, up to the first blank line.)
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty())
                .collect();
            let line = first.join(" ");
            let line = if line.is_empty() {
                "invalid arguments".to_string()
            } else {
                line
            };
            eprintln!(
                "borealis: {} (see borealis --help)",
                line.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` joins anyhow's context chain on one line.
            eprintln!("borealis: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// How a node process schedules its tasks.
#[derive(Clone, Copy)]
enum Threads {
    /// One thread runs every task (a storage node runs its group commit's write
    /// inline, see `storage::server`): storage nodes and proxies, whose work is a chain of
    /// short steps. Several such processes share the host's cores, and a
    /// multi-thread runtime in each spent its time handing tasks between threads
    /// (futex wake-ups) rather than running them.
    One,
    /// A work-stealing pool of this many threads.
    Pool(usize),
}

/// Runs a node's future until it ends or SIGTERM/SIGINT arrives, then gives stuck
/// blocking work (an fsync) a bounded time to finish: dropping a runtime would
/// otherwise wait for it without limit.
fn run_node<F>(threads: Threads, node: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::Pool(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    }
    .enable_all()
    .build()?;
    let result = rt.block_on(async {
        tokio::select! {
            r = node => r,
            s = termination() => { log::info!("{s}: exiting"); Ok(()) }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up {
            dir,
            port,
            password,
            replicas,
        } => {
            let password = password.or_else(|| {
                std::env::var("BOREALIS_PASSWORD")
                    .ok()
                    .filter(|p| !p.is_empty())
            });
            let exe = std::env::current_exe().map_err(|e| {
                anyhow::anyhow!("cannot locate the borealis binary to start child processes: {e}")
            })?;
            let opts = up::UpOptions {
                data_dir: dir.data_dir,
                port,
                password,
                replicas,
                exe,
                readers_supported: READERS_SUPPORTED,
                start_timeout: Duration::from_secs(90),
            };
            // Current-thread on purpose: see borealis_control::supervisor (PDEATHSIG).
            current_thread()?.block_on(up::run_up(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { dir, json } => {
            let value = call(&dir.data_dir, "GET", "/v1/status", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", status::table(&value));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Node { action } => {
            let (name, verb, dir, body) = match action {
                NodeAction::Kill { name, dir } => (name, "kill", dir, None),
                NodeAction::Stop { name, dir } => (name, "stop", dir, None),
                NodeAction::Start { name, dir } => (name, "start", dir, None),
                NodeAction::Replace { name, with, dir } => {
                    let body = match &with {
                        Some(w) => json!({ "with": path_segment(w)? }),
                        None => json!({}),
                    };
                    (name, "replace", dir, Some(body))
                }
            };
            let v = call(
                &dir.data_dir,
                "POST",
                &format!("/v1/nodes/{}/{verb}", path_segment(&name)?),
                body.as_ref(),
            )?;
            println!(
                "{name}: {}",
                v.get("result").and_then(|r| r.as_str()).unwrap_or("done")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Az { action } => {
            let (az, verb, dir) = match action {
                AzAction::Stop { az, dir } => (az, "stop", dir),
                AzAction::Start { az, dir } => (az, "start", dir),
            };
            let v = call(
                &dir.data_dir,
                "POST",
                &format!("/v1/azs/{}/{verb}", path_segment(&az)?),
                None,
            )?;
            let nodes: Vec<&str> = v
                .get("nodes")
                .and_then(|n| n.as_array())
                .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
                .unwrap_or_default();
            let done = if verb == "stop" {
                "stopped"
            } else {
                "starting"
            };
            println!("{az}: {done}: {}", nodes.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Failover { dir, to } => {
            let body = match &to {
                Some(to) => json!({ "to": to }),
                None => json!({}),
            };
            let v = call(&dir.data_dir, "POST", "/v1/failover", Some(&body))?;
            println!(
                "failover: {}",
                v.get("result").and_then(|r| r.as_str()).unwrap_or("done")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::StorageNode {
            data_dir,
            name,
            az,
            listen,
            http,
            log_file,
            max_page_images,
        } => {
            init_child_logging(&name, log_file.as_deref())?;
            let mut config = borealis_storage::NodeConfig::new(data_dir, &name, &az, listen);
            config.http = Some(http);
            let from_env = std::env::var("BOREALIS_STORAGE_PAGE_IMAGES")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(n) = max_page_images.or(from_env) {
                config.limits.max_resident_images = n.max(1);
            }
            run_node(Threads::One, async {
                borealis_storage::run(config)
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Instance {
            data_dir,
            name,
            role,
            listen,
            http,
            control,
            epoch,
            password_file,
            cache_pages,
            threads,
            log_file,
        } => {
            init_child_logging(&name, log_file.as_deref())?;
            if role != "writer" && !(READERS_SUPPORTED && role == "reader") {
                anyhow::bail!("unsupported instance role {role:?} (this build supports: writer)");
            }
            let config = borealis_instance::InstanceConfig {
                data_dir,
                name,
                role,
                listen,
                http,
                control,
                epoch,
                password_file,
                cache_pages,
            };
            let threads = match threads {
                1 => Threads::One,
                n => Threads::Pool(n.into()),
            };
            run_node(threads, async {
                borealis_instance::run(config)
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Proxy {
            listen,
            http,
            control,
            role,
            log_file,
        } => {
            init_child_logging(&format!("proxy-{}", role.as_str()), log_file.as_deref())?;
            let mut config = borealis_proxy::ProxyConfig::new(listen, control, role);
            config.http = http;
            run_node(Threads::One, async {
                borealis_proxy::run(config)
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Node and AZ names go into a URL path; refuse anything that would change its shape.
fn path_segment(name: &str) -> anyhow::Result<&str> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        anyhow::bail!("invalid name {name:?} (letters, digits, '-' and '_' only)");
    }
    Ok(name)
}

fn call(
    data_dir: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let rt = current_thread()?;
    Ok(rt.block_on(client::call(data_dir, method, path, body))?)
}

fn init_child_logging(process: &str, log_file: Option<&Path>) -> anyhow::Result<()> {
    borealis_common::logging::init(process, log_file).map_err(|e| {
        anyhow::anyhow!(
            "cannot open log file {}: {e}",
            log_file
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
    })
}

/// Resolves on SIGTERM or SIGINT: children exit cleanly when the supervisor stops
/// them.
async fn termination() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action (exit) applies, which is also clean.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
