//! PostgreSQL's binary wire format for the common types (what `typsend`/`typreceive`
//! produce), used for Bind parameters and result columns with format code 1.
//!
//! Dates and timestamps already use PostgreSQL's epoch (2000-01-01) and units (days,
//! microseconds) in [`Datum`], so they pass through. Numeric is the one with a real
//! conversion: PostgreSQL sends base-10000 digits with a weight, we hold an i128
//! mantissa and a decimal scale.

use borealis_sql::{Datum, Numeric, SqlError, Type};
use bytes::{BufMut, BytesMut};

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
/// Scale PostgreSQL's numeric allows; a larger dscale on the wire is malformed.
const NUMERIC_DSCALE_MAX: u16 = 0x3FFF;

fn invalid(ty: Type) -> SqlError {
    SqlError::new(
        "22P03",
        format!(
            "incorrect binary data format in bind parameter of type {}",
            ty.name()
        ),
    )
}

fn fixed<const N: usize>(ty: Type, data: &[u8]) -> Result<[u8; N], SqlError> {
    data.try_into().map_err(|_| invalid(ty))
}

/// Decodes a binary Bind parameter of type `ty`.
pub fn decode(ty: Type, data: &[u8]) -> Result<Datum, SqlError> {
    Ok(match ty {
        Type::Bool => match data {
            [0] => Datum::Bool(false),
            [1] => Datum::Bool(true),
            _ => return Err(invalid(ty)),
        },
        Type::Int2 => Datum::Int2(i16::from_be_bytes(fixed(ty, data)?)),
        Type::Int4 => Datum::Int4(i32::from_be_bytes(fixed(ty, data)?)),
        // Oid is unsigned on the wire and held as Int4 (see Datum::parse_text).
        Type::Oid => Datum::Int4(u32::from_be_bytes(fixed(ty, data)?) as i32),
        Type::Int8 => Datum::Int8(i64::from_be_bytes(fixed(ty, data)?)),
        Type::Float4 => Datum::Float4(f32::from_be_bytes(fixed(ty, data)?)),
        Type::Float8 => Datum::Float8(f64::from_be_bytes(fixed(ty, data)?)),
        Type::Numeric => Datum::Numeric(decode_numeric(data)?),
        Type::Text | Type::Varchar | Type::Bpchar | Type::Name | Type::Unknown => {
            Datum::Text(String::from_utf8(data.to_vec()).map_err(|_| {
                SqlError::new("22021", "invalid byte sequence for encoding \"UTF8\"")
            })?)
        }
        Type::Bytea => Datum::Bytea(data.to_vec()),
        Type::Date => Datum::Date(i32::from_be_bytes(fixed(ty, data)?)),
        Type::Timestamp => Datum::Timestamp(i64::from_be_bytes(fixed(ty, data)?)),
        Type::TimestampTz => Datum::TimestampTz(i64::from_be_bytes(fixed(ty, data)?)),
        Type::Uuid => Datum::Uuid(fixed(ty, data)?),
    })
}

/// Appends the binary form of `value` (a column of type `ty`) to `out`. `value` must
/// not be NULL (NULL is the length word -1 and is written by the caller).
pub fn encode(ty: Type, value: &Datum, out: &mut BytesMut) -> Result<(), SqlError> {
    let mismatch = || SqlError::internal(format!("cannot send {value:?} as binary {}", ty.name()));
    match (ty, value) {
        (Type::Bool, Datum::Bool(b)) => out.put_u8(*b as u8),
        // Integer columns may carry a narrower integer datum (e.g. an int4 literal in
        // an int8 column); widen or narrow with a range check.
        (Type::Int2, v) => out.put_i16(
            v.as_i64()
                .and_then(|i| i16::try_from(i).ok())
                .ok_or_else(mismatch)?,
        ),
        (Type::Int4 | Type::Oid, v) => out.put_i32(
            v.as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(mismatch)?,
        ),
        (Type::Int8, v) => out.put_i64(v.as_i64().ok_or_else(mismatch)?),
        (Type::Float4, Datum::Float4(f)) => out.put_f32(*f),
        (Type::Float4, Datum::Float8(f)) => out.put_f32(*f as f32),
        (Type::Float8, Datum::Float8(f)) => out.put_f64(*f),
        (Type::Float8, Datum::Float4(f)) => out.put_f64(*f as f64),
        (Type::Numeric, Datum::Numeric(n)) => encode_numeric(*n, out),
        // An integer value in a numeric column (e.g. sum() over integers).
        (Type::Numeric, v @ (Datum::Int2(_) | Datum::Int4(_) | Datum::Int8(_))) => {
            encode_numeric(Numeric::from_i64(v.as_i64().ok_or_else(mismatch)?), out)
        }
        (Type::Bytea, Datum::Bytea(b)) => out.put_slice(b),
        (Type::Date, Datum::Date(d)) => out.put_i32(*d),
        (Type::Timestamp, Datum::Timestamp(t)) => out.put_i64(*t),
        (Type::TimestampTz, Datum::TimestampTz(t)) => out.put_i64(*t),
        (Type::Uuid, Datum::Uuid(u)) => out.put_slice(u),
        // Text-like types (and values of unknown type) send their text form as bytes,
        // which is exactly what textsend does.
        (Type::Text | Type::Varchar | Type::Bpchar | Type::Name | Type::Unknown, v) => {
            out.put_slice(v.to_text().ok_or_else(mismatch)?.as_bytes())
        }
        _ => return Err(mismatch()),
    }
    Ok(())
}

