//! `_p_resolveConflict` of buckets, sets, trees, tree sets and `Length`, ported from
//! BTrees' C code (`BucketTemplate.c`, `MergeTemplate.c`, `BTreeTemplate.c`) step by
//! step, so that every comparison happens in the same order, between the same operands,
//! as in Python.
//!
//! Invariants:
//! - a comparison Python would raise on ends the resolution where C ends it: at once
//!   for keys and for `__setstate__`; for values, C does not check, treats the values as
//!   different and merges on with the exception pending, so this port does the same
//!   ([`State::ErrorPending`]): the outcome is then a `BTreesConflictError` if the merge
//!   meets a conflict before anything checks for errors (which replaces the pending
//!   exception), and that exception otherwise (a `SystemError` if the merge completes);
//! - a refusal carries the same kind as Python's, and a `BTreesConflictError` the same
//!   three positions and reason code;
//! - the resolved state is built from the same objects Python's would be (the new or
//!   the committed side's key and value, the old state's `next`).

use std::cmp::Ordering;
use std::rc::Rc;

use crate::family::{Family, Key, Kind, Value};
use crate::object::{self, Cmp, Fail, Object, PersistentRef, State};

/// Why Python refuses to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `BTreesConflictError(p1, p2, p3, reason)`: the positions of the three iterators
    /// (old, committed, new; -1 when not started or exhausted) and the reason code of
    /// `ZODB.POSException.BTreesConflictError.msgs`.
    BTrees {
        p1: i32,
        p2: i32,
        p3: i32,
        reason: u8,
    },
    /// Another exception (a comparison Python cannot make, a state `__setstate__`
    /// rejects, arithmetic on a non-number).
    Error(String),
}

/// The messages of `BTreesConflictError.msgs`, by reason code.
const MESSAGES: [&str; 14] = [
    "Conflicting bucket split",
    "Conflicting changes",
    "Conflicting delete and change",
    "Conflicting delete and change",
    "Conflicting inserts or deletes",
    "Conflicting deletes",
    "Conflicting inserts",
    "Conflicting deletes, or delete and change",
    "Conflicting deletes, or delete and change",
    "Conflicting deletes",
    "Empty bucket from deleting all keys",
    "Conflicting changes in an internal BTree node",
    "Empty bucket in a transaction",
    "Delete of first key",
];

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::BTrees { p1, p2, p3, reason } => write!(
                f,
                "BTrees conflict error at {p1}/{p2}/{p3}: {}",
                MESSAGES[usize::from(*reason)]
            ),
            Refusal::Error(e) => f.write_str(e),
        }
    }
}

/// Why a resolution stopped: Python refuses, or the answer is not known here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    Refused(Refusal),
    Undecidable(&'static str),
}

impl From<Fail> for Stop {
    fn from(f: Fail) -> Stop {
        match f {
            Fail::Raise(e) => Stop::Refused(Refusal::Error(e)),
            Fail::Undecidable(why) => Stop::Undecidable(why),
        }
    }
}

fn conflict(p1: i32, p2: i32, p3: i32, reason: u8) -> Stop {
    Stop::Refused(Refusal::BTrees { p1, p2, p3, reason })
}

fn error(e: &str) -> Stop {
    Stop::Refused(Refusal::Error(e.to_owned()))
}

/// The `next` slot of a C bucket: whatever `__setstate__` was given, which in a
/// conflict resolution is a persistent reference (or `None` spelled out).
#[derive(Debug, Clone)]
enum Next {
    Ref(Rc<PersistentRef>),
    NoneObject,
    /// Anything else (`__setstate__` does not check): its identity is not modelled.
    Other(Object),
}

impl Next {
    fn to_object(&self) -> Object {
        match self {
            Next::Ref(r) => Object::Ref(r.clone()),
            Next::NoneObject => Object::None,
            Next::Other(o) => o.clone(),
        }
    }
}

/// `b0->next != b1->next`, C pointer identity.
fn same_next(a: &Option<Next>, b: &Option<Next>) -> Cmp<bool> {
    match (a, b) {
        // Two objects of other kinds from separate unpicklers can still be one (small
        // ints and other interned values); a reference, None or no next bucket at all
        // never is one of them.
        (Some(Next::Other(_)), Some(Next::Other(_))) => Err(Fail::Undecidable(
            "next buckets that are neither references nor None",
        )),
        (None, None) => Ok(true),
        (Some(Next::NoneObject), Some(Next::NoneObject)) => Ok(true),
        (Some(Next::Ref(x)), Some(Next::Ref(y))) => object::next_identity(x, y),
        _ => Ok(false),
    }
}

