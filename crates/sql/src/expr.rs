//! Bound expressions: binding sqlparser's AST against a scope of columns, type
//! inference for parameters, and evaluation.
//!
//! Binding resolves column names to positions, gives every node a type, casts
//! untyped literals to the type they are compared with (as PostgreSQL does with
//! `unknown` literals), and infers the types of `$n` parameters from their context
//! (`aid = $1` makes `$1` the type of `aid`). Evaluation is synchronous; the few
//! things that need the engine (nextval) are computed beforehand by the executor.

use crate::SqlError;
use borealis_engine::types::{now_timestamp, Datum, Numeric, Type};
use sqlparser::ast::{self, BinaryOperator, UnaryOperator, Value};
use std::cmp::Ordering;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ScopeColumn {
    pub table: Option<String>,
    pub name: String,
    pub ty: Type,
    pub table_oid: u32,
    pub column_id: i16,
}

#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub columns: Vec<ScopeColumn>,
    /// Columns of the row of the query this one is a subquery of: a name found
    /// only there binds as an outer reference ([`Expr::Outer`]), which makes the
    /// subquery correlated.
    pub outer: Vec<ScopeColumn>,
    /// Columns of queries further out. A reference to one would need values
    /// passed through the query between; it is 0A000 for now.
    pub outer_far: Vec<ScopeColumn>,
    /// Set when anything bound in this scope (or a scope derived from it) referred
    /// to `outer`: shared by the whole subquery being bound.
    pub outer_used: Arc<AtomicBool>,
}

/// Where a column name resolved: this query's row, or the enclosing query's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnRef {
    Local(usize),
    Outer(usize),
}

