//! Unit tests of the segment log and the node state machine on the simulated disk,
//! plus the server's handling of malformed frames over a real socket.

use crate::disk::{Disk, MemDisk};
use crate::node::{Handled, Node, NodeLimits};
use crate::proto::{Append, ErrorCode, PgBatch, Request, Response, Truncation};
use crate::segment::{record_entry, resident_only, Segment};
use borealis_common::{Epoch, Lsn, PgId};
use borealis_redo::{apply, Op, Page, Record, CPL_FLAG};

const PG: PgId = PgId(0);

/// Records 1..=n of one PG over pages 0..3, each MTR one record (all CPLs).
fn records(n: u64) -> Vec<Record> {
    (1..=n)
        .map(|i| {
            let page = i % 3;
            let op = if i <= 3 {
                Op::Init { kind: 1 }
            } else {
                Op::WriteBody {
                    offset: (i % 100) as u16 * 8,
                    data: i.to_le_bytes().to_vec(),
                }
            };
            Record {
                lsn: Lsn(i),
                prev_lsn: Lsn(i - 1),
                page,
                flags: CPL_FLAG,
                op,
            }
        })
        .collect()
}

fn model_page(recs: &[Record], page: u64, at: Lsn) -> Page {
    let mut p = Page::zeroed();
    for r in recs.iter().filter(|r| r.page == page && r.lsn <= at) {
        apply(&mut p, page, r).unwrap();
    }
    p
}

fn append(epoch: u64, recs: &[Record], complete_to: Lsn) -> Request {
    Request::Append(Append {
        epoch: Epoch(epoch),
        vdl_hint: Lsn::ZERO,
        pgmrpl: Lsn::ZERO,
        pgs: vec![PgBatch {
            pg: PG,
            membership_epoch: 0,
            complete_to,
            pg_last: recs.last().map(|r| r.lsn).unwrap_or(Lsn::ZERO),
            records: recs.iter().map(|r| r.encode().into()).collect(),
        }],
    })
}

/// An append carrying the writer's VDL hint and PGMRPL, which let a segment fold.
fn append_hinted(epoch: u64, recs: &[Record], complete_to: Lsn, vdl: Lsn, pgmrpl: Lsn) -> Request {
    let mut req = append(epoch, recs, complete_to);
    if let Request::Append(a) = &mut req {
        a.vdl_hint = vdl;
        a.pgmrpl = pgmrpl;
    }
    req
}

fn open(disk: &MemDisk) -> Node<MemDisk> {
    Node::open("t", disk.clone(), NodeLimits::default()).unwrap()
}

fn install(node: &mut Node<MemDisk>, epoch: u64, history: &[Truncation]) -> Response {
    match node.handle(Request::InstallEpoch {
        epoch: Epoch(epoch),
        history: history.to_vec(),
    }) {
        Handled::Reply(r) => r,
        Handled::AfterSync(r) => r,
    }
}

fn sync<D: Disk>(node: &mut Node<D>) {
    if let Some(job) = node.take_sync() {
        let r = job();
        node.sync_done(&r, std::time::Duration::ZERO);
    }
}

fn acked(h: Handled) -> Vec<Lsn> {
    match h {
        Handled::AfterSync(Response::Appended { pgs, .. }) => {
            pgs.into_iter().flat_map(|p| p.lsns).collect()
        }
        other => panic!("expected an ack after sync, got {other:?}"),
    }
}

fn page<D: Disk>(node: &mut Node<D>, page: u64, at: Lsn) -> Result<Page, Response> {
    match node.handle(Request::GetPage {
        pg: PG,
        page,
        read_lsn: at,
    }) {
        Handled::Reply(Response::Page { bytes }) => Ok(Page::from_bytes(&bytes).unwrap()),
        Handled::Reply(r) => Err(r),
        other => panic!("{other:?}"),
    }
}

#[test]
fn appends_are_acked_after_sync_and_pages_materialize_at_any_lsn() {
    let disk = MemDisk::new();
    let mut node = open(&disk);
    assert!(matches!(
        install(&mut node, 1, &[]),
        Response::EpochInstalled { .. }
    ));
    let recs = records(20);
    assert_eq!(
        acked(node.handle(append(1, &recs, Lsn(20)))),
        recs.iter().map(|r| r.lsn).collect::<Vec<_>>()
    );
    sync(&mut node);
    for at in [3, 7, 20] {
        for p in 0..3 {
            assert_eq!(
                page(&mut node, p, Lsn(at)).unwrap(),
                model_page(&recs, p, Lsn(at))
            );
        }
    }
    // Beyond SCL: refused, not guessed.
    let r = page(&mut node, 0, Lsn(21)).unwrap_err();
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::NotComplete,
                ..
            }
        ),
        "{r:?}"
    );
}

