//! Six real storage nodes in-process (real TCP on 127.0.0.1, real files with
//! fdatasync in temp dirs) under the quorum volume: writes, an AZ outage, restarts,
//! recovery under a new epoch, fencing of the old writer. Every wait is bounded.

use borealis_common::{Epoch, Geometry, Lsn, PageNo};
use borealis_redo::Op;
use borealis_storage::{NodeConfig, NodeHandle};
use borealis_volume::{QuorumConfig, StorageNodeInfo, Topology, Volume, VolumeConfig, VolumeError};
use std::net::SocketAddr;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(20);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {LIMIT:?}"),
    }
}

struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    addrs: Vec<SocketAddr>,
    nodes: Vec<Option<NodeHandle>>,
}

fn names() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for az in ["a", "b", "c"] {
        for i in 1..=2 {
            v.push((format!("storage-{az}{i}"), format!("az-{az}")));
        }
    }
    v
}

impl Cluster {
    async fn start() -> Cluster {
        let mut c = Cluster {
            dirs: Vec::new(),
            addrs: Vec::new(),
            nodes: Vec::new(),
        };
        for (i, (name, az)) in names().into_iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = NodeConfig::new(
                dir.path().to_path_buf(),
                &name,
                &az,
                "127.0.0.1:0".parse().unwrap(),
            );
            let h = borealis_storage::start(cfg).await.expect("start node");
            c.addrs.push(h.addr);
            c.dirs.push(dir);
            c.nodes.push(Some(h));
            assert_eq!(c.nodes.len(), i + 1);
        }
        c
    }

    async fn kill(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].take() {
            h.kill().await;
        }
    }

    async fn restart(&mut self, i: usize) {
        let (name, az) = names()[i].clone();
        let cfg = NodeConfig::new(self.dirs[i].path().to_path_buf(), &name, &az, self.addrs[i]);
        let mut tries = 0;
        loop {
            match borealis_storage::start(cfg.clone()).await {
                Ok(h) => {
                    self.nodes[i] = Some(h);
                    return;
                }
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart {name}: {e}"),
            }
        }
    }

    fn topology(&self, geometry: Geometry) -> Topology {
        let nodes: Vec<StorageNodeInfo> = names()
            .into_iter()
            .zip(&self.addrs)
            .map(|((name, az), addr)| StorageNodeInfo {
                name,
                az,
                addr: *addr,
            })
            .collect();
        Topology {
            geometry,
            default_segments: nodes.iter().map(|n| n.name.clone()).collect(),
            nodes,
            protection_groups: Vec::new(),
            default_membership_epoch: 0,
            default_next_segments: Vec::new(),
        }
    }
}

fn config() -> (VolumeConfig, QuorumConfig) {
    let geometry = Geometry {
        pages_per_pg: 8,
        max_pgs: 64,
    };
    let q = QuorumConfig {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        reconnect_backoff_max: Duration::from_millis(100),
        recovery_timeout: Duration::from_secs(15),
        ..QuorumConfig::default()
    };
    (
        VolumeConfig {
            geometry,
            lal: 1000,
        },
        q,
    )
}

/// Every test's start: logging, six fresh nodes, the volume config and their
/// topology.
async fn setup() -> (Cluster, VolumeConfig, Topology) {
    let _ = borealis_common::logging::init("volume-test", None);
    let cluster = Cluster::start().await;
    let (vcfg, _) = config();
    let topo = cluster.topology(vcfg.geometry);
    (cluster, vcfg, topo)
}