impl Scope {
    pub fn resolve(&self, table: Option<&str>, name: &str) -> Result<ColumnRef, SqlError> {
        match self.resolve_local(table, name) {
            Ok(i) => Ok(ColumnRef::Local(i)),
            Err(e) if e.code == "42703" || e.code == "42P01" => {
                let matches = |c: &ScopeColumn| {
                    c.name == name && (table.is_none() || c.table.as_deref() == table)
                };
                let outer: Vec<usize> = (0..self.outer.len())
                    .filter(|&i| matches(&self.outer[i]))
                    .collect();
                match outer[..] {
                    [i] => {
                        self.outer_used.store(true, AtomicOrdering::Relaxed);
                        Ok(ColumnRef::Outer(i))
                    }
                    [] if self.outer_far.iter().any(matches) => Err(SqlError::unsupported(
                        "a reference to a column of a query two or more levels out",
                    )),
                    // A table of an enclosing query without that column.
                    [] if e.code == "42P01"
                        && table.is_some()
                        && self
                            .outer
                            .iter()
                            .chain(&self.outer_far)
                            .any(|c| c.table.as_deref() == table) =>
                    {
                        Err(SqlError::new(
                            "42703",
                            format!("column {}.{name} does not exist", table.unwrap_or("")),
                        ))
                    }
                    [] => Err(e),
                    _ => Err(SqlError::new(
                        "42702",
                        format!("column reference \"{name}\" is ambiguous"),
                    )),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn resolve_local(&self, table: Option<&str>, name: &str) -> Result<usize, SqlError> {
        let mut found = None;
        for (i, c) in self.columns.iter().enumerate() {
            if c.name == name && (table.is_none() || c.table.as_deref() == table) {
                if found.is_some() {
                    return Err(SqlError::new(
                        "42702",
                        format!("column reference \"{name}\" is ambiguous"),
                    ));
                }
                found = Some(i);
            }
        }
        found.ok_or_else(|| match table {
            Some(t) if !self.columns.iter().any(|c| c.table.as_deref() == Some(t)) => {
                SqlError::new(
                    "42P01",
                    format!("missing FROM-clause entry for table \"{t}\""),
                )
            }
            Some(t) => SqlError::new("42703", format!("column {t}.{name} does not exist")),
            None => SqlError::new("42703", format!("column \"{name}\" does not exist")),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    And,
    Or,
    Concat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFunc {
    Count,
    CountStar,
    Sum,
    Avg,
    Min,
    Max,
}

#[derive(Debug, Clone)]
pub struct AggCall {
    pub func: AggFunc,
    pub arg: Option<Expr>,
    pub distinct: bool,
    pub ty: Type,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Now,
    StatementTimestamp,
    /// The wall clock at each call (volatile).
    ClockTimestamp,
    CurrentDate,
    LocalTimestamp,
    Coalesce,
    Lower,
    Upper,
    Length,
    Abs,
    Random,
    Version,
    CurrentDatabase,
    CurrentUser,
    NullIf,
    Greatest,
    Least,
    Substr,
    Round,
    Floor,
    Ceil,
    OctetLength,
    /// char(n) to text: trailing spaces are not significant.
    BpcharTrim,
    Text(TextFn),
}

/// PostgreSQL's string functions (all but concat and concat_ws return NULL for a
/// NULL argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFn {
    Repeat,
    Replace,
    Left,
    Right,
    Lpad,
    Rpad,
    Btrim,
    Ltrim,
    Rtrim,
    Strpos,
    SplitPart,
    Reverse,
    Initcap,
    Concat,
    ConcatWs,
}

impl TextFn {
    /// The function of a name, its arguments' types (the last one repeats for
    /// concat and concat_ws) and how many arguments it takes.
    fn signature(name: &str) -> Option<(TextFn, &'static [Type], usize, usize)> {
        use Type::{Int4 as I, Text as T};
        Some(match name {
            "repeat" => (TextFn::Repeat, &[T, I], 2, 2),
            "replace" => (TextFn::Replace, &[T, T, T], 3, 3),
            "left" => (TextFn::Left, &[T, I], 2, 2),
            "right" => (TextFn::Right, &[T, I], 2, 2),
            "lpad" => (TextFn::Lpad, &[T, I, T], 2, 3),
            "rpad" => (TextFn::Rpad, &[T, I, T], 2, 3),
            "btrim" => (TextFn::Btrim, &[T, T], 1, 2),
            "ltrim" => (TextFn::Ltrim, &[T, T], 1, 2),
            "rtrim" => (TextFn::Rtrim, &[T, T], 1, 2),
            "strpos" => (TextFn::Strpos, &[T, T], 2, 2),
            "split_part" => (TextFn::SplitPart, &[T, T, I], 3, 3),
            "reverse" => (TextFn::Reverse, &[T], 1, 1),
            "initcap" => (TextFn::Initcap, &[T], 1, 1),
            "concat" => (TextFn::Concat, &[T], 1, usize::MAX),
            "concat_ws" => (TextFn::ConcatWs, &[T], 2, usize::MAX),
            _ => return None,
        })
    }

    fn result_type(self) -> Type {
        match self {
            TextFn::Strpos => Type::Int4,
            _ => Type::Text,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Expr {
    Const(Datum, Type),
    Column(usize, Type),
    Param(usize),
    Binary(BinOp, Box<Expr>, Box<Expr>, Type),
    Not(Box<Expr>),
    Neg(Box<Expr>, Type),
    IsNull(Box<Expr>, bool),
    IsBool(Box<Expr>, bool, bool),
    InList(Box<Expr>, Vec<Expr>, bool),
    Between(Box<Expr>, Box<Expr>, Box<Expr>, bool),
    Like(Box<Expr>, Box<Expr>, bool, bool),
    Case(
        Option<Box<Expr>>,
        Vec<(Expr, Expr)>,
        Option<Box<Expr>>,
        Type,
    ),
    Cast(Box<Expr>, Type, i32),
    Func(Func, Vec<Expr>, Type),
    /// Value precomputed by the executor (nextval), by slot.
    Precomputed(usize, Type),
    /// Output of aggregation: group key `i` / aggregate `i` of the aggregated row.
    GroupRef(usize, Type),
    AggRef(usize, Type),
    /// A scalar subquery's value, by subquery slot (see [`SubValue`]).
    ScalarSub(usize, Type),
    /// EXISTS (subquery), by slot.
    Exists(usize),
    /// `x [NOT] IN (subquery)`, by slot.
    InSub(Box<Expr>, usize, bool),
    /// Column `i` of the enclosing query's current row, inside a correlated
    /// subquery.
    Outer(usize, Type),
    /// A use of a correlated subquery (one of the three above): its slot holds the
    /// value for the row being evaluated, so the executor runs the subquery for
    /// each row before evaluating this (PostgreSQL's SubPlan). Never a constant.
    PerRow(Box<Expr>),
}

/// What a subquery gives the expressions that use it. An uncorrelated subquery is
/// run once per statement, before the statement's own rows, at the statement's
/// snapshot (PostgreSQL's InitPlan); a correlated one once per row of the query it
/// refers to (a SubPlan, see [`Expr::PerRow`]).
#[derive(Debug, Clone)]
pub enum SubValue {
    /// The only row's only column; NULL when there is no row.
    Scalar(Datum),
    Exists(bool),
    /// The non-NULL values, sorted by [`compare`], and whether there was a NULL.
    Set {
        sorted: Vec<Datum>,
        has_null: bool,
    },
}

/// How a subquery is used, which decides what [`SubValue`] it yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubKind {
    Scalar,
    Exists,
    In,
}

/// A bound subquery, as [`BindCtx`] uses it.
pub struct BoundSub {
    pub slot: usize,
    /// Its result column types.
    pub types: Vec<Type>,
    /// It refers to the enclosing query's row.
    pub correlated: bool,
}

/// Binds a subquery for [`BindCtx`]: the executor's binder, which knows the
/// catalog.
pub trait SubqueryBinder {
    fn bind_subquery(
        &mut self,
        outer: &Scope,
        query: &ast::Query,
        kind: SubKind,
        params: &mut Vec<Type>,
    ) -> Result<BoundSub, SqlError>;
}

impl Expr {
    pub fn ty(&self, params: &[Type]) -> Type {
        match self {
            Expr::Const(_, t)
            | Expr::Column(_, t)
            | Expr::Binary(_, _, _, t)
            | Expr::Neg(_, t)
            | Expr::Case(_, _, _, t)
            | Expr::Cast(_, t, _)
            | Expr::Func(_, _, t)
            | Expr::Precomputed(_, t)
            | Expr::GroupRef(_, t)
            | Expr::AggRef(_, t)
            | Expr::ScalarSub(_, t)
            | Expr::Outer(_, t) => *t,
            Expr::PerRow(e) => e.ty(params),
            Expr::Param(i) => params.get(*i).copied().unwrap_or(Type::Unknown),
            Expr::Not(_)
            | Expr::IsNull(..)
            | Expr::IsBool(..)
            | Expr::InList(..)
            | Expr::Between(..)
            | Expr::Like(..)
            | Expr::Exists(_)
            | Expr::InSub(..) => Type::Bool,
        }
    }
}

/// An identifier as PostgreSQL folds it: unquoted names are lower-cased.
pub fn norm(id: &ast::Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

/// The column an index or key element names (`(a)` or `("A")`).
pub fn expr_name(e: &ast::Expr) -> String {
    match e {
        ast::Expr::Identifier(i) => norm(i),
        other => other.to_string(),
    }
}

/// Column name PostgreSQL would give a select-list expression.
pub fn column_name(e: &ast::Expr) -> String {
    column_name_strength(e).0
}

/// PostgreSQL's FigureColname: a name and how strongly the expression claims it
/// (2 = a column or function name, 1 = a type name from a cast or "case", 0 = none).
/// A cast keeps its argument's strong name but overrides a weak one.
fn column_name_strength(e: &ast::Expr) -> (String, u8) {
    match e {
        ast::Expr::Identifier(i) => (norm(i), 2),
        ast::Expr::CompoundIdentifier(v) => (v.last().map(norm).unwrap_or_default(), 2),
        ast::Expr::Function(f) => (
            f.name
                .0
                .last()
                .map(|p| p.to_string().to_lowercase())
                .unwrap_or_default(),
            2,
        ),
        ast::Expr::Substring { shorthand, .. } => {
            (if *shorthand { "substr" } else { "substring" }.into(), 2)
        }
        ast::Expr::Cast {
            expr, data_type, ..
        } => {
            let (name, strength) = column_name_strength(expr);
            if strength <= 1 {
                match parse_type_name(&data_type.to_string()) {
                    Ok((t, _)) => (pg_short_name(t), 1),
                    Err(_) => (name, strength),
                }
            } else {
                (name, strength)
            }
        }
        ast::Expr::Trim { trim_where, .. } => (
            match trim_where {
                Some(ast::TrimWhereField::Leading) => "ltrim",
                Some(ast::TrimWhereField::Trailing) => "rtrim",
                _ => "btrim",
            }
            .into(),
            2,
        ),
        ast::Expr::Position { .. } => ("position".into(), 2),
        ast::Expr::Nested(e) => column_name_strength(e),
        ast::Expr::Case { .. } => ("case".into(), 1),
        ast::Expr::Exists { .. } => ("exists".into(), 2),
        // A scalar subquery is named after its one column.
        ast::Expr::Subquery(q) => (query_column_name(q), 2),
        _ => ("?column?".into(), 0),
    }
}

/// The name of a query's first result column, as far as its text tells.
fn query_column_name(q: &ast::Query) -> String {
    let mut body = &*q.body;
    loop {
        match body {
            ast::SetExpr::Query(inner) => body = &inner.body,
            ast::SetExpr::SetOperation { left, .. } => body = left,
            ast::SetExpr::Select(s) => {
                return match s.projection.first() {
                    Some(ast::SelectItem::ExprWithAlias { alias, .. }) => norm(alias),
                    Some(ast::SelectItem::UnnamedExpr(e)) => column_name(e),
                    _ => "?column?".into(),
                }
            }
            _ => return "?column?".into(),
        }
    }
}

/// The aggregate functions the binder knows (`AggFunc`).
const AGGREGATES: [&str; 5] = ["count", "sum", "avg", "min", "max"];

/// Whether `e` calls an aggregate function of the query it is in; aggregates
/// inside its subqueries belong to those.
pub fn has_aggregate(e: &ast::Expr) -> bool {
    use ast::Expr as E;
    let any = |es: &[&ast::Expr]| es.iter().any(|e| has_aggregate(e));
    match e {
        E::Identifier(_) | E::CompoundIdentifier(_) | E::Value(_) | E::TypedString(_) => false,
        E::Subquery(_) | E::Exists { .. } => false,
        E::InSubquery { expr, .. } => has_aggregate(expr),
        E::Function(f) => {
            let name = f.name.to_string().to_lowercase();
            if AGGREGATES.contains(&name.as_str()) {
                return true;
            }
            match &f.args {
                ast::FunctionArguments::List(l) => l.args.iter().any(|a| match a {
                    ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => has_aggregate(e),
                    ast::FunctionArg::Named {
                        arg: ast::FunctionArgExpr::Expr(e),
                        ..
                    } => has_aggregate(e),
                    _ => false,
                }),
                _ => false,
            }
        }
        E::BinaryOp { left, right, .. }
        | E::IsDistinctFrom(left, right)
        | E::IsNotDistinctFrom(left, right) => any(&[left, right]),
        E::UnaryOp { expr, .. }
        | E::Nested(expr)
        | E::Cast { expr, .. }
        | E::IsNull(expr)
        | E::IsNotNull(expr)
        | E::IsTrue(expr)
        | E::IsNotTrue(expr)
        | E::IsFalse(expr)
        | E::IsNotFalse(expr) => has_aggregate(expr),
        E::Between {
            expr, low, high, ..
        } => any(&[expr, low, high]),
        E::Like { expr, pattern, .. } | E::ILike { expr, pattern, .. } => any(&[expr, pattern]),
        E::InList { expr, list, .. } => has_aggregate(expr) || list.iter().any(has_aggregate),
        E::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            operand.as_deref().is_some_and(has_aggregate)
                || conditions
                    .iter()
                    .any(|c| has_aggregate(&c.condition) || has_aggregate(&c.result))
                || else_result.as_deref().is_some_and(has_aggregate)
        }
        // Anything else: by its text, as before this walk existed.
        other => {
            let text = other.to_string().to_lowercase();
            AGGREGATES.iter().any(|f| text.contains(&format!("{f}(")))
        }
    }
}

fn pg_short_name(t: Type) -> String {
    match t {
        Type::Int4 => "int4".into(),
        Type::Int8 => "int8".into(),
        Type::Int2 => "int2".into(),
        Type::Bool => "bool".into(),
        Type::Float8 => "float8".into(),
        Type::Float4 => "float4".into(),
        Type::Varchar => "varchar".into(),
        Type::Bpchar => "bpchar".into(),
        Type::Timestamp => "timestamp".into(),
        Type::TimestampTz => "timestamptz".into(),
        other => other.name().to_string(),
    }
}

/// Parses a type name as sqlparser prints it: ("INTEGER", "VARCHAR(20)",
/// "NUMERIC(10,2)", "TIMESTAMP WITH TIME ZONE", ...). Returns (type, typmod).
pub fn parse_type_name(s: &str) -> Result<(Type, i32), SqlError> {
    let lower = s.trim().to_ascii_lowercase();
    let (base, args) = match lower.find('(') {
        Some(i) => {
            let close = lower.rfind(')').unwrap_or(lower.len());
            let rest = lower.get(close + 1..).unwrap_or("").trim().to_string();
            let base = format!("{} {}", lower[..i].trim(), rest).trim().to_string();
            (base, lower.get(i + 1..close).unwrap_or("").to_string())
        }
        None => (lower.clone(), String::new()),
    };
    let nums: Vec<i64> = args
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    let base = base.trim_start_matches("pg_catalog.");
    let ty = match base {
        "smallint" | "int2" => Type::Int2,
        "integer" | "int" | "int4" | "serial" | "serial4" => Type::Int4,
        "bigint" | "int8" | "bigserial" | "serial8" => Type::Int8,
        "real" | "float4" => Type::Float4,
        "double precision" | "float8" | "double" => Type::Float8,
        "float" => {
            if nums.first().is_some_and(|&p| p <= 24) {
                Type::Float4
            } else {
                Type::Float8
            }
        }
        "numeric" | "decimal" => Type::Numeric,
        "text" => Type::Text,
        "varchar" | "character varying" | "char varying" => Type::Varchar,
        "char" | "character" | "bpchar" => Type::Bpchar,
        "bytea" => Type::Bytea,
        "boolean" | "bool" => Type::Bool,
        "date" => Type::Date,
        "timestamp" | "timestamp without time zone" => Type::Timestamp,
        "timestamptz" | "timestamp with time zone" => Type::TimestampTz,
        "uuid" => Type::Uuid,
        "oid" | "regclass" | "regtype" => Type::Oid,
        "name" => Type::Name,
        _ => {
            return Err(SqlError::new(
                "42704",
                format!("type \"{}\" does not exist", s.trim().to_lowercase()),
            ))
        }
    };
    let typmod = match ty {
        Type::Varchar => nums.first().map(|&n| n as i32).unwrap_or(-1),
        Type::Bpchar => nums.first().map(|&n| n as i32).unwrap_or(1),
        Type::Numeric => match nums.as_slice() {
            [p] => ((*p as i32) << 16) | 0,
            [p, s] => ((*p as i32) << 16) | (*s as i32 & 0xffff),
            _ => -1,
        },
        _ => -1,
    };
    Ok((ty, typmod))
}

pub fn is_serial(type_name: &str) -> Option<Type> {
    match type_name.trim().to_ascii_lowercase().as_str() {
        "serial" | "serial4" => Some(Type::Int4),
        "bigserial" | "serial8" => Some(Type::Int8),
        "smallserial" | "serial2" => Some(Type::Int2),
        _ => None,
    }
}

/// Context the binder needs beyond the scope.
pub struct BindCtx<'a> {
    pub params: &'a mut Vec<Type>,
    /// Sequences named in nextval('...') calls, by slot (resolved by the executor).
    pub nextvals: &'a mut Vec<String>,
    /// When aggregating: GROUP BY expressions (as text) and the aggregate calls found.
    pub agg: Option<AggBinding>,
    /// Where subqueries are bound; None where PostgreSQL allows none (CHECK
    /// constraints, column defaults, COPY).
    pub subqueries: Option<&'a mut dyn SubqueryBinder>,
}

#[derive(Debug, Default)]
pub struct AggBinding {
    pub group_texts: Vec<String>,
    pub group_types: Vec<Type>,
    pub calls: Vec<AggCall>,
    /// Scope of the rows being aggregated (aggregate arguments bind against it).
    pub input: Scope,
}

fn param_index(name: &str) -> Result<usize, SqlError> {
    name.trim_start_matches('$')
        .parse::<usize>()
        .ok()
        .filter(|&n| n >= 1)
        .map(|n| n - 1)
        .ok_or_else(|| SqlError::syntax(format!("bad parameter {name}")))
}

fn literal(v: &Value) -> Result<(Datum, Type), SqlError> {
    Ok(match v {
        Value::Number(s, _) => {
            if let Ok(i) = s.parse::<i32>() {
                (Datum::Int4(i), Type::Int4)
            } else if let Ok(i) = s.parse::<i64>() {
                (Datum::Int8(i), Type::Int8)
            } else {
                let n =
                    Numeric::parse(s).ok_or_else(|| SqlError::syntax(format!("bad number {s}")))?;
                (Datum::Numeric(n), Type::Numeric)
            }
        }
        Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
            (Datum::Text(s.clone()), Type::Unknown)
        }
        Value::DollarQuotedString(d) => (Datum::Text(d.value.clone()), Type::Unknown),
        Value::Boolean(b) => (Datum::Bool(*b), Type::Bool),
        Value::Null => (Datum::Null, Type::Unknown),
        other => return Err(SqlError::unsupported(format!("literal {other}"))),
    })
}

impl<'a> BindCtx<'a> {
    fn set_param_type(&mut self, e: &Expr, ty: Type) {
        if let Expr::Param(i) = e {
            if *i >= self.params.len() {
                self.params.resize(*i + 1, Type::Unknown);
            }
            if self.params[*i] == Type::Unknown && ty != Type::Unknown {
                self.params[*i] = ty;
            }
        }
    }

    /// Binds `e` expecting type `expected` (used to type parameters and literals).
    pub fn bind(
        &mut self,
        scope: &Scope,
        e: &ast::Expr,
        expected: Option<Type>,
    ) -> Result<Expr, SqlError> {
        let bound = self.bind_inner(scope, e)?;
        Ok(match expected {
            Some(t) => self.coerce(bound, t),
            None => bound,
        })
    }

    /// Gives an untyped node (parameter, unknown literal, NULL) the type `t`.
    pub fn coerce(&mut self, e: Expr, t: Type) -> Expr {
        match &e {
            Expr::Param(_) => {
                self.set_param_type(&e, t);
                e
            }
            Expr::Const(Datum::Text(_), Type::Unknown) if t != Type::Unknown && !t.is_text() => {
                Expr::Cast(Box::new(e), t, -1)
            }
            Expr::Const(d, Type::Unknown) => Expr::Const(d.clone(), t),
            _ => e,
        }
    }

    fn subquery(
        &mut self,
        scope: &Scope,
        q: &ast::Query,
        kind: SubKind,
    ) -> Result<BoundSub, SqlError> {
        match self.subqueries.as_deref_mut() {
            Some(b) => b.bind_subquery(scope, q, kind, self.params),
            // PostgreSQL allows none in CHECK constraints, defaults and COPY.
            None => Err(SqlError::new(
                "0A000",
                "cannot use a subquery in this expression",
            )),
        }
    }

    fn bind_inner(&mut self, scope: &Scope, e: &ast::Expr) -> Result<Expr, SqlError> {
        if let Some(agg) = &self.agg {
            let text = e.to_string();
            if let Some(i) = agg.group_texts.iter().position(|g| *g == text) {
                return Ok(Expr::GroupRef(i, agg.group_types[i]));
            }
        }
        use ast::Expr as E;
        Ok(match e {
            E::Identifier(id) => {
                if self.agg.is_some() {
                    return Err(SqlError::new(
                        "42803",
                        format!("column \"{}\" must appear in the GROUP BY clause or be used in an aggregate function", norm(id)),
                    ));
                }
                column(scope, scope.resolve(None, &norm(id))?)
            }
            E::CompoundIdentifier(parts) => {
                if self.agg.is_some() {
                    return Err(SqlError::new("42803", format!("column \"{e}\" must appear in the GROUP BY clause or be used in an aggregate function")));
                }
                let parts: Vec<String> = parts.iter().map(norm).collect();
                let (table, name) = match parts.as_slice() {
                    [t, c] => (Some(t.as_str()), c.as_str()),
                    [_, t, c] => (Some(t.as_str()), c.as_str()),
                    _ => return Err(SqlError::unsupported(format!("column reference {e}"))),
                };
                column(scope, scope.resolve(table, name)?)
            }
            E::Value(v) => match &v.value {
                Value::Placeholder(p) => {
                    let i = param_index(p)?;
                    if i >= self.params.len() {
                        self.params.resize(i + 1, Type::Unknown);
                    }
                    Expr::Param(i)
                }
                other => {
                    let (d, t) = literal(other)?;
                    Expr::Const(d, t)
                }
            },
            E::Nested(inner) => self.bind_inner(scope, inner)?,
            E::BinaryOp { left, op, right } => self.bind_binary(scope, left, op, right)?,
            E::UnaryOp { op, expr } => {
                let inner = self.bind_inner(scope, expr)?;
                match op {
                    UnaryOperator::Not => Expr::Not(Box::new(self.coerce(inner, Type::Bool))),
                    UnaryOperator::Minus => {
                        if let Expr::Const(d, t) = &inner {
                            match d {
                                Datum::Int4(v) => return Ok(Expr::Const(Datum::Int4(-v), *t)),
                                Datum::Int8(v) => return Ok(Expr::Const(Datum::Int8(-v), *t)),
                                Datum::Numeric(n) => {
                                    return Ok(Expr::Const(
                                        Datum::Numeric(Numeric {
                                            mantissa: -n.mantissa,
                                            scale: n.scale,
                                        }),
                                        *t,
                                    ))
                                }
                                _ => {}
                            }
                        }
                        let t = inner.ty(self.params);
                        Expr::Neg(Box::new(inner), t)
                    }
                    UnaryOperator::Plus => inner,
                    other => return Err(SqlError::unsupported(format!("operator {other}"))),
                }
            }
            E::IsDistinctFrom(l, r) => self.bind_distinct(scope, l, r)?,
            E::IsNotDistinctFrom(l, r) => Expr::Not(Box::new(self.bind_distinct(scope, l, r)?)),
            E::IsNull(x) => Expr::IsNull(Box::new(self.bind_inner(scope, x)?), false),
            E::IsNotNull(x) => Expr::IsNull(Box::new(self.bind_inner(scope, x)?), true),
            E::IsTrue(x) => Expr::IsBool(Box::new(self.bind_inner(scope, x)?), true, false),
            E::IsNotTrue(x) => Expr::IsBool(Box::new(self.bind_inner(scope, x)?), true, true),
            E::IsFalse(x) => Expr::IsBool(Box::new(self.bind_inner(scope, x)?), false, false),
            E::IsNotFalse(x) => Expr::IsBool(Box::new(self.bind_inner(scope, x)?), false, true),
            E::InList {
                expr,
                list,
                negated,
            } => {
                let x = self.bind_inner(scope, expr)?;
                let t = x.ty(self.params);
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let b = self.bind_inner(scope, item)?;
                    items.push(self.coerce(b, t));
                }
                let x = match items.first() {
                    Some(first) => {
                        let ft = first.ty(self.params);
                        self.coerce(x, ft)
                    }
                    None => x,
                };
                Expr::InList(Box::new(x), items, *negated)
            }
            E::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let x = self.bind_inner(scope, expr)?;
                let t = x.ty(self.params);
                let lo = self.bind_inner(scope, low)?;
                let hi = self.bind_inner(scope, high)?;
                let (lo, hi) = (self.coerce(lo, t), self.coerce(hi, t));
                let lt = lo.ty(self.params);
                let x = self.coerce(x, lt);
                Expr::Between(Box::new(x), Box::new(lo), Box::new(hi), *negated)
            }
            E::Like {
                negated,
                expr,
                pattern,
                escape_char: None,
                any: false,
            } => {
                let x = self.bind_inner(scope, expr)?;
                let p = self.bind_inner(scope, pattern)?;
                let (x, p) = (self.coerce(x, Type::Text), self.coerce(p, Type::Text));
                Expr::Like(Box::new(x), Box::new(p), *negated, false)
            }
            E::ILike {
                negated,
                expr,
                pattern,
                escape_char: None,
                any: false,
            } => {
                let x = self.bind_inner(scope, expr)?;
                let p = self.bind_inner(scope, pattern)?;
                let (x, p) = (self.coerce(x, Type::Text), self.coerce(p, Type::Text));
                Expr::Like(Box::new(x), Box::new(p), *negated, true)
            }
            E::Cast {
                expr, data_type, ..
            } => {
                let (t, typmod) = parse_type_name(&data_type.to_string())?;
                let x = self.bind_inner(scope, expr)?;
                let x = self.coerce(x, t);
                let x = if matches!(t, Type::Text | Type::Varchar) {
                    bpchar_trim(x, self.params)
                } else {
                    x
                };
                if x.ty(self.params) == t && typmod < 0 {
                    x
                } else {
                    Expr::Cast(Box::new(x), t, typmod)
                }
            }
            E::TypedString(ts) => {
                let (t, typmod) = parse_type_name(&ts.data_type.to_string())?;
                let (d, _) = literal(&ts.value.value)?;
                Expr::Cast(Box::new(Expr::Const(d, Type::Unknown)), t, typmod)
            }
            E::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                let op = match operand {
                    Some(o) => Some(Box::new(self.bind_inner(scope, o)?)),
                    None => None,
                };
                let mut whens = Vec::new();
                let mut result_ty = Type::Unknown;
                for cw in conditions {
                    let c = self.bind_inner(scope, &cw.condition)?;
                    let r = self.bind_inner(scope, &cw.result)?;
                    if result_ty == Type::Unknown {
                        result_ty = r.ty(self.params);
                    }
                    whens.push((c, r));
                }
                let els = match else_result {
                    Some(e) => {
                        let b = self.bind_inner(scope, e)?;
                        if result_ty == Type::Unknown {
                            result_ty = b.ty(self.params);
                        }
                        Some(Box::new(b))
                    }
                    None => None,
                };
                if result_ty == Type::Unknown {
                    result_ty = Type::Text;
                }
                let whens = whens
                    .into_iter()
                    .map(|(c, r)| (c, self.coerce(r, result_ty)))
                    .collect();
                let els = els.map(|e| Box::new(self.coerce(*e, result_ty)));
                Expr::Case(op, whens, els, result_ty)
            }
            E::Function(f) => self.bind_function(scope, f)?,
            E::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                let mut args = vec![self.bind(scope, expr, Some(Type::Text))?];
                if let Some(f) = substring_from {
                    args.push(self.bind(scope, f, Some(Type::Int4))?);
                }
                if let Some(f) = substring_for {
                    args.push(self.bind(scope, f, Some(Type::Int4))?);
                }
                Expr::Func(Func::Substr, args, Type::Text)
            }
            E::Trim {
                trim_where,
                trim_what,
                expr,
                trim_characters,
            } => {
                if trim_characters.is_some() {
                    return Err(SqlError::syntax("TRIM with a list of characters"));
                }
                let f = match trim_where {
                    Some(ast::TrimWhereField::Leading) => TextFn::Ltrim,
                    Some(ast::TrimWhereField::Trailing) => TextFn::Rtrim,
                    _ => TextFn::Btrim,
                };
                let mut args = vec![self.bind_text_arg(scope, expr, Some(Type::Text))?];
                if let Some(w) = trim_what {
                    args.push(self.bind_text_arg(scope, w, Some(Type::Text))?);
                }
                Expr::Func(Func::Text(f), args, Type::Text)
            }
            E::Position { expr, r#in } => {
                let args = vec![
                    self.bind_text_arg(scope, r#in, Some(Type::Text))?,
                    self.bind_text_arg(scope, expr, Some(Type::Text))?,
                ];
                Expr::Func(Func::Text(TextFn::Strpos), args, Type::Int4)
            }
            E::Floor { expr, .. } => {
                let x = self.bind_inner(scope, expr)?;
                let t = x.ty(self.params);
                Expr::Func(
                    Func::Floor,
                    vec![x],
                    if t.is_integer() { Type::Float8 } else { t },
                )
            }
            E::Ceil { expr, .. } => {
                let x = self.bind_inner(scope, expr)?;
                let t = x.ty(self.params);
                Expr::Func(
                    Func::Ceil,
                    vec![x],
                    if t.is_integer() { Type::Float8 } else { t },
                )
            }
            E::Subquery(q) => {
                let sub = self.subquery(scope, q, SubKind::Scalar)?;
                match sub.types.as_slice() {
                    [t] => per_row(Expr::ScalarSub(sub.slot, *t), sub.correlated),
                    _ => return Err(SqlError::syntax("subquery must return only one column")),
                }
            }
            E::Exists { subquery, negated } => {
                let sub = self.subquery(scope, subquery, SubKind::Exists)?;
                let e = per_row(Expr::Exists(sub.slot), sub.correlated);
                if *negated {
                    Expr::Not(Box::new(e))
                } else {
                    e
                }
            }
            E::InSubquery {
                expr,
                subquery,
                negated,
            } => {
                let x = self.bind_inner(scope, expr)?;
                let sub = self.subquery(scope, subquery, SubKind::In)?;
                match sub.types.as_slice() {
                    [t] => per_row(
                        Expr::InSub(Box::new(self.coerce(x, *t)), sub.slot, *negated),
                        sub.correlated,
                    ),
                    [] => return Err(SqlError::syntax("subquery has too few columns")),
                    _ => return Err(SqlError::syntax("subquery has too many columns")),
                }
            }
            other => return Err(SqlError::unsupported(format!("expression {other}"))),
        })
    }

    fn bind_binary(
        &mut self,
        scope: &Scope,
        left: &ast::Expr,
        op: &BinaryOperator,
        right: &ast::Expr,
    ) -> Result<Expr, SqlError> {
        let op = match op {
            BinaryOperator::Plus => BinOp::Add,
            BinaryOperator::Minus => BinOp::Sub,
            BinaryOperator::Multiply => BinOp::Mul,
            BinaryOperator::Divide => BinOp::Div,
            BinaryOperator::Modulo => BinOp::Mod,
            BinaryOperator::Eq => BinOp::Eq,
            BinaryOperator::NotEq => BinOp::NotEq,
            BinaryOperator::Lt => BinOp::Lt,
            BinaryOperator::LtEq => BinOp::LtEq,
            BinaryOperator::Gt => BinOp::Gt,
            BinaryOperator::GtEq => BinOp::GtEq,
            BinaryOperator::And => BinOp::And,
            BinaryOperator::Or => BinOp::Or,
            BinaryOperator::StringConcat => BinOp::Concat,
            other => return Err(SqlError::unsupported(format!("operator {other}"))),
        };
        let l = self.bind_inner(scope, left)?;
        let r = self.bind_inner(scope, right)?;
        let (l, r) = match op {
            BinOp::And | BinOp::Or => (self.coerce(l, Type::Bool), self.coerce(r, Type::Bool)),
            BinOp::Concat => (self.coerce(l, Type::Text), self.coerce(r, Type::Text)),
            BinOp::Eq | BinOp::NotEq | BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq
                if l.ty(self.params) == Type::Bpchar || r.ty(self.params) == Type::Bpchar =>
            {
                // char(n) compares without its padding.
                let (l, r) = (self.coerce(l, Type::Bpchar), self.coerce(r, Type::Bpchar));
                (bpchar_trim(l, self.params), bpchar_trim(r, self.params))
            }
            _ => {
                let (lt, rt) = (l.ty(self.params), r.ty(self.params));
                let l = if lt == Type::Unknown {
                    self.coerce(l, rt)
                } else {
                    l
                };
                let r = if rt == Type::Unknown {
                    self.coerce(r, lt)
                } else {
                    r
                };
                (l, r)
            }
        };
        let (l, r) = if op == BinOp::Concat {
            (bpchar_trim(l, self.params), bpchar_trim(r, self.params))
        } else {
            (l, r)
        };
        let (lt, rt) = (l.ty(self.params), r.ty(self.params));
        let ty = match op {
            BinOp::Eq
            | BinOp::NotEq
            | BinOp::Lt
            | BinOp::LtEq
            | BinOp::Gt
            | BinOp::GtEq
            | BinOp::And
            | BinOp::Or => Type::Bool,
            BinOp::Concat => Type::Text,
            _ => arith_type(lt, rt, op)?,
        };
        Ok(Expr::Binary(op, Box::new(l), Box::new(r), ty))
    }

    fn bind_function(&mut self, scope: &Scope, f: &ast::Function) -> Result<Expr, SqlError> {
        let name = f
            .name
            .0
            .last()
            .map(|p| p.to_string().to_lowercase())
            .unwrap_or_default();
        let name = name.trim_matches('"').to_string();
        let (arg_list, distinct, star) = match &f.args {
            ast::FunctionArguments::None => (vec![], false, false),
            ast::FunctionArguments::List(l) => {
                let distinct = matches!(
                    l.duplicate_treatment,
                    Some(ast::DuplicateTreatment::Distinct)
                );
                let mut args = Vec::new();
                let mut star = false;
                for a in &l.args {
                    match a {
                        ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => {
                            args.push(e.clone())
                        }
                        ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Wildcard) => star = true,
                        other => {
                            return Err(SqlError::unsupported(format!("function argument {other}")))
                        }
                    }
                }
                (args, distinct, star)
            }
            ast::FunctionArguments::Subquery(_) => return Err(SqlError::unsupported("subqueries")),
        };
        if f.over.is_some() {
            return Err(SqlError::unsupported("window functions"));
        }
        let agg = match name.as_str() {
            "count" if star => Some(AggFunc::CountStar),
            "count" => Some(AggFunc::Count),
            "sum" => Some(AggFunc::Sum),
            "avg" => Some(AggFunc::Avg),
            "min" => Some(AggFunc::Min),
            "max" => Some(AggFunc::Max),
            _ => None,
        };
        if let Some(func) = agg {
            let Some(mut binding) = self.agg.take() else {
                return Err(SqlError::new(
                    "42803",
                    "aggregate functions are not allowed here",
                ));
            };
            let arg = match arg_list.first() {
                Some(a) if func != AggFunc::CountStar => {
                    let input = binding.input.clone();
                    let r = self.bind_inner(&input, a);
                    match r {
                        Ok(e) => Some(e),
                        Err(e) => {
                            self.agg = Some(binding);
                            return Err(e);
                        }
                    }
                }
                _ => None,
            };
            let arg_ty = arg
                .as_ref()
                .map(|a| a.ty(self.params))
                .unwrap_or(Type::Int8);
            let ty = match func {
                AggFunc::Count | AggFunc::CountStar => Type::Int8,
                AggFunc::Sum => match arg_ty {
                    Type::Int2 | Type::Int4 => Type::Int8,
                    Type::Int8 | Type::Numeric => Type::Numeric,
                    Type::Float4 => Type::Float4,
                    _ => Type::Float8,
                },
                AggFunc::Avg => match arg_ty {
                    Type::Float4 | Type::Float8 => Type::Float8,
                    _ => Type::Numeric,
                },
                AggFunc::Min | AggFunc::Max => arg_ty,
            };
            // PostgreSQL 15 has no ordering aggregate for these (bool_and/bool_or
            // take booleans' place).
            if matches!(func, AggFunc::Min | AggFunc::Max)
                && matches!(arg_ty, Type::Bool | Type::Bytea | Type::Uuid)
            {
                self.agg = Some(binding);
                return Err(SqlError::new(
                    "42883",
                    format!("function {name}({}) does not exist", arg_ty.name()),
                ));
            }
            binding.calls.push(AggCall {
                func,
                arg,
                distinct,
                ty,
            });
            let i = binding.calls.len() - 1;
            self.agg = Some(binding);
            return Ok(Expr::AggRef(i, ty));
        }
        if let Some((f, types, min, max)) = TextFn::signature(&name) {
            if arg_list.len() < min || arg_list.len() > max {
                return Err(SqlError::new(
                    "42883",
                    format!(
                        "function {name} with {} arguments does not exist",
                        arg_list.len()
                    ),
                ));
            }
            let mut args = Vec::with_capacity(arg_list.len());
            for (i, a) in arg_list.iter().enumerate() {
                let t = types.get(i).or(types.last()).copied();
                // concat prints char(n) with its padding (its output function),
                // where the others take it as text.
                args.push(if matches!(f, TextFn::Concat | TextFn::ConcatWs) {
                    self.bind(scope, a, t)?
                } else {
                    self.bind_text_arg(scope, a, t)?
                });
            }
            return Ok(Expr::Func(Func::Text(f), args, f.result_type()));
        }
        let mut args = Vec::with_capacity(arg_list.len());
        for a in &arg_list {
            args.push(self.bind_inner(scope, a)?);
        }
        let arity = |n: usize| -> Result<(), SqlError> {
            if arg_list.len() == n {
                Ok(())
            } else {
                Err(SqlError::new(
                    "42883",
                    format!(
                        "function {name} with {} arguments does not exist",
                        arg_list.len()
                    ),
                ))
            }
        };
        let (func, ty) = match name.as_str() {
            "now" | "current_timestamp" | "transaction_timestamp" => (Func::Now, Type::TimestampTz),
            "statement_timestamp" => (Func::StatementTimestamp, Type::TimestampTz),
            "clock_timestamp" => (Func::ClockTimestamp, Type::TimestampTz),
            // The session time zone is always UTC, so local time is UTC time.
            "current_date" => (Func::CurrentDate, Type::Date),
            "localtimestamp" => (Func::LocalTimestamp, Type::Timestamp),
            "current_time" | "localtime" => {
                return Err(SqlError::unsupported("the time and timetz types"))
            }
            "coalesce" => {
                let t = args
                    .iter()
                    .map(|a| a.ty(self.params))
                    .find(|t| *t != Type::Unknown)
                    .unwrap_or(Type::Text);
                args = args.into_iter().map(|a| self.coerce(a, t)).collect();
                (Func::Coalesce, t)
            }
            "nullif" => {
                arity(2)?;
                let t = args[0].ty(self.params);
                (Func::NullIf, t)
            }
            "greatest" | "least" => {
                let t = args
                    .iter()
                    .map(|a| a.ty(self.params))
                    .find(|t| *t != Type::Unknown)
                    .unwrap_or(Type::Text);
                args = args.into_iter().map(|a| self.coerce(a, t)).collect();
                (
                    if name == "greatest" {
                        Func::Greatest
                    } else {
                        Func::Least
                    },
                    t,
                )
            }
            "lower" => (Func::Lower, Type::Text),
            "upper" => (Func::Upper, Type::Text),
            "length" | "char_length" | "character_length" => (Func::Length, Type::Int4),
            "octet_length" => (Func::OctetLength, Type::Int4),
            "abs" => {
                arity(1)?;
                let t = args[0].ty(self.params);
                (Func::Abs, t)
            }
            "random" => (Func::Random, Type::Float8),
            "version" => (Func::Version, Type::Text),
            "current_database" => (Func::CurrentDatabase, Type::Name),
            "current_user" | "session_user" | "user" => (Func::CurrentUser, Type::Name),
            "substr" | "substring" => (Func::Substr, Type::Text),
            "round" => {
                let t = args
                    .first()
                    .map(|a| a.ty(self.params))
                    .unwrap_or(Type::Numeric);
                (Func::Round, if t.is_integer() { Type::Numeric } else { t })
            }
            "floor" | "ceil" | "ceiling" => {
                let t = args
                    .first()
                    .map(|a| a.ty(self.params))
                    .unwrap_or(Type::Float8);
                let t = if t.is_integer() { Type::Float8 } else { t };
                (
                    if name == "floor" {
                        Func::Floor
                    } else {
                        Func::Ceil
                    },
                    t,
                )
            }
            "nextval" => {
                arity(1)?;
                let seq = match &args[0] {
                    Expr::Const(Datum::Text(s), _) => s.clone(),
                    Expr::Cast(inner, _, _) => match &**inner {
                        Expr::Const(Datum::Text(s), _) => s.clone(),
                        _ => return Err(SqlError::unsupported("nextval of a computed name")),
                    },
                    _ => return Err(SqlError::unsupported("nextval of a computed name")),
                };
                self.nextvals.push(seq);
                return Ok(Expr::Precomputed(self.nextvals.len() - 1, Type::Int8));
            }
            _ => {
                return Err(SqlError::new(
                    "42883",
                    format!("function {name} does not exist"),
                ))
            }
        };
        Ok(Expr::Func(func, args, ty))
    }
}

impl BindCtx<'_> {
    /// `l IS DISTINCT FROM r`: `<>` with NULL as an ordinary value, written as
    /// `CASE WHEN l IS NULL THEN r IS NOT NULL WHEN r IS NULL THEN true ELSE l <> r
    /// END` over the operands `<>` binds (with its casts and parameter types).
    fn bind_distinct(
        &mut self,
        scope: &Scope,
        l: &ast::Expr,
        r: &ast::Expr,
    ) -> Result<Expr, SqlError> {
        let ne = self.bind_binary(scope, l, &ast::BinaryOperator::NotEq, r)?;
        let Expr::Binary(BinOp::NotEq, bl, br, _) = &ne else {
            return Err(SqlError::unsupported("IS DISTINCT FROM on these operands"));
        };
        let (bl, br) = (bl.clone(), br.clone());
        Ok(Expr::Case(
            None,
            vec![
                (Expr::IsNull(bl, false), Expr::IsNull(br.clone(), true)),
                (
                    Expr::IsNull(br, false),
                    Expr::Const(Datum::Bool(true), Type::Bool),
                ),
            ],
            Some(Box::new(ne)),
            Type::Bool,
        ))
    }

    /// An argument of a string function: untyped ones take the parameter's type,
    /// and char(n) loses its padding as it becomes text.
    fn bind_text_arg(
        &mut self,
        scope: &Scope,
        a: &ast::Expr,
        t: Option<Type>,
    ) -> Result<Expr, SqlError> {
        let e = self.bind(scope, a, t)?;
        Ok(bpchar_trim(e, self.params))
    }
}

fn column(scope: &Scope, r: ColumnRef) -> Expr {
    match r {
        ColumnRef::Local(i) => Expr::Column(i, scope.columns[i].ty),
        ColumnRef::Outer(i) => Expr::Outer(i, scope.outer[i].ty),
    }
}

/// A subquery's use, marked for evaluation per row when it is correlated.
fn per_row(e: Expr, correlated: bool) -> Expr {
    if correlated {
        Expr::PerRow(Box::new(e))
    } else {
        e
    }
}

/// Adds the slots of the correlated subqueries `e` uses (its [`Expr::PerRow`]
/// nodes, outside other subqueries, which evaluate their own) to `out`.
pub fn per_row_slots(e: &Expr, out: &mut Vec<usize>) {
    let mut visit = |x: &Expr| per_row_slots(x, out);
    match e {
        Expr::PerRow(inner) => {
            let slot = match &**inner {
                Expr::ScalarSub(s, _) | Expr::Exists(s) => *s,
                // The probe is evaluated in this query, so its own uses count.
                Expr::InSub(x, s, _) => {
                    per_row_slots(x, out);
                    *s
                }
                _ => return,
            };
            if !out.contains(&slot) {
                out.push(slot);
            }
        }
        Expr::Const(..)
        | Expr::Column(..)
        | Expr::Param(_)
        | Expr::Precomputed(..)
        | Expr::GroupRef(..)
        | Expr::AggRef(..)
        | Expr::ScalarSub(..)
        | Expr::Exists(_)
        | Expr::Outer(..) => {}
        Expr::Binary(_, l, r, _) | Expr::Like(l, r, _, _) => {
            visit(l);
            visit(r);
        }
        Expr::Not(x)
        | Expr::Neg(x, _)
        | Expr::IsNull(x, _)
        | Expr::IsBool(x, _, _)
        | Expr::Cast(x, _, _)
        | Expr::InSub(x, _, _) => visit(x),
        Expr::InList(x, list, _) => {
            visit(x);
            list.iter().for_each(visit);
        }
        Expr::Between(x, lo, hi, _) => {
            visit(x);
            visit(lo);
            visit(hi);
        }
        Expr::Case(op, whens, els, _) => {
            if let Some(op) = op {
                visit(op);
            }
            for (w, t) in whens {
                visit(w);
                visit(t);
            }
            if let Some(e) = els {
                visit(e);
            }
        }
        Expr::Func(_, args, _) => args.iter().for_each(visit),
    }
}

/// The operands of a chain of ANDs.
pub fn into_conjuncts(e: Expr) -> Vec<Expr> {
    match e {
        Expr::Binary(BinOp::And, l, r, _) => {
            let mut v = into_conjuncts(*l);
            v.extend(into_conjuncts(*r));
            v
        }
        other => vec![other],
    }
}

/// The AND of `parts` (None for none).
pub fn and_all(parts: Vec<Expr>) -> Option<Expr> {
    parts
        .into_iter()
        .reduce(|a, b| Expr::Binary(BinOp::And, Box::new(a), Box::new(b), Type::Bool))
}

/// Strips char(n) padding where a char(n) value becomes text.
fn bpchar_trim(e: Expr, params: &[Type]) -> Expr {
    if e.ty(params) == Type::Bpchar {
        Expr::Func(Func::BpcharTrim, vec![e], Type::Text)
    } else {
        e
    }
}

fn arith_type(l: Type, r: Type, op: BinOp) -> Result<Type, SqlError> {
    use Type::*;
    let rank = |t: Type| match t {
        Int2 => 1,
        Int4 | Unknown => 2,
        Int8 => 3,
        Numeric => 4,
        Float4 => 5,
        Float8 => 6,
        _ => 0,
    };
    if matches!(l, Date) && r.is_integer() && matches!(op, BinOp::Add | BinOp::Sub) {
        return Ok(Date);
    }
    if matches!((l, r), (Date, Date)) && op == BinOp::Sub {
        return Ok(Int4);
    }
    let (a, b) = (rank(l), rank(r));
    if a == 0 || b == 0 {
        return Err(SqlError::new(
            "42883",
            format!(
                "operator does not exist: {} {} {}",
                l.name(),
                op_symbol(op),
                r.name()
            ),
        ));
    }
    Ok(match a.max(b) {
        1 => Int2,
        2 => Int4,
        3 => Int8,
        4 => Numeric,
        5 if a.min(b) <= 3 || a == b => {
            if a.max(b) == 5 && (l == Float4 && r == Float4) {
                Float4
            } else {
                Float8
            }
        }
        _ => Float8,
    })
}

fn op_symbol(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Mod => "%",
        BinOp::Eq => "=",
        BinOp::NotEq => "<>",
        BinOp::Lt => "<",
        BinOp::LtEq => "<=",
        BinOp::Gt => ">",
        BinOp::GtEq => ">=",
        BinOp::And => "AND",
        BinOp::Or => "OR",
        BinOp::Concat => "||",
    }
}

/// Values an expression is evaluated against.
pub struct EvalCtx<'a> {
    pub params: &'a [Datum],
    pub precomputed: &'a [Datum],
    /// The statement's subquery results, by slot.
    pub subqueries: &'a [SubValue],
    /// The enclosing query's current row, inside a correlated subquery.
    pub outer: &'a [Datum],
    pub database: &'a str,
    pub user: &'a str,
    /// The transaction's start time: now(), current_timestamp, current_date and
    /// localtimestamp, stable for the whole transaction as in PostgreSQL.
    pub now: i64,
    /// The statement's start time (statement_timestamp()).
    pub statement_now: i64,
}

