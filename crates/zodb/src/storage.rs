//! The storage interface the server drives.
//!
//! It is shaped by how a ZEO server uses a storage, not by ZODB's Python `IStorage`:
//! a ZEO server buffers a client's stores until `vote` and then hands the storage the whole
//! transaction at once under the per-storage commit lock. That suits both implementations:
//! FileStorage writes the transaction in one go, and the upstream (proxy) storage forwards it
//! to the server behind it in one burst of pipelined messages.

use crate::{Oid, Result, StorageError, Tid};
use async_trait::async_trait;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Arc;

/// Identifies one transaction of one client session, unique for the server's lifetime.
/// Storages key their per-transaction state on it; the invalidation hub uses it to skip
/// the committer when fanning out.
pub type TxnKey = u64;

/// What `get_info` reports and the interfaces the storage provides.
#[derive(Debug, Clone, Default)]
pub struct StorageInfo {
    /// Number of objects (`len(storage)`).
    pub length: u64,
    /// Size in bytes (`getSize()`).
    pub size: u64,
    /// Human-readable storage name, e.g. the Data.fs path.
    pub name: String,
    pub supports_undo: bool,
    pub supports_record_iternext: bool,
    /// `(module, name)` of each interface implemented (`ZODB.interfaces`, ...), without
    /// `zope.interface.Interface`, which the server adds. Owned: a proxy reports what
    /// its upstream storage offers.
    pub interfaces: Vec<(String, String)>,
}

/// One revision of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub data: Bytes,
    /// The tid that wrote this revision (its serial).
    pub start: Tid,
    /// The tid of the next revision, `None` if this one is current.
    pub end: Option<Tid>,
}

/// The answer to `load_before`.
#[derive(Debug, Clone)]
pub struct LoadBefore {
    /// `None` when the object has no revision before the requested tid (it was created later).
    pub revision: Option<Loaded>,
    /// A tid such that every transaction up to it is reflected in `revision`: the storage's
    /// last transaction as read *before* the lookup. The server uses it to make sure a reply
    /// never reaches a client after an invalidation that makes it stale.
    pub snapshot: Tid,
}

/// One entry of `history(oid, size)`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub tid: Tid,
    pub user: Vec<u8>,
    pub description: Vec<u8>,
    /// Pickled extension dict (empty for an empty dict), as stored in the transaction.
    pub extension: Vec<u8>,
    /// Size of the record's pickle (0 for backpointers and deletions).
    pub size: u64,
}

/// The transaction-level data given at `tpc_begin`.
#[derive(Debug, Clone, Default)]
pub struct TransactionMeta {
    pub user: Vec<u8>,
    pub description: Vec<u8>,
    /// The extension dict, pickled with protocol 3 (empty bytes for an empty dict).
    pub extension: Vec<u8>,
    /// An explicit tid, for restore / `copyTransactionsFrom`; `None` lets the storage pick one.
    pub tid: Option<Tid>,
    /// Transaction status byte: `b' '` normally, `b'p'` when copying packed transactions.
    pub status: u8,
}

/// One buffered operation of a transaction, in the order the client sent it.
#[derive(Debug, Clone)]
pub enum TxnOp {
    /// `storea(oid, serial, data)`: `serial` is the revision the change was based on
    /// ([`Tid::ZERO`] for a new object).
    Store { oid: Oid, serial: Tid, data: Bytes },
    /// `checkCurrentSerialInTransaction(oid, serial)`.
    CheckCurrent { oid: Oid, serial: Tid },
    /// `deleteObject(oid, serial)` (external garbage collection).
    Delete { oid: Oid, serial: Tid },
    /// `restorea(oid, serial, data, prev_txn)`: write a revision as is, no conflict checks.
    Restore {
        oid: Oid,
        serial: Tid,
        data: Option<Bytes>,
        prev_txn: Option<Tid>,
    },
    /// `undoa(transaction_id)`: undo the transaction with that undo id.
    Undo { transaction_id: Vec<u8> },
    /// `storeBlobEnd` / `storeBlobShared`: a store (as [`TxnOp::Store`]) whose revision
    /// has a blob, the complete file at `file`. The file belongs to the caller, which
    /// removes it when the transaction ends: a storage keeps what it needs under names of
    /// its own (a hard link, on the same file system as [`Storage::blob_temp_dir`]).
    StoreBlob {
        oid: Oid,
        serial: Tid,
        data: Bytes,
        file: PathBuf,
    },
}

