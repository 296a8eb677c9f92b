//! ZODB's FileStorage: reads and writes `Data.fs` byte-compatibly with Python ZODB 6.4
//! (see `shared/protocol/filestorage.md`), and serves it through [`zodb::Storage`].
//!
//! - [`FileStorage`] is what the server uses: the async trait, with disk work run on
//!   tokio's blocking pool.
//! - [`FileStorageCore`] is the same storage with a synchronous API, for tools and tests.
//!
//! Modules: [`format`](mod@format) (record layouts), [`index`] (the in-memory oid index),
//! [`index_file`] (Python's `.index` file), [`scan`] (open-time scan, torn-tail detection,
//! a strict checker), `commit` (turning a transaction into bytes, conflict rules),
//! [`io`] (the file abstraction) and [`sim`] (a file that simulates power loss).
//!
//! Not yet implemented: undo, pack, iteration, blobs.
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

mod commit;
mod error;
pub mod format;
pub mod index;
pub mod index_file;
pub mod io;
mod lock;
pub mod scan;
pub mod sim;
mod storage;

pub use error::Error;
pub use storage::{FileStorageCore, Options, INVALIDATIONS_MAX_TRANSACTIONS};

use async_trait::async_trait;
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;
use zodb::{
    HistoryEntry, InvalidationSink, LoadBefore, Oid, Result, Storage, StorageError, StorageInfo,
    Tid, Transaction, TxnKey, Vote,
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
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(|e| {
                StorageError::Io(std::io::Error::other(format!(
                    "FileStorage task failed: {e}"
                )))
            })?
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

    async fn load_before(&self, oid: Oid, before: Tid) -> Result<LoadBefore> {
        self.blocking(move |c| c.load_before(oid, before)).await
    }

    async fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes> {
        self.blocking(move |c| c.load_serial(oid, serial)).await
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
}

#[cfg(test)]
mod tests;
