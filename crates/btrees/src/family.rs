//! The BTrees families and what their C code does with keys and values.
//!
//! Invariant: a [`Key`] or [`Value`] holds exactly what the C bucket stores after
//! `__setstate__` (`COPY_KEY_FROM_ARG`, `COPY_VALUE_FROM_ARG`): a Python object for the
//! `O` flavours, a C integer of the family's width and sign, a C `float` for `F`
//! values, raw bytes for `fsBTree`. Converting back ([`Key::to_object`],
//! [`Value::to_object`]) is what `__getstate__` does, so the resolved state holds what
//! Python's would (a `True` key of an `II` bucket comes back as `1`, `F` values come
//! back rounded to single precision).

use std::cmp::Ordering;

use crate::object::{self, Cmp, Fail, Object, State};

/// The C type of a key or value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `O`: any Python object, compared with Python's `<` and `==`.
    Object,
    /// `I`: C `int`.
    Int32,
    /// `U`: C `unsigned int`.
    UInt32,
    /// `L`: C `long long`.
    Int64,
    /// `Q`: C `unsigned long long`.
    UInt64,
    /// `F` (values only): C `float`.
    Float32,
    /// `fs` keys: two bytes.
    Bytes2,
    /// `fs` values: six bytes.
    Bytes6,
}

/// A family: `OO`, `IF`, `fs`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub prefix: &'static str,
    pub key: Kind,
    pub value: Kind,
}

/// Every family BTrees 6.5 builds (`BTrees._FAMILIES`).
pub const FAMILIES: &[Family] = &[
    fam("IO", Kind::Int32, Kind::Object),
    fam("II", Kind::Int32, Kind::Int32),
    fam("IF", Kind::Int32, Kind::Float32),
    fam("IU", Kind::Int32, Kind::UInt32),
    fam("UO", Kind::UInt32, Kind::Object),
    fam("UU", Kind::UInt32, Kind::UInt32),
    fam("UF", Kind::UInt32, Kind::Float32),
    fam("UI", Kind::UInt32, Kind::Int32),
    fam("LO", Kind::Int64, Kind::Object),
    fam("LL", Kind::Int64, Kind::Int64),
    fam("LF", Kind::Int64, Kind::Float32),
    fam("LQ", Kind::Int64, Kind::UInt64),
    fam("QO", Kind::UInt64, Kind::Object),
    fam("QQ", Kind::UInt64, Kind::UInt64),
    fam("QF", Kind::UInt64, Kind::Float32),
    fam("QL", Kind::UInt64, Kind::Int64),
    fam("OO", Kind::Object, Kind::Object),
    fam("OI", Kind::Object, Kind::Int32),
    fam("OU", Kind::Object, Kind::UInt32),
    fam("OL", Kind::Object, Kind::Int64),
    fam("OQ", Kind::Object, Kind::UInt64),
    fam("fs", Kind::Bytes2, Kind::Bytes6),
];

const fn fam(prefix: &'static str, key: Kind, value: Kind) -> Family {
    Family { prefix, key, value }
}

/// A key as the C bucket holds it.
#[derive(Debug, Clone)]
pub enum Key {
    Object(Object),
    Int(i128),
    Bytes2([u8; 2]),
}

/// A value as the C bucket holds it.
#[derive(Debug, Clone)]
pub enum Value {
    Object(Object),
    Int(i128),
    Float(f32),
    Bytes6([u8; 6]),
}

fn type_error(what: &str) -> Fail {
    Fail::Raise(format!("TypeError: {what}"))
}

/// A Python int (bool included, as `PyLong_Check` accepts it) in `min..=max`.
fn c_int(o: &Object, min: i128, max: i128) -> Cmp<i128> {
    let i = match o {
        Object::Int(i) => *i,
        Object::Bool(b) => i128::from(*b),
        _ => return Err(type_error("expected integer key")),
    };
    if (min..=max).contains(&i) {
        Ok(i)
    } else {
        Err(type_error("integer out of range"))
    }
}

fn int_range(kind: Kind) -> (i128, i128) {
    match kind {
        Kind::Int32 => (i32::MIN.into(), i32::MAX.into()),
        Kind::UInt32 => (0, u32::MAX.into()),
        Kind::Int64 => (i64::MIN.into(), i64::MAX.into()),
        Kind::UInt64 => (0, u64::MAX.into()),
        _ => unreachable!("not an integer kind"),
    }
}

impl Key {
    /// `COPY_KEY_FROM_ARG`; an error is what `__setstate__` raises.
    pub fn from_object(kind: Kind, o: Object) -> Cmp<Key> {
        match kind {
            Kind::Object => Ok(Key::Object(o)),
            Kind::Int32 | Kind::UInt32 | Kind::Int64 | Kind::UInt64 => {
                let (min, max) = int_range(kind);
                c_int(&o, min, max).map(Key::Int)
            }
            Kind::Bytes2 => match o {
                Object::Bytes(b) if b.len() == 2 => Ok(Key::Bytes2([b[0], b[1]])),
                _ => Err(type_error("expected two-character string key")),
            },
            Kind::Float32 | Kind::Bytes6 => unreachable!("not a key kind"),
        }
    }

