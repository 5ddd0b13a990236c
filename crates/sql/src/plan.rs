//! Access-path choice for single-table reads: which part of a WHERE clause bounds
//! the clustered primary-key B+tree or a secondary index, and how the chosen plan
//! reads in EXPLAIN.
//!
//! The choice is by shape first: the clustered key when
//! the WHERE clause fixes all of it; otherwise the access path whose leading
//! columns the WHERE clause bounds best (equalities count more than a range; ties
//! go to the clustered key, whose scan needs no second lookup). An index scan
//! fetches each row through its clustered key, and the whole WHERE clause is
//! re-checked on the visible version, so a bound only has to be a superset. The
//! one exception is a clustered-key range that is provably the whole WHERE clause
//! (`KeyPlan::exact`: integer key columns, every conjunct used, bounds converted
//! without loss), where the check could only ever pass.
//!
//! Then by statistics, once the bounds are known (`prefer_seq_scan`): when ANALYZE's
//! histogram of a secondary index puts more than `SEQ_SCAN_FRACTION` of the rows in
//! the range, a scan of the whole clustered tree replaces the index scan, since the
//! index scan reads every matching row a second time through its clustered key.

use crate::expr::{cast, compare, eval, BinOp, EvalCtx, Expr};
use crate::SqlError;
use borealis_engine::catalog::TableDef;
use borealis_engine::index::prefix_end;
use borealis_engine::row::{encode_key, prefix_successor};
use borealis_engine::types::Datum;
use std::cmp::Ordering;
use std::ops::Bound;

/// A key range over the clustered tree, still symbolic (parameters unresolved).
#[derive(Debug, Clone, Default)]
pub struct KeyPlan {
    /// Equalities on a prefix of the primary key, in key order.
    pub eq: Vec<Expr>,
    /// Range bounds on the key column after the equality prefix.
    pub lower: Option<(Expr, bool)>,
    pub upper: Option<(Expr, bool)>,
    /// The secondary index to scan (position in `TableDef::indexes`); None = the
    /// clustered tree.
    pub index: Option<usize>,
    /// The statement's ORDER BY is the scan's order, so a LIMIT can stop the scan.
    pub ordered: bool,
    /// The WHERE clause says no more than these bounds: every conjunct is one a bound
    /// came from, on integer columns of the clustered key. When the bounds resolve
    /// exactly ([`Resolved::Range`] or [`Resolved::Point`]) the scan returns exactly
    /// the matching rows and the filter need not be evaluated per row. Never set for
    /// a secondary index: its entries can be older than the row they lead to.
    pub exact: bool,
}

impl KeyPlan {
    pub fn is_full_scan(&self) -> bool {
        self.eq.is_empty() && self.lower.is_none() && self.upper.is_none()
    }

    /// Whether EXPLAIN shows a sequential scan (the clustered tree, unbounded).
    pub fn is_seq_scan(&self) -> bool {
        self.index.is_none() && self.is_full_scan()
    }

    /// The columns of the access path, in key order.
    pub fn columns<'a>(&self, table: &'a TableDef) -> &'a [usize] {
        match self.index.and_then(|i| table.indexes.get(i)) {
            Some(index) => &index.columns,
            None => &table.pk,
        }
    }

    /// The index EXPLAIN names.
    pub fn index_name(&self, table: &TableDef) -> String {
        match self.index.and_then(|i| table.indexes.get(i)) {
            Some(index) => index.name.clone(),
            None => table
                .pk_name
                .clone()
                .unwrap_or_else(|| format!("{}_pkey", table.name)),
        }
    }

    pub fn describe(&self, table: &TableDef) -> String {
        let cols = self.columns(table);
        let col = |i: usize| {
            cols.get(i)
                .and_then(|&c| table.columns.get(c))
                .map(|c| c.name.clone())
                .unwrap_or_default()
        };
        let mut parts: Vec<String> = (0..self.eq.len())
            .map(|i| format!("{} = $", col(i)))
            .collect();
        if let Some((_, inc)) = &self.lower {
            parts.push(format!(
                "{} {} $",
                col(self.eq.len()),
                if *inc { ">=" } else { ">" }
            ));
        }
        if let Some((_, inc)) = &self.upper {
            parts.push(format!(
                "{} {} $",
                col(self.eq.len()),
                if *inc { "<=" } else { "<" }
            ));
        }
        parts.join(" AND ")
    }
}

fn is_constant(e: &Expr) -> bool {
    match e {
        // A scalar subquery is computed before the statement's rows are read (a
        // correlated one, wrapped in `PerRow`, is not constant), and an outer
        // column is fixed for each run of the subquery that reads it.
        Expr::Const(..) | Expr::Param(_) | Expr::ScalarSub(..) | Expr::Outer(..) => true,
        Expr::Cast(x, _, _) => is_constant(x),
        Expr::Neg(x, _) => is_constant(x),
        Expr::Binary(op, l, r, _) => {
            !matches!(op, BinOp::And | BinOp::Or) && is_constant(l) && is_constant(r)
        }
        _ => false,
    }
}

