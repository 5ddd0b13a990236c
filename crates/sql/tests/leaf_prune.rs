//! Page pruning: rows updated once and not again do not make their leaves split.
//! A leaf about to split first has the dead tails of its rows' version chains cut
//! (`Engine`'s `leaf_prune`, one `ShrinkItems` record), unless a snapshot in use
//! can still see them. A READ COMMITTED transaction idle between statements holds
//! no snapshot, as in PostgreSQL.

mod common;
use common::*;

fn pad(c: char) -> String {
    std::iter::repeat_n(c, 900).collect()
}

/// A second session's transaction, open while the rows are updated.
#[derive(Clone, Copy, PartialEq)]
enum Reader {
    None,
    /// Read once, then idle: its snapshot must keep the first versions.
    RepeatableRead,
    /// Read once, then idle between statements: it holds no snapshot, and its next
    /// statement sees the latest versions.
    ReadCommitted,
}

/// Seven 900-byte rows fill most of one leaf; every row is then updated three times over,
/// one row at a time (as TPC-B updates accounts). Returns (leaf prunes, pages
/// added) and checks the rows after each round.
async fn update_rounds(reader_kind: Reader) -> (u64, u64) {
    let db = db().await;
    let mut s = db.session("postgres", "postgres");
    let mut reader = db.session("postgres", "postgres");
    run(&mut s, "CREATE TABLE w (id int PRIMARY KEY, pad text)").await;
    for id in 1..=7 {
        let sql = format!("INSERT INTO w VALUES ({id}, '{}')", pad('a'));
        assert_eq!(run(&mut s, &sql).await, ["INSERT 0 1"]);
    }
    let begin = match reader_kind {
        Reader::None => None,
        Reader::RepeatableRead => Some("BEGIN ISOLATION LEVEL REPEATABLE READ"),
        Reader::ReadCommitted => Some("BEGIN ISOLATION LEVEL READ COMMITTED"),
    };
    if let Some(begin) = begin {
        run(&mut reader, begin).await;
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
    if begin.is_some() {
        let seen = if reader_kind == Reader::RepeatableRead {
            'a'
        } else {
            'd'
        };
        let want: Vec<String> = (1..=7).map(|id| format!("{id}|{seen}")).collect();
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
    let (prunes, pages) = update_rounds(Reader::None).await;
    assert!(prunes > 0, "no leaf was pruned");
    assert_eq!(pages, 0, "the leaf split {pages} times");
}

#[tokio::test]
async fn an_open_snapshot_keeps_the_versions_and_the_leaf_splits() {
    let (prunes, pages) = update_rounds(Reader::RepeatableRead).await;
    assert_eq!(prunes, 0, "a leaf was pruned under an open snapshot");
    assert!(
        pages > 0,
        "two versions of seven 900-byte rows fit one leaf?"
    );
}

#[tokio::test]
async fn an_idle_read_committed_block_holds_no_snapshot() {
    let (prunes, pages) = update_rounds(Reader::ReadCommitted).await;
    assert!(
        prunes > 0,
        "the idle READ COMMITTED block held pruning back"
    );
    assert_eq!(pages, 0, "the leaf split {pages} times");
}
