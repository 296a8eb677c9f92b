//! The values ZEO messages carry, independent of the marshalling.
//!
//! Both marshallings decode into and encode from [`Value`]. It holds exactly what the
//! protocol uses: no arbitrary Python objects. The two object-like things a client can
//! send — `set`/`frozenset` (via `builtins`) and `ZopeUndo.Prefix.Prefix` (Zope's undo
//! screen filter) — have their own variants.
//!
//! Python's equality and dict-key rules over these values are methods here
//! ([`Value::py_eq`], [`Value::dict_key`]): `1`, `1.0` and `True` are one key and equal,
//! `b"a"` and `"a"` are neither.

use std::cmp::Ordering;

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    /// Every integer the protocol carries fits: msgids, counts, `id(txn)`.
    Int(i64),
    Float(f64),
    Bytes(Bytes),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Key order is preserved as received/inserted.
    Dict(Vec<(Value, Value)>),
    /// A `set` or `frozenset` (pickle only).
    Set(Vec<Value>),
    /// An instance of an allow-listed class, e.g. `ZopeUndo.Prefix.Prefix`, with its state
    /// (the `BUILD` argument). Pickle only.
    Object {
        module: String,
        name: String,
        state: Box<Value>,
    },
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// An int for a size or count that Rust keeps unsigned (`u64`, `usize`). Such figures
    /// (bytes in a file, objects in a storage) stay far below `i64::MAX`, but one that
    /// did not fit would be sent as `i64::MAX` rather than wrap to a negative number.
    pub fn uint(n: impl TryInto<i64>) -> Value {
        Value::Int(n.try_into().unwrap_or(i64::MAX))
    }

    /// The inverse of [`Value::uint`] for a reply: the int as a `u64`, 0 if it is
    /// negative or not an int (a size a peer leaves out or gets wrong is not worth
    /// refusing the whole reply over).
    pub fn as_uint(&self) -> u64 {
        self.as_int()
            .and_then(|i| u64::try_from(i).ok())
            .unwrap_or(0)
    }

    pub fn bytes(b: impl Into<Bytes>) -> Value {
        Value::Bytes(b.into())
    }

    /// Builds a dict with text keys.
    pub fn dict<I, K>(items: I) -> Value
    where
        I: IntoIterator<Item = (K, Value)>,
        K: Into<String>,
    {
        Value::Dict(
            items
                .into_iter()
                .map(|(k, v)| (Value::Str(k.into()), v))
                .collect(),
        )
    }

    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Python truthiness for the values a flag or boolean argument can take.
    pub fn truthy(&self) -> bool {
        match self {
            Value::None => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Bytes(b) => !b.is_empty(),
            Value::Str(s) => !s.is_empty(),
            Value::Tuple(v) | Value::List(v) | Value::Set(v) => !v.is_empty(),
            Value::Dict(d) => !d.is_empty(),
            Value::Object { .. } => true,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The items of a tuple or list (msgpack does not tell them apart).
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// Python's `==` for the values an undo dict and a spec hold: numbers compare by
    /// value across `bool`, `int` and `float` (exactly, as Python does), containers item
    /// by item, dicts regardless of order; values of different kinds are unequal.
    pub fn py_eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Tuple(x), Value::Tuple(y))
            | (Value::List(x), Value::List(y))
            | (Value::Set(x), Value::Set(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.py_eq(q))
            }
            (Value::Dict(x), Value::Dict(y)) => {
                x.len() == y.len()
                    && x.iter().all(|(k, v)| {
                        y.iter()
                            .find(|(k2, _)| k.py_eq(k2))
                            .is_some_and(|(_, v2)| v.py_eq(v2))
                    })
            }
            _ => match (Number::of(self), Number::of(other)) {
                (Some(x), Some(y)) => x.cmp(y) == Some(Ordering::Equal),
                _ => self == other,
            },
        }
    }

    /// This value as a dict key or set element: two keys are equal exactly when Python
    /// would find them equal (`1`, `1.0` and `True` are one key). `None` for what Python
    /// cannot hash (lists, dicts, sets, objects, tuples holding them) and for NaN, which
    /// is never equal to another key; such keys are kept as distinct entries.
    pub fn dict_key(&self) -> Option<DictKey> {
        let mut key = DictKeyBuilder::new();
        let mut todo = vec![self];
        while let Some(v) = todo.pop() {
            match v {
                Value::Tuple(items) => {
                    key.tuple(items.len());
                    todo.extend(items.iter().rev());
                }
                scalar => {
                    if !key.scalar(scalar) {
                        return None;
                    }
                }
            }
        }
        Some(key.finish())
    }

    /// Looks up a text key in a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<zodb::Oid> for Value {
    fn from(o: zodb::Oid) -> Value {
        Value::Bytes(Bytes::copy_from_slice(&o.to_bytes()))
    }
}

impl From<zodb::Tid> for Value {
    fn from(t: zodb::Tid) -> Value {
        Value::Bytes(Bytes::copy_from_slice(&t.to_bytes()))
    }
}

