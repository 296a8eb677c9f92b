//! The one place where storage errors become wire exceptions.
//!
//! The Python client turns `(class_path, payload)` back into an exception through a fixed
//! factory table; payload shapes must match what that table expects exactly (a
//! `ConflictError` without `message`, `oid` and `serials` makes the client hang).

use crate::Value;
use zodb::StorageError;

/// Class path and payload for an error reply.
pub fn exception_for(err: &StorageError) -> (String, Value) {
    let args = |msg: String| Value::Tuple(vec![Value::Str(msg)]);
    match err {
        StorageError::PosKey(oid) => (
            "ZODB.POSException.POSKeyError".into(),
            Value::Tuple(vec![Value::from(*oid)]),
        ),
        StorageError::Conflict {
            oid,
            committed,
            read,
            class_name,
        } => {
            let mut d = conflict_dict("database conflict error", *oid, *committed, *read);
            if let (Some(c), Value::Dict(items)) = (class_name, &mut d) {
                for (k, v) in items.iter_mut() {
                    if *k == Value::str("class_name") {
                        *v = Value::str(c);
                    }
                }
            }
            ("ZODB.POSException.ConflictError".into(), d)
        }
        StorageError::ReadConflict {
            oid,
            committed,
            read,
        } => (
            "ZODB.POSException.ReadConflictError".into(),
            conflict_dict("database read conflict error", *oid, *committed, *read),
        ),
        StorageError::ReadOnly => (
            "ZODB.POSException.ReadOnlyError".into(),
            Value::Tuple(vec![]),
        ),
        StorageError::Transaction(msg) => (
            "ZODB.POSException.StorageTransactionError".into(),
            args(msg.clone()),
        ),
        StorageError::Undo { reason, oid } => (
            "ZODB.POSException.UndoError".into(),
            Value::dict([
                ("_reason", Value::Str(reason.clone())),
                ("_oid", oid.map(Value::from).unwrap_or(Value::None)),
            ]),
        ),
        StorageError::MultipleUndo(errs) => (
            "ZODB.POSException.MultipleUndoErrors".into(),
            Value::dict([(
                "_errs",
                Value::List(
                    errs.iter()
                        .map(|(oid, reason)| {
                            Value::Tuple(vec![Value::from(*oid), Value::Str(reason.clone())])
                        })
                        .collect(),
                ),
            )]),
        ),
        StorageError::Disconnected(msg) => (
            "ZEO.Exceptions.ClientDisconnected".into(),
            args(msg.clone()),
        ),
        StorageError::Quota => (
            "ZODB.FileStorage.FileStorage.FileStorageQuotaError".into(),
            args("The storage quota has been exceeded.".into()),
        ),
        StorageError::Value(msg) => ("builtins.ValueError".into(), args(msg.clone())),
        StorageError::Limit(msg) => ("ZODB.POSException.StorageError".into(), args(msg.clone())),
        StorageError::Unsupported(what) => (
            "builtins.NotImplementedError".into(),
            args(format!("not supported by this storage: {what}")),
        ),
        StorageError::Remote {
            class_path,
            message,
        } => (class_path.clone(), remote_payload(class_path, message)),
        StorageError::Corrupted(_) | StorageError::Io(_) => (
            "ZODB.POSException.StorageSystemError".into(),
            args(err.to_string()),
        ),
    }
}

/// Errors of the protocol itself rather than of the storage, each with the exception the
/// Python server raises in the same situation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// Arguments of the wrong type or number: Python raises `TypeError` calling the method.
    #[error("{0}")]
    BadArguments(String),
    /// A method the Python server lists but does not implement (`new_oid`).
    #[error("'ZEOStorage' object has no attribute '{0}'")]
    NoSuchAttribute(&'static str),
    /// `tpc_finish` for a transaction that does not hold the commit lock (not voted, or
    /// voted with conflicts the client gave up resolving).
    #[error("finished called wo lock")]
    FinishedWithoutLock,
    /// An iterator id this connection does not have (`KeyError(iid)`).
    #[error("{0}")]
    UnknownIterator(i64),
    /// `iterator_record_start` for a transaction other than the one its iterator is at.
    #[error("Out-of-order request for record iterator for transaction {0:?}")]
    OutOfOrderRecordIterator(Value),
}

