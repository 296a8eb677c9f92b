//! ZODB's vocabulary, shared by every zeors layer.
//!
//! This crate knows nothing about the wire or about sockets: it holds the identifiers
//! ([`Oid`], [`Tid`]), ZODB's timestamp arithmetic, the pickle opcodes, reader and
//! writer every pickle decoder shares ([`pickle`]), the [`Storage`] trait that the server
//! drives and that both the FileStorage and the upstream (proxy) storage implement, and the
//! [`StorageError`] type whose variants the protocol layer maps to the Python exception
//! classes ZEO clients expect.

pub mod blob;
mod error;
mod ids;
pub mod pickle;
pub mod progress;
pub mod refs;
mod storage;
pub mod timestamp;

pub use error::StorageError;
pub use ids::{Oid, Tid};
pub use storage::{
    tid_from_undo_id, undo_id, Conflict, CurrentRecord, DataRecord, HistoryEntry, InvalidationSink,
    LoadBefore, Loaded, RecordIterator, Storage, StorageInfo, StorageMetric, Transaction,
    TransactionInfo, TransactionIterator, TransactionMeta, TxnKey, TxnOp, UndoEntry, UndoFilter,
    Vote,
};

/// Result type used by storages.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
