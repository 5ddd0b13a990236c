//! Storage benchmark: six storage nodes (separate tokio tasks in this process, real
//! TCP on loopback, real files with fdatasync in a temp dir) under the quorum volume.
//!
//! Reports, in one run: the physical floor (raw fdatasync + loopback round trip),
//! commit latency p50/p99 with one committer, throughput with 1 and 8 committers
//! (records/s, MB/s of redo), the rate at which a replacement node rebuilds its
//! segments from a peer by gossip, and a segment replacement through a membership
//! transition under load (rebuild rate, commit latency before/during/after).
//!
//!   cargo run --release -p borealis-sim --bin storage-bench [-- --seconds N --dir DIR]

use borealis_common::{Epoch, Geometry, Lsn};
use borealis_redo::Op;
use borealis_storage::client::Client;
use borealis_storage::proto::{Request, Response};
use borealis_storage::{NodeConfig, NodeHandle};
use borealis_volume::{QuorumConfig, StorageNodeInfo, Topology, Volume, VolumeConfig};
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Six files fdatasynced at once (one per storage node, same disk): the time until
/// the 4th completes is what a write quorum of local replicas physically costs.
fn fsync_quorum_floor(dir: &std::path::Path, n: usize) -> Vec<f64> {
    let files: Vec<std::fs::File> = (0..6)
        .map(|i| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("fsync-q{i}")))
                .expect("probe")
        })
        .collect();
    let files = std::sync::Arc::new(files);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..6 {
            let files = files.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut f = &files[i];
                let _ = f.write_all(&[1u8; 128]);
                let _ = f.sync_data();
                let _ = tx.send(());
            });
        }
        for _ in 0..4 {
            let _ = rx.recv();
        }
        out.push(t.elapsed().as_secs_f64() * 1e3);
        for _ in 0..2 {
            let _ = rx.recv();
        }
    }
    out
}

fn fsync_floor(dir: &std::path::Path, n: usize) -> Vec<f64> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("probe file");
    let buf = [7u8; 128];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fdatasync");
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out
}

async fn loopback_rtt(n: usize) -> Vec<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let mut b = [0u8; 64];
            while s.read_exact(&mut b).await.is_ok() {
                if s.write_all(&b).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    let mut b = [1u8; 64];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&b).await.expect("write");
        s.read_exact(&mut b).await.expect("read");
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out
}

/// One MTR of `records` records, each carrying `payload` bytes (a B-tree leaf insert
/// is ~100-300 bytes of redo); pages spread over 5 PGs.
fn mtr(i: u64, records: usize, payload: usize) -> Vec<(u64, Op)> {
    (0..records as u64)
        .map(|k| {
            let page = (i * 7 + k * 131) % 20_000;
            let item = vec![(i % 251) as u8; payload];
            (
                page,
                Op::InitWithItems {
                    kind: 2,
                    next: 0,
                    aux: 0,
                    items: vec![item],
                },
            )
        })
        .collect()
}

