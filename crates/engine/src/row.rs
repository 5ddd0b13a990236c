//! Byte encodings of keys and rows.
//!
//! Keys are order-preserving (memcmp order = SQL order for ascending columns), so
//! B+trees compare raw bytes. Rows are a compact tagged list of values. Both decoders
//! return errors on bad bytes (pages come from disk and network) and never panic.

use crate::types::{Datum, Numeric};
use crate::EngineError;

pub fn corrupt(what: &str) -> EngineError {
    EngineError::Corrupt(what.to_string())
}

/// Appends the order-preserving encoding of `d` to `out`. NULL sorts last, like
/// PostgreSQL's default for ascending order.
pub fn encode_key_datum(d: &Datum, out: &mut Vec<u8>) -> Result<(), EngineError> {
    match d {
        Datum::Null => out.push(0xff),
        Datum::Bool(b) => {
            out.push(0x10);
            out.push(*b as u8);
        }
        Datum::Int2(_) | Datum::Int4(_) | Datum::Int8(_) => {
            out.push(0x20);
            let v = d.as_i64().unwrap_or(0);
            out.extend_from_slice(&((v as u64) ^ (1 << 63)).to_be_bytes());
        }
        Datum::Float4(_) | Datum::Float8(_) => {
            out.push(0x30);
            let v = match d {
                Datum::Float4(f) => *f as f64,
                Datum::Float8(f) => *f,
                _ => 0.0,
            };
            let bits = if v.is_nan() { u64::MAX } else { v.to_bits() };
            let ordered = if bits >> 63 == 1 {
                !bits
            } else {
                bits | (1 << 63)
            };
            out.extend_from_slice(&ordered.to_be_bytes());
        }
        Datum::Numeric(n) => {
            out.push(0x40);
            let m = n
                .rescale(crate::types::NUMERIC_MAX_SCALE)
                .ok_or_else(|| {
                    EngineError::Unsupported("numeric key value too large to index".into())
                })?
                .mantissa;
            out.extend_from_slice(&((m as u128) ^ (1 << 127)).to_be_bytes());
        }
        Datum::Text(s) => {
            out.push(0x50);
            escape_bytes(s.as_bytes(), out);
        }
        Datum::Bytea(b) => {
            out.push(0x60);
            escape_bytes(b, out);
        }
        Datum::Date(v) => {
            out.push(0x70);
            out.extend_from_slice(&((*v as u32) ^ (1 << 31)).to_be_bytes());
        }
        Datum::Timestamp(v) | Datum::TimestampTz(v) => {
            out.push(0x80);
            out.extend_from_slice(&((*v as u64) ^ (1 << 63)).to_be_bytes());
        }
        Datum::Uuid(u) => {
            out.push(0x90);
            out.extend_from_slice(u);
        }
    }
    Ok(())
}

