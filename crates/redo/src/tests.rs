use super::*;
use borealis_common::{Lsn, PAGE_SIZE};

/// Tiny deterministic PRNG (splitmix64) so property tests replay from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max as u64 + 1) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn rec(lsn: u64, page: u64, op: Op) -> Record {
    Record {
        lsn: Lsn(lsn),
        prev_lsn: Lsn(lsn.saturating_sub(1)),
        page,
        flags: CPL_FLAG,
        op,
    }
}

fn all_ops() -> Vec<Op> {
    vec![
        Op::Init {
            kind: PageKind::BtreeLeaf as u16,
        },
        Op::InsertItem {
            slot: 0,
            data: b"hello".to_vec(),
        },
        Op::DeleteItem { slot: 3 },
        Op::ReplaceItem {
            slot: 1,
            data: vec![7; 300],
        },
        Op::TruncateItems { keep: 2 },
        Op::SetLinks {
            next: 42,
            aux: u64::MAX,
        },
        Op::InitWithItems {
            kind: 3,
            next: 1,
            aux: 2,
            items: vec![b"a".to_vec(), vec![], b"ccc".to_vec()],
        },
        Op::WriteSpecial {
            offset: 8,
            data: vec![1, 2, 3],
        },
        Op::StampLsn { offset: 0 },
        Op::WriteBody {
            offset: 100,
            data: vec![9; 16],
        },
        Op::StampLsnBody { offset: 8 },
        Op::Noop,
        Op::ShrinkItems {
            items: vec![
                ItemShrink {
                    slot: 0,
                    len: 9,
                    patch_at: 4,
                    patch: 2,
                },
                ItemShrink {
                    slot: 5,
                    len: u16::MAX,
                    patch_at: 0,
                    patch: 1,
                },
            ],
        },
    ]
}

#[test]
fn every_op_round_trips() {
    for (i, op) in all_ops().into_iter().enumerate() {
        let r = Record {
            lsn: Lsn(1000 + i as u64),
            prev_lsn: Lsn(7),
            page: 99,
            flags: (i % 2) as u8,
            op,
        };
        let mut buf = r.encode();
        buf.extend_from_slice(b"next record");
        let (back, len) = Record::decode(&buf).unwrap();
        assert_eq!(back, r);
        assert_eq!(len, buf.len() - b"next record".len());
        assert_eq!(decode_header(&buf).unwrap().lsn, r.lsn);
    }
}

#[test]
fn corruption_and_truncation_are_detected() {
    let r = rec(
        5,
        1,
        Op::InsertItem {
            slot: 0,
            data: vec![1; 50],
        },
    );
    let buf = r.encode();
    for cut in 0..buf.len() {
        assert!(Record::decode(&buf[..cut]).is_err(), "truncated at {cut}");
    }
    for at in 4..buf.len() {
        let mut bad = buf.clone();
        bad[at] ^= 0x10;
        assert!(
            matches!(Record::decode(&bad), Err(DecodeError::Crc { .. })),
            "flip at {at}"
        );
    }
    let mut huge = buf.clone();
    huge[0..4].copy_from_slice(&(u32::MAX).to_le_bytes());
    assert!(matches!(
        Record::decode(&huge),
        Err(DecodeError::BadLength(_))
    ));
}

