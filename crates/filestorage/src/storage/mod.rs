//! The synchronous storage core: reads and the commit steps, with opening (index, scan,
//! recovery) in [`open`](self::open), the blob files of a commit in [`blobs`](self::blobs)
//! and the narrow API pack works through in [`for_pack`](self::for_pack).
//! [`crate::FileStorage`] wraps it for the async [`zodb::Storage`] trait.
//!
//! Every file and directory operation goes through the storage's [`fsio::Fs`] (the host's,
//! or a simulated disk in the crash tests).
//!
//! ## Concurrency
//! - The file handle, the index and the committed end live together in one `Live` under
//!   a read-write lock, because pack replaces all three at once. A read takes the lock only
//!   to look the oid up and to copy the handle and end into a [`FileView`]; it then reads
//!   without any lock, so it never waits for a commit's write or fsync, and after a pack it
//!   keeps reading the file its positions belong to.
//! - `vote`/`finish`/`abort`/`close` and pack's final swap serialise on the `commit` mutex
//!   (the server also holds a per-storage commit lock around vote…finish).
//! - `finish` publishes in this order, so a reader that sees a new index entry can read the
//!   record, and a load's `snapshot` (read before the lookup) never claims less than the
//!   data it returns was invalidated for: fsync → `data_end` → sink → index and snapshot
//!   (end + tid, used by walks, iteration and `info`) → `last_tid`.

mod blobs;
pub(crate) mod for_pack;
mod open;

use crate::commit::{self, CommittedState, Policy, Prepare};
use crate::error::Error;
use crate::format::{self, status, Magic, FIRST_TXN_POS};
use crate::index::Index;
use crate::iter::TxnIter;
use crate::paths;
use crate::scan::TornTail;
use crate::undo::UndoResolution;
use crate::view::{FileView, TxnAt};
use blobs::remove_files;
use bytes::Bytes;
use fsio::{FileIo, Fs};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use zodb::blob::BlobDir;
use zodb::{
    CurrentRecord, HistoryEntry, InvalidationSink, LoadBefore, Loaded, Oid, StorageError,
    StorageInfo, Tid, Transaction, TxnKey, UndoEntry, UndoFilter, Vote,
};

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// How far back [`FileStorageCore::invalidations_since`] walks before giving up and
/// telling the client to drop its cache: this many transactions. Each step reads one
/// transaction header and its data record headers; 100 000 typical transactions take
/// well under a second from the page cache, which is acceptable for a reconnect.
pub const INVALIDATIONS_MAX_TRANSACTIONS: usize = 100_000;

/// Options for [`FileStorageCore::open`] / [`crate::FileStorage::open`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Open without the lock file and never modify anything (a torn tail is ignored, not
    /// truncated). Loads, history and walks work; writes fail with `ReadOnly`.
    pub read_only: bool,
    /// Create an empty storage when the file does not exist. (Unlike Python's `create`,
    /// an existing file is never emptied.) A 0-byte file is always initialised.
    pub create: bool,
    /// Refuse commits whose records would start past this many bytes (`Quota` error).
    pub quota: Option<u64>,
    /// Also fdatasync the transaction at vote (two syncs per commit instead of one).
    ///
    /// With one sync (at finish, as Python does) a power loss during `finish` can, on a
    /// filesystem that writes pages back out of order, persist the status byte and the
    /// transaction's first and last pages but not a page in the middle. The open-time
    /// checks catch lost headers and trailers, but not a pickle that lost a middle page.
    /// Syncing at vote makes the data durable before the status byte can flip, closing
    /// that window at the cost of a second fdatasync per commit.
    pub sync_on_vote: bool,
    /// Which undo conflicts are offered to the client for resolution.
    pub undo_resolution: UndoResolution,
    /// Pack deletes `Data.fs.old` when done instead of keeping it (Python's
    /// `pack_keep_old = False`).
    pub pack_discard_old: bool,
    /// Packs through [`zodb::Storage::pack`] keep every object that exists at the pack
    /// time, reachable or not (Python's `pack_gc = False`).
    pub pack_without_gc: bool,
    /// The blob directory (Python's `blob_dir`): blobs are stored there in ZODB's layout
    /// (see [`zodb::blob`]); created when missing unless read-only. `None`: no blobs.
    pub blob_dir: Option<PathBuf>,
    /// Clients share the blob directory and may commit files they wrote into it
    /// (`storeBlobShared`). Off: only uploads are accepted, so that no client can make
    /// the server commit a file of the directory it did not send.
    pub shared_blob_dir: bool,
}

