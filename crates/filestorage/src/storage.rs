//! The synchronous storage core: opening (index, scan, recovery), reads, and the commit
//! steps. [`crate::FileStorage`] wraps it for the async [`zodb::Storage`] trait.
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

use crate::commit::{self, BlobSource, CommittedState, Policy, Prepare};
use crate::error::Error;
use crate::format::{self, status, Magic, FIRST_TXN_POS, MAGIC_FS30};
use crate::index::Index;
use crate::io::FileIo;
use crate::iter::TxnIter;
use crate::lock::LockFile;
use crate::scan::{self, Tail, TornTail};
use crate::undo::UndoResolution;
use crate::view::{FileView, TxnAt};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
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
}

/// The file and what describes it, replaced as a whole by pack.
pub(crate) struct Live {
    pub(crate) io: Arc<dyn FileIo>,
    pub(crate) index: Index,
    /// Bound for record reads: the end of durable, committed data (runs ahead of
    /// `snap_end` during a finish).
    pub(crate) data_end: u64,
    /// The last published transaction and the end of the file after it.
    pub(crate) snap_end: u64,
    pub(crate) snap_tid: Tid,
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
pub(crate) struct CommitState {
    /// Where the next transaction goes (= the committed end).
    pub(crate) append_pos: u64,
    /// New tids are later than this; raised at every vote, so aborted tids are not reused.
    last_tid_used: Tid,
    staged: Option<Staged>,
    /// Pack is about to swap files: new votes wait until it is done (a few milliseconds).
    pub(crate) swap_pending: bool,
}

impl CommitState {
    /// Whether a voted transaction waits for finish or abort.
    pub(crate) fn has_staged(&self) -> bool {
        self.staged.is_some()
    }
}

/// A FileStorage with a synchronous API. All methods may block on disk I/O.
pub struct FileStorageCore {
    name: String,
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
    pub(crate) undo_resolution: UndoResolution,
    pub(crate) pack_discard_old: bool,
    pub(crate) pack_without_gc: bool,
    /// The blob directory, when the storage has blobs.
    pub(crate) blobs: Option<BlobDir>,
    pub(crate) live: RwLock<Live>,
    last_tid: AtomicU64,
    max_oid: Mutex<u64>,
    pub(crate) commit: Mutex<CommitState>,
    /// Signalled when a staged transaction is finished or aborted and when a pack swap
    /// ends.
    pub(crate) commit_cv: Condvar,
    /// Set while a pack runs: one at a time.
    pub(crate) packing: AtomicBool,
    sink: RwLock<Option<Arc<dyn InvalidationSink>>>,
    lock: Mutex<Option<LockFile>>,
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

pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// An I/O error on `path`: std's error text never names the file, and "Permission
/// denied" alone does not tell an operator which of Data.fs, its `.lock`, `.index` or
/// `.trN` files to look at. The kind is kept.
pub(crate) fn io_at(path: &Path, e: io::Error) -> StorageError {
    StorageError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Names `path` in an I/O error that does not name it yet (other errors already do).
fn naming(path: &Path, e: StorageError) -> StorageError {
    match e {
        StorageError::Io(e) if !e.to_string().contains(&*path.to_string_lossy()) => io_at(path, e),
        e => e,
    }
}

pub(crate) fn corrupted(name: &str, e: Error) -> StorageError {
    match e {
        Error::Io(e) => StorageError::Io(e),
        e @ (Error::Corrupted { .. } | Error::Format(_)) => {
            StorageError::Corrupted(format!("{name}: {e}"))
        }
        other => other.into(),
    }
}

/// fsyncs a directory so that a newly created or renamed entry survives a crash.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl FileStorageCore {
    /// Opens (or creates, see [`Options::create`]) the FileStorage at `path`.
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<FileStorageCore> {
        let path = path.as_ref();
        if options.read_only && options.create {
            return Err(StorageError::Value(
                "can't create a read-only FileStorage".into(),
            ));
        }
        let lock = if options.read_only {
            None
        } else {
            let lock_path = sibling(path, ".lock");
            Some(LockFile::acquire(&lock_path).map_err(|e| naming(&lock_path, e.into()))?)
        };
        let file = if options.read_only {
            File::open(path).map_err(|e| io_at(path, e))?
        } else {
            match OpenOptions::new().read(true).write(true).open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound && options.create => {
                    Self::create(path).map_err(|e| io_at(path, e))?
                }
                Err(e) => return Err(io_at(path, e)),
            }
        };
        let io = Arc::new(crate::io::MappedFile::new(file).map_err(|e| io_at(path, e))?);
        let mut core = Self::open_inner(
            io.clone(),
            path.display().to_string(),
            Some(path.to_owned()),
            options,
        )
        .map_err(|e| naming(path, e))?;
        io.release_pages();
        *core.lock.get_mut() = lock;
        Ok(core)
    }

