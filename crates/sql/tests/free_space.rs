//! Free-space reuse: the pages of dropped, truncated, rewritten and rolled-back
//! trees go back into use once no snapshot can see them, and only then.

use borealis_sql::{Database, Session};
use borealis_volume::{Volume, VolumeConfig};

mod common;
use common::run;

/// Creates `name` and fills it with `rows` rows of about 200 bytes each.
async fn fill(s: &mut Session, name: &str, rows: usize) {
    assert_eq!(
        run(
            s,
            &format!("CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        )
        .await,
        ["CREATE TABLE"]
    );
    assert_eq!(
        run(
            s,
            &format!(
                "INSERT INTO {name} SELECT g, '{}' FROM generate_series(1, {rows}) g",
                "x".repeat(200)
            )
        )
        .await,
        [format!("INSERT 0 {rows}")]
    );
}

/// (free pages, page numbers ever handed out).
async fn space(db: &Database) -> (u64, u64) {
    let s = db.engine().stats().await;
    (s.free_pages, s.allocated_pages)
}

#[tokio::test]
async fn dropped_and_truncated_trees_are_reused_and_survive_a_reopen() {
    let volume = Volume::in_memory(VolumeConfig::default());
    let db = Database::open(volume.clone()).await.unwrap();
    let mut s = db.session("postgres", "postgres");
    fill(&mut s, "t", 3000).await;
    let (free0, high0) = space(&db).await;
    assert_eq!(free0, 0);

    assert_eq!(run(&mut s, "DROP TABLE t").await, ["DROP TABLE"]);
    assert_eq!(run(&mut s, "VACUUM").await, ["VACUUM"]);
    let (free1, high1) = space(&db).await;
    // 3000 rows of ~200 bytes: at least 70 leaves.
    assert!(free1 >= 70, "dropped table's pages freed: {free1}");
    assert!(high1 <= high0 + 2, "{high1} vs {high0}");

    // The same table again fits in the freed pages.
    fill(&mut s, "u", 3000).await;
    let (free2, high2) = space(&db).await;
    assert!(high2 <= high1 + 4, "reused, not fresh: {high2} vs {high1}");
    assert!(free2 < free1 / 4, "{free2} of {free1} left");
    assert_eq!(
        run(&mut s, "SELECT count(*), sum(id), min(v) = max(v) FROM u").await,
        ["3000|4501500|t"]
    );

    // TRUNCATE frees the old tree once committed; the rows go into reused pages.
    assert_eq!(run(&mut s, "TRUNCATE u").await, ["TRUNCATE TABLE"]);
    run(&mut s, "VACUUM").await;
    let (free3, _) = space(&db).await;
    assert!(
        free3 >= free2 + 70,
        "{free3} after TRUNCATE, {free2} before"
    );
    assert_eq!(
        run(
            &mut s,
            "INSERT INTO u SELECT g, 'y' FROM generate_series(1, 500) g"
        )
        .await,
        ["INSERT 0 500"]
    );
    drop(s);
    drop(db);

    // The list is in pages: a new instance over the same volume has it.
    let db = Database::open(volume).await.unwrap();
    let mut s = db.session("postgres", "postgres");
    let (free4, high4) = space(&db).await;
    assert!(free4 > 0 && free4 <= free3, "{free4}");
    fill(&mut s, "w", 2000).await;
    let (_, high5) = space(&db).await;
    assert!(
        high5 <= high4 + 4,
        "reused after reopen: {high5} vs {high4}"
    );
    assert_eq!(run(&mut s, "SELECT count(*) FROM u").await, ["500"]);
    assert_eq!(
        run(&mut s, "SELECT count(*), sum(id) FROM w").await,
        ["2000|2001000"]
    );
}

#[tokio::test]
async fn repeated_create_fill_drop_cycles_stay_bounded() {
    let db = common::db().await;
    let mut s = db.session("postgres", "postgres");
    let mut highs = Vec::new();
    for _ in 0..6 {
        fill(&mut s, "c", 2000).await;
        // An index rewrite and a rekey add trees to free too.
        run(&mut s, "CREATE INDEX c_v ON c (v)").await;
        run(&mut s, "DROP TABLE c").await;
        run(&mut s, "VACUUM").await;
        highs.push(space(&db).await.1);
    }
    // The first round sets the high-water mark; later rounds reuse its pages.
    assert!(
        highs[5] <= highs[0] + 8,
        "page numbers keep growing: {highs:?}"
    );
}

#[tokio::test]
async fn trees_of_rolled_back_work_are_freed() {
    let db = common::db().await;
    let mut s = db.session("postgres", "postgres");
    fill(&mut s, "keep", 1000).await;
    run(&mut s, "BEGIN").await;
    fill(&mut s, "gone", 3000).await;
    run(&mut s, "ROLLBACK").await;
    run(&mut s, "VACUUM").await;
    let (free, _) = space(&db).await;
    assert!(free >= 70, "rolled-back table's pages freed: {free}");

    // A TRUNCATE undone by ROLLBACK TO keeps the old tree (and frees the new one).
    run(&mut s, "BEGIN").await;
    run(&mut s, "SAVEPOINT a").await;
    assert_eq!(run(&mut s, "TRUNCATE keep").await, ["TRUNCATE TABLE"]);
    run(&mut s, "ROLLBACK TO a").await;
    run(&mut s, "COMMIT").await;
    run(&mut s, "VACUUM").await;
    fill(&mut s, "other", 3000).await;
    assert_eq!(
        run(&mut s, "SELECT count(*), min(id), max(id) FROM keep").await,
        ["1000|1|1000"]
    );
}

#[tokio::test]
async fn a_snapshot_that_sees_a_dropped_table_keeps_its_pages() {
    let db = common::db().await;
    let mut a = db.session("postgres", "postgres");
    let mut b = db.session("postgres", "postgres");
    fill(&mut a, "t", 3000).await;
    run(&mut a, "BEGIN ISOLATION LEVEL REPEATABLE READ").await;
    assert_eq!(run(&mut a, "SELECT count(*) FROM t").await, ["3000"]);

    assert_eq!(run(&mut b, "DROP TABLE t").await, ["DROP TABLE"]);
    run(&mut b, "VACUUM").await;
    assert_eq!(space(&db).await.0, 0, "freed under a snapshot that sees it");
    // New tables would take freed pages: none may come from t's tree.
    fill(&mut b, "n", 3000).await;
    assert_eq!(
        run(&mut a, "SELECT count(*), sum(id), min(v) = max(v) FROM t").await,
        ["3000|4501500|t"]
    );
    run(&mut a, "COMMIT").await;

    run(&mut b, "VACUUM").await;
    assert!(space(&db).await.0 >= 70, "freed once the snapshot ended");
    assert_eq!(run(&mut a, "SELECT count(*) FROM t").await, ["ERROR 42P01"]);
    assert_eq!(run(&mut a, "SELECT count(*) FROM n").await, ["3000"]);
}
