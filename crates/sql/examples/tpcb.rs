//! pgbench's TPC-B transaction, run through the session API as `pgbench -M
//! prepared` runs it through the protocol (every statement prepared once, then
//! Execute + Sync per statement), over the in-memory volume, on one thread.
//!
//! It exists to count the writer's CPU per transaction deterministically: wall
//! time on a shared 2-core machine drifts by ±20%, instruction counts do not.
//!
//! ```text
//! cargo build --release --example tpcb -p borealis-sql
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='tpcb::measured' \
//!     target/release/examples/tpcb 20000 2000
//! ```
//!
//! and divide the reported instruction count ("Collected") by the number of
//! transactions (the second argument). Without valgrind it prints µs/txn.
//! Arguments: accounts (100000 = pgbench scale 1), transactions, seed.

use borealis_sql::{Database, Datum, Prepared, Session, Type};
use borealis_volume::{Volume, VolumeConfig};
use std::time::Instant;

/// The allocator of the `borealis` binary, so that allocations cost what they
/// cost in the writer.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// pgbench's script for the built-in "tpcb-like" transaction.
const SCRIPT: [&str; 7] = [
    "BEGIN",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
    "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
     VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
    "END",
];

/// A small deterministic PRNG (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

async fn ok(s: &mut Session, sql: &str) {
    for r in s.query(sql).await {
        if let Err(e) = r {
            panic!("{sql}: {e}");
        }
    }
}

/// Creates and fills the tables as `pgbench -i` does (filler columns blank).
async fn load(s: &mut Session, accounts: u64) {
    let branches = accounts.div_ceil(100_000).max(1);
    ok(s, "CREATE TABLE pgbench_branches (bid int NOT NULL PRIMARY KEY, bbalance int, filler char(88))").await;
    ok(s, "CREATE TABLE pgbench_tellers (tid int NOT NULL PRIMARY KEY, bid int, tbalance int, filler char(84))").await;
    ok(s, "CREATE TABLE pgbench_accounts (aid int NOT NULL PRIMARY KEY, bid int, abalance int, filler char(84))").await;
    ok(s, "CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22))").await;
    ok(
        s,
        &format!(
            "INSERT INTO pgbench_branches SELECT g, 0, '' FROM generate_series(1, {branches}) g"
        ),
    )
    .await;
    ok(
        s,
        &format!(
            "INSERT INTO pgbench_tellers SELECT g, (g - 1) / 10 + 1, 0, '' FROM generate_series(1, {}) g",
            branches * 10
        ),
    )
    .await;
    ok(
        s,
        &format!(
            "INSERT INTO pgbench_accounts SELECT g, (g - 1) / 100000 + 1, 0, '' FROM generate_series(1, {accounts}) g"
        ),
    )
    .await;
}

struct Tpcb {
    statements: Vec<Prepared>,
    accounts: u64,
    branches: u64,
    rng: Rng,
}

impl Tpcb {
    /// One transaction: each statement as Bind/Execute/Sync.
    async fn transaction(&mut self, s: &mut Session) {
        let aid = Datum::Int4(1 + self.rng.below(self.accounts) as i32);
        let bid = Datum::Int4(1 + self.rng.below(self.branches) as i32);
        let tid = Datum::Int4(1 + self.rng.below(self.branches * 10) as i32);
        let delta = Datum::Int4(self.rng.below(10_001) as i32 - 5000);
        let params: [Vec<Datum>; 7] = [
            vec![],
            vec![delta.clone(), aid.clone()],
            vec![aid.clone()],
            vec![delta.clone(), tid.clone()],
            vec![delta.clone(), bid.clone()],
            vec![tid, bid, aid, delta],
            vec![],
        ];
        for (p, params) in self.statements.iter().zip(params) {
            if let Err(e) = s.execute(p, params).await {
                panic!("{}: {e}", p.sql);
            }
            s.sync().await.expect("sync");
        }
    }
}

/// The measured part, a function of its own so that callgrind can count only it.
#[inline(never)]
fn measured(rt: &tokio::runtime::Runtime, s: &mut Session, bench: &mut Tpcb, txns: u64) {
    rt.block_on(async {
        for _ in 0..txns {
            bench.transaction(s).await;
        }
    });
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: u64| {
        args.next()
            .map(|a| a.parse().expect("numeric argument"))
            .unwrap_or(default)
    };
    let (accounts, txns, seed) = (arg(100_000), arg(2_000), arg(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = rt.block_on(async {
        Database::open(Volume::in_memory(VolumeConfig::default()))
            .await
            .expect("open")
    });
    let mut s = db.session("postgres", "postgres");
    let mut bench = rt.block_on(async {
        load(&mut s, accounts).await;
        let mut statements = Vec::new();
        for sql in SCRIPT {
            // pgbench sends no parameter types: the server infers them.
            let types: Vec<Type> = vec![];
            statements.push(s.prepare(sql, &types).await.expect("prepare"));
        }
        Tpcb {
            statements,
            accounts,
            branches: accounts.div_ceil(100_000).max(1),
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ seed),
        }
    });
    // Warm up: every plan bound, the caches hold the pages the run touches most.
    warm_up(&rt, &mut s, &mut bench, txns / 10 + 1);
    let start = Instant::now();
    measured(&rt, &mut s, &mut bench, txns);
    let elapsed = start.elapsed();
    println!(
        "{txns} transactions, {:.1} µs/txn",
        elapsed.as_secs_f64() * 1e6 / txns as f64
    );
    // The run must have done its work: every delta lands in all three balances.
    rt.block_on(async {
        for sql in [
            "SELECT count(*) FROM pgbench_history",
            "SELECT sum(abalance) FROM pgbench_accounts",
            "SELECT sum(tbalance) FROM pgbench_tellers",
            "SELECT sum(bbalance) FROM pgbench_branches",
            "SELECT sum(delta) FROM pgbench_history",
        ] {
            for r in s.query(sql).await {
                match r {
                    Ok(borealis_sql::ExecResult::Rows { rows, .. }) => {
                        println!("{sql}: {:?}", rows[0][0].to_text())
                    }
                    other => panic!("{sql}: {other:?}"),
                }
            }
        }
    });
}

#[inline(never)]
fn warm_up(rt: &tokio::runtime::Runtime, s: &mut Session, bench: &mut Tpcb, txns: u64) {
    rt.block_on(async {
        for _ in 0..txns {
            bench.transaction(s).await;
        }
    });
}
