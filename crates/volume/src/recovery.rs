//! Crash recovery of the volume, as pure functions over what storage nodes answered
//! (the tokio driver and the simulation gather the answers; this decides).
//!
//! ```text
//!  1. Hello from every node:     epochs, truncation histories, per-segment VDL hints
//!     start := max VDL hint      (a VDL some writer reached: complete at write quorum)
//!  2. Tail(pg, from = start) from a read quorum (3/6) of each PG's segments
//!     union of surviving records above start, over all PGs (LSNs are dense volume-wide)
//!     VCL := longest dense prefix start+1, start+2, ... present in the union
//!     VDL := highest CPL <= VCL (or start)
//!  3. install epoch E with history + (E, VDL) on a write quorum (4/6) of every PG:
//!     segments drop records above VDL from older epochs; stale writers are fenced
//!  4. re-replicate the union's records in (start, VDL] to all segments under E
//! ```
//!
//! Why the union of any 3 suffices: a record acknowledged at write quorum sits on 4
//! of 6 segments, so on at least one of any 3. Why the scan is bounded: the writer
//! never allocates beyond VDL + LAL and piggybacks its VDL on every append, so the
//! tail above `start` holds at most about LAL records whatever the volume's size.

use borealis_common::{Epoch, Geometry, Lsn, PgId};
use borealis_storage::node::merge_history;
use borealis_storage::proto::{record_survives, EpochRecord, Truncation};
use std::collections::BTreeMap;

use crate::quorum::Recovered;

/// One segment's answer to a Tail request.
#[derive(Debug, Clone)]
pub struct TailAnswer {
    pub pg: PgId,
    pub last_at_or_below: Lsn,
    pub records: Vec<EpochRecord>,
}

/// Computes VCL, VDL, per-PG tails and the records to re-replicate.
pub fn plan(
    geometry: Geometry,
    epoch: Epoch,
    start: Lsn,
    history: &[Truncation],
    answers: &[TailAnswer],
) -> (Lsn, Recovered) {
    // Union of surviving records above `start`; on a conflict the newer epoch wins
    // (it was written by a later recovery's re-replication).
    let mut union: BTreeMap<Lsn, (Epoch, PgId, bool, &[u8])> = BTreeMap::new();
    let mut pg_tails: BTreeMap<PgId, Lsn> = BTreeMap::new();
    for a in answers {
        if a.last_at_or_below > Lsn::ZERO {
            let t = pg_tails.entry(a.pg).or_default();
            *t = (*t).max(a.last_at_or_below);
        }
        for r in &a.records {
            let Ok(h) = borealis_redo::decode_header(&r.bytes) else {
                log::warn!(
                    "recovery: ignoring a corrupt record from a segment of {}",
                    a.pg
                );
                continue;
            };
            if h.lsn <= start
                || geometry.pg_of(h.page) != a.pg
                || !record_survives(history, r.epoch, h.lsn)
            {
                continue;
            }
            let newer = union.get(&h.lsn).is_none_or(|(e, ..)| *e < r.epoch);
            if newer {
                union.insert(h.lsn, (r.epoch, a.pg, h.is_cpl(), &r.bytes[..]));
            }
        }
    }
    let mut vcl = start;
    let mut vdl = start;
    while let Some((_, _, cpl, _)) = union.get(&vcl.next()) {
        vcl = vcl.next();
        if *cpl {
            vdl = vcl;
        }
    }
    let mut replicate = Vec::new();
    for (lsn, (_, pg, _, bytes)) in union.range(..=vdl) {
        let t = pg_tails.entry(*pg).or_default();
        *t = (*t).max(*lsn);
        replicate.push((*pg, *lsn, bytes.to_vec()));
    }
    // A PG's tail must not point above VDL (those records are being truncated).
    for t in pg_tails.values_mut() {
        if *t > vdl {
            *t = vdl;
        }
    }
    let history = merge_history(history, &[Truncation { epoch, vdl }]);
    (
        vcl,
        Recovered {
            start,
            vdl,
            pg_tails,
            replicate,
            history,
        },
    )
}
