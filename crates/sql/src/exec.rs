//! Statement execution: binding statements against the catalog, then running them
//! against the engine.
//!
//! Reads materialize their input rows (bounded by the statement), then filter,
//! aggregate, project, sort and limit. Writes find their target rows with the same
//! scan and change each through `Engine::modify_row`, which re-checks the row under
//! the engine's lock (PostgreSQL's READ COMMITTED re-check) and waits for
//! concurrent writers.

use crate::expr::{
    self, AggBinding, AggCall, AggFunc, BindCtx, BoundSub, EvalCtx, Expr, Scope, ScopeColumn,
    SubKind, SubValue, SubqueryBinder,
};
use crate::plan::{self, KeyPlan, Resolved};
use crate::session::{
    engine_error, unsupported_isolation, Column, CopyFormat, ExecResult, Session,
};
use crate::SqlError;
use borealis_engine::catalog::{
    CheckDef, ColumnDef, IndexDef, RelKind, SequenceDef, TableDef, ROWID_COLUMN,
};
use borealis_engine::row::encode_key;
use borealis_engine::types::{now_timestamp, Datum, Type};
use borealis_engine::{Engine, EngineError, RowAction, RowOutcome, TableLockMode, Txn};
use sqlparser::ast::{self, SelectItem, SetExpr, Statement, TableFactor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

/// How often a statement is re-run because DDL changed its table's catalog entry
/// (invariant 9; each re-run follows a lock wait or a newer catalog).
const MAX_CATALOG_RETRIES: usize = 16;

/// How often INSERT ... ON CONFLICT DO UPDATE retries after the conflicting row
/// vanished (invariant 9).
const MAX_ON_CONFLICT_RETRIES: usize = 8;

/// Upper bound on rows a single statement materializes (invariant 9).
const MAX_STATEMENT_ROWS: usize = 50_000_000;

fn ident(name: &ast::ObjectName) -> String {
    name.0
        .last()
        .map(|p| match p {
            ast::ObjectNamePart::Identifier(i) => expr::norm(i),
            other => other.to_string(),
        })
        .unwrap_or_default()
}

fn schema_ok(name: &ast::ObjectName) -> Result<(), SqlError> {
    if name.0.len() > 1 {
        let schema = name.0[name.0.len() - 2].to_string();
        if schema != "public" {
            return Err(SqlError::new(
                "3F000",
                format!("schema \"{schema}\" does not exist"),
            ));
        }
    }
    Ok(())
}

fn find_table(
    catalog: &[Arc<TableDef>],
    name: &ast::ObjectName,
) -> Result<Arc<TableDef>, SqlError> {
    schema_ok(name)?;
    let n = ident(name);
    named_relation(catalog, &n, RelKind::Table)
        .ok_or_else(|| SqlError::new("42P01", format!("relation \"{n}\" does not exist")))
}

/// The relation of `kind` that SQL calls `name`. A hidden row-id sequence is never
/// one (`TableDef::is_rowid_sequence`): PostgreSQL has no such object.
fn named_relation(catalog: &[Arc<TableDef>], name: &str, kind: RelKind) -> Option<Arc<TableDef>> {
    catalog
        .iter()
        .find(|t| t.name == name && t.kind == kind && !t.is_rowid_sequence())
        .cloned()
}

/// What a subquery's rows give the expressions that use it.
fn sub_value(kind: SubKind, rows: Vec<Vec<Datum>>) -> Result<SubValue, SqlError> {
    Ok(match kind {
        SubKind::Exists => SubValue::Exists(!rows.is_empty()),
        SubKind::Scalar if rows.len() > 1 => {
            return Err(SqlError::new(
                "21000",
                "more than one row returned by a subquery used as an expression",
            ))
        }
        SubKind::Scalar => SubValue::Scalar(
            rows.into_iter()
                .next()
                .and_then(|r| r.into_iter().next())
                .unwrap_or(Datum::Null),
        ),
        SubKind::In => expr::sub_set(
            rows.into_iter()
                .filter_map(|r| r.into_iter().next())
                .collect(),
        ),
    })
}

fn table_scope(t: &TableDef, alias: Option<&str>) -> Scope {
    Scope {
        columns: t
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| ScopeColumn {
                table: Some(alias.unwrap_or(&t.name).to_string()),
                name: c.name.clone(),
                ty: c.ty(),
                table_oid: t.oid,
                column_id: i as i16 + 1,
            })
            .collect(),
        ..Scope::default()
    }
}

fn parse_expr_text(sql: &str) -> Result<ast::Expr, SqlError> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| SqlError::internal(format!("stored expression {sql:?}: {e}")))
}

// ---------------------------------------------------------------------------
// Bound statements

#[derive(Debug, Clone)]
enum FromItem {
    Table {
        def: Arc<TableDef>,
        key: KeyPlan,
    },
    Series {
        args: Vec<Expr>,
        ty: Type,
    },
    /// One row, no columns (SELECT without FROM).
    Unit,
    /// A subquery in FROM, or a query with ORDER BY/LIMIT around a set operation.
    Derived(Box<SelectPlan>),
    /// UNION/INTERSECT/EXCEPT of two queries whose columns are cast to `types`.
    SetOp {
        op: SetOpKind,
        all: bool,
        left: Box<SelectPlan>,
        right: Box<SelectPlan>,
        types: Vec<Type>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetOpKind {
    Union,
    Intersect,
    Except,
}

impl SetOpKind {
    fn name(self) -> &'static str {
        match self {
            SetOpKind::Union => "UNION",
            SetOpKind::Intersect => "INTERSECT",
            SetOpKind::Except => "EXCEPT",
        }
    }
}

impl FromItem {
    /// How many columns each of its rows has.
    fn width(&self) -> usize {
        match self {
            FromItem::Table { def, .. } => def.columns.len(),
            FromItem::Series { .. } => 1,
            FromItem::Unit => 0,
            FromItem::Derived(p) => p.columns.len(),
            FromItem::SetOp { types, .. } => types.len(),
        }
    }
}

#[derive(Debug, Clone)]
struct JoinStep {
    item: FromItem,
    on: Option<Expr>,
    left_outer: bool,
}

#[derive(Debug, Clone)]
struct AggPlan {
    group: Vec<Expr>,
    calls: Vec<AggCall>,
    having: Option<Expr>,
}

#[derive(Debug, Clone)]
struct SelectPlan {
    from: Vec<JoinStep>,
    filter: Option<Expr>,
    agg: Option<AggPlan>,
    project: Vec<Expr>,
    columns: Vec<Column>,
    /// Trailing projected expressions used only for sorting (not in `columns`).
    hidden: usize,
    order: Vec<(usize, bool, bool)>,
    distinct: bool,
    limit: Option<Expr>,
    offset: Option<Expr>,
    lock: bool,
    nextvals: Vec<String>,
    /// The conjuncts of WHERE that use correlated subqueries, split from `filter`
    /// (which the scan applies first, so they run only for rows passing the rest),
    /// and the subqueries to run for each row before evaluating them; by slot
    /// (see `Exec::correlate`).
    row_filter: Option<Expr>,
    filter_subs: Vec<usize>,
    /// The correlated subqueries of the select list, run before projecting a row.
    project_subs: Vec<usize>,
}

#[derive(Debug, Clone)]
enum InsertSource {
    Values(Vec<Vec<Option<Expr>>>),
    Query(Box<SelectPlan>),
}

#[derive(Debug, Clone)]
enum OnConflict {
    Nothing,
    Update {
        sets: Vec<(usize, Expr)>,
        filter: Option<Expr>,
    },
}

#[derive(Debug, Clone)]
struct Returning {
    exprs: Vec<Expr>,
    columns: Vec<Column>,
}

#[derive(Debug, Clone)]
struct InsertPlan {
    table: Arc<TableDef>,
    targets: Vec<usize>,
    source: InsertSource,
    defaults: Vec<Option<Expr>>,
    checks: Vec<(String, Expr)>,
    on_conflict: Option<OnConflict>,
    /// The unique constraint (primary key or unique index) ON CONFLICT names;
    /// None = any (DO NOTHING without a target).
    conflict_target: Option<String>,
    returning: Option<Returning>,
    nextvals: Vec<String>,
    /// How many of `nextvals` belong to the VALUES rows (the rest to defaults).
    values_nextvals: usize,
    /// The primary key's constraint name, for a duplicate key's error (named
    /// once per plan, not per row).
    pk_constraint: String,
}

#[derive(Debug, Clone)]
struct ModifyPlan {
    table: Arc<TableDef>,
    key: KeyPlan,
    filter: Option<Expr>,
    /// None = DELETE.
    sets: Option<Vec<(usize, Expr)>>,
    checks: Vec<(String, Expr)>,
    returning: Option<Returning>,
    /// The conjuncts of WHERE that use correlated subqueries (split from
    /// `filter`, which the scan applies), and the correlated subqueries of WHERE
    /// and SET, run for each row before it is checked and changed.
    row_filter: Option<Expr>,
    row_subs: Vec<usize>,
}

impl ModifyPlan {
    /// Like `SelectPlan::place_correlated`, for UPDATE and DELETE: correlated
    /// subqueries run per row in WHERE and SET; in RETURNING they are 0A000.
    fn place_correlated(&mut self, n: usize) -> Result<(), SqlError> {
        let (filter, row_filter, mut slots) = split_per_row(self.filter.take());
        self.filter = filter;
        self.row_filter = row_filter;
        for (_, e) in self.sets.iter().flatten() {
            expr::per_row_slots(e, &mut slots);
        }
        if slots.len() < n {
            return Err(SqlError::unsupported("correlated subqueries in RETURNING"));
        }
        self.row_subs = slots;
        Ok(())
    }
}

/// Splits a filter into the conjuncts without correlated subqueries and those
/// with them, and lists the latter's subquery slots.
fn split_per_row(filter: Option<Expr>) -> (Option<Expr>, Option<Expr>, Vec<usize>) {
    let mut slots = vec![];
    let (mut plain, mut per_row) = (vec![], vec![]);
    for c in filter.into_iter().flat_map(expr::into_conjuncts) {
        let before = slots.len();
        expr::per_row_slots(&c, &mut slots);
        if slots.len() > before {
            per_row.push(c);
        } else {
            plain.push(c);
        }
    }
    (expr::and_all(plain), expr::and_all(per_row), slots)
}

/// The column names an alias gives, `t (a, b)`.
fn alias_columns(alias: &ast::TableAlias) -> Vec<String> {
    alias.columns.iter().map(|c| expr::norm(&c.name)).collect()
}

/// 42P10 when a column alias list names more columns than the query has.
fn check_aliases(what: &str, plan: &SelectPlan, renames: &[String]) -> Result<(), SqlError> {
    if renames.len() > plan.columns.len() {
        return Err(SqlError::new(
            "42P10",
            format!(
                "{what} has {} columns available but {} columns specified",
                plan.columns.len(),
                renames.len()
            ),
        ));
    }
    Ok(())
}

/// A query read as a FROM item named `table`, its columns renamed by `renames`.
fn derived_item(
    plan: SelectPlan,
    table: String,
    renames: Vec<String>,
) -> Result<(FromItem, Scope), SqlError> {
    check_aliases(&format!("table \"{table}\""), &plan, &renames)?;
    let scope = Scope {
        columns: plan
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| ScopeColumn {
                table: Some(table.clone()),
                name: renames.get(i).cloned().unwrap_or_else(|| c.name.clone()),
                ty: c.ty,
                table_oid: 0,
                column_id: 0,
            })
            .collect(),
        ..Scope::default()
    };
    Ok((FromItem::Derived(Box::new(plan)), scope))
}

impl SelectPlan {
    /// Finds where this query's `n` correlated subqueries are used, which is where
    /// the executor runs them per row: in WHERE (before the filter) and in the
    /// select list (before projecting). Elsewhere is 0A000 for now.
    fn place_correlated(&mut self, n: usize) -> Result<(), SqlError> {
        let (plain, row_filter, filter) = split_per_row(self.filter.take());
        self.filter = plain;
        self.row_filter = row_filter;
        let mut project = vec![];
        for e in &self.project {
            expr::per_row_slots(e, &mut project);
        }
        if filter.len() + project.len() < n {
            return Err(SqlError::unsupported(
                "correlated subqueries outside WHERE and the select list",
            ));
        }
        if !project.is_empty() && self.agg.is_some() {
            return Err(SqlError::unsupported(
                "correlated subqueries in the select list of an aggregated query",
            ));
        }
        if !filter.is_empty() && self.lock {
            return Err(SqlError::unsupported(
                "FOR UPDATE/FOR SHARE with a correlated subquery in WHERE",
            ));
        }
        self.filter_subs = filter;
        self.project_subs = project;
        Ok(())
    }

    /// All columns of one FROM item, as they are.
    fn over(item: FromItem, columns: Vec<Column>) -> SelectPlan {
        SelectPlan {
            project: columns
                .iter()
                .enumerate()
                .map(|(i, c)| Expr::Column(i, c.ty))
                .collect(),
            from: vec![JoinStep {
                item,
                on: None,
                left_outer: false,
            }],
            filter: None,
            agg: None,
            columns,
            hidden: 0,
            order: vec![],
            distinct: false,
            limit: None,
            offset: None,
            lock: false,
            row_filter: None,
            filter_subs: vec![],
            project_subs: vec![],
            nextvals: vec![],
        }
    }
}

/// The type both sides of a set operation become (PostgreSQL's
/// select_common_type for the types we have): the same type; an unknown literal
/// takes the other's; numbers widen (int2 < int4 < int8 < numeric < real <
/// double precision); strings become text; dates and timestamps widen to the
/// timestamp with time zone when one side has it. None: no common type (42804).
fn common_type(a: Type, b: Type) -> Option<Type> {
    use Type as T;
    let numeric_rank = |t: Type| match t {
        T::Int2 => Some(0),
        T::Int4 => Some(1),
        T::Int8 => Some(2),
        T::Numeric => Some(3),
        T::Float4 => Some(4),
        T::Float8 => Some(5),
        _ => None,
    };
    let time_rank = |t: Type| match t {
        T::Date => Some(0),
        T::Timestamp => Some(1),
        T::TimestampTz => Some(2),
        _ => None,
    };
    Some(match (a, b) {
        _ if a == b => {
            if a == T::Unknown {
                T::Text
            } else {
                a
            }
        }
        (T::Unknown, t) | (t, T::Unknown) => t,
        _ if a.is_text() && b.is_text() => T::Text,
        _ => match (numeric_rank(a), numeric_rank(b), time_rank(a), time_rank(b)) {
            (Some(x), Some(y), _, _) => {
                if x >= y {
                    a
                } else {
                    b
                }
            }
            (_, _, Some(x), Some(y)) => {
                if x >= y {
                    a
                } else {
                    b
                }
            }
            _ => return None,
        },
    })
}

/// UNION, INTERSECT and EXCEPT, with or without ALL, as PostgreSQL defines them:
/// rows are equal when all their values are equal or both NULL; without ALL the
/// result has no duplicates; INTERSECT ALL keeps a row as often as both sides
/// have it, EXCEPT ALL as often as the left has it more than the right.
fn combine_sets(
    op: SetOpKind,
    all: bool,
    mut left: Vec<Vec<Datum>>,
    right: Vec<Vec<Datum>>,
) -> Vec<Vec<Datum>> {
    if op == SetOpKind::Union {
        left.extend(right);
        if !all {
            let mut seen = HashSet::new();
            left.retain(|r| seen.insert(row_fingerprint(r)));
        }
        return left;
    }
    let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
    for r in &right {
        *counts.entry(row_fingerprint(r)).or_default() += 1;
    }
    let mut emitted = HashSet::new();
    left.retain(|r| {
        let fp = row_fingerprint(r);
        let n = counts.get_mut(&fp);
        match (op, all) {
            (SetOpKind::Intersect, true) => match n {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            },
            (SetOpKind::Intersect, false) => n.is_some() && emitted.insert(fp),
            (_, true) => match n {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => true,
            },
            (_, false) => n.is_none() && emitted.insert(fp),
        }
    });
    left
}

/// An ORDER BY item's (descending, NULLs first), with PostgreSQL's defaults.
fn order_direction(oe: &ast::OrderByExpr) -> (bool, bool) {
    let desc = matches!(oe.options.sort, Some(ast::OrderBySort::Desc));
    (desc, oe.options.nulls_first.unwrap_or(desc))
}

/// The output column an ORDER BY item names by position (42P10 when out of
/// range) or by output name; None for anything else.
fn output_position(e: &ast::Expr, columns: &[Column]) -> Result<Option<usize>, SqlError> {
    Ok(match e {
        ast::Expr::Value(v) => match &v.value {
            ast::Value::Number(n, _) => {
                let i: usize = n
                    .parse()
                    .map_err(|_| SqlError::syntax("bad ORDER BY position"))?;
                if i == 0 || i > columns.len() {
                    return Err(SqlError::new(
                        "42P10",
                        format!("ORDER BY position {i} is not in select list"),
                    ));
                }
                Some(i - 1)
            }
            _ => None,
        },
        ast::Expr::Identifier(id) => {
            let name = expr::norm(id);
            columns.iter().position(|c| c.name == name)
        }
        _ => None,
    })
}

fn set_order_error() -> SqlError {
    SqlError::new(
        "0A000",
        "invalid UNION/INTERSECT/EXCEPT ORDER BY clause: only result column names and positions can be used",
    )
}

/// A subquery of a statement, run once before the statement's rows (see
/// `expr::SubValue`).
#[derive(Debug, Clone)]
struct SubPlan {
    plan: SelectPlan,
    kind: SubKind,
    /// Refers to its enclosing query's row: run per row (`Exec::correlate`), not
    /// once before the statement.
    correlated: bool,
}

#[derive(Debug)]
enum Bound_ {
    Select(SelectPlan),
    Insert(InsertPlan),
    Modify(ModifyPlan),
}

/// A prepared statement's bound plan, kept for its next executions.
///
/// Binding (name resolution, type inference, access-path choice) depends only on
/// the statement, the catalog and the parameter types, so a plan bound against
/// the same catalog entries with the same parameter types is the plan binding
/// would produce again. "Same entries" is pointer identity of every `TableDef` in
/// the statement's catalog: the engine hands out one shared `Arc` per unchanged
/// catalog entry (its catalog cache and its decode memo), and any DDL the
/// statement's snapshot can see (an ALTER, a DROP or CREATE of a table or index,
/// this transaction's own uncommitted DDL) yields a new entry or a different
/// list, so the plan is bound afresh, exactly as if there were no cache. The plan
/// holds those `Arc`s, so an entry's address cannot be reused while it is cached.
#[derive(Debug)]
pub(crate) struct CachedPlan {
    catalog: Vec<Arc<TableDef>>,
    param_types: Vec<Type>,
    bound: Bound_,
    /// Its subqueries, in the order they run (a subquery's own subqueries first).
    subplans: Arc<[SubPlan]>,
    /// The result columns, shared by every execution's result.
    columns: Option<Arc<Vec<Column>>>,
}

/// Where a prepared statement keeps its [`CachedPlan`] (None: not bound yet).
pub(crate) type PlanSlot = std::sync::Mutex<Option<Arc<CachedPlan>>>;

impl CachedPlan {
    fn fits(&self, catalog: &[Arc<TableDef>], param_types: &[Type]) -> bool {
        self.param_types == param_types
            && self.catalog.len() == catalog.len()
            && self
                .catalog
                .iter()
                .zip(catalog)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

struct Binder<'a> {
    catalog: &'a [Arc<TableDef>],
    params: Vec<Type>,
    nextvals: Vec<String>,
    /// None where PostgreSQL allows no subquery (DDL expressions, COPY).
    subs: Option<Subqueries<'a>>,
}

/// The subqueries of the statement being bound.
struct Subqueries<'a> {
    catalog: &'a [Arc<TableDef>],
    /// The enclosing queries' columns, as the scope of the query being bound
    /// starts (see `Scope::outer`); empty for a statement.
    outer: Scope,
    plans: Vec<SubPlan>,
    /// Correlated subqueries bound directly in the query being bound (not in
    /// queries nested in it): `select_core` checks it can run each of them.
    level_correlated: usize,
    /// WITH queries in scope, innermost last: a name in FROM that matches one
    /// reads its rows (each reference runs it, at the statement's snapshot).
    ctes: Vec<(String, SelectPlan)>,
}

impl SubqueryBinder for Subqueries<'_> {
    fn bind_subquery(
        &mut self,
        outer: &Scope,
        query: &ast::Query,
        kind: SubKind,
        params: &mut Vec<Type>,
    ) -> Result<BoundSub, SqlError> {
        let mut far = outer.outer.clone();
        far.extend(outer.outer_far.iter().cloned());
        let enclosing = Scope {
            columns: vec![],
            outer: outer.columns.clone(),
            outer_far: far,
            outer_used: Arc::default(),
        };
        let used = enclosing.outer_used.clone();
        // Parameters are the statement's: `$1` means the same inside and out.
        let mut b = Binder {
            catalog: self.catalog,
            params: std::mem::take(params),
            nextvals: vec![],
            subs: Some(Subqueries {
                catalog: self.catalog,
                outer: enclosing,
                plans: std::mem::take(&mut self.plans),
                level_correlated: 0,
                ctes: self.ctes.clone(),
            }),
        };
        let bound = b.select(query);
        *params = b.params;
        if let Some(inner) = b.subs {
            self.plans = inner.plans;
        }
        let mut plan = bound?;
        if !plan.nextvals.is_empty() {
            return Err(SqlError::unsupported("nextval() in a subquery"));
        }
        if plan.lock {
            return Err(SqlError::unsupported("FOR UPDATE/FOR SHARE in a subquery"));
        }
        if kind == SubKind::Exists && plan.limit.is_none() {
            // EXISTS needs one row at most.
            plan.limit = Some(Expr::Const(Datum::Int8(1), Type::Int8));
        }
        let types = plan.columns.iter().map(|c| c.ty).collect();
        let correlated = used.load(std::sync::atomic::Ordering::Relaxed);
        if correlated {
            self.level_correlated += 1;
        }
        self.plans.push(SubPlan {
            plan,
            kind,
            correlated,
        });
        Ok(BoundSub {
            slot: self.plans.len() - 1,
            types,
            correlated,
        })
    }
}

