//! The Python values a BTrees state can hold, and Python's comparisons over them.
//!
//! Invariants:
//! - an [`Object`] is what ZODB's conflict-resolution unpickler would build from a record
//!   (`ZODB.ConflictResolution`: persistent ids become `PersistentReference`s shared by a
//!   factory, classes are imported), restricted to the kinds modelled here; anything else
//!   never becomes an `Object` (the decoder reports it as not handled);
//! - [`Object::Global`] only occurs inside the data of a persistent reference;
//! - [`eq`] and [`lt`] give exactly `PyObject_RichCompareBool(a, b, Py_EQ / Py_LT)` for
//!   these kinds, including which comparisons raise ([`Fail::Raise`]); where the answer
//!   depends on something this crate cannot know they return [`Fail::Undecidable`].
//!
//! Identity matters in two places of Python's algorithm: `RichCompareBool`'s `a is b`
//! shortcut for equality, and the C bucket code comparing `next` pointers with `!=`.
//! Objects decoded from different records are never identical in Python (each record has
//! its own unpickler), except persistent references, which one factory shares across
//! the three states: here the same [`Rc`] (see [`crate::decode`]). Small ints, `None` and
//! other interned singletons are identical too, but they are equal to themselves anyway.

use std::cmp::Ordering;
use std::rc::Rc;

/// A Python value of a BTrees state.
#[derive(Debug, Clone)]
pub enum Object {
    None,
    Bool(bool),
    /// Python ints as far as 128 bits reach (every BTrees integer type fits).
    Int(i128),
    Float(f64),
    /// A `str` (valid Unicode: strings with lone surrogates are not modelled).
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Object>),
    List(Vec<Object>),
    /// Items in insertion order, keys distinct under Python's rules.
    Dict(Vec<(Object, Object)>),
    /// A `ZODB.ConflictResolution.PersistentReference`.
    Ref(Rc<PersistentRef>),
    /// A class by reference (`GLOBAL module name`), only inside persistent-reference data.
    Global {
        module: String,
        name: String,
    },
}

/// What `PersistentReference.__init__` makes of a persistent id.
#[derive(Debug)]
pub struct PersistentRef {
    /// The persistent id as the record spelled it; written back unchanged.
    pub data: Object,
    /// `self.oid`: the oid bytes (text oids encoded as ASCII, as Python does).
    pub oid: Vec<u8>,
    /// `self.database_name` of a cross-database reference.
    pub database: Option<String>,
    /// `self.weak`.
    pub weak: bool,
    /// `tuple(data)` with classes left out, to tell whether two references that are not
    /// the same factory entry could still be one in Python (see [`next_identity`]).
    pub loose_key: Vec<u8>,
}

impl PersistentRef {
    /// `PersistentReference.__cmp__(other) == 0` for a different object: same oid and
    /// database, neither weak. (`__cmp__` raises otherwise.)
    fn equivalent(&self, other: &PersistentRef) -> bool {
        self.oid == other.oid && self.database == other.database && !self.weak && !other.weak
    }
}

/// Why a comparison has no boolean answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    /// Python raises (the message names the exception as Python would).
    Raise(String),
    /// Python's answer depends on what is not known here.
    Undecidable(&'static str),
}

pub type Cmp<T> = Result<T, Fail>;

fn type_name(o: &Object) -> &'static str {
    match o {
        Object::None => "NoneType",
        Object::Bool(_) => "bool",
        Object::Int(_) => "int",
        Object::Float(_) => "float",
        Object::Str(_) => "str",
        Object::Bytes(_) => "bytes",
        Object::Tuple(_) => "tuple",
        Object::List(_) => "list",
        Object::Dict(_) => "dict",
        Object::Ref(_) => "PersistentReference",
        Object::Global { .. } => "type",
    }
}

fn unorderable(a: &Object, b: &Object) -> Fail {
    Fail::Raise(format!(
        "TypeError: '<' not supported between instances of '{}' and '{}'",
        type_name(a),
        type_name(b)
    ))
}

fn different_references() -> Fail {
    Fail::Raise("ValueError: can't reliably compare against different PersistentReferences".into())
}

