//! Data-driven SQL tests: every `crates/sqllogic/slt/*.slt` file is run against a
//! throwaway PostgreSQL 15 cluster and an in-process Borealis server in the same
//! run, and Borealis must answer exactly as PostgreSQL does. Nothing is expected
//! from a file: PostgreSQL's answer *is* the expected output.
//!
//! Run: `cargo test -p borealis-sqllogic --test sqllogic`
//! (`SQLLOGIC_FILTER=dml` runs only files whose name contains `dml`).
//!
//! # The `.slt` format
//!
//! A file is a list of records separated by blank lines. `#` starts a comment line
//! outside a record. A record is a header line followed by one SQL string (one or
//! more lines, up to the next blank line), sent as one simple-protocol query:
//!
//! ```text
//! statement ok                 both servers must succeed, with the same row counts
//! statement error 23505        both must fail with this SQLSTATE
//! query                        both must succeed with the same column names and rows
//! query rowsort                ... rows compared after sorting (unordered results)
//! ```
//!
//! Values are compared in text form (NULL as `NULL`), so output formatting of
//! every type is checked too. Each file starts with an empty database on both
//! sides (a new `CREATE DATABASE` on PostgreSQL, a new in-memory Borealis).
//!
//! A known difference is kept out of the passing set with a marker line right
//! before the header, with a one-line reason:
//!
//! ```text
//! skipif borealis # 0A000: ALTER TABLE ... ADD PRIMARY KEY not supported yet
//! statement ok
//! ALTER TABLE t ADD PRIMARY KEY (id)
//! ```
//!
//! A marked record still runs on both servers (so their states stay alike) and
//! PostgreSQL must still meet the record's expectation; Borealis's answer is not
//! held against it. A marked record on which Borealis *does* agree fails the run
//! ("stale marker"), so fixed bugs get their markers removed and cannot regress.
//! A record that PostgreSQL itself does not satisfy (e.g. `statement ok` that
//! fails on PostgreSQL) is a broken script and fails the run.

mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use support::{connect, run_simple, BorealisServer, Outcome, PostgresCluster};

#[derive(Clone, Debug, PartialEq)]
enum Expect {
    StatementOk,
    StatementError(String),
    Query { rowsort: bool },
}

#[derive(Clone, Debug)]
struct Record {
    line: usize,
    expect: Expect,
    sql: String,
    /// `Some(reason)` when marked `skipif borealis`.
    skip_borealis: Option<String>,
}

fn parse(path: &Path, text: &str) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    let mut skip: Option<(usize, String)> = None;
    while i < lines.len() {
        let line = lines[i].trim_end();
        let at = format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            i += 1;
            continue;
        }
        if let Some(rest) = line.strip_prefix("skipif borealis") {
            let reason = rest.trim().strip_prefix('#').map(str::trim).unwrap_or("");
            if reason.is_empty() {
                return Err(format!("{at}: `skipif borealis` needs `# reason`"));
            }
            if skip.is_some() {
                return Err(format!("{at}: two skipif markers in a row"));
            }
            skip = Some((i + 1, reason.to_string()));
            i += 1;
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let expect = match words.as_slice() {
            ["statement", "ok"] => Expect::StatementOk,
            ["statement", "error", code] if code.len() == 5 => {
                Expect::StatementError(code.to_string())
            }
            ["query"] => Expect::Query { rowsort: false },
            ["query", "rowsort"] => Expect::Query { rowsort: true },
            _ => return Err(format!("{at}: unknown record header `{line}`")),
        };
        let header_line = i + 1;
        i += 1;
        let mut sql = String::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            sql.push_str(lines[i]);
            sql.push('\n');
            i += 1;
        }
        if sql.trim().is_empty() {
            return Err(format!("{at}: record without SQL"));
        }
        records.push(Record {
            line: header_line,
            expect,
            sql: sql.trim_end().to_string(),
            skip_borealis: skip.take().map(|(_, reason)| reason),
        });
    }
    if let Some((line, _)) = skip {
        return Err(format!(
            "{}:{line}: skipif marker without a record",
            path.display()
        ));
    }
    Ok(records)
}

/// Whether `outcome` meets the record's expectation, standing alone.
fn meets(expect: &Expect, outcome: &Outcome) -> bool {
    match expect {
        Expect::StatementOk | Expect::Query { .. } => outcome.is_ok(),
        Expect::StatementError(code) => outcome.code() == Some(code.as_str()),
    }
}

#[derive(Default)]
struct FileResult {
    cases: usize,
    passed: usize,
    marked: usize,
    /// Detailed reports of failures, in file order.
    failures: Vec<String>,
}