    /// Creates a new, empty storage file at `path`.
    fn create(path: &Path) -> io::Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        // The magic at once, so a crash right after creation leaves a valid, empty
        // storage; then the directory entry.
        std::os::unix::fs::FileExt::write_all_at(&f, &MAGIC_FS30, 0)?;
        f.sync_data()?;
        sync_dir(path)?;
        tracing::info!(path = %path.display(), "created a new FileStorage");
        Ok(f)
    }

    /// The damaged tail this read-only storage left in place (a writable open moves it to
    /// `.trN` instead): `zeors info` tells it.
    pub fn ignored_tail(&self) -> Option<&TornTail> {
        self.ignored_tail.as_ref()
    }

    /// Opens a storage over any [`FileIo`] (e.g. a [`crate::sim::SimFile`]). There is no
    /// lock file and no `.index`; bytes cut off a torn tail are logged, not kept.
    pub fn open_io(io: Arc<dyn FileIo>, name: &str, options: Options) -> Result<FileStorageCore> {
        Self::open_inner(io, name.to_owned(), None, options)
    }

    fn open_inner(
        io: Arc<dyn FileIo>,
        name: String,
        path: Option<PathBuf>,
        options: Options,
    ) -> Result<FileStorageCore> {
        let (magic, size) = read_magic(&*io, &name, options.read_only)?;
        if magic == Magic::Fs21 && !options.read_only {
            return Err(StorageError::Value(format!(
                "{name} is an FS21 (Python 2) file: open it read-only, or convert it with \
                 zodbupdate --convert-py3 first"
            )));
        }
        let saved = path
            .as_deref()
            .and_then(|p| load_saved_index(&*io, p, size));
        let used_index = saved.is_some();
        let (mut index, start, ltid) = saved.unwrap_or((Index::new(), FIRST_TXN_POS, Tid::ZERO));

        let outcome = if size <= FIRST_TXN_POS {
            scan::ScanOutcome {
                end: FIRST_TXN_POS,
                last_tid: ltid,
                transactions: 0,
                tail: None,
            }
        } else {
            scan::scan(&*io, &name, size, start, ltid, &mut index)
                .map_err(|e| corrupted(&name, e))?
        };
        if !used_index {
            index.shrink_to_fit();
        }
        let mut ignored_tail = None;
        if let Some(tail) = outcome.tail {
            let torn = TornTail {
                tail,
                file_size: size,
            };
            if options.read_only {
                tracing::warn!("{name}: {torn}; left in place (opened read-only)");
                ignored_tail = Some(torn);
            } else {
                recover_tail(&*io, &name, path.as_deref(), &torn)?;
            }
        }
        let end = outcome.end;
        let last_tid = outcome.last_tid;
        tracing::debug!(
            name,
            end,
            transactions = outcome.transactions,
            used_index,
            "opened"
        );

        let now = zodb::timestamp::tid_from_unix(zodb::timestamp::now_unix());
        if last_tid > now {
            let secs = zodb::timestamp::tid_to_unix(last_tid) - zodb::timestamp::tid_to_unix(now);
            if secs > 30.0 * 60.0 {
                tracing::error!(name, seconds = secs, "database records in the future");
            } else {
                tracing::warn!(name, seconds = secs, "database records in the future");
            }
        }

        let blobs = match &options.blob_dir {
            Some(dir) => Some(open_blob_dir(dir, options.read_only)?),
            None => None,
        };
        let max_oid = index.max_oid().map_or(0, |o| o.0);
        let core = FileStorageCore {
            name,
            path,
            read_only: options.read_only,
            magic,
            quota: options.quota,
            sync_on_vote: options.sync_on_vote,
            used_index,
            ignored_tail,
            undo_resolution: options.undo_resolution,
            pack_discard_old: options.pack_discard_old,
            pack_without_gc: options.pack_without_gc,
            blobs,
            live: RwLock::new(Live {
                io,
                index,
                data_end: end,
                snap_end: end,
                snap_tid: last_tid,
            }),
            last_tid: AtomicU64::new(last_tid.0),
            max_oid: Mutex::new(max_oid),
            commit: Mutex::new(CommitState {
                append_pos: end,
                last_tid_used: last_tid,
                staged: None,
                swap_pending: false,
            }),
            commit_cv: Condvar::new(),
            packing: AtomicBool::new(false),
            sink: RwLock::new(None),
            lock: Mutex::new(None),
            closed: AtomicBool::new(false),
        };
        if !used_index && !core.read_only {
            // Python saves after a rebuild too; the next open (ours or Python's) is fast.
            if let Err(e) = core.save_index() {
                tracing::warn!(name = core.name, error = %e, "could not save the index");
            }
        }
        Ok(core)
    }