/// A bucket or set after `__setstate__`.
struct Bucket {
    keys: Vec<Key>,
    /// Empty for a set.
    values: Vec<Value>,
    next: Option<Next>,
}

/// `_bucket_setstate` / `_set_setstate` on a fresh bucket; `None` stays empty ("None is
/// equivalent to empty, for BTrees").
fn set_state(family: &Family, mapping: bool, state: Option<Object>) -> Result<Bucket, Stop> {
    let mut bucket = Bucket {
        keys: Vec::new(),
        values: Vec::new(),
        next: None,
    };
    let Some(state) = state else {
        return Ok(bucket);
    };
    // PyArg_ParseTuple(state, "O|O"): a tuple of one or two.
    let Object::Tuple(mut parts) = state else {
        return Err(error("TypeError: __setstate__ argument must be a tuple"));
    };
    if parts.is_empty() || parts.len() > 2 {
        return Err(error(
            "TypeError: __setstate__ expected a tuple of 1 or 2 items",
        ));
    }
    let next = (parts.len() == 2).then(|| match parts.pop().expect("two parts") {
        Object::Ref(r) => Next::Ref(r),
        Object::None => Next::NoneObject,
        other => Next::Other(other),
    });
    let Object::Tuple(items) = parts.pop().expect("one part") else {
        return Err(error("TypeError: tuple required for first state element"));
    };
    if mapping {
        // `len /= 2`: an odd trailing item is ignored, as in C.
        let mut items = items.into_iter();
        while let (Some(k), Some(v)) = (items.next(), items.next()) {
            bucket.keys.push(Key::from_object(family.key, k)?);
            bucket.values.push(Value::from_object(family.value, v)?);
        }
    } else {
        for k in items {
            bucket.keys.push(Key::from_object(family.key, k)?);
        }
    }
    bucket.next = next;
    Ok(bucket)
}

/// `bucket_getstate`: `(items,)` or `(items, next)`.
fn get_state(keys: &[Key], values: Option<&[Value]>, next: &Option<Next>) -> Object {
    let mut items = Vec::with_capacity(keys.len() * if values.is_some() { 2 } else { 1 });
    match values {
        Some(values) => {
            for (k, v) in keys.iter().zip(values) {
                items.push(k.to_object());
                items.push(v.to_object());
            }
        }
        None => items.extend(keys.iter().map(Key::to_object)),
    }
    let mut state = vec![Object::Tuple(items)];
    if let Some(next) = next {
        state.push(next.to_object());
    }
    Object::Tuple(state)
}

/// A `SetIteration` over a bucket: `position` is 0 before the first `next()`, the index
/// of the current item plus one while active, -1 once exhausted.
struct Iter<'a> {
    bucket: &'a Bucket,
    position: i32,
    index: usize,
}

impl<'a> Iter<'a> {
    fn new(bucket: &'a Bucket) -> Self {
        Iter {
            bucket,
            position: 0,
            index: 0,
        }
    }

    fn next(&mut self) {
        if self.position >= 0 {
            if self.position as usize >= self.bucket.keys.len() {
                self.position = -1;
            } else {
                self.index = self.position as usize;
                self.position += 1;
            }
        }
    }

    fn active(&self) -> bool {
        self.position >= 0
    }

    fn key(&self) -> &'a Key {
        &self.bucket.keys[self.index]
    }

    fn value(&self) -> &'a Value {
        &self.bucket.values[self.index]
    }
}

/// The merged bucket's items.
struct Out {
    keys: Vec<Key>,
    values: Vec<Value>,
    mapping: bool,
}

impl Out {
    fn push(&mut self, it: &Iter) {
        self.keys.push(it.key().clone());
        if self.mapping {
            self.values.push(it.value().clone());
        }
    }
}

/// The interpreter around the merge: whether an exception is pending.
struct Interp {
    mapping: bool,
    object_keys: bool,
    pending: Option<String>,
}

impl Interp {
    fn state(&self) -> State {
        match self.pending {
            None => State::Normal,
            Some(_) => State::ErrorPending,
        }
    }