#[test]
fn torn_tail_is_cut_on_restart_and_synced_records_survive() {
    let disk = MemDisk::new();
    let mut node = open(&disk);
    install(&mut node, 1, &[]);
    let recs = records(10);
    node.handle(append(1, &recs[..6], Lsn(6)));
    sync(&mut node);
    node.handle(append(1, &recs[6..], Lsn(10)));
    // Crash before the sync: keep half the unsynced bytes and garble the last one.
    disk.crash(|_, n| (n / 2, true));
    let mut node = open(&disk);
    assert_eq!(node.stats.torn_tails_cut, 1);
    let seg = node.segment(PG).unwrap();
    assert!(
        seg.scl_record() >= Lsn(6) && seg.scl_record() < Lsn(10),
        "scl {}",
        seg.scl_record()
    );
    assert_eq!(
        page(&mut node, 0, Lsn(6)).unwrap(),
        model_page(&recs, 0, Lsn(6))
    );
    // The writer resends; the segment is whole again and the cut file appends cleanly.
    node.handle(append(1, &recs, Lsn(10)));
    sync(&mut node);
    let node2 = open(&disk);
    assert_eq!(node2.segment(PG).unwrap().scl(), Lsn(10));
    assert_eq!(node2.stats.torn_tails_cut, 0);
}

#[test]
fn crc_corruption_in_the_log_stops_replay_there() {
    let disk = MemDisk::new();
    let mut node = open(&disk);
    install(&mut node, 1, &[]);
    let recs = records(10);
    node.handle(append(1, &recs, Lsn(10)));
    sync(&mut node);
    // Flip a byte inside the 5th entry.
    let one = record_entry(Epoch(1), &recs[0].encode()).len();
    disk.corrupt(PG, one * 4 + 20);
    let node = open(&disk);
    let seg = node.segment(PG).unwrap();
    assert!(seg.scl_record() < Lsn(10));
    assert_eq!(node.stats.torn_tails_cut, 1);
    // And a corrupt record is refused at the door.
    let mut bad = recs[0].encode();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let mut s = Segment::new(PG);
    assert!(s.insert(Epoch(1), bad, None).is_err());
}

#[test]
fn holes_are_detected_by_backlinks_and_filled_from_a_peer() {
    let recs = records(10);
    let mut a = Segment::new(PG);
    let mut b = Segment::new(PG);
    for r in &recs {
        a.insert(Epoch(1), r.encode(), None).unwrap();
        if r.lsn != Lsn(4) && r.lsn != Lsn(7) {
            b.insert(Epoch(1), r.encode(), None).unwrap();
        }
    }
    assert_eq!(a.scl_record(), Lsn(10));
    assert_eq!(b.scl_record(), Lsn(3), "hole at 4 stops the chain");
    // Gossip: b asks a for everything after its chain end.
    let (chunk, more) = a.read_log(b.scl_record(), 1 << 20);
    assert!(!more);
    for r in chunk {
        b.insert(r.epoch, r.bytes, None).unwrap();
    }
    assert_eq!(b.scl_record(), Lsn(10));
    assert_eq!(
        b.get_page(1, Lsn(10), &mut resident_only).unwrap(),
        model_page(&recs, 1, Lsn(10))
    );
}

#[test]
fn gc_folds_records_into_pages_and_refuses_reads_below_the_floor() {
    let disk = MemDisk::new();
    let mut node = open(&disk);
    install(&mut node, 1, &[]);
    let recs = records(30);
    node.handle(append_hinted(1, &recs, Lsn(30), Lsn(30), Lsn(20)));
    sync(&mut node);
    node.tick();
    let seg = node.segment(PG).unwrap();
    assert_eq!(seg.gc_floor(), Lsn(20));
    assert_eq!(seg.record_count(), 10);
    for p in 0..3 {
        assert_eq!(
            page(&mut node, p, Lsn(25)).unwrap(),
            model_page(&recs, p, Lsn(25))
        );
        assert_eq!(
            page(&mut node, p, Lsn(20)).unwrap(),
            model_page(&recs, p, Lsn(20))
        );
    }
    let r = page(&mut node, 0, Lsn(19)).unwrap_err();
    assert!(matches!(
        r,
        Response::Error {
            code: ErrorCode::BelowGcFloor,
            ..
        }
    ));
    // Compaction keeps exactly the same state across a restart.
    let mut seg_log = node
        .segment(PG)
        .unwrap()
        .compacted_log(&mut resident_only)
        .unwrap()
        .bytes;
    let replayed = Segment::replay(PG, &seg_log, &[]);
    assert!(replayed.torn.is_none());
    assert_eq!(
        replayed
            .segment
            .get_page(2, Lsn(30), &mut resident_only)
            .unwrap(),
        model_page(&recs, 2, Lsn(30))
    );
    seg_log.truncate(seg_log.len() - 3);
    assert!(Segment::replay(PG, &seg_log, &[]).torn.is_some());
}