/// A client transaction as handed to the storage at vote.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub key: TxnKey,
    pub meta: TransactionMeta,
    pub ops: Vec<TxnOp>,
}

/// A write conflict returned to the client for it to resolve (ZEO's client-side conflict
/// resolution): it loads both serials, merges, stores the result and votes again.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub oid: Oid,
    /// The serial currently committed.
    pub committed: Tid,
    /// The serial the client's store was based on.
    pub read: Tid,
    /// The data the client sent.
    pub data: Bytes,
}

/// Outcome of a vote.
#[derive(Debug, Clone, PartialEq)]
pub enum Vote {
    /// The transaction is ready to commit. `changed` lists oids whose committed data will
    /// differ from what the client sent (undo), so the client does not cache its own copy.
    Ok { changed: Vec<Oid> },
    /// Conflicts for the client to resolve. The storage has dropped the attempt; the server
    /// keeps the buffered transaction and the client votes again.
    Conflicts(Vec<Conflict>),
}

/// One entry of `undoLog` / `undoInfo`: an undoable transaction, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct UndoEntry {
    pub tid: Tid,
    pub user: Vec<u8>,
    pub description: Vec<u8>,
    /// Pickled extension dict (empty for an empty dict), as stored in the transaction.
    pub extension: Vec<u8>,
    /// Size of the transaction record in bytes.
    pub size: u64,
}

impl UndoEntry {
    /// The undo id handed to clients: base64 of the tid without the newline, as
    /// Python's FileStorage makes it (`b'BA1A02769Ko='`).
    pub fn id(&self) -> Vec<u8> {
        undo_id(self.tid)
    }
}

/// Decides which transactions `undo_log` lists (`undoInfo`'s specification).
pub type UndoFilter = Box<dyn Fn(&UndoEntry) -> bool + Send + Sync>;

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 of the tid, padded, without a newline (`encodebytes(tid).rstrip()`).
pub fn undo_id(tid: Tid) -> Vec<u8> {
    let b = tid.to_bytes();
    let mut out = Vec::with_capacity(12);
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
    out
}

/// The tid of an undo id (`decodebytes(id + b'\n')`); whitespace is ignored, as Python's
/// decoder does. `None` unless it decodes to exactly 8 bytes.
pub fn tid_from_undo_id(id: &[u8]) -> Option<Tid> {
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::with_capacity(9);
    for &c in id {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            c if c.is_ascii_whitespace() => continue,
            _ => return None,
        };
        bits = (bits << 6) | v as u32;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
        if out.len() > 8 {
            return None;
        }
    }
    Tid::from_slice(&out)
}

/// A transaction as iteration reports it (`IStorageTransactionInformation`).
#[derive(Debug, Clone, PartialEq)]
pub struct TransactionInfo {
    pub tid: Tid,
    /// The status byte: `b' '` committed, `b'p'` packed.
    pub status: u8,
    pub user: Vec<u8>,
    pub description: Vec<u8>,
    /// Pickled extension dict (empty for an empty dict).
    pub extension: Vec<u8>,
}

/// A data record as iteration reports it (`IStorageRecordInformation`).
#[derive(Debug, Clone, PartialEq)]
pub struct DataRecord {
    pub oid: Oid,
    /// The record's serial.
    pub tid: Tid,
    /// The pickle, back pointers resolved; `None` when the object has no state (its
    /// creation undone, or deleted).
    pub data: Option<Bytes>,
    /// For a back pointer: the tid of the record it points at (one level only, as
    /// Python's iterator reports it).
    pub data_txn: Option<Tid>,
}

/// A forward iterator over transactions, seeing the storage as it was when it was made.
#[async_trait]
pub trait TransactionIterator: Send + Sync {
    /// The next transaction, `None` at the end.
    async fn next_transaction(&mut self) -> Result<Option<TransactionInfo>>;