    /// `TEST_KEY_SET_OR(cmp, a, b) goto err`: object keys are compared, then checked
    /// for any exception, the pending one included; C integers and strings never fail.
    fn key_cmp(&mut self, a: &Key, b: &Key) -> Result<Ordering, Stop> {
        let order = a.cmp(b, self.state())?;
        match &self.pending {
            Some(e) if self.object_keys => Err(error(e)),
            _ => Ok(order),
        }
    }

    /// `set || TEST_VALUE(a, b) == 0`; a comparison that raises counts as a difference
    /// and leaves its exception pending.
    fn same(&mut self, a: &Iter, b: &Iter) -> Result<bool, Stop> {
        if !self.mapping {
            return Ok(true);
        }
        match a.value().same(b.value(), self.state()) {
            Ok(same) => Ok(same),
            Err(Fail::Raise(e)) => {
                self.pending = Some(e);
                Ok(false)
            }
            Err(Fail::Undecidable(why)) => Err(Stop::Undecidable(why)),
        }
    }
}

/// `bucket_merge(s1, s2, s3)`: old, committed, new.
fn bucket_merge(
    s1: &Bucket,
    s2: &Bucket,
    s3: &Bucket,
    mapping: bool,
    object_keys: bool,
) -> Result<Out, Stop> {
    if s2.keys.is_empty() || s3.keys.is_empty() {
        return Err(conflict(-1, -1, -1, 12));
    }
    let mut py = Interp {
        mapping,
        object_keys,
        pending: None,
    };
    let (mut i1, mut i2, mut i3) = (Iter::new(s1), Iter::new(s2), Iter::new(s3));
    let mut r = Out {
        keys: Vec::new(),
        values: Vec::new(),
        mapping,
    };
    i1.next();
    i2.next();
    i3.next();
    let err = |i1: &Iter, i2: &Iter, i3: &Iter, reason| {
        Err(conflict(i1.position, i2.position, i3.position, reason))
    };
    use Ordering::*;

    while i1.active() && i2.active() && i3.active() {
        let cmp12 = py.key_cmp(i1.key(), i2.key())?;
        let cmp13 = py.key_cmp(i1.key(), i3.key())?;
        if cmp12 == Equal {
            if cmp13 == Equal {
                if py.same(&i1, &i2)? {
                    // Changed in new, or all the same.
                    r.push(&i3);
                } else if py.same(&i1, &i3)? {
                    // Changed in committed.
                    r.push(&i2);
                } else {
                    return err(&i1, &i2, &i3, 1);
                }
                i1.next();
                i2.next();
                i3.next();
            } else if cmp13 == Greater {
                // Inserted in new.
                r.push(&i3);
                i3.next();
            } else if py.same(&i1, &i2)? {
                // Deleted in new. Deleting the first item changes the parent node.
                if i3.position == 1 {
                    return err(&i1, &i2, &i3, 13);
                }
                i1.next();
                i2.next();
            } else {
                // Deleted in new, changed in committed.
                return err(&i1, &i2, &i3, 2);
            }
        } else if cmp13 == Equal {
            if cmp12 == Greater {
                // Inserted in committed.
                r.push(&i2);
                i2.next();
            } else if py.same(&i1, &i3)? {
                // Deleted in committed.
                if i2.position == 1 {
                    return err(&i1, &i2, &i3, 13);
                }
                i1.next();
                i3.next();
            } else {
                // Deleted in committed, changed in new.
                return err(&i1, &i2, &i3, 3);
            }
        } else {
            // Both keys changed.
            let cmp23 = py.key_cmp(i2.key(), i3.key())?;
            if cmp23 == Equal {
                // Dueling inserts or deletes.
                return err(&i1, &i2, &i3, 4);
            }
            if cmp12 == Greater {
                if cmp23 == Greater {
                    r.push(&i3);
                    i3.next();
                } else {
                    r.push(&i2);
                    i2.next();
                }
            } else if cmp13 == Greater {
                r.push(&i3);
                i3.next();
            } else {
                // Both deleted the old key.
                return err(&i1, &i2, &i3, 5);
            }
        }
    }

    while i2.active() && i3.active() {
        // Inserts on both sides, past the old items.
        let cmp23 = py.key_cmp(i2.key(), i3.key())?;
        if cmp23 == Equal {
            return err(&i1, &i2, &i3, 6);
        }
        if cmp23 == Greater {
            r.push(&i3);
            i3.next();
        } else {
            r.push(&i2);
            i2.next();
        }
    }

    while i1.active() && i2.active() {
        // The rest of old deleted in new.
        let cmp12 = py.key_cmp(i1.key(), i2.key())?;
        if cmp12 == Greater {
            r.push(&i2);
            i2.next();
        } else if cmp12 == Equal && py.same(&i1, &i2)? {
            i1.next();
            i2.next();
        } else {
            return err(&i1, &i2, &i3, 7);
        }
    }

    while i1.active() && i3.active() {
        // The rest of old deleted in committed.
        let cmp13 = py.key_cmp(i1.key(), i3.key())?;
        if cmp13 == Greater {
            r.push(&i3);
            i3.next();
        } else if cmp13 == Equal && py.same(&i1, &i3)? {
            i1.next();
            i3.next();
        } else {
            return err(&i1, &i2, &i3, 8);
        }
    }

    if i1.active() {
        // Dueling deletes.
        return err(&i1, &i2, &i3, 9);
    }
    while i2.active() {
        r.push(&i2);
        i2.next();
    }
    while i3.active() {
        r.push(&i3);
        i3.next();
    }
    if r.keys.is_empty() {
        return err(&i1, &i2, &i3, 10);
    }
    if let Some(e) = py.pending {
        // `_p_resolveConflict` returns a state with an exception set.
        return Err(error(&format!(
            "SystemError: _p_resolveConflict returned a result with an exception set ({e})"
        )));
    }
    Ok(r)
}