impl<'a> Binder<'a> {
    /// A binder for expressions that may not hold subqueries.
    fn new(catalog: &'a [Arc<TableDef>]) -> Self {
        Binder {
            catalog,
            params: vec![],
            nextvals: vec![],
            subs: None,
        }
    }

    fn ctx(&mut self) -> BindCtx<'_> {
        BindCtx {
            params: &mut self.params,
            nextvals: &mut self.nextvals,
            agg: None,
            subqueries: self.subs.as_mut().map(|s| s as &mut dyn SubqueryBinder),
        }
    }

    fn bind(
        &mut self,
        scope: &Scope,
        e: &ast::Expr,
        expected: Option<Type>,
    ) -> Result<Expr, SqlError> {
        self.ctx().bind(scope, e, expected)
    }

    fn checks(&mut self, t: &TableDef) -> Result<Vec<(String, Expr)>, SqlError> {
        let scope = table_scope(t, None);
        // PostgreSQL allows no subquery in a CHECK constraint.
        self.without_subqueries(|b| {
            t.checks
                .iter()
                .map(|c| {
                    Ok((
                        c.name.clone(),
                        b.bind(&scope, &parse_expr_text(&c.expr)?, Some(Type::Bool))?,
                    ))
                })
                .collect()
        })
    }

    /// Binds with subqueries refused (0A000), as PostgreSQL refuses them in
    /// CHECK constraints and defaults.
    fn without_subqueries<T>(&mut self, bind: impl FnOnce(&mut Self) -> T) -> T {
        let subs = self.subs.take();
        let r = bind(self);
        self.subs = subs;
        r
    }

    fn returning(
        &mut self,
        scope: &Scope,
        items: &Option<Vec<SelectItem>>,
    ) -> Result<Option<Returning>, SqlError> {
        let Some(items) = items else { return Ok(None) };
        let (exprs, columns) = self.select_list(scope, items)?;
        Ok(Some(Returning { exprs, columns }))
    }

    fn select_list(
        &mut self,
        scope: &Scope,
        items: &[SelectItem],
    ) -> Result<(Vec<Expr>, Vec<Column>), SqlError> {
        let mut exprs = Vec::new();
        let mut columns = Vec::new();
        for item in items {
            match item {
                SelectItem::Wildcard(_) => {
                    for (i, c) in scope.columns.iter().enumerate() {
                        exprs.push(Expr::Column(i, c.ty));
                        columns.push(Column {
                            name: c.name.clone(),
                            ty: c.ty,
                            table_oid: c.table_oid,
                            column_id: c.column_id,
                        });
                    }
                }
                SelectItem::QualifiedWildcard(kind, _) => {
                    let t = kind.to_string();
                    for (i, c) in scope
                        .columns
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.table.as_deref() == Some(&t))
                    {
                        exprs.push(Expr::Column(i, c.ty));
                        columns.push(Column {
                            name: c.name.clone(),
                            ty: c.ty,
                            table_oid: c.table_oid,
                            column_id: c.column_id,
                        });
                    }
                }
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    let name = match item {
                        SelectItem::ExprWithAlias { alias, .. } => expr::norm(&alias),
                        _ => expr::column_name(e),
                    };
                    let b = self.bind(scope, e, None)?;
                    let mut col = Column::new(name, out_type(b.ty(&self.params)));
                    if let Expr::Column(i, _) = &b {
                        col.table_oid = scope.columns[*i].table_oid;
                        col.column_id = scope.columns[*i].column_id;
                    }
                    exprs.push(b);
                    columns.push(col);
                }
                other => return Err(SqlError::unsupported(format!("select item {other}"))),
            }
        }
        Ok((exprs, columns))
    }

    fn from_item(&mut self, f: &TableFactor) -> Result<(FromItem, Scope), SqlError> {
        match f {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => {
                if let Some(plan) = self.cte(name).cloned() {
                    let table = alias
                        .as_ref()
                        .map(|a| expr::norm(&a.name))
                        .unwrap_or_else(|| ident(name));
                    let renames = alias.as_ref().map(alias_columns).unwrap_or_default();
                    return derived_item(plan, table, renames);
                }
                let def = find_table(self.catalog, name)?;
                let alias_name = alias.as_ref().map(|a| expr::norm(&a.name));
                let scope = table_scope(&def, alias_name.as_deref());
                Ok((
                    FromItem::Table {
                        def,
                        key: KeyPlan::default(),
                    },
                    scope,
                ))
            }
            TableFactor::Table {
                name,
                alias,
                args: Some(args),
                ..
            } => {
                let fname = ident(name).to_lowercase();
                if fname != "generate_series" {
                    return Err(SqlError::new(
                        "42883",
                        format!("function {fname} does not exist"),
                    ));
                }
                let mut bound = Vec::new();
                for a in &args.args {
                    match a {
                        ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => {
                            bound.push(self.bind(&Scope::default(), e, Some(Type::Int8))?)
                        }
                        other => return Err(SqlError::unsupported(format!("argument {other}"))),
                    }
                }
                if !(2..=3).contains(&bound.len()) {
                    return Err(SqlError::new(
                        "42883",
                        "generate_series takes 2 or 3 arguments",
                    ));
                }
                let ty = if bound
                    .iter()
                    .all(|b| matches!(b.ty(&self.params), Type::Int4 | Type::Int2 | Type::Unknown))
                {
                    Type::Int4
                } else {
                    Type::Int8
                };
                let col_name = alias
                    .as_ref()
                    .map(|a| {
                        a.columns
                            .first()
                            .map(|c| expr::norm(&c.name))
                            .unwrap_or_else(|| expr::norm(&a.name))
                    })
                    .unwrap_or_else(|| "generate_series".into());
                let table_name = alias
                    .as_ref()
                    .map(|a| expr::norm(&a.name))
                    .unwrap_or_else(|| "generate_series".into());
                let scope = Scope {
                    columns: vec![ScopeColumn {
                        table: Some(table_name),
                        name: col_name,
                        ty,
                        table_oid: 0,
                        column_id: 0,
                    }],
                    ..Scope::default()
                };
                Ok((FromItem::Series { args: bound, ty }, scope))
            }
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
                ..
            } => {
                if *lateral {
                    return Err(SqlError::unsupported("LATERAL"));
                }
                let Some(alias) = alias else {
                    return Err(SqlError::syntax("subquery in FROM must have an alias"));
                };
                let plan = self.nested(|b| b.select(subquery))?;
                let table = expr::norm(&alias.name);
                derived_item(plan, table, alias_columns(alias))
            }
            other => Err(SqlError::unsupported(format!("FROM item {other}"))),
        }
    }

    /// The WITH query a one-part table name refers to, innermost first.
    fn cte(&self, name: &ast::ObjectName) -> Option<&SelectPlan> {
        if name.0.len() != 1 {
            return None;
        }
        let wanted = ident(name);
        let subs = self.subs.as_ref()?;
        subs.ctes
            .iter()
            .rev()
            .find(|(n, _)| *n == wanted)
            .map(|(_, p)| p)
    }

    fn select(&mut self, q: &ast::Query) -> Result<SelectPlan, SqlError> {
        let Some(with) = &q.with else {
            return self.select_body(q);
        };
        if with.recursive {
            return Err(SqlError::unsupported("WITH RECURSIVE"));
        }
        let Some(depth) = self.subs.as_ref().map(|s| s.ctes.len()) else {
            return Err(SqlError::unsupported("WITH here"));
        };
        let r = self.with_ctes(&with.cte_tables, q);
        if let Some(subs) = self.subs.as_mut() {
            subs.ctes.truncate(depth);
        }
        r
    }

    /// Binds each WITH query (seeing the ones before it), then the query.
    fn with_ctes(&mut self, ctes: &[ast::Cte], q: &ast::Query) -> Result<SelectPlan, SqlError> {
        for cte in ctes {
            let name = expr::norm(&cte.alias.name);
            let mut plan = self.nested(|b| b.select(&cte.query))?;
            let renames = alias_columns(&cte.alias);
            check_aliases(&format!("WITH query \"{name}\""), &plan, &renames)?;
            for (c, n) in plan.columns.iter_mut().zip(renames) {
                c.name = n;
            }
            if let Some(subs) = self.subs.as_mut() {
                subs.ctes.push((name, plan));
            }
        }
        self.select_body(q)
    }

    /// A query without its WITH clause.
    fn select_body(&mut self, q: &ast::Query) -> Result<SelectPlan, SqlError> {
        let plain = q.order_by.is_none() && q.limit_clause.is_none() && q.locks.is_empty();
        match &*q.body {
            SetExpr::Select(s) => self.select_core(s, Some(q)),
            SetExpr::Query(inner) if plain => self.select(inner),
            SetExpr::Query(inner) if inner.order_by.is_some() && q.order_by.is_some() => {
                Err(SqlError::syntax("multiple ORDER BY clauses not allowed"))
            }
            SetExpr::Query(inner) if inner.limit_clause.is_some() && q.limit_clause.is_some() => {
                Err(SqlError::syntax("multiple LIMIT clauses not allowed"))
            }
            body @ (SetExpr::Query(_) | SetExpr::SetOperation { .. }) => {
                let inner = self.set_operand(body)?;
                if plain {
                    return Ok(inner);
                }
                self.order_output(inner, q)
            }
            SetExpr::Values(_) => Err(SqlError::unsupported("VALUES as a query")),
            other => Err(SqlError::unsupported(format!("query {other}"))),
        }
    }

    /// Binds a query nested in the one being bound (a set operation's side, a
    /// subquery in FROM): it keeps its own nextval() slots, and the outer query's
    /// are left as they were.
    fn nested(
        &mut self,
        bind: impl FnOnce(&mut Self) -> Result<SelectPlan, SqlError>,
    ) -> Result<SelectPlan, SqlError> {
        let outer = std::mem::take(&mut self.nextvals);
        let r = bind(self);
        self.nextvals = outer;
        r
    }

    /// One side of a set operation, or a parenthesized query.
    fn set_operand(&mut self, body: &SetExpr) -> Result<SelectPlan, SqlError> {
        match body {
            SetExpr::Select(s) => self.nested(|b| b.select_core(s, None)),
            SetExpr::Query(q) => self.nested(|b| b.select(q)),
            SetExpr::SetOperation {
                op,
                set_quantifier,
                left,
                right,
            } => {
                let op = match op {
                    ast::SetOperator::Union => SetOpKind::Union,
                    ast::SetOperator::Intersect => SetOpKind::Intersect,
                    ast::SetOperator::Except => SetOpKind::Except,
                    other => return Err(SqlError::unsupported(format!("set operator {other}"))),
                };
                let all = match set_quantifier {
                    ast::SetQuantifier::All => true,
                    ast::SetQuantifier::Distinct | ast::SetQuantifier::None => false,
                    other => return Err(SqlError::unsupported(format!("{} {other}", op.name()))),
                };
                let left = self.set_operand(left)?;
                let right = self.set_operand(right)?;
                if left.columns.len() != right.columns.len() {
                    return Err(SqlError::syntax(format!(
                        "each {} query must have the same number of columns",
                        op.name()
                    )));
                }
                let mut columns = left.columns.clone();
                let mut types = Vec::with_capacity(columns.len());
                for (i, c) in columns.iter_mut().enumerate() {
                    let (lt, rt) = (self.output_type(&left, i), self.output_type(&right, i));
                    let ty = common_type(lt, rt).ok_or_else(|| {
                        SqlError::new(
                            "42804",
                            format!(
                                "{} types {} and {} cannot be matched",
                                op.name(),
                                lt.name(),
                                rt.name()
                            ),
                        )
                    })?;
                    // `SELECT $1 UNION SELECT 2`: the parameter is an integer.
                    for side in [&left, &right] {
                        if let Some(Expr::Param(k)) = side.project.get(i) {
                            if self.params.get(*k) == Some(&Type::Unknown) {
                                self.params[*k] = ty;
                            }
                        }
                    }
                    *c = Column::new(c.name.clone(), ty);
                    types.push(ty);
                }
                Ok(SelectPlan::over(
                    FromItem::SetOp {
                        op,
                        all,
                        left: Box::new(left),
                        right: Box::new(right),
                        types,
                    },
                    columns,
                ))
            }
            SetExpr::Values(_) => Err(SqlError::unsupported("VALUES as a query")),
            other => Err(SqlError::unsupported(format!("query {other}"))),
        }
    }

    /// The type of a query's output column `i`, unknown for an untyped literal or
    /// parameter (which then takes the other side's type in a set operation).
    fn output_type(&self, p: &SelectPlan, i: usize) -> Type {
        match p.project.get(i) {
            Some(Expr::Const(_, Type::Unknown)) => Type::Unknown,
            Some(Expr::Param(k)) => self.params.get(*k).copied().unwrap_or(Type::Unknown),
            _ => p.columns.get(i).map_or(Type::Unknown, |c| c.ty),
        }
    }

    /// ORDER BY, LIMIT and OFFSET around a set operation's (or a parenthesized
    /// query's) result: PostgreSQL allows only result column names and positions.
    fn order_output(&mut self, inner: SelectPlan, q: &ast::Query) -> Result<SelectPlan, SqlError> {
        if !q.locks.is_empty() {
            return Err(SqlError::unsupported(
                "FOR UPDATE/FOR SHARE with UNION/INTERSECT/EXCEPT",
            ));
        }
        let columns = inner.columns.clone();
        let mut order = Vec::new();
        if let Some(ob) = &q.order_by {
            let ast::OrderByKind::Expressions(exprs) = &ob.kind else {
                return Err(SqlError::unsupported("ORDER BY ALL"));
            };
            for oe in exprs {
                let (desc, nulls_first) = order_direction(oe);
                let pos = match (output_position(&oe.expr, &columns)?, &oe.expr) {
                    (Some(p), _) => p,
                    (None, ast::Expr::Identifier(id)) => {
                        return Err(SqlError::new(
                            "42703",
                            format!("column \"{}\" does not exist", expr::norm(id)),
                        ))
                    }
                    (None, _) => return Err(set_order_error()),
                };
                order.push((pos, desc, nulls_first));
            }
        }
        let (limit, offset) = self.limit_offset(q)?;
        Ok(SelectPlan {
            order,
            limit,
            offset,
            ..SelectPlan::over(FromItem::Derived(Box::new(inner)), columns)
        })
    }

    /// One SELECT; `q` is the query it is the body of, for ORDER BY, LIMIT and
    /// FOR UPDATE (None: a side of a set operation, which has none of its own).
    fn select_core(
        &mut self,
        select: &ast::Select,
        q: Option<&ast::Query>,
    ) -> Result<SelectPlan, SqlError> {
        let outer_level = self
            .subs
            .as_mut()
            .map_or(0, |s| std::mem::take(&mut s.level_correlated));
        let r = self.select_core_unchecked(select, q);
        let here = self.subs.as_mut().map_or(0, |s| {
            std::mem::replace(&mut s.level_correlated, outer_level)
        });
        let mut plan = r?;
        if here > 0 {
            plan.place_correlated(here)?;
        }
        Ok(plan)
    }

    fn select_core_unchecked(
        &mut self,
        select: &ast::Select,
        q: Option<&ast::Query>,
    ) -> Result<SelectPlan, SqlError> {
        if select.top.is_some() {
            return Err(SqlError::syntax("syntax error at or near \"TOP\""));
        }
        if select.into.is_some() {
            return Err(SqlError::unsupported("SELECT INTO"));
        }
        // FROM and joins.
        let mut from = Vec::new();
        let mut scope = self
            .subs
            .as_ref()
            .map(|s| s.outer.clone())
            .unwrap_or_default();
        if select.from.is_empty() {
            from.push(JoinStep {
                item: FromItem::Unit,
                on: None,
                left_outer: false,
            });
        }
        for twj in &select.from {
            let (item, s) = self.from_item(&twj.relation)?;
            scope.columns.extend(s.columns);
            from.push(JoinStep {
                item,
                on: None,
                left_outer: false,
            });
            for j in &twj.joins {
                let (item, s) = self.from_item(&j.relation)?;
                scope.columns.extend(s.columns);
                let (constraint, left_outer) = match &j.join_operator {
                    ast::JoinOperator::Join(c) | ast::JoinOperator::Inner(c) => (Some(c), false),
                    ast::JoinOperator::Left(c) | ast::JoinOperator::LeftOuter(c) => (Some(c), true),
                    ast::JoinOperator::CrossJoin(_) => (None, false),
                    other => return Err(SqlError::unsupported(format!("join {other:?}"))),
                };
                let on = match constraint {
                    Some(ast::JoinConstraint::On(e)) => {
                        Some(self.bind(&scope, e, Some(Type::Bool))?)
                    }
                    Some(ast::JoinConstraint::None) | None => None,
                    Some(other) => {
                        return Err(SqlError::unsupported(format!("join constraint {other:?}")))
                    }
                };
                from.push(JoinStep {
                    item,
                    on,
                    left_outer,
                });
            }
        }
        let filter = match &select.selection {
            Some(w) => Some(self.bind(&scope, w, Some(Type::Bool))?),
            None => None,
        };
        // Key ranges apply when there is exactly one table.
        if from.len() == 1 {
            if let FromItem::Table { def, key } = &mut from[0].item {
                *key = plan::key_plan(def, filter.as_ref());
            }
        }
        let group_exprs: Vec<ast::Expr> = match &select.group_by {
            ast::GroupByExpr::Expressions(es, _) => es.clone(),
            ast::GroupByExpr::All(_) => return Err(SqlError::unsupported("GROUP BY ALL")),
        };
        let has_agg = !group_exprs.is_empty()
            || select.having.is_some()
            || select.projection.iter().any(|p| match p {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    expr::has_aggregate(e)
                }
                _ => false,
            });
        let mut agg_plan = None;
        let (mut project, mut columns);
        let out_scope;
        if has_agg {
            let mut group = Vec::new();
            let mut binding = AggBinding {
                input: scope.clone(),
                ..Default::default()
            };
            for g in &group_exprs {
                // GROUP BY 1 refers to the first select-list item.
                let g = match g {
                    ast::Expr::Value(v) => match &v.value {
                        ast::Value::Number(n, _) => {
                            let i: usize = n
                                .parse()
                                .map_err(|_| SqlError::syntax("bad GROUP BY position"))?;
                            match select.projection.get(i.wrapping_sub(1)) {
                                Some(SelectItem::UnnamedExpr(e))
                                | Some(SelectItem::ExprWithAlias { expr: e, .. }) => e.clone(),
                                _ => {
                                    return Err(SqlError::new(
                                        "42P10",
                                        format!("GROUP BY position {i} is not in select list"),
                                    ))
                                }
                            }
                        }
                        _ => g.clone(),
                    },
                    _ => g.clone(),
                };
                let b = self.bind(&scope, &g, None)?;
                binding.group_texts.push(g.to_string());
                binding.group_types.push(b.ty(&self.params));
                group.push(b);
            }
            let mut ctx = BindCtx {
                params: &mut self.params,
                nextvals: &mut self.nextvals,
                agg: Some(binding),
                subqueries: self.subs.as_mut().map(|s| s as &mut dyn SubqueryBinder),
            };
            project = Vec::new();
            columns = Vec::new();
            for item in &select.projection {
                let (e, name) = match item {
                    SelectItem::UnnamedExpr(e) => (e, expr::column_name(e)),
                    SelectItem::ExprWithAlias { expr: e, alias } => (e, expr::norm(&alias)),
                    other => {
                        return Err(SqlError::new(
                            "42803",
                            format!("{other} must appear in the GROUP BY clause"),
                        ))
                    }
                };
                let b = ctx.bind(&Scope::default(), e, None)?;
                columns.push(Column::new(name, out_type(b.ty(ctx.params))));
                project.push(b);
            }
            let having = match &select.having {
                Some(h) => Some(ctx.bind(&Scope::default(), h, Some(Type::Bool))?),
                None => None,
            };
            // ORDER BY may name aggregates too: bind it in the same context.
            let binding_for_order = ctx.agg.take();
            let binding = binding_for_order.unwrap_or_default();
            let ngroups = group.len();
            let remap = |e: Expr| shift_aggs(e, ngroups);
            project = project.into_iter().map(remap).collect();
            let having = having.map(remap);
            agg_plan = Some((
                AggPlan {
                    group,
                    calls: binding.calls.clone(),
                    having,
                },
                binding,
            ));
            out_scope = None;
        } else {
            let (p, c) = self.select_list(&scope, &select.projection)?;
            project = p;
            columns = c;
            out_scope = Some(scope.clone());
        }
        // ORDER BY: output positions, output names, or expressions (hidden columns).
        let mut order = Vec::new();
        let mut hidden = 0;
        if let Some(ob) = q.and_then(|q| q.order_by.as_ref()) {
            let exprs = match &ob.kind {
                ast::OrderByKind::Expressions(es) => es.clone(),
                ast::OrderByKind::All(_) => return Err(SqlError::unsupported("ORDER BY ALL")),
            };
            for oe in &exprs {
                let (desc, nulls_first) = order_direction(oe);
                // An output name wins over an input column of the same name.
                let pos = match output_position(&oe.expr, &columns)? {
                    Some(p) => p,
                    None => {
                        let b = match (&out_scope, &mut agg_plan) {
                            (Some(s), _) => self.bind(s, &oe.expr, None)?,
                            (None, Some((plan, binding))) => {
                                let mut ctx = BindCtx {
                                    params: &mut self.params,
                                    nextvals: &mut self.nextvals,
                                    agg: Some(std::mem::take(binding)),
                                    subqueries: self
                                        .subs
                                        .as_mut()
                                        .map(|s| s as &mut dyn SubqueryBinder),
                                };
                                let r = ctx.bind(&Scope::default(), &oe.expr, None);
                                *binding = ctx.agg.take().unwrap_or_default();
                                plan.calls = binding.calls.clone();
                                shift_aggs(r?, plan.group.len())
                            }
                            _ => return Err(SqlError::internal("order by binding")),
                        };
                        project.push(b);
                        hidden += 1;
                        project.len() - 1
                    }
                };
                order.push((pos, desc, nulls_first));
            }
        }
        let distinct = match &select.distinct {
            None | Some(ast::Distinct::All) => false,
            Some(ast::Distinct::Distinct) => true,
            Some(ast::Distinct::On(_)) => return Err(SqlError::unsupported("DISTINCT ON")),
        };
        let (limit, offset) = match q {
            Some(q) => self.limit_offset(q)?,
            None => (None, None),
        };
        // ORDER BY plain columns, ascending with NULLs last, plus a LIMIT: an index
        // (or the clustered key) in that order lets the scan stop early.
        if limit.is_some() && agg_plan.is_none() && !distinct && from.len() == 1 {
            let cols: Option<Vec<usize>> = order
                .iter()
                .map(|&(pos, desc, nulls_first)| match project.get(pos) {
                    Some(Expr::Column(c, _)) if !desc && !nulls_first => Some(*c),
                    _ => None,
                })
                .collect();
            if let (Some(cols), FromItem::Table { def, key }) = (cols, &mut from[0].item) {
                *key = plan::order_plan(def, std::mem::take(key), &cols);
            }
        }
        let lock = q.is_some_and(|q| !q.locks.is_empty());
        let one_table = matches!(
            &from[..],
            [JoinStep {
                item: FromItem::Table { .. },
                ..
            }]
        );
        if lock && (!one_table || agg_plan.is_some()) {
            return Err(SqlError::new(
                "0A000",
                "FOR UPDATE/FOR SHARE is only supported on a single table without aggregates",
            ));
        }
        Ok(SelectPlan {
            from,
            filter,
            agg: agg_plan.map(|(p, _)| p),
            project,
            columns,
            hidden,
            order,
            distinct,
            limit,
            offset,
            lock,
            nextvals: std::mem::take(&mut self.nextvals),
            row_filter: None,
            filter_subs: vec![],
            project_subs: vec![],
        })
    }

    fn limit_offset(&mut self, q: &ast::Query) -> Result<(Option<Expr>, Option<Expr>), SqlError> {
        let empty = Scope::default();
        Ok(match &q.limit_clause {
            None => (None, None),
            Some(ast::LimitClause::LimitOffset { limit, offset, .. }) => {
                let l = match limit {
                    Some(e) => Some(self.bind(&empty, e, Some(Type::Int8))?),
                    None => None,
                };
                let o = match offset {
                    Some(o) => Some(self.bind(&empty, &o.value, Some(Type::Int8))?),
                    None => None,
                };
                (l, o)
            }
            Some(ast::LimitClause::OffsetCommaLimit { .. }) => {
                return Err(SqlError::syntax("LIMIT #,# syntax is not supported"))
            }
        })
    }

    fn insert(&mut self, ins: &ast::Insert) -> Result<InsertPlan, SqlError> {
        let name = match &ins.table {
            ast::TableObject::TableName(n) => n,
            other => return Err(SqlError::unsupported(format!("INSERT into {other}"))),
        };
        if ins.or.is_some() || ins.ignore || ins.replace_into {
            return Err(SqlError::syntax("syntax error at or near \"OR\""));
        }
        let table = find_table(self.catalog, name)?;
        let targets: Vec<usize> = if ins.columns.is_empty() {
            (0..table.columns.len()).collect()
        } else {
            let mut v = Vec::new();
            for c in &ins.columns {
                let n = ident(c);
                let i = table.column_index(&n).ok_or_else(|| {
                    SqlError::new(
                        "42703",
                        format!(
                            "column \"{n}\" of relation \"{}\" does not exist",
                            table.name
                        ),
                    )
                })?;
                if v.contains(&i) {
                    return Err(SqlError::new(
                        "42701",
                        format!("column \"{n}\" specified more than once"),
                    ));
                }
                v.push(i);
            }
            v
        };
        let empty = Scope::default();
        let source = match ins.source.as_deref() {
            None => InsertSource::Values(vec![vec![None; targets.len()]]),
            Some(q) => match &*q.body {
                SetExpr::Values(values) if q.order_by.is_none() && q.limit_clause.is_none() => {
                    let mut rows = Vec::with_capacity(values.rows.len());
                    for r in &values.rows {
                        if r.len() > targets.len() {
                            return Err(SqlError::syntax(
                                "INSERT has more expressions than target columns",
                            ));
                        }
                        if r.len() < targets.len() && !ins.columns.is_empty() {
                            return Err(SqlError::syntax(
                                "INSERT has more target columns than expressions",
                            ));
                        }
                        let mut row = Vec::with_capacity(targets.len());
                        for (j, e) in r.iter().enumerate() {
                            let col = &table.columns[targets[j]];
                            let is_default = matches!(e, ast::Expr::Identifier(id) if id.value.eq_ignore_ascii_case("default") && id.quote_style.is_none());
                            row.push(if is_default {
                                None
                            } else {
                                Some(self.bind(&empty, e, Some(col.ty()))?)
                            });
                        }
                        row.resize(targets.len(), None);
                        rows.push(row);
                    }
                    InsertSource::Values(rows)
                }
                _ => {
                    let plan = self.select(q)?;
                    if plan.columns.len() > targets.len() {
                        return Err(SqlError::syntax(
                            "INSERT has more expressions than target columns",
                        ));
                    }
                    InsertSource::Query(Box::new(plan))
                }
            },
        };
        let values_nextvals = self.nextvals.len();
        let defaults = self.defaults(&table)?;
        let checks = self.checks(&table)?;
        let scope = table_scope(&table, None);
        let mut conflict_target = None;
        let on_conflict = match &ins.on {
            None => None,
            Some(ast::OnInsert::OnConflict(oc)) => {
                let pk_name = table
                    .pk_name
                    .clone()
                    .unwrap_or_else(|| format!("{}_pkey", table.name));
                let no_match = || {
                    SqlError::new(
                        "42P10",
                        "there is no unique or exclusion constraint matching the ON CONFLICT specification",
                    )
                };
                match &oc.conflict_target {
                    Some(ast::ConflictTarget::Columns(cols)) => {
                        let mut named: Vec<usize> = Vec::new();
                        for c in cols {
                            let n = expr::norm(c);
                            named.push(table.column_index(&n).ok_or_else(|| {
                                SqlError::new("42703", format!("column \"{n}\" does not exist"))
                            })?);
                        }
                        named.sort_unstable();
                        named.dedup();
                        let same = |cols: &[usize]| {
                            let mut c = cols.to_vec();
                            c.sort_unstable();
                            c == named
                        };
                        conflict_target = if !table.pk.is_empty() && same(&table.pk) {
                            Some(pk_name)
                        } else {
                            Some(
                                table
                                    .secondary_indexes()
                                    .find(|i| i.unique && same(&i.columns))
                                    .map(|i| i.name.clone())
                                    .ok_or_else(no_match)?,
                            )
                        };
                    }
                    Some(ast::ConflictTarget::OnConstraint(n)) => {
                        let n = ident(n);
                        if n != pk_name
                            && !table.secondary_indexes().any(|i| i.unique && i.name == n)
                        {
                            return Err(SqlError::new(
                                "42704",
                                format!(
                                    "constraint \"{n}\" for table \"{}\" does not exist",
                                    table.name
                                ),
                            ));
                        }
                        conflict_target = Some(n);
                    }
                    None => {}
                }
                if matches!(oc.action, ast::OnConflictAction::DoUpdate(_))
                    && conflict_target.is_none()
                {
                    return Err(SqlError::new(
                        "42601",
                        "ON CONFLICT DO UPDATE requires inference specification or constraint name",
                    ));
                }
                Some(match &oc.action {
                    ast::OnConflictAction::DoNothing => OnConflict::Nothing,
                    ast::OnConflictAction::DoUpdate(du) => {
                        // Scope: the existing row, then EXCLUDED.
                        let mut s = scope.clone();
                        let mut excluded = table_scope(&table, Some("excluded"));
                        for c in &mut excluded.columns {
                            c.table_oid = 0;
                        }
                        s.columns.extend(excluded.columns);
                        let sets = self.assignments(&table, &s, &du.assignments)?;
                        let filter = match &du.selection {
                            Some(w) => Some(self.bind(&s, w, Some(Type::Bool))?),
                            None => None,
                        };
                        OnConflict::Update { sets, filter }
                    }
                })
            }
            Some(other) => return Err(SqlError::syntax(format!("syntax error near {other}"))),
        };
        let returning = self.returning(&scope, &ins.returning)?;
        let pk_constraint = pk_constraint(&table);
        Ok(InsertPlan {
            table,
            targets,
            source,
            defaults,
            checks,
            on_conflict,
            conflict_target,
            returning,
            nextvals: std::mem::take(&mut self.nextvals),
            values_nextvals,
            pk_constraint,
        })
    }

    fn defaults(&mut self, t: &TableDef) -> Result<Vec<Option<Expr>>, SqlError> {
        let empty = Scope::default();
        // PostgreSQL allows no subquery in a default.
        self.without_subqueries(|b| {
            t.columns
                .iter()
                .map(|c| match &c.default {
                    Some(text) => Ok(Some(b.bind(
                        &empty,
                        &parse_expr_text(text)?,
                        Some(c.ty()),
                    )?)),
                    None => Ok(None),
                })
                .collect()
        })
    }

    fn assignments(
        &mut self,
        t: &TableDef,
        scope: &Scope,
        a: &[ast::Assignment],
    ) -> Result<Vec<(usize, Expr)>, SqlError> {
        let mut sets = Vec::new();
        for asg in a {
            let name = match &asg.target {
                ast::AssignmentTarget::ColumnName(n) => ident(n),
                ast::AssignmentTarget::Tuple(_) => {
                    return Err(SqlError::unsupported("multi-column assignment"))
                }
            };
            let i = t.column_index(&name).ok_or_else(|| {
                SqlError::new(
                    "42703",
                    format!(
                        "column \"{name}\" of relation \"{}\" does not exist",
                        t.name
                    ),
                )
            })?;
            let col = &t.columns[i];
            let is_default = matches!(&asg.value, ast::Expr::Identifier(id) if id.value.eq_ignore_ascii_case("default") && id.quote_style.is_none());
            let e = if is_default {
                match &col.default {
                    Some(text) => {
                        self.bind(&Scope::default(), &parse_expr_text(text)?, Some(col.ty()))?
                    }
                    None => Expr::Const(Datum::Null, col.ty()),
                }
            } else {
                self.bind(scope, &asg.value, Some(col.ty()))?
            };
            sets.push((i, e));
        }
        Ok(sets)
    }

    fn update(&mut self, u: &ast::Update) -> Result<ModifyPlan, SqlError> {
        if u.from.is_some() || !u.table.joins.is_empty() {
            return Err(SqlError::unsupported("UPDATE ... FROM"));
        }
        let (name, alias) = match &u.table.relation {
            TableFactor::Table { name, alias, .. } => {
                (name, alias.as_ref().map(|a| expr::norm(&a.name)))
            }
            other => return Err(SqlError::unsupported(format!("UPDATE of {other}"))),
        };
        let table = find_table(self.catalog, name)?;
        let scope = table_scope(&table, alias.as_deref());
        let sets = self.assignments(&table, &scope, &u.assignments)?;
        let filter = match &u.selection {
            Some(w) => Some(self.bind(&scope, w, Some(Type::Bool))?),
            None => None,
        };
        let key = plan::key_plan(&table, filter.as_ref());
        let checks = self.checks(&table)?;
        let returning = self.returning(&scope, &u.returning)?;
        if !self.nextvals.is_empty() {
            return Err(SqlError::unsupported("nextval() in UPDATE"));
        }
        Ok(ModifyPlan {
            table,
            key,
            filter,
            sets: Some(sets),
            checks,
            returning,
            row_filter: None,
            row_subs: vec![],
        })
    }

    fn delete(&mut self, d: &ast::Delete) -> Result<ModifyPlan, SqlError> {
        let tables = match &d.from {
            ast::FromTable::WithFromKeyword(t) | ast::FromTable::WithoutKeyword(t) => t,
        };
        if tables.len() != 1 || d.using.is_some() || !tables[0].joins.is_empty() {
            return Err(SqlError::unsupported(
                "DELETE from several tables or with USING",
            ));
        }
        let (name, alias) = match &tables[0].relation {
            TableFactor::Table { name, alias, .. } => {
                (name, alias.as_ref().map(|a| expr::norm(&a.name)))
            }
            other => return Err(SqlError::unsupported(format!("DELETE from {other}"))),
        };
        let table = find_table(self.catalog, name)?;
        let scope = table_scope(&table, alias.as_deref());
        let filter = match &d.selection {
            Some(w) => Some(self.bind(&scope, w, Some(Type::Bool))?),
            None => None,
        };
        let key = plan::key_plan(&table, filter.as_ref());
        let returning = self.returning(&scope, &d.returning)?;
        Ok(ModifyPlan {
            table,
            key,
            filter,
            sets: None,
            checks: vec![],
            returning,
            row_filter: None,
            row_subs: vec![],
        })
    }
}

