//! End-to-end tests: a real cluster started with `borealis up` (every node its own
//! OS process on free loopback ports), driven only through the CLI and real clients.
//!
//! Every wait is bounded, and every process is cleaned up even when a test fails:
//! [`Up`]'s Drop kills the `up` process group, and the children die with it (they
//! carry PR_SET_PDEATHSIG).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_borealis");
const PASSWORD: &str = "e2e-secret";
const WAIT: Duration = Duration::from_secs(120);

/// Three consecutive free loopback ports P, P+1, P+2 (checked by binding them all).
///
/// Chosen below Linux's ephemeral range (32768+ by default), where the control
/// planes of tests running in parallel pick their children's ports: a child port can
/// then never land on another test's endpoint between our check and its `up`.
fn free_base_port() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for attempt in 0..500u64 {
        let base = 20000
            + ((seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(attempt * 7919))
                % 4000) as u16
                * 3;
        let held: Vec<_> = (0..3)
            .filter_map(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == 3 {
            return base;
        }
    }
    panic!("no three consecutive free ports in 20000..32000");
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run borealis")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// A running `borealis up`. Dropping it kills everything.
struct Up {
    child: Option<Child>,
    dir: PathBuf,
    out: PathBuf,
}

impl Up {
    fn start(dir: &Path, port: u16) -> Up {
        let out = dir.with_extension(format!(
            "up-{}.out",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let log = std::fs::File::create(&out).expect("up output file");
        let log2 = log.try_clone().expect("clone");
        use std::os::unix::process::CommandExt;
        let child = Command::new(BIN)
            .args([
                "up",
                "--port",
                &port.to_string(),
                "--password",
                PASSWORD,
                "--data-dir",
            ])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .expect("spawn borealis up");
        Up {
            child: Some(child),
            dir: dir.to_path_buf(),
            out,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    fn status(&self) -> Option<Value> {
        let o = cli(&self.dir, &["status", "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Polls `status --json` until `pred` holds; panics with the last status after `WAIT`.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "borealis up exited ({status}) while waiting for {what}:\n{}",
                        self.output()
                    );
                }
            }
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; last status: {last:#?}\nup output:\n{}",
            self.output()
        );
    }

    fn wait_all_available(&mut self) -> Value {
        self.wait_for("every node available", |s| {
            all_nodes(s).iter().all(|n| n["state"] == "available")
        })
    }

    /// SIGTERM and a bounded wait; returns whether `up` exited successfully.
    fn terminate(&mut self) -> bool {
        let mut child = self.child.take().expect("running");
        // SAFETY: plain signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "borealis up did not exit within 60 s of SIGTERM:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kills the process group we created for `up`; its children die
            // through PR_SET_PDEATHSIG.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET (the control API closes the connection after answering).
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).expect("read");
    out
}

fn all_nodes(s: &Value) -> Vec<Value> {
    ["instances", "storage_nodes", "proxies"]
        .iter()
        .flat_map(|k| s[*k].as_array().cloned().unwrap_or_default())
        .collect()
}

fn node<'a>(s: &'a Value, name: &str) -> &'a Value {
    ["instances", "storage_nodes", "proxies"]
        .iter()
        .filter_map(|k| s[*k].as_array())
        .flatten()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {s:#}"))
}

fn child_pids(s: &Value) -> Vec<i32> {
    all_nodes(s)
        .iter()
        .filter_map(|n| n["pid"].as_i64())
        .map(|p| p as i32)
        .collect()
}

fn wait_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "child processes left behind: {:?}",
            pids.iter().filter(|p| pid_alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts success; returns stdout.
fn ok(o: Output) -> String {
    assert!(o.status.success(), "command failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: Output, needle: &str) -> String {
    let t = text(&o);
    assert!(!o.status.success(), "expected failure, got success: {t}");
    assert!(t.contains(needle), "expected {needle:?} in: {t}");
    assert_eq!(t.trim().lines().count(), 1, "error must be one line: {t}");
    t
}

#[test]
fn bad_input_is_refused_with_one_line_and_touches_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("nothing-here");
    refused(
        Command::new(BIN).arg("bogus").output().expect("run"),
        "unrecognized subcommand",
    );
    refused(
        Command::new(BIN)
            .args(["node", "kill"])
            .output()
            .expect("run"),
        "NAME",
    );
    refused(
        Command::new(BIN)
            .args(["up", "--port", "nope"])
            .output()
            .expect("run"),
        "--port",
    );
    refused(cli(&dir, &["status"]), "no Borealis cluster");
    refused(cli(&dir, &["up", "--replicas", "16"]), "at most 15");
    refused(
        cli(&dir, &["node", "stop", "storage-a1"]),
        "no Borealis cluster",
    );
    assert!(!dir.exists(), "a CLI command created the data dir");

    // A directory with something else in it is not ours.
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::write(foreign.join("important.txt"), b"keep me").expect("write");
    let port = free_base_port().to_string();
    refused(
        cli(&foreign, &["up", "--port", &port]),
        "not a Borealis data dir",
    );
    let entries: Vec<_> = std::fs::read_dir(&foreign)
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries.len(), 1, "up touched a foreign dir: {entries:?}");

    // Metadata from a future (or past) on-disk format is refused untouched.
    let future = tmp.path().join("future");
    std::fs::create_dir_all(&future).expect("mkdir");
    let doc = br#"{"format":"borealis-cluster","format_version":999}"#;
    std::fs::write(future.join("cluster.json"), doc).expect("write");
    refused(
        cli(&future, &["up", "--port", &port]),
        "incompatible Borealis version",
    );
    assert_eq!(
        std::fs::read(future.join("cluster.json")).expect("read"),
        doc
    );
    assert_eq!(std::fs::read_dir(&future).expect("ls").count(), 1);

    // A port in use: clear error, nothing created.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().expect("addr").port().to_string();
    let fresh = tmp.path().join("fresh");
    refused(cli(&fresh, &["up", "--port", &busy_port]), "already in use");
    assert!(
        !fresh.exists(),
        "up created a data dir although its port was taken"
    );
}

#[test]
fn cluster_lifecycle_fault_drills_and_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cluster");
    let port = free_base_port();
    let mut up = Up::start(&dir, port);
    let s = up.wait_all_available();

    // The DESIGN.md section 5 shape.
    assert_eq!(s["writer"], "instance-1");
    assert_eq!(s["endpoints"]["writer"], format!("127.0.0.1:{port}"));
    assert_eq!(s["endpoints"]["reader"], format!("127.0.0.1:{}", port + 1));
    let storage = s["storage_nodes"].as_array().expect("storage_nodes");
    assert_eq!(storage.len(), 6);
    for (name, az) in [
        ("storage-a1", "az-a"),
        ("storage-a2", "az-a"),
        ("storage-b1", "az-b"),
        ("storage-b2", "az-b"),
        ("storage-c1", "az-c"),
        ("storage-c2", "az-c"),
    ] {
        let n = node(&s, name);
        assert_eq!(n["az"], az);
        assert!(n["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")));
        assert!(n["pid"].as_i64().is_some());
    }
    let w = node(&s, "instance-1");
    assert_eq!(w["role"], "writer");
    assert!(w["applied_lsn"].is_u64() && w["lag_ms"].is_number() && w["pid"].is_i64());
    assert!(s["volume"]["epoch"].as_u64().is_some_and(|e| e >= 1));
    assert!(s["volume"]["vdl"].is_u64() && s["volume"]["protection_groups"].is_u64());
    let epoch_first = s["volume"]["epoch"].as_u64().unwrap_or(0);
    let ports_first: Vec<(String, String)> = all_nodes(&s)
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("").to_string(),
                n["addr"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(ok(cli(&dir, &["status"])).contains("storage-c2"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("password"))
            .expect("password file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A second `up` on the running data dir is refused.
    refused(
        cli(&dir, &["up", "--port", &port.to_string()]),
        "already running",
    );

    // kill: restarted automatically, back to available.
    let old_pid = node(&s, "storage-b1")["pid"].as_i64().expect("pid");
    assert!(ok(cli(&dir, &["node", "kill", "storage-b1"])).contains("killed"));
    up.wait_for("storage-b1 restarted", |s| {
        let n = node(s, "storage-b1");
        n["state"] == "available"
            && n["pid"].as_i64().is_some_and(|p| p != old_pid)
            && n["restarts"].as_u64() >= Some(1)
    });
    // Killing the writer: restarted, under a new epoch.
    let w_pid = node(&up.wait_all_available(), "instance-1")["pid"]
        .as_i64()
        .expect("pid");
    ok(cli(&dir, &["node", "kill", "instance-1"]));
    let s = up.wait_for("writer restarted", |s| {
        let n = node(s, "instance-1");
        n["state"] == "available" && n["pid"].as_i64().is_some_and(|p| p != w_pid)
    });
    assert!(
        s["volume"]["epoch"].as_u64() > Some(epoch_first),
        "epoch not bumped on writer restart: {s:#}"
    );

    // Endpoints are supervised like every other node.
    let p_pid = node(&s, "proxy-writer")["pid"].as_i64().expect("pid");
    ok(cli(&dir, &["node", "kill", "proxy-writer"]));
    up.wait_for("proxy-writer restarted", |s| {
        let n = node(s, "proxy-writer");
        n["state"] == "available" && n["pid"].as_i64().is_some_and(|p| p != p_pid)
    });

    // Prometheus metrics from the control plane.
    let metrics = http_get(port + 2, "/metrics");
    assert!(
        metrics.contains("borealis_node_up{node=\"storage-a1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("borealis_node_restarts_total{node=\"storage-b1\"}"),
        "{metrics}"
    );

    // stop/start are idempotent, and a stopped node stays stopped.
    assert!(ok(cli(&dir, &["node", "stop", "storage-a2"])).contains("stopped"));
    assert!(ok(cli(&dir, &["node", "stop", "storage-a2"])).contains("already stopped"));
    std::thread::sleep(Duration::from_secs(2));
    let s = up.status().expect("status");
    assert_eq!(node(&s, "storage-a2")["state"], "stopped");
    assert!(node(&s, "storage-a2")["pid"].is_null());
    ok(cli(&dir, &["node", "kill", "storage-a2"])); // killing a stopped node: nothing to do
    assert!(ok(cli(&dir, &["node", "start", "storage-a2"])).contains("starting"));
    assert!(ok(cli(&dir, &["node", "start", "storage-a2"])).contains("already running"));
    up.wait_all_available();

    // AZ outage drill.
    ok(cli(&dir, &["az", "stop", "az-c"]));
    let s = up.status().expect("status");
    for n in all_nodes(&s) {
        let in_c = n["az"] == "az-c";
        assert_eq!(n["state"] == "stopped", in_c, "after az stop az-c: {n:#}");
    }
    ok(cli(&dir, &["az", "stop", "az-c"]));
    ok(cli(&dir, &["az", "start", "az-c"]));
    up.wait_all_available();

    // Unknown names and impossible operations.
    refused(cli(&dir, &["node", "kill", "storage-z9"]), "unknown node");
    refused(cli(&dir, &["az", "stop", "az-q"]), "unknown AZ");
    refused(cli(&dir, &["failover"]), "reader");
    refused(
        cli(&dir, &["failover", "--to", "instance-9"]),
        "unknown node",
    );

    // SIGTERM stops everything cleanly and leaves no process behind.
    let pids = child_pids(&up.status().expect("status"));
    assert!(pids.len() >= 9, "{pids:?}");
    assert!(up.terminate(), "up did not exit cleanly:\n{}", up.output());
    wait_gone(&pids);
    refused(cli(&dir, &["status"]), "not running");

    // `up` again: the same cluster (names, ports, metadata), a new epoch.
    let mut up = Up::start(&dir, port);
    let s = up.wait_all_available();
    let ports_again: Vec<(String, String)> = all_nodes(&s)
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("").to_string(),
                n["addr"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(ports_first, ports_again);
    assert!(s["volume"]["epoch"].as_u64() > Some(epoch_first + 1));

    // Even a SIGKILLed control plane leaves no child behind (PR_SET_PDEATHSIG).
    let pids = child_pids(&s);
    // SAFETY: plain signal to our own child.
    unsafe { libc::kill(up.pid(), libc::SIGKILL) };
    wait_gone(&pids);
    drop(up);
}

fn psql(port: u16, sql: &str) -> Output {
    Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "20")
        .stdin(Stdio::null())
        .output()
        .expect("run psql (install postgresql-client)")
}

#[test]
fn committed_rows_survive_faults_and_a_cluster_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cluster");
    let port = free_base_port();
    let mut up = Up::start(&dir, port);
    up.wait_all_available();
    assert_eq!(ok(psql(port, "SELECT 1")).trim(), "1");
    ok(psql(
        port,
        "CREATE TABLE e2e (id int PRIMARY KEY, note text)",
    ));
    ok(psql(
        port,
        "INSERT INTO e2e VALUES (1, 'first'), (2, 'second')",
    ));
    // A dropped table's pages go on the free list (VACUUM frees at once what the
    // writer would free within a second).
    let churn = format!(
        "CREATE TABLE churn (id int PRIMARY KEY, v text); \
         INSERT INTO churn SELECT g, '{}' FROM generate_series(1, 20000) g",
        "x".repeat(100)
    );
    ok(psql(port, &churn));
    ok(psql(port, "DROP TABLE churn"));
    ok(psql(port, "VACUUM"));
    // (`status` shows the writer's health as the control plane last polled it.)
    let (allocated, free) = pages(
        &up.wait_for("the dropped table's pages on the free list", |s| {
            node(s, "instance-1")["health"]["free_pages"].as_u64() >= Some(200)
        }),
    );

    // The writer crashes: restarted under a new epoch; the writer endpoint holds new
    // connections until it is back, and nothing committed is lost.
    ok(cli(&dir, &["node", "kill", "instance-1"]));
    ok(psql(
        port,
        "INSERT INTO e2e VALUES (3, 'after writer kill')",
    ));
    // The free list survived the crash: the table again takes the freed pages.
    ok(psql(port, &churn));
    let (allocated_after, free_after) = pages(&up.wait_for("the freed pages in use again", |s| {
        matches!(node(s, "instance-1")["health"]["free_pages"].as_u64(), Some(f) if f < free / 4)
    }));
    assert!(
        allocated_after <= allocated + 8 && free_after < free / 4,
        "pages reused after the crash: {allocated} -> {allocated_after} allocated, \
         {free} -> {free_after} free"
    );
    assert_eq!(
        ok(psql(port, "SELECT count(*), sum(id) FROM churn")).trim(),
        "20000|200010000"
    );

    // An AZ is down: 4 of 6 segments still make a write quorum.
    ok(cli(&dir, &["az", "stop", "az-c"]));
    ok(psql(port, "INSERT INTO e2e VALUES (4, 'az-c down')"));
    ok(cli(&dir, &["az", "start", "az-c"]));
    let s = up.wait_all_available();
    assert!(s["volume"]["vdl"].as_u64() > Some(0), "{s:#}");

    // A stopped writer: the endpoint says so in the protocol (after waiting a bounded
    // time for it to come back), and serves again once it is started.
    ok(cli(&dir, &["node", "stop", "instance-1"]));
    let o = psql(port, "SELECT 1");
    assert!(
        !o.status.success() && text(&o).contains("no writer instance is available"),
        "{}",
        text(&o)
    );
    ok(cli(&dir, &["node", "start", "instance-1"]));
    assert_eq!(ok(psql(port, "SELECT count(*) FROM e2e")).trim(), "4");
    assert!(up.terminate());

    let mut up = Up::start(&dir, port);
    up.wait_all_available();
    let rows = ok(psql(port, "SELECT id, note FROM e2e ORDER BY id"));
    assert_eq!(
        rows.trim(),
        "1|first\n2|second\n3|after writer kill\n4|az-c down"
    );
    // The reader endpoint answers too (it routes to the writer while there are no readers).
    assert_eq!(ok(psql(port + 1, "SELECT count(*) FROM e2e")).trim(), "4");
    assert!(up.terminate());
}

/// (page numbers handed out, pages on the free list) from the writer's health.
fn pages(s: &Value) -> (u64, u64) {
    let health = &node(s, "instance-1")["health"];
    let get = |k: &str| {
        health[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in the writer's health: {s:#}"))
    };
    (get("allocated_pages"), get("free_pages"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Under a write load, storage-b1 is wiped and stopped for good; `node replace`
/// moves its segments to a new node through a membership change. Writes never
/// stop, every acknowledged row is readable afterwards, and status shows the new
/// node in place of the old one. Prints the rebuild rate and the commit latency
/// before and during the transition.
#[test]
fn a_storage_node_gone_for_good_is_replaced_while_writes_continue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cluster");
    let port = free_base_port();
    let mut up = Up::start(&dir, port);
    up.wait_all_available();
    ok(psql(
        port,
        "CREATE TABLE ledger (id int PRIMARY KEY, note text)",
    ));
    // Some volume for the replacement to rebuild.
    ok(psql(
        port,
        "CREATE TABLE bulk (id int PRIMARY KEY, pad text)",
    ));
    let pad = "x".repeat(400);
    ok(psql(
        port,
        &format!("INSERT INTO bulk SELECT g, '{pad}' FROM generate_series(1, 20000) g"),
    ));

    // The load: one client, one commit at a time, each acknowledged before the
    // next (the ledger of acknowledged commits).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<_, String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let conn = format!(
                    "host=127.0.0.1 port={port} user=postgres password={PASSWORD} dbname=postgres connect_timeout=20"
                );
                let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                tokio::spawn(connection);
                let t0 = Instant::now();
                // (id, acknowledged at seconds since t0, latency ms)
                let mut acked: Vec<(u32, f64, f64)> = Vec::new();
                let mut id = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && id < 1_000_000 {
                    let sent = Instant::now();
                    let sql = format!("INSERT INTO ledger VALUES ({id}, 'row {id}')");
                    match tokio::time::timeout(Duration::from_secs(30), client.batch_execute(&sql)).await {
                        Ok(Ok(())) => {
                            acked.push((
                                id,
                                t0.elapsed().as_secs_f64(),
                                sent.elapsed().as_secs_f64() * 1e3,
                            ));
                            id += 1;
                        }
                        Ok(Err(e)) => return Err(format!("insert {id}: {e}")),
                        Err(_) => return Err(format!("insert {id}: no answer within 30 s")),
                    }
                }
                Ok((t0, acked))
            })
        })
    };
    std::thread::sleep(Duration::from_secs(3));

    // storage-b1 is gone for good: stopped, its disk wiped.
    ok(cli(&dir, &["node", "stop", "storage-b1"]));
    std::fs::remove_dir_all(dir.join("storage-b1")).expect("wipe storage-b1");
    std::thread::sleep(Duration::from_secs(1));
    let replace_at = Instant::now();
    let out = ok(cli(&dir, &["node", "replace", "storage-b1"]));
    assert!(out.contains("storage-b3"), "{out}");
    // A second replacement while one runs is refused; so is an unknown node.
    refused(cli(&dir, &["node", "replace", "storage-a1"]), "in progress");
    refused(
        cli(&dir, &["node", "replace", "storage-z9"]),
        "unknown node",
    );

    let s = up.wait_for("the replacement to complete", |s| {
        s["membership"]["replacement"].is_null()
            && all_nodes(s).iter().all(|n| n["name"] != "storage-b1")
            && all_nodes(s)
                .iter()
                .any(|n| n["name"] == "storage-b3" && n["state"] == "available")
    });
    let transition_s = replace_at.elapsed().as_secs_f64();
    let b3 = node(&s, "storage-b3");
    assert_eq!(b3["az"], "az-b");
    assert!(b3["addr"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
    assert_eq!(s["storage_nodes"].as_array().map(Vec::len), Some(6));
    let segments = &s["membership"]["default"]["segments"];
    assert!(
        segments.as_array().is_some_and(
            |a| a.iter().any(|n| n == "storage-b3") && !a.iter().any(|n| n == "storage-b1")
        ),
        "{s:#}"
    );
    assert!(s["membership"]["default"]["membership_epoch"].as_u64() >= Some(2));
    let rebuilt_bytes: u64 = b3["health"]["segments"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["log_bytes"].as_u64()).sum())
        .unwrap_or(0);

    // A few more commits on the new six, then the load stops.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (t0, acked) = loader
        .join()
        .expect("loader thread")
        .unwrap_or_else(|e| panic!("the write load failed: {e}\n{}", up.output()));
    assert!(acked.len() > 20, "only {} commits", acked.len());

    // Writes never stopped: no gap between two acknowledgements longer than 5 s.
    let gap = acked
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .fold(0.0f64, f64::max);
    assert!(gap < 5.0, "writes stalled for {gap:.1} s");
    // Every acknowledged row is readable.
    let n = acked.len();
    let count = ok(psql(port, "SELECT count(*), min(id), max(id) FROM ledger"));
    assert_eq!(count.trim(), format!("{n}|0|{}", n - 1));
    assert_eq!(ok(psql(port, "SELECT count(*) FROM bulk")).trim(), "20000");

    // Latency before vs during the transition.
    let replace_t = replace_at.duration_since(t0).as_secs_f64();
    let mut before: Vec<f64> = acked
        .iter()
        .filter(|a| a.1 < replace_t - 1.0)
        .map(|a| a.2)
        .collect();
    let mut during: Vec<f64> = acked
        .iter()
        .filter(|a| a.1 >= replace_t && a.1 <= replace_t + transition_s)
        .map(|a| a.2)
        .collect();
    before.sort_by(f64::total_cmp);
    during.sort_by(f64::total_cmp);
    eprintln!(
        "replacement: {:.2} s from `node replace` to completion (status), new node holds {:.1} MB ({:.1} MB/s); \
         commit latency p50/p99 before {:.2}/{:.2} ms ({} commits), during {:.2}/{:.2} ms ({} commits); longest gap {:.0} ms",
        transition_s,
        rebuilt_bytes as f64 / 1e6,
        rebuilt_bytes as f64 / 1e6 / transition_s,
        percentile(&before, 0.5),
        percentile(&before, 0.99),
        before.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len(),
        gap * 1e3
    );
    assert!(!during.is_empty(), "no commit during the transition");

    // The retired node is gone from the API too; its data moved aside.
    refused(cli(&dir, &["node", "start", "storage-b1"]), "unknown node");
    assert!(!dir.join("storage-b1").exists());
    assert!(up.terminate());
}

/// A replacement is durable control-plane state: started while the writer is
/// stopped (so it cannot complete), it survives a restart of the whole cluster,
/// the writer recovers in the transitional membership, and the replacement
/// completes afterwards with every committed row there.
#[test]
fn a_replacement_survives_a_cluster_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cluster");
    let port = free_base_port();
    let mut up = Up::start(&dir, port);
    up.wait_all_available();
    ok(psql(port, "CREATE TABLE t (id int PRIMARY KEY)"));
    ok(psql(
        port,
        "INSERT INTO t SELECT g FROM generate_series(1, 1000) g",
    ));
    ok(cli(&dir, &["node", "stop", "instance-1"]));
    ok(cli(&dir, &["node", "stop", "storage-c1"]));
    std::fs::remove_dir_all(dir.join("storage-c1")).expect("wipe storage-c1");
    let out = ok(cli(
        &dir,
        &["node", "replace", "storage-c1", "--with", "storage-c9"],
    ));
    assert!(out.contains("storage-c9"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let s = up.status().expect("status");
    assert_eq!(s["membership"]["replacement"]["new"], "storage-c9", "{s:#}");
    assert!(ok(cli(&dir, &["status"])).contains("replacement: storage-c1 -> storage-c9"));
    assert!(up.terminate());

    let mut up = Up::start(&dir, port);
    let s = up.wait_for("the replacement to complete after a restart", |s| {
        s["membership"]["replacement"].is_null()
            && all_nodes(s).iter().all(|n| n["state"] == "available")
    });
    assert!(all_nodes(&s).iter().all(|n| n["name"] != "storage-c1"));
    assert_eq!(node(&s, "storage-c9")["az"], "az-c");
    assert_eq!(ok(psql(port, "SELECT count(*) FROM t")).trim(), "1000");
    ok(psql(port, "INSERT INTO t VALUES (1001)"));
    assert_eq!(ok(psql(port, "SELECT count(*) FROM t")).trim(), "1001");
    // A retired name is never handed out again.
    refused(
        cli(
            &dir,
            &["node", "replace", "storage-c9", "--with", "storage-c1"],
        ),
        "already exists",
    );
    assert!(up.terminate());
}