    /// A new iterator over the data records of the transaction last returned by
    /// [`next_transaction`](Self::next_transaction); it stays valid when this iterator
    /// moves on, and may be made several times.
    async fn records(&self) -> Result<Box<dyn RecordIterator>>;
}

/// An iterator over the data records of one transaction.
#[async_trait]
pub trait RecordIterator: Send + Sync {
    /// The next record, `None` at the end.
    async fn next_record(&mut self) -> Result<Option<DataRecord>>;
}

/// One step of `record_iternext` (`IStorageCurrentRecordIteration`).
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentRecord {
    pub oid: Oid,
    pub tid: Tid,
    pub data: Bytes,
    /// The next oid in the storage, `None` after the last.
    pub next: Option<Oid>,
}

/// Receives every committed transaction, in tid order, before its data becomes visible to
/// loads. The server's invalidation hub implements it.
pub trait InvalidationSink: Send + Sync {
    /// `committer` is the local transaction that made the commit, if any: it must not be
    /// sent its own invalidation.
    fn invalidate(&self, tid: Tid, oids: &[Oid], committer: Option<TxnKey>);

    /// The storage moved to `tid` without being able to tell which objects changed (a
    /// proxy whose upstream cannot list them). Clients' caches cannot be trusted any
    /// more: the server must forget its recent-transactions queue and disconnect every
    /// client, so that each reconnects and, finding no history for its tid, drops its
    /// cache — what the stock server does in this situation.
    fn reset(&self, tid: Tid) {
        let _ = tid;
    }
}