/// The SQLSTATE PostgreSQL gives a failed text-to-type conversion.
pub fn parse_error(ty: Type, e: borealis_engine::types::ParseError) -> SqlError {
    let dated = matches!(ty, Type::Date | Type::Timestamp | Type::TimestampTz);
    let code = match (e.0.contains("out of range"), dated) {
        (true, true) => "22008",
        (true, false) => "22003",
        (false, true) => "22007",
        (false, false) => "22P02",
    };
    SqlError::new(code, e.0)
}

fn overflow() -> SqlError {
    SqlError::new("22003", "integer out of range")
}

pub fn to_f64(d: &Datum) -> Option<f64> {
    Some(match d {
        Datum::Int2(v) => *v as f64,
        Datum::Int4(v) => *v as f64,
        Datum::Int8(v) => *v as f64,
        Datum::Float4(v) => *v as f64,
        Datum::Float8(v) => *v,
        Datum::Numeric(n) => n.to_f64(),
        Datum::Text(s) => s.trim().parse().ok()?,
        _ => return None,
    })
}

pub fn to_numeric(d: &Datum) -> Option<Numeric> {
    match d {
        Datum::Numeric(n) => Some(*n),
        Datum::Float4(f) => Numeric::from_f64(*f as f64),
        Datum::Float8(f) => Numeric::from_f64(*f),
        Datum::Text(s) => Numeric::parse(s),
        other => other.as_i64().map(Numeric::from_i64),
    }
}

