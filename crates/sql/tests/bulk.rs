//! Bulk loading: COPY FROM STDIN and multi-row INSERT go to the engine in batches
//! (`Engine::insert_rows`). These tests pin the semantics the batching must keep:
//! aborted loads stay invisible, committed ones survive a restart, and every
//! constraint error aborts the whole statement and names the right line.

use borealis_sql::{Database, ExecResult, Session, SqlError};
use borealis_volume::{Volume, VolumeConfig};

mod common;
use common::{db, run};

/// Streams `lines` into `COPY <target> FROM STDIN` in CopyData chunks of a few
/// lines each (chunks cut lines in half, as clients do), then CopyDone.
async fn copy(s: &mut Session, target: &str, lines: &[String]) -> Result<String, SqlError> {
    let r = s.query(&format!("COPY {target} FROM STDIN")).await;
    assert!(
        matches!(r.last(), Some(Ok(ExecResult::CopyIn { .. }))),
        "{r:?}"
    );
    let text: Vec<u8> = lines
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    for chunk in text.chunks(997) {
        s.copy_data(chunk).await?;
    }
    match s.copy_done().await? {
        ExecResult::Command { tag } => Ok(tag),
        other => panic!("{other:?}"),
    }
}

/// Runs a COPY that must fail with `code`, naming `line` of `table` in its context.
async fn copy_fails(s: &mut Session, table: &str, lines: &[String], code: &str, line: usize) {
    let e = copy(s, table, lines).await.unwrap_err();
    assert_eq!(e.code, code, "{e:?}");
    assert_eq!(e.context, Some(format!("COPY {table}, line {line}")));
}

/// A permutation of 0..n (keys arriving out of order).
fn scrambled(n: u64) -> Vec<u64> {
    (0..n).map(|i| (i * 7919) % n).collect()
}

#[tokio::test]
async fn aborted_copy_is_invisible_and_uncommitted_copy_is_not_seen() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    let mut other = db.session("postgres", "postgres");
    run(
        &mut s,
        "CREATE TABLE a (aid int NOT NULL, bid int, filler char(84))",
    )
    .await;
    let lines: Vec<String> = (1..=5000).map(|i| format!("{i}\t{}\t", i % 10)).collect();
    run(&mut s, "BEGIN").await;
    assert_eq!(copy(&mut s, "a", &lines).await.unwrap(), "COPY 5000");
    assert_eq!(run(&mut s, "SELECT count(*) FROM a").await, ["5000"]);
    assert_eq!(run(&mut other, "SELECT count(*) FROM a").await, ["0"]);
    run(&mut s, "ROLLBACK").await;
    assert_eq!(run(&mut s, "SELECT count(*) FROM a").await, ["0"]);
    assert_eq!(run(&mut other, "SELECT count(*) FROM a").await, ["0"]);
    // The table still takes a load afterwards (the aborted rows' row ids stay used).
    assert_eq!(copy(&mut s, "a", &lines[..100]).await.unwrap(), "COPY 100");
    assert_eq!(
        run(&mut other, "SELECT count(*), sum(aid) FROM a").await,
        ["100|5050"]
    );
}

#[tokio::test]
async fn committed_copy_survives_a_restart_and_an_unfinished_one_does_not() {
    let volume = Volume::in_memory(VolumeConfig::default());
    let n = 12_000u64;
    {
        let db = Database::open(volume.clone()).await.unwrap();
        let mut s = db.session("postgres", "postgres");
        run(
            &mut s,
            "CREATE TABLE t (id bigint PRIMARY KEY, u text UNIQUE, k int, v text)",
        )
        .await;
        run(&mut s, "CREATE INDEX t_k ON t (k)").await;
        // Out of key order, so runs land in many leaves of a growing tree.
        let lines: Vec<String> = scrambled(n)
            .into_iter()
            .map(|i| format!("{i}\tu{i}\t{}\tvalue {i}", i % 97))
            .collect();
        assert_eq!(
            copy(&mut s, "t", &lines).await.unwrap(),
            format!("COPY {n}")
        );
        // A second session loads more but never commits: the "crash" comes first.
        let mut late = db.session("postgres", "postgres");
        run(&mut late, "BEGIN").await;
        let more: Vec<String> = (n..n + 3000)
            .map(|i| format!("{i}\tu{i}\t{}\tlate", i % 97))
            .collect();
        assert_eq!(copy(&mut late, "t", &more).await.unwrap(), "COPY 3000");
    }
    let db = Database::open(volume).await.unwrap();
    let mut s = db.session("postgres", "postgres");
    assert_eq!(
        run(&mut s, "SELECT count(*), sum(id), min(id), max(id) FROM t").await,
        [format!("{n}|{}|0|{}", n * (n - 1) / 2, n - 1)]
    );
    assert_eq!(
        run(&mut s, "SELECT v FROM t WHERE id = 4321").await,
        ["value 4321"]
    );
    assert_eq!(
        run(&mut s, "SELECT id FROM t WHERE u = 'u777'").await,
        ["777"]
    );
    assert_eq!(
        run(&mut s, "SELECT count(*) FROM t WHERE k = 5").await,
        [format!("{}", (0..n).filter(|i| i % 97 == 5).count())]
    );
    // Scans come back in key order with nothing missing or doubled.
    let ids = run(&mut s, "SELECT id FROM t").await;
    let expect: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(ids, expect);
    // The unfinished load's keys are free again.
    assert_eq!(
        run(
            &mut s,
            &format!("INSERT INTO t VALUES ({n}, 'u{n}', 1, 'x')")
        )
        .await,
        ["INSERT 0 1"]
    );
}