/// A writer over `topo` at `epoch`, recovered and serving (config as [`config`]).
async fn open_writer(topo: &Topology, epoch: u64) -> Volume {
    let (vcfg, qcfg) = config();
    let what = format!("open writer at epoch {epoch}");
    bounded(
        &what,
        Volume::open_writer_with(topo.clone(), Epoch(epoch), vcfg, qcfg),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A deterministic MTR touching a few pages across PGs.
fn mtr(i: u64, touched: &mut std::collections::HashSet<PageNo>) -> Vec<(PageNo, Op)> {
    let mut ops = Vec::new();
    for k in 0..(1 + i % 3) {
        let page = (i * 7 + k * 13) % 40;
        if touched.insert(page) {
            ops.push((page, Op::Init { kind: 1 }));
        }
        let offset = ((i * 31 + k) % 500) as u16 * 8;
        ops.push((
            page,
            Op::WriteBody {
                offset,
                data: (i * 1000 + k).to_le_bytes().to_vec(),
            },
        ));
        if k == 0 {
            ops.push((page, Op::StampLsnBody { offset: 4000 }));
        }
    }
    ops
}

async fn write_batch(
    vol: &Volume,
    model: &Volume,
    range: std::ops::Range<u64>,
    touched: &mut std::collections::HashSet<PageNo>,
) -> Lsn {
    let mut last = Lsn::ZERO;
    for i in range {
        let ops = mtr(i, touched);
        let recs = bounded("append", vol.append(ops.clone()))
            .await
            .expect("append");
        let model_recs = model.append(ops).await.expect("model append");
        assert_eq!(
            recs, model_recs,
            "quorum volume and model must build the same records"
        );
        last = recs.last().expect("non-empty").lsn;
        // Commit every few MTRs, like transactions do.
        if i % 4 == 3 {
            bounded("wait_durable", vol.wait_durable(last))
                .await
                .expect("durable");
        }
    }
    bounded("wait_durable", vol.wait_durable(last))
        .await
        .expect("durable");
    last
}

async fn check_pages(vol: &Volume, model: &Volume, at: Lsn) {
    for page in 0..40 {
        let got = bounded("get_page", vol.get_page(page, at))
            .await
            .expect("get_page");
        let want = model.get_page(page, at).await.expect("model page");
        assert_eq!(got, want, "page {page} at {at}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_an_az_outage_restart_and_recovery() {
    let (mut cluster, vcfg, topo) = setup().await;
    let model = Volume::in_memory(vcfg.clone());
    let mut touched = std::collections::HashSet::new();

    let w1 = open_writer(&topo, 1).await;
    let l1 = write_batch(&w1, &model, 0..60, &mut touched).await;
    assert!(w1.vdl() >= l1);
    check_pages(&w1, &model, l1).await;
    assert!(
        w1.status().protection_groups > 1,
        "the workload spans several PGs"
    );

    // A whole AZ goes away: writes go on with 4 of 6.
    cluster.kill(0).await;
    cluster.kill(1).await;
    let l2 = write_batch(&w1, &model, 60..120, &mut touched).await;
    check_pages(&w1, &model, l2).await;
    check_pages(&w1, &model, l1).await; // an older read point still reads as of then

    // The AZ comes back; a new writer recovers under epoch 2.
    cluster.restart(0).await;
    cluster.restart(1).await;
    let w2 = open_writer(&topo, 2).await;
    assert_eq!(w2.vdl(), l2, "recovery finds exactly the acknowledged log");
    check_pages(&w2, &model, l2).await;

    // The old writer is fenced: nothing it writes becomes durable.
    let stale = bounded("stale append", w1.append(vec![(1, Op::Noop)])).await;
    if let Ok(recs) = stale {
        let r = bounded("stale wait", w1.wait_durable(recs[0].lsn)).await;
        assert!(
            matches!(r, Err(VolumeError::Fenced { .. })),
            "old writer must be fenced, got {r:?}"
        );
    }
    drop(w1);

    let l3 = write_batch(&w2, &model, 120..160, &mut touched).await;
    check_pages(&w2, &model, l3).await;
    check_pages(&w2, &model, l2).await;

    // Crash everything and recover again: still exactly the acknowledged log.
    drop(w2);
    for i in 0..6 {
        cluster.kill(i).await;
    }
    for i in 0..6 {
        cluster.restart(i).await;
    }
    let w3 = open_writer(&topo, 3).await;
    assert_eq!(w3.vdl(), l3);
    check_pages(&w3, &model, l3).await;
    for i in 0..6 {
        cluster.kill(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_is_rebuilt_from_peers_by_gossip() {
    use borealis_storage::client::Client;
    use borealis_storage::proto::{Request, Response};
    let (mut cluster, vcfg, topo) = setup().await;
    let model = Volume::in_memory(vcfg.clone());
    let mut touched = std::collections::HashSet::new();
    let w = open_writer(&topo, 1).await;
    let l1 = write_batch(&w, &model, 0..80, &mut touched).await;

    // storage-c2 loses its disk: it comes back empty.
    cluster.kill(5).await;
    let dir = cluster.dirs[5].path().to_path_buf();
    std::fs::remove_dir_all(&dir).expect("wipe");
    let mut cfg = NodeConfig::new(dir, "storage-c2", "az-c", cluster.addrs[5]);
    // No configured peers: the writer names them (SetPeers) when it reconnects.
    cfg.gossip_interval = Duration::from_millis(20);
    cfg.http = Some("127.0.0.1:0".parse().unwrap());
    let mut started = None;
    for _ in 0..50 {
        match borealis_storage::start(cfg.clone()).await {
            Ok(h) => {
                started = Some(h);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let h = started.expect("restart storage-c2");
    let http = h.http_addr.expect("http addr");
    cluster.nodes[5] = Some(h);
    // More writes meanwhile; the writer re-installs its epoch on the new node.
    let l2 = write_batch(&w, &model, 80..100, &mut touched).await;
    assert!(l2 > l1);

    // Every page reads back from the rebuilt node alone, once gossip caught it up.
    let mut c = Client::connect(cluster.addrs[5], Duration::from_secs(2))
        .await
        .expect("connect");
    let geometry = w.geometry();
    for page in 0..40u64 {
        let want = model.get_page(page, l2).await.expect("model");
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let req = Request::GetPage {
                pg: geometry.pg_of(page),
                page,
                read_lsn: l2,
            };
            match c.call(&req).await.expect("call") {
                Response::Page { bytes } => {
                    assert_eq!(
                        borealis_redo::Page::from_bytes(&bytes).as_ref(),
                        Some(&want),
                        "page {page}"
                    );
                    break;
                }
                other => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "page {page} never served: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    let (status, health) = borealis_common::http::get_json(http, "/health", Duration::from_secs(5))
        .await
        .expect("health");
    assert_eq!(status, 200);
    assert_eq!(health["state"], "available");
    assert_eq!(health["epoch"], 1);
    let (_, metrics) =
        borealis_common::http::request(http, "GET", "/metrics", None, Duration::from_secs(5))
            .await
            .expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("borealis_storage_segment_scl{node=\"storage-c2\""),
        "{metrics}"
    );
    drop(w);
    for i in 0..6 {
        cluster.kill(i).await;
    }
}

/// Polls a storage node's `/health` until its segments of `pgs` are complete to
/// `lsn`; returns the bytes of its logs then.
async fn wait_caught_up(http: SocketAddr, pgs: &[borealis_common::PgId], lsn: Lsn) -> u64 {
    let deadline = tokio::time::Instant::now() + LIMIT;
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
            if pgs.iter().all(|pg| scl(pg.0) >= lsn.0) {
                return segs.iter().filter_map(|s| s["log_bytes"].as_u64()).sum();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new segments never caught up to {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// storage-b1 is gone for good: storage-b3 replaces it through a membership
/// transition (both write quorums meanwhile), is rebuilt from peers that already
/// garbage-collected their logs (snapshot + gossip), and after the transition the
/// volume recovers from the new six alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_segment_is_replaced_through_a_membership_transition() {
    use borealis_storage::client::Client;
    use borealis_storage::proto::{Append, ErrorCode, PgBatch, Request, Response};
    let (mut cluster, vcfg, topo) = setup().await;
    let model = Volume::in_memory(vcfg.clone());
    let mut touched = std::collections::HashSet::new();
    let w = open_writer(&topo, 1).await;
    let l1 = write_batch(&w, &model, 0..80, &mut touched).await;
    // Let the segments fold records into page images (PGMRPL moves with appends).
    w.set_min_read_point(l1);
    write_batch(&w, &model, 80..84, &mut touched).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    write_batch(&w, &model, 84..88, &mut touched).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // storage-b1 is gone for good; storage-b3 (az-b, empty) is its replacement.
    cluster.kill(2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = NodeConfig::new(
        dir.path().to_path_buf(),
        "storage-b3",
        "az-b",
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.gossip_interval = Duration::from_millis(20);
    cfg.http = Some("127.0.0.1:0".parse().unwrap());
    let b3 = borealis_storage::start(cfg)
        .await
        .expect("start storage-b3");
    let b3_http = b3.http_addr.expect("http");
    let b3_addr = b3.addr;
    let mut transitional = topo.clone();
    transitional.nodes.push(StorageNodeInfo {
        name: "storage-b3".into(),
        az: "az-b".into(),
        addr: b3_addr,
    });
    transitional.default_membership_epoch = 1;
    transitional.default_next_segments = topo
        .default_segments
        .iter()
        .map(|n| {
            if n == "storage-b1" {
                "storage-b3".into()
            } else {
                n.clone()
            }
        })
        .collect();
    let started = std::time::Instant::now();
    assert!(w.update_topology(&transitional).expect("adopt"));
    assert!(
        !w.update_topology(&transitional).expect("again"),
        "idempotent"
    );
    let t = w.transitions();
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0].joining, vec!["storage-b3".to_string()]);
    assert_eq!(t[0].membership_epoch, 1);
    let catch_up = t[0].catch_up_lsn;
    assert!(catch_up >= l1);

    // Writes never stop: 5 of the old six and 5 of the new six answer.
    let l3 = write_batch(&w, &model, 88..130, &mut touched).await;
    let bytes = wait_caught_up(b3_http, &t[0].pgs, catch_up).await;
    let took = started.elapsed();
    eprintln!(
        "storage-b3 caught up with {} PGs ({bytes} log bytes) {:.1} ms after the transition began",
        t[0].pgs.len(),
        took.as_secs_f64() * 1e3
    );

    // The transition completes: storage-b1 leaves the topology.
    let mut done = transitional.clone();
    done.default_membership_epoch = 2;
    done.default_segments = transitional.default_next_segments.clone();
    done.default_next_segments = Vec::new();
    done.nodes.retain(|n| n.name != "storage-b1");
    assert!(w.update_topology(&done).expect("complete"));
    assert!(w.transitions().is_empty());
    let l4 = write_batch(&w, &model, 130..160, &mut touched).await;
    assert!(l4 > l3);
    check_pages(&w, &model, l4).await;

    // A writer still on the old membership is refused by the new segment.
    let mut c = Client::connect(b3_addr, Duration::from_secs(2))
        .await
        .expect("connect");
    let stale = Request::Append(Append {
        epoch: Epoch(1),
        vdl_hint: Lsn::ZERO,
        pgmrpl: Lsn::ZERO,
        pgs: vec![PgBatch {
            pg: t[0].pgs[0],
            membership_epoch: 1,
            complete_to: Lsn::ZERO,
            pg_last: Lsn::ZERO,
            records: Vec::new(),
        }],
    });
    match c.call(&stale).await.expect("call") {
        Response::Error {
            code: ErrorCode::StaleMembership,
            detail: 2,
            ..
        } => {}
        other => panic!("stale membership accepted: {other:?}"),
    }

    // A new writer recovers from the new six alone (storage-b1 never returns).
    drop(w);
    let w2 = open_writer(&done, 2).await;
    assert!(w2.vdl() >= l4);
    check_pages(&w2, &model, l4).await;
    drop(w2);
    b3.kill().await;
    for i in 0..6 {
        cluster.kill(i).await;
    }
}

/// Concurrent commits gather into shared flushes (see "Commit gathering" in
/// `remote.rs`), whether or not they saw each other open; a commit whose siblings
/// never commit is sent anyway, and one with none is sent at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_share_flushes_and_a_lone_one_is_not_held() {
    let (mut cluster, _, topo) = setup().await;
    let w = open_writer(&topo, 1).await;
    let mut touched = std::collections::HashSet::new();

    // Rounds of eight transactions, each appending then committing, all at once:
    // first as transactions that see each other open (explicit blocks), then as
    // single-statement ones that never do (autocommit: each is open only while it
    // runs, so each commits with no sibling open).
    const CLIENTS: u64 = 8;
    const ROUNDS: u64 = 10;
    let mut last = Lsn::ZERO;
    for (pass, siblings) in [(0, CLIENTS as usize - 1), (1, 0)] {
        let before = w.status().flushes;
        for round in 0..ROUNDS {
            let mut tasks = Vec::new();
            for c in 0..CLIENTS {
                let ops = mtr((pass * ROUNDS + round) * CLIENTS + c, &mut touched);
                let w = w.clone();
                tasks.push(tokio::spawn(async move {
                    let recs = w.append(ops).await.expect("append");
                    let lsn = recs.last().expect("non-empty").lsn;
                    w.wait_commit(lsn, siblings).await.expect("commit");
                    assert!(w.vdl() >= lsn, "a commit returned before VDL reached it");
                    lsn
                }));
            }
            for t in tasks {
                last = last.max(bounded("commit", t).await.expect("task"));
            }
        }
        let flushes = w.status().flushes - before;
        assert!(
            flushes <= ROUNDS * CLIENTS / 2,
            "{} commits (others_open = {siblings}) took {flushes} flushes: they did not gather",
            ROUNDS * CLIENTS
        );
    }

    // Siblings that never commit do not hold a commit back for long, and a commit
    // with none is sent at once: both are bounded by far less than the hedge.
    for others in [5, 0] {
        let recs = w.append(vec![(1, Op::Noop)]).await.expect("append");
        let lsn = recs[0].lsn;
        let flushes = w.status().flushes;
        let started = std::time::Instant::now();
        bounded("lone commit", w.wait_commit(lsn, others))
            .await
            .expect("commit");
        assert!(lsn > last && w.vdl() >= lsn);
        assert_eq!(w.status().flushes, flushes + 1, "others_open = {others}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a lone commit (others_open = {others}) took {:?}",
            started.elapsed()
        );
    }

    // A leading commit dropped mid-gathering (its session torn down) still sends
    // what it gathered, and the next commit leads a gathering of its own.
    let recs = w.append(vec![(2, Op::Noop)]).await.expect("append");
    let flushes = w.status().flushes;
    {
        use std::future::Future;
        let mut leading = std::pin::pin!(w.wait_commit(recs[0].lsn, 5));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            leading.as_mut().poll(&mut cx).is_pending(),
            "the leader should still be gathering"
        );
        assert_eq!(w.status().flushes, flushes, "nothing sent while gathering");
    } // dropped here, mid-gathering
    assert_eq!(w.status().flushes, flushes + 1, "a dropped leader flushes");
    bounded(
        "durable after a dropped leader",
        w.wait_durable(recs[0].lsn),
    )
    .await
    .expect("durable");
    let recs = w.append(vec![(3, Op::Noop)]).await.expect("append");
    bounded(
        "commit after a dropped leader",
        w.wait_commit(recs[0].lsn, 5),
    )
    .await
    .expect("commit");
    assert_eq!(w.status().flushes, flushes + 2, "the next commit led");
    drop(w);
    for i in 0..6 {
        cluster.kill(i).await;
    }
}