/// PostgreSQL numeric_recv: ndigits, weight, sign, dscale, then base-10000 digits.
/// The value is sum(digit[i] * 10000^(weight - i)); dscale is the display scale.
pub fn decode_numeric(data: &[u8]) -> Result<Numeric, SqlError> {
    let bad = || invalid(Type::Numeric);
    let header: [u8; 8] = data
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(bad)?;
    let ndigits = i16::from_be_bytes([header[0], header[1]]);
    let weight = i16::from_be_bytes([header[2], header[3]]) as i32;
    let sign = u16::from_be_bytes([header[4], header[5]]);
    let dscale = u16::from_be_bytes([header[6], header[7]]);
    if ndigits < 0 || dscale > NUMERIC_DSCALE_MAX || data.len() != 8 + 2 * ndigits as usize {
        return Err(bad());
    }
    if sign == NUMERIC_NAN {
        return Err(SqlError::unsupported("numeric NaN"));
    }
    if sign != NUMERIC_POS && sign != NUMERIC_NEG {
        return Err(bad());
    }
    // Build the exact decimal value as mantissa * 10^-scale, where each base-10000
    // digit at position i contributes at decimal exponent 4 * (weight - i).
    let overflow = || SqlError::new("22003", "numeric value out of range");
    let mut mantissa: i128 = 0;
    let lowest_exponent = 4 * (weight - (ndigits as i32 - 1));
    // Work at scale max(0, -lowest_exponent) so every digit is an integer multiple.
    let work_scale = (-lowest_exponent).max(0);
    for i in 0..ndigits as usize {
        let digit = i16::from_be_bytes([data[8 + 2 * i], data[9 + 2 * i]]);
        if !(0..10000).contains(&digit) {
            return Err(bad());
        }
        let exponent = 4 * (weight - i as i32) + work_scale;
        let factor = 10i128
            .checked_pow(u32::try_from(exponent).map_err(|_| bad())?)
            .ok_or_else(overflow)?;
        mantissa = mantissa
            .checked_add((digit as i128).checked_mul(factor).ok_or_else(overflow)?)
            .ok_or_else(overflow)?;
    }
    if sign == NUMERIC_NEG {
        mantissa = -mantissa;
    }
    let scale = u16::try_from(work_scale).map_err(|_| overflow())?;
    Numeric { mantissa, scale }
        .rescale(dscale)
        .ok_or_else(overflow)
}