/// Byte order, deciding an empty side without memcmp: glibc's AVX-512 memcmp takes
/// 130–300 ns for a zero length on this project's machines (its masked load takes
/// a microcode assist), a hundred times a short comparison, and `''` is common data.
fn cmp_bytes(x: &[u8], y: &[u8]) -> Ordering {
    if x.is_empty() || y.is_empty() {
        x.len().cmp(&y.len())
    } else {
        x.cmp(y)
    }
}

/// Compares two non-null values, coercing across numeric types. None = incomparable.
pub fn compare(a: &Datum, b: &Datum) -> Option<Ordering> {
    use Datum::*;
    Some(match (a, b) {
        (Null, _) | (_, Null) => return None,
        (Bool(x), Bool(y)) => x.cmp(y),
        (Text(x), Text(y)) => cmp_bytes(x.as_bytes(), y.as_bytes()),
        (Bytea(x), Bytea(y)) => cmp_bytes(x, y),
        (Date(x), Date(y)) => x.cmp(y),
        (Timestamp(x), Timestamp(y)) | (TimestampTz(x), TimestampTz(y)) => x.cmp(y),
        (Timestamp(x), TimestampTz(y)) | (TimestampTz(x), Timestamp(y)) => x.cmp(y),
        (Uuid(x), Uuid(y)) => x.cmp(y),
        _ => {
            if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
                x.cmp(&y)
            } else if matches!(a, Float4(_) | Float8(_)) || matches!(b, Float4(_) | Float8(_)) {
                to_f64(a)?.total_cmp(&to_f64(b)?)
            } else {
                to_numeric(a)?.cmp_value(to_numeric(b)?)
            }
        }
    })
}

