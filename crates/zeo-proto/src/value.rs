//! The values ZEO messages carry, independent of the marshalling.
//!
//! Both marshallings decode into and encode from [`Value`]. It holds exactly what the
//! protocol uses: no arbitrary Python objects. The two object-like things a client can
//! send — `set`/`frozenset` (via `builtins`) and `ZopeUndo.Prefix.Prefix` (Zope's undo
//! screen filter) — have their own variants.

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
            Value::Bool(b) => Some(*b as i64),
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