#[test]
fn decode_never_panics_on_garbage() {
    let mut rng = Rng(1);
    for _ in 0..20_000 {
        let mut buf = rng.bytes(200);
        if buf.len() >= 8 && rng.below(2) == 0 {
            // Make length and CRC plausible so the op decoder itself gets exercised.
            let len = buf.len() as u32;
            buf[0..4].copy_from_slice(&len.to_le_bytes());
            let crc = crc32c::crc32c(&buf[8..]);
            buf[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        let _ = Record::decode(&buf);
    }
}

#[test]
fn apply_rejects_wrong_page_stale_and_bad_ops_without_change() {
    let mut p = Page::zeroed();
    apply(
        &mut p,
        1,
        &rec(
            1,
            1,
            Op::Init {
                kind: PageKind::BtreeLeaf as u16,
            },
        ),
    )
    .unwrap();
    apply(
        &mut p,
        1,
        &rec(
            2,
            1,
            Op::InsertItem {
                slot: 0,
                data: b"x".to_vec(),
            },
        ),
    )
    .unwrap();
    let before = p.clone();
    let cases = vec![
        (rec(3, 2, Op::Noop), "wrong page"),
        (rec(2, 1, Op::Noop), "stale"),
        (
            rec(
                3,
                1,
                Op::InsertItem {
                    slot: 5,
                    data: b"y".to_vec(),
                },
            ),
            "slot past end",
        ),
        (rec(3, 1, Op::DeleteItem { slot: 1 }), "delete past end"),
        (
            rec(
                3,
                1,
                Op::ReplaceItem {
                    slot: 9,
                    data: vec![],
                },
            ),
            "replace past end",
        ),
        (
            rec(
                3,
                1,
                Op::InsertItem {
                    slot: 0,
                    data: vec![0; PAGE_SIZE],
                },
            ),
            "too big",
        ),
        (
            rec(
                3,
                1,
                Op::WriteBody {
                    offset: 0,
                    data: vec![1],
                },
            ),
            "body on slotted",
        ),
        (
            rec(
                3,
                1,
                Op::WriteSpecial {
                    offset: 30,
                    data: vec![1; 4],
                },
            ),
            "special overflow",
        ),
        (rec(3, 1, Op::Init { kind: 77 }), "bad kind"),
        (
            rec(3, 1, Op::TruncateItems { keep: 4 }),
            "truncate past end",
        ),
    ];
    for (r, what) in cases {
        assert!(apply(&mut p, 1, &r).is_err(), "{what} should fail");
        assert_eq!(p, before, "{what} changed the page");
    }
    let mut raw = Page::zeroed();
    assert!(apply(
        &mut raw,
        1,
        &rec(
            1,
            1,
            Op::InsertItem {
                slot: 0,
                data: vec![]
            }
        )
    )
    .is_err());
}

#[test]
fn stamp_lsn_writes_the_records_own_lsn() {
    let mut p = Page::zeroed();
    apply(
        &mut p,
        3,
        &rec(
            10,
            3,
            Op::Init {
                kind: PageKind::Raw as u16,
            },
        ),
    )
    .unwrap();
    apply(&mut p, 3, &rec(11, 3, Op::StampLsnBody { offset: 16 })).unwrap();
    apply(&mut p, 3, &rec(12, 3, Op::StampLsn { offset: 8 })).unwrap();
    assert_eq!(&p.body()[16..24], &11u64.to_le_bytes());
    assert_eq!(&p.special()[8..16], &12u64.to_le_bytes());
    assert_eq!(p.lsn(), Lsn(12));
}

/// Random item operations against a model (a Vec of items); the page must agree
/// with the model after every step and survive a byte round trip.
#[test]
fn slotted_page_matches_model() {
    let seeds: u64 = std::env::var("REDO_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    for seed in 0..seeds {
        let mut rng = Rng(seed);
        let mut page = Page::zeroed();
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut lsn = 1;
        apply(
            &mut page,
            0,
            &rec(
                lsn,
                0,
                Op::Init {
                    kind: PageKind::BtreeLeaf as u16,
                },
            ),
        )
        .unwrap();
        for step in 0..2000 {
            lsn += 1;
            let n = model.len() as u64;
            let op = match rng.below(11) {
                0..=4 => Op::InsertItem {
                    slot: rng.below(n + 1) as u16,
                    data: rng.bytes(300),
                },
                5 | 6 if n > 0 => Op::DeleteItem {
                    slot: rng.below(n) as u16,
                },
                7 | 8 if n > 0 => Op::ReplaceItem {
                    slot: rng.below(n) as u16,
                    data: rng.bytes(400),
                },
                9 if n > 0 => Op::TruncateItems {
                    keep: rng.below(n + 1) as u16,
                },
                10 => {
                    let mut items = Vec::new();
                    for (slot, item) in model.iter().enumerate() {
                        if item.len() >= 2 && rng.below(3) == 0 {
                            let len = 2 + rng.below(item.len() as u64 - 1) as u16;
                            items.push(ItemShrink {
                                slot: slot as u16,
                                len,
                                patch_at: rng.below(len as u64 - 1) as u16,
                                patch: rng.next() as u16,
                            });
                        }
                    }
                    Op::ShrinkItems { items }
                }
                _ => Op::Noop,
            };
            let fits = match &op {
                Op::InsertItem { data, .. } => page.fits_insert(data.len()),
                Op::ReplaceItem { slot, data } => page.fits_replace(*slot, data.len()),
                _ => true,
            };
            let result = apply(&mut page, 0, &rec(lsn, 0, op.clone()));
            assert_eq!(
                result.is_ok(),
                fits,
                "seed {seed} step {step}: {op:?} -> {result:?}"
            );
            if result.is_ok() {
                match op {
                    Op::InsertItem { slot, data } => model.insert(slot as usize, data),
                    Op::DeleteItem { slot } => {
                        model.remove(slot as usize);
                    }
                    Op::ReplaceItem { slot, data } => model[slot as usize] = data,
                    Op::TruncateItems { keep } => model.truncate(keep as usize),
                    Op::ShrinkItems { items } => {
                        for s in items {
                            let item = &mut model[s.slot as usize];
                            item.truncate(s.len as usize);
                            let at = s.patch_at as usize;
                            item[at..at + 2].copy_from_slice(&s.patch.to_le_bytes());
                        }
                    }
                    _ => {}
                }
            }
            page.check()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            let items: Vec<Vec<u8>> = page.items().map(|i| i.to_vec()).collect();
            assert_eq!(items, model, "seed {seed} step {step}");
        }
        let copy = Page::from_bytes(page.as_bytes()).unwrap();
        assert_eq!(copy, page);
    }
}

#[test]
fn a_bad_shrink_is_refused_and_changes_nothing() {
    let mut page = Page::zeroed();
    let init = Op::Init {
        kind: PageKind::BtreeLeaf as u16,
    };
    apply(&mut page, 0, &rec(1, 0, init)).unwrap();
    for (i, data) in [vec![1u8; 10], vec![2u8; 4]].into_iter().enumerate() {
        let op = Op::InsertItem {
            slot: i as u16,
            data,
        };
        apply(&mut page, 0, &rec(2 + i as u64, 0, op)).unwrap();
    }
    let before = page.clone();
    let shrink = |slot, len, patch_at| ItemShrink {
        slot,
        len,
        patch_at,
        patch: 7,
    };
    let bad = [
        vec![shrink(0, 11, 0)],                 // longer than the item
        vec![shrink(0, 6, 5)],                  // patch past the kept bytes
        vec![shrink(2, 2, 0)],                  // no such slot
        vec![shrink(1, 2, 0), shrink(0, 4, 0)], // slots out of order
        vec![shrink(0, 4, 0), shrink(0, 2, 0)], // the same slot twice
        vec![shrink(0, 4, 0), shrink(1, 9, 0)], // a good one, then a bad one
    ];
    for (i, items) in bad.into_iter().enumerate() {
        let r = apply(
            &mut page,
            0,
            &rec(10 + i as u64, 0, Op::ShrinkItems { items }),
        );
        assert!(r.is_err(), "case {i} applied");
        assert_eq!(page, before, "case {i} changed the page");
    }
    let good = Op::ShrinkItems {
        items: vec![shrink(0, 4, 2), shrink(1, 2, 0)],
    };
    apply(&mut page, 0, &rec(20, 0, good)).unwrap();
    let items: Vec<Vec<u8>> = page.items().map(|i| i.to_vec()).collect();
    assert_eq!(items, vec![vec![1, 1, 7, 0], vec![7, 0]]);
}