fn truthy(d: &Datum) -> Result<Option<bool>, SqlError> {
    match d {
        Datum::Null => Ok(None),
        Datum::Bool(b) => Ok(Some(*b)),
        Datum::Text(s) => Datum::parse_text(Type::Bool, s)
            .map(|d| match d {
                Datum::Bool(b) => Some(b),
                _ => None,
            })
            .map_err(|e| SqlError::new("22P02", e.0)),
        other => Err(SqlError::new(
            "42804",
            format!("argument of type {} is not boolean", other.type_of().name()),
        )),
    }
}

/// Casts `d` to `ty` (with `typmod` for varchar/char/numeric), as an explicit cast.
pub fn cast(d: Datum, ty: Type, typmod: i32) -> Result<Datum, SqlError> {
    if d.is_null() {
        return Ok(Datum::Null);
    }
    let invalid = |e: borealis_engine::types::ParseError| parse_error(ty, e);
    let out = match (ty, d) {
        (Type::Int2, d) | (Type::Int4, d) | (Type::Int8, d) | (Type::Oid, d)
            if d.as_i64().is_some() =>
        {
            let v = d.as_i64().unwrap_or(0);
            match ty {
                Type::Int2 => Datum::Int2(
                    i16::try_from(v)
                        .map_err(|_| SqlError::new("22003", "smallint out of range"))?,
                ),
                Type::Int8 => Datum::Int8(v),
                _ => Datum::Int4(i32::try_from(v).map_err(|_| overflow())?),
            }
        }
        (
            Type::Int2 | Type::Int4 | Type::Int8,
            d @ (Datum::Float4(_) | Datum::Float8(_) | Datum::Numeric(_)),
        ) => {
            let f = to_f64(&d).unwrap_or(0.0).round();
            let v = match d {
                Datum::Numeric(n) => n.rescale(0).map(|n| n.mantissa).unwrap_or(i128::MAX),
                _ => f as i128,
            };
            let v = i64::try_from(v).map_err(|_| overflow())?;
            return cast(Datum::Int8(v), ty, typmod);
        }
        (Type::Float4, d) if d.type_of().is_numeric() => {
            Datum::Float4(to_f64(&d).unwrap_or(0.0) as f32)
        }
        (Type::Float8, d) if d.type_of().is_numeric() => Datum::Float8(to_f64(&d).unwrap_or(0.0)),
        (Type::Numeric, d) if d.type_of().is_numeric() => Datum::Numeric(
            to_numeric(&d).ok_or_else(|| SqlError::new("22P02", "cannot convert to numeric"))?,
        ),
        (Type::Bool, Datum::Int4(v)) => Datum::Bool(v != 0),
        (Type::Int4, Datum::Bool(b)) => Datum::Int4(b as i32),
        (Type::Text | Type::Varchar | Type::Bpchar | Type::Name, Datum::Bool(b)) => {
            Datum::Text(if b { "true" } else { "false" }.to_string())
        }
        (Type::Text | Type::Varchar | Type::Bpchar | Type::Name, d) => {
            let s = d.to_text().unwrap_or_default();
            Datum::Text(s)
        }
        (Type::TimestampTz, Datum::Timestamp(v)) => Datum::TimestampTz(v),
        (Type::Timestamp, Datum::TimestampTz(v)) => Datum::Timestamp(v),
        (Type::Date, Datum::Timestamp(v) | Datum::TimestampTz(v)) => {
            Datum::Date(v.div_euclid(86_400_000_000) as i32)
        }
        (Type::Timestamp, Datum::Date(d)) => Datum::Timestamp(d as i64 * 86_400_000_000),
        (Type::TimestampTz, Datum::Date(d)) => Datum::TimestampTz(d as i64 * 86_400_000_000),
        (_, Datum::Text(s)) => Datum::parse_text(ty, &s).map_err(invalid)?,
        (t, d) if d.type_of() == t => d,
        (t, d) => {
            return Err(SqlError::new(
                "42846",
                format!("cannot cast type {} to {}", d.type_of().name(), t.name()),
            ))
        }
    };
    apply_typmod(out, ty, typmod, true)
}

