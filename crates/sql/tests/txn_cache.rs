//! The engine's in-memory table of decided transactions stays bounded: older ones
//! are read from the CLOG, and visibility does not change when they are.

mod common;
use common::*;

#[tokio::test]
async fn decided_transactions_are_pruned_and_read_from_the_clog() {
    let db = db().await;
    db.engine().set_transaction_cache(8).await;
    let mut s = db.session("postgres", "postgres");
    let mut other = db.session("postgres", "postgres");
    run(&mut s, "CREATE TABLE t (k int PRIMARY KEY, v int)").await;
    // An open transaction keeps its own and newer entries.
    run(&mut other, "BEGIN").await;
    run(&mut other, "INSERT INTO t VALUES (-1, -1)").await;
    for i in 0..300 {
        run(&mut s, &format!("INSERT INTO t VALUES ({i}, 0)")).await;
        // Every third transaction aborts: its row must stay invisible once its
        // entry is gone from memory too.
        run(&mut s, "BEGIN").await;
        run(&mut s, &format!("UPDATE t SET v = v + 1 WHERE k = {i}")).await;
        let end = if i % 3 == 0 { "ROLLBACK" } else { "COMMIT" };
        run(&mut s, end).await;
    }
    run(&mut other, "COMMIT").await;
    for i in 300..400 {
        run(&mut s, &format!("INSERT INTO t VALUES ({i}, 1)")).await;
    }
    let held = db.engine().set_transaction_cache(8).await;
    assert!(held < 100, "{held} transactions still held in memory");
    assert_eq!(
        run(&mut s, "SELECT count(*), sum(v) FROM t").await,
        vec!["401|299"]
    );
    assert_eq!(
        run(
            &mut s,
            "SELECT v FROM t WHERE k IN (0, 1, 3, -1) ORDER BY k"
        )
        .await,
        vec!["-1", "0", "1", "0"]
    );
}
