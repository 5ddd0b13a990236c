//! Secondary indexes at the session level: which access path EXPLAIN shows (the
//! text differs from PostgreSQL's, so the .slt files cannot check it), and table
//! locks between sessions.

use borealis_sql::Session;
use std::time::Duration;

mod common;
use common::db;
use common::run;

/// The first line of the plan and the scan line.
async fn plan(s: &mut Session, sql: &str) -> String {
    run(s, &format!("EXPLAIN {sql}")).await.join("\n")
}

#[tokio::test]
async fn explain_shows_the_chosen_index() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(
        &mut s,
        "CREATE TABLE t (id int PRIMARY KEY, k int, c text, d int)",
    )
    .await;
    run(
        &mut s,
        "INSERT INTO t SELECT g, g % 7, 'c' || g, g FROM generate_series(1, 200) g",
    )
    .await;
    run(&mut s, "CREATE INDEX k_1 ON t (k)").await;
    run(&mut s, "CREATE UNIQUE INDEX t_c_d ON t (c, d)").await;

    let p = plan(&mut s, "SELECT * FROM t WHERE k = 3").await;
    assert!(p.contains("Index Scan using k_1 on t"), "{p}");
    assert!(p.contains("Index Cond: (k = $)"), "{p}");
    let p = plan(&mut s, "SELECT * FROM t WHERE k BETWEEN 1 AND 2").await;
    assert!(p.contains("Index Scan using k_1 on t"), "{p}");
    // The full primary key wins over any index.
    let p = plan(&mut s, "SELECT * FROM t WHERE id = 5 AND k = 3").await;
    assert!(p.contains("Index Scan using t_pkey on t"), "{p}");
    // More equalities beat fewer.
    let p = plan(&mut s, "SELECT * FROM t WHERE c = 'c5' AND d = 5 AND k = 5").await;
    assert!(p.contains("Index Scan using t_c_d on t"), "{p}");
    // ORDER BY ... LIMIT on the index's column.
    let p = plan(&mut s, "SELECT * FROM t ORDER BY k LIMIT 3").await;
    assert!(p.contains("Index Scan using k_1 on t"), "{p}");
    // Entries of equal keys are in clustered-key order.
    let p = plan(&mut s, "SELECT * FROM t WHERE k = 3 ORDER BY id LIMIT 2").await;
    assert!(p.contains("Index Scan using k_1 on t"), "{p}");
    assert_eq!(
        run(&mut s, "SELECT id FROM t WHERE k = 3 ORDER BY id LIMIT 2").await,
        ["3", "10"]
    );
    assert_eq!(
        run(&mut s, "SELECT id FROM t ORDER BY k, id LIMIT 2").await,
        ["7", "14"]
    );
    // Without a usable predicate or order: a scan.
    let p = plan(&mut s, "SELECT * FROM t WHERE d = 3").await;
    assert!(p.contains("Seq Scan on t"), "{p}");
    let p = plan(&mut s, "SELECT * FROM t ORDER BY k DESC LIMIT 3").await;
    assert!(p.contains("Seq Scan on t"), "{p}");
    let p = plan(&mut s, "UPDATE t SET c = 'x' WHERE k = 2").await;
    assert!(p.contains("Index Scan using k_1 on t"), "{p}");
    let p = plan(&mut s, "DELETE FROM t WHERE k > 5").await;
    assert!(p.contains("Index Scan using k_1 on t"), "{p}");

    // And the scans return what a full scan would.
    assert_eq!(
        run(&mut s, "SELECT count(*), sum(id) FROM t WHERE k = 3").await,
        run(&mut s, "SELECT count(*), sum(id) FROM t WHERE k + 0 = 3").await
    );
    assert_eq!(
        run(&mut s, "SELECT id, k FROM t ORDER BY k, id LIMIT 4").await,
        ["7|0", "14|0", "21|0", "28|0"]
    );
    assert_eq!(
        run(&mut s, "SELECT id FROM t WHERE k > 5 ORDER BY k LIMIT 2")
            .await
            .len(),
        2
    );
    // An UPDATE through the index that changes the indexed column itself.
    assert_eq!(
        run(&mut s, "UPDATE t SET k = k + 10 WHERE k = 2").await,
        ["UPDATE 29"]
    );
    assert_eq!(
        run(&mut s, "SELECT count(*) FROM t WHERE k = 12").await,
        ["29"]
    );
    assert_eq!(
        run(&mut s, "SELECT count(*) FROM t WHERE k = 2").await,
        ["0"]
    );
}