/// Class path and payload for a protocol error, as the Python server sends them.
pub fn exception_for_protocol(err: &ProtocolError) -> (String, Value) {
    let class = match err {
        ProtocolError::BadArguments(_) => "builtins.TypeError",
        ProtocolError::NoSuchAttribute(_) => "builtins.AttributeError",
        ProtocolError::FinishedWithoutLock => "builtins.AssertionError",
        ProtocolError::UnknownIterator(_) => "builtins.KeyError",
        ProtocolError::OutOfOrderRecordIterator(_) => "builtins.Exception",
    };
    (
        class.into(),
        Value::Tuple(vec![Value::Str(err.to_string())]),
    )
}

/// The payload of an upstream exception passed on by a proxy, from its class and message.
/// The client builds a few classes from a dict and never answers the call if the keys are
/// missing (`ClientStorage`'s exception factories): those get a dict with every key it
/// reads; all others the usual argument tuple.
fn remote_payload(class_path: &str, message: &str) -> Value {
    match class_path {
        "ZODB.POSException.ConflictError" | "ZODB.POSException.ReadConflictError" => Value::dict([
            ("message", Value::str(message)),
            ("oid", Value::None),
            ("class_name", Value::None),
            ("serials", Value::None),
        ]),
        "ZODB.POSException.BTreesConflictError" => Value::dict([
            ("p1", Value::Int(-1)),
            ("p2", Value::Int(-1)),
            ("p3", Value::Int(-1)),
            ("reason", Value::Int(-1)),
        ]),
        "ZODB.POSException.MultipleUndoErrors" => Value::dict([(
            "_errs",
            Value::List(vec![Value::Tuple(vec![Value::None, Value::str(message)])]),
        )]),
        _ => Value::Tuple(vec![Value::Str(message.to_string())]),
    }
}

fn conflict_dict(message: &str, oid: zodb::Oid, committed: zodb::Tid, read: zodb::Tid) -> Value {
    Value::dict([
        ("message", Value::str(message)),
        ("oid", Value::from(oid)),
        ("class_name", Value::None),
        ("serials", crate::reply::serials(committed, read)),
    ])
}