/// A number as Python compares it (`bool` is an `int`).
#[derive(Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    fn of(o: &Object) -> Option<Number> {
        match o {
            Object::Bool(b) => Some(Number::Int(i128::from(*b))),
            Object::Int(i) => Some(Number::Int(*i)),
            Object::Float(f) => Some(Number::Float(*f)),
            _ => None,
        }
    }

    /// `None` when unordered (NaN).
    fn cmp(self, other: Number) -> Option<Ordering> {
        use zodb::pickle::int_float_cmp;
        match (self, other) {
            (Number::Int(x), Number::Int(y)) => Some(x.cmp(&y)),
            (Number::Float(x), Number::Float(y)) => x.partial_cmp(&y),
            (Number::Int(x), Number::Float(y)) => int_float_cmp(x, y),
            (Number::Float(x), Number::Int(y)) => int_float_cmp(y, x).map(Ordering::reverse),
        }
    }
}

/// How Python compares: normally, or inside C code that already has an exception set.
///
/// BTrees' merge does not check for errors after comparing two values, so it can go on
/// comparing with an exception pending. Builtin types still compare as usual then, but a
/// comparison that runs Python code (`PersistentReference.__eq__` and friends) fails:
/// the interpreter turns a Python function returning normally while an exception is set
/// into a `SystemError`. Only `==` between identical objects is answered without a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Normal,
    ErrorPending,
}

fn reference_call(state: State) -> Cmp<()> {
    match state {
        State::Normal => Ok(()),
        State::ErrorPending => Err(Fail::Raise(
            "SystemError: a PersistentReference comparison ran with an exception set".into(),
        )),
    }
}

/// `PyObject_RichCompareBool(a, b, Py_EQ)`: `a is b`, else `a == b`.
pub fn eq(a: &Object, b: &Object) -> Cmp<bool> {
    eq_in(a, b, State::Normal)
}