/// Enforces varchar(n)/char(n)/numeric(p,s). `explicit` casts truncate strings
/// silently, as PostgreSQL does; assignments raise 22001.
pub fn apply_typmod(d: Datum, ty: Type, typmod: i32, explicit: bool) -> Result<Datum, SqlError> {
    Ok(match (ty, d) {
        (Type::Varchar | Type::Bpchar, Datum::Text(s)) if typmod >= 0 => {
            let n = typmod as usize;
            let len = s.chars().count();
            if len > n {
                let trimmed: String = s.chars().skip(n).collect();
                if !explicit && !trimmed.chars().all(|c| c == ' ') {
                    return Err(SqlError::new(
                        "22001",
                        format!(
                            "value too long for type {}({n})",
                            if ty == Type::Varchar {
                                "character varying"
                            } else {
                                "character"
                            }
                        ),
                    ));
                }
                Datum::Text(s.chars().take(n).collect())
            } else if ty == Type::Bpchar && len < n {
                let mut s = s;
                s.extend(std::iter::repeat_n(' ', n - len));
                Datum::Text(s)
            } else {
                Datum::Text(s)
            }
        }
        (Type::Numeric, Datum::Numeric(n)) if typmod >= 0 => {
            let precision = (typmod >> 16) as u32;
            let scale = (typmod & 0xffff) as u16;
            let r = n
                .rescale(scale)
                .ok_or_else(|| SqlError::new("22003", "numeric field overflow"))?;
            if precision > 0 && r.integer_digits() > precision.saturating_sub(scale as u32) {
                return Err(SqlError::new("22003", "numeric field overflow").with_detail(format!(
                    "A field with precision {precision}, scale {scale} must round to an absolute value less than 10^{}.",
                    precision - scale as u32
                )));
            }
            Datum::Numeric(r)
        }
        (_, d) => d,
    })
}

/// Converts an assigned value to a column's type (assignment cast).
pub fn assign(d: Datum, ty: Type, typmod: i32) -> Result<Datum, SqlError> {
    if d.is_null() {
        return Ok(d);
    }
    let src = d.type_of();
    let converted = if src == ty || (src.is_text() && ty.is_text()) {
        d
    } else if src.is_numeric() && ty.is_numeric()
        || src == Type::Text
        || ty.is_text()
        || matches!(src, Type::Date | Type::Timestamp | Type::TimestampTz)
    {
        if src == Type::Text
            || ty.is_text()
            || src.is_numeric()
            || ty == Type::Date
            || ty == Type::Timestamp
            || ty == Type::TimestampTz
        {
            cast(d, ty, -1)?
        } else {
            return Err(mismatch(src, ty));
        }
    } else {
        return Err(mismatch(src, ty));
    };
    apply_typmod(converted, ty, typmod, false)
}

fn mismatch(src: Type, ty: Type) -> SqlError {
    SqlError::new(
        "42804",
        format!(
            "column is of type {} but expression is of type {}",
            ty.name(),
            src.name()
        ),
    )
}

fn like(s: &str, p: &str, ci: bool) -> bool {
    let (s, p): (Vec<char>, Vec<char>) = if ci {
        (
            s.to_lowercase().chars().collect(),
            p.to_lowercase().chars().collect(),
        )
    } else {
        (s.chars().collect(), p.chars().collect())
    };
    // Iterative wildcard match with backtracking on the last '%'.
    let (mut i, mut j) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if j < p.len() && p[j] == '\\' && j + 1 < p.len() && p[j + 1] == s[i] {
            i += 1;
            j += 2;
        } else if j < p.len() && (p[j] == '_' || (p[j] == s[i] && p[j] != '%')) {
            i += 1;
            j += 1;
        } else if j < p.len() && p[j] == '%' {
            star = Some(j);
            mark = i;
            j += 1;
        } else if let Some(sj) = star {
            j = sj + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while j < p.len() && p[j] == '%' {
        j += 1;
    }
    j == p.len()
}

/// `a + b` in `ty`, as the `+` operator computes it (sum and avg accumulate with it).
pub fn add(a: Datum, b: Datum, ty: Type) -> Result<Datum, SqlError> {
    arith(BinOp::Add, a, b, ty)
}

fn arith(op: BinOp, a: Datum, b: Datum, ty: Type) -> Result<Datum, SqlError> {
    if a.is_null() || b.is_null() {
        return Ok(Datum::Null);
    }
    if let (Datum::Date(d), Some(n)) = (&a, b.as_i64()) {
        let v = if op == BinOp::Add {
            *d as i64 + n
        } else {
            *d as i64 - n
        };
        return Ok(Datum::Date(
            i32::try_from(v).map_err(|_| SqlError::new("22008", "date out of range"))?,
        ));
    }
    if let (Datum::Date(x), Datum::Date(y)) = (&a, &b) {
        return Ok(Datum::Int4(x - y));
    }
    let div0 = || SqlError::new("22012", "division by zero");
    match ty {
        Type::Int2 | Type::Int4 | Type::Int8 => {
            let (x, y) = (
                a.as_i64()
                    .or_else(|| cast(a.clone(), Type::Int8, -1).ok()?.as_i64())
                    .ok_or_else(overflow)?,
                b.as_i64()
                    .or_else(|| cast(b.clone(), Type::Int8, -1).ok()?.as_i64())
                    .ok_or_else(overflow)?,
            );
            let r = match op {
                BinOp::Add => x.checked_add(y),
                BinOp::Sub => x.checked_sub(y),
                BinOp::Mul => x.checked_mul(y),
                BinOp::Div => {
                    if y == 0 {
                        return Err(div0());
                    }
                    x.checked_div(y)
                }
                BinOp::Mod => {
                    if y == 0 {
                        return Err(div0());
                    }
                    x.checked_rem(y)
                }
                _ => None,
            }
            .ok_or_else(overflow)?;
            cast(Datum::Int8(r), ty, -1)
        }
        Type::Numeric => {
            let (x, y) = (
                to_numeric(&a).ok_or_else(|| SqlError::new("22P02", "not a number"))?,
                to_numeric(&b).ok_or_else(|| SqlError::new("22P02", "not a number"))?,
            );
            let r = match op {
                BinOp::Add => x.add(y),
                BinOp::Sub => x.sub(y),
                BinOp::Mul => x.mul(y),
                BinOp::Div => {
                    if y.mantissa == 0 {
                        return Err(div0());
                    }
                    x.div(y)
                }
                BinOp::Mod => {
                    if y.mantissa == 0 {
                        return Err(div0());
                    }
                    let q = x.div(y).and_then(|q| q.rescale(0));
                    q.and_then(|q| q.mul(y)).and_then(|m| x.sub(m))
                }
                _ => None,
            };
            Ok(Datum::Numeric(r.ok_or_else(|| {
                SqlError::new("22003", "numeric value out of range")
            })?))
        }
        _ => {
            let (x, y) = (
                to_f64(&a).ok_or_else(|| SqlError::new("22P02", "not a number"))?,
                to_f64(&b).ok_or_else(|| SqlError::new("22P02", "not a number"))?,
            );
            let r = match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => {
                    if y == 0.0 {
                        return Err(div0());
                    }
                    x / y
                }
                BinOp::Mod => x % y,
                _ => f64::NAN,
            };
            Ok(if ty == Type::Float4 {
                Datum::Float4(r as f32)
            } else {
                Datum::Float8(r)
            })
        }
    }
}

fn missing_subquery(slot: usize) -> SqlError {
    SqlError::internal(format!("subquery {slot} was not computed"))
}