/// A ZODB storage as served by the ZEO server.
///
/// Reads may run concurrently with each other and with a commit. `vote`, `finish` and
/// `abort` are called by the server with the per-storage commit lock held, so at most one
/// transaction is between `vote` and `finish`/`abort` at any time.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    fn info(&self) -> StorageInfo;

    fn is_read_only(&self) -> bool;

    /// The last committed tid ([`Tid::ZERO`] when empty).
    fn last_transaction(&self) -> Tid;

    /// Gives the storage the sink it must report commits to. Called once, before serving.
    fn attach(&self, sink: Arc<dyn InvalidationSink>);

    /// The revision of `oid` current just before `before`.
    /// Errors: [`StorageError::PosKey`] if the oid does not exist or was deleted as of then.
    async fn load_before(&self, oid: Oid, before: Tid) -> Result<LoadBefore>;

    /// The data of exactly revision `serial` of `oid`.
    async fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes>;

    /// Up to `size` revisions of `oid`, newest first.
    async fn history(&self, oid: Oid, size: usize) -> Result<Vec<HistoryEntry>>;

    /// `count` fresh oids.
    async fn new_oids(&self, count: usize) -> Result<Vec<Oid>>;

    /// Checks and stages `txn` (commit lock held). On `Ok(Vote::Ok)` the transaction must
    /// be committed by [`finish`](Self::finish) or dropped by [`abort`](Self::abort). On an
    /// error or [`Vote::Conflicts`] nothing is staged any more.
    async fn vote(&self, txn: &Transaction) -> Result<Vote>;

    /// Makes the voted transaction `key` durable and visible, reporting it to the sink
    /// (with `committer = Some(key)`) before loads can see it. Returns its tid.
    async fn finish(&self, key: TxnKey) -> Result<Tid>;

    /// Drops whatever `key` staged. Harmless if nothing is staged.
    async fn abort(&self, key: TxnKey);

    /// The last `count` transactions as `(tid, oids)`, oldest first, to seed the server's
    /// invalidation queue at start-up. Storages that cannot tell return an empty list.
    async fn recent_transactions(&self, count: usize) -> Result<Vec<(Tid, Vec<Oid>)>>;

    /// Every oid changed by transactions after `tid`, with the latest tid, when the storage
    /// can list them; `None` when it cannot (the client must then drop its cache).
    async fn invalidations_since(&self, _tid: Tid) -> Result<Option<(Tid, Vec<Oid>)>> {
        Ok(None)
    }

    /// Flushes and releases resources (index file, locks). Called once at shutdown.
    async fn close(&self) -> Result<()>;

    /// Storage-specific figures for the metrics endpoint (cache hits, upstream bytes...).
    fn metrics(&self) -> Vec<StorageMetric> {
        Vec::new()
    }

    /// Storage-specific fields added to `server_status` (a replicated storage's role and
    /// lag), as `(key, text)`.
    fn status(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// Undoable transactions, newest first: those at positions `first..last` (counted
    /// among the transactions `filter` accepts), with Python's normalisation of a
    /// negative `last` (`-n` means `n` entries). Storages without undo say so.
    async fn undo_log(
        &self,
        _first: i64,
        _last: i64,
        _filter: Option<UndoFilter>,
    ) -> Result<Vec<UndoEntry>> {
        Err(StorageError::Unsupported("undo"))
    }

    /// Iterates over the transactions with `start <= tid <= stop` (both inclusive,
    /// `None` unbounded), as committed when the iterator is made.
    async fn iterator(
        &self,
        _start: Option<Tid>,
        _stop: Option<Tid>,
    ) -> Result<Box<dyn TransactionIterator>> {
        Err(StorageError::Unsupported("iteration"))
    }

    /// The current record of the first oid `>= next` (from the start when `None`).
    /// Errors: [`StorageError::PosKey`] when that object has no current state, and
    /// [`StorageError::Value`] when there is no such oid.
    async fn record_iternext(&self, _next: Option<Oid>) -> Result<CurrentRecord> {
        Err(StorageError::Unsupported("record iteration"))
    }

    /// Packs away history before `pack_time` (POSIX seconds) and the objects not
    /// reachable from the root then. Returns when done; commits continue meanwhile.
    async fn pack(&self, _pack_time: f64) -> Result<()> {
        Err(StorageError::Unsupported("pack"))
    }

    /// Where uploaded blobs are written before they are committed (`storeBlobStart`),
    /// `None` when the storage has no blobs. It is on the file system the storage keeps
    /// its blobs on, so that committing a file is a rename or a hard link, never a copy.
    fn blob_temp_dir(&self) -> Option<PathBuf> {
        None
    }

    /// The directory in which a client sharing the storage's blob directory puts the
    /// file of `oid` it stores (`storeBlobShared`).
    fn blob_shared_dir(&self, _oid: Oid) -> Result<PathBuf> {
        Err(StorageError::Unsupported("shared blob directory"))
    }

    /// Opens the blob file of revision `serial` of `oid` for reading (`sendBlob`).
    /// Errors: [`StorageError::PosKey`] when there is no such revision or it has no
    /// blob file.
    async fn open_blob(&self, _oid: Oid, _serial: Tid) -> Result<std::fs::File> {
        Err(StorageError::Unsupported("blobs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undo_ids_are_python_base64() {
        // encodebytes(bytes.fromhex('040d416f7df07d22')).rstrip() == b'BA1Bb33wfSI='
        let tid = Tid(0x040d_416f_7df0_7d22);
        assert_eq!(undo_id(tid), b"BA1Bb33wfSI=".to_vec());
        assert_eq!(tid_from_undo_id(b"BA1Bb33wfSI="), Some(tid));
        assert_eq!(tid_from_undo_id(b"BA1Bb33wfSI=\n"), Some(tid));
        assert_eq!(tid_from_undo_id(b"BA1Bb33w"), None);
        assert_eq!(tid_from_undo_id(b"BA1Bb33wfSI=AAAA"), Some(tid));
        assert_eq!(tid_from_undo_id(b"BA1Bb33wfSIAAA=="), None);
        assert_eq!(tid_from_undo_id(b"!!!!"), None);
        for t in [0u64, 1, u64::MAX, 0x03f5_9458_1777_7777] {
            assert_eq!(tid_from_undo_id(&undo_id(Tid(t))), Some(Tid(t)));
        }
    }
}

/// One figure a storage reports for monitoring.
#[derive(Debug, Clone)]
pub struct StorageMetric {
    /// Metric name without the `zeors_` prefix, e.g. `cache_hits`.
    pub name: &'static str,
    pub help: &'static str,
    /// Counters only go up; gauges go both ways.
    pub counter: bool,
    pub value: f64,
}