/// [`eq`] in a given interpreter state.
pub fn eq_in(a: &Object, b: &Object, state: State) -> Cmp<bool> {
    match (a, b) {
        (Object::Ref(x), Object::Ref(y)) => {
            if Rc::ptr_eq(x, y) {
                return Ok(true);
            }
            reference_call(state)?;
            if x.equivalent(y) {
                Ok(true)
            } else {
                Err(different_references())
            }
        }
        // `PersistentReference.__eq__` (directly or reflected) raises for anything that
        // is not an equivalent reference, `None` included.
        (Object::Ref(_), _) | (_, Object::Ref(_)) => {
            reference_call(state)?;
            Err(different_references())
        }
        (Object::None, Object::None) => Ok(true),
        (Object::Str(x), Object::Str(y)) => Ok(x == y),
        (Object::Bytes(x), Object::Bytes(y)) => Ok(x == y),
        (Object::Tuple(x), Object::Tuple(y)) | (Object::List(x), Object::List(y)) => {
            if x.len() != y.len() {
                return Ok(false);
            }
            for (p, q) in x.iter().zip(y) {
                if !eq_in(p, q, state)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        (Object::Dict(x), Object::Dict(y)) => {
            if x.len() != y.len() {
                return Ok(false);
            }
            // Keys are hashable builtins (the decoder guarantees it), equal exactly when
            // their key bytes are: the lookup finds what Python's hash lookup finds.
            let undecided = || Fail::Undecidable("a dict key that is not hashable");
            let mut index = std::collections::HashMap::with_capacity(y.len());
            for (k, v) in y {
                index.insert(key_bytes(k).ok_or_else(undecided)?, v);
            }
            for (k, v) in x {
                match index.get(&key_bytes(k).ok_or_else(undecided)?) {
                    Some(v2) if eq_in(v, v2, state)? => {}
                    _ => return Ok(false),
                }
            }
            Ok(true)
        }
        (Object::Global { .. }, _) | (_, Object::Global { .. }) => {
            Err(Fail::Undecidable("a class compared as a value"))
        }
        _ => match (Number::of(a), Number::of(b)) {
            (Some(x), Some(y)) => Ok(x.cmp(y) == Some(Ordering::Equal)),
            // Different kinds: both `__eq__` return NotImplemented, identity decides.
            _ => Ok(false),
        },
    }
}

/// `PyObject_RichCompareBool(a, b, Py_LT)` (no identity shortcut for `<`).
pub fn lt(a: &Object, b: &Object) -> Cmp<bool> {
    lt_in(a, b, State::Normal)
}

/// [`lt`] in a given interpreter state.
pub fn lt_in(a: &Object, b: &Object, state: State) -> Cmp<bool> {
    match (a, b) {
        // `PersistentReference.__lt__` is `__cmp__(other) < 0`: False for an equivalent
        // reference, a ValueError for anything else. A builtin on the left returns
        // NotImplemented and the reflected `__gt__` raises the same way.
        (Object::Ref(x), Object::Ref(y)) => {
            reference_call(state)?;
            if Rc::ptr_eq(x, y) || x.equivalent(y) {
                Ok(false)
            } else {
                Err(different_references())
            }
        }
        (Object::Ref(_), _) | (_, Object::Ref(_)) => {
            reference_call(state)?;
            Err(different_references())
        }
        (Object::Str(x), Object::Str(y)) => Ok(x < y),
        (Object::Bytes(x), Object::Bytes(y)) => Ok(x < y),
        (Object::Tuple(x), Object::Tuple(y)) | (Object::List(x), Object::List(y)) => {
            for (p, q) in x.iter().zip(y) {
                if !eq_in(p, q, state)? {
                    return lt_in(p, q, state);
                }
            }
            Ok(x.len() < y.len())
        }
        (Object::Global { .. }, _) | (_, Object::Global { .. }) => {
            Err(Fail::Undecidable("a class compared as a value"))
        }
        _ => match (Number::of(a), Number::of(b)) {
            (Some(x), Some(y)) => Ok(x.cmp(y) == Some(Ordering::Less)),
            _ => Err(unorderable(a, b)),
        },
    }
}

/// BTrees' `COMPARE` macro for object keys and values (`objectkeymacros.h`): `None` is
/// smaller than everything else without asking Python, then `<`, then `==`; neither
/// gives 1 (so a NaN is "greater" than anything it is compared with).
pub fn compare(a: &Object, b: &Object) -> Cmp<Ordering> {
    compare_in(a, b, State::Normal)
}

/// [`compare`] in a given interpreter state.
pub fn compare_in(a: &Object, b: &Object, state: State) -> Cmp<Ordering> {
    match (a, b) {
        (Object::None, Object::None) => Ok(Ordering::Equal),
        (Object::None, _) => Ok(Ordering::Less),
        (_, Object::None) => Ok(Ordering::Greater),
        _ => {
            if lt_in(a, b, state)? {
                Ok(Ordering::Less)
            } else if eq_in(a, b, state)? {
                Ok(Ordering::Equal)
            } else {
                Ok(Ordering::Greater)
            }
        }
    }
}

/// The identity of a dict key under Python's rules: equal bytes exactly when Python
/// finds the keys equal (`1`, `1.0` and `True` are one key). `None` for what Python
/// cannot hash (lists, dicts, references) and for NaN (equal to no other key).
pub fn key_bytes(o: &Object) -> Option<Vec<u8>> {
    let mut key = Vec::new();
    let mut todo = vec![o];
    while let Some(o) = todo.pop() {
        match o {
            Object::Tuple(items) => {
                key.push(b'T');
                key.extend_from_slice(&(items.len() as u64).to_le_bytes());
                todo.extend(items.iter().rev());
            }
            scalar => {
                if !scalar_key(scalar, &mut key) {
                    return None;
                }
            }
        }
    }
    Some(key)
}

/// Appends the key bytes of a value that is not a tuple; `false` if it has none.
pub fn scalar_key(o: &Object, key: &mut Vec<u8>) -> bool {
    const TWO_127: f64 = 170_141_183_460_469_231_731_687_303_715_884_105_728.0;
    let int = |i: i128, key: &mut Vec<u8>| {
        key.push(b'I');
        key.extend_from_slice(&i.to_le_bytes());
    };
    let sized = |tag: u8, data: &[u8], key: &mut Vec<u8>| {
        key.push(tag);
        key.extend_from_slice(&(data.len() as u64).to_le_bytes());
        key.extend_from_slice(data);
    };
    match o {
        Object::None => key.push(b'N'),
        Object::Bool(b) => int(i128::from(*b), key),
        Object::Int(i) => int(*i, key),
        Object::Float(f) if f.is_nan() => return false,
        // An integral float is the same key as the int of that value.
        Object::Float(f) if f.fract() == 0.0 && (-TWO_127..TWO_127).contains(f) => {
            int(*f as i128, key)
        }
        Object::Float(f) => {
            key.push(b'F');
            key.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Object::Str(s) => sized(b'S', s.as_bytes(), key),
        Object::Bytes(b) => sized(b'B', b, key),
        Object::Tuple(_)
        | Object::List(_)
        | Object::Dict(_)
        | Object::Ref(_)
        | Object::Global { .. } => return false,
    }
    true
}

/// Whether the C bucket code's `next` pointers are the same object.
///
/// `PersistentReferenceFactory` gives one object per `tuple(persistent id)`: two
/// references are the same object when their ids are equal as tuples. Classes inside an
/// id are compared by identity, so two spellings of one class (`BTrees.OOBTree.OOBucket`
/// and `BTrees._OOBTree.OOBucket`) make the answer depend on imports: undecidable here.
pub fn next_identity(a: &Rc<PersistentRef>, b: &Rc<PersistentRef>) -> Cmp<bool> {
    if Rc::ptr_eq(a, b) {
        Ok(true)
    } else if a.loose_key == b.loose_key {
        Err(Fail::Undecidable(
            "next-bucket references that differ only in how their class is named",
        ))
    } else {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Object {
        Object::Str(t.into())
    }

    fn r(oid: u8, weak: bool) -> Object {
        Object::Ref(Rc::new(PersistentRef {
            data: Object::Bytes(vec![oid]),
            oid: vec![oid],
            database: None,
            weak,
            loose_key: vec![oid],
        }))
    }

    #[test]
    fn python_comparisons() {
        use Object::*;
        assert_eq!(lt(&Int(1), &Float(1.5)), Ok(true));
        assert_eq!(eq(&Bool(true), &Float(1.0)), Ok(true));
        assert_eq!(eq(&Int(1), &s("1")), Ok(false));
        assert!(matches!(lt(&Int(1), &s("1")), Err(Fail::Raise(_))));
        assert!(matches!(lt(&None, &None), Err(Fail::Raise(_))));
        assert_eq!(compare(&None, &Int(1)), Ok(Ordering::Less));
        assert_eq!(compare(&Float(f64::NAN), &Int(1)), Ok(Ordering::Greater));
        assert_eq!(compare(&Int(1), &Float(f64::NAN)), Ok(Ordering::Greater));
        // Tuples: equal prefixes, then `<` on the first difference; lengths last.
        let t = |v: Vec<Object>| Tuple(v);
        assert_eq!(
            lt(&t(vec![Int(1), None]), &t(vec![Int(1), None])),
            Ok(false)
        );
        assert!(matches!(
            lt(&t(vec![None]), &t(vec![Int(1)])),
            Err(Fail::Raise(_))
        ));
        assert_eq!(lt(&t(vec![Int(1)]), &t(vec![Int(1), Int(0)])), Ok(true));
        assert!(matches!(lt(&List(vec![]), &t(vec![])), Err(Fail::Raise(_))));
        assert!(matches!(
            lt(&Dict(vec![]), &Dict(vec![])),
            Err(Fail::Raise(_))
        ));
        assert_eq!(
            eq(
                &Dict(vec![(Int(1), s("a")), (s("b"), Int(2))]),
                &Dict(vec![(s("b"), Float(2.0)), (Float(1.0), s("a"))])
            ),
            Ok(true)
        );
        // Persistent references: equivalent ones are equal, others raise, weak ones are
        // only equal to themselves.
        let (a, a2, b, w) = (r(1, false), r(1, false), r(2, false), r(1, true));
        assert_eq!(eq(&a, &a2), Ok(true));
        assert_eq!(lt(&a, &a2), Ok(false));
        assert!(matches!(eq(&a, &b), Err(Fail::Raise(_))));
        assert!(matches!(eq(&a, &w), Err(Fail::Raise(_))));
        assert_eq!(eq(&w, &w.clone()), Ok(true));
        assert!(matches!(eq(&None, &a), Err(Fail::Raise(_))));
        assert_eq!(compare(&None, &a), Ok(Ordering::Less));
        assert_eq!(
            lt(&t(vec![a.clone(), Int(1)]), &t(vec![a.clone(), Int(2)])),
            Ok(true)
        );
        // With an exception pending, only identity answers for references.
        let pending = State::ErrorPending;
        assert_eq!(eq_in(&a, &a.clone(), pending), Ok(true));
        assert!(eq_in(&a, &a2, pending).is_err());
        assert!(lt_in(&a, &a.clone(), pending).is_err());
        assert_eq!(lt_in(&Int(1), &Int(2), pending), Ok(true));
    }
}