#[test]
fn a_segment_the_writer_stopped_writing_still_folds_its_records() {
    // The records arrive while the writer's VDL is still below them; later
    // batches carry no records for this PG, only a newer VDL (and PGMRPL). They
    // must still let the records fold: before, the hint moved only with records,
    // and such a segment held its last records unfolded for good.
    let disk = MemDisk::new();
    let mut node = open(&disk);
    install(&mut node, 1, &[]);
    let recs = records(30);
    node.handle(append_hinted(1, &recs, Lsn(30), Lsn(5), Lsn(5)));
    sync(&mut node);
    node.tick();
    assert_eq!(node.segment(PG).unwrap().gc_floor(), Lsn(5));
    let mut quiet = append_hinted(1, &[], Lsn(30), Lsn(30), Lsn(30));
    if let Request::Append(a) = &mut quiet {
        a.pgs[0].pg_last = Lsn(30);
    }
    node.handle(quiet);
    node.tick();
    let seg = node.segment(PG).unwrap();
    assert_eq!(seg.gc_floor(), Lsn(30));
    assert_eq!(seg.record_count(), 0);
    assert_eq!(
        page(&mut node, 1, Lsn(30)).unwrap(),
        model_page(&recs, 1, Lsn(30))
    );
    // The hint was not logged without records: after a restart the segment has
    // the older logged one (a lower bound), and every record is still there.
    let node = open(&disk);
    let seg = node.segment(PG).unwrap();
    assert_eq!(seg.vdl_hint(), Lsn(5));
    assert_eq!(seg.scl(), Lsn(30));
}