async fn committer(
    vol: Volume,
    until: Instant,
    records: usize,
    payload: usize,
    lat: bool,
) -> (u64, u64, Vec<f64>) {
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut lats = Vec::new();
    let mut i = 0u64;
    while Instant::now() < until {
        i += 1;
        let t = Instant::now();
        let recs = match vol.append(mtr(i, records, payload)).await {
            Ok(r) => r,
            Err(e) => panic!("append: {e}"),
        };
        let last = recs.last().map(|r| r.lsn).unwrap_or(Lsn::ZERO);
        if let Err(e) = vol.wait_durable(last).await {
            panic!("wait_durable: {e}");
        }
        if lat {
            lats.push(t.elapsed().as_secs_f64() * 1e3);
        }
        n += recs.len() as u64;
        bytes += recs.iter().map(|r| r.encoded_len() as u64).sum::<u64>();
    }
    (n, bytes, lats)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut seconds = 3u64;
    let mut base: Option<std::path::PathBuf> = None;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--seconds" => {
                seconds = args
                    .get(i + 1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(seconds);
                i += 1;
            }
            "--dir" => {
                base = args.get(i + 1).map(std::path::PathBuf::from);
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    let _ = borealis_common::logging::init("storage-bench", None);
    let tmp = match &base {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    println!(
        "storage benchmark: 6 storage nodes (tasks), loopback TCP, fdatasync on {}",
        tmp.path().display()
    );

    // Floor: the physical cost of one durable append.
    let mut fs = fsync_floor(tmp.path(), 300);
    let mut rtt = loopback_rtt(2000).await;
    let (fs50, fs99, rtt50) = (pct(&mut fs, 0.5), pct(&mut fs, 0.99), pct(&mut rtt, 0.5));
    let mut fq = fsync_quorum_floor(tmp.path(), 200);
    let fq50 = pct(&mut fq, 0.5);
    let floor = fs50 + rtt50;

    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut infos = Vec::new();
    for (k, az) in ["a", "a", "b", "b", "c", "c"].iter().enumerate() {
        let name = format!("storage-{az}{}", k % 2 + 1);
        let dir = tmp.path().join(&name);
        let cfg = NodeConfig::new(
            dir,
            &name,
            &format!("az-{az}"),
            "127.0.0.1:0".parse().expect("addr"),
        );
        let h = borealis_storage::start(cfg)
            .await
            .expect("start storage node");
        infos.push(StorageNodeInfo {
            name,
            az: format!("az-{az}"),
            addr: h.addr,
        });
        nodes.push(h);
    }
    let geometry = Geometry {
        pages_per_pg: 4096,
        max_pgs: 1024,
    };
    let topo = Topology {
        geometry,
        default_segments: infos.iter().map(|n| n.name.clone()).collect(),
        nodes: infos.clone(),
        protection_groups: Vec::new(),
        default_membership_epoch: 0,
        default_next_segments: Vec::new(),
    };
    let vcfg = VolumeConfig {
        geometry,
        lal: 100_000,
    };
    let vol = Volume::open_writer_with(topo, Epoch(1), vcfg, QuorumConfig::default())
        .await
        .expect("open writer");

    // Commit latency, one committer, one small record per commit.
    let until = Instant::now() + Duration::from_secs(seconds);
    let (_, _, mut lat) = committer(vol.clone(), until, 1, 200, true).await;
    let (l50, l99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));

    // Throughput: MTRs of 8 records each, 1 and 8 concurrent committers.
    let mut rows = Vec::new();
    for c in [1usize, 8] {
        let until = Instant::now() + Duration::from_secs(seconds);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..c {
            tasks.push(tokio::spawn(committer(vol.clone(), until, 8, 200, true)));
        }
        let (mut n, mut b, mut lats) = (0u64, 0u64, Vec::new());
        for t in tasks {
            let (n1, b1, l1) = t.await.expect("committer");
            n += n1;
            b += b1;
            lats.extend(l1);
        }
        let secs = t0.elapsed().as_secs_f64();
        rows.push((
            c,
            n as f64 / secs,
            b as f64 / secs / 1e6,
            lats.len() as f64 / secs,
            pct(&mut lats, 0.5),
            pct(&mut lats, 0.99),
        ));
    }
    let status = vol.status();
    // Crash-restart of the writer: recovery under a new epoch. It scans only the
    // tail above the VDL hint, so its time does not grow with the redo written.
    drop(vol);
    let t0 = Instant::now();
    let topo2 = Topology {
        geometry,
        default_segments: infos.iter().map(|n| n.name.clone()).collect(),
        nodes: infos.clone(),
        protection_groups: Vec::new(),
        default_membership_epoch: 0,
        default_next_segments: Vec::new(),
    };
    let vcfg2 = VolumeConfig {
        geometry,
        lal: 100_000,
    };
    let vol = Volume::open_writer_with(topo2, Epoch(2), vcfg2, QuorumConfig::default())
        .await
        .expect("recover");
    let recovery_ms = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        vol.vdl(),
        status.vdl,
        "recovery must find the acknowledged VDL"
    );

    // Rebuild: a fresh node with an empty disk gossips every segment from one peer.
    let src = nodes[0].addr;
    let mut c = Client::connect(src, Duration::from_secs(5))
        .await
        .expect("connect");
    let Ok(Response::Hello { segments, .. }) = c.call(&Request::Hello).await else {
        panic!("hello")
    };
    let src_bytes: u64 = dir_bytes(&tmp.path().join(&infos[0].name));
    let dir = tmp.path().join("storage-rebuilt");
    let mut cfg = NodeConfig::new(
        dir.clone(),
        "storage-rebuilt",
        "az-a",
        "127.0.0.1:0".parse().expect("addr"),
    );
    cfg.peers = vec![src];
    cfg.gossip_interval = Duration::from_millis(5);
    let t0 = Instant::now();
    let h = borealis_storage::start(cfg)
        .await
        .expect("start rebuilt node");
    let mut r = Client::connect(h.addr, Duration::from_secs(5))
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let Ok(Response::Hello { segments: mine, .. }) = r.call(&Request::Hello).await else {
            panic!("hello")
        };
        // Complete when its backlink chain reaches the peer's last record (a node at
        // epoch 0 does not take over the writer's completeness claims; the writer's
        // next heartbeat would).
        let done = segments
            .iter()
            .all(|s| mine.iter().any(|m| m.pg == s.pg && m.scl >= s.max_lsn));
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rebuild_secs = t0.elapsed().as_secs_f64();
    // The rebuilt node's last group commit must be on disk too before we stop the clock.
    let rebuilt_bytes = dir_bytes(&dir);
    h.kill().await;

    println!();
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| raw fdatasync p50 / p99 | {fs50:.3} ms / {fs99:.3} ms |");
    println!("| loopback TCP round trip p50 | {rtt50:.3} ms |");
    println!("| floor = fdatasync p50 + RTT p50 | {floor:.3} ms |");
    println!("| 6 concurrent fdatasyncs on the shared disk, 4th done, p50 (+RTT) | {fq50:.3} ms ({:.3} ms) |", fq50 + rtt50);
    println!(
        "| commit latency p50 / p99 (1 committer, 1 record/commit) | {l50:.3} ms / {l99:.3} ms ({:.2}x floor; {:.2}x the 6-replica floor) |",
        l50 / floor,
        l50 / (fq50 + rtt50)
    );
    for (c, rps, mbps, cps, p50, p99) in &rows {
        println!("| {c} committer(s), 8 records/MTR: throughput | {rps:.0} records/s, {mbps:.2} MB/s redo, {cps:.0} commits/s (commit p50 {p50:.2} ms, p99 {p99:.2} ms) |");
    }
    let records: u64 = status.vdl.0;
    println!(
        "| rebuild of a lost node's segments from one peer | {:.1} MB in {:.2} s = {:.1} MB/s, {:.0} records/s ({} segments) |",
        rebuilt_bytes as f64 / 1e6,
        rebuild_secs,
        rebuilt_bytes as f64 / 1e6 / rebuild_secs.max(1e-9),
        records as f64 / rebuild_secs.max(1e-9),
        segments.len()
    );
    println!("| writer crash recovery (open_writer at a new epoch, {records} records of redo on the volume) | {recovery_ms:.1} ms |");
    println!(
        "| volume at end | VDL {}, {} PGs, source log {:.1} MB |",
        status.vdl,
        status.protection_groups,
        src_bytes as f64 / 1e6
    );
    replacement_under_load(&vol, &mut nodes, &infos, geometry, tmp.path(), seconds).await;
    drop(vol);
    for n in nodes {
        n.kill().await;
    }
}