    /// `COPY_KEY_TO_OBJECT`.
    pub fn to_object(&self) -> Object {
        match self {
            Key::Object(o) => o.clone(),
            Key::Int(i) => Object::Int(*i),
            Key::Bytes2(b) => Object::Bytes(b.to_vec()),
        }
    }

    /// The comparison of `TEST_KEY_SET_OR`: an ordering, or what Python raises (object
    /// keys only).
    pub fn cmp(&self, other: &Key, state: State) -> Cmp<Ordering> {
        match (self, other) {
            (Key::Object(a), Key::Object(b)) => object::compare_in(a, b, state),
            (Key::Int(a), Key::Int(b)) => Ok(a.cmp(b)),
            (Key::Bytes2(a), Key::Bytes2(b)) => Ok(a.cmp(b)),
            _ => unreachable!("keys of one bucket have one kind"),
        }
    }
}

impl Value {
    /// `COPY_VALUE_FROM_ARG`; an error is what `__setstate__` raises (or, for a float
    /// bucket given an int beyond `long`, the error C leaves pending, which fails the
    /// resolution later).
    pub fn from_object(kind: Kind, o: Object) -> Cmp<Value> {
        match kind {
            Kind::Object => Ok(Value::Object(o)),
            Kind::Int32 | Kind::UInt32 | Kind::Int64 | Kind::UInt64 => {
                let (min, max) = int_range(kind);
                c_int(&o, min, max).map(Value::Int)
            }
            // `(float)PyFloat_AsDouble(v)` or `(float)PyLong_AsLong(v)`: both round to
            // nearest, as Rust's casts do.
            Kind::Float32 => match o {
                Object::Float(f) => Ok(Value::Float(f as f32)),
                Object::Int(_) | Object::Bool(_) => {
                    let i = c_int(&o, i64::MIN.into(), i64::MAX.into()).map_err(|_| {
                        Fail::Raise(
                            "OverflowError: Python int too large to convert to C long".into(),
                        )
                    })?;
                    Ok(Value::Float(i as i64 as f32))
                }
                _ => Err(type_error("expected float or int value")),
            },
            Kind::Bytes6 => match o {
                Object::Bytes(b) if b.len() == 6 => {
                    let mut v = [0u8; 6];
                    v.copy_from_slice(&b);
                    Ok(Value::Bytes6(v))
                }
                _ => Err(type_error("expected six-character string key")),
            },
            Kind::Bytes2 => unreachable!("not a value kind"),
        }
    }

    /// `COPY_VALUE_TO_OBJECT`.
    pub fn to_object(&self) -> Object {
        match self {
            Value::Object(o) => o.clone(),
            Value::Int(i) => Object::Int(*i),
            Value::Float(f) => Object::Float(f64::from(*f)),
            Value::Bytes6(b) => Object::Bytes(b.to_vec()),
        }
    }

    /// `TEST_VALUE(self, other) == 0`, the merge's "unchanged" test. For objects it is
    /// `COMPARE`; for C numbers neither `<` nor `>` (so a NaN float is "unchanged"
    /// whatever it is compared with).
    pub fn same(&self, other: &Value, state: State) -> Cmp<bool> {
        match (self, other) {
            (Value::Object(a), Value::Object(b)) => {
                object::compare_in(a, b, state).map(|o| o == Ordering::Equal)
            }
            (Value::Int(a), Value::Int(b)) => Ok(a == b),
            // Unordered (a NaN) counts as equal, as `(K < T) ? -1 : (K > T) ? 1 : 0` does.
            (Value::Float(a), Value::Float(b)) => {
                Ok(matches!(a.partial_cmp(b), Some(Ordering::Equal) | None))
            }
            (Value::Bytes6(a), Value::Bytes6(b)) => Ok(a == b),
            _ => unreachable!("values of one bucket have one kind"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_conversions() {
        assert!(matches!(
            Key::from_object(Kind::Int32, Object::Bool(true)),
            Ok(Key::Int(1))
        ));
        assert!(Key::from_object(Kind::Int32, Object::Int(1 << 31)).is_err());
        assert!(Key::from_object(Kind::UInt32, Object::Int(-1)).is_err());
        assert!(Key::from_object(Kind::UInt64, Object::Int(u64::MAX.into())).is_ok());
        assert!(Key::from_object(Kind::Int64, Object::Float(1.0)).is_err());
        assert!(Key::from_object(Kind::Bytes2, Object::Str("ab".into())).is_err());
        let Ok(Value::Float(f)) = Value::from_object(Kind::Float32, Object::Float(0.1)) else {
            panic!()
        };
        assert_eq!(Value::Float(f).to_object().as_f64(), Some(0.1f32 as f64));
        let nan = Value::Float(f32::NAN);
        assert_eq!(nan.same(&Value::Float(1.0), State::Normal), Ok(true));
        assert_eq!(
            Value::Float(1.0).same(&Value::Float(2.0), State::Normal),
            Ok(false)
        );
    }

    impl Object {
        fn as_f64(&self) -> Option<f64> {
            match self {
                Object::Float(f) => Some(*f),
                _ => None,
            }
        }
    }
}