/// In aggregated rows, group keys come first, then aggregates.
/// NOT NULL (and primary-key columns) of a complete row: 23502.
/// The name of `t`'s primary key constraint ("<table>_pkey" unless named).
fn pk_constraint(t: &TableDef) -> String {
    t.pk_name
        .clone()
        .unwrap_or_else(|| format!("{}_pkey", t.name))
}

fn check_not_null(t: &TableDef, row: &[Datum]) -> Result<(), SqlError> {
    for (i, c) in t.columns.iter().enumerate() {
        if (c.not_null || t.pk.contains(&i)) && row[i].is_null() {
            return Err(SqlError::new(
                "23502",
                format!(
                    "null value in column \"{}\" of relation \"{}\" violates not-null constraint",
                    c.name, t.name
                ),
            ));
        }
    }
    Ok(())
}

fn shift_aggs(e: Expr, ngroups: usize) -> Expr {
    map_expr(e, &|e| match e {
        Expr::AggRef(i, t) => Expr::AggRef(i + ngroups, t),
        other => other,
    })
}

fn map_expr(e: Expr, f: &dyn Fn(Expr) -> Expr) -> Expr {
    let m = |b: Box<Expr>| Box::new(map_expr(*b, f));
    let e = match e {
        Expr::Binary(op, l, r, t) => Expr::Binary(op, m(l), m(r), t),
        Expr::Not(x) => Expr::Not(m(x)),
        Expr::Neg(x, t) => Expr::Neg(m(x), t),
        Expr::IsNull(x, n) => Expr::IsNull(m(x), n),
        Expr::IsBool(x, a, b) => Expr::IsBool(m(x), a, b),
        Expr::InList(x, items, n) => {
            Expr::InList(m(x), items.into_iter().map(|i| map_expr(i, f)).collect(), n)
        }
        Expr::InSub(x, slot, n) => Expr::InSub(m(x), slot, n),
        Expr::Between(x, a, b, n) => Expr::Between(m(x), m(a), m(b), n),
        Expr::Like(x, p, n, ci) => Expr::Like(m(x), m(p), n, ci),
        Expr::Case(o, w, el, t) => Expr::Case(
            o.map(m),
            w.into_iter()
                .map(|(c, r)| (map_expr(c, f), map_expr(r, f)))
                .collect(),
            el.map(m),
            t,
        ),
        Expr::Cast(x, t, tm) => Expr::Cast(m(x), t, tm),
        Expr::Func(func, args, t) => {
            Expr::Func(func, args.into_iter().map(|a| map_expr(a, f)).collect(), t)
        }
        other => other,
    };
    f(e)
}

/// Unknown-typed outputs (a bare string literal) are reported as text.
fn out_type(t: Type) -> Type {
    if t == Type::Unknown {
        Type::Text
    } else {
        t
    }
}

/// Binds a statement: its plan (None for statements that are not queries or
/// DML), its subqueries and its parameter types.
fn bind_statement(
    catalog: &[Arc<TableDef>],
    stmt: &Statement,
    param_types: &[Type],
) -> Result<(Option<Bound_>, Vec<SubPlan>, Vec<Type>), SqlError> {
    let mut b = Binder {
        catalog,
        params: param_types.to_vec(),
        nextvals: vec![],
        subs: Some(Subqueries {
            catalog,
            outer: Scope::default(),
            plans: vec![],
            level_correlated: 0,
            ctes: vec![],
        }),
    };
    let mut bound = match stmt {
        Statement::Query(q) => Some(Bound_::Select(b.select(q)?)),
        Statement::Insert(ins) => Some(Bound_::Insert(b.insert(ins)?)),
        Statement::Update(u) => Some(Bound_::Modify(b.update(u)?)),
        Statement::Delete(d) => Some(Bound_::Modify(b.delete(d)?)),
        _ => None,
    };
    // A SELECT's own correlated subqueries are placed by `select_core`; those of
    // UPDATE and DELETE here. INSERT's (in VALUES, ON CONFLICT, RETURNING) have
    // no row to run for.
    let correlated = b.subs.as_ref().map_or(0, |s| s.level_correlated);
    if correlated > 0 {
        match &mut bound {
            Some(Bound_::Modify(p)) => p.place_correlated(correlated)?,
            _ => {
                return Err(SqlError::unsupported(
                    "correlated subqueries in INSERT (outside its SELECT)",
                ))
            }
        }
    }
    let params = b
        .params
        .into_iter()
        .map(|t| if t == Type::Unknown { Type::Text } else { t })
        .collect();
    let subplans = b.subs.map(|s| s.plans).unwrap_or_default();
    Ok((bound, subplans, params))
}

/// Parameter types and result columns of a statement, for Describe.
pub(crate) fn describe(
    catalog: &[Arc<TableDef>],
    stmt: &Statement,
    param_types: &[Type],
) -> Result<(Vec<Type>, Vec<Column>), SqlError> {
    let (bound, _, params) = bind_statement(catalog, stmt, param_types)?;
    let columns = match bound {
        Some(Bound_::Select(p)) => p.columns,
        Some(Bound_::Insert(InsertPlan {
            returning: Some(r), ..
        }))
        | Some(Bound_::Modify(ModifyPlan {
            returning: Some(r), ..
        })) => r.columns,
        _ => match stmt {
            Statement::ShowVariable { variable } => vec![Column::new(
                variable
                    .iter()
                    .map(|i| i.value.clone())
                    .collect::<Vec<_>>()
                    .join(" "),
                Type::Text,
            )],
            Statement::Explain { .. } => vec![Column::new("QUERY PLAN", Type::Text)],
            _ => vec![],
        },
    };
    Ok((params, columns))
}

// ---------------------------------------------------------------------------
// Execution

struct Exec<'a> {
    engine: Engine,
    txn: &'a mut Txn,
    params: &'a [Datum],
    database: Arc<str>,
    user: Arc<str>,
    /// The transaction's start (now(), current_timestamp) and the statement's
    /// (statement_timestamp()).
    now: i64,
    statement_now: i64,
    catalog: Vec<Arc<TableDef>>,
    /// The statement's subquery results (`run_subqueries`), by slot; None for
    /// a statement without subqueries (no allocation on the point-lookup path).
    subs: Option<Arc<Vec<SubValue>>>,
    /// The statement's subqueries, kept when some are correlated (run per row).
    sub_plans: Option<Arc<[SubPlan]>>,
    /// The enclosing query's row while a correlated subquery runs.
    outer: Option<Arc<Vec<Datum>>>,
}

/// What evaluating an expression needs from the statement, owned (the names are
/// shared `Arc`s) so that closures handed to the engine can carry it while `self`
/// is borrowed elsewhere.
struct EvalEnv<'p> {
    params: &'p [Datum],
    database: Arc<str>,
    user: Arc<str>,
    now: i64,
    statement_now: i64,
    subs: Option<Arc<Vec<SubValue>>>,
    outer: Option<Arc<Vec<Datum>>>,
}

impl EvalEnv<'_> {
    fn ctx(&self) -> EvalCtx<'_> {
        EvalCtx {
            params: self.params,
            precomputed: &[],
            subqueries: self.subs.as_deref().map_or(&[], Vec::as_slice),
            outer: self.outer.as_deref().map_or(&[], Vec::as_slice),
            database: &self.database,
            user: &self.user,
            now: self.now,
            statement_now: self.statement_now,
        }
    }
}

