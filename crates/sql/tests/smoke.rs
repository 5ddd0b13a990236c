//! Session-level checks of the SQL layer over an in-memory volume.

use borealis_sql::{Database, Datum, ExecResult, TransactionStatus};
use borealis_volume::{Volume, VolumeConfig};

mod common;
use common::db;
use common::run;

#[tokio::test]
async fn tables_rows_and_errors() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    assert_eq!(run(&mut s, "SELECT 1").await, ["1"]);
    assert_eq!(
        run(&mut s, "SELECT 1 + 2 * 3, 'a' || 'b', 7 / 2, 7.0 / 2").await,
        ["7|ab|3|3.5000000000000000"]
    );
    assert_eq!(
        run(
            &mut s,
            "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL, n numeric(6,2) DEFAULT 1.5)"
        )
        .await,
        ["CREATE TABLE"]
    );
    assert_eq!(
        run(
            &mut s,
            "INSERT INTO t (id, v) VALUES (2, 'b'), (1, 'a'), (3, 'c')"
        )
        .await,
        ["INSERT 0 3"]
    );
    assert_eq!(
        run(&mut s, "SELECT * FROM t").await,
        ["1|a|1.50", "2|b|1.50", "3|c|1.50"]
    );
    assert_eq!(
        run(&mut s, "INSERT INTO t VALUES (1, 'dup')").await,
        ["ERROR 23505"]
    );
    assert_eq!(
        run(&mut s, "INSERT INTO t (id) VALUES (9)").await,
        ["ERROR 23502"]
    );
    assert_eq!(run(&mut s, "SELECT * FROM nope").await, ["ERROR 42P01"]);
    assert_eq!(run(&mut s, "SELECT nope FROM t").await, ["ERROR 42703"]);
    assert_eq!(run(&mut s, "SELEC 1").await, ["ERROR 42601"]);
    assert_eq!(run(&mut s, "SELECT 1/0").await, ["ERROR 22012"]);
    assert_eq!(
        run(
            &mut s,
            "UPDATE t SET n = n + 1 WHERE id = 2 RETURNING id, n"
        )
        .await,
        ["2|2.50"]
    );
    assert_eq!(
        run(&mut s, "DELETE FROM t WHERE id >= 3").await,
        ["DELETE 1"]
    );
    assert_eq!(
        run(&mut s, "SELECT count(*), sum(n), max(v) FROM t").await,
        ["2|4.00|b"]
    );
    assert_eq!(
        run(&mut s, "SELECT v FROM t ORDER BY v DESC LIMIT 1").await,
        ["b"]
    );
    assert_eq!(
        run(
            &mut s,
            "INSERT INTO t VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET v = excluded.v || t.v"
        )
        .await,
        ["INSERT 0 1"]
    );
    assert_eq!(run(&mut s, "SELECT v FROM t WHERE id = 1").await, ["xa"]);
    assert_eq!(
        run(
            &mut s,
            "INSERT INTO t VALUES (1, 'y') ON CONFLICT DO NOTHING"
        )
        .await,
        ["INSERT 0 0"]
    );
}

#[tokio::test]
async fn transactions_and_status() {
    let db = db().await;
    let mut a = db.session("postgres", "postgres");
    let mut b = db.session("postgres", "postgres");
    run(&mut a, "CREATE TABLE acct (id int PRIMARY KEY, bal int)").await;
    run(&mut a, "INSERT INTO acct VALUES (1, 100)").await;
    assert_eq!(run(&mut a, "BEGIN").await, ["BEGIN"]);
    assert_eq!(a.transaction_status(), TransactionStatus::InBlock);
    run(&mut a, "UPDATE acct SET bal = bal - 10 WHERE id = 1").await;
    // No dirty reads.
    assert_eq!(run(&mut b, "SELECT bal FROM acct").await, ["100"]);
    assert_eq!(run(&mut a, "SELECT bal FROM acct").await, ["90"]);
    assert_eq!(run(&mut a, "SELECT 1/0").await, ["ERROR 22012"]);
    assert_eq!(a.transaction_status(), TransactionStatus::Failed);
    assert_eq!(run(&mut a, "SELECT 1").await, ["ERROR 25P02"]);
    assert_eq!(run(&mut a, "COMMIT").await, ["ROLLBACK"]);
    assert_eq!(a.transaction_status(), TransactionStatus::Idle);
    assert_eq!(run(&mut b, "SELECT bal FROM acct").await, ["100"]);
    // Committed changes are visible to new statements.
    run(
        &mut a,
        "BEGIN; UPDATE acct SET bal = 50 WHERE id = 1; COMMIT",
    )
    .await;
    assert_eq!(run(&mut b, "SELECT bal FROM acct").await, ["50"]);
}