async fn run_file(path: &Path, pg: &PostgresCluster, index: usize) -> FileResult {
    let mut result = FileResult::default();
    let text = std::fs::read_to_string(path).expect("read .slt file");
    let records = match parse(path, &text) {
        Ok(r) => r,
        Err(e) => {
            result.failures.push(format!("parse error: {e}"));
            return result;
        }
    };
    let pg_client = pg.create_database(&format!("slt_{index}")).await;
    let borealis = BorealisServer::start().await;
    let borealis_client = match connect(borealis.addr, "postgres").await {
        Ok(c) => c,
        Err(e) => {
            result
                .failures
                .push(format!("cannot connect to Borealis: {e}"));
            return result;
        }
    };

    for record in &records {
        result.cases += 1;
        let at = format!("{}:{}", path.display(), record.line);
        let mut expected = run_simple(&pg_client, &record.sql).await;
        let mut actual = run_simple(&borealis_client, &record.sql).await;
        if let Expect::Query { rowsort: true } = record.expect {
            expected.sort_rows();
            actual.sort_rows();
        }
        if !meets(&record.expect, &expected) {
            result.failures.push(format!(
                "{at}: BROKEN SCRIPT: PostgreSQL does not meet `{:?}`\n  sql: {}\n  postgres:\n{expected}",
                record.expect, record.sql
            ));
            continue;
        }
        let agrees = meets(&record.expect, &actual) && expected.same_as(&actual);
        match (&record.skip_borealis, agrees) {
            (None, true) => result.passed += 1,
            (Some(_), false) => result.marked += 1,
            (None, false) => result.failures.push(format!(
                "{at}: MISMATCH\n  sql: {}\n  postgres (expected):\n{expected}\n  borealis (actual):\n{actual}",
                record.sql
            )),
            (Some(reason), true) => result.failures.push(format!(
                "{at}: STALE MARKER: Borealis now agrees with PostgreSQL; remove \
                 `skipif borealis # {reason}`\n  sql: {}",
                record.sql
            )),
        }
        if matches!(actual, Outcome::Broken(_) | Outcome::Timeout) {
            result.failures.push(format!(
                "{at}: Borealis connection unusable after this record; rest of the file skipped"
            ));
            break;
        }
    }
    result
}

fn slt_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("slt");
    let filter = std::env::var("SQLLOGIC_FILTER").unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read slt directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(&filter))
        })
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_files_agree_with_postgres() {
    let files = slt_files();
    assert!(!files.is_empty(), "no .slt files selected");
    let pg = PostgresCluster::start().await;
    let mut summary = String::new();
    let mut details = String::new();
    let (mut files_passed, mut cases, mut passed, mut marked) = (0, 0, 0, 0);
    for (index, path) in files.iter().enumerate() {
        let r = run_file(path, &pg, index).await;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let verdict = if r.failures.is_empty() {
            "ok"
        } else {
            "FAILED"
        };
        if r.failures.is_empty() {
            files_passed += 1;
        }
        let _ = writeln!(
            summary,
            "  {verdict:6} {name:28} {} cases: {} agree, {} marked skipif borealis, {} failing",
            r.cases,
            r.passed,
            r.marked,
            r.failures.len()
        );
        for f in &r.failures {
            let _ = writeln!(details, "{f}\n");
        }
        cases += r.cases;
        passed += r.passed;
        marked += r.marked;
    }
    println!("{details}");
    println!(
        "sqllogic: {files_passed}/{} files pass; {cases} cases: {passed} agree, {marked} known \
         differences (skipif borealis)\n{summary}",
        files.len()
    );
    assert_eq!(
        files_passed,
        files.len(),
        "some .slt files fail (details above):\n{summary}"
    );
}

#[test]
fn parser_rejects_malformed_scripts() {
    let p = Path::new("x.slt");
    assert!(parse(p, "statement ok\n").is_err(), "record without SQL");
    assert!(parse(p, "statment ok\nSELECT 1\n").is_err(), "bad header");
    assert!(
        parse(p, "skipif borealis\nstatement ok\nSELECT 1\n").is_err(),
        "marker without reason"
    );
    let records = parse(
        p,
        "# c\nskipif borealis # why\nquery rowsort\nSELECT 1\nUNION ALL SELECT 2\n\nstatement error 42P01\nSELECT * FROM nope\n",
    )
    .expect("valid script");
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].expect, Expect::Query { rowsort: true });
    assert_eq!(records[0].skip_borealis.as_deref(), Some("why"));
    assert_eq!(records[0].sql, "SELECT 1\nUNION ALL SELECT 2");
    assert_eq!(records[0].line, 3);
    assert_eq!(
        records[1].expect,
        Expect::StatementError("42P01".to_string())
    );
}