impl<'a> Exec<'a> {
    fn env(&self) -> EvalEnv<'a> {
        EvalEnv {
            params: self.params,
            database: self.database.clone(),
            user: self.user.clone(),
            now: self.now,
            statement_now: self.statement_now,
            subs: self.subs.clone(),
            outer: self.outer.clone(),
        }
    }

    fn ctx<'b>(&'b self, pre: &'b [Datum]) -> EvalCtx<'b> {
        EvalCtx {
            params: self.params,
            precomputed: pre,
            subqueries: self.subs.as_deref().map_or(&[], Vec::as_slice),
            outer: self.outer.as_deref().map_or(&[], Vec::as_slice),
            database: &self.database,
            user: &self.user,
            now: self.now,
            statement_now: self.statement_now,
        }
    }

    /// Takes a table lock for the rest of the transaction (see
    /// `Engine::lock_table`). When the statement's catalog may be stale (DDL on the
    /// table committed while it waited, or after its snapshot), re-reads it, and
    /// under READ COMMITTED moves the snapshot past the lock wait. Returns the
    /// table's current definition (None: dropped meanwhile).
    async fn lock_table(
        &mut self,
        oid: u32,
        mode: TableLockMode,
    ) -> Result<Option<Arc<TableDef>>, SqlError> {
        let stale = self
            .engine
            .lock_table(self.txn, oid, mode)
            .await
            .map_err(engine_error)?;
        if stale {
            self.refresh_catalog().await?;
        }
        Ok(self.catalog.iter().find(|t| t.oid == oid).cloned())
    }

    /// Re-reads the catalog as of now (see `Engine::refresh_catalog_view`).
    async fn refresh_catalog(&mut self) -> Result<(), SqlError> {
        self.engine.refresh_catalog_view(self.txn);
        self.catalog = self
            .engine
            .relations(self.txn)
            .await
            .map_err(engine_error)?;
        Ok(())
    }

    /// The exclusive lock for DDL on `def`, and its current definition.
    async fn lock_for_ddl(&mut self, def: &TableDef) -> Result<TableDef, SqlError> {
        match self.lock_table(def.oid, TableLockMode::Exclusive).await? {
            Some(d) => Ok((*d).clone()),
            None => Err(SqlError::new(
                "42P01",
                format!("relation \"{}\" does not exist", def.name),
            )),
        }
    }

    /// Every row of the tree at `root` that the transaction sees, in key order.
    async fn scan_whole(
        &mut self,
        root: u64,
        visit: &mut (dyn FnMut(&[u8], Vec<Datum>) -> Result<bool, EngineError> + Send),
    ) -> Result<(), SqlError> {
        self.engine
            .scan(self.txn, root, Bound::Unbounded, Bound::Unbounded, visit)
            .await
            .map_err(engine_error)
    }

    fn check_writable(&self) -> Result<(), SqlError> {
        if self.txn.read_only {
            return Err(SqlError::new(
                "25006",
                "cannot execute this statement in a read-only transaction",
            ));
        }
        Ok(())
    }

    async fn nextvals(&mut self, names: &[String]) -> Result<Vec<Datum>, SqlError> {
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if n.is_empty() {
                out.push(Datum::Null);
                continue;
            }
            let n = n.trim_start_matches("public.");
            let seq = named_relation(&self.catalog, n, RelKind::Sequence).ok_or_else(|| {
                SqlError::new("42P01", format!("relation \"{n}\" does not exist"))
            })?;
            out.push(Datum::Int8(
                self.engine
                    .nextval(self.txn, &seq)
                    .await
                    .map_err(engine_error)?,
            ));
        }
        Ok(out)
    }

    async fn scan_item(
        &mut self,
        item: &FromItem,
    ) -> Result<(Vec<Vec<Datum>>, Vec<Vec<u8>>), SqlError> {
        match item {
            FromItem::Unit => Ok((vec![vec![]], vec![])),
            FromItem::Series { args, ty } => {
                let ctx = self.ctx(&[]);
                let vals: Vec<Datum> = args
                    .iter()
                    .map(|a| expr::eval(a, &[], &ctx))
                    .collect::<Result<_, _>>()?;
                if vals.iter().any(|v| v.is_null()) {
                    return Ok((vec![], vec![]));
                }
                let get = |d: &Datum| {
                    d.as_i64()
                        .or_else(|| expr::cast(d.clone(), Type::Int8, -1).ok()?.as_i64())
                        .unwrap_or(0)
                };
                let (start, stop) = (get(&vals[0]), get(&vals[1]));
                let step = vals.get(2).map(get).unwrap_or(1);
                if step == 0 {
                    return Err(SqlError::new("22023", "step size cannot equal zero"));
                }
                let mut rows = Vec::new();
                let mut v = start;
                while (step > 0 && v <= stop) || (step < 0 && v >= stop) {
                    if rows.len() >= MAX_STATEMENT_ROWS {
                        return Err(SqlError::new(
                            "54000",
                            "generate_series produces too many rows",
                        ));
                    }
                    rows.push(vec![if *ty == Type::Int4 {
                        Datum::Int4(v as i32)
                    } else {
                        Datum::Int8(v)
                    }]);
                    v = match v.checked_add(step) {
                        Some(n) => n,
                        None => break,
                    };
                }
                Ok((rows, vec![]))
            }
            FromItem::Table { def, key } => self.scan_table(def, key, None, None).await,
            FromItem::Derived(p) => Ok((Box::pin(self.select(p)).await?, vec![])),
            FromItem::SetOp {
                op,
                all,
                left,
                right,
                types,
            } => {
                let l = self.set_side(left, types).await?;
                let r = self.set_side(right, types).await?;
                Ok((combine_sets(*op, *all, l, r), vec![]))
            }
        }
    }

    /// One side of a set operation, its values cast to the common types.
    async fn set_side(
        &mut self,
        p: &SelectPlan,
        types: &[Type],
    ) -> Result<Vec<Vec<Datum>>, SqlError> {
        let mut rows = Box::pin(self.select(p)).await?;
        for (i, (c, &ty)) in p.columns.iter().zip(types).enumerate() {
            if c.ty == ty {
                continue;
            }
            for row in &mut rows {
                if let Some(d) = row.get_mut(i) {
                    *d = expr::cast(std::mem::replace(d, Datum::Null), ty, -1)?;
                }
            }
        }
        Ok(rows)
    }

    /// The resolved key of a plan that names one row by its whole primary key
    /// (`Resolved::Point`, or `Empty` for a NULL), as
    /// `scan_table` would look it up; None for any other plan.
    fn point_key(&self, def: &TableDef, key: &KeyPlan) -> Result<Option<Resolved>, SqlError> {
        if key.index.is_some()
            || key.lower.is_some()
            || key.upper.is_some()
            || def.pk.is_empty()
            || key.eq.len() != def.pk.len()
        {
            return Ok(None);
        }
        let ctx = self.ctx(&[]);
        Ok(match plan::resolve(key, def, &ctx)? {
            r @ (Resolved::Empty | Resolved::Point(_)) => Some(r),
            _ => None,
        })
    }

    /// The row of clustered key `key` visible to the statement, if it passes
    /// `filter` (`scan_table` of a `Resolved::Point`).
    async fn point_row(
        &mut self,
        def: &TableDef,
        key: Vec<u8>,
        filter: Option<&Expr>,
    ) -> Result<(Vec<Vec<Datum>>, Vec<Vec<u8>>), SqlError> {
        let Some(row) = self
            .engine
            .get_row(self.txn, def.root, &key)
            .await
            .map_err(engine_error)?
        else {
            return Ok((vec![], vec![]));
        };
        if let Some(f) = filter {
            if !expr::eval_pred(f, &row, &self.ctx(&[]))? {
                return Ok((vec![], vec![]));
            }
        }
        Ok((vec![row], vec![key]))
    }

    /// Rows (and their keys) of `def` in the key plan's range that pass `filter`,
    /// stopping after `limit` matches.
    async fn scan_table(
        &mut self,
        def: &TableDef,
        key: &KeyPlan,
        filter: Option<&Expr>,
        limit: Option<usize>,
    ) -> Result<(Vec<Vec<Datum>>, Vec<Vec<u8>>), SqlError> {
        // Bounds that are the whole filter (`KeyPlan::exact`) and resolved exactly
        // leave the filter nothing to reject.
        let exact = |filter| if key.exact { None } else { filter };
        let (lo, hi, filter) = {
            let ctx = self.ctx(&[]);
            match plan::resolve(key, def, &ctx)? {
                Resolved::Empty => return Ok((vec![], vec![])),
                Resolved::Full => (Bound::Unbounded, Bound::Unbounded, filter),
                Resolved::Range(lo, hi) => (lo, hi, exact(filter)),
                Resolved::Point(k) => return self.point_row(def, k, exact(filter)).await,
            }
        };
        let mut rows = Vec::new();
        let mut keys = Vec::new();
        let mut err = None;
        let ctx = self.ctx(&[]);
        let mut visit = |k: &[u8], row: Vec<Datum>| {
            let pass = match filter {
                Some(f) => match expr::eval_pred(f, &row, &ctx) {
                    Ok(p) => p,
                    Err(e) => {
                        err = Some(e);
                        return Ok(false);
                    }
                },
                None => true,
            };
            if pass {
                rows.push(row);
                keys.push(k.to_vec());
                if rows.len() >= MAX_STATEMENT_ROWS {
                    err = Some(SqlError::new("54000", "statement reads too many rows"));
                    return Ok(false);
                }
            }
            Ok(limit.is_none_or(|l| rows.len() < l))
        };
        let index = key
            .index
            .and_then(|i| def.indexes.get(i))
            .filter(|_| !plan::prefer_seq_scan(def, key, &lo, &hi));
        match index {
            Some(index) => {
                self.engine
                    .index_scan(self.txn, def, index, lo, hi, &mut visit)
                    .await
            }
            // The index range holds most of the table (ANALYZE's statistics): the
            // whole clustered tree instead; the filter is the whole WHERE clause.
            None if key.index.is_some() => {
                self.engine
                    .scan(
                        self.txn,
                        def.root,
                        Bound::Unbounded,
                        Bound::Unbounded,
                        &mut visit,
                    )
                    .await
            }
            None => {
                self.engine
                    .scan(self.txn, def.root, lo, hi, &mut visit)
                    .await
            }
        }
        .map_err(engine_error)?;
        match err {
            Some(e) => Err(e),
            None => Ok((rows, keys)),
        }
    }

    fn limit_value(&self, e: &Option<Expr>) -> Result<Option<usize>, SqlError> {
        match e {
            None => Ok(None),
            Some(e) => {
                let ctx = self.ctx(&[]);
                match expr::eval(e, &[], &ctx)? {
                    Datum::Null => Ok(None),
                    d => {
                        let v = d
                            .as_i64()
                            .or_else(|| expr::cast(d, Type::Int8, -1).ok()?.as_i64())
                            .unwrap_or(0);
                        if v < 0 {
                            return Err(SqlError::new("2201W", "LIMIT must not be negative"));
                        }
                        Ok(Some(v as usize))
                    }
                }
            }
        }
    }

    /// Runs a statement's uncorrelated subqueries, in order, at the statement's
    /// snapshot; each may use the ones before it (its own subqueries). Correlated
    /// ones get their slot now and a value per row later (`correlate`).
    async fn run_subqueries(&mut self, plans: &Arc<[SubPlan]>) -> Result<(), SqlError> {
        if plans.iter().any(|sp| sp.correlated) {
            self.sub_plans = Some(plans.clone());
        }
        for sp in plans.iter() {
            let value = if sp.correlated {
                SubValue::Scalar(Datum::Null)
            } else {
                let rows = self.select(&sp.plan).await?;
                sub_value(sp.kind, rows)?
            };
            Arc::make_mut(self.subs.get_or_insert_with(Arc::default)).push(value);
        }
        Ok(())
    }

    /// Runs the correlated subqueries `slots` for one row of the query they refer
    /// to (PostgreSQL's SubPlans), leaving their values in their slots for the
    /// expressions about to be evaluated on that row. The subqueries see the row
    /// as `Expr::Outer`; a key on an outer column makes each run an index lookup.
    async fn correlate(&mut self, slots: &[usize], row: &[Datum]) -> Result<(), SqlError> {
        let Some(plans) = self.sub_plans.clone() else {
            return Err(SqlError::internal("correlated subquery without its plan"));
        };
        let saved = std::mem::replace(&mut self.outer, Some(Arc::new(row.to_vec())));
        let result = self.run_correlated(&plans, slots).await;
        self.outer = saved;
        result
    }

    async fn run_correlated(&mut self, plans: &[SubPlan], slots: &[usize]) -> Result<(), SqlError> {
        for &slot in slots {
            let sp = plans
                .get(slot)
                .ok_or_else(|| SqlError::internal("correlated subquery slot out of range"))?;
            let rows = Box::pin(self.select(&sp.plan)).await?;
            let value = sub_value(sp.kind, rows)?;
            let subs = Arc::make_mut(self.subs.get_or_insert_with(Arc::default));
            *subs
                .get_mut(slot)
                .ok_or_else(|| SqlError::internal("subquery results out of step"))? = value;
        }
        Ok(())
    }

    /// Keeps the rows (and their keys, when there are as many) that pass a filter
    /// using correlated subqueries, running those for each row first.
    async fn filter_per_row(
        &mut self,
        p: &SelectPlan,
        pre: &[Datum],
        rows: Vec<Vec<Datum>>,
        keys: Vec<Vec<u8>>,
    ) -> Result<(Vec<Vec<Datum>>, Vec<Vec<u8>>), SqlError> {
        let Some(f) = &p.row_filter else {
            return Ok((rows, keys));
        };
        let mut kept = Vec::new();
        let mut kept_keys = Vec::new();
        let mut keys = keys.into_iter();
        for row in rows {
            let key = keys.next();
            self.correlate(&p.filter_subs, &row).await?;
            if expr::eval_pred(f, &row, &self.ctx(pre))? {
                kept.push(row);
                kept_keys.extend(key);
            }
        }
        Ok((kept, kept_keys))
    }

    async fn select(&mut self, p: &SelectPlan) -> Result<Vec<Vec<Datum>>, SqlError> {
        let pre = self.nextvals(&p.nextvals).await?;
        let limit = self.limit_value(&p.limit)?;
        let offset = self.limit_value(&p.offset)?.unwrap_or(0);
        // Fast path: one table, no aggregation/sort/distinct: push filter and limit down.
        // An ordered scan (see `plan::order_plan`) returns rows in ORDER BY order, so
        // the limit applies to it too; the sort below then keeps that order.
        let ordered = matches!(&p.from[..], [JoinStep { item: FromItem::Table { key, .. }, .. }] if key.ordered);
        // Conjuncts with correlated subqueries run per row here, after the scan
        // applied the others (they cannot run inside it), so the limit is not
        // pushed.
        let filter_per_row = p.row_filter.is_some();
        let simple = p.from.len() == 1
            && p.agg.is_none()
            && (p.order.is_empty() || ordered)
            && !p.distinct
            && !filter_per_row;
        // One table: the scan filters, and its rows are the input as they are
        // (joining each to the empty row would copy every value of every row). With
        // aggregation, a sort or DISTINCT the limit applies later, and the filter
        // is pushed down only if it needs no precomputed nextval.
        let one_table = match &p.from[..] {
            [JoinStep {
                item: FromItem::Table { def, key },
                ..
            }] if simple || pre.is_empty() => Some((def, key)),
            _ => None,
        };
        let (input, keys) = if let Some((def, key)) = one_table {
            let pushed = limit.filter(|_| simple).map(|l| l + offset);
            self.scan_table(def, key, p.filter.as_ref(), pushed).await?
        } else {
            let mut acc: Vec<Vec<Datum>> = vec![vec![]];
            let mut keys = vec![];
            for (n, step) in p.from.iter().enumerate() {
                let (rows, k) = self.scan_item(&step.item).await?;
                if n == 0 {
                    keys = k;
                }
                let right_width = step.item.width();
                let mut next = Vec::new();
                for l in &acc {
                    let mut matched = false;
                    for r in &rows {
                        let mut joined = l.clone();
                        joined.extend(r.iter().cloned());
                        let ok = match &step.on {
                            Some(on) => expr::eval_pred(on, &joined, &self.ctx(&pre))?,
                            None => true,
                        };
                        if ok {
                            matched = true;
                            next.push(joined);
                            if next.len() > MAX_STATEMENT_ROWS {
                                return Err(SqlError::new("54000", "join produces too many rows"));
                            }
                        }
                    }
                    if !matched && step.left_outer {
                        let mut joined = l.clone();
                        joined.extend(std::iter::repeat_n(Datum::Null, right_width));
                        next.push(joined);
                    }
                }
                acc = next;
            }
            match &p.filter {
                Some(f) => {
                    let ctx = self.ctx(&pre);
                    let mut kept = Vec::with_capacity(acc.len());
                    let mut kept_keys = Vec::new();
                    for (i, row) in acc.into_iter().enumerate() {
                        if expr::eval_pred(f, &row, &ctx)? {
                            kept.push(row);
                            if let Some(k) = keys.get(i) {
                                kept_keys.push(k.clone());
                            }
                        }
                    }
                    (kept, kept_keys)
                }
                _ => (acc, keys),
            }
        };
        let (mut input, keys) = if filter_per_row {
            self.filter_per_row(p, &pre, input, keys).await?
        } else {
            (input, keys)
        };
        if p.lock {
            if let FromItem::Table { def, .. } = &p.from[0].item {
                let mut locked = Vec::with_capacity(input.len());
                let env = self.env();
                for key in &keys {
                    let filter = &p.filter;
                    let mut decide = |cur: &[Datum]| {
                        let ctx = env.ctx();
                        match filter {
                            Some(f) if !expr::eval_pred(f, cur, &ctx).unwrap_or(false) => {
                                Ok(RowAction::Skip)
                            }
                            _ => Ok(RowAction::Lock),
                        }
                    };
                    match self
                        .engine
                        .modify_row(self.txn, def, key, &mut decide)
                        .await
                        .map_err(engine_error)?
                    {
                        RowOutcome::Done(cur) => locked.push(cur),
                        _ => {} // gone or no longer matching: not returned
                    }
                }
                input = locked;
            }
        }
        // Aggregation.
        let rows_in = if let Some(agg) = &p.agg {
            aggregate(agg, input, &self.ctx(&pre))?
        } else {
            input
        };
        let mut out = Vec::with_capacity(rows_in.len());
        for row in &rows_in {
            // Correlated subqueries in the select list (never aggregated, see
            // `place_correlated`) run for each row before it is projected.
            if !p.project_subs.is_empty() {
                self.correlate(&p.project_subs, row).await?;
            }
            let ctx = self.ctx(&pre);
            if let Some(AggPlan {
                having: Some(h), ..
            }) = &p.agg
            {
                if !expr::eval_pred(h, row, &ctx)? {
                    continue;
                }
            }
            let mut o = Vec::with_capacity(p.project.len());
            for e in &p.project {
                o.push(expr::eval(e, row, &ctx)?);
            }
            out.push(o);
        }
        if p.distinct {
            let visible = p.columns.len();
            let mut seen = HashSet::new();
            out.retain(|r| seen.insert(row_fingerprint(&r[..visible])));
        }
        if !p.order.is_empty() {
            sort_rows(&mut out, &p.order);
        }
        let mut out: Vec<Vec<Datum>> = out.into_iter().skip(offset).collect();
        if let Some(l) = limit {
            out.truncate(l);
        }
        if p.hidden > 0 {
            let visible = p.columns.len();
            for r in &mut out {
                r.truncate(visible);
            }
        }
        Ok(out)
    }

    fn check_row(
        &self,
        t: &TableDef,
        row: &[Datum],
        checks: &[(String, Expr)],
    ) -> Result<(), SqlError> {
        check_not_null(t, row)?;
        let ctx = self.ctx(&[]);
        for (name, e) in checks {
            if expr::eval(e, row, &ctx)? == Datum::Bool(false) {
                return Err(SqlError::new(
                    "23514",
                    format!(
                        "new row for relation \"{}\" violates check constraint \"{name}\"",
                        t.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn row_key(&self, t: &TableDef, row: &[Datum]) -> Result<Vec<u8>, SqlError> {
        let vals: Vec<Datum> = t.pk.iter().map(|&i| row[i].clone()).collect();
        encode_key(&vals).map_err(engine_error)
    }

    async fn hidden_key(&mut self, t: &TableDef) -> Result<Vec<u8>, SqlError> {
        let seq = self.rowid_sequence(t)?;
        self.next_hidden_key(&seq).await
    }

    /// The definition of `t`'s hidden row-id sequence.
    fn rowid_sequence(&self, t: &TableDef) -> Result<Arc<TableDef>, SqlError> {
        let seq_oid = t
            .rowid_seq
            .ok_or_else(|| SqlError::internal("table without key or row id sequence"))?;
        self.catalog
            .iter()
            .find(|s| s.oid == seq_oid)
            .cloned()
            .ok_or_else(|| SqlError::internal("row id sequence missing"))
    }

    async fn next_hidden_key(&mut self, seq: &TableDef) -> Result<Vec<u8>, SqlError> {
        let id = self
            .engine
            .next_rowid(self.txn, seq)
            .await
            .map_err(engine_error)?;
        encode_key(&[Datum::Int8(id)]).map_err(engine_error)
    }

    /// Inserts complete, checked rows (defaults applied, `check_row` passed) as one
    /// engine batch (`Engine::insert_rows`): the bulk path of COPY and of INSERT
    /// without ON CONFLICT or RETURNING. An error names the offending row's index in
    /// `rows` when one row caused it.
    async fn insert_batch(
        &mut self,
        t: &TableDef,
        rows: &[Vec<Datum>],
    ) -> Result<(), (Option<usize>, SqlError)> {
        let mut keys = Vec::with_capacity(rows.len());
        if t.pk.is_empty() {
            // Looked up once per batch, not per row.
            let seq = self.rowid_sequence(t).map_err(|e| (None, e))?;
            for _ in rows {
                keys.push(self.next_hidden_key(&seq).await.map_err(|e| (None, e))?);
            }
        } else {
            for (i, row) in rows.iter().enumerate() {
                keys.push(self.row_key(t, row).map_err(|e| (Some(i), e))?);
            }
        }
        let constraint = pk_constraint(t);
        self.engine
            .insert_rows(self.txn, t, &keys, rows, &constraint)
            .await
            .map_err(|e| (e.row, engine_error(e.error)))
    }

    /// Inserts one complete row (defaults applied); returns false if skipped by ON
    /// CONFLICT DO NOTHING, or the row as finally stored.
    async fn insert_row(
        &mut self,
        p: &InsertPlan,
        row: Vec<Datum>,
    ) -> Result<Option<Vec<Datum>>, SqlError> {
        let t = &p.table;
        self.check_row(t, &row, &p.checks)?;
        let key = if t.pk.is_empty() {
            self.hidden_key(t).await?
        } else {
            self.row_key(t, &row)?
        };
        let constraint = &p.pk_constraint;
        // A conflicting row that disappears before DO UPDATE reaches it lets the
        // insert be retried (as PostgreSQL does), a bounded number of times.
        for _ in 0..MAX_ON_CONFLICT_RETRIES {
            let conflict_key = match self
                .engine
                .insert_row(self.txn, t, &key, &row, constraint)
                .await
            {
                Ok(()) => return Ok(Some(row)),
                Err(EngineError::UniqueViolation {
                    constraint: c,
                    key: conflict_key,
                    detail,
                }) => {
                    let handled = p.on_conflict.is_some()
                        && p.conflict_target.as_ref().is_none_or(|target| *target == c);
                    if !handled {
                        return Err(engine_error(EngineError::UniqueViolation {
                            constraint: c,
                            key: conflict_key,
                            detail,
                        }));
                    }
                    conflict_key
                }
                Err(e) => return Err(engine_error(e)),
            };
            match p.on_conflict.as_ref() {
                Some(OnConflict::Update { sets, filter }) => {
                    let params = self.params.to_vec();
                    let (sets, filter, checks) = (sets.clone(), filter.clone(), p.checks.clone());
                    let env = EvalEnv {
                        params: &params,
                        ..self.env()
                    };
                    let excluded = row.clone();
                    let tdef = t.clone();
                    let mut err = None;
                    let mut decide = |cur: &[Datum]| {
                        let ctx = env.ctx();
                        let mut scope_row = cur.to_vec();
                        scope_row.extend(excluded.iter().cloned());
                        if let Some(f) = &filter {
                            match expr::eval_pred(f, &scope_row, &ctx) {
                                Ok(true) => {}
                                Ok(false) => return Ok(RowAction::Skip),
                                Err(e) => {
                                    err = Some(e);
                                    return Ok(RowAction::Skip);
                                }
                            }
                        }
                        match apply_sets(&tdef, cur, &scope_row, &sets, &checks, &ctx) {
                            Ok(new_row) => Ok(RowAction::Update(new_row)),
                            Err(e) => {
                                err = Some(e);
                                Ok(RowAction::Skip)
                            }
                        }
                    };
                    let out = self
                        .engine
                        .modify_row(self.txn, t, &conflict_key, &mut decide)
                        .await
                        .map_err(engine_error)?;
                    if let Some(e) = err {
                        return Err(e);
                    }
                    match out {
                        RowOutcome::Done(r) => return Ok(Some(r)),
                        RowOutcome::Skipped => return Ok(None),
                        RowOutcome::NotFound => continue,
                    }
                }
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    async fn insert(&mut self, p: &InsertPlan) -> Result<(u64, Vec<Vec<Datum>>), SqlError> {
        self.check_writable()?;
        let t = p.table.clone();
        let sources: Vec<Vec<Option<Datum>>> = match &p.source {
            InsertSource::Values(rows) => {
                let mut out = Vec::with_capacity(rows.len());
                let own: Vec<String> = p.nextvals[..p.values_nextvals].to_vec();
                for r in rows {
                    let pre = self.nextvals(&own).await?;
                    let ctx = self.ctx(&pre);
                    let mut vals = Vec::with_capacity(r.len());
                    for e in r {
                        vals.push(match e {
                            Some(e) => Some(expr::eval(e, &[], &ctx)?),
                            None => None,
                        });
                    }
                    out.push(vals);
                }
                out
            }
            InsertSource::Query(q) => self
                .select(q)
                .await?
                .into_iter()
                .map(|r| r.into_iter().map(Some).collect())
                .collect(),
        };
        let mut count = 0u64;
        let mut returned = Vec::new();
        // Several rows without ON CONFLICT or RETURNING go to the engine in batches.
        let batched = sources.len() > 1 && p.on_conflict.is_none() && p.returning.is_none();
        let mut batch: Vec<Vec<Datum>> = Vec::new();
        for vals in sources {
            let mut row = vec![None; t.columns.len()];
            for (j, v) in vals.into_iter().enumerate() {
                if let Some(&col) = p.targets.get(j) {
                    row[col] = v;
                }
            }
            // Defaults for columns not given (or given as DEFAULT).
            let mut full = Vec::with_capacity(t.columns.len());
            for (i, v) in row.into_iter().enumerate() {
                let c = &t.columns[i];
                let d = match v {
                    Some(d) => d,
                    None => match &p.defaults[i] {
                        Some(e) => {
                            let names = nextval_names(e, &p.nextvals);
                            let pre = self.nextvals(&names).await?;
                            expr::eval(e, &[], &self.ctx(&pre))?
                        }
                        None => Datum::Null,
                    },
                };
                full.push(expr::assign(d, c.ty(), c.typmod)?);
            }
            if batched {
                self.check_row(&t, &full, &p.checks)?;
                batch.push(full);
                if batch.len() >= COPY_BATCH_ROWS {
                    self.insert_batch(&t, &batch).await.map_err(|(_, e)| e)?;
                    count += batch.len() as u64;
                    batch.clear();
                }
                continue;
            }
            if let Some(stored) = self.insert_row(p, full).await? {
                count += 1;
                if let Some(r) = &p.returning {
                    let ctx = self.ctx(&[]);
                    returned.push(
                        r.exprs
                            .iter()
                            .map(|e| expr::eval(e, &stored, &ctx))
                            .collect::<Result<Vec<_>, _>>()?,
                    );
                }
            }
        }
        if !batch.is_empty() {
            self.insert_batch(&t, &batch).await.map_err(|(_, e)| e)?;
            count += batch.len() as u64;
        }
        Ok((count, returned))
    }

    async fn modify(&mut self, p: &ModifyPlan) -> Result<(u64, Vec<Vec<Datum>>), SqlError> {
        self.check_writable()?;
        let t = p.table.clone();
        // A point lookup on the whole primary key goes straight to the engine, which
        // checks the statement's snapshot and predicate on the row where it finds
        // it (`modify_visible_row`), instead of reading the row once here and again
        // to change it.
        // Correlated subqueries (in WHERE or SET) run for each row before the engine
        // checks and changes it, on the values the scan saw; see `expected` below.
        let per_row = !p.row_subs.is_empty();
        let point = if per_row {
            None
        } else {
            self.point_key(&t, &p.key)?
        };
        let (keys, rows, direct) = match point {
            Some(Resolved::Empty) => return Ok((0, vec![])),
            Some(Resolved::Point(key)) => (vec![key], vec![], true),
            _ => {
                let (rows, keys) = self.scan_table(&t, &p.key, p.filter.as_ref(), None).await?;
                (keys, if per_row { rows } else { vec![] }, false)
            }
        };
        let mut count = 0u64;
        let mut returned = Vec::new();
        let mut env = self.env();
        let mut rows = rows.into_iter();
        for key in keys {
            let mut err = None;
            let mut new_key = None;
            // The row the correlated subqueries ran for. The engine may hand the
            // decision a newer version (READ COMMITTED follows a concurrent
            // update); then they run again for that version, as PostgreSQL
            // re-evaluates the whole WHERE on it.
            let mut expected = rows.next();
            if let Some(row) = &expected {
                // The scan applied the other conjuncts to the version its snapshot
                // sees; these must pass on it too, or the row is no candidate
                // (a concurrent update cannot make it one).
                self.correlate(&p.row_subs, row).await?;
                if let Some(f) = &p.row_filter {
                    if !expr::eval_pred(f, row, &self.ctx(&[]))? {
                        continue;
                    }
                }
                env = self.env();
            }
            let mut rechecks = 0;
            let outcome = loop {
                if rechecks > 0 {
                    if let Some(row) = &expected {
                        self.correlate(&p.row_subs, row).await?;
                        env = self.env();
                    }
                }
                let mut changed = None;
                let (filter, sets, checks, tdef) = (&p.filter, &p.sets, &p.checks, &*t);
                let row_filter = &p.row_filter;
                let expected_row = &expected;
                let mut decide = |cur: &[Datum]| {
                    if let Some(exp) = expected_row {
                        if cur != &exp[..] {
                            changed = Some(cur.to_vec());
                            return Ok(RowAction::Skip);
                        }
                    }
                    let ctx = env.ctx();
                    // Re-check the predicate on the version we will change (it may be
                    // newer than the one the scan saw).
                    for f in [filter, row_filter].into_iter().flatten() {
                        match expr::eval_pred(f, cur, &ctx) {
                            Ok(true) => {}
                            Ok(false) => return Ok(RowAction::Skip),
                            Err(e) => {
                                err = Some(e);
                                return Ok(RowAction::Skip);
                            }
                        }
                    }
                    match &sets {
                        None => Ok(RowAction::Delete),
                        Some(sets) => match apply_sets(&tdef, cur, cur, sets, &checks, &ctx) {
                            Ok(new_row) => {
                                if !tdef.pk.is_empty() {
                                    let changed = tdef.pk.iter().any(|&i| {
                                        expr::compare(&cur[i], &new_row[i])
                                            != Some(std::cmp::Ordering::Equal)
                                    });
                                    if changed {
                                        new_key = Some(new_row.clone());
                                        return Ok(RowAction::Delete);
                                    }
                                }
                                Ok(RowAction::Update(new_row))
                            }
                            Err(e) => {
                                err = Some(e);
                                Ok(RowAction::Skip)
                            }
                        },
                    }
                };
                if direct {
                    let mut filter_err = None;
                    let mut matches = |row: &[Datum]| {
                        let Some(f) = &filter else { return Ok(true) };
                        let ctx = env.ctx();
                        match expr::eval_pred(f, row, &ctx) {
                            Ok(pass) => Ok(pass),
                            Err(e) => {
                                filter_err = Some(e);
                                Ok(false)
                            }
                        }
                    };
                    let outcome = self
                        .engine
                        .modify_visible_row(self.txn, &t, &key, &mut matches, &mut decide)
                        .await
                        .map_err(engine_error)?;
                    if let Some(e) = filter_err {
                        return Err(e);
                    }
                    break outcome;
                }
                let outcome = self
                    .engine
                    .modify_row(self.txn, &t, &key, &mut decide)
                    .await
                    .map_err(engine_error)?;
                match changed {
                    Some(newer) if rechecks < MAX_ON_CONFLICT_RETRIES => {
                        rechecks += 1;
                        expected = Some(newer);
                    }
                    Some(_) => {
                        return Err(SqlError::new(
                            "40001",
                            "could not serialize access due to concurrent update",
                        ))
                    }
                    None => break outcome,
                }
            };
            if let Some(e) = err {
                return Err(e);
            }
            if let RowOutcome::Done(row) = outcome {
                let final_row = match new_key {
                    // The key changed: the old row was deleted, insert under the new key.
                    Some(new_row) => {
                        let k = self.row_key(&t, &new_row)?;
                        let constraint = pk_constraint(&t);
                        self.engine
                            .insert_row(self.txn, &t, &k, &new_row, &constraint)
                            .await
                            .map_err(engine_error)?;
                        new_row
                    }
                    None => row,
                };
                count += 1;
                if let Some(r) = &p.returning {
                    let ctx = self.ctx(&[]);
                    returned.push(
                        r.exprs
                            .iter()
                            .map(|e| expr::eval(e, &final_row, &ctx))
                            .collect::<Result<Vec<_>, _>>()?,
                    );
                }
            }
        }
        Ok((count, returned))
    }
}

/// Names of the sequences a default expression draws from, in slot order.
fn nextval_names(e: &Expr, all: &[String]) -> Vec<String> {
    let mut slots = Vec::new();
    collect_precomputed(e, &mut slots);
    let max = slots.iter().copied().max().map(|m| m + 1).unwrap_or(0);
    (0..max)
        .map(|i| {
            if slots.contains(&i) {
                all.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .collect()
}

fn collect_precomputed(e: &Expr, out: &mut Vec<usize>) {
    match e {
        Expr::Precomputed(i, _) => out.push(*i),
        Expr::Binary(_, l, r, _) => {
            collect_precomputed(l, out);
            collect_precomputed(r, out);
        }
        Expr::Cast(x, _, _) | Expr::Neg(x, _) | Expr::Not(x) => collect_precomputed(x, out),
        Expr::Func(_, args, _) => args.iter().for_each(|a| collect_precomputed(a, out)),
        _ => {}
    }
}

fn apply_sets(
    t: &TableDef,
    cur: &[Datum],
    scope_row: &[Datum],
    sets: &[(usize, Expr)],
    checks: &[(String, Expr)],
    ctx: &EvalCtx<'_>,
) -> Result<Vec<Datum>, SqlError> {
    let mut new_row = cur.to_vec();
    for (i, e) in sets {
        let c = &t.columns[*i];
        new_row[*i] = expr::assign(expr::eval(e, scope_row, ctx)?, c.ty(), c.typmod)?;
    }
    check_not_null(t, &new_row)?;
    for (name, e) in checks {
        if expr::eval(e, &new_row, ctx)? == Datum::Bool(false) {
            return Err(SqlError::new(
                "23514",
                format!(
                    "new row for relation \"{}\" violates check constraint \"{name}\"",
                    t.name
                ),
            ));
        }
    }
    Ok(new_row)
}

fn row_fingerprint(r: &[Datum]) -> Vec<u8> {
    let mut v = Vec::new();
    for d in r {
        let _ = borealis_engine::row::encode_key_datum(d, &mut v);
    }
    v
}

fn sort_rows(rows: &mut [Vec<Datum>], order: &[(usize, bool, bool)]) {
    rows.sort_by(|a, b| {
        for &(i, desc, nulls_first) in order {
            let (x, y) = (&a[i], &b[i]);
            let o = match (x.is_null(), y.is_null()) {
                (true, true) => std::cmp::Ordering::Equal,
                (true, false) => {
                    if nulls_first {
                        std::cmp::Ordering::Less
                    } else {
                        std::cmp::Ordering::Greater
                    }
                }
                (false, true) => {
                    if nulls_first {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Less
                    }
                }
                _ => {
                    let o = expr::compare(x, y).unwrap_or(std::cmp::Ordering::Equal);
                    if desc {
                        o.reverse()
                    } else {
                        o
                    }
                }
            };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
}

enum Acc {
    Count(i64),
    Sum(Option<Datum>),
    Avg(Option<Datum>, i64),
    MinMax(Option<Datum>, bool),
}

fn aggregate(
    agg: &AggPlan,
    input: Vec<Vec<Datum>>,
    ctx: &EvalCtx<'_>,
) -> Result<Vec<Vec<Datum>>, SqlError> {
    let mut groups: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut states: Vec<(Vec<Datum>, Vec<Acc>, Vec<HashSet<Vec<u8>>>)> = Vec::new();
    let new_accs = || -> Vec<Acc> {
        agg.calls
            .iter()
            .map(|c| match c.func {
                AggFunc::Count | AggFunc::CountStar => Acc::Count(0),
                AggFunc::Sum => Acc::Sum(None),
                AggFunc::Avg => Acc::Avg(None, 0),
                AggFunc::Min => Acc::MinMax(None, false),
                AggFunc::Max => Acc::MinMax(None, true),
            })
            .collect()
    };
    if agg.group.is_empty() {
        states.push((vec![], new_accs(), vec![HashSet::new(); agg.calls.len()]));
    }
    for row in &input {
        // Without GROUP BY every row is in the one group: no key to build or look
        // up. (Looking up the empty key cost 300 ns a row here: comparing two
        // never-allocated Vecs passes glibc's memcmp a dangling pointer, and its
        // AVX-512 masked load from an unmapped page takes a microcode assist.)
        let idx = if agg.group.is_empty() {
            0
        } else {
            let key_vals: Vec<Datum> = agg
                .group
                .iter()
                .map(|g| expr::eval(g, row, ctx))
                .collect::<Result<_, _>>()?;
            match groups.entry(row_fingerprint(&key_vals)) {
                std::collections::hash_map::Entry::Occupied(e) => *e.get(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    states.push((key_vals, new_accs(), vec![HashSet::new(); agg.calls.len()]));
                    *e.insert(states.len() - 1)
                }
            }
        };
        let (_, accs, seen) = &mut states[idx];
        for (ci, call) in agg.calls.iter().enumerate() {
            let v = match &call.arg {
                Some(a) => expr::eval(a, row, ctx)?,
                None => Datum::Bool(true),
            };
            if call.func != AggFunc::CountStar && v.is_null() {
                continue;
            }
            if call.distinct && !seen[ci].insert(row_fingerprint(std::slice::from_ref(&v))) {
                continue;
            }
            match &mut accs[ci] {
                Acc::Count(n) => *n += 1,
                Acc::Sum(s) => {
                    let v = if call.ty == Type::Int8 {
                        v
                    } else {
                        expr::cast(v, call.ty, -1)?
                    };
                    *s = Some(match s.take() {
                        None => expr::cast(v, call.ty, -1)?,
                        Some(cur) => expr::add(cur, v, call.ty)?,
                    })
                }
                Acc::Avg(s, n) => {
                    let t = if call.ty == Type::Float8 {
                        Type::Float8
                    } else {
                        Type::Numeric
                    };
                    let v = expr::cast(v, t, -1)?;
                    *s = Some(match s.take() {
                        None => v,
                        Some(cur) => expr::add(cur, v, t)?,
                    });
                    *n += 1;
                }
                Acc::MinMax(m, is_max) => {
                    let replace = match m {
                        None => true,
                        Some(cur) => {
                            let o = expr::compare(&v, cur).unwrap_or(std::cmp::Ordering::Equal);
                            if *is_max {
                                o == std::cmp::Ordering::Greater
                            } else {
                                o == std::cmp::Ordering::Less
                            }
                        }
                    };
                    if replace {
                        *m = Some(v);
                    }
                }
            }
        }
    }
    let mut out = Vec::with_capacity(states.len());
    for (keys, accs, _) in states {
        let mut row = keys;
        for acc in accs {
            row.push(match acc {
                Acc::Count(n) => Datum::Int8(n),
                Acc::Sum(s) => s.unwrap_or(Datum::Null),
                Acc::Avg(None, _) => Datum::Null,
                Acc::Avg(Some(s), n) => match s {
                    Datum::Float8(f) => Datum::Float8(f / n as f64),
                    other => {
                        let num =
                            expr::to_numeric(&other).ok_or_else(|| SqlError::internal("avg"))?;
                        Datum::Numeric(
                            num.div(borealis_engine::types::Numeric::from_i64(n))
                                .ok_or_else(|| SqlError::new("22003", "numeric overflow"))?,
                        )
                    }
                },
                Acc::MinMax(m, _) => m.unwrap_or(Datum::Null),
            });
        }
        out.push(row);
    }
    Ok(out)
}

fn rows_result(columns: Vec<Column>, rows: Vec<Vec<Datum>>, tag: String) -> ExecResult {
    ExecResult::Rows {
        columns: Arc::new(columns),
        rows,
        tag,
    }
}

pub(crate) async fn execute(
    s: &mut Session,
    stmt: &Statement,
    params: &[Datum],
    plan: Option<&PlanSlot>,
) -> Result<ExecResult, SqlError> {
    let engine = s.engine().clone();
    let (database, user) = (s.database.clone(), s.user.clone());
    match stmt {
        Statement::ShowVariable { variable } => {
            let name = variable
                .iter()
                .map(|i| i.value.to_lowercase())
                .collect::<Vec<_>>()
                .join(" ");
            let value = show_value(s, &name)?;
            return Ok(rows_result(
                vec![Column::new(name, Type::Text)],
                vec![vec![Datum::Text(value)]],
                "SHOW".into(),
            ));
        }
        Statement::Set(set) => return set_variable(s, set),
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            values,
        } => {
            let catalog = ex_catalog(&engine, s).await?;
            return copy_start(
                s,
                &catalog,
                source,
                *to,
                target,
                options,
                legacy_options,
                values,
            )
            .await;
        }
        _ => {}
    }
    let txn = s.txn_for_statement();
    let catalog = engine.relations(txn).await.map_err(engine_error)?;
    let now = txn.started_at;
    let mut ex = Exec {
        engine: engine.clone(),
        txn,
        params,
        database,
        user,
        now,
        statement_now: now_timestamp(),
        catalog,
        subs: None,
        sub_plans: None,
        outer: None,
    };
    match stmt {
        Statement::Query(_)
        | Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_) => {
            // A transaction's first write to a table takes the table's shared lock
            // (in the engine), so DDL such as an index build never misses its rows.
            // If DDL on the table committed after this statement read the catalog,
            // the write is refused before anything is written and the statement
            // runs again on the new catalog (it then maintains the new index).
            let mut attempts = 0;
            loop {
                match dml(&mut ex, stmt, params, plan).await {
                    Err(e)
                        if e.code == "40001"
                            && e.message == crate::session::CATALOG_CHANGED
                            && attempts < MAX_CATALOG_RETRIES =>
                    {
                        attempts += 1;
                        ex.refresh_catalog().await?;
                    }
                    other => return other,
                }
            }
        }
        Statement::CreateTable(ct) => create_table(&mut ex, ct).await,
        Statement::Drop {
            object_type,
            if_exists,
            names,
            cascade,
            ..
        } => drop_objects(&mut ex, object_type, *if_exists, names, *cascade).await,
        Statement::Truncate(t) => truncate(&mut ex, t).await,
        Statement::AlterTable(at) => alter_table(&mut ex, at).await,
        Statement::CreateIndex(ci) => create_index(&mut ex, ci).await,
        Statement::CreateSequence {
            name,
            if_not_exists,
            sequence_options,
            ..
        } => {
            ex.check_writable()?;
            let n = ident(name);
            if relation_name_taken(&ex.catalog, &n) {
                if *if_not_exists {
                    return Ok(ExecResult::Command {
                        tag: "CREATE SEQUENCE".into(),
                    });
                }
                return Err(relation_exists(&n));
            }
            let def = sequence_def(&ex, sequence_options)?;
            create_sequence(&mut ex, &n, None, def).await?;
            Ok(ExecResult::Command {
                tag: "CREATE SEQUENCE".into(),
            })
        }
        Statement::Vacuum(v) => {
            // Prunes row versions no snapshot can see any more, table by table.
            for t in maintained_tables(&ex.catalog, v.table_name.as_ref())? {
                ex.engine.vacuum_table(&t).await.map_err(engine_error)?;
            }
            // And puts the trees of dropped, truncated and rewritten tables that no
            // snapshot can see any more on the free-page list (also done in the
            // background).
            ex.engine.reclaim().await.map_err(engine_error)?;
            Ok(ExecResult::Command {
                tag: "VACUUM".into(),
            })
        }
        Statement::Analyze(a) => {
            ex.check_writable()?;
            for t in maintained_tables(&ex.catalog, a.table_name.as_ref())? {
                analyze(&mut ex, &t).await?;
            }
            Ok(ExecResult::Command {
                tag: "ANALYZE".into(),
            })
        }
        Statement::Explain {
            statement, analyze, ..
        } => {
            if *analyze {
                return Err(SqlError::unsupported("EXPLAIN ANALYZE"));
            }
            let lines = explain(&ex.catalog, statement, &ex.ctx(&[]))?;
            let rows = lines.into_iter().map(|l| vec![Datum::Text(l)]).collect();
            Ok(rows_result(
                vec![Column::new("QUERY PLAN", Type::Text)],
                rows,
                "EXPLAIN".into(),
            ))
        }
        other => Err(SqlError::unsupported(format!(
            "statement \"{}\"",
            first_words(&other.to_string())
        ))),
    }
}

/// Runs a query, INSERT, UPDATE or DELETE, with the plan in `slot` when it still
/// fits (see [`CachedPlan`]), else binding it (and keeping it in `slot`).
async fn dml(
    ex: &mut Exec<'_>,
    stmt: &Statement,
    params: &[Datum],
    slot: Option<&PlanSlot>,
) -> Result<ExecResult, SqlError> {
    let param_types: Vec<Type> = params.iter().map(|p| p.type_of()).collect();
    let cached = slot.and_then(|slot| {
        let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|plan| plan.fits(&ex.catalog, &param_types))
            .cloned()
    });
    let plan = match cached {
        Some(plan) => plan,
        None => {
            let (bound, subplans, _) = bind_statement(&ex.catalog, stmt, &param_types)?;
            let Some(bound) = bound else {
                return Err(SqlError::internal("unbound statement"));
            };
            let columns = match &bound {
                Bound_::Select(p) => Some(&p.columns),
                Bound_::Insert(p) => p.returning.as_ref().map(|r| &r.columns),
                Bound_::Modify(p) => p.returning.as_ref().map(|r| &r.columns),
            }
            .map(|c| Arc::new(c.clone()));
            let plan = Arc::new(CachedPlan {
                catalog: ex.catalog.clone(),
                param_types,
                bound,
                subplans: subplans.into(),
                columns,
            });
            if let Some(slot) = slot {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(plan.clone());
            }
            plan
        }
    };
    let columns = || plan.columns.clone().unwrap_or_default();
    ex.run_subqueries(&plan.subplans).await?;
    match &plan.bound {
        Bound_::Select(p) => {
            let rows = ex.select(p).await?;
            let n = rows.len();
            Ok(ExecResult::Rows {
                columns: columns(),
                rows,
                tag: count_tag("SELECT ", n as u64),
            })
        }
        Bound_::Insert(p) => {
            let (n, ret) = ex.insert(p).await?;
            let tag = count_tag("INSERT 0 ", n);
            Ok(match &p.returning {
                Some(_) => ExecResult::Rows {
                    columns: columns(),
                    rows: ret,
                    tag,
                },
                None => ExecResult::Command { tag },
            })
        }
        Bound_::Modify(p) => {
            let (n, ret) = ex.modify(p).await?;
            let tag = if p.sets.is_some() {
                count_tag("UPDATE ", n)
            } else {
                count_tag("DELETE ", n)
            };
            Ok(match &p.returning {
                Some(_) => ExecResult::Rows {
                    columns: columns(),
                    rows: ret,
                    tag,
                },
                None => ExecResult::Command { tag },
            })
        }
    }
}

/// A command tag with a row count ("UPDATE 1"), built without the formatting
/// machinery: every DML execution makes one.
fn count_tag(prefix: &str, n: u64) -> String {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut tag = String::with_capacity(prefix.len() + digits.len() - at);
    tag.push_str(prefix);
    for &d in &digits[at..] {
        tag.push(char::from(d));
    }
    tag
}

async fn ex_catalog(engine: &Engine, s: &mut Session) -> Result<Vec<Arc<TableDef>>, SqlError> {
    let txn = s.txn_for_statement();
    engine.relations(txn).await.map_err(engine_error)
}

fn first_words(sql: &str) -> String {
    sql.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn isolation_name(iso: borealis_engine::Isolation) -> &'static str {
    match iso {
        borealis_engine::Isolation::RepeatableRead => "repeatable read",
        borealis_engine::Isolation::ReadCommitted => "read committed",
    }
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.into()
}

fn show_value(s: &Session, name: &str) -> Result<String, SqlError> {
    if let Some(v) = s.settings.get(name) {
        return Ok(v.clone());
    }
    Ok(match name {
        "server_version" => "15.0".into(),
        "server_version_num" => "150000".into(),
        "transaction isolation level" | "transaction_isolation" => {
            isolation_name(s.txn.as_ref().map_or(s.default_isolation, |t| t.isolation)).into()
        }
        "default_transaction_isolation" => isolation_name(s.default_isolation).into(),
        "transaction_read_only" => {
            on_off(s.txn.as_ref().map_or(s.default_read_only, |t| t.read_only))
        }
        "default_transaction_read_only" => on_off(s.default_read_only),
        "timezone" => "UTC".into(),
        "datestyle" => "ISO, MDY".into(),
        "client_encoding" | "server_encoding" => "UTF8".into(),
        "standard_conforming_strings" => "on".into(),
        "search_path" => "\"$user\", public".into(),
        "max_connections" => "100".into(),
        "lc_collate" | "lc_ctype" => "C".into(),
        "integer_datetimes" => "on".into(),
        "statement_timeout" | "lock_timeout" | "idle_in_transaction_session_timeout" => "0".into(),
        "application_name" => String::new(),
        other => {
            return Err(SqlError::new(
                "42704",
                format!("unrecognized configuration parameter \"{other}\""),
            ))
        }
    })
}

fn parse_isolation(value: &str) -> Result<borealis_engine::Isolation, SqlError> {
    match value.trim().to_lowercase().as_str() {
        "read committed" | "read uncommitted" | "default" => {
            Ok(borealis_engine::Isolation::ReadCommitted)
        }
        "repeatable read" => Ok(borealis_engine::Isolation::RepeatableRead),
        "serializable" => Err(unsupported_isolation("SERIALIZABLE")),
        other => Err(SqlError::new(
            "22023",
            format!("invalid value for parameter \"default_transaction_isolation\": \"{other}\""),
        )),
    }
}

/// A Boolean setting: the words `boolean` input takes, or DEFAULT (off).
fn parse_bool(name: &str, value: &str) -> Result<bool, SqlError> {
    if value.trim().eq_ignore_ascii_case("default") {
        return Ok(false);
    }
    match Datum::parse_text(Type::Bool, value) {
        Ok(Datum::Bool(b)) => Ok(b),
        _ => Err(SqlError::new(
            "22023",
            format!("parameter \"{name}\" requires a Boolean value"),
        )),
    }
}

fn set_variable(s: &mut Session, set: &ast::Set) -> Result<ExecResult, SqlError> {
    match set {
        ast::Set::SingleAssignment {
            variable, values, ..
        } => {
            let name = variable.to_string().to_lowercase();
            let value = values
                .iter()
                .map(|v| match v {
                    ast::Expr::Value(v) => match &v.value {
                        ast::Value::SingleQuotedString(s) => s.clone(),
                        other => other.to_string(),
                    },
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ");
            // The transaction settings are kept where transactions read them, not
            // as strings nobody reads (that would be silently weaker).
            match name.as_str() {
                "default_transaction_isolation" => {
                    s.default_isolation = parse_isolation(&value)?;
                }
                "default_transaction_read_only" => s.default_read_only = parse_bool(&name, &value)?,
                "transaction_isolation" | "transaction_read_only" => {
                    return Err(SqlError::unsupported(format!(
                        "SET {name} (use SET TRANSACTION)"
                    )))
                }
                _ => {
                    s.settings.insert(name, value);
                }
            }
            Ok(ExecResult::Command { tag: "SET".into() })
        }
        ast::Set::SetTimeZone { value, .. } => {
            let v = value.to_string().trim_matches('\'').to_string();
            if !v.eq_ignore_ascii_case("utc") && v != "0" && !v.eq_ignore_ascii_case("gmt") {
                return Err(SqlError::unsupported(format!("time zone {v} (only UTC)")));
            }
            s.settings.insert("timezone".into(), "UTC".into());
            Ok(ExecResult::Command { tag: "SET".into() })
        }
        ast::Set::SetNames { .. } | ast::Set::SetNamesDefault {} => {
            Ok(ExecResult::Command { tag: "SET".into() })
        }
        other => Err(SqlError::unsupported(format!("SET form {other}"))),
    }
}

fn explain(
    catalog: &[Arc<TableDef>],
    stmt: &Statement,
    ctx: &EvalCtx<'_>,
) -> Result<Vec<String>, SqlError> {
    let (bound, subplans, _) = bind_statement(catalog, stmt, &[])?;
    let mut lines = Vec::new();
    match bound {
        Some(Bound_::Select(p)) => explain_select(&p, ctx, &mut lines),
        Some(Bound_::Modify(p)) => {
            lines.push(format!(
                "{} on {}",
                if p.sets.is_some() { "Update" } else { "Delete" },
                p.table.name
            ));
            for l in explain_scan(&p.table, &p.key, p.filter.is_some(), ctx) {
                lines.push(format!("  ->  {l}"));
            }
        }
        Some(Bound_::Insert(p)) => {
            lines.push(format!("Insert on {}", p.table.name));
            lines.push("  ->  Values Scan".into());
        }
        None => return Err(SqlError::unsupported("EXPLAIN of this statement")),
    }
    // Uncorrelated subqueries run once, before the statement (PostgreSQL's
    // InitPlans); correlated ones for each row of their query (SubPlans).
    for (i, sp) in subplans.iter().enumerate() {
        let what = if sp.correlated { "SubPlan" } else { "InitPlan" };
        lines.push(format!("  {what} {} (returns ${i})", i + 1));
        let mut sub = Vec::new();
        explain_select(&sp.plan, ctx, &mut sub);
        for (j, l) in sub.into_iter().enumerate() {
            lines.push(if j == 0 {
                format!("    ->  {l}")
            } else {
                format!("        {l}")
            });
        }
    }
    Ok(lines)
}

/// EXPLAIN's lines for one scan: the access path `scan_table` will take.
fn explain_scan(def: &TableDef, key: &KeyPlan, filter: bool, ctx: &EvalCtx<'_>) -> Vec<String> {
    let mut v = Vec::new();
    // The same choice `scan_table` makes once the bounds are known.
    let whole_table = key.index.is_some()
        && match plan::resolve(key, def, ctx) {
            Ok(Resolved::Range(lo, hi)) => plan::prefer_seq_scan(def, key, &lo, &hi),
            Ok(Resolved::Full) => {
                plan::prefer_seq_scan(def, key, &Bound::Unbounded, &Bound::Unbounded)
            }
            _ => false,
        };
    if key.is_seq_scan() || whole_table {
        v.push(format!("Seq Scan on {}", def.name));
    } else {
        v.push(format!(
            "Index Scan using {} on {}",
            key.index_name(def),
            def.name
        ));
        if !key.is_full_scan() {
            v.push(format!("  Index Cond: ({})", key.describe(def)));
        }
    }
    if filter {
        v.push("  Filter: (re-checked WHERE clause)".into());
    }
    v
}

/// A nested plan's lines as a child at `indent` columns.
fn explain_nested(p: &SelectPlan, ctx: &EvalCtx<'_>, indent: usize, lines: &mut Vec<String>) {
    let mut sub = Vec::new();
    explain_select(p, ctx, &mut sub);
    let pad = " ".repeat(indent.saturating_sub(4));
    for (j, l) in sub.into_iter().enumerate() {
        lines.push(if j == 0 {
            format!("{pad}->  {l}")
        } else {
            format!("{pad}    {l}")
        });
    }
}

fn explain_select(p: &SelectPlan, ctx: &EvalCtx<'_>, lines: &mut Vec<String>) {
    let mut indent = 0;
    let mut push = |s: String, lines: &mut Vec<String>| {
        let prefix = if indent == 0 {
            String::new()
        } else {
            format!("{}->  ", " ".repeat(indent * 2 - 2))
        };
        lines.push(format!("{prefix}{s}"));
        indent += 1;
    };
    if p.limit.is_some() || p.offset.is_some() {
        push("Limit".into(), lines);
    }
    if !p.order.is_empty() {
        push("Sort".into(), lines);
    }
    if p.distinct {
        push("Unique".into(), lines);
    }
    if let Some(a) = &p.agg {
        push(
            if a.group.is_empty() {
                "Aggregate".into()
            } else {
                "HashAggregate".into()
            },
            lines,
        );
    }
    if p.from.len() > 1 {
        push("Nested Loop".into(), lines);
    }
    for step in &p.from {
        let pad = if indent == 0 {
            String::new()
        } else {
            format!("{}->  ", " ".repeat(indent * 2 - 2))
        };
        match &step.item {
            FromItem::Table { def, key } => {
                for (i, l) in
                    explain_scan(def, key, p.filter.is_some() || p.row_filter.is_some(), ctx)
                        .into_iter()
                        .enumerate()
                {
                    lines.push(if i == 0 {
                        format!("{pad}{l}")
                    } else {
                        format!("{}{l}", " ".repeat(pad.len()))
                    });
                }
            }
            FromItem::Series { .. } => lines.push(format!("{pad}Function Scan on generate_series")),
            FromItem::Unit => lines.push(format!("{pad}Result")),
            FromItem::Derived(inner) => {
                lines.push(format!("{pad}Subquery Scan"));
                explain_nested(inner, ctx, pad.len() + 6, lines);
            }
            FromItem::SetOp {
                op,
                all,
                left,
                right,
                ..
            } => {
                lines.push(match (op, all) {
                    (SetOpKind::Union, true) => format!("{pad}Append"),
                    (SetOpKind::Union, false) => format!("{pad}HashAggregate (Append)"),
                    (op, true) => format!("{pad}HashSetOp {} All", op.name()),
                    (op, false) => format!("{pad}HashSetOp {}", op.name()),
                });
                explain_nested(left, ctx, pad.len() + 6, lines);
                explain_nested(right, ctx, pad.len() + 6, lines);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// DDL

/// CREATE SEQUENCE options, with PostgreSQL's defaults for ascending and
/// descending sequences.
fn sequence_def(ex: &Exec<'_>, options: &[ast::SequenceOptions]) -> Result<SequenceDef, SqlError> {
    let int = |e: &ast::Expr| -> Result<i64, SqlError> {
        let b = Binder::new(&ex.catalog).bind(&Scope::default(), e, Some(Type::Int8));
        let v = expr::eval(&b?, &[], &ex.ctx(&[]))?;
        v.as_i64()
            .or_else(|| expr::cast(v, Type::Int8, -1).ok()?.as_i64())
            .ok_or_else(|| SqlError::new("22023", format!("invalid sequence option value {e}")))
    };
    let (mut increment, mut min, mut max, mut start, mut cycle) = (1i64, None, None, None, false);
    for o in options {
        match o {
            ast::SequenceOptions::IncrementBy(e, _) => increment = int(e)?,
            ast::SequenceOptions::MinValue(e) => min = e.as_ref().map(int).transpose()?,
            ast::SequenceOptions::MaxValue(e) => max = e.as_ref().map(int).transpose()?,
            ast::SequenceOptions::StartWith(e, _) => start = Some(int(e)?),
            ast::SequenceOptions::Cache(_) => {}
            ast::SequenceOptions::Cycle(no) => cycle = !*no,
        }
    }
    if increment == 0 {
        return Err(SqlError::new("22023", "INCREMENT must not be zero"));
    }
    let min_value = min.unwrap_or(if increment > 0 { 1 } else { i64::MIN });
    let max_value = max.unwrap_or(if increment > 0 { i64::MAX } else { -1 });
    let start = start.unwrap_or(if increment > 0 { min_value } else { max_value });
    if min_value >= max_value {
        return Err(SqlError::new(
            "22023",
            format!("MINVALUE ({min_value}) must be less than MAXVALUE ({max_value})"),
        ));
    }
    if start < min_value || start > max_value {
        return Err(SqlError::new(
            "22023",
            format!("START value ({start}) cannot be outside [{min_value}, {max_value}]"),
        ));
    }
    Ok(SequenceDef {
        increment,
        min_value,
        max_value,
        start,
        cycle,
        owned_by: None,
    })
}

fn default_sequence() -> SequenceDef {
    SequenceDef {
        increment: 1,
        min_value: 1,
        max_value: i64::MAX,
        start: 1,
        cycle: false,
        owned_by: None,
    }
}

async fn create_sequence(
    ex: &mut Exec<'_>,
    name: &str,
    owned_by: Option<(u32, usize)>,
    mut seq: SequenceDef,
) -> Result<u32, SqlError> {
    seq.owned_by = owned_by;
    let start = seq.start;
    let (oid, root) = ex
        .engine
        .allocate_relation(ex.txn)
        .await
        .map_err(engine_error)?;
    let def = TableDef {
        oid,
        name: name.to_string(),
        kind: RelKind::Sequence,
        columns: vec![],
        pk: vec![],
        pk_name: None,
        root,
        indexes: vec![],
        checks: vec![],
        rowid_seq: None,
        sequence: Some(seq),
        stats: None,
    };
    ex.engine
        .put_relation(ex.txn, &def, true)
        .await
        .map_err(engine_error)?;
    ex.engine
        .set_sequence(ex.txn, oid, start, false)
        .await
        .map_err(engine_error)?;
    ex.catalog.push(Arc::new(def));
    Ok(oid)
}

async fn create_table(ex: &mut Exec<'_>, ct: &ast::CreateTable) -> Result<ExecResult, SqlError> {
    ex.check_writable()?;
    schema_ok(&ct.name)?;
    let name = ident(&ct.name);
    if ct.query.is_some() || ct.like.is_some() {
        return Err(SqlError::unsupported("CREATE TABLE AS / LIKE"));
    }
    if relation_name_taken(&ex.catalog, &name) {
        if ct.if_not_exists {
            return Ok(ExecResult::Command {
                tag: "CREATE TABLE".into(),
            });
        }
        return Err(relation_exists(&name));
    }
    let mut columns = Vec::new();
    let mut pk: Vec<usize> = Vec::new();
    let mut pk_name = None;
    let mut checks = Vec::new();
    let mut serials = Vec::new();
    // UNIQUE constraints: (constraint name, columns), enforced by unique indexes.
    let mut uniques: Vec<(Option<String>, Vec<usize>)> = Vec::new();
    for (i, c) in ct.columns.iter().enumerate() {
        let type_text = c.data_type.to_string();
        let serial = expr::is_serial(&type_text);
        let (ty, typmod) = match serial {
            Some(t) => (t, -1),
            None => expr::parse_type_name(&type_text)?,
        };
        if columns
            .iter()
            .any(|x: &ColumnDef| x.name == expr::norm(&c.name))
        {
            return Err(SqlError::new(
                "42701",
                format!(
                    "column \"{}\" specified more than once",
                    expr::norm(&c.name)
                ),
            ));
        }
        let mut col = ColumnDef {
            name: expr::norm(&c.name),
            type_oid: ty.oid(),
            typmod,
            not_null: serial.is_some(),
            default: None,
        };
        for opt in &c.options {
            match &opt.option {
                ast::ColumnOption::NotNull => col.not_null = true,
                ast::ColumnOption::Null => {}
                ast::ColumnOption::Default(e) => col.default = Some(e.to_string()),
                ast::ColumnOption::PrimaryKey(_) => {
                    if !pk.is_empty() {
                        return Err(SqlError::new(
                            "42P16",
                            format!("multiple primary keys for table \"{name}\" are not allowed"),
                        ));
                    }
                    pk = vec![i];
                    pk_name = opt.name.as_ref().map(|n| expr::norm(n));
                    col.not_null = true;
                }
                ast::ColumnOption::Check(cc) => checks.push(CheckDef {
                    name: opt
                        .name
                        .as_ref()
                        .map(|n| expr::norm(n))
                        .unwrap_or_else(|| format!("{name}_{}_check", expr::norm(&c.name))),
                    expr: cc.expr.to_string(),
                }),
                ast::ColumnOption::Unique(u) => {
                    if u.nulls_distinct == ast::NullsDistinctOption::NotDistinct {
                        return Err(SqlError::unsupported("NULLS NOT DISTINCT"));
                    }
                    uniques.push((opt.name.as_ref().map(|n| expr::norm(n)), vec![i]));
                }
                ast::ColumnOption::ForeignKey(_) => {
                    return Err(SqlError::unsupported("foreign keys"))
                }
                other => return Err(SqlError::unsupported(format!("column option {other}"))),
            }
        }
        if serial.is_some() {
            serials.push(i);
        }
        columns.push(col);
    }
    for tc in &ct.constraints {
        match tc {
            ast::TableConstraint::PrimaryKey(p) => {
                if !pk.is_empty() {
                    return Err(SqlError::new(
                        "42P16",
                        format!("multiple primary keys for table \"{name}\" are not allowed"),
                    ));
                }
                for ic in &p.columns {
                    let cname = expr::expr_name(&ic.column.expr);
                    let i = columns
                        .iter()
                        .position(|c| c.name == cname)
                        .ok_or_else(|| {
                            SqlError::new(
                                "42703",
                                format!("column \"{cname}\" named in key does not exist"),
                            )
                        })?;
                    columns[i].not_null = true;
                    pk.push(i);
                }
                pk_name = p.name.as_ref().map(|n| expr::norm(n));
            }
            ast::TableConstraint::Check(cc) => checks.push(CheckDef {
                name: cc
                    .name
                    .as_ref()
                    .map(|n| expr::norm(n))
                    .unwrap_or_else(|| format!("{name}_check")),
                expr: cc.expr.to_string(),
            }),
            ast::TableConstraint::Unique(u) => {
                if u.nulls_distinct == ast::NullsDistinctOption::NotDistinct {
                    return Err(SqlError::unsupported("NULLS NOT DISTINCT"));
                }
                let mut cols = Vec::new();
                for ic in &u.columns {
                    let cname = expr::expr_name(&ic.column.expr);
                    cols.push(
                        columns
                            .iter()
                            .position(|c| c.name == cname)
                            .ok_or_else(|| {
                                SqlError::new(
                                    "42703",
                                    format!("column \"{cname}\" named in key does not exist"),
                                )
                            })?,
                    );
                }
                uniques.push((u.name.as_ref().map(|n| expr::norm(n)), cols));
            }
            ast::TableConstraint::ForeignKey(_) => {
                return Err(SqlError::unsupported("foreign keys"))
            }
            other => return Err(SqlError::unsupported(format!("table constraint {other}"))),
        }
    }
    // Check expressions must bind against the new table's columns.
    let probe = TableDef {
        oid: 0,
        name: name.clone(),
        kind: RelKind::Table,
        columns: columns.clone(),
        pk: pk.clone(),
        pk_name: pk_name.clone(),
        root: 0,
        indexes: vec![],
        checks: checks.clone(),
        rowid_seq: None,
        sequence: None,
        stats: None,
    };
    let mut probe_binder = Binder::new(&ex.catalog);
    probe_binder.checks(&probe)?;
    probe_binder.defaults(&probe)?;
    let (oid, root) = ex
        .engine
        .allocate_relation(ex.txn)
        .await
        .map_err(engine_error)?;
    for &i in &serials {
        let seq_name = format!("{name}_{}_seq", columns[i].name);
        create_sequence(ex, &seq_name, Some((oid, i)), default_sequence()).await?;
        columns[i].default = Some(format!("nextval('{seq_name}'::regclass)"));
    }
    let rowid_seq = if pk.is_empty() {
        Some(
            create_sequence(
                ex,
                &format!("{name}_rowid_seq"),
                Some((oid, ROWID_COLUMN)),
                default_sequence(),
            )
            .await?,
        )
    } else {
        None
    };
    let mut def = TableDef {
        oid,
        name,
        kind: RelKind::Table,
        columns,
        pk,
        pk_name,
        root,
        indexes: vec![],
        checks,
        rowid_seq,
        sequence: None,
        stats: None,
    };
    // The table is empty: each unique index starts as an empty tree.
    for (name, cols) in uniques {
        let name = match name {
            Some(n) => n,
            None => free_relation_name(&ex.catalog, &def, &cols, "key"),
        };
        if relation_name_taken(&ex.catalog, &name) || def.indexes.iter().any(|i| i.name == name) {
            return Err(relation_exists(&name));
        }
        let root = ex.engine.new_root(ex.txn).await.map_err(engine_error)?;
        def.indexes.push(IndexDef {
            oid: 0,
            name,
            columns: cols,
            unique: true,
            primary: false,
            root,
            constraint: true,
        });
    }
    ex.engine
        .put_relation(ex.txn, &def, true)
        .await
        .map_err(engine_error)?;
    Ok(ExecResult::Command {
        tag: "CREATE TABLE".into(),
    })
}

async fn drop_objects(
    ex: &mut Exec<'_>,
    object_type: &ast::ObjectType,
    if_exists: bool,
    names: &[ast::ObjectName],
    cascade: bool,
) -> Result<ExecResult, SqlError> {
    ex.check_writable()?;
    let (kind, tag) = match object_type {
        ast::ObjectType::Table => (RelKind::Table, "DROP TABLE"),
        ast::ObjectType::Sequence => (RelKind::Sequence, "DROP SEQUENCE"),
        ast::ObjectType::Index => {
            for n in names {
                let iname = ident(n);
                let owner = ex
                    .catalog
                    .iter()
                    .find(|t| t.indexes.iter().any(|i| i.name == iname))
                    .cloned();
                match owner {
                    Some(t) => {
                        if let Some(c) = t.indexes.iter().find(|i| i.name == iname && i.constraint)
                        {
                            return Err(SqlError::new(
                                "2BP01",
                                format!(
                                    "cannot drop index {} because constraint {} on table {} requires it",
                                    c.name, c.name, t.name
                                ),
                            ));
                        }
                        // Its pages are abandoned (there is no free-space map yet).
                        let mut def = ex.lock_for_ddl(&t).await?;
                        def.indexes.retain(|i| i.name != iname);
                        ex.engine
                            .put_relation(ex.txn, &def, false)
                            .await
                            .map_err(engine_error)?;
                    }
                    None if if_exists => {}
                    None => {
                        return Err(SqlError::new(
                            "42704",
                            format!("index \"{iname}\" does not exist"),
                        ))
                    }
                }
            }
            return Ok(ExecResult::Command {
                tag: "DROP INDEX".into(),
            });
        }
        other => return Err(SqlError::unsupported(format!("DROP {other}"))),
    };
    for n in names {
        schema_ok(n)?;
        let name = ident(n);
        let Some(t) = named_relation(&ex.catalog, &name, kind) else {
            if if_exists {
                continue;
            }
            return Err(SqlError::new(
                "42P01",
                format!(
                    "{} \"{name}\" does not exist",
                    if kind == RelKind::Table {
                        "table"
                    } else {
                        "sequence"
                    }
                ),
            ));
        };
        if kind == RelKind::Sequence {
            check_sequence_unused(&ex.catalog, &t, cascade)?;
        }
        // Writers of the table finish first (its indexes go with its catalog entry).
        if kind == RelKind::Table {
            ex.lock_for_ddl(&t).await?;
        }
        ex.engine
            .drop_relation(ex.txn, t.oid)
            .await
            .map_err(engine_error)?;
        // Sequences owned by the table's columns go with it.
        let owned: Vec<u32> = ex
            .catalog
            .iter()
            .filter(|s| {
                s.sequence
                    .as_ref()
                    .and_then(|d| d.owned_by)
                    .is_some_and(|(o, _)| o == t.oid)
            })
            .map(|s| s.oid)
            .collect();
        for oid in owned {
            ex.engine
                .drop_relation(ex.txn, oid)
                .await
                .map_err(engine_error)?;
        }
        ex.catalog.retain(|x| x.oid != t.oid);
    }
    Ok(ExecResult::Command { tag: tag.into() })
}

/// PostgreSQL refuses to drop a sequence that a column default still calls (the
/// default depends on it): 2BP01 unless CASCADE, which would drop the default too.
/// Without the check the drop succeeded and every later INSERT relying on the
/// default failed.
fn check_sequence_unused(
    catalog: &[Arc<TableDef>],
    seq: &TableDef,
    cascade: bool,
) -> Result<(), SqlError> {
    let name = &seq.name;
    // How defaults name a sequence: serial's `nextval('s'::regclass)` or a user's
    // `nextval('s')` (unquoted names are stored folded to lower case).
    let call = format!("nextval('{name}'");
    let user = catalog.iter().find_map(|t| {
        let c = t.columns.iter().find(|c| {
            c.default
                .as_deref()
                .is_some_and(|d| d.to_lowercase().contains(&call))
        })?;
        Some((t, c))
    });
    let Some((table, column)) = user else {
        return Ok(());
    };
    if cascade {
        return Err(SqlError::unsupported(
            "DROP SEQUENCE ... CASCADE of a sequence a column default uses",
        ));
    }
    Err(SqlError::new(
        "2BP01",
        format!("cannot drop sequence {name} because other objects depend on it"),
    )
    .with_detail(format!(
        "default value for column {} of table {} depends on sequence {name}",
        column.name, table.name
    ))
    .with_hint("Use DROP ... CASCADE to drop the dependent objects too."))
}

async fn truncate(ex: &mut Exec<'_>, t: &ast::Truncate) -> Result<ExecResult, SqlError> {
    ex.check_writable()?;
    for target in &t.table_names {
        let def = find_table(&ex.catalog, &target.name)?;
        let mut new_def = ex.lock_for_ddl(&def).await?;
        // A fresh tree: snapshots older than this transaction keep reading the old
        // root through their view of the catalog, so TRUNCATE is MVCC-safe. Each
        // index gets a fresh, empty tree too.
        new_def.root = ex.engine.new_root(ex.txn).await.map_err(engine_error)?;
        for index in new_def.indexes.iter_mut().filter(|i| i.is_built()) {
            index.root = ex.engine.new_root(ex.txn).await.map_err(engine_error)?;
        }
        ex.engine
            .put_relation(ex.txn, &new_def, false)
            .await
            .map_err(engine_error)?;
    }
    Ok(ExecResult::Command {
        tag: "TRUNCATE TABLE".into(),
    })
}

/// The tables VACUUM or ANALYZE works on: the one named, or every table.
fn maintained_tables(
    catalog: &[Arc<TableDef>],
    name: Option<&ast::ObjectName>,
) -> Result<Vec<Arc<TableDef>>, SqlError> {
    Ok(match name {
        Some(n) => vec![find_table(catalog, n)?],
        None => catalog
            .iter()
            .filter(|t| t.kind == RelKind::Table)
            .cloned()
            .collect(),
    })
}

/// Rows ANALYZE keeps for its histograms (PostgreSQL samples 300 × the statistics
/// target, 30,000 by default).
const ANALYZE_SAMPLE_ROWS: usize = 30_000;
/// Buckets of an index histogram.
const HISTOGRAM_BUCKETS: usize = 20;

/// ANALYZE of one table: counts the rows its snapshot sees and keeps a uniform
/// sample of them (reservoir sampling over one scan, seeded by the table so runs
/// repeat), from which each secondary index gets an equi-depth histogram of its
/// keys; stored in the catalog entry, where the planner reads them
/// (`plan::prefer_seq_scan`). Takes the table's shared lock, as DML does: DDL in
/// progress is waited for and its catalog entry is the one updated.
async fn analyze(ex: &mut Exec<'_>, def: &TableDef) -> Result<(), SqlError> {
    let mut def = match ex.lock_table(def.oid, TableLockMode::Shared).await? {
        Some(d) => (*d).clone(),
        None => {
            return Err(SqlError::new(
                "42P01",
                format!("relation \"{}\" does not exist", def.name),
            ))
        }
    };
    let indexes: Vec<IndexDef> = def.secondary_indexes().cloned().collect();
    let mut rows: u64 = 0;
    let mut sample: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(def.oid);
    let mut visit = |_: &[u8], row: Vec<Datum>| {
        rows += 1;
        if indexes.is_empty() {
            return Ok(true);
        }
        let slot = if sample.len() < ANALYZE_SAMPLE_ROWS {
            Some(sample.len())
        } else {
            // xorshift64*: row `rows` replaces a kept one with probability N/rows.
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            let r = rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % rows;
            (r < ANALYZE_SAMPLE_ROWS as u64).then_some(r as usize)
        };
        if let Some(slot) = slot {
            let mut keys = Vec::with_capacity(indexes.len());
            for index in &indexes {
                let (mut k, _) = borealis_engine::index::index_key(index, &row)?;
                k.truncate(borealis_engine::catalog::HISTOGRAM_KEY_BYTES);
                keys.push(k);
            }
            if slot == sample.len() {
                sample.push(keys);
            } else {
                sample[slot] = keys;
            }
        }
        Ok(true)
    };
    ex.scan_whole(def.root, &mut visit).await?;
    let mut histograms = Vec::with_capacity(indexes.len());
    for (i, index) in indexes.iter().enumerate() {
        let mut keys: Vec<&[u8]> = sample.iter().map(|k| k[i].as_slice()).collect();
        keys.sort_unstable();
        let bounds = if keys.is_empty() {
            Vec::new()
        } else {
            (0..=HISTOGRAM_BUCKETS)
                .map(|b| keys[b * (keys.len() - 1) / HISTOGRAM_BUCKETS].to_vec())
                .collect()
        };
        histograms.push(borealis_engine::catalog::IndexHistogram {
            index: index.oid,
            bounds,
        });
    }
    def.stats = Some(borealis_engine::catalog::TableStats { rows, histograms });
    ex.engine
        .put_relation(ex.txn, &def, false)
        .await
        .map_err(engine_error)
}

/// Rewrites a table into a new tree keyed by `new_pk` (ADD PRIMARY KEY), checking
/// uniqueness and NOT NULL on the way. Rows stream from the scan straight into
/// (new key, encoded row) pairs, so the table is never held as datums.
async fn rekey(
    ex: &mut Exec<'_>,
    def: &TableDef,
    new_pk: Vec<usize>,
    pk_name: Option<String>,
) -> Result<TableDef, SqlError> {
    let mut new_def = def.clone();
    new_def.pk = new_pk.clone();
    new_def.pk_name = pk_name.clone();
    for &i in &new_pk {
        new_def.columns[i].not_null = true;
    }
    let mut keyed: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut err = None;
    {
        let check_def = &new_def;
        let (keyed, err) = (&mut keyed, &mut err);
        let mut visit = |_: &[u8], row: Vec<Datum>| {
            let r = check_not_null(check_def, &row).and_then(|()| {
                let vals: Vec<Datum> = check_def.pk.iter().map(|&i| row[i].clone()).collect();
                encode_key(&vals).map_err(engine_error)
            });
            match r {
                Ok(key) => {
                    let mut enc = Vec::with_capacity(64);
                    borealis_engine::row::encode_row(&row, &mut enc);
                    keyed.push((key, enc));
                    if keyed.len() >= MAX_STATEMENT_ROWS {
                        *err = Some(SqlError::new("54000", "statement reads too many rows"));
                        return Ok(false);
                    }
                    Ok(true)
                }
                Err(e) => {
                    *err = Some(e);
                    Ok(false)
                }
            }
        };
        ex.scan_whole(def.root, &mut visit).await?;
    }
    if let Some(e) = err {
        return Err(e);
    }
    new_def.root = ex.engine.new_root(ex.txn).await.map_err(engine_error)?;
    let constraint = pk_name.unwrap_or_else(|| format!("{}_pkey", def.name));
    // Sort by the new key and refuse duplicates, then build the new tree
    // bottom-up, a page per record.
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = keyed.windows(2).find(|w| w[0].0 == w[1].0) {
        let row = borealis_engine::row::decode_row(&w[0].1).map_err(engine_error)?;
        let vals: Vec<String> = new_pk
            .iter()
            .map(|&i| row[i].to_text().unwrap_or_else(|| "NULL".into()))
            .collect();
        let names: Vec<String> = new_pk
            .iter()
            .map(|&i| def.columns[i].name.clone())
            .collect();
        return Err(SqlError::new(
            "23505",
            format!("could not create unique index \"{constraint}\""),
        )
        .with_detail(format!(
            "Key ({})=({}) is duplicated.",
            names.join(", "),
            vals.join(", ")
        )));
    }
    ex.engine
        .bulk_load(ex.txn, new_def.root, keyed)
        .await
        .map_err(engine_error)?;
    if let Some(seq) = def.rowid_seq {
        ex.engine
            .drop_relation(ex.txn, seq)
            .await
            .map_err(engine_error)?;
        new_def.rowid_seq = None;
    }
    // Index entries carry the clustered key, which just changed.
    rebuild_indexes(ex, &mut new_def).await?;
    Ok(new_def)
}

async fn alter_table(ex: &mut Exec<'_>, at: &ast::AlterTable) -> Result<ExecResult, SqlError> {
    ex.check_writable()?;
    let def = match find_table(&ex.catalog, &at.name) {
        Ok(d) => d,
        Err(_) if at.if_exists => {
            return Ok(ExecResult::Command {
                tag: "ALTER TABLE".into(),
            })
        }
        Err(e) => return Err(e),
    };
    let mut def = ex.lock_for_ddl(&def).await?;
    for op in &at.operations {
        match op {
            ast::AlterTableOperation::AddConstraint {
                constraint: ast::TableConstraint::PrimaryKey(p),
                ..
            } => {
                if !def.pk.is_empty() {
                    return Err(SqlError::new(
                        "42P16",
                        format!(
                            "multiple primary keys for table \"{}\" are not allowed",
                            def.name
                        ),
                    ));
                }
                let mut cols = Vec::new();
                for ic in &p.columns {
                    let cname = expr::expr_name(&ic.column.expr);
                    cols.push(def.column_index(&cname).ok_or_else(|| {
                        SqlError::new(
                            "42703",
                            format!(
                                "column \"{cname}\" of relation \"{}\" does not exist",
                                def.name
                            ),
                        )
                    })?);
                }
                def = rekey(ex, &def, cols, p.name.as_ref().map(|n| expr::norm(n))).await?;
            }
            ast::AlterTableOperation::AddConstraint {
                constraint: ast::TableConstraint::Unique(u),
                ..
            } => {
                if u.nulls_distinct == ast::NullsDistinctOption::NotDistinct {
                    return Err(SqlError::unsupported("NULLS NOT DISTINCT"));
                }
                let mut cols = Vec::new();
                for ic in &u.columns {
                    let cname = expr::expr_name(&ic.column.expr);
                    cols.push(def.column_index(&cname).ok_or_else(|| {
                        SqlError::new(
                            "42703",
                            format!("column \"{cname}\" named in key does not exist"),
                        )
                    })?);
                }
                add_unique_constraint(ex, &mut def, u.name.as_ref().map(expr::norm), cols).await?;
            }
            ast::AlterTableOperation::AddConstraint {
                constraint: ast::TableConstraint::Check(cc),
                ..
            } => {
                let check = CheckDef {
                    name: cc
                        .name
                        .as_ref()
                        .map(|n| expr::norm(n))
                        .unwrap_or_else(|| format!("{}_check", def.name)),
                    expr: cc.expr.to_string(),
                };
                let mut probe = def.clone();
                probe.checks = vec![check.clone()];
                let bound = Binder::new(&ex.catalog).checks(&probe)?;
                let (rows, _) = ex.scan_table(&def, &KeyPlan::default(), None, None).await?;
                for row in rows {
                    ex.check_row(&probe, &row, &bound).map_err(|mut e| {
                        if e.code == "23514" {
                            e.message = format!("check constraint \"{}\" of relation \"{}\" is violated by some row", check.name, def.name);
                        }
                        e
                    })?;
                }
                def.checks.push(check);
            }
            ast::AlterTableOperation::AddColumn {
                column_def,
                if_not_exists,
                ..
            } => {
                if def.column_index(&expr::norm(&column_def.name)).is_some() {
                    if *if_not_exists {
                        continue;
                    }
                    return Err(SqlError::new(
                        "42701",
                        format!(
                            "column \"{}\" of relation \"{}\" already exists",
                            expr::norm(&column_def.name),
                            def.name
                        ),
                    ));
                }
                let (ty, typmod) = expr::parse_type_name(&column_def.data_type.to_string())?;
                let mut col = ColumnDef {
                    name: expr::norm(&column_def.name),
                    type_oid: ty.oid(),
                    typmod,
                    not_null: false,
                    default: None,
                };
                let mut unique: Option<Option<String>> = None;
                for opt in &column_def.options {
                    match &opt.option {
                        ast::ColumnOption::NotNull => col.not_null = true,
                        ast::ColumnOption::Null => {}
                        ast::ColumnOption::Default(e) => col.default = Some(e.to_string()),
                        ast::ColumnOption::Unique(u)
                            if u.nulls_distinct != ast::NullsDistinctOption::NotDistinct =>
                        {
                            unique = Some(opt.name.as_ref().map(|n| expr::norm(n)));
                        }
                        other => {
                            return Err(SqlError::unsupported(format!("ADD COLUMN option {other}")))
                        }
                    }
                }
                // Existing rows get the default (evaluated once) or NULL.
                let fill = match &col.default {
                    Some(text) => {
                        let e = Binder::new(&ex.catalog).bind(
                            &Scope::default(),
                            &parse_expr_text(text)?,
                            Some(ty),
                        )?;
                        expr::assign(expr::eval(&e, &[], &ex.ctx(&[]))?, ty, typmod)?
                    }
                    None => Datum::Null,
                };
                if col.not_null && fill.is_null() {
                    let (rows, _) = ex
                        .scan_table(&def, &KeyPlan::default(), None, Some(1))
                        .await?;
                    if !rows.is_empty() {
                        return Err(SqlError::new(
                            "23502",
                            format!(
                                "column \"{}\" of relation \"{}\" contains null values",
                                col.name, def.name
                            ),
                        ));
                    }
                }
                rewrite_rows(ex, &def, &mut |row| row.push(fill.clone())).await?;
                def.columns.push(col);
                if let Some(name) = unique {
                    let cols = vec![def.columns.len() - 1];
                    add_unique_constraint(ex, &mut def, name, cols).await?;
                }
            }
            ast::AlterTableOperation::DropColumn {
                column_names,
                if_exists,
                ..
            } => {
                for cn in column_names {
                    let Some(i) = def.column_index(&expr::norm(cn)) else {
                        if *if_exists {
                            continue;
                        }
                        return Err(SqlError::new(
                            "42703",
                            format!(
                                "column \"{}\" of relation \"{}\" does not exist",
                                expr::norm(cn),
                                def.name
                            ),
                        ));
                    };
                    if def.pk.contains(&i) {
                        return Err(SqlError::unsupported("dropping a primary-key column"));
                    }
                    // Indexes on the column go with it (as in PostgreSQL). The rows
                    // are rewritten without index maintenance (column positions
                    // shift), then the remaining indexes are rebuilt.
                    def.indexes.retain(|x| !x.columns.contains(&i));
                    let mut unindexed = def.clone();
                    unindexed.indexes.clear();
                    rewrite_rows(ex, &unindexed, &mut |row| {
                        if i < row.len() {
                            row.remove(i);
                        }
                    })
                    .await?;
                    def.columns.remove(i);
                    let shift = |p: &usize| if *p > i { *p - 1 } else { *p };
                    def.pk = def.pk.iter().map(shift).collect();
                    for x in &mut def.indexes {
                        x.columns = x.columns.iter().map(shift).collect();
                    }
                    if def.indexes.iter().any(|x| x.is_built()) {
                        rebuild_indexes(ex, &mut def).await?;
                    }
                }
            }
            ast::AlterTableOperation::DropConstraint {
                if_exists, name, ..
            } => {
                let n = expr::norm(name);
                let pk_name = def
                    .pk_name
                    .clone()
                    .unwrap_or_else(|| format!("{}_pkey", def.name));
                if let Some(i) = def.indexes.iter().position(|x| x.constraint && x.name == n) {
                    // The index's pages are abandoned (no free-space map yet).
                    def.indexes.remove(i);
                } else if let Some(i) = def.checks.iter().position(|c| c.name == n) {
                    def.checks.remove(i);
                } else if !def.pk.is_empty() && n == pk_name {
                    return Err(SqlError::unsupported("dropping a primary key"));
                } else if !*if_exists {
                    return Err(SqlError::new(
                        "42704",
                        format!(
                            "constraint \"{n}\" of relation \"{}\" does not exist",
                            def.name
                        ),
                    ));
                }
            }
            other => return Err(SqlError::unsupported(format!("ALTER TABLE {other}"))),
        }
    }
    ex.engine
        .put_relation(ex.txn, &def, false)
        .await
        .map_err(engine_error)?;
    Ok(ExecResult::Command {
        tag: "ALTER TABLE".into(),
    })
}

/// Applies `f` to every visible row (a new version each).
async fn rewrite_rows(
    ex: &mut Exec<'_>,
    def: &TableDef,
    f: &mut (dyn FnMut(&mut Vec<Datum>) + Send),
) -> Result<(), SqlError> {
    let (_, keys) = ex.scan_table(def, &KeyPlan::default(), None, None).await?;
    for key in keys {
        let mut decide = |cur: &[Datum]| {
            let mut row = cur.to_vec();
            f(&mut row);
            Ok(RowAction::Update(row))
        };
        ex.engine
            .modify_row(ex.txn, def, &key, &mut decide)
            .await
            .map_err(engine_error)?;
    }
    Ok(())
}

async fn create_index(ex: &mut Exec<'_>, ci: &ast::CreateIndex) -> Result<ExecResult, SqlError> {
    ex.check_writable()?;
    if ci.predicate.is_some() {
        return Err(SqlError::unsupported("partial indexes"));
    }
    if !ci.include.is_empty() {
        return Err(SqlError::unsupported("INCLUDE columns in indexes"));
    }
    if ci.nulls_distinct == Some(false) {
        return Err(SqlError::unsupported("NULLS NOT DISTINCT"));
    }
    if let Some(using) = &ci.using {
        if !using.to_string().eq_ignore_ascii_case("btree") {
            return Err(SqlError::unsupported(format!(
                "index access method {using}"
            )));
        }
    }
    let def = find_table(&ex.catalog, &ci.table_name)?;
    // The exclusive lock waits for every transaction that wrote the table and holds
    // off new writers until this one ends, so the build sees every row. Columns are
    // resolved on the definition as of the lock.
    let def = ex.lock_for_ddl(&def).await?;
    let mut cols = Vec::new();
    for ic in &ci.columns {
        if !matches!(
            ic.column.expr,
            ast::Expr::Identifier(_) | ast::Expr::CompoundIdentifier(_)
        ) {
            return Err(SqlError::unsupported("indexes on expressions"));
        }
        let cname = expr::expr_name(&ic.column.expr);
        cols.push(
            def.column_index(&cname).ok_or_else(|| {
                SqlError::new("42703", format!("column \"{cname}\" does not exist"))
            })?,
        );
    }
    let name = match &ci.name {
        Some(n) => {
            let name = ident(n);
            if relation_name_taken(&ex.catalog, &name) {
                if ci.if_not_exists {
                    return Ok(ExecResult::Command {
                        tag: "CREATE INDEX".into(),
                    });
                }
                return Err(relation_exists(&name));
            }
            name
        }
        None => free_relation_name(&ex.catalog, &def, &cols, "idx"),
    };
    let index = build_index(ex, &def, name, cols, ci.unique).await?;
    let mut new_def = def;
    new_def.indexes.push(index);
    ex.engine
        .put_relation(ex.txn, &new_def, false)
        .await
        .map_err(engine_error)?;
    Ok(ExecResult::Command {
        tag: "CREATE INDEX".into(),
    })
}

/// Index names share the namespace of relations, as in PostgreSQL.
fn relation_name_taken(catalog: &[Arc<TableDef>], name: &str) -> bool {
    catalog
        .iter()
        .any(|t| t.name == name || t.indexes.iter().any(|i| i.name == name))
}

/// PostgreSQL's default name for an index or unique constraint
/// (`table_col1_col2_suffix`), numbered on collision.
fn free_relation_name(
    catalog: &[Arc<TableDef>],
    def: &TableDef,
    cols: &[usize],
    suffix: &str,
) -> String {
    let base = format!(
        "{}_{}",
        def.name,
        cols.iter()
            .filter_map(|&i| def.columns.get(i).map(|c| c.name.clone()))
            .collect::<Vec<_>>()
            .join("_")
    );
    let taken = |n: &str| {
        relation_name_taken(catalog, n) || def.name == n || def.indexes.iter().any(|i| i.name == n)
    };
    let first = format!("{base}_{suffix}");
    if !taken(&first) {
        return first;
    }
    (1..1000)
        .map(|i| format!("{base}_{suffix}{i}"))
        .find(|n| !taken(n))
        .unwrap_or(first)
}

/// Builds a secondary index of `def` (whose exclusive lock the transaction holds)
/// from its rows.
/// 42P07 for a relation (table, index, sequence) name already in use.
fn relation_exists(name: &str) -> SqlError {
    SqlError::new("42P07", format!("relation \"{name}\" already exists"))
}

/// ALTER TABLE's UNIQUE (a constraint or a new column's): names it like
/// PostgreSQL (`<table>_<columns>_key`) unless named, refuses a taken name, builds
/// the index over the existing rows (23505 on duplicates) and records it on `def`.
async fn add_unique_constraint(
    ex: &mut Exec<'_>,
    def: &mut TableDef,
    name: Option<String>,
    cols: Vec<usize>,
) -> Result<(), SqlError> {
    let name = name.unwrap_or_else(|| free_relation_name(&ex.catalog, def, &cols, "key"));
    if relation_name_taken(&ex.catalog, &name) {
        return Err(relation_exists(&name));
    }
    let mut index = build_index(ex, def, name, cols, true).await?;
    index.constraint = true;
    def.indexes.push(index);
    Ok(())
}

async fn build_index(
    ex: &mut Exec<'_>,
    def: &TableDef,
    name: String,
    columns: Vec<usize>,
    unique: bool,
) -> Result<IndexDef, SqlError> {
    let mut index = IndexDef {
        oid: 0,
        name,
        columns,
        unique,
        primary: false,
        root: 0,
        constraint: false,
    };
    index.root = match ex.engine.build_index(ex.txn, def, &index).await {
        Ok(root) => root,
        Err(EngineError::UniqueViolation { detail, .. }) => {
            return Err(SqlError::new(
                "23505",
                format!("could not create unique index \"{}\"", index.name),
            )
            .with_detail(detail))
        }
        Err(e) => return Err(engine_error(e)),
    };
    Ok(index)
}

/// Rebuilds every secondary index of `def` from its rows (after a rewrite that
/// changed clustered keys or column positions); the old trees are abandoned.
async fn rebuild_indexes(ex: &mut Exec<'_>, def: &mut TableDef) -> Result<(), SqlError> {
    let indexes = std::mem::take(&mut def.indexes);
    for index in indexes {
        if !index.is_built() {
            def.indexes.push(index);
            continue;
        }
        let mut rebuilt = build_index(ex, def, index.name, index.columns, index.unique).await?;
        rebuilt.constraint = index.constraint;
        def.indexes.push(rebuilt);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// COPY

pub(crate) struct CopyState {
    plan: InsertPlan,
    /// The catalog the COPY started with (for sequences behind defaults/row ids).
    catalog: Vec<Arc<TableDef>>,
    format: CopyFormat,
    delimiter: u8,
    null: String,
    header: bool,
    buf: Vec<u8>,
    rows: u64,
    /// Input lines read so far (the header counts), for error context.
    line: u64,
    /// Checked rows not yet handed to the engine, with their line numbers: they go
    /// in as one `Engine::insert_rows` batch (see `copy_flush`).
    pending: Vec<Vec<Datum>>,
    pending_lines: Vec<u64>,
    pending_bytes: usize,
}

/// Bound on a COPY line waiting for its end (invariant 9).
const MAX_COPY_LINE_BYTES: usize = 64 << 20;
/// Rows (and bytes of line text) COPY collects before one engine batch: large
/// enough that rows in key order fill whole leaves per redo record, small enough
/// to bound memory and the time one batch holds the engine lock.
const COPY_BATCH_ROWS: usize = 2000;
const COPY_BATCH_BYTES: usize = 1 << 20;

#[allow(clippy::too_many_arguments)]
async fn copy_start(
    s: &mut Session,
    catalog: &[Arc<TableDef>],
    source: &ast::CopySource,
    to: bool,
    target: &ast::CopyTarget,
    options: &[ast::CopyOption],
    legacy: &[ast::CopyLegacyOption],
    _values: &[Option<String>],
) -> Result<ExecResult, SqlError> {
    let mut format = CopyFormat::Text;
    let mut delimiter = None;
    let mut null = None;
    let mut header = false;
    for o in options {
        match o {
            ast::CopyOption::Format(f) => {
                format = match f.value.to_lowercase().as_str() {
                    "text" => CopyFormat::Text,
                    "csv" => CopyFormat::Csv,
                    other => return Err(SqlError::unsupported(format!("COPY format {other}"))),
                }
            }
            ast::CopyOption::Delimiter(c) => delimiter = Some(*c as u8),
            ast::CopyOption::Null(n) => null = Some(n.clone()),
            ast::CopyOption::Header(h) => header = *h,
            ast::CopyOption::Freeze(_) | ast::CopyOption::Encoding(_) => {}
            other => return Err(SqlError::unsupported(format!("COPY option {other}"))),
        }
    }
    for o in legacy {
        match o {
            ast::CopyLegacyOption::Csv(_) => format = CopyFormat::Csv,
            ast::CopyLegacyOption::Delimiter(c) => delimiter = Some(*c as u8),
            ast::CopyLegacyOption::Null(n) => null = Some(n.clone()),
            ast::CopyLegacyOption::Header => header = true,
            other => return Err(SqlError::unsupported(format!("COPY option {other}"))),
        }
    }
    let delimiter = delimiter.unwrap_or(if format == CopyFormat::Csv {
        b','
    } else {
        b'\t'
    });
    let null = null.unwrap_or_else(|| {
        if format == CopyFormat::Csv {
            String::new()
        } else {
            "\\N".into()
        }
    });
    let (table_name, cols) = match source {
        ast::CopySource::Table {
            table_name,
            columns,
        } => (table_name, columns),
        ast::CopySource::Query(_) => return Err(SqlError::unsupported("COPY (query)")),
    };
    let def = find_table(catalog, table_name)?;
    let targets: Vec<usize> = if cols.is_empty() {
        (0..def.columns.len()).collect()
    } else {
        cols.iter()
            .map(|c| {
                def.column_index(&expr::norm(c)).ok_or_else(|| {
                    SqlError::new(
                        "42703",
                        format!("column \"{}\" does not exist", expr::norm(c)),
                    )
                })
            })
            .collect::<Result<_, _>>()?
    };
    if to {
        if !matches!(target, ast::CopyTarget::Stdout) {
            return Err(SqlError::new(
                "42501",
                "COPY to a file is not allowed; use COPY TO STDOUT",
            ));
        }
        let engine = s.engine().clone();
        let txn = s.txn_for_statement();
        let mut data = Vec::new();
        if header {
            let names: Vec<String> = targets
                .iter()
                .map(|&i| def.columns[i].name.clone())
                .collect();
            data.push(format!("{}\n", names.join(&(delimiter as char).to_string())).into_bytes());
        }
        let mut err = None;
        engine
            .scan(
                txn,
                def.root,
                Bound::Unbounded,
                Bound::Unbounded,
                &mut |_, row| {
                    let mut line = Vec::new();
                    for (j, &i) in targets.iter().enumerate() {
                        if j > 0 {
                            line.push(delimiter);
                        }
                        match row.get(i).and_then(|d| d.to_text()) {
                            None => line.extend_from_slice(null.as_bytes()),
                            Some(t) => copy_escape(&t, format, delimiter, &mut line),
                        }
                    }
                    line.push(b'\n');
                    data.push(line);
                    if data.len() > MAX_STATEMENT_ROWS {
                        err = Some(SqlError::new("54000", "COPY TO produces too many rows"));
                        return Ok(false);
                    }
                    Ok(true)
                },
            )
            .await
            .map_err(engine_error)?;
        if let Some(e) = err {
            return Err(e);
        }
        let n = data.len() - header as usize;
        return Ok(ExecResult::CopyOut {
            format,
            columns: targets.len(),
            data,
            tag: format!("COPY {n}"),
        });
    }
    if !matches!(target, ast::CopyTarget::Stdin) {
        return Err(SqlError::new(
            "42501",
            "COPY from a file is not allowed; use COPY FROM STDIN",
        ));
    }
    let mut b = Binder::new(catalog);
    let plan = InsertPlan {
        table: def.clone(),
        targets: targets.clone(),
        source: InsertSource::Values(vec![]),
        defaults: b.defaults(&def)?,
        checks: b.checks(&def)?,
        on_conflict: None,
        conflict_target: None,
        returning: None,
        nextvals: b.nextvals,
        values_nextvals: 0,
        pk_constraint: pk_constraint(&def),
    };
    if s.txn.as_ref().is_some_and(|t| t.read_only) {
        return Err(SqlError::new(
            "25006",
            "cannot execute COPY FROM in a read-only transaction",
        ));
    }
    s.copy = Some(CopyState {
        plan,
        catalog: catalog.to_vec(),
        format,
        delimiter,
        null,
        header,
        buf: Vec::new(),
        rows: 0,
        line: 0,
        pending: Vec::new(),
        pending_lines: Vec::new(),
        pending_bytes: 0,
    });
    Ok(ExecResult::CopyIn {
        format,
        columns: targets.len(),
    })
}

fn copy_escape(t: &str, format: CopyFormat, delimiter: u8, out: &mut Vec<u8>) {
    match format {
        CopyFormat::Text => {
            for b in t.bytes() {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' if delimiter == b'\t' => out.extend_from_slice(b"\\t"),
                    d if d == delimiter => {
                        out.push(b'\\');
                        out.push(d);
                    }
                    other => out.push(other),
                }
            }
        }
        CopyFormat::Csv => {
            let needs = t.is_empty()
                || t.bytes()
                    .any(|b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r');
            if needs {
                out.push(b'"');
                for b in t.bytes() {
                    if b == b'"' {
                        out.push(b'"');
                    }
                    out.push(b);
                }
                out.push(b'"');
            } else {
                out.extend_from_slice(t.as_bytes());
            }
        }
    }
}

fn split_text_line(
    line: &[u8],
    delimiter: u8,
    null: &str,
) -> Result<Vec<Option<String>>, SqlError> {
    let mut fields = Vec::new();
    let mut cur = Vec::new();
    let mut raw = Vec::new();
    let mut i = 0;
    let finish = |cur: &mut Vec<u8>,
                  raw: &mut Vec<u8>,
                  fields: &mut Vec<Option<String>>|
     -> Result<(), SqlError> {
        let s = String::from_utf8(std::mem::take(cur))
            .map_err(|_| SqlError::new("22021", "invalid byte sequence for encoding \"UTF8\""))?;
        let r = std::mem::take(raw);
        fields.push(if r == null.as_bytes() { None } else { Some(s) });
        Ok(())
    };
    while i < line.len() {
        let b = line[i];
        if b == delimiter {
            finish(&mut cur, &mut raw, &mut fields)?;
        } else if b == b'\\' && i + 1 < line.len() {
            let n = line[i + 1];
            raw.extend_from_slice(&[b, n]);
            cur.push(match n {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'b' => 8,
                b'f' => 12,
                b'v' => 11,
                other => other,
            });
            i += 1;
        } else {
            raw.push(b);
            cur.push(b);
        }
        i += 1;
    }
    finish(&mut cur, &mut raw, &mut fields)?;
    Ok(fields)
}

fn split_csv_line(line: &[u8], delimiter: u8, null: &str) -> Result<Vec<Option<String>>, SqlError> {
    let mut fields = Vec::new();
    let mut cur = Vec::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if quoted {
            if b == b'"' {
                if line.get(i + 1) == Some(&b'"') {
                    cur.push(b'"');
                    i += 1;
                } else {
                    quoted = false;
                }
            } else {
                cur.push(b);
            }
        } else if b == b'"' {
            quoted = true;
            was_quoted = true;
        } else if b == delimiter {
            let s = String::from_utf8(std::mem::take(&mut cur))
                .map_err(|_| SqlError::new("22021", "invalid UTF-8"))?;
            fields.push(if !was_quoted && s == null {
                None
            } else {
                Some(s)
            });
            was_quoted = false;
        } else {
            cur.push(b);
        }
        i += 1;
    }
    if quoted {
        return Err(SqlError::new("22P04", "unterminated CSV quoted field"));
    }
    let s = String::from_utf8(cur).map_err(|_| SqlError::new("22021", "invalid UTF-8"))?;
    fields.push(if !was_quoted && s == null {
        None
    } else {
        Some(s)
    });
    Ok(fields)
}

pub(crate) async fn copy_data(s: &mut Session, data: &[u8]) -> Result<(), SqlError> {
    let Some(mut st) = s.copy.take() else {
        return Err(SqlError::new("08P01", "unexpected COPY data"));
    };
    st.buf.extend_from_slice(data);
    let r = copy_lines(s, &mut st, false).await;
    s.copy = Some(st);
    r
}

pub(crate) async fn copy_done(s: &mut Session) -> Result<ExecResult, SqlError> {
    let Some(mut st) = s.copy.take() else {
        return Err(SqlError::new("08P01", "unexpected CopyDone"));
    };
    copy_lines(s, &mut st, true).await?;
    let mut ex = copy_exec(s, &st);
    copy_flush(&mut ex, &mut st).await?;
    Ok(ExecResult::Command {
        tag: format!("COPY {}", st.rows),
    })
}

/// The executor COPY's rows run in (the session's transaction, begun if needed).
fn copy_exec<'a>(s: &'a mut Session, st: &CopyState) -> Exec<'a> {
    let engine = s.engine().clone();
    let (database, user) = (s.database.clone(), s.user.clone());
    let (iso, read_only) = (s.default_isolation, s.default_read_only);
    let txn = s.txn.get_or_insert_with(|| engine.begin(iso, read_only));
    let now = txn.started_at;
    Exec {
        engine,
        txn,
        params: &[],
        database,
        user,
        now,
        statement_now: now_timestamp(),
        catalog: st.catalog.clone(),
        subs: None,
        sub_plans: None,
        outer: None,
    }
}

/// Adds PostgreSQL's "COPY t, line n" context to an error that has none.
fn copy_context(mut e: SqlError, table: &str, line: u64) -> SqlError {
    if e.context.is_none() {
        e.context = Some(format!("COPY {table}, line {line}"));
    }
    e
}

async fn copy_lines(s: &mut Session, st: &mut CopyState, eof: bool) -> Result<(), SqlError> {
    let mut ex = copy_exec(s, st);
    let mut start = 0;
    loop {
        let Some(nl) = st.buf[start..].iter().position(|&b| b == b'\n') else {
            break;
        };
        let mut line = &st.buf[start..start + nl];
        start += nl + 1;
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if line == b"\\." {
            continue;
        }
        st.line += 1;
        if st.header {
            st.header = false;
            continue;
        }
        let fields = match st.format {
            CopyFormat::Text => split_text_line(line, st.delimiter, &st.null),
            CopyFormat::Csv => split_csv_line(line, st.delimiter, &st.null),
        };
        let bytes = line.len();
        let queued = match fields {
            Ok(fields) => copy_row(&mut ex, st, fields, bytes).await,
            Err(e) => Err(e),
        };
        queued.map_err(|e| copy_context(e, &st.plan.table.name, st.line))?;
        if st.pending.len() >= COPY_BATCH_ROWS || st.pending_bytes >= COPY_BATCH_BYTES {
            copy_flush(&mut ex, st).await?;
        }
    }
    st.buf.drain(..start);
    if st.buf.len() > MAX_COPY_LINE_BYTES {
        return Err(SqlError::new("54000", "COPY line is too long"));
    }
    if eof && !st.buf.is_empty() && st.buf != b"\\." {
        let line = std::mem::take(&mut st.buf);
        st.line += 1;
        let fields = match st.format {
            CopyFormat::Text => split_text_line(&line, st.delimiter, &st.null),
            CopyFormat::Csv => split_csv_line(&line, st.delimiter, &st.null),
        };
        let queued = match fields {
            Ok(fields) => copy_row(&mut ex, st, fields, line.len()).await,
            Err(e) => Err(e),
        };
        queued.map_err(|e| copy_context(e, &st.plan.table.name, st.line))?;
    }
    Ok(())
}

async fn copy_row(
    ex: &mut Exec<'_>,
    st: &mut CopyState,
    fields: Vec<Option<String>>,
    bytes: usize,
) -> Result<(), SqlError> {
    let t = st.plan.table.clone();
    if fields.len() != st.plan.targets.len() {
        return Err(SqlError::new(
            "22P04",
            if fields.len() < st.plan.targets.len() {
                "missing data for column".to_string()
            } else {
                "extra data after last expected column".to_string()
            },
        ));
    }
    let mut row: Vec<Option<Datum>> = vec![None; t.columns.len()];
    for (f, &col) in fields.into_iter().zip(&st.plan.targets) {
        let c = &t.columns[col];
        row[col] = Some(match f {
            None => Datum::Null,
            Some(text) => {
                Datum::parse_text(c.ty(), &text).map_err(|e| SqlError::new("22P02", e.0))?
            }
        });
    }
    let mut full = Vec::with_capacity(t.columns.len());
    for (i, v) in row.into_iter().enumerate() {
        let c = &t.columns[i];
        let d = match v {
            Some(d) => d,
            None => match &st.plan.defaults[i] {
                Some(e) => {
                    let names = nextval_names(e, &st.plan.nextvals);
                    let pre = ex.nextvals(&names).await?;
                    expr::eval(e, &[], &ex.ctx(&pre))?
                }
                None => Datum::Null,
            },
        };
        full.push(expr::assign(d, c.ty(), c.typmod)?);
    }
    // NOT NULL and CHECK now, so their errors name this line; keys and uniqueness
    // when the batch goes in.
    ex.check_row(&t, &full, &st.plan.checks)?;
    st.pending.push(full);
    st.pending_lines.push(st.line);
    st.pending_bytes += bytes;
    Ok(())
}

/// Hands the pending rows to the engine as one batch (`Engine::insert_rows`).
/// Keys are computed here, from the table definition the batch is written under:
/// the first batch takes the table's shared lock, and if DDL changed the table
/// meanwhile the batch continues on the new definition (same columns) or gives up.
async fn copy_flush(ex: &mut Exec<'_>, st: &mut CopyState) -> Result<(), SqlError> {
    if st.pending.is_empty() {
        return Ok(());
    }
    let rows = std::mem::take(&mut st.pending);
    let lines = std::mem::take(&mut st.pending_lines);
    st.pending_bytes = 0;
    for _ in 0..MAX_CATALOG_RETRIES {
        let t = st.plan.table.clone();
        match ex.insert_batch(&t, &rows).await {
            Ok(()) => {
                st.rows += rows.len() as u64;
                return Ok(());
            }
            Err((_, e)) if e.code == "40001" && e.message == crate::session::CATALOG_CHANGED => {
                ex.refresh_catalog().await?;
                match ex.catalog.iter().find(|d| d.oid == t.oid) {
                    Some(d) if d.columns == t.columns => {
                        st.plan.table = d.clone();
                        st.catalog = ex.catalog.clone();
                    }
                    _ => return Err(e),
                }
            }
            Err((row, e)) => {
                return Err(match row.and_then(|r| lines.get(r)) {
                    Some(&line) => copy_context(e, &t.name, line),
                    None => e,
                })
            }
        }
    }
    Err(SqlError::new("40001", crate::session::CATALOG_CHANGED))
}

#[cfg(test)]
mod tests {
    use super::count_tag;

    #[test]
    fn count_tags_read_like_formatted_ones() {
        for n in [0, 1, 9, 10, 12_345, u64::MAX] {
            assert_eq!(count_tag("UPDATE ", n), format!("UPDATE {n}"));
        }
        assert_eq!(count_tag("INSERT 0 ", 3), "INSERT 0 3");
    }
}
