//! Page pruning: rows updated once and not again do not make their leaves split.
//! A leaf about to split first has the dead tails of its rows' version chains cut
//! (`Engine`'s `leaf_prune`, one `ShrinkItems` record), unless a snapshot in use
//! can still see them.

mod common;
use common::*;

fn pad(c: char) -> String {
    std::iter::repeat_n(c, 900).collect()
}

/// Seven 900-byte rows fill most of one leaf; every row is then updated three times over,
/// one row at a time (as TPC-B updates accounts). Returns (leaf prunes, pages
/// added) and checks the rows after each round.
async fn update_rounds(reader_open: bool) -> (u64, u64) {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    let mut reader = db.session("postgres", "postgres");
    run(&mut s, "CREATE TABLE w (id int PRIMARY KEY, pad text)").await;
    for id in 1..=7 {
        let sql = format!("INSERT INTO w VALUES ({id}, '{}')", pad('a'));
        assert_eq!(run(&mut s, &sql).await, ["INSERT 0 1"]);
    }
    if reader_open {
        run(&mut reader, "BEGIN ISOLATION LEVEL REPEATABLE READ").await;
        assert_eq!(run(&mut reader, "SELECT count(*) FROM w").await, ["7"]);
    }
    let before = db.engine().stats().await;
    for (round, c) in ['b', 'c', 'd'].into_iter().enumerate() {
        for id in 1..=7 {
            let sql = format!("UPDATE w SET pad = '{}' WHERE id = {id}", pad(c));
            assert_eq!(
                run(&mut s, &sql).await,
                ["UPDATE 1"],
                "round {round} id {id}"
            );
        }
        let want: Vec<String> = (1..=7).map(|id| format!("{id}|{c}|900")).collect();
        let got = run(
            &mut s,
            "SELECT id, substr(pad, 1, 1), length(pad) FROM w ORDER BY id",
        )
        .await;
        assert_eq!(got, want, "round {round}");
    }
    if reader_open {
        let want: Vec<String> = (1..=7).map(|id| format!("{id}|a")).collect();
        let got = run(
            &mut reader,
            "SELECT id, substr(pad, 1, 1) FROM w ORDER BY id",
        )
        .await;
        assert_eq!(got, want, "the open snapshot lost versions it can see");
        run(&mut reader, "COMMIT").await;
    }
    let after = db.engine().stats().await;
    (
        after.leaf_prunes - before.leaf_prunes,
        after.cache_pages - before.cache_pages,
    )
}

#[tokio::test]
async fn a_full_leaf_is_pruned_instead_of_split() {
    let (prunes, pages) = update_rounds(false).await;
    assert!(prunes > 0, "no leaf was pruned");
    assert_eq!(pages, 0, "the leaf split {pages} times");
}

#[tokio::test]
async fn an_open_snapshot_keeps_the_versions_and_the_leaf_splits() {
    let (prunes, pages) = update_rounds(true).await;
    assert_eq!(prunes, 0, "a leaf was pruned under an open snapshot");
    assert!(
        pages > 0,
        "two versions of seven 900-byte rows fit one leaf?"
    );
}