/// PostgreSQL numeric_send for our fixed-point numeric.
pub fn encode_numeric(n: Numeric, out: &mut BytesMut) {
    let digits = n.mantissa.unsigned_abs().to_string();
    let scale = n.scale as usize;
    // Split into integer and fraction digit strings, then pad each to whole base-10000
    // groups: the integer part on the left, the fraction on the right.
    let (int_part, frac_part) = if digits.len() > scale {
        (
            digits[..digits.len() - scale].to_string(),
            digits[digits.len() - scale..].to_string(),
        )
    } else {
        (
            String::new(),
            format!("{}{}", "0".repeat(scale - digits.len()), digits),
        )
    };
    let int_groups = int_part.len().div_ceil(4);
    let int_padded = format!(
        "{}{}",
        "0".repeat(int_groups * 4 - int_part.len()),
        int_part
    );
    let frac_groups = frac_part.len().div_ceil(4);
    let frac_padded = format!(
        "{}{}",
        frac_part,
        "0".repeat(frac_groups * 4 - frac_part.len())
    );
    let all = format!("{int_padded}{frac_padded}");
    let mut groups: Vec<i16> = all
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + (d - b'0') as i16))
        .collect();
    let mut weight = int_groups as i32 - 1;
    // Strip leading zero groups (each lowers the weight) and trailing zero groups.
    let leading = groups.iter().take_while(|&&g| g == 0).count();
    groups.drain(..leading);
    weight -= leading as i32;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let sign = if n.mantissa < 0 && !groups.is_empty() {
        NUMERIC_NEG
    } else {
        NUMERIC_POS
    };
    out.put_i16(groups.len() as i16);
    out.put_i16(weight as i16);
    out.put_u16(sign);
    out.put_u16(n.scale);
    for g in groups {
        out.put_i16(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ndigits.to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    fn num(s: &str) -> Numeric {
        Numeric::parse(s).unwrap()
    }

    fn enc(n: Numeric) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_numeric(n, &mut b);
        b.to_vec()
    }

    // Expected encodings are what PostgreSQL 15's numeric_send produces.
    #[test]
    fn numeric_matches_postgresql_encoding() {
        assert_eq!(
            enc(num("12345.678")),
            wire(3, 1, NUMERIC_POS, 3, &[1, 2345, 6780])
        );
        assert_eq!(enc(num("0.01")), wire(1, -1, NUMERIC_POS, 2, &[100]));
        assert_eq!(enc(num("-1")), wire(1, 0, NUMERIC_NEG, 0, &[1]));
        assert_eq!(enc(num("0")), wire(0, 0, NUMERIC_POS, 0, &[]));
        assert_eq!(enc(num("0.00")), wire(0, 0, NUMERIC_POS, 2, &[]));
        assert_eq!(enc(num("10000")), wire(1, 1, NUMERIC_POS, 0, &[1]));
        assert_eq!(enc(num("1.50")), wire(2, 0, NUMERIC_POS, 2, &[1, 5000]));
        assert_eq!(enc(num("0.00001")), wire(1, -2, NUMERIC_POS, 5, &[1000]));
    }

    #[test]
    fn numeric_roundtrips() {
        for s in [
            "12345.678",
            "0.01",
            "-1",
            "0",
            "0.00",
            "10000",
            "1.50",
            "-0.00001",
            "99999999999999999999.123456789",
            "123456789012345678901234567890.12345678",
        ] {
            let n = num(s);
            assert_eq!(decode_numeric(&enc(n)).unwrap(), n, "{s}");
            assert_eq!(
                decode_numeric(&enc(n)).unwrap().to_string(),
                n.to_string(),
                "{s}"
            );
        }
    }

    #[test]
    fn numeric_decode_uses_dscale_and_refuses_garbage() {
        // 1.5 sent with dscale 3 reads back as 1.500.
        assert_eq!(
            decode_numeric(&wire(2, 0, NUMERIC_POS, 3, &[1, 5000]))
                .unwrap()
                .to_string(),
            "1.500"
        );
        assert!(decode_numeric(&wire(1, 0, NUMERIC_POS, 0, &[10000])).is_err());
        assert!(decode_numeric(&wire(2, 0, NUMERIC_POS, 0, &[1])).is_err());
        assert!(decode_numeric(&wire(1, 0, 0x1234, 0, &[1])).is_err());
        assert!(decode_numeric(&[0, 1]).is_err());
        assert_eq!(
            decode_numeric(&wire(1, 0, NUMERIC_NAN, 0, &[1]))
                .unwrap_err()
                .code,
            "0A000"
        );
        // 10000^40 does not fit our 38-digit mantissa: out of range, not a panic.
        assert_eq!(
            decode_numeric(&wire(1, 40, NUMERIC_POS, 0, &[1]))
                .unwrap_err()
                .code,
            "22003"
        );
        assert!(decode_numeric(&wire(1, -300, NUMERIC_POS, 0, &[1])).is_err());
    }

    #[test]
    fn scalar_types_roundtrip() {
        let cases = [
            (Type::Bool, Datum::Bool(true)),
            (Type::Int2, Datum::Int2(-7)),
            (Type::Int4, Datum::Int4(123456)),
            (Type::Int8, Datum::Int8(-1 << 40)),
            (Type::Float4, Datum::Float4(1.5)),
            (Type::Float8, Datum::Float8(-2.25)),
            (Type::Text, Datum::Text("héllo".into())),
            (Type::Varchar, Datum::Text("v".into())),
            (Type::Bpchar, Datum::Text("c  ".into())),
            (Type::Bytea, Datum::Bytea(vec![0, 255, 7])),
            (Type::Date, Datum::Date(-3)),
            (Type::Timestamp, Datum::Timestamp(1_000_000)),
            (Type::TimestampTz, Datum::TimestampTz(-5)),
            (Type::Uuid, Datum::Uuid([9; 16])),
            (Type::Numeric, Datum::Numeric(num("-3.14"))),
        ];
        for (ty, d) in cases {
            let mut b = BytesMut::new();
            encode(ty, &d, &mut b).unwrap();
            assert_eq!(decode(ty, &b).unwrap(), d, "{ty:?}");
        }
    }

    #[test]
    fn wrong_lengths_are_22p03() {
        assert_eq!(decode(Type::Int4, &[0, 1]).unwrap_err().code, "22P03");
        assert_eq!(decode(Type::Bool, &[2]).unwrap_err().code, "22P03");
        assert_eq!(decode(Type::Uuid, &[0; 15]).unwrap_err().code, "22P03");
        assert_eq!(decode(Type::Text, &[0xff]).unwrap_err().code, "22021");
    }

    #[test]
    fn integer_columns_accept_narrower_datums() {
        let mut b = BytesMut::new();
        encode(Type::Int8, &Datum::Int4(5), &mut b).unwrap();
        assert_eq!(&b[..], &5i64.to_be_bytes());
        assert!(encode(Type::Int2, &Datum::Int8(1 << 20), &mut BytesMut::new()).is_err());
    }
}