    fn corrupt(&self, pos: u64, what: impl std::fmt::Display) -> StorageError {
        StorageError::Corrupted(format!(
            "{}: damaged Data.fs at offset {pos}: {what}",
            self.name
        ))
    }

    pub(crate) fn err(&self, e: Error) -> StorageError {
        corrupted(&self.name, e)
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

    /// Spec §3.5 `loadBefore`: the revision current just before `before`.
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
        let end = pos + p.bytes.len() as u64;
        let blobs = self.stage_blobs(&p.blobs)?;
        // Stable while we hold the commit mutex: pack swaps files under it.
        let io = self.live.read().io.clone();
        let written = io.write_all_at(&p.bytes, pos).and_then(|()| {
            if self.sync_on_vote {
                io.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            tracing::error!(name = self.name, error = %e, "writing the transaction failed; truncating");
            self.truncate_to(&*io, pos);
            remove_files(blobs.iter().map(|(_, f)| f.as_path()));
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
            remove_files(s.blobs.iter().map(|(_, f)| f.as_path()));
            remove_files(placed.iter().map(PathBuf::as_path));
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
            remove_files(s.blobs.iter().map(|(_, f)| f.as_path()));
            self.commit_cv.notify_all();
        }
    }

    /// Gives each blob file of a transaction about to be written a name of the storage's
    /// own in the blob directory's `tmp` (a hard link to the client's file, or to the
    /// committed file an undo copies), fsynced. Nothing is visible yet; finish moves them
    /// into place, abort removes them.
    fn stage_blobs(&self, blobs: &[(Oid, BlobSource)]) -> Result<Vec<(Oid, PathBuf)>> {
        if blobs.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self
            .blobs
            .as_ref()
            .ok_or(StorageError::Unsupported("blobs"))?;
        let mut staged = Vec::with_capacity(blobs.len());
        for (oid, src) in blobs {
            let source = match src {
                BlobSource::File(p) => p.clone(),
                BlobSource::Revision(t) => dir.blob_path(*oid, *t),
            };
            let tmp = dir.new_temp_path("staged");
            let linked =
                zodb::blob::link_or_copy(&source, &tmp).and_then(|()| File::open(&tmp)?.sync_all());
            if let Err(e) = linked {
                remove_files(staged.iter().map(|(_, f): &(Oid, PathBuf)| f.as_path()));
                remove_files([tmp.as_path()]);
                return Err(match (src, e.kind()) {
                    // Python's undo: "No blob file" (POSKeyError).
                    (BlobSource::Revision(_), io::ErrorKind::NotFound) => {
                        StorageError::PosKey(*oid)
                    }
                    (BlobSource::File(p), io::ErrorKind::NotFound) => StorageError::Value(format!(
                        "the blob file {} for oid {oid} does not exist",
                        p.display()
                    )),
                    _ => e.into(),
                });
            }
            staged.push((*oid, tmp));
        }
        Ok(staged)
    }

    /// Moves the staged blob files of transaction `tid` to their final names, read-only,
    /// and fsyncs their directories. Each file placed is added to `placed`, so that a
    /// failure can take them back.
    fn place_blobs(
        &self,
        tid: Tid,
        staged: &[(Oid, PathBuf)],
        placed: &mut Vec<PathBuf>,
    ) -> io::Result<()> {
        let Some(dir) = &self.blobs else {
            return Ok(());
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (oid, tmp) in staged {
            let oid_dir = dir.oid_dir(*oid);
            zodb::blob::create_dir_all_synced(&oid_dir)?;
            let target = dir.blob_path(*oid, tid);
            std::fs::rename(tmp, &target)?;
            placed.push(target.clone());
            zodb::blob::set_not_writable(&target)?;
            if !dirs.contains(&oid_dir) {
                dirs.push(oid_dir);
            }
        }
        for d in &dirs {
            zodb::blob::sync_dir(d)?;
        }
        Ok(())
    }

    /// The blob directory, when the storage has blobs.
    pub fn blob_dir(&self) -> Option<&BlobDir> {
        self.blobs.as_ref()
    }

    /// Opens the blob file of revision `serial` of `oid` (`loadBlob`). Only revisions the
    /// storage has committed are served: a file left behind by a crash between placing
    /// blobs and committing is never visible. Errors: `PosKey` when there is no such
    /// revision or no file.
    pub fn open_blob(&self, oid: Oid, serial: Tid) -> Result<File> {
        let dir = self
            .blobs
            .as_ref()
            .ok_or(StorageError::Unsupported("blobs"))?;
        if !self.has_revision(oid, serial)? {
            return Err(StorageError::PosKey(oid));
        }
        match File::open(dir.blob_path(oid, serial)) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::PosKey(oid)),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `oid` has a committed record written by transaction `serial`.
    pub fn has_revision(&self, oid: Oid, serial: Tid) -> Result<bool> {
        let (v, mut pos) = match self.lookup(oid) {
            Ok(found) => found,
            Err(StorageError::PosKey(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        loop {
            let h = v.record(oid, pos).map_err(|e| self.err(e))?;
            if h.tid == serial {
                return Ok(true);
            }
            if h.tid < serial {
                return Ok(false);
            }
            pos = v.prev_of(pos, &h).map_err(|e| self.err(e))?;
            if pos == 0 {
                return Ok(false);
            }
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
            &live.index,
            end,
            &sibling(path, ".index"),
            &sibling(path, ".index.index_tmp"),
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
            remove_files(s.blobs.iter().map(|(_, f)| f.as_path()));
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

/// Opens the blob directory; a writable storage creates it and removes the temporary
/// files an earlier run left behind.
fn open_blob_dir(dir: &Path, read_only: bool) -> Result<BlobDir> {
    let context = |e: io::Error| {
        StorageError::Io(io::Error::new(
            e.kind(),
            format!("blob directory {}: {e}", dir.display()),
        ))
    };
    let blobs = BlobDir::open(dir, !read_only).map_err(context)?;
    if !read_only {
        let n = blobs.clean_temp().map_err(context)?;
        if n > 0 {
            tracing::info!(dir = %blobs.temp_dir().display(), files = n, "removed temporary blob files left by an earlier run");
        }
    }
    tracing::info!(dir = %blobs.root().display(), layout = blobs.layout().name(), "blob directory");
    Ok(blobs)
}

/// Removes files that nothing refers to any more; failures are logged.
pub(crate) fn remove_files<'a>(paths: impl IntoIterator<Item = &'a Path>) {
    for p in paths {
        if let Err(e) = zodb::blob::remove_if_exists(p) {
            tracing::warn!(file = %p.display(), error = %e, "could not remove a blob file");
        }
    }
}

/// Reads the magic, initialising an empty file (writable). Returns it with the file size.
fn read_magic(io: &dyn FileIo, name: &str, read_only: bool) -> Result<(Magic, u64)> {
    let size = io.size()?;
    if size == 0 {
        if read_only {
            return Ok((Magic::Fs30, 0));
        }
        io.write_all_at(&MAGIC_FS30, 0)?;
        io.sync_data()?;
        return Ok((Magic::Fs30, 4));
    }
    if size < 4 {
        return Err(Error::Format(format!("{name} is {size} bytes, too short for a magic")).into());
    }
    let mut m = [0u8; 4];
    io.read_exact_at(&mut m, 0)?;
    let magic = Magic::parse(m)
        .ok_or_else(|| Error::Format(format!("{name} starts with {m:02x?}, not FS30 or FS21")))?;
    Ok((magic, size))
}

/// `<path>.index` when it parses and passes the sanity check: `(index, pos, tid at pos)`.
/// Any problem just means "no index" (the file is scanned instead).
fn load_saved_index(io: &dyn FileIo, path: &Path, size: u64) -> Option<(Index, u64, Tid)> {
    let ipath = sibling(path, ".index");
    if !ipath.exists() {
        return None;
    }
    match crate::index_file::load(&ipath) {
        Ok((pos, index)) => match scan::check_index_sanity(io, size, &index, pos) {
            Some(tid) => Some((index, pos, tid)),
            None => {
                tracing::warn!(index = %ipath.display(), "ignoring index: it does not match the data file");
                None
            }
        },
        Err(e) => {
            tracing::warn!(index = %ipath.display(), error = %e, "ignoring index");
            None
        }
    }
}

/// Removes a damaged tail at open (writable): the cut bytes go to the first free
/// `<path>.trN` (not for a fragment shorter than a header, as in Python).
fn recover_tail(io: &dyn FileIo, name: &str, path: Option<&Path>, torn: &TornTail) -> Result<()> {
    let pos = torn.tail.pos();
    let size = torn.file_size;
    match (&torn.tail, path) {
        // Python truncates a fragment without keeping a copy.
        (Tail::Short { .. }, _) => tracing::warn!("{name}: {torn}; truncating it"),
        (Tail::Torn { .. }, Some(path)) => {
            let kept = save_cut_bytes(io, path, pos, size)?;
            tracing::warn!(
                "{name}: {torn}; moved to {} and cut off (the transactions before it are intact)",
                kept.display()
            );
        }
        (Tail::Torn { .. }, None) => tracing::warn!("{name}: {torn}; discarding it"),
    }
    io.set_len(pos)?;
    io.sync_data()?;
    Ok(())
}

/// Copies `[pos, size)` into the first `<path>.trN` that does not exist yet.
fn save_cut_bytes(io: &dyn FileIo, path: &Path, pos: u64, size: u64) -> Result<PathBuf> {
    for i in 0u32.. {
        let tr = sibling(path, &format!(".tr{i}"));
        let mut f = match OpenOptions::new().write(true).create_new(true).open(&tr) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_at(&tr, e)),
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut p = pos;
        while p < size {
            let n = ((size - p) as usize).min(buf.len());
            io.read_exact_at(&mut buf[..n], p)?;
            f.write_all(&buf[..n]).map_err(|e| io_at(&tr, e))?;
            p += n as u64;
        }
        f.sync_all().map_err(|e| io_at(&tr, e))?;
        // The copy must survive a crash before the truncation does.
        sync_dir(&tr).map_err(|e| io_at(&tr, e))?;
        return Ok(tr);
    }
    Err(Error::Value(format!("no free .trN name for {}", path.display())).into())
}
