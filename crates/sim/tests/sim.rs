//! Runs the deterministic simulation over a bounded number of seeds.
//! `SIM_SEEDS=1000 cargo test -p borealis-sim --release` runs more;
//! `SIM_SEED=1234` replays one. The segment-replacement checks run a harsher
//! schedule too: `SIM_HARSH_SEEDS=500` seeds with the correct transitional quorum
//! (default 40), and up to `SIM_BROKEN_SEEDS` (default 300) with the broken one,
//! which must fail.

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
                total.replacements_started += s.replacements_started;
                total.replacements_completed += s.replacements_completed;
                total.replacements_under_partition += s.replacements_under_partition;
                total.snapshots_installed += s.snapshots_installed;
                total.images_evicted += s.images_evicted;
                total.image_reads += s.image_reads;
                total.image_checkpoints += s.image_checkpoints;
            }
            Err(e) => panic!("{e}\nreplay with: SIM_SEED={seed} cargo test -p borealis-sim"),
        }
    }
    eprintln!("simulation totals: {total:?}");
    assert!(total.reads_checked > 0 && total.recoveries > 0);
    // The nodes' small image budget (see `sim_limits`) must have sent reads and
    // folds to images read back from the logs, or the run above checked nothing
    // of the bounded page store.
    assert!(
        total.images_evicted > 0 && total.image_reads > 0 && total.image_checkpoints > 0,
        "{total:?}"
    );
}

/// Segment replacements are exercised by the run above; this makes sure enough of
/// them (also during AZ partitions) complete over the default seeds, so a change
/// that quietly stopped them would not pass unnoticed.
#[test]
fn membership_changes_complete_under_faults() {
    let cfg = SimConfig::default();
    let mut total = borealis_sim::SimStats::default();
    for seed in 0..24u64 {
        let s = run_seed(seed, &cfg).unwrap_or_else(|e| panic!("{e}"));
        total.replacements_started += s.replacements_started;
        total.replacements_completed += s.replacements_completed;
        total.replacements_under_partition += s.replacements_under_partition;
    }
    eprintln!("membership totals: {total:?}");
    assert!(total.replacements_completed >= 10, "{total:?}");
    assert!(total.replacements_under_partition >= 1, "{total:?}");
}

/// A deliberately broken transition (write quorum counted on the new six only)
/// must be caught: some seed loses an acknowledged record, moves VDL backwards or
/// serves a wrong page; the same harsh schedule with the correct rule passes.
#[test]
fn a_transition_counting_only_the_new_quorum_fails_at_some_seed() {
    use borealis_volume::quorum::TransitionQuorum;
    // More replacements, flakier victims, more crashes and writer recoveries than
    // the default run, so that the window the broken rule opens is met often.
    let harsh = |rule| SimConfig {
        transition_quorum: rule,
        replace_per_mille: 50,
        max_replacements: 12,
        writer_crash_per_mille: 20,
        crash_per_mille: 15,
        victim_drop_per_mille: 500,
        ..SimConfig::default()
    };
    let n: u64 = std::env::var("SIM_BROKEN_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let harsh_seeds: u64 = std::env::var("SIM_HARSH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let correct = harsh(TransitionQuorum::BothSets);
    for seed in 0..harsh_seeds {
        if let Err(e) = run_seed(seed, &correct) {
            panic!("{e}\nreplay with: SIM_SEED={seed} (harsh schedule, both quorums)");
        }
    }
    let broken = harsh(TransitionQuorum::NewSetOnly);
    let failure = (0..n).find_map(|seed| run_seed(seed, &broken).err());
    match failure {
        Some(e) => eprintln!("the broken transition was caught: {e}"),
        None => panic!("{n} seeds ran a broken transition quorum without a failure"),
    }
}