fn conjuncts<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::Binary(BinOp::And, l, r, _) => {
            conjuncts(l, out);
            conjuncts(r, out);
        }
        other => out.push(other),
    }
}

/// Share of a table's rows past which reading the whole clustered tree in key order
/// beats an index scan's lookup per row (PostgreSQL's planner switches to a
/// sequential scan at a similar point for uncorrelated indexes).
pub const SEQ_SCAN_FRACTION: f64 = 0.3;

/// Whether ANALYZE's statistics say the secondary-index range `lo..hi` of `key`
/// covers more than `SEQ_SCAN_FRACTION` of the table (see the module comment).
/// False without statistics, for the clustered key, and for a scan in ORDER BY
/// order (a LIMIT may stop it early).
pub fn prefer_seq_scan(
    table: &TableDef,
    key: &KeyPlan,
    lo: &Bound<Vec<u8>>,
    hi: &Bound<Vec<u8>>,
) -> bool {
    let (Some(index), Some(stats)) = (key.index.and_then(|i| table.indexes.get(i)), &table.stats)
    else {
        return false;
    };
    if key.ordered {
        return false;
    }
    let Some(h) = stats.histograms.iter().find(|h| h.index == index.oid) else {
        return false;
    };
    let bounds = &h.bounds;
    if bounds.len() < 2 {
        return false;
    }
    let above_lo = |b: &[u8]| match lo {
        Bound::Unbounded => true,
        // A bound is a key cut short: compare it with as much of `lo`.
        Bound::Included(l) | Bound::Excluded(l) => b >= &l[..b.len().min(l.len())],
    };
    let below_hi = |b: &[u8]| match hi {
        Bound::Unbounded => true,
        Bound::Included(h) | Bound::Excluded(h) => b <= h.as_slice(),
    };
    // Buckets (between neighbouring bounds) that overlap the range.
    let overlapping = bounds
        .windows(2)
        .filter(|w| above_lo(&w[1]) && below_hi(&w[0]))
        .count();
    overlapping as f64 / (bounds.len() - 1) as f64 > SEQ_SCAN_FRACTION
}

/// Chooses the access path for `filter` (columns are positions in the table).
pub fn key_plan(table: &TableDef, filter: Option<&Expr>) -> KeyPlan {
    let Some(filter) = filter else {
        return KeyPlan::default();
    };
    let mut cs = Vec::new();
    conjuncts(filter, &mut cs);
    let (mut primary, used) = bounds(&table.pk, &cs);
    primary.exact = exact_bounds(table, &primary, &used, cs.len());
    if !table.pk.is_empty() && primary.eq.len() == table.pk.len() {
        return primary;
    }
    let score = |p: &KeyPlan| p.eq.len() * 2 + usize::from(p.lower.is_some() || p.upper.is_some());
    let mut best = primary;
    for (i, index) in table.indexes.iter().enumerate() {
        if !index.is_built() {
            continue;
        }
        let (mut candidate, _) = bounds(&index.columns, &cs);
        if score(&candidate) > score(&best) {
            candidate.index = Some(i);
            best = candidate;
        }
    }
    best
}

/// Uses an index (or the clustered key) whose order is the statement's ORDER BY
/// (`order`: table columns, all ascending with NULLs last), so that a LIMIT stops
/// the scan early. Keeps a bounded plan if its own order fits.
pub fn order_plan(table: &TableDef, plan: KeyPlan, order: &[usize]) -> KeyPlan {
    // Index entries are ordered by the indexed columns, then the clustered key.
    let order_of = |p: &KeyPlan| -> Vec<usize> {
        let mut cols = p.columns(table).to_vec();
        if p.index.is_some() {
            cols.extend(&table.pk);
        }
        cols
    };
    let fits = |p: &KeyPlan| {
        let cols = order_of(p);
        let after_eq = cols.get(p.eq.len()..).unwrap_or(&[]);
        cols.starts_with(order) || after_eq.starts_with(order)
    };
    if order.is_empty() {
        return plan;
    }
    if fits(&plan) {
        return KeyPlan {
            ordered: true,
            ..plan
        };
    }
    if !plan.is_full_scan() {
        return plan;
    }
    for (i, index) in table.indexes.iter().enumerate() {
        let candidate = KeyPlan {
            index: Some(i),
            ordered: true,
            ..KeyPlan::default()
        };
        if index.is_built() && fits(&candidate) {
            return candidate;
        }
    }
    plan
}