/// Reverses [`exception_for`] for the errors a storage needs to recognise when they come
/// back from an upstream server (proxy mode). Unknown classes become
/// [`StorageError::Remote`] so they can be passed on unchanged.
pub fn error_from_exception(class_path: &str, payload: &Value) -> StorageError {
    // A reason is text, or (nested in `MultipleUndoErrors`) the `UndoError` itself: an
    // object in the pickle marshalling, `(class, state)` in msgpack.
    fn text(v: Option<&Value>) -> String {
        match v {
            Some(Value::Str(s)) => s.clone(),
            Some(Value::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::Object { state, .. }) => text(state.get("_reason")),
            Some(Value::Tuple(t)) if t.len() == 2 && t[1].get("_reason").is_some() => {
                text(t[1].get("_reason"))
            }
            Some(other) => format!("{other:?}"),
            None => String::new(),
        }
    }
    let first_arg = || -> Option<&Value> { payload.as_seq().and_then(|s| s.first()) };
    let oid_of = |v: Option<&Value>| {
        v.and_then(|v| v.as_bytes())
            .and_then(|b| zodb::Oid::from_slice(b))
    };
    let serials = || crate::reply::serials_of(payload.get("serials")?);
    let message = || match payload {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|v| match v {
                Value::Str(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => format!("{other:?}"),
    };
    match class_path {
        "ZODB.POSException.POSKeyError" => match oid_of(first_arg()) {
            Some(oid) => StorageError::PosKey(oid),
            None => StorageError::Remote {
                class_path: class_path.into(),
                message: message(),
            },
        },
        "ZODB.POSException.ConflictError" | "ZODB.POSException.ReadConflictError" => {
            match (oid_of(payload.get("oid")), serials()) {
                (Some(oid), Some((committed, read)))
                    if class_path.ends_with("ReadConflictError") =>
                {
                    StorageError::ReadConflict {
                        oid,
                        committed,
                        read,
                    }
                }
                (Some(oid), Some((committed, read))) => StorageError::Conflict {
                    oid,
                    committed,
                    read,
                    class_name: match payload.get("class_name") {
                        Some(Value::Str(c)) => Some(c.clone()),
                        Some(Value::Bytes(c)) => Some(String::from_utf8_lossy(c).into_owned()),
                        _ => None,
                    },
                },
                _ => StorageError::Remote {
                    class_path: class_path.into(),
                    message: message(),
                },
            }
        }
        "ZODB.POSException.ReadOnlyError" => StorageError::ReadOnly,
        "ZODB.POSException.StorageTransactionError" => StorageError::Transaction(message()),
        "ZODB.POSException.UndoError" if payload.get("_reason").is_some() => StorageError::Undo {
            reason: text(payload.get("_reason")),
            oid: oid_of(payload.get("_oid")),
        },
        "ZODB.POSException.MultipleUndoErrors" if payload.get("_errs").is_some() => {
            let errs = payload
                .get("_errs")
                .and_then(Value::as_seq)
                .map(|errs| {
                    errs.iter()
                        .filter_map(|e| {
                            let pair = e.as_seq()?;
                            Some((oid_of(pair.first())?, text(pair.get(1))))
                        })
                        .collect()
                })
                .unwrap_or_default();
            StorageError::MultipleUndo(errs)
        }
        _ => StorageError::Remote {
            class_path: class_path.into(),
            message: message(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zodb::{Oid, Tid};

    #[test]
    fn a_stock_servers_undo_errors_keep_their_reasons() {
        let undo_error = Value::Object {
            module: "ZODB.POSException".into(),
            name: "UndoError".into(),
            state: Box::new(Value::dict([
                ("_reason", Value::str("modified later")),
                ("_oid", Value::from(Oid(1))),
            ])),
        };
        let payload = Value::dict([(
            "_errs",
            Value::List(vec![Value::Tuple(vec![Value::from(Oid(1)), undo_error])]),
        )]);
        let e = error_from_exception("ZODB.POSException.MultipleUndoErrors", &payload);
        assert_eq!(
            format!("{e:?}"),
            format!(
                "{:?}",
                StorageError::MultipleUndo(vec![(Oid(1), "modified later".into())])
            )
        );
    }

    #[test]
    fn passed_on_exceptions_the_client_builds_from_a_dict_get_one() {
        for class in [
            "ZODB.POSException.ConflictError",
            "ZODB.POSException.ReadConflictError",
            "ZODB.POSException.BTreesConflictError",
            "ZODB.POSException.MultipleUndoErrors",
        ] {
            let (c, payload) = exception_for(&StorageError::Remote {
                class_path: class.into(),
                message: "from upstream".into(),
            });
            assert_eq!(c, class);
            assert!(matches!(payload, Value::Dict(_)), "{class}: {payload:?}");
        }
        let (_, payload) = exception_for(&StorageError::Remote {
            class_path: "builtins.ValueError".into(),
            message: "m".into(),
        });
        assert_eq!(payload, Value::Tuple(vec![Value::Str("m".into())]));
    }

    #[test]
    fn conflict_payload_has_what_the_client_factory_reads() {
        let (class, payload) = exception_for(&StorageError::Conflict {
            oid: Oid(1),
            committed: Tid(10),
            read: Tid(5),
            class_name: None,
        });
        assert_eq!(class, "ZODB.POSException.ConflictError");
        for key in ["message", "oid", "serials", "class_name"] {
            assert!(payload.get(key).is_some(), "missing {key}");
        }
        assert_eq!(
            payload.get("serials"),
            Some(&Value::Tuple(vec![
                Value::from(Tid(10)),
                Value::from(Tid(5))
            ]))
        );
    }

    #[test]
    fn round_trip_of_the_errors_a_proxy_passes_on() {
        for err in [
            StorageError::PosKey(Oid(7)),
            StorageError::Conflict {
                oid: Oid(1),
                committed: Tid(3),
                read: Tid(2),
                class_name: None,
            },
            StorageError::Conflict {
                oid: Oid(1),
                committed: Tid(3),
                read: Tid(2),
                class_name: Some("ZODB.tests.ConflictResolution.PCounter2".into()),
            },
            StorageError::ReadConflict {
                oid: Oid(1),
                committed: Tid(3),
                read: Tid(2),
            },
            StorageError::ReadOnly,
            StorageError::Undo {
                reason: "Some data were modified by a later transaction".into(),
                oid: Some(Oid(4)),
            },
            StorageError::MultipleUndo(vec![(Oid(1), "no".into()), (Oid(2), "never".into())]),
        ] {
            let (class, payload) = exception_for(&err);
            let back = error_from_exception(&class, &payload);
            assert_eq!(format!("{err:?}"), format!("{back:?}"));
        }
    }
}
