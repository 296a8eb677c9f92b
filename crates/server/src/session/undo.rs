//! `undoLog` and `undoInfo`, with Zope's filters (`undoInfo`'s specification, and
//! `ZopeUndo.Prefix` for the Undo tab).

use super::Session;
use crate::StorageHandle;
use std::sync::Arc;
use zeo_proto::reply::{undo_dict, UndoLog};
use zeo_proto::{Reply, Value};
use zodb::StorageError;

impl Session {
    /// `undoLog` / `undoInfo`: read in the background (a long log must not hold up the
    /// connection's other requests), as the stock server runs them in a thread.
    pub(super) fn undo_log(
        &mut self,
        handle: &Arc<StorageHandle>,
        msgid: Value,
        first: i64,
        last: i64,
        spec: Option<Value>,
    ) {
        let filter = spec.and_then(undo_filter);
        let storage = handle.storage.clone();
        self.spawn_call(msgid, async move {
            match storage.undo_log(first, last, filter).await {
                Ok(entries) => Ok(UndoLog(entries).to_value()),
                // Python answers an empty log for storages without undo.
                Err(StorageError::Unsupported(_)) => Ok(Value::Tuple(vec![])),
                Err(e) => Err(e),
            }
        });
    }
}

/// `undoInfo`'s specification as a filter: a transaction passes when, for every key of
/// the spec, its undo dict has an equal value (`desc.get(k) == v`). `None` and an empty
/// dict select everything.
///
/// A `ZopeUndo.Prefix` value (Zope's undo screen) matches the path prefix of a text
/// value. Python 3 ZODB stores user and description as bytes and `Prefix` then raises
/// `TypeError`; here bytes are read as UTF-8 so that the filter works as Zope intends.
fn undo_filter(spec: Value) -> Option<zodb::UndoFilter> {
    let items = match spec {
        Value::Dict(items) if !items.is_empty() => items,
        _ => return None,
    };
    Some(Box::new(move |entry: &zodb::UndoEntry| {
        let desc = undo_dict(entry);
        let Value::Dict(desc) = desc else {
            return false;
        };
        items.iter().all(|(k, v)| {
            let found = desc.iter().find(|(dk, _)| dk.py_eq(k)).map(|(_, dv)| dv);
            match v {
                Value::Object {
                    module,
                    name,
                    state,
                } if module == "ZopeUndo.Prefix" && name == "Prefix" => {
                    let text = match found {
                        Some(Value::Str(s)) => s.clone(),
                        Some(Value::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
                        _ => return false,
                    };
                    prefix_matches(state, &text)
                }
                _ => found.unwrap_or(&Value::None).py_eq(v),
            }
        })
    }))
}

/// `ZopeUndo.Prefix.__eq__`: the leading path segments of `other` (its last segment cut
/// at the last space, which separates a logged user name) equal the prefix's path.
fn prefix_matches(state: &Value, other: &str) -> bool {
    let path: Vec<&str> = match state.get("path").and_then(Value::as_seq) {
        Some(p) => p.iter().filter_map(Value::as_str).collect(),
        None => return false,
    };
    let length = state
        .get("length")
        .and_then(Value::as_int)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(path.len());
    let mut segments: Vec<&str> = other.split('/').collect();
    if let Some(last) = segments.last_mut() {
        if let Some(i) = last.rfind(' ') {
            *last = &last[..i];
        }
    }
    segments.truncate(length);
    segments == path
}