/// Whether the clustered-key `plan` (from [`bounds`], which used the conjuncts at
/// positions `used`) is all of a WHERE clause of `conjuncts` conjuncts, on integer
/// key columns only: there an encoded key orders and compares exactly as the
/// column's values do, and [`key_value`] refuses any bound it cannot convert
/// exactly (the plan then resolves to `Full` and the filter runs after all).
fn exact_bounds(table: &TableDef, plan: &KeyPlan, used: &[usize], conjuncts: usize) -> bool {
    let mut used = used.to_vec();
    used.sort_unstable();
    used.dedup();
    let bounded = plan.eq.len() + usize::from(plan.lower.is_some() || plan.upper.is_some());
    let integer = |c: &usize| {
        table.columns.get(*c).is_some_and(|col| {
            matches!(
                col.ty(),
                borealis_engine::types::Type::Int2
                    | borealis_engine::types::Type::Int4
                    | borealis_engine::types::Type::Int8
            )
        })
    };
    plan.index.is_none()
        && bounded > 0
        && used.len() == conjuncts
        && table
            .pk
            .get(..bounded)
            .is_some_and(|cols| cols.iter().all(integer))
}

/// Bounds on a prefix of `key_columns` found among the conjuncts, and the positions
/// of the conjuncts the bounds came from.
fn bounds(key_columns: &[usize], cs: &[&Expr]) -> (KeyPlan, Vec<usize>) {
    let mut plan = KeyPlan::default();
    let mut used = Vec::new();
    if key_columns.is_empty() {
        return (plan, used);
    }
    let column_cmp = |c: &Expr, col: usize| -> Option<(BinOp, Expr)> {
        match c {
            Expr::Binary(op, l, r, _) => match (&**l, &**r) {
                (Expr::Column(i, _), other) if *i == col && is_constant(other) => {
                    Some((*op, other.clone()))
                }
                (other, Expr::Column(i, _)) if *i == col && is_constant(other) => {
                    let flipped = match op {
                        BinOp::Lt => BinOp::Gt,
                        BinOp::LtEq => BinOp::GtEq,
                        BinOp::Gt => BinOp::Lt,
                        BinOp::GtEq => BinOp::LtEq,
                        o => *o,
                    };
                    Some((flipped, other.clone()))
                }
                _ => None,
            },
            _ => None,
        }
    };
    for &col in key_columns {
        let eq = cs
            .iter()
            .enumerate()
            .find_map(|(n, c)| match column_cmp(c, col) {
                Some((BinOp::Eq, e)) => Some((n, e)),
                _ => None,
            });
        match eq {
            Some((n, e)) => {
                plan.eq.push(e);
                used.push(n);
            }
            None => {
                // Where the final lower and upper bounds came from (a later
                // conjunct on the same side replaces an earlier one).
                let (mut lower_from, mut upper_from) = (None, None);
                for (n, c) in cs.iter().enumerate() {
                    if let Expr::Between(x, lo, hi, false) = c {
                        if matches!(&**x, Expr::Column(i, _) if *i == col)
                            && is_constant(lo)
                            && is_constant(hi)
                        {
                            plan.lower = Some(((**lo).clone(), true));
                            plan.upper = Some(((**hi).clone(), true));
                            (lower_from, upper_from) = (Some(n), Some(n));
                        }
                    }
                    match column_cmp(c, col) {
                        Some((op @ (BinOp::Gt | BinOp::GtEq), e)) => {
                            plan.lower = Some((e, op == BinOp::GtEq));
                            lower_from = Some(n);
                        }
                        Some((op @ (BinOp::Lt | BinOp::LtEq), e)) => {
                            plan.upper = Some((e, op == BinOp::LtEq));
                            upper_from = Some(n);
                        }
                        _ => {}
                    }
                }
                // A BETWEEN counts only if it gave both bounds: when a later
                // conjunct replaced one side, the BETWEEN's own side is not in the
                // range and the filter must still check it.
                if lower_from == upper_from {
                    used.extend(lower_from);
                } else {
                    let one_sided = |n: &usize| !matches!(cs[*n], Expr::Between(..));
                    used.extend(lower_from.filter(one_sided));
                    used.extend(upper_from.filter(one_sided));
                }
                break;
            }
        }
    }
    (plan, used)
}

/// Evaluates a bound value and converts it to the key column's type, refusing
/// conversions that change the value (so the key range never excludes a match).
fn key_value(v: Datum, table: &TableDef, column: usize) -> Result<Option<Datum>, SqlError> {
    if v.is_null() {
        return Ok(None);
    }
    let Some(col) = table.columns.get(column) else {
        return Ok(None);
    };
    let Ok(converted) = cast(v.clone(), col.ty(), -1) else {
        return Ok(None);
    };
    let same = match (&v, &converted) {
        (Datum::Text(a), Datum::Text(b)) => a == b,
        (Datum::Text(_), _) => true,
        (a, b) => compare(a, b) == Some(Ordering::Equal),
    };
    Ok(if same { Some(converted) } else { None })
}