/// The file and what describes it, replaced as a whole by pack.
struct Live {
    io: Arc<dyn FileIo>,
    index: Index,
    /// Bound for record reads: the end of durable, committed data (runs ahead of
    /// `snap_end` during a finish).
    data_end: u64,
    /// The last published transaction and the end of the file after it.
    snap_end: u64,
    snap_tid: Tid,
}

/// A voted transaction waiting for finish or abort.
#[derive(Debug)]
struct Staged {
    key: TxnKey,
    tid: Tid,
    status: u8,
    pos: u64,
    end: u64,
    tindex: Vec<(Oid, u64)>,
    invalidated: Vec<Oid>,
    /// Blob files waiting in the blob directory's `tmp` for finish to move them into place,
    /// as `(oid, staged file)`.
    blobs: Vec<(Oid, PathBuf)>,
}

#[derive(Debug)]
struct CommitState {
    /// Where the next transaction goes (= the committed end).
    append_pos: u64,
    /// New tids are later than this; raised at every vote, so aborted tids are not reused.
    last_tid_used: Tid,
    staged: Option<Staged>,
    /// Pack is about to swap files: new votes wait until it is done (a few milliseconds).
    swap_pending: bool,
}

/// A FileStorage with a synchronous API. All methods may block on disk I/O.
pub struct FileStorageCore {
    name: String,
    /// The file system of the `Data.fs`, its neighbours and the blob directory.
    fs: Arc<dyn Fs>,
    /// The `Data.fs` path; `None` for storages over a bare [`FileIo`] (tests), which have
    /// no lock, `.index` or `.trN` files.
    path: Option<PathBuf>,
    read_only: bool,
    magic: Magic,
    quota: Option<u64>,
    sync_on_vote: bool,
    used_index: bool,
    /// A torn tail that a read-only open did not remove.
    ignored_tail: Option<TornTail>,
    undo_resolution: UndoResolution,
    pack_discard_old: bool,
    pack_without_gc: bool,
    /// The blob directory, when the storage has blobs.
    blobs: Option<BlobDir>,
    /// `storeBlobShared` is accepted (see [`Options::shared_blob_dir`]).
    shared_blob_dir: bool,
    live: RwLock<Live>,
    last_tid: AtomicU64,
    max_oid: Mutex<u64>,
    commit: Mutex<CommitState>,
    /// Signalled when a staged transaction is finished or aborted and when a pack swap
    /// ends.
    commit_cv: Condvar,
    /// Set while a pack runs: one at a time.
    packing: AtomicBool,
    sink: RwLock<Option<Arc<dyn InvalidationSink>>>,
    lock: Mutex<Option<fsio::Lock>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for FileStorageCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorageCore")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .field("last_tid", &self.last_transaction())
            .finish_non_exhaustive()
    }
}

impl FileStorageCore {
    fn corrupt(&self, pos: u64, what: impl std::fmt::Display) -> StorageError {
        StorageError::Corrupted(format!(
            "{}: damaged Data.fs at offset {pos}: {what}",
            self.name
        ))
    }

    pub(crate) fn err(&self, e: Error) -> StorageError {
        e.in_storage(&self.name)
    }

    /// The file system the storage's files are on.
    pub(crate) fn fs(&self) -> &Arc<dyn Fs> {
        &self.fs
    }

    /// Whether packs through [`zodb::Storage::pack`] collect garbage (Python's `pack_gc`).
    pub fn pack_gc(&self) -> bool {
        !self.pack_without_gc
    }

    /// The oids in the index, in order (the objects of the storage, deleted ones included).
    pub fn oids(&self) -> Vec<Oid> {
        self.live.read().index.iter().map(|(o, _)| o).collect()
    }

