//! SQL types and values, with PostgreSQL's text forms.
//!
//! `Datum` is the in-memory value; the type of a column travels beside it (text,
//! varchar and char all hold `Datum::Text`). Text input/output follows PostgreSQL 15
//! with `DateStyle = ISO, MDY` and `TimeZone = UTC`, which is what the server reports.

use std::cmp::Ordering;
use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// numeric(p, s); precision and scale live in the column's type modifier.
    Numeric,
    Text,
    Varchar,
    Bpchar,
    Bytea,
    Date,
    Timestamp,
    TimestampTz,
    Uuid,
    Oid,
    Name,
    /// A literal or parameter whose type is not known yet.
    Unknown,
}

impl Type {
    pub fn oid(self) -> u32 {
        match self {
            Type::Bool => 16,
            Type::Bytea => 17,
            Type::Name => 19,
            Type::Int8 => 20,
            Type::Int2 => 21,
            Type::Int4 => 23,
            Type::Text => 25,
            Type::Oid => 26,
            Type::Float4 => 700,
            Type::Float8 => 701,
            Type::Unknown => 705,
            Type::Bpchar => 1042,
            Type::Varchar => 1043,
            Type::Date => 1082,
            Type::Timestamp => 1114,
            Type::TimestampTz => 1184,
            Type::Numeric => 1700,
            Type::Uuid => 2950,
        }
    }

    pub fn from_oid(oid: u32) -> Option<Type> {
        Some(match oid {
            16 => Type::Bool,
            17 => Type::Bytea,
            19 => Type::Name,
            20 => Type::Int8,
            21 => Type::Int2,
            23 => Type::Int4,
            25 => Type::Text,
            26 => Type::Oid,
            700 => Type::Float4,
            701 => Type::Float8,
            705 => Type::Unknown,
            1042 => Type::Bpchar,
            1043 => Type::Varchar,
            1082 => Type::Date,
            1114 => Type::Timestamp,
            1184 => Type::TimestampTz,
            1700 => Type::Numeric,
            2950 => Type::Uuid,
            _ => return None,
        })
    }

    /// PostgreSQL's name for the type (as `format_type` prints it).
    pub fn name(self) -> &'static str {
        match self {
            Type::Bool => "boolean",
            Type::Int2 => "smallint",
            Type::Int4 => "integer",
            Type::Int8 => "bigint",
            Type::Float4 => "real",
            Type::Float8 => "double precision",
            Type::Numeric => "numeric",
            Type::Text => "text",
            Type::Varchar => "character varying",
            Type::Bpchar => "character",
            Type::Bytea => "bytea",
            Type::Date => "date",
            Type::Timestamp => "timestamp without time zone",
            Type::TimestampTz => "timestamp with time zone",
            Type::Uuid => "uuid",
            Type::Oid => "oid",
            Type::Name => "name",
            Type::Unknown => "unknown",
        }
    }

    /// Fixed binary length as `pg_type.typlen` reports it (-1 = variable).
    pub fn typlen(self) -> i16 {
        match self {
            Type::Bool => 1,
            Type::Int2 => 2,
            Type::Int4 | Type::Float4 | Type::Date | Type::Oid => 4,
            Type::Int8 | Type::Float8 | Type::Timestamp | Type::TimestampTz => 8,
            Type::Uuid => 16,
            Type::Name => 64,
            _ => -1,
        }
    }

    pub fn is_integer(self) -> bool {
        matches!(self, Type::Int2 | Type::Int4 | Type::Int8 | Type::Oid)
    }
    pub fn is_numeric(self) -> bool {
        self.is_integer() || matches!(self, Type::Float4 | Type::Float8 | Type::Numeric)
    }
    pub fn is_text(self) -> bool {
        matches!(
            self,
            Type::Text | Type::Varchar | Type::Bpchar | Type::Name | Type::Unknown
        )
    }
    pub fn to_u8(self) -> u8 {
        self as u8
    }
    pub fn from_u8(v: u8) -> Option<Type> {
        const ALL: [Type; 18] = [
            Type::Bool,
            Type::Int2,
            Type::Int4,
            Type::Int8,
            Type::Float4,
            Type::Float8,
            Type::Numeric,
            Type::Text,
            Type::Varchar,
            Type::Bpchar,
            Type::Bytea,
            Type::Date,
            Type::Timestamp,
            Type::TimestampTz,
            Type::Uuid,
            Type::Oid,
            Type::Name,
            Type::Unknown,
        ];
        ALL.get(v as usize).copied()
    }
}