#[test]
fn epoch_fencing_rejects_old_writers_and_truncates_above_the_recovery_point() {
    let disk = MemDisk::new();
    let mut node = open(&disk);
    install(&mut node, 1, &[]);
    let recs = records(10);
    node.handle(append(1, &recs, Lsn(10)));
    sync(&mut node);
    // Materialize (and cache) every page at 10 before the truncation.
    for p in 0..3 {
        assert_eq!(
            page(&mut node, p, Lsn(10)).unwrap(),
            model_page(&recs, p, Lsn(10))
        );
    }
    // Recovery at epoch 2 kept only up to 6.
    let h2 = [Truncation {
        epoch: Epoch(2),
        vdl: Lsn(6),
    }];
    assert!(matches!(
        install(&mut node, 2, &h2),
        Response::EpochInstalled { .. }
    ));
    assert_eq!(node.segment(PG).unwrap().scl(), Lsn(6));
    // The old writer is fenced, for appends and for epoch installs.
    match node.handle(append(1, &recs[6..], Lsn(10))) {
        Handled::Reply(Response::Error {
            code: ErrorCode::Fenced,
            detail: 2,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        install(&mut node, 1, &[]),
        Response::Error {
            code: ErrorCode::Fenced,
            ..
        }
    ));
    // A writer ahead of the node must install its epoch first.
    assert!(matches!(
        node.handle(append(3, &recs[6..], Lsn(10))),
        Handled::Reply(Response::Error {
            code: ErrorCode::NeedEpoch,
            ..
        })
    ));
    // The new writer reuses LSN 7.. with different content.
    let new7 = Record {
        lsn: Lsn(7),
        prev_lsn: Lsn(6),
        page: 1,
        flags: CPL_FLAG,
        op: Op::WriteBody {
            offset: 0,
            data: vec![7; 8],
        },
    };
    acked(node.handle(append(2, std::slice::from_ref(&new7), Lsn(7))));
    sync(&mut node);
    // No image cached before the truncation may leak into a read after it.
    let mut after: Vec<Record> = recs[..6].to_vec();
    after.push(new7.clone());
    for p in 0..3 {
        assert_eq!(
            page(&mut node, p, Lsn(7)).unwrap(),
            model_page(&after, p, Lsn(7))
        );
    }
    // Restart: epoch and truncation are durable, old 8..10 stay gone, new 7 stays.
    let mut node = open(&disk);
    assert_eq!(node.epoch(), Epoch(2));
    let mut model: Vec<Record> = recs[..6].to_vec();
    model.push(new7);
    assert_eq!(node.segment(PG).unwrap().scl_record(), Lsn(7));
    assert_eq!(
        page(&mut node, 1, Lsn(7)).unwrap(),
        model_page(&model, 1, Lsn(7))
    );
}

#[test]
fn a_node_that_slept_through_a_recovery_drops_what_it_truncated() {
    // Epoch 1 wrote 1..=8 here; epoch 2 (this node down) kept 1..=5 and wrote a
    // different 6..=7; epoch 3 kept 1..=7. This node must not keep epoch 1's 6..=8.
    let disk = MemDisk::new();
    let mut node = open(&disk);
    install(&mut node, 1, &[]);
    node.handle(append(1, &records(8), Lsn(8)));
    sync(&mut node);
    let h = [
        Truncation {
            epoch: Epoch(2),
            vdl: Lsn(5),
        },
        Truncation {
            epoch: Epoch(3),
            vdl: Lsn(7),
        },
    ];
    install(&mut node, 3, &h);
    let seg = node.segment(PG).unwrap();
    assert_eq!(seg.scl_record(), Lsn(5));
    assert_eq!(seg.max_lsn(), Lsn(5));
}

#[test]
fn disk_failure_stops_acks_and_reports_unhealthy() {
    let disk = MemDisk::new();
    let mut node = open(&disk);
    install(&mut node, 1, &[]);
    disk.set_failing(true);
    match node.handle(append(1, &records(2), Lsn(2))) {
        Handled::Reply(Response::Error {
            code: ErrorCode::Unhealthy,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(!node.is_healthy());
    assert_eq!(node.health()["state"], "failed");
    assert!(node
        .metrics()
        .contains("borealis_storage_healthy{node=\"t\"} 0"));
}

#[test]
fn replay_of_arbitrary_bytes_never_panics() {
    let mut x: u64 = 0x1234_5678_9abc_def0;
    let good = record_entry(Epoch(1), &records(1)[0].encode());
    for _ in 0..500 {
        let mut buf = good.clone();
        for _ in 0..(x % 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % buf.len();
            buf[i] = x as u8;
        }
        buf.truncate((x as usize) % (buf.len() + 1));
        let _ = Segment::replay(PG, &buf, &[]);
    }
    let mut d = MemDisk::new();
    d.append_log(PG, vec![0xff; 100]).unwrap();
    let node = open(&d);
    assert_eq!(node.stats.torn_tails_cut, 1);
}

#[tokio::test]
async fn malformed_frames_close_the_connection_and_the_node_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::NodeConfig::new(
        dir.path().to_path_buf(),
        "n",
        "az-a",
        "127.0.0.1:0".parse().unwrap(),
    );
    let h = crate::start(cfg).await.unwrap();
    for junk in [
        vec![0xff, 0xff, 0xff, 0x7f, 1, 2],
        vec![12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 99, 0, 0, 0],
    ] {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        s.write_all(&junk).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "connection must be closed");
    }
    let mut c = crate::client::Client::connect(h.addr, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(
        c.call(&Request::Hello).await.unwrap(),
        Response::Hello { .. }
    ));
    h.kill().await;
}

/// Real files: a restart keeps every synced record and appends after it; a zero
/// tail (segment files used to be zero-filled ahead) reads as the clean end of the
/// log, not a torn write.
#[test]
fn file_logs_restart_cleanly() {
    use crate::disk::FileDisk;
    let dir = tempfile::tempdir().unwrap();
    let recs = records(12);
    let handle = |node: &mut Node<FileDisk>, req: Request| match node.handle(req) {
        Handled::Reply(r) | Handled::AfterSync(r) => r,
        #[allow(unreachable_patterns)]
        _ => panic!("unexpected"),
    };
    let sync_file = |node: &mut Node<FileDisk>| {
        if let Some(job) = node.take_sync() {
            let r = job();
            node.sync_done(&r, std::time::Duration::ZERO);
        }
    };
    {
        let mut node = Node::open(
            "f",
            FileDisk::open(dir.path()).unwrap(),
            NodeLimits::default(),
        )
        .unwrap();
        handle(
            &mut node,
            Request::InstallEpoch {
                epoch: Epoch(1),
                history: vec![],
            },
        );
        handle(&mut node, append(1, &recs[..8], Lsn(8)));
        sync_file(&mut node);
    }
    let file = dir.path().join(format!("segment-{:08}.log", PG.0));
    let size = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(size + (8 << 20)).unwrap();
    drop(f);
    let mut node = Node::open(
        "f",
        FileDisk::open(dir.path()).unwrap(),
        NodeLimits::default(),
    )
    .unwrap();
    assert_eq!(
        node.stats.torn_tails_cut, 0,
        "a zero tail is not a torn write"
    );
    assert_eq!(node.segment(PG).unwrap().scl(), Lsn(8));
    handle(&mut node, append(1, &recs, Lsn(12)));
    sync_file(&mut node);
    drop(node);
    let node = Node::open(
        "f",
        FileDisk::open(dir.path()).unwrap(),
        NodeLimits::default(),
    )
    .unwrap();
    assert_eq!(node.stats.torn_tails_cut, 0);
    assert_eq!(node.segment(PG).unwrap().scl(), Lsn(12));
}

/// The node journal: acknowledged bytes come back from the journal when the segment
/// file lost them (its plain writes were never synced), a wrapped journal checkpoints,
/// and a replaced log never gets old journal entries replayed into it.
#[test]
fn file_disk_journal_restores_lost_segment_writes() {
    // A log reads back as its bytes (plus zeros, when a test extended the file).
    fn log_is(log: &[u8], want: &[u8]) -> bool {
        log.starts_with(want) && log[want.len()..].iter().all(|b| *b == 0)
    }
    use crate::disk::FileDisk;
    let dir = tempfile::tempdir().unwrap();
    let seg = |pg: u32| dir.path().join(format!("segment-{pg:08}.log"));
    {
        let mut d = FileDisk::open(dir.path()).unwrap();
        d.append_log(PgId(1), b"hello ".to_vec()).unwrap();
        d.append_log(PgId(2), b"other".to_vec()).unwrap();
        d.append_log(PgId(1), b"world".to_vec()).unwrap();
        assert!(
            log_is(&d.read_log(PgId(1)).unwrap(), b"hello world"),
            "pending appends are readable"
        );
        let job = d.sync_job(&[PgId(1), PgId(2)]).unwrap();
        job().unwrap();
    }
    // A crash that lost the segment files' unsynced writes.
    std::fs::write(seg(1), b"").unwrap();
    std::fs::write(seg(2), b"oth").unwrap();
    {
        let mut d = FileDisk::open(dir.path()).unwrap();
        assert!(log_is(&d.read_log(PgId(1)).unwrap(), b"hello world"));
        assert!(log_is(&d.read_log(PgId(2)).unwrap(), b"other"));
        // Compaction replaces the file: nothing old may be replayed into it.
        d.replace_log(PgId(1), b"compact").unwrap();
        d.append_log(PgId(1), b"+more".to_vec()).unwrap();
        d.sync_job(&[PgId(1)]).unwrap()().unwrap();
    }
    {
        let mut d = FileDisk::open(dir.path()).unwrap();
        assert!(log_is(&d.read_log(PgId(1)).unwrap(), b"compact+more"));
        // Write far more than the journal holds: checkpoints keep everything.
        let chunk = vec![7u8; 300_000];
        for _ in 0..80 {
            d.append_log(PgId(3), chunk.clone()).unwrap();
            d.sync_job(&[PgId(3)]).unwrap()().unwrap();
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(seg(3))
        .unwrap()
        .set_len(1000)
        .unwrap();
    let mut d = FileDisk::open(dir.path()).unwrap();
    let log = d.read_log(PgId(3)).unwrap();
    let log = &log[..log.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)];
    // Everything since the last checkpoint came back; before it, the checkpoint's
    // fdatasync made it durable (this test cut the file below that, which a real
    // crash cannot do), so only the tail is checked.
    assert_eq!(log.len(), 80 * 300_000, "the journal's tail came back");
    assert!(log[log.len() - 300_000..].iter().all(|b| *b == 7));
    // A garbage journal is refused rather than replayed.
    drop(d);
    std::fs::write(dir.path().join("journal.log"), b"not a journal at all").unwrap();
    assert!(FileDisk::open(dir.path()).is_err());
}

fn with_membership(mut req: Request, membership_epoch: u64) -> Request {
    if let Request::Append(a) = &mut req {
        for b in &mut a.pgs {
            b.membership_epoch = membership_epoch;
        }
    }
    req
}

#[test]
fn stale_membership_epochs_are_refused_even_after_a_restart() {
    let disk = MemDisk::new();
    let mut node = open(&disk);
    install(&mut node, 1, &[]);
    let recs = records(6);
    acked(node.handle(with_membership(append(1, &recs[..3], Lsn(3)), 2)));
    sync(&mut node);
    // The same writer epoch, an older segment set: refused whole, nothing written.
    let r = node.handle(with_membership(append(1, &recs[3..], Lsn(6)), 1));
    assert!(
        matches!(
            r,
            Handled::Reply(Response::Error {
                code: ErrorCode::StaleMembership,
                detail: 2,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(node.segment(PG).unwrap().max_lsn(), Lsn(3));
    // Durable: a restarted node still refuses it.
    drop(node);
    let mut node = open(&disk);
    assert_eq!(node.segment(PG).unwrap().membership_epoch(), 2);
    let r = node.handle(with_membership(append(1, &recs[3..], Lsn(6)), 1));
    assert!(matches!(
        r,
        Handled::Reply(Response::Error {
            code: ErrorCode::StaleMembership,
            ..
        })
    ));
    // The current (or a newer) membership is accepted.
    acked(node.handle(with_membership(append(1, &recs[3..], Lsn(6)), 3)));
    assert_eq!(node.segment(PG).unwrap().membership_epoch(), 3);
}

/// A peer that folded its records into page images rebuilds a fresh segment only
/// through a snapshot; records the new segment got meanwhile are kept.
#[test]
fn a_fresh_segment_is_rebuilt_from_a_gc_ed_peer_by_snapshot() {
    let peer_disk = MemDisk::new();
    let mut peer = open(&peer_disk);
    install(&mut peer, 1, &[]);
    let recs = records(40);
    peer.handle(append_hinted(1, &recs[..30], Lsn(30), Lsn(30), Lsn(25)));
    sync(&mut peer);
    peer.tick();
    let floor = peer.segment(PG).unwrap().gc_floor();
    assert_eq!(floor, Lsn(25));

    // The replacement got the newest records from the writer already.
    let disk = MemDisk::new();
    let mut fresh = open(&disk);
    install(&mut fresh, 1, &[]);
    acked(fresh.handle(append(1, &recs[30..], Lsn(40))));
    sync(&mut fresh);
    assert!(fresh.needs_snapshot(PG, floor));
    let mut bytes = Vec::new();
    let mut offset = 0u64;
    loop {
        match peer.handle(Request::Snapshot {
            pg: PG,
            offset,
            max_bytes: 4096,
        }) {
            Handled::Reply(Response::SnapshotChunk {
                total, bytes: b, ..
            }) => {
                bytes.extend_from_slice(&b);
                offset = bytes.len() as u64;
                if offset >= total {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    fresh.install_snapshot(PG, &bytes).unwrap();
    // Records 31..40 were already here; 26..30 come from the snapshot's records.
    fresh.handle(append(1, &[], Lsn(40)));
    for p in 0..3 {
        for at in [25, 30, 40] {
            assert_eq!(
                page(&mut fresh, p, Lsn(at)).unwrap(),
                model_page(&recs, p, Lsn(at)),
                "page {p} at {at}"
            );
        }
    }
    assert!(!fresh.needs_snapshot(PG, floor));
    // And all of it is durable in the replaced log.
    drop(fresh);
    let mut fresh = open(&disk);
    assert_eq!(
        page(&mut fresh, 1, Lsn(40)).unwrap(),
        model_page(&recs, 1, Lsn(40))
    );
}

/// Bit rot in a segment file: the scrubber finds it, reports it in health and
/// metrics, repairs it (here with a peer's copy of the range) and the log replays
/// whole afterwards. Without the repair, a restart would cut the log at the flipped
/// byte and lose every record after it.
#[test]
fn scrub_finds_a_flipped_byte_in_a_segment_file_and_repairs_it() {
    use crate::disk::FileDisk;
    let dir = tempfile::tempdir().unwrap();
    let recs = records(50);
    let limits = NodeLimits::default();
    let open_file =
        || Node::open("f", FileDisk::open(dir.path()).unwrap(), limits.clone()).unwrap();
    let mut node = open_file();
    let handle = |node: &mut Node<FileDisk>, req: Request| match node.handle(req) {
        Handled::Reply(r) | Handled::AfterSync(r) => r,
    };
    handle(
        &mut node,
        Request::InstallEpoch {
            epoch: Epoch(1),
            history: vec![],
        },
    );
    handle(&mut node, append(1, &recs, Lsn(50)));
    if let Some(job) = node.take_sync() {
        node.sync_done(&job(), std::time::Duration::ZERO);
    }
    // The records are durable in the node journal; reopening writes them into the
    // segment file (journal replay), which is what scrubbing reads.
    drop(node);
    let mut node = open_file();
    // A clean pass finds nothing.
    for _ in 0..4 {
        node.scrub_step();
    }
    assert_eq!(node.stats.scrub_corruptions_total, 0);
    assert!(node.stats.scrub_bytes_total > 0);
    // Flip one byte in the middle of the file.
    let file = dir.path().join(format!("segment-{:08}.log", PG.0));
    let written = node.segment(PG).unwrap().log_bytes as usize;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, (written / 2) as u64).unwrap();
        b[0] ^= 0x10;
        f.write_all_at(&b, (written / 2) as u64).unwrap();
    }
    for _ in 0..4 {
        node.scrub_step();
    }
    assert_eq!(node.stats.scrub_corruptions_total, 1);
    let repairs = node.pending_repairs();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    let (pg, good) = repairs[0];
    assert!(
        good > Lsn::ZERO && good < Lsn(50),
        "last good record {good}"
    );
    let health = node.health();
    assert!(
        health["scrub"]["last_corruption"]
            .as_str()
            .is_some_and(|s| s.contains("CRC")),
        "{health}"
    );
    assert!(node
        .metrics()
        .contains("borealis_storage_scrub_corruptions_total{node=\"f\"} 1"));
    // A peer's copy of the damaged range.
    let peer_disk = MemDisk::new();
    let mut peer = open(&peer_disk);
    install(&mut peer, 1, &[]);
    peer.handle(append(1, &recs, Lsn(50)));
    sync(&mut peer);
    let chunk = match peer.handle(Request::ReadLog {
        pg,
        after: good,
        max_bytes: 1 << 20,
    }) {
        Handled::Reply(r) => r,
        other => panic!("{other:?}"),
    };
    node.repair(pg, &[chunk]).unwrap();
    assert!(node.pending_repairs().is_empty());
    assert_eq!(node.stats.scrub_repairs_total, 1);
    for _ in 0..4 {
        node.scrub_step();
    }
    assert_eq!(
        node.stats.scrub_corruptions_total, 1,
        "the rewrite is clean"
    );
    drop(node);
    let mut node = open_file();
    assert_eq!(node.stats.torn_tails_cut, 0);
    assert_eq!(node.segment(PG).unwrap().scl(), Lsn(50));
    for p in 0..3 {
        let got = match node.handle(Request::GetPage {
            pg: PG,
            page: p,
            read_lsn: Lsn(50),
        }) {
            Handled::Reply(Response::Page { bytes }) => Page::from_bytes(&bytes).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(got, model_page(&recs, p, Lsn(50)));
    }
}

/// The running node: a flipped byte in a segment file is found by the background
/// scrub, shown in `/health`, and repaired from a peer by the gossip task; the node
/// restarts with its whole log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_scrubs_and_repairs_a_flipped_byte_from_a_peer() {
    use std::time::Duration;
    let recs = records(200);
    let start = |dir: &std::path::Path, name: &str, peers: Vec<std::net::SocketAddr>| {
        let mut cfg = crate::NodeConfig::new(
            dir.to_path_buf(),
            name,
            "az-a",
            "127.0.0.1:0".parse().unwrap(),
        );
        cfg.http = Some("127.0.0.1:0".parse().unwrap());
        cfg.peers = peers;
        cfg.scrub_interval = Duration::from_millis(10);
        cfg.gossip_interval = Duration::from_millis(20);
        crate::start(cfg)
    };
    let peer_dir = tempfile::tempdir().unwrap();
    let peer = start(peer_dir.path(), "peer", vec![]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), "n", vec![peer.addr]).await.unwrap();
    for addr in [peer.addr, node.addr] {
        let mut c = crate::client::Client::connect(addr, Duration::from_secs(5))
            .await
            .unwrap();
        c.call(&Request::InstallEpoch {
            epoch: Epoch(1),
            history: vec![],
        })
        .await
        .unwrap();
        let r = c.call(&append(1, &recs, Lsn(200))).await.unwrap();
        assert!(matches!(r, Response::Appended { .. }), "{r:?}");
    }
    // The records are durable in the node journal; a restart writes them into the
    // segment file (journal replay), which is what scrubbing reads.
    node.kill().await;
    let node = start(dir.path(), "n", vec![peer.addr]).await.unwrap();
    let file = dir.path().join(format!("segment-{:08}.log", PG.0));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        let at = 3000u64; // inside the records, well before the end of the log
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x01;
        f.write_all_at(&b, at).unwrap();
    }
    let http = node.http_addr.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let health = loop {
        let (_, h) = borealis_common::http::get_json(http, "/health", Duration::from_secs(5))
            .await
            .unwrap();
        if h["scrub"]["repairs_total"].as_u64() >= Some(1) {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never repaired: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health["scrub"]["corruptions_total"], 1, "{health}");
    assert!(health["scrub"]["last_corruption"]
        .as_str()
        .is_some_and(|s| s.contains("offset")));
    node.kill().await;
    // The whole log replays: nothing cut at the flipped byte.
    let mut reopened = Node::open(
        "n",
        crate::disk::FileDisk::open(dir.path()).unwrap(),
        NodeLimits::default(),
    )
    .unwrap();
    assert_eq!(reopened.stats.torn_tails_cut, 0);
    assert_eq!(reopened.segment(PG).unwrap().max_lsn(), Lsn(200));
    match reopened.handle(Request::GetPage {
        pg: PG,
        page: 2,
        read_lsn: Lsn(200),
    }) {
        Handled::Reply(Response::Page { bytes }) => {
            assert_eq!(
                Page::from_bytes(&bytes).unwrap(),
                model_page(&recs, 2, Lsn(200))
            )
        }
        other => panic!("{other:?}"),
    }
    peer.kill().await;
}

/// Records 1..=n over `pages` pages, each MTR one record (all CPLs).
fn spread_records(n: u64, pages: u64) -> Vec<Record> {
    (1..=n)
        .map(|i| Record {
            lsn: Lsn(i),
            prev_lsn: Lsn(i - 1),
            page: i % pages,
            flags: CPL_FLAG,
            op: if i <= pages {
                Op::Init { kind: 1 }
            } else {
                Op::WriteBody {
                    offset: (i % 100) as u16 * 8,
                    data: i.to_le_bytes().to_vec(),
                }
            },
        })
        .collect()
}

/// Appends `recs` in batches of `batch`, each synced, folded (PGMRPL and VDL hint
/// at its end) and followed by a tick; checks the node stays within `bound` images.
fn fill_bounded<D: Disk>(node: &mut Node<D>, recs: &[Record], batch: usize, bound: usize) {
    node.handle(Request::InstallEpoch {
        epoch: Epoch(1),
        history: vec![],
    });
    for chunk in recs.chunks(batch) {
        let to = chunk.last().unwrap().lsn;
        node.handle(append_hinted(1, chunk, to, to, to));
        sync(node);
        node.tick();
        let m = node.segment(PG).unwrap().memory();
        assert!(m.resident_images <= bound, "{m:?}");
    }
}

/// Pages of the bounded-store tests, and the images their nodes keep in memory.
const PAGES: u64 = 40;
const IMAGES: usize = 8;

fn bounded_limits() -> NodeLimits {
    NodeLimits {
        max_resident_images: IMAGES,
        ..NodeLimits::default()
    }
}

/// A node on real files in `dir` with room for [`IMAGES`] images, filled with
/// `recs` in batches of [`PAGES`] records.
fn filled_bounded_node(dir: &std::path::Path, recs: &[Record]) -> Node<crate::disk::FileDisk> {
    let disk = crate::disk::FileDisk::open(dir).unwrap();
    let mut node = Node::open("t", disk, bounded_limits()).unwrap();
    fill_bounded(&mut node, recs, PAGES as usize, IMAGES);
    node
}

/// The page store is bounded: with room for 8 images in memory, a node holding 40
/// pages keeps the rest in its log file (real files here) and reads them back to
/// fold records into, to serve GetPage, to build a snapshot and after a restart.
#[test]
fn page_images_beyond_the_memory_bound_live_in_the_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let (limits, recs, last) = (bounded_limits(), spread_records(400, PAGES), Lsn(400));
    let check = |node: &mut Node<crate::disk::FileDisk>, at: Lsn| {
        for p in 0..PAGES {
            assert_eq!(
                page(node, p, at).unwrap(),
                model_page(&recs, p, at),
                "page {p}"
            );
        }
    };
    {
        let mut node = filled_bounded_node(dir.path(), &recs);
        let m = node.segment(PG).unwrap().memory();
        assert_eq!(
            m.resident_images + m.evicted_images,
            PAGES as usize,
            "{m:?}"
        );
        assert!(m.evicted_images >= 32, "{m:?}");
        // Folding the later records into evicted pages read them back, and the
        // dirty images were written out by checkpoints appended to the log (which
        // the restart below replays), not by rewriting it.
        assert!(node.stats.image_reads > 0);
        assert!(node.stats.image_checkpoints > 0);
        check(&mut node, last);
        // A rebuilding peer's snapshot holds every image, evicted or not.
        let bytes = match node.handle(Request::Snapshot {
            pg: PG,
            offset: 0,
            max_bytes: 1 << 20,
        }) {
            Handled::Reply(Response::SnapshotChunk { bytes, total, .. }) => {
                assert_eq!(bytes.len() as u64, total);
                bytes
            }
            other => panic!("{other:?}"),
        };
        let snap = Segment::replay(PG, &bytes, &[]).segment;
        for p in 0..PAGES {
            assert_eq!(
                snap.get_page(p, last, &mut resident_only).unwrap(),
                model_page(&recs, p, last)
            );
        }
    }
    // A restart replays the log and keeps the bound from the start.
    let disk = crate::disk::FileDisk::open(dir.path()).unwrap();
    let mut node = Node::open("t", disk, limits).unwrap();
    let m = node.segment(PG).unwrap().memory();
    assert!(m.resident_images <= 8, "{m:?}");
    check(&mut node, last);
}

/// Bit rot in the log entries of evicted page images: the node cannot rewrite the
/// damaged log from its own state (those images exist nowhere else on it), so it
/// asks for a peer's snapshot, and installing one brings back every page.
#[test]
fn a_damaged_evicted_image_is_rebuilt_from_a_peer_snapshot() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (recs, last) = (spread_records(400, PAGES), Lsn(400));
    let mut node = filled_bounded_node(dir.path(), &recs);
    // Flip a byte in the middle of every page image entry in the file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join(format!("segment-{:08}.log", PG.0)))
        .unwrap();
    let seg = node.segment(PG).unwrap();
    for p in 0..PAGES {
        let at = seg.image_offset(p).expect("every image is in the file") + 4000;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x10;
        file.write_all_at(&b, at).unwrap();
    }
    let mut steps = 0;
    while node.pending_repairs().is_empty() {
        node.scrub_step();
        steps += 1;
        assert!(steps < 100, "scrubbing never found the damage");
    }
    // Nothing to fetch from a peer's records would help: the repair gives up on
    // rewriting the log and wants a snapshot, from any peer.
    assert!(!node.needs_snapshot(PG, Lsn::ZERO));
    assert!(node.repair(PG, &[]).is_err());
    assert!(node.pending_repairs().is_empty());
    assert!(node.needs_snapshot(PG, Lsn::ZERO));
    assert_eq!(node.health()["scrub"]["snapshots_wanted"], 1);
    // A healthy peer's snapshot.
    let peer_disk = MemDisk::new();
    let mut peer = open(&peer_disk);
    fill_bounded(&mut peer, &recs, PAGES as usize, usize::MAX);
    let bytes = match peer.handle(Request::Snapshot {
        pg: PG,
        offset: 0,
        max_bytes: 1 << 20,
    }) {
        Handled::Reply(Response::SnapshotChunk { bytes, .. }) => bytes,
        other => panic!("{other:?}"),
    };
    node.install_snapshot(PG, &bytes).unwrap();
    assert!(!node.needs_snapshot(PG, Lsn::ZERO));
    for p in 0..PAGES {
        assert_eq!(
            page(&mut node, p, last).unwrap(),
            model_page(&recs, p, last),
            "page {p}"
        );
    }
}

/// A segment holding one record (LSN 1) for `page`, folded as far as it goes.
fn folded_one(page: u64, op: Op) -> Segment {
    let mut seg = Segment::new(PG);
    let r = Record {
        lsn: Lsn(1),
        prev_lsn: Lsn(0),
        page,
        flags: CPL_FLAG,
        op,
    };
    seg.insert(Epoch(1), r.encode(), None).unwrap();
    seg.note_vdl_hint(Lsn(1));
    seg.coalesce(Lsn(1), 100, &mut resident_only);
    seg
}

/// A record that cannot be applied to a page the segment has no image of leaves
/// no image behind (the page store's counts stay exact) and stops folding there.
#[test]
fn an_unappliable_record_leaves_no_image_behind() {
    let seg = folded_one(7, Op::DeleteItem { slot: 5 });
    assert_eq!(seg.corrupt_records, 1);
    let m = seg.memory();
    assert_eq!(
        (m.resident_images, m.dirty_images, m.evicted_images),
        (0, 0, 0),
        "{m:?}"
    );
    assert_eq!(
        seg.record_count(),
        1,
        "the record stays, and GetPage reports it"
    );
}

/// Reading an evicted image back never panics on what the file holds there: a
/// zero length, a short read, another page's image.
#[test]
fn an_image_read_back_refuses_bad_bytes_without_panicking() {
    use crate::segment::decode_image_entry;
    assert!(decode_image_entry(&[0u8; 64], 3).is_err());
    assert!(decode_image_entry(&[1, 0, 0, 0], 3).is_err());
    let seg = folded_one(3, Op::Init { kind: 1 });
    let log = seg.compacted_log(&mut resident_only).unwrap();
    let at = log.images[0].1 as usize;
    assert!(decode_image_entry(&log.bytes[at..], 3).is_ok());
    assert!(decode_image_entry(&log.bytes[at..], 4).is_err());
    assert!(decode_image_entry(&log.bytes[at..at + 100], 3).is_err());
}
