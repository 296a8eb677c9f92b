//! Storage errors. Each variant corresponds to one exception a ZODB application can see;
//! the protocol layer maps them to the class paths the Python client understands.

use crate::{Oid, Tid};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object does not exist, or has no state as of the requested time.
    #[error("POSKeyError: {0}")]
    PosKey(Oid),

    /// A write conflict that the client could not (or may not) resolve.
    #[error("database conflict error (oid {oid}{}, serial this txn started with {read}, serial currently committed {committed})",
            class_name.as_deref().map(|c| format!(", class {c}")).unwrap_or_default())]
    Conflict {
        oid: Oid,
        /// The serial currently committed.
        committed: Tid,
        /// The serial the transaction read (sent with its store).
        read: Tid,
        /// The object's class (`module.Name`), when known: a server that failed to
        /// resolve the conflict names it, as Python's `ConflictError` does.
        class_name: Option<String>,
    },

    /// `checkCurrentSerialInTransaction` found the object changed.
    #[error("database read conflict error (oid {oid})")]
    ReadConflict { oid: Oid, committed: Tid, read: Tid },

    /// A write on a read-only storage or connection.
    #[error("read-only storage")]
    ReadOnly,

    /// Misuse of the two-phase commit protocol.
    #[error("StorageTransactionError: {0}")]
    Transaction(String),

    /// An undo that cannot be done.
    #[error("UndoError: {reason}")]
    Undo { reason: String, oid: Option<Oid> },

    /// Several undo records failed.
    #[error("MultipleUndoErrors: {0:?}")]
    MultipleUndo(Vec<(Oid, String)>),

    /// The storage behind us (proxy mode) is not reachable.
    #[error("upstream disconnected: {0}")]
    Disconnected(String),

    /// The file is damaged.
    #[error("corrupted storage: {0}")]
    Corrupted(String),

    /// A commit would grow the file past its configured quota.
    #[error("the storage quota has been exceeded")]
    Quota,

    /// A request with a bad argument.
    #[error("{0}")]
    Value(String),

    /// A request refused because the connection reached one of the server's bounds
    /// (open iterators, ...): `ZODB.POSException.StorageError` with the reason.
    #[error("{0}")]
    Limit(String),

    /// The storage does not implement this call.
    #[error("not supported by this storage: {0}")]
    Unsupported(&'static str),

    /// An error from the storage behind a proxy that has no variant of its own, passed on
    /// with the class path the upstream server sent and its message.
    #[error("{class_path}: {message}")]
    Remote { class_path: String, message: String },

    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl StorageError {
    /// True for errors that say nothing about the storage's health (the client asked for
    /// something that isn't there or conflicted); used to pick log levels.
    pub fn is_expected(&self) -> bool {
        matches!(
            self,
            StorageError::PosKey(_)
                | StorageError::Conflict { .. }
                | StorageError::ReadConflict { .. }
                | StorageError::ReadOnly
                | StorageError::Undo { .. }
                | StorageError::MultipleUndo(_)
        )
    }
}