/// Exact decimal: `mantissa * 10^-scale`. Covers 38 significant digits; larger
/// values are refused with 22003 rather than rounded silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Numeric {
    pub mantissa: i128,
    pub scale: u16,
}

pub const NUMERIC_MAX_SCALE: u16 = 30;

impl Numeric {
    pub fn from_i64(v: i64) -> Numeric {
        Numeric {
            mantissa: v as i128,
            scale: 0,
        }
    }

    pub fn parse(s: &str) -> Option<Numeric> {
        let s = s.trim();
        let (neg, digits) = match s.as_bytes().first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let (mant_part, exp) = match digits.find(['e', 'E']) {
            Some(i) => (&digits[..i], digits[i + 1..].parse::<i32>().ok()?),
            None => (digits, 0),
        };
        let (int_part, frac_part) = mant_part.split_once('.').unwrap_or((mant_part, ""));
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        if !int_part
            .bytes()
            .chain(frac_part.bytes())
            .all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let mut mantissa: i128 = 0;
        for b in int_part.bytes().chain(frac_part.bytes()) {
            mantissa = mantissa.checked_mul(10)?.checked_add((b - b'0') as i128)?;
        }
        let mut scale = frac_part.len() as i32 - exp;
        while scale < 0 {
            mantissa = mantissa.checked_mul(10)?;
            scale += 1;
        }
        let mut n = Numeric {
            mantissa: if neg { -mantissa } else { mantissa },
            scale: scale as u16,
        };
        if n.scale > NUMERIC_MAX_SCALE {
            n = n.rescale(NUMERIC_MAX_SCALE)?;
        }
        Some(n)
    }

    /// Rounds (half away from zero) or extends to `scale` digits after the point.
    pub fn rescale(self, scale: u16) -> Option<Numeric> {
        use std::cmp::Ordering::*;
        match scale.cmp(&self.scale) {
            Equal => Some(self),
            Greater => {
                let f = 10i128.checked_pow((scale - self.scale) as u32)?;
                Some(Numeric {
                    mantissa: self.mantissa.checked_mul(f)?,
                    scale,
                })
            }
            Less => {
                let f = 10i128.checked_pow((self.scale - scale) as u32)?;
                let q = self.mantissa / f;
                let r = self.mantissa % f;
                let q = if r.abs() * 2 >= f {
                    q + self.mantissa.signum()
                } else {
                    q
                };
                Some(Numeric { mantissa: q, scale })
            }
        }
    }