#[tokio::test]
async fn survives_reopen_of_the_same_volume() {
    let volume = Volume::in_memory(VolumeConfig::default());
    {
        let db = Database::open(volume.clone()).await.unwrap();
        let mut s = db.session("postgres", "postgres");
        run(&mut s, "CREATE TABLE k (id bigserial PRIMARY KEY, v text)").await;
        for i in 0..500 {
            run(&mut s, &format!("INSERT INTO k (v) VALUES ('row {i}')")).await;
        }
    }
    let db = Database::open(volume).await.unwrap();
    let mut s = db.session("postgres", "postgres");
    assert_eq!(
        run(&mut s, "SELECT count(*), min(id), max(id) FROM k").await,
        ["500|1|500"]
    );
    assert_eq!(
        run(&mut s, "INSERT INTO k (v) VALUES ('after') RETURNING id").await,
        ["501"]
    );
    let _ = Datum::Null;
}

#[tokio::test]
async fn tables_without_primary_key_use_hidden_row_ids() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(&mut s, "CREATE TABLE x (a int not null, b int)").await;
    assert_eq!(
        run(&mut s, "INSERT INTO x VALUES (1,1),(2,2)").await,
        ["INSERT 0 2"]
    );
    assert_eq!(run(&mut s, "SELECT count(*) FROM x").await, ["2"]);
    assert_eq!(
        run(&mut s, "ALTER TABLE x ADD PRIMARY KEY (a)").await,
        ["ALTER TABLE"]
    );
    assert_eq!(run(&mut s, "SELECT a, b FROM x WHERE a = 2").await, ["2|2"]);
    assert_eq!(
        run(&mut s, "INSERT INTO x VALUES (2, 3)").await,
        ["ERROR 23505"]
    );
}

#[tokio::test]
async fn pgbench_dialect_vacuum_and_copy_freeze() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(&mut s, "CREATE TABLE a (aid int not null, abalance int)").await;
    assert_eq!(run(&mut s, "vacuum analyze a").await, ["VACUUM"]);
    assert_eq!(run(&mut s, "VACUUM").await, ["VACUUM"]);
    let r = s.query("copy a from stdin with (freeze on)").await;
    assert!(
        matches!(r.as_slice(), [Ok(ExecResult::CopyIn { .. })]),
        "{r:?}"
    );
    s.copy_data(b"1\t10\n2\t20\n3\t").await.unwrap();
    s.copy_data(b"30\n\\.\n").await.unwrap();
    assert!(matches!(s.copy_done().await, Ok(ExecResult::Command { tag }) if tag == "COPY 3"));
    assert_eq!(run(&mut s, "SELECT sum(abalance) FROM a").await, ["60"]);
    run(&mut s, "ALTER TABLE a ADD PRIMARY KEY (aid)").await;
    for _ in 0..5 {
        run(&mut s, "UPDATE a SET abalance = abalance + 1 WHERE aid = 1").await;
    }
    run(&mut s, "DELETE FROM a WHERE aid = 3").await;
    assert_eq!(run(&mut s, "VACUUM a").await, ["VACUUM"]);
    assert_eq!(
        run(&mut s, "SELECT aid, abalance FROM a").await,
        ["1|15", "2|20"]
    );
}