/// A number as Python compares it: `bool` is an `int`.
#[derive(Clone, Copy)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn of(v: &Value) -> Option<Number> {
        match v {
            Value::Int(i) => Some(Number::Int(*i)),
            Value::Bool(b) => Some(Number::Int(i64::from(*b))),
            Value::Float(f) => Some(Number::Float(*f)),
            _ => None,
        }
    }

    fn cmp(self, other: Number) -> Option<Ordering> {
        match (self, other) {
            (Number::Int(x), Number::Int(y)) => Some(x.cmp(&y)),
            (Number::Float(x), Number::Float(y)) => x.partial_cmp(&y),
            (Number::Int(x), Number::Float(y)) => zodb::pickle::int_float_cmp(x.into(), y),
            (Number::Float(x), Number::Int(y)) => {
                zodb::pickle::int_float_cmp(y.into(), x).map(Ordering::reverse)
            }
        }
    }
}

/// The canonical bytes of a dict key (see [`Value::dict_key`]): a tagged, length- or
/// count-prefixed pre-order encoding, so distinct keys never share bytes, and numbers
/// that Python finds equal encode alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DictKey(Vec<u8>);

/// Builds a [`DictKey`] in pre-order: a tuple's header, then its items. Shared by
/// [`Value::dict_key`] and the pickle decoder, which hashes keys while they are still
/// objects of its arena.
pub(crate) struct DictKeyBuilder(Vec<u8>);

impl DictKeyBuilder {
    pub(crate) fn new() -> Self {
        DictKeyBuilder(Vec::new())
    }

    fn int(&mut self, i: i64) {
        self.0.push(b'I');
        self.0.extend_from_slice(&i.to_le_bytes());
    }

    fn sized(&mut self, tag: u8, data: &[u8]) {
        self.0.push(tag);
        self.0.extend_from_slice(&(data.len() as u64).to_le_bytes());
        self.0.extend_from_slice(data);
    }

    /// Appends a value that is not a tuple; `false` if it cannot be a key (NaN, or a
    /// container Python cannot hash).
    pub(crate) fn scalar(&mut self, v: &Value) -> bool {
        const TWO_63: f64 = 9_223_372_036_854_775_808.0;
        match v {
            Value::None => self.0.push(b'N'),
            Value::Bool(b) => self.int(i64::from(*b)),
            Value::Int(i) => self.int(*i),
            Value::Float(f) if f.is_nan() => return false,
            // An integral float is the same key as the int of that value.
            Value::Float(f) if f.fract() == 0.0 && (-TWO_63..TWO_63).contains(f) => {
                // Exact: the guard admits only whole numbers in i64's range.
                #[allow(clippy::cast_possible_truncation)]
                let i = *f as i64;
                self.int(i)
            }
            Value::Float(f) => {
                self.0.push(b'F');
                self.0.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Value::Bytes(b) => self.sized(b'B', b),
            Value::Str(s) => self.sized(b'S', s.as_bytes()),
            Value::Tuple(_)
            | Value::List(_)
            | Value::Dict(_)
            | Value::Set(_)
            | Value::Object { .. } => return false,
        }
        true
    }

    /// Appends the header of a tuple of `len` items; the items follow.
    pub(crate) fn tuple(&mut self, len: usize) {
        self.0.push(b'T');
        self.0.extend_from_slice(&(len as u64).to_le_bytes());
    }

    pub(crate) fn finish(self) -> DictKey {
        DictKey(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_equality() {
        let i = Value::Int;
        assert!(i(1).py_eq(&Value::Float(1.0)));
        assert!(Value::Bool(true).py_eq(&i(1)));
        assert!(!i(1).py_eq(&Value::str("1")));
        assert!(!Value::bytes(&b"a"[..]).py_eq(&Value::str("a")));
        // Exact, not through a float: 2**53 + 1 != 2.0**53.
        assert!(!i((1 << 53) + 1).py_eq(&Value::Float(9_007_199_254_740_992.0)));
        assert!(!Value::Float(f64::NAN).py_eq(&Value::Float(f64::NAN)));
        let d = |items: Vec<(Value, Value)>| Value::Dict(items);
        assert!(d(vec![(i(1), i(2)), (i(3), i(4))]).py_eq(&d(vec![(i(3), i(4)), (i(1), i(2))])));
        assert!(Value::Tuple(vec![i(1)]).py_eq(&Value::Tuple(vec![Value::Float(1.0)])));
        assert!(!Value::Tuple(vec![i(1)]).py_eq(&Value::List(vec![i(1)])));
    }

    #[test]
    fn dict_keys() {
        let key = |v: Value| v.dict_key();
        assert_eq!(key(Value::Int(1)), key(Value::Float(1.0)));
        assert_eq!(key(Value::Int(1)), key(Value::Bool(true)));
        assert_ne!(key(Value::Int(1)), key(Value::str("1")));
        assert_ne!(key(Value::bytes(&b"a"[..])), key(Value::str("a")));
        assert_eq!(key(Value::Float(f64::NAN)), None);
        assert_eq!(key(Value::List(vec![])), None);
        assert_eq!(key(Value::Tuple(vec![Value::List(vec![])])), None);
        // Nesting is part of the key: ((1,), 2) and ((1, 2),) differ.
        let t = Value::Tuple;
        assert_ne!(
            key(t(vec![t(vec![Value::Int(1)]), Value::Int(2)])),
            key(t(vec![t(vec![Value::Int(1), Value::Int(2)])]))
        );
        assert_eq!(
            key(t(vec![Value::Int(1), Value::str("a")])),
            key(t(vec![Value::Float(1.0), Value::str("a")]))
        );
    }
}