    fn align(a: Numeric, b: Numeric) -> Option<(i128, i128, u16)> {
        let s = a.scale.max(b.scale);
        Some((a.rescale(s)?.mantissa, b.rescale(s)?.mantissa, s))
    }
    pub fn add(self, o: Numeric) -> Option<Numeric> {
        let (a, b, s) = Numeric::align(self, o)?;
        Some(Numeric {
            mantissa: a.checked_add(b)?,
            scale: s,
        })
    }
    pub fn sub(self, o: Numeric) -> Option<Numeric> {
        let (a, b, s) = Numeric::align(self, o)?;
        Some(Numeric {
            mantissa: a.checked_sub(b)?,
            scale: s,
        })
    }
    pub fn mul(self, o: Numeric) -> Option<Numeric> {
        let n = Numeric {
            mantissa: self.mantissa.checked_mul(o.mantissa)?,
            scale: self.scale + o.scale,
        };
        if n.scale > NUMERIC_MAX_SCALE {
            n.rescale(NUMERIC_MAX_SCALE)
        } else {
            Some(n)
        }
    }
    /// Division with PostgreSQL-like result scale (at least 16 significant digits).
    pub fn div(self, o: Numeric) -> Option<Numeric> {
        if o.mantissa == 0 {
            return None;
        }
        let scale = (self.scale.max(o.scale)).max(16).min(NUMERIC_MAX_SCALE);
        // self / o at `scale`: (a * 10^(scale + o.scale - self.scale + 1)) / b, then round.
        let shift = scale as i32 + o.scale as i32 - self.scale as i32 + 1;
        let a = if shift >= 0 {
            self.mantissa
                .checked_mul(10i128.checked_pow(shift as u32)?)?
        } else {
            self.mantissa / 10i128.checked_pow((-shift) as u32)?
        };
        let q = a / o.mantissa;
        Numeric {
            mantissa: q,
            scale: scale + 1,
        }
        .rescale(scale)
    }
    pub fn to_f64(self) -> f64 {
        self.mantissa as f64 / 10f64.powi(self.scale as i32)
    }
    pub fn from_f64(v: f64) -> Option<Numeric> {
        if !v.is_finite() {
            return None;
        }
        Numeric::parse(&format!("{v}"))
    }
    /// Number of digits before the decimal point (for numeric(p,s) checks).
    pub fn integer_digits(self) -> u32 {
        let int = (self.mantissa / 10i128.pow(self.scale as u32)).unsigned_abs();
        if int == 0 {
            0
        } else {
            int.ilog10() + 1
        }
    }
    pub fn cmp_value(self, o: Numeric) -> Ordering {
        match Numeric::align(self, o) {
            Some((a, b, _)) => a.cmp(&b),
            None => self.to_f64().total_cmp(&o.to_f64()),
        }
    }
}