/// `_bucket__p_resolveConflict` for a bucket (`mapping`) or set of `family`: the
/// resolved state.
pub fn resolve_bucket(
    family: &Family,
    mapping: bool,
    states: [Option<Object>; 3],
) -> Result<Object, Stop> {
    let [old, committed, new] = states;
    let b0 = set_state(family, mapping, old)?;
    let b1 = set_state(family, mapping, committed)?;
    let b2 = set_state(family, mapping, new)?;
    if !same_next(&b0.next, &b1.next)? || !same_next(&b0.next, &b2.next)? {
        return Err(conflict(-1, -1, -1, 0));
    }
    let object_keys = family.key == Kind::Object;
    let r = bucket_merge(&b0, &b1, &b2, mapping, object_keys)?;
    Ok(get_state(
        &r.keys,
        mapping.then_some(r.values.as_slice()),
        &b0.next,
    ))
}

/// `get_bucket_state`: the inline bucket state of a one-bucket tree; `None` for an empty
/// tree.
fn tree_bucket_state(state: Object) -> Result<Option<Object>, Stop> {
    let t = match state {
        Object::None => return Ok(None),
        Object::Tuple(t) => t,
        _ => {
            return Err(error(
                "TypeError: _p_resolveConflict: expected tuple or None for state",
            ))
        }
    };
    if t.len() == 2 {
        // A tree with more than one bucket (or a persistent bucket).
        return Err(conflict(-1, -1, -1, 11));
    }
    let [inner] = <[Object; 1]>::try_from(t)
        .map_err(|_| error("TypeError: _p_resolveConflict: expected 1- or 2-tuple for state"))?;
    let Object::Tuple(inner) = inner else {
        return Err(error(
            "TypeError: _p_resolveConflict: expected 1-tuple containing bucket state",
        ));
    };
    let [bucket] = <[Object; 1]>::try_from(inner).map_err(|_| {
        error("TypeError: _p_resolveConflict: expected 1-tuple containing bucket state")
    })?;
    match bucket {
        Object::Tuple(_) => Ok(Some(bucket)),
        _ => Err(error(
            "TypeError: _p_resolveConflict: expected tuple for bucket state",
        )),
    }
}

/// `BTree__p_resolveConflict`: only a tree whose single bucket is inline in its own
/// state is resolved, as that bucket; the result is `((bucket_state,),)`.
pub fn resolve_tree(family: &Family, mapping: bool, states: [Object; 3]) -> Result<Object, Stop> {
    let [old, committed, new] = states;
    let s0 = tree_bucket_state(old)?;
    let s1 = tree_bucket_state(committed)?;
    let s2 = tree_bucket_state(new)?;
    let bucket = resolve_bucket(family, mapping, [s0, s1, s2])?;
    Ok(Object::Tuple(vec![Object::Tuple(vec![bucket])]))
}