    /// Runs `f` on the index (tests compare it with a rebuilt one).
    #[cfg(test)]
    pub(crate) fn with_index<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.live.read().index)
    }

    /// The storage's name (its path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `Data.fs` path, `None` for storages over a bare [`FileIo`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the open used the saved `.index` (like Python's `_used_index`).
    pub fn used_index(&self) -> bool {
        self.used_index
    }

    /// The magic of the file.
    pub fn magic(&self) -> Magic {
        self.magic
    }

    pub fn last_transaction(&self) -> Tid {
        Tid(self.last_tid.load(Ordering::Acquire))
    }

    /// The end of the last committed transaction (`getSize()`).
    pub fn size(&self) -> u64 {
        self.live.read().snap_end
    }

    /// Number of objects, deleted ones included (`len(storage)`).
    pub fn len(&self) -> u64 {
        self.live.read().index.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn info(&self) -> StorageInfo {
        let (length, size) = {
            let live = self.live.read();
            (live.index.len() as u64, live.snap_end)
        };
        StorageInfo {
            length,
            size,
            name: self.name.clone(),
            supports_undo: true,
            supports_record_iternext: true,
            interfaces: [
                ("ZODB.interfaces", "IBlobStorageRestoreable"),
                ("ZODB.interfaces", "IBlobStorage"),
            ]
            .into_iter()
            .filter(|_| self.blobs.is_some())
            .chain([
                ("ZODB.interfaces", "IStorageRestoreable"),
                ("ZODB.interfaces", "IStorageIteration"),
                ("ZODB.interfaces", "IStorageUndoable"),
                ("ZODB.interfaces", "IStorageCurrentRecordIteration"),
                ("ZODB.interfaces", "IExternalGC"),
                ("ZODB.interfaces", "IStorage"),
            ])
            .map(|(m, n)| (m.to_string(), n.to_string()))
            .collect(),
        }
    }

    pub fn attach(&self, sink: Arc<dyn InvalidationSink>) {
        *self.sink.write() = Some(sink);
    }

    /// The committed data as of now: what iteration, undo and the walks read.
    pub fn view(&self) -> FileView {
        let live = self.live.read();
        FileView::new(live.io.clone(), live.snap_end)
    }

    /// The current index position of `oid` and a view to read its records with.
    fn lookup(&self, oid: Oid) -> Result<(FileView, u64)> {
        let live = self.live.read();
        let pos = live.index.get(oid).ok_or(StorageError::PosKey(oid))?;
        // data_end is read with the entry: finish publishes it before the index.
        Ok((FileView::new(live.io.clone(), live.data_end), pos))
    }

    /// The data of a record read with [`FileView::record_with_data`]: inline, or
    /// through its back pointer; `PosKey` when the object has no state there.
    fn data_of(
        &self,
        v: &FileView,
        oid: Oid,
        h: &format::DataHeader,
        inline: Option<Bytes>,
    ) -> Result<Bytes> {
        match inline {
            Some(d) => Ok(d),
            None => match v.load_back(oid, h.back).map_err(|e| self.err(e))? {
                Some(d) => Ok(d),
                None => Err(StorageError::PosKey(oid)),
            },
        }
    }

    /// docs/filestorage.md §3.5 `loadBefore`: the revision current just before `before`.
    pub fn load_before(&self, oid: Oid, before: Tid) -> Result<LoadBefore> {
        let snapshot = self.last_transaction();
        let (v, mut pos) = self.lookup(oid)?;
        let mut end = None;
        let (h, inline) = loop {
            let (h, inline) = v.record_with_data(oid, pos).map_err(|e| self.err(e))?;
            if h.tid < before {
                break (h, inline);
            }
            end = Some(h.tid);
            pos = v.prev_of(pos, &h).map_err(|e| self.err(e))?;
            if pos == 0 {
                return Ok(LoadBefore {
                    revision: None,
                    snapshot,
                });
            }
        };
        let data = self.data_of(&v, oid, &h, inline)?;
        Ok(LoadBefore {
            revision: Some(Loaded {
                data,
                start: h.tid,
                end,
            }),
            snapshot,
        })
    }

    /// The current revision: `(data, serial)`.
    pub fn load(&self, oid: Oid) -> Result<(Bytes, Tid)> {
        let (v, pos) = self.lookup(oid)?;
        let (h, inline) = v.record_with_data(oid, pos).map_err(|e| self.err(e))?;
        Ok((self.data_of(&v, oid, &h, inline)?, h.tid))
    }

    /// The data of revision `serial` of `oid`.
    pub fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes> {
        let (v, mut pos) = self.lookup(oid)?;
        loop {
            let (h, inline) = v.record_with_data(oid, pos).map_err(|e| self.err(e))?;
            if h.tid == serial {
                return self.data_of(&v, oid, &h, inline);
            }
            if h.tid < serial {
                return Err(StorageError::PosKey(oid));
            }
            pos = v.prev_of(pos, &h).map_err(|e| self.err(e))?;
            if pos == 0 {
                return Err(StorageError::PosKey(oid));
            }
        }
    }

    /// The serial of the current record (`getTid`); `PosKey` for deleted objects too.
    pub fn get_tid(&self, oid: Oid) -> Result<Tid> {
        let (v, pos) = self.lookup(oid)?;
        let h = v.record(oid, pos).map_err(|e| self.err(e))?;
        if h.plen == 0 && h.back == 0 {
            return Err(StorageError::PosKey(oid));
        }
        Ok(h.tid)
    }

    /// Up to `size` revisions of `oid`, newest first.
    pub fn history(&self, oid: Oid, size: usize) -> Result<Vec<HistoryEntry>> {
        let (v, mut pos) = self.lookup(oid)?;
        let mut out = Vec::new();
        while out.len() < size {
            let h = v.record(oid, pos).map_err(|e| self.err(e))?;
            if h.tloc >= pos {
                return Err(self.corrupt(pos, format!("bad transaction pointer {}", h.tloc)));
            }
            let t = v.txn_at(h.tloc).map_err(|e| self.err(e))?;
            let (user, description, extension) = v.txn_meta(&t).map_err(|e| self.err(e))?;
            out.push(HistoryEntry {
                tid: h.tid,
                user,
                description,
                extension,
                size: h.plen,
            });
            pos = v.prev_of(pos, &h).map_err(|e| self.err(e))?;
            if pos == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// `count` new oids, continuing from the largest oid in the storage.
    pub fn new_oids(&self, count: usize) -> Result<Vec<Oid>> {
        self.check_writable()?;
        let mut max = self.max_oid.lock();
        let mut out = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            *max = max
                .checked_add(1)
                .ok_or_else(|| StorageError::Value("oids exhausted".into()))?;
            out.push(Oid(*max));
        }
        Ok(out)
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Transaction("the storage is closed".into()));
        }
        Ok(())
    }

    /// Walks back from the end of `v` over at most `max` transactions, newest first, while
    /// `keep` accepts the header. Returns the transactions visited.
    fn walk_back(
        &self,
        v: &FileView,
        max: usize,
        mut keep: impl FnMut(&TxnAt) -> bool,
    ) -> Result<Vec<TxnAt>> {
        let mut out = Vec::new();
        let mut end = v.end();
        while end > FIRST_TXN_POS && out.len() < max {
            let t = v.txn_before(end).map_err(|e| self.err(e))?;
            if !keep(&t) {
                break;
            }
            end = t.pos;
            out.push(t);
        }
        Ok(out)
    }

    /// Oids of the data records of `t`, in file order.
    fn txn_oids(&self, v: &FileView, t: &TxnAt, out: &mut Vec<Oid>) -> Result<()> {
        if t.header.status == status::UNDONE {
            return Ok(());
        }
        for r in v.records(t) {
            out.push(r.map_err(|e| self.err(e))?.1.oid);
        }
        Ok(())
    }

    /// The last `count` transactions as `(tid, oids of their data records)`, oldest first.
    pub fn recent_transactions(&self, count: usize) -> Result<Vec<(Tid, Vec<Oid>)>> {
        let v = self.view();
        let txns = self.walk_back(&v, count, |_| true)?;
        let mut out = Vec::with_capacity(txns.len());
        for t in txns.into_iter().rev() {
            let mut oids = Vec::new();
            self.txn_oids(&v, &t, &mut oids)?;
            out.push((t.header.tid, oids));
        }
        // Called once, at start-up, to fill the invalidation queue: its transactions may
        // span much of a freshly generated or imported file.
        v.io.release_pages();
        Ok(out)
    }

    /// Every oid changed after `tid` (deduplicated, oldest change first) with the last tid;
    /// `None` when `tid` is older than the first transaction in the file or more than
    /// [`INVALIDATIONS_MAX_TRANSACTIONS`] transactions back.
    pub fn invalidations_since(&self, tid: Tid) -> Result<Option<(Tid, Vec<Oid>)>> {
        let (v, last) = {
            let live = self.live.read();
            (FileView::new(live.io.clone(), live.snap_end), live.snap_tid)
        };
        if tid >= last {
            return Ok(Some((last, Vec::new())));
        }
        let mut found = false;
        let txns = self.walk_back(&v, INVALIDATIONS_MAX_TRANSACTIONS, |t| {
            if t.header.tid > tid {
                true
            } else {
                found = true;
                false
            }
        })?;
        if !found {
            return Ok(None);
        }
        let mut oids = Vec::new();
        for t in txns.iter().rev() {
            self.txn_oids(&v, t, &mut oids)?;
        }
        let mut seen = HashSet::with_capacity(oids.len());
        oids.retain(|o| seen.insert(*o));
        Ok(Some((last, oids)))
    }

    /// `undoLog(first, last)` / `undoInfo` (with `filter`): undoable transactions, newest
    /// first, up to the last pack.
    pub fn undo_log(
        &self,
        first: i64,
        last: i64,
        filter: Option<&UndoFilter>,
    ) -> Result<Vec<UndoEntry>> {
        if self.packing.load(Ordering::Acquire) {
            return Err(commit::undo_disabled());
        }
        crate::undo::undo_log(&self.view(), first, last, filter).map_err(|e| self.err(e))
    }

    /// An iterator over the committed transactions with `start <= tid <= stop`.
    pub fn iterator(&self, start: Option<Tid>, stop: Option<Tid>) -> Result<TxnIter> {
        TxnIter::new(self.view(), start, stop).map_err(|e| self.err(e))
    }

    /// `record_iternext(next)`: the current record of the first oid `>= next`.
    pub fn record_iternext(&self, next: Option<Oid>) -> Result<CurrentRecord> {
        let (oid, following) = {
            let live = self.live.read();
            let from = next.unwrap_or(Oid(0));
            let (oid, _) = live
                .index
                .first_at_or_after(from)
                .ok_or_else(|| StorageError::Value("empty tree".into()))?;
            let following = oid
                .0
                .checked_add(1)
                .and_then(|n| live.index.first_at_or_after(Oid(n)))
                .map(|(o, _)| o);
            (oid, following)
        };
        let (data, tid) = self.load(oid)?;
        Ok(CurrentRecord {
            oid,
            tid,
            data,
            next: following,
        })
    }

    /// Checks `txn` against the committed state and writes it with status `'c'`.
    ///
    /// Conflict rules: a stale `Store` serial becomes a [`zodb::Conflict`] for the client
    /// to resolve (a later store of the oid replaces it); `CheckCurrent` →
    /// `ReadConflict`; `Delete` of a missing oid → `PosKey`, with a stale serial →
    /// `Conflict`; `Restore` is not checked; `Undo` follows [`crate::undo`]. Conflicts
    /// write nothing. Only the last operation on each oid is written.
    pub fn vote(&self, txn: &Transaction) -> Result<Vote> {
        self.vote_with(txn, &[], false)
    }

    /// Votes a transaction of replicated records: like [`vote`](Self::vote), with the
    /// blob files of its `Restore` operations (`restoreBlob`, moved into the blob
    /// directory at finish like any other), and with the restored oids invalidated, so
    /// that the clients of a replica learn of its primary's transactions.
    pub fn vote_restore(&self, txn: &Transaction, blobs: &[(Oid, PathBuf)]) -> Result<Vote> {
        self.vote_with(txn, blobs, true)
    }

    fn vote_with(
        &self,
        txn: &Transaction,
        restore_blobs: &[(Oid, PathBuf)],
        invalidate_restores: bool,
    ) -> Result<Vote> {
        let mut c = self.commit.lock();
        while c.swap_pending {
            self.commit_cv.wait(&mut c);
        }
        // Checked under the commit lock: `close` sets the flag and then takes the lock.
        self.check_writable()?;
        if let Some(s) = &c.staged {
            return Err(StorageError::Transaction(format!(
                "transaction {} is voted and not finished; cannot vote {}",
                s.key, txn.key
            )));
        }
        let last_committed = self.last_transaction();
        let tid = match txn.meta.tid {
            Some(t) => {
                zodb::timestamp::check_explicit_tid(
                    t,
                    last_committed,
                    zodb::timestamp::now_unix(),
                )
                .map_err(StorageError::Value)?;
                t
            }
            None => zodb::timestamp::new_tid(c.last_tid_used).ok_or_else(|| {
                StorageError::Value(format!(
                    "no transaction id after the last one used, {}: the file's tids are at the end of their range",
                    c.last_tid_used
                ))
            })?,
        };
        c.last_tid_used = c.last_tid_used.max(tid);
        let pos = c.append_pos;
        let mut stored_max = 0;
        let policy = Policy {
            quota: self.quota,
            resolution: Some(&self.undo_resolution),
            // Set by pack under this mutex before it takes its view (see `pack`).
            undo_disabled: self.packing.load(Ordering::Acquire),
            blobs: self.blobs.is_some(),
            restore_blobs,
            invalidate_restores,
        };
        let prepared = commit::prepare(txn, tid, pos, &policy, self, &mut stored_max)?;
        {
            // Stores of oids above the max raise it, as in Python.
            let mut max_oid = self.max_oid.lock();
            *max_oid = (*max_oid).max(stored_max);
        }
        let p = match prepared {
            Prepare::Conflicts(list) => return Ok(Vote::Conflicts(list)),
            Prepare::Ready(p) => p,
        };
        let end = pos + p.len();
        let blobs = self.stage_blobs(&p.blobs)?;
        // Stable while we hold the commit mutex: pack swaps files under it.
        let io = self.live.read().io.clone();
        let written = write_pieces(&*io, &p.pieces, pos).and_then(|()| {
            if self.sync_on_vote {
                io.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            tracing::error!(name = self.name, error = %e, "writing the transaction failed; truncating");
            self.truncate_to(&*io, pos);
            remove_files(&*self.fs, blobs.iter().map(|(_, f)| f.as_path()));
            return Err(e.into());
        }
        c.staged = Some(Staged {
            key: txn.key,
            tid: p.tid,
            status: p.status,
            pos,
            end,
            tindex: p.tindex,
            invalidated: p.invalidated,
            blobs,
        });
        Ok(Vote::Ok { changed: p.changed })
    }

    /// Cuts the file back to `pos` after a failed or aborted write; failures are logged
    /// (the bytes beyond `pos` are a `'c'` or torn tail that the next open removes).
    fn truncate_to(&self, io: &dyn FileIo, pos: u64) {
        if let Err(e) = io.set_len(pos) {
            tracing::error!(name = self.name, pos, error = %e, "could not truncate after a failed commit");
        }
    }

    /// Commits the voted transaction `key`: status byte, fdatasync, then the sink, then
    /// the index and the last tid become visible.
    pub fn finish(&self, key: TxnKey) -> Result<Tid> {
        let mut c = self.commit.lock();
        let s = match c.staged.take() {
            Some(s) if s.key == key => s,
            other => {
                c.staged = other;
                return Err(StorageError::Transaction(format!(
                    "finish of transaction {key}, which is not voted"
                )));
            }
        };
        let io = self.live.read().io.clone();
        // Blob files first: once the status byte says committed, the files must be there.
        let mut placed = Vec::new();
        let synced = self
            .place_blobs(s.tid, &s.blobs, &mut placed)
            .and_then(|()| io.write_all_at(&[s.status], s.pos + 16))
            .and_then(|()| io.sync_data());
        if let Err(e) = synced {
            tracing::error!(name = self.name, tid = %s.tid, error = %e, "commit failed; dropping the transaction");
            self.truncate_to(&*io, s.pos);
            if let Err(e) = io.sync_data() {
                tracing::error!(name = self.name, error = %e, "fsync after truncation failed too");
            }
            // Nothing refers to these files any more.
            remove_files(&*self.fs, s.blobs.iter().map(|(_, f)| f.as_path()));
            remove_files(&*self.fs, placed.iter().map(PathBuf::as_path));
            self.commit_cv.notify_all();
            return Err(e.into());
        }
        self.live.write().data_end = s.end;
        c.append_pos = s.end;
        let sink = self.sink.read().clone();
        if let Some(sink) = sink {
            // The transaction is durable: whatever the sink does, the storage must go on
            // to publish it, or later commits would write wrong `prev` pointers.
            let told = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sink.invalidate(s.tid, &s.invalidated, Some(key))
            }));
            if told.is_err() {
                tracing::error!(name = self.name, tid = %s.tid, "the invalidation sink panicked");
            }
        }
        let mut tindex = s.tindex;
        {
            let mut live = self.live.write();
            live.index.insert_batch(&mut tindex);
            live.snap_end = s.end;
            live.snap_tid = s.tid;
        }
        self.last_tid.store(s.tid.0, Ordering::Release);
        self.commit_cv.notify_all();
        Ok(s.tid)
    }

    /// Drops what `key` voted, if anything.
    pub fn abort(&self, key: TxnKey) {
        let mut c = self.commit.lock();
        if let Some(s) = c.staged.take_if(|s| s.key == key) {
            let io = self.live.read().io.clone();
            self.truncate_to(&*io, s.pos);
            remove_files(&*self.fs, s.blobs.iter().map(|(_, f)| f.as_path()));
            self.commit_cv.notify_all();
        }
    }

    /// Writes `<path>.index` for the committed state (no-op without a path or read-only).
    pub fn save_index(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if self.read_only {
            return Ok(());
        }
        // Hold the commit lock so that no finish moves the index past `end` meanwhile.
        let guard = self.commit.lock();
        let end = guard.append_pos;
        let live = self.live.read();
        crate::index_file::save(
            &*self.fs,
            &live.index,
            end,
            &paths::index(path),
            &paths::index_tmp(path),
        )
    }

    /// Aborts a voted transaction, saves the index and releases the lock. Later writes
    /// fail; reads keep working.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut c = self.commit.lock();
        if let Some(s) = c.staged.take() {
            tracing::warn!(
                name = self.name,
                key = s.key,
                "closing with a voted transaction; aborting it"
            );
            let io = self.live.read().io.clone();
            self.truncate_to(&*io, s.pos);
            remove_files(&*self.fs, s.blobs.iter().map(|(_, f)| f.as_path()));
        }
        drop(c);
        self.commit_cv.notify_all();
        let saved = self.save_index();
        *self.lock.lock() = None;
        saved.map_err(Into::into)
    }
}

impl CommittedState for FileStorageCore {
    fn position(&self, oid: Oid) -> Option<u64> {
        self.live.read().index.get(oid)
    }

    fn serial_at(&self, oid: Oid, pos: u64) -> Result<Tid> {
        let v = {
            let live = self.live.read();
            FileView::new(live.io.clone(), live.data_end)
        };
        Ok(v.record(oid, pos).map_err(|e| self.err(e))?.tid)
    }

    fn committed_view(&self) -> FileView {
        let live = self.live.read();
        FileView::new(live.io.clone(), live.data_end)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Writes `pieces` one after the other from `pos`.
fn write_pieces(io: &dyn FileIo, pieces: &[bytes::Bytes], pos: u64) -> std::io::Result<()> {
    let mut at = pos;
    for p in pieces {
        io.write_all_at(p, at)?;
        at += p.len() as u64;
    }
    Ok(())
}
