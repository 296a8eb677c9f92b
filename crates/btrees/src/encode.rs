//! Writes a resolved state as `tryToResolveConflict` does: protocol 3, persistent
//! references written as the persistent ids they were read from (`persistent_id`
//! returns `PersistentReference.data`).
//!
//! Python's pickler memoizes, so its bytes differ from these (which use no memo); both
//! load to equal states. Values never share a list or dict (the decoder does not model
//! sharing), so writing without memo loses nothing.

use zodb::pickle::{op, Writer, ZODB_PROTOCOL};

use crate::object::Object;

/// The record: `class_pickle` (the new record's first pickle, unchanged, as Python
/// re-pickles the same class) followed by the state pickle.
pub fn record(class_pickle: &[u8], state: &Object) -> Vec<u8> {
    let mut out = class_pickle.to_vec();
    let mut w = Writer::new(&mut out);
    w.proto(ZODB_PROTOCOL);
    value(state, &mut w);
    w.op(op::STOP);
    out
}

fn value(o: &Object, w: &mut Writer) {
    match o {
        Object::None => w.none(),
        Object::Bool(b) => w.bool(*b),
        Object::Int(i) => w.int(*i),
        Object::Float(f) => w.float(*f),
        Object::Str(s) => w.text(s),
        Object::Bytes(b) => w.bytes(b),
        Object::Tuple(items) => w.tuple(items, |w, item| value(item, w)),
        Object::List(items) => w.list(items, |w, item| value(item, w)),
        Object::Dict(items) => w.dict(items, |w, (k, v)| {
            value(k, w);
            value(v, w);
        }),
        Object::Ref(r) => {
            value(&r.data, w);
            w.op(op::BINPERSID);
        }
        Object::Global { module, name } => w.global(module, name),
    }
}
