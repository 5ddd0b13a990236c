//! MVCC behaviour with several sessions, checked against PostgreSQL 15: every
//! `crates/sqllogic/mvcc/*.mvcc` script is driven step by step, identically,
//! against a throwaway PostgreSQL cluster and an in-process Borealis server, and
//! the two transcripts (each step's rows or SQLSTATE, and whether a step blocked)
//! must be the same.
//!
//! Run: `cargo test -p borealis-sqllogic --test mvcc`
//! (`SQLLOGIC_FILTER=skew` runs only scripts whose name contains `skew`).
//!
//! # The `.mvcc` format
//!
//! One step per line; `#` starts a comment line; blank lines are ignored.
//!
//! ```text
//! setup: CREATE TABLE t (id int PRIMARY KEY, v int)   run before the sessions open
//! s1: BEGIN ISOLATION LEVEL REPEATABLE READ           run on session s1, wait for it
//! s2&: UPDATE t SET v = v + 1 WHERE id = 1            start on s2; it must BLOCK
//! s1: COMMIT
//! await s2                                            wait (bounded) for s2's statement
//! expect error 40001                                  the previous step's outcome
//! expect ok                                           ... succeeded (any rows)
//! ```
//!
//! Sessions are named `s1`, `s2`, ... and connect on first use. A `&` step is
//! started in a spawned task; after a short check ([`BLOCK_CHECK`]) it must still
//! be running (it waits for a lock), otherwise the step is recorded as "did not
//! block". Its outcome is taken by a later `await`, which waits at most
//! [`STEP_TIMEOUT`]. There are no other sleeps: every ordering
//! between sessions comes from waiting for a step's completion.
//!
//! `expect` lines state the intent of a script (the anomaly PostgreSQL prevents);
//! PostgreSQL must meet them, or the script is broken. Rows are never written in a
//! script: PostgreSQL's rows are the expected rows.
//!
//! A whole script that shows a known Borealis difference starts with
//! `skipif borealis # reason`; it still runs on both (PostgreSQL must still meet
//! its expectations) and a Borealis transcript that now agrees fails the run as a
//! stale marker.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use support::{connect, run_simple_within, BorealisServer, Outcome, PostgresCluster};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// How long a `&` step must stay unfinished to count as blocked.
const BLOCK_CHECK: Duration = Duration::from_millis(400);
/// Bound on every step and `await`: a lock wait that should have ended (after
/// the holder committed) fails the step with a timeout after this.
const STEP_TIMEOUT: Duration = Duration::from_secs(8);

