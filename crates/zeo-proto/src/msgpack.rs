//! The msgpack marshalling (ZEO's `M` encoding).
//!
//! Python ZEO encodes with `msgpack.packb(v, use_bin_type=True)` and decodes with
//! `msgpack.unpackb(raw=False, use_list=False)`; this module does the same:
//!
//! - the encoder picks the same (smallest) form for every value, so its output is byte
//!   for byte what Python writes: non-negative ints always use the unsigned forms,
//!   negative ints the signed ones, floats are always float64, `bytes` are `bin` and
//!   text is `str` (`str8` included);
//! - the decoder turns every array into a [`Value::Tuple`] (msgpack cannot tell lists
//!   from tuples), requires map keys to be text or bytes (msgpack ≥ 1.0's
//!   `strict_map_key`), rejects ext types, and rejects integers beyond the `i64` range.
//!
//! msgpack has no set and no object type, and Python's `packb` refuses both. So that
//! encoding never fails, a [`Value::Set`] is written as an array of its elements and a
//! [`Value::Object`] as its state alone; neither comes back as what was sent.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use bytes::Bytes;

use crate::limits::{Budget, DecodeError, Input, Limits};
use crate::value::Value;

/// Marker bytes (the msgpack spec's names).
mod marker {
    pub const NIL: u8 = 0xc0;
    pub const FALSE: u8 = 0xc2;
    pub const TRUE: u8 = 0xc3;
    pub const BIN8: u8 = 0xc4;
    pub const BIN16: u8 = 0xc5;
    pub const BIN32: u8 = 0xc6;
    pub const FLOAT32: u8 = 0xca;
    pub const FLOAT64: u8 = 0xcb;
    pub const UINT8: u8 = 0xcc;
    pub const UINT16: u8 = 0xcd;
    pub const UINT32: u8 = 0xce;
    pub const UINT64: u8 = 0xcf;
    pub const INT8: u8 = 0xd0;
    pub const INT16: u8 = 0xd1;
    pub const INT32: u8 = 0xd2;
    pub const INT64: u8 = 0xd3;
    pub const STR8: u8 = 0xd9;
    pub const STR16: u8 = 0xda;
    pub const STR32: u8 = 0xdb;
    pub const ARRAY16: u8 = 0xdc;
    pub const ARRAY32: u8 = 0xdd;
    pub const MAP16: u8 = 0xde;
    pub const MAP32: u8 = 0xdf;
    pub const FIXMAP: u8 = 0x80;
    pub const FIXARRAY: u8 = 0x90;
    pub const FIXSTR: u8 = 0xa0;
}

/// Encodes `v` onto `out`, byte for byte as Python's `packb(v, use_bin_type=True)`.
/// Recurses once per nesting level of `v`, like `Value`'s own `Clone` and `Drop`.
///
/// # Panics
///
/// If a string, byte string, array or map has 2³² or more elements (or bytes): msgpack
/// cannot express it.
pub fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::None => out.push(marker::NIL),
        Value::Bool(false) => out.push(marker::FALSE),
        Value::Bool(true) => out.push(marker::TRUE),
        Value::Int(i) => encode_int(*i, out),
        Value::Float(f) => {
            out.push(marker::FLOAT64);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Bytes(b) => {
            bin_header(b.len(), out);
            out.extend_from_slice(b);
        }
        Value::Str(s) => {
            str_header(s.len(), out);
            out.extend_from_slice(s.as_bytes());
        }
        // Sets have no msgpack form; an array of the elements is the closest.
        Value::Tuple(items) | Value::List(items) | Value::Set(items) => {
            array_header(items.len(), out);
            items.iter().for_each(|item| encode(item, out));
        }
        Value::Dict(items) => {
            map_header(items.len(), out);
            for (k, v) in items {
                encode(k, out);
                encode(v, out);
            }
        }
        // Objects have no msgpack form either; their state is the data they carry.
        Value::Object { state, .. } => encode(state, out),
    }
}

/// [`encode`] into a new vector.
pub fn to_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode(v, &mut out);
    out
}

/// The smallest form, as msgpack-c: fixints, then the unsigned family for
/// non-negative values and the signed family for negative ones.
fn encode_int(i: i64, out: &mut Vec<u8>) {
    if (0..128).contains(&i) || (-32..0).contains(&i) {
        // Positive and negative fixints are the value's own low byte.
        out.push(i.to_le_bytes()[0]);
    } else if let Ok(u) = u64::try_from(i) {
        if let Ok(u) = u8::try_from(u) {
            out.extend_from_slice(&[marker::UINT8, u]);
        } else if let Ok(u) = u16::try_from(u) {
            out.push(marker::UINT16);
            out.extend_from_slice(&u.to_be_bytes());
        } else if let Ok(u) = u32::try_from(u) {
            out.push(marker::UINT32);
            out.extend_from_slice(&u.to_be_bytes());
        } else {
            out.push(marker::UINT64);
            out.extend_from_slice(&u.to_be_bytes());
        }
    } else if let Ok(s) = i8::try_from(i) {
        out.push(marker::INT8);
        out.extend_from_slice(&s.to_be_bytes());
    } else if let Ok(s) = i16::try_from(i) {
        out.push(marker::INT16);
        out.extend_from_slice(&s.to_be_bytes());
    } else if let Ok(s) = i32::try_from(i) {
        out.push(marker::INT32);
        out.extend_from_slice(&s.to_be_bytes());
    } else {
        out.push(marker::INT64);
        out.extend_from_slice(&i.to_be_bytes());
    }
}