#[tokio::test]
async fn duplicates_in_a_copy_fail_it_whole_with_23505_and_the_line() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(
        &mut s,
        "CREATE TABLE t (id int PRIMARY KEY, u int UNIQUE, v text)",
    )
    .await;
    run(&mut s, "INSERT INTO t VALUES (-1, -1, 'old')").await;
    // Line 2600 repeats the unique column of line 10 (in a later batch).
    let mut lines: Vec<String> = (1..=3000).map(|i| format!("{i}\t{i}\tv")).collect();
    lines[2599] = "2600\t10\tv".into();
    copy_fails(&mut s, "t", &lines, "23505", 2600).await;
    // Inside one batch: line 7 repeats the primary key of line 3.
    let mut lines: Vec<String> = (1..=50).map(|i| format!("{i}\t{i}\tv")).collect();
    lines[6] = "3\t1000\tv".into();
    copy_fails(&mut s, "t", &lines, "23505", 7).await;
    // Against a committed row.
    let lines = vec!["5\t5\tv".to_string(), "-1\t6\tv".to_string()];
    copy_fails(&mut s, "t", &lines, "23505", 2).await;
    assert_eq!(run(&mut s, "SELECT count(*) FROM t").await, ["1"]);
    // In a transaction block the failed COPY aborts the block.
    run(&mut s, "BEGIN").await;
    let lines = vec!["8\t8\tv".to_string(), "8\t9\tv".to_string()];
    assert!(copy(&mut s, "t", &lines).await.is_err());
    assert_eq!(run(&mut s, "SELECT 1").await, ["ERROR 25P02"]);
    run(&mut s, "ROLLBACK").await;
    assert_eq!(run(&mut s, "SELECT count(*) FROM t").await, ["1"]);
}

#[tokio::test]
async fn not_null_and_check_violations_name_their_line() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(
        &mut s,
        "CREATE TABLE c (id int NOT NULL, v int CHECK (v >= 0), w text)",
    )
    .await;
    let mut lines: Vec<String> = (1..=2600).map(|i| format!("{i}\t{i}\tw")).collect();
    lines[2500] = "2501\t-5\tw".into();
    copy_fails(&mut s, "c", &lines, "23514", 2501).await;
    let lines = vec!["1\t1\tw".to_string(), "2\t2\tw".into(), "\\N\t3\tw".into()];
    copy_fails(&mut s, "c", &lines, "23502", 3).await;
    let lines = vec!["1\t1\tw".to_string(), "x\t2\tw".into()];
    copy_fails(&mut s, "c", &lines, "22P02", 2).await;
    // Nothing of the failed loads is visible (the first one had flushed a batch).
    assert_eq!(run(&mut s, "SELECT count(*) FROM c").await, ["0"]);
}

#[tokio::test]
async fn insert_select_loads_in_batches_with_the_same_checks() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(
        &mut s,
        "CREATE TABLE g (id int PRIMARY KEY, k int NOT NULL)",
    )
    .await;
    run(&mut s, "CREATE UNIQUE INDEX g_k ON g (k)").await;
    // Keys out of order: (g * 7919) % 20000 is a permutation of 0..20000.
    assert_eq!(
        run(
            &mut s,
            "INSERT INTO g SELECT (x * 7919) % 20000, x FROM generate_series(0, 19999) x"
        )
        .await,
        ["INSERT 0 20000"]
    );
    assert_eq!(
        run(&mut s, "SELECT count(*), sum(id), sum(k) FROM g").await,
        ["20000|199990000|199990000"]
    );
    // (3 * 7919) % 20000 = 3757.
    assert_eq!(run(&mut s, "SELECT id FROM g WHERE k = 3").await, ["3757"]);
    // A duplicate in the unique index fails the whole statement.
    assert_eq!(
        run(
            &mut s,
            "INSERT INTO g SELECT 100000 + x, 30000 + x % 3000 FROM generate_series(0, 4999) x"
        )
        .await,
        ["ERROR 23505"]
    );
    assert_eq!(
        run(
            &mut s,
            "INSERT INTO g SELECT 100000 + x, NULL FROM generate_series(0, 9) x"
        )
        .await,
        ["ERROR 23502"]
    );
    assert_eq!(run(&mut s, "SELECT count(*) FROM g").await, ["20000"]);
    // Multi-row VALUES takes the same path.
    assert_eq!(
        run(&mut s, "INSERT INTO g VALUES (-1, -1), (-2, -2), (-3, -1)").await,
        ["ERROR 23505"]
    );
    assert_eq!(
        run(&mut s, "INSERT INTO g VALUES (-1, -1), (-2, -2)").await,
        ["INSERT 0 2"]
    );
}