#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Ok,
    Error(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Action {
    Setup(String),
    Run {
        session: String,
        sql: String,
        blocking: bool,
    },
    Await {
        session: String,
    },
}

#[derive(Clone, Debug)]
struct Step {
    line: usize,
    action: Action,
    expect: Option<Expect>,
}

#[derive(Debug)]
struct Script {
    skip_borealis: Option<String>,
    steps: Vec<Step>,
}

fn parse(path: &Path, text: &str) -> Result<Script, String> {
    let mut steps: Vec<Step> = Vec::new();
    let mut skip_borealis = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let at = format!("{}:{}", path.display(), i + 1);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("skipif borealis") {
            let reason = rest.trim().strip_prefix('#').map(str::trim).unwrap_or("");
            if reason.is_empty() || !steps.is_empty() {
                return Err(format!(
                    "{at}: `skipif borealis # reason` goes before the first step"
                ));
            }
            skip_borealis = Some(reason.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("expect ") {
            let expect = match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["ok"] => Expect::Ok,
                ["error", code] if code.len() == 5 => Expect::Error(code.to_string()),
                _ => return Err(format!("{at}: bad expect line `{line}`")),
            };
            match steps.last_mut() {
                Some(step) if step.expect.is_none() && !is_blocking(&step.action) => {
                    step.expect = Some(expect)
                }
                _ => {
                    return Err(format!(
                        "{at}: `expect` must follow a step that completes (not `&`), once"
                    ))
                }
            }
            continue;
        }
        if let Some(session) = line.strip_prefix("await ") {
            steps.push(Step {
                line: i + 1,
                action: Action::Await {
                    session: session.trim().to_string(),
                },
                expect: None,
            });
            continue;
        }
        let Some((who, sql)) = line.split_once(':') else {
            return Err(format!("{at}: expected `session: SQL`, got `{line}`"));
        };
        let sql = sql.trim().to_string();
        if sql.is_empty() {
            return Err(format!("{at}: step without SQL"));
        }
        let action = if who == "setup" {
            Action::Setup(sql)
        } else {
            let (session, blocking) = match who.strip_suffix('&') {
                Some(s) => (s, true),
                None => (who, false),
            };
            if !session.starts_with('s') || session.len() < 2 {
                return Err(format!("{at}: sessions are named s1, s2, ..."));
            }
            Action::Run {
                session: session.to_string(),
                sql,
                blocking,
            }
        };
        steps.push(Step {
            line: i + 1,
            action,
            expect: None,
        });
    }
    if steps.is_empty() {
        return Err(format!("{}: no steps", path.display()));
    }
    Ok(Script {
        skip_borealis,
        steps,
    })
}

fn is_blocking(action: &Action) -> bool {
    matches!(action, Action::Run { blocking: true, .. })
}

/// What one step produced on one server.
#[derive(Clone, Debug)]
enum StepResult {
    /// A step that completed (setup, plain step, or await).
    Done(Outcome),
    /// A `&` step: whether it was still running after [`BLOCK_CHECK`].
    Started { blocked: bool },
    /// The script was driven wrongly (e.g. a step on a session that is busy).
    ScriptError(String),
}

impl StepResult {
    fn same_as(&self, other: &StepResult) -> bool {
        match (self, other) {
            (StepResult::Done(a), StepResult::Done(b)) => a.same_as(b),
            (StepResult::Started { blocked: a }, StepResult::Started { blocked: b }) => a == b,
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            StepResult::Done(o) => o.to_string(),
            StepResult::Started { blocked: true } => "    blocked (as expected)".into(),
            StepResult::Started { blocked: false } => {
                "    DID NOT BLOCK (finished within the check)".into()
            }
            StepResult::ScriptError(e) => format!("    SCRIPT ERROR: {e}"),
        }
    }
}

fn meets(step: &Step, result: &StepResult) -> bool {
    match (&step.action, result) {
        (_, StepResult::ScriptError(_)) => false,
        (Action::Run { blocking: true, .. }, StepResult::Started { blocked }) => *blocked,
        (_, StepResult::Done(outcome)) => match &step.expect {
            None => true,
            Some(Expect::Ok) => outcome.is_ok(),
            Some(Expect::Error(code)) => outcome.code() == Some(code.as_str()),
        },
        _ => false,
    }
}

struct Session {
    client: Arc<Client>,
    pending: Option<JoinHandle<Outcome>>,
}

/// Drives the whole script against one server and returns one result per step.
async fn drive(script: &Script, addr: SocketAddr, dbname: &str) -> Vec<StepResult> {
    let mut results = Vec::new();
    let setup = match connect(addr, dbname).await {
        Ok(c) => c,
        Err(e) => return vec![StepResult::ScriptError(format!("connect: {e}"))],
    };
    let mut sessions: BTreeMap<String, Session> = BTreeMap::new();
    for step in &script.steps {
        let result = match &step.action {
            Action::Setup(sql) => {
                StepResult::Done(run_simple_within(&setup, sql, STEP_TIMEOUT).await)
            }
            Action::Run {
                session,
                sql,
                blocking,
            } => {
                if !sessions.contains_key(session) {
                    match connect(addr, dbname).await {
                        Ok(client) => {
                            sessions.insert(
                                session.clone(),
                                Session {
                                    client: Arc::new(client),
                                    pending: None,
                                },
                            );
                        }
                        Err(e) => {
                            results.push(StepResult::ScriptError(format!("connect: {e}")));
                            break;
                        }
                    }
                }
                let s = sessions.get_mut(session).expect("session just ensured");
                if s.pending.is_some() {
                    StepResult::ScriptError(format!("{session} still has a statement running"))
                } else if *blocking {
                    let client = s.client.clone();
                    let sql = sql.clone();
                    let mut handle = tokio::spawn(async move {
                        run_simple_within(&client, &sql, STEP_TIMEOUT).await
                    });
                    let blocked = match tokio::time::timeout(BLOCK_CHECK, &mut handle).await {
                        Err(_) => {
                            s.pending = Some(handle);
                            true
                        }
                        Ok(finished) => {
                            // It did not wait: keep its outcome for the `await`.
                            let outcome =
                                finished.unwrap_or_else(|e| Outcome::Broken(e.to_string()));
                            s.pending = Some(tokio::spawn(async move { outcome }));
                            false
                        }
                    };
                    StepResult::Started { blocked }
                } else {
                    StepResult::Done(run_simple_within(&s.client, sql, STEP_TIMEOUT).await)
                }
            }
            Action::Await { session } => {
                match sessions.get_mut(session).and_then(|s| s.pending.take()) {
                    None => StepResult::ScriptError(format!("nothing to await on {session}")),
                    Some(handle) => match tokio::time::timeout(STEP_TIMEOUT, handle).await {
                        Err(_) => StepResult::Done(Outcome::Timeout),
                        Ok(Err(e)) => StepResult::Done(Outcome::Broken(e.to_string())),
                        Ok(Ok(outcome)) => StepResult::Done(outcome),
                    },
                }
            }
        };
        results.push(result);
    }
    // A statement still running at the end is a script error; stop waiting for it.
    for (name, s) in sessions.iter_mut() {
        if let Some(handle) = s.pending.take() {
            handle.abort();
            results.push(StepResult::ScriptError(format!(
                "{name}: a `&` step was never awaited"
            )));
        }
    }
    results
}

struct ScriptReport {
    passed: bool,
    marked: bool,
    steps: usize,
    text: String,
}

async fn run_script(path: &Path, pg: &PostgresCluster, index: usize) -> ScriptReport {
    let mut report = ScriptReport {
        passed: false,
        marked: false,
        steps: 0,
        text: String::new(),
    };
    let text = std::fs::read_to_string(path).expect("read .mvcc script");
    let script = match parse(path, &text) {
        Ok(s) => s,
        Err(e) => {
            report.text = format!("parse error: {e}\n");
            return report;
        }
    };
    report.steps = script.steps.len();
    let dbname = format!("mvcc_{index}");
    drop(pg.create_database(&dbname).await);
    let expected = drive(&script, pg.addr, &dbname).await;
    let borealis = BorealisServer::start().await;
    let actual = drive(&script, borealis.addr, "postgres").await;
    drop(borealis);

    let mut broken = Vec::new();
    let mut differences = Vec::new();
    for (i, step) in script.steps.iter().enumerate() {
        let at = format!("{}:{}", path.display(), step.line);
        let e = expected
            .get(i)
            .cloned()
            .unwrap_or(StepResult::ScriptError("no result".into()));
        let a = actual
            .get(i)
            .cloned()
            .unwrap_or(StepResult::ScriptError("no result".into()));
        if !meets(step, &e) {
            broken.push(format!(
                "{at}: BROKEN SCRIPT: PostgreSQL does not meet {:?} / {:?}\n{}",
                step.action,
                step.expect,
                e.describe()
            ));
        } else if !(meets(step, &a) && e.same_as(&a)) {
            differences.push(format!(
                "{at}: MISMATCH at {:?}\n  postgres (expected):\n{}\n  borealis (actual):\n{}",
                step.action,
                e.describe(),
                a.describe()
            ));
        }
    }
    for extra in expected.iter().skip(script.steps.len()) {
        broken.push(format!(
            "{} (postgres): {}",
            path.display(),
            extra.describe()
        ));
    }
    for extra in actual.iter().skip(script.steps.len()) {
        differences.push(format!(
            "{} (borealis): {}",
            path.display(),
            extra.describe()
        ));
    }
    for b in &broken {
        let _ = writeln!(report.text, "{b}\n");
    }
    match &script.skip_borealis {
        None => {
            for d in &differences {
                let _ = writeln!(report.text, "{d}\n");
            }
            report.passed = broken.is_empty() && differences.is_empty();
        }
        Some(reason) => {
            report.marked = true;
            if differences.is_empty() {
                let _ = writeln!(
                    report.text,
                    "{}: STALE MARKER: Borealis now agrees; remove `skipif borealis # {reason}`\n",
                    path.display()
                );
            } else {
                // Show the known difference anyway, for the people fixing it.
                let _ = writeln!(
                    report.text,
                    "{}: known difference ({reason}), first mismatch:\n{}\n",
                    path.display(),
                    differences[0]
                );
            }
            report.passed = broken.is_empty() && !differences.is_empty();
        }
    }
    report
}

fn mvcc_scripts() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mvcc");
    let filter = std::env::var("SQLLOGIC_FILTER").unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read mvcc directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "mvcc"))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(&filter))
        })
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mvcc_scripts_agree_with_postgres() {
    let files = mvcc_scripts();
    assert!(!files.is_empty(), "no .mvcc scripts selected");
    let pg = PostgresCluster::start().await;
    let mut summary = String::new();
    let mut details = String::new();
    let mut passed = 0;
    for (index, path) in files.iter().enumerate() {
        let r = run_script(path, &pg, index).await;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let verdict = match (r.passed, r.marked) {
            (true, false) => "ok",
            (true, true) => "known",
            (false, _) => "FAILED",
        };
        if r.passed {
            passed += 1;
        }
        let _ = writeln!(summary, "  {verdict:6} {name:36} {} steps", r.steps);
        details.push_str(&r.text);
    }
    println!("{details}");
    println!(
        "mvcc: {passed}/{} scripts pass (\"known\" = marked skipif borealis, still differing)\n{summary}",
        files.len()
    );
    assert_eq!(
        passed,
        files.len(),
        "some MVCC scripts fail (details above):\n{summary}"
    );
}

#[test]
fn parser_rejects_malformed_scripts() {
    let p = Path::new("x.mvcc");
    assert!(parse(p, "expect ok\n").is_err(), "expect without step");
    assert!(
        parse(p, "s1&: UPDATE t SET v = 1\nexpect ok\n").is_err(),
        "expect after a blocking step"
    );
    assert!(parse(p, "x1: SELECT 1\n").is_err(), "bad session name");
    assert!(
        parse(p, "s1: SELECT 1\nskipif borealis # late\n").is_err(),
        "late marker"
    );
    let s = parse(
        p,
        "# c\nsetup: CREATE TABLE t (id int)\ns1: BEGIN\ns2&: UPDATE t SET id = 2\ns1: COMMIT\nawait s2\nexpect error 40001\n",
    )
    .expect("valid script");
    assert_eq!(s.steps.len(), 5);
    assert_eq!(
        s.steps[2].action,
        Action::Run {
            session: "s2".into(),
            sql: "UPDATE t SET id = 2".into(),
            blocking: true
        }
    );
    assert_eq!(s.steps[4].expect, Some(Expect::Error("40001".into())));
}