fn str_header(len: usize, out: &mut Vec<u8>) {
    match u8::try_from(len) {
        Ok(short) if short < 32 => out.push(marker::FIXSTR | short),
        Ok(short) => out.extend_from_slice(&[marker::STR8, short]),
        Err(_) => wide_len(len, marker::STR16, marker::STR32, out),
    }
}

fn bin_header(len: usize, out: &mut Vec<u8>) {
    if let Ok(len) = u8::try_from(len) {
        out.extend_from_slice(&[marker::BIN8, len]);
    } else {
        wide_len(len, marker::BIN16, marker::BIN32, out);
    }
}

fn array_header(len: usize, out: &mut Vec<u8>) {
    match u8::try_from(len) {
        Ok(short) if short < 16 => out.push(marker::FIXARRAY | short),
        _ => wide_len(len, marker::ARRAY16, marker::ARRAY32, out),
    }
}

fn map_header(len: usize, out: &mut Vec<u8>) {
    match u8::try_from(len) {
        Ok(short) if short < 16 => out.push(marker::FIXMAP | short),
        _ => wide_len(len, marker::MAP16, marker::MAP32, out),
    }
}

/// A length in the 16-bit form if it fits, else the 32-bit one.
fn wide_len(len: usize, marker16: u8, marker32: u8, out: &mut Vec<u8>) {
    if let Ok(len) = u16::try_from(len) {
        out.push(marker16);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        let len = u32::try_from(len).expect("msgpack cannot encode a length of 2^32 or more");
        out.push(marker32);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// Decodes one complete msgpack value; trailing bytes are an error.
pub fn decode(input: &[u8], limits: &Limits) -> Result<Value, DecodeError> {
    if input.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut decoder = Decoder {
        input: Input::new(input),
        limits: *limits,
        budget: Budget::new(limits.max_items),
    };
    let value = decoder.value()?;
    match decoder.input.remaining() {
        0 => Ok(value),
        n => Err(DecodeError::TrailingData(n)),
    }
}

/// How many elements to reserve room for before they have actually been read: the
/// count in a header is only a claim.
const MAX_PREALLOC: usize = 1024;

struct Decoder<'a> {
    input: Input<'a>,
    limits: Limits,
    budget: Budget,
}

/// One step of the input: a complete scalar, or the header of a container whose
/// elements follow.
enum Item {
    Scalar(Value),
    Array(usize),
    Map(usize),
}

/// A container being filled, on the decoder's explicit stack.
enum Open {
    Array {
        items: Vec<Value>,
        left: usize,
    },
    Map {
        entries: Vec<(Value, Value)>,
        /// Where each key is in `entries`, to spot repeated keys.
        index: HashMap<MapKey, usize>,
        /// The key read, waiting for its value.
        key: Option<(Value, MapKey)>,
        left: usize,
    },
}

/// A map key for spotting repeats (keys are only ever text or bytes).
#[derive(PartialEq, Eq, Hash)]
enum MapKey {
    Str(String),
    Bytes(Bytes),
}

impl Decoder<'_> {
    /// Decodes the next complete value. Nested containers live on an explicit stack
    /// rather than the call stack, so no input can overflow the thread's stack,
    /// whatever `max_depth` is.
    fn value(&mut self) -> Result<Value, DecodeError> {
        let mut open: Vec<Open> = Vec::new();
        loop {
            let mut value = match self.item()? {
                Item::Scalar(value) => value,
                Item::Array(len) => {
                    self.limits.enter(open.len())?;
                    // Every element takes at least one byte.
                    if len > self.input.remaining() {
                        return Err(DecodeError::Truncated);
                    }
                    if len == 0 {
                        Value::Tuple(Vec::new())
                    } else {
                        open.push(Open::Array {
                            items: Vec::with_capacity(len.min(MAX_PREALLOC)),
                            left: len,
                        });
                        continue;
                    }
                }
                Item::Map(len) => {
                    self.limits.enter(open.len())?;
                    // Every entry takes at least two bytes.
                    if len > self.input.remaining() / 2 {
                        return Err(DecodeError::Truncated);
                    }
                    if len == 0 {
                        Value::Dict(Vec::new())
                    } else {
                        open.push(Open::Map {
                            entries: Vec::with_capacity(len.min(MAX_PREALLOC)),
                            index: HashMap::new(),
                            key: None,
                            left: len,
                        });
                        continue;
                    }
                }
            };
            // Hand the finished value to its container; a container that this fills
            // is finished in turn and goes to its own parent.
            loop {
                match open.last_mut() {
                    None => return Ok(value),
                    Some(Open::Array { items, left }) => {
                        items.push(value);
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                    }
                    Some(Open::Map {
                        key: key @ None, ..
                    }) => {
                        // msgpack ≥ 1.0's `strict_map_key`, on by default in `unpackb`.
                        let map_key = match &value {
                            Value::Str(s) => MapKey::Str(s.clone()),
                            Value::Bytes(b) => MapKey::Bytes(b.clone()),
                            _ => return Err(DecodeError::Malformed("map key is not str or bytes")),
                        };
                        *key = Some((value, map_key));
                        break;
                    }
                    Some(Open::Map {
                        entries,
                        index,
                        key,
                        left,
                    }) => {
                        let (key, map_key) = key.take().expect("matched above: the key is set");
                        // As in a Python dict, a repeated key keeps its first position
                        // and takes the last value.
                        match index.entry(map_key) {
                            Entry::Occupied(e) => entries[*e.get()].1 = value,
                            Entry::Vacant(e) => {
                                e.insert(entries.len());
                                entries.push((key, value));
                            }
                        }
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                    }
                }
                value = match open.pop() {
                    Some(Open::Array { items, .. }) => Value::Tuple(items),
                    Some(Open::Map { entries, .. }) => Value::Dict(entries),
                    None => unreachable!("the loop returns when nothing is open"),
                };
            }
        }
    }

    /// Reads one marker and, for scalars, the data that goes with it.
    fn item(&mut self) -> Result<Item, DecodeError> {
        self.budget.charge(1)?;
        let m = self.input.byte()?;
        let value = match m {
            0x00..=0x7f => Value::Int(m.into()),
            0x80..=0x8f => return Ok(Item::Map(usize::from(m & 0x0f))),
            0x90..=0x9f => return Ok(Item::Array(usize::from(m & 0x0f))),
            0xa0..=0xbf => self.str(u64::from(m & 0x1f))?,
            0xe0..=0xff => Value::Int(i8::from_be_bytes([m]).into()),
            marker::NIL => Value::None,
            marker::FALSE => Value::Bool(false),
            marker::TRUE => Value::Bool(true),
            marker::BIN8 => {
                let len = self.input.byte()?;
                self.bin(len.into())?
            }
            marker::BIN16 => {
                let len = u16::from_be_bytes(self.input.array()?);
                self.bin(len.into())?
            }
            marker::BIN32 => {
                let len = u32::from_be_bytes(self.input.array()?);
                self.bin(len.into())?
            }
            marker::FLOAT32 => Value::Float(f32::from_be_bytes(self.input.array()?).into()),
            marker::FLOAT64 => Value::Float(f64::from_be_bytes(self.input.array()?)),
            marker::UINT8 => Value::Int(self.input.byte()?.into()),
            marker::UINT16 => Value::Int(u16::from_be_bytes(self.input.array()?).into()),
            marker::UINT32 => Value::Int(u32::from_be_bytes(self.input.array()?).into()),
            marker::UINT64 => {
                let u = u64::from_be_bytes(self.input.array()?);
                Value::Int(i64::try_from(u).map_err(|_| DecodeError::IntegerOverflow)?)
            }
            marker::INT8 => Value::Int(i8::from_be_bytes(self.input.array()?).into()),
            marker::INT16 => Value::Int(i16::from_be_bytes(self.input.array()?).into()),
            marker::INT32 => Value::Int(i32::from_be_bytes(self.input.array()?).into()),
            marker::INT64 => Value::Int(i64::from_be_bytes(self.input.array()?)),
            marker::STR8 => {
                let len = self.input.byte()?;
                self.str(len.into())?
            }
            marker::STR16 => {
                let len = u16::from_be_bytes(self.input.array()?);
                self.str(len.into())?
            }
            marker::STR32 => {
                let len = u32::from_be_bytes(self.input.array()?);
                self.str(len.into())?
            }
            marker::ARRAY16 => return Ok(Item::Array(self.len16()?)),
            marker::ARRAY32 => return Ok(Item::Array(self.len32()?)),
            marker::MAP16 => return Ok(Item::Map(self.len16()?)),
            marker::MAP32 => return Ok(Item::Map(self.len32()?)),
            // 0xc1 (never used), ext 8/16/32 and fixext 1–16: `unpackb` without an
            // `ext_hook` would hand back ExtType objects ZEO never uses.
            0xc1 | 0xc7..=0xc9 | 0xd4..=0xd8 => return Err(DecodeError::UnsupportedMarker(m)),
        };
        Ok(Item::Scalar(value))
    }

    fn len16(&mut self) -> Result<usize, DecodeError> {
        Ok(u16::from_be_bytes(self.input.array()?).into())
    }

    fn len32(&mut self) -> Result<usize, DecodeError> {
        let len = u32::from_be_bytes(self.input.array()?);
        // Only a 16-bit usize could fail here; that input could not be honest anyway.
        usize::try_from(len).map_err(|_| DecodeError::Truncated)
    }

    fn bin(&mut self, len: u64) -> Result<Value, DecodeError> {
        Ok(Value::Bytes(Bytes::copy_from_slice(self.input.take(len)?)))
    }

    fn str(&mut self, len: u64) -> Result<Value, DecodeError> {
        let bytes = self.input.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        Ok(Value::Str(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::testing::*;

    fn dec(data: &[u8]) -> Result<Value, DecodeError> {
        decode(data, &Limits::default())
    }

    /// Python 3.11, msgpack 1.2.4: (hex of `packb(v, use_bin_type=True)`, v, and
    /// `unpackb(raw=False, use_list=False)` of that).
    fn python() -> Vec<(&'static str, Value, Value)> {
        vec![
        ("c0", Value::None, Value::None),
        ("c3", Value::Bool(true), Value::Bool(true)),
        ("c2", Value::Bool(false), Value::Bool(false)),
        ("00", i(0), i(0)),
        ("01", i(1), i(1)),
        ("7f", i(127), i(127)),
        ("cc80", i(128), i(128)),
        ("ccff", i(255), i(255)),
        ("cd0100", i(256), i(256)),
        ("cdffff", i(65535), i(65535)),
        ("ce00010000", i(65536), i(65536)),
        ("ff", i(-1), i(-1)),
        ("fe", i(-2), i(-2)),
        ("e1", i(-31), i(-31)),
        ("e0", i(-32), i(-32)),
        ("d0df", i(-33), i(-33)),
        ("d080", i(-128), i(-128)),
        ("d1ff7f", i(-129), i(-129)),
        ("d1ff01", i(-255), i(-255)),
        ("d1ff00", i(-256), i(-256)),
        ("d18000", i(-32768), i(-32768)),
        ("d2ffff7fff", i(-32769), i(-32769)),
        ("d2ffff0000", i(-65536), i(-65536)),
        ("ce7fffffff", i(2147483647), i(2147483647)),
        ("d280000000", i(-2147483648), i(-2147483648)),
        ("ce80000000", i(2147483648), i(2147483648)),
        ("d3ffffffff7fffffff", i(-2147483649), i(-2147483649)),
        ("ceffffffff", i(4294967295), i(4294967295)),
        ("cf0000000100000000", i(4294967296), i(4294967296)),
        ("d3ffffffff00000000", i(-4294967296), i(-4294967296)),
        ("cf0000008000000000", i(549755813888), i(549755813888)),
        ("d3ffffff8000000000", i(-549755813888), i(-549755813888)),
        ("d3ffffff7fffffffff", i(-549755813889), i(-549755813889)),
        ("cf0000010000000000", i(1099511627776), i(1099511627776)),
        ("cf7fffffffffffffff", i(i64::MAX), i(i64::MAX)),
        ("d38000000000000000", i(i64::MIN), i(i64::MIN)),
        ("cf00007f30b8cfe450", i(139847235789904), i(139847235789904)),
        ("cb0000000000000000", f(0x0000000000000000), f(0x0000000000000000)),
        ("cb8000000000000000", f(0x8000000000000000), f(0x8000000000000000)),
        ("cb3ff8000000000000", f(0x3ff8000000000000), f(0x3ff8000000000000)),
        ("cbc002000000000000", f(0xc002000000000000), f(0xc002000000000000)),
        ("cb7e37e43c8800759c", f(0x7e37e43c8800759c), f(0x7e37e43c8800759c)),
        ("cb0000000000000001", f(0x0000000000000001), f(0x0000000000000001)),
        ("cb7ff0000000000000", f(0x7ff0000000000000), f(0x7ff0000000000000)),
        ("cbfff0000000000000", f(0xfff0000000000000), f(0xfff0000000000000)),
        ("c400", b(b""), b(b"")),
        ("c40100", b(b"\x00"), b(b"\x00")),
        ("c4ff616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161616161", b(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), b(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")),
        ("c5010062626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262626262", b(b"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"), b(b"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")),
        ("a0", s(""), s("")),
        ("a161", s("a"), s("a")),
        ("a2c3a9", s("\u{e9}"), s("\u{e9}")),
        ("a6e697a5e69cac", s("\u{65e5}\u{672c}"), s("\u{65e5}\u{672c}")),
        ("a4f09f9880", s("\u{1f600}"), s("\u{1f600}")),
        ("bf78787878787878787878787878787878787878787878787878787878787878", s("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"), s("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")),
        ("d9207979797979797979797979797979797979797979797979797979797979797979", s("yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy"), s("yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy")),
        ("d9ff7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a", s("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"), s("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz")),
        ("da010077777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777777", s("wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww"), s("wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww")),
        ("90", t(vec![]), t(vec![])),
        ("9101", t(vec![i(1)]), t(vec![i(1)])),
        ("920102", t(vec![i(1), i(2)]), t(vec![i(1), i(2)])),
        ("93010203", t(vec![i(1), i(2), i(3)]), t(vec![i(1), i(2), i(3)])),
        ("9401020304", t(vec![i(1), i(2), i(3), i(4)]), t(vec![i(1), i(2), i(3), i(4)])),
        ("9190", t(vec![t(vec![])]), t(vec![t(vec![])])),
        ("919101", t(vec![t(vec![i(1)])]), t(vec![t(vec![i(1)])])),
        ("9190", l(vec![l(vec![])]), t(vec![t(vec![])])),
        ("90", l(vec![]), t(vec![])),
        ("9101", l(vec![i(1)]), t(vec![i(1)])),
        ("920102", l(vec![i(1), i(2)]), t(vec![i(1), i(2)])),
        ("80", d(vec![]), d(vec![])),
        ("81a16101", d(vec![(s("a"), i(1))]), d(vec![(s("a"), i(1))])),
        ("82a16101a1629102", d(vec![(s("a"), i(1)), (s("b"), l(vec![i(2)]))]), d(vec![(s("a"), i(1)), (s("b"), t(vec![i(2)]))])),
        ("9f000102030405060708090a0b0c0d0e", t(vec![i(0), i(1), i(2), i(3), i(4), i(5), i(6), i(7), i(8), i(9), i(10), i(11), i(12), i(13), i(14)]), t(vec![i(0), i(1), i(2), i(3), i(4), i(5), i(6), i(7), i(8), i(9), i(10), i(11), i(12), i(13), i(14)])),
        ("dc0010000102030405060708090a0b0c0d0e0f", t(vec![i(0), i(1), i(2), i(3), i(4), i(5), i(6), i(7), i(8), i(9), i(10), i(11), i(12), i(13), i(14), i(15)]), t(vec![i(0), i(1), i(2), i(3), i(4), i(5), i(6), i(7), i(8), i(9), i(10), i(11), i(12), i(13), i(14), i(15)])),
        ("dc0011000102030405060708090a0b0c0d0e0f10", l(vec![i(0), i(1), i(2), i(3), i(4), i(5), i(6), i(7), i(8), i(9), i(10), i(11), i(12), i(13), i(14), i(15), i(16)]), t(vec![i(0), i(1), i(2), i(3), i(4), i(5), i(6), i(7), i(8), i(9), i(10), i(11), i(12), i(13), i(14), i(15), i(16)])),
        ("8fa13000a13101a13202a13303a13404a13505a13606a13707a13808a13909a231300aa231310ba231320ca231330da231340e", d(vec![(s("0"), i(0)), (s("1"), i(1)), (s("2"), i(2)), (s("3"), i(3)), (s("4"), i(4)), (s("5"), i(5)), (s("6"), i(6)), (s("7"), i(7)), (s("8"), i(8)), (s("9"), i(9)), (s("10"), i(10)), (s("11"), i(11)), (s("12"), i(12)), (s("13"), i(13)), (s("14"), i(14))]), d(vec![(s("0"), i(0)), (s("1"), i(1)), (s("2"), i(2)), (s("3"), i(3)), (s("4"), i(4)), (s("5"), i(5)), (s("6"), i(6)), (s("7"), i(7)), (s("8"), i(8)), (s("9"), i(9)), (s("10"), i(10)), (s("11"), i(11)), (s("12"), i(12)), (s("13"), i(13)), (s("14"), i(14))])),
        ("de0010a13000a13101a13202a13303a13404a13505a13606a13707a13808a13909a231300aa231310ba231320ca231330da231340ea231350f", d(vec![(s("0"), i(0)), (s("1"), i(1)), (s("2"), i(2)), (s("3"), i(3)), (s("4"), i(4)), (s("5"), i(5)), (s("6"), i(6)), (s("7"), i(7)), (s("8"), i(8)), (s("9"), i(9)), (s("10"), i(10)), (s("11"), i(11)), (s("12"), i(12)), (s("13"), i(13)), (s("14"), i(14)), (s("15"), i(15))]), d(vec![(s("0"), i(0)), (s("1"), i(1)), (s("2"), i(2)), (s("3"), i(3)), (s("4"), i(4)), (s("5"), i(5)), (s("6"), i(6)), (s("7"), i(7)), (s("8"), i(8)), (s("9"), i(9)), (s("10"), i(10)), (s("11"), i(11)), (s("12"), i(12)), (s("13"), i(13)), (s("14"), i(14)), (s("15"), i(15))])),
        ("9401c2a8726567697374657292a13100", t(vec![i(1), Value::Bool(false), s("register"), t(vec![s("1"), i(0)])]), t(vec![i(1), Value::Bool(false), s("register"), t(vec![s("1"), i(0)])])),
        ("94ff00a62e7265706c79c0", t(vec![i(-1), i(0), s(".reply"), Value::None]), t(vec![i(-1), i(0), s(".reply"), Value::None])),
        ("9492c4080000000000000000c408040d40d42b0cafbcc2aa6c6f61644265666f726592c4080000000000000000c408040d40d42b0cafbc", t(vec![t(vec![b(b"\x00\x00\x00\x00\x00\x00\x00\x00"), b(b"\x04\x0d@\xd4+\x0c\xaf\xbc")]), Value::Bool(false), s("loadBefore"), t(vec![b(b"\x00\x00\x00\x00\x00\x00\x00\x00"), b(b"\x04\x0d@\xd4+\x0c\xaf\xbc")])]), t(vec![t(vec![b(b"\x00\x00\x00\x00\x00\x00\x00\x00"), b(b"\x04\x0d@\xd4+\x0c\xaf\xbc")]), Value::Bool(false), s("loadBefore"), t(vec![b(b"\x00\x00\x00\x00\x00\x00\x00\x00"), b(b"\x04\x0d@\xd4+\x0c\xaf\xbc")])])),
        ("9400c3a97470635f626567696e96cf00007f30b8cfe450c400c40080c0a120", t(vec![i(0), Value::Bool(true), s("tpc_begin"), t(vec![i(139847235789904), b(b""), b(b""), d(vec![]), Value::None, s(" ")])]), t(vec![i(0), Value::Bool(true), s("tpc_begin"), t(vec![i(139847235789904), b(b""), b(b""), d(vec![]), Value::None, s(" ")])])),
        ("9402c2a86765745f696e666f90", t(vec![i(2), Value::Bool(false), s("get_info"), t(vec![])]), t(vec![i(2), Value::Bool(false), s("get_info"), t(vec![])])),
        ("9400c3a4696e666f9183a66c656e67746803a473697a65cd0264a66e657374656481a178920192cb4004000000000000c0", t(vec![i(0), Value::Bool(true), s("info"), t(vec![d(vec![(s("length"), i(3)), (s("size"), i(612)), (s("nested"), d(vec![(s("x"), l(vec![i(1), t(vec![f(0x4004000000000000), Value::None])]))]))])])]), t(vec![i(0), Value::Bool(true), s("info"), t(vec![d(vec![(s("length"), i(3)), (s("size"), i(612)), (s("nested"), d(vec![(s("x"), t(vec![i(1), t(vec![f(0x4004000000000000), Value::None])]))]))])])])),
        ]
    }

    #[test]
    fn encodes_and_decodes_like_python() {
        for (hex_bytes, value, decoded) in python() {
            let bytes = hex(hex_bytes);
            assert_eq!(to_vec(&value), bytes, "encoding {value:?}");
            assert_eq!(dec(&bytes).unwrap(), decoded, "decoding {hex_bytes}");
        }
    }

    /// The captures of zeo-wire.md §2.5 as (frame, value).
    #[test]
    fn wire_captures() {
        let oid = || b(&[0; 8]);
        let tid = || b(&hex("04 0d 40 d4 2b 0c af bc"));
        let record: Vec<u8> = (100..164).collect();
        let record_hex: String = record.iter().map(|byte| format!("{byte:02x} ")).collect();
        let captures = [
            (
                wire("00 00 00 10  94 01 c2 a8 'register' 92 a1 '1' 00"),
                t(vec![i(1), Value::Bool(false), s("register"), t(vec![s("1"), i(0)])]),
            ),
            (
                wire("00 00 00 14  94 01 00 a6 '.reply' c4 08 00 00 00 00 00 00 00 00"),
                t(vec![i(1), i(0), s(".reply"), oid()]),
            ),
            (
                wire(
                    "00 00 00 37 94 92 c4 08 00 00 00 00 00 00 00 00 c4 08 04 0d 40 d4 2b 0c af bc
                     c2 aa 'loadBefore'
                     92 c4 08 00 00 00 00 00 00 00 00 c4 08 04 0d 40 d4 2b 0c af bc",
                ),
                t(vec![t(vec![oid(), tid()]), Value::Bool(false), s("loadBefore"), t(vec![oid(), tid()])]),
            ),
            (
                wire(&format!(
                    "00 00 00 6c 94 92 c4 08 00 00 00 00 00 00 00 00 c4 08 04 0d 40 d4 2b 0c af bc
                     00 a6 '.reply' 93 c4 40 {record_hex} c4 08 04 0d 40 d4 2b 0c af bb c0"
                )),
                t(vec![
                    t(vec![oid(), tid()]),
                    i(0),
                    s(".reply"),
                    t(vec![b(&record), b(&hex("04 0d 40 d4 2b 0c af bb")), Value::None]),
                ]),
            ),
            (
                wire(
                    "00 00 00 a8 94 03 02 a6 '.reply' 92 bf 'ZODB.POSException.ConflictError'
                     84 a7 'message' b7 'database conflict error' a3 'oid' c4 08 00 00 00 00 00 00 00 01
                     aa 'class_name' d9 24 'persistent.mapping.PersistentMapping'
                     a7 'serials' 92 c4 08 04 0d 40 d4 32 62 df bb c4 08 04 0d 40 d4 2d a9 e9 44",
                ),
                t(vec![
                    i(3),
                    i(2),
                    s(".reply"),
                    t(vec![
                        s("ZODB.POSException.ConflictError"),
                        Value::dict([
                            ("message", s("database conflict error")),
                            ("oid", b(&hex("00 00 00 00 00 00 00 01"))),
                            ("class_name", s("persistent.mapping.PersistentMapping")),
                            (
                                "serials",
                                t(vec![b(&hex("04 0d 40 d4 32 62 df bb")), b(&hex("04 0d 40 d4 2d a9 e9 44"))]),
                            ),
                        ]),
                    ]),
                ]),
            ),
            (
                wire("00 00 00 12 94 03 c2 a4 'vote' 91 cf 00 00 7f cf db 99 ce 50"),
                t(vec![i(3), Value::Bool(false), s("vote"), t(vec![i(0x7fcf_db99_ce50)])]),
            ),
            (
                wire("00 00 00 15 94 05 00 a6 '.reply' 91 c4 08 00 00 00 00 00 00 00 01"),
                t(vec![i(5), i(0), s(".reply"), t(vec![b(&hex("00 00 00 00 00 00 00 01"))])]),
            ),
            (wire("00 00 00 0b 94 06 00 a6 '.reply' 90"), t(vec![i(6), i(0), s(".reply"), t(vec![])])),
            (
                wire(
                    "00 00 00 2f 94 00 c3 b5 'invalidateTransaction'
                     92 c4 08 04 0d 40 d4 32 62 df bb 91 c4 08 00 00 00 00 00 00 00 01",
                ),
                t(vec![
                    i(0),
                    Value::Bool(true),
                    s("invalidateTransaction"),
                    t(vec![b(&hex("04 0d 40 d4 32 62 df bb")), t(vec![b(&hex("00 00 00 00 00 00 00 01"))])]),
                ]),
            ),
            (
                wire("00 00 00 19 94 00 c3 a4 'info' 91 82 a6 'length' 01 a4 'size' cc a6"),
                t(vec![
                    i(0),
                    Value::Bool(true),
                    s("info"),
                    t(vec![Value::dict([("length", i(1)), ("size", i(0xa6))])]),
                ]),
            ),
            (
                wire("00 00 00 0b 94 ff 00 a6 '.reply' c0"),
                t(vec![i(-1), i(0), s(".reply"), Value::None]),
            ),
        ];
        for (frame, value) in captures {
            let payload = payload(&frame);
            assert_eq!(to_vec(&value), payload, "encoding {value:?}");
            assert_eq!(dec(payload).unwrap(), value);
        }
    }

    #[test]
    fn lists_sets_and_objects() {
        // Lists go out as arrays and come back as tuples.
        assert_eq!(to_vec(&l(vec![i(1)])), hex("91 01"));
        assert_eq!(dec(&hex("91 01")).unwrap(), t(vec![i(1)]));
        // Sets and objects have no msgpack form: an array, and the state.
        assert_eq!(to_vec(&set(vec![i(1), i(2)])), hex("92 01 02"));
        let p = prefix(Value::dict([("length", i(1))]));
        assert_eq!(to_vec(&p), wire("81 a6 'length' 01"));
    }

    #[test]
    fn decoding_details() {
        let cases = [
            // float32, and ints in longer forms than needed.
            (hex("ca 3f c0 00 00"), f(1.5f64.to_bits())),
            (hex("cd 00 01"), i(1)),
            (hex("d3 ff ff ff ff ff ff ff ff"), i(-1)),
            (hex("cf 7f ff ff ff ff ff ff ff"), i(i64::MAX)),
            (hex("d3 80 00 00 00 00 00 00 00"), i(i64::MIN)),
            (wire("d9 01 'a'"), s("a")),
            (wire("db 00 00 00 01 'a'"), s("a")),
            (wire("c6 00 00 00 01 'a'"), b(b"a")),
            (hex("dc 00 01 c0"), t(vec![Value::None])),
            (hex("dd 00 00 00 00"), t(vec![])),
            (
                wire("de 00 01 a1 'a' c0"),
                Value::dict([("a", Value::None)]),
            ),
            // A repeated key keeps its place and takes the last value; str and bytes
            // keys are different keys.
            (
                wire("83 a1 'a' 01 c4 01 'a' 02 a1 'a' 03"),
                d(vec![(s("a"), i(3)), (b(b"a"), i(2))]),
            ),
        ];
        for (bytes, value) in cases {
            assert_eq!(dec(&bytes).unwrap(), value, "{bytes:02x?}");
        }
        assert_eq!(
            dec(&hex("cf 80 00 00 00 00 00 00 00")),
            Err(DecodeError::IntegerOverflow)
        );
        assert_eq!(dec(&hex("a1 ff")), Err(DecodeError::InvalidUtf8));
        for key in ["01", "c0", "90", "80", "cb 00 00 00 00 00 00 00 00"] {
            let map = hex(&format!("81 {key} 00"));
            assert!(matches!(dec(&map), Err(DecodeError::Malformed(_))), "{key}");
        }
        for m in [0xc1, 0xc7, 0xc8, 0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8] {
            let msg = [m, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            assert_eq!(dec(&msg), Err(DecodeError::UnsupportedMarker(m)));
        }
        assert_eq!(dec(b""), Err(DecodeError::Empty));
        assert_eq!(dec(&hex("c0 c0")), Err(DecodeError::TrailingData(1)));
        assert_eq!(dec(&hex("92 c0")), Err(DecodeError::Truncated));
    }

    #[test]
    fn round_trips() {
        for &n in BOUNDARY_INTS {
            assert_eq!(dec(&to_vec(&i(n))).unwrap(), i(n), "{n}");
        }
        let mut rng = Rng::new(11);
        for _ in 0..500 {
            let value = random_value(&mut rng, 5, false);
            assert_eq!(dec(&to_vec(&value)).unwrap(), value);
        }
        for len in [15, 16, 65535, 65536] {
            let array = t(vec![Value::None; len]);
            assert_eq!(dec(&to_vec(&array)).unwrap(), array);
            let map = d((0..len).map(|k| (s(&k.to_string()), Value::None)).collect());
            assert_eq!(dec(&to_vec(&map)).unwrap(), map);
        }
        for len in [31, 32, 255, 256, 65535, 65536] {
            let text = s(&"x".repeat(len));
            assert_eq!(dec(&to_vec(&text)).unwrap(), text);
            let bytes = b(&vec![7; len]);
            assert_eq!(dec(&to_vec(&bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn hostile_input() {
        let padding = [0u8; 20];
        for header in [
            "c6 ff ff ff ff",
            "db ff ff ff ff",
            "dd ff ff ff ff",
            "df ff ff ff ff",
            "dc ff ff",
            "de ff ff",
        ] {
            let msg = [hex(header).as_slice(), &padding].concat();
            assert_eq!(dec(&msg), Err(DecodeError::Truncated), "{header}");
        }
        let n = 100_000;
        let arrays = [vec![0x91; n], vec![0xc0]].concat();
        assert_eq!(dec(&arrays), Err(DecodeError::DepthLimit(256)));
        let maps = [[0x81, 0xa0].repeat(n), vec![0xc0]].concat();
        assert_eq!(dec(&maps), Err(DecodeError::DepthLimit(256)));
        let limits = Limits {
            max_depth: 2,
            max_items: 5,
        };
        assert_eq!(
            decode(&hex("91 91 c0"), &limits).unwrap(),
            t(vec![t(vec![Value::None])])
        );
        assert_eq!(
            decode(&hex("91 91 91 c0"), &limits),
            Err(DecodeError::DepthLimit(2))
        );
        assert_eq!(
            decode(&hex("94 01 02 03 04"), &limits).unwrap(),
            t((1..5).map(i).collect())
        );
        assert_eq!(
            decode(&hex("95 01 02 03 04 05"), &limits),
            Err(DecodeError::SizeLimit(5))
        );
    }

    #[test]
    fn decoding_does_not_recurse() {
        let n = 100_000;
        let arrays = [vec![0x91; n], vec![0xc0]].concat();
        assert_eq!(depth_on_small_stack(decode, arrays), n);
        let maps = [[0x82, 0xa1, b'k', 0x90, 0xa1, b'v'].repeat(n), vec![0xc0]].concat();
        assert_eq!(depth_on_small_stack(decode, maps), n);
    }

    fn corpus() -> Vec<Vec<u8>> {
        python().iter().map(|(h, _, _)| hex(h)).collect()
    }

    #[test]
    fn every_truncation_fails() {
        for msg in corpus() {
            for end in 0..msg.len() {
                assert!(dec(&msg[..end]).is_err(), "prefix {end} of {msg:02x?}");
            }
        }
    }

    #[test]
    fn mutated_messages_never_panic() {
        let corpus = corpus();
        let mut rng = Rng::new(0xfeed);
        for _ in 0..20_000 {
            let original = &corpus[rng.below(corpus.len())];
            let msg = mutate(&mut rng, original);
            // Whatever is accepted must survive a round trip.
            if let Ok(value) = dec(&msg) {
                let bytes = to_vec(&value);
                assert_eq!(to_vec(&dec(&bytes).unwrap()), bytes, "{msg:02x?}");
            }
        }
    }
}