/// `Length._p_resolveConflict(old, s1, s2)`: `s1 + s2 - old` (committed plus new minus
/// old), with Python's int and float arithmetic.
pub fn resolve_length(states: [Object; 3]) -> Result<Object, Stop> {
    #[derive(Clone, Copy)]
    enum N {
        I(i128),
        F(f64),
    }
    let num = |o: &Object| match o {
        Object::Bool(b) => Some(N::I(i128::from(*b))),
        Object::Int(i) => Some(N::I(*i)),
        Object::Float(f) => Some(N::F(*f)),
        _ => None,
    };
    let [old, s1, s2] = states;
    let (Some(old), Some(s1), Some(s2)) = (num(&old), num(&s1), num(&s2)) else {
        // None, text, containers, references: `+` or `-` raises (str + str works, but
        // then str - str does not).
        return Err(error("TypeError: unsupported operand type(s)"));
    };
    let too_big = Stop::Undecidable("a Length beyond 128 bits");
    let float = |n: N| match n {
        N::I(i) => i as f64,
        N::F(f) => f,
    };
    let sum = match (s1, s2) {
        (N::I(a), N::I(b)) => N::I(a.checked_add(b).ok_or(too_big.clone())?),
        (a, b) => N::F(float(a) + float(b)),
    };
    Ok(match (sum, old) {
        (N::I(a), N::I(b)) => Object::Int(a.checked_sub(b).ok_or(too_big)?),
        (a, b) => Object::Float(float(a) - float(b)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::FAMILIES;

    fn family(prefix: &str) -> &'static Family {
        FAMILIES.iter().find(|f| f.prefix == prefix).unwrap()
    }

    fn ints(items: &[i128]) -> Option<Object> {
        Some(Object::Tuple(vec![Object::Tuple(
            items.iter().map(|&i| Object::Int(i)).collect(),
        )]))
    }

    fn items(state: &Object) -> Vec<i128> {
        let Object::Tuple(parts) = state else {
            panic!()
        };
        let Object::Tuple(items) = &parts[0] else {
            panic!()
        };
        items
            .iter()
            .map(|o| match o {
                Object::Int(i) => *i,
                _ => panic!(),
            })
            .collect()
    }

    #[test]
    fn disjoint_changes_merge() {
        let ii = family("II");
        // Committed changes 2's value and inserts 5; new deletes 3 and inserts 0.
        let r = resolve_bucket(
            ii,
            true,
            [
                ints(&[1, 10, 2, 20, 3, 30]),
                ints(&[1, 10, 2, 21, 3, 30, 5, 50]),
                ints(&[0, 0, 1, 10, 2, 20]),
            ],
        )
        .unwrap();
        assert_eq!(items(&r), vec![0, 0, 1, 10, 2, 21, 5, 50]);
    }

    #[test]
    fn refusals_carry_python_positions() {
        let ii = family("II");
        let refuse = |states| match resolve_bucket(ii, true, states) {
            Err(Stop::Refused(Refusal::BTrees { p1, p2, p3, reason })) => (p1, p2, p3, reason),
            other => panic!("{other:?}"),
        };
        // Both change key 2.
        assert_eq!(
            refuse([
                ints(&[1, 1, 2, 2]),
                ints(&[1, 1, 2, 3]),
                ints(&[1, 1, 2, 4])
            ]),
            (2, 2, 2, 1)
        );
        // Both insert key 3.
        assert_eq!(
            refuse([ints(&[1, 1]), ints(&[1, 1, 3, 3]), ints(&[1, 1, 3, 3])]),
            (-1, 2, 2, 6)
        );
        // New deletes the first key.
        assert_eq!(
            refuse([ints(&[1, 1, 2, 2]), ints(&[1, 1, 2, 2]), ints(&[2, 2])]),
            (1, 1, 1, 13)
        );
        // Committed emptied the bucket.
        assert_eq!(
            refuse([ints(&[1, 1]), ints(&[]), ints(&[1, 1])]),
            (-1, -1, -1, 12)
        );
    }

    #[test]
    fn length() {
        let l = |o, c, n| resolve_length([Object::Int(o), Object::Int(c), Object::Int(n)]);
        assert!(matches!(l(5, 7, 6), Ok(Object::Int(8))));
        assert!(matches!(
            resolve_length([Object::Int(1), Object::Float(2.5), Object::Int(1)]),
            Ok(Object::Float(f)) if f == 2.5
        ));
        assert!(resolve_length([Object::None, Object::Int(1), Object::Int(1)]).is_err());
    }
}
