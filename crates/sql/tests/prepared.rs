//! Prepared statements keep their bound plan between executions (see
//! `exec::CachedPlan`); DDL the execution's snapshot can see must make them bind
//! afresh, with the same results and errors as a statement bound every time.

use borealis_sql::{Datum, ExecResult, Prepared, Session, Type};

mod common;
use common::db;

/// Runs a simple query and fails the test on any error.
async fn ok(s: &mut Session, sql: &str) {
    for r in s.query(sql).await {
        if let Err(e) = r {
            panic!("{sql}: {e}");
        }
    }
}

/// Executes a prepared statement as the extended protocol does (Execute, then
/// Sync) and renders its rows as text lines, or "ERROR <code>".
async fn exec(s: &mut Session, p: &Prepared, params: Vec<Datum>) -> Vec<String> {
    let r = s.execute(p, params).await;
    s.sync().await.unwrap();
    match r {
        Ok(ExecResult::Rows { rows, .. }) => {
            let mut out: Vec<String> = rows
                .iter()
                .map(|row| {
                    row.iter()
                        .map(|d| d.to_text().unwrap_or_else(|| "NULL".into()))
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect();
            out.sort();
            out
        }
        Ok(ExecResult::Command { tag }) => vec![tag],
        Ok(other) => vec![format!("{other:?}")],
        Err(e) => vec![format!("ERROR {}", e.code)],
    }
}

async fn setup(s: &mut Session) {
    ok(s, "CREATE TABLE t (id int PRIMARY KEY, k int, c text)").await;
    ok(
        s,
        "INSERT INTO t SELECT g, g % 5, 'c' || g FROM generate_series(1, 50) g",
    )
    .await;
}

#[tokio::test]
async fn repeated_executions_see_new_rows_and_parameters() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    setup(&mut s).await;
    let p = s
        .prepare("SELECT id, c FROM t WHERE id = $1", &[Type::Int4])
        .await
        .unwrap();
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(7)]).await, ["7|c7"]);
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(8)]).await, ["8|c8"]);
    ok(&mut s, "UPDATE t SET c = 'new' WHERE id = 8").await;
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(8)]).await, ["8|new"]);
    // A NULL parameter has another type: the statement binds again, then back.
    assert!(exec(&mut s, &p, vec![Datum::Null]).await.is_empty());
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(9)]).await, ["9|c9"]);
}

#[tokio::test]
async fn drop_index_makes_the_plan_stop_using_it() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    setup(&mut s).await;
    ok(&mut s, "CREATE INDEX t_k ON t (k)").await;
    let p = s
        .prepare("SELECT id FROM t WHERE k = $1 AND id > 40", &[Type::Int4])
        .await
        .unwrap();
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(3)]).await, ["43", "48"]);
    ok(&mut s, "DROP INDEX t_k").await;
    // The dropped index's tree is left as it was: a plan that still read it would
    // miss this row.
    ok(&mut s, "INSERT INTO t VALUES (100, 3, 'x')").await;
    assert_eq!(
        exec(&mut s, &p, vec![Datum::Int4(3)]).await,
        ["100", "43", "48"]
    );
}