/// 0x00 becomes 0x00 0x01; the terminator is 0x00 0x00, so a prefix sorts first.
fn escape_bytes(b: &[u8], out: &mut Vec<u8>) {
    for &c in b {
        out.push(c);
        if c == 0 {
            out.push(1);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

pub fn encode_key(values: &[Datum]) -> Result<Vec<u8>, EngineError> {
    let mut out = Vec::with_capacity(16);
    for v in values {
        encode_key_datum(v, &mut out)?;
    }
    Ok(out)
}

/// The smallest key greater than every key that starts with `prefix`.
pub fn prefix_successor(prefix: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.push(0xff);
    v.push(0xff);
    v
}

// Row encoding tags.
const T_NULL: u8 = 0;
const T_BOOL: u8 = 1;
const T_I2: u8 = 2;
const T_I4: u8 = 3;
const T_I8: u8 = 4;
const T_F4: u8 = 5;
const T_F8: u8 = 6;
const T_NUM: u8 = 7;
const T_TEXT: u8 = 8;
const T_BYTEA: u8 = 9;
const T_DATE: u8 = 10;
const T_TS: u8 = 11;
const T_TSTZ: u8 = 12;
const T_UUID: u8 = 13;

pub fn encode_row(values: &[Datum], out: &mut Vec<u8>) {
    out.extend_from_slice(&(values.len() as u16).to_le_bytes());
    for v in values {
        match v {
            Datum::Null => out.push(T_NULL),
            Datum::Bool(b) => out.extend_from_slice(&[T_BOOL, *b as u8]),
            Datum::Int2(x) => {
                out.push(T_I2);
                out.extend_from_slice(&x.to_le_bytes());
            }
            Datum::Int4(x) => {
                out.push(T_I4);
                out.extend_from_slice(&x.to_le_bytes());
            }
            Datum::Int8(x) => {
                out.push(T_I8);
                out.extend_from_slice(&x.to_le_bytes());
            }
            Datum::Float4(x) => {
                out.push(T_F4);
                out.extend_from_slice(&x.to_le_bytes());
            }
            Datum::Float8(x) => {
                out.push(T_F8);
                out.extend_from_slice(&x.to_le_bytes());
            }
            Datum::Numeric(n) => {
                out.push(T_NUM);
                out.extend_from_slice(&n.mantissa.to_le_bytes());
                out.extend_from_slice(&n.scale.to_le_bytes());
            }
            Datum::Text(s) => {
                out.push(T_TEXT);
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Datum::Bytea(b) => {
                out.push(T_BYTEA);
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            Datum::Date(d) => {
                out.push(T_DATE);
                out.extend_from_slice(&d.to_le_bytes());
            }
            Datum::Timestamp(t) => {
                out.push(T_TS);
                out.extend_from_slice(&t.to_le_bytes());
            }
            Datum::TimestampTz(t) => {
                out.push(T_TSTZ);
                out.extend_from_slice(&t.to_le_bytes());
            }
            Datum::Uuid(u) => {
                out.push(T_UUID);
                out.extend_from_slice(u);
            }
        }
    }
}

pub struct Cursor<'a> {
    pub buf: &'a [u8],
    pub at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, at: 0 }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| corrupt("short row"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub fn arr<const N: usize>(&mut self) -> Result<[u8; N], EngineError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, EngineError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, EngineError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
}

pub fn decode_row(buf: &[u8]) -> Result<Vec<Datum>, EngineError> {
    let mut c = Cursor::new(buf);
    let n = c.u16()? as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let d = match c.u8()? {
            T_NULL => Datum::Null,
            T_BOOL => Datum::Bool(c.u8()? != 0),
            T_I2 => Datum::Int2(i16::from_le_bytes(c.arr()?)),
            T_I4 => Datum::Int4(i32::from_le_bytes(c.arr()?)),
            T_I8 => Datum::Int8(i64::from_le_bytes(c.arr()?)),
            T_F4 => Datum::Float4(f32::from_le_bytes(c.arr()?)),
            T_F8 => Datum::Float8(f64::from_le_bytes(c.arr()?)),
            T_NUM => {
                let mantissa = i128::from_le_bytes(c.arr()?);
                Datum::Numeric(Numeric {
                    mantissa,
                    scale: c.u16()?,
                })
            }
            T_TEXT => {
                let n = c.u32()? as usize;
                let s =
                    std::str::from_utf8(c.take(n)?).map_err(|_| corrupt("text is not UTF-8"))?;
                Datum::Text(s.to_string())
            }
            T_BYTEA => {
                let n = c.u32()? as usize;
                Datum::Bytea(c.take(n)?.to_vec())
            }
            T_DATE => Datum::Date(i32::from_le_bytes(c.arr()?)),
            T_TS => Datum::Timestamp(i64::from_le_bytes(c.arr()?)),
            T_TSTZ => Datum::TimestampTz(i64::from_le_bytes(c.arr()?)),
            T_UUID => Datum::Uuid(c.arr()?),
            t => return Err(corrupt(&format!("unknown value tag {t}"))),
        };
        out.push(d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_matches_value_order() {
        let ints = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in ints.windows(2) {
            assert!(
                encode_key(&[Datum::Int8(w[0])]).unwrap()
                    < encode_key(&[Datum::Int8(w[1])]).unwrap()
            );
        }
        let texts = ["", "a", "a\0", "ab", "b"];
        for w in texts.windows(2) {
            let a = encode_key(&[Datum::Text(w[0].into())]).unwrap();
            let b = encode_key(&[Datum::Text(w[1].into())]).unwrap();
            assert!(a < b, "{:?} < {:?}", w[0], w[1]);
        }
        let floats = [f64::NEG_INFINITY, -2.5, -0.5, 0.0, 0.5, 3.0, f64::INFINITY];
        for w in floats.windows(2) {
            assert!(
                encode_key(&[Datum::Float8(w[0])]).unwrap()
                    < encode_key(&[Datum::Float8(w[1])]).unwrap()
            );
        }
        // Composite: (1, "z") < (2, "a").
        let a = encode_key(&[Datum::Int4(1), Datum::Text("z".into())]).unwrap();
        let b = encode_key(&[Datum::Int4(2), Datum::Text("a".into())]).unwrap();
        assert!(a < b);
    }

    #[test]
    fn rows_round_trip_and_garbage_is_an_error() {
        let row = vec![
            Datum::Null,
            Datum::Int4(-3),
            Datum::Text("héllo".into()),
            Datum::Numeric(Numeric::parse("12.50").unwrap()),
            Datum::Bool(true),
            Datum::Uuid([7; 16]),
        ];
        let mut buf = Vec::new();
        encode_row(&row, &mut buf);
        assert_eq!(decode_row(&buf).unwrap(), row);
        for cut in 0..buf.len() {
            assert!(decode_row(&buf[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_row(&[1, 0, 99]).is_err());
    }
}