impl std::fmt::Display for Numeric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = self.mantissa.unsigned_abs().to_string();
        let sign = if self.mantissa < 0 { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = if digits.len() <= scale {
            format!("{}{}", "0".repeat(scale + 1 - digits.len()), digits)
        } else {
            digits
        };
        let (int, frac) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{int}.{frac}")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Datum {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    Numeric(Numeric),
    Text(String),
    Bytea(Vec<u8>),
    /// Days since 2000-01-01 (PostgreSQL's epoch).
    Date(i32),
    /// Microseconds since 2000-01-01 00:00:00.
    Timestamp(i64),
    /// Microseconds since 2000-01-01 00:00:00 UTC.
    TimestampTz(i64),
    Uuid([u8; 16]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl Datum {
    pub fn is_null(&self) -> bool {
        matches!(self, Datum::Null)
    }

    /// The natural type of a value (text for Text).
    pub fn type_of(&self) -> Type {
        match self {
            Datum::Null => Type::Unknown,
            Datum::Bool(_) => Type::Bool,
            Datum::Int2(_) => Type::Int2,
            Datum::Int4(_) => Type::Int4,
            Datum::Int8(_) => Type::Int8,
            Datum::Float4(_) => Type::Float4,
            Datum::Float8(_) => Type::Float8,
            Datum::Numeric(_) => Type::Numeric,
            Datum::Text(_) => Type::Text,
            Datum::Bytea(_) => Type::Bytea,
            Datum::Date(_) => Type::Date,
            Datum::Timestamp(_) => Type::Timestamp,
            Datum::TimestampTz(_) => Type::TimestampTz,
            Datum::Uuid(_) => Type::Uuid,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Datum::Int2(v) => Some(*v as i64),
            Datum::Int4(v) => Some(*v as i64),
            Datum::Int8(v) => Some(*v),
            _ => None,
        }
    }

    /// PostgreSQL's text output, or `None` for NULL.
    pub fn to_text(&self) -> Option<String> {
        Some(match self {
            Datum::Null => return None,
            Datum::Bool(b) => (if *b { "t" } else { "f" }).to_string(),
            Datum::Int2(v) => v.to_string(),
            Datum::Int4(v) => v.to_string(),
            Datum::Int8(v) => v.to_string(),
            Datum::Float4(v) => format_float(*v as f64, true),
            Datum::Float8(v) => format_float(*v, false),
            Datum::Numeric(n) => n.to_string(),
            Datum::Text(s) => s.clone(),
            Datum::Bytea(b) => {
                let mut s = String::with_capacity(2 + b.len() * 2);
                s.push_str("\\x");
                for byte in b {
                    let _ = write!(s, "{byte:02x}");
                }
                s
            }
            Datum::Date(d) => format_date(*d),
            Datum::Timestamp(us) => format_timestamp(*us),
            Datum::TimestampTz(us) => format!("{}+00", format_timestamp(*us)),
            Datum::Uuid(u) => format_uuid(u),
        })
    }

    /// Parses PostgreSQL's text input for `ty`.
    pub fn parse_text(ty: Type, s: &str) -> Result<Datum, ParseError> {
        let bad = || {
            ParseError(format!(
                "invalid input syntax for type {}: \"{}\"",
                ty.name(),
                s
            ))
        };
        let t = s.trim();
        Ok(match ty {
            Type::Bool => match t.to_ascii_lowercase().as_str() {
                "t" | "true" | "yes" | "y" | "on" | "1" => Datum::Bool(true),
                "f" | "false" | "no" | "n" | "off" | "0" => Datum::Bool(false),
                _ => return Err(bad()),
            },
            Type::Int2 => Datum::Int2(
                parse_int(t, ty, s)?
                    .try_into()
                    .map_err(|_| out_of_range(ty))?,
            ),
            Type::Int4 | Type::Oid => Datum::Int4(
                parse_int(t, ty, s)?
                    .try_into()
                    .map_err(|_| out_of_range(ty))?,
            ),
            Type::Int8 => Datum::Int8(parse_int(t, ty, s)?),
            Type::Float4 => Datum::Float4(parse_float(t).ok_or_else(bad)? as f32),
            Type::Float8 => Datum::Float8(parse_float(t).ok_or_else(bad)?),
            Type::Numeric => Datum::Numeric(Numeric::parse(t).ok_or_else(bad)?),
            Type::Text | Type::Varchar | Type::Bpchar | Type::Name | Type::Unknown => {
                Datum::Text(s.to_string())
            }
            Type::Bytea => Datum::Bytea(parse_bytea(s).ok_or_else(bad)?),
            Type::Date => Datum::Date(parse_date(t).ok_or_else(|| date_error(ty, s, t))?),
            Type::Timestamp => {
                Datum::Timestamp(parse_timestamp(t, false).ok_or_else(|| date_error(ty, s, t))?)
            }
            Type::TimestampTz => {
                Datum::TimestampTz(parse_timestamp(t, true).ok_or_else(|| date_error(ty, s, t))?)
            }
            Type::Uuid => Datum::Uuid(parse_uuid(t).ok_or_else(bad)?),
        })
    }
}

/// A well-formed date whose fields are out of range ("2023-02-29") is 22008 in
/// PostgreSQL; anything else is a syntax error (22007).
fn date_error(ty: Type, orig: &str, t: &str) -> ParseError {
    let date_part = t.split([' ', 'T']).next().unwrap_or("");
    let fields: Vec<&str> = date_part.split('-').collect();
    let well_formed = fields.len() == 3
        && fields
            .iter()
            .all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    if well_formed {
        ParseError(format!("date/time field value out of range: \"{orig}\""))
    } else {
        ParseError(format!(
            "invalid input syntax for type {}: \"{orig}\"",
            ty.name()
        ))
    }
}

fn out_of_range(ty: Type) -> ParseError {
    ParseError(format!("value out of range for type {}", ty.name()))
}

fn parse_int(t: &str, ty: Type, orig: &str) -> Result<i64, ParseError> {
    t.parse::<i64>().map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
            out_of_range(ty)
        }
        _ => ParseError(format!(
            "invalid input syntax for type {}: \"{}\"",
            ty.name(),
            orig
        )),
    })
}

