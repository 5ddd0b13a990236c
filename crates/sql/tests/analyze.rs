//! ANALYZE: statistics in the catalog entry, and the planner's use of them.

mod common;
use common::{db, run};

#[tokio::test]
async fn analyze_histograms_choose_between_an_index_and_the_whole_table() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    run(&mut s, "CREATE TABLE h (id int PRIMARY KEY, v int, w text)").await;
    run(
        &mut s,
        "INSERT INTO h SELECT g, g % 100, 'x' FROM generate_series(1, 10000) g",
    )
    .await;
    run(&mut s, "CREATE INDEX h_v ON h (v)").await;
    let wide = "SELECT id FROM h WHERE v BETWEEN 0 AND 79";
    let narrow = "SELECT id FROM h WHERE v = 7";
    let explain = |q: &str| format!("EXPLAIN {q}");

    // Without statistics the choice is by shape: the index bounds the query.
    assert_eq!(
        run(&mut s, &explain(wide)).await[0],
        "Index Scan using h_v on h"
    );
    let wide_rows = run(&mut s, wide).await.len();
    assert_eq!(wide_rows, 8000);

    assert_eq!(run(&mut s, "ANALYZE h").await, ["ANALYZE"]);
    // 80% of the rows: the whole table in one pass beats a lookup per row.
    assert_eq!(run(&mut s, &explain(wide)).await[0], "Seq Scan on h");
    assert_eq!(run(&mut s, wide).await.len(), wide_rows);
    // 1% of the rows: still the index.
    assert_eq!(
        run(&mut s, &explain(narrow)).await[0],
        "Index Scan using h_v on h"
    );
    assert_eq!(run(&mut s, narrow).await.len(), 100);
    // A range of 5% stays on the index too.
    assert_eq!(
        run(&mut s, &explain("SELECT id FROM h WHERE v < 5")).await[0],
        "Index Scan using h_v on h"
    );

    // Bare ANALYZE covers every table; errors are PostgreSQL's.
    assert_eq!(run(&mut s, "ANALYZE").await, ["ANALYZE"]);
    assert_eq!(run(&mut s, "ANALYZE nosuch").await, ["ERROR 42P01"]);
    run(&mut s, "BEGIN READ ONLY").await;
    assert_eq!(run(&mut s, "ANALYZE h").await, ["ERROR 25006"]);
    run(&mut s, "ROLLBACK").await;

    // Statistics are part of the committed catalog: a rolled-back ANALYZE leaves
    // the previous ones, and later writes keep working.
    run(&mut s, "BEGIN").await;
    run(&mut s, "DELETE FROM h WHERE v < 90").await;
    run(&mut s, "ANALYZE h").await;
    assert_eq!(
        run(&mut s, &explain(wide)).await[0],
        "Index Scan using h_v on h",
        "after the delete only v >= 90 is left: the range is empty"
    );
    run(&mut s, "ROLLBACK").await;
    assert_eq!(run(&mut s, &explain(wide)).await[0], "Seq Scan on h");
    assert_eq!(
        run(&mut s, "INSERT INTO h VALUES (10001, 5, 'y')").await,
        ["INSERT 0 1"]
    );
    assert_eq!(run(&mut s, wide).await.len(), 8001);
}