#[tokio::test]
async fn savepoints() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(&mut s, "CREATE TABLE sp (id int PRIMARY KEY, v int)").await;
    run(&mut s, "INSERT INTO sp VALUES (1, 1), (2, 2)").await;
    assert_eq!(run(&mut s, "SAVEPOINT a").await, ["ERROR 25P01"]);
    run(&mut s, "BEGIN").await;
    run(&mut s, "UPDATE sp SET v = 10 WHERE id = 1").await;
    assert_eq!(run(&mut s, "SAVEPOINT a").await, ["SAVEPOINT"]);
    run(&mut s, "UPDATE sp SET v = 20 WHERE id = 2").await;
    run(&mut s, "DELETE FROM sp WHERE id = 1").await;
    run(&mut s, "INSERT INTO sp VALUES (3, 3)").await;
    assert_eq!(run(&mut s, "SELECT 1/0").await, ["ERROR 22012"]);
    assert_eq!(s.transaction_status(), TransactionStatus::Failed);
    assert_eq!(run(&mut s, "ROLLBACK TO SAVEPOINT a").await, ["ROLLBACK"]);
    assert_eq!(s.transaction_status(), TransactionStatus::InBlock);
    assert_eq!(run(&mut s, "SELECT id, v FROM sp").await, ["1|10", "2|2"]);
    run(&mut s, "SAVEPOINT b").await;
    run(&mut s, "INSERT INTO sp VALUES (4, 4)").await;
    assert_eq!(run(&mut s, "RELEASE SAVEPOINT b").await, ["RELEASE"]);
    assert_eq!(
        run(&mut s, "ROLLBACK TO SAVEPOINT nope").await,
        ["ERROR 3B001"]
    );
    run(&mut s, "ROLLBACK TO a").await;
    run(&mut s, "INSERT INTO sp VALUES (5, 5)").await;
    assert_eq!(run(&mut s, "COMMIT").await, ["COMMIT"]);
    let mut other = db.session("postgres", "postgres");
    assert_eq!(
        run(&mut other, "SELECT id, v FROM sp").await,
        ["1|10", "2|2", "5|5"]
    );
    assert_eq!(run(&mut other, "COMMIT").await, ["COMMIT"]);
    let notices = other.take_notices();
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].1.code, "25P01");
}

#[tokio::test]
async fn add_primary_key_rebuilds_in_bulk_and_checks_duplicates() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(
        &mut s,
        "CREATE TABLE big (aid int not null, bid int, filler char(84))",
    )
    .await;
    run(
        &mut s,
        "INSERT INTO big SELECT 20001 - g, g % 10, '' FROM generate_series(1, 20000) AS g",
    )
    .await;
    assert_eq!(
        run(&mut s, "ALTER TABLE big ADD PRIMARY KEY (aid)").await,
        ["ALTER TABLE"]
    );
    assert_eq!(
        run(&mut s, "SELECT count(*), min(aid), max(aid) FROM big").await,
        ["20000|1|20000"]
    );
    assert_eq!(
        run(&mut s, "SELECT bid FROM big WHERE aid = 12345").await,
        ["6"]
    );
    assert_eq!(
        run(&mut s, "SELECT aid FROM big WHERE aid BETWEEN 10 AND 12").await,
        ["10", "11", "12"]
    );
    assert_eq!(
        run(&mut s, "INSERT INTO big VALUES (5, 0, '')").await,
        ["ERROR 23505"]
    );
    run(&mut s, "CREATE TABLE dup (a int not null)").await;
    run(&mut s, "INSERT INTO dup VALUES (1), (2), (1)").await;
    assert_eq!(
        run(&mut s, "ALTER TABLE dup ADD PRIMARY KEY (a)").await,
        ["ERROR 23505"]
    );
    assert_eq!(run(&mut s, "SELECT count(*) FROM dup").await, ["3"]);
}

#[tokio::test]
async fn commits_are_counted_in_the_latency_histogram() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(&mut s, "CREATE TABLE h (id int PRIMARY KEY)").await;
    let (_, _, before) = db.engine().commit_latency();
    for i in 0..5 {
        run(&mut s, &format!("INSERT INTO h VALUES ({i})")).await;
    }
    run(&mut s, "SELECT count(*) FROM h").await; // read-only: no commit record
    let (buckets, _, after) = db.engine().commit_latency();
    assert_eq!(after - before, 5);
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative buckets"
    );
}