fn parse_float(t: &str) -> Option<f64> {
    match t.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "infinity" | "+infinity" | "inf" => Some(f64::INFINITY),
        "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
        _ => t.parse().ok(),
    }
}

/// PostgreSQL 15 prints floats with the shortest exact representation.
fn format_float(v: f64, single: bool) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let s = if single {
        format!("{}", v as f32)
    } else {
        format!("{v}")
    };
    // Rust prints 1e21 as "1000000000000000000000"; PostgreSQL switches to exponent
    // form at 1e15 (float8) / 1e6 (float4) digits. Match the common cases.
    let abs = v.abs();
    let limit = if single { 1e6 } else { 1e15 };
    if abs != 0.0 && (abs >= limit || abs < 1e-4) {
        let e = if single {
            format!("{:e}", v as f32)
        } else {
            format!("{v:e}")
        };
        // Rust: "1e21" / "1.5e-7"; PostgreSQL: "1e+21" / "1.5e-07".
        if let Some((m, exp)) = e.split_once('e') {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            return format!("{m}e{sign}{:0>2}", digits);
        }
    }
    s
}

fn parse_bytea(s: &str) -> Option<Vec<u8>> {
    if let Some(hex) = s.strip_prefix("\\x") {
        let hex: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if hex.len() % 2 != 0 {
            return None;
        }
        return hex
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok())
            .collect();
    }
    // Escape format: backslash-octal and doubled backslashes.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
            } else {
                let oct = std::str::from_utf8(b.get(i + 1..i + 4)?).ok()?;
                out.push(u8::from_str_radix(oct, 8).ok()?);
                i += 4;
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

// Civil-date conversions (Howard Hinnant's algorithms), relative to 2000-01-01.
const DAYS_1970_TO_2000: i64 = 10957;

pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468 - DAYS_1970_TO_2000
}

pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + DAYS_1970_TO_2000 + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn format_date(days: i32) -> String {
    let (y, m, d) = civil_from_days(days as i64);
    if y <= 0 {
        format!("{:04}-{m:02}-{d:02} BC", 1 - y)
    } else {
        format!("{y:04}-{m:02}-{d:02}")
    }
}

fn parse_date(t: &str) -> Option<i32> {
    let mut it = t.splitn(3, '-');
    let y: i64 = it.next()?.trim().parse().ok()?;
    let m: u32 = it.next()?.trim().parse().ok()?;
    let d: u32 = it.next()?.trim().parse().ok()?;
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    i32::try_from(days_from_civil(y, m, d)).ok()
}

pub const USECS_PER_DAY: i64 = 86_400_000_000;