/// Sorts a subquery's values for [`set_contains`] and notes whether one was NULL.
pub fn sub_set(values: Vec<Datum>) -> SubValue {
    let has_null = values.iter().any(Datum::is_null);
    let mut sorted: Vec<Datum> = values.into_iter().filter(|d| !d.is_null()).collect();
    sorted.sort_by(|a, b| compare(a, b).unwrap_or(Ordering::Equal));
    sorted.dedup_by(|a, b| compare(a, b) == Some(Ordering::Equal));
    SubValue::Set { sorted, has_null }
}

/// Whether `v` (not NULL) is in a [`sub_set`], comparing as `=` would: the probe
/// is converted once to the set's type and binary-searched. A set of text
/// searched for a non-text value converts each element instead (text order is
/// not the value's order), one by one as `IN (list)` does.
fn set_contains(sorted: &[Datum], v: &Datum) -> Result<bool, SqlError> {
    let Some(first) = sorted.first() else {
        return Ok(false);
    };
    if matches!(first, Datum::Text(_)) && !matches!(v, Datum::Text(_)) {
        for d in sorted {
            let (a, b) = unify_for_compare(v.clone(), d.clone())?;
            if compare(&a, &b) == Some(Ordering::Equal) {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    let (probe, _) = unify_for_compare(v.clone(), first.clone())?;
    Ok(sorted
        .binary_search_by(|d| compare(d, &probe).unwrap_or(Ordering::Less))
        .is_ok())
}

pub fn eval(e: &Expr, row: &[Datum], ctx: &EvalCtx<'_>) -> Result<Datum, SqlError> {
    Ok(match e {
        Expr::Const(d, _) => d.clone(),
        Expr::Column(i, _) | Expr::GroupRef(i, _) => row.get(*i).cloned().unwrap_or(Datum::Null),
        Expr::AggRef(i, _) => row.get(*i).cloned().unwrap_or(Datum::Null),
        Expr::Param(i) => {
            ctx.params.get(*i).cloned().ok_or_else(|| {
                SqlError::new("08P01", format!("there is no parameter ${}", i + 1))
            })?
        }
        Expr::Precomputed(i, _) => ctx.precomputed.get(*i).cloned().unwrap_or(Datum::Null),
        Expr::Outer(i, _) => ctx.outer.get(*i).cloned().unwrap_or(Datum::Null),
        Expr::PerRow(e) => eval(e, row, ctx)?,
        Expr::ScalarSub(i, _) => match ctx.subqueries.get(*i) {
            Some(SubValue::Scalar(d)) => d.clone(),
            _ => return Err(missing_subquery(*i)),
        },
        Expr::Exists(i) => match ctx.subqueries.get(*i) {
            Some(SubValue::Exists(b)) => Datum::Bool(*b),
            _ => return Err(missing_subquery(*i)),
        },
        Expr::InSub(x, i, neg) => {
            let Some(SubValue::Set { sorted, has_null }) = ctx.subqueries.get(*i) else {
                return Err(missing_subquery(*i));
            };
            if sorted.is_empty() && !has_null {
                // PostgreSQL: IN of no rows is false even for a NULL operand.
                return Ok(Datum::Bool(*neg));
            }
            let v = eval(x, row, ctx)?;
            if v.is_null() {
                return Ok(Datum::Null);
            }
            if set_contains(sorted, &v)? {
                Datum::Bool(!neg)
            } else if *has_null {
                Datum::Null
            } else {
                Datum::Bool(*neg)
            }
        }
        Expr::Binary(op, l, r, ty) => match op {
            BinOp::And => {
                let a = truthy(&eval(l, row, ctx)?)?;
                if a == Some(false) {
                    return Ok(Datum::Bool(false));
                }
                let b = truthy(&eval(r, row, ctx)?)?;
                match (a, b) {
                    (_, Some(false)) => Datum::Bool(false),
                    (Some(true), Some(true)) => Datum::Bool(true),
                    _ => Datum::Null,
                }
            }
            BinOp::Or => {
                let a = truthy(&eval(l, row, ctx)?)?;
                if a == Some(true) {
                    return Ok(Datum::Bool(true));
                }
                let b = truthy(&eval(r, row, ctx)?)?;
                match (a, b) {
                    (_, Some(true)) => Datum::Bool(true),
                    (Some(false), Some(false)) => Datum::Bool(false),
                    _ => Datum::Null,
                }
            }
            BinOp::Concat => {
                let (a, b) = (eval(l, row, ctx)?, eval(r, row, ctx)?);
                match (a.to_text(), b.to_text()) {
                    (Some(x), Some(y)) => Datum::Text(x + &y),
                    _ => Datum::Null,
                }
            }
            BinOp::Eq | BinOp::NotEq | BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq => {
                let (a, b) = (eval(l, row, ctx)?, eval(r, row, ctx)?);
                let (a, b) = unify_for_compare(a, b)?;
                match compare(&a, &b) {
                    None => Datum::Null,
                    Some(o) => Datum::Bool(match op {
                        BinOp::Eq => o == Ordering::Equal,
                        BinOp::NotEq => o != Ordering::Equal,
                        BinOp::Lt => o == Ordering::Less,
                        BinOp::LtEq => o != Ordering::Greater,
                        BinOp::Gt => o == Ordering::Greater,
                        _ => o != Ordering::Less,
                    }),
                }
            }
            _ => arith(*op, eval(l, row, ctx)?, eval(r, row, ctx)?, *ty)?,
        },
        Expr::Not(x) => match truthy(&eval(x, row, ctx)?)? {
            Some(b) => Datum::Bool(!b),
            None => Datum::Null,
        },
        Expr::Neg(x, ty) => {
            let v = eval(x, row, ctx)?;
            arith(
                BinOp::Sub,
                cast(Datum::Int4(0), *ty, -1).unwrap_or(Datum::Int4(0)),
                v,
                *ty,
            )?
        }
        Expr::IsNull(x, neg) => Datum::Bool(eval(x, row, ctx)?.is_null() != *neg),
        Expr::IsBool(x, want, neg) => {
            let v = truthy(&eval(x, row, ctx)?)?;
            Datum::Bool((v == Some(*want)) != *neg)
        }
        Expr::InList(x, items, neg) => {
            let v = eval(x, row, ctx)?;
            if v.is_null() {
                return Ok(Datum::Null);
            }
            let mut saw_null = false;
            for it in items {
                let (a, b) = unify_for_compare(v.clone(), eval(it, row, ctx)?)?;
                match compare(&a, &b) {
                    Some(Ordering::Equal) => return Ok(Datum::Bool(!neg)),
                    None => saw_null = true,
                    _ => {}
                }
            }
            if saw_null {
                Datum::Null
            } else {
                Datum::Bool(*neg)
            }
        }
        Expr::Between(x, lo, hi, neg) => {
            let v = eval(x, row, ctx)?;
            let (a, l) = unify_for_compare(v.clone(), eval(lo, row, ctx)?)?;
            let (b, h) = unify_for_compare(v, eval(hi, row, ctx)?)?;
            match (compare(&a, &l), compare(&b, &h)) {
                (Some(x), Some(y)) => {
                    Datum::Bool((x != Ordering::Less && y != Ordering::Greater) != *neg)
                }
                _ => Datum::Null,
            }
        }
        Expr::Like(x, p, neg, ci) => {
            match (eval(x, row, ctx)?.to_text(), eval(p, row, ctx)?.to_text()) {
                (Some(s), Some(p)) => Datum::Bool(like(&s, &p, *ci) != *neg),
                _ => Datum::Null,
            }
        }
        Expr::Case(op, whens, els, _) => {
            let subject = match op {
                Some(o) => Some(eval(o, row, ctx)?),
                None => None,
            };
            for (c, r) in whens {
                let hit = match &subject {
                    Some(s) => {
                        let (a, b) = unify_for_compare(s.clone(), eval(c, row, ctx)?)?;
                        compare(&a, &b) == Some(Ordering::Equal)
                    }
                    None => truthy(&eval(c, row, ctx)?)? == Some(true),
                };
                if hit {
                    return eval(r, row, ctx);
                }
            }
            match els {
                Some(e) => eval(e, row, ctx)?,
                None => Datum::Null,
            }
        }
        Expr::Cast(x, ty, typmod) => cast(eval(x, row, ctx)?, *ty, *typmod)?,
        Expr::Func(f, args, ty) => {
            let mut vals = Vec::with_capacity(args.len());
            for a in args {
                vals.push(eval(a, row, ctx)?);
            }
            call(*f, vals, *ty, ctx)?
        }
    })
}

/// Makes two values comparable: text (an untyped literal or parameter) against a
/// typed value is parsed as that type.
fn unify_for_compare(a: Datum, b: Datum) -> Result<(Datum, Datum), SqlError> {
    match (&a, &b) {
        (Datum::Text(_), Datum::Text(_)) => Ok((a, b)),
        (Datum::Text(s), other) if !other.is_null() => {
            let t = other.type_of();
            let parsed = Datum::parse_text(t, s).map_err(|e| SqlError::new("22P02", e.0))?;
            Ok((parsed, b))
        }
        (other, Datum::Text(s)) if !other.is_null() => {
            let t = other.type_of();
            let parsed = Datum::parse_text(t, s).map_err(|e| SqlError::new("22P02", e.0))?;
            Ok((a, parsed))
        }
        _ => Ok((a, b)),
    }
}

fn call(f: Func, mut v: Vec<Datum>, ty: Type, ctx: &EvalCtx<'_>) -> Result<Datum, SqlError> {
    let text = |d: &Datum| d.to_text();
    Ok(match f {
        Func::Now => Datum::TimestampTz(ctx.now),
        Func::StatementTimestamp => Datum::TimestampTz(ctx.statement_now),
        Func::ClockTimestamp => Datum::TimestampTz(now_timestamp()),
        Func::CurrentDate => {
            Datum::Date(ctx.now.div_euclid(borealis_engine::types::USECS_PER_DAY) as i32)
        }
        Func::LocalTimestamp => Datum::Timestamp(ctx.now),
        Func::Coalesce => v.into_iter().find(|d| !d.is_null()).unwrap_or(Datum::Null),
        Func::NullIf => {
            let b = v.pop().unwrap_or(Datum::Null);
            let a = v.pop().unwrap_or(Datum::Null);
            let (x, y) = unify_for_compare(a.clone(), b)?;
            if compare(&x, &y) == Some(Ordering::Equal) {
                Datum::Null
            } else {
                a
            }
        }
        Func::Greatest | Func::Least => {
            let mut best: Option<Datum> = None;
            for d in v.into_iter().filter(|d| !d.is_null()) {
                best = Some(match best {
                    None => d,
                    Some(b) => {
                        let o = compare(&d, &b).unwrap_or(Ordering::Equal);
                        if (f == Func::Greatest) == (o == Ordering::Greater) {
                            d
                        } else {
                            b
                        }
                    }
                });
            }
            best.unwrap_or(Datum::Null)
        }
        Func::Text(f) => text_call(f, &v)?,
        Func::BpcharTrim => match v.into_iter().next() {
            Some(Datum::Text(s)) => Datum::Text(s.trim_end_matches(' ').to_string()),
            Some(other) => other,
            None => Datum::Null,
        },
        Func::OctetLength => match v.first() {
            Some(Datum::Bytea(b)) => Datum::Int4(b.len() as i32),
            Some(d) => match text(d) {
                Some(s) => Datum::Int4(s.len() as i32),
                None => Datum::Null,
            },
            None => Datum::Null,
        },
        Func::Lower => v
            .first()
            .and_then(text)
            .map(|s| Datum::Text(s.to_lowercase()))
            .unwrap_or(Datum::Null),
        Func::Upper => v
            .first()
            .and_then(text)
            .map(|s| Datum::Text(s.to_uppercase()))
            .unwrap_or(Datum::Null),
        Func::Length => match v.first() {
            Some(Datum::Bytea(b)) => Datum::Int4(b.len() as i32),
            Some(d) => match text(d) {
                Some(s) => Datum::Int4(s.trim_end_matches(' ').chars().count() as i32),
                None => Datum::Null,
            },
            None => Datum::Null,
        },
        Func::Abs => match v.into_iter().next() {
            Some(Datum::Int2(x)) => Datum::Int2(x.checked_abs().ok_or_else(overflow)?),
            Some(Datum::Int4(x)) => Datum::Int4(x.checked_abs().ok_or_else(overflow)?),
            Some(Datum::Int8(x)) => Datum::Int8(x.checked_abs().ok_or_else(overflow)?),
            Some(Datum::Float4(x)) => Datum::Float4(x.abs()),
            Some(Datum::Float8(x)) => Datum::Float8(x.abs()),
            Some(Datum::Numeric(n)) => Datum::Numeric(Numeric {
                mantissa: n.mantissa.abs(),
                scale: n.scale,
            }),
            _ => Datum::Null,
        },
        Func::Random => {
            // xorshift seeded from the clock: random() makes no reproducibility promise.
            let mut x = (now_timestamp() as u64) ^ 0x9E3779B97F4A7C15;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Datum::Float8((x >> 11) as f64 / (1u64 << 53) as f64)
        }
        Func::Version => {
            Datum::Text("PostgreSQL 15.0 (Borealis 0.1.0) on x86_64-pc-linux-gnu".into())
        }
        Func::CurrentDatabase => Datum::Text(ctx.database.to_string()),
        Func::CurrentUser => Datum::Text(ctx.user.to_string()),
        Func::Substr => {
            let s = match v.first().and_then(text) {
                Some(s) => s,
                None => return Ok(Datum::Null),
            };
            let chars: Vec<char> = s.chars().collect();
            let start = v.get(1).and_then(|d| d.as_i64()).unwrap_or(1);
            let len = v.get(2).and_then(|d| d.as_i64());
            let from = (start - 1).max(0) as usize;
            let to = match len {
                Some(l) if l < 0 => {
                    return Err(SqlError::new(
                        "22011",
                        "negative substring length not allowed",
                    ))
                }
                Some(l) => ((start - 1 + l).max(0) as usize).min(chars.len()),
                None => chars.len(),
            };
            Datum::Text(if from < to {
                chars[from..to].iter().collect()
            } else {
                String::new()
            })
        }
        Func::Round => {
            let digits = v.get(1).and_then(|d| d.as_i64()).unwrap_or(0);
            match v.first() {
                Some(Datum::Float8(x)) => {
                    let m = 10f64.powi(digits as i32);
                    Datum::Float8((x * m).round() / m)
                }
                Some(d) if !d.is_null() => {
                    let n = to_numeric(d).ok_or_else(|| SqlError::new("22P02", "not a number"))?;
                    Datum::Numeric(
                        n.rescale(digits.clamp(0, 30) as u16)
                            .ok_or_else(|| SqlError::new("22003", "numeric overflow"))?,
                    )
                }
                _ => Datum::Null,
            }
        }
        Func::Floor | Func::Ceil => match v.first() {
            Some(d) if !d.is_null() => {
                let x = to_f64(d).unwrap_or(0.0);
                let r = if f == Func::Floor {
                    x.floor()
                } else {
                    x.ceil()
                };
                cast(Datum::Float8(r), ty, -1)?
            }
            _ => Datum::Null,
        },
    })
}

/// Evaluates a predicate: NULL counts as false.
pub fn eval_pred(e: &Expr, row: &[Datum], ctx: &EvalCtx<'_>) -> Result<bool, SqlError> {
    Ok(truthy(&eval(e, row, ctx)?)? == Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns() {
        assert!(like("hello", "h%o", false));
        assert!(like("hello", "_ello", false));
        assert!(!like("hello", "h_o", false));
        assert!(like("HeLLo", "hello", true));
        assert!(like("a%b", "a\\%b", false));
        assert!(like("", "%", false));
    }

    #[test]
    fn type_names() {
        assert_eq!(parse_type_name("VARCHAR(20)").unwrap(), (Type::Varchar, 20));
        assert_eq!(
            parse_type_name("NUMERIC(10,2)").unwrap(),
            (Type::Numeric, (10 << 16) | 2)
        );
        assert_eq!(
            parse_type_name("TIMESTAMP WITH TIME ZONE").unwrap().0,
            Type::TimestampTz
        );
        assert_eq!(
            parse_type_name("CHARACTER VARYING(5)").unwrap(),
            (Type::Varchar, 5)
        );
        assert!(parse_type_name("frobnicate").is_err());
    }

    #[test]
    fn typmods_and_casts() {
        assert_eq!(
            assign(Datum::Text("ab".into()), Type::Bpchar, 4).unwrap(),
            Datum::Text("ab  ".into())
        );
        assert_eq!(
            assign(Datum::Text("abcdef".into()), Type::Varchar, 3)
                .unwrap_err()
                .code,
            "22001"
        );
        assert_eq!(
            cast(Datum::Text("abcdef".into()), Type::Varchar, 3).unwrap(),
            Datum::Text("abc".into())
        );
        assert_eq!(
            assign(Datum::Int4(12345), Type::Numeric, (4 << 16) | 1)
                .unwrap_err()
                .code,
            "22003"
        );
        assert_eq!(
            cast(Datum::Text("12".into()), Type::Int4, -1).unwrap(),
            Datum::Int4(12)
        );
        assert_eq!(
            cast(Datum::Text("x".into()), Type::Int4, -1)
                .unwrap_err()
                .code,
            "22P02"
        );
        assert_eq!(
            arith(BinOp::Div, Datum::Int4(1), Datum::Int4(0), Type::Int4)
                .unwrap_err()
                .code,
            "22012"
        );
        assert_eq!(
            arith(
                BinOp::Add,
                Datum::Int4(i32::MAX),
                Datum::Int4(1),
                Type::Int4
            )
            .unwrap_err()
            .code,
            "22003"
        );
    }
}

/// PostgreSQL's string functions, counting in characters as PostgreSQL does for
/// UTF-8.
fn text_call(f: TextFn, v: &[Datum]) -> Result<Datum, SqlError> {
    // concat and concat_ws skip NULLs; the others are strict.
    let strict = !matches!(f, TextFn::Concat | TextFn::ConcatWs);
    if strict && v.iter().any(Datum::is_null) {
        return Ok(Datum::Null);
    }
    let text = |i: usize| v.get(i).and_then(Datum::to_text);
    let int = |i: usize| v.get(i).and_then(Datum::as_i64).unwrap_or(0);
    let s = text(0).unwrap_or_default();
    let chars: Vec<char> = s.chars().collect();
    let n = chars.len() as i64;
    // Characters [from, to) of `s`, clamped.
    let slice = |from: i64, to: i64| -> String {
        let (from, to) = (from.clamp(0, n) as usize, to.clamp(0, n) as usize);
        if from < to {
            chars[from..to].iter().collect()
        } else {
            String::new()
        }
    };
    let out = match f {
        TextFn::Repeat => {
            let times = int(1).max(0) as usize;
            if s.len().saturating_mul(times) > MAX_TEXT_BYTES {
                return Err(SqlError::new("54000", "requested length too large"));
            }
            s.repeat(times)
        }
        TextFn::Replace => {
            let from = text(1).unwrap_or_default();
            if from.is_empty() {
                s
            } else {
                s.replace(&from, &text(2).unwrap_or_default())
            }
        }
        TextFn::Left => {
            let k = int(1);
            slice(0, if k >= 0 { k } else { n + k })
        }
        TextFn::Right => {
            let k = int(1);
            slice(if k >= 0 { n - k } else { -k }, n)
        }
        TextFn::Lpad | TextFn::Rpad => {
            let len = int(1).max(0);
            if len as usize > MAX_TEXT_BYTES {
                return Err(SqlError::new("54000", "requested length too large"));
            }
            let fill: Vec<char> = text(2).unwrap_or_else(|| " ".into()).chars().collect();
            if len <= n || fill.is_empty() {
                slice(0, len)
            } else {
                let pad: String = fill.iter().cycle().take((len - n) as usize).collect();
                if f == TextFn::Lpad {
                    pad + &s
                } else {
                    s + &pad
                }
            }
        }
        TextFn::Btrim | TextFn::Ltrim | TextFn::Rtrim => {
            let set: Vec<char> = text(1).unwrap_or_else(|| " ".into()).chars().collect();
            let strip = |c: char| set.contains(&c);
            match f {
                TextFn::Ltrim => s.trim_start_matches(strip).to_string(),
                TextFn::Rtrim => s.trim_end_matches(strip).to_string(),
                _ => s.trim_matches(strip).to_string(),
            }
        }
        TextFn::Strpos => {
            let sub = text(1).unwrap_or_default();
            return Ok(Datum::Int4(match s.find(&sub) {
                Some(byte) => s[..byte].chars().count() as i32 + 1,
                None => 0,
            }));
        }
        TextFn::SplitPart => {
            let delim = text(1).unwrap_or_default();
            let k = int(2);
            if k == 0 {
                return Err(SqlError::new("22023", "field position must not be zero"));
            }
            let fields: Vec<&str> = if delim.is_empty() {
                vec![s.as_str()]
            } else {
                s.split(delim.as_str()).collect()
            };
            let i = if k > 0 {
                k - 1
            } else {
                fields.len() as i64 + k
            };
            usize::try_from(i)
                .ok()
                .and_then(|i| fields.get(i))
                .map(|f| f.to_string())
                .unwrap_or_default()
        }
        TextFn::Reverse => chars.iter().rev().collect(),
        TextFn::Initcap => {
            let mut out = String::with_capacity(s.len());
            let mut word = false;
            for c in chars {
                if c.is_alphanumeric() {
                    if word {
                        out.extend(c.to_lowercase());
                    } else {
                        out.extend(c.to_uppercase());
                    }
                    word = true;
                } else {
                    out.push(c);
                    word = false;
                }
            }
            out
        }
        TextFn::Concat => v.iter().filter_map(Datum::to_text).collect(),
        TextFn::ConcatWs => {
            let Some(sep) = text(0) else {
                return Ok(Datum::Null);
            };
            let parts: Vec<String> = v[1..].iter().filter_map(Datum::to_text).collect();
            parts.join(&sep)
        }
    };
    Ok(Datum::Text(out))
}

/// The longest text a string function builds (PostgreSQL's limit for a value is
/// 1 GB; beyond it, 54000).
const MAX_TEXT_BYTES: usize = (1 << 30) - 1;