#[tokio::test]
async fn create_index_waits_for_writers_and_writers_see_the_new_index() {
    let db = db().await;
    let mut s1 = db.session("postgres", "postgres");
    let mut s2 = db.session("postgres", "postgres");
    run(&mut s1, "CREATE TABLE t (id int PRIMARY KEY, k int)").await;
    run(&mut s1, "INSERT INTO t VALUES (1, 1)").await;
    // s1 writes in an open transaction: CREATE INDEX must wait for it.
    run(&mut s1, "BEGIN").await;
    run(&mut s1, "INSERT INTO t VALUES (2, 1)").await;
    let build = tokio::spawn(async move {
        let r = run(&mut s2, "CREATE UNIQUE INDEX t_k ON t (k)").await;
        (s2, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !build.is_finished(),
        "CREATE INDEX did not wait for the writer"
    );
    run(&mut s1, "COMMIT").await;
    let (mut s2, r) = build.await.unwrap();
    // The committed duplicate makes the unique build fail.
    assert_eq!(r, ["ERROR 23505"]);
    run(&mut s2, "DELETE FROM t WHERE id = 2").await;
    assert_eq!(
        run(&mut s2, "CREATE UNIQUE INDEX t_k ON t (k)").await,
        ["CREATE INDEX"]
    );

    // A writer that started its transaction before the index existed, blocked by
    // the build, still maintains (and is checked by) the index afterwards.
    run(&mut s2, "BEGIN").await;
    run(&mut s2, "CREATE INDEX t_k2 ON t (k, id)").await;
    let mut s3 = db.session("postgres", "postgres");
    run(&mut s3, "BEGIN ISOLATION LEVEL REPEATABLE READ").await;
    run(&mut s3, "SELECT count(*) FROM t").await;
    let writer = tokio::spawn(async move {
        let r = run(&mut s3, "INSERT INTO t VALUES (3, 3)").await;
        (s3, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "INSERT did not wait for CREATE INDEX"
    );
    run(&mut s2, "COMMIT").await;
    let (mut s3, r) = writer.await.unwrap();
    assert_eq!(r, ["INSERT 0 1"]);
    assert_eq!(
        run(&mut s3, "INSERT INTO t VALUES (4, 1)").await,
        ["ERROR 23505"]
    );
    run(&mut s3, "ROLLBACK").await;
    run(&mut s1, "INSERT INTO t VALUES (3, 3)").await;
    let p = plan(&mut s1, "SELECT id FROM t WHERE k = 3 AND id = 3").await;
    assert!(p.contains("t_pkey"), "{p}");
    assert_eq!(run(&mut s1, "SELECT id FROM t WHERE k = 3").await, ["3"]);
    let p = plan(&mut s1, "SELECT id FROM t WHERE k = 3").await;
    assert!(p.contains("Index Scan using t_k"), "{p}");
}

#[tokio::test]
async fn ddl_lock_cycle_is_a_deadlock() {
    let db = db().await;
    let mut s1 = db.session("postgres", "postgres");
    let mut s2 = db.session("postgres", "postgres");
    run(&mut s1, "CREATE TABLE a (id int PRIMARY KEY, k int)").await;
    run(&mut s1, "CREATE TABLE b (id int PRIMARY KEY, k int)").await;
    run(&mut s1, "BEGIN").await;
    run(&mut s2, "BEGIN").await;
    run(&mut s1, "INSERT INTO a VALUES (1, 1)").await;
    run(&mut s2, "INSERT INTO b VALUES (1, 1)").await;
    let first = tokio::spawn(async move {
        let r = run(&mut s1, "CREATE INDEX b_k ON b (k)").await;
        (s1, r)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r2 = run(&mut s2, "CREATE INDEX a_k ON a (k)").await;
    assert_eq!(r2, ["ERROR 40P01"]);
    run(&mut s2, "ROLLBACK").await;
    let (mut s1, r1) = first.await.unwrap();
    assert_eq!(r1, ["CREATE INDEX"]);
    assert_eq!(run(&mut s1, "COMMIT").await, ["COMMIT"]);
}