#[tokio::test]
async fn create_index_is_used_and_maintained() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    setup(&mut s).await;
    let sel = s
        .prepare("SELECT id FROM t WHERE k = $1 AND id > 40", &[Type::Int4])
        .await
        .unwrap();
    let ins = s
        .prepare(
            "INSERT INTO t VALUES ($1, $2, 'i')",
            &[Type::Int4, Type::Int4],
        )
        .await
        .unwrap();
    assert_eq!(exec(&mut s, &sel, vec![Datum::Int4(3)]).await, ["43", "48"]);
    assert_eq!(
        exec(&mut s, &ins, vec![Datum::Int4(200), Datum::Int4(3)]).await,
        ["INSERT 0 1"]
    );
    ok(&mut s, "CREATE INDEX t_k ON t (k)").await;
    // The cached INSERT plan predates the index: the new entry must still land in it
    // (the index scan below would not find the row otherwise).
    assert_eq!(
        exec(&mut s, &ins, vec![Datum::Int4(201), Datum::Int4(3)]).await,
        ["INSERT 0 1"]
    );
    assert_eq!(
        exec(&mut s, &sel, vec![Datum::Int4(3)]).await,
        ["200", "201", "43", "48"]
    );
    // Counted through the index (the access path for `k = 3`).
    let mut check = db.session("postgres", "postgres");
    for r in check.query("SELECT count(*) FROM t WHERE k = 3").await {
        match r {
            Ok(ExecResult::Rows { rows, .. }) => assert_eq!(rows[0][0], Datum::Int8(12)),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn alter_and_drop_table_rebind_or_fail_like_a_fresh_statement() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    setup(&mut s).await;
    let star = s
        .prepare("SELECT * FROM t WHERE id = $1", &[Type::Int4])
        .await
        .unwrap();
    let named = s
        .prepare("SELECT c FROM t WHERE id = $1", &[Type::Int4])
        .await
        .unwrap();
    assert_eq!(exec(&mut s, &star, vec![Datum::Int4(1)]).await, ["1|1|c1"]);
    assert_eq!(exec(&mut s, &named, vec![Datum::Int4(1)]).await, ["c1"]);

    ok(&mut s, "ALTER TABLE t ADD COLUMN e int DEFAULT 9").await;
    assert_eq!(
        exec(&mut s, &star, vec![Datum::Int4(1)]).await,
        ["1|1|c1|9"]
    );
    ok(&mut s, "ALTER TABLE t DROP COLUMN c").await;
    assert_eq!(
        exec(&mut s, &named, vec![Datum::Int4(1)]).await,
        ["ERROR 42703"]
    );
    assert_eq!(exec(&mut s, &star, vec![Datum::Int4(1)]).await, ["1|1|9"]);

    ok(&mut s, "DROP TABLE t").await;
    assert_eq!(
        exec(&mut s, &star, vec![Datum::Int4(1)]).await,
        ["ERROR 42P01"]
    );
    ok(&mut s, "CREATE TABLE t (id int PRIMARY KEY, z text)").await;
    ok(&mut s, "INSERT INTO t VALUES (1, 'z1')").await;
    assert_eq!(exec(&mut s, &star, vec![Datum::Int4(1)]).await, ["1|z1"]);
}

#[tokio::test]
async fn own_uncommitted_ddl_and_its_rollback_are_seen() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    setup(&mut s).await;
    let p = s
        .prepare("SELECT * FROM t WHERE id = $1", &[Type::Int4])
        .await
        .unwrap();
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(2)]).await, ["2|2|c2"]);
    ok(&mut s, "BEGIN").await;
    ok(&mut s, "ALTER TABLE t ADD COLUMN e int DEFAULT 5").await;
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(2)]).await, ["2|2|c2|5"]);
    ok(&mut s, "ROLLBACK").await;
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(2)]).await, ["2|2|c2"]);
}

#[tokio::test]
async fn ddl_committed_by_another_session_is_seen() {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    let mut other = db.session("postgres", "postgres");
    setup(&mut s).await;
    let p = s
        .prepare("SELECT * FROM t WHERE id = $1", &[Type::Int4])
        .await
        .unwrap();
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(3)]).await, ["3|3|c3"]);
    ok(&mut other, "ALTER TABLE t ADD COLUMN e text DEFAULT 'x'").await;
    assert_eq!(exec(&mut s, &p, vec![Datum::Int4(3)]).await, ["3|3|c3|x"]);
    ok(&mut other, "DROP TABLE t").await;
    assert_eq!(
        exec(&mut s, &p, vec![Datum::Int4(3)]).await,
        ["ERROR 42P01"]
    );
}
