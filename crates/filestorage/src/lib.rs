//! ZODB's FileStorage: reads and writes `Data.fs` byte-compatibly with Python ZODB 6.4
//! (see `shared/protocol/filestorage.md`), and serves it through [`zodb::Storage`].
//!
//! - [`FileStorage`] is what the server uses: the async trait, with disk work run on
//!   tokio's blocking pool.
//! - [`FileStorageCore`] is the same storage with a synchronous API, for tools and tests.
//!
//! Modules: [`format`](mod@format) (record layouts), [`index`] (the in-memory oid index),
//! [`index_file`] (Python's `.index` file), [`scan`] (open-time scan, torn-tail detection,
//! a strict checker), [`view`] (bounds-checked reads of committed data), [`iter`]
//! (transaction and record iteration), [`undo`] (undo log and transactional undo),
//! [`pack`] (pack with garbage collection), [`check`] (the offline `fstest`/`fsrefs`
//! checks), `commit` (turning a transaction into bytes, conflict rules), `paths` (the
//! files beside the `Data.fs`). Record pickles are read by [`zodb::refs`]. Every file
//! operation goes through [`fsio`], so the crash tests run the storage on a simulated disk.
//!
//! Blobs ([`Options::blob_dir`]) are kept as Python's FileStorage keeps them: one file per
//! revision in a `bushy` or `lawn` blob directory (see [`zodb::blob`]). A commit stages
//! the files (hard links in the blob directory's `tmp`, fsynced) at vote and renames them
//! into place, with a directory fsync, at finish *before* the status byte is written and
//! synced: a committed record always has its file, and an aborted transaction leaves none.
//! Files a crash leaves in place without a committed record are never served (`sendBlob`
//! checks that the revision exists). Undo links the undone-to revision's file under the
//! new tid; pack removes the files of the revisions it removes.
//!
//! ## Design in brief
//! - **Index**: Python's `fsIndex` layout (6-byte prefix → sorted 2-byte suffixes with
//!   48-bit positions), 8 bytes per object, loaded from and saved to `Data.fs.index` in
//!   Python's exact byte format. A load is an index lookup plus one or two positioned reads
//!   (header, then data); older revisions and back pointers add one read per hop.
//! - **Commit**: vote checks and writes the whole transaction with status `'c'` in one
//!   positioned write; finish flips the status byte and fdatasyncs (one sync per commit,
//!   like Python; [`Options::sync_on_vote`] adds a second one). Only the last operation
//!   on an oid in a transaction is written (one record per oid).
//! - **Recovery**: an unfinished or damaged *last* transaction is moved to `Data.fs.trN`
//!   and cut off at open; damage followed by a valid transaction refuses to open.

// Offsets and lengths here are read from and written to `Data.fs` and its index: an `as`
// cast that silently truncates, wraps or drops a sign reads the wrong bytes or writes a
// damaged file instead of failing. So casts that can lose information are refused in
// this crate (the workspace's `[lints]` cannot add lints per crate): a length from the
// file goes through `try_from` and is damage if it does not fit; one already bounded by
// a buffer in memory goes through [`format::mem_len`], which names the bound. The
// integration tests under `tests/` repeat these lines.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(clippy::cast_lossless)]

pub mod check;
mod commit;
mod error;
pub mod format;
pub mod index;
pub mod index_file;
pub mod iter;
pub mod pack;
mod paths;
pub mod scan;
mod storage;
pub mod undo;
pub mod view;

pub use error::Error;
pub use pack::{PackOptions, PackOutcome, PackStats};
pub use storage::{FileStorageCore, Options, INVALIDATIONS_MAX_TRANSACTIONS};
pub use undo::UndoResolution;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;
use zodb::{
    CurrentRecord, DataRecord, HistoryEntry, InvalidationSink, LoadBefore, Oid, RecordIterator,
    Result, Storage, StorageError, StorageInfo, Tid, Transaction, TransactionInfo,
    TransactionIterator, TxnKey, UndoEntry, UndoFilter, Vote,
};

/// A FileStorage served through the async [`Storage`] trait. Cheap to clone.
///
/// Every method that touches the disk runs on tokio's blocking pool (`spawn_blocking`),
/// loads included: a load is normally served from the page cache in a few microseconds,
/// but a cold read must not stall a runtime worker that other connections depend on.
/// Callers that prefer to read inline can use [`FileStorage::core`].
#[derive(Debug, Clone)]
pub struct FileStorage {
    core: Arc<FileStorageCore>,
}

impl FileStorage {
    /// Opens the storage at `path`. Blocks (it may scan the whole file); call it from a
    /// blocking context or before starting to serve.
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<FileStorage> {
        Ok(FileStorage::from_core(FileStorageCore::open(
            path, options,
        )?))
    }

    pub fn from_core(core: FileStorageCore) -> FileStorage {
        FileStorage {
            core: Arc::new(core),
        }
    }

    /// The synchronous storage underneath.
    pub fn core(&self) -> &Arc<FileStorageCore> {
        &self.core
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&FileStorageCore) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        run_blocking(self.core.clone(), f).await
    }
}

/// Runs `f` on tokio's blocking pool.
async fn run_blocking<T, F>(core: Arc<FileStorageCore>, f: F) -> Result<T>
where
    F: FnOnce(&FileStorageCore) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || f(&core))
        .await
        .map_err(|e| {
            StorageError::Io(std::io::Error::other(format!(
                "FileStorage task failed: {e}"
            )))
        })?
}

/// [`iter::TxnIter`] behind the async [`TransactionIterator`]: each step runs on the
/// blocking pool.
struct FsTxnIterator {
    core: Arc<FileStorageCore>,
    inner: Arc<Mutex<iter::TxnIter>>,
    last: Option<view::TxnAt>,
}