/// Commits (MTRs of 8 records) until `stop`; returns (seconds since `t0`, latency
/// ms) per commit.
async fn stamped_committer(
    vol: Volume,
    t0: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut i = seed << 32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let t = Instant::now();
        let recs = vol.append(mtr(i, 8, 200)).await.expect("append");
        let last = recs.last().map(|r| r.lsn).unwrap_or(Lsn::ZERO);
        vol.wait_durable(last).await.expect("wait_durable");
        out.push((t0.elapsed().as_secs_f64(), t.elapsed().as_secs_f64() * 1e3));
    }
    out
}

/// storage-c2 is gone for good; storage-c3 replaces it through a membership
/// transition (write quorum over both sets) while 4 committers keep writing.
async fn replacement_under_load(
    vol: &Volume,
    nodes: &mut Vec<NodeHandle>,
    infos: &[StorageNodeInfo],
    geometry: Geometry,
    tmp: &std::path::Path,
    seconds: u64,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|k| tokio::spawn(stamped_committer(vol.clone(), t0, stop.clone(), 1000 + k)))
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;

    // The victim: stopped for good (its files stay, unused).
    let victim = &infos[5];
    if nodes.len() > 5 {
        nodes.remove(5).kill().await;
    }
    let dir = tmp.join("storage-c3");
    let mut cfg = NodeConfig::new(
        dir,
        "storage-c3",
        "az-c",
        "127.0.0.1:0".parse().expect("addr"),
    );
    cfg.gossip_interval = Duration::from_millis(5);
    cfg.http = Some("127.0.0.1:0".parse().expect("addr"));
    let new = borealis_storage::start(cfg)
        .await
        .expect("start storage-c3");
    let http = new.http_addr.expect("http");
    let mut nodes_info = infos.to_vec();
    nodes_info.push(StorageNodeInfo {
        name: "storage-c3".into(),
        az: "az-c".into(),
        addr: new.addr,
    });
    let old_set: Vec<String> = infos.iter().map(|n| n.name.clone()).collect();
    let new_set: Vec<String> = old_set
        .iter()
        .map(|n| {
            if *n == victim.name {
                "storage-c3".into()
            } else {
                n.clone()
            }
        })
        .collect();
    let transitional = Topology {
        geometry,
        nodes: nodes_info.clone(),
        protection_groups: Vec::new(),
        default_segments: old_set,
        default_membership_epoch: 1,
        default_next_segments: new_set.clone(),
    };
    let t_replace = t0.elapsed().as_secs_f64();
    let started = Instant::now();
    vol.update_topology(&transitional)
        .expect("adopt the transition");
    let t = vol.transitions();
    let (catch_up, pgs) = match t.first() {
        Some(t) => (t.catch_up_lsn, t.pgs.clone()),
        None => panic!("no transition after adopting one"),
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut log_bytes = 0u64;
    loop {
        if let Ok((200, h)) =
            borealis_common::http::get_json(http, "/health", Duration::from_secs(5)).await
        {
            let segs = h["segments"].as_array().cloned().unwrap_or_default();
            let scl = |pg: u32| {
                segs.iter()
                    .find(|s| s["pg"] == pg)
                    .and_then(|s| s["durable_scl"].as_u64())
                    .unwrap_or(0)
            };
            if pgs.iter().all(|pg| scl(pg.0) >= catch_up.0) {
                log_bytes = segs.iter().filter_map(|s| s["log_bytes"].as_u64()).sum();
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rebuild_secs = started.elapsed().as_secs_f64();
    let done = Topology {
        geometry,
        nodes: nodes_info
            .into_iter()
            .filter(|n| n.name != victim.name)
            .collect(),
        protection_groups: Vec::new(),
        default_segments: new_set,
        default_membership_epoch: 2,
        default_next_segments: Vec::new(),
    };
    vol.update_topology(&done).expect("complete the transition");
    let t_done = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("committer"));
    }
    let window = |from: f64, to: f64| -> Vec<f64> {
        all.iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, l)| *l)
            .collect()
    };
    let mut before = window(0.0, t_replace);
    let mut during = window(t_replace, t_done);
    let mut after = window(t_done, f64::MAX);
    let rate = |v: &[f64], secs: f64| v.len() as f64 / secs.max(1e-9);
    println!(
        "| replacement of a lost node under load (4 committers): rebuild of storage-c3 to the catch-up point | {:.1} MB in {:.2} s = {:.1} MB/s ({} PGs) |",
        log_bytes as f64 / 1e6,
        rebuild_secs,
        log_bytes as f64 / 1e6 / rebuild_secs.max(1e-9),
        pgs.len()
    );
    println!(
        "| commit latency p50 / p99, commits/s: before / during / after the transition | {:.2} / {:.2} ms, {:.0}/s; {:.2} / {:.2} ms, {:.0}/s; {:.2} / {:.2} ms, {:.0}/s |",
        pct(&mut before, 0.5),
        pct(&mut before, 0.99),
        rate(&before, t_replace),
        pct(&mut during, 0.5),
        pct(&mut during, 0.99),
        rate(&during, t_done - t_replace),
        pct(&mut after, 0.5),
        pct(&mut after, 0.99),
        rate(&after, seconds as f64),
    );
    new.kill().await;
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[allow(dead_code)]
fn _unused(_: SocketAddr) {}
