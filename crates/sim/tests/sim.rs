//! Runs the deterministic simulation over a bounded number of seeds.
//! `SIM_SEEDS=1000 cargo test -p borealis-sim --release` runs more;
//! `SIM_SEED=1234` replays one.

use borealis_sim::{run_seed, SimConfig};

#[test]
fn storage_and_volume_survive_seeded_faults() {
    let cfg = SimConfig::default();
    let seeds: Vec<u64> = match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(one) => vec![one],
        None => {
            let n = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(24u64);
            (0..n).collect()
        }
    };
    let mut total = borealis_sim::SimStats::default();
    for seed in seeds {
        match run_seed(seed, &cfg) {
            Ok(s) => {
                total.appended_records += s.appended_records;
                total.recoveries += s.recoveries;
                total.node_crashes += s.node_crashes;
                total.partitions += s.partitions;
                total.reads_checked += s.reads_checked;
                total.dropped += s.dropped;
            }
            Err(e) => panic!("{e}\nreplay with: SIM_SEED={seed} cargo test -p borealis-sim"),
        }
    }
    eprintln!("simulation totals: {total:?}");
    assert!(total.reads_checked > 0 && total.recoveries > 0);
}