fn format_timestamp(us: i64) -> String {
    let days = us.div_euclid(USECS_PER_DAY);
    let rem = us.rem_euclid(USECS_PER_DAY);
    let (h, mi, s, frac) = (
        rem / 3_600_000_000,
        rem / 60_000_000 % 60,
        rem / 1_000_000 % 60,
        rem % 1_000_000,
    );
    let mut out = format!("{} {h:02}:{mi:02}:{s:02}", format_date(days as i32));
    if frac != 0 {
        let f = format!("{frac:06}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out
}

/// Parses `YYYY-MM-DD[ T]HH:MM[:SS[.ffffff]][Z|+HH[:MM]|-HH[:MM]]`. For `timestamp`,
/// a zone suffix is ignored (as PostgreSQL does); for `timestamptz` it is applied.
fn parse_timestamp(t: &str, with_tz: bool) -> Option<i64> {
    let (date_part, rest) = match t.find([' ', 'T']) {
        Some(i) => (&t[..i], t[i + 1..].trim()),
        None => (t, ""),
    };
    let days = parse_date(date_part)? as i64;
    if rest.is_empty() {
        return Some(days * USECS_PER_DAY);
    }
    // Split off a zone: 'Z', or the last '+'/'-'.
    let (time_part, zone_secs) =
        if let Some(tp) = rest.strip_suffix('Z').or_else(|| rest.strip_suffix("UTC")) {
            (tp.trim(), 0i64)
        } else if let Some(i) = rest.rfind(['+', '-']) {
            let z = &rest[i + 1..];
            let (zh, zm) = z.split_once(':').unwrap_or((z, "0"));
            let secs = zh.parse::<i64>().ok()? * 3600 + zm.parse::<i64>().ok()? * 60;
            (
                rest[..i].trim(),
                if &rest[i..i + 1] == "-" { -secs } else { secs },
            )
        } else {
            (rest, 0)
        };
    let mut parts = time_part.split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let mi: i64 = parts.next()?.parse().ok()?;
    let (s, frac) = match parts.next() {
        Some(sec) => {
            let (s, f) = sec.split_once('.').unwrap_or((sec, ""));
            let mut f = f.to_string();
            if f.len() > 6 {
                f.truncate(6);
            }
            while f.len() < 6 {
                f.push('0');
            }
            (s.parse::<i64>().ok()?, f.parse::<i64>().ok()?)
        }
        None => (0, 0),
    };
    if h > 24 || mi > 59 || s > 60 {
        return None;
    }
    let local = days * USECS_PER_DAY + ((h * 60 + mi) * 60 + s) * 1_000_000 + frac;
    Some(if with_tz {
        local - zone_secs * 1_000_000
    } else {
        local
    })
}

fn format_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn parse_uuid(t: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = t
        .trim_matches(|c| c == '{' || c == '}')
        .bytes()
        .filter(|&b| b != b'-')
        .collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, c) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Current time as microseconds since 2000-01-01 UTC.
pub fn now_timestamp() -> i64 {
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    since_unix - DAYS_1970_TO_2000 * USECS_PER_DAY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        let cases = [
            (Type::Int4, "42"),
            (Type::Int8, "-9223372036854775808"),
            (Type::Bool, "t"),
            (Type::Numeric, "123.450"),
            (Type::Numeric, "-0.001"),
            (Type::Date, "2026-11-21"),
            (Type::Date, "2000-01-01"),
            (Type::Date, "1999-12-31"),
            (Type::Timestamp, "2026-11-21 06:55:58.5"),
            (Type::TimestampTz, "2026-11-21 06:55:58+00"),
            (Type::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            (Type::Bytea, "\\xdeadbeef"),
            (Type::Float8, "1.5"),
            (Type::Float8, "1e+100"),
        ];
        for (ty, text) in cases {
            let d = Datum::parse_text(ty, text).unwrap();
            assert_eq!(d.to_text().unwrap(), text, "{ty:?}");
        }
        assert_eq!(
            Datum::parse_text(Type::TimestampTz, "2026-01-01 10:00:00+02")
                .unwrap()
                .to_text()
                .unwrap(),
            "2026-01-01 08:00:00+00"
        );
        assert!(Datum::parse_text(Type::Int2, "40000").is_err());
        assert!(Datum::parse_text(Type::Int4, "abc").is_err());
        assert!(Datum::parse_text(Type::Date, "2026-02-30").is_err());
    }

    #[test]
    fn numeric_arithmetic() {
        let n = |s| Numeric::parse(s).unwrap();
        assert_eq!(n("1.5").add(n("2.25")).unwrap().to_string(), "3.75");
        assert_eq!(n("1.5").mul(n("-2")).unwrap().to_string(), "-3.0");
        assert_eq!(
            n("1").div(n("3")).unwrap().to_string(),
            "0.3333333333333333"
        );
        assert_eq!(n("2.345").rescale(2).unwrap().to_string(), "2.35");
        assert_eq!(n("-2.345").rescale(2).unwrap().to_string(), "-2.35");
        assert_eq!(n("123.45").integer_digits(), 3);
        assert_eq!(n("1e3").to_string(), "1000");
    }
}
