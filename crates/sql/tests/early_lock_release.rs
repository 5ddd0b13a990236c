//! Early lock release: a row whose last writer has committed but whose commit is not
//! durable yet can be written at once; everything the client hears still waits for
//! durability, and plain reads still see only durable commits. The in-memory volume
//! holds durability back to stand in for slow storage acknowledgements.

use borealis_sql::Database;
use borealis_volume::{Volume, VolumeConfig};
use std::time::Duration;
use tokio::time::timeout;

mod common;
use common::run;

/// Long enough for anything that does not wait on durability.
const PROMPT: Duration = Duration::from_secs(5);
/// How long a commit is watched to make sure it does not return early.
const STILL_WAITING: Duration = Duration::from_millis(200);

async fn setup() -> (Volume, Database) {
    let volume = Volume::in_memory(VolumeConfig::default());
    let db = Database::open(volume.clone()).await.unwrap();
    let mut s = db.session("postgres", "postgres");
    assert_eq!(
        run(
            &mut s,
            "CREATE TABLE acct (id int PRIMARY KEY, bal int NOT NULL)"
        )
        .await,
        ["CREATE TABLE"]
    );
    assert_eq!(
        run(&mut s, "INSERT INTO acct VALUES (1, 100), (2, 200)").await,
        ["INSERT 0 2"]
    );
    (volume, db)
}

#[tokio::test]
async fn a_committed_row_is_writable_before_its_commit_is_durable() {
    let (volume, db) = setup().await;
    let (mut a, mut b, mut reader) = (
        db.session("postgres", "postgres"),
        db.session("postgres", "postgres"),
        db.session("postgres", "postgres"),
    );
    volume.set_durability_held(true);
    assert_eq!(
        run(&mut a, "BEGIN; UPDATE acct SET bal = bal + 10 WHERE id = 1").await,
        ["BEGIN", "UPDATE 1"]
    );
    let commit_a = run(&mut a, "COMMIT");
    tokio::pin!(commit_a);
    assert!(
        timeout(STILL_WAITING, &mut commit_a).await.is_err(),
        "COMMIT was acknowledged before it was durable"
    );
    // A has decided; B builds on A's version without waiting for its durability.
    let b_update = timeout(
        PROMPT,
        run(
            &mut b,
            "BEGIN; UPDATE acct SET bal = bal + 1 WHERE id = 1 RETURNING bal",
        ),
    )
    .await
    .expect("the update waited for the previous commit to become durable");
    assert_eq!(b_update, ["BEGIN", "111"]);
    // A plain read sees durable commits only: neither A nor B.
    assert_eq!(
        run(&mut reader, "SELECT bal FROM acct WHERE id = 1").await,
        ["100"]
    );
    let commit_b = run(&mut b, "COMMIT");
    tokio::pin!(commit_b);
    assert!(
        timeout(STILL_WAITING, &mut commit_b).await.is_err(),
        "a commit built on a non-durable one was acknowledged first"
    );
    volume.set_durability_held(false);
    assert_eq!(timeout(PROMPT, commit_a).await.unwrap(), ["COMMIT"]);
    assert_eq!(timeout(PROMPT, commit_b).await.unwrap(), ["COMMIT"]);
    assert_eq!(
        run(&mut reader, "SELECT id, bal FROM acct ORDER BY id").await,
        ["1|111", "2|200"]
    );
}

#[tokio::test]
async fn repeatable_read_still_fails_on_a_commit_after_its_snapshot() {
    let (volume, db) = setup().await;
    let (mut a, mut b) = (
        db.session("postgres", "postgres"),
        db.session("postgres", "postgres"),
    );
    assert_eq!(
        run(
            &mut b,
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT bal FROM acct WHERE id = 2"
        )
        .await,
        ["BEGIN", "200"]
    );
    volume.set_durability_held(true);
    assert_eq!(
        run(&mut a, "BEGIN; UPDATE acct SET bal = 0 WHERE id = 2").await,
        ["BEGIN", "UPDATE 1"]
    );
    let commit_a = run(&mut a, "COMMIT");
    tokio::pin!(commit_a);
    assert!(timeout(STILL_WAITING, &mut commit_a).await.is_err());
    // Without waiting for A's durability: 40001, as PostgreSQL says after A commits.
    let b_update = timeout(PROMPT, run(&mut b, "UPDATE acct SET bal = 1 WHERE id = 2"))
        .await
        .expect("the update waited for the previous commit to become durable");
    assert_eq!(b_update, ["ERROR 40001"]);
    assert_eq!(run(&mut b, "ROLLBACK").await, ["ROLLBACK"]);
    volume.set_durability_held(false);
    assert_eq!(timeout(PROMPT, commit_a).await.unwrap(), ["COMMIT"]);
    assert_eq!(
        run(&mut b, "SELECT bal FROM acct WHERE id = 2").await,
        ["0"]
    );
}