/// Resolved key bounds, or None when the range is provably empty / not usable.
pub enum Resolved {
    Range(Bound<Vec<u8>>, Bound<Vec<u8>>),
    /// Exactly the one clustered key (the whole primary key is fixed).
    Point(Vec<u8>),
    Empty,
    /// A bound could not be converted exactly: scan everything, filter decides.
    Full,
}

/// Resolves the plan's bounds to key bytes. Index entry keys continue after the
/// indexed columns (with more columns, which may be NULL = 0xff, and the clustered
/// key), so their prefix ranges end at [`prefix_end`]; clustered keys of a prefix
/// are continued only by non-NULL key columns, which `prefix_successor` covers.
pub fn resolve(plan: &KeyPlan, table: &TableDef, ctx: &EvalCtx<'_>) -> Result<Resolved, SqlError> {
    if plan.is_full_scan() {
        return Ok(Resolved::Range(Bound::Unbounded, Bound::Unbounded));
    }
    let cols = plan.columns(table);
    let suffixed = plan.index.is_some();
    let successor = |k: &[u8]| -> Bound<Vec<u8>> {
        if suffixed {
            match prefix_end(k) {
                Some(e) => Bound::Excluded(e),
                None => Bound::Unbounded,
            }
        } else {
            Bound::Excluded(prefix_successor(k))
        }
    };
    let mut prefix_vals = Vec::with_capacity(plan.eq.len());
    for (i, e) in plan.eq.iter().enumerate() {
        let v = eval(e, &[], ctx)?;
        if v.is_null() {
            return Ok(Resolved::Empty);
        }
        match key_value(v, table, cols[i])? {
            Some(v) => prefix_vals.push(v),
            None => return Ok(Resolved::Full),
        }
    }
    let prefix = encode_key(&prefix_vals).map_err(crate::session::engine_error)?;
    if plan.lower.is_none() && plan.upper.is_none() {
        if prefix_vals.len() == cols.len() && !suffixed {
            return Ok(Resolved::Point(prefix));
        }
        let lo = if prefix.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Included(prefix.clone())
        };
        let hi = if prefix.is_empty() {
            Bound::Unbounded
        } else {
            successor(&prefix)
        };
        return Ok(Resolved::Range(lo, hi));
    }
    let pos = prefix_vals.len();
    let bound_key = |e: &Expr| -> Result<Option<Vec<u8>>, SqlError> {
        let v = eval(e, &[], ctx)?;
        if v.is_null() {
            return Ok(None);
        }
        let Some(&column) = cols.get(pos) else {
            return Err(SqlError::internal("inexact"));
        };
        match key_value(v, table, column)? {
            Some(v) => {
                let mut k = prefix.clone();
                borealis_engine::row::encode_key_datum(&v, &mut k)
                    .map_err(crate::session::engine_error)?;
                Ok(Some(k))
            }
            None => Err(SqlError::internal("inexact")),
        }
    };
    let lo = match &plan.lower {
        None if prefix.is_empty() => Bound::Unbounded,
        None => Bound::Included(prefix.clone()),
        Some((e, inc)) => match bound_key(e) {
            Ok(Some(k)) if *inc => Bound::Included(k),
            Ok(Some(k)) => Bound::Excluded(k),
            Ok(None) => return Ok(Resolved::Empty),
            Err(_) => return Ok(Resolved::Full),
        },
    };
    let hi = match &plan.upper {
        None if prefix.is_empty() => Bound::Unbounded,
        None => successor(&prefix),
        Some((e, inc)) => match bound_key(e) {
            Ok(Some(k)) if *inc => Bound::Included(k),
            Ok(Some(k)) => Bound::Excluded(k),
            Ok(None) => return Ok(Resolved::Empty),
            Err(_) => return Ok(Resolved::Full),
        },
    };
    // A composite key's encoded column is followed by more columns: make an
    // inclusive upper bound cover every key that starts with it, and an exclusive
    // lower bound skip all of them.
    let (lo, hi) = if suffixed || cols.len() > pos + 1 {
        let lo = match lo {
            Bound::Excluded(k) => match successor(&k) {
                Bound::Excluded(e) => Bound::Included(e),
                _ => return Ok(Resolved::Empty),
            },
            other => other,
        };
        let hi = match hi {
            Bound::Included(k) => successor(&k),
            other => other,
        };
        (lo, hi)
    } else {
        (lo, hi)
    };
    Ok(Resolved::Range(lo, hi))
}