#[async_trait]
impl TransactionIterator for FsTxnIterator {
    async fn next_transaction(&mut self) -> Result<Option<TransactionInfo>> {
        let inner = self.inner.clone();
        let next = run_blocking(self.core.clone(), move |core| {
            inner.lock().next_txn().map_err(|e| core.err(e))
        })
        .await?;
        self.last = next.as_ref().map(|(t, _)| *t);
        Ok(next.map(|(_, info)| info))
    }

    async fn records(&self) -> Result<Box<dyn RecordIterator>> {
        let txn = self.last.ok_or_else(|| {
            StorageError::Value("no current transaction for a record iterator".into())
        })?;
        let view = self.inner.lock().view().clone();
        Ok(Box::new(FsRecordIterator {
            core: self.core.clone(),
            inner: Arc::new(Mutex::new(iter::RecordIter::new(view, txn))),
        }))
    }
}

/// [`iter::RecordIter`] behind the async [`RecordIterator`].
struct FsRecordIterator {
    core: Arc<FileStorageCore>,
    inner: Arc<Mutex<iter::RecordIter>>,
}

#[async_trait]
impl RecordIterator for FsRecordIterator {
    async fn next_record(&mut self) -> Result<Option<DataRecord>> {
        let inner = self.inner.clone();
        run_blocking(self.core.clone(), move |core| {
            inner.lock().next_record().map_err(|e| core.err(e))
        })
        .await
    }
}

#[async_trait]
impl Storage for FileStorage {
    fn info(&self) -> StorageInfo {
        self.core.info()
    }

    fn is_read_only(&self) -> bool {
        self.core.is_read_only()
    }

    fn last_transaction(&self) -> Tid {
        self.core.last_transaction()
    }

    fn attach(&self, sink: Arc<dyn InvalidationSink>) {
        self.core.attach(sink)
    }

    // Loads read on the calling thread. A load is an index lookup and one or two
    // positioned reads that the page cache nearly always serves; handing each to the
    // blocking pool cost more than the read itself (two thread switches per load, the
    // bulk of the server's CPU time under load, measured with perf). A cold read from
    // disk stalls one runtime worker for the duration of that read, as the Python
    // server's single thread would be stalled.
    async fn load_before(&self, oid: Oid, before: Tid) -> Result<LoadBefore> {
        self.core.load_before(oid, before)
    }

    async fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes> {
        self.core.load_serial(oid, serial)
    }

    async fn history(&self, oid: Oid, size: usize) -> Result<Vec<HistoryEntry>> {
        self.blocking(move |c| c.history(oid, size)).await
    }

    async fn new_oids(&self, count: usize) -> Result<Vec<Oid>> {
        // Memory only: no need for the blocking pool.
        self.core.new_oids(count)
    }

    async fn vote(&self, txn: &Transaction) -> Result<Vote> {
        let txn = txn.clone();
        self.blocking(move |c| c.vote(&txn)).await
    }

    async fn finish(&self, key: TxnKey) -> Result<Tid> {
        self.blocking(move |c| c.finish(key)).await
    }

    async fn abort(&self, key: TxnKey) {
        let _ = self
            .blocking(move |c| {
                c.abort(key);
                Ok(())
            })
            .await;
    }

    async fn recent_transactions(&self, count: usize) -> Result<Vec<(Tid, Vec<Oid>)>> {
        self.blocking(move |c| c.recent_transactions(count)).await
    }

    async fn invalidations_since(&self, tid: Tid) -> Result<Option<(Tid, Vec<Oid>)>> {
        self.blocking(move |c| c.invalidations_since(tid)).await
    }

    async fn close(&self) -> Result<()> {
        self.blocking(|c| c.close()).await
    }

    async fn undo_log(
        &self,
        first: i64,
        last: i64,
        filter: Option<UndoFilter>,
    ) -> Result<Vec<UndoEntry>> {
        self.blocking(move |c| c.undo_log(first, last, filter.as_ref()))
            .await
    }

    async fn iterator(
        &self,
        start: Option<Tid>,
        stop: Option<Tid>,
    ) -> Result<Box<dyn TransactionIterator>> {
        let it = self.blocking(move |c| c.iterator(start, stop)).await?;
        Ok(Box::new(FsTxnIterator {
            core: self.core.clone(),
            inner: Arc::new(Mutex::new(it)),
            last: None,
        }))
    }

    async fn record_iternext(&self, next: Option<Oid>) -> Result<CurrentRecord> {
        self.blocking(move |c| c.record_iternext(next)).await
    }

    fn blob_temp_dir(&self) -> Option<std::path::PathBuf> {
        self.core.blob_dir().map(|d| d.temp_dir())
    }

    fn blob_shared_dir(&self, oid: Oid) -> Result<std::path::PathBuf> {
        match (self.core.shared_blob_dir(), self.core.blob_dir()) {
            (Some(d), _) => Ok(d.oid_dir(oid)),
            (None, Some(_)) => Err(StorageError::Unsupported(
                "storeBlobShared (the blob directory is not configured as shared with clients: shared-blob-dir)",
            )),
            (None, None) => Err(StorageError::Unsupported("blobs")),
        }
    }

    async fn open_blob(&self, oid: Oid, serial: Tid) -> Result<std::fs::File> {
        self.blocking(move |c| c.open_blob(oid, serial)).await
    }

    async fn pack(&self, pack_time: f64) -> Result<()> {
        if !pack_time.is_finite() {
            return Err(StorageError::Value("Invalid pack time".into()));
        }
        let tid = zodb::timestamp::tid_from_unix(pack_time);
        self.blocking(move |c| c.pack(tid, PackOptions::gc(c.pack_gc())).map(|_| ()))
            .await
    }
}

#[cfg(test)]
mod tests;
